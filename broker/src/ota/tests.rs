//! Unit tests of the OTA rules (start window, reschedule and cancel, wave
//! planning) on a real store with a manual clock, and of rollouts driven by
//! the real timer against registry connections answered by the test (what
//! an agent would answer), including a resume from stored results.

use std::sync::Arc;
use std::time::Duration;

use ferry_common::admin::{OtaOfferSpec, OtaScheduleSpec};
use ferry_common::wire::{Command, CommandOutcome, ComponentVersion, Inventory};
use ferry_common::{ResourceId, UnixMillis};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::clock::ManualClock;
use crate::config::GroupsConfig;
use crate::groups::{ActorsParts, GroupActors, GroupService};
use crate::registry::{CommandRequest, Registry};
use crate::rollout::machine::{self as rollout, plan_waves};
use crate::rollout::Settings;
use crate::store::rollouts::{ResultRow, RolloutWrite, ScheduleRow};

const T0: UnixMillis = UnixMillis(1_800_000_000_000);
const DAY: i64 = 86_400_000;
const PATIENCE: Duration = Duration::from_secs(30);

fn rid(s: &str) -> ResourceId {
    s.parse().expect("id")
}

fn row(resource: &str, state: &str) -> ResultRow {
    ResultRow {
        position: 0,
        resource: rid(resource),
        state: state.into(),
        started_at: None,
        finished_at: None,
        detail: None,
    }
}

#[test]
fn the_start_must_be_in_the_future_and_within_7_days() {
    assert!(check_start(UnixMillis(T0.0 - 1), T0).is_err());
    let e = check_start(T0, T0).expect_err("now is not the future");
    assert!(e.contains("not in the future"), "{e}");
    assert!(check_start(UnixMillis(T0.0 + 1), T0).is_ok());
    assert!(check_start(UnixMillis(T0.0 + 7 * DAY), T0).is_ok());
    let e = check_start(UnixMillis(T0.0 + 7 * DAY + 1), T0).expect_err("too far");
    assert!(e.contains("more than 7 days"), "{e}");
    // Said with times for people: whole seconds.
    let e = check_start(UnixMillis(T0.0 - 1_500), UnixMillis(T0.0 + 250)).expect_err("past");
    assert_eq!(
        e,
        "the start 2027-01-15T07:59:58Z is not in the future (now is 2027-01-15T08:00:00Z); \
         a rollout starts in the future, within 7 days"
    );
}

#[test]
fn waves_cover_the_remaining_resources_in_order() {
    let rows: Vec<ResultRow> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|r| row(r, "pending"))
        .collect();
    let names = |w: Vec<Vec<ResourceId>>| -> Vec<Vec<String>> {
        w.into_iter()
            .map(|w| w.into_iter().map(|r| r.to_string()).collect())
            .collect()
    };
    assert_eq!(
        names(plan_waves(&rows, 2)),
        vec![vec!["a", "b"], vec!["c", "d"], vec!["e"]]
    );
    assert_eq!(
        names(plan_waves(&rows, 10)),
        vec![vec!["a", "b", "c", "d", "e"]]
    );
    // Resumed: done ones are not redone; an interrupted one goes first.
    let resumed = vec![
        row("a", "done"),
        row("b", "done"),
        row("c", "updating"),
        row("d", "pending"),
        row("e", "pending"),
    ];
    assert_eq!(
        names(plan_waves(&resumed, 2)),
        vec![vec!["c", "d"], vec!["e"]]
    );
    assert!(plan_waves(&[row("a", "done"), row("b", "skipped")], 1).is_empty());
}

