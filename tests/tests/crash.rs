//! Crash safety with the real binaries: the broker is SIGKILLed at a random
//! moment while two agents report a stream of sessions, then restarted on
//! the same state directory and port. At the end the broker holds exactly
//! what the agents were told was recorded: every event once, none lost,
//! none doubled.
//!
//! The same for the agent: SIGKILLed at a random moment while it takes
//! session reports, restarted on its spool, it delivers every event it
//! confirmed once, and nothing it did not confirm as more than it was.
//!
//! The moment of each kill comes from a seeded rng; the seed is printed and
//! `FERRY_CRASH_SEED=N` replays a run. `FERRY_CRASH_ROUNDS=N` runs N kills
//! per test instead of a few (`tests/soak/crash-points`).

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use ferry_agent::local::{LocalClient, StartProof};
use ferry_common::wire::EndReason;
use ferry_tests::harness::{crash_rounds, seeded_rng, PATIENCE};
use ferry_tests::procs::{ferryctl_json, AgentProcess, BrokerFiles, BrokerProcess};
use rand::Rng;
use tokio::sync::watch;

/// Kill-and-restart rounds in the suite; bounded so the test stays fast.
const ROUNDS: u32 = 3;
/// Sessions each agent starts per round; two of three also end.
const SESSIONS_PER_ROUND: u32 = 12;
const AGENTS: [&str; 2] = ["host-1", "host-2"];

/// What the test expects the broker to hold for one session.
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    resource: String,
    user: String,
    ended: bool,
}

/// Events one agent reports in a round: a start per session, an end for two
/// of three.
fn events_per_round() -> u64 {
    let ends = (0..SESSIONS_PER_ROUND).filter(|n| n % 3 != 0).count() as u64;
    u64::from(SESSIONS_PER_ROUND) + ends
}

