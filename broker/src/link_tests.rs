//! In-process tests of the agent link: the real server on 127.0.0.1:0 and a
//! raw quinn client built here (not the agent crate), so every byte the
//! broker sees is chosen by the test. No sleeps: tests wait on replies, acks
//! and registry changes; timeouts only keep a broken test from hanging.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_common::frame::{self, PreambleReply};
use ferry_common::limits::MAX_FRAME_LEN;
use ferry_common::wire::{
    AgentMessage, AgentToBroker, BrokerMessage, BrokerToAgent, Command, CommandOutcome,
    CommandResult, EndReason, HealthReport, Hello, HostFacts, OpenSession, RefusalCode,
    SequencedEvent, SessionEvent, Welcome,
};
use ferry_common::{ResourceId, UnixMillis, PROTOCOL_VERSION};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::endpoint::{self, close_code, Services};
use crate::link::{self, LinkContext};
use crate::pki;
use crate::registry::Registry;
use crate::store::Store;

fn agent_validity() -> pki::Validity {
    pki::Validity::starting_now(pki::DEFAULT_AGENT_LIFETIME)
}

/// Safety net so a broken test fails instead of hanging; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(20);

struct Broker {
    tmp: tempfile::TempDir,
    pki: PathBuf,
    addr: SocketAddr,
    store: Store,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

async fn start(health_interval: Duration, missed: u32) -> Broker {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki_dir = tmp.path().join("pki");
    pki::init(&pki_dir, &[]).expect("pki init");
    let store = crate::store::testing::open_for_test(tmp.path());
    let endpoint = quinn::Endpoint::server(
        pki::server_config(&pki_dir).expect("server config"),
        "127.0.0.1:0".parse().expect("addr"),
    )
    .expect("endpoint");
    let addr = endpoint.local_addr().expect("addr");
    let registry = Arc::new(Registry::new());
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let ctx = LinkContext {
        store: store.clone(),
        registry: registry.clone(),
        health_interval,
        missed_health_limit: missed,
        tracker: tracker.clone(),
        tickets: None,
        clock: crate::clock::Clock::system(),
        actors: None,
        pki_dir: pki_dir.clone(),
        cert_lifetime: pki::DEFAULT_AGENT_LIFETIME,
        ownership: crate::cluster::Ownership::everything(),
    };
    let services = Services {
        agent: Some(Arc::new(link::AgentLink::new(ctx))),
        ..Services::default()
    };
    tracker.spawn(endpoint::serve(
        endpoint,
        services,
        endpoint::EndpointLimits::default(),
        tracker.clone(),
        shutdown.clone(),
    ));
    Broker {
        tmp,
        pki: pki_dir,
        addr,
        store,
        registry,
        shutdown,
        tracker,
    }
}

impl Broker {
    async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(PATIENCE, self.tracker.wait())
            .await
            .expect("tasks drain");
        self.store.close().await;
    }

    /// A client config presenting a certificate for `resource` issued by this CA.
    fn identity(&self, resource: &str) -> quinn::ClientConfig {
        let out = self.tmp.path().join(format!("agent-{resource}"));
        pki::issue_agent(&self.pki, &rid(resource), &out, agent_validity()).expect("issue");
        pki::client_config(
            &out.join(pki::CA_CERT),
            Some((&out.join(pki::AGENT_CERT), &out.join(pki::AGENT_KEY))),
        )
        .expect("client config")
    }

    async fn connect(&self, config: quinn::ClientConfig) -> Result<quinn::Connection, String> {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        ep.set_default_client_config(config);
        let connecting = ep
            .connect(self.addr, "localhost")
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(PATIENCE, connecting)
            .await
            .expect("handshake in time")
            .map_err(|e| e.to_string())
    }

    async fn agent(&self, resource: &str) -> Agent {
        let conn = self
            .connect(self.identity(resource))
            .await
            .expect("connect");
        Agent::open(conn, PROTOCOL_VERSION).await.expect("accepted")
    }

    async fn events_recorded(&self) -> u64 {
        self.store.counts().await.expect("counts").events_recorded
    }

    async fn resources(&self) -> usize {
        self.store.resources().await.expect("resources").len()
    }

