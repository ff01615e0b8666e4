//! The delivery-group lifecycle as an operator drives it: the real
//! `ferryctl` binary against a real `ferry-broker` process, and against the
//! same daemon run in-process with a manual clock for the week-long
//! subscription deadlines.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use ferry_broker::clock::ManualClock;
use ferry_broker::config::GroupsConfig;
use ferry_common::admin::{AdminRequestV1, AdminResponseV1};
use ferry_tests::bins::bin;
use ferry_tests::procs::{ferryctl_json, run, BrokerFiles, BrokerProcess};

/// `ferryctl --socket S ARGS...` expected to fail: its stderr.
async fn refused(socket: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut all: Vec<&OsStr> = vec![OsStr::new("--socket"), socket.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    let out = run(&bin("ferryctl"), all).await?;
    assert_eq!(out.status.code(), Some(1), "ferryctl {args:?} should fail");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

const PUBLISH: &[&str] = &[
    "group",
    "publish",
    "--region",
    "cn-hangzhou",
    "--office-network",
    "office-net-1",
    "--spec",
    "office-4c8g",
    "--image",
    "img-1",
    "--base-resources",
    "2",
    "--concurrent-sessions",
    "2",
    "--usage-threshold",
    "85",
    "--scale-out-step",
    "2",
    "--max-elastic",
    "2",
    "--max-idle",
    "1h",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_lifecycle_through_ferryctl() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let _broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    let s = files.admin_socket.as_path();

    // Users: one by one, then a malformed CSV (nothing applied), then a good one.
    ferryctl_json(
        s,
        &[
            "user",
            "create",
            "--id",
            "alice",
            "--email",
            "alice@example.com",
            "--mobile",
            "+8613800000001",
        ],
    )
    .await?;
    let err = refused(
        s,
        &[
            "user",
            "create",
            "--id",
            "alice",
            "--email",
            "a@example.com",
            "--mobile",
            "+8613800000001",
        ],
    )
    .await?;
    assert!(err.contains("already exists"), "{err}");
    let bad = tmp.path().join("bad.csv");
    std::fs::write(&bad, "id,email,mobile\nbob,bob@example.com,+8613800000002\ncarol,not-an-email,+8613800000003\ndave,dave@example.com\n")?;
    let err = refused(s, &["user", "import", bad.to_str().unwrap_or_default()]).await?;
    assert!(err.contains("line 3: email \"not-an-email\""), "{err}");
    assert!(err.contains("line 4: 2 fields"), "{err}");
    let users = ferryctl_json(s, &["user", "list"]).await?;
    assert_eq!(
        users.as_array().map(Vec::len),
        Some(1),
        "nothing of the bad batch: {users}"
    );
    // A malformed record is named by line and column, and nothing is imported.
    let broken = tmp.path().join("broken.csv");
    std::fs::write(
        &broken,
        "id,email,mobile\nbob,bob@example.com,+8613800000002\ncarol,\"carol@example.com,+8613800000003\n",
    )?;
    let err = refused(s, &["user", "import", broken.to_str().unwrap_or_default()]).await?;
    assert!(
        err.contains("line 3, column 7: this quote is never closed"),
        "{err}"
    );
    // As a spreadsheet saves it: a byte order mark, quoted fields, CRLF and
    // blank rows at the end.
    let good = tmp.path().join("good.csv");
    std::fs::write(&good, "\u{feff}id,email,mobile\r\n\"bob\",\"bob@example.com\",\"+8613800000002\"\r\ncarol,carol@example.com,+8613800000003\r\n,,\r\n\r\n")?;
    let imported = ferryctl_json(s, &["user", "import", good.to_str().unwrap_or_default()]).await?;
    assert_eq!(imported.as_array().map(Vec::len), Some(2), "{imported}");
    assert_eq!(imported[0]["id"], "bob", "{imported}");
    assert_eq!(imported[0]["mobile"], "+8613800000002", "{imported}");

    // Publish a subscription with a name and users: the publish order is priced.
    let mut args = PUBLISH.to_vec();
    args.extend([
        "--name",
        "design-team",
        "--billing",
        "subscription",
        "--duration",
        "1w",
        "--user",
        "alice",
    ]);
    // A zero max_idle is refused by the broker with the reason.
    let zero: Vec<&str> = args
        .iter()
        .map(|a| if *a == "1h" { "0" } else { *a })
        .collect();
    let err = refused(s, &zero).await?;
    assert!(err.contains("max_idle: must be above zero"), "{err}");
    let g = ferryctl_json(s, &args).await?;
    assert_eq!(g["name"], "design-team");
    assert_eq!(g["status"], "published");
    assert_eq!(g["orders"][0]["kind"], "publish");
    assert_eq!(g["orders"][0]["amount"], "92.87", "199 x 2 x 7/30: {g}");
    assert_eq!(g["assigned_users"][0], "alice");
    // No resource has joined: none is waiting for the policy.
    assert_eq!(g["policy_applied"], true, "{g}");
    assert_eq!(g["policy_version"], 1, "{g}");
    let id = g["id"].as_str().unwrap_or_default().to_owned();
    let err = refused(s, &args).await?;
    assert!(err.contains("already exists"), "{err}");

    // Publish pay-as-you-go without a name: one is generated.
    let mut args = PUBLISH.to_vec();
    args.extend(["--billing", "pay-as-you-go"]);
    let p = ferryctl_json(s, &args).await?;
    assert_eq!(p["name"], "cn-hangzhou-office-4c8g-1");
    assert!(p["orders"].as_array().is_some_and(Vec::is_empty));
    let p2 = ferryctl_json(s, &args).await?;
    assert_eq!(p2["name"], "cn-hangzhou-office-4c8g-2");

    // Invalid publish: every problem at once.
    let err = refused(
        s,
        &[
            "group",
            "publish",
            "--region",
            "r",
            "--office-network",
            "n",
            "--spec",
            "office-4c8g",
            "--image",
            "i",
            "--billing",
            "pay-as-you-go",
            "--base-resources",
            "1",
            "--concurrent-sessions",
            "3",
            "--usage-threshold",
            "0",
            "--scale-out-step",
            "1",
            "--max-elastic",
            "1",
        ],
    )
    .await?;
    for field in ["max_idle", "concurrent_sessions", "usage_threshold"] {
        assert!(err.contains(field), "{field} missing: {err}");
    }

    // List and filters.
    let all = ferryctl_json(s, &["group", "list"]).await?;
    assert_eq!(all.as_array().map(Vec::len), Some(3));
    let by_name = ferryctl_json(s, &["group", "list", "--name", "office-4c8g"]).await?;
    assert_eq!(by_name.as_array().map(Vec::len), Some(2));
    let by_id = ferryctl_json(s, &["group", "list", "--id", &id]).await?;
    assert_eq!(by_id[0]["name"], "design-team");
    let published = ferryctl_json(s, &["group", "list", "--status", "published"]).await?;
    assert_eq!(published.as_array().map(Vec::len), Some(3));
    let err = refused(s, &["group", "list", "--status", "sleeping"]).await?;
    assert!(err.contains("unknown status"), "{err}");

    // Show by id; update-policy valid and invalid.
    let shown = ferryctl_json(s, &["group", "show", &id]).await?;
    assert_eq!(shown["name"], "design-team");
    // Its live view: two base slots no agent has taken yet, nothing running.
    let live = &shown["live"];
    assert_eq!(live["closed"], false, "{shown}");
    assert_eq!((&live["demand"], &live["capacity"]), (&0.into(), &0.into()));
    assert_eq!(live["usage_percent"], serde_json::Value::Null);
    let slots: Vec<String> = live["resources"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    format!(
                        "{} {} {} {} {}",
                        r["resource"], r["class"], r["state"], r["available"], r["load"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        slots,
        [
            r#""b1" "base" "ready" false "0/2""#,
            r#""b2" "base" "ready" false "0/2""#
        ],
        "{shown}"
    );
    assert_eq!(shown["flagged"], serde_json::json!([]));
    let mut args: Vec<&OsStr> = vec![OsStr::new("--socket"), s.as_os_str()];
    args.extend(["group", "show", "design-team"].map(OsStr::new));
    let table = ferry_tests::procs::run_ok(&bin("ferryctl"), args).await?;
    for part in ["live: open", "RESOURCE", "LOAD", "b2"] {
        assert!(table.contains(part), "{part} missing: {table}");
    }
    let up = ferryctl_json(
        s,
        &[
            "group",
            "update-policy",
            "design-team",
            "--usage-threshold",
            "70",
            "--load-balancing",
            "depth-first",
        ],
    )
    .await?;
    assert_eq!(up["policy"]["usage_threshold"], 70);
    assert_eq!(up["policy"]["load_balancing"], "depth-first");
    assert_eq!(
        up["policy"]["concurrent_sessions"], 2,
        "unchanged parameters stay"
    );
    let err = refused(
        s,
        &[
            "group",
            "update-policy",
            "design-team",
            "--concurrent-sessions",
            "3",
            "--usage-threshold",
            "101",
            "--scale-out-step",
            "0",
        ],
    )
    .await?;
    for field in ["concurrent_sessions", "usage_threshold", "scale_out_step"] {
        assert!(err.contains(field), "{field} missing: {err}");
    }
    let still = ferryctl_json(s, &["group", "show", "design-team"]).await?;
    assert_eq!(
        still["policy"]["usage_threshold"], 70,
        "a refused policy changes nothing"
    );

    // Users of a group.
    let u = ferryctl_json(
        s,
        &[
            "group",
            "update-users",
            "design-team",
            "--add",
            "bob",
            "--add",
            "carol",
            "--remove",
            "alice",
        ],
    )
    .await?;
    assert_eq!(u["assigned_users"], serde_json::json!(["bob", "carol"]));
    let err = refused(
        s,
        &["group", "update-users", "design-team", "--add", "nobody"],
    )
    .await?;
    assert!(err.contains("user nobody does not exist"), "{err}");

    // Renew and auto-renew.
    let before = still["expires_at"].as_str().unwrap_or_default().to_owned();
    let r = ferryctl_json(s, &["group", "renew", "design-team", "--duration", "1mo"]).await?;
    assert_eq!(r["orders"][1]["kind"], "renew");
    assert_eq!(r["orders"][1]["amount"], "398.00");
    assert_eq!(r["orders"][1]["period_start"], before);
    let a = ferryctl_json(s, &["group", "set-auto-renew", "design-team", "on"]).await?;
    assert_eq!(a["auto_renew"], true);
    let err = refused(
        s,
        &[
            "group",
            "renew",
            "cn-hangzhou-office-4c8g-1",
            "--duration",
            "1w",
        ],
    )
    .await?;
    assert!(err.contains("billed by use"), "{err}");

    // Region is fixed.
    let err = refused(s, &["group", "set-region", "design-team", "cn-shanghai"]).await?;
    assert!(err.contains("cannot change after publish"), "{err}");

    // Removing a group needs --yes when there is no terminal to ask on: a
    // usage error (64) saying so, and the group is untouched.
    let mut all: Vec<&OsStr> = vec![OsStr::new("--socket"), s.as_os_str()];
    all.extend(["group", "purge", "cn-hangzhou-office-4c8g-1"].map(OsStr::new));
    let out = run(&bin("ferryctl"), all).await?;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("add --yes"), "{err}");
    let still = ferryctl_json(s, &["group", "show", "cn-hangzhou-office-4c8g-1"]).await?;
    assert_eq!(still["status"], "published", "{still}");

    // The purge/delete table, for the pairs reachable without waiting a week
    // (expired and recycling are covered in-process with an injected clock).
    let err = refused(s, &["group", "purge", "design-team", "--yes"]).await?;
    assert!(
        err.contains("cannot purge a subscription group in status published"),
        "{err}"
    );
    let err = refused(s, &["group", "delete", "design-team", "--yes"]).await?;
    assert!(
        err.contains("cannot delete a subscription group in status published"),
        "{err}"
    );
    let err = refused(
        s,
        &["group", "delete", "cn-hangzhou-office-4c8g-1", "--yes"],
    )
    .await?;
    assert!(
        err.contains("cannot delete a pay-as-you-go group in status published"),
        "{err}"
    );
    assert!(err.contains("allowed in this status: purge"), "{err}");
    let done = ferryctl_json(s, &["group", "purge", "cn-hangzhou-office-4c8g-1", "--yes"]).await?;
    assert!(
        done["message"]
            .as_str()
            .is_some_and(|m| m.contains("purged")),
        "{done}"
    );
    let gone = ferryctl_json(s, &["group", "list", "--status", "gone"]).await?;
    assert_eq!(gone.as_array().map(Vec::len), Some(1));
    let err = refused(s, &["group", "purge", "cn-hangzhou-office-4c8g-1", "--yes"]).await?;
    assert!(err.contains("status gone"), "{err}");

    // Events tell the story.
    let events = ferryctl_json(s, &["group", "events", "design-team"]).await?;
    let kinds: Vec<&str> = events
        .as_array()
        .map(|e| e.iter().filter_map(|e| e["kind"].as_str()).collect())
        .unwrap_or_default();
    for k in ["order", "status", "users", "policy", "auto-renew"] {
        assert!(kinds.contains(&k), "{k} missing from {events}");
    }
    Ok(())
}

/// A broker run in this process with a manual clock, so the subscription
/// deadlines (a week, then the retention) pass when the test says so.
struct ClockedBroker {
    config: ferry_broker::BrokerConfig,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ferry_broker::BrokerError>>,
}

impl ClockedBroker {
    async fn start(config: &ferry_broker::BrokerConfig) -> anyhow::Result<ClockedBroker> {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(ferry_broker::daemon::run(
            config.clone(),
            shutdown.clone(),
            ready_tx,
        ));
        let Ok(_ready) = ready_rx.await else {
            anyhow::bail!("broker exited before it was ready: {:?}", task.await);
        };
        Ok(ClockedBroker {
            config: config.clone(),
            shutdown,
            task,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task).await???;
        Ok(())
    }

    fn socket(&self) -> &Path {
        &self.config.admin_socket
    }

    /// The group's status, asked in-process (cheap enough to repeat).
    async fn status(&self, group: &str) -> anyhow::Result<String> {
        let req = AdminRequestV1::GroupShow {
            group: group.parse()?,
        };
        match ferry_broker::admin::request(self.socket(), req).await? {
            AdminResponseV1::GroupShown { detail, .. } => Ok(detail.info.status),
            other => anyhow::bail!("group show answered {other:?}"),
        }
    }

    /// Waits until the deadline task has moved `group` to `status`. The task
    /// gives no signal a test can await, so this asks again after each short
    /// pause, bounded by PATIENCE.
    async fn wait_status(&self, group: &str, status: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let now = self.status(group).await?;
            if now == status {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{group} stayed {now}, expected {status}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Bounds every wait of the in-process tests; a wait that needs it has failed.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_expire_recycle_and_are_removed_per_the_table() -> anyhow::Result<()> {
    ferry_tests::harness::init_logging();
    let tmp = tempfile::tempdir()?;
    let pki_dir = tmp.path().join("pki");
    ferry_broker::pki::init(&pki_dir, &[])?;
    // The admin verbs still stamp with the wall clock (see the report), so the
    // manual clock starts there and only moves forward.
    let clock = ManualClock::new(ferry_broker::clock::now_millis());
    let hook_log = tmp.path().join("hook.log");
    let hook = tmp.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "echo \"$FERRY_NOTIFY_USER $FERRY_NOTIFY_GROUP\" >> '{}'\n",
            hook_log.display()
        ),
    )?;
    let config = ferry_broker::BrokerConfig {
        state_dir: tmp.path().join("state"),
        pki_dir,
        listen: "127.0.0.1:0".parse()?,
        admin_socket: tmp.path().join("admin.sock"),
        admin_group: None,
        health_interval: Duration::from_millis(500),
        missed_health_limit: 3,
        shutdown_grace: Duration::from_secs(5),
        agent_cert_lifetime: ferry_broker::pki::DEFAULT_AGENT_LIFETIME,
        groups: GroupsConfig {
            retention: Duration::from_secs(86_400),
            notify_command: vec!["/bin/sh".into(), hook.display().to_string()],
            clock: clock.clock(),
            ..GroupsConfig::default()
        },
        endpoint: Default::default(),
        store: Default::default(),
        metrics: Default::default(),
        console: None,
    };
    let broker = ClockedBroker::start(&config).await?;
    let s = broker.socket().to_owned();
    let s = s.as_path();

    ferryctl_json(
        s,
        &[
            "user",
            "create",
            "--id",
            "alice",
            "--email",
            "alice@example.com",
            "--mobile",
            "+8613800000001",
        ],
    )
    .await?;
    for (name, user) in [("keep", Some("alice")), ("drop", None)] {
        let mut args = PUBLISH.to_vec();
        args.extend([
            "--name",
            name,
            "--billing",
            "subscription",
            "--duration",
            "1w",
        ]);
        if let Some(u) = user {
            args.extend(["--user", u]);
        }
        ferryctl_json(s, &args).await?;
    }
    // The admin verbs stamp with the wall clock, a moment past the manual
    // clock's start: move the clock past those stamps so the outbox task
    // sees the notification as due.
    clock.advance(Duration::from_secs(60));
    // The activation hook ran through the daemon's outbox task.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while std::fs::read_to_string(&hook_log).unwrap_or_default() != "alice keep\n" {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the hook never reported alice: {:?}",
            std::fs::read_to_string(&hook_log)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A week and a minute later both subscriptions have expired.
    clock.advance(Duration::from_secs(7 * 86_400));
    broker.wait_status("keep", "expired").await?;
    broker.wait_status("drop", "expired").await?;
    let err = refused(s, &["group", "delete", "drop", "--yes"]).await?;
    assert!(
        err.contains(
            "cannot delete a subscription group in status expired; allowed in this status: purge"
        ),
        "{err}"
    );
    let done = ferryctl_json(s, &["group", "purge", "drop", "--yes"]).await?;
    assert!(
        done["message"]
            .as_str()
            .is_some_and(|m| m.contains("purged")),
        "{done}"
    );
    assert_eq!(broker.status("drop").await?, "gone");
    let err = refused(s, &["group", "purge", "drop", "--yes"]).await?;
    assert!(err.contains("status gone"), "{err}");

    // The broker stops; the retention ends while it is down. The restarted
    // broker finds the deadline in its store and recycles the group at once.
    broker.stop().await?;
    clock.advance(Duration::from_secs(86_400));
    let broker = ClockedBroker::start(&config).await?;
    broker.wait_status("keep", "recycling").await?;
    let err = refused(s, &["group", "purge", "keep", "--yes"]).await?;
    assert!(
        err.contains(
            "cannot purge a subscription group in status recycling; allowed in this status: delete"
        ),
        "{err}"
    );
    let err = refused(s, &["group", "renew", "keep", "--duration", "1w"]).await?;
    assert!(err.contains("status recycling"), "{err}");
    let done = ferryctl_json(s, &["group", "delete", "keep", "--yes"]).await?;
    assert!(
        done["message"]
            .as_str()
            .is_some_and(|m| m.contains("deleted")),
        "{done}"
    );

    // The story in the events, each step once, and the orders kept.
    let events = ferryctl_json(s, &["group", "events", "keep"]).await?;
    let steps: Vec<&str> = events
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|e| e["kind"] == "status")
                .filter_map(|e| e["message"].as_str())
                .collect()
        })
        .unwrap_or_default();
    let expected = [
        "publishing -> published",
        "published -> expired",
        "expired -> recycling",
        "recycling -> gone",
    ];
    assert_eq!(steps.len(), expected.len(), "{steps:?}");
    for (step, want) in steps.iter().zip(expected) {
        assert!(step.starts_with(want), "{step} is not {want}");
    }
    let shown = ferryctl_json(s, &["group", "show", "keep"]).await?;
    assert_eq!(shown["status"], "gone");
    assert_eq!(shown["orders"].as_array().map(Vec::len), Some(1), "{shown}");
    assert_eq!(
        std::fs::read_to_string(&hook_log)?,
        "alice keep\n",
        "delivered once, never again after the restart"
    );
    broker.stop().await
}
