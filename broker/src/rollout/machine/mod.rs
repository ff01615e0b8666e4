//! The rollout machine: one image update (`group update-image`) or one OTA
//! rollout of a group, host by host, without I/O.
//!
//! Like the engine ([`crate::engine::Group`]) it is a plain struct: it takes
//! inputs with the time and hands back what to do. [`Rollout::handle`] takes
//! an [`Input`] (what the group and its agents look like now, or a command's
//! answer), [`Rollout::handle_timeout`] is called at
//! [`Rollout::poll_deadline`], and [`Rollout::drain_outputs`] yields the
//! [`Output`]s in order: commands to send, [`Record`]s to write (each host's
//! step, the rollout's end, group events, the group's status and image) and
//! what to tell the group's actor. It never awaits and never reads a clock;
//! [`super::driver`] runs one per rollout and carries its outputs out, and
//! a restarted broker rebuilds it from the recorded rows.
//!
//! Every host goes through the same steps, each once the previous one is
//! done:
//!
//! 1. Its sessions are warned and get until a deadline: an OTA rollout
//!    drains the host (`Drain`), warns each open session (`WarnSession`
//!    with the host's drain deadline) and waits for them to end or the
//!    deadline; an image update warns every session of the group when it
//!    starts and switches every host at the warning's deadline.
//! 2. `DisconnectSession` for each session still open.
//! 3. The command: `SwitchImage` or `ApplyUpdate`.
//! 4. The host is done only when the command answered `Done` and its
//!    inventory shows the target (an agent that restarts itself for its own
//!    update reports it from the new process).
//! 5. OTA: `Undrain`. Image: a host an earlier update failed on is
//!    undrained, a host this one fails on is drained.
//!
//! A host whose agent is not connected waits for it and fails after
//! [`Settings::gone_timeout`]. What surrounds the hosts is each kind's: an
//! image update has one warning for the group and switches every ready
//! host at once, failing hosts drained while the others go on (the `image`
//! child); an OTA rollout updates its plan in waves, and a failure stops it
//! after its wave (the `ota` child).
//!
//! Rules of both kinds:
//! - A host is done only when it says so twice: the command answered `Done`
//!   and its inventory shows the target.
//! - No session is cut before the deadline it was warned of.
//! - Every host's step is a [`Record`] the driver commits before the next
//!   command goes out, so a restarted broker resumes from the rows without
//!   redoing a finished host; every step is also a group event
//!   (`image-step`, `ota-step`), and `group show` reads the running update's
//!   steps from the same state the update runs on.
//! - A host drained for an update is unavailable to the group's engine (the
//!   actor is told at once). Nothing else goes to the engine: a rollout adds
//!   and bills no resource.
//! - The group's status is set only when it is still the one the machine
//!   expects, so a status that does not change records no transition, and
//!   one changed meanwhile by someone else (expiry, purge) is left alone.
//!   A rollout that succeeds on every host makes an `update-failed` group
//!   `published` again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use ferry_common::wire::{Command, Inventory};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis};

use crate::engine::ResourceState;
use crate::groups::lifecycle::Status;

mod image;
mod ota;
#[cfg(test)]
mod tests;

pub use image::{HostStep, ImageLoad, ImageProgress, Recorded};
pub use ota::{drain_deadline, plan_waves, shows, OtaLoad};

/// How long a rollout waits on agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Longest wait for an agent to answer `SwitchImage` or `ApplyUpdate`:
    /// the agent's own hook timeout (30 minutes by default) and a margin, so
    /// the agent's `Failed` arrives first.
    pub update_timeout: Duration,
    /// How long a host may be unreachable (not connected at its turn, or
    /// gone during its update, e.g. an agent restarting itself) before it
    /// counts as failed.
    pub gone_timeout: Duration,
    /// How long after `Done` the agent's inventory may take to show the
    /// target (it is sent right after the answer).
    pub inventory_timeout: Duration,
    /// How long an image switch waits for the first inventory of a
    /// (re)connected agent before it decides whether the host still needs
    /// the switch.
    pub first_inventory_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            update_timeout: Duration::from_secs(35 * 60),
            gone_timeout: Duration::from_secs(10 * 60),
            inventory_timeout: Duration::from_secs(60),
            first_inventory_timeout: Duration::from_secs(10),
        }
    }
}

