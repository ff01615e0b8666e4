//! OTA updates (SPEC section 9, issue 7, broker side): updates offered to a
//! group, their rollout schedules and each resource's outcome.
//!
//! - [`Ota`] answers the admin verbs (`ferryctl ota ...`). Every change is
//!   one transaction of the store's rollouts door: the rules are checked
//!   against the committed rows and the new rows written in the same
//!   transaction, so the operator is answered only once it is durable, and
//!   two operators (or an operator and the rollout timer) on one schedule
//!   are serialised.
//! - [`crate::rollout`] has the timer that starts each schedule at its start
//!   time (a deadline on the groups' clock, woken by [`Ota::wake`] after
//!   every change, never a polling period) and the rollout machine that
//!   updates its hosts in waves.
//! - [`crate::store::rollouts`]: the rows (migration "OTA updates" in
//!   `crate::store`).
//!
//! Rules: a start must be in the future and at most [`MAX_SCHEDULE_AHEAD`]
//! ahead; a group has at most one schedule that is scheduled or running;
//! reschedule and cancel only while it is `scheduled` and its start has not
//! come; a schedule starts (and a rollout is scheduled) only while the group
//! is `published` or `update-failed`
//! ([`crate::groups::lifecycle::check_ota`]).

pub mod progress;
pub mod render;

use std::time::Duration;

use ferry_common::admin::{
    AdminError, AdminErrorCode, AdminRequestV1, AdminResponseV1, OtaOfferSpec, OtaScheduleInfo,
    OtaScheduleSpec, OtaUpdateInfo,
};
use ferry_common::limits::{MAX_ID_LEN, MAX_TEXT_LEN};
use ferry_common::UnixMillis;

use crate::clock::Clock;
use crate::groups::lifecycle::{check_ota, LifecycleError, Status};
use crate::rollout::Board;
use crate::store::rollouts::{
    Changed, GroupEvent, GroupRef, NewSchedule, NewUpdate, Offered, ScheduleChange, ScheduleRow,
    Scheduled,
};
use crate::store::{Store, StoreError};

/// How far ahead a rollout may be scheduled (SPEC section 9: within 7 days).
pub const MAX_SCHEDULE_AHEAD: Duration = Duration::from_secs(7 * 24 * 3600);

/// Longest drain deadline an operator may give: a day. Longer than any
/// streaming session worth waiting for, short enough that a typo (`30d`)
/// does not park a rollout for a month.
pub const MAX_DRAIN: Duration = Duration::from_secs(24 * 3600);

/// Drain deadline when the operator gives none.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30 * 60);

/// Most resources updated at once in one wave (beyond any group's size).
pub const MAX_WAVE: u32 = 1_000;

/// Why an OTA request was refused; mapped to admin error codes in one place
/// (`crate::admin`).
#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    #[error("{0}")]
    NotFound(String),
    /// Not in the group's status.
    #[error(transparent)]
    NotAllowed(#[from] LifecycleError),
    /// Not in the schedule's state (started, cancelled, finished).
    #[error("{0}")]
    Refused(String),
    /// The group already has a schedule that is scheduled or running.
    #[error("{0}")]
    Conflict(String),
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Whether `start` is an allowed start at `now`: in the future and within
/// [`MAX_SCHEDULE_AHEAD`]. The message says why not, with the limits.
pub fn check_start(start: UnixMillis, now: UnixMillis) -> Result<(), String> {
    let ahead = i64::try_from(MAX_SCHEDULE_AHEAD.as_millis()).unwrap_or(i64::MAX);
    if start <= now {
        return Err(format!(
            "the start {} is not in the future (now is {}); a rollout starts in the future, within 7 days",
            crate::render::rfc3339_secs(start),
            crate::render::rfc3339_secs(now)
        ));
    }
    if start.0 - now.0 > ahead {
        return Err(format!(
            "the start {} is more than 7 days ahead (latest {})",
            crate::render::rfc3339_secs(start),
            crate::render::rfc3339_secs(UnixMillis(now.0.saturating_add(ahead)))
        ));
    }
    Ok(())
}

fn check_name(what: &str, v: &str, max: usize, problems: &mut Vec<String>) {
    if v.is_empty() || v.len() > max {
        problems.push(format!("{what} must be 1 to {max} bytes"));
    } else if v.chars().any(char::is_control) {
        problems.push(format!("{what} must not contain control characters"));
    }
}

/// Every problem of an offer at once.
pub fn check_offer(spec: &OtaOfferSpec) -> Vec<String> {
    let mut problems = Vec::new();
    check_name("component", &spec.component, MAX_ID_LEN, &mut problems);
    if !spec
        .component
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        problems.push(format!(
            "component {:?}: use letters, digits, '-', '_' and '.' (agent, image, or a component's name)",
            spec.component
        ));
    }
    check_name("version", &spec.version, MAX_TEXT_LEN, &mut problems);
    check_name(
        "description",
        &spec.description,
        MAX_TEXT_LEN,
        &mut problems,
    );
    if spec.package.len() > MAX_TEXT_LEN || spec.package.chars().any(char::is_control) {
        problems.push(format!(
            "package must be at most {MAX_TEXT_LEN} bytes without control characters"
        ));
    }
    problems
}

