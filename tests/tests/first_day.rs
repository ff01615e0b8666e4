//! What an operator meets on the first day, in one process: agents that
//! connect before their group exists, retained sessions across restarts,
//! hosts that cannot disconnect, and hosts that go away for good.
//!
//! Every wait is on a signal (an agent's sync) or a bounded series of admin
//! requests; the groups' clock is moved by hand.

use std::time::Duration;

use anyhow::Context;
use ferry_agent::local::{LocalClient, StartProof};
use ferry_common::admin::{BillingSpec, GroupSpec, LiveGroupView, PolicySpec, SessionType};
use ferry_common::{SessionId, UnixMillis, UserId};
use ferry_tests::admin::{agent_of, events, of_kind, publish, wait_events, wait_live};
use ferry_tests::harness::{init_logging, manual_clock, TestBroker};

fn sid(s: &str) -> SessionId {
    s.parse().expect("session id")
}

fn uid(s: &str) -> UserId {
    s.parse().expect("user id")
}

fn group_spec(name: &str, base: u32) -> GroupSpec {
    GroupSpec {
        name: Some(name.parse().expect("name")),
        region: "cn-hangzhou".into(),
        office_network: "office-net-1".into(),
        spec: "office-4c8g".into(),
        image: "img-1".into(),
        billing: BillingSpec::PayAsYouGo,
        base_resources: base,
        session_type: SessionType::Independent,
        users: vec![],
        policy: PolicySpec {
            concurrent_sessions: Some(2),
            usage_threshold: Some(50),
            scale_out_step: Some(1),
            max_elastic: Some(2),
            max_idle_ms: Some(3_600_000),
            ..PolicySpec::default()
        },
    }
}

/// (resource, state, available, sessions) of each resource of the view.
fn rows(l: &LiveGroupView) -> Vec<(String, String, bool, Vec<String>)> {
    l.resources
        .iter()
        .map(|r| {
            (
                r.resource.to_string(),
                r.state.clone(),
                r.available,
                r.sessions.iter().map(|s| s.to_string()).collect(),
            )
        })
        .collect()
}