/// What the rollout sees of its group and its agents, taken fresh by the
/// driver every time it wakes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The group's actor's view; `Err` (why not) when it has no running actor.
    pub group: Result<GroupObs, String>,
    /// The connected agents among the hosts it follows (the registry).
    pub live: BTreeMap<ResourceId, Live>,
    /// Sessions the store records open, on the hosts
    /// [`Rollout::wants_recorded`] named.
    pub recorded: BTreeMap<ResourceId, Vec<SessionId>>,
    /// The group's row; `None` when the store has none.
    pub row: Option<GroupRow>,
    /// Whether the rollout's own row is still running (image updates: an
    /// update that replaced it ended it).
    pub running: bool,
    /// The hosts that belong to the group by the store, joined now or not:
    /// a plan covers them too, so hosts that have not reconnected yet
    /// (a broker restart) are waited for, not left on the old version.
    pub members: BTreeSet<ResourceId>,
}

/// The group's actor's view of its hosts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupObs {
    /// Every resource of its engine, in the engine's order.
    pub resources: Vec<HostView>,
    /// Hosts joined to the group (bound to a slot), connected or not.
    pub joined: BTreeSet<ResourceId>,
}

/// One resource as the group's actor has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostView {
    /// Its real id.
    pub resource: ResourceId,
    pub state: ResourceState,
    /// Its open sessions, as its agent reported them.
    pub sessions: Vec<SessionId>,
}

/// A connected agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Live {
    /// Its connection (the registry's id, which only grows).
    pub conn: u64,
    /// Reporting health on time.
    pub available: bool,
    /// It reports it takes no new sessions.
    pub draining: bool,
    /// What it runs, from its last `Inventory` on this connection.
    pub inventory: Option<Inventory>,
}

/// What a rollout reads of its group's row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRow {
    pub status: String,
    /// The image hosts created from now on start from.
    pub image: String,
}

/// What a command was for; its answer comes back with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Purpose {
    Warn(SessionId),
    Drain,
    Disconnect(SessionId),
    /// `SwitchImage` or `ApplyUpdate`.
    Apply,
    Undrain,
}

/// A command's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Done,
    /// The agent says it failed (its whole text; the rollout keeps the tail,
    /// [`crate::hook_failure::brief`]).
    Failed(String),
    /// The agent is not connected, or its connection closed first.
    Lost(String),
    /// No answer within the command's timeout.
    TimedOut(String),
}

/// What the rollout is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// The group and its agents now.
    Observed(Observation),
    /// A command's answer.
    Answered {
        host: ResourceId,
        purpose: Purpose,
        answer: Answer,
    },
}

/// A host's step as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostRecord {
    Draining,
    Updating,
    Done,
    Failed,
    Skipped,
}

impl HostRecord {
    /// As the rows have it.
    pub fn as_str(self) -> &'static str {
        match self {
            HostRecord::Draining => "draining",
            HostRecord::Updating => "updating",
            HostRecord::Done => "done",
            HostRecord::Failed => "failed",
            HostRecord::Skipped => "skipped",
        }
    }
}

/// A durable write. Consecutive records go in one transaction, committed
/// before the next command is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// These hosts are part of the rollout (`pending`), in this order.
    Plan(Vec<ResourceId>),
    /// A host's step.
    Host {
        host: ResourceId,
        step: HostRecord,
        detail: Option<String>,
        at: UnixMillis,
    },
    /// A group event.
    Event {
        kind: &'static str,
        message: String,
        at: UnixMillis,
    },
    /// The rollout is over: succeeded or failed (`detail`: why).
    Ended {
        ok: bool,
        detail: Option<String>,
        at: UnixMillis,
    },
    /// The group's image is now `image`.
    GroupImage { image: String, at: UnixMillis },
    /// The group's status goes from `from` to `to`, with a `status` event
    /// saying `message`; nothing if it is no longer `from`.
    Status {
        from: String,
        to: Status,
        message: String,
        at: UnixMillis,
    },
}

