//! The broker's durable store: SQLite (bundled), WAL, `synchronous=FULL`.
//!
//! One writer thread owns the write connection and is fed by a bounded
//! channel. It does group commit: it takes every queued write (up to
//! [`StoreOptions::max_batch`]), applies them in one transaction, commits, and
//! only then answers each write. A caller told "recorded" therefore holds a
//! committed, fsync'd fact; a crash before the commit loses only writes nobody
//! was told about, and the agent replays those.
//!
//! Recording a session event and advancing its spool's `last_seq` happen in
//! the same transaction, and the writer decides duplicate / next / gap against
//! the committed `last_seq` itself, so no interleaving of connections can
//! record an event twice or skip one.
//!
//! Reads (admin listings, counters) use a second, read-only connection behind
//! a `std::sync::Mutex`, run on tokio's blocking pool. In WAL mode readers do
//! not block the writer and see only committed data, which is exactly what an
//! operator should see. The mutex is only ever held inside `spawn_blocking`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ferry_common::wire::{EndReason, HostFacts, SequencedEvent, SessionEvent};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis, UserId};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

mod migrations;
use migrations::migrate;

/// Writes waiting for the writer thread. Callers wait (backpressure) when it
/// is full; at the default batch size this is several commits' worth.
pub const WRITE_QUEUE_LEN: usize = 4096;

/// Default most writes per transaction: enough to amortise one fsync over a
/// burst from many agents, small enough that one commit stays short.
pub const DEFAULT_MAX_BATCH: usize = 256;

/// Page size of a newly created store (see [`Store::open`]).
pub const STORE_PAGE_SIZE: i64 = 1024;

/// WAL pages after which a commit checkpoints (see [`Store::open`]).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 40_000;

/// End reason written when a reconnecting host no longer has a session the
/// broker thought open.
pub const RECONCILE_REASON: &str = "not on host at reconnect";

/// `reason` of a `started` row of `session_events` whose session was
/// refused: the host reused the id of a session that had ended there.
pub const REUSED_ID_REASON: &str = "refused: the session id already ended on this host";

/// `sessions.reconciled` of an end the broker inferred when the host
/// reconnected without the session: the host's own end replaces it.
const END_INFERRED: i64 = 1;
/// `sessions.reconciled` of an end the broker decided (a retention that ran
/// out, a host gone for good): metering stopped there, so only an earlier
/// end reported by the host replaces it.
const END_BY_BROKER: i64 = 2;
/// `sessions.reconciled` of an end inferred at a reconnect ([`END_INFERRED`])
/// after which the host reused the id (refused): a later end of that id is
/// the refused session's and leaves this record alone.
const END_INFERRED_THEN_REUSED: i64 = 3;

/// Ends the open session `session` on `resource` at `at` because the broker
/// decided so (see [`END_BY_BROKER`]); inside a caller's transaction.
/// Returns whether a session was open.
pub fn end_session_by_broker(
    c: &Connection,
    resource: &ResourceId,
    session: &SessionId,
    at: UnixMillis,
    reason: &str,
) -> rusqlite::Result<bool> {
    let n = c
        .prepare_cached(
            "UPDATE sessions SET ended_at = MAX(started_at, ?1), end_reason = ?2, reconciled = ?3
             WHERE resource = ?4 AND session = ?5 AND ended_at IS NULL",
        )?
        .execute(params![
            at.0,
            reason,
            END_BY_BROKER,
            resource.as_str(),
            session.as_str()
        ])?;
    Ok(n > 0)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("open store {path}: {message}")]
    Open { path: String, message: String },
    #[error("store schema version {found} is newer than this broker knows ({known}); upgrade the broker")]
    NewerSchema { found: i64, known: i64 },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("store is closed")]
    Closed,
}

/// Tuning of the writer.
#[derive(Clone, Copy, Debug)]
pub struct StoreOptions {
    /// Most writes in one transaction; 1 means one commit (one fsync) per write.
    pub max_batch: usize,
    /// Capacity of the writer's inbox.
    pub queue_len: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_batch: DEFAULT_MAX_BATCH,
            queue_len: WRITE_QUEUE_LEN,
        }
    }
}

/// An agent's registration, as recorded from its `Hello`.
#[derive(Clone, Debug)]
pub struct Registration {
    pub resource: ResourceId,
    pub group: Option<GroupName>,
    pub agent_version: String,
    pub image_version: String,
    pub host: HostFacts,
    /// The agent's spool, whose last recorded seq is returned.
    pub spool_id: u64,
    /// Sessions open on the host; open sessions recorded for the resource and
    /// missing here are ended with [`RECONCILE_REASON`].
    pub open_sessions: Vec<SessionId>,
    /// Broker clock.
    pub now: UnixMillis,
}

/// What recording a registration did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    /// Highest seq recorded for (resource, spool); 0 for a new spool.
    pub last_recorded_seq: u64,
    /// Sessions ended by reconciliation.
    pub ended: Vec<SessionId>,
    /// Sessions recorded open on the resource afterwards: what its group
    /// counts. A session the host still has but the broker ended (its
    /// retention ran out, its host was gone) is not among them.
    pub open: Vec<SessionId>,
}

/// A sequence number that skips ahead of what is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SequenceGap {
    pub got: u64,
    pub expected: u64,
}

/// What recording a run of events of one spool did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordOutcome {
    /// Highest seq recorded for the spool after this write: everything up to
    /// it is durable and may be acknowledged.
    pub last_seq: u64,
    /// Events newly recorded.
    pub recorded: usize,
    /// Events already recorded before (not recorded again).
    pub duplicates: usize,
    /// Set when an event skipped ahead; it and the events after it were not recorded.
    pub gap: Option<SequenceGap>,
    /// Seqs of `Started` events recorded in the event log but refused as
    /// sessions: the host reused the id of a session that already ended
    /// there. The ended session's record is kept as it was; the events are
    /// acknowledged like any other (the agent must not be stuck on them).
    pub refused: Vec<u64>,
}

/// A resource as recorded (its live state is the registry's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResource {
    pub resource: ResourceId,
    pub group: Option<GroupName>,
    pub agent_version: String,
    pub image_version: String,
    pub host: HostFacts,
    /// Broker clock of the last registration.
    pub last_seen: UnixMillis,
    /// Sessions recorded open on it.
    pub open_sessions: u64,
}

/// A session as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSession {
    pub session: SessionId,
    pub resource: ResourceId,
    pub user: UserId,
    pub started_at: UnixMillis,
    pub ended_at: Option<UnixMillis>,
    pub end_reason: Option<String>,
}

/// Broker-wide counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreCounts {
    pub resources: u64,
    pub open_sessions: u64,
    pub events_recorded: u64,
}

enum WriteOp {
    Register {
        reg: Registration,
        reply: oneshot::Sender<Result<Registered, StoreError>>,
    },
    Record {
        resource: ResourceId,
        spool_id: u64,
        events: Vec<SequencedEvent>,
        recorded_at: UnixMillis,
        reply: oneshot::Sender<Result<RecordOutcome, StoreError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
    /// Any other write, run inside the group-commit transaction (in its own
    /// savepoint); its answer is handed over only after the commit.
    Exec(Box<dyn ExecWrite>),
}

/// A write of [`Store::exec`]: it carries its own typed reply channel, so the
/// writer runs writes of any answer type without knowing (or casting) it.
trait ExecWrite: Send {
    /// Applies the write in a savepoint of the open transaction; returns its
    /// answer, delivered once the transaction's fate is known.
    fn apply(self: Box<Self>, c: &Connection) -> Box<dyn Deliver>;
    /// Answers without applying (the transaction could not take it).
    fn fail(self: Box<Self>, why: StoreError);
}

/// An applied write's answer, waiting for the commit.
trait Deliver: Send {
    /// Hands the answer over; if the commit failed, even a write that applied
    /// cleanly is reported failed (nothing of it is on disk).
    fn deliver(self: Box<Self>, commit: &Result<(), String>);
}

/// One [`Store::exec`] write and its caller's reply channel.
struct Exec<T, F> {
    f: F,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> ExecWrite for Exec<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send,
{
    fn apply(self: Box<Self>, c: &Connection) -> Box<dyn Deliver> {
        let Exec { f, reply } = *self;
        Box::new(Done {
            reply,
            result: in_savepoint(c, f),
        })
    }

    fn fail(self: Box<Self>, why: StoreError) {
        let _ = self.reply.send(Err(why));
    }
}

/// An applied [`Exec`]'s result.
struct Done<T> {
    reply: oneshot::Sender<Result<T, StoreError>>,
    result: Result<T, StoreError>,
}

impl<T: Send> Deliver for Done<T> {
    fn deliver(self: Box<Self>, commit: &Result<(), String>) {
        let answer = match commit {
            Ok(()) => self.result,
            Err(e) => Err(StoreError::Commit(e.clone())),
        };
        let _ = self.reply.send(answer);
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    writes: mpsc::Sender<WriteOp>,
    reader: Mutex<Connection>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The sender is dropped right after this, so the writer finishes its
        // current batch and exits; joining keeps "dropped" meaning "flushed".
        let (tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.writes, tx));
        if let Ok(mut slot) = self.writer.lock() {
            if let Some(handle) = slot.take() {
                let _ = handle.join();
            }
        }
    }
}

fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} does not fit")))
}

fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} is negative")))
}

/// Spool ids are random u64s; SQLite integers are i64. Store the same bits.
fn spool_key(spool_id: u64) -> i64 {
    i64::from_ne_bytes(spool_id.to_ne_bytes())
}

fn parse_id<T: std::str::FromStr>(s: String, what: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>()
        .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// How an end reason is written in the store and shown to operators.
pub fn end_reason_text(reason: &EndReason) -> String {
    end_reason_str(reason).to_owned()
}

/// [`end_reason_text`] without the copy (the writer's hot path).
fn end_reason_str(reason: &EndReason) -> &str {
    match reason {
        EndReason::Logout => "logout",
        EndReason::Disconnected => "disconnected",
        EndReason::HostShutdown => "host shutdown",
        EndReason::Other(s) => s,
        EndReason::MaxSessionDuration => "max session duration",
        EndReason::Idle => "idle",
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`, applies pending
    /// migrations and starts the writer thread.
    pub fn open(path: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let open_err = |e: rusqlite::Error| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let mut writer = Connection::open(path).map_err(open_err)?;
        // A new store gets 1 KiB pages (SQLite's default is 4 KiB; an
        // existing store keeps its size, this is ignored there). A record
        // changes a few rows keyed by resource, so every record of a batch
        // dirties its own leaf page of each such index, and a commit writes
        // (and checksums) each dirty page whole to the WAL: smaller pages
        // make that about a quarter of the bytes per record. Set before WAL
        // mode, which fixes the page size of an empty database.
        writer.pragma_update(None, "page_size", STORE_PAGE_SIZE)?;
        // journal_mode returns a row, so it is set with a query.
        let mode: String = writer
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Open {
                path: path.display().to_string(),
                message: format!("cannot enable WAL (journal_mode is {mode})"),
            });
        }
        // FULL: a commit is on disk when it returns; we acknowledge only that.
        writer.pragma_update(None, "synchronous", "FULL")?;
        // 16 MiB of page cache (the default is 2 MiB): the indexes a record
        // touches (events by spool and seq, sessions by resource) stay in
        // memory instead of being read back between batches. It is memory,
        // not durability: commits still go to disk.
        writer.pragma_update(None, "cache_size", -16_384)?;
        // The sub-journal of the writer's savepoints (the pages a write
        // changed, kept to undo it) stays in memory instead of spilling to a
        // temporary file; it is never part of what a commit makes durable.
        writer.pragma_update(None, "temp_store", "MEMORY")?;
        // Checkpoint (copy the WAL back into the database file, two more
        // fsyncs) after 40,000 WAL pages instead of 1,000: a page rewritten
        // by many commits in between is copied once, so a checkpoint costs
        // much less per record. The WAL is durable either way; it only
        // grows larger (about 40 MiB with 1 KiB pages) and is cut back to
        // `journal_size_limit` after a checkpoint resets it.
        writer.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
        let _: i64 = writer.query_row("PRAGMA journal_size_limit = 67108864", [], |r| r.get(0))?;
        writer.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut writer)?;

        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;

        let (tx, rx) = mpsc::channel(options.queue_len.max(1));
        let max_batch = options.max_batch.max(1);
        let handle = std::thread::Builder::new()
            .name("ferry-store-writer".into())
            .spawn(move || writer_loop(writer, rx, max_batch))
            .map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                message: format!("spawn writer thread: {e}"),
            })?;
        Ok(Store {
            inner: Arc::new(Inner {
                writes: tx,
                reader: Mutex::new(reader),
                writer: Mutex::new(Some(handle)),
            }),
        })
    }

    async fn submit<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteOp,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .writes
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Records an agent registration and reconciles its open sessions; returns
    /// after the commit.
    pub async fn register(&self, reg: Registration) -> Result<Registered, StoreError> {
        self.submit(|reply| WriteOp::Register { reg, reply }).await
    }

    /// Records a run of session events of one spool, in order; returns after
    /// the commit. Duplicates are skipped; recording stops at a gap.
    pub async fn record_events(
        &self,
        resource: &ResourceId,
        spool_id: u64,
        events: Vec<SequencedEvent>,
        recorded_at: UnixMillis,
    ) -> Result<RecordOutcome, StoreError> {
        let resource = resource.clone();
        self.submit(|reply| WriteOp::Record {
            resource,
            spool_id,
            events,
            recorded_at,
            reply,
        })
        .await
    }

    /// Runs `f` on the writer's transaction, in a savepoint, and returns its
    /// value after the commit: a caller told "done" holds a committed fact.
    /// If `f` fails, nothing it wrote stays and the rest of the batch goes on.
    /// `f` runs on the writer thread: it must not block on anything but SQLite.
    pub async fn exec<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.submit(|reply| WriteOp::Exec(Box::new(Exec { f, reply })))
            .await
    }

    /// Runs a read on the read-only connection (committed data only), on the
    /// blocking pool.
    pub async fn read_with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.read(f).await
    }

    /// Commits what is queued, checkpoints the WAL and stops the writer.
    /// Later writes fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        let (reply, rx) = oneshot::channel();
        if self
            .inner
            .writes
            .send(WriteOp::Close { reply })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        let handle = self.inner.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = inner
                .reader
                .lock()
                .map_err(|_| StoreError::Corrupt("reader lock poisoned".into()))?;
            f(&conn)
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("read task failed: {e}")))?
    }

    /// Broker-wide counts.
    pub async fn counts(&self) -> Result<StoreCounts, StoreError> {
        self.read(|c| {
            let n = |sql: &str| -> Result<u64, StoreError> {
                to_u64(c.query_row(sql, [], |r| r.get(0))?, "count")
            };
            Ok(StoreCounts {
                resources: n("SELECT COUNT(*) FROM resources")?,
                open_sessions: n("SELECT COUNT(*) FROM sessions WHERE ended_at IS NULL")?,
                events_recorded: n("SELECT COUNT(*) FROM session_events")?,
            })
        })
        .await
    }

    /// Records what a registered resource runs, from its agent's latest
    /// `Inventory` (an image switch or update it confirmed), so a host that
    /// goes away afterwards is shown with it, not with its last `Hello`'s.
    pub async fn record_versions(
        &self,
        resource: &ResourceId,
        agent_version: String,
        image_version: String,
    ) -> Result<(), StoreError> {
        let resource = resource.to_string();
        self.exec(move |c| {
            c.execute(
                "UPDATE resources SET agent_version = ?2, image_version = ?3 WHERE resource = ?1",
                params![resource, agent_version, image_version],
            )?;
            Ok(())
        })
        .await
    }

    /// Every registered resource, by id.
    pub async fn resources(&self) -> Result<Vec<StoredResource>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT r.resource, r.grp, r.agent_version, r.image_version, r.hostname, r.os,
                        r.kernel, r.vcpus, r.memory_bytes, r.last_seen,
                        (SELECT COUNT(*) FROM sessions s
                          WHERE s.resource = r.resource AND s.ended_at IS NULL)
                 FROM resources r ORDER BY r.resource",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, i64>(8)?,
                    r.get::<_, i64>(9)?,
                    r.get::<_, i64>(10)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (res, grp, av, iv, hostname, os, kernel, vcpus, mem, seen, open) = row?;
                out.push(StoredResource {
                    resource: parse_id(res, "resource")?,
                    group: grp.map(|g| parse_id(g, "group")).transpose()?,
                    agent_version: av,
                    image_version: iv,
                    host: HostFacts {
                        hostname,
                        os,
                        kernel,
                        vcpus: u32::try_from(vcpus)
                            .map_err(|_| StoreError::Corrupt("vcpus".into()))?,
                        memory_bytes: to_u64(mem, "memory_bytes")?,
                    },
                    last_seen: UnixMillis(seen),
                    open_sessions: to_u64(open, "count")?,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Sessions by start time; only open ones unless `all`.
    pub async fn sessions(&self, all: bool) -> Result<Vec<StoredSession>, StoreError> {
        self.read(move |c| {
            let sql = if all {
                "SELECT session, resource, user, started_at, ended_at, end_reason
                 FROM sessions ORDER BY started_at, id"
            } else {
                "SELECT session, resource, user, started_at, ended_at, end_reason
                 FROM sessions WHERE ended_at IS NULL ORDER BY started_at, id"
            };
            let mut stmt = c.prepare(sql)?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (session, resource, user, started, ended, reason) = row?;
                out.push(StoredSession {
                    session: parse_id(session, "session")?,
                    resource: parse_id(resource, "resource")?,
                    user: parse_id(user, "user")?,
                    started_at: UnixMillis(started),
                    ended_at: ended.map(UnixMillis),
                    end_reason: reason,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Records when the broker last heard from `resource` (its link ended):
    /// what `resources list` shows and how long a gone host is counted from.
    pub async fn record_last_seen(
        &self,
        resource: &ResourceId,
        at: UnixMillis,
    ) -> Result<(), StoreError> {
        let resource = resource.to_string();
        self.exec(move |c| {
            c.prepare_cached(
                "UPDATE resources SET last_seen = MAX(last_seen, ?2) WHERE resource = ?1",
            )?
            .execute(params![resource, at.0])?;
            Ok(())
        })
        .await
    }

    /// Sessions recorded open on `resource`, in id order.
    pub async fn open_sessions_of(
        &self,
        resource: &ResourceId,
    ) -> Result<Vec<SessionId>, StoreError> {
        let resource = resource.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT session FROM sessions WHERE resource = ?1 AND ended_at IS NULL
                 ORDER BY session",
            )?;
            let rows = stmt.query_map([resource], |r| r.get::<_, String>(0))?;
            rows.map(|r| parse_id(r?, "session")).collect()
        })
        .await
    }

    /// Resources on which `session` is recorded open (normally zero or one).
    pub async fn open_session_hosts(
        &self,
        session: &SessionId,
    ) -> Result<Vec<ResourceId>, StoreError> {
        let session = session.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare(
                "SELECT resource FROM sessions INDEXED BY sessions_open
                 WHERE session = ?1 AND ended_at IS NULL ORDER BY resource",
            )?;
            let rows = stmt.query_map([session], |r| r.get::<_, String>(0))?;
            rows.map(|r| parse_id(r?, "resource")).collect()
        })
        .await
    }

    /// Highest seq recorded for (resource, spool); 0 when none.
    pub async fn last_recorded_seq(
        &self,
        resource: &ResourceId,
        spool_id: u64,
    ) -> Result<u64, StoreError> {
        let resource = resource.to_string();
        self.read(move |c| {
            let v: Option<i64> = c
                .query_row(
                    "SELECT last_seq FROM spools WHERE resource = ?1 AND spool_id = ?2",
                    params![resource, spool_key(spool_id)],
                    |r| r.get(0),
                )
                .optional()?;
            to_u64(v.unwrap_or(0), "last_seq")
        })
        .await
    }

    /// Number of recorded events of (resource, spool) with this seq (0 or 1).
    pub async fn event_count(
        &self,
        resource: &ResourceId,
        spool_id: u64,
        seq: u64,
    ) -> Result<u64, StoreError> {
        let resource = resource.to_string();
        let seq = to_i64(seq, "seq")?;
        self.read(move |c| {
            let n: i64 = c.query_row(
                "SELECT COUNT(*) FROM session_events
                 WHERE resource = ?1 AND spool_id = ?2 AND seq = ?3",
                params![resource, spool_key(spool_id), seq],
                |r| r.get(0),
            )?;
            to_u64(n, "count")
        })
        .await
    }
}

/// A write applied inside the open transaction, waiting for the commit to be answered.
enum Applied {
    Register(
        oneshot::Sender<Result<Registered, StoreError>>,
        Result<Registered, StoreError>,
    ),
    Record(
        oneshot::Sender<Result<RecordOutcome, StoreError>>,
        Result<RecordOutcome, StoreError>,
    ),
    Exec(Box<dyn Deliver>),
}

impl Applied {
    /// Answers the waiter; if the commit failed, even writes that applied
    /// cleanly are reported as failed (nothing of them is on disk).
    fn answer(self, commit: &Result<(), String>) {
        match (self, commit) {
            (Applied::Register(tx, r), Ok(())) => drop(tx.send(r)),
            (Applied::Register(tx, _), Err(e)) => drop(tx.send(Err(StoreError::Commit(e.clone())))),
            (Applied::Record(tx, r), Ok(())) => drop(tx.send(r)),
            (Applied::Record(tx, _), Err(e)) => drop(tx.send(Err(StoreError::Commit(e.clone())))),
            (Applied::Exec(done), commit) => done.deliver(commit),
        }
    }
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<WriteOp>, max_batch: usize) {
    // Statements of the hot path (recording events) are prepared once and
    // reused from this cache; room for all of them and the other writes'.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if let Some(close) = commit_batch(&mut conn, &mut batch) {
            // Make the database file complete on its own (no WAL to replay).
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "checkpoint store at close");
            }
            let _ = close.send(());
            return;
        }
    }
}

/// Capacity of the writer connection's prepared-statement cache.
const STATEMENT_CACHE: usize = 64;

/// `last_seq` of the spools a batch touched, as its transaction has them
/// (committed value or written earlier in the batch): a spool recording
/// several times in one batch reads its row once. Updated only after a
/// write's savepoint was released, so a rolled-back write leaves it right.
type SpoolCache = HashMap<(ResourceId, i64), u64>;

/// Applies a batch in one transaction and answers every write after the
/// commit; leaves `batch` empty. Returns the `Close` waiter if the batch asked
/// to close (writes after it in the batch are answered `Closed`).
fn commit_batch(conn: &mut Connection, batch: &mut Vec<WriteOp>) -> Option<oneshot::Sender<()>> {
    let mut applied = Vec::with_capacity(batch.len());
    let mut close = None;
    // Deferred (the default) like rusqlite's `transaction()`; a cached
    // statement, so a batch does not parse its BEGIN and COMMIT again.
    if let Err(e) = run_cached(conn, "BEGIN") {
        let msg = e.to_string();
        tracing::error!(error = %msg, "begin store transaction");
        for op in batch.drain(..) {
            fail(op, &msg);
        }
        return None;
    }
    let mut spools = SpoolCache::new();
    let mut run = RecordRun::default();
    for op in batch.drain(..) {
        if close.is_some() {
            // Dropping the reply makes the caller see `Closed`.
            continue;
        }
        if !matches!(op, WriteOp::Record { .. }) {
            run.finish(conn, &mut spools, &mut applied);
        }
        if conn.is_autocommit() && !matches!(op, WriteOp::Close { .. }) {
            // SQLite rolled the whole transaction back (an I/O error, a full
            // disk): the writes before are lost and those after must not
            // commit one by one. All of them are answered failed.
            let msg = "the store transaction was rolled back";
            tracing::error!("{msg}");
            fail(op, msg);
            continue;
        }
        match op {
            WriteOp::Close { reply } => close = Some(reply),
            WriteOp::Register { reg, reply } => {
                let r = in_savepoint(conn, |t| apply_register(t, &reg));
                applied.push(Applied::Register(reply, r));
            }
            WriteOp::Record {
                resource,
                spool_id,
                events,
                recorded_at,
                reply,
            } => run.apply(
                conn,
                &mut spools,
                &mut applied,
                PendingRecord {
                    key: (resource, spool_key(spool_id)),
                    spool_id,
                    events,
                    recorded_at,
                    reply,
                },
            ),
            WriteOp::Exec(write) => {
                let done = write.apply(conn);
                // An exec may write any table, spools included.
                spools.clear();
                applied.push(Applied::Exec(done));
            }
        }
    }
    run.finish(conn, &mut spools, &mut applied);
    let commit = run_cached(conn, "COMMIT").map_err(|e| e.to_string());

    if commit.is_err() && !conn.is_autocommit() {
        // A failed COMMIT may leave the transaction open: end it, so the
        // next batch starts clean (nothing of this one is kept).
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "roll back a failed store commit");
        }
    }
    if let Err(e) = &commit {
        tracing::error!(error = %e, "commit store transaction");
    }
    for a in applied {
        a.answer(&commit);
    }
    close
}

/// A record waiting in a [`RecordRun`] (or applied alone).
struct PendingRecord {
    key: (ResourceId, i64),
    spool_id: u64,
    events: Vec<SequencedEvent>,
    recorded_at: UnixMillis,
    reply: oneshot::Sender<Result<RecordOutcome, StoreError>>,
}

/// Consecutive records of a batch applied in ONE savepoint rather than one
/// each: a savepoint per record made SQLite copy every page a record touched
/// into its sub-journal again for each record (and run two more statements).
/// All or nothing like a record's own savepoint: if any record of the run
/// fails, the whole run is rolled back and its records are applied again one
/// by one, each in its own savepoint, which gives exactly the answers and
/// rows of one-by-one recording (records own their data, so replaying them
/// is exact; other writes are never in a run).
#[derive(Default)]
struct RecordRun {
    /// The savepoint `ferry_run` is open.
    open: bool,
    /// Records applied in the open savepoint, with their outcomes.
    done: Vec<(PendingRecord, RecordOutcome)>,
    /// `last_seq` of the spools the run wrote, as the open savepoint has them.
    spools: SpoolCache,
}

impl RecordRun {
    fn apply(
        &mut self,
        conn: &Connection,
        spools: &mut SpoolCache,
        applied: &mut Vec<Applied>,
        rec: PendingRecord,
    ) {
        if !self.open {
            if conn.is_autocommit() {
                return apply_alone(conn, spools, applied, rec);
            }
            if let Err(e) = run_cached(conn, "SAVEPOINT ferry_run") {
                tracing::warn!(error = %e, "open a savepoint for a run of records");
                return apply_alone(conn, spools, applied, rec);
            }
            self.open = true;
        }
        let known = self
            .spools
            .get(&rec.key)
            .or_else(|| spools.get(&rec.key))
            .copied();
        match apply_record(
            conn,
            &rec.key.0,
            rec.spool_id,
            known,
            &rec.events,
            rec.recorded_at,
        ) {
            Ok(out) => {
                self.spools.insert(rec.key.clone(), out.last_seq);
                self.done.push((rec, out));
            }
            Err(_) => {
                // Undo the run (RELEASE after ROLLBACK TO keeps nothing of
                // it), then apply its records and this one alone.
                self.open = false;
                self.spools.clear();
                let undo = run_cached(conn, "ROLLBACK TO ferry_run")
                    .and_then(|()| run_cached(conn, "RELEASE ferry_run"));
                if let Err(u) = undo {
                    // The run's writes may be half there: end the whole
                    // transaction so nothing of this batch commits (its
                    // COMMIT then fails and every write is answered failed).
                    tracing::error!(error = %u, "roll back a failed run of records");
                    if !conn.is_autocommit() {
                        if let Err(e) = conn.execute_batch("ROLLBACK") {
                            tracing::error!(error = %e, "roll back the store transaction");
                        }
                    }
                }
                for (r, _) in std::mem::take(&mut self.done) {
                    apply_alone(conn, spools, applied, r);
                }
                apply_alone(conn, spools, applied, rec);
            }
        }
    }

    /// Ends the run: its records stay in the transaction and are answered
    /// with the batch.
    fn finish(&mut self, conn: &Connection, spools: &mut SpoolCache, applied: &mut Vec<Applied>) {
        if !self.open {
            return;
        }
        self.open = false;
        let release = run_cached(conn, "RELEASE ferry_run");
        let done = std::mem::take(&mut self.done);
        match release {
            Ok(()) => {
                spools.extend(self.spools.drain());
                for (r, out) in done {
                    applied.push(Applied::Record(r.reply, Ok(out)));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "release a run of records");
                self.spools.clear();
                let msg = e.to_string();
                for (r, _) in done {
                    applied.push(Applied::Record(
                        r.reply,
                        Err(StoreError::Commit(msg.clone())),
                    ));
                }
            }
        }
    }
}

/// Applies one record in its own savepoint.
fn apply_alone(
    conn: &Connection,
    spools: &mut SpoolCache,
    applied: &mut Vec<Applied>,
    rec: PendingRecord,
) {
    if conn.is_autocommit() {
        // The transaction is gone (see `commit_batch`): a savepoint now
        // would start a transaction of its own.
        let err = StoreError::Commit("the store transaction was rolled back".into());
        applied.push(Applied::Record(rec.reply, Err(err)));
        return;
    }
    let cached = spools.get(&rec.key).copied();
    let r = in_savepoint(conn, |t| {
        apply_record(
            t,
            &rec.key.0,
            rec.spool_id,
            cached,
            &rec.events,
            rec.recorded_at,
        )
    });
    if let Ok(out) = &r {
        spools.insert(rec.key, out.last_seq);
    }
    applied.push(Applied::Record(rec.reply, r));
}

fn fail(op: WriteOp, msg: &str) {
    match op {
        WriteOp::Register { reply, .. } => drop(reply.send(Err(StoreError::Commit(msg.into())))),
        WriteOp::Record { reply, .. } => drop(reply.send(Err(StoreError::Commit(msg.into())))),
        WriteOp::Close { reply } => drop(reply.send(())),
        WriteOp::Exec(write) => write.fail(StoreError::Commit(msg.into())),
    }
}

/// Runs a parameterless statement through the connection's statement cache.
fn run_cached(c: &Connection, sql: &str) -> Result<(), rusqlite::Error> {
    c.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Runs one write in a savepoint so a failing write leaves no partial trace
/// and does not spoil the other writes of its batch. Savepoints nest by
/// name, so one name serves every write; the statements are cached.
fn in_savepoint<T>(
    c: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    run_cached(c, "SAVEPOINT ferry_write")?;
    match f(c) {
        Ok(v) => {
            run_cached(c, "RELEASE ferry_write")?;
            Ok(v)
        }
        Err(e) => {
            // Undo the write, then drop the savepoint (RELEASE after ROLLBACK
            // TO keeps nothing of it); the batch goes on.
            let undo = run_cached(c, "ROLLBACK TO ferry_write")
                .and_then(|()| run_cached(c, "RELEASE ferry_write"));
            if let Err(u) = undo {
                tracing::error!(error = %u, "roll back a failed store write");
                return Err(StoreError::Commit(format!(
                    "{e}; then rollback failed: {u}"
                )));
            }
            Err(e)
        }
    }
}

fn read_last_seq(c: &Connection, resource: &str, spool: i64) -> Result<u64, StoreError> {
    let v: Option<i64> = c
        .prepare_cached("SELECT last_seq FROM spools WHERE resource = ?1 AND spool_id = ?2")?
        .query_row(params![resource, spool], |r| r.get(0))
        .optional()?;
    to_u64(v.unwrap_or(0), "last_seq")
}

fn apply_register(c: &Connection, reg: &Registration) -> Result<Registered, StoreError> {
    let resource = reg.resource.as_str();
    c.execute(
        "INSERT INTO resources (resource, grp, agent_version, image_version, hostname, os,
                                kernel, vcpus, memory_bytes, first_seen, last_seen)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)
         ON CONFLICT (resource) DO UPDATE SET
            grp = excluded.grp, agent_version = excluded.agent_version,
            image_version = excluded.image_version, hostname = excluded.hostname,
            os = excluded.os, kernel = excluded.kernel, vcpus = excluded.vcpus,
            memory_bytes = excluded.memory_bytes, last_seen = excluded.last_seen",
        params![
            resource,
            reg.group.as_ref().map(|g| g.as_str()),
            reg.agent_version,
            reg.image_version,
            reg.host.hostname,
            reg.host.os,
            reg.host.kernel,
            i64::from(reg.host.vcpus),
            to_i64(reg.host.memory_bytes, "memory_bytes")?,
            reg.now.0,
        ],
    )?;
    let last_recorded_seq = read_last_seq(c, resource, spool_key(reg.spool_id))?;

    let open: Vec<String> = {
        let mut stmt =
            c.prepare("SELECT session FROM sessions WHERE resource = ?1 AND ended_at IS NULL")?;
        let rows = stmt.query_map([resource], |r| r.get::<_, String>(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut ended = Vec::new();
    let mut still_open = Vec::new();
    for session in open {
        if reg.open_sessions.iter().any(|s| s.as_str() == session) {
            still_open.push(parse_id(session, "session")?);
            continue;
        }
        c.execute(
            "UPDATE sessions SET ended_at = ?1, end_reason = ?2, reconciled = ?5
             WHERE resource = ?3 AND session = ?4 AND ended_at IS NULL",
            params![reg.now.0, RECONCILE_REASON, resource, session, END_INFERRED],
        )?;
        ended.push(parse_id(session, "session")?);
    }
    still_open.sort();
    Ok(Registered {
        last_recorded_seq,
        ended,
        open: still_open,
    })
}

/// Records `events` of one spool; `known_last` is the spool's `last_seq` in
/// this transaction when the batch already read or wrote it.
fn apply_record(
    c: &Connection,
    resource: &ResourceId,
    spool_id: u64,
    known_last: Option<u64>,
    events: &[SequencedEvent],
    recorded_at: UnixMillis,
) -> Result<RecordOutcome, StoreError> {
    let res = resource.as_str();
    let spool = spool_key(spool_id);
    let last = match known_last {
        Some(v) => v,
        None => read_last_seq(c, res, spool)?,
    };
    let mut out = RecordOutcome {
        last_seq: last,
        recorded: 0,
        duplicates: 0,
        gap: None,
        refused: Vec::new(),
    };
    for ev in events {
        if ev.seq <= out.last_seq {
            out.duplicates += 1;
            continue;
        }
        if ev.seq != out.last_seq + 1 {
            out.gap = Some(SequenceGap {
                got: ev.seq,
                expected: out.last_seq + 1,
            });
            break;
        }
        let seq = to_i64(ev.seq, "seq")?;
        match &ev.event {
            SessionEvent::Started { session, user, at } => {
                // The newest record of this id on this host: none (a new
                // session), open (a replay after the broker reconciled: the
                // open row stands) or ended (the id is reused: refused).
                let newest: Option<(i64, bool, i64)> = c
                    .prepare_cached(
                        "SELECT id, ended_at IS NULL, reconciled FROM sessions
                         WHERE resource = ?1 AND session = ?2 ORDER BY id DESC LIMIT 1",
                    )?
                    .query_row(params![res, session.as_str()], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .optional()?;
                let reused = matches!(newest, Some((_, false, _)));
                c.prepare_cached(
                    "INSERT INTO session_events
                        (resource, spool_id, seq, kind, session, user, at, recorded_at, reason)
                     VALUES (?1, ?2, ?3, 'started', ?4, ?5, ?6, ?7, ?8)",
                )?
                .execute(params![
                    res,
                    spool,
                    seq,
                    session.as_str(),
                    user.as_str(),
                    at.0,
                    recorded_at.0,
                    reused.then_some(REUSED_ID_REASON)
                ])?;
                match newest {
                    None => {
                        c.prepare_cached(
                            "INSERT INTO sessions (resource, session, user, started_at)
                             VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(params![
                            res,
                            session.as_str(),
                            user.as_str(),
                            at.0
                        ])?;
                    }
                    Some((_, true, _)) => {}
                    Some((id, false, reconciled)) => {
                        if reconciled == END_INFERRED {
                            // The reused id's own end must not replace the
                            // end the broker inferred (see the Ended arm).
                            c.prepare_cached("UPDATE sessions SET reconciled = ?1 WHERE id = ?2")?
                                .execute(params![END_INFERRED_THEN_REUSED, id])?;
                        }
                        out.refused.push(ev.seq);
                    }
                }
            }
            SessionEvent::Ended {
                session,
                at,
                reason,
            } => {
                let reason = end_reason_str(reason);
                c.prepare_cached(
                    "INSERT INTO session_events
                        (resource, spool_id, seq, kind, session, at, recorded_at, reason)
                     VALUES (?1, ?2, ?3, 'ended', ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    res,
                    spool,
                    seq,
                    session.as_str(),
                    at.0,
                    recorded_at.0,
                    reason
                ])?;
                // The host's own end beats an end the broker inferred at a
                // reconnect (metering wants the real end time), and an end
                // the broker decided when it is earlier (it happened first).
                // Not once an inferred end's id was reused
                // (`END_INFERRED_THEN_REUSED`): this end is then the refused
                // session's.
                c.prepare_cached(
                    "UPDATE sessions SET ended_at = ?1, end_reason = ?2, reconciled = 0
                     WHERE id = (SELECT id FROM sessions
                                 WHERE resource = ?3 AND session = ?4
                                   AND (ended_at IS NULL OR reconciled = ?5
                                        OR (reconciled = ?6 AND ended_at > ?1))
                                 ORDER BY id DESC LIMIT 1)",
                )?
                .execute(params![
                    at.0,
                    reason,
                    res,
                    session.as_str(),
                    END_INFERRED,
                    END_BY_BROKER
                ])?;
            }
        }
        out.last_seq = ev.seq;
        out.recorded += 1;
    }
    if out.last_seq != last {
        c.prepare_cached(
            "INSERT INTO spools (resource, spool_id, last_seq) VALUES (?1, ?2, ?3)
             ON CONFLICT (resource, spool_id) DO UPDATE SET last_seq = excluded.last_seq",
        )?
        .execute(params![res, spool, to_i64(out.last_seq, "seq")?])?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::migrations::MIGRATIONS;
    use super::*;

    fn rid(s: &str) -> ResourceId {
        s.parse().expect("id")
    }

    fn started(seq: u64, session: &str) -> SequencedEvent {
        SequencedEvent {
            seq,
            event: SessionEvent::Started {
                session: session.parse().expect("id"),
                user: "alice".parse().expect("id"),
                at: UnixMillis(1000 + seq as i64),
            },
        }
    }

    fn ended(seq: u64, session: &str) -> SequencedEvent {
        SequencedEvent {
            seq,
            event: SessionEvent::Ended {
                session: session.parse().expect("id"),
                at: UnixMillis(5000 + seq as i64),
                reason: EndReason::Logout,
            },
        }
    }

    fn registration(resource: &str, spool: u64, open: &[&str]) -> Registration {
        Registration {
            resource: rid(resource),
            group: Some("g1".parse().expect("id")),
            agent_version: "0.1.0".into(),
            image_version: "img".into(),
            host: HostFacts {
                hostname: "h".into(),
                os: "Linux".into(),
                kernel: "6".into(),
                vcpus: 4,
                memory_bytes: 1 << 30,
            },
            spool_id: spool,
            open_sessions: open.iter().map(|s| s.parse().expect("id")).collect(),
            now: UnixMillis(9000),
        }
    }

    fn open(dir: &Path) -> Store {
        Store::open(&dir.join("ferry.db"), StoreOptions::default()).expect("open")
    }

    fn page_size(path: &Path) -> i64 {
        let c = Connection::open(path).expect("open");
        c.query_row("PRAGMA page_size", [], |r| r.get(0))
            .expect("page_size")
    }

    #[tokio::test]
    async fn a_new_store_gets_small_pages_and_an_old_one_keeps_its_own() {
        let tmp = tempfile::tempdir().expect("tmp");
        let new = tmp.path().join("new.db");
        let store = Store::open(&new, StoreOptions::default()).expect("open");
        store.close().await;
        assert_eq!(page_size(&new), STORE_PAGE_SIZE);

        // A store created with 4 KiB pages (as before) and holding data.
        let old = tmp.path().join("old.db");
        {
            let c = Connection::open(&old).expect("open");
            c.execute_batch("PRAGMA page_size = 4096; PRAGMA journal_mode = WAL;")
                .expect("pragmas");
            c.execute_batch("CREATE TABLE t (x INTEGER)")
                .expect("create");
        }
        assert_eq!(page_size(&old), 4096);
        let store = Store::open(&old, StoreOptions::default()).expect("open old");
        store
            .record_events(&rid("h1"), 1, vec![started(1, "s1")], UnixMillis(1))
            .await
            .expect("record");
        store.close().await;
        assert_eq!(page_size(&old), 4096);
        let store = Store::open(&old, StoreOptions::default()).expect("reopen old");
        assert_eq!(
            store.last_recorded_seq(&rid("h1"), 1).await.expect("seq"),
            1
        );
    }

    #[tokio::test]
    async fn open_session_hosts_finds_open_sessions_by_name_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = open(tmp.path());
        for (host, events) in [
            ("h1", vec![started(1, "s1"), started(2, "s2")]),
            ("h2", vec![started(1, "s1"), ended(2, "s1")]),
            ("h3", vec![started(1, "s1")]),
        ] {
            store
                .record_events(&rid(host), 1, events, UnixMillis(1))
                .await
                .expect("record");
        }
        let s1: SessionId = "s1".parse().expect("id");
        assert_eq!(
            store.open_session_hosts(&s1).await.expect("hosts"),
            vec![rid("h1"), rid("h3")]
        );
        let s2: SessionId = "s2".parse().expect("id");
        assert_eq!(
            store.open_session_hosts(&s2).await.expect("hosts"),
            vec![rid("h1")]
        );
        let none: SessionId = "nope".parse().expect("id");
        assert!(store
            .open_session_hosts(&none)
            .await
            .expect("hosts")
            .is_empty());
    }

    #[tokio::test]
    async fn migrations_create_the_schema_on_a_fresh_db() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = open(tmp.path());
        store.close().await;
        let c = Connection::open(tmp.path().join("ferry.db")).expect("open");
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(v, MIGRATIONS.len() as i64);
        for table in ["spools", "session_events", "sessions", "resources"] {
            let n: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type='table' AND name=?1",
                    [table],
                    |r| r.get(0),
                )
                .expect("query");
            assert_eq!(n, 1, "{table}");
        }
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, "wal");
    }

    #[tokio::test]
    async fn migration_3_upgrades_a_v2_database_and_keeps_one_open_interval_per_resource() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("ferry.db");
        {
            let c = Connection::open(&path).expect("open");
            c.execute_batch(MIGRATIONS[0]).expect("v1 schema");
            c.execute_batch(MIGRATIONS[1]).expect("v2 schema");
            c.pragma_update(None, "user_version", 2).expect("set");
        }
        let store = Store::open(&path, StoreOptions::default()).expect("upgrade");
        store.close().await;
        let c = Connection::open(&path).expect("open");
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(v, MIGRATIONS.len() as i64);
        c.execute(
            "INSERT INTO groups (num, id, name, region, office_network, spec, image, billing,
                 base_resources, session_type, policy, status, created_at, updated_at)
             VALUES (1, 'dg-1', 'g1', 'r', 'n', 'office-4c8g', 'img', 'pay-as-you-go', 1,
                 'independent', '{}', 'published', 0, 0)",
            [],
        )
        .expect("group");
        let version: i64 = c
            .query_row("SELECT policy_version FROM groups WHERE num = 1", [], |r| {
                r.get(0)
            })
            .expect("policy version");
        assert_eq!(
            version, 1,
            "a group from before migration 4 is at version 1"
        );
        let open = "INSERT INTO resource_intervals
            (group_num, resource, kind, billing, ready_at) VALUES (1, 'h1', 'base', 'pay-as-you-go', 5)";
        c.execute(open, []).expect("first open interval");
        assert!(
            c.execute(open, []).is_err(),
            "a second open interval is refused"
        );
        c.execute(
            "UPDATE resource_intervals SET released_at = 9 WHERE resource = 'h1'",
            [],
        )
        .expect("release");
        c.execute(open, [])
            .expect("a new interval after the release");
        assert!(c
            .execute(
                "UPDATE resource_intervals SET released_at = 1 WHERE released_at IS NULL",
                []
            )
            .is_err());
    }

    #[tokio::test]
    async fn migration_2_upgrades_an_existing_v1_database() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("ferry.db");
        {
            // A database exactly as a broker of the first schema left it.
            let c = Connection::open(&path).expect("open");
            c.execute_batch(MIGRATIONS[0]).expect("v1 schema");
            c.pragma_update(None, "user_version", 1).expect("set");
            c.execute(
                "INSERT INTO sessions (resource, session, user, started_at)
                 VALUES ('h1', 's1', 'alice', 1000)",
                [],
            )
            .expect("v1 row");
        }
        let store = Store::open(&path, StoreOptions::default()).expect("upgrade");
        let open_now = store.sessions(false).await.expect("sessions");
        assert_eq!(open_now.len(), 1, "v1 data survives the upgrade");
        let id = store
            .exec(|c| {
                c.execute(
                    "INSERT INTO users (id, email, mobile, created_at, updated_at)
                     VALUES ('u1', 'u1@example.com', '+100', 1, 1)",
                    [],
                )?;
                Ok(c.last_insert_rowid())
            })
            .await
            .expect("v2 write");
        assert!(id > 0);
        store.close().await;
        let c = Connection::open(&path).expect("open");
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(v, MIGRATIONS.len() as i64);
        for table in [
            "groups",
            "users",
            "group_users",
            "orders",
            "notifications",
            "group_events",
        ] {
            let n: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type='table' AND name=?1",
                    [table],
                    |r| r.get(0),
                )
                .expect("query");
            assert_eq!(n, 1, "{table}");
        }
    }

    #[tokio::test]
    async fn a_failing_exec_leaves_nothing_and_its_batch_goes_on() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = open(tmp.path());
        let bad = store.exec(|c| {
            c.execute(
                "INSERT INTO users (id, email, mobile, created_at, updated_at)
                 VALUES ('u1', 'e', 'm', 1, 1)",
                [],
            )?;
            Err::<(), _>(StoreError::Corrupt("refused half way".into()))
        });
        let good = store.exec(|c| {
            c.execute(
                "INSERT INTO users (id, email, mobile, created_at, updated_at)
                 VALUES ('u2', 'e', 'm', 1, 1)",
                [],
            )?;
            Ok(())
        });
        let (bad, good) = tokio::join!(bad, good);
        assert!(bad.is_err());
        good.expect("the other write commits");
        let users: Vec<String> = store
            .read_with(|c| {
                let mut stmt = c.prepare("SELECT id FROM users ORDER BY id")?;
                let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await
            .expect("read");
        assert_eq!(users, ["u2"]);
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("ferry.db");
        let c = Connection::open(&path).expect("open");
        c.pragma_update(None, "user_version", 99).expect("set");
        drop(c);
        assert!(matches!(
            Store::open(&path, StoreOptions::default()),
            Err(StoreError::NewerSchema { found: 99, .. })
        ));
    }

    #[tokio::test]
    async fn a_duplicate_event_is_not_recorded_twice() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = open(tmp.path());
        let r = rid("h1");
        let first = store
            .record_events(&r, 7, vec![started(1, "s1")], UnixMillis(1))
            .await
            .expect("record");
        assert_eq!((first.last_seq, first.recorded), (1, 1));
        let again = store
            .record_events(
                &r,
                7,
                vec![started(1, "s1"), started(2, "s2")],
                UnixMillis(2),
            )
            .await
            .expect("record");
        assert_eq!(
            again,
            RecordOutcome {
                last_seq: 2,
                recorded: 1,
                duplicates: 1,
                gap: None,
                refused: Vec::new(),
            }
        );
        assert_eq!(store.event_count(&r, 7, 1).await.expect("count"), 1);
        assert_eq!(store.counts().await.expect("counts").events_recorded, 2);
        assert_eq!(store.sessions(false).await.expect("sessions").len(), 2);
    }

    #[tokio::test]
    async fn a_gap_stops_recording_and_keeps_what_came_before() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = open(tmp.path());
        let r = rid("h1");
        let out = store
            .record_events(
                &r,
                1,
                vec![started(1, "s1"), started(3, "s3"), started(4, "s4")],
                UnixMillis(1),
            )
            .await
            .expect("record");
        assert_eq!(out.last_seq, 1);
        assert_eq!(
            out.gap,
            Some(SequenceGap {
                got: 3,
                expected: 2
            })
        );
        assert_eq!(store.counts().await.expect("counts").events_recorded, 1);
        // Spools are independent: another spool of the same resource starts at 1.
        assert_eq!(store.last_recorded_seq(&r, 2).await.expect("seq"), 0);
    }

    #[tokio::test]
    async fn last_seq_and_event_commit_together() {
        // A write that fails half way (second event violates the session_events
        // uniqueness because the row was planted) must leave neither the first
        // event nor the advanced last_seq behind.
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("ferry.db");
        let store = Store::open(&path, StoreOptions::default()).expect("open");
        store.close().await;
        let c = Connection::open(&path).expect("open");
        c.execute(
            "INSERT INTO session_events (resource, spool_id, seq, kind, session, at, recorded_at)
             VALUES ('h1', 1, 2, 'started', 'planted', 0, 0)",
            [],
        )
        .expect("plant");
        drop(c);
        let store = Store::open(&path, StoreOptions::default()).expect("reopen");
        let r = rid("h1");
        let err = store
            .record_events(
                &r,
                1,
                vec![started(1, "s1"), started(2, "s2")],
                UnixMillis(1),
            )
            .await;
        assert!(err.is_err(), "{err:?}");
        assert_eq!(store.last_recorded_seq(&r, 1).await.expect("seq"), 0);
        assert_eq!(store.event_count(&r, 1, 1).await.expect("count"), 0);
        assert!(store.sessions(true).await.expect("sessions").is_empty());
        // The store goes on working for other writes.
        let ok = store
            .record_events(&rid("h2"), 1, vec![started(1, "s1")], UnixMillis(1))
            .await
            .expect("record");
        assert_eq!(ok.last_seq, 1);
    }

    #[tokio::test]
    async fn reopening_after_drop_keeps_everything() {
        let tmp = tempfile::tempdir().expect("tmp");
        {
            let store = open(tmp.path());
            store
                .register(registration("h1", 5, &[]))
                .await
                .expect("reg");
            store
                .record_events(
                    &rid("h1"),
                    5,
                    vec![started(1, "s1"), ended(2, "s1")],
                    UnixMillis(1),
                )
                .await
                .expect("record");
            // Dropped without close: the writer still finishes and joins.
        }
        let store = open(tmp.path());
        assert_eq!(
            store.last_recorded_seq(&rid("h1"), 5).await.expect("seq"),
            2
        );
        let all = store.sessions(true).await.expect("sessions");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].ended_at, Some(UnixMillis(5002)));
        assert_eq!(all[0].end_reason.as_deref(), Some("logout"));
        let res = store.resources().await.expect("resources");
        assert_eq!(res.len(), 1);
        assert_eq!(res[0].host.vcpus, 4);
    }

    #[tokio::test]
    async fn registration_reconciles_sessions_the_host_no_longer_has() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = open(tmp.path());
        let r = rid("h1");
        store
            .register(registration("h1", 1, &[]))
            .await
            .expect("reg");
        store
            .record_events(
                &r,
                1,
                vec![started(1, "keep"), started(2, "gone")],
                UnixMillis(1),
            )
            .await
            .expect("record");
        let reg = store
            .register(registration("h1", 1, &["keep"]))
            .await
            .expect("reg");
        assert_eq!(reg.last_recorded_seq, 2);
        assert_eq!(reg.ended, vec!["gone".parse::<SessionId>().expect("id")]);
        let open_now = store.sessions(false).await.expect("sessions");
        assert_eq!(open_now.len(), 1);
        assert_eq!(open_now[0].session.as_str(), "keep");
        let gone = store
            .sessions(true)
            .await
            .expect("sessions")
            .into_iter()
            .find(|s| s.session.as_str() == "gone")
            .expect("gone");
        assert_eq!(gone.end_reason.as_deref(), Some(RECONCILE_REASON));
        // The host's own Ended, replayed later, corrects the inferred end.
        store
            .record_events(&r, 1, vec![ended(3, "gone")], UnixMillis(2))
            .await
            .expect("record");
        let gone = store
            .sessions(true)
            .await
            .expect("sessions")
            .into_iter()
            .find(|s| s.session.as_str() == "gone")
            .expect("gone");
        assert_eq!(gone.end_reason.as_deref(), Some("logout"));
        assert_eq!(gone.ended_at, Some(UnixMillis(5003)));
    }

    fn started_by(seq: u64, session: &str, user: &str) -> SequencedEvent {
        let mut ev = started(seq, session);
        if let SessionEvent::Started { user: u, .. } = &mut ev.event {
            *u = user.parse().expect("id");
        }
        ev
    }

    #[tokio::test]
    async fn a_reused_session_id_is_refused_and_the_ended_record_kept() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = open(tmp.path());
        let r = rid("h1");
        let out = store
            .record_events(
                &r,
                1,
                vec![
                    started(1, "s-offline-1"),
                    ended(2, "s-offline-1"),
                    started_by(3, "s-offline-1", "bob"),
                    ended(4, "s-offline-1"),
                ],
                UnixMillis(1),
            )
            .await
            .expect("record");
        // Every event is recorded and acknowledged; the reuse is refused.
        assert_eq!((out.last_seq, out.recorded, out.gap), (4, 4, None));
        assert_eq!(out.refused, vec![3]);
        let all = store.sessions(true).await.expect("sessions");
        assert_eq!(all.len(), 1, "{all:?}");
        let s = &all[0];
        assert_eq!(
            (s.user.as_str(), s.started_at, s.ended_at),
            ("alice", UnixMillis(1001), Some(UnixMillis(5002)))
        );
        assert_eq!(s.end_reason.as_deref(), Some("logout"));
        assert!(store.sessions(false).await.expect("open").is_empty());
        assert_eq!(store.counts().await.expect("counts").events_recorded, 4);

        // An id the broker ended at a reconnect (a wiped state directory,
        // a new spool), then reused by the host: the reuse's end does not
        // replace the inferred end, which the host's own end would.
        store
            .record_events(&r, 1, vec![started(5, "s2")], UnixMillis(2))
            .await
            .expect("record");
        store
            .register(registration("h1", 2, &[]))
            .await
            .expect("reg");
        let out = store
            .record_events(
                &r,
                2,
                vec![started_by(1, "s2", "bob"), ended(2, "s2")],
                UnixMillis(3),
            )
            .await
            .expect("record");
        assert_eq!(out.refused, vec![1]);
        let s2 = store
            .sessions(true)
            .await
            .expect("sessions")
            .into_iter()
            .filter(|s| s.session.as_str() == "s2")
            .collect::<Vec<_>>();
        assert_eq!(s2.len(), 1, "{s2:?}");
        assert_eq!(s2[0].user.as_str(), "alice");
        assert_eq!(s2[0].ended_at, Some(UnixMillis(9000)));
        assert_eq!(s2[0].end_reason.as_deref(), Some(RECONCILE_REASON));
    }

    /// Every row of the tables recording events, in a comparable form.
    fn dump(path: &Path) -> Vec<String> {
        let c = Connection::open(path).expect("open");
        let mut out = Vec::new();
        for sql in [
            "SELECT 'ev', id, resource, spool_id, seq, kind, session, user, at, recorded_at, \
             reason FROM session_events ORDER BY id",
            "SELECT 'se', id, resource, session, user, started_at, ended_at, end_reason, \
             reconciled, NULL, NULL FROM sessions ORDER BY id",
            "SELECT 'sp', resource, spool_id, last_seq, NULL, NULL, NULL, NULL, NULL, NULL, \
             NULL FROM spools ORDER BY resource, spool_id",
        ] {
            let mut stmt = c.prepare(sql).expect("prepare");
            let rows = stmt
                .query_map([], |r| {
                    let cols: Vec<String> = (0..11)
                        .map(|i| {
                            r.get::<_, rusqlite::types::Value>(i)
                                .map(|v| format!("{v:?}"))
                        })
                        .collect::<Result<_, _>>()?;
                    Ok(cols.join("|"))
                })
                .expect("query");
            out.extend(rows.map(|r| r.expect("row")));
        }
        out
    }

    #[tokio::test]
    async fn one_batch_records_exactly_what_one_by_one_recording_does() {
        // Writes of many resources and spools, with duplicates (within the
        // batch and of earlier commits), a gap, an end of a session and a
        // write that fails half way (a planted row) followed by a good one
        // of the same spool: the batch must see each spool as it stands
        // after the writes before it, and forget what a failed write did.
        let writes: Vec<(&str, u64, Vec<SequencedEvent>)> = vec![
            ("h1", 1, vec![started(1, "a"), started(2, "b")]),
            ("h2", 1, vec![started(1, "c")]),
            ("h1", 2, vec![started(1, "d")]),
            ("h1", 1, vec![started(2, "b"), ended(3, "a")]),
            ("h2", 1, vec![started(1, "c"), started(3, "x")]),
            ("h2", 1, vec![started(2, "e")]),
            ("h3", 9, vec![started(2, "gap-first")]),
            ("h1", 1, vec![ended(3, "a"), ended(4, "b"), started(5, "f")]),
            ("h9", 1, vec![started(1, "g"), started(2, "planted-clash")]),
            ("h9", 1, vec![started(1, "g")]),
            (
                "h1",
                2,
                vec![started(1, "d"), ended(2, "d"), started(4, "y")],
            ),
            ("h2", 1, vec![started(3, "h"), ended(4, "c")]),
        ];
        let mut opened = Vec::new();
        for max_batch in [1, DEFAULT_MAX_BATCH] {
            let tmp = tempfile::tempdir().expect("tmp");
            let path = tmp.path().join("ferry.db");
            // Both start from a committed history and the same planted row.
            let store = Store::open(&path, StoreOptions::default()).expect("open");
            store
                .record_events(&rid("h1"), 1, vec![started(1, "a")], UnixMillis(1))
                .await
                .expect("history");
            store.close().await;
            let c = Connection::open(&path).expect("open");
            c.execute(
                "INSERT INTO session_events (resource, spool_id, seq, kind, session, at, \
                 recorded_at) VALUES ('h9', 1, 2, 'started', 'planted', 0, 0)",
                [],
            )
            .expect("plant");
            drop(c);
            opened.push((tmp, path, max_batch));
        }

        let mut results = Vec::new();
        for (_tmp, path, max_batch) in &opened {
            let store = Store::open(
                path,
                StoreOptions {
                    max_batch: *max_batch,
                    queue_len: 1024,
                },
            )
            .expect("open");
            let outcomes: Vec<Result<RecordOutcome, String>> = if *max_batch == 1 {
                let mut out = Vec::new();
                for (res, spool, events) in &writes {
                    out.push(
                        store
                            .record_events(&rid(res), *spool, events.clone(), UnixMillis(7))
                            .await
                            .map_err(|e| e.to_string()),
                    );
                }
                out
            } else {
                // Hold the writer in a write of its own until every record
                // is queued, in order: they then make one batch.
                let (release, held) = std::sync::mpsc::channel::<()>();
                let (running, writer_held) = oneshot::channel::<()>();
                let blocker = {
                    let store = store.clone();
                    tokio::spawn(async move {
                        store
                            .exec(move |_| {
                                let _ = running.send(());
                                held.recv().map_err(|e| StoreError::Corrupt(e.to_string()))
                            })
                            .await
                    })
                };
                let queued = |n: usize| {
                    let free = store.inner.writes.capacity();
                    store.inner.writes.max_capacity() - free == n
                };
                let wait_queued = |n: usize| async move {
                    let wait = async {
                        while !queued(n) {
                            tokio::task::yield_now().await;
                        }
                    };
                    tokio::time::timeout(std::time::Duration::from_secs(60), wait)
                        .await
                        .unwrap_or_else(|_| panic!("{n} writes never queued"));
                };
                // The writer runs the blocker, alone in its batch.
                writer_held.await.expect("the writer runs the blocker");
                wait_queued(0).await;
                let mut tasks = Vec::new();
                for (i, (res, spool, events)) in writes.iter().enumerate() {
                    let store = store.clone();
                    let (r, spool, events) = (rid(res), *spool, events.clone());
                    tasks.push(tokio::spawn(async move {
                        store
                            .record_events(&r, spool, events, UnixMillis(7))
                            .await
                            .map_err(|e| e.to_string())
                    }));
                    wait_queued(i + 1).await;
                }
                release.send(()).expect("release the writer");
                blocker.await.expect("join").expect("blocker");
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await.expect("join"));
                }
                out
            };
            store.close().await;
            results.push((outcomes, dump(path)));
        }
        let (one_by_one, batched) = (&results[0], &results[1]);
        assert_eq!(one_by_one.0, batched.0, "the same answers");
        assert_eq!(one_by_one.1, batched.1, "the same rows");
        // And the answers are the expected ones, not just equal.
        let o = &one_by_one.0;
        assert_eq!(
            o[0].as_ref()
                .map(|r| (r.last_seq, r.recorded, r.duplicates)),
            Ok((2, 1, 1))
        );
        assert_eq!(
            o[4].as_ref().map(|r| r.gap),
            Ok(Some(SequenceGap {
                got: 3,
                expected: 2
            }))
        );
        assert_eq!(
            o[6].as_ref().map(|r| (r.last_seq, r.gap)),
            Ok((
                0,
                Some(SequenceGap {
                    got: 2,
                    expected: 1
                })
            ))
        );
        assert_eq!(o[7].as_ref().map(|r| (r.last_seq, r.recorded)), Ok((5, 2)));
        assert!(o[8].is_err(), "{:?}", o[8]);
        assert_eq!(o[9].as_ref().map(|r| (r.last_seq, r.recorded)), Ok((1, 1)));
        assert_eq!(
            o[10]
                .as_ref()
                .map(|r| (r.last_seq, r.recorded, r.gap.is_some())),
            Ok((2, 1, true))
        );
        assert_eq!(o[11].as_ref().map(|r| (r.last_seq, r.recorded)), Ok((4, 2)));
        assert!(!batched.1.iter().any(|r| r.contains("\"gap-first\"")));
    }

    #[tokio::test]
    async fn group_commit_answers_every_waiter() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = Store::open(
            &tmp.path().join("ferry.db"),
            StoreOptions {
                max_batch: 64,
                queue_len: 1024,
            },
        )
        .expect("open");
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200u64 {
            let store = store.clone();
            tasks.spawn(async move {
                let r: ResourceId = format!("h{i}").parse().expect("id");
                store
                    .record_events(&r, i, vec![started(1, "s")], UnixMillis(1))
                    .await
            });
        }
        let mut done = 0;
        while let Some(r) = tasks.join_next().await {
            assert_eq!(r.expect("join").expect("record").last_seq, 1);
            done += 1;
        }
        assert_eq!(done, 200);
        assert_eq!(store.counts().await.expect("counts").events_recorded, 200);
        store.close().await;
        assert!(matches!(
            store
                .record_events(&rid("late"), 1, vec![started(1, "s")], UnixMillis(1))
                .await,
            Err(StoreError::Closed)
        ));
    }
}
