//! Broker configuration: a TOML file with a serde default for every field,
//! validated as a whole so an operator sees every mistake at once, before any
//! socket is opened.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ferry_common::duration::{format_duration, parse_duration};
use rust_decimal::Decimal;
use serde::Deserialize;

use crate::clock::Clock;
use crate::endpoint::EndpointLimits;
use crate::engine::billing::Prices;

/// Environment variable naming the config file when no `--config` is given.
pub const CONFIG_ENV: &str = "FERRY_BROKER_CONFIG";

/// Where the config file is looked for when neither flag nor env names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ferry/broker.toml";

/// Shortest health interval accepted: shorter ones would make agents spend
/// their link on health reports. Tests use a few hundred milliseconds.
const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(50);

/// Longest health interval: past this a dead host stays "available" for too long.
const MAX_HEALTH_INTERVAL: Duration = Duration::from_secs(600);

/// Shortest agent certificate lifetime: renewal starts when a third is
/// left, so shorter ones would renew all the time. Tests use seconds.
const MIN_AGENT_CERT_LIFETIME: Duration = Duration::from_secs(10);

/// Longest agent certificate lifetime: a stolen key is worth at most this.
const MAX_AGENT_CERT_LIFETIME: Duration = Duration::from_secs(366 * 86_400);

/// The broker's validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Directory of the SQLite store (`state_dir/ferry.db`).
    pub state_dir: PathBuf,
    /// Directory holding `ca.pem`, `broker.pem` and `broker-key.pem`.
    pub pki_dir: PathBuf,
    /// UDP address of the QUIC endpoint agents connect to (port 0 picks one).
    pub listen: SocketAddr,
    /// Path of the admin Unix socket (created with mode 0660).
    pub admin_socket: PathBuf,
    /// Group (name or gid) whose members may use the admin socket besides
    /// root and the broker's user; `None`: the broker's own group.
    pub admin_group: Option<String>,
    /// How often agents send health, told to them in `Welcome`.
    pub health_interval: Duration,
    /// Consecutive missed health intervals after which a resource is unavailable.
    pub missed_health_limit: u32,
    /// How long shutdown waits for connections and tasks to finish.
    pub shutdown_grace: Duration,
    /// Lifetime of the agent certificates the broker issues: at enrollment
    /// and when an agent renews its certificate over the link.
    pub agent_cert_lifetime: Duration,
    /// Delivery-group lifecycle, prices and the activation hook.
    pub groups: GroupsConfig,
    /// What unauthenticated peers may hold on the QUIC endpoint: the
    /// defaults of `endpoint` (not set from the file; tests shorten them).
    pub endpoint: EndpointLimits,
    /// Where the broker keeps its records (`[store]`), and with which other
    /// brokers (`[cluster]`).
    pub store: StoreConfig,
    /// The Prometheus endpoint (`[metrics]`).
    pub metrics: MetricsConfig,
    /// The web console (`[console]`); `None`: off (the default).
    pub console: Option<ConsoleConfig>,
}

/// `[metrics]`: where `GET /metrics` is served, if anywhere.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct MetricsConfig {
    /// TCP address of the endpoint (port 0 picks one); `None` (the
    /// default): no endpoint.
    pub listen: Option<SocketAddr>,
    /// Served over TLS with the broker's certificate (`pki_dir`'s
    /// `broker.pem` and `broker-key.pem`); plain HTTP otherwise.
    pub tls: bool,
}

/// `[metrics]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
    tls: bool,
}

fn metrics_of(raw: &RawMetrics, errors: &mut Vec<String>) -> MetricsConfig {
    let listen = raw.listen.as_deref().and_then(|text| match text.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            errors.push(format!(
                "metrics.listen: {text:?} is not an address with a port (e.g. \"127.0.0.1:9464\")"
            ));
            None
        }
    });
    if raw.tls && raw.listen.is_none() {
        errors.push("metrics.tls: set metrics.listen too (tls applies to that endpoint)".into());
    }
    MetricsConfig {
        listen,
        tls: raw.tls,
    }
}

/// `[console]`: the web console the broker serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// TCP address it listens on (port 0 picks one).
    pub listen: SocketAddr,
    /// Served over TLS with the broker's certificate (`pki_dir/broker.pem`).
    pub tls: bool,
    /// Plain HTTP on a non-loopback address is allowed because a TLS
    /// reverse proxy is in front (`behind_proxy = true`).
    pub behind_proxy: bool,
    /// The address people open, used in login links (`public_url`);
    /// `None`: the listen address (the host name when it is a wildcard).
    pub public_url: Option<String>,
    /// How long a console session lasts after its login.
    pub session_ttl: Duration,
}

/// `[console]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawConsole {
    /// `None`: the console is off.
    listen: Option<String>,
    tls: bool,
    behind_proxy: bool,
    public_url: Option<String>,
    session_ttl: Option<String>,
}

/// How long a console session lasts unless `[console] session_ttl` says.
const DEFAULT_CONSOLE_SESSION: Duration = Duration::from_secs(12 * 3600);

fn console_of(raw: &RawConsole, errors: &mut Vec<String>) -> Option<ConsoleConfig> {
    let listen = raw.listen.as_deref()?;
    let listen = match listen.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            errors.push(format!(
                "console.listen: {listen:?} is not an IP address and port (write e.g. \
                 127.0.0.1:8080)"
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    };
    let session_ttl = match raw.session_ttl.as_deref().map(parse_duration) {
        None => DEFAULT_CONSOLE_SESSION,
        Some(Ok(d)) if d >= Duration::from_secs(60) => d,
        Some(Ok(_)) => {
            errors.push("console.session_ttl: must be at least 1m".into());
            DEFAULT_CONSOLE_SESSION
        }
        Some(Err(e)) => {
            errors.push(format!("console.session_ttl: {e}"));
            DEFAULT_CONSOLE_SESSION
        }
    };
    let public_url = match &raw.public_url {
        Some(u)
            if !(u.starts_with("http://") || u.starts_with("https://"))
                || u.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            errors.push(format!(
                "console.public_url: {u:?} is not an http:// or https:// address"
            ));
            None
        }
        other => other.as_ref().map(|u| u.trim_end_matches('/').to_owned()),
    };
    Some(ConsoleConfig {
        listen,
        tls: raw.tls,
        behind_proxy: raw.behind_proxy,
        public_url,
        session_ttl,
    })
}

impl ConsoleConfig {
    /// A console on a non-loopback address is never served in plain HTTP
    /// unless the operator says a TLS proxy is in front.
    fn check(&self, errors: &mut Vec<String>) {
        if !self.listen.ip().is_loopback() && !self.tls && !self.behind_proxy {
            errors.push(format!(
                "console.listen: {} is not a loopback address: serve the console over TLS \
                 (console.tls = true, with the broker's certificate) or put a TLS reverse \
                 proxy in front and say so (console.behind_proxy = true)",
                self.listen
            ));
        }
        if self.behind_proxy
            && !self
                .public_url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"))
        {
            errors.push(
                "console.public_url: behind a proxy the sign-in links must name it: set \
                 console.public_url to the proxy's https:// address (links to the plain \
                 address would carry the sign-in secret unencrypted)"
                    .into(),
            );
        }
        if self.tls && self.behind_proxy {
            errors.push(
                "console.behind_proxy: the console serves TLS itself (console.tls = true); \
                 set one of them"
                    .into(),
            );
        }
    }
}

