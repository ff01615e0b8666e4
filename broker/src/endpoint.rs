//! The broker's one QUIC endpoint and what it serves.
//!
//! Every peer (agents, end users' clients, hosts enrolling) reaches the same
//! UDP port. TLS accepts a connection with or without a client certificate;
//! once its handshake is done the connection is handed to the service of its
//! ALPN ([`Services`]): the agent link ([`ferry_common::ALPN_AGENT`]), routing
//! ([`ferry_common::ALPN_ROUTE`]) or enrollment ([`ferry_common::ALPN_ENROLL`]).
//! Handshakes in flight have one limit for every protocol; each service owns
//! its own connection limit, so one kind of client cannot take the fleet's
//! agents' places.
//!
//! Every protocol then starts the same way: the peer sends the fixed 8-byte
//! preamble (magic and protocol version) and the broker answers it
//! ([`answer_preamble`]); the reply's layout never changes, so a peer of any
//! version learns why it was refused.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_common::frame::{self, PreambleReply, PREAMBLE_LEN};
use ferry_common::PROTOCOL_VERSION;
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most TLS handshakes in progress at once, of any protocol. Past this, new
/// connections are refused before the handshake costs anything; a handshake
/// ends within [`HANDSHAKE_TIMEOUT`], so the slots turn over.
pub const MAX_HANDSHAKES: usize = 2_048;

/// Time from an accepted UDP handshake to a peer's first message: TLS,
/// opening the stream, the preamble. A peer slower than this is not working.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a refusal is given to reach the peer before the connection is closed.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// A write to one peer that takes longer than this means it stopped
/// reading; its connection is dropped rather than left to stall its task.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC application close codes of the broker's endpoint.
pub mod close_code {
    /// Normal end.
    pub const DONE: u32 = 0;
    /// A `Refused` message was sent; its code says why.
    pub const REFUSED: u32 = 1;
    /// The peer did not start with the Ferry preamble.
    pub const BAD_PREAMBLE: u32 = 2;
    /// The client certificate names no valid resource.
    pub const BAD_IDENTITY: u32 = 3;
    /// The peer spoke another protocol version.
    pub const UNSUPPORTED_VERSION: u32 = 4;
    /// Too many connections of the peer's protocol are open; retry later.
    pub const BUSY: u32 = 5;
    /// The peer's protocol (ALPN) is not served by this broker.
    pub const NOT_SERVED: u32 = 6;
}

/// A protocol served on the broker's endpoint. Implementations own their
/// per-connection limits, timeouts and errors.
pub trait EndpointService: Send + Sync + 'static {
    /// Serves one connection whose handshake is done, until it ends or
    /// `token` is cancelled. Runs in a task tracked by the daemon.
    fn serve(
        &self,
        conn: quinn::Connection,
        token: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
}

/// The service of each ALPN; `None` = not served (the connection is closed
/// with [`close_code::NOT_SERVED`]).
#[derive(Clone, Default)]
pub struct Services {
    /// [`ferry_common::ALPN_AGENT`]: the fleet's agents (`crate::link`).
    pub agent: Option<Arc<dyn EndpointService>>,
    /// [`ferry_common::ALPN_ROUTE`]: end users asking for a session.
    pub route: Option<Arc<dyn EndpointService>>,
    /// [`ferry_common::ALPN_ENROLL`]: new hosts presenting an enrollment token.
    pub enroll: Option<Arc<dyn EndpointService>>,
}

impl Services {
    fn of(&self, alpn: Option<&[u8]>) -> Option<&Arc<dyn EndpointService>> {
        match alpn {
            Some(ferry_common::ALPN_AGENT) => self.agent.as_ref(),
            Some(ferry_common::ALPN_ROUTE) => self.route.as_ref(),
            Some(ferry_common::ALPN_ENROLL) => self.enroll.as_ref(),
            _ => None,
        }
    }
}

/// Accepts connections until `shutdown`; each connection gets a child token
/// and, once its handshake is done, is handed to the service of its ALPN in a
/// task on `tracker`. Returns when shutdown is requested or the endpoint
/// closes.
pub async fn serve(
    endpoint: quinn::Endpoint,
    services: Services,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
        };
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(),
                "refusing connection: {MAX_HANDSHAKES} handshakes in progress");
            incoming.refuse();
            continue;
        };
        let services = services.clone();
        let token = shutdown.child_token();
        tracker.spawn(async move {
            let remote = incoming.remote_address();
            let conn = tokio::select! {
                _ = token.cancelled() => return,
                r = timeout(HANDSHAKE_TIMEOUT, incoming) => match r {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => {
                        tracing::info!(%remote, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%remote, "TLS handshake timed out");
                        return;
                    }
                },
            };
            drop(handshake);
            match services.of(alpn(&conn).as_deref()) {
                Some(service) => service.serve(conn, token).await,
                None => {
                    tracing::info!(%remote, "closing connection: its protocol is not served");
                    conn.close(close_code::NOT_SERVED.into(), b"protocol not served");
                }
            }
        });
    }
}

/// The ALPN protocol the handshake agreed on.
fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// Why a peer's preamble was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PreambleError {
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("read the preamble: {0}")]
    Read(String),
    #[error("not a Ferry peer (bad preamble)")]
    NotFerry,
    /// The reply naming the version this broker speaks was sent.
    #[error("peer speaks protocol {0}")]
    Unsupported(u16),
    #[error("write the preamble reply: {0}")]
    Write(String),
}

/// Reads the peer's preamble within `read_timeout` and answers it: accepted,
/// or the version this broker speaks (with `upgrade`, a hint saying what to
/// upgrade, given time to arrive before the caller closes). A bad preamble
/// gets no reply: the caller closes or resets with
/// [`close_code::BAD_PREAMBLE`].
pub async fn answer_preamble(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    read_timeout: Duration,
    peer: &str,
    upgrade: &str,
) -> Result<(), PreambleError> {
    let mut pre = [0u8; PREAMBLE_LEN];
    timeout(read_timeout, recv.read_exact(&mut pre))
        .await
        .map_err(|_| PreambleError::Timeout("the preamble"))?
        .map_err(|e| PreambleError::Read(e.to_string()))?;
    let version = frame::parse_preamble(&pre).map_err(|_| PreambleError::NotFerry)?;
    if version != PROTOCOL_VERSION {
        let reply = PreambleReply::UnsupportedVersion {
            supported: PROTOCOL_VERSION,
            message: format!(
                "broker speaks protocol {PROTOCOL_VERSION}, {peer} sent {version}; {upgrade}"
            ),
        };
        let _ = timeout(REFUSAL_LINGER, send.write_all(&reply.encode())).await;
        let _ = send.finish();
        let _ = timeout(REFUSAL_LINGER, send.stopped()).await;
        return Err(PreambleError::Unsupported(version));
    }
    let accepted = PreambleReply::Accepted {
        version: PROTOCOL_VERSION,
    };
    timeout(WRITE_TIMEOUT, send.write_all(&accepted.encode()))
        .await
        .map_err(|_| PreambleError::Timeout("the peer to read"))?
        .map_err(|e| PreambleError::Write(e.to_string()))
}
