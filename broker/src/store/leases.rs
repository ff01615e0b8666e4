//! The door to the brokers sharing a database and the lease each holds on
//! the groups it owns (tables `brokers` and `group_leases`).
//!
//! A lease names its owner and an epoch that grows at every change of
//! owner, and expires by the database's clock. The rules of who takes what
//! are `cluster::plan`'s; this door reads the rows and applies a plan in one
//! transaction, each change conditional on the row still being what the
//! plan saw, so two brokers applying plans at once never both own a group.
//!
//! Fencing: while brokers share a database, every write of a group's facts
//! (an actor's turn, a rollout's step) first checks, in its own
//! transaction, that this broker still holds the group's lease at the epoch
//! it acquired ([`check_fence`]); it takes a share lock on the lease row, so
//! a broker taking the lease over waits for that transaction and any write
//! after the takeover is refused ([`StoreError::Fenced`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use crate::store::sql::{args, Db};

use super::{Store, StoreError};

/// A broker as the database has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerRow {
    pub id: String,
    /// Where agents and end users reach it (`host:port`).
    pub address: String,
    /// Database clock (ms) of its last heartbeat.
    pub seen_at: i64,
    /// It is shutting down: it hands its groups over and takes none.
    pub leaving: bool,
}

/// A group's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRow {
    pub group_num: i64,
    /// `None` once released.
    pub owner: Option<String>,
    pub epoch: i64,
    /// Database clock (ms).
    pub expires_at: i64,
}

/// What a broker reads to plan its leases, in one transaction.
#[derive(Clone, Debug)]
pub struct LeaseView {
    /// The database's clock now (ms).
    pub now: i64,
    pub brokers: Vec<BrokerRow>,
    /// The groups that need an owner (not gone): number and name.
    pub groups: Vec<(i64, String)>,
    pub leases: Vec<LeaseRow>,
}

/// A change of one lease, conditional on its row as it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseChange {
    /// Take a free or expired lease: owner = me, epoch + 1.
    Acquire { group_num: i64, seen_epoch: i64 },
    /// Extend my lease.
    Renew { group_num: i64, epoch: i64 },
    /// Give my lease up now (hand-over, shutdown).
    Release { group_num: i64, epoch: i64 },
}

/// The leases this broker holds after applying its changes: group number →
/// epoch.
pub type Held = HashMap<i64, i64>;

/// The fencing tokens of the groups this broker owns, shared by the lease
/// keeper (which sets them) and the store's writes (which check them).
#[derive(Clone, Debug, Default)]
pub struct Fences {
    inner: Arc<RwLock<FenceState>>,
}

#[derive(Debug, Default)]
struct FenceState {
    /// This broker's id; `None`: no fencing (one broker on its own store).
    broker: Option<String>,
    held: Held,
}

impl Fences {
    /// Fencing for broker `id`: from now on a group's writes need its
    /// lease, and none is held yet.
    pub fn enable(&self, id: &str) {
        if let Ok(mut s) = self.inner.write() {
            s.broker = Some(id.to_owned());
            s.held.clear();
        }
    }

    /// Replaces the held leases.
    pub fn set(&self, held: Held) {
        if let Ok(mut s) = self.inner.write() {
            s.held = held;
        }
    }

    /// The token for group `num`: `Ok(None)` without fencing, `Err` when
    /// this broker does not hold its lease.
    fn token(&self, num: i64) -> Result<Option<(String, i64)>, StoreError> {
        let s = self
            .inner
            .read()
            .map_err(|_| StoreError::Corrupt("fences lock poisoned".into()))?;
        let Some(broker) = &s.broker else {
            return Ok(None);
        };
        match s.held.get(&num) {
            Some(epoch) => Ok(Some((broker.clone(), *epoch))),
            None => Err(StoreError::Fenced { group_num: num }),
        }
    }
}

/// The database's clock, in ms since the epoch.
fn db_now(c: &Db) -> Result<i64, StoreError> {
    c.query_one(
        if c.sqlite().is_some() {
            "SELECT CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
        } else {
            "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
        },
        args![],
    )
}

/// Every broker's row, by id.
fn broker_rows(c: &Db) -> Result<Vec<BrokerRow>, StoreError> {
    Ok(c.query::<(String, String, i64, i64)>(
        "SELECT id, address, seen_at, leaving FROM brokers ORDER BY id",
        args![],
    )?
    .into_iter()
    .map(|(id, address, seen_at, leaving)| BrokerRow {
        id,
        address,
        seen_at,
        leaving: leaving != 0,
    })
    .collect())
}

