//! An OTA rollout (SPEC section 9): one offered update brought to the
//! group's hosts in waves.
//!
//! - The plan (the group's ready, joined hosts and its members from the
//!   store that have not joined yet, e.g. after a broker restart, less those
//!   an operator drained unless an earlier OTA of the group failed on them)
//!   is recorded `pending` once, when the rollout first starts, and fixed
//!   from then on. A member that was away at the plan and turns out drained
//!   when its turn comes is skipped: the rollout never undoes an operator's
//!   drain.
//! - The group's status stays as it is while the rollout runs; only its end
//!   changes it (below).
//! - Waves of `wave` hosts run their hosts at once. Each host: its step is
//!   `draining` (its drain deadline counts from then, kept across
//!   restarts), it waits for its agent, `Drain` (the group's actor is told
//!   at once), each open session warned with the deadline, a wait until
//!   they have ended or the deadline, `DisconnectSession` for those left,
//!   `updating`: `ApplyUpdate`, done when its inventory shows the version
//!   (an agent updating itself restarts: its next inventory tells), then
//!   `Undrain`. A host the group's actor shows released by a scale-in when
//!   its turn comes is `skipped`.
//! - A failure stops the rollout after its wave: the host stays drained,
//!   the rollout is `failed` and a `published` group `update-failed`. All
//!   done: `succeeded`, an `update-failed` group is `published` again, and
//!   an `image` update makes its version the group's image (hosts created
//!   later start from it, as after `update-image`). Other components are not
//!   yet carried to hosts created after the plan was made.
//! - Resumed from the rows: `done` and `skipped` hosts are not redone, the
//!   others start over from the drain with their recorded drain start.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use ferry_common::admin::OtaUpdateInfo;
use ferry_common::duration::format_duration;
use ferry_common::wire::{Command, CommandOutcome, Inventory};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis};

use super::{Answer, Core, Host, HostRecord, Phase, Purpose, Record, Step, Tell};
use crate::engine::ResourceState;
use crate::groups::lifecycle::{after_failed_ota, after_succeeded_ota, Status};
use crate::hook_failure::brief;
use crate::registry::COMMAND_TIMEOUT;
use crate::render::rfc3339_secs;
use crate::store::rollouts::ResultRow;

/// An OTA rollout as the store has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtaLoad {
    /// Its schedule's id.
    pub schedule: u64,
    pub group: GroupName,
    pub update: OtaUpdateInfo,
    /// Hosts updated at once.
    pub wave: u32,
    /// Each host's drain deadline, counted from its drain.
    pub drain_ms: u64,
    /// Its hosts as recorded, in update order (empty: not planned yet).
    pub rows: Vec<ResultRow>,
    /// Hosts an earlier OTA of the group failed on (and drained): this
    /// rollout is their retry, drained or not.
    pub retry: BTreeSet<ResourceId>,
}

/// The remaining hosts of a rollout in waves of `wave`, in update order:
/// `done` and `skipped` ones are left out (a resumed rollout does not redo
/// them).
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

/// The drain deadline of a host that started draining at `started`.
pub fn drain_deadline(started: UnixMillis, drain_ms: u64) -> UnixMillis {
    UnixMillis(
        started
            .0
            .saturating_add(i64::try_from(drain_ms).unwrap_or(i64::MAX)),
    )
}

/// The OTA rollout's own state.
pub(super) struct OtaRun {
    schedule: u64,
    update: OtaUpdateInfo,
    wave: u32,
    drain_ms: u64,
    /// The recorded rows, until the first observation.
    rows: Vec<ResultRow>,
    retry: BTreeSet<ResourceId>,
    /// Waves still to run.
    waves: VecDeque<Vec<ResourceId>>,
    /// The wave running.
    current: Vec<ResourceId>,
    /// `host: why` of each failure of the current wave.
    failures: Vec<String>,
    /// Hosts whose turn came while this rollout had not drained them yet
    /// (not started before a broker restart either): one that is found
    /// draining when it is reached was drained by an operator.
    fresh: BTreeSet<ResourceId>,
}

impl OtaRun {
    pub(super) fn new(load: OtaLoad) -> OtaRun {
        OtaRun {
            schedule: load.schedule,
            update: load.update,
            wave: load.wave,
            drain_ms: load.drain_ms,
            rows: load.rows,
            retry: load.retry,
            waves: VecDeque::new(),
            current: Vec::new(),
            failures: Vec::new(),
            fresh: BTreeSet::new(),
        }
    }

