//! OTA updates end to end (SPEC section 9, issue 7): a real broker and real
//! agents in this process, with update, warn and disconnect hooks written as
//! shell scripts into the test's temp dir; sessions reported through the
//! agents' local sockets as a streaming server would.
//!
//! Rollouts start on the broker's wall clock a second after they are
//! scheduled and use a drain deadline of two seconds: the test waits for
//! what the broker reports (admin answers, the hooks' logs), each wait
//! bounded by [`PATIENCE`]; nothing sleeps.

use ferry_agent::local::StartProof;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ferry_common::admin::{
    AdminRequestV1, AdminResponseV1, BillingSpec, GroupSpec, OtaOfferSpec, OtaScheduleInfo,
    OtaScheduleSpec, OtaUpdateInfo, PolicySpec, SessionType,
};
use ferry_common::wire::EndReason;
use ferry_common::{SessionId, UnixMillis, UserId};
use ferry_tests::admin::{events, live, of_kind, publish, rollouts, show};
use ferry_tests::harness::{init_logging, TestAgent, TestBroker, PATIENCE};

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
            usage_threshold: Some(100),
            scale_out_step: Some(1),
            max_elastic: Some(0),
            max_idle_ms: Some(3_600_000),
            ..PolicySpec::default()
        },
    }
}

/// Writes an executable shell script.
fn script(path: &Path, body: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path.to_owned())
}

/// Starts the agent of `resource` in `group` with hooks that log to
/// `logs/`: the update hook exits `update_exit`.
async fn agent(
    broker: &TestBroker,
    logs: &Path,
    resource: &str,
    group: &str,
    update_exit: u8,
) -> anyhow::Result<TestAgent> {
    let identity = broker.issue_identity(resource)?;
    let mut config = broker.agent_config(resource, &identity)?;
    config.group = Some(group.parse()?);
    ferry_tests::admin::assign(broker, resource, group).await?;
    let bin = logs.join(format!("{resource}-hooks"));
    std::fs::create_dir_all(&bin)?;
    let update = script(
        &bin.join("update"),
        &format!(
            "echo \"{resource} $FERRY_UPDATE_ID $FERRY_COMPONENT $FERRY_VERSION $FERRY_PACKAGE\" >> {}\nexit {update_exit}",
            logs.join("update.log").display()
        ),
    )?;
    let warn = script(
        &bin.join("warn"),
        &format!(
            "echo \"$2 $FERRY_DEADLINE_MS\" >> {}",
            logs.join("warn.log").display()
        ),
    )?;
    // Milliseconds of the wall clock when the broker asked for the end.
    let disconnect = script(
        &bin.join("disconnect"),
        &format!(
            "echo \"$2 $(date +%s%3N)\" >> {}",
            logs.join("disconnect.log").display()
        ),
    )?;
    config.hooks.update = Some(vec![update.display().to_string()]);
    config.hooks.warn = Some(vec![warn.display().to_string()]);
    config.hooks.disconnect = Some(vec![disconnect.display().to_string()]);
    let agent = TestAgent::start_with(config).await?;
    agent.wait_synced().await?;
    Ok(agent)
}

/// Lines of a hook's log (none yet: empty).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

async fn offer(broker: &TestBroker, group: &str, version: &str) -> anyhow::Result<OtaUpdateInfo> {
    match broker
        .admin(AdminRequestV1::OtaOffer(OtaOfferSpec {
            group: group.parse()?,
            component: "office".into(),
            version: version.into(),
            package: "/srv/office.deb".into(),
            description: "fixes printing".into(),
        }))
        .await?
    {
        AdminResponseV1::OtaUpdates(mut u) if u.len() == 1 => Ok(u.remove(0)),
        other => bail!("offer answered {other:?}"),
    }
}

fn schedule_req(group: &str, update: u64, start: UnixMillis, wave: u32) -> AdminRequestV1 {
    AdminRequestV1::OtaSchedule(OtaScheduleSpec {
        group: group.parse().expect("name"),
        update,
        start,
        wave,
        drain_ms: 2_000,
    })
}

async fn one_schedule(broker: &TestBroker, req: AdminRequestV1) -> anyhow::Result<OtaScheduleInfo> {
    match broker.admin(req).await? {
        AdminResponseV1::OtaSchedules(mut s) if s.len() == 1 => Ok(s.remove(0)),
        other => bail!("answered {other:?}"),
    }
}

