//! Broker commands: drain, undrain, disconnect a session, apply a policy.
//!
//! The drain flag is a file, `state_dir/draining`, created (and the directory
//! synced) before a drain is reported done, so a restarted agent keeps a
//! drained host drained. A disconnect runs the configured hook with the
//! session id appended; the host's streaming server then reports the end of
//! the session as usual, so the command itself records nothing. A policy is
//! written durably to the policy file ([`crate::policy`]), then the optional
//! policy hook runs with the file's path appended; only then is it done.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_common::wire::{Command, CommandOutcome};
use ferry_common::{GroupName, SessionId};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::config::HooksConfig;
use crate::policy::{Applied, PolicyError, PolicyStore};
use crate::LinkStatus;

/// File whose presence means "draining".
pub const DRAIN_FILE: &str = "draining";

/// Most bytes of a hook's stdout and stderr kept for the error message; a
/// chatty hook cannot make the agent buffer without bound.
const MAX_HOOK_OUTPUT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no disconnect hook is configured on this host ([hooks] disconnect in the agent config)"
    )]
    NoHook,
    #[error("start {hook} hook {program}: {source}")]
    Spawn {
        hook: &'static str,
        program: String,
        source: std::io::Error,
    },
    #[error("{hook} hook {program} did not finish within {timeout:?}; it was killed")]
    Timeout {
        hook: &'static str,
        program: String,
        timeout: Duration,
    },
    #[error("{hook} hook {program} failed ({status}): {output}")]
    Failed {
        hook: &'static str,
        program: String,
        status: String,
        output: String,
    },
    #[error("policy for group {group} version {version}: {source}")]
    Policy {
        group: GroupName,
        version: u64,
        source: PolicyError,
    },
}

/// The host's drain flag, persisted in the state directory.
#[derive(Clone, Debug)]
pub struct DrainState {
    /// Path of the flag file.
    path: PathBuf,
    /// In-memory copy, read by health reports.
    draining: Arc<AtomicBool>,
}

impl DrainState {
    /// Reads the flag from `state_dir` (creating the directory if needed).
    pub fn load(state_dir: &Path) -> Result<Self, CommandError> {
        std::fs::create_dir_all(state_dir).map_err(|source| CommandError::Io {
            op: "create directory",
            path: state_dir.to_owned(),
            source,
        })?;
        let path = state_dir.join(DRAIN_FILE);
        let draining = path.exists();
        Ok(Self {
            path,
            draining: Arc::new(AtomicBool::new(draining)),
        })
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Sets the flag durably. Blocking (file and directory sync).
    pub fn set(&self, draining: bool) -> Result<(), CommandError> {
        let io = |op| {
            let path = self.path.clone();
            move |source| CommandError::Io { op, path, source }
        };
        if draining {
            let f = std::fs::File::create(&self.path).map_err(io("create"))?;
            f.sync_all().map_err(io("sync"))?;
        } else {
            match std::fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove")(e)),
            }
        }
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("sync directory of"))?;
        }
        self.draining.store(draining, Ordering::SeqCst);
        Ok(())
    }
}

/// Carries out one broker command and says how it went.
pub async fn execute(
    command: Command,
    drain: &DrainState,
    policy: &PolicyStore,
    hooks: &HooksConfig,
    status: &watch::Sender<LinkStatus>,
) -> CommandOutcome {
    let result = match command {
        Command::Drain | Command::Undrain => {
            let on = matches!(command, Command::Drain);
            let d = drain.clone();
            match tokio::task::spawn_blocking(move || d.set(on)).await {
                Ok(r) => r.map(|()| {
                    status.send_if_modified(|s| std::mem::replace(&mut s.draining, on) != on);
                    tracing::info!(draining = on, "drain state changed by the broker");
                }),
                Err(e) => Err(CommandError::Io {
                    op: "set drain flag (task failed)",
                    path: drain.path.clone(),
                    source: std::io::Error::other(e.to_string()),
                }),
            }
        }
        Command::DisconnectSession { session, reason } => {
            tracing::info!(%session, %reason, "broker asks to disconnect a session");
            match &hooks.disconnect {
                None => Err(CommandError::NoHook),
                Some(argv) => run_disconnect_hook(argv, &session, hooks.timeout).await,
            }
        }
        Command::ApplyPolicy {
            group,
            version,
            document,
        } => apply_policy(policy, hooks, group, version, document).await,
        // AGENT-HELPER: image switch, updates and warnings.
        Command::SwitchImage { .. } | Command::ApplyUpdate { .. } | Command::WarnSession { .. } => {
            Err(CommandError::NoHook)
        }
    };
    match result {
        Ok(()) => CommandOutcome::Done,
        Err(e) => {
            tracing::warn!(error = %e, "broker command failed");
            let mut text = e.to_string();
            crate::health::truncate(&mut text, ferry_common::limits::MAX_TEXT_LEN);
            CommandOutcome::Failed(text)
        }
    }
}