/// Every problem of a schedule's wave and drain at once.
pub fn check_wave_and_drain(wave: u32, drain_ms: u64) -> Vec<String> {
    let mut problems = Vec::new();
    if wave == 0 || wave > MAX_WAVE {
        problems.push(format!("the wave size must be 1 to {MAX_WAVE}"));
    }
    if u128::from(drain_ms) > MAX_DRAIN.as_millis() {
        problems.push("the drain deadline must be at most 24h".into());
    }
    problems
}

/// The admin side of OTA updates; cheap to clone.
#[derive(Clone)]
pub struct Ota {
    store: Store,
    clock: Clock,
    /// Wakes the rollout timer after a change of schedules; has the image
    /// updates' progress.
    board: Board,
}

/// What [`Ota::change`] does to a schedule that may still change.
enum Change {
    /// `ota reschedule`: a new start.
    Reschedule(UnixMillis),
    /// `ota cancel`.
    Cancel,
}

impl Ota {
    pub fn new(store: Store, clock: Clock) -> Ota {
        Ota {
            store,
            clock,
            board: Board::default(),
        }
    }

    /// Tells the rollout timer (and running rollouts) that rollouts or a
    /// group's status changed.
    pub fn wake(&self) {
        self.board.wake();
    }

    /// The store it records in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The groups' clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The rollouts' wake and the image updates' progress.
    pub fn board(&self) -> &Board {
        &self.board
    }

    /// `ota offer`: records the update for the group (any live group).
    pub async fn offer(&self, spec: OtaOfferSpec) -> Result<OtaUpdateInfo, OtaError> {
        let problems = check_offer(&spec);
        if !problems.is_empty() {
            return Err(OtaError::Invalid(problems));
        }
        let now = self.clock.now();
        let group = spec.group.clone();
        let update = NewUpdate {
            component: spec.component,
            version: spec.version,
            package: spec.package,
            description: spec.description,
            at: now,
        };
        let (component, version, description) = (
            update.component.clone(),
            update.version.clone(),
            update.description.clone(),
        );
        let offered = self
            .store
            .offer_update(
                group.to_string(),
                update,
                move |g| {
                    if g.status == Status::Gone.as_str() {
                        return Err(OtaError::NotFound(format!("group {group} is gone")));
                    }
                    Ok(())
                },
                move |id, g| GroupEvent {
                    kind: "ota-offered",
                    message: format!(
                        "update {id} offered: {component} {version} ({description}); roll it out \
                         with `ferryctl ota schedule {} --update {id}`",
                        g.name
                    ),
                },
            )
            .await?;
        match offered {
            Offered::NoGroup => Err(OtaError::NotFound(format!("no group named {}", spec.group))),
            Offered::Refused(e) => Err(e),
            Offered::Offered(info) => Ok(info),
        }
    }

    /// `ota list`: offers of one group or all.
    pub async fn list(&self, group: Option<String>) -> Result<Vec<OtaUpdateInfo>, OtaError> {
        let missing = group.clone().unwrap_or_default();
        self.store
            .ota_updates(group)
            .await?
            .ok_or_else(|| OtaError::NotFound(format!("no group named {missing}")))
    }

