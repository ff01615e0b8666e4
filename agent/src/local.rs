//! The agent's local Unix socket: how the host reports sessions.
//!
//! The host's streaming server, the `ferry-agent session ...` verbs and PAM
//! mode all speak the same framed, typed requests ([`LocalRequest`], bincode
//! frames of at most [`MAX_LOCAL_FRAME_LEN`]). A session report is answered
//! only after the event is fsync'd in the spool, so a caller that sees
//! `Recorded` knows the event survives a crash of the agent or the host.
//! The socket is created with mode 0660: the owning group may report.
//!
//! What a member of that group can and cannot do:
//!
//! * A session start is accepted only for a session the broker admitted: a
//!   ticket for that session and user was verified on this host
//!   (`VerifyTicket`, [`crate::ticket`]), or the request carries the ticket,
//!   or it says it is trusted ([`StartProof::Trusted`]), which only root and
//!   the agent's own user may (checked with `SO_PEERCRED`): the operator's
//!   path and PAM mode. So a local process cannot report sessions for users
//!   the broker never admitted.
//! * A connection that sends nothing, stalls in the middle of a request or
//!   does not read its answer for [`DEFAULT_IDLE_TIMEOUT`] (`local_idle_timeout`)
//!   is closed, so idle clients cannot hold the [`MAX_LOCAL_CONNECTIONS`]
//!   slots; a new connection waits for a free slot.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_common::frame::{read_message, write_message, FrameError};
use ferry_common::limits::{MAX_LOCAL_CONNECTIONS, MAX_LOCAL_FRAME_LEN};
use ferry_common::ticket::TicketError;
use ferry_common::wire::{EndReason, SessionEvent};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis, UserId};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::now;
use crate::pam_logins::{
    parent_pid, process_start_time, Bound, Login, LoginKey, OpenError, MAX_SERVICE_LEN,
    SWEEP_INTERVAL,
};
use crate::spool::{SpoolError, SpoolHandle};
use crate::ticket::{TicketVerifier, VerifyError};
use crate::LinkStatus;

/// Mode of the socket file: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;

pub use crate::config::DEFAULT_IDLE_TIMEOUT;

/// Envelope of a request on the local socket; a `V2` can be added beside it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalRequest {
    V1(Request),
}

/// Envelope of a reply on the local socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalResponse {
    V1(Response),
}

/// What a local client asks. Append-only: never reorder variants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A session started on this host now.
    SessionStart { session: SessionId, user: UserId },
    /// A session on this host ended now.
    SessionEnd {
        session: SessionId,
        reason: EndReason,
    },
    /// The agent's current status.
    Status,
    /// Answer once the link is connected and the spool is empty, or fail
    /// after `timeout_ms`.
    WaitSynced { timeout_ms: u64 },
    /// Verify a session ticket a client presented (signature, expiry, this
    /// host) and mark it used; answered by `TicketValid` only once it is
    /// durably marked, or by an error naming the reason. The streaming
    /// server must then report the session with the ticket's session id.
    VerifyTicket { ticket: String },
    /// The user of an open session disconnected: the broker keeps the
    /// session (and its slot) for the group's `disconnect_retention`.
    /// Answered by `Noted`.
    SessionDisconnected { session: SessionId },
    /// The user is back on a retained session. Answered by `Noted`.
    SessionReconnected { session: SessionId },
    /// An open session has had no user input since `since` (default: now);
    /// the group's `idle_disconnect` counts from then
    /// ([`crate::enforce`]). Answered by `Noted`.
    SessionIdle {
        session: SessionId,
        since: Option<UnixMillis>,
    },
    /// An open session has user input again. Answered by `Noted`.
    SessionActive { session: SessionId },
    /// Answer with the status once the broker acknowledged `seq`, once the
    /// link is down (nothing will be acknowledged soon), or after
    /// `timeout_ms`, whichever comes first; the caller reads `acked_seq`.
    WaitAcked { seq: u64, timeout_ms: u64 },
    /// A session started on this host now, with what shows the broker
    /// admitted it. (`SessionStart` is this with
    /// [`StartProof::VerifiedTicket`].)
    SessionStartWith {
        session: SessionId,
        user: UserId,
        proof: StartProof,
    },
    /// A PAM login's password, a ticket that must be for `user` (refused
    /// without being used up otherwise): verified and marked used, and the
    /// login may then open the ticket's session ([`crate::pam_logins`]).
    /// Answered by `TicketValid`. Root and the agent's user only.
    PamAuth {
        service: String,
        user: UserId,
        ticket: String,
    },
    /// The PAM login opened its PAM session: bound to the session its
    /// ticket named, which starts (or, open already, is attached to). The
    /// login is the process holding the PAM handle: the peer's parent (the
    /// peer is `ferry-agent pam`, run by `pam_exec`). Answered by
    /// `PamSession`; `NotVerified` when the login did not authenticate with
    /// a ticket. Root and the agent's user only.
    PamOpen { service: String, user: UserId },
    /// The PAM login (the peer's parent) closed its PAM session; the
    /// session ends with its last login. Answered by `PamSession`;
    /// `UnknownSession` when the login is not bound. Root and the agent's
    /// user only.
    PamClose { service: String, user: UserId },
}

/// Why the agent should believe a session start. Append-only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartProof {
    /// A ticket for this session and user was verified on this host
    /// (`ferry-agent ticket verify`) and has not expired (plus a grace).
    VerifiedTicket,
    /// The user's ticket, verified now (and marked used); it must name this
    /// session and user.
    Ticket(String),
    /// The caller vouches for the session: the operator or PAM mode. Only
    /// root and the agent's own user may (`SO_PEERCRED`).
    Trusted,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The event is durably spooled under this sequence number.
    Recorded { seq: u64 },
    /// Status (for `Status` and a successful `WaitSynced`).
    Status(StatusReply),
    /// The request was refused; nothing was recorded.
    Error { code: ErrorCode, message: String },
    /// The ticket is valid and now used (answers `VerifyTicket`).
    TicketValid(TicketInfo),
    /// A presence report is queued for the broker (not spooled: see
    /// [`crate::presence`]).
    Noted,
    /// A PAM login's session (answers `PamOpen` and `PamClose`).
    PamSession(PamSessionReply),
}

/// The session a PAM login is bound to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PamSessionReply {
    pub session: SessionId,
    pub user: UserId,
    /// Other PAM logins on the same session: after an open, more than 0
    /// means the login attached to a session already open; after a close,
    /// 0 means the session ended with it.
    pub others: u32,
}

/// What a valid ticket grants: the streaming server admits `user` and
/// reports the session as `session` (`ferry-agent session start`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketInfo {
    /// The ticket's id, in hex.
    pub ticket_id: String,
    pub group: GroupName,
    pub user: UserId,
    /// The session id the broker reserved the slot under.
    pub session: SessionId,
    pub expires_at: UnixMillis,
}

/// Status as the local socket reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    /// The host's resource id.
    pub resource: String,
    /// Link and spool counters.
    pub link: LinkStatus,
}

/// Why a local request was refused, for callers that branch on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// `SessionStart` for a session that is already open.
    DuplicateSession,
    /// `SessionEnd` for a session that is not open.
    UnknownSession,
    /// The spool holds as many unacknowledged events as it may.
    SpoolFull,
    /// As many sessions are open as the agent can report.
    TooManySessions,
    /// The request is well-formed but not acceptable.
    InvalidRequest,
    /// The spool could not write; nothing was recorded.
    Storage,
    /// `WaitSynced` ran out of time.
    Timeout,
    /// The request could not be decoded.
    Malformed,
    /// The agent is shutting down.
    ShuttingDown,
    /// The ticket cannot be read (truncated, not a ticket, bad encoding).
    TicketMalformed,
    /// The ticket's signature is not the broker's: forged or altered.
    TicketForged,
    /// The ticket has expired.
    TicketExpired,
    /// The ticket is for another host.
    TicketOtherHost,
    /// The ticket was already used.
    TicketReused,
    /// The agent has no ticket key yet (it never reached the broker).
    NoTicketKey,
    /// `SessionStart` for a session id that already ended on this host.
    EndedSession,
    /// `SessionStart` without a ticket verified on this host for that
    /// session and user.
    NotVerified,
    /// `SessionStart` said trusted from a peer that is neither root nor the
    /// agent's user.
    NotTrusted,
    /// The ticket is for another user than the one who presented it.
    TicketOtherUser,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("bind {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another agent is already listening on {0}")]
    InUse(PathBuf),
    #[error("cannot reach the agent at {path} (is ferry-agent running?): {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("local socket: {0}")]
    Frame(#[from] FrameError),
    #[error("the agent closed the connection without answering")]
    Closed,
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    #[error("unexpected answer from the agent: {0:?}")]
    Unexpected(Box<Response>),
}

