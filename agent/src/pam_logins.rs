//! PAM logins made with Ferry tickets: which session each login is.
//!
//! A streaming server that authenticates through PAM (xrdp's sesman,
//! OpenSSH's sshd, ...) runs `ferry-agent pam` from `pam_exec` three times
//! for one login:
//!
//! 1. **auth** (`expose_authtok`): the password is the user's ticket. The
//!    local socket's `PamAuth` verifies it for the PAM user (a ticket of
//!    another user is refused and stays good for its owner) and marks it
//!    used durably. The agent then holds a *pending login*: service S may
//!    open session X for user U, until the ticket's expiry plus
//!    [`START_GRACE_MS`].
//! 2. **open_session**: the local socket's `PamOpen` takes the newest
//!    pending login of (S, U) authenticated by the same process, its parent
//!    or its child (sshd authenticates a password in the process that
//!    opens, keyboard-interactive in a child of it; xrdp's sesman in the
//!    parent of the session's process) and binds the PAM login to session
//!    X. The PAM login is the process that holds the PAM handle:
//!    `pam_exec`'s parent, as the kernel says (`SO_PEERCRED` of
//!    `ferry-agent pam`, then its parent in `/proc`), named by pid and
//!    start time, so a reused pid is never taken for it. X is reported
//!    started, or, when X is open already (a `shared` group's user logging
//!    in again with a fresh ticket for the same session), the login is
//!    attached to it.
//! 3. **close_session**: the local socket's `PamClose` unbinds it; the
//!    session ends with its last login.
//!
//! The requests are answered in `local.rs` (`pam_auth`, `pam_open`,
//! `pam_close`, `pam_sweep`); this module is their state.
//!
//! A login process that exits without closing its PAM session (killed, or
//! a server that gives up after authenticating) is found by a sweep every
//! [`SWEEP_INTERVAL`] and closed the same way, so its slot is never held
//! forever.
//!
//! The bindings are on disk (`pam-logins.json`, replaced atomically on
//! every change) before the start they cause is spooled, and removed only
//! after the end is spooled: an agent restarted in between closes, at
//! start, every login whose process is gone (or that was bound before the
//! host last booted: the file names the boot), and watches the others.
//! Opens, closes and the sweep's closes run one at a time, from the count
//! of a session's logins to the spooled event and the file, so two logins
//! of a shared session closing together end it once.
//! Pending logins live in memory only: they last the milliseconds between
//! a server's authentication and its session opening (an agent restarted
//! in between fails that login; the ticket is used up).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::ticket::START_GRACE_MS;
use ferry_common::wire::UnixMillis;
use ferry_common::{SessionId, UserId};
use serde::{Deserialize, Serialize};

/// The bindings' file in the state directory.
pub const PAM_LOGINS_FILE: &str = "pam-logins.json";

/// Most PAM logins bound at once (a host has far fewer sessions).
pub const MAX_PAM_LOGINS: usize = 4096;

/// Most pending logins (authenticated, session not yet opened).
pub const MAX_PENDING_LOGINS: usize = 1024;

/// Longest PAM service name accepted.
pub const MAX_SERVICE_LEN: usize = 128;

/// Largest bindings file read.
const MAX_FILE_LEN: u64 = 4 * 1024 * 1024;

/// How often bound logins' processes are checked.
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Format version of the bindings file.
const FILE_VERSION: u32 = 1;

/// Why the bindings cannot be loaded or written.
#[derive(Debug, thiserror::Error)]
pub enum PamLoginsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a PAM logins file: {message}; move it away to start (the logins it \
         names then never end by PAM: end them with `ferry-agent session end`)"
    )]
    Corrupt { path: PathBuf, message: String },
}

/// One PAM login: the process holding the PAM handle, for a user, through
/// a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginKey {
    pub service: String,
    pub user: UserId,
    pub pid: u32,
}

/// A PAM login bound to the session its ticket named.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    pub key: LoginKey,
    /// The process's start time (clock ticks after boot, `/proc/PID/stat`):
    /// with the pid, names the process even after the pid is reused.
    pub start_time: u64,
    pub session: SessionId,
    pub opened_at: UnixMillis,
}

#[derive(Serialize, Deserialize)]
struct FileBody {
    version: u32,
    /// `/proc/sys/kernel/random/boot_id` when written: process start
    /// times name processes of one boot only.
    boot_id: String,
    logins: Vec<Login>,
}

/// Authenticated with a ticket, session not yet opened.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pending {
    service: String,
    user: UserId,
    session: SessionId,
    /// Dead from this instant (ticket expiry plus the start grace).
    until: i64,
    /// The process that authenticated (held the PAM handle at `auth`).
    pid: u32,
    /// Its parent then.
    parent: Option<u32>,
}

