//! What one user or one address may ask of the route service (issue 14):
//! a user's allowance of reservations plus waiting requests per group, the
//! group's waiting room, and failed-login throttling, on a real broker in
//! this process with real route clients (what `ferry-connect` uses).
//!
//! Every wait is on an answer or bounded by `PATIENCE`; the group clock is
//! manual, so no waiting request times out by itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_broker::clock::ManualClock;
use ferry_broker::config::{GroupsConfig, LoginLimits, RouteLimits};
use ferry_broker::pki;
use ferry_broker::routing::{RouteAnswer, RouteClient};
use ferry_common::admin::{
    AdminRequestV1, BillingSpec, GroupSpec, LiveGroupView, PolicySpec, Secret, SessionType,
    UserSpec,
};
use ferry_common::route::{Admission, RouteAsk, RouteRefusal};
use ferry_common::ticket::Credential;
use ferry_tests::admin::{self, agent_of, publish};
use ferry_tests::harness::{init_logging, TestAgent, TestBroker, PATIENCE};
use tokio::sync::mpsc;

struct Fixture {
    broker: TestBroker,
    _clock: ManualClock,
    _agents: Vec<TestAgent>,
    _dir: tempfile::TempDir,
}

/// A group of `base` hosts taking one session each, scaling out one
/// elastic host at a time up to `max_elastic` as soon as demand passes
/// capacity, with a long `wait_timeout`.
fn group(name: &str, base: u32, max_elastic: u32, shared: bool, users: &[&str]) -> GroupSpec {
    GroupSpec {
        name: Some(name.parse().expect("group name")),
        region: "cn-hangzhou".into(),
        office_network: "office-net-1".into(),
        spec: "gpu-14c93g".into(),
        image: "img-1".into(),
        billing: BillingSpec::PayAsYouGo,
        base_resources: base,
        session_type: if shared {
            SessionType::Shared
        } else {
            SessionType::Independent
        },
        users: users.iter().map(|u| u.parse().expect("user")).collect(),
        policy: PolicySpec {
            concurrent_sessions: Some(1),
            usage_threshold: Some(100),
            scale_out_step: Some(1),
            max_elastic: Some(max_elastic),
            max_idle_ms: Some(3_600_000),
            wait_timeout_ms: Some(600_000),
            ..PolicySpec::default()
        },
    }
}

/// A broker with these limits, the users (password `password-<user>`), the
/// groups, and one agent per base host of each group (`<group>-h1`, ...).
async fn fixture(
    routing: RouteLimits,
    users: &[&str],
    groups: &[GroupSpec],
) -> anyhow::Result<Fixture> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(ferry_broker::clock::now_millis());
    let config = GroupsConfig {
        clock: clock.clock(),
        routing,
        ..GroupsConfig::default()
    };
    let broker = TestBroker::start_with_groups(dir.path(), config).await?;
    for u in users {
        broker
            .admin(AdminRequestV1::UserCreateWithPassword {
                user: UserSpec {
                    id: u.parse()?,
                    email: format!("{u}@example.com"),
                    mobile: "+8613800000000".into(),
                },
                password: Secret(password_of(u)),
            })
            .await?;
    }
    let mut agents = Vec::new();
    for g in groups {
        publish(&broker, g.clone()).await?;
        let name = g.name.as_ref().context("named group")?.to_string();
        for i in 1..=g.base_resources {
            agents.push(agent_of(&broker, &format!("{name}-h{i}"), &name).await?);
        }
    }
    Ok(Fixture {
        broker,
        _clock: clock,
        _agents: agents,
        _dir: dir,
    })
}

fn password_of(user: &str) -> String {
    format!("password-{user}")
}

fn ask(group: &str, user: &str, password: &str, wait: bool) -> anyhow::Result<RouteAsk> {
    Ok(RouteAsk {
        group: group.parse()?,
        user: user.parse()?,
        credential: Credential::Password(password.into()),
        wait,
    })
}

