//! Benchmark of routing end users (issue 5).
//!
//! `cargo bench -p ferry-tests --bench route` runs, in one process and one run,
//! five interleaved repetitions of (figures are medians over the reps):
//!
//! 1. Route requests per second and p50/p99 latency on established client
//!    connections: [`CONNECTIONS`] connections, [`IN_FLIGHT`] requests in flight,
//!    [`REQUESTS`] requests per rep, each the whole path (token check, group
//!    and assignment read, the group actor's decision, ticket signing).
//!    The group is `shared` so a user's repeated requests get a new ticket for
//!    the same session instead of running out of slots; placement itself is
//!    the engine's (see the engine bench).
//! 2. New connections, one route each, per second: [`NEW_CONNECTIONS`] per rep,
//!    [`CONNECT_IN_FLIGHT`] at a time (handshake, stream, route, close).
//! 3. The reference: bare QUIC handshakes per second against a trivial quinn
//!    server with the broker's own TLS configuration (same certificate, same
//!    ALPNs, same transport), same count and concurrency as (2).
//!
//! In-process broker and agent (`ferry_tests::harness`), on 127.0.0.1.
//! `--quick` (or `FERRY_BENCH_QUICK=1`) runs a small version. Every loop is
//! bounded by a count and by `PATIENCE`. Not run from tests or CI.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_broker::config::GroupsConfig;
use ferry_broker::pki;
use ferry_broker::routing::{RouteAnswer, RouteClient};
use ferry_common::admin::{
    AdminRequestV1, AdminResponseV1, BillingSpec, GroupSpec, PolicySpec, Secret, SessionType,
    UserSpec,
};
use ferry_common::route::RouteAsk;
use ferry_common::ticket::Credential;
use ferry_tests::harness::{TestAgent, TestBroker};
use tokio::task::JoinSet;

const REPS: usize = 5;
const CONNECTIONS: usize = 4;
const IN_FLIGHT: usize = 32;
const REQUESTS: usize = 4_000;
const NEW_CONNECTIONS: usize = 400;
const CONNECT_IN_FLIGHT: usize = 8;
const USERS: usize = 6;
/// Safety net so a broken run fails instead of hanging; never part of a figure.
const PATIENCE: Duration = Duration::from_secs(120);

struct Sizes {
    requests: usize,
    new_connections: usize,
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = (sorted.len() * p).div_ceil(100).saturating_sub(1);
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn median_dur(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ask(user: usize, token: &str) -> RouteAsk {
    RouteAsk {
        group: "bench".parse().expect("group"),
        user: format!("u{user}").parse().expect("user"),
        credential: Credential::Token(token.to_owned()),
        wait: false,
    }
}

async fn setup(dir: &std::path::Path) -> Result<(TestBroker, TestAgent, Vec<String>)> {
    let broker = TestBroker::start_with_groups(dir, GroupsConfig::default()).await?;
    let mut tokens = Vec::new();
    for u in 0..USERS {
        broker
            .admin(AdminRequestV1::UserCreateWithPassword {
                user: UserSpec {
                    id: format!("u{u}").parse()?,
                    email: format!("u{u}@example.com"),
                    mobile: "+8613800000000".into(),
                },
                password: Secret(format!("password-{u}")),
            })
            .await?;
        match broker
            .admin(AdminRequestV1::UserToken {
                user: format!("u{u}").parse()?,
                ttl_secs: 3600,
            })
            .await?
        {
            AdminResponseV1::UserToken { token, .. } => tokens.push(token),
            other => bail!("token answered {other:?}"),
        }
    }
    broker
        .admin(AdminRequestV1::GroupPublish(GroupSpec {
            name: Some("bench".parse()?),
            region: "cn-hangzhou".into(),
            office_network: "office-net-1".into(),
            spec: "gpu-14c93g".into(),
            image: "img-1".into(),
            billing: BillingSpec::PayAsYouGo,
            base_resources: 1,
            session_type: SessionType::Shared,
            users: (0..USERS)
                .map(|u| format!("u{u}").parse())
                .collect::<Result<_, _>>()?,
            policy: PolicySpec {
                concurrent_sessions: Some(6),
                usage_threshold: Some(100),
                scale_out_step: Some(1),
                max_elastic: Some(0),
                max_idle_ms: Some(3_600_000),
                ..PolicySpec::default()
            },
        }))
        .await?;
    // The operator puts the host in the group, as on a real fleet.
    let agent = ferry_tests::admin::agent_of(&broker, "h1", "bench").await?;
    Ok((broker, agent, tokens))
}

async fn connect(broker: &TestBroker) -> Result<RouteClient> {
    Ok(RouteClient::connect(
        broker.agent_addr(),
        "localhost",
        &broker.pki_dir().join(pki::CA_CERT),
    )
    .await?)
}

/// Figure 1: (requests/s, p50, p99).
async fn established(
    clients: &[Arc<RouteClient>],
    tokens: &Arc<Vec<String>>,
    requests: usize,
) -> Result<(f64, Duration, Duration)> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for w in 0..IN_FLIGHT {
        let client = clients[w % clients.len()].clone();
        let (tokens, next) = (tokens.clone(), next.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return anyhow::Ok(lat);
                }
                let u = i % USERS;
                let t0 = Instant::now();
                match client.route(ask(u, &tokens[u]), |_| {}).await? {
                    RouteAnswer::Admitted(_) => lat.push(t0.elapsed()),
                    RouteAnswer::Refused(r) => bail!("refused: {} {}", r.reason, r.message),
                    RouteAnswer::Redirect(a) => bail!("sent to another broker at {a}"),
                }
            }
        });
    }
    let mut all = Vec::with_capacity(requests);
    let joined = tokio::time::timeout(PATIENCE, async {
        while let Some(r) = tasks.join_next().await {
            all.extend(r??);
        }
        anyhow::Ok(())
    })
    .await;
    joined.context("figure 1 did not finish")??;
    let elapsed = start.elapsed();
    all.sort();
    Ok((
        all.len() as f64 / elapsed.as_secs_f64(),
        percentile(&all, 50),
        percentile(&all, 99),
    ))
}

