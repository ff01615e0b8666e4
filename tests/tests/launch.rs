//! `ferry-connect --launch` against a real `ferry-broker` process and real
//! `ferry-agent` processes whose configs name their streaming protocol: the
//! admission carries the protocol, and the client started gets the ticket
//! through askpass (ssh) or its standard input (rdp), never in its
//! arguments. The clients are small scripts that act like ssh and xfreerdp
//! and record what they were given. Also `ferry-connect`'s askpass mode on
//! its own.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::Context;
use ferry_broker::pki;
use ferry_common::admin::{
    AdminRequestV1, BillingSpec, GroupSpec, PolicySpec, Secret, SessionType, UserSpec,
};
use ferry_tests::bins::bin;
use ferry_tests::harness::{init_logging, PATIENCE};
use ferry_tests::procs::{AgentProcess, BrokerFiles, BrokerProcess};

const TICKET_FILE_ENV: &str = "FERRY_CONNECT_TICKET_FILE";

/// Runs `program` with `args` and `env` added, stdin closed, for at most
/// [`PATIENCE`].
async fn run_env(
    program: &Path,
    args: &[OsString],
    env: &[(&str, &Path)],
) -> anyhow::Result<Output> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_remove(TICKET_FILE_ENV)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let shown = format!("{cmd:?}");
    tokio::time::timeout(PATIENCE, cmd.output())
        .await
        .with_context(|| format!("{shown} did not finish in {PATIENCE:?}"))?
        .with_context(|| format!("run {shown}"))
}

