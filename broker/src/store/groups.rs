//! The door to delivery groups: their rows, events, orders, activation
//! outbox, assignments, policy versions and what each resource applied.
//!
//! Rows are plain data ([`GroupRecord`]); the group service turns them into
//! its domain types and decides. A change runs as one transaction through
//! [`Store::group_change`]: the service's closure gets a [`GroupsTx`], reads
//! the row, lets the pure lifecycle decide and writes through the same
//! handle, so two operators (or an operator and the deadline timer) acting
//! on one group are serialised, and an answer means "committed". A refusal
//! (`Err`) after some writes takes them back: nothing changed.

use crate::store::sql::{args, Db, OptionalExtension, Row};
use ferry_common::admin::{GroupEventInfo, OrderInfo};
use ferry_common::{GroupName, ResourceId, UnixMillis, UserId};

use super::{parse_id, to_u64, users, Store, StoreError};

/// A group's row as stored. `policy` is the stored policy document (every
/// part); the service parses it and the billing fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRecord {
    pub num: i64,
    pub id: String,
    pub name: GroupName,
    pub region: String,
    pub office_network: String,
    pub spec: String,
    pub image: String,
    /// `subscription` or `pay-as-you-go`.
    pub billing: String,
    /// A subscription's term (`1w`, `1mo`, `1y`).
    pub term: Option<String>,
    pub auto_renew: bool,
    pub base_resources: u32,
    /// `independent` or `shared`.
    pub session_type: String,
    /// The stored policy document.
    pub policy: String,
    pub status: String,
    pub expires_at: Option<UnixMillis>,
    pub expired_at: Option<UnixMillis>,
    pub created_at: UnixMillis,
    /// Version of `policy`, pushed to agents with it.
    pub policy_version: u64,
}

/// A group to create (`group publish`).
#[derive(Clone, Debug)]
pub struct NewGroup<'a> {
    pub num: i64,
    pub id: &'a str,
    pub name: &'a GroupName,
    pub region: &'a str,
    pub office_network: &'a str,
    pub spec: &'a str,
    pub image: &'a str,
    pub billing: &'a str,
    pub term: Option<String>,
    pub auto_renew: bool,
    pub base_resources: u32,
    pub session_type: &'a str,
    pub policy: &'a str,
    pub status: &'a str,
    pub expires_at: Option<UnixMillis>,
    pub now: UnixMillis,
}

/// A group's status fields after a lifecycle step.
#[derive(Clone, Copy, Debug)]
pub struct GroupStatus<'a> {
    pub status: &'a str,
    pub expires_at: Option<UnixMillis>,
    pub expired_at: Option<UnixMillis>,
    pub auto_renew: bool,
    /// The group went away now (purged, deleted): `gone_at` is set once.
    pub gone: bool,
}

/// An order to write (publish, renew, auto-renew).
#[derive(Clone, Debug)]
pub struct NewOrder<'a> {
    pub kind: &'a str,
    pub term: String,
    pub base_resources: u32,
    /// Decimal text, already rounded.
    pub amount: String,
    pub currency: &'a str,
    pub period_start: UnixMillis,
    pub period_end: UnixMillis,
    pub at: UnixMillis,
}

/// One row of the activation outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    /// Outbox row id.
    pub id: i64,
    /// The user to activate.
    pub user: String,
    /// Where the activation e-mail goes (as recorded when assigned).
    pub email: String,
    /// Where the activation text message goes (as recorded when assigned).
    pub mobile: String,
    /// `activation`.
    pub kind: String,
    /// Name of the group the user was assigned to.
    pub group: String,
    /// Hook runs so far.
    pub attempts: i64,
    /// When the next attempt is due (meaningless once delivered).
    pub next_attempt_at: UnixMillis,
    /// When a hook run exited 0; `None` while pending.
    pub delivered_at: Option<UnixMillis>,
    /// Why the last failed attempt failed, while pending.
    pub last_error: Option<String>,
}

const ROW_COLUMNS: &str = "num, id, name, region, office_network, spec, image, billing, term,
    auto_renew, base_resources, session_type, policy, status, expires_at, expired_at, created_at,
    policy_version";

