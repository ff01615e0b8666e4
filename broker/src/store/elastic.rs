//! The door to elastic and provisioned base resources and their enrollment
//! tokens: the `elastic_resources` record a restarted broker rebuilds its
//! engine from (migration 6), and `enroll_tokens`, the one-time tokens a
//! created host enrolls with, stored only as their SHA-256.
//!
//! What to create, delete and retry is decided by the group's actor
//! (`crate::groups::actor::elastic`) and the enrollment service
//! (`crate::enroll`); this module records it. The record changes the
//! actor's decisions make are written with its next commit, by
//! [`write_ops`] inside that transaction.

use crate::store::sql::{args, columns, Db, OptionalExtension};
use ferry_common::{GroupName, ResourceId, UnixMillis};

use super::{Store, StoreError};
use crate::engine::{RestoredElastic, RestoredState};

/// A state an elastic or provisioned base resource moves to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElasticState {
    /// Its agent registered: billing starts.
    Ready,
    /// Scale-in decided: no session is placed on it any more.
    Releasing,
    /// Billing stopped.
    Released,
    /// Its creation failed (never billed).
    Failed,
}

impl ElasticState {
    /// As stored in `elastic_resources.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            ElasticState::Ready => "ready",
            ElasticState::Releasing => "releasing",
            ElasticState::Released => "released",
            ElasticState::Failed => "failed",
        }
    }

    /// The column stamped (once) when the state is reached.
    fn stamp_column(self) -> &'static str {
        match self {
            ElasticState::Ready => "ready_at",
            ElasticState::Releasing => "releasing_at",
            ElasticState::Released | ElasticState::Failed => "released_at",
        }
    }
}

/// A change of the durable record, written by [`write_ops`] with the actor's
/// next commit.
#[derive(Clone, Debug)]
pub enum ElasticOp {
    /// Scale-out: `engine_id` (`e<n>`) is to be created as `resource`.
    Pending {
        engine_id: ResourceId,
        resource: ResourceId,
        at: UnixMillis,
    },
    /// `engine_id` reached `state` at `at`.
    State {
        engine_id: ResourceId,
        state: ElasticState,
        at: UnixMillis,
    },
}

/// One base resource of a group whose base is created through the
/// provisioner, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseRecord {
    /// `b<n>`.
    pub engine_id: ResourceId,
    /// `<group>-b<n>`.
    pub resource: ResourceId,
    /// `pending`, `ready`, `released` or `failed`.
    pub state: String,
    pub requested_at: UnixMillis,
    /// The provisioner's create succeeded (it is not created again).
    pub created: bool,
}

/// A resource of a group that went away, not deleted yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetireRecord {
    pub group_num: i64,
    pub group: GroupName,
    pub resource: ResourceId,
    /// `pending`, `ready` or `releasing`.
    pub state: String,
}

/// An enrollment token as stored (found by its hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollTokenRecord {
    pub group_num: i64,
    /// The resource it enrolls, as stored (the caller checks it is an id).
    pub resource: String,
    pub expires_at: UnixMillis,
    pub used_at: Option<UnixMillis>,
}

fn insert_pending(
    c: &Db,
    num: i64,
    engine_id: &str,
    resource: &str,
    at: UnixMillis,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO elastic_resources
             (group_num, engine_id, resource, state, requested_at)
         VALUES (?1, ?2, ?3, 'pending', ?4)
         ON CONFLICT (group_num, engine_id) DO UPDATE SET
             resource = excluded.resource, state = 'pending',
             requested_at = excluded.requested_at, ready_at = NULL, releasing_at = NULL,
             released_at = NULL, deleted_at = NULL, created_at = NULL",
        args![num, engine_id, resource, at.0],
    )?;
    // A new machine takes this name: keys of an earlier one (a retired
    // resource of an earlier group of the same name) are refused from now,
    // before the new machine enrolls. Certificates carry the system clock's
    // time, so the floor does too.
    let now = crate::clock::now_millis();
    super::revocations::raise_floor(
        c,
        resource,
        now,
        now,
        "the name is given to a new machine",
        false,
    )
}

