//! The door to the rollouts' rows: OTA offers, schedules and each
//! resource's outcome (migration "OTA updates"), image updates and each
//! resource's outcome (migration "Image updates"), and what a rollout reads
//! and writes of its group (status, image, events, open sessions).
//!
//! Every read and change the rollouts make is one method of [`Store`] with
//! plain records in and out, and each change is one transaction committed
//! before anyone is told about it. A change whose rules belong to the
//! caller (a group's status, a schedule's state) takes them as a function
//! of the rows read in its transaction: a refusal comes back as a value
//! (`Refused`) and nothing is written. No SQL is written anywhere else for
//! these tables.

use std::collections::{BTreeMap, BTreeSet};

use crate::store::sql::{args, columns, Db, OptionalExtension};
use ferry_common::admin::{OtaScheduleInfo, OtaUpdateInfo};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis};

use crate::store::{Store, StoreError};

mod image;
mod ota;
use image::{
    end_image_update, fail_running_image_updates, failed_in_last_image_update, image_results,
    image_update, insert_image_pending, insert_image_update, latest_image_outcomes,
    open_sessions_of_group, resource_versions, running_image_updates, set_image_outcome,
};
pub use image::{ImageResultRow, ImageUpdateRow, NewImageUpdate, StoredVersions};
use ota::{
    active_of_group, active_schedules, failed_resources, insert_plan, insert_schedule,
    insert_update, open_sessions, results, running_of_group, schedule, schedule_info, schedules,
    schedules_of_group, set_group_image, set_group_status, set_result, set_start, set_state,
    update, updates,
};
pub use ota::{NewSchedule, NewUpdate, ResultRow, ScheduleRow};

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
fn find_group(c: &Db, group: &str) -> Result<Option<GroupRef>, StoreError> {
    let row = c
        .query_row(
            "SELECT num, name, status, billing, image FROM groups WHERE id = ?1 OR name = ?1
             ORDER BY (status != 'gone') DESC, num DESC LIMIT 1",
            args![group],
            columns::<(i64, String, String, String, String)>,
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
fn group_by_num(c: &Db, num: i64) -> Result<GroupRef, StoreError> {
    let (name, status, billing, image): (String, String, String, String) = c.query_row(
        "SELECT name, status, billing, image FROM groups WHERE num = ?1",
        args![num],
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
fn event(
    c: &Db,
    group_num: i64,
    at: UnixMillis,
    kind: &str,
    message: &str,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO group_events (group_num, at, kind, message) VALUES (?1, ?2, ?3, ?4)",
        args![group_num, at.0, kind, message],
    )?;
    Ok(())
}

/// The live (not gone) group named `group` (a name or an id).
fn live_group(c: &Db, group: &str) -> Result<Option<GroupRef>, StoreError> {
    let row = c
        .query_row(
            "SELECT num FROM groups
             WHERE (id = ?1 OR name = ?1) AND status != 'gone' ORDER BY num DESC LIMIT 1",
            args![group],
            |r| r.get::<i64>(0),
        )
        .optional()?;
    row.map(|num| group_by_num(c, num)).transpose()
}

/// A group event a change writes with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEvent {
    pub kind: &'static str,
    pub message: String,
}

/// What `ota offer` came to.
#[derive(Debug)]
pub enum Offered<E> {
    /// No group of that name or id.
    NoGroup,
    /// The caller's rules refused it; nothing was written.
    Refused(E),
    Offered(OtaUpdateInfo),
}

/// What `ota schedule`'s rules look at, read in its transaction.
#[derive(Clone, Debug)]
pub struct ScheduleCheck {
    pub group: GroupRef,
    pub update: OtaUpdateInfo,
    /// The number of the group the update was offered to.
    pub update_group_num: i64,
    /// The group's schedule that is scheduled or running, if any.
    pub active: Option<ScheduleRow>,
}

/// What `ota schedule` came to.
#[derive(Debug)]
pub enum Scheduled<E> {
    /// No group of that name or id.
    NoGroup,
    /// No update of that id.
    NoUpdate,
    /// The caller's rules refused it; nothing was written.
    Refused(E),
    Scheduled(Box<OtaScheduleInfo>),
}

/// A change of a schedule that has not started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScheduleChange {
    /// A new start (`ota reschedule`).
    Start(UnixMillis),
    /// Cancelled, with this detail (`ota cancel`).
    Cancel { detail: String },
}

/// What `ota reschedule` or `ota cancel` came to.
#[derive(Debug)]
pub enum Changed<E> {
    /// No schedule of that id.
    NoSchedule,
    /// The caller's rules refused it; nothing was written.
    Refused(E),
    /// The schedule as it is afterwards.
    Changed(Box<OtaScheduleInfo>),
}

/// Whether a schedule due to start starts, decided on its rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartDecision {
    /// It becomes `running`, with this event.
    Start(GroupEvent),
    /// It becomes `failed` with `detail`, with this event.
    Fail { detail: String, event: GroupEvent },
}