/// Reports one round of sessions on `agent`, counting each event the agent
/// confirmed as durably spooled.
async fn report_round(
    agent: &AgentProcess,
    resource: &'static str,
    round: u32,
    reported: watch::Sender<u64>,
) -> anyhow::Result<Vec<(String, Expected)>> {
    let mut client = LocalClient::connect(&agent.local_socket).await?;
    let mut out = Vec::new();
    for n in 0..SESSIONS_PER_ROUND {
        let session = format!("r{round}-{resource}-{n}");
        let user = format!("user{n}");
        client
            .session_start(session.parse()?, user.parse()?, StartProof::Trusted)
            .await
            .with_context(|| format!("start {session}"))?;
        reported.send_modify(|c| *c += 1);
        let ended = n % 3 != 0;
        if ended {
            client
                .session_end(session.parse()?, EndReason::Logout)
                .await
                .with_context(|| format!("end {session}"))?;
            reported.send_modify(|c| *c += 1);
        }
        out.push((
            session,
            Expected {
                resource: resource.to_owned(),
                user,
                ended,
            },
        ));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sigkill_while_agents_report_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let (seed, mut rng) = seeded_rng("FERRY_CRASH_SEED", "crash test")?;
    let rounds = crash_rounds(ROUNDS)?;
    let t0 = std::time::Instant::now();

    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let mut broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    // Later runs bind the port the OS gave the first one: the agents'
    // configured broker address must stay valid across the restarts.
    let addr = broker.agent_addr;
    let mut agents = Vec::new();
    for resource in AGENTS {
        agents.push(AgentProcess::start(&files, resource, addr).await?);
    }
    let agents = std::sync::Arc::new(agents);

    let mut expected = BTreeMap::new();
    let mut total_events = 0u64;
    for round in 0..rounds {
        // Start each round on live connections: one probe session per agent,
        // acknowledged after the previous restart, so only the current broker
        // can have acknowledged it. Then the kill lands on a live stream (some
        // events acknowledged, some in flight, some reported while the broker
        // is down), never on an agent still holding a dead connection.
        for (agent, resource) in agents.iter().zip(AGENTS) {
            let session = format!("r{round}-{resource}-probe");
            agent.start_session(&session, "probe").await?;
            agent.wait_synced().await?;
            expected.insert(
                session,
                Expected {
                    resource: resource.to_owned(),
                    user: "probe".to_owned(),
                    ended: false,
                },
            );
            total_events += 1;
        }
        let round_events = events_per_round() * AGENTS.len() as u64;
        let kill_after = rng.random_range(1..=round_events);
        eprintln!("round {round}: SIGKILL after {kill_after} of {round_events} events");
        let (count_tx, mut count_rx) = watch::channel(0u64);
        let mut reporters = tokio::task::JoinSet::new();
        for (i, resource) in AGENTS.into_iter().enumerate() {
            let agents = agents.clone();
            let count = count_tx.clone();
            reporters.spawn(async move { report_round(&agents[i], resource, round, count).await });
        }
        drop(count_tx);
        match tokio::time::timeout(PATIENCE, count_rx.wait_for(|c| *c >= kill_after)).await {
            Ok(Ok(_)) => {}
            _ => bail!("round {round}: the agents stopped reporting before the kill"),
        }
        let status = broker.daemon.crash().await?;
        let mut acked = Vec::new();
        for agent in agents.iter() {
            let link = LocalClient::connect(&agent.local_socket)
                .await?
                .status()
                .await?;
            acked.push(format!(
                "{} acked {}/{}",
                link.resource, link.link.acked_seq, link.link.last_seq
            ));
        }
        eprintln!(
            "round {round}: killed at {:?}; {}",
            t0.elapsed(),
            acked.join(", ")
        );
        assert_eq!(status.code(), None, "killed by a signal, not exited");
        broker = BrokerProcess::start(&files, addr, round + 1).await?;
        assert_eq!(broker.agent_addr, addr);
        while let Some(done) = reporters.join_next().await {
            expected.extend(done??);
        }
        total_events += round_events;
    }

    for (agent, resource) in agents.iter().zip(AGENTS) {
        let s = agent.wait_synced().await?;
        assert_eq!(s["resource"], resource, "{s}");
        assert_eq!(s["spooled"], 0, "{s}");
        // Each round: the probe and the reported stream.
        let per_agent = (1 + events_per_round()) * u64::from(rounds);
        assert_eq!(s["last_seq"], per_agent, "{s}");
        assert_eq!(s["acked_seq"], s["last_seq"], "{s}");
    }

    eprintln!("all synced at {:?}", t0.elapsed());
    let socket = &files.admin_socket;
    let listed = ferryctl_json(socket, &["sessions", "list", "--all"]).await?;
    let mut recorded = BTreeMap::new();
    for s in listed.as_array().context("sessions list is an array")? {
        let id = s["session"].as_str().context("session id")?.to_owned();
        let got = Expected {
            resource: s["resource"].as_str().context("resource")?.to_owned(),
            user: s["user"].as_str().context("user")?.to_owned(),
            ended: !s["ended_at"].is_null(),
        };
        if s["end_reason"].is_string() {
            assert_eq!(s["end_reason"], "logout", "{s}");
        }
        assert!(recorded.insert(id.clone(), got).is_none(), "{id} twice");
    }
    assert_eq!(recorded, expected, "seed {seed}");

    let status = ferryctl_json(socket, &["status"]).await?;
    assert_eq!(
        status["events_recorded"], total_events,
        "seed {seed}: {status}"
    );
    let open = expected.values().filter(|e| !e.ended).count();
    assert_eq!(status["open_sessions"], open, "seed {seed}: {status}");
    // Not `agents_connected`: an agent whose last events were acknowledged
    // before the final kill is synced but may not have noticed yet that its
    // connection died, which is fine: nothing of it is unacknowledged.
    assert_eq!(status["resources"], AGENTS.len(), "{status}");
    Ok(())
}

/// One report made to the agent, confirmed (the agent answered that it is
/// spooled) or cut short by the kill (it may or may not have been spooled).
#[derive(Debug)]
struct Sent {
    session: String,
    start: bool,
    confirmed: bool,
}

/// Reports sessions to the agent at `socket` until it dies (or the round's
/// reports are all made), counting confirmed reports in `count`.
async fn report_until_killed(
    socket: std::path::PathBuf,
    round: u32,
    count: watch::Sender<u64>,
) -> Vec<Sent> {
    let mut sent = Vec::new();
    let Ok(mut client) = LocalClient::connect(&socket).await else {
        return sent;
    };
    for n in 0..SESSIONS_PER_ROUND {
        let session = format!("a{round}-{n}");
        let (Ok(id), Ok(user)) = (session.parse(), format!("user{n}").parse()) else {
            return sent;
        };
        let started = client
            .session_start(id, user, StartProof::Trusted)
            .await
            .is_ok();
        sent.push(Sent {
            session: session.clone(),
            start: true,
            confirmed: started,
        });
        if !started {
            return sent;
        }
        count.send_modify(|c| *c += 1);
        if n % 3 != 0 {
            let Ok(id) = session.parse() else {
                return sent;
            };
            let ended = client.session_end(id, EndReason::Logout).await.is_ok();
            sent.push(Sent {
                session,
                start: false,
                confirmed: ended,
            });
            if !ended {
                return sent;
            }
            count.send_modify(|c| *c += 1);
        }
    }
    sent
}

/// What the broker may hold of one session the agent was told about.
#[derive(Debug, Default)]
struct Told {
    /// Its start was confirmed (else it was cut short: it may be missing).
    start_confirmed: bool,
    /// An end was sent, and whether it was confirmed.
    end: Option<bool>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_while_it_takes_reports_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let (seed, mut rng) = seeded_rng("FERRY_CRASH_SEED", "agent crash test")?;
    let rounds = crash_rounds(ROUNDS)?;

    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    let resource = AGENTS[0];
    let mut agent = AgentProcess::start(&files, resource, broker.agent_addr).await?;

    let mut told: BTreeMap<String, Told> = BTreeMap::new();
    let (mut confirmed, mut cut_short) = (0u64, 0u64);
    for round in 0..rounds {
        let kill_after = rng.random_range(1..=events_per_round());
        let (count_tx, mut count_rx) = watch::channel(0u64);
        let reporter = tokio::spawn(report_until_killed(
            agent.local_socket.clone(),
            round,
            count_tx,
        ));
        // The reporter drops its sender when it is done, which also ends the wait.
        let _ = tokio::time::timeout(PATIENCE, count_rx.wait_for(|c| *c >= kill_after)).await;
        let status = agent.daemon.crash().await?;
        assert_eq!(status.code(), None, "killed by a signal, not exited");
        let sent = reporter.await?;
        eprintln!(
            "round {round}: agent killed after {} confirmed of {kill_after} planned; {} report(s) sent",
            count_rx.borrow().to_owned(),
            sent.len()
        );
        for s in sent {
            if s.confirmed {
                confirmed += 1;
            } else {
                cut_short += 1;
            }
            let t = told.entry(s.session).or_default();
            if s.start {
                t.start_confirmed = s.confirmed;
            } else {
                t.end = Some(s.confirmed);
            }
        }
        // What a kill in the middle of a file replacement leaves: the
        // restarted agent removes it.
        let stale = agent
            .config
            .with_file_name("state")
            .join(format!(".versions.json.tmp-999999-{round}"));
        std::fs::write(&stale, b"torn")?;
        agent.restart(round + 1).await?;
        assert!(!stale.exists(), "{} left behind", stale.display());
    }

    let s = agent.wait_synced().await?;
    assert_eq!(s["spooled"], 0, "seed {seed}: {s}");
    let spooled = s["last_seq"].as_u64().context("last_seq")?;
    // Everything confirmed is in the spool, and nothing else but what the
    // kill cut short.
    assert!(
        (confirmed..=confirmed + cut_short).contains(&spooled),
        "seed {seed}: the spool holds {spooled} events; {confirmed} were confirmed, \
         {cut_short} cut short"
    );

    let socket = &files.admin_socket;
    let listed = ferryctl_json(socket, &["sessions", "list", "--all"]).await?;
    let mut seen = BTreeMap::new();
    for rec in listed.as_array().context("sessions list is an array")? {
        let id = rec["session"].as_str().context("session id")?.to_owned();
        let ended = !rec["ended_at"].is_null();
        let t = told
            .get(&id)
            .with_context(|| format!("seed {seed}: {id} was never reported"))?;
        assert_eq!(rec["resource"], resource, "seed {seed}: {rec}");
        match t.end {
            None => assert!(!ended, "seed {seed}: {id} ended without an end: {rec}"),
            Some(true) => assert!(ended, "seed {seed}: {id}'s confirmed end is missing: {rec}"),
            Some(false) => {}
        }
        assert!(
            seen.insert(id.clone(), ()).is_none(),
            "seed {seed}: {id} twice"
        );
    }
    for (id, t) in &told {
        if t.start_confirmed {
            assert!(
                seen.contains_key(id),
                "seed {seed}: confirmed session {id} is missing"
            );
        }
    }
    // Exactly once: the broker recorded as many events as the spool holds.
    let status = ferryctl_json(socket, &["status"]).await?;
    assert_eq!(status["events_recorded"], spooled, "seed {seed}: {status}");
    Ok(())
}