/// What request handlers need.
#[derive(Clone)]
pub struct ServerState {
    /// Where events are recorded.
    pub spool: SpoolHandle,
    /// The agent's status, for `Status` and `WaitSynced`.
    pub status: watch::Receiver<LinkStatus>,
    /// The host, named in status replies.
    pub resource: ResourceId,
    /// Session tickets: the broker's key and the used set.
    pub tickets: TicketVerifier,
    /// Users' presence on sessions, for the link to send.
    pub presence: crate::presence::PresenceBoard,
    /// The session-limit enforcer: idle reports, and the reason of an end
    /// it is carrying out.
    pub enforcer: crate::enforce::EnforcerHandle,
    /// How long a connection may be silent, stall in a request or leave its
    /// answer unread ([`DEFAULT_IDLE_TIMEOUT`] unless configured).
    pub idle_timeout: Duration,
    /// Where tickets verified and refused are counted.
    pub metrics: crate::metrics::AgentMetrics,
    /// PAM logins made with tickets and the sessions they are bound to.
    pub pam: crate::pam_logins::PamLogins,
}

/// Who is on the other end of a local connection (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The peer's uid, `None` when the kernel did not say.
    pub uid: Option<u32>,
    /// The agent's own uid.
    pub agent_uid: u32,
    /// The peer's pid, as the kernel says (`None` when it did not).
    pub pid: Option<u32>,
}

impl Peer {
    fn of(stream: &UnixStream) -> Peer {
        Peer {
            uid: stream.peer_cred().ok().map(|c| c.uid()),
            agent_uid: rustix::process::getuid().as_raw(),
            pid: stream
                .peer_cred()
                .ok()
                .and_then(|c| c.pid())
                .and_then(|p| u32::try_from(p).ok()),
        }
    }

    /// Root and the agent's own user may say a session start is trusted.
    pub fn may_vouch(&self) -> bool {
        self.uid.is_some_and(|u| u == 0 || u == self.agent_uid)
    }
}

/// A bound local socket, not yet serving.
pub struct LocalServer {
    /// The listening socket.
    listener: UnixListener,
    /// Its path, removed again on shutdown.
    path: PathBuf,
}

impl LocalServer {
    /// Binds `path` with mode 0660, replacing a stale socket file left by a
    /// crashed agent but refusing to take over from a live one.
    pub fn bind(path: &Path) -> Result<Self, LocalError> {
        let bind_err = |source| LocalError::Bind {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(LocalError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(bind_err)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections until `shutdown`, each in a task of `tracker`.
    pub async fn serve(
        self,
        state: ServerState,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let slots = Arc::new(Semaphore::new(MAX_LOCAL_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept on local socket");
                        continue;
                    }
                },
            };
            let state = state.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                if let Err(e) = serve_connection(stream, state, shutdown).await {
                    tracing::debug!(error = %e, "local connection ended");
                }
                drop(permit);
            });
        }
    }
}

/// The connection was silent, stalled or did not read for the idle timeout.
fn idle(timeout: Duration) -> FrameError {
    FrameError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "idle for {}: closed",
            ferry_common::duration::format_duration(timeout)
        ),
    ))
}

