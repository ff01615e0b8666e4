//! The real binaries as child processes, set up as an operator would: PKI
//! files from `ferryctl pki`, TOML config files, a fake `NOTIFY_SOCKET` for
//! readiness.
//!
//! Every child is killed when its [`Daemon`] is dropped, so a failing test
//! leaves no process behind; a panicking test prints the child's log.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::process::{Child, ChildStderr, Command};

use crate::bins::bin;
use crate::harness::PATIENCE;
use crate::notify::FakeNotifySocket;

/// Health interval of broker processes: a loaded machine running debug
/// builds must not miss three in a row.
pub const PROCESS_HEALTH_INTERVAL: &str = "1s";

/// `shutdown_grace` of broker processes.
pub const PROCESS_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A daemon child process, killed (SIGKILL) on drop.
pub struct Daemon {
    /// What it is, for messages.
    name: String,
    /// The process; `kill_on_drop` is set.
    child: Child,
    /// Its stderr (the log), written to a file.
    log: PathBuf,
}

/// How a daemon is started beyond its command line.
#[derive(Debug, Default)]
pub struct Launch {
    /// Extra environment variables (e.g. `RUST_LOG`).
    pub env: Vec<(String, String)>,
    /// Where its stderr goes.
    pub stderr: StderrTo,
    /// A command the daemon's command line is appended to, which must end
    /// by exec'ing it (so the child's pid is the daemon's): e.g. `unshare`
    /// into a private mount namespace with a small tmpfs on its state
    /// directory. Empty: the daemon is run directly.
    pub wrap: Vec<OsString>,
}

/// Where a daemon's stderr goes.
#[derive(Debug, Default)]
pub enum StderrTo {
    /// Its log file (read by [`Daemon::log`]).
    #[default]
    Log,
    /// A pipe whose read end is handed to the test, which decides whether
    /// it is ever read (or closes it at once).
    Pipe,
    /// A copy of this descriptor (e.g. a socket the test filled up).
    Fd(std::os::fd::OwnedFd),
}

impl Daemon {
    /// Spawns `cmd` with stdout discarded and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: Command, log: &Path) -> anyhow::Result<Daemon> {
        Ok(Daemon::launch(name, cmd, log, &Launch::default())?.0)
    }

    /// Spawns `cmd` as `launch` says; stderr goes to `log` unless it is a
    /// pipe, whose read end is returned.
    pub fn launch(
        name: &str,
        mut cmd: Command,
        log: &Path,
        launch: &Launch,
    ) -> anyhow::Result<(Daemon, Option<ChildStderr>)> {
        let stderr = match &launch.stderr {
            StderrTo::Pipe => Stdio::piped(),
            StderrTo::Fd(fd) => fd.try_clone().context("duplicate stderr")?.into(),
            StderrTo::Log => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .with_context(|| format!("open log {}", log.display()))?
                .into(),
        };
        if let Some((program, args)) = launch.wrap.split_first() {
            cmd = wrapped(program, args, &cmd);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
        let pipe = child.stderr.take();
        Ok((
            Daemon {
                name: name.to_owned(),
                child,
                log: log.to_owned(),
            },
            pipe,
        ))
    }

    /// The process id, while it has not been reaped.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child
            .id()
            .ok_or_else(|| anyhow!("{} has already exited", self.name))
    }

    /// Sends a signal (`TERM`, `KILL`, ...) with kill(1): the workspace
    /// denies unsafe code, so there is no libc call here.
    pub async fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid()?.to_string();
        let out = run(Path::new("kill"), [format!("-{signal}"), pid]).await?;
        if !out.status.success() {
            bail!(
                "kill -{signal} {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Waits for the process to exit, failing after `limit`.
    pub async fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .with_context(|| format!("{} still running after {limit:?}", self.name))?
            .with_context(|| format!("wait for {}", self.name))
    }

    /// SIGKILL, then reap: a crash.
    pub async fn crash(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal("KILL").await?;
        self.wait(PATIENCE).await
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// What a private mount namespace gets before its program starts
/// ([`private_mounts`]).
pub enum Mount<'a> {
    /// `mount --bind FROM TO`.
    Bind(&'a Path, &'a Path),
    /// The directory as a read-only bind mount of itself (its content
    /// unchanged).
    ReadOnly(&'a Path),
    /// A fresh tmpfs on the directory, of `size` (`1m`) and `mode`
    /// (`0700`), with these subdirectories.
    Tmpfs {
        dir: &'a Path,
        size: &'a str,
        mode: &'a str,
        subdirs: &'a [&'a str],
    },
}

/// The command prefix that runs a program in a private mount namespace
/// with `mounts` (for [`Launch::wrap`]; the program's command line follows
/// and is exec'ed, so its pid is the program's).
pub fn private_mounts(mounts: &[Mount<'_>]) -> Vec<OsString> {
    let script = r#"set -e
while [ "$1" != -- ]; do
  case "$1" in
    bind) mount --bind "$2" "$3"; shift 3 ;;
    ro) mount --bind "$2" "$2"; mount -o remount,bind,ro "$2"; shift 2 ;;
    tmpfs) mount -t tmpfs -o "size=$3,mode=$4" ferry-test "$2"; d="$2"; shift 4
      while [ "$1" = mkdir ]; do mkdir -p "$d/$2"; shift 2; done ;;
    *) echo "unknown mount $1" >&2; exit 2 ;;
  esac
