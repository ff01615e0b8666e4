//! The broker's private CA: creating it, issuing agent certificates, and
//! turning the files into rustls/quinn configurations.
//!
//! An agent's identity is its certificate: exactly one DNS SAN naming its
//! resource id. The broker requires a client certificate chaining to its CA
//! and reads the resource from that SAN, never from what the agent says.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_common::{certs, ResourceId, UnixMillis};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Names the broker certificate carries when the operator names none.
pub const DEFAULT_BROKER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const BROKER_CERT: &str = "broker.pem";
pub const BROKER_KEY: &str = "broker-key.pem";
pub const AGENT_CERT: &str = "agent.pem";
pub const AGENT_KEY: &str = "agent-key.pem";

/// Lifetime of an agent certificate unless told otherwise (`pki issue-agent
/// --days`, the broker's `agent_cert_lifetime`).
pub const DEFAULT_AGENT_LIFETIME: Duration = Duration::from_secs(30 * 86_400);

/// Lifetime of the CA `pki init` creates: ten years.
pub const CA_LIFETIME: Duration = Duration::from_secs(3_652 * 86_400);

/// Lifetime of the broker's certificate (`pki init`, `pki issue-broker`):
/// two years.
pub const BROKER_LIFETIME: Duration = Duration::from_secs(730 * 86_400);

/// When a certificate is issued and for how long. Its serial number carries
/// the issue time ([`ferry_common::certs`]); `notBefore` is set
/// [`certs::CLOCK_SKEW`] early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub issued: UnixMillis,
    pub lifetime: Duration,
}

impl Validity {
    /// Issued now (the system clock), valid for `lifetime`.
    pub fn starting_now(lifetime: Duration) -> Validity {
        Validity {
            issued: crate::clock::now_millis(),
            lifetime,
        }
    }

    /// Sets the bounds and the serial number of `params`.
    fn apply(&self, params: &mut CertificateParams) -> Result<(), PkiError> {
        let (not_before, not_after) = certs::validity(self.issued, self.lifetime);
        params.not_before = asn1_time(not_before)?.to_datetime();
        params.not_after = asn1_time(not_after)?.to_datetime();
        let mut random = [0u8; 8];
        SystemRandom::new()
            .fill(&mut random)
            .map_err(|_| PkiError::Random)?;
        params.serial_number = Some(SerialNumber::from_slice(&certs::serial_for(
            self.issued,
            random,
        )));
        Ok(())
    }
}

/// A certificate time, in whole seconds.
fn asn1_time(t: UnixMillis) -> Result<x509_parser::time::ASN1Time, PkiError> {
    x509_parser::time::ASN1Time::from_timestamp(t.0.div_euclid(1000))
        .map_err(|_| PkiError::Validity(t.0))
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("a CA already exists at {0}; refusing to overwrite it")]
    CaExists(PathBuf),
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("read {path}: {message}")]
    BadPem { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("peer certificate: {0}")]
    PeerCertificate(String),
    #[error("no randomness from the system")]
    Random,
    #[error("certificate time {0} ms is out of range")]
    Validity(i64),
    #[error("the certificate signing request is unusable: {0}")]
    Csr(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |error| PkiError::Io {
        what,
        path: path.to_path_buf(),
        error,
    }
}

/// Creates a new file durably (never over an existing file or symlink);
/// secrets get mode 0600 from the moment they exist.
fn create_file(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode(secret))
        .open(path)
        .map_err(io_err("create", path))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", path))
}

