//! The agent link: the broker's service for [`ferry_common::ALPN_AGENT`]
//! connections of its one endpoint ([`crate::endpoint`], which dispatches by
//! ALPN and answers the preamble): mutual TLS, then the framed protocol of
//! one bidirectional stream per connection. A connection without a client
//! certificate is refused before anything is read; the resource is the
//! certificate's DNS SAN, and a `Hello` naming another one is refused. At
//! most [`MAX_AGENT_CONNECTIONS`] at once, apart from the other services'
//! limits, so end users cannot take the fleet's agents' places.
//!
//! What it does with a connection: registers it (store, then registry),
//! records every session event in the store before it acknowledges it
//! (`Ack` means committed), hands committed reports (joins, availability,
//! session starts and ends, presence) to the group's actor, and carries the
//! commands the registry queues for the connection. It decides nothing about
//! groups.
//!
//! One task per connection, under a child `CancellationToken` of the daemon's;
//! a second small task per connection reads frames (reading a frame is not
//! cancel-safe, so it never sits in a `select!`) and hands whole messages to
//! the connection task through a bounded channel. The silent-agent check is a
//! deadline in each connection task, reset by every health report.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_common::frame::{self, FrameError};
use ferry_common::limits::{
    MAX_FRAME_LEN, MAX_HOST_NAME_LEN, MAX_SESSIONS_PER_HELLO, MAX_TEXT_LEN,
};
use ferry_common::wire::{
    AgentMessage, AgentToBroker, BrokerMessage, BrokerToAgent, CommandOutcome, EndReason,
    HealthReport, Hello, Refusal, RefusalCode, RenewalOutcome, SequencedEvent, SessionEvent,
    Welcome,
};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Owner;
use crate::endpoint::{
    answer_preamble, close_code, EndpointService, PreambleError, HANDSHAKE_TIMEOUT, REFUSAL_LINGER,
    WRITE_TIMEOUT,
};
use crate::hook_failure;
use crate::pki;
use crate::registry::{CommandRequest, Dismissal, Registry, StreamingTarget};
use crate::store::{Membership, MembershipSource, Registration, Store};

/// Most agent connections served at once. A broker serves a fleet of hosts,
/// each with one connection (two briefly while reconnecting); past this, an
/// agent is closed right after its handshake with `close_code::BUSY`.
pub const MAX_AGENT_CONNECTIONS: usize = 20_000;

/// Decoded messages waiting for the connection task. Small: the agent's
/// flow control window does the real buffering.
const INBOX_LEN: usize = 64;

/// Commands queued for one connection.
const COMMAND_QUEUE_LEN: usize = 8;

/// Commands sent to one agent and not yet answered.
const MAX_PENDING_COMMANDS: usize = 64;

/// Most session events recorded in one store write. Consecutive events
/// already received are written together and acknowledged with one `Ack`.
const MAX_EVENTS_PER_WRITE: usize = 512;

/// Why a connection ended other than by the agent closing it.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("TLS handshake: {0}")]
    Handshake(String),
    #[error("identity: {0}")]
    Identity(#[from] pki::PkiError),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("not a Ferry peer (bad preamble)")]
    BadPreamble,
    #[error("peer speaks protocol {0}")]
    UnsupportedVersion(u16),
    #[error("refused ({code:?}): {message}")]
    Refused { code: RefusalCode, message: String },
    #[error("write to agent: {0}")]
    Write(String),
}

/// What the link needs from the rest of the broker.
#[derive(Clone)]
pub struct LinkContext {
    /// Where registrations and events are recorded.
    pub store: Store,
    /// Live state of connected resources.
    pub registry: Arc<Registry>,
    /// Told to agents in `Welcome`.
    pub health_interval: Duration,
    /// Consecutive missed intervals before a resource is unavailable.
    pub missed_health_limit: u32,
    /// Where connection tasks are tracked for shutdown.
    pub tracker: TaskTracker,
    /// The ticket signer whose public key is sent to every agent after
    /// `Welcome` (`BrokerToAgent::TicketKey`); `None` sends none.
    pub tickets: Option<Arc<crate::tickets::TicketSigner>>,
    /// The groups' clock: when an agent was last heard from is on the same
    /// timeline as its group's deadlines.
    pub clock: crate::clock::Clock,
    /// The group actors an agent's reports are handed to, after the store
    /// committed them; `None` runs the link alone (its own tests).
    pub actors: Option<crate::groups::GroupActors>,
    /// The CA that signs renewed agent certificates (`AgentToBroker::Renew`).
    pub pki_dir: std::path::PathBuf,
    /// Lifetime of a renewed certificate.
    pub cert_lifetime: Duration,
    /// Which groups this broker owns: an agent of a group owned elsewhere
    /// is sent there.
    pub ownership: crate::cluster::Ownership,
}

impl LinkContext {
    fn silence_limit(&self) -> Duration {
        self.health_interval
            .saturating_mul(self.missed_health_limit.max(1))
    }
}

/// The agent link as a service of the broker's endpoint
/// ([`crate::endpoint`]): connections whose ALPN is
/// [`ferry_common::ALPN_AGENT`], at most [`MAX_AGENT_CONNECTIONS`] at once.
pub struct AgentLink {
    ctx: LinkContext,
    agents: Arc<Semaphore>,
}

impl AgentLink {
    pub fn new(ctx: LinkContext) -> AgentLink {
        AgentLink {
            ctx,
            agents: Arc::new(Semaphore::new(MAX_AGENT_CONNECTIONS)),
        }
    }
}

impl EndpointService for AgentLink {
    fn serve(
        &self,
        conn: quinn::Connection,
        token: CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        let (ctx, agents) = (self.ctx.clone(), self.agents.clone());
        Box::pin(async move {
            let remote = conn.remote_address();
            let Ok(_permit) = agents.try_acquire_owned() else {
                tracing::warn!(%remote,
                    "refusing agent: {MAX_AGENT_CONNECTIONS} agent connections open");
                conn.close(close_code::BUSY.into(), b"too many agents connected");
                return;
            };
            match handle(conn, ctx, token).await {
                Ok(()) => {}
                Err(LinkError::Connection(e)) => {
                    tracing::info!(%remote, "agent connection closed: {e}");
                }
                Err(e) => tracing::warn!(%remote, "agent connection ended: {e}"),
            }
        })
    }
}

