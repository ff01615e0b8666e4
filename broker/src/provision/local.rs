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

/// Starts and stops local agents.
pub struct LocalProvisioner {
    binary: PathBuf,
    root: PathBuf,
    children: Mutex<HashMap<ResourceId, Child>>,
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
        t.insert("state_dir".into(), path("state"));
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

    async fn running(&self, resource: &ResourceId) -> bool {
        let mut children = self.children.lock().await;
        match children.get_mut(resource) {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
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
        self.children.lock().await.insert(resource.clone(), child);
        Ok(())
    }

    /// Stops the agent and removes its directory.
    pub async fn delete(&self, req: &DeleteRequest) -> Result<(), ProvisionError> {
        let child = self.children.lock().await.remove(&req.resource);
        if let Some(mut child) = child {
            stop(&mut child).await;
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
        let children: Vec<(ResourceId, Child)> = self.children.lock().await.drain().collect();
        for (resource, mut child) in children {
            stop(&mut child).await;
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
async fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id() {
        // `kill(1)`: std has no SIGTERM and `unsafe` is denied.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }
    if tokio::time::timeout(AGENT_STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}
