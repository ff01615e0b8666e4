//! Metering survives crashes, with the real binaries: three agents of a
//! published pay-as-you-go group report a seeded stream of session starts
//! and ends through their CLI while the broker is SIGKILLed at seeded random
//! moments and restarted on the same state directory and port. Afterwards
//! `ferryctl usage` equals what the agents know they reported: per resource
//! the session count, and the session time as the sum over the sessions the
//! agents stamped, exact to the second the report bills.
//!
//! The seed is printed; `FERRY_CRASH_USAGE_SEED=N` replays a run, and
//! `FERRY_CRASH_ROUNDS=N` makes N kills instead of a few.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context};
use chrono::{DateTime, SecondsFormat};
use ferry_tests::harness::{crash_rounds, seeded_rng, PATIENCE};
use ferry_tests::procs::{
    ferryctl_json, fixed_size, publish_payg, AgentProcess, BrokerFiles, BrokerProcess,
};
use rand::rngs::StdRng;
use rand::Rng;
use rust_decimal::{Decimal, RoundingStrategy};
use tokio::sync::watch;

/// Kill-and-restart rounds in the suite; bounded so the test stays fast.
const ROUNDS: u32 = 3;
/// Session events each agent reports per round (after its probe).
const EVENTS_PER_ROUND: usize = 16;
/// Sessions one agent keeps open at most, so ends are frequent too.
const MAX_OPEN: usize = 3;
const AGENTS: [&str; 3] = ["host-1", "host-2", "host-3"];
const GROUP: &str = "metered";

/// One event an agent reports.
#[derive(Clone, Debug)]
enum Op {
    Start(String),
    End(String),
}

/// What the agents reported about one session.
#[derive(Debug, PartialEq, Eq)]
struct Reported {
    resource: String,
    ended: bool,
}

/// The seeded events of one agent in one round. `open` carries the agent's
/// open sessions across rounds, so a session may start before a kill and
/// end after the restart.
fn plan(rng: &mut StdRng, resource: &str, round: u32, open: &mut Vec<String>) -> Vec<Op> {
    let mut ops = Vec::with_capacity(EVENTS_PER_ROUND);
    for n in 0..EVENTS_PER_ROUND {
        let start = open.is_empty() || (open.len() < MAX_OPEN && rng.random_bool(0.6));
        if start {
            let session = format!("r{round}-{resource}-{n}");
            open.push(session.clone());
            ops.push(Op::Start(session));
        } else {
            let i = rng.random_range(0..open.len());
            ops.push(Op::End(open.swap_remove(i)));
        }
    }
    ops
}

/// Reports `ops` through the agent's CLI, which returns once the event is
/// durably spooled; counts each one so the test can kill at a seeded moment.
async fn report(
    agent: &AgentProcess,
    ops: Vec<Op>,
    count: watch::Sender<u64>,
) -> anyhow::Result<()> {
    for op in ops {
        match &op {
            Op::Start(s) => agent
                .start_session(s, "alice")
                .await
                .with_context(|| format!("start {s}"))?,
            Op::End(s) => agent
                .cli(&["session", "end", "--session", s, "--reason", "logout"])
                .await
                .with_context(|| format!("end {s}"))?,
        };
        count.send_modify(|c| *c += 1);
    }
    Ok(())
}

