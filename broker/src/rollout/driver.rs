//! The rollout timer and one task per running rollout.
//!
//! [`run`] sleeps until the earliest start of a `scheduled` OTA schedule on
//! the groups' clock ([`Clock::sleep_until`]), or until [`Board::wake`]
//! says rollouts changed (a schedule, an image update recorded, a group's
//! status); it never polls. It starts a task for each image update that is
//! `running` and each OTA schedule whose start has come (moving it to
//! `running` durably, and only if it is still `scheduled`: a cancel that
//! committed first wins). At broker start the running ones resume.
//!
//! A rollout's task builds its [`Rollout`] from the rows and then, every
//! time something may have changed (a command's answer, a change of the
//! registry's live state of one of its hosts or of its group's agents, the
//! machine's deadline, a session of its group ending, a wake), takes an
//! [`Observation`] (the group's actor's view, the registry, the store) and feeds it with the answers that
//! came, then carries the outputs out in order: records are written in one
//! transaction before the next command goes out or the actor is told;
//! commands run as tasks whose answers come back as inputs. A store error
//! rebuilds the rollout from the rows a little later; shutting down stops
//! it where it is (a command cut short by the broker stopping is not the
//! host's failure: the rows say where to resume).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;

use ferry_common::wire::{CommandOutcome, Inventory};
use ferry_common::{GroupName, ResourceId, UnixMillis};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::machine::{
    Answer, GroupObs, GroupRow, HostRecord, HostView, ImageLoad, Input, Live, Observation, OtaLoad,
    Output, Purpose, Record, Recorded, Rollout, Settings, Tell,
};
use super::Board;
use crate::clock::Clock;
use crate::groups::actor::GroupView;
use crate::groups::{GroupActors, RETRY_AFTER_ERROR};
use crate::ota::Ota;
use crate::registry::{CommandError, Registry};
use crate::store::rollouts::{GroupEvent, RolloutWork, RolloutWrite, StartDecision};
use crate::store::{Store, StoreError};

/// Which rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Which {
    /// An image update (`image_updates.id`).
    Image(i64),
    /// An OTA schedule (`ota_schedules.id`).
    Ota(u64),
}

impl fmt::Display for Which {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Which::Image(id) => write!(f, "image update {id}"),
            Which::Ota(id) => write!(f, "OTA schedule {id}"),
        }
    }
}

/// What every rollout task needs; cheap to clone.
#[derive(Clone)]
pub struct Ctx {
    store: Store,
    clock: Clock,
    board: Board,
    registry: Arc<Registry>,
    actors: GroupActors,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
}

impl Ctx {
    /// The number of `which`'s group, when it can be read.
    async fn group_of(&self, which: Which) -> Option<i64> {
        let (schedule, image) = match which {
            Which::Ota(id) => (Some(id), None),
            Which::Image(id) => (None, Some(id)),
        };
        self.store
            .rollout_group(schedule, image)
            .await
            .ok()
            .flatten()
    }

    pub fn new(
        ota: &Ota,
        registry: Arc<Registry>,
        actors: GroupActors,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Ctx {
        Ctx {
            store: ota.store().clone(),
            clock: ota.clock().clone(),
            board: ota.board().clone(),
            registry,
            actors,
            settings: Arc::new(settings),
            shutdown,
        }
    }
}

/// Why a rollout task stopped before finishing.
#[derive(Debug)]
pub enum Stop {
    Shutdown,
    Store(StoreError),
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop::Store(e)
    }
}

