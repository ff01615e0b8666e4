//! `ferry-broker demo`: Ferry on one machine in one command (issue 6).
//!
//! A throwaway CA and state directory; the broker in-process on
//! 127.0.0.1:0 with its embedded store and the `local` provisioner; a
//! published pay-as-you-go group whose policy is scaled to seconds; two base
//! resources (real `ferry-agent` processes with certificates from the CA);
//! users with tokens; and simulated end users. Each end user routes through
//! the broker with [`RouteClient`] (QUIC, the route ALPN), then does what a
//! streaming server does on its host: `ferry-agent ticket verify`, `session
//! start` under the ticket's session id, a few seconds later `session end`.
//!
//! The load rises (a burst: scale-out, waiting requests admitted as elastic
//! agents enroll) and falls (scale-in, one per cooldown). Every decision the
//! group records is printed as it appears (read through the admin API), with
//! the group's counts whenever they change and each route's outcome. At the
//! end: the usage report and its cost; then every agent is stopped (the
//! provisioner stops its local agents when the broker stops), the absence of
//! any process started from the demo's directory is checked in `/proc`, and
//! the directory is removed (unless `--keep`). Ctrl-C ends it early the same
//! way.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_common::admin::{
    AdminRequestV1, AdminResponseV1, BillingSpec, GroupEventInfo, GroupSpec, LiveGroupView,
    PolicySpec, SessionType, UsageQuery, UserSpec,
};
use ferry_common::route::{Admission, RouteAsk};
use ferry_common::ticket::Credential;
use ferry_common::{GroupName, ResourceId, UnixMillis, UserId};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminClient, AdminClientError};
use crate::config::{BrokerConfig, GroupsConfig, ProvisionerConfig, ProvisionerKind};
use crate::daemon::{self, BrokerError, BrokerReady};
use crate::pki::{self, PkiError};
use crate::provision::local;
use crate::render;
use crate::routing::{RouteAnswer, RouteClient};
use ferry_process::output::Output;

/// Prints a line of the show through the demo's [`Output`]: never panics
/// on a closed stdout, never blocks on a full one.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {
        $out.line(format_args!($($arg)*))
    };
}

/// How often the group's events and live view are read.
const REFRESH: Duration = Duration::from_millis(500);

/// How long an agent the demo started gets to exit after SIGTERM.
const AGENT_STOP_GRACE: Duration = Duration::from_secs(10);

/// How long a base agent has to open its local socket.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The shortest `--duration`: below it the policy's seconds get too short
/// for agents to start and enroll.
pub const MIN_DURATION: Duration = Duration::from_secs(20);

/// Name of the demo's delivery group.
pub const GROUP: &str = "demo";

/// Base resources of the group (agents the demo starts itself).
pub const BASE_RESOURCES: u32 = 2;

/// Simulated end users.
pub const USERS: u32 = 8;

/// Users who arrive one by one before the rest arrive at once (the burst).
pub const RAMP_USERS: u32 = 3;

/// The demo's command line.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// How long the show runs once the broker and base agents are up.
    pub duration: Duration,
    /// Work here instead of a new temporary directory (it must not exist or
    /// be empty).
    pub state_dir: Option<PathBuf>,
    /// Leave the directory in place at the end.
    pub keep: bool,
    /// Where the show is printed (stdout, through a writer that never blocks).
    pub out: Output,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0} not found; build it first: cargo build --release")]
    MissingAgent(PathBuf),
    #[error(
        "--duration must be at least {}",
        ferry_common::duration::format_duration(MIN_DURATION)
    )]
    TooShort,
    #[error("{0} exists and is not empty; give a new directory")]
    StateDirInUse(PathBuf),
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("pki: {0}")]
    Pki(#[from] PkiError),
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("broker stopped before it was ready")]
    BrokerNotReady,
    #[error("admin: {0}")]
    Admin(#[from] AdminClientError),
    #[error("unexpected admin answer to {0}")]
    Unexpected(&'static str),
    #[error("{0}")]
    Agent(String),
    #[error("{0} simulated user(s) failed (see above)")]
    Users(usize),
    #[error("agent process(es) still running after the broker stopped: {0:?} (killed)")]
    LeftRunning(Vec<u32>),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |error| DemoError::Io { what, error }
}

/// The policy and load curve, scaled to the duration (60 s: three users a
/// second apart, then five at once; sessions of 18-20 s; max_idle 6 s,
/// cooldown 5 s, wait_timeout 10 s), rounded to tenths of a second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Between two users' arrivals.
    pub arrival_gap: Duration,
    /// How long the first user keeps the session; later ones a little longer.
    pub hold: Duration,
    pub max_idle: Duration,
    pub cooldown: Duration,
    pub wait_timeout: Duration,
    /// How long an elastic agent has to enroll and register.
    pub register_timeout: Duration,
}

