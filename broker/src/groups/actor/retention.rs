//! Retained sessions that survive a broker restart.
//!
//! A disconnected session is kept for its user for the group's
//! `disconnect_retention` ([`super::routing`]); the retention runs from the
//! disconnect (the host's stamp, never after the broker's now), not from
//! whenever the broker last started, and `forever` sets no deadline. Every retained
//! session is a row of `retained_sessions` (session, resource, disconnected
//! at, deadline), written in the actor's commit, so a restarted broker's
//! actor reloads them with their deadlines and ends each one on time, whether
//! or not its host has come back (and whether or not the host can close it:
//! the group's slot and the session's metering end at the deadline either
//! way, see [`Actor::end_by_broker`]).
//!
//! At the deadline the broker ends the session itself (its slot is freed,
//! its record ends at the deadline with `disconnect retention ended`) and
//! asks the agent to close it. A host without a disconnect hook cannot, and
//! keeps the session until its user logs out, unmetered.

use super::routing::Retained;
use super::{Actor, ActorError};
use crate::store::{RetainOp, StoredRetention};

impl Actor {
    /// The record changes of the retained sessions changed since the last
    /// commit.
    pub(super) fn retention_ops(&mut self) -> Vec<RetainOp> {
        std::mem::take(&mut self.routing.retained_dirty)
            .into_iter()
            .map(|session| match self.routing.retained.get(&session) {
                Some(r) => RetainOp::Upsert(StoredRetention {
                    session,
                    resource: r.resource.clone(),
                    since: r.since,
                    deadline: r.deadline,
                    open: true,
                }),
                None => RetainOp::Delete(session),
            })
            .collect()
    }

    /// Reloads the retained sessions of an earlier broker run (actor start).
    /// A deadline already past ends its session at the next timer, stamped
    /// with the deadline.
    pub(super) async fn restore_retained(&mut self) -> Result<(), ActorError> {
        let stored = self.shared.store.retained_sessions(self.row.num).await?;
        let (stored, ended): (Vec<_>, Vec<_>) = stored.into_iter().partition(|r| r.open);
        // Rows of sessions that ended meanwhile go.
        self.routing
            .retained_dirty
            .extend(ended.into_iter().map(|r| r.session));
        if stored.is_empty() {
            return Ok(());
        }
        let n = stored.len();
        for r in stored {
            self.retain(
                r.session,
                Retained {
                    resource: r.resource,
                    since: r.since,
                    deadline: r.deadline,
                },
            );
        }
        self.note(
            "restored",
            format!(
                "restored: {n} retained session(s) of the earlier broker run keep their \
                 retention deadlines"
            ),
        );
        Ok(())
    }
}