    pub(super) fn observed(&mut self, core: &mut Core) {
        match core.phase {
            Phase::Loading => self.load(core),
            Phase::Running => {
                for r in core.hosts.keys().cloned().collect::<Vec<_>>() {
                    self.advance(core, &r);
                }
            }
            Phase::Warning | Phase::Finished => {}
        }
        self.settle(core);
    }

    pub(super) fn timeout(&mut self, core: &mut Core) {
        for r in core.hosts.keys().cloned().collect::<Vec<_>>() {
            self.advance(core, &r);
        }
        self.settle(core);
    }

    /// `OTA schedule 3 (update 2: office 3.2)`.
    fn what(&self) -> String {
        format!(
            "OTA schedule {} (update {}: {} {})",
            self.schedule, self.update.id, self.update.component, self.update.version
        )
    }

    /// An `ota-step` event of `r`: `what` happened.
    fn step_event(&self, core: &mut Core, r: &ResourceId, what: &str) {
        core.event("ota-step", format!("{}: {r} {what}", self.what()));
    }

    /// The first observation: the plan (recorded, or made now), then the
    /// first wave.
    fn load(&mut self, core: &mut Core) {
        core.phase = Phase::Running;
        let rows = std::mem::take(&mut self.rows);
        if rows.is_empty() {
            if let Err(e) = &core.obs.group {
                let why = format!("no live group to update: {e}");
                return self.finish(core, Err(why));
            }
            // Every ready host joined now, and every member not joined yet
            // (a broker restart): those are waited for, not left out.
            let plan: Vec<ResourceId> = core
                .plan_hosts()
                .into_iter()
                // A drained host stays out (the rollout would undrain it: it
                // comes back by an operator's `resources undrain`, or an
                // image update that succeeds on it), unless an earlier OTA
                // of the group failed on it.
                .filter(|r| self.retry.contains(r) || !core.live(r).is_some_and(|l| l.draining))
                .collect();
            self.record_plan(core, &plan);
            for r in &plan {
                core.hosts.insert(r.clone(), Host::new(Step::Pending));
            }
            let size = usize::try_from(self.wave.max(1)).unwrap_or(usize::MAX);
            self.waves = plan.chunks(size).map(<[ResourceId]>::to_vec).collect();
        } else {
            for row in &rows {
                let mut host = Host::new(match row.state.as_str() {
                    "done" => Step::Done,
                    "skipped" => Step::Skipped,
                    _ => Step::Pending,
                });
                host.started_at = row.started_at;
                core.hosts.insert(row.resource.clone(), host);
            }
            self.waves = plan_waves(&rows, self.wave).into();
        }
    }

    fn record_plan(&self, core: &mut Core, plan: &[ResourceId]) {
        let names: Vec<&str> = plan.iter().map(|r| r.as_str()).collect();
        let message = format!(
            "{} plan: {} resource(s) in waves of {}, each drained with a {} deadline: {}",
            self.what(),
            plan.len(),
            self.wave,
            format_duration(Duration::from_millis(self.drain_ms)),
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        );
        core.record(Record::Plan(plan.to_vec()));
        core.event("ota-step", message);
    }

    /// Starts the next wave once every host of this one is over; a failure
    /// in it ends the rollout, and so does the last wave.
    fn settle(&mut self, core: &mut Core) {
        while core.phase == Phase::Running {
            if self
                .current
                .iter()
                .any(|r| !core.step(r).is_some_and(Step::is_over))
            {
                return;
            }
            if !self.failures.is_empty() {
                let why = self.failures.join("; ");
                return self.finish(core, Err(why));
            }
            let Some(wave) = self.waves.pop_front() else {
                return self.finish(core, Ok(()));
            };
            self.current = wave.clone();
            for r in &wave {
                self.start(core, r);
            }
        }
    }

