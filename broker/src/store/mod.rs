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
//!
//! Doors. Every table is read and written here and nowhere else, through one
//! module per aggregate, each taking and giving typed rows: `groups` (group
//! rows, orders, outbox, assignments, policy versions), `group_live` (what a
//! group's actor records, one [`GroupCommit`] per turn), `sessions` (agents'
//! registrations and session events), `users` (end users and credentials),
//! `usage` (what a usage report reads), `elastic` (provisioned resources and
//! enrollment tokens), `membership` (which group each host belongs to) and
//! [`rollouts`] (image updates and OTA). `writer` is the writer thread and
//! `migrations` the schema. A door decides nothing:
//! the rules stay with their callers (the group service, the actors, the
//! rollouts), which compose door calls in one transaction.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags};

use sql::Db;
use tokio::sync::{mpsc, oneshot};

pub(crate) mod elastic;
mod group_live;
mod groups;
pub(crate) mod leases;
mod live_counts;
pub(crate) mod membership;
mod migrations;
mod revocations;
mod sessions;
pub(crate) mod sql;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
pub(crate) mod usage;
pub(crate) mod users;
mod writer;

pub use elastic::{BaseRecord, ElasticOp, ElasticState, EnrollTokenRecord, RetireRecord};
pub use group_live::{
    BrokerEnd, DisconnectOp, GroupCommit, IntervalOp, OpenOnHost, PolicyOutcome, PolicyPushState,
    ReservationOp, RetainOp, StoredDisconnect, StoredReservation, StoredRetention,
};
pub use groups::{GroupRecord, GroupStatus, GroupsBatch, GroupsTx, NewGroup, NewOrder, OutboxRow};
pub use leases::{BrokerRow, Fences, GroupOwner, Held, LeaseChange, LeaseRow, LeaseView};
pub use membership::{Assigned, Membership, MembershipSource, MEMBERSHIP_EVENT};
use migrations::migrate;
pub use revocations::RevocationRecord;
pub mod rollouts;
pub use live_counts::LiveCounts;
pub use sessions::{
    end_reason_text, RecordOutcome, Registered, Registration, SequenceGap, StoreCounts,
    StoredResource, StoredSession, RECONCILE_REASON, REUSED_ID_REASON,
};
pub use usage::{GroupRecords, Interval, Kind, SessionSpan};
pub use users::{CredentialState, StoredCredentials, StoredUser};
use writer::{writer_loop, Exec, WriteOp};

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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("open store {path}: {message}")]
    Open { path: String, message: String },
    #[error("store schema version {found} is newer than this broker knows ({known}); upgrade the broker")]
    NewerSchema { found: i64, known: i64 },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(String),
    /// The PostgreSQL database could not be reached; nothing of the write
    /// was recorded.
    #[error(
        "the PostgreSQL database {database} cannot be reached: {detail}; nothing of this write \
         was recorded (agents keep their events and send them again once it is back)"
    )]
    Unreachable { database: String, detail: String },
    /// This broker does not hold the lease of the group it wrote for (it
    /// was taken over, or expired): nothing of the write was recorded.
    #[error(
        "this broker no longer owns group {group_num} (another broker took its lease over); \
         nothing of this write was recorded"
    )]
    Fenced { group_num: i64 },
    /// A query that must find a row found none.
    #[error("no such row")]
    NoRows,
    #[error("commit failed: {0}")]
    Commit(String),
    /// The state directory's disk refused the write; nothing of it is stored.
    #[error(
        "the state directory {} {}: {detail}; nothing of this write was recorded ({})",
        .dir.display(), .problem.what(), .problem.advice()
    )]
    Disk {
        dir: std::path::PathBuf,
        problem: DiskProblem,
        detail: String,
    },
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("store is closed")]
    Closed,
}

/// What is wrong with the state directory when a write fails because of
/// its disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskProblem {
    /// No space left (or the quota is used up).
    Full,
    /// The file system is read-only (remounted after errors, or by hand).
    ReadOnly,
    /// An I/O error.
    Failing,
}

/// Free space under which a write that failed for an unclear reason is put
/// down to a full disk: a commit writes at most a few MiB.
const NEARLY_FULL_BYTES: u64 = 4 * 1024 * 1024;

