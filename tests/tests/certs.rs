//! Certificates expire, renew over the link and can be revoked (issue 14).
//!
//! The broker runs in-process; agents are in-process too, except the
//! elastic hosts of the local provisioner (real `ferry-agent` processes).
//! Every wait is on a status, an event or a listing, bounded by `PATIENCE`;
//! the one wait on the clock is for a certificate's own `notAfter`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_broker::clock::ManualClock;
use ferry_broker::config::{GroupsConfig, ProvisionerConfig, ProvisionerKind};
use ferry_broker::pki::{self, Validity};
use ferry_common::admin::{AdminRequestV1, AdminResponseV1, GroupSpec};
use ferry_common::{ResourceId, SessionId, UnixMillis};
use ferry_tests::admin::{agent_of, live, of_kind, publish, wait_events};
use ferry_tests::bins::bin;
use ferry_tests::harness::{
    init_logging, whole_second_now, AgentIdentity, TestAgent, TestBroker, PATIENCE,
};

fn rid(s: &str) -> ResourceId {
    s.parse().expect("resource id")
}

/// Key and certificate of `resource` from the broker's CA with `validity`,
/// in `dir/<name>`.
fn identity(
    broker: &TestBroker,
    resource: &str,
    name: &str,
    validity: Validity,
) -> anyhow::Result<AgentIdentity> {
    let out = broker.dir().join("ids").join(name);
    pki::issue_agent(broker.pki_dir(), &rid(resource), &out, validity)?;
    Ok(AgentIdentity::in_dir(&out))
}

fn info_of(path: &Path) -> anyhow::Result<pki::CertificateInfo> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(path)?;
    Ok(pki::certificate_info(der.as_ref())?)
}

