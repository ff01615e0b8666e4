//! The door to what a group's live state records: its actor's decisions
//! and events, metering intervals, the policy versions its agents applied,
//! expiry disconnects not yet confirmed, retained sessions, and the reads an
//! actor starts from (which groups are live, what an earlier run left).

use crate::store::sql::{args, columns, Db, OptionalExtension};
use ferry_common::{ResourceId, SessionId, UnixMillis, UserId};

use super::elastic::{write_ops as write_elastic, ElasticOp};
use super::groups::event;
use super::sessions::end_session_by_broker;
use super::{parse_id, to_u64, GroupRecord, GroupsTx, Store, StoreError};

/// An expiry disconnect not confirmed yet, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDisconnect {
    pub resource: ResourceId,
    pub session: SessionId,
    pub attempts: u32,
    pub first_at: UnixMillis,
    /// `None`: an attempt was in flight when it was written.
    pub due_at: Option<UnixMillis>,
}

/// A change of the pending expiry disconnects.
#[derive(Clone, Debug)]
pub enum DisconnectOp {
    Upsert(StoredDisconnect),
    Delete(ResourceId, SessionId),
}

/// A retained (disconnected) session, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRetention {
    pub session: SessionId,
    /// The real resource it is on.
    pub resource: ResourceId,
    /// When its user disconnected.
    pub since: UnixMillis,
    /// When it ends; `None` = kept for ever.
    pub deadline: Option<UnixMillis>,
    /// Its session is still recorded open (one that ended meanwhile is not
    /// retained any more).
    pub open: bool,
}

/// A change of the retained sessions.
#[derive(Clone, Debug)]
pub enum RetainOp {
    Upsert(StoredRetention),
    Delete(SessionId),
}

/// A slot reserved by a ticket whose client has not arrived, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredReservation {
    pub session: SessionId,
    /// The real resource the slot is on.
    pub resource: ResourceId,
    pub user: UserId,
    /// When its ticket expires.
    pub expires_at: UnixMillis,
}

/// A change of the reservations.
#[derive(Clone, Debug)]
pub enum ReservationOp {
    Upsert(StoredReservation),
    Delete(SessionId),
}

/// A host of a group with a session recorded open, and when the broker
/// last heard from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenOnHost {
    pub resource: ResourceId,
    pub last_seen: UnixMillis,
    pub session: SessionId,
}

/// A change of the metering record of one resource.
#[derive(Clone, Debug)]
pub enum IntervalOp {
    /// It became ready: billing starts. `class` is `base` or `elastic`.
    Open {
        resource: ResourceId,
        class: &'static str,
        at: UnixMillis,
    },
    /// It was released: billing stops.
    Close {
        resource: ResourceId,
        at: UnixMillis,
    },
}

/// A session the broker ends itself (its retention ran out, its host stayed
/// away).
#[derive(Clone, Debug)]
pub struct BrokerEnd {
    pub resource: ResourceId,
    pub session: SessionId,
    pub at: UnixMillis,
    pub reason: String,
}

/// Everything one turn of a group's actor records, written in one
/// transaction: its decisions and events, metering intervals, elastic
/// resources, pending disconnects, retained sessions and the sessions it
/// ended.
#[derive(Debug, Default)]
pub struct GroupCommit {
    /// Events: (at, kind, message).
    pub notes: Vec<(UnixMillis, &'static str, String)>,
    pub intervals: Vec<IntervalOp>,
    pub elastic: Vec<ElasticOp>,
    pub disconnects: Vec<DisconnectOp>,
    pub retained: Vec<RetainOp>,
    pub reservations: Vec<ReservationOp>,
    pub ends: Vec<BrokerEnd>,
}

impl GroupCommit {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.notes.is_empty()
            && self.intervals.is_empty()
            && self.elastic.is_empty()
            && self.disconnects.is_empty()
            && self.reservations.is_empty()
            && self.retained.is_empty()
            && self.ends.is_empty()
    }
}

/// What a push of a policy version to a resource may still do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyPushState {
    /// The group's policy version and status; `None` when the group is gone.
    pub group: Option<(u64, String)>,
    /// The group the resource's agent named at its last registration.
    pub resource_group: Option<String>,
    /// The newest version the resource acknowledged for the group.
    pub applied: Option<u64>,
}

/// A policy push's outcome on one resource.
#[derive(Clone, Debug)]
pub struct PolicyOutcome {
    /// The version pushed.
    pub version: u64,
    /// The agent applied it.
    pub applied: bool,
    pub at: UnixMillis,
    /// The event recorded: `policy-applied` or `policy-failed`.
    pub kind: &'static str,
    pub message: String,
}