async fn handle(
    conn: quinn::Connection,
    ctx: LinkContext,
    token: CancellationToken,
) -> Result<(), LinkError> {
    let resource = match pki::peer_resource(&conn) {
        Ok(r) => r,
        Err(e) => {
            conn.close(close_code::BAD_IDENTITY.into(), e.to_string().as_bytes());
            return Err(e.into());
        }
    };
    // The certificate is checked: the agent link's own stream and window
    // limits replace those before authentication.
    conn.set_max_concurrent_bi_streams(ferry_common::transport::AGENT_MAX_BIDI_STREAMS.into());
    conn.set_receive_window(ferry_common::transport::AGENT_CONNECTION_WINDOW.into());
    let result = Connection::run(conn.clone(), resource.clone(), ctx, token).await;
    match &result {
        Err(LinkError::Refused { .. })
        | Err(LinkError::BadPreamble)
        | Err(LinkError::UnsupportedVersion(_)) => {}
        _ => conn.close(close_code::DONE.into(), b"bye"),
    }
    result.map_err(|e| {
        tracing::debug!(%resource, "connection result: {e}");
        e
    })
}

/// What a handshake gives the connection: the group `Hello` named, the
/// host's group, its spool, what the store recorded, the certificate's
/// issue time.
type Admitted = (
    Option<GroupName>,
    Option<GroupName>,
    u64,
    crate::store::Registered,
    UnixMillis,
);

impl LinkError {
    /// A handshake's result as a metrics label.
    fn handshake_result(&self) -> &'static str {
        match self {
            LinkError::Refused { code, .. } => match code {
                RefusalCode::ProtocolViolation => "protocol_violation",
                RefusalCode::IdentityMismatch => "identity_mismatch",
                RefusalCode::MalformedFrame => "malformed_frame",
                RefusalCode::SequenceGap => "sequence_gap",
                RefusalCode::Superseded => "superseded",
                RefusalCode::StoreUnavailable => "store_unavailable",
                RefusalCode::ShuttingDown => "shutting_down",
                RefusalCode::NotMember => "not_member",
                RefusalCode::Revoked => "revoked",
                RefusalCode::NotOwner => "not_owner",
            },
            LinkError::BadPreamble | LinkError::UnsupportedVersion(_) => "bad_preamble",
            _ => "failed",
        }
    }
}

/// What the connection task waits for.
enum Wake {
    Shutdown,
    Superseded,
    Inbound(Option<Result<AgentMessage, FrameError>>),
    Command(CommandRequest),
    Silent,
}

/// What the link knows of a host's health reports.
struct Health {
    /// When the host counts as silent if no report came.
    silent_at: Instant,
    /// Whether it reported within the silence limit.
    available: bool,
    /// What the group's actor was last told: healthy and not draining.
    offered: bool,
}

/// One registered agent connection.
struct Connection {
    conn: quinn::Connection,
    send: quinn::SendStream,
    resource: ResourceId,
    conn_id: u64,
    ctx: LinkContext,
    spool_id: u64,
    /// The group the agent's `Hello` named; its reports are handed to that
    /// group's actor.
    group: Option<GroupName>,
    /// Commands sent and not yet answered, by id.
    pending: HashMap<u64, oneshot::Sender<CommandOutcome>>,
    /// Set by the registry when the broker ends this connection (the host
    /// changed group): the refusal its agent is sent.
    dismissal: Dismissal,
    /// A certificate was renewed on this connection.
    renewed: bool,
    next_command: u64,
    /// Broker clock of the last message from the agent.
    last_heard: UnixMillis,
    /// When the certificate of this connection was issued.
    cert_issued: UnixMillis,
}