/// Applies the record changes of group `num` in the actor's commit transaction.
pub(crate) fn write_ops(c: &Db, num: i64, ops: &[ElasticOp]) -> Result<(), StoreError> {
    for op in ops {
        match op {
            ElasticOp::Pending {
                engine_id,
                resource,
                at,
            } => insert_pending(c, num, engine_id.as_str(), resource.as_str(), *at)?,
            ElasticOp::State {
                engine_id,
                state,
                at,
            } => {
                let column = state.stamp_column();
                c.execute(
                    &format!(
                        "UPDATE elastic_resources SET state = ?3, {column} = COALESCE({column}, ?4)
                         WHERE group_num = ?1 AND engine_id = ?2"
                    ),
                    args![num, engine_id.as_str(), state.as_str(), at.0],
                )?;
            }
        }
    }
    Ok(())
}

/// The elastic resources of group `num` alive in the store (pending, ready,
/// releasing) with their real ids, and the next number to give; inside the
/// caller's read or transaction.
pub(crate) fn load(
    c: &Db,
    num: i64,
) -> Result<(Vec<(RestoredElastic, ResourceId)>, u32), StoreError> {
    let mut stmt = c.prepare(
        "SELECT engine_id, resource, state, requested_at, ready_at, releasing_at
         FROM elastic_resources WHERE group_num = ?1 AND engine_id LIKE 'e%'
         ORDER BY requested_at, rowid",
    )?;
    let rows = stmt
        .query_map(
            args![num],
            columns::<(String, String, String, i64, Option<i64>, Option<i64>)>,
        )?
        .collect::<Result<Vec<_>, _>>()?;
    let corrupt = |what: String| StoreError::Corrupt(what);
    let mut next = 1u32;
    let mut alive = Vec::new();
    for (engine_id, resource, state, requested_at, ready_at, releasing_at) in rows {
        let n = engine_id
            .strip_prefix('e')
            .and_then(|d| d.parse::<u32>().ok())
            .ok_or_else(|| corrupt(format!("elastic engine id {engine_id:?}")))?;
        next = next.max(n.saturating_add(1));
        let state = match (state.as_str(), ready_at, releasing_at) {
            ("pending", _, _) => RestoredState::Pending,
            ("ready", Some(r), _) => RestoredState::Ready {
                ready_at: UnixMillis(r),
            },
            ("releasing", Some(r), Some(s)) => RestoredState::Releasing {
                ready_at: UnixMillis(r),
                releasing_at: UnixMillis(s),
            },
            ("released" | "failed", _, _) => continue,
            (other, _, _) => return Err(corrupt(format!("elastic resource state {other:?}"))),
        };
        let id = ResourceId::new(engine_id.as_str()).map_err(|e| corrupt(e.to_string()))?;
        let real = ResourceId::new(resource.as_str()).map_err(|e| corrupt(e.to_string()))?;
        alive.push((
            RestoredElastic {
                id,
                state,
                requested_at: UnixMillis(requested_at),
            },
            real,
        ));
    }
    Ok((alive, next))
}

