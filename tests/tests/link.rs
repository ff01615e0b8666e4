//! The agent <-> broker link end to end, in one process: the real broker
//! daemon and real agents, talking QUIC with mutual TLS on 127.0.0.1.
//!
//! Every wait is on a readiness signal, an admin answer or the agent's
//! `LinkStatus` watch channel; `PATIENCE` only bounds it.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use ferry_agent::local::{LocalClient, StartProof};
use ferry_broker::pki;
use ferry_common::admin::{AdminRequestV1, AdminResponseV1, SessionInfo};
use ferry_common::wire::EndReason;
use ferry_common::{SessionId, UserId};
use ferry_tests::harness::{init_logging, AgentIdentity, TestAgent, TestBroker};

fn sid(s: &str) -> SessionId {
    s.parse().expect("session id")
}

fn uid(s: &str) -> UserId {
    s.parse().expect("user id")
}

async fn start(c: &mut LocalClient, session: &str, user: &str) -> anyhow::Result<u64> {
    c.session_start(sid(session), uid(user), StartProof::Trusted)
        .await
        .with_context(|| format!("start {session}"))
}

async fn end(c: &mut LocalClient, session: &str, reason: EndReason) -> anyhow::Result<u64> {
    c.session_end(sid(session), reason)
        .await
        .with_context(|| format!("end {session}"))
}

