//! The broker's route service: an [`EndpointService`] for
//! [`ferry_common::ALPN_ROUTE`] connections (protocol: [`ferry_common::route`]).
//!
//! Per request: the login throttle is asked first ([`super::throttle`]: too
//! many failures for this user or from this address is `throttled`, answered
//! without hashing), then the credentials are checked (an unknown user and a
//! wrong password or token get the same answer), then that the group exists, that
//! the user is assigned to it (`not-assigned`) and that its status takes
//! sessions (`group-not-available`, naming the status); then the group's
//! actor places the request with the engine. An admitted request gets a
//! ticket signed for exactly the reservation the actor made (same session,
//! resource, issue and expiry times). A `RouteLaunch` is served the same
//! way and admitted with `AdmittedLaunch`, which adds the protocol of the
//! host's streaming server.
//!
//! Limits: [`MAX_ROUTE_CONNECTIONS`] connections, [`ROUTE_STREAMS_BEFORE_AUTH`]
//! requests at once on one connection until one of its requests passed the
//! credential check, [`MAX_STREAMS_PER_CONNECTION`] after,
//! [`MAX_ROUTES_IN_FLIGHT`] requests at once over all connections (past it:
//! `busy`), and [`ROUTE_READ_TIMEOUT`] / [`ROUTE_WRITE_TIMEOUT`] on every
//! read and write. A connection that opens no stream within
//! `endpoint::ROUTE_FIRST_STREAM_TIMEOUT`, or has none open for
//! `endpoint::ROUTE_IDLE_TIMEOUT`, is closed with `close_code::IDLE`. A
//! waiting request is bounded by the group's `wait_timeout`: the actor
//! answers at its end.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_common::frame::{self, FrameError};
use ferry_common::route::{
    Admission, BrokerToClient, ClientToBroker, RouteAsk, RouteRefusal, RouteRefused, RouteReply,
    RouteRequest, MAX_ROUTE_FRAME_LEN,
};
use ferry_common::ticket::Credential;
use ferry_common::{GroupName, UserId};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::cluster::Owner;
use crate::endpoint::{
    answer_preamble, close_code, EndpointLimits, EndpointService, PreambleError, REFUSAL_LINGER,
};
use crate::groups::actor::{self, Placement, RouteProgress, RESERVATION_TTL};
use crate::groups::service::AuthError;
use crate::groups::{GroupActors, GroupService};
use crate::routing::throttle::{Outcome, Throttle};
use crate::store::Store;
use crate::tickets::TicketSigner;

pub use crate::endpoint::MAX_ROUTE_CONNECTIONS;

/// Most requests one connection has in flight (QUIC stream credit) once
/// one of its requests passed the credential check: a portal or gateway
/// routing many users through one connection still shares.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Most requests one connection has in flight before any of its requests
/// passed the credential check: `ferry-connect` sends one; an
/// unauthenticated peer holds no more than this per connection.
pub const ROUTE_STREAMS_BEFORE_AUTH: u32 = 2;

/// Most requests in flight over all connections; past it a request is
/// answered `busy` at once instead of queueing without bound.
pub const MAX_ROUTES_IN_FLIGHT: usize = 4_096;

/// Longest wait for a client's preamble, request or cancel frame, and for
/// the client to open its first stream.
pub const ROUTE_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a write to a route client may take.
pub const ROUTE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Statuses whose groups take new sessions. `published` serves;
/// `update-failed` still serves with its resources as they are. Every other
/// status (being published or updated, overdue, expired, recycling) does not.
pub const ACCEPTING_STATUSES: [&str; 2] = ["published", "update-failed"];

/// The message of every credential failure: it never says whether the user
/// or the password was wrong.
const BAD_CREDENTIALS: &str = "unknown user or wrong password or token";

/// Why one route stream ended early (logged, never sent).
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("read: {0}")]
    Read(String),
    #[error("write: {0}")]
    Write(String),
    #[error("not a Ferry peer (bad preamble)")]
    BadPreamble,
    #[error("peer speaks protocol {0}")]
    UnsupportedVersion(u16),
}

