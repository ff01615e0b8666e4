//! The door to the metering records a usage report reads: the groups that
//! existed in a period, the orders placed in it, their resources' billing
//! intervals and the sessions on those resources. Reads committed rows only;
//! the report itself is computed by [`crate::usage`], a pure function of
//! these records.

use std::collections::{BTreeMap, BTreeSet};

use crate::store::sql::{args, columns, Db};
use ferry_common::{GroupName, ResourceId, UnixMillis};
use rust_decimal::Decimal;

use super::{Store, StoreError};

/// Base or elastic, as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Base,
    Elastic,
}

/// When one resource was ready in a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interval {
    /// The resource.
    pub resource: ResourceId,
    /// Base or elastic.
    pub kind: Kind,
    /// Billing starts.
    pub ready_at: UnixMillis,
    /// Billing stops; `None` while it runs.
    pub released_at: Option<UnixMillis>,
}

/// One recorded session on a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSpan {
    /// Where it ran.
    pub resource: ResourceId,
    /// When it started.
    pub started_at: UnixMillis,
    /// When it ended; `None` while open.
    pub ended_at: Option<UnixMillis>,
}

/// Everything recorded about one group that a report needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRecords {
    /// The group's name.
    pub name: GroupName,
    /// The group's id.
    pub id: String,
    /// Its spec, whose prices apply.
    pub spec: String,
    /// `subscription` or `pay-as-you-go`.
    pub billing: String,
    /// Amounts of the orders placed in the period.
    pub orders: Vec<Decimal>,
    /// Its resources' intervals (any period).
    pub intervals: Vec<Interval>,
    /// Sessions on those resources overlapping the period.
    pub sessions: Vec<SessionSpan>,
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// Reads the records of the groups `group` names (every group when `None`)
/// that existed in `[from, to)`.
fn load(
    c: &Db,
    group: Option<GroupName>,
    from: UnixMillis,
    to: UnixMillis,
) -> Result<Vec<GroupRecords>, StoreError> {
    let group = group.as_ref().map(|g| g.to_string());
    let mut stmt = c.prepare(
        "SELECT num, id, name, spec, billing FROM groups
         WHERE (CAST(?1 AS TEXT) IS NULL OR id = ?1 OR name = ?1)
           AND created_at < ?3 AND (gone_at IS NULL OR gone_at >= ?2)
         ORDER BY num",
    )?;
    let rows = stmt
        .query_map(
            args![group, from.0, to.0],
            columns::<(i64, String, String, String, String)>,
        )?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(rows.len());
    for (num, id, name, spec, billing) in rows {
        let mut orders = Vec::new();
        let mut o = c.prepare_cached(
            "SELECT amount FROM orders WHERE group_num = ?1 AND at >= ?2 AND at < ?3 ORDER BY id",
        )?;
        for amount in o.query_map(args![num, from.0, to.0], |r| r.get::<String>(0))? {
            let amount = amount?;
            orders.push(
                amount
                    .parse::<Decimal>()
                    .map_err(|e| corrupt(format!("order amount {amount:?}: {e}")))?,
            );
        }
        let mut intervals = Vec::new();
        let mut iv = c.prepare_cached(
            "SELECT resource, kind, ready_at, released_at FROM resource_intervals
             WHERE group_num = ?1 ORDER BY id",
        )?;
        for row in iv.query_map(args![num], columns::<(String, String, i64, Option<i64>)>)? {
            let (resource, kind, ready, released) = row?;
            intervals.push(Interval {
                resource: resource.parse().map_err(corrupt)?,
                kind: match kind.as_str() {
                    "base" => Kind::Base,
                    "elastic" => Kind::Elastic,
                    k => return Err(corrupt(format!("resource kind {k:?}"))),
                },
                ready_at: UnixMillis(ready),
                released_at: released.map(UnixMillis),
            });
        }
        let mut sessions = Vec::new();
        let names: BTreeSet<&str> = intervals.iter().map(|i| i.resource.as_str()).collect();
        let mut ss = c.prepare_cached(
            "SELECT resource, started_at, ended_at FROM sessions
             WHERE resource = ?1 AND started_at < ?3 AND (ended_at IS NULL OR ended_at > ?2)
             ORDER BY started_at, id",
        )?;
        for resource in names {
            for row in ss.query_map(
                args![resource, from.0, to.0],
                columns::<(String, i64, Option<i64>)>,
            )? {
                let (resource, started, ended) = row?;
                sessions.push(SessionSpan {
                    resource: resource.parse().map_err(corrupt)?,
                    started_at: UnixMillis(started),
                    ended_at: ended.map(UnixMillis),
                });
            }
        }
        out.push(GroupRecords {
            name: name.parse().map_err(corrupt)?,
            id,
            spec,
            billing,
            orders,
            intervals,
            sessions,
        });
    }
    Ok(out)
}

