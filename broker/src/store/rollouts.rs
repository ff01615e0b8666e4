//! The door to the rollouts' rows: OTA offers, schedules and each
//! resource's outcome (migration "OTA updates"), image updates and each
//! resource's outcome (migration "Image updates"), and what a rollout reads
//! and writes of its group (status, image, events, open sessions).
//!
//! Plain functions on the connection a [`crate::store::Store::exec`] (writes)
//! or [`crate::store::Store::read_with`] (reads) closure is given, so a
//! caller composes several in one transaction and every change is committed
//! before anyone is told about it. Every row comes back as a typed struct;
//! no SQL is written anywhere else for these tables.

use std::collections::BTreeMap;

use ferry_common::admin::{OtaResourceInfo, OtaScheduleInfo, OtaUpdateInfo};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis};
use rusqlite::{params, Connection, OptionalExtension};

use crate::store::StoreError;

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| corrupt(format!("{what} {v} is negative")))
}

fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| corrupt(format!("{what} {v} does not fit")))
}

/// A group's row, as OTA needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRef {
    pub num: i64,
    pub name: GroupName,
    pub status: String,
    /// `subscription` or `pay-as-you-go`.
    pub billing: String,
    /// The image hosts created from now on start from.
    pub image: String,
}

/// The group named `group` (a live name first, else an id or a gone name).
pub fn find_group(c: &Connection, group: &str) -> Result<Option<GroupRef>, StoreError> {
    let row = c
        .query_row(
            "SELECT num, name, status, billing, image FROM groups WHERE id = ?1 OR name = ?1
             ORDER BY (status != 'gone') DESC, num DESC LIMIT 1",
            [group],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            },
        )
        .optional()?;
    row.map(|(num, name, status, billing, image)| {
        Ok(GroupRef {
            num,
            name: name.parse().map_err(corrupt)?,
            status,
            billing,
            image,
        })
    })
    .transpose()
}

/// The group of number `num`.
pub fn group_by_num(c: &Connection, num: i64) -> Result<GroupRef, StoreError> {
    let (name, status, billing, image): (String, String, String, String) = c.query_row(
        "SELECT name, status, billing, image FROM groups WHERE num = ?1",
        [num],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    Ok(GroupRef {
        num,
        name: name.parse().map_err(corrupt)?,
        status,
        billing,
        image,
    })
}

/// Writes a group event.
pub fn event(
    c: &Connection,
    group_num: i64,
    at: UnixMillis,
    kind: &str,
    message: &str,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO group_events (group_num, at, kind, message) VALUES (?1, ?2, ?3, ?4)",
        params![group_num, at.0, kind, message],
    )?;
    Ok(())
}

/// What an offer is made of.
pub struct NewUpdate<'a> {
    pub group_num: i64,
    pub component: &'a str,
    pub version: &'a str,
    pub package: &'a str,
    pub description: &'a str,
    pub at: UnixMillis,
}

/// Records an offer; returns its id.
pub fn insert_update(c: &Connection, u: &NewUpdate<'_>) -> Result<u64, StoreError> {
    c.execute(
        "INSERT INTO ota_updates (group_num, component, version, package, description, offered_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            u.group_num,
            u.component,
            u.version,
            u.package,
            u.description,
            u.at.0
        ],
    )?;
    to_u64(c.last_insert_rowid(), "update id")
}

const UPDATE_COLUMNS: &str =
    "u.id, g.name, u.component, u.version, u.package, u.description, u.offered_at, u.group_num";

fn read_update(r: &rusqlite::Row<'_>) -> Result<(OtaUpdateInfo, i64), StoreError> {
    let name: String = r.get(1)?;
    Ok((
        OtaUpdateInfo {
            id: to_u64(r.get(0)?, "update id")?,
            group: name.parse().map_err(corrupt)?,
            component: r.get(2)?,
            version: r.get(3)?,
            package: r.get(4)?,
            description: r.get(5)?,
            offered_at: UnixMillis(r.get(6)?),
        },
        r.get(7)?,
    ))
}

/// One offer and its group's number.
pub fn update(c: &Connection, id: u64) -> Result<Option<(OtaUpdateInfo, i64)>, StoreError> {
    let sql = format!(
        "SELECT {UPDATE_COLUMNS} FROM ota_updates u JOIN groups g ON g.num = u.group_num
         WHERE u.id = ?1"
    );
    let mut stmt = c.prepare(&sql)?;
    let mut rows = stmt.query([to_i64(id, "update id")?])?;
    match rows.next()? {
        Some(r) => Ok(Some(read_update(r)?)),
        None => Ok(None),
    }
}

