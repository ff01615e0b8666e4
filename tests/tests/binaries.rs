//! Ferry as an operator runs it: `ferryctl pki`, `ferry-broker run` and two
//! `ferry-agent run` processes with config files, sessions reported through
//! the `ferry-agent session` CLI, the state read back with `ferryctl --json`,
//! and systemd's notify protocol checked on a fake `NOTIFY_SOCKET`; and the
//! README's first command, `ferry-broker demo`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use anyhow::Context;
use ferry_broker::endpoint::REFUSAL_LINGER;
use ferry_broker::pki;
use ferry_tests::bins::bin;
use ferry_tests::harness::PATIENCE;
use ferry_tests::procs::{
    ferryctl_json, run, run_ok, wait_notify, AgentProcess, BrokerFiles, BrokerProcess,
    PROCESS_SHUTDOWN_GRACE,
};
use serde_json::Value;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_and_two_agents_as_processes() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    assert_eq!(mode(&files.pki_dir.join(pki::CA_KEY)), 0o600);
    assert_eq!(mode(&files.pki_dir.join(pki::BROKER_KEY)), 0o600);
    // An existing CA is never overwritten.
    let again = run(
        &bin("ferryctl"),
        [
            "pki".as_ref(),
            "init".as_ref(),
            "--dir".as_ref(),
            files.pki_dir.as_os_str(),
        ],
    )
    .await?;
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    let mut broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    assert_ne!(broker.agent_addr.port(), 0);
    let mut h1 = AgentProcess::start(&files, "host-1", broker.agent_addr).await?;
    let mut h2 = AgentProcess::start(&files, "host-2", broker.agent_addr).await?;
    assert_eq!(
        mode(&tmp.path().join("host-1/id").join(pki::AGENT_KEY)),
        0o600
    );

    h1.cli(&[
        "session",
        "start",
        "--trusted",
        "--session",
        "s1",
        "--user",
        "alice",
    ])
    .await?;
    h1.cli(&[
        "session",
        "start",
        "--trusted",
        "--session",
        "s2",
        "--user",
        "bob",
    ])
    .await?;
    h2.cli(&[
        "session",
        "start",
        "--trusted",
        "--session",
        "s3",
        "--user",
        "carol",
    ])
    .await?;
    h1.cli(&["session", "end", "--session", "s1", "--reason", "logout"])
        .await?;
    for agent in [&h1, &h2] {
        let s = agent.wait_synced().await?;
        assert_eq!(s["connected"], true, "{s}");
        assert_eq!(s["spooled"], 0, "{s}");
        assert_eq!(s["acked_seq"], s["last_seq"], "{s}");
    }
    let socket = &files.admin_socket;

    let sessions = ferryctl_json(socket, &["sessions", "list", "--all"]).await?;
    let sessions: BTreeMap<String, Value> = sessions
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|s| (s["session"].as_str().expect("id").to_owned(), s.clone()))
        .collect();
    assert_eq!(sessions.len(), 3, "{sessions:?}");
    assert_eq!(sessions["s1"]["resource"], "host-1");
    assert_eq!(sessions["s1"]["user"], "alice");
    assert_eq!(sessions["s1"]["end_reason"], "logout");
    assert!(sessions["s1"]["ended_at"].is_string());
    assert!(sessions["s1"]["started_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(sessions["s3"]["resource"], "host-2");
    assert!(sessions["s2"]["ended_at"].is_null());
    assert!(sessions["s3"]["end_reason"].is_null());
    assert_eq!(sessions["s1"]["state"], "ended");
    assert_eq!(sessions["s2"]["state"], "open");
    assert!(sessions["s2"]["group"].is_null(), "no group: {sessions:?}");
    let open = ferryctl_json(socket, &["sessions", "list"]).await?;
    assert_eq!(open.as_array().map(Vec::len), Some(2), "{open}");
    let table = run_ok(
        &bin("ferryctl"),
        [
            "--socket".as_ref(),
            socket.as_os_str(),
            "sessions".as_ref(),
            "list".as_ref(),
            "--all".as_ref(),
        ],
    )
    .await?;
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("SESSION  RESOURCE  GROUP  USER   STATE"),
        "{table}"
    );
    assert!(!table.contains(".000Z"), "whole seconds: {table}");

    // A usage period still running is billed so far; CSV rows have no room
    // to say it, so ferryctl says it on stderr.
    let hour = chrono::Duration::hours(1);
    let now = chrono::Utc::now();
    let secs = chrono::SecondsFormat::Secs;
    let (from, to) = (
        (now - hour).to_rfc3339_opts(secs, true),
        (now + hour).to_rfc3339_opts(secs, true),
    );
    let out = run(
        &bin("ferryctl"),
        [
            "--socket",
            socket.to_str().unwrap_or_default(),
            "usage",
            "--from",
            &from,
            "--to",
            &to,
            "--format",
            "csv",
        ],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("group,resource,kind,"),
        "{out:?}"
    );
    assert!(
        stderr.contains(&format!(
            "(so far: the period ends {to}; nothing later is billed)"
        )),
        "{stderr}"
    );

    // `user list`: whether each user has a password and tokens.
    let pw = tmp.path().join("alice.pw");
    std::fs::write(&pw, "correct horse\n")?;
    let pw_arg = pw.to_str().unwrap_or_default();
    for (id, password) in [("alice", Some(pw_arg)), ("bob", None)] {
        let email = format!("{id}@example.com");
        let mut args = vec!["user", "create", "--id", id, "--email", &email];
        args.extend(["--mobile", "+8613800000000"]);
        if let Some(p) = password {
            args.extend(["--password-file", p]);
        }
        ferryctl_json(socket, &args).await?;
    }
    ferryctl_json(socket, &["user", "token", "alice", "--ttl", "1h"]).await?;
    let users = ferryctl_json(socket, &["user", "list"]).await?;
    assert_eq!(users[0]["id"], "alice", "{users}");
    assert_eq!(users[0]["password_set"], true, "{users}");
    assert!(users[0]["token_expires_at"].is_string(), "{users}");
    assert_eq!(users[1]["password_set"], false, "{users}");
    assert!(users[1]["token_expires_at"].is_null(), "{users}");
    ferryctl_json(socket, &["user", "revoke-tokens", "alice"]).await?;
    let users = ferryctl_json(socket, &["user", "list"]).await?;
    assert_eq!(users[0]["token_generation"], 1, "{users}");
    assert!(users[0]["token_expires_at"].is_null(), "revoked: {users}");

    let resources = ferryctl_json(socket, &["resources", "list"]).await?;
    let resources = resources.as_array().expect("a JSON array");
    assert_eq!(resources.len(), 2, "{resources:?}");
    for r in resources {
        assert_eq!(r["connected"], true, "{r}");
        assert_eq!(r["draining"], false, "{r}");
        assert_eq!(r["image_version"], "img-7", "{r}");
        assert!(r["host"].is_object(), "{r}");
        // host-1 has s2 open (s1 ended), host-2 has s3.
        assert_eq!(r["sessions"], 1, "{r}");
    }

    let status = ferryctl_json(socket, &["status"]).await?;
    assert_eq!(status["agents_connected"], 2, "{status}");
    assert_eq!(status["resources"], 2, "{status}");
    assert_eq!(status["open_sessions"], 2, "{status}");
    assert_eq!(status["events_recorded"], 4, "{status}");
    assert!(status["broker_version"].is_string(), "{status}");

    // SIGTERM an agent: STOPPING=1, then a clean exit.
    h1.daemon.signal("TERM").await?;
    wait_notify(&h1.notify, "STOPPING=1", PATIENCE)?;
    let code = h1.daemon.wait(PATIENCE).await?;
    assert_eq!(code.code(), Some(0), "{}", h1.daemon.log());

    // SIGTERM the broker with an agent still connected: it drains within its
    // grace period (plus the time it lets refusals reach agents).
    broker.daemon.signal("TERM").await?;
    wait_notify(&broker.notify, "STOPPING=1", PATIENCE)?;
    let code = broker
        .daemon
        .wait(PROCESS_SHUTDOWN_GRACE + REFUSAL_LINGER + PATIENCE)
        .await?;
    assert_eq!(code.code(), Some(0), "{}", broker.daemon.log());
    assert!(!socket.exists(), "the admin socket is removed on exit");

    h2.daemon.signal("TERM").await?;
    wait_notify(&h2.notify, "STOPPING=1", PATIENCE)?;
    assert_eq!(h2.daemon.wait(PATIENCE).await?.code(), Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferryctl_says_when_the_broker_is_not_running() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let socket = tmp.path().join("admin.sock");
    let out = run(
        &bin("ferryctl"),
        ["--socket".as_ref(), socket.as_os_str(), "status".as_ref()],
    )
    .await?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&*socket.to_string_lossy()), "{stderr}");
    Ok(())
}

