//! The broker's one QUIC endpoint and what it serves.
//!
//! Every peer (agents, end users' clients, hosts enrolling, the other brokers
//! of a cluster) reaches the same UDP port. TLS accepts a connection with or
//! without a client certificate; once its handshake is done the connection is
//! handed to the service of its ALPN ([`Services`]): the agent link
//! ([`ferry_common::ALPN_AGENT`]), routing ([`ferry_common::ALPN_ROUTE`]),
//! enrollment ([`ferry_common::ALPN_ENROLL`]) or requests forwarded by
//! another broker ([`ferry_common::ALPN_PEER`], `crate::peer`).
//! Handshakes in flight have one limit for every protocol; each service owns
//! its own connection limit, so one kind of client cannot take the fleet's
//! agents' places.
//!
//! Before a peer is authenticated it gets little ([`EndpointLimits`]): once
//! [`EndpointLimits::retry_above`] handshakes are in flight, a peer whose
//! address is not validated gets a QUIC Retry (a spoofed source cannot
//! answer it, so spoofed Initial packets cannot fill the handshake slots);
//! handshake slots are kept for addresses agents connected from
//! ([`AGENT_HANDSHAKE_RESERVE`]); one source address (an IPv4 address, an
//! IPv6 /64) holds at most [`EndpointLimits::per_source`] handshakes plus
//! route and enrollment connections at once (an agent's connection stops counting once its
//! handshake is done: it is authenticated by its certificate); a
//! connection may open one stream until its service raises that
//! (`transport::STREAMS_BEFORE_AUTH`), and buffers at most
//! `transport::CONNECTION_WINDOW_BEFORE_AUTH` bytes; route and enrollment
//! connections are closed when they stay idle ([`close_code::IDLE`]).
//!
//! Every protocol then starts the same way: the peer sends the fixed 8-byte
//! preamble (magic and protocol version) and the broker answers it
//! ([`answer_preamble`]); the reply's layout never changes, so a peer of any
//! version learns why it was refused.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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

/// Handshakes in flight from which a peer must prove its address (a QUIC
/// Retry: one more round trip) before it gets a slot: an eighth of
/// [`MAX_HANDSHAKES`]. Below it nobody pays the round trip; above it a
/// flood of spoofed Initial packets holds at most this many slots, and the
/// rest stay for peers that can receive what the broker sends.
pub const RETRY_ABOVE_HANDSHAKES: usize = MAX_HANDSHAKES / 8;

/// Most handshakes plus route and enrollment connections one source address
/// (an IPv4 address, an IPv6 /64) holds at once. An office behind one NAT
/// starts a few `ferry-connect`s a second, each for a few seconds; a
/// portal sends many requests over one connection. Agents are not bounded
/// by it once their handshake is done, so a fleet behind one NAT is not.
pub const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 64;

/// Handshake slots beyond [`MAX_HANDSHAKES`] kept for addresses an agent
/// with a valid certificate connected from before (this broker run), once
/// they have proved their address: agents reconnecting after a network cut
/// get in even while the general slots are taken. 256 agents reconnect at
/// once in them; the rest follow as handshakes end (milliseconds each).
pub const AGENT_HANDSHAKE_RESERVE: usize = 256;

/// Most addresses remembered as agents' for [`AGENT_HANDSHAKE_RESERVE`]:
/// one per agent connection the link allows (`link::MAX_AGENT_CONNECTIONS`).
pub const MAX_KNOWN_AGENT_SOURCES: usize = 20_000;

/// Time from an accepted UDP handshake to a peer's first message: TLS,
/// opening the stream, the preamble. A peer slower than this is not working.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a route connection may wait for its first stream: a client
/// opens it right after the handshake.
pub const ROUTE_FIRST_STREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a route connection with no request in flight stays open: long
/// enough for a portal to send the next request on it, short enough that
/// idle connections do not pile up (the broker's keep-alives, there for the
/// agent link, would otherwise keep them open forever).
pub const ROUTE_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time an enrollment connection has, from its handshake, to open its
/// stream and send the preamble and its request (a few hundred bytes).
pub const ENROLL_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Enrollments served at once; past this a host is closed with
/// [`close_code::BUSY`] and retries. Anyone may open an enrollment
/// connection, so each holds its place at most
/// [`ENROLL_REQUEST_TIMEOUT`] before its request is in, may open
/// one stream (`transport::STREAMS_BEFORE_AUTH`), and counts against its
/// source address's [`MAX_UNAUTHENTICATED_PER_SOURCE`].
pub const MAX_ENROLLMENTS: usize = 64;