impl Store {
    /// The provisioned base resources of group `num` not deleted yet, by engine id.
    pub async fn provisioned_base(&self, num: i64) -> Result<Vec<BaseRecord>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare(
                "SELECT engine_id, resource, state, requested_at, created_at IS NOT NULL
                 FROM elastic_resources
                 WHERE group_num = ?1 AND engine_id LIKE 'b%' AND deleted_at IS NULL
                 ORDER BY engine_id",
            )?;
            let rows = stmt
                .query_map(args![num], columns::<(String, String, String, i64, bool)>)?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(e, r, state, requested_at, created)| {
                    let corrupt = |e: ferry_common::IdError| StoreError::Corrupt(e.to_string());
                    Ok(BaseRecord {
                        engine_id: ResourceId::new(e.as_str()).map_err(corrupt)?,
                        resource: ResourceId::new(r.as_str()).map_err(corrupt)?,
                        state,
                        requested_at: UnixMillis(requested_at),
                        created,
                    })
                })
                .collect()
        })
        .await
    }

    /// Records base resource `engine_id` (`b<n>`) of group `num`, to be
    /// created as `resource`, as `pending` since `at`.
    pub async fn record_pending_base(
        &self,
        num: i64,
        engine_id: &ResourceId,
        resource: &ResourceId,
        at: UnixMillis,
    ) -> Result<(), StoreError> {
        let (e, r) = (engine_id.to_string(), resource.to_string());
        self.exec(move |c| insert_pending(c, num, &e, &r, at)).await
    }

    /// The elastic resources of group `num` released or failed whose delete
    /// is not recorded (`deleted_at`), oldest first: the provisioner deletes
    /// them after the release, so these are deletes an owner of the group
    /// started and did not see through (it died or lost the group
    /// meanwhile), or gave up on.
    pub async fn elastic_undeleted(&self, num: i64) -> Result<Vec<ResourceId>, StoreError> {
        let rows = self
            .read(move |c| {
                let mut stmt = c.prepare(
                    "SELECT resource FROM elastic_resources
                     WHERE group_num = ?1 AND engine_id LIKE 'e%'
                         AND state IN ('released', 'failed') AND deleted_at IS NULL
                     ORDER BY requested_at, rowid",
                )?;
                let rows = stmt
                    .query_map(args![num], columns::<String>)?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        rows.into_iter()
            .map(|r| ResourceId::new(r.as_str()).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect()
    }

    /// The resources not deleted yet (pending, ready, releasing) of the
    /// groups that went away (recycling, gone, publish-failed) named `group`
    /// (a name or an id), or of every such group when `None`; by group, then
    /// in request order. A resource whose id a live group's record uses
    /// again is left out.
    pub async fn elastic_to_retire(
        &self,
        group: Option<String>,
    ) -> Result<Vec<RetireRecord>, StoreError> {
        let rows = self
            .read(move |c| {
                let mut stmt = c.prepare(
                    "SELECT e.group_num, g.name, e.resource, e.state
                     FROM elastic_resources e JOIN groups g ON g.num = e.group_num
                     WHERE g.status IN ('gone', 'publish-failed', 'recycling')
                         AND (CAST(?1 AS TEXT) IS NULL OR g.id = ?1 OR g.name = ?1)
                         AND e.deleted_at IS NULL
                         AND e.state IN ('pending', 'ready', 'releasing')
                         AND NOT EXISTS (
                             SELECT 1 FROM elastic_resources o JOIN groups og ON og.num = o.group_num
                             WHERE o.resource = e.resource AND o.group_num != e.group_num
                                 AND o.deleted_at IS NULL
                                 AND og.status NOT IN ('gone', 'publish-failed', 'recycling'))
                     ORDER BY e.group_num, e.requested_at, e.rowid",
                )?;
                let rows = stmt
                    .query_map(args![group], columns::<(i64, String, String, String)>)?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        let corrupt = StoreError::Corrupt;
        rows.into_iter()
            .map(|(group_num, name, resource, state)| {
                Ok(RetireRecord {
                    group_num,
                    group: name
                        .parse()
                        .map_err(|e| corrupt(format!("group name {name:?}: {e}")))?,
                    resource: ResourceId::new(resource.as_str())
                        .map_err(|e| corrupt(e.to_string()))?,
                    state,
                })
            })
            .collect()
    }

    /// The provisioner created `resource` of group `num` at `at` (kept: a
    /// restart does not create it again).
    pub async fn record_elastic_created(
        &self,
        num: i64,
        resource: &ResourceId,
        at: UnixMillis,
    ) -> Result<(), StoreError> {
        let key = resource.to_string();
        self.exec(move |c| {
            c.execute(
                "UPDATE elastic_resources SET created_at = COALESCE(created_at, ?3)
                 WHERE group_num = ?1 AND resource = ?2 AND deleted_at IS NULL",
                args![num, key, at.0],
            )?;
            Ok(())
        })
        .await
    }

    /// The provisioner deleted `resource` of group `num` at `at`. With
    /// `retired` (its group went away) a pending one is recorded failed and
    /// a ready or releasing one released too.
    pub async fn record_elastic_deleted(
        &self,
        num: i64,
        resource: &ResourceId,
        at: UnixMillis,
        retired: bool,
    ) -> Result<(), StoreError> {
        let key = resource.to_string();
        self.exec(move |c| {
            c.execute(
                "UPDATE elastic_resources SET deleted_at = ?3,
                     state = CASE WHEN NOT ?4 THEN state
                         WHEN state = 'pending' THEN 'failed'
                         WHEN state IN ('ready', 'releasing') THEN 'released'
                         ELSE state END,
                     released_at = CASE WHEN ?4 THEN COALESCE(released_at, ?3)
                         ELSE released_at END
                 WHERE group_num = ?1 AND resource = ?2 AND deleted_at IS NULL",
                args![num, key, at.0, retired],
            )?;
            Ok(())
        })
        .await
    }

    /// Appends an event of group `num` written by a provisioning task.
    pub async fn record_provisioning_event(
        &self,
        num: i64,
        at: UnixMillis,
        kind: &'static str,
        message: String,
    ) -> Result<(), StoreError> {
        self.exec(move |c| super::groups::event(c, num, at, kind, &message))
            .await
    }

    /// Records the enrollment token of hash `token_hash` for `resource` of
    /// group `num`, made at `now` and valid until `expires_at`, and answers
    /// the group's image (what to create the resource with), in one
    /// transaction.
    pub async fn record_enroll_token(
        &self,
        num: i64,
        resource: &ResourceId,
        token_hash: String,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<String, StoreError> {
        let resource = resource.to_string();
        self.exec(move |c| {
            c.execute(
                "INSERT INTO enroll_tokens (token_hash, group_num, resource, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                args![token_hash, num, resource, now.0, expires_at.0],
            )?;
            let image: String = c.query_row(
                "SELECT image FROM groups WHERE num = ?1",
                args![num],
                |row| row.get(0),
            )?;
            Ok(image)
        })
        .await
    }

    /// The enrollment token of hash `token_hash`, if there is one.
    pub async fn enroll_token(
        &self,
        token_hash: String,
    ) -> Result<Option<EnrollTokenRecord>, StoreError> {
        self.read(move |c| {
            c.query_row(
                "SELECT group_num, resource, expires_at, used_at FROM enroll_tokens
                 WHERE token_hash = ?1",
                args![token_hash],
                |r| {
                    Ok(EnrollTokenRecord {
                        group_num: r.get(0)?,
                        resource: r.get(1)?,
                        expires_at: UnixMillis(r.get(2)?),
                        used_at: r.get::<Option<i64>>(3)?.map(UnixMillis),
                    })
                },
            )
            .optional()
        })
        .await
    }

    /// Marks the token of hash `token_hash` used at `now` if it is still
    /// unused and unexpired, and then writes the `enrolled` event `message`
    /// of group `num` and raises the certificate floor of the token's
    /// resource to `issued` (the new certificate's issue time: every earlier
    /// certificate of that name is refused), in one transaction. False: the
    /// token was used meanwhile (or expired).
    pub async fn use_enroll_token(
        &self,
        token_hash: String,
        num: i64,
        now: UnixMillis,
        issued: UnixMillis,
        message: String,
    ) -> Result<bool, StoreError> {
        self.exec(move |c| {
            let n = c.execute(
                "UPDATE enroll_tokens SET used_at = ?2
                 WHERE token_hash = ?1 AND used_at IS NULL AND expires_at > ?2",
                args![token_hash, now.0],
            )?;
            if n == 1 {
                super::groups::event(c, num, now, "enrolled", &message)?;
                let resource: String = c.query_row(
                    "SELECT resource FROM enroll_tokens WHERE token_hash = ?1",
                    args![&token_hash],
                    |r| r.get(0),
                )?;
                super::revocations::raise_floor(
                    c,
                    &resource,
                    issued,
                    now,
                    "enrolled anew with a one-time token",
                    false,
                )?;
            }
            Ok(n == 1)
        })
        .await
    }
}

/// Test fixtures of the rows this door reads that other doors write.
impl Store {
    /// The elastic resources of group `num` a restarted actor takes back
    /// (pending, ready, releasing), and the number of its next elastic id.
    pub async fn elastic_of(
        &self,
        num: i64,
    ) -> Result<(Vec<(RestoredElastic, ResourceId)>, u32), StoreError> {
        self.read_with(move |c| load(c, num)).await
    }
}

#[cfg(test)]
impl Store {
    /// An active pay-as-you-go group `name` of number `num` (id `dg-<num>`, image `img`).
    /// (resource, kind, ready_at, released_at) of every billing interval, in
    /// id order.
    pub(crate) async fn intervals_for_test(&self) -> Vec<(String, String, i64, Option<i64>)> {
        self.read_with(|c| {
            let mut stmt = c.prepare(
                "SELECT resource, kind, ready_at, released_at FROM resource_intervals ORDER BY id",
            )?;
            let rows = stmt.query_map(args![], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
            rows.collect::<Result<Vec<_>, _>>()
        })
        .await
        .expect("intervals")
    }

    /// The host facts an agent's registration in group `g1` would have
    /// stored.
    pub(crate) async fn register_host_for_test(&self, resource: &str, vcpus: i64, memory_gib: i64) {
        let resource = resource.to_owned();
        self.exec(move |c| {
            c.execute(
                "INSERT INTO resources (resource, grp, agent_version, image_version,
                     hostname, os, kernel, vcpus, memory_bytes, first_seen, last_seen)
                 VALUES (?1, 'g1', '0', 'img', ?1, 'Debian', '6.1', ?2, ?3, 0, 0)
                 ON CONFLICT (resource) DO UPDATE SET
                     vcpus = excluded.vcpus, memory_bytes = excluded.memory_bytes",
                args![resource, vcpus, memory_gib << 30],
            )?;
            Ok(())
        })
        .await
        .expect("register host");
    }

    pub(crate) async fn insert_group_for_test(&self, num: i64, name: &str) {
        let name = name.to_owned();
        self.exec(move |c| {
            c.execute(
                "INSERT INTO groups (num, id, name, region, office_network, spec, image, billing,
                     base_resources, session_type, policy, status, created_at, updated_at)
                 VALUES (?1, ?3, ?2, 'r', 'n', 'office-4c8g', 'img', 'pay-as-you-go', 0,
                     'independent', '{}', 'active', 0, 0)",
                args![num, name, format!("dg-{num}")],
            )?;
            Ok(())
        })
        .await
        .expect("insert a group");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rid(s: &str) -> ResourceId {
        s.parse().expect("id")
    }

    #[tokio::test]
    async fn a_name_given_to_a_new_machine_refuses_the_keys_of_an_earlier_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = crate::store::testing::open_for_test(dir.path());
        store.insert_group_for_test(1, "g").await;
        let before = crate::clock::now_millis();
        let ops = vec![ElasticOp::Pending {
            engine_id: rid("e1"),
            resource: rid("g-e1"),
            at: UnixMillis(10),
        }];
        store
            .exec(move |c| write_ops(c, 1, &ops))
            .await
            .expect("write");
        // From the request on, before the new machine enrolls: a
        // certificate issued earlier (an old machine's) is refused.
        let floor = store
            .revoked_before(&rid("g-e1"))
            .await
            .expect("read")
            .expect("a floor");
        assert!(floor.0 >= before.0, "{floor:?} < {before:?}");
        // Not an operator's revocation: not listed as one.
        assert!(store.revocations().await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn record_changes_restore_the_alive_elastic_resources_and_the_next_number() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = crate::store::testing::open_for_test(dir.path());
        store.insert_group_for_test(1, "g").await;
        let ops = vec![
            ElasticOp::Pending {
                engine_id: rid("e1"),
                resource: rid("g-e1"),
                at: UnixMillis(10),
            },
            ElasticOp::Pending {
                engine_id: rid("e2"),
                resource: rid("g-e2"),
                at: UnixMillis(20),
            },
            ElasticOp::Pending {
                engine_id: rid("e3"),
                resource: rid("g-e3"),
                at: UnixMillis(30),
            },
            ElasticOp::State {
                engine_id: rid("e1"),
                state: ElasticState::Ready,
                at: UnixMillis(40),
            },
            ElasticOp::State {
                engine_id: rid("e1"),
                state: ElasticState::Releasing,
                at: UnixMillis(50),
            },
            // The first stamp stays.
            ElasticOp::State {
                engine_id: rid("e1"),
                state: ElasticState::Ready,
                at: UnixMillis(60),
            },
            ElasticOp::State {
                engine_id: rid("e1"),
                state: ElasticState::Releasing,
                at: UnixMillis(70),
            },
            ElasticOp::State {
                engine_id: rid("e3"),
                state: ElasticState::Failed,
                at: UnixMillis(80),
            },
        ];
        store
            .exec(move |c| write_ops(c, 1, &ops))
            .await
            .expect("write");
        let (alive, next) = store.read_with(|c| load(c, 1)).await.expect("load");
        assert_eq!(next, 4);
        let got: Vec<(String, RestoredState, String)> = alive
            .into_iter()
            .map(|(r, real)| (r.id.to_string(), r.state, real.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "e1".into(),
                    RestoredState::Releasing {
                        ready_at: UnixMillis(40),
                        releasing_at: UnixMillis(50)
                    },
                    "g-e1".into()
                ),
                ("e2".into(), RestoredState::Pending, "g-e2".into()),
            ]
        );
        // The failed one is not restored but still to delete, until its
        // delete is recorded; so is one released.
        assert_eq!(
            store.elastic_undeleted(1).await.expect("undeleted"),
            [rid("g-e3")]
        );
        let ops = vec![ElasticOp::State {
            engine_id: rid("e1"),
            state: ElasticState::Released,
            at: UnixMillis(90),
        }];
        store
            .exec(move |c| write_ops(c, 1, &ops))
            .await
            .expect("write");
        assert_eq!(
            store.elastic_undeleted(1).await.expect("undeleted"),
            [rid("g-e1"), rid("g-e3")]
        );
        store
            .record_elastic_deleted(1, &rid("g-e3"), UnixMillis(95), false)
            .await
            .expect("deleted");
        assert_eq!(
            store.elastic_undeleted(1).await.expect("undeleted"),
            [rid("g-e1")]
        );
        store.close().await;
    }

    #[tokio::test]
    async fn base_records_and_retired_groups_resources() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = crate::store::testing::open_for_test(dir.path());
        store.insert_group_for_test(1, "g").await;
        store
            .record_pending_base(1, &rid("b1"), &rid("g-b1"), UnixMillis(5))
            .await
            .expect("b1");
        store
            .record_pending_base(1, &rid("b2"), &rid("g-b2"), UnixMillis(6))
            .await
            .expect("b2");
        store
            .record_elastic_created(1, &rid("g-b1"), UnixMillis(7))
            .await
            .expect("created");
        let base = store.provisioned_base(1).await.expect("base");
        assert_eq!(
            base.iter()
                .map(|b| (b.engine_id.to_string(), b.state.as_str(), b.created))
                .collect::<Vec<_>>(),
            [
                ("b1".into(), "pending", true),
                ("b2".into(), "pending", false)
            ]
        );
        // A live group's resources are not retired.
        assert!(store
            .elastic_to_retire(None)
            .await
            .expect("none")
            .is_empty());
        store
            .exec(|c| {
                c.execute("UPDATE groups SET status = 'gone' WHERE num = 1", args![])?;
                Ok(())
            })
            .await
            .expect("gone");
        let retire = store
            .elastic_to_retire(Some("g".into()))
            .await
            .expect("retire");
        assert_eq!(
            retire
                .iter()
                .map(|r| (r.group.as_str(), r.resource.as_str()))
                .collect::<Vec<_>>(),
            [("g", "g-b1"), ("g", "g-b2")]
        );
        store
            .record_elastic_deleted(1, &rid("g-b1"), UnixMillis(9), true)
            .await
            .expect("deleted");
        let left = store.elastic_to_retire(None).await.expect("retire");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].resource, rid("g-b2"));
        // Deleted base resources are no longer listed.
        assert_eq!(store.provisioned_base(1).await.expect("base").len(), 1);
        store.close().await;
    }
}
