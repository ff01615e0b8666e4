//! Certificate floors: per resource, every certificate issued before
//! `revoked_before_ms` is refused (`revocations`). An operator's
//! `resources revoke` sets it to the time of the revocation; the enrollment
//! of a name through a token sets it to the new certificate's issue time,
//! so a key an earlier machine of the same name kept is worthless. The
//! floor only ever moves up. The rule (refuse at the link, refuse renewal)
//! is the link's; this door keeps the rows.

use crate::store::sql::{args, columns, Db, OptionalExtension};
use ferry_common::{ResourceId, UnixMillis};

use super::{Store, StoreError};

/// One operator revocation, as `resources list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationRecord {
    pub resource: ResourceId,
    /// Certificates issued before this are refused.
    pub revoked_before: UnixMillis,
    pub at: UnixMillis,
    pub reason: String,
}

/// Raises the floor of `resource` to `before` (never lowers it) and
/// records who set it, in the caller's transaction: a floor that does not
/// move keeps its record, unless the operator sets it (an operator's
/// revocation stays listed until a new machine takes the name).
pub(super) fn raise_floor(
    c: &Db,
    resource: &str,
    before: UnixMillis,
    at: UnixMillis,
    reason: &str,
    by_operator: bool,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO revocations (resource, revoked_before_ms, at, reason, by_operator)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (resource) DO UPDATE SET
             revoked_before_ms = MAX(revocations.revoked_before_ms, excluded.revoked_before_ms),
             at = excluded.at, reason = excluded.reason, by_operator = excluded.by_operator
         WHERE excluded.revoked_before_ms > revocations.revoked_before_ms
            OR excluded.by_operator = 1",
        args![resource, before.0, at.0, reason, i64::from(by_operator)],
    )?;
    Ok(())
}

impl Store {
    /// The operator revokes `resource`: its certificates issued before
    /// `before` are refused from now on. Recorded as a `revoked` event of
    /// the group the resource last registered with, when that group is
    /// still there. Answers whether the broker knew the resource.
    pub async fn revoke(
        &self,
        resource: &ResourceId,
        before: UnixMillis,
        at: UnixMillis,
        reason: String,
    ) -> Result<bool, StoreError> {
        let resource = resource.to_string();
        self.exec(move |c| {
            raise_floor(c, &resource, before, at, &reason, true)?;
            let group: Option<Option<String>> = c
                .query_row(
                    "SELECT grp FROM resources WHERE resource = ?1",
                    args![&resource],
                    |r| r.get(0),
                )
                .optional()?;
            let num: Option<i64> = match group.as_ref().and_then(|g| g.as_deref()) {
                Some(g) => c
                    .query_row(
                        "SELECT num FROM groups WHERE name = ?1 AND status != 'gone'",
                        args![g],
                        |r| r.get(0),
                    )
                    .optional()?,
                None => None,
            };
            if let Some(num) = num {
                let message = format!(
                    "revoked: certificates of {resource} issued before now are refused ({reason})"
                );
                super::groups::event(c, num, at, "revoked", &message)?;
            }
            Ok(group.is_some())
        })
        .await
    }

    /// A certificate of `resource` was renewed over a link whose own
    /// certificate was issued at `current`: every older one is refused from
    /// now on (the link's own stays valid until the agent uses the new one).
    pub async fn retire_older_certificates(
        &self,
        resource: &ResourceId,
        current: UnixMillis,
    ) -> Result<(), StoreError> {
        let resource = resource.to_string();
        let at = crate::clock::now_millis();
        self.exec(move |c| raise_floor(c, &resource, current, at, "renewed over the link", false))
            .await
    }

    /// The floor of `resource`: certificates issued before it are refused.
    pub async fn revoked_before(
        &self,
        resource: &ResourceId,
    ) -> Result<Option<UnixMillis>, StoreError> {
        let resource = resource.to_string();
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT revoked_before_ms FROM revocations WHERE resource = ?1",
                args![resource],
                |r| r.get::<i64>(0),
            )
            .optional()?
            .map(UnixMillis))
        })
        .await
    }

    /// Every operator revocation, by resource.
    pub async fn revocations(&self) -> Result<Vec<RevocationRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT resource, revoked_before_ms, at, reason FROM revocations
                 WHERE by_operator = 1 ORDER BY resource",
            )?;
            let rows = stmt
                .query_map(args![], columns::<(String, i64, i64, String)>)?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(resource, before, at, reason)| {
                    Ok(RevocationRecord {
                        resource: super::parse_id(resource, "revoked resource")?,
                        revoked_before: UnixMillis(before),
                        at: UnixMillis(at),
                        reason,
                    })
                })
                .collect()
        })
        .await
    }
}
