//! Enrollment (issue 6): a host made by a provisioner has no certificate,
//! only a one-time token. The agent makes its own key, sends the token and a
//! certificate signing request over ALPN [`ferry_common::ALPN_ENROLL`] (the
//! broker checked against the CA file, no client certificate), and writes
//! the certificate the broker issues for the token's resource. The key never
//! leaves the host. Both files are written 0600 and atomically (a temporary
//! file, fsync, rename, fsync of the directory), the key first: a
//! certificate on disk means enrollment is done.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_common::enroll::{
    EnrollMessage, EnrollRefusal, EnrollReply, EnrollReplyMessage, EnrollRequest,
    MAX_ENROLL_FRAME_LEN,
};
use ferry_common::frame::{self, PreambleReply};
use ferry_common::{ResourceId, ALPN_ENROLL, PROTOCOL_VERSION};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// How long one enrollment attempt may take, connection to answer.
pub const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts `ferry-agent run` makes when the broker cannot be reached
/// (a refusal is final), waiting as the link does between them.
pub const ENROLL_ATTEMPTS: u32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("read CA file {path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("make a key and a certificate request: {0}")]
    Key(String),
    #[error("reach the broker at {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("the broker refused the enrollment ({code:?}): {message}")]
    Refused {
        code: EnrollRefusal,
        message: String,
    },
    #[error("the broker broke the enrollment protocol: {0}")]
    Protocol(String),
    #[error("the broker issued a certificate for {got}, this host is {expected}")]
    WrongResource {
        expected: ResourceId,
        got: ResourceId,
    },
    #[error("write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl EnrollError {
    /// Whether trying again later can help (the broker not reachable or
    /// busy), as opposed to a refusal or a local problem.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            EnrollError::Connect { .. }
                | EnrollError::Refused {
                    code: EnrollRefusal::Unavailable,
                    ..
                }
        )
    }
}

/// Where to enroll and where to write the result.
#[derive(Clone, Debug)]
pub struct EnrollTarget {
    pub broker_addr: String,
    pub broker_name: String,
    pub ca_cert: PathBuf,
    pub token: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The resource this host must be, when known (from its config).
    pub expect: Option<ResourceId>,
}

fn client_config(ca: &Path) -> Result<quinn::ClientConfig, EnrollError> {
    let ca_err = |message: String| EnrollError::Ca {
        path: ca.to_owned(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .map_err(|e| ca_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| ca_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(ca_err("no certificate in the file".into()));
    }
    for c in certs {
        roots.add(c).map_err(|e| ca_err(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| EnrollError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_ENROLL.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| EnrollError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(ferry_common::transport::agent_link_transport()));
    Ok(client)
}

/// One enrollment: key and CSR, the exchange, the files written. Returns
/// the resource the certificate names.
pub async fn enroll(target: &EnrollTarget) -> Result<ResourceId, EnrollError> {
    enroll_within(target, None).await
}

/// [`enroll`], the connection's handshake given at most `handshake` when
/// set (the whole attempt still [`ENROLL_TIMEOUT`]).
async fn enroll_within(
    target: &EnrollTarget,
    handshake: Option<Duration>,
) -> Result<ResourceId, EnrollError> {
    let tls = client_config(&target.ca_cert)?;
    let (key, csr_der) = key_and_csr(&[]).map_err(EnrollError::Key)?;
    let request = EnrollMessage::V1(EnrollRequest {
        token: target.token.clone(),
        csr_der,
    });
    let reply = tokio::time::timeout(ENROLL_TIMEOUT, exchange(target, tls, &request, handshake))
        .await
        .map_err(|_| EnrollError::Connect {
            addr: target.broker_addr.clone(),
            message: format!("no answer within {ENROLL_TIMEOUT:?}"),
        })??;
    let (resource, cert_pem) = match reply {
        EnrollReply::Issued { resource, cert_pem } => (resource, cert_pem),
        EnrollReply::Refused { code, message } => {
            return Err(EnrollError::Refused { code, message })
        }
    };
    if let Some(expected) = &target.expect {
        if expected != &resource {
            return Err(EnrollError::WrongResource {
                expected: expected.clone(),
                got: resource,
            });
        }
    }
    write_atomic(&target.key, key.serialize_pem().as_bytes())?;
    write_atomic(&target.cert, cert_pem.as_bytes())?;
    Ok(resource)
}

/// A new key of this host and a certificate signing request (DER) for it,
/// asking for `names` (the broker decides the name it certifies).
pub(crate) fn key_and_csr(names: &[String]) -> Result<(rcgen::KeyPair, Vec<u8>), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let csr = rcgen::CertificateParams::new(names.to_vec())
        .and_then(|p| p.serialize_request(&key))
        .map_err(|e| e.to_string())?;
    Ok((key, csr.der().to_vec()))
}

async fn exchange(
    target: &EnrollTarget,
    tls: quinn::ClientConfig,
    request: &EnrollMessage,
    handshake: Option<Duration>,
) -> Result<EnrollReply, EnrollError> {
    let connect = |message: String| EnrollError::Connect {
        addr: target.broker_addr.clone(),
        message,
    };
    let addr: SocketAddr = tokio::net::lookup_host(&target.broker_addr)
        .await
        .map_err(|e| connect(e.to_string()))?
        .next()
        .ok_or_else(|| connect("the name has no address".into()))?;
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| connect(e.to_string()))?;
    let connecting = endpoint
        .connect_with(tls, addr, &target.broker_name)
        .map_err(|e| connect(e.to_string()))?;
    let conn = match handshake {
        None => connecting.await,
        Some(limit) => tokio::time::timeout(limit, connecting)
            .await
            .map_err(|_| connect(format!("no handshake within {limit:?}")))?,
    }
    .map_err(|e| connect(e.to_string()))?;
    let result = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| connect(e.to_string()))?;
        send.write_all(&frame::preamble(PROTOCOL_VERSION))
            .await
            .map_err(|e| connect(e.to_string()))?;
        PreambleReply::expect_accepted(&mut recv)
            .await
            .map_err(|e| EnrollError::Protocol(e.to_string()))?
            .map_err(|refused| EnrollError::Protocol(refused.message))?;
        frame::write_message(&mut send, request, MAX_ENROLL_FRAME_LEN)
            .await
            .map_err(|e| connect(e.to_string()))?;
        let _ = send.finish();
        match frame::read_message_within::<EnrollReplyMessage, _, MAX_ENROLL_FRAME_LEN>(&mut recv)
            .await
        {
            Ok(Some(EnrollReplyMessage::V1(reply))) => Ok(reply),
            Ok(None) => Err(EnrollError::Protocol(
                "the broker closed without an answer".into(),
            )),
            Err(e) => Err(EnrollError::Protocol(e.to_string())),
        }
    }
    .await;
    conn.close(0u32.into(), b"enrolled");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result
}

