//! Running an operator's command (a hook, a provisioning tool) to its end
//! without letting it block or flood the daemon.
//!
//! * The command runs in its own process group with stdin closed, so a
//!   timeout can end everything it started (its children and theirs), not
//!   only the direct child.
//! * Its stdout and stderr are read to their end as they come, keeping only
//!   the last `keep` bytes of each: a command that prints megabytes (a
//!   package manager) is never left writing into a full pipe, nor killed by
//!   `SIGPIPE` because the reader went away, and the daemon's memory stays
//!   bounded.
//! * Past the timeout the whole group gets `SIGKILL`; so does it when the
//!   caller gives up on the run (its future is dropped) before the command
//!   exits.
//!
//! Once the direct child has exited the run is over: output still arriving
//! from something it left in the background (holding the pipes open) is
//! read for at most [`AFTER_EXIT_GRACE`] more (within the timeout), and what
//! it left running is not killed.

use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::time::Instant;

/// How long output is still read once the command has exited (or been
/// killed), for what a process it left behind still holds open.
pub const AFTER_EXIT_GRACE: Duration = Duration::from_secs(1);

/// How a command ran.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status; `None` when it was still running at the timeout and
    /// its process group was killed.
    pub status: Option<ExitStatus>,
    /// The last bytes of its stdout (at most `keep`).
    pub stdout: Vec<u8>,
    /// The last bytes of its stderr (at most `keep`).
    pub stderr: Vec<u8>,
    /// Bytes it wrote to stdout in all.
    pub stdout_len: u64,
    /// Bytes it wrote to stderr in all.
    pub stderr_len: u64,
}

impl Finished {
    /// Whether it ran out of time (and was killed).
    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }
}

/// Why a command could not be run or waited for.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The program could not be started (missing, not executable).
    #[error("{0}")]
    Spawn(io::Error),
    /// Waiting for it failed (its process group was killed).
    #[error("wait: {0}")]
    Wait(io::Error),
}

/// Runs `command` to its end or for at most `timeout`, keeping the last
/// `keep` bytes of its stdout and of its stderr. Its stdin, stdout, stderr
/// and process group are set here (whatever the caller set).
pub async fn run(
    mut command: Command,
    timeout: Duration,
    keep: usize,
) -> Result<Finished, RunError> {
    let deadline = Instant::now() + timeout;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(RunError::Spawn)?;
    // Its pid is its process group's id (`process_group(0)`).
    let mut group = GroupGuard(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(Pid::from_raw),
    );
    let out = Tail::new(keep);
    let err = Tail::new(keep);
    let readers = [
        child
            .stdout
            .take()
            .map(|r| tokio::spawn(drain(r, out.clone()))),
        child
            .stderr
            .take()
            .map(|r| tokio::spawn(drain(r, err.clone()))),
    ];
    let status = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(Ok(status)) => {
            // Exited: what it left running is not ours to kill.
            group.0 = None;
            Some(status)
        }
        Ok(Err(e)) => return Err(RunError::Wait(e)),
        Err(_) => {
            group.kill();
            // Reaps the direct child (already killed with its group).
            let _ = child.kill().await;
            None
        }
    };
    let grace = match status {
        Some(_) => deadline
            .saturating_duration_since(Instant::now())
            .min(AFTER_EXIT_GRACE),
        None => AFTER_EXIT_GRACE,
    };
    let mut readers = readers;
    let _ = tokio::time::timeout(grace, async {
        for r in readers.iter_mut().flatten() {
            // A reader that panicked only shortens the output.
            let _ = r.await;
        }
    })
    .await;
    for r in readers.iter().flatten() {
        r.abort();
    }
    let (stdout, stdout_len) = out.take();
    let (stderr, stderr_len) = err.take();
    Ok(Finished {
        status,
        stdout,
        stderr,
        stdout_len,
        stderr_len,
    })
}