/// Figures 2 and 3: connections per second; `route` = one route each.
async fn connections(
    broker: &TestBroker,
    tokens: &Arc<Vec<String>>,
    count: usize,
    route: bool,
    bare: Option<&Bare>,
) -> Result<f64> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..CONNECT_IN_FLIGHT {
        let (tokens, next) = (tokens.clone(), next.clone());
        let addr = broker.agent_addr();
        let ca = broker.pki_dir().join(pki::CA_CERT);
        let bare = bare.map(|b| (b.addr, b.client.clone()));
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(());
                }
                match &bare {
                    Some((addr, endpoint)) => {
                        let conn = endpoint.connect(*addr, "localhost")?.await?;
                        conn.close(0u32.into(), b"done");
                    }
                    None => {
                        let c = RouteClient::connect(addr, "localhost", &ca).await?;
                        if route {
                            let u = i % USERS;
                            match c.route(ask(u, &tokens[u]), |_| {}).await? {
                                RouteAnswer::Admitted(_) => {}
                                RouteAnswer::Refused(r) => bail!("refused: {}", r.message),
                                RouteAnswer::Redirect(a) => bail!("sent to {a}"),
                            }
                        }
                        // Dropped, not `close()`d: closing waits for the
                        // connection's drain period, which the bare
                        // reference does not either.
                        drop(c);
                    }
                }
            }
        });
    }
    let joined = tokio::time::timeout(PATIENCE, async {
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        anyhow::Ok(())
    })
    .await;
    joined.context("connections did not finish")??;
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

/// A trivial quinn server with the broker's TLS configuration: it accepts
/// handshakes and nothing else.
struct Bare {
    addr: std::net::SocketAddr,
    client: quinn::Endpoint,
    server: quinn::Endpoint,
}

fn bare(pki_dir: &std::path::Path) -> Result<Bare> {
    let server = quinn::Endpoint::server(pki::server_config(pki_dir)?, "127.0.0.1:0".parse()?)?;
    let addr = server.local_addr()?;
    let accept = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            tokio::spawn(async move {
                if let Ok(conn) = incoming.await {
                    let _ = conn.closed().await;
                }
            });
        }
    });
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    client.set_default_client_config(pki::client_config_for(
        &pki_dir.join(pki::CA_CERT),
        None,
        ferry_common::ALPN_ROUTE,
    )?);
    Ok(Bare {
        addr,
        client,
        server,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var("FERRY_BENCH_QUICK").is_ok_and(|v| v == "1");
    let sizes = if quick {
        Sizes {
            requests: 200,
            new_connections: 20,
        }
    } else {
        Sizes {
            requests: REQUESTS,
            new_connections: NEW_CONNECTIONS,
        }
    };
    println!(
        "command: cargo bench -p ferry-tests --bench route{}",
        if quick { " -- --quick" } else { "" }
    );
    println!(
        "setup: in-process broker and 1 agent on 127.0.0.1; {REPS} interleaved reps; \
         figure 1: {} requests, {CONNECTIONS} connections, {IN_FLIGHT} in flight; \
         figures 2-3: {} connections, {CONNECT_IN_FLIGHT} at a time",
        sizes.requests, sizes.new_connections
    );
    let dir = tempfile::tempdir()?;
    let (broker, _agent, tokens) = setup(dir.path()).await?;
    let tokens = Arc::new(tokens);
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(Arc::new(connect(&broker).await?));
    }
    let reference = bare(broker.pki_dir())?;
    // Warm-up: every user's shared session exists before timing.
    established(&clients, &tokens, USERS * 4).await?;

    let (mut rps, mut p50, mut p99, mut conn_routes, mut handshakes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..REPS {
        let (r, a, b) = established(&clients, &tokens, sizes.requests).await?;
        let c = connections(&broker, &tokens, sizes.new_connections, true, None).await?;
        let h = connections(
            &broker,
            &tokens,
            sizes.new_connections,
            false,
            Some(&reference),
        )
        .await?;
        println!(
            "rep {rep}: {r:.0} routes/s (p50 {a:?}, p99 {b:?}); {c:.0} new connections+route/s; \
             {h:.0} bare QUIC handshakes/s"
        );
        rps.push(r);
        p50.push(a);
        p99.push(b);
        conn_routes.push(c);
        handshakes.push(h);
    }
    println!("--- medians of {REPS} reps ---");
    println!(
        "route requests on established connections: {:.0}/s, p50 {:?}, p99 {:?}",
        median(rps),
        median_dur(p50),
        median_dur(p99)
    );
    println!(
        "new connections + one route each: {:.0}/s",
        median(conn_routes)
    );
    println!(
        "reference, bare QUIC handshakes (same TLS): {:.0}/s",
        median(handshakes)
    );
    reference.server.close(0u32.into(), b"done");
    for c in clients {
        if let Ok(c) = Arc::try_unwrap(c) {
            c.close().await;
        }
    }
    Ok(())
}
