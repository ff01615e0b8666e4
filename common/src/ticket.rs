//! Session tickets and end users' credentials.
//!
//! A ticket is the broker's signed statement "user U may start session S on
//! resource R of group G until T". The broker signs it with its ticket key
//! (Ed25519) when it admits a route request; the agent on R verifies it
//! locally with the broker's public key (no round trip) when the streaming
//! server asks, and refuses it a second time (the agent keeps the used ids).
//!
//! Text form (what users and streaming servers pass around):
//! `v1.` + base64url(bincode([`TicketClaims`])) + `.` + base64url(signature),
//! base64url without padding. The signature covers [`SIGNING_CONTEXT`]
//! followed by the claim bytes exactly as they appear in the text, so the
//! verifier never re-encodes anything. The whole text is at most
//! [`MAX_TICKET_LEN`] bytes and the claims are decoded with a byte limit.
//!
//! [`Credential`] is what a user presents on the route protocol: a password
//! or a token issued by `ferryctl user token`.
//!
//! This module does no I/O.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::frame;
use crate::ids::{GroupName, ResourceId, SessionId, UserId};
use crate::limits::{
    MAX_PASSWORD_LEN, MAX_TICKET_CLAIMS_LEN, MAX_TICKET_LEN, MAX_TICKET_LIFETIME_MS, MAX_TOKEN_LEN,
};
use crate::wire::UnixMillis;

/// Prefix of the text form of version 1 tickets.
pub const TICKET_PREFIX: &str = "v1.";

/// Domain separation: a ticket signature can never be mistaken for a
/// signature the same key made over something else.
pub const SIGNING_CONTEXT: &[u8] = b"ferry-ticket-v1\0";

/// Length of an Ed25519 signature.
const SIGNATURE_LEN: usize = 64;

/// What a ticket says. bincode has no field tags: this layout is frozen by
/// the golden test below; a new field means a `v2.` ticket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketClaims {
    /// Random, unique per ticket; the agent refuses an id it has seen.
    pub ticket_id: [u8; 16],
    pub group: GroupName,
    /// The only resource on which the ticket is valid.
    pub resource: ResourceId,
    pub user: UserId,
    /// The session id the streaming server must use when it reports the
    /// session (`ferry-agent session start`): the broker reserved the slot
    /// under this id.
    pub session: SessionId,
    pub issued_at: UnixMillis,
    /// The ticket is refused from this instant on.
    pub expires_at: UnixMillis,
}

impl TicketClaims {
    /// The ticket id in lower-case hex (logs, the agent's used-ticket set).
    pub fn ticket_id_hex(&self) -> String {
        self.ticket_id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Why a ticket is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("malformed ticket: {0}")]
    Malformed(String),
    #[error("forged ticket: the signature does not match the broker's ticket key")]
    BadSignature,
    #[error("expired ticket: it expired at {expires_at:?}, it is now {now:?}")]
    Expired {
        expires_at: UnixMillis,
        now: UnixMillis,
    },
    #[error("ticket for another host: it is for {ticket_for}, this host is {this}")]
    OtherResource {
        ticket_for: ResourceId,
        this: ResourceId,
    },
}

impl TicketError {
    /// A short stable code for the refusal (CLI `--json`, local socket).
    pub fn code(&self) -> &'static str {
        match self {
            TicketError::Malformed(_) => "malformed",
            TicketError::BadSignature => "forged",
            TicketError::Expired { .. } => "expired",
            TicketError::OtherResource { .. } => "other-host",
        }
    }
}

fn signed_message(claim_bytes: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + claim_bytes.len());
    msg.extend_from_slice(SIGNING_CONTEXT);
    msg.extend_from_slice(claim_bytes);
    msg
}

