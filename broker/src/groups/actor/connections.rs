//! Which agent connection speaks for a resource, in the group's actor.
//!
//! An agent that reconnects has two connections for a moment, each with its
//! own task in the link. The old one's end (`Left`, or a last availability
//! change) and the new one's registration (`Joined`) reach the actor's inbox
//! from different tasks, in either order: the old connection may have
//! detached from the registry before the new one attached, so both think
//! they are the current one. Applied in the wrong order, the old `Left`
//! marked a re-joined resource unavailable, and nothing made it available
//! again until its health changed.
//!
//! So every report of a connection carries its connection id (the
//! registry's, which only grows) and the actor remembers the newest joined
//! connection per resource: a report of an older connection is stale and
//! ignored (logged), a join of an older one too. Reports without an id
//! (an image update or OTA wave marking a resource unavailable) are not a
//! connection's and always apply.

use std::collections::HashMap;

use ferry_common::ResourceId;

use super::Actor;

/// The newest connection id joined per real resource.
#[derive(Debug, Default)]
pub(super) struct Connections(HashMap<ResourceId, u64>);

impl Actor {
    /// Whether a report of connection `conn` of `resource` is current (and,
    /// for a join, makes `conn` the current connection). `None`: not a
    /// connection's report; always current.
    pub(super) fn current_conn(
        &mut self,
        resource: &ResourceId,
        conn: Option<u64>,
        joining: bool,
    ) -> bool {
        let Some(conn) = conn else { return true };
        let newest = self.conns.0.get(resource).copied();
        let current = match newest {
            // No join seen by this actor (it started after the agent
            // joined): nothing newer to protect.
            None => true,
            Some(n) if joining => conn >= n,
            Some(n) => conn == n,
        };
        if current && joining {
            self.conns.0.insert(resource.clone(), conn);
        }
        if !current {
            tracing::debug!(group = %self.row.name, %resource, conn, ?newest,
                "ignoring a report of a replaced connection");
        }
        current
    }
}
