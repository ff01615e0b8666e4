//! Benchmark of the agent link (issue 2) and of the store's group commit (issue 4).
//!
//! `cargo bench -p ferry-tests --bench link` runs, in one process and one run:
//!
//! 1. Session events per second through the real `ferry-broker run` binary from
//!    many connected raw agents (mutual TLS, preamble, `Hello`, then pipelined
//!    `Session` frames with a bounded window), acknowledged only once durable;
//!    p50/p99 from an event's send to the `Ack` that covers it.
//! 2. The same clients against a bare quinn echo server (same TLS, same transport
//!    limits, same frames, same window; the echo is the "ack"), in its own process
//!    like the broker, interleaved with (1) rep by rep so noise hits both alike.
//! 3. Broker memory per connected agent: VmRSS of the broker idle, then with many
//!    registered idle agents.
//! 4. `Store` group commit (`max_batch` = the broker's default) against one commit
//!    per record (`max_batch` = 1) under concurrent writers: 64 (figure of issue
//!    2) and 512 (a fleet of many agents), both configurations interleaved.
//!
//! 5. and 6. (`--cluster`, `--failover`): brokers sharing a PostgreSQL store;
//!    see `link/cluster.rs`.
//!
//! `FERRY_BENCH_QUICK=1` (or the argument `--quick`) runs a small version in a few
//! seconds, to check the benchmark itself works. `--store-only` runs only figure
//! 4 (no broker binary, no certificates); `--help` lists the arguments. Every loop is bounded by a count
//! and by time. Not run from tests or CI: the numbers only mean something on a
//! quiet machine and are read by a person (see BENCHMARKS.md).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use ferry_broker::admin::request as admin_request;
use ferry_broker::pki;
use ferry_broker::store::{Store, StoreOptions, DEFAULT_MAX_BATCH, WRITE_QUEUE_LEN};
use ferry_common::admin::{AdminRequestV1, AdminResponseV1};
use ferry_common::frame::{self, PreambleReply};
use ferry_common::limits::MAX_FRAME_LEN;
use ferry_common::wire::{
    AgentMessage, AgentToBroker, BrokerMessage, BrokerToAgent, EndReason, Hello, HostFacts,
    RefusalCode, SequencedEvent, SessionEvent,
};
use ferry_common::{ResourceId, UnixMillis, PROTOCOL_VERSION};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[path = "link/cluster.rs"]
mod cluster;

/// Argument that turns this binary into the echo server child process.
const ECHO_FLAG: &str = "--echo-server";

/// Safety net so a broken run fails instead of hanging; never part of a figure.
const PATIENCE: Duration = Duration::from_secs(60);

/// Handshakes in flight at once when connecting many agents: enough to keep
/// both cores busy, few enough that no handshake times out on a slow machine.
const CONNECT_CONCURRENCY: usize = 32;

/// Redirects a benchmark agent follows in a row, like the real agent.
const MAX_REDIRECTS: u32 = 4;

/// Times a benchmark agent comes back when no broker owns its group yet,
/// and the pause before each (together longer than a lease renewal period).
const MAX_NOT_OWNER: u32 = 100;
const NOT_OWNER_PAUSE: Duration = Duration::from_millis(100);

/// Lines of a child's stderr kept to explain a failure.
const STDERR_TAIL: usize = 40;

/// The spool every benchmark agent reports from (each broker starts empty).
const SPOOL_ID: u64 = 1;

