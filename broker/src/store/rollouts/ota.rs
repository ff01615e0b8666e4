//! The rows of OTA rollouts: offers, schedules, each resource's outcome.

use crate::store::sql::{args, Db, OptionalExtension, Row, Value};
use ferry_common::admin::{OtaResourceInfo, OtaScheduleInfo, OtaUpdateInfo};
use ferry_common::{ResourceId, UnixMillis};

use super::{corrupt, to_i64, to_u64};
use crate::store::StoreError;

/// What an offer is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewUpdate {
    pub component: String,
    pub version: String,
    pub package: String,
    pub description: String,
    pub at: UnixMillis,
}

/// Records an offer to group `group_num`; returns its id.
pub(super) fn insert_update(c: &Db, group_num: i64, u: &NewUpdate) -> Result<u64, StoreError> {
    let id: i64 = c.query_one(
        "INSERT INTO ota_updates (group_num, component, version, package, description, offered_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
        args![
            group_num,
            u.component,
            u.version,
            u.package,
            u.description,
            u.at.0
        ],
    )?;
    to_u64(id, "update id")
}

const UPDATE_COLUMNS: &str =
    "u.id, g.name, u.component, u.version, u.package, u.description, u.offered_at, u.group_num";

pub(super) fn read_update(r: &Row<'_>) -> Result<(OtaUpdateInfo, i64), StoreError> {
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
pub(super) fn update(c: &Db, id: u64) -> Result<Option<(OtaUpdateInfo, i64)>, StoreError> {
    let sql = format!(
        "SELECT {UPDATE_COLUMNS} FROM ota_updates u JOIN groups g ON g.num = u.group_num
         WHERE u.id = ?1"
    );
    let mut stmt = c.prepare(&sql)?;
    stmt.query_row(args![to_i64(id, "update id")?], read_update)
        .optional()
}

/// Offers, of one group (by number) or all, oldest first.
pub(super) fn updates(c: &Db, group_num: Option<i64>) -> Result<Vec<OtaUpdateInfo>, StoreError> {
    let sql = format!(
        "SELECT {UPDATE_COLUMNS} FROM ota_updates u JOIN groups g ON g.num = u.group_num
         WHERE CAST(?1 AS BIGINT) IS NULL OR u.group_num = ?1 ORDER BY u.id"
    );
    let mut stmt = c.prepare(&sql)?;
    stmt.query_map(args![group_num], |r| Ok(read_update(r)?.0))?
        .collect()
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

pub(super) fn read_schedule(r: &Row<'_>) -> Result<ScheduleRow, StoreError> {
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
        started_at: r.get::<Option<i64>>(8)?.map(UnixMillis),
        finished_at: r.get::<Option<i64>>(9)?.map(UnixMillis),
        detail: r.get(10)?,
    })
}

pub(super) fn schedules_where(
    c: &Db,
    clause: &str,
    param: &[Value<'_>],
) -> Result<Vec<ScheduleRow>, StoreError> {
    let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM ota_schedules WHERE {clause} ORDER BY id");
    let mut stmt = c.prepare(&sql)?;
    stmt.query_map(param, read_schedule)?.collect()
}

/// One schedule.
pub(super) fn schedule(c: &Db, id: u64) -> Result<Option<ScheduleRow>, StoreError> {
    Ok(
        schedules_where(c, "id = ?1", args![to_i64(id, "schedule id")?])?
            .into_iter()
            .next(),
    )
}

/// Every schedule still to start or running (the rollout timer's work).
pub(super) fn active_schedules(c: &Db) -> Result<Vec<ScheduleRow>, StoreError> {
    schedules_where(c, "state IN ('scheduled', 'running')", args![])
}

/// The group's running schedule, if any.
pub(super) fn running_of_group(c: &Db, group_num: i64) -> Result<Option<ScheduleRow>, StoreError> {
    Ok(
        schedules_where(c, "group_num = ?1 AND state = 'running'", args![group_num])?
            .into_iter()
            .next(),
    )
}

/// The group's scheduled or running schedule, if any.
pub(super) fn active_of_group(c: &Db, group_num: i64) -> Result<Option<ScheduleRow>, StoreError> {
    Ok(schedules_where(
        c,
        "group_num = ?1 AND state IN ('scheduled', 'running')",
        args![group_num],
    )?
    .into_iter()
    .next())
}

/// Every schedule, of one group (by number) or all, oldest first.
pub(super) fn schedules(c: &Db, group_num: Option<i64>) -> Result<Vec<ScheduleRow>, StoreError> {
    schedules_where(
        c,
        "CAST(?1 AS BIGINT) IS NULL OR group_num = ?1",
        args![group_num],
    )
}

/// Every schedule of a group, oldest first.
pub(super) fn schedules_of_group(c: &Db, group_num: i64) -> Result<Vec<ScheduleRow>, StoreError> {
    schedules_where(c, "group_num = ?1", args![group_num])
}

/// What a schedule is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewSchedule {
    pub update_id: u64,
    pub start: UnixMillis,
    pub wave: u32,
    pub drain_ms: u64,
    pub at: UnixMillis,
}

