//! The metrics endpoint (`[metrics] listen`): what a scrape reads from the
//! live broker (each group's actor, asked all at once and each for a
//! bounded time; the registry; the store's counts) and the HTTP listener
//! that serves `GET /metrics`. The counters themselves, and the exposition,
//! are [`crate::metrics`], which the parts that count reach through the
//! store; this module sits above the groups and the store it reads.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::groups::actor::GroupView;
use crate::groups::GroupActors;
use crate::metrics::{BrokerMetrics, GroupFigures, GroupNumbers, Live};
use crate::registry::Registry;
use crate::store::Store;

/// A group's figures from its actor's view.
fn figures_of(view: &GroupView) -> GroupFigures {
    let resources: Vec<_> = view
        .resources
        .iter()
        .map(|r| (r.class, r.state, r.occupancy))
        .collect();
    GroupFigures {
        group: view.group.to_string(),
        numbers: GroupNumbers::of(&resources, view.demand),
        demand: view.demand,
        capacity: view.capacity,
        usage_threshold: view.usage_threshold,
    }
}

/// Where the metrics are served, bound before the broker says it is
/// ready, and served until `shutdown`.
pub struct MetricsServer {
    listener: TcpListener,
    /// The bound address.
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks one); `tls`: served over TLS with it.
    pub async fn bind(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr).await?;
        Ok(MetricsServer {
            addr: listener.local_addr()?,
            listener,
            tls,
        })
    }

    /// The bound address (the real port when port 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `GET /metrics` until `shutdown`; `live` reads the live state
    /// at each scrape.
    pub async fn serve<F, Fut>(self, metrics: BrokerMetrics, live: F, shutdown: CancellationToken)
    where
        F: Fn() -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Live> + Send,
    {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let (metrics, live) = (metrics.clone(), live.clone());
                async move {
                    let body = metrics.render(&live().await).await;
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        );
        ferry_process::http::serve(
            self.listener,
            self.tls,
            app,
            ferry_process::http::HttpLimits::default(),
            shutdown,
        )
        .await;
    }
}

/// How long a scrape waits for one group's actor.
pub const VIEW_LIMIT: std::time::Duration = std::time::Duration::from_millis(500);

/// What a scrape reads: each running group's view from its actor (a group
/// whose actor does not answer, stopping or restarting, is left out of this
/// scrape), the registry's connections, the store's counts.
///
/// The actors are asked all at once, each for at most [`VIEW_LIMIT`]: a
/// busy or stuck actor is left out of this scrape instead of holding it.
pub async fn read_live(actors: &GroupActors, registry: &Registry, store: &Store) -> Live {
    let asks = actors.running().into_iter().map(|group| async move {
        match tokio::time::timeout(VIEW_LIMIT, actors.view(&group)).await {
            Ok(Ok(view)) => Some(view),
            Ok(Err(e)) => {
                tracing::debug!(%group, error = %e, "metrics: no view of the group");
                None
            }
            Err(_) => {
                tracing::debug!(%group, "metrics: the group's actor did not answer in time");
                None
            }
        }
    });
    let groups: Vec<GroupFigures> = futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .map(|view| figures_of(&view))
        .collect();
    let (counts, store_read) = match store.live_counts().await {
        Ok(counts) => (counts, true),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: read the outbox and rollouts");
            (Default::default(), false)
        }
    };
    Live {
        groups,
        agents: registry.snapshot().len(),
        outbox: counts.outbox,
        rollouts: counts.rollouts,
        store_read,
    }
}