impl Store {
    /// The records of the groups `group` (a name or an id; every group when
    /// `None`) that existed in `[from, to)`, by group number.
    pub async fn usage_records(
        &self,
        group: Option<GroupName>,
        from: UnixMillis,
        to: UnixMillis,
    ) -> Result<Vec<GroupRecords>, StoreError> {
        self.read(move |c| load(c, group, from, to)).await
    }

    /// Every group's spec (whose prices apply), by group id, gone ones too.
    pub async fn group_specs(&self) -> Result<BTreeMap<String, String>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT id, spec FROM groups")?;
            let rows = stmt
                .query_map(args![], |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)))?
                .collect::<Result<BTreeMap<_, _>, _>>()?;
            Ok(rows)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use rust_decimal_macros::dec;

    use super::*;

    fn rid(s: &str) -> ResourceId {
        s.parse().expect("id")
    }

    #[tokio::test]
    async fn a_period_reads_the_groups_that_existed_and_what_overlaps_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = crate::store::testing::open_for_test(dir.path());
        // g1 lives through the period, g2 is gone before it, g3 comes after it.
        store.insert_group_for_test(1, "g1").await;
        store.insert_group_for_test(2, "g2").await;
        store.insert_group_for_test(3, "g3").await;
        store
            .exec(|c| {
                c.execute_batch(
                    "UPDATE groups SET status = 'gone', gone_at = 50 WHERE num = 2;
                     UPDATE groups SET created_at = 1000 WHERE num = 3;
                     INSERT INTO orders (group_num, kind, term, base_resources, amount, currency,
                                         period_start, period_end, at)
                     VALUES (1, 'publish', '1m', 1, '9.5', 'CNY', 0, 1, 99),
                            (1, 'renew', '1m', 1, '3.25', 'CNY', 0, 1, 100),
                            (1, 'renew', '1m', 1, '7', 'CNY', 0, 1, 500);
                     INSERT INTO resource_intervals (group_num, resource, kind, billing,
                                                     ready_at, released_at)
                     VALUES (1, 'h1', 'base', 'pay-as-you-go', 0, NULL),
                            (1, 'g1-e1', 'elastic', 'pay-as-you-go', 10, 20);
                     INSERT INTO sessions (resource, session, user, started_at, ended_at)
                     VALUES ('h1', 's1', 'u', 50, 150),
                            ('h1', 's2', 'u', 200, 300),
                            ('h1', 's3', 'u', 400, NULL),
                            ('h9', 's4', 'u', 150, NULL);",
                )?;
                Ok(())
            })
            .await
            .expect("records");
        let records = store
            .usage_records(None, UnixMillis(100), UnixMillis(300))
            .await
            .expect("read");
        assert_eq!(
            records,
            [GroupRecords {
                name: "g1".parse().expect("name"),
                id: "dg-1".into(),
                spec: "office-4c8g".into(),
                billing: "pay-as-you-go".into(),
                orders: vec![dec!(3.25)],
                intervals: vec![
                    Interval {
                        resource: rid("h1"),
                        kind: Kind::Base,
                        ready_at: UnixMillis(0),
                        released_at: None,
                    },
                    Interval {
                        resource: rid("g1-e1"),
                        kind: Kind::Elastic,
                        ready_at: UnixMillis(10),
                        released_at: Some(UnixMillis(20)),
                    },
                ],
                sessions: vec![
                    SessionSpan {
                        resource: rid("h1"),
                        started_at: UnixMillis(50),
                        ended_at: Some(UnixMillis(150)),
                    },
                    SessionSpan {
                        resource: rid("h1"),
                        started_at: UnixMillis(200),
                        ended_at: Some(UnixMillis(300)),
                    },
                ],
            }]
        );
        let by_id = store
            .usage_records(
                Some("dg-2".parse().expect("id")),
                UnixMillis(0),
                UnixMillis(60),
            )
            .await
            .expect("read");
        assert_eq!(by_id.len(), 1);
        assert_eq!(by_id[0].name.as_str(), "g2");
        assert_eq!(
            store.group_specs().await.expect("specs").len(),
            3,
            "gone groups keep their spec"
        );
        store.close().await;
    }
}
