//! Elastic resources for real (issue 6): provisioners, enrollment, scale-in
//! through drain and delete, billing from ready to released, and elastic
//! resources kept across a broker restart.
//!
//! The broker runs in-process with a manual group clock; hosts are real
//! `ferry-agent` processes started by the local provisioner, or in-process
//! agents enrolled with the token an `exec` script was given. Every wait is
//! on an event or a status, bounded by `PATIENCE`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_agent::local::{LocalClient, StartProof};
use ferry_broker::clock::ManualClock;
use ferry_broker::config::{GroupsConfig, ProvisionerConfig, ProvisionerKind};
use ferry_broker::engine::billing::billed_seconds;
use ferry_broker::groups::actor::elastic::RETRY_FIRST;
use ferry_common::admin::{
    AdminRequestV1, AdminResponseV1, BillingSpec, GroupSpec, LiveGroupView, PolicySpec, SessionType,
};
use ferry_common::wire::EndReason;
use ferry_common::{SessionId, UnixMillis, UserId};
use ferry_tests::admin::{
    agent_of, agent_with, events, live, of_kind, publish, usage, wait_events,
};
use ferry_tests::bins::bin;
use ferry_tests::harness::{
    init_logging, manual_clock, whole_second_now, AgentIdentity, TestAgent, TestBroker, PATIENCE,
};
use ferry_tests::procs::running_processes;

const MAX_IDLE: Duration = Duration::from_secs(600);
const COOLDOWN: Duration = Duration::from_secs(300);

fn sid(s: &str) -> SessionId {
    s.parse().expect("session id")
}

fn spec(name: &str, concurrent: u32, step: u32, max_elastic: u32) -> GroupSpec {
    GroupSpec {
        name: Some(name.parse().expect("name")),
        region: "cn-hangzhou".into(),
        office_network: "office-net-1".into(),
        spec: "office-4c8g".into(),
        image: "img-1".into(),
        billing: BillingSpec::PayAsYouGo,
        base_resources: 1,
        session_type: SessionType::Independent,
        users: vec![],
        policy: PolicySpec {
            concurrent_sessions: Some(concurrent),
            usage_threshold: Some(50),
            scale_out_step: Some(step),
            max_elastic: Some(max_elastic),
            max_idle_ms: Some(MAX_IDLE.as_millis() as u64),
            scale_in_cooldown_ms: Some(COOLDOWN.as_millis() as u64),
            ..PolicySpec::default()
        },
    }
}

/// Publishes `spec` and starts session `s1` of alice on its base host `h1`,
/// which fills it (the sites' groups take one session a host) and so asks
/// for an elastic resource: `h1` (synced) and its local client.
async fn busy_group(
    broker: &TestBroker,
    spec: GroupSpec,
) -> anyhow::Result<(TestAgent, LocalClient)> {
    let group = spec.name.clone().context("a named spec")?.to_string();
    publish(broker, spec).await?;
    let h1 = agent_of(broker, "h1", &group).await?;
    let mut c1 = h1.client().await?;
    c1.session_start(sid("s1"), "alice".parse()?, StartProof::Trusted)
        .await?;
    h1.wait_synced().await?;
    Ok((h1, c1))
}

/// (resource, state, available) per resource of the live view.
fn states(l: &LiveGroupView) -> Vec<(String, String, bool)> {
    l.resources
        .iter()
        .map(|r| (r.resource.to_string(), r.state.clone(), r.available))
        .collect()
}

/// Processes whose command line mentions `needle` (the local agents' config
/// paths are unique to a test's temporary directory).
fn pids_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.display().to_string();
    running_processes()
        .into_iter()
        .filter(|(_, args)| args.join(" ").contains(&needle))
        .map(|(pid, _)| pid)
        .collect()
}

fn local_dir(broker: &TestBroker, resource: &str) -> PathBuf {
    broker
        .dir()
        .join("state")
        .join(ferry_broker::provision::local::LOCAL_AGENTS_DIR)
        .join(resource)
}

async fn local_client(broker: &TestBroker, resource: &str) -> anyhow::Result<LocalClient> {
    let socket = local_dir(broker, resource).join("agent.sock");
    LocalClient::connect(&socket)
        .await
        .with_context(|| format!("connect to {}", socket.display()))
}

