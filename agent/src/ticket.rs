//! Session tickets on the host: the broker's public key and the set of
//! tickets already used.
//!
//! The broker sends its ticket public key after every `Welcome`
//! (`BrokerToAgent::TicketKey`); the agent keeps it in
//! `state_dir/ticket-key` (written atomically), so tickets verify while the
//! broker is unreachable. The streaming server asks the agent to verify the
//! ticket a client presents (local socket `VerifyTicket`, or
//! `ferry-agent ticket verify`): signature, expiry, this host, and single
//! use. A ticket accepted once is refused afterwards, also after a restart
//! of the agent or a crash of the host:
//!
//! * Its id is appended to `state_dir/used-tickets` and the file is fsync'd
//!   **before** the answer "valid" is given.
//! * The file is a magic header and fixed 24-byte records (id, expiry). A
//!   torn last record (crash mid-write) is cut off on open: its ticket was
//!   never answered "valid".
//! * Entries are kept until their ticket's expiry plus [`PRUNE_GRACE_MS`]
//!   (a clock stepped back a little cannot revive a pruned ticket), then
//!   dropped; the file is rewritten (atomically) when it holds more dead
//!   records than live ones plus [`COMPACT_SLACK`].
//! * At most [`MAX_USED_TICKETS`] live entries: beyond, tickets are refused
//!   rather than the set growing (a host admits a few sessions a minute;
//!   tickets live a minute).
//!
//! A verified ticket is also what lets the host report its session: the
//! ticket's session and user are appended to `state_dir/verified-sessions`
//! (one line `EXPIRY SESSION USER`, fsync'd before the ticket's own record),
//! and `ferry-agent session start` for that session and user is accepted
//! until the ticket's expiry plus [`START_GRACE_MS`] ([`TicketVerifier::start_grant`]),
//! also after a restart of the agent. The entries are bounded like the used
//! set (one per used ticket, dropped after their expiry plus the grace), a
//! torn or unreadable line is dropped on open (its ticket was never answered
//! "valid", or the start needs `--ticket` / `--trusted` instead).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_common::limits::{MAX_TICKET_LIFETIME_MS, TICKET_PUBLIC_KEY_LEN};
use ferry_common::ticket::{verify_ticket, TicketClaims, TicketError};
use ferry_common::{ResourceId, SessionId, UnixMillis, UserId};

/// The broker's ticket public key, in the state directory.
pub const TICKET_KEY_FILE: &str = "ticket-key";

/// The used-ticket set, in the state directory.
pub const USED_TICKETS_FILE: &str = "used-tickets";

/// The sessions verified tickets allow the host to start, in the state
/// directory.
pub const VERIFIED_SESSIONS_FILE: &str = "verified-sessions";

/// How long after its ticket's expiry a verified session may still be
/// reported started: the streaming server verifies, then starts the session
/// at once, but a ticket verified in its last second must not fail the start.
pub const START_GRACE_MS: i64 = 60_000;

/// Longest line of the verified-sessions file: an expiry, two ids at their
/// limit, two spaces and a newline.
const MAX_GRANT_LINE: usize = 20 + 2 * ferry_common::limits::MAX_ID_LEN + 3;

/// Most tickets remembered at once (see the module docs).
pub const MAX_USED_TICKETS: usize = 100_000;

/// Used tickets are remembered this long after their expiry.
pub const PRUNE_GRACE_MS: i64 = MAX_TICKET_LIFETIME_MS;

/// Dead records tolerated in the file beyond the live ones before it is
/// rewritten.
pub const COMPACT_SLACK: usize = 1024;

/// First bytes of the used-ticket file.
const MAGIC: &[u8; 8] = b"FYUSED01";

/// One record: ticket id (16 bytes), expiry (i64, big-endian).
const RECORD_LEN: usize = 24;

/// Largest used-ticket file read at open: compaction keeps it under this.
const MAX_FILE_RECORDS: usize = 2 * MAX_USED_TICKETS + COMPACT_SLACK + 1;

/// Why the ticket store cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum TicketStoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a used-ticket file: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("ticket key of {0} bytes; expected {TICKET_PUBLIC_KEY_LEN}")]
    BadKey(usize),
}

fn io<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> TicketStoreError + 'a {
    move |source| TicketStoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Why a ticket is refused by this agent.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Ticket(#[from] TicketError),
    #[error("reused ticket: ticket {ticket_id} was already used on this host")]
    Reused { ticket_id: String },
    #[error(
        "this agent has no ticket key yet: it has not reached the broker since it was installed"
    )]
    NoKey,
    #[error("{MAX_USED_TICKETS} tickets are in use; refusing more until some expire")]
    Full,
    #[error("cannot record the ticket as used: {0}")]
    Storage(String),
    #[error(
        "the ticket is for session {ticket_session} of {ticket_user}, not session {session} of {user}; \
         report the session the ticket names"
    )]
    Mismatch {
        ticket_session: SessionId,
        ticket_user: UserId,
        session: SessionId,
        user: UserId,
    },
    #[error("the ticket is for user {ticket_user}, not for {user} who presented it")]
    OtherUser { ticket_user: UserId, user: UserId },
}