impl DiskProblem {
    fn what(self) -> &'static str {
        match self {
            DiskProblem::Full => "is full",
            DiskProblem::ReadOnly => "is read-only",
            DiskProblem::Failing => "cannot be written",
        }
    }

    fn advice(self) -> &'static str {
        match self {
            DiskProblem::Full => {
                "free space there: the broker records again by itself, and agents resend what \
                 was not acknowledged"
            }
            DiskProblem::ReadOnly => {
                "remount it read-write: the broker records again by itself, and agents resend \
                 what was not acknowledged"
            }
            DiskProblem::Failing => "check the disk and the system log",
        }
    }

    /// The problem SQLite's result code names, if it names one.
    pub fn of_sqlite(e: &rusqlite::Error) -> Option<DiskProblem> {
        use rusqlite::ErrorCode;
        match e.sqlite_error_code()? {
            ErrorCode::DiskFull => Some(DiskProblem::Full),
            ErrorCode::ReadOnly => Some(DiskProblem::ReadOnly),
            ErrorCode::SystemIoFailure => Some(DiskProblem::Failing),
            _ => None,
        }
    }

    /// The problem the file system of `dir` shows now (read-only, or
    /// nearly no space left), for a failure whose own error does not say
    /// (a transaction SQLite rolled back in the middle of a batch).
    pub fn of_dir(dir: &Path) -> Option<DiskProblem> {
        use rustix::fs::StatVfsMountFlags;
        let st = rustix::fs::statvfs(dir).ok()?;
        if st.f_flag.contains(StatVfsMountFlags::RDONLY) {
            Some(DiskProblem::ReadOnly)
        } else if st.f_bavail.saturating_mul(st.f_frsize) < NEARLY_FULL_BYTES {
            Some(DiskProblem::Full)
        } else {
            None
        }
    }
}

impl StoreError {
    /// The same error, said as a problem of the state directory `dir` when
    /// SQLite's code shows its disk refused the write.
    pub(crate) fn on_disk(self, dir: &Path) -> StoreError {
        match &self {
            StoreError::Sqlite(e) => match DiskProblem::of_sqlite(e) {
                Some(problem) => StoreError::Disk {
                    dir: dir.to_owned(),
                    problem,
                    detail: e.to_string(),
                },
                None => self,
            },
            _ => self,
        }
    }
}

/// Tuning of the writer.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Most writes in one transaction; 1 means one commit (one fsync) per write.
    pub max_batch: usize,
    /// Capacity of the writer's inbox.
    pub queue_len: usize,
    /// The broker's metrics: the writer times its commits there, and the
    /// parts holding this store count through [`Store::metrics`].
    pub metrics: crate::metrics::BrokerMetrics,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_batch: DEFAULT_MAX_BATCH,
            queue_len: WRITE_QUEUE_LEN,
            metrics: crate::metrics::BrokerMetrics::default(),
        }
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    writes: mpsc::Sender<WriteOp>,
    reads: Reads,
    fences: Fences,
    writer: Mutex<Option<JoinHandle<()>>>,
    metrics: crate::metrics::BrokerMetrics,
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

pub(crate) fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} does not fit")))
}

pub(crate) fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} is negative")))
}

/// Spool ids are random u64s; SQLite integers are i64. Store the same bits.
pub(crate) fn spool_key(spool_id: u64) -> i64 {
    i64::from_ne_bytes(spool_id.to_ne_bytes())
}

