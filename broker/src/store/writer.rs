//! The writer thread: group commit of every queued write in one
//! transaction, each answered only after the commit.
//!
//! Every write carries its own typed reply channel (`Register`, `Record`,
//! or an `Exec` closure of any answer type), so the writer answers each
//! caller with its own type, never a cast. It prepares nothing twice: every
//! statement of the event path is cached, and a spool's `last_seq` is read
//! once per batch. Consecutive records of a batch share one savepoint; if one
//! fails, that run is rolled back and replayed record by record, each in its
//! own savepoint, so a batch answers and writes exactly what one-by-one
//! recording would. A transaction SQLite rolls back in the middle of a batch
//! (an I/O error, a full disk) fails the rest of that batch: nothing commits
//! one by one behind it. A write refused by the disk (full, read-only,
//! failing) is answered [`StoreError::Disk`], naming the state directory,
//! and never as done; the thread goes on, and the next batch commits once
//! the disk takes writes again. Stores are created with 1 KiB pages; the WAL
//! checkpoints every 40,000 pages and is cut back to 64 MiB (see
//! `Store::open`).

use std::collections::HashMap;
use std::path::Path;

use ferry_common::wire::SequencedEvent;
use ferry_common::{ResourceId, UnixMillis};
use tokio::sync::{mpsc, oneshot};

use super::sessions::{apply_record, apply_register, RecordOutcome, Registered, Registration};
use super::sql::Db;
use super::{spool_key, DiskProblem, Store, StoreError};

impl Store {
    // The two writes with their own path through the writer (a registration;
    // a spool's events, batched across agents in one commit).

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
}

pub(super) enum WriteOp {
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
pub(super) trait ExecWrite: Send {
    /// Applies the write in a savepoint of the open transaction; returns its
    /// answer, delivered once the transaction's fate is known.
    fn apply(self: Box<Self>, c: &Db) -> Box<dyn Deliver>;
    /// Answers without applying (the transaction could not take it).
    fn fail(self: Box<Self>, why: StoreError);
}

/// An applied write's answer, waiting for the commit.
pub(super) trait Deliver: Send {
    /// Hands the answer over; if the commit failed, even a write that applied
    /// cleanly is reported failed (nothing of it is on disk).
    fn deliver(self: Box<Self>, verdict: &Verdict<'_>);
    /// The write's own error, if it failed.
    fn error(&self) -> Option<&StoreError>;
}

/// How a batch's transaction ended, to answer its writes with.
pub(super) struct Verdict<'a> {
    /// The state directory, named when the disk refused a write.
    dir: &'a Path,
    /// Why the commit failed (nothing of the batch is stored), if it did.
    failed: Option<Failure>,
}

impl Verdict<'_> {
    /// A write's answer: its own result if the batch committed (a disk
    /// error said as such), else the commit's failure.
    fn answer<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match &self.failed {
            None => result.map_err(|e| e.on_disk(self.dir)),
            Some(f) => Err(f.error(self.dir)),
        }
    }
}

/// Why a batch did not commit, kept to answer each of its writes.
#[derive(Clone, Debug)]
struct Failure {
    /// SQLite's message.
    detail: String,
    /// The disk's part in it, from SQLite's code or else the file system.
    problem: Option<DiskProblem>,
    /// The database server that could not be reached, when that is why.
    database: Option<String>,
}

impl Failure {
    fn of(e: &StoreError, dir: &Path) -> Failure {
        let problem = match e {
            StoreError::Sqlite(e) => DiskProblem::of_sqlite(e),
            StoreError::Disk { problem, .. } => Some(*problem),
            _ => None,
        };
        Failure {
            detail: match e {
                StoreError::Disk { detail, .. } | StoreError::Unreachable { detail, .. } => {
                    detail.clone()
                }
                other => other.to_string(),
            },
            problem: problem.or_else(|| DiskProblem::of_dir(dir)),
            database: match e {
                StoreError::Unreachable { database, .. } => Some(database.clone()),
                _ => None,
            },
        }
    }

    /// A write's error that made SQLite roll the whole transaction back.
    fn of_write(e: &StoreError, dir: &Path) -> Failure {
        Failure::of(e, dir)
    }

    /// SQLite rolled the transaction back in the middle of the batch: the
    /// error of the write that failed then, as far as it is known.
    fn rolled_back(applied: &[Applied], run: &mut RecordRun, dir: &Path) -> Failure {
        if let Some(e) = run.lost.take() {
            return Failure::of_write(&e, dir);
        }
        let last = match applied.last() {
            Some(Applied::Register(_, Err(e)) | Applied::Record(_, Err(e))) => Some(e),
            Some(Applied::Exec(done)) => done.error(),
            _ => None,
        };
        match last {
            Some(e) => Failure::of_write(e, dir),
            None => Failure {
                detail: "the store transaction was rolled back by a failed write of the same \
                         commit"
                    .into(),
                problem: DiskProblem::of_dir(dir),
                database: None,
            },
        }
    }