/// Writes the policy durably, then runs the policy hook (if any) with the
/// file's path appended. A newer version already on the host is kept and
/// the command is done: the broker replays versions after a reconnect.
async fn apply_policy(
    policy: &PolicyStore,
    hooks: &HooksConfig,
    group: GroupName,
    version: u64,
    document: String,
) -> Result<(), CommandError> {
    let store = policy.clone();
    let g = group.clone();
    let applied = tokio::task::spawn_blocking(move || store.apply(&g, version, &document))
        .await
        .map_err(|e| CommandError::Io {
            op: "write policy (task failed)",
            path: policy.path().to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(|source| CommandError::Policy {
            group: group.clone(),
            version,
            source,
        })?;
    if let Applied::Kept { have } = applied {
        tracing::info!(%group, version, have, "policy version already superseded on this host");
        return Ok(());
    }
    tracing::info!(%group, version, file = %policy.path().display(), "policy written");
    match &hooks.policy {
        None => Ok(()),
        Some(argv) => {
            let path = policy.path().to_string_lossy().into_owned();
            run_hook("policy", argv, &path, hooks.timeout).await
        }
    }
}

/// Runs `argv + [session]`, kills it after `timeout`, and fails unless it
/// exits 0. Output is captured (bounded) for the error message.
pub async fn run_disconnect_hook(
    argv: &[String],
    session: &SessionId,
    timeout: Duration,
) -> Result<(), CommandError> {
    run_hook("disconnect", argv, session.as_str(), timeout).await
}

/// Runs `argv + [arg]` for the hook named `hook`, kills it after `timeout`,
/// and fails unless it exits 0. Output is captured (bounded) for the error
/// message.
pub async fn run_hook(
    hook: &'static str,
    argv: &[String],
    arg: &str,
    timeout: Duration,
) -> Result<(), CommandError> {
    let program = argv.first().cloned().unwrap_or_default();
    let mut child = tokio::process::Command::new(&program)
        .args(&argv[1.min(argv.len())..])
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Spawn {
            hook,
            program: program.clone(),
            source,
        })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let run = async {
        let (out, err, status) =
            tokio::join!(read_bounded(stdout), read_bounded(stderr), child.wait());
        (out, err, status)
    };
    let (out, err, status) = match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => {
            // kill_on_drop reaps it when `child` goes out of scope.
            return Err(CommandError::Timeout {
                hook,
                program,
                timeout,
            });
        }
    };
    let status = status.map_err(|source| CommandError::Spawn {
        hook,
        program: program.clone(),
        source,
    })?;
    if status.success() {
        return Ok(());
    }
    let mut output = String::from_utf8_lossy(&err).trim().to_owned();
    if output.is_empty() {
        output = String::from_utf8_lossy(&out).trim().to_owned();
    }
    Err(CommandError::Failed {
        hook,
        program,
        status: status.to_string(),
        output,
    })
}