impl Store {
    /// Writes one turn of group `num`'s actor in one transaction; `billing`
    /// (`subscription` or `pay-as-you-go`) goes on each interval opened.
    pub async fn commit_group(
        &self,
        num: i64,
        billing: String,
        commit: GroupCommit,
    ) -> Result<(), StoreError> {
        self.exec_fenced(num, move |c| {
            for (at, kind, message) in &commit.notes {
                event(c, num, *at, kind, message)?;
            }
            for op in &commit.intervals {
                match op {
                    // OR IGNORE: a base resource re-joining after a broker
                    // restart keeps the interval it already has open.
                    IntervalOp::Open {
                        resource,
                        class,
                        at,
                    } => c.execute(
                        "INSERT OR IGNORE INTO resource_intervals
                                 (group_num, resource, kind, billing, ready_at)
                             VALUES (?1, ?2, ?3, ?4, ?5)",
                        args![num, resource.as_str(), class, billing, at.0],
                    )?,
                    IntervalOp::Close { resource, at } => c.execute(
                        "UPDATE resource_intervals SET released_at = MAX(ready_at, ?3)
                             WHERE group_num = ?1 AND resource = ?2 AND released_at IS NULL",
                        args![num, resource.as_str(), at.0],
                    )?,
                };
            }
            write_elastic(c, num, &commit.elastic)?;
            write_disconnects(c, num, &commit.disconnects)?;
            write_retained(c, num, &commit.retained)?;
            write_reservations(c, num, &commit.reservations)?;
            for e in &commit.ends {
                end_session_by_broker(c, &e.resource, &e.session, e.at, &e.reason)?;
            }
            Ok(())
        })
        .await
    }

    /// The live (not gone) group named `group` (a name or an id).
    pub async fn live_group(&self, group: &str) -> Result<Option<GroupRecord>, StoreError> {
        let group = group.to_owned();
        self.group_read(move |tx: &GroupsTx<'_>| tx.live(&group))
            .await
    }

    /// The names of the groups that are not gone, in publish order.
    pub async fn live_group_names(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .group_statuses()
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// (name, status) of every group that is not gone, in publish order.
    pub async fn group_statuses(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read_with(|c| {
            let mut stmt =
                c.prepare("SELECT name, status FROM groups WHERE status != 'gone' ORDER BY num")?;
            let rows =
                stmt.query_map(args![], |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)))?;
            rows.collect::<Result<Vec<_>, _>>()
        })
        .await
    }

    /// Every name a group named `key` (a name or an id) had, without
    /// repeats.
    pub async fn group_names_of(&self, key: &str) -> Result<Vec<String>, StoreError> {
        let key = key.to_owned();
        self.read_with(move |c| {
            let mut stmt =
                c.prepare("SELECT DISTINCT name FROM groups WHERE id = ?1 OR name = ?1")?;
            let rows = stmt.query_map(args![&key], |r| r.get::<String>(0))?;
            rows.collect::<Result<Vec<_>, _>>()
        })
        .await
    }

