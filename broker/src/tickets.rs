//! The broker's signing keys for end users: session tickets and user tokens.
//!
//! * [`TicketSigner`]: an Ed25519 key (`pki_dir/ticket.key`, PKCS#8, 0600)
//!   signing the single-use tickets the route service hands out
//!   ([`ferry_common::ticket`]). Agents verify them offline with the public
//!   key the link sends after `Welcome` (`BrokerToAgent::TicketKey`).
//! * [`TokenKey`]: an HMAC-SHA256 secret (`pki_dir/token.key`, 0600) for
//!   the tokens of `ferryctl user token`: a user presents one instead of a
//!   password, and checking it costs microseconds instead of an Argon2 hash.
//!
//! Both files are created on first use, atomically: written under a
//! temporary name, synced, then hard-linked to their name, which fails if
//! another process created the file first (the loser loads the winner's).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ferry_common::frame;
use ferry_common::limits::MAX_TOKEN_LEN;
use ferry_common::ticket::{sign_ticket, TicketClaims};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis, UserId};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};

/// The ticket key's file in the PKI directory.
pub const TICKET_KEY: &str = "ticket.key";

/// The token secret's file in the PKI directory.
pub const TOKEN_KEY: &str = "token.key";

/// How long a ticket is valid: long enough for a client to get from the
/// broker's answer to the streaming server, short enough that an unused
/// reservation is freed soon.
pub const TICKET_TTL: Duration = Duration::from_secs(60);

/// Default lifetime of a user token (`ferryctl user token` without `--ttl`).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(8 * 3600);

/// Longest lifetime of a user token: a token cannot be revoked one by one
/// (only all of a user's at once), so it should not live for ever.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// Length of the token secret.
const TOKEN_SECRET_LEN: usize = 32;

/// Largest key file read (a PKCS#8 Ed25519 document is 83-85 bytes).
const MAX_KEY_FILE_LEN: u64 = 4096;

/// Prefix of the text form of user tokens.
pub const TOKEN_PREFIX: &str = "fu1.";

/// Domain separation of token MACs.
const TOKEN_CONTEXT: &[u8] = b"ferry-user-token-v1\0";

/// Derivation label of the per-process ticket-id key.
const TICKET_ID_LABEL: &[u8] = b"ferry-ticket-id";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a valid key: {message}")]
    BadKey { path: PathBuf, message: String },
    #[error("no randomness from the system")]
    Random,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> KeyError + 'a {
    move |error| KeyError::Io {
        what,
        path: path.to_path_buf(),
        error,
    }
}

/// Reads `path` (bounded), or creates it with `make()`'s bytes, atomically
/// and with mode 0600, when it does not exist.
fn load_or_create_file(
    path: &Path,
    make: impl FnOnce() -> Result<Vec<u8>, KeyError>,
) -> Result<Vec<u8>, KeyError> {
    if let Some(bytes) = read_key_file(path)? {
        return Ok(bytes);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let bytes = make()?;
    let tmp = tempfile::Builder::new()
        .prefix(".key-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(io_err("create a temporary file in", dir))?;
    {
        let mut f = tmp.as_file();
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io_err("write", tmp.path()))?;
    }
    match std::fs::hard_link(tmp.path(), path) {
        Ok(()) => {
            // The name is durable once the directory is.
            if let Ok(d) = std::fs::File::open(dir) {
                d.sync_all().map_err(io_err("sync directory", dir))?;
            }
            Ok(bytes)
        }
        // Someone else created it meanwhile: theirs wins.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_key_file(path)?.ok_or_else(|| KeyError::BadKey {
                path: path.to_path_buf(),
                message: "vanished while being created".into(),
            })
        }
        Err(e) => Err(io_err("create", path)(e)),
    }
    // `tmp` is removed when dropped.
}