/// Runs the rollout timer until `shutdown`, then waits for the rollouts it
/// started to stop (they stop where they are; their rows say where).
pub async fn run(
    ota: Ota,
    registry: Arc<Registry>,
    actors: GroupActors,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let ctx = Ctx::new(&ota, registry, actors, settings, shutdown);
    let mut wake = ctx.board.subscribe();
    let mut running: JoinSet<Which> = JoinSet::new();
    let mut active: HashSet<Which> = HashSet::new();
    loop {
        wake.borrow_and_update();
        let now = ctx.clock.now();
        let next = match ctx.store.rollout_work().await {
            Ok(RolloutWork { images, schedules }) => {
                // Rollouts of the groups this broker owns (brokers sharing a
                // store each drive their own groups'; a group gained wakes
                // this loop through its actor's start).
                let owned = ctx.actors.ownership();
                // An image update starts as soon as it is recorded.
                let mut due: Vec<Which> = images
                    .iter()
                    .filter(|r| owned.owns_num(r.group_num))
                    .map(|r| Which::Image(r.id))
                    .collect();
                let mut next: Option<UnixMillis> = None;
                for row in schedules
                    .into_iter()
                    .filter(|r| owned.owns_num(r.group_num))
                {
                    if row.state == "running" || row.start <= now {
                        due.push(Which::Ota(row.id));
                    } else {
                        next = Some(next.map_or(row.start, |n| n.min(row.start)));
                    }
                }
                for which in due {
                    if active.insert(which) {
                        running.spawn(rollout(ctx.clone(), which));
                    }
                }
                next
            }
            Err(e) => {
                tracing::error!("read rollouts: {e}; retrying");
                Some(UnixMillis(now.0.saturating_add(
                    i64::try_from(RETRY_AFTER_ERROR.as_millis()).unwrap_or(5_000),
                )))
            }
        };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = wake.changed() => {}
            _ = ctx.clock.sleep_until(next) => {}
            Some(done) = running.join_next() => match done {
                Ok(which) => { active.remove(&which); }
                Err(e) => tracing::error!("a rollout task failed: {e}"),
            },
        }
    }
    while running.join_next().await.is_some() {}
}

/// One rollout, built again from its rows after a store error, until it
/// finishes or the broker stops.
async fn rollout(ctx: Ctx, which: Which) -> Which {
    loop {
        if let Some(num) = ctx.group_of(which).await {
            if !ctx.actors.ownership().owns_num(num) {
                // Its group went to another broker, which drives it on.
                tracing::info!(%which, "rollout left to the group's new owner");
                break;
            }
        }
        let driven = match Driver::load(ctx.clone(), which).await {
            Ok(Some(driver)) => driver.run().await,
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        match driven {
            Ok(()) | Err(Stop::Shutdown) => break,
            Err(Stop::Store(e)) => {
                tracing::error!(%which, "rollout: store: {e}; retrying");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(RETRY_AFTER_ERROR) => {}
                }
            }
        }
    }
    which
}

/// A command's answer, for the machine.
fn answer(result: Result<CommandOutcome, CommandError>) -> Answer {
    match result {
        Ok(CommandOutcome::Done) => Answer::Done,
        Ok(CommandOutcome::Failed(why)) => Answer::Failed(why),
        Err(e @ CommandError::Timeout(..)) => Answer::TimedOut(e.to_string()),
        Err(e @ (CommandError::NotConnected(_) | CommandError::ConnectionClosed(_))) => {
            Answer::Lost(e.to_string())
        }
    }
}

/// The actor's view as the machine sees it.
fn group_obs(view: GroupView) -> GroupObs {
    GroupObs {
        resources: view
            .resources
            .into_iter()
            .map(|r| HostView {
                resource: r.resource,
                state: r.state,
                sessions: r.sessions,
            })
            .collect(),
        joined: view.joined.into_iter().collect(),
    }
}

/// What a rollout follows of one connected agent: its connection,
/// availability, drain, last health report and inventory.
type LiveKey = (u64, bool, bool, Option<UnixMillis>, Option<Inventory>);

/// One rollout's task: see the module doc.
pub struct Driver {
    ctx: Ctx,
    which: Which,
    group: GroupName,
    group_num: i64,
    machine: Rollout,
    /// Commands out, each answering with its host and purpose.
    tasks: JoinSet<(ResourceId, Purpose, Answer)>,
    /// Answers not fed yet.
    answers: Vec<(ResourceId, Purpose, Answer)>,
    /// The registry's changes.
    changes: watch::Receiver<u64>,
    /// [`Board::wake`].
    wake: watch::Receiver<u64>,
    /// The registry's state of the hosts it followed at the last
    /// observation, connected or not (`None`), to tell a change that
    /// concerns it from one that does not.
    seen: BTreeMap<ResourceId, Option<LiveKey>>,
}