    /// A host's turn: skipped if a scale-in released it, else it drains.
    fn start(&mut self, core: &mut Core, r: &ResourceId) {
        let leaving = core
            .state(r)
            .filter(|s| matches!(s, ResourceState::Releasing | ResourceState::Released));
        if let Some(state) = leaving {
            let why = format!("skipped: {state} by a scale-in before its turn");
            core.host_record(r, HostRecord::Skipped, Some(why.clone()));
            self.step_event(core, r, &why);
            core.set_step(r, Step::Skipped);
            return;
        }
        let resumed = core.hosts.get(r).and_then(|h| h.started_at);
        if resumed.is_none() {
            self.fresh.insert(r.clone());
        }
        let started = resumed.unwrap_or(core.now);
        let deadline = drain_deadline(started, self.drain_ms);
        if let Some(h) = core.hosts.get_mut(r) {
            h.started_at = Some(started);
            h.deadline = Some(deadline);
        }
        core.host_record(r, HostRecord::Draining, None);
        let what = format!(
            "draining: no new sessions; open ones end by {} at the latest",
            rfc3339_secs(deadline)
        );
        self.step_event(core, r, &what);
        let until = core.after(core.settings.gone_timeout);
        core.set_step(r, Step::Away { until });
        self.advance(core, r);
    }

    fn deadline_of(core: &Core, r: &ResourceId) -> UnixMillis {
        core.hosts
            .get(r)
            .and_then(|h| h.deadline)
            .unwrap_or(core.now)
    }

    /// Moves `r` on when what it waits for is there, or its wait is over.
    fn advance(&mut self, core: &mut Core, r: &ResourceId) {
        match core.step(r).cloned() {
            Some(Step::Away { until }) => {
                let connected = core.connected(r);
                let fresh = connected && self.fresh.remove(r);
                if fresh && !self.retry.contains(r) && core.live(r).is_some_and(|l| l.draining) {
                    // Not planned out because it was not connected when the
                    // plan was made (a broker restart): the rollout would
                    // undrain it. It comes back by an operator's `resources
                    // undrain`.
                    let why = "skipped: drained by an operator".to_owned();
                    core.host_record(r, HostRecord::Skipped, Some(why.clone()));
                    self.step_event(core, r, &why);
                    core.set_step(r, Step::Skipped);
                } else if connected {
                    core.set_step(r, Step::Draining);
                    core.command(r, Purpose::Drain, Command::Drain, COMMAND_TIMEOUT);
                } else if core.now >= until {
                    let gone = format_duration(core.settings.gone_timeout);
                    self.fail(core, r, format!("not connected within {gone}"));
                }
            }
            Some(Step::Drained) => {
                let Some(open) = core.recorded(r).cloned() else {
                    return;
                };
                if open.is_empty() {
                    core.set_step(r, Step::Emptying);
                    self.advance(core, r);
                } else {
                    let queue: VecDeque<SessionId> = open.into();
                    self.warn_next(core, r, queue, Vec::new(), Vec::new());
                }
            }
            Some(Step::Emptying) => {
                let open = core.recorded(r).cloned();
                if open.as_ref().is_some_and(Vec::is_empty)
                    || core.now >= Self::deadline_of(core, r)
                {
                    let left = open.unwrap_or_default();
                    if let Some(h) = core.hosts.get_mut(r) {
                        h.detail = (!left.is_empty()).then(|| {
                            format!(
                                "{} session(s) disconnected at the drain deadline",
                                left.len()
                            )
                        });
                    }
                    self.disconnect(core, r, left.into());
                }
            }
            Some(Step::Confirming { until, within }) => self.confirm(core, r, until, within),
            _ => {}
        }
    }

    /// Warns the first of `queue`, or says who was warned once none is left
    /// and waits for the sessions to end.
    fn warn_next(
        &mut self,
        core: &mut Core,
        r: &ResourceId,
        queue: VecDeque<SessionId>,
        warned: Vec<String>,
        not_warned: Vec<String>,
    ) {
        let deadline = Self::deadline_of(core, r);
        if let Some(session) = queue.front().cloned() {
            let command = Command::WarnSession {
                session: session.clone(),
                message: format!(
                    "This host is being updated ({} {}); please save your work: the session \
                     will be ended at {}",
                    self.update.component,
                    self.update.version,
                    rfc3339_secs(deadline)
                ),
                deadline,
            };
            core.command(r, Purpose::Warn(session), command, COMMAND_TIMEOUT);
            core.set_step(
                r,
                Step::Warning {
                    queue,
                    warned,
                    not_warned,
                },
            );
            return;
        }
        let mut what = format!(
            "warned: {} open session(s) warned ({}), ended at {} if still open",
            warned.len(),
            if warned.is_empty() {
                "-".to_owned()
            } else {
                warned.join(", ")
            },
            rfc3339_secs(deadline)
        );
        if !not_warned.is_empty() {
            what.push_str(&format!("; not warned: {}", not_warned.join("; ")));
        }
        self.step_event(core, r, &what);
        core.set_step(r, Step::Emptying);
        self.advance(core, r);
    }

