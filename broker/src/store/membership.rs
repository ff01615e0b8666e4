//! The door to which group each host belongs: the operator's assignments
//! (`ferryctl resources assign`) and, for provisioned resources, the group
//! whose live `elastic_resources` record names them. An agent's `Hello`
//! only says which group it expects; it never decides (see `crate::link`).

use crate::store::sql::{args, Db, OptionalExtension};
use ferry_common::{GroupName, ResourceId, UnixMillis};

use super::groups::event;
use super::{Store, StoreError};

/// Where a host's membership comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipSource {
    /// `ferryctl resources assign` (or kept from before memberships were
    /// recorded, at the upgrade).
    Operator,
    /// The broker created it for the group through its provisioner (an
    /// elastic or provisioned base resource, enrolled with the group's
    /// one-time token).
    Provisioned,
}

/// The group a host belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub group: GroupName,
    pub source: MembershipSource,
}

/// What an assignment changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assigned {
    /// Recorded; `previous` is the group the host belonged to before.
    Done { previous: Option<GroupName> },
    /// The host is a provisioned resource of `group`: its membership is the
    /// provisioner's, not the operator's.
    Provisioned { group: GroupName },
}

/// A refused join is recorded again at most this often per message.
const REFUSED_JOIN_EVERY_MS: i64 = 3_600_000;

/// Event kind of membership changes and refused joins in `group events`.
pub const MEMBERSHIP_EVENT: &str = "membership";

fn name(text: String) -> Result<GroupName, StoreError> {
    text.parse()
        .map_err(|e| StoreError::Corrupt(format!("group name {text:?}: {e}")))
}

