//! Session tickets end to end: the real broker sends its ticket key to a
//! real agent, which keeps it and verifies tickets on its local socket
//! (as the host's streaming server asks): once, never again (also after an
//! agent restart with the broker down), and never when expired, for
//! another host or altered.

use ferry_agent::local::{ErrorCode, LocalClient, LocalError, StartProof};
use ferry_broker::tickets::{TicketSigner, TICKET_TTL};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis, UserId};
use ferry_tests::harness::{init_logging, TestAgent, TestBroker};

fn id<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().expect("valid id in test")
}

fn wall_clock() -> UnixMillis {
    ferry_agent::clock::now()
}

fn ticket(signer: &TicketSigner, host: &str, session: &str, issued: UnixMillis) -> String {
    let (g, r, u, s): (GroupName, ResourceId, UserId, SessionId) =
        (id("g"), id(host), id("alice"), id(session));
    signer.issue(&g, &r, &u, &s, issued, TICKET_TTL).1
}

/// The refusal code of a verification that must fail.
async fn refusal(c: &mut LocalClient, ticket: String) -> ErrorCode {
    match c.verify_ticket(ticket).await {
        Err(LocalError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_are_single_use_per_host_and_survive_restarts() -> anyhow::Result<()> {
    init_logging();
    let tmp = tempfile::tempdir()?;
    let mut broker = TestBroker::start(tmp.path()).await?;
    let mut agent = TestAgent::start(&broker, "host-1").await?;
    // The broker sends TicketKey right after Welcome and before any Ack, and
    // the agent handles them in order: once a reported event is
    // acknowledged, the key is stored.
    let mut c = agent.client().await?;
    c.session_start(id("warmup"), id("bob"), StartProof::Trusted)
        .await?;
    agent.wait_synced().await?;

    // The same key file the broker loaded (created at its first start).
    let signer = TicketSigner::load_or_create(broker.pki_dir())?;
    let stored = std::fs::read(
        agent
            .config()
            .state_dir
            .join(ferry_agent::ticket::TICKET_KEY_FILE),
    )?;
    assert_eq!(stored, signer.public_key());

    let now = wall_clock();
    let t1 = ticket(&signer, "host-1", "s-1", now);
    let info = c.verify_ticket(t1.clone()).await?;
    assert_eq!(info.session.as_str(), "s-1");
    assert_eq!(info.user.as_str(), "alice");
    assert_eq!(info.group.as_str(), "g");
    assert_eq!(refusal(&mut c, t1.clone()).await, ErrorCode::TicketReused);

    // Another host, expired, altered, forged.
    let other = ticket(&signer, "host-2", "s-2", now);
    assert_eq!(refusal(&mut c, other).await, ErrorCode::TicketOtherHost);
    let old = ticket(&signer, "host-1", "s-3", UnixMillis(now.0 - 120_000));
    assert_eq!(refusal(&mut c, old).await, ErrorCode::TicketExpired);
    let t4 = ticket(&signer, "host-1", "s-4", now);
    let mut altered = t4.clone().into_bytes();
    altered[12] = if altered[12] == b'A' { b'B' } else { b'A' };
    let code = refusal(&mut c, String::from_utf8(altered)?).await;
    assert!(
        matches!(code, ErrorCode::TicketForged | ErrorCode::TicketMalformed),
        "{code:?}"
    );
    let stranger = TicketSigner::load_or_create(&tmp.path().join("other-pki"))?;
    let forged = ticket(&stranger, "host-1", "s-5", now);
    assert_eq!(refusal(&mut c, forged).await, ErrorCode::TicketForged);
    // The refused ones were not consumed: the genuine s-4 ticket still works.
    assert_eq!(c.verify_ticket(t4).await?.session.as_str(), "s-4");

    // Broker down, agent restarted: the key and the used set come from disk.
    broker.stop().await?;
    drop(c);
    agent.restart().await?;
    let mut c = agent.client().await?;
    assert_eq!(refusal(&mut c, t1).await, ErrorCode::TicketReused);
    let t6 = ticket(&signer, "host-1", "s-6", wall_clock());
    assert_eq!(c.verify_ticket(t6).await?.session.as_str(), "s-6");
    drop(c);
    agent.stop().await?;
    Ok(())
}

/// `ferryctl user ...` end to end against a running broker: passwords from
/// a file (never the command line), tokens printed once and revoked, and
/// the result checked with `GroupService::authenticate` on the broker's
/// own store and token key; then `ferry-agent ticket verify` on a host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_tickets_through_the_clis() -> anyhow::Result<()> {
    use ferry_broker::groups::service::AuthError;
    use ferry_broker::groups::GroupService;
    use ferry_broker::store::{Store, StoreOptions};
    use ferry_broker::tickets::TokenKey;
    use ferry_common::ticket::Credential;
    use ferry_tests::bins::bin;
    use ferry_tests::procs::{ferryctl_json, run};

    init_logging();
    let tmp = tempfile::tempdir()?;
    let broker = TestBroker::start(tmp.path()).await?;
    let sock = broker.admin_socket().to_owned();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "correct horse\n")?;
    let pw_arg = pw.to_str().expect("utf-8 path");
    ferryctl_json(
        &sock,
        &[
            "user",
            "create",
            "--id",
            "alice",
            "--email",
            "alice@example.com",
            "--mobile",
            "+4912345678",
            "--password-file",
            pw_arg,
        ],
    )
    .await?;
    ferryctl_json(
        &sock,
        &[
            "user",
            "create",
            "--id",
            "bob",
            "--email",
            "bob@example.com",
            "--mobile",
            "+4912345679",
        ],
    )
    .await?;
    // A password is never an argument.
    let refused = run(
        &bin("ferryctl"),
        [
            "--socket",
            sock.to_str().expect("utf-8"),
            "user",
            "set-password",
            "bob",
            "--password",
            "x",
        ],
    )
    .await?;
    assert!(!refused.status.success());
    // A one-character password is refused with the reason, before the broker.
    let short = tmp.path().join("short.pw");
    std::fs::write(&short, "x\n")?;
    let refused = run(
        &bin("ferryctl"),
        [
            "--socket",
            sock.to_str().expect("utf-8"),
            "user",
            "set-password",
            "bob",
            "--password-file",
            short.to_str().expect("utf-8"),
        ],
    )
    .await?;
    assert_eq!(refused.status.code(), Some(64), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("at least 8 characters"),
        "{refused:?}"
    );

    // The broker's store (a second connection) and token key.
    let store = Store::open(&tmp.path().join("state/ferry.db"), StoreOptions::default())?;
    let key = std::sync::Arc::new(TokenKey::load_or_create(broker.pki_dir())?);
    let groups = GroupService::new(store.clone(), Default::default()).with_token_key(key);
    let (alice, bob): (UserId, UserId) = (id("alice"), id("bob"));
    let password = |p: &str| Credential::Password(p.into());
    groups
        .authenticate(&alice, &password("correct horse"))
        .await?;
    assert!(matches!(
        groups.authenticate(&alice, &password("wrong")).await,
        Err(AuthError::BadCredentials)
    ));
    // Imported or created without a password: no password login until set.
    assert!(groups.authenticate(&bob, &password("")).await.is_err());
    std::fs::write(&pw, "b0b's secret\n")?;
    ferryctl_json(
        &sock,
        &["user", "set-password", "bob", "--password-file", pw_arg],
    )
    .await?;
    groups.authenticate(&bob, &password("b0b's secret")).await?;

    // Tokens: printed once, accepted, revoked.
    let t = ferryctl_json(&sock, &["user", "token", "alice", "--ttl", "1h"]).await?;
    let token = t["token"].as_str().expect("token").to_owned();
    groups
        .authenticate(&alice, &Credential::Token(token.clone()))
        .await?;
    assert!(groups
        .authenticate(&bob, &Credential::Token(token.clone()))
        .await
        .is_err());
    ferryctl_json(&sock, &["user", "revoke-tokens", "alice"]).await?;
    assert!(matches!(
        groups.authenticate(&alice, &Credential::Token(token)).await,
        Err(AuthError::BadCredentials)
    ));
    store.close().await;

    // `ferry-agent ticket verify` on a host that has the broker's key.
    let agent = TestAgent::start(&broker, "host-1").await?;
    let mut c = agent.client().await?;
    c.session_start(id("warmup"), id("bob"), StartProof::Trusted)
        .await?;
    agent.wait_synced().await?;
    let signer = TicketSigner::load_or_create(broker.pki_dir())?;
    let socket = agent.local_socket().to_str().expect("utf-8").to_owned();
    let verify = |t: String| {
        let socket = socket.clone();
        async move {
            run(
                &bin("ferry-agent"),
                [
                    "--socket",
                    socket.as_str(),
                    "ticket",
                    "verify",
                    t.as_str(),
                    "--json",
                ],
            )
            .await
        }
    };
    let issued = wall_clock();
    let t1 = ticket(&signer, "host-1", "s-1", issued);
    let expires = UnixMillis(issued.0 + i64::try_from(TICKET_TTL.as_millis())?);
    let ok = verify(t1.clone()).await?;
    assert!(ok.status.success(), "{ok:?}");
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout)?;
    assert_eq!(v["valid"], true);
    assert_eq!(v["session"], "s-1");
    assert_eq!(v["user"], "alice");
    // The expiry as RFC 3339, like every time ferryctl prints.
    assert_eq!(
        v["expires_at"],
        ferry_broker::render::rfc3339(expires),
        "{v}"
    );
    assert_eq!(v["expires_at_ms"], expires.0, "{v}");
    // Without --json: for people, in whole seconds.
    let t2 = ticket(&signer, "host-1", "s-2", issued);
    let text = run(
        &bin("ferry-agent"),
        ["--socket", socket.as_str(), "ticket", "verify", t2.as_str()],
    )
    .await?;
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(text.status.success(), "{text:?}");
    let expiry = format!(
        "expires_at  {}",
        ferry_broker::render::rfc3339_secs(expires)
    );
    assert!(stdout.contains(&expiry), "{stdout}");
    let again = verify(t1).await?;
    assert_eq!(again.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&again.stdout)?;
    assert_eq!(v["valid"], false);
    assert_eq!(v["reason"], "reused");
    Ok(())
}

