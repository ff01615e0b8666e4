//! The link to the broker: a QUIC client with mutual TLS.
//!
//! One connection at a time, one bidirectional stream carrying everything
//! (see the contract in `common::wire`):
//!
//! 1. preamble and its reply (an unknown version is refused readably);
//! 2. `Hello` with host facts, the spool id and the sessions open now;
//! 3. `Welcome` says what the broker already recorded of this spool: those
//!    events are dropped, the rest replayed in order, then new ones sent as
//!    they are spooled;
//! 4. `StreamingServer` (`Streaming` when no `streaming_protocol` is
//!    configured), `Inventory` and the presence resync follow the
//!    `Welcome`; `Ack`s delete from the spool; `Health` goes out on the
//!    broker's interval; `Command`s are carried out and answered, an image
//!    switch or update followed by a new `Inventory`.
//!
//! Any failure ends the connection; the agent reconnects after an
//! exponential backoff with full jitter ([`backoff_ceiling`],
//! [`full_jitter`]), reset after a `Welcome`. Nothing is lost meanwhile: the
//! spool holds every unacknowledged event.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::HANDSHAKE_LIMIT;

use ferry_common::frame::{
    preamble, read_message, write_message, FrameError, PreambleReply, VersionRefused,
};
use ferry_common::limits::{MAX_FRAME_LEN, MAX_SESSIONS_PER_HELLO};
use ferry_common::wire::{
    AgentMessage, AgentToBroker, BrokerMessage, BrokerToAgent, CommandResult, Hello, Refusal,
    RefusalCode, RenewalOutcome, StreamingServer, Welcome,
};
use ferry_common::PROTOCOL_VERSION;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::commands::{self, DrainState};
use crate::config::AgentConfig;
use crate::health::{self, HealthSampler};
use crate::spool::{SpoolError, SpoolHandle};
use crate::LinkStatus;

pub use crate::backoff::{backoff_ceiling, full_jitter, BACKOFF_CAP, BACKOFF_START};
pub use crate::tls::{client_config, BrokerNameCheck, TlsError};

/// A finished command: its result (none for an agent update that waits for
/// its restart), whether it changed the drain state, and whether it changed
/// the versions.
type CommandDone = (Option<CommandResult>, bool, bool);
/// The commands running on one connection.
type CommandJobs = JoinSet<CommandDone>;

/// Shortest health interval the agent honours, whatever the broker says: a
/// misconfigured broker cannot make the agent spin.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(10);
/// Events written per wake-up before the loop looks at incoming messages.
const SEND_BATCH: usize = 256;
/// Broker messages buffered between the reader task and the link loop.
const INBOX_LEN: usize = 64;
/// Broker commands carried out at once; more are answered "busy".
pub const MAX_INFLIGHT_COMMANDS: usize = 16;
/// How long a closing connection may take to tell the broker.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// QUIC application error code of a clean close by the agent.
const CLOSE_CODE_SHUTDOWN: u32 = 0;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("resolve {addr}: {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("create QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error("connect to broker: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection to broker: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("talk to broker: {0}")]
    Frame(#[from] FrameError),
    #[error("broker speaks protocol {supported}, this agent {ours}: {message}")]
    UnsupportedVersion {
        supported: u16,
        ours: u16,
        message: String,
    },
    #[error("broker refused ({:?}): {}", .0.code, .0.message)]
    Refused(Refusal),
    #[error("broker broke the protocol: {0}")]
    Protocol(String),
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("broker closed the connection")]
    Closed,
    #[error("shutting down")]
    Shutdown,
    #[error("the certificate was renewed; reconnecting with it")]
    Renewed,
    #[error("{message}; connecting there")]
    Redirected { address: String, message: String },
    #[error(
        "the broker at {address} did not answer within {after:?}; trying the next configured broker"
    )]
    NoAnswer { address: String, after: Duration },
    #[error(
        "the broker's certificate is not valid for broker_name \"{name}\" ({detail}): \
         broker_name must be a DNS name in the broker's certificate (the --broker-name of \
         `ferryctl pki init`)"
    )]
    BrokerName { name: String, detail: String },
}

impl LinkError {
    /// Errors an operator must fix in configuration (retrying cannot help
    /// until they do); logged as errors rather than warnings.
    pub fn is_config_problem(&self) -> bool {
        matches!(
            self,
            LinkError::UnsupportedVersion { .. }
                | LinkError::BrokerName { .. }
                | LinkError::Refused(Refusal {
                    code: RefusalCode::IdentityMismatch
                        | RefusalCode::NotMember
                        | RefusalCode::Revoked,
                    ..
                })
        )
    }
}

