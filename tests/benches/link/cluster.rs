//! Figures 5 and 6: brokers sharing a PostgreSQL store (issue 16).
//!
//! 5. (`--cluster`) Durable session events per second from the same raw
//!    agents as figure 1, through 1, 2 and 3 real `ferry-broker run`
//!    processes sharing one PostgreSQL database, against one broker on
//!    SQLite and the bare quinn echo, all in one run and interleaved rep by
//!    rep. The agents are spread round robin over [`GROUPS`] delivery groups;
//!    each enters at one of the brokers in turn and follows its `Redirect`
//!    to its group's owner, so with several brokers each serves the agents
//!    of the groups it owns and the figure is the sum over the brokers.
//! 6. (`--failover`) Two real brokers on PostgreSQL with `lease = "3s"`, a
//!    shared group with one real `ferry-agent` (configured with both
//!    brokers) and an end user: the owner of the group is killed with
//!    SIGKILL, and the time until the other broker admits the user (a
//!    `RouteClient` asking again every [`FAILOVER_POLL`]) is measured.
//!
//!    `FERRY_BENCH_AGENT_LOG=1` prints the agent's log of each run (where
//!    its reconnections went).
//!
//! PostgreSQL is a throwaway cluster of the distribution's server programs
//! (`ferry_process::pg_cluster`), on this machine.

use super::*;
use ferry_broker::cluster::owner_for;
use ferry_broker::routing::{RouteAnswer, RouteClient};
use ferry_common::admin::{BillingSpec, GroupSpec, PolicySpec, SessionType, UserSpec};
use ferry_common::route::{RouteAsk, RouteRefusal};
use ferry_common::ticket::Credential;
use ferry_common::GroupName;
use ferry_process::pg_cluster::PgCluster;
use ferry_tests::procs::{AgentProcess, BrokerFiles, BrokerProcess};

/// Delivery groups the agents of figure 5 are spread over: enough that
/// rendezvous hashing gives each of 3 brokers a share.
const GROUPS: usize = 12;

/// Lease of figure 5's brokers: the default.
const THROUGHPUT_LEASE: &str = "10s";

/// Lease of figure 6's brokers: the shortest allowed.
const FAILOVER_LEASE: &str = "3s";

/// Killed owners in figure 6 (`--quick`: 2).
const FAILOVER_RUNS: usize = 10;

/// How often figure 6's user asks the surviving broker again.
const FAILOVER_POLL: Duration = Duration::from_millis(20);

/// How often the settling of the leases is checked.
const SETTLE_POLL: Duration = Duration::from_millis(100);

/// One configuration of figure 5, with its servers and connected agents.
struct Setup {
    name: String,
    /// Its brokers (none for the echo).
    brokers: Vec<Server>,
    echo: Option<Server>,
    links: Vec<Link>,
    reps: Vec<Rep>,
    /// Events sent (and acknowledged) in all its reps.
    sent: u64,
}

async fn start_pg() -> Result<PgCluster> {
    tokio::task::spawn_blocking(PgCluster::start)
        .await
        .context("start PostgreSQL")?
        .context("start a throwaway PostgreSQL cluster (install the `postgresql` package)")
}

async fn create_database(pg: &PgCluster, name: &str) -> Result<String> {
    tokio::task::block_in_place(|| pg.create_database(name))
        .with_context(|| format!("create database {name}"))
}

fn cluster_config(url: &str, broker: &str, lease: &str) -> String {
    format!(
        "\n[store]\nbackend = \"postgres\"\nurl = {url:?}\n\n[cluster]\nbroker_id = \
         {broker:?}\nlease = {lease:?}\n"
    )
}

async fn admin(socket: &Path, request: AdminRequestV1) -> Result<AdminResponseV1> {
    match admin_request(socket, request).await? {
        AdminResponseV1::Error(e) => bail!("admin request refused: {e:?}"),
        other => Ok(other),
    }
}

/// Publishes a group and returns its number (its id is `dg-NNNNNN`).
async fn publish(socket: &Path, spec: GroupSpec) -> Result<(GroupName, i64)> {
    match admin(socket, AdminRequestV1::GroupPublish(spec)).await? {
        AdminResponseV1::Group(g) => {
            let num = g
                .info
                .id
                .strip_prefix("dg-")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("group id {:?}", g.info.id))?;
            Ok((g.info.name, num))
        }
        other => bail!("publish answered {other:?}"),
    }
}

