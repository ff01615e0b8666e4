//! An image update (`group update-image`, SPEC section 9): every ready host
//! of the group switches to another image.
//!
//! - Warning: every open session of the group is warned once
//!   (`WarnSession`, deadline = the update's start + its warning, 5 minutes
//!   unless `ferryctl group update-image --warning` says otherwise): those the
//!   group's actor has on its hosts when the update starts, and those the
//!   store recorded on hosts whose agents have not joined yet (a broker
//!   restart) when they join, with the same deadline. Each warning's outcome
//!   is a group event.
//! - At the deadline the switch starts: the set of hosts (joined and ready,
//!   and the group's members from the store that have not joined yet, e.g.
//!   after a broker restart; one that joins during the switch, e.g. an
//!   elastic host whose creation completes, is added) is recorded `pending`, then every connected one
//!   is switched at once: a host whose first inventory already shows the
//!   image is done without a switch, the others have their open sessions
//!   disconnected, get `SwitchImage`, and are done when their inventory
//!   shows the image. A host whose agent is not connected (or whose
//!   connection drops mid-way) is switched when it joins again; one still
//!   away [`super::Settings::gone_timeout`] (10 minutes) after the switch
//!   began fails, unless a scale-in released it meanwhile.
//! - A host the switch failed on is drained: an `update-failed` group still
//!   takes sessions, on the hosts that did not fail. One an earlier update
//!   failed on is undrained once it switched. Hosts that switched keep the
//!   new image when others fail.
//! - Every host's outcome is recorded with an event (`image-step`, then
//!   `image-switched` or `image-switch-failed`). When every host is done,
//!   the group's stored image is the new one and it is `published`; with any
//!   failure the stored image stays and the group is `update-failed`, naming
//!   each failing host and why.
//! - Resumed from the rows: during the warning it warns again (same
//!   deadline); during the switch, done and failed hosts keep their outcome
//!   and the others are switched.
//! - The group leaving `updating` by other means (expiry, purge) stops it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ferry_common::wire::Command;
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis};

use super::{Answer, Core, Host, HostRecord, Phase, Purpose, Record, Step, Tell};
use crate::engine::ResourceState;
use crate::groups::lifecycle::Status;
use crate::hook_failure::brief;
use crate::registry::COMMAND_TIMEOUT;
use crate::render::rfc3339_secs;

/// A host's outcome as recorded once the switch began.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    Pending,
    Done,
    Failed(String),
}

/// An image update as the store has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageLoad {
    pub id: i64,
    pub group: GroupName,
    pub image: String,
    /// When the operator asked for it.
    pub started_at: UnixMillis,
    /// When warned sessions are disconnected and the switch starts.
    pub disconnect_at: UnixMillis,
    /// Each host's outcome once the switch began (empty before).
    pub results: Vec<(ResourceId, Recorded)>,
    /// Hosts the group's previous update failed on (and drained): a
    /// successful switch undrains them.
    pub previously_failed: BTreeSet<ResourceId>,
    /// Sessions the store has open on the group's hosts.
    pub open: BTreeMap<ResourceId, BTreeSet<SessionId>>,
}

/// A running image update as `group show` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageProgress {
    pub id: i64,
    pub image: String,
    pub started_at: UnixMillis,
    /// When warned sessions are disconnected and the switch starts.
    pub disconnect_at: UnixMillis,
    /// Past the deadline: hosts are being switched.
    pub switching: bool,
    /// Each host, sorted.
    pub hosts: Vec<HostStep>,
}

/// One host of a running image update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostStep {
    pub resource: ResourceId,
    /// `waiting`, `warned`, `switching`, `done` or `failed`.
    pub step: &'static str,
    /// When the step ends at the latest (the warning deadline; for a host
    /// away during the switch, when it fails).
    pub until: Option<UnixMillis>,
    pub detail: Option<String>,
}

/// How a host's switch ended.
enum Outcome {
    Done(String),
    Failed(String),
    /// Its agent went away: switched again when it is back.
    Lost(String),
}

/// The image update's own state.
pub(super) struct ImageRun {
    id: i64,
    image: String,
    started_at: UnixMillis,
    disconnect_at: UnixMillis,
    /// The recorded outcomes, until the first observation.
    results: Vec<(ResourceId, Recorded)>,
    previously_failed: BTreeSet<ResourceId>,
    /// The recorded open sessions, until the first observation.
    open: BTreeMap<ResourceId, BTreeSet<SessionId>>,
    /// Sessions warned (by this run: a resumed update warns again).
    warned: BTreeSet<SessionId>,
    /// Recorded open sessions on hosts whose agents have not joined yet:
    /// warned when they do, before the deadline.
    unwarned: BTreeMap<ResourceId, BTreeSet<SessionId>>,
    /// Past the deadline: the set is known and hosts are switched.
    switching: bool,
    /// When hosts still away fail.
    wait_until: UnixMillis,
}