/// Whether process `pid` is gone (or a zombie not reaped yet) within
/// `within`, polling: a killed process closes its pipes a moment before it
/// is a zombie. Blocking; for tests that check what a timeout killed.
pub fn gone_within(pid: i32, within: Duration) -> bool {
    let Some(pid) = Pid::from_raw(pid) else {
        return false;
    };
    let deadline = std::time::Instant::now() + within;
    loop {
        let zombie = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero()))
            .is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            });
        if zombie || rustix::process::test_kill_process(pid).is_err() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `SIGKILL` to a process group when dropped, unless disarmed.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            match rustix::process::kill_process_group(pgid, Signal::KILL) {
                Ok(()) => {}
                // Already gone.
                Err(rustix::io::Errno::SRCH) => {}
                Err(e) => tracing::warn!(
                    pgid = pgid.as_raw_nonzero().get(),
                    "kill process group: {e}"
                ),
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last bytes of a stream, shared between its reader and the caller (so
/// that a reader stopped early leaves what it read).
#[derive(Clone)]
struct Tail(Arc<Mutex<TailBuf>>);

struct TailBuf {
    kept: Vec<u8>,
    keep: usize,
    total: u64,
}

impl Tail {
    fn new(keep: usize) -> Self {
        Self(Arc::new(Mutex::new(TailBuf {
            kept: Vec::new(),
            keep,
            total: 0,
        })))
    }

    fn push(&self, bytes: &[u8]) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        t.total = t.total.saturating_add(bytes.len() as u64);
        t.kept.extend_from_slice(bytes);
        // Cut back only once twice over: the copy costs O(1) per byte read.
        if t.kept.len() > t.keep.saturating_mul(2).max(8192) {
            let extra = t.kept.len() - t.keep;
            t.kept.drain(..extra);
        }
    }

    /// The last `keep` bytes and the count of all bytes.
    fn take(&self) -> (Vec<u8>, u64) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut kept = std::mem::take(&mut t.kept);
        if kept.len() > t.keep {
            kept.drain(..kept.len() - t.keep);
        }
        (kept, t.total)
    }
}

/// Reads `r` to its end into `tail`. A read error ends it: it only shortens
/// the output kept.
async fn drain(mut r: impl AsyncRead + Unpin, tail: Tail) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => tail.push(&buf[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script]);
        c
    }

    #[tokio::test]
    async fn a_long_output_is_read_to_its_end_and_its_tail_kept() {
        // 200 KB on each stream: far past a pipe's buffer.
        let script = "i=0; while [ $i -lt 2000 ]; do \
             printf '%099d\\n' $i; printf '%099d\\n' $i >&2; i=$((i+1)); done; echo end; echo end >&2";
        let done = run(sh(script), Duration::from_secs(30), 1000)
            .await
            .expect("runs");
        assert!(done.status.is_some_and(|s| s.success()), "{done:?}");
        assert_eq!(done.stdout_len, 200_004);
        assert_eq!(done.stderr_len, 200_004);
        for kept in [&done.stdout, &done.stderr] {
            assert_eq!(kept.len(), 1000);
            assert!(kept.ends_with(b"0001999\nend\n"));
        }
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().expect("tmp");
        let pid_file = dir.path().join("pid");
        let script = format!(
            "sleep 600 & echo $! > '{}'; echo started >&2; sleep 600",
            pid_file.display()
        );
        let done = run(sh(&script), Duration::from_secs(1), 100)
            .await
            .expect("runs");
        assert!(done.timed_out());
        assert_eq!(done.stderr, b"started\n");
        let pid = std::fs::read_to_string(&pid_file).expect("pid file");
        assert!(
            gone_within(pid.trim().parse().expect("pid"), Duration::from_secs(5)),
            "the grandchild survived"
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error() {
        let r = run(Command::new("/nonexistent/x"), Duration::from_secs(5), 10).await;
        assert!(matches!(r, Err(RunError::Spawn(_))), "{r:?}");
    }
}