    /// Waits until `pred` holds for the registry's view of `resource`.
    async fn wait_live(
        &self,
        resource: &str,
        pred: impl Fn(Option<&crate::registry::LiveResource>) -> bool,
    ) {
        let mut changes = self.registry.subscribe();
        let r = rid(resource);
        tokio::time::timeout(PATIENCE, async {
            loop {
                if pred(self.registry.snapshot().get(&r)) {
                    return;
                }
                changes.changed().await.expect("registry alive");
            }
        })
        .await
        .expect("registry reaches the state");
    }
}

fn rid(s: &str) -> ResourceId {
    s.parse().expect("id")
}

struct Agent {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Agent {
    async fn open_raw(
        conn: &quinn::Connection,
        version: u16,
    ) -> (
        quinn::SendStream,
        quinn::RecvStream,
        Result<PreambleReply, frame::FrameError>,
    ) {
        let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
        send.write_all(&frame::preamble(version))
            .await
            .expect("preamble");
        let reply = tokio::time::timeout(PATIENCE, PreambleReply::read(&mut recv))
            .await
            .expect("reply in time");
        (send, recv, reply)
    }

    async fn open(conn: quinn::Connection, version: u16) -> Result<Agent, PreambleReply> {
        let (send, recv, reply) = Self::open_raw(&conn, version).await;
        match reply.expect("preamble reply") {
            PreambleReply::Accepted { version: v } => {
                assert_eq!(v, PROTOCOL_VERSION);
                Ok(Agent { conn, send, recv })
            }
            other => Err(other),
        }
    }

    async fn send(&mut self, msg: AgentToBroker) {
        frame::write_message(&mut self.send, &AgentMessage::V1(msg), MAX_FRAME_LEN)
            .await
            .expect("send");
    }

    /// The next broker message; `None` when the broker closed the stream.
    async fn recv(&mut self) -> Option<BrokerToAgent> {
        let msg = tokio::time::timeout(
            PATIENCE,
            frame::read_message::<BrokerMessage, _>(&mut self.recv, MAX_FRAME_LEN),
        )
        .await
        .expect("broker answers in time");
        match msg {
            Ok(Some(BrokerMessage::V1(m))) => Some(m),
            _ => None,
        }
    }

    async fn hello(
        &mut self,
        resource: &str,
        spool_id: u64,
        sessions: &[&str],
    ) -> Option<BrokerToAgent> {
        self.send(AgentToBroker::Hello(hello(resource, spool_id, sessions)))
            .await;
        self.recv().await
    }