/// The link task's parts.
pub struct Link {
    /// Agent configuration (identity, broker address and name, hooks).
    pub config: Arc<AgentConfig>,
    /// QUIC/TLS client configuration, built once at start.
    pub tls: quinn::ClientConfig,
    /// Why the last handshake refused the broker's certificate's name.
    pub name_check: BrokerNameCheck,
    /// Events to send and acks to apply.
    pub spool: SpoolHandle,
    /// Published connection state.
    pub status: Arc<watch::Sender<LinkStatus>>,
    /// The host's drain flag, changed by broker commands.
    pub drain: DrainState,
    /// The group policy file, written by `ApplyPolicy` commands.
    pub policy: crate::policy::PolicyStore,
    /// Where the broker's ticket key (`TicketKey`) is kept.
    pub tickets: crate::ticket::TicketVerifier,
    /// Users' presence on sessions, sent as `Presence`.
    pub presence: crate::presence::PresenceBoard,
    /// What the host runs, sent as `Inventory`.
    pub versions: crate::versions::VersionStore,
    /// The applied policy's session limits, set by `ApplyPolicy`.
    pub limits: Arc<watch::Sender<crate::policy::SessionLimits>>,
    /// One update at a time, across connections.
    pub updates: Arc<tokio::sync::Mutex<()>>,
    /// Where commands run: a command (an update's hook above all) outlives
    /// the connection it came on and is only stopped by the agent's shutdown.
    /// A command the broker replays after a reconnect finds its work done
    /// (or waits for the update lock).
    pub tasks: tokio_util::task::TaskTracker,
    /// The certificate's renewal over the link, across connections.
    pub renew: Mutex<crate::renew::RenewState>,
    /// Which broker the next connection goes to.
    pub targets: Mutex<Targets>,
    /// Where reconnects and hook runs are counted.
    pub metrics: crate::metrics::AgentMetrics,
}

/// Most redirects followed in a row; past them the agent backs off as after
/// a failure (brokers that disagree on a group's owner do not make it spin).
pub const MAX_REDIRECTS: u32 = 4;

/// Longest wait before reconnecting after `NotOwner` (a group changing
/// owner): its new owner takes it within a lease renewal.
const NOT_OWNER_WAIT: Duration = Duration::from_secs(1);

/// Longest wait before reconnecting after `StoreUnavailable` (the broker's
/// database failing over or restarting): back soon, and the events wait.
const STORE_UNAVAILABLE_WAIT: Duration = Duration::from_secs(5);

/// How long a broker that failed is not followed to by redirect when other
/// brokers are configured: the agent asks them again instead, every
/// [`NOT_OWNER_WAIT`] at most, until one of them holds the group.
const SHUN_FAILED: Duration = Duration::from_secs(10);

/// The brokers the agent connects to: the configured ones in turn, and the
/// one a broker sent it to.
#[derive(Debug, Default)]
pub struct Targets {
    /// Index of the configured broker to try next.
    next: usize,
    /// Where the last broker sent the agent.
    redirect: Option<String>,
    /// Redirects followed since the last `Welcome`.
    hops: u32,
    /// The address of the connection under way.
    current: Option<String>,
    /// The address whose connection failed last: the next pick passes it
    /// over when another broker is configured (a broker that died is not
    /// tried again at once, even when it was its turn).
    failed: Option<String>,
    /// When `failed` failed.
    failed_at: Option<Instant>,
}

impl Targets {
    /// The address of the next connection.
    fn pick(&mut self, config: &AgentConfig) -> String {
        let addr = match self.redirect.take() {
            Some(addr) => addr,
            None => {
                let all = 1 + config.brokers.len();
                let configured = |i: usize| match (i % all).checked_sub(1) {
                    Some(i) => config.brokers.get(i).unwrap_or(&config.broker_addr),
                    None => &config.broker_addr,
                };
                let skip = (0..all)
                    .find(|k| self.failed.as_deref() != Some(configured(self.next + k).as_str()))
                    .unwrap_or(0);
                self.next = (self.next + skip) % all;
                configured(self.next).clone()
            }
        };
        self.current = Some(addr.clone());
        addr
    }

    /// The connection to the current target failed or was refused: the
    /// next one goes to the next configured broker.
    fn failed(&mut self) {
        self.failed_at = Some(Instant::now());
        self.failed = self.current.take();
        self.next += 1;
    }

    /// Whether a redirect to `address` at `now` is better not followed:
    /// other brokers are configured and `address` failed less than
    /// [`SHUN_FAILED`] ago. A killed owner's lease outlives it, and until
    /// another broker takes the group the others keep sending its agents
    /// there; each try would cost a [`HANDSHAKE_LIMIT`].
    fn shuns(&self, address: &str, config: &AgentConfig, now: Instant) -> bool {
        !config.brokers.is_empty()
            && self.failed.as_deref() == Some(address)
            && self
                .failed_at
                .is_some_and(|at| now.saturating_duration_since(at) < SHUN_FAILED)
    }