fn group_spec(
    name: &str,
    base: u32,
    session_type: SessionType,
    users: Vec<String>,
) -> Result<GroupSpec> {
    Ok(GroupSpec {
        name: Some(name.parse()?),
        region: "cn-hangzhou".into(),
        office_network: "office-net-1".into(),
        spec: "office-4c8g".into(),
        image: "img-7".into(),
        billing: BillingSpec::PayAsYouGo,
        base_resources: base,
        session_type,
        users: users.iter().map(|u| u.parse()).collect::<Result<_, _>>()?,
        policy: PolicySpec {
            concurrent_sessions: Some(2),
            usage_threshold: Some(100),
            scale_out_step: Some(1),
            max_elastic: Some(0),
            max_idle_ms: Some(3_600_000),
            ..PolicySpec::default()
        },
    })
}

/// Waits until every group is held by the broker rendezvous hashing over
/// `brokers` gives it, as read from the shared database.
async fn wait_settled(url: &str, groups: &[(GroupName, i64)], brokers: &[String]) -> Result<()> {
    let store = {
        let url = url.to_owned();
        tokio::task::spawn_blocking(move || Store::open_postgres(&url, StoreOptions::default()))
            .await
            .context("open the shared store")??
    };
    let live: Vec<&str> = brokers.iter().map(String::as_str).collect();
    let deadline = Instant::now() + PATIENCE;
    let result = loop {
        let owners = store.owners().await?;
        let settled = groups.iter().all(|(g, num)| {
            owners
                .iter()
                .any(|o| o.group == g.as_str() && o.owner.as_deref() == owner_for(*num, &live))
        });
        if settled {
            break Ok(());
        }
        if Instant::now() >= deadline {
            break Err(anyhow!(
                "group leases not settled after {PATIENCE:?}: {owners:?}"
            ));
        }
        tokio::time::sleep(SETTLE_POLL).await;
    };
    store.close().await;
    result
}

/// Starts `n` brokers (on SQLite when `url` is `None`, else sharing the
/// PostgreSQL database `url`), publishes the groups, puts the agents in
/// them and connects every agent, entering at the brokers in turn.
#[allow(clippy::too_many_arguments)]
async fn broker_setup(
    name: &str,
    n: usize,
    url: Option<&str>,
    broker_bin: &Path,
    root: &Path,
    pki_dir: &Path,
    ids: &[Identity],
    endpoints: &[quinn::Endpoint],
    plan: &Plan,
    tracker: &TaskTracker,
) -> Result<Setup> {
    let broker_ids: Vec<String> = (1..=n).map(|b| format!("b{b}")).collect();
    let mut brokers = Vec::with_capacity(n);
    for id in &broker_ids {
        let extra = url.map_or(String::new(), |u| cluster_config(u, id, THROUGHPUT_LEASE));
        let dir = root.join(format!("{}-{id}", name.replace(' ', "-")));
        brokers.push(start_broker(broker_bin, &dir, pki_dir, &extra, tracker).await?);
    }
    let socket = brokers[0].admin_socket.clone().context("admin socket")?;
    let per_group = u32::try_from(ids.len().div_ceil(GROUPS))?;
    let mut groups = Vec::with_capacity(GROUPS);
    for g in 0..GROUPS {
        let spec = group_spec(
            &format!("bench-g{g:02}"),
            per_group,
            SessionType::Independent,
            Vec::new(),
        )?;
        groups.push(publish(&socket, spec).await?);
    }
    for (i, id) in ids.iter().enumerate() {
        admin(
            &socket,
            AdminRequestV1::ResourcesAssign {
                resource: id.resource.clone(),
                group: Some(groups[i % GROUPS].0.clone()),
            },
        )
        .await?;
    }
    if let Some(url) = url {
        wait_settled(url, &groups, &broker_ids).await?;
    }
    let mut links = Vec::with_capacity(ids.len());
    for (chunk, broker) in ids.chunks(ids.len().div_ceil(n)).zip(&brokers) {
        links.extend(
            connect_all(
                endpoints,
                chunk,
                broker.addr,
                Kind::Broker,
                plan.window,
                tracker,
            )
            .await
            .with_context(|| format!("{name}: connect agents"))?,
        );
    }
    let redirects: u32 = links.iter().map(|l| l.redirects).sum();
    let served: Vec<String> = brokers
        .iter()
        .map(|b| {
            let k = links
                .iter()
                .filter(|l| l.conn.remote_address() == b.addr)
                .count();
            format!("{k}")
        })
        .collect();
    println!(
        "{name}: {} agents in {GROUPS} groups; agents served per broker [{}] ({redirects} redirects followed)",
        links.len(),
        served.join(" ")
    );
    Ok(Setup {
        name: name.to_owned(),
        brokers,
        echo: None,
        links,
        reps: Vec::new(),
        sent: 0,
    })
}