#[test]
fn only_a_schedule_that_has_not_started_may_change() {
    let mut s = ScheduleRow {
        id: 1,
        update_id: 1,
        group_num: 1,
        start: UnixMillis(T0.0 + 1_000),
        wave: 1,
        drain_ms: 0,
        state: "scheduled".into(),
        created_at: T0,
        started_at: None,
        finished_at: None,
        detail: None,
    };
    assert!(may_change(&s, T0).is_ok());
    // Its start has come: the timer is starting it.
    assert!(may_change(&s, UnixMillis(T0.0 + 1_000)).is_err());
    for state in ["running", "cancelled", "succeeded", "failed"] {
        s.state = state.into();
        let e = may_change(&s, T0).expect_err(state);
        assert!(e.contains(state), "{e}");
    }
}

#[test]
fn shows_reads_the_component_s_version() {
    let inv = Inventory {
        agent_version: "1.0".into(),
        image_version: "img-2".into(),
        components: vec![ComponentVersion {
            name: "office".into(),
            version: "3.1".into(),
        }],
        last_update: None,
    };
    assert!(rollout::shows(&inv, "agent", "1.0"));
    assert!(!rollout::shows(&inv, "agent", "1.1"));
    assert!(rollout::shows(&inv, "image", "img-2"));
    assert!(rollout::shows(&inv, "office", "3.1"));
    assert!(!rollout::shows(&inv, "office", "3.2"));
    assert!(!rollout::shows(&inv, "viewer", "3.1"));
}

/// A store in a temp dir with one pay-as-you-go group `g` in `status`.
async fn store_with_group(dir: &std::path::Path, status: &str) -> Store {
    let store = crate::store::testing::open_for_test(dir);
    store.insert_group_in_status_for_test(1, "g", status).await;
    store
}

fn offer_spec(version: &str) -> OtaOfferSpec {
    OtaOfferSpec {
        group: "g".parse().expect("name"),
        component: "office".into(),
        version: version.into(),
        package: "/srv/office.deb".into(),
        description: "fixes printing".into(),
    }
}

fn schedule_spec(update: u64, start: UnixMillis) -> OtaScheduleSpec {
    OtaScheduleSpec {
        group: "g".parse().expect("name"),
        update,
        start,
        wave: 2,
        drain_ms: 60_000,
    }
}