    /// A redirect not followed (see [`Targets::shuns`]): the next
    /// connection goes to the next configured broker.
    fn passed_over(&mut self) {
        self.current = None;
        self.next += 1;
    }

    /// A broker welcomed the agent.
    fn welcomed(&mut self) {
        self.hops = 0;
        self.failed = None;
        self.failed_at = None;
    }
}

/// The handshake's time limit under `config` (see [`HANDSHAKE_LIMIT`]).
fn handshake_limit(config: &AgentConfig) -> Option<Duration> {
    crate::config::handshake_limit(&config.brokers)
}

impl Link {
    /// Connects, reconnects and serves the broker until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let sampler = Arc::new(Mutex::new(HealthSampler::new()));
        let mut attempt: u32 = 0;
        loop {
            let result = self.connection(&shutdown, &mut attempt, &sampler).await;
            let mut result_code = None;
            self.status
                .send_if_modified(|s| std::mem::replace(&mut s.connected, false));
            match result {
                Ok(()) | Err(LinkError::Shutdown) => return,
                Err(LinkError::Renewed) => {
                    attempt = 0;
                    continue;
                }
                Err(LinkError::Redirected { address, message })
                    if self.targets().shuns(&address, &self.config, Instant::now()) =>
                {
                    // Its owner died and its lease has not run out yet:
                    // another broker takes the group within a lease.
                    tracing::info!(%address, "{message}, which just failed: asking again shortly");
                    self.targets().passed_over();
                    result_code = Some(RefusalCode::NotOwner);
                }
                Err(LinkError::Redirected { address, message }) => {
                    let mut t = self.targets();
                    t.hops += 1;
                    if t.hops <= MAX_REDIRECTS {
                        tracing::info!(%address, "{message}: connecting there");
                        t.redirect = Some(address);
                        continue;
                    }
                    tracing::warn!(%address, hops = t.hops,
                        "brokers keep redirecting; backing off before trying again");
                    t.hops = 0;
                    t.failed();
                    drop(t);
                    self.status.send_modify(|s| {
                        s.last_error = Some(format!("{message} (too many redirects)"))
                    });
                }
                Err(e) => {
                    if let LinkError::Refused(r) = &e {
                        result_code = Some(r.code);
                    }
                    // The next attempt goes to the next configured broker.
                    self.targets().failed();
                    if e.is_config_problem() {
                        tracing::error!(error = %e, "broker link refused: check the agent's configuration and certificate");
                    } else {
                        tracing::warn!(error = %e, "broker link down");
                    }
                    // A spool that cannot be written stays the news.
                    let text = self.spool.failure().unwrap_or_else(|| e.to_string());
                    self.status.send_modify(|s| s.last_error = Some(text));
                }
            }
            let ceiling = match result_code {
                Some(RefusalCode::NotOwner) => backoff_ceiling(attempt).min(NOT_OWNER_WAIT),
                // The broker's store is back within seconds, typically.
                Some(RefusalCode::StoreUnavailable) => {
                    backoff_ceiling(attempt).min(STORE_UNAVAILABLE_WAIT)
                }
                _ => backoff_ceiling(attempt),
            };
            let delay = full_jitter(ceiling, rand::random());
            attempt = attempt.saturating_add(1);
            tracing::debug!(?delay, attempt, "reconnecting after a delay");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn connection(
        &self,
        shutdown: &CancellationToken,
        attempt: &mut u32,
        sampler: &Arc<Mutex<HealthSampler>>,
    ) -> Result<(), LinkError> {
        let target = self.targets().pick(&self.config);
        let addr = resolve(&target).await?;
        let bind: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(LinkError::Endpoint)?;
        let (tls, name_check) = self.current_tls();
        let connecting = endpoint.connect_with(tls, addr, &self.config.broker_name)?;
        name_check.take();
        let limit = handshake_limit(&self.config);
        let handshake = async move {
            match limit {
                Some(limit) => tokio::time::timeout(limit, connecting).await.ok(),
                None => Some(connecting.await),
            }
        };
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return Err(LinkError::Shutdown),
            c = handshake => match c {
                Some(Ok(conn)) => conn,
                Some(Err(e)) => return Err(match name_check.take() {
                    Some(detail) => LinkError::BrokerName {
                        name: self.config.broker_name.clone(),
                        detail,
                    },
                    None => e.into(),
                }),
                None => return Err(LinkError::NoAnswer {
                    address: target,
                    after: limit.unwrap_or(HANDSHAKE_LIMIT),
                }),
            },
        };
        let result = self.converse(&conn, shutdown, attempt, sampler).await;
        // Disconnected as of now, not after the close below.
        self.status
            .send_if_modified(|s| std::mem::replace(&mut s.connected, false));
        let result = match result {
            // A stream error only says "connection lost"; the connection
            // knows why (e.g. the broker rejected the certificate), and that
            // is what an operator reading `last_error` needs.
            Err(LinkError::Frame(FrameError::Io(_))) if conn.close_reason().is_some() => {
                Err(closed(&conn))
            }
            other => other,
        };
        let reason: &[u8] = match &result {
            Err(LinkError::Shutdown) | Ok(()) => b"agent shutting down",
            Err(_) => b"agent closing after an error",
        };
        conn.close(CLOSE_CODE_SHUTDOWN.into(), reason);
        // Let the CONNECTION_CLOSE reach the broker, but never hang on it.
        let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
        result
    }