    /// `ota list`: offers of one group or all, and every schedule of them.
    pub async fn list_with_schedules(
        &self,
        group: Option<String>,
    ) -> Result<(Vec<OtaUpdateInfo>, Vec<OtaScheduleInfo>), OtaError> {
        let missing = group.clone().unwrap_or_default();
        self.store
            .ota_updates_and_schedules(group)
            .await?
            .ok_or_else(|| OtaError::NotFound(format!("no group named {missing}")))
    }

    /// `ota schedule`.
    pub async fn schedule(&self, spec: OtaScheduleSpec) -> Result<OtaScheduleInfo, OtaError> {
        let mut problems = check_wave_and_drain(spec.wave, spec.drain_ms);
        let now = self.clock.now();
        if let Err(why) = check_start(spec.start, now) {
            problems.push(why);
        }
        if !problems.is_empty() {
            return Err(OtaError::Invalid(problems));
        }
        let new = NewSchedule {
            update_id: spec.update,
            start: spec.start,
            wave: spec.wave,
            drain_ms: spec.drain_ms,
            at: now,
        };
        let group = spec.group.clone();
        let r = self
            .store
            .schedule_update(
                spec.group.to_string(),
                new,
                move |f| {
                    if f.update_group_num != f.group.num {
                        return Err(OtaError::NotFound(format!(
                            "update {} was offered to group {}, not {group}",
                            f.update.id, f.update.group
                        )));
                    }
                    status_allows(&f.group)?;
                    if let Some(active) = &f.active {
                        return Err(OtaError::Conflict(format!(
                            "group {group} already has OTA schedule {} ({}, starting {}); cancel \
                             it first",
                            active.id,
                            active.state,
                            crate::render::rfc3339_secs(active.start)
                        )));
                    }
                    Ok(())
                },
                move |id, update| GroupEvent {
                    kind: "ota-scheduled",
                    message: format!(
                        "update {} ({} {}) scheduled as OTA schedule {id}: start {}, waves of {}, \
                         drain deadline {} per resource",
                        update.id,
                        update.component,
                        update.version,
                        crate::render::rfc3339_secs(spec.start),
                        spec.wave,
                        ferry_common::duration::format_duration(Duration::from_millis(
                            spec.drain_ms
                        ))
                    ),
                },
            )
            .await;
        self.wake();
        match r? {
            Scheduled::NoGroup => Err(OtaError::NotFound(format!("no group named {}", spec.group))),
            Scheduled::NoUpdate => Err(OtaError::NotFound(format!("no update {}", spec.update))),
            Scheduled::Refused(e) => Err(e),
            Scheduled::Scheduled(info) => Ok(*info),
        }
    }

    /// `ota reschedule`: only a schedule that has not started.
    pub async fn reschedule(
        &self,
        id: u64,
        start: UnixMillis,
    ) -> Result<OtaScheduleInfo, OtaError> {
        let now = self.clock.now();
        check_start(start, now).map_err(|why| OtaError::Invalid(vec![why]))?;
        let r = self.change(id, now, Change::Reschedule(start)).await;
        self.wake();
        r
    }

    /// `ota cancel`: only a schedule that has not started.
    pub async fn cancel(&self, id: u64) -> Result<OtaScheduleInfo, OtaError> {
        let now = self.clock.now();
        let r = self.change(id, now, Change::Cancel).await;
        self.wake();
        r
    }

    /// Makes `change` to schedule `id` when it may still change
    /// ([`may_change`]), with its event; answers the schedule as it is
    /// afterwards.
    async fn change(
        &self,
        id: u64,
        now: UnixMillis,
        change: Change,
    ) -> Result<OtaScheduleInfo, OtaError> {
        let changed = self
            .store
            .change_schedule(id, now, move |row| {
                may_change(row, now).map_err(OtaError::Refused)?;
                Ok(match change {
                    Change::Reschedule(start) => (
                        ScheduleChange::Start(start),
                        GroupEvent {
                            kind: "ota-rescheduled",
                            message: format!(
                                "OTA schedule {} moved from {} to {}",
                                row.id,
                                crate::render::rfc3339_secs(row.start),
                                crate::render::rfc3339_secs(start)
                            ),
                        },
                    ),
                    Change::Cancel => (
                        ScheduleChange::Cancel {
                            detail: "cancelled by operator".into(),
                        },
                        GroupEvent {
                            kind: "ota-cancelled",
                            message: format!("OTA schedule {} cancelled before its start", row.id),
                        },
                    ),
                })
            })
            .await?;
        match changed {
            Changed::NoSchedule => Err(OtaError::NotFound(format!("no OTA schedule {id}"))),
            Changed::Refused(e) => Err(e),
            Changed::Changed(info) => Ok(*info),
        }
    }

