//! Renewal of the agent's certificate over the link, with no operator step.
//!
//! When the certificate has a third of its lifetime left (measured from its
//! issue time, which its serial number carries: [`ferry_common::certs`]),
//! the agent makes a new key and sends a signing request for it on the
//! authenticated link (`AgentToBroker::Renew`). The broker answers with a
//! certificate of the same resource (`BrokerToAgent::Renewal`). The agent
//! checks it (it chains to the CA, names this resource, is for the new key),
//! writes key and certificate to their configured paths (each replaced
//! whole, both staged before either is renamed), and reconnects with them.
//! A failure is logged and tried again later with a growing wait; it is
//! never fatal while the old certificate is valid. The check runs at every
//! connection and at least every [`RECHECK`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_common::{certs, ResourceId, UnixMillis};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::time::Instant;

use crate::config::AgentConfig;

/// Longest wait between two looks at the certificate's due time (the wall
/// clock can jump, and the files can be replaced by the operator).
pub const RECHECK: Duration = Duration::from_secs(3600);

/// How long the broker has to answer a renewal request.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// First wait after a failed renewal; it doubles up to [`RETRY_CAP`].
const RETRY_START: Duration = Duration::from_secs(1);

/// Longest wait after failed renewals.
const RETRY_CAP: Duration = Duration::from_secs(600);

/// What the certificate file says of its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertLife {
    pub issued: UnixMillis,
    pub not_after: UnixMillis,
}

impl CertLife {
    /// When a third of its lifetime is left.
    pub fn due(&self) -> UnixMillis {
        certs::renewal_due(self.issued, self.not_after)
    }
}

/// The issue time (from the serial number, else `notBefore`) and the end of
/// the certificate in `der`.
pub fn cert_life(der: &[u8]) -> Result<CertLife, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let ms = |t: x509_parser::time::ASN1Time| UnixMillis(t.timestamp().saturating_mul(1000));
    let validity = cert.validity();
    Ok(CertLife {
        issued: certs::issued_at_from_serial(cert.raw_serial())
            .unwrap_or_else(|| ms(validity.not_before)),
        not_after: ms(validity.not_after),
    })
}

/// [`cert_life`] of the first certificate in the PEM file at `path`.
pub fn cert_life_of_file(path: &Path) -> Result<CertLife, String> {
    let der = CertificateDer::from_pem_file(path).map_err(|e| e.to_string())?;
    cert_life(der.as_ref())
}

/// The renewal's state, kept across connections.
#[derive(Default)]
pub struct RenewState {
    /// The key of the request in flight.
    pending: Option<rcgen::KeyPair>,
    /// Failed attempts in a row.
    failures: u32,
    /// No new attempt before this (after a failure).
    retry_at: Option<Instant>,
    /// The TLS configuration of the renewed certificate, for the next
    /// connections (`None`: the one built at start).
    pub tls: Option<(quinn::ClientConfig, crate::tls::BrokerNameCheck)>,
}

impl RenewState {
    /// When to look next: the certificate's due time (never later than
    /// [`RECHECK`] from now, never before a retry wait ends), or the answer
    /// deadline of the request in flight.
    pub fn next_wake(&self, life: Option<CertLife>, now: UnixMillis) -> Instant {
        let recheck = Instant::now() + RECHECK;
        if self.pending.is_some() {
            return Instant::now() + ANSWER_TIMEOUT;
        }
        let due = match life {
            Some(life) => {
                let wait = life.due().0.saturating_sub(now.0).max(0);
                (Instant::now() + Duration::from_millis(u64::try_from(wait).unwrap_or(0)))
                    .min(recheck)
            }
            None => recheck,
        };
        match self.retry_at {
            Some(r) => due.max(r),
            None => due,
        }
    }

    /// Whether a request should go now for a certificate of `life`.
    pub fn should_request(&self, life: Option<CertLife>, now: UnixMillis) -> bool {
        self.pending.is_none()
            && self.retry_at.is_none_or(|r| r <= Instant::now())
            && life.is_some_and(|l| l.due() <= now)
    }