/// Offers, of one group (by number) or all, oldest first.
pub fn updates(c: &Connection, group_num: Option<i64>) -> Result<Vec<OtaUpdateInfo>, StoreError> {
    let sql = format!(
        "SELECT {UPDATE_COLUMNS} FROM ota_updates u JOIN groups g ON g.num = u.group_num
         WHERE ?1 IS NULL OR u.group_num = ?1 ORDER BY u.id"
    );
    let mut stmt = c.prepare(&sql)?;
    let mut rows = stmt.query([group_num])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(read_update(r)?.0);
    }
    Ok(out)
}

/// A schedule's row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleRow {
    pub id: u64,
    pub update_id: u64,
    pub group_num: i64,
    pub start: UnixMillis,
    pub wave: u32,
    pub drain_ms: u64,
    pub state: String,
    pub created_at: UnixMillis,
    pub started_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    pub detail: Option<String>,
}

const SCHEDULE_COLUMNS: &str = "id, update_id, group_num, start_at, wave, drain_ms, state,
    created_at, started_at, finished_at, detail";

fn read_schedule(r: &rusqlite::Row<'_>) -> Result<ScheduleRow, StoreError> {
    let wave: i64 = r.get(4)?;
    Ok(ScheduleRow {
        id: to_u64(r.get(0)?, "schedule id")?,
        update_id: to_u64(r.get(1)?, "update id")?,
        group_num: r.get(2)?,
        start: UnixMillis(r.get(3)?),
        wave: u32::try_from(wave).map_err(corrupt)?,
        drain_ms: to_u64(r.get(5)?, "drain")?,
        state: r.get(6)?,
        created_at: UnixMillis(r.get(7)?),
        started_at: r.get::<_, Option<i64>>(8)?.map(UnixMillis),
        finished_at: r.get::<_, Option<i64>>(9)?.map(UnixMillis),
        detail: r.get(10)?,
    })
}

fn schedules_where(
    c: &Connection,
    clause: &str,
    param: impl rusqlite::Params,
) -> Result<Vec<ScheduleRow>, StoreError> {
    let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM ota_schedules WHERE {clause} ORDER BY id");
    let mut stmt = c.prepare(&sql)?;
    let mut rows = stmt.query(param)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(read_schedule(r)?);
    }
    Ok(out)
}

/// One schedule.
pub fn schedule(c: &Connection, id: u64) -> Result<Option<ScheduleRow>, StoreError> {
    Ok(schedules_where(c, "id = ?1", [to_i64(id, "schedule id")?])?
        .into_iter()
        .next())
}

/// Every schedule still to start or running (the rollout timer's work).
pub fn active_schedules(c: &Connection) -> Result<Vec<ScheduleRow>, StoreError> {
    schedules_where(c, "state IN ('scheduled', 'running')", [])
}

/// The group's running schedule, if any.
pub fn running_of_group(c: &Connection, group_num: i64) -> Result<Option<ScheduleRow>, StoreError> {
    Ok(
        schedules_where(c, "group_num = ?1 AND state = 'running'", [group_num])?
            .into_iter()
            .next(),
    )
}

/// The group's scheduled or running schedule, if any.
pub fn active_of_group(c: &Connection, group_num: i64) -> Result<Option<ScheduleRow>, StoreError> {
    Ok(schedules_where(
        c,
        "group_num = ?1 AND state IN ('scheduled', 'running')",
        [group_num],
    )?
    .into_iter()
    .next())
}

/// Every schedule, of one group (by number) or all, oldest first.
pub fn schedules(c: &Connection, group_num: Option<i64>) -> Result<Vec<ScheduleRow>, StoreError> {
    schedules_where(c, "?1 IS NULL OR group_num = ?1", [group_num])
}

/// Every schedule of a group, oldest first.
pub fn schedules_of_group(c: &Connection, group_num: i64) -> Result<Vec<ScheduleRow>, StoreError> {
    schedules_where(c, "group_num = ?1", [group_num])
}

/// What a schedule is made of.
pub struct NewSchedule {
    pub update_id: u64,
    pub group_num: i64,
    pub start: UnixMillis,
    pub wave: u32,
    pub drain_ms: u64,
    pub at: UnixMillis,
}

