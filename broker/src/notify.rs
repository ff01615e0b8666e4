//! systemd's notify protocol: READY once the listeners are bound, STOPPING
//! when draining starts, watchdog pings at half the watchdog period.
//!
//! `sd-notify` is pure Rust and does nothing without `NOTIFY_SOCKET`, so the
//! daemon calls these unconditionally. The environment is never unset: two
//! daemons may share one test process.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(state: NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        tracing::warn!("notify systemd: {e}");
    }
}

/// Tells systemd the broker is ready (listeners bound).
pub fn ready() {
    send(NotifyState::Ready);
}

/// Tells systemd the broker is draining.
pub fn stopping() {
    send(NotifyState::Stopping);
}

/// The ping period when systemd's watchdog is on for this process: half of
/// `WATCHDOG_USEC`, so one late ping does not kill a healthy daemon.
pub fn watchdog_period() -> Option<Duration> {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec / 2))
    } else {
        None
    }
}

/// Pings the watchdog every `period` until `shutdown`.
pub async fn watchdog(period: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => send(NotifyState::Watchdog),
        }
    }
}