/// `[store]` and `[cluster]`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum StoreConfig {
    /// `backend = "sqlite"` (the default): `state_dir/ferry.db`, this
    /// broker alone.
    #[default]
    Sqlite,
    /// `backend = "postgres"`: a PostgreSQL database, possibly shared with
    /// other brokers; each group is owned by one broker at a time.
    Postgres {
        /// A libpq connection string or URL (`url`).
        url: String,
        /// The CA (PEM) that signed the PostgreSQL server's certificate
        /// (`ca_cert`): with it the connection uses TLS.
        ca_cert: Option<PathBuf>,
        /// This broker's name among those sharing the database; `None`:
        /// the host name and the listen port.
        broker_id: Option<String>,
        /// Where agents and end users reach this broker (`host:port`);
        /// `None`: the listen address when it names one.
        advertise: Option<String>,
        /// How long a group's lease lasts without renewal.
        lease: Duration,
    },
}

/// `[store]` as written.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawStore {
    backend: String,
    url: Option<String>,
    ca_cert: Option<PathBuf>,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            backend: "sqlite".into(),
            url: None,
            ca_cert: None,
        }
    }
}

/// `[cluster]` as written (PostgreSQL only).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawCluster {
    broker_id: Option<String>,
    advertise: Option<String>,
    /// `None`: [`crate::cluster::DEFAULT_LEASE`].
    lease: Option<String>,
}

/// Shortest lease: a renewal every third of it must fit a database round
/// trip with room to spare.
const MIN_LEASE: Duration = Duration::from_secs(3);

fn store_of(store: &RawStore, cluster: &RawCluster, errors: &mut Vec<String>) -> StoreConfig {
    let lease = match cluster.lease.as_deref().map(parse_duration) {
        None => crate::cluster::DEFAULT_LEASE,
        Some(Ok(d)) if d >= MIN_LEASE => d,
        Some(Ok(d)) => {
            errors.push(format!(
                "cluster.lease: {} is shorter than {}",
                format_duration(d),
                format_duration(MIN_LEASE)
            ));
            MIN_LEASE
        }
        Some(Err(e)) => {
            errors.push(format!("cluster.lease: {e}"));
            MIN_LEASE
        }
    };
    let named = |field: &str, v: &Option<String>, errors: &mut Vec<String>| match v {
        Some(v) if v.trim().is_empty() || v.chars().any(char::is_control) => {
            errors.push(format!("cluster.{field}: {v:?} is empty or not printable"));
            None
        }
        other => other.clone(),
    };
    let broker_id = named("broker_id", &cluster.broker_id, errors);
    let advertise = named("advertise", &cluster.advertise, errors);
    match store.backend.as_str() {
        "sqlite" => {
            if store.url.is_some() || store.ca_cert.is_some() {
                errors.push(
                    "store.url, store.ca_cert: only the postgres backend takes them (set backend \
                     = \"postgres\")"
                        .into(),
                );
            }
            if cluster.broker_id.is_some() || cluster.advertise.is_some() || cluster.lease.is_some()
            {
                errors.push(
                    "cluster: brokers share a PostgreSQL store only (set [store] backend = \
                     \"postgres\")"
                        .into(),
                );
            }
            StoreConfig::Sqlite
        }
        "postgres" => match &store.url {
            Some(url) if !url.trim().is_empty() => {
                // Read as the store reads it; only a connection says more.
                match url.parse::<postgres::Config>() {
                    Err(e) => errors.push(format!(
                        "store.url: not a PostgreSQL connection string ({e}), e.g. \
                         \"host=/run/postgresql dbname=ferry user=ferry\" or \
                         \"postgresql://ferry@db.example.com/ferry\""
                    )),
                    // Without a CA the store connects without TLS: it would
                    // fail at every connection, as if the server could not
                    // be reached.
                    Ok(c)
                        if c.get_ssl_mode() == postgres::config::SslMode::Require
                            && store.ca_cert.is_none() =>
                    {
                        errors.push(
                            "store.url: sslmode=require needs store.ca_cert, the CA (PEM) that \
                             signed the PostgreSQL server's certificate"
                                .into(),
                        )
                    }
                    Ok(_) => {}
                }
                StoreConfig::Postgres {
                    url: url.clone(),
                    ca_cert: store.ca_cert.clone(),
                    broker_id,
                    advertise,
                    lease,
                }
            }
            _ => {
                errors.push(
                    "store.url: the postgres backend needs a connection string, e.g. \
                     \"host=/run/postgresql dbname=ferry user=ferry\""
                        .into(),
                );
                StoreConfig::Sqlite
            }
        },
        other => {
            errors.push(format!(
                "store.backend: {other:?} is not a backend (\"sqlite\" or \"postgres\")"
            ));
            StoreConfig::Sqlite
        }
    }
}

/// Settings of delivery groups (issue 4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupsConfig {
    /// How long an expired subscription is kept before it starts recycling.
    pub retention: Duration,
    /// Currency printed beside every amount.
    pub currency: String,
    /// Unit prices per spec; orders of a spec without a price are refused.
    pub prices: BTreeMap<String, Prices>,
    /// Program and arguments run once per activation notification, with the
    /// details in `FERRY_NOTIFY_*` environment variables; empty = no hook
    /// (notifications wait in the outbox).
    pub notify_command: Vec<String>,
    /// How long one hook run may take before it counts as failed.
    pub notify_timeout: Duration,
    /// Longest wait between two attempts of a failing notification (the wait
    /// doubles from one second up to this).
    pub notify_retry_max: Duration,
    /// Where the group deadlines and the outbox read the time: the system
    /// clock, or a test's manual clock (never set from the file).
    pub clock: Clock,
    /// How elastic resources are created and deleted (`[provisioner]`).
    pub provisioner: ProvisionerConfig,
    /// How long a group waits for a host whose link closed before it ends
    /// the host's sessions (stamped when it was last heard from).
    pub host_gone_after: Duration,
    /// `[provisioner] base = "provisioned"`: a group published with base
    /// resources has them created through the provisioner (status
    /// `publishing` until they register). `false` (`"configured"`, the
    /// default): base resources are agents configured with `group = ...`.
    pub provision_base: bool,
    /// What one user or one address may ask of the route service
    /// (`[routing]`).
    pub routing: RouteLimits,
}

