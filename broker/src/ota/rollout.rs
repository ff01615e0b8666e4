//! The rollout timer and the rollouts it starts.
//!
//! [`run`] sleeps until the earliest start of a `scheduled` schedule on the
//! groups' clock ([`Clock::sleep_until`]), or until [`super::Ota::wake`] says
//! the schedules changed; it never polls. At the start it moves the schedule
//! to `running` (durably, and only if it is still `scheduled`: a cancel that
//! committed first wins) and spawns its rollout. A `running` schedule found
//! at broker start is resumed the same way.
//!
//! A rollout records its resources (the group's ready, joined resources, in
//! the actor's order) as `pending` rows once, then updates them in waves of
//! `wave` resources ([`plan_waves`]), the resources of one wave at once.
//! Each resource: `Drain` (and the group's actor is told at once, so no new
//! session is routed there before the agent's next health report), each
//! open session warned (`WarnSession`, deadline = the drain deadline,
//! counted from when the resource started draining), a wait until its
//! sessions have ended (woken by the registry's changes) or the drain
//! deadline (a timer), `DisconnectSession` for each one left, then
//! `ApplyUpdate`; it succeeded when the agent answered `Done` and its
//! inventory shows the version (an agent updating itself restarts, so its
//! reconnected inventory's `last_update` and version count instead), then
//! `Undrain`. Every step's state is written to the resource's row before the
//! next, so a restarted broker resumes: `done` rows are skipped, the others
//! start over from the drain (idempotent on the agent; a replayed
//! `ApplyUpdate` of an update that succeeded answers `Done` without running
//! the hook again) with their original drain deadline.
//!
//! A resource the group's actor shows releasing or released by a scale-in
//! when its turn comes is `skipped`. After `Undrain` the actor is told the
//! resource takes sessions again.
//!
//! Every step of a resource is also a group event (`ota-step`: the plan,
//! draining until its deadline, its sessions warned, updating, done or
//! failed), and `group show` reads the rows ([`super::progress`]). An
//! agent's failure text is kept as the tail of its hook's output with the
//! exit status ([`crate::hook_failure::brief`]).
//!
//! A failing resource stops the rollout after its wave: the schedule is
//! `failed`, the resource stays drained, the group becomes `update-failed`
//! (a `status` event; a group already `update-failed` stays so) and an
//! event names the update and the failing resources. All done: the schedule
//! is `succeeded`, with an event, and an `update-failed` group is
//! `published` again.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ferry_common::admin::OtaUpdateInfo;
use ferry_common::duration::format_duration;
use ferry_common::wire::{Command, CommandOutcome, Inventory};
use ferry_common::{GroupName, ResourceId, UnixMillis};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::store::{self, ResultRow, ScheduleRow};
use super::Ota;
use crate::engine::ResourceState;
use crate::groups::lifecycle::{after_failed_ota, after_succeeded_ota, Status};
use crate::groups::GroupActors;
use crate::groups::RETRY_AFTER_ERROR;
use crate::hook_failure::brief;
use crate::registry::{CommandError, Registry, COMMAND_TIMEOUT};
use crate::store::StoreError;

/// How long the rollout waits on agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Longest wait for an agent to answer `ApplyUpdate`: the agent's own
    /// `update_timeout` (30 minutes by default) and a margin.
    pub update_timeout: Duration,
    /// How long a resource may be unreachable (not connected at its turn,
    /// or gone during its update, e.g. an agent restarting itself) before it
    /// counts as failed.
    pub gone_timeout: Duration,
    /// How long after `Done` the agent's inventory may take to show the version.
    pub inventory_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            update_timeout: Duration::from_secs(35 * 60),
            gone_timeout: Duration::from_secs(10 * 60),
            inventory_timeout: Duration::from_secs(60),
        }
    }
}

/// What every rollout task needs; cheap to clone.
#[derive(Clone)]
struct Ctx {
    ota: Ota,
    registry: Arc<Registry>,
    actors: GroupActors,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
}