/// Why a session start is not covered by a verified ticket.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("no verified ticket for session {session}")]
    Missing { session: SessionId },
    #[error("the ticket verified for session {session} is for user {granted}, not {user}")]
    OtherUser {
        session: SessionId,
        granted: UserId,
        user: UserId,
    },
    #[error("the ticket verified for session {session} expired at {expired_at} (Unix ms)")]
    Expired { session: SessionId, expired_at: i64 },
    #[error("ticket state unavailable: {0}")]
    Storage(String),
}

impl VerifyError {
    /// A short stable reason: `malformed`, `forged`, `expired`,
    /// `other-host`, `reused`, `no-key`, `full`, `storage`.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Ticket(t) => t.code(),
            VerifyError::Reused { .. } => "reused",
            VerifyError::NoKey => "no-key",
            VerifyError::Full => "full",
            VerifyError::Storage(_) => "storage",
            VerifyError::Mismatch { .. } => "mismatch",
            VerifyError::OtherUser { .. } => "other-user",
        }
    }
}

struct Inner {
    key: Option<Vec<u8>>,
    /// Live used tickets: id -> expiry (ms).
    used: HashMap<[u8; 16], i64>,
    /// The used-ticket file, written at the end of its whole records
    /// ([`append_at`]).
    file: File,
    /// Records in the file (live and dead).
    records: usize,
    /// Sessions verified tickets allow: session -> (user, ticket expiry).
    grants: HashMap<SessionId, (UserId, i64)>,
    /// The verified-sessions file, written like `file`.
    grant_file: File,
    /// Lines in that file (live and dead).
    grant_records: usize,
    /// Bytes of those lines: where the next one is written.
    grant_len: u64,
}

/// What a verified ticket must also say, checked before it is marked used.
#[derive(Clone, Copy)]
enum Expect<'a> {
    Nothing,
    /// This session of this user (a session start carrying its ticket).
    Session(&'a SessionId, &'a UserId),
    /// This user (a PAM login).
    User(&'a UserId),
}

/// The host's ticket checks; cheap to clone (one shared state).
#[derive(Clone)]
pub struct TicketVerifier {
    inner: Arc<Mutex<Inner>>,
    resource: ResourceId,
    dir: PathBuf,
}

impl std::fmt::Debug for TicketVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketVerifier")
            .field("resource", &self.resource)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Writes `bytes` to `path` atomically and private: a temporary of its own
/// (never a planted symlink), fsync, rename, fsync of the directory.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), TicketStoreError> {
    ferry_process::files::write_atomic(&dir.join(name), bytes, ferry_process::files::PRIVATE)
        .map_err(|e| TicketStoreError::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        })
}

/// Opens an append-only record file for [`append_at`].
fn open_records(path: &Path) -> Result<File, TicketStoreError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io("open", path))
}

/// Writes `bytes` at `end`, the end of the file's last whole record, and
/// syncs it. Whatever lies beyond `end` (the part of an append that failed
/// or that a crash cut short) is cut off first, and a failed append is cut
/// off again, so a later append never lands after a torn one.
fn append_at(file: &File, end: u64, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    if file.metadata()?.len() != end {
        file.set_len(end)?;
    }
    let written = file
        .write_all_at(bytes, end)
        .and_then(|()| file.sync_data());
    if written.is_err() {
        // Best effort: when this fails too, the next append cuts it.
        let _ = file.set_len(end);
    }
    written
}

fn record(id: &[u8; 16], expires_at: i64) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[..16].copy_from_slice(id);
    r[16..].copy_from_slice(&expires_at.to_be_bytes());
    r
}

fn parse_records(body: &[u8]) -> impl Iterator<Item = ([u8; 16], i64)> + '_ {
    body.chunks_exact(RECORD_LEN).map(|r| {
        let mut id = [0u8; 16];
        id.copy_from_slice(&r[..16]);
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&r[16..]);
        (id, i64::from_be_bytes(exp))
    })
}

fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_dead(expires_at: i64, now: UnixMillis) -> bool {
    expires_at.saturating_add(PRUNE_GRACE_MS) <= now.0
}

fn grant_is_dead(expires_at: i64, now: UnixMillis) -> bool {
    expires_at.saturating_add(START_GRACE_MS) <= now.0
}

fn grant_line(session: &SessionId, user: &UserId, expires_at: i64) -> String {
    format!("{expires_at} {session} {user}\n")
}

/// One line of the verified-sessions file; `None` when unreadable.
fn parse_grant(line: &str) -> Option<(SessionId, UserId, i64)> {
    let mut parts = line.split(' ');
    let expires_at = parts.next()?.parse().ok()?;
    let session = SessionId::new(parts.next()?).ok()?;
    let user = UserId::new(parts.next()?).ok()?;
    parts
        .next()
        .is_none()
        .then_some((session, user, expires_at))
}

