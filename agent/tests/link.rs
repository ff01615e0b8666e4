//! The agent end to end against a minimal test broker that speaks the
//! contract (preamble, Hello/Welcome, acks, commands) over real QUIC with
//! mutual TLS on 127.0.0.1:0. The real broker<->agent tests live in the
//! `tests` crate; this peer only lets the agent crate test its own half.

#![allow(clippy::unwrap_used)] // a test crate: a failed unwrap is a failed test

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_agent::local::LocalClient;
use ferry_agent::{AgentConfig, AgentReady};
use ferry_common::frame::{parse_preamble, read_message, write_message, PreambleReply};
use ferry_common::limits::MAX_FRAME_LEN;
use ferry_common::wire::{
    AgentMessage, AgentToBroker, BrokerMessage, BrokerToAgent, Command, CommandOutcome,
    CommandResult, EndReason, HealthReport, Hello, SequencedEvent, SessionEvent, Welcome,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Generous bound for anything that should happen promptly; never a sleep.
const WAIT: Duration = Duration::from_secs(30);

struct Pki {
    dir: PathBuf,
}

fn mint(dir: &Path, resource: &str) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test ca");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let broker_key = KeyPair::generate().unwrap();
    let broker = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&broker_key, &ca, &ca_key)
        .unwrap();
    let agent_key = KeyPair::generate().unwrap();
    let mut agent_params = CertificateParams::new(vec![resource.to_owned()]).unwrap();
    agent_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    agent_params
        .distinguished_name
        .push(DnType::CommonName, resource);
    let agent = agent_params.signed_by(&agent_key, &ca, &ca_key).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for (name, text) in [
        ("ca.pem", ca.pem()),
        ("broker.pem", broker.pem()),
        ("broker-key.pem", broker_key.serialize_pem()),
        ("agent.pem", agent.pem()),
        ("agent-key.pem", agent_key.serialize_pem()),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    Pki {
        dir: dir.to_owned(),
    }
}