fn mode(secret: bool) -> u32 {
    if secret {
        ferry_process::files::PRIVATE
    } else {
        ferry_process::files::PUBLIC
    }
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io_err("read", path))
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Ferry CA");
    dn.push(DnType::OrganizationName, "Ferry");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Creates a CA (valid [`CA_LIFETIME`]) and a broker certificate (valid
/// [`BROKER_LIFETIME`]) in `dir`. `broker_names` are the broker
/// certificate's SANs (IP addresses become IP SANs); empty means
/// [`DEFAULT_BROKER_NAMES`]. Refuses to overwrite an existing CA.
pub fn init(dir: &Path, broker_names: &[String]) -> Result<(), PkiError> {
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key_path = dir.join(CA_KEY);
    if ca_cert_path.exists() || ca_key_path.exists() {
        return Err(PkiError::CaExists(dir.to_path_buf()));
    }
    std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;

    let ca_key = KeyPair::generate()?;
    let mut params = ca_params();
    Validity::starting_now(CA_LIFETIME).apply(&mut params)?;
    let ca = params.self_signed(&ca_key)?;
    let (broker, broker_key) = broker_certificate(&ca, &ca_key, broker_names)?;

    // The key first with create_new: two racing `pki init`s cannot both win.
    create_file(&ca_key_path, &ca_key.serialize_pem(), true)?;
    create_file(&ca_cert_path, &ca.pem(), false)?;
    replace_file(&dir.join(BROKER_KEY), &broker_key.serialize_pem(), true)?;
    replace_file(&dir.join(BROKER_CERT), &broker.pem(), false)?;
    Ok(())
}

/// A new broker key and certificate signed by `ca`, valid [`BROKER_LIFETIME`].
fn broker_certificate(
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
    broker_names: &[String],
) -> Result<(rcgen::Certificate, KeyPair), PkiError> {
    let names: Vec<String> = if broker_names.is_empty() {
        DEFAULT_BROKER_NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        broker_names.to_vec()
    };
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "ferry-broker");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    Validity::starting_now(BROKER_LIFETIME).apply(&mut params)?;
    let broker_key = KeyPair::generate()?;
    let broker = params.signed_by(&broker_key, ca, ca_key)?;
    Ok((broker, broker_key))
}

/// Re-issues the broker's key and certificate from the CA in `dir` (the
/// rotation of a broker certificate that nears its end): `broker_names`, or
/// when empty the names of the current broker certificate (the defaults if
/// there is none). Agents keep trusting it: same CA. The broker uses it
/// from its next start.
pub fn issue_broker(dir: &Path, broker_names: &[String]) -> Result<Vec<String>, PkiError> {
    let ca = load_ca(dir)?;
    let names = if broker_names.is_empty() {
        current_broker_names(&dir.join(BROKER_CERT))?
    } else {
        broker_names.to_vec()
    };
    let (broker, broker_key) = broker_certificate(&ca.cert, &ca.key, &names)?;
    // Each file replaced whole (temporary file, rename), the key first.
    replace_file(&dir.join(BROKER_KEY), &broker_key.serialize_pem(), true)?;
    replace_file(&dir.join(BROKER_CERT), &broker.pem(), false)?;
    Ok(if names.is_empty() {
        DEFAULT_BROKER_NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        names
    })
}

/// The DNS and IP names of the broker certificate at `path`; none when
/// there is no such file.
/// The names (DNS or IP SANs) of the broker certificate at `path`; empty
/// when there is none.
pub fn broker_names(path: &Path) -> Result<Vec<String>, PkiError> {
    current_broker_names(path)
}

fn current_broker_names(path: &Path) -> Result<Vec<String>, PkiError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    if !path.exists() {
        return Ok(Vec::new());
    }
    let der = load_certs(path)?.remove(0);
    let bad = |message: String| PkiError::BadPem {
        path: path.to_path_buf(),
        message,
    };
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| bad(e.to_string()))?;
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| bad(e.to_string()))?
    else {
        return Ok(Vec::new());
    };
    let mut names = Vec::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::DNSName(d) => names.push((*d).to_owned()),
            GeneralName::IPAddress(ip) => match ip.len() {
                4 => names.push(
                    std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap_or_default())
                        .to_string(),
                ),
                16 => names.push(
                    std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap_or_default())
                        .to_string(),
                ),
                _ => {}
            },
            _ => {}
        }
    }
    Ok(names)
}

/// Replaces `path` whole with exactly mode 0600 for secrets, 0644
/// otherwise: a temporary of its own beside it (created exclusively, never
/// through a symlink), fsync, rename, fsync of the directory.
fn replace_file(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    ferry_process::files::write_atomic(path, contents.as_bytes(), mode(secret)).map_err(|e| {
        PkiError::Io {
            what: e.op,
            path: e.path,
            error: e.source,
        }
    })
}

/// The CA of `dir`, ready to sign.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: String,
}

fn load_ca(dir: &Path) -> Result<Ca, PkiError> {
    let pem = read_text(&dir.join(CA_CERT))?;
    let key = KeyPair::from_pem(&read_text(&dir.join(CA_KEY))?)?;
    let cert = CertificateParams::from_ca_cert_pem(&pem)?.self_signed(&key)?;
    Ok(Ca { cert, key, pem })
}