async fn history(broker: &TestBroker, group: &str) -> anyhow::Result<Vec<OtaScheduleInfo>> {
    match broker
        .admin(AdminRequestV1::OtaHistory {
            group: group.parse()?,
        })
        .await?
    {
        AdminResponseV1::OtaSchedules(s) => Ok(s),
        other => bail!("history answered {other:?}"),
    }
}

/// Waits (bounded; one admin request per round) until `done` holds for the
/// group's history, or for a file's lines.
async fn wait_until<T>(
    broker: &TestBroker,
    group: &str,
    what: &str,
    mut done: impl FnMut(&[OtaScheduleInfo]) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    loop {
        let h = history(broker, group).await?;
        if let Some(t) = done(&h) {
            return Ok(t);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("not {what}: {h:#?}");
        }
        tokio::task::yield_now().await;
    }
}

/// Waits (bounded) until exactly `names` are draining: a health report the
/// agent sent before the broker's last drain or undrain may still be on its
/// way, the next one settles it.
async fn wait_drained(broker: &TestBroker, names: &[&str]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let drained: Vec<String> = broker
            .resources()
            .await?
            .into_iter()
            .filter(|r| r.draining)
            .map(|r| r.resource.to_string())
            .collect();
        if drained == names {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("draining {drained:?}, expected {names:?}");
        }
        tokio::task::yield_now().await;
    }
}

