//! `ferry-broker run`: builds every part of the broker once and wires them
//! under one shutdown tree.
//!
//! In order: the state-directory lock, the PKI and the signing keys, the
//! `Store`, the QUIC endpoint and the admin socket (bound before anything
//! runs), the `Registry` of live connections, the rollout `Board`, `Ota`,
//! the provisioning, one `GroupService`, the `GroupActors` (given the store,
//! the registry, the provisioning and the board) and the `Groups` facade
//! (service and actors: its write verbs bring the group's actor in line
//! themselves). These are handed to the services that use them: the agent
//! link, the route service and enrollment on the endpoint, the rollout
//! timer, the notification outbox and the admin socket. Ownership flows one
//! way (daemon, facade, actors, registry and store); nothing points back, so
//! nothing is set after construction.
//!
//! Shutdown: a cancelled token stops every task (tracked), agents are told
//! `Refused(ShuttingDown)`, tasks get `shutdown_grace`, the endpoint closes
//! and the store commits what is queued.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminContext, AdminSocketError};
use crate::config::{BrokerConfig, ConfigError};
use crate::endpoint::{self, Services};
use crate::groups::actor::ActorError;
use crate::groups::{self, GroupActors, GroupService};
use crate::link::{self, LinkContext};
use crate::notify;
use crate::pki::{self, PkiError};
use crate::registry::Registry;
use crate::store::{Store, StoreError, StoreOptions};
use crate::tickets::{KeyError, TicketSigner, TokenKey};

