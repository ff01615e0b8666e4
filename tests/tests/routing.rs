//! Routing end users through the broker (issue 5, SPEC section 8), in one
//! process: a real broker with a manual group clock, real agents of the
//! group, and real route clients (`ferry_broker::routing::RouteClient`, what
//! `ferry-connect` uses) on the broker's QUIC endpoint.
//!
//! Every wait is on a signal (readiness, an answer, a synced agent); loops
//! that poll the broker's view are bounded by `PATIENCE`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_agent::local::StartProof;
use ferry_agent::local::{ErrorCode, LocalClient, LocalError};
use ferry_broker::clock::ManualClock;
use ferry_broker::config::{GroupsConfig, RouteLimits};
use ferry_broker::routing::{RouteAnswer, RouteClient};
use ferry_broker::{pki, tickets::TICKET_TTL};
use ferry_common::admin::{
    AdminRequestV1, AdminResponseV1, BillingSpec, GroupEventInfo, GroupSpec, LiveGroupView,
    PolicySpec, Secret, SessionType, UserSpec,
};
use ferry_common::route::{Admission, RouteAsk, RouteRefusal};
use ferry_common::ticket::Credential;
use ferry_common::wire::EndReason;
use ferry_common::{GroupName, UnixMillis, UserId};
use ferry_tests::admin::{self, agent_of, publish};
use ferry_tests::harness::{init_logging, TestAgent, TestBroker, PATIENCE};

/// The catalog spec taking the most sessions per host (6). The test
/// machine is smaller: its agents are flagged and still used.
const SPEC: &str = "gpu-14c93g";

fn uid(s: &str) -> UserId {
    s.parse().expect("user id")
}

fn gname(s: &str) -> GroupName {
    s.parse().expect("group name")
}

struct Fixture {
    broker: TestBroker,
    clock: ManualClock,
    agents: Vec<TestAgent>,
    _dir: tempfile::TempDir,
}

struct GroupShape<'a> {
    name: &'a str,
    base: u32,
    concurrent: u32,
    wait_timeout_ms: u64,
    session_type: SessionType,
    users: &'a [&'a str],
}

impl GroupShape<'_> {
    fn spec(&self) -> GroupSpec {
        GroupSpec {
            name: Some(gname(self.name)),
            region: "cn-hangzhou".into(),
            office_network: "office-net-1".into(),
            spec: SPEC.into(),
            image: "img-1".into(),
            billing: BillingSpec::PayAsYouGo,
            base_resources: self.base,
            session_type: self.session_type,
            users: self.users.iter().map(|u| uid(u)).collect(),
            policy: PolicySpec {
                concurrent_sessions: Some(self.concurrent),
                usage_threshold: Some(100),
                scale_out_step: Some(1),
                max_elastic: Some(0),
                max_idle_ms: Some(3_600_000),
                wait_timeout_ms: Some(self.wait_timeout_ms),
                ..PolicySpec::default()
            },
        }
    }
}

/// A broker (manual clock at `start`), the users, the group and `agents`
/// agents `h1..` of it, each synced.
async fn fixture(
    shape: GroupShape<'_>,
    agents: usize,
    start: UnixMillis,
    extra_users: &[&str],
) -> anyhow::Result<Fixture> {
    fixture_with(shape, agents, start, extra_users, RouteLimits::default()).await
}

/// [`fixture`] with these `[routing]` limits.
async fn fixture_with(
    shape: GroupShape<'_>,
    agents: usize,
    start: UnixMillis,
    extra_users: &[&str],
    routing: RouteLimits,
) -> anyhow::Result<Fixture> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(start);
    let config = GroupsConfig {
        clock: clock.clock(),
        routing,
        ..GroupsConfig::default()
    };
    let broker = TestBroker::start_with_groups(dir.path(), config).await?;
    for u in shape.users.iter().chain(extra_users) {
        broker
            .admin(AdminRequestV1::UserCreateWithPassword {
                user: UserSpec {
                    id: uid(u),
                    email: format!("{u}@example.com"),
                    mobile: "+8613800000000".into(),
                },
                password: Secret(format!("password-{u}")),
            })
            .await?;
    }
    publish(&broker, shape.spec()).await?;
    let mut started = Vec::new();
    for i in 1..=agents {
        started.push(agent_of(&broker, &format!("h{i}"), shape.name).await?);
    }
    Ok(Fixture {
        broker,
        clock,
        agents: started,
        _dir: dir,
    })
}

fn wall_now() -> UnixMillis {
    ferry_broker::clock::now_millis()
}

impl Fixture {
    async fn client(&self) -> anyhow::Result<RouteClient> {
        Ok(RouteClient::connect(
            self.broker.agent_addr(),
            "localhost",
            &self.broker.pki_dir().join(pki::CA_CERT),
        )
        .await?)
    }