impl ImageRun {
    pub(super) fn new(load: ImageLoad) -> ImageRun {
        ImageRun {
            id: load.id,
            image: load.image,
            started_at: load.started_at,
            disconnect_at: load.disconnect_at,
            results: load.results,
            previously_failed: load.previously_failed,
            open: load.open,
            warned: BTreeSet::new(),
            unwarned: BTreeMap::new(),
            switching: false,
            wait_until: load.disconnect_at,
        }
    }

    pub(super) fn disconnect_at(&self) -> UnixMillis {
        self.disconnect_at
    }

    pub(super) fn observed(&mut self, core: &mut Core) {
        if core.phase == Phase::Finished || self.stopped(core) {
            return;
        }
        match core.phase {
            Phase::Loading => self.load(core),
            Phase::Warning => self.warning_joins(core),
            Phase::Running => {
                self.switch_joins(core);
                for r in self.in_flight(core) {
                    self.advance(core, &r);
                }
            }
            Phase::Finished => {}
        }
        self.check_finish(core);
    }

    pub(super) fn timeout(&mut self, core: &mut Core) {
        match core.phase {
            Phase::Warning if core.now >= self.disconnect_at => self.start_switch(core),
            Phase::Running => {
                if core.now >= self.wait_until {
                    self.fail_away(core);
                }
                for r in self.in_flight(core) {
                    self.advance(core, &r);
                }
            }
            _ => {}
        }
        self.check_finish(core);
    }

    /// The group left `updating` by other means (expiry, purge), or a newer
    /// update ended this one: it is over, unfinished.
    fn stopped(&mut self, core: &mut Core) -> bool {
        let status = match &core.obs.row {
            Some(row) if core.obs.running => row.status.clone(),
            _ => {
                core.phase = Phase::Finished;
                return true;
            }
        };
        if status == Status::Updating.as_str() {
            return false;
        }
        let at = core.now;
        core.record(Record::Ended {
            ok: false,
            detail: None,
            at,
        });
        core.event(
            "image-update",
            format!(
                "image update to {} stopped: the group is {status}",
                self.image
            ),
        );
        core.phase = Phase::Finished;
        true
    }

    /// The first observation: resume the switch, or warn.
    fn load(&mut self, core: &mut Core) {
        self.wait_until = core.after(core.settings.gone_timeout);
        let results = std::mem::take(&mut self.results);
        if results.is_empty() {
            core.phase = Phase::Warning;
            if core.now < self.disconnect_at {
                self.warn_all(core);
            }
            return;
        }
        self.switching = true;
        core.phase = Phase::Running;
        for (r, recorded) in results {
            let step = match recorded {
                Recorded::Done => Step::Done,
                Recorded::Failed(why) => Step::Failed(why),
                Recorded::Pending => Step::Away {
                    until: self.wait_until,
                },
            };
            core.hosts.insert(r, Host::new(step));
        }
        core.event(
            "image-update",
            format!(
                "image update to {} resumed: switching the resources not done yet",
                self.image
            ),
        );
        self.launch_ready(core);
    }

