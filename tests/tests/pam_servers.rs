//! From ticket to login: real servers accept Ferry's tickets through PAM.
//!
//! A real `ferry-broker` and `ferry-agent`, users routed with the real
//! `ferry-connect`, and the streaming servers operators run, from the
//! distribution's packages, with the PAM files shipped in `packaging/pam/`
//! (see `ferry_tests::servers`): `pamtester` on the stacks alone, OpenSSH's
//! `sshd` with `ssh`, and `xrdp` with `xfreerdp /auth-only`. Each server
//! takes a ticket once, for its own user, unexpired; the login's PAM
//! session is the session the broker reserved, holds its slot, and its end
//! frees the slot and closes the metering interval.
//!
//! Needs root and the packages (`tests/run` installs them): without them
//! the tests fail and say so.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use ferry_broker::tickets::{TicketSigner, TICKET_TTL};
use ferry_common::admin::{AdminRequestV1, Secret, SessionType, UserSpec};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis, UserId};
use ferry_tests::bins::bin;
use ferry_tests::harness::{init_logging, PATIENCE};
use ferry_tests::procs::{ferryctl_json, run, AgentProcess, BrokerFiles, BrokerProcess};
use ferry_tests::servers::{self, UnixUser};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

const GROUP: &str = "desk";
const HOST: &str = "host-1";

fn id<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().expect("valid id in test")
}

/// A broker, a group of one host whose sessions the agent reports, and
/// Ferry users named like the Unix users.
struct Fleet {
    dir: PathBuf,
    files: BrokerFiles,
    broker: BrokerProcess,
    agent: AgentProcess,
}

impl Fleet {
    /// `concurrent` sessions a host; the agent's config gets `agent_extra`.
    async fn start(
        dir: &Path,
        users: &[&UnixUser],
        concurrent: u32,
        session_type: SessionType,
        agent_extra: &str,
    ) -> anyhow::Result<Fleet> {
        let files = BrokerFiles::init(dir).await?;
        let broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
        for u in users {
            files
                .admin(AdminRequestV1::UserCreateWithPassword {
                    user: UserSpec {
                        id: id(&u.name),
                        email: format!("{}@example.com", u.name),
                        mobile: "+8613800000000".into(),
                    },
                    password: Secret(format!("pw-{}", u.name)),
                })
                .await?;
        }
        let mut spec = ferry_tests::admin::pay_as_you_go(GROUP, 1);
        spec.session_type = session_type;
        spec.users = users.iter().map(|u| id(&u.name)).collect();
        spec.policy.concurrent_sessions = Some(concurrent);
        spec.policy.max_elastic = Some(0);
        spec.policy.usage_threshold = Some(100);
        files.admin(AdminRequestV1::GroupPublish(spec)).await?;
        let agent = AgentProcess::start_configured(
            &files,
            HOST,
            broker.agent_addr,
            Some(GROUP),
            agent_extra,
        )
        .await?;
        agent.wait_synced().await?;
        Ok(Fleet {
            dir: dir.to_owned(),
            files,
            broker,
            agent,
        })
    }

    /// The agent's local socket, known before it starts (the servers' PAM
    /// files name it).
    fn agent_socket(dir: &Path) -> PathBuf {
        dir.join(HOST).join("agent.sock")
    }

    /// `ferry-connect`'s arguments for `user` (password `pw-USER`), `--json`.
    fn connect_args(&self, user: &str) -> anyhow::Result<Vec<OsString>> {
        let pw = self.dir.join(format!("{user}.pw"));
        std::fs::write(&pw, format!("pw-{user}\n"))?;
        Ok(vec![
            "--broker".into(),
            self.broker.agent_addr.to_string().into(),
            "--server-name".into(),
            "localhost".into(),
            "--ca".into(),
            self.files.pki_dir.join(ferry_broker::pki::CA_CERT).into(),
            "--group".into(),
            GROUP.into(),
            "--user".into(),
            user.into(),
            "--password-file".into(),
            pw.into(),
            "--json".into(),
        ])
    }

