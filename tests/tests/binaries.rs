//! Ferry as an operator runs it: `ferryctl pki`, `ferry-broker run` and two
//! `ferry-agent run` processes with config files, sessions reported through
//! the `ferry-agent session` CLI, the state read back with `ferryctl --json`,
//! and systemd's notify protocol checked on a fake `NOTIFY_SOCKET`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use ferry_broker::link::REFUSAL_LINGER;
use ferry_broker::pki;
use ferry_tests::bins::bin;
use ferry_tests::harness::PATIENCE;
use ferry_tests::procs::{
    ferryctl_json, run, wait_notify, AgentProcess, BrokerFiles, BrokerProcess,
    PROCESS_SHUTDOWN_GRACE,
};
use serde_json::Value;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_and_two_agents_as_processes() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    assert_eq!(mode(&files.pki_dir.join(pki::CA_KEY)), 0o600);
    assert_eq!(mode(&files.pki_dir.join(pki::BROKER_KEY)), 0o600);
    // An existing CA is never overwritten.
    let again = run(
        &bin("ferryctl"),
        [
            "pki".as_ref(),
            "init".as_ref(),
            "--dir".as_ref(),
            files.pki_dir.as_os_str(),
        ],
    )
    .await?;
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    let mut broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    assert_ne!(broker.agent_addr.port(), 0);
    let mut h1 = AgentProcess::start(&files, "host-1", broker.agent_addr).await?;
    let mut h2 = AgentProcess::start(&files, "host-2", broker.agent_addr).await?;
    assert_eq!(
        mode(&tmp.path().join("host-1/id").join(pki::AGENT_KEY)),
        0o600
    );

    h1.cli(&["session", "start", "--session", "s1", "--user", "alice"])
        .await?;
    h1.cli(&["session", "start", "--session", "s2", "--user", "bob"])
        .await?;
    h2.cli(&["session", "start", "--session", "s3", "--user", "carol"])
        .await?;
    h1.cli(&["session", "end", "--session", "s1", "--reason", "logout"])
        .await?;
    for agent in [&h1, &h2] {
        let s = agent.wait_synced().await?;
        assert_eq!(s["connected"], true, "{s}");
        assert_eq!(s["spooled"], 0, "{s}");
        assert_eq!(s["acked_seq"], s["last_seq"], "{s}");
    }
    let socket = &files.admin_socket;

    let sessions = ferryctl_json(socket, &["sessions", "list", "--all"]).await?;
    let sessions: BTreeMap<String, Value> = sessions
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|s| (s["session"].as_str().expect("id").to_owned(), s.clone()))
        .collect();
    assert_eq!(sessions.len(), 3, "{sessions:?}");
    assert_eq!(sessions["s1"]["resource"], "host-1");
    assert_eq!(sessions["s1"]["user"], "alice");
    assert_eq!(sessions["s1"]["end_reason"], "logout");
    assert!(sessions["s1"]["ended_at"].is_string());
    assert!(sessions["s1"]["started_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(sessions["s3"]["resource"], "host-2");
    assert!(sessions["s2"]["ended_at"].is_null());
    assert!(sessions["s3"]["end_reason"].is_null());
    let open = ferryctl_json(socket, &["sessions", "list"]).await?;
    assert_eq!(open.as_array().map(Vec::len), Some(2), "{open}");

    let resources = ferryctl_json(socket, &["resources", "list"]).await?;
    let resources = resources.as_array().expect("a JSON array");
    assert_eq!(resources.len(), 2, "{resources:?}");
    for r in resources {
        assert_eq!(r["connected"], true, "{r}");
        assert_eq!(r["draining"], false, "{r}");
        assert_eq!(r["image_version"], "img-7", "{r}");
        assert!(r["host"].is_object(), "{r}");
        // host-1 has s2 open (s1 ended), host-2 has s3.
        assert_eq!(r["sessions"], 1, "{r}");
    }

    let status = ferryctl_json(socket, &["status"]).await?;
    assert_eq!(status["agents_connected"], 2, "{status}");
    assert_eq!(status["resources"], 2, "{status}");
    assert_eq!(status["open_sessions"], 2, "{status}");
    assert_eq!(status["events_recorded"], 4, "{status}");
    assert!(status["broker_version"].is_string(), "{status}");

    // SIGTERM an agent: STOPPING=1, then a clean exit.
    h1.daemon.signal("TERM").await?;
    wait_notify(&h1.notify, "STOPPING=1", PATIENCE)?;
    let code = h1.daemon.wait(PATIENCE).await?;
    assert_eq!(code.code(), Some(0), "{}", h1.daemon.log());

    // SIGTERM the broker with an agent still connected: it drains within its
    // grace period (plus the time it lets refusals reach agents).
    broker.daemon.signal("TERM").await?;
    wait_notify(&broker.notify, "STOPPING=1", PATIENCE)?;
    let code = broker
        .daemon
        .wait(PROCESS_SHUTDOWN_GRACE + REFUSAL_LINGER + PATIENCE)
        .await?;
    assert_eq!(code.code(), Some(0), "{}", broker.daemon.log());
    assert!(!socket.exists(), "the admin socket is removed on exit");

    h2.daemon.signal("TERM").await?;
    wait_notify(&h2.notify, "STOPPING=1", PATIENCE)?;
    assert_eq!(h2.daemon.wait(PATIENCE).await?.code(), Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferryctl_says_when_the_broker_is_not_running() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let socket = tmp.path().join("admin.sock");
    let out = run(
        &bin("ferryctl"),
        ["--socket".as_ref(), socket.as_os_str(), "status".as_ref()],
    )
    .await?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&*socket.to_string_lossy()), "{stderr}");
    Ok(())
}
