//! Broker commands: drain, undrain, disconnect a session.
//!
//! The drain flag is a file, `state_dir/draining`, created (and the directory
//! synced) before a drain is reported done, so a restarted agent keeps a
//! drained host drained. A disconnect runs the configured hook with the
//! session id appended; the host's streaming server then reports the end of
//! the session as usual, so the command itself records nothing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_common::wire::{Command, CommandOutcome};
use ferry_common::SessionId;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::config::HooksConfig;
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
    #[error("start disconnect hook {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("disconnect hook {program} did not finish within {timeout:?}; it was killed")]
    Timeout { program: String, timeout: Duration },
    #[error("disconnect hook {program} failed ({status}): {output}")]
    Failed {
        program: String,
        status: String,
        output: String,
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

/// Runs `argv + [session]`, kills it after `timeout`, and fails unless it
/// exits 0. Output is captured (bounded) for the error message.
pub async fn run_disconnect_hook(
    argv: &[String],
    session: &SessionId,
    timeout: Duration,
) -> Result<(), CommandError> {
    let program = argv.first().cloned().unwrap_or_default();
    let mut child = tokio::process::Command::new(&program)
        .args(&argv[1.min(argv.len())..])
        .arg(session.as_str())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Spawn {
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
            return Err(CommandError::Timeout { program, timeout });
        }
    };
    let status = status.map_err(|source| CommandError::Spawn {
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
        let (status, rx) = watch::channel(LinkStatus::default());
        let hooks = HooksConfig::default();
        assert_eq!(
            execute(Command::Drain, &drain, &hooks, &status).await,
            CommandOutcome::Done
        );
        assert!(rx.borrow().draining && drain.is_draining());
        assert_eq!(
            execute(Command::Undrain, &drain, &hooks, &status).await,
            CommandOutcome::Done
        );
        assert!(!rx.borrow().draining);
        let out = execute(
            Command::DisconnectSession {
                session: sid("s"),
                reason: "test".into(),
            },
            &drain,
            &hooks,
            &status,
        )
        .await;
        assert!(
            matches!(&out, CommandOutcome::Failed(m) if m.contains("no disconnect hook")),
            "{out:?}"
        );
    }
}