impl Plan {
    pub fn for_duration(d: Duration) -> Plan {
        let tenths = |d: Duration| {
            Duration::from_millis(u64::try_from(d.as_millis() / 100 * 100).unwrap_or(u64::MAX))
        };
        Plan {
            arrival_gap: tenths(d / 60),
            hold: tenths(d * 3 / 10),
            max_idle: tenths(d / 10),
            cooldown: tenths(d / 12),
            wait_timeout: tenths(d / 6),
            register_timeout: tenths(d / 3),
        }
    }

    /// When user `n` (from 0) arrives: the first [`RAMP_USERS`] one by one,
    /// the rest together.
    pub fn arrival(&self, n: u32) -> Duration {
        self.arrival_gap * n.min(RAMP_USERS)
    }

    fn policy(&self) -> PolicySpec {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        PolicySpec {
            concurrent_sessions: Some(2),
            usage_threshold: Some(80),
            scale_out_step: Some(1),
            max_elastic: Some(3),
            max_idle_ms: Some(ms(self.max_idle)),
            scale_in_cooldown_ms: Some(ms(self.cooldown)),
            wait_timeout_ms: Some(ms(self.wait_timeout)),
            load_balancing: Some("breadth-first".into()),
        }
    }
}

/// The `ferry-agent` binary next to the running executable.
pub fn agent_binary() -> Result<PathBuf, DemoError> {
    let bin = local::default_agent_binary().map_err(|e| DemoError::Agent(e.to_string()))?;
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(DemoError::MissingAgent(bin))
    }
}

/// `ferry-agent` processes (not zombies) with an argument under `dir`:
/// every agent the demo or its provisioner starts runs with its config
/// under the demo's directory.
pub fn agents_under(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_agent = args
            .first()
            .is_some_and(|a| Path::new(std::ffi::OsStr::from_bytes(a)).ends_with("ferry-agent"));
        let under = args
            .iter()
            .any(|a| Path::new(std::ffi::OsStr::from_bytes(a)).starts_with(dir));
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true);
        if pid != me && is_agent && under && !zombie {
            out.push(pid);
        }
    }
    out
}

/// Seconds since the demo started, for the live lines.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
    start_ms: UnixMillis,
}

impl Clock {
    fn now(&self) -> String {
        let ms = self.start.elapsed().as_millis();
        format!("[{:>3}.{}s]", ms / 1000, (ms % 1000) / 100)
    }

    fn at(&self, t: UnixMillis) -> String {
        let ms = t.0.saturating_sub(self.start_ms.0).max(0);
        format!("[{:>3}.{}s]", ms / 1000, (ms % 1000) / 100)
    }
}

/// The working directory: removed by [`WorkDir::remove`] at the end unless kept.
struct WorkDir {
    root: PathBuf,
    keep: bool,
    out: Output,
}

impl WorkDir {
    fn new(opts: &DemoOptions) -> Result<WorkDir, DemoError> {
        let root = match &opts.state_dir {
            Some(dir) => {
                if dir.exists() {
                    let mut entries =
                        std::fs::read_dir(dir).map_err(io(format!("read {}", dir.display())))?;
                    if entries.next().is_some() {
                        return Err(DemoError::StateDirInUse(dir.clone()));
                    }
                }
                std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
                std::path::absolute(dir).map_err(io(format!("resolve {}", dir.display())))?
            }
            None => tempfile::Builder::new()
                .prefix("ferry-demo-")
                .tempdir()
                .map_err(io("create a temporary directory"))?
                .keep(),
        };
        Ok(WorkDir {
            root,
            keep: opts.keep,
            out: opts.out.clone(),
        })
    }