    async fn token(&self, user: &str) -> anyhow::Result<String> {
        match self
            .broker
            .admin(AdminRequestV1::UserToken {
                user: uid(user),
                ttl_secs: 3600,
            })
            .await?
        {
            AdminResponseV1::UserToken { token, .. } => Ok(token),
            other => bail!("token answered {other:?}"),
        }
    }

    fn agent(&self, resource: &str) -> anyhow::Result<&TestAgent> {
        self.agents
            .iter()
            .find(|a| a.config().resource.as_str() == resource)
            .with_context(|| format!("no agent {resource}"))
    }

    async fn live(&self, group: &str) -> anyhow::Result<LiveGroupView> {
        admin::live(&self.broker, group).await
    }

    async fn events(&self, group: &str) -> anyhow::Result<Vec<GroupEventInfo>> {
        admin::events(&self.broker, group).await
    }

    /// Starts `a`'s session on its agent as the streaming server would
    /// after the ticket checked out, and waits until the broker has it.
    async fn start_session(&self, a: &Admission, user: &str) -> anyhow::Result<()> {
        let agent = self.agent(a.resource.as_str())?;
        let mut c = agent.client().await?;
        c.session_start(a.session.clone(), uid(user), StartProof::Trusted)
            .await?;
        agent.wait_synced().await?;
        Ok(())
    }
}

fn ask(group: &str, user: &str, credential: Credential, wait: bool) -> RouteAsk {
    RouteAsk {
        group: gname(group),
        user: uid(user),
        credential,
        wait,
    }
}

fn password(user: &str) -> Credential {
    Credential::Password(format!("password-{user}"))
}

/// `user` asks for `group` with their password, not waiting for room.
async fn launch(c: &RouteClient, group: &str, user: &str) -> anyhow::Result<RouteAnswer> {
    Ok(c.route(ask(group, user, password(user), false), |_| {})
        .await?)
}

fn admitted(answer: RouteAnswer) -> anyhow::Result<Admission> {
    match answer {
        RouteAnswer::Admitted(a) => Ok(a),
        RouteAnswer::Refused(r) => bail!("refused ({}): {}", r.reason, r.message),
        RouteAnswer::Redirect(a) => bail!("sent to another broker at {a}"),
    }
}

fn refusal(answer: RouteAnswer) -> anyhow::Result<(RouteRefusal, String)> {
    match answer {
        RouteAnswer::Refused(r) => Ok((r.reason, r.message)),
        RouteAnswer::Admitted(a) => bail!("admitted unexpectedly: {a:?}"),
        RouteAnswer::Redirect(a) => bail!("sent to another broker at {a}"),
    }
}