struct Inner {
    groups: GroupService,
    actors: GroupActors,
    store: Store,
    signer: Arc<TicketSigner>,
    connections: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
    /// Failed logins per user and per source address.
    throttle: Throttle,
    /// `EndpointLimits::route_first_stream_timeout`.
    first_stream_timeout: Duration,
    /// `EndpointLimits::route_idle_timeout`.
    idle_timeout: Duration,
    /// Where admitted hosts' streaming servers are, as their agents said:
    /// admissions to a host that has just joined wait (at most
    /// [`STREAMING_REPORT_WAIT`]) for its agent to say where its streaming
    /// server is and what it speaks, as it does right after its `Welcome`,
    /// so a user admitted the moment a host joins (a scale-out for waiting
    /// users) gets the configured address and protocol, not the guess.
    registry: Arc<crate::registry::Registry>,
}

/// The route service registered in the endpoint's [`crate::link::Services`].
#[derive(Clone)]
pub struct RouteService {
    inner: Arc<Inner>,
}

impl RouteService {
    pub fn new(
        groups: GroupService,
        actors: GroupActors,
        store: Store,
        signer: Arc<TicketSigner>,
        limits: &EndpointLimits,
        registry: Arc<crate::registry::Registry>,
    ) -> RouteService {
        let throttle = Throttle::new(groups.config().routing.login);
        RouteService {
            inner: Arc::new(Inner {
                throttle,
                groups,
                actors,
                store,
                signer,
                connections: Arc::new(Semaphore::new(limits.max_route_connections)),
                in_flight: Arc::new(Semaphore::new(MAX_ROUTES_IN_FLIGHT)),
                first_stream_timeout: limits.route_first_stream_timeout,
                idle_timeout: limits.route_idle_timeout,
                registry,
            }),
        }
    }
}

/// How long an admission to a host that has just joined waits for its
/// agent's streaming report.
pub const STREAMING_REPORT_WAIT: Duration = Duration::from_secs(2);

impl EndpointService for RouteService {
    fn serve(
        &self,
        conn: quinn::Connection,
        token: CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        let inner = self.inner.clone();
        Box::pin(serve_connection(inner, conn, token))
    }
}

/// A route connection's trust: raised to [`MAX_STREAMS_PER_CONNECTION`]
/// streams once one of its requests passed the credential check.
struct Trust {
    conn: quinn::Connection,
    authenticated: AtomicBool,
}

impl Trust {
    fn authenticated(&self) {
        if !self.authenticated.swap(true, Ordering::Relaxed) {
            self.conn
                .set_max_concurrent_bi_streams(MAX_STREAMS_PER_CONNECTION.into());
        }
    }
}