/// What one run measures and how long it may take.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Connected agents sending events (figures 1 and 2).
    agents: usize,
    /// Events each agent may have sent and not yet seen acknowledged.
    window: usize,
    /// Repetitions of each throughput measurement (broker and echo interleaved).
    reps: usize,
    /// Length of one repetition's measured window.
    measure: Duration,
    /// Time at the start of each repetition whose acks are not counted, so the
    /// figure is the steady state rather than the ramp-up.
    warmup: Duration,
    /// Upper bound on events one agent sends in one repetition.
    max_events_per_agent: u64,
    /// Connected idle agents for the memory figure.
    memory_agents: usize,
    /// Client endpoints (UDP sockets) the agents are spread over.
    client_endpoints: usize,
    /// Concurrent writers in the store benchmark, one measurement per count.
    store_writers: &'static [usize],
    /// Repetitions of each store measurement (the two batch sizes interleaved).
    store_reps: usize,
    /// Length of one store repetition.
    store_measure: Duration,
    /// Upper bound on records one store writer makes in one repetition.
    store_max_per_writer: u64,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            agents: 100,
            window: 16,
            reps: 5,
            measure: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            max_events_per_agent: 1_000_000,
            memory_agents: 1000,
            client_endpoints: 4,
            store_writers: &[64, 512],
            store_reps: 5,
            store_measure: Duration::from_secs(3),
            store_max_per_writer: 1_000_000,
        }
    }

    fn quick() -> Plan {
        Plan {
            agents: 20,
            window: 16,
            reps: 1,
            measure: Duration::from_millis(700),
            warmup: Duration::from_millis(200),
            max_events_per_agent: 100_000,
            memory_agents: 50,
            client_endpoints: 2,
            store_writers: &[16, 64],
            store_reps: 1,
            store_measure: Duration::from_millis(500),
            store_max_per_writer: 100_000,
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(pos) = args.iter().position(|a| a == ECHO_FLAG) {
        let dir = args
            .get(pos + 1)
            .context("--echo-server needs the PKI directory")?;
        return echo::main(Path::new(dir));
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    // `cargo bench` passes `--bench`; other arguments are ignored.
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("FERRY_BENCH_QUICK").is_ok_and(|v| v == "1");
    let store_only = args.iter().any(|a| a == "--store-only");
    let plan = if quick { Plan::quick() } else { Plan::full() };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    if let Some(pos) = args.iter().position(|a| a == "--store-profile") {
        return runtime.block_on(run_store_profile(plan, &args[pos + 1..]));
    }
    if store_only {
        return runtime.block_on(run_store_only(plan, quick));
    }
    if args.iter().any(|a| a == "--cluster") {
        return runtime.block_on(cluster::throughput(plan, quick));
    }
    if args.iter().any(|a| a == "--failover") {
        return runtime.block_on(cluster::failover(quick));
    }
    runtime.block_on(run(plan, quick))
}

const USAGE: &str = "\
Ferry link benchmark (see BENCHMARKS.md)

usage: cargo bench -p ferry-tests --bench link [-- ARGS]

  (no argument)   figures 1-4: broker events/s against a quinn echo, broker memory
                  per agent, store group commit against one commit per record
  --store-only    figure 4 only (store group commit, 64 and 512 writers)
  --store-profile WRITERS MAX_BATCH SECONDS
                  one store configuration alone, for a profiler (not a figure)
  --cluster       figure 5: events/s through 1, 2 and 3 brokers sharing a PostgreSQL
                  store, against one broker on SQLite and the quinn echo
  --failover      figure 6: from SIGKILL of a group's owner to the first admission
                  by the broker that takes the group over
  --quick         a small, fast version (also FERRY_BENCH_QUICK=1); figures meaningless
  --help          this text";

/// Figure 4 alone: needs neither the broker binary nor certificates.
async fn run_store_only(plan: Plan, quick: bool) -> Result<()> {
    print_machine(quick, &plan);
    let tmp = tempfile::tempdir().context("create temp dir")?;
    let store = store_bench(&plan, tmp.path())
        .await
        .context("store benchmark")?;
    print_store_summary(&store);
    Ok(())
}

/// One store configuration alone, so a profiler sees only it.
async fn run_store_profile(mut plan: Plan, args: &[String]) -> Result<()> {
    let arg = |i: usize, what: &str| -> Result<u64> {
        args.get(i)
            .with_context(|| format!("--store-profile needs {what}"))?
            .parse::<u64>()
            .with_context(|| format!("--store-profile {what}"))
    };
    let writers = usize::try_from(arg(0, "WRITERS")?)?;
    let batch = usize::try_from(arg(1, "MAX_BATCH")?)?;
    plan.store_measure = Duration::from_secs(arg(2, "SECONDS")?);
    let tmp = tempfile::tempdir().context("create temp dir")?;
    let rep = store_rep(&tmp.path().join("profile.db"), batch, writers, &plan).await?;
    println!(
        "writers {writers} max_batch {batch}: {:.0} records/s  p50 {}  p99 {}",
        rep.per_sec,
        ms(rep.p50),
        ms(rep.p99)
    );
    Ok(())
}

async fn run(plan: Plan, quick: bool) -> Result<()> {
    print_machine(quick, &plan);
    let broker_bin = tokio::task::spawn_blocking(|| ferry_tests::bins::bin("ferry-broker"))
        .await
        .context("locate the ferry-broker binary")?;
    let tmp = tempfile::tempdir().context("create temp dir")?;
    let pki_dir = tmp.path().join("pki");
    pki::init(&pki_dir, &[]).context("pki init")?;

    let needed = plan.agents.max(plan.memory_agents);
    let t = Instant::now();
    let ids = {
        let pki_dir = pki_dir.clone();
        let out = tmp.path().join("agents");
        tokio::task::spawn_blocking(move || identities(&pki_dir, &out, needed))
            .await
            .context("issue agent certificates")??
    };
    println!(
        "setup: issued {needed} agent certificates in {:.1} s\n",
        t.elapsed().as_secs_f64()
    );

    let tracker = TaskTracker::new();
    let result = async {
        let throughput = throughput(&plan, &broker_bin, tmp.path(), &pki_dir, &ids, &tracker)
            .await
            .context("throughput benchmark")?;
        let memory = memory(&plan, &broker_bin, tmp.path(), &pki_dir, &ids, &tracker)
            .await
            .context("memory benchmark")?;
        let store = store_bench(&plan, tmp.path())
            .await
            .context("store benchmark")?;
        print_summary(&plan, &throughput, &memory, &store);
        anyhow::Ok(())
    }
    .await;
    tracker.close();
    if tokio::time::timeout(PATIENCE, tracker.wait())
        .await
        .is_err()
    {
        eprintln!("warning: client tasks still running at exit");
    }
    result
}

// ---------------------------------------------------------------------------
// Machine and report

fn print_machine(quick: bool, plan: &Plan) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .map(|l| l.trim_start_matches("MemTotal:").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    println!(
        "Ferry link benchmark{}",
        if quick {
            " (QUICK mode: figures are not meaningful)"
        } else {
            ""
        }
    );
    println!("machine: {cpus} CPUs, {model}, {mem} RAM; unix time {now}");
    println!(
        "plan: {} agents x window {}, {} reps x {:?} (+{:?} warm-up); memory at {} agents; store {:?} writers, {} reps x {:?}\n",
        plan.agents,
        plan.window,
        plan.reps,
        plan.measure,
        plan.warmup,
        plan.memory_agents,
        plan.store_writers,
        plan.store_reps,
        plan.store_measure
    );
}

/// One repetition of a throughput measurement.
#[derive(Clone, Copy, Debug)]
struct Rep {
    /// Events (or records) completed inside the measured window, per second.
    per_sec: f64,
    /// Median send-to-ack (or call-to-return) time inside the window.
    p50: Duration,
    /// 99th percentile of the same.
    p99: Duration,
    /// Events (or records) the figures are computed from.
    counted: u64,
}

/// Figures 1 and 2.
struct Throughput {
    /// One entry per repetition against the broker.
    broker: Vec<Rep>,
    /// One entry per repetition against the echo server.
    echo: Vec<Rep>,
    /// Average size of an event frame (length prefix included).
    frame_bytes: f64,
    /// Events the broker says it recorded at the end (admin `status`).
    recorded: u64,
    /// Events sent to (and acknowledged by) the broker in all repetitions.
    sent: u64,
}

/// Figure 3.
struct Memory {
    /// Idle agents connected for the measurement.
    agents: usize,
    /// Broker VmRSS right after it became ready, no agents.
    idle_kib: u64,
    /// Broker VmRSS once every agent got its `Welcome`.
    loaded_kib: u64,
    /// Agents the broker itself reports connected at that moment.
    connected: u64,
}

/// Figure 4, for one count of concurrent writers.
struct StoreFigure {
    /// Concurrent writers.
    writers: usize,
    /// One entry per repetition with `max_batch` = [`DEFAULT_MAX_BATCH`].
    group: Vec<Rep>,
    /// One entry per repetition with `max_batch` = 1.
    single: Vec<Rep>,
}

/// Figure 4: one measurement per writer count of the plan.
type StoreFigures = Vec<StoreFigure>;

fn median_f64(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn median_dur(v: impl Iterator<Item = Duration>) -> Duration {
    let mut v: Vec<Duration> = v.collect();
    v.sort();
    // Middle element (upper middle for an even count): no averaging of latencies.
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = (sorted.len() * p).div_ceil(100).saturating_sub(1);
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn rates(reps: &[Rep]) -> String {
    reps.iter()
        .map(|r| format!("{:.0}", r.per_sec))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints one figure row (median rate, median p50 and p99, per-rep rates);
/// returns the median rate.
fn row(name: &str, reps: &[Rep]) -> f64 {
    let med = median_f64(&reps.iter().map(|r| r.per_sec).collect::<Vec<_>>());
    println!(
        "  {:<34} {:>12.0} {:>11} {:>11}   [{}]",
        name,
        med,
        ms(median_dur(reps.iter().map(|r| r.p50))),
        ms(median_dur(reps.iter().map(|r| r.p99))),
        rates(reps)
    );
    med
}

fn print_summary(plan: &Plan, t: &Throughput, m: &Memory, s: &StoreFigures) {
    println!("\n== Results (medians over repetitions; per-rep values in brackets) ==\n");
    println!(
        "1+2. Session events, {} agents, window {} per agent, frame {:.1} bytes avg",
        plan.agents, plan.window, t.frame_bytes
    );
    println!(
        "  {:<34} {:>12} {:>11} {:>11}",
        "", "events/s", "p50 ack", "p99 ack"
    );
    let b = row("ferry-broker (durable ack)", &t.broker);
    let e = row("bare quinn echo (baseline)", &t.echo);
    let per_rep: Vec<f64> = t
        .broker
        .iter()
        .zip(&t.echo)
        .filter(|(_, e)| e.per_sec > 0.0)
        .map(|(b, e)| b.per_sec / e.per_sec)
        .collect();
    println!(
        "  broker / echo throughput: {:.3} (ratio of medians); per rep: [{}]",
        if e > 0.0 { b / e } else { 0.0 },
        per_rep
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  check: {} events sent and acknowledged, broker reports {} recorded",
        t.sent, t.recorded
    );
    let delta = m.loaded_kib.saturating_sub(m.idle_kib);
    println!(
        "\n3. Broker memory (VmRSS): idle {} KiB, with {} connected idle agents {} KiB (broker says {} connected)",
        m.idle_kib, m.agents, m.loaded_kib, m.connected
    );
    println!(
        "  per connected agent: {:.1} KiB",
        delta as f64 / m.agents.max(1) as f64
    );
    print_store_summary(s);
}

fn print_store_summary(s: &StoreFigures) {
    for f in s {
        println!(
            "\n4. Store, {} concurrent writers, one event per record_events call",
            f.writers
        );
        println!(
            "  {:<34} {:>12} {:>11} {:>11}",
            "", "records/s", "p50", "p99"
        );
        let g = row(
            &format!("group commit (max_batch {DEFAULT_MAX_BATCH})"),
            &f.group,
        );
        let one = row("one commit per record (max_batch 1)", &f.single);
        let per_rep: Vec<String> = f
            .group
            .iter()
            .zip(&f.single)
            .filter(|(_, o)| o.per_sec > 0.0)
            .map(|(g, o)| format!("{:.1}", g.per_sec / o.per_sec))
            .collect();
        println!(
            "  group / single: {:.1}x (ratio of medians); per rep: [{}]",
            if one > 0.0 { g / one } else { 0.0 },
            per_rep.join(" ")
        );
    }
}

// ---------------------------------------------------------------------------
// Identities and events

/// One benchmark agent's identity: its resource id and a client config that
/// presents its own certificate.
struct Identity {
    /// The resource its certificate names.
    resource: ResourceId,
    /// Trusts the bench CA and presents the agent's certificate.
    config: quinn::ClientConfig,
}

fn identities(pki_dir: &Path, out: &Path, n: usize) -> Result<Vec<Identity>> {
    (0..n)
        .map(|i| {
            let resource: ResourceId = format!("bench-{i:04}").parse()?;
            let dir = out.join(resource.as_str());
            pki::issue_agent(
                pki_dir,
                &resource,
                &dir,
                pki::Validity::starting_now(pki::DEFAULT_AGENT_LIFETIME),
            )?;
            let config = pki::client_config(
                &dir.join(pki::CA_CERT),
                Some((&dir.join(pki::AGENT_CERT), &dir.join(pki::AGENT_KEY))),
            )?;
            Ok(Identity { resource, config })
        })
        .collect()
}

fn now_millis() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    UnixMillis(ms)
}

/// The `seq`th event of a bench agent: sessions start (odd seq) and end (even
/// seq) in turn, like a host whose users log in and out.
fn event(seq: u64, at: UnixMillis) -> Result<SequencedEvent> {
    let session = format!("s-{}", seq.div_ceil(2)).parse()?;
    let event = if seq % 2 == 1 {
        SessionEvent::Started {
            session,
            user: "bench-user".parse()?,
            at,
        }
    } else {
        SessionEvent::Ended {
            session,
            at,
            reason: EndReason::Logout,
        }
    };
    Ok(SequencedEvent { seq, event })
}

fn event_frame(seq: u64, at: UnixMillis) -> Result<Vec<u8>> {
    let msg = AgentMessage::V1(AgentToBroker::Session(event(seq, at)?));
    Ok(frame::encode_frame(&msg, MAX_FRAME_LEN)?)
}

fn hello(resource: &ResourceId) -> Hello {
    Hello {
        resource: resource.clone(),
        group: None,
        agent_version: "bench".into(),
        image_version: "bench".into(),
        host: HostFacts {
            hostname: resource.as_str().into(),
            os: "Linux".into(),
            kernel: "bench".into(),
            vcpus: 2,
            memory_bytes: 1 << 30,
        },
        spool_id: SPOOL_ID,
        sessions: Vec::new(),
    }
}

// ---------------------------------------------------------------------------
// Child processes

/// A server child process (the broker binary or the echo server).
struct Server {
    /// The process; killed if dropped without [`Server::stop`].
    child: tokio::process::Child,
    /// Its pid, for `/proc/PID/status` and `kill`.
    pid: u32,
    /// Where its QUIC endpoint listens.
    addr: SocketAddr,
    /// The broker's admin socket; `None` for the echo server.
    admin_socket: Option<PathBuf>,
    /// Last lines of its log output, to explain a failure.
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Server {
    fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("read /proc/PID/status")?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("no VmRSS line")?;
        line.trim_start_matches("VmRSS:")
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .context("parse VmRSS")
    }

    fn tail(&self) -> String {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Stops the server the way it is meant to stop (the broker drains on
    /// SIGTERM; the echo server exits when its stdin closes), then waits;
    /// SIGKILL if it does not exit.
    async fn stop(mut self) -> Result<()> {
        if let Some(stdin) = self.child.stdin.take() {
            drop(stdin);
        } else {
            let status = tokio::process::Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status()
                .await
                .context("run kill")?;
            if !status.success() {
                bail!("kill -TERM {} failed", self.pid);
            }
        }
        match tokio::time::timeout(PATIENCE, self.child.wait()).await {
            Ok(status) => {
                let status = status.context("wait for server")?;
                if !status.success() {
                    bail!("server exited with {status}:\n{}", self.tail());
                }
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("server did not stop within {PATIENCE:?}:\n{}", self.tail())
            }
        }
    }
}

/// Removes terminal colour sequences so log fields can be parsed.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Keeps reading a child's output (so its pipe never fills), remembers the
/// last lines, and reports the first line that `ready` recognises.
fn watch_output<R>(
    out: R,
    tracker: &TaskTracker,
    ready: impl Fn(&str) -> Option<SocketAddr> + Send + 'static,
) -> (oneshot::Receiver<SocketAddr>, Arc<Mutex<VecDeque<String>>>)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
    let keep = tail.clone();
    tracker.spawn(async move {
        let mut tx = Some(tx);
        let mut lines = BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let line = strip_ansi(&line);
            if let Some(addr) = ready(&line) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr);
                }
            }
            if let Ok(mut t) = keep.lock() {
                if t.len() == STDERR_TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
    });
    (rx, tail)
}

/// Starts the real `ferry-broker run` on a fresh state directory; returns once
/// it logged its bound agent address.
async fn start_broker(
    bin: &Path,
    root: &Path,
    pki_dir: &Path,
    extra_config: &str,
    tracker: &TaskTracker,
) -> Result<Server> {
    std::fs::create_dir_all(root).context("create broker dir")?;
    let admin_socket = root.join("admin.sock");
    // Health reports are not part of this benchmark: a long interval keeps the
    // silent-agent timer from firing during it.
    let config = format!(
        "state_dir = {:?}\npki_dir = {:?}\nlisten = \"127.0.0.1:0\"\nadmin_socket = {:?}\n\
         health_interval = \"10m\"\nmissed_health_limit = 3\nshutdown_grace = \"5s\"\n",
        root.join("state").display().to_string(),
        pki_dir.display().to_string(),
        admin_socket.display().to_string(),
    );
    let config = format!("{config}{extra_config}");
    let config_path = root.join("broker.toml");
    std::fs::write(&config_path, config).context("write broker config")?;
    // Readiness and the bound address come from the READY=1 notification, as
    // systemd would get them (its STATUS line carries the agent address).
    let notify = ferry_tests::notify::FakeNotifySocket::bind(root).context("bind notify socket")?;
    let mut child = tokio::process::Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("NOTIFY_SOCKET", notify.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let pid = child.id().context("broker pid")?;
    let stderr = child.stderr.take().context("broker stderr")?;
    let (_, tail) = watch_output(stderr, tracker, |_| None);
    let ready = tokio::task::spawn_blocking(move || notify.wait_for("READY=1", PATIENCE))
        .await
        .context("wait for READY=1")?;
    let addr = match ready
        .map_err(anyhow::Error::from)
        .and_then(|lines| ferry_tests::procs::ready_addr(&lines))
    {
        Ok(addr) => addr,
        Err(e) => {
            let tail = tail
                .lock()
                .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"));
            bail!(
                "broker did not become ready ({e:#}):\n{}",
                tail.unwrap_or_default()
            );
        }
    };
    Ok(Server {
        child,
        pid,
        addr,
        admin_socket: Some(admin_socket),
        tail,
    })
}

/// Starts this binary as the echo server child process.
async fn start_echo(pki_dir: &Path, tracker: &TaskTracker) -> Result<Server> {
    let exe = std::env::current_exe().context("current_exe")?;
    let mut child = tokio::process::Command::new(exe)
        .arg(ECHO_FLAG)
        .arg(pki_dir)
        // The child exits when its stdin closes, i.e. when this process goes away.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("spawn echo server")?;
    let pid = child.id().context("echo pid")?;
    let stdout = child.stdout.take().context("echo stdout")?;
    let (ready, tail) = watch_output(stdout, tracker, |line| {
        line.strip_prefix(echo::READY_PREFIX)?.trim().parse().ok()
    });
    let addr = tokio::time::timeout(PATIENCE, ready)
        .await
        .map_err(|_| anyhow!("echo server did not become ready"))?
        .context("echo server exited before it was ready")?;
    Ok(Server {
        child,
        pid,
        addr,
        admin_socket: None,
        tail,
    })
}

async fn broker_status(server: &Server) -> Result<ferry_common::admin::StatusReport> {
    let path = server.admin_socket.as_deref().context("not a broker")?;
    match admin_request(path, AdminRequestV1::Status).await? {
        AdminResponseV1::Status(s) => Ok(s),
        other => bail!("unexpected admin answer {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Raw agent clients

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The real protocol against the broker: acks are `Ack { up_to }`.
    Broker,
    /// The same frames against the echo server: the n-th echoed frame acks seq n.
    Echo,
}

/// An acknowledgement as the reader task saw it: everything up to `.0` is
/// acknowledged, received at `.1`.
type AckMsg = std::result::Result<(u64, Instant), String>;

/// One connected benchmark client.
struct Link {
    /// Keeps the connection open while the link lives.
    conn: quinn::Connection,
    /// Where event frames are written.
    send: quinn::SendStream,
    /// Acks read (and timestamped on arrival) by the link's reader task.
    acks: mpsc::Receiver<AckMsg>,
    /// Sequence number of the next event.
    next_seq: u64,
    /// Redirects followed to reach the broker that welcomed it.
    redirects: u32,
}

fn client_endpoints(n: usize) -> Result<Vec<quinn::Endpoint>> {
    (0..n.max(1))
        .map(|_| {
            quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))
                .context("bind client endpoint")
        })
        .collect()
}

async fn connect(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    resource: ResourceId,
    addr: SocketAddr,
    kind: Kind,
    window: usize,
    tracker: TaskTracker,
) -> Result<Link> {
    let mut addr = addr;
    let (mut redirects, mut not_owner) = (0, 0);
    let (conn, send, recv, next_seq) = loop {
        let conn = endpoint
            .connect_with(config.clone(), addr, "localhost")?
            .await
            .context("QUIC handshake")?;
        let (mut send, mut recv) = conn.open_bi().await.context("open stream")?;
        if kind == Kind::Echo {
            break (conn, send, recv, 1);
        }
        send.write_all(&frame::preamble(PROTOCOL_VERSION)).await?;
        match PreambleReply::read(&mut recv).await? {
            PreambleReply::Accepted { .. } => {}
            other => bail!("preamble refused: {other:?}"),
        }
        let hello = AgentMessage::V1(AgentToBroker::Hello(hello(&resource)));
        frame::write_message(&mut send, &hello, MAX_FRAME_LEN).await?;
        match frame::read_message::<BrokerMessage, _>(&mut recv, MAX_FRAME_LEN).await? {
            Some(BrokerMessage::V1(BrokerToAgent::Welcome(w))) => {
                break (conn, send, recv, w.last_recorded_seq + 1);
            }
            // Brokers sharing a store: the group's owner is elsewhere. A real
            // agent follows at most `MAX_REDIRECTS` in a row; so does this one.
            Some(BrokerMessage::V1(BrokerToAgent::Redirect { address, .. }))
                if redirects < MAX_REDIRECTS =>
            {
                conn.close(0u32.into(), b"redirected");
                redirects += 1;
                addr = address
                    .parse()
                    .with_context(|| format!("{resource}: redirect to {address:?}"))?;
            }
            // No broker holds the group's lease yet (brokers that just
            // started, a hand-over): a real agent comes back; so does this one.
            Some(BrokerMessage::V1(BrokerToAgent::Refused(r)))
                if r.code == RefusalCode::NotOwner && not_owner < MAX_NOT_OWNER =>
            {
                conn.close(0u32.into(), b"nobody owns the group yet");
                not_owner += 1;
                tokio::time::sleep(NOT_OWNER_PAUSE).await;
            }
            other => bail!("{resource}: expected Welcome, got {other:?}"),
        }
    };
    // A window's worth of acks (plus a refusal) always fits.
    let (tx, acks) = mpsc::channel(window + 2);
    tracker.spawn(read_acks(recv, kind, tx));
    Ok(Link {
        conn,
        send,
        acks,
        next_seq,
        redirects,
    })
}

/// Reads acknowledgements for the life of a link, stamping each on arrival so
/// the measured latency does not include the time the driver takes to look.
async fn read_acks(mut recv: quinn::RecvStream, kind: Kind, tx: mpsc::Sender<AckMsg>) {
    let mut echoed = 0u64;
    loop {
        let item = match kind {
            Kind::Broker => {
                match frame::read_message::<BrokerMessage, _>(&mut recv, MAX_FRAME_LEN).await {
                    Ok(Some(BrokerMessage::V1(BrokerToAgent::Ack { up_to }))) => {
                        Ok((up_to, Instant::now()))
                    }
                    // Sent once after Welcome (the ticket key); not an ack.
                    Ok(Some(BrokerMessage::V1(BrokerToAgent::TicketKey { .. }))) => continue,
                    // A group's agents get its policy once after Welcome; the
                    // benchmark agents leave it unanswered (not part of the figure).
                    Ok(Some(BrokerMessage::V1(BrokerToAgent::Command { .. }))) => continue,
                    Ok(Some(BrokerMessage::V1(other))) => Err(format!("broker sent {other:?}")),
                    Ok(None) => Err("broker closed the stream".into()),
                    Err(e) => Err(format!("read from broker: {e}")),
                }
            }
            Kind::Echo => match frame::read_frame(&mut recv, MAX_FRAME_LEN).await {
                Ok(Some(_)) => {
                    echoed += 1;
                    Ok((echoed, Instant::now()))
                }
                Ok(None) => Err("echo server closed the stream".into()),
                Err(e) => Err(format!("read from echo server: {e}")),
            },
        };
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// Connects `ids.len()` agents, at most [`CONNECT_CONCURRENCY`] handshakes at once,
/// spread over `endpoints`.
async fn connect_all(
    endpoints: &[quinn::Endpoint],
    ids: &[Identity],
    addr: SocketAddr,
    kind: Kind,
    window: usize,
    tracker: &TaskTracker,
) -> Result<Vec<Link>> {
    let mut links = Vec::with_capacity(ids.len());
    let mut pending: JoinSet<std::result::Result<Result<Link>, tokio::time::error::Elapsed>> =
        JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        if pending.len() >= CONNECT_CONCURRENCY {
            if let Some(r) = pending.join_next().await {
                links.push(r.context("connect task")?.context("connect in time")??);
            }
        }
        let endpoint = endpoints[i % endpoints.len()].clone();
        pending.spawn(tokio::time::timeout(
            PATIENCE,
            connect(
                endpoint,
                id.config.clone(),
                id.resource.clone(),
                addr,
                kind,
                window,
                tracker.clone(),
            ),
        ));
    }
    while let Some(r) = pending.join_next().await {
        links.push(r.context("connect task")?.context("connect in time")??);
    }
    Ok(links)
}

/// What one agent saw in one repetition.
struct AgentRep {
    /// Events whose ack arrived inside the measured window.
    counted: u64,
    /// Send-to-ack times of those events.
    latencies: Vec<Duration>,
    /// Bytes of the frames sent, for the average frame size.
    bytes: u64,
    /// Events sent in the repetition.
    sent: u64,
}

/// Window within which acks count.
#[derive(Clone, Copy)]
struct Window {
    /// End of the warm-up.
    from: Instant,
    /// End of the measurement; no new event is sent after it.
    until: Instant,
}

/// Sends events with at most `window` unacknowledged until `w.until` (or
/// `max_events`), then waits for every ack. Returns the link for the next rep.
async fn drive(
    mut link: Link,
    window: usize,
    w: Window,
    max_events: u64,
) -> (Link, Result<AgentRep>) {
    let result = drive_inner(&mut link, window, w, max_events).await;
    (link, result)
}

async fn drive_inner(
    link: &mut Link,
    window: usize,
    w: Window,
    max_events: u64,
) -> Result<AgentRep> {
    let mut outstanding: VecDeque<(u64, Instant)> = VecDeque::with_capacity(window);
    let mut rep = AgentRep {
        counted: 0,
        latencies: Vec::new(),
        bytes: 0,
        sent: 0,
    };
    let mut stopped = false;
    let at = now_millis();
    let mut settle = |msg: AckMsg, outstanding: &mut VecDeque<(u64, Instant)>| -> Result<()> {
        let (up_to, acked_at) = msg.map_err(|e| anyhow!(e))?;
        while let Some(&(seq, sent_at)) = outstanding.front() {
            if seq > up_to {
                break;
            }
            outstanding.pop_front();
            if acked_at >= w.from && acked_at <= w.until {
                rep.counted += 1;
                rep.latencies
                    .push(acked_at.saturating_duration_since(sent_at));
            }
        }
        Ok(())
    };
    let mut bytes = 0u64;
    let mut sent = 0u64;
    loop {
        while let Ok(msg) = link.acks.try_recv() {
            settle(msg, &mut outstanding)?;
        }
        if !stopped && outstanding.len() < window {
            if Instant::now() >= w.until || sent >= max_events {
                stopped = true;
                continue;
            }
            let seq = link.next_seq;
            let frame = event_frame(seq, at)?;
            outstanding.push_back((seq, Instant::now()));
            link.send.write_all(&frame).await.context("send event")?;
            link.next_seq += 1;
            sent += 1;
            bytes += frame.len() as u64;
            continue;
        }
        if outstanding.is_empty() {
            break;
        }
        let msg = tokio::time::timeout(PATIENCE, link.acks.recv())
            .await
            .map_err(|_| anyhow!("no ack within {PATIENCE:?}"))?
            .context("ack reader ended")?;
        settle(msg, &mut outstanding)?;
    }
    rep.bytes = bytes;
    rep.sent = sent;
    Ok(rep)
}

/// One repetition over all links; returns them for the next one.
async fn rep_over(
    links: Vec<Link>,
    plan: &Plan,
    tracker: &TaskTracker,
) -> Result<(Vec<Link>, Rep, u64, u64)> {
    let start = Instant::now();
    let w = Window {
        from: start + plan.warmup,
        until: start + plan.warmup + plan.measure,
    };
    let handles: Vec<_> = links
        .into_iter()
        .map(|l| tracker.spawn(drive(l, plan.window, w, plan.max_events_per_agent)))
        .collect();
    let mut links = Vec::with_capacity(handles.len());
    let mut latencies = Vec::new();
    let (mut counted, mut bytes, mut sent) = (0u64, 0u64, 0u64);
    let mut first_err = None;
    for h in handles {
        let (link, r) = h.await.context("agent task")?;
        links.push(link);
        match r {
            Ok(r) => {
                counted += r.counted;
                bytes += r.bytes;
                sent += r.sent;
                latencies.extend(r.latencies);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    latencies.sort();
    let rep = Rep {
        per_sec: counted as f64 / plan.measure.as_secs_f64(),
        p50: percentile(&latencies, 50),
        p99: percentile(&latencies, 99),
        counted,
    };
    Ok((links, rep, bytes, sent))
}

fn close_links(links: Vec<Link>) {
    for l in links {
        l.conn.close(0u32.into(), b"benchmark done");
    }
}

async fn throughput(
    plan: &Plan,
    broker_bin: &Path,
    root: &Path,
    pki_dir: &Path,
    ids: &[Identity],
    tracker: &TaskTracker,
) -> Result<Throughput> {
    let broker = start_broker(
        broker_bin,
        &root.join("broker-throughput"),
        pki_dir,
        "",
        tracker,
    )
    .await?;
    let echo = start_echo(pki_dir, tracker).await?;
    let endpoints = client_endpoints(plan.client_endpoints)?;
    let ids = &ids[..plan.agents];
    let mut broker_links = connect_all(
        &endpoints,
        ids,
        broker.addr,
        Kind::Broker,
        plan.window,
        tracker,
    )
    .await
    .context("connect agents to the broker")?;
    let mut echo_links = connect_all(&endpoints, ids, echo.addr, Kind::Echo, plan.window, tracker)
        .await
        .context("connect clients to the echo server")?;
    println!(
        "throughput: {} agents connected to the broker (pid {}) and to the echo server (pid {})",
        plan.agents, broker.pid, echo.pid
    );
    let mut out = Throughput {
        broker: Vec::new(),
        echo: Vec::new(),
        frame_bytes: 0.0,
        recorded: 0,
        sent: 0,
    };
    let (mut bytes, mut frames) = (0u64, 0u64);
    for i in 0..plan.reps {
        // Alternate which goes first so a slow drift of the machine favours neither.
        let order = if i % 2 == 0 {
            [Kind::Broker, Kind::Echo]
        } else {
            [Kind::Echo, Kind::Broker]
        };
        for kind in order {
            let links = match kind {
                Kind::Broker => std::mem::take(&mut broker_links),
                Kind::Echo => std::mem::take(&mut echo_links),
            };
            let (links, rep, b, s) = rep_over(links, plan, tracker)
                .await
                .with_context(|| format!("{kind:?} rep {i}"))?;
            println!(
                "  rep {i} {:<6}: {:>9.0} events/s  p50 {:>9}  p99 {:>9}  ({} counted)",
                format!("{kind:?}"),
                rep.per_sec,
                ms(rep.p50),
                ms(rep.p99),
                rep.counted
            );
            bytes += b;
            frames += s;
            match kind {
                Kind::Broker => {
                    out.broker.push(rep);
                    out.sent += s;
                    broker_links = links;
                }
                Kind::Echo => {
                    out.echo.push(rep);
                    echo_links = links;
                }
            }
        }
    }
    out.frame_bytes = bytes as f64 / frames.max(1) as f64;
    out.recorded = broker_status(&broker).await?.events_recorded;
    if out.recorded != out.sent {
        bail!(
            "the broker acknowledged {} events but recorded {}",
            out.sent,
            out.recorded
        );
    }
    close_links(broker_links);
    close_links(echo_links);
    for e in &endpoints {
        let _ = tokio::time::timeout(PATIENCE, e.wait_idle()).await;
    }
    broker.stop().await.context("stop broker")?;
    echo.stop().await.context("stop echo server")?;
    Ok(out)
}

async fn memory(
    plan: &Plan,
    broker_bin: &Path,
    root: &Path,
    pki_dir: &Path,
    ids: &[Identity],
    tracker: &TaskTracker,
) -> Result<Memory> {
    let broker = start_broker(
        broker_bin,
        &root.join("broker-memory"),
        pki_dir,
        "",
        tracker,
    )
    .await?;
    let idle_kib = broker.rss_kib()?;
    let endpoints = client_endpoints(plan.client_endpoints)?;
    let ids = &ids[..plan.memory_agents];
    let t = Instant::now();
    let links = connect_all(
        &endpoints,
        ids,
        broker.addr,
        Kind::Broker,
        plan.window,
        tracker,
    )
    .await
    .context("connect idle agents")?;
    let connected = broker_status(&broker).await?.agents_connected;
    let loaded_kib = broker.rss_kib()?;
    println!(
        "memory: {} agents registered in {:.1} s; broker RSS {idle_kib} -> {loaded_kib} KiB",
        links.len(),
        t.elapsed().as_secs_f64()
    );
    if connected != plan.memory_agents as u64 {
        bail!(
            "broker reports {connected} agents connected, expected {}",
            plan.memory_agents
        );
    }
    close_links(links);
    for e in &endpoints {
        let _ = tokio::time::timeout(PATIENCE, e.wait_idle()).await;
    }
    broker.stop().await.context("stop broker")?;
    Ok(Memory {
        agents: plan.memory_agents,
        idle_kib,
        loaded_kib,
        connected,
    })
}

// ---------------------------------------------------------------------------
// Store group commit

async fn store_rep(path: &Path, max_batch: usize, writers_n: usize, plan: &Plan) -> Result<Rep> {
    let store = Store::open(
        path,
        StoreOptions {
            max_batch,
            queue_len: WRITE_QUEUE_LEN,
            ..StoreOptions::default()
        },
    )?;
    let start = Instant::now();
    let until = start + plan.store_measure;
    let mut writers = JoinSet::new();
    for w in 0..writers_n {
        let store = store.clone();
        let max = plan.store_max_per_writer;
        writers.spawn(async move {
            let resource: ResourceId = format!("writer-{w}").parse()?;
            let mut latencies = Vec::new();
            for seq in 1..=max {
                if Instant::now() >= until {
                    break;
                }
                let t = Instant::now();
                let out = store
                    .record_events(
                        &resource,
                        SPOOL_ID,
                        vec![event(seq, now_millis())?],
                        now_millis(),
                    )
                    .await?;
                let done = Instant::now();
                if out.recorded != 1 {
                    bail!("{resource} seq {seq}: recorded {out:?}");
                }
                if done <= until {
                    latencies.push(done - t);
                }
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    let mut first_err = None;
    while let Some(r) = writers.join_next().await {
        match r.context("writer task").and_then(|r| r) {
            Ok(l) => latencies.extend(l),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    store.close().await;
    if let Some(e) = first_err {
        return Err(e);
    }
    latencies.sort();
    Ok(Rep {
        per_sec: latencies.len() as f64 / plan.store_measure.as_secs_f64(),
        p50: percentile(&latencies, 50),
        p99: percentile(&latencies, 99),
        counted: latencies.len() as u64,
    })
}

async fn store_bench(plan: &Plan, root: &Path) -> Result<StoreFigures> {
    let dir = root.join("store");
    std::fs::create_dir_all(&dir).context("create store dir")?;
    let mut out: StoreFigures = plan
        .store_writers
        .iter()
        .map(|&writers| StoreFigure {
            writers,
            group: Vec::new(),
            single: Vec::new(),
        })
        .collect();
    println!("store: {:?} writers", plan.store_writers);
    // Every configuration once per repetition, in an order that alternates,
    // so a noisy moment of the machine hits all of them alike.
    for i in 0..plan.store_reps {
        for f in out.iter_mut() {
            let order = if i % 2 == 0 {
                [DEFAULT_MAX_BATCH, 1]
            } else {
                [1, DEFAULT_MAX_BATCH]
            };
            for batch in order {
                let path = dir.join(format!("w{}-b{batch}-r{i}.db", f.writers));
                let rep = store_rep(&path, batch, f.writers, plan).await?;
                println!(
                    "  rep {i} writers {:>3} max_batch {batch:>3}: {:>8.0} records/s  p50 {:>9}  p99 {:>9}",
                    f.writers,
                    rep.per_sec,
                    ms(rep.p50),
                    ms(rep.p99)
                );
                if batch == 1 {
                    f.single.push(rep);
                } else {
                    f.group.push(rep);
                }
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Echo server (child process)

mod echo {
    //! The baseline: a bare quinn server with the broker's TLS and transport
    //! configuration that writes every frame it reads back, unchanged. It reads
    //! frames (length checked like the broker) but decodes and stores nothing.

    use super::*;

    /// First line on stdout once bound, followed by the address.
    pub const READY_PREFIX: &str = "echo-ready ";

    pub fn main(pki_dir: &Path) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("start runtime")?;
        runtime.block_on(serve(pki_dir))
    }

    async fn serve(pki_dir: &Path) -> Result<()> {
        let endpoint = quinn::Endpoint::server(
            pki::server_config(pki_dir)?,
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )
        .context("bind echo endpoint")?;
        println!("{READY_PREFIX}{}", endpoint.local_addr()?);
        use std::io::Write;
        std::io::stdout().flush()?;

        let shutdown = CancellationToken::new();
        // The parent closes our stdin to stop us (or dies, which does the same).
        let stdin_watch = {
            let shutdown = shutdown.clone();
            std::thread::spawn(move || {
                let mut sink = Vec::new();
                let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
                shutdown.cancel();
            })
        };
        let tracker = TaskTracker::new();
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                i = endpoint.accept() => i,
            };
            let Some(incoming) = incoming else { break };
            tracker.spawn(connection(incoming, tracker.clone()));
        }
        endpoint.close(0u32.into(), b"echo server stopped");
        tracker.close();
        let _ = tokio::time::timeout(PATIENCE, tracker.wait()).await;
        let _ = tokio::time::timeout(PATIENCE, endpoint.wait_idle()).await;
        let _ = stdin_watch.join();
        Ok(())
    }

    async fn connection(incoming: quinn::Incoming, tracker: TaskTracker) {
        let Ok(conn) = incoming.await else { return };
        while let Ok((send, recv)) = conn.accept_bi().await {
            tracker.spawn(stream(send, recv));
        }
    }

    async fn stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        while let Ok(Some(payload)) = frame::read_frame(&mut recv, MAX_FRAME_LEN).await {
            let Ok(len) = u32::try_from(payload.len()) else {
                return;
            };
            let mut out = Vec::with_capacity(frame::HEADER_LEN + payload.len());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&payload);
            if send.write_all(&out).await.is_err() {
                return;
            }
        }
    }
}