pub(crate) fn parse_id<T: std::str::FromStr>(s: String, what: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>()
        .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Mode of the database and its `-wal` and `-shm` files: they hold users'
/// password hashes.
pub const STORE_FILE_MODE: u32 = 0o600;

/// Creates the database file at `path` with mode [`STORE_FILE_MODE`] before
/// SQLite opens it (an empty file is a new database), whatever the umask,
/// and sets that mode on an existing database and on the `-wal` and `-shm`
/// files a crash left behind (a store created by an earlier version has the
/// umask's mode). SQLite creates its `-wal` and `-shm` files with the
/// database's mode.
fn make_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |what: &str, p: &Path, e: std::io::Error| StoreError::Open {
        path: p.display().to_string(),
        message: format!("{what}: {e}"),
    };
    let mode = std::fs::Permissions::from_mode(STORE_FILE_MODE);
    let db = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(STORE_FILE_MODE)
        .open(path)
        .map_err(|e| err("create", path, e))?;
    db.set_permissions(mode.clone())
        .map_err(|e| err("set the mode of", path, e))?;
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let side = Path::new(&name);
        match std::fs::set_permissions(side, mode.clone()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("set the mode of", side, e)),
        }
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed, with mode [`STORE_FILE_MODE`]) the database at `path`, applies pending
    /// migrations and starts the writer thread.
    pub fn open(path: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let open_err = |e: rusqlite::Error| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        make_private(path)?;
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
        // What a failed write names when the disk refused it.
        let dir = ferry_process::files::parent_dir(path);
        let max_batch = options.max_batch.max(1);
        let metrics = options.metrics.clone();
        let handle = std::thread::Builder::new()
            .name("ferry-store-writer".into())
            .spawn(move || writer_loop(Db::Sqlite(writer), rx, max_batch, dir, metrics))
            .map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                message: format!("spawn writer thread: {e}"),
            })?;
        Ok(Store {
            inner: Arc::new(Inner {
                writes: tx,
                reads: Reads::Local(Mutex::new(Db::Sqlite(reader))),
                fences: Fences::default(),
                writer: Mutex::new(Some(handle)),
                metrics: options.metrics,
            }),
        })
    }

    /// Connects to the PostgreSQL database at `url` (a libpq connection
    /// string or URL), applies pending migrations and starts the writer
    /// thread. Several brokers may share the database.
    ///
    /// A commit is durable when PostgreSQL answers it (its own
    /// `synchronous_commit`, on by default; the broker acknowledges only
    /// then). When the connection breaks, writes fail with
    /// [`StoreError::Unreachable`] and the writer connects again before its
    /// next batch.
    pub fn open_postgres(url: &str, options: StoreOptions) -> Result<Store, StoreError> {
        Self::open_postgres_tls(url, None, options)
    }

    /// [`Store::open_postgres`] over TLS when `ca_cert` names the CA (PEM)
    /// that signed the server's certificate: the connection string's
    /// `sslmode` (`prefer`, the default, or `require`) then uses TLS, and
    /// the server's certificate must carry the host name of the string.
    /// Without it, connections are plain and `sslmode=require` is refused.
    pub fn open_postgres_tls(
        url: &str,
        ca_cert: Option<&Path>,
        options: StoreOptions,
    ) -> Result<Store, StoreError> {
        let source = PgSource::parse(url, ca_cert)?;
        let (tx, rx) = mpsc::channel(options.queue_len.max(1));
        let max_batch = options.max_batch.max(1);
        // The blocking client runs a runtime of its own: it lives, is used
        // and is dropped on the store's own threads only, never on one of
        // the broker's runtime threads.
        let (ready, started) = std::sync::mpsc::channel();
        let writer_source = source.clone();
        let metrics = options.metrics.clone();
        let handle = std::thread::Builder::new()
            .name("ferry-store-writer".into())
            .spawn(move || {
                let first = writer_source.connect().and_then(|mut client| {
                    migrations::migrate_postgres(&mut client).map_err(|e| match e {
                        StoreError::Postgres(message) => StoreError::Open {
                            path: writer_source.shown.clone(),
                            message: format!("migrate the schema: {message}"),
                        },
                        other => other,
                    })?;
                    Ok(client)
                });
                let client = match first {
                    Ok(client) => {
                        let _ = ready.send(Ok(()));
                        client
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let first = Db::Postgres(sql::PgConn::new(client, writer_source.shown.clone()));
                writer::writer_loop_reconnecting(first, rx, max_batch, metrics, move || {
                    let client = writer_source.connect()?;
                    Ok(Db::Postgres(sql::PgConn::new(
                        client,
                        writer_source.shown.clone(),
                    )))
                })
            })
            .map_err(|e| StoreError::Open {
                path: source.shown.clone(),
                message: format!("spawn writer thread: {e}"),
            })?;
        match started.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(e);
            }
            Err(_) => {
                let _ = handle.join();
                return Err(StoreError::Closed);
            }
        }
        let reads = spawn_reader(source)?;
        Ok(Store {
            inner: Arc::new(Inner {
                writes: tx,
                reads,
                fences: Fences::default(),
                writer: Mutex::new(Some(handle)),
                metrics: options.metrics,
            }),
        })
    }

    /// The metrics of the broker this store belongs to (see
    /// [`crate::metrics`]).
    pub fn metrics(&self) -> &crate::metrics::BrokerMetrics {
        &self.inner.metrics
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

    /// Runs `f` on the writer's transaction, in a savepoint, and returns its
    /// value after the commit: a caller told "done" holds a committed fact.
    /// If `f` fails, nothing it wrote stays and the rest of the batch goes on.
    /// `f` runs on the writer thread: it must not block on anything but SQLite.
    async fn exec<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.submit(|reply| WriteOp::Exec(Box::new(Exec { f, reply })))
            .await
    }

    /// As [`Store::exec`], for a write of group `num`'s facts by its
    /// owner: the transaction first checks this broker still holds the
    /// group's lease at its epoch ([`leases::check_fence`]).
    async fn exec_fenced<T: Send + 'static>(
        &self,
        num: i64,
        f: impl FnOnce(&Db) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let fences = self.fences().clone();
        self.exec(move |c| {
            leases::check_fence(c, &fences, num)?;
            f(c)
        })
        .await
    }

    /// Makes the writer's connection refuse (`on`) or take writes again, as
    /// a read-only file system does (SQLite's `query_only`; PostgreSQL's
    /// read-only transactions).
    #[cfg(test)]
    pub(crate) async fn refuse_writes_for_test(&self, on: bool) {
        self.exec(move |c| {
            match c.sqlite() {
                Some(c) => c.pragma_update(None, "query_only", on)?,
                // Read-only from the next transaction on, as a standby is.
                None => c.execute_batch(if on {
                    "SET default_transaction_read_only = on"
                } else {
                    "SET default_transaction_read_only = off"
                })?,
            }
            Ok(())
        })
        .await
        .expect("query_only");
    }

    /// Runs a read on the read-only connection (committed data only), on the
    /// blocking pool. For the doors of this module: every other module reads
    /// through their typed methods.
    pub(super) async fn read_with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db) -> Result<T, StoreError> + Send + 'static,
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
        f: impl FnOnce(&Db) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        match &self.inner.reads {
            Reads::Local(_) => {
                let inner = self.inner.clone();
                tokio::task::spawn_blocking(move || {
                    let Reads::Local(reader) = &inner.reads else {
                        return Err(StoreError::Closed);
                    };
                    let conn = reader
                        .lock()
                        .map_err(|_| StoreError::Corrupt("reader lock poisoned".into()))?;
                    f(&conn)
                })
                .await
                .map_err(|e| StoreError::Corrupt(format!("read task failed: {e}")))?
            }
            Reads::Thread(jobs) => {
                let (reply, answer) = oneshot::channel();
                let job: ReadJob = Box::new(move |db| {
                    let _ = reply.send(db.and_then(f));
                });
                jobs.send(job).map_err(|_| StoreError::Closed)?;
                answer.await.map_err(|_| StoreError::Closed)?
            }
        }
    }
}

