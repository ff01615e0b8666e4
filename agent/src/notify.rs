//! systemd notifications: READY=1, STOPPING=1 and watchdog pings.
//!
//! Everything is a no-op when the agent is not started by systemd (no
//! `NOTIFY_SOCKET`), so in-process tests and `ferry-agent run` from a shell
//! behave the same. The environment is only read, never unset, so two agents
//! in one test process do not disturb each other.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Prefix of the `STATUS=` line sent with `READY=1` when metrics are
/// served; the bound address follows it.
pub const READY_STATUS_METRICS: &str = "metrics on ";

/// Sends the agent's state to systemd.
#[derive(Clone, Debug)]
pub struct Notifier {
    /// Watchdog period systemd asked for (`WATCHDOG_USEC`), if any.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `WATCHDOG_USEC` (the socket itself is read by each send).
    pub fn from_env() -> Self {
        let mut usec = 0u64;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec))
            .filter(|d| !d.is_zero());
        Self { watchdog }
    }

    fn send(&self, state: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(false, state) {
            tracing::warn!(error = %e, "notify systemd");
        }
    }

    /// The local socket is bound and the spool open; with the metrics
    /// endpoint's address after [`READY_STATUS_METRICS`] when it is served
    /// (a supervisor or a test that asked for port 0 learns the port).
    pub fn ready(&self, metrics: Option<std::net::SocketAddr>) {
        match metrics {
            None => self.send(&[NotifyState::Ready]),
            Some(addr) => {
                let status = format!("{READY_STATUS_METRICS}{addr}");
                self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
        }
    }

    /// Shutdown started.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// Pings the watchdog at half its period until `shutdown`.
    pub async fn watchdog(self, shutdown: CancellationToken) {
        let Some(period) = self.watchdog.map(watchdog_ping_period) else {
            return;
        };
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.send(&[NotifyState::Watchdog]),
            }
        }
    }
}

/// Half the watchdog period, as systemd recommends, never below 1 ms.
pub fn watchdog_ping_period(watchdog: Duration) -> Duration {
    (watchdog / 2).max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_at_half_the_period() {
        assert_eq!(
            watchdog_ping_period(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        assert_eq!(
            watchdog_ping_period(Duration::from_micros(1)),
            Duration::from_millis(1)
        );
    }
}