/// Records a schedule (state `scheduled`); returns its id.
pub fn insert_schedule(c: &Connection, s: &NewSchedule) -> Result<u64, StoreError> {
    c.execute(
        "INSERT INTO ota_schedules (update_id, group_num, start_at, wave, drain_ms, state, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 'scheduled', ?6)",
        params![
            to_i64(s.update_id, "update id")?,
            s.group_num,
            s.start.0,
            s.wave,
            to_i64(s.drain_ms, "drain")?,
            s.at.0
        ],
    )?;
    to_u64(c.last_insert_rowid(), "schedule id")
}

/// Moves the start of a schedule still `scheduled`; whether it was.
pub fn set_start(c: &Connection, id: u64, start: UnixMillis) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE ota_schedules SET start_at = ?2 WHERE id = ?1 AND state = 'scheduled'",
        params![to_i64(id, "schedule id")?, start.0],
    )?;
    Ok(n == 1)
}

/// Makes `image` the group's image; whether it changed.
pub fn set_group_image(
    c: &Connection,
    num: i64,
    image: &str,
    at: UnixMillis,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE groups SET image = ?2, updated_at = ?3 WHERE num = ?1 AND image != ?2",
        params![num, image, at.0],
    )?;
    Ok(n == 1)
}

/// Moves a schedule from state `from` to `to`, stamping the start (for
/// `running`) or the end (for the final states); whether it was in `from`.
pub fn set_state(
    c: &Connection,
    id: u64,
    from: &str,
    to: &str,
    at: UnixMillis,
    detail: Option<&str>,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE ota_schedules SET state = ?3,
            started_at = CASE WHEN ?3 = 'running' THEN ?4 ELSE started_at END,
            finished_at = CASE WHEN ?3 = 'running' THEN finished_at ELSE ?4 END,
            detail = COALESCE(?5, detail)
         WHERE id = ?1 AND state = ?2",
        params![to_i64(id, "schedule id")?, from, to, at.0, detail],
    )?;
    Ok(n == 1)
}

/// A resource's row in a rollout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultRow {
    pub position: u32,
    pub resource: ResourceId,
    /// `pending`, `draining`, `updating`, `done`, `failed` or `skipped`.
    pub state: String,
    pub started_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    pub detail: Option<String>,
}

impl From<ResultRow> for OtaResourceInfo {
    fn from(r: ResultRow) -> Self {
        OtaResourceInfo {
            resource: r.resource,
            state: r.state,
            started_at: r.started_at,
            finished_at: r.finished_at,
            detail: r.detail,
        }
    }
}

/// The resources of a rollout, in update order.
pub fn results(c: &Connection, schedule: u64) -> Result<Vec<ResultRow>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT position, resource, state, started_at, finished_at, detail FROM ota_results
         WHERE schedule_id = ?1 ORDER BY position",
    )?;
    let mut rows = stmt.query([to_i64(schedule, "schedule id")?])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let position: i64 = r.get(0)?;
        let resource: String = r.get(1)?;
        out.push(ResultRow {
            position: u32::try_from(position).map_err(corrupt)?,
            resource: resource.parse().map_err(corrupt)?,
            state: r.get(2)?,
            started_at: r.get::<_, Option<i64>>(3)?.map(UnixMillis),
            finished_at: r.get::<_, Option<i64>>(4)?.map(UnixMillis),
            detail: r.get(5)?,
        });
    }
    Ok(out)
}

/// Resources of group `num` whose latest OTA step failed: drained by that
/// failure, they belong in the next rollout (which undrains them when it
/// succeeds).
pub fn failed_resources(c: &Connection, group_num: i64) -> Result<Vec<ResourceId>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT r.resource FROM ota_results r JOIN ota_schedules s ON s.id = r.schedule_id
         WHERE s.group_num = ?1 AND r.state = 'failed'
           AND r.schedule_id = (SELECT MAX(r2.schedule_id) FROM ota_results r2
                                JOIN ota_schedules s2 ON s2.id = r2.schedule_id
                                WHERE s2.group_num = ?1 AND r2.resource = r.resource
                                  AND r2.state NOT IN ('pending', 'skipped'))
         ORDER BY r.resource",
    )?;
    let rows = stmt.query_map([group_num], |r| r.get::<_, String>(0))?;
    rows.map(|r| {
        let r = r?;
        r.parse()
            .map_err(|e| StoreError::Corrupt(format!("OTA result resource {r:?}: {e}")))
    })
    .collect()
}