    async fn welcome(&mut self, resource: &str, spool_id: u64) -> Welcome {
        match self.hello(resource, spool_id, &[]).await {
            Some(BrokerToAgent::Welcome(w)) => w,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    async fn refused(&mut self) -> RefusalCode {
        match self.recv().await {
            Some(BrokerToAgent::Refused(r)) => {
                assert!(!r.message.is_empty());
                r.code
            }
            other => panic!("expected Refused, got {other:?}"),
        }
    }
}

fn hello(resource: &str, spool_id: u64, sessions: &[&str]) -> Hello {
    Hello {
        resource: rid(resource),
        group: None,
        agent_version: "test".into(),
        image_version: "img".into(),
        host: HostFacts {
            hostname: "h".into(),
            os: "Linux".into(),
            kernel: "6".into(),
            vcpus: 2,
            memory_bytes: 1 << 30,
        },
        spool_id,
        sessions: sessions
            .iter()
            .map(|s| OpenSession {
                session: s.parse().expect("id"),
                user: "u".parse().expect("id"),
                started_at: UnixMillis(1),
            })
            .collect(),
    }
}

fn started(seq: u64, session: &str) -> AgentToBroker {
    AgentToBroker::Session(SequencedEvent {
        seq,
        event: SessionEvent::Started {
            session: session.parse().expect("id"),
            user: "alice".parse().expect("id"),
            at: UnixMillis(1_000),
        },
    })
}

fn health(draining: bool) -> AgentToBroker {
    AgentToBroker::Health(HealthReport {
        at: UnixMillis(1),
        cpu_permille: 10,
        memory_used_bytes: 1,
        memory_total_bytes: 2,
        disk_used_bytes: 1,
        disk_total_bytes: 2,
        load_milli: [0, 0, 0],
        sessions: 0,
        draining,
    })
}

#[tokio::test]
async fn hello_welcome_event_ack_and_duplicate_replay() {
    let b = start(Duration::from_secs(10), 3).await;
    let mut a = b.agent("host-1").await;
    let w = a.welcome("host-1", 9).await;
    assert_eq!(w.resource, rid("host-1"));
    assert_eq!(w.last_recorded_seq, 0);
    assert_eq!(w.health_interval_ms, 10_000);

    a.send(started(1, "s1")).await;
    assert_eq!(a.recv().await, Some(BrokerToAgent::Ack { up_to: 1 }));
    assert_eq!(
        b.store
            .event_count(&rid("host-1"), 9, 1)
            .await
            .expect("count"),
        1
    );

    // A replay of an acknowledged event is acked again, not recorded again.
    a.send(started(1, "s1")).await;
    assert_eq!(a.recv().await, Some(BrokerToAgent::Ack { up_to: 1 }));
    a.send(started(2, "s2")).await;
    assert_eq!(a.recv().await, Some(BrokerToAgent::Ack { up_to: 2 }));
    assert_eq!(b.events_recorded().await, 2);

    // A reconnect learns what is recorded; the old connection is superseded.
    let mut again = b.agent("host-1").await;
    let w = again.welcome("host-1", 9).await;
    assert_eq!(w.last_recorded_seq, 2);
    assert_eq!(a.refused().await, RefusalCode::Superseded);
    assert_eq!(b.registry.connected(), 1);
    b.stop().await;
}

#[tokio::test]
async fn a_burst_of_events_is_recorded_in_order_and_acked_cumulatively() {
    let b = start(Duration::from_secs(10), 3).await;
    let mut a = b.agent("host-1").await;
    a.welcome("host-1", 1).await;
    for seq in 1..=200u64 {
        a.send(started(seq, &format!("s{seq}"))).await;
    }
    let mut acked = 0;
    while acked < 200 {
        match a.recv().await {
            Some(BrokerToAgent::Ack { up_to }) => {
                assert!(up_to > acked, "acks only move forward");
                acked = up_to;
            }
            other => panic!("expected Ack, got {other:?}"),
        }
    }
    assert_eq!(b.events_recorded().await, 200);
    b.stop().await;
}

#[tokio::test]
async fn a_sequence_gap_is_refused_and_not_recorded() {
    let b = start(Duration::from_secs(10), 3).await;
    let mut a = b.agent("host-1").await;
    a.welcome("host-1", 1).await;
    a.send(started(2, "s2")).await;
    assert_eq!(a.refused().await, RefusalCode::SequenceGap);
    assert_eq!(b.events_recorded().await, 0);
    b.stop().await;
}

#[tokio::test]
async fn impersonation_is_refused_and_nothing_is_recorded() {
    let b = start(Duration::from_secs(10), 3).await;
    let mut a = b.agent("host-1").await;
    assert!(matches!(
        a.hello("host-2", 1, &[]).await,
        Some(BrokerToAgent::Refused(r)) if r.code == RefusalCode::IdentityMismatch
            && r.message.contains("host-1") && r.message.contains("host-2")
    ));
    assert_eq!(b.resources().await, 0);
    assert_eq!(b.registry.connected(), 0);
    b.stop().await;
}

#[tokio::test]
async fn no_client_certificate_or_a_foreign_one_gets_nothing_in() {
    let b = start(Duration::from_secs(10), 3).await;
    let no_cert = pki::client_config(&b.pki.join(pki::CA_CERT), None).expect("config");
    let foreign = {
        let other = b.tmp.path().join("other-ca");
        pki::init(&other, &[]).expect("init");
        let out = b.tmp.path().join("foreign");
        pki::issue_agent(&other, &rid("host-1"), &out, agent_validity()).expect("issue");
        // Trusts the real broker CA, presents a certificate of another CA.
        pki::client_config(
            &b.pki.join(pki::CA_CERT),
            Some((&out.join(pki::AGENT_CERT), &out.join(pki::AGENT_KEY))),
        )
        .expect("config")
    };
    for config in [no_cert, foreign] {
        // In TLS 1.3 the client may finish its side before the server rejects
        // its certificate; then the first stream operation fails instead.
        if let Ok(conn) = b.connect(config).await {
            let refused = async {
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(&frame::preamble(PROTOCOL_VERSION)).await?;
                let mut byte = [0u8; 1];
                recv.read_exact(&mut byte).await?;
                anyhow::Ok(())
            };
            let r = tokio::time::timeout(PATIENCE, refused)
                .await
                .expect("in time");
            assert!(
                r.is_err(),
                "a connection without a valid certificate got an answer"
            );
        }
    }
    assert_eq!(b.resources().await, 0);
    assert_eq!(b.registry.connected(), 0);
    b.stop().await;
}

#[tokio::test]
async fn a_protocol_the_broker_does_not_serve_is_closed_with_not_served() {
    let b = start(Duration::from_secs(10), 3).await;
    // No route service in this broker: the handshake succeeds (the ALPN is
    // one of the endpoint's), then the connection is closed with a reason.
    let config = pki::client_config_for(&b.pki.join(pki::CA_CERT), None, ferry_common::ALPN_ROUTE)
        .expect("config");
    let conn = b.connect(config).await.expect("handshake");
    let closed = tokio::time::timeout(PATIENCE, conn.closed())
        .await
        .expect("closed in time");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, close_code::NOT_SERVED.into());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(b.registry.connected(), 0);
    b.stop().await;
}

#[tokio::test]
async fn an_unknown_protocol_version_gets_unsupported_version() {
    let b = start(Duration::from_secs(10), 3).await;
    let conn = b.connect(b.identity("host-1")).await.expect("connect");
    let reply = Agent::open(conn, 99).await.err().expect("refused");
    let PreambleReply::UnsupportedVersion { supported, message } = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(supported, PROTOCOL_VERSION);
    assert!(message.contains("99"), "{message}");
    assert_eq!(b.resources().await, 0);
    b.stop().await;
}

#[tokio::test]
async fn a_bad_preamble_closes_the_connection() {
    let b = start(Duration::from_secs(10), 3).await;
    let conn = b.connect(b.identity("host-1")).await.expect("connect");
    let (mut send, _recv) = conn.open_bi().await.expect("stream");
    send.write_all(b"GET / HT").await.expect("write");
    let err = tokio::time::timeout(PATIENCE, conn.closed())
        .await
        .expect("closed");
    assert!(
        matches!(&err, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == close_code::BAD_PREAMBLE.into()),
        "{err:?}"
    );
    assert_eq!(b.resources().await, 0);
    b.stop().await;
}

#[tokio::test]
async fn oversized_and_random_frames_are_refused_without_recording() {
    let b = start(Duration::from_secs(10), 3).await;
    // Before Hello: an oversized length, then random bytes in a valid frame.
    let oversized = {
        let mut v = vec![];
        v.extend_from_slice(
            &u32::try_from(MAX_FRAME_LEN + 1)
                .expect("fits")
                .to_be_bytes(),
        );
        v.extend_from_slice(&[0u8; 64]);
        v
    };
    let random = {
        let mut v = vec![0, 0, 0, 32];
        v.extend((0..32u8).map(|i| i.wrapping_mul(97).wrapping_add(13)));
        v
    };
    for bytes in [&oversized, &random] {
        let mut a = b.agent("host-1").await;
        a.send.write_all(bytes).await.expect("write");
        assert_eq!(a.refused().await, RefusalCode::MalformedFrame);
    }
    assert_eq!(b.resources().await, 0);

    // After Hello: a recorded event, then garbage; the event stays, nothing else.
    let mut a = b.agent("host-1").await;
    a.welcome("host-1", 1).await;
    a.send(started(1, "s1")).await;
    assert_eq!(a.recv().await, Some(BrokerToAgent::Ack { up_to: 1 }));
    a.send.write_all(&oversized).await.expect("write");
    assert_eq!(a.refused().await, RefusalCode::MalformedFrame);
    let mut a = b.agent("host-1").await;
    a.welcome("host-1", 1).await;
    a.send.write_all(&random).await.expect("write");
    assert_eq!(a.refused().await, RefusalCode::MalformedFrame);
    assert_eq!(b.events_recorded().await, 1);
    b.stop().await;
}

#[tokio::test]
async fn the_first_message_must_be_hello_and_hello_comes_once() {
    let b = start(Duration::from_secs(10), 3).await;
    let mut a = b.agent("host-1").await;
    a.send(started(1, "s1")).await;
    assert_eq!(a.refused().await, RefusalCode::ProtocolViolation);
    assert_eq!(b.events_recorded().await, 0);

    let mut a = b.agent("host-1").await;
    a.welcome("host-1", 1).await;
    a.send(AgentToBroker::Hello(hello("host-1", 1, &[]))).await;
    assert_eq!(a.refused().await, RefusalCode::ProtocolViolation);
    b.stop().await;
}

#[tokio::test]
async fn too_many_sessions_in_hello_is_malformed() {
    let b = start(Duration::from_secs(10), 3).await;
    let mut a = b.agent("host-1").await;
    let names: Vec<String> = (0..=ferry_common::limits::MAX_SESSIONS_PER_HELLO)
        .map(|i| format!("s{i}"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    assert!(matches!(
        a.hello("host-1", 1, &refs).await,
        Some(BrokerToAgent::Refused(r)) if r.code == RefusalCode::MalformedFrame
    ));
    assert_eq!(b.resources().await, 0);
    b.stop().await;
}

#[tokio::test]
async fn a_silent_agent_becomes_unavailable_and_health_brings_it_back() {
    let b = start(Duration::from_millis(100), 2).await;
    let mut a = b.agent("host-1").await;
    a.welcome("host-1", 1).await;
    b.wait_live("host-1", |l| l.is_some_and(|l| !l.available))
        .await;
    a.send(health(true)).await;
    b.wait_live("host-1", |l| l.is_some_and(|l| l.available && l.draining))
        .await;
    // A dropped connection removes the live entry.
    a.conn.close(0u32.into(), b"bye");
    b.wait_live("host-1", |l| l.is_none()).await;
    b.stop().await;
}

#[tokio::test]
async fn a_command_reaches_the_agent_and_its_result_comes_back() {
    let b = start(Duration::from_secs(10), 3).await;
    let mut a = b.agent("host-1").await;
    a.welcome("host-1", 1).await;
    let registry = b.registry.clone();
    let admin = tokio::spawn(async move {
        registry
            .command(&rid("host-1"), Command::Drain, PATIENCE)
            .await
    });
    let Some(BrokerToAgent::Command { id, command }) = a.recv().await else {
        panic!("expected a command")
    };
    assert_eq!(command, Command::Drain);
    a.send(AgentToBroker::CommandResult(CommandResult {
        id,
        outcome: CommandOutcome::Failed("no hook".into()),
    }))
    .await;
    assert_eq!(
        admin.await.expect("join").expect("answered"),
        CommandOutcome::Failed("no hook".into())
    );
    b.stop().await;
}

#[tokio::test]
async fn reconnect_ends_sessions_the_host_no_longer_has() {
    let b = start(Duration::from_secs(10), 3).await;
    let mut a = b.agent("host-1").await;
    a.welcome("host-1", 1).await;
    a.send(started(1, "keep")).await;
    a.send(started(2, "gone")).await;
    while a.recv().await != Some(BrokerToAgent::Ack { up_to: 2 }) {}
    let mut again = b.agent("host-1").await;
    assert!(matches!(
        again.hello("host-1", 1, &["keep"]).await,
        Some(BrokerToAgent::Welcome(w)) if w.last_recorded_seq == 2
    ));
    let open: Vec<String> = b
        .store
        .sessions(false)
        .await
        .expect("sessions")
        .into_iter()
        .map(|s| s.session.to_string())
        .collect();
    assert_eq!(open, vec!["keep".to_string()]);
    // The host's own end of "keep" is recorded normally afterwards.
    again
        .send(AgentToBroker::Session(SequencedEvent {
            seq: 3,
            event: SessionEvent::Ended {
                session: "keep".parse().expect("id"),
                at: UnixMillis(2_000),
                reason: EndReason::Logout,
            },
        }))
        .await;
    assert_eq!(again.recv().await, Some(BrokerToAgent::Ack { up_to: 3 }));
    assert!(b.store.sessions(false).await.expect("sessions").is_empty());
    b.stop().await;
}

#[tokio::test]
async fn shutdown_tells_agents_to_come_back_later() {
    let b = start(Duration::from_secs(10), 3).await;
    let mut a = b.agent("host-1").await;
    a.welcome("host-1", 1).await;
    b.shutdown.cancel();
    assert_eq!(a.refused().await, RefusalCode::ShuttingDown);
    b.stop().await;
}

#[tokio::test]
async fn the_daemon_binds_reports_ready_serves_admin_and_drains() {
    use ferry_common::admin::{AdminRequestV1, AdminResponseV1};
    let tmp = tempfile::tempdir().expect("tmp");
    let pki_dir = tmp.path().join("pki");
    pki::init(&pki_dir, &[]).expect("init");
    let config = crate::config::BrokerConfig {
        state_dir: tmp.path().join("state"),
        pki_dir: pki_dir.clone(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        admin_socket: tmp.path().join("admin.sock"),
        admin_group: None,
        health_interval: Duration::from_secs(10),
        missed_health_limit: 3,
        shutdown_grace: Duration::from_secs(5),
        agent_cert_lifetime: crate::pki::DEFAULT_AGENT_LIFETIME,
        groups: Default::default(),
        endpoint: Default::default(),
        store: Default::default(),
        metrics: Default::default(),
        console: None,
    };
    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let daemon = tokio::spawn(crate::daemon::run(config, shutdown.clone(), tx));
    let ready = tokio::time::timeout(PATIENCE, rx)
        .await
        .expect("in time")
        .expect("ready");

    let out = tmp.path().join("agent");
    pki::issue_agent(&pki_dir, &rid("host-1"), &out, agent_validity()).expect("issue");
    let cfg = pki::client_config(
        &out.join(pki::CA_CERT),
        Some((&out.join(pki::AGENT_CERT), &out.join(pki::AGENT_KEY))),
    )
    .expect("config");
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    ep.set_default_client_config(cfg);
    let conn = ep
        .connect(ready.agent_addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let mut a = Agent::open(conn, PROTOCOL_VERSION).await.expect("accepted");
    a.welcome("host-1", 1).await;
    // The daemon sends its ticket key (created at its start) right after Welcome.
    let key = crate::tickets::TicketSigner::load_or_create(&pki_dir)
        .expect("ticket key")
        .public_key();
    assert_eq!(
        a.recv().await,
        Some(BrokerToAgent::TicketKey { public_key: key })
    );
    a.send(started(1, "s1")).await;
    assert_eq!(a.recv().await, Some(BrokerToAgent::Ack { up_to: 1 }));

    let status = crate::admin::request(&ready.admin_socket, AdminRequestV1::Status)
        .await
        .expect("status");
    let AdminResponseV1::Status(s) = status else {
        panic!("{status:?}")
    };
    assert_eq!(
        (
            s.agents_connected,
            s.resources,
            s.open_sessions,
            s.events_recorded
        ),
        (1, 1, 1, 1)
    );

    shutdown.cancel();
    assert_eq!(a.refused().await, RefusalCode::ShuttingDown);
    tokio::time::timeout(PATIENCE, daemon)
        .await
        .expect("daemon stops in time")
        .expect("join")
        .expect("clean exit");
    assert!(!ready.admin_socket.exists());
}

#[tokio::test]
async fn admin_drain_and_disconnect_go_through_the_agent() {
    use crate::admin::{handle, AdminContext};
    use ferry_common::admin::{AdminErrorCode, AdminRequestV1, AdminResponseV1};
    let b = start(Duration::from_secs(10), 3).await;
    let (groups, ota) = crate::test_support::wire(
        &b.store,
        &b.registry,
        Default::default(),
        &TaskTracker::new(),
        &CancellationToken::new(),
    );
    let ctx = AdminContext {
        store: b.store.clone(),
        registry: b.registry.clone(),
        groups,
        ota,
        cluster: None,
        peers: None,
        console: None,
    };
    let mut a = b.agent("host-1").await;
    a.welcome("host-1", 1).await;
    a.send(started(1, "s1")).await;
    assert_eq!(a.recv().await, Some(BrokerToAgent::Ack { up_to: 1 }));

    let admin = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            handle(
                &ctx,
                AdminRequestV1::Drain {
                    resource: rid("host-1"),
                },
            )
            .await
        })
    };
    let Some(BrokerToAgent::Command { id, command }) = a.recv().await else {
        panic!("expected a command")
    };
    assert_eq!(command, Command::Drain);
    a.send(AgentToBroker::CommandResult(CommandResult {
        id,
        outcome: CommandOutcome::Done,
    }))
    .await;
    assert!(matches!(
        admin.await.expect("join"),
        AdminResponseV1::Done { .. }
    ));
    let AdminResponseV1::Resources(rs) = handle(&ctx, AdminRequestV1::ListResources).await else {
        panic!("resources")
    };
    assert!(rs[0].draining && rs[0].connected && rs[0].sessions == 1);

    // Disconnect goes to the host that has the session; a failure is reported.
    let admin = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            handle(
                &ctx,
                AdminRequestV1::DisconnectSession {
                    session: "s1".parse().expect("id"),
                },
            )
            .await
        })
    };
    let Some(BrokerToAgent::Command { id, command }) = a.recv().await else {
        panic!("expected a command")
    };
    assert!(
        matches!(command, Command::DisconnectSession { ref session, .. } if session.as_str() == "s1")
    );
    a.send(AgentToBroker::CommandResult(CommandResult {
        id,
        outcome: CommandOutcome::Failed("no disconnect hook configured".into()),
    }))
    .await;
    let AdminResponseV1::Error(e) = admin.await.expect("join") else {
        panic!("expected an error")
    };
    assert_eq!(e.code, AdminErrorCode::CommandFailed);
    assert!(e.message.contains("no disconnect hook"), "{}", e.message);