    /// Ends the first of `queue`, or updates once none is left.
    fn disconnect(&mut self, core: &mut Core, r: &ResourceId, queue: VecDeque<SessionId>) {
        if let Some(session) = queue.front().cloned() {
            let command = Command::DisconnectSession {
                session: session.clone(),
                reason: format!("OTA update {}: drain deadline passed", self.update.id),
            };
            core.command(r, Purpose::Disconnect(session), command, COMMAND_TIMEOUT);
            core.set_step(r, Step::Disconnecting { queue });
            return;
        }
        let detail = core.hosts.get(r).and_then(|h| h.detail.clone());
        core.host_record(r, HostRecord::Updating, None);
        let what = format!(
            "updating to {} {}{}",
            self.update.component,
            self.update.version,
            detail.map(|d| format!(" ({d})")).unwrap_or_default()
        );
        self.step_event(core, r, &what);
        let command = Command::ApplyUpdate {
            update: self.update.id,
            component: self.update.component.clone(),
            version: self.update.version.clone(),
            package: self.update.package.clone(),
        };
        let timeout = core.settings.update_timeout;
        core.command(r, Purpose::Apply, command, timeout);
        core.set_step(r, Step::Applying);
    }

    /// Done once its inventory shows the version (or says the update
    /// failed); failed when it does not by `until`.
    fn confirm(&mut self, core: &mut Core, r: &ResourceId, until: UnixMillis, within: Duration) {
        let (component, version) = (&self.update.component, &self.update.version);
        if let Some(inv) = core.inventory(r) {
            let failed = inv
                .last_update
                .as_ref()
                .filter(|u| u.update == self.update.id)
                .and_then(|u| match &u.outcome {
                    CommandOutcome::Failed(why) => Some(why.clone()),
                    CommandOutcome::Done => None,
                });
            if let Some(why) = failed {
                return self.fail(core, r, format!("update failed: {}", brief(&why)));
            }
            if shows(inv, component, version) {
                core.command(r, Purpose::Undrain, Command::Undrain, COMMAND_TIMEOUT);
                core.set_step(
                    r,
                    Step::Settling {
                        result: Ok(String::new()),
                    },
                );
                return;
            }
        }
        if core.now < until {
            return;
        }
        let now = match core.inventory(r) {
            None => "no inventory".to_owned(),
            Some(i) => format!(
                "it runs {}",
                running(i, component).unwrap_or_else(|| "no such component".into())
            ),
        };
        let why = format!(
            "its inventory does not show {component} {version} after {} ({now})",
            format_duration(within)
        );
        self.fail(core, r, why);
    }