/// Reads at most [`MAX_HOOK_OUTPUT`] bytes, then drops the rest of the pipe.
async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(p) = pipe {
        // A read error only shortens the captured output.
        let _ = p.take(MAX_HOOK_OUTPUT as u64).read_to_end(&mut buf).await;
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(s: &str) -> SessionId {
        s.parse().unwrap()
    }

    #[test]
    fn drain_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let d = DrainState::load(dir.path()).unwrap();
        assert!(!d.is_draining());
        d.set(true).unwrap();
        assert!(DrainState::load(dir.path()).unwrap().is_draining());
        d.set(false).unwrap();
        d.set(false).unwrap();
        assert!(!DrainState::load(dir.path()).unwrap().is_draining());
    }

    #[tokio::test]
    async fn hook_gets_the_session_id_and_its_status_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("out");
        let script = format!("echo \"$1\" > {}", marker.display());
        let argv = vec!["/bin/sh".into(), "-c".into(), script, "hook".into()];
        run_disconnect_hook(&argv, &sid("sess-9"), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "sess-9");

        let failing = vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo no such session >&2; exit 3".into(),
        ];
        let err = run_disconnect_hook(&failing, &sid("s"), Duration::from_secs(10))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("no such session") && text.contains('3'),
            "{text}"
        );

        let missing = vec!["/nonexistent/hook".into()];
        assert!(matches!(
            run_disconnect_hook(&missing, &sid("s"), Duration::from_secs(10)).await,
            Err(CommandError::Spawn { .. })
        ));
    }

    #[tokio::test]
    async fn a_hung_hook_is_killed_after_the_timeout() {
        let argv = vec!["/bin/sh".into(), "-c".into(), "exec sleep 60".into()];
        let err = run_disconnect_hook(&argv, &sid("s"), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn commands_update_state_and_answer() {
        let dir = tempfile::tempdir().unwrap();
        let drain = DrainState::load(dir.path()).unwrap();
        let policy = PolicyStore::new(dir.path().join("policy.json"));
        let (status, rx) = watch::channel(LinkStatus::default());
        let hooks = HooksConfig::default();
        assert_eq!(
            execute(Command::Drain, &drain, &policy, &hooks, &status).await,
            CommandOutcome::Done
        );
        assert!(rx.borrow().draining && drain.is_draining());
        assert_eq!(
            execute(Command::Undrain, &drain, &policy, &hooks, &status).await,
            CommandOutcome::Done
        );
        assert!(!rx.borrow().draining);
        let out = execute(
            Command::DisconnectSession {
                session: sid("s"),
                reason: "test".into(),
            },
            &drain,
            &policy,
            &hooks,
            &status,
        )
        .await;
        assert!(
            matches!(&out, CommandOutcome::Failed(m) if m.contains("no disconnect hook")),
            "{out:?}"
        );
    }

    fn apply(version: u64, document: &str) -> Command {
        Command::ApplyPolicy {
            group: "g1".parse().unwrap(),
            version,
            document: document.into(),
        }
    }

    #[tokio::test]
    async fn a_policy_is_written_then_its_hook_runs_with_the_file_path() {
        let dir = tempfile::tempdir().unwrap();
        let drain = DrainState::load(dir.path()).unwrap();
        let policy = PolicyStore::new(dir.path().join("policy.json"));
        let (status, _rx) = watch::channel(LinkStatus::default());
        let seen = dir.path().join("seen");
        // The hook copies the file it is given: it ran after the write.
        let hooks = HooksConfig {
            policy: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("cp \"$1\" {}", seen.display()),
                "hook".into(),
            ]),
            ..HooksConfig::default()
        };
        let run = |c| execute(c, &drain, &policy, &hooks, &status);
        assert_eq!(run(apply(2, r#"{"k":2}"#)).await, CommandOutcome::Done);
        let copied: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&seen).unwrap()).unwrap();
        assert_eq!(copied["version"], 2);
        assert_eq!(copied["policy"]["k"], 2);

        // An older version is acknowledged, and neither written nor hooked.
        std::fs::remove_file(&seen).unwrap();
        assert_eq!(run(apply(1, r#"{"k":1}"#)).await, CommandOutcome::Done);
        assert!(!seen.exists());
        assert_eq!(policy.current(), Some(("g1".into(), 2)));

        // A document that is not an object fails, naming the version.
        let out = run(apply(3, "42")).await;
        assert!(
            matches!(&out, CommandOutcome::Failed(m) if m.contains("version 3") && m.contains("a number")),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn a_failing_policy_hook_fails_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let drain = DrainState::load(dir.path()).unwrap();
        let policy = PolicyStore::new(dir.path().join("policy.json"));
        let (status, _rx) = watch::channel(LinkStatus::default());
        let hooks = HooksConfig {
            policy: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo cannot reload >&2; exit 4".into(),
            ]),
            ..HooksConfig::default()
        };
        let out = execute(apply(1, "{}"), &drain, &policy, &hooks, &status).await;
        assert!(
            matches!(&out, CommandOutcome::Failed(m) if m.contains("policy hook") && m.contains("cannot reload")),
            "{out:?}"
        );
    }
}