/// The hosts that belong to the group numbered `num` named `group`: those
/// the operator assigned to it and did not revoke, and its provisioned
/// resources that are ready (registered and not released), sorted. What a
/// rollout covers, joined now or not (an operator retires a host for good
/// with `resources unassign` or `resources revoke`).
pub(super) fn members(c: &Db, num: i64, group: &GroupName) -> Result<Vec<ResourceId>, StoreError> {
    let mut out = Vec::new();
    let mut assigned = c.prepare_cached(
        "SELECT m.resource FROM memberships m
         WHERE m.grp = ?1 AND NOT EXISTS (
             SELECT 1 FROM revocations r WHERE r.resource = m.resource AND r.by_operator = 1)",
    )?;
    for r in assigned.query_map(args![group.as_str()], |r| r.get::<String>(0))? {
        out.push(super::parse_id(r?, "resource")?);
    }
    let mut ready = c.prepare_cached(
        "SELECT resource FROM elastic_resources
         WHERE group_num = ?1 AND state = 'ready' AND deleted_at IS NULL",
    )?;
    for r in ready.query_map(args![num], |r| r.get::<String>(0))? {
        out.push(super::parse_id(r?, "resource")?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The group of `resource`'s live provisioned record, the newest first.
fn provisioned_group(c: &Db, resource: &str) -> Result<Option<GroupName>, StoreError> {
    c.prepare_cached(
        "SELECT g.name FROM elastic_resources e JOIN groups g ON g.num = e.group_num
         WHERE e.resource = ?1 AND e.deleted_at IS NULL AND e.state != 'failed'
         ORDER BY e.group_num DESC LIMIT 1",
    )?
    .query_row(args![resource], |r| r.get::<String>(0))
    .optional()?
    .map(name)
    .transpose()
}

fn assigned_group(c: &Db, resource: &str) -> Result<Option<GroupName>, StoreError> {
    c.prepare_cached("SELECT grp FROM memberships WHERE resource = ?1")?
        .query_row(args![resource], |r| r.get::<String>(0))
        .optional()?
        .map(name)
        .transpose()
}

fn membership(c: &Db, resource: &str) -> Result<Option<Membership>, StoreError> {
    if let Some(group) = provisioned_group(c, resource)? {
        return Ok(Some(Membership {
            group,
            source: MembershipSource::Provisioned,
        }));
    }
    Ok(assigned_group(c, resource)?.map(|group| Membership {
        group,
        source: MembershipSource::Operator,
    }))
}

/// The number of the live (not gone) group named `group`.
fn live_num(c: &Db, group: &GroupName) -> Result<Option<i64>, StoreError> {
    c.prepare_cached(
        "SELECT num FROM groups WHERE name = ?1 AND status != 'gone' ORDER BY num DESC LIMIT 1",
    )?
    .query_row(args![group.as_str()], |r| r.get::<i64>(0))
    .optional()
}

impl Store {
    /// The group `resource` belongs to, if any.
    pub async fn membership(
        &self,
        resource: &ResourceId,
    ) -> Result<Option<Membership>, StoreError> {
        let resource = resource.clone();
        self.read_with(move |c| membership(c, resource.as_str()))
            .await
    }

    /// Puts `resource` in `group` (`None`: in no group), the operator's
    /// decision, with a `membership` event in the groups it leaves and
    /// joins. Refused for a provisioned resource, unless to its own group.
    pub async fn assign_resource(
        &self,
        resource: &ResourceId,
        group: Option<GroupName>,
        now: UnixMillis,
    ) -> Result<Assigned, StoreError> {
        let resource = resource.clone();
        self.exec(move |c| {
            if let Some(owner) = provisioned_group(c, resource.as_str())? {
                if group.as_ref() == Some(&owner) {
                    return Ok(Assigned::Done { previous: group });
                }
                return Ok(Assigned::Provisioned { group: owner });
            }
            let previous = assigned_group(c, resource.as_str())?;
            if previous == group {
                return Ok(Assigned::Done { previous });
            }
            match &group {
                Some(g) => {
                    c.execute(
                        "INSERT INTO memberships (resource, grp, assigned_at, source)
                         VALUES (?1, ?2, ?3, 'operator')
                         ON CONFLICT (resource) DO UPDATE SET grp = excluded.grp,
                             assigned_at = excluded.assigned_at, source = 'operator'",
                        args![resource.as_str(), g.as_str(), now.0],
                    )?;
                }
                None => {
                    c.execute(
                        "DELETE FROM memberships WHERE resource = ?1",
                        args![resource.as_str()],
                    )?;
                }
            }
            if let Some(p) = &previous {
                if let Some(num) = live_num(c, p)? {
                    let to = match &group {
                        Some(g) => format!("moved to group {g}"),
                        None => "in no group now".to_owned(),
                    };
                    let message = format!(
                        "resource {resource} left group {p} by the operator's command: {to}"
                    );
                    event(c, num, now, MEMBERSHIP_EVENT, &message)?;
                }
            }
            if let Some(g) = &group {
                if let Some(num) = live_num(c, g)? {
                    let message =
                        format!("resource {resource} assigned to group {g} by the operator");
                    event(c, num, now, MEMBERSHIP_EVENT, &message)?;
                }
            }
            Ok(Assigned::Done { previous })
        })
        .await
    }

    /// Records in group `named` (when it exists) that a host asked to join
    /// it and was refused, unless the same refusal was recorded within
    /// the last hour (agents retrying do not fill the log).
    pub async fn refused_join(
        &self,
        named: &GroupName,
        message: String,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let named = named.clone();
        self.exec(move |c| {
            let Some(num) = live_num(c, &named)? else {
                return Ok(());
            };
            let recent = c
                .prepare_cached(
                    "SELECT 1 FROM group_events
                     WHERE group_num = ?1 AND kind = ?2 AND message = ?3 AND at > ?4 LIMIT 1",
                )?
                .query_row(
                    args![
                        num,
                        MEMBERSHIP_EVENT,
                        message,
                        now.0.saturating_sub(REFUSED_JOIN_EVERY_MS)
                    ],
                    |r| r.get::<i64>(0),
                )
                .optional()?;
            if recent.is_some() {
                return Ok(());
            }
            event(c, num, now, MEMBERSHIP_EVENT, &message)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{open_store, rid};

    fn g(s: &str) -> GroupName {
        s.parse().expect("group name")
    }

    /// Group 7, `burst`, published, with elastic records of
    /// `(engine_id, resource, state)`.
    fn burst_with(c: &Db, rows: &[(&str, &str, &str)]) -> Result<(), StoreError> {
        c.execute_batch(
            "INSERT INTO groups (num, id, name, region, office_network, spec, image, billing,
                 term, auto_renew, base_resources, session_type, policy, status, created_at,
                 updated_at)
             VALUES (7, 'dg-7', 'burst', 'r', 'n', 's', 'i', 'pay-as-you-go', NULL, 0, 0,
                 'independent', '{}', 'published', 0, 0);",
        )?;
        for (engine_id, resource, state) in rows {
            c.execute(
                "INSERT INTO elastic_resources (group_num, engine_id, resource, state,
                     requested_at) VALUES (7, ?1, ?2, ?3, 0)",
                args![engine_id, resource, state],
            )?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn assignments_are_the_operators_and_provisioned_names_are_not_assignable() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = open_store(tmp.path());
        let h1 = rid("h1");
        assert_eq!(store.membership(&h1).await.expect("read"), None);
        let done = store
            .assign_resource(&h1, Some(g("design")), UnixMillis(1))
            .await
            .expect("assign");
        assert_eq!(done, Assigned::Done { previous: None });
        assert_eq!(
            store.membership(&h1).await.expect("read"),
            Some(Membership {
                group: g("design"),
                source: MembershipSource::Operator
            })
        );
        let moved = store
            .assign_resource(&h1, Some(g("sales")), UnixMillis(2))
            .await
            .expect("move");
        assert_eq!(
            moved,
            Assigned::Done {
                previous: Some(g("design"))
            }
        );
        store
            .assign_resource(&h1, None, UnixMillis(3))
            .await
            .expect("unassign");
        assert_eq!(store.membership(&h1).await.expect("read"), None);

        // A live provisioned record decides, whatever the operator says.
        store
            .exec(|c| {
                burst_with(c, &[("e1", "burst-e1", "pending")])?;
                Ok(())
            })
            .await
            .expect("provisioned row");
        let e1 = rid("burst-e1");
        assert_eq!(
            store.membership(&e1).await.expect("read"),
            Some(Membership {
                group: g("burst"),
                source: MembershipSource::Provisioned
            })
        );
        assert_eq!(
            store
                .assign_resource(&e1, Some(g("design")), UnixMillis(4))
                .await
                .expect("answered"),
            Assigned::Provisioned { group: g("burst") }
        );
        // Its own group: nothing to change.
        assert_eq!(
            store
                .assign_resource(&e1, Some(g("burst")), UnixMillis(5))
                .await
                .expect("answered"),
            Assigned::Done {
                previous: Some(g("burst"))
            }
        );
    }

    #[tokio::test]
    async fn a_groups_members_are_its_assigned_hosts_not_revoked_and_its_ready_provisioned_ones() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = open_store(tmp.path());
        for h in ["h1", "h2", "h3"] {
            store
                .assign_resource(&rid(h), Some(g("burst")), UnixMillis(1))
                .await
                .expect("assign");
        }
        store
            .assign_resource(&rid("other"), Some(g("sales")), UnixMillis(1))
            .await
            .expect("assign");
        store
            .revoke(&rid("h3"), UnixMillis(5), UnixMillis(5), "retired".into())
            .await
            .expect("revoke");
        let members = store
            .exec(|c| {
                burst_with(
                    c,
                    &[
                        ("e1", "burst-e1", "ready"),
                        ("e2", "burst-e2", "pending"),
                        ("e3", "burst-e3", "released"),
                    ],
                )?;
                members(c, 7, &g("burst"))
            })
            .await
            .expect("members");
        assert_eq!(members, [rid("burst-e1"), rid("h1"), rid("h2")]);
    }
}