async fn serve_connection(inner: Arc<Inner>, conn: quinn::Connection, token: CancellationToken) {
    let remote = conn.remote_address();
    let Ok(_permit) = inner.connections.clone().try_acquire_owned() else {
        tracing::warn!(%remote, "refusing route client: every route connection place is taken");
        conn.close(close_code::BUSY.into(), b"too many route clients");
        return;
    };
    conn.set_max_concurrent_bi_streams(ROUTE_STREAMS_BEFORE_AUTH.into());
    let trust = Arc::new(Trust {
        conn: conn.clone(),
        authenticated: AtomicBool::new(false),
    });
    let mut streams = JoinSet::new();
    // No stream open past this: the connection is idle and is closed (the
    // endpoint's keep-alives would otherwise hold it open for ever).
    let idle_at = tokio::time::sleep(inner.first_stream_timeout);
    tokio::pin!(idle_at);
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            Some(_) = streams.join_next(), if !streams.is_empty() => {
                if streams.is_empty() {
                    // No request of it passed the credential check: once its
                    // answer had time to arrive, it holds no place.
                    let idle = if trust.authenticated.load(Ordering::Relaxed) {
                        inner.idle_timeout
                    } else {
                        inner.idle_timeout.min(REFUSAL_LINGER)
                    };
                    idle_at.as_mut().reset(tokio::time::Instant::now() + idle);
                }
            }
            () = &mut idle_at, if streams.is_empty() => {
                tracing::debug!(%remote, "closing idle route connection");
                conn.close(close_code::IDLE.into(), b"idle");
                break;
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let inner = inner.clone();
                    let token = token.clone();
                    let trust = trust.clone();
                    streams.spawn(async move {
                        let source = remote.ip();
                        if let Err(e) = serve_stream(&inner, &trust, source, send, recv, &token).await {
                            tracing::debug!(%remote, "route stream: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::debug!(%remote, "route connection ended: {e}");
                    break;
                }
            },
        }
    }
    if token.is_cancelled() {
        // Requests in flight get their `shutting-down` answer first.
        while streams.join_next().await.is_some() {}
        conn.close(close_code::DONE.into(), b"broker stopping");
    }
    streams.abort_all();
}

async fn write(send: &mut quinn::SendStream, msg: BrokerToClient) -> Result<(), StreamError> {
    let msg = RouteReply::V1(msg);
    timeout(
        ROUTE_WRITE_TIMEOUT,
        frame::write_message(send, &msg, MAX_ROUTE_FRAME_LEN),
    )
    .await
    .map_err(|_| StreamError::Timeout("the client to read"))?
    .map_err(|e| StreamError::Write(e.to_string()))
}

/// Writes the last answer of a stream and finishes it.
async fn finish(send: &mut quinn::SendStream, msg: BrokerToClient) -> Result<(), StreamError> {
    write(send, msg).await?;
    let _ = send.finish();
    Ok(())
}

fn refusal(reason: RouteRefusal, message: impl Into<String>) -> BrokerToClient {
    BrokerToClient::Refused(RouteRefused {
        reason,
        message: message.into(),
    })
}

async fn serve_stream(
    inner: &Inner,
    trust: &Trust,
    source: IpAddr,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    token: &CancellationToken,
) -> Result<(), StreamError> {
    match answer_preamble(
        &mut send,
        &mut recv,
        ROUTE_READ_TIMEOUT,
        "client",
        "upgrade ferry-connect",
    )
    .await
    {
        Ok(()) => {}
        Err(PreambleError::NotFerry) => {
            let _ = send.reset(close_code::BAD_PREAMBLE.into());
            return Err(StreamError::BadPreamble);
        }
        Err(PreambleError::Unsupported(v)) => return Err(StreamError::UnsupportedVersion(v)),
        Err(PreambleError::Timeout(what)) => return Err(StreamError::Timeout(what)),
        Err(PreambleError::Read(e)) => return Err(StreamError::Read(e)),
        Err(PreambleError::Write(e)) => return Err(StreamError::Write(e)),
    }

    let first = timeout(
        ROUTE_READ_TIMEOUT,
        frame::read_frame(&mut recv, MAX_ROUTE_FRAME_LEN),
    )
    .await
    .map_err(|_| StreamError::Timeout("the request"))?;
    let (ask, launch) = match first.map(|f| {
        f.map(|payload| frame::decode_payload_within::<RouteRequest, MAX_ROUTE_FRAME_LEN>(&payload))
    }) {
        Ok(Some(Ok(RouteRequest::V1(ClientToBroker::Route(ask))))) => (ask, false),
        Ok(Some(Ok(RouteRequest::V1(ClientToBroker::RouteLaunch(ask))))) => (ask, true),
        Ok(None) => return Ok(()),
        Ok(Some(Ok(RouteRequest::V1(ClientToBroker::Cancel)))) => {
            inner
                .store
                .metrics()
                .route_refused(RouteRefusal::Malformed.as_str());
            return finish(
                &mut send,
                refusal(RouteRefusal::Malformed, "the first frame must be a Route"),
            )
            .await;
        }
        Ok(Some(Err(e))) | Err(e @ FrameError::TooLarge { .. }) => {
            inner
                .store
                .metrics()
                .route_refused(RouteRefusal::Malformed.as_str());
            return finish(
                &mut send,
                refusal(RouteRefusal::Malformed, format!("malformed request: {e}")),
            )
            .await;
        }
        Err(e) => return Err(StreamError::Read(e.to_string())),
    };
    let Ok(_permit) = inner.in_flight.try_acquire() else {
        inner
            .store
            .metrics()
            .route_refused(RouteRefusal::Busy.as_str());
        return finish(
            &mut send,
            refusal(
                RouteRefusal::Busy,
                format!("the broker has {MAX_ROUTES_IN_FLIGHT} requests in flight; retry"),
            ),
        )
        .await;
    };
    let group = ask.group.clone();
    let answer = tokio::select! {
        a = decide(inner, trust, source, ask, &mut send, &mut recv) => a?,
        _ = token.cancelled() => refusal(RouteRefusal::ShuttingDown, "the broker is shutting down"),
    };
    // A `Route`'s client may be older than `AdmittedLaunch`.
    let answer = match answer {
        BrokerToClient::AdmittedLaunch { admission, .. } if !launch => {
            BrokerToClient::Admitted(admission)
        }
        other => other,
    };
    match &answer {
        BrokerToClient::Refused(r) => {
            inner.store.metrics().route_refused(r.reason.as_str());
            tracing::debug!(%group, reason = %r.reason, "route refused: {}", r.message);
        }
        // Only a group that exists admits: its name is a bounded label.
        BrokerToClient::Admitted(_) | BrokerToClient::AdmittedLaunch { .. } => {
            inner.store.metrics().route_admitted(group.as_str())
        }
        BrokerToClient::Waiting { .. } | BrokerToClient::Redirect { .. } => {}
    }
    finish(&mut send, answer).await
}

/// What the group's row says about routing.
struct GroupFacts {
    status: String,
    shared: bool,
}

async fn group_facts(store: &Store, group: &GroupName) -> Result<Option<GroupFacts>, String> {
    // By its name only (not its id): that is what users ask for.
    let record = store
        .live_group(group.as_str())
        .await
        .map_err(|e| e.to_string())?;
    Ok(record.filter(|r| &r.name == group).map(|r| GroupFacts {
        shared: r.session_type == "shared",
        status: r.status,
    }))
}

/// Checks the request and has the group's actor place it; returns the final
/// answer (a `Waiting` is written on the way).
async fn decide(
    inner: &Inner,
    trust: &Trust,
    source: IpAddr,
    ask: RouteAsk,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<BrokerToClient, StreamError> {
    let RouteAsk {
        group,
        user,
        credential,
        wait,
    } = ask;
    let facts = match check_request(inner, trust, source, &group, &user, &credential).await {
        Ok(facts) => facts,
        Err(refused) => return Ok(refused),
    };
    match inner.actors.ownership().locate(&inner.store, &group).await {
        Owner::Here => {}
        // Admission happens at the group's owner, so its limits hold
        // across the brokers.
        Owner::At(address) => return Ok(BrokerToClient::Redirect { address }),
        Owner::Nobody => {
            return Ok(refusal(
                RouteRefusal::Busy,
                format!(
                    "group {group} is changing broker (a hand-over or a failover): try again in \
                     a few seconds"
                ),
            ))
        }
    }
    let ask = actor::RouteAsk {
        user: user.clone(),
        shared: facts.shared,
        wait,
    };
    let progress = match inner.actors.route(&group, ask).await {
        Ok(rx) => rx,
        Err(_) => return Ok(not_available(&group, facts.status)),
    };
    follow_progress(inner, &group, &user, progress, send, recv).await
}

/// The checks before a request reaches the group's actor, in order: the
/// login throttle, the credentials, that the group exists, that the user is
/// assigned to it and that its status takes sessions. The group's facts, or
/// the refusal.
async fn check_request(
    inner: &Inner,
    trust: &Trust,
    source: IpAddr,
    group: &GroupName,
    user: &UserId,
    credential: &Credential,
) -> Result<GroupFacts, BrokerToClient> {
    let password = matches!(credential, Credential::Password(_));
    let attempt = match inner.throttle.begin(user, source, password) {
        Ok(attempt) => attempt,
        Err(t) => {
            tracing::debug!(%user, %source, by_user = t.by_user, "route: login throttled");
            let secs = t.retry_after_secs();
            return Err(refusal(
                RouteRefusal::Throttled {
                    retry_after_secs: secs,
                },
                format!(
                    "too many failed logins {}; the credentials were not checked: retry in \
                     {secs} s",
                    if t.by_user {
                        "for this user from this address"
                    } else {
                        "from this address"
                    }
                ),
            ));
        }
    };
    let checked = inner.groups.authenticate(user, credential).await;
    let counted = attempt.source();
    let delays = attempt.finish(match &checked {
        Ok(()) => Outcome::Success,
        Err(AuthError::BadCredentials) => Outcome::Failure,
        Err(_) => Outcome::Undecided,
    });
    // Once per failure past a limit (the throttle keeps those few).
    if let Some(d) = delays.source {
        tracing::warn!(source = %counted, failures = d.failures,
            "login throttle: requests from this address are refused for {} ms", d.delay.as_millis());
    }
    if let Some(d) = delays.user {
        tracing::warn!(%user, failures = d.failures,
            "login throttle: user's logins from addresses that failed are refused for {} ms",
            d.delay.as_millis());
    }
    if let Err(e) = checked {
        tracing::info!(%user, %source, "route: credentials refused: {e}");
        return Err(refusal(RouteRefusal::BadCredentials, BAD_CREDENTIALS));
    }
    trust.authenticated();
    let facts = match group_facts(&inner.store, group).await {
        Ok(Some(f)) => f,
        Ok(None) => {
            return Err(refusal(
                RouteRefusal::NoSuchGroup,
                format!("there is no delivery group {group}"),
            ))
        }
        Err(e) => {
            tracing::error!(%group, "route: read group: {e}");
            return Err(refusal(
                RouteRefusal::Internal,
                "the broker could not read the group",
            ));
        }
    };
    match inner.groups.is_assigned(group, user).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(refusal(
                RouteRefusal::NotAssigned,
                format!("user {user} is not assigned to group {group}"),
            ))
        }
        Err(e) => {
            tracing::error!(%group, "route: read assignment: {e}");
            return Err(refusal(
                RouteRefusal::Internal,
                "the broker could not read the group",
            ));
        }
    }
    if !ACCEPTING_STATUSES.contains(&facts.status.as_str()) {
        return Err(not_available(group, facts.status));
    }
    Ok(facts)
}

