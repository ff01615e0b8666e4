//! `ferry-agent`: runs on every streaming host, reports its sessions and
//! health to the broker and carries out the broker's commands.
//!
//! Code map:
//! * [`config`]: the TOML configuration, validated as a whole.
//! * [`spool`]: the durable, append-only log of session events; an event is
//!   on disk before it is sent or acknowledged to the local caller.
//! * [`local`]: the Unix socket the host's streaming server (and the CLI verbs,
//!   and PAM mode) report sessions on.
//! * [`link`]: the QUIC client to the broker: hello, replay, acks, health,
//!   commands, reconnect with backoff.
//! * [`health`], [`commands`], [`policy`], [`pam`], [`notify`]: host facts,
//!   broker commands, the pushed group policy, `pam_exec` mode and systemd notifications.
//! * [`versions`]: the image and component versions, pending and last
//!   update, kept durably and reported in `Inventory`.
//! * [`enforce`]: the policy's `max_session_duration` (warned 5 minutes
//!   ahead) and `idle_disconnect`, timed from the sessions' start and idle
//!   reports.
//!
//! [`run`] wires them under one cancellation token; `main.rs` only parses the
//! command line.

pub mod backoff;
pub mod clock;
pub mod commands;
pub mod config;
pub mod enforce;
pub mod enroll;
pub mod health;
pub mod link;
pub mod local;
pub mod metrics;
pub mod notify;
pub mod pam;
pub mod pam_logins;
pub mod policy;
pub mod presence;
pub mod renew;
pub mod spool;
pub mod ticket;
pub mod tls;
pub mod versions;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::AgentConfig;

/// Version of this agent build, reported in `Hello`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the agent's link and spool look like right now, published on a
/// watch channel (and answered on the local socket's `Status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// A broker welcomed this agent on the current connection.
    pub connected: bool,
    /// Highest sequence number the broker acknowledged.
    pub acked_seq: u64,
    /// Highest sequence number written to the spool.
    pub last_seq: u64,
    /// Events in the spool not yet acknowledged.
    pub spooled: u64,
    /// The host takes no new sessions.
    pub draining: bool,
    /// Why the last connection attempt or connection failed, if it did.
    pub last_error: Option<String>,
}