/// An executable shell script at `path`.
fn script(path: &Path, body: &str) -> anyhow::Result<()> {
    std::fs::write(path, format!("#!/bin/sh\n{body}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

fn lines(path: &Path) -> anyhow::Result<Vec<String>> {
    Ok(read(path)?.lines().map(str::to_owned).collect())
}

fn group(name: &str) -> anyhow::Result<GroupSpec> {
    Ok(GroupSpec {
        name: Some(name.parse()?),
        region: "cn-hangzhou".into(),
        office_network: "office-net-1".into(),
        spec: "gpu-14c93g".into(),
        image: "img-1".into(),
        billing: BillingSpec::PayAsYouGo,
        base_resources: 1,
        session_type: SessionType::Independent,
        users: vec!["alice".parse()?],
        policy: PolicySpec {
            concurrent_sessions: Some(4),
            usage_threshold: Some(100),
            scale_out_step: Some(1),
            max_elastic: Some(0),
            max_idle_ms: Some(3_600_000),
            wait_timeout_ms: Some(0),
            ..PolicySpec::default()
        },
    })
}

/// ssh as far as the ticket goes: records its arguments and environment,
/// asks `$SSH_ASKPASS` for the password twice (the second must fail), says
/// whether the ticket file is still there, and exits 7.
const FAKE_SSH: &str = r#"out="$(dirname "$0")/ssh-out"
mkdir -p "$out"
printf '%s\n' "$@" > "$out/argv"
printf '%s\n' "$SSH_ASKPASS_REQUIRE" > "$out/require"
printf '%s\n' "$FERRY_CONNECT_TICKET_FILE" > "$out/ticket-file"
"$SSH_ASKPASS" "alice@127.0.0.1's password: " > "$out/answer"
echo $? > "$out/first"
"$SSH_ASKPASS" "Password: " > "$out/again"
echo $? > "$out/second"
if [ -e "$FERRY_CONNECT_TICKET_FILE" ]; then echo present; else echo gone; fi > "$out/after"
exit 7
"#;

/// xfreerdp as far as the ticket goes: records its arguments and the line
/// on its standard input, and that nothing follows it.
const FAKE_RDP: &str = r#"out="$(dirname "$0")/rdp-out"
mkdir -p "$out"
printf '%s\n' "$@" > "$out/argv"
IFS= read -r line
printf '%s\n' "$line" > "$out/stdin"
cat > "$out/rest"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_connect_launches_the_hosts_client_with_the_ticket_off_the_command_line(
) -> anyhow::Result<()> {
    init_logging();
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    files
        .admin(AdminRequestV1::UserCreateWithPassword {
            user: UserSpec {
                id: "alice".parse()?,
                email: "alice@example.com".into(),
                mobile: "+8613800000000".into(),
            },
            password: Secret("pw-alice".into()),
        })
        .await?;
    for name in ["sshg", "rdpg", "plain"] {
        files
            .admin(AdminRequestV1::GroupPublish(group(name)?))
            .await?;
    }
    let hosts = [
        (
            "h1",
            "sshg",
            "streaming_address = \"127.0.0.1:2222\"\nstreaming_protocol = \"ssh\"\n",
        ),
        (
            "h2",
            "rdpg",
            "streaming_address = \"[::1]:3389\"\nstreaming_protocol = \"rdp\"\n",
        ),
        ("h3", "plain", "streaming_address = \"127.0.0.1:2223\"\n"),
    ];
    let mut agents = Vec::new();
    for (resource, group, extra) in hosts {
        let agent =
            AgentProcess::start_configured(&files, resource, broker.agent_addr, Some(group), extra)
                .await?;
        // A session event sent after the streaming facts (one ordered
        // stream) and acknowledged: the broker has those facts too.
        agent
            .start_session(&format!("probe-{resource}"), "alice")
            .await?;
        agent.wait_synced().await?;
        agents.push(agent);
    }

    let pw = tmp.path().join("alice.pw");
    std::fs::write(&pw, "pw-alice\n")?;
    let ca = files.pki_dir.join(pki::CA_CERT);
    let runtime = tmp.path().join("runtime");
    std::fs::create_dir(&runtime)?;
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700))?;
    let program = bin("ferry-connect");
    let connect = |group: &str, extra: &[&str]| {
        let mut args: Vec<OsString> = vec![
            "--broker".into(),
            broker.agent_addr.to_string().into(),
            "--server-name".into(),
            "localhost".into(),
            "--ca".into(),
            ca.clone().into(),
            "--group".into(),
            group.into(),
            "--user".into(),
            "alice".into(),
            "--password-file".into(),
            pw.clone().into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        let program = program.clone();
        let runtime = runtime.clone();
        async move { run_env(&program, &args, &[("XDG_RUNTIME_DIR", &runtime)]).await }
    };
    let json = |out: &[u8]| -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(out).context("one JSON object")
    };

    // The protocol is in the admission.
    let out = connect("sshg", &["--json"]).await?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = json(&out.stdout)?;
    assert_eq!(
        (&v["protocol"], &v["address"]),
        (&"ssh".into(), &"127.0.0.1:2222".into()),
        "{v}"
    );
    let out = connect("rdpg", &["--json"]).await?;
    let v = json(&out.stdout)?;
    assert_eq!(
        (&v["protocol"], &v["address"]),
        (&"rdp".into(), &"[::1]:3389".into()),
        "{v}"
    );
    let out = connect("plain", &["--json"]).await?;
    let v = json(&out.stdout)?;
    assert_eq!(v["protocol"], serde_json::Value::Null, "{v}");
    let out = connect("sshg", &[]).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("protocol:   ssh\n"), "{text}");

    // ssh: the ticket through askpass, once.
    let fake_ssh = tmp.path().join("ssh");
    script(&fake_ssh, FAKE_SSH)?;
    let out = connect(
        "sshg",
        &[
            "--launch",
            "--client",
            fake_ssh.to_str().context("utf-8 path")?,
            "--ssh-option",
            "UserKnownHostsFile=/dev/null",
            "--",
            "-o",
            "StrictHostKeyChecking=no",
            "true",
        ],
    )
    .await?;
    assert_eq!(out.status.code(), Some(7), "the client's status: {out:?}");
    let got = tmp.path().join("ssh-out");
    let answer = read(&got.join("answer"))?;
    let ticket = answer
        .strip_suffix('\n')
        .context("askpass ends its answer with a newline")?
        .to_owned();
    assert!(ticket.starts_with("v1.") && ticket.len() > 40, "{answer:?}");
    assert_eq!(read(&got.join("first"))?, "0\n");
    assert_ne!(read(&got.join("second"))?, "0\n", "askpass answers once");
    assert_eq!(read(&got.join("again"))?, "", "nothing the second time");
    assert_eq!(
        read(&got.join("after"))?,
        "gone\n",
        "the file goes with the answer"
    );
    assert_eq!(read(&got.join("require"))?, "force\n");
    let argv = lines(&got.join("argv"))?;
    assert_eq!(
        argv,
        [
            "-p",
            "2222",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "NumberOfPasswordPrompts=1",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-l",
            "alice",
            "127.0.0.1",
            "-o",
            "StrictHostKeyChecking=no",
            "true",
        ]
    );
    assert!(argv.iter().all(|a| !a.contains(&ticket)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains(&ticket) && !String::from_utf8_lossy(&out.stdout).contains(&ticket));
    assert!(stderr.contains("protocol:   ssh"), "{stderr}");
    // The ticket file lived in a fresh directory under XDG_RUNTIME_DIR,
    // removed with it.
    let file = PathBuf::from(read(&got.join("ticket-file"))?.trim_end());
    assert_eq!(
        file.parent().and_then(Path::parent),
        Some(runtime.as_path())
    );
    assert_eq!(
        std::fs::read_dir(&runtime)?.count(),
        0,
        "nothing left behind"
    );
    // The ticket is one the host accepts, for alice in the ssh group.
    let verified: serde_json::Value = serde_json::from_str(
        &agents[0]
            .cli(&["ticket", "verify", "--json", &ticket])
            .await?,
    )?;
    assert_eq!(
        (&verified["valid"], &verified["user"]),
        (&true.into(), &"alice".into()),
        "{verified}"
    );

    // rdp: the ticket on stdin, one line; IPv6 in brackets.
    let fake_rdp = tmp.path().join("xfreerdp");
    script(&fake_rdp, FAKE_RDP)?;
    let out = connect(
        "rdpg",
        &[
            "--launch",
            "--json",
            "--client",
            fake_rdp.to_str().context("utf-8 path")?,
            "--",
            "/auth-only",
            "/cert:ignore",
        ],
    )
    .await?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty(), "stdout is the client's: {out:?}");
    let shown = json(&out.stderr)?;
    assert_eq!(shown["protocol"], "rdp", "{shown}");
    assert!(shown.get("ticket").is_none(), "{shown}");
    let got = tmp.path().join("rdp-out");
    let argv = lines(&got.join("argv"))?;
    assert_eq!(
        argv,
        [
            "/v:[::1]:3389",
            "/u:alice",
            "/from-stdin:force",
            "/auth-only",
            "/cert:ignore"
        ]
    );
    let line = read(&got.join("stdin"))?;
    assert!(line.starts_with("v1.") && line.ends_with('\n'), "{line:?}");
    assert_ne!(line.trim_end(), ticket, "a new ticket");
    assert_eq!(read(&got.join("rest"))?, "", "one line, then the end");
    assert!(argv.iter().all(|a| !a.contains(line.trim_end())));

    // No protocol known: --launch is a usage error, until --protocol says.
    let out = connect("plain", &["--launch", "--client", "/bin/false"]).await?;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--protocol"),
        "{out:?}"
    );
    std::fs::remove_dir_all(tmp.path().join("ssh-out"))?;
    let out = connect(
        "plain",
        &[
            "--launch",
            "--protocol",
            "ssh",
            "--client",
            fake_ssh.to_str().context("utf-8 path")?,
        ],
    )
    .await?;
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let argv = lines(&tmp.path().join("ssh-out").join("argv"))?;
    assert_eq!(argv[1], "2223", "{argv:?}");
    assert_eq!(
        argv.last().map(String::as_str),
        Some("127.0.0.1"),
        "{argv:?}"
    );
    // Launch flags without --launch: a usage error.
    let out = connect("sshg", &["--client", "/bin/true"]).await?;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    Ok(())
}

/// `ferry-connect` as ssh's askpass: the ticket once, then the file is
/// gone and a second call fails; a yes/no question is declined and leaves
/// the ticket.
#[tokio::test]
async fn askpass_mode_answers_once() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("ticket");
    std::fs::write(&file, "v1.abc.def")?;
    let program = bin("ferry-connect");
    let ask = |prompt: &str| {
        let program = program.clone();
        let args = vec![OsString::from(prompt)];
        let file = file.clone();
        async move { run_env(&program, &args, &[(TICKET_FILE_ENV, &file)]).await }
    };
    let out = ask("Are you sure you want to continue connecting (yes/no/[fingerprint])? ").await?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty() && file.exists(), "{out:?}");
    let out = ask("alice@h's password: ").await?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "v1.abc.def\n");
    assert!(!file.exists(), "deleted once answered");
    let out = ask("Password: ").await?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    Ok(())
}