    fn error(&self, dir: &Path) -> StoreError {
        if let Some(database) = &self.database {
            return StoreError::Unreachable {
                database: database.clone(),
                detail: self.detail.clone(),
            };
        }
        match self.problem {
            Some(problem) => StoreError::Disk {
                dir: dir.to_owned(),
                problem,
                detail: self.detail.clone(),
            },
            None => StoreError::Commit(self.detail.clone()),
        }
    }
}

/// One [`Store::exec`] write and its caller's reply channel.
pub(super) struct Exec<T, F> {
    pub(super) f: F,
    pub(super) reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> ExecWrite for Exec<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Db) -> Result<T, StoreError> + Send,
{
    fn apply(self: Box<Self>, c: &Db) -> Box<dyn Deliver> {
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
    fn deliver(self: Box<Self>, verdict: &Verdict<'_>) {
        let _ = self.reply.send(verdict.answer(self.result));
    }

    fn error(&self) -> Option<&StoreError> {
        self.result.as_ref().err()
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
    fn answer(self, verdict: &Verdict<'_>) {
        match self {
            Applied::Register(tx, r) => drop(tx.send(verdict.answer(r))),
            Applied::Record(tx, r) => drop(tx.send(verdict.answer(r))),
            Applied::Exec(done) => done.deliver(verdict),
        }
    }
}

/// The writer thread's loop; `dir` (the state directory) is named in the
/// answers of writes its disk refused.
pub(super) fn writer_loop(
    conn: Db,
    rx: mpsc::Receiver<WriteOp>,
    max_batch: usize,
    dir: std::path::PathBuf,
    metrics: crate::metrics::BrokerMetrics,
) {
    run_writer(conn, rx, max_batch, dir, metrics, None)
}

/// The writer thread's loop on a database server (PostgreSQL): when the
/// connection broke, it connects again with `reopen` before the next batch,
/// and answers that batch's writes with the error when it cannot. No
/// state directory: a server's disk is the server's to report.
pub(super) fn writer_loop_reconnecting(
    conn: Db,
    rx: mpsc::Receiver<WriteOp>,
    max_batch: usize,
    metrics: crate::metrics::BrokerMetrics,
    reopen: impl FnMut() -> Result<Db, StoreError>,
) {
    run_writer(
        conn,
        rx,
        max_batch,
        std::path::PathBuf::new(),
        metrics,
        Some(Box::new(reopen)),
    )
}

type Reopen<'a> = Box<dyn FnMut() -> Result<Db, StoreError> + 'a>;

fn run_writer(
    mut conn: Db,
    mut rx: mpsc::Receiver<WriteOp>,
    max_batch: usize,
    dir: std::path::PathBuf,
    metrics: crate::metrics::BrokerMetrics,
    mut reopen: Option<Reopen<'_>>,
) {
    // Statements of the hot path (recording events) are prepared once and
    // reused from this cache; room for all of them and the other writes'.
    if let Some(c) = conn.sqlite() {
        c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    }
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if conn.is_broken() {
            if let Some(reopen) = reopen.as_mut() {
                match reopen() {
                    Ok(db) => {
                        tracing::info!("store connection restored");
                        conn = db;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, writes = batch.len(),
                            "store connection: none of these writes is recorded");
                        let mut close = None;
                        for op in batch.drain(..) {
                            match op {
                                WriteOp::Close { reply } => close = Some(reply),
                                op => fail(op, &e),
                            }
                        }
                        if let Some(close) = close {
                            let _ = close.send(());
                            return;
                        }
                        continue;
                    }
                }
            }
        }
        let (writes, started) = (batch.len(), std::time::Instant::now());
        let close = commit_batch(&mut conn, &mut batch, &dir);
        metrics.store_commit(writes, started.elapsed());
        if let Some(close) = close {
            // Make the database file complete on its own (no WAL to replay).
            if let Some(c) = conn.sqlite() {
                if let Err(e) = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "checkpoint store at close");
                }
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
fn commit_batch(
    conn: &mut Db,
    batch: &mut Vec<WriteOp>,
    dir: &Path,
) -> Option<oneshot::Sender<()>> {
    let mut applied = Vec::with_capacity(batch.len());
    let mut close = None;
    // Deferred (the default) like rusqlite's `transaction()`; a cached
    // statement, so a batch does not parse its BEGIN and COMMIT again.
    if let Err(e) = conn.run_cached("BEGIN") {
        let failure = Failure::of(&e, dir);
        tracing::error!(error = %failure.error(dir), "begin store transaction");
        for op in batch.drain(..) {
            fail(op, &failure.error(dir));
        }
        return None;
    }
    let mut spools = SpoolCache::new();
    let mut run = RecordRun::default();
    // Why SQLite rolled the transaction back, once it did.
    let mut lost: Option<Failure> = None;
    for op in batch.drain(..) {
        if close.is_some() {
            // Dropping the reply makes the caller see `Closed`.
            continue;
        }
        if !matches!(op, WriteOp::Record { .. }) {
            run.finish(conn, &mut spools, &mut applied);
        }
        if !conn.in_transaction() && !matches!(op, WriteOp::Close { .. }) {
            // SQLite rolled the whole transaction back (an I/O error, a full
            // disk): the writes before are lost and those after must not
            // commit one by one. All of them are answered failed.
            let failure = lost.get_or_insert_with(|| Failure::rolled_back(&applied, &mut run, dir));
            fail(op, &failure.error(dir));
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
    let failed = if !conn.in_transaction() {
        // Nothing to commit: SQLite rolled the transaction back.
        Some(lost.unwrap_or_else(|| Failure::rolled_back(&applied, &mut run, dir)))
    } else {
        conn.run_cached("COMMIT")
            .err()
            .map(|e| Failure::of(&e, dir))
    };

    if failed.is_some() && conn.in_transaction() {
        // A failed COMMIT may leave the transaction open: end it, so the
        // next batch starts clean (nothing of this one is kept).
        if let Err(e) = conn.run_cached("ROLLBACK") {
            tracing::error!(error = %e, "roll back a failed store commit");
        }
    }
    if let Some(f) = &failed {
        tracing::error!(error = %f.error(dir), writes = applied.len(),
            "commit store transaction: none of its writes is recorded or acknowledged");
    }
    let verdict = Verdict { dir, failed };
    for a in applied {
        a.answer(&verdict);
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
    /// The error of a record after which SQLite had rolled the whole
    /// transaction back.
    lost: Option<StoreError>,
}

impl RecordRun {
    fn apply(
        &mut self,
        conn: &Db,
        spools: &mut SpoolCache,
        applied: &mut Vec<Applied>,
        rec: PendingRecord,
    ) {
        if !self.open {
            if !conn.in_transaction() {
                return apply_alone(conn, spools, applied, rec);
            }
            if let Err(e) = conn.run_cached("SAVEPOINT ferry_run") {
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
            Err(e) => {
                if !conn.in_transaction() && self.lost.is_none() {
                    self.lost = Some(e);
                }
                // Undo the run (RELEASE after ROLLBACK TO keeps nothing of
                // it), then apply its records and this one alone.
                self.open = false;
                self.spools.clear();
                let undo = if !conn.in_transaction() {
                    // Nothing left to undo: the transaction is gone.
                    Ok(())
                } else {
                    conn.run_cached("ROLLBACK TO ferry_run")
                        .and_then(|()| conn.run_cached("RELEASE ferry_run"))
                };
                if let Err(u) = undo {
                    // The run's writes may be half there: end the whole
                    // transaction so nothing of this batch commits (its
                    // COMMIT then fails and every write is answered failed).
                    tracing::error!(error = %u, "roll back a failed run of records");
                    if conn.in_transaction() {
                        if let Err(e) = conn.run_cached("ROLLBACK") {
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
    fn finish(&mut self, conn: &Db, spools: &mut SpoolCache, applied: &mut Vec<Applied>) {
        if !self.open {
            return;
        }
        self.open = false;
        let release = conn.run_cached("RELEASE ferry_run");
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
fn apply_alone(conn: &Db, spools: &mut SpoolCache, applied: &mut Vec<Applied>, rec: PendingRecord) {
    if !conn.in_transaction() {
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

/// Answers a write that was not applied with `why` (an error of the batch,
/// copied for each write).
fn fail(op: WriteOp, why: &StoreError) {
    let copy = || match why {
        StoreError::Disk {
            dir,
            problem,
            detail,
        } => StoreError::Disk {
            dir: dir.clone(),
            problem: *problem,
            detail: detail.clone(),
        },
        StoreError::Unreachable { database, detail } => StoreError::Unreachable {
            database: database.clone(),
            detail: detail.clone(),
        },
        other => StoreError::Commit(other.to_string()),
    };
    match op {
        WriteOp::Register { reply, .. } => drop(reply.send(Err(copy()))),
        WriteOp::Record { reply, .. } => drop(reply.send(Err(copy()))),
        WriteOp::Close { reply } => drop(reply.send(())),
        WriteOp::Exec(write) => write.fail(copy()),
    }
}

/// Runs one write in a savepoint so a failing write leaves no partial trace
/// and does not spoil the other writes of its batch. Savepoints nest by
/// name, so one name serves every write; the statements are cached.
pub(super) fn in_savepoint<T>(
    c: &Db,
    f: impl FnOnce(&Db) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    c.run_cached("SAVEPOINT ferry_write")?;
    match f(c) {
        Ok(v) => {
            c.run_cached("RELEASE ferry_write")?;
            Ok(v)
        }
        // SQLite rolled the whole transaction back: nothing to undo, and
        // the error says why.
        Err(e) if !c.in_transaction() => Err(e),
        Err(e) => {
            // Undo the write, then drop the savepoint (RELEASE after ROLLBACK
            // TO keeps nothing of it); the batch goes on.
            let undo = c
                .run_cached("ROLLBACK TO ferry_write")
                .and_then(|()| c.run_cached("RELEASE ferry_write"));
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