/// Enrolls, retrying while the broker cannot be reached, with the link's
/// backoff between attempts.
pub async fn enroll_with_retries(target: &EnrollTarget) -> Result<ResourceId, EnrollError> {
    enroll_among(target, &[]).await
}

/// As [`enroll_with_retries`], with `others`: the agent's other brokers
/// (`brokers`), which share the first one's store and so know its tokens.
/// A failed attempt that may pass moves to the next broker in turn, and
/// each connection's handshake is then given the link's limit
/// ([`crate::config::HANDSHAKE_LIMIT`]): a host created by a broker that died
/// before the host enrolled enrolls with another one instead of waiting
/// for the dead one until its token expires. Only the handshake is
/// limited so: a broker that answered may have spent the token, and an
/// attempt given up after that could not be made again.
pub async fn enroll_among(
    target: &EnrollTarget,
    others: &[String],
) -> Result<ResourceId, EnrollError> {
    let handshake = crate::config::handshake_limit(others);
    let mut at = target.clone();
    let mut attempt: u32 = 0;
    loop {
        let turn = usize::try_from(attempt).unwrap_or(0) % (1 + others.len());
        at.broker_addr = match turn.checked_sub(1).and_then(|i| others.get(i)) {
            Some(other) => other.clone(),
            None => target.broker_addr.clone(),
        };
        match enroll_within(&at, handshake).await {
            Err(e) if e.is_retryable() && attempt + 1 < ENROLL_ATTEMPTS => {
                attempt += 1;
                let wait = crate::backoff::full_jitter(
                    crate::backoff::backoff_ceiling(attempt),
                    rand::random(),
                );
                tracing::warn!(attempt, "enrollment failed, trying again in {wait:?}: {e}");
                tokio::time::sleep(wait).await;
            }
            other => return other,
        }
    }
}

/// Writes `bytes` to `path` with mode 0600: a temporary file beside it,
/// fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EnrollError> {
    write_all_atomic(&[(path, bytes)])
}

/// Writes each `(path, bytes)` with mode 0600, replacing the files whole:
/// every temporary file (beside its target, of its own name, created
/// exclusively and never through a symlink: [`ferry_process::files`]) is
/// written and fsynced before the first rename, then each is renamed in
/// order and the directories fsynced. A crash leaves each file old or new,
/// never torn.
pub(crate) fn write_all_atomic(files: &[(&Path, &[u8])]) -> Result<(), EnrollError> {
    let err = |e: ferry_process::files::WriteError| EnrollError::Write {
        path: e.path,
        error: e.source,
    };
    let mut staged = Vec::with_capacity(files.len());
    for (path, bytes) in files {
        // Dropping `staged` on an error removes the temporaries.
        staged.push(
            ferry_process::files::stage(path, bytes, ferry_process::files::PRIVATE).map_err(err)?,
        );
    }
    for s in staged {
        s.commit().map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_are_written_private_and_replaced_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("sub").join("agent-key.pem");
        write_atomic(&path, b"one").expect("write");
        write_atomic(&path, b"two").expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }
}
