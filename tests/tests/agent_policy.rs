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
    let socket = config.local_socket.clone();
    config.hooks.disconnect = Some(vec![
        agent_bin.to_string_lossy().into_owned(),
        "--socket".into(),
        socket.to_string_lossy().into_owned(),
        "session".into(),
        "end".into(),
        "--session".into(),
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
    };
    let mut local = h1.client().await?;
    let started = local.session_start(session.clone(), uid("alice")).await?;
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
