//! Users' presence on their sessions: disconnected (the session is retained
//! for the group's `disconnect_retention`) or back. Reported on the local
//! socket (`ferry-agent session disconnected|reconnected ID`), sent to the
//! broker as `AgentToBroker::Presence`.
//!
//! Not spooled: a session's start and end are the metered facts; presence
//! only times a retention. Instead the board keeps every session currently
//! disconnected and the link sends all of them again after each `Welcome`
//! (the broker applies them idempotently), so a report made while the link
//! was down still arrives.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use ferry_common::limits::MAX_SESSIONS_PER_HELLO;
use ferry_common::wire::{Presence, PresenceReport};
use ferry_common::SessionId;
use tokio::sync::Notify;

/// Reports waiting for the link; past this the oldest are dropped (the
/// disconnected set is resent after the next `Welcome` anyway).
pub const MAX_PENDING_PRESENCE: usize = 1024;

#[derive(Default)]
struct Board {
    /// Sessions whose user is away now, with their report.
    disconnected: BTreeMap<SessionId, PresenceReport>,
    /// Reports not yet sent on the current connection.
    pending: VecDeque<PresenceReport>,
}

/// Shared by the local socket (writer) and the link (reader).
#[derive(Clone, Default)]
pub struct PresenceBoard {
    board: Arc<Mutex<Board>>,
    changed: Arc<Notify>,
}

/// Why a presence report was refused.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("{0} sessions are disconnected already; the limit is {MAX_SESSIONS_PER_HELLO}")]
    TooMany(usize),
}

impl PresenceBoard {
    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        // Each update is a few map and queue operations: never half done.
        self.board.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a report and wakes the link.
    pub fn report(&self, report: PresenceReport) -> Result<(), PresenceError> {
        {
            let mut b = self.board();
            match report.state {
                Presence::Disconnected => {
                    if !b.disconnected.contains_key(&report.session)
                        && b.disconnected.len() >= MAX_SESSIONS_PER_HELLO
                    {
                        return Err(PresenceError::TooMany(b.disconnected.len()));
                    }
                    b.disconnected
                        .insert(report.session.clone(), report.clone());
                }
                Presence::Reconnected => {
                    b.disconnected.remove(&report.session);
                }
            }
            if b.pending.len() >= MAX_PENDING_PRESENCE {
                b.pending.pop_front();
            }
            b.pending.push_back(report);
        }
        self.changed.notify_one();
        Ok(())
    }

    /// The session ended: nothing more to say about it.
    pub fn forget(&self, session: &SessionId) {
        self.board().disconnected.remove(session);
    }

    /// After a `Welcome`: every session disconnected now, and nothing else
    /// pending (the broker learns the current state from these).
    pub fn resync(&self) -> Vec<PresenceReport> {
        let mut b = self.board();
        b.pending.clear();
        b.disconnected.values().cloned().collect()
    }

    /// Reports made since the last call, oldest first.
    pub fn take_pending(&self) -> Vec<PresenceReport> {
        self.board().pending.drain(..).collect()
    }

    /// Resolves when a report was made (cancel-safe).
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::UnixMillis;

    fn rep(s: &str, state: Presence) -> PresenceReport {
        PresenceReport {
            session: s.parse().expect("id"),
            state,
            at: UnixMillis(1),
        }
    }

    #[test]
    fn the_disconnected_set_is_resent_and_pending_reports_drain_once() {
        let b = PresenceBoard::default();
        b.report(rep("s1", Presence::Disconnected)).expect("ok");
        b.report(rep("s2", Presence::Disconnected)).expect("ok");
        b.report(rep("s1", Presence::Reconnected)).expect("ok");
        assert_eq!(b.take_pending().len(), 3);
        assert!(b.take_pending().is_empty());
        let again = b.resync();
        assert_eq!(again, vec![rep("s2", Presence::Disconnected)]);
        b.forget(&"s2".parse().expect("id"));
        assert!(b.resync().is_empty());
    }
}