async fn serve_connection(
    mut stream: UnixStream,
    state: ServerState,
    shutdown: CancellationToken,
) -> Result<(), FrameError> {
    let peer = Peer::of(&stream);
    let limit = state.idle_timeout;
    loop {
        // Cancelling a half-read request is fine: the connection is dropped.
        let read = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = tokio::time::timeout(limit, read_message::<LocalRequest, _>(&mut stream, MAX_LOCAL_FRAME_LEN)) => {
                r.map_err(|_| idle(limit))?
            }
        };
        let response = match read {
            Ok(None) => return Ok(()),
            Ok(Some(LocalRequest::V1(req))) => handle(req, &state, peer, &shutdown).await,
            Err(
                e @ (FrameError::Decode(_)
                | FrameError::TrailingBytes(_)
                | FrameError::TooLarge { .. }),
            ) => {
                let reply = Response::Error {
                    code: ErrorCode::Malformed,
                    message: format!("malformed request: {e}"),
                };
                write_message(&mut stream, &LocalResponse::V1(reply), MAX_LOCAL_FRAME_LEN).await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        tokio::time::timeout(
            limit,
            write_message(
                &mut stream,
                &LocalResponse::V1(response),
                MAX_LOCAL_FRAME_LEN,
            ),
        )
        .await
        .map_err(|_| idle(limit))??;
    }
}

/// Answers one request: a map from each request to the function doing it.
async fn handle(
    req: Request,
    state: &ServerState,
    peer: Peer,
    shutdown: &CancellationToken,
) -> Response {
    match req {
        Request::SessionStart { session, user } => {
            session_start(state, peer, session, user, StartProof::VerifiedTicket).await
        }
        Request::SessionStartWith {
            session,
            user,
            proof,
        } => session_start(state, peer, session, user, proof).await,
        Request::SessionEnd { session, reason } => session_end(state, session, reason).await,
        Request::SessionDisconnected { session } => {
            presence(state, session, ferry_common::wire::Presence::Disconnected)
        }
        Request::SessionReconnected { session } => {
            presence(state, session, ferry_common::wire::Presence::Reconnected)
        }
        Request::SessionIdle { session, since } => {
            let now = now();
            let since = since.unwrap_or(now);
            if since > now {
                return Response::Error {
                    code: ErrorCode::InvalidRequest,
                    message: format!("idle since {} is in the future (now {})", since.0, now.0),
                };
            }
            idleness(state, session, Some(since)).await
        }
        Request::SessionActive { session } => idleness(state, session, None).await,
        Request::Status => Response::Status(status_reply(state)),
        Request::VerifyTicket { ticket } => verify_ticket(state, ticket).await,
        Request::WaitAcked { seq, timeout_ms } => {
            wait_acked(state, seq, wait_limit(timeout_ms), shutdown).await
        }
        Request::WaitSynced { timeout_ms } => {
            wait_synced(state, wait_limit(timeout_ms), shutdown).await
        }
        Request::PamAuth {
            service,
            user,
            ticket,
        } => pam_auth(state, peer, service, user, ticket).await,
        Request::PamOpen { service, user } => pam_open(state, peer, service, user).await,
        Request::PamClose { service, user } => pam_close(state, peer, service, user).await,
    }
}

/// What a refused session start should do instead.
fn start_hint(session: &SessionId) -> String {
    format!(
        "verify the user's ticket with `ferry-agent ticket verify` first (then start session \
         {session} with the session id and user it prints), pass it with `--ticket`, or, as root \
         or the agent's user, say the session is trusted with `--trusted`"
    )
}

/// Whether `proof` shows the broker admitted `session` of `user`: `None`
/// when it does, the refusal otherwise.
async fn check_start(
    state: &ServerState,
    peer: Peer,
    session: &SessionId,
    user: &UserId,
    proof: StartProof,
) -> Option<Response> {
    match proof {
        StartProof::Trusted if peer.may_vouch() => None,
        StartProof::Trusted => {
            Some(Response::Error {
                code: ErrorCode::NotTrusted,
                message: format!(
                "{} may not start a session as trusted: only root and the agent's user (uid {}) \
                 may; verify the user's ticket with `ferry-agent ticket verify` first, or pass \
                 it with `--ticket`",
                peer.uid
                    .map_or_else(|| "a peer of unknown uid".to_owned(), |u| format!("uid {u}")),
                peer.agent_uid
            ),
            })
        }
        StartProof::VerifiedTicket => match state.tickets.start_grant(session, user, now()) {
            Ok(()) => None,
            Err(e) => Some(Response::Error {
                code: ErrorCode::NotVerified,
                message: format!("{e}: {}", start_hint(session)),
            }),
        },
        StartProof::Ticket(ticket) => {
            match state
                .tickets
                .verify_for_start(ticket, now(), session.clone(), user.clone())
                .await
            {
                Ok(_) => {
                    state.metrics.ticket(Ok(()));
                    None
                }
                Err(e) => {
                    state.metrics.ticket(Err(e.code()));
                    Some(ticket_refusal(e))
                }
            }
        }
    }
}

/// A session started: spooled, if `proof` shows the broker admitted it.
async fn session_start(
    state: &ServerState,
    peer: Peer,
    session: SessionId,
    user: UserId,
    proof: StartProof,
) -> Response {
    if let Some(refused) = check_start(state, peer, &session, &user, proof).await {
        tracing::warn!(%session, %user, uid = ?peer.uid, "session start refused");
        return refused;
    }
    let event = SessionEvent::Started {
        session: session.clone(),
        user: user.clone(),
        at: now(),
    };
    let r = state.spool.append(event).await;
    if r.is_ok() {
        tracing::info!(%session, %user, "session started");
    }
    recorded(r)
}

/// A session ended: spooled, its presence forgotten.
pub(crate) async fn session_end(
    state: &ServerState,
    session: SessionId,
    reason: EndReason,
) -> Response {
    if let EndReason::Other(text) = &reason {
        if text.len() > ferry_common::limits::MAX_TEXT_LEN {
            return Response::Error {
                code: ErrorCode::InvalidRequest,
                message: format!(
                    "reason is {} bytes; the limit is {}",
                    text.len(),
                    ferry_common::limits::MAX_TEXT_LEN
                ),
            };
        }
    }
    // The end the enforcer's disconnect hook caused is recorded
    // with the enforcer's reason (see `crate::enforce`).
    let reason = state.enforcer.ending_reason(&session).unwrap_or(reason);
    let event = SessionEvent::Ended {
        session: session.clone(),
        at: now(),
        reason,
    };
    let r = state.spool.append(event).await;
    if r.is_ok() {
        state.presence.forget(&session);
        tracing::info!(%session, "session ended");
    }
    recorded(r)
}

/// Longest a local client may ask the agent to wait for the broker in one
/// request: a client cannot hold a slot longer by asking for more.
pub const MAX_LOCAL_WAIT: Duration = Duration::from_secs(60);

/// A client's wait, at most [`MAX_LOCAL_WAIT`].
fn wait_limit(timeout_ms: u64) -> Duration {
    Duration::from_millis(timeout_ms).min(MAX_LOCAL_WAIT)
}

/// The status once the broker acknowledged `seq` or the link is down, or
/// after `timeout` (answered with the status either way).
async fn wait_acked(
    state: &ServerState,
    seq: u64,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> Response {
    let mut rx = state.status.clone();
    let wait = rx.wait_for(|s| s.acked_seq >= seq || !s.connected);
    tokio::select! {
        _ = shutdown.cancelled() => {}
        // Answered with the status either way.
        _ = tokio::time::timeout(timeout, wait) => {}
    }
    Response::Status(status_reply(state))
}

/// The status once connected with nothing spooled; an error after `timeout`
/// or on shutdown.
async fn wait_synced(
    state: &ServerState,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> Response {
    let shutting_down = || Response::Error {
        code: ErrorCode::ShuttingDown,
        message: "the agent is shutting down".into(),
    };
    let mut rx = state.status.clone();
    let wait = rx.wait_for(|s| s.connected && s.spooled == 0);
    tokio::select! {
        _ = shutdown.cancelled() => shutting_down(),
        r = tokio::time::timeout(timeout, wait) => match r {
            Ok(Ok(_)) => Response::Status(status_reply(state)),
            Ok(Err(_)) => shutting_down(),
            Err(_) => {
                let s = state.status.borrow().clone();
                Response::Error {
                    code: ErrorCode::Timeout,
                    message: format!(
                        "not synced after {}: connected={}, {} events spooled{}",
                        ferry_common::duration::format_duration(timeout),
                        s.connected,
                        s.spooled,
                        s.last_error.map(|e| format!(", last error: {e}")).unwrap_or_default()
                    ),
                }
            }
        },
    }
}

/// Hands an idle (`Some(since)`) or active report for an open session to
/// the enforcer.
async fn idleness(state: &ServerState, session: SessionId, since: Option<UnixMillis>) -> Response {
    if !is_open(state, &session) {
        return Response::Error {
            code: ErrorCode::UnknownSession,
            message: format!("session {session} is not open on this host"),
        };
    }
    let sent = match since {
        Some(since) => state.enforcer.idle(session.clone(), since).await,
        None => state.enforcer.active(session.clone()).await,
    };
    match sent {
        Ok(()) => {
            tracing::debug!(%session, idle_since = ?since.map(|s| s.0), "session idleness");
            Response::Noted
        }
        Err(e) => Response::Error {
            code: ErrorCode::ShuttingDown,
            message: e.to_string(),
        },
    }
}

fn is_open(state: &ServerState, session: &SessionId) -> bool {
    state
        .spool
        .lock()
        .open_sessions()
        .iter()
        .any(|s| &s.session == session)
}

/// Queues a presence report for an open session.
fn presence(
    state: &ServerState,
    session: SessionId,
    what: ferry_common::wire::Presence,
) -> Response {
    let open = state
        .spool
        .lock()
        .open_sessions()
        .iter()
        .any(|s| s.session == session);
    if !open {
        return Response::Error {
            code: ErrorCode::UnknownSession,
            message: format!("session {session} is not open on this host"),
        };
    }
    let report = ferry_common::wire::PresenceReport {
        session: session.clone(),
        state: what,
        at: now(),
    };
    match state.presence.report(report) {
        Ok(()) => {
            tracing::info!(%session, ?what, "session presence");
            Response::Noted
        }
        Err(e) => Response::Error {
            code: ErrorCode::InvalidRequest,
            message: e.to_string(),
        },
    }
}

async fn verify_ticket(state: &ServerState, ticket: String) -> Response {
    let verified = state.tickets.verify(ticket, now()).await;
    state
        .metrics
        .ticket(verified.as_ref().map(|_| ()).map_err(|e| e.code()));
    match verified {
        Ok(c) => Response::TicketValid(TicketInfo {
            ticket_id: c.ticket_id_hex(),
            group: c.group,
            user: c.user,
            session: c.session,
            expires_at: c.expires_at,
        }),
        Err(e) => ticket_refusal(e),
    }
}

pub(crate) fn ticket_refusal(e: VerifyError) -> Response {
    let code = match &e {
        VerifyError::Ticket(TicketError::Malformed(_)) => ErrorCode::TicketMalformed,
        VerifyError::Ticket(TicketError::BadSignature) => ErrorCode::TicketForged,
        VerifyError::Ticket(TicketError::Expired { .. }) => ErrorCode::TicketExpired,
        VerifyError::Ticket(TicketError::OtherResource { .. }) => ErrorCode::TicketOtherHost,
        VerifyError::Reused { .. } => ErrorCode::TicketReused,
        VerifyError::NoKey => ErrorCode::NoTicketKey,
        VerifyError::Full | VerifyError::Storage(_) => ErrorCode::Storage,
        VerifyError::Mismatch { .. } => ErrorCode::InvalidRequest,
        VerifyError::OtherUser { .. } => ErrorCode::TicketOtherUser,
    };
    tracing::warn!(reason = e.code(), error = %e, "ticket refused");
    Response::Error {
        code,
        message: e.to_string(),
    }
}

fn status_reply(state: &ServerState) -> StatusReply {
    StatusReply {
        resource: state.resource.to_string(),
        link: state.status.borrow().clone(),
    }
}

pub(crate) fn recorded(r: Result<u64, SpoolError>) -> Response {
    match r {
        Ok(seq) => Response::Recorded { seq },
        Err(e) => {
            let code = match &e {
                SpoolError::DuplicateSession(_) => ErrorCode::DuplicateSession,
                SpoolError::EndedSession(_) => ErrorCode::EndedSession,
                SpoolError::UnknownSession(_) => ErrorCode::UnknownSession,
                SpoolError::Full { .. } => ErrorCode::SpoolFull,
                SpoolError::TooManyOpenSessions(_) => ErrorCode::TooManySessions,
                SpoolError::InvalidEvent(_) => ErrorCode::InvalidRequest,
                _ => {
                    tracing::error!(error = %e, "spool write failed; the report is refused");
                    let advice = e
                        .disk_advice()
                        .map(|a| format!(" ({a})"))
                        .unwrap_or_default();
                    return Response::Error {
                        code: ErrorCode::Storage,
                        message: format!("not recorded: {e}{advice}"),
                    };
                }
            };
            Response::Error {
                code,
                message: e.to_string(),
            }
        }
    }
}

// ---- PAM logins (`crate::pam_logins`) -------------------------------------

/// Refused unless the peer is root or the agent's user: PAM's session phase
/// runs as root, and a binding starts sessions.
fn pam_check_trusted(peer: Peer, what: &str) -> Option<Response> {
    if peer.may_vouch() {
        return None;
    }
    Some(Response::Error {
        code: ErrorCode::NotTrusted,
        message: format!(
            "{} may not {what}: only root (pam_exec) and the agent's user (uid {}) may",
            peer.uid.map_or_else(
                || "a peer of unknown uid".to_owned(),
                |u| format!("uid {u}")
            ),
            peer.agent_uid
        ),
    })
}

fn pam_check_service(service: &str) -> Option<Response> {
    let ok = !service.is_empty()
        && service.len() <= MAX_SERVICE_LEN
        && service
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != '\\');
    (!ok).then(|| Response::Error {
        code: ErrorCode::InvalidRequest,
        message: format!(
            "PAM service {:?} is not a PAM service name (1 to {MAX_SERVICE_LEN} printable \
             characters, no slash)",
            service.chars().take(MAX_SERVICE_LEN).collect::<String>()
        ),
    })
}

/// The process holding the PAM handle: the parent of the peer
/// (`ferry-agent pam`, which `pam_exec` runs), as the kernel says.
fn pam_login_process(peer: Peer) -> Result<u32, Response> {
    peer.pid
        .and_then(parent_pid)
        .filter(|p| *p > 1)
        .ok_or_else(|| Response::Error {
            code: ErrorCode::InvalidRequest,
            message: format!(
                "cannot tell which process holds the PAM login (peer pid {:?}): run `ferry-agent \
                 pam` from pam_exec",
                peer.pid
            ),
        })
}

/// Checks common to the three requests: the login's process, or the refusal.
fn pam_peer(peer: Peer, what: &str, service: &str) -> Result<u32, Response> {
    if let Some(r) = pam_check_trusted(peer, what).or_else(|| pam_check_service(service)) {
        return Err(r);
    }
    pam_login_process(peer)
}

/// `PamAuth`: the login's password is a ticket for this host and `user`.
async fn pam_auth(
    state: &ServerState,
    peer: Peer,
    service: String,
    user: UserId,
    ticket: String,
) -> Response {
    match pam_peer(peer, "authenticate PAM logins", &service) {
        Ok(pid) => pam_auth_as(state, service, user, ticket, pid).await,
        Err(r) => r,
    }
}

/// [`auth`] by process `pid`.
pub(crate) async fn pam_auth_as(
    state: &ServerState,
    service: String,
    user: UserId,
    ticket: String,
    pid: u32,
) -> Response {
    let verified = state
        .tickets
        .verify_for_user(ticket, now(), user.clone())
        .await;
    state
        .metrics
        .ticket(verified.as_ref().map(|_| ()).map_err(|e| e.code()));
    match verified {
        Ok(c) => {
            let parent = parent_pid(pid);
            state
                .pam
                .add_pending(&service, &user, &c.session, c.expires_at.0, (pid, parent));
            tracing::info!(%service, %user, session = %c.session, pid, "PAM login authenticated with a ticket");
            Response::TicketValid(TicketInfo {
                ticket_id: c.ticket_id_hex(),
                group: c.group,
                user: c.user,
                session: c.session,
                expires_at: c.expires_at,
            })
        }
        Err(e) => {
            tracing::warn!(%service, %user, reason = e.code(), error = %e, "PAM login refused");
            ticket_refusal(e)
        }
    }
}

/// `PamOpen`: binds the peer's PAM login to its ticket's session and
/// reports the session started (or attaches to it).
async fn pam_open(state: &ServerState, peer: Peer, service: String, user: UserId) -> Response {
    match pam_peer(peer, "open PAM sessions", &service) {
        Ok(pid) => pam_open_as(state, service, user, pid).await,
        Err(r) => r,
    }
}

/// [`open`] of the login held by process `pid`.
pub(crate) async fn pam_open_as(
    state: &ServerState,
    service: String,
    user: UserId,
    pid: u32,
) -> Response {
    let Some(start_time) = process_start_time(pid) else {
        return Response::Error {
            code: ErrorCode::InvalidRequest,
            message: format!("process {pid} does not exist: no PAM login to bind"),
        };
    };
    let key = LoginKey { service, user, pid };
    let _serial = state.pam.serial().lock().await;
    // A binding of an earlier process under this pid (its close was missed
    // and the sweep has not run yet): its session's end comes first.
    if let Some((old, others)) = state.pam.find(&key, None) {
        if old.start_time != start_time {
            let reason = pam_exited_reason(&old);
            if let Response::Error { .. } = pam_end_login(state, &old, others, reason).await {
                return Response::Error {
                    code: ErrorCode::Storage,
                    message: format!(
                        "process {pid}'s earlier login (session {}) could not be closed first",
                        old.session
                    ),
                };
            }
        }
    }
    let at = now();
    let bound = state
        .pam
        .open(key.clone(), start_time, parent_pid(pid), at)
        .await;
    let (session, others) = match bound {
        Ok(Bound::Again { session, others }) => return pam_reply(session, key.user, others),
        Ok(Bound::New { session, others }) => (session, others),
        Err(e) => {
            let code = match e {
                OpenError::NoTicket { .. } => ErrorCode::NotVerified,
                OpenError::Full => ErrorCode::TooManySessions,
                OpenError::Storage(_) => ErrorCode::Storage,
            };
            tracing::warn!(service = %key.service, user = %key.user, pid, error = %e, "PAM session not opened");
            return Response::Error {
                code,
                message: e.to_string(),
            };
        }
    };
    let login = Login {
        key: key.clone(),
        start_time,
        session: session.clone(),
        opened_at: at,
    };
    if others == 0 {
        let started = state
            .spool
            .append(SessionEvent::Started {
                session: session.clone(),
                user: key.user.clone(),
                at,
            })
            .await;
        match started {
            Ok(seq) => {
                tracing::info!(%session, user = %key.user, service = %key.service, pid, seq,
                    "PAM session started under its ticket's session id");
            }
            // Open already (reported another way, or a binding lost):
            // this login attaches to it.
            Err(crate::spool::SpoolError::DuplicateSession(_)) => {
                tracing::info!(%session, user = %key.user, "PAM login attached to an open session");
            }
            Err(e) => {
                let refused = recorded(Err(e));
                if let Err(e) = state.pam.remove(&login).await {
                    tracing::error!(error = %e, "forget the PAM login of a session not started");
                }
                return refused;
            }
        }
    } else {
        tracing::info!(%session, user = %key.user, service = %key.service, pid, others,
            "PAM login attached to its shared session");
    }
    pam_reply(session, key.user, others)
}

fn pam_reply(session: SessionId, user: UserId, others: usize) -> Response {
    Response::PamSession(PamSessionReply {
        session,
        user,
        others: u32::try_from(others).unwrap_or(u32::MAX),
    })
}

/// `PamClose`: the peer's PAM login closed its PAM session; the session
/// ends with its last login.
async fn pam_close(state: &ServerState, peer: Peer, service: String, user: UserId) -> Response {
    match pam_peer(peer, "close PAM sessions", &service) {
        Ok(pid) => pam_close_as(state, service, user, pid).await,
        Err(r) => r,
    }
}

/// [`close`] of the login held by process `pid`.
pub(crate) async fn pam_close_as(
    state: &ServerState,
    service: String,
    user: UserId,
    pid: u32,
) -> Response {
    let key = LoginKey { service, user, pid };
    let _serial = state.pam.serial().lock().await;
    let Some((login, others)) = state.pam.find(&key, process_start_time(pid)) else {
        return Response::Error {
            code: ErrorCode::UnknownSession,
            message: format!(
                "no PAM login of {} through {} in process {pid} is bound to a session",
                key.user, key.service
            ),
        };
    };
    pam_end_login(state, &login, others, EndReason::Logout).await
}

fn pam_exited_reason(login: &Login) -> EndReason {
    EndReason::Other(format!(
        "the {} login process exited without closing its PAM session",
        login.key.service
    ))
}

/// Ends `login`'s session when it is the last login on it, then forgets
/// the login. The caller holds `serial`.
async fn pam_end_login(
    state: &ServerState,
    login: &Login,
    others: usize,
    reason: EndReason,
) -> Response {
    if others == 0 {
        match session_end(state, login.session.clone(), reason).await {
            Response::Recorded { .. } => {}
            Response::Error {
                code: ErrorCode::UnknownSession | ErrorCode::EndedSession,
                ..
            } => {
                tracing::info!(session = %login.session, "the PAM login's session had already ended");
            }
            refused => return refused,
        }
    }
    if let Err(e) = state.pam.remove(login).await {
        tracing::error!(error = %e, "forget a closed PAM login");
        return Response::Error {
            code: ErrorCode::Storage,
            message: e.to_string(),
        };
    }
    pam_reply(login.session.clone(), login.key.user.clone(), others)
}

/// Every [`SWEEP_INTERVAL`] until `shutdown` (the first at once, for the
/// logins loaded at start): closes the logins whose process is gone or
/// whose pid now names another process, and the first time those bound
/// before the host last booted.
pub async fn pam_sweep(state: ServerState, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut gone = state.pam.take_previous_boot();
        let logins = state.pam.logins();
        if logins.is_empty() {
            continue;
        }
        if let Ok(exited) = tokio::task::spawn_blocking(move || {
            logins
                .into_iter()
                .filter(|l| process_start_time(l.key.pid) != Some(l.start_time))
                .collect::<Vec<_>>()
        })
        .await
        {
            gone.extend(exited);
        }
        for login in gone {
            let _serial = state.pam.serial().lock().await;
            // Closed meanwhile (its PAM close came first): nothing to do.
            let Some((current, others)) = state.pam.find(&login.key, Some(login.start_time)) else {
                continue;
            };
            tracing::info!(session = %current.session, user = %current.key.user,
                service = %current.key.service, pid = current.key.pid,
                "the PAM login's process is gone without closing its PAM session: closing it");
            let reason = pam_exited_reason(&current);
            if let Response::Error { message, .. } =
                pam_end_login(&state, &current, others, reason).await
            {
                tracing::error!(session = %current.session,
                    "close the PAM login of an exited process: {message}");
            }
        }
    }
}

/// A client of the local socket (the CLI verbs and PAM mode).
pub struct LocalClient {
    /// Connection to the agent.
    stream: UnixStream,
}

impl LocalClient {
    pub async fn connect(path: &Path) -> Result<Self, LocalError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| LocalError::Connect {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self { stream })
    }

    /// Sends one request and reads its answer. A refusal is returned as
    /// `Ok(Response::Error { .. })`; see [`Response::into_result`].
    pub async fn call(&mut self, req: Request) -> Result<Response, LocalError> {
        write_message(
            &mut self.stream,
            &LocalRequest::V1(req),
            MAX_LOCAL_FRAME_LEN,
        )
        .await?;
        match read_message::<LocalResponse, _>(&mut self.stream, MAX_LOCAL_FRAME_LEN).await? {
            Some(LocalResponse::V1(r)) => Ok(r),
            None => Err(LocalError::Closed),
        }
    }

    /// Reports a session start with what shows the broker admitted it;
    /// returns its sequence number once durable.
    pub async fn session_start(
        &mut self,
        session: SessionId,
        user: UserId,
        proof: StartProof,
    ) -> Result<u64, LocalError> {
        self.call(Request::SessionStartWith {
            session,
            user,
            proof,
        })
        .await?
        .into_result()?
        .seq()
    }

    /// Reports a session end; returns its sequence number once durable.
    pub async fn session_end(
        &mut self,
        session: SessionId,
        reason: EndReason,
    ) -> Result<u64, LocalError> {
        self.call(Request::SessionEnd { session, reason })
            .await?
            .into_result()?
            .seq()
    }

    pub async fn status(&mut self) -> Result<StatusReply, LocalError> {
        self.call(Request::Status).await?.into_result()?.status()
    }

    /// Reports that a session is idle since `since` (`None`: now), or
    /// active again (`active`).
    pub async fn session_idleness(
        &mut self,
        session: SessionId,
        idle_since: Option<Option<UnixMillis>>,
    ) -> Result<(), LocalError> {
        let req = match idle_since {
            Some(since) => Request::SessionIdle { session, since },
            None => Request::SessionActive { session },
        };
        match self.call(req).await?.into_result()? {
            Response::Noted => Ok(()),
            other => Err(LocalError::Unexpected(Box::new(other))),
        }
    }

    /// Verifies a session ticket and marks it used; a refusal is
    /// `LocalError::Refused` with a `Ticket*` code.
    /// Reports that a session's user disconnected (`true`) or came back.
    pub async fn session_presence(
        &mut self,
        session: SessionId,
        disconnected: bool,
    ) -> Result<(), LocalError> {
        let req = if disconnected {
            Request::SessionDisconnected { session }
        } else {
            Request::SessionReconnected { session }
        };
        match self.call(req).await?.into_result()? {
            Response::Noted => Ok(()),
            other => Err(LocalError::Unexpected(Box::new(other))),
        }
    }

    /// A PAM login's password, a ticket for `user`: verified and used.
    pub async fn pam_auth(
        &mut self,
        service: String,
        user: UserId,
        ticket: String,
    ) -> Result<TicketInfo, LocalError> {
        self.call(Request::PamAuth {
            service,
            user,
            ticket,
        })
        .await?
        .into_result()?
        .ticket()
    }

    /// This process's parent's PAM login opened (`open`) or closed its PAM
    /// session.
    pub async fn pam_session(
        &mut self,
        open: bool,
        service: String,
        user: UserId,
    ) -> Result<PamSessionReply, LocalError> {
        let req = if open {
            Request::PamOpen { service, user }
        } else {
            Request::PamClose { service, user }
        };
        match self.call(req).await?.into_result()? {
            Response::PamSession(r) => Ok(r),
            other => Err(LocalError::Unexpected(Box::new(other))),
        }
    }

    pub async fn verify_ticket(&mut self, ticket: String) -> Result<TicketInfo, LocalError> {
        self.call(Request::VerifyTicket { ticket })
            .await?
            .into_result()?
            .ticket()
    }

    /// Whether the broker acknowledged `seq`, waiting at most `timeout`
    /// (not at all while the link is down).
    pub async fn wait_acked(&mut self, seq: u64, timeout: Duration) -> Result<bool, LocalError> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let status = self
            .call(Request::WaitAcked { seq, timeout_ms })
            .await?
            .into_result()?
            .status()?;
        Ok(status.link.acked_seq >= seq)
    }

    /// Waits until connected and nothing is spooled, at most `timeout`
    /// (asked in requests of at most [`MAX_LOCAL_WAIT`] each).
    pub async fn wait_synced(&mut self, timeout: Duration) -> Result<StatusReply, LocalError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let wait = left.min(MAX_LOCAL_WAIT);
            let timeout_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
            match self
                .call(Request::WaitSynced { timeout_ms })
                .await?
                .into_result()
            {
                Err(LocalError::Refused {
                    code: ErrorCode::Timeout,
                    ..
                }) if left > wait => continue,
                answer => return answer?.status(),
            }
        }
    }
}

