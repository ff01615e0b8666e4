//! Group statuses that only a live broker reaches (issue 4): `publishing`
//! while base resources are created through the provisioner, then
//! `published` or `publish-failed`.
//!
//! The broker runs in-process with a manual group clock and an `exec`
//! provisioner of shell scripts that write each resource's enrollment token
//! to a file; the test plays the hosts: it enrolls with the token and starts
//! an in-process agent. Every wait is on an event or a status, bounded by
//! `PATIENCE`.

use ferry_agent::local::StartProof;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_broker::clock::ManualClock;
use ferry_broker::config::{GroupsConfig, ProvisionerConfig, ProvisionerKind};
use ferry_broker::pki;
use ferry_broker::routing::{RouteAnswer, RouteClient};
use ferry_common::admin::{
    AdminRequestV1, AdminResponseV1, BillingSpec, GroupSpec, PolicySpec, Secret, SessionType,
    UserSpec,
};
use ferry_common::route::{RouteAsk, RouteRefusal};
use ferry_common::ticket::Credential;
use ferry_common::UnixMillis;
use ferry_tests::admin::{
    agent_of, agent_with, events, of_kind, publish, show, usage, wait_events,
};
use ferry_tests::harness::{init_logging, AgentIdentity, TestAgent, TestBroker, PATIENCE};

const REGISTER_TIMEOUT: Duration = Duration::from_secs(600);

fn spec(name: &str, base: u32, billing: BillingSpec) -> GroupSpec {
    GroupSpec {
        name: Some(name.parse().expect("name")),
        region: "cn-hangzhou".into(),
        office_network: "office-net-1".into(),
        spec: "office-4c8g".into(),
        image: "img-1".into(),
        billing,
        base_resources: base,
        session_type: SessionType::Independent,
        users: vec!["alice".parse().expect("user")],
        policy: PolicySpec {
            concurrent_sessions: Some(2),
            usage_threshold: Some(80),
            scale_out_step: Some(1),
            max_elastic: Some(0),
            max_idle_ms: Some(600_000),
            ..PolicySpec::default()
        },
    }
}

fn whole_second_now() -> UnixMillis {
    UnixMillis(ferry_broker::clock::now_millis().0 / 1000 * 1000)
}

/// `create`: counts its calls per resource in `<dir>/<resource>.created`
/// and writes the enrollment token to `<dir>/<resource>.token`. `delete`:
/// appends the resource to `<dir>/deleted`.
fn scripts(dir: &Path) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    std::fs::create_dir_all(dir)?;
    let create = dir.join("create.sh");
    std::fs::write(
        &create,
        format!(
            r#"n=$(( $(cat '{d}/'"$1"'.created' 2>/dev/null || echo 0) + 1 ))
echo $n > '{d}/'"$1"'.created'
echo "$FERRY_ENROLL_TOKEN" > '{d}/'"$1"'.token'
"#,
            d = dir.display()
        ),
    )?;
    let delete = dir.join("delete.sh");
    std::fs::write(
        &delete,
        format!("echo \"$1\" >> '{}/deleted'\n", dir.display()),
    )?;
    // Through sh: exec'ing a file just written could fail with ETXTBSY.
    let argv = |p: PathBuf| {
        vec![
            "/bin/sh".into(),
            p.display().to_string(),
            "{resource}".into(),
        ]
    };
    Ok((argv(create), argv(delete)))
}

fn config(clock: &ManualClock, dir: &Path) -> anyhow::Result<GroupsConfig> {
    let (create, delete) = scripts(dir)?;
    Ok(GroupsConfig {
        clock: clock.clock(),
        provisioner: ProvisionerConfig {
            kind: ProvisionerKind::Exec { create, delete },
            attempts: 2,
            register_timeout: REGISTER_TIMEOUT,
            ..ProvisionerConfig::default()
        },
        provision_base: true,
        ..GroupsConfig::default()
    })
}

fn created_count(dir: &Path, resource: &str) -> anyhow::Result<String> {
    Ok(
        std::fs::read_to_string(dir.join(format!("{resource}.created")))
            .with_context(|| format!("{resource} was never created"))?
            .trim()
            .to_owned(),
    )
}