/// What an open binds the login to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bound {
    /// A new binding: `others` logins were already on the session (0: the
    /// session starts now).
    New { session: SessionId, others: usize },
    /// The same process opened its PAM session twice: nothing changes.
    Again { session: SessionId, others: usize },
}

/// Why a login cannot be bound.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "no ticket login of {user} through {service} is waiting for its session: the login did \
         not authenticate with a Ferry ticket (auth line `pam_exec.so expose_authtok ... \
         ferry-agent pam`), or its ticket expired"
    )]
    NoTicket { service: String, user: UserId },
    #[error("{MAX_PAM_LOGINS} PAM logins are open on this host; no more are taken")]
    Full,
    #[error("cannot record the PAM login: {0}")]
    Storage(#[from] PamLoginsError),
}

struct State {
    pending: VecDeque<Pending>,
    logins: Vec<Login>,
    /// Logins loaded from a file of an earlier boot, for the first sweep.
    previous_boot: Vec<Login>,
}

/// The host's PAM logins; cheap to clone (one shared state).
#[derive(Clone)]
pub struct PamLogins {
    inner: Arc<Mutex<State>>,
    path: PathBuf,
    /// This boot's id, written with the bindings.
    boot_id: String,
    /// Held by an open, a close or a sweep's close from its count of a
    /// session's logins to its spooled event and file write.
    serial: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for PamLogins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PamLogins")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl PamLogins {
    /// Loads the bindings of `state_dir` (none when there is no file).
    pub fn load(state_dir: &Path) -> Result<Self, PamLoginsError> {
        let path = state_dir.join(PAM_LOGINS_FILE);
        let boot_id = boot_id();
        let (file_boot, logins) = read_file(&path)?;
        let previous_boot = if file_boot == boot_id {
            Vec::new()
        } else {
            logins.clone()
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(State {
                pending: VecDeque::new(),
                logins,
                previous_boot,
            })),
            path,
            boot_id,
            serial: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent state: every
        // change is made after its write succeeded.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every bound login.
    pub fn logins(&self) -> Vec<Login> {
        self.lock().logins.clone()
    }

    /// Held by an open, a close or a sweep's close from its count of a
    /// session's logins to its spooled event and file write.
    pub fn serial(&self) -> &tokio::sync::Mutex<()> {
        &self.serial
    }

    /// The logins bound before the host last booted (once: the first sweep
    /// closes them).
    pub fn take_previous_boot(&self) -> Vec<Login> {
        std::mem::take(&mut self.lock().previous_boot)
    }

    /// Pending logins.
    #[cfg(test)]
    fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// Process `pid` (child of `parent`) of service `service` may open
    /// `session` for `user` until `expires_at` (a ticket's expiry) plus the
    /// start grace. The oldest pending login is dropped when there are too
    /// many.
    pub fn add_pending(
        &self,
        service: &str,
        user: &UserId,
        session: &SessionId,
        expires_at: i64,
        (pid, parent): (u32, Option<u32>),
    ) {
        let mut state = self.lock();
        if state.pending.len() >= MAX_PENDING_LOGINS {
            if let Some(old) = state.pending.pop_front() {
                tracing::warn!(user = %old.user, session = %old.session,
                    "too many PAM logins waiting for their session: the oldest is dropped");
            }
        }
        state.pending.push_back(Pending {
            service: service.to_owned(),
            user: user.clone(),
            session: session.clone(),
            until: expires_at.saturating_add(START_GRACE_MS),
            pid,
            parent,
        });
    }

    /// Binds the login `key` (its process started at `start_time`, child of
    /// `parent`) to the session of the newest pending login of its service
    /// and user that this process, its parent or a child of it
    /// authenticated, durably. Blocking (fsync).
    pub fn open_blocking(
        &self,
        key: &LoginKey,
        start_time: u64,
        parent: Option<u32>,
        at: UnixMillis,
    ) -> Result<Bound, OpenError> {
        let mut state = self.lock();
        if let Some(l) = state
            .logins
            .iter()
            .find(|l| &l.key == key && l.start_time == start_time)
        {
            let others = state
                .logins
                .iter()
                .filter(|o| o.session == l.session && o.key != l.key)
                .count();
            return Ok(Bound::Again {
                session: l.session.clone(),
                others,
            });
        }
        state.pending.retain(|p| p.until > at.0);
        let Some(i) = state.pending.iter().rposition(|p| {
            p.service == key.service
                && p.user == key.user
                && (p.pid == key.pid || p.parent == Some(key.pid) || Some(p.pid) == parent)
        }) else {
            return Err(OpenError::NoTicket {
                service: key.service.clone(),
                user: key.user.clone(),
            });
        };
        if state.logins.len() >= MAX_PAM_LOGINS {
            return Err(OpenError::Full);
        }
        let session = state.pending[i].session.clone();
        // A dead process's binding under the same key was ended by the
        // caller first ([`open_login`]).
        let mut logins: Vec<Login> = state
            .logins
            .iter()
            .filter(|l| &l.key != key)
            .cloned()
            .collect();
        let others = logins.iter().filter(|l| l.session == session).count();
        logins.push(Login {
            key: key.clone(),
            start_time,
            session: session.clone(),
            opened_at: at,
        });
        write_file(&self.path, &self.boot_id, &logins)?;
        state.logins = logins;
        state.pending.remove(i);
        Ok(Bound::New { session, others })
    }

    /// The login `key` (of the process started at `start_time`, when
    /// known) and how many other logins share its session.
    pub fn find(&self, key: &LoginKey, start_time: Option<u64>) -> Option<(Login, usize)> {
        let state = self.lock();
        let login = state
            .logins
            .iter()
            .find(|l| &l.key == key && start_time.is_none_or(|t| t == l.start_time))?
            .clone();
        let others = state
            .logins
            .iter()
            .filter(|l| l.session == login.session && l.key != login.key)
            .count();
        Some((login, others))
    }

    /// [`Self::open_blocking`] on a blocking thread.
    pub async fn open(
        &self,
        key: LoginKey,
        start_time: u64,
        parent: Option<u32>,
        at: UnixMillis,
    ) -> Result<Bound, OpenError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.open_blocking(&key, start_time, parent, at))
            .await
            .map_err(|e| OpenError::Storage(self.task_failed("bind the PAM login", e)))?
    }

    /// [`Self::remove_blocking`] on a blocking thread.
    pub async fn remove(&self, login: &Login) -> Result<(), PamLoginsError> {
        let (this, login) = (self.clone(), login.clone());
        tokio::task::spawn_blocking(move || this.remove_blocking(&login))
            .await
            .map_err(|e| self.task_failed("forget the PAM login", e))?
    }

    fn task_failed(&self, op: &'static str, e: tokio::task::JoinError) -> PamLoginsError {
        PamLoginsError::Io {
            op,
            path: self.path.clone(),
            source: std::io::Error::other(format!("task failed: {e}")),
        }
    }

    /// Forgets `login`, durably. Blocking (fsync).
    pub fn remove_blocking(&self, login: &Login) -> Result<(), PamLoginsError> {
        let mut state = self.lock();
        if !state.logins.contains(login) {
            return Ok(());
        }
        let logins: Vec<Login> = state
            .logins
            .iter()
            .filter(|l| *l != login)
            .cloned()
            .collect();
        write_file(&self.path, &self.boot_id, &logins)?;
        state.logins = logins;
        Ok(())
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PamLoginsError + 'a {
    move |source| PamLoginsError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), empty when the