    /// Warns every open session of the group: those on hosts joined now,
    /// and those recorded on hosts whose agents have not joined yet when
    /// they join ([`ImageRun::warning_joins`]).
    fn warn_all(&mut self, core: &mut Core) {
        let known: Vec<(ResourceId, SessionId)> = match &core.obs.group {
            Ok(g) => g
                .resources
                .iter()
                .flat_map(|h| h.sessions.iter().map(|s| (h.resource.clone(), s.clone())))
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut recorded = std::mem::take(&mut self.open);
        for (real, session) in &known {
            if let Some(set) = recorded.get_mut(real) {
                set.remove(session);
            }
        }
        // Hosts joined now have told the actor their sessions (their
        // `Hello`): what the store still has open there is stale.
        recorded.retain(|r, set| !set.is_empty() && !core.joined(r));
        let later: usize = recorded.values().map(BTreeSet::len).sum();
        let left = self.disconnect_at.0.saturating_sub(core.now.0).max(0);
        let message = format!(
            "warning {} open session(s): they are disconnected in {} ({}) for the switch to \
             image {}{}",
            known.len() + later,
            crate::render::time_left(left),
            rfc3339_secs(self.disconnect_at),
            self.image,
            if later == 0 {
                String::new()
            } else {
                format!(
                    "; {later} of them on host(s) whose agents are not connected yet ({}): \
                     warned when they are back",
                    recorded
                        .keys()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        core.event("image-update", message);
        self.unwarned = recorded;
        self.warn(core, known);
    }

    /// Sends `WarnSession` for each of `sessions` not warned yet.
    fn warn(&mut self, core: &mut Core, sessions: Vec<(ResourceId, SessionId)>) {
        for (real, session) in sessions {
            if !self.warned.insert(session.clone()) {
                continue;
            }
            let command = Command::WarnSession {
                session: session.clone(),
                message: format!(
                    "group {} switches to image {}: this session will be disconnected",
                    core.group, self.image
                ),
                deadline: self.disconnect_at,
            };
            core.command(&real, Purpose::Warn(session), command, COMMAND_TIMEOUT);
        }
    }

    /// Hosts that joined during the warning: their open sessions (as their
    /// `Hello` listed them) are warned now, with the others' deadline.
    fn warning_joins(&mut self, core: &mut Core) {
        for r in core.joins.clone() {
            self.unwarned.remove(&r);
            let open: Vec<(ResourceId, SessionId)> = core
                .sessions(&r)
                .into_iter()
                .filter(|s| !self.warned.contains(s))
                .map(|s| (r.clone(), s))
                .collect();
            if !open.is_empty() && core.now < self.disconnect_at {
                core.event(
                    "image-step",
                    format!(
                        "{r} joined during the warning: warning its {} open session(s) of the \
                         switch at {}",
                        open.len(),
                        rfc3339_secs(self.disconnect_at)
                    ),
                );
                self.warn(core, open);
            }
        }
    }

    /// The warning is over: every ready host joined to the group, and every
    /// member not joined yet, is switched (the away ones when they are back,
    /// failed if they stay away); the set is recorded first.
    fn start_switch(&mut self, core: &mut Core) {
        let targets = core.plan_hosts();
        self.switching = true;
        core.phase = Phase::Running;
        self.wait_until = core.after(core.settings.gone_timeout);
        for r in &targets {
            core.hosts.insert(
                r.clone(),
                Host::new(Step::Away {
                    until: self.wait_until,
                }),
            );
        }
        core.record(Record::Plan(targets.clone()));
        let names: Vec<&str> = targets.iter().map(|r| r.as_str()).collect();
        core.event(
            "image-update",
            format!(
                "switching {} resource(s) to image {}: {}",
                targets.len(),
                self.image,
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ),
        );
        let until = rfc3339_secs(self.wait_until);
        for r in &targets {
            if core.connected(r) {
                self.launch(core, r);
            } else {
                core.event(
                    "image-step",
                    format!(
                        "{r} waiting: its agent is not connected; switched when it is back, \
                         failed if still away at {until}"
                    ),
                );
            }
        }
    }

    /// Hosts that joined during the switch: one of the set that was away is
    /// switched now; one new to the group is added to it.
    fn switch_joins(&mut self, core: &mut Core) {
        for r in core.joins.clone() {
            if !core.hosts.contains_key(&r) {
                core.hosts.insert(
                    r.clone(),
                    Host::new(Step::Away {
                        until: self.wait_until,
                    }),
                );
                core.record(Record::Plan(vec![r]));
            }
        }
        self.launch_ready(core);
    }

    /// Switches every waiting host whose agent is joined and connected.
    fn launch_ready(&mut self, core: &mut Core) {
        let ready: Vec<ResourceId> = core
            .hosts
            .iter()
            .filter(|(r, h)| {
                matches!(h.step, Step::Away { .. }) && core.connected(r) && core.joined(r)
            })
            .map(|(r, _)| r.clone())
            .collect();
        for r in ready {
            self.launch(core, &r);
        }
    }

    /// Hosts being switched.
    fn in_flight(&self, core: &Core) -> Vec<ResourceId> {
        core.hosts
            .iter()
            .filter(|(_, h)| !h.step.is_over() && !matches!(h.step, Step::Away { .. }))
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Starts switching `r`: the sessions its agent has now are
    /// disconnected once its first inventory says it needs the switch.
    fn launch(&mut self, core: &mut Core, r: &ResourceId) {
        let sessions = core.sessions(r);
        core.event(
            "image-step",
            format!(
                "{r} switching to image {}{}",
                self.image,
                if sessions.is_empty() {
                    String::new()
                } else {
                    format!(
                        " after disconnecting {} open session(s): {}",
                        sessions.len(),
                        sessions
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            ),
        );
        let until = core.after(core.settings.first_inventory_timeout);
        core.set_step(r, Step::Checking { until, sessions });
        self.advance(core, r);
    }

    /// Moves `r` on when what it waits for is there, or its wait is over.
    fn advance(&mut self, core: &mut Core, r: &ResourceId) {
        let shows = core.inventory(r).map(|i| i.image_version == self.image);
        match core.step(r).cloned() {
            // A host that switched already (a resumed update, a re-joined
            // agent) is not switched again.
            Some(Step::Checking { until, sessions }) => match shows {
                Some(true) => {
                    let what = format!("{r} already runs image {}", self.image);
                    self.switched(core, r, Ok(what));
                }
                Some(false) => self.disconnect(core, r, sessions.into()),
                None if core.now >= until => self.disconnect(core, r, sessions.into()),
                None => {}
            },
            Some(Step::Confirming { until, within }) => {
                if shows == Some(true) {
                    let what = format!("{r} runs image {}", self.image);
                    self.switched(core, r, Ok(what));
                } else if core.now >= until {
                    if core.connected(r) {
                        let why = format!(
                            "the agent answered the switch but its inventory did not show \
                             image {} within {} s",
                            self.image,
                            within.as_secs()
                        );
                        self.switched(core, r, Err(why));
                    } else {
                        let why = "its agent went away before it reported the new image";
                        self.outcome(core, r, Outcome::Lost(why.into()));
                    }
                }
            }
            _ => {}
        }
    }

    /// Disconnects the first of `queue`, or switches the image once none is left.
    fn disconnect(&mut self, core: &mut Core, r: &ResourceId, queue: VecDeque<SessionId>) {
        match queue.front().cloned() {
            Some(session) => {
                let command = Command::DisconnectSession {
                    session: session.clone(),
                    reason: format!("group {} switches to image {}", core.group, self.image),
                };
                core.command(r, Purpose::Disconnect(session), command, COMMAND_TIMEOUT);
                core.set_step(r, Step::Disconnecting { queue });
            }
            None => {
                let command = Command::SwitchImage {
                    image: self.image.clone(),
                };
                let timeout = core.settings.update_timeout;
                core.command(r, Purpose::Apply, command, timeout);
                core.set_step(r, Step::Applying);
            }
        }
    }

    pub(super) fn answered(
        &mut self,
        core: &mut Core,
        r: &ResourceId,
        purpose: Purpose,
        answer: Answer,
    ) {
        match (core.step(r).cloned(), purpose) {
            (_, Purpose::Warn(session)) => self.warn_answered(core, r, &session, answer),
            (Some(Step::Disconnecting { mut queue }), Purpose::Disconnect(s))
                if queue.front() == Some(&s) =>
            {
                match answer {
                    Answer::Done => {
                        queue.pop_front();
                        self.disconnect(core, r, queue);
                    }
                    Answer::Failed(why) => {
                        let why = format!(
                            "session {s} could not be disconnected: the agent says: {}",
                            brief(&why)
                        );
                        self.switched(core, r, Err(why));
                    }
                    Answer::Lost(e) => {
                        let why = format!("disconnect of session {s}: {e}");
                        self.outcome(core, r, Outcome::Lost(why));
                    }
                    Answer::TimedOut(e) => {
                        self.switched(core, r, Err(format!("disconnect of session {s}: {e}")))
                    }
                }
            }
            (Some(Step::Applying), Purpose::Apply) => match answer {
                Answer::Done => {
                    let within = core.settings.inventory_timeout;
                    let until = core.after(within);
                    core.set_step(r, Step::Confirming { until, within });
                    self.advance(core, r);
                }
                Answer::Failed(why) => {
                    let why = format!("the image switch failed: the agent says: {}", brief(&why));
                    self.switched(core, r, Err(why));
                }
                Answer::Lost(e) => {
                    self.outcome(core, r, Outcome::Lost(format!("image switch: {e}")))
                }
                Answer::TimedOut(e) => self.switched(core, r, Err(format!("image switch: {e}"))),
            },
            (Some(Step::Settling { result }), purpose @ (Purpose::Drain | Purpose::Undrain))
                if result.is_err() == (purpose == Purpose::Drain) =>
            {
                self.settled(core, r, result, answer)
            }
            _ => {}
        }
        self.check_finish(core);
    }

    /// A warning's outcome, as a group event.
    fn warn_answered(&mut self, core: &mut Core, r: &ResourceId, s: &SessionId, answer: Answer) {
        let (kind, message) = match answer {
            Answer::Done => (
                "session-warned",
                format!(
                    "session {s} on {r} warned of the image switch at {}",
                    rfc3339_secs(self.disconnect_at)
                ),
            ),
            Answer::Failed(m) => (
                "warn-failed",
                format!(
                    "session {s} on {r} not warned: the agent says: {}",
                    brief(&m)
                ),
            ),
            Answer::Lost(e) | Answer::TimedOut(e) => {
                ("warn-failed", format!("session {s} on {r} not warned: {e}"))
            }
        };
        core.event(kind, message);
    }

    /// The switch of `r` succeeded or failed. A host it failed on is
    /// drained (the group serves from the others, `update-failed`); one a
    /// previous update failed on (and drained) takes sessions again.
    fn switched(&mut self, core: &mut Core, r: &ResourceId, result: Result<String, String>) {
        let command = match &result {
            Err(_) => Command::Drain,
            Ok(_) if self.previously_failed.contains(r) => Command::Undrain,
            Ok(what) => {
                let what = what.clone();
                return self.outcome(core, r, Outcome::Done(what));
            }
        };
        let purpose = if command == Command::Drain {
            Purpose::Drain
        } else {
            Purpose::Undrain
        };
        core.command(r, purpose, command, COMMAND_TIMEOUT);
        core.set_step(r, Step::Settling { result });
    }

    /// The drain (after a failure) or undrain (after a success) was
    /// answered; the agent's confirmation reaches the group's engine.
    fn settled(
        &mut self,
        core: &mut Core,
        r: &ResourceId,
        result: Result<String, String>,
        answer: Answer,
    ) {
        let draining = result.is_err();
        let verb = if draining { "drained" } else { "undrained" };
        let said = match answer {
            Answer::Done => {
                core.tell(if draining {
                    Tell::Drained(r.clone())
                } else {
                    Tell::Undrained(r.clone())
                });
                if draining {
                    "it was drained: it takes no new sessions until an image update switches \
                     it (or `ferryctl resources undrain`)"
                        .to_owned()
                } else {
                    "it was undrained: it takes sessions again".to_owned()
                }
            }
            Answer::Failed(why) => format!("it could not be {verb}: {}", brief(&why)),
            Answer::Lost(e) | Answer::TimedOut(e) => format!("it could not be {verb}: {e}"),
        };
        let outcome = match result {
            Ok(what) => Outcome::Done(format!("{what}; {said}")),
            Err(why) => Outcome::Failed(format!("{why}; {said}")),
        };
        self.outcome(core, r, outcome);
    }

    /// Records a host's outcome with its event; a host whose agent went
    /// away waits for it again (and goes on at once if it is back already).
    fn outcome(&mut self, core: &mut Core, r: &ResourceId, outcome: Outcome) {
        match outcome {
            Outcome::Done(detail) => {
                core.set_step(r, Step::Done);
                core.host_record(r, HostRecord::Done, Some(detail.clone()));
                core.event("image-switched", detail);
            }
            Outcome::Failed(why) => {
                core.set_step(r, Step::Failed(why.clone()));
                core.host_record(r, HostRecord::Failed, Some(why.clone()));
                core.event(
                    "image-switch-failed",
                    format!("{r} did not switch to image {}: {why}", self.image),
                );
            }
            Outcome::Lost(why) => {
                core.set_step(
                    r,
                    Step::Away {
                        until: self.wait_until,
                    },
                );
                core.event(
                    "image-switch-interrupted",
                    format!("{r}: {why}; it is switched when its agent is back"),
                );
                if core.connected(r) && core.joined(r) {
                    self.launch(core, r);
                }
            }
        }
    }

    /// Hosts still away at the end of the wait fail; one a scale-in
    /// released meanwhile is left out.
    fn fail_away(&mut self, core: &mut Core) {
        let away: Vec<ResourceId> = core
            .hosts
            .iter()
            .filter(|(_, h)| matches!(h.step, Step::Away { .. }))
            .map(|(r, _)| r.clone())
            .collect();
        for r in away {
            // One not joined since a broker restart is still the group's: it fails.
            if core.joined(&r) && core.state(&r) != Some(ResourceState::Ready) {
                core.hosts.remove(&r);
                core.event(
                    "image-update",
                    format!("{r} left the group during the image update: not switched"),
                );
                continue;
            }
            let why = format!(
                "not connected within {} s of the switch's start",
                core.settings.gone_timeout.as_secs()
            );
            self.outcome(core, &r, Outcome::Failed(why));
        }
    }

    /// Ends the update once every host is done or failed: the group's image
    /// and status follow.
    fn check_finish(&mut self, core: &mut Core) {
        if core.phase != Phase::Running
            || !self.switching
            || core.hosts.values().any(|h| !h.step.is_over())
        {
            return;
        }
        let failed: Vec<String> = core
            .hosts
            .iter()
            .filter_map(|(r, h)| match &h.step {
                Step::Failed(why) => Some(format!("{r} ({why})")),
                _ => None,
            })
            .collect();
        let ok = failed.is_empty();
        let done = core.hosts.len() - failed.len();
        let image = &self.image;
        let (to, message) = if ok {
            (
                Status::Published,
                format!("updating -> published: every resource ({done}) runs image {image}"),
            )
        } else {
            (
                Status::UpdateFailed,
                format!(
                    "updating -> update-failed: image {image} failed on {} of {} resource(s): \
                     {}; the {done} that switched keep image {image}",
                    failed.len(),
                    core.hosts.len(),
                    failed.join("; ")
                ),
            )
        };
        let at = core.now;
        core.record(Record::Ended {
            ok,
            detail: None,
            at,
        });
        if ok {
            core.record(Record::GroupImage {
                image: image.clone(),
                at,
            });
        }
        core.record(Record::Status {
            from: Status::Updating.as_str().to_owned(),
            to,
            message,
            at,
        });
        core.tell(Tell::Sync);
        core.phase = Phase::Finished;
    }

    /// Each host's step and until when: during the warning, the ready hosts
    /// joined to the group (`warned` with its sessions, or `waiting` for the
    /// switch) and those with recorded sessions whose agents are not back
    /// yet; during the switch, the switch's set.
    pub(super) fn progress(&self, core: &Core) -> Option<ImageProgress> {
        if matches!(core.phase, Phase::Loading | Phase::Finished) {
            return None;
        }
        let hosts = if self.switching {
            self.switch_progress(core)
        } else {
            self.warning_progress(core)
        };
        Some(ImageProgress {
            id: self.id,
            image: self.image.clone(),
            started_at: self.started_at,
            disconnect_at: self.disconnect_at,
            switching: self.switching,
            hosts,
        })
    }

    fn switch_progress(&self, core: &Core) -> Vec<HostStep> {
        core.hosts
            .iter()
            .map(|(r, h)| {
                let (step, until, detail) = match &h.step {
                    Step::Away { .. } => (
                        "waiting",
                        Some(self.wait_until),
                        Some("not connected: switched when its agent is back".to_owned()),
                    ),
                    Step::Done | Step::Skipped => ("done", None, None),
                    Step::Failed(why) => ("failed", None, Some(why.clone())),
                    _ => ("switching", None, None),
                };
                HostStep {
                    resource: r.clone(),
                    step,
                    until,
                    detail,
                }
            })
            .collect()
    }

    fn warning_progress(&self, core: &Core) -> Vec<HostStep> {
        let mut by: BTreeMap<ResourceId, HostStep> = BTreeMap::new();
        for real in core.ready_joined() {
            let sessions = core.sessions(&real);
            let warned = sessions.iter().filter(|s| self.warned.contains(*s)).count();
            let (step, detail) = if sessions.is_empty() {
                (
                    "waiting",
                    "no open session; switched at the deadline".to_owned(),
                )
            } else {
                (
                    "warned",
                    format!(
                        "{warned} of {} open session(s) warned; disconnected at the deadline",
                        sessions.len()
                    ),
                )
            };
            by.insert(
                real.clone(),
                HostStep {
                    resource: real,
                    step,
                    until: Some(self.disconnect_at),
                    detail: Some(detail),
                },
            );
        }
        for (real, sessions) in &self.unwarned {
            by.entry(real.clone()).or_insert_with(|| HostStep {
                resource: real.clone(),
                step: "waiting",
                until: Some(self.disconnect_at),
                detail: Some(format!(
                    "not connected: its {} open session(s) are warned when its agent is back",
                    sessions.len()
                )),
            });
        }
        by.into_values().collect()
    }
}