impl Fixture {
    /// A route client speaking from `local` (a loopback address: Linux
    /// routes all of 127.0.0.0/8 to the loopback interface).
    async fn client_from(&self, local: [u8; 4]) -> anyhow::Result<Arc<RouteClient>> {
        Ok(Arc::new(
            RouteClient::connect_from(
                SocketAddr::from((local, 0)),
                self.broker.agent_addr(),
                "localhost",
                &self.broker.pki_dir().join(pki::CA_CERT),
                PATIENCE,
            )
            .await?,
        ))
    }

    async fn live(&self, group: &str) -> anyhow::Result<LiveGroupView> {
        admin::live(&self.broker, group).await
    }
}

fn elastic_count(l: &LiveGroupView) -> usize {
    l.resources.iter().filter(|r| r.class == "elastic").count()
}

/// What became of one request: it waits, or its final answer.
#[derive(Debug)]
enum Heard {
    Waiting,
    Final(RouteAnswer),
}

/// Sends `ask` on `client` in a task; its first news (waiting, or the final
/// answer) comes back. A waiting request stays in the task until the set
/// is dropped.
async fn send(
    tasks: &mut tokio::task::JoinSet<()>,
    client: &Arc<RouteClient>,
    ask: RouteAsk,
) -> anyhow::Result<Heard> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let client = client.clone();
    tasks.spawn(async move {
        let waiting = tx.clone();
        let answer = client
            .route(ask, move |_| {
                let _ = waiting.send(Heard::Waiting);
            })
            .await;
        if let Ok(a) = answer {
            let _ = tx.send(Heard::Final(a));
        }
    });
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .context("no answer in time")?
        .context("the request failed")
}

fn refused(heard: Heard) -> anyhow::Result<RouteRefusal> {
    match heard {
        Heard::Final(RouteAnswer::Refused(r)) => Ok(r.reason),
        other => bail!("expected a refusal, got {other:?}"),
    }
}

