//! `group update-image` end to end, in one process: a real broker with a
//! manual group clock and real agents whose warn, disconnect and image hooks
//! are shell scripts in the test's temp dir. The disconnect hook ends the
//! session through the real `ferry-agent` CLI, as a streaming server would.
//!
//! Every wait is on a signal or a bounded series of admin requests; the
//! warning deadline passes when the test moves the group clock.

use ferry_agent::local::StartProof;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_broker::admin::AdminClientError;
use ferry_common::admin::{
    AdminError, AdminErrorCode, AdminRequestV1, AdminResponseV1, BillingSpec, GroupSpec,
    GroupVersionsInfo, ImageUpdateSpec, PolicySpec, SessionType,
};
use ferry_common::{SessionId, UnixMillis, UserId};
use ferry_tests::admin::{events, live, of_kind, publish, rollouts, show, usage, wait_events};
use ferry_tests::harness::{init_logging, manual_clock, TestAgent, TestBroker, PATIENCE};

const WARNING: Duration = Duration::from_secs(300);

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
            usage_threshold: Some(100),
            scale_out_step: Some(1),
            max_elastic: Some(2),
            max_idle_ms: Some(3_600_000),
            ..PolicySpec::default()
        },
    }
}

/// Writes the hook scripts of `resource` into `dir`: each appends a line to
/// the shared `hooks.log` (`warn s1 <deadline>`, `disconnect s1`, `image h1
/// img-2`); the disconnect hook then ends the session through the agent's
/// local socket; the image hook exits `image_exit`.
fn hooks(
    dir: &Path,
    resource: &str,
    socket: &Path,
    image_exit: u8,
) -> anyhow::Result<(Vec<String>, Vec<String>, Vec<String>)> {
    let log = dir.join("hooks.log");
    let agent = ferry_tests::bins::bin("ferry-agent");
    let script = |name: &str, body: String| -> anyhow::Result<Vec<String>> {
        let path = dir.join(format!("{resource}-{name}.sh"));
        std::fs::write(&path, body)?;
        Ok(vec!["/bin/sh".into(), path.display().to_string()])
    };
    let warn = script(
        "warn",
        format!(
            "echo \"warn $2 $FERRY_DEADLINE_MS\" >> '{}'\n",
            log.display()
        ),
    )?;
    let disconnect = script(
        "disconnect",
        format!(
            "echo \"disconnect $2\" >> '{log}'\n\
             exec '{agent}' --socket '{socket}' session end --session \"$2\" --reason disconnected\n",
            log = log.display(),
            agent = agent.display(),
            socket = socket.display()
        ),
    )?;
    let image = script(
        "image",
        format!(
            "echo \"image {resource} $2 $FERRY_IMAGE\" >> '{}'\nexit {image_exit}\n",
            log.display()
        ),
    )?;
    Ok((warn, disconnect, image))
}

/// Builds the real binaries the hooks and the CLI steps use, before any
/// broker runs (a build inside a running test would hold a runtime worker).
async fn binaries() -> anyhow::Result<()> {
    tokio::task::spawn_blocking(|| {
        ferry_tests::bins::bin("ferry-agent");
        ferry_tests::bins::bin("ferryctl");
    })
    .await?;
    Ok(())
}

/// An agent of `resource` in `group` with the hooks of [`hooks`], synced.
async fn agent(
    broker: &TestBroker,
    dir: &Path,
    resource: &str,
    group: &str,
    image_exit: u8,
    image_version: &str,
) -> anyhow::Result<TestAgent> {
    let identity = broker.issue_identity(resource)?;
    let mut config = broker.agent_config(resource, &identity)?;
    config.group = Some(group.parse()?);
    ferry_tests::admin::assign(broker, resource, group).await?;
    config.image_version = image_version.into();
    let (warn, disconnect, image) = hooks(dir, resource, &config.local_socket, image_exit)?;
    config.hooks.warn = Some(warn);
    config.hooks.disconnect = Some(disconnect);
    config.hooks.image = Some(image);
    let agent = TestAgent::start_with(config).await?;
    agent.wait_synced().await?;
    Ok(agent)
}