    /// A new key and its request for `resource`, kept as the one in flight.
    pub fn request(&mut self, resource: &ResourceId) -> Result<Vec<u8>, String> {
        let (key, csr) = crate::enroll::key_and_csr(&[resource.to_string()])?;
        self.pending = Some(key);
        Ok(csr)
    }

    /// The key of the request in flight, taken.
    pub fn take_pending(&mut self) -> Option<rcgen::KeyPair> {
        self.pending.take()
    }

    /// The request in flight got no answer (or the connection ended).
    pub fn abandon(&mut self) {
        if self.pending.take().is_some() {
            self.failed();
        }
    }

    /// An attempt failed: the next waits longer.
    pub fn failed(&mut self) {
        self.pending = None;
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(Instant::now() + retry_wait(self.failures));
    }

    /// Whether a request is in flight.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// A certificate was installed; `tls` presents it.
    pub fn succeeded(&mut self, tls: (quinn::ClientConfig, crate::tls::BrokerNameCheck)) {
        *self = RenewState {
            tls: Some(tls),
            ..RenewState::default()
        };
    }
}

/// The wait after `failures` failed attempts in a row: 1 s doubling up to
/// [`RETRY_CAP`].
pub fn retry_wait(failures: u32) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1).min(31))
        .unwrap_or(u32::MAX);
    RETRY_START.saturating_mul(factor).min(RETRY_CAP)
}

/// Checks the broker's new certificate for `key` and writes both to the
/// configured paths (key 0600; both staged before either is renamed).
pub fn install(config: &AgentConfig, key: &rcgen::KeyPair, cert_pem: &str) -> Result<(), String> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| format!("the new certificate is not PEM: {e}"))?;
    crate::tls::check_names(&config.cert, der.as_ref(), &config.resource)
        .map_err(|e| e.to_string())?;
    check_key(der.as_ref(), key)?;
    check_chain(&config.ca_cert, &der)?;
    crate::enroll::write_all_atomic(&[
        (&config.key, key.serialize_pem().as_bytes()),
        (&config.cert, cert_pem.as_bytes()),
    ])
    .map_err(|e| e.to_string())
}

/// The certificate certifies `key`.
fn check_key(der: &[u8], key: &rcgen::KeyPair) -> Result<(), String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err("the new certificate is not for the key of the request".into());
    }
    Ok(())
}

/// The certificate chains to the CA the agent trusts and is valid now.
fn check_chain(ca: &Path, der: &CertificateDer<'_>) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| e.to_string())?
        .verify_client_cert(der, &[], UnixTime::now())
        .map_err(|e| format!("the new certificate does not verify against the CA: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_wait_longer_up_to_a_cap() {
        assert_eq!(retry_wait(1), Duration::from_secs(1));
        assert_eq!(retry_wait(2), Duration::from_secs(2));
        assert_eq!(retry_wait(5), Duration::from_secs(16));
        assert_eq!(retry_wait(40), RETRY_CAP);
    }

    #[tokio::test]
    async fn a_request_goes_when_due_and_not_during_a_retry_wait() {
        let now = UnixMillis(1_780_000_000_000);
        let fresh = CertLife {
            issued: now,
            not_after: UnixMillis(now.0 + 30_000),
        };
        let old = CertLife {
            issued: UnixMillis(now.0 - 25_000),
            not_after: UnixMillis(now.0 + 5_000),
        };
        let mut state = RenewState::default();
        assert!(!state.should_request(Some(fresh), now));
        assert!(!state.should_request(None, now));
        assert!(state.should_request(Some(old), now));
        // Due in 20 s.
        let wake = state.next_wake(Some(fresh), now);
        assert!(wake > Instant::now() + Duration::from_secs(19));
        assert!(wake <= Instant::now() + Duration::from_secs(20));

        let resource: ResourceId = "h1".parse().expect("id");
        state.request(&resource).expect("csr");
        assert!(
            !state.should_request(Some(old), now),
            "one request at a time"
        );
        state.abandon();
        assert!(
            !state.should_request(Some(old), now),
            "waits after a failure"
        );
        assert!(state.next_wake(Some(old), now) >= Instant::now() + Duration::from_millis(900));
        state.failures = 0;
        state.retry_at = None;
        assert!(state.should_request(Some(old), now));
    }
}
