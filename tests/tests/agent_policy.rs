//! A group's `idle_disconnect` enforced by the real agent code against the
//! in-process broker (issue 7, SPEC section 4): the broker pushes the
//! policy, the streaming server reports the session idle with the real
//! `ferry-agent session idle` verb, the agent ends it through its disconnect
//! hook (which, like a streaming server, reports the end with the real
//! `ferry-agent session end`), and the broker records exactly one end, with
//! the reason `idle`.
//!
//! Every wait is on a signal (the agent's status watch, the group's events)
//! or bounded by `PATIENCE`; no sleeps.

use anyhow::Context;
use ferry_agent::local::StartProof;
use ferry_broker::pki;
use ferry_broker::routing::{RouteAnswer, RouteClient};
use ferry_common::admin::{AdminRequestV1, Secret, UserSpec};
use ferry_common::route::RouteAsk;
use ferry_common::ticket::Credential;
use ferry_common::UserId;
use ferry_tests::admin::wait_events;
use ferry_tests::bins::bin;
use ferry_tests::harness::{init_logging, TestAgent, TestBroker};
use ferry_tests::procs::{ferryctl_json, run};

fn uid(s: &str) -> UserId {
    s.parse().expect("user id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_ended_by_its_agent_and_recorded_once() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let broker = TestBroker::start(dir.path()).await?;
    broker
        .admin(AdminRequestV1::UserCreateWithPassword {
            user: UserSpec {
                id: uid("alice"),
                email: "alice@example.com".into(),
                mobile: "+8613800000000".into(),
            },
            password: Secret("pw-alice".into()),
        })
        .await?;
    ferryctl_json(
        broker.admin_socket(),
        &[
            "group",
            "publish",
            "--name",
            "idle",
            "--region",
            "cn-hangzhou",
            "--office-network",
            "office-net-1",
            "--spec",
            "office-4c8g",
            "--image",
            "img-1",
            "--billing",
            "pay-as-you-go",
            "--base-resources",
            "1",
            "--user",
            "alice",
            "--concurrent-sessions",
            "1",
            "--usage-threshold",
            "100",
            "--scale-out-step",
            "1",
            "--max-elastic",
            "0",
            "--max-idle",
            "1h",
            "--idle-disconnect",
            "1s",
        ],
    )
    .await?;

    let agent_bin = bin("ferry-agent");
    let identity = broker.issue_identity("h1")?;
    let mut config = broker.agent_config("h1", &identity)?;
    config.group = Some("idle".parse()?);
    ferry_tests::admin::assign(&broker, "h1", "idle").await?;
    let socket = config.local_socket.clone();
    // The hook gets `-- SESSION`.
    config.hooks.disconnect = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "exec '{}' --socket '{}' session end --session=\"$2\"",
            agent_bin.display(),
            socket.display()
        ),
        "disconnect".into(),
    ]);
    let h1 = TestAgent::start_with(config).await?;
    h1.wait_synced().await?;
    wait_events(&broker, "idle", "policy-applied", 1).await?;

    let c = RouteClient::connect(
        broker.agent_addr(),
        "localhost",
        &broker.pki_dir().join(pki::CA_CERT),
    )
    .await?;
    let ask = RouteAsk {
        group: "idle".parse()?,
        user: uid("alice"),
        credential: Credential::Password("pw-alice".into()),
        wait: false,
    };
    let session = match c.route(ask, |_| {}).await? {
        RouteAnswer::Admitted(a) => a.session,
        RouteAnswer::Refused(r) => anyhow::bail!("refused ({}): {}", r.reason, r.message),
        RouteAnswer::Redirect(a) => anyhow::bail!("sent to another broker at {a}"),
    };
    let mut local = h1.client().await?;
    let started = local
        .session_start(session.clone(), uid("alice"), StartProof::Trusted)
        .await?;
    h1.wait_synced().await?;

    // The streaming server: no input for 2 s already, over the 1 s limit.
    let out = run(
        &agent_bin,
        [
            "--socket",
            socket.to_str().context("socket path")?,
            "session",
            "idle",
            session.as_str(),
            "--since",
            "2s",
        ],
    )
    .await?;
    anyhow::ensure!(out.status.success(), "session idle: {out:?}");

    // The end is the next event in the spool; then the broker has it.
    h1.wait_for("the idle session ended", |s| s.last_seq > started)
        .await?;
    h1.wait_synced().await?;
    let ours: Vec<_> = broker
        .sessions(true)
        .await?
        .into_iter()
        .filter(|s| s.session == session)
        .collect();
    anyhow::ensure!(ours.len() == 1, "{ours:?}");
    anyhow::ensure!(
        ours[0].end_reason.as_deref() == Some("idle"),
        "ended as {:?}",
        ours[0].end_reason
    );
    // Nothing more was recorded for it (one end, no second report).
    anyhow::ensure!(h1.link().last_seq == started + 1, "{:?}", h1.link());
    Ok(())
}

