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

use super::scenario::{EventKind, Provider, Scenario};
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
    let mut group = Group::with_base_count(
        sc.policy.clone(),
        sc.spec.as_deref(),
        sc.base_resources,
        sc.start,
    )
    .map_err(|e| engine_error(path, 1, "set up the group", e))?;
    let mut provider = ProviderQueue {
        mode: sc.provider,
        due: BTreeMap::new(),
        seq: 0,
        creating: VecDeque::new(),
        releasing: VecDeque::new(),
    };
    let mut decisions = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut next = 0usize;

    let mut collect =
        |group: &mut Group, provider: &mut ProviderQueue, out: &mut Vec<Happening>| {
            for d in group.drain_decisions() {
                provider.ask(d.at.0, &d.action);
                out.push(Happening::Decision(d.clone()));
                decisions.push(d);
            }
        };

    loop {
        let t_event = sc.events.get(next).map(|e| e.at.0);
        let t_done = provider.next_due();
        let t_deadline = group.poll_deadline().map(|t| t.0);
        let Some(t) = [t_event, t_done, t_deadline].into_iter().flatten().min() else {
            break;
        };
        if t > sc.end.0 {
            break;
        }
        let now = UnixMillis(t);
        let mut happened = Vec::new();
        if t_done == Some(t) || t_deadline == Some(t) {
            let due = provider.take_due(t);
            group
                .handle_due(now, due)
                .map_err(|e| engine_error(path, 1, "apply provider completions", e))?;
            let before = happened.len();
            collect(&mut group, &mut provider, &mut happened);
            if t_deadline == Some(t) && happened.len() == before {
                // Why the deadline decided nothing; with policy periods, also
                // which period holds or comes next (a boundary may be the cause).
                let why = group.explain(now);
                let note = match &why.period {
                    Some(p) => format!("{} {p}", why.scale_in),
                    None => why.scale_in.to_string(),
                };
                happened.push(Happening::Note(note));
            }
        }
        while let Some(ev) = sc.events.get(next).filter(|e| e.at.0 == t) {
            happened.push(Happening::Event(ev.kind.clone()));
            let fail = |message: String| SimError::Replay {
                file: path.to_owned(),
                line: ev.line,
                message,
            };
            match &ev.kind {
                EventKind::Connect(s) => {
                    group
                        .handle(now, Input::Arrive { session: s.clone() })
                        .map_err(|e| fail(format!("connect = {:?}: {e}", s.as_str())))?;
                    if group.is_waiting(s) {
                        happened.push(Happening::Note(format!(
                            "{s} waits for room, up to {}",
                            ferry_common::duration::format_duration(sc.policy.wait_timeout)
                        )));
                    }
                }
                EventKind::Disconnect(s) => group
                    .handle(now, Input::Leave { session: s.clone() })
                    .map_err(|e| fail(format!("disconnect = {:?}: {e}", s.as_str())))?,
                EventKind::Created(n) => {
                    let n = *n as usize;
                    if provider.creating.len() < n {
                        return Err(fail(format!(
                            "created = {n}, but only {} creation(s) are pending",
                            provider.creating.len()
                        )));
                    }
                    let inputs: Vec<Input> = provider
                        .creating
                        .drain(..n)
                        .map(|resource| Input::Created { resource })
                        .collect();
                    group
                        .handle_batch(now, inputs)
                        .map_err(|e| fail(format!("created = {n}: {e}")))?;
                }
                EventKind::Released(n) => {
                    let n = *n as usize;
                    if provider.releasing.len() < n {
                        return Err(fail(format!(
                            "released = {n}, but only {} release(s) are pending",
                            provider.releasing.len()
                        )));
                    }
                    let inputs: Vec<Input> = provider
                        .releasing
                        .drain(..n)
                        .map(|resource| Input::Released { resource })
                        .collect();
                    group
                        .handle_batch(now, inputs)
                        .map_err(|e| fail(format!("released = {n}: {e}")))?;
                }
            }
            collect(&mut group, &mut provider, &mut happened);
            next += 1;
        }
        if happened.is_empty() {
            continue;
        }
        let snapshot = group.snapshot();
        match rows.last_mut() {
            // A zero provider delay completes at the instant that asked for it.
            Some(last) if last.at == now => {
                last.happenings.extend(happened);
                last.snapshot = snapshot;
            }
            _ => rows.push(Row {
                at: now,
                happenings: happened,
                snapshot,
            }),
        }
    }

    let resources = group.resources().to_vec();
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
    Ok(Outcome {
        decisions,
        resources,
        rows,
        period_seconds,
        bill,
    })
}
