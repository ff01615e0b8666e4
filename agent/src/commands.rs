//! Broker commands: drain, undrain, disconnect a session, apply a policy,
//! switch the image, apply an update, warn a session's user.
//!
//! The drain flag is a file, `state_dir/draining`, created (and the directory
//! synced) before a drain is reported done, so a restarted agent keeps a
//! drained host drained. A disconnect runs the configured hook with `--`
//! and the session id appended; the host's streaming server then reports
//! the end of the session as usual, so the command itself records nothing.
//! A policy is written durably to the policy file ([`crate::policy`]), then
//! the optional policy hook runs with `--` and the file's path appended;
//! only then is it done, and the policy's session limits go to the enforcer
//! ([`crate::enforce`]). A
//! hook that fails leaves the host on its previous policy (the previous file
//! is put back) and the command fails; the broker tries again.
//!
//! An image switch runs the image hook, then records the image durably
//! ([`crate::versions`]); an update is recorded as pending, its hook runs,
//! then its outcome is recorded. The link sends an `Inventory` after either.
//! An update of the agent itself whose hook succeeded while this process is
//! still the old version is not answered: the hook restarts the service and
//! the next process reports the outcome (`Inventory::last_update`).
//!
//! Commands run on the agent's task tracker, not the connection's: a link
//! that drops does not kill a running hook, and the outcome is on disk
//! ([`crate::versions`]) before the command is answered.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_common::wire::{Command, CommandOutcome};
use ferry_common::{GroupName, SessionId};
use tokio::sync::watch;

use crate::config::HooksConfig;
use crate::metrics::AgentMetrics;
use crate::policy::{Applied, PolicyError, PolicyStore, SessionLimits};
use crate::versions::{UpdateRecord, VersionStore, VersionsError, COMPONENT_AGENT};
use crate::LinkStatus;

/// File whose presence means "draining".
pub const DRAIN_FILE: &str = "draining";

/// Most bytes of the end of a hook's stdout and of its stderr kept for the
/// error message: all of it is read (a hook is never cut off), but a chatty
/// hook cannot make the agent buffer without bound.
const MAX_HOOK_OUTPUT: usize = 4096;