/// The refusal of a group whose status takes no new sessions.
fn not_available(group: &GroupName, status: String) -> BrokerToClient {
    refusal(
        RouteRefusal::GroupNotAvailable {
            status: status.clone(),
        },
        format!("group {group} is {status}: it takes no new sessions"),
    )
}

/// Follows the actor's answers to a request until the final one: writes
/// each `Waiting` to the client, and withdraws the waiting request when
/// the client cancels or its stream fails.
async fn follow_progress(
    inner: &Inner,
    group: &GroupName,
    user: &UserId,
    mut progress: mpsc::Receiver<RouteProgress>,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<BrokerToClient, StreamError> {
    let mut waiting = None;
    let mut client = ClientWatch::default();
    loop {
        let next = tokio::select! {
            p = progress.recv() => p,
            cancel = client.cancelled(recv), if waiting.is_some() => {
                if let Some(session) = &waiting {
                    inner.actors.cancel_route(group, session).await;
                }
                return match cancel {
                    Ok(()) => Ok(refusal(RouteRefusal::AtCapacity, "withdrawn by the client")),
                    Err(e) => Err(e),
                };
            }
        };
        match next {
            None => {
                return Ok(refusal(
                    RouteRefusal::Internal,
                    "the group stopped before it answered",
                ))
            }
            Some(RouteProgress::Waiting { session, position }) => {
                waiting = Some(session);
                if let Err(e) = write(send, BrokerToClient::Waiting { position }).await {
                    if let Some(session) = &waiting {
                        inner.actors.cancel_route(group, session).await;
                    }
                    return Err(e);
                }
            }
            Some(RouteProgress::Refused(r)) => return Ok(BrokerToClient::Refused(r)),
            Some(RouteProgress::Admitted(p)) => return Ok(admission(inner, group, user, p).await),
        }
    }
}

/// The admission of a placed request, with a ticket signed for exactly the
/// actor's reservation, and the host's protocol (`AdmittedLaunch`: a
/// `Route` gets it as `Admitted`, see [`serve_stream`]).
async fn admission(
    inner: &Inner,
    group: &GroupName,
    user: &UserId,
    mut p: Placement,
) -> BrokerToClient {
    if let Some(t) = inner
        .registry
        .reported_streaming(&p.resource, STREAMING_REPORT_WAIT)
        .await
    {
        p.address = t.address;
        p.protocol = t.protocol;
    }
    let (claims, ticket) = inner.signer.issue(
        group,
        &p.resource,
        user,
        &p.session,
        p.issued_at,
        RESERVATION_TTL,
    );
    tracing::debug!(%group, %user, session = %p.session, resource = %p.resource,
        ticket = %claims.ticket_id_hex(), "route admitted");
    BrokerToClient::AdmittedLaunch {
        admission: Admission {
            resource: p.resource,
            address: p.address,
            session: p.session,
            ticket,
            expires_at: claims.expires_at,
        },
        protocol: p.protocol,
    }
}

/// Watches a waiting request's stream for the client's `Cancel` (or its
/// stream being reset). Reads are kept in a buffer across calls, so the
/// future may be dropped between reads (as `select!` does).
#[derive(Default)]
struct ClientWatch {
    buf: Vec<u8>,
    /// The client finished its side: nothing more can come.
    finished: bool,
}

impl ClientWatch {
    /// Resolves `Ok` on a `Cancel` frame, `Err` on a reset or bad data;
    /// never resolves once the client finished its side cleanly.
    async fn cancelled(&mut self, recv: &mut quinn::RecvStream) -> Result<(), StreamError> {
        loop {
            if self.finished {
                return std::future::pending().await;
            }
            if self.buf.len() >= frame::HEADER_LEN {
                let mut len = [0u8; frame::HEADER_LEN];
                len.copy_from_slice(&self.buf[..frame::HEADER_LEN]);
                let len = u32::from_be_bytes(len) as usize;
                if len > MAX_ROUTE_FRAME_LEN {
                    return Err(StreamError::Read(format!("frame of {len} bytes")));
                }
                if self.buf.len() >= frame::HEADER_LEN + len {
                    let payload = &self.buf[frame::HEADER_LEN..frame::HEADER_LEN + len];
                    return match frame::decode_payload_within::<RouteRequest, MAX_ROUTE_FRAME_LEN>(
                        payload,
                    ) {
                        Ok(RouteRequest::V1(ClientToBroker::Cancel)) => Ok(()),
                        Ok(other) => Err(StreamError::Read(format!(
                            "expected Cancel while waiting, got {other:?}"
                        ))),
                        Err(e) => Err(StreamError::Read(e.to_string())),
                    };
                }
            }
            let mut chunk = [0u8; 256];
            match recv.read(&mut chunk).await {
                Ok(Some(n)) => {
                    if self.buf.len() + n > frame::HEADER_LEN + MAX_ROUTE_FRAME_LEN {
                        return Err(StreamError::Read("too much data while waiting".into()));
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Ok(None) => self.finished = true,
                Err(e) => return Err(StreamError::Read(e.to_string())),
            }
        }
    }
}
