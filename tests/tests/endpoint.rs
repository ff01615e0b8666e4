//! Nobody unauthenticated can exhaust the broker's endpoint (issue 14): a
//! real broker in this process with short limits, bounded floods of raw
//! QUIC peers on loopback addresses other than the real clients' (Linux
//! routes all of 127.0.0.0/8 to the loopback interface), and a real agent
//! and a real routed user that get through during each flood.
//!
//! Every wait is on a signal (a connection closed, an answer, a synced
//! agent, a packet), bounded by `PATIENCE`; flood loops are bounded in
//! count.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_agent::enroll::{EnrollError, EnrollTarget};
use ferry_broker::endpoint::{close_code, EndpointLimits};
use ferry_broker::pki;
use ferry_broker::routing::{RouteAnswer, RouteClient};
use ferry_common::admin::{
    AdminRequestV1, BillingSpec, GroupSpec, PolicySpec, Secret, SessionType, UserSpec,
};
use ferry_common::enroll::EnrollRefusal;
use ferry_common::route::{RouteAsk, RouteRefusal};
use ferry_common::ticket::Credential;
use ferry_common::{ALPN_ENROLL, ALPN_ROUTE};
use ferry_tests::admin::{agent_of, publish};
use ferry_tests::harness::{init_logging, TestAgent, TestBroker, PATIENCE};
use tokio::time::timeout;

/// Where the floods come from: loopback addresses the real clients (bound
/// to 0.0.0.0, so seen as 127.0.0.1) do not share.
const FLOOD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const FLOOD_2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// A short idle limit, so a test sees it act.
const SHORT: Duration = Duration::from_millis(200);

struct Fixture {
    broker: TestBroker,
    /// The group's first host; a second one (`h2`) connects during a flood.
    _agents: Vec<TestAgent>,
    dir: tempfile::TempDir,
}

/// A broker with `limits`, user `u1` and group `g` of two base hosts, the
/// first (`h1`) connected.
async fn fixture(limits: EndpointLimits) -> anyhow::Result<Fixture> {
    init_logging();
    let dir = tempfile::tempdir()?;
    let broker = TestBroker::start_with_limits(dir.path(), Default::default(), limits).await?;
    broker
        .admin(AdminRequestV1::UserCreateWithPassword {
            user: UserSpec {
                id: "u1".parse()?,
                email: "u1@example.com".into(),
                mobile: "+8613800000000".into(),
            },
            password: Secret("password-u1".into()),
        })
        .await?;
    publish(
        &broker,
        GroupSpec {
            name: Some("g".parse()?),
            region: "cn-hangzhou".into(),
            office_network: "office-net-1".into(),
            spec: "gpu-14c93g".into(),
            image: "img-1".into(),
            billing: BillingSpec::PayAsYouGo,
            base_resources: 2,
            session_type: SessionType::Independent,
            users: vec!["u1".parse()?],
            policy: PolicySpec {
                concurrent_sessions: Some(4),
                usage_threshold: Some(100),
                scale_out_step: Some(1),
                max_elastic: Some(0),
                max_idle_ms: Some(3_600_000),
                wait_timeout_ms: Some(0),
                ..PolicySpec::default()
            },
        },
    )
    .await?;
    let h1 = agent_of(&broker, "h1", "g").await?;
    Ok(Fixture {
        broker,
        _agents: vec![h1],
        dir,
    })
}

impl Fixture {
    fn ca(&self) -> std::path::PathBuf {
        self.broker.pki_dir().join(pki::CA_CERT)
    }

    /// A raw QUIC client bound to `source`.
    fn raw_endpoint(&self, source: Ipv4Addr) -> anyhow::Result<quinn::Endpoint> {
        Ok(quinn::Endpoint::client(SocketAddr::from((source, 0)))?)
    }

    /// A connection of `alpn` from `ep` that sends nothing.
    async fn raw_connect(
        &self,
        ep: &quinn::Endpoint,
        alpn: &[u8],
    ) -> anyhow::Result<Result<quinn::Connection, quinn::ConnectionError>> {
        let config = pki::client_config_for(&self.ca(), None, alpn)?;
        let connecting = ep.connect_with(config, self.broker.agent_addr(), "localhost")?;
        timeout(PATIENCE, connecting)
            .await
            .context("the handshake got no answer")
    }