impl Response {
    /// Turns a refusal into an error.
    pub fn into_result(self) -> Result<Response, LocalError> {
        match self {
            Response::Error { code, message } => Err(LocalError::Refused { code, message }),
            other => Ok(other),
        }
    }

    fn ticket(self) -> Result<TicketInfo, LocalError> {
        match self {
            Response::TicketValid(t) => Ok(t),
            other => Err(LocalError::Unexpected(Box::new(other))),
        }
    }

    fn seq(self) -> Result<u64, LocalError> {
        match self {
            Response::Recorded { seq } => Ok(seq),
            other => Err(LocalError::Unexpected(Box::new(other))),
        }
    }

    fn status(self) -> Result<StatusReply, LocalError> {
        match self {
            Response::Status(s) => Ok(s),
            other => Err(LocalError::Unexpected(Box::new(other))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Spool, SpoolOptions};
    use tokio::io::AsyncWriteExt;

    struct Harness {
        tickets: TicketVerifier,
        /// What the server's handlers get (for calling them directly).
        state: ServerState,
        _dir: tempfile::TempDir,
        path: PathBuf,
        enforcer: crate::enforce::EnforcerHandle,
        reports: crate::enforce::EnforcerInputs,
        spool: SpoolHandle,
        status: Arc<watch::Sender<LinkStatus>>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    }

    fn start(opts: SpoolOptions) -> Harness {
        start_with(opts, DEFAULT_IDLE_TIMEOUT)
    }

    #[test]
    fn a_client_cannot_ask_for_a_longer_wait_than_the_limit() {
        assert_eq!(wait_limit(u64::MAX), MAX_LOCAL_WAIT);
        assert_eq!(wait_limit(2_000), Duration::from_secs(2));
    }

    fn start_with(opts: SpoolOptions, idle_timeout: Duration) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("state"), opts).unwrap();
        let (tx, rx) = watch::channel(LinkStatus::default());
        let status = Arc::new(tx);
        let spool = SpoolHandle::new(spool, status.clone());
        let path = dir.path().join("run/agent.sock");
        let server = LocalServer::bind(&path).unwrap();
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (enforcer, reports) = crate::enforce::channel();
        let tickets = crate::ticket::TicketVerifier::open(
            &dir.path().join("state"),
            "host-1".parse().unwrap(),
            now(),
        )
        .unwrap();
        let state = ServerState {
            spool: spool.clone(),
            status: rx,
            resource: "host-1".parse().unwrap(),
            tickets: tickets.clone(),
            presence: crate::presence::PresenceBoard::default(),
            enforcer: enforcer.clone(),
            idle_timeout,
            metrics: crate::metrics::AgentMetrics::default(),
            pam: crate::pam_logins::PamLogins::load(&dir.path().join("state")).unwrap(),
        };
        tracker.spawn(server.serve(state.clone(), shutdown.clone(), tracker.clone()));
        Harness {
            tickets,
            state,
            _dir: dir,
            path,
            enforcer,
            reports,
            spool,
            status,
            shutdown,
            tracker,
        }
    }