/// Sent once the QUIC endpoint and the admin socket are bound.
#[derive(Clone, Debug)]
pub struct BrokerReady {
    /// Where agents connect (the real port when the config asked for port 0).
    pub agent_addr: SocketAddr,
    /// The admin socket path.
    pub admin_socket: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "load PKI: {0}; pki_dir must hold ca.pem, broker.pem and broker-key.pem (`ferryctl pki \
         init --dir PKI_DIR --broker-name NAME` creates them)"
    )]
    Pki(#[from] PkiError),
    #[error("load ticket or token key: {0}")]
    Keys(#[from] KeyError),
    #[error("open store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Locked(#[from] ferry_process::lock::LockError),
    #[error("create state directory {path}: {error}")]
    StateDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("bind agent endpoint {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("admin socket: {0}")]
    Admin(#[from] AdminSocketError),
    #[error("load delivery groups: {0}")]
    Groups(ActorError),
    #[error("provisioner: {0}")]
    Provision(#[from] crate::provision::ProvisionError),
}

/// Runs the broker until `shutdown` is cancelled, then drains: agents are
/// told `Refused(ShuttingDown)`, tasks get `shutdown_grace` to finish, the
/// store commits what is queued. `ready` is sent after both listeners are bound.
pub async fn run(
    config: BrokerConfig,
    shutdown: CancellationToken,
    ready: oneshot::Sender<BrokerReady>,
) -> Result<(), BrokerError> {
    config.validate()?;
    std::fs::create_dir_all(&config.state_dir).map_err(|error| BrokerError::StateDir {
        path: config.state_dir.clone(),
        error,
    })?;
    // Held until this function returns: no second broker writes this store.
    let _state_lock = ferry_process::lock::StateLock::acquire(&config.state_dir)?;
    let mut server_config = pki::server_config(&config.pki_dir)?;
    // A dead agent (or a dead broker, seen from the agent) is noticed within
    // about one health interval, not after the client's 30 s.
    server_config.transport_config(Arc::new(ferry_common::transport::agent_link_transport_for(
        config.health_interval,
    )));
    // Created on first start (0600) when `ferryctl pki init` did not.
    let tickets = Arc::new(TicketSigner::load_or_create(&config.pki_dir)?);
    let token_key = Arc::new(TokenKey::load_or_create(&config.pki_dir)?);
    let store = Store::open(&config.db_path(), StoreOptions::default())?;
    let bind_err = |error| BrokerError::Bind {
        addr: config.listen,
        error,
    };
    // Keys that survive restarts, so agents of a crashed broker learn of it
    // at once (see `pki::endpoint_config`).
    let endpoint_config = pki::endpoint_config(&config.pki_dir)?;
    let socket = std::net::UdpSocket::bind(config.listen).map_err(bind_err)?;
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_err)?;
    let agent_addr = endpoint.local_addr().map_err(|error| BrokerError::Bind {
        addr: config.listen,
        error,
    })?;
    let listener = match admin::bind(&config.admin_socket) {
        Ok(l) => l,
        Err(e) => {
            endpoint.close(0u32.into(), b"startup failed");
            store.close().await;
            return Err(e.into());
        }
    };

    let registry = Arc::new(Registry::new());
    let tracker = TaskTracker::new();
    let tasks = shutdown.child_token();
    let link_ctx = LinkContext {
        store: store.clone(),
        registry: registry.clone(),
        health_interval: config.health_interval,
        missed_health_limit: config.missed_health_limit,
        tracker: tracker.clone(),
        tickets: Some(tickets.clone()),
        clock: config.groups.clock.clone(),
    };
    let mut services = Services {
        agent: Some(Arc::new(link::AgentLink::new(link_ctx))),
        ..Services::default()
    };
    // Enrollment of new hosts with a one-time token (issue 6).
    services.enroll = Some(Arc::new(crate::enroll::EnrollService::new(
        store.clone(),
        &config.pki_dir,
        config.groups.clock.clone(),
    )));
    // Group actors first, so the first agent to register finds its group.
    let actors = GroupActors::new(
        store.clone(),
        &registry,
        &config.groups,
        tracker.clone(),
        tasks.clone(),
    );
    // The provisioner of elastic resources; its local agents are stopped
    // when the broker stops (and killed when it is dropped, at the latest).
    let provisioning = crate::provision::build(
        &config.groups.provisioner,
        &config.state_dir,
        &config.pki_dir.join(pki::CA_CERT),
        crate::provision::advertised_addr(&config.groups.provisioner, agent_addr),
    );
    match provisioning {
        Ok(Some(p)) => {
            tracing::info!(kind = p.provisioner.kind(), "provisioner ready");
            actors.set_provisioning(p.clone());
            let stop = tasks.clone();
            tracker.spawn(async move {
                stop.cancelled().await;
                p.provisioner.shutdown().await;
            });
        }
        Ok(None) => {}
        Err(e) => {
            endpoint.close(0u32.into(), b"startup failed");
            store.close().await;
            return Err(e.into());
        }
    }
    registry.set_groups(actors.clone());
    match actors.start_all().await {
        Ok(n) => tracing::info!(groups = n, "group actors started"),
        Err(e) => {
            endpoint.close(0u32.into(), b"startup failed");
            store.close().await;
            return Err(BrokerError::Groups(e));
        }
    }
    // OTA rollouts (issue 7): the timer of the schedules, next to the actors
    // it drains and undrains resources through; running rollouts resume.
    let ota = crate::ota::Ota::new(store.clone(), config.groups.clock.clone());
    actors.set_ota(ota.clone());
    tracker.spawn(crate::rollout::run(
        ota,
        registry.clone(),
        actors.clone(),
        crate::rollout::Settings::default(),
        tasks.clone(),
    ));
    // End users asking for sessions (issue 5): the group's actor admits.
    services.route = Some(Arc::new(crate::routing::RouteService::new(
        GroupService::new(store.clone(), config.groups.clone()).with_token_key(token_key.clone()),
        actors.clone(),
        store.clone(),
        tickets.clone(),
    )));
    tracker.spawn(endpoint::serve(
        endpoint.clone(),
        services,
        tracker.clone(),
        tasks.clone(),
    ));
    let groups = GroupService::new(store.clone(), config.groups.clone()).with_token_key(token_key);
    // Lifecycle deadlines (expiry, auto-renew, recycling) are applied by the
    // actors' `follow_lifecycle` task, started by `start_all` above, which also
    // brings each group's actor in line with its new status.
    tracker.spawn(groups::tasks::deliver_notifications(
        groups.clone(),
        config.groups.clone(),
        tasks.clone(),
    ));
    let admin_ctx = AdminContext {
        store: store.clone(),
        registry,
        groups,
    };
    tracker.spawn(admin::serve(
        listener,
        admin_ctx,
        tasks.clone(),
        tracker.clone(),
    ));
    if let Some(period) = notify::watchdog_period() {
        tracker.spawn(notify::watchdog(period, tasks.clone()));
    }

    tracing::info!(%agent_addr, admin_socket = %config.admin_socket.display(), "broker ready");
    let _ = ready.send(BrokerReady {
        agent_addr,
        admin_socket: config.admin_socket.clone(),
    });
    notify::ready(agent_addr);

    shutdown.cancelled().await;
    notify::stopping();
    tracing::info!("broker draining");
    tasks.cancel();
    tracker.close();
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "tasks still running after shutdown_grace ({:?}); closing connections",
            config.shutdown_grace
        );
    }
    endpoint.close(endpoint::close_code::DONE.into(), b"broker stopped");
    let _ = tokio::time::timeout(endpoint::REFUSAL_LINGER, endpoint.wait_idle()).await;
    store.close().await;
    if let Err(e) = std::fs::remove_file(&config.admin_socket) {
        tracing::debug!("remove admin socket: {e}");
    }
    tracing::info!("broker stopped");
    Ok(())
}