/// Encodes the claims (bincode, the wire configuration).
pub fn encode_claims(claims: &TicketClaims) -> Result<Vec<u8>, TicketError> {
    let bytes = frame::encode_payload(claims).map_err(|e| TicketError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_TICKET_CLAIMS_LEN {
        return Err(TicketError::Malformed(format!(
            "claims of {} bytes are over the limit of {MAX_TICKET_CLAIMS_LEN}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Signs `claims` with the broker's ticket key and returns the text form.
///
/// Identifiers are bounded ([`crate::limits::MAX_ID_LEN`]), so any valid
/// claims fit in [`MAX_TICKET_CLAIMS_LEN`]; `encode_claims` checks it anyway
/// (a test proves the largest claims fit).
pub fn sign_ticket(claims: &TicketClaims, key: &ring::signature::Ed25519KeyPair) -> String {
    // Encoding plain ids and integers cannot fail; fall back to an empty claim
    // section (which no verifier accepts) rather than panicking.
    let bytes = encode_claims(claims).unwrap_or_default();
    let signature = key.sign(&signed_message(&bytes));
    let mut text = String::with_capacity(MAX_TICKET_LEN);
    text.push_str(TICKET_PREFIX);
    URL_SAFE_NO_PAD.encode_string(&bytes, &mut text);
    text.push('.');
    URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut text);
    text
}

/// Splits and decodes the text form without checking the signature.
fn parse(text: &str) -> Result<(Vec<u8>, Vec<u8>), TicketError> {
    if text.len() > MAX_TICKET_LEN {
        return Err(TicketError::Malformed(format!(
            "{} bytes long; the limit is {MAX_TICKET_LEN}",
            text.len()
        )));
    }
    let rest = text
        .strip_prefix(TICKET_PREFIX)
        .ok_or_else(|| TicketError::Malformed(format!("does not start with {TICKET_PREFIX:?}")))?;
    let (claims_b64, sig_b64) = rest
        .split_once('.')
        .ok_or_else(|| TicketError::Malformed("no signature part".into()))?;
    // Lengths are bounded by MAX_TICKET_LEN above, so decoding allocates little.
    let claim_bytes = URL_SAFE_NO_PAD
        .decode(claims_b64)
        .map_err(|e| TicketError::Malformed(format!("claims: {e}")))?;
    let signature = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|e| TicketError::Malformed(format!("signature: {e}")))?;
    if signature.len() != SIGNATURE_LEN {
        return Err(TicketError::Malformed(format!(
            "signature of {} bytes; expected {SIGNATURE_LEN}",
            signature.len()
        )));
    }
    Ok((claim_bytes, signature))
}

/// Verifies a ticket: its form, the broker's signature (`public_key`, raw
/// Ed25519), its expiry against `now`, and that it is for `this_resource`.
/// Single use is the agent's part (it keeps the ids it has accepted).
pub fn verify_ticket(
    text: &str,
    public_key: &[u8],
    now: UnixMillis,
    this_resource: &ResourceId,
) -> Result<TicketClaims, TicketError> {
    let (claim_bytes, signature) = parse(text)?;
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key);
    // Signature first: nothing of an unsigned ticket is believed or decoded.
    key.verify(&signed_message(&claim_bytes), &signature)
        .map_err(|_| TicketError::BadSignature)?;
    let claims: TicketClaims =
        frame::decode_payload_within::<TicketClaims, MAX_TICKET_CLAIMS_LEN>(&claim_bytes)
            .map_err(|e| TicketError::Malformed(format!("claims: {e}")))?;
    let lifetime = claims.expires_at.0.saturating_sub(claims.issued_at.0);
    if !(0..=MAX_TICKET_LIFETIME_MS).contains(&lifetime) {
        return Err(TicketError::Malformed(format!(
            "lifetime of {lifetime} ms is outside 0..={MAX_TICKET_LIFETIME_MS}"
        )));
    }
    if now >= claims.expires_at {
        return Err(TicketError::Expired {
            expires_at: claims.expires_at,
            now,
        });
    }
    if &claims.resource != this_resource {
        return Err(TicketError::OtherResource {
            ticket_for: claims.resource,
            this: this_resource.clone(),
        });
    }
    Ok(claims)
}

/// What an end user presents to be routed. Secrets never appear in `Debug`.
/// Lengths are checked while decoding ([`MAX_PASSWORD_LEN`], [`MAX_TOKEN_LEN`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "CredentialWire", into = "CredentialWire")]
pub enum Credential {
    /// The user's password (checked against its Argon2id hash).
    Password(String),
    /// A token from `ferryctl user token` (HMAC, checked in microseconds).
    Token(String),
}

/// The encoding of [`Credential`] (same variants, unchecked): bincode has no
/// field tags, so this is the wire layout; never reorder, only append.
#[derive(Clone, Serialize, Deserialize)]
enum CredentialWire {
    Password(String),
    Token(String),
}

/// Why a credential is not acceptable before it is even checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} bytes long; the limit is {max}")]
    TooLong {
        kind: &'static str,
        len: usize,
        max: usize,
    },
}

impl Credential {
    /// Checks the length bounds.
    pub fn validate(&self) -> Result<(), CredentialError> {
        let (kind, value, max) = match self {
            Credential::Password(p) => ("password", p, MAX_PASSWORD_LEN),
            Credential::Token(t) => ("token", t, MAX_TOKEN_LEN),
        };
        if value.is_empty() {
            return Err(CredentialError::Empty { kind });
        }
        if value.len() > max {
            return Err(CredentialError::TooLong {
                kind,
                len: value.len(),
                max,
            });
        }
        Ok(())
    }

    /// `"password"` or `"token"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::Password(_) => "password",
            Credential::Token(_) => "token",
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential::{}(<redacted>)", self.kind())
    }
}

impl TryFrom<CredentialWire> for Credential {
    type Error = CredentialError;
    fn try_from(w: CredentialWire) -> Result<Self, CredentialError> {
        let c = match w {
            CredentialWire::Password(p) => Credential::Password(p),
            CredentialWire::Token(t) => Credential::Token(t),
        };
        c.validate()?;
        Ok(c)
    }
}

impl From<Credential> for CredentialWire {
    fn from(c: Credential) -> Self {
        match c {
            Credential::Password(p) => CredentialWire::Password(p),
            Credential::Token(t) => CredentialWire::Token(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{MAX_ID_LEN, MAX_RESOURCE_ID_LEN};
    use ring::signature::{Ed25519KeyPair, KeyPair as _};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn key() -> Ed25519KeyPair {
        // A fixed seed: deterministic signatures for the golden test.
        Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).expect("seed")
    }

    fn claims() -> TicketClaims {
        TicketClaims {
            ticket_id: [0xab; 16],
            group: "g".parse().expect("id"),
            resource: "h1".parse().expect("id"),
            user: "alice".parse().expect("id"),
            session: "s1".parse().expect("id"),
            issued_at: UnixMillis(1_000),
            expires_at: UnixMillis(61_000),
        }
    }

    fn h1() -> ResourceId {
        "h1".parse().expect("id")
    }

    /// What the README promises RDP users: ids of 85 characters together
    /// make a ticket of at most 255 characters (RDP's password limit), one
    /// more does not.
    #[test]
    fn ids_of_85_characters_together_fit_an_rdp_password() {
        let now = 1_800_000_000_000; // 2027: timestamps take 9 bytes
        let ticket = |total: usize| {
            let user = "u".repeat(total - 1 - 2 - 17);
            sign_ticket(
                &TicketClaims {
                    ticket_id: [1; 16],
                    group: "g".parse().expect("id"),
                    resource: "h1".parse().expect("id"),
                    user: user.parse().expect("id"),
                    session: "r0123456789abcdef".parse().expect("id"),
                    issued_at: UnixMillis(now),
                    expires_at: UnixMillis(now + 60_000),
                },
                &key(),
            )
        };
        assert!(ticket(85).len() <= 255, "{}", ticket(85).len());
        assert!(ticket(86).len() > 255, "{}", ticket(86).len());
    }

    #[test]
    fn golden_claims() {
        let bytes = encode_claims(&claims()).expect("encode");
        assert_eq!(
            hex(&bytes),
            concat!(
                "abababababababababababababababab",
                "0167",
                "026831",
                "05616c696365",
                "027331",
                "fbd007",     // issued_at 1000 (zigzag varint)
                "fc90dc0100", // expires_at 61000
            )
        );
    }

    #[test]
    fn golden_ticket_text() {
        // Ed25519 signatures are deterministic: the whole text is frozen.
        let text = sign_ticket(&claims(), &key());
        assert_eq!(
            text,
            concat!(
                "v1.q6urq6urq6urq6urq6urqwFnAmgxBWFsaWNlAnMx-9AH_JDcAQA.",
                "Ssk99vQSLZl4g_q1LQOQjCwmvt_PJ5Z6eFpJN5e7Bx-J7ZXom5cSHhepMvWk-25_yIL-c-Q7l03QNVxYd_etCw",
            )
        );
    }

    #[test]
    fn a_signed_ticket_verifies() {
        let k = key();
        let text = sign_ticket(&claims(), &k);
        let got = verify_ticket(&text, k.public_key().as_ref(), UnixMillis(2_000), &h1());
        assert_eq!(got, Ok(claims()));
    }

    #[test]
    fn flipping_any_byte_is_refused() {
        let k = key();
        let text = sign_ticket(&claims(), &k);
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            for replacement in [b'A', b'_', b'.', b'x'] {
                if bytes[i] == replacement {
                    continue;
                }
                let mut t = bytes.to_vec();
                t[i] = replacement;
                let t = String::from_utf8(t).expect("ascii");
                let r = verify_ticket(&t, k.public_key().as_ref(), UnixMillis(2_000), &h1());
                assert!(
                    matches!(
                        r,
                        Err(TicketError::BadSignature | TicketError::Malformed(_))
                    ),
                    "byte {i} -> {replacement}: {r:?}"
                );
            }
        }
    }

    #[test]
    fn another_key_is_a_forgery() {
        let text = sign_ticket(&claims(), &key());
        let other = Ed25519KeyPair::from_seed_unchecked(&[8u8; 32]).expect("seed");
        let r = verify_ticket(&text, other.public_key().as_ref(), UnixMillis(2_000), &h1());
        assert_eq!(r, Err(TicketError::BadSignature));
        assert_eq!(TicketError::BadSignature.code(), "forged");
    }

    #[test]
    fn expiry_is_exclusive() {
        let k = key();
        let text = sign_ticket(&claims(), &k);
        let pk = k.public_key().as_ref().to_vec();
        assert!(verify_ticket(&text, &pk, UnixMillis(60_999), &h1()).is_ok());
        assert_eq!(
            verify_ticket(&text, &pk, UnixMillis(61_000), &h1()),
            Err(TicketError::Expired {
                expires_at: UnixMillis(61_000),
                now: UnixMillis(61_000)
            })
        );
    }

    #[test]
    fn another_resource_is_refused() {
        let k = key();
        let text = sign_ticket(&claims(), &k);
        let h2: ResourceId = "h2".parse().expect("id");
        let r = verify_ticket(&text, k.public_key().as_ref(), UnixMillis(2_000), &h2);
        assert_eq!(
            r,
            Err(TicketError::OtherResource {
                ticket_for: h1(),
                this: h2
            })
        );
    }

    #[test]
    fn overlong_lifetimes_and_texts_are_malformed() {
        let k = key();
        let mut c = claims();
        c.expires_at = UnixMillis(c.issued_at.0 + MAX_TICKET_LIFETIME_MS + 1);
        let text = sign_ticket(&c, &k);
        let r = verify_ticket(&text, k.public_key().as_ref(), UnixMillis(2_000), &h1());
        assert!(matches!(r, Err(TicketError::Malformed(_))), "{r:?}");
        let long = format!("v1.{}", "A".repeat(MAX_TICKET_LEN));
        let r = verify_ticket(&long, k.public_key().as_ref(), UnixMillis(2_000), &h1());
        assert!(matches!(r, Err(TicketError::Malformed(_))), "{r:?}");
    }

    #[test]
    fn the_largest_claims_fit_the_limits() {
        let k = key();
        let c = TicketClaims {
            ticket_id: [0xff; 16],
            group: "g".repeat(MAX_ID_LEN).parse().expect("id"),
            resource: "r".repeat(MAX_RESOURCE_ID_LEN).parse().expect("id"),
            user: "u".repeat(MAX_ID_LEN).parse().expect("id"),
            session: "s".repeat(MAX_ID_LEN).parse().expect("id"),
            issued_at: UnixMillis(i64::MAX - MAX_TICKET_LIFETIME_MS),
            expires_at: UnixMillis(i64::MAX),
        };
        let text = sign_ticket(&c, &k);
        assert!(text.len() <= MAX_TICKET_LEN, "{}", text.len());
        let r = verify_ticket(&text, k.public_key().as_ref(), UnixMillis(0), &c.resource);
        assert_eq!(r, Ok(c));
    }

    #[test]
    fn credentials_are_bounded_and_redacted() {
        let p = Credential::Password("hunter2".into());
        assert_eq!(format!("{p:?}"), "Credential::password(<redacted>)");
        let bytes = frame::encode_payload(&p).expect("encode");
        // Golden: variant 0, length 7, the bytes.
        assert_eq!(hex(&bytes), "000768756e74657232");
        assert_eq!(
            frame::decode_payload::<Credential>(&bytes).expect("decode"),
            p
        );
        let t = frame::encode_payload(&Credential::Token("t".into())).expect("encode");
        assert_eq!(hex(&t), "010174");
        let long =
            frame::encode_payload(&CredentialWire::Password("x".repeat(MAX_PASSWORD_LEN + 1)))
                .expect("encode");
        assert!(frame::decode_payload::<Credential>(&long).is_err());
        let empty = frame::encode_payload(&CredentialWire::Token(String::new())).expect("encode");
        assert!(frame::decode_payload::<Credential>(&empty).is_err());
    }
}
