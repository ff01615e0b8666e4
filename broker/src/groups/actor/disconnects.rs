//! Expiry disconnects that survive a broker restart, and their cap.
//!
//! When a subscription expires the actor asks each open session's agent to
//! disconnect it and retries failures with a doubling backoff (the actor's
//! `Disconnects`: 5 s, 10 s, 20 s, ... up to every 5 minutes). Every pending disconnect is also a row of
//! `pending_disconnects` (resource, session, attempts, first attempt, next
//! attempt), written in the actor's commit, so a restarted broker goes on:
//! its actor starts closed, reloads the rows, and retries each one when its
//! host is back (its agent re-joins with the session) or at its due time,
//! going on from the stored attempt count.
//!
//! The retries stop, with a `disconnect-abandoned` group event naming the
//! session, when [`GIVE_UP_AFTER_MS`] (24 h) has passed since the first
//! attempt, when the session ended, or when its host left the group (or
//! rejoined without the session). They stop quietly when the agent answers
//! `Done`, and a renewal ends them all quietly (the group serves again).

use std::collections::BTreeSet;

use ferry_common::{ResourceId, SessionId, UnixMillis};

use super::{Actor, ActorError, PendingDisconnect};
use crate::store::{DisconnectOp, StoredDisconnect};

/// How long after its first attempt a disconnect is given up: 24 h.
pub(super) const GIVE_UP_AFTER_MS: i64 = 86_400_000;

/// Keys of `pending` changed since the last commit.
#[derive(Debug, Default)]
pub(super) struct Dirty(pub BTreeSet<(ResourceId, SessionId)>);

impl Actor {
    /// The record changes of the disconnects changed since the last commit.
    pub(super) fn disconnect_ops(&mut self) -> Vec<DisconnectOp> {
        let dirty = std::mem::take(&mut self.disconnects.dirty.0);
        dirty
            .into_iter()
            .map(|key| match self.disconnects.pending.get(&key) {
                Some(p) => DisconnectOp::Upsert(StoredDisconnect {
                    resource: key.0,
                    session: key.1,
                    attempts: p.attempts,
                    first_at: p.first_at,
                    due_at: p.due,
                }),
                None => DisconnectOp::Delete(key.0, key.1),
            })
            .collect()
    }

    /// At the start of a closed (expired) group's actor: the disconnects an
    /// earlier run left are retried, each when its host is back or at once
    /// if it was due (an attempt in flight at the restart is due now).
    pub(super) async fn restore_disconnects(&mut self) -> Result<(), ActorError> {
        let num = self.row.num;
        let stored = self.shared.store.pending_disconnects(num).await?;
        if stored.is_empty() {
            return Ok(());
        }
        if self.closed.is_none() {
            // Renewed while the broker was down: nothing to disconnect.
            for d in stored {
                self.disconnects.dirty.0.insert((d.resource, d.session));
            }
            return Ok(());
        }
        let now = self.now();
        let n = stored.len();
        for d in stored {
            self.disconnects.pending.insert(
                (d.resource, d.session),
                PendingDisconnect {
                    attempts: d.attempts,
                    due: Some(d.due_at.unwrap_or(now).max(now)),
                    first_at: d.first_at,
                    restored: true,
                },
            );
        }
        self.note(
            "restored",
            format!("restored: {n} expiry disconnect(s) of the earlier broker run are retried"),
        );
        Ok(())
    }

    /// Whether the disconnect of `session` on `real` is still worth trying:
    /// the session is open as far as the group knows, or (restored after a
    /// restart) its host has not re-joined yet to say.
    pub(super) fn disconnect_target_open(&self, real: &ResourceId, session: &SessionId) -> bool {
        if self.to_engine.contains_key(real) {
            return self.session_open_on(real, session);
        }
        self.disconnects
            .pending
            .get(&(real.clone(), session.clone()))
            .is_some_and(|p| p.restored)
    }

    /// Why the disconnect of `session` on `real` is given up now, if it is.
    pub(super) fn disconnect_give_up(
        &self,
        real: &ResourceId,
        session: &SessionId,
        now: UnixMillis,
    ) -> Option<String> {
        if !self.disconnect_target_open(real, session) {
            return Some("the session ended or its host left the group".into());
        }
        let first = self
            .disconnects
            .pending
            .get(&(real.clone(), session.clone()))?
            .first_at;
        (now.0.saturating_sub(first.0) >= GIVE_UP_AFTER_MS)
            .then(|| "no attempt succeeded within 24 h of the first".into())
    }

    /// Stops retrying the disconnect of `session` on `real`, with a
    /// `disconnect-abandoned` event saying why.
    pub(super) fn abandon_disconnect(&mut self, real: ResourceId, session: SessionId, why: &str) {
        let key = (real, session);
        let attempts = self
            .disconnects
            .pending
            .remove(&key)
            .map_or(0, |p| p.attempts);
        let (real, session) = &key;
        let message = format!(
            "disconnect-abandoned: session {session} on {real} after {attempts} attempt(s): {why}"
        );
        tracing::warn!(group = %self.row.name, "{message}");
        self.note("disconnect-abandoned", message);
        self.disconnects.dirty.0.insert(key);
    }
}
