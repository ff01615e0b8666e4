//! End users' credentials (issue 5): password hashes, tokens, and the
//! checks the route service runs before it places a session.
//!
//! * Passwords are stored as Argon2id PHC strings (`users.password_hash`,
//!   store migration 5), salted with 16 random bytes; never in clear. A user
//!   without a hash (e.g. imported from CSV) cannot log in with a password.
//! * Tokens (`ferryctl user token`) are HMAC-SHA256 over (user, expiry,
//!   generation) with the broker's token key ([`crate::tickets::TokenKey`]);
//!   `user revoke-tokens` bumps the user's generation, which invalidates
//!   every token issued before.
//! * [`GroupService::authenticate`] answers [`AuthError::BadCredentials`]
//!   for an unknown user, a user without a password and a wrong password
//!   alike, and hashes against a dummy hash when there is no stored one, so
//!   neither the answer nor its timing tells which.
//! * Argon2 costs ~19 MiB and tens of milliseconds per hash: hashes run in
//!   `spawn_blocking`, at most [`max_concurrent_hashes`] at once (a
//!   process-wide semaphore), so a flood of requests waits instead of
//!   exhausting memory.

use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use ferry_common::admin::{UserInfo, UserSpec};
use ferry_common::limits::{MAX_PASSWORD_LEN, MIN_PASSWORD_CHARS};
use ferry_common::ticket::Credential;
use ferry_common::{GroupName, UnixMillis, UserId};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::Semaphore;

use super::{checked_user, GroupError, GroupService};
use crate::store::{StoreError, StoredCredentials};
use crate::tickets::{TokenClaims, TokenKey, MAX_TOKEN_TTL};

/// Concurrent password hashes per CPU core. Each Argon2id hash (default
/// parameters) holds ~19 MiB for its duration: 2 per core keeps the cores
/// busy and memory at a few hundred MiB at most.
pub const HASHES_PER_CORE: usize = 2;

/// Length of a password salt.
const SALT_LEN: usize = 16;

/// Most password hashes computed at once in this process.
pub fn max_concurrent_hashes() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .saturating_mul(HASHES_PER_CORE)
}

static HASH_SLOTS: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(max_concurrent_hashes()));

/// Why a user is not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unknown user, no password set, wrong password, bad or revoked or
    /// expired token: deliberately one answer.
    #[error("wrong user name or credentials")]
    BadCredentials,
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("credential check failed: {0}")]
    Unavailable(String),
}

/// The Argon2 instance of every hash: Argon2id, version 19, the crate's
/// default cost (19 MiB, 2 passes, 1 lane). Verification reads the
/// parameters from the stored PHC string, so a later change of these
/// affects new hashes only.
fn argon2() -> Argon2<'static> {
    Argon2::default()
}

/// Hashes `password` with a fresh random salt into a PHC string. Slow: call
/// from a blocking thread holding a [`HASH_SLOTS`] permit.
fn hash_password_blocking(password: &str) -> Result<String, String> {
    let mut salt = [0u8; SALT_LEN];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| "no randomness from the system".to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A hash of a random password, with the same parameters as real ones, to
/// verify against when a user has none.
fn dummy_hash() -> Option<&'static str> {
    static DUMMY: OnceLock<Option<String>> = OnceLock::new();
    DUMMY
        .get_or_init(|| {
            let mut pw = [0u8; 16];
            SystemRandom::new().fill(&mut pw).ok()?;
            let pw: String = pw.iter().map(|b| format!("{b:02x}")).collect();
            hash_password_blocking(&pw).ok()
        })
        .as_deref()
}

/// Whether `password` matches `stored`; with no stored hash, verifies
/// against the dummy (same cost) and answers false.
fn check_password_blocking(stored: Option<&str>, password: &str) -> bool {
    let (hash, real) = match stored {
        Some(h) => (Some(h), true),
        None => (dummy_hash(), false),
    };
    let Some(hash) = hash else { return false };
    let Ok(parsed) = PasswordHash::new(hash) else {
        tracing::warn!("a stored password hash is not a PHC string");
        return false;
    };
    argon2()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
        && real
}

/// Runs a slow hash job on a blocking thread under the hash semaphore.
async fn with_hash_slot<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let _permit = HASH_SLOTS
        .acquire()
        .await
        .map_err(|_| "hash slots closed".to_string())?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("hash task failed: {e}"))
}