async fn start(c: &mut LocalClient, session: &str) -> anyhow::Result<()> {
    c.session_start(sid(session), uid("alice"), StartProof::Trusted)
        .await
        .with_context(|| format!("start {session}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_connected_before_their_group_is_published_join_it_at_once() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let (_clock, config) = manual_clock();
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;

    // Two agents name a group nobody has published yet; one already has a
    // session on its host.
    let mut b1 = agent_of(&broker, "b1", "design").await?;
    let mut b2 = agent_of(&broker, "b2", "design").await?;
    let mut c1 = b1.client().await?;
    start(&mut c1, "s1").await?;
    b1.wait_synced().await?;

    // Published afterwards: both take the base slots without reconnecting,
    // and the session already open counts.
    publish(&broker, group_spec("design", 2)).await?;
    let l = wait_live(&broker, "design", |l| l.capacity == 4).await?;
    assert_eq!(
        rows(&l),
        [
            ("b1".into(), "ready".into(), true, vec!["s1".into()]),
            ("b2".into(), "ready".into(), true, vec![]),
        ]
    );
    assert_eq!(l.demand, 1);

    // Sessions after the publish reach the running group as usual.
    let mut c2 = b2.client().await?;
    start(&mut c2, "s2").await?;
    b2.wait_synced().await?;
    let l = wait_live(&broker, "design", |l| l.demand == 2).await?;
    assert_eq!(l.resources[1].sessions, [sid("s2")]);

    b1.stop().await?;
    b2.stop().await?;
    broker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elastic_host_already_connected_takes_its_slot_when_the_scale_out_asks_for_it(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let (_clock, config) = manual_clock();
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    publish(&broker, group_spec("burst", 1)).await?;
    let mut b1 = agent_of(&broker, "b1", "burst").await?;

    // The elastic host is up before the group asks for it: flagged, not used.
    let mut e1 = agent_of(&broker, "burst-e1", "burst").await?;
    // (The test machine may be below the spec: that flag is another one.)
    let e1_flag = |l: &LiveGroupView| l.flagged.iter().find(|f| f.contains("burst-e1")).cloned();
    let l = wait_live(&broker, "burst", |l| e1_flag(l).is_some()).await?;
    assert!(
        e1_flag(&l).is_some_and(|f| f.contains("not used")),
        "{:?}",
        l.flagged
    );
    assert_eq!(l.resources.len(), 1);

    // Two sessions on one base slot of two: 2 x 100 > 50 x 2, a scale-out
    // asks for burst-e1, which is connected: ready at once, flag lifted.
    let mut c = b1.client().await?;
    start(&mut c, "s1").await?;
    start(&mut c, "s2").await?;
    b1.wait_synced().await?;
    let l = wait_live(&broker, "burst", |l| l.resources.len() == 2).await?;
    assert_eq!(
        rows(&l)[1],
        ("burst-e1".into(), "ready".into(), true, vec![])
    );
    assert!(
        !e1_flag(&l).is_some_and(|f| f.contains("not used")),
        "{:?}",
        l.flagged
    );
    let evs = events(&broker, "burst").await?;
    assert_eq!(of_kind(&evs, "created").len(), 1, "{evs:#?}");
    assert_eq!(of_kind(&evs, "flag-lifted").len(), 1, "{evs:#?}");

    e1.stop().await?;
    b1.stop().await?;
    broker.stop().await?;
    Ok(())
}

/// The session `s` as the broker recorded it.
async fn record(broker: &TestBroker, s: &str) -> anyhow::Result<ferry_common::admin::SessionInfo> {
    broker
        .sessions(true)
        .await?
        .into_iter()
        .find(|r| r.session.as_str() == s)
        .with_context(|| format!("session {s} recorded"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_session_keeps_its_deadline_across_a_broker_restart_and_always_ends(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let (clock, config) = manual_clock();
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    publish(&broker, group_spec("keep", 1)).await?;
    // The host has no disconnect hook: it cannot end a session when asked.
    let h1 = agent_of(&broker, "h1", "keep").await?;
    let mut c = h1.client().await?;
    start(&mut c, "s1").await?;
    h1.wait_synced().await?;
    let disconnected_at = clock.now();
    c.session_presence(sid("s1"), true).await?;
    wait_events(&broker, "keep", "session-disconnected", 1).await?;

    // Five minutes later the broker restarts; the agent comes back and says
    // again that s1 is disconnected. The retention runs from the disconnect.
    clock.advance(Duration::from_secs(300));
    broker.restart().await?;
    h1.wait_synced().await?;
    wait_live(&broker, "keep", |l| l.demand == 1).await?;

    // Fifteen minutes after the disconnect it ends, once, although the host
    // cannot close it: its slot is free and its record ends at the deadline.
    clock.advance(Duration::from_secs(600));
    wait_events(&broker, "keep", "retention-ended", 1).await?;
    let deadline = UnixMillis(disconnected_at.0 + 900_000);
    let r = record(&broker, "s1").await?;
    assert_eq!(r.ended_at, Some(deadline), "{r:?}");
    assert_eq!(r.end_reason.as_deref(), Some("disconnect retention ended"));
    wait_live(&broker, "keep", |l| l.demand == 0).await?;
    let evs = wait_events(&broker, "keep", "disconnect-failed", 1).await?;
    assert!(
        of_kind(&evs, "disconnect-failed")[0]
            .message
            .contains("ended for the group"),
        "{evs:#?}"
    );
    clock.advance(Duration::from_secs(1800));
    broker.restart().await?;
    h1.wait_synced().await?;
    assert_eq!(
        of_kind(&events(&broker, "keep").await?, "retention-ended").len(),
        1
    );
    // The host still has it open (no hook): it does not count again.
    assert_eq!(
        wait_live(&broker, "keep", |l| l.demand == 0).await?.demand,
        0
    );
    assert_eq!(record(&broker, "s1").await?.ended_at, Some(deadline));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_stays_away_has_its_sessions_ended_and_its_last_seen_kept() -> anyhow::Result<()>
{
    init_logging();
    let dir = tempfile::tempdir()?;
    let (clock, mut config) = manual_clock();
    config.host_gone_after = Duration::from_secs(600);
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    publish(&broker, group_spec("away", 2)).await?;
    let mut h1 = agent_of(&broker, "h1", "away").await?;
    let mut h2 = agent_of(&broker, "h2", "away").await?;
    let mut c1 = h1.client().await?;
    start(&mut c1, "s1").await?;
    h1.wait_synced().await?;
    let mut c2 = h2.client().await?;
    start(&mut c2, "s2").await?;
    h2.wait_synced().await?;

    // h1 goes away: recorded, unavailable at once, its session still counts.
    let left_at = clock.now();
    h1.stop().await?;
    let evs = wait_events(&broker, "away", "left", 1).await?;
    let left = &of_kind(&evs, "left")[0].message;
    assert!(
        left.contains("h1") && left.contains("1 open session(s) end at"),
        "{left}"
    );
    let l = wait_live(&broker, "away", |l| !l.resources[0].available).await?;
    assert_eq!(l.demand, 2);
    let h1_row = broker
        .resources()
        .await?
        .into_iter()
        .find(|r| r.resource.as_str() == "h1")
        .context("h1 listed")?;
    assert!(!h1_row.connected);
    assert!(
        h1_row.last_health_at.is_some(),
        "the last-seen time is kept"
    );

    // h2 goes too, and the broker restarts meanwhile: both are counted from
    // the restart (hosts get the time to come back to a restarted broker),
    // their sessions end when they were last heard of.
    h2.stop().await?;
    wait_events(&broker, "away", "left", 2).await?;
    clock.advance(Duration::from_secs(300));
    broker.restart().await?;
    // The restarted group is up (its actor answers after it reloaded).
    wait_live(&broker, "away", |_| true).await?;
    clock.advance(Duration::from_secs(599));
    assert!(of_kind(&events(&broker, "away").await?, "host-gone").is_empty());
    clock.advance(Duration::from_secs(1));
    let evs = wait_events(&broker, "away", "host-gone", 2).await?;
    assert!(
        of_kind(&evs, "host-gone")
            .iter()
            .any(|e| e.message.contains("h1") && e.message.contains("s1")),
        "{evs:#?}"
    );
    // (Never before its start: the test's groups clock and the agent's
    // stamps are different clocks.)
    let r = record(&broker, "s1").await?;
    assert_eq!(r.ended_at, Some(left_at.max(r.started_at)), "{r:?}");
    assert!(
        r.end_reason
            .as_deref()
            .is_some_and(|e| e.starts_with("host gone")),
        "{r:?}"
    );
    assert!(record(&broker, "s2").await?.ended_at.is_some());
    broker.stop().await?;
    Ok(())
}
