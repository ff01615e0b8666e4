//! QUIC transport limits of the agent link, set on purpose rather than left
//! at quinn's defaults (which leave the connection receive window unbounded).
//!
//! A peer that dies without a word (a crash, a lost host, a cut network) is
//! noticed by both ends of the agent link within one health interval (at
//! least [`AGENT_MIN_IDLE_TIMEOUT`], at most [`AGENT_IDLE_TIMEOUT`]): the
//! broker's endpoint offers that idle timeout, with keep-alives four times as
//! often, and QUIC uses the smaller of the two ends' timeouts. The broker's
//! `missed_health_limit` (health reports that arrive late on a live
//! connection) is a separate check.

use std::time::Duration;

/// Streams an agent may open at once. The agent uses one bidirectional
/// control stream; a few more leave room for a reconnect race and for later
/// bulk transfers without letting a peer open thousands.
pub const AGENT_MAX_BIDI_STREAMS: u32 = 4;

/// Per-stream receive window: a few frames in flight at full size.
pub const AGENT_STREAM_WINDOW: u32 = 1024 * 1024;

/// Per-connection receive window: bounds what one peer can make us buffer.
pub const AGENT_CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;

/// A connection with no traffic for this long is dead: the longest idle
/// timeout, the one a client offers before it knows the broker's health
/// interval. Keep-alives every [`AGENT_KEEP_ALIVE`] keep a healthy idle link
/// open through NATs.
pub const AGENT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Keep-alive period, well under [`AGENT_IDLE_TIMEOUT`] and typical NAT timeouts.
pub const AGENT_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The shortest idle timeout the broker offers, whatever its health
/// interval: a loaded machine may not run a process for a moment, and that
/// is no reason to drop its connections.
pub const AGENT_MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Keep-alives per idle timeout: a few lost ones do not end a live link.
const KEEP_ALIVES_PER_IDLE_TIMEOUT: u32 = 4;

/// Bidirectional streams the broker lets a connection open before its
/// service has authenticated it (the agent link checks the certificate,
/// routing a request's credentials): the one stream every protocol starts
/// with. Each service raises it (`Connection::set_max_concurrent_bi_streams`)
/// once it trusts the peer; enrollment never does.
pub const STREAMS_BEFORE_AUTH: u32 = 1;

/// The broker's connection receive window before authentication: what an
/// unauthenticated peer can make it buffer. A route request is at most
/// 16 KiB, an enrollment request a few KiB; the agent link raises it to
/// [`AGENT_CONNECTION_WINDOW`] once the certificate is checked.
pub const CONNECTION_WINDOW_BEFORE_AUTH: u32 = 64 * 1024;

/// The transport configuration of a client of the broker's endpoint (an
/// agent before it knows the health interval, enrollment, tests).
pub fn agent_link_transport() -> quinn::TransportConfig {
    transport(AGENT_IDLE_TIMEOUT, AGENT_KEEP_ALIVE)
}

/// The idle timeout of the agent link for a broker whose agents report
/// health every `health_interval`: one interval, at least
/// [`AGENT_MIN_IDLE_TIMEOUT`], at most [`AGENT_IDLE_TIMEOUT`]. QUIC uses
/// the smaller of the two ends' timeouts, so the broker's applies to both:
/// a peer that died without a word (a crash, a lost host, a cut network)
/// is noticed on both sides within about one health interval.
pub fn agent_link_idle_timeout(health_interval: Duration) -> Duration {
    health_interval.clamp(AGENT_MIN_IDLE_TIMEOUT, AGENT_IDLE_TIMEOUT)
}

/// The broker endpoint's transport configuration for `health_interval`:
/// the idle timeout of [`agent_link_idle_timeout`], with keep-alives four
/// times as often so a quiet but live link never times out.
/// Streams and window are those before authentication
/// ([`STREAMS_BEFORE_AUTH`], [`CONNECTION_WINDOW_BEFORE_AUTH`]): every
/// connection starts with them, whatever its protocol.
pub fn agent_link_transport_for(health_interval: Duration) -> quinn::TransportConfig {
    let idle = agent_link_idle_timeout(health_interval);
    before_auth(transport(idle, idle / KEEP_ALIVES_PER_IDLE_TIMEOUT))
}

/// The broker endpoint's transport configuration before it knows the health
/// interval (tests, benchmarks): [`agent_link_transport`]'s timeouts with
/// the limits before authentication.
pub fn broker_transport() -> quinn::TransportConfig {
    before_auth(agent_link_transport())
}

fn before_auth(mut t: quinn::TransportConfig) -> quinn::TransportConfig {
    t.max_concurrent_bidi_streams(STREAMS_BEFORE_AUTH.into())
        .receive_window(CONNECTION_WINDOW_BEFORE_AUTH.into());
    t
}

fn transport(idle: Duration, keep_alive: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(AGENT_MAX_BIDI_STREAMS.into())
        .max_concurrent_uni_streams(0u8.into())
        .stream_receive_window(AGENT_STREAM_WINDOW.into())
        .receive_window(AGENT_CONNECTION_WINDOW.into())
        .send_window(u64::from(AGENT_CONNECTION_WINDOW))
        .keep_alive_interval(Some(keep_alive));
    // At most 30 s: fits in a VarInt, the conversion cannot fail.
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_timeout_follows_the_health_interval_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(agent_link_idle_timeout(s(10)), s(10));
        assert_eq!(agent_link_idle_timeout(Duration::from_millis(200)), s(2));
        assert_eq!(agent_link_idle_timeout(s(600)), s(30));
        assert_eq!(agent_link_idle_timeout(s(30)), AGENT_IDLE_TIMEOUT);
    }
}