done
shift
exec "$@""#;
    let mut wrap: Vec<OsString> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ]
    .map(OsString::from)
    .into();
    for m in mounts {
        match m {
            Mount::Bind(from, to) => {
                wrap.push("bind".into());
                wrap.push(from.as_os_str().to_owned());
                wrap.push(to.as_os_str().to_owned());
            }
            Mount::ReadOnly(dir) => {
                wrap.push("ro".into());
                wrap.push(dir.as_os_str().to_owned());
            }
            Mount::Tmpfs {
                dir,
                size,
                mode,
                subdirs,
            } => {
                wrap.push("tmpfs".into());
                wrap.push(dir.as_os_str().to_owned());
                wrap.push((*size).into());
                wrap.push((*mode).into());
                for s in *subdirs {
                    wrap.push("mkdir".into());
                    wrap.push((*s).into());
                }
            }
        }
    }
    wrap.push("--".into());
    wrap
}

/// `cmd` run by `program args...`, which gets its program and arguments
/// after its own; the environment and directory are `cmd`'s.
fn wrapped(program: &OsStr, args: &[OsString], cmd: &Command) -> Command {
    let inner = cmd.as_std();
    let mut out = Command::new(program);
    out.args(args)
        .arg(inner.get_program())
        .args(inner.get_args());
    for (key, value) in inner.get_envs() {
        match value {
            Some(v) => out.env(key, v),
            None => out.env_remove(key),
        };
    }
    if let Some(dir) = inner.get_current_dir() {
        out.current_dir(dir);
    }
    out
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log());
        }
        // kill_on_drop sends SIGKILL if it still runs.
    }
}

/// Runs a command to completion (at most [`PATIENCE`]), capturing its output.
pub async fn run<I, S>(program: &Path, args: I) -> anyhow::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let shown = format!("{cmd:?}");
    tokio::time::timeout(PATIENCE, cmd.output())
        .await
        .with_context(|| format!("{shown} did not finish in {PATIENCE:?}"))?
        .with_context(|| format!("run {shown}"))
}

