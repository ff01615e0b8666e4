//! One broker on PostgreSQL, with the real binaries: `ferry-broker run`
//! with `[store] backend = "postgres"` on a database of a throwaway cluster
//! (`ferry_process::pg_cluster`), `ferry-agent run` processes, `ferryctl`
//! and `ferry-connect`.
//!
//! - It serves as on SQLite: a group, agents reporting sessions, the
//!   listings, a usage report, an admission; restarted after SIGTERM and
//!   after SIGKILL, it holds every acknowledged event exactly once (counted
//!   in the database with `psql`).
//! - The database stops (`pg_ctl stop -m immediate`) while agents report:
//!   they spool, `ferryctl` says the database cannot be reached, the broker
//!   keeps running and gives its groups up when their leases run out. Once
//!   the server is back, everything catches up without restarting anything:
//!   every event recorded once, the groups taken back, users admitted.
//!   Stopped while the database is down, the broker still exits cleanly.
//! - A blip shorter than the lease (a failover of a few seconds): the
//!   broker keeps its groups, and the same catch-up follows.
//! - A database that cannot be reached at start, and a `[store]` without a
//!   url: the broker exits with a message naming them.
//!
//! Without PostgreSQL installed these tests skip, except under CI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_agent::backoff::BACKOFF_CAP;
use ferry_agent::local::{LocalClient, StartProof};
use ferry_broker::endpoint::REFUSAL_LINGER;
use ferry_broker::pki;
use ferry_common::wire::EndReason;
use ferry_process::pg_cluster::{self, PgCluster, PgClusterError};
use ferry_tests::bins::bin;
use ferry_tests::harness::PATIENCE;
use ferry_tests::procs::{
    ferryctl_json, fixed_size, publish_payg, run, run_ok, running_processes, wait_notify,
    AgentProcess, BrokerFiles, BrokerProcess, PROCESS_SHUTDOWN_GRACE,
};
use serde_json::Value;
use tokio::sync::watch;

const GROUP: &str = "pg-office";
const AGENTS: [&str; 2] = ["host-1", "host-2"];
/// The shortest lease a broker takes: a lost database costs the groups
/// within seconds.
const LEASE: &str = "3s";
const USER: &str = "alice";
const PASSWORD: &str = "pw-alice";

/// A cluster for this test: the process-wide one, or `None` (skip) when
/// PostgreSQL is not installed and CI is not set.
fn shared_cluster() -> Option<&'static PgCluster> {
    pg_cluster::shared_or_skip()
}

