//! The `local` provisioner: each elastic resource is a `ferry-agent run`
//! process on this machine, acting as a host (the demo, tests, trials).
//!
//! Each resource gets `<state_dir>/local-agents/<resource>/` (mode 0700)
//! with its generated `agent.toml` (group, broker address, CA, enrollment
//! token), its certificate once enrolled, its state directory, local socket
//! and log. Delete stops the process (SIGTERM, up to
//! [`AGENT_STOP_GRACE`], then SIGKILL) and removes the directory. Every
//! child is tracked; [`LocalProvisioner::shutdown`] stops them all when the
//! broker stops, so nothing is left running.
//!
//! A broker killed outright (SIGKILL, power cut) cannot stop its agents:
//! they keep running and reconnect to the next broker. That broker finds
//! each one by the pid it wrote into its state directory's lock (checked
//! against `/proc/<pid>/cmdline`, so a reused pid is never taken for it) and
//! adopts it instead of starting a second agent on the same host directory;
//! deleting or stopping an adopted agent signals it by pid. An agent holds
//! that lock from its start (enrollment included), so of two started on one
//! directory one exits at once: no local host runs twice, and none is left
//! running after its delete.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ferry_common::ResourceId;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use super::{CreateRequest, DeleteRequest, ProvisionError};

/// Under the broker's state directory: one directory per local agent.
pub const LOCAL_AGENTS_DIR: &str = "local-agents";

/// How long a local agent gets to exit after SIGTERM before SIGKILL.
pub const AGENT_STOP_GRACE: Duration = Duration::from_secs(10);

/// The directory of `resource`'s local agent under `state_dir`.
pub fn agent_dir(state_dir: &Path, resource: &ResourceId) -> PathBuf {
    state_dir.join(LOCAL_AGENTS_DIR).join(resource.as_str())
}

/// `ferry-agent` next to the running executable.
pub fn default_agent_binary() -> Result<PathBuf, ProvisionError> {
    let exe = std::env::current_exe().map_err(|error| ProvisionError::Io {
        what: "find the running executable".into(),
        error,
    })?;
    Ok(exe
        .parent()
        .map(|d| d.join("ferry-agent"))
        .unwrap_or_else(|| PathBuf::from("ferry-agent")))
}

/// The agent's state directory inside its directory.
const STATE_DIR: &str = "state";

/// Starts and stops local agents.
pub struct LocalProvisioner {
    binary: PathBuf,
    root: PathBuf,
    children: Mutex<HashMap<ResourceId, Agent>>,
}

/// A local agent this broker runs.
enum Agent {
    /// Started by this broker.
    Child(Child),
    /// Started by an earlier broker that died without stopping it.
    Adopted(u32),
}