/// Processes (not zombies) whose command line mentions `needle`.
fn processes_mentioning(needle: &std::path::Path) -> Vec<u32> {
    let needle = needle.display().to_string();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true);
        if String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .contains(&needle)
            && !zombie
        {
            out.push(pid);
        }
    }
    out
}

/// Follows a console sign-in link as a browser would: the link's page
/// has a sign-in form; posting it answers with the session cookie and a
/// redirect, and the page it names is fetched with that cookie. Returns
/// the page.
async fn open_console_link(link: &str) -> anyhow::Result<String> {
    let rest = link.strip_prefix("http://").context("an http link")?;
    let (host, path) = rest.split_once('/').context("a path")?;
    let addr: std::net::SocketAddr = host.parse()?;
    let send = |head: String, body: String| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!(
            "{head}\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\n\r\n{body}",
            body.len()
        );
        tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes()).await?;
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut s, &mut text).await?;
        anyhow::Ok(text)
    };
    let form_page = send(format!("GET /{path} HTTP/1.1"), String::new()).await?;
    assert!(form_page.contains("id=\"sign-in\""), "{form_page}");
    let query = path.split_once('?').map(|(_, q)| q).context("a query")?;
    let signed = send("POST /login HTTP/1.1".into(), query.to_owned()).await?;
    let header = |name: &str| {
        signed
            .lines()
            .find_map(|l| {
                l.split_once(": ")
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            })
            .map(|(_, v)| v.trim().to_owned())
    };
    let cookie = header("set-cookie")
        .and_then(|c| c.split(';').next().map(str::to_owned))
        .with_context(|| format!("no cookie from the sign-in: {signed}"))?;
    let location = header("location").with_context(|| format!("no redirect: {signed}"))?;
    send(
        format!("GET {location} HTTP/1.1\r\nCookie: {cookie}"),
        String::new(),
    )
    .await
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_scales_out_and_in_reports_usage_and_leaves_nothing_running() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("demo");
    let duration = std::time::Duration::from_secs(40);
    let mut cmd = tokio::process::Command::new(bin("ferry-broker"));
    cmd.args(["demo", "--duration", "40s", "--state-dir"])
        .arg(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let stdout_pipe = child.stdout.take().context("stdout")?;
    let stderr_pipe = child.stderr.take().context("stderr")?;
    let errors = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut { stderr_pipe }, &mut text).await;
        text
    });
    // Bounded: the show's duration, plus starting and stopping every agent.
    let (status, stdout, console_page) = tokio::time::timeout(duration + PATIENCE * 4, async {
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout_pipe));
        let mut stdout = String::new();
        let mut console_page = None;
        while let Some(line) = lines.next_line().await? {
            // The console link it prints signs a browser in to the group's
            // live page while the show runs.
            if line.starts_with("demo: watch it live") {
                let link = line
                    .find("http://")
                    .map(|at| &line[at..])
                    .context("a link")?;
                console_page = Some(open_console_link(link).await?);
            }
            stdout.push_str(&line);
            stdout.push('\n');
        }
        let status = child.wait().await?;
        anyhow::Ok((status, stdout, console_page))
    })
    .await
    .map_err(|_| anyhow::anyhow!("ferry-broker demo did not finish"))??;
    let stderr = errors.await.unwrap_or_default();
    assert!(status.success(), "{status}\n{stdout}\n{stderr}");
    let page = console_page.unwrap_or_else(|| panic!("no console link in {stdout}"));
    assert!(page.contains("<h1>demo</h1>"), "{page}");
    assert!(page.contains("id=\"live-chart\""), "{page}");

    // The show: a burst scales out and waiting users are admitted on the new
    // resources, the load falls and they are scaled in, each with its reason.
    let has = |s: &str| stdout.contains(s);
    assert!(
        has(" scale_out      scale-out: asked for demo-e1 because demand"),
        "{stdout}"
    );
    assert!(has(" created        created: demo-e1 is ready"), "{stdout}");
    assert!(has(" scale_in       scale-in: demo-e"), "{stdout}");
    assert!(has("because idle "), "{stdout}");
    assert!(has(" released       released: demo-e"), "{stdout}");
    assert!(has("route     user1: admitted to demo-host-"), "{stdout}");
    assert!(has(": ticket verified, session "), "{stdout}");
    assert!(has(" ended (logout)"), "{stdout}");
    let routes = stdout
        .lines()
        .find_map(|l| l.strip_prefix("demo: routes: "))
        .unwrap_or_else(|| panic!("no route summary in {stdout}"));
    let admitted: u32 = routes
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{routes}"));
    assert!(admitted >= 4, "{routes}");
    // The usage report with its total and the cost.
    assert!(has("Usage report"), "{stdout}");
    let total = stdout
        .lines()
        .find(|l| l.starts_with("demo ") && l.contains("(total)"))
        .unwrap_or_else(|| panic!("no total row in {stdout}"));
    assert!(total.contains("pay-as-you-go"), "{total}");
    assert!(total.contains(" CNY"), "{total}");
    assert!(has("Cost of group demo: "), "{stdout}");

    // Nothing left: the base agents it started (pids it printed), the
    // elastic agents of its provisioner (all run from its directory), and
    // the directory itself.
    let base_pids: Vec<u32> = stdout
        .lines()
        .filter(|l| l.starts_with("demo: started base agent "))
        .filter_map(|l| l.rsplit_once("(pid ")?.1.strip_suffix(')')?.parse().ok())
        .collect();
    assert_eq!(base_pids.len(), 2, "{stdout}");
    for pid in base_pids {
        assert!(!alive(pid), "base agent {pid} still runs");
    }
    assert_eq!(processes_mentioning(&dir), Vec::<u32>::new());
    assert!(has("no agent process is left running"), "{stdout}");
    assert!(!dir.exists(), "{} was not removed", dir.display());
    Ok(())
}