/// Checks, in the caller's transaction, that this broker holds group
/// `num`'s lease at its epoch, and keeps the lease row from changing owner
/// until the transaction ends. Without fencing it checks nothing.
pub(crate) fn check_fence(c: &Db, fences: &Fences, num: i64) -> Result<(), StoreError> {
    let Some((broker, epoch)) = fences.token(num)? else {
        return Ok(());
    };
    // Brokers share only a PostgreSQL store: its clock and its row lock.
    let held: Option<i64> = c.query_opt(
        "SELECT epoch FROM group_leases
         WHERE group_num = ?1 AND owner = ?2 AND epoch = ?3
           AND expires_at > CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)
         FOR SHARE",
        args![num, broker, epoch],
    )?;
    match held {
        Some(_) => Ok(()),
        None => Err(StoreError::Fenced { group_num: num }),
    }
}

/// Key of the advisory lock that makes read-decide-write changes of groups
/// (operators' verbs, lifecycle deadlines, rollouts begun) one at a time
/// across brokers sharing a PostgreSQL store.
const GROUP_CHANGES_LOCK: i64 = 0x6665_7272_7967_7270;

/// Makes the caller's transaction the only one changing group records
/// until it ends, across every broker of a shared PostgreSQL store: the
/// reads after it see what an earlier change committed, so two brokers
/// never decide from the same stale row (an auto-renew ordered twice). A
/// SQLite store has one writer already; nothing is done there.
pub(crate) fn serialize_group_changes(c: &Db) -> Result<(), StoreError> {
    if c.sqlite().is_some() {
        return Ok(());
    }
    c.query_opt::<String>(
        "SELECT CAST(pg_advisory_xact_lock(?1) AS TEXT)",
        args![GROUP_CHANGES_LOCK],
    )?;
    Ok(())
}

impl Store {
    /// This store's fencing tokens (none unless brokers share it).
    pub fn fences(&self) -> &Fences {
        &self.inner.fences
    }