impl Agent {
    fn running(&mut self, dir: &Path) -> bool {
        match self {
            Agent::Child(child) => matches!(child.try_wait(), Ok(None)),
            Agent::Adopted(pid) => is_agent_of(*pid, dir),
        }
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> ProvisionError {
    move |error| ProvisionError::Io { what, error }
}

impl LocalProvisioner {
    pub fn new(binary: PathBuf, root: PathBuf) -> LocalProvisioner {
        LocalProvisioner {
            binary,
            root,
            children: Mutex::new(HashMap::new()),
        }
    }

    fn dir(&self, resource: &ResourceId) -> PathBuf {
        self.root.join(resource.as_str())
    }

    /// Writes the agent's config and starts it.
    pub async fn create(&self, req: &CreateRequest) -> Result<(), ProvisionError> {
        if self.running(&req.resource).await {
            // A retry after an answer that was lost: it runs already.
            return Ok(());
        }
        let dir = self.dir(&req.resource);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(format!("create {}", dir.display())))?;
        let path = |name: &str| toml::Value::String(dir.join(name).display().to_string());
        let mut t = toml::Table::new();
        t.insert("resource".into(), req.resource.to_string().into());
        t.insert("group".into(), req.group.to_string().into());
        t.insert("broker_addr".into(), req.broker_addr.clone().into());
        t.insert(
            "ca_cert".into(),
            req.ca_cert_path.display().to_string().into(),
        );
        t.insert("cert".into(), path("agent.pem"));
        t.insert("key".into(), path("agent-key.pem"));
        t.insert("state_dir".into(), path(STATE_DIR));
        t.insert("local_socket".into(), path("agent.sock"));
        t.insert("image_version".into(), req.image.clone().into());
        t.insert("enroll_token".into(), req.enrollment_token.clone().into());
        let text = toml::to_string(&t)
            .map_err(|e| ProvisionError::Config(format!("agent config: {e}")))?;
        let config = dir.join("agent.toml");
        write_private(&config, text.as_bytes())?;
        self.spawn(&req.resource, &dir).await
    }

    /// Starts the agent of an existing directory again (broker restart).
    pub async fn resume(&self, resource: &ResourceId) -> Result<(), ProvisionError> {
        if self.running(resource).await {
            return Ok(());
        }
        let dir = self.dir(resource);
        if !dir.join("agent.toml").is_file() {
            return Err(ProvisionError::Config(format!(
                "no local agent directory {} to resume",
                dir.display()
            )));
        }
        self.spawn(resource, &dir).await
    }

    /// Whether `resource`'s agent runs: one this broker tracks, or one an
    /// earlier broker left running, which is adopted.
    async fn running(&self, resource: &ResourceId) -> bool {
        let dir = self.dir(resource);
        let mut children = self.children.lock().await;
        if let Some(agent) = children.get_mut(resource) {
            if agent.running(&dir) {
                return true;
            }
        }
        match self.left_running(resource) {
            Some(pid) => {
                tracing::info!(%resource, pid, "local agent of an earlier broker run adopted");
                children.insert(resource.clone(), Agent::Adopted(pid));
                true
            }
            None => false,
        }
    }

    /// The agent holding `resource`'s state directory, if that process is
    /// its agent ([`is_agent_of`]).
    fn left_running(&self, resource: &ResourceId) -> Option<u32> {
        let dir = self.dir(resource);
        let pid = ferry_process::lock::holder(&dir.join(STATE_DIR))?;
        is_agent_of(pid, &dir).then_some(pid)
    }

    async fn spawn(&self, resource: &ResourceId, dir: &Path) -> Result<(), ProvisionError> {
        let log_path = dir.join("agent.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("open {}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io(format!("open {}", log_path.display())))?;
        let child = Command::new(&self.binary)
            .arg("--config")
            .arg(dir.join("agent.toml"))
            .arg("run")
            .env_remove("FERRY_AGENT_CONFIG")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| ProvisionError::Spawn {
                program: self.binary.display().to_string(),
                error,
            })?;
        tracing::info!(%resource, pid = ?child.id(), "local agent started");
        self.children
            .lock()
            .await
            .insert(resource.clone(), Agent::Child(child));
        Ok(())
    }

    /// Stops the agent and removes its directory.
    pub async fn delete(&self, req: &DeleteRequest) -> Result<(), ProvisionError> {
        // An agent an earlier broker run left is found through its state lock.
        self.running(&req.resource).await;
        let agent = self.children.lock().await.remove(&req.resource);
        if let Some(agent) = agent {
            stop(agent, &self.dir(&req.resource)).await;
            tracing::info!(resource = %req.resource, "local agent stopped");
        }
        let dir = self.dir(&req.resource);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(ProvisionError::Io {
                what: format!("remove {}", dir.display()),
                error,
            }),
        }
    }

    /// Stops every local agent (broker shutdown); their directories stay so
    /// a restarted broker resumes them.
    pub async fn shutdown(&self) {
        let children: Vec<(ResourceId, Agent)> = self.children.lock().await.drain().collect();
        for (resource, agent) in children {
            stop(agent, &self.dir(&resource)).await;
            tracing::info!(%resource, "local agent stopped: the broker is stopping");
        }
    }
}

/// Replaces `path` whole with mode 0600 (it holds an enrollment token),
/// never through a symlink.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ProvisionError> {
    ferry_process::files::write_atomic(path, bytes, ferry_process::files::PRIVATE)
        .map_err(|e| io(format!("{} {}", e.op, e.path.display()))(e.source))
}