/// Records a schedule of group `group_num` (state `scheduled`); returns its id.
pub(super) fn insert_schedule(c: &Db, group_num: i64, s: &NewSchedule) -> Result<u64, StoreError> {
    let id: i64 = c.query_one(
        "INSERT INTO ota_schedules (update_id, group_num, start_at, wave, drain_ms, state, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 'scheduled', ?6) RETURNING id",
        args![
            to_i64(s.update_id, "update id")?,
            group_num,
            s.start.0,
            s.wave,
            to_i64(s.drain_ms, "drain")?,
            s.at.0
        ],
    )?;
    to_u64(id, "schedule id")
}

/// Moves the start of a schedule still `scheduled`; whether it was.
pub(super) fn set_start(c: &Db, id: u64, start: UnixMillis) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE ota_schedules SET start_at = ?2 WHERE id = ?1 AND state = 'scheduled'",
        args![to_i64(id, "schedule id")?, start.0],
    )?;
    Ok(n == 1)
}

/// Makes `image` the group's image; whether it changed.
pub(super) fn set_group_image(
    c: &Db,
    num: i64,
    image: &str,
    at: UnixMillis,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE groups SET image = ?2, updated_at = ?3 WHERE num = ?1 AND image != ?2",
        args![num, image, at.0],
    )?;
    Ok(n == 1)
}

/// Moves a schedule from state `from` to `to`, stamping the start (for
/// `running`) or the end (for the final states); whether it was in `from`.
pub(super) fn set_state(
    c: &Db,
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
        args![to_i64(id, "schedule id")?, from, to, at.0, detail],
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
pub(super) fn results(c: &Db, schedule: u64) -> Result<Vec<ResultRow>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT position, resource, state, started_at, finished_at, detail FROM ota_results
         WHERE schedule_id = ?1 ORDER BY position",
    )?;
    let rows = stmt.query_map(args![to_i64(schedule, "schedule id")?], |r| {
        let position: i64 = r.get(0)?;
        let resource: String = r.get(1)?;
        Ok(ResultRow {
            position: u32::try_from(position).map_err(corrupt)?,
            resource: resource.parse().map_err(corrupt)?,
            state: r.get(2)?,
            started_at: r.get::<Option<i64>>(3)?.map(UnixMillis),
            finished_at: r.get::<Option<i64>>(4)?.map(UnixMillis),
            detail: r.get(5)?,
        })
    })?;
    rows.collect()
}

/// Resources of group `num` whose latest OTA step failed: drained by that
/// failure, they belong in the next rollout (which undrains them when it
/// succeeds).
pub(super) fn failed_resources(c: &Db, group_num: i64) -> Result<Vec<ResourceId>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT r.resource FROM ota_results r JOIN ota_schedules s ON s.id = r.schedule_id
         WHERE s.group_num = ?1 AND r.state = 'failed'
           AND r.schedule_id = (SELECT MAX(r2.schedule_id) FROM ota_results r2
                                JOIN ota_schedules s2 ON s2.id = r2.schedule_id
                                WHERE s2.group_num = ?1 AND r2.resource = r.resource
                                  AND r2.state NOT IN ('pending', 'skipped'))
         ORDER BY r.resource",
    )?;
    let rows = stmt.query_map(args![group_num], |r| r.get::<String>(0))?;
    rows.map(|r| {
        let r = r?;
        r.parse()
            .map_err(|e| StoreError::Corrupt(format!("OTA result resource {r:?}: {e}")))
    })
    .collect()
}

/// Records the rollout's resources (all `pending`), in this order.
pub(super) fn insert_plan(
    c: &Db,
    schedule: u64,
    resources: &[ResourceId],
) -> Result<(), StoreError> {
    let id = to_i64(schedule, "schedule id")?;
    for (i, r) in resources.iter().enumerate() {
        c.execute(
            "INSERT INTO ota_results (schedule_id, position, resource, state)
             VALUES (?1, ?2, ?3, 'pending')",
            args![id, i as i64, r.as_str()],
        )?;
    }
    Ok(())
}

/// Moves a resource of a rollout to `state`. `started_at` is set the first
/// time it leaves `pending` (and kept after: its drain deadline counts from
/// it); `finished_at` when it is `done` or `failed`.
pub(super) fn set_result(
    c: &Db,
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
        args![
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
pub(super) fn open_sessions(
    c: &Db,
    resource: &ResourceId,
) -> Result<Vec<ferry_common::SessionId>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT session FROM sessions WHERE resource = ?1 AND ended_at IS NULL ORDER BY id",
    )?;
    let rows = stmt.query_map(args![resource.as_str()], |r| r.get::<String>(0))?;
    rows.map(|s| s?.parse().map_err(corrupt)).collect()
}

/// Sets the group's status to `to` (when it is still `from`), with an
/// event; whether it changed.
pub(super) fn set_group_status(
    c: &Db,
    group_num: i64,
    from: &str,
    to: &str,
    at: UnixMillis,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE groups SET status = ?3, updated_at = ?4 WHERE num = ?1 AND status = ?2",
        args![group_num, from, to, at.0],
    )?;
    Ok(n == 1)
}

/// The schedule as operators see it.
pub(super) fn schedule_info(c: &Db, row: ScheduleRow) -> Result<OtaScheduleInfo, StoreError> {
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