/// Where the PostgreSQL store is: the connection settings, and how they are
/// shown (without a password).
#[derive(Clone)]
struct PgSource {
    config: postgres::Config,
    shown: String,
    /// TLS with the configured CA; `None`: plain connections.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl PgSource {
    fn parse(url: &str, ca_cert: Option<&Path>) -> Result<PgSource, StoreError> {
        let mut config: postgres::Config = url.parse().map_err(|e| StoreError::Open {
            path: "the [store] url".into(),
            message: format!("not a PostgreSQL connection string: {e}"),
        })?;
        // A server gone from the network without a reset (its host down, a
        // failover that moved its address) would otherwise hold a
        // connection attempt for minutes and a write until TCP gives up
        // (about a quarter of an hour): the writer thread waits all that
        // time instead of failing the writes and connecting again. The url
        // may set other values.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(PG_CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(PG_TCP_USER_TIMEOUT);
        }
        let tls = match ca_cert {
            Some(path) => Some(tls_connector(path)?),
            None if config.get_ssl_mode() == postgres::config::SslMode::Require => {
                return Err(StoreError::Open {
                    path: "the [store] url".into(),
                    message: "sslmode=require needs [store] ca_cert: the CA (PEM) that signed \
                              the server's certificate"
                        .into(),
                })
            }
            None => None,
        };
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                postgres::config::Host::Tcp(name) => name.clone(),
                postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let shown = format!(
            "{} on {}",
            config.get_dbname().unwrap_or("(default)"),
            if hosts.is_empty() {
                "localhost".to_owned()
            } else {
                hosts.join(",")
            }
        );
        Ok(PgSource { config, shown, tls })
    }

    fn connect(&self) -> Result<postgres::Client, StoreError> {
        let connected = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(postgres::NoTls),
        };
        connected.map_err(|e| StoreError::Unreachable {
            database: self.shown.clone(),
            detail: sql::pg_detail(&e),
        })
    }
}