/// A policy whose hook fails is not applied on the host (the agent keeps
/// its previous policy file) and is tried again by the broker while the
/// agent stays connected: 30 s later on the groups' clock, it applies once
/// the host accepts it, without the agent re-joining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_policy_is_tried_again_while_the_agent_stays_connected() -> anyhow::Result<()> {
    use ferry_common::admin::{BillingSpec, GroupSpec, PolicySpec, SessionType};
    use ferry_tests::admin::{of_kind, publish, show};
    use ferry_tests::harness::manual_clock;
    init_logging();
    let dir = tempfile::tempdir()?;
    let (clock, config) = manual_clock();
    let broker = TestBroker::start_with_groups(dir.path(), config).await?;
    publish(
        &broker,
        GroupSpec {
            name: Some("retry".parse()?),
            region: "cn-hangzhou".into(),
            office_network: "office-net-1".into(),
            spec: "office-4c8g".into(),
            image: "img-1".into(),
            billing: BillingSpec::PayAsYouGo,
            base_resources: 1,
            session_type: SessionType::Independent,
            users: vec![],
            policy: PolicySpec {
                concurrent_sessions: Some(2),
                usage_threshold: Some(80),
                scale_out_step: Some(1),
                max_elastic: Some(0),
                max_idle_ms: Some(3_600_000),
                ..PolicySpec::default()
            },
        },
    )
    .await?;
    // The host's streaming server refuses policies until `ready` exists.
    let ready = dir.path().join("ready");
    let identity = broker.issue_identity("h1")?;
    let mut config = broker.agent_config("h1", &identity)?;
    config.group = Some("retry".parse()?);
    ferry_tests::admin::assign(&broker, "h1", "retry").await?;
    config.hooks.policy = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "test -e '{}' || {{ echo streaming server busy >&2; exit 4; }}",
            ready.display()
        ),
    ]);
    let policy_file = config.policy_file.clone();
    let h1 = TestAgent::start_with(config).await?;
    h1.wait_synced().await?;

    let evs = wait_events(&broker, "retry", "policy-failed", 1).await?;
    let failed = of_kind(&evs, "policy-failed");
    assert!(
        failed[0]
            .message
            .contains("policy hook failed (exit status 4): streaming server busy")
            && failed[0].message.contains("tried again at")
            && failed[0].message.contains("(in 30s)"),
        "{}",
        failed[0].message
    );
    // Not applied: the host has no policy file, the broker records none.
    anyhow::ensure!(
        !policy_file.exists(),
        "the failed version stayed on the host"
    );
    let (d, _) = show(&broker, "retry").await?;
    anyhow::ensure!(
        d.policy_resources
            .iter()
            .all(|r| r.applied_version.is_none()),
        "{:?}",
        d.policy_resources
    );

    // The host is fixed; 30 s later the broker tries again on the same
    // connection.
    std::fs::write(&ready, "")?;
    clock.advance(std::time::Duration::from_secs(30));
    let evs = wait_events(&broker, "retry", "policy-applied", 1).await?;
    let applied = of_kind(&evs, "policy-applied");
    assert!(
        applied[0]
            .message
            .contains("policy version 1 applied on h1"),
        "{}",
        applied[0].message
    );
    let (d, _) = show(&broker, "retry").await?;
    anyhow::ensure!(d.policy_applied, "{:?}", d.policy_resources);
    let text = std::fs::read_to_string(&policy_file)?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    anyhow::ensure!(v["version"] == 1, "{text}");
    anyhow::ensure!(h1.link().connected, "{:?}", h1.link());
    Ok(())
}