    /// The TLS configuration of the current certificate: the renewed one,
    /// else the one built at start.
    fn current_tls(&self) -> (quinn::ClientConfig, BrokerNameCheck) {
        let renew = self.renew.lock().unwrap_or_else(PoisonError::into_inner);
        match &renew.tls {
            Some(tls) => tls.clone(),
            None => (self.tls.clone(), self.name_check.clone()),
        }
    }

    fn targets(&self) -> std::sync::MutexGuard<'_, Targets> {
        self.targets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn renew_state(&self) -> std::sync::MutexGuard<'_, crate::renew::RenewState> {
        self.renew.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The certificate's life as its file says, logged when unreadable.
    fn cert_life(&self) -> Option<crate::renew::CertLife> {
        match crate::renew::cert_life_of_file(&self.config.cert) {
            Ok(life) => Some(life),
            Err(e) => {
                tracing::warn!(cert = %self.config.cert.display(),
                    "cannot read the certificate's validity for its renewal: {e}");
                None
            }
        }
    }

    /// Asks the broker for a new certificate when the current one is due
    /// (a request without an answer by now counts as failed).
    async fn maybe_renew(
        &self,
        life: Option<crate::renew::CertLife>,
        send: &mut quinn::SendStream,
        shutdown: &CancellationToken,
    ) -> Result<(), LinkError> {
        let now = crate::clock::now();
        let csr_der = {
            let mut state = self.renew_state();
            if state.is_pending() {
                tracing::warn!("the broker did not answer the certificate renewal; trying later");
                state.abandon();
                return Ok(());
            }
            if !state.should_request(life, now) {
                return Ok(());
            }
            match state.request(&self.config.resource) {
                Ok(csr) => csr,
                Err(e) => {
                    tracing::error!("certificate renewal: make a key and a request: {e}");
                    state.failed();
                    return Ok(());
                }
            }
        };
        tracing::info!(
            "the certificate has a third of its lifetime left; asking the broker to renew it"
        );
        send_msg(send, AgentToBroker::Renew { csr_der }, shutdown).await
    }

    /// The broker's answer to a renewal: a certificate is checked, written
    /// and used from the next connection (`LinkError::Renewed` reconnects
    /// at once); anything else is tried again later.
    fn on_renewal(&self, outcome: RenewalOutcome) -> Result<(), LinkError> {
        let mut state = self.renew_state();
        let Some(key) = state.take_pending() else {
            tracing::warn!("a renewal answer for no request; ignored");
            return Ok(());
        };
        let cert_pem = match outcome {
            RenewalOutcome::Issued { cert_pem } => cert_pem,
            RenewalOutcome::Failed { message } => {
                tracing::warn!("the broker did not renew the certificate, trying later: {message}");
                state.failed();
                return Ok(());
            }
        };
        if let Err(e) = crate::renew::install(&self.config, &key, &cert_pem) {
            tracing::error!("renewed certificate not installed, trying later: {e}");
            state.failed();
            return Ok(());
        }
        match client_config(&self.config) {
            Ok(tls) => {
                state.succeeded(tls);
                tracing::info!(cert = %self.config.cert.display(),
                    "certificate renewed; reconnecting with it");
                Err(LinkError::Renewed)
            }
            Err(e) => {
                tracing::error!("the renewed certificate cannot be used: {e}");
                state.failed();
                Ok(())
            }
        }
    }