/// Runs a command that must succeed; returns its stdout.
pub async fn run_ok<I, S>(program: &Path, args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = run(program, &args).await?;
    if !out.status.success() {
        bail!(
            "{} {:?} failed ({}): {}",
            program.display(),
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).context("stdout is not UTF-8")
}

/// Running `ferry-agent` processes whose arguments name a file in a
/// directory under `root` (`root/<resource>/...`), by resource: the hosts a
/// provisioner started there.
pub fn agents_under(root: &Path) -> BTreeMap<String, Vec<u32>> {
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (pid, args) in running_processes() {
        for arg in args {
            if let Ok(rest) = Path::new(&arg).strip_prefix(root) {
                if let Some(resource) = rest.parent().and_then(|p| p.to_str()) {
                    out.entry(resource.to_owned()).or_default().push(pid);
                }
            }
        }
    }
    out
}

/// Kills, when dropped, every agent still running under its root
/// ([`agents_under`]): a failing test must not leave hosts behind (a killed
/// broker cannot stop or delete them, which is what such tests are about).
pub struct NoLeftovers(pub PathBuf);

impl Drop for NoLeftovers {
    fn drop(&mut self) {
        for pid in agents_under(&self.0).values().flatten() {
            // Best effort: kill(1) (the workspace denies unsafe code).
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// Every running process (a zombie is not running) as its pid and its
/// arguments; a process that ends or cannot be read meanwhile is left out.
pub fn running_processes() -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let (Ok(cmdline), Ok(stat)) = (
            std::fs::read(entry.path().join("cmdline")),
            std::fs::read_to_string(entry.path().join("stat")),
        ) else {
            continue;
        };
        // The state follows the command name, which ends at the last ')'.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        if state == Some("Z") {
            continue;
        }
        let args = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        out.push((pid, args));
    }
    out
}

/// `group publish` arguments of a fixed-size group: `base` hosts of
/// `concurrent` sessions each, no elastic resource (a usage threshold of
/// 80 % and a long idle time, which nothing here reaches).
pub fn fixed_size<'a>(base: &'a str, concurrent: &'a str) -> Vec<&'a str> {
    vec![
        "--base-resources",
        base,
        "--concurrent-sessions",
        concurrent,
        "--max-elastic",
        "0",
        "--usage-threshold",
        "80",
        "--scale-out-step",
        "1",
        "--max-idle",
        "1h",
    ]
}

/// `ferryctl group publish` of a pay-as-you-go group `name` in one region,
/// office network, spec and image (`img-7`, what test agents run), with
/// the `policy` flags (base resources, limits, thresholds) after them.
pub async fn publish_payg(
    socket: &Path,
    name: &str,
    policy: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let mut args = vec![
        "group",
        "publish",
        "--name",
        name,
        "--region",
        "cn-hangzhou",
        "--office-network",
        "office-net-1",
        "--spec",
        "office-4c8g",
        "--image",
        "img-7",
        "--billing",
        "pay-as-you-go",
    ];
    args.extend_from_slice(policy);
    ferryctl_json(socket, &args).await
}

/// `ferryctl --socket SOCKET ARGS... --json`, parsed.
pub async fn ferryctl_json(socket: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut all: Vec<&OsStr> = vec![OsStr::new("--socket"), socket.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    all.push(OsStr::new("--json"));
    let out = run_ok(&bin("ferryctl"), all).await?;
    serde_json::from_str(&out).with_context(|| format!("ferryctl {args:?} printed {out:?}"))
}

/// `group`'s live resources, asked through the broker at `socket`, as
/// (resource, class, state, available).
pub async fn live_resources(
    socket: &Path,
    group: &str,
) -> anyhow::Result<Vec<(String, String, String, bool)>> {
    let g = ferryctl_json(socket, &["group", "show", group]).await?;
    let mut out = Vec::new();
    for r in g["live"]["resources"]
        .as_array()
        .context("live resources")?
    {
        out.push((
            r["resource"].as_str().context("resource")?.to_owned(),
            r["class"].as_str().context("class")?.to_owned(),
            r["state"].as_str().context("state")?.to_owned(),
            r["available"].as_bool().context("available")?,
        ));
    }
    Ok(out)
}

/// Waits (at most three [`PATIENCE`]s) until every elastic resource of
/// `group` is released (or its creation failed).
pub async fn wait_elastic_released(socket: &Path, group: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
    loop {
        let l = live_resources(socket, group).await?;
        if l.iter()
            .filter(|r| r.1 == "elastic")
            .all(|r| matches!(r.2.as_str(), "released" | "failed"))
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("elastic resources are not all released: {l:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (blocking this worker thread, which a multi-thread runtime allows)
/// for a notification line, returning every line seen on the way.
pub fn wait_notify(
    socket: &FakeNotifySocket,
    line: &str,
    limit: Duration,
) -> anyhow::Result<Vec<String>> {
    tokio::task::block_in_place(|| socket.wait_for(line, limit))
        .with_context(|| format!("wait for {line} on the notify socket"))
}

/// The files of a broker run from the command line.
pub struct BrokerFiles {
    /// Root of everything below.
    pub dir: PathBuf,
    /// `ferryctl pki init` output.
    pub pki_dir: PathBuf,
    /// The SQLite state directory.
    pub state_dir: PathBuf,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// TOML appended to every config written (e.g. a `[provisioner]` table).
    pub extra_config: String,
}

impl BrokerFiles {
    /// Sends one admin request to the broker running on these files; an
    /// `Error` answer is an `Err`.
    pub async fn admin(
        &self,
        req: ferry_common::admin::AdminRequestV1,
    ) -> anyhow::Result<ferry_common::admin::AdminResponseV1> {
        let what = format!("admin {req:?}");
        tokio::time::timeout(
            PATIENCE,
            ferry_broker::admin::request(&self.admin_socket, req),
        )
        .await
        .with_context(|| format!("{what} timed out"))?
        .with_context(|| what)
    }

    /// Creates the CA and broker certificate with `ferryctl pki init`.
    pub async fn init(dir: &Path) -> anyhow::Result<BrokerFiles> {
        let files = BrokerFiles {
            dir: dir.to_owned(),
            pki_dir: dir.join("pki"),
            state_dir: dir.join("state"),
            admin_socket: dir.join("admin.sock"),
            extra_config: String::new(),
        };
        run_ok(
            &bin("ferryctl"),
            [OsStr::new("pki"), OsStr::new("init"), OsStr::new("--dir")]
                .into_iter()
                .chain([files.pki_dir.as_os_str()]),
        )
        .await?;
        Ok(files)
    }

    /// Issues an agent identity with `ferryctl pki issue-agent` into `out`.
    pub async fn issue_agent(&self, resource: &str, out: &Path) -> anyhow::Result<()> {
        let mut args: Vec<&OsStr> = vec!["pki", "issue-agent", "--dir"]
            .into_iter()
            .map(OsStr::new)
            .collect();
        args.push(self.pki_dir.as_os_str());
        args.extend([OsStr::new("--resource"), OsStr::new(resource)]);
        args.extend([OsStr::new("--out"), out.as_os_str()]);
        run_ok(&bin("ferryctl"), args).await?;
        Ok(())
    }

    /// `ferryctl resources assign RESOURCE GROUP` on the running broker.
    pub async fn assign(&self, resource: &str, group: &str) -> anyhow::Result<()> {
        let args: Vec<&OsStr> = vec![
            OsStr::new("--socket"),
            self.admin_socket.as_os_str(),
            OsStr::new("resources"),
            OsStr::new("assign"),
            OsStr::new(resource),
            OsStr::new(group),
        ];
        run_ok(&bin("ferryctl"), args).await?;
        Ok(())
    }

    /// Writes a config file listening on `listen` and returns its path.
    pub fn write_config(&self, listen: SocketAddr) -> anyhow::Result<PathBuf> {
        let path = self.dir.join("broker.toml");
        let text = format!(
            "state_dir = {state:?}\npki_dir = {pki:?}\nlisten = \"{listen}\"\n\
             admin_socket = {admin:?}\nhealth_interval = \"{PROCESS_HEALTH_INTERVAL}\"\n\
             missed_health_limit = 3\nshutdown_grace = \"{grace}s\"\n",
            state = self.state_dir,
            pki = self.pki_dir,
            admin = self.admin_socket,
            grace = PROCESS_SHUTDOWN_GRACE.as_secs(),
        );
        let text = format!("{text}{}", self.extra_config);
        std::fs::write(&path, text).context("write broker config")?;
        Ok(path)
    }
}

/// A `ferry-broker run` process that said READY=1.
pub struct BrokerProcess {
    /// The process.
    pub daemon: Daemon,
    /// Its notify socket, for STOPPING=1.
    pub notify: FakeNotifySocket,
    /// Where agents connect, from the READY notification's STATUS line.
    pub agent_addr: SocketAddr,
    /// Where metrics are served (`[metrics] listen`), from the same line.
    pub metrics_addr: Option<SocketAddr>,
}

impl BrokerProcess {
    /// Starts `ferry-broker run` on `files` listening on `listen` (port 0 is
    /// fine) and waits for READY=1. `run` numbers the notify socket and log
    /// of successive runs on the same files.
    pub async fn start(
        files: &BrokerFiles,
        listen: SocketAddr,
        run: u32,
    ) -> anyhow::Result<BrokerProcess> {
        Ok(
            BrokerProcess::launch(files, listen, run, &Launch::default())
                .await?
                .0,
        )
    }

    /// As [`BrokerProcess::start`], started as `launch` says; returns the
    /// stderr pipe if it asked for one.
    pub async fn launch(
        files: &BrokerFiles,
        listen: SocketAddr,
        run: u32,
        launch: &Launch,
    ) -> anyhow::Result<(BrokerProcess, Option<ChildStderr>)> {
        let config = files.write_config(listen)?;
        let notify_dir = files.dir.join(format!("notify-{run}"));
        std::fs::create_dir_all(&notify_dir)?;
        let notify = FakeNotifySocket::bind(&notify_dir)?;
        let mut cmd = Command::new(bin("ferry-broker"));
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env("NOTIFY_SOCKET", notify.path());
        let log = files.dir.join(format!("broker-{run}.log"));
        let (daemon, pipe) =
            Daemon::launch(&format!("ferry-broker (run {run})"), cmd, &log, launch)?;
        let lines = match wait_notify(&notify, "READY=1", PATIENCE) {
            Ok(lines) => lines,
            Err(e) => bail!("{e:#}\n----- broker log -----\n{}", daemon.log()),
        };
        let agent_addr = ready_addr(&lines)?;
        let metrics_addr = ready_metrics_addr(&lines)?;
        Ok((
            BrokerProcess {
                daemon,
                notify,
                agent_addr,
                metrics_addr,
            },
            pipe,
        ))
    }
}

/// Spawns `ferry-agent --config CONFIG run` for `resource` (its log next to
/// the config) and waits for its READY=1 on `notify`; returns the metrics
/// address its READY status named, if any.
fn spawn_agent(
    resource: &str,
    config: &Path,
    notify: &FakeNotifySocket,
    launch: &Launch,
) -> anyhow::Result<(Daemon, Option<ChildStderr>, Option<SocketAddr>)> {
    let log = config.with_file_name("agent.log");
    let mut cmd = Command::new(bin("ferry-agent"));
    cmd.arg("--config")
        .arg(config)
        .arg("run")
        .env("NOTIFY_SOCKET", notify.path());
    let (daemon, pipe) = Daemon::launch(&format!("ferry-agent {resource}"), cmd, &log, launch)?;
    let lines = match wait_notify(notify, "READY=1", PATIENCE) {
        Ok(lines) => lines,
        Err(e) => bail!("{e:#}\n----- agent log -----\n{}", daemon.log()),
    };
    let metrics = agent_metrics_addr(&lines)?;
    Ok((daemon, pipe, metrics))
}

/// The metrics address in an agent's READY notification, if it serves
/// metrics.
pub fn agent_metrics_addr(lines: &[String]) -> anyhow::Result<Option<SocketAddr>> {
    let Some(status) = lines.iter().find_map(|l| l.strip_prefix("STATUS=")) else {
        return Ok(None);
    };
    let addr = status
        .strip_prefix(ferry_agent::notify::READY_STATUS_METRICS)
        .ok_or_else(|| anyhow!("unexpected STATUS {status:?}"))?;
    Ok(Some(addr.parse().with_context(|| {
        format!("metrics address in STATUS {status:?}")
    })?))
}

/// The agent address in the broker's READY notification.
pub fn ready_addr(lines: &[String]) -> anyhow::Result<SocketAddr> {
    let status = ready_status(lines)?;
    let rest = status
        .strip_prefix(ferry_broker::notify::READY_STATUS_PREFIX)
        .ok_or_else(|| anyhow!("unexpected STATUS {status:?}"))?;
    let addr = match rest.split_once(ferry_broker::notify::READY_STATUS_METRICS) {
        Some((agents, _)) => agents,
        None => rest,
    };
    addr.parse()
        .with_context(|| format!("agent address in STATUS {status:?}"))
}

/// The metrics address in the broker's READY notification, if it serves
/// metrics.
pub fn ready_metrics_addr(lines: &[String]) -> anyhow::Result<Option<SocketAddr>> {
    let status = ready_status(lines)?;
    match status.split_once(ferry_broker::notify::READY_STATUS_METRICS) {
        None => Ok(None),
        Some((_, addr)) => {
            Ok(Some(addr.parse().with_context(|| {
                format!("metrics address in STATUS {status:?}")
            })?))
        }
    }
}

fn ready_status(lines: &[String]) -> anyhow::Result<&str> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("STATUS="))
        .ok_or_else(|| anyhow!("no STATUS= line in {lines:?}"))
}

/// A `ferry-agent run` process that said READY=1.
pub struct AgentProcess {
    /// The process.
    pub daemon: Daemon,
    /// Its notify socket, for STOPPING=1.
    pub notify: FakeNotifySocket,
    /// Its config file (the CLI verbs read the local socket from it).
    pub config: PathBuf,
    /// Its local socket.
    pub local_socket: PathBuf,
    /// Where it serves metrics (`[metrics] listen`), from its READY status.
    pub metrics_addr: Option<SocketAddr>,
}

impl AgentProcess {
    /// Issues an identity for `resource`, writes a config under
    /// `broker.dir/<resource>/` pointing at `broker_addr`, starts
    /// `ferry-agent run` and waits for READY=1.
    pub async fn start(
        broker: &BrokerFiles,
        resource: &str,
        broker_addr: SocketAddr,
    ) -> anyhow::Result<AgentProcess> {
        AgentProcess::start_in_group(broker, resource, broker_addr, None).await
    }

    /// As [`AgentProcess::start`], started as `launch` says; returns the
    /// stderr pipe if it asked for one.
    pub async fn launch(
        broker: &BrokerFiles,
        resource: &str,
        broker_addr: SocketAddr,
        launch: &Launch,
    ) -> anyhow::Result<(AgentProcess, Option<ChildStderr>)> {
        AgentProcess::launch_in_group(broker, resource, broker_addr, None, "", launch).await
    }

    /// As [`AgentProcess::start`], with `group = "..."` in the config when
    /// `group` is set: the agent names its delivery group in its `Hello`.
    pub async fn start_in_group(
        broker: &BrokerFiles,
        resource: &str,
        broker_addr: SocketAddr,
        group: Option<&str>,
    ) -> anyhow::Result<AgentProcess> {
        let launch = Launch::default();
        Ok(
            AgentProcess::launch_in_group(broker, resource, broker_addr, group, "", &launch)
                .await?
                .0,
        )
    }

    /// As [`AgentProcess::start_in_group`], with `extra` TOML (e.g. a
    /// `[hooks]` table) at the end of its config.
    pub async fn start_configured(
        broker: &BrokerFiles,
        resource: &str,
        broker_addr: SocketAddr,
        group: Option<&str>,
        extra: &str,
    ) -> anyhow::Result<AgentProcess> {
        let launch = Launch::default();
        Ok(
            AgentProcess::launch_in_group(broker, resource, broker_addr, group, extra, &launch)
                .await?
                .0,
        )
    }

    async fn launch_in_group(
        broker: &BrokerFiles,
        resource: &str,
        broker_addr: SocketAddr,
        group: Option<&str>,
        extra: &str,
        launch: &Launch,
    ) -> anyhow::Result<(AgentProcess, Option<ChildStderr>)> {
        let home = broker.dir.join(resource);
        let id = home.join("id");
        broker.issue_agent(resource, &id).await?;
        let local_socket = home.join("agent.sock");
        let config = home.join("agent.toml");
        let text = format!(
            "resource = {resource:?}\nbroker_addr = \"{broker_addr}\"\nbroker_name = \"localhost\"\n\
             ca_cert = {ca:?}\ncert = {cert:?}\nkey = {key:?}\nstate_dir = {state:?}\n\
             local_socket = {sock:?}\nimage_version = \"img-7\"\n",
            ca = id.join(ferry_broker::pki::CA_CERT),
            cert = id.join(ferry_broker::pki::AGENT_CERT),
            key = id.join(ferry_broker::pki::AGENT_KEY),
            state = home.join("state"),
            sock = local_socket,
        );
        let text = match group {
            Some(group) => {
                // The operator's step: the broker decides membership.
                broker.assign(resource, group).await?;
                format!("{text}group = {group:?}\n")
            }
            None => text,
        };
        let text = format!("{text}{extra}");
        std::fs::write(&config, text).context("write agent config")?;
        let notify = FakeNotifySocket::bind(&home)?;
        let (daemon, pipe, metrics_addr) = spawn_agent(resource, &config, &notify, launch)?;
        Ok((
            AgentProcess {
                daemon,
                notify,
                config,
                local_socket,
                metrics_addr,
            },
            pipe,
        ))
    }

    /// Starts the agent again on the same config and state directory (after
    /// [`Daemon::crash`], say) and waits for READY=1; `run` numbers the
    /// notify socket of successive runs.
    pub async fn restart(&mut self, run: u32) -> anyhow::Result<()> {
        let home = self
            .config
            .parent()
            .context("the agent config has a directory")?;
        let resource = home
            .file_name()
            .and_then(|n| n.to_str())
            .context("the agent directory is named after the resource")?
            .to_owned();
        let notify_dir = home.join(format!("notify-{run}"));
        std::fs::create_dir_all(&notify_dir)?;
        let notify = FakeNotifySocket::bind(&notify_dir)?;
        let (daemon, _, metrics_addr) =
            spawn_agent(&resource, &self.config, &notify, &Launch::default())?;
        self.daemon = daemon;
        self.notify = notify;
        self.metrics_addr = metrics_addr;
        Ok(())
    }

    /// `ferry-agent --config F ARGS...`, which must succeed; returns stdout.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all: Vec<&OsStr> = vec![OsStr::new("--config"), self.config.as_os_str()];
        all.extend(args.iter().map(OsStr::new));
        run_ok(&bin("ferry-agent"), all).await
    }

    /// `ferry-agent session start --trusted --session SESSION --user USER`:
    /// the operator's word, as the crash tests' streaming server.
    pub async fn start_session(&self, session: &str, user: &str) -> anyhow::Result<String> {
        self.cli(&[
            "session",
            "start",
            "--trusted",
            "--session",
            session,
            "--user",
            user,
        ])
        .await
    }

    /// `ferry-agent status --wait-synced --json`, parsed.
    pub async fn wait_synced(&self) -> anyhow::Result<serde_json::Value> {
        let timeout = format!("{}s", PATIENCE.as_secs());
        let out = self
            .cli(&["status", "--wait-synced", "--timeout", &timeout, "--json"])
            .await?;
        serde_json::from_str(&out).with_context(|| format!("status printed {out:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_address_is_read_from_the_ready_status() {
        let lines = vec![
            "READY=1".to_owned(),
            format!(
                "STATUS={}127.0.0.1:4567",
                ferry_broker::notify::READY_STATUS_PREFIX
            ),
        ];
        assert_eq!(
            ready_addr(&lines).expect("address"),
            "127.0.0.1:4567".parse::<SocketAddr>().expect("addr")
        );
        assert!(ready_addr(&["READY=1".to_owned()]).is_err());
        assert_eq!(ready_metrics_addr(&lines).expect("status"), None);
        let lines = vec![format!(
            "STATUS={}127.0.0.1:4567{}127.0.0.1:9464",
            ferry_broker::notify::READY_STATUS_PREFIX,
            ferry_broker::notify::READY_STATUS_METRICS
        )];
        assert_eq!(
            ready_addr(&lines).expect("address"),
            "127.0.0.1:4567".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(
            ready_metrics_addr(&lines).expect("status"),
            Some("127.0.0.1:9464".parse::<SocketAddr>().expect("addr"))
        );
        assert!(ready_addr(&["STATUS=starting".to_owned()]).is_err());
    }
}
