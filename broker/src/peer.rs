//! Brokers sharing a store forward an operator's request to the broker that
//! owns its group (ALPN [`ferry_common::ALPN_PEER`]), so `ferryctl` on any
//! broker drains a host, ends a session or shows a group's live state
//! wherever the group is served.
//!
//! The requests an operator may make of a broker's admin socket are its
//! whole power over the fleet, so only another broker of the cluster may
//! make them over the network. Brokers sharing a store share their PKI
//! directory and with it the broker key; a peer proves it holds that key
//! by an HMAC, under a key derived from it, of keying material exported
//! from the TLS session of this very connection (RFC 5705): the proof
//! cannot be replayed on another connection, and the TLS handshake has
//! already shown that the answering side holds the broker certificate.
//! A request that arrives this way is answered by this broker alone: it is
//! never forwarded again, and only the kinds a broker forwards
//! ([`forwarded`]) are answered at all.
//!
//! One connection per request: the preamble, one [`PeerMessage`] frame
//! (at most [`MAX_PEER_FRAME_LEN`], within 5 s), one `AdminResponseV1`
//! frame back; at most `admin::peer_service::MAX_PEER_CONNECTIONS` served at once
//! (the owner's side lives with the admin handler it calls).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ferry_common::admin::{AdminRequestV1, AdminResponseV1};
use ferry_common::frame::{self, PreambleReply};
use ferry_common::limits::MAX_ADMIN_FRAME_LEN;
use ferry_common::PROTOCOL_VERSION;
use serde::{Deserialize, Serialize};
use tokio::time::timeout;

use crate::pki::{self, PkiError};

/// Longest wait for a forwarded request's answer, from resolving the
/// owner's address on. A drain waits for the agent's answer, itself bounded.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest wait, on the owner's side, for a peer's preamble and request:
/// it has not proven anything yet.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest request frame taken from a peer. A forwarded request names a
/// host, a session or a group: a few hundred bytes.
pub const MAX_PEER_FRAME_LEN: usize = 16 * 1024;

/// Label of the proof key derived from the broker key.
const PROOF_KEY_LABEL: &[u8] = b"ferry broker peer proof key v1";
/// Label of the keying material exported from the TLS session.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-ferry-peer-proof-v1";

/// What a broker sends another.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerMessage {
    V1 {
        /// HMAC-SHA256 of this connection's exported keying material.
        proof: Vec<u8>,
        request: AdminRequestV1,
    },
}

/// The proof key, derived from the broker key all brokers of a cluster
/// share.
#[derive(Clone)]
pub struct PeerKey(ring::hmac::Key);

impl PeerKey {
    /// Derives it from the broker key in `pki_dir`.
    pub fn load(pki_dir: &Path) -> Result<PeerKey, PkiError> {
        let path = pki_dir.join(pki::BROKER_KEY);
        let secret = std::fs::read(&path)
            .map_err(|e| PkiError::Tls(format!("read {}: {e}", path.display())))?;
        Ok(PeerKey::from_secret(&secret))
    }

    fn from_secret(secret: &[u8]) -> PeerKey {
        let master = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let derived = ring::hmac::sign(&master, PROOF_KEY_LABEL);
        PeerKey(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            derived.as_ref(),
        ))
    }

    fn material(conn: &quinn::Connection) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
            .ok()?;
        Some(out)
    }

    /// The proof for `conn`; `None` when its TLS session exports nothing.
    fn prove(&self, conn: &quinn::Connection) -> Option<Vec<u8>> {
        let material = PeerKey::material(conn)?;
        Some(ring::hmac::sign(&self.0, &material).as_ref().to_vec())
    }

    /// Whether `proof` is this key's for `conn` (compared in constant time).
    pub(crate) fn check(&self, conn: &quinn::Connection, proof: &[u8]) -> bool {
        PeerKey::material(conn).is_some_and(|m| ring::hmac::verify(&self.0, &m, proof).is_ok())
    }
}

/// The client side: sends a request to the broker at an address.
pub struct Peers {
    key: PeerKey,
    config: quinn::ClientConfig,
    /// A name of the shared broker certificate, checked in each handshake.
    server_name: String,
}

impl Peers {
    /// From the PKI directory all brokers share.
    pub fn new(pki_dir: &Path) -> Result<Peers, PkiError> {
        let config =
            pki::client_config_for(&pki_dir.join(pki::CA_CERT), None, ferry_common::ALPN_PEER)?;
        let server_name = pki::broker_names(&pki_dir.join(pki::BROKER_CERT))?
            .into_iter()
            .next()
            .unwrap_or_else(|| "localhost".to_owned());
        Ok(Peers {
            key: PeerKey::load(pki_dir)?,
            config,
            server_name,
        })
    }

    /// The proof key, which the owner's side checks with.
    pub fn key(&self) -> &PeerKey {
        &self.key
    }

    /// Sends `request` to the broker at `address` (`host:port`) and returns
    /// its answer, or why there is none (in words for the operator), within
    /// [`PEER_TIMEOUT`].
    pub async fn forward(
        &self,
        address: &str,
        request: AdminRequestV1,
    ) -> Result<AdminResponseV1, String> {
        timeout(PEER_TIMEOUT, self.forward_now(address, request))
            .await
            .map_err(|_| {
                "no answer within 30 s (a drain or disconnect may have been carried out \
                 nonetheless: check before asking again)"
                    .to_owned()
            })?
    }

