//! QUIC transport limits of the agent link, set on purpose rather than left
//! at quinn's defaults (which leave the connection receive window unbounded).

use std::time::Duration;

/// Streams an agent may open at once. The agent uses one bidirectional
/// control stream; a few more leave room for a reconnect race and for later
/// bulk transfers without letting a peer open thousands.
pub const AGENT_MAX_BIDI_STREAMS: u32 = 4;

/// Per-stream receive window: a few frames in flight at full size.
pub const AGENT_STREAM_WINDOW: u32 = 1024 * 1024;

/// Per-connection receive window: bounds what one peer can make us buffer.
pub const AGENT_CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;

/// A connection with no traffic for this long is dead. Keep-alives every
/// [`AGENT_KEEP_ALIVE`] keep a healthy idle link open through NATs.
pub const AGENT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Keep-alive period, well under [`AGENT_IDLE_TIMEOUT`] and typical NAT timeouts.
pub const AGENT_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The transport configuration both ends of the agent link use.
pub fn agent_link_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(AGENT_MAX_BIDI_STREAMS.into())
        .max_concurrent_uni_streams(0u8.into())
        .stream_receive_window(AGENT_STREAM_WINDOW.into())
        .receive_window(AGENT_CONNECTION_WINDOW.into())
        .send_window(u64::from(AGENT_CONNECTION_WINDOW))
        .keep_alive_interval(Some(AGENT_KEEP_ALIVE));
    // 30 s fits in a VarInt; the conversion cannot fail for this constant.
    if let Ok(idle) = quinn::IdleTimeout::try_from(AGENT_IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    t
}