/// `[routing]`: limits that keep one user from taking a group and keep
/// passwords from being guessed at full speed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteLimits {
    /// Most reservations (tickets not used yet) plus waiting requests one
    /// user holds in one group; past it a request is refused `user-limit`.
    /// Sessions already started do not count; in a `shared` group a user's
    /// existing session is given again and counts nothing.
    pub max_requests_per_user: u32,
    /// Most requests waiting for room in one group; past it a waiting
    /// request is refused `waiting-room-full`. 0: nobody waits.
    pub waiting_room: u32,
    /// Failed-login throttling.
    pub login: LoginLimits,
}

impl Default for RouteLimits {
    fn default() -> Self {
        RouteLimits {
            max_requests_per_user: 4,
            waiting_room: 256,
            login: LoginLimits::default(),
        }
    }
}

/// Failed-login throttling (`[routing] login_*`), applied per user and per
/// source address (see `routing::throttle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failures of one user (from any address) before further attempts
    /// from addresses that failed are delayed.
    pub failures_per_user: u32,
    /// Failures from one address (any users) before it is delayed.
    pub failures_per_source: u32,
    /// A failure counts this long after the last one; then the count resets.
    pub failure_window: Duration,
    /// The first delay past the free failures; it doubles with each
    /// further failure up to `max_delay`.
    pub first_delay: Duration,
    /// The longest delay.
    pub max_delay: Duration,
    /// Password checks one address may have in progress at once (token
    /// checks hash nothing and are not capped).
    pub checks_per_source: u32,
    /// Users and addresses tracked each; past it the least recently seen
    /// entry is forgotten.
    pub tracked: u32,
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits {
            failures_per_user: 5,
            failures_per_source: 20,
            failure_window: Duration::from_secs(900),
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            checks_per_source: 16,
            tracked: 10_000,
        }
    }
}

/// `[routing]` as written.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawRouting {
    max_requests_per_user: i64,
    waiting_room: i64,
    login_failures_per_user: i64,
    login_failures_per_source: i64,
    login_failure_window: String,
    login_first_delay: String,
    login_max_delay: String,
    login_checks_per_source: i64,
    login_tracked: i64,
}

impl Default for RawRouting {
    fn default() -> Self {
        RawRouting {
            max_requests_per_user: 4,
            waiting_room: 256,
            login_failures_per_user: 5,
            login_failures_per_source: 20,
            login_failure_window: "15m".into(),
            login_first_delay: "1s".into(),
            login_max_delay: "5m".into(),
            login_checks_per_source: 16,
            login_tracked: 10_000,
        }
    }
}

/// Which provisioner creates and deletes elastic resources (issue 6).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum ProvisionerKind {
    /// None: an elastic resource is a host configured by hand as
    /// `<group>-e<n>`; its agent registering completes the creation.
    #[default]
    None,
    /// Operator commands (argv templates; see `provision::exec`).
    Exec {
        create: Vec<String>,
        delete: Vec<String>,
    },
    /// `ferry-agent run` processes on this machine (demo, tests, trials).
    /// `agent_binary` `None`: `ferry-agent` next to the broker's executable.
    Local { agent_binary: Option<PathBuf> },
}

/// `[provisioner]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvisionerConfig {
    pub kind: ProvisionerKind,
    /// How long one create or delete command may run before it is killed.
    pub timeout: Duration,
    /// Attempts of one create or delete before it is given up and reported.
    pub attempts: u32,
    /// How long a created resource has to register (its token's lifetime);
    /// past it the creation counts as failed and the resource is deleted.
    pub register_timeout: Duration,
    /// `host:port` new agents are told to connect to; `None`: the bound
    /// endpoint (loopback when it listens on every address).
    pub broker_addr: Option<String>,
}

impl Default for ProvisionerConfig {
    fn default() -> Self {
        ProvisionerConfig {
            kind: ProvisionerKind::None,
            timeout: Duration::from_secs(600),
            attempts: 5,
            register_timeout: Duration::from_secs(1800),
            broker_addr: None,
        }
    }
}

/// `[provisioner]` as written.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawProvisioner {
    kind: String,
    create: Vec<String>,
    delete: Vec<String>,
    agent_binary: Option<PathBuf>,
    timeout: String,
    attempts: i64,
    register_timeout: String,
    broker_addr: Option<String>,
    base: String,
}

impl Default for RawProvisioner {
    fn default() -> Self {
        RawProvisioner {
            kind: "none".into(),
            create: Vec::new(),
            delete: Vec::new(),
            agent_binary: None,
            timeout: "10m".into(),
            attempts: 5,
            register_timeout: "30m".into(),
            broker_addr: None,
            base: "configured".into(),
        }
    }
}

impl Default for GroupsConfig {
    fn default() -> Self {
        GroupsConfig {
            retention: Duration::from_secs(7 * 86_400),
            currency: "CNY".into(),
            // The seed document's prices for its one spec.
            prices: BTreeMap::from([(
                "office-4c8g".to_owned(),
                Prices {
                    currency: "CNY".into(),
                    subscription_month: Decimal::from(199),
                    hourly: Decimal::new(726_736, 6),
                },
            )]),
            notify_command: Vec::new(),
            notify_timeout: Duration::from_secs(30),
            notify_retry_max: Duration::from_secs(600),
            clock: Clock::system(),
            provisioner: ProvisionerConfig::default(),
            host_gone_after: Duration::from_secs(600),
            provision_base: false,
            routing: RouteLimits::default(),
        }
    }
}

/// `[prices.SPEC]` as written: decimal strings, never floats.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    subscription_month: String,
    hourly: String,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("parse config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The file as written; every field has a default.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawConfig {
    state_dir: PathBuf,
    pki_dir: PathBuf,
    listen: String,
    admin_socket: PathBuf,
    admin_group: Option<String>,
    health_interval: String,
    missed_health_limit: i64,
    shutdown_grace: String,
    agent_cert_lifetime: String,
    subscription_retention: String,
    host_gone_after: String,
    currency: String,
    prices: BTreeMap<String, RawPrice>,
    notify_command: Vec<String>,
    notify_timeout: String,
    notify_retry_max: String,
    provisioner: RawProvisioner,
    routing: RawRouting,
    store: RawStore,
    cluster: RawCluster,
    metrics: RawMetrics,
    console: RawConsole,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            state_dir: PathBuf::from("/var/lib/ferry"),
            pki_dir: PathBuf::from("/var/lib/ferry/pki"),
            listen: "0.0.0.0:7443".into(),
            admin_socket: PathBuf::from("/run/ferry/admin.sock"),
            admin_group: None,
            health_interval: "10s".into(),
            missed_health_limit: 3,
            shutdown_grace: "10s".into(),
            agent_cert_lifetime: "30d".into(),
            subscription_retention: "7d".into(),
            host_gone_after: "10m".into(),
            currency: "CNY".into(),
            prices: BTreeMap::from([(
                "office-4c8g".to_owned(),
                RawPrice {
                    subscription_month: "199".into(),
                    hourly: "0.726736".into(),
                },
            )]),
            notify_command: Vec::new(),
            notify_timeout: "30s".into(),
            notify_retry_max: "10m".into(),
            provisioner: RawProvisioner::default(),
            routing: RawRouting::default(),
            store: RawStore::default(),
            cluster: RawCluster::default(),
            metrics: RawMetrics::default(),
            console: RawConsole::default(),
        }
    }
}