/// `msg` with every text field the host chose bounded and cleaned
/// ([`hook_failure::bounded`]), as it enters the broker: nothing a host
/// sends is stored, shown or handed to an actor with terminal escapes or
/// beyond its limit. Identifiers are checked while decoding; the streaming
/// host is checked by [`Connection::streaming`].
fn bounded_text(msg: AgentMessage) -> AgentMessage {
    let line = |s: &mut String, max: usize| *s = hook_failure::bounded(s, max, false);
    let outcome = |o: &mut CommandOutcome| {
        if let CommandOutcome::Failed(text) = o {
            *text = hook_failure::bounded(text, MAX_TEXT_LEN, true);
        }
    };
    let AgentMessage::V1(mut m) = msg;
    match &mut m {
        AgentToBroker::Hello(h) => {
            line(&mut h.agent_version, MAX_TEXT_LEN);
            line(&mut h.image_version, MAX_TEXT_LEN);
            line(&mut h.host.hostname, MAX_HOST_NAME_LEN);
            line(&mut h.host.os, MAX_TEXT_LEN);
            line(&mut h.host.kernel, MAX_TEXT_LEN);
        }
        AgentToBroker::Session(SequencedEvent {
            event:
                SessionEvent::Ended {
                    reason: EndReason::Other(reason),
                    ..
                },
            ..
        }) => line(reason, MAX_TEXT_LEN),
        AgentToBroker::CommandResult(r) => outcome(&mut r.outcome),
        // Cleaned, not cut: an inventory beyond its limits is refused
        // whole ([`check_inventory`]).
        AgentToBroker::Inventory(i) => {
            line(&mut i.agent_version, MAX_FRAME_LEN);
            line(&mut i.image_version, MAX_FRAME_LEN);
            for c in &mut i.components {
                line(&mut c.name, MAX_FRAME_LEN);
                line(&mut c.version, MAX_FRAME_LEN);
            }
            if let Some(u) = &mut i.last_update {
                line(&mut u.component, MAX_FRAME_LEN);
                line(&mut u.version, MAX_FRAME_LEN);
                outcome(&mut u.outcome);
            }
        }
        AgentToBroker::Session(_)
        | AgentToBroker::Health(_)
        | AgentToBroker::Streaming(_)
        | AgentToBroker::StreamingServer(_)
        | AgentToBroker::Presence(_)
        | AgentToBroker::Renew { .. } => {}
    }
    AgentMessage::V1(m)
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_TEXT_LEN {
        let mut end = MAX_TEXT_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Sends `Refused`, gives it a moment to arrive, and closes the connection.
async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    resource: &ResourceId,
    code: RefusalCode,
    message: String,
) -> LinkError {
    let message = truncate(message);
    tracing::warn!(%resource, ?code, "refusing agent: {message}");
    let msg = BrokerMessage::V1(BrokerToAgent::Refused(Refusal {
        code,
        message: message.clone(),
    }));
    last_word(conn, send, &msg, format!("{code:?}").as_bytes()).await;
    LinkError::Refused { code, message }
}

/// Sends `msg`, the broker's last word on this connection, waits (at
/// most [`REFUSAL_LINGER`] each) until it is written and taken, and closes
/// the connection with `reason`.
async fn last_word(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    msg: &BrokerMessage,
    reason: &[u8],
) {
    let _ = timeout(
        REFUSAL_LINGER,
        frame::write_message(send, msg, MAX_FRAME_LEN),
    )
    .await;
    let _ = send.finish();
    let _ = timeout(REFUSAL_LINGER, send.stopped()).await;
    conn.close(close_code::REFUSED.into(), reason);
}

/// Sends the agent of group `group` to the broker at `address`, which owns
/// it, and closes the connection.
async fn redirect(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    resource: &ResourceId,
    group: &GroupName,
    address: String,
) -> LinkError {
    let message = format!("group {group} is served by the broker at {address}");
    tracing::info!(%resource, %group, %address, "agent sent to its group's broker");
    let msg = BrokerMessage::V1(BrokerToAgent::Redirect {
        address: truncate(address),
        message: message.clone(),
    });
    last_word(conn, send, &msg, b"Redirect").await;
    LinkError::Refused {
        code: RefusalCode::NotOwner,
        message,
    }
}

/// Answers the agent's preamble; a peer that is not a Ferry agent, or one
/// of a version this broker does not speak, is closed with its code.
async fn preamble(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    resource: &ResourceId,
) -> Result<(), LinkError> {
    match answer_preamble(
        send,
        recv,
        HANDSHAKE_TIMEOUT,
        "agent",
        "upgrade the agent or broker",
    )
    .await
    {
        Ok(()) => {}
        Err(PreambleError::NotFerry) => {
            tracing::warn!(%resource, "refusing agent: bad preamble");
            conn.close(
                close_code::BAD_PREAMBLE.into(),
                b"not a Ferry peer (bad preamble)",
            );
            return Err(LinkError::BadPreamble);
        }
        Err(PreambleError::Read(e)) => {
            conn.close(close_code::BAD_PREAMBLE.into(), b"truncated preamble");
            return Err(LinkError::Handshake(format!("read preamble: {e}")));
        }
        Err(PreambleError::Unsupported(v)) => {
            tracing::warn!(%resource, version = v, "refusing agent: unsupported protocol version");
            conn.close(
                close_code::UNSUPPORTED_VERSION.into(),
                b"unsupported version",
            );
            return Err(LinkError::UnsupportedVersion(v));
        }
        Err(PreambleError::Timeout(what)) => return Err(LinkError::Timeout(what)),
        Err(PreambleError::Write(e)) => return Err(LinkError::Write(e)),
    }
    Ok(())
}

/// The agent's first message, which must be a `Hello` of the resource its
/// certificate names, within the limits; `None` when the agent or the
/// broker went away first.
async fn hello(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    inbox: &mut mpsc::Receiver<Result<AgentMessage, FrameError>>,
    resource: &ResourceId,
    token: &CancellationToken,
) -> Result<Option<Hello>, LinkError> {
    let first = tokio::select! {
        _ = token.cancelled() => return Ok(None),
        m = timeout(HANDSHAKE_TIMEOUT, inbox.recv()) => m
            .map_err(|_| LinkError::Timeout("Hello"))?,
    };
    let hello = match first {
        None => return Ok(None),
        Some(Ok(AgentMessage::V1(AgentToBroker::Hello(h)))) => h,
        Some(Ok(other)) => {
            return Err(refuse(
                conn,
                send,
                resource,
                RefusalCode::ProtocolViolation,
                format!("the first message must be Hello, got {}", kind(&other)),
            )
            .await)
        }
        Some(Err(e)) => {
            return Err(refuse(
                conn,
                send,
                resource,
                RefusalCode::MalformedFrame,
                e.to_string(),
            )
            .await)
        }
    };
    if hello.resource != *resource {
        let message = format!(
            "certificate names resource {resource}, Hello claims {}",
            hello.resource
        );
        return Err(refuse(conn, send, resource, RefusalCode::IdentityMismatch, message).await);
    }
    if hello.sessions.len() > MAX_SESSIONS_PER_HELLO {
        let message = format!(
            "Hello lists {} sessions; the limit is {MAX_SESSIONS_PER_HELLO}",
            hello.sessions.len()
        );
        return Err(refuse(conn, send, resource, RefusalCode::MalformedFrame, message).await);
    }
    Ok(Some(hello))
}

/// Reads frames into the connection task's inbox until the stream ends, a
/// frame is bad (the error is passed on) or the token is cancelled.
async fn read_frames(
    mut recv: quinn::RecvStream,
    inbox: mpsc::Sender<Result<AgentMessage, FrameError>>,
    token: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = token.cancelled() => return,
            m = frame::read_message::<AgentMessage, _>(&mut recv, MAX_FRAME_LEN) => m,
        };
        let (item, last) = match msg {
            Ok(Some(m)) => (Ok(bounded_text(m)), false),
            Ok(None) => return,
            // The connection went away (closed, reset, cut mid-frame): not the
            // peer's malformed data, nothing to refuse; the task sees the end.
            Err(FrameError::Io(e)) => {
                tracing::debug!("agent stream ended: {e}");
                return;
            }
            Err(FrameError::Truncated) => return,
            Err(e) => (Err(e), true),
        };
        if inbox.send(item).await.is_err() || last {
            return;
        }
    }
}