/// TLS to PostgreSQL trusting only the CA in `path` (PEM).
fn tls_connector(path: &Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls_pki_types::pem::PemObject;
    let err = |message: String| StoreError::Open {
        path: path.display().to_string(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| err(format!("read the PostgreSQL CA certificate: {e}")))?;
    for cert in certs {
        let cert = cert.map_err(|e| err(format!("read the PostgreSQL CA certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| err(format!("use the PostgreSQL CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(err("no certificate in the PostgreSQL CA file".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(format!("TLS settings: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Longest wait for a connection to PostgreSQL to be made, unless the url
/// sets `connect_timeout`.
const PG_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest time data sent to PostgreSQL may stay unacknowledged before the
/// connection counts as broken (TCP only), unless the url sets
/// `tcp_user_timeout` (in seconds).
const PG_TCP_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How the store reads committed data.
enum Reads {
    /// SQLite: a read-only connection, used on tokio's blocking pool.
    Local(Mutex<Db>),
    /// PostgreSQL: a thread of its own with its connection, fed reads.
    Thread(std::sync::mpsc::Sender<ReadJob>),
}

/// A read for the reader thread: it is given the connection, or why there
/// is none.
type ReadJob = Box<dyn FnOnce(Result<&Db, StoreError>) + Send>;

/// Starts the PostgreSQL reader thread. It connects on its first read and
/// again whenever the connection broke; it ends with the store.
fn spawn_reader(source: PgSource) -> Result<Reads, StoreError> {
    let (jobs, queue) = std::sync::mpsc::channel::<ReadJob>();
    let shown = source.shown.clone();
    std::thread::Builder::new()
        .name("ferry-store-reader".into())
        .spawn(move || {
            let mut conn: Option<Db> = None;
            for job in queue {
                if conn.as_ref().is_none_or(Db::is_broken) {
                    conn = match source.connect() {
                        Ok(client) => {
                            Some(Db::Postgres(sql::PgConn::new(client, source.shown.clone())))
                        }
                        Err(e) => {
                            job(Err(e));
                            continue;
                        }
                    };
                }
                match &conn {
                    Some(db) => job(Ok(db)),
                    None => job(Err(StoreError::Closed)),
                }
            }
        })
        .map_err(|e| StoreError::Open {
            path: shown,
            message: format!("spawn reader thread: {e}"),
        })?;
    Ok(Reads::Thread(jobs))
}

#[cfg(test)]
mod source_tests {
    use super::*;

    #[test]
    fn a_connection_gives_up_on_a_silent_server_unless_the_url_says_otherwise() {
        let source = PgSource::parse("host=db.example.net dbname=ferry user=ferry", None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            source.config.get_connect_timeout(),
            Some(&PG_CONNECT_TIMEOUT)
        );
        assert_eq!(
            source.config.get_tcp_user_timeout(),
            Some(&PG_TCP_USER_TIMEOUT)
        );
        assert_eq!(source.shown, "ferry on db.example.net");
        let source = PgSource::parse(
            "host=a,b dbname=ferry connect_timeout=3 tcp_user_timeout=7 \
             target_session_attrs=read-write",
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            source.config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        assert_eq!(
            source.config.get_tcp_user_timeout(),
            Some(&std::time::Duration::from_secs(7))
        );
        assert_eq!(source.shown, "ferry on a,b");
    }
}