/// Creates user `alice` (password `pw-alice`), whom every group here is
/// assigned to.
async fn alice(broker: &TestBroker) -> anyhow::Result<()> {
    broker
        .admin(AdminRequestV1::UserCreateWithPassword {
            user: UserSpec {
                id: "alice".parse()?,
                email: "alice@example.com".into(),
                mobile: "+8613800000000".into(),
            },
            password: Secret("pw-alice".into()),
        })
        .await?;
    Ok(())
}

/// Alice asks for a session in `group`; the status named by its
/// `group-not-available` refusal (any other answer is an error).
async fn not_available(broker: &TestBroker, group: &str) -> anyhow::Result<String> {
    let c = RouteClient::connect(
        broker.agent_addr(),
        "localhost",
        &broker.pki_dir().join(pki::CA_CERT),
    )
    .await?;
    let ask = RouteAsk {
        group: group.parse()?,
        user: "alice".parse()?,
        credential: Credential::Password("pw-alice".into()),
        wait: false,
    };
    let answer = c.route(ask, |_| {}).await?;
    c.close().await;
    match answer {
        RouteAnswer::Refused(r) => match r.reason {
            RouteRefusal::GroupNotAvailable { status } => {
                assert!(r.message.contains(&status), "{}", r.message);
                Ok(status)
            }
            other => bail!("refused with {other:?}: {}", r.message),
        },
        RouteAnswer::Admitted(a) => bail!("admitted: {a:?}"),
        RouteAnswer::Redirect(a) => bail!("sent to another broker at {a}"),
    }
}

async fn status(broker: &TestBroker, group: &str) -> anyhow::Result<String> {
    Ok(show(broker, group).await?.0.info.status)
}

/// Plays the host the provisioner created as `resource`: enrolls with the
/// token its create script was given, then runs its agent in `group`.
async fn host(
    broker: &TestBroker,
    scripts: &Path,
    resource: &str,
    group: &str,
) -> anyhow::Result<TestAgent> {
    let token = std::fs::read_to_string(scripts.join(format!("{resource}.token")))?
        .trim()
        .to_owned();
    let id_dir = broker.dir().join(format!("{resource}-id"));
    let target = ferry_agent::enroll::EnrollTarget {
        broker_addr: broker.agent_addr().to_string(),
        broker_name: "localhost".into(),
        ca_cert: broker.pki_dir().join(ferry_broker::pki::CA_CERT),
        token,
        cert: id_dir.join("agent.pem"),
        key: id_dir.join("agent-key.pem"),
        expect: None,
    };
    let enrolled = ferry_agent::enroll::enroll(&target).await?;
    assert_eq!(enrolled.as_str(), resource);
    let identity = AgentIdentity {
        ca_cert: target.ca_cert.clone(),
        cert: target.cert.clone(),
        key: target.key.clone(),
    };
    agent_with(broker, resource, group, &identity).await
}