impl Connection {
    async fn run(
        conn: quinn::Connection,
        resource: ResourceId,
        ctx: LinkContext,
        token: CancellationToken,
    ) -> Result<(), LinkError> {
        let (mut send, mut recv) = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            r = timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()) => r
                .map_err(|_| LinkError::Timeout("the agent's stream"))??,
        };

        preamble(&conn, &mut send, &mut recv, &resource).await?;

        let (inbox_tx, mut inbox) = mpsc::channel(INBOX_LEN);
        let reader_token = token.child_token();
        // Stops the reader however this task ends.
        let _reader_guard = reader_token.clone().drop_guard();
        ctx.tracker.spawn(read_frames(recv, inbox_tx, reader_token));

        let admitted = Self::admit(&conn, &mut send, &mut inbox, &resource, &ctx, &token).await;
        match &admitted {
            Ok(Some(_)) => ctx.store.metrics().handshake("accepted"),
            // Shut down meanwhile: no handshake to count.
            Ok(None) => {}
            Err(e) => ctx.store.metrics().handshake(e.handshake_result()),
        }
        let Some((named, group, spool_id, registered, cert_issued)) = admitted? else {
            return Ok(());
        };
        let last_heard = ctx.clock.now();
        let mut this = Connection {
            conn,
            send,
            resource,
            conn_id: ctx.registry.next_conn_id(),
            ctx,
            spool_id,
            group,
            pending: HashMap::new(),
            dismissal: Dismissal::default(),
            renewed: false,
            next_command: 0,
            last_heard,
            cert_issued,
        };
        let (superseded, mut commands) = this.attach();
        // A revocation or an assignment committed while this connection was
        // checked found no connection to dismiss: attached now, it is checked
        // once more (one committed from here on dismisses it).
        if let Err(e) = this.still_admitted(named.as_ref()).await {
            this.ctx.registry.detach(&this.resource, this.conn_id);
            return Err(e);
        }
        this.join(registered.open.clone()).await;
        let result = this
            .serve(
                registered.last_recorded_seq,
                &mut inbox,
                &mut commands,
                &superseded,
                &token,
            )
            .await;
        this.leave().await;
        result
    }

    /// The handshake after the preamble: `Hello`, the certificate's floor,
    /// membership, ownership and the registration recorded. `None`: shut
    /// down meanwhile.
    async fn admit(
        conn: &quinn::Connection,
        send: &mut quinn::SendStream,
        inbox: &mut mpsc::Receiver<Result<AgentMessage, FrameError>>,
        resource: &ResourceId,
        ctx: &LinkContext,
        token: &CancellationToken,
    ) -> Result<Option<Admitted>, LinkError> {
        let Some(hello) = hello(conn, send, inbox, resource, token).await? else {
            return Ok(None);
        };
        let cert_issued = check_revocation(conn, send, resource, ctx).await?;

        let named = hello.group.clone();
        let group = match member_group(ctx, resource, named.as_ref()).await {
            Ok(group) => group,
            Err((code, message)) => return Err(refuse(conn, send, resource, code, message).await),
        };
        if let Some(g) = &group {
            match ctx.ownership.locate(&ctx.store, g).await {
                Owner::Here => {}
                Owner::At(address) => return Err(redirect(conn, send, resource, g, address).await),
                Owner::Nobody => {
                    let message = format!(
                        "no broker owns group {g} right now (a broker is taking it over): \
                         reconnect shortly"
                    );
                    return Err(refuse(conn, send, resource, RefusalCode::NotOwner, message).await);
                }
            }
        }
        let spool_id = hello.spool_id;
        let registered = match ctx
            .store
            .register(registration(hello, group.clone(), ctx.clock.now()))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Err(refuse(
                    conn,
                    send,
                    resource,
                    RefusalCode::StoreUnavailable,
                    format!("record registration: {e}"),
                )
                .await)
            }
        };
        if !registered.ended.is_empty() {
            tracing::info!(%resource, ended = ?registered.ended,
                "ended sessions the host no longer has");
        }

        Ok(Some((named, group, spool_id, registered, cert_issued)))
    }

    /// Makes this connection the one that speaks for its resource in the
    /// registry; returns the token that says a newer one took over, and
    /// the commands sent to the agent.
    fn attach(&self) -> (CancellationToken, mpsc::Receiver<CommandRequest>) {
        let superseded = CancellationToken::new();
        let (cmd_tx, commands) = mpsc::channel(COMMAND_QUEUE_LEN);
        self.ctx.registry.attach(
            &self.resource,
            self.conn_id,
            self.group.clone(),
            superseded.clone(),
            self.dismissal.clone(),
            cmd_tx,
        );
        (superseded, commands)
    }

    /// Hands the registered host to its group's actor with the sessions
    /// the store records open on it (`open`).
    async fn join(&self, open: Vec<SessionId>) {
        // Until the agent says where its streaming server is (right after
        // `Welcome`): the default port on the address it comes from. Known
        // before the join, which may admit waiting users to this host at
        // once: their answers need an address.
        let guess = StreamingTarget {
            address: std::net::SocketAddr::new(
                self.conn.remote_address().ip(),
                ferry_common::route::DEFAULT_STREAMING_PORT,
            )
            .to_string(),
            protocol: None,
        };
        self.ctx
            .registry
            .set_streaming(&self.resource, self.conn_id, guess.clone());
        // The group learns of the host only after the store has its
        // registration, and before `Welcome`: an agent told it is registered
        // is in its group's live state too. A group without a running actor
        // takes the host in from the registry when it starts.
        if let (Some(g), Some(actors)) = (&self.group, self.ctx.actors.as_ref()) {
            actors.streaming_address(g, &self.resource, guess).await;
            // With the connection id: the actor ignores reports of a
            // connection older than the newest joined one (reconnects race).
            actors
                .joined_on(g, &self.resource, Some(self.conn_id), open)
                .await;
        }
    }

    /// The connection ended: unless a newer one speaks for the host, when
    /// it was last heard from is recorded and its group's actor is told.
    async fn leave(&self) {
        let was_current = self.ctx.registry.detach(&self.resource, self.conn_id);
        if !was_current {
            // A superseded connection says nothing: its successor speaks for the host.
            return;
        }
        // What `resources list` shows of a host that is gone, and where
        // its group counts its absence from.
        if let Err(e) = self
            .ctx
            .store
            .record_last_seen(&self.resource, self.last_heard)
            .await
        {
            tracing::warn!(resource = %self.resource, "record when it was last seen: {e}");
        }
        if let (Some(g), Some(actors)) = (&self.group, self.ctx.actors.as_ref()) {
            actors.left_on(g, &self.resource, Some(self.conn_id)).await;
        }
    }

    async fn write(&mut self, msg: BrokerToAgent) -> Result<(), LinkError> {
        let msg = BrokerMessage::V1(msg);
        timeout(
            WRITE_TIMEOUT,
            frame::write_message(&mut self.send, &msg, MAX_FRAME_LEN),
        )
        .await
        .map_err(|_| LinkError::Timeout("the agent to read"))?
        .map_err(|e| LinkError::Write(e.to_string()))
    }

    async fn refuse(&mut self, code: RefusalCode, message: String) -> LinkError {
        refuse(&self.conn, &mut self.send, &self.resource, code, message).await
    }

    async fn serve(
        &mut self,
        last_recorded_seq: u64,
        inbox: &mut mpsc::Receiver<Result<AgentMessage, FrameError>>,
        commands: &mut mpsc::Receiver<CommandRequest>,
        superseded: &CancellationToken,
        token: &CancellationToken,
    ) -> Result<(), LinkError> {
        self.welcome(last_recorded_seq).await?;
        let mut health = Health {
            silent_at: Instant::now() + self.ctx.silence_limit(),
            available: true,
            offered: true,
        };
        // A message taken from the inbox while batching events, handled next.
        let mut carried: Option<AgentMessage> = None;
        loop {
            let wake = match carried.take() {
                Some(m) => Wake::Inbound(Some(Ok(m))),
                None => tokio::select! {
                    biased;
                    _ = token.cancelled() => Wake::Shutdown,
                    _ = superseded.cancelled() => Wake::Superseded,
                    m = inbox.recv() => Wake::Inbound(m),
                    Some(c) = commands.recv() => Wake::Command(c),
                    _ = tokio::time::sleep_until(health.silent_at), if health.available => Wake::Silent,
                },
            };
            match wake {
                Wake::Shutdown => {
                    return Err(self
                        .refuse(RefusalCode::ShuttingDown, "broker is shutting down".into())
                        .await)
                }
                Wake::Superseded => {
                    let dismissed = self
                        .dismissal
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .take();
                    let Refusal { code, message } = dismissed.unwrap_or(Refusal {
                        code: RefusalCode::Superseded,
                        message: "a newer connection of this resource registered".into(),
                    });
                    return Err(self.refuse(code, message).await);
                }
                Wake::Silent => self.silent(&mut health).await,
                Wake::Command(req) => self.send_command(req).await?,
                Wake::Inbound(None) => return Ok(()),
                Wake::Inbound(Some(Err(e))) => {
                    return Err(self
                        .refuse(RefusalCode::MalformedFrame, e.to_string())
                        .await)
                }
                Wake::Inbound(Some(Ok(AgentMessage::V1(msg)))) => {
                    self.last_heard = self.ctx.clock.now();
                    carried = self.message(msg, inbox, &mut health).await?;
                }
            }
        }
    }

    /// `Welcome`, then the ticket key when the broker signs tickets.
    async fn welcome(&mut self, last_recorded_seq: u64) -> Result<(), LinkError> {
        self.write(BrokerToAgent::Welcome(Welcome {
            resource: self.resource.clone(),
            last_recorded_seq,
            health_interval_ms: u32::try_from(self.ctx.health_interval.as_millis())
                .unwrap_or(u32::MAX),
            broker_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
        .await?;
        if let Some(tickets) = &self.ctx.tickets {
            self.write(BrokerToAgent::TicketKey {
                public_key: tickets.public_key(),
            })
            .await?;
        }
        tracing::info!(resource = %self.resource, spool = self.spool_id, last_recorded_seq,
            "agent registered");
        Ok(())
    }

    /// No health report for the silence limit: the host takes no new sessions.
    async fn silent(&mut self, health: &mut Health) {
        health.available = false;
        health.offered = false;
        let limit = self.ctx.silence_limit();
        tracing::warn!(resource = %self.resource,
            "no health report for {limit:?}; marking unavailable");
        self.ctx
            .registry
            .set_available(&self.resource, self.conn_id, false);
        self.say_health(
            false,
            format!(
                "sent no health report for {}; it takes no new sessions",
                ferry_common::duration::format_duration(limit)
            ),
        )
        .await;
    }

    /// Handles one message of the registered agent; returns a message read
    /// ahead while batching session events, to handle next.
    async fn message(
        &mut self,
        msg: AgentToBroker,
        inbox: &mut mpsc::Receiver<Result<AgentMessage, FrameError>>,
        health: &mut Health,
    ) -> Result<Option<AgentMessage>, LinkError> {
        match msg {
            AgentToBroker::Hello(_) => {
                return Err(self
                    .refuse(RefusalCode::ProtocolViolation, "Hello sent twice".into())
                    .await)
            }
            AgentToBroker::Session(ev) => return self.sessions(ev, inbox).await,
            AgentToBroker::Health(report) => self.health(report, health).await,
            AgentToBroker::CommandResult(result) => match self.pending.remove(&result.id) {
                Some(reply) => {
                    let _ = reply.send(result.outcome);
                }
                None => tracing::debug!(resource = %self.resource, id = result.id,
                    "result of an unknown or expired command"),
            },
            AgentToBroker::Streaming(endpoint) => self.streaming(endpoint, None).await,
            AgentToBroker::StreamingServer(server) => {
                self.streaming(server.endpoint, server.protocol).await
            }
            AgentToBroker::Presence(report) => {
                if let (Some(g), Some(actors)) = (&self.group, self.ctx.actors.as_ref()) {
                    actors.presence(g, &self.resource, report).await;
                }
            }
            AgentToBroker::Inventory(inventory) => self.inventory(inventory).await?,
            AgentToBroker::Renew { csr_der } => self.renew(csr_der).await?,
        }
        Ok(None)
    }

    /// The checks of the connection's start, made again once it is
    /// attached: not revoked, and still in the group it was admitted to.
    async fn still_admitted(&mut self, named: Option<&GroupName>) -> Result<(), LinkError> {
        if let Err((code, message)) = above_floor(&self.ctx, &self.resource, self.cert_issued).await
        {
            return Err(self.refuse(code, message).await);
        }
        match member_group(&self.ctx, &self.resource, named).await {
            Ok(group) if group == self.group => Ok(()),
            Ok(group) => {
                let now = match group {
                    Some(g) => format!("group {g}"),
                    None => "no group".to_owned(),
                };
                let message = format!(
                    "an operator put resource {} in {now} while it connected: reconnect",
                    self.resource
                );
                Err(self.refuse(RefusalCode::NotMember, message).await)
            }
            Err((code, message)) => Err(self.refuse(code, message).await),
        }
    }

    /// A renewal: a certificate for the request's key, of this resource and
    /// the configured lifetime, unless the resource was revoked since this
    /// connection's certificate was issued (then the connection is refused).
    /// One per connection: the agent reconnects with what it got. Once
    /// issued, certificates of the resource older than this connection's
    /// are refused (a copy of an earlier key dies).
    async fn renew(&mut self, csr_der: Vec<u8>) -> Result<(), LinkError> {
        if self.renewed {
            let message = "a certificate was renewed on this connection already: reconnect \
                           with it"
                .to_owned();
            return self
                .write(BrokerToAgent::Renewal(RenewalOutcome::Failed { message }))
                .await;
        }
        // Stamped before the floor is read: a revocation committed after
        // the read has a floor past this certificate's issue time.
        let validity = pki::Validity::starting_now(self.ctx.cert_lifetime);
        match above_floor(&self.ctx, &self.resource, self.cert_issued).await {
            Ok(()) => {}
            Err((RefusalCode::StoreUnavailable, why)) => {
                tracing::warn!(resource = %self.resource, "renewal: {why}");
                let message = "the broker cannot read its store now; try again later".into();
                return self
                    .write(BrokerToAgent::Renewal(RenewalOutcome::Failed { message }))
                    .await;
            }
            Err((code, message)) => return Err(self.refuse(code, message).await),
        }
        let (pki_dir, resource) = (self.ctx.pki_dir.clone(), self.resource.clone());
        let issued = tokio::task::spawn_blocking(move || {
            pki::issue_from_csr(
                &pki_dir,
                &resource,
                &csr_der,
                pki::CsrNames::OnlyResource,
                validity,
            )
        })
        .await
        .unwrap_or_else(|e| Err(pki::PkiError::Tls(format!("signing task: {e}"))));
        let outcome = match issued {
            Ok(cert_pem) => {
                // A revocation committed while it was signed: not handed out.
                if let Err((code, message)) =
                    above_floor(&self.ctx, &self.resource, self.cert_issued).await
                {
                    return Err(self.refuse(code, message).await);
                }
                if let Err(e) = self
                    .ctx
                    .store
                    .retire_older_certificates(&self.resource, self.cert_issued)
                    .await
                {
                    tracing::warn!(resource = %self.resource,
                        "renewal: refuse the certificates before this one: {e}");
                }
                self.renewed = true;
                let (_, not_after) =
                    ferry_common::certs::validity(validity.issued, validity.lifetime);
                tracing::info!(resource = %self.resource,
                    not_after = %crate::render::rfc3339_secs(not_after),
                    "certificate renewed over the link");
                RenewalOutcome::Issued { cert_pem }
            }
            Err(e @ pki::PkiError::Csr(_)) => {
                tracing::warn!(resource = %self.resource, "renewal refused: {e}");
                RenewalOutcome::Failed {
                    message: truncate(e.to_string()),
                }
            }
            Err(e) => {
                tracing::error!(resource = %self.resource, "renewal: issue certificate: {e}");
                RenewalOutcome::Failed {
                    message: "the broker could not issue a certificate now; try again later".into(),
                }
            }
        };
        self.write(BrokerToAgent::Renewal(outcome)).await
    }

    /// Records `first` with the session events queued behind it (up to
    /// [`MAX_EVENTS_PER_WRITE`] in one write); returns the first other
    /// message met, to handle next.
    async fn sessions(
        &mut self,
        first: SequencedEvent,
        inbox: &mut mpsc::Receiver<Result<AgentMessage, FrameError>>,
    ) -> Result<Option<AgentMessage>, LinkError> {
        let mut events = vec![first];
        let mut carried = None;
        while events.len() < MAX_EVENTS_PER_WRITE {
            match inbox.try_recv() {
                Ok(Ok(AgentMessage::V1(AgentToBroker::Session(ev)))) => events.push(ev),
                Ok(Ok(other)) => {
                    carried = Some(other);
                    break;
                }
                Ok(Err(e)) => {
                    // Record what arrived intact, then refuse.
                    self.record(events).await?;
                    return Err(self
                        .refuse(RefusalCode::MalformedFrame, e.to_string())
                        .await);
                }
                Err(_) => break,
            }
        }
        self.record(events).await?;
        Ok(carried)
    }

    /// A health report: the registry keeps it; the group's actor hears of a
    /// comeback after silence or of a change of draining.
    async fn health(&mut self, report: HealthReport, health: &mut Health) {
        let want = !report.draining;
        self.ctx
            .registry
            .health(&self.resource, self.conn_id, report, self.ctx.clock.now());
        let was_silent = !health.available;
        health.available = true;
        health.silent_at = Instant::now() + self.ctx.silence_limit();
        if was_silent {
            health.offered = want;
            self.say_health(want, "reports health again".into()).await;
        } else if want != health.offered {
            health.offered = want;
            self.offer(want).await;
        }
    }

    /// An inventory within the limits: its versions recorded, then kept
    /// live; one beyond them is refused.
    async fn inventory(
        &mut self,
        inventory: ferry_common::wire::Inventory,
    ) -> Result<(), LinkError> {
        if let Err(why) = check_inventory(&inventory) {
            return Err(self.refuse(RefusalCode::MalformedFrame, why).await);
        }
        // Durable first: a host that leaves right after is still shown with
        // what it runs.
        if let Err(e) = self
            .ctx
            .store
            .record_versions(
                &self.resource,
                inventory.agent_version.clone(),
                inventory.image_version.clone(),
            )
            .await
        {
            tracing::warn!(resource = %self.resource, "record versions: {e}");
        }
        self.ctx
            .registry
            .set_inventory(&self.resource, self.conn_id, inventory);
        Ok(())
    }

    /// Tells the group's actor where end users reach the host's streaming
    /// server (the agent's configured host, or the address its connection
    /// comes from) and what it speaks (`None`: not said). A host name that
    /// cannot be one is ignored (logged).
    async fn streaming(
        &self,
        endpoint: ferry_common::wire::StreamingEndpoint,
        protocol: Option<ferry_common::wire::StreamingProtocol>,
    ) {
        let address = match endpoint.host {
            None => std::net::SocketAddr::new(self.conn.remote_address().ip(), endpoint.port)
                .to_string(),
            Some(host)
                if !host.is_empty()
                    && host.len() < ferry_common::route::MAX_STREAMING_ADDRESS_LEN - 6
                    && host.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_')
                    }) =>
            {
                if host.contains(':') {
                    format!("[{host}]:{}", endpoint.port)
                } else {
                    format!("{host}:{}", endpoint.port)
                }
            }
            Some(host) => {
                tracing::warn!(resource = %self.resource, "ignoring streaming host {:?}: not a host name or IP", truncate(host));
                self.ctx
                    .registry
                    .streaming_reported(&self.resource, self.conn_id, None);
                return;
            }
        };
        let target = StreamingTarget { address, protocol };
        self.ctx
            .registry
            .streaming_reported(&self.resource, self.conn_id, Some(target.clone()));
        if let (Some(g), Some(actors)) = (&self.group, self.ctx.actors.as_ref()) {
            actors.streaming_address(g, &self.resource, target).await;
        }
    }

    /// Tells the group's actor whether the host takes sessions after a
    /// change of its health (silent, or back), which the group records.
    async fn say_health(&self, available: bool, why: String) {
        if let (Some(g), Some(actors)) = (&self.group, self.ctx.actors.as_ref()) {
            actors
                .health_changed(g, &self.resource, self.conn_id, available, why)
                .await;
        }
    }

    /// Tells the group's actor whether the host takes sessions.
    async fn offer(&self, available: bool) {
        if let (Some(g), Some(actors)) = (&self.group, self.ctx.actors.as_ref()) {
            actors
                .availability_on(g, &self.resource, Some(self.conn_id), available)
                .await;
        }
    }

    /// Records consecutive events durably, hands the newly recorded ones to
    /// the group's actor, then acknowledges them.
    async fn record(&mut self, events: Vec<SequencedEvent>) -> Result<(), LinkError> {
        let for_group = self
            .group
            .as_ref()
            .and(self.ctx.actors.as_ref())
            .map(|_| events.clone());
        let out = match self
            .ctx
            .store
            .record_events(&self.resource, self.spool_id, events, self.ctx.clock.now())
            .await
        {
            Ok(out) => out,
            Err(e) => {
                return Err(self
                    .refuse(RefusalCode::StoreUnavailable, format!("record events: {e}"))
                    .await)
            }
        };
        self.ctx
            .store
            .metrics()
            .events_recorded(out.recorded as u64);
        tracing::debug!(resource = %self.resource, last_seq = out.last_seq,
            recorded = out.recorded, duplicates = out.duplicates, "events recorded");
        for seq in &out.refused {
            tracing::warn!(
                resource = %self.resource,
                seq,
                "a session start reuses the id of a session that already ended on this host: \
                 recorded as a refused event; the ended session's record is kept"
            );
        }
        if let (Some(events), Some(g), Some(actors)) =
            (for_group, &self.group, self.ctx.actors.as_ref())
        {
            // Recorded events are consecutive and end at `last_seq`; those
            // before them were duplicates, already handed over once. A
            // refused start is no session for the group either.
            let first_new = out.last_seq.saturating_sub(out.recorded as u64);
            let new: Vec<_> = events
                .into_iter()
                .filter(|e| e.seq > first_new && e.seq <= out.last_seq)
                .filter(|e| !out.refused.contains(&e.seq))
                .map(|e| e.event)
                .collect();
            // Before the Ack: an agent told "recorded" knows its group saw it.
            actors.sessions(g, &self.resource, new).await;
            tracing::debug!(resource = %self.resource, group = %g, "the group took the events");
        }
        if out.recorded + out.duplicates > 0 {
            self.write(BrokerToAgent::Ack {
                up_to: out.last_seq,
            })
            .await?;
            tracing::debug!(resource = %self.resource, up_to = out.last_seq, "events acknowledged");
        }
        if let Some(gap) = out.gap {
            return Err(self
                .refuse(
                    RefusalCode::SequenceGap,
                    format!(
                        "event seq {} skips ahead; the next expected is {}",
                        gap.got, gap.expected
                    ),
                )
                .await);
        }
        Ok(())
    }

    async fn send_command(&mut self, req: CommandRequest) -> Result<(), LinkError> {
        // Answers of commands whose admin caller gave up are not awaited.
        self.pending.retain(|_, reply| !reply.is_closed());
        if self.pending.len() >= MAX_PENDING_COMMANDS {
            let _ = req.reply.send(CommandOutcome::Failed(format!(
                "{MAX_PENDING_COMMANDS} commands already wait for this agent"
            )));
            return Ok(());
        }
        self.next_command += 1;
        let id = self.next_command;
        self.pending.insert(id, req.reply);
        self.write(BrokerToAgent::Command {
            id,
            command: req.command,
        })
        .await
    }
}