impl Driver {
    /// The rollout as recorded; `None` when it is not running (finished,
    /// cancelled, or an OTA schedule its group's status refuses, which
    /// fails it).
    pub async fn load(ctx: Ctx, which: Which) -> Result<Option<Driver>, Stop> {
        let loaded = match which {
            Which::Ota(id) => load_ota(&ctx, id).await?,
            Which::Image(id) => load_image(&ctx, id).await?,
        };
        let Some((machine, group_num)) = loaded else {
            return Ok(None);
        };
        Ok(Some(Driver {
            changes: ctx.registry.subscribe(),
            wake: ctx.board.subscribe(),
            group: machine.group().clone(),
            ctx,
            which,
            group_num,
            machine,
            tasks: JoinSet::new(),
            answers: Vec::new(),
            seen: BTreeMap::new(),
        }))
    }

    /// Drives the rollout until it is over or the broker stops.
    pub async fn run(mut self) -> Result<(), Stop> {
        // A session ending in the group wakes this rollout (see
        // [`Board::session_ended`]).
        self.ctx.board.rolling(&self.group, true);
        let result = self.drive().await;
        self.ctx.board.rolling(&self.group, false);
        // Over, or stopped: `group show` no longer has it running here.
        self.ctx.board.set_image(&self.group, None);
        result
    }

    async fn drive(&mut self) -> Result<(), Stop> {
        loop {
            self.turn().await?;
            if self.machine.is_finished() {
                return Ok(());
            }
            // Hosts it follows since this turn (a plan just made) are
            // looked at before it waits for their changes.
            if self.machine.hosts().all(|h| self.seen.contains_key(h)) {
                self.wait().await?;
            }
        }
    }

