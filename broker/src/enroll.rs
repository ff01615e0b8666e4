//! Enrollment: a new host presents its one-time token and a CSR over ALPN
//! [`ferry_common::ALPN_ENROLL`] and gets its agent certificate.
//!
//! Tokens are made per created elastic resource ([`new_token`]), 256 random
//! bits as hex, handed to the provisioner, and stored only as their SHA-256
//! (`enroll_tokens`, migration 6) with the resource, the group and an
//! expiry. A token is checked (unknown, used or expired tokens are refused
//! with a readable reason), the certificate is issued by the broker's CA for
//! the token's resource with the CSR's public key (whatever names the CSR
//! asks for), and the token is marked used in the same transaction that
//! records the `enrolled` group event. The agent then connects with its
//! certificate and registers; that registration makes the resource ready
//! (see [`crate::groups::actor::elastic`]).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_common::enroll::{
    is_token_text, EnrollMessage, EnrollRefusal, EnrollReply, EnrollReplyMessage, EnrollRequest,
    MAX_ENROLL_FRAME_LEN,
};
use ferry_common::frame;
use ferry_common::{ResourceId, UnixMillis};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::Semaphore;
use tokio::time::{timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::endpoint::{
    answer_preamble, close_code, EndpointLimits, EndpointService, PreambleError, REFUSAL_LINGER,
    WRITE_TIMEOUT,
};
use crate::pki;
use crate::store::elastic::EnrollTokenRecord;
use crate::store::{Store, StoreError};

pub use crate::endpoint::MAX_ENROLLMENTS;

/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("no randomness from the system")]
    Random,
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// A new token as text (64 lowercase hex characters).
pub fn new_token() -> Result<String, EnrollError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| EnrollError::Random)?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What is stored for `token`: its SHA-256, hex.
pub fn token_hash(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// Serves ALPN `ferry-enroll/1`. Cheap to clone.
#[derive(Clone)]
pub struct EnrollService {
    store: Store,
    pki_dir: PathBuf,
    clock: Clock,
    /// Lifetime of the certificates issued.
    cert_lifetime: Duration,
    permits: Arc<Semaphore>,
    /// `EndpointLimits::enroll_request_timeout`.
    request_timeout: Duration,
}

impl EnrollService {
    pub fn new(
        store: Store,
        pki_dir: &Path,
        clock: Clock,
        cert_lifetime: Duration,
    ) -> EnrollService {
        EnrollService {
            store,
            pki_dir: pki_dir.to_path_buf(),
            clock,
            cert_lifetime,
            permits: Arc::new(Semaphore::new(MAX_ENROLLMENTS)),
            request_timeout: crate::endpoint::ENROLL_REQUEST_TIMEOUT,
        }
    }

    /// This service with the enrollment limits of `limits`.
    pub fn with_limits(mut self, limits: &EndpointLimits) -> EnrollService {
        self.permits = Arc::new(Semaphore::new(limits.max_enrollments));
        self.request_timeout = limits.enroll_request_timeout;
        self
    }

    /// Checks the token, issues the certificate and marks the token used.
    pub async fn enroll(&self, req: EnrollRequest) -> EnrollReply {
        let refuse = |code, message: String| EnrollReply::Refused { code, message };
        if !is_token_text(&req.token) {
            return refuse(
                EnrollRefusal::BadRequest,
                "the enrollment token is not 64 lowercase hex characters".into(),
            );
        }
        let hash = token_hash(&req.token);
        let now = self.clock.now();
        let found = self.store.enroll_token(hash.clone()).await;
        let EnrollTokenRecord {
            group_num,
            resource,
            expires_at,
            ..
        } = match found {
            Err(e) => {
                tracing::error!("enrollment: read token: {e}");
                return refuse(
                    EnrollRefusal::Unavailable,
                    "the broker cannot read its store now; try again".into(),
                );
            }
            Ok(None) => {
                return refuse(
                    EnrollRefusal::UnknownToken,
                    "this enrollment token is unknown to the broker".into(),
                )
            }
            Ok(Some(EnrollTokenRecord {
                resource,
                used_at: Some(_),
                ..
            })) => {
                return refuse(
                    EnrollRefusal::UsedToken,
                    format!("this enrollment token was already used (by {resource}); a token enrolls one host once"),
                )
            }
            Ok(Some(EnrollTokenRecord {
                resource,
                expires_at,
                ..
            })) if expires_at <= now => {
                return refuse(
                    EnrollRefusal::ExpiredToken,
                    format!("the enrollment token of {resource} expired"),
                )
            }
            Ok(Some(t)) => t,
        };
        let Ok(resource) = ResourceId::new(resource.as_str()) else {
            return refuse(
                EnrollRefusal::Unavailable,
                "the token's resource id is invalid".into(),
            );
        };
        let validity = pki::Validity::starting_now(self.cert_lifetime);
        let issued = pki::issue_from_csr(
            &self.pki_dir,
            &resource,
            &req.csr_der,
            pki::CsrNames::Ignored,
            validity,
        );
        let cert_pem = match issued {
            Ok(pem) => pem,
            Err(e @ pki::PkiError::Csr(_)) => {
                return refuse(EnrollRefusal::BadRequest, e.to_string())
            }
            Err(why) => {
                tracing::error!(%resource, "enrollment: issue certificate: {why}");
                return refuse(
                    EnrollRefusal::Unavailable,
                    "the broker could not issue a certificate now; try again".into(),
                );
            }
        };
        let message =
            format!("enrolled: {resource} received its certificate with its one-time token");
        let used = self
            .store
            .use_enroll_token(hash, group_num, now, validity.issued, message)
            .await;
        match used {
            Ok(true) => {
                tracing::info!(%resource, expires_at = expires_at.0, "host enrolled");
                EnrollReply::Issued { resource, cert_pem }
            }
            Ok(false) => refuse(
                EnrollRefusal::UsedToken,
                "this enrollment token was used meanwhile".into(),
            ),
            Err(e) => {
                tracing::error!(%resource, "enrollment: mark token used: {e}");
                refuse(
                    EnrollRefusal::Unavailable,
                    "the broker cannot write its store now; try again".into(),
                )
            }
        }
    }

    async fn serve_conn(&self, conn: quinn::Connection, token: CancellationToken) {
        let remote = conn.remote_address();
        let Ok(_permit) = self.permits.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "refusing enrollment: every enrollment place is taken");
            conn.close(close_code::BUSY.into(), b"too many enrollments");
            return;
        };
        // The stream, the preamble and the request all arrive by then.
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let idle = || {
            tracing::info!(%remote, "closing enrollment connection: no request in time");
            conn.close(close_code::IDLE.into(), b"no request in time");
        };
        let (mut send, mut recv) = tokio::select! {
            _ = token.cancelled() => return,
            r = timeout_at(deadline, conn.accept_bi()) => match r {
                Ok(Ok(s)) => s,
                Ok(Err(_)) => return,
                Err(_) => return idle(),
            },
        };
        match answer_preamble(
            &mut send,
            &mut recv,
            deadline.saturating_duration_since(tokio::time::Instant::now()),
            "host",
            "upgrade ferry-agent",
        )
        .await
        {
            Ok(()) => {}
            Err(PreambleError::Unsupported(_)) => {
                conn.close(
                    close_code::UNSUPPORTED_VERSION.into(),
                    b"unsupported version",
                );
                return;
            }
            Err(PreambleError::NotFerry) => {
                conn.close(close_code::BAD_PREAMBLE.into(), b"not a Ferry peer");
                return;
            }
            Err(PreambleError::Timeout(_)) => return idle(),
            Err(PreambleError::Read(_)) => {
                conn.close(close_code::BAD_PREAMBLE.into(), b"truncated preamble");
                return;
            }
            Err(PreambleError::Write(_)) => return,
        }
        let request = tokio::select! {
            _ = token.cancelled() => return,
            r = timeout_at(
                deadline,
                frame::read_message_within::<EnrollMessage, _, MAX_ENROLL_FRAME_LEN>(&mut recv),
            ) => r,
        };
        let reply = match request {
            Ok(Ok(Some(EnrollMessage::V1(req)))) => self.enroll(req).await,
            Err(_) => return idle(),
            Ok(Ok(None)) => {
                conn.close(close_code::DONE.into(), b"no request");
                return;
            }
            Ok(Err(e)) => EnrollReply::Refused {
                code: EnrollRefusal::BadRequest,
                message: format!("malformed enrollment request: {e}"),
            },
        };
        if let EnrollReply::Refused { code, message } = &reply {
            tracing::warn!(%remote, ?code, "enrollment refused: {message}");
        }
        let msg = EnrollReplyMessage::V1(reply);
        let _ = timeout(
            WRITE_TIMEOUT,
            frame::write_message(&mut send, &msg, MAX_ENROLL_FRAME_LEN),
        )
        .await;
        let _ = send.finish();
        let _ = timeout(REFUSAL_LINGER, send.stopped()).await;
        conn.close(close_code::DONE.into(), b"bye");
    }
}