/// Polls the resources and revocations listing until `check` holds.
async fn wait_listing(
    broker: &TestBroker,
    what: &str,
    mut check: impl FnMut(
        &[ferry_common::admin::ResourceInfo],
        &[ferry_common::admin::RevocationInfo],
    ) -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match broker
            .admin(AdminRequestV1::ListResourcesWithRevocations)
            .await?
        {
            AdminResponseV1::ResourcesWithRevocations {
                resources,
                revocations,
            } => {
                if check(&resources, &revocations) {
                    return Ok(());
                }
            }
            other => bail!("resources list answered {other:?}"),
        }
        if tokio::time::Instant::now() > deadline {
            bail!("not {what} after {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_and_a_valid_one_of_the_same_host_is_not(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let mut broker = TestBroker::start(dir.path()).await?;
    // Issued two hours ago for one hour.
    let expired = identity(
        &broker,
        "h1",
        "expired",
        Validity {
            issued: UnixMillis(ferry_broker::clock::now_millis().0 - 7_200_000),
            lifetime: Duration::from_secs(3600),
        },
    )?;
    let mut agent = TestAgent::start_with(broker.agent_config("h1", &expired)?).await?;
    let status = agent
        .wait_for("refused", |s| s.last_error.is_some())
        .await?;
    assert!(!status.connected);
    assert!(
        broker.resources().await?.is_empty(),
        "an expired certificate registered"
    );
    agent.stop().await?;

    let valid = identity(
        &broker,
        "h1",
        "valid",
        Validity::starting_now(pki::DEFAULT_AGENT_LIFETIME),
    )?;
    let mut agent = TestAgent::start_with(broker.agent_config("h1", &valid)?).await?;
    agent.wait_synced().await?;
    agent.stop().await?;
    broker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_renews_its_certificate_over_the_link_and_reconnects_with_it() -> anyhow::Result<()>
{
    init_logging();
    let dir = tempfile::tempdir()?;
    let lifetime = Duration::from_secs(3600);
    let mut broker = TestBroker::start_tuned(dir.path(), GroupsConfig::default(), |c| {
        c.agent_cert_lifetime = lifetime;
    })
    .await?;
    // Four seconds: due for renewal when a third is left.
    let short = identity(
        &broker,
        "h1",
        "h1",
        Validity::starting_now(Duration::from_secs(4)),
    )?;
    let old = info_of(&short.cert)?;
    let old_key = std::fs::read(&short.key)?;
    let mut agent = TestAgent::start_with(broker.agent_config("h1", &short)?).await?;
    agent.wait_synced().await?;

    // The agent renews by itself: new key and certificate on disk.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let new = loop {
        if let Ok(info) = info_of(&short.cert) {
            if info.issued != old.issued {
                break info;
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the certificate was not renewed within {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(new.resource, rid("h1"));
    assert!(
        (new.not_after.0 - new.issued.0 - 3_600_000).abs() < 1000,
        "the broker's configured lifetime: {new:?}"
    );
    assert_ne!(std::fs::read(&short.key)?, old_key, "a new key");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&short.key)?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // Once the old certificate has expired, only the new one can connect:
    // the agent comes back after a broker restart.
    let expiry = old.not_after.0 + 1000 - ferry_broker::clock::now_millis().0;
    if expiry > 0 {
        tokio::time::sleep(Duration::from_millis(expiry as u64)).await;
    }
    broker.restart().await?;
    agent.wait_disconnected().await.ok();
    let status = agent.wait_synced().await?;
    assert!(status.connected);
    assert_eq!(broker.resources().await?.len(), 1);
    agent.stop().await?;
    broker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_host_is_cut_off_at_once_stays_refused_after_a_restart_and_a_new_certificate_admits_it(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let mut broker = TestBroker::start(dir.path()).await?;
    publish(&broker, spec("rg")).await?;
    let mut agent = agent_of(&broker, "h1", "rg").await?;
    let identity = broker.issue_identity("h1")?;

    let answer = broker
        .admin(AdminRequestV1::ResourceRevoke {
            resource: rid("h1"),
            reason: "laptop stolen".into(),
        })
        .await?;
    let AdminResponseV1::Done { message } = answer else {
        bail!("revoke answered {answer:?}");
    };
    assert!(message.contains("live connection was closed"), "{message}");
    // Closed at once, with the reason.
    let status = agent
        .wait_for("refused as revoked", |s| {
            !s.connected
                && s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("Revoked"))
        })
        .await?;
    assert!(!status.connected);
    let evs = wait_events(&broker, "rg", "revoked", 1).await?;
    let revoked = of_kind(&evs, "revoked");
    assert!(
        revoked[0].message.contains("h1") && revoked[0].message.contains("laptop stolen"),
        "{revoked:?}"
    );
    wait_listing(&broker, "listed as revoked", |rs, revoked| {
        rs.iter().any(|r| r.resource == rid("h1") && !r.connected)
            && revoked
                .iter()
                .any(|r| r.resource == rid("h1") && r.reason == "laptop stolen")
    })
    .await?;
    agent.stop().await?;

    // Still refused after a restart.
    broker.restart().await?;
    let mut agent = TestAgent::start_with(broker.agent_config("h1", &identity)?).await?;
    let status = agent
        .wait_for("refused as revoked", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("Revoked"))
        })
        .await?;
    assert!(!status.connected);
    agent.stop().await?;

    // A certificate issued after the revocation admits it again.
    let fresh = self::identity(
        &broker,
        "h1",
        "fresh",
        Validity::starting_now(pki::DEFAULT_AGENT_LIFETIME),
    )?;
    let mut agent = TestAgent::start_with(broker.agent_config("h1", &fresh)?).await?;
    agent.wait_synced().await?;
    agent.stop().await?;
    broker.stop().await?;
    Ok(())
}

fn spec(name: &str) -> GroupSpec {
    let mut spec = ferry_tests::admin::pay_as_you_go(name, 1);
    spec.policy.concurrent_sessions = Some(1);
    spec.policy.usage_threshold = Some(50);
    spec.policy.max_idle_ms = Some(600_000);
    spec.policy.scale_in_cooldown_ms = Some(300_000);
    spec
}

fn local_dir(broker: &TestBroker, resource: &str) -> PathBuf {
    broker
        .dir()
        .join("state")
        .join(ferry_broker::provision::local::LOCAL_AGENTS_DIR)
        .join(resource)
}

/// Publishes group `g`, fills its base host `<base>` with one session, and
/// waits until its elastic host `g-e1` (a local agent) enrolled for the
/// `n`-th time and is ready.
async fn busy_group_with_e1(
    broker: &TestBroker,
    base: &str,
    n: usize,
) -> anyhow::Result<TestAgent> {
    publish(broker, spec("g")).await?;
    let h = agent_of(broker, base, "g").await?;
    let mut client = h.client().await?;
    client
        .session_start(
            "s1".parse::<SessionId>()?,
            "alice".parse()?,
            ferry_agent::local::StartProof::Trusted,
        )
        .await?;
    h.wait_synced().await?;
    wait_events(broker, "g", "enrolled", 1).await?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let view = live(broker, "g").await?;
        if view
            .resources
            .iter()
            .any(|r| r.resource == rid("g-e1") && r.state == "ready")
        {
            return Ok(h);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("g-e1 (enrollment {n}) not ready: {view:?}");
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_key_of_a_reused_elastic_name_cannot_claim_the_new_groups_host(
) -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(whole_second_now());
    let groups = GroupsConfig {
        clock: clock.clock(),
        provisioner: ProvisionerConfig {
            kind: ProvisionerKind::Local {
                agent_binary: Some(bin("ferry-agent")),
            },
            attempts: 3,
            ..ProvisionerConfig::default()
        },
        ..GroupsConfig::default()
    };
    let mut broker = TestBroker::start_with_groups(dir.path(), groups).await?;

    // Group g, its elastic host g-e1 enrolled; its key is kept aside (a
    // retired machine that kept its disk).
    let mut h1 = busy_group_with_e1(&broker, "h1", 1).await?;
    let kept = dir.path().join("kept");
    std::fs::create_dir_all(&kept)?;
    for file in [pki::AGENT_CERT, pki::AGENT_KEY] {
        std::fs::copy(local_dir(&broker, "g-e1").join(file), kept.join(file))
            .with_context(|| format!("keep {file}"))?;
    }
    std::fs::copy(broker.pki_dir().join(pki::CA_CERT), kept.join(pki::CA_CERT))?;
    h1.stop().await?;
    let purged = broker
        .admin(AdminRequestV1::GroupPurge {
            group: "g".parse()?,
        })
        .await?;
    assert!(matches!(purged, AdminResponseV1::Done { .. }), "{purged:?}");
    wait_events(&broker, "g", "deleted", 1).await?;

    // A new group of the same name: its elastic host is g-e1 again, a new
    // machine enrolled with a new token.
    let mut h2 = busy_group_with_e1(&broker, "h2", 2).await?;

    // The old key is refused; the new machine keeps its place.
    let mut config = broker.agent_config("g-e1", &AgentIdentity::in_dir(&kept))?;
    config.group = Some("g".parse()?);
    let mut old = TestAgent::start_with(config).await?;
    let status = old
        .wait_for("refused as revoked", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("Revoked"))
        })
        .await?;
    assert!(!status.connected);
    old.stop().await?;
    let view = live(&broker, "g").await?;
    assert!(
        view.resources
            .iter()
            .any(|r| r.resource == rid("g-e1") && r.state == "ready"),
        "{view:?}"
    );
    let listed = broker.resources().await?;
    assert!(
        listed
            .iter()
            .any(|r| r.resource == rid("g-e1") && r.connected),
        "the new g-e1 stays connected: {listed:?}"
    );
    h2.stop().await?;
    broker.stop().await?;
    Ok(())
}