    /// Stops the metering of the groups named `key` (a name or an id) that
    /// went away (gone, publish failed, recycling): every open interval ends
    /// when the group went, or when recycling began (expiry plus
    /// `retention_ms`), else `now`. Idempotent: only open intervals are
    /// touched; a recycling group records how many it released.
    pub async fn stop_group_metering(
        &self,
        key: &str,
        retention_ms: i64,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.exec(move |c| {
            let mut stmt = c.prepare(
                "SELECT num, status, COALESCE(gone_at,
                        CASE WHEN status = 'recycling' THEN expired_at + ?2 END, ?3)
                 FROM groups WHERE (id = ?1 OR name = ?1)
                     AND status IN ('gone', 'publish-failed', 'recycling')",
            )?;
            let ended = stmt
                .query_map(
                    args![key, retention_ms, now.0],
                    columns::<(i64, String, i64)>,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            for (num, status, at) in ended {
                let n = c.execute(
                    "UPDATE resource_intervals SET released_at = MAX(ready_at, ?2)
                     WHERE released_at IS NULL AND group_num = ?1",
                    args![num, at],
                )?;
                if n > 0 && status == "recycling" {
                    event(
                        c,
                        num,
                        UnixMillis(at),
                        "released",
                        &format!(
                            "{n} resource(s) released: the group is recycling, its live state \
                             is stopped"
                        ),
                    )?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Ends, at `now`, the open elastic intervals of group `num` that have
    /// no live record (a broker from before elastic resources were
    /// recorded), with an event; returns how many.
    pub async fn end_unrecorded_elastic_intervals(
        &self,
        num: i64,
        now: UnixMillis,
    ) -> Result<u64, StoreError> {
        self.exec_fenced(num, move |c| {
            let n = c.execute(
                "UPDATE resource_intervals SET released_at = MAX(ready_at, ?2)
                 WHERE group_num = ?1 AND kind = 'elastic' AND released_at IS NULL
                     AND resource NOT IN (SELECT resource FROM elastic_resources
                         WHERE group_num = ?1 AND state IN ('ready', 'releasing'))",
                args![num, now.0],
            )?;
            if n > 0 {
                event(
                    c,
                    num,
                    now,
                    "released",
                    &format!(
                        "{n} elastic resource(s) of an earlier broker run released at its \
                         start: they had no durable record"
                    ),
                )?;
            }
            Ok(n)
        })
        .await
    }

    /// Records one event of group `num` (by its owner).
    pub async fn group_event(
        &self,
        num: i64,
        at: UnixMillis,
        kind: &'static str,
        message: String,
    ) -> Result<(), StoreError> {
        self.exec_fenced(num, move |c| event(c, num, at, kind, &message))
            .await
    }

    /// The newest `flagged` event of `resource` in group `num`, unless a
    /// `flag-lifted` came after it.
    pub async fn recorded_flag(
        &self,
        num: i64,
        resource: &ResourceId,
    ) -> Result<Option<String>, StoreError> {
        let prefix = format!("resource {resource} %");
        let newest = self
            .read_with(move |c| {
                c.query_row(
                    "SELECT kind, message FROM group_events
                     WHERE group_num = ?1 AND kind IN ('flagged', 'flag-lifted')
                         AND message LIKE ?2
                     ORDER BY id DESC LIMIT 1",
                    args![num, prefix],
                    |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)),
                )
                .optional()
            })
            .await?;
        Ok(newest.and_then(|(kind, message)| (kind == "flagged").then_some(message)))
    }

    /// The newest policy version `resource` acknowledged for group `num`
    /// (0 when none).
    pub async fn applied_policy_version(
        &self,
        num: i64,
        resource: &ResourceId,
    ) -> Result<u64, StoreError> {
        let key = resource.to_string();
        let v = self
            .read_with(move |c| {
                c.query_row(
                    "SELECT version FROM resource_policy WHERE group_num = ?1 AND resource = ?2",
                    args![num, key],
                    |r| r.get::<i64>(0),
                )
                .optional()
            })
            .await?;
        v.map_or(Ok(0), |v| to_u64(v, "policy version"))
    }

    /// What a retried push of a policy version to `resource` checks first.
    pub async fn policy_push_state(
        &self,
        num: i64,
        resource: &ResourceId,
    ) -> Result<PolicyPushState, StoreError> {
        let key = resource.to_string();
        self.read_with(move |c| {
            let group: Option<(i64, String)> = c
                .query_row(
                    "SELECT policy_version, status FROM groups WHERE num = ?1",
                    args![num],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let resource_group: Option<Option<String>> = c
                .query_row(
                    "SELECT grp FROM resources WHERE resource = ?1",
                    args![&key],
                    |r| r.get(0),
                )
                .optional()?;
            let applied: Option<i64> = c
                .query_row(
                    "SELECT version FROM resource_policy WHERE group_num = ?1 AND resource = ?2",
                    args![num, key],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(PolicyPushState {
                group: group
                    .map(|(v, s)| Ok::<_, StoreError>((to_u64(v, "policy version")?, s)))
                    .transpose()?,
                resource_group: resource_group.flatten(),
                applied: applied.map(|v| to_u64(v, "version")).transpose()?,
            })
        })
        .await
    }

    /// Records a policy push's outcome: the version `resource` applied
    /// (`applied`; never lowered by a late answer for an older one) and the
    /// event, in one transaction.
    pub async fn record_policy_outcome(
        &self,
        num: i64,
        resource: &ResourceId,
        outcome: PolicyOutcome,
    ) -> Result<(), StoreError> {
        let key = resource.to_string();
        let PolicyOutcome {
            version,
            applied,
            at,
            kind,
            message,
        } = outcome;
        self.exec_fenced(num, move |c| {
            if applied {
                c.execute(
                    "INSERT INTO resource_policy (group_num, resource, version, applied_at)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (group_num, resource) DO UPDATE
                         SET version = excluded.version, applied_at = excluded.applied_at
                         WHERE excluded.version > resource_policy.version",
                    args![num, key, i64::try_from(version).unwrap_or(i64::MAX), at.0],
                )?;
            }
            event(c, num, at, kind, &message)
        })
        .await
    }

    /// The expiry disconnects of group `num` not confirmed yet.
    pub async fn pending_disconnects(&self, num: i64) -> Result<Vec<StoredDisconnect>, StoreError> {
        self.read_with(move |c| {
            let mut stmt = c.prepare(
                "SELECT resource, session, attempts, first_at, due_at FROM pending_disconnects
                 WHERE group_num = ?1 ORDER BY first_at, resource, session",
            )?;
            let rows = stmt
                .query_map(
                    args![num],
                    columns::<(String, String, i64, i64, Option<i64>)>,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(resource, session, attempts, first_at, due_at)| {
                    Ok(StoredDisconnect {
                        resource: parse_id(resource, "pending disconnect resource")?,
                        session: parse_id(session, "pending disconnect session")?,
                        attempts: u32::try_from(attempts).map_err(|e| {
                            StoreError::Corrupt(format!("pending disconnect attempts: {e}"))
                        })?,
                        first_at: UnixMillis(first_at),
                        due_at: due_at.map(UnixMillis),
                    })
                })
                .collect()
        })
        .await
    }

    /// The retained sessions of group `num`.
    pub async fn retained_sessions(&self, num: i64) -> Result<Vec<StoredRetention>, StoreError> {
        self.read_with(move |c| {
            let mut stmt = c.prepare(
                "SELECT r.session, r.resource, r.disconnected_at, r.deadline,
                        EXISTS (SELECT 1 FROM sessions s WHERE s.resource = r.resource
                                AND s.session = r.session AND s.ended_at IS NULL)
                 FROM retained_sessions r WHERE r.group_num = ?1
                 ORDER BY r.disconnected_at, r.session",
            )?;
            let rows = stmt
                .query_map(
                    args![num],
                    columns::<(String, String, i64, Option<i64>, bool)>,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(session, resource, since, deadline, open)| {
                    Ok(StoredRetention {
                        session: parse_id(session, "retained session")?,
                        resource: parse_id(resource, "retained session resource")?,
                        since: UnixMillis(since),
                        deadline: deadline.map(UnixMillis),
                        open,
                    })
                })
                .collect()
        })
        .await
    }

    /// The slots of group `num` reserved by tickets whose clients had not
    /// arrived when its last owner wrote them, oldest expiry first.
    pub async fn route_reservations(&self, num: i64) -> Result<Vec<StoredReservation>, StoreError> {
        self.read_with(move |c| {
            let rows = c.query::<(String, String, String, i64)>(
                "SELECT session, resource, user, expires_at FROM route_reservations
                 WHERE group_num = ?1 ORDER BY expires_at, session",
                args![num],
            )?;
            rows.into_iter()
                .map(|(session, resource, user, expires_at)| {
                    Ok(StoredReservation {
                        session: parse_id(session, "reserved session")?,
                        resource: parse_id(resource, "reserved resource")?,
                        user: parse_id(user, "reserved session's user")?,
                        expires_at: UnixMillis(expires_at),
                    })
                })
                .collect()
        })
        .await
    }

    /// The sessions recorded open on the resources whose agents named group
    /// `name`, with when each resource was last heard from.
    pub async fn open_on_hosts_of(&self, name: &str) -> Result<Vec<OpenOnHost>, StoreError> {
        let name = name.to_owned();
        self.read_with(move |c| {
            let mut stmt = c.prepare(
                "SELECT r.resource, r.last_seen, s.session FROM resources r
                 JOIN sessions s ON s.resource = r.resource AND s.ended_at IS NULL
                 WHERE r.grp = ?1 ORDER BY r.resource, s.session",
            )?;
            let rows = stmt
                .query_map(args![name], columns::<(String, i64, String)>)?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(resource, last_seen, session)| {
                    Ok(OpenOnHost {
                        resource: parse_id(resource, "resource")?,
                        last_seen: UnixMillis(last_seen),
                        session: parse_id(session, "session")?,
                    })
                })
                .collect()
        })
        .await
    }
}

/// Applies changes of pending disconnects (inside a caller's transaction).
fn write_disconnects(c: &Db, num: i64, ops: &[DisconnectOp]) -> Result<(), StoreError> {
    for op in ops {
        match op {
            DisconnectOp::Upsert(d) => {
                c.execute(
                    "INSERT INTO pending_disconnects
                         (group_num, resource, session, attempts, first_at, due_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (group_num, resource, session) DO UPDATE
                         SET attempts = excluded.attempts, due_at = excluded.due_at",
                    args![
                        num,
                        d.resource.as_str(),
                        d.session.as_str(),
                        d.attempts,
                        d.first_at.0,
                        d.due_at.map(|t| t.0)
                    ],
                )?;
            }
            DisconnectOp::Delete(resource, session) => {
                c.execute(
                    "DELETE FROM pending_disconnects
                     WHERE group_num = ?1 AND resource = ?2 AND session = ?3",
                    args![num, resource.as_str(), session.as_str()],
                )?;
            }
        }
    }
    Ok(())
}

/// Applies changes of retained sessions (inside a caller's transaction).
fn write_reservations(c: &Db, num: i64, ops: &[ReservationOp]) -> Result<(), StoreError> {
    for op in ops {
        match op {
            ReservationOp::Upsert(r) => c.execute(
                "INSERT INTO route_reservations (group_num, session, resource, user, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (group_num, session) DO UPDATE
                     SET resource = excluded.resource, user = excluded.user,
                         expires_at = excluded.expires_at",
                args![
                    num,
                    r.session.as_str(),
                    r.resource.as_str(),
                    r.user.as_str(),
                    r.expires_at.0
                ],
            )?,
            ReservationOp::Delete(session) => c.execute(
                "DELETE FROM route_reservations WHERE group_num = ?1 AND session = ?2",
                args![num, session.as_str()],
            )?,
        };
    }
    Ok(())
}

fn write_retained(c: &Db, num: i64, ops: &[RetainOp]) -> Result<(), StoreError> {
    for op in ops {
        match op {
            RetainOp::Upsert(r) => {
                c.execute(
                    "INSERT INTO retained_sessions
                         (group_num, session, resource, disconnected_at, deadline)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (group_num, session) DO UPDATE
                         SET resource = excluded.resource,
                             disconnected_at = excluded.disconnected_at,
                             deadline = excluded.deadline",
                    args![
                        num,
                        r.session.as_str(),
                        r.resource.as_str(),
                        r.since.0,
                        r.deadline.map(|t| t.0)
                    ],
                )?;
            }
            RetainOp::Delete(session) => {
                c.execute(
                    "DELETE FROM retained_sessions WHERE group_num = ?1 AND session = ?2",
                    args![num, session.as_str()],
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::open_for_test;

    fn reservation(session: &str, resource: &str, expires_at: i64) -> StoredReservation {
        StoredReservation {
            session: session.parse().expect("session"),
            resource: resource.parse().expect("resource"),
            user: "alice".parse().expect("user"),
            expires_at: UnixMillis(expires_at),
        }
    }

    #[tokio::test]
    async fn reservations_are_written_with_a_turn_and_read_back_by_expiry() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = open_for_test(tmp.path());
        store.insert_group_for_test(1, "g").await;
        store.insert_group_for_test(2, "other").await;
        let commit = |ops| GroupCommit {
            reservations: ops,
            ..GroupCommit::default()
        };
        store
            .commit_group(
                1,
                "pay-as-you-go".into(),
                commit(vec![
                    ReservationOp::Upsert(reservation("r2", "h1", 2_000)),
                    ReservationOp::Upsert(reservation("r1", "h2", 1_000)),
                ]),
            )
            .await
            .expect("commit");
        store
            .commit_group(
                2,
                "pay-as-you-go".into(),
                commit(vec![ReservationOp::Upsert(reservation("r9", "h9", 500))]),
            )
            .await
            .expect("commit");
        let got = store.route_reservations(1).await.expect("read");
        assert_eq!(
            got,
            vec![
                reservation("r1", "h2", 1_000),
                reservation("r2", "h1", 2_000)
            ]
        );
        // A ticket given again moves the expiry; a slot used or freed goes.
        store
            .commit_group(
                1,
                "pay-as-you-go".into(),
                commit(vec![
                    ReservationOp::Upsert(reservation("r1", "h2", 3_000)),
                    ReservationOp::Delete("r2".parse().expect("session")),
                ]),
            )
            .await
            .expect("commit");
        let got = store.route_reservations(1).await.expect("read");
        assert_eq!(got, vec![reservation("r1", "h2", 3_000)]);
        assert_eq!(store.route_reservations(2).await.expect("read").len(), 1);
        store.close().await;
    }
}