fn local_config(clock: &ManualClock) -> GroupsConfig {
    GroupsConfig {
        clock: clock.clock(),
        provisioner: ProvisionerConfig {
            kind: ProvisionerKind::Local {
                agent_binary: Some(bin("ferry-agent")),
            },
            attempts: 3,
            ..ProvisionerConfig::default()
        },
        ..GroupsConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_agents_enroll_take_sessions_are_released_one_per_cooldown_and_billed_ready_to_released(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let t0 = whole_second_now();
    let clock = ManualClock::new(t0);
    let mut broker = TestBroker::start_with_groups(dir.path(), local_config(&clock)).await?;
    publish(&broker, spec("lp", 2, 2, 2)).await?;
    let mut h1 = agent_of(&broker, "h1", "lp").await?;
    let mut c1 = h1.client().await?;
    let alice: UserId = "alice".parse()?;

    // A burst on the base resource: 2 x 100 > 50 x 2, two resources at once.
    c1.session_start(sid("s1"), alice.clone(), StartProof::Trusted)
        .await?;
    c1.session_start(sid("s2"), alice.clone(), StartProof::Trusted)
        .await?;
    h1.wait_synced().await?;
    let evs = wait_events(&broker, "lp", "scale_out", 1).await?;
    let out = of_kind(&evs, "scale_out");
    assert!(
        out[0].message.contains("lp-e1, lp-e2"),
        "{}",
        out[0].message
    );

    // Both agents are started by the local provisioner, enroll with their
    // tokens and register: ready, billed from here.
    let evs = wait_events(&broker, "lp", "created", 2).await?;
    assert_eq!(of_kind(&evs, "provisioned").len(), 2, "{evs:#?}");
    assert_eq!(of_kind(&evs, "enrolled").len(), 2, "{evs:#?}");
    let ready_at = t0;
    for e in of_kind(&evs, "created") {
        assert_eq!(e.at, ready_at);
    }
    for r in ["lp-e1", "lp-e2"] {
        let d = local_dir(&broker, r);
        assert!(d.join("agent.pem").is_file(), "{r} has its certificate");
        assert_eq!(pids_mentioning(&d).len(), 1, "one process for {r}");
    }

    // The new agents take sessions (reported through their local sockets).
    let mut e1 = local_client(&broker, "lp-e1").await?;
    e1.session_start(sid("s3"), alice.clone(), StartProof::Trusted)
        .await?;
    e1.wait_synced(PATIENCE).await?;
    let l = live(&broker, "lp").await?;
    let e1_view = l
        .resources
        .iter()
        .find(|r| r.resource.as_str() == "lp-e1")
        .context("lp-e1 in the view")?;
    assert_eq!(
        e1_view
            .sessions
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
        ["s3"]
    );

    // Load goes away at t0.
    e1.session_end(sid("s3"), EndReason::Logout).await?;
    e1.wait_synced(PATIENCE).await?;
    c1.session_end(sid("s1"), EndReason::Logout).await?;
    c1.session_end(sid("s2"), EndReason::Logout).await?;
    h1.wait_synced().await?;

    // max_idle later (the clock wakes the group's timer), one is scaled
    // in: at once `releasing`, so no session is placed on it from the
    // decision on; then drained, released, deleted.
    clock.advance(MAX_IDLE);
    let first_release = clock.now();
    let evs = wait_events(&broker, "lp", "scale_in", 1).await?;
    let scale_in = of_kind(&evs, "scale_in");
    assert_eq!(scale_in.len(), 1, "one per cooldown");
    assert_eq!(scale_in[0].at, first_release);
    let evs = wait_events(&broker, "lp", "deleted", 1).await?;
    let released = of_kind(&evs, "released");
    assert_eq!(released.len(), 1, "{evs:#?}");
    assert!(
        released[0].message.contains("lp-e1"),
        "{}",
        released[0].message
    );
    assert_eq!(released[0].at, first_release);
    assert!(pids_mentioning(&local_dir(&broker, "lp-e1")).is_empty());
    assert!(
        !local_dir(&broker, "lp-e1").exists(),
        "its directory is removed"
    );
    let l = live(&broker, "lp").await?;
    let now: Vec<(String, String)> = states(&l)[1..]
        .iter()
        .map(|(r, s, _)| (r.clone(), s.clone()))
        .collect();
    assert_eq!(
        now,
        [
            ("lp-e1".into(), "released".into()),
            ("lp-e2".into(), "ready".into())
        ]
    );

    // The second one at the end of the cooldown, not before.
    clock.advance(COOLDOWN);
    let second_release = clock.now();
    let evs = wait_events(&broker, "lp", "deleted", 2).await?;
    assert_eq!(of_kind(&evs, "scale_in")[1].at, second_release);
    let released = of_kind(&evs, "released");
    assert_eq!(released.len(), 2, "{evs:#?}");
    assert_eq!(released[1].at, second_release);
    assert!(pids_mentioning(&local_dir(&broker, "lp-e2")).is_empty());

    // Billing: exactly the ready-to-released intervals.
    let to = UnixMillis(t0.0 + 3_600_000);
    let report = usage(&broker, "lp", t0, to).await?;
    let g = &report.groups[0];
    let expected = billed_seconds(ready_at, Some(first_release), to)
        + billed_seconds(ready_at, Some(second_release), to);
    assert_eq!(g.elastic_seconds, expected);
    assert_eq!(g.elastic_seconds, 600 + 900);

    h1.stop().await?;
    broker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_agents_are_stopped_when_the_broker_stops() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(whole_second_now());
    let mut broker = TestBroker::start_with_groups(dir.path(), local_config(&clock)).await?;
    let (mut h1, _c1) = busy_group(&broker, spec("ls", 1, 1, 1)).await?;
    wait_events(&broker, "ls", "created", 1).await?;
    let d = local_dir(&broker, "ls-e1");
    assert_eq!(pids_mentioning(&d).len(), 1);
    broker.stop().await?;
    assert!(
        pids_mentioning(&d).is_empty(),
        "a local agent outlived the broker"
    );
    h1.stop().await?;
    Ok(())
}

/// An exec script that counts its calls in `<dir>/<name>.count`, fails
/// (exit 1, a line on stderr) for the first `failures` calls, and on success
/// writes `$FERRY_ENROLL_TOKEN` to `<dir>/token`.
fn counting_script(dir: &Path, name: &str, failures: u32) -> anyhow::Result<Vec<String>> {
    let script = dir.join(format!("{name}.sh"));
    let count = dir.join(format!("{name}.count"));
    std::fs::write(
        &script,
        format!(
            r#"n=$(( $(cat '{count}' 2>/dev/null || echo 0) + 1 ))
echo $n > '{count}'
if [ $n -le {failures} ]; then echo "{name} boom $n for $1" >&2; exit 1; fi
echo "$FERRY_ENROLL_TOKEN" > '{dir}/token'
exit 0
"#,
            count = count.display(),
            dir = dir.display(),
        ),
    )?;
    // Run through sh: exec'ing a file just written could fail with ETXTBSY.
    Ok(vec![
        "/bin/sh".into(),
        script.display().to_string(),
        "{resource}".into(),
    ])
}

/// Groups with an exec provisioner of [`counting_script`]s in `scripts`
/// whose first `create_failures` creations and `delete_failures` deletions
/// fail.
fn exec_config(
    clock: &ManualClock,
    scripts: &Path,
    create_failures: u32,
    delete_failures: u32,
) -> anyhow::Result<GroupsConfig> {
    std::fs::create_dir_all(scripts)?;
    Ok(GroupsConfig {
        clock: clock.clock(),
        provisioner: ProvisionerConfig {
            kind: ProvisionerKind::Exec {
                create: counting_script(scripts, "create", create_failures)?,
                delete: counting_script(scripts, "delete", delete_failures)?,
            },
            ..ProvisionerConfig::default()
        },
        ..GroupsConfig::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_exec_create_and_delete_are_retried_reported_and_not_billed() -> anyhow::Result<()>
{
    init_logging();
    let dir = tempfile::tempdir()?;
    let scripts = dir.path().join("scripts");
    let t0 = whole_second_now();
    let clock = ManualClock::new(t0);
    let mut config = exec_config(&clock, &scripts, 2, 100)?;
    config.provisioner.attempts = 3;
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    let (mut h1, mut c1) = busy_group(&broker, spec("ex", 1, 1, 1)).await?;

    // Create: two failures, each an event with its attempt and stderr, then
    // success after the doubling waits.
    let evs = wait_events(&broker, "ex", "provision-failed", 1).await?;
    let failed = of_kind(&evs, "provision-failed");
    assert!(
        failed[0].message.contains("attempt 1 of 3")
            && failed[0].message.contains("create boom 1 for ex-e1"),
        "{}",
        failed[0].message
    );
    clock.advance(RETRY_FIRST);
    let evs = wait_events(&broker, "ex", "provision-failed", 2).await?;
    assert!(of_kind(&evs, "provision-failed")[1]
        .message
        .contains("attempt 2 of 3"));
    assert!(of_kind(&evs, "provisioned").is_empty());
    clock.advance(RETRY_FIRST * 2);
    wait_events(&broker, "ex", "provisioned", 1).await?;
    assert_eq!(
        std::fs::read_to_string(scripts.join("create.count"))?.trim(),
        "3"
    );

    // Nothing is billed while it is being created.
    clock.advance(Duration::from_secs(60));
    let ready_at = clock.now();
    let before = usage(&broker, "ex", t0, ready_at).await?;
    assert_eq!(before.groups[0].elastic_seconds, 0);

    // The "host" enrolls with the token the script was given; the same
    // token cannot enroll twice.
    let token = std::fs::read_to_string(scripts.join("token"))?
        .trim()
        .to_owned();
    let id_dir = dir.path().join("ex-e1-id");
    let target = ferry_agent::enroll::EnrollTarget {
        broker_addr: broker.agent_addr().to_string(),
        broker_name: "localhost".into(),
        ca_cert: broker.pki_dir().join(ferry_broker::pki::CA_CERT),
        token: token.clone(),
        cert: id_dir.join("agent.pem"),
        key: id_dir.join("agent-key.pem"),
        expect: None,
    };
    let resource = ferry_agent::enroll::enroll(&target).await?;
    assert_eq!(resource.as_str(), "ex-e1");
    let again = ferry_agent::enroll::enroll(&ferry_agent::enroll::EnrollTarget {
        cert: id_dir.join("again.pem"),
        key: id_dir.join("again-key.pem"),
        ..target.clone()
    })
    .await;
    assert!(
        again
            .as_ref()
            .is_err_and(|e| e.to_string().contains("already used")),
        "{again:?}"
    );
    let identity = AgentIdentity {
        ca_cert: target.ca_cert.clone(),
        cert: target.cert.clone(),
        key: target.key.clone(),
    };
    let mut e1 = agent_with(&broker, "ex-e1", "ex", &identity).await?;
    let evs = wait_events(&broker, "ex", "created", 1).await?;
    assert_eq!(of_kind(&evs, "created")[0].at, ready_at);

    // Scale-in: released when the agent answers the drain; the delete fails
    // every time, is retried and reported, and billing has stopped anyway.
    c1.session_end(sid("s1"), EndReason::Logout).await?;
    h1.wait_synced().await?;
    clock.advance(MAX_IDLE);
    let released_at = clock.now();
    let evs = wait_events(&broker, "ex", "released", 1).await?;
    assert_eq!(of_kind(&evs, "released")[0].at, released_at);
    let evs = wait_events(&broker, "ex", "provision-failed", 3).await?;
    assert!(of_kind(&evs, "provision-failed")[2]
        .message
        .contains("delete of ex-e1 failed (attempt 1 of 3)"));
    clock.advance(RETRY_FIRST);
    wait_events(&broker, "ex", "provision-failed", 4).await?;
    clock.advance(RETRY_FIRST * 2);
    let evs = wait_events(&broker, "ex", "delete-failed", 1).await?;
    assert_eq!(of_kind(&evs, "provision-failed").len(), 5, "{evs:#?}");
    assert!(of_kind(&evs, "deleted").is_empty());
    let l = live(&broker, "ex").await?;
    assert!(
        l.flagged
            .iter()
            .any(|f| f.contains("ex-e1") && f.contains("not deleted")),
        "{:?}",
        l.flagged
    );

    let to = UnixMillis(t0.0 + 3_600_000);
    let report = usage(&broker, "ex", t0, to).await?;
    assert_eq!(
        report.groups[0].elastic_seconds,
        billed_seconds(ready_at, Some(released_at), to)
    );
    assert_eq!(report.groups[0].elastic_seconds, 600);

    e1.stop().await?;
    h1.stop().await?;
    broker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elastic_resource_survives_a_broker_restart_and_numbering_goes_on() -> anyhow::Result<()>
{
    init_logging();
    let dir = tempfile::tempdir()?;
    let (clock, config) = manual_clock();
    let t0 = clock.now();
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    let (mut h1, mut c1) = busy_group(&broker, spec("rs", 1, 1, 2)).await?;
    wait_events(&broker, "rs", "scale_out", 1).await?;
    // Without a provisioner, a host configured as rs-e1 completes it.
    let mut e1 = agent_of(&broker, "rs-e1", "rs").await?;
    wait_events(&broker, "rs", "created", 1).await?;
    let ready_at = t0;
    // No load at the restart.
    c1.session_end(sid("s1"), EndReason::Logout).await?;
    h1.wait_synced().await?;

    clock.advance(Duration::from_secs(120));
    broker.restart().await?;
    let evs = wait_events(&broker, "rs", "restored", 1).await?;
    assert!(of_kind(&evs, "released").is_empty(), "{evs:#?}");
    // Both agents reconnect by themselves; rs-e1 finds its slot.
    h1.wait_synced().await?;
    e1.wait_synced().await?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let l = live(&broker, "rs").await?;
        if states(&l)
            == [
                ("h1".into(), "ready".into(), true),
                ("rs-e1".into(), "ready".into(), true),
            ]
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("rs-e1 did not come back: {:?}", states(&l));
        }
        tokio::task::yield_now().await;
    }
    let evs = events(&broker, "rs").await?;
    assert!(
        !of_kind(&evs, "flagged")
            .iter()
            .any(|e| e.message.contains("rs-e1") && e.message.contains("did not ask for")),
        "{evs:#?}"
    );

    // Numbering continues: the next scale-out (2 x 100 > 50 x 2) asks for
    // rs-e2.
    c1.session_start(sid("s4"), "alice".parse()?, StartProof::Trusted)
        .await?;
    c1.session_start(sid("s2"), "alice".parse()?, StartProof::Trusted)
        .await?;
    h1.wait_synced().await?;
    let evs = wait_events(&broker, "rs", "scale_out", 2).await?;
    assert!(
        of_kind(&evs, "scale_out")[1].message.contains("rs-e2"),
        "{evs:#?}"
    );

    // Its billing interval stayed open across the restart.
    let to = UnixMillis(t0.0 + 3_600_000);
    let report = usage(&broker, "rs", t0, to).await?;
    assert_eq!(
        report.groups[0].elastic_seconds,
        billed_seconds(ready_at, None, report.to)
    );

    e1.stop().await?;
    h1.stop().await?;
    broker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_whose_agent_never_registers_is_reported_deleted_and_not_billed(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let scripts = dir.path().join("scripts");
    let t0 = whole_second_now();
    let clock = ManualClock::new(t0);
    let register_timeout = Duration::from_secs(900);
    let mut config = exec_config(&clock, &scripts, 0, 0)?;
    config.provisioner.register_timeout = register_timeout;
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    let (mut h1, _c1) = busy_group(&broker, spec("rt", 1, 1, 1)).await?;
    wait_events(&broker, "rt", "provisioned", 1).await?;

    // No agent comes: at the deadline the creation fails, the resource is
    // deleted through the provisioner and flagged for the operator.
    clock.advance(register_timeout);
    let evs = wait_events(&broker, "rt", "deleted", 1).await?;
    assert_eq!(of_kind(&evs, "register-timeout").len(), 1, "{evs:#?}");
    assert_eq!(
        std::fs::read_to_string(scripts.join("delete.count"))?.trim(),
        "1"
    );
    let l = live(&broker, "rt").await?;
    assert_eq!(states(&l)[1].1, "released");
    assert!(
        l.flagged
            .iter()
            .any(|f| f.contains("rt-e1") && f.contains("did not register")),
        "{:?}",
        l.flagged
    );
    // It no longer holds capacity: usage is still high, so rt-e2 is asked for.
    let evs = wait_events(&broker, "rt", "scale_out", 2).await?;
    assert!(of_kind(&evs, "scale_out")[1].message.contains("rt-e2"));
    let report = usage(&broker, "rt", t0, UnixMillis(t0.0 + 3_600_000)).await?;
    assert_eq!(report.groups[0].elastic_seconds, 0);

    h1.stop().await?;
    broker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_group_deletes_its_local_elastic_agents_and_bills_them_to_the_purge(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let t0 = whole_second_now();
    let clock = ManualClock::new(t0);
    let mut broker = TestBroker::start_with_groups(dir.path(), local_config(&clock)).await?;
    let (mut h1, _c1) = busy_group(&broker, spec("pg", 1, 1, 1)).await?;
    let evs = wait_events(&broker, "pg", "created", 1).await?;
    let ready_at = t0;
    assert_eq!(of_kind(&evs, "created")[0].at, ready_at);
    let d = local_dir(&broker, "pg-e1");
    assert_eq!(pids_mentioning(&d).len(), 1, "one process for pg-e1");

    // Pay-as-you-go: purged while published, its elastic agent running.
    clock.advance(Duration::from_secs(120));
    let purged_at = clock.now();
    let answer = broker
        .admin(AdminRequestV1::GroupPurge {
            group: "pg".parse()?,
        })
        .await?;
    assert!(matches!(answer, AdminResponseV1::Done { .. }), "{answer:?}");

    // The actor is gone, but the elastic host is deleted all the same.
    let evs = wait_events(&broker, "pg", "deleted", 1).await?;
    let deleted = of_kind(&evs, "deleted");
    assert_eq!(deleted.len(), 1, "{evs:#?}");
    assert!(
        deleted[0].message.contains("pg-e1") && deleted[0].message.contains("local"),
        "{}",
        deleted[0].message
    );
    assert!(of_kind(&evs, "provision-failed").is_empty(), "{evs:#?}");
    assert!(
        pids_mentioning(&d).is_empty(),
        "the elastic agent of a purged group still runs"
    );
    assert!(!d.exists(), "its directory is removed");

    // Billed from ready to the purge, no more.
    let to = UnixMillis(t0.0 + 3_600_000);
    let report = usage(&broker, "pg", t0, to).await?;
    let g = &report.groups[0];
    assert_eq!(
        g.elastic_seconds,
        billed_seconds(ready_at, Some(purged_at), to)
    );
    assert_eq!(g.elastic_seconds, 120);

    h1.stop().await?;
    broker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delete_of_a_purged_groups_elastic_host_is_retried_at_the_broker_start(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let scripts = dir.path().join("scripts");
    let clock = ManualClock::new(whole_second_now());
    let mut config = exec_config(&clock, &scripts, 0, 1)?;
    config.provisioner.attempts = 1;
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    let (mut h1, _c1) = busy_group(&broker, spec("pr", 1, 1, 1)).await?;
    wait_events(&broker, "pr", "provisioned", 1).await?;
    // Created but not enrolled: pending, and not available (it takes no
    // session before its agent registers).
    let l = live(&broker, "pr").await?;
    assert!(
        states(&l).contains(&("pr-e1".into(), "pending".into(), false)),
        "{:?}",
        states(&l)
    );

    // Purged while pr-e1 is pending: its one delete attempt fails.
    broker
        .admin(AdminRequestV1::GroupPurge {
            group: "pr".parse()?,
        })
        .await?;
    let evs = wait_events(&broker, "pr", "delete-failed", 1).await?;
    assert!(of_kind(&evs, "deleted").is_empty(), "{evs:#?}");

    // The next broker run retries it, once, and it is done.
    broker.restart().await?;
    let evs = wait_events(&broker, "pr", "deleted", 1).await?;
    assert!(
        of_kind(&evs, "deleted")[0].message.contains("pr-e1"),
        "{evs:#?}"
    );
    assert_eq!(
        std::fs::read_to_string(scripts.join("delete.count"))?.trim(),
        "2"
    );

    h1.stop().await?;
    broker.stop().await?;
    Ok(())
}
