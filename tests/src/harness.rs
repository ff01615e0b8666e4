//! An in-process Ferry: a real broker (`ferry_broker::daemon::run`) and real
//! agents (`ferry_agent::run`) as tokio tasks of the test, on `127.0.0.1:0`,
//! with their files in a temp dir the caller owns.
//!
//! Everything waits on readiness signals: `BrokerReady` and `AgentReady`
//! oneshots at start, the agent's `LinkStatus` watch channel afterwards.
//! [`PATIENCE`] only bounds a wait so a broken test fails instead of hanging;
//! it is never a way to give something time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ferry_agent::config::HooksConfig;
use ferry_agent::local::LocalClient;
use ferry_agent::{AgentConfig, AgentError, LinkStatus};
use ferry_broker::config::BrokerConfig;
use ferry_broker::{pki, BrokerError};
use ferry_common::admin::{
    AdminRequestV1, AdminResponseV1, ResourceInfo, SessionInfo, StatusReport,
};
use ferry_common::ResourceId;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Upper bound of every wait in the harness. Generous because the machine
/// is shared and loaded; a wait that needs it has failed.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The seed and rng of a seeded test: the seed from `var` when set (a
/// replay), else a fresh one; printed either way, with how to replay it.
pub fn seeded_rng(var: &str, what: &str) -> anyhow::Result<(u64, rand::rngs::StdRng)> {
    use rand::SeedableRng;
    let seed = match std::env::var(var) {
        Ok(s) => s
            .parse()
            .with_context(|| format!("{var}={s:?} is not a number"))?,
        Err(_) => rand::random::<u64>(),
    };
    eprintln!("{what} seed: {seed} ({var}={seed} replays it)");
    Ok((seed, rand::rngs::StdRng::seed_from_u64(seed)))
}