fn admitted(heard: Heard) -> anyhow::Result<Admission> {
    match heard {
        Heard::Final(RouteAnswer::Admitted(a)) => Ok(a),
        other => bail!("expected an admission, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_holds_at_most_their_allowance_and_causes_no_scale_out_beyond_it(
) -> anyhow::Result<()> {
    let limits = RouteLimits {
        max_requests_per_user: 3,
        ..RouteLimits::default()
    };
    let f = fixture(
        limits,
        &["alice", "bob"],
        &[
            group("solo", 1, 10, false, &["alice", "bob"]),
            group("desk", 1, 0, true, &["alice"]),
        ],
    )
    .await?;
    let c = f.client_from([127, 0, 0, 1]).await?;
    let mut tasks = tokio::task::JoinSet::new();
    // Alice asks ten times, waiting for room: one slot (the base host),
    // then two waiting requests; the rest are refused before they count
    // anywhere.
    admitted(
        send(
            &mut tasks,
            &c,
            ask("solo", "alice", &password_of("alice"), true)?,
        )
        .await?,
    )?;
    for _ in 0..2 {
        let heard = send(
            &mut tasks,
            &c,
            ask("solo", "alice", &password_of("alice"), true)?,
        )
        .await?;
        assert!(matches!(heard, Heard::Waiting), "{heard:?}");
    }
    for _ in 0..7 {
        let heard = send(
            &mut tasks,
            &c,
            ask("solo", "alice", &password_of("alice"), true)?,
        )
        .await?;
        let Heard::Final(RouteAnswer::Refused(r)) = heard else {
            bail!("expected user-limit, got {heard:?}");
        };
        assert_eq!(r.reason, RouteRefusal::UserLimit);
        assert!(
            r.message.contains("alice") && r.message.contains("solo"),
            "{}",
            r.message
        );
    }
    // Demand is her allowance, and the group scaled out only for it: one
    // base host plus two elastic ones (not nine).
    let l = f.live("solo").await?;
    assert_eq!(l.demand, 3, "{l:?}");
    assert_eq!(elastic_count(&l), 2, "{:?}", l.resources);
    // Without waiting, too: refused at once.
    let heard = send(
        &mut tasks,
        &c,
        ask("solo", "alice", &password_of("alice"), false)?,
    )
    .await?;
    assert_eq!(refused(heard)?, RouteRefusal::UserLimit);
    // Another user is not held back by alice's allowance.
    let heard = send(
        &mut tasks,
        &c,
        ask("solo", "bob", &password_of("bob"), true)?,
    )
    .await?;
    assert!(matches!(heard, Heard::Waiting), "{heard:?}");
    assert_eq!(f.live("solo").await?.demand, 4);

    // A shared group gives alice her session again each time: no new slot,
    // no allowance used.
    let first = admitted(
        send(
            &mut tasks,
            &c,
            ask("desk", "alice", &password_of("alice"), false)?,
        )
        .await?,
    )?;
    for _ in 0..6 {
        let again = admitted(
            send(
                &mut tasks,
                &c,
                ask("desk", "alice", &password_of("alice"), false)?,
            )
            .await?,
        )?;
        assert_eq!(
            (&again.session, &again.resource),
            (&first.session, &first.resource)
        );
    }
    assert_eq!(f.live("desk").await?.demand, 1);
    tasks.abort_all();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_waiting_room_refuses_further_waiting_requests() -> anyhow::Result<()> {
    let limits = RouteLimits {
        waiting_room: 2,
        ..RouteLimits::default()
    };
    let users = ["alice", "bob", "carol", "dave"];
    let f = fixture(limits, &users, &[group("queue", 1, 0, false, &users)]).await?;
    let c = f.client_from([127, 0, 0, 1]).await?;
    let mut tasks = tokio::task::JoinSet::new();
    admitted(
        send(
            &mut tasks,
            &c,
            ask("queue", "alice", &password_of("alice"), true)?,
        )
        .await?,
    )?;
    for u in ["bob", "carol"] {
        let heard = send(&mut tasks, &c, ask("queue", u, &password_of(u), true)?).await?;
        assert!(matches!(heard, Heard::Waiting), "{u}: {heard:?}");
    }
    let heard = send(
        &mut tasks,
        &c,
        ask("queue", "dave", &password_of("dave"), true)?,
    )
    .await?;
    let Heard::Final(RouteAnswer::Refused(r)) = heard else {
        bail!("expected waiting-room-full, got {heard:?}");
    };
    assert_eq!(r.reason, RouteRefusal::WaitingRoomFull);
    assert!(r.message.contains("queue"), "{}", r.message);
    // A request that does not wait is refused as before.
    let heard = send(
        &mut tasks,
        &c,
        ask("queue", "dave", &password_of("dave"), false)?,
    )
    .await?;
    assert_eq!(refused(heard)?, RouteRefusal::AtCapacity);
    assert_eq!(f.live("queue").await?.demand, 3);
    tasks.abort_all();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_passwords_is_throttled_unhashed_and_the_real_user_gets_in(
) -> anyhow::Result<()> {
    // Delays long enough that none runs out during the test.
    let limits = RouteLimits {
        login: LoginLimits {
            first_delay: Duration::from_secs(60),
            max_delay: Duration::from_secs(600),
            ..LoginLimits::default()
        },
        ..RouteLimits::default()
    };
    let login = limits.login;
    let f = fixture(
        limits,
        &["alice", "bob"],
        &[group("office", 1, 0, false, &["alice", "bob"])],
    )
    .await?;
    // The flood: 300 wrong passwords at once from 127.0.0.2, for alice, for
    // bob and for users that do not exist, over three connections.
    let mut flooders = Vec::new();
    for _ in 0..3 {
        flooders.push(f.client_from([127, 0, 0, 2]).await?);
    }
    let (tx, mut answers) = mpsc::unbounded_channel();
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..300usize {
        let client = flooders[i % flooders.len()].clone();
        let user = match i % 3 {
            0 => "alice".to_owned(),
            1 => "bob".to_owned(),
            _ => format!("ghost{i}"),
        };
        let ask = ask("office", &user, &format!("guess-{i}"), false)?;
        let tx = tx.clone();
        flood.spawn(async move {
            let _ = tx.send(client.route(ask, |_| {}).await);
        });
    }
    drop(tx);
    // Once the flood is answering, alice logs in from her own address with
    // her password: admitted, her account under attack notwithstanding.
    let first = tokio::time::timeout(PATIENCE, answers.recv())
        .await
        .context("the flood got no answer")?
        .context("flood ended")??;
    let alice = f.client_from([127, 0, 0, 1]).await?;
    let mut tasks = tokio::task::JoinSet::new();
    let a = admitted(
        send(
            &mut tasks,
            &alice,
            ask("office", "alice", &password_of("alice"), false)?,
        )
        .await?,
    )?;
    assert_eq!(a.resource.as_str(), "office-h1");

    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut record = |answer: RouteAnswer| -> anyhow::Result<()> {
        match answer {
            RouteAnswer::Refused(r) => {
                if let RouteRefusal::Throttled { retry_after_secs } = r.reason {
                    assert!(retry_after_secs >= 1, "{}", r.message);
                }
                *counts.entry(r.reason.to_string()).or_default() += 1;
                Ok(())
            }
            RouteAnswer::Admitted(a) => bail!("a wrong password was admitted: {a:?}"),
            RouteAnswer::Redirect(a) => bail!("sent to another broker at {a}"),
        }
    };
    record(first)?;
    tokio::time::timeout(PATIENCE * 2, async {
        while let Some(answer) = answers.recv().await {
            record(answer?)?;
        }
        anyhow::Ok(())
    })
    .await
    .context("the flood did not finish")??;
    let checked = counts.get("bad-credentials").copied().unwrap_or(0);
    let throttled = counts.get("throttled").copied().unwrap_or(0);
    assert_eq!(checked + throttled, 300, "{counts:?}");
    // Only the address's free failures plus the checks it may have in
    // progress were hashed; everything else was answered without a check.
    let most_checked = (login.failures_per_source + login.checks_per_source) as usize;
    assert!(checked <= most_checked, "{counts:?}");

    // Wrong passwords one by one from the flooding address, each for a new
    // user (so only the address's count can refuse them), reach its own
    // limit (the burst may have been refused before it got there)...
    // (A new connection: one whose requests all failed the credential
    // check is closed soon after its last answer.)
    let flooder = f.client_from([127, 0, 0, 2]).await?;
    let mut tries = 0;
    loop {
        let nobody = format!("nobody{tries}");
        let heard = send(
            &mut tasks,
            &flooder,
            ask("office", &nobody, "guess", false)?,
        )
        .await?;
        match refused(heard)? {
            RouteRefusal::BadCredentials => tries += 1,
            RouteRefusal::Throttled { .. } => break,
            other => bail!("unexpected {other}"),
        }
        assert!(tries <= login.failures_per_source, "never throttled");
    }
    // ... after which it is refused even with alice's right password (its
    // credentials are not checked)...
    let heard = send(
        &mut tasks,
        &flooder,
        ask("office", "alice", &password_of("alice"), false)?,
    )
    .await?;
    let Heard::Final(RouteAnswer::Refused(r)) = heard else {
        bail!("expected throttled, got {heard:?}");
    };
    assert!(matches!(r.reason, RouteRefusal::Throttled { .. }), "{r:?}");
    assert!(r.message.contains("retry in"), "{}", r.message);
    // ... while bob, from his own address, logs in at once.
    let bob = f.client_from([127, 0, 0, 3]).await?;
    let heard = send(
        &mut tasks,
        &bob,
        ask("office", "bob", &password_of("bob"), false)?,
    )
    .await?;
    // The one host is alice's: bob is checked and finds no room.
    assert_eq!(refused(heard)?, RouteRefusal::AtCapacity);
    flood.abort_all();
    tasks.abort_all();
    Ok(())
}
