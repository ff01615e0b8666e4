//! The group's session limits enforced by the agent against the test broker
//! ([`peer`]): a pushed policy's `idle_disconnect` ends a session the
//! streaming server reported idle, its `max_session_duration` warns and ends
//! sessions that started before it arrived. The disconnect hook behaves like
//! a streaming server: it reports the end on the local socket (with the
//! `ferry-agent` binary), and the broker still gets exactly one `Ended` per
//! session, with the policy's reason.

#![allow(clippy::unwrap_used)] // a test crate: a failed unwrap is a failed test

mod peer;

use ferry_agent::local::{LocalClient, StartProof};
use ferry_common::wire::{Command, CommandOutcome, EndReason, SessionEvent};
use peer::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_overlong_sessions_are_ended_once_with_the_policy_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = mint(&tmp.path().join("pki"), "host-1");
    let mut peer = start_peer(&pki, ferry_common::PROTOCOL_VERSION);
    peer.open.send_replace(true);
    let warn_log = tmp.path().join("warn.log");
    let socket = tmp.path().join("run/agent.sock");
    let hooks = format!(
        r#"
        [hooks]
        disconnect = ["/bin/sh", "-c", "exec {agent} --socket {socket} session end --session \"$2\"", "disconnect-hook"]
        warn = ["/bin/sh", "-c", "echo \"$2 $FERRY_DEADLINE_MS $FERRY_MESSAGE\" >> {warn}", "warn-hook"]
        "#,
        agent = env!("CARGO_BIN_EXE_ferry-agent"),
        socket = socket.display(),
        warn = warn_log.display(),
    );
    let agent = start_agent(config_with(&pki, tmp.path(), peer.addr, &hooks)).await;
    assert_eq!(agent.ready.local_socket, socket);
    let mut c = LocalClient::connect(&socket).await.unwrap();
    c.wait_synced(WAIT).await.unwrap();
    let sid = |s: &str| -> ferry_common::SessionId { s.parse().unwrap() };
    c.session_start(sid("s-idle"), "alice".parse().unwrap(), StartProof::Trusted)
        .await
        .unwrap();
    c.session_start(sid("s-long"), "bob".parse().unwrap(), StartProof::Trusted)
        .await
        .unwrap();

    // Idle sessions end after 200 ms; no maximum duration yet.
    let policy = |version, session: &str| Command::ApplyPolicy {
        group: "g1".parse().unwrap(),
        version,
        document: format!(r#"{{"scaling":{{}},"session":{session}}}"#),
    };
    peer.commands
        .send(policy(
            1,
            r#"{"disconnect_retention_ms":900000,"idle_disconnect_ms":200,"max_session_duration_ms":null}"#,
        ))
        .await
        .unwrap();
    assert_eq!(recv(&mut peer.results).await.outcome, CommandOutcome::Done);
    // The streaming server reports it idle since a second ago (the CLI verb).
    let idle = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry-agent"))
        .arg("--socket")
        .arg(&socket)
        .args(["session", "idle", "s-idle", "--since", "1s"])
        .output();
    let idle = tokio::time::timeout(WAIT, idle).await.unwrap().unwrap();
    assert!(idle.status.success(), "{idle:?}");
    let mut status = agent.ready.status.clone();
    tokio::time::timeout(WAIT, status.wait_for(|s| s.last_seq >= 3))
        .await
        .unwrap()
        .unwrap();

    // A maximum duration of 1 ms: s-long, older than the policy, is past it:
    // warned and ended at once.
    peer.commands
        .send(policy(
            2,
            r#"{"disconnect_retention_ms":900000,"idle_disconnect_ms":null,"max_session_duration_ms":1}"#,
        ))
        .await
        .unwrap();
    assert_eq!(recv(&mut peer.results).await.outcome, CommandOutcome::Done);
    tokio::time::timeout(WAIT, status.wait_for(|s| s.last_seq >= 4))
        .await
        .unwrap()
        .unwrap();
    let synced = c.wait_synced(WAIT).await.unwrap();
    assert_eq!(synced.link.last_seq, 4);

    let hello = recv(&mut peer.hellos).await;
    let events = peer.recorded.lock().unwrap()[&hello.spool_id].clone();
    let ends: Vec<(String, EndReason)> = events
        .iter()
        .filter_map(|e| match &e.event {
            SessionEvent::Ended {
                session, reason, ..
            } => Some((session.to_string(), reason.clone())),
            SessionEvent::Started { .. } => None,
        })
        .collect();
    assert_eq!(
        ends,
        [
            ("s-idle".to_owned(), EndReason::Idle),
            ("s-long".to_owned(), EndReason::MaxSessionDuration)
        ]
    );
    let started_long = events
        .iter()
        .find_map(|e| match &e.event {
            SessionEvent::Started { session, at, .. } if session.as_str() == "s-long" => Some(at.0),
            _ => None,
        })
        .unwrap();
    let warned = std::fs::read_to_string(&warn_log).unwrap();
    let line = warned.lines().collect::<Vec<_>>();
    assert_eq!(line.len(), 1, "{warned}");
    assert!(
        line[0].starts_with(&format!("s-long {} ", started_long + 1)),
        "{warned}"
    );
    assert!(line[0].contains("maximum session duration"), "{warned}");
    agent.stop().await;
    peer.stop().await;
}