/// SIGTERM (the agent ends cleanly), then SIGKILL after [`AGENT_STOP_GRACE`].
async fn stop(agent: Agent, dir: &Path) {
    match agent {
        Agent::Child(mut child) => {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if let Some(pid) = child.id() {
                signal("-TERM", pid).await;
            }
            if tokio::time::timeout(AGENT_STOP_GRACE, child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
        Agent::Adopted(pid) => {
            // Not our child: its exit is seen in /proc, not by `wait`; every
            // signal goes only to a process that still is this agent.
            let mut signalled = None;
            let deadline = tokio::time::Instant::now() + 2 * AGENT_STOP_GRACE;
            while is_agent_of(pid, dir) && tokio::time::Instant::now() < deadline {
                let now = tokio::time::Instant::now();
                match signalled {
                    None => {
                        signal("-TERM", pid).await;
                        signalled = Some(now);
                    }
                    Some(at) if now >= at + AGENT_STOP_GRACE => {
                        signal("-KILL", pid).await;
                        signalled = Some(now);
                    }
                    Some(_) => {}
                }
                tokio::time::sleep(STOP_POLL).await;
            }
        }
    }
}

/// How often the exit of an adopted agent is looked for.
const STOP_POLL: Duration = Duration::from_millis(50);

/// `kill(1)`: std has no SIGTERM and `unsafe` is denied.
async fn signal(which: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(which)
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// Whether process `pid` is the agent of the local host directory `dir`:
/// it runs with `dir`'s config among its arguments and holds its state
/// directory's lock file open. A `ferry-agent --config ... session end` call
/// of that config (hooks make them all the time) does not hold the lock,
/// nor does a process that reused a dead agent's pid.
fn is_agent_of(pid: u32, dir: &Path) -> bool {
    runs_config(pid, &dir.join("agent.toml"))
        && holds_open(
            pid,
            &dir.join(STATE_DIR).join(ferry_process::lock::LOCK_FILE),
        )
}

/// Whether process `pid` has `path` open (one of its `/proc/<pid>/fd`
/// links names it).
fn holds_open(pid: u32, path: &Path) -> bool {
    let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == want))
}

/// Whether process `pid` runs (not a zombie) with `config` among its
/// arguments.
fn runs_config(pid: u32, config: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // The state follows the command name, which ends at the last ')'.
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    let want = config.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_told_by_its_arguments_not_by_its_pid_alone() {
        let me = std::process::id();
        let argv0 = std::env::args_os().next().expect("argv[0]");
        assert!(runs_config(me, Path::new(&argv0)));
        // The same pid running something else (a reused pid) is not it.
        assert!(!runs_config(me, Path::new("/nonexistent/agent.toml")));
        // No such process.
        assert!(!runs_config(u32::MAX, Path::new(&argv0)));
    }

    #[tokio::test]
    async fn an_agent_left_by_a_killed_broker_is_adopted_and_stopped_by_its_delete() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join(LOCAL_AGENTS_DIR);
        let resource: ResourceId = "g-e1".parse().expect("id");
        let dir = root.join(resource.as_str());
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("agent.toml");
        std::fs::write(&config, "").expect("config");
        let lock = dir.join(STATE_DIR).join(ferry_process::lock::LOCK_FILE);
        std::fs::create_dir_all(dir.join(STATE_DIR)).expect("state dir");
        std::fs::write(&lock, "").expect("lock file");
        // A `ferry-agent session ...` call of that config: its arguments
        // name the config, but it does not hold the lock.
        let mut cli = Command::new("tail")
            .arg("-f")
            .arg(&config)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        std::fs::write(&lock, format!("{}\n", cli.id().expect("pid"))).expect("lock pid");
        let p = LocalProvisioner::new(PathBuf::from("/nonexistent/ferry-agent"), root.clone());
        assert!(!p.running(&resource).await, "a CLI call is not the agent");
        cli.kill().await.expect("kill");
        // Stands in for the agent an earlier broker started: a process that
        // runs until stopped with the directory's config among its
        // arguments, and holds the lock open.
        let mut orphan = Command::new("tail")
            .arg("-f")
            .arg(&config)
            .arg(&lock)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        let pid = orphan.id().expect("pid");
        std::fs::write(&lock, format!("{pid}\n")).expect("lock file");
        let opened = tokio::time::Instant::now() + AGENT_STOP_GRACE;
        while !holds_open(pid, &lock) {
            assert!(
                tokio::time::Instant::now() < opened,
                "tail never opened the lock"
            );
            tokio::time::sleep(STOP_POLL).await;
        }

        let p = LocalProvisioner::new(PathBuf::from("/nonexistent/ferry-agent"), root);
        // Resumed: adopted, not started again (the binary does not exist).
        p.resume(&resource).await.expect("adopted");
        assert!(p.running(&resource).await);
        let req = DeleteRequest {
            group: "g".parse().expect("group"),
            resource: resource.clone(),
        };
        p.delete(&req).await.expect("delete");
        let status = tokio::time::timeout(AGENT_STOP_GRACE, orphan.wait())
            .await
            .expect("stopped within the grace")
            .expect("status");
        assert!(!status.success(), "ended by a signal: {status:?}");
        assert!(!dir.exists());
    }
}