    /// Records broker `id`'s heartbeat (reachable at `address`), and reads
    /// what its lease plan needs, in one transaction.
    pub async fn lease_view(
        &self,
        id: &str,
        address: &str,
        leaving: bool,
    ) -> Result<LeaseView, StoreError> {
        let (id, address) = (id.to_owned(), address.to_owned());
        self.exec(move |c| {
            let now = db_now(c)?;
            c.execute(
                "INSERT INTO brokers (id, address, started_at, seen_at, leaving)
                 VALUES (?1, ?2, ?3, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET
                     address = excluded.address, seen_at = excluded.seen_at,
                     leaving = excluded.leaving",
                args![id, address, now, leaving],
            )?;
            let brokers = broker_rows(c)?;
            let groups = c.query::<(i64, String)>(
                "SELECT num, name FROM groups WHERE status != 'gone' ORDER BY num",
                args![],
            )?;
            let leases = c
                .query::<(i64, Option<String>, i64, i64)>(
                    "SELECT group_num, owner, epoch, expires_at FROM group_leases
                     ORDER BY group_num",
                    args![],
                )?
                .into_iter()
                .map(|(group_num, owner, epoch, expires_at)| LeaseRow {
                    group_num,
                    owner,
                    epoch,
                    expires_at,
                })
                .collect();
            Ok(LeaseView {
                now,
                brokers,
                groups,
                leases,
            })
        })
        .await
    }

    /// Applies broker `id`'s lease changes in one transaction, each only if
    /// its row is still as planned; a lease lasts `lease_ms` from the
    /// database's clock. Returns the leases `id` holds afterwards.
    pub async fn apply_leases(
        &self,
        id: &str,
        lease_ms: i64,
        changes: Vec<LeaseChange>,
    ) -> Result<Held, StoreError> {
        let id = id.to_owned();
        self.exec(move |c| {
            let now = db_now(c)?;
            let until = now.saturating_add(lease_ms);
            for change in &changes {
                match *change {
                    LeaseChange::Acquire {
                        group_num,
                        seen_epoch,
                    } => {
                        c.execute(
                            "INSERT INTO group_leases (group_num, owner, epoch, expires_at)
                             VALUES (?1, NULL, 0, 0) ON CONFLICT (group_num) DO NOTHING",
                            args![group_num],
                        )?;
                        c.execute(
                            "UPDATE group_leases SET owner = ?2, epoch = epoch + 1, expires_at = ?3
                             WHERE group_num = ?1 AND epoch = ?4
                               AND (owner IS NULL OR expires_at <= ?5)",
                            args![group_num, id, until, seen_epoch, now],
                        )?;
                    }
                    LeaseChange::Renew { group_num, epoch } => {
                        c.execute(
                            "UPDATE group_leases SET expires_at = ?3
                             WHERE group_num = ?1 AND owner = ?2 AND epoch = ?4
                               AND expires_at > ?5",
                            args![group_num, id, until, epoch, now],
                        )?;
                    }
                    LeaseChange::Release { group_num, epoch } => {
                        c.execute(
                            "UPDATE group_leases SET owner = NULL, expires_at = ?3
                             WHERE group_num = ?1 AND owner = ?2 AND epoch = ?4",
                            args![group_num, id, now, epoch],
                        )?;
                    }
                }
            }
            let held = c.query::<(i64, i64)>(
                "SELECT group_num, epoch FROM group_leases
                 WHERE owner = ?1 AND expires_at > ?2",
                args![id, now],
            )?;
            Ok(held.into_iter().collect())
        })
        .await
    }

    /// Broker `id` leaves: every lease it holds is released now and it is
    /// marked leaving, so the others take its groups at their next turn.
    pub async fn leave_cluster(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.exec(move |c| {
            let now = db_now(c)?;
            c.execute(
                "UPDATE group_leases SET owner = NULL, expires_at = ?2 WHERE owner = ?1",
                args![id, now],
            )?;
            c.execute(
                "UPDATE brokers SET leaving = 1, seen_at = ?2 WHERE id = ?1",
                args![id, now],
            )?;
            Ok(())
        })
        .await
    }

    /// The database's clock now (ms), and the brokers sharing this store.
    pub async fn brokers(&self) -> Result<(i64, Vec<BrokerRow>), StoreError> {
        self.read(|c| {
            let now = db_now(c)?;
            let brokers = broker_rows(c)?;
            Ok((now, brokers))
        })
        .await
    }

    /// Who owns each live group now (its lease's holder, with the holder's
    /// address), by group name.
    pub async fn owners(&self) -> Result<Vec<GroupOwner>, StoreError> {
        self.read(|c| {
            let now = db_now(c)?;
            let rows = c.query::<(String, Option<String>, Option<String>, Option<i64>)>(
                "SELECT g.name, l.owner, b.address, l.epoch
                 FROM groups g
                 LEFT JOIN group_leases l ON l.group_num = g.num AND l.expires_at > ?1
                 LEFT JOIN brokers b ON b.id = l.owner
                 WHERE g.status != 'gone' ORDER BY g.name",
                args![now],
            )?;
            Ok(rows
                .into_iter()
                .map(|(group, owner, address, epoch)| GroupOwner {
                    group,
                    owner,
                    address,
                    epoch,
                })
                .collect())
        })
        .await
    }

    /// A mark of each live group's row (name → the columns its actor
    /// follows, as text): a mark that changed tells the group's owner that
    /// an operator changed the group, possibly through another broker.
    pub async fn group_marks(&self) -> Result<BTreeMap<String, String>, StoreError> {
        self.read(|c| {
            let rows = c.query::<(String, String)>(
                "SELECT name,
                        CAST(updated_at AS TEXT) || '|' || CAST(policy_version AS TEXT) || '|'
                        || status || '|' || CAST(base_resources AS TEXT) || '|' || image || '|'
                        || COALESCE(CAST(expires_at AS TEXT), '') || '|'
                        || CAST(auto_renew AS TEXT) || '|' || policy
                 FROM groups WHERE status != 'gone'",
                args![],
            )?;
            Ok(rows.into_iter().collect())
        })
        .await
    }

    /// Who owns group `name` now, by its live lease; `None` when the group
    /// is unknown or gone.
    pub async fn owner_of(&self, name: &str) -> Result<Option<GroupOwner>, StoreError> {
        let name = name.to_owned();
        self.read(move |c| {
            let now = db_now(c)?;
            let row = c.query_opt::<(String, Option<String>, Option<String>, Option<i64>)>(
                "SELECT g.name, l.owner, b.address, l.epoch
                 FROM groups g
                 LEFT JOIN group_leases l ON l.group_num = g.num AND l.expires_at > ?2
                 LEFT JOIN brokers b ON b.id = l.owner
                 WHERE g.name = ?1 AND g.status != 'gone'",
                args![name, now],
            )?;
            Ok(row.map(|(group, owner, address, epoch)| GroupOwner {
                group,
                owner,
                address,
                epoch,
            }))
        })
        .await
    }
}

/// Who owns a group now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupOwner {
    pub group: String,
    /// The broker holding its lease; `None` while nobody does.
    pub owner: Option<String>,
    /// Where that broker is reached.
    pub address: Option<String>,
    pub epoch: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{on_postgres, open_for_test};
    use crate::store::GroupCommit;
    use ferry_common::UnixMillis;