/// Records the rollout's resources (all `pending`), in this order.
pub fn insert_plan(
    c: &Connection,
    schedule: u64,
    resources: &[ResourceId],
) -> Result<(), StoreError> {
    let id = to_i64(schedule, "schedule id")?;
    for (i, r) in resources.iter().enumerate() {
        c.execute(
            "INSERT INTO ota_results (schedule_id, position, resource, state)
             VALUES (?1, ?2, ?3, 'pending')",
            params![id, i as i64, r.as_str()],
        )?;
    }
    Ok(())
}

/// Moves a resource of a rollout to `state`. `started_at` is set the first
/// time it leaves `pending` (and kept after: its drain deadline counts from
/// it); `finished_at` when it is `done` or `failed`.
pub fn set_result(
    c: &Connection,
    schedule: u64,
    resource: &ResourceId,
    state: &str,
    at: UnixMillis,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE ota_results SET state = ?3,
            started_at = COALESCE(started_at, ?4),
            finished_at = CASE WHEN ?3 IN ('done', 'failed') THEN ?4 ELSE finished_at END,
            detail = COALESCE(?5, detail)
         WHERE schedule_id = ?1 AND resource = ?2",
        params![
            to_i64(schedule, "schedule id")?,
            resource.as_str(),
            state,
            at.0,
            detail
        ],
    )?;
    Ok(())
}

/// Open sessions on a resource (the durable record).
pub fn open_sessions(
    c: &Connection,
    resource: &ResourceId,
) -> Result<Vec<ferry_common::SessionId>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT session FROM sessions WHERE resource = ?1 AND ended_at IS NULL ORDER BY id",
    )?;
    let mut rows = stmt.query([resource.as_str()])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let s: String = r.get(0)?;
        out.push(s.parse().map_err(corrupt)?);
    }
    Ok(out)
}

/// Sets the group's status to `to` (when it is still `from`), with an
/// event; whether it changed.
pub fn set_group_status(
    c: &Connection,
    group_num: i64,
    from: &str,
    to: &str,
    at: UnixMillis,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE groups SET status = ?3, updated_at = ?4 WHERE num = ?1 AND status = ?2",
        params![group_num, from, to, at.0],
    )?;
    Ok(n == 1)
}

/// The schedule as operators see it.
pub fn schedule_info(c: &Connection, row: ScheduleRow) -> Result<OtaScheduleInfo, StoreError> {
    let (update, _) = update(c, row.update_id)?
        .ok_or_else(|| corrupt(format!("schedule {} names no update", row.id)))?;
    let resources = results(c, row.id)?
        .into_iter()
        .map(OtaResourceInfo::from)
        .collect();
    Ok(OtaScheduleInfo {
        id: row.id,
        update,
        start: row.start,
        wave: row.wave,
        drain_ms: row.drain_ms,
        state: row.state,
        created_at: row.created_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
        detail: row.detail,
        resources,
    })
}

/// The live (not gone) group named `group` (a name or an id).
pub fn live_group(c: &Connection, group: &str) -> Result<Option<GroupRef>, StoreError> {
    let row = c
        .query_row(
            "SELECT num FROM groups
             WHERE (id = ?1 OR name = ?1) AND status != 'gone' ORDER BY num DESC LIMIT 1",
            [group],
            |r| r.get::<_, i64>(0),
        )
        .optional()?;
    row.map(|num| group_by_num(c, num)).transpose()
}

/// What `group update-image` records.
pub struct NewImageUpdate<'a> {
    pub group_num: i64,
    pub image: &'a str,
    /// The group's image before it.
    pub previous_image: &'a str,
    pub warning_ms: u64,
    pub started_at: UnixMillis,
    /// When warned sessions are disconnected and the switch starts.
    pub disconnect_at: UnixMillis,
}

/// Ends the group's running image update, if one runs, as `failed`: the
/// group left `updating` by other means (it expired, then was renewed).
pub fn fail_running_image_updates(
    c: &Connection,
    group_num: i64,
    at: UnixMillis,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE image_updates SET state = 'failed', finished_at = ?2
         WHERE group_num = ?1 AND state = 'running'",
        params![group_num, at.0],
    )?;
    Ok(())
}