    impl Harness {
        /// Stops the server; the temp dir lives as long as the returned guard.
        async fn stop(self) -> tempfile::TempDir {
            self.shutdown.cancel();
            self.tracker.close();
            self.tracker.wait().await;
            self._dir
        }
    }

    fn sid(s: &str) -> SessionId {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn session_reports_round_trip_with_clear_errors() {
        let h = start(SpoolOptions::default());
        let mode = std::fs::metadata(&h.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, SOCKET_MODE);
        let mut c = LocalClient::connect(&h.path).await.unwrap();
        assert_eq!(
            c.session_start(sid("s1"), "alice".parse().unwrap(), StartProof::Trusted)
                .await
                .unwrap(),
            1
        );
        let dup = c
            .session_start(sid("s1"), "bob".parse().unwrap(), StartProof::Trusted)
            .await
            .unwrap_err();
        assert!(
            matches!(&dup, LocalError::Refused { code: ErrorCode::DuplicateSession, message } if message.contains("s1")),
            "{dup}"
        );
        let unknown = c
            .session_end(sid("nope"), EndReason::Logout)
            .await
            .unwrap_err();
        assert!(matches!(
            unknown,
            LocalError::Refused {
                code: ErrorCode::UnknownSession,
                ..
            }
        ));
        assert_eq!(
            c.session_end(sid("s1"), EndReason::Logout).await.unwrap(),
            2
        );
        let st = c.status().await.unwrap();
        assert_eq!(st.resource, "host-1");
        assert_eq!(
            (st.link.last_seq, st.link.spooled, st.link.connected),
            (2, 2, false)
        );
        let long = EndReason::Other("x".repeat(2000));
        c.session_start(sid("s2"), "alice".parse().unwrap(), StartProof::Trusted)
            .await
            .unwrap();
        let err = c.session_end(sid("s2"), long).await.unwrap_err();
        assert!(matches!(
            err,
            LocalError::Refused {
                code: ErrorCode::InvalidRequest,
                ..
            }
        ));
        h.stop().await;
    }

    #[tokio::test]
    async fn idleness_goes_to_the_enforcer_and_its_ends_keep_their_reason() {
        let mut h = start(SpoolOptions::default());
        let mut c = LocalClient::connect(&h.path).await.unwrap();
        let unknown = c.session_idleness(sid("s1"), Some(None)).await.unwrap_err();
        assert!(
            matches!(
                unknown,
                LocalError::Refused {
                    code: ErrorCode::UnknownSession,
                    ..
                }
            ),
            "{unknown}"
        );
        c.session_start(sid("s1"), "alice".parse().unwrap(), StartProof::Trusted)
            .await
            .unwrap();
        c.session_idleness(sid("s1"), Some(Some(UnixMillis(5))))
            .await
            .unwrap();
        assert_eq!(
            h.reports.next().await,
            Some((sid("s1"), Some(UnixMillis(5))))
        );
        c.session_idleness(sid("s1"), Some(None)).await.unwrap();
        let (s, since) = h.reports.next().await.unwrap();
        assert!(s == sid("s1") && since.is_some_and(|t| t.0 > 5));
        c.session_idleness(sid("s1"), None).await.unwrap();
        assert_eq!(h.reports.next().await, Some((sid("s1"), None)));
        let future = UnixMillis(now().0 + 3_600_000);
        let err = c
            .session_idleness(sid("s1"), Some(Some(future)))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                LocalError::Refused {
                    code: ErrorCode::InvalidRequest,
                    ..
                }
            ),
            "{err}"
        );

