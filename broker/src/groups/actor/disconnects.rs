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

use super::{disconnect_backoff, DisconnectReport, Msg};
use super::{Actor, ActorError, PendingDisconnect};
use crate::store::{DisconnectOp, StoredDisconnect};
use ferry_common::wire::{Command, CommandOutcome};

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

impl super::Actor {
    /// Asks the agent of `real` to end `session` because the group expired,
    /// without holding up the actor: the attempt runs in its own task and
    /// reports to the actor ([`Actor::disconnect_report`]), which records
    /// it and, after a failure, tries again later while the session is open.
    /// An attempt in flight is not doubled; a retry that was waiting (its
    /// agent just re-joined) is made now.
    pub(super) fn disconnect(&mut self, real: &ResourceId, session: SessionId) {
        let key = (real.clone(), session);
        let now = self.now();
        let (attempt, first_at, restored) = match self.disconnects.pending.get(&key) {
            Some(p) if p.due.is_none() => return,
            Some(p) => (p.attempts + 1, p.first_at, p.restored),
            None => (1, now, false),
        };
        self.disconnects.pending.insert(
            key.clone(),
            PendingDisconnect {
                attempts: attempt,
                due: None,
                first_at,
                restored,
            },
        );
        self.disconnects.dirty.0.insert(key.clone());
        self.launch_disconnect(key.0, key.1, attempt);
    }

    pub(super) fn launch_disconnect(&self, real: ResourceId, session: SessionId, attempt: u32) {
        let shared = self.shared.clone();
        let actor = self.disconnects.actor.clone();
        let group = self.row.name.clone();
        self.shared.tracker.spawn(async move {
            let command = Command::DisconnectSession {
                session: session.clone(),
                reason: format!("group {group} expired"),
            };
            let outcome = shared.command(&real, command).await;
            let outcome = match outcome {
                Ok(CommandOutcome::Done) => Ok(()),
                Ok(CommandOutcome::Failed(m)) => Err(format!(
                    "the agent says: {}",
                    crate::hook_failure::brief(&m)
                )),
                Err(e) => Err(e),
            };
            let report = DisconnectReport {
                resource: real,
                session,
                attempt,
                outcome,
            };
            // No actor any more (recycling, gone, shutdown): nothing to follow up.
            if let Some(tx) = actor.upgrade() {
                if tx.send(Msg::Disconnect(report)).await.is_err() {
                    tracing::debug!(%group, "disconnect outcome after the actor stopped");
                }
            }
        });
    }

    /// Whether `session` is open on `real` as far as the group knows: it
    /// has not ended, and `real` is still one of the group's resources.
    pub(super) fn session_open_on(&self, real: &ResourceId, session: &SessionId) -> bool {
        self.to_engine
            .get(real)
            .and_then(|id| self.sessions.get(id))
            .is_some_and(|set| set.contains(session))
    }

    /// Records a disconnect attempt's outcome; after a failure, schedules
    /// the next attempt while the group is closed and the session open.
    pub(super) fn disconnect_report(&mut self, r: DisconnectReport) {
        let key = (r.resource, r.session);
        let prev = self.disconnects.pending.remove(&key);
        self.disconnects.dirty.0.insert(key.clone());
        let (real, session) = &key;
        let n = r.attempt;
        match r.outcome {
            Ok(()) => self.note(
                "disconnected",
                format!(
                    "disconnected: session {session} on {real}, the group expired \
                     (attempt {n})"
                ),
            ),
            Err(e) => {
                let now = self.now();
                let wait = disconnect_backoff(n);
                if self.closed.is_some() {
                    // Back in the list to be judged by the cap (and kept).
                    self.disconnects.pending.insert(
                        key.clone(),
                        PendingDisconnect {
                            attempts: n,
                            due: Some(UnixMillis(now.0.saturating_add(wait))),
                            first_at: prev.as_ref().map_or(now, |p| p.first_at),
                            restored: prev.as_ref().is_some_and(|p| p.restored),
                        },
                    );
                }
                let give_up = self
                    .closed
                    .as_ref()
                    .and_then(|_| self.disconnect_give_up(real, session, now));
                let retry = self.closed.is_some() && give_up.is_none();
                let message = if retry {
                    format!(
                        "disconnect failed (attempt {n}): session {session} on {real}: {e}; \
                         next attempt in {} s",
                        wait / 1000
                    )
                } else {
                    format!(
                        "disconnect failed (attempt {n}): session {session} on {real}: {e}; \
                         not retried: the session ended or the group is in service again"
                    )
                };
                tracing::warn!(group = %self.row.name, "{message}");
                self.note("disconnect-failed", message);
                if let Some(why) = give_up {
                    self.abandon_disconnect(key.0.clone(), key.1.clone(), &why);
                }
            }
        }
    }

    /// Makes the disconnect attempts that are due; drops those whose session
    /// ended meanwhile (or whose resource left the group).
    pub(super) fn retry_disconnects(&mut self) {
        let now = self.now();
        let due: Vec<(ResourceId, SessionId)> = self
            .disconnects
            .pending
            .iter()
            .filter(|(_, p)| p.due.is_some_and(|d| d <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for (real, session) in due {
            if self.closed.is_none() {
                self.disconnects
                    .pending
                    .remove(&(real.clone(), session.clone()));
                self.disconnects.dirty.0.insert((real, session));
            } else if let Some(why) = self.disconnect_give_up(&real, &session, now) {
                self.abandon_disconnect(real, session, &why);
            } else {
                self.disconnect(&real, session);
            }
        }
    }
}