    // Once the agent is gone, commands say it is not connected.
    a.conn.close(0u32.into(), b"bye");
    b.wait_live("host-1", |l| l.is_none()).await;
    let AdminResponseV1::Error(e) = handle(
        &ctx,
        AdminRequestV1::Undrain {
            resource: rid("host-1"),
        },
    )
    .await
    else {
        panic!("expected an error")
    };
    assert_eq!(e.code, AdminErrorCode::NotConnected);
    b.stop().await;
}

#[tokio::test]
async fn renewal_issues_for_the_links_resource_only_and_not_once_revoked() {
    use rustls::pki_types::pem::PemObject;
    let b = start(Duration::from_secs(10), 3).await;
    let mut a = b.agent("host-1").await;
    a.welcome("host-1", 1).await;
    let csr = |names: Vec<String>| {
        let key = rcgen::KeyPair::generate().expect("key");
        rcgen::CertificateParams::new(names)
            .expect("params")
            .serialize_request(&key)
            .expect("csr")
            .der()
            .to_vec()
    };

    // A request for another name fails; the connection goes on.
    a.send(AgentToBroker::Renew {
        csr_der: csr(vec!["host-2".into()]),
    })
    .await;
    assert!(
        matches!(
            a.recv().await,
            Some(BrokerToAgent::Renewal(
                ferry_common::wire::RenewalOutcome::Failed { .. }
            ))
        ),
        "another name is not renewed"
    );
    a.send(AgentToBroker::Renew {
        csr_der: csr(vec!["host-1".into()]),
    })
    .await;
    let Some(BrokerToAgent::Renewal(ferry_common::wire::RenewalOutcome::Issued { cert_pem })) =
        a.recv().await
    else {
        panic!("expected a renewed certificate");
    };
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("pem");
    let info = pki::certificate_info(der.as_ref()).expect("info");
    assert_eq!(info.resource, rid("host-1"));
    assert!((info.not_after.0 - info.issued.0 - 30 * 86_400_000).abs() < 1000);
    // Certificates older than the link's are refused from now on; the
    // link's own still admits it.
    let floor = b
        .store
        .revoked_before(&rid("host-1"))
        .await
        .expect("read")
        .expect("a floor");
    assert!(floor.0 <= info.issued.0, "the new certificate passes");

    // One renewal per connection.
    a.send(AgentToBroker::Renew {
        csr_der: csr(vec![]),
    })
    .await;
    let Some(BrokerToAgent::Renewal(ferry_common::wire::RenewalOutcome::Failed { message })) =
        a.recv().await
    else {
        panic!("a second renewal on one connection must fail");
    };
    assert!(
        message.contains("renewed on this connection already"),
        "{message}"
    );

    // On a new connection with the same certificate (at the floor, not
    // before it): revoked since it was issued (the registry not told, so
    // the connection is still up), the renewal closes it.
    let mut a = b.agent("host-1").await;
    a.welcome("host-1", 1).await;
    let now = crate::clock::now_millis();
    b.store
        .revoke(&rid("host-1"), UnixMillis(now.0 + 1), now, "test".into())
        .await
        .expect("revoke");
    a.send(AgentToBroker::Renew {
        csr_der: csr(vec![]),
    })
    .await;
    assert_eq!(a.refused().await, RefusalCode::Revoked);
    b.stop().await;
}

