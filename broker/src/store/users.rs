//! The door to end users and their credentials: the `users` table (contact
//! details, Argon2id password hash, token generation and newest token
//! expiry) and the assignments of users to groups (`group_users`).
//!
//! Hashing, token signing and the checks of what an operator typed stay
//! with the group service (`crate::groups::service`); this module stores and
//! reads what they decided. The writes a group change makes together with
//! its own rows (assigning and unassigning users in `group publish` /
//! `group update-users` / `group purge`) are the plain functions on a
//! connection at the end, run inside that change's transaction.

use std::collections::BTreeMap;

use crate::store::sql::{args, columns, Db, OptionalExtension};
use ferry_common::admin::UserSpec;
use ferry_common::{GroupName, UnixMillis, UserId};

use super::{to_i64, Store, StoreError};

/// A user as `user list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredUser {
    pub id: UserId,
    pub email: String,
    pub mobile: String,
    /// The live (not gone) groups it is assigned to, by name.
    pub groups: Vec<GroupName>,
}

/// A user's credentials as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCredentials {
    /// Argon2id PHC string; `None`: the user cannot log in with a password.
    pub password_hash: Option<String>,
    /// Tokens issued with another generation are revoked.
    pub token_generation: u64,
}

/// The state of a user's credentials, as `user list` shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CredentialState {
    pub password_set: bool,
    pub token_generation: u64,
    /// Expiry of the newest token issued since the last revocation.
    pub token_expires_at: Option<UnixMillis>,
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn upsert_user(c: &Db, u: &UserSpec, now: UnixMillis) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO users (id, email, mobile, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)
         ON CONFLICT (id) DO UPDATE SET email = excluded.email, mobile = excluded.mobile,
                                        updated_at = excluded.updated_at",
        args![u.id.as_str(), u.email, u.mobile, now.0],
    )?;
    Ok(())
}

impl Store {
    /// Writes a user that must not exist yet, with its password hash when
    /// given, in one transaction. Answers false (and writes nothing) when the
    /// user exists.
    pub async fn create_user(
        &self,
        user: UserSpec,
        password_hash: Option<String>,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        self.exec(move |c| {
            let exists: bool = c.query_row(
                "SELECT COUNT(*) > 0 FROM users WHERE id = ?1",
                args![user.id.as_str()],
                |r| r.get(0),
            )?;
            if exists {
                return Ok(false);
            }
            upsert_user(c, &user, now)?;
            if let Some(hash) = password_hash {
                c.execute(
                    "UPDATE users SET password_hash = ?2 WHERE id = ?1",
                    args![user.id.as_str(), hash],
                )?;
            }
            Ok(true)
        })
        .await
    }

    /// `user import`: creates the users or updates their contact details
    /// (passwords and tokens are kept), all in one transaction.
    pub async fn import_users(
        &self,
        users: Vec<UserSpec>,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        self.exec(move |c| {
            for u in &users {
                upsert_user(c, u, now)?;
            }
            Ok(())
        })
        .await
    }