/// Most route client connections open at once. Each end user's
/// `ferry-connect` holds one for a few seconds; past this, a connection is
/// closed after its handshake with [`close_code::BUSY`].
pub const MAX_ROUTE_CONNECTIONS: usize = 10_000;

/// How long a refusal is given to reach the peer before the connection is closed.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// A write to one peer that takes longer than this means it stopped
/// reading; its connection is dropped rather than left to stall its task.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What an unauthenticated peer may hold on the endpoint. The defaults are
/// the constants of this module (and of each service); tests shorten them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointLimits {
    /// [`MAX_HANDSHAKES`].
    pub max_handshakes: usize,
    /// [`HANDSHAKE_TIMEOUT`] (the TLS handshake itself).
    pub handshake_timeout: Duration,
    /// [`RETRY_ABOVE_HANDSHAKES`]; 0 = every unvalidated peer gets a Retry.
    pub retry_above: usize,
    /// [`MAX_UNAUTHENTICATED_PER_SOURCE`].
    pub per_source: usize,
    /// [`AGENT_HANDSHAKE_RESERVE`].
    pub agent_handshake_reserve: usize,
    /// [`MAX_ROUTE_CONNECTIONS`].
    pub max_route_connections: usize,
    /// [`ROUTE_FIRST_STREAM_TIMEOUT`].
    pub route_first_stream_timeout: Duration,
    /// [`ROUTE_IDLE_TIMEOUT`].
    pub route_idle_timeout: Duration,
    /// [`MAX_ENROLLMENTS`].
    pub max_enrollments: usize,
    /// [`ENROLL_REQUEST_TIMEOUT`].
    pub enroll_request_timeout: Duration,
}

impl Default for EndpointLimits {
    fn default() -> Self {
        EndpointLimits {
            max_handshakes: MAX_HANDSHAKES,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            retry_above: RETRY_ABOVE_HANDSHAKES,
            per_source: MAX_UNAUTHENTICATED_PER_SOURCE,
            agent_handshake_reserve: AGENT_HANDSHAKE_RESERVE,
            max_route_connections: MAX_ROUTE_CONNECTIONS,
            route_first_stream_timeout: ROUTE_FIRST_STREAM_TIMEOUT,
            route_idle_timeout: ROUTE_IDLE_TIMEOUT,
            max_enrollments: MAX_ENROLLMENTS,
            enroll_request_timeout: ENROLL_REQUEST_TIMEOUT,
        }
    }
}

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
    /// A route or enrollment connection sent nothing for its time limit;
    /// open a new one when there is a request to send.
    pub const IDLE: u32 = 7;
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
    /// [`ferry_common::ALPN_PEER`]: other brokers of the cluster (`crate::peer`).
    pub peer: Option<Arc<dyn EndpointService>>,
}

impl Services {
    /// The service of `alpn`, and whether its connections keep counting
    /// against their source's [`EndpointLimits::per_source`] while open
    /// (route and enrollment: anyone may open them; an agent link is
    /// authenticated by its certificate).
    fn of(&self, alpn: Option<&[u8]>) -> Option<(&Arc<dyn EndpointService>, bool)> {
        match alpn {
            Some(ferry_common::ALPN_AGENT) => self.agent.as_ref().map(|s| (s, false)),
            Some(ferry_common::ALPN_ROUTE) => self.route.as_ref().map(|s| (s, true)),
            Some(ferry_common::ALPN_ENROLL) => self.enroll.as_ref().map(|s| (s, true)),
            Some(ferry_common::ALPN_PEER) => self.peer.as_ref().map(|s| (s, true)),
            _ => None,
        }
    }
}