/// Waits (bounded) until the group's status is `want`.
async fn wait_status(broker: &TestBroker, group: &str, want: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    loop {
        let now = status(broker, group).await?;
        if now == want {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "group {group} is {now}, not {want}: {:#?}",
                events(broker, group).await?
            );
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_resources_are_provisioned_and_a_restart_while_publishing_creates_none_twice(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let sdir = dir.path().join("scripts");
    let t0 = whole_second_now();
    let clock = ManualClock::new(t0);
    let mut broker = TestBroker::start_with_groups(dir.path(), config(&clock, &sdir)?).await?;
    let weekly = BillingSpec::Subscription {
        duration: "1w".into(),
        auto_renew: false,
    };
    alice(&broker).await?;
    let d = publish(&broker, spec("pb", 2, weekly)).await?;
    assert_eq!(d.info.status, "publishing");
    assert_eq!(not_available(&broker, "pb").await?, "publishing");
    assert!(d.orders.is_empty(), "nothing is paid while publishing");
    let evs = wait_events(&broker, "pb", "provisioned", 2).await?;
    assert!(of_kind(&evs, "status")[0].message.contains("pb-b1..pb-b2"));

    // The first host registers: still publishing.
    clock.advance(Duration::from_secs(60));
    let b1_ready = clock.now();
    let mut b1 = host(&broker, &sdir, "pb-b1", "pb").await?;
    wait_events(&broker, "pb", "resource", 1).await?;
    assert_eq!(status(&broker, "pb").await?, "publishing");

    // A restart while publishing creates nothing again.
    broker.restart().await?;
    let evs = wait_events(&broker, "pb", "restored", 1).await?;
    assert!(
        of_kind(&evs, "restored")[0].message.contains("pb-b2"),
        "{evs:#?}"
    );
    assert_eq!(created_count(&sdir, "pb-b1")?, "1");
    assert_eq!(created_count(&sdir, "pb-b2")?, "1");
    assert_eq!(status(&broker, "pb").await?, "publishing");
    b1.wait_synced().await?;

    // The second one registers: published, and the paid period starts now.
    clock.advance(Duration::from_secs(60));
    let published_at = clock.now();
    let mut b2 = host(&broker, &sdir, "pb-b2", "pb").await?;
    wait_status(&broker, "pb", "published").await?;
    let (d, live) = show(&broker, "pb").await?;
    assert_eq!(d.orders.len(), 1, "{:?}", d.orders);
    assert_eq!(d.orders[0].period_start, published_at);
    let live = live.context("a live view")?;
    let base: Vec<(String, bool)> = live
        .resources
        .iter()
        .map(|r| (r.resource.to_string(), r.available))
        .collect();
    assert_eq!(
        base,
        [("pb-b1".to_owned(), true), ("pb-b2".to_owned(), true)]
    );
    let evs = events(&broker, "pb").await?;
    assert!(
        of_kind(&evs, "status")
            .iter()
            .any(|e| e.message.starts_with("publishing -> published")),
        "{evs:#?}"
    );

    // Billed as base from each one's registration.
    let to = UnixMillis(t0.0 + 3_600_000);
    let report = usage(&broker, "pb", t0, to).await?;
    let so_far = report.to;
    let expected = (so_far.0 - b1_ready.0) / 1000 + (so_far.0 - published_at.0) / 1000;
    assert_eq!(report.groups[0].base_seconds, expected as u64);

    b1.stop().await?;
    b2.stop().await?;
    broker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_resource_that_never_registers_fails_the_publish_and_the_created_are_deleted(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let sdir = dir.path().join("scripts");
    let t0 = whole_second_now();
    let clock = ManualClock::new(t0);
    let mut broker = TestBroker::start_with_groups(dir.path(), config(&clock, &sdir)?).await?;
    let weekly = BillingSpec::Subscription {
        duration: "1w".into(),
        auto_renew: false,
    };
    alice(&broker).await?;
    publish(&broker, spec("pf", 2, weekly)).await?;
    wait_events(&broker, "pf", "provisioned", 2).await?;
    let mut b1 = host(&broker, &sdir, "pf-b1", "pf").await?;
    wait_events(&broker, "pf", "resource", 1).await?;

    // pf-b2 never registers.
    clock.advance(REGISTER_TIMEOUT);
    wait_status(&broker, "pf", "publish-failed").await?;
    let evs = wait_events(&broker, "pf", "deleted", 2).await?;
    let failed: Vec<_> = of_kind(&evs, "status")
        .into_iter()
        .filter(|e| e.message.starts_with("publishing -> publish-failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{evs:#?}");
    assert!(
        failed[0].message.contains("pf-b2") && !failed[0].message.contains("pf-b1 ("),
        "{}",
        failed[0].message
    );
    let mut deleted: Vec<String> = std::fs::read_to_string(sdir.join("deleted"))?
        .lines()
        .map(str::to_owned)
        .collect();
    deleted.sort();
    assert_eq!(deleted, ["pf-b1", "pf-b2"]);

    // Never billed: pf-b1's interval ends where it began; no order.
    let report = usage(&broker, "pf", t0, UnixMillis(t0.0 + 3_600_000)).await?;
    assert_eq!(report.groups[0].base_seconds, 0);
    let d = show(&broker, "pf").await?.0;
    assert!(d.orders.is_empty());
    assert_eq!(not_available(&broker, "pf").await?, "publish-failed");

    // The table: a subscription that failed to publish is deleted, not purged.
    let purge = broker
        .admin(AdminRequestV1::GroupPurge {
            group: "pf".parse()?,
        })
        .await;
    let message = format!("{:#}", purge.expect_err("purge refused"));
    assert!(
        message.contains("status publish-failed")
            && message.contains("allowed in this status: delete"),
        "{message}"
    );
    broker
        .admin(AdminRequestV1::GroupDelete {
            group: "pf".parse()?,
        })
        .await?;
    assert_eq!(status(&broker, "pf").await?, "gone");

    b1.stop().await?;
    broker.stop().await?;
    Ok(())
}

async fn payment(broker: &TestBroker, group: &str, overdue: bool) -> anyhow::Result<String> {
    let group = group.parse()?;
    let req = if overdue {
        AdminRequestV1::GroupSetPaymentOverdue { group }
    } else {
        AdminRequestV1::GroupClearPaymentOverdue { group }
    };
    match broker.admin(req).await? {
        AdminResponseV1::Group(d) => Ok(d.info.status),
        other => bail!("payment change answered {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_overdue_refuses_new_sessions_stops_scale_out_survives_a_restart_and_clears(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(whole_second_now());
    let config = GroupsConfig {
        clock: clock.clock(),
        ..GroupsConfig::default()
    };
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    alice(&broker).await?;
    // One session a host: a second session would scale out.
    let mut payg = spec("po", 1, BillingSpec::PayAsYouGo);
    payg.policy.concurrent_sessions = Some(1);
    payg.policy.max_elastic = Some(1);
    publish(&broker, payg).await?;
    let mut h1 = agent_of(&broker, "h1", "po").await?;
    let mut c1 = h1.client().await?;

    // Refusals name the status and what is allowed.
    let err = format!(
        "{:#}",
        broker
            .admin(AdminRequestV1::GroupClearPaymentOverdue {
                group: "po".parse()?,
            })
            .await
            .expect_err("not overdue")
    );
    assert!(
        err.contains("status published") && err.contains("payment-overdue is cleared"),
        "{err}"
    );
    let weekly = BillingSpec::Subscription {
        duration: "1w".into(),
        auto_renew: false,
    };
    publish(&broker, spec("sub", 0, weekly)).await?;
    let err = format!(
        "{:#}",
        broker
            .admin(AdminRequestV1::GroupSetPaymentOverdue {
                group: "sub".parse()?,
            })
            .await
            .expect_err("a subscription")
    );
    assert!(
        err.contains("subscription group in status published"),
        "{err}"
    );

    assert_eq!(payment(&broker, "po", true).await?, "payment-overdue");
    assert_eq!(not_available(&broker, "po").await?, "payment-overdue");
    // A session the host has goes on, and asks for no scale-out.
    c1.session_start("s1".parse()?, "alice".parse()?, StartProof::Trusted)
        .await?;
    h1.wait_synced().await?;
    let evs = events(&broker, "po").await?;
    assert!(of_kind(&evs, "scale_out").is_empty(), "{evs:#?}");
    assert!(of_kind(&evs, "status")
        .iter()
        .any(|e| e.message.starts_with("published -> payment-overdue")));
    let l = ferry_tests::admin::live(&broker, "po").await?;
    assert_eq!(l.resources[0].sessions.len(), 1);

    // Durable: a restarted broker is still overdue and still scales nothing out.
    broker.restart().await?;
    h1.wait_synced().await?;
    assert_eq!(status(&broker, "po").await?, "payment-overdue");
    let mut c1 = h1.client().await?;
    c1.session_start("s2".parse()?, "alice".parse()?, StartProof::Trusted)
        .await?;
    h1.wait_synced().await?;
    assert!(of_kind(&events(&broker, "po").await?, "scale_out").is_empty());

    // Paid: published again, and the waiting demand scales out at once.
    assert_eq!(payment(&broker, "po", false).await?, "published");
    let evs = wait_events(&broker, "po", "scale_out", 1).await?;
    assert!(of_kind(&evs, "status")
        .iter()
        .any(|e| e.message.starts_with("payment-overdue -> published")));

    // Purge is allowed while overdue (the table).
    assert_eq!(payment(&broker, "po", true).await?, "payment-overdue");
    broker
        .admin(AdminRequestV1::GroupPurge {
            group: "po".parse()?,
        })
        .await?;
    assert_eq!(status(&broker, "po").await?, "gone");

    h1.stop().await?;
    broker.stop().await?;
    Ok(())
}
