//! Several `ferry-broker` processes on one PostgreSQL database, with the
//! real binaries: every group has one owner, agents and users reach it from
//! any broker, and a broker that dies, pauses or stops hands its groups to
//! the others without losing or doubling an event or admitting past a
//! group's limit.
//!
//! The leases are read from the database (`group_leases`) with `psql`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_process::pg_cluster::PgCluster;
use ferry_tests::bins::bin;
use ferry_tests::cluster::{
    connected_here, database, leases, psql, wait_connected, wait_leases, Cluster, Lease,
};
use ferry_tests::harness::PATIENCE;
use ferry_tests::procs::{ferryctl_json, fixed_size, publish_payg, run, run_ok, AgentProcess};

/// The lease of the brokers in these tests (the shortest allowed).
const LEASE: Duration = Duration::from_secs(3);
const LEASE_TOML: &str = "3s";

/// Polls the leases for `span`, failing as soon as `steady` does not hold
/// of them.
async fn hold_leases(
    pg: &PgCluster,
    url: &str,
    what: &str,
    span: Duration,
    steady: impl Fn(&BTreeMap<String, Lease>) -> bool,
) -> anyhow::Result<()> {
    let until = Instant::now() + span;
    while Instant::now() < until {
        let now = leases(pg, url).await?;
        if !steady(&now) {
            bail!("{what}: no longer so; leases {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Whether every group in `groups` has an owner.
fn all_owned(leases: &BTreeMap<String, Lease>, groups: &[String]) -> bool {
    groups
        .iter()
        .all(|g| leases.get(g).is_some_and(|l| l.owner.is_some()))
}

/// A user `id` with password `pw`, created through the broker at `socket`.
async fn create_user(socket: &Path, dir: &Path, id: &str) -> anyhow::Result<PathBuf> {
    let pw = dir.join(format!("{id}.pw"));
    std::fs::write(&pw, format!("password-of-{id}\n"))?;
    let mut args: Vec<std::ffi::OsString> = vec!["--socket".into(), socket.into()];
    for a in ["user", "create", "--id", id, "--email"] {
        args.push(a.into());
    }
    args.push(format!("{id}@example.com").into());
    args.extend(["--mobile".into(), "+8613800000000".into()]);
    args.extend(["--password-file".into(), pw.clone().into()]);
    run_ok(&bin("ferryctl"), args).await?;
    Ok(pw)
}

/// `ferry-connect --json` of `user` into `group` through the broker at
/// `broker`: (exit code, answer).
async fn connect(
    broker: &str,
    ca: &Path,
    group: &str,
    user: &str,
    pw: &Path,
) -> anyhow::Result<(Option<i32>, serde_json::Value)> {
    let args: Vec<std::ffi::OsString> = vec![
        "--broker".into(),
        broker.into(),
        "--server-name".into(),
        "localhost".into(),
        "--ca".into(),
        ca.into(),
        "--group".into(),
        group.into(),
        "--user".into(),
        user.into(),
        "--password-file".into(),
        pw.into(),
        "--json".into(),
    ];
    let out = run(&bin("ferry-connect"), args).await?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ferry-connect printed {out:?}"))?;
    Ok((out.status.code(), v))
}

/// Starts the agent of `resource` in `group` (assigned through `b0`),
/// configured with broker `b0` and the others as `brokers`.
async fn agent(cluster: &Cluster, resource: &str, group: &str) -> anyhow::Result<AgentProcess> {
    let b0 = cluster.member("b0")?;
    let agent = AgentProcess::start_configured(
        &b0.files,
        resource,
        b0.addr,
        Some(group),
        &cluster.others_line("b0"),
    )
    .await?;
    Ok(agent)
}

/// Six groups on three brokers: each has one owner, they spread, agents
/// configured with one broker end up at their group's owner and are
/// acknowledged, a user asking another broker is sent to the owner and
/// admitted, an operator's change made through another broker reaches the
/// owner, and every broker lists every group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_spread_over_three_brokers_and_agents_and_users_reach_the_owner(
) -> anyhow::Result<()> {
    let Some((pg, url)) = database("cluster_spread")? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let cluster = Cluster::start(tmp.path(), &url, 3, LEASE_TOML).await?;
    let b0 = cluster.member("b0")?;
    let groups: Vec<String> = (1..=6).map(|n| format!("g{n}")).collect();
    let pw = create_user(&b0.files.admin_socket, tmp.path(), "alice").await?;
    let pw_bob = create_user(&b0.files.admin_socket, tmp.path(), "bob").await?;
    for g in &groups {
        // Room for one user.
        let mut p = fixed_size("1", "1");
        p.extend(["--user", "alice", "--user", "bob"]);
        publish_payg(&b0.files.admin_socket, g, &p).await?;
    }
    let owned = wait_leases(pg, &url, "every group owned", |l| all_owned(l, &groups)).await?;
    let owners: BTreeSet<&str> = owned.values().filter_map(|l| l.owner.as_deref()).collect();
    assert!(owners.len() > 1, "the groups spread: {owned:?}");

    let mut agents = Vec::new();
    for g in &groups {
        let resource = format!("host-{g}");
        let a = agent(&cluster, &resource, g).await?;
        let probe = format!("probe-{g}");
        a.start_session(&probe, "probe").await?;
        a.cli(&["session", "end", "--session", &probe, "--reason", "logout"])
            .await?;
        let s = a.wait_synced().await?;
        assert_eq!(s["acked_seq"], s["last_seq"], "{s}");
        agents.push(a);
    }
    // Every event is recorded once, whichever broker is asked.
    for m in &cluster.brokers {
        let status = ferryctl_json(&m.files.admin_socket, &["status"]).await?;
        assert_eq!(
            status["events_recorded"],
            2 * groups.len(),
            "{}: {status}",
            m.id
        );
        assert_eq!(status["open_sessions"], 0, "{}: {status}", m.id);
    }
    // Each agent is connected to its group's owner, and to no other broker.
    let owned = leases(pg, &url).await?;
    for g in &groups {
        let owner = owned[g].owner.clone().context("owned")?;
        let resource = format!("host-{g}");
        wait_connected(&cluster.member(&owner)?.files.admin_socket, &resource).await?;
        for m in &cluster.brokers {
            if m.id != owner {
                let here = connected_here(&m.files.admin_socket).await?;
                assert!(!here.contains(&resource), "{resource} on {} too", m.id);
            }
        }
    }
    // A user asking a broker that does not own the group is sent on and
    // admitted there.
    let g = &groups[0];
    let owner = owned[g].owner.clone().context("owned")?;
    let other = cluster
        .brokers
        .iter()
        .find(|m| m.id != owner)
        .context("another broker")?;
    let ca = b0.files.pki_dir.join(ferry_broker::pki::CA_CERT);
    let (code, v) = connect(&other.addr.to_string(), &ca, g, "alice", &pw).await?;
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["admitted"], true, "{v}");
    assert_eq!(v["resource"], format!("host-{g}"), "{v}");
    // The group is full; the operator gives each resource a second session
    // through a broker that does not own the group, and its owner follows
    // (within a lease turn).
    let (code, v) = connect(&other.addr.to_string(), &ca, g, "bob", &pw_bob).await?;
    at_capacity(code, &v);
    ferryctl_json(
        &other.files.admin_socket,
        &["group", "update-policy", g, "--concurrent-sessions", "2"],
    )
    .await?;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (code, v) = connect(&other.addr.to_string(), &ca, g, "bob", &pw_bob).await?;
        if code == Some(0) {
            assert_eq!(v["admitted"], true, "{v}");
            break;
        }
        at_capacity(code, &v);
        if Instant::now() > deadline {
            bail!("the owner of {g} never followed the new policy: {v}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every broker lists every group.
    for m in &cluster.brokers {
        let v = ferryctl_json(&m.files.admin_socket, &["group", "list"]).await?;
        let listed: BTreeSet<String> = v
            .as_array()
            .with_context(|| format!("group list: {v}"))?
            .iter()
            .filter_map(|g| g["name"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(
            listed,
            groups.iter().cloned().collect(),
            "{} lists {v}",
            m.id
        );
    }
    // Through a broker that does not own the group, the operator sees its
    // live state and drains its host: both are the owner's, forwarded.
    let host = format!("host-{g}");
    let show = ferryctl_json(&other.files.admin_socket, &["group", "show", g]).await?;
    let live = &show["live"]["resources"];
    live.as_array()
        .and_then(|rs| rs.iter().find(|r| r["resource"] == host.as_str()))
        .with_context(|| format!("no live view of {g} through {}: {show:#}", other.id))?;
    assert_eq!(
        show["live"]["demand"], 2,
        "alice's and bob's slots: {show:#}"
    );
    ferryctl_json(&other.files.admin_socket, &["resources", "drain", &host]).await?;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let show = ferryctl_json(&other.files.admin_socket, &["group", "show", g]).await?;
        let available = show["live"]["resources"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["resource"] == host.as_str()))
            .map(|r| r["available"].clone());
        if available == Some(serde_json::Value::Bool(false)) {
            break;
        }
        if Instant::now() > deadline {
            bail!("{host} never drained: {show:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn now_millis() -> anyhow::Result<i64> {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    Ok(i64::try_from(d.as_millis())?)
}

fn rfc3339(ms: i64) -> anyhow::Result<String> {
    Ok(chrono::DateTime::from_timestamp_millis(ms)
        .context("time out of range")?
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn millis(v: &serde_json::Value) -> anyhow::Result<i64> {
    let s = v.as_str().with_context(|| format!("{v} is not a time"))?;
    Ok(chrono::DateTime::parse_from_rfc3339(s)
        .with_context(|| format!("time {s:?}"))?
        .timestamp_millis())
}

/// A session as recorded: resource, start, end.
type Span = (String, i64, Option<i64>);

/// `ferryctl sessions list --all` of the broker at `socket`, by session id;
/// fails on a session listed twice.
async fn sessions(socket: &Path) -> anyhow::Result<BTreeMap<String, Span>> {
    let listed = ferryctl_json(socket, &["sessions", "list", "--all"]).await?;
    let mut spans = BTreeMap::new();
    for s in listed.as_array().context("sessions list is an array")? {
        let id = s["session"].as_str().context("session id")?.to_owned();
        let resource = s["resource"].as_str().context("resource")?.to_owned();
        let started = millis(&s["started_at"])?;
        let ended = match &s["ended_at"] {
            serde_json::Value::Null => None,
            t => Some(millis(t)?),
        };
        if spans
            .insert(id.clone(), (resource, started, ended))
            .is_some()
        {
            bail!("session {id} listed twice: {listed}");
        }
    }
    Ok(spans)
}

/// The `ferry-connect` answer `v` is a refusal for lack of room.
fn at_capacity(code: Option<i32>, v: &serde_json::Value) {
    assert_eq!(code, Some(2), "{v}");
    assert_eq!(v["admitted"], false, "{v}");
    assert_eq!(v["reason"], "at-capacity", "{v}");
}

/// Load sessions each agent reports (a start and an end each) while its
/// group's owner is killed.
const LOAD_SESSIONS: usize = 8;

/// The owner of a busy group is SIGKILLed while its agents report sessions
/// and its two slots are taken: another broker takes the group within the
/// lease time and a renewal, the agents follow, every acknowledged event is
/// recorded once, the limit still holds (a slot reserved by a ticket of the
/// killed owner stays reserved and its client takes it; a third user is
/// refused, and admitted once a slot frees) and the usage report is what
/// the sessions say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owner_s_busy_group_moves_without_losing_an_event_or_breaking_its_limit(
) -> anyhow::Result<()> {
    let Some((pg, url)) = database("cluster_failover")? else {
        return Ok(());
    };
    let from = now_millis()? / 1000 * 1000 - 1000;
    let tmp = tempfile::tempdir()?;
    let mut cluster = Cluster::start(tmp.path(), &url, 3, LEASE_TOML).await?;
    let socket0 = cluster.member("b0")?.files.admin_socket.clone();
    let ca = cluster
        .member("b0")?
        .files
        .pki_dir
        .join(ferry_broker::pki::CA_CERT);
    let mut pws = BTreeMap::new();
    for u in ["alice", "bob", "carol"] {
        pws.insert(u, create_user(&socket0, tmp.path(), u).await?);
    }
    let group = "busy".to_owned();
    let mut p = fixed_size("2", "1");
    p.extend(["--user", "alice", "--user", "bob", "--user", "carol"]);
    publish_payg(&socket0, &group, &p).await?;
    let groups = [group.clone()];
    let before = wait_leases(pg, &url, "busy owned", |l| all_owned(l, &groups)).await?;
    let victim = before[&group].owner.clone().context("owned")?;
    let mut agents = BTreeMap::new();
    for r in ["host-1", "host-2"] {
        agents.insert(r.to_owned(), agent(&cluster, r, &group).await?);
    }
    let victim_socket = cluster.member(&victim)?.files.admin_socket.clone();
    for r in agents.keys() {
        wait_connected(&victim_socket, r).await?;
    }
    let others: Vec<String> = cluster
        .brokers
        .iter()
        .filter(|m| m.id != victim)
        .map(|m| m.addr.to_string())
        .collect();

    // Both slots are taken by users admitted through the other brokers:
    // alice's session starts on her host; bob's client only arrives after
    // the failover, with the ticket the killed owner gave him.
    let mut reported: BTreeMap<String, (String, bool)> = BTreeMap::new();
    let mut events = 0u64;
    let mut admitted = BTreeMap::new();
    for (user, via) in ["alice", "bob"].into_iter().zip(&others) {
        let (code, v) = connect(via, &ca, &group, user, &pws[user]).await?;
        assert_eq!(code, Some(0), "{user}: {v}");
        let resource = v["resource"].as_str().context("resource")?.to_owned();
        let session = v["session"].as_str().context("session")?.to_owned();
        if user == "alice" {
            agents[&resource].start_session(&session, user).await?;
            reported.insert(session.clone(), (resource.clone(), false));
            events += 1;
        }
        admitted.insert(user, (resource, session));
    }
    for a in agents.values() {
        a.wait_synced().await?;
    }
    let (code, v) = connect(&others[0], &ca, &group, "carol", &pws["carol"]).await?;
    at_capacity(code, &v);

    // Load: each agent reports sessions starting and ending; the owner is
    // killed in the middle of it.
    let mut reporters = tokio::task::JoinSet::new();
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let agents = std::sync::Arc::new(agents);
    for r in agents.keys() {
        let (agents, r, count) = (agents.clone(), r.clone(), count_tx.clone());
        for n in 0..LOAD_SESSIONS {
            reported.insert(format!("load-{r}-{n}"), (r.clone(), true));
        }
        events += 2 * LOAD_SESSIONS as u64;
        reporters.spawn(async move {
            let a = &agents[&r];
            for n in 0..LOAD_SESSIONS {
                let s = format!("load-{r}-{n}");
                a.start_session(&s, "loader").await?;
                a.cli(&["session", "end", "--session", &s, "--reason", "logout"])
                    .await?;
                count.send_modify(|c| *c += 1);
            }
            anyhow::Ok(())
        });
    }
    drop(count_tx);
    match tokio::time::timeout(PATIENCE, count_rx.wait_for(|c| *c >= LOAD_SESSIONS / 2)).await {
        Ok(Ok(_)) => {}
        _ => bail!("the agents stopped reporting before the kill"),
    }
    let status = cluster
        .member_mut(&victim)?
        .running_mut()?
        .daemon
        .crash()
        .await?;
    assert_eq!(status.code(), None, "killed by a signal");
    let killed = Instant::now();
    let after = wait_leases(pg, &url, "busy taken over", |l| {
        l[&group].owner.as_ref().is_some_and(|o| *o != victim)
            && l[&group].epoch > before[&group].epoch
    })
    .await?;
    let took = killed.elapsed();
    eprintln!("busy taken over by another broker {took:?} after the kill");
    // The lease ran out at most a lease after its last renewal, and another
    // broker looks every third of it; two seconds of slack for this test's
    // polling and a loaded machine.
    assert!(
        took <= LEASE + LEASE / 3 + Duration::from_secs(2),
        "taken over {took:?} after the kill"
    );
    let heir = after[&group].owner.clone().context("owned")?;
    let heir_socket = cluster.member(&heir)?.files.admin_socket.clone();
    while let Some(done) = reporters.join_next().await {
        done??;
    }
    for (r, a) in agents.iter() {
        let s = a.wait_synced().await?;
        assert_eq!(s["spooled"], 0, "{s}");
        assert_eq!(s["acked_seq"], s["last_seq"], "{s}");
        wait_connected(&heir_socket, r).await?;
    }
    // Bob's slot, reserved by the killed owner, is still his: carol is
    // refused; his client arrives on it with the ticket of before.
    let (code, v) = connect(&others[0], &ca, &group, "carol", &pws["carol"]).await?;
    at_capacity(code, &v);
    let (resource, session) = admitted["bob"].clone();
    agents[&resource].start_session(&session, "bob").await?;
    agents[&resource].wait_synced().await?;
    reported.insert(session, (resource, false));
    events += 1;

    // Every acknowledged event, once.
    let spans = sessions(&heir_socket).await?;
    let recorded: BTreeMap<String, (String, bool)> = spans
        .iter()
        .map(|(id, (r, _, ended))| (id.clone(), (r.clone(), ended.is_some())))
        .collect();
    assert_eq!(recorded, reported);
    let status = ferryctl_json(&heir_socket, &["status"]).await?;
    assert_eq!(status["events_recorded"], events, "{status}");
    assert_eq!(status["open_sessions"], 2, "{status}");

    // The limit holds at the new owner, asked directly or through the
    // broker left.
    let third = cluster
        .brokers
        .iter()
        .find(|m| m.id != victim && m.id != heir)
        .context("a third broker")?
        .addr
        .to_string();
    let heir_addr = cluster.member(&heir)?.addr.to_string();
    for via in [&third, &heir_addr] {
        let (code, v) = connect(via, &ca, &group, "carol", &pws["carol"]).await?;
        at_capacity(code, &v);
    }
    // A slot freed is a slot given.
    let (resource, session) = admitted["alice"].clone();
    agents[&resource]
        .cli(&[
            "session",
            "end",
            "--session",
            &session,
            "--reason",
            "logout",
        ])
        .await?;
    agents[&resource].wait_synced().await?;
    reported.insert(session, (resource.clone(), true));
    let (code, v) = connect(&third, &ca, &group, "carol", &pws["carol"]).await?;
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["resource"], resource, "{v}");

    // The usage report is what the recorded sessions say.
    let spans = sessions(&heir_socket).await?;
    let to = (now_millis()? / 1000 + 1) * 1000;
    let wait = u64::try_from(to - now_millis()?).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (resource, started, ended) in spans.values() {
        assert!(*started >= from, "a session before the period");
        let ms = ended.unwrap_or(to) - started;
        let entry = want.entry(resource.clone()).or_default();
        entry.0 += 1;
        entry.1 += u64::try_from(ms)?.div_ceil(1000);
    }
    let (from_s, to_s) = (rfc3339(from)?, rfc3339(to)?);
    let usage = ferryctl_json(
        &heir_socket,
        &[
            "usage", "--group", &group, "--from", &from_s, "--to", &to_s, "--format", "json",
        ],
    )
    .await?;
    let g = &usage["groups"][0];
    let mut got: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for r in g["resources"]
        .as_array()
        .with_context(|| format!("{usage}"))?
    {
        let resource = r["resource"].as_str().context("resource")?.to_owned();
        let sessions = r["sessions"].as_u64().context("sessions")?;
        let seconds = r["session_seconds"].as_u64().context("session_seconds")?;
        got.insert(resource, (sessions, seconds));
    }
    assert_eq!(
        got, want,
        "(sessions, session seconds) per resource: {usage:#}"
    );
    Ok(())
}

/// Polls `broker`'s logs until they contain `needle`.
async fn wait_log(cluster: &Cluster, broker: &str, needle: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let logs = cluster.member(broker)?.logs();
        if logs.contains(needle) {
            return Ok(logs);
        }
        if Instant::now() > deadline {
            bail!("{broker} never logged {needle:?}:\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The group's base intervals still open (`released_at IS NULL`), by
/// resource.
async fn open_intervals(pg: &PgCluster, url: &str, group: &str) -> anyhow::Result<Vec<String>> {
    let rows = psql(
        pg,
        url,
        &format!(
            "SELECT i.resource FROM resource_intervals i JOIN groups g ON g.num = i.group_num
             WHERE g.name = '{group}' AND i.released_at IS NULL ORDER BY i.resource"
        ),
    )
    .await?;
    Ok(rows.into_iter().flatten().collect())
}

/// The owner of a group is paused (SIGSTOP) past its lease: the other
/// broker takes the group with a higher epoch and the agent follows. Once
/// resumed, the old owner steps down without writing for the group: the
/// lease stays with the new owner and the resource's open interval is not
/// closed by the old owner's stale view of its disconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_fenced_off_and_steps_down_when_it_resumes() -> anyhow::Result<()> {
    let Some((pg, url)) = database("cluster_pause")? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let cluster = Cluster::start(tmp.path(), &url, 2, LEASE_TOML).await?;
    let socket0 = cluster.member("b0")?.files.admin_socket.clone();
    let group = "paused".to_owned();
    publish_payg(&socket0, &group, &fixed_size("1", "1")).await?;
    let groups = [group.clone()];
    let before = wait_leases(pg, &url, "owned", |l| all_owned(l, &groups)).await?;
    let old = before[&group].owner.clone().context("owned")?;
    let a = agent(&cluster, "host-p", &group).await?;
    a.start_session("s-1", "probe").await?;
    a.wait_synced().await?;
    wait_connected(&cluster.member(&old)?.files.admin_socket, "host-p").await?;
    assert_eq!(open_intervals(pg, &url, &group).await?, ["host-p"]);

    cluster
        .member(&old)?
        .running()?
        .daemon
        .signal("STOP")
        .await?;
    let stopped = Instant::now();
    let after = wait_leases(pg, &url, "taken over", |l| {
        l[&group].owner.as_ref().is_some_and(|o| *o != old)
            && l[&group].epoch > before[&group].epoch
    })
    .await?;
    let new = after[&group].owner.clone().context("owned")?;
    let new_socket = cluster.member(&new)?.files.admin_socket.clone();
    // The agent follows while the old owner is still paused, without
    // waiting out a handshake with the paused one: a few seconds of
    // handshake limit and backoff.
    let taken = Instant::now();
    a.start_session("s-2", "probe").await?;
    a.wait_synced().await?;
    wait_connected(&new_socket, "host-p").await?;
    let followed = taken.elapsed();
    eprintln!("the agent reached the new owner {followed:?} after the takeover");
    assert!(
        followed < ferry_agent::config::HANDSHAKE_LIMIT * 2 + LEASE,
        "the agent reached the new owner {followed:?} after the takeover"
    );
    // Paused well past its lease.
    let past = LEASE * 2;
    if let Some(rest) = past.checked_sub(stopped.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    cluster
        .member(&old)?
        .running()?
        .daemon
        .signal("CONT")
        .await?;

    // It learns it lost the group and stops acting for it.
    wait_log(&cluster, &old, "group lease lost or handed over").await?;
    let old_socket = cluster.member(&old)?.files.admin_socket.clone();
    assert!(!connected_here(&old_socket).await?.contains("host-p"));
    // The agent stays with the new owner, which still holds the lease at
    // the epoch it took.
    a.start_session("s-3", "probe").await?;
    let s = a.wait_synced().await?;
    assert_eq!(s["acked_seq"], s["last_seq"], "{s}");
    assert!(connected_here(&new_socket).await?.contains("host-p"));
    // The group stays where it went: the old owner, back, does not take
    // it again at once (its lease's hash favours it).
    hold_leases(
        pg,
        &url,
        "the group stays with its new owner",
        LEASE * 2,
        |l| l[&group] == after[&group],
    )
    .await?;
    assert!(connected_here(&new_socket).await?.contains("host-p"));
    // Nothing the old owner did after resuming closed the resource's
    // interval (its agent had left it for the new owner).
    assert_eq!(open_intervals(pg, &url, &group).await?, ["host-p"]);
    // Whether it tried (its actor may have stopped first) is a race; said
    // for the record.
    let logs = cluster.member(&old)?.logs();
    eprintln!(
        "the old owner had a write refused by its lease's epoch: {}",
        logs.contains("no longer owns group")
    );
    Ok(())
}

/// A broker stopped with SIGTERM hands its groups over: the others take
/// them well before its leases would have expired (a long lease here makes
/// the difference plain), with a higher epoch, and the agents follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_broker_hands_its_groups_over_without_waiting_for_its_leases(
) -> anyhow::Result<()> {
    let Some((pg, url)) = database("cluster_handover")? else {
        return Ok(());
    };
    // Renewals every 4 s: a lease left to expire lasts at least 8 s after
    // the broker stops renewing it.
    let lease = Duration::from_secs(12);
    let tmp = tempfile::tempdir()?;
    let mut cluster = Cluster::start(tmp.path(), &url, 3, "12s").await?;
    let socket0 = cluster.member("b0")?.files.admin_socket.clone();
    let groups: Vec<String> = (1..=4).map(|n| format!("h{n}")).collect();
    for g in &groups {
        publish_payg(&socket0, g, &fixed_size("1", "1")).await?;
    }
    let before = wait_leases(pg, &url, "every group owned", |l| all_owned(l, &groups)).await?;
    // The broker owning the most groups stops.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for l in before.values() {
        *counts.entry(l.owner.clone().context("owned")?).or_default() += 1;
    }
    let (leaving, _) = counts
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(b, n)| (b.clone(), *n))
        .context("an owner")?;
    let moving: Vec<String> = groups
        .iter()
        .filter(|g| before[*g].owner.as_deref() == Some(leaving.as_str()))
        .cloned()
        .collect();
    let mut agents = Vec::new();
    for g in &moving {
        let a = agent(&cluster, &format!("host-{g}"), g).await?;
        a.start_session(&format!("s-{g}-1"), "probe").await?;
        a.wait_synced().await?;
        agents.push(a);
    }

    let sent = Instant::now();
    let member = cluster.member_mut(&leaving)?;
    let process = member.running_mut()?;
    process.daemon.signal("TERM").await?;
    let status = process
        .daemon
        .wait(ferry_tests::procs::PROCESS_SHUTDOWN_GRACE + PATIENCE)
        .await?;
    assert!(status.success(), "{status:?}");
    member.process = None;
    let after = wait_leases(pg, &url, "handed over", |l| {
        moving.iter().all(|g| {
            l[g].owner.as_ref().is_some_and(|o| *o != leaving) && l[g].epoch > before[g].epoch
        })
    })
    .await?;
    let took = sent.elapsed();
    eprintln!("groups handed over {took:?} after SIGTERM");
    assert!(
        took < lease / 2,
        "groups taken {took:?} after SIGTERM: they waited for the lease ({lease:?}) to expire"
    );
    for (g, a) in moving.iter().zip(&agents) {
        a.start_session(&format!("s-{g}-2"), "probe").await?;
        a.wait_synced().await?;
        let owner = after[g].owner.clone().context("owned")?;
        wait_connected(
            &cluster.member(&owner)?.files.admin_socket,
            &format!("host-{g}"),
        )
        .await?;
    }
    // The groups it did not own stayed where they were.
    for g in groups.iter().filter(|g| !moving.contains(g)) {
        assert_eq!(after[g], before[g], "{g}");
    }
    Ok(())
}
