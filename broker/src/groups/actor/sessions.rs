//! Session reports of the group's agents as the engine sees them: a host
//! that left, a session that started or ended, and an end the broker
//! decided itself (a retention or a gone host ran out).
//!
//! A host reports only its own sessions: every report naming a session is
//! checked here, where it enters the group, against the host the group has
//! that session on ([`Actor::owned_elsewhere`]). A report about another
//! host's session (its end, its user's disconnect or return, its start
//! where another host holds its reservation) changes nothing and is
//! recorded as an `ignored-report` event.

use ferry_common::wire::SessionEvent;
use ferry_common::{ResourceId, SessionId, UnixMillis};

use super::Actor;

/// Event kind of a report a host made about another host's session.
pub(crate) const IGNORED_REPORT: &str = "ignored-report";

/// Reports about other hosts' sessions recorded per reporting host and run
/// of the group's actor; later ones are ignored without a record.
const RECORDED_IGNORED_REPORTS: u32 = 20;
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

    /// The host the group has `session` on when it is another than the
    /// reporting host's `id` (engine ids): placed or reserved there in the
    /// engine, else among the sessions recorded open on that host.
    pub(super) fn owned_elsewhere(
        &self,
        id: &ResourceId,
        session: &SessionId,
    ) -> Option<ResourceId> {
        let on = match self.engine.session_resource(session) {
            Some(on) => Some(on.clone()),
            None => self
                .sessions
                .iter()
                .find(|(_, open)| open.contains(session))
                .map(|(on, _)| on.clone()),
        };
        on.filter(|on| on != id)
    }

    /// Checks that the report of host `id` about `session` is about one of
    /// its own sessions; if not, records the report as ignored and says so.
    pub(super) fn foreign_report(
        &mut self,
        id: &ResourceId,
        session: &SessionId,
        what: &str,
    ) -> bool {
        let Some(owner) = self.owned_elsewhere(id, session) else {
            return false;
        };
        let (reporter, owner) = (self.external(id), self.external(&owner));
        let count = self.ignored_reports.entry(id.clone()).or_default();
        *count = count.saturating_add(1);
        let count = *count;
        if count > RECORDED_IGNORED_REPORTS {
            // Recorded enough: a host that keeps doing it fills no log.
            return true;
        }
        tracing::warn!(group = %self.row.name, %reporter, %owner, %session,
            "ignored a host's report about another host's session");
        let more = if count == RECORDED_IGNORED_REPORTS {
            format!("; further such reports of {reporter} are ignored without a record")
        } else {
            String::new()
        };
        self.note(
            IGNORED_REPORT,
            format!(
                "ignored: resource {reporter} reported {what} session {session}, which is on \
                 {owner}; a host reports only its own sessions{more}"
            ),
        );
        true
    }

    pub(super) fn session_event(&mut self, id: &ResourceId, ev: SessionEvent) {
        let (session, what) = match &ev {
            SessionEvent::Started { session, .. } => (session, "the start of"),
            SessionEvent::Ended { session, .. } => (session, "the end of"),
        };
        if self.foreign_report(id, &session.clone(), what) {
            return;
        }
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