fn check_new_password(password: &str) -> Result<(), GroupError> {
    if password.is_empty() {
        return Err(GroupError::Invalid(vec!["the password is empty".into()]));
    }
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(GroupError::Invalid(vec![format!(
            "the password has {chars} characters; a password needs at least \
             {MIN_PASSWORD_CHARS} characters (a longer phrase is better)"
        )]));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(GroupError::Invalid(vec![format!(
            "the password is {} bytes long; the limit is {MAX_PASSWORD_LEN}",
            password.len()
        )]));
    }
    Ok(())
}

async fn hash_new_password(password: &str) -> Result<String, GroupError> {
    check_new_password(password)?;
    let pw = password.to_owned();
    with_hash_slot(move || hash_password_blocking(&pw))
        .await
        .and_then(|r| r)
        .map_err(|e| GroupError::Store(StoreError::Commit(format!("hash password: {e}"))))
}

fn user_not_found(user: &UserId) -> GroupError {
    GroupError::NotFound(format!("user {user} does not exist"))
}

impl GroupService {
    /// Uses `key` for user tokens (the daemon loads it from the PKI
    /// directory). Without one, tokens are neither issued nor accepted.
    pub fn with_token_key(mut self, key: Arc<TokenKey>) -> GroupService {
        self.token_key = Some(key);
        self
    }

    /// Checks `user`'s credential. Every refusal is
    /// [`AuthError::BadCredentials`], whatever the reason (logged at debug).
    pub async fn authenticate(
        &self,
        user: &UserId,
        credential: &Credential,
    ) -> Result<(), AuthError> {
        if credential.validate().is_err() {
            return Err(AuthError::BadCredentials);
        }
        let stored = self.store.user_credentials(user).await?;
        match credential {
            Credential::Password(password) => {
                let hash = stored.and_then(|s| s.password_hash);
                let pw = password.clone();
                let ok = with_hash_slot(move || check_password_blocking(hash.as_deref(), &pw))
                    .await
                    .map_err(AuthError::Unavailable)?;
                if ok {
                    Ok(())
                } else {
                    tracing::debug!(%user, "password refused");
                    Err(AuthError::BadCredentials)
                }
            }
            Credential::Token(text) => {
                let Some(key) = &self.token_key else {
                    tracing::debug!(%user, "token refused: no token key");
                    return Err(AuthError::BadCredentials);
                };
                let claims = key.verify(text, user, self.now()).map_err(|e| {
                    tracing::debug!(%user, error = %e, "token refused");
                    AuthError::BadCredentials
                })?;
                match stored {
                    Some(StoredCredentials {
                        token_generation, ..
                    }) if token_generation == claims.generation => Ok(()),
                    _ => {
                        tracing::debug!(%user, "token refused: revoked or unknown user");
                        Err(AuthError::BadCredentials)
                    }
                }
            }
        }
    }

    /// Whether `user` is assigned to the (not gone) group named `group`.
    pub async fn is_assigned(&self, group: &GroupName, user: &UserId) -> Result<bool, GroupError> {
        Ok(self.store.is_assigned(group, user).await?)
    }

    /// `user create ... --password-file/--password-stdin`: the user and its
    /// password hash in one transaction.
    pub async fn create_user_with_password(
        &self,
        user: UserSpec,
        password: &str,
        now: UnixMillis,
    ) -> Result<Vec<UserInfo>, GroupError> {
        // Refused before the (slow) hash is computed.
        checked_user(&user)?;
        let hash = hash_new_password(password).await?;
        self.insert_new_user(user, Some(hash), now).await
    }

    /// `user set-password`: replaces the user's password hash.
    pub async fn set_password(
        &self,
        user: &UserId,
        password: &str,
        now: UnixMillis,
    ) -> Result<String, GroupError> {
        let hash = hash_new_password(password).await?;
        if !self.store.set_password_hash(user, hash, now).await? {
            return Err(user_not_found(user));
        }
        Ok(format!("password of {user} set"))
    }

