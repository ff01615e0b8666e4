//! Session reports of the group's agents as the engine sees them: a host
//! that left, a session that started or ended, and an end the broker
//! decided itself (a retention or a gone host ran out).

use ferry_common::wire::SessionEvent;
use ferry_common::{ResourceId, SessionId, UnixMillis};

use super::Actor;
use crate::engine::{Input, ResourceState};
use crate::store::BrokerEnd;

impl Actor {
    pub(super) fn left(&mut self, resource: ResourceId) {
        let Some(id) = self.to_engine.get(&resource).cloned() else {
            // A flagged agent that took no slot went away: nothing to flag.
            if self.unused.remove(&resource) {
                self.flagged.remove(&resource);
            }
            return;
        };
        match self.state_of(&id) {
            Some(ResourceState::Releasing) => {
                self.input(Input::Released { resource: id });
            }
            Some(ResourceState::Ready) => {
                self.input(Input::Unavailable {
                    resource: id.clone(),
                });
                self.host_left(&resource, &id);
            }
            _ => {}
        }
    }

    pub(super) fn session_event(&mut self, id: &ResourceId, ev: SessionEvent) {
        if matches!(ev, SessionEvent::Ended { .. }) {
            // A rollout draining this host waits for its sessions to end:
            // it looks again now, not at the drain deadline.
            self.shared.rollouts.session_ended(&self.row.name);
        }
        if self.closed.is_some() {
            match ev {
                SessionEvent::Started { session, .. } => {
                    let real = self.external(id);
                    self.note(
                        "rejected",
                        format!(
                            "rejected: session {session} on {real} started after group {} \
                             expired; asking its agent to disconnect it",
                            self.row.name
                        ),
                    );
                    self.sessions
                        .entry(id.clone())
                        .or_default()
                        .insert(session.clone());
                    self.disconnect(&real, session);
                }
                SessionEvent::Ended { session, .. } => {
                    if let Some(set) = self.sessions.get_mut(id) {
                        set.remove(&session);
                    }
                }
            }
            return;
        }
        match ev {
            SessionEvent::Started { session, user, .. } => {
                // A routed session connects on its reservation; any other
                // occupies a slot as the host reports it.
                let counted = self.route_started(id, &session, &user)
                    || self.input(Input::Occupy {
                        session: session.clone(),
                        resource: id.clone(),
                    });
                if counted {
                    self.sessions.entry(id.clone()).or_default().insert(session);
                }
            }
            SessionEvent::Ended { session, .. } => {
                if let Some(set) = self.sessions.get_mut(id) {
                    set.remove(&session);
                }
                self.route_ended(&session);
                self.input(Input::Leave { session });
            }
        }
    }

    /// Ends `session` on `real` at `at` because the broker decided so (its
    /// retention ran out, its host stayed away): the group frees its slot
    /// now and its record ends at `at` with `reason` in the next commit,
    /// whether or not the host can close it. The host's own later report of
    /// the end does not move it (an earlier one does: see the store).
    pub(super) fn end_by_broker(
        &mut self,
        real: &ResourceId,
        session: &SessionId,
        at: UnixMillis,
        reason: &str,
    ) {
        self.ends.push(BrokerEnd {
            resource: real.clone(),
            session: session.clone(),
            at,
            reason: reason.to_owned(),
        });
        if let Some(set) = self
            .to_engine
            .get(real)
            .and_then(|id| self.sessions.get_mut(id))
        {
            set.remove(session);
        }
        self.route_ended(session);
        if self.engine.session_resource(session).is_some() {
            self.input(Input::Leave {
                session: session.clone(),
            });
        }
    }
}
