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

use ferry_common::ResourceId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
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
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |error| PkiError::Io {
        what,
        path: path.to_path_buf(),
        error,
    }
}

/// Writes a file durably; secrets get mode 0600 from the moment they exist.
fn write_file(path: &Path, contents: &str, secret: bool, create_new: bool) -> Result<(), PkiError> {
    let mut opts = OpenOptions::new();
    opts.write(true).mode(if secret { 0o600 } else { 0o644 });
    if create_new {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    let mut f = opts.open(path).map_err(io_err("create", path))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", path))
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

/// Creates a CA and a broker certificate in `dir`. `broker_names` are the
/// broker certificate's SANs (IP addresses become IP SANs); empty means
/// [`DEFAULT_BROKER_NAMES`]. Refuses to overwrite an existing CA.
pub fn init(dir: &Path, broker_names: &[String]) -> Result<(), PkiError> {
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key_path = dir.join(CA_KEY);
    if ca_cert_path.exists() || ca_key_path.exists() {
        return Err(PkiError::CaExists(dir.to_path_buf()));
    }
    std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;

    let ca_key = KeyPair::generate()?;
    let ca = ca_params().self_signed(&ca_key)?;

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
    let broker_key = KeyPair::generate()?;
    let broker = params.signed_by(&broker_key, &ca, &ca_key)?;

    // The key first with create_new: two racing `pki init`s cannot both win.
    write_file(&ca_key_path, &ca_key.serialize_pem(), true, true)?;
    write_file(&ca_cert_path, &ca.pem(), false, true)?;
    write_file(
        &dir.join(BROKER_KEY),
        &broker_key.serialize_pem(),
        true,
        false,
    )?;
    write_file(&dir.join(BROKER_CERT), &broker.pem(), false, false)?;
    Ok(())
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
/// clientAuth. Writes `agent.pem`, `agent-key.pem` (0600) and `ca.pem` to `out`.
pub fn issue_agent(dir: &Path, resource: &ResourceId, out: &Path) -> Result<(), PkiError> {
    let ca_pem = read_text(&dir.join(CA_CERT))?;
    let ca_key_pem = read_text(&dir.join(CA_KEY))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;

    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName(resource.as_str().try_into()?)];
    params
        .distinguished_name
        .push(DnType::CommonName, resource.as_str());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;

    std::fs::create_dir_all(out).map_err(io_err("create directory", out))?;
    write_file(&out.join(AGENT_KEY), &key.serialize_pem(), true, false)?;
    write_file(&out.join(AGENT_CERT), &cert.pem(), false, false)?;
    write_file(&out.join(CA_CERT), &ca_pem, false, false)?;
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
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

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
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

/// The resource named by the client certificate of a QUIC connection.
pub fn peer_resource(conn: &quinn::Connection) -> Result<ResourceId, PkiError> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| PkiError::PeerCertificate("no client certificate".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| PkiError::PeerCertificate("unexpected peer identity type".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| PkiError::PeerCertificate("empty certificate chain".into()))?;
    resource_from_cert(leaf.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::UnixTime;

    fn rid(s: &str) -> ResourceId {
        s.parse().expect("id")
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
        issue_agent(&pki, &rid("host-1"), &out).expect("issue");

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
    fn a_certificate_from_another_ca_is_rejected() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        init(&a, &[]).expect("init a");
        init(&b, &[]).expect("init b");
        issue_agent(&b, &rid("host-1"), &tmp.path().join("out")).expect("issue");
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
}
