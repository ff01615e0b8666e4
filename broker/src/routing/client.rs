//! The route protocol's client: what `ferry-connect` (and the tests and
//! benchmark) use. One QUIC connection without a client certificate
//! (`pki::client_config_for(ca, None, ALPN_ROUTE)`); each [`RouteClient::route`]
//! is one bidirectional stream, so many requests may share a connection.
//! [`RouteClient::route_launch`] asks for the host's streaming protocol too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_common::frame::{self, FrameError, PreambleReply, VersionRefused};
use ferry_common::route::{
    Admission, BrokerToClient, ClientToBroker, RouteAsk, RouteRefused, RouteReply, RouteRequest,
    MAX_ROUTE_FRAME_LEN,
};
use ferry_common::wire::StreamingProtocol;
use ferry_common::PROTOCOL_VERSION;
use tokio::time::timeout;

use crate::pki::{self, PkiError};

/// Longest wait for the connection and for each answer that is not a
/// waiting request's final one.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest a `--wait` request waits for its final answer. The broker answers
/// at the group's `wait_timeout`; this only bounds a broker that went silent.
pub const MAX_CLIENT_WAIT: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("TLS setup: {0}")]
    Tls(#[from] PkiError),
    #[error("QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error("connect to the broker: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake got no answer at all: nothing listens at the address,
    /// or UDP does not get through.
    #[error(
        "no answer from {addr} within {}: is ferry-broker running and listening there \
         (QUIC, UDP), and does every firewall on the way let UDP through?",
        ferry_common::duration::format_duration(*waited)
    )]
    NoAnswer { addr: SocketAddr, waited: Duration },
    /// The broker's certificate was refused by this side's TLS check.
    #[error(
        "the broker's certificate was refused ({reason}); check that --ca {} is the CA that \
         signed it (ca.pem in the broker's pki_dir) and that it names {server_name} \
         (--server-name)",
        ca.display()
    )]
    Certificate {
        reason: String,
        ca: PathBuf,
        server_name: String,
    },
    #[error("connection to the broker: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("route stream: {0}")]
    Frame(#[from] FrameError),
    #[error("write to the broker: {0}")]
    Write(String),
    #[error("the broker speaks protocol {supported}: {message}")]
    UnsupportedVersion { supported: u16, message: String },
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// The reason of a handshake this side ended because the peer's
/// certificate did not pass the TLS check (a TLS alert sent by this side:
/// a QUIC crypto error), `None` for any other failure.
fn certificate_refusal(e: &quinn::ConnectionError) -> Option<String> {
    match e {
        quinn::ConnectionError::TransportError(t)
            if t.reason.contains("certificate") || t.reason.contains("Certificate") =>
        {
            Some(t.reason.clone())
        }
        _ => None,
    }
}

/// The final answer to a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteAnswer {
    Admitted(Admission),
    Refused(RouteRefused),
    /// Ask the broker at this address (`host:port`): it owns the group.
    Redirect(String),
}

/// A connection to a broker's route service.
pub struct RouteClient {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl RouteClient {
    /// Connects to `addr`, trusting `ca` for a certificate naming `server_name`.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        ca: &Path,
    ) -> Result<RouteClient, ClientError> {
        RouteClient::connect_within(addr, server_name, ca, CLIENT_TIMEOUT).await
    }

    /// [`RouteClient::connect`], waiting at most `limit` for the handshake
    /// ([`ClientError::NoAnswer`] after it). A certificate the TLS check
    /// refuses is [`ClientError::Certificate`], which names `ca`.
    pub async fn connect_within(
        addr: SocketAddr,
        server_name: &str,
        ca: &Path,
        limit: Duration,
    ) -> Result<RouteClient, ClientError> {
        let bind: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        RouteClient::connect_from(bind, addr, server_name, ca, limit).await
    }

    /// [`RouteClient::connect_within`] from the local address `bind` (a
    /// client with several addresses, or tests speaking from several
    /// loopback addresses).
    pub async fn connect_from(
        bind: SocketAddr,
        addr: SocketAddr,
        server_name: &str,
        ca: &Path,
        limit: Duration,
    ) -> Result<RouteClient, ClientError> {
        let config = pki::client_config_for(ca, None, ferry_common::ALPN_ROUTE)?;
        let endpoint = quinn::Endpoint::client(bind).map_err(ClientError::Endpoint)?;
        let connecting = endpoint.connect_with(config, addr, server_name)?;
        let conn = match timeout(limit, connecting).await {
            Err(_) => {
                return Err(ClientError::NoAnswer {
                    addr,
                    waited: limit,
                })
            }
            Ok(Err(e)) => {
                return Err(match certificate_refusal(&e) {
                    Some(reason) => ClientError::Certificate {
                        reason,
                        ca: ca.to_path_buf(),
                        server_name: server_name.to_owned(),
                    },
                    None => ClientError::Connection(e),
                })
            }
            Ok(Ok(conn)) => conn,
        };
        Ok(RouteClient { endpoint, conn })
    }

