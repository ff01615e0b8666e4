//! Full and read-only state directories, with the real binaries.
//!
//! The daemon whose disk is at fault runs in a private mount namespace
//! (`unshare --mount --propagation private`) with a small tmpfs on its state
//! directory: the mount is never in the host's mount table and goes away
//! with the process. The test reaches the daemon's files through
//! `/proc/PID/root`, fills the tmpfs with a file and frees it by deleting
//! that file. A read-only state directory is a read-only bind mount of it,
//! made the same way.
//!
//! What is checked: a report the agent cannot spool is refused with "not
//! recorded" and the reason, and the next one after space returns is
//! written without a restart; a broker that cannot commit acknowledges
//! nothing (the agent keeps the events spooled) and tells the operator the
//! state directory is full; once space returns every confirmed event is
//! recorded exactly once; a read-only state directory stops either daemon
//! at start with an error naming it.
//!
//! Needs root (mounts) and util-linux's `unshare` and `mount`: without them
//! the tests fail and say so.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_agent::local::{ErrorCode, LocalClient, LocalError, StartProof};
use ferry_agent::spool::{Spool, SpoolOptions, SPOOL_FAILURE_PREFIX, SPOOL_FILE};
use ferry_common::wire::EndReason;
use ferry_tests::bins::bin;
use ferry_tests::harness::PATIENCE;
use ferry_tests::procs::{
    ferryctl_json, fixed_size, private_mounts, publish_payg, run, AgentProcess, BrokerFiles,
    BrokerProcess, Daemon, Launch, Mount,
};
use tokio::process::Command;

const RESOURCE: &str = "host-1";
const MOBILE: &str = "+8613800000000";
const GROUP: &str = "metered";

/// Most reports tried on a full disk before one must be refused: those
/// that still fit in the last page the file system gave the spool are
/// written (and durable), and a page holds a few dozen.
const MAX_FITTING_REPORTS: u32 = 400;

/// Most admin writes tried on a full broker disk before one must be
/// refused (a small commit may still fit in the WAL's last page).
const MAX_FITTING_ADMIN_WRITES: u32 = 40;

/// How long an agent may take to resend after the broker's disk has room
/// again: its reconnect delay is capped at 30 s (`BACKOFF_CAP`), plus the
/// handshake and the resend.
const RESYNC_PATIENCE: Duration = Duration::from_secs(60);

/// Root and the tools, or a failure that says what is missing.
fn require_root_and_tools() {
    let uid = std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid());
    assert_eq!(
        uid, 0,
        "the disk-fault tests mount a tmpfs in a private mount namespace and need root (CI \
         runs as root)"
    );
    for tool in ["unshare", "mount", "sh"] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|dir| dir.join(tool).is_file());
        assert!(
            found,
            "the disk-fault tests need `{tool}` (Debian: util-linux, mount) on PATH"
        );
    }
}

/// Runs the daemon in a private mount namespace with a tmpfs of `size` on
/// `dir` (which must exist).
fn on_tmpfs<'a>(dir: &'a Path, size: &'a str) -> Vec<OsString> {
    private_mounts(&[Mount::Tmpfs {
        dir,
        size,
        mode: "0700",
        subdirs: &[],
    }])
}

/// Runs the daemon in a private mount namespace where `dir` is a read-only
/// bind mount of itself (its content unchanged).
fn read_only(dir: &Path) -> Vec<OsString> {
    private_mounts(&[Mount::ReadOnly(dir)])
}

/// `dir` as the daemon sees it, inside its mount namespace.
fn seen_by(daemon: &Daemon, dir: &Path) -> anyhow::Result<PathBuf> {
    let relative = dir.strip_prefix("/").context("an absolute path")?;
    Ok(PathBuf::from(format!("/proc/{}/root", daemon.pid()?)).join(relative))
}

/// Fills the file system of `dir` with `dir/filler` until no byte more fits.
fn fill(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("filler");
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    let chunk = vec![0xF1u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => bail!(
                "{} takes no more bytes but reports no error",
                path.display()
            ),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::StorageFull => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("fill {}", path.display())),
        }
    }
}

/// Frees what [`fill`] took.
fn free(dir: &Path) -> anyhow::Result<()> {
    std::fs::remove_file(dir.join("filler")).context("remove the filler")
}