    /// Every user, by id, with the live groups it is assigned to.
    pub async fn list_users(&self) -> Result<Vec<StoredUser>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT u.id, u.email, u.mobile,
                        (SELECT group_concat(g.name, ' ') FROM group_users gu
                           JOIN groups g ON g.num = gu.group_num
                          WHERE gu.user = u.id AND g.status != 'gone')
                 FROM users u ORDER BY u.id",
            )?;
            let rows =
                stmt.query_map(args![], columns::<(String, String, String, Option<String>)>)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, email, mobile, groups) = row?;
                let mut groups = groups
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(|g| g.parse().map_err(corrupt))
                    .collect::<Result<Vec<GroupName>, _>>()?;
                groups.sort();
                out.push(StoredUser {
                    id: id.parse().map_err(corrupt)?,
                    email,
                    mobile,
                    groups,
                });
            }
            Ok(out)
        })
        .await
    }

    /// `user`'s password hash and token generation; `None` for an unknown user.
    pub async fn user_credentials(
        &self,
        user: &UserId,
    ) -> Result<Option<StoredCredentials>, StoreError> {
        let id = user.as_str().to_owned();
        let row = self
            .read(move |c| {
                c.query_row(
                    "SELECT password_hash, token_generation FROM users WHERE id = ?1",
                    args![id],
                    |r| Ok((r.get::<Option<String>>(0)?, r.get::<i64>(1)?)),
                )
                .optional()
            })
            .await?;
        row.map(|(password_hash, generation)| {
            Ok(StoredCredentials {
                password_hash,
                token_generation: u64::try_from(generation)
                    .map_err(|_| corrupt("negative token generation"))?,
            })
        })
        .transpose()
    }

    /// The state of every user's credentials, by user (a generation that is
    /// not a count reads as 0).
    pub async fn credential_states(&self) -> Result<BTreeMap<UserId, CredentialState>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT id, password_hash IS NOT NULL, token_generation, token_expires_at
                   FROM users",
            )?;
            let rows = stmt
                .query_map(args![], columns::<(String, bool, i64, Option<i64>)>)?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(id, password_set, generation, expires)| {
                    Ok((
                        id.parse().map_err(corrupt)?,
                        CredentialState {
                            password_set,
                            token_generation: u64::try_from(generation).unwrap_or(0),
                            token_expires_at: expires.map(UnixMillis),
                        },
                    ))
                })
                .collect()
        })
        .await
    }

    /// Replaces `user`'s password hash; false for an unknown user.
    pub async fn set_password_hash(
        &self,
        user: &UserId,
        hash: String,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        let id = user.clone();
        let n = self
            .exec(move |c| {
                c.execute(
                    "UPDATE users SET password_hash = ?2, updated_at = ?3 WHERE id = ?1",
                    args![id.as_str(), hash, now.0],
                )
            })
            .await?;
        Ok(n > 0)
    }

    /// Notes a token of `user` of `generation` valid until `expires_at`, for
    /// `user list`: the newest expiry of the current generation is kept (a
    /// token of a generation revoked meanwhile changes nothing).
    pub async fn record_token_expiry(
        &self,
        user: &UserId,
        generation: u64,
        expires_at: UnixMillis,
    ) -> Result<(), StoreError> {
        let (id, gen) = (user.to_string(), to_i64(generation, "token generation")?);
        self.exec(move |c| {
            c.execute(
                "UPDATE users SET token_expires_at = MAX(COALESCE(token_expires_at, 0), ?2)
                  WHERE id = ?1 AND token_generation = ?3",
                args![id, expires_at.0, gen],
            )?;
            Ok(())
        })
        .await
    }

    /// Bumps `user`'s token generation: every token issued so far stops
    /// working. False for an unknown user.
    pub async fn revoke_tokens(&self, user: &UserId, now: UnixMillis) -> Result<bool, StoreError> {
        let id = user.clone();
        let n = self
            .exec(move |c| {
                c.execute(
                    "UPDATE users SET token_generation = token_generation + 1, updated_at = ?2,
                                      token_expires_at = NULL
                      WHERE id = ?1",
                    args![id.as_str(), now.0],
                )
            })
            .await?;
        Ok(n > 0)
    }

    /// Whether `user` is assigned to the (not gone) group named `group`.
    pub async fn is_assigned(&self, group: &GroupName, user: &UserId) -> Result<bool, StoreError> {
        let (g, u) = (group.as_str().to_owned(), user.as_str().to_owned());
        self.read(move |c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM group_users gu
                                  JOIN groups g ON g.num = gu.group_num
                                 WHERE g.name = ?1 AND g.status != 'gone' AND gu.user = ?2)",
                args![g, u],
                |r| r.get::<bool>(0),
            )
        })
        .await
    }

    /// For each of `users`, in order, whether the broker knows it.
    pub async fn known_users(&self, users: Vec<UserId>) -> Result<Vec<bool>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached("SELECT 1 FROM users WHERE id = ?1")?;
            let mut known = Vec::with_capacity(users.len());
            for u in &users {
                known.push(
                    stmt.query_row(args![u.as_str()], |_| Ok(()))
                        .optional()?
                        .is_some(),
                );
            }
            Ok(known)
        })
        .await
    }
}

