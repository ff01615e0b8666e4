//! The store's tests: the agent event path (duplicates, gaps, reconciling
//! a reconnect, reused ids), group commit and its failure handling,
//! migrations, and a crash in the middle of a batch.

use ferry_common::wire::{EndReason, HostFacts, SequencedEvent, SessionEvent};
use ferry_common::{ResourceId, SessionId, UnixMillis};
use rusqlite::Connection;

use super::migrations::MIGRATIONS;
use super::sql::args;
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

/// The store of the suite's backend (see `testing`).
fn open(dir: &Path) -> Store {
    testing::open_for_test(dir)
}

/// A SQLite store, for what only SQLite has (pages, pragmas, its file).
fn open_sqlite(dir: &Path) -> Store {
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
    let store = open_sqlite(tmp.path());
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
                args![],
            )?;
            Ok(c.sqlite().map(|c| c.last_insert_rowid()).unwrap_or(0))
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
            args![],
        )?;
        Err::<(), _>(StoreError::Corrupt("refused half way".into()))
    });
    let good = store.exec(|c| {
        c.execute(
            "INSERT INTO users (id, email, mobile, created_at, updated_at)
             VALUES ('u2', 'e', 'm', 1, 1)",
            args![],
        )?;
        Ok(())
    });
    let (bad, good) = tokio::join!(bad, good);
    assert!(bad.is_err());
    good.expect("the other write commits");
    let users: Vec<String> = store
        .read_with(|c| {
            let mut stmt = c.prepare("SELECT id FROM users ORDER BY id")?;
            let rows = stmt.query_map(args![], |r| r.get::<String>(0))?;
            rows.collect::<Result<_, _>>()
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
                ..StoreOptions::default()
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
            ..StoreOptions::default()
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

/// Caps the database at `pages` pages on the writer's connection: past it
/// SQLite answers SQLITE_FULL, as on a full disk.
async fn cap_pages(store: &Store, pages: i64) {
    store
        .exec(move |c| {
            c.query_row(&format!("PRAGMA max_page_count = {pages}"), args![], |_| {
                Ok(())
            })?;
            Ok(())
        })
        .await
        .expect("max_page_count");
}

#[tokio::test]
async fn a_full_disk_fails_writes_clearly_and_the_writer_records_again_when_it_has_room() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = open_sqlite(tmp.path());
    let r = rid("h1");
    store
        .record_events(&r, 7, vec![started(1, "s1")], UnixMillis(1))
        .await
        .expect("record");
    let pages: i64 = store
        .exec(|c| c.query_row("PRAGMA page_count", args![], |r| r.get(0)))
        .await
        .expect("page_count");
    cap_pages(&store, pages).await;

    // Enough events that the database must grow, from two spools in one
    // batch, and an admin write beside them.
    let many = |first: u64| -> Vec<SequencedEvent> {
        (first..first + 400)
            .map(|seq| started(seq, &format!("s{seq}-{}", "x".repeat(100))))
            .collect()
    };
    let r2 = rid("h2");
    let (a, b, admin) = tokio::join!(
        store.record_events(&r, 7, many(2), UnixMillis(2)),
        store.record_events(&r2, 8, many(1), UnixMillis(2)),
        store.exec(|c| {
            c.execute(
                "INSERT INTO users (id, email, mobile, created_at, updated_at)
                 VALUES ('u1', 'e', 'm', 1, 1)",
                args![],
            )?;
            Ok(())
        }),
    );
    let dir = tmp.path().display().to_string();
    for e in [a.map(|_| ()), b.map(|_| ())] {
        let e = e.expect_err("nothing past the cap is recorded");
        let text = e.to_string();
        assert!(
            matches!(
                e,
                StoreError::Disk {
                    problem: DiskProblem::Full,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            text.starts_with(&format!("the state directory {dir} is full: ")),
            "{text}"
        );
        assert!(
            text.contains("nothing of this write was recorded"),
            "{text}"
        );
    }
    // The admin write is small enough to fit, or refused the same way.
    if let Err(e) = &admin {
        assert!(matches!(e, StoreError::Disk { .. }), "{e:?}");
    }
    assert_eq!(store.counts().await.expect("counts").events_recorded, 1);

    // Room again: the same writer records, each event once.
    cap_pages(&store, 1 << 30).await;
    let out = store
        .record_events(&r, 7, many(2), UnixMillis(3))
        .await
        .expect("recorded once the disk has room");
    assert_eq!((out.recorded, out.duplicates), (400, 0));
    let again = store
        .record_events(&r, 7, many(2), UnixMillis(4))
        .await
        .expect("replayed");
    assert_eq!((again.recorded, again.duplicates), (0, 400));
    assert_eq!(store.counts().await.expect("counts").events_recorded, 401);
}

#[tokio::test]
async fn a_read_only_store_fails_writes_clearly_and_records_again_when_writable() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = open_sqlite(tmp.path());
    let r = rid("h1");
    let query_only = |on: bool| {
        store.exec(move |c| {
            if let Some(c) = c.sqlite() {
                c.pragma_update(None, "query_only", on)?;
            }
            Ok(())
        })
    };
    // SQLite answers SQLITE_READONLY, as on a file system remounted read-only.
    query_only(true).await.expect("query_only");
    let e = store
        .record_events(&r, 7, vec![started(1, "s1")], UnixMillis(1))
        .await
        .expect_err("nothing is recorded read-only");
    let text = e.to_string();
    assert!(
        matches!(
            e,
            StoreError::Disk {
                problem: DiskProblem::ReadOnly,
                ..
            }
        ),
        "{e:?}"
    );
    let dir = tmp.path().display().to_string();
    assert!(
        text.starts_with(&format!("the state directory {dir} is read-only: ")),
        "{text}"
    );
    assert!(text.contains("remount it read-write"), "{text}");
    query_only(false).await.expect("writable");
    let out = store
        .record_events(&r, 7, vec![started(1, "s1")], UnixMillis(2))
        .await
        .expect("recorded once writable");
    assert_eq!((out.recorded, out.duplicates), (1, 0));
    assert_eq!(store.counts().await.expect("counts").events_recorded, 1);
}

/// A cluster of its own (it moves to TLS on a TCP port); `None` when
/// PostgreSQL is not installed and CI does not require it.
fn own_postgres() -> Option<ferry_process::pg_cluster::PgCluster> {
    use ferry_process::pg_cluster::{required, PgCluster, PgClusterError};
    match PgCluster::start() {
        Ok(c) => Some(c),
        Err(e @ PgClusterError::NotInstalled { .. }) if !required() => {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("start PostgreSQL: {e}"),
    }
}

#[tokio::test]
async fn postgres_over_tls_checks_the_servers_certificate() {
    let Some(cluster) = own_postgres() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let (pki, other) = (tmp.path().join("pki"), tmp.path().join("other"));
    crate::pki::init(&pki, &["127.0.0.1".to_owned()]).expect("pki");
    crate::pki::init(&other, &["127.0.0.1".to_owned()]).expect("other pki");
    let read = |p: &Path| std::fs::read_to_string(p).expect("read");
    let port = cluster
        .serve_tls(
            &read(&pki.join("broker.pem")),
            &read(&pki.join("broker-key.pem")),
        )
        .expect("serve TLS");
    cluster.create_database("tls").expect("database");
    let url = format!("host=127.0.0.1 port={port} user=ferry dbname=tls sslmode=require");

    let store = Store::open_postgres_tls(&url, Some(&pki.join("ca.pem")), StoreOptions::default())
        .expect("open over TLS");
    store
        .record_events(&rid("h1"), 7, vec![started(1, "s1")], UnixMillis(1))
        .await
        .expect("record");
    let ssl: bool = store
        .read_with(|c| {
            c.query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                args![],
            )
        })
        .await
        .expect("ssl");
    assert!(ssl, "the connection is encrypted");
    store.close().await;

    // A server whose certificate another CA signed is not trusted.
    let Err(e) =
        Store::open_postgres_tls(&url, Some(&other.join("ca.pem")), StoreOptions::default())
    else {
        panic!("a server of another CA was trusted");
    };
    assert!(
        matches!(e, StoreError::Unreachable { .. }) && e.to_string().contains("certificate"),
        "{e}"
    );
    // TLS asked for without a CA to check the server with: refused at once.
    let Err(e) = Store::open_postgres(&url, StoreOptions::default()) else {
        panic!("sslmode=require without ca_cert was accepted");
    };
    assert!(e.to_string().contains("ca_cert"), "{e}");
}

/// Every table and column of a store, by name (SQLite's implicit `rowid`,
/// which PostgreSQL's schema spells out, and the migrations' own table
/// left out).
async fn schema_of(store: &Store) -> std::collections::BTreeMap<String, Vec<String>> {
    store
        .read_with(|c| {
            let rows: Vec<(String, String)> = match c.sqlite() {
                Some(_) => c.query(
                    "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
                     WHERE m.type = 'table' ORDER BY m.name, p.name",
                    args![],
                )?,
                None => c.query(
                    "SELECT table_name, column_name FROM information_schema.columns
                     WHERE table_schema = 'public' AND table_name != 'ferry_schema'
                     ORDER BY table_name, column_name",
                    args![],
                )?,
            };
            let mut out = std::collections::BTreeMap::<String, Vec<String>>::new();
            for (table, column) in rows {
                if column != "rowid" {
                    out.entry(table).or_default().push(column);
                }
            }
            Ok(out)
        })
        .await
        .expect("schema")
}

#[tokio::test]
async fn both_backends_have_the_same_tables_and_columns() {
    let Ok(cluster) = ferry_process::pg_cluster::shared() else {
        assert!(
            !ferry_process::pg_cluster::required(),
            "PostgreSQL is required under CI"
        );
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let sqlite = open_sqlite(tmp.path());
    let url = cluster
        .create_database(&format!("schema_{}", std::process::id()))
        .expect("database");
    let postgres = Store::open_postgres(&url, StoreOptions::default()).expect("postgres");
    let (a, b) = (schema_of(&sqlite).await, schema_of(&postgres).await);
    assert!(!a.is_empty());
    assert_eq!(
        a, b,
        "append each migration to both lists, in both dialects"
    );
    sqlite.close().await;
    postgres.close().await;
}
