//! The group's status as its actor applies it: `expired` closes the group
//! (the engine frozen, every open session disconnected), a renewal reopens
//! it, `updating` takes no new sessions, and payment decides whether the
//! engine may scale (see the module doc of [`super`]).

use std::collections::BTreeSet;

use ferry_common::{ResourceId, SessionId};

use super::{is_live, Actor, CLOSED_STATUS};
use crate::engine::{Input, ResourceState};

impl Actor {
    /// Closes or reopens the group after its status changed.
    pub(super) fn apply_status(&mut self) {
        let expired = self.row.status == CLOSED_STATUS;
        if expired && self.closed.is_none() {
            self.close();
        } else if !expired && is_live(&self.row.status) && self.closed.is_some() {
            self.reopen();
        }
        if self.updating() {
            // Requests waiting for room are refused: no new sessions now.
            self.refuse_waiters();
        }
        self.apply_payment();
    }

    /// Whether an image update holds the group (`updating`, run by its
    /// rollout, `crate::rollout`): no new sessions.
    pub(super) fn updating(&self) -> bool {
        self.row.status == crate::groups::lifecycle::Status::Updating.as_str()
    }

    /// The group expired: freeze the engine and disconnect every open session.
    pub(super) fn close(&mut self) {
        self.refuse_waiters();
        self.closed = Some(self.sessions.clone());
        let open: Vec<(ResourceId, SessionId)> = self
            .sessions
            .iter()
            .flat_map(|(id, set)| {
                let real = self.external(id);
                set.iter().map(move |s| (real.clone(), s.clone()))
            })
            .collect();
        self.note(
            "closed",
            format!(
                "group {} expired: it takes no new sessions; asking agents to disconnect its {} \
                 open session(s)",
                self.row.name,
                open.len()
            ),
        );
        for (real, session) in open {
            self.disconnect(&real, session);
        }
    }

    /// The group is in service again (renewed): the engine learns what
    /// happened to sessions and agents while it was frozen.
    pub(super) fn reopen(&mut self) {
        let Some(frozen) = self.closed.take() else {
            return;
        };
        // In service again: nothing more to disconnect (an attempt in
        // flight is still recorded, and not retried).
        let keys: Vec<_> = self.disconnects.pending.keys().cloned().collect();
        self.disconnects.dirty.0.extend(keys);
        self.disconnects.pending.clear();
        // A policy changed while frozen goes in first.
        if self.engine.policy() != &self.row.policy {
            let policy = self.row.policy.clone();
            if self.input(Input::Policy(policy)) {
                self.note("policy", "policy in force in the group's engine".into());
            }
        }
        let ids: BTreeSet<ResourceId> =
            frozen.keys().chain(self.sessions.keys()).cloned().collect();
        for id in ids {
            let before = frozen.get(&id).cloned().unwrap_or_default();
            let now = self.sessions.get(&id).cloned().unwrap_or_default();
            for gone in before.difference(&now) {
                self.input(Input::Leave {
                    session: gone.clone(),
                });
            }
            for new in now.difference(&before) {
                self.input(Input::Occupy {
                    session: new.clone(),
                    resource: id.clone(),
                });
            }
        }
        let live = self.shared.registry.snapshot();
        let bound: Vec<(ResourceId, ResourceId)> = self
            .to_engine
            .iter()
            .map(|(real, id)| (real.clone(), id.clone()))
            .collect();
        for (real, id) in bound {
            let connected = live.get(&real);
            let available = connected.is_some_and(|l| l.available && !l.draining);
            match self.state_of(&id) {
                Some(ResourceState::Pending) if connected.is_some() => {
                    self.input(Input::Created { resource: id });
                }
                Some(ResourceState::Ready) => {
                    self.input(if available {
                        Input::Available { resource: id }
                    } else {
                        Input::Unavailable { resource: id }
                    });
                }
                _ => {}
            }
        }
        self.note(
            "reopened",
            format!(
                "group {} is {} again: it takes new sessions",
                self.row.name, self.row.status
            ),
        );
    }
}
