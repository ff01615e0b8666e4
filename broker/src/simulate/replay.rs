//! Drives the engine through a scenario on a virtual clock.
//!
//! The replay stops at the scenario's `end` (events after it are refused
//! when the file is checked, [`super::scenario`]). A deadline that decides
//! nothing visible still gets a timeline row when it explains a
//! non-decision ("no scale-in of e2 because ..."), with the period that
//! holds or comes next when the policy has periods.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use ferry_common::{ResourceId, UnixMillis};

use crate::engine::billing::{self, Bill};
use crate::engine::{Action, Class, Decision, EngineError, Group, Input, Resource, Snapshot};

use super::scenario::{Event, EventKind, Provider, Scenario};
use super::SimError;

/// Something shown in a row of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Happening {
    /// A scenario event.
    Event(EventKind),
    /// An engine decision.
    Decision(Decision),
    /// Why nothing was decided where an operator might expect something: a
    /// request that waits, or a deadline that did not lead to a scale-in.
    Note(String),
}

/// Everything that happened at one instant, and the state after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The instant.
    pub at: UnixMillis,
    /// Events and decisions in the order they happened.
    pub happenings: Vec<Happening>,
    /// Counts after the instant.
    pub snapshot: Snapshot,
}

/// The result of a replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Every decision, in order.
    pub decisions: Vec<Decision>,
    /// Every resource at the end, in creation order.
    pub resources: Vec<Resource>,
    /// One row per instant at which something happened.
    pub rows: Vec<Row>,
    /// Billed seconds of the period (start to end).
    pub period_seconds: u64,
    /// The bill.
    pub bill: Bill,
}

/// Work handed to the provider and not yet complete.
struct ProviderQueue {
    /// How work completes.
    mode: Provider,
    /// `delays` mode: completions by (due time, order asked).
    due: BTreeMap<(i64, u64), Input>,
    /// Order counter for `due`.
    seq: u64,
    /// `explicit` mode: creations in the order asked.
    creating: VecDeque<ResourceId>,
    /// `explicit` mode: releases in the order asked.
    releasing: VecDeque<ResourceId>,
}

impl ProviderQueue {
    /// Hands the provider the work a decision asks for.
    fn ask(&mut self, at: i64, action: &Action) {
        let (ids, create) = match action {
            Action::ScaleOut { resources } => (resources.as_slice(), true),
            Action::ScaleIn { resource } => (std::slice::from_ref(resource), false),
            _ => return,
        };
        for id in ids.iter().cloned() {
            match self.mode {
                Provider::Explicit if create => self.creating.push_back(id),
                Provider::Explicit => self.releasing.push_back(id),
                Provider::Delays {
                    create_ms,
                    release_ms,
                } => {
                    let (when, input) = if create {
                        (
                            at.saturating_add(create_ms),
                            Input::Created { resource: id },
                        )
                    } else {
                        (
                            at.saturating_add(release_ms),
                            Input::Released { resource: id },
                        )
                    };
                    self.due.insert((when, self.seq), input);
                    self.seq += 1;
                }
            }
        }
    }

    fn next_due(&self) -> Option<i64> {
        self.due.first_key_value().map(|(&(t, _), _)| t)
    }

    fn take_due(&mut self, now: i64) -> Vec<Input> {
        let mut out = Vec::new();
        while let Some(entry) = self.due.first_entry() {
            if entry.key().0 > now {
                break;
            }
            out.push(entry.remove());
        }
        out
    }
}

fn engine_error(path: &Path, line: usize, what: &str, e: EngineError) -> SimError {
    SimError::Replay {
        file: path.to_owned(),
        line,
        message: format!("{what}: {e}"),
    }
}

/// Replays `sc` (read from `path`, named in errors) and bills it.
pub fn replay(path: &Path, sc: &Scenario) -> Result<Outcome, SimError> {
    let mut run = Replay::new(path, sc)?;
    while let Some(instant) = run.next_instant() {
        run.step(instant)?;
    }
    Ok(run.finish())
}

/// What is due at the next instant of a replay.
#[derive(Clone, Copy)]
struct Instant {
    /// The instant.
    t: i64,
    /// Provider work completes at `t`.
    completions: bool,
    /// The group's deadline is `t`.
    deadline: bool,
}

/// A replay in progress: the group, the provider's pending work, and what
/// has been recorded so far.
struct Replay<'a> {
    /// The scenario file, named in errors.
    path: &'a Path,
    sc: &'a Scenario,
    group: Group,
    provider: ProviderQueue,
    decisions: Vec<Decision>,
    rows: Vec<Row>,
    /// Index of the next scenario event.
    next: usize,
}

impl<'a> Replay<'a> {
    fn new(path: &'a Path, sc: &'a Scenario) -> Result<Self, SimError> {
        let group = Group::with_base_count(
            sc.policy.clone(),
            sc.spec.as_deref(),
            sc.base_resources,
            sc.start,
        )
        .map_err(|e| engine_error(path, 1, "set up the group", e))?;
        let provider = ProviderQueue {
            mode: sc.provider,
            due: BTreeMap::new(),
            seq: 0,
            creating: VecDeque::new(),
            releasing: VecDeque::new(),
        };
        Ok(Self {
            path,
            sc,
            group,
            provider,
            decisions: Vec::new(),
            rows: Vec::new(),
            next: 0,
        })
    }

    /// The earliest of the next event, provider completion and group
    /// deadline, unless there is none or it falls after the scenario's end.
    fn next_instant(&self) -> Option<Instant> {
        let t_event = self.sc.events.get(self.next).map(|e| e.at.0);
        let t_done = self.provider.next_due();
        let t_deadline = self.group.poll_deadline().map(|t| t.0);
        let t = [t_event, t_done, t_deadline].into_iter().flatten().min()?;
        if t > self.sc.end.0 {
            return None;
        }
        Some(Instant {
            t,
            completions: t_done == Some(t),
            deadline: t_deadline == Some(t),
        })
    }