/// SHA-256 fingerprint of the (first) certificate in the PEM file at
/// `path`: lowercase hex pairs joined by `:`, as `openssl x509 -fingerprint
/// -sha256` prints them (in capitals).
pub fn fingerprint(path: &Path) -> Result<String, PkiError> {
    let certs = load_certs(path)?;
    let der = certs.first().ok_or_else(|| PkiError::BadPem {
        path: path.to_path_buf(),
        message: "no certificate in file".into(),
    })?;
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    Ok(digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// Issues a client certificate for one resource, signed by the CA in `dir`:
/// CN and the only SAN (DNS) are the resource id, extended key usage
/// clientAuth, bounded by `validity`. Writes `agent.pem`, `agent-key.pem`
/// (0600) and `ca.pem` to `out`.
pub fn issue_agent(
    dir: &Path,
    resource: &ResourceId,
    out: &Path,
    validity: Validity,
) -> Result<(), PkiError> {
    let ca = load_ca(dir)?;
    let key = KeyPair::generate()?;
    let cert = sign_agent(&ca, resource, &key, validity)?;
    std::fs::create_dir_all(out).map_err(io_err("create directory", out))?;
    replace_file(&out.join(AGENT_KEY), &key.serialize_pem(), true)?;
    replace_file(&out.join(AGENT_CERT), &cert, false)?;
    replace_file(&out.join(CA_CERT), &ca.pem, false)?;
    Ok(())
}

/// An agent certificate (PEM) for `resource` with `public_key`.
fn sign_agent(
    ca: &Ca,
    resource: &ResourceId,
    public_key: &impl PublicKeyData,
    validity: Validity,
) -> Result<String, PkiError> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName(resource.as_str().try_into()?)];
    params
        .distinguished_name
        .push(DnType::CommonName, resource.as_str());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity.apply(&mut params)?;
    Ok(params.signed_by(public_key, &ca.cert, &ca.key)?.pem())
}

/// Which names a certificate signing request may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CsrNames {
    /// Any: the certificate names the resource whatever the request says
    /// (enrollment, where the token decides the resource).
    Ignored,
    /// None, or exactly the resource as its one DNS name (renewal over the
    /// link: a request for another name is refused).
    OnlyResource,
}

/// A client certificate (PEM) for `resource` with the public key of the
/// signing request `csr_der` (its signature checked), signed by the CA in
/// `pki_dir` as [`issue_agent`] makes them. A bad request is
/// [`PkiError::Csr`]; anything else is the broker's own problem.
pub fn issue_from_csr(
    pki_dir: &Path,
    resource: &ResourceId,
    csr_der: &[u8],
    names: CsrNames,
    validity: Validity,
) -> Result<String, PkiError> {
    let csr = rustls_pki_types::CertificateSigningRequestDer::from(csr_der);
    let csr = CertificateSigningRequestParams::from_der(&csr)
        .map_err(|e| PkiError::Csr(e.to_string()))?;
    if names == CsrNames::OnlyResource {
        let asked = &csr.params.subject_alt_names;
        let only_resource = match asked.as_slice() {
            [] => true,
            [SanType::DnsName(d)] => d.as_str() == resource.as_str(),
            _ => false,
        };
        if !only_resource {
            return Err(PkiError::Csr(format!(
                "it asks for names {asked:?}; this connection's certificate is for {resource}"
            )));
        }
    }
    let ca = load_ca(pki_dir)?;
    sign_agent(&ca, resource, &csr.public_key, validity)
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| PkiError::BadPem {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::BadPem {
            path: path.to_path_buf(),
            message: "no certificate in file".into(),
        });
    }
    Ok(certs)
}

pub(crate) fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| PkiError::BadPem {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| PkiError::Tls(format!("CA certificate {}: {e}", ca.display())))?;
    }
    Ok(Arc::new(roots))
}

/// The verifier of agent certificates: a certificate that is presented must
/// chain to the CA in `ca`. Presenting none is allowed at the TLS layer because
/// route and enrollment clients have none; the agent link refuses a
/// connection without one before it reads anything (`link::handle`).
pub fn client_verifier(
    ca: &Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, PkiError> {
    rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Tls(e.to_string()))
}

