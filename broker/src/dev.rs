//! `ferry-broker dev`: Ferry on one machine in one command. A throwaway CA
//! and state directory, the broker in-process on 127.0.0.1:0, N real
//! `ferry-agent` processes, a few sessions reported through the agent CLI,
//! and the resources and sessions tables printed as they change. Everything
//! is stopped and removed at the end.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ferry_common::admin::{AdminRequestV1, AdminResponseV1};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminClient, AdminClientError};
use crate::config::BrokerConfig;
use crate::daemon::{self, BrokerError, BrokerReady};
use crate::pki::{self, PkiError};
use crate::render;

/// How often the tables are re-read; they are printed only when they change.
const REFRESH: Duration = Duration::from_secs(1);

/// How long an agent gets to exit after SIGTERM before it is killed.
const AGENT_STOP_GRACE: Duration = Duration::from_secs(10);

/// What `dev` runs.
#[derive(Clone, Debug)]
pub struct DevOptions {
    /// Number of agent processes.
    pub agents: usize,
    /// How long to run before stopping by itself.
    pub duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{0} not found; build it first: cargo build --release")]
    MissingAgent(PathBuf),
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
    #[error("{0}")]
    Agent(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevError {
    let what = what.into();
    move |error| DevError::Io { what, error }
}

/// The `ferry-agent` binary next to the running executable.
pub fn agent_binary() -> Result<PathBuf, DevError> {
    let exe = std::env::current_exe().map_err(io("find the running executable"))?;
    let bin = exe
        .parent()
        .map(|d| d.join("ferry-agent"))
        .unwrap_or_else(|| PathBuf::from("ferry-agent"));
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(DevError::MissingAgent(bin))
    }
}

struct DevAgent {
    resource: String,
    config: PathBuf,
    child: Child,
}

/// Runs the demo until `duration` passes or `shutdown` is cancelled.
pub async fn run(opts: DevOptions, shutdown: CancellationToken) -> Result<(), DevError> {
    let agent_bin = agent_binary()?;
    let tmp = tempfile::Builder::new()
        .prefix("ferry-dev-")
        .tempdir()
        .map_err(io("create a temporary directory"))?;
    let root = tmp.path().to_path_buf();
    println!("ferry dev: working in {}", root.display());

    let pki_dir = root.join("pki");
    pki::init(&pki_dir, &[])?;
    let config = BrokerConfig {
        state_dir: root.join("broker"),
        pki_dir: pki_dir.clone(),
        listen: "127.0.0.1:0"
            .parse()
            .map_err(|_| DevError::BrokerNotReady)?,
        admin_socket: root.join("admin.sock"),
        health_interval: Duration::from_secs(2),
        missed_health_limit: 3,
        shutdown_grace: Duration::from_secs(5),
        groups: Default::default(),
    };
    let broker_stop = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let broker = tokio::spawn(daemon::run(config, broker_stop.clone(), ready_tx));
    let ready = match ready_rx.await {
        Ok(r) => r,
        Err(_) => {
            return Err(match broker.await {
                Ok(Err(e)) => e.into(),
                _ => DevError::BrokerNotReady,
            })
        }
    };
    println!(
        "ferry dev: broker on {} (admin socket {})",
        ready.agent_addr,
        ready.admin_socket.display()
    );
    println!(
        "ferry dev: try `ferryctl --socket {} resources list` in another terminal",
        ready.admin_socket.display()
    );

    let mut agents = Vec::new();
    let result = tokio::select! {
        // Ctrl-C while agents start or sync stops right away, too.
        _ = shutdown.cancelled() => Ok(()),
        r = async {
            for i in 1..=opts.agents {
                agents.push(start_agent(&agent_bin, &root, &pki_dir, &ready, i).await?);
            }
            demo(&agent_bin, &mut agents, &ready, &opts, &shutdown).await
        } => r,
    };

    for agent in &mut agents {
        stop_agent(agent).await;
    }
    broker_stop.cancel();
    let broker_result = broker.await;
    drop(tmp);
    println!("ferry dev: stopped; removed {}", root.display());
    result?;
    match broker_result {
        Ok(r) => r.map_err(DevError::from),
        Err(e) => Err(DevError::Agent(format!("broker task failed: {e}"))),
    }
}

async fn start_agent(
    bin: &Path,
    root: &Path,
    pki_dir: &Path,
    ready: &BrokerReady,
    i: usize,
) -> Result<DevAgent, DevError> {
    let resource = format!("dev-host-{i}");
    let dir = root.join(&resource);
    pki::issue_agent(
        pki_dir,
        &resource
            .parse()
            .map_err(|e| DevError::Agent(format!("{e}")))?,
        &dir,
    )?;
    let config = dir.join("agent.toml");
    let text = format!(
        "resource = {resource:?}\n\
         group = \"dev\"\n\
         broker_addr = \"{addr}\"\n\
         broker_name = \"localhost\"\n\
         ca_cert = {ca:?}\n\
         cert = {cert:?}\n\
         key = {key:?}\n\
         state_dir = {state:?}\n\
         local_socket = {sock:?}\n\
         image_version = \"dev\"\n",
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
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(true)
        .spawn()
        .map_err(io(format!("start {}", bin.display())))?;
    println!(
        "ferry dev: started agent {resource} (pid {})",
        child.id().unwrap_or(0)
    );
    Ok(DevAgent {
        resource,
        config,
        child,
    })
}

/// Runs one `ferry-agent` CLI verb against an agent's config.
async fn agent_cli(bin: &Path, agent: &DevAgent, args: &[&str]) -> Result<(), DevError> {
    let out = Command::new(bin)
        .arg("--config")
        .arg(&agent.config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(io(format!("run {}", bin.display())))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DevError::Agent(format!(
            "ferry-agent {} for {}: {}",
            args.join(" "),
            agent.resource,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// One step of the demo's script.
enum Step {
    Start {
        host: usize,
        session: String,
        user: String,
    },
    End {
        host: usize,
        session: String,
    },
}

fn script(agents: usize) -> Vec<(Duration, Step)> {
    let mut steps = Vec::new();
    for host in 0..agents {
        for (n, user) in ["alice", "bob"].iter().enumerate() {
            steps.push((
                Duration::from_secs(1 + n as u64),
                Step::Start {
                    host,
                    session: format!("dev-{}-{}", host + 1, n + 1),
                    user: format!("{user}{}", host + 1),
                },
            ));
        }
        steps.push((
            Duration::from_secs(6),
            Step::End {
                host,
                session: format!("dev-{}-1", host + 1),
            },
        ));
    }
    steps.sort_by_key(|(at, _)| *at);
    steps
}

async fn demo(
    bin: &Path,
    agents: &mut [DevAgent],
    ready: &BrokerReady,
    opts: &DevOptions,
    shutdown: &CancellationToken,
) -> Result<(), DevError> {
    for agent in agents.iter() {
        agent_cli(bin, agent, &["status", "--wait-synced", "--timeout", "30s"]).await?;
    }
    println!(
        "ferry dev: {} agent(s) connected; Ctrl-C stops",
        agents.len()
    );
    let started = Instant::now();
    let deadline = started + opts.duration;
    let mut steps = script(agents.len()).into_iter().peekable();
    let mut last_shown = String::new();
    let mut client = AdminClient::connect(&ready.admin_socket).await?;
    let mut tick = tokio::time::interval(REFRESH);
    loop {
        while let Some((at, _)) = steps.peek() {
            if started + *at > Instant::now() {
                break;
            }
            if let Some((_, step)) = steps.next() {
                run_step(bin, agents, step).await?;
            }
        }
        let (shown, key) = tables(&mut client).await?;
        if key != last_shown {
            println!(
                "\n--- {} ---\n{shown}",
                render::rfc3339(crate::link::now_millis())
            );
            last_shown = key;
        }
        for agent in agents.iter_mut() {
            if let Ok(Some(status)) = agent.child.try_wait() {
                return Err(DevError::Agent(format!(
                    "agent {} exited ({status}); see its agent.log",
                    agent.resource
                )));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            _ = tick.tick() => {}
        }
    }
}

async fn run_step(bin: &Path, agents: &[DevAgent], step: Step) -> Result<(), DevError> {
    match step {
        Step::Start {
            host,
            session,
            user,
        } => {
            if let Some(agent) = agents.get(host) {
                agent_cli(
                    bin,
                    agent,
                    &["session", "start", "--session", &session, "--user", &user],
                )
                .await?;
                println!(
                    "ferry dev: {} reported session {session} started",
                    agent.resource
                );
            }
        }
        Step::End { host, session } => {
            if let Some(agent) = agents.get(host) {
                agent_cli(
                    bin,
                    agent,
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
                println!(
                    "ferry dev: {} reported session {session} ended",
                    agent.resource
                );
            }
        }
    }
    Ok(())
}

/// The tables to print, and the same without health times: a new health
/// report alone is not a change worth printing.
async fn tables(client: &mut AdminClient) -> Result<(String, String), DevError> {
    let (mut out, mut key) = (String::new(), String::new());
    if let AdminResponseV1::Resources(mut r) = client.call(AdminRequestV1::ListResources).await? {
        out.push_str(&render::resources_table(&r));
        for res in &mut r {
            res.last_health_at = None;
        }
        key.push_str(&render::resources_table(&r));
    }
    out.push('\n');
    if let AdminResponseV1::Sessions(s) = client
        .call(AdminRequestV1::ListSessions { all: true })
        .await?
    {
        let sessions = render::sessions_table(&s);
        out.push_str(&sessions);
        key.push_str(&sessions);
    }
    Ok((out, key))
}

/// SIGTERM (the agent drains cleanly), then SIGKILL if it does not exit in time.
async fn stop_agent(agent: &mut DevAgent) {
    if let Ok(Some(_)) = agent.child.try_wait() {
        return;
    }
    if let Some(pid) = agent.child.id() {
        // `kill` from procps/util-linux: std has no SIGTERM and `unsafe` is denied.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
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