/// `ferryctl`'s usage errors exit 64 (a refusal or failure is 1): every bad
/// flag value of one command listed at once, an existing agent key replaced
/// only with `--yes` when there is no terminal to ask on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferryctl_usage_errors_list_every_bad_value_and_need_yes() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let socket = tmp.path().join("admin.sock");
    let ferryctl = bin("ferryctl");
    let ctl = |args: &[&str]| {
        let mut all: Vec<std::ffi::OsString> = vec!["--socket".into(), socket.clone().into()];
        all.extend(args.iter().map(std::ffi::OsString::from));
        run(&ferryctl, all)
    };
    let out = ctl(&[
        "group",
        "update-policy",
        "design",
        "--disconnect-retention",
        "xx",
        "--idle-disconnect",
        "banana",
        "--max-idle",
        "1y",
    ])
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("3 flag values are invalid"), "{stderr}");
    for flag in ["--disconnect-retention", "--idle-disconnect", "--max-idle"] {
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
    // Checked before the broker is asked: none runs here.
    assert!(!stderr.contains("is ferry-broker running"), "{stderr}");
    let out = ctl(&["group", "show"]).await?;
    assert_eq!(out.status.code(), Some(64), "clap's usage error: {out:?}");
    // Bad ids and times are usage errors too, said before any broker is asked.
    for args in [
        &["group", "show", "Not A Name!"][..],
        &[
            "usage",
            "--from",
            "yesterday",
            "--to",
            "2026-03-03T00:00:00Z",
        ][..],
        &[
            "usage",
            "--from",
            "2026-03-03T00:00:00Z",
            "--to",
            "2026-03-02T00:00:00Z",
        ][..],
    ] {
        let out = ctl(args).await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(!stderr.contains("is ferry-broker running"), "{stderr}");
    }

    let files = BrokerFiles::init(&tmp.path().join("b")).await?;
    let id = tmp.path().join("host-1");
    files.issue_agent("host-1", &id).await?;
    let key = std::fs::read(id.join(pki::AGENT_KEY))?;
    let issue = |yes: bool| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "pki".into(),
            "issue-agent".into(),
            "--dir".into(),
            files.pki_dir.clone().into(),
            "--resource".into(),
            "host-1".into(),
            "--out".into(),
            id.clone().into(),
        ];
        if yes {
            args.push("--yes".into());
        }
        run(&ferryctl, args)
    };
    let out = issue(false).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("add --yes"), "{stderr}");
    assert_eq!(std::fs::read(id.join(pki::AGENT_KEY))?, key, "kept");
    let out = issue(true).await?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_ne!(std::fs::read(id.join(pki::AGENT_KEY))?, key, "replaced");
    let text = String::from_utf8_lossy(&out.stdout);
    let fingerprint = pki::fingerprint(&id.join(pki::AGENT_CERT))?;
    assert!(text.contains(&format!("sha256 {fingerprint}")), "{text}");
    // --json: the paths and fingerprints.
    let out = run(
        &ferryctl,
        [
            "pki".as_ref(),
            "issue-agent".as_ref(),
            "--dir".as_ref(),
            files.pki_dir.as_os_str(),
            "--resource".as_ref(),
            "host-2".as_ref(),
            "--out".as_ref(),
            tmp.path().join("host-2").as_os_str(),
            "--json".as_ref(),
        ],
    )
    .await?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let cert = tmp.path().join("host-2").join(pki::AGENT_CERT);
    assert_eq!(
        v["files"]["cert"]["path"],
        cert.display().to_string(),
        "{v}"
    );
    assert_eq!(
        v["files"]["cert"]["fingerprint_sha256"],
        pki::fingerprint(&cert)?,
        "{v}"
    );
    assert_eq!(
        v["files"]["ca_cert"]["fingerprint_sha256"],
        pki::fingerprint(&files.pki_dir.join(pki::CA_CERT))?,
        "the CA's, as pki init printed it: {v}"
    );
    assert!(v["files"]["key"]["fingerprint_sha256"].is_null(), "{v}");
    Ok(())
}
