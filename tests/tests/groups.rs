//! The delivery-group lifecycle as an operator drives it: a real
//! `ferry-broker` process and the real `ferryctl` binary.

use std::ffi::OsStr;
use std::path::Path;

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
    let good = tmp.path().join("good.csv");
    std::fs::write(&good, "id,email,mobile\nbob,bob@example.com,+8613800000002\ncarol,carol@example.com,+8613800000003\n")?;
    let imported = ferryctl_json(s, &["user", "import", good.to_str().unwrap_or_default()]).await?;
    assert_eq!(imported.as_array().map(Vec::len), Some(2), "{imported}");

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
    let g = ferryctl_json(s, &args).await?;
    assert_eq!(g["name"], "design-team");
    assert_eq!(g["status"], "published");
    assert_eq!(g["orders"][0]["kind"], "publish");
    assert_eq!(g["orders"][0]["amount"], "92.87", "199 x 2 x 7/30: {g}");
    assert_eq!(g["assigned_users"][0], "alice");
    assert_eq!(g["policy_applied"], false);
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

    // The purge/delete table, for the pairs reachable without waiting a week
    // (expired and recycling are covered in-process with an injected clock).
    let err = refused(s, &["group", "purge", "design-team"]).await?;
    assert!(
        err.contains("cannot purge a subscription group in status published"),
        "{err}"
    );
    let err = refused(s, &["group", "delete", "design-team"]).await?;
    assert!(
        err.contains("cannot delete a subscription group in status published"),
        "{err}"
    );
    let err = refused(s, &["group", "delete", "cn-hangzhou-office-4c8g-1"]).await?;
    assert!(
        err.contains("cannot delete a pay-as-you-go group in status published"),
        "{err}"
    );
    assert!(err.contains("allowed in this status: purge"), "{err}");
    let done = ferryctl_json(s, &["group", "purge", "cn-hangzhou-office-4c8g-1"]).await?;
    assert!(
        done["message"]
            .as_str()
            .is_some_and(|m| m.contains("purged")),
        "{done}"
    );
    let gone = ferryctl_json(s, &["group", "list", "--status", "gone"]).await?;
    assert_eq!(gone.as_array().map(Vec::len), Some(1));
    let err = refused(s, &["group", "purge", "cn-hangzhou-office-4c8g-1"]).await?;
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
