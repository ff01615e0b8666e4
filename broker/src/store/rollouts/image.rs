//! The rows of image updates and each resource's outcome, and the
//! versions each resource of a group reported.

use std::collections::BTreeMap;

use crate::store::sql::{args, columns, Db, Value};
use ferry_common::{ResourceId, SessionId, UnixMillis};

use super::{to_i64, GroupEvent, GroupRef};
use crate::store::StoreError;

/// What `group update-image` records: the update, the group's status
/// while it runs and the status event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewImageUpdate {
    pub image: String,
    pub warning_ms: u64,
    pub started_at: UnixMillis,
    /// When warned sessions are disconnected and the switch starts.
    pub disconnect_at: UnixMillis,
    /// The group's status from now on.
    pub status: String,
    /// The status event.
    pub event: GroupEvent,
}

/// Ends the group's running image update, if one runs, as `failed`: the
/// group left `updating` by other means (it expired, then was renewed).
pub(super) fn fail_running_image_updates(
    c: &Db,
    group_num: i64,
    at: UnixMillis,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE image_updates SET state = 'failed', finished_at = ?2
         WHERE group_num = ?1 AND state = 'running'",
        args![group_num, at.0],
    )?;
    Ok(())
}

/// Records an image update of group `g` (state `running`), from its
/// image now; returns its id.
pub(super) fn insert_image_update(
    c: &Db,
    g: &GroupRef,
    u: &NewImageUpdate,
) -> Result<i64, StoreError> {
    let id: i64 = c.query_one(
        "INSERT INTO image_updates (group_num, image, previous_image, warning_ms,
             started_at, disconnect_at, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running') RETURNING id",
        args![
            g.num,
            u.image,
            g.image,
            to_i64(u.warning_ms, "warning")?,
            u.started_at.0,
            u.disconnect_at.0
        ],
    )?;
    Ok(id)
}

/// An image update's row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageUpdateRow {
    pub id: i64,
    pub group_num: i64,
    pub image: String,
    /// When the operator asked for it.
    pub started_at: UnixMillis,
    /// When warned sessions are disconnected and the switch starts.
    pub disconnect_at: UnixMillis,
    /// `running`, `succeeded` or `failed`.
    pub state: String,
}

pub(super) fn image_updates_where(
    c: &Db,
    clause: &str,
    param: &[Value<'_>],
) -> Result<Vec<ImageUpdateRow>, StoreError> {
    let sql = format!(
        "SELECT id, group_num, image, started_at, disconnect_at, state FROM image_updates
         WHERE {clause} ORDER BY id"
    );
    let mut stmt = c.prepare(&sql)?;
    let rows = stmt.query_map(param, |r| {
        Ok(ImageUpdateRow {
            id: r.get(0)?,
            group_num: r.get(1)?,
            image: r.get(2)?,
            started_at: UnixMillis(r.get(3)?),
            disconnect_at: UnixMillis(r.get(4)?),
            state: r.get(5)?,
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>()
}

/// One image update.
pub(super) fn image_update(c: &Db, id: i64) -> Result<Option<ImageUpdateRow>, StoreError> {
    Ok(image_updates_where(c, "id = ?1", args![id])?
        .into_iter()
        .next())
}

/// Every running image update (at most one per group).
pub(super) fn running_image_updates(c: &Db) -> Result<Vec<ImageUpdateRow>, StoreError> {
    image_updates_where(c, "state = 'running'", args![])
}

/// One resource's outcome in an image update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageResultRow {
    pub resource: ResourceId,
    /// `pending`, `done` or `failed`.
    pub outcome: String,
    /// What happened (the failure for `failed`).
    pub detail: String,
}

/// The resources of an image update's switch with their outcomes, by
/// resource (empty until the switch began). A resource id that no longer
/// parses is left out.
pub(super) fn image_results(c: &Db, id: i64) -> Result<Vec<ImageResultRow>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT resource, outcome, detail FROM image_update_results
         WHERE update_id = ?1 ORDER BY resource",
    )?;
    let rows = stmt.query_map(args![id], columns::<(String, String, String)>)?;
    let mut out = Vec::new();
    for row in rows {
        let (resource, outcome, detail) = row?;
        if let Ok(resource) = resource.parse() {
            out.push(ImageResultRow {
                resource,
                outcome,
                detail,
            });
        }
    }
    Ok(out)
}

/// Resources the group's last finished image update failed on (and drained).
pub(super) fn failed_in_last_image_update(
    c: &Db,
    group_num: i64,
) -> Result<Vec<ResourceId>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT resource FROM image_update_results
         WHERE outcome = 'failed' AND update_id = (SELECT MAX(id) FROM image_updates
             WHERE group_num = ?1 AND state != 'running')",
    )?;
    let rows = stmt.query_map(args![group_num], |r| r.get::<String>(0))?;
    let mut out = Vec::new();
    for row in rows {
        if let Ok(r) = row?.parse() {
            out.push(r);
        }
    }
    Ok(out)
}