/// What the group's actor is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tell {
    /// The host's agent confirmed a drain: it takes no sessions.
    Drained(ResourceId),
    /// The host's agent confirmed an undrain: it takes sessions again, if
    /// it is healthy.
    Undrained(ResourceId),
    /// The group's row changed (status, image): reread it.
    Sync,
}

/// What the rollout asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send `command` to `host`'s agent, waiting at most `timeout`, and hand
    /// the answer back with `purpose`.
    Command {
        host: ResourceId,
        purpose: Purpose,
        command: Command,
        timeout: Duration,
    },
    Record(Record),
    Tell(Tell),
}

/// How far the rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first observation.
    Loading,
    /// Image: sessions are warned; the switch starts at the deadline.
    Warning,
    /// Hosts are being updated.
    Running,
    Finished,
}

/// Where one host is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    /// OTA: its wave has not come.
    Pending,
    /// Its agent is not connected: it goes on when it is, and fails at
    /// `until`.
    Away {
        until: UnixMillis,
    },
    /// OTA: `Drain` is out.
    Draining,
    /// OTA: drained; its recorded sessions are warned next.
    Drained,
    /// OTA: warning its sessions, one at a time (the first is out).
    Warning {
        queue: VecDeque<SessionId>,
        warned: Vec<String>,
        not_warned: Vec<String>,
    },
    /// OTA: waiting for its sessions to end, or its drain deadline.
    Emptying,
    /// Image: waiting until `until` for its connection's first inventory
    /// (is it on the target already?); then these sessions are disconnected.
    Checking {
        until: UnixMillis,
        sessions: Vec<SessionId>,
    },
    /// Disconnecting these sessions, one at a time (the first is out).
    Disconnecting {
        queue: VecDeque<SessionId>,
    },
    /// `SwitchImage` or `ApplyUpdate` is out.
    Applying,
    /// Waiting until `until` for its inventory to show the target.
    Confirming {
        until: UnixMillis,
        within: Duration,
    },
    /// Image: the drain after a failure (`Err`) or the undrain after a
    /// success (`Ok`) is out; OTA: the undrain.
    Settling {
        result: Result<String, String>,
    },
    Done,
    Failed(String),
    Skipped,
}

impl Step {
    fn is_over(&self) -> bool {
        matches!(self, Step::Done | Step::Failed(_) | Step::Skipped)
    }
}

/// One host of the rollout.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Host {
    step: Step,
    /// OTA: when it started draining (recorded: a resumed rollout keeps its
    /// deadline).
    started_at: Option<UnixMillis>,
    /// OTA: its drain deadline, once its turn came.
    deadline: Option<UnixMillis>,
    /// OTA: what its `done` step adds (sessions cut at the deadline).
    detail: Option<String>,
}

impl Host {
    fn new(step: Step) -> Host {
        Host {
            step,
            started_at: None,
            deadline: None,
            detail: None,
        }
    }

    /// When the host's step times out.
    fn deadline(&self) -> Option<UnixMillis> {
        match &self.step {
            Step::Away { until }
            | Step::Checking { until, .. }
            | Step::Confirming { until, .. } => Some(*until),
            Step::Emptying => self.deadline,
            _ => None,
        }
    }
}

/// What both kinds share: the hosts, the last observation, the outputs.
struct Core {
    settings: Settings,
    group: GroupName,
    phase: Phase,
    hosts: BTreeMap<ResourceId, Host>,
    obs: Observation,
    /// Joined, connected hosts at the last observation, with their connection.
    seen: BTreeMap<ResourceId, u64>,
    /// Hosts that joined (or joined again on a new connection) at the last
    /// observation.
    joins: Vec<ResourceId>,
    /// The latest time given (a clock stepping back is held here).
    now: UnixMillis,
    out: VecDeque<Output>,
}

impl Core {
    fn new(group: GroupName, settings: Settings) -> Core {
        Core {
            settings,
            group,
            phase: Phase::Loading,
            hosts: BTreeMap::new(),
            obs: Observation {
                group: Err("not observed yet".into()),
                live: BTreeMap::new(),
                recorded: BTreeMap::new(),
                row: None,
                running: true,
                members: BTreeSet::new(),
            },
            seen: BTreeMap::new(),
            joins: Vec::new(),
            now: UnixMillis(i64::MIN),
            out: VecDeque::new(),
        }
    }