fn log_lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("hooks.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn update_image(
    broker: &TestBroker,
    group: &str,
    image: &str,
) -> anyhow::Result<AdminResponseV1> {
    broker
        .admin(AdminRequestV1::GroupUpdateImage(ImageUpdateSpec {
            group: group.parse()?,
            image: image.into(),
            warning_ms: u64::try_from(WARNING.as_millis())?,
        }))
        .await
}

/// The broker's refusal of `r`.
fn refusal(r: anyhow::Result<AdminResponseV1>) -> anyhow::Result<AdminError> {
    match r {
        Ok(other) => bail!("not refused: {other:?}"),
        Err(e) => match e.downcast_ref::<AdminClientError>() {
            Some(AdminClientError::Remote(err)) => Ok(err.clone()),
            _ => Err(e),
        },
    }
}

async fn versions(broker: &TestBroker, group: &str) -> anyhow::Result<GroupVersionsInfo> {
    match broker
        .admin(AdminRequestV1::GroupVersions {
            group: group.parse()?,
        })
        .await?
    {
        AdminResponseV1::GroupVersions(v) => Ok(v),
        other => bail!("versions answered {other:?}"),
    }
}

/// Waits until the group's versions satisfy `want`: one admin request per
/// round, bounded by twice [`PATIENCE`] (agents reconnect after a restart
/// with their backoff).
async fn wait_versions(
    broker: &TestBroker,
    group: &str,
    want: impl Fn(&GroupVersionsInfo) -> bool,
) -> anyhow::Result<GroupVersionsInfo> {
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    loop {
        let v = versions(broker, group).await?;
        if want(&v) {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("versions never as wanted: {v:?}");
        }
        tokio::task::yield_now().await;
    }
}

/// The group's status events, oldest first.
async fn statuses(broker: &TestBroker, group: &str) -> anyhow::Result<Vec<String>> {
    Ok(of_kind(&events(broker, group).await?, "status")
        .into_iter()
        .map(|e| e.message.clone())
        .collect())
}

/// Waits (bounded: [`wait_events`]) for the status event that ends the update.
async fn wait_finished(broker: &TestBroker, group: &str) -> anyhow::Result<String> {
    wait_status_events(broker, group, 3).await
}

/// Waits for the group's `n`th status event and returns it.
async fn wait_status_events(broker: &TestBroker, group: &str, n: usize) -> anyhow::Result<String> {
    let evs = wait_events(broker, group, "status", n).await?;
    let last = of_kind(&evs, "status")
        .last()
        .map(|e| e.message.clone())
        .context("a status event")?;
    Ok(last)
}

