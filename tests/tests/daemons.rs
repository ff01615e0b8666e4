//! The daemons as processes on an operator's first day: one daemon per
//! state directory, configuration and identity errors that exit 78 before
//! anything connects, a closed or full stderr that neither kills nor
//! blocks them, and a peer that dies without a word noticed within about a
//! health interval on both sides.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use ferry_broker::pki;
use ferry_tests::bins::bin;
use ferry_tests::harness::PATIENCE;
use ferry_tests::procs::{
    ferryctl_json, run, AgentProcess, BrokerFiles, BrokerProcess, Launch, StderrTo,
};
use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixStream;

/// `ferry-agent --config CONFIG run` (or `ferry-broker run --config`) to its
/// end: status and stderr.
async fn run_daemon(program: &str, config: &Path) -> anyhow::Result<(ExitStatus, String)> {
    let out = match program {
        "ferry-agent" => {
            run(
                &bin(program),
                ["--config".as_ref(), config.as_os_str(), "run".as_ref()],
            )
            .await?
        }
        _ => {
            run(
                &bin(program),
                ["run".as_ref(), "--config".as_ref(), config.as_os_str()],
            )
            .await?
        }
    };
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Copies a config file, replacing `from` with `to` in its text.
fn config_variant(config: &Path, name: &str, from: &str, to: &str) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(config)?;
    anyhow::ensure!(text.contains(from), "{from} not in {text}");
    let path = config.with_file_name(name);
    std::fs::write(&path, text.replace(from, to))?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_a_state_directory_is_refused_naming_the_first() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    let agent = AgentProcess::start(&files, "host-1", broker.agent_addr).await?;
    agent.wait_synced().await?;

    // Another port and another admin socket, the same state directory.
    let second = config_variant(
        &files.dir.join("broker.toml"),
        "broker-2.toml",
        "admin.sock",
        "admin-2.sock",
    )?;
    let (status, stderr) = run_daemon("ferry-broker", &second).await?;
    assert_eq!(status.code(), Some(75), "{stderr}");
    let pid = broker.daemon.pid()?;
    assert!(stderr.contains(&format!("pid {pid}")), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    // It stopped before it bound anything or started a group actor.
    assert!(!files.dir.join("admin-2.sock").exists());
    assert!(!stderr.contains("group actors started"), "{stderr}");

    // The same for a second agent on the first agent's spool.
    let second = config_variant(&agent.config, "agent-2.toml", "agent.sock", "agent-2.sock")?;
    let (status, stderr) = run_daemon("ferry-agent", &second).await?;
    assert_eq!(status.code(), Some(75), "{stderr}");
    let pid = agent.daemon.pid()?;
    assert!(stderr.contains(&format!("pid {pid}")), "{stderr}");
    assert!(!agent.local_socket.with_file_name("agent-2.sock").exists());

    // The first ones were not disturbed.
    agent
        .cli(&[
            "session",
            "start",
            "--trusted",
            "--session",
            "s1",
            "--user",
            "alice",
        ])
        .await?;
    let s = agent.wait_synced().await?;
    assert_eq!(s["spooled"], 0, "{s}");
    let sessions = ferryctl_json(&files.admin_socket, &["sessions", "list"]).await?;
    assert_eq!(sessions.as_array().map(Vec::len), Some(1), "{sessions}");

    // Their logs went to files: plain text, no terminal colour codes.
    for log in [broker.daemon.log(), agent.daemon.log()] {
        assert!(log.contains("INFO"), "{log}");
        assert!(!log.contains('\u{1b}'), "ANSI codes in {log}");
    }
    Ok(())
}

/// An agent config for `resource` with the certificate from `id` and the key
/// and CA from `key_dir`, pointing at a broker that is never reached.
fn agent_config(
    dir: &Path,
    name: &str,
    resource: &str,
    id: &Path,
    key_dir: &Path,
) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "resource = {resource:?}\nbroker_addr = \"127.0.0.1:9\"\nca_cert = {ca:?}\n\
         cert = {cert:?}\nkey = {key:?}\nstate_dir = {state:?}\nlocal_socket = {sock:?}\n",
        ca = key_dir.join(pki::CA_CERT),
        cert = id.join(pki::AGENT_CERT),
        key = key_dir.join(pki::AGENT_KEY),
        state = dir.join(format!("{resource}-state")),
        sock = dir.join(format!("{resource}.sock")),
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_configuration_errors_exit_78_before_connecting() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let (one, two) = (tmp.path().join("id-1"), tmp.path().join("id-2"));
    files.issue_agent("host-1", &one).await?;
    files.issue_agent("host-2", &two).await?;

    let cases = [
        // No certificate at all: a fresh install.
        (
            agent_config(
                tmp.path(),
                "no-cert",
                "host-1",
                &tmp.path().join("none"),
                &one,
            )?,
            vec!["none/agent.pem", "ferryctl pki issue-agent"],
        ),
        // host-2's certificate in host-1's config.
        (
            agent_config(tmp.path(), "other-cert", "host-1", &two, &two)?,
            vec!["names host-2", "resource = \"host-1\""],
        ),
        // host-1's certificate with host-2's key.
        (
            agent_config(tmp.path(), "other-key", "host-1", &one, &two)?,
            vec!["do not belong together", "id-2/agent-key.pem"],
        ),
    ];
    for (config, expected) in cases {
        let (status, stderr) = run_daemon("ferry-agent", &config).await?;
        assert_eq!(status.code(), Some(78), "{stderr}");
        for text in expected {
            assert!(stderr.contains(text), "{text} not in {stderr}");
        }
    }

    // A broker without its PKI files.
    let config = files.write_config("127.0.0.1:0".parse()?)?;
    let config = config_variant(&config, "broker-nopki.toml", "/pki", "/no-pki")?;
    let (status, stderr) = run_daemon("ferry-broker", &config).await?;
    assert_eq!(status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("no-pki/ca.pem"), "{stderr}");
    assert!(stderr.contains("ferryctl pki init"), "{stderr}");

    // Every unknown key and wrong type of a config at once.
    let config = tmp.path().join("bad.toml");
    std::fs::write(
        &config,
        "resource = \"host-1\"\nbroker_addr = 7443\nbroker_nam = \"x\"\n",
    )?;
    let (status, stderr) = run_daemon("ferry-agent", &config).await?;
    assert_eq!(status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("broker_addr"), "{stderr}");
    assert!(stderr.contains("broker_nam"), "{stderr}");
    Ok(())
}