    async fn converse(
        &self,
        conn: &quinn::Connection,
        shutdown: &CancellationToken,
        attempt: &mut u32,
        sampler: &Arc<Mutex<HealthSampler>>,
    ) -> Result<(), LinkError> {
        let (mut send, mut recv) = cancellable(shutdown, conn.open_bi()).await??;
        cancellable(shutdown, async {
            tokio::io::AsyncWriteExt::write_all(&mut send, &preamble(PROTOCOL_VERSION)).await
        })
        .await?
        .map_err(FrameError::Io)?;
        if let Err(VersionRefused { supported, message }) =
            cancellable(shutdown, PreambleReply::expect_accepted(&mut recv)).await??
        {
            return Err(LinkError::UnsupportedVersion {
                supported,
                ours: PROTOCOL_VERSION,
                message,
            });
        }

        let hello = self.hello().await;
        let spool_id = hello.spool_id;
        send_msg(&mut send, AgentToBroker::Hello(hello), shutdown).await?;
        let first: Option<BrokerMessage> =
            cancellable(shutdown, read_message(&mut recv, MAX_FRAME_LEN)).await??;
        let welcome = match first {
            Some(BrokerMessage::V1(BrokerToAgent::Welcome(w))) => w,
            Some(BrokerMessage::V1(BrokerToAgent::Refused(r))) => {
                return Err(LinkError::Refused(r))
            }
            Some(BrokerMessage::V1(BrokerToAgent::Redirect { address, message })) => {
                return Err(LinkError::Redirected { address, message })
            }
            Some(other) => {
                return Err(LinkError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )))
            }
            None => return Err(closed(conn)),
        };
        self.accept_welcome(&welcome, spool_id).await?;
        *attempt = 0;
        self.targets().welcomed();
        tracing::info!(
            broker_version = %welcome.broker_version,
            last_recorded_seq = welcome.last_recorded_seq,
            "connected to broker"
        );

        // Reading is not cancel-safe, so it lives in its own task and hands
        // whole messages over a bounded channel.
        let (inbox_tx, mut inbox) = mpsc::channel::<Result<BrokerMessage, FrameError>>(INBOX_LEN);
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            loop {
                let msg = read_message::<BrokerMessage, _>(&mut recv, MAX_FRAME_LEN).await;
                let end = !matches!(msg, Ok(Some(_)));
                let item = match msg {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err(FrameError::Truncated),
                    Err(e) => Err(e),
                };
                if inbox_tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        let result = self
            .serve(&mut send, &mut inbox, &welcome, shutdown, sampler)
            .await;
        // A request this connection carried gets no answer now.
        self.renew_state().abandon();
        tasks.abort_all();
        if matches!(result, Err(LinkError::Frame(FrameError::Truncated))) {
            return Err(closed(conn));
        }
        result
    }

    async fn hello(&self) -> Hello {
        let host = tokio::task::spawn_blocking(health::host_facts)
            .await
            .unwrap_or_else(|_| health::facts_from(None, None, None, 0, 0));
        let (spool_id, mut sessions) = {
            let s = self.spool.lock();
            (s.spool_id(), s.open_sessions())
        };
        if sessions.len() > MAX_SESSIONS_PER_HELLO {
            // The spool refuses starts past this limit; never send more.
            sessions.truncate(MAX_SESSIONS_PER_HELLO);
        }
        Hello {
            resource: self.config.resource.clone(),
            group: self.config.group.clone(),
            agent_version: crate::AGENT_VERSION.to_owned(),
            image_version: self.versions.image_version(),
            host,
            spool_id,
            sessions,
        }
    }

    async fn accept_welcome(&self, welcome: &Welcome, spool_id: u64) -> Result<(), LinkError> {
        if welcome.resource != self.config.resource {
            return Err(LinkError::Protocol(format!(
                "welcomed as {} but this agent is {}",
                welcome.resource, self.config.resource
            )));
        }
        let last = self.spool.lock().last_seq();
        if welcome.last_recorded_seq > last {
            // The broker has more of this spool than the file: the state
            // directory was restored from an older copy. New events under
            // the old id would be taken for duplicates, so start a new spool.
            let new_id = self.spool.with(|s| s.start_new_spool()).await?;
            tracing::error!(
                spool_id,
                new_spool_id = new_id,
                broker_seq = welcome.last_recorded_seq,
                local_seq = last,
                "broker recorded more of this spool than it holds; started a new spool"
            );
            return Err(LinkError::Protocol(
                "spool behind the broker; reconnecting with a new spool".into(),
            ));
        }
        self.spool.ack(welcome.last_recorded_seq).await?;
        let failure = self.spool.failure();
        self.status.send_modify(|s| {
            s.connected = true;
            s.last_error = failure;
        });
        self.metrics.link_established();
        Ok(())
    }

    async fn serve(
        &self,
        send: &mut quinn::SendStream,
        inbox: &mut mpsc::Receiver<Result<BrokerMessage, FrameError>>,
        welcome: &Welcome,
        shutdown: &CancellationToken,
        sampler: &Arc<Mutex<HealthSampler>>,
    ) -> Result<(), LinkError> {
        let mut appended = self.spool.subscribe_appended();
        let mut sent = self.spool.lock().acked_seq();
        let interval =
            Duration::from_millis(u64::from(welcome.health_interval_ms)).max(MIN_HEALTH_INTERVAL);
        let mut health_tick = tokio::time::interval(interval);
        health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commands = CommandJobs::new();
        self.announce(send, shutdown).await?;
        // At connect, then when due (looking again at least every hour).
        let mut life = self.cert_life();
        self.maybe_renew(life, send, shutdown).await?;
        let mut renew_wake = self.renew_state().next_wake(life, crate::clock::now());
        loop {
            // Mark the current value seen before reading, so an append that
            // races with this batch wakes the loop again.
            appended.borrow_and_update();
            self.send_spooled(send, &mut sent, shutdown).await?;
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                changed = appended.changed() => {
                    if changed.is_err() {
                        return Err(LinkError::Shutdown);
                    }
                }
                _ = self.presence.changed() => {
                    for report in self.presence.take_pending() {
                        send_msg(send, AgentToBroker::Presence(report), shutdown).await?;
                    }
                }
                msg = inbox.recv() => {
                    let msg = match msg {
                        Some(Ok(BrokerMessage::V1(m))) => m,
                        Some(Err(e)) => return Err(e.into()),
                        None => return Err(LinkError::Closed),
                    };
                    if let BrokerToAgent::Renewal(outcome) = msg {
                        self.on_renewal(outcome)?;
                        renew_wake = self.renew_state().next_wake(life, crate::clock::now());
                    } else {
                        self.on_message(msg, sent, &mut commands, send, shutdown).await?;
                    }
                }
                _ = tokio::time::sleep_until(renew_wake) => {
                    life = self.cert_life();
                    self.maybe_renew(life, send, shutdown).await?;
                    renew_wake = self.renew_state().next_wake(life, crate::clock::now());
                }
                done = commands.join_next(), if !commands.is_empty() => {
                    if let Some(Ok(done)) = done {
                        self.on_command_done(done, send, shutdown, sampler).await?;
                    }
                }
                _ = health_tick.tick() => self.send_health(send, shutdown, sampler).await?,
            }
        }
    }

    /// What the broker forgets with the connection: where users reach the
    /// host, what it runs, then who is away now.
    async fn announce(
        &self,
        send: &mut quinn::SendStream,
        shutdown: &CancellationToken,
    ) -> Result<(), LinkError> {
        send_msg(send, streaming_message(&self.config), shutdown).await?;
        send_msg(
            send,
            AgentToBroker::Inventory(self.versions.inventory()),
            shutdown,
        )
        .await?;
        for report in self.presence.resync() {
            send_msg(send, AgentToBroker::Presence(report), shutdown).await?;
        }
        Ok(())
    }

    /// Sends every spooled event after `sent`, in batches, moving `sent`.
    async fn send_spooled(
        &self,
        send: &mut quinn::SendStream,
        sent: &mut u64,
        shutdown: &CancellationToken,
    ) -> Result<(), LinkError> {
        loop {
            let batch = self.spool.lock().events_after(*sent, SEND_BATCH);
            if batch.is_empty() {
                return Ok(());
            }
            for ev in batch {
                let seq = ev.seq;
                send_msg(send, AgentToBroker::Session(ev), shutdown).await?;
                tracing::debug!(seq, "event sent");
                *sent = seq;
            }
        }
    }

    /// One message of the broker (`sent`: the highest sequence sent so far).
    async fn on_message(
        &self,
        msg: BrokerToAgent,
        sent: u64,
        commands: &mut CommandJobs,
        send: &mut quinn::SendStream,
        shutdown: &CancellationToken,
    ) -> Result<(), LinkError> {
        match msg {
            BrokerToAgent::Ack { up_to } => {
                if up_to > sent {
                    return Err(LinkError::Protocol(format!(
                        "ack of seq {up_to} but only {sent} was sent"
                    )));
                }
                tracing::debug!(up_to, "broker acknowledged events");
                self.spool.ack(up_to).await?;
                tracing::debug!(up_to, "acknowledgement applied to the spool");
            }
            BrokerToAgent::Command { id, command } => {
                if commands.len() >= MAX_INFLIGHT_COMMANDS {
                    let result = CommandResult {
                        id,
                        outcome: ferry_common::wire::CommandOutcome::Failed(format!(
                            "agent busy: {MAX_INFLIGHT_COMMANDS} commands already running"
                        )),
                    };
                    send_msg(send, AgentToBroker::CommandResult(result), shutdown).await?;
                } else {
                    self.start_command(id, command, commands, shutdown);
                }
            }
            BrokerToAgent::Refused(r) => return Err(LinkError::Refused(r)),
            BrokerToAgent::Redirect { address, message } => {
                return Err(LinkError::Redirected { address, message })
            }
            BrokerToAgent::Welcome(_) => {
                return Err(LinkError::Protocol("a second Welcome".into()))
            }
            // Handled by the loop (`on_renewal`).
            BrokerToAgent::Renewal(_) => {}
            BrokerToAgent::TicketKey { public_key } => {
                match self.tickets.set_key(public_key).await {
                    Ok(true) => tracing::info!("broker ticket key stored"),
                    Ok(false) => {}
                    // Tickets keep verifying with the key already kept (if any).
                    Err(e) => tracing::error!(error = %e, "broker ticket key not stored"),
                }
            }
        }
        Ok(())
    }

    /// Runs a broker command as a tracked task (cancelled on shutdown); its
    /// result comes back through `commands`.
    fn start_command(
        &self,
        id: u64,
        command: ferry_common::wire::Command,
        commands: &mut CommandJobs,
        shutdown: &CancellationToken,
    ) {
        let ctx = commands::CommandContext {
            drain: self.drain.clone(),
            policy: self.policy.clone(),
            hooks: self.config.hooks.clone(),
            status: self.status.clone(),
            versions: self.versions.clone(),
            limits: self.limits.clone(),
            updates: self.updates.clone(),
            metrics: self.metrics.clone(),
        };
        let drain_command = matches!(
            command,
            ferry_common::wire::Command::Drain | ferry_common::wire::Command::Undrain
        );
        let inventory = commands::changes_inventory(&command);
        let stop = shutdown.clone();
        let job = self.tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => None,
                outcome = commands::execute(command, &ctx) => outcome,
            }
        });
        commands.spawn(async move {
            let outcome = job.await.ok().flatten();
            (
                outcome.map(|outcome| CommandResult { id, outcome }),
                drain_command,
                inventory,
            )
        });
    }

    /// A finished command: its result, then the inventory or the drain
    /// state it changed.
    async fn on_command_done(
        &self,
        (result, drain_command, inventory): CommandDone,
        send: &mut quinn::SendStream,
        shutdown: &CancellationToken,
        sampler: &Arc<Mutex<HealthSampler>>,
    ) -> Result<(), LinkError> {
        let Some(result) = result else {
            return Ok(());
        };
        send_msg(send, AgentToBroker::CommandResult(result), shutdown).await?;
        if inventory {
            let inventory = self.versions.inventory();
            send_msg(send, AgentToBroker::Inventory(inventory), shutdown).await?;
        }
        if drain_command {
            // Report the new drain state now, not at the next tick.
            self.send_health(send, shutdown, sampler).await?;
        }
        Ok(())
    }

    async fn send_health(
        &self,
        send: &mut quinn::SendStream,
        shutdown: &CancellationToken,
        sampler: &Arc<Mutex<HealthSampler>>,
    ) -> Result<(), LinkError> {
        let report = self.health_report(sampler, self.drain.is_draining()).await;
        send_msg(send, AgentToBroker::Health(report), shutdown).await
    }

    async fn health_report(
        &self,
        sampler: &Arc<Mutex<HealthSampler>>,
        draining: bool,
    ) -> ferry_common::wire::HealthReport {
        let sampler = sampler.clone();
        let sample = tokio::task::spawn_blocking(move || {
            sampler
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .sample()
        })
        .await
        .unwrap_or(health::HostSample {
            cpu_percent: 0.0,
            memory_used: 0,
            memory_total: 0,
            disk_used: 0,
            disk_total: 0,
            load: [0.0; 3],
        });
        let sessions = u32::try_from(self.spool.lock().open_count()).unwrap_or(u32::MAX);
        health::to_report(&sample, crate::clock::now(), sessions, draining)
    }
}