/// A running OTA schedule's rows, what its rollout is built from.
#[derive(Clone, Debug)]
pub struct OtaRun {
    pub schedule: ScheduleRow,
    pub update: OtaUpdateInfo,
    pub group: GroupName,
    /// Its resources as recorded, in update order (empty: not planned yet).
    pub results: Vec<ResultRow>,
    /// Not planned yet: the resources an earlier OTA of the group failed on
    /// (as `failed_resources` reads them); empty once planned.
    pub retry: Vec<ResourceId>,
}

/// A running image update's rows, what its rollout is built from.
#[derive(Clone, Debug)]
pub struct ImageRun {
    pub update: ImageUpdateRow,
    pub group: GroupName,
    /// Each resource's outcome once the switch began (empty before).
    pub results: Vec<ImageResultRow>,
    /// Resources the group's last finished image update failed on.
    pub previously_failed: Vec<ResourceId>,
    /// The sessions recorded open on the group's resources, whether or not
    /// their agents are connected.
    pub open: Vec<(ResourceId, SessionId)>,
}

/// The rollouts the rollout timer has to look at.
#[derive(Clone, Debug, Default)]
pub struct RolloutWork {
    /// Every running image update.
    pub images: Vec<ImageUpdateRow>,
    /// Every OTA schedule still to start or running.
    pub schedules: Vec<ScheduleRow>,
}

/// What a running rollout observes of the store.
#[derive(Clone, Debug)]
pub struct RolloutRows {
    /// Its group's row.
    pub group: GroupRef,
    /// For an image update, whether it is still `running`; true for an OTA
    /// rollout.
    pub running: bool,
    /// The sessions recorded open on each resource asked about.
    pub open: BTreeMap<ResourceId, Vec<SessionId>>,
    /// The hosts that belong to the group, joined to its actor now or not
    /// (its operator's assignments and its ready provisioned resources).
    pub members: BTreeSet<ResourceId>,
}

/// `group show`'s stored versions of a group.
#[derive(Clone, Debug)]
pub struct GroupVersions {
    /// The image hosts created from now on start from.
    pub image: String,
    pub status: String,
    /// What each resource registered with the group last reported.
    pub resources: Vec<StoredVersions>,
    /// Each resource's outcome in the group's latest image update
    /// (`pending`, `done` or `failed: <why>`).
    pub outcomes: BTreeMap<String, String>,
}

/// One change a running rollout records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RolloutWrite {
    /// The OTA rollout's resources (all `pending`), in this order.
    OtaPlan {
        schedule: u64,
        hosts: Vec<ResourceId>,
    },
    /// Resources added to an image update's switch as `pending` (one
    /// already in it keeps its outcome).
    ImagePlan { update: i64, hosts: Vec<ResourceId> },
    /// A resource's step in an OTA rollout ([`ResultRow::state`]).
    OtaStep {
        schedule: u64,
        host: ResourceId,
        state: &'static str,
        detail: Option<String>,
        at: UnixMillis,
    },
    /// A resource's outcome in an image update: `done` or `failed`.
    ImageOutcome {
        update: i64,
        host: ResourceId,
        ok: bool,
        detail: String,
        at: UnixMillis,
    },
    /// The OTA rollout is over: from `running` to `succeeded` or `failed`.
    OtaEnded {
        schedule: u64,
        ok: bool,
        detail: Option<String>,
        at: UnixMillis,
    },
    /// The image update is over: `succeeded` or `failed`.
    ImageEnded {
        update: i64,
        ok: bool,
        at: UnixMillis,
    },
    /// A group event.
    Event {
        group_num: i64,
        event: GroupEvent,
        at: UnixMillis,
    },
    /// The group's image is now `image`.
    GroupImage {
        group_num: i64,
        image: String,
        at: UnixMillis,
    },
    /// The group's status goes from `from` to `to`, with a `status` event
    /// saying `message`; nothing if it is no longer `from`.
    GroupStatus {
        group_num: i64,
        from: String,
        to: String,
        message: String,
        at: UnixMillis,
    },
}

/// The number of the group a rollout write is about.
fn group_of(c: &Db, w: &RolloutWrite) -> Result<i64, StoreError> {
    let schedule = |id: u64| -> Result<i64, StoreError> {
        c.query_one(
            "SELECT group_num FROM ota_schedules WHERE id = ?1",
            args![to_i64(id, "schedule id")?],
        )
    };
    let update = |id: i64| -> Result<i64, StoreError> {
        c.query_one(
            "SELECT group_num FROM image_updates WHERE id = ?1",
            args![id],
        )
    };
    match w {
        RolloutWrite::OtaPlan { schedule: id, .. }
        | RolloutWrite::OtaStep { schedule: id, .. }
        | RolloutWrite::OtaEnded { schedule: id, .. } => schedule(*id),
        RolloutWrite::ImagePlan { update: id, .. }
        | RolloutWrite::ImageOutcome { update: id, .. }
        | RolloutWrite::ImageEnded { update: id, .. } => update(*id),
        RolloutWrite::Event { group_num, .. }
        | RolloutWrite::GroupImage { group_num, .. }
        | RolloutWrite::GroupStatus { group_num, .. } => Ok(*group_num),
    }
}