/// SIGTERM, then the exit status within `limit`.
async fn terminate(daemon: &mut ferry_tests::procs::Daemon) -> anyhow::Result<ExitStatus> {
    daemon.signal("TERM").await?;
    daemon.wait(PATIENCE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_neither_kills_nor_blocks_the_daemons() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let pipe = Launch {
        stderr: StderrTo::Pipe,
        ..Launch::default()
    };
    let (mut broker, stderr) =
        BrokerProcess::launch(&files, "127.0.0.1:0".parse()?, 0, &pipe).await?;
    // The reader goes away, as when journald restarts.
    drop(stderr);
    let (mut agent, stderr) =
        AgentProcess::launch(&files, "host-1", broker.agent_addr, &pipe).await?;
    drop(stderr);
    // Both log: the connection, sessions, acknowledgements.
    for s in ["s1", "s2"] {
        agent
            .cli(&[
                "session",
                "start",
                "--trusted",
                "--session",
                s,
                "--user",
                "alice",
            ])
            .await?;
    }
    agent.cli(&["session", "end", "--session", "s1"]).await?;
    let s = agent.wait_synced().await?;
    assert_eq!(s["spooled"], 0, "{s}");
    let sessions = ferryctl_json(&files.admin_socket, &["sessions", "list", "--all"]).await?;
    assert_eq!(sessions.as_array().map(Vec::len), Some(2), "{sessions}");

    let status = terminate(&mut agent.daemon).await?;
    assert!(status.success(), "agent: {status}");
    let status = terminate(&mut broker.daemon).await?;
    assert!(status.success(), "broker: {status}");
    Ok(())
}

/// A stream socket (what journald gives a service) whose reader never
/// reads, already full: every write to the first end would block.
fn full_socket() -> anyhow::Result<(std::os::fd::OwnedFd, UnixStream)> {
    let (writer, reader) = UnixStream::pair()?;
    writer.set_nonblocking(true)?;
    let chunk = [b'x'; 4096];
    let mut filled = 0usize;
    loop {
        match (&writer).write(&chunk) {
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::ensure!(filled > 0, "nothing fitted in the socket");
    // Non-blocking is a property of the open socket, which the daemon shares.
    writer.set_nonblocking(false)?;
    Ok((writer.into(), reader))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stderr_does_not_block_work_or_shutdown() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let (broker_err, _broker_reader) = full_socket()?;
    let (agent_err, _agent_reader) = full_socket()?;
    let full = |fd| Launch {
        stderr: StderrTo::Fd(fd),
        env: vec![("RUST_LOG".into(), "debug".into())],
        ..Launch::default()
    };
    let (mut broker, _) =
        BrokerProcess::launch(&files, "127.0.0.1:0".parse()?, 0, &full(broker_err)).await?;
    let (mut agent, _) =
        AgentProcess::launch(&files, "host-1", broker.agent_addr, &full(agent_err)).await?;
    for s in ["s1", "s2", "s3"] {
        agent
            .cli(&[
                "session",
                "start",
                "--trusted",
                "--session",
                s,
                "--user",
                "alice",
            ])
            .await?;
    }
    let s = agent.wait_synced().await?;
    assert_eq!(s["spooled"], 0, "{s}");
    let sessions = ferryctl_json(&files.admin_socket, &["sessions", "list"]).await?;
    assert_eq!(sessions.as_array().map(Vec::len), Some(3), "{sessions}");

    let status = terminate(&mut agent.daemon).await?;
    assert!(status.success(), "agent: {status}");
    let status = terminate(&mut broker.daemon).await?;
    assert!(status.success(), "broker: {status}");
    Ok(())
}

/// Polls `probe` until it is true; the time it took, or an error after `limit`.
async fn time_until<F, Fut>(limit: Duration, mut probe: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    loop {
        if probe().await? {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(start.elapsed() < limit, "not true after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_dies_without_a_word_is_noticed_within_a_few_seconds() -> anyhow::Result<()> {
    // The processes' health interval is 1 s: the link's idle timeout is then
    // its floor of 2 s. Before, QUIC waited out 30 s; 15 s is generous for
    // a loaded machine and still tells the two apart.
    const BOUND: Duration = Duration::from_secs(15);
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let mut broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    let mut h1 = AgentProcess::start(&files, "host-1", broker.agent_addr).await?;
    let h2 = AgentProcess::start(&files, "host-2", broker.agent_addr).await?;
    h1.wait_synced().await?;
    h2.wait_synced().await?;
    let socket = files.admin_socket.clone();
    let connected = |resources: &Value, name: &str| {
        resources
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["resource"] == name))
            .map(|r| r["connected"] == true)
    };
    let all = ferryctl_json(&socket, &["resources", "list"]).await?;
    assert_eq!(connected(&all, "host-1"), Some(true), "{all}");

    // A host that dies: the broker sees its agent gone.
    h1.daemon.crash().await?;
    let took = time_until(PATIENCE, || {
        let socket = socket.clone();
        async move {
            let all = ferryctl_json(&socket, &["resources", "list"]).await?;
            Ok(connected(&all, "host-1") == Some(false))
        }
    })
    .await?;
    assert!(took < BOUND, "the broker took {took:?}");

    // A broker that dies: the agent says so.
    broker.daemon.crash().await?;
    let took = time_until(PATIENCE, || {
        let h2 = &h2;
        async move {
            let out = h2.cli(&["status", "--json"]).await?;
            let status: Value = serde_json::from_str(&out)?;
            Ok(status["connected"] == false)
        }
    })
    .await?;
    assert!(took < BOUND, "the agent took {took:?}");
    Ok(())
}

/// `ferry-agent --config CONFIG ARGS...` run to its end.
async fn agent_cli(agent: &AgentProcess, args: &[&str]) -> anyhow::Result<std::process::Output> {
    let mut all: Vec<&std::ffi::OsStr> = vec!["--config".as_ref(), agent.config.as_os_str()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    run(&bin("ferry-agent"), all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_reports_say_whether_the_broker_has_them_and_ids_are_used_once(
) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let mut broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    let agent = AgentProcess::start(&files, "host-1", broker.agent_addr).await?;
    agent.wait_synced().await?;

    let out = agent
        .cli(&[
            "session",
            "start",
            "--trusted",
            "--session",
            "s-offline-1",
            "--user",
            "alice",
        ])
        .await?;
    assert!(
        out.contains("s-offline-1 started: recorded by the broker (seq 1)"),
        "{out}"
    );
    let out = agent
        .cli(&[
            "session",
            "start",
            "--trusted",
            "--session",
            "s2",
            "--user",
            "bob",
            "--json",
        ])
        .await?;
    let v: Value = serde_json::from_str(&out)?;
    assert_eq!(
        v,
        serde_json::json!({"session": "s2", "event": "started", "seq": 2, "acknowledged": true})
    );
    agent
        .cli(&["session", "end", "--session", "s-offline-1"])
        .await?;

    // An ended session's id is not started again.
    let out = agent_cli(
        &agent,
        &[
            "session",
            "start",
            "--trusted",
            "--session",
            "s-offline-1",
            "--user",
            "carol",
        ],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("session s-offline-1 already ended on this host")
            && stderr.contains("new id"),
        "{stderr}"
    );

    // The broker is gone: reports are durable, and say they wait.
    broker.daemon.crash().await?;
    time_until(PATIENCE, || async {
        let status: Value = serde_json::from_str(&agent.cli(&["status", "--json"]).await?)?;
        Ok(status["connected"] == false)
    })
    .await?;
    let out = agent
        .cli(&[
            "session",
            "start",
            "--trusted",
            "--session",
            "s3",
            "--user",
            "dave",
        ])
        .await?;
    assert!(
        out.contains("s3 started: spooled (seq 4): the broker has not acknowledged it yet"),
        "{out}"
    );
    let out = agent
        .cli(&["session", "end", "--session", "s3", "--json"])
        .await?;
    let v: Value = serde_json::from_str(&out)?;
    assert_eq!(
        (v["seq"].as_u64(), &v["acknowledged"]),
        (Some(5), &Value::Bool(false))
    );

    // Back: the spooled events reach it, and the first s-offline-1 is the
    // only one on record.
    let _broker = BrokerProcess::start(&files, broker.agent_addr, 1).await?;
    agent.wait_synced().await?;
    let sessions = ferryctl_json(&files.admin_socket, &["sessions", "list", "--all"]).await?;
    let named = |id: &str| -> Vec<Value> {
        sessions
            .as_array()
            .map(|a| a.iter().filter(|s| s["session"] == id).cloned().collect())
            .unwrap_or_default()
    };
    let first = named("s-offline-1");
    assert_eq!(first.len(), 1, "{sessions}");
    assert_eq!(first[0]["user"], "alice", "{sessions}");
    assert!(!first[0]["ended_at"].is_null(), "{sessions}");
    assert_eq!(named("s3").len(), 1, "{sessions}");
    Ok(())
}