#[tokio::test]
async fn schedules_are_refused_outside_the_window_and_change_only_before_they_start() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = store_with_group(dir.path(), "published").await;
    let clock = ManualClock::new(T0);
    let ota = Ota::new(store.clone(), clock.clock());
    let u = ota.offer(offer_spec("3.2")).await.expect("offer");
    assert_eq!(
        (u.component.as_str(), u.version.as_str()),
        ("office", "3.2")
    );
    // Invalid offers are refused with every problem.
    let mut bad = offer_spec("");
    bad.component = "no spaces".into();
    match ota.offer(bad).await {
        Err(OtaError::Invalid(p)) => assert_eq!(p.len(), 2, "{p:?}"),
        other => panic!("{other:?}"),
    }

    for start in [UnixMillis(T0.0 - 1), T0, UnixMillis(T0.0 + 7 * DAY + 1)] {
        match ota.schedule(schedule_spec(u.id, start)).await {
            Err(OtaError::Invalid(_)) => {}
            other => panic!("start {start:?}: {other:?}"),
        }
    }
    match ota
        .schedule(schedule_spec(99, UnixMillis(T0.0 + DAY)))
        .await
    {
        Err(OtaError::NotFound(_)) => {}
        other => panic!("{other:?}"),
    }
    let s = ota
        .schedule(schedule_spec(u.id, UnixMillis(T0.0 + DAY)))
        .await
        .expect("schedule");
    assert_eq!(s.state, "scheduled");
    // One active schedule per group.
    match ota
        .schedule(schedule_spec(u.id, UnixMillis(T0.0 + 2 * DAY)))
        .await
    {
        Err(OtaError::Conflict(m)) => assert!(m.contains("cancel it first"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Reschedule: the same window rules.
    assert!(matches!(
        ota.reschedule(s.id, UnixMillis(T0.0 + 8 * DAY)).await,
        Err(OtaError::Invalid(_))
    ));
    let moved = ota
        .reschedule(s.id, UnixMillis(T0.0 + 2 * DAY))
        .await
        .expect("reschedule");
    assert_eq!(moved.start, UnixMillis(T0.0 + 2 * DAY));
    let cancelled = ota.cancel(s.id).await.expect("cancel");
    assert_eq!(cancelled.state, "cancelled");
    assert!(matches!(ota.cancel(s.id).await, Err(OtaError::Refused(_))));
    assert!(matches!(
        ota.reschedule(s.id, UnixMillis(T0.0 + DAY)).await,
        Err(OtaError::Refused(_))
    ));
    // Cancelled: a new one may be scheduled; past its start it may not change.
    let s2 = ota
        .schedule(schedule_spec(u.id, UnixMillis(T0.0 + 1_000)))
        .await
        .expect("schedule again");
    clock.advance(Duration::from_secs(2));
    assert!(matches!(ota.cancel(s2.id).await, Err(OtaError::Refused(_))));

    let history = ota.history("g".into()).await.expect("history");
    assert_eq!(
        history.iter().map(|s| s.state.as_str()).collect::<Vec<_>>(),
        vec!["cancelled", "scheduled"]
    );
    assert_eq!(ota.list(Some("g".into())).await.expect("list").len(), 1);
    store.close().await;
}

#[tokio::test]
async fn a_group_that_is_not_serving_cannot_schedule() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = store_with_group(dir.path(), "expired").await;
    let ota = Ota::new(store.clone(), ManualClock::new(T0).clock());
    let u = ota.offer(offer_spec("3.2")).await.expect("offer");
    match ota
        .schedule(schedule_spec(u.id, UnixMillis(T0.0 + DAY)))
        .await
    {
        Err(e @ OtaError::NotAllowed(_)) => {
            let m = e.to_string();
            assert!(m.contains("expired") && m.contains("update-failed"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    store.close().await;
}

/// How the test's connection answers `ApplyUpdate`.
#[derive(Clone, Copy)]
enum Hook {
    Succeeds,
    Fails,
}

/// Attaches `resource` to the registry and answers its commands the way an
/// agent with the given update hook does (inventory after a successful
/// update); every command is reported on the returned channel.
fn connect(
    registry: &Arc<Registry>,
    resource: &str,
    conn: u64,
    hook: Hook,
) -> mpsc::Receiver<Command> {
    let (tx, mut rx) = mpsc::channel::<CommandRequest>(8);
    let (seen_tx, seen) = mpsc::channel(64);
    let r = rid(resource);
    registry.attach(
        &r,
        conn,
        None,
        CancellationToken::new(),
        Default::default(),
        tx,
    );
    let registry = registry.clone();
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            let outcome = match (&req.command, hook) {
                (Command::ApplyUpdate { .. }, Hook::Fails) => {
                    CommandOutcome::Failed("update hook exited with status 1".into())
                }
                (
                    Command::ApplyUpdate {
                        component, version, ..
                    },
                    Hook::Succeeds,
                ) => {
                    registry.set_inventory(
                        &r,
                        conn,
                        Inventory {
                            agent_version: "1.0".into(),
                            image_version: "img-1".into(),
                            components: vec![ComponentVersion {
                                name: component.clone(),
                                version: version.clone(),
                            }],
                            last_update: None,
                        },
                    );
                    CommandOutcome::Done
                }
                _ => CommandOutcome::Done,
            };
            let _ = seen_tx.send(req.command.clone()).await;
            let _ = req.reply.send(outcome);
        }
    });
    seen
}

fn kind(c: &Command) -> &'static str {
    match c {
        Command::Drain => "drain",
        Command::Undrain => "undrain",
        Command::WarnSession { .. } => "warn",
        Command::DisconnectSession { .. } => "disconnect",
        Command::ApplyUpdate { .. } => "apply",
        _ => "other",
    }
}

async fn next(rx: &mut mpsc::Receiver<Command>) -> Command {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("a command in time")
        .expect("connection task alive")
}

struct Rig {
    _dir: tempfile::TempDir,
    store: Store,
    clock: ManualClock,
    ota: Ota,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    timer: tokio::task::JoinHandle<()>,
}

/// A store with group `g` (published), a running rollout timer on a manual
/// clock, no group actor (a resumed rollout does not need one).
async fn rig() -> Rig {
    let dir = tempfile::tempdir().expect("tmp");
    let store = store_with_group(dir.path(), "published").await;
    let clock = ManualClock::new(T0);
    let registry = Arc::new(Registry::new());
    let config = GroupsConfig {
        clock: clock.clock(),
        ..Default::default()
    };
    let shutdown = CancellationToken::new();
    let ota = Ota::new(store.clone(), clock.clock());
    let actors = GroupActors::new(ActorsParts {
        store: store.clone(),
        registry: registry.clone(),
        service: GroupService::new(store.clone(), config),
        provisioning: None,
        rollouts: ota.board().clone(),
        tracker: TaskTracker::new(),
        shutdown: shutdown.clone(),
        ownership: crate::cluster::Ownership::everything(),
    });
    let timer = tokio::spawn(crate::rollout::run(
        ota.clone(),
        registry.clone(),
        actors,
        Settings {
            update_timeout: Duration::from_secs(10),
            gone_timeout: Duration::from_millis(200),
            inventory_timeout: Duration::from_secs(10),
            ..Settings::default()
        },
        shutdown.clone(),
    ));
    Rig {
        _dir: dir,
        store,
        clock,
        ota,
        registry,
        shutdown,
        timer,
    }
}

impl Rig {
    /// Writes a running schedule of a new offer with these resource rows,
    /// as a broker that stopped mid-rollout left them.
    async fn running(&self, rows: &[(&str, &str)]) -> u64 {
        let u = self.ota.offer(offer_spec("3.2")).await.expect("offer");
        let s = self
            .ota
            .schedule(schedule_spec(u.id, UnixMillis(T0.0 + 1_000)))
            .await
            .expect("schedule");
        let rows: Vec<(ResourceId, String)> =
            rows.iter().map(|(r, s)| (rid(r), s.to_string())).collect();
        self.store.running_schedule_for_test(s.id, rows, T0).await;
        s.id
    }

    async fn wait_state(&self, id: u64, want: &str) -> OtaScheduleInfo {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let h = self.ota.history("g".into()).await.expect("history");
            if let Some(s) = h.into_iter().find(|s| s.id == id && s.state == want) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "schedule {id} never {want}"
            );
            tokio::task::yield_now().await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.timer)
            .await
            .expect("timer stops")
            .expect("join");
        self.store.close().await;
    }
}