    /// A real user (`ferry-connect`'s client, from 127.0.0.1) is admitted.
    async fn user_gets_through(&self) -> anyhow::Result<RouteClient> {
        let c = RouteClient::connect(self.broker.agent_addr(), "localhost", &self.ca()).await?;
        let ask = RouteAsk {
            group: "g".parse()?,
            user: "u1".parse()?,
            credential: Credential::Password("password-u1".into()),
            wait: false,
        };
        match c.route(ask, |_| {}).await? {
            RouteAnswer::Admitted(_) => Ok(c),
            RouteAnswer::Refused(r) => bail!("refused ({}): {}", r.reason, r.message),
            RouteAnswer::Redirect(a) => bail!("sent to another broker at {a}"),
        }
    }

    /// A real agent (`h2`) connects and syncs.
    async fn agent_gets_through(&mut self) -> anyhow::Result<()> {
        let h2 = agent_of(&self.broker, "h2", "g").await?;
        self._agents.push(h2);
        Ok(())
    }

    /// A real host's enrollment reaches the token check (the token is
    /// unknown: the refusal says so, not that the broker is busy).
    async fn enrollment_gets_through(&self) -> anyhow::Result<()> {
        let out = self.dir.path().join("enrolled");
        let target = EnrollTarget {
            broker_addr: self.broker.agent_addr().to_string(),
            broker_name: "localhost".into(),
            ca_cert: self.ca(),
            token: "0".repeat(64),
            cert: out.join("agent.pem"),
            key: out.join("agent-key.pem"),
            expect: None,
        };
        match ferry_agent::enroll::enroll(&target).await {
            Err(EnrollError::Refused {
                code: EnrollRefusal::UnknownToken,
                ..
            }) => Ok(()),
            other => bail!("enrollment did not reach the token check: {other:?}"),
        }
    }
}

/// Whether `e` is the broker closing with application code `code`.
fn closed_with(e: &quinn::ConnectionError, code: u32) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == code.into())
}