/// Kill-and-restart rounds of a crash test: `default` in the suite, or
/// `FERRY_CRASH_ROUNDS` for a soak (`tests/soak/crash-points`).
pub fn crash_rounds(default: u32) -> anyhow::Result<u32> {
    match std::env::var("FERRY_CRASH_ROUNDS") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("FERRY_CRASH_ROUNDS={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// Health interval of test brokers: short, so health arrives within a test,
/// long enough that a loaded machine does not miss three in a row.
pub const TEST_HEALTH_INTERVAL: Duration = Duration::from_millis(500);

/// Now, rounded down to the whole second: per-second billing counts a
/// started second as a whole one, so tests that check billed seconds start
/// their manual clock on a second.
pub fn whole_second_now() -> ferry_common::UnixMillis {
    ferry_common::UnixMillis(ferry_broker::clock::now_millis().0 / 1000 * 1000)
}

/// A groups' clock the test moves by hand, starting at [`whole_second_now`],
/// and the default groups' configuration reading it.
pub fn manual_clock() -> (
    ferry_broker::clock::ManualClock,
    ferry_broker::config::GroupsConfig,
) {
    let clock = ferry_broker::clock::ManualClock::new(whole_second_now());
    let config = ferry_broker::config::GroupsConfig {
        clock: clock.clock(),
        ..ferry_broker::config::GroupsConfig::default()
    };
    (clock, config)
}

/// Logs to the test's captured output (`RUST_LOG` picks the level; `info`,
/// and `debug` for the agent link's steps on both sides, by default, so a
/// failing test shows what its broker and agents did, and a passing one
/// shows nothing). Safe to call from every test.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,ferry_broker::link=debug,ferry_agent::link=debug")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A broker running in this process.
pub struct TestBroker {
    /// Root of the broker's files (`pki/`, `state/`, `admin.sock`) and of the
    /// agents started against it (`agents/`).
    dir: PathBuf,
    /// The configuration it runs with; `listen` is the bound address after
    /// the first start, so a restart keeps the port agents know.
    config: BrokerConfig,
    /// Where agents connect (the port the OS gave the first start).
    agent_addr: SocketAddr,
    /// Where metrics are served, if `[metrics] listen` is set.
    metrics_addr: Option<SocketAddr>,
    /// Root of the current run's shutdown tree.
    shutdown: CancellationToken,
    /// The running `daemon::run`, `None` while stopped.
    task: Option<JoinHandle<Result<(), BrokerError>>>,
}

impl TestBroker {
    /// Creates the PKI under `dir` (unless it exists) and starts a broker
    /// on `127.0.0.1:0`, returning once it is bound.
    pub async fn start(dir: &Path) -> anyhow::Result<TestBroker> {
        Self::start_with_groups(dir, Default::default()).await
    }

    /// Like [`TestBroker::start`], with these group settings (e.g. a manual
    /// clock from `ferry_broker::clock::ManualClock`).
    pub async fn start_with_groups(
        dir: &Path,
        groups: ferry_broker::config::GroupsConfig,
    ) -> anyhow::Result<TestBroker> {
        Self::start_tuned(dir, groups, |_| {}).await
    }

    /// Like [`TestBroker::start_with_groups`], with these endpoint limits
    /// (e.g. short idle timeouts for a test of them).
    pub async fn start_with_limits(
        dir: &Path,
        groups: ferry_broker::config::GroupsConfig,
        endpoint: ferry_broker::endpoint::EndpointLimits,
    ) -> anyhow::Result<TestBroker> {
        Self::start_tuned(dir, groups, |c| c.endpoint = endpoint).await
    }

    /// Like [`TestBroker::start_with_groups`], with the configuration
    /// changed by `tune` before the start (e.g. a short certificate lifetime).
    pub async fn start_tuned(
        dir: &Path,
        groups: ferry_broker::config::GroupsConfig,
        tune: impl FnOnce(&mut BrokerConfig),
    ) -> anyhow::Result<TestBroker> {
        let pki_dir = dir.join("pki");
        if !pki_dir.join(pki::CA_CERT).exists() {
            pki::init(&pki_dir, &[]).context("create test PKI")?;
        }
        let mut config = BrokerConfig {
            state_dir: dir.join("state"),
            pki_dir,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_socket: dir.join("admin.sock"),
            admin_group: None,
            health_interval: TEST_HEALTH_INTERVAL,
            missed_health_limit: 3,
            shutdown_grace: Duration::from_secs(5),
            agent_cert_lifetime: ferry_broker::pki::DEFAULT_AGENT_LIFETIME,
            groups,
            endpoint: Default::default(),
            store: Default::default(),
            metrics: Default::default(),
            console: None,
        };
        tune(&mut config);
        let mut broker = TestBroker {
            dir: dir.to_owned(),
            agent_addr: config.listen,
            metrics_addr: None,
            config,
            shutdown: CancellationToken::new(),
            task: None,
        };
        broker.launch().await?;
        Ok(broker)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        if self.task.is_some() {
            bail!("the broker is already running");
        }
        if self.config.listen.port() != 0 {
            wait_port_free(self.config.listen).await?;
        }
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(ferry_broker::daemon::run(
            self.config.clone(),
            shutdown.clone(),
            ready_tx,
        ));
        let Ok(ready) = ready_rx.await else {
            // The daemon failed before it was ready: report its error.
            let outcome = task.await.context("broker task panicked")?;
            return Err(anyhow!("broker exited before it was ready: {outcome:?}"));
        };
        self.agent_addr = ready.agent_addr;
        self.metrics_addr = ready.metrics_addr;
        // Later starts bind the same port: agents keep their broker_addr.
        self.config.listen = ready.agent_addr;
        self.shutdown = shutdown;
        self.task = Some(task);
        Ok(())
    }

    /// Graceful stop (as on SIGTERM): waits until `daemon::run` returned.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .context("broker did not stop in time")?
                .context("broker task panicked")?
                .context("broker failed")?;
        }
        Ok(())
    }

    /// Stops the broker if it runs and starts it again on the same state
    /// directory, PKI and port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.launch().await
    }

    /// Where agents connect.
    pub fn agent_addr(&self) -> SocketAddr {
        self.agent_addr
    }

    /// Where metrics are served (`[metrics] listen`), once started.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The admin socket path.
    pub fn admin_socket(&self) -> &Path {
        &self.config.admin_socket
    }

    /// Root token of the current run; cancelling it stops the broker.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The broker's PKI directory (the CA agents are issued from).
    pub fn pki_dir(&self) -> &Path {
        &self.config.pki_dir
    }

    /// Root directory of the broker and its test agents.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sends one admin request; an `Error` answer is an `Err`.
    pub async fn admin(&self, req: AdminRequestV1) -> anyhow::Result<AdminResponseV1> {
        let answer = tokio::time::timeout(
            PATIENCE,
            ferry_broker::admin::request(self.admin_socket(), req.clone()),
        )
        .await
        .with_context(|| format!("admin {req:?} timed out"))?;
        answer.with_context(|| format!("admin {req:?}"))
    }

    pub async fn status(&self) -> anyhow::Result<StatusReport> {
        match self.admin(AdminRequestV1::Status).await? {
            AdminResponseV1::Status(s) => Ok(s),
            other => bail!("status answered {other:?}"),
        }
    }

    pub async fn resources(&self) -> anyhow::Result<Vec<ResourceInfo>> {
        match self.admin(AdminRequestV1::ListResources).await? {
            AdminResponseV1::Resources(r) => Ok(r),
            other => bail!("resources answered {other:?}"),
        }
    }

    /// Sessions, only the open ones unless `all`.
    pub async fn sessions(&self, all: bool) -> anyhow::Result<Vec<SessionInfo>> {
        match self.admin(AdminRequestV1::ListSessions { all }).await? {
            AdminResponseV1::Sessions(s) => Ok(s),
            other => bail!("sessions answered {other:?}"),
        }
    }

    /// Key and certificate for `resource` signed by this broker's CA, with
    /// the CA certificate, in `dir/agents/<resource>/id`.
    pub fn issue_identity(&self, resource: &str) -> anyhow::Result<AgentIdentity> {
        let out = self.dir.join("agents").join(resource).join("id");
        let id: ResourceId = resource.parse().context("resource id")?;
        if !out.join(pki::AGENT_CERT).exists() {
            pki::issue_agent(
                self.pki_dir(),
                &id,
                &out,
                pki::Validity::starting_now(pki::DEFAULT_AGENT_LIFETIME),
            )
            .context("issue agent certificate")?;
        }
        Ok(AgentIdentity::in_dir(&out))
    }

    /// A configuration for an agent of `resource` with its files under
    /// `dir/agents/<resource>/`, presenting `identity`.
    pub fn agent_config(
        &self,
        resource: &str,
        identity: &AgentIdentity,
    ) -> anyhow::Result<AgentConfig> {
        let home = self.dir.join("agents").join(resource);
        Ok(AgentConfig {
            resource: resource.parse().context("resource id")?,
            group: None,
            broker_addr: self.agent_addr.to_string(),
            broker_name: "localhost".into(),
            brokers: Vec::new(),
            ca_cert: identity.ca_cert.clone(),
            cert: identity.cert.clone(),
            key: identity.key.clone(),
            state_dir: home.join("state"),
            policy_file: home.join("state").join("policy.json"),
            local_socket: home.join("agent.sock"),
            local_idle_timeout: ferry_agent::local::DEFAULT_IDLE_TIMEOUT,
            image_version: "test-image".into(),
            hooks: HooksConfig::default(),
            metrics_listen: None,
            streaming: ferry_agent::config::default_streaming(),
            streaming_protocol: None,
        })
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        // A failed test must not leave a daemon running in the process.
        self.shutdown.cancel();
    }
}