/// `ferry-agent session start` (the streaming server's call) is accepted
/// only for a session whose ticket this host verified (also after an agent
/// restart), or with the ticket itself, or `--trusted` from root or the
/// agent's user; refusals say what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_start_needs_the_ticket_the_host_verified() -> anyhow::Result<()> {
    use ferry_tests::bins::bin;
    use ferry_tests::procs::run;

    init_logging();
    let tmp = tempfile::tempdir()?;
    let broker = TestBroker::start(tmp.path()).await?;
    let mut agent = TestAgent::start(&broker, "host-1").await?;
    let mut c = agent.client().await?;
    c.session_start(id("warmup"), id("bob"), StartProof::Trusted)
        .await?;
    agent.wait_synced().await?;
    drop(c);
    let signer = TicketSigner::load_or_create(broker.pki_dir())?;
    let socket = agent.local_socket().to_str().expect("utf-8").to_owned();
    let cli = |args: Vec<String>| {
        let socket = socket.clone();
        async move {
            let mut all = vec!["--socket".to_owned(), socket];
            all.extend(args);
            run(&bin("ferry-agent"), all).await
        }
    };
    let start = |session: &str, more: &[&str]| {
        let mut args: Vec<String> = ["session", "start", "--session", session, "--user", "alice"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.extend(more.iter().map(|s| (*s).to_owned()));
        args.push("--ack-wait=0s".to_owned());
        args
    };

    // No ticket verified for s-1: refused, saying what to do.
    let out = cli(start("s-1", &[])).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("no verified ticket for session s-1")
            && stderr.contains("ferry-agent ticket verify")
            && stderr.contains("--ticket")
            && stderr.contains("--trusted"),
        "{stderr}"
    );

    // Verified, then the agent restarts before the start: still accepted.
    let t1 = ticket(&signer, "host-1", "s-1", wall_clock());
    let ok = cli(vec!["ticket".into(), "verify".into(), t1]).await?;
    assert!(ok.status.success(), "{ok:?}");
    agent.restart().await?;
    let out = cli(start("s-1", &[])).await?;
    assert!(out.status.success(), "{out:?}");
    // The verified ticket is for alice only.
    let t2 = ticket(&signer, "host-1", "s-2", wall_clock());
    let ok = cli(vec!["ticket".into(), "verify".into(), t2]).await?;
    assert!(ok.status.success(), "{ok:?}");
    let mut as_bob = start("s-2", &[]);
    as_bob[5] = "bob".into();
    let out = cli(as_bob).await?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // The ticket given with the start: verified then and there.
    let t3 = ticket(&signer, "host-1", "s-3", wall_clock());
    let out = cli(start("s-3", &["--ticket", &t3])).await?;
    assert!(out.status.success(), "{out:?}");
    // The operator's path: one flag (the test runs as root).
    let out = cli(start("s-4", &["--trusted"])).await?;
    assert!(out.status.success(), "{out:?}");

    agent.stop().await?;
    Ok(())
}