    /// `ferry-connect --json` for `user`, parsed.
    async fn connect(&self, user: &str) -> anyhow::Result<serde_json::Value> {
        let out = run(&bin("ferry-connect"), self.connect_args(user)?).await?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("ferry-connect printed {out:?}"))
    }

    /// `ferry-connect --launch --json` for `user` with `flags` and the
    /// client's `client_args`, its standard streams piped; returns it with
    /// the admission it printed first on its standard error (the session,
    /// never the ticket).
    async fn launch(
        &self,
        user: &str,
        flags: &[&str],
        client_args: &[&str],
        env: &[(&str, &Path)],
    ) -> anyhow::Result<(tokio::process::Child, serde_json::Value)> {
        let mut args = self.connect_args(user)?;
        args.push("--launch".into());
        args.extend(flags.iter().map(OsString::from));
        args.push("--".into());
        args.extend(client_args.iter().map(OsString::from));
        let mut child = tokio::process::Command::new(bin("ferry-connect"))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stderr = child.stderr.take().context("ferry-connect's stderr")?;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let first = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .context("ferry-connect printed no admission")??
            .context("ferry-connect ended without an admission")?;
        // The client's own messages follow; drained so it never blocks.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let v: serde_json::Value = serde_json::from_str(&first)
            .with_context(|| format!("ferry-connect --launch printed {first:?}"))?;
        anyhow::ensure!(v["admitted"] == true, "not admitted: {v}");
        anyhow::ensure!(v.get("ticket").is_none(), "the ticket was printed: {v}");
        Ok((child, v))
    }

    /// An admission for `user`: (session, ticket).
    async fn admit(&self, user: &str) -> anyhow::Result<(String, String)> {
        let v = self.connect(user).await?;
        anyhow::ensure!(v["admitted"] == true, "not admitted: {v}");
        Ok((
            v["session"].as_str().context("session")?.to_owned(),
            v["ticket"].as_str().context("ticket")?.to_owned(),
        ))
    }

    /// A ticket for `user` on the host that expired an hour ago, signed with
    /// the broker's own key.
    fn expired_ticket(&self, user: &str) -> anyhow::Result<String> {
        let signer = TicketSigner::load_or_create(&self.files.pki_dir)?;
        let (g, r, u, s): (GroupName, ResourceId, UserId, SessionId) =
            (id(GROUP), id(HOST), id(user), id("r-expired"));
        let issued = UnixMillis(ferry_agent::clock::now().0 - 3_600_000);
        Ok(signer.issue(&g, &r, &u, &s, issued, TICKET_TTL).1)
    }

    /// Every recorded session (`ferryctl sessions list --all`).
    async fn sessions(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let v = ferryctl_json(&self.files.admin_socket, &["sessions", "list", "--all"]).await?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// The recorded session `session`, once `done` holds for it.
    async fn wait_session(
        &self,
        session: &str,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let all = self.sessions().await?;
            if let Some(s) = all.iter().find(|s| s["session"] == session && done(s)) {
                return Ok(s.clone());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "session {session} never {what}: {all:?}\nagent log:\n{}",
                self.agent.daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The agent's config lines for a streaming server on loopback `port`
/// speaking `protocol`.
fn streaming(port: u16, protocol: &str) -> String {
    format!("streaming_address = \"127.0.0.1:{port}\"\nstreaming_protocol = \"{protocol}\"\n")
}

/// What the sshd tests run.
const SSH_PROGRAMS: [(&str, &str); 3] = [
    (servers::SSHD, "openssh-server"),
    (servers::SSH, "openssh-client"),
    (servers::SSH_KEYGEN, "openssh-client"),
];

fn open(s: &serde_json::Value) -> bool {
    s["ended_at"].is_null()
}

fn ended(s: &serde_json::Value) -> bool {
    !s["ended_at"].is_null()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The shipped PAM stacks on their own (`pamtester`, with the real
/// service names): a ticket authenticates once, for its user, unexpired;
/// the session opened is the reserved one and closing ends it; a session
/// without a ticket login is refused; a login process that exits without
/// closing is closed by the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_pam_stacks_take_a_ticket_once_for_its_own_user() -> anyhow::Result<()> {
    servers::require(&[
        (servers::PAMTESTER, "pamtester"),
        (servers::SSHD, "openssh-server"),
    ]);
    servers::require(&[(servers::XRDP_SESMAN, "xrdp")]);
    init_logging();
    let tmp = tempfile::tempdir()?;
    let (alice, bob) = (UnixUser::create()?, UnixUser::create()?);
    let fleet = Fleet::start(tmp.path(), &[&alice, &bob], 2, SessionType::Independent, "").await?;
    let socket = Fleet::agent_socket(tmp.path());
    let sshd = servers::pam_stack("sshd", &socket)?;
    let sesman = servers::pam_stack("xrdp-sesman", &socket)?;
    let full = ["authenticate", "open_session", "close_session"];

    // Accepted once: the PAM session is the reserved session, and its
    // close ends it.
    let (session, ticket) = fleet.admit(&alice.name).await?;
    let out = servers::pamtester(tmp.path(), "sshd", &sshd, &alice.name, &ticket, &full).await?;
    assert!(out.status.success(), "{}", text(&out));
    let s = fleet.wait_session(&session, "ended", ended).await?;
    assert_eq!(s["user"], alice.name.as_str(), "{s}");
    assert_eq!(s["resource"], HOST, "{s}");
    assert_eq!(s["end_reason"], "logout", "{s}");
    // ... and refused the second time, before any session.
    let out = servers::pamtester(tmp.path(), "sshd", &sshd, &alice.name, &ticket, &full).await?;
    assert!(
        !out.status.success(),
        "a used ticket let in: {}",
        text(&out)
    );

    // Bob's ticket typed by alice: refused, and still good for bob, whose
    // xrdp login opens its session; pamtester then exits without closing
    // it, as a server that gives up would: the agent closes it.
    let (bob_session, bob_ticket) = fleet.admit(&bob.name).await?;
    let out =
        servers::pamtester(tmp.path(), "sshd", &sshd, &alice.name, &bob_ticket, &full).await?;
    assert!(
        !out.status.success(),
        "another user's ticket let in: {}",
        text(&out)
    );
    let out = servers::pamtester(
        tmp.path(),
        "xrdp-sesman",
        &sesman,
        &bob.name,
        &bob_ticket,
        &["authenticate", "open_session"],
    )
    .await?;
    assert!(out.status.success(), "{}", text(&out));
    let s = fleet.wait_session(&bob_session, "ended", ended).await?;
    assert!(
        s["end_reason"]
            .as_str()
            .is_some_and(|r| r.contains("exited without closing its PAM session")),
        "{s}"
    );

    // An expired ticket, signed by the broker: refused.
    let expired = fleet.expired_ticket(&alice.name)?;
    let out = servers::pamtester(tmp.path(), "sshd", &sshd, &alice.name, &expired, &full).await?;
    assert!(
        !out.status.success(),
        "an expired ticket let in: {}",
        text(&out)
    );

    // A session opened without a ticket login (e.g. a public key): refused.
    let out = servers::pamtester(
        tmp.path(),
        "sshd",
        &sshd,
        &alice.name,
        "",
        &["open_session"],
    )
    .await?;
    assert!(
        !out.status.success(),
        "a session without a ticket: {}",
        text(&out)
    );

    let all = fleet.sessions().await?;
    assert_eq!(all.len(), 2, "exactly the two ticket logins: {all:?}");
    Ok(())
}

/// OpenSSH's sshd with the shipped `sshd` PAM file: the routed user's
/// ticket logs in once; the login is the reserved session and holds the
/// host's one slot until it ends; replayed, another user's and expired
/// tickets are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_takes_a_ticket_once_and_the_login_holds_its_slot() -> anyhow::Result<()> {
    servers::require(&SSH_PROGRAMS);
    init_logging();
    let tmp = tempfile::tempdir()?;
    let (alice, bob) = (UnixUser::create()?, UnixUser::create()?);
    let sshd =
        servers::Sshd::start(&tmp.path().join("sshd"), &Fleet::agent_socket(tmp.path())).await?;
    let extra = streaming(sshd.port, "ssh");
    let fleet = Fleet::start(
        tmp.path(),
        &[&alice, &bob],
        1,
        SessionType::Independent,
        &extra,
    )
    .await?;

    // Alice's ssh login through `ferry-connect --launch`, open while
    // `cat` reads its standard input; the ticket goes through askpass.
    let runtime = tmp.path().join("runtime");
    std::fs::create_dir_all(&runtime)?;
    let (mut login, v) = fleet
        .launch(
            &alice.name,
            &[
                "--ssh-option",
                "StrictHostKeyChecking=no",
                "--ssh-option",
                "UserKnownHostsFile=/dev/null",
                "--ssh-option",
                "LogLevel=ERROR",
            ],
            &["cat"],
            &[("XDG_RUNTIME_DIR", &runtime)],
        )
        .await?;
    assert_eq!(v["address"], format!("127.0.0.1:{}", sshd.port), "{v}");
    assert_eq!(v["protocol"], "ssh", "{v}");
    let session = v["session"].as_str().context("session")?.to_owned();
    let s = fleet
        .wait_session(&session, "opened", open)
        .await
        .with_context(|| format!("sshd log:\n{}", sshd.log()))?;
    assert_eq!(s["user"], alice.name.as_str(), "{s}");

    // The one slot is the session's: bob is refused while it lasts.
    let v = fleet.connect(&bob.name).await?;
    assert_eq!(v["admitted"], false, "{v}");
    assert_eq!(v["reason"], "at-capacity", "{v}");

    // Logout: the session ends, and its slot is free again.
    let mut stdin = login.stdin.take().context("ferry-connect's stdin")?;
    stdin.write_all(b"bye\n").await?;
    drop(stdin);
    let out = tokio::time::timeout(PATIENCE, login.wait_with_output())
        .await
        .context("ssh did not end")??;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bye\n");
    assert_eq!(
        std::fs::read_dir(&runtime)?.count(),
        0,
        "the ticket's directory is gone"
    );
    let s = fleet.wait_session(&session, "ended", ended).await?;
    assert_eq!(s["end_reason"], "logout", "{s}");
    let (bob_session, bob_ticket) = fleet.admit(&bob.name).await?;

    // Bob's ticket typed by alice: refused, and not used up.
    let client = tmp.path().join("client");
    std::fs::create_dir_all(&client)?;
    let refused = |user: String, password: String| {
        let client = client.clone();
        async move {
            let out =
                servers::ssh_with_password(&client, sshd.port, &user, &password, &["true"]).await?;
            anyhow::ensure!(!out.status.success(), "{user} let in: {}", text(&out));
            anyhow::ensure!(
                String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
                "{}",
                text(&out)
            );
            Ok(())
        }
    };
    refused(alice.name.clone(), bob_ticket.clone()).await?;
    let out =
        servers::ssh_with_password(&client, sshd.port, &bob.name, &bob_ticket, &["true"]).await?;
    assert!(out.status.success(), "{}", text(&out));
    let s = fleet.wait_session(&bob_session, "ended", ended).await?;
    assert_eq!(s["user"], bob.name.as_str(), "{s}");

    // Replayed and expired: refused.
    refused(bob.name.clone(), bob_ticket).await?;
    refused(alice.name.clone(), fleet.expired_ticket(&alice.name)?).await?;
    assert_eq!(fleet.sessions().await?.len(), 2);
    Ok(())
}

/// xrdp with the shipped `xrdp-sesman` PAM file, `xfreerdp /auth-only` as
/// the client: the routed user's ticket is accepted once and opens the
/// reserved session (which ends when sesman, with no X server installed,
/// gives up); replayed, another user's and expired tickets are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xrdp_takes_a_ticket_once_through_xfreerdp() -> anyhow::Result<()> {
    servers::require(&[
        (servers::XRDP, "xrdp"),
        (servers::XRDP_SESMAN, "xrdp"),
        (servers::XFREERDP, "freerdp2-x11"),
        (servers::XVFB, "xvfb"),
    ]);
    init_logging();
    let tmp = tempfile::tempdir()?;
    let (alice, bob) = (UnixUser::create()?, UnixUser::create()?);
    let xrdp =
        servers::Xrdp::start(&tmp.path().join("xrdp"), &Fleet::agent_socket(tmp.path())).await?;
    let x = servers::Xvfb::start().await?;
    let extra = streaming(xrdp.port, "rdp");
    let fleet = Fleet::start(
        tmp.path(),
        &[&alice, &bob],
        2,
        SessionType::Independent,
        &extra,
    )
    .await?;
    let home = tmp.path().join("client");
    std::fs::create_dir_all(&home)?;
    let rdp = |user: String, password: String| {
        let (home, display) = (home.clone(), x.display.clone());
        async move { servers::xfreerdp_auth_only(&home, &display, xrdp.port, &user, &password).await }
    };
    let refused_once_more = |user: String, before: usize| {
        let xrdp = &xrdp;
        async move {
            servers::wait_for(&format!("sesman refusing {user} again"), || {
                xrdp.refusals(&user) > before
            })
            .await
            .with_context(|| format!("sesman log:\n{}", xrdp.logs()))
        }
    };

    // Alice through `ferry-connect --launch`: the ticket on xfreerdp's
    // standard input.
    let display = std::path::PathBuf::from(&x.display);
    let (login, v) = fleet
        .launch(
            &alice.name,
            &[],
            &["/auth-only", "/cert:ignore"],
            &[("DISPLAY", &display), ("HOME", &home)],
        )
        .await?;
    assert_eq!(v["protocol"], "rdp", "{v}");
    let session = v["session"].as_str().context("session")?.to_owned();
    let out = tokio::time::timeout(PATIENCE, login.wait_with_output())
        .await
        .context("xfreerdp did not end")??;
    assert!(out.status.success(), "{}", text(&out));
    let s = fleet
        .wait_session(&session, "ended", ended)
        .await
        .with_context(|| format!("sesman log:\n{}", xrdp.logs()))?;
    assert_eq!(s["user"], alice.name.as_str(), "{s}");
    assert_eq!(xrdp.refusals(&alice.name), 0, "{}", xrdp.logs());

    // Bob's ticket typed by alice: refused, and not used up: bob's login
    // with it is accepted, once.
    let (bob_session, bob_ticket) = fleet.admit(&bob.name).await?;
    rdp(alice.name.clone(), bob_ticket.clone()).await?;
    refused_once_more(alice.name.clone(), 0).await?;
    rdp(bob.name.clone(), bob_ticket.clone()).await?;
    fleet
        .wait_session(&bob_session, "ended", ended)
        .await
        .with_context(|| format!("logs:\n{}", xrdp.logs()))?;
    assert_eq!(xrdp.refusals(&bob.name), 0, "{}", xrdp.logs());
    rdp(bob.name.clone(), bob_ticket).await?;
    refused_once_more(bob.name.clone(), 0).await?;
    // Expired: refused.
    rdp(alice.name.clone(), fleet.expired_ticket(&alice.name)?).await?;
    refused_once_more(alice.name.clone(), 1).await?;
    let all = fleet.sessions().await?;
    assert_eq!(
        all.len(),
        2,
        "only the accepted logins are sessions: {all:?}"
    );
    Ok(())
}

/// A `shared` group through sshd: the user routed again gets the same
/// session with a fresh ticket, and that second login attaches to the open
/// session instead of starting another; the session ends with its last
/// login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_login_to_a_shared_session_attaches_to_it() -> anyhow::Result<()> {
    servers::require(&SSH_PROGRAMS);
    init_logging();
    let tmp = tempfile::tempdir()?;
    let alice = UnixUser::create()?;
    let sshd =
        servers::Sshd::start(&tmp.path().join("sshd"), &Fleet::agent_socket(tmp.path())).await?;
    let extra = streaming(sshd.port, "ssh");
    let fleet = Fleet::start(tmp.path(), &[&alice], 2, SessionType::Shared, &extra).await?;
    let client = tmp.path().join("client");
    std::fs::create_dir_all(&client)?;
    let login = |ticket: String| -> anyhow::Result<tokio::process::Child> {
        let mut cmd = servers::ssh_command(&client, sshd.port, &alice.name, &ticket, &["cat"])?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(cmd.spawn()?)
    };
    let logout = |mut child: tokio::process::Child| async move {
        drop(child.stdin.take());
        let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
            .await
            .context("ssh did not end")??;
        anyhow::ensure!(out.status.success(), "{}", text(&out));
        Ok(())
    };

    let (session, first_ticket) = fleet.admit(&alice.name).await?;
    let first = login(first_ticket)?;
    fleet
        .wait_session(&session, "opened", open)
        .await
        .with_context(|| format!("sshd log:\n{}", sshd.log()))?;
    let (again, second_ticket) = fleet.admit(&alice.name).await?;
    assert_eq!(
        again, session,
        "a shared group's user goes back to their session"
    );
    let second = login(second_ticket)?;
    // The second login is bound once the agent has it: wait on the agent's
    // bindings file, which names both logins' processes then.
    let bindings = tmp
        .path()
        .join(HOST)
        .join("state")
        .join(ferry_agent::pam_logins::PAM_LOGINS_FILE);
    servers::wait_for("the second login bound", || {
        std::fs::read_to_string(&bindings)
            .map(|t| t.matches(session.as_str()).count() == 2)
            .unwrap_or(false)
    })
    .await?;
    logout(first).await?;
    // Still open: the other login holds it.
    servers::wait_for("the first login unbound", || {
        std::fs::read_to_string(&bindings)
            .map(|t| t.matches(session.as_str()).count() == 1)
            .unwrap_or(false)
    })
    .await?;
    // An end would have been spooled before the unbinding: once the agent
    // is synced, the broker has every event it spooled.
    fleet.agent.wait_synced().await?;
    let all = fleet.sessions().await?;
    assert_eq!(all.len(), 1, "one session for both logins: {all:?}");
    assert!(open(&all[0]), "{all:?}");
    logout(second).await?;
    let s = fleet.wait_session(&session, "ended", ended).await?;
    assert_eq!(s["end_reason"], "logout", "{s}");
    assert_eq!(fleet.sessions().await?.len(), 1);
    Ok(())
}