fn now() -> UnixMillis {
    ferry_broker::clock::now_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_outside_the_window_are_refused_and_change_only_before_they_start(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let broker = TestBroker::start(dir.path()).await?;
    publish(&broker, group_spec("win", 1)).await?;
    let u = offer(&broker, "win", "3.2").await?;

    let past = broker
        .admin(schedule_req("win", u.id, UnixMillis(now().0 - 60_000), 1))
        .await
        .expect_err("a start in the past is refused");
    assert!(
        format!("{past:#}").contains("not in the future"),
        "{past:#}"
    );
    let far = broker
        .admin(schedule_req(
            "win",
            u.id,
            UnixMillis(now().0 + 8 * 86_400_000),
            1,
        ))
        .await
        .expect_err("a start beyond 7 days is refused");
    assert!(format!("{far:#}").contains("more than 7 days"), "{far:#}");

    let day = UnixMillis(now().0 + 86_400_000);
    let s = one_schedule(&broker, schedule_req("win", u.id, day, 1)).await?;
    assert_eq!((s.state.as_str(), s.start), ("scheduled", day));
    let twice = broker
        .admin(schedule_req("win", u.id, day, 1))
        .await
        .expect_err("one active schedule per group");
    assert!(
        format!("{twice:#}").contains("cancel it first"),
        "{twice:#}"
    );

    let later = UnixMillis(day.0 + 3_600_000);
    let moved = one_schedule(
        &broker,
        AdminRequestV1::OtaReschedule {
            schedule: s.id,
            start: later,
        },
    )
    .await?;
    assert_eq!(moved.start, later);
    let cancelled = one_schedule(&broker, AdminRequestV1::OtaCancel { schedule: s.id }).await?;
    assert_eq!(cancelled.state, "cancelled");
    let again = broker
        .admin(AdminRequestV1::OtaCancel { schedule: s.id })
        .await
        .expect_err("a cancelled schedule cannot change");
    assert!(format!("{again:#}").contains("cancelled"), "{again:#}");

    let h = history(&broker, "win").await?;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].state, "cancelled");
    let evs = events(&broker, "win").await?;
    for kind in [
        "ota-offered",
        "ota-scheduled",
        "ota-rescheduled",
        "ota-cancelled",
    ] {
        assert_eq!(of_kind(&evs, kind).len(), 1, "{kind}: {evs:#?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_drains_warns_waits_for_the_deadline_and_updates_every_resource(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let broker = TestBroker::start(dir.path()).await?;
    publish(&broker, group_spec("fleet", 3)).await?;
    let h1 = agent(&broker, &logs, "h1", "fleet", 0).await?;
    let h2 = agent(&broker, &logs, "h2", "fleet", 0).await?;
    let _h3 = agent(&broker, &logs, "h3", "fleet", 0).await?;
    let mut c1 = h1.client().await?;
    let mut c2 = h2.client().await?;
    c1.session_start(sid("s1"), uid("alice"), StartProof::Trusted)
        .await?;
    c2.session_start(sid("s2"), uid("bob"), StartProof::Trusted)
        .await?;
    h1.wait_synced().await?;
    h2.wait_synced().await?;

    let u = offer(&broker, "fleet", "3.2").await?;
    let start = UnixMillis(now().0 + 1_000);
    let s = one_schedule(&broker, schedule_req("fleet", u.id, start, 2)).await?;

    // s1's user is warned and logs out before the deadline: not disconnected.
    let warn_log = logs.join("warn.log");
    wait_until(&broker, "fleet", "warned s1", |_| {
        lines(&warn_log)
            .iter()
            .any(|l| l.starts_with("s1 "))
            .then_some(())
    })
    .await?;
    c1.session_end(sid("s1"), EndReason::Logout).await?;
    h1.wait_synced().await?;

    let done = wait_until(&broker, "fleet", "succeeded", |h| {
        h.iter()
            .find(|x| x.id == s.id && matches!(x.state.as_str(), "succeeded" | "failed"))
            .cloned()
    })
    .await?;
    assert_eq!(done.state, "succeeded", "{done:#?}");
    assert!(done.started_at.is_some_and(|t| t >= start), "{done:#?}");

    // History: every resource, in order, each done with its times.
    let rows: Vec<(&str, &str)> = done
        .resources
        .iter()
        .map(|r| (r.resource.as_str(), r.state.as_str()))
        .collect();
    assert_eq!(rows, vec![("h1", "done"), ("h2", "done"), ("h3", "done")]);
    for r in &done.resources {
        assert!(
            r.started_at.is_some() && r.finished_at >= r.started_at,
            "{r:?}"
        );
    }
    assert!(
        done.resources[0].detail.is_none(),
        "{:?}",
        done.resources[0]
    );
    assert!(
        done.resources[1]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("1 session(s) disconnected")),
        "{:?}",
        done.resources[1]
    );

    // Only s2 was disconnected, and not before its deadline (the one its
    // user was warned of).
    let warned = lines(&warn_log);
    let deadline_of = |session: &str| -> anyhow::Result<i64> {
        let line = warned
            .iter()
            .find(|l| l.starts_with(&format!("{session} ")))
            .with_context(|| format!("{session} not warned: {warned:?}"))?;
        Ok(line.split(' ').nth(1).context("deadline")?.parse()?)
    };
    let s2_deadline = deadline_of("s2")?;
    let cut = lines(&logs.join("disconnect.log"));
    assert_eq!(cut.len(), 1, "{cut:?}");
    let (who, at) = cut[0].split_once(' ').context("disconnect line")?;
    assert_eq!(who, "s2");
    let at: i64 = at.parse()?;
    assert!(
        at >= s2_deadline,
        "s2 cut at {at}, before its deadline {s2_deadline}"
    );

    // Each host ran the update hook once with the offer.
    let mut updated = lines(&logs.join("update.log"));
    updated.sort();
    let id = u.id;
    assert_eq!(
        updated,
        ["h1", "h2", "h3"]
            .iter()
            .map(|h| format!("{h} {id} office 3.2 /srv/office.deb"))
            .collect::<Vec<_>>()
    );

    // The group kept its status; the rollout is in its events; every
    // resource takes sessions again.
    let (detail, _) = show(&broker, "fleet").await?;
    assert_eq!(detail.info.status, "published");
    let evs = events(&broker, "fleet").await?;
    assert_eq!(of_kind(&evs, "ota-started").len(), 1, "{evs:#?}");
    assert_eq!(of_kind(&evs, "ota-succeeded").len(), 1, "{evs:#?}");
    wait_drained(&broker, &[]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_update_hook_stops_the_rollout_and_marks_the_group() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let broker = TestBroker::start(dir.path()).await?;
    publish(&broker, group_spec("shaky", 2)).await?;
    let _h1 = agent(&broker, &logs, "h1", "shaky", 1).await?;
    let _h2 = agent(&broker, &logs, "h2", "shaky", 0).await?;

    let u = offer(&broker, "shaky", "3.2").await?;
    let s = one_schedule(
        &broker,
        schedule_req("shaky", u.id, UnixMillis(now().0 + 1_000), 1),
    )
    .await?;
    let failed = wait_until(&broker, "shaky", "finished", |h| {
        h.iter()
            .find(|x| x.id == s.id && matches!(x.state.as_str(), "succeeded" | "failed"))
            .cloned()
    })
    .await?;
    assert_eq!(failed.state, "failed", "{failed:#?}");
    let rows: Vec<(&str, &str)> = failed
        .resources
        .iter()
        .map(|r| (r.resource.as_str(), r.state.as_str()))
        .collect();
    // The rollout stopped at h1: h2 was never touched.
    assert_eq!(rows, vec![("h1", "failed"), ("h2", "pending")]);
    assert_eq!(lines(&logs.join("update.log")).len(), 1);

    let (detail, _) = show(&broker, "shaky").await?;
    assert_eq!(detail.info.status, "update-failed");
    let evs = events(&broker, "shaky").await?;
    let ota_failed = of_kind(&evs, "ota-failed");
    assert_eq!(ota_failed.len(), 1, "{evs:#?}");
    assert!(
        ota_failed[0].message.contains("h1")
            && ota_failed[0].message.contains(&format!("update {}", u.id)),
        "{}",
        ota_failed[0].message
    );
    // The failing resource stays drained; the other takes sessions.
    wait_drained(&broker, &["h1"]).await?;
    // A new rollout may be scheduled from update-failed.
    let retry = offer(&broker, "shaky", "3.3").await?;
    one_schedule(
        &broker,
        schedule_req("shaky", retry.id, UnixMillis(now().0 + 86_400_000), 1),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_ota_makes_the_new_image_the_group_s() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let broker = TestBroker::start(dir.path()).await?;
    publish(&broker, group_spec("imaged", 1)).await?;
    let _h1 = agent(&broker, &logs, "h1", "imaged", 0).await?;

    let u = match broker
        .admin(AdminRequestV1::OtaOffer(OtaOfferSpec {
            group: "imaged".parse()?,
            component: "image".into(),
            version: "img-2".into(),
            package: String::new(),
            description: "new base image".into(),
        }))
        .await?
    {
        AdminResponseV1::OtaUpdates(mut u) if u.len() == 1 => u.remove(0),
        other => bail!("offer answered {other:?}"),
    };
    let s = one_schedule(
        &broker,
        schedule_req("imaged", u.id, UnixMillis(now().0 + 1_000), 1),
    )
    .await?;
    let done = wait_until(&broker, "imaged", "finished", |h| {
        h.iter()
            .find(|x| x.id == s.id && matches!(x.state.as_str(), "succeeded" | "failed"))
            .cloned()
    })
    .await?;
    assert_eq!(done.state, "succeeded", "{done:#?}");
    // Hosts created from now on start from it: the group's image is the
    // update's version, and the event says so.
    let (detail, _) = show(&broker, "imaged").await?;
    assert_eq!(
        (detail.info.status.as_str(), detail.info.image.as_str()),
        ("published", "img-2")
    );
    let evs = events(&broker, "imaged").await?;
    let ok = of_kind(&evs, "ota-succeeded");
    assert!(
        ok.len() == 1 && ok[0].message.contains("the group's image is now img-2"),
        "{evs:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_mid_rollout_resumes_it_with_the_same_deadline() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut broker = TestBroker::start(dir.path()).await?;
    publish(&broker, group_spec("resume", 2)).await?;
    let h1 = agent(&broker, &logs, "h1", "resume", 0).await?;
    let _h2 = agent(&broker, &logs, "h2", "resume", 0).await?;
    let mut c1 = h1.client().await?;
    c1.session_start(sid("s1"), uid("alice"), StartProof::Trusted)
        .await?;
    h1.wait_synced().await?;

    let u = offer(&broker, "resume", "3.2").await?;
    let s = one_schedule(
        &broker,
        AdminRequestV1::OtaSchedule(OtaScheduleSpec {
            group: "resume".parse()?,
            update: u.id,
            start: UnixMillis(now().0 + 1_000),
            wave: 1,
            drain_ms: 3_000,
        }),
    )
    .await?;
    // h1 is draining, s1 warned: stop the broker there.
    let warn_log = logs.join("warn.log");
    wait_until(&broker, "resume", "warned s1", |_| {
        (!lines(&warn_log).is_empty()).then_some(())
    })
    .await?;
    broker.restart().await?;

    let done = wait_until(&broker, "resume", "finished", |h| {
        h.iter()
            .find(|x| x.id == s.id && matches!(x.state.as_str(), "succeeded" | "failed"))
            .cloned()
    })
    .await?;
    assert_eq!(done.state, "succeeded", "{done:#?}");
    let rows: Vec<(&str, &str)> = done
        .resources
        .iter()
        .map(|r| (r.resource.as_str(), r.state.as_str()))
        .collect();
    assert_eq!(rows, vec![("h1", "done"), ("h2", "done")]);
    // The resumed drain kept its deadline: every warning names the same
    // one, and s1 was not cut before it.
    let deadlines: std::collections::BTreeSet<String> = lines(&warn_log)
        .iter()
        .filter_map(|l| l.split(' ').nth(1).map(str::to_owned))
        .collect();
    assert_eq!(deadlines.len(), 1, "{deadlines:?}");
    let deadline: i64 = deadlines.iter().next().context("deadline")?.parse()?;
    let cut = lines(&logs.join("disconnect.log"));
    assert_eq!(cut.len(), 1, "{cut:?}");
    let at: i64 = cut[0].split(' ').nth(1).context("time")?.parse()?;
    assert!(at >= deadline, "s1 cut at {at}, before {deadline}");
    // Each host updated once.
    assert_eq!(lines(&logs.join("update.log")).len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferryctl_offers_lists_schedules_and_shows_the_history() -> anyhow::Result<()> {
    use ferry_tests::bins::bin;
    use ferry_tests::procs::{ferryctl_json, run, run_ok};
    init_logging();
    let dir = tempfile::tempdir()?;
    let broker = TestBroker::start(dir.path()).await?;
    publish(&broker, group_spec("cli", 1)).await?;
    let sock = broker
        .admin_socket()
        .to_str()
        .context("socket path")?
        .to_owned();
    let s = sock.as_str();

    let offered = ferryctl_json(
        broker.admin_socket(),
        &[
            "ota",
            "offer",
            "cli",
            "--component",
            "agent",
            "--version",
            "0.9.1",
            "--package",
            "/srv/ferry-agent.deb",
            "--description",
            "faster reconnects",
        ],
    )
    .await?;
    assert_eq!(offered[0]["component"], "agent");
    let id = offered[0]["id"].as_u64().context("id")?.to_string();
    let listed = ferryctl_json(broker.admin_socket(), &["ota", "list", "--group", "cli"]).await?;
    assert_eq!(listed[0]["version"], "0.9.1");
    assert_eq!(listed[0]["description"], "faster reconnects");

    // A start in the past: refused with the reason, exit 1.
    let out = run(
        &bin("ferryctl"),
        [
            "--socket",
            s,
            "ota",
            "schedule",
            "cli",
            "--update",
            &id,
            "--start",
            "2020-01-01T00:00:00Z",
        ],
    )
    .await?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not in the future"), "{err}");

    let start = ferry_broker::render::rfc3339(UnixMillis(now().0 + 86_400_000));
    let scheduled = ferryctl_json(
        broker.admin_socket(),
        &[
            "ota", "schedule", "cli", "--update", &id, "--start", &start, "--wave", "2", "--drain",
            "90s",
        ],
    )
    .await?;
    assert_eq!(scheduled[0]["state"], "scheduled");
    assert_eq!(scheduled[0]["start"], start.as_str());
    assert_eq!(scheduled[0]["wave"], 2);
    assert_eq!(scheduled[0]["drain"], "1m30s");
    let schedule = scheduled[0]["id"]
        .as_u64()
        .context("schedule id")?
        .to_string();
    ferryctl_json(broker.admin_socket(), &["ota", "cancel", &schedule]).await?;
    let table = run_ok(&bin("ferryctl"), ["--socket", s, "ota", "history", "cli"]).await?;
    assert!(
        table.contains(&format!(
            "schedule {schedule}: update {id} (agent 0.9.1) for cli, cancelled"
        )),
        "{table}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_updating_itself_is_judged_by_the_restarted_agent_s_report() -> anyhow::Result<()>
{
    init_logging();
    let dir = tempfile::tempdir()?;
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let broker = TestBroker::start(dir.path()).await?;
    publish(&broker, group_spec("selfup", 1)).await?;
    let mut h1 = agent(&broker, &logs, "h1", "selfup", 0).await?;
    // An agent update to a version this build is not: the hook "installs"
    // it and the service manager restarts the agent (the test does), which
    // then reports that it still runs its own version.
    let u = match broker
        .admin(AdminRequestV1::OtaOffer(OtaOfferSpec {
            group: "selfup".parse()?,
            component: "agent".into(),
            version: "99.0.0".into(),
            package: "/srv/ferry-agent_99.deb".into(),
            description: "a new agent".into(),
        }))
        .await?
    {
        AdminResponseV1::OtaUpdates(mut u) if u.len() == 1 => u.remove(0),
        other => bail!("offer answered {other:?}"),
    };
    let s = one_schedule(
        &broker,
        schedule_req("selfup", u.id, UnixMillis(now().0 + 1_000), 1),
    )
    .await?;
    let update_log = logs.join("update.log");
    wait_until(&broker, "selfup", "the update hook ran", |_| {
        (!lines(&update_log).is_empty()).then_some(())
    })
    .await?;
    // The broker waits through the restart (no answer comes for the
    // command) and reads the new process's report.
    h1.restart().await?;
    let done = wait_until(&broker, "selfup", "finished", |h| {
        h.iter()
            .find(|x| x.id == s.id && matches!(x.state.as_str(), "succeeded" | "failed"))
            .cloned()
    })
    .await?;
    assert_eq!(done.state, "failed", "{done:#?}");
    let why = done.resources[0].detail.clone().unwrap_or_default();
    assert!(why.contains("99.0.0"), "{why}");
    let (detail, _) = show(&broker, "selfup").await?;
    assert_eq!(detail.info.status, "update-failed");
    Ok(())
}

/// A schedule with a long drain and an open session: while it runs,
/// `group show` has each host's step and deadline, `resources list` agrees
/// that the draining host takes no sessions, every step is an event, and
/// `ota list` lists the schedule under its own id with the update it rolls
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_rollout_shows_each_host_s_step_and_deadline() -> anyhow::Result<()> {
    use ferry_tests::bins::bin;
    use ferry_tests::procs::{ferryctl_json, run_ok};
    init_logging();
    let dir = tempfile::tempdir()?;
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    // The groups' clock is the test's: the schedule starts when the test
    // moves it, not when a loaded machine gets round to it.
    let (clock, config) = ferry_tests::harness::manual_clock();
    let broker = TestBroker::start_with_groups(dir.path(), config).await?;
    publish(&broker, group_spec("watch", 2)).await?;
    let h1 = agent(&broker, &logs, "h1", "watch", 0).await?;
    let _h2 = agent(&broker, &logs, "h2", "watch", 0).await?;
    let mut c1 = h1.client().await?;
    c1.session_start(sid("s1"), uid("alice"), StartProof::Trusted)
        .await?;
    h1.wait_synced().await?;

    let u = offer(&broker, "watch", "3.2").await?;
    let drain_ms = 3_600_000;
    let s = one_schedule(
        &broker,
        AdminRequestV1::OtaSchedule(OtaScheduleSpec {
            group: "watch".parse()?,
            update: u.id,
            start: UnixMillis(clock.now().0 + 60_000),
            wave: 1,
            drain_ms,
        }),
    )
    .await?;
    // Before it starts: scheduled, in `group show` and in `ota list`.
    let r = rollouts(&broker, "watch").await?;
    assert_eq!(
        r.rollouts
            .iter()
            .map(|r| (r.kind.as_str(), r.id, r.update, r.state.as_str()))
            .collect::<Vec<_>>(),
        [("ota", s.id, Some(u.id), "scheduled")]
    );
    let sock = broker.admin_socket().display().to_string();
    let listed = run_ok(&bin("ferryctl"), ["--socket", &sock, "ota", "list"]).await?;
    let row = format!("schedule {}  update {}  watch", s.id, u.id);
    assert!(
        listed.contains(&format!("update {}  watch", u.id)) && listed.contains(&row),
        "{listed}"
    );
    let json = ferryctl_json(broker.admin_socket(), &["ota", "list", "--group", "watch"]).await?;
    assert_eq!(json[0]["id"], u.id);
    assert_eq!(json[0]["schedules"][0]["id"], s.id);
    assert_eq!(json[0]["schedules"][0]["state"], "scheduled");
    assert_eq!(json[0]["schedules"][0]["drain"], "1h");

    clock.advance(std::time::Duration::from_secs(60));
    // h1 drains and its user is warned: it waits for s1 until its deadline.
    let warn_log = logs.join("warn.log");
    wait_until(&broker, "watch", "warned s1", |_| {
        (!lines(&warn_log).is_empty()).then_some(())
    })
    .await?;
    let started = history(&broker, "watch").await?[0].resources[0]
        .started_at
        .context("h1's drain start")?;
    let until = UnixMillis(started.0 + drain_ms as i64);
    let r = rollouts(&broker, "watch").await?;
    let steps: Vec<(&str, &str, Option<UnixMillis>)> = r.rollouts[0]
        .hosts
        .iter()
        .map(|h| (h.resource.as_str(), h.step.as_str(), h.until))
        .collect();
    assert_eq!(r.rollouts[0].state, "running");
    assert_eq!(
        steps,
        [("h1", "draining", Some(until)), ("h2", "waiting", None)]
    );
    // `resources list` and `group show` agree: h1 takes no sessions.
    let listed: Vec<(String, bool, bool)> = broker
        .resources()
        .await?
        .iter()
        .map(|r| (r.resource.to_string(), r.available, r.draining))
        .collect();
    assert_eq!(
        listed,
        [("h1".into(), false, true), ("h2".into(), true, false)]
    );
    let engine: Vec<(String, bool)> = live(&broker, "watch")
        .await?
        .resources
        .iter()
        .map(|r| (r.resource.to_string(), r.available))
        .collect();
    assert_eq!(engine, [("h1".into(), false), ("h2".into(), true)]);
    let table = run_ok(
        &bin("ferryctl"),
        ["--socket", &sock, "group", "show", "watch"],
    )
    .await?;
    let headline = format!(
        "OTA schedule {} (update {}: office 3.2): running since",
        s.id, u.id
    );
    // In whole seconds, like every time in a table.
    let deadline = ferry_broker::render::rfc3339_secs(until);
    assert!(
        table.contains(&headline) && table.contains("draining") && table.contains(&deadline),
        "{table}"
    );

    // The user logs out: h1 is updated, then h2.
    c1.session_end(sid("s1"), EndReason::Logout).await?;
    h1.wait_synced().await?;
    let done = wait_until(&broker, "watch", "finished", |h| {
        h.iter()
            .find(|x| x.id == s.id && matches!(x.state.as_str(), "succeeded" | "failed"))
            .cloned()
    })
    .await?;
    assert_eq!(done.state, "succeeded", "{done:#?}");
    assert!(rollouts(&broker, "watch").await?.rollouts.is_empty());
    // Each host's steps are events, in order, with the drain deadline.
    let evs = events(&broker, "watch").await?;
    let steps: Vec<&str> = of_kind(&evs, "ota-step")
        .iter()
        .map(|e| e.message.as_str())
        .collect();
    let prefix = format!("OTA schedule {} (update {}: office 3.2): ", s.id, u.id);
    let of = |who: &str| -> Vec<String> {
        steps
            .iter()
            .filter_map(|m| m.strip_prefix(&prefix))
            .filter(|m| m.starts_with(&format!("{who} ")))
            .map(|m| m.split(':').next().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(
        of("h1"),
        [
            "h1 draining",
            "h1 warned",
            "h1 updating to office 3.2",
            "h1 done"
        ],
        "{steps:#?}"
    );
    assert_eq!(
        of("h2"),
        ["h2 draining", "h2 updating to office 3.2", "h2 done"],
        "{steps:#?}"
    );
    assert!(
        steps.iter().any(|m| m.contains(&format!(
            "h1 draining: no new sessions; open ones end by {deadline}"
        ))),
        "{steps:#?}"
    );
    assert!(
        steps
            .iter()
            .any(|m| m.contains("plan: 2 resource(s) in waves of 1")),
        "{steps:#?}"
    );
    Ok(())
}

/// A failed rollout makes the group `update-failed`; another failure
/// changes no status (no `update-failed -> update-failed`); a rollout that
/// succeeds everywhere makes it `published` again. Failures keep the end of
/// the hook's output with its exit status, on one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_rollout_takes_the_group_out_of_update_failed() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let broker = TestBroker::start(dir.path()).await?;
    publish(&broker, group_spec("mend", 1)).await?;
    let h1 = agent(&broker, &logs, "h1", "mend", 0).await?;
    // The update hook fails, with 100 lines of output, until `fixed` exists.
    let fixed = logs.join("fixed");
    script(
        &logs.join("h1-hooks").join("update"),
        &format!(
            "test -e {} && exit 0\nfor i in $(seq 1 100); do echo \"unpack step $i failed\" >&2; done\nexit 3",
            fixed.display()
        ),
    )?;
    let _ = &h1;
    let roll = |version: &'static str| {
        let broker = &broker;
        async move {
            let u = offer(broker, "mend", version).await?;
            let s = one_schedule(
                broker,
                schedule_req("mend", u.id, UnixMillis(now().0 + 1_000), 1),
            )
            .await?;
            wait_until(broker, "mend", "finished", |h| {
                h.iter()
                    .find(|x| x.id == s.id && matches!(x.state.as_str(), "succeeded" | "failed"))
                    .cloned()
            })
            .await
        }
    };
    let statuses = |evs: &[ferry_common::admin::GroupEventInfo]| -> Vec<String> {
        of_kind(evs, "status")
            .iter()
            .map(|e| e.message.clone())
            .collect()
    };

    let first = roll("3.2").await?;
    assert_eq!(first.state, "failed", "{first:#?}");
    let why = first.resources[0].detail.clone().unwrap_or_default();
    assert!(
        why.contains("update hook failed (exit status 3)")
            && why.contains("unpack step 100 failed")
            && !why.contains("unpack step 1 failed")
            && why.len() < 600,
        "{why}"
    );
    assert_eq!(show(&broker, "mend").await?.0.info.status, "update-failed");
    let evs = events(&broker, "mend").await?;
    let st = statuses(&evs);
    assert_eq!(st.len(), 2, "{st:#?}");
    assert!(
        st[1].starts_with("published -> update-failed: OTA schedule"),
        "{st:#?}"
    );
    for e in &evs {
        assert!(
            !e.message.contains('\n') && e.message.len() < 1024,
            "{}: {}",
            e.kind,
            e.message
        );
    }

    // Failing again from update-failed: no transition to itself.
    let second = roll("3.3").await?;
    assert_eq!(second.state, "failed", "{second:#?}");
    let evs = events(&broker, "mend").await?;
    assert_eq!(statuses(&evs).len(), 2, "{:#?}", statuses(&evs));
    assert!(
        !evs.iter()
            .any(|e| e.message.contains("update-failed -> update-failed")),
        "{evs:#?}"
    );

    // The host is fixed: the next rollout succeeds and the group serves.
    std::fs::write(&fixed, "")?;
    let third = roll("3.4").await?;
    assert_eq!(third.state, "succeeded", "{third:#?}");
    assert_eq!(show(&broker, "mend").await?.0.info.status, "published");
    let st = statuses(&events(&broker, "mend").await?);
    assert_eq!(st.len(), 3, "{st:#?}");
    assert!(
        st[2].starts_with("update-failed -> published: OTA schedule")
            && st[2].contains("succeeded on every resource"),
        "{st:#?}"
    );
    Ok(())
}

/// A host an operator drained is left out of a rollout and stays drained; a
/// rollout never puts a host back in service that it did not take out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_drained_by_an_operator_is_left_out_of_a_rollout() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let broker = TestBroker::start(dir.path()).await?;
    publish(&broker, group_spec("held", 2)).await?;
    let _h1 = agent(&broker, &logs, "h1", "held", 0).await?;
    let _h2 = agent(&broker, &logs, "h2", "held", 0).await?;
    broker
        .admin(AdminRequestV1::Drain {
            resource: "h2".parse()?,
        })
        .await?;
    wait_drained(&broker, &["h2"]).await?;

    let u = offer(&broker, "held", "4.0").await?;
    let s = one_schedule(
        &broker,
        schedule_req("held", u.id, UnixMillis(now().0 + 1_000), 1),
    )
    .await?;
    let done = wait_until(&broker, "held", "finished", |h| {
        h.iter()
            .find(|x| x.id == s.id && matches!(x.state.as_str(), "succeeded" | "failed"))
            .cloned()
    })
    .await?;
    assert_eq!(done.state, "succeeded", "{done:#?}");
    let updated: Vec<&str> = done.resources.iter().map(|r| r.resource.as_str()).collect();
    assert_eq!(updated, ["h1"], "{done:#?}");
    assert_eq!(lines(&logs.join("update.log")).len(), 1);
    wait_drained(&broker, &["h2"]).await?;
    Ok(())
}