    /// Waits until something may have changed: an answer, the deadline, a
    /// wake, or a change of the registry's state of a host it follows (a
    /// change of another agent's wakes it for nothing).
    async fn wait(&mut self) -> Result<(), Stop> {
        loop {
            let deadline = self.machine.poll_deadline();
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => return Err(Stop::Shutdown),
                Some(done) = self.tasks.join_next() => {
                    match done {
                        Ok(a) => self.answers.push(a),
                        Err(e) => tracing::error!(which = %self.which, "a command task failed: {e}"),
                    }
                    return Ok(());
                }
                _ = self.wake.changed() => return Ok(()),
                _ = self.ctx.clock.sleep_until(deadline) => return Ok(()),
                _ = self.changes.changed() => {
                    if self.live_now() != self.seen {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The registry's state of the group's agents and the rollout's hosts,
    /// as far as a rollout cares.
    fn live_now(&self) -> BTreeMap<ResourceId, Option<LiveKey>> {
        let mut hosts: BTreeSet<ResourceId> = self.machine.hosts().cloned().collect();
        for (r, _, _) in self.ctx.registry.members(&self.group) {
            hosts.insert(r);
        }
        hosts
            .into_iter()
            .map(|r| {
                let key = self.ctx.registry.get(&r).map(|(conn, l)| {
                    (conn, l.available, l.draining, l.last_health_at, l.inventory)
                });
                (r, key)
            })
            .collect()
    }

    /// One step: observe, feed the answers that came and the deadlines
    /// due, carry the outputs out.
    pub async fn turn(&mut self) -> Result<(), Stop> {
        while let Some(done) = self.tasks.try_join_next() {
            match done {
                Ok(a) => self.answers.push(a),
                Err(e) => tracing::error!(which = %self.which, "a command task failed: {e}"),
            }
        }
        self.seen = self.live_now();
        let obs = self.observe().await?;
        self.machine
            .handle(self.ctx.clock.now(), Input::Observed(obs));
        if self.ctx.shutdown.is_cancelled() {
            // A command cut short by the broker stopping (its connections
            // close) is not the host's failure.
            return Err(Stop::Shutdown);
        }
        let now = self.ctx.clock.now();
        for (host, purpose, answer) in std::mem::take(&mut self.answers) {
            self.machine.handle(
                now,
                Input::Answered {
                    host,
                    purpose,
                    answer,
                },
            );
        }
        self.machine.handle_timeout(now);
        self.ctx
            .board
            .set_image(&self.group, self.machine.progress());
        self.carry_out().await
    }

    /// The group and its agents now.
    async fn observe(&self) -> Result<Observation, Stop> {
        let group = match self.ctx.actors.view(&self.group).await {
            Ok(view) => Ok(group_obs(view)),
            Err(e) => Err(e.to_string()),
        };
        let mut hosts: BTreeSet<ResourceId> = self.machine.hosts().cloned().collect();
        if let Ok(g) = &group {
            hosts.extend(g.joined.iter().cloned());
            hosts.extend(g.resources.iter().map(|h| h.resource.clone()));
        }
        let live = hosts
            .into_iter()
            .filter_map(|r| {
                let (conn, l) = self.ctx.registry.get(&r)?;
                let live = Live {
                    conn,
                    available: l.available,
                    draining: l.draining,
                    inventory: l.inventory,
                };
                Some((r, live))
            })
            .collect();
        let image_update = match self.which {
            Which::Image(id) => Some(id),
            Which::Ota(_) => None,
        };
        let rows = self
            .ctx
            .store
            .rollout_rows(self.group_num, image_update, self.machine.wants_recorded())
            .await?;
        Ok(Observation {
            group,
            live,
            recorded: rows.open,
            row: Some(GroupRow {
                status: rows.group.status,
                image: rows.group.image,
            }),
            running: rows.running,
            members: rows.members,
        })
    }

    /// Carries the machine's outputs out, in order: records before the
    /// command or message that follows them.
    async fn carry_out(&mut self) -> Result<(), Stop> {
        let outputs: Vec<Output> = self.machine.drain_outputs().collect();
        let mut records = Vec::new();
        for output in outputs {
            match output {
                Output::Record(r) => records.push(r),
                Output::Command {
                    host,
                    purpose,
                    command,
                    timeout,
                } => {
                    self.write(std::mem::take(&mut records)).await?;
                    let registry = self.ctx.registry.clone();
                    self.tasks.spawn(async move {
                        let answer = answer(registry.command(&host, command, timeout).await);
                        (host, purpose, answer)
                    });
                }
                Output::Tell(tell) => {
                    self.write(std::mem::take(&mut records)).await?;
                    self.tell(tell).await;
                }
            }
        }
        self.write(records).await
    }

    /// Writes `records` in one transaction.
    async fn write(&self, records: Vec<Record>) -> Result<(), Stop> {
        if records.is_empty() {
            return Ok(());
        }
        let writes = records
            .into_iter()
            .filter_map(|r| store_write(self.which, self.group_num, r))
            .collect();
        self.ctx.store.record_rollout(writes).await?;
        Ok(())
    }

    /// Tells the registry and the group's actor what an agent confirmed,
    /// or the actor that its row changed.
    async fn tell(&self, tell: Tell) {
        let (registry, actors) = (&self.ctx.registry, &self.ctx.actors);
        match tell {
            // At once, not at the agent's next health report: `group show`
            // and `resources list` say the same from now on, and no new
            // session is routed there.
            Tell::Drained(r) => {
                registry.set_draining(&r, true);
                actors.availability(&self.group, &r, false).await;
            }
            Tell::Undrained(r) => {
                registry.set_draining(&r, false);
                // Its health reports may never have shown the drain if it
                // was shorter than their interval.
                if registry.get(&r).is_some_and(|(_, l)| l.available) {
                    actors.availability(&self.group, &r, true).await;
                }
            }
            Tell::Sync => {
                if let Err(e) = actors.sync(self.group.as_str()).await {
                    tracing::error!(group = %self.group, "update the group's live state: {e}");
                }
            }
        }
    }
}

/// A machine's record as the store writes it for rollout `which` of group
/// `num`; `None` for what it does not keep.
fn store_write(which: Which, num: i64, record: Record) -> Option<RolloutWrite> {
    Some(match (record, which) {
        (Record::Plan(hosts), Which::Image(update)) => RolloutWrite::ImagePlan { update, hosts },
        (Record::Plan(hosts), Which::Ota(schedule)) => RolloutWrite::OtaPlan { schedule, hosts },
        (
            Record::Host {
                host,
                step,
                detail,
                at,
            },
            Which::Image(update),
        ) => {
            // An image update records outcomes only.
            if !matches!(step, HostRecord::Done | HostRecord::Failed) {
                return None;
            }
            RolloutWrite::ImageOutcome {
                update,
                host,
                ok: step == HostRecord::Done,
                detail: detail.unwrap_or_default(),
                at,
            }
        }
        (
            Record::Host {
                host,
                step,
                detail,
                at,
            },
            Which::Ota(schedule),
        ) => RolloutWrite::OtaStep {
            schedule,
            host,
            state: step.as_str(),
            detail,
            at,
        },
        (Record::Event { kind, message, at }, _) => RolloutWrite::Event {
            group_num: num,
            event: GroupEvent { kind, message },
            at,
        },
        (Record::Ended { ok, at, .. }, Which::Image(update)) => {
            RolloutWrite::ImageEnded { update, ok, at }
        }
        (Record::Ended { ok, detail, at }, Which::Ota(schedule)) => RolloutWrite::OtaEnded {
            schedule,
            ok,
            detail,
            at,
        },
        (Record::GroupImage { image, at }, _) => RolloutWrite::GroupImage {
            group_num: num,
            image,
            at,
        },
        (
            Record::Status {
                from,
                to,
                message,
                at,
            },
            _,
        ) => RolloutWrite::GroupStatus {
            group_num: num,
            from,
            to: to.as_str().to_owned(),
            message,
            at,
        },
    })
}

/// Starts OTA schedule `id` if it is still scheduled and its group may take
/// it (or fails it, with an event), and loads it.
async fn load_ota(ctx: &Ctx, id: u64) -> Result<Option<(Rollout, i64)>, Stop> {
    let now = ctx.clock.now();
    let run = ctx
        .store
        .start_ota_schedule(id, now, move |g, update| {
            if let Err(e) = crate::ota::status_allows(g) {
                let why = format!("not started: {e}");
                return StartDecision::Fail {
                    event: GroupEvent {
                        kind: "ota-failed",
                        message: format!("OTA schedule {id} (update {}) {why}", update.id),
                    },
                    detail: why,
                };
            }
            StartDecision::Start(GroupEvent {
                kind: "ota-started",
                message: format!(
                    "OTA schedule {id} started: update {} ({} {})",
                    update.id, update.component, update.version
                ),
            })
        })
        .await?;
    Ok(run.map(|run| {
        let num = run.schedule.group_num;
        let load = OtaLoad {
            schedule: id,
            group: run.group,
            update: run.update,
            wave: run.schedule.wave,
            drain_ms: run.schedule.drain_ms,
            rows: run.results,
            retry: run.retry.into_iter().collect(),
        };
        (Rollout::ota(load, (*ctx.settings).clone()), num)
    }))
}

/// Loads image update `id` if it is still running.
async fn load_image(ctx: &Ctx, id: i64) -> Result<Option<(Rollout, i64)>, Stop> {
    let run = ctx.store.image_update_run(id).await?;
    Ok(run.map(|run| {
        let results = run
            .results
            .into_iter()
            .map(|r| {
                let recorded = match r.outcome.as_str() {
                    "done" => Recorded::Done,
                    "failed" => Recorded::Failed(r.detail),
                    _ => Recorded::Pending,
                };
                (r.resource, recorded)
            })
            .collect();
        // The group's open sessions as recorded, whether or not their
        // agents have joined its actor yet (broker restart).
        let mut open: BTreeMap<ResourceId, BTreeSet<_>> = BTreeMap::new();
        for (r, s) in run.open {
            open.entry(r).or_default().insert(s);
        }
        let num = run.update.group_num;
        let load = ImageLoad {
            id,
            group: run.group,
            image: run.update.image,
            started_at: run.update.started_at,
            disconnect_at: run.update.disconnect_at,
            results,
            previously_failed: run.previously_failed.into_iter().collect(),
            open,
        };
        (Rollout::image(load, (*ctx.settings).clone()), num)
    }))
}