    /// Runs everything due at one instant and records its row.
    fn step(&mut self, instant: Instant) -> Result<(), SimError> {
        let sc = self.sc;
        let now = UnixMillis(instant.t);
        let mut happened = Vec::new();
        if instant.completions || instant.deadline {
            self.complete_due(now, instant.deadline, &mut happened)?;
        }
        while let Some(ev) = sc.events.get(self.next).filter(|e| e.at.0 == instant.t) {
            happened.push(Happening::Event(ev.kind.clone()));
            self.apply_event(now, ev, &mut happened)?;
            self.collect(&mut happened);
            self.next += 1;
        }
        if !happened.is_empty() {
            self.record(now, happened);
        }
        Ok(())
    }

    /// Moves the group's new decisions into `out` and the decision list,
    /// handing the provider the work they ask for.
    fn collect(&mut self, out: &mut Vec<Happening>) {
        for d in self.group.drain_decisions() {
            self.provider.ask(d.at.0, &d.action);
            out.push(Happening::Decision(d.clone()));
            self.decisions.push(d);
        }
    }

    /// Applies the provider completions due at `now` and the group's
    /// deadline; notes why a deadline decided nothing.
    fn complete_due(
        &mut self,
        now: UnixMillis,
        deadline: bool,
        happened: &mut Vec<Happening>,
    ) -> Result<(), SimError> {
        let due = self.provider.take_due(now.0);
        self.group
            .handle_due(now, due)
            .map_err(|e| engine_error(self.path, 1, "apply provider completions", e))?;
        let before = happened.len();
        self.collect(happened);
        if deadline && happened.len() == before {
            // Why the deadline decided nothing; with policy periods, also
            // which period holds or comes next (a boundary may be the cause).
            let why = self.group.explain(now);
            let note = match &why.period {
                Some(p) => format!("{} {p}", why.scale_in),
                None => why.scale_in.to_string(),
            };
            happened.push(Happening::Note(note));
        }
        Ok(())
    }

    /// Feeds one scenario event to the group.
    fn apply_event(
        &mut self,
        now: UnixMillis,
        ev: &Event,
        happened: &mut Vec<Happening>,
    ) -> Result<(), SimError> {
        let path = self.path;
        let fail = |message: String| SimError::Replay {
            file: path.to_owned(),
            line: ev.line,
            message,
        };
        match &ev.kind {
            EventKind::Connect(s) => {
                self.group
                    .handle(now, Input::Arrive { session: s.clone() })
                    .map_err(|e| fail(format!("connect = {:?}: {e}", s.as_str())))?;
                if self.group.is_waiting(s) {
                    happened.push(Happening::Note(format!(
                        "{s} waits for room, up to {}",
                        ferry_common::duration::format_duration(self.sc.policy.wait_timeout)
                    )));
                }
                Ok(())
            }
            EventKind::Disconnect(s) => self
                .group
                .handle(now, Input::Leave { session: s.clone() })
                .map_err(|e| fail(format!("disconnect = {:?}: {e}", s.as_str()))),
            EventKind::Created(n) => {
                let n = *n as usize;
                let pending = &mut self.provider.creating;
                if pending.len() < n {
                    return Err(fail(format!(
                        "created = {n}, but only {} creation(s) are pending",
                        pending.len()
                    )));
                }
                let inputs: Vec<Input> = pending
                    .drain(..n)
                    .map(|resource| Input::Created { resource })
                    .collect();
                self.group
                    .handle_batch(now, inputs)
                    .map_err(|e| fail(format!("created = {n}: {e}")))
            }
            EventKind::Released(n) => {
                let n = *n as usize;
                let pending = &mut self.provider.releasing;
                if pending.len() < n {
                    return Err(fail(format!(
                        "released = {n}, but only {} release(s) are pending",
                        pending.len()
                    )));
                }
                let inputs: Vec<Input> = pending
                    .drain(..n)
                    .map(|resource| Input::Released { resource })
                    .collect();
                self.group
                    .handle_batch(now, inputs)
                    .map_err(|e| fail(format!("released = {n}: {e}")))
            }
        }
    }

    /// Adds the row of one instant, or extends the last row when it is the
    /// same instant.
    fn record(&mut self, now: UnixMillis, happened: Vec<Happening>) {
        let snapshot = self.group.snapshot();
        match self.rows.last_mut() {
            // A zero provider delay completes at the instant that asked for it.
            Some(last) if last.at == now => {
                last.happenings.extend(happened);
                last.snapshot = snapshot;
            }
            _ => self.rows.push(Row {
                at: now,
                happenings: happened,
                snapshot,
            }),
        }
    }

    /// Ends the replay: the resources at the end and the period's bill.
    fn finish(self) -> Outcome {
        let sc = self.sc;
        let resources = self.group.resources().to_vec();
        let period_seconds = billing::billed_seconds(sc.start, None, sc.end);
        let elastic_seconds = resources
            .iter()
            .filter(|r| r.class == Class::Elastic)
            .filter_map(|r| {
                r.ready_at
                    .map(|ready| billing::billed_seconds(ready, r.released_at, sc.end))
            });
        let bill = billing::bill(
            sc.billing,
            sc.base_resources,
            &sc.prices,
            period_seconds,
            elastic_seconds,
        );
        Outcome {
            decisions: self.decisions,
            resources,
            rows: self.rows,
            period_seconds,
            bill,
        }
    }
}