/// Waits until the UDP port of a stopped in-process broker can be bound again.
///
/// `daemon::run` returns once its connections are closed, but quinn's
/// endpoint driver task releases the socket a moment later (a few ms), when
/// the runtime next polls it. Yielding lets it run; the loop ends as soon as
/// the port is free, so this is a wait on a condition, not a guess at a
/// duration. A separate process (the real daemon) exits with its socket.
async fn wait_port_free(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match std::net::UdpSocket::bind(addr) {
            Ok(_probe) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if tokio::time::Instant::now() > deadline {
                    bail!("UDP port {addr} still in use after {PATIENCE:?}");
                }
                tokio::task::yield_now().await;
            }
            Err(e) => return Err(e).with_context(|| format!("probe UDP port {addr}")),
        }
    }
}

/// The TLS files an agent presents.
#[derive(Clone, Debug)]
pub struct AgentIdentity {
    /// CA the agent trusts for the broker's certificate.
    pub ca_cert: PathBuf,
    /// The agent's certificate.
    pub cert: PathBuf,
    /// The agent's private key.
    pub key: PathBuf,
}

impl AgentIdentity {
    /// The files `pki::issue_agent` writes into `dir`.
    pub fn in_dir(dir: &Path) -> AgentIdentity {
        AgentIdentity {
            ca_cert: dir.join(pki::CA_CERT),
            cert: dir.join(pki::AGENT_CERT),
            key: dir.join(pki::AGENT_KEY),
        }
    }
}