/// The users among `users` the broker does not know, in order; inside a
/// caller's transaction.
pub(crate) fn unknown(c: &Db, users: &[UserId]) -> Result<Vec<UserId>, StoreError> {
    let mut out = Vec::new();
    for u in users {
        let n: i64 = c.query_row(
            "SELECT COUNT(*) FROM users WHERE id = ?1",
            args![u.as_str()],
            |r| r.get(0),
        )?;
        if n == 0 {
            out.push(u.clone());
        }
    }
    Ok(out)
}

/// The users assigned to group `group_num`, by id; inside a caller's transaction.
pub(crate) fn assigned(c: &Db, group_num: i64) -> Result<Vec<UserId>, StoreError> {
    let mut stmt = c.prepare("SELECT user FROM group_users WHERE group_num = ?1 ORDER BY user")?;
    let rows = stmt.query_map(args![group_num], |r| r.get::<String>(0))?;
    let mut out = Vec::new();
    for r in rows {
        out.push(r?.parse().map_err(corrupt)?);
    }
    Ok(out)
}

/// How many users are assigned to group `group_num`.
pub(crate) fn assigned_count(c: &Db, group_num: i64) -> Result<u64, StoreError> {
    let users: i64 = c.query_row(
        "SELECT COUNT(*) FROM group_users WHERE group_num = ?1",
        args![group_num],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(users).unwrap_or(0))
}

/// Assigns to group `group_num` the `users` not assigned yet and queues an
/// activation notification to each (with its contact details as stored);
/// returns the newly assigned ones. Inside the group change's transaction.
pub(crate) fn assign(
    c: &Db,
    group_num: i64,
    users: &[UserId],
    now: UnixMillis,
) -> Result<Vec<UserId>, StoreError> {
    let mut added = Vec::new();
    for u in users {
        let n = c.execute(
            "INSERT OR IGNORE INTO group_users (group_num, user, assigned_at) VALUES (?1, ?2, ?3)",
            args![group_num, u.as_str(), now.0],
        )?;
        if n == 0 {
            continue;
        }
        c.execute(
            "INSERT INTO notifications (group_num, user, email, mobile, kind, created_at, next_attempt_at)
             SELECT ?1, id, email, mobile, 'activation', ?2, ?2 FROM users WHERE id = ?3",
            args![group_num, now.0, u.as_str()],
        )?;
        added.push(u.clone());
    }
    Ok(added)
}

/// Unassigns `user` from group `group_num`; inside the group change's transaction.
pub(crate) fn unassign(c: &Db, group_num: i64, user: &UserId) -> Result<(), StoreError> {
    c.execute(
        "DELETE FROM group_users WHERE group_num = ?1 AND user = ?2",
        args![group_num, user.as_str()],
    )?;
    Ok(())
}