    async fn forward_now(
        &self,
        address: &str,
        request: AdminRequestV1,
    ) -> Result<AdminResponseV1, String> {
        let addr = resolve(address).await?;
        let bind: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| format!("QUIC endpoint: {e}"))?;
        let answer = self.ask(&endpoint, addr, request).await;
        endpoint.close(0u32.into(), b"done");
        answer
    }

    async fn ask(
        &self,
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        request: AdminRequestV1,
    ) -> Result<AdminResponseV1, String> {
        let connecting = endpoint
            .connect_with(self.config.clone(), addr, &self.server_name)
            .map_err(|e| e.to_string())?;
        let conn = connecting.await.map_err(|e| match e {
            quinn::ConnectionError::ConnectionClosed(c)
                if c.error_code == quinn::TransportErrorCode::crypto(120) =>
            {
                // TLS no_application_protocol: a broker from before
                // requests were forwarded.
                "it does not take requests from other brokers (upgrade it)".to_owned()
            }
            e => e.to_string(),
        })?;
        let proof = self
            .key
            .prove(&conn)
            .ok_or("the TLS session exports no keying material")?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let message = frame::encode_frame(&PeerMessage::V1 { proof, request }, MAX_PEER_FRAME_LEN)
            .map_err(|e| e.to_string())?;
        let mut first = Vec::with_capacity(frame::PREAMBLE_LEN + message.len());
        first.extend_from_slice(&frame::preamble(PROTOCOL_VERSION));
        first.extend_from_slice(&message);
        send.write_all(&first).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        let work = async {
            PreambleReply::expect_accepted(&mut recv)
                .await
                .map_err(|e| e.to_string())?
                .map_err(|v| format!("it speaks protocol {}: {}", v.supported, v.message))?;
            frame::read_message_within::<AdminResponseV1, _, MAX_ADMIN_FRAME_LEN>(&mut recv)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "it closed the stream without an answer".to_owned())
        };
        let answer = work.await;
        conn.close(0u32.into(), b"done");
        answer
    }
}

async fn resolve(address: &str) -> Result<SocketAddr, String> {
    tokio::net::lookup_host(address)
        .await
        .map_err(|e| format!("resolve {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("{address} has no address"))
}

/// The requests a broker forwards (see `admin::owner_elsewhere`): nothing
/// else is taken from another broker.
pub fn forwarded(request: &AdminRequestV1) -> bool {
    matches!(
        request,
        AdminRequestV1::Drain { .. }
            | AdminRequestV1::Undrain { .. }
            | AdminRequestV1::DisconnectSession { .. }
            | AdminRequestV1::GroupShow { .. }
            | AdminRequestV1::GroupShowWithPolicy { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client connection to a server endpoint on 127.0.0.1:0 with the
    /// broker's TLS configuration from `pki`, and the server's side of it.
    async fn pair(pki: &Path, server: &quinn::Endpoint) -> (quinn::Connection, quinn::Connection) {
        let client = quinn::Endpoint::client((std::net::Ipv4Addr::LOCALHOST, 0).into())
            .expect("client endpoint");
        let config = pki::client_config_for(&pki.join(pki::CA_CERT), None, ferry_common::ALPN_PEER)
            .expect("client config");
        let addr = server.local_addr().expect("addr");
        let connecting = client
            .connect_with(config, addr, "localhost")
            .expect("connect");
        let (c, s) = tokio::join!(connecting, async {
            server.accept().await.expect("incoming").await
        });
        (c.expect("client side"), s.expect("server side"))
    }

    #[tokio::test]
    async fn a_proof_holds_for_its_own_connection_and_key_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        let pki = tmp.path().join("pki");
        pki::init(&pki, &[]).expect("pki");
        let server = quinn::Endpoint::server(
            pki::server_config(&pki).expect("server config"),
            (std::net::Ipv4Addr::LOCALHOST, 0).into(),
        )
        .expect("server endpoint");
        let key = PeerKey::load(&pki).expect("key");
        let (c1, s1) = pair(&pki, &server).await;
        let (c2, s2) = pair(&pki, &server).await;
        let proof = key.prove(&c1).expect("proof");
        assert!(
            key.check(&s1, &proof),
            "the same key on the same connection"
        );
        assert!(!key.check(&s2, &proof), "replayed on another connection");
        let stranger = PeerKey::from_secret(b"another cluster's broker key");
        assert!(!key.check(&s1, &stranger.prove(&c1).expect("proof")));
        assert!(key.check(&s2, &key.prove(&c2).expect("proof")));
        assert!(!key.check(&s1, b""));
    }

    #[test]
    fn the_proof_key_is_derived_not_the_broker_key_and_differs_per_broker_key() {
        let tag = |k: &PeerKey| ring::hmac::sign(&k.0, b"material").as_ref().to_vec();
        let a = PeerKey::from_secret(b"broker key A");
        assert_eq!(tag(&a), tag(&PeerKey::from_secret(b"broker key A")));
        assert_ne!(tag(&a), tag(&PeerKey::from_secret(b"broker key B")));
        let master = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"broker key A");
        assert_ne!(
            tag(&a),
            ring::hmac::sign(&master, b"material").as_ref().to_vec()
        );
    }
}