    /// Asks for a session; `on_waiting` is called with the queue position
    /// if the request waits for room.
    pub async fn route(
        &self,
        ask: RouteAsk,
        on_waiting: impl FnMut(u32),
    ) -> Result<RouteAnswer, ClientError> {
        let wait = ask.wait;
        let (answer, _) = self
            .request(ClientToBroker::Route(ask), wait, on_waiting)
            .await?;
        Ok(answer)
    }

    /// [`RouteClient::route`] as `RouteLaunch`: an admission comes with the
    /// protocol of the host's streaming server (`None` when its agent does
    /// not say). A broker older than `RouteLaunch` refuses it as
    /// [`ferry_common::route::RouteRefusal::Malformed`]: ask again with
    /// [`RouteClient::route`] then.
    pub async fn route_launch(
        &self,
        ask: RouteAsk,
        on_waiting: impl FnMut(u32),
    ) -> Result<(RouteAnswer, Option<StreamingProtocol>), ClientError> {
        let wait = ask.wait;
        self.request(ClientToBroker::RouteLaunch(ask), wait, on_waiting)
            .await
    }

    /// One request on a new stream: its final answer, with the protocol of
    /// an `AdmittedLaunch`.
    async fn request(
        &self,
        msg: ClientToBroker,
        wait: bool,
        mut on_waiting: impl FnMut(u32),
    ) -> Result<(RouteAnswer, Option<StreamingProtocol>), ClientError> {
        let (mut send, mut recv) = timeout(CLIENT_TIMEOUT, self.conn.open_bi())
            .await
            .map_err(|_| ClientError::Timeout("a stream"))??;
        let request = frame::encode_frame(&RouteRequest::V1(msg), MAX_ROUTE_FRAME_LEN)?;
        let mut first = Vec::with_capacity(frame::PREAMBLE_LEN + request.len());
        first.extend_from_slice(&frame::preamble(PROTOCOL_VERSION));
        first.extend_from_slice(&request);
        timeout(CLIENT_TIMEOUT, send.write_all(&first))
            .await
            .map_err(|_| ClientError::Timeout("the broker to read"))?
            .map_err(|e| ClientError::Write(e.to_string()))?;
        if !wait {
            // Nothing more to say: the broker answers at once.
            let _ = send.finish();
        }
        if let Err(VersionRefused { supported, message }) =
            timeout(CLIENT_TIMEOUT, PreambleReply::expect_accepted(&mut recv))
                .await
                .map_err(|_| ClientError::Timeout("the preamble reply"))??
        {
            return Err(ClientError::UnsupportedVersion { supported, message });
        }
        let mut patience = CLIENT_TIMEOUT;
        loop {
            let msg = timeout(
                patience,
                frame::read_message_within::<RouteReply, _, MAX_ROUTE_FRAME_LEN>(&mut recv),
            )
            .await
            .map_err(|_| ClientError::Timeout("the broker's answer"))??;
            match msg {
                None => {
                    return Err(ClientError::Protocol(
                        "the broker ended the stream without an answer".into(),
                    ))
                }
                Some(RouteReply::V1(BrokerToClient::Waiting { position })) => {
                    on_waiting(position);
                    patience = MAX_CLIENT_WAIT;
                }
                Some(RouteReply::V1(BrokerToClient::Admitted(a))) => {
                    let _ = send.finish();
                    return Ok((RouteAnswer::Admitted(a), None));
                }
                Some(RouteReply::V1(BrokerToClient::AdmittedLaunch {
                    admission,
                    protocol,
                })) => {
                    let _ = send.finish();
                    return Ok((RouteAnswer::Admitted(admission), protocol));
                }
                Some(RouteReply::V1(BrokerToClient::Refused(r))) => {
                    let _ = send.finish();
                    return Ok((RouteAnswer::Refused(r), None));
                }
                Some(RouteReply::V1(BrokerToClient::Redirect { address })) => {
                    let _ = send.finish();
                    return Ok((RouteAnswer::Redirect(address), None));
                }
            }
        }
    }

    /// Waits until the connection ends, and says why (e.g. the broker closed
    /// it for idleness: `endpoint::close_code::IDLE`; open a new one then).
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
    }

    /// Closes the connection and waits (briefly) for the broker to hear it.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        let _ = timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}