/// Opens a stream on `conn` if the broker gave the credit for it, without
/// waiting for more credit. The stream is kept open (and unused) in `held`:
/// dropping it would end it and give the credit back.
async fn may_open(conn: &quinn::Connection, held: &mut Vec<quinn::SendStream>) -> bool {
    // `timeout` polls the future once before it looks at the (zero) delay.
    match timeout(Duration::ZERO, conn.open_bi()).await {
        Ok(Ok((send, _))) => {
            held.push(send);
            true
        }
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_route_and_enrollment_connections_are_closed_and_get_one_or_two_streams(
) -> anyhow::Result<()> {
    let mut f = fixture(EndpointLimits {
        route_first_stream_timeout: SHORT,
        route_idle_timeout: SHORT,
        enroll_request_timeout: SHORT,
        ..EndpointLimits::default()
    })
    .await?;
    let ep = f.raw_endpoint(FLOOD)?;

    // Before authentication: two route streams, one enrollment stream.
    let route = f.raw_connect(&ep, ALPN_ROUTE).await??;
    let (mut send, mut recv) = route.open_bi().await?;
    send.write_all(&ferry_common::frame::preamble(
        ferry_common::PROTOCOL_VERSION,
    ))
    .await?;
    // The broker answered on the first stream: it set this connection's
    // stream credit before it accepted that stream.
    let mut reply = [0u8; 4];
    timeout(PATIENCE, recv.read_exact(&mut reply)).await??;
    let mut held = Vec::new();
    assert!(may_open(&route, &mut held).await, "a second route stream");
    assert!(
        !may_open(&route, &mut held).await,
        "no third stream before authentication"
    );
    route.close(0u32.into(), b"done");
    let enroll = f.raw_connect(&ep, ALPN_ENROLL).await??;
    assert!(may_open(&enroll, &mut held).await, "the enrollment stream");
    assert!(
        !may_open(&enroll, &mut held).await,
        "one enrollment stream only"
    );

    // A bounded flood of connections that send nothing.
    let mut flood = vec![enroll];
    for i in 0..24 {
        let alpn = if i % 4 == 0 { ALPN_ENROLL } else { ALPN_ROUTE };
        flood.push(f.raw_connect(&ep, alpn).await??);
    }
    // Meanwhile a real agent and a real user get through.
    f.agent_gets_through().await?;
    let user = f.user_gets_through().await?;
    // Every flood connection is closed by the broker for idleness, though
    // its keep-alives would hold it open.
    for conn in &flood {
        let why = timeout(PATIENCE, conn.closed())
            .await
            .context("an idle connection was never closed")?;
        assert!(closed_with(&why, close_code::IDLE), "{why}");
    }
    // So is the user's once its request is answered and nothing follows.
    let why = timeout(PATIENCE, user.closed())
        .await
        .context("an idle route connection after a request was never closed")?;
    assert!(closed_with(&why, close_code::IDLE), "{why}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_connection_that_never_authenticated_is_closed_after_its_answer(
) -> anyhow::Result<()> {
    // Idle route connections would be kept ten minutes: only one whose
    // request passed the credential check gets that.
    let f = fixture(EndpointLimits {
        route_idle_timeout: Duration::from_secs(600),
        ..EndpointLimits::default()
    })
    .await?;
    let guesser = RouteClient::connect(f.broker.agent_addr(), "localhost", &f.ca()).await?;
    let ask = RouteAsk {
        group: "g".parse()?,
        user: "u1".parse()?,
        credential: Credential::Password("a-wrong-guess".into()),
        wait: false,
    };
    match guesser.route(ask, |_| {}).await? {
        RouteAnswer::Refused(r) => assert_eq!(r.reason, RouteRefusal::BadCredentials),
        RouteAnswer::Admitted(a) => bail!("a wrong password was admitted: {a:?}"),
        RouteAnswer::Redirect(a) => bail!("sent to another broker at {a}"),
    }
    let why = timeout(PATIENCE, guesser.closed())
        .await
        .context("a guesser's connection was kept open")?;
    assert!(closed_with(&why, close_code::IDLE), "{why}");
    // A real user's connection stays after its answer.
    let user = f.user_gets_through().await?;
    assert!(
        timeout(Duration::from_secs(3), user.closed())
            .await
            .is_err(),
        "an authenticated connection was closed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_the_route_or_enrollment_places() -> anyhow::Result<()> {
    let mut f = fixture(EndpointLimits {
        per_source: 4,
        max_route_connections: 6,
        max_enrollments: 6,
        // The flood holds its connections for the whole test.
        route_first_stream_timeout: Duration::from_secs(600),
        enroll_request_timeout: Duration::from_secs(600),
        ..EndpointLimits::default()
    })
    .await?;
    // One address opens route connections and holds them.
    let ep = f.raw_endpoint(FLOOD)?;
    let (mut held, mut refused) = (Vec::new(), 0);
    for _ in 0..12 {
        match f.raw_connect(&ep, ALPN_ROUTE).await? {
            Ok(conn) => held.push(conn),
            Err(quinn::ConnectionError::ConnectionClosed(_)) => refused += 1,
            Err(e) => bail!("unexpected end of a flood connection: {e}"),
        }
    }
    assert_eq!((held.len(), refused), (4, 8), "the address's cap");
    // Its enrollment connections count against the same cap.
    match f.raw_connect(&ep, ALPN_ENROLL).await? {
        Err(quinn::ConnectionError::ConnectionClosed(_)) => {}
        other => bail!("a fifth connection of the address: {other:?}"),
    }
    // Another address floods enrollment.
    let ep2 = f.raw_endpoint(FLOOD_2)?;
    let mut held2 = Vec::new();
    for _ in 0..8 {
        if let Ok(conn) = f.raw_connect(&ep2, ALPN_ENROLL).await? {
            held2.push(conn);
        }
    }
    assert_eq!(held2.len(), 4, "the second address's cap");
    // Real peers from their own address still get their places.
    f.user_gets_through().await?;
    f.enrollment_gets_through().await?;
    f.agent_gets_through().await?;
    // The flood is still there: it was not closed to make room.
    for conn in held.iter().chain(&held2) {
        assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    }
    Ok(())
}

/// Makes QUIC Initial packets as a client would, from an address that never
/// answers (sans-IO: nothing reads what the broker sends back, as for a
/// spoofed source).
struct Spoofer {
    endpoint: quinn_proto::Endpoint,
    config: quinn::ClientConfig,
    broker: SocketAddr,
}

impl Spoofer {
    fn new(ca: &Path, broker: SocketAddr) -> anyhow::Result<Spoofer> {
        Ok(Spoofer {
            endpoint: quinn_proto::Endpoint::new(
                Arc::new(quinn_proto::EndpointConfig::default()),
                None,
                false,
                None,
            ),
            config: pki::client_config_for(ca, None, ferry_common::ALPN_AGENT)?,
            broker,
        })
    }

    /// The first datagram of a new connection attempt.
    fn initial(&mut self) -> anyhow::Result<Vec<u8>> {
        let now = std::time::Instant::now();
        let (_, mut conn) =
            self.endpoint
                .connect(now, self.config.clone(), self.broker, "localhost")?;
        let mut buf = Vec::new();
        let t = conn
            .poll_transmit(now, 1, &mut buf)
            .context("no Initial packet")?;
        buf.truncate(t.size);
        Ok(buf)
    }
}

/// Sends `packets` to `broker` from `socket` over and over (a repeated
/// Initial is a new attempt again once its first one was answered with a
/// Retry or refused: the broker kept no state for it), until `stop` or a
/// bounded count.
fn flood(
    socket: Arc<tokio::net::UdpSocket>,
    packets: Vec<Vec<u8>>,
    broker: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        for p in packets.iter().cycle().take(2_000_000) {
            if stop.is_cancelled() {
                break;
            }
            socket.send_to(p, broker).await?;
            tokio::task::yield_now().await;
        }
        anyhow::Ok(())
    })
}

/// Whether `packet` is a QUIC version 1 Retry (long header, type 3).
fn is_retry(packet: &[u8]) -> bool {
    packet.len() > 5 && packet[0] & 0xf0 == 0xf0 && packet[1..5] == [0, 0, 0, 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_initials_get_a_retry_under_pressure_and_real_peers_still_connect(
) -> anyhow::Result<()> {
    let mut f = fixture(EndpointLimits {
        max_handshakes: 8,
        retry_above: 4,
        // A spoofed handshake would hold its slot longer than this test.
        handshake_timeout: Duration::from_secs(600),
        ..EndpointLimits::default()
    })
    .await?;
    let broker = f.broker.agent_addr();
    let socket = Arc::new(tokio::net::UdpSocket::bind((FLOOD, 0)).await?);
    let mut spoofer = Spoofer::new(&f.ca(), broker)?;
    // A bounded flood of Initials from an address that never answers, kept
    // up while the real peers connect.
    let stop = tokio_util::sync::CancellationToken::new();
    let packets = (0..2_000)
        .map(|_| spoofer.initial())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sender = flood(socket.clone(), packets, broker, stop.clone());
    // Past `retry_above` handshakes in flight the broker answers with Retry
    // packets, which a spoofed source never sees.
    let mut buf = vec![0u8; 2048];
    timeout(PATIENCE, async {
        let mut retries = 0;
        while retries < 20 {
            let (n, _) = socket.recv_from(&mut buf).await?;
            if is_retry(&buf[..n]) {
                retries += 1;
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("no Retry from the broker under a flood of Initials")??;
    // Real peers answer the Retry, and get a slot.
    f.agent_gets_through().await?;
    f.user_gets_through().await?;
    stop.cancel();
    sender.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reconnect_in_reserved_handshake_slots_that_no_flood_takes() -> anyhow::Result<()> {
    let mut f = fixture(EndpointLimits {
        max_handshakes: 4,
        // No Retry before the general slots are all taken: the flood takes them.
        retry_above: 4,
        handshake_timeout: Duration::from_secs(600),
        ..EndpointLimits::default()
    })
    .await?;
    let broker = f.broker.agent_addr();
    // Handshakes that never finish, from another address, kept up: every
    // general slot is taken again as soon as one frees.
    let socket = Arc::new(tokio::net::UdpSocket::bind((FLOOD, 0)).await?);
    let mut spoofer = Spoofer::new(&f.ca(), broker)?;
    let packets = (0..2_000)
        .map(|_| spoofer.initial())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let sender = flood(socket.clone(), packets, broker, stop.clone());
    // The slots are full once the flood's attempts get Retry packets.
    let mut buf = vec![0u8; 2048];
    timeout(PATIENCE, async {
        loop {
            let (n, _) = socket.recv_from(&mut buf).await?;
            if is_retry(&buf[..n]) {
                return anyhow::Ok(());
            }
        }
    })
    .await
    .context("the flood never filled the handshake slots")??;
    // A new agent from the address the first agent connected from gets a
    // reserved slot once it answered the Retry.
    f.agent_gets_through().await?;
    stop.cancel();
    sender.await??;
    Ok(())
}
