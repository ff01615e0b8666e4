//! The agent end to end against a minimal test broker ([`peer`]) that
//! speaks the contract over real QUIC with mutual TLS on 127.0.0.1:0. The
//! real broker<->agent tests live in the `tests` crate; this peer only lets
//! the agent crate test its own half.

#![allow(clippy::unwrap_used)] // a test crate: a failed unwrap is a failed test

mod peer;

use ferry_agent::local::{LocalClient, StartProof};
use ferry_common::wire::{Command, CommandOutcome, EndReason, SessionEvent};
use peer::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_reach_the_broker_in_order_and_survive_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = mint(&tmp.path().join("pki"), "host-1");
    let mut peer = start_peer(&pki, ferry_common::PROTOCOL_VERSION);
    let cfg = config(&pki, tmp.path(), peer.addr);
    let agent = start_agent(cfg.clone()).await;

    // The broker is not taking connections yet: reports are spooled anyway.
    let mut c = LocalClient::connect(&agent.ready.local_socket)
        .await
        .unwrap();
    let user = |u: &str| u.parse().unwrap();
    let sid = |s: &str| s.parse().unwrap();
    assert_eq!(
        c.session_start(sid("s1"), user("alice"), StartProof::Trusted)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        c.session_start(sid("s2"), user("bob"), StartProof::Trusted)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        c.session_end(sid("s1"), EndReason::Logout).await.unwrap(),
        3
    );
    let st = c.status().await.unwrap();
    assert!(!st.link.connected);
    assert_eq!((st.link.last_seq, st.link.spooled), (3, 3));

    peer.open.send_replace(true);
    let synced = c.wait_synced(WAIT).await.unwrap();
    assert_eq!((synced.link.acked_seq, synced.link.spooled), (3, 0));
    let hello = recv(&mut peer.hellos).await;
    assert_eq!(hello.resource.as_str(), "host-1");
    assert_eq!(hello.group.as_ref().map(|g| g.as_str()), Some("g1"));
    assert_eq!(hello.image_version, "img-1");
    assert!(hello.host.vcpus >= 1);
    let open: Vec<_> = hello.sessions.iter().map(|s| s.session.as_str()).collect();
    assert_eq!(open, ["s2"]);
    let spool_id = hello.spool_id;
    {
        let rec = peer.recorded.lock().unwrap();
        let evs = &rec[&spool_id];
        let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert!(
            matches!(&evs[2].event, SessionEvent::Ended { session, reason: EndReason::Logout, .. } if session.as_str() == "s1")
        );
    }

    // Health flows on the broker's interval and counts open sessions.
    let h = recv(&mut peer.health).await;
    assert_eq!(h.sessions, 1);
    assert!(!h.draining);

    // Commands are carried out and answered; drain is reported in health.
    peer.commands.send(Command::Drain).await.unwrap();
    let r = recv(&mut peer.results).await;
    assert_eq!(r.outcome, CommandOutcome::Done);
    loop {
        if recv(&mut peer.health).await.draining {
            break;
        }
    }
    peer.commands
        .send(Command::DisconnectSession {
            session: sid("s2"),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let r = recv(&mut peer.results).await;
    assert!(
        matches!(&r.outcome, CommandOutcome::Failed(m) if m.contains("no disconnect hook")),
        "{r:?}"
    );
    agent.stop().await;

    // Restart: same spool, nothing replayed twice, drain kept, s2 still open.
    let agent = start_agent(cfg).await;
    let mut c = LocalClient::connect(&agent.ready.local_socket)
        .await
        .unwrap();
    let st = c.wait_synced(WAIT).await.unwrap();
    assert!(st.link.draining);
    assert_eq!(st.link.last_seq, 3);
    let hello = recv(&mut peer.hellos).await;
    assert_eq!(hello.spool_id, spool_id);
    let open: Vec<_> = hello.sessions.iter().map(|s| s.session.as_str()).collect();
    assert_eq!(open, ["s2"]);
    assert_eq!(
        c.session_end(sid("s2"), EndReason::Logout).await.unwrap(),
        4
    );
    c.wait_synced(WAIT).await.unwrap();
    {
        let rec = peer.recorded.lock().unwrap();
        let seqs: Vec<u64> = rec[&spool_id].iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
    }
    agent.stop().await;
    peer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_protocol_version_is_reported_and_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = mint(&tmp.path().join("pki"), "host-1");
    let peer = start_peer(&pki, ferry_common::PROTOCOL_VERSION + 1);
    peer.open.send_replace(true);
    let agent = start_agent(config(&pki, tmp.path(), peer.addr)).await;
    let mut status = agent.ready.status.clone();
    let st = tokio::time::timeout(
        WAIT,
        status.wait_for(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("protocol"))
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert!(!st.connected);
    assert!(st.last_error.unwrap().contains("test broker speaks 2"));
    agent.stop().await;
    peer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_a_certificate_from_another_ca_is_not_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = mint(&tmp.path().join("pki"), "host-1");
    let other = mint(&tmp.path().join("other"), "host-1");
    let peer = start_peer(&other, ferry_common::PROTOCOL_VERSION);
    peer.open.send_replace(true);
    let agent = start_agent(config(&pki, tmp.path(), peer.addr)).await;
    let mut status = agent.ready.status.clone();
    let st = tokio::time::timeout(WAIT, status.wait_for(|s| s.last_error.is_some()))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert!(!st.connected);
    let err = st.last_error.unwrap();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    agent.stop().await;
    peer.stop().await;
}
