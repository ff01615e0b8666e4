//! Retained sessions that survive a broker restart.
//!
//! A disconnected session is kept for its user for the group's
//! `disconnect_retention` ([`super::routing`]); the retention runs from the
//! disconnect, not from whenever the broker last started. Every retained
//! session is a row of `retained_sessions` (session, resource, disconnected
//! at, deadline), written in the actor's commit, so a restarted broker's
//! actor reloads them with their deadlines and ends each one on time, whether
//! or not its host has come back (and whether or not the host can close it:
//! the group's slot and the session's metering end at the deadline either
//! way, see [`Actor::end_by_broker`]).

use ferry_common::{ResourceId, SessionId, UnixMillis};
use rusqlite::{params, Connection};

use super::routing::Retained;
use super::{Actor, ActorError};
use crate::store::StoreError;

/// A change of `retained_sessions`, written with the actor's commit.
#[derive(Clone, Debug)]
pub(super) enum RetainOp {
    Upsert(SessionId, Retained),
    Delete(SessionId),
}

/// Applies `ops` (inside the actor's commit transaction).
pub(super) fn write(c: &Connection, num: i64, ops: &[RetainOp]) -> rusqlite::Result<()> {
    for op in ops {
        match op {
            RetainOp::Upsert(session, r) => {
                c.prepare_cached(
                    "INSERT INTO retained_sessions
                         (group_num, session, resource, disconnected_at, deadline)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (group_num, session) DO UPDATE
                         SET resource = excluded.resource,
                             disconnected_at = excluded.disconnected_at,
                             deadline = excluded.deadline",
                )?
                .execute(params![
                    num,
                    session.as_str(),
                    r.resource.as_str(),
                    r.since.0,
                    r.deadline.map(|t| t.0)
                ])?;
            }
            RetainOp::Delete(session) => {
                c.prepare_cached(
                    "DELETE FROM retained_sessions WHERE group_num = ?1 AND session = ?2",
                )?
                .execute(params![num, session.as_str()])?;
            }
        }
    }
    Ok(())
}

/// The retained sessions of group `num`, each with whether its session is
/// still recorded open (one that ended meanwhile is not retained any more).
fn load(c: &Connection, num: i64) -> Result<Vec<(SessionId, Retained, bool)>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT r.session, r.resource, r.disconnected_at, r.deadline,
                EXISTS (SELECT 1 FROM sessions s WHERE s.resource = r.resource
                        AND s.session = r.session AND s.ended_at IS NULL)
         FROM retained_sessions r WHERE r.group_num = ?1
         ORDER BY r.disconnected_at, r.session",
    )?;
    let rows = stmt
        .query_map([num], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, bool>(4)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let corrupt = |e: String| StoreError::Corrupt(format!("retained session: {e}"));
    rows.into_iter()
        .map(|(session, resource, since, deadline, open)| {
            Ok((
                SessionId::new(session).map_err(|e| corrupt(e.to_string()))?,
                Retained {
                    resource: ResourceId::new(resource).map_err(|e| corrupt(e.to_string()))?,
                    since: UnixMillis(since),
                    deadline: deadline.map(UnixMillis),
                },
                open,
            ))
        })
        .collect()
}

impl Actor {
    /// The record changes of the retained sessions changed since the last
    /// commit.
    pub(super) fn retention_ops(&mut self) -> Vec<RetainOp> {
        std::mem::take(&mut self.routing.retained_dirty)
            .into_iter()
            .map(|session| match self.routing.retained.get(&session) {
                Some(r) => RetainOp::Upsert(session, r.clone()),
                None => RetainOp::Delete(session),
            })
            .collect()
    }

    /// Reloads the retained sessions of an earlier broker run (actor start).
    /// A deadline already past ends its session at the next timer, stamped
    /// with the deadline.
    pub(super) async fn restore_retained(&mut self) -> Result<(), ActorError> {
        let num = self.row.num;
        let stored = self.shared.store.read_with(move |c| load(c, num)).await?;
        let (stored, ended): (Vec<_>, Vec<_>) = stored.into_iter().partition(|(_, _, open)| *open);
        // Rows of sessions that ended meanwhile go.
        self.routing
            .retained_dirty
            .extend(ended.into_iter().map(|(session, _, _)| session));
        if stored.is_empty() {
            return Ok(());
        }
        let n = stored.len();
        for (session, r, _) in stored {
            self.retain(session, r);
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