    fn note() -> GroupCommit {
        GroupCommit {
            notes: vec![(UnixMillis(1), "scale-out", "a decision".into())],
            ..GroupCommit::default()
        }
    }

    #[tokio::test]
    async fn a_lease_has_one_owner_and_one_taken_over_fences_its_former_owner() {
        let tmp = tempfile::tempdir().expect("tmp");
        let a = open_for_test(tmp.path());
        a.insert_group_for_test(1, "g").await;
        // A second broker on the same store.
        let b = open_for_test(tmp.path());

        let view = a.lease_view("a", "a:1", false).await.expect("view");
        assert_eq!(view.groups, vec![(1, "g".to_owned())]);
        assert_eq!(view.brokers.len(), 1);
        let take = |epoch| {
            vec![LeaseChange::Acquire {
                group_num: 1,
                seen_epoch: epoch,
            }]
        };
        let held = a.apply_leases("a", 60_000, take(0)).await.expect("a takes");
        assert_eq!(held, Held::from([(1, 1)]));
        // Held: b cannot take it, with the epoch it saw or without.
        let held = b.apply_leases("b", 60_000, take(0)).await.expect("b");
        assert!(held.is_empty(), "{held:?}");
        let held = b.apply_leases("b", 60_000, take(1)).await.expect("b");
        assert!(held.is_empty(), "{held:?}");

        if on_postgres() {
            a.fences().enable("a");
            a.fences().set(Held::from([(1, 1)]));
            a.commit_group(1, "pay-as-you-go".into(), note())
                .await
                .expect("the owner writes");
        }
        // a does not renew in time (its renewal sets an expiry already
        // past), b takes the lease over: the epoch grows.
        let held = a
            .apply_leases(
                "a",
                -1,
                vec![LeaseChange::Renew {
                    group_num: 1,
                    epoch: 1,
                }],
            )
            .await
            .expect("a renews late");
        assert!(held.is_empty(), "{held:?}");
        let view = b.lease_view("b", "b:1", false).await.expect("b's view");
        assert_eq!(view.brokers.len(), 2);
        let held = b.apply_leases("b", 60_000, take(1)).await.expect("b takes");
        assert_eq!(held, Held::from([(1, 2)]));
        if on_postgres() {
            // a still thinks it owns the group at epoch 1: refused.
            let e = a
                .commit_group(1, "pay-as-you-go".into(), note())
                .await
                .expect_err("fenced");
            assert!(matches!(e, StoreError::Fenced { group_num: 1 }), "{e}");
            // Nor does any other write of the group's facts go in.
            let e = a
                .group_event(1, UnixMillis(1), "note", "late".into())
                .await
                .expect_err("fenced");
            assert!(matches!(e, StoreError::Fenced { group_num: 1 }), "{e}");
            b.fences().enable("b");
            b.fences().set(Held::from([(1, 2)]));
            b.commit_group(1, "pay-as-you-go".into(), note())
                .await
                .expect("the new owner writes");
            // A broker that holds no lease of the group writes nothing.
            b.fences().set(Held::new());
            assert!(matches!(
                b.commit_group(1, "pay-as-you-go".into(), note()).await,
                Err(StoreError::Fenced { group_num: 1 })
            ));
        }
        let owners = a.owners().await.expect("owners");
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].owner.as_deref(), Some("b"));
        assert_eq!(owners[0].epoch, Some(2));

        // Hand-over: b leaves, the lease is free at once.
        b.leave_cluster("b").await.expect("leave");
        let owners = a.owners().await.expect("owners");
        assert_eq!(owners[0].owner, None);
        let (_, brokers) = a.brokers().await.expect("brokers");
        assert!(brokers.iter().any(|x| x.id == "b" && x.leaving));
        let held = a.apply_leases("a", 60_000, take(2)).await.expect("a again");
        assert_eq!(held, Held::from([(1, 3)]));
        a.close().await;
        b.close().await;
    }
}
