//! A minimal test broker that speaks the agent contract (preamble,
//! Hello/Welcome, acks, commands) over real QUIC with mutual TLS on
//! 127.0.0.1:0, and helpers to start the agent in-process. Shared by the
//! agent's integration tests.

#![allow(dead_code)] // each test file uses part of it
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_agent::{AgentConfig, AgentReady};
use ferry_common::frame::{parse_preamble, read_message, write_message, PreambleReply};
use ferry_common::limits::MAX_FRAME_LEN;
use ferry_common::wire::{
    AgentMessage, AgentToBroker, BrokerMessage, BrokerToAgent, Command, CommandResult,
    HealthReport, Hello, Inventory, SequencedEvent, Welcome,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Generous bound for anything that should happen promptly; never a sleep.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct Pki {
    pub dir: PathBuf,
}

pub fn mint(dir: &Path, resource: &str) -> Pki {
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
    // As `ferryctl pki init` names a broker by default: agents reach this one
    // at 127.0.0.1, the default broker_name.
    let broker = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
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
pub struct Peer {
    pub addr: SocketAddr,
    /// Lets connections in (until then the handshake waits, like a broker
    /// that is down or still starting).
    pub open: watch::Sender<bool>,
    /// Recorded events per spool id.
    pub recorded: Arc<Mutex<HashMap<u64, Vec<SequencedEvent>>>>,
    pub hellos: mpsc::Receiver<Hello>,
    pub health: mpsc::Receiver<HealthReport>,
    pub results: mpsc::Receiver<CommandResult>,
    /// Every `Inventory` the agent sent, in order.
    pub inventories: mpsc::Receiver<Inventory>,
    pub commands: mpsc::Sender<Command>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

pub fn server_config(pki: &Pki) -> quinn::ServerConfig {
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

pub fn start_peer(pki: &Pki, protocol: u16) -> Peer {
    let endpoint =
        quinn::Endpoint::server(server_config(pki), "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (open, mut open_rx) = watch::channel(false);
    let recorded = Arc::new(Mutex::new(HashMap::new()));
    let (hello_tx, hellos) = mpsc::channel(16);
    let (health_tx, health) = mpsc::channel(1024);
    let (result_tx, results) = mpsc::channel(16);
    let (inventory_tx, inventories) = mpsc::channel(64);
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
                inventory_tx.clone(),
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
        inventories,
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
    mpsc::Sender<Inventory>,
    Arc<tokio::sync::Mutex<mpsc::Receiver<Command>>>,
    CancellationToken,
);

async fn serve(incoming: quinn::Incoming, protocol: u16, st: ConnState) -> anyhow::Result<()> {
    let (recorded, hellos, health, results, inventories, commands, shutdown) = st;
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
                    AgentToBroker::Inventory(i) => {
                        // Kept for the tests that read them; the others never fill it.
                        let _ = inventories.try_send(i);
                    }
                    // Renewal is tested against the real broker (tests/tests/certs.rs).
                    AgentToBroker::Streaming(_)
                    | AgentToBroker::StreamingServer(_)
                    | AgentToBroker::Presence(_)
                    | AgentToBroker::Renew { .. } => {}
                }
            }
        }
    }
}

impl Peer {
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(WAIT, self.tracker.wait())
            .await
            .unwrap();
    }
}

pub fn config(pki: &Pki, dir: &Path, broker: SocketAddr) -> AgentConfig {
    config_with(pki, dir, broker, "")
}

/// The test config with `extra` (e.g. a `[hooks]` table) appended.
pub fn config_with(pki: &Pki, dir: &Path, broker: SocketAddr, extra: &str) -> AgentConfig {
    let mut text = format!(
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
    text.push_str(extra);
    AgentConfig::from_toml(&text, Path::new("test.toml")).unwrap()
}

pub struct Agent {
    pub ready: AgentReady,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), ferry_agent::AgentError>>,
}

pub async fn start_agent(config: AgentConfig) -> Agent {
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
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

pub async fn recv<T>(rx: &mut mpsc::Receiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap()
}