fn read_record(r: &Row<'_>) -> Result<GroupRecord, StoreError> {
    let name: String = r.get(2)?;
    let base: i64 = r.get(10)?;
    let version: i64 = r.get(17)?;
    let (num, id, region, office_network, spec, image, billing, term, auto_renew) = (
        r.get(0)?,
        r.get(1)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
    );
    let (session_type, policy, status) = (r.get(11)?, r.get(12)?, r.get(13)?);
    let (expires_at, expired_at, created_at): (Option<i64>, Option<i64>, i64) =
        (r.get(14)?, r.get(15)?, r.get(16)?);
    Ok(GroupRecord {
        num,
        id,
        name: parse_id(name, "group name")?,
        region,
        office_network,
        spec,
        image,
        billing,
        term,
        auto_renew,
        base_resources: u32::try_from(base)
            .map_err(|_| StoreError::Corrupt(format!("base resources {base}")))?,
        session_type,
        policy,
        status,
        expires_at: expires_at.map(UnixMillis),
        expired_at: expired_at.map(UnixMillis),
        created_at: UnixMillis(created_at),
        policy_version: to_u64(version, "policy version")?,
    })
}

/// A group transaction (or a read) in progress: every statement about
/// groups goes through it. Handed to the closures of
/// [`Store::group_change`] and [`Store::group_read`].
pub struct GroupsTx<'c> {
    c: &'c Db,
}

