//! What an operator meets on the first day, in one process: agents that
//! connect before their group exists, retained sessions across restarts,
//! hosts that cannot disconnect, and hosts that go away for good.
//!
//! Every wait is on a signal (an agent's sync) or a bounded series of admin
//! requests; the groups' clock is moved by hand.

use anyhow::Context;
use ferry_agent::local::LocalClient;
use ferry_common::admin::{BillingSpec, GroupSpec, LiveGroupView, PolicySpec, SessionType};
use ferry_common::{SessionId, UserId};
use ferry_tests::admin::{agent_of, events, of_kind, publish, wait_live};
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
    c.session_start(sid(session), uid("alice"))
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
