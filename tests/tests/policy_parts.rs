//! The whole delivery-group policy through the real `ferryctl` (issue 7,
//! SPEC section 4): session, display and periods beside scaling, at publish
//! and at update, `group show` (JSON and table), refusals that list every
//! problem, the document real agents receive, and a group's own disconnect
//! retention ending a disconnected session.
//!
//! One in-process broker per test with a manual group clock, the real
//! `ferryctl` binary on its admin socket, real agents of the group. Every
//! wait is on a signal or bounded by `PATIENCE`; no sleeps.

use std::ffi::OsString;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_agent::local::StartProof;
use ferry_broker::clock::ManualClock;
use ferry_broker::config::GroupsConfig;
use ferry_broker::pki;
use ferry_broker::routing::{RouteAnswer, RouteClient};
use ferry_common::admin::{AdminRequestV1, Secret, UserSpec};
use ferry_common::route::{Admission, RouteAsk};
use ferry_common::ticket::Credential;
use ferry_common::wire::EndReason;
use ferry_common::{UnixMillis, UserId};
use ferry_tests::admin::{agent_of, events, wait_events};
use ferry_tests::bins::bin;
use ferry_tests::harness::{init_logging, TestAgent, TestBroker, PATIENCE};
use ferry_tests::procs::{ferryctl_json, run};
use serde_json::{json, Value};

fn uid(s: &str) -> UserId {
    s.parse().expect("user id")
}

struct Setup {
    broker: TestBroker,
    clock: ManualClock,
    _dir: tempfile::TempDir,
}

/// A broker with a manual group clock at the wall time, and users alice
/// and bob with passwords.
async fn setup() -> anyhow::Result<Setup> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(UnixMillis(ferry_broker::clock::now_millis().0));
    let config = GroupsConfig {
        clock: clock.clock(),
        ..GroupsConfig::default()
    };
    let broker = TestBroker::start_with_groups(dir.path(), config).await?;
    for u in ["alice", "bob"] {
        broker
            .admin(AdminRequestV1::UserCreateWithPassword {
                user: UserSpec {
                    id: uid(u),
                    email: format!("{u}@example.com"),
                    mobile: "+8613800000000".into(),
                },
                password: Secret(format!("password-{u}")),
            })
            .await?;
    }
    Ok(Setup {
        broker,
        clock,
        _dir: dir,
    })
}

impl Setup {
    /// `ferryctl ARGS --json` on this broker, which must succeed.
    async fn ctl(&self, args: &[&str]) -> anyhow::Result<Value> {
        ferryctl_json(self.broker.admin_socket(), args).await
    }