fn read_key_file(path: &Path) -> Result<Option<Vec<u8>>, KeyError> {
    let f = match OpenOptions::new().read(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let len = f.metadata().map_err(io_err("stat", path))?.len();
    if len > MAX_KEY_FILE_LEN {
        return Err(KeyError::BadKey {
            path: path.to_path_buf(),
            message: format!("{len} bytes; the limit is {MAX_KEY_FILE_LEN}"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_KEY_FILE_LEN), &mut bytes)
        .map_err(io_err("read", path))?;
    Ok(Some(bytes))
}

/// Signs session tickets.
pub struct TicketSigner {
    key: Ed25519KeyPair,
    /// Ticket ids are HMAC(this, counter): unique within the process (the
    /// counter), unpredictable and unrelated across restarts (a fresh random
    /// key), and issuing cannot fail on a lack of randomness.
    id_key: ring::hmac::Key,
    counter: AtomicU64,
}

impl std::fmt::Debug for TicketSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketSigner").finish_non_exhaustive()
    }
}

impl TicketSigner {
    /// Loads `pki_dir/ticket.key`, creating it (0600, atomically) on first use.
    pub fn load_or_create(pki_dir: &Path) -> Result<TicketSigner, KeyError> {
        let path = pki_dir.join(TICKET_KEY);
        let rng = SystemRandom::new();
        let pkcs8 = load_or_create_file(&path, || {
            Ed25519KeyPair::generate_pkcs8(&rng)
                .map(|d| d.as_ref().to_vec())
                .map_err(|_| KeyError::Random)
        })?;
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| KeyError::BadKey {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Self::from_key(key, &rng)
    }

    fn from_key(key: Ed25519KeyPair, rng: &SystemRandom) -> Result<TicketSigner, KeyError> {
        let mut seed = [0u8; 32];
        rng.fill(&mut seed).map_err(|_| KeyError::Random)?;
        let master = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed);
        let derived = ring::hmac::sign(&master, TICKET_ID_LABEL);
        Ok(TicketSigner {
            key,
            id_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()),
            counter: AtomicU64::new(0),
        })
    }

    /// The raw Ed25519 public key (32 bytes) agents verify tickets with.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    fn next_ticket_id(&self) -> [u8; 16] {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tag = ring::hmac::sign(&self.id_key, &n.to_be_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&tag.as_ref()[..16]);
        id
    }

    /// A ticket for `user`'s `session` on `resource` of `group`, valid from
    /// `now` for `ttl` (normally [`TICKET_TTL`]; longer is clamped to
    /// [`ferry_common::limits::MAX_TICKET_LIFETIME_MS`], which agents enforce).
    pub fn issue(
        &self,
        group: &GroupName,
        resource: &ResourceId,
        user: &UserId,
        session: &SessionId,
        now: UnixMillis,
        ttl: Duration,
    ) -> (TicketClaims, String) {
        let ttl_ms = i64::try_from(ttl.as_millis())
            .unwrap_or(i64::MAX)
            .min(ferry_common::limits::MAX_TICKET_LIFETIME_MS);
        let claims = TicketClaims {
            ticket_id: self.next_ticket_id(),
            group: group.clone(),
            resource: resource.clone(),
            user: user.clone(),
            session: session.clone(),
            issued_at: now,
            expires_at: UnixMillis(now.0.saturating_add(ttl_ms)),
        };
        let text = sign_ticket(&claims, &self.key);
        (claims, text)
    }
}

/// What a user token says (bincode; frozen by a golden test).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    pub user: UserId,
    pub expires_at: UnixMillis,
    /// The user's token generation when the token was issued; the token is
    /// valid only while the user's generation is still this one.
    pub generation: u64,
}

/// Why a token is refused (never shown to the user: they get "bad
/// credentials"; the broker logs it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token MAC does not match")]
    BadMac,
    #[error("token is for another user")]
    OtherUser,
    #[error("token expired")]
    Expired,
}

/// The HMAC secret of user tokens.
pub struct TokenKey {
    key: ring::hmac::Key,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey").finish_non_exhaustive()
    }
}

impl TokenKey {
    /// Loads `pki_dir/token.key`, creating it (0600, atomically) on first use.
    pub fn load_or_create(pki_dir: &Path) -> Result<TokenKey, KeyError> {
        let path = pki_dir.join(TOKEN_KEY);
        let secret = load_or_create_file(&path, || {
            let mut s = vec![0u8; TOKEN_SECRET_LEN];
            SystemRandom::new()
                .fill(&mut s)
                .map_err(|_| KeyError::Random)?;
            Ok(s)
        })?;
        if secret.len() != TOKEN_SECRET_LEN {
            return Err(KeyError::BadKey {
                path,
                message: format!("{} bytes; expected {TOKEN_SECRET_LEN}", secret.len()),
            });
        }
        Ok(TokenKey::from_secret(&secret))
    }

    /// A key from raw secret bytes (tests, benchmarks).
    pub fn from_secret(secret: &[u8]) -> TokenKey {
        TokenKey {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        }
    }

    fn mac_input(claim_bytes: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(TOKEN_CONTEXT.len() + claim_bytes.len());
        m.extend_from_slice(TOKEN_CONTEXT);
        m.extend_from_slice(claim_bytes);
        m
    }