fn rfc3339(ms: i64) -> anyhow::Result<String> {
    Ok(DateTime::from_timestamp_millis(ms)
        .context("time out of range")?
        .to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn millis(v: &serde_json::Value) -> anyhow::Result<i64> {
    let s = v.as_str().with_context(|| format!("{v} is not a time"))?;
    Ok(DateTime::parse_from_rfc3339(s)
        .with_context(|| format!("time {s:?}"))?
        .timestamp_millis())
}

/// Hours as the report prints them: exact seconds / 3600, half away from
/// zero to two places.
fn hours(seconds: u64) -> String {
    let mut h = (Decimal::from(seconds) / Decimal::from(3600))
        .round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
    h.rescale(2);
    h.to_string()
}

fn now_millis() -> anyhow::Result<i64> {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    Ok(i64::try_from(d.as_millis())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sigkill_under_agent_events_leaves_the_usage_report_equal_to_what_agents_reported(
) -> anyhow::Result<()> {
    let (seed, mut rng) = seeded_rng("FERRY_CRASH_USAGE_SEED", "crash usage")?;
    let rounds = crash_rounds(ROUNDS)?;
    let t0 = std::time::Instant::now();

    // The period starts before anything is recorded, on a whole second.
    let from = now_millis()? / 1000 * 1000 - 1000;
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let mut broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    let addr = broker.agent_addr;
    let socket = files.admin_socket.clone();
    let base = AGENTS.len().to_string();
    publish_payg(
        &socket,
        GROUP,
        // The stream overloads the group on purpose; no host would ever
        // serve an elastic resource here, so none is asked for.
        &fixed_size(&base, "2"),
    )
    .await?;

    let mut agents = Vec::new();
    for resource in AGENTS {
        agents.push(AgentProcess::start_in_group(&files, resource, addr, Some(GROUP)).await?);
    }
    let agents = Arc::new(agents);

    let mut reported: BTreeMap<String, Reported> = BTreeMap::new();
    let mut open: Vec<Vec<String>> = vec![Vec::new(); AGENTS.len()];
    let mut events = 0u64;
    for round in 0..rounds {
        // A probe per agent acknowledged by the current broker: the kill then
        // lands on live connections, as in `crash.rs`.
        for (agent, resource) in agents.iter().zip(AGENTS) {
            let session = format!("r{round}-{resource}-probe");
            agent.start_session(&session, "probe").await?;
            agent.wait_synced().await?;
            reported.insert(
                session,
                Reported {
                    resource: resource.to_owned(),
                    ended: false,
                },
            );
            events += 1;
        }
        let mut reporters = tokio::task::JoinSet::new();
        let (count_tx, mut count_rx) = watch::channel(0u64);
        let mut round_events = 0u64;
        for (i, resource) in AGENTS.into_iter().enumerate() {
            let ops = plan(&mut rng, resource, round, &mut open[i]);
            for op in &ops {
                match op {
                    Op::Start(s) => {
                        reported.insert(
                            s.clone(),
                            Reported {
                                resource: resource.to_owned(),
                                ended: false,
                            },
                        );
                    }
                    Op::End(s) => {
                        reported
                            .get_mut(s)
                            .context("end of an unknown session")?
                            .ended = true;
                    }
                }
            }
            round_events += ops.len() as u64;
            let agents = agents.clone();
            let count = count_tx.clone();
            reporters.spawn(async move { report(&agents[i], ops, count).await });
        }
        drop(count_tx);
        let kill_after = rng.random_range(1..=round_events);
        eprintln!("round {round}: SIGKILL after {kill_after} of {round_events} events");
        match tokio::time::timeout(PATIENCE, count_rx.wait_for(|c| *c >= kill_after)).await {
            Ok(Ok(_)) => {}
            _ => bail!("round {round}: the agents stopped reporting before the kill"),
        }
        let status = broker.daemon.crash().await?;
        assert_eq!(status.code(), None, "killed by a signal, not exited");
        eprintln!("round {round}: killed at {:?}", t0.elapsed());
        broker = BrokerProcess::start(&files, addr, round + 1).await?;
        assert_eq!(broker.agent_addr, addr);
        while let Some(done) = reporters.join_next().await {
            done??;
        }
        events += round_events;
    }

    for (agent, resource) in agents.iter().zip(AGENTS) {
        let s = agent.wait_synced().await?;
        assert_eq!(s["resource"], resource, "{s}");
        assert_eq!(s["spooled"], 0, "{s}");
        assert_eq!(s["acked_seq"], s["last_seq"], "{s}");
    }
    eprintln!("all synced at {:?}", t0.elapsed());

    // The agent-stamped times of every session, as the broker holds them;
    // the set must be exactly what the agents reported.
    let listed = ferryctl_json(&socket, &["sessions", "list", "--all"]).await?;
    let mut spans: BTreeMap<String, (String, i64, Option<i64>)> = BTreeMap::new();
    for s in listed.as_array().context("sessions list is an array")? {
        let id = s["session"].as_str().context("session id")?.to_owned();
        let resource = s["resource"].as_str().context("resource")?.to_owned();
        let started = millis(&s["started_at"])?;
        let ended = match &s["ended_at"] {
            serde_json::Value::Null => None,
            t => Some(millis(t)?),
        };
        assert!(
            spans
                .insert(id.clone(), (resource, started, ended))
                .is_none(),
            "seed {seed}: {id} listed twice"
        );
    }
    let recorded: BTreeMap<String, Reported> = spans
        .iter()
        .map(|(id, (resource, _, ended))| {
            (
                id.clone(),
                Reported {
                    resource: resource.clone(),
                    ended: ended.is_some(),
                },
            )
        })
        .collect();
    assert_eq!(recorded, reported, "seed {seed}");

    // The period ends after everything, on the next whole second; open
    // sessions run to its end. A report bills only time that has passed, so
    // the test waits for the wall clock to pass that second.
    let to = (now_millis()? / 1000 + 1) * 1000;
    let wait = u64::try_from(to - now_millis()?).unwrap_or(0);
    tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
    assert!(now_millis()? >= to);
    let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (resource, started, ended) in spans.values() {
        assert!(*started >= from, "seed {seed}: a session before the period");
        let ms = ended.unwrap_or(to) - started;
        assert!(ms >= 0, "seed {seed}: a session ends before it starts");
        let entry = want.entry(resource.clone()).or_default();
        entry.0 += 1;
        // Per-second billing: a started second counts whole.
        entry.1 += u64::try_from(ms)?.div_ceil(1000);
    }

    let (from_s, to_s) = (rfc3339(from)?, rfc3339(to)?);
    let usage = ferryctl_json(
        &socket,
        &[
            "usage", "--group", GROUP, "--from", &from_s, "--to", &to_s, "--format", "json",
        ],
    )
    .await?;
    let groups = usage["groups"].as_array().context("groups")?;
    assert_eq!(groups.len(), 1, "{usage:#}");
    let g = &groups[0];
    let mut got: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut resource_seconds = 0u64;
    for r in g["resources"].as_array().context("resources")? {
        let resource = r["resource"].as_str().context("resource")?.to_owned();
        assert_eq!(r["kind"], "base", "{r}");
        let sessions = r["sessions"].as_u64().context("sessions")?;
        let seconds = r["session_seconds"].as_u64().context("session_seconds")?;
        assert_eq!(r["session_hours"], hours(seconds), "{r}");
        resource_seconds += r["resource_seconds"].as_u64().context("resource_seconds")?;
        assert!(
            got.insert(resource.clone(), (sessions, seconds)).is_none(),
            "{resource} twice"
        );
    }
    assert_eq!(
        got, want,
        "seed {seed}: (sessions, session seconds) per resource"
    );
    assert_eq!(g["base_seconds"], resource_seconds, "{g}");
    assert_eq!(g["elastic_seconds"], 0, "{g}");
    assert_eq!(g["subscription"], "0.00", "{g}");
    assert_eq!(g["total"], g["base_payg"], "{g}");
    // Every base resource was ready, and its time is priced per second at
    // the spec's hourly price, rounded half up to the cent.
    assert_eq!(got.len(), AGENTS.len(), "{g}");
    assert!(resource_seconds > 0, "{g}");
    let hourly = ferry_broker::config::GroupsConfig::default().prices["office-4c8g"].hourly;
    let amount = (hourly * Decimal::from(resource_seconds) / Decimal::from(3600))
        .round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
    assert_eq!(
        g["base_payg"]
            .as_str()
            .context("base_payg")?
            .parse::<Decimal>()?,
        amount,
        "{g}"
    );

    let status = ferryctl_json(&socket, &["status"]).await?;
    assert_eq!(status["events_recorded"], events, "seed {seed}: {status}");
    let open_now = reported.values().filter(|r| !r.ended).count();
    assert_eq!(status["open_sessions"], open_now, "seed {seed}: {status}");
    eprintln!("done at {:?}", t0.elapsed());
    Ok(())
}