        // The host reports the end the enforcer's hook caused: recorded with
        // the enforcer's reason, once.
        h.enforcer.mark_ending(sid("s1"), EndReason::Idle);
        c.session_end(sid("s1"), EndReason::Logout).await.unwrap();
        let recorded = h.spool.lock().events_after(0, 10);
        assert!(
            matches!(
                &recorded[1].event,
                SessionEvent::Ended {
                    reason: EndReason::Idle,
                    ..
                }
            ),
            "{recorded:?}"
        );
        let again = c
            .session_end(sid("s1"), EndReason::Logout)
            .await
            .unwrap_err();
        assert!(matches!(
            again,
            LocalError::Refused {
                code: ErrorCode::UnknownSession,
                ..
            }
        ));
        h.stop().await;
    }

    #[test]
    fn golden_idleness_requests() {
        let hex = |v: &LocalRequest| -> String {
            ferry_common::frame::encode_payload(v)
                .unwrap()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        assert_eq!(
            hex(&LocalRequest::V1(Request::SessionIdle {
                session: sid("s1"),
                since: Some(UnixMillis(5)),
            })),
            "0007027331010a"
        );
        assert_eq!(
            hex(&LocalRequest::V1(Request::SessionIdle {
                session: sid("s1"),
                since: None,
            })),
            "000702733100"
        );
        assert_eq!(
            hex(&LocalRequest::V1(Request::SessionActive {
                session: sid("s1")
            })),
            "0008027331"
        );
    }

    #[test]
    fn golden_wait_acked_and_ended_session() {
        let hex = |bytes: Vec<u8>| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
        let req = LocalRequest::V1(Request::WaitAcked {
            seq: 3,
            timeout_ms: 2000,
        });
        assert_eq!(
            hex(ferry_common::frame::encode_payload(&req).unwrap()),
            "000903fbd007"
        );
        let resp = LocalResponse::V1(Response::Error {
            code: ErrorCode::EndedSession,
            message: "m".into(),
        });
        assert_eq!(
            hex(ferry_common::frame::encode_payload(&resp).unwrap()),
            "00020f016d"
        );
    }

    #[tokio::test]
    async fn wait_acked_answers_at_the_ack_and_at_once_while_disconnected() {
        let h = start(SpoolOptions::default());
        let mut c = LocalClient::connect(&h.path).await.unwrap();
        let seq = c
            .session_start(sid("s1"), "alice".parse().unwrap(), StartProof::Trusted)
            .await
            .unwrap();
        // The link is down: no waiting for an ack that cannot come soon.
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            c.wait_acked(seq, Duration::from_secs(3600)),
        )
        .await
        .expect("answered at once");
        assert!(!answer.unwrap());
        // Connected: answered when the broker acknowledges.
        h.status.send_modify(|s| s.connected = true);
        let status = h.status.clone();
        let (acked, ()) = tokio::join!(c.wait_acked(seq, Duration::from_secs(3600)), async {
            tokio::task::yield_now().await;
            status.send_modify(|s| s.acked_seq = seq);
        });
        assert!(acked.unwrap());
        h.stop().await;
    }

    #[tokio::test]
    async fn full_spool_is_refused() {
        let h = start(SpoolOptions {
            max_events: 1,
            ..SpoolOptions::default()
        });
        let mut c = LocalClient::connect(&h.path).await.unwrap();
        c.session_start(sid("a"), "u".parse().unwrap(), StartProof::Trusted)
            .await
            .unwrap();
        let err = c
            .session_start(sid("b"), "u".parse().unwrap(), StartProof::Trusted)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                LocalError::Refused {
                    code: ErrorCode::SpoolFull,
                    ..
                }
            ),
            "{err}"
        );
        h.stop().await;
    }

    #[tokio::test]
    async fn wait_synced_follows_the_status_and_times_out() {
        let h = start(SpoolOptions::default());
        let mut c = LocalClient::connect(&h.path).await.unwrap();
        let err = c.wait_synced(Duration::from_millis(50)).await.unwrap_err();
        assert!(
            matches!(
                err,
                LocalError::Refused {
                    code: ErrorCode::Timeout,
                    ..
                }
            ),
            "{err}"
        );

        let path = h.path.clone();
        let waiter = tokio::spawn(async move {
            let mut c = LocalClient::connect(&path).await.unwrap();
            c.wait_synced(Duration::from_secs(60)).await
        });
        // The waiter is answered by the status change, not by polling.
        h.status.send_modify(|s| s.connected = true);
        let st = waiter.await.unwrap().unwrap();
        assert!(st.link.connected);
        h.stop().await;
    }

    #[tokio::test]
    async fn garbage_gets_a_malformed_reply_and_a_live_socket_is_not_stolen() {
        let h = start(SpoolOptions::default());
        let mut raw = UnixStream::connect(&h.path).await.unwrap();
        raw.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        let reply: LocalResponse = read_message(&mut raw, MAX_LOCAL_FRAME_LEN)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            reply,
            LocalResponse::V1(Response::Error {
                code: ErrorCode::Malformed,
                ..
            })
        ));
        let mut big = UnixStream::connect(&h.path).await.unwrap();
        big.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let reply: LocalResponse = read_message(&mut big, MAX_LOCAL_FRAME_LEN)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            reply,
            LocalResponse::V1(Response::Error {
                code: ErrorCode::Malformed,
                ..
            })
        ));
        assert!(matches!(
            LocalServer::bind(&h.path),
            Err(LocalError::InUse(_))
        ));
        // The server still answers after the garbage.
        let mut c = LocalClient::connect(&h.path).await.unwrap();
        c.status().await.unwrap();
        let path = h.path.clone();
        let _dir = h.stop().await;
        // A stale socket file (nobody listening) is replaced.
        assert!(path.exists());
        let again = LocalServer::bind(&path).unwrap();
        assert_eq!(again.path(), path);
    }

    #[tokio::test]
    async fn missing_socket_says_the_agent_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalClient::connect(&dir.path().join("none.sock"))
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("is ferry-agent running"), "{err}");
    }

    /// A harness whose agent has the broker's ticket key, and that key.
    fn start_with_ticket_key() -> (Harness, ring::signature::Ed25519KeyPair) {
        use ring::signature::KeyPair as _;
        let h = start(SpoolOptions::default());
        let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).unwrap();
        h.tickets
            .set_key_blocking(key.public_key().as_ref())
            .unwrap();
        (h, key)
    }

    /// A ticket of the broker's `key` for `session` of `user` on host-1.
    fn ticket_for(
        key: &ring::signature::Ed25519KeyPair,
        n: u8,
        session: &str,
        user: &str,
    ) -> String {
        let at = now().0;
        ferry_common::ticket::sign_ticket(
            &ferry_common::ticket::TicketClaims {
                ticket_id: [n; 16],
                group: "g".parse().unwrap(),
                resource: "host-1".parse().unwrap(),
                user: user.parse().unwrap(),
                session: session.parse().unwrap(),
                issued_at: UnixMillis(at),
                expires_at: UnixMillis(at + 60_000),
            },
            key,
        )
    }

    fn refused_with(r: Result<u64, LocalError>, want: ErrorCode) -> String {
        match r {
            Err(LocalError::Refused { code, message }) if code == want => message,
            other => panic!("expected {want:?}, got {other:?}"),
        }
    }

    fn pam_reply(r: Response) -> PamSessionReply {
        match r {
            Response::PamSession(p) => p,
            other => panic!("expected a PAM session, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_pam_login_with_a_ticket_opens_and_closes_the_ticket_s_session() {
        let (h, key) = start_with_ticket_key();
        // Over the socket the login is this process's parent, as the kernel
        // says (here, whatever runs the tests).
        let mut c = LocalClient::connect(&h.path).await.unwrap();
        let alice: UserId = "alice".parse().unwrap();
        let open_sessions = |h: &Harness| -> Vec<String> {
            h.spool
                .lock()
                .open_sessions()
                .iter()
                .map(|o| o.session.to_string())
                .collect()
        };

        // A session opened with no ticket login before it.
        let no_ticket = c.pam_session(true, "sshd".into(), alice.clone()).await;
        assert!(
            matches!(&no_ticket, Err(LocalError::Refused { code: ErrorCode::NotVerified, message }) if message.contains("did not authenticate with a Ferry ticket")),
            "{no_ticket:?}"
        );
        // Another user's ticket: refused, and not used up.
        let t1 = ticket_for(&key, 1, "s1", "alice");
        let stolen = c
            .pam_auth("sshd".into(), "mallory".parse().unwrap(), t1.clone())
            .await;
        assert!(
            matches!(
                &stolen,
                Err(LocalError::Refused {
                    code: ErrorCode::TicketOtherUser,
                    ..
                })
            ),
            "{stolen:?}"
        );
        let info = c
            .pam_auth("sshd".into(), alice.clone(), t1.clone())
            .await
            .unwrap();
        assert_eq!(info.session.as_str(), "s1");
        let reused = c.pam_auth("sshd".into(), alice.clone(), t1).await;
        assert!(
            matches!(
                &reused,
                Err(LocalError::Refused {
                    code: ErrorCode::TicketReused,
                    ..
                })
            ),
            "{reused:?}"
        );
        let opened = c
            .pam_session(true, "sshd".into(), alice.clone())
            .await
            .unwrap();
        assert_eq!((opened.session.as_str(), opened.others), ("s1", 0));
        assert_eq!(open_sessions(&h), ["s1"]);
        let closed = c
            .pam_session(false, "sshd".into(), alice.clone())
            .await
            .unwrap();
        assert_eq!(closed.others, 0, "its only login: the session ended");
        assert!(open_sessions(&h).is_empty());
        let again = c.pam_session(false, "sshd".into(), alice.clone()).await;
        assert!(
            matches!(
                &again,
                Err(LocalError::Refused {
                    code: ErrorCode::UnknownSession,
                    ..
                })
            ),
            "{again:?}"
        );
        h.shutdown.cancel();
    }

    /// Two logins of one shared session (processes `a` and `b`) closing at
    /// the same time end it exactly once; an open attaching while it ends
    /// does not attach to a session that is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_logins_of_a_shared_session_closing_together_end_it_once() {
        let (h, key) = start_with_ticket_key();
        let alice: UserId = "alice".parse().unwrap();
        let state = h.state.clone();
        for round in 0..20u8 {
            let session = format!("s{round}");
            let mut a = std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap();
            let mut b = std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap();
            for (n, p) in [(1u8, &a), (2, &b)] {
                let t = ticket_for(&key, round * 2 + n, &session, "alice");
                let r = pam_auth_as(&state, "sshd".into(), alice.clone(), t, p.id()).await;
                assert!(matches!(r, Response::TicketValid(_)), "{r:?}");
                let r = pam_reply(pam_open_as(&state, "sshd".into(), alice.clone(), p.id()).await);
                assert_eq!(
                    (r.session.as_str(), r.others),
                    (session.as_str(), u32::from(n) - 1)
                );
            }
            let (ra, rb) = tokio::join!(
                pam_close_as(&state, "sshd".into(), alice.clone(), a.id()),
                pam_close_as(&state, "sshd".into(), alice.clone(), b.id()),
            );
            let mut others = [pam_reply(ra).others, pam_reply(rb).others];
            others.sort_unstable();
            assert_eq!(
                others,
                [0, 1],
                "one close leaves the other login, the other ends it"
            );
            assert!(
                h.spool.lock().open_sessions().is_empty(),
                "round {round}: the session ended"
            );
            assert!(state.pam.logins().is_empty());
            for p in [&mut a, &mut b] {
                p.kill().unwrap();
                p.wait().unwrap();
            }
        }
        h.shutdown.cancel();
    }

    #[tokio::test]
    async fn a_session_start_needs_a_verified_ticket_its_ticket_or_trust() {
        let (h, key) = start_with_ticket_key();
        let mut c = LocalClient::connect(&h.path).await.unwrap();
        let alice: UserId = "alice".parse().unwrap();

        // Nothing verified: refused, with what to do; the old request too.
        let message = refused_with(
            c.session_start(sid("s1"), alice.clone(), StartProof::VerifiedTicket)
                .await,
            ErrorCode::NotVerified,
        );
        assert!(
            message.contains("no verified ticket for session s1")
                && message.contains("ferry-agent ticket verify")
                && message.contains("--trusted"),
            "{message}"
        );
        let old = c
            .call(Request::SessionStart {
                session: sid("s1"),
                user: alice.clone(),
            })
            .await
            .unwrap();
        assert!(
            matches!(
                old,
                Response::Error {
                    code: ErrorCode::NotVerified,
                    ..
                }
            ),
            "{old:?}"
        );

        // Verified first (`ticket verify`), then started: accepted, for that
        // user only.
        c.verify_ticket(ticket_for(&key, 1, "s1", "alice"))
            .await
            .unwrap();
        refused_with(
            c.session_start(
                sid("s1"),
                "mallory".parse().unwrap(),
                StartProof::VerifiedTicket,
            )
            .await,
            ErrorCode::NotVerified,
        );
        c.session_start(sid("s1"), alice.clone(), StartProof::VerifiedTicket)
            .await
            .unwrap();
        // The old request is the verified-ticket path too.
        c.verify_ticket(ticket_for(&key, 2, "s2", "alice"))
            .await
            .unwrap();
        let old = c
            .call(Request::SessionStart {
                session: sid("s2"),
                user: alice.clone(),
            })
            .await
            .unwrap();
        assert!(matches!(old, Response::Recorded { .. }), "{old:?}");

        // The ticket carried by the start: verified then and there, for its
        // own session only, once.
        let t3 = ticket_for(&key, 3, "s3", "alice");
        refused_with(
            c.session_start(sid("s4"), alice.clone(), StartProof::Ticket(t3.clone()))
                .await,
            ErrorCode::InvalidRequest,
        );
        c.session_start(sid("s3"), alice.clone(), StartProof::Ticket(t3.clone()))
            .await
            .unwrap();
        refused_with(
            c.session_start(sid("s3"), alice.clone(), StartProof::Ticket(t3))
                .await,
            ErrorCode::TicketReused,
        );

        // Trusted: the test runs as root or as the agent's own user.
        c.session_start(sid("s6"), alice.clone(), StartProof::Trusted)
            .await
            .unwrap();
        h.stop().await;
    }

    #[test]
    fn only_root_and_the_agents_user_may_vouch() {
        let peer = |uid| Peer {
            uid,
            agent_uid: 998,
            pid: None,
        };
        assert!(peer(Some(0)).may_vouch());
        assert!(peer(Some(998)).may_vouch());
        assert!(!peer(Some(1000)).may_vouch());
        assert!(!peer(None).may_vouch());
    }

    #[test]
    fn golden_session_start_with() {
        let hex = |v: &LocalRequest| -> String {
            ferry_common::frame::encode_payload(v)
                .unwrap()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        let req = |proof| {
            LocalRequest::V1(Request::SessionStartWith {
                session: sid("s1"),
                user: "al".parse().unwrap(),
                proof,
            })
        };
        assert_eq!(hex(&req(StartProof::VerifiedTicket)), "000a02733102616c00");
        assert_eq!(
            hex(&req(StartProof::Ticket("t".into()))),
            "000a02733102616c010174"
        );
        assert_eq!(hex(&req(StartProof::Trusted)), "000a02733102616c02");
        let resp = LocalResponse::V1(Response::Error {
            code: ErrorCode::NotTrusted,
            message: "m".into(),
        });
        assert_eq!(
            ferry_common::frame::encode_payload(&resp)
                .unwrap()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            "000211016d"
        );
    }

    /// Waits (bounded) until the agent closes `raw`.
    async fn closed_by_agent(raw: &mut UnixStream) {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(30), raw.read(&mut buf))
            .await
            .expect("closed within the bound")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
    }

    #[tokio::test]
    async fn idle_and_stalled_clients_are_dropped_and_free_their_slots() {
        let h = start_with(SpoolOptions::default(), Duration::from_millis(300));
        // Every slot held by a client that says nothing, one stalled in the
        // middle of a frame.
        let mut idle = Vec::new();
        for _ in 0..MAX_LOCAL_CONNECTIONS - 1 {
            idle.push(UnixStream::connect(&h.path).await.unwrap());
        }
        let mut stalled = UnixStream::connect(&h.path).await.unwrap();
        stalled.write_all(&[0, 0, 0, 40, 0]).await.unwrap();
        // A real client still gets through once they are dropped.
        let mut c = tokio::time::timeout(Duration::from_secs(30), async {
            let mut c = LocalClient::connect(&h.path).await.unwrap();
            c.status().await.unwrap();
            c
        })
        .await
        .expect("served after the idle ones were dropped");
        closed_by_agent(&mut stalled).await;
        for raw in &mut idle {
            closed_by_agent(raw).await;
        }
        // A client that keeps talking is not dropped between its requests
        // while each comes within the timeout.
        c.status().await.unwrap();
        h.stop().await;
    }
}
