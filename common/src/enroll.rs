//! Enrollment (ALPN [`crate::ALPN_ENROLL`]): a new host without a certificate
//! presents the one-time token its provisioner gave it, with a certificate
//! signing request, and receives its agent certificate.
//!
//! The connection is TLS with the broker's certificate checked by the host
//! (the CA file comes with the token) and no client certificate. It starts
//! with the usual preamble ([`crate::frame::preamble`], answered by a
//! [`crate::frame::PreambleReply`]), then one [`EnrollMessage`] frame from the
//! host and one [`EnrollReplyMessage`] frame from the broker, each at most
//! [`MAX_ENROLL_FRAME_LEN`] bytes.
//!
//! A CSR rather than a key from the broker: the host's private key is made on
//! the host and never crosses the network, so a recorded enrollment (or a
//! broker log) cannot be used to impersonate the host. The broker takes only
//! the public key from the CSR; the name in the certificate is the resource
//! the token was made for, whatever the CSR asks.
//!
//! Bincode has no field tags: variants are only ever appended.

use serde::{Deserialize, Serialize};

use crate::ResourceId;

/// Largest enrollment frame, either way: a token, a CSR or a certificate.
pub const MAX_ENROLL_FRAME_LEN: usize = 16 * 1024;

/// Length of a token as text: 32 random bytes in lowercase hex.
pub const ENROLL_TOKEN_LEN: usize = 64;

/// Host to broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollMessage {
    V1(EnrollRequest),
}

/// The token and the host's certificate signing request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The one-time token, [`ENROLL_TOKEN_LEN`] hex characters.
    pub token: String,
    /// A PKCS#10 certificate signing request (DER) for the host's new key.
    pub csr_der: Vec<u8>,
}

/// Broker to host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollReplyMessage {
    V1(EnrollReply),
}

/// The outcome of an enrollment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollReply {
    /// The host's certificate (PEM), issued for `resource` by the broker's CA.
    Issued {
        resource: ResourceId,
        cert_pem: String,
    },
    /// No certificate; `message` says why in words an operator can act on.
    Refused {
        code: EnrollRefusal,
        message: String,
    },
}

/// Why an enrollment was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollRefusal {
    /// No such token (mistyped, or never made by this broker).
    UnknownToken,
    /// The token was already used: a token enrolls one host once.
    UsedToken,
    /// The token is past its expiry.
    ExpiredToken,
    /// The request is malformed (bad token text, unreadable CSR).
    BadRequest,
    /// The broker could not issue now (store or CA failure); try again.
    Unavailable,
}

/// Whether `token` has the shape of a token (so a malformed one is refused
/// before any lookup).
pub fn is_token_text(token: &str) -> bool {
    token.len() == ENROLL_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    //! Golden bytes: these freeze the encoding; add variants, never change them.
    use super::*;
    use crate::frame;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn golden_request() {
        let msg = EnrollMessage::V1(EnrollRequest {
            token: "ab".into(),
            csr_der: vec![1, 2],
        });
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), "00026162020102");
        assert_eq!(
            frame::decode_payload::<EnrollMessage>(&bytes).expect("decode"),
            msg
        );
    }

    #[test]
    fn golden_issued() {
        let msg = EnrollReplyMessage::V1(EnrollReply::Issued {
            resource: "g-e1".parse().expect("id"),
            cert_pem: "P".into(),
        });
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), "000004672d65310150");
        assert_eq!(
            frame::decode_payload::<EnrollReplyMessage>(&bytes).expect("decode"),
            msg
        );
    }

    #[test]
    fn golden_refused() {
        let msg = EnrollReplyMessage::V1(EnrollReply::Refused {
            code: EnrollRefusal::UsedToken,
            message: "x".into(),
        });
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), "0001010178");
        assert_eq!(
            frame::decode_payload::<EnrollReplyMessage>(&bytes).expect("decode"),
            msg
        );
    }

    #[test]
    fn token_text_is_64_lowercase_hex() {
        assert!(is_token_text(&"0a".repeat(32)));
        assert!(!is_token_text(&"0A".repeat(32)));
        assert!(!is_token_text(&"0a".repeat(31)));
        assert!(!is_token_text(&"zz".repeat(32)));
    }
}