    pub(super) fn answered(
        &mut self,
        core: &mut Core,
        r: &ResourceId,
        purpose: Purpose,
        answer: Answer,
    ) {
        // What failed, as the agent or the registry says it.
        let failed = |what: &str, answer: &Answer| match answer {
            Answer::Done => None,
            Answer::Failed(why) => Some(format!("{what} failed: {}", brief(why))),
            Answer::Lost(e) | Answer::TimedOut(e) => Some(format!("{what}: {e}")),
        };
        match (core.step(r).cloned(), purpose) {
            (Some(Step::Draining), Purpose::Drain) => match failed("drain", &answer) {
                None => {
                    core.tell(Tell::Drained(r.clone()));
                    core.set_step(r, Step::Drained);
                    self.advance(core, r);
                }
                Some(why) => self.fail(core, r, why),
            },
            (
                Some(Step::Warning {
                    mut queue,
                    mut warned,
                    mut not_warned,
                }),
                Purpose::Warn(s),
            ) if queue.front() == Some(&s) => {
                queue.pop_front();
                // A warning that cannot be given does not hold the update
                // back: the session still has until the deadline.
                match failed("warn", &answer) {
                    None => warned.push(s.to_string()),
                    Some(why) => not_warned.push(format!("{s} ({why})")),
                }
                self.warn_next(core, r, queue, warned, not_warned);
            }
            (Some(Step::Disconnecting { mut queue }), Purpose::Disconnect(s))
                if queue.front() == Some(&s) =>
            {
                match failed(&format!("end session {s}"), &answer) {
                    None => {
                        queue.pop_front();
                        self.disconnect(core, r, queue);
                    }
                    Some(why) => self.fail(core, r, why),
                }
            }
            (Some(Step::Applying), Purpose::Apply) => {
                let within = match answer {
                    Answer::Done => core.settings.inventory_timeout,
                    Answer::Failed(why) => {
                        return self.fail(core, r, format!("update failed: {}", brief(&why)))
                    }
                    Answer::TimedOut(e) => return self.fail(core, r, format!("update: {e}")),
                    // The agent went away (an agent updating itself
                    // restarts): its reconnected inventory tells.
                    Answer::Lost(_) => core.settings.gone_timeout,
                };
                let until = core.after(within);
                core.set_step(r, Step::Confirming { until, within });
                self.advance(core, r);
            }
            (Some(Step::Settling { .. }), Purpose::Undrain) => match failed("undrain", &answer) {
                None => {
                    core.tell(Tell::Undrained(r.clone()));
                    self.done(core, r);
                }
                Some(why) => self.fail(core, r, why),
            },
            _ => {}
        }
        self.settle(core);
    }

    fn done(&mut self, core: &mut Core, r: &ResourceId) {
        let detail = core.hosts.get(r).and_then(|h| h.detail.clone());
        let what = match &detail {
            Some(d) => format!("done: updated and back in service ({d})"),
            None => "done: updated and back in service".to_owned(),
        };
        core.host_record(r, HostRecord::Done, detail);
        self.step_event(core, r, &what);
        core.set_step(r, Step::Done);
    }

    fn fail(&mut self, core: &mut Core, r: &ResourceId, why: String) {
        core.host_record(r, HostRecord::Failed, Some(why.clone()));
        self.step_event(core, r, &format!("failed: {why}; it stays drained"));
        self.failures.push(format!("{r}: {why}"));
        core.set_step(r, Step::Failed(why));
    }

    /// Ends the rollout: `succeeded`, or `failed`, with one event either
    /// way; the group's status follows ([`after_succeeded_ota`],
    /// [`after_failed_ota`]): a failure makes a `published` group
    /// `update-failed`, a success an `update-failed` group `published`.
    fn finish(&mut self, core: &mut Core, outcome: Result<(), String>) {
        let what = self.what();
        let (component, version) = (&self.update.component, &self.update.version);
        let row = core.obs.row.clone();
        let status = row.as_ref().and_then(|r| Status::parse(&r.status));
        let at = core.now;
        let (to, why) = match outcome {
            Ok(()) => {
                core.record(Record::Ended {
                    ok: true,
                    detail: None,
                    at,
                });
                let mut message =
                    format!("{what} succeeded: every resource runs {component} {version}");
                // An image update changes what the group is made of: hosts
                // created from now on (scale-out, replacements) start from
                // the new image, like after `update-image`.
                if component == "image" && row.as_ref().is_some_and(|r| &r.image != version) {
                    core.record(Record::GroupImage {
                        image: version.clone(),
                        at,
                    });
                    message.push_str(&format!("; the group's image is now {version}"));
                }
                core.event("ota-succeeded", message);
                (
                    status.and_then(after_succeeded_ota),
                    format!("{what} succeeded on every resource"),
                )
            }
            Err(why) => {
                core.record(Record::Ended {
                    ok: false,
                    detail: Some(why.clone()),
                    at,
                });
                core.event(
                    "ota-failed",
                    format!("{what} failed, the rollout stopped: {why}"),
                );
                (
                    status.and_then(after_failed_ota),
                    format!(
                        "{what} failed: {why}; the failing resource stays drained, the \
                         others serve"
                    ),
                )
            }
        };
        if let (Some(to), Some(row)) = (to, &row) {
            core.record(Record::Status {
                from: row.status.clone(),
                to,
                message: format!("{} -> {to}: {why}", row.status),
                at,
            });
        }
        if to.is_some() || component == "image" {
            core.tell(Tell::Sync);
        }
        core.phase = Phase::Finished;
    }
}