/// Makes sure the agent holds the broker's ticket key: the key is sent
/// right after `Welcome` and stored before any later message is handled,
/// so once an event reported after it is acknowledged, the key is there.
async fn key_ready(agent: &TestAgent) -> anyhow::Result<()> {
    let mut c = agent.client().await?;
    let s: ferry_common::SessionId = format!("warm-{}", agent.config().resource).parse()?;
    c.session_start(s.clone(), uid("warm"), StartProof::Trusted)
        .await?;
    c.session_end(s, EndReason::Logout).await?;
    agent.wait_synced().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_simultaneous_requests_admit_exactly_the_room_of_a_hundred() -> anyhow::Result<()>
{
    let users: Vec<String> = (1..=10).map(|i| format!("u{i}")).collect();
    let user_refs: Vec<&str> = users.iter().map(String::as_str).collect();
    // Ten users asking 100 times each at once: a portal's load, above the
    // default allowance of one user (`route_limits.rs` tests that one).
    let f = fixture_with(
        GroupShape {
            name: "burst",
            base: 20,
            concurrent: 5,
            wait_timeout_ms: 0,
            session_type: SessionType::Independent,
            users: &user_refs,
        },
        20,
        wall_now(),
        &[],
        RouteLimits {
            max_requests_per_user: 1_000,
            ..RouteLimits::default()
        },
    )
    .await?;
    let mut tokens = HashMap::new();
    for u in &users {
        tokens.insert(u.clone(), f.token(u).await?);
    }
    // Four connections, 250 concurrent requests each, all in flight at once.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Arc::new(f.client().await?));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000usize {
        let client = clients[i % clients.len()].clone();
        let user = users[i % users.len()].clone();
        let token = tokens[&user].clone();
        tasks.spawn(async move {
            let answer = client
                .route(ask("burst", &user, Credential::Token(token), false), |_| {})
                .await;
            (user, answer)
        });
    }
    let mut admissions = Vec::new();
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    let all = tokio::time::timeout(PATIENCE * 4, async {
        while let Some(done) = tasks.join_next().await {
            let (user, answer) = done?;
            match answer? {
                RouteAnswer::Admitted(a) => admissions.push((user, a)),
                RouteAnswer::Refused(r) => *refused.entry(r.reason.to_string()).or_default() += 1,
                RouteAnswer::Redirect(a) => anyhow::bail!("sent to another broker at {a}"),
            }
        }
        anyhow::Ok(())
    })
    .await;
    all.context("the burst did not finish")??;
    assert_eq!(admissions.len(), 100, "refusals: {refused:?}");
    assert_eq!(refused, BTreeMap::from([("at-capacity".to_owned(), 900)]));
    // Never more than concurrent_sessions per host: the tickets name 5 each.
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for (_, a) in &admissions {
        *per_host.entry(a.resource.to_string()).or_default() += 1;
        assert_eq!(a.address, "127.0.0.1:8443", "default streaming address");
    }
    assert_eq!(per_host.len(), 20, "{per_host:?}");
    assert!(per_host.values().all(|&n| n == 5), "{per_host:?}");
    let sessions: std::collections::BTreeSet<_> =
        admissions.iter().map(|(_, a)| a.session.clone()).collect();
    assert_eq!(sessions.len(), 100, "session ids are unique");
    let l = f.live("burst").await?;
    assert_eq!((l.demand, l.capacity), (100, 100));

    // The clients arrive: every reservation becomes its session on the
    // host it was reserved on, and demand stays 100 (no double count).
    for (user, a) in &admissions {
        f.agent(a.resource.as_str())?
            .client()
            .await?
            .session_start(a.session.clone(), uid(user), StartProof::Trusted)
            .await?;
    }
    for agent in &f.agents {
        agent.wait_synced().await?;
    }
    let l = f.live("burst").await?;
    assert_eq!(l.demand, 100);
    for r in &l.resources {
        assert_eq!(r.sessions.len(), 5, "{}: {:?}", r.resource, r.sessions);
    }
    // Still full: one more request is refused.
    let c = f.client().await?;
    let (reason, _) = refusal(
        c.route(
            ask(
                "burst",
                "u1",
                Credential::Token(tokens["u1"].clone()),
                false,
            ),
            |_| {},
        )
        .await?,
    )?;
    assert_eq!(reason, RouteRefusal::AtCapacity);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_are_checked_by_the_agent_tampered_reused_other_host_and_expired(
) -> anyhow::Result<()> {
    let f = fixture(
        GroupShape {
            name: "tix",
            base: 2,
            concurrent: 2,
            wait_timeout_ms: 0,
            session_type: SessionType::Independent,
            users: &["alice"],
        },
        2,
        wall_now(),
        &[],
    )
    .await?;
    for a in &f.agents {
        key_ready(a).await?;
    }
    let c = f.client().await?;
    let a = admitted(launch(&c, "tix", "alice").await?)?;
    let other = if a.resource.as_str() == "h1" {
        "h2"
    } else {
        "h1"
    };
    let mut mine: LocalClient = f.agent(a.resource.as_str())?.client().await?;
    let mut theirs: LocalClient = f.agent(other)?.client().await?;

    // Tampered: one character of the claims changed.
    let mut tampered = a.ticket.clone().into_bytes();
    let i = 10;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered)?;
    let err = mine.verify_ticket(tampered).await.expect_err("tampered");
    assert!(
        matches!(
            err,
            LocalError::Refused {
                code: ErrorCode::TicketForged | ErrorCode::TicketMalformed,
                ..
            }
        ),
        "{err:?}"
    );
    // Another host: refused there, and that does not use it up.
    let err = theirs
        .verify_ticket(a.ticket.clone())
        .await
        .expect_err("other host");
    assert!(
        matches!(
            err,
            LocalError::Refused {
                code: ErrorCode::TicketOtherHost,
                ..
            }
        ),
        "{err:?}"
    );
    // Valid once on its host, then reused.
    let info = mine.verify_ticket(a.ticket.clone()).await?;
    assert_eq!(
        (info.session.clone(), info.user.clone()),
        (a.session.clone(), uid("alice"))
    );
    let err = mine
        .verify_ticket(a.ticket.clone())
        .await
        .expect_err("reused");
    assert!(
        matches!(
            err,
            LocalError::Refused {
                code: ErrorCode::TicketReused,
                ..
            }
        ),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_ticket_is_refused_by_the_agent_and_its_unused_slot_is_freed(
) -> anyhow::Result<()> {
    // The group clock stands ten minutes behind the hosts' wall clocks, so
    // a ticket it issues has expired for the agent already.
    let start = UnixMillis(wall_now().0 - 600_000);
    let f = fixture(
        GroupShape {
            name: "late",
            base: 1,
            concurrent: 1,
            wait_timeout_ms: 0,
            session_type: SessionType::Independent,
            users: &["alice", "bob"],
        },
        1,
        start,
        &[],
    )
    .await?;
    key_ready(&f.agents[0]).await?;
    let c = f.client().await?;
    let a = admitted(launch(&c, "late", "alice").await?)?;
    assert_eq!(a.expires_at.0 - start.0, TICKET_TTL.as_millis() as i64);
    let err = f.agents[0]
        .client()
        .await?
        .verify_ticket(a.ticket.clone())
        .await
        .expect_err("expired");
    assert!(
        matches!(
            err,
            LocalError::Refused {
                code: ErrorCode::TicketExpired,
                ..
            }
        ),
        "{err:?}"
    );
    // The slot is reserved until the ticket's expiry on the group clock...
    let (reason, _) = refusal(launch(&c, "late", "bob").await?)?;
    assert_eq!(reason, RouteRefusal::AtCapacity);
    // ...then freed, with a `ticket-expired` event, and bob gets it.
    f.clock.advance(TICKET_TTL + Duration::from_secs(1));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let evs = f.events("late").await?;
        if evs.iter().any(|e| e.kind == "ticket-expired") {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no ticket-expired event: {evs:?}");
        }
        tokio::task::yield_now().await;
    }
    let b = admitted(launch(&c, "late", "bob").await?)?;
    assert_eq!(b.resource.as_str(), "h1");
    assert_ne!(b.session, a.session);
    Ok(())
}

/// Polls `group`'s live view until `ok` holds.
async fn wait_live(
    f: &Fixture,
    group: &str,
    ok: impl Fn(&LiveGroupView) -> bool,
) -> anyhow::Result<LiveGroupView> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let live = f.live(group).await?;
        if ok(&live) {
            return Ok(live);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{group} never got there: {live:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A ticket given out before a restart counts against its user's
/// `max_requests_per_user` even while its host has not joined again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_reservation_counts_against_its_user_before_its_host_is_back(
) -> anyhow::Result<()> {
    let mut f = fixture_with(
        GroupShape {
            name: "held",
            base: 1,
            concurrent: 2,
            wait_timeout_ms: 0,
            session_type: SessionType::Independent,
            users: &["alice"],
        },
        1,
        wall_now(),
        &[],
        RouteLimits {
            max_requests_per_user: 1,
            ..RouteLimits::default()
        },
    )
    .await?;
    key_ready(&f.agents[0]).await?;
    admitted(launch(&f.client().await?, "held", "alice").await?)?;
    // The host stays away while the broker restarts.
    f.agents[0].stop().await?;
    f.broker.restart().await?;
    let (reason, message) = refusal(launch(&f.client().await?, "held", "alice").await?)?;
    assert_eq!(reason, RouteRefusal::UserLimit, "{message}");
    Ok(())
}

/// A ticket given out keeps its slot when the broker restarts before the
/// ticket's client arrives (the reservation is written before the ticket
/// is given): once the host is back, another user is still refused; the
/// ticket's session takes its reserved slot; when it ends, the slot is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_reserved_by_a_ticket_survives_a_broker_restart() -> anyhow::Result<()> {
    let mut f = fixture(
        GroupShape {
            name: "kept",
            base: 1,
            concurrent: 1,
            wait_timeout_ms: 0,
            session_type: SessionType::Independent,
            users: &["alice", "bob"],
        },
        1,
        wall_now(),
        &[],
    )
    .await?;
    key_ready(&f.agents[0]).await?;
    let a = admitted(launch(&f.client().await?, "kept", "alice").await?)?;

    f.broker.restart().await?;
    // The host is back and takes sessions: only the reservation fills it.
    wait_live(&f, "kept", |l| {
        l.resources
            .iter()
            .any(|r| r.resource.as_str() == "h1" && r.available)
    })
    .await?;
    let c = f.client().await?;
    let (reason, message) = refusal(launch(&c, "kept", "bob").await?)?;
    assert_eq!(reason, RouteRefusal::AtCapacity, "{message}");
    let events = f.events("kept").await?;
    assert!(
        events
            .iter()
            .any(|e| e.kind == "restored" && e.message.contains("1 reserved slot")),
        "{events:?}"
    );

    // Alice's client arrives with the ticket of before: her reserved slot.
    f.start_session(&a, "alice").await?;
    let live = wait_live(&f, "kept", |l| {
        l.resources.iter().any(|r| r.sessions.contains(&a.session))
    })
    .await?;
    assert_eq!(
        live.resources
            .iter()
            .map(|r| r.sessions.len())
            .sum::<usize>(),
        1
    );
    let events = f.events("kept").await?;
    assert!(
        !events.iter().any(|e| e.message.contains("was reserved on")),
        "{events:?}"
    );
    let (reason, _) = refusal(launch(&c, "kept", "bob").await?)?;
    assert_eq!(reason, RouteRefusal::AtCapacity);

    f.agent("h1")?
        .client()
        .await?
        .session_end(a.session.clone(), EndReason::Logout)
        .await?;
    f.agent("h1")?.wait_synced().await?;
    let b = admitted(launch(&c, "kept", "bob").await?)?;
    assert_eq!(b.resource.as_str(), "h1");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_their_reason_and_credentials_failures_say_the_same() -> anyhow::Result<()> {
    let f = fixture(
        GroupShape {
            name: "guard",
            base: 1,
            concurrent: 1,
            wait_timeout_ms: 0,
            session_type: SessionType::Independent,
            users: &["alice"],
        },
        1,
        wall_now(),
        &["mallory"],
    )
    .await?;
    let c = f.client().await?;
    let (reason, message) = refusal(launch(&c, "guard", "mallory").await?)?;
    assert_eq!(reason, RouteRefusal::NotAssigned);
    assert!(
        message.contains("mallory") && message.contains("guard"),
        "{message}"
    );

    let (wrong, wrong_msg) = refusal(
        c.route(
            ask("guard", "alice", Credential::Password("nope".into()), false),
            |_| {},
        )
        .await?,
    )?;
    let (unknown, unknown_msg) = refusal(
        c.route(
            ask("guard", "nobody", Credential::Password("x".into()), false),
            |_| {},
        )
        .await?,
    )?;
    assert_eq!(wrong, RouteRefusal::BadCredentials);
    assert_eq!(unknown, RouteRefusal::BadCredentials);
    assert_eq!(wrong_msg, unknown_msg, "never says which part was wrong");

    let (reason, _) = refusal(launch(&c, "nosuch", "alice").await?)?;
    assert_eq!(reason, RouteRefusal::NoSuchGroup);
    // And the right password gets in.
    admitted(launch(&c, "guard", "alice").await?)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_host_is_never_chosen() -> anyhow::Result<()> {
    let f = fixture(
        GroupShape {
            name: "drn",
            base: 2,
            concurrent: 2,
            wait_timeout_ms: 0,
            session_type: SessionType::Independent,
            users: &["alice"],
        },
        2,
        wall_now(),
        &[],
    )
    .await?;
    f.broker
        .admin(AdminRequestV1::Drain {
            resource: "h1".parse()?,
        })
        .await?;
    // The drain reaches the group with the agent's next health report.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let l = f.live("drn").await?;
        if l.resources
            .iter()
            .any(|r| r.resource.as_str() == "h1" && !r.available)
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("h1 still available: {l:?}");
        }
        tokio::task::yield_now().await;
    }
    let c = f.client().await?;
    for _ in 0..2 {
        let a = admitted(launch(&c, "drn", "alice").await?)?;
        assert_eq!(a.resource.as_str(), "h2");
    }
    let (reason, _) = refusal(launch(&c, "drn", "alice").await?)?;
    assert_eq!(reason, RouteRefusal::AtCapacity);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_is_admitted_when_a_resource_becomes_ready() -> anyhow::Result<()> {
    // Two base slots, one agent so far: room for one session.
    let f = fixture(
        GroupShape {
            name: "queue",
            base: 2,
            concurrent: 1,
            wait_timeout_ms: 600_000,
            session_type: SessionType::Independent,
            users: &["alice", "bob", "carol"],
        },
        1,
        wall_now(),
        &[],
    )
    .await?;
    let c = Arc::new(f.client().await?);
    admitted(
        c.route(ask("queue", "alice", password("alice"), true), |_| {})
            .await?,
    )?;
    // Without --wait: refused at once.
    let (reason, _) = refusal(launch(&c, "queue", "carol").await?)?;
    assert_eq!(reason, RouteRefusal::AtCapacity);
    // With --wait: queued, told its place.
    let (pos_tx, pos_rx) = tokio::sync::oneshot::channel();
    let waiting = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut pos_tx = Some(pos_tx);
            c.route(ask("queue", "bob", password("bob"), true), move |p| {
                if let Some(tx) = pos_tx.take() {
                    let _ = tx.send(p);
                }
            })
            .await
        })
    };
    let position = tokio::time::timeout(PATIENCE, pos_rx).await??;
    assert_eq!(position, 1);
    // A second host of the group comes up: the waiting request takes it.
    let _h2 = agent_of(&f.broker, "h2", "queue").await?;
    let b = admitted(tokio::time::timeout(PATIENCE, waiting).await???)?;
    assert_eq!(b.resource.as_str(), "h2");
    // Admitted the moment the host joined: its address is already known
    // (the address its connection comes from, the default streaming port).
    assert_eq!(
        b.address,
        format!("127.0.0.1:{}", ferry_common::route::DEFAULT_STREAMING_PORT),
        "a waiting user admitted at join gets the host's address"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_groups_give_a_user_the_same_session_independent_ones_a_new_one(
) -> anyhow::Result<()> {
    let f = fixture(
        GroupShape {
            name: "shr",
            base: 2,
            concurrent: 2,
            wait_timeout_ms: 0,
            session_type: SessionType::Shared,
            users: &["alice", "bob"],
        },
        2,
        wall_now(),
        &[],
    )
    .await?;
    let c = f.client().await?;
    let a1 = admitted(launch(&c, "shr", "alice").await?)?;
    let a2 = admitted(launch(&c, "shr", "alice").await?)?;
    assert_eq!((&a1.resource, &a1.session), (&a2.resource, &a2.session));
    assert_ne!(a1.ticket, a2.ticket, "a new ticket each time");
    f.start_session(&a1, "alice").await?;
    let a3 = admitted(launch(&c, "shr", "alice").await?)?;
    assert_eq!(a3.session, a1.session, "joins the running session");
    let b = admitted(launch(&c, "shr", "bob").await?)?;
    assert_ne!(b.session, a1.session);
    assert_eq!(f.live("shr").await?.demand, 2, "one slot per user");

    let g = fixture(
        GroupShape {
            name: "ind",
            base: 1,
            concurrent: 2,
            wait_timeout_ms: 0,
            session_type: SessionType::Independent,
            users: &["alice"],
        },
        1,
        wall_now(),
        &[],
    )
    .await?;
    let c = g.client().await?;
    let i1 = admitted(launch(&c, "ind", "alice").await?)?;
    let i2 = admitted(launch(&c, "ind", "alice").await?)?;
    assert_ne!(i1.session, i2.session);
    let (reason, _) = refusal(launch(&c, "ind", "alice").await?)?;
    assert_eq!(reason, RouteRefusal::AtCapacity, "each launch takes a slot");
    Ok(())
}

/// Polls the group's events until one satisfies `what` (bounded).
async fn wait_event(
    f: &Fixture,
    group: &str,
    what: impl Fn(&GroupEventInfo) -> bool,
) -> anyhow::Result<GroupEventInfo> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let evs = f.events(group).await?;
        if let Some(e) = evs.iter().find(|e| what(e)) {
            return Ok(e.clone());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no such event in {group}: {evs:?}");
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_session_is_kept_for_its_user_then_ended_after_the_retention(
) -> anyhow::Result<()> {
    let mut f = fixture(
        GroupShape {
            name: "ret",
            base: 1,
            concurrent: 1,
            wait_timeout_ms: 0,
            session_type: SessionType::Independent,
            users: &["alice", "bob"],
        },
        0,
        wall_now(),
        &[],
    )
    .await?;
    // The host's disconnect hook writes the session id it was asked to end.
    let asked = f.broker.dir().join("asked-to-end");
    let identity = f.broker.issue_identity("h1")?;
    let mut config = f.broker.agent_config("h1", &identity)?;
    config.group = Some("ret".parse()?);
    ferry_tests::admin::assign(&f.broker, "h1", "ret").await?;
    config.streaming = ferry_agent::config::parse_streaming_address("stream-1.example:9000")
        .map_err(anyhow::Error::msg)?;
    config.hooks.disconnect = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("printf %s \"$1\" > {}", asked.display()),
    ]);
    let h1 = TestAgent::start_with(config).await?;
    h1.wait_synced().await?;
    f.agents.push(h1);

    let c = f.client().await?;
    let a = admitted(launch(&c, "ret", "alice").await?)?;
    assert_eq!(
        a.address, "stream-1.example:9000",
        "the agent's streaming_address"
    );
    f.start_session(&a, "alice").await?;
    let mut local = f.agents[0].client().await?;
    local.session_presence(a.session.clone(), true).await?;
    wait_event(&f, "ret", |e| e.kind == "session-disconnected").await?;
    // `sessions list` says it is retained, since when and until when.
    let AdminResponseV1::SessionsDetailed(listed) = f
        .broker
        .admin(AdminRequestV1::ListSessionsDetailed { all: false })
        .await?
    else {
        bail!("not a detailed session list");
    };
    let kept = listed
        .iter()
        .find(|s| s.info.session == a.session)
        .context("the retained session is listed")?;
    assert_eq!(kept.state, "retained", "{kept:?}");
    assert_eq!(kept.group.as_ref().map(|g| g.as_str()), Some("ret"));
    let since = kept.disconnected_at.context("disconnected at")?;
    assert_eq!(since, f.clock.now());
    let retention = i64::try_from(ferry_broker::engine::DEFAULT_RETENTION.as_millis())?;
    assert_eq!(kept.retained_until, Some(UnixMillis(since.0 + retention)));
    // `group events --json` names the session and the resource.
    let AdminResponseV1::GroupEventsDetailed(events) = f
        .broker
        .admin(AdminRequestV1::GroupEventsDetailed {
            group: gname("ret"),
        })
        .await?
    else {
        bail!("not detailed events");
    };
    let disconnected = events
        .iter()
        .find(|e| e.event.kind == "session-disconnected")
        .context("the disconnect event")?;
    assert_eq!(disconnected.group.as_str(), "ret");
    assert_eq!(disconnected.session.as_ref(), Some(&a.session));
    let json = ferry_broker::render::group_events_detail_json(&events);
    let shown = json
        .as_array()
        .and_then(|all| all.iter().find(|e| e["kind"] == "session-disconnected"))
        .context("the disconnect event in JSON")?;
    assert_eq!(shown["group"], "ret", "{shown}");
    assert_eq!(shown["session"], a.session.as_str(), "{shown}");
    assert_eq!(shown["resource"], "h1", "{shown}");
    assert!(
        shown["at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{shown}"
    );
    assert_eq!(disconnected.resource.as_ref(), Some(&a.resource));

    // The slot stays taken: bob is refused, alice goes back to her session.
    let (reason, _) = refusal(launch(&c, "ret", "bob").await?)?;
    assert_eq!(reason, RouteRefusal::AtCapacity);
    let back = admitted(launch(&c, "ret", "alice").await?)?;
    assert_eq!((&back.resource, &back.session), (&a.resource, &a.session));
    assert_ne!(back.ticket, a.ticket);

    // She never reconnects: past the retention the agent is asked to end it.
    f.clock
        .advance(ferry_broker::engine::DEFAULT_RETENTION + Duration::from_secs(1));
    wait_event(&f, "ret", |e| e.kind == "retention-ended").await?;
    wait_event(&f, "ret", |e| {
        e.kind == "disconnected" && e.message.contains(a.session.as_str())
    })
    .await?;
    assert_eq!(std::fs::read_to_string(&asked)?, a.session.as_str());
    // The host ends it as usual; it is metered, and its slot is free.
    local
        .session_end(a.session.clone(), EndReason::Disconnected)
        .await?;
    f.agents[0].wait_synced().await?;
    let all = f.broker.sessions(true).await?;
    let record = all
        .iter()
        .find(|s| s.session == a.session)
        .context("session recorded")?;
    assert!(record.ended_at.is_some(), "{record:?}");
    let AdminResponseV1::SessionsDetailed(listed) = f
        .broker
        .admin(AdminRequestV1::ListSessionsDetailed { all: true })
        .await?
    else {
        bail!("not a detailed session list");
    };
    let ended = listed
        .iter()
        .find(|s| s.info.session == a.session)
        .context("listed")?;
    assert_eq!(
        (ended.state.as_str(), ended.retained_until),
        ("ended", None)
    );
    let b = admitted(launch(&c, "ret", "bob").await?)?;
    assert_eq!(b.resource.as_str(), "h1");
    Ok(())
}

/// `ferry-connect --json` against a real `ferry-broker` process with a real
/// `ferry-agent` of the group: an admission (exit 0), then a refusal
/// (exit 2) with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_connect_prints_an_admission_and_a_refusal_from_a_real_broker() -> anyhow::Result<()>
{
    use ferry_tests::bins::bin;
    use ferry_tests::procs::{run, AgentProcess, BrokerFiles, BrokerProcess};
    init_logging();
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    files
        .admin(AdminRequestV1::UserCreateWithPassword {
            user: UserSpec {
                id: uid("alice"),
                email: "alice@example.com".into(),
                mobile: "+8613800000000".into(),
            },
            password: Secret("pw-alice".into()),
        })
        .await?;
    files
        .admin(AdminRequestV1::GroupPublish(
            GroupShape {
                name: "real",
                base: 1,
                concurrent: 1,
                wait_timeout_ms: 0,
                session_type: SessionType::Independent,
                users: &["alice"],
            }
            .spec(),
        ))
        .await?;
    let agent = AgentProcess::start_in_group(&files, "h1", broker.agent_addr, Some("real")).await?;
    agent.wait_synced().await?;

    let pw = tmp.path().join("alice.pw");
    std::fs::write(&pw, "pw-alice\n")?;
    let ca = files.pki_dir.join(pki::CA_CERT);
    let addr = broker.agent_addr.to_string();
    let program = bin("ferry-connect");
    let connect_with = |pw: std::path::PathBuf| {
        let args: Vec<std::ffi::OsString> = vec![
            "--broker".into(),
            addr.clone().into(),
            "--server-name".into(),
            "localhost".into(),
            "--ca".into(),
            ca.clone().into(),
            "--group".into(),
            "real".into(),
            "--user".into(),
            "alice".into(),
            "--password-file".into(),
            pw.into(),
            "--json".into(),
        ];
        run(&program, args)
    };
    let connect = || connect_with(pw.clone());
    let out = connect().await?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["admitted"], true, "{v}");
    assert_eq!(v["resource"], "h1", "{v}");
    assert!(
        v["ticket"].as_str().is_some_and(|t| t.starts_with("v1.")),
        "{v}"
    );
    assert!(v["session"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    assert_eq!(v["address"], "127.0.0.1:8443", "{v}");
    // The ticket's expiry as RFC 3339, like every time in ferryctl's JSON.
    let expires = v["expires_at"].as_str().unwrap_or_default();
    assert!(
        chrono::DateTime::parse_from_rfc3339(expires).is_ok() && expires.ends_with('Z'),
        "{v}"
    );

    // The one slot is reserved: the next request is refused, exit 2.
    let out = connect().await?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["admitted"], false, "{v}");
    assert_eq!(v["reason"], "at-capacity", "{v}");

    // Wrong passwords until the throttle answers (its delay doubles from
    // 1 s, so within a few tries it outlasts a process start): refused,
    // exit 2, with the reason and when to retry.
    let wrong = tmp.path().join("wrong.pw");
    std::fs::write(&wrong, "not-her-password\n")?;
    let mut tries = 0;
    let v = loop {
        let out = connect_with(wrong.clone()).await?;
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        if v["reason"] != "bad-credentials" {
            break v;
        }
        tries += 1;
        assert!(tries < 20, "never throttled");
    };
    assert_eq!(v["reason"], "throttled", "{v}");
    assert!(
        v["retry_after_secs"].as_u64().is_some_and(|s| s >= 1),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("retry in")),
        "{v}"
    );
    Ok(())
}

