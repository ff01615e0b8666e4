//! Hosts that stay away, in the group's actor.
//!
//! When a joined host's link closes (its agent stopped, the host died, the
//! network is cut: the link notices a silent peer within a few health
//! intervals), the host takes no new sessions at once and the group records
//! it (`left`). Its sessions still count: a host that comes back within
//! `host_gone_after` (broker config, default 10 minutes) keeps them. One that
//! does not has its sessions ended by the broker (`host-gone`), stamped with
//! the time it was last heard from, so their metering stops there and they
//! stop holding slots. A host's own later report of such an end does not move
//! it, an earlier one does (see [`crate::store::end_session_by_broker`]). If
//! the host comes back later with those sessions, they stay ended for the
//! group. A host that went silent or came back on a live link is recorded as
//! well (`unavailable`, `available` events).
//!
//! Across a broker restart, a host of the group with sessions recorded open
//! that does not reconnect is counted from the actor's start (the broker
//! could not hear it while it was down; hosts need a moment to reconnect),
//! and its sessions are stamped with its `last_seen` (written when its link
//! ended).

use std::collections::{BTreeMap, BTreeSet};

use ferry_common::{ResourceId, SessionId, UnixMillis};

use super::{Actor, ActorError};

/// A host of the group whose link closed.
#[derive(Clone, Debug)]
pub(super) struct Gone {
    /// When it was last heard from: the end time of its sessions.
    heard: UnixMillis,
    /// Where `host_gone_after` counts from.
    since: UnixMillis,
    /// Its sessions open when it left.
    sessions: BTreeSet<SessionId>,
}

/// The group's hosts that are away, by real resource.
#[derive(Debug, Default)]
pub(super) struct GoneHosts(BTreeMap<ResourceId, Gone>);

impl Actor {
    fn host_gone_after_ms(&self) -> i64 {
        i64::try_from(self.shared.config.host_gone_after.as_millis()).unwrap_or(i64::MAX)
    }

    /// The link of `real` (joined, engine id `id`) closed.
    pub(super) fn host_left(&mut self, real: &ResourceId, id: &ResourceId) {
        let since = self.now();
        let sessions = self.sessions.get(id).cloned().unwrap_or_default();
        let message = if sessions.is_empty() {
            format!("left: the link of {real} closed; it takes no new sessions")
        } else {
            let at = UnixMillis(since.0.saturating_add(self.host_gone_after_ms()));
            format!(
                "left: the link of {real} closed; it takes no new sessions; its {} open \
                 session(s) end at {} unless it comes back",
                sessions.len(),
                crate::render::rfc3339_secs(at)
            )
        };
        self.note("left", message);
        if !sessions.is_empty() {
            self.gone.0.insert(
                real.clone(),
                Gone {
                    heard: since,
                    since,
                    sessions,
                },
            );
        }
    }

    /// `real` joined again: it is not gone.
    pub(super) fn host_back(&mut self, real: &ResourceId) {
        self.gone.0.remove(real);
    }

    /// When the next host that stays away has its sessions ended.
    pub(super) fn gone_deadline(&self) -> Option<UnixMillis> {
        let after = self.host_gone_after_ms();
        self.gone
            .0
            .values()
            .map(|g| UnixMillis(g.since.0.saturating_add(after)))
            .min()
    }

    /// Ends the sessions of every host away for `host_gone_after` by now.
    pub(super) fn gone_timeouts(&mut self) {
        let now = self.now();
        let after = self.host_gone_after_ms();
        let due: Vec<ResourceId> = self
            .gone
            .0
            .iter()
            .filter(|(_, g)| g.since.0.saturating_add(after) <= now.0)
            .map(|(r, _)| r.clone())
            .collect();
        for real in due {
            let Some(g) = self.gone.0.remove(&real) else {
                continue;
            };
            let since = crate::render::rfc3339_secs(g.heard);
            let names: Vec<String> = g.sessions.iter().map(|s| s.to_string()).collect();
            self.note(
                "host-gone",
                format!(
                    "host-gone: {real} has not come back since {since}; its session(s) {} \
                     end at {since} (their metering stops there)",
                    names.join(", ")
                ),
            );
            let reason = format!("host gone: no report from {real} since {since}");
            for session in g.sessions {
                self.end_by_broker(&real, &session, g.heard, &reason);
            }
        }
    }

    /// Hosts of the group with sessions recorded open that are not
    /// connected when the actor starts (a broker restart): counted as away
    /// since they were last seen.
    pub(super) async fn restore_gone(&mut self) -> Result<(), ActorError> {
        let rows = self
            .shared
            .store
            .open_on_hosts_of(self.row.name.as_str())
            .await?;
        let connected = self.shared.registry.snapshot();
        let now = self.now();
        for row in rows {
            let (real, session) = (row.resource, row.session);
            if connected.contains_key(&real) {
                continue;
            }
            self.gone
                .0
                .entry(real)
                .or_insert_with(|| Gone {
                    heard: row.last_seen,
                    since: now,
                    sessions: BTreeSet::new(),
                })
                .sessions
                .insert(session);
        }
        Ok(())
    }
}