/// Reads the verified-sessions file (bounded), keeping the live entries;
/// returns them, the number of lines kept in the file, the file (for
/// [`append_at`]) and its length. A torn or unreadable line is dropped with
/// a warning.
#[allow(clippy::type_complexity)]
fn open_grants(
    state_dir: &Path,
    now: UnixMillis,
) -> Result<(HashMap<SessionId, (UserId, i64)>, usize, File, u64), TicketStoreError> {
    let path = state_dir.join(VERIFIED_SESSIONS_FILE);
    let max = (MAX_FILE_RECORDS * MAX_GRANT_LINE) as u64;
    let mut grants = HashMap::new();
    let mut lines = 0;
    match File::open(&path) {
        Ok(f) => {
            let mut bytes = Vec::new();
            f.take(max + 1)
                .read_to_end(&mut bytes)
                .map_err(io("read", &path))?;
            if bytes.len() as u64 > max {
                return Err(TicketStoreError::Corrupt {
                    path,
                    message: format!("over {max} bytes"),
                });
            }
            let text = String::from_utf8_lossy(&bytes);
            let complete = text.rfind('\n').map_or(0, |i| i + 1);
            let mut dropped = complete != text.len();
            for line in text[..complete].lines() {
                match parse_grant(line) {
                    Some((session, user, exp)) => {
                        lines += 1;
                        if !grant_is_dead(exp, now) {
                            grants.insert(session, (user, exp));
                        }
                    }
                    None => dropped = true,
                }
            }
            if dropped {
                tracing::warn!(path = %path.display(), "dropping unreadable verified-session lines");
                let mut kept = String::new();
                for (session, (user, exp)) in &grants {
                    kept.push_str(&grant_line(session, user, *exp));
                }
                write_atomic(state_dir, VERIFIED_SESSIONS_FILE, kept.as_bytes())?;
                lines = grants.len();
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomic(state_dir, VERIFIED_SESSIONS_FILE, b"")?;
        }
        Err(e) => return Err(io("open", &path)(e)),
    }
    let file = open_records(&path)?;
    let len = file.metadata().map_err(io("stat", &path))?.len();
    Ok((grants, lines, file, len))
}

impl TicketVerifier {
    /// Opens (or creates) the key and the used-ticket set in `state_dir`.
    /// Blocking (file I/O); call from a blocking context at start.
    pub fn open(
        state_dir: &Path,
        resource: ResourceId,
        now: UnixMillis,
    ) -> Result<TicketVerifier, TicketStoreError> {
        std::fs::create_dir_all(state_dir).map_err(io("create directory", state_dir))?;
        let key_path = state_dir.join(TICKET_KEY_FILE);
        let key = match File::open(&key_path) {
            Ok(f) => {
                let mut buf = Vec::with_capacity(TICKET_PUBLIC_KEY_LEN);
                f.take(TICKET_PUBLIC_KEY_LEN as u64 + 1)
                    .read_to_end(&mut buf)
                    .map_err(io("read", &key_path))?;
                if buf.len() != TICKET_PUBLIC_KEY_LEN {
                    return Err(TicketStoreError::BadKey(buf.len()));
                }
                Some(buf)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("open", &key_path)(e)),
        };

        let path = state_dir.join(USED_TICKETS_FILE);
        let mut used = HashMap::new();
        let records = match File::open(&path) {
            Ok(f) => {
                let len = f.metadata().map_err(io("stat", &path))?.len();
                let max = (MAGIC.len() + MAX_FILE_RECORDS * RECORD_LEN) as u64;
                if len > max {
                    return Err(TicketStoreError::Corrupt {
                        path,
                        message: format!("{len} bytes; the limit is {max}"),
                    });
                }
                let mut bytes = Vec::with_capacity(len as usize);
                f.take(max)
                    .read_to_end(&mut bytes)
                    .map_err(io("read", &path))?;
                if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
                    return Err(TicketStoreError::Corrupt {
                        path,
                        message: "bad header".into(),
                    });
                }
                let body = &bytes[MAGIC.len()..];
                for (id, exp) in parse_records(body) {
                    if !is_dead(exp, now) {
                        used.insert(id, exp);
                    }
                }
                let whole = body.len() / RECORD_LEN;
                if body.len() % RECORD_LEN != 0 {
                    // A torn append: that ticket was never answered valid.
                    tracing::warn!(path = %path.display(), "cutting off a torn used-ticket record");
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io("open", &path))?;
                    f.set_len((MAGIC.len() + whole * RECORD_LEN) as u64)
                        .and_then(|()| f.sync_all())
                        .map_err(io("truncate", &path))?;
                }
                whole
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_atomic(state_dir, USED_TICKETS_FILE, MAGIC)?;
                0
            }
            Err(e) => return Err(io("open", &path)(e)),
        };
        let file = open_records(&path)?;
        let (grants, grant_records, grant_file, grant_len) = open_grants(state_dir, now)?;
        let mut inner = Inner {
            key,
            used,
            file,
            records,
            grants,
            grant_file,
            grant_records,
            grant_len,
        };
        let dir = state_dir.to_owned();
        compact_if_needed(&dir, &mut inner)?;
        Ok(TicketVerifier {
            inner: Arc::new(Mutex::new(inner)),
            resource,
            dir,
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, VerifyError> {
        self.inner
            .lock()
            .map_err(|_| VerifyError::Storage("ticket state lock poisoned".into()))
    }

    /// The broker's ticket key as last received, if any.
    pub fn public_key(&self) -> Option<Vec<u8>> {
        self.lock().ok().and_then(|i| i.key.clone())
    }

    /// Keeps `key` (from the broker) on disk and in memory; `Ok(true)` if it
    /// changed. Blocking.
    pub fn set_key_blocking(&self, key: &[u8]) -> Result<bool, TicketStoreError> {
        if key.len() != TICKET_PUBLIC_KEY_LEN {
            return Err(TicketStoreError::BadKey(key.len()));
        }
        let mut inner = self.inner.lock().map_err(|_| TicketStoreError::Corrupt {
            path: self.dir.clone(),
            message: "ticket state lock poisoned".into(),
        })?;
        if inner.key.as_deref() == Some(key) {
            return Ok(false);
        }
        write_atomic(&self.dir, TICKET_KEY_FILE, key)?;
        inner.key = Some(key.to_vec());
        Ok(true)
    }

    /// [`Self::set_key_blocking`] on a blocking thread.
    pub async fn set_key(&self, key: Vec<u8>) -> Result<bool, TicketStoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.set_key_blocking(&key))
            .await
            .map_err(|e| TicketStoreError::Io {
                op: "store ticket key (task failed)",
                path: self.dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    /// Verifies `text` for this host at `now` and marks it used (durably)
    /// before answering. Blocking (fsync).
    pub fn verify_blocking(
        &self,
        text: &str,
        now: UnixMillis,
    ) -> Result<TicketClaims, VerifyError> {
        self.verify_expecting(text, now, Expect::Nothing)
    }

    /// [`Self::verify_blocking`] of a ticket that must be for `session` of
    /// `user` (a session start carrying its ticket); a ticket for another
    /// session is refused without being marked used. Blocking.
    pub fn verify_for_start_blocking(
        &self,
        text: &str,
        now: UnixMillis,
        session: &SessionId,
        user: &UserId,
    ) -> Result<TicketClaims, VerifyError> {
        self.verify_expecting(text, now, Expect::Session(session, user))
    }

    /// [`Self::verify_blocking`] of a ticket presented by `user` (a PAM
    /// login's password): a ticket for another user is refused without
    /// being marked used, so it stays good for its owner. Blocking.
    pub fn verify_for_user_blocking(
        &self,
        text: &str,
        now: UnixMillis,
        user: &UserId,
    ) -> Result<TicketClaims, VerifyError> {
        self.verify_expecting(text, now, Expect::User(user))
    }

    /// [`Self::verify_for_user_blocking`] on a blocking thread.
    pub async fn verify_for_user(
        &self,
        text: String,
        now: UnixMillis,
        user: UserId,
    ) -> Result<TicketClaims, VerifyError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.verify_for_user_blocking(&text, now, &user))
            .await
            .map_err(|e| VerifyError::Storage(format!("verify task failed: {e}")))?
    }

    fn verify_expecting(
        &self,
        text: &str,
        now: UnixMillis,
        expect: Expect<'_>,
    ) -> Result<TicketClaims, VerifyError> {
        let mut inner = self.lock()?;
        let key = inner.key.clone().ok_or(VerifyError::NoKey)?;
        let claims = verify_ticket(text, &key, now, &self.resource)?;
        match expect {
            Expect::Nothing => {}
            Expect::Session(session, user) => {
                if &claims.session != session || &claims.user != user {
                    return Err(VerifyError::Mismatch {
                        ticket_session: claims.session,
                        ticket_user: claims.user,
                        session: session.clone(),
                        user: user.clone(),
                    });
                }
            }
            Expect::User(user) => {
                if &claims.user != user {
                    return Err(VerifyError::OtherUser {
                        ticket_user: claims.user,
                        user: user.clone(),
                    });
                }
            }
        }
        inner.used.retain(|_, exp| !is_dead(*exp, now));
        inner.grants.retain(|_, (_, exp)| !grant_is_dead(*exp, now));
        if inner.used.contains_key(&claims.ticket_id) {
            return Err(VerifyError::Reused {
                ticket_id: claims.ticket_id_hex(),
            });
        }
        if inner.used.len() >= MAX_USED_TICKETS {
            return Err(VerifyError::Full);
        }
        // The session it allows first: a crash between the two writes
        // leaves a start allowed for a ticket never answered valid, which
        // the broker admitted anyway.
        let grants_path = self.dir.join(VERIFIED_SESSIONS_FILE);
        let line = grant_line(&claims.session, &claims.user, claims.expires_at.0);
        append_at(&inner.grant_file, inner.grant_len, line.as_bytes()).map_err(|e| {
            tracing::error!(path = %grants_path.display(), error = %e, "record verified session");
            VerifyError::Storage(format!("{}: {e}", grants_path.display()))
        })?;
        inner.grant_records += 1;
        inner.grant_len += line.len() as u64;
        inner.grants.insert(
            claims.session.clone(),
            (claims.user.clone(), claims.expires_at.0),
        );
        // Remembered in memory even if the write fails: never accepted twice
        // by this process whatever the disk says.
        inner.used.insert(claims.ticket_id, claims.expires_at.0);
        let rec = record(&claims.ticket_id, claims.expires_at.0);
        let path = self.dir.join(USED_TICKETS_FILE);
        let end = (MAGIC.len() + inner.records * RECORD_LEN) as u64;
        append_at(&inner.file, end, &rec).map_err(|e| {
            tracing::error!(path = %path.display(), error = %e, "record used ticket");
            VerifyError::Storage(format!("{}: {e}", path.display()))
        })?;
        inner.records += 1;
        if let Err(e) = compact_if_needed(&self.dir, &mut inner) {
            // The record is durable; compaction is retried on the next use.
            tracing::warn!(error = %e, "compact used tickets");
        }
        tracing::info!(ticket = %hex(&claims.ticket_id), user = %claims.user,
            session = %claims.session, "ticket accepted");
        Ok(claims)
    }

    /// [`Self::verify_blocking`] on a blocking thread.
    pub async fn verify(&self, text: String, now: UnixMillis) -> Result<TicketClaims, VerifyError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.verify_blocking(&text, now))
            .await
            .map_err(|e| VerifyError::Storage(format!("verify task failed: {e}")))?
    }

    /// [`Self::verify_for_start_blocking`] on a blocking thread.
    pub async fn verify_for_start(
        &self,
        text: String,
        now: UnixMillis,
        session: SessionId,
        user: UserId,
    ) -> Result<TicketClaims, VerifyError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.verify_for_start_blocking(&text, now, &session, &user)
        })
        .await
        .map_err(|e| VerifyError::Storage(format!("verify task failed: {e}")))?
    }

    /// Whether a ticket verified on this host allows `session` of `user` to
    /// be reported started at `now` (until the ticket's expiry plus
    /// [`START_GRACE_MS`]). Does not consume it: the spool refuses a second
    /// start of the same session id.
    pub fn start_grant(
        &self,
        session: &SessionId,
        user: &UserId,
        now: UnixMillis,
    ) -> Result<(), GrantError> {
        let inner = self
            .inner
            .lock()
            .map_err(|_| GrantError::Storage("ticket state lock poisoned".into()))?;
        let Some((granted, exp)) = inner.grants.get(session) else {
            return Err(GrantError::Missing {
                session: session.clone(),
            });
        };
        if granted != user {
            return Err(GrantError::OtherUser {
                session: session.clone(),
                granted: granted.clone(),
                user: user.clone(),
            });
        }
        if grant_is_dead(*exp, now) {
            return Err(GrantError::Expired {
                session: session.clone(),
                expired_at: *exp,
            });
        }
        Ok(())
    }

    /// Live entries of the used-ticket set (tests, status).
    pub fn used_count(&self) -> usize {
        self.lock().map(|i| i.used.len()).unwrap_or(0)
    }
}