/// Local clients that connect and say nothing (or stall in a request) hold
/// every slot of the agent's socket: they are dropped after
/// `local_idle_timeout`, and a real `ferry-agent session start` gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_local_clients_cannot_hold_every_slot() -> anyhow::Result<()> {
    use ferry_common::limits::MAX_LOCAL_CONNECTIONS;
    use ferry_tests::bins::bin;
    use ferry_tests::procs::run;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    init_logging();
    let tmp = tempfile::tempdir()?;
    let broker = TestBroker::start(tmp.path()).await?;
    let identity = broker.issue_identity("host-1")?;
    let mut config = broker.agent_config("host-1", &identity)?;
    config.local_idle_timeout = std::time::Duration::from_millis(500);
    let mut agent = TestAgent::start_with(config).await?;
    let socket = agent.local_socket().to_owned();
    let mut idle = Vec::new();
    for _ in 0..MAX_LOCAL_CONNECTIONS - 1 {
        idle.push(tokio::net::UnixStream::connect(&socket).await?);
    }
    let mut stalled = tokio::net::UnixStream::connect(&socket).await?;
    stalled.write_all(&[0, 0, 0, 40, 0]).await?;

    let out = tokio::time::timeout(
        ferry_tests::harness::PATIENCE,
        run(
            &bin("ferry-agent"),
            [
                "--socket",
                socket.to_str().expect("utf-8"),
                "session",
                "start",
                "--trusted",
                "--session",
                "s-1",
                "--user",
                "alice",
                "--ack-wait=0s",
            ],
        ),
    )
    .await??;
    assert!(out.status.success(), "{out:?}");
    // Each idle one was closed by the agent (end of stream, no answer).
    for raw in idle.iter_mut().chain(std::iter::once(&mut stalled)) {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(ferry_tests::harness::PATIENCE, raw.read(&mut buf))
            .await?
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    agent.stop().await?;
    Ok(())
}
