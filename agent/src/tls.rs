//! The agent's TLS identity and trust: the QUIC client configuration from the
//! CA, certificate and key files, checked before any connection (the
//! certificate must name this host's resource), and the verifier that notes
//! a broker certificate valid in all but its name. Used by the broker link
//! and by certificate renewal.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use ferry_common::{ResourceId, ALPN_AGENT};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::AgentConfig;

/// Why the agent's TLS identity or trust cannot be used. Every variant is
/// something an operator must fix in the files or the config (the agent
/// exits 78 on it, before it connects).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {what} {path}: {message}; {hint}")]
    Read {
        what: &'static str,
        path: PathBuf,
        message: String,
        hint: &'static str,
    },
    #[error("{what} {path} holds no certificate (PEM); {hint}")]
    NoCertificate {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("CA certificate {path}: {source}")]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error(
        "certificate {cert} and key {key} do not belong together ({source}); use the key the \
         certificate was issued for"
    )]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("certificate {path} cannot be read as X.509: {message}")]
    BadCertificate { path: PathBuf, message: String },
    #[error(
        "certificate {path} names {names}, but the config says resource = \"{resource}\": the \
         broker knows a host by its certificate; issue one for {resource} (ferryctl pki \
         issue-agent --resource {resource}) or set resource to the name in the certificate"
    )]
    WrongResource {
        path: PathBuf,
        names: String,
        resource: ResourceId,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS configuration not usable for QUIC: {0}")]
    Quic(String),
}

/// Hint for a missing or unreadable CA certificate.
const CA_HINT: &str = "copy the CA certificate (ca.pem) from the broker's PKI directory";
/// Hint for a missing or unreadable agent certificate or key.
const IDENTITY_HINT: &str = "issue this host's certificate and key with `ferryctl pki \
     issue-agent --resource RESOURCE` (or set enroll_token to enroll), and check the paths \
     cert and key in the config";

fn read_pem_err<'a>(
    what: &'static str,
    path: &'a Path,
    hint: &'static str,
) -> impl FnOnce(rustls_pki_types::pem::Error) -> TlsError + 'a {
    move |e| TlsError::Read {
        what,
        path: path.to_owned(),
        message: match e {
            rustls_pki_types::pem::Error::Io(io) => io.to_string(),
            other => other.to_string(),
        },
        hint,
    }
}

/// Remembers why the last handshake refused the broker's certificate for
/// its name, so the link can say `broker_name` is wrong instead of
/// "connection lost". Shared by the verifier and the link task.
#[derive(Clone, Debug, Default)]
pub struct BrokerNameCheck(Arc<Mutex<Option<String>>>);

impl BrokerNameCheck {
    fn set(&self, detail: String) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(detail);
    }

    /// The last name mismatch, cleared.
    pub fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// The broker's certificate verifier (WebPKI against the CA) that notes a
/// certificate valid in every way but its name.
#[derive(Debug)]
struct NoteNameMismatch {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check: BrokerNameCheck,
}

impl rustls::client::danger::ServerCertVerifier for NoteNameMismatch {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        let result = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match &result {
            Err(Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                presented,
                ..
            })) => {
                let names: Vec<&str> = presented.iter().map(|n| plain_name(n)).collect();
                self.check.set(format!("it names {}", names.join(", ")));
            }
            Err(Error::InvalidCertificate(CertificateError::NotValidForName)) => {
                self.check.set("it names other hosts".into())
            }
            _ => {}
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A name as rustls presents it (`DnsName("b.example")`, `IpAddress(10.0.0.1)`)
/// as an operator writes it.
fn plain_name(presented: &str) -> &str {
    presented
        .strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| {
            presented
                .strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
        })
        .unwrap_or(presented)
}

/// The DNS names of a certificate's subjectAltName.
fn dns_names(path: &Path, der: &[u8]) -> Result<Vec<String>, TlsError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let bad = |message: String| TlsError::BadCertificate {
        path: path.to_owned(),
        message,
    };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(format!("subjectAltName: {e}")))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Checks that the certificate names exactly `resource`, as the broker
/// requires (its single DNS name is the host's identity).
pub(crate) fn check_names(path: &Path, der: &[u8], resource: &ResourceId) -> Result<(), TlsError> {
    let names = dns_names(path, der)?;
    if names.len() == 1 && names[0] == resource.as_str() {
        return Ok(());
    }
    Err(TlsError::WrongResource {
        path: path.to_owned(),
        names: if names.is_empty() {
            "no DNS name".to_owned()
        } else {
            names.join(", ")
        },
        resource: resource.clone(),
    })
}

/// Builds the QUIC client configuration: the CA as the only trust root, the
/// agent's certificate as client identity, TLS 1.3 with ring, ALPN and the
/// agent link's transport limits. The crypto provider is passed explicitly,
/// not installed process-wide. Checks every file first: the CA, the
/// certificate, that the key is the certificate's and that the certificate
/// names this config's `resource`. The [`BrokerNameCheck`] reports a broker
/// certificate that does not carry `broker_name`.
pub fn client_config(
    config: &AgentConfig,
) -> Result<(quinn::ClientConfig, BrokerNameCheck), TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let ca_read = || read_pem_err("CA certificate", &config.ca_cert, CA_HINT);
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.ca_cert)
        .map_err(ca_read())?
        .collect::<Result<_, _>>()
        .map_err(ca_read())?;
    if cas.is_empty() {
        return Err(TlsError::NoCertificate {
            what: "CA certificate",
            path: config.ca_cert.clone(),
            hint: CA_HINT,
        });
    }
    for ca in cas {
        roots.add(ca).map_err(|source| TlsError::BadCa {
            path: config.ca_cert.clone(),
            source,
        })?;
    }
    let cert_read = || read_pem_err("certificate", &config.cert, IDENTITY_HINT);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert)
        .map_err(cert_read())?
        .collect::<Result<_, _>>()
        .map_err(cert_read())?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            what: "certificate",
            path: config.cert.clone(),
            hint: IDENTITY_HINT,
        });
    };
    check_names(&config.cert, leaf.as_ref(), &config.resource)?;
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(read_pem_err(
        "private key",
        &config.key,
        IDENTITY_HINT,
    ))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::BadCa {
        path: config.ca_cert.clone(),
        source: rustls::Error::General(e.to_string()),
    })?;
    let check = BrokerNameCheck::default();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoteNameMismatch {
            inner: verifier,
            check: check.clone(),
        }))
        .with_client_auth_cert(chain, key)
        .map_err(|source| match source {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: config.cert.clone(),
                key: config.key.clone(),
                source,
            },
            other => TlsError::Rustls(other),
        })?;
    tls.alpn_protocols = vec![ALPN_AGENT.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(ferry_common::transport::agent_link_transport()));
    Ok((client, check))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presented_names_are_shown_as_written() {
        assert_eq!(plain_name("DnsName(\"b.example\")"), "b.example");
        assert_eq!(plain_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(plain_name("something else"), "something else");
    }
}