    /// `ota history`: every schedule of the group with its resources' outcomes.
    pub async fn history(&self, group: String) -> Result<Vec<OtaScheduleInfo>, OtaError> {
        let missing = group.clone();
        self.store
            .ota_history(group)
            .await?
            .ok_or_else(|| OtaError::NotFound(format!("no group named {missing}")))
    }
}

/// Answers one `ota` admin request; every refusal becomes one typed error here.
pub async fn handle(ota: &Ota, req: AdminRequestV1) -> AdminResponseV1 {
    let result = match req {
        AdminRequestV1::OtaOffer(spec) => ota
            .offer(spec)
            .await
            .map(|u| AdminResponseV1::OtaUpdates(vec![u])),
        AdminRequestV1::OtaList { group } => ota
            .list(group.map(|g| g.to_string()))
            .await
            .map(AdminResponseV1::OtaUpdates),
        AdminRequestV1::OtaSchedule(spec) => ota
            .schedule(spec)
            .await
            .map(|s| AdminResponseV1::OtaSchedules(vec![s])),
        AdminRequestV1::OtaReschedule { schedule, start } => ota
            .reschedule(schedule, start)
            .await
            .map(|s| AdminResponseV1::OtaSchedules(vec![s])),
        AdminRequestV1::OtaCancel { schedule } => ota
            .cancel(schedule)
            .await
            .map(|s| AdminResponseV1::OtaSchedules(vec![s])),
        AdminRequestV1::OtaListWithSchedules { group } => ota
            .list_with_schedules(group.map(|g| g.to_string()))
            .await
            .map(
                |(updates, schedules)| AdminResponseV1::OtaUpdatesAndSchedules {
                    updates,
                    schedules,
                },
            ),
        AdminRequestV1::OtaHistory { group } => ota
            .history(group.to_string())
            .await
            .map(AdminResponseV1::OtaSchedules),
        _ => Err(OtaError::Refused("not an OTA request".into())),
    };
    let (code, message) = match result {
        Ok(resp) => return resp,
        Err(OtaError::NotFound(m)) => (AdminErrorCode::NotFound, m),
        Err(e @ (OtaError::NotAllowed(_) | OtaError::Refused(_))) => {
            (AdminErrorCode::NotAllowed, e.to_string())
        }
        Err(OtaError::Conflict(m)) => (AdminErrorCode::Conflict, m),
        Err(e @ OtaError::Invalid(_)) => (AdminErrorCode::Invalid, e.to_string()),
        Err(e @ OtaError::Store(_)) => {
            tracing::error!("OTA request failed: {e}");
            (AdminErrorCode::Internal, e.to_string())
        }
    };
    AdminResponseV1::Error(AdminError { code, message })
}

/// Whether a schedule may be moved or cancelled at `now`: only while it is
/// `scheduled` and its start has not come.
pub fn may_change(row: &ScheduleRow, now: UnixMillis) -> Result<(), String> {
    if row.state != "scheduled" {
        return Err(format!(
            "OTA schedule {} is {}; only a schedule that has not started can be changed or cancelled",
            row.id, row.state
        ));
    }
    if row.start <= now {
        return Err(format!(
            "OTA schedule {} started at {}; only a schedule that has not started can be changed or cancelled",
            row.id,
            crate::render::rfc3339_secs(row.start)
        ));
    }
    Ok(())
}

fn billing_kind(billing: &str) -> &'static str {
    if billing == "subscription" {
        "subscription"
    } else {
        "pay-as-you-go"
    }
}

/// The group's status allows an OTA rollout.
pub(crate) fn status_allows(g: &GroupRef) -> Result<(), OtaError> {
    let status = Status::parse(&g.status)
        .ok_or_else(|| StoreError::Corrupt(format!("status {:?}", g.status)))?;
    check_ota(billing_kind(&g.billing), status)?;
    Ok(())
}

#[cfg(test)]
mod tests;