fn write(c: &Db, w: &RolloutWrite) -> Result<(), StoreError> {
    match w {
        RolloutWrite::OtaPlan { schedule, hosts } => insert_plan(c, *schedule, hosts),
        RolloutWrite::ImagePlan { update, hosts } => insert_image_pending(c, *update, hosts),
        RolloutWrite::OtaStep {
            schedule,
            host,
            state,
            detail,
            at,
        } => set_result(c, *schedule, host, state, *at, detail.as_deref()),
        RolloutWrite::ImageOutcome {
            update,
            host,
            ok,
            detail,
            at,
        } => set_image_outcome(c, *update, host, *ok, detail, *at),
        RolloutWrite::OtaEnded {
            schedule,
            ok,
            detail,
            at,
        } => {
            let to = if *ok { "succeeded" } else { "failed" };
            set_state(c, *schedule, "running", to, *at, detail.as_deref())?;
            Ok(())
        }
        RolloutWrite::ImageEnded { update, ok, at } => end_image_update(c, *update, *ok, *at),
        RolloutWrite::Event {
            group_num,
            event: e,
            at,
        } => event(c, *group_num, *at, e.kind, &e.message),
        RolloutWrite::GroupImage {
            group_num,
            image,
            at,
        } => {
            set_group_image(c, *group_num, image, *at)?;
            Ok(())
        }
        RolloutWrite::GroupStatus {
            group_num,
            from,
            to,
            message,
            at,
        } => {
            // A status that changed meanwhile is left alone.
            if set_group_status(c, *group_num, from, to, *at)? {
                event(c, *group_num, *at, "status", message)?;
            }
            Ok(())
        }
    }
}

fn schedule_after(c: &Db, id: u64) -> Result<OtaScheduleInfo, StoreError> {
    let row = schedule(c, id)?.ok_or_else(|| corrupt(format!("schedule {id} vanished")))?;
    schedule_info(c, row)
}

/// The number of the group named `group`, or of none; `Err(())`: no such group.
fn group_filter(c: &Db, group: Option<&str>) -> Result<Result<Option<i64>, ()>, StoreError> {
    Ok(match group {
        None => Ok(None),
        Some(g) => match find_group(c, g)? {
            Some(g) => Ok(Some(g.num)),
            None => Err(()),
        },
    })
}