/// Runs `fut` unless `shutdown` comes first. Only for futures whose
/// cancellation abandons the connection anyway.
async fn cancellable<T>(
    shutdown: &CancellationToken,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, LinkError> {
    tokio::select! {
        _ = shutdown.cancelled() => Err(LinkError::Shutdown),
        out = fut => Ok(out),
    }
}

/// Where users reach the streaming server: `StreamingServer` when the
/// configuration names its protocol, else the older `Streaming`, which
/// means the same to a broker and is all a broker older than
/// `StreamingServer` decodes (such a broker ends the link on a message it
/// cannot decode), so an agent upgraded before its broker keeps working
/// until it is configured with a protocol.
fn streaming_message(config: &AgentConfig) -> AgentToBroker {
    match config.streaming_protocol {
        Some(protocol) => AgentToBroker::StreamingServer(StreamingServer {
            endpoint: config.streaming.clone(),
            protocol: Some(protocol),
        }),
        None => AgentToBroker::Streaming(config.streaming.clone()),
    }
}

async fn send_msg(
    send: &mut quinn::SendStream,
    msg: AgentToBroker,
    shutdown: &CancellationToken,
) -> Result<(), LinkError> {
    cancellable(
        shutdown,
        write_message(send, &AgentMessage::V1(msg), MAX_FRAME_LEN),
    )
    .await??;
    Ok(())
}

fn closed(conn: &quinn::Connection) -> LinkError {
    match conn.close_reason() {
        Some(reason) => LinkError::Connection(reason),
        None => LinkError::Closed,
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, LinkError> {
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|source| LinkError::Resolve {
            addr: addr.to_owned(),
            source,
        })?;
    addrs
        .next()
        .ok_or_else(|| LinkError::NoAddress(addr.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::wire::StreamingProtocol;

    #[test]
    fn config_problems_are_told_apart() {
        let refused = |code| {
            LinkError::Refused(Refusal {
                code,
                message: "m".into(),
            })
        };
        assert!(refused(RefusalCode::IdentityMismatch).is_config_problem());
        assert!(refused(RefusalCode::NotMember).is_config_problem());
        assert!(!refused(RefusalCode::ShuttingDown).is_config_problem());
        assert!(LinkError::UnsupportedVersion {
            supported: 2,
            ours: 1,
            message: String::new()
        }
        .is_config_problem());
        assert!(!LinkError::Closed.is_config_problem());
    }

    fn config(brokers: &[&str]) -> AgentConfig {
        let list: Vec<String> = brokers.iter().map(|b| format!("{b:?}")).collect();
        let text = format!(
            "resource = \"host-1\"\nbroker_addr = \"b0:7443\"\nbrokers = [{}]\n",
            list.join(", ")
        );
        AgentConfig::from_toml(&text, std::path::Path::new("agent.toml")).expect("valid")
    }

    #[test]
    fn the_streaming_protocol_goes_to_the_broker_only_when_configured() {
        let c = config(&[]);
        assert_eq!(
            streaming_message(&c),
            AgentToBroker::Streaming(c.streaming.clone())
        );
        let text = "resource = \"host-1\"\nbroker_addr = \"b0:7443\"\n\
                    streaming_address = \"s.example:3389\"\nstreaming_protocol = \"rdp\"\n";
        let c = AgentConfig::from_toml(text, std::path::Path::new("agent.toml")).expect("valid");
        assert_eq!(
            streaming_message(&c),
            AgentToBroker::StreamingServer(StreamingServer {
                endpoint: ferry_common::wire::StreamingEndpoint {
                    host: Some("s.example".into()),
                    port: 3389,
                },
                protocol: Some(StreamingProtocol::Rdp),
            })
        );
    }

    #[test]
    fn the_configured_brokers_are_tried_in_turn_and_a_redirect_goes_first() {
        let c = config(&["b1:7443", "b2:7443"]);
        let mut t = Targets::default();
        assert_eq!(t.pick(&c), "b0:7443");
        t.failed();
        assert_eq!(t.pick(&c), "b1:7443");
        t.redirect = Some("b2:7443".into());
        assert_eq!(t.pick(&c), "b2:7443");
        t.welcomed();
        t.failed();
        assert_eq!(t.pick(&c), "b0:7443");
    }

    #[test]
    fn a_broker_that_just_failed_is_passed_over_even_in_its_turn() {
        let c = config(&["b1:7443", "b2:7443"]);
        let mut t = Targets::default();
        assert_eq!(t.pick(&c), "b0:7443");
        // b0 sent the agent to b1, the owner, which then died: the next
        // turn would be b1's, but b2 is tried first.
        t.redirect = Some("b1:7443".into());
        assert_eq!(t.pick(&c), "b1:7443");
        t.failed();
        assert_eq!(t.pick(&c), "b2:7443");
        // b2 sends it to b1 again (its lease has not expired yet), which
        // still does not answer: b0 next, not b1.
        t.redirect = Some("b1:7443".into());
        assert_eq!(t.pick(&c), "b1:7443");
        t.failed();
        assert_eq!(t.pick(&c), "b0:7443");
        // Alone, a broker is tried again.
        let alone = config(&[]);
        let mut t = Targets::default();
        assert_eq!(t.pick(&alone), "b0:7443");
        t.failed();
        assert_eq!(t.pick(&alone), "b0:7443");
        assert_eq!(handshake_limit(&alone), None);
        assert_eq!(handshake_limit(&c), Some(HANDSHAKE_LIMIT));
    }

    #[test]
    fn a_redirect_to_a_broker_that_just_failed_is_not_followed_for_a_while() {
        let c = config(&["b1:7443", "b2:7443"]);
        let mut t = Targets::default();
        assert_eq!(t.pick(&c), "b0:7443");
        t.failed();
        let now = Instant::now();
        // b0, the owner, died: b1 still sends the agent there.
        assert_eq!(t.pick(&c), "b1:7443");
        assert!(t.shuns("b0:7443", &c, now));
        assert!(!t.shuns("b2:7443", &c, now), "a live owner is followed");
        t.passed_over();
        assert_eq!(t.pick(&c), "b2:7443", "the others are asked in turn");
        t.passed_over();
        assert_eq!(t.pick(&c), "b1:7443", "the failed one is passed over");
        // Long after the failure, or once a broker welcomed the agent, a
        // redirect there is followed again.
        assert!(!t.shuns("b0:7443", &c, now + SHUN_FAILED));
        t.welcomed();
        assert!(!t.shuns("b0:7443", &c, now));
        // With one broker configured, there is nothing else to ask.
        let alone = config(&[]);
        let mut t = Targets::default();
        assert_eq!(t.pick(&alone), "b0:7443");
        t.failed();
        assert!(!t.shuns("b0:7443", &alone, now));
    }
}