/// Most bytes of that output in the failure message (its end): with the
/// hook's name, program and exit status it stays within the
/// `MAX_TEXT_LEN` a failure may have on the wire.
const MAX_HOOK_OUTPUT_IN_MESSAGE: usize = 512;

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
    #[error("{hook} hook {program} did not finish within {timeout:?}; it was killed with what it started (its process group){}", last_output(.output))]
    Timeout {
        hook: &'static str,
        program: String,
        timeout: Duration,
        /// The end of its output (stderr, else stdout) until then.
        output: String,
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
    /// A hook other than `disconnect` is not configured (the text is the
    /// contract's `no <name> hook configured`).
    #[error("no {0} hook configured ([hooks] {0} in the agent config)")]
    NoHookNamed(&'static str),
    #[error("record versions: {0}")]
    Versions(#[from] VersionsError),
    #[error("{field} is {len} bytes; the limit is {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

/// What carrying out a command needs; cloned into each command's task.
#[derive(Clone, Debug)]
pub struct CommandContext {
    /// The host's drain flag.
    pub drain: DrainState,
    /// The policy file.
    pub policy: PolicyStore,
    /// The hooks and their timeouts.
    pub hooks: HooksConfig,
    /// Published agent status (the drain flag is in it).
    pub status: Arc<watch::Sender<LinkStatus>>,
    /// Image and component versions, pending and last update.
    pub versions: VersionStore,
    /// The applied policy's session limits, for the enforcer.
    pub limits: Arc<watch::Sender<SessionLimits>>,
    /// One update at a time: two hooks installing packages at once could
    /// leave either half done.
    pub updates: Arc<tokio::sync::Mutex<()>>,
    /// Where hook runs are counted.
    pub metrics: AgentMetrics,
}

/// Whether the link sends an `Inventory` after this command's answer.
pub fn changes_inventory(command: &Command) -> bool {
    matches!(
        command,
        Command::SwitchImage { .. } | Command::ApplyUpdate { .. }
    )
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
            // Never through a symlink planted at the flag's name.
            ferry_process::files::write_atomic(&self.path, b"", ferry_process::files::PRIVATE)
                .map_err(|e| io("create")(e.source))?;
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

/// Carries out one broker command and says how it went; `None` when the
/// agent updated itself and waits for the restart its update hook started
/// (the next process reports the outcome).
pub async fn execute(command: Command, ctx: &CommandContext) -> Option<CommandOutcome> {
    let (drain, hooks, status) = (&ctx.drain, &ctx.hooks, &ctx.status);
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
                Some(argv) => {
                    run_disconnect_hook(&ctx.metrics, argv, &session, hooks.timeout).await
                }
            }
        }
        Command::ApplyPolicy {
            group,
            version,
            document,
        } => apply_policy(ctx, group, version, document).await,
        Command::SwitchImage { image } => switch_image(ctx, image).await,
        Command::ApplyUpdate {
            update,
            component,
            version,
            package,
        } => {
            let record = UpdateRecord {
                update,
                component,
                version,
            };
            match apply_update(ctx, record, package).await {
                Ok(UpdateDone::Answer) => Ok(()),
                Ok(UpdateDone::AwaitRestart) => return None,
                Err(e) => Err(e),
            }
        }
        Command::WarnSession {
            session,
            message,
            deadline,
        } => match check_len("message", &message) {
            Ok(()) => run_warn_hook(&ctx.metrics, hooks, &session, &message, deadline).await,
            Err(e) => Err(e),
        },
    };
    Some(match result {
        Ok(()) => CommandOutcome::Done,
        Err(e) => {
            tracing::warn!(error = %e, "broker command failed");
            let mut text = e.to_string();
            crate::health::truncate(&mut text, ferry_common::limits::MAX_TEXT_LEN);
            CommandOutcome::Failed(text)
        }
    })
}

fn check_len(field: &'static str, text: &str) -> Result<(), CommandError> {
    let max = ferry_common::limits::MAX_TEXT_LEN;
    if text.len() > max {
        return Err(CommandError::TooLong {
            field,
            len: text.len(),
            max,
        });
    }
    Ok(())
}

/// Runs blocking file work on the blocking pool.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    path: &Path,
    f: impl FnOnce() -> Result<T, VersionsError> + Send + 'static,
) -> Result<T, CommandError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(r?),
        Err(e) => Err(CommandError::Io {
            op: what,
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// Runs the image hook with `--` and the image appended (and the image in
/// `FERRY_IMAGE`), then records the image durably.
async fn switch_image(ctx: &CommandContext, image: String) -> Result<(), CommandError> {
    let argv = ctx
        .hooks
        .image
        .as_ref()
        .ok_or(CommandError::NoHookNamed("image"))?;
    check_len("image", &image)?;
    tracing::info!(%image, "broker asks to switch the image");
    run_hook_with(
        &ctx.metrics,
        "image",
        argv,
        Some(&image),
        &[("FERRY_IMAGE", image.as_str())],
        ctx.hooks.update_timeout,
    )
    .await?;
    let versions = ctx.versions.clone();
    let img = image.clone();
    blocking(
        "record image (task failed)",
        ctx.versions.path(),
        move || versions.set_image(&img),
    )
    .await?;
    tracing::info!(%image, "image switched");
    Ok(())
}

/// How an update that did not fail ended.
enum UpdateDone {
    /// Answer `Done`.
    Answer,
    /// The agent's own update hook succeeded; the service restart it started
    /// ends this process, and the next one reports the outcome.
    AwaitRestart,
}

/// Records the update as pending, runs the update hook, records the outcome.
async fn apply_update(
    ctx: &CommandContext,
    record: UpdateRecord,
    package: String,
) -> Result<UpdateDone, CommandError> {
    let argv = ctx
        .hooks
        .update
        .as_ref()
        .ok_or(CommandError::NoHookNamed("update"))?;
    check_len("package", &package)?;
    let _one = ctx.updates.lock().await;
    if ctx.versions.succeeded(record.update) {
        tracing::info!(
            update = record.update,
            "update already applied on this host; not run again"
        );
        return Ok(UpdateDone::Answer);
    }
    let versions = ctx.versions.clone();
    let r = record.clone();
    blocking(
        "record pending update (task failed)",
        ctx.versions.path(),
        move || versions.begin_update(&r),
    )
    .await?;
    tracing::info!(update = record.update, component = %record.component, version = %record.version, "running the update hook");
    let id = record.update.to_string();
    let ran = run_hook_with(
        &ctx.metrics,
        "update",
        argv,
        None,
        &[
            ("FERRY_UPDATE_ID", id.as_str()),
            ("FERRY_COMPONENT", record.component.as_str()),
            ("FERRY_VERSION", record.version.as_str()),
            ("FERRY_PACKAGE", package.as_str()),
        ],
        ctx.hooks.update_timeout,
    )
    .await;
    let versions = ctx.versions.clone();
    let r = record.clone();
    match ran {
        Err(e) => {
            let why = e.to_string();
            blocking(
                "record failed update (task failed)",
                ctx.versions.path(),
                move || versions.fail_update(&r, &why),
            )
            .await?;
            Err(e)
        }
        Ok(())
            if record.component == COMPONENT_AGENT
                && record.version != ctx.versions.agent_version() =>
        {
            tracing::info!(
                update = record.update,
                version = %record.version,
                "agent update installed; waiting for the service restart"
            );
            Ok(UpdateDone::AwaitRestart)
        }
        Ok(()) => {
            blocking(
                "record update (task failed)",
                ctx.versions.path(),
                move || versions.finish_update(&r),
            )
            .await?;
            tracing::info!(update = record.update, component = %record.component, version = %record.version, "update applied");
            Ok(UpdateDone::Answer)
        }
    }
}

/// Runs the warn hook: `argv + ["--", session]`, the text in `FERRY_MESSAGE` and
/// the end time in `FERRY_DEADLINE_MS`.
pub async fn run_warn_hook(
    metrics: &AgentMetrics,
    hooks: &HooksConfig,
    session: &SessionId,
    message: &str,
    deadline: ferry_common::UnixMillis,
) -> Result<(), CommandError> {
    let argv = hooks
        .warn
        .as_ref()
        .ok_or(CommandError::NoHookNamed("warn"))?;
    let deadline = deadline.0.to_string();
    run_hook_with(
        metrics,
        "warn",
        argv,
        Some(session.as_str()),
        &[
            ("FERRY_MESSAGE", message),
            ("FERRY_DEADLINE_MS", deadline.as_str()),
        ],
        hooks.timeout,
    )
    .await
}

/// Writes the policy durably, then runs the policy hook (if any) with the
/// file's path appended (after `--`). A newer version already on the host is kept and
/// the command is done: the broker replays versions after a reconnect.
async fn apply_policy(
    ctx: &CommandContext,
    group: GroupName,
    version: u64,
    document: String,
) -> Result<(), CommandError> {
    let (policy, hooks) = (&ctx.policy, &ctx.hooks);
    // Checked again (with the rest) by the store before anything is written.
    let limits = serde_json::from_str::<serde_json::Value>(&document)
        .ok()
        .and_then(|v| SessionLimits::from_policy(&v).ok());
    let store = policy.clone();
    let g = group.clone();
    let (applied, undo) =
        tokio::task::spawn_blocking(move || store.apply_undoable(&g, version, &document))
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
    if let Some(argv) = &hooks.policy {
        let path = policy.path().to_string_lossy().into_owned();
        if let Err(e) = run_hook(&ctx.metrics, "policy", argv, &path, hooks.timeout).await {
            // Not applied: the previous file goes back (a newer version
            // written meanwhile stays), the limits stay the previous ones,
            // and the broker sends this version again.
            if let Some(undo) = undo {
                let store = policy.clone();
                match tokio::task::spawn_blocking(move || store.undo(undo)).await {
                    Ok(Ok(true)) => {
                        tracing::warn!(%group, version, "policy hook failed; previous policy file restored")
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(u)) => {
                        tracing::error!(%group, version, "restore the previous policy file: {u}")
                    }
                    Err(u) => {
                        tracing::error!(%group, version, "restore the previous policy file: {u}")
                    }
                }
            }
            return Err(e);
        }
    }
    if let Some(limits) = limits {
        // The file is what a restarted agent enforces: follow it now.
        ctx.limits
            .send_if_modified(|l| std::mem::replace(l, limits) != limits);
    }
    Ok(())
}

/// Runs `argv + ["--", session]`, kills it (its process group) after
/// `timeout`, and fails unless it exits 0. Output is read to its end; its
/// tail is kept for the error message.
pub async fn run_disconnect_hook(
    metrics: &AgentMetrics,
    argv: &[String],
    session: &SessionId,
    timeout: Duration,
) -> Result<(), CommandError> {
    run_hook(metrics, "disconnect", argv, session.as_str(), timeout).await
}

/// Runs `argv + ["--", arg]` for the hook named `hook`, kills it (its
/// process group) after `timeout`, and fails unless it exits 0. Output is
/// read to its end; its tail is kept for the error message.
pub async fn run_hook(
    metrics: &AgentMetrics,
    hook: &'static str,
    argv: &[String],
    arg: &str,
    timeout: Duration,
) -> Result<(), CommandError> {
    run_hook_with(metrics, hook, argv, Some(arg), &[], timeout).await
}

/// Runs `argv` (+ `--` and `arg`, if any) with `env` added to the agent's
/// environment; otherwise as [`run_hook`].
///
/// The hook runs in its own process group; its output is read to its end
/// (a hook printing megabytes is not cut off by a closed pipe), keeping the
/// last [`MAX_HOOK_OUTPUT`] bytes of each stream; past `timeout` the whole
/// group is killed (what the hook started too). The appended value comes
/// from outside (a session id may begin with `-`), hence the `--` before
/// it: the hook's option parser takes it as an operand.
pub async fn run_hook_with(
    metrics: &AgentMetrics,
    hook: &'static str,
    argv: &[String],
    arg: Option<&str>,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<(), CommandError> {
    let started = std::time::Instant::now();
    let result = run_hook_once(hook, argv, arg, env, timeout).await;
    let outcome = match &result {
        Ok(()) => "ok",
        Err(CommandError::Timeout { .. }) => "timeout",
        Err(CommandError::Spawn { .. }) => "spawn",
        Err(_) => "failed",
    };
    metrics.hook_ran(hook, outcome, started.elapsed());
    result
}

/// One run of a hook, as [`run_hook_with`] says.
async fn run_hook_once(
    hook: &'static str,
    argv: &[String],
    arg: Option<&str>,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<(), CommandError> {
    let program = argv.first().cloned().unwrap_or_default();
    let mut command = tokio::process::Command::new(&program);
    command.args(&argv[1.min(argv.len())..]);
    if let Some(arg) = arg {
        command.arg("--").arg(arg);
    }
    command.envs(env.iter().copied());
    let ran = ferry_process::child::run(command, timeout, MAX_HOOK_OUTPUT)
        .await
        .map_err(|e| CommandError::Spawn {
            hook,
            program: program.clone(),
            source: match e {
                ferry_process::child::RunError::Spawn(e) => e,
                ferry_process::child::RunError::Wait(e) => {
                    std::io::Error::new(e.kind(), format!("wait: {e}"))
                }
            },
        })?;
    let output = || {
        let mut output = String::from_utf8_lossy(&ran.stderr).trim().to_owned();
        if output.is_empty() {
            output = String::from_utf8_lossy(&ran.stdout).trim().to_owned();
        }
        output_tail(&output).to_owned()
    };
    let Some(status) = ran.status else {
        return Err(CommandError::Timeout {
            hook,
            program,
            timeout,
            output: output(),
        });
    };
    if ran.stdout_len > MAX_HOOK_OUTPUT as u64 || ran.stderr_len > MAX_HOOK_OUTPUT as u64 {
        tracing::debug!(
            hook,
            stdout_bytes = ran.stdout_len,
            stderr_bytes = ran.stderr_len,
            "long hook output: its end is kept"
        );
    }
    if status.success() {
        return Ok(());
    }
    tracing::warn!(
        hook,
        %program,
        %status,
        stdout = %String::from_utf8_lossy(&ran.stdout),
        stderr = %String::from_utf8_lossy(&ran.stderr),
        "hook failed (the end of its output)"
    );
    Err(CommandError::Failed {
        hook,
        program,
        status: status.to_string(),
        output: output(),
    })
}

/// What a timeout's message ends with: the hook's last output, if any.
fn last_output(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!("; its last output: {output}")
    }
}

/// The end of a hook's output that goes into its failure message: the
/// reason is usually last, and the whole message (sent to the broker,
/// at most `MAX_TEXT_LEN`) must keep the hook's name and exit status.
fn output_tail(output: &str) -> &str {
    if output.len() <= MAX_HOOK_OUTPUT_IN_MESSAGE {
        return output;
    }
    let mut start = output.len() - MAX_HOOK_OUTPUT_IN_MESSAGE;
    while !output.is_char_boundary(start) {
        start += 1;
    }
    &output[start..]
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

    #[test]
    fn the_drain_flag_is_not_written_through_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(DRAIN_FILE)).unwrap();
        DrainState::load(dir.path()).unwrap().set(true).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        let flag = std::fs::symlink_metadata(dir.path().join(DRAIN_FILE)).unwrap();
        assert!(flag.is_file());
    }

    #[tokio::test]
    async fn hook_gets_the_session_id_and_its_status_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("out");
        let script = format!("echo \"$*\" > {}", marker.display());
        let argv = vec!["/bin/sh".into(), "-c".into(), script, "hook".into()];
        run_disconnect_hook(
            &AgentMetrics::default(),
            &argv,
            &sid("sess-9"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&marker).unwrap().trim(),
            "-- sess-9"
        );

        let failing = vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo no such session >&2; exit 3".into(),
        ];
        let err = run_disconnect_hook(
            &AgentMetrics::default(),
            &failing,
            &sid("s"),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("no such session") && text.contains('3'),
            "{text}"
        );

        // A long output: the message keeps its end and the exit status.
        let chatty = vec![
            "/bin/sh".into(),
            "-c".into(),
            "for i in $(seq 1 300); do echo \"line $i\"; done >&2; exit 6".into(),
        ];
        let text = run_disconnect_hook(
            &AgentMetrics::default(),
            &chatty,
            &sid("s"),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            text.contains("exit status: 6") && text.ends_with("line 300"),
            "{text}"
        );
        assert!(
            text.len() <= ferry_common::limits::MAX_TEXT_LEN,
            "{}",
            text.len()
        );

        let missing = vec!["/nonexistent/hook".into()];
        assert!(matches!(
            run_disconnect_hook(
                &AgentMetrics::default(),
                &missing,
                &sid("s"),
                Duration::from_secs(10)
            )
            .await,
            Err(CommandError::Spawn { .. })
        ));
    }

    #[tokio::test]
    async fn a_hung_hook_is_killed_after_the_timeout() {
        let argv = vec!["/bin/sh".into(), "-c".into(), "exec sleep 60".into()];
        let err = run_disconnect_hook(
            &AgentMetrics::default(),
            &argv,
            &sid("s"),
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
    }

    /// A hook printing 200 KB on stdout and on stderr, its last line
    /// `last <code>`, exiting with `code`.
    fn chatty_hook(code: i32) -> Vec<String> {
        let script = format!(
            "i=0; while [ $i -lt 2000 ]; do printf '%099d\\n' $i; printf '%099d\\n' $i >&2; \
             i=$((i+1)); done; echo last {code}; echo last {code} >&2; exit {code}"
        );
        vec!["/bin/sh".into(), "-c".into(), script]
    }

    #[tokio::test]
    async fn a_hook_printing_200_kb_runs_to_its_end() {
        // It is not cut off (the pipe closed under it: SIGPIPE)...
        run_disconnect_hook(
            &AgentMetrics::default(),
            &chatty_hook(0),
            &sid("s"),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        // ...and a failure reports the end of what it printed.
        let text = run_disconnect_hook(
            &AgentMetrics::default(),
            &chatty_hook(7),
            &sid("s"),
            Duration::from_secs(30),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            text.contains("exit status: 7") && text.ends_with("0001999\nlast 7"),
            "{text}"
        );
        assert!(
            text.len() <= ferry_common::limits::MAX_TEXT_LEN,
            "{}",
            text.len()
        );
    }

    #[tokio::test]
    async fn a_timeout_kills_what_the_hook_started_too() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        // The background grandchild writes its pid, then the hook hangs.
        let script = format!(
            "sleep 600 & echo $! > '{}'; echo waiting >&2; sleep 600",
            pid_file.display()
        );
        let argv = vec!["/bin/sh".into(), "-c".into(), script];
        let err = run_disconnect_hook(
            &AgentMetrics::default(),
            &argv,
            &sid("s"),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert!(
            err.to_string().ends_with("its last output: waiting"),
            "{err}"
        );
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            ferry_process::child::gone_within(pid, Duration::from_secs(5)),
            "the hook's background child {pid} survived"
        );
    }

    #[tokio::test]
    async fn a_session_id_beginning_with_a_dash_is_an_operand() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        // A hook that parses options the usual way (getopts stops at `--`).
        let script = format!(
            "while getopts n opt; do echo \"option $opt\" >> '{log}'; done; \
             shift $((OPTIND - 1)); echo \"session $1\" >> '{log}'",
            log = log.display()
        );
        let argv = vec!["/bin/sh".into(), "-c".into(), script, "hook".into()];
        run_disconnect_hook(
            &AgentMetrics::default(),
            &argv,
            &sid("-n"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(log_lines(&log), ["session -n"]);
    }

    fn context(dir: &Path, hooks: HooksConfig) -> (CommandContext, watch::Receiver<LinkStatus>) {
        let (status, rx) = watch::channel(LinkStatus::default());
        let ctx = CommandContext {
            drain: DrainState::load(dir).unwrap(),
            policy: PolicyStore::new(dir.join("policy.json")),
            hooks,
            status: Arc::new(status),
            versions: VersionStore::open(dir, "img-1".into(), "1.0.0").unwrap(),
            limits: Arc::new(watch::channel(SessionLimits::default()).0),
            updates: Arc::default(),
            metrics: AgentMetrics::default(),
        };
        (ctx, rx)
    }

    /// A hook that appends its arguments and the named variables to `log`,
    /// then exits with `code`.
    fn logging_hook(log: &Path, vars: &[&str], code: i32) -> Vec<String> {
        let vars: String = vars.iter().map(|v| format!(" {v}=${v}")).collect();
        vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("echo \"$*{vars}\" >> {}; exit {code}", log.display()),
            "hook".into(),
        ]
    }

    fn log_lines(log: &Path) -> Vec<String> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[tokio::test]
    async fn commands_update_state_and_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (ctx, rx) = context(dir.path(), HooksConfig::default());
        assert_eq!(
            execute(Command::Drain, &ctx).await,
            Some(CommandOutcome::Done)
        );
        assert!(rx.borrow().draining && ctx.drain.is_draining());
        assert_eq!(
            execute(Command::Undrain, &ctx).await,
            Some(CommandOutcome::Done)
        );
        assert!(!rx.borrow().draining);
        let out = execute(
            Command::DisconnectSession {
                session: sid("s"),
                reason: "test".into(),
            },
            &ctx,
        )
        .await;
        assert!(
            matches!(&out, Some(CommandOutcome::Failed(m)) if m.contains("no disconnect hook")),
            "{out:?}"
        );
        for (command, name) in [
            (Command::SwitchImage { image: "i".into() }, "image"),
            (
                Command::ApplyUpdate {
                    update: 1,
                    component: "c".into(),
                    version: "1".into(),
                    package: "p".into(),
                },
                "update",
            ),
            (
                Command::WarnSession {
                    session: sid("s"),
                    message: "m".into(),
                    deadline: ferry_common::UnixMillis(5),
                },
                "warn",
            ),
        ] {
            let out = execute(command, &ctx).await;
            let want = format!("no {name} hook configured");
            assert!(
                matches!(&out, Some(CommandOutcome::Failed(m)) if m.contains(&want)),
                "{out:?}"
            );
        }
        assert_eq!(ctx.versions.pending(), None);
    }

    #[tokio::test]
    async fn an_image_switch_runs_the_hook_then_records_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let hooks = HooksConfig {
            image: Some(logging_hook(&log, &["FERRY_IMAGE"], 0)),
            ..HooksConfig::default()
        };
        let (ctx, _rx) = context(dir.path(), hooks);
        let switch = |image: &str| Command::SwitchImage {
            image: image.into(),
        };
        assert!(changes_inventory(&switch("x")));
        assert_eq!(
            execute(switch("img-2"), &ctx).await,
            Some(CommandOutcome::Done)
        );
        assert_eq!(log_lines(&log), ["-- img-2 FERRY_IMAGE=img-2"]);
        let again = VersionStore::open(dir.path(), "img-1".into(), "1.0.0").unwrap();
        assert_eq!(again.inventory().image_version, "img-2");

        // A failing hook fails the switch and keeps the image.
        let (failing, _rx) = context(
            dir.path(),
            HooksConfig {
                image: Some(logging_hook(&log, &[], 5)),
                ..HooksConfig::default()
            },
        );
        let out = execute(switch("img-3"), &failing).await;
        assert!(
            matches!(&out, Some(CommandOutcome::Failed(m)) if m.contains("image hook")),
            "{out:?}"
        );
        assert_eq!(failing.versions.image_version(), "img-2");
    }

    fn update(id: u64, component: &str, version: &str) -> Command {
        Command::ApplyUpdate {
            update: id,
            component: component.into(),
            version: version.into(),
            package: format!("/pkg/{component}-{version}.deb"),
        }
    }

    #[tokio::test]
    async fn an_update_runs_once_and_records_its_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let vars = [
            "FERRY_UPDATE_ID",
            "FERRY_COMPONENT",
            "FERRY_VERSION",
            "FERRY_PACKAGE",
        ];
        let hooks = HooksConfig {
            update: Some(logging_hook(&log, &vars, 0)),
            ..HooksConfig::default()
        };
        let (ctx, _rx) = context(dir.path(), hooks);
        assert_eq!(
            execute(update(4, "office", "2.0"), &ctx).await,
            Some(CommandOutcome::Done)
        );
        assert_eq!(
            log_lines(&log),
            [" FERRY_UPDATE_ID=4 FERRY_COMPONENT=office FERRY_VERSION=2.0 FERRY_PACKAGE=/pkg/office-2.0.deb"]
        );
        // Replayed: done, the hook does not run again.
        assert_eq!(
            execute(update(4, "office", "2.0"), &ctx).await,
            Some(CommandOutcome::Done)
        );
        assert_eq!(log_lines(&log).len(), 1);
        // The image and the agent at its own version are recorded too.
        execute(update(5, "image", "img-9"), &ctx).await;
        assert_eq!(
            execute(update(6, "agent", "1.0.0"), &ctx).await,
            Some(CommandOutcome::Done)
        );
        let inv = ctx.versions.inventory();
        assert_eq!(inv.image_version, "img-9");
        assert_eq!(inv.components.len(), 1);
        assert_eq!(inv.last_update.map(|u| u.update), Some(6));

        // The agent at another version: not answered, left pending for the
        // next process to settle.
        assert_eq!(execute(update(7, "agent", "2.0.0"), &ctx).await, None);
        assert_eq!(ctx.versions.pending().map(|p| p.update), Some(7));

        // A failing hook: failed, and reported in last_update.
        let (failing, _rx) = context(
            dir.path(),
            HooksConfig {
                update: Some(logging_hook(&log, &[], 9)),
                ..HooksConfig::default()
            },
        );
        let out = execute(update(8, "office", "3.0"), &failing).await;
        assert!(
            matches!(&out, Some(CommandOutcome::Failed(m)) if m.contains("update hook")),
            "{out:?}"
        );
        let last = failing.versions.inventory().last_update.unwrap();
        assert_eq!(last.update, 8);
        assert!(matches!(last.outcome, CommandOutcome::Failed(_)));
        assert_eq!(failing.versions.pending(), None);
        assert_eq!(failing.versions.inventory().components[0].version, "2.0");
    }

    #[tokio::test]
    async fn a_warning_runs_the_warn_hook_with_the_session_and_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let hooks = HooksConfig {
            warn: Some(logging_hook(
                &log,
                &["FERRY_MESSAGE", "FERRY_DEADLINE_MS"],
                0,
            )),
            ..HooksConfig::default()
        };
        let (ctx, _rx) = context(dir.path(), hooks);
        let warn = Command::WarnSession {
            session: sid("s-1"),
            message: "image update".into(),
            deadline: ferry_common::UnixMillis(1234),
        };
        assert!(!changes_inventory(&warn));
        assert_eq!(execute(warn, &ctx).await, Some(CommandOutcome::Done));
        assert_eq!(
            log_lines(&log),
            ["-- s-1 FERRY_MESSAGE=image update FERRY_DEADLINE_MS=1234"]
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
        let seen = dir.path().join("seen");
        // The hook copies the file it is given: it ran after the write.
        let hooks = HooksConfig {
            policy: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("cp \"$2\" {}", seen.display()),
                "hook".into(),
            ]),
            ..HooksConfig::default()
        };
        let (ctx, _rx) = context(dir.path(), hooks);
        let limits = ctx.limits.subscribe();
        let run = |c| execute(c, &ctx);
        assert_eq!(
            run(apply(
                2,
                r#"{"k":2,"session":{"idle_disconnect_ms":null,"max_session_duration_ms":3600000}}"#
            ))
            .await,
            Some(CommandOutcome::Done)
        );
        let copied: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&seen).unwrap()).unwrap();
        assert_eq!(copied["version"], 2);
        assert_eq!(copied["policy"]["k"], 2);
        assert_eq!(limits.borrow().max_session_duration_ms, Some(3_600_000));

        // An older version is acknowledged, and neither written nor hooked.
        std::fs::remove_file(&seen).unwrap();
        assert_eq!(
            run(apply(1, r#"{"k":1}"#)).await,
            Some(CommandOutcome::Done)
        );
        assert!(!seen.exists());
        assert_eq!(ctx.policy.current(), Some(("g1".into(), 2)));
        assert_eq!(limits.borrow().max_session_duration_ms, Some(3_600_000));

        // A document that is not an object fails, naming the version.
        let out = run(apply(3, "42")).await;
        assert!(
            matches!(&out, Some(CommandOutcome::Failed(m)) if m.contains("version 3") && m.contains("a number")),
            "{out:?}"
        );
        // A newer document without limits lifts them.
        assert_eq!(run(apply(4, "{}")).await, Some(CommandOutcome::Done));
        assert_eq!(*limits.borrow(), SessionLimits::default());
    }

    #[tokio::test]
    async fn a_failing_policy_hook_fails_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = HooksConfig {
            policy: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo cannot reload >&2; exit 4".into(),
            ]),
            ..HooksConfig::default()
        };
        let (ctx, _rx) = context(dir.path(), hooks);
        let out = execute(apply(1, "{}"), &ctx).await;
        assert!(
            matches!(&out, Some(CommandOutcome::Failed(m)) if m.contains("policy hook") && m.contains("cannot reload")),
            "{out:?}"
        );
        // Not applied: no file (there was none), no limits.
        assert_eq!(ctx.policy.current(), None);

        // With version 1 applied, a version 2 whose hook fails leaves
        // version 1's file and limits; once the hook accepts it, it applies.
        let ok_marker = dir.path().join("ok");
        let hooks = HooksConfig {
            policy: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                format!(
                    "test -e {} || {{ echo not now >&2; exit 4; }}",
                    ok_marker.display()
                ),
            ]),
            ..HooksConfig::default()
        };
        let (ctx, _rx) = context(dir.path(), hooks);
        std::fs::write(&ok_marker, "").unwrap();
        let v1 = r#"{"session":{"max_session_duration_ms":60000}}"#;
        assert_eq!(
            execute(apply(1, v1), &ctx).await,
            Some(CommandOutcome::Done)
        );
        std::fs::remove_file(&ok_marker).unwrap();
        let v2 = r#"{"session":{"max_session_duration_ms":120000}}"#;
        let out = execute(apply(2, v2), &ctx).await;
        assert!(
            matches!(&out, Some(CommandOutcome::Failed(m)) if m.contains("not now")),
            "{out:?}"
        );
        assert_eq!(ctx.policy.current(), Some(("g1".into(), 1)));
        assert_eq!(ctx.limits.borrow().max_session_duration_ms, Some(60_000));
        std::fs::write(&ok_marker, "").unwrap();
        assert_eq!(
            execute(apply(2, v2), &ctx).await,
            Some(CommandOutcome::Done)
        );
        assert_eq!(ctx.policy.current(), Some(("g1".into(), 2)));
        assert_eq!(ctx.limits.borrow().max_session_duration_ms, Some(120_000));
    }
}