    /// `user token`: a token for `user` valid for `ttl` (at most
    /// [`MAX_TOKEN_TTL`]) from `now`, and its expiry.
    pub async fn issue_token(
        &self,
        user: &UserId,
        ttl: Duration,
        now: UnixMillis,
    ) -> Result<(String, UnixMillis), GroupError> {
        let Some(key) = self.token_key.clone() else {
            return Err(GroupError::Invalid(vec![
                "this broker has no token key; tokens are off".into(),
            ]));
        };
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(GroupError::Invalid(vec![format!(
                "token lifetime must be more than 0 and at most {} days",
                MAX_TOKEN_TTL.as_secs() / 86_400
            )]));
        }
        let Some(StoredCredentials {
            token_generation: generation,
            ..
        }) = self.store.user_credentials(user).await?
        else {
            return Err(user_not_found(user));
        };
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let claims = TokenClaims {
            user: user.clone(),
            expires_at: UnixMillis(now.0.saturating_add(ttl_ms)),
            generation,
        };
        let text = key
            .issue(&claims)
            .map_err(|e| GroupError::Invalid(vec![e.to_string()]))?;
        // For `user list`: the newest expiry of the current generation.
        self.store
            .record_token_expiry(user, generation, claims.expires_at)
            .await?;
        Ok((text, claims.expires_at))
    }

    /// `user revoke-tokens`: every token of `user` issued so far stops working.
    pub async fn revoke_tokens(
        &self,
        user: &UserId,
        now: UnixMillis,
    ) -> Result<String, GroupError> {
        if !self.store.revoke_tokens(user, now).await? {
            return Err(user_not_found(user));
        }
        Ok(format!("every token of {user} issued so far is revoked"))
    }

    /// Whether `user` has a password set (`user list` cannot say it: its
    /// wire type is shipped).
    pub async fn has_password(&self, user: &UserId) -> Result<bool, GroupError> {
        match self.store.user_credentials(user).await? {
            Some(stored) => Ok(stored.password_hash.is_some()),
            None => Err(user_not_found(user)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id<T: std::str::FromStr>(s: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        s.parse().expect("valid id in test")
    }

    async fn service() -> (tempfile::TempDir, GroupService) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = crate::store::testing::open_for_test(tmp.path());
        let key = Arc::new(TokenKey::from_secret(b"test secret"));
        let svc = GroupService::new(store, Default::default()).with_token_key(key);
        (tmp, svc)
    }

    fn spec(u: &str) -> UserSpec {
        UserSpec {
            id: id(u),
            email: format!("{u}@example.com"),
            mobile: "+4912345678".into(),
        }
    }

    fn pw(s: &str) -> Credential {
        Credential::Password(s.into())
    }

    #[test]
    fn hashes_are_salted_argon2id_phc_strings() {
        let a = hash_password_blocking("secret").expect("hash");
        let b = hash_password_blocking("secret").expect("hash");
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert_ne!(a, b, "salted");
        assert!(!a.contains("secret"));
        assert!(check_password_blocking(Some(&a), "secret"));
        assert!(!check_password_blocking(Some(&a), "Secret"));
        assert!(!check_password_blocking(None, "secret"));
        assert!(!check_password_blocking(Some("garbage"), "secret"));
    }

    #[tokio::test]
    async fn passwords_authenticate_and_refusals_are_indistinguishable() {
        let (_tmp, s) = service().await;
        let now = s.now();
        s.create_user_with_password(spec("alice"), "correct horse", now)
            .await
            .expect("create");
        s.create_user(spec("bob"), now)
            .await
            .expect("create without password");
        let alice: UserId = id("alice");
        s.authenticate(&alice, &pw("correct horse"))
            .await
            .expect("right password");
        let wrong = s
            .authenticate(&alice, &pw("wrong"))
            .await
            .expect_err("wrong");
        let unknown = s
            .authenticate(&id("nobody"), &pw("correct horse"))
            .await
            .expect_err("unknown");
        let none = s
            .authenticate(&id("bob"), &pw("anything"))
            .await
            .expect_err("no password");
        for e in [&wrong, &unknown, &none] {
            assert!(matches!(e, AuthError::BadCredentials), "{e:?}");
        }
        assert_eq!(wrong.to_string(), unknown.to_string());
        assert_eq!(wrong.to_string(), none.to_string());
        // Bounds: an over-long password is refused without hashing.
        let long = pw(&"x".repeat(MAX_PASSWORD_LEN + 1));
        assert!(matches!(
            s.authenticate(&alice, &long).await,
            Err(AuthError::BadCredentials)
        ));

        // Setting a password lets bob in and changes alice's.
        assert!(!s.has_password(&id("bob")).await.expect("bob"));
        s.set_password(&id("bob"), "b0b secret", now)
            .await
            .expect("set");
        assert!(s.has_password(&id("bob")).await.expect("bob"));
        s.authenticate(&id("bob"), &pw("b0b secret"))
            .await
            .expect("bob in");
        s.set_password(&alice, "a new one", now).await.expect("set");
        assert!(s.authenticate(&alice, &pw("correct horse")).await.is_err());
        s.authenticate(&alice, &pw("a new one"))
            .await
            .expect("new password");
        assert!(matches!(
            s.set_password(&id("nobody"), "long enough", now).await,
            Err(GroupError::NotFound(_))
        ));
        assert!(matches!(
            s.set_password(&alice, "", now).await,
            Err(GroupError::Invalid(_))
        ));
        // Too short: refused with the reason, the old password stays.
        let short = s
            .set_password(&alice, "1234567", now)
            .await
            .expect_err("too short");
        assert!(
            short.to_string().contains("at least 8 characters"),
            "{short}"
        );
        s.set_password(&alice, "12345678", now)
            .await
            .expect("8 characters");
        s.set_password(&alice, "a new one", now)
            .await
            .expect("set back");
        // Creating an existing user conflicts and leaves its password alone.
        assert!(matches!(
            s.create_user_with_password(spec("alice"), "another one", now)
                .await,
            Err(GroupError::Conflict(_))
        ));
        s.authenticate(&alice, &pw("a new one"))
            .await
            .expect("unchanged");
    }

    #[tokio::test]
    async fn only_assigned_users_of_live_groups_are_assigned() {
        let (_tmp, s) = service().await;
        let now = s.now();
        s.create_user(spec("alice"), now).await.expect("create");
        s.create_user(spec("bob"), now).await.expect("create");
        let g: GroupName = id("g1");
        assert!(!s.is_assigned(&g, &id("alice")).await.expect("no group"));
        let mut spec = crate::test_support::group_spec("g1");
        spec.base_resources = 1;
        spec.users = vec![id("alice")];
        spec.policy.scale_out_step = Some(1);
        spec.policy.max_elastic = Some(0);
        s.publish(spec, now).await.expect("publish");
        assert!(s.is_assigned(&g, &id("alice")).await.expect("alice"));
        assert!(!s.is_assigned(&g, &id("bob")).await.expect("bob"));
        assert!(!s
            .is_assigned(&id("g2"), &id("alice"))
            .await
            .expect("other group"));
        s.update_users(&g, vec![], vec![id("alice")], now)
            .await
            .expect("unassign");
        assert!(!s.is_assigned(&g, &id("alice")).await.expect("unassigned"));
    }

    #[tokio::test]
    async fn tokens_work_until_revoked_or_expired() {
        let (_tmp, s) = service().await;
        let now = s.now();
        s.create_user(spec("alice"), now).await.expect("create");
        s.create_user(spec("bob"), now).await.expect("create");
        let alice: UserId = id("alice");
        let (t, expires) = s
            .issue_token(&alice, Duration::from_secs(3600), now)
            .await
            .expect("token");
        assert_eq!(expires, UnixMillis(now.0 + 3_600_000));
        s.authenticate(&alice, &Credential::Token(t.clone()))
            .await
            .expect("token accepted");
        // Not bob's, not a password.
        assert!(s
            .authenticate(&id("bob"), &Credential::Token(t.clone()))
            .await
            .is_err());
        assert!(s.authenticate(&alice, &pw(&t)).await.is_err());
        // Revocation invalidates it, a new one works.
        s.revoke_tokens(&alice, now).await.expect("revoke");
        assert!(matches!(
            s.authenticate(&alice, &Credential::Token(t)).await,
            Err(AuthError::BadCredentials)
        ));
        let (t2, _) = s
            .issue_token(&alice, Duration::from_secs(3600), now)
            .await
            .expect("token");
        s.authenticate(&alice, &Credential::Token(t2))
            .await
            .expect("new token");
        // Already expired (issued far in the past).
        let (old, _) = s
            .issue_token(&alice, Duration::from_secs(1), UnixMillis(now.0 - 10_000))
            .await
            .expect("token");
        assert!(s
            .authenticate(&alice, &Credential::Token(old))
            .await
            .is_err());
        // Limits and unknown users.
        assert!(matches!(
            s.issue_token(&alice, MAX_TOKEN_TTL + Duration::from_secs(1), now)
                .await,
            Err(GroupError::Invalid(_))
        ));
        assert!(matches!(
            s.issue_token(&id("nobody"), Duration::from_secs(60), now)
                .await,
            Err(GroupError::NotFound(_))
        ));
        assert!(matches!(
            s.revoke_tokens(&id("nobody"), now).await,
            Err(GroupError::NotFound(_))
        ));
        // Without a token key, tokens are off.
        let plain = GroupService::new(s.store.clone(), Default::default());
        assert!(matches!(
            plain
                .issue_token(&alice, Duration::from_secs(60), now)
                .await,
            Err(GroupError::Invalid(_))
        ));
    }
}
