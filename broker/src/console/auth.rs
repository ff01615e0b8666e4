//! Who may use the console: a person who could use the admin socket.
//!
//! `ferryctl console login` (an admin request, so the socket's access rules
//! apply) asks for a one-time login link. Opening it trades the link's token
//! for a console session: a random cookie (`HttpOnly`, `SameSite=Strict`,
//! `Secure` over TLS) and a per-session form token every state-changing
//! request must carry. Tokens and cookies are random 256-bit values; only
//! their SHA-256 is kept, so a lookup leaks nothing by its timing and a
//! memory dump holds no usable credential.
//!
//! Both live in this broker's memory: a restart signs everybody out, and a
//! link is good only on the broker that made it. Both tables are bounded
//! (oldest dropped first).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};

/// How long a login link can be used.
pub const LINK_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// Login links waiting to be used at once; past this the oldest is dropped.
const MAX_LINKS: usize = 64;
/// Console sessions at once; past this the oldest is signed out.
const MAX_SESSIONS: usize = 1024;

/// The name of the session cookie.
pub const COOKIE: &str = "ferry_console";

type Digest = [u8; 32];

fn digest(secret: &str) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A random 256-bit value in base64url.
fn random_secret(rng: &SystemRandom) -> Result<String, AuthError> {
    let mut bytes = [0u8; 32];
    rng.fill(&mut bytes).map_err(|_| AuthError::Random)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the system's random generator failed")]
    Random,
    #[error("this login link was used already, has expired or was made by another broker or before a restart: run `ferryctl console login` for a new one")]
    LinkUnknown,
}

/// A signed-in console session.
#[derive(Clone, Debug)]
pub struct Session {
    /// The token the session's forms carry (checked on every POST).
    pub form_token: String,
    expires: Instant,
}

struct Tables {
    /// Login link token digest → when it stops working.
    links: HashMap<Digest, Instant>,
    /// Session cookie digest → session.
    sessions: HashMap<Digest, Session>,
}

/// The console's login links and sessions.
pub struct Logins {
    rng: SystemRandom,
    session_ttl: Duration,
    tables: Mutex<Tables>,
}

impl Logins {
    pub fn new(session_ttl: Duration) -> Logins {
        Logins {
            rng: SystemRandom::new(),
            session_ttl,
            tables: Mutex::new(Tables {
                links: HashMap::new(),
                sessions: HashMap::new(),
            }),
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A panic while holding the lock leaves plain maps behind: still usable.
        self.tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new one-time login token, good for [`LINK_LIFETIME`].
    pub fn new_link(&self) -> Result<String, AuthError> {
        let token = random_secret(&self.rng)?;
        let now = Instant::now();
        let mut t = self.tables();
        t.links.retain(|_, until| *until > now);
        if t.links.len() >= MAX_LINKS {
            if let Some(oldest) = t
                .links
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(k, _)| *k)
            {
                t.links.remove(&oldest);
            }
        }
        t.links.insert(digest(&token), now + LINK_LIFETIME);
        Ok(token)
    }

    /// Trades a login token for a new session: returns the cookie value and
    /// the session. The token works once.
    pub fn sign_in(&self, token: &str) -> Result<(String, Session), AuthError> {
        let now = Instant::now();
        let cookie = random_secret(&self.rng)?;
        let form_token = random_secret(&self.rng)?;
        let mut t = self.tables();
        match t.links.remove(&digest(token)) {
            Some(until) if until > now => {}
            _ => return Err(AuthError::LinkUnknown),
        }
        t.sessions.retain(|_, s| s.expires > now);
        if t.sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = t
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| *k)
            {
                t.sessions.remove(&oldest);
            }
        }
        let session = Session {
            form_token,
            expires: now + self.session_ttl,
        };
        t.sessions.insert(digest(&cookie), session.clone());
        Ok((cookie, session))
    }

    /// The session of a cookie value, if it is signed in.
    pub fn session(&self, cookie: &str) -> Option<Session> {
        let now = Instant::now();
        let t = self.tables();
        t.sessions
            .get(&digest(cookie))
            .filter(|s| s.expires > now)
            .cloned()
    }

    /// Signs a cookie out.
    pub fn sign_out(&self, cookie: &str) {
        self.tables().sessions.remove(&digest(cookie));
    }

    /// How long a session lasts.
    pub fn session_ttl(&self) -> Duration {
        self.session_ttl
    }
}

/// Whether `given` is the session's form token, compared in constant time.
pub fn form_token_matches(session: &Session, given: &str) -> bool {
    let (a, b) = (session.form_token.as_bytes(), given.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A short, non-secret name of a session for the logs: the first 8 hex
/// digits of its cookie's SHA-256.
pub fn short_id(cookie: &str) -> String {
    digest(cookie)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The value of the cookie `name` in a `Cookie` header, if any.
pub fn cookie_value<'h>(header: &'h str, name: &str) -> Option<&'h str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_signs_in_once() {
        let logins = Logins::new(Duration::from_secs(60));
        let token = logins.new_link().expect("link");
        let (cookie, session) = logins.sign_in(&token).expect("first use");
        assert_eq!(logins.sign_in(&token).unwrap_err(), AuthError::LinkUnknown);
        let found = logins.session(&cookie).expect("signed in");
        assert_eq!(found.form_token, session.form_token);
        assert!(form_token_matches(&found, &session.form_token));
        assert!(!form_token_matches(&found, "guess"));
        logins.sign_out(&cookie);
        assert!(logins.session(&cookie).is_none());
    }

    #[test]
    fn unknown_tokens_and_cookies_are_refused() {
        let logins = Logins::new(Duration::from_secs(60));
        assert_eq!(
            logins.sign_in("made-up").unwrap_err(),
            AuthError::LinkUnknown
        );
        assert!(logins.session("made-up").is_none());
    }

    #[test]
    fn an_expired_session_is_signed_out() {
        let logins = Logins::new(Duration::ZERO);
        let token = logins.new_link().expect("link");
        let (cookie, _) = logins.sign_in(&token).expect("sign in");
        assert!(logins.session(&cookie).is_none());
    }

    #[test]
    fn the_link_table_is_bounded() {
        let logins = Logins::new(Duration::from_secs(60));
        let first = logins.new_link().expect("link");
        for _ in 0..MAX_LINKS {
            logins.new_link().expect("link");
        }
        assert_eq!(logins.tables().links.len(), MAX_LINKS);
        assert_eq!(logins.sign_in(&first).unwrap_err(), AuthError::LinkUnknown);
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        assert_eq!(
            cookie_value("a=1; ferry_console=xyz; b=2", COOKIE),
            Some("xyz")
        );
        assert_eq!(cookie_value("ferry_consolex=1", COOKIE), None);
        assert_eq!(cookie_value("", COOKIE), None);
    }
}
