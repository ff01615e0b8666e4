//! Live delivery groups end to end, in one process: a real broker with a
//! manual group clock, real agents naming the group in their `Hello`, and
//! sessions reported through the agents' local sockets.
//!
//! An agent's `wait_synced` returns once the broker acknowledged its events,
//! and the broker acknowledges only after the group's actor applied them and
//! committed its decisions: no sleeps, every wait is on a signal.

use std::time::Duration;

use anyhow::{bail, Context};
use ferry_agent::local::{LocalClient, StartProof};
use ferry_broker::clock::ManualClock;
use ferry_broker::config::GroupsConfig;
use ferry_broker::engine::billing::{billed_seconds, per_second_amount, round_line};
use ferry_broker::groups::hostfit;
use ferry_common::admin::{
    AdminRequestV1, AdminResponseV1, BillingSpec, GroupDetail, GroupSpec, LiveGroupView,
    PolicySpec, SessionType, UsageQuery, UsageReport,
};
use ferry_common::{SessionId, UnixMillis, UserId};
use ferry_tests::admin::{
    agent_of, events, live, of_kind, publish, show, usage, wait_events, wait_live,
};
use ferry_tests::harness::{init_logging, manual_clock, TestAgent, TestBroker};

fn sid(s: &str) -> SessionId {
    s.parse().expect("session id")
}

fn uid(s: &str) -> UserId {
    s.parse().expect("user id")
}