    /// `ferryctl ARGS` (a table), which must succeed.
    async fn ctl_table(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = run(&bin("ferryctl"), self.with_socket(args)).await?;
        if !out.status.success() {
            bail!(
                "ferryctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `ferryctl ARGS`, which must fail with exit 1; its stderr.
    async fn ctl_refused(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = run(&bin("ferryctl"), self.with_socket(args)).await?;
        if out.status.code() != Some(1) {
            bail!(
                "ferryctl {args:?} was not refused: {:?} {}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8(out.stderr)?)
    }

    /// `ferryctl ARGS`, which must fail as a usage error (exit 64); its stderr.
    async fn ctl_usage_error(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = run(&bin("ferryctl"), self.with_socket(args)).await?;
        if out.status.code() != Some(64) {
            bail!("ferryctl {args:?} was not a usage error: {out:?}");
        }
        Ok(String::from_utf8(out.stderr)?)
    }

    fn with_socket(&self, args: &[&str]) -> Vec<OsString> {
        let mut all: Vec<OsString> = vec![
            "--socket".into(),
            self.broker.admin_socket().as_os_str().to_owned(),
        ];
        all.extend(args.iter().map(OsString::from));
        all
    }
}

/// `group publish` arguments of a pay-as-you-go office group `name` with
/// 2 base resources and up to 1 elastic one, users alice and bob.
fn publish_args(name: &str) -> Vec<&str> {
    vec![
        "group",
        "publish",
        "--name",
        name,
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
        "2",
        "--user",
        "alice",
        "--user",
        "bob",
        "--concurrent-sessions",
        "1",
        "--usage-threshold",
        "100",
        "--scale-out-step",
        "1",
        "--max-elastic",
        "1",
        "--max-idle",
        "1h",
    ]
}

/// The agent's policy file: group, version and the document.
fn policy_file(agent: &TestAgent) -> anyhow::Result<(String, u64, Value)> {
    let path = &agent.config().policy_file;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read policy file {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)?;
    Ok((
        v["group"].as_str().context("group")?.to_owned(),
        v["version"].as_u64().context("version")?,
        v["policy"].clone(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_part_is_published_updated_shown_and_reaches_the_agents() -> anyhow::Result<()> {
    let s = setup().await?;
    let mut args = publish_args("pp");
    args.extend([
        "--disconnect-retention",
        "forever",
        "--max-session-duration",
        "8h",
        "--idle-disconnect",
        "30m",
        "--frame-rate",
        "60",
        "--resolution",
        "2560x1440",
        "--adaptive-resolution",
        "off",
        "--streaming-mode",
        "mixed",
        "--quality",
        "smooth",
        "--period",
        "mon-fri 09:00-18:00 min=2 warm-up=15m",
        "--period",
        "sat 10:00-12:00 min=1",
    ]);
    let published = s.ctl(&args).await?;
    assert_eq!(published["policy_version"], 1, "{published:#}");
    let p = &published["policy"];
    assert_eq!(
        p["session"],
        json!({"disconnect_retention_ms": null, "max_session_duration_ms": 28_800_000,
               "idle_disconnect_ms": 1_800_000})
    );
    assert_eq!(
        p["display"],
        json!({"frame_rate": 60, "width": 2560, "height": 1440, "adaptive_resolution": false,
               "streaming_mode": "mixed", "quality_strategy": "smooth"})
    );
    let texts: Vec<&str> = p["periods"]
        .as_array()
        .context("periods")?
        .iter()
        .filter_map(|x| x["text"].as_str())
        .collect();
    assert_eq!(
        texts,
        [
            "mon,tue,wed,thu,fri 09:00-18:00 min=2 warm-up=15m",
            "sat 10:00-12:00 min=1 warm-up=0s"
        ]
    );
    assert_eq!(p["concurrent_sessions"], 1, "the scaling part is there too");

    // A real agent of the group receives every part in its policy file.
    let h1 = agent_of(&s.broker, "h1", "pp").await?;
    wait_events(&s.broker, "pp", "policy-applied", 1).await?;
    let (group, version, doc) = policy_file(&h1)?;
    assert_eq!((group.as_str(), version), ("pp", 1));
    assert_eq!(
        doc["session"],
        json!({"disconnect_retention_ms": null, "idle_disconnect_ms": 1_800_000,
               "max_session_duration_ms": 28_800_000})
    );
    assert_eq!(
        doc["display"],
        json!({"adaptive_resolution": false, "frame_rate": 60, "height": 1440,
               "quality_strategy": "smooth", "streaming_mode": "mixed", "width": 2560})
    );
    assert_eq!(
        doc["periods"][0],
        json!({"days": ["mon", "tue", "wed", "thu", "fri"], "end": "18:00", "min_ready": 2,
               "start": "09:00", "warm_up_ms": 900_000})
    );
    assert_eq!(doc["scaling"]["concurrent_sessions"], 1);

    // Update some parts (and a scaling parameter); the rest stays.
    let updated = s
        .ctl(&[
            "group",
            "update-policy",
            "pp",
            "--usage-threshold",
            "90",
            "--disconnect-retention",
            "10m",
            "--idle-disconnect",
            "none",
            "--resolution",
            "1920x1080",
            "--clear-periods",
        ])
        .await?;
    assert_eq!(updated["policy_version"], 2, "{updated:#}");
    let p = &updated["policy"];
    assert_eq!(p["usage_threshold"], 90);
    assert_eq!(
        p["session"],
        json!({"disconnect_retention_ms": 600_000, "max_session_duration_ms": 28_800_000,
               "idle_disconnect_ms": null})
    );
    assert_eq!(
        (
            &p["display"]["frame_rate"],
            &p["display"]["width"],
            &p["display"]["streaming_mode"]
        ),
        (&json!(60), &json!(1920), &json!("mixed"))
    );
    assert_eq!(p["periods"], json!([]));

    // The change is pushed: the agent's file holds version 2.
    wait_events(&s.broker, "pp", "policy-applied", 2).await?;
    let (_, version, doc) = policy_file(&h1)?;
    assert_eq!(version, 2);
    assert_eq!(doc["session"]["disconnect_retention_ms"], 600_000);
    assert_eq!(doc["session"]["idle_disconnect_ms"], Value::Null);
    assert_eq!(doc["display"]["height"], 1080);
    assert_eq!(doc["periods"], json!([]));
    assert_eq!(doc["scaling"]["usage_threshold"], 90);

    // `group show`: every part, and which resource runs which version.
    let shown = s.ctl(&["group", "show", "pp"]).await?;
    assert_eq!(shown["policy_version"], 2);
    assert_eq!(
        shown["policy"]["session"]["disconnect_retention_ms"],
        600_000
    );
    assert_eq!(shown["policy"]["display"]["quality_strategy"], "smooth");
    assert_eq!(
        shown["policy_resources"],
        json!([{"resource": "h1", "applied_version": 2}])
    );
    assert!(shown["live"].is_object(), "{shown:#}");
    let table = s.ctl_table(&["group", "show", "pp"]).await?;
    for line in [
        "disconnect_retention  10m",
        "max_session_duration  8h",
        "idle_disconnect       none",
        "resolution            1920x1080",
        "adaptive_resolution   off",
        "period                none",
    ] {
        assert!(table.contains(line), "{line:?} not in\n{table}");
    }

    // The older flags alone still work and keep the parts.
    let kept = s
        .ctl(&["group", "update-policy", "pp", "--concurrent-sessions", "2"])
        .await?;
    assert_eq!(kept["policy_version"], 3);
    assert_eq!(kept["policy"]["concurrent_sessions"], 2);
    assert_eq!(kept["policy"]["session"], p["session"]);
    assert_eq!(kept["policy"]["display"], p["display"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_list_every_problem_and_periods_outside_the_limits_are_refused(
) -> anyhow::Result<()> {
    let s = setup().await?;
    // Several problems of several parts in one publish: all listed.
    let mut args = publish_args("bad");
    let at = args
        .iter()
        .position(|a| *a == "--concurrent-sessions")
        .context("flag")?;
    args[at + 1] = "3";
    args.extend([
        "--disconnect-retention",
        "2m",
        "--max-session-duration",
        "5m",
        "--frame-rate",
        "0",
        "--resolution",
        "100x100",
        "--streaming-mode",
        "audio",
        "--quality",
        "best",
    ]);
    let err = s.ctl_refused(&args).await?;
    for needle in [
        "concurrent_sessions: 3 is above the 2 sessions spec office-4c8g takes",
        "disconnect_retention",
        "max_session_duration",
        "frame_rate",
        "resolution: 100x100",
        "streaming_mode: \"audio\"",
        "quality_strategy: \"best\"",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
    let listed = s.ctl(&["group", "list"]).await?;
    assert_eq!(listed, json!([]), "nothing was published");

    s.ctl(&publish_args("ok")).await?;
    // Periods outside SPEC section 4: too short, overlapping, too close,
    // a fourth on one day, more ready than the group can have.
    let err = s
        .ctl_refused(&[
            "group",
            "update-policy",
            "ok",
            "--period",
            "mon 09:00-09:10 min=1",
            "--period",
            "tue 09:00-10:00 min=1",
            "--period",
            "tue 09:30-11:00 min=1",
            "--period",
            "wed 09:00-10:00 min=1",
            "--period",
            "wed 10:02-11:00 min=1",
            "--period",
            "thu 01:00-02:00 min=1",
            "--period",
            "thu 03:00-04:00 min=1",
            "--period",
            "thu 05:00-06:00 min=1",
            "--period",
            "thu 07:00-08:00 min=1",
            "--period",
            "fri 09:00-10:00 min=4",
        ])
        .await?;
    for needle in [
        "period 1 (09:00-09:10): shorter than 15 minutes",
        "Tue: periods 2 and 3 overlap",
        "Wed: periods 4 and 5 overlap or are less than 5 minutes apart",
        "Thu: 4 periods, at most 3 a day",
        "period 10 (09:00-10:00): min_ready 4 is more than 2 base + 1 elastic resources",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
    // A period ferryctl cannot read never reaches the broker.
    let err = s
        .ctl_usage_error(&["group", "update-policy", "ok", "--period", "mon 9-18"])
        .await?;
    assert!(err.contains("--period"), "{err}");
    // Nothing changed.
    let shown = s.ctl(&["group", "show", "ok"]).await?;
    assert_eq!(shown["policy_version"], 1);
    assert_eq!(shown["policy"]["periods"], json!([]));
    assert_eq!(
        shown["policy"]["session"]["disconnect_retention_ms"], 900_000,
        "the default retention"
    );
    // Periods inside the limits are accepted.
    let ok = s
        .ctl(&[
            "group",
            "update-policy",
            "ok",
            "--period",
            "daily 08:00-08:15 min=3 warm-up=1h",
            "--period",
            "daily 08:20-24:00 min=1",
        ])
        .await?;
    assert_eq!(ok["policy_version"], 2);
    assert_eq!(ok["policy"]["periods"].as_array().map(Vec::len), Some(2));
    Ok(())
}

async fn route(c: &RouteClient, group: &str, user: &str) -> anyhow::Result<Admission> {
    let ask = RouteAsk {
        group: group.parse()?,
        user: uid(user),
        credential: Credential::Password(format!("password-{user}")),
        wait: false,
    };
    match c.route(ask, |_| {}).await? {
        RouteAnswer::Admitted(a) => Ok(a),
        RouteAnswer::Refused(r) => bail!("refused ({}): {}", r.reason, r.message),
        RouteAnswer::Redirect(a) => bail!("sent to another broker at {a}"),
    }
}

/// Polls the group's events (bounded) until one of `kind` mentions `text`.
async fn wait_event(s: &Setup, group: &str, kind: &str, text: &str) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let evs = events(&s.broker, group).await?;
        if let Some(e) = evs
            .iter()
            .find(|e| e.kind == kind && e.message.contains(text))
        {
            return Ok(e.message.clone());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no {kind} event with {text:?} in {group}: {evs:?}");
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_short_retention_ends_a_disconnected_session() -> anyhow::Result<()> {
    let s = setup().await?;
    let mut args = publish_args("short");
    args.extend(["--disconnect-retention", "3m"]);
    s.ctl(&args).await?;
    let h1 = agent_of(&s.broker, "h1", "short").await?;
    let c = RouteClient::connect(
        s.broker.agent_addr(),
        "localhost",
        &s.broker.pki_dir().join(pki::CA_CERT),
    )
    .await?;

    let a = route(&c, "short", "alice").await?;
    let mut local = h1.client().await?;
    local
        .session_start(a.session.clone(), uid("alice"), StartProof::Trusted)
        .await?;
    h1.wait_synced().await?;
    local.session_presence(a.session.clone(), true).await?;
    let kept = wait_event(&s, "short", "session-disconnected", a.session.as_str()).await?;
    assert!(kept.contains("retained for 3m"), "{kept}");

    // 3 minutes, far below the 15-minute default: the session is ended.
    s.clock.advance(Duration::from_secs(3 * 60 + 1));
    wait_event(&s, "short", "retention-ended", a.session.as_str()).await?;
    // The host ends it (it has no disconnect hook here) and its slot is free.
    local
        .session_end(a.session.clone(), EndReason::Disconnected)
        .await?;
    h1.wait_synced().await?;

    // A change applies to sessions disconnected after it.
    s.ctl(&[
        "group",
        "update-policy",
        "short",
        "--disconnect-retention",
        "forever",
    ])
    .await?;
    let b = route(&c, "short", "bob").await?;
    local
        .session_start(b.session.clone(), uid("bob"), StartProof::Trusted)
        .await?;
    h1.wait_synced().await?;
    local.session_presence(b.session.clone(), true).await?;
    let kept = wait_event(&s, "short", "session-disconnected", b.session.as_str()).await?;
    assert!(kept.contains("retained for ever"), "{kept}");
    Ok(())
}