/// Figure 5.
pub async fn throughput(plan: Plan, quick: bool) -> Result<()> {
    print_machine(quick, &plan);
    let broker_bin = tokio::task::spawn_blocking(|| ferry_tests::bins::bin("ferry-broker"))
        .await
        .context("locate the ferry-broker binary")?;
    let pg = start_pg().await?;
    let tmp = tempfile::tempdir().context("create temp dir")?;
    let pki_dir = tmp.path().join("pki");
    pki::init(&pki_dir, &[]).context("pki init")?;
    let ids = {
        let (pki_dir, out, n) = (pki_dir.clone(), tmp.path().join("agents"), plan.agents);
        tokio::task::spawn_blocking(move || identities(&pki_dir, &out, n))
            .await
            .context("issue agent certificates")??
    };
    let tracker = TaskTracker::new();
    let endpoints = client_endpoints(plan.client_endpoints)?;
    let mut setups: Vec<Setup> = Vec::new();
    let result = async {
        let (bin, root, pki) = (broker_bin.as_path(), tmp.path(), pki_dir.as_path());
        setups.push(
            broker_setup(
                "sqlite x1",
                1,
                None,
                bin,
                root,
                pki,
                &ids,
                &endpoints,
                &plan,
                &tracker,
            )
            .await?,
        );
        for n in 1..=3 {
            let url = create_database(&pg, &format!("bench{n}")).await?;
            setups.push(
                broker_setup(
                    &format!("postgres x{n}"),
                    n,
                    Some(&url),
                    bin,
                    root,
                    pki,
                    &ids,
                    &endpoints,
                    &plan,
                    &tracker,
                )
                .await?,
            );
        }
        let echo = start_echo(&pki_dir, &tracker).await?;
        let links = connect_all(
            &endpoints,
            &ids,
            echo.addr,
            Kind::Echo,
            plan.window,
            &tracker,
        )
        .await
        .context("connect clients to the echo server")?;
        setups.push(Setup {
            name: "quinn echo".into(),
            brokers: Vec::new(),
            echo: Some(echo),
            links,
            reps: Vec::new(),
            sent: 0,
        });
        // Every configuration once per rep, starting one further each rep,
        // so a slow drift of the machine favours none.
        for i in 0..plan.reps {
            let count = setups.len();
            for k in 0..count {
                let s = &mut setups[(i + k) % count];
                let (links, rep, _, sent) = rep_over(std::mem::take(&mut s.links), &plan, &tracker)
                    .await
                    .with_context(|| format!("{} rep {i}", s.name))?;
                println!(
                    "  rep {i} {:<11}: {:>9.0} events/s  p50 {:>9}  p99 {:>9}  ({} counted)",
                    s.name,
                    rep.per_sec,
                    ms(rep.p50),
                    ms(rep.p99),
                    rep.counted
                );
                s.links = links;
                s.reps.push(rep);
                s.sent += sent;
            }
        }
        for s in &setups {
            if let Some(b) = s.brokers.first() {
                // Brokers sharing a database count the same rows.
                let recorded = broker_status(b).await?.events_recorded;
                if recorded != s.sent {
                    bail!(
                        "{}: {} events acknowledged but {recorded} recorded",
                        s.name,
                        s.sent
                    );
                }
            }
        }
        print_cluster_summary(&plan, &setups);
        anyhow::Ok(())
    }
    .await;
    for s in setups {
        close_links(s.links);
        for b in s.brokers {
            if let Err(e) = b.stop().await {
                eprintln!("warning: stop a broker of {}: {e:#}", s.name);
            }
        }
        if let Some(e) = s.echo {
            let _ = e.stop().await;
        }
    }
    for e in &endpoints {
        let _ = tokio::time::timeout(PATIENCE, e.wait_idle()).await;
    }
    tracker.close();
    if tokio::time::timeout(PATIENCE, tracker.wait())
        .await
        .is_err()
    {
        eprintln!("warning: client tasks still running at exit");
    }
    drop(pg);
    result
}