fn kind(msg: &AgentMessage) -> &'static str {
    match msg {
        AgentMessage::V1(AgentToBroker::Hello(_)) => "Hello",
        AgentMessage::V1(AgentToBroker::Session(_)) => "Session",
        AgentMessage::V1(AgentToBroker::Health(_)) => "Health",
        AgentMessage::V1(AgentToBroker::CommandResult(_)) => "CommandResult",
        AgentMessage::V1(AgentToBroker::Streaming(_)) => "Streaming",
        AgentMessage::V1(AgentToBroker::StreamingServer(_)) => "StreamingServer",
        AgentMessage::V1(AgentToBroker::Presence(_)) => "Presence",
        AgentMessage::V1(AgentToBroker::Inventory(_)) => "Inventory",
        AgentMessage::V1(AgentToBroker::Renew { .. }) => "Renew",
    }
}

/// Refuses a connection whose certificate was issued before its resource's
/// revocation floor (`ferryctl resources revoke`, or the name enrolled
/// anew); answers when the certificate was issued.
async fn check_revocation(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    resource: &ResourceId,
    ctx: &LinkContext,
) -> Result<UnixMillis, LinkError> {
    let issued = match pki::peer_certificate(conn) {
        Ok(info) => info.issued,
        Err(e) => {
            let code = RefusalCode::IdentityMismatch;
            return Err(refuse(conn, send, resource, code, e.to_string()).await);
        }
    };
    match above_floor(ctx, resource, issued).await {
        Ok(()) => Ok(issued),
        Err((code, message)) => Err(refuse(conn, send, resource, code, message).await),
    }
}