/// The broker's QUIC server configuration from the files in `pki_dir`:
/// TLS 1.3, client certificates checked against the CA (required by the agent
/// link, absent for route and enrollment clients), every ALPN of
/// [`ferry_common::BROKER_ALPNS`], the agent-link transport limits with
/// those before authentication (`transport::broker_transport`).
pub fn server_config(pki_dir: &Path) -> Result<quinn::ServerConfig, PkiError> {
    let verifier = client_verifier(&pki_dir.join(CA_CERT))?;
    let certs = load_certs(&pki_dir.join(BROKER_CERT))?;
    let key = load_key(&pki_dir.join(BROKER_KEY))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| PkiError::Tls(format!("broker certificate: {e}")))?;
    tls.alpn_protocols = ferry_common::BROKER_ALPNS
        .iter()
        .map(|p| p.to_vec())
        .collect();
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(ferry_common::transport::broker_transport()));
    Ok(config)
}

/// TLS for the broker's HTTP listeners (web console, metrics): the
/// broker's certificate from `pki_dir`, TLS 1.2 and 1.3, no client
/// certificate, HTTP/1.1.
pub fn https_server_config(pki_dir: &Path) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let certs = load_certs(&pki_dir.join(BROKER_CERT))?;
    let key = load_key(&pki_dir.join(BROKER_KEY))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| PkiError::Tls(format!("broker certificate: {e}")))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// Labels that separate the endpoint keys from every other use of the
/// broker's private key.
const RESET_KEY_LABEL: &[u8] = b"ferry quic stateless reset v1";
const CID_KEY_LABEL: &[u8] = b"ferry quic connection id v1";

/// The QUIC endpoint configuration of the agent link, with keys derived from
/// the broker's private key (HMAC-SHA256 of fixed labels) instead of quinn's
/// per-process random ones.
///
/// With random keys, a broker restarted after a crash does not recognise the
/// connection ids it handed out before and its stateless resets carry the
/// wrong token, so agents never learn their old connection is gone: each
/// waits out the whole idle timeout before it reconnects and replays. With
/// keys that survive a restart, an agent's next packet is answered with a
/// reset it accepts. The keys stay secret as long as the broker key does.
pub fn endpoint_config(pki_dir: &Path) -> Result<quinn::EndpointConfig, PkiError> {
    let path = pki_dir.join(BROKER_KEY);
    let secret = std::fs::read(&path).map_err(io_err("read", &path))?;
    let (reset_key, cid_key) = endpoint_keys(&secret);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(config)
}

/// The stateless-reset key and the connection-id key derived from `secret`.
fn endpoint_keys(secret: &[u8]) -> (ring::hmac::Key, u64) {
    let master = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let reset = ring::hmac::sign(&master, RESET_KEY_LABEL);
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref());
    let cid = ring::hmac::sign(&master, CID_KEY_LABEL);
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    (reset_key, u64::from_le_bytes(cid_key))
}

/// A QUIC client configuration for the agent link: trusts the CA in `ca`,
/// presents `cert`/`key` (or no certificate when `None`). The agent crate has
/// its own; this one serves tests and benchmarks that speak the protocol raw.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<quinn::ClientConfig, PkiError> {
    client_config_for(ca, identity, ferry_common::ALPN_AGENT)
}

/// [`client_config`] for another protocol of the broker's endpoint (one of
/// [`ferry_common::BROKER_ALPNS`]).
pub fn client_config_for(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, PkiError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_root_certificates(roots(ca)?);
    let mut tls = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| PkiError::Tls(format!("agent certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(ferry_common::transport::agent_link_transport()));
    Ok(config)
}

/// The resource named by an agent certificate: its single DNS SAN, which
/// must be a valid [`ResourceId`].
pub fn resource_from_cert(der: &[u8]) -> Result<ResourceId, PkiError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::PeerCertificate(format!("cannot parse: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::PeerCertificate(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| PkiError::PeerCertificate("no subjectAltName".into()))?;
    let dns: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        })
        .collect();
    match dns.as_slice() {
        [one] => ResourceId::new(*one).map_err(|e| PkiError::PeerCertificate(e.to_string())),
        _ => Err(PkiError::PeerCertificate(format!(
            "expected exactly one DNS name, found {}",
            dns.len()
        ))),
    }
}

/// What the broker reads of an agent certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    pub resource: ResourceId,
    /// When it was issued: the time its serial number carries, else its
    /// `notBefore` (certificates issued before serials carried the time).
    pub issued: UnixMillis,
    pub not_after: UnixMillis,
}