#[tokio::test]
async fn a_resumed_rollout_does_not_redo_done_resources() {
    let rig = rig().await;
    // h1 is done; nothing answers for it, so touching it would fail the
    // rollout (gone_timeout). h2 was interrupted mid-update, h3 is pending.
    let mut h2 = connect(&rig.registry, "h2", 1, Hook::Succeeds);
    let mut h3 = connect(&rig.registry, "h3", 2, Hook::Succeeds);
    let id = rig
        .running(&[("h1", "done"), ("h2", "updating"), ("h3", "pending")])
        .await;
    rig.ota.wake();
    let s = rig.wait_state(id, "succeeded").await;
    for rx in [&mut h2, &mut h3] {
        let mut kinds = Vec::new();
        while kinds.last() != Some(&"undrain") {
            kinds.push(kind(&next(rx).await));
        }
        assert_eq!(kinds, vec!["drain", "apply", "undrain"]);
    }
    assert_eq!(
        s.resources
            .iter()
            .map(|r| (r.resource.as_str(), r.state.as_str()))
            .collect::<Vec<_>>(),
        vec![("h1", "done"), ("h2", "done"), ("h3", "done")]
    );
    rig.stop().await;
}

#[tokio::test]
async fn a_failing_update_stops_the_rollout_and_marks_the_group() {
    let rig = rig().await;
    let mut h1 = connect(&rig.registry, "h1", 1, Hook::Fails);
    let mut h2 = connect(&rig.registry, "h2", 2, Hook::Succeeds);
    // Waves of 2: h1 and h2 together, h3 in a wave that never starts.
    let id = rig
        .running(&[("h1", "pending"), ("h2", "pending"), ("h3", "pending")])
        .await;
    rig.ota.wake();
    let s = rig.wait_state(id, "failed").await;
    let by: Vec<(&str, &str)> = s
        .resources
        .iter()
        .map(|r| (r.resource.as_str(), r.state.as_str()))
        .collect();
    assert_eq!(
        by,
        vec![("h1", "failed"), ("h2", "done"), ("h3", "pending")]
    );
    assert!(
        s.detail.as_deref().is_some_and(|d| d.contains("h1")),
        "{s:?}"
    );
    // h1 stays drained: drain, apply, and no undrain.
    assert_eq!(kind(&next(&mut h1).await), "drain");
    assert_eq!(kind(&next(&mut h1).await), "apply");
    assert!(h1.try_recv().is_err());
    assert_eq!(kind(&next(&mut h2).await), "drain");
    let (group, events) = rig
        .store
        .group_read(|tx| Ok::<_, StoreError>((tx.by_num(1)?, tx.events(1)?)))
        .await
        .expect("read");
    let status = group.expect("group 1").status;
    let events: Vec<String> = events
        .into_iter()
        .filter(|e| e.kind == "ota-failed")
        .map(|e| e.message)
        .collect();
    assert_eq!(status, "update-failed");
    assert_eq!(events.len(), 1);
    assert!(
        events[0].contains("h1") && events[0].contains("update"),
        "{events:?}"
    );
    rig.stop().await;
}