fn group_spec(name: &str) -> GroupSpec {
    GroupSpec {
        name: Some(name.parse().expect("name")),
        region: "cn-hangzhou".into(),
        office_network: "office-net-1".into(),
        spec: "office-4c8g".into(),
        image: "img-1".into(),
        billing: BillingSpec::PayAsYouGo,
        base_resources: 2,
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
async fn agent_reports_drive_the_group_and_the_usage_report_prices_the_recorded_intervals(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    // Whole seconds, so intervals in the store are whole too.
    let (clock, config) = manual_clock();
    let t0 = clock.now();
    let hourly = config.prices["office-4c8g"].hourly;
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;

    publish(&broker, group_spec("live")).await?;

    // Two agents of the group take its two base slots.
    let mut h1 = agent_of(&broker, "h1", "live").await?;
    let mut h2 = agent_of(&broker, "h2", "live").await?;
    let joined = of_kind(&events(&broker, "live").await?, "resource").len();
    assert_eq!(joined, 2);

    // Three sessions on four slots: 3 x 100 > 50 x 4, a scale-out.
    let mut c1 = h1.client().await?;
    let mut c2 = h2.client().await?;
    start(&mut c1, "s1").await?;
    start(&mut c1, "s2").await?;
    h1.wait_synced().await?;
    assert!(of_kind(&events(&broker, "live").await?, "scale_out").is_empty());
    start(&mut c2, "s3").await?;
    h2.wait_synced().await?;
    let evs = events(&broker, "live").await?;
    let scale_out = of_kind(&evs, "scale_out");
    assert_eq!(scale_out.len(), 1, "{evs:?}");
    assert!(
        scale_out[0].message.contains("live-e1")
            && scale_out[0]
                .message
                .contains("demand 3 x 100 > threshold 50 x capacity 4"),
        "{}",
        scale_out[0].message
    );

    // Ten minutes later an agent named for the elastic resource registers.
    clock.advance(Duration::from_secs(600));
    let e1_ready = clock.now();
    let mut e1 = agent_of(&broker, "live-e1", "live").await?;
    let evs = events(&broker, "live").await?;
    let created = of_kind(&evs, "created");
    assert_eq!(created.len(), 1, "{evs:?}");
    assert!(created[0].message.contains("live-e1"));
    assert_eq!(created[0].at, e1_ready);

    // `group show` has the live view: each resource with its state,
    // availability and sessions, and the group's demand against capacity.
    let l = live(&broker, "live").await?;
    assert!(!l.closed);
    assert_eq!((l.demand, l.capacity, l.concurrent_sessions), (3, 6, 2));
    assert_eq!(
        rows(&l),
        [
            (
                "h1".into(),
                "ready".into(),
                true,
                vec!["s1".into(), "s2".into()]
            ),
            ("h2".into(), "ready".into(), true, vec!["s3".into()]),
            ("live-e1".into(), "ready".into(), true, vec![]),
        ]
    );
    assert_eq!(l.resources[2].class, "elastic");
    let json = ferry_broker::render::group_shown_json(&show(&broker, "live").await?.0, Some(&l));
    assert_eq!(json["live"]["usage_percent"], "50.0");
    assert_eq!(json["live"]["resources"][0]["load"], "2/2");
    let table = ferry_broker::render::group_shown_table(&show(&broker, "live").await?.0, Some(&l));
    assert!(
        table.contains("demand 3  capacity 6  usage 50.0%"),
        "{table}"
    );
    assert!(table.contains("live-e1"), "{table}");

    // The usage of the first hour, asked ten minutes in, is billed so far:
    // up to now, never the time still to come. It equals the billing rules
    // applied to the intervals the broker recorded: bases from t0, the
    // elastic one from now, all still running.
    let now = clock.now();
    let to = UnixMillis(t0.0 + 3_600_000);
    let report = usage(&broker, "live", t0, to).await?;
    assert_eq!(report.to, now, "a report so far ends now");
    let UsageReport { groups, .. } = report;
    assert_eq!(groups.len(), 1);
    let g = &groups[0];
    let base_seconds = 2 * billed_seconds(t0, None, now);
    let elastic_seconds = billed_seconds(e1_ready, None, now);
    assert_eq!((g.base_seconds, g.elastic_seconds), (600 * 2, 0));
    assert_eq!(
        (g.base_seconds, g.elastic_seconds),
        (base_seconds, elastic_seconds)
    );
    let base = round_line(per_second_amount(hourly, base_seconds));
    let elastic = round_line(per_second_amount(hourly, elastic_seconds));
    assert_eq!(g.base_payg, base.to_string());
    assert_eq!(g.elastic, elastic.to_string());
    assert_eq!(g.subscription, "0.00");
    assert_eq!(g.total, (base + elastic).to_string());
    // A day in the future bills nothing at all.
    let tomorrow = UnixMillis(t0.0 + 86_400_000);
    let future = usage(
        &broker,
        "live",
        tomorrow,
        UnixMillis(tomorrow.0 + 86_400_000),
    )
    .await?;
    assert_eq!(future.to, tomorrow);
    let f = &future.groups[0];
    assert_eq!(
        (f.base_seconds, f.elastic_seconds, f.total.as_str()),
        (0, 0, "0.00")
    );
    assert!(f
        .resources
        .iter()
        .all(|r| r.ready_seconds == 0 && r.sessions == 0));
    let sessions: u64 = g.resources.iter().map(|r| r.sessions).sum();
    assert_eq!(sessions, 3);
    let kinds: Vec<(&str, &str)> = g
        .resources
        .iter()
        .map(|r| (r.resource.as_str(), r.kind.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [("h1", "base"), ("h2", "base"), ("live-e1", "elastic")]
    );

    e1.stop().await?;
    h1.stop().await?;
    h2.stop().await?;
    broker.stop().await?;
    Ok(())
}

/// `hh:mm:ss` on the scenario's day, 2026-03-02 (UTC).
fn at(hms: &str) -> UnixMillis {
    const DAY: i64 = 1_772_409_600_000;
    let parts: Vec<i64> = hms.split(':').map(|p| p.parse().expect("number")).collect();
    UnixMillis(DAY + ((parts[0] * 60 + parts[1]) * 60 + parts[2]) * 1000)
}

/// The seed document's example (`seed-elastic-billing.toml`) replayed
/// through the live broker: real agents report the sessions where the
/// engine placed them in the simulation, agents named for the elastic
/// resources register when the scenario creates them and disconnect when it
/// releases them, and the group clock follows the scenario's times. The
/// usage report must give the amounts `ferryctl simulate` gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_scenario_through_live_agents_costs_what_simulate_says() -> anyhow::Result<()> {
    init_logging();
    let scenario = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/spec/scenarios/seed-elastic-billing.toml");
    let scenario = if scenario.exists() {
        scenario
    } else {
        std::path::PathBuf::from("/work/shared/spec/scenarios/seed-elastic-billing.toml")
    };
    let simulated: serde_json::Value =
        serde_json::from_str(&ferry_broker::simulate::run_cli(&scenario, true)?)?;
    let cost = &simulated["cost"];

    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(at("08:00:00"));
    let mut config = GroupsConfig {
        clock: clock.clock(),
        ..GroupsConfig::default()
    };
    let prices = config
        .prices
        .get_mut("office-4c8g")
        .context("a price for office-4c8g")?;
    prices.subscription_month = "199".parse()?;
    prices.hourly = "0.726736".parse()?;
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    let mut spec = group_spec("seed");
    spec.billing = BillingSpec::Subscription {
        duration: "1w".into(),
        auto_renew: false,
    };
    spec.policy = PolicySpec {
        concurrent_sessions: Some(2),
        usage_threshold: Some(85),
        scale_out_step: Some(2),
        max_elastic: Some(2),
        max_idle_ms: Some(3_600_000),
        ..PolicySpec::default()
    };
    publish(&broker, spec).await?;
    let mut b1 = agent_of(&broker, "h1", "seed").await?;
    let mut b2 = agent_of(&broker, "h2", "seed").await?;
    let (mut c1, mut c2) = (b1.client().await?, b2.client().await?);

    // Breadth-first placement, as the simulation did: s1, s3 on b1; s2, s4 on b2.
    for (time, on_b1, session) in [
        ("08:22:00", true, "s1"),
        ("08:45:00", false, "s2"),
        ("09:10:00", true, "s3"),
        ("09:55:00", false, "s4"),
    ] {
        clock.set(at(time));
        let (client, agent) = if on_b1 {
            (&mut c1, &b1)
        } else {
            (&mut c2, &b2)
        };
        start(client, session).await?;
        agent.wait_synced().await?;
    }
    let evs = events(&broker, "seed").await?;
    let scale_out = of_kind(&evs, "scale_out");
    assert_eq!(scale_out.len(), 1, "{evs:?}");
    assert!(scale_out[0].message.contains("seed-e1, seed-e2"));
    assert_eq!(scale_out[0].at, at("09:55:00"));

    clock.set(at("10:00:00"));
    let mut e1 = agent_of(&broker, "seed-e1", "seed").await?;
    let mut e2 = agent_of(&broker, "seed-e2", "seed").await?;
    wait_events(&broker, "seed", "created", 2).await?;

    // 11:00: e1 has been idle for max_idle; the actor's timer scales it in
    // and drains it; its agent going away is the release.
    clock.set(at("11:00:00"));
    e1.wait_for("drained by the scale-in", |s| s.draining)
        .await?;
    e1.stop().await?;
    wait_events(&broker, "seed", "released", 1).await?;

    // 11:08: s3 ends, which lets e2 go too.
    clock.set(at("11:08:00"));
    c1.session_end(sid("s3"), ferry_common::wire::EndReason::Logout)
        .await?;
    b1.wait_synced().await?;
    e2.wait_for("drained by the scale-in", |s| s.draining)
        .await?;
    clock.set(at("11:13:18"));
    e2.stop().await?;
    let evs = wait_events(&broker, "seed", "released", 2).await?;
    let times =
        |kind: &str| -> Vec<UnixMillis> { of_kind(&evs, kind).iter().map(|e| e.at).collect() };
    assert_eq!(times("scale_in"), [at("11:00:00"), at("11:08:00")]);
    assert_eq!(times("released"), [at("11:00:00"), at("11:13:18")]);

    let report = usage(&broker, "seed", at("08:00:00"), at("12:00:00")).await?;
    let g = &report.groups[0];
    assert_eq!(g.elastic_seconds, 3600 + 4398);
    let live = serde_json::json!({
        "subscription": g.subscription,
        "base_payg": g.base_payg,
        "elastic": g.elastic,
        "total": g.total,
        "currency": report.currency,
    });
    assert_eq!(&live, cost);
    assert_eq!(cost["total"], "94.48");

    b1.stop().await?;
    b2.stop().await?;
    broker.stop().await?;
    Ok(())
}

/// A broker restart reloads the group: its actor starts from the store,
/// agents re-join their base slots with the sessions their hosts still have,
/// and metering goes on without a second interval per resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_reloads_the_group_and_its_open_sessions() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let (clock, config) = manual_clock();
    let t0 = clock.now();
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    publish(&broker, group_spec("again")).await?;
    let mut h1 = agent_of(&broker, "h1", "again").await?;
    let mut h2 = agent_of(&broker, "h2", "again").await?;
    let (mut c1, mut c2) = (h1.client().await?, h2.client().await?);
    start(&mut c1, "s1").await?;
    h1.wait_synced().await?;

    clock.advance(Duration::from_secs(600));
    broker.restart().await?;
    // Each start is acknowledged only by the new broker, after its agent
    // re-joined. With h2 back (and h1 back with s1 or not yet), usage is at
    // most the threshold.
    start(&mut c2, "s3").await?;
    h2.wait_synced().await?;
    assert!(of_kind(&events(&broker, "again").await?, "scale_out").is_empty());
    // Now both are back, h1 with s1 still open: 3 sessions on 4 slots.
    start(&mut c1, "s2").await?;
    h1.wait_synced().await?;
    let evs = events(&broker, "again").await?;
    let scale_out = of_kind(&evs, "scale_out");
    assert_eq!(scale_out.len(), 1, "s1 counts after the restart: {evs:?}");
    assert!(scale_out[0]
        .message
        .contains("demand 3 x 100 > threshold 50 x capacity 4"));

    let to = UnixMillis(t0.0 + 3_600_000);
    let report = match broker
        .admin(AdminRequestV1::Usage(UsageQuery {
            group: None,
            from: t0,
            to,
        }))
        .await?
    {
        AdminResponseV1::Usage(r) => r,
        other => bail!("unexpected answer {other:?}"),
    };
    let g = &report.groups[0];
    assert_eq!(
        g.base_seconds,
        2 * billed_seconds(t0, None, report.to),
        "one interval per base resource, billed so far"
    );
    assert_eq!(g.resources.len(), 2);

    h1.stop().await?;
    h2.stop().await?;
    broker.stop().await?;
    Ok(())
}

/// The groups' lifecycle deadline reaches the live state: with no operator
/// action, the end of a subscription's week closes the group (no new
/// sessions; the open ones are disconnected through their agents, a failure
/// recorded as an event), a renewal reopens it, and recycling stops it and
/// ends its metering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_subscription_disconnects_its_sessions_and_recycling_stops_it(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let (clock, config) = manual_clock();
    let t0 = clock.now();
    let retention = i64::try_from(config.retention.as_millis())?;
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    let mut spec = group_spec("week");
    spec.billing = BillingSpec::Subscription {
        duration: "1w".into(),
        auto_renew: false,
    };
    publish(&broker, spec).await?;

    // h1's host can end sessions (its hook logs them); h2's cannot.
    let log = dir.path().join("disconnected.log");
    let hook = dir.path().join("disconnect.sh");
    std::fs::write(&hook, format!("echo \"$2\" >> '{}'\n", log.display()))?;
    let identity = broker.issue_identity("h1")?;
    let mut h1_config = broker.agent_config("h1", &identity)?;
    h1_config.group = Some("week".parse()?);
    ferry_tests::admin::assign(&broker, "h1", "week").await?;
    h1_config.hooks.disconnect = Some(vec!["/bin/sh".into(), hook.display().to_string()]);
    let mut h1 = TestAgent::start_with(h1_config).await?;
    h1.wait_synced().await?;
    let mut h2 = agent_of(&broker, "h2", "week").await?;
    let (mut c1, mut c2) = (h1.client().await?, h2.client().await?);
    start(&mut c1, "s1").await?;
    h1.wait_synced().await?;
    start(&mut c2, "s2").await?;
    h2.wait_synced().await?;
    let l = live(&broker, "week").await?;
    assert!(!l.closed);
    assert_eq!((l.demand, l.capacity), (2, 4));

    // The week ends; the deadline alone expires and closes the group.
    clock.advance(Duration::from_secs(7 * 86_400));
    wait_events(&broker, "week", "disconnected", 1).await?;
    let evs = wait_events(&broker, "week", "disconnect-failed", 1).await?;
    let closed = of_kind(&evs, "closed");
    assert_eq!(closed.len(), 1, "{evs:?}");
    assert!(
        closed[0].message.contains("2 open session(s)"),
        "{}",
        closed[0].message
    );
    let done = of_kind(&evs, "disconnected");
    assert!(
        done[0].message.contains("session s1 on h1"),
        "{}",
        done[0].message
    );
    let failed = of_kind(&evs, "disconnect-failed");
    assert!(
        failed[0].message.contains("session s2 on h2")
            && failed[0].message.contains("no disconnect hook"),
        "{}",
        failed[0].message
    );
    assert_eq!(
        std::fs::read_to_string(&log)?,
        "s1\n",
        "h1's hook ran for s1"
    );
    let (detail, l) = show(&broker, "week").await?;
    assert_eq!(detail.info.status, "expired");
    let l = l.context("an expired group keeps its live view")?;
    assert!(l.closed);
    assert_eq!((l.demand, l.capacity), (2, 0));
    assert!(l.resources.iter().all(|r| !r.available), "{l:?}");
    // `resources list` says the same: connected and healthy, and no host
    // takes sessions.
    let listed = broker.resources().await?;
    assert!(
        listed.iter().all(|r| r.connected && !r.available),
        "{listed:?}"
    );

    // A session a host starts anyway is refused and disconnected.
    start(&mut c1, "s3").await?;
    h1.wait_synced().await?;
    let evs = wait_events(&broker, "week", "disconnected", 2).await?;
    assert!(of_kind(&evs, "rejected")
        .iter()
        .any(|e| e.message.contains("s3 on h1")));
    assert!(
        of_kind(&evs, "scale_out").is_empty(),
        "a closed group never scales"
    );
    // The hosts end what they were asked to.
    for s in ["s1", "s3"] {
        c1.session_end(sid(s), ferry_common::wire::EndReason::Disconnected)
            .await?;
    }
    c2.session_end(sid("s2"), ferry_common::wire::EndReason::Logout)
        .await?;
    h1.wait_synced().await?;
    h2.wait_synced().await?;
    assert_eq!(live(&broker, "week").await?.demand, 0);

    // A renewal reopens it: agents take sessions again.
    broker
        .admin(AdminRequestV1::GroupRenew {
            group: "week".parse()?,
            duration: "1w".into(),
        })
        .await?;
    let l = live(&broker, "week").await?;
    assert!(!l.closed);
    assert_eq!(
        rows(&l),
        [
            ("h1".into(), "ready".into(), true, vec![]),
            ("h2".into(), "ready".into(), true, vec![]),
        ]
    );
    start(&mut c2, "s4").await?;
    h2.wait_synced().await?;
    assert_eq!(live(&broker, "week").await?.demand, 1);
    assert_eq!(
        of_kind(&events(&broker, "week").await?, "reopened").len(),
        1
    );

    // Expired again, then past retention: recycling stops the live state and
    // ends the base resources' metering when it began.
    let expires = show(&broker, "week")
        .await?
        .0
        .info
        .expires_at
        .context("a subscription expires")?;
    clock.set(expires);
    wait_events(&broker, "week", "closed", 2).await?;
    let recycle = UnixMillis(expires.0 + retention);
    clock.set(recycle);
    let evs = wait_events(&broker, "week", "released", 1).await?;
    let released = of_kind(&evs, "released");
    assert!(released[0].message.contains("2 resource(s) released"));
    assert_eq!(released[0].at, recycle);
    let (detail, l) = show(&broker, "week").await?;
    assert_eq!(detail.info.status, "recycling");
    assert_eq!(l, None, "no live state once recycling");
    let to = UnixMillis(recycle.0 + 86_400_000);
    let report = usage(&broker, "week", t0, to).await?;
    assert_eq!(
        report.groups[0].base_seconds,
        2 * billed_seconds(t0, Some(recycle), to)
    );
    assert_eq!(
        report.groups[0].base_seconds,
        2 * u64::try_from((recycle.0 - t0.0) / 1000)?
    );

    h1.stop().await?;
    h2.stop().await?;
    broker.stop().await?;
    Ok(())
}