/// (line of `warn s`, line of `disconnect s`) in the hooks' log.
fn order_of(lines: &[String], session: &str) -> (Option<usize>, Option<usize>) {
    let at = |prefix: String| lines.iter().position(|l| l.starts_with(&prefix));
    (
        at(format!("warn {session} ")),
        at(format!("disconnect {session}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_warned_then_disconnected_and_every_host_switches_at_no_cost(
) -> anyhow::Result<()> {
    init_logging();
    binaries().await?;
    let dir = tempfile::tempdir()?;
    let (clock, config) = manual_clock();
    let t0 = clock.now();
    let broker = TestBroker::start_with_groups(dir.path(), config).await?;
    publish(&broker, group_spec("img")).await?;
    let h1 = agent(&broker, dir.path(), "h1", "img", 0, "img-1").await?;
    let h2 = agent(&broker, dir.path(), "h2", "img", 0, "img-1").await?;
    let (mut c1, mut c2) = (h1.client().await?, h2.client().await?);
    c1.session_start(sid("s1"), uid("alice"), StartProof::Trusted)
        .await?;
    c2.session_start(sid("s2"), uid("bob"), StartProof::Trusted)
        .await?;
    h1.wait_synced().await?;
    h2.wait_synced().await?;
    let to = UnixMillis(t0.0 + 3_600_000);
    let before = usage(&broker, "img", t0, to).await?;
    let resources_before = live(&broker, "img").await?.resources.len();

    let AdminResponseV1::Group(d) = update_image(&broker, "img", "img-2").await? else {
        bail!("update-image did not answer the group");
    };
    assert_eq!(d.info.status, "updating");
    assert_eq!(d.info.image, "img-1", "the group's image changes when done");
    // A second update while one runs is refused, naming the status.
    let e = refusal(update_image(&broker, "img", "img-3").await)?;
    assert_eq!(e.code, AdminErrorCode::NotAllowed);
    assert!(
        e.message.contains("status updating") && e.message.contains("published"),
        "{}",
        e.message
    );

    // Both sessions are warned with the deadline, and stay open until it.
    let evs = wait_events(&broker, "img", "session-warned", 2).await?;
    assert!(of_kind(&evs, "warn-failed").is_empty(), "{evs:#?}");
    let deadline = t0.0 + i64::try_from(WARNING.as_millis())?;
    let lines = log_lines(dir.path());
    for s in ["s1", "s2"] {
        assert!(
            lines.contains(&format!("warn {s} {deadline}")),
            "{s}: {lines:?}"
        );
    }
    assert_eq!(
        broker.sessions(false).await?.len(),
        2,
        "open until the deadline"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("disconnect")),
        "{lines:?}"
    );
    // `group show` has the update: its target image, the deadline, each
    // host warned until it.
    let r = rollouts(&broker, "img").await?;
    assert_eq!(r.rollouts.len(), 1, "{r:#?}");
    let u = &r.rollouts[0];
    assert_eq!(
        (u.kind.as_str(), u.version.as_str(), u.state.as_str()),
        ("image-update", "img-2", "warning")
    );
    assert_eq!((u.start, u.deadline), (t0, Some(UnixMillis(deadline))));
    let steps: Vec<(&str, &str, Option<UnixMillis>)> = u
        .hosts
        .iter()
        .map(|h| (h.resource.as_str(), h.step.as_str(), h.until))
        .collect();
    let until = Some(UnixMillis(deadline));
    assert_eq!(steps, [("h1", "warned", until), ("h2", "warned", until)]);
    let socket = broker.admin_socket().display().to_string();
    let ferryctl = ferry_tests::bins::bin("ferryctl");
    let table =
        ferry_tests::procs::run_ok(&ferryctl, ["--socket", &socket, "group", "show", "img"])
            .await?;
    let headline = format!("image update {} to image img-2: warning since", u.id);
    // Times for people in whole seconds, like every table (JSON keeps the
    // milliseconds).
    let at = ferry_broker::render::rfc3339_secs(UnixMillis(deadline));
    let at_ms = ferry_broker::render::rfc3339(UnixMillis(deadline));
    assert!(
        table.contains(&headline) && table.contains(&at) && table.contains("warned"),
        "{table}"
    );
    assert!(!table.contains(&at_ms), "whole seconds: {table}");
    let warning = of_kind(&evs, "image-update")
        .into_iter()
        .find(|e| e.message.starts_with("warning "))
        .map(|e| e.message.clone())
        .unwrap_or_default();
    assert!(
        warning.contains(&format!("disconnected in 5m ({at})")),
        "{warning}"
    );

    // The deadline passes: sessions are disconnected, then hosts switch.
    clock.advance(WARNING);
    let last = wait_finished(&broker, "img").await?;
    assert!(
        last.starts_with("updating -> published") && last.contains("img-2"),
        "{last}"
    );
    let lines = log_lines(dir.path());
    for s in ["s1", "s2"] {
        let (warned, disconnected) = order_of(&lines, s);
        assert!(
            warned.is_some() && disconnected.is_some() && warned < disconnected,
            "{s} warned before its disconnect: {lines:?}"
        );
    }
    for h in ["h1", "h2"] {
        assert!(
            lines.contains(&format!("image {h} img-2 img-2")),
            "{h}'s image hook ran: {lines:?}"
        );
    }
    // Every session ended, through the hosts (their ends acknowledged).
    h1.wait_synced().await?;
    h2.wait_synced().await?;
    let all = broker.sessions(true).await?;
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(
        all.iter()
            .all(|s| s.ended_at.is_some() && s.end_reason.as_deref() == Some("disconnected")),
        "{all:?}"
    );
    // Each agent's inventory shows the new image; the group's image is it.
    let v = versions(&broker, "img").await?;
    assert_eq!(
        (v.image.as_str(), v.status.as_str()),
        ("img-2", "published")
    );
    let images: Vec<(String, String, bool)> = v
        .resources
        .iter()
        .map(|r| (r.resource.to_string(), r.image_version.clone(), r.connected))
        .collect();
    assert_eq!(
        images,
        [
            ("h1".into(), "img-2".into(), true),
            ("h2".into(), "img-2".into(), true)
        ]
    );
    assert!(v
        .resources
        .iter()
        .all(|r| r.image_update.as_deref() == Some("done")));
    let (detail, _) = show(&broker, "img").await?;
    assert_eq!(
        (detail.info.status.as_str(), detail.info.image.as_str()),
        ("published", "img-2")
    );
    // Over: nothing runs; each host's step is in the events.
    assert!(rollouts(&broker, "img").await?.rollouts.is_empty());
    let evs = events(&broker, "img").await?;
    for (h, s) in [("h1", "s1"), ("h2", "s2")] {
        let step =
            format!("{h} switching to image img-2 after disconnecting 1 open session(s): {s}");
        assert!(
            of_kind(&evs, "image-step")
                .iter()
                .any(|e| e.message == step),
            "{step}: {evs:#?}"
        );
    }
    // Nothing added, nothing billed for it.
    assert!(of_kind(&evs, "scale_out").is_empty(), "{evs:#?}");
    assert_eq!(
        live(&broker, "img").await?.resources.len(),
        resources_before
    );
    // Billing: the same intervals (sessions ended, so only their seconds
    // changed), each base resource billed from t0 up to now, nothing else.
    let intervals = |r: &ferry_common::admin::UsageReport| {
        r.groups
            .iter()
            .flat_map(|g| {
                g.resources
                    .iter()
                    .map(|r| (r.resource.to_string(), r.kind.clone()))
            })
            .collect::<Vec<_>>()
    };
    let after = usage(&broker, "img", t0, to).await?;
    assert_eq!(intervals(&after), intervals(&before));
    let each = ferry_broker::engine::billing::billed_seconds(t0, None, after.to);
    assert!(each > 0);
    assert!(after.groups[0]
        .resources
        .iter()
        .all(|r| r.ready_seconds == each));
    assert_eq!(after.groups[0].base_seconds, 2 * each);
    assert_eq!(after.groups[0].elastic_seconds, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_image_hook_marks_the_group_update_failed_naming_the_host() -> anyhow::Result<()>
{
    init_logging();
    binaries().await?;
    let dir = tempfile::tempdir()?;
    let (clock, config) = manual_clock();
    let broker = TestBroker::start_with_groups(dir.path(), config).await?;
    publish(&broker, group_spec("bad")).await?;
    let mut h1 = agent(&broker, dir.path(), "h1", "bad", 0, "img-1").await?;
    let _h2 = agent(&broker, dir.path(), "h2", "bad", 7, "img-1").await?;
    // h2's image hook fails after 100 lines of output (2 KiB).
    std::fs::write(
        dir.path().join("h2-image.sh"),
        format!(
            "echo \"image h2 $2 $FERRY_IMAGE\" >> '{}'\n\
             for i in $(seq 1 100); do echo \"image step $i failed\" >&2; done\n\
             exit 7\n",
            dir.path().join("hooks.log").display()
        ),
    )?;

    // Through the real CLI, as an operator would.
    let socket = broker.admin_socket().display().to_string();
    let ferryctl = ferry_tests::bins::bin("ferryctl");
    let out = ferry_tests::procs::run_ok(
        &ferryctl,
        [
            "--socket",
            &socket,
            "group",
            "update-image",
            "bad",
            "img-2",
            "--warning",
            "5m",
        ],
    )
    .await?;
    assert!(out.contains("updating"), "{out}");
    clock.advance(WARNING);
    let last = wait_finished(&broker, "bad").await?;
    assert!(
        last.starts_with("updating -> update-failed") && last.contains("h2 ("),
        "{last}"
    );
    assert!(!last.contains("h1 ("), "h1 switched: {last}");
    let evs = events(&broker, "bad").await?;
    let failed = of_kind(&evs, "image-switch-failed");
    assert_eq!(failed.len(), 1, "{evs:#?}");
    assert!(
        failed[0].message.starts_with("h2 "),
        "{}",
        failed[0].message
    );

    // h1 keeps the new image; the group keeps the old one and serves again.
    let v = versions(&broker, "bad").await?;
    assert_eq!(
        (v.image.as_str(), v.status.as_str()),
        ("img-1", "update-failed")
    );
    let by: Vec<(String, String, Option<String>)> = v
        .resources
        .iter()
        .map(|r| {
            (
                r.resource.to_string(),
                r.image_version.clone(),
                r.image_update.clone(),
            )
        })
        .collect();
    assert_eq!(by[0], ("h1".into(), "img-2".into(), Some("done".into())));
    assert_eq!(by[1].0, "h2");
    assert_eq!(by[1].1, "img-1");
    assert!(
        by[1]
            .2
            .as_deref()
            .is_some_and(|o| o.starts_with("failed: ")),
        "{by:?}"
    );
    // Only the end of the hook's output is kept, with its exit status, on
    // one line; every event fits a table row.
    let why = by[1].2.clone().unwrap_or_default();
    assert!(
        why.contains("image hook failed (exit status 7)")
            && why.contains("image step 100 failed")
            && !why.contains("image step 1 failed")
            && why.len() < 600,
        "{why}"
    );
    for e in &evs {
        assert!(
            !e.message.contains('\n') && e.message.len() < 1024,
            "{}: {}",
            e.kind,
            e.message
        );
    }
    // One truth per fact: `resources list` shows what each host runs (h1's
    // confirmed switch, before any reconnect) and that h2 takes no
    // sessions, as `group show` does.
    let listed: Vec<(String, String, bool, bool)> = broker
        .resources()
        .await?
        .iter()
        .map(|r| {
            (
                r.resource.to_string(),
                r.image_version.clone(),
                r.available,
                r.draining,
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("h1".into(), "img-2".into(), true, false),
            ("h2".into(), "img-1".into(), false, true)
        ]
    );
    let engine: Vec<(String, bool)> = live(&broker, "bad")
        .await?
        .resources
        .iter()
        .map(|r| (r.resource.to_string(), r.available))
        .collect();
    assert_eq!(engine, [("h1".into(), true), ("h2".into(), false)]);
    // h1's host goes away: both still name the image it switched to.
    h1.stop().await?;
    let deadline = tokio::time::Instant::now() + ferry_tests::harness::PATIENCE;
    while broker
        .resources()
        .await?
        .iter()
        .any(|r| r.connected && r.resource.as_str() == "h1")
    {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "h1 still connected");
        tokio::task::yield_now().await;
    }
    let away = broker.resources().await?;
    assert_eq!(
        (away[0].resource.as_str(), away[0].image_version.as_str()),
        ("h1", "img-2")
    );
    let v = versions(&broker, "bad").await?;
    assert_eq!(
        (
            v.resources[0].connected,
            v.resources[0].image_version.as_str()
        ),
        (false, "img-2")
    );
    let h1 = TestAgent::start_with(h1.config().clone()).await?;
    h1.wait_synced().await?;

    // `group show` has the group's image and each resource's versions.
    let table =
        ferry_tests::procs::run_ok(&ferryctl, ["--socket", &socket, "group", "show", "bad"])
            .await?;
    for part in [
        "image: img-1 (status update-failed)",
        "LAST IMAGE UPDATE",
        "failed: ",
    ] {
        assert!(table.contains(part), "{part} missing: {table}");
    }
    let json = ferry_tests::procs::run_ok(
        &ferryctl,
        ["--socket", &socket, "--json", "group", "show", "bad"],
    )
    .await?;
    let json: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(json["versions"]["image"], "img-1", "{json:#}");
    assert_eq!(
        json["versions"]["resources"][0]["image_version"], "img-2",
        "{json:#}"
    );
    assert_eq!(
        json["versions"]["resources"][1]["image_version"], "img-1",
        "{json:#}"
    );
    // The failing host was drained: the group serves from the others.
    let draining: Vec<(String, bool)> = broker
        .resources()
        .await?
        .iter()
        .map(|r| (r.resource.to_string(), r.draining))
        .collect();
    assert_eq!(draining, [("h1".into(), false), ("h2".into(), true)]);

    // The host is fixed; from update-failed the operator tries again, and
    // the host that switched now takes sessions again.
    std::fs::write(
        dir.path().join("h2-image.sh"),
        format!(
            "echo \"image h2 $2 $FERRY_IMAGE\" >> '{}'\n",
            dir.path().join("hooks.log").display()
        ),
    )?;
    let AdminResponseV1::Group(d) = update_image(&broker, "bad", "img-2").await? else {
        bail!("a retry from update-failed was refused");
    };
    assert_eq!(d.info.status, "updating");
    clock.advance(WARNING);
    let last = wait_status_events(&broker, "bad", 5).await?;
    assert!(last.starts_with("updating -> published"), "{last}");
    let v = versions(&broker, "bad").await?;
    assert_eq!(
        (v.image.as_str(), v.status.as_str()),
        ("img-2", "published")
    );
    assert!(
        v.resources.iter().all(|r| r.image_version == "img-2"),
        "{v:?}"
    );
    let evs = events(&broker, "bad").await?;
    assert!(
        of_kind(&evs, "image-switched")
            .iter()
            .any(|e| e.message.starts_with("h2 ") && e.message.contains("undrained")),
        "{evs:#?}"
    );
    assert!(
        broker.resources().await?.iter().all(|r| !r.draining),
        "h2 takes sessions again"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_resumes_and_a_host_already_on_the_image_is_not_switched_again(
) -> anyhow::Result<()> {
    init_logging();
    binaries().await?;
    let dir = tempfile::tempdir()?;
    let (clock, config) = manual_clock();
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    publish(&broker, group_spec("again")).await?;
    // h1 runs the target image already.
    let h1 = agent(&broker, dir.path(), "h1", "again", 0, "img-2").await?;
    let h2 = agent(&broker, dir.path(), "h2", "again", 0, "img-1").await?;
    update_image(&broker, "again", "img-2").await?;

    broker.restart().await?;
    h1.wait_synced().await?;
    h2.wait_synced().await?;
    let (detail, _) = show(&broker, "again").await?;
    assert_eq!(
        detail.info.status, "updating",
        "still updating after the restart"
    );
    clock.advance(WARNING);
    let last = wait_finished(&broker, "again").await?;
    assert!(last.starts_with("updating -> published"), "{last}");
    let lines = log_lines(dir.path());
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("image "))
            .collect::<Vec<_>>(),
        ["image h2 img-2 img-2"],
        "only h2 needed the switch"
    );
    let v = wait_versions(&broker, "again", |v| {
        v.resources.iter().all(|r| r.connected)
    })
    .await?;
    assert!(
        v.resources.iter().all(|r| r.image_version == "img-2"),
        "{v:?}"
    );
    Ok(())
}

/// The broker restarts during the warning: the warning counts the sessions
/// the group has open (its agents have not rejoined yet), and each is
/// warned again with the same deadline when its agent is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_the_warning_warns_the_open_sessions_again_when_their_agents_are_back(
) -> anyhow::Result<()> {
    init_logging();
    binaries().await?;
    let dir = tempfile::tempdir()?;
    let (clock, config) = manual_clock();
    let t0 = clock.now();
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    publish(&broker, group_spec("warm")).await?;
    let h1 = agent(&broker, dir.path(), "h1", "warm", 0, "img-1").await?;
    let h2 = agent(&broker, dir.path(), "h2", "warm", 0, "img-1").await?;
    let mut c1 = h1.client().await?;
    c1.session_start(sid("s1"), uid("alice"), StartProof::Trusted)
        .await?;
    h1.wait_synced().await?;
    update_image(&broker, "warm", "img-2").await?;
    wait_events(&broker, "warm", "session-warned", 1).await?;

    broker.restart().await?;
    // Once h1's agent is back, s1 is warned again, with the same deadline.
    let evs = wait_events(&broker, "warm", "session-warned", 2).await?;
    let warnings: Vec<&str> = of_kind(&evs, "image-update")
        .iter()
        .filter(|e| e.message.starts_with("warning "))
        .map(|e| e.message.as_str())
        .collect();
    // One before the restart, then (at least) one by the restarted broker
    // (its group actor may start twice at broker start): each counts s1.
    assert!(
        warnings.len() >= 2
            && warnings
                .iter()
                .all(|w| w.starts_with("warning 1 open session(s)")),
        "{warnings:#?}"
    );
    let deadline = t0.0 + i64::try_from(WARNING.as_millis())?;
    let lines = log_lines(dir.path());
    let warned: Vec<&String> = lines.iter().filter(|l| l.starts_with("warn s1 ")).collect();
    assert!(
        warned.len() >= 2 && warned.iter().all(|l| **l == format!("warn s1 {deadline}")),
        "{lines:?}"
    );
    h2.wait_synced().await?;
    clock.advance(WARNING);
    let last = wait_finished(&broker, "warm").await?;
    assert!(last.starts_with("updating -> published"), "{last}");
    let lines = log_lines(dir.path());
    let (warned, disconnected) = order_of(&lines, "s1");
    assert!(warned < disconnected, "{lines:?}");
    Ok(())
}

/// The switch had begun when the broker stopped: one host switched, the
/// other was away. The restarted broker resumes from the recorded outcomes:
/// the switched host is not switched again, the other is switched when its
/// agent comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_interrupted_by_a_restart_resumes_from_the_recorded_outcomes() -> anyhow::Result<()>
{
    init_logging();
    binaries().await?;
    let dir = tempfile::tempdir()?;
    let (clock, config) = manual_clock();
    let mut broker = TestBroker::start_with_groups(dir.path(), config).await?;
    publish(&broker, group_spec("resume")).await?;
    let h1 = agent(&broker, dir.path(), "h1", "resume", 0, "img-1").await?;
    let mut h2 = agent(&broker, dir.path(), "h2", "resume", 0, "img-1").await?;
    update_image(&broker, "resume", "img-2").await?;
    // h2's host is away when the switch starts.
    h2.stop().await?;
    clock.advance(WARNING);
    wait_events(&broker, "resume", "image-switched", 1).await?;
    let outcomes: Vec<Option<String>> = versions(&broker, "resume")
        .await?
        .resources
        .iter()
        .map(|r| r.image_update.clone())
        .collect();
    assert_eq!(outcomes, [Some("done".into()), Some("pending".into())]);
    assert_eq!(show(&broker, "resume").await?.0.info.status, "updating");

    broker.restart().await?;
    h1.wait_synced().await?;
    let h2 = TestAgent::start_with(h2.config().clone()).await?;
    h2.wait_synced().await?;
    let last = wait_finished(&broker, "resume").await?;
    assert!(last.starts_with("updating -> published"), "{last}");
    let lines = log_lines(dir.path());
    let images: Vec<&String> = lines.iter().filter(|l| l.starts_with("image ")).collect();
    assert_eq!(
        images,
        ["image h1 img-2 img-2", "image h2 img-2 img-2"],
        "each host switched once"
    );
    // Once both agents are back, their inventories show the image.
    let v = wait_versions(&broker, "resume", |v| {
        v.resources.iter().all(|r| r.connected)
    })
    .await?;
    assert_eq!(v.image, "img-2");
    assert!(
        v.resources.iter().all(|r| r.image_version == "img-2"),
        "{v:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_image_is_refused_outside_published_and_update_failed_and_checks_the_image(
) -> anyhow::Result<()> {
    init_logging();
    binaries().await?;
    let dir = tempfile::tempdir()?;
    let broker = TestBroker::start(dir.path()).await?;
    publish(&broker, group_spec("chk")).await?;
    let e = refusal(update_image(&broker, "chk", " ").await)?;
    assert_eq!(e.code, AdminErrorCode::Invalid);
    assert!(e.message.contains("image: required"), "{}", e.message);
    let e = refusal(update_image(&broker, "nope", "img-2").await)?;
    assert_eq!(e.code, AdminErrorCode::NotFound);
    assert_eq!(statuses(&broker, "chk").await?.len(), 1, "only the publish");
    Ok(())
}