/// A cluster of this test's own (it stops and starts the server), or `None`
/// as [`shared_cluster`].
fn own_cluster() -> anyhow::Result<Option<PgCluster>> {
    match PgCluster::start() {
        Ok(cluster) => Ok(Some(cluster)),
        Err(e @ PgClusterError::NotInstalled { .. }) if !pg_cluster::required() => {
            eprintln!("skipped (PostgreSQL is not installed and CI is not set): {e}");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The `[store]` and `[cluster]` tables of a broker on database `url`
/// with group leases of `lease`.
fn postgres_config(url: &str, lease: &str) -> String {
    format!(
        "\n[store]\nbackend = \"postgres\"\nurl = {url:?}\n\n[cluster]\nbroker_id = \"b1\"\n\
         lease = \"{lease}\"\n"
    )
}

/// `psql -tA -c SQL` on database `db` of `cluster`: the answer's text.
async fn psql(cluster: &PgCluster, db: &str, sql: &str) -> anyhow::Result<String> {
    let port = cluster.port().to_string();
    let args: Vec<&std::ffi::OsStr> = vec![
        "--no-psqlrc".as_ref(),
        "--host".as_ref(),
        cluster.socket_dir().as_os_str(),
        "--port".as_ref(),
        port.as_ref(),
        "--username".as_ref(),
        cluster.user().as_ref(),
        "--dbname".as_ref(),
        db.as_ref(),
        "--tuples-only".as_ref(),
        "--no-align".as_ref(),
        "--command".as_ref(),
        sql.as_ref(),
    ];
    Ok(run_ok(&cluster.bin_dir().join("psql"), args)
        .await?
        .trim()
        .to_owned())
}

/// What the database holds of the sessions: events, sessions, open ones,
/// and sessions recorded more than once (same host and id).
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    events: u64,
    sessions: u64,
    open: u64,
    doubled: u64,
}

async fn counts(cluster: &PgCluster, db: &str) -> anyhow::Result<Counts> {
    let answer = psql(
        cluster,
        db,
        "SELECT (SELECT count(*) FROM session_events), (SELECT count(*) FROM sessions), \
         (SELECT count(*) FROM sessions WHERE ended_at IS NULL), \
         (SELECT count(*) FROM (SELECT resource, session FROM sessions \
           GROUP BY resource, session HAVING count(*) > 1) AS d)",
    )
    .await?;
    let n: Vec<u64> = answer
        .split('|')
        .map(|v| v.parse::<u64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("psql answered {answer:?}"))?;
    let [events, sessions, open, doubled] = n[..] else {
        bail!("psql answered {answer:?}");
    };
    Ok(Counts {
        events,
        sessions,
        open,
        doubled,
    })
}

/// What the agents reported: each session's host and whether it ended,
/// and the events per host.
#[derive(Debug, Default)]
struct Reported {
    sessions: BTreeMap<String, (String, bool)>,
    events: BTreeMap<String, u64>,
}

impl Reported {
    fn add(&mut self, resource: &str, done: Vec<(String, bool)>) {
        for (session, ended) in done {
            *self.events.entry(resource.to_owned()).or_default() += 1 + u64::from(ended);
            self.sessions.insert(session, (resource.to_owned(), ended));
        }
    }

    fn end(&mut self, session: &str) -> anyhow::Result<()> {
        let (resource, ended) = self
            .sessions
            .get_mut(session)
            .with_context(|| format!("{session} was never started"))?;
        anyhow::ensure!(!*ended, "{session} ended twice");
        *ended = true;
        *self.events.entry(resource.clone()).or_default() += 1;
        Ok(())
    }

    fn total_events(&self) -> u64 {
        self.events.values().sum()
    }

    fn expected(&self) -> Counts {
        let open = self.sessions.values().filter(|(_, e)| !e).count() as u64;
        Counts {
            events: self.total_events(),
            sessions: self.sessions.len() as u64,
            open,
            doubled: 0,
        }
    }
}

/// Reports `count` sessions `PREFIX-N` on the agent at `socket`, each
/// started and ended (a host takes two sessions at once: the tests keep
/// their open sessions apart), adding each event the agent confirmed as
/// spooled to `reported`. Returns the sessions and whether each ended.
async fn report(
    socket: PathBuf,
    prefix: String,
    count: u32,
    reported: watch::Sender<u64>,
) -> anyhow::Result<Vec<(String, bool)>> {
    let mut client = LocalClient::connect(&socket).await?;
    let mut out = Vec::new();
    for n in 0..count {
        let session = format!("{prefix}-{n}");
        let user = format!("user{}", n % 3);
        client
            .session_start(session.parse()?, user.parse()?, StartProof::Trusted)
            .await
            .with_context(|| format!("start {session}"))?;
        reported.send_modify(|c| *c += 1);
        client
            .session_end(session.parse()?, EndReason::Logout)
            .await
            .with_context(|| format!("end {session}"))?;
        reported.send_modify(|c| *c += 1);
        out.push((session, true));
    }
    Ok(out)
}

/// The reporters of a round: each host's sessions and whether each ended.
type Reporters = tokio::task::JoinSet<anyhow::Result<(&'static str, Vec<(String, bool)>)>>;

/// Starts a [`report`] of `count` sessions on every agent; the events
/// confirmed so far are counted on the returned receiver.
fn report_on_all(
    agents: &[AgentProcess],
    round: &str,
    count: u32,
) -> (Reporters, watch::Receiver<u64>) {
    let (tx, rx) = watch::channel(0u64);
    let mut set = tokio::task::JoinSet::new();
    for (agent, resource) in agents.iter().zip(AGENTS) {
        let socket = agent.local_socket.clone();
        let prefix = format!("{round}-{resource}");
        let tx = tx.clone();
        set.spawn(async move { Ok((resource, report(socket, prefix, count, tx).await?)) });
    }
    (set, rx)
}

/// Waits for every reporter of [`report_on_all`] and adds what it reported.
async fn join_reports(mut set: Reporters, reported: &mut Reported) -> anyhow::Result<()> {
    while let Some(done) = tokio::time::timeout(PATIENCE, set.join_next())
        .await
        .context("the agents did not take their reports in time")?
    {
        let (resource, sessions) = done??;
        reported.add(resource, sessions);
    }
    Ok(())
}

/// `ferry-agent status --wait-synced` on every agent: connected, nothing
/// spooled, everything reported to it acknowledged.
async fn all_synced(agents: &[AgentProcess], reported: &Reported) -> anyhow::Result<()> {
    for (agent, resource) in agents.iter().zip(AGENTS) {
        let s = agent.wait_synced().await?;
        assert_eq!(s["resource"], resource, "{s}");
        assert_eq!(s["connected"], true, "{s}");
        assert_eq!(s["spooled"], 0, "{s}");
        let events = reported.events.get(resource).copied().unwrap_or(0);
        assert_eq!(s["last_seq"], events, "{s}");
        assert_eq!(s["acked_seq"], events, "{s}");
    }
    Ok(())
}

/// The broker holds exactly what was reported: in the database (counted
/// with psql), in `ferryctl sessions list --all` and `ferryctl status`.
async fn broker_holds(
    cluster: &PgCluster,
    db: &str,
    files: &BrokerFiles,
    reported: &Reported,
) -> anyhow::Result<()> {
    assert_eq!(counts(cluster, db).await?, reported.expected());
    let listed = ferryctl_json(&files.admin_socket, &["sessions", "list", "--all"]).await?;
    let mut recorded = BTreeMap::new();
    for s in listed.as_array().context("sessions list is an array")? {
        let id = s["session"].as_str().context("session id")?.to_owned();
        let host = s["resource"].as_str().context("resource")?.to_owned();
        let ended = !s["ended_at"].is_null();
        if ended {
            assert_eq!(s["end_reason"], "logout", "{s}");
        }
        assert_eq!(s["group"], GROUP, "{s}");
        assert!(
            recorded.insert(id.clone(), (host, ended)).is_none(),
            "{id} twice"
        );
    }
    assert_eq!(recorded, reported.sessions);
    let status = ferryctl_json(&files.admin_socket, &["status"]).await?;
    assert_eq!(
        status["events_recorded"],
        reported.total_events(),
        "{status}"
    );
    assert_eq!(
        status["open_sessions"],
        reported.expected().open,
        "{status}"
    );
    Ok(())
}

/// A user with a password and a pay-as-you-go group with a host per agent
/// that admits them.
async fn publish(files: &BrokerFiles) -> anyhow::Result<()> {
    let pw = files.dir.join("alice.pw");
    std::fs::write(&pw, format!("{PASSWORD}\n"))?;
    let pw = pw.to_str().context("password file path")?.to_owned();
    let email = format!("{USER}@example.com");
    ferryctl_json(
        &files.admin_socket,
        &[
            "user",
            "create",
            "--id",
            USER,
            "--email",
            &email,
            "--mobile",
            "+8613800000000",
            "--password-file",
            &pw,
        ],
    )
    .await?;
    let base = AGENTS.len().to_string();
    publish_payg(
        &files.admin_socket,
        GROUP,
        &[fixed_size(&base, "2"), vec!["--user", USER]].concat(),
    )
    .await?;
    Ok(())
}

/// `ferry-connect` as the user: admitted to one of the group's hosts
/// (retried while the broker has no owner for the group yet, bounded).
async fn user_admitted(files: &BrokerFiles, broker: &BrokerProcess) -> anyhow::Result<Value> {
    let pw = files.dir.join("alice.pw");
    let ca = files.pki_dir.join(pki::CA_CERT);
    let addr = broker.agent_addr.to_string();
    let args: Vec<std::ffi::OsString> = vec![
        "--broker".into(),
        addr.into(),
        "--server-name".into(),
        "localhost".into(),
        "--ca".into(),
        ca.into(),
        "--group".into(),
        GROUP.into(),
        "--user".into(),
        USER.into(),
        "--password-file".into(),
        pw.into(),
        "--json".into(),
    ];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let out = run(&bin("ferry-connect"), &args).await?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if out.status.code() == Some(0) && v["admitted"] == true {
            let resource = v["resource"].as_str().unwrap_or_default();
            assert!(AGENTS.contains(&resource), "{v}");
            assert!(
                v["ticket"].as_str().is_some_and(|t| t.starts_with("v1.")),
                "{v}"
            );
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("ferry-connect was never admitted: {out:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) until the broker's log has `needle` `times` times.
async fn wait_log(broker: &BrokerProcess, needle: &str, times: usize) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while broker.daemon.log().matches(needle).count() < times {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the broker did not log {needle:?} {times} time(s):\n{}",
                broker.daemon.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Starts the agents of [`AGENTS`] in the group.
async fn start_agents(
    files: &BrokerFiles,
    broker: &BrokerProcess,
) -> anyhow::Result<Vec<AgentProcess>> {
    let mut agents = Vec::new();
    for resource in AGENTS {
        agents.push(
            AgentProcess::start_in_group(files, resource, broker.agent_addr, Some(GROUP)).await?,
        );
    }
    Ok(agents)
}

/// The broker's config written with a PostgreSQL store on a new database.
async fn broker_files(
    dir: &Path,
    cluster: &PgCluster,
    db: &str,
    lease: &str,
) -> anyhow::Result<BrokerFiles> {
    let url = cluster.create_database(db)?;
    let mut files = BrokerFiles::init(dir).await?;
    files.extra_config = postgres_config(&url, lease);
    Ok(files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_on_postgres_serves_and_keeps_every_event_once_across_restarts(
) -> anyhow::Result<()> {
    let Some(cluster) = shared_cluster() else {
        return Ok(());
    };
    let db = "serve_and_restart";
    let tmp = tempfile::tempdir()?;
    let files = broker_files(tmp.path(), cluster, db, LEASE).await?;
    let mut broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    // Later runs bind the same port: the agents' configured address.
    let addr = broker.agent_addr;
    assert!(
        !files.state_dir.join("ferry.db").exists(),
        "no SQLite store beside PostgreSQL"
    );
    publish(&files).await?;
    let agents = start_agents(&files, &broker).await?;
    let mut reported = Reported::default();
    // A session open from the start to the end, on the first host.
    agents[0].start_session("open-1", USER).await?;
    reported.add(AGENTS[0], vec![("open-1".into(), false)]);

    let (set, _) = report_on_all(&agents, "r0", 6);
    join_reports(set, &mut reported).await?;
    all_synced(&agents, &reported).await?;
    broker_holds(cluster, db, &files, &reported).await?;
    let resources = ferryctl_json(&files.admin_socket, &["resources", "list"]).await?;
    let resources = resources.as_array().context("resources list is an array")?;
    assert_eq!(resources.len(), AGENTS.len(), "{resources:?}");
    for r in resources {
        assert_eq!(r["connected"], true, "{r}");
        let open = u64::from(r["resource"] == AGENTS[0]);
        assert_eq!(r["sessions"], open, "{r}");
    }

    // SIGTERM: a clean stop (the leases handed over), then the same again.
    broker.daemon.signal("TERM").await?;
    wait_notify(&broker.notify, "STOPPING=1", PATIENCE)?;
    let code = broker
        .daemon
        .wait(PROCESS_SHUTDOWN_GRACE + REFUSAL_LINGER + PATIENCE)
        .await?;
    assert_eq!(code.code(), Some(0), "{}", broker.daemon.log());
    broker = BrokerProcess::start(&files, addr, 1).await?;
    let (set, _) = report_on_all(&agents, "r1", 6);
    join_reports(set, &mut reported).await?;
    all_synced(&agents, &reported).await?;
    broker_holds(cluster, db, &files, &reported).await?;

    // SIGKILL while the agents report: what was acknowledged is there once,
    // what was not is sent again.
    let (set, mut confirmed) = report_on_all(&agents, "r2", 12);
    tokio::time::timeout(PATIENCE, confirmed.wait_for(|c| *c >= 10))
        .await
        .context("the agents stopped reporting before the kill")??;
    let status = broker.daemon.crash().await?;
    assert_eq!(status.code(), None, "killed by a signal");
    broker = BrokerProcess::start(&files, addr, 2).await?;
    join_reports(set, &mut reported).await?;
    all_synced(&agents, &reported).await?;
    broker_holds(cluster, db, &files, &reported).await?;

    // The usage report counts each session of a host once, from the time
    // the host serves the group: a round reported now, with both hosts
    // connected, is all of the period.
    let secs = chrono::SecondsFormat::Millis;
    let from = chrono::Utc::now().to_rfc3339_opts(secs, true);
    let before = reported.sessions.len();
    let (set, _) = report_on_all(&agents, "u", 3);
    join_reports(set, &mut reported).await?;
    all_synced(&agents, &reported).await?;
    broker_holds(cluster, db, &files, &reported).await?;
    assert_eq!(reported.sessions.len(), before + 3 * AGENTS.len());
    let to = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339_opts(secs, true);
    let usage = ferryctl_json(
        &files.admin_socket,
        &[
            "usage", "--group", GROUP, "--from", &from, "--to", &to, "--format", "json",
        ],
    )
    .await?;
    let groups = usage["groups"].as_array().context("groups")?;
    assert_eq!(groups.len(), 1, "{usage:#}");
    let mut got = BTreeMap::new();
    for r in groups[0]["resources"].as_array().context("resources")? {
        let host = r["resource"].as_str().context("resource")?.to_owned();
        assert_eq!(r["kind"], "base", "{r}");
        got.insert(host, r["sessions"].as_u64().context("sessions")?);
    }
    let want: BTreeMap<String, u64> = AGENTS.iter().map(|h| (h.to_string(), 3)).collect();
    assert_eq!(got, want, "{usage:#}");

    // And users are routed.
    user_admitted(&files, &broker).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_spooled_by_the_agents_and_caught_up_once_it_is_back(
) -> anyhow::Result<()> {
    let Some(cluster) = own_cluster()? else {
        return Ok(());
    };
    let db = "outage";
    let tmp = tempfile::tempdir()?;
    let files = broker_files(tmp.path(), &cluster, db, LEASE).await?;
    let mut broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    publish(&files).await?;
    let agents = start_agents(&files, &broker).await?;
    let taken = "group lease taken: its actor starts";
    wait_log(&broker, taken, 1).await?;
    let mut reported = Reported::default();

    // Sessions open across the outage: the first host's ends during it,
    // the second host's is still open at the end.
    for (agent, (resource, session)) in agents
        .iter()
        .zip(AGENTS.into_iter().zip(["long", "longer"]))
    {
        agent.start_session(session, USER).await?;
        reported.add(resource, vec![(session.to_owned(), false)]);
    }
    all_synced(&agents, &reported).await?;
    user_admitted(&files, &broker).await?;

    // The server stops under a stream of reports.
    let (set, mut confirmed) = report_on_all(&agents, "o", 30);
    tokio::time::timeout(PATIENCE, confirmed.wait_for(|c| *c >= 8))
        .await
        .context("the agents stopped reporting before the outage")??;
    tokio::task::block_in_place(|| cluster.stop_immediate())?;
    let t0 = tokio::time::Instant::now();
    // The agents take every report (their spools), and the open sessions
    // go on: the long ones end now.
    join_reports(set, &mut reported).await?;
    agents[0]
        .cli(&["session", "end", "--session", "long", "--reason", "logout"])
        .await?;
    reported.end("long")?;
    let database = format!("{db} on {}", cluster.socket_dir().display());
    let unreachable = format!("the PostgreSQL database {database} cannot be reached");
    for (agent, resource) in agents.iter().zip(AGENTS) {
        // The broker refuses the agent's events (or the agent itself) with
        // the reason, which `status` shows.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let s = loop {
            let s: Value = serde_json::from_str(&agent.cli(&["status", "--json"]).await?)?;
            if s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(&unreachable))
            {
                break s;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{resource} was never told that the database is down: {s}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let events = reported.events[resource];
        assert_eq!(s["last_seq"], events, "{s}");
        let acked = s["acked_seq"].as_u64().context("acked_seq")?;
        assert!(acked < events, "acknowledged with the database down: {s}");
        assert_eq!(s["spooled"], events - acked, "{s}");
    }

    // ferryctl says what is wrong, for reads and for a write.
    let socket = files.admin_socket.to_str().context("socket path")?;
    let bob = [
        "user",
        "create",
        "--id",
        "bob",
        "--email",
        "b@example.com",
        "--mobile",
        "+8613800000001",
    ];
    for (args, write) in [
        (&["sessions", "list", "--all"][..], false),
        (&["resources", "list"][..], false),
        (&bob[..], true),
    ] {
        let mut all = vec!["--socket", socket];
        all.extend(args.iter().copied());
        let out = run(&bin("ferryctl"), &all).await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "ferryctl {args:?}: {out:?}");
        assert!(stderr.contains(&unreachable), "ferryctl {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        if write {
            assert!(
                stderr.contains("nothing of this write was recorded"),
                "{stderr}"
            );
        }
    }

    // The leases run out: the broker stops acting for the group, and keeps
    // running.
    wait_log(&broker, "group leases could not be renewed in time", 1).await?;
    wait_log(
        &broker,
        "group lease lost or handed over: its actor stops",
        1,
    )
    .await?;
    let pid = broker.daemon.pid()?;
    assert!(
        running_processes().iter().any(|(p, _)| *p == pid),
        "the broker exited during the outage:\n{}",
        broker.daemon.log()
    );
    eprintln!("database down for {:?}", t0.elapsed());

    // The server is back: nothing restarted but PostgreSQL.
    tokio::task::block_in_place(|| cluster.restart())?;
    wait_log(&broker, taken, 2).await?;
    wait_log(&broker, "store connection restored", 1).await?;
    eprintln!("database back, group taken back at {:?}", t0.elapsed());
    all_caught_up(&agents).await?;
    eprintln!("agents synced at {:?}", t0.elapsed());
    let (set, _) = report_on_all(&agents, "after", 6);
    join_reports(set, &mut reported).await?;
    all_synced(&agents, &reported).await?;
    broker_holds(&cluster, db, &files, &reported).await?;
    let listed = ferryctl_json(&files.admin_socket, &["sessions", "list"]).await?;
    let open: Vec<&Value> = listed
        .as_array()
        .context("sessions list is an array")?
        .iter()
        .map(|s| &s["session"])
        .collect();
    assert_eq!(open, ["longer"], "{listed}");
    // The refused write goes through now, and users are routed again.
    ferryctl_json(&files.admin_socket, &bob).await?;
    user_admitted(&files, &broker).await?;
    let pid_after = broker.daemon.pid()?;
    assert_eq!(pid, pid_after);
    assert!(
        !broker.daemon.log().contains("panicked"),
        "{}",
        broker.daemon.log()
    );

    // Stopped while the database is down again, the broker still drains
    // and exits cleanly: nothing waits for the database.
    tokio::task::block_in_place(|| cluster.stop_immediate())?;
    eprintln!("database down again at {:?}", t0.elapsed());
    broker.daemon.signal("TERM").await?;
    wait_notify(&broker.notify, "STOPPING=1", PATIENCE)?;
    let code = broker
        .daemon
        .wait(PROCESS_SHUTDOWN_GRACE + REFUSAL_LINGER + PATIENCE)
        .await?;
    assert_eq!(code.code(), Some(0), "{}", broker.daemon.log());
    eprintln!("broker stopped at {:?}", t0.elapsed());
    Ok(())
}

/// Waits until every agent sent everything it spooled: after a database
/// outage, each was refused a few times in a row, so its next try may be up
/// to its longest backoff away.
async fn all_caught_up(agents: &[AgentProcess]) -> anyhow::Result<()> {
    for agent in agents {
        let mut client = LocalClient::connect(&agent.local_socket).await?;
        let s = client.wait_synced(BACKOFF_CAP + PATIENCE).await?;
        assert_eq!(s.link.spooled, 0, "{:?}", s.link);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_blip_within_the_lease_keeps_the_groups_and_records_everything_once(
) -> anyhow::Result<()> {
    let Some(cluster) = own_cluster()? else {
        return Ok(());
    };
    let db = "blip";
    let tmp = tempfile::tempdir()?;
    // A lease the server's stop and crash recovery fit in, as a failover of
    // a few seconds does.
    let files = broker_files(tmp.path(), &cluster, db, "30s").await?;
    let broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    publish(&files).await?;
    let agents = start_agents(&files, &broker).await?;
    let taken = "group lease taken: its actor starts";
    wait_log(&broker, taken, 1).await?;
    user_admitted(&files, &broker).await?;

    let mut reported = Reported::default();
    let (set, mut confirmed) = report_on_all(&agents, "b", 20);
    tokio::time::timeout(PATIENCE, confirmed.wait_for(|c| *c >= 6))
        .await
        .context("the agents stopped reporting before the blip")??;
    let t0 = tokio::time::Instant::now();
    tokio::task::block_in_place(|| {
        cluster.stop_immediate()?;
        cluster.restart()
    })?;
    eprintln!("database back after {:?}", t0.elapsed());
    join_reports(set, &mut reported).await?;
    all_caught_up(&agents).await?;
    eprintln!("agents synced after {:?}", t0.elapsed());
    all_synced(&agents, &reported).await?;
    broker_holds(&cluster, db, &files, &reported).await?;
    // The group stayed with its broker all along; users are routed.
    let log = broker.daemon.log();
    assert!(
        !log.contains("group leases could not be renewed in time"),
        "{log}"
    );
    assert_eq!(log.matches(taken).count(), 1, "{log}");
    user_admitted(&files, &broker).await?;
    assert!(!broker.daemon.log().contains("panicked"));
    Ok(())
}

/// `ferry-broker run --config CONFIG` on `files` with `extra` as its
/// `[store]`, which must exit by itself: its exit code and stderr.
async fn broker_exits(files: &mut BrokerFiles, extra: String) -> anyhow::Result<(i32, String)> {
    files.extra_config = extra;
    let config = files.write_config("127.0.0.1:0".parse()?)?;
    let out = run(
        &bin("ferry-broker"),
        ["run".as_ref(), "--config".as_ref(), config.as_os_str()],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().context("exited, not killed")?;
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!files.admin_socket.exists(), "{stderr}");
    Ok((code, stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_database_cannot_be_reached_or_is_not_named_exits_saying_so(
) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut files = BrokerFiles::init(tmp.path()).await?;
    // No server listens in this directory.
    let nowhere = tmp.path().join("no-server");
    std::fs::create_dir_all(&nowhere)?;
    let url = format!(
        "host={} port=5432 user=ferry dbname=ferrydb",
        nowhere.display()
    );
    let (code, stderr) = broker_exits(&mut files, postgres_config(&url, LEASE)).await?;
    assert_eq!(code, i32::from(ferry_process::exit::TEMPFAIL), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the PostgreSQL database ferrydb on {} cannot be reached",
            nowhere.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("[store] url"), "{stderr}");

    // backend = "postgres" without a url: a configuration error naming it.
    let (code, stderr) =
        broker_exits(&mut files, "\n[store]\nbackend = \"postgres\"\n".into()).await?;
    assert_eq!(code, i32::from(ferry_process::exit::CONFIG), "{stderr}");
    assert!(stderr.contains("store.url"), "{stderr}");
    Ok(())
}