/// Sent by [`run`] once the local socket is bound and the spool is open,
/// before the broker is reached.
#[derive(Debug)]
pub struct AgentReady {
    /// The bound local socket.
    pub local_socket: PathBuf,
    /// The agent's status, updated as it changes.
    pub status: watch::Receiver<LinkStatus>,
    /// Where `GET /metrics` is served (`[metrics] listen`, with the real
    /// port), if it is.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("open spool: {0}")]
    Spool(#[from] spool::SpoolError),
    #[error("load TLS identity: {0}")]
    Tls(#[from] link::TlsError),
    #[error("start local socket: {0}")]
    Local(#[from] local::LocalError),
    #[error("read drain state: {0}")]
    Drain(#[from] commands::CommandError),
    #[error("open ticket state: {0}")]
    Tickets(#[from] ticket::TicketStoreError),
    #[error(transparent)]
    PamLogins(#[from] pam_logins::PamLoginsError),
    #[error("open versions: {0}")]
    Versions(#[from] versions::VersionsError),
    #[error("create state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Locked(#[from] ferry_process::lock::LockError),
    #[error("bind metrics endpoint {addr}: {source}")]
    MetricsBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the agent until `shutdown` is cancelled: opens what it keeps on
/// disk (failing before any socket on bad files), starts the local socket,
/// the enforcer and the link, then waits for shutdown and drains its tasks.
pub async fn run(
    config: AgentConfig,
    shutdown: CancellationToken,
    ready: oneshot::Sender<AgentReady>,
) -> Result<(), AgentError> {
    let config = Arc::new(config);
    // Everything that can fail on bad files fails here, before any socket.
    let (tls, name_check) = link::client_config(&config)?;
    // Held until this function returns: no second agent writes this spool.
    let _state_lock = lock_state_dir(&config)?;
    for left in ferry_process::files::remove_stale_temporaries(&config.state_dir) {
        tracing::info!(file = %left.display(), "removed a temporary file an earlier run left");
    }
    let drain = commands::DrainState::load(&config.state_dir)?;
    let spool = open_spool(&config).await?;
    let (status_tx, status_rx) = watch::channel(LinkStatus {
        draining: drain.is_draining(),
        ..LinkStatus::default()
    });
    let status = Arc::new(status_tx);
    let spool = spool::SpoolHandle::new(spool, status.clone());
    let tracker = TaskTracker::new();
    let tickets = open_tickets(&config).await?;
    let versions = open_versions(&config).await?;
    let policy = policy::PolicyStore::new(config.policy_file.clone());
    let limits = Arc::new(watch::channel(session_limits(&policy).await).0);

    let presence = presence::PresenceBoard::default();
    let (enforcer, enforcer_inputs) = enforce::channel();
    let listener = local::LocalServer::bind(&config.local_socket)?;
    let local_path = listener.path().to_owned();
    let metrics = metrics::AgentMetrics::new();
    let metrics_addr = match config.metrics_listen {
        None => None,
        Some(addr) => {
            let (http, bound) = metrics::bind(addr)
                .await
                .map_err(|source| AgentError::MetricsBind { addr, source })?;
            let (status, spool) = (status_rx.clone(), spool.clone());
            let live = move || {
                let s = status.borrow().clone();
                let oldest = spool.lock().oldest_unacked_at();
                metrics::Live {
                    connected: s.connected,
                    spooled: s.spooled,
                    oldest_unacked_age: oldest
                        .map(|at| {
                            let age = clock::now().0.saturating_sub(at.0);
                            std::time::Duration::from_millis(u64::try_from(age).unwrap_or(0))
                        })
                        .unwrap_or_default(),
                }
            };
            tracker.spawn(metrics::serve(
                http,
                metrics.clone(),
                live,
                shutdown.child_token(),
            ));
            Some(bound)
        }
    };

    let pam = pam_logins::PamLogins::load(&config.state_dir)?;
    let local_state = local::ServerState {
        spool: spool.clone(),
        status: status_rx.clone(),
        resource: config.resource.clone(),
        tickets: tickets.clone(),
        presence: presence.clone(),
        enforcer,
        idle_timeout: config.local_idle_timeout,
        metrics: metrics.clone(),
        pam,
    };
    // Logins whose process exited without closing them end; the first
    // sweep closes those of processes gone while the agent was down.
    tracker.spawn(local::pam_sweep(
        local_state.clone(),
        shutdown.child_token(),
    ));
    tracker.spawn(listener.serve(local_state, shutdown.child_token(), tracker.clone()));
    tracker.spawn(enforce::run(
        enforce::EnforcerTask {
            spool: spool.clone(),
            limits: limits.subscribe(),
            hooks: config.hooks.clone(),
            metrics: metrics.clone(),
            presence: presence.clone(),
        },
        enforcer_inputs,
        shutdown.child_token(),
    ));
    let link = link::Link {
        config: config.clone(),
        tls,
        name_check,
        spool: spool.clone(),
        status: status.clone(),
        drain: drain.clone(),
        policy,
        tickets,
        presence,
        versions,
        limits: limits.clone(),
        updates: Arc::default(),
        tasks: tracker.clone(),
        renew: std::sync::Mutex::default(),
        targets: std::sync::Mutex::default(),
        metrics,
    };
    tracker.spawn(link.run(shutdown.child_token()));
    let notifier = notify::Notifier::from_env();
    notifier.ready(metrics_addr);
    tracker.spawn(notifier.clone().watchdog(shutdown.child_token()));

    // The receiver may be gone (a caller that does not wait); the agent runs anyway.
    let _ = ready.send(AgentReady {
        local_socket: local_path.clone(),
        status: status_rx,
        metrics_addr,
    });
    tracing::info!(socket = %local_path.display(), metrics = ?metrics_addr, "agent ready");

    shutdown.cancelled().await;
    drain_tasks(&notifier, &tracker, &local_path).await;
    Ok(())
}

/// Once shut down: tells systemd, waits for every task, removes the socket.
async fn drain_tasks(notifier: &notify::Notifier, tracker: &TaskTracker, local_path: &Path) {
    notifier.stopping();
    tracing::info!("agent shutting down");
    tracker.close();
    tracker.wait().await;
    let _ = std::fs::remove_file(local_path);
}

/// The state directory, created if needed, and its lock. [`run`] takes it;
/// `ferry-agent run` also holds it while it enrolls, so of two agents
/// started on one directory one is refused before either does anything.
pub fn lock_state_dir(config: &AgentConfig) -> Result<ferry_process::lock::StateLock, AgentError> {
    std::fs::create_dir_all(&config.state_dir).map_err(|source| AgentError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    Ok(ferry_process::lock::StateLock::acquire(&config.state_dir)?)
}

/// The spool in the state directory, opened (and recovered) off the
/// runtime's threads.
async fn open_spool(config: &AgentConfig) -> Result<spool::Spool, AgentError> {
    let state_dir = config.state_dir.clone();
    let spool = tokio::task::spawn_blocking(move || {
        spool::Spool::open(&state_dir, spool::SpoolOptions::default())
    })
    .await
    .map_err(|e| {
        AgentError::Spool(spool::SpoolError::Io {
            op: "open (task failed)",
            path: config.state_dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    })??;
    tracing::info!(
        resource = %config.resource,
        spool_id = spool.spool_id(),
        last_seq = spool.last_seq(),
        spooled = spool.spooled(),
        open_sessions = spool.open_count(),
        "spool open"
    );
    Ok(spool)
}

/// The ticket verifier with its durable used-ticket set.
async fn open_tickets(config: &AgentConfig) -> Result<ticket::TicketVerifier, AgentError> {
    let (state_dir, resource) = (config.state_dir.clone(), config.resource.clone());
    Ok(tokio::task::spawn_blocking(move || {
        ticket::TicketVerifier::open(&state_dir, resource, clock::now())
    })
    .await
    .map_err(|e| {
        AgentError::Tickets(ticket::TicketStoreError::Io {
            op: "open (task failed)",
            path: config.state_dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    })??)
}

/// The durable image and component versions.
async fn open_versions(config: &AgentConfig) -> Result<versions::VersionStore, AgentError> {
    let (state_dir, image) = (config.state_dir.clone(), config.image_version.clone());
    Ok(tokio::task::spawn_blocking(move || {
        versions::VersionStore::open(&state_dir, image, AGENT_VERSION)
    })
    .await
    .map_err(|e| {
        AgentError::Versions(versions::VersionsError::Io {
            op: "open (task failed)",
            path: config.state_dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    })??)
}

/// The session limits of the policy last pushed (the defaults without one).
async fn session_limits(policy: &policy::PolicyStore) -> policy::SessionLimits {
    let policy = policy.clone();
    tokio::task::spawn_blocking(move || policy.session_limits())
        .await
        .unwrap_or_default()
}