    /// Takes a new observation and finds the hosts that joined since the last.
    fn observe(&mut self, obs: Observation) {
        let mut seen = BTreeMap::new();
        if let Ok(g) = &obs.group {
            for r in &g.joined {
                if let Some(l) = obs.live.get(r) {
                    seen.insert(r.clone(), l.conn);
                }
            }
        }
        self.joins = seen
            .iter()
            .filter(|(r, conn)| self.seen.get(*r) != Some(*conn))
            .map(|(r, _)| r.clone())
            .collect();
        self.seen = seen;
        self.obs = obs;
    }

    fn after(&self, d: Duration) -> UnixMillis {
        UnixMillis(
            self.now
                .0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    fn live(&self, r: &ResourceId) -> Option<&Live> {
        self.obs.live.get(r)
    }

    fn connected(&self, r: &ResourceId) -> bool {
        self.obs.live.contains_key(r)
    }

    fn inventory(&self, r: &ResourceId) -> Option<&Inventory> {
        self.live(r).and_then(|l| l.inventory.as_ref())
    }

    fn joined(&self, r: &ResourceId) -> bool {
        self.obs.group.as_ref().is_ok_and(|g| g.joined.contains(r))
    }

    fn view(&self, r: &ResourceId) -> Option<&HostView> {
        self.obs
            .group
            .as_ref()
            .ok()
            .and_then(|g| g.resources.iter().find(|h| &h.resource == r))
    }

    fn state(&self, r: &ResourceId) -> Option<ResourceState> {
        self.view(r).map(|h| h.state)
    }

    /// Its open sessions as the group's actor has them.
    fn sessions(&self, r: &ResourceId) -> Vec<SessionId> {
        self.view(r).map(|h| h.sessions.clone()).unwrap_or_default()
    }

    /// Its open sessions as the store records them, if observed.
    fn recorded(&self, r: &ResourceId) -> Option<&Vec<SessionId>> {
        self.obs.recorded.get(r)
    }

    /// Joined hosts the group's engine has ready, sorted.
    /// The hosts a plan covers: every ready host joined now, and every
    /// member of the group that has not joined (yet) in this broker run.
    /// A joined host that is not ready (releasing) is not one.
    fn plan_hosts(&self) -> Vec<ResourceId> {
        let mut out = self.ready_joined();
        out.extend(self.obs.members.iter().filter(|r| !self.joined(r)).cloned());
        out.sort();
        out.dedup();
        out
    }

    fn ready_joined(&self) -> Vec<ResourceId> {
        let Ok(g) = &self.obs.group else {
            return Vec::new();
        };
        let mut out: Vec<ResourceId> = g
            .resources
            .iter()
            .filter(|h| h.state == ResourceState::Ready && g.joined.contains(&h.resource))
            .map(|h| h.resource.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn step(&self, r: &ResourceId) -> Option<&Step> {
        self.hosts.get(r).map(|h| &h.step)
    }

    fn set_step(&mut self, r: &ResourceId, step: Step) {
        self.hosts
            .entry(r.clone())
            .or_insert_with(|| Host::new(Step::Pending))
            .step = step;
    }

    fn command(
        &mut self,
        host: &ResourceId,
        purpose: Purpose,
        command: Command,
        timeout: Duration,
    ) {
        self.out.push_back(Output::Command {
            host: host.clone(),
            purpose,
            command,
            timeout,
        });
    }

    fn record(&mut self, record: Record) {
        self.out.push_back(Output::Record(record));
    }

    fn event(&mut self, kind: &'static str, message: String) {
        let at = self.now;
        self.record(Record::Event { kind, message, at });
    }

    fn host_record(&mut self, host: &ResourceId, step: HostRecord, detail: Option<String>) {
        let at = self.now;
        self.record(Record::Host {
            host: host.clone(),
            step,
            detail,
            at,
        });
    }

    fn tell(&mut self, tell: Tell) {
        self.out.push_back(Output::Tell(tell));
    }

    /// The earliest deadline of a host's step.
    fn host_deadline(&self) -> Option<UnixMillis> {
        self.hosts.values().filter_map(Host::deadline).min()
    }
}

/// The rules of each kind.
enum Kind {
    Image(image::ImageRun),
    Ota(ota::OtaRun),
}

/// One rollout: see the module doc.
pub struct Rollout {
    core: Core,
    kind: Kind,
}

impl Rollout {
    /// An image update as recorded ([`ImageLoad`]).
    pub fn image(load: ImageLoad, settings: Settings) -> Rollout {
        Rollout {
            core: Core::new(load.group.clone(), settings),
            kind: Kind::Image(image::ImageRun::new(load)),
        }
    }

    /// An OTA rollout as recorded ([`OtaLoad`]).
    pub fn ota(load: OtaLoad, settings: Settings) -> Rollout {
        Rollout {
            core: Core::new(load.group.clone(), settings),
            kind: Kind::Ota(ota::OtaRun::new(load)),
        }
    }

    fn now(&mut self, now: UnixMillis) {
        self.core.now = self.core.now.max(now);
    }

    /// Feeds one input. Nothing starts before the first observation.
    pub fn handle(&mut self, now: UnixMillis, input: Input) {
        self.now(now);
        let core = &mut self.core;
        match input {
            Input::Observed(obs) => {
                core.observe(obs);
                match &mut self.kind {
                    Kind::Image(run) => run.observed(core),
                    Kind::Ota(run) => run.observed(core),
                }
            }
            Input::Answered {
                host,
                purpose,
                answer,
            } => {
                if matches!(core.phase, Phase::Loading | Phase::Finished) {
                    return;
                }
                match &mut self.kind {
                    Kind::Image(run) => run.answered(core, &host, purpose, answer),
                    Kind::Ota(run) => run.answered(core, &host, purpose, answer),
                }
            }
        }
    }

    /// Handles the deadlines due at `now`.
    pub fn handle_timeout(&mut self, now: UnixMillis) {
        self.now(now);
        let core = &mut self.core;
        if matches!(core.phase, Phase::Loading | Phase::Finished) {
            return;
        }
        match &mut self.kind {
            Kind::Image(run) => run.timeout(core),
            Kind::Ota(run) => run.timeout(core),
        }
    }

    /// When [`Rollout::handle_timeout`] is due next.
    pub fn poll_deadline(&self) -> Option<UnixMillis> {
        match self.core.phase {
            Phase::Loading | Phase::Finished => None,
            Phase::Warning => match &self.kind {
                Kind::Image(run) => Some(run.disconnect_at()),
                Kind::Ota(_) => None,
            },
            Phase::Running => self.core.host_deadline(),
        }
    }

    /// What to do, in order.
    pub fn drain_outputs(&mut self) -> std::collections::vec_deque::Drain<'_, Output> {
        self.core.out.drain(..)
    }

    /// Over: succeeded, failed or stopped; nothing more will come.
    pub fn is_finished(&self) -> bool {
        self.core.phase == Phase::Finished
    }

    /// The hosts whose recorded open sessions the next observation should
    /// carry.
    pub fn wants_recorded(&self) -> Vec<ResourceId> {
        match self.kind {
            Kind::Image(_) => Vec::new(),
            Kind::Ota(_) => self
                .core
                .hosts
                .iter()
                .filter(|(_, h)| {
                    matches!(
                        h.step,
                        Step::Draining | Step::Drained | Step::Warning { .. } | Step::Emptying
                    )
                })
                .map(|(r, _)| r.clone())
                .collect(),
        }
    }

    /// The hosts of the rollout so far.
    pub fn hosts(&self) -> impl Iterator<Item = &ResourceId> {
        self.core.hosts.keys()
    }

    /// The group it updates.
    pub fn group(&self) -> &GroupName {
        &self.core.group
    }

    /// A running image update as `group show` has it (`None` for an OTA
    /// rollout, whose rows say where it is, and once it is over).
    pub fn progress(&self) -> Option<ImageProgress> {
        match &self.kind {
            Kind::Image(run) => run.progress(&self.core),
            Kind::Ota(_) => None,
        }
    }
}