/// kernel does not say (then every start is taken for a new boot).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().chars().take(64).collect())
        .unwrap_or_default()
}

/// The boot the file was written in, and its logins.
fn read_file(path: &Path) -> Result<(String, Vec<Login>), PamLoginsError> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((boot_id(), Vec::new())),
        Err(e) => return Err(io("open", path)(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io("read", path))?;
    let corrupt = |message: String| PamLoginsError::Corrupt {
        path: path.to_owned(),
        message,
    };
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(corrupt(format!("longer than {MAX_FILE_LEN} bytes")));
    }
    let body: FileBody = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if body.version != FILE_VERSION {
        return Err(corrupt(format!(
            "format version {}, this agent reads {FILE_VERSION}",
            body.version
        )));
    }
    if body.logins.len() > MAX_PAM_LOGINS {
        return Err(corrupt(format!(
            "{} logins, more than the {MAX_PAM_LOGINS} an agent keeps",
            body.logins.len()
        )));
    }
    if let Some(bad) = body
        .logins
        .iter()
        .find(|l| l.key.service.len() > MAX_SERVICE_LEN || l.key.pid <= 1)
    {
        return Err(corrupt(format!("login {:?} cannot be one", bad.key)));
    }
    Ok((body.boot_id, body.logins))
}

fn write_file(path: &Path, boot_id: &str, logins: &[Login]) -> Result<(), PamLoginsError> {
    let body = FileBody {
        version: FILE_VERSION,
        boot_id: boot_id.to_owned(),
        logins: logins.to_vec(),
    };
    let bytes = serde_json::to_vec_pretty(&body).map_err(|e| PamLoginsError::Corrupt {
        path: path.to_owned(),
        message: format!("cannot encode: {e}"),
    })?;
    ferry_process::files::write_atomic(path, &bytes, ferry_process::files::PRIVATE).map_err(|e| {
        PamLoginsError::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        }
    })
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`, clock
/// ticks after boot), `None` when there is no such process.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/PID/stat` line. The command name (field 2) may hold
/// spaces and parentheses: fields are counted after its last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts with field 3 (state): field 22 is its 20th.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// The parent of process `pid` (field 4 of `/proc/PID/stat`).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_ascii_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(service: &str, user: &str, pid: u32) -> LoginKey {
        LoginKey {
            service: service.into(),
            user: user.parse().expect("user"),
            pid,
        }
    }

    fn logins(dir: &Path) -> PamLogins {
        PamLogins::load(dir).expect("load")
    }

    fn sid(s: &str) -> SessionId {
        s.parse().expect("session")
    }

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1 2 3";
        assert_eq!(parse_start_time(line), Some(987654));
        assert_eq!(parse_start_time("42 (x) S 1"), None);
        let me = std::process::id();
        assert!(process_start_time(me).is_some());
        assert_eq!(parent_pid(me), Some(std::os::unix::process::parent_id()));
    }

    #[test]
    fn an_open_takes_the_newest_pending_login_its_process_or_its_parent_authenticated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = logins(dir.path());
        let alice: UserId = "alice".parse().expect("id");
        // sshd authenticates and opens in one process; xrdp's sesman (50)
        // authenticates, and a child of it opens.
        p.add_pending("sshd", &alice, &sid("s-1"), 10_000, (100, None));
        p.add_pending("xrdp-sesman", &alice, &sid("s-2"), 10_000, (50, None));
        p.add_pending("sshd", &alice, &sid("s-3"), 10_000, (101, None));
        let err = p.open_blocking(&key("sshd", "bob", 100), 7, None, UnixMillis(1));
        assert!(matches!(err, Err(OpenError::NoTicket { .. })), "{err:?}");
        // Another process that authenticated nothing (sshd with a key).
        let err = p.open_blocking(&key("sshd", "alice", 102), 7, Some(1), UnixMillis(1));
        assert!(matches!(err, Err(OpenError::NoTicket { .. })), "{err:?}");
        let b = p
            .open_blocking(&key("sshd", "alice", 101), 7, Some(1), UnixMillis(1))
            .expect("open");
        assert_eq!(
            b,
            Bound::New {
                session: sid("s-3"),
                others: 0
            }
        );
        let b = p
            .open_blocking(&key("sshd", "alice", 100), 7, Some(1), UnixMillis(1))
            .expect("open");
        assert_eq!(
            b,
            Bound::New {
                session: sid("s-1"),
                others: 0
            }
        );
        let b = p
            .open_blocking(
                &key("xrdp-sesman", "alice", 103),
                7,
                Some(50),
                UnixMillis(1),
            )
            .expect("open by the authenticating process's child");
        assert_eq!(
            b,
            Bound::New {
                session: sid("s-2"),
                others: 0
            }
        );
        // sshd's keyboard-interactive: a child (120) of the process that
        // opens (110) authenticated, and has exited since.
        p.add_pending("sshd", &alice, &sid("s-6"), 10_000, (120, Some(110)));
        let b = p
            .open_blocking(&key("sshd", "alice", 110), 7, Some(1), UnixMillis(1))
            .expect("open by the authenticating process's parent");
        assert_eq!(
            b,
            Bound::New {
                session: sid("s-6"),
                others: 0
            }
        );
        // The same process opening twice changes nothing.
        let b = p
            .open_blocking(&key("sshd", "alice", 100), 7, Some(1), UnixMillis(1))
            .expect("again");
        assert_eq!(
            b,
            Bound::Again {
                session: sid("s-1"),
                others: 0
            }
        );
        assert_eq!(p.pending_count(), 0);
        // The newest of one process's pending logins; a stale one dies with
        // its ticket (plus the grace).
        p.add_pending("sshd", &alice, &sid("s-4"), 10_000, (104, None));
        p.add_pending("sshd", &alice, &sid("s-5"), 20_000, (104, None));
        let b = p
            .open_blocking(&key("sshd", "alice", 104), 7, None, UnixMillis(2))
            .expect("open");
        assert_eq!(
            b,
            Bound::New {
                session: sid("s-5"),
                others: 0
            }
        );
        let late = UnixMillis(10_000 + START_GRACE_MS);
        let err = p.open_blocking(&key("sshd", "alice", 105), 7, Some(104), late);
        assert!(matches!(err, Err(OpenError::NoTicket { .. })), "{err:?}");
        assert_eq!(p.pending_count(), 0);
    }

    #[test]
    fn a_second_login_with_a_fresh_ticket_for_the_same_session_attaches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = logins(dir.path());
        let alice: UserId = "alice".parse().expect("id");
        p.add_pending("sshd", &alice, &sid("s-1"), 10_000, (100, None));
        p.add_pending("sshd", &alice, &sid("s-1"), 20_000, (200, None));
        p.open_blocking(&key("sshd", "alice", 100), 7, None, UnixMillis(1))
            .expect("first");
        let b = p
            .open_blocking(&key("sshd", "alice", 200), 8, None, UnixMillis(2))
            .expect("second");
        assert_eq!(
            b,
            Bound::New {
                session: sid("s-1"),
                others: 1
            }
        );
        let (first, others) = p.find(&key("sshd", "alice", 100), Some(7)).expect("bound");
        assert_eq!(others, 1, "the session has another login");
        p.remove_blocking(&first).expect("remove");
        let (_, others) = p.find(&key("sshd", "alice", 200), None).expect("bound");
        assert_eq!(others, 0, "the last login: its close ends the session");
        // Another process under a reused pid is not the login.
        assert!(p.find(&key("sshd", "alice", 200), Some(9)).is_none());
    }

    #[test]
    fn bindings_survive_a_restart_and_a_bad_file_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = logins(dir.path());
        let alice: UserId = "alice".parse().expect("id");
        p.add_pending("sshd", &alice, &sid("s-1"), 10_000, (100, None));
        p.open_blocking(&key("sshd", "alice", 100), 7, None, UnixMillis(1))
            .expect("open");
        drop(p);
        let p = logins(dir.path());
        let l = p.logins();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].session, sid("s-1"));
        assert_eq!(l[0].start_time, 7);
        assert_eq!(p.pending_count(), 0, "pending logins are not kept");
        p.remove_blocking(&l[0]).expect("remove");
        assert!(logins(dir.path()).logins().is_empty());

        std::fs::write(
            dir.path().join(PAM_LOGINS_FILE),
            b"{\"version\":1,\"logins\":[",
        )
        .expect("write");
        let err = PamLogins::load(dir.path()).expect_err("torn file");
        assert!(err.to_string().contains(PAM_LOGINS_FILE), "{err}");
        std::fs::write(
            dir.path().join(PAM_LOGINS_FILE),
            br#"{"version":1,"boot_id":"b","logins":[{"key":{"service":"sshd","user":"alice","pid":1},"start_time":1,"session":"s","opened_at":1}]}"#,
        )
        .expect("write");
        assert!(PamLogins::load(dir.path()).is_err());
    }

    #[test]
    fn logins_of_an_earlier_boot_are_handed_to_the_first_sweep() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(PAM_LOGINS_FILE),
            br#"{"version":1,"boot_id":"an-earlier-boot","logins":[{"key":{"service":"sshd","user":"alice","pid":4242},"start_time":1,"session":"s","opened_at":1}]}"#,
        )
        .expect("write");
        let p = logins(dir.path());
        assert_eq!(p.logins().len(), 1, "kept until closed");
        let stale = p.take_previous_boot();
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].session, sid("s"));
        assert!(p.take_previous_boot().is_empty(), "handed over once");
        // Written again in this boot: no longer an earlier boot's.
        p.remove_blocking(&stale[0]).expect("remove");
        assert!(logins(dir.path()).take_previous_boot().is_empty());
    }

    #[test]
    fn too_many_pending_logins_drop_the_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = logins(dir.path());
        let alice: UserId = "alice".parse().expect("id");
        for i in 0..=MAX_PENDING_LOGINS {
            p.add_pending("sshd", &alice, &sid(&format!("s-{i}")), 10_000, (100, None));
        }
        assert_eq!(p.pending_count(), MAX_PENDING_LOGINS);
        p.add_pending("sshd", &alice, &sid("s-last"), 10_000, (101, None));
        assert_eq!(p.pending_count(), MAX_PENDING_LOGINS);
        let b = p
            .open_blocking(&key("sshd", "alice", 101), 7, None, UnixMillis(1))
            .expect("open");
        assert_eq!(
            b,
            Bound::New {
                session: sid("s-last"),
                others: 0
            }
        );
    }
}