/// Why a rollout task stopped before finishing.
#[derive(Debug)]
enum Stop {
    Shutdown,
    Store(StoreError),
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop::Store(e)
    }
}

/// The remaining resources of a rollout in waves of `wave`, in update
/// order: `done` and `skipped` ones are left out (a resumed rollout does not
/// redo them).
pub fn plan_waves(rows: &[ResultRow], wave: u32) -> Vec<Vec<ResourceId>> {
    let size = usize::try_from(wave.max(1)).unwrap_or(usize::MAX);
    let left: Vec<ResourceId> = rows
        .iter()
        .filter(|r| !matches!(r.state.as_str(), "done" | "skipped"))
        .map(|r| r.resource.clone())
        .collect();
    left.chunks(size).map(<[ResourceId]>::to_vec).collect()
}

/// Whether `inventory` shows `component` at `version`.
pub fn shows(inventory: &Inventory, component: &str, version: &str) -> bool {
    match component {
        "agent" => inventory.agent_version == version,
        "image" => inventory.image_version == version,
        name => inventory
            .components
            .iter()
            .any(|c| c.name == name && c.version == version),
    }
}

/// The version of `component` that `inventory` shows, if any.
fn running(inventory: &Inventory, component: &str) -> Option<String> {
    match component {
        "agent" => Some(format!("agent {}", inventory.agent_version)),
        "image" => Some(format!("image {}", inventory.image_version)),
        name => inventory
            .components
            .iter()
            .find(|c| c.name == name)
            .map(|c| format!("{name} {}", c.version)),
    }
}

/// The drain deadline of a resource that started draining at `started`.
pub fn drain_deadline(started: UnixMillis, drain_ms: u64) -> UnixMillis {
    UnixMillis(
        started
            .0
            .saturating_add(i64::try_from(drain_ms).unwrap_or(i64::MAX)),
    )
}

/// Runs the rollout timer until `shutdown`, then waits for the rollouts it
/// started to stop (they stop at their next step; their rows say where).
pub async fn run(
    ota: Ota,
    registry: Arc<Registry>,
    actors: GroupActors,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let ctx = Ctx {
        ota,
        registry,
        actors,
        settings: Arc::new(settings),
        shutdown,
    };
    let clock = ctx.ota.clock.clone();
    let mut running: JoinSet<u64> = JoinSet::new();
    let mut active: HashSet<u64> = HashSet::new();
    loop {
        let now = clock.now();
        let next = match ctx.ota.store.read_with(store::active_schedules).await {
            Ok(rows) => {
                let mut next: Option<UnixMillis> = None;
                for row in rows {
                    if active.contains(&row.id) {
                        continue;
                    }
                    if row.state == "running" || row.start <= now {
                        active.insert(row.id);
                        let (ctx, id) = (ctx.clone(), row.id);
                        running.spawn(async move {
                            rollout(ctx, id).await;
                            id
                        });
                    } else {
                        next = Some(next.map_or(row.start, |n| n.min(row.start)));
                    }
                }
                next
            }
            Err(e) => {
                tracing::error!("read OTA schedules: {e}; retrying");
                Some(UnixMillis(
                    now.0 + i64::try_from(RETRY_AFTER_ERROR.as_millis()).unwrap_or(5_000),
                ))
            }
        };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = ctx.ota.wake.notified() => {}
            _ = clock.sleep_until(next) => {}
            Some(done) = running.join_next() => {
                match done {
                    Ok(id) => { active.remove(&id); }
                    Err(e) => tracing::error!("an OTA rollout task failed: {e}"),
                }
            }
        }
    }
    while running.join_next().await.is_some() {}
}

/// One schedule's rollout, retried after store errors until it finishes or
/// the broker stops.
async fn rollout(ctx: Ctx, id: u64) {
    loop {
        match drive(&ctx, id).await {
            Ok(()) | Err(Stop::Shutdown) => return,
            Err(Stop::Store(e)) => {
                tracing::error!(schedule = id, "OTA rollout: store: {e}; retrying");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_AFTER_ERROR) => {}
                }
            }
        }
    }
}