/// An agent running in this process.
pub struct TestAgent {
    /// What it runs with; a restart reuses it (same spool, same socket).
    config: AgentConfig,
    /// The bound local socket.
    local_socket: PathBuf,
    /// Its published link status.
    status: watch::Receiver<LinkStatus>,
    /// Root of its shutdown tree.
    shutdown: CancellationToken,
    /// The running `ferry_agent::run`, `None` once stopped.
    task: Option<JoinHandle<Result<(), AgentError>>>,
}

impl TestAgent {
    /// Starts an agent for `resource` with a certificate from `broker`'s CA,
    /// returning once its local socket is bound and its spool open (the
    /// broker may not be reached yet).
    pub async fn start(broker: &TestBroker, resource: &str) -> anyhow::Result<TestAgent> {
        let identity = broker.issue_identity(resource)?;
        Self::start_with(broker.agent_config(resource, &identity)?).await
    }

    /// Starts an agent with any configuration.
    pub async fn start_with(config: AgentConfig) -> anyhow::Result<TestAgent> {
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(ferry_agent::run(config.clone(), shutdown.clone(), ready_tx));
        let Ok(ready) = ready_rx.await else {
            let outcome = task.await.context("agent task panicked")?;
            return Err(anyhow!("agent exited before it was ready: {outcome:?}"));
        };
        Ok(TestAgent {
            config,
            local_socket: ready.local_socket,
            status: ready.status,
            shutdown,
            task: Some(task),
        })
    }

    /// Stops the agent gracefully and waits until it returned.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .context("agent did not stop in time")?
                .context("agent task panicked")?
                .context("agent failed")?;
        }
        Ok(())
    }

    /// Stops the agent and starts it again on the same spool and socket.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        let again = Self::start_with(self.config.clone()).await?;
        *self = again;
        Ok(())
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    pub fn local_socket(&self) -> &Path {
        &self.local_socket
    }

    /// A client of the agent's local socket (what the host's streaming
    /// server and the CLI verbs use).
    pub async fn client(&self) -> anyhow::Result<LocalClient> {
        LocalClient::connect(&self.local_socket)
            .await
            .context("connect to the agent's local socket")
    }

    /// The agent's link status channel.
    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.status.clone()
    }

    /// The status now.
    pub fn link(&self) -> LinkStatus {
        self.status.borrow().clone()
    }

    /// Waits until the status satisfies `what`, failing after [`PATIENCE`]
    /// with the last status seen.
    pub async fn wait_for(
        &self,
        description: &str,
        what: impl FnMut(&LinkStatus) -> bool,
    ) -> anyhow::Result<LinkStatus> {
        let mut rx = self.status.clone();
        let waited = tokio::time::timeout(PATIENCE, async {
            rx.wait_for(what).await.map(|s| s.clone())
        })
        .await;
        match waited {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) => bail!(
                "{}: agent stopped while waiting for {description}",
                self.config.resource
            ),
            Err(_) => bail!(
                "{}: not {description} after {PATIENCE:?}; status {:?}",
                self.config.resource,
                self.link()
            ),
        }
    }

    /// Waits until the broker welcomed the agent and acknowledged every
    /// spooled event.
    pub async fn wait_synced(&self) -> anyhow::Result<LinkStatus> {
        self.wait_for("synced", |s| s.connected && s.spooled == 0)
            .await
    }

    /// Waits until the agent knows its connection is gone.
    pub async fn wait_disconnected(&self) -> anyhow::Result<LinkStatus> {
        self.wait_for("disconnected", |s| !s.connected).await
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