/// Text a host chose is stored bounded and without terminal escapes or
/// control characters, whatever it sends: its facts and versions in `Hello`,
/// an end reason, a command's failure.
#[tokio::test]
async fn agent_text_is_stored_bounded_and_without_control_characters() {
    use ferry_common::limits::{MAX_HOST_NAME_LEN, MAX_TEXT_LEN};
    let clean = |s: &str| !s.chars().any(|c| c.is_control() || c == '\u{202e}');
    let b = start(Duration::from_secs(10), 3).await;
    let mut a = b.agent("host-1").await;
    let escapes = "\u{1b}[2J\u{1b}]0;title\u{7}\u{9b}1m\u{202e}";
    let mut h = hello("host-1", 1, &[]);
    h.host.hostname = format!("web-1{escapes}{}", "x".repeat(100 * 1024));
    h.host.os = format!("Linux{escapes}\r\n{}", "o".repeat(40 * 1024));
    h.host.kernel = format!("6.1{escapes}\u{0}");
    h.agent_version = format!("1.0{escapes}\n{}", "v".repeat(40 * 1024));
    h.image_version = format!("img{escapes}");
    a.send(AgentToBroker::Hello(h)).await;
    assert!(matches!(a.recv().await, Some(BrokerToAgent::Welcome(_))));

    let stored = b.store.resources().await.expect("resources");
    let r = &stored[0];
    assert!(
        r.host.hostname.starts_with("web-11mxxx"),
        "{}",
        r.host.hostname
    );
    assert!(r.host.hostname.len() <= MAX_HOST_NAME_LEN);
    assert!(r.host.os.starts_with("Linux1m  ooo") && r.host.os.len() <= MAX_TEXT_LEN);
    assert_eq!(r.host.kernel, "6.11m");
    assert!(r.agent_version.starts_with("1.01m vvv") && r.agent_version.len() <= MAX_TEXT_LEN);
    assert_eq!(r.image_version, "img1m");
    for text in [
        &r.host.hostname,
        &r.host.os,
        &r.host.kernel,
        &r.agent_version,
        &r.image_version,
    ] {
        assert!(clean(text), "{text:?}");
    }

    a.send(started(1, "s1")).await;
    a.send(AgentToBroker::Session(SequencedEvent {
        seq: 2,
        event: SessionEvent::Ended {
            session: "s1".parse().expect("id"),
            at: UnixMillis(2_000),
            reason: EndReason::Other(format!("crashed{escapes}\n\u{8}{}", "r".repeat(200_000))),
        },
    }))
    .await;
    while a.recv().await != Some(BrokerToAgent::Ack { up_to: 2 }) {}
    let sessions = b.store.sessions(true).await.expect("sessions");
    let reason = sessions[0].end_reason.clone().expect("ended");
    assert!(reason.starts_with("crashed1m rrr"), "{reason}");
    assert!(reason.len() <= MAX_TEXT_LEN && clean(&reason), "{reason:?}");

    // A command's failure keeps its lines, nothing else.
    let registry = b.registry.clone();
    let admin = tokio::spawn(async move {
        registry
            .command(&rid("host-1"), Command::Drain, PATIENCE)
            .await
    });
    let Some(BrokerToAgent::Command { id, .. }) = a.recv().await else {
        panic!("expected a command")
    };
    a.send(AgentToBroker::CommandResult(CommandResult {
        id,
        outcome: CommandOutcome::Failed(format!(
            "drain hook /x failed (exit status: 1): {}{escapes}\nno",
            "y".repeat(100 * 1024)
        )),
    }))
    .await;
    let CommandOutcome::Failed(text) = admin.await.expect("join").expect("answered") else {
        panic!("expected a failure")
    };
    assert!(
        text.starts_with("drain hook /x failed (exit status: 1): yyy"),
        "{text}"
    );
    assert!(
        text.ends_with("yyy1m\nno") && text.len() <= MAX_TEXT_LEN,
        "{text}"
    );
    assert!(clean(&text.replace('\n', "")), "{text:?}");
    b.stop().await;
}