/// What a started rollout works on.
struct Started {
    row: ScheduleRow,
    update: OtaUpdateInfo,
    group: GroupName,
}

async fn drive(ctx: &Ctx, id: u64) -> Result<(), Stop> {
    let now = ctx.ota.clock.now();
    // Start it (if it is still scheduled and its group may take it).
    let started = ctx
        .ota
        .store
        .exec(move |c| {
            let Some(row) = store::schedule(c, id)? else {
                return Ok(None);
            };
            if !matches!(row.state.as_str(), "scheduled" | "running") {
                return Ok(None);
            }
            let (update, _) = store::update(c, row.update_id)?
                .ok_or_else(|| StoreError::Corrupt(format!("schedule {id} names no update")))?;
            let g = store::group_by_num(c, row.group_num)?;
            if row.state == "scheduled" {
                if let Err(e) = super::status_allows(&g) {
                    let why = format!("not started: {e}");
                    store::set_state(c, id, "scheduled", "failed", now, Some(&why))?;
                    store::event(
                        c,
                        g.num,
                        now,
                        "ota-failed",
                        &format!("OTA schedule {id} (update {}) {why}", update.id),
                    )?;
                    return Ok(None);
                }
                store::set_state(c, id, "scheduled", "running", now, None)?;
                store::event(
                    c,
                    g.num,
                    now,
                    "ota-started",
                    &format!(
                        "OTA schedule {id} started: update {} ({} {})",
                        update.id, update.component, update.version
                    ),
                )?;
            }
            let row = store::schedule(c, id)?
                .ok_or_else(|| StoreError::Corrupt(format!("schedule {id} vanished")))?;
            Ok(Some(Started {
                row,
                update,
                group: g.name,
            }))
        })
        .await?;
    let Some(started) = started else {
        return Ok(());
    };
    let mut rows = ctx
        .ota
        .store
        .read_with(move |c| store::results(c, id))
        .await?;
    if rows.is_empty() {
        // First start (or a crash before the plan was written): plan now.
        // A drained host stays out (the rollout would undrain it: it comes
        // back by an operator's `resources undrain`, or an image update that
        // succeeds on it), unless an earlier OTA of the group failed on it
        // and drained it: this rollout is its retry.
        let live = ctx.registry.snapshot();
        let group_num = started.row.group_num;
        let retry: HashSet<ResourceId> = ctx
            .ota
            .store
            .read_with(move |c| store::failed_resources(c, group_num))
            .await?
            .into_iter()
            .collect();
        let drained =
            |r: &ResourceId| live.get(r).is_some_and(|l| l.draining) && !retry.contains(r);
        let plan = match ctx.actors.view(&started.group).await {
            Ok(view) => {
                let joined: HashSet<&ResourceId> = view.joined.iter().collect();
                view.resources
                    .iter()
                    .filter(|r| r.state == ResourceState::Ready && joined.contains(&r.resource))
                    .filter(|r| !drained(&r.resource))
                    .map(|r| r.resource.clone())
                    .collect::<Vec<_>>()
            }
            Err(e) => {
                return finish(ctx, &started, Err(format!("no live group to update: {e}"))).await
            }
        };
        let num = started.row.group_num;
        let names: Vec<&str> = plan.iter().map(|r| r.as_str()).collect();
        let message = format!(
            "OTA schedule {id} (update {}: {} {}) plan: {} resource(s) in waves of {}, each \
             drained with a {} deadline: {}",
            started.update.id,
            started.update.component,
            started.update.version,
            plan.len(),
            started.row.wave,
            format_duration(Duration::from_millis(started.row.drain_ms)),
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        );
        ctx.ota
            .store
            .exec(move |c| {
                store::insert_plan(c, id, &plan)?;
                store::event(c, num, now, "ota-step", &message)
            })
            .await?;
        rows = ctx
            .ota
            .store
            .read_with(move |c| store::results(c, id))
            .await?;
    }
    let started = Arc::new(started);
    for wave in plan_waves(&rows, started.row.wave) {
        let mut steps = JoinSet::new();
        for resource in wave {
            let row = rows
                .iter()
                .find(|r| r.resource == resource)
                .cloned()
                .ok_or_else(|| StoreError::Corrupt(format!("{resource} left the plan")))?;
            let (ctx, started) = (ctx.clone(), started.clone());
            steps.spawn(async move {
                let outcome = update_resource(&ctx, &started, &row).await;
                (row.resource, outcome)
            });
        }
        let mut failed = Vec::new();
        let mut stop = None;
        while let Some(joined) = steps.join_next().await {
            match joined {
                Ok((_, Ok(Ok(())))) => {}
                Ok((resource, Ok(Err(why)))) => failed.push(format!("{resource}: {why}")),
                Ok((_, Err(s))) => stop = Some(s),
                Err(e) => failed.push(format!("update task failed: {e}")),
            }
        }
        if let Some(s) = stop {
            return Err(s);
        }
        if !failed.is_empty() {
            return finish(ctx, &started, Err(failed.join("; "))).await;
        }
    }
    finish(ctx, &started, Ok(())).await
}