    fn remove(&self) {
        let out = &self.out;
        if self.keep {
            say!(out, "demo: kept {}", self.root.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.root) {
            say!(out, "demo: could not remove {}: {e}", self.root.display());
        } else {
            say!(out, "demo: removed {}", self.root.display());
        }
    }
}

/// A base resource's agent, started by the demo.
struct BaseAgent {
    resource: ResourceId,
    config: PathBuf,
    child: Child,
}

/// Runs the demo until `duration` passes or `shutdown` is cancelled.
pub async fn run(opts: DemoOptions, shutdown: CancellationToken) -> Result<(), DemoError> {
    if opts.duration < MIN_DURATION {
        return Err(DemoError::TooShort);
    }
    let agent_bin = agent_binary()?;
    let work = WorkDir::new(&opts)?;
    let result = run_in(&opts, &agent_bin, &work.root, &shutdown).await;
    // Every process started from the directory must be gone by now.
    let left = agents_under(&work.root);
    let out = &opts.out;
    let result = if left.is_empty() {
        say!(out, "demo: checked /proc: no agent process is left running");
        result
    } else {
        for pid in &left {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status()
                .await;
        }
        result.and(Err(DemoError::LeftRunning(left)))
    };
    work.remove();
    result
}

async fn run_in(
    opts: &DemoOptions,
    agent_bin: &Path,
    root: &Path,
    shutdown: &CancellationToken,
) -> Result<(), DemoError> {
    let plan = Plan::for_duration(opts.duration);
    let out = &opts.out;
    say!(out, "demo: working in {}", root.display());
    let pki_dir = root.join("pki");
    pki::init(&pki_dir, &[])?;
    let state_dir = root.join("broker");
    let config = BrokerConfig {
        state_dir: state_dir.clone(),
        pki_dir: pki_dir.clone(),
        listen: (std::net::Ipv4Addr::LOCALHOST, 0).into(),
        admin_socket: root.join("admin.sock"),
        admin_group: None,
        health_interval: Duration::from_secs(2),
        missed_health_limit: 3,
        // Room for the provisioner to stop its agents one by one.
        shutdown_grace: Duration::from_secs(20),
        agent_cert_lifetime: crate::pki::DEFAULT_AGENT_LIFETIME,
        groups: GroupsConfig {
            provisioner: ProvisionerConfig {
                kind: ProvisionerKind::Local {
                    agent_binary: Some(agent_bin.to_path_buf()),
                },
                timeout: Duration::from_secs(30),
                attempts: 3,
                register_timeout: plan.register_timeout,
                broker_addr: None,
            },
            ..GroupsConfig::default()
        },
        endpoint: Default::default(),
        store: Default::default(),
        metrics: Default::default(),
        // The console on loopback: its sign-in link is printed below.
        console: Some(crate::config::ConsoleConfig {
            listen: (std::net::Ipv4Addr::LOCALHOST, 0).into(),
            tls: false,
            behind_proxy: false,
            public_url: None,
            session_ttl: Duration::from_secs(3600),
        }),
    };
    let broker_stop = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let broker = tokio::spawn(daemon::run(config, broker_stop.clone(), ready_tx));
    let ready = match ready_rx.await {
        Ok(r) => r,
        Err(_) => {
            return Err(match broker.await {
                Ok(Err(e)) => e.into(),
                _ => DemoError::BrokerNotReady,
            })
        }
    };
    say!(
        out,
        "demo: broker on {} with the local provisioner (admin socket {})",
        ready.agent_addr,
        ready.admin_socket.display()
    );
    say!(
        out,
        "demo: look around from another terminal: ferryctl --socket {} group show {GROUP}",
        ready.admin_socket.display()
    );

    let mut agents = Vec::new();
    let started = tokio::select! {
        // Ctrl-C while the agents start stops right away, too.
        _ = shutdown.cancelled() => Ok(None),
        r = async {
            let tokens = setup(&ready, &plan, out).await?;
            console_link(&ready, out).await;
            for i in 1..=BASE_RESOURCES {
                agents.push(start_base_agent(agent_bin, root, &pki_dir, &ready, i, out).await?);
            }
            for agent in &mut agents {
                wait_synced(agent_bin, agent).await?;
            }
            Ok(Some(tokens))
        } => r,
    };
    // The show watches Ctrl-C itself: it still prints the usage report.
    let result = match started {
        Ok(Some(tokens)) => {
            show(
                agent_bin, &agents, &state_dir, &ready, &pki_dir, tokens, &plan, opts, shutdown,
            )
            .await
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };

    say!(
        out,
        "demo: stopping: the base agents, then the broker (which stops its local agents)"
    );
    for agent in &mut agents {
        stop_agent(agent).await;
    }
    broker_stop.cancel();
    let broker_result = broker.await;
    result?;
    match broker_result {
        Ok(r) => r.map_err(DemoError::from),
        Err(e) => Err(DemoError::Agent(format!("broker task failed: {e}"))),
    }
}

/// Prints a sign-in link of the console to the demo group's live page.
async fn console_link(ready: &BrokerReady, out: &Output) {
    match crate::admin::request(&ready.admin_socket, AdminRequestV1::ConsoleLogin).await {
        Ok(AdminResponseV1::ConsoleLink { url, .. }) => say!(
            out,
            "demo: watch it live in a browser (the link signs you in once): {url}&next=/groups/{GROUP}"
        ),
        Ok(other) => say!(out, "demo: no console link: {other:?}"),
        Err(e) => say!(out, "demo: no console link: {e}"),
    }
}

/// Users with tokens and the published group. Returns each user's token.
async fn setup(
    ready: &BrokerReady,
    plan: &Plan,
    out: &Output,
) -> Result<Vec<(UserId, String)>, DemoError> {
    let mut admin = AdminClient::connect(&ready.admin_socket).await?;
    let mut users = Vec::new();
    for i in 1..=USERS {
        let id: UserId = format!("user{i}")
            .parse()
            .map_err(|e| DemoError::Agent(format!("user id: {e}")))?;
        admin
            .call(AdminRequestV1::UserCreate(UserSpec {
                id: id.clone(),
                email: format!("user{i}@example.com"),
                mobile: format!("+86138000000{i:02}"),
            }))
            .await?;
        users.push(id);
    }
    let group: GroupName = GROUP
        .parse()
        .map_err(|e| DemoError::Agent(format!("group name: {e}")))?;
    let spec = GroupSpec {
        name: Some(group.clone()),
        region: "local".into(),
        office_network: "loopback".into(),
        spec: "office-4c8g".into(),
        image: "demo-image".into(),
        billing: BillingSpec::PayAsYouGo,
        base_resources: BASE_RESOURCES,
        session_type: SessionType::Independent,
        users: users.clone(),
        policy: plan.policy(),
    };
    let AdminResponseV1::Group(detail) = admin.call(AdminRequestV1::GroupPublish(spec)).await?
    else {
        return Err(DemoError::Unexpected("group publish"));
    };
    // Membership is the operator's decision: the base hosts are put in the
    // group before their agents start (`ferryctl resources assign`).
    for i in 1..=BASE_RESOURCES {
        let resource = base_host(i)?;
        let AdminResponseV1::Done { .. } = admin
            .call(AdminRequestV1::ResourcesAssign {
                resource,
                group: Some(group.clone()),
            })
            .await?
        else {
            return Err(DemoError::Unexpected("resources assign"));
        };
    }
    let p = &detail.policy;
    say!(
        out,
        "demo: published pay-as-you-go group {GROUP} ({}): {BASE_RESOURCES} base resources, \
         concurrent_sessions {}, usage_threshold {}%, scale_out_step {}, max_elastic {}, \
         max_idle {}, cooldown {}, wait_timeout {}",
        detail.info.id,
        p.concurrent_sessions,
        p.usage_threshold,
        p.scale_out_step,
        p.max_elastic,
        secs(p.max_idle_ms),
        secs(p.scale_in_cooldown_ms),
        secs(p.wait_timeout_ms),
    );
    let mut tokens = Vec::new();
    for user in users {
        let ttl = 600;
        let AdminResponseV1::UserToken { token, .. } = admin
            .call(AdminRequestV1::UserToken {
                user: user.clone(),
                ttl_secs: ttl,
            })
            .await?
        else {
            return Err(DemoError::Unexpected("user token"));
        };
        tokens.push((user, token));
    }
    say!(
        out,
        "demo: {USERS} users created and assigned, each with a token"
    );
    Ok(tokens)
}

/// The demo's base host number `i`.
fn base_host(i: u32) -> Result<ResourceId, DemoError> {
    format!("{GROUP}-host-{i}")
        .parse()
        .map_err(|e| DemoError::Agent(format!("resource id: {e}")))
}

fn secs(ms: u64) -> String {
    ferry_common::duration::format_duration(Duration::from_millis(ms))
}

async fn start_base_agent(
    bin: &Path,
    root: &Path,
    pki_dir: &Path,
    ready: &BrokerReady,
    i: u32,
    out: &Output,
) -> Result<BaseAgent, DemoError> {
    let resource = base_host(i)?;
    let dir = root.join(resource.as_str());
    pki::issue_agent(
        pki_dir,
        &resource,
        &dir,
        pki::Validity::starting_now(pki::DEFAULT_AGENT_LIFETIME),
    )?;
    let config = dir.join("agent.toml");
    let text = format!(
        "resource = {resource:?}\n\
         group = {GROUP:?}\n\
         broker_addr = \"{addr}\"\n\
         broker_name = \"localhost\"\n\
         ca_cert = {ca:?}\n\
         cert = {cert:?}\n\
         key = {key:?}\n\
         state_dir = {state:?}\n\
         local_socket = {sock:?}\n\
         image_version = \"demo-image\"\n",
        resource = resource.as_str(),
        addr = ready.agent_addr,
        ca = dir.join(pki::CA_CERT).display().to_string(),
        cert = dir.join(pki::AGENT_CERT).display().to_string(),
        key = dir.join(pki::AGENT_KEY).display().to_string(),
        state = dir.join("state").display().to_string(),
        sock = dir.join("agent.sock").display().to_string(),
    );
    std::fs::write(&config, text).map_err(io(format!("write {}", config.display())))?;
    let log = std::fs::File::create(dir.join("agent.log")).map_err(io("create agent log"))?;
    let log2 = log.try_clone().map_err(io("create agent log"))?;
    let child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env_remove("FERRY_AGENT_CONFIG")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(true)
        .spawn()
        .map_err(io(format!("start {}", bin.display())))?;
    say!(
        out,
        "demo: started base agent {resource} (pid {})",
        child.id().unwrap_or(0)
    );
    Ok(BaseAgent {
        resource,
        config,
        child,
    })
}

/// Waits for a base agent's local socket, then for it to be connected with
/// nothing spooled.
async fn wait_synced(bin: &Path, agent: &mut BaseAgent) -> Result<(), DemoError> {
    let socket = agent.config.with_file_name("agent.sock");
    let deadline = Instant::now() + AGENT_START_TIMEOUT;
    while !socket.exists() {
        if let Ok(Some(status)) = agent.child.try_wait() {
            return Err(DemoError::Agent(format!(
                "agent {} exited ({status}); see {}",
                agent.resource,
                agent.config.with_file_name("agent.log").display()
            )));
        }
        if Instant::now() > deadline {
            return Err(DemoError::Agent(format!(
                "agent {} did not open {} within {}",
                agent.resource,
                socket.display(),
                ferry_common::duration::format_duration(AGENT_START_TIMEOUT)
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent_cli(
        bin,
        &agent.config,
        &["status", "--wait-synced", "--timeout", "30s"],
    )
    .await?;
    Ok(())
}

/// Runs one `ferry-agent` CLI verb against an agent's config; its stdout.
async fn agent_cli(bin: &Path, config: &Path, args: &[&str]) -> Result<String, DemoError> {
    let out = Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("FERRY_AGENT_CONFIG")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io(format!("run {}", bin.display())))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(DemoError::Agent(format!(
            "ferry-agent {} ({}): {} {}",
            args.first().copied().unwrap_or_default(),
            config.display(),
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Where a route's answer says to go: the agent config of that resource.
struct Hosts {
    base: HashMap<ResourceId, PathBuf>,
    state_dir: PathBuf,
}

impl Hosts {
    /// The base agents' configs; elastic ones are in the local provisioner's
    /// directories under `state_dir`.
    fn of(agents: &[BaseAgent], state_dir: &Path) -> Self {
        Hosts {
            base: agents
                .iter()
                .map(|a| (a.resource.clone(), a.config.clone()))
                .collect(),
            state_dir: state_dir.to_path_buf(),
        }
    }

    fn config(&self, resource: &ResourceId) -> PathBuf {
        match self.base.get(resource) {
            Some(c) => c.clone(),
            None => local::agent_dir(&self.state_dir, resource).join("agent.toml"),
        }
    }
}

/// Routing outcomes so far, counted as they happen (so an interrupted
/// demo still reports them).
#[derive(Default)]
struct Tally {
    admitted: AtomicUsize,
    after_wait: AtomicUsize,
    refused: AtomicUsize,
    failed: AtomicUsize,
}

impl Tally {
    fn add(n: &AtomicUsize) {
        n.fetch_add(1, Ordering::Relaxed);
    }

    fn get(n: &AtomicUsize) -> usize {
        n.load(Ordering::Relaxed)
    }
}

/// What every simulated end user shares: the agent binary, where each
/// resource's agent config is, the broker's route address, the CA, the
/// demo's clock and the outcomes so far.
struct Crowd {
    bin: PathBuf,
    hosts: Hosts,
    broker: std::net::SocketAddr,
    ca: PathBuf,
    clock: Clock,
    tally: Tally,
}

struct UserRun {
    user: UserId,
    token: String,
    arrive: Duration,
    hold: Duration,
    /// Where the user's steps are printed.
    out: Output,
}

#[allow(clippy::too_many_arguments)]
async fn show(
    bin: &Path,
    agents: &[BaseAgent],
    state_dir: &Path,
    ready: &BrokerReady,
    pki_dir: &Path,
    tokens: Vec<(UserId, String)>,
    plan: &Plan,
    opts: &DemoOptions,
    shutdown: &CancellationToken,
) -> Result<(), DemoError> {
    let out = &opts.out;
    let clock = Clock {
        start: Instant::now(),
        start_ms: crate::clock::now_millis(),
    };
    announce(out, agents.len(), plan, opts.duration);
    let crowd = Arc::new(Crowd {
        bin: bin.to_path_buf(),
        hosts: Hosts::of(agents, state_dir),
        broker: ready.agent_addr,
        ca: pki_dir.join(pki::CA_CERT),
        clock,
        tally: Tally::default(),
    });
    let mut users = spawn_users(&crowd, tokens, plan, out);

    let group: GroupName = GROUP
        .parse()
        .map_err(|e| DemoError::Agent(format!("group name: {e}")))?;
    let mut admin = AdminClient::connect(&ready.admin_socket).await?;
    let mut watch = Watch::default();
    let deadline = clock.start + opts.duration;
    let mut tick = tokio::time::interval(REFRESH);
    let stopped_early = loop {
        watch.refresh(&mut admin, &group, &clock, out).await?;
        tokio::select! {
            _ = shutdown.cancelled() => break true,
            _ = tokio::time::sleep_until(deadline) => break false,
            Some(_) = users.join_next(), if !users.is_empty() => {}
            _ = tick.tick() => {}
        }
    };
    if stopped_early {
        say!(out, "demo: interrupted: stopping early");
    }
    stop_users(&mut users, out).await;
    watch.refresh(&mut admin, &group, &clock, out).await?;

    let failed = Tally::get(&crowd.tally.failed);
    say_counts(out, &crowd.tally, &watch);
    say_usage(&mut admin, &group, &clock, out).await?;
    if failed > 0 && !stopped_early {
        return Err(DemoError::Users(failed));
    }
    Ok(())
}

/// What the show is about to do.
fn announce(out: &Output, base_agents: usize, plan: &Plan, duration: Duration) {
    say!(
        out,
        "demo: {} base agents connected; {RAMP_USERS} end users arrive {} apart, then {} at \
         once; each keeps its session about {}; the demo ends after {} (Ctrl-C stops it early)",
        base_agents,
        ferry_common::duration::format_duration(plan.arrival_gap),
        USERS - RAMP_USERS,
        ferry_common::duration::format_duration(plan.hold),
        ferry_common::duration::format_duration(duration),
    );
}

/// One task per end user, each arriving and holding its session as the
/// plan says.
fn spawn_users(
    crowd: &Arc<Crowd>,
    tokens: Vec<(UserId, String)>,
    plan: &Plan,
    out: &Output,
) -> JoinSet<()> {
    let mut users = JoinSet::new();
    for (n, (user, token)) in tokens.into_iter().enumerate() {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let run = UserRun {
            user,
            token,
            arrive: plan.arrival(n),
            hold: plan.hold + plan.arrival_gap * (n % 3),
            out: out.clone(),
        };
        users.spawn(simulate_user(run, crowd.clone()));
    }
    users
}

/// Stops the users still busy at the end of the show.
async fn stop_users(users: &mut JoinSet<()>, out: &Output) {
    if !users.is_empty() {
        say!(
            out,
            "demo: {} user(s) still busy at the end: stopped",
            users.len()
        );
        users.abort_all();
        while users.join_next().await.is_some() {}
    }
}

/// The routes' outcomes and the group's decisions, counted.
fn say_counts(out: &Output, tally: &Tally, watch: &Watch) {
    let admitted = Tally::get(&tally.admitted);
    let after_wait = Tally::get(&tally.after_wait);
    let refused = Tally::get(&tally.refused);
    say!(out, "");
    say!(
        out,
        "demo: routes: {admitted} admitted ({after_wait} after waiting for room), {refused} refused"
    );
    say!(
        out,
        "demo: decisions: {} scale-out(s), {} elastic resource(s) ready, {} scale-in(s), {} released",
        watch.count("scale_out"),
        watch.count("created"),
        watch.count("scale_in"),
        watch.count("released"),
    );
}

/// The usage report of the demo's period and each group's cost.
async fn say_usage(
    admin: &mut AdminClient,
    group: &GroupName,
    clock: &Clock,
    out: &Output,
) -> Result<(), DemoError> {
    let to = crate::clock::now_millis();
    let AdminResponseV1::UsageDetailed(detail) = admin
        .call(AdminRequestV1::UsageDetailed(UsageQuery {
            group: Some(group.clone()),
            from: clock.start_ms,
            to,
        }))
        .await?
    else {
        return Err(DemoError::Unexpected("usage"));
    };
    say!(
        out,
        "\nUsage report\n{}",
        render::usage_detail_table(&detail)
    );
    let report = detail.report;
    for g in &report.groups {
        say!(
            out,
            "Cost of group {}: {} {} ({} s of base resources, {} s of elastic resources, \
             billed per second at the seed's pay-as-you-go price)",
            g.group,
            g.total,
            report.currency,
            g.base_seconds,
            g.elastic_seconds
        );
    }
    say!(out, "");
    Ok(())
}

/// What has been printed of the group so far.
#[derive(Default)]
struct Watch {
    /// Events printed, counted per (time, kind, message).
    seen: HashMap<(i64, String, String), usize>,
    /// Events printed per kind.
    kinds: BTreeMap<String, usize>,
    /// The last state line.
    last_state: String,
}

impl Watch {
    fn count(&self, kind: &str) -> usize {
        self.kinds.get(kind).copied().unwrap_or(0)
    }

    async fn refresh(
        &mut self,
        admin: &mut AdminClient,
        group: &GroupName,
        clock: &Clock,
        out: &Output,
    ) -> Result<(), DemoError> {
        let AdminResponseV1::GroupEvents(events) = admin
            .call(AdminRequestV1::GroupEvents {
                group: group.clone(),
            })
            .await?
        else {
            return Err(DemoError::Unexpected("group events"));
        };
        let mut fresh: HashMap<(i64, String, String), usize> = HashMap::new();
        for e in events {
            let GroupEventInfo { at, kind, message } = e;
            let key = (at.0, kind, message);
            let n = fresh.entry(key.clone()).or_default();
            *n += 1;
            if *n > self.seen.get(&key).copied().unwrap_or(0) {
                say!(out, "{} decision  {:<14} {}", clock.at(at), key.1, key.2);
                *self.kinds.entry(key.1.clone()).or_default() += 1;
                self.seen.insert(key, *n);
            }
        }
        let AdminResponseV1::GroupShown { live, .. } = admin
            .call(AdminRequestV1::GroupShow {
                group: group.clone(),
            })
            .await?
        else {
            return Err(DemoError::Unexpected("group show"));
        };
        if let Some(live) = live {
            let state = state_line(&live);
            if state != self.last_state {
                say!(out, "{} state     {state}", clock.now());
                self.last_state = state;
            }
        }
        Ok(())
    }
}

/// Sessions, requests that count as demand without a session yet (a
/// reservation whose ticket is not used yet, or a waiting request), usage
/// and each resource's load.
fn state_line(live: &LiveGroupView) -> String {
    let sessions: usize = live.resources.iter().map(|r| r.sessions.len()).sum();
    let sessions = u64::try_from(sessions).unwrap_or(u64::MAX);
    let waiting = live.demand.saturating_sub(sessions);
    let usage = render::usage_percent(live.demand, live.capacity).unwrap_or_else(|| "-".into());
    let resources: Vec<String> = live
        .resources
        .iter()
        .filter(|r| r.state != "released")
        .map(|r| {
            format!(
                "{} {} {}/{}",
                r.resource,
                r.state,
                r.sessions.len(),
                live.concurrent_sessions
            )
        })
        .collect();
    format!(
        "sessions {sessions}, admitted-not-started or waiting {waiting}, usage {usage} of \
         capacity {} | {}",
        live.capacity,
        resources.join(", ")
    )
}

/// One end user: route through the broker, then what the streaming server
/// does on the host the broker chose.
async fn simulate_user(run: UserRun, crowd: Arc<Crowd>) {
    let out = run.out.clone();
    let out = &out;
    let clock = crowd.clock;
    tokio::time::sleep(run.arrive).await;
    let user = run.user.clone();
    if let Err(e) = user_session(run, &crowd).await {
        say!(out, "{} route     {user}: FAILED: {e}", clock.now());
        Tally::add(&crowd.tally.failed);
    }
}

async fn user_session(run: UserRun, crowd: &Crowd) -> Result<(), DemoError> {
    let UserRun {
        user,
        token,
        hold,
        out,
        ..
    } = run;
    let out = &out;
    let clock = crowd.clock;
    let tally = &crowd.tally;
    let (answer, waited) = ask_route(crowd, &user, token, out).await?;
    let admission = match answer {
        RouteAnswer::Refused(r) => {
            say!(
                out,
                "{} route     {user}: refused ({}): {}",
                clock.now(),
                r.reason,
                r.message
            );
            Tally::add(&tally.refused);
            return Ok(());
        }
        // The demo's one broker owns every group.
        RouteAnswer::Redirect(address) => {
            return Err(DemoError::Agent(format!(
                "the demo's broker sent {user} to another broker at {address}"
            )));
        }
        RouteAnswer::Admitted(a) => a,
    };
    Tally::add(&tally.admitted);
    if waited {
        Tally::add(&tally.after_wait);
    }
    say!(
        out,
        "{} route     {user}: admitted{} to {} ({}), session {}",
        clock.now(),
        if waited { " after waiting" } else { "" },
        admission.resource,
        admission.address,
        admission.session
    );
    host_session(crowd, &user, &admission, hold, out).await
}

/// Asks the broker's route service for a session in the demo's group,
/// waiting for room; the answer, and whether the request waited.
async fn ask_route(
    crowd: &Crowd,
    user: &UserId,
    token: String,
    out: &Output,
) -> Result<(RouteAnswer, bool), DemoError> {
    let clock = crowd.clock;
    let client = RouteClient::connect(crowd.broker, "localhost", &crowd.ca)
        .await
        .map_err(|e| DemoError::Agent(format!("connect to the broker: {e}")))?;
    say!(
        out,
        "{} route     {user} asks for a session in {GROUP}",
        clock.now()
    );
    let mut waited = false;
    let answer = client
        .route(
            RouteAsk {
                group: GROUP
                    .parse()
                    .map_err(|e| DemoError::Agent(format!("group name: {e}")))?,
                user: user.clone(),
                credential: Credential::Token(token),
                wait: true,
            },
            |position| {
                waited = true;
                say!(
                    out,
                    "{} route     {user}: no room yet, waiting (position {position})",
                    clock.now()
                );
            },
        )
        .await
        .map_err(|e| DemoError::Agent(format!("route: {e}")));
    client.close().await;
    Ok((answer?, waited))
}

/// The streaming server's side, on the chosen host: the ticket verified,
/// the session started under its id, ended after `hold`.
async fn host_session(
    crowd: &Crowd,
    user: &UserId,
    admission: &Admission,
    hold: Duration,
    out: &Output,
) -> Result<(), DemoError> {
    let (bin, clock) = (&crowd.bin, crowd.clock);
    let config = crowd.hosts.config(&admission.resource);
    let session = verify_ticket(bin, &config, admission, user).await?;
    agent_cli(
        bin,
        &config,
        &[
            "session",
            "start",
            "--session",
            &session,
            "--user",
            user.as_str(),
        ],
    )
    .await?;
    say!(
        out,
        "{} host      {}: ticket verified, session {session} of {user} started",
        clock.now(),
        admission.resource
    );
    tokio::time::sleep(hold).await;
    agent_cli(
        bin,
        &config,
        &[
            "session",
            "end",
            "--session",
            &session,
            "--reason",
            "logout",
        ],
    )
    .await?;
    say!(
        out,
        "{} host      {}: session {session} of {user} ended (logout)",
        clock.now(),
        admission.resource
    );
    Ok(())
}

/// `ferry-agent ticket verify` on the host; the ticket's session id, once
/// its session and user are the admission's.
async fn verify_ticket(
    bin: &Path,
    config: &Path,
    admission: &Admission,
    user: &UserId,
) -> Result<String, DemoError> {
    let verified = agent_cli(
        bin,
        config,
        &["ticket", "verify", &admission.ticket, "--json"],
    )
    .await?;
    let claims: serde_json::Value = serde_json::from_str(&verified)
        .map_err(|e| DemoError::Agent(format!("ticket verify output: {e}")))?;
    let session = claims["session"].as_str().unwrap_or_default().to_owned();
    if session != admission.session.as_str() || claims["user"] != user.as_str() {
        return Err(DemoError::Agent(format!(
            "the host read a different ticket: {verified}"
        )));
    }
    Ok(session)
}

/// SIGTERM (the agent drains cleanly), then SIGKILL if it does not exit in time.
async fn stop_agent(agent: &mut BaseAgent) {
    if let Ok(Some(_)) = agent.child.try_wait() {
        return;
    }
    if let Some(pid) = agent.child.id() {
        // `kill` from procps/util-linux: std has no SIGTERM and `unsafe` is denied.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .status()
            .await;
    }
    if tokio::time::timeout(AGENT_STOP_GRACE, agent.child.wait())
        .await
        .is_err()
    {
        let _ = agent.child.start_kill();
        let _ = agent.child.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_scales_with_the_duration() {
        let p = Plan::for_duration(Duration::from_secs(60));
        assert_eq!(p.arrival_gap, Duration::from_secs(1));
        assert_eq!(p.hold, Duration::from_secs(18));
        assert_eq!(p.max_idle, Duration::from_secs(6));
        assert_eq!(p.cooldown, Duration::from_secs(5));
        assert_eq!(p.wait_timeout, Duration::from_secs(10));
        let policy = p.policy();
        assert_eq!(policy.max_idle_ms, Some(6_000));
        assert_eq!(policy.scale_in_cooldown_ms, Some(5_000));
        assert_eq!(p.arrival(0), Duration::ZERO);
        assert_eq!(p.arrival(2), Duration::from_secs(2));
        assert_eq!(
            p.arrival(3),
            p.arrival(USERS - 1),
            "the rest arrive at once"
        );
        let short = Plan::for_duration(Duration::from_secs(40));
        assert_eq!(short.hold, Duration::from_secs(12));
        assert_eq!(short.arrival_gap, Duration::from_millis(600));
        assert_eq!(short.cooldown, Duration::from_millis(3300));
    }

    #[test]
    fn an_agent_under_the_directory_is_found_until_it_is_gone() {
        let dir = tempfile::tempdir().expect("tmp");
        let config = dir.path().join("h1/agent.toml");
        // A program named ferry-agent (a link to sh: a copy could fail to
        // start with ETXTBSY) with an argument under the directory; another
        // program with the same argument is not one.
        let fake = dir.path().join("bin/ferry-agent");
        std::fs::create_dir_all(fake.parent().expect("parent")).expect("mkdir");
        std::os::unix::fs::symlink("/bin/sh", &fake).expect("link sh");
        let spawn = |program: &Path| {
            std::process::Command::new(program)
                .arg("-c")
                .arg("read _")
                .arg(&config)
                .stdin(Stdio::piped())
                .spawn()
                .expect("spawn")
        };
        assert!(agents_under(dir.path()).is_empty());
        let mut other = spawn(Path::new("/bin/sh"));
        let mut agent = spawn(&fake);
        // `spawn` returns once the child is inside execve, which can be
        // before the kernel has set up its new argv: /proc/PID/cmdline reads
        // empty for that moment. Wait (bounded) until the argv is there.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut found = agents_under(dir.path());
        while found.is_empty() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
            found = agents_under(dir.path());
        }
        assert_eq!(found, [agent.id()]);
        for child in [&mut agent, &mut other] {
            drop(child.stdin.take());
            child.wait().expect("wait");
        }
        assert!(agents_under(dir.path()).is_empty());
    }
}