/// Unassigns every user of group `group_num` (the group is purged or
/// deleted); inside the group change's transaction.
pub(crate) fn unassign_all(c: &Db, group_num: i64) -> Result<(), StoreError> {
    c.execute(
        "DELETE FROM group_users WHERE group_num = ?1",
        args![group_num],
    )?;
    Ok(())
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

    fn spec(u: &str, email: &str) -> UserSpec {
        UserSpec {
            id: id(u),
            email: email.into(),
            mobile: "+4912345678".into(),
        }
    }

    async fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tmp");
        let store = crate::store::testing::open_for_test(dir.path());
        (dir, store)
    }

    #[tokio::test]
    async fn users_their_assignments_and_who_is_known() {
        let (_dir, store) = open().await;
        let now = UnixMillis(1_000);
        assert!(store
            .create_user(spec("bob", "b@x"), Some("$hash".into()), now)
            .await
            .expect("bob"));
        assert!(!store
            .create_user(spec("bob", "other@x"), None, now)
            .await
            .expect("bob again"));
        // An import updates contact details and keeps the password.
        store
            .import_users(vec![spec("bob", "b2@x"), spec("alice", "a@x")], now)
            .await
            .expect("import");
        store.insert_group_for_test(1, "g1").await;
        store.insert_group_for_test(2, "g2").await;
        let added = store
            .exec(move |c| {
                let mut added = assign(c, 1, &[id("bob"), id("alice")], now)?;
                added.extend(assign(c, 1, &[id("bob")], now)?);
                added.extend(assign(c, 2, &[id("bob")], now)?);
                c.execute("UPDATE groups SET status = 'gone' WHERE num = 2", args![])?;
                Ok(added)
            })
            .await
            .expect("assign");
        assert_eq!(added, [id("bob"), id("alice"), id("bob")]);
        let users = store.list_users().await.expect("list");
        assert_eq!(
            users
                .iter()
                .map(|u| (u.id.as_str(), u.email.as_str(), u.groups.clone()))
                .collect::<Vec<_>>(),
            [
                ("alice", "a@x", vec![id("g1")]),
                ("bob", "b2@x", vec![id("g1")])
            ]
        );
        assert!(store.is_assigned(&id("g1"), &id("bob")).await.expect("g1"));
        assert!(!store
            .is_assigned(&id("g2"), &id("bob"))
            .await
            .expect("gone"));
        let creds = store.credential_states().await.expect("states");
        assert!(creds[&id::<UserId>("bob")].password_set);
        assert!(!creds[&id::<UserId>("alice")].password_set);
        assert_eq!(
            store
                .known_users(vec![id("carol"), id("bob"), id("alice")])
                .await
                .expect("known"),
            [false, true, true]
        );
        let (unknown, assigned_before, count) = store
            .exec(|c| {
                let unknown = unknown(c, &[id("carol"), id("bob"), id("dave")])?;
                let before = assigned(c, 1)?;
                unassign(c, 1, &id("alice"))?;
                let count = assigned_count(c, 1)?;
                unassign_all(c, 1)?;
                Ok((unknown, before, count))
            })
            .await
            .expect("assignments");
        assert_eq!(unknown, [id("carol"), id("dave")]);
        assert_eq!(assigned_before, [id("alice"), id("bob")]);
        assert_eq!(count, 1);
        assert!(!store.is_assigned(&id("g1"), &id("bob")).await.expect("g1"));
        store.close().await;
    }

    #[tokio::test]
    async fn token_expiry_is_kept_for_the_current_generation_only() {
        let (_dir, store) = open().await;
        let now = UnixMillis(1_000);
        let bob: UserId = id("bob");
        assert!(store.user_credentials(&bob).await.expect("none").is_none());
        assert!(!store.revoke_tokens(&bob, now).await.expect("unknown"));
        assert!(!store
            .set_password_hash(&bob, "$h".into(), now)
            .await
            .expect("unknown"));
        store
            .create_user(spec("bob", "b@x"), None, now)
            .await
            .expect("bob");
        let state = |s: &BTreeMap<UserId, CredentialState>| s[&id::<UserId>("bob")];
        store
            .record_token_expiry(&bob, 0, UnixMillis(5_000))
            .await
            .expect("token");
        store
            .record_token_expiry(&bob, 0, UnixMillis(3_000))
            .await
            .expect("older token");
        assert_eq!(
            state(&store.credential_states().await.expect("states")),
            CredentialState {
                password_set: false,
                token_generation: 0,
                token_expires_at: Some(UnixMillis(5_000)),
            }
        );
        assert!(store.revoke_tokens(&bob, now).await.expect("revoke"));
        // A token of the revoked generation changes nothing.
        store
            .record_token_expiry(&bob, 0, UnixMillis(9_000))
            .await
            .expect("stale token");
        assert!(store
            .set_password_hash(&bob, "$h".into(), now)
            .await
            .expect("set"));
        assert_eq!(
            store.user_credentials(&bob).await.expect("bob"),
            Some(StoredCredentials {
                password_hash: Some("$h".into()),
                token_generation: 1,
            })
        );
        assert_eq!(
            state(&store.credential_states().await.expect("states")),
            CredentialState {
                password_set: true,
                token_generation: 1,
                token_expires_at: None,
            }
        );
        store.close().await;
    }
}