/// Each resource's outcome in the group's latest image update, as `group
/// show` has it: `pending`, `done` or `failed: <why>`.
pub(super) fn latest_image_outcomes(
    c: &Db,
    group_num: i64,
) -> Result<BTreeMap<String, String>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT resource, outcome, detail FROM image_update_results
         WHERE update_id = (SELECT MAX(id) FROM image_updates WHERE group_num = ?1)",
    )?;
    let rows = stmt.query_map(args![group_num], |r| {
        let (resource, outcome, detail): (String, String, String) =
            (r.get(0)?, r.get(1)?, r.get(2)?);
        Ok((
            resource,
            if outcome == "failed" {
                format!("failed: {detail}")
            } else {
                outcome
            },
        ))
    })?;
    rows.collect::<Result<BTreeMap<_, _>, _>>()
}

/// Adds resources to an image update's switch as `pending` (a resource
/// already in it keeps its outcome).
pub(super) fn insert_image_pending(
    c: &Db,
    id: i64,
    resources: &[ResourceId],
) -> Result<(), StoreError> {
    for r in resources {
        c.execute(
            "INSERT OR IGNORE INTO image_update_results (update_id, resource, outcome, detail, at)
             SELECT ?1, ?2, 'pending', '', started_at FROM image_updates WHERE id = ?1",
            args![id, r.as_str()],
        )?;
    }
    Ok(())
}

/// Records a resource's outcome in an image update: `done` or `failed`.
pub(super) fn set_image_outcome(
    c: &Db,
    id: i64,
    resource: &ResourceId,
    ok: bool,
    detail: &str,
    at: UnixMillis,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO image_update_results (update_id, resource, outcome, detail, at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (update_id, resource) DO UPDATE
             SET outcome = excluded.outcome, detail = excluded.detail, at = excluded.at",
        args![
            id,
            resource.as_str(),
            if ok { "done" } else { "failed" },
            detail,
            at.0
        ],
    )?;
    Ok(())
}

/// Ends an image update: `succeeded` or `failed`.
pub(super) fn end_image_update(
    c: &Db,
    id: i64,
    ok: bool,
    at: UnixMillis,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE image_updates SET state = ?2, finished_at = ?3 WHERE id = ?1",
        args![id, if ok { "succeeded" } else { "failed" }, at.0],
    )?;
    Ok(())
}

/// The sessions recorded open on the resources registered with group
/// `name`, by resource, whether or not their agents are connected now.
pub(super) fn open_sessions_of_group(
    c: &Db,
    name: &str,
) -> Result<Vec<(ResourceId, SessionId)>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT s.resource, s.session FROM sessions s
         JOIN resources r ON r.resource = s.resource
         WHERE r.grp = ?1 AND s.ended_at IS NULL ORDER BY s.resource, s.session",
    )?;
    let rows = stmt.query_map(args![name], |r| {
        Ok((r.get::<String>(0)?, r.get::<String>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (resource, session) = row?;
        if let (Ok(r), Ok(s)) = (resource.parse(), session.parse()) {
            out.push((r, s));
        }
    }
    Ok(out)
}

/// What a resource registered with a group last reported running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredVersions {
    pub resource: String,
    pub agent_version: String,
    pub image_version: String,
}

/// The versions of every resource registered with group `name`, by resource.
pub(super) fn resource_versions(c: &Db, name: &str) -> Result<Vec<StoredVersions>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT resource, agent_version, image_version FROM resources
         WHERE grp = ?1 ORDER BY resource",
    )?;
    let rows = stmt.query_map(args![name], |r| {
        Ok(StoredVersions {
            resource: r.get(0)?,
            agent_version: r.get(1)?,
            image_version: r.get(2)?,
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>()
}