#[tokio::test]
async fn sessions_get_until_the_drain_deadline_on_the_timer() {
    let rig = rig().await;
    let mut h1 = connect(&rig.registry, "h1", 1, Hook::Succeeds);
    // An open session on h1 (as the link records it).
    rig.store.open_session_for_test("h1", "s1").await;
    let u = rig.ota.offer(offer_spec("3.2")).await.expect("offer");
    let s = rig
        .ota
        .schedule(schedule_spec(u.id, UnixMillis(T0.0 + 1_000)))
        .await
        .expect("schedule");
    let id = s.id;
    rig.store
        .record_rollout(vec![RolloutWrite::OtaPlan {
            schedule: id,
            hosts: vec![rid("h1")],
        }])
        .await
        .expect("plan");
    // The start is a timer on the clock.
    rig.clock.advance(Duration::from_secs(1));
    assert_eq!(kind(&next(&mut h1).await), "drain");
    let warned = next(&mut h1).await;
    let Command::WarnSession { deadline, .. } = warned else {
        panic!("{warned:?}");
    };
    // The drain deadline counts from the drain: 60 s.
    assert_eq!(deadline, UnixMillis(T0.0 + 1_000 + 60_000));
    // Only the clock reaching the deadline ends the session.
    rig.clock.advance(Duration::from_secs(30));
    rig.clock.advance(Duration::from_secs(30));
    let ended = next(&mut h1).await;
    assert!(
        matches!(&ended, Command::DisconnectSession { session, .. } if session.as_str() == "s1"),
        "{ended:?}"
    );
    assert_eq!(kind(&next(&mut h1).await), "apply");
    assert_eq!(kind(&next(&mut h1).await), "undrain");
    let s = rig.wait_state(id, "succeeded").await;
    assert!(
        s.resources[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("1 session(s) disconnected")),
        "{s:?}"
    );
    rig.stop().await;
}