/// Sessions by id; fails if any id appears twice.
fn by_id(sessions: Vec<SessionInfo>) -> BTreeMap<String, SessionInfo> {
    let mut map = BTreeMap::new();
    for s in sessions {
        let id = s.session.to_string();
        assert!(
            map.insert(id.clone(), s).is_none(),
            "session {id} listed twice"
        );
    }
    map
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_agents_report_concurrently_and_every_session_is_recorded_once() -> anyhow::Result<()>
{
    init_logging();
    let tmp = tempfile::tempdir()?;
    let broker = TestBroker::start(tmp.path()).await?;
    const AGENTS: usize = 5;
    const SESSIONS: usize = 12;
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        agents.push(TestAgent::start(&broker, &format!("host-{i}")).await?);
    }

    // Every agent reports at once: each session starts, every other one ends.
    let mut reporters = tokio::task::JoinSet::new();
    for (i, agent) in agents.iter().enumerate() {
        let mut client = agent.client().await?;
        reporters.spawn(async move {
            for n in 0..SESSIONS {
                let session = format!("h{i}-s{n}");
                start(&mut client, &session, &format!("user{n}")).await?;
                if n % 2 == 0 {
                    end(&mut client, &session, EndReason::Logout).await?;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = reporters.join_next().await {
        done??;
    }
    for agent in &agents {
        let s = agent.wait_synced().await?;
        assert_eq!(s.last_seq, (SESSIONS + SESSIONS / 2) as u64);
        assert_eq!(s.acked_seq, s.last_seq);
    }

    let all = by_id(broker.sessions(true).await?);
    assert_eq!(all.len(), AGENTS * SESSIONS);
    for i in 0..AGENTS {
        for n in 0..SESSIONS {
            let s = &all[&format!("h{i}-s{n}")];
            assert_eq!(s.resource.as_str(), format!("host-{i}"));
            assert_eq!(s.user.as_str(), format!("user{n}"));
            if n % 2 == 0 {
                assert!(s.ended_at.is_some_and(|e| e >= s.started_at), "{s:?}");
                assert_eq!(s.end_reason.as_deref(), Some("logout"));
            } else {
                assert_eq!((s.ended_at, s.end_reason.as_deref()), (None, None));
            }
        }
    }
    let open = by_id(broker.sessions(false).await?);
    assert_eq!(open.len(), AGENTS * SESSIONS / 2);
    assert!(open.values().all(|s| s.ended_at.is_none()));

    let status = broker.status().await?;
    assert_eq!(status.agents_connected, AGENTS as u64);
    assert_eq!(status.resources, AGENTS as u64);
    assert_eq!(status.open_sessions, (AGENTS * SESSIONS / 2) as u64);
    assert_eq!(
        status.events_recorded,
        (AGENTS * (SESSIONS + SESSIONS / 2)) as u64
    );
    let resources = broker.resources().await?;
    assert_eq!(resources.len(), AGENTS);
    for r in &resources {
        assert!(r.connected, "{r:?}");
        assert_eq!(r.sessions, (SESSIONS / 2) as u64, "{r:?}");
        assert_eq!(r.image_version, "test-image");
        assert_eq!(r.agent_version, ferry_agent::AGENT_VERSION);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_and_downtime_lose_and_double_nothing() -> anyhow::Result<()> {
    init_logging();
    let tmp = tempfile::tempdir()?;
    let mut broker = TestBroker::start(tmp.path()).await?;
    let a = TestAgent::start(&broker, "host-a").await?;
    let b = TestAgent::start(&broker, "host-b").await?;
    let (mut ca, mut cb) = (a.client().await?, b.client().await?);
    start(&mut ca, "a1", "alice").await?;
    start(&mut ca, "a2", "bob").await?;
    start(&mut cb, "b1", "carol").await?;
    a.wait_synced().await?;
    b.wait_synced().await?;
    assert_eq!(broker.status().await?.events_recorded, 3);

    // Graceful restart: the agents are told, reconnect to the new broker on
    // the same port and state, and nothing is recorded twice.
    broker.stop().await?;
    a.wait_disconnected().await?;
    b.wait_disconnected().await?;
    // While the broker is down the agents keep taking reports into the spool.
    end(&mut ca, "a1", EndReason::Disconnected).await?;
    start(&mut cb, "b2", "dave").await?;
    end(&mut cb, "b1", EndReason::Other("window closed".into())).await?;
    assert_eq!(a.link().spooled, 1);
    assert_eq!(b.link().spooled, 2);
    broker.restart().await?;
    let sa = a.wait_synced().await?;
    let sb = b.wait_synced().await?;
    assert_eq!((sa.last_seq, sa.acked_seq), (3, 3));
    assert_eq!((sb.last_seq, sb.acked_seq), (3, 3));

    let all = by_id(broker.sessions(true).await?);
    assert_eq!(
        all.keys().map(String::as_str).collect::<Vec<_>>(),
        ["a1", "a2", "b1", "b2"]
    );
    assert_eq!(all["a1"].end_reason.as_deref(), Some("disconnected"));
    assert_eq!(all["b1"].end_reason.as_deref(), Some("window closed"));
    assert!(all["a2"].ended_at.is_none() && all["b2"].ended_at.is_none());
    let status = broker.status().await?;
    assert_eq!(status.events_recorded, 6);
    assert_eq!(status.open_sessions, 2);
    assert_eq!(status.agents_connected, 2);

    // A second restart with nothing new: the agents replay nothing the
    // broker already has, so nothing changes.
    broker.stop().await?;
    a.wait_disconnected().await?;
    b.wait_disconnected().await?;
    broker.restart().await?;
    a.wait_synced().await?;
    b.wait_synced().await?;
    let status = broker.status().await?;
    assert_eq!(status.agents_connected, 2);
    assert_eq!(status.events_recorded, 6);
    assert_eq!(broker.sessions(true).await?.len(), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_before_the_broker_delivers_everything() -> anyhow::Result<()> {
    init_logging();
    let tmp = tempfile::tempdir()?;
    let mut broker = TestBroker::start(tmp.path()).await?;
    // Learn the port, then take the broker down before any agent exists.
    broker.stop().await?;
    let mut agent = TestAgent::start(&broker, "host-a").await?;
    let mut c = agent.client().await?;
    for n in 0..5 {
        start(&mut c, &format!("s{n}"), "alice").await?;
    }
    end(&mut c, "s0", EndReason::Logout).await?;
    // The agent's own restart keeps its spool.
    drop(c);
    agent.restart().await?;
    let mut c = agent.client().await?;
    end(&mut c, "s1", EndReason::HostShutdown).await?;
    assert_eq!(agent.link().spooled, 7);
    assert!(!agent.link().connected);

    broker.restart().await?;
    let s = agent.wait_synced().await?;
    assert_eq!((s.last_seq, s.acked_seq, s.spooled), (7, 7, 0));
    let all = by_id(broker.sessions(true).await?);
    assert_eq!(all.len(), 5);
    assert_eq!(all["s0"].end_reason.as_deref(), Some("logout"));
    assert_eq!(all["s1"].end_reason.as_deref(), Some("host shutdown"));
    assert_eq!(broker.status().await?.events_recorded, 7);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_the_host_lost_are_ended_at_reconnect() -> anyhow::Result<()> {
    init_logging();
    let tmp = tempfile::tempdir()?;
    let broker = TestBroker::start(tmp.path()).await?;
    let mut agent = TestAgent::start(&broker, "host-a").await?;
    let mut c = agent.client().await?;
    start(&mut c, "kept", "alice").await?;
    start(&mut c, "lost", "bob").await?;
    agent.wait_synced().await?;
    drop(c);
    agent.stop().await?;

    // The host comes back with an empty state directory (reinstalled): it
    // has no sessions, so the broker ends the ones it thought open.
    let mut config = agent.config().clone();
    config.state_dir = tmp.path().join("fresh-state");
    let agent = TestAgent::start_with(config).await?;
    agent.wait_synced().await?;
    let all = by_id(broker.sessions(true).await?);
    assert_eq!(all.len(), 2);
    for s in all.values() {
        assert!(s.ended_at.is_some(), "{s:?}");
        assert_eq!(
            s.end_reason.as_deref(),
            Some(ferry_broker::store::RECONCILE_REASON)
        );
    }
    let status = broker.status().await?;
    assert_eq!(status.open_sessions, 0);
    // The broker's ends are not agent events: only the two starts count.
    assert_eq!(status.events_recorded, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_reaches_the_agent_and_shows_on_the_broker() -> anyhow::Result<()> {
    init_logging();
    let tmp = tempfile::tempdir()?;
    let broker = TestBroker::start(tmp.path()).await?;
    let agent = TestAgent::start(&broker, "host-a").await?;
    let other = TestAgent::start(&broker, "host-b").await?;
    agent.wait_synced().await?;
    other.wait_synced().await?;
    assert!(!agent.link().draining);

    let answer = broker
        .admin(AdminRequestV1::Drain {
            resource: "host-a".parse()?,
        })
        .await?;
    assert!(matches!(answer, AdminResponseV1::Done { .. }), "{answer:?}");
    agent.wait_for("draining", |s| s.draining).await?;
    let resources = broker.resources().await?;
    let draining: BTreeSet<_> = resources
        .iter()
        .filter(|r| r.draining)
        .map(|r| r.resource.to_string())
        .collect();
    assert_eq!(draining, BTreeSet::from(["host-a".to_owned()]));
    // A draining host takes no new sessions: not available.
    let available: BTreeSet<_> = resources
        .iter()
        .filter(|r| r.available)
        .map(|r| r.resource.to_string())
        .collect();
    assert_eq!(available, BTreeSet::from(["host-b".to_owned()]));
    assert!(!other.link().draining);

    let answer = broker
        .admin(AdminRequestV1::Undrain {
            resource: "host-a".parse()?,
        })
        .await?;
    assert!(matches!(answer, AdminResponseV1::Done { .. }), "{answer:?}");
    agent.wait_for("undrained", |s| !s.draining).await?;
    assert!(broker.resources().await?.iter().all(|r| !r.draining));

    // A drain for a resource nobody registered is a clear error.
    let err = broker
        .admin(AdminRequestV1::Drain {
            resource: "nobody".parse()?,
        })
        .await
        .expect_err("unknown resource");
    assert!(format!("{err:#}").contains("nobody"), "{err:#}");
    Ok(())
}

/// Reports one session on `agent` and waits until its link has failed at
/// least once, returning the error it reports.
async fn refused(agent: &TestAgent) -> anyhow::Result<String> {
    let mut c = agent.client().await?;
    start(&mut c, "s1", "mallory").await?;
    let s = agent
        .wait_for("refused", |s| s.last_error.is_some())
        .await?;
    assert!(!s.connected);
    assert_eq!(s.spooled, 1, "nothing may be acknowledged");
    Ok(s.last_error.unwrap_or_default())
}

async fn assert_nothing_recorded(broker: &TestBroker) -> anyhow::Result<()> {
    let status = broker.status().await?;
    assert_eq!(
        (
            status.agents_connected,
            status.resources,
            status.events_recorded
        ),
        (0, 0, 0),
        "{status:?}"
    );
    assert!(broker.sessions(true).await?.is_empty());
    assert!(broker.resources().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_never_connects() -> anyhow::Result<()> {
    init_logging();
    let tmp = tempfile::tempdir()?;
    let broker = TestBroker::start(&tmp.path().join("broker")).await?;
    // A CA of its own, trusted by nobody; the agent trusts the real broker.
    let rogue_pki = tmp.path().join("rogue-pki");
    pki::init(&rogue_pki, &[])?;
    let out = tmp.path().join("rogue-id");
    pki::issue_agent(
        &rogue_pki,
        &"host-a".parse()?,
        &out,
        pki::Validity::starting_now(pki::DEFAULT_AGENT_LIFETIME),
    )?;
    let identity = AgentIdentity {
        ca_cert: broker.pki_dir().join(pki::CA_CERT),
        ..AgentIdentity::in_dir(&out)
    };
    let agent = TestAgent::start_with(broker.agent_config("host-a", &identity)?).await?;
    let why = refused(&agent).await?;
    // The agent says the broker rejected its certificate, not just
    // "connection lost".
    assert!(
        why.contains("connection to broker") && why.contains("certificate"),
        "{why}"
    );
    assert_nothing_recorded(&broker).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_name_the_certificate_does_not_carry_is_named_with_a_hint() -> anyhow::Result<()> {
    init_logging();
    let tmp = tempfile::tempdir()?;
    // The broker's certificate names localhost, 127.0.0.1 and ::1.
    let broker = TestBroker::start(tmp.path()).await?;
    let identity = broker.issue_identity("host-a")?;
    let mut config = broker.agent_config("host-a", &identity)?;
    config.broker_name = "broker.example.net".into();
    let agent = TestAgent::start_with(config).await?;
    let why = refused(&agent).await?;
    assert!(
        why.contains("broker_name must be a DNS name in the broker's certificate")
            && why.contains("\"broker.example.net\"")
            && why.contains("localhost"),
        "{why}"
    );
    assert_nothing_recorded(&broker).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_resource_is_refused() -> anyhow::Result<()> {
    init_logging();
    let tmp = tempfile::tempdir()?;
    let broker = TestBroker::start(tmp.path()).await?;
    // Configured as host-b with host-a's certificate: the agent does not
    // start (the broker would refuse it, see the broker's link tests): the
    // certificate names host-a.
    let identity = broker.issue_identity("host-a")?;
    let err = TestAgent::start_with(broker.agent_config("host-b", &identity)?)
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(
        err.contains("WrongResource") && err.contains("host-a") && err.contains("host-b"),
        "{err}"
    );
    assert_nothing_recorded(&broker).await
}