/// An agent joins a group whose spec is larger than its host: it is flagged
/// (an event naming it, what it has and what the spec needs, and `flagged`
/// in `group show`) and still used. The hosts running the tests are real,
/// so the expectation is computed from the facts the agent reported; the
/// largest spec of the catalog makes the flagged case the usual one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_below_the_group_spec_is_flagged_and_still_joins() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(UnixMillis(ferry_broker::clock::now_millis().0));
    let config = GroupsConfig {
        clock: clock.clock(),
        ..GroupsConfig::default()
    };
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    let mut spec = group_spec("big");
    spec.spec = "gpu-14c93g".into();
    publish(&broker, spec).await?;
    let mut h1 = agent_of(&broker, "h1", "big").await?;

    let facts = broker
        .resources()
        .await?
        .into_iter()
        .find(|r| r.resource.as_str() == "h1")
        .context("h1 is registered")?
        .host;
    let expected = hostfit::shortfall("gpu-14c93g", &facts);
    let evs = events(&broker, "big").await?;
    let flagged = of_kind(&evs, "flagged");
    let l = live(&broker, "big").await?;
    assert_eq!(
        rows(&l)[0],
        ("h1".into(), "ready".into(), true, vec![]),
        "a flagged host still joins and takes sessions"
    );
    match &expected {
        Some(short) => {
            assert_eq!(flagged.len(), 1, "{evs:?}");
            assert!(
                flagged[0].message.contains("resource h1") && flagged[0].message.contains(short),
                "{}",
                flagged[0].message
            );
            assert!(short.contains(&format!("has {} vCPU", facts.vcpus)));
            assert!(short.contains("needs 14 vCPU / 93 GiB"));
            assert!(l.resources[0]
                .flagged
                .as_deref()
                .is_some_and(|m| m.contains(short)));
            assert_eq!(l.flagged.len(), 1);
            let json =
                ferry_broker::render::group_shown_json(&show(&broker, "big").await?.0, Some(&l));
            assert_eq!(json["flagged"].as_array().map(Vec::len), Some(1));
        }
        None => {
            assert!(flagged.is_empty(), "{evs:?}");
            assert_eq!(l.resources[0].flagged, None);
        }
    }
    // A session goes to it like to any other.
    let mut c1 = h1.client().await?;
    start(&mut c1, "s1").await?;
    h1.wait_synced().await?;
    assert_eq!(live(&broker, "big").await?.demand, 1);

    // After a broker restart and a reconnect the host is flagged still, and
    // the flag is not recorded a second time.
    broker.restart().await?;
    h1.wait_synced().await?;
    let l = wait_live(&broker, "big", |l| l.demand == 1).await?;
    assert_eq!(l.flagged.len(), usize::from(expected.is_some()));
    let evs = events(&broker, "big").await?;
    assert_eq!(
        of_kind(&evs, "flagged").len(),
        usize::from(expected.is_some()),
        "{evs:#?}"
    );

    h1.stop().await?;
    broker.stop().await?;
    Ok(())
}

