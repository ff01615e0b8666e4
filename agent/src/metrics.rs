//! The agent's metrics: Prometheus text exposition (`GET /metrics`) on
//! `[metrics] listen`, plain HTTP, off by default (bind it to loopback or a
//! private network: it says nothing secret, but nothing needs it outside).
//!
//! Counted where they happen: hook runs by hook and result and their
//! durations (`commands::run_hook_with`), tickets verified or refused by
//! reason (`local.rs`), link connections after the first (`link.rs`).
//! Read at scrape time: whether the link is up, and the spool's depth and
//! the age of its oldest event not acknowledged yet.
//!
//! One [`AgentMetrics`] per agent, built by [`crate::run`] and handed to
//! the parts that count (never a process-wide global: several agents run
//! in one test process). Parts built without one (unit tests) get their
//! own, which nobody reads.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One hook run.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    pub hook: &'static str,
    pub result: &'static str,
}

/// One hook.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabel {
    pub hook: &'static str,
}

/// A ticket refusal's reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Hook durations: 10 ms to about 80 minutes (an update's hook may run
/// that long).
fn hook_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 3.0, 13))
}

/// One agent's metrics; cheap to clone.
#[derive(Clone)]
pub struct AgentMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    hook_runs: Family<HookLabels, Counter>,
    hook_seconds: Family<HookLabel, Histogram, fn() -> Histogram>,
    tickets_verified: Counter,
    tickets_refused: Family<ReasonLabel, Counter>,
    reconnects: Counter,
    /// Whether a connection was established before (the next one is a
    /// reconnect).
    connected_once: AtomicBool,
    link_up: Gauge,
    spool_events: Gauge,
    oldest_age: Gauge<f64, AtomicU64>,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentMetrics")
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Every metric, registered under the `ferry_agent_` prefix.
    pub fn new() -> AgentMetrics {
        let mut registry = Registry::with_prefix("ferry_agent");
        let hook_runs = Family::<HookLabels, Counter>::default();
        let hook_seconds = Family::new_with_constructor(hook_histogram as fn() -> Histogram);
        let tickets_verified = Counter::default();
        let tickets_refused = Family::<ReasonLabel, Counter>::default();
        let reconnects = Counter::default();
        let link_up = Gauge::default();
        let spool_events = Gauge::default();
        let oldest_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "hook_runs",
            "Hook runs by hook and result (ok, failed, timeout, spawn)",
            hook_runs.clone(),
        );
        registry.register_with_unit(
            "hook_duration",
            "Time a hook ran, by hook",
            Unit::Seconds,
            hook_seconds.clone(),
        );
        registry.register(
            "tickets_verified",
            "Tickets verified and marked used on this host",
            tickets_verified.clone(),
        );
        registry.register(
            "tickets_refused",
            "Tickets refused, by reason",
            tickets_refused.clone(),
        );
        registry.register(
            "link_reconnects",
            "Connections to a broker established after the first",
            reconnects.clone(),
        );
        registry.register(
            "link_up",
            "1 while a broker has welcomed this agent on the current connection, else 0",
            link_up.clone(),
        );
        registry.register(
            "spool_events",
            "Events in the spool not acknowledged by the broker",
            spool_events.clone(),
        );
        registry.register_with_unit(
            "spool_oldest_unacked_age",
            "Age of the oldest event not acknowledged (by its own stamp); 0 when none",
            Unit::Seconds,
            oldest_age.clone(),
        );
        AgentMetrics {
            inner: Arc::new(Inner {
                registry,
                hook_runs,
                hook_seconds,
                tickets_verified,
                tickets_refused,
                reconnects,
                connected_once: AtomicBool::new(false),
                link_up,
                spool_events,
                oldest_age,
            }),
        }
    }

    /// The hook `hook` ran for `elapsed` and ended with `result`.
    pub fn hook_ran(&self, hook: &'static str, result: &'static str, elapsed: Duration) {
        self.inner
            .hook_runs
            .get_or_create(&HookLabels { hook, result })
            .inc();
        self.inner
            .hook_seconds
            .get_or_create(&HookLabel { hook })
            .observe(elapsed.as_secs_f64());
    }

    /// A ticket was verified, or refused for `reason`.
    pub fn ticket(&self, outcome: Result<(), &'static str>) {
        match outcome {
            Ok(()) => {
                self.inner.tickets_verified.inc();
            }
            Err(reason) => {
                self.inner
                    .tickets_refused
                    .get_or_create(&ReasonLabel { reason })
                    .inc();
            }
        }
    }

    /// A broker welcomed this agent.
    pub fn link_established(&self) {
        if self.inner.connected_once.swap(true, Ordering::Relaxed) {
            self.inner.reconnects.inc();
        }
    }

    /// The exposition with the gauges set from `live`.
    pub fn render(&self, live: &Live) -> String {
        let i = &self.inner;
        i.link_up.set(i64::from(live.connected));
        i.spool_events
            .set(i64::try_from(live.spooled).unwrap_or(i64::MAX));
        i.oldest_age.set(live.oldest_unacked_age.as_secs_f64());
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &i.registry) {
            let _ = writeln!(out, "# encoding failed: {e}");
        }
        out
    }
}

/// What a scrape reads from the live agent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Live {
    /// A broker welcomed the agent on the current connection.
    pub connected: bool,
    /// Events not acknowledged.
    pub spooled: u64,
    /// Age of the oldest of them (zero when there is none).
    pub oldest_unacked_age: Duration,
}

/// Serves `GET /metrics` on `listener` until `shutdown`; `live` reads the
/// agent's state at each scrape.
pub async fn serve<F>(
    listener: TcpListener,
    metrics: AgentMetrics,
    live: F,
    shutdown: CancellationToken,
) where
    F: Fn() -> Live + Clone + Send + Sync + 'static,
{
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (metrics, live) = (metrics.clone(), live.clone());
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(&live()),
                )
            }
        }),
    );
    ferry_process::http::serve(
        listener,
        None,
        app,
        ferry_process::http::HttpLimits::default(),
        shutdown,
    )
    .await;
}

/// Binds `addr` for [`serve`]; returns the listener and its address (the
/// real port when port 0 was asked).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_counts_hooks_tickets_and_reconnects_and_shows_the_spool() {
        let m = AgentMetrics::new();
        m.hook_ran("disconnect", "ok", Duration::from_millis(20));
        m.hook_ran("disconnect", "failed", Duration::from_millis(30));
        m.ticket(Ok(()));
        m.ticket(Err("reused"));
        m.link_established();
        m.link_established();
        m.link_established();
        let text = m.render(&Live {
            connected: true,
            spooled: 4,
            oldest_unacked_age: Duration::from_millis(1500),
        });
        for line in [
            "ferry_agent_hook_runs_total{hook=\"disconnect\",result=\"ok\"} 1",
            "ferry_agent_hook_runs_total{hook=\"disconnect\",result=\"failed\"} 1",
            "ferry_agent_hook_duration_seconds_count{hook=\"disconnect\"} 2",
            "ferry_agent_tickets_verified_total 1",
            "ferry_agent_tickets_refused_total{reason=\"reused\"} 1",
            "ferry_agent_link_reconnects_total 2",
            "ferry_agent_link_up 1",
            "ferry_agent_spool_events 4",
            "ferry_agent_spool_oldest_unacked_age_seconds 1.5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        let text = m.render(&Live::default());
        assert!(text.lines().any(|l| l == "ferry_agent_link_up 0"), "{text}");
    }
}