impl EndpointService for EnrollService {
    fn serve(
        &self,
        conn: quinn::Connection,
        token: CancellationToken,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        let this = self.clone();
        Box::pin(async move { this.serve_conn(conn, token).await })
    }
}

/// How long a token made now lives: the provisioner's register deadline.
pub fn expiry(now: UnixMillis, lifetime: Duration) -> UnixMillis {
    UnixMillis(
        now.0
            .saturating_add(i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use rcgen::{CertificateParams, KeyPair};
    use rustls::pki_types::pem::PemObject;

    const T0: UnixMillis = UnixMillis(1_772_409_600_000);

    fn csr() -> Vec<u8> {
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec!["someone-else".into()]).expect("params");
        params.serialize_request(&key).expect("csr").der().to_vec()
    }

    #[tokio::test]
    async fn a_token_enrolls_its_resource_once_and_unknown_or_expired_ones_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let pki_dir = dir.path().join("pki");
        pki::init(&pki_dir, &[]).expect("pki");
        let store = crate::store::testing::open_for_test(dir.path());
        let clock = crate::clock::ManualClock::new(T0);
        let svc = EnrollService::new(
            store.clone(),
            &pki_dir,
            clock.clock(),
            pki::DEFAULT_AGENT_LIFETIME,
        );
        let token = new_token().expect("token");
        assert!(is_token_text(&token));
        let old = new_token().expect("token");
        let resource: ResourceId = "g-e1".parse().expect("id");
        store.insert_group_for_test(1, "g").await;
        for (t, expires) in [(&token, 60_000), (&old, 1_000)] {
            let image = store
                .record_enroll_token(1, &resource, token_hash(t), T0, UnixMillis(T0.0 + expires))
                .await
                .expect("insert");
            assert_eq!(image, "img");
        }
        // Only the hash is stored.
        assert!(store
            .enroll_token(token.clone())
            .await
            .expect("read")
            .is_none());
        assert!(store
            .enroll_token(token_hash(&token))
            .await
            .expect("read")
            .is_some());

        clock.advance(Duration::from_secs(2));
        let reply = svc
            .enroll(EnrollRequest {
                token: token.clone(),
                csr_der: csr(),
            })
            .await;
        let EnrollReply::Issued {
            resource: got,
            cert_pem,
        } = reply
        else {
            panic!("expected a certificate, got {reply:?}");
        };
        assert_eq!(got, resource);
        let der =
            rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("pem");
        assert_eq!(
            pki::resource_from_cert(der.as_ref()).expect("name"),
            resource
        );
        // Every earlier certificate of the name is refused from now on; this one is not.
        let info = pki::certificate_info(der.as_ref()).expect("info");
        assert_eq!(
            store.revoked_before(&resource).await.expect("floor"),
            Some(info.issued)
        );
        let lifetime = info.not_after.0 - info.issued.0;
        assert!(
            (lifetime - 30 * 86_400_000).abs() < 1000,
            "the configured lifetime (whole seconds): {lifetime}"
        );

        let again = svc
            .enroll(EnrollRequest {
                token,
                csr_der: csr(),
            })
            .await;
        assert!(
            matches!(
                again,
                EnrollReply::Refused {
                    code: EnrollRefusal::UsedToken,
                    ..
                }
            ),
            "{again:?}"
        );
        let expired = svc
            .enroll(EnrollRequest {
                token: old,
                csr_der: csr(),
            })
            .await;
        assert!(
            matches!(
                expired,
                EnrollReply::Refused {
                    code: EnrollRefusal::ExpiredToken,
                    ..
                }
            ),
            "{expired:?}"
        );
        let unknown = svc
            .enroll(EnrollRequest {
                token: "ab".repeat(32),
                csr_der: csr(),
            })
            .await;
        assert!(
            matches!(
                unknown,
                EnrollReply::Refused {
                    code: EnrollRefusal::UnknownToken,
                    ..
                }
            ),
            "{unknown:?}"
        );
        let bad = svc
            .enroll(EnrollRequest {
                token: "x".into(),
                csr_der: csr(),
            })
            .await;
        assert!(
            matches!(
                bad,
                EnrollReply::Refused {
                    code: EnrollRefusal::BadRequest,
                    ..
                }
            ),
            "{bad:?}"
        );
        store.close().await;
    }
}