/// Whether a certificate of `resource` issued at `issued` is above the
/// resource's floor (not revoked, not superseded by a later machine or a
/// renewal); else the refusal to send.
async fn above_floor(
    ctx: &LinkContext,
    resource: &ResourceId,
    issued: UnixMillis,
) -> Result<(), (RefusalCode, String)> {
    match ctx.store.revoked_before(resource).await {
        Ok(Some(floor)) if issued < floor => Err((
            RefusalCode::Revoked,
            revoked_message(resource, issued, floor),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err((
            RefusalCode::StoreUnavailable,
            format!("read revocations: {e}"),
        )),
    }
}

fn revoked_message(resource: &ResourceId, issued: UnixMillis, floor: UnixMillis) -> String {
    format!(
        "this certificate of {resource} was issued at {}, before {}: the host was revoked or \
         its name enrolled anew; give the host a new certificate (ferryctl pki issue-agent)",
        crate::render::rfc3339_secs(issued),
        crate::render::rfc3339_secs(floor)
    )
}

/// Checks an agent's `Inventory` against the limits before it is kept.
fn check_inventory(inventory: &ferry_common::wire::Inventory) -> Result<(), String> {
    use ferry_common::limits::{MAX_ID_LEN, MAX_INVENTORY_COMPONENTS, MAX_TEXT_LEN};
    if inventory.components.len() > MAX_INVENTORY_COMPONENTS {
        return Err(format!(
            "inventory lists {} components, more than the {MAX_INVENTORY_COMPONENTS} allowed",
            inventory.components.len()
        ));
    }
    let names = inventory
        .components
        .iter()
        .map(|c| &c.name)
        .chain(inventory.last_update.as_ref().map(|u| &u.component));
    if names.clone().any(|n| n.is_empty() || n.len() > MAX_ID_LEN) {
        return Err(format!(
            "inventory component names must be 1 to {MAX_ID_LEN} bytes"
        ));
    }
    let texts = [&inventory.agent_version, &inventory.image_version]
        .into_iter()
        .chain(inventory.components.iter().map(|c| &c.version))
        .chain(inventory.last_update.as_ref().map(|u| &u.version));
    if texts.clone().any(|t| t.len() > MAX_TEXT_LEN) {
        return Err(format!(
            "inventory versions must be at most {MAX_TEXT_LEN} bytes"
        ));
    }
    Ok(())
}

/// The group `resource` belongs to, checked against the group its `Hello`
/// `named`: membership is the operator's decision (`ferryctl resources
/// assign`) or the provisioner's (a resource it created for a group), never
/// the agent's. A `Hello` naming no group joins the host's group; one
/// naming another group, or a group for a host in none, is refused with
/// what to do, and the named group records the attempt.
async fn member_group(
    ctx: &LinkContext,
    resource: &ResourceId,
    named: Option<&GroupName>,
) -> Result<Option<GroupName>, (RefusalCode, String)> {
    let membership = ctx.store.membership(resource).await.map_err(|e| {
        (
            RefusalCode::StoreUnavailable,
            format!("read the host's group: {e}"),
        )
    })?;
    let Some(named) = named else {
        return Ok(membership.map(|m| m.group));
    };
    let message = match membership {
        Some(m) if m.group == *named => return Ok(Some(m.group)),
        Some(Membership {
            group,
            source: MembershipSource::Provisioned,
        }) => format!(
            "resource {resource} was created for group {group}, its Hello names group {named}: \
             refused"
        ),
        Some(Membership { group, .. }) => format!(
            "resource {resource} belongs to group {group}, its Hello names group {named}: \
             refused (set `group = \"{group}\"` in its agent configuration, or move it with \
             `ferryctl resources assign {resource} {named}`)"
        ),
        None => format!(
            "resource {resource} is in no group, its Hello names group {named}: refused (an \
             operator puts it there with `ferryctl resources assign {resource} {named}`)"
        ),
    };
    if let Err(e) = ctx
        .store
        .refused_join(named, message.clone(), ctx.clock.now())
        .await
    {
        tracing::warn!(%resource, group = %named, "record the refused join: {e}");
    }
    Err((RefusalCode::NotMember, message))
}

fn registration(hello: Hello, group: Option<GroupName>, now: UnixMillis) -> Registration {
    Registration {
        resource: hello.resource,
        group,
        agent_version: hello.agent_version,
        image_version: hello.image_version,
        host: hello.host,
        spool_id: hello.spool_id,
        open_sessions: hello.sessions.into_iter().map(|s| s.session).collect(),
        now,
    }
}
