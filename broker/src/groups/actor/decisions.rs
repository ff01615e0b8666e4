//! What the engine decided, carried out: each decision recorded with its
//! reason, a scale-in's drain sent, and one commit of the actor's turn
//! (events, intervals, elastic resources, disconnects, retained sessions)
//! before anyone is answered.

use ferry_common::wire::Command;
use ferry_common::{ResourceId, UnixMillis};

use super::{Actor, ActorError};
use crate::engine::{Action, Class, Decision, Input};
use crate::registry::COMMAND_TIMEOUT;
use crate::store::{GroupCommit, IntervalOp};

impl Actor {
    /// Turns the engine's decisions into events and agent commands.
    pub(super) fn take_decisions(&mut self) {
        let decisions: Vec<Decision> = self.engine.drain_decisions().collect();
        if !decisions.is_empty() {
            self.decided_since.get_or_insert(self.turn_started);
        }
        for d in decisions {
            self.decided
                .push((d.action.name(), crate::metrics::reason_kind(&d.reason)));
            self.elastic.on_decision(&d);
            let message = match &d.action {
                Action::ScaleOut { resources } => {
                    let real: Vec<ResourceId> =
                        resources.iter().map(|r| self.external(r)).collect();
                    let names: Vec<String> = real.iter().map(|r| r.to_string()).collect();
                    self.to_adopt.extend(real);
                    format!(
                        "scale-out: asked for {} because {}; an agent named for it \
                         completes the creation",
                        names.join(", "),
                        d.reason
                    )
                }
                Action::Created { resource } => {
                    let real = self.external(resource);
                    self.intervals.push(IntervalOp::Open {
                        resource: real.clone(),
                        class: Class::Elastic.as_str(),
                        at: d.at,
                    });
                    format!("created: {real} is ready")
                }
                Action::ScaleIn { resource } => {
                    let real = self.external(resource);
                    self.drain(&real, resource);
                    format!(
                        "scale-in: {real} is drained for release because {}",
                        d.reason
                    )
                }
                Action::Released { resource } => {
                    let real = self.external(resource);
                    self.intervals.push(IntervalOp::Close {
                        resource: real.clone(),
                        at: d.at,
                    });
                    format!("released: {real} is gone")
                }
                Action::Placed { session, resource } => {
                    self.route_decision(session, Some(resource), d.at);
                    format!(
                        "placed: session {session} on {} because {}",
                        self.external(resource),
                        d.reason
                    )
                }
                Action::Rejected { session } => {
                    self.route_decision(session, None, d.at);
                    format!("rejected: session {session} because {}", d.reason)
                }
            };
            // Fields for the journal (`journalctl GROUP=... DECISION=...`).
            match &d.action {
                Action::Placed { .. } | Action::Rejected { .. } => {
                    tracing::debug!(group = %self.row.name, decision = d.action.name(), "{message}")
                }
                _ => {
                    tracing::info!(group = %self.row.name, decision = d.action.name(), "{message}")
                }
            }
            self.notes.push((d.at, d.action.name(), message));
        }
    }

    /// Sends `Drain` to a scaled-in resource's agent without holding up the
    /// actor. An agent that is not connected is gone already: released.
    pub(super) fn drain(&mut self, real: &ResourceId, engine_id: &ResourceId) {
        let registry = self.shared.registry.clone();
        let connected = registry.snapshot().contains_key(real);
        if !connected {
            // Deferred: the engine is inside `take_decisions`' loop; the
            // release is applied as a new input right after.
            let id = engine_id.clone();
            let now = UnixMillis(self.last_now);
            if let Err(e) = self.engine.handle(now, Input::Released { resource: id }) {
                tracing::warn!(group = %self.row.name, "release of {real}: {e}");
            }
            return;
        }
        if self.elastic.provisioned() {
            // Issue 6: the agent's answer to `Drain` is the release.
            self.elastic.release(real, engine_id);
            return;
        }
        let real = real.clone();
        let group = self.row.name.clone();
        self.shared.tracker.spawn(async move {
            match registry
                .command(&real, Command::Drain, COMMAND_TIMEOUT)
                .await
            {
                Ok(outcome) => {
                    tracing::info!(%group, resource = %real, ?outcome, "scale-in drain")
                }
                Err(e) => tracing::warn!(%group, resource = %real, "scale-in drain: {e}"),
            }
        });
    }

    /// Writes the pending events in one transaction. The engine's decision
    /// stands whether or not this succeeds; a store failure stops the actor
    /// (its group is started again from the store after `RETRY_AFTER_ERROR`,
    /// see `GroupActors::restart_later`).
    ///
    /// Route answers held for this commit go out once it is done (their
    /// reservations are on disk); a slot whose client went away meanwhile
    /// is freed, and that is committed in turn.
    pub(super) async fn commit(&mut self) -> Result<(), ActorError> {
        loop {
            // Agents already connected for the elastic ids just asked for take
            // their slots first (their joins' decisions go into this commit).
            while !self.to_adopt.is_empty() {
                let asked = std::mem::take(&mut self.to_adopt);
                self.adopt(Some(&asked)).await;
            }
            // Slots of route requests whose client went away.
            self.flush_deferred_leaves();
            // Decisions made while handling a deferred release.
            self.take_decisions();
            let commit = GroupCommit {
                disconnects: self.disconnect_ops(),
                retained: self.retention_ops(),
                reservations: self.reservation_ops(),
                notes: std::mem::take(&mut self.notes),
                intervals: std::mem::take(&mut self.intervals),
                ends: std::mem::take(&mut self.ends),
                elastic: self.elastic.take_ops(),
            };
            if !commit.is_empty() {
                self.shared
                    .store
                    .commit_group(self.row.num, self.row.billing.clone(), commit)
                    .await?;
            }
            // Counted once durable: a commit that fails stops the actor,
            // which decides again from the store and counts then.
            let metrics = self.shared.store.metrics();
            for (kind, reason) in self.decided.drain(..) {
                metrics.decision(self.row.name.as_str(), kind, reason);
            }
            if let Some(since) = self.decided_since.take() {
                metrics.decision_latency(self.row.name.as_str(), since.elapsed());
            }
            // Each round frees at least one slot of a request answered in
            // the round before; the answers a freed slot gives are to
            // requests waiting now, so the rounds end.
            if !self.send_replies() {
                return Ok(());
            }
        }
    }
}
