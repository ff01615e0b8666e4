//! Where the agent reads the time: the host's wall clock, which stamps every
//! session event and health report, decides ticket expiry and times the
//! session limits. One function, so the modules that need the time import
//! it from here instead of from each other.

use ferry_common::UnixMillis;

/// The wall clock as the wire stamps events.
pub fn now() -> UnixMillis {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    UnixMillis(i64::try_from(ms).unwrap_or(i64::MAX))
}