impl Store {
    /// `ota offer`: in one transaction, finds the group named `group` (a
    /// live name first, else an id or a gone name), asks `check` whether it
    /// takes offers, records `update` and the event `event(id, group)` says.
    pub async fn offer_update<E: Send + 'static>(
        &self,
        group: String,
        update: NewUpdate,
        check: impl FnOnce(&GroupRef) -> Result<(), E> + Send + 'static,
        event_of: impl FnOnce(u64, &GroupRef) -> GroupEvent + Send + 'static,
    ) -> Result<Offered<E>, StoreError> {
        self.exec(move |c| {
            crate::store::leases::serialize_group_changes(c)?;
            let Some(g) = find_group(c, &group)? else {
                return Ok(Offered::NoGroup);
            };
            if let Err(e) = check(&g) {
                return Ok(Offered::Refused(e));
            }
            let id = insert_update(c, g.num, &update)?;
            let e = event_of(id, &g);
            event(c, g.num, update.at, e.kind, &e.message)?;
            let (info, _) =
                self::update(c, id)?.ok_or_else(|| corrupt(format!("update {id} vanished")))?;
            Ok(Offered::Offered(info))
        })
        .await
    }

    /// The offers of the group named `group`, or of all, oldest first;
    /// `None`: no group of that name.
    pub async fn ota_updates(
        &self,
        group: Option<String>,
    ) -> Result<Option<Vec<OtaUpdateInfo>>, StoreError> {
        self.read(move |c| {
            let Ok(num) = group_filter(c, group.as_deref())? else {
                return Ok(None);
            };
            Ok(Some(updates(c, num)?))
        })
        .await
    }

    /// The offers of the group named `group`, or of all, and every schedule
    /// of them, oldest first; `None`: no group of that name.
    pub async fn ota_updates_and_schedules(
        &self,
        group: Option<String>,
    ) -> Result<Option<(Vec<OtaUpdateInfo>, Vec<OtaScheduleInfo>)>, StoreError> {
        self.read(move |c| {
            let Ok(num) = group_filter(c, group.as_deref())? else {
                return Ok(None);
            };
            let mut out = Vec::new();
            for row in schedules(c, num)? {
                out.push(schedule_info(c, row)?);
            }
            Ok(Some((updates(c, num)?, out)))
        })
        .await
    }

    /// `ota schedule`: in one transaction, finds the group named `group`
    /// and the update `new.update_id`, asks `check` whether the schedule
    /// may be made (the update's group, the group's status, its active
    /// schedule), records it (`scheduled`) and the event `event_of(id,
    /// update)` says.
    pub async fn schedule_update<E: Send + 'static>(
        &self,
        group: String,
        new: NewSchedule,
        check: impl FnOnce(&ScheduleCheck) -> Result<(), E> + Send + 'static,
        event_of: impl FnOnce(u64, &OtaUpdateInfo) -> GroupEvent + Send + 'static,
    ) -> Result<Scheduled<E>, StoreError> {
        self.exec(move |c| {
            crate::store::leases::serialize_group_changes(c)?;
            let Some(g) = find_group(c, &group)? else {
                return Ok(Scheduled::NoGroup);
            };
            let Some((update, update_group_num)) = update(c, new.update_id)? else {
                return Ok(Scheduled::NoUpdate);
            };
            let active = active_of_group(c, g.num)?;
            let facts = ScheduleCheck {
                group: g,
                update,
                update_group_num,
                active,
            };
            if let Err(e) = check(&facts) {
                return Ok(Scheduled::Refused(e));
            }
            let num = facts.group.num;
            let id = insert_schedule(c, num, &new)?;
            let e = event_of(id, &facts.update);
            event(c, num, new.at, e.kind, &e.message)?;
            Ok(Scheduled::Scheduled(Box::new(schedule_after(c, id)?)))
        })
        .await
    }

    /// `ota reschedule` and `ota cancel`: in one transaction, reads
    /// schedule `id`, asks `decide` for the change and its event (or a
    /// refusal), makes it (only while the schedule is `scheduled`) and
    /// writes the event at `at`.
    pub async fn change_schedule<E: Send + 'static>(
        &self,
        id: u64,
        at: UnixMillis,
        decide: impl FnOnce(&ScheduleRow) -> Result<(ScheduleChange, GroupEvent), E> + Send + 'static,
    ) -> Result<Changed<E>, StoreError> {
        self.exec(move |c| {
            crate::store::leases::serialize_group_changes(c)?;
            let Some(row) = schedule(c, id)? else {
                return Ok(Changed::NoSchedule);
            };
            let (change, e) = match decide(&row) {
                Ok(d) => d,
                Err(e) => return Ok(Changed::Refused(e)),
            };
            match change {
                ScheduleChange::Start(start) => {
                    set_start(c, row.id, start)?;
                }
                ScheduleChange::Cancel { detail } => {
                    set_state(
                        c,
                        row.id,
                        "scheduled",
                        "cancelled",
                        at,
                        Some(detail.as_str()),
                    )?;
                }
            }
            event(c, row.group_num, at, e.kind, &e.message)?;
            Ok(Changed::Changed(Box::new(schedule_after(c, id)?)))
        })
        .await
    }

    /// Every schedule of the group named `group`, oldest first, with its
    /// resources' outcomes; `None`: no group of that name.
    pub async fn ota_history(
        &self,
        group: String,
    ) -> Result<Option<Vec<OtaScheduleInfo>>, StoreError> {
        self.read(move |c| {
            let Some(g) = find_group(c, &group)? else {
                return Ok(None);
            };
            let mut out = Vec::new();
            for row in schedules_of_group(c, g.num)? {
                out.push(schedule_info(c, row)?);
            }
            Ok(Some(out))
        })
        .await
    }

    /// The name of the group named `group` and its schedule that is
    /// scheduled or running, if any; `None`: no group of that name.
    pub async fn active_ota_of(
        &self,
        group: String,
    ) -> Result<Option<(GroupName, Option<OtaScheduleInfo>)>, StoreError> {
        self.read(move |c| {
            let Some(g) = find_group(c, &group)? else {
                return Ok(None);
            };
            let ota = match active_of_group(c, g.num)? {
                Some(row) => Some(schedule_info(c, row)?),
                None => None,
            };
            Ok(Some((g.name, ota)))
        })
        .await
    }

    /// Every running image update and every OTA schedule still to start or
    /// running, read together.
    pub async fn rollout_work(&self) -> Result<RolloutWork, StoreError> {
        self.read(|c| {
            Ok(RolloutWork {
                images: running_image_updates(c)?,
                schedules: active_schedules(c)?,
            })
        })
        .await
    }

    /// Starts OTA schedule `id` at `now` if it is still `scheduled` and
    /// `decide` (given its group and update) says so, else fails it; either
    /// with the event `decide` gives; then reads what its rollout is built
    /// from. All in one transaction. `None`: it is not `scheduled` or
    /// `running` (any more), or it just failed.
    pub async fn start_ota_schedule(
        &self,
        id: u64,
        now: UnixMillis,
        decide: impl FnOnce(&GroupRef, &OtaUpdateInfo) -> StartDecision + Send + 'static,
    ) -> Result<Option<OtaRun>, StoreError> {
        self.exec(move |c| {
            crate::store::leases::serialize_group_changes(c)?;
            let Some(row) = schedule(c, id)? else {
                return Ok(None);
            };
            if !matches!(row.state.as_str(), "scheduled" | "running") {
                return Ok(None);
            }
            let (update, _) = update(c, row.update_id)?
                .ok_or_else(|| corrupt(format!("schedule {id} names no update")))?;
            let g = group_by_num(c, row.group_num)?;
            if row.state == "scheduled" {
                match decide(&g, &update) {
                    StartDecision::Fail { detail, event: e } => {
                        set_state(c, id, "scheduled", "failed", now, Some(detail.as_str()))?;
                        event(c, g.num, now, e.kind, &e.message)?;
                        return Ok(None);
                    }
                    StartDecision::Start(e) => {
                        set_state(c, id, "scheduled", "running", now, None)?;
                        event(c, g.num, now, e.kind, &e.message)?;
                    }
                }
            }
            let row = schedule(c, id)?.ok_or_else(|| corrupt(format!("schedule {id} vanished")))?;
            let results = results(c, id)?;
            // A first start plans: hosts an earlier OTA of the group failed
            // on (and drained) are its retry.
            let retry = if results.is_empty() {
                failed_resources(c, row.group_num)?
            } else {
                Vec::new()
            };
            Ok(Some(OtaRun {
                schedule: row,
                update,
                group: g.name,
                results,
                retry,
            }))
        })
        .await
    }

    /// Image update `id`'s rows, if it is still `running`.
    pub async fn image_update_run(&self, id: i64) -> Result<Option<ImageRun>, StoreError> {
        self.read(move |c| {
            let Some(row) = image_update(c, id)? else {
                return Ok(None);
            };
            if row.state != "running" {
                return Ok(None);
            }
            let g = group_by_num(c, row.group_num)?;
            Ok(Some(ImageRun {
                results: image_results(c, id)?,
                previously_failed: failed_in_last_image_update(c, row.group_num)?,
                open: open_sessions_of_group(c, g.name.as_str())?,
                group: g.name,
                update: row,
            }))
        })
        .await
    }

    /// What a running rollout of group `group_num` observes: the group's
    /// row, whether image update `image_update` (if it is one) still runs,
    /// and the sessions recorded open on each of `hosts`.
    pub async fn rollout_rows(
        &self,
        group_num: i64,
        image_update: Option<i64>,
        hosts: Vec<ResourceId>,
    ) -> Result<RolloutRows, StoreError> {
        self.read(move |c| {
            let group = group_by_num(c, group_num)?;
            let running = match image_update {
                Some(id) => self::image_update(c, id)?.is_some_and(|r| r.state == "running"),
                None => true,
            };
            let mut open = BTreeMap::new();
            for r in hosts {
                let sessions = open_sessions(c, &r)?;
                open.insert(r, sessions);
            }
            let members = super::membership::members(c, group_num, &group.name)?
                .into_iter()
                .collect();
            Ok(RolloutRows {
                group,
                running,
                open,
                members,
            })
        })
        .await
    }

    /// The number of the group of OTA schedule `schedule` or of image
    /// update `image`; `None` when there is no such rollout.
    pub async fn rollout_group(
        &self,
        schedule: Option<u64>,
        image: Option<i64>,
    ) -> Result<Option<i64>, StoreError> {
        let schedule = schedule.map(|id| to_i64(id, "schedule id")).transpose()?;
        self.read_with(move |c| {
            if let Some(id) = schedule {
                return c.query_opt(
                    "SELECT group_num FROM ota_schedules WHERE id = ?1",
                    args![id],
                );
            }
            match image {
                Some(id) => c.query_opt(
                    "SELECT group_num FROM image_updates WHERE id = ?1",
                    args![id],
                ),
                None => Ok(None),
            }
        })
        .await
    }

    /// Writes a rollout's `writes` in one transaction, in order.
    pub async fn record_rollout(&self, writes: Vec<RolloutWrite>) -> Result<(), StoreError> {
        let fences = self.fences().clone();
        self.exec(move |c| {
            // A rollout writes its group's facts: only its owner may.
            let mut fenced = Vec::new();
            for w in &writes {
                let num = group_of(c, w)?;
                if !fenced.contains(&num) {
                    crate::store::leases::check_fence(c, &fences, num)?;
                    fenced.push(num);
                }
            }
            for w in &writes {
                write(c, w)?;
            }
            Ok(())
        })
        .await
    }

    /// `group update-image`: in one transaction, finds the live group named
    /// `group` and its running OTA schedule, asks `decide` for the update
    /// (or a refusal), ends an image update left running, records the new
    /// one, moves the group to its status with its event. Answers the group.
    pub async fn begin_image_update<E: Send + 'static>(
        &self,
        group: String,
        decide: impl FnOnce(&GroupRef, Option<&ScheduleRow>) -> Result<NewImageUpdate, E>
            + Send
            + 'static,
    ) -> Result<ImageBegun<E>, StoreError> {
        self.exec(move |c| {
            crate::store::leases::serialize_group_changes(c)?;
            let Some(g) = live_group(c, &group)? else {
                return Ok(ImageBegun::NoGroup);
            };
            let ota = running_of_group(c, g.num)?;
            let u = match decide(&g, ota.as_ref()) {
                Ok(u) => u,
                Err(e) => return Ok(ImageBegun::Refused(e)),
            };
            let now = u.started_at;
            // An update the group left by other means (it expired while
            // updating, then was renewed) is over.
            fail_running_image_updates(c, g.num, now)?;
            insert_image_update(c, &g, &u)?;
            set_group_status(c, g.num, &g.status, &u.status, now)?;
            event(c, g.num, now, u.event.kind, &u.event.message)?;
            Ok(ImageBegun::Begun(g))
        })
        .await
    }

    /// `group show`'s stored versions of the group named `group` (the live
    /// group of that name first, else a gone one); `None`: no such group.
    pub async fn group_versions(&self, group: String) -> Result<Option<GroupVersions>, StoreError> {
        self.read(move |c| {
            let Some(g) = find_group(c, &group)? else {
                return Ok(None);
            };
            Ok(Some(GroupVersions {
                resources: resource_versions(c, g.name.as_str())?,
                outcomes: latest_image_outcomes(c, g.num)?,
                image: g.image,
                status: g.status,
            }))
        })
        .await
    }
}