/// Records an image update (state `running`); returns its id.
pub fn insert_image_update(c: &Connection, u: &NewImageUpdate<'_>) -> Result<i64, StoreError> {
    c.execute(
        "INSERT INTO image_updates (group_num, image, previous_image, warning_ms,
             started_at, disconnect_at, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running')",
        params![
            u.group_num,
            u.image,
            u.previous_image,
            to_i64(u.warning_ms, "warning")?,
            u.started_at.0,
            u.disconnect_at.0
        ],
    )?;
    Ok(c.last_insert_rowid())
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

fn image_updates_where(
    c: &Connection,
    clause: &str,
    param: impl rusqlite::Params,
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
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// One image update.
pub fn image_update(c: &Connection, id: i64) -> Result<Option<ImageUpdateRow>, StoreError> {
    Ok(image_updates_where(c, "id = ?1", [id])?.into_iter().next())
}

/// The group's running image update, if any.
pub fn running_image_update(
    c: &Connection,
    group_num: i64,
) -> Result<Option<ImageUpdateRow>, StoreError> {
    Ok(
        image_updates_where(c, "group_num = ?1 AND state = 'running'", [group_num])?
            .into_iter()
            .next(),
    )
}

/// Every running image update (at most one per group).
pub fn running_image_updates(c: &Connection) -> Result<Vec<ImageUpdateRow>, StoreError> {
    image_updates_where(c, "state = 'running'", [])
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
pub fn image_results(c: &Connection, id: i64) -> Result<Vec<ImageResultRow>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT resource, outcome, detail FROM image_update_results
         WHERE update_id = ?1 ORDER BY resource",
    )?;
    let rows = stmt.query_map([id], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
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
pub fn failed_in_last_image_update(
    c: &Connection,
    group_num: i64,
) -> Result<Vec<ResourceId>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT resource FROM image_update_results
         WHERE outcome = 'failed' AND update_id = (SELECT MAX(id) FROM image_updates
             WHERE group_num = ?1 AND state != 'running')",
    )?;
    let rows = stmt.query_map([group_num], |r| r.get::<_, String>(0))?;
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
pub fn latest_image_outcomes(
    c: &Connection,
    group_num: i64,
) -> Result<BTreeMap<String, String>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT resource, outcome, detail FROM image_update_results
         WHERE update_id = (SELECT MAX(id) FROM image_updates WHERE group_num = ?1)",
    )?;
    let rows = stmt.query_map([group_num], |r| {
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
    Ok(rows.collect::<Result<BTreeMap<_, _>, _>>()?)
}

/// Adds resources to an image update's switch as `pending` (a resource
/// already in it keeps its outcome).
pub fn insert_image_pending(
    c: &Connection,
    id: i64,
    resources: &[ResourceId],
) -> Result<(), StoreError> {
    for r in resources {
        c.execute(
            "INSERT OR IGNORE INTO image_update_results (update_id, resource, outcome, detail, at)
             SELECT ?1, ?2, 'pending', '', started_at FROM image_updates WHERE id = ?1",
            params![id, r.as_str()],
        )?;
    }
    Ok(())
}

/// Records a resource's outcome in an image update: `done` or `failed`.
pub fn set_image_outcome(
    c: &Connection,
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
        params![
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
pub fn end_image_update(
    c: &Connection,
    id: i64,
    ok: bool,
    at: UnixMillis,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE image_updates SET state = ?2, finished_at = ?3 WHERE id = ?1",
        params![id, if ok { "succeeded" } else { "failed" }, at.0],
    )?;
    Ok(())
}

/// The sessions recorded open on the resources registered with group
/// `name`, by resource, whether or not their agents are connected now.
pub fn open_sessions_of_group(
    c: &Connection,
    name: &str,
) -> Result<Vec<(ResourceId, SessionId)>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT s.resource, s.session FROM sessions s
         JOIN resources r ON r.resource = s.resource
         WHERE r.grp = ?1 AND s.ended_at IS NULL ORDER BY s.resource, s.session",
    )?;
    let rows = stmt.query_map([name], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
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
pub fn resource_versions(c: &Connection, name: &str) -> Result<Vec<StoredVersions>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT resource, agent_version, image_version FROM resources
         WHERE grp = ?1 ORDER BY resource",
    )?;
    let rows = stmt.query_map([name], |r| {
        Ok(StoredVersions {
            resource: r.get(0)?,
            agent_version: r.get(1)?,
            image_version: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}