/// What the test broker saw and can do.
struct Peer {
    addr: SocketAddr,
    /// Lets connections in (until then the handshake waits, like a broker
    /// that is down or still starting).
    open: watch::Sender<bool>,
    /// Recorded events per spool id.
    recorded: Arc<Mutex<HashMap<u64, Vec<SequencedEvent>>>>,
    hellos: mpsc::Receiver<Hello>,
    health: mpsc::Receiver<HealthReport>,
    results: mpsc::Receiver<CommandResult>,
    commands: mpsc::Sender<Command>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

fn server_config(pki: &Pki) -> quinn::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.dir.join("ca.pem")).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let chain = vec![CertificateDer::from_pem_file(pki.dir.join("broker.pem")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(pki.dir.join("broker-key.pem")).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![ferry_common::ALPN_AGENT.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(ferry_common::transport::agent_link_transport()));
    cfg
}

fn start_peer(pki: &Pki, protocol: u16) -> Peer {
    let endpoint =
        quinn::Endpoint::server(server_config(pki), "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (open, mut open_rx) = watch::channel(false);
    let recorded = Arc::new(Mutex::new(HashMap::new()));
    let (hello_tx, hellos) = mpsc::channel(16);
    let (health_tx, health) = mpsc::channel(1024);
    let (result_tx, results) = mpsc::channel(16);
    let (commands, command_rx) = mpsc::channel(16);
    let command_rx = Arc::new(tokio::sync::Mutex::new(command_rx));
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (rec, sd, tr) = (recorded.clone(), shutdown.clone(), tracker.clone());
    tracker.spawn(async move {
        tokio::select! {
            _ = sd.cancelled() => return,
            _ = open_rx.wait_for(|o| *o) => {}
        }
        loop {
            let incoming = tokio::select! {
                _ = sd.cancelled() => break,
                i = endpoint.accept() => match i { Some(i) => i, None => break },
            };
            let conn_state = (
                rec.clone(),
                hello_tx.clone(),
                health_tx.clone(),
                result_tx.clone(),
                command_rx.clone(),
                sd.clone(),
            );
            tr.spawn(async move {
                let _ = serve(incoming, protocol, conn_state).await;
            });
        }
        endpoint.close(0u32.into(), b"test over");
    });
    Peer {
        addr,
        open,
        recorded,
        hellos,
        health,
        results,
        commands,
        shutdown,
        tracker,
    }
}

type ConnState = (
    Arc<Mutex<HashMap<u64, Vec<SequencedEvent>>>>,
    mpsc::Sender<Hello>,
    mpsc::Sender<HealthReport>,
    mpsc::Sender<CommandResult>,
    Arc<tokio::sync::Mutex<mpsc::Receiver<Command>>>,
    CancellationToken,
);

async fn serve(incoming: quinn::Incoming, protocol: u16, st: ConnState) -> anyhow::Result<()> {
    let (recorded, hellos, health, results, commands, shutdown) = st;
    let conn = incoming.await?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut pre = [0u8; 8];
    recv.read_exact(&mut pre).await?;
    let version = parse_preamble(&pre)?;
    if version != protocol {
        let reply = PreambleReply::UnsupportedVersion {
            supported: protocol,
            message: format!("test broker speaks {protocol}, agent sent {version}"),
        };
        send.write_all(&reply.encode()).await?;
        send.finish()?;
        conn.closed().await;
        return Ok(());
    }
    send.write_all(&PreambleReply::Accepted { version }.encode())
        .await?;
    let Some(AgentMessage::V1(AgentToBroker::Hello(hello))) =
        read_message::<AgentMessage, _>(&mut recv, MAX_FRAME_LEN).await?
    else {
        anyhow::bail!("first message not a Hello");
    };
    let spool = hello.spool_id;
    let last = recorded.lock().unwrap().get(&spool).map_or(0, |v| v.len()) as u64;
    let welcome = Welcome {
        resource: hello.resource.clone(),
        last_recorded_seq: last,
        health_interval_ms: 50,
        broker_version: "test".into(),
    };
    hellos.send(hello).await?;
    write_message(
        &mut send,
        &BrokerMessage::V1(BrokerToAgent::Welcome(welcome)),
        MAX_FRAME_LEN,
    )
    .await?;
    let (in_tx, mut inbox) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok(Some(m)) = read_message::<AgentMessage, _>(&mut recv, MAX_FRAME_LEN).await {
            if in_tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut commands = commands.lock().await;
    let mut next_id = 1;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            cmd = commands.recv() => {
                let Some(command) = cmd else { return Ok(()) };
                let msg = BrokerMessage::V1(BrokerToAgent::Command { id: next_id, command });
                next_id += 1;
                write_message(&mut send, &msg, MAX_FRAME_LEN).await?;
            }
            msg = inbox.recv() => {
                let Some(AgentMessage::V1(msg)) = msg else { return Ok(()) };
                match msg {
                    AgentToBroker::Session(ev) => {
                        let up_to = {
                            let mut rec = recorded.lock().unwrap();
                            let v = rec.entry(spool).or_default();
                            if ev.seq == v.len() as u64 + 1 {
                                v.push(ev);
                            } else {
                                assert!(ev.seq <= v.len() as u64, "sequence gap at {}", ev.seq);
                            }
                            v.len() as u64
                        };
                        let ack = BrokerMessage::V1(BrokerToAgent::Ack { up_to });
                        write_message(&mut send, &ack, MAX_FRAME_LEN).await?;
                    }
                    AgentToBroker::Health(h) => {
                        let _ = health.try_send(h);
                    }
                    AgentToBroker::CommandResult(r) => results.send(r).await?,
                    AgentToBroker::Hello(_) => anyhow::bail!("second Hello"),
                    // Routing facts and versions: not this test's.
                    AgentToBroker::Streaming(_) | AgentToBroker::Presence(_) | AgentToBroker::Inventory(_) => {}
                }
            }
        }
    }
}

impl Peer {
    async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(WAIT, self.tracker.wait())
            .await
            .unwrap();
    }
}

fn config(pki: &Pki, dir: &Path, broker: SocketAddr) -> AgentConfig {
    let text = format!(
        r#"
        resource = "host-1"
        group = "g1"
        broker_addr = "{broker}"
        ca_cert = "{pki}/ca.pem"
        cert = "{pki}/agent.pem"
        key = "{pki}/agent-key.pem"
        state_dir = "{dir}/state"
        local_socket = "{dir}/run/agent.sock"
        image_version = "img-1"
        "#,
        pki = pki.dir.display(),
        dir = dir.display(),
    );
    AgentConfig::from_toml(&text, Path::new("test.toml")).unwrap()
}

struct Agent {
    ready: AgentReady,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ferry_agent::AgentError>>,
}

async fn start_agent(config: AgentConfig) -> Agent {
    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(ferry_agent::run(config, shutdown.clone(), tx));
    let ready = tokio::time::timeout(WAIT, rx).await.unwrap().unwrap();
    Agent {
        ready,
        shutdown,
        task,
    }
}