/// Group and version in an agent's policy file, and its scaling part's
/// `concurrent_sessions`.
fn policy_file_of(agent: &TestAgent) -> anyhow::Result<(String, u64, u64)> {
    let path = &agent.config().policy_file;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read policy file {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok((
        v["group"].as_str().context("group")?.to_owned(),
        v["version"].as_u64().context("version")?,
        v["policy"]["scaling"]["concurrent_sessions"]
            .as_u64()
            .context("concurrent_sessions")?,
    ))
}

/// (resource, applied version) of `group show`'s policy state.
fn applied(d: &GroupDetail) -> Vec<(String, Option<u64>)> {
    d.policy_resources
        .iter()
        .map(|r| (r.resource.to_string(), r.applied_version))
        .collect()
}

async fn update_policy(broker: &TestBroker, group: &str, sessions: u32) -> anyhow::Result<()> {
    let answer = broker
        .admin(AdminRequestV1::GroupUpdatePolicy {
            group: group.parse()?,
            policy: PolicySpec {
                concurrent_sessions: Some(sessions),
                ..PolicySpec::default()
            },
        })
        .await?;
    if !matches!(answer, AdminResponseV1::Group(_)) {
        bail!("update-policy refused: {answer:?}");
    }
    Ok(())
}

/// Waits (bounded) until the broker no longer has a live connection of
/// `resource`: its registry is what the policy push goes through.
async fn wait_gone(broker: &TestBroker, resource: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + ferry_tests::harness::PATIENCE;
    loop {
        let connected = broker
            .resources()
            .await?
            .iter()
            .any(|r| r.resource.as_str() == resource && r.connected);
        if !connected {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{resource} still connected");
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_is_pushed_to_every_agent_acknowledged_and_retried_on_rejoin(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(UnixMillis(ferry_broker::clock::now_millis().0));
    let config = GroupsConfig {
        clock: clock.clock(),
        ..GroupsConfig::default()
    };
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    let mut spec = group_spec("pol");
    spec.base_resources = 3;
    publish(&broker, spec).await?;

    // Joining agents get version 1, the one set at publish.
    let mut h1 = agent_of(&broker, "h1", "pol").await?;
    let mut h2 = agent_of(&broker, "h2", "pol").await?;
    wait_events(&broker, "pol", "policy-applied", 2).await?;
    assert_eq!(policy_file_of(&h1)?, ("pol".into(), 1, 2));
    assert_eq!(policy_file_of(&h2)?, ("pol".into(), 1, 2));
    let (d, _) = show(&broker, "pol").await?;
    assert_eq!(d.policy_version, 1);
    assert_eq!(
        applied(&d),
        [("h1".into(), Some(1)), ("h2".into(), Some(1))]
    );
    assert!(d.policy_applied);

    // An update reaches both, and `group show` says so.
    update_policy(&broker, "pol", 1).await?;
    wait_events(&broker, "pol", "policy-applied", 4).await?;
    assert_eq!(policy_file_of(&h1)?, ("pol".into(), 2, 1));
    assert_eq!(policy_file_of(&h2)?, ("pol".into(), 2, 1));
    let (d, _) = show(&broker, "pol").await?;
    assert_eq!(d.policy_version, 2);
    assert_eq!(
        applied(&d),
        [("h1".into(), Some(2)), ("h2".into(), Some(2))]
    );
    assert!(d.policy_applied);

    // h2 is down during the next update: not applied until it rejoins.
    h2.stop().await?;
    wait_gone(&broker, "h2").await?;
    update_policy(&broker, "pol", 2).await?;
    wait_events(&broker, "pol", "policy-applied", 5).await?;
    assert_eq!(policy_file_of(&h1)?, ("pol".into(), 3, 2));
    assert_eq!(policy_file_of(&h2)?, ("pol".into(), 2, 1));
    let (d, _) = show(&broker, "pol").await?;
    assert_eq!(
        applied(&d),
        [("h1".into(), Some(3)), ("h2".into(), Some(2))]
    );
    assert!(!d.policy_applied, "h2 has an older version");
    h2.restart().await?;
    h2.wait_synced().await?;
    let evs = wait_events(&broker, "pol", "policy-applied", 6).await?;
    assert!(
        of_kind(&evs, "policy-applied")[5]
            .message
            .contains("version 3 applied on h2"),
        "{evs:?}"
    );
    assert_eq!(policy_file_of(&h2)?, ("pol".into(), 3, 2));
    let (d, _) = show(&broker, "pol").await?;
    assert!(d.policy_applied, "{:?}", applied(&d));

    // An agent whose policy hook fails: recorded, not applied.
    let identity = broker.issue_identity("h3")?;
    let mut config = broker.agent_config("h3", &identity)?;
    config.group = Some("pol".parse()?);
    ferry_tests::admin::assign(&broker, "h3", "pol").await?;
    config.hooks.policy = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo streaming server refused it >&2; exit 5".into(),
    ]);
    let mut h3 = TestAgent::start_with(config).await?;
    h3.wait_synced().await?;
    let evs = wait_events(&broker, "pol", "policy-failed", 1).await?;
    let failed = of_kind(&evs, "policy-failed");
    assert!(
        failed[0].message.contains("version 3 failed on h3")
            && failed[0].message.contains("streaming server refused it"),
        "{}",
        failed[0].message
    );
    let (d, _) = show(&broker, "pol").await?;
    assert_eq!(
        applied(&d),
        [
            ("h1".into(), Some(3)),
            ("h2".into(), Some(3)),
            ("h3".into(), None)
        ]
    );
    assert!(!d.policy_applied);

    for a in [&mut h1, &mut h2, &mut h3] {
        a.stop().await?;
    }
    broker.stop().await?;
    Ok(())
}

/// An expired group retries a disconnect that failed, on the group clock:
/// h1's hook (a real script counting its calls per session in files) fails
/// the first time for each session and succeeds after. s1 fails, is retried
/// 5 s later and succeeds; s2 fails too, then its host ends it by itself
/// before the retry, so it is not tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_group_retries_a_failed_disconnect_until_it_succeeds() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let (clock, config) = manual_clock();
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    let mut spec = group_spec("retry");
    spec.billing = BillingSpec::Subscription {
        duration: "1w".into(),
        auto_renew: false,
    };
    publish(&broker, spec).await?;

    let calls = dir.path().join("calls");
    std::fs::create_dir_all(&calls)?;
    let hook = dir.path().join("disconnect.sh");
    std::fs::write(
        &hook,
        format!(
            "f='{}'/\"$2\"\n\
             n=$(cat \"$f\" 2>/dev/null || echo 0)\n\
             n=$((n + 1))\n\
             echo \"$n\" > \"$f\"\n\
             if [ \"$n\" -lt 2 ]; then echo \"kick $2: try again\" >&2; exit 3; fi\n",
            calls.display()
        ),
    )?;
    let count = |session: &str| -> anyhow::Result<u32> {
        Ok(std::fs::read_to_string(calls.join(session))?
            .trim()
            .parse()?)
    };
    let identity = broker.issue_identity("h1")?;
    let mut config = broker.agent_config("h1", &identity)?;
    config.group = Some("retry".parse()?);
    ferry_tests::admin::assign(&broker, "h1", "retry").await?;
    config.hooks.disconnect = Some(vec!["/bin/sh".into(), hook.display().to_string()]);
    let mut h1 = TestAgent::start_with(config).await?;
    h1.wait_synced().await?;
    let mut c1 = h1.client().await?;
    for s in ["s1", "s2"] {
        start(&mut c1, s).await?;
    }
    h1.wait_synced().await?;

    // The week ends: both disconnects fail once.
    clock.advance(Duration::from_secs(7 * 86_400));
    let evs = wait_events(&broker, "retry", "disconnect-failed", 2).await?;
    for s in ["s1", "s2"] {
        let failed: Vec<_> = of_kind(&evs, "disconnect-failed")
            .into_iter()
            .filter(|e| e.message.contains(&format!("session {s} on h1")))
            .collect();
        assert_eq!(failed.len(), 1, "{evs:?}");
        assert!(
            failed[0].message.contains("attempt 1")
                && failed[0].message.contains("try again")
                && failed[0].message.contains("next attempt in 5 s"),
            "{}",
            failed[0].message
        );
        assert_eq!(count(s)?, 1);
    }
    assert!(of_kind(&evs, "disconnected").is_empty(), "{evs:?}");

    // s2 ends by itself before its retry.
    c1.session_end(sid("s2"), ferry_common::wire::EndReason::Logout)
        .await?;
    h1.wait_synced().await?;

    // The retry is due on the group clock: s1's second attempt succeeds.
    clock.advance(Duration::from_secs(5));
    let evs = wait_events(&broker, "retry", "disconnected", 1).await?;
    let done = of_kind(&evs, "disconnected");
    assert!(
        done[0].message.contains("session s1 on h1") && done[0].message.contains("attempt 2"),
        "{}",
        done[0].message
    );
    assert_eq!(count("s1")?, 2);
    // Both retries were handled in the same timer round: s2 was dropped.
    assert_eq!(count("s2")?, 1, "an ended session is not retried");
    assert_eq!(of_kind(&evs, "disconnect-failed").len(), 2, "{evs:?}");

    h1.stop().await?;
    broker.stop().await?;
    Ok(())
}