impl BrokerConfig {
    /// Picks the config file: the flag if given, else `FERRY_BROKER_CONFIG`,
    /// else [`DEFAULT_CONFIG_PATH`].
    pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
        match flag {
            Some(p) => p.to_path_buf(),
            None => std::env::var_os(CONFIG_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
        }
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<BrokerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates config text, reporting every unknown key, wrong
    /// type and invalid value at once; only a TOML syntax error stops earlier.
    pub fn from_toml(text: &str) -> Result<BrokerConfig, ConfigError> {
        let parsed = ferry_process::config_check::parse_all::<RawConfig>(text).map_err(|e| {
            ConfigError::Parse {
                path: PathBuf::new(),
                message: e.to_string(),
            }
        })?;
        let mut errors: Vec<String> = parsed.problems.iter().map(ToString::to_string).collect();
        let Some(raw) = parsed.value else {
            return Err(ConfigError::Invalid(errors));
        };
        let config = Self::from_raw(raw, &mut errors);
        if let Err(ConfigError::Invalid(more)) = config.validate() {
            // Fields that failed to parse were replaced by valid placeholders
            // in `from_raw`, so these are only the other fields' problems.
            errors.extend(more);
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// Converts the file's fields, noting each one that does not parse in
    /// `errors` and putting a valid placeholder in its place.
    fn from_raw(raw: RawConfig, errors: &mut Vec<String>) -> BrokerConfig {
        let listen = listen_of(&raw.listen, errors);
        let d = RawDurations::parse(&raw, errors);
        let kind = provisioner_kind_of(&raw.provisioner, errors);
        let provision_attempts = u32::try_from(raw.provisioner.attempts).unwrap_or(0);
        let provision_base = provision_base_of(&raw.provisioner.base, &kind, errors);
        let prices = prices_of(&raw.prices, &raw.currency, errors);
        let missed_health_limit = missed_health_limit_of(raw.missed_health_limit, errors);
        let routing = routing_of(&raw.routing, errors);
        let store = store_of(&raw.store, &raw.cluster, errors);
        let metrics = metrics_of(&raw.metrics, errors);
        let console = console_of(&raw.console, errors);
        BrokerConfig {
            state_dir: raw.state_dir,
            pki_dir: raw.pki_dir,
            listen: listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            admin_socket: raw.admin_socket,
            admin_group: raw.admin_group.filter(|g| {
                let ok = !g.trim().is_empty() && !g.contains(':');
                if !ok {
                    errors.push(format!(
                        "admin_group: {g:?} is not a group name or gid (leave it out for the \
                         broker's own group)"
                    ));
                }
                ok
            }),
            health_interval: d.health_interval.unwrap_or(MIN_HEALTH_INTERVAL),
            missed_health_limit: missed_health_limit.unwrap_or(1),
            shutdown_grace: d.shutdown_grace.unwrap_or(Duration::ZERO),
            agent_cert_lifetime: d.agent_cert_lifetime.unwrap_or(MIN_AGENT_CERT_LIFETIME),
            groups: GroupsConfig {
                retention: d.retention.unwrap_or(Duration::ZERO),
                host_gone_after: d.host_gone_after.unwrap_or(Duration::ZERO),
                currency: raw.currency,
                prices,
                notify_command: raw.notify_command,
                notify_timeout: d.notify_timeout.unwrap_or(Duration::from_secs(1)),
                notify_retry_max: d.notify_retry_max.unwrap_or(Duration::from_secs(1)),
                clock: Clock::system(),
                provisioner: ProvisionerConfig {
                    kind,
                    timeout: d.provision_timeout.unwrap_or(Duration::from_secs(1)),
                    attempts: provision_attempts,
                    register_timeout: d.register_timeout.unwrap_or(Duration::from_secs(1)),
                    broker_addr: raw.provisioner.broker_addr,
                },
                provision_base,
                routing,
            },
            endpoint: EndpointLimits::default(),
            store,
            metrics,
            console,
        }
    }

    /// Checks the values of a config built in code (tests, `dev`) or parsed
    /// from a file. Every problem is listed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        self.check_paths(&mut errors);
        self.check_health_and_shutdown(&mut errors);
        self.check_cert_lifetime(&mut errors);
        let g = &self.groups;
        if g.currency.trim().is_empty() {
            errors.push("currency: must not be empty".into());
        }
        g.check_notify(&mut errors);
        g.provisioner.check(&mut errors);
        g.check_lifetimes(&mut errors);
        g.routing.check(&mut errors);
        if let Some(console) = &self.console {
            console.check(&mut errors);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// The state, PKI and admin socket paths: not empty, and a socket path
    /// short enough to bind.
    fn check_paths(&self, errors: &mut Vec<String>) {
        let paths = [
            ("state_dir", &self.state_dir),
            ("pki_dir", &self.pki_dir),
            ("admin_socket", &self.admin_socket),
        ];
        for (field, path) in paths {
            if path.as_os_str().is_empty() {
                errors.push(format!("{field}: must not be empty"));
            }
        }
        if self.admin_socket.as_os_str().len() > 100 {
            // sun_path holds 108 bytes on Linux; longer paths cannot be bound.
            errors.push(format!(
                "admin_socket: {} is longer than a Unix socket path may be (about 100 bytes)",
                self.admin_socket.display()
            ));
        }
    }

    /// The health interval, the missed health limit and the shutdown grace.
    fn check_cert_lifetime(&self, errors: &mut Vec<String>) {
        if !(MIN_AGENT_CERT_LIFETIME..=MAX_AGENT_CERT_LIFETIME).contains(&self.agent_cert_lifetime)
        {
            errors.push(format!(
                "agent_cert_lifetime: {} is out of range ({} to {})",
                format_duration(self.agent_cert_lifetime),
                format_duration(MIN_AGENT_CERT_LIFETIME),
                format_duration(MAX_AGENT_CERT_LIFETIME)
            ));
        }
    }

    fn check_health_and_shutdown(&self, errors: &mut Vec<String>) {
        if self.health_interval < MIN_HEALTH_INTERVAL || self.health_interval > MAX_HEALTH_INTERVAL
        {
            errors.push(format!(
                "health_interval: {} is out of range ({} to {})",
                format_duration(self.health_interval),
                format_duration(MIN_HEALTH_INTERVAL),
                format_duration(MAX_HEALTH_INTERVAL)
            ));
        }
        if !(1..=100).contains(&self.missed_health_limit) {
            errors.push(format!(
                "missed_health_limit: {} is out of range (1 to 100)",
                self.missed_health_limit
            ));
        }
        if self.shutdown_grace > Duration::from_secs(600) {
            errors.push(format!(
                "shutdown_grace: {} is longer than 10m",
                format_duration(self.shutdown_grace)
            ));
        }
    }

    /// The health interval in milliseconds as sent in `Welcome` (validated to fit).
    pub fn health_interval_ms(&self) -> u32 {
        u32::try_from(self.health_interval.as_millis()).unwrap_or(u32::MAX)
    }

    /// Path of the SQLite database.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("ferry.db")
    }
}

impl GroupsConfig {
    /// The activation hook: a program name when one is set, its timeout and
    /// its longest retry wait in range.
    fn check_notify(&self, errors: &mut Vec<String>) {
        if self
            .notify_command
            .first()
            .is_some_and(|p| p.trim().is_empty())
        {
            errors.push("notify_command: the program name is empty".into());
        }
        if self.notify_timeout.is_zero() || self.notify_timeout > Duration::from_secs(3600) {
            errors.push(format!(
                "notify_timeout: {} is out of range (above 0, at most 1h)",
                format_duration(self.notify_timeout)
            ));
        }
        if self.notify_retry_max < Duration::from_secs(1)
            || self.notify_retry_max > Duration::from_secs(86_400)
        {
            errors.push(format!(
                "notify_retry_max: {} is out of range (1s to 1d)",
                format_duration(self.notify_retry_max)
            ));
        }
    }

    /// How long a gone host and an expired subscription are kept.
    fn check_lifetimes(&self, errors: &mut Vec<String>) {
        if self.host_gone_after < Duration::from_secs(1)
            || self.host_gone_after > Duration::from_secs(30 * 86_400)
        {
            errors.push(format!(
                "host_gone_after: {} is out of range (1s to 30d)",
                format_duration(self.host_gone_after)
            ));
        }
        if self.retention > Duration::from_secs(366 * 86_400) {
            errors.push(format!(
                "subscription_retention: {} is longer than 366 days",
                format_duration(self.retention)
            ));
        }
    }
}

impl ProvisionerConfig {
    /// What the kind needs (programs for `exec`, a non-empty agent path for
    /// `local`), then the timeouts and attempts in range.
    fn check(&self, errors: &mut Vec<String>) {
        match &self.kind {
            ProvisionerKind::Exec { create, delete } => {
                for (field, argv) in [("create", create), ("delete", delete)] {
                    if argv.first().is_none_or(|p| p.trim().is_empty()) {
                        errors.push(format!(
                            "provisioner.{field}: must name a program (argv template) when kind = \"exec\""
                        ));
                    }
                }
            }
            ProvisionerKind::Local { agent_binary } => {
                if agent_binary
                    .as_ref()
                    .is_some_and(|b| b.as_os_str().is_empty())
                {
                    errors.push("provisioner.agent_binary: empty path".into());
                }
            }
            ProvisionerKind::None => {}
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(3600) {
            errors.push(format!(
                "provisioner.timeout: {} is out of range (above 0, at most 1h)",
                format_duration(self.timeout)
            ));
        }
        if !(1..=100).contains(&self.attempts) {
            errors.push(format!(
                "provisioner.attempts: {} is out of range (1 to 100)",
                self.attempts
            ));
        }
        if self.register_timeout < Duration::from_secs(1)
            || self.register_timeout > Duration::from_secs(86_400)
        {
            errors.push(format!(
                "provisioner.register_timeout: {} is out of range (1s to 1d)",
                format_duration(self.register_timeout)
            ));
        }
    }
}

impl RouteLimits {
    /// Every limit in its range.
    fn check(&self, errors: &mut Vec<String>) {
        let counts = [
            (
                "max_requests_per_user",
                self.max_requests_per_user,
                1,
                1_000,
            ),
            ("waiting_room", self.waiting_room, 0, 100_000),
            (
                "login_failures_per_user",
                self.login.failures_per_user,
                1,
                1_000,
            ),
            (
                "login_failures_per_source",
                self.login.failures_per_source,
                1,
                100_000,
            ),
            (
                "login_checks_per_source",
                self.login.checks_per_source,
                1,
                4_096,
            ),
            ("login_tracked", self.login.tracked, 100, 1_000_000),
        ];
        for (field, value, low, high) in counts {
            if !(low..=high).contains(&value) {
                errors.push(format!(
                    "routing.{field}: {value} is out of range ({low} to {high})"
                ));
            }
        }
        let l = &self.login;
        if l.failure_window < Duration::from_secs(1)
            || l.failure_window > Duration::from_secs(86_400)
        {
            errors.push(format!(
                "routing.login_failure_window: {} is out of range (1s to 1d)",
                format_duration(l.failure_window)
            ));
        }
        if l.first_delay < Duration::from_millis(10) || l.first_delay > Duration::from_secs(3600) {
            errors.push(format!(
                "routing.login_first_delay: {} is out of range (10ms to 1h)",
                format_duration(l.first_delay)
            ));
        }
        if l.max_delay < l.first_delay || l.max_delay > Duration::from_secs(86_400) {
            errors.push(format!(
                "routing.login_max_delay: {} is out of range (login_first_delay to 1d)",
                format_duration(l.max_delay)
            ));
        }
    }
}

/// `[routing]`: counts as `u32` (their ranges are checked by `validate`)
/// and durations, each one that does not convert noted and replaced by its
/// default.
fn routing_of(raw: &RawRouting, errors: &mut Vec<String>) -> RouteLimits {
    let d = RouteLimits::default();
    let mut count = |field: &str, value: i64, default: u32| match u32::try_from(value) {
        Ok(n) => n,
        Err(_) => {
            errors.push(format!("routing.{field}: {value} is out of range"));
            default
        }
    };
    let max_requests_per_user = count(
        "max_requests_per_user",
        raw.max_requests_per_user,
        d.max_requests_per_user,
    );
    let waiting_room = count("waiting_room", raw.waiting_room, d.waiting_room);
    let failures_per_user = count(
        "login_failures_per_user",
        raw.login_failures_per_user,
        d.login.failures_per_user,
    );
    let failures_per_source = count(
        "login_failures_per_source",
        raw.login_failures_per_source,
        d.login.failures_per_source,
    );
    let checks_per_source = count(
        "login_checks_per_source",
        raw.login_checks_per_source,
        d.login.checks_per_source,
    );
    let tracked = count("login_tracked", raw.login_tracked, d.login.tracked);
    let mut duration = |field: &str, value: &str, default: Duration| match parse_duration(value) {
        Ok(v) => v,
        Err(e) => {
            errors.push(format!("routing.{field}: {e}"));
            default
        }
    };
    let failure_window = duration(
        "login_failure_window",
        &raw.login_failure_window,
        d.login.failure_window,
    );
    let first_delay = duration(
        "login_first_delay",
        &raw.login_first_delay,
        d.login.first_delay,
    );
    let max_delay = duration("login_max_delay", &raw.login_max_delay, d.login.max_delay);
    RouteLimits {
        max_requests_per_user,
        waiting_room,
        login: LoginLimits {
            failures_per_user,
            failures_per_source,
            failure_window,
            first_delay,
            max_delay,
            checks_per_source,
            tracked,
        },
    }
}

/// The file's durations, each `None` when it does not parse.
struct RawDurations {
    health_interval: Option<Duration>,
    shutdown_grace: Option<Duration>,
    agent_cert_lifetime: Option<Duration>,
    retention: Option<Duration>,
    host_gone_after: Option<Duration>,
    notify_timeout: Option<Duration>,
    notify_retry_max: Option<Duration>,
    provision_timeout: Option<Duration>,
    register_timeout: Option<Duration>,
}

impl RawDurations {
    /// Parses every duration of `raw`, noting each one that does not parse.
    fn parse(raw: &RawConfig, errors: &mut Vec<String>) -> Self {
        let mut duration = |field: &str, value: &str| match parse_duration(value) {
            Ok(d) => Some(d),
            Err(e) => {
                errors.push(format!("{field}: {e}"));
                None
            }
        };
        RawDurations {
            health_interval: duration("health_interval", &raw.health_interval),
            shutdown_grace: duration("shutdown_grace", &raw.shutdown_grace),
            agent_cert_lifetime: duration("agent_cert_lifetime", &raw.agent_cert_lifetime),
            retention: duration("subscription_retention", &raw.subscription_retention),
            host_gone_after: duration("host_gone_after", &raw.host_gone_after),
            notify_timeout: duration("notify_timeout", &raw.notify_timeout),
            notify_retry_max: duration("notify_retry_max", &raw.notify_retry_max),
            provision_timeout: duration("provisioner.timeout", &raw.provisioner.timeout),
            register_timeout: duration(
                "provisioner.register_timeout",
                &raw.provisioner.register_timeout,
            ),
        }
    }
}

/// `listen`: an IP address and port.
fn listen_of(listen: &str, errors: &mut Vec<String>) -> Option<SocketAddr> {
    match listen.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(format!(
                "listen: {listen:?} is not an IP address and port (write e.g. 0.0.0.0:7443)"
            ));
            None
        }
    }
}

/// `provisioner.kind` with the keys of that kind.
fn provisioner_kind_of(raw: &RawProvisioner, errors: &mut Vec<String>) -> ProvisionerKind {
    match raw.kind.as_str() {
        "none" => ProvisionerKind::None,
        "exec" => ProvisionerKind::Exec {
            create: raw.create.clone(),
            delete: raw.delete.clone(),
        },
        "local" => ProvisionerKind::Local {
            agent_binary: raw.agent_binary.clone(),
        },
        other => {
            errors.push(format!(
                "provisioner.kind: {other:?} is not one of none, exec, local"
            ));
            ProvisionerKind::None
        }
    }
}

/// `provisioner.base`: `true` for `"provisioned"`, which needs a provisioner.
fn provision_base_of(base: &str, kind: &ProvisionerKind, errors: &mut Vec<String>) -> bool {
    let provisioned = match base {
        "configured" => false,
        "provisioned" => true,
        other => {
            errors.push(format!(
                "provisioner.base: {other:?} is not one of configured, provisioned"
            ));
            false
        }
    };
    if provisioned && *kind == ProvisionerKind::None {
        errors.push(
            "provisioner.base: \"provisioned\" needs a provisioner (kind = \"exec\" or \"local\")"
                .into(),
        );
    }
    provisioned
}

/// `[prices.SPEC]`: the specs whose two amounts are non-negative decimals.
fn prices_of(
    raw: &BTreeMap<String, RawPrice>,
    currency: &str,
    errors: &mut Vec<String>,
) -> BTreeMap<String, Prices> {
    let mut prices = BTreeMap::new();
    for (spec, p) in raw {
        let mut dec = |field: &str, v: &str| match Decimal::from_str(v) {
            Ok(d) if d >= Decimal::ZERO => Some(d),
            _ => {
                errors.push(format!(
                    "prices.{spec}.{field}: {v:?} is not a non-negative decimal (write e.g. \"199\" or \"0.726736\")"
                ));
                None
            }
        };
        let month = dec("subscription_month", &p.subscription_month);
        let hourly = dec("hourly", &p.hourly);
        if let (Some(subscription_month), Some(hourly)) = (month, hourly) {
            prices.insert(
                spec.clone(),
                Prices {
                    currency: currency.to_owned(),
                    subscription_month,
                    hourly,
                },
            );
        }
    }
    prices
}

/// `missed_health_limit` as a `u32` (its range is checked by `validate`).
fn missed_health_limit_of(limit: i64, errors: &mut Vec<String>) -> Option<u32> {
    match u32::try_from(limit) {
        Ok(n) => Some(n),
        Err(_) => {
            errors.push(format!(
                "missed_health_limit: {limit} is out of range (1 to 100)"
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = BrokerConfig::from_toml("").expect("defaults are valid");
        assert_eq!(c.listen, "0.0.0.0:7443".parse().expect("addr"));
        assert_eq!(c.health_interval, Duration::from_secs(10));
        assert_eq!(c.missed_health_limit, 3);
        assert_eq!(c.db_path(), PathBuf::from("/var/lib/ferry/ferry.db"));
    }

    #[test]
    fn every_invalid_field_is_reported_at_once() {
        let text = r#"
            listen = "nowhere"
            health_interval = "10 parsecs"
            missed_health_limit = 0
            shutdown_grace = "5"
            state_dir = ""
            agent_cert_lifetime = "3s"
        "#;
        let Err(ConfigError::Invalid(errors)) = BrokerConfig::from_toml(text) else {
            panic!("expected validation errors");
        };
        let joined = errors.join("\n");
        for field in [
            "listen:",
            "health_interval:",
            "missed_health_limit:",
            "shutdown_grace:",
            "state_dir:",
            "agent_cert_lifetime:",
        ] {
            assert!(joined.contains(field), "{field} missing from {joined}");
        }
        assert_eq!(errors.len(), 6, "{joined}");
    }

    #[test]
    fn the_packaged_example_is_valid_and_matches_the_defaults() {
        let text = include_str!("../../packaging/broker.toml");
        assert_eq!(
            BrokerConfig::from_toml(text).expect("example is valid"),
            BrokerConfig::from_toml("").expect("defaults")
        );
    }

    /// The errors of a config that must be refused, joined.
    fn refused(text: &str) -> String {
        match BrokerConfig::from_toml(text) {
            Err(ConfigError::Invalid(errors)) => errors.join("\n"),
            other => panic!("accepted or refused otherwise: {other:?}"),
        }
    }

    #[test]
    fn the_console_is_off_by_default_and_never_plain_on_a_public_address() {
        assert_eq!(BrokerConfig::from_toml("").expect("defaults").console, None);
        let c =
            BrokerConfig::from_toml("[console]\nlisten = \"127.0.0.1:8080\"\n").expect("loopback");
        let console = c.console.expect("on");
        assert_eq!(console.listen, "127.0.0.1:8080".parse().expect("addr"));
        assert!(!console.tls);
        assert_eq!(console.session_ttl, DEFAULT_CONSOLE_SESSION);
        let err = BrokerConfig::from_toml("[console]\nlisten = \"0.0.0.0:8080\"\n")
            .expect_err("plain on every address")
            .to_string();
        assert!(err.contains("console.tls = true"), "{err}");
        for ok in [
            "tls = true",
            "behind_proxy = true\npublic_url = \"https://c.example\"",
        ] {
            let text = format!("[console]\nlisten = \"0.0.0.0:8443\"\n{ok}\n");
            assert!(BrokerConfig::from_toml(&text).is_ok(), "{ok}");
        }
        let err = BrokerConfig::from_toml(
            "[console]\nlisten = \"here\"\npublic_url = \"ftp://x\"\nsession_ttl = \"1s\"\n\
             tls = true\nbehind_proxy = true\n",
        )
        .expect_err("four problems")
        .to_string();
        for part in [
            "console.listen",
            "console.public_url",
            "console.session_ttl",
            "console.behind_proxy",
        ] {
            assert!(err.contains(part), "{part} missing from {err}");
        }
    }

    #[test]
    fn a_postgres_store_takes_its_url_and_cluster_keys() {
        let c = BrokerConfig::from_toml(
            "[store]\nbackend = \"postgres\"\nurl = \"host=/run/postgresql dbname=ferry\"\n\
             [cluster]\nbroker_id = \"b1\"\nadvertise = \"b1.example.com:7443\"\n\
             lease = \"3s\"\n",
        )
        .expect("valid");
        assert_eq!(
            c.store,
            StoreConfig::Postgres {
                url: "host=/run/postgresql dbname=ferry".into(),
                ca_cert: None,
                broker_id: Some("b1".into()),
                advertise: Some("b1.example.com:7443".into()),
                lease: Duration::from_secs(3),
            }
        );
        let c = BrokerConfig::from_toml(
            "[store]\nbackend = \"postgres\"\nurl = \"postgresql://ferry@db/ferry\"\n",
        )
        .expect("valid");
        let StoreConfig::Postgres { lease, .. } = c.store else {
            panic!("postgres: {:?}", c.store);
        };
        assert_eq!(lease, crate::cluster::DEFAULT_LEASE);
        assert_eq!(
            BrokerConfig::from_toml("").expect("defaults").store,
            StoreConfig::Sqlite
        );
    }

    #[test]
    fn store_and_cluster_mistakes_are_refused_naming_the_key() {
        let e = refused("[store]\nbackend = \"mysql\"\n");
        assert!(
            e.contains("store.backend: \"mysql\" is not a backend"),
            "{e}"
        );
        let e = refused("[store]\nbackend = \"postgres\"\n");
        assert!(e.contains("store.url: the postgres backend needs"), "{e}");
        let e = refused("[store]\nbackend = \"postgres\"\nurl = \"  \"\n");
        assert!(e.contains("store.url: the postgres backend needs"), "{e}");
        let e = refused("[store]\nbackend = \"postgres\"\nurl = \"host=db sslmode=require\"\n");
        assert!(
            e.contains("store.url: sslmode=require needs store.ca_cert"),
            "{e}"
        );
        let c = BrokerConfig::from_toml(
            "[store]\nbackend = \"postgres\"\nurl = \"host=db sslmode=require\"\n\
             ca_cert = \"/etc/ferry/pg-ca.pem\"\n",
        )
        .expect("TLS with a CA");
        let StoreConfig::Postgres { ca_cert, .. } = c.store else {
            panic!("postgres: {:?}", c.store);
        };
        assert_eq!(ca_cert, Some(PathBuf::from("/etc/ferry/pg-ca.pem")));
        let e = refused("[store]\nbackend = \"postgres\"\nurl = \"host='unterminated\"\n");
        assert!(
            e.contains("store.url: not a PostgreSQL connection string"),
            "{e}"
        );
        // SQLite (the default backend) is one broker alone: no url, no
        // [cluster] key.
        let e = refused("[store]\nurl = \"host=/run/postgresql\"\n");
        assert!(e.contains("only the postgres backend takes them"), "{e}");
        let e = refused("[store]\nca_cert = \"/etc/ferry/pg-ca.pem\"\n");
        assert!(e.contains("only the postgres backend takes them"), "{e}");
        for key in [
            "broker_id = \"b1\"",
            "advertise = \"b1:7443\"",
            "lease = \"10s\"",
        ] {
            let e = refused(&format!("[cluster]\n{key}\n"));
            assert!(
                e.contains("cluster: brokers share a PostgreSQL store only"),
                "{key}: {e}"
            );
        }
        let pg = "[store]\nbackend = \"postgres\"\nurl = \"host=/run/postgresql\"\n";
        let e = refused(&format!("{pg}[cluster]\nlease = \"2s\"\n"));
        assert!(e.contains("cluster.lease: 2s is shorter than 3s"), "{e}");
        let e = refused(&format!("{pg}[cluster]\nlease = \"soon\"\n"));
        assert!(e.contains("cluster.lease:"), "{e}");
        let e = refused(&format!("{pg}[cluster]\nbroker_id = \" \"\n"));
        assert!(e.contains("cluster.broker_id:"), "{e}");
        let err =
            BrokerConfig::from_toml(&format!("{pg}[cluster]\nleese = \"5s\"\n")).expect_err("typo");
        assert!(err.to_string().contains("leese"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = BrokerConfig::from_toml("listn = \"0.0.0.0:1\"").expect_err("typo");
        assert!(err.to_string().contains("listn"), "{err}");
    }

    #[test]
    fn every_unknown_key_and_wrong_type_is_reported_with_the_other_problems() {
        let Err(ConfigError::Invalid(errors)) = BrokerConfig::from_toml(
            r#"
            listn = "0.0.0.0:1"
            missed_health_limit = "3"
            health_interval = "forever"
            [provisioner]
            kind = "exec"
            attempts = 3.5
            creat = ["/bin/mk"]
            [prices.small]
            subscription_month = 1
            hourly = "1"
            "#,
        ) else {
            panic!("expected validation errors");
        };
        let fields: Vec<&str> = errors
            .iter()
            .map(|e| e.split([' ', ':']).next().unwrap_or(""))
            .collect();
        assert_eq!(
            fields,
            [
                "listn",
                "missed_health_limit",
                "provisioner.attempts",
                "provisioner.creat",
                "prices.small",
                "health_interval",
                "provisioner.create",
                "provisioner.delete",
            ],
            "{errors:#?}"
        );
        assert!(errors[0].contains("(line 2)"), "{errors:#?}");
        assert!(errors[4].contains("(line 9)"), "{errors:#?}");
    }

    #[test]
    fn the_admin_group_defaults_to_the_brokers_own_and_must_be_a_name() {
        let c = BrokerConfig::from_toml("").expect("defaults");
        assert_eq!(c.admin_group, None);
        let err = BrokerConfig::from_toml(r#"admin_group = "a:b""#).expect_err("invalid");
        assert!(err.to_string().contains("admin_group"), "{err}");
    }

    #[test]
    fn a_full_file_parses() {
        let c = BrokerConfig::from_toml(
            r#"
            state_dir = "/tmp/s"
            pki_dir = "/tmp/p"
            listen = "127.0.0.1:0"
            admin_socket = "/tmp/a.sock"
            admin_group = "ferry-ops"
            health_interval = "250ms"
            missed_health_limit = 5
            shutdown_grace = "2s"
            subscription_retention = "1h"
            currency = "EUR"
            notify_command = ["/usr/local/bin/ferry-notify", "--activation"]
            notify_timeout = "5s"
            notify_retry_max = "1m"

            [prices.design-8c16g]
            subscription_month = "300.50"
            hourly = "1.2"
        "#,
        )
        .expect("valid");
        assert_eq!(c.health_interval_ms(), 250);
        assert_eq!(c.admin_group.as_deref(), Some("ferry-ops"));
        assert_eq!(c.missed_health_limit, 5);
        assert_eq!(c.shutdown_grace, Duration::from_secs(2));
        assert_eq!(c.groups.retention, Duration::from_secs(3600));
        assert_eq!(c.groups.notify_command.len(), 2);
        let p = &c.groups.prices["design-8c16g"];
        assert_eq!(p.subscription_month.to_string(), "300.50");
        assert_eq!(p.currency, "EUR");
        assert!(!c.groups.prices.contains_key("office-4c8g"));
    }

    #[test]
    fn a_provisioner_section_parses_and_is_checked() {
        let c = BrokerConfig::from_toml(
            r#"
            [provisioner]
            kind = "exec"
            create = ["/usr/local/bin/mk-vm", "{resource}", "{spec}"]
            delete = ["/usr/local/bin/rm-vm", "{resource}"]
            timeout = "2m"
            attempts = 3
            register_timeout = "15m"
        "#,
        )
        .expect("valid");
        let p = &c.groups.provisioner;
        assert_eq!(p.attempts, 3);
        assert_eq!(p.timeout, Duration::from_secs(120));
        assert_eq!(p.register_timeout, Duration::from_secs(900));
        assert!(matches!(&p.kind, ProvisionerKind::Exec { create, .. } if create.len() == 3));
        let err = BrokerConfig::from_toml("[provisioner]\nkind = \"exec\"\nattempts = 0\n")
            .expect_err("invalid");
        let text = err.to_string();
        for field in [
            "provisioner.create",
            "provisioner.delete",
            "provisioner.attempts",
        ] {
            assert!(text.contains(field), "{field} missing from {text}");
        }
        let err = BrokerConfig::from_toml("[provisioner]\nkind = \"cloud\"\n").expect_err("kind");
        assert!(err.to_string().contains("provisioner.kind"), "{err}");
    }

    #[test]
    fn provisioned_base_resources_need_a_provisioner() {
        let c = BrokerConfig::from_toml(
            "[provisioner]\nkind = \"exec\"\ncreate = [\"c\"]\ndelete = [\"d\"]\nbase = \"provisioned\"\n",
        )
        .expect("valid");
        assert!(c.groups.provision_base);
        assert!(
            !BrokerConfig::from_toml("")
                .expect("defaults")
                .groups
                .provision_base
        );
        let err = BrokerConfig::from_toml("[provisioner]\nbase = \"provisioned\"\n")
            .expect_err("no provisioner")
            .to_string();
        assert!(
            err.contains("provisioner.base") && err.contains("needs a provisioner"),
            "{err}"
        );
        let err = BrokerConfig::from_toml("[provisioner]\nbase = \"cloud\"\n")
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("not one of configured, provisioned"), "{err}");
    }

    #[test]
    fn the_metrics_endpoint_is_off_by_default_and_its_address_is_checked() {
        let c = BrokerConfig::from_toml("").expect("defaults");
        assert_eq!(c.metrics, MetricsConfig::default());
        let c = BrokerConfig::from_toml("[metrics]\nlisten = \"127.0.0.1:0\"\ntls = true\n")
            .expect("valid");
        assert_eq!(c.metrics.listen, Some("127.0.0.1:0".parse().expect("addr")));
        assert!(c.metrics.tls);
        let e = BrokerConfig::from_toml("[metrics]\nlisten = \"nowhere\"\n")
            .expect_err("bad address")
            .to_string();
        assert!(e.contains("metrics.listen: \"nowhere\""), "{e}");
        // The packaged example, uncommented, is valid.
        let commented = "#[metrics]\n#listen = \"127.0.0.1:9464\"\n#tls = false\n";
        let text = include_str!("../../packaging/broker.toml");
        assert!(text.contains(commented), "the example's [metrics] changed");
        let example = text.replace(commented, &commented.replace('#', ""));
        let c = BrokerConfig::from_toml(&example).expect("the example's [metrics]");
        assert_eq!(
            c.metrics.listen,
            Some("127.0.0.1:9464".parse().expect("addr"))
        );
        let e = BrokerConfig::from_toml("[metrics]\ntls = true\n")
            .expect_err("tls without listen")
            .to_string();
        assert!(e.contains("metrics.tls:"), "{e}");
    }

    #[test]
    fn routing_limits_parse_and_every_problem_is_reported() {
        let c = BrokerConfig::from_toml(
            "[routing]\nmax_requests_per_user = 2\nwaiting_room = 10\nlogin_max_delay = \"1m\"\n",
        )
        .expect("valid");
        assert_eq!(c.groups.routing.max_requests_per_user, 2);
        assert_eq!(c.groups.routing.waiting_room, 10);
        assert_eq!(c.groups.routing.login.max_delay, Duration::from_secs(60));
        let Err(ConfigError::Invalid(errors)) = BrokerConfig::from_toml(
            r#"
            [routing]
            max_requests_per_user = 0
            waiting_room = -1
            login_failures_per_user = 0
            login_failure_window = "soon"
            login_first_delay = "2m"
            login_max_delay = "1m"
            login_tracked = 5
            "#,
        ) else {
            panic!("expected validation errors");
        };
        let joined = errors.join("\n");
        for field in [
            "routing.max_requests_per_user:",
            "routing.waiting_room:",
            "routing.login_failures_per_user:",
            "routing.login_failure_window:",
            "routing.login_max_delay:",
            "routing.login_tracked:",
        ] {
            assert!(joined.contains(field), "{field} missing from {joined}");
        }
        assert_eq!(errors.len(), 6, "{joined}");
    }

    #[test]
    fn prices_are_decimal_strings() {
        let err =
            BrokerConfig::from_toml("[prices.x]\nsubscription_month = \"abc\"\nhourly = \"-1\"\n")
                .expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("prices.x.subscription_month"), "{text}");
        assert!(text.contains("prices.x.hourly"), "{text}");
        // A float is not a price.
        assert!(
            BrokerConfig::from_toml("[prices.x]\nsubscription_month = 1.5\nhourly = \"1\"\n")
                .is_err()
        );
    }
}