impl Agent {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn recv<T>(rx: &mut mpsc::Receiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_reach_the_broker_in_order_and_survive_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = mint(&tmp.path().join("pki"), "host-1");
    let mut peer = start_peer(&pki, ferry_common::PROTOCOL_VERSION);
    let cfg = config(&pki, tmp.path(), peer.addr);
    let agent = start_agent(cfg.clone()).await;

    // The broker is not taking connections yet: reports are spooled anyway.
    let mut c = LocalClient::connect(&agent.ready.local_socket)
        .await
        .unwrap();
    let user = |u: &str| u.parse().unwrap();
    let sid = |s: &str| s.parse().unwrap();
    assert_eq!(c.session_start(sid("s1"), user("alice")).await.unwrap(), 1);
    assert_eq!(c.session_start(sid("s2"), user("bob")).await.unwrap(), 2);
    assert_eq!(
        c.session_end(sid("s1"), EndReason::Logout).await.unwrap(),
        3
    );
    let st = c.status().await.unwrap();
    assert!(!st.link.connected);
    assert_eq!((st.link.last_seq, st.link.spooled), (3, 3));

    peer.open.send_replace(true);
    let synced = c.wait_synced(WAIT).await.unwrap();
    assert_eq!((synced.link.acked_seq, synced.link.spooled), (3, 0));
    let hello = recv(&mut peer.hellos).await;
    assert_eq!(hello.resource.as_str(), "host-1");
    assert_eq!(hello.group.as_ref().map(|g| g.as_str()), Some("g1"));
    assert_eq!(hello.image_version, "img-1");
    assert!(hello.host.vcpus >= 1);
    let open: Vec<_> = hello.sessions.iter().map(|s| s.session.as_str()).collect();
    assert_eq!(open, ["s2"]);
    let spool_id = hello.spool_id;
    {
        let rec = peer.recorded.lock().unwrap();
        let evs = &rec[&spool_id];
        let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert!(
            matches!(&evs[2].event, SessionEvent::Ended { session, reason: EndReason::Logout, .. } if session.as_str() == "s1")
        );
    }

    // Health flows on the broker's interval and counts open sessions.
    let h = recv(&mut peer.health).await;
    assert_eq!(h.sessions, 1);
    assert!(!h.draining);

    // Commands are carried out and answered; drain is reported in health.
    peer.commands.send(Command::Drain).await.unwrap();
    let r = recv(&mut peer.results).await;
    assert_eq!(r.outcome, CommandOutcome::Done);
    loop {
        if recv(&mut peer.health).await.draining {
            break;
        }
    }
    peer.commands
        .send(Command::DisconnectSession {
            session: sid("s2"),
            reason: "test".into(),
        })
        .await
        .unwrap();
    let r = recv(&mut peer.results).await;
    assert!(
        matches!(&r.outcome, CommandOutcome::Failed(m) if m.contains("no disconnect hook")),
        "{r:?}"
    );
    agent.stop().await;

    // Restart: same spool, nothing replayed twice, drain kept, s2 still open.
    let agent = start_agent(cfg).await;
    let mut c = LocalClient::connect(&agent.ready.local_socket)
        .await
        .unwrap();
    let st = c.wait_synced(WAIT).await.unwrap();
    assert!(st.link.draining);
    assert_eq!(st.link.last_seq, 3);
    let hello = recv(&mut peer.hellos).await;
    assert_eq!(hello.spool_id, spool_id);
    let open: Vec<_> = hello.sessions.iter().map(|s| s.session.as_str()).collect();
    assert_eq!(open, ["s2"]);
    assert_eq!(
        c.session_end(sid("s2"), EndReason::Logout).await.unwrap(),
        4
    );
    c.wait_synced(WAIT).await.unwrap();
    {
        let rec = peer.recorded.lock().unwrap();
        let seqs: Vec<u64> = rec[&spool_id].iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
    }
    agent.stop().await;
    peer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_protocol_version_is_reported_and_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = mint(&tmp.path().join("pki"), "host-1");
    let peer = start_peer(&pki, ferry_common::PROTOCOL_VERSION + 1);
    peer.open.send_replace(true);
    let agent = start_agent(config(&pki, tmp.path(), peer.addr)).await;
    let mut status = agent.ready.status.clone();
    let st = tokio::time::timeout(
        WAIT,
        status.wait_for(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("protocol"))
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert!(!st.connected);
    assert!(st.last_error.unwrap().contains("test broker speaks 2"));
    agent.stop().await;
    peer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_a_certificate_from_another_ca_is_not_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = mint(&tmp.path().join("pki"), "host-1");
    let other = mint(&tmp.path().join("other"), "host-1");
    let peer = start_peer(&other, ferry_common::PROTOCOL_VERSION);
    peer.open.send_replace(true);
    let agent = start_agent(config(&pki, tmp.path(), peer.addr)).await;
    let mut status = agent.ready.status.clone();
    let st = tokio::time::timeout(WAIT, status.wait_for(|s| s.last_error.is_some()))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert!(!st.connected);
    let err = st.last_error.unwrap();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    agent.stop().await;
    peer.stop().await;
}