/// Ends a rollout: `succeeded`, or `failed`, with one event either way; the
/// group's status follows ([`after_succeeded_ota`], [`after_failed_ota`]):
/// a failure makes a `published` group `update-failed`, a success makes an
/// `update-failed` group `published`, each with a `status` event. A status
/// that does not change records no transition.
async fn finish(ctx: &Ctx, s: &Started, outcome: Result<(), String>) -> Result<(), Stop> {
    let now = ctx.ota.clock.now();
    let (id, num, update) = (s.row.id, s.row.group_num, s.update.clone());
    let status_changed = ctx
        .ota
        .store
        .exec(move |c| {
            let g = store::group_by_num(c, num)?;
            let status = Status::parse(&g.status);
            let what = format!(
                "OTA schedule {id} (update {}: {} {})",
                update.id, update.component, update.version
            );
            let (to, why) = match &outcome {
                Ok(()) => {
                    store::set_state(c, id, "running", "succeeded", now, None)?;
                    let mut message = format!(
                        "{what} succeeded: every resource runs {} {}",
                        update.component, update.version
                    );
                    // An image update changes what the group is made of:
                    // hosts created from now on (scale-out, replacements)
                    // start from the new image, like after `update-image`.
                    if update.component == "image"
                        && store::set_group_image(c, num, &update.version, now)?
                    {
                        message.push_str(&format!("; the group's image is now {}", update.version));
                    }
                    store::event(c, num, now, "ota-succeeded", &message)?;
                    (
                        status.and_then(after_succeeded_ota),
                        format!("{what} succeeded on every resource"),
                    )
                }
                Err(why) => {
                    store::set_state(c, id, "running", "failed", now, Some(why))?;
                    store::event(
                        c,
                        num,
                        now,
                        "ota-failed",
                        &format!("{what} failed, the rollout stopped: {why}"),
                    )?;
                    (
                        status.and_then(after_failed_ota),
                        format!(
                            "{what} failed: {why}; the failing resource stays drained, the \
                             others serve"
                        ),
                    )
                }
            };
            let Some(to) = to else { return Ok(false) };
            if !store::set_group_status(c, num, &g.status, to.as_str(), now)? {
                return Ok(false);
            }
            store::event(
                c,
                num,
                now,
                "status",
                &format!("{} -> {to}: {why}", g.status),
            )?;
            Ok(true)
        })
        .await?;
    if status_changed || s.update.component == "image" {
        if let Err(e) = ctx.actors.sync(s.group.as_str()).await {
            tracing::error!(group = %s.group, "update the group's live state: {e}");
        }
    }
    Ok(())
}

