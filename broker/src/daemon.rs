//! `ferry-broker run`: builds every part of the broker once and wires them
//! under one shutdown tree.
//!
//! It takes the state-directory lock, loads the PKI and the signing keys,
//! opens the `Store`, binds the QUIC endpoint and the admin socket before
//! anything runs, then builds the `Registry` of live connections, the
//! provisioning, one `GroupService`, `Ota` (whose rollout `Board` the
//! actors wake), the `GroupActors` (given the store, the registry, the
//! provisioning and the board) and the `Groups` facade (service and
//! actors: its write verbs bring the group's actor in line
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
use crate::cluster::{ClusterSettings, Ownership};
use crate::config::{BrokerConfig, ConfigError, StoreConfig};
use crate::endpoint::{self, Services};
use crate::groups::actor::ActorError;
use crate::groups::{self, ActorsParts, GroupActors, GroupService, Groups};
use crate::link::{self, LinkContext};
use crate::notify;
use crate::ota::Ota;
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
    /// Where `GET /metrics` is served (`[metrics] listen`, with the real
    /// port), if it is.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the web console listens; `None` when it is off.
    pub console_addr: Option<SocketAddr>,
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
    /// The PostgreSQL database of `[store] url` did not answer at start.
    #[error(
        "the PostgreSQL database {database} cannot be reached: {detail}; start it, or correct \
         the [store] url in the configuration (a service manager starts the broker again)"
    )]
    StoreUnreachable { database: String, detail: String },
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
    #[error("bind metrics endpoint {addr}: {error}")]
    MetricsBind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("metrics endpoint TLS ([metrics] tls): {0}")]
    MetricsTls(PkiError),
    #[error("load delivery groups: {0}")]
    Groups(ActorError),
    #[error("provisioner: {0}")]
    Provision(#[from] crate::provision::ProvisionError),
    #[error("console: {0}")]
    Console(#[from] crate::console::ConsoleError),
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
    for left in ferry_process::files::remove_stale_temporaries(&config.state_dir) {
        tracing::info!(file = %left.display(), "removed a temporary file an earlier run left");
    }
    let keys = Keys::load(&config)?;
    let store = match &config.store {
        StoreConfig::Sqlite => Store::open(&config.db_path(), StoreOptions::default())?,
        StoreConfig::Postgres { url, ca_cert, .. } => open_postgres(url, ca_cert.as_deref())?,
    };
    let tracker = TaskTracker::new();
    let tasks = shutdown.child_token();
    let (endpoint, agent_addr, (metrics_addr, console_addr)) =
        match start(&config, keys, &store, &tracker, &tasks).await {
            Ok(started) => started,
            Err(e) => {
                store.close().await;
                return Err(e);
            }
        };
    if let Some(period) = notify::watchdog_period() {
        tracker.spawn(notify::watchdog(period, tasks.clone()));
    }
    tracing::info!(%agent_addr, admin_socket = %config.admin_socket.display(),
        metrics = ?metrics_addr, "broker ready");
    let _ = ready.send(BrokerReady {
        agent_addr,
        admin_socket: config.admin_socket.clone(),
        metrics_addr,
        console_addr,
    });
    notify::ready(agent_addr, metrics_addr);

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

/// The PostgreSQL store at `url` (over TLS with `ca_cert`); a database
/// that does not answer is said as such (not as a write that failed).
fn open_postgres(url: &str, ca_cert: Option<&std::path::Path>) -> Result<Store, BrokerError> {
    Store::open_postgres_tls(url, ca_cert, StoreOptions::default()).map_err(|e| match e {
        StoreError::Unreachable { database, detail } => {
            BrokerError::StoreUnreachable { database, detail }
        }
        other => BrokerError::Store(other),
    })
}

/// Who this broker is among the brokers sharing its PostgreSQL store;
/// `None` on SQLite (alone). Its name defaults to the host name and the
/// port, its advertised address to the address it listens on (the host name
/// when that is a wildcard).
fn cluster_settings(config: &BrokerConfig, agent_addr: SocketAddr) -> Option<ClusterSettings> {
    let StoreConfig::Postgres {
        broker_id,
        advertise,
        lease,
        ..
    } = &config.store
    else {
        return None;
    };
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let port = agent_addr.port();
    Some(ClusterSettings {
        broker_id: broker_id
            .clone()
            .unwrap_or_else(|| format!("{host}:{port}")),
        advertise: advertise.clone().unwrap_or_else(|| {
            if agent_addr.ip().is_unspecified() {
                format!("{host}:{port}")
            } else {
                agent_addr.to_string()
            }
        }),
        lease: *lease,
    })
}

/// The keys the broker serves with, from `pki_dir`.
struct Keys {
    server_config: quinn::ServerConfig,
    /// Signs tickets (created on first start, 0600, when `ferryctl pki
    /// init` did not).
    tickets: Arc<TicketSigner>,
    /// Signs users' tokens.
    token_key: Arc<TokenKey>,
}

impl Keys {
    fn load(config: &BrokerConfig) -> Result<Keys, BrokerError> {
        let mut server_config = pki::server_config(&config.pki_dir)?;
        // A dead agent (or a dead broker, seen from the agent) is noticed
        // within about one health interval, not after the client's 30 s.
        server_config.transport_config(Arc::new(
            ferry_common::transport::agent_link_transport_for(config.health_interval),
        ));
        Ok(Keys {
            server_config,
            tickets: Arc::new(TicketSigner::load_or_create(&config.pki_dir)?),
            token_key: Arc::new(TokenKey::load_or_create(&config.pki_dir)?),
        })
    }
}

/// Where the metrics endpoint and the console listen, when they are on.
type WebAddrs = (Option<SocketAddr>, Option<SocketAddr>);

/// Binds the QUIC endpoint, the admin socket, the metrics endpoint and the
/// console, builds the broker's parts once ([`Broker::build`]) and starts
/// its services; returns the endpoint, the address agents connect to and
/// the metrics endpoint's and the console's. On an error nothing keeps
/// running.
async fn start(
    config: &BrokerConfig,
    keys: Keys,
    store: &Store,
    tracker: &TaskTracker,
    tasks: &CancellationToken,
) -> Result<(quinn::Endpoint, SocketAddr, WebAddrs), BrokerError> {
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
        Some(keys.server_config.clone()),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_err)?;
    let started = async {
        let agent_addr = endpoint.local_addr().map_err(bind_err)?;
        let access = admin::access::AdminAccess::for_process(config.admin_group.as_deref())
            .map_err(AdminSocketError::from)?;
        let listener = admin::bind(&config.admin_socket)?;
        admin::set_group(&config.admin_socket, &access)?;
        let metrics = bind_metrics(config).await?;
        let metrics_addr = metrics.as_ref().map(|server| server.addr());
        let console = match &config.console {
            Some(c) => Some(crate::console::Bound::bind(c, &config.pki_dir).await?),
            None => None,
        };
        let console_addr = console.as_ref().map(crate::console::Bound::addr);
        let broker = Broker::build(config, &keys, store, agent_addr, tracker, tasks).await?;
        broker.serve(
            config,
            keys,
            endpoint.clone(),
            (listener, access),
            (metrics, console),
        );
        Ok((agent_addr, (metrics_addr, console_addr)))
    }
    .await;
    match started {
        Ok((agent_addr, web)) => Ok((endpoint, agent_addr, web)),
        Err(e) => {
            tasks.cancel();
            endpoint.close(0u32.into(), b"startup failed");
            Err(e)
        }
    }
}

/// The `[metrics]` endpoint, bound (with its TLS configuration read) when
/// one is configured.
async fn bind_metrics(
    config: &BrokerConfig,
) -> Result<Option<crate::scrape::MetricsServer>, BrokerError> {
    let Some(addr) = config.metrics.listen else {
        return Ok(None);
    };
    let tls = match config.metrics.tls {
        true => Some(
            crate::pki::https_server_config(&config.pki_dir).map_err(BrokerError::MetricsTls)?,
        ),
        false => None,
    };
    crate::scrape::MetricsServer::bind(addr, tls)
        .await
        .map(Some)
        .map_err(|error| BrokerError::MetricsBind { addr, error })
}

/// The broker's parts, built once and handed to its services: ownership
/// goes one way (groups → actors → registry and store), nothing points back.
struct Broker {
    store: Store,
    /// Live connections.
    registry: Arc<Registry>,
    /// The groups: their service and their actors.
    groups: Groups,
    ota: Ota,
    /// Who this broker is among those sharing its store; `None` alone.
    cluster: Option<ClusterSettings>,
    tracker: TaskTracker,
    tasks: CancellationToken,
}

impl Broker {
    /// Builds the provisioning, the one group service, the actors (started:
    /// the first agent to register finds its group), OTA and the rollouts.
    async fn build(
        config: &BrokerConfig,
        keys: &Keys,
        store: &Store,
        agent_addr: SocketAddr,
        tracker: &TaskTracker,
        tasks: &CancellationToken,
    ) -> Result<Broker, BrokerError> {
        let registry = Arc::new(Registry::new());
        let provisioning = provisioning(config, agent_addr, tracker, tasks)?;
        let service = GroupService::new(store.clone(), config.groups.clone())
            .with_token_key(keys.token_key.clone());
        let ota = Ota::new(store.clone(), config.groups.clock.clone());
        let cluster = cluster_settings(config, agent_addr);
        let ownership = match &cluster {
            Some(settings) => {
                store.fences().enable(&settings.broker_id);
                Ownership::shared(&settings.broker_id)
            }
            None => Ownership::everything(),
        };
        let actors = GroupActors::new(ActorsParts {
            store: store.clone(),
            registry: registry.clone(),
            service: service.clone(),
            provisioning,
            rollouts: ota.board().clone(),
            tracker: tracker.clone(),
            shutdown: tasks.clone(),
            ownership: ownership.clone(),
        });
        let n = actors.start_all().await.map_err(BrokerError::Groups)?;
        tracing::info!(groups = n, "group actors started");
        if let Some(settings) = cluster.clone() {
            // Actors of the groups whose leases this broker takes start
            // as it takes them; it hands them over when it stops.
            tracing::info!(broker = %settings.broker_id, advertise = %settings.advertise,
                lease = ?settings.lease, "sharing the store with other brokers");
            tracker.spawn(crate::cluster::keep_leases(
                store.clone(),
                registry.clone(),
                actors.clone(),
                settings,
                tasks.clone(),
            ));
        }
        // Image updates and OTA rollouts: running ones resume.
        tracker.spawn(crate::rollout::run(
            ota.clone(),
            registry.clone(),
            actors.clone(),
            crate::rollout::Settings::default(),
            tasks.clone(),
        ));
        Ok(Broker {
            store: store.clone(),
            registry,
            groups: Groups::new(service, actors),
            ota,
            cluster,
            tracker: tracker.clone(),
            tasks: tasks.clone(),
        })
    }

    /// Starts the services: on the endpoint the agent link, enrollment and
    /// routing; the admin socket; the metrics endpoint and the web console
    /// when they are on; the delivery of activation notifications.
    fn serve(
        self,
        config: &BrokerConfig,
        keys: Keys,
        endpoint: quinn::Endpoint,
        (listener, access): (tokio::net::UnixListener, admin::access::AdminAccess),
        (metrics, console): (
            Option<crate::scrape::MetricsServer>,
            Option<crate::console::Bound>,
        ),
    ) {
        let (tracker, tasks) = (&self.tracker, &self.tasks);
        // Brokers sharing a store forward to each other the operator's
        // requests that need a group's owner.
        let peers = match &self.cluster {
            None => None,
            Some(_) => match crate::peer::Peers::new(&config.pki_dir) {
                Ok(peers) => Some((peers.key().clone(), Arc::new(peers))),
                Err(e) => {
                    tracing::error!(error = %e,
                        "requests for groups served by other brokers will not be forwarded");
                    None
                }
            },
        };
        let admin_ctx = AdminContext {
            store: self.store.clone(),
            registry: self.registry.clone(),
            groups: self.groups.clone(),
            ota: self.ota.clone(),
            cluster: self.cluster.clone(),
            peers: peers.as_ref().map(|(_, p)| p.clone()),
            console: console
                .as_ref()
                .map(|c| Arc::new(c.issuer()) as Arc<dyn admin::ConsoleLinks>),
        };
        if let Some(console) = console {
            console.serve(admin_ctx.clone(), tracker, tasks.clone());
        }
        let services = Services {
            agent: Some(Arc::new(link::AgentLink::new(LinkContext {
                store: self.store.clone(),
                registry: self.registry.clone(),
                health_interval: config.health_interval,
                missed_health_limit: config.missed_health_limit,
                tracker: tracker.clone(),
                tickets: Some(keys.tickets.clone()),
                clock: config.groups.clock.clone(),
                actors: Some(self.groups.actors().clone()),
                pki_dir: config.pki_dir.clone(),
                cert_lifetime: config.agent_cert_lifetime,
                ownership: self.groups.actors().ownership().clone(),
            }))),
            // Enrollment of new hosts with a one-time token.
            enroll: Some(Arc::new(
                crate::enroll::EnrollService::new(
                    self.store.clone(),
                    &config.pki_dir,
                    config.groups.clock.clone(),
                    config.agent_cert_lifetime,
                )
                .with_limits(&config.endpoint),
            )),
            // End users asking for sessions: the group's actor admits.
            route: Some(Arc::new(crate::routing::RouteService::new(
                self.groups.service().clone(),
                self.groups.actors().clone(),
                self.store.clone(),
                keys.tickets,
                &config.endpoint,
                self.registry.clone(),
            ))),
            peer: peers.map(|(key, _)| {
                Arc::new(crate::admin::peer_service::PeerService::new(
                    admin_ctx.clone(),
                    key,
                )) as Arc<dyn crate::endpoint::EndpointService>
            }),
        };
        tracker.spawn(endpoint::serve(
            endpoint,
            services,
            config.endpoint.clone(),
            tracker.clone(),
            tasks.clone(),
        ));
        // Lifecycle deadlines (expiry, auto-renew, recycling) are applied by
        // the actors' lifecycle follower, started by `start_all`.
        tracker.spawn(groups::tasks::deliver_notifications(
            self.groups.service().clone(),
            config.groups.clone(),
            self.groups.actors().ownership().clone(),
            tasks.clone(),
        ));
        tracker.spawn(admin::serve(
            listener,
            admin_ctx,
            access,
            tasks.clone(),
            tracker.clone(),
        ));
        if let Some(server) = metrics {
            // Gauges are read from the live state at each scrape.
            let (actors, registry, store) = (
                self.groups.actors().clone(),
                self.registry.clone(),
                self.store.clone(),
            );
            let live = move || {
                let (actors, registry, store) = (actors.clone(), registry.clone(), store.clone());
                async move { crate::scrape::read_live(&actors, &registry, &store).await }
            };
            tracker.spawn(server.serve(self.store.metrics().clone(), live, tasks.clone()));
        }
    }
}

/// The provisioner of elastic resources, if one is configured; its local
/// agents are stopped when the broker stops (and killed when it is
/// dropped, at the latest).
fn provisioning(
    config: &BrokerConfig,
    agent_addr: SocketAddr,
    tracker: &TaskTracker,
    tasks: &CancellationToken,
) -> Result<Option<Arc<crate::provision::Provisioning>>, BrokerError> {
    let provisioning = crate::provision::build(
        &config.groups.provisioner,
        &config.state_dir,
        &config.pki_dir.join(pki::CA_CERT),
        crate::provision::advertised_addr(&config.groups.provisioner, agent_addr),
    )?;
    if let Some(p) = &provisioning {
        tracing::info!(kind = p.provisioner.kind(), "provisioner ready");
        let (stop, p) = (tasks.clone(), p.clone());
        tracker.spawn(async move {
            stop.cancelled().await;
            p.provisioner.shutdown().await;
        });
    }
    Ok(provisioning)
}
