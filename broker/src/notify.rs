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
    send_all(&[state]);
}

/// Prefix of the `STATUS=` line sent with `READY=1`; the bound agent address
/// follows it. `systemctl status` shows it, and a supervisor (or a test) that
/// configured `listen` with port 0 learns the real port from it.
pub const READY_STATUS_PREFIX: &str = "listening for agents on ";

fn send_all(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("notify systemd: {e}");
    }
}

/// Separates the metrics address from the agent address in the `STATUS=`
/// line, when a metrics endpoint is served.
pub const READY_STATUS_METRICS: &str = "; metrics on ";

/// Tells systemd the broker is ready (listeners bound), where agents
/// connect and where metrics are served, in one datagram.
pub fn ready(agent_addr: std::net::SocketAddr, metrics_addr: Option<std::net::SocketAddr>) {
    let mut status = format!("{READY_STATUS_PREFIX}{agent_addr}");
    if let Some(addr) = metrics_addr {
        status.push_str(&format!("{READY_STATUS_METRICS}{addr}"));
    }
    send_all(&[NotifyState::Ready, NotifyState::Status(&status)]);
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