/// Why a resource of the plan is no longer updated: the group's actor shows
/// it releasing or released (a scale-in) since the plan was made. `None`
/// otherwise, also when the actor does not show it at all (a base resource
/// not yet re-joined after a broker restart): then the update goes on and
/// fails if the resource stays away.
async fn left_group(ctx: &Ctx, s: &Started, resource: &ResourceId) -> Option<String> {
    let view = ctx.actors.view(&s.group).await.ok()?;
    view.resources
        .iter()
        .find(|r| &r.resource == resource)
        .filter(|r| matches!(r.state, ResourceState::Releasing | ResourceState::Released))
        .map(|r| format!("skipped: {} by a scale-in before its turn", r.state))
}

/// The `ota-step` event of `resource`: `what` happened.
fn step_message(s: &Started, resource: &ResourceId, what: &str) -> String {
    format!(
        "OTA schedule {} (update {}: {} {}): {resource} {what}",
        s.row.id, s.update.id, s.update.component, s.update.version
    )
}

/// Writes an `ota-step` event of `resource` that changes no state (its
/// sessions were warned).
async fn step_event(
    ctx: &Ctx,
    s: &Started,
    resource: &ResourceId,
    what: String,
) -> Result<(), Stop> {
    let now = ctx.ota.clock.now();
    let (num, message) = (s.row.group_num, step_message(s, resource, &what));
    ctx.ota
        .store
        .exec(move |c| store::event(c, num, now, "ota-step", &message))
        .await?;
    Ok(())
}

/// Writes a resource's step with its group event (`ota-step`), in one
/// transaction: `what` says what happened in the step.
async fn mark(
    ctx: &Ctx,
    s: &Started,
    resource: &ResourceId,
    state: &'static str,
    detail: Option<String>,
    what: String,
) -> Result<(), Stop> {
    let now = ctx.ota.clock.now();
    let resource = resource.clone();
    let (schedule, num) = (s.row.id, s.row.group_num);
    let message = step_message(s, &resource, &what);
    ctx.ota
        .store
        .exec(move |c| {
            store::set_result(c, schedule, &resource, state, now, detail.as_deref())?;
            store::event(c, num, now, "ota-step", &message)
        })
        .await?;
    Ok(())
}