    /// The text form of a token with these claims.
    pub fn issue(&self, claims: &TokenClaims) -> Result<String, TokenError> {
        let bytes =
            frame::encode_payload(claims).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let tag = ring::hmac::sign(&self.key, &Self::mac_input(&bytes));
        let mut text = String::from(TOKEN_PREFIX);
        URL_SAFE_NO_PAD.encode_string(&bytes, &mut text);
        text.push('.');
        URL_SAFE_NO_PAD.encode_string(tag.as_ref(), &mut text);
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed(format!(
                "{} bytes; the limit is {MAX_TOKEN_LEN}",
                text.len()
            )));
        }
        Ok(text)
    }

    /// Checks the form, the MAC (constant time), the user and the expiry.
    /// The caller checks `generation` against the user's current one.
    pub fn verify(
        &self,
        text: &str,
        user: &UserId,
        now: UnixMillis,
    ) -> Result<TokenClaims, TokenError> {
        if text.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("too long".into()));
        }
        let rest = text
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| TokenError::Malformed("bad prefix".into()))?;
        let (claims_b64, tag_b64) = rest
            .split_once('.')
            .ok_or_else(|| TokenError::Malformed("no MAC".into()))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(claims_b64)
            .map_err(|e| TokenError::Malformed(e.to_string()))?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag_b64)
            .map_err(|e| TokenError::Malformed(e.to_string()))?;
        ring::hmac::verify(&self.key, &Self::mac_input(&bytes), &tag)
            .map_err(|_| TokenError::BadMac)?;
        let claims: TokenClaims =
            frame::decode_payload_within::<TokenClaims, MAX_TOKEN_LEN>(&bytes)
                .map_err(|e| TokenError::Malformed(e.to_string()))?;
        if &claims.user != user {
            return Err(TokenError::OtherUser);
        }
        if now >= claims.expires_at {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::ticket::{verify_ticket, TicketError};

    fn id<T: std::str::FromStr>(s: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        s.parse().expect("valid id in test")
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn the_ticket_key_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = TicketSigner::load_or_create(dir.path()).expect("create");
        assert_eq!(mode(&dir.path().join(TICKET_KEY)), 0o600);
        let b = TicketSigner::load_or_create(dir.path()).expect("load");
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(a.public_key().len(), 32);
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(TICKET_KEY)]);
    }

    #[test]
    fn a_corrupt_ticket_key_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(TICKET_KEY), b"nope").expect("write");
        assert!(matches!(
            TicketSigner::load_or_create(dir.path()),
            Err(KeyError::BadKey { .. })
        ));
    }

    #[test]
    fn issued_tickets_verify_with_the_public_key_and_have_distinct_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = TicketSigner::load_or_create(dir.path()).expect("create");
        let (g, r, u, sid) = (id("g"), id("h1"), id("alice"), id("s-1"));
        let (c1, t1) = s.issue(&g, &r, &u, &sid, UnixMillis(1000), TICKET_TTL);
        let (c2, _) = s.issue(&g, &r, &u, &sid, UnixMillis(1000), TICKET_TTL);
        assert_ne!(c1.ticket_id, c2.ticket_id);
        assert_eq!(c1.expires_at, UnixMillis(61_000));
        let got = verify_ticket(&t1, &s.public_key(), UnixMillis(2000), &r).expect("valid");
        assert_eq!(got, c1);
        assert!(matches!(
            verify_ticket(&t1, &s.public_key(), UnixMillis(61_000), &r),
            Err(TicketError::Expired { .. })
        ));
        // Another broker's key does not verify it.
        let other = tempfile::tempdir().expect("tempdir");
        let s2 = TicketSigner::load_or_create(other.path()).expect("create");
        assert_eq!(
            verify_ticket(&t1, &s2.public_key(), UnixMillis(2000), &r),
            Err(TicketError::BadSignature)
        );
    }

    #[test]
    fn golden_token_claims() {
        let c = TokenClaims {
            user: id("alice"),
            expires_at: UnixMillis(1000),
            generation: 2,
        };
        let bytes = frame::encode_payload(&c).expect("encode");
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "05616c696365fbd00702");
    }

    #[test]
    fn tokens_verify_for_their_user_until_expiry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = TokenKey::load_or_create(dir.path()).expect("create");
        assert_eq!(mode(&dir.path().join(TOKEN_KEY)), 0o600);
        let alice: UserId = id("alice");
        let c = TokenClaims {
            user: alice.clone(),
            expires_at: UnixMillis(10_000),
            generation: 0,
        };
        let t = k.issue(&c).expect("issue");
        assert!(t.len() <= MAX_TOKEN_LEN);
        assert_eq!(k.verify(&t, &alice, UnixMillis(9_999)), Ok(c.clone()));
        assert_eq!(
            k.verify(&t, &alice, UnixMillis(10_000)),
            Err(TokenError::Expired)
        );
        assert_eq!(
            k.verify(&t, &id("bob"), UnixMillis(1)),
            Err(TokenError::OtherUser)
        );
        // Reloaded key: same secret.
        let k2 = TokenKey::load_or_create(dir.path()).expect("load");
        assert!(k2.verify(&t, &alice, UnixMillis(1)).is_ok());
        // Another secret or any changed byte: refused.
        assert_eq!(
            TokenKey::from_secret(b"other").verify(&t, &alice, UnixMillis(1)),
            Err(TokenError::BadMac)
        );
        for i in 0..t.len() {
            let mut b = t.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let s = String::from_utf8(b).expect("ascii");
            assert!(k.verify(&s, &alice, UnixMillis(1)).is_err(), "byte {i}");
        }
    }
}