/// `ferry-connect`'s failures as a user meets them, against a real
/// `ferry-broker` process: a usage error exits 64 (not 2, which means
/// refused); a CA that did not sign the broker's certificate is one message
/// that names `--ca`; a broker that does not answer is waited for with a
/// line saying what is awaited, then exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_connect_exit_codes_a_wrong_ca_and_a_silent_broker() -> anyhow::Result<()> {
    use ferry_tests::bins::bin;
    use ferry_tests::procs::{run, BrokerFiles, BrokerProcess};
    init_logging();
    let tmp = tempfile::tempdir()?;
    let program = bin("ferry-connect");
    let pw = tmp.path().join("alice.pw");
    std::fs::write(&pw, "pw-alice\n")?;
    let args = |broker: &str, ca: &std::path::Path, extra: &[&str]| {
        let mut v: Vec<std::ffi::OsString> = vec![
            "--broker".into(),
            broker.into(),
            "--server-name".into(),
            "localhost".into(),
            "--ca".into(),
            ca.into(),
            "--group".into(),
            "real".into(),
            "--user".into(),
            "alice".into(),
            "--password-file".into(),
            pw.clone().into(),
        ];
        v.extend(extra.iter().map(std::ffi::OsString::from));
        v
    };

    // Usage errors: an unknown flag, a missing one.
    let out = run(&program, ["--broker", "127.0.0.1:1", "--bogus"]).await?;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let out = run(&program, ["--broker", "127.0.0.1:1"]).await?;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let help = run(&program, ["--help"]).await?;
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("64 usage error"), "{help}");

    // Nothing answers on this UDP port (held open here, so no one else
    // takes it): a line saying what is awaited, then exit 1.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let silent_addr = silent.local_addr()?.to_string();
    let files = BrokerFiles::init(&tmp.path().join("b")).await?;
    let ca = files.pki_dir.join(pki::CA_CERT);
    let out = run(
        &program,
        args(&silent_addr, &ca, &["--connect-timeout", "3s"]),
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("waiting for the broker at {silent_addr}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("no answer from {silent_addr} within 3s")),
        "{stderr}"
    );
    drop(silent);

    // A real broker, and the CA of another PKI.
    let broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    let other = BrokerFiles::init(&tmp.path().join("other")).await?;
    let wrong_ca = other.pki_dir.join(pki::CA_CERT);
    let out = run(
        &program,
        args(&broker.agent_addr.to_string(), &wrong_ca, &[]),
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(&format!("check that --ca {}", wrong_ca.display())),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("invalid peer certificate").count(),
        1,
        "the cause once: {stderr}"
    );
    Ok(())
}