/// What `group update-image` came to.
#[derive(Debug)]
pub enum ImageBegun<E> {
    /// No live group of that name or id.
    NoGroup,
    /// The caller's rules refused it; nothing was written.
    Refused(E),
    /// Recorded; the group as it was before.
    Begun(GroupRef),
}

/// Fixtures of rows other doors (or a rollout midway) write.
#[cfg(test)]
impl Store {
    /// A pay-as-you-go group `name` of number `num` (id `dg-00000<num>`,
    /// image `img-1`, 3 base resources) in `status`.
    pub(crate) async fn insert_group_in_status_for_test(&self, num: i64, name: &str, status: &str) {
        let (name, status) = (name.to_owned(), status.to_owned());
        self.exec(move |c| {
            crate::store::leases::serialize_group_changes(c)?;
            c.execute(
                "INSERT INTO groups (num, id, name, region, office_network, spec, image, billing,
                    base_resources, session_type, policy, status, created_at, updated_at)
                 VALUES (?1, ?4, ?2, 'r', 'n', 'office-4c8g', 'img-1',
                    'pay-as-you-go', 3, 'independent', '{}', ?3, 0, 0)",
                args![num, name, status, format!("dg-{num:06}")],
            )?;
            Ok(())
        })
        .await
        .expect("insert a group");
    }

    /// Schedule `id` as a broker that stopped mid-rollout left it: `running`
    /// since `at`, with these resources in these states.
    pub(crate) async fn running_schedule_for_test(
        &self,
        id: u64,
        rows: Vec<(ResourceId, String)>,
        at: UnixMillis,
    ) {
        self.exec(move |c| {
            crate::store::leases::serialize_group_changes(c)?;
            set_state(c, id, "scheduled", "running", at, None)?;
            let names: Vec<ResourceId> = rows.iter().map(|(r, _)| r.clone()).collect();
            insert_plan(c, id, &names)?;
            for (r, state) in &rows {
                set_result(c, id, r, state, at, None)?;
            }
            Ok(())
        })
        .await
        .expect("a running schedule");
    }

    /// An open session `session` of user `u` on `resource`, as the link
    /// records it.
    pub(crate) async fn open_session_for_test(&self, resource: &str, session: &str) {
        let (resource, session) = (resource.to_owned(), session.to_owned());
        self.exec(move |c| {
            crate::store::leases::serialize_group_changes(c)?;
            c.execute(
                "INSERT INTO sessions (resource, session, user, started_at) VALUES (?1, ?2, 'u', 0)",
                args![resource, session],
            )?;
            Ok(())
        })
        .await
        .expect("an open session");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rid(s: &str) -> ResourceId {
        s.parse().expect("id")
    }

    fn ev(kind: &'static str, message: &str) -> GroupEvent {
        GroupEvent {
            kind,
            message: message.into(),
        }
    }

    fn offer(version: &str) -> NewUpdate {
        NewUpdate {
            component: "office".into(),
            version: version.into(),
            package: String::new(),
            description: "fixes printing".into(),
            at: UnixMillis(10),
        }
    }

    fn schedule_of(update_id: u64) -> NewSchedule {
        NewSchedule {
            update_id,
            start: UnixMillis(1_000),
            wave: 1,
            drain_ms: 0,
            at: UnixMillis(20),
        }
    }

    /// Group 1's (status, events as kind: message).
    async fn group_1(store: &Store) -> (String, Vec<String>) {
        let (g, events) = store
            .group_read(|tx| Ok::<_, StoreError>((tx.by_num(1)?, tx.events(1)?)))
            .await
            .expect("read");
        let events = events
            .into_iter()
            .map(|e| format!("{}: {}", e.kind, e.message))
            .collect();
        (g.expect("group 1").status, events)
    }

    async fn store_with_group(dir: &std::path::Path) -> Store {
        let store = crate::store::testing::open_for_test(dir);
        store
            .insert_group_in_status_for_test(1, "g", "published")
            .await;
        store
    }

    /// An offer and a schedule of group `g`; the schedule's id.
    async fn scheduled(store: &Store) -> u64 {
        let Offered::Offered(u) = store
            .offer_update(
                "g".into(),
                offer("3.2"),
                |_| Ok::<_, ()>(()),
                |id, _| ev("ota-offered", &format!("update {id}")),
            )
            .await
            .expect("offer")
        else {
            panic!("not offered");
        };
        let Scheduled::Scheduled(s) = store
            .schedule_update(
                "g".into(),
                schedule_of(u.id),
                |_| Ok::<_, ()>(()),
                |id, _| ev("ota-scheduled", &format!("schedule {id}")),
            )
            .await
            .expect("schedule")
        else {
            panic!("not scheduled");
        };
        s.id
    }

    #[tokio::test]
    async fn a_refusal_writes_nothing_and_an_accepted_change_writes_its_event() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = store_with_group(dir.path()).await;
        // No group, then a refusal: no offer, no event.
        let r = store
            .offer_update(
                "nope".into(),
                offer("1"),
                |_| Ok::<_, ()>(()),
                |_, _| ev("ota-offered", "x"),
            )
            .await
            .expect("offer");
        assert!(matches!(r, Offered::NoGroup), "{r:?}");
        let r = store
            .offer_update(
                "g".into(),
                offer("1"),
                |_| Err("no"),
                |_, _| ev("ota-offered", "x"),
            )
            .await
            .expect("offer");
        assert!(matches!(r, Offered::Refused("no")), "{r:?}");
        assert_eq!(store.ota_updates(None).await.expect("list"), Some(vec![]));
        assert_eq!(group_1(&store).await.1, Vec::<String>::new());

        let id = scheduled(&store).await;
        // The schedule's rules see the update's group and the active schedule.
        let r = store
            .schedule_update(
                "g".into(),
                schedule_of(1),
                |f| match &f.active {
                    Some(a) if f.update_group_num == f.group.num => Err(a.id),
                    _ => Ok(()),
                },
                |_, _| ev("ota-scheduled", "x"),
            )
            .await
            .expect("schedule");
        assert!(matches!(r, Scheduled::Refused(a) if a == id), "{r:?}");
        let r = store
            .schedule_update(
                "g".into(),
                schedule_of(99),
                |_| Ok::<_, ()>(()),
                |_, _| ev("ota-scheduled", "x"),
            )
            .await
            .expect("schedule");
        assert!(matches!(r, Scheduled::NoUpdate), "{r:?}");

        // A refused change leaves the schedule as it was; an accepted one
        // moves it with its event.
        let r = store
            .change_schedule(id, UnixMillis(30), |_| {
                Err::<(ScheduleChange, GroupEvent), _>("no")
            })
            .await
            .expect("change");
        assert!(matches!(r, Changed::Refused("no")), "{r:?}");
        let r = store
            .change_schedule(id, UnixMillis(30), |row| {
                Ok::<_, ()>((
                    ScheduleChange::Cancel {
                        detail: "cancelled by operator".into(),
                    },
                    ev("ota-cancelled", &format!("schedule {} cancelled", row.id)),
                ))
            })
            .await
            .expect("change");
        let Changed::Changed(s) = r else {
            panic!("{r:?}");
        };
        assert_eq!(
            (s.state.as_str(), s.finished_at, s.detail.as_deref()),
            (
                "cancelled",
                Some(UnixMillis(30)),
                Some("cancelled by operator")
            )
        );
        assert!(matches!(
            store
                .change_schedule(
                    99,
                    UnixMillis(30),
                    |_| Err::<(ScheduleChange, GroupEvent), _>(())
                )
                .await,
            Ok(Changed::NoSchedule)
        ));
        assert_eq!(
            group_1(&store).await.1,
            vec![
                "ota-offered: update 1".to_owned(),
                format!("ota-scheduled: schedule {id}"),
                format!("ota-cancelled: schedule {id} cancelled"),
            ]
        );
        let history = store.ota_history("g".into()).await.expect("history");
        assert_eq!(history.map(|h| h.len()), Some(1));
        assert_eq!(
            store.ota_history("nope".into()).await.expect("history"),
            None
        );
    }

    #[tokio::test]
    async fn a_start_refused_fails_the_schedule_with_its_event_and_a_start_loads_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = store_with_group(dir.path()).await;
        let id = scheduled(&store).await;
        let failed = store
            .start_ota_schedule(id, UnixMillis(1_000), |_, u| StartDecision::Fail {
                detail: "not started: no".into(),
                event: ev("ota-failed", &format!("update {} not started", u.id)),
            })
            .await
            .expect("start");
        assert!(failed.is_none());
        let s = store
            .ota_history("g".into())
            .await
            .expect("history")
            .expect("g");
        assert_eq!(
            (s[0].state.as_str(), s[0].detail.as_deref()),
            ("failed", Some("not started: no"))
        );
        assert!(group_1(&store)
            .await
            .1
            .contains(&"ota-failed: update 1 not started".to_owned()));
        // Not scheduled any more: nothing is asked, nothing loads.
        let again = store
            .start_ota_schedule(id, UnixMillis(1_000), |_, _| panic!("asked again"))
            .await
            .expect("start");
        assert!(again.is_none());

        // A schedule that starts, with a host an earlier rollout failed on.
        store
            .record_rollout(vec![
                RolloutWrite::OtaPlan {
                    schedule: id,
                    hosts: vec![rid("h1")],
                },
                RolloutWrite::OtaStep {
                    schedule: id,
                    host: rid("h1"),
                    state: "failed",
                    detail: Some("hook failed".into()),
                    at: UnixMillis(1_000),
                },
            ])
            .await
            .expect("record");
        let id2 = scheduled(&store).await;
        let run = store
            .start_ota_schedule(id2, UnixMillis(2_000), |_, _| {
                StartDecision::Start(ev("ota-started", "started"))
            })
            .await
            .expect("start")
            .expect("running");
        assert_eq!(run.schedule.state, "running");
        assert_eq!(run.schedule.started_at, Some(UnixMillis(2_000)));
        assert_eq!(run.group.as_str(), "g");
        assert!(run.results.is_empty());
        assert_eq!(run.retry, vec![rid("h1")]);
        let work = store.rollout_work().await.expect("work");
        assert_eq!(
            work.schedules.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![id2]
        );
    }

    #[tokio::test]
    async fn an_image_update_begins_runs_and_records_its_end_in_one_write() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = store_with_group(dir.path()).await;
        let begin = |image: &str| NewImageUpdate {
            image: image.into(),
            warning_ms: 60_000,
            started_at: UnixMillis(100),
            disconnect_at: UnixMillis(60_100),
            status: "updating".into(),
            event: ev("status", "published -> updating"),
        };
        let refused = store
            .begin_image_update("g".into(), |_, _| Err::<NewImageUpdate, _>("no"))
            .await
            .expect("begin");
        assert!(matches!(refused, ImageBegun::Refused("no")), "{refused:?}");
        assert!(store.rollout_work().await.expect("work").images.is_empty());
        let u = begin("img-2");
        let begun = store
            .begin_image_update("g".into(), move |g, ota| {
                assert!(ota.is_none());
                assert_eq!(g.image, "img-1");
                Ok::<_, ()>(u)
            })
            .await
            .expect("begin");
        assert!(matches!(&begun, ImageBegun::Begun(g) if g.status == "published"));
        assert_eq!(
            group_1(&store).await,
            (
                "updating".to_owned(),
                vec!["status: published -> updating".to_owned()]
            )
        );
        let work = store.rollout_work().await.expect("work");
        let [running] = work.images.as_slice() else {
            panic!("{work:?}");
        };
        let id = running.id;
        store.open_session_for_test("h1", "s1").await;
        let run = store
            .image_update_run(id)
            .await
            .expect("run")
            .expect("running");
        assert_eq!(
            (run.update.image.as_str(), run.update.disconnect_at),
            ("img-2", UnixMillis(60_100))
        );
        // The session's resource is not registered with the group.
        assert!(run.open.is_empty());
        let rows = store
            .rollout_rows(1, Some(id), vec![rid("h1")])
            .await
            .expect("rows");
        assert!(rows.running);
        assert_eq!(rows.open[&rid("h1")], vec!["s1".parse().expect("session")]);

        // The end, in one write: a status whose `from` no longer holds is
        // left alone, with no event.
        store
            .record_rollout(vec![
                RolloutWrite::ImagePlan {
                    update: id,
                    hosts: vec![rid("h1")],
                },
                RolloutWrite::ImageOutcome {
                    update: id,
                    host: rid("h1"),
                    ok: false,
                    detail: "switch failed".into(),
                    at: UnixMillis(60_200),
                },
                RolloutWrite::ImageEnded {
                    update: id,
                    ok: false,
                    at: UnixMillis(60_200),
                },
                RolloutWrite::GroupStatus {
                    group_num: 1,
                    from: "published".into(),
                    to: "update-failed".into(),
                    message: "published -> update-failed".into(),
                    at: UnixMillis(60_200),
                },
                RolloutWrite::GroupStatus {
                    group_num: 1,
                    from: "updating".into(),
                    to: "update-failed".into(),
                    message: "updating -> update-failed".into(),
                    at: UnixMillis(60_200),
                },
            ])
            .await
            .expect("record");
        assert_eq!(
            group_1(&store).await,
            (
                "update-failed".to_owned(),
                vec![
                    "status: published -> updating".to_owned(),
                    "status: updating -> update-failed".to_owned()
                ]
            )
        );
        assert!(store.image_update_run(id).await.expect("run").is_none());
        let v = store
            .group_versions("g".into())
            .await
            .expect("versions")
            .expect("g");
        assert_eq!(
            v.outcomes.get("h1").map(String::as_str),
            Some("failed: switch failed")
        );
        assert!(store
            .group_versions("nope".into())
            .await
            .expect("v")
            .is_none());
    }
}