/// Handshakes and unauthenticated connections open per source address.
#[derive(Clone, Default)]
struct Sources {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One place of a source in [`Sources`], given back when dropped.
struct SourceSlot {
    sources: Sources,
    key: IpAddr,
}

impl Sources {
    /// A place for `ip`'s source, unless it holds `cap` already.
    fn take(&self, ip: IpAddr, cap: usize) -> Option<SourceSlot> {
        let key = source_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: self.clone(),
            key,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.sources.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Sources an agent with a valid certificate connected from, for the
/// handshake slots of [`AGENT_HANDSHAKE_RESERVE`]; at most
/// [`MAX_KNOWN_AGENT_SOURCES`], kept for the broker's run.
#[derive(Clone, Default)]
struct AgentSources {
    known: Arc<Mutex<HashSet<IpAddr>>>,
}

impl AgentSources {
    fn knows(&self, ip: IpAddr) -> bool {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.contains(&source_key(ip))
    }

    fn remember(&self, ip: IpAddr) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() < MAX_KNOWN_AGENT_SOURCES {
            known.insert(source_key(ip));
        }
    }
}

/// The source an address counts against: an IPv4 address, or the /64 of
/// an IPv6 one (a host commonly has a whole /64); an IPv4-mapped IPv6
/// address is its IPv4 address.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        v4 => v4,
    }
}

/// Accepts connections until `shutdown`; each connection gets a child token
/// and, once its handshake is done, is handed to the service of its ALPN in a
/// task on `tracker`. Returns when shutdown is requested or the endpoint
/// closes. What an unauthenticated peer may hold is bounded by `limits`.
pub async fn serve(
    endpoint: quinn::Endpoint,
    services: Services,
    limits: EndpointLimits,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    let reserve = Arc::new(Semaphore::new(limits.agent_handshake_reserve));
    let sources = Sources::default();
    let agents = AgentSources::default();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
        };
        let remote = incoming.remote_address();
        let in_flight = limits
            .max_handshakes
            .saturating_sub(handshakes.available_permits());
        if !incoming.remote_address_validated() && in_flight >= limits.retry_above {
            // Under pressure a slot goes only to a peer that can receive
            // what is sent to its address: a spoofed one never answers.
            tracing::debug!(%remote, in_flight, "asking for address validation (retry)");
            if let Err(e) = incoming.retry() {
                e.into_incoming().refuse();
            }
            continue;
        }
        let handshake = match handshakes.clone().try_acquire_owned() {
            Ok(slot) => slot,
            // An agent's address: a reserved slot once it proved it.
            Err(_) if agents.knows(remote.ip()) => {
                if !incoming.remote_address_validated() {
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().refuse();
                    }
                    continue;
                }
                let Ok(slot) = reserve.clone().try_acquire_owned() else {
                    tracing::warn!(%remote, "refusing connection: every handshake slot, \
                        the agents' reserved ones too, is taken");
                    incoming.refuse();
                    continue;
                };
                slot
            }
            Err(_) => {
                tracing::warn!(%remote,
                    "refusing connection: {} handshakes in progress", limits.max_handshakes);
                incoming.refuse();
                continue;
            }
        };
        let Some(source) = sources.take(remote.ip(), limits.per_source) else {
            tracing::info!(%remote, "refusing connection: its address holds {} handshakes \
                and route or enrollment connections", limits.per_source);
            incoming.refuse();
            continue;
        };
        let services = services.clone();
        let agents = agents.clone();
        let token = shutdown.child_token();
        let handshake_timeout = limits.handshake_timeout;
        tracker.spawn(async move {
            let conn = tokio::select! {
                _ = token.cancelled() => return,
                r = timeout(handshake_timeout, incoming) => match r {
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
            let alpn = alpn(&conn);
            // TLS checked the certificate against the CA.
            if alpn.as_deref() == Some(ferry_common::ALPN_AGENT) && conn.peer_identity().is_some() {
                agents.remember(remote.ip());
            }
            match services.of(alpn.as_deref()) {
                Some((service, bounded)) => {
                    // Held until the connection ends when it counts.
                    let _source = bounded.then_some(source);
                    service.serve(conn, token).await
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(source_key(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(
            source_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(
            source_key(ip("2001:db8:1:2::1")),
            source_key(ip("2001:db8:1:3::1"))
        );
    }

    #[test]
    fn a_source_holds_at_most_its_cap_and_gets_places_back() {
        let sources = Sources::default();
        let a: IpAddr = "2001:db8::1".parse().expect("ip");
        let same: IpAddr = "2001:db8::2".parse().expect("ip");
        let other: IpAddr = "192.0.2.1".parse().expect("ip");
        let first = sources.take(a, 2).expect("first place");
        let _second = sources.take(same, 2).expect("second place");
        assert!(sources.take(a, 2).is_none(), "the /64 is full");
        assert!(sources.take(other, 2).is_some(), "another source");
        drop(first);
        assert!(sources.take(same, 2).is_some(), "a place came back");
    }
}