/// Waits for the next change of the registry's live state, or the deadline
/// on the groups' clock, or `until` on the runtime's clock, whichever comes
/// first; `Err` on shutdown.
async fn wait_change(
    ctx: &Ctx,
    rx: &mut tokio::sync::watch::Receiver<u64>,
    deadline: Option<UnixMillis>,
    until: Option<tokio::time::Instant>,
) -> Result<(), Stop> {
    let until = async {
        match until {
            Some(u) => tokio::time::sleep_until(u).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctx.shutdown.cancelled() => Err(Stop::Shutdown),
        _ = rx.changed() => Ok(()),
        _ = ctx.ota.clock.sleep_until(deadline), if deadline.is_some() => Ok(()),
        _ = until => Ok(()),
    }
}

/// Waits until the resource is connected, at most `gone_timeout`.
async fn wait_connected(ctx: &Ctx, resource: &ResourceId) -> Result<bool, Stop> {
    let until = tokio::time::Instant::now() + ctx.settings.gone_timeout;
    let mut rx = ctx.registry.subscribe();
    loop {
        rx.borrow_and_update();
        if ctx.registry.snapshot().contains_key(resource) {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= until {
            return Ok(false);
        }
        wait_change(ctx, &mut rx, None, Some(until)).await?;
    }
}

/// Sends a command, naming what failed (an agent's failure text reduced to
/// its tail, [`crate::hook_failure::brief`]).
async fn command(ctx: &Ctx, resource: &ResourceId, cmd: Command, what: &str) -> Result<(), String> {
    match ctx.registry.command(resource, cmd, COMMAND_TIMEOUT).await {
        Ok(CommandOutcome::Done) => Ok(()),
        Ok(CommandOutcome::Failed(why)) => Err(format!("{what} failed: {}", brief(&why))),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// One resource's update; `Ok(Err(why))` when it failed (its row says so).
async fn update_resource(
    ctx: &Ctx,
    s: &Started,
    row: &ResultRow,
) -> Result<Result<(), String>, Stop> {
    if let Some(why) = left_group(ctx, s, &row.resource).await {
        let what = why.clone();
        mark(ctx, s, &row.resource, "skipped", Some(why), what).await?;
        return Ok(Ok(()));
    }
    let outcome = steps(ctx, s, row).await?;
    if outcome.is_err() && ctx.shutdown.is_cancelled() {
        // The broker is stopping: a command cut short by its connections
        // closing is not the resource's failure. The next start resumes
        // this resource from its stored step.
        return Err(Stop::Shutdown);
    }
    match &outcome {
        Ok(detail) => {
            let what = match detail {
                Some(d) => format!("done: updated and back in service ({d})"),
                None => "done: updated and back in service".to_owned(),
            };
            mark(ctx, s, &row.resource, "done", detail.clone(), what).await?
        }
        Err(why) => {
            let what = format!("failed: {why}; it stays drained");
            mark(ctx, s, &row.resource, "failed", Some(why.clone()), what).await?
        }
    }
    Ok(outcome.map(|_| ()))
}

/// The steps of one resource; `Ok(Ok(detail))` when it is updated and takes
/// sessions again.
async fn steps(
    ctx: &Ctx,
    s: &Started,
    row: &ResultRow,
) -> Result<Result<Option<String>, String>, Stop> {
    let resource = &row.resource;
    let update = &s.update;
    let started = row.started_at.unwrap_or_else(|| ctx.ota.clock.now());
    let deadline = drain_deadline(started, s.row.drain_ms);
    let until = crate::render::rfc3339_secs(deadline);
    mark(
        ctx,
        s,
        resource,
        "draining",
        None,
        format!("draining: no new sessions; open ones end by {until} at the latest"),
    )
    .await?;
    if !wait_connected(ctx, resource).await? {
        return Ok(Err(format!(
            "not connected within {}",
            format_duration(ctx.settings.gone_timeout)
        )));
    }
    if let Err(why) = command(ctx, resource, Command::Drain, "drain").await {
        return Ok(Err(why));
    }
    ctx.registry.set_draining(resource, true);
    ctx.actors.availability(&s.group, resource, false).await;

    // Warn every open session, then wait for them to end or the deadline.
    let message = format!(
        "This host is being updated ({} {}); please save your work: the session will be ended at {}",
        update.component, update.version, until
    );
    let r = resource.clone();
    let open = ctx
        .ota
        .store
        .read_with(move |c| store::open_sessions(c, &r))
        .await?;
    if !open.is_empty() {
        let mut warned = Vec::new();
        let mut not_warned = Vec::new();
        for session in open {
            let warn = Command::WarnSession {
                session: session.clone(),
                message: message.clone(),
                deadline,
            };
            // A warning that cannot be given does not hold the update back:
            // the session still has until the deadline.
            match command(ctx, resource, warn, "warn").await {
                Ok(()) => warned.push(session.to_string()),
                Err(why) => {
                    tracing::warn!(%resource, %session, "OTA: {why}");
                    not_warned.push(format!("{session} ({why})"));
                }
            }
        }
        let mut what = format!(
            "warned: {} open session(s) warned ({}), ended at {until} if still open",
            warned.len(),
            if warned.is_empty() {
                "-".to_owned()
            } else {
                warned.join(", ")
            }
        );
        if !not_warned.is_empty() {
            what.push_str(&format!("; not warned: {}", not_warned.join("; ")));
        }
        step_event(ctx, s, resource, what).await?;
    }
    let mut rx = ctx.registry.subscribe();
    let left = loop {
        rx.borrow_and_update();
        let r = resource.clone();
        let open = ctx
            .ota
            .store
            .read_with(move |c| store::open_sessions(c, &r))
            .await?;
        if open.is_empty() || ctx.ota.clock.now() >= deadline {
            break open;
        }
        wait_change(ctx, &mut rx, Some(deadline), None).await?;
    };
    let detail = (!left.is_empty()).then(|| {
        format!(
            "{} session(s) disconnected at the drain deadline",
            left.len()
        )
    });
    for session in left {
        let end = Command::DisconnectSession {
            session: session.clone(),
            reason: format!("OTA update {}: drain deadline passed", update.id),
        };
        if let Err(why) = command(ctx, resource, end, &format!("end session {session}")).await {
            return Ok(Err(why));
        }
    }

    // Update.
    mark(
        ctx,
        s,
        resource,
        "updating",
        None,
        format!(
            "updating to {} {}{}",
            update.component,
            update.version,
            detail
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ),
    )
    .await?;
    let apply = Command::ApplyUpdate {
        update: update.id,
        component: update.component.clone(),
        version: update.version.clone(),
        package: update.package.clone(),
    };
    let wait_for = match ctx
        .registry
        .command(resource, apply, ctx.settings.update_timeout)
        .await
    {
        Ok(CommandOutcome::Done) => ctx.settings.inventory_timeout,
        Ok(CommandOutcome::Failed(why)) => {
            return Ok(Err(format!("update failed: {}", brief(&why))))
        }
        Err(e @ CommandError::Timeout(..)) => return Ok(Err(format!("update: {e}"))),
        // The agent went away (an agent updating itself restarts): its
        // reconnected inventory tells.
        Err(CommandError::NotConnected(_) | CommandError::ConnectionClosed(_)) => {
            ctx.settings.gone_timeout
        }
    };
    if let Err(why) = wait_version(ctx, resource, update, wait_for).await? {
        return Ok(Err(why));
    }
    if let Err(why) = command(ctx, resource, Command::Undrain, "undrain").await {
        return Ok(Err(why));
    }
    ctx.registry.set_draining(resource, false);
    // The group's actor was told it is unavailable at the drain; tell it
    // it takes sessions again now (the agent's health reports may never
    // have shown the drain if it was shorter than their interval).
    if ctx
        .registry
        .snapshot()
        .get(resource)
        .is_some_and(|l| l.available)
    {
        ctx.actors.availability(&s.group, resource, true).await;
    }
    Ok(Ok(detail))
}

/// Waits until the resource's inventory shows the update's version (or
/// reports the update failed), at most `within`.
async fn wait_version(
    ctx: &Ctx,
    resource: &ResourceId,
    update: &OtaUpdateInfo,
    within: Duration,
) -> Result<Result<(), String>, Stop> {
    let until = tokio::time::Instant::now() + within;
    let mut rx = ctx.registry.subscribe();
    loop {
        rx.borrow_and_update();
        if let Some(inv) = ctx.registry.inventory(resource) {
            if let Some(last) = inv.last_update.as_ref().filter(|u| u.update == update.id) {
                if let CommandOutcome::Failed(why) = &last.outcome {
                    return Ok(Err(format!("update failed: {}", brief(why))));
                }
            }
            if shows(&inv, &update.component, &update.version) {
                return Ok(Ok(()));
            }
        }
        if tokio::time::Instant::now() >= until {
            let now = match ctx.registry.inventory(resource) {
                None => "no inventory".to_owned(),
                Some(i) => format!(
                    "it runs {}",
                    running(&i, &update.component).unwrap_or_else(|| "no such component".into())
                ),
            };
            return Ok(Err(format!(
                "its inventory does not show {} {} after {} ({now})",
                update.component,
                update.version,
                format_duration(within)
            )));
        }
        wait_change(ctx, &mut rx, None, Some(until)).await?;
    }
}