/// The broker holds exactly `expected` (session → ended) and `events` events.
async fn broker_holds(
    files: &BrokerFiles,
    expected: &BTreeMap<String, bool>,
    events: u64,
) -> anyhow::Result<()> {
    let socket = &files.admin_socket;
    let listed = ferryctl_json(socket, &["sessions", "list", "--all"]).await?;
    let mut recorded = BTreeMap::new();
    for s in listed.as_array().context("sessions list is an array")? {
        let id = s["session"].as_str().context("session id")?.to_owned();
        let ended = !s["ended_at"].is_null();
        assert!(recorded.insert(id.clone(), ended).is_none(), "{id} twice");
    }
    assert_eq!(&recorded, expected);
    let status = ferryctl_json(socket, &["status"]).await?;
    assert_eq!(status["events_recorded"], events, "{status}");
    Ok(())
}

/// A published pay-as-you-go group of one base host (the trusted reports
/// of the test overload it; no elastic host is asked for).
async fn publish_group(files: &BrokerFiles) -> anyhow::Result<()> {
    publish_payg(&files.admin_socket, GROUP, &fixed_size("1", "2")).await?;
    Ok(())
}

/// Waits (bounded) until the group's live view holds exactly `sessions`
/// (sorted) on its host.
async fn wait_live_sessions(files: &BrokerFiles, sessions: &[&str]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let show = ferryctl_json(&files.admin_socket, &["group", "show", GROUP]).await?;
        let on_host = &show["live"]["resources"][0]["session_ids"];
        if on_host.as_array().is_some_and(|ids| {
            ids.iter()
                .filter_map(|v| v.as_str())
                .eq(sessions.iter().copied())
        }) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "group {GROUP} never had live sessions {sessions:?}: {:#}",
                show["live"]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start(client: &mut LocalClient, session: &str, user: &str) -> Result<u64, LocalError> {
    let session = session.parse().map_err(|e| LocalError::Refused {
        code: ErrorCode::InvalidRequest,
        message: format!("{e}"),
    })?;
    let user = user.parse().map_err(|e| LocalError::Refused {
        code: ErrorCode::InvalidRequest,
        message: format!("{e}"),
    })?;
    client
        .session_start(session, user, StartProof::Trusted)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_agent_disk_refuses_reports_clearly_and_loses_nothing_confirmed(
) -> anyhow::Result<()> {
    require_root_and_tools();
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    let state = files.dir.join(RESOURCE).join("state");
    std::fs::create_dir_all(&state)?;
    let launch = Launch {
        wrap: on_tmpfs(&state, "1m"),
        ..Launch::default()
    };
    let (agent, _) = AgentProcess::launch(&files, RESOURCE, broker.agent_addr, &launch).await?;
    let inside = seen_by(&agent.daemon, &state)?;
    assert!(
        inside.join(SPOOL_FILE).is_file(),
        "the spool is on the tmpfs"
    );
    assert!(
        !state.join(SPOOL_FILE).exists(),
        "the tmpfs is mounted in the agent's namespace only"
    );

    let mut client = LocalClient::connect(&agent.local_socket).await?;
    // Session → ended, for what the agent confirmed.
    let mut expected = BTreeMap::new();
    let mut events = 0u64;
    for s in ["s0", "s1", "s2"] {
        start(&mut client, s, "alice").await?;
        expected.insert(s.to_owned(), false);
        events += 1;
    }
    client.session_end("s0".parse()?, EndReason::Logout).await?;
    expected.insert("s0".to_owned(), true);
    events += 1;
    agent.wait_synced().await?;

    fill(&inside)?;
    let mut refused = None;
    for n in 0..MAX_FITTING_REPORTS {
        let session = format!("f{n:03}");
        match start(&mut client, &session, "bob").await {
            Ok(_) => {
                expected.insert(session, false);
                events += 1;
            }
            Err(LocalError::Refused {
                code: ErrorCode::Storage,
                message,
            }) => {
                refused = Some((session, message));
                break;
            }
            Err(e) => return Err(e).with_context(|| format!("start {session} on a full disk")),
        }
    }
    let (lost, message) = refused.context("no report was refused on a full disk")?;
    eprintln!("{lost} refused after {events} events: {message}");
    assert!(message.starts_with("not recorded: "), "{message}");
    assert!(
        message.contains("No space left on device") && message.contains("free space there"),
        "{message}"
    );
    // What a caller (PAM, a streaming server's hook) sees: exit 1 and why.
    let config = agent.config.as_os_str();
    let out = run(
        &bin("ferry-agent"),
        [
            "--config".as_ref(),
            config,
            "session".as_ref(),
            "start".as_ref(),
            "--trusted".as_ref(),
            "--session".as_ref(),
            lost.as_ref(),
            "--user".as_ref(),
            "bob".as_ref(),
        ],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains("not recorded: "), "{stderr}");
    // The status says the spool fails, while it does.
    let status: serde_json::Value = serde_json::from_str(&agent.cli(&["status", "--json"]).await?)?;
    let last_error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.starts_with(SPOOL_FAILURE_PREFIX) && last_error.contains("No space left"),
        "{status}"
    );
    assert_eq!(status["last_seq"], events, "{status}");
    // Acknowledgements it cannot write do not cut the link.
    assert_eq!(status["connected"], true, "{status}");

    // The spool on the full disk is whole: a copy opens with nothing to
    // cut off, holding every confirmed event.
    let copy = tmp.path().join("spool-copy");
    std::fs::create_dir(&copy)?;
    std::fs::copy(inside.join(SPOOL_FILE), copy.join(SPOOL_FILE))?;
    let len = std::fs::metadata(copy.join(SPOOL_FILE))?.len();
    let spool = Spool::open(&copy, SpoolOptions::default())?;
    assert_eq!(spool.last_seq(), events);
    assert_eq!(
        std::fs::metadata(copy.join(SPOOL_FILE))?.len(),
        len,
        "a partial record was left in the spool"
    );
    drop(spool);

    // Room again: the next reports are written, without a restart.
    free(&inside)?;
    start(&mut client, &lost, "bob").await?;
    expected.insert(lost, false);
    events += 1;
    client.session_end("s1".parse()?, EndReason::Logout).await?;
    expected.insert("s1".to_owned(), true);
    events += 1;
    let synced = agent.wait_synced().await?;
    assert_eq!(synced["last_seq"], events, "{synced}");
    assert!(synced["last_error"].is_null(), "{synced}");

    broker_holds(&files, &expected, events).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_broker_disk_acknowledges_nothing_and_records_everything_once_after(
) -> anyhow::Result<()> {
    require_root_and_tools();
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    std::fs::create_dir_all(&files.state_dir)?;
    let launch = Launch {
        wrap: on_tmpfs(&files.state_dir, "16m"),
        ..Launch::default()
    };
    let (broker, _) = BrokerProcess::launch(&files, "127.0.0.1:0".parse()?, 0, &launch).await?;
    let inside = seen_by(&broker.daemon, &files.state_dir)?;
    assert!(
        inside.join("ferry.db").is_file(),
        "the store is on the tmpfs"
    );
    assert!(
        !files.state_dir.join("ferry.db").exists(),
        "the tmpfs is mounted in the broker's namespace only"
    );
    publish_group(&files).await?;
    let agent =
        AgentProcess::start_in_group(&files, RESOURCE, broker.agent_addr, Some(GROUP)).await?;
    let mut client = LocalClient::connect(&agent.local_socket).await?;
    let mut expected = BTreeMap::new();
    let mut events = 0u64;
    start(&mut client, "s0", "alice").await?;
    expected.insert("s0".to_owned(), false);
    events += 1;
    agent.wait_synced().await?;
    let open: Vec<&str> = vec!["s0"];
    wait_live_sessions(&files, &open).await?;

    fill(&inside)?;
    // The agent spools every report; the broker acknowledges those whose
    // commit still fits, and refuses the first that does not.
    let mut refused_at = None;
    for n in 0..MAX_FITTING_REPORTS {
        let session = format!("b{n:03}");
        let seq = start(&mut client, &session, "bob").await?;
        expected.insert(session, false);
        events += 1;
        if !client.wait_acked(seq, PATIENCE).await? {
            refused_at = Some(seq);
            break;
        }
    }
    let unacked = refused_at.context("the broker acknowledged everything on a full disk")?;
    let full = format!("the state directory {} is full", files.state_dir.display());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let status = loop {
        let status = client.status().await?;
        if status
            .link
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains(&full))
        {
            break status;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the agent never heard that the broker's disk is full: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let last_error = status.link.last_error.clone().unwrap_or_default();
    eprintln!("seq {unacked} not acknowledged: {last_error}");
    assert!(last_error.contains("StoreUnavailable"), "{last_error}");
    assert!(status.link.acked_seq < unacked, "{:?}", status.link);
    assert!(status.link.spooled >= 1, "{:?}", status.link);

    // An operator's write is refused with the reason (a small one may
    // still fit in the WAL's last page).
    let socket = files.admin_socket.as_os_str();
    let mut admin_refusal = None;
    let mut users = Vec::new();
    for n in 0..MAX_FITTING_ADMIN_WRITES {
        let id = format!("u{n}");
        let email = format!("{id}@example.com");
        let args: [&std::ffi::OsStr; 11] = [
            "--socket".as_ref(),
            socket,
            "user".as_ref(),
            "create".as_ref(),
            "--id".as_ref(),
            id.as_ref(),
            "--email".as_ref(),
            email.as_ref(),
            "--mobile".as_ref(),
            MOBILE.as_ref(),
            "--json".as_ref(),
        ];
        let out = run(&bin("ferryctl"), args).await?;
        if out.status.success() {
            users.push(id);
        } else {
            admin_refusal = Some((id, String::from_utf8_lossy(&out.stderr).into_owned()));
            break;
        }
    }
    let (user, stderr) = admin_refusal.context("every admin write committed on a full disk")?;
    eprintln!("{user} refused after {} users: {stderr}", users.len());
    assert!(stderr.contains(&full), "{stderr}");
    assert!(
        stderr.contains("nothing of this write was recorded"),
        "{stderr}"
    );
    // Reads still work, and the broker is still there.
    ferryctl_json(&files.admin_socket, &["status"]).await?;
    // The broker logs it (its log lines go out through a writer thread).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !broker.daemon.log().contains(&full) {
        if tokio::time::Instant::now() > deadline {
            bail!("the broker did not log that its state directory is full");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Room again: the agent resends, the broker records each event once.
    free(&inside)?;
    let synced = client.wait_synced(RESYNC_PATIENCE).await?;
    assert_eq!(synced.link.last_seq, events, "{:?}", synced.link);
    assert_eq!(synced.link.acked_seq, events, "{:?}", synced.link);
    broker_holds(&files, &expected, events).await?;
    // The refused admin write goes through now.
    let email = format!("{user}@example.com");
    ferryctl_json(
        &files.admin_socket,
        &[
            "user", "create", "--id", &user, "--email", &email, "--mobile", MOBILE,
        ],
    )
    .await?;
    users.push(user);
    // The group's actor, stopped by its failed commits, runs again and
    // holds every open session.
    let open: Vec<&str> = expected.keys().map(String::as_str).collect();
    wait_live_sessions(&files, &open).await?;
    let listed = ferryctl_json(&files.admin_socket, &["user", "list"]).await?;
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(users.len()),
        "{listed}"
    );
    Ok(())
}

/// Runs `cmd` under `wrap` and waits for it to exit; returns its exit code
/// and log.
async fn run_to_exit(
    name: &str,
    cmd: Command,
    log: &Path,
    wrap: Vec<OsString>,
) -> anyhow::Result<(Option<i32>, String)> {
    let launch = Launch {
        wrap,
        ..Launch::default()
    };
    let (mut daemon, _) = Daemon::launch(name, cmd, log, &launch)?;
    let status = daemon.wait(PATIENCE).await?;
    Ok((status.code(), daemon.log()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_state_directory_stops_either_daemon_at_start_naming_it() -> anyhow::Result<()>
{
    require_root_and_tools();
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    // First runs create their state, as on hosts that ran before.
    let mut broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    let addr = broker.agent_addr;
    let mut agent = AgentProcess::start(&files, RESOURCE, addr).await?;
    for daemon in [&mut agent.daemon, &mut broker.daemon] {
        daemon.signal("TERM").await?;
        let status = daemon.wait(PATIENCE).await?;
        assert!(status.success(), "{status}");
    }

    let config = files.write_config(addr)?;
    let mut cmd = Command::new(bin("ferry-broker"));
    cmd.arg("run").arg("--config").arg(&config);
    let (code, log) = run_to_exit(
        "ferry-broker (read-only state)",
        cmd,
        &files.dir.join("broker-ro.log"),
        read_only(&files.state_dir),
    )
    .await?;
    assert_eq!(code, Some(1), "{log}");
    let said = format!(
        "state directory {} is on a read-only file system",
        files.state_dir.display()
    );
    assert!(log.contains(&said), "{log}");

    let state = files.dir.join(RESOURCE).join("state");
    let mut cmd = Command::new(bin("ferry-agent"));
    cmd.arg("--config").arg(&agent.config).arg("run");
    let (code, log) = run_to_exit(
        "ferry-agent (read-only state)",
        cmd,
        &files.dir.join("agent-ro.log"),
        read_only(&state),
    )
    .await?;
    assert_eq!(code, Some(1), "{log}");
    let said = format!(
        "state directory {} is on a read-only file system",
        state.display()
    );
    assert!(log.contains(&said), "{log}");

    // Nothing was harmed: the broker starts again on its directory, and
    // the agent's spool opens whole.
    BrokerProcess::start(&files, addr, 1).await?;
    let spool = Spool::open(&state, SpoolOptions::default())?;
    assert_eq!(spool.last_seq(), 0);
    Ok(())
}