/// The resource, issue time and end of an agent certificate.
pub fn certificate_info(der: &[u8]) -> Result<CertificateInfo, PkiError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let resource = resource_from_cert(der)?;
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::PeerCertificate(format!("cannot parse: {e}")))?;
    let validity = cert.validity();
    let ms = |t: x509_parser::time::ASN1Time| UnixMillis(t.timestamp().saturating_mul(1000));
    let issued =
        certs::issued_at_from_serial(cert.raw_serial()).unwrap_or_else(|| ms(validity.not_before));
    Ok(CertificateInfo {
        resource,
        issued,
        not_after: ms(validity.not_after),
    })
}

/// [`certificate_info`] of the client certificate of a QUIC connection.
pub fn peer_certificate(conn: &quinn::Connection) -> Result<CertificateInfo, PkiError> {
    certificate_info(peer_leaf(conn)?.as_ref())
}

fn peer_leaf(conn: &quinn::Connection) -> Result<CertificateDer<'static>, PkiError> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| PkiError::PeerCertificate("no client certificate".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| PkiError::PeerCertificate("unexpected peer identity type".into()))?;
    chain
        .first()
        .cloned()
        .ok_or_else(|| PkiError::PeerCertificate("empty certificate chain".into()))
}

/// The resource named by the client certificate of a QUIC connection.
pub fn peer_resource(conn: &quinn::Connection) -> Result<ResourceId, PkiError> {
    resource_from_cert(peer_leaf(conn)?.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::UnixTime;

    fn rid(s: &str) -> ResourceId {
        s.parse().expect("id")
    }

    fn month() -> Validity {
        Validity::starting_now(DEFAULT_AGENT_LIFETIME)
    }

    #[test]
    fn endpoint_keys_survive_a_restart_and_differ_per_broker_key() {
        let tag = |k: &ring::hmac::Key| ring::hmac::sign(k, b"cid").as_ref().to_vec();
        let (reset_a, cid_a) = endpoint_keys(b"broker key A");
        let (reset_a2, cid_a2) = endpoint_keys(b"broker key A");
        let (reset_b, cid_b) = endpoint_keys(b"broker key B");
        assert_eq!(tag(&reset_a), tag(&reset_a2));
        assert_eq!(cid_a, cid_a2);
        assert_ne!(tag(&reset_a), tag(&reset_b));
        assert_ne!(cid_a, cid_b);
        // The reset key is not the master key itself.
        let master = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"broker key A");
        assert_ne!(tag(&reset_a), tag(&master));
    }

    #[test]
    fn init_then_issue_gives_a_chain_the_verifier_accepts() {
        let tmp = tempfile::tempdir().expect("tmp");
        let pki = tmp.path().join("pki");
        init(&pki, &[]).expect("init");
        let out = tmp.path().join("agent");
        issue_agent(&pki, &rid("host-1"), &out, month()).expect("issue");

        let mode = |p: PathBuf| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
        };
        assert_eq!(mode(pki.join(CA_KEY)), 0o600);
        assert_eq!(mode(pki.join(BROKER_KEY)), 0o600);
        assert_eq!(mode(out.join(AGENT_KEY)), 0o600);

        let verifier = client_verifier(&pki.join(CA_CERT)).expect("verifier");
        let leaf = load_certs(&out.join(AGENT_CERT)).expect("cert").remove(0);
        verifier
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .expect("agent cert chains to the CA");
        assert_eq!(
            resource_from_cert(leaf.as_ref()).expect("san"),
            rid("host-1")
        );

        // The broker files load into a server config.
        server_config(&pki).expect("server config");
        client_config(
            &out.join(CA_CERT),
            Some((&out.join(AGENT_CERT), &out.join(AGENT_KEY))),
        )
        .expect("client config");
    }

    #[test]
    fn issued_files_replace_planted_symlinks_and_old_modes() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let pki = tmp.path().join("pki");
        init(&pki, &[]).expect("init");
        let out = tmp.path().join("agent");
        std::fs::create_dir_all(&out).expect("out");
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"untouched").expect("victim");
        // Symlinks at the key's name and at the temporary names earlier
        // versions used; an old certificate readable by all.
        std::os::unix::fs::symlink(&victim, out.join(AGENT_KEY)).expect("plant");
        std::os::unix::fs::symlink(&victim, pki.join(format!(".{BROKER_KEY}.tmp"))).expect("plant");
        std::fs::write(out.join(CA_CERT), b"old").expect("old");
        std::fs::set_permissions(out.join(CA_CERT), std::fs::Permissions::from_mode(0o666))
            .expect("chmod");
        issue_agent(&pki, &rid("host-1"), &out, month()).expect("issue");
        issue_broker(&pki, &[]).expect("reissue");

        assert_eq!(std::fs::read(&victim).expect("victim"), b"untouched");
        let meta = |p: PathBuf| std::fs::symlink_metadata(p).expect("meta");
        assert!(meta(out.join(AGENT_KEY)).is_file());
        assert_eq!(
            meta(out.join(AGENT_KEY)).permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(meta(out.join(CA_CERT)).permissions().mode() & 0o777, 0o644);
        assert_eq!(
            meta(pki.join(BROKER_KEY)).permissions().mode() & 0o777,
            0o600
        );
        load_certs(&out.join(CA_CERT)).expect("the new CA certificate");
    }

    #[test]
    fn a_certificate_from_another_ca_is_rejected() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        init(&a, &[]).expect("init a");
        init(&b, &[]).expect("init b");
        issue_agent(&b, &rid("host-1"), &tmp.path().join("out"), month()).expect("issue");
        let leaf = load_certs(&tmp.path().join("out").join(AGENT_CERT))
            .expect("cert")
            .remove(0);
        let verifier = client_verifier(&a.join(CA_CERT)).expect("verifier");
        assert!(verifier
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn init_refuses_to_overwrite_a_ca() {
        let tmp = tempfile::tempdir().expect("tmp");
        init(tmp.path(), &[]).expect("init");
        let before = std::fs::read(tmp.path().join(CA_KEY)).expect("key");
        assert!(matches!(init(tmp.path(), &[]), Err(PkiError::CaExists(_))));
        assert_eq!(std::fs::read(tmp.path().join(CA_KEY)).expect("key"), before);
    }

    #[test]
    fn broker_names_become_sans() {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let tmp = tempfile::tempdir().expect("tmp");
        init(tmp.path(), &["broker.example".into(), "10.0.0.1".into()]).expect("init");
        let der = load_certs(&tmp.path().join(BROKER_CERT))
            .expect("cert")
            .remove(0);
        let (_, cert) = X509Certificate::from_der(der.as_ref()).expect("parse");
        let san = cert
            .subject_alternative_name()
            .expect("ext")
            .expect("present");
        let names = &san.value.general_names;
        assert!(names
            .iter()
            .any(|n| matches!(n, GeneralName::DNSName("broker.example"))));
        assert!(names
            .iter()
            .any(|n| matches!(n, GeneralName::IPAddress(ip) if *ip == [10, 0, 0, 1])));
    }

    #[test]
    fn a_certificate_without_one_dns_name_names_no_resource() {
        // The broker certificate has three SANs, two of them IPs: one DNS name
        // would pass, so use a cert with two DNS names.
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["a".to_string(), "b".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert!(matches!(
            resource_from_cert(cert.der()),
            Err(PkiError::PeerCertificate(_))
        ));
        let upper = CertificateParams::new(vec!["Host".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert!(resource_from_cert(upper.der()).is_err());
    }

    #[test]
    fn lifetimes_are_bounded_and_the_serial_carries_the_issue_time() {
        let tmp = tempfile::tempdir().expect("tmp");
        let pki = tmp.path().join("pki");
        init(&pki, &[]).expect("init");
        let now = crate::clock::now_millis();
        let life = |path: &Path| {
            let der = load_certs(path).expect("cert").remove(0);
            let (_, cert) = x509_parser::prelude::FromDer::from_der(der.as_ref()).expect("parse");
            let cert: x509_parser::certificate::X509Certificate<'_> = cert;
            let v = cert.validity();
            (
                v.not_before.timestamp() * 1000,
                v.not_after.timestamp() * 1000,
            )
        };
        let day = 86_400_000;
        let (ca_from, ca_to) = life(&pki.join(CA_CERT));
        assert!(ca_to - now.0 > 3_650 * day && ca_to - now.0 <= 3_653 * day);
        assert!(now.0 - ca_from >= 3_599_000, "an hour early for clock skew");
        let (_, broker_to) = life(&pki.join(BROKER_CERT));
        assert!(broker_to - now.0 > 729 * day && broker_to - now.0 <= 731 * day);

        let out = tmp.path().join("agent");
        let validity = Validity::starting_now(Duration::from_secs(7 * 86_400));
        issue_agent(&pki, &rid("host-1"), &out, validity).expect("issue");
        let der = load_certs(&out.join(AGENT_CERT)).expect("cert").remove(0);
        let info = certificate_info(der.as_ref()).expect("info");
        assert_eq!(info.resource, rid("host-1"));
        assert_eq!(info.issued, validity.issued, "to the millisecond");
        assert_eq!(
            info.not_after.0,
            (validity.issued.0 + 7 * day).div_euclid(1000) * 1000
        );
    }

    #[test]
    fn an_expired_agent_certificate_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let pki = tmp.path().join("pki");
        init(&pki, &[]).expect("init");
        let out = tmp.path().join("agent");
        // Issued two hours ago for one hour.
        let validity = Validity {
            issued: UnixMillis(crate::clock::now_millis().0 - 7_200_000),
            lifetime: Duration::from_secs(3600),
        };
        issue_agent(&pki, &rid("host-1"), &out, validity).expect("issue");
        let leaf = load_certs(&out.join(AGENT_CERT)).expect("cert").remove(0);
        let verifier = client_verifier(&pki.join(CA_CERT)).expect("verifier");
        let err = verifier
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .expect_err("expired");
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Expired)
                    | rustls::Error::InvalidCertificate(
                        rustls::CertificateError::ExpiredContext { .. }
                    )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_renewal_request_for_another_name_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        init(tmp.path(), &[]).expect("init");
        let key = KeyPair::generate().expect("key");
        let csr = |names: Vec<String>| {
            CertificateParams::new(names)
                .expect("params")
                .serialize_request(&key)
                .expect("csr")
                .der()
                .to_vec()
        };
        let validity = Validity::starting_now(Duration::from_secs(60));
        let other = csr(vec!["host-2".into()]);
        let refused = issue_from_csr(
            tmp.path(),
            &rid("host-1"),
            &other,
            CsrNames::OnlyResource,
            validity,
        );
        assert!(matches!(refused, Err(PkiError::Csr(_))), "{refused:?}");
        // Enrollment ignores the names: the token decides.
        issue_from_csr(
            tmp.path(),
            &rid("host-1"),
            &other,
            CsrNames::Ignored,
            validity,
        )
        .expect("enrollment");
        for names in [vec![], vec!["host-1".to_string()]] {
            let pem = issue_from_csr(
                tmp.path(),
                &rid("host-1"),
                &csr(names),
                CsrNames::OnlyResource,
                validity,
            )
            .expect("renewal");
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
            assert_eq!(
                certificate_info(der.as_ref()).expect("info").issued,
                validity.issued
            );
        }
        assert!(matches!(
            issue_from_csr(
                tmp.path(),
                &rid("host-1"),
                b"junk",
                CsrNames::Ignored,
                validity
            ),
            Err(PkiError::Csr(_))
        ));
    }

    #[test]
    fn the_broker_certificate_is_reissued_with_its_names() {
        let tmp = tempfile::tempdir().expect("tmp");
        init(tmp.path(), &["broker.example".into(), "10.0.0.1".into()]).expect("init");
        let before = std::fs::read(tmp.path().join(BROKER_KEY)).expect("key");
        let names = issue_broker(tmp.path(), &[]).expect("reissue");
        assert_eq!(names, vec!["broker.example".to_string(), "10.0.0.1".into()]);
        assert_ne!(
            std::fs::read(tmp.path().join(BROKER_KEY)).expect("key"),
            before
        );
        server_config(tmp.path()).expect("the new files load");
        let renamed = issue_broker(tmp.path(), &["b2.example".into()]).expect("rename");
        assert_eq!(renamed, vec!["b2.example".to_string()]);
    }
}