fn print_cluster_summary(plan: &Plan, setups: &[Setup]) {
    println!(
        "\n== Results (medians over repetitions; per-rep values in brackets) ==\n\n\
         5. Session events through brokers sharing PostgreSQL, {} agents in {GROUPS} groups, window {}",
        plan.agents, plan.window
    );
    println!(
        "  {:<34} {:>12} {:>11} {:>11}",
        "", "events/s", "p50 ack", "p99 ack"
    );
    let medians: Vec<f64> = setups.iter().map(|s| row(&s.name, &s.reps)).collect();
    let base = |name: &str| {
        setups
            .iter()
            .position(|s| s.name == name)
            .map(|i| (i, medians[i]))
    };
    for (base_name, (bi, bm)) in ["sqlite x1", "quinn echo"]
        .iter()
        .filter_map(|n| Some((*n, base(n)?)))
    {
        let ratios: Vec<String> = setups
            .iter()
            .zip(&medians)
            .filter(|(s, _)| s.name != base_name)
            .map(|(s, m)| {
                let per_rep: Vec<String> = s
                    .reps
                    .iter()
                    .zip(&setups[bi].reps)
                    .filter(|(_, b)| b.per_sec > 0.0)
                    .map(|(r, b)| format!("{:.3}", r.per_sec / b.per_sec))
                    .collect();
                format!(
                    "    {:<11} {:.3} [{}]",
                    s.name,
                    if bm > 0.0 { m / bm } else { 0.0 },
                    per_rep.join(" ")
                )
            })
            .collect();
        println!(
            "  against {base_name} (ratio of medians; per rep):\n{}",
            ratios.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------
// Figure 6

/// Figure 6.
pub async fn failover(quick: bool) -> Result<()> {
    let plan = if quick { Plan::quick() } else { Plan::full() };
    print_machine(quick, &plan);
    let runs = if quick { 2 } else { FAILOVER_RUNS };
    let pg = start_pg().await?;
    let tmp = tempfile::tempdir().context("create temp dir")?;
    let first = BrokerFiles::init(&tmp.path().join("pki-holder")).await?;
    let mut runs_out = Vec::with_capacity(runs);
    for run in 0..runs {
        let url = create_database(&pg, &format!("failover{run}")).await?;
        let f = failover_run(tmp.path(), &first.pki_dir, &url, run)
            .await
            .with_context(|| format!("failover run {run}"))?;
        println!(
            "  run {run}: SIGKILL of the owner -> the other broker holds the group {}, admits the user {}",
            ms(f.taken),
            ms(f.admitted)
        );
        runs_out.push(f);
    }
    println!("\n== Results ==\n\n6. Failover, lease {FAILOVER_LEASE}, {runs} runs (median / best / worst; per run)");
    for (what, times) in [
        (
            "group taken over",
            runs_out.iter().map(|f| f.taken).collect::<Vec<_>>(),
        ),
        (
            "first admission",
            runs_out.iter().map(|f| f.admitted).collect(),
        ),
    ] {
        let mut sorted = times.clone();
        sorted.sort();
        println!(
            "  {what:<17} {} / {} / {}  [{}]",
            ms(median_dur(sorted.iter().copied())),
            ms(sorted.first().copied().unwrap_or_default()),
            ms(sorted.last().copied().unwrap_or_default()),
            times.iter().map(|t| ms(*t)).collect::<Vec<_>>().join(", ")
        );
    }
    drop(pg);
    Ok(())
}

fn files(dir: &Path, pki_dir: &Path, url: &str, id: &str) -> Result<BrokerFiles> {
    std::fs::create_dir_all(dir)?;
    Ok(BrokerFiles {
        dir: dir.to_owned(),
        pki_dir: pki_dir.to_owned(),
        state_dir: dir.join("state"),
        admin_socket: dir.join("admin.sock"),
        extra_config: cluster_config(url, id, FAILOVER_LEASE),
    })
}

fn ask(token: &str) -> Result<RouteAsk> {
    Ok(RouteAsk {
        group: "failover".parse()?,
        user: "u1".parse()?,
        credential: Credential::Token(token.to_owned()),
        wait: false,
    })
}

/// Asks `addr` once for a session on a fresh connection.
async fn route_once(addr: SocketAddr, ca: &Path, token: &str) -> Result<RouteAnswer> {
    let client = RouteClient::connect_within(addr, "localhost", ca, Duration::from_secs(2)).await?;
    let answer = client.route(ask(token)?, |_| {}).await;
    client.close().await;
    Ok(answer?)
}

/// One failover: returns the time from the owner's SIGKILL to the first
/// admission by the other broker.
async fn failover_run(root: &Path, pki_dir: &Path, url: &str, run: usize) -> Result<Failover> {
    let dir = root.join(format!("run{run}"));
    let any: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let f1 = files(&dir.join("b1"), pki_dir, url, "b1")?;
    let f2 = files(&dir.join("b2"), pki_dir, url, "b2")?;
    let mut b1 = BrokerProcess::start(&f1, any, 0).await?;
    let mut b2 = BrokerProcess::start(&f2, any, 0).await?;
    let socket = &f1.admin_socket;
    admin(
        socket,
        AdminRequestV1::UserCreate(UserSpec {
            id: "u1".parse()?,
            email: "u1@example.com".into(),
            mobile: "+8613800000000".into(),
        }),
    )
    .await?;
    let token = match admin(
        socket,
        AdminRequestV1::UserToken {
            user: "u1".parse()?,
            ttl_secs: 3600,
        },
    )
    .await?
    {
        AdminResponseV1::UserToken { token, .. } => token,
        other => bail!("token answered {other:?}"),
    };
    publish(
        socket,
        group_spec("failover", 1, SessionType::Shared, vec!["u1".into()])?,
    )
    .await?;
    let agent = AgentProcess::start_configured(
        &f1,
        "h1",
        b1.agent_addr,
        Some("failover"),
        &format!("brokers = [\"{}\"]\n", b2.agent_addr),
    )
    .await?;
    agent.wait_synced().await?;
    let ca = pki_dir.join(pki::CA_CERT);
    // The owner admits the user (following a redirect from the other).
    let deadline = Instant::now() + PATIENCE;
    let mut at = b1.agent_addr;
    let owner = loop {
        match route_once(at, &ca, &token).await {
            Ok(RouteAnswer::Admitted(_)) => break at,
            Ok(RouteAnswer::Redirect(to)) => at = to.parse()?,
            Ok(RouteAnswer::Refused(_)) | Err(_) => {}
        }
        if Instant::now() >= deadline {
            bail!("no admission before the kill within {PATIENCE:?}");
        }
        tokio::time::sleep(FAILOVER_POLL).await;
    };
    let (killed, survivor) = if owner == b1.agent_addr {
        (&mut b1, b2.agent_addr)
    } else {
        (&mut b2, b1.agent_addr)
    };
    let t0 = Instant::now();
    killed.daemon.crash().await?;
    let deadline = t0 + PATIENCE;
    let mut answers = Vec::new();
    let mut taken = None;
    let admitted = loop {
        let answer = route_once(survivor, &ca, &token).await;
        let elapsed = t0.elapsed();
        // The survivor's group actor answers (admits or refuses for want of
        // a host): it holds the lease. A redirect (to the dead owner, whose
        // lease runs) or `Busy` (nobody holds it) says it does not yet.
        let owns = match &answer {
            Ok(RouteAnswer::Admitted(_)) => true,
            Ok(RouteAnswer::Refused(r)) => r.reason != RouteRefusal::Busy,
            Ok(RouteAnswer::Redirect(_)) | Err(_) => false,
        };
        if owns && taken.is_none() {
            taken = Some(elapsed);
        }
        if let Ok(RouteAnswer::Admitted(_)) = answer {
            break elapsed;
        }
        let seen = match answer {
            Ok(RouteAnswer::Refused(r)) => format!("refused ({:?})", r.reason),
            Ok(RouteAnswer::Redirect(a)) => format!("redirect to {a}"),
            Ok(RouteAnswer::Admitted(_)) => String::new(),
            Err(e) => format!("error: {e:#}"),
        };
        if answers.last() != Some(&seen) {
            answers.push(seen);
        }
        if Instant::now() >= deadline {
            bail!("no admission by the survivor within {PATIENCE:?}; answers: {answers:?}");
        }
        tokio::time::sleep(FAILOVER_POLL).await;
    };
    println!("    answers before it: {}", answers.join(" -> "));
    if std::env::var_os("FERRY_BENCH_AGENT_LOG").is_some() {
        println!("----- agent log -----\n{}", agent.daemon.log());
    }
    drop(agent);
    let survivor = if owner == b1.agent_addr {
        &mut b2
    } else {
        &mut b1
    };
    survivor.daemon.signal("TERM").await?;
    survivor.daemon.wait(PATIENCE).await?;
    Ok(Failover {
        taken: taken.unwrap_or(admitted),
        admitted,
    })
}

/// One failover's times from the owner's SIGKILL.
#[derive(Clone, Copy)]
struct Failover {
    /// To the first answer of the survivor's group actor (it holds the lease).
    taken: Duration,
    /// To the first admission by the survivor.
    admitted: Duration,
}