impl GroupsTx<'_> {
    /// The group named `group`: a live name first, else an id or a gone
    /// name (the newest).
    pub fn find(&self, group: &str) -> Result<Option<GroupRecord>, StoreError> {
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM groups WHERE id = ?1 OR name = ?1
             ORDER BY (status != 'gone') DESC, num DESC LIMIT 1"
        );
        self.c.query_row(&sql, args![group], read_record).optional()
    }

    /// The live (not gone) group named `group` (a name or an id).
    pub fn live(&self, group: &str) -> Result<Option<GroupRecord>, StoreError> {
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM groups
             WHERE (id = ?1 OR name = ?1) AND status != 'gone' ORDER BY num DESC LIMIT 1"
        );
        self.c.query_row(&sql, args![group], read_record).optional()
    }

    /// Group `num`.
    pub fn by_num(&self, num: i64) -> Result<Option<GroupRecord>, StoreError> {
        let sql = format!("SELECT {ROW_COLUMNS} FROM groups WHERE num = ?1");
        self.c.query_row(&sql, args![num], read_record).optional()
    }

    /// Every group ever published, in publish order.
    pub fn all(&self) -> Result<Vec<GroupRecord>, StoreError> {
        let sql = format!("SELECT {ROW_COLUMNS} FROM groups ORDER BY num");
        let mut stmt = self.c.prepare(&sql)?;
        let rows = stmt.query_map(args![], read_record)?;
        rows.collect()
    }

    /// Writes a group's status fields after a lifecycle step.
    pub fn save_status(
        &self,
        num: i64,
        s: &GroupStatus<'_>,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        self.c.execute(
            "UPDATE groups SET status = ?1, expires_at = ?2, expired_at = ?3, auto_renew = ?4,
                    updated_at = ?5, gone_at = COALESCE(gone_at, ?6)
             WHERE num = ?7",
            args![
                s.status,
                s.expires_at.map(|t| t.0),
                s.expired_at.map(|t| t.0),
                s.auto_renew,
                now.0,
                s.gone.then_some(now.0),
                num
            ],
        )?;
        Ok(())
    }

    /// Records one event of group `num`.
    pub fn event(
        &self,
        num: i64,
        at: UnixMillis,
        kind: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        event(self.c, num, at, kind, message)
    }

    /// The users assigned to group `num`, sorted.
    pub fn assigned_users(&self, num: i64) -> Result<Vec<UserId>, StoreError> {
        users::assigned(self.c, num)
    }

    /// Those of `users` that do not exist.
    pub fn unknown_users(&self, users: &[UserId]) -> Result<Vec<UserId>, StoreError> {
        users::unknown(self.c, users)
    }

    /// Assigns users not yet assigned to group `num` and queues their
    /// activation notifications; returns the newly assigned ones.
    pub fn assign(
        &self,
        num: i64,
        users: &[UserId],
        now: UnixMillis,
    ) -> Result<Vec<UserId>, StoreError> {
        users::assign(self.c, num, users, now)
    }

    /// Unassigns `users` from group `num` (every user when `None`).
    pub fn unassign(&self, num: i64, users: Option<&[UserId]>) -> Result<(), StoreError> {
        match users {
            None => users::unassign_all(self.c, num),
            Some(list) => list
                .iter()
                .try_for_each(|u| users::unassign(self.c, num, u)),
        }
    }

    /// Writes an order of group `num`.
    pub fn insert_order(&self, num: i64, o: &NewOrder<'_>) -> Result<(), StoreError> {
        self.c.execute(
            "INSERT INTO orders (group_num, kind, term, base_resources, amount, currency,
                                 period_start, period_end, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            args![
                num,
                o.kind,
                o.term,
                o.base_resources,
                o.amount,
                o.currency,
                o.period_start.0,
                o.period_end.0,
                o.at.0
            ],
        )?;
        Ok(())
    }

    /// The number the next group gets.
    pub fn next_num(&self) -> Result<i64, StoreError> {
        self.c.query_row(
            "SELECT COALESCE(MAX(num), 0) + 1 FROM groups",
            args![],
            |r| r.get(0),
        )
    }

    /// Whether a live group has this name.
    pub fn live_name_taken(&self, name: &str) -> Result<bool, StoreError> {
        self.c.query_row(
            "SELECT COUNT(*) > 0 FROM groups WHERE name = ?1 AND status != 'gone'",
            args![name],
            |r| r.get(0),
        )
    }

    /// Whether any group, live or gone, had this name.
    pub fn name_used(&self, name: &str) -> Result<bool, StoreError> {
        self.c.query_row(
            "SELECT COUNT(*) > 0 FROM groups WHERE name = ?1",
            args![name],
            |r| r.get(0),
        )
    }

    /// Creates a group.
    pub fn insert(&self, g: &NewGroup<'_>) -> Result<(), StoreError> {
        self.c.execute(
            "INSERT INTO groups (num, id, name, region, office_network, spec, image, billing,
                                 term, auto_renew, base_resources, session_type, policy,
                                 status, expires_at, expired_at, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, NULL,
                     ?16, ?16)",
            args![
                g.num,
                g.id,
                g.name.as_str(),
                g.region,
                g.office_network,
                g.spec,
                g.image,
                g.billing,
                g.term,
                g.auto_renew,
                g.base_resources,
                g.session_type,
                g.policy,
                g.status,
                g.expires_at.map(|t| t.0),
                g.now.0
            ],
        )?;
        Ok(())
    }

    /// Stores `policy` (the whole document) as group `num`'s next version;
    /// every accepted update is a new version, even one that changes
    /// nothing (the operator asked for a push). Returns the version.
    pub fn set_policy(&self, num: i64, policy: &str, now: UnixMillis) -> Result<u64, StoreError> {
        self.c.execute(
            "UPDATE groups SET policy = ?1, updated_at = ?2, policy_version = policy_version + 1
             WHERE num = ?3",
            args![policy, now.0, num],
        )?;
        let version: i64 = self.c.query_row(
            "SELECT policy_version FROM groups WHERE num = ?1",
            args![num],
            |x| x.get(0),
        )?;
        to_u64(version, "policy version")
    }

    /// Ends every open billing interval of group `num` at its own start
    /// (a failed publish bills nothing).
    pub fn unbill_open_intervals(&self, num: i64) -> Result<(), StoreError> {
        self.c.execute(
            "UPDATE resource_intervals SET released_at = ready_at
             WHERE group_num = ?1 AND released_at IS NULL",
            args![num],
        )?;
        Ok(())
    }

    /// How many users group `num` has.
    pub fn user_count(&self, num: i64) -> Result<u64, StoreError> {
        users::assigned_count(self.c, num)
    }

    /// The orders of group `num`, oldest first.
    pub fn orders(&self, num: i64) -> Result<Vec<OrderInfo>, StoreError> {
        let mut stmt = self.c.prepare(
            "SELECT kind, term, base_resources, amount, currency, period_start, period_end, at
             FROM orders WHERE group_num = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map(args![num], |x| {
            Ok(OrderInfo {
                kind: x.get(0)?,
                term: x.get(1)?,
                base_resources: x.get(2)?,
                amount: x.get(3)?,
                currency: x.get(4)?,
                period_start: UnixMillis(x.get(5)?),
                period_end: UnixMillis(x.get(6)?),
                at: UnixMillis(x.get(7)?),
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()
    }

    /// The resources whose agents named group `name` when they last
    /// registered, sorted.
    pub fn resources_naming(&self, name: &GroupName) -> Result<Vec<ResourceId>, StoreError> {
        let mut stmt = self
            .c
            .prepare("SELECT resource FROM resources WHERE grp = ?1 ORDER BY resource")?;
        let rows = stmt.query_map(args![name.as_str()], |x| x.get::<String>(0))?;
        rows.map(|x| parse_id(x?, "resource")).collect()
    }

    /// The policy version each resource acknowledged for group `num`.
    pub fn applied_versions(&self, num: i64) -> Result<Vec<(ResourceId, u64)>, StoreError> {
        let mut stmt = self.c.prepare(
            "SELECT resource, version FROM resource_policy WHERE group_num = ?1 ORDER BY resource",
        )?;
        let rows = stmt.query_map(args![num], |x| Ok((x.get::<String>(0)?, x.get::<i64>(1)?)))?;
        rows.map(|x| {
            let (resource, version) = x?;
            Ok((parse_id(resource, "resource")?, to_u64(version, "version")?))
        })
        .collect()
    }

    /// The events of group `num`, oldest first.
    pub fn events(&self, num: i64) -> Result<Vec<GroupEventInfo>, StoreError> {
        let mut stmt = self.c.prepare(
            "SELECT at, kind, message FROM group_events WHERE group_num = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map(args![num], |r| {
            Ok(GroupEventInfo {
                at: UnixMillis(r.get(0)?),
                kind: r.get(1)?,
                message: r.get(2)?,
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()
    }
}

/// Records one event of group `num` (inside a caller's transaction).
pub(crate) fn event(
    c: &Db,
    num: i64,
    at: UnixMillis,
    kind: &str,
    message: &str,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO group_events (group_num, at, kind, message) VALUES (?1, ?2, ?3, ?4)",
        args![num, at.0, kind, message],
    )?;
    Ok(())
}

/// Runs `f` in a nested savepoint of the writer's transaction, so a refusal
/// after some writes (an order that cannot be priced, say) takes them back:
/// an `Err` answer means nothing changed. [`Store::exec`] only rolls back on
/// a `StoreError`; a refusal travels back to the caller as a value.
fn atomic<T, E>(
    c: &Db,
    f: impl FnOnce(&GroupsTx<'_>) -> Result<T, E>,
) -> Result<Result<T, E>, StoreError> {
    c.execute_batch("SAVEPOINT group_change")?;
    let r = f(&GroupsTx { c });
    match &r {
        Ok(_) => c.execute_batch("RELEASE group_change")?,
        Err(_) => c.execute_batch("ROLLBACK TO group_change; RELEASE group_change")?,
    }
    Ok(r)
}

impl Store {
    /// Runs `f` as one change of groups: committed when it answers `Ok`,
    /// nothing written when it answers `Err`.
    pub async fn group_change<T, E>(
        &self,
        f: impl FnOnce(&GroupsTx<'_>) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.exec(move |c| {
            super::leases::serialize_group_changes(c)?;
            atomic(c, f)
        })
        .await?
    }

    /// Runs `f` as several changes in one transaction, each of which may
    /// fail alone: the handle's [`GroupsTx::each`] takes one back without
    /// the others (the lifecycle deadlines of many groups).
    pub async fn group_changes<T, E>(
        &self,
        f: impl FnOnce(&GroupsBatch<'_>) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.exec(move |c| {
            super::leases::serialize_group_changes(c)?;
            Ok(f(&GroupsBatch { c }))
        })
        .await?
    }

    /// Runs `f` on committed data (the read connection).
    pub async fn group_read<T, E>(
        &self,
        f: impl FnOnce(&GroupsTx<'_>) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.read_with(move |c| Ok(f(&GroupsTx { c }))).await?
    }

    /// Every notification of the outbox, delivered or not, oldest first (at
    /// most `limit`).
    pub async fn outbox(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_with(move |c| outbox_rows(c, None, limit)).await
    }

    /// Pending notifications due at `now`, oldest first (at most `limit`).
    pub async fn due_notifications(
        &self,
        now: UnixMillis,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_with(move |c| outbox_rows(c, Some(now), limit))
            .await
    }

    /// When the next pending notification is due, if any.
    pub async fn next_notification_at(&self) -> Result<Option<UnixMillis>, StoreError> {
        Ok(self
            .read_with(|c| {
                c.query_row(
                    "SELECT MIN(next_attempt_at) FROM notifications WHERE delivered_at IS NULL",
                    args![],
                    |r| r.get::<Option<i64>>(0),
                )
            })
            .await?
            .map(UnixMillis))
    }

    /// Records one delivery attempt of notification `id`: delivered, or
    /// retried after a wait that doubles from one second up to `max_wait_ms`.
    pub async fn notification_attempted(
        &self,
        id: i64,
        result: Result<(), String>,
        now: UnixMillis,
        max_wait_ms: i64,
    ) -> Result<(), StoreError> {
        self.exec(move |c| {
            match result {
                Ok(()) => c.execute(
                    "UPDATE notifications SET delivered_at = ?1, attempts = attempts + 1,
                            last_error = NULL WHERE id = ?2",
                    args![now.0, id],
                )?,
                Err(e) => {
                    let attempts: i64 = c.query_row(
                        "SELECT attempts FROM notifications WHERE id = ?1",
                        args![id],
                        |r| r.get(0),
                    )?;
                    let wait = 1000i64
                        .checked_shl(u32::try_from(attempts.clamp(0, 40)).unwrap_or(40))
                        .unwrap_or(i64::MAX)
                        .min(max_wait_ms);
                    c.execute(
                        "UPDATE notifications SET attempts = attempts + 1, last_error = ?1,
                                next_attempt_at = ?2 WHERE id = ?3",
                        args![e, now.0.saturating_add(wait), id],
                    )?
                }
            };
            Ok(())
        })
        .await
    }
}

/// A transaction of several group changes, each in its own savepoint.
pub struct GroupsBatch<'c> {
    c: &'c Db,
}

impl GroupsBatch<'_> {
    /// Reads outside any one change.
    pub fn read(&self) -> GroupsTx<'_> {
        GroupsTx { c: self.c }
    }

    /// One change of the batch: taken back alone when `f` answers `Err`.
    pub fn each<T, E>(
        &self,
        f: impl FnOnce(&GroupsTx<'_>) -> Result<T, E>,
    ) -> Result<Result<T, E>, StoreError> {
        atomic(self.c, f)
    }
}

/// Outbox rows, oldest first: every one, or the pending ones due at `due`.
fn outbox_rows(c: &Db, due: Option<UnixMillis>, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
    let sql = if due.is_some() {
        "SELECT n.id, n.user, n.email, n.mobile, n.kind, g.name, n.attempts, n.next_attempt_at,
                n.delivered_at, n.last_error
         FROM notifications n JOIN groups g ON g.num = n.group_num
         WHERE n.delivered_at IS NULL AND n.next_attempt_at <= ?1
         ORDER BY n.next_attempt_at, n.id LIMIT ?2"
    } else {
        "SELECT n.id, n.user, n.email, n.mobile, n.kind, g.name, n.attempts, n.next_attempt_at,
                n.delivered_at, n.last_error
         FROM notifications n JOIN groups g ON g.num = n.group_num
         WHERE CAST(?1 AS BIGINT) IS NULL ORDER BY n.id LIMIT ?2"
    };
    let mut stmt = c.prepare(sql)?;
    let rows = stmt.query_map(args![due.map(|t| t.0), limit], |r| {
        Ok(OutboxRow {
            id: r.get(0)?,
            user: r.get(1)?,
            email: r.get(2)?,
            mobile: r.get(3)?,
            kind: r.get(4)?,
            group: r.get(5)?,
            attempts: r.get(6)?,
            next_attempt_at: UnixMillis(r.get(7)?),
            delivered_at: r.get::<Option<i64>>(8)?.map(UnixMillis),
            last_error: r.get(9)?,
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>()
}