/// Rewrites the used-ticket file with the live entries only when it holds
/// more than `live + COMPACT_SLACK` dead records.
fn compact_if_needed(dir: &Path, inner: &mut Inner) -> Result<(), TicketStoreError> {
    compact_grants_if_needed(dir, inner)?;
    let live = inner.used.len();
    if inner.records <= live.saturating_mul(2).saturating_add(COMPACT_SLACK) {
        return Ok(());
    }
    let mut bytes = Vec::with_capacity(MAGIC.len() + live * RECORD_LEN);
    bytes.extend_from_slice(MAGIC);
    for (id, exp) in &inner.used {
        bytes.extend_from_slice(&record(id, *exp));
    }
    write_atomic(dir, USED_TICKETS_FILE, &bytes)?;
    let path = dir.join(USED_TICKETS_FILE);
    inner.file = open_records(&path)?;
    inner.records = live;
    Ok(())
}

/// Rewrites the verified-sessions file with the live entries only, under
/// the same rule as the used-ticket file.
fn compact_grants_if_needed(dir: &Path, inner: &mut Inner) -> Result<(), TicketStoreError> {
    let live = inner.grants.len();
    if inner.grant_records <= live.saturating_mul(2).saturating_add(COMPACT_SLACK) {
        return Ok(());
    }
    let mut text = String::new();
    for (session, (user, exp)) in &inner.grants {
        text.push_str(&grant_line(session, user, *exp));
    }
    write_atomic(dir, VERIFIED_SESSIONS_FILE, text.as_bytes())?;
    let path = dir.join(VERIFIED_SESSIONS_FILE);
    inner.grant_file = open_records(&path)?;
    inner.grant_records = live;
    inner.grant_len = text.len() as u64;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::ticket::sign_ticket;
    use ring::signature::{Ed25519KeyPair, KeyPair as _};
    use std::io::Write;

    fn key() -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[3u8; 32]).expect("seed")
    }

    fn rid(s: &str) -> ResourceId {
        s.parse().expect("id")
    }

    fn ticket(k: &Ed25519KeyPair, n: u8, resource: &str, issued: i64) -> String {
        let claims = TicketClaims {
            ticket_id: [n; 16],
            group: "g".parse().expect("id"),
            resource: rid(resource),
            user: "alice".parse().expect("id"),
            session: format!("s-{n}").parse().expect("id"),
            issued_at: UnixMillis(issued),
            expires_at: UnixMillis(issued + 60_000),
        };
        sign_ticket(&claims, k)
    }

    fn open(dir: &Path, now: i64) -> TicketVerifier {
        TicketVerifier::open(dir, rid("h1"), UnixMillis(now)).expect("open")
    }

    #[test]
    fn without_a_key_nothing_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = open(dir.path(), 0);
        let r = v.verify_blocking(&ticket(&key(), 1, "h1", 0), UnixMillis(1));
        assert!(matches!(r, Err(VerifyError::NoKey)), "{r:?}");
        assert!(v.set_key_blocking(&[1, 2, 3]).is_err());
    }

    #[test]
    fn a_ticket_is_accepted_once_also_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key();
        let v = open(dir.path(), 0);
        assert!(v.set_key_blocking(k.public_key().as_ref()).expect("key"));
        assert!(!v
            .set_key_blocking(k.public_key().as_ref())
            .expect("same key"));
        let t = ticket(&k, 1, "h1", 1000);
        let c = v.verify_blocking(&t, UnixMillis(2000)).expect("first use");
        assert_eq!(c.session.as_str(), "s-1");
        let r = v.verify_blocking(&t, UnixMillis(2001));
        assert!(matches!(&r, Err(VerifyError::Reused { .. })), "{r:?}");
        assert_eq!(r.expect_err("reused").code(), "reused");
        drop(v);

        // Restart: the key and the used set come back from disk.
        let v = open(dir.path(), 3000);
        assert_eq!(v.public_key().as_deref(), Some(k.public_key().as_ref()));
        assert_eq!(v.used_count(), 1);
        let r = v.verify_blocking(&t, UnixMillis(3000));
        assert!(matches!(r, Err(VerifyError::Reused { .. })), "{r:?}");
        // Another ticket is fine.
        v.verify_blocking(&ticket(&k, 2, "h1", 1000), UnixMillis(3000))
            .expect("second ticket");
    }

    #[test]
    fn refusals_name_their_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key();
        let v = open(dir.path(), 0);
        v.set_key_blocking(k.public_key().as_ref()).expect("key");
        let code = |r: Result<TicketClaims, VerifyError>| r.expect_err("refused").code();
        // Expired.
        assert_eq!(
            code(v.verify_blocking(&ticket(&k, 1, "h1", 0), UnixMillis(60_000))),
            "expired"
        );
        // Another host.
        assert_eq!(
            code(v.verify_blocking(&ticket(&k, 2, "h2", 0), UnixMillis(1))),
            "other-host"
        );
        // Forged: signed by another key.
        let other = Ed25519KeyPair::from_seed_unchecked(&[4u8; 32]).expect("seed");
        assert_eq!(
            code(v.verify_blocking(&ticket(&other, 3, "h1", 0), UnixMillis(1))),
            "forged"
        );
        // Tampered: one character changed in the claims.
        let t = ticket(&k, 4, "h1", 0);
        let mut b = t.clone().into_bytes();
        b[10] = if b[10] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(b).expect("ascii");
        let c = code(v.verify_blocking(&tampered, UnixMillis(1)));
        assert!(c == "forged" || c == "malformed", "{c}");
        assert_eq!(
            code(v.verify_blocking("garbage", UnixMillis(1))),
            "malformed"
        );
        // None of the refused ones was marked used: the genuine one still works.
        v.verify_blocking(&t, UnixMillis(1)).expect("genuine");
        assert_eq!(v.used_count(), 1);
    }

    #[test]
    fn expired_entries_are_pruned_and_the_file_compacted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key();
        let v = open(dir.path(), 0);
        v.set_key_blocking(k.public_key().as_ref()).expect("key");
        let n = COMPACT_SLACK + 10;
        for i in 0..n {
            let claims = TicketClaims {
                ticket_id: {
                    let mut id = [0u8; 16];
                    id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    id
                },
                group: "g".parse().expect("id"),
                resource: rid("h1"),
                user: "alice".parse().expect("id"),
                session: "s".parse().expect("id"),
                issued_at: UnixMillis(0),
                expires_at: UnixMillis(60_000),
            };
            v.verify_blocking(&sign_ticket(&claims, &k), UnixMillis(1))
                .expect("accept");
        }
        assert_eq!(v.used_count(), n);
        // Long after expiry (and the grace), one more ticket: the old ones go.
        let later = 60_000 + PRUNE_GRACE_MS + 1;
        v.verify_blocking(&ticket(&k, 0xee, "h1", later), UnixMillis(later + 1))
            .expect("accept");
        assert_eq!(v.used_count(), 1);
        let len = std::fs::metadata(dir.path().join(USED_TICKETS_FILE))
            .expect("stat")
            .len();
        assert_eq!(len, (MAGIC.len() + RECORD_LEN) as u64, "compacted");
        drop(v);
        let v = open(dir.path(), later + 2);
        assert_eq!(v.used_count(), 1);
    }

    #[test]
    fn a_torn_record_is_cut_off_and_a_bad_file_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key();
        let v = open(dir.path(), 0);
        v.set_key_blocking(k.public_key().as_ref()).expect("key");
        let t = ticket(&k, 1, "h1", 0);
        v.verify_blocking(&t, UnixMillis(1)).expect("accept");
        drop(v);
        let path = dir.path().join(USED_TICKETS_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&[9u8; 10]).expect("torn write");
        drop(f);
        let v = open(dir.path(), 2);
        assert_eq!(v.used_count(), 1);
        assert!(matches!(
            v.verify_blocking(&t, UnixMillis(2)),
            Err(VerifyError::Reused { .. })
        ));
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            (MAGIC.len() + RECORD_LEN) as u64
        );
        drop(v);
        std::fs::write(&path, b"not ours").expect("write");
        assert!(matches!(
            TicketVerifier::open(dir.path(), rid("h1"), UnixMillis(0)),
            Err(TicketStoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_verified_ticket_allows_its_session_start_also_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key();
        let v = open(dir.path(), 0);
        v.set_key_blocking(k.public_key().as_ref()).expect("key");
        let s1: SessionId = "s-1".parse().expect("id");
        let alice: UserId = "alice".parse().expect("id");
        let bob: UserId = "bob".parse().expect("id");
        assert!(matches!(
            v.start_grant(&s1, &alice, UnixMillis(1)),
            Err(GrantError::Missing { .. })
        ));
        v.verify_blocking(&ticket(&k, 1, "h1", 0), UnixMillis(1))
            .expect("verify");
        v.start_grant(&s1, &alice, UnixMillis(2)).expect("granted");
        assert!(matches!(
            v.start_grant(&s1, &bob, UnixMillis(2)),
            Err(GrantError::OtherUser { .. })
        ));
        drop(v);

        // Restart: the grant comes back from disk, until expiry plus the grace.
        let v = open(dir.path(), 3);
        v.start_grant(&s1, &alice, UnixMillis(3)).expect("granted");
        v.start_grant(&s1, &alice, UnixMillis(60_000 + START_GRACE_MS - 1))
            .expect("within the grace");
        assert!(matches!(
            v.start_grant(&s1, &alice, UnixMillis(60_000 + START_GRACE_MS)),
            Err(GrantError::Expired { .. })
        ));
        drop(v);
        let v = open(dir.path(), 60_000 + START_GRACE_MS);
        assert!(matches!(
            v.start_grant(&s1, &alice, UnixMillis(60_000 + START_GRACE_MS)),
            Err(GrantError::Missing { .. })
        ));
    }

    #[test]
    fn a_ticket_for_another_session_is_refused_and_not_used_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key();
        let v = open(dir.path(), 0);
        v.set_key_blocking(k.public_key().as_ref()).expect("key");
        let t = ticket(&k, 1, "h1", 0);
        let alice: UserId = "alice".parse().expect("id");
        let r = v.verify_for_start_blocking(&t, UnixMillis(1), &"s-9".parse().expect("id"), &alice);
        assert!(matches!(r, Err(VerifyError::Mismatch { .. })), "{r:?}");
        assert_eq!(v.used_count(), 0);
        v.verify_for_start_blocking(&t, UnixMillis(1), &"s-1".parse().expect("id"), &alice)
            .expect("its own session");
        assert_eq!(v.used_count(), 1);
    }

    #[test]
    fn a_ticket_presented_by_another_user_is_refused_and_not_used_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key();
        let v = open(dir.path(), 0);
        v.set_key_blocking(k.public_key().as_ref()).expect("key");
        let t = ticket(&k, 1, "h1", 0);
        let r = v.verify_for_user_blocking(&t, UnixMillis(1), &"mallory".parse().expect("id"));
        assert!(matches!(r, Err(VerifyError::OtherUser { .. })), "{r:?}");
        assert_eq!(r.map(|_| ()).unwrap_err().code(), "other-user");
        assert_eq!(v.used_count(), 0);
        let claims = v
            .verify_for_user_blocking(&t, UnixMillis(1), &"alice".parse().expect("id"))
            .expect("its own user");
        assert_eq!(claims.session.as_str(), "s-1");
        assert_eq!(v.used_count(), 1);
        let again = v.verify_for_user_blocking(&t, UnixMillis(2), &"alice".parse().expect("id"));
        assert!(
            matches!(again, Err(VerifyError::Reused { .. })),
            "{again:?}"
        );
    }

    #[test]
    fn torn_or_unreadable_verified_sessions_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key();
        let v = open(dir.path(), 0);
        v.set_key_blocking(k.public_key().as_ref()).expect("key");
        v.verify_blocking(&ticket(&k, 1, "h1", 0), UnixMillis(1))
            .expect("verify");
        drop(v);
        let path = dir.path().join(VERIFIED_SESSIONS_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"garbage line\n5 s-2 al").expect("torn write");
        drop(f);
        let v = open(dir.path(), 2);
        let alice: UserId = "alice".parse().expect("id");
        v.start_grant(&"s-1".parse().expect("id"), &alice, UnixMillis(2))
            .expect("kept");
        assert!(v
            .start_grant(&"s-2".parse().expect("id"), &alice, UnixMillis(2))
            .is_err());
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "60000 s-1 alice\n"
        );
    }

    /// Bytes left at the end of a file by an append that failed (disk
    /// full) in a process that goes on: the next append must not land
    /// after them.
    fn leave_a_torn_append(path: &Path, bytes: &[u8]) {
        let mut f = OpenOptions::new().append(true).open(path).expect("open");
        f.write_all(bytes).expect("torn write");
    }

    #[test]
    fn an_append_after_a_torn_one_is_read_back_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key();
        let v = open(dir.path(), 0);
        v.set_key_blocking(k.public_key().as_ref()).expect("key");
        let t1 = ticket(&k, 1, "h1", 0);
        let t2 = ticket(&k, 2, "h1", 0);
        v.verify_blocking(&t1, UnixMillis(1)).expect("accept");
        leave_a_torn_append(&dir.path().join(USED_TICKETS_FILE), &[7u8; 10]);
        // An expiry torn before its line's end: glued to the next line it
        // would make another expiry of that line.
        leave_a_torn_append(&dir.path().join(VERIFIED_SESSIONS_FILE), b"5000");
        v.verify_blocking(&t2, UnixMillis(1))
            .expect("accept after a torn append");
        drop(v);

        // After a restart both tickets are still used, and both grants are
        // read back as written.
        let v = open(dir.path(), 2);
        assert_eq!(v.used_count(), 2);
        for t in [&t1, &t2] {
            let r = v.verify_blocking(t, UnixMillis(2));
            assert!(matches!(r, Err(VerifyError::Reused { .. })), "{r:?}");
        }
        assert_eq!(
            std::fs::metadata(dir.path().join(USED_TICKETS_FILE))
                .expect("stat")
                .len(),
            (MAGIC.len() + 2 * RECORD_LEN) as u64
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join(VERIFIED_SESSIONS_FILE)).expect("read"),
            "60000 s-1 alice\n60000 s-2 alice\n"
        );
    }

    #[test]
    fn a_torn_record_cut_back_on_open_is_followed_by_readable_appends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key();
        let v = open(dir.path(), 0);
        v.set_key_blocking(k.public_key().as_ref()).expect("key");
        let t1 = ticket(&k, 1, "h1", 0);
        v.verify_blocking(&t1, UnixMillis(1)).expect("accept");
        drop(v);
        // A crash mid-append.
        leave_a_torn_append(&dir.path().join(USED_TICKETS_FILE), &[7u8; 23]);
        let v = open(dir.path(), 2);
        let t2 = ticket(&k, 2, "h1", 0);
        v.verify_blocking(&t2, UnixMillis(2)).expect("accept");
        drop(v);
        let v = open(dir.path(), 3);
        assert_eq!(v.used_count(), 2);
        let r = v.verify_blocking(&t2, UnixMillis(3));
        assert!(matches!(r, Err(VerifyError::Reused { .. })), "{r:?}");
    }

    #[test]
    fn the_state_files_are_private_and_planted_symlinks_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").expect("victim");
        // The fixed names temporaries had.
        for name in [TICKET_KEY_FILE, USED_TICKETS_FILE, VERIFIED_SESSIONS_FILE] {
            std::os::unix::fs::symlink(&victim, dir.path().join(format!("{name}.tmp")))
                .expect("plant");
        }
        let k = key();
        let v = open(dir.path(), 0);
        v.set_key_blocking(k.public_key().as_ref()).expect("key");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"untouched");
        for name in [TICKET_KEY_FILE, USED_TICKETS_FILE, VERIFIED_SESSIONS_FILE] {
            let meta = std::fs::symlink_metadata(dir.path().join(name)).expect("stat");
            assert!(meta.is_file(), "{name}");
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
        }
    }
}
