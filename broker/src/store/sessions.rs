//! The door to the sessions and resources agents report: registrations, the
//! recorded session events of each spool, the sessions and resources as
//! recorded, and the ends the broker decides itself.
//!
//! Recording a session event and advancing its spool's `last_seq` happen in
//! the same transaction, and the writer decides duplicate / next / gap against
//! the committed `last_seq` itself, so no interleaving of connections can
//! record an event twice or skip one. The hot path (register, record) runs as
//! the writer's own operations; everything else through [`Store::exec`] and
//! the read connection.
//!
//! Rules where the spec is silent:
//! - Sequence numbers are per `(resource, spool_id)`. An agent whose state
//!   directory was wiped starts a new spool; at its registration the
//!   sessions the host no longer reports are ended ([`RECONCILE_REASON`]).
//!   If the host's own `Ended` arrives later, it replaces that end time and
//!   reason.
//! - A session id names one session on a host: a start of an id that
//!   already ended on that host is recorded as a refused event
//!   (`session_events.reason` = [`REUSED_ID_REASON`]) and acknowledged like
//!   any other, the ended session's record stays as it was, and the start is
//!   not handed to the group.
//! - Ends the broker decides (a retention that ran out, a host gone for
//!   good: [`end_session_by_broker`]) are `sessions.reconciled = 2`: a later
//!   report of the host does not move them, an earlier one does.
//! - A resource's `last_seen` is written when its link ends, so `resources
//!   list` shows when a gone host was last heard from.

use crate::store::sql::{args, Db};
use ferry_common::wire::{EndReason, HostFacts, SequencedEvent, SessionEvent};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis, UserId};

use super::{parse_id, spool_key, to_i64, to_u64, Store, StoreError};

/// End reason written when a reconnecting host no longer has a session the
/// broker thought open.
pub const RECONCILE_REASON: &str = "not on host at reconnect";

/// `reason` of a `started` row of `session_events` whose session was
/// refused: the host reused the id of a session that had ended there.
pub const REUSED_ID_REASON: &str = "refused: the session id already ended on this host";

/// `sessions.reconciled` of an end the broker inferred when the host
/// reconnected without the session: the host's own end replaces it.
const END_INFERRED: i64 = 1;

/// `sessions.reconciled` of an end the broker decided (a retention that ran
/// out, a host gone for good): metering stopped there, so only an earlier
/// end reported by the host replaces it.
const END_BY_BROKER: i64 = 2;

/// `sessions.reconciled` of an end inferred at a reconnect ([`END_INFERRED`])
/// after which the host reused the id (refused): a later end of that id is
/// the refused session's and leaves this record alone.
const END_INFERRED_THEN_REUSED: i64 = 3;

/// Ends the open session `session` on `resource` at `at` because the broker
/// decided so (see [`END_BY_BROKER`]); inside a caller's transaction.
/// Returns whether a session was open.
pub(crate) fn end_session_by_broker(
    c: &Db,
    resource: &ResourceId,
    session: &SessionId,
    at: UnixMillis,
    reason: &str,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE sessions SET ended_at = MAX(started_at, ?1), end_reason = ?2, reconciled = ?3
             WHERE resource = ?4 AND session = ?5 AND ended_at IS NULL",
        args![
            at.0,
            reason,
            END_BY_BROKER,
            resource.as_str(),
            session.as_str()
        ],
    )?;
    Ok(n > 0)
}

/// An agent's registration, as recorded from its `Hello`.
#[derive(Clone, Debug)]
pub struct Registration {
    pub resource: ResourceId,
    pub group: Option<GroupName>,
    pub agent_version: String,
    pub image_version: String,
    pub host: HostFacts,
    /// The agent's spool, whose last recorded seq is returned.
    pub spool_id: u64,
    /// Sessions open on the host; open sessions recorded for the resource and
    /// missing here are ended with [`RECONCILE_REASON`].
    pub open_sessions: Vec<SessionId>,
    /// Broker clock.
    pub now: UnixMillis,
}

/// What recording a registration did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    /// Highest seq recorded for (resource, spool); 0 for a new spool.
    pub last_recorded_seq: u64,
    /// Sessions ended by reconciliation.
    pub ended: Vec<SessionId>,
    /// Sessions recorded open on the resource afterwards: what its group
    /// counts. A session the host still has but the broker ended (its
    /// retention ran out, its host was gone) is not among them.
    pub open: Vec<SessionId>,
}

/// A sequence number that skips ahead of what is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SequenceGap {
    pub got: u64,
    pub expected: u64,
}

/// What recording a run of events of one spool did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordOutcome {
    /// Highest seq recorded for the spool after this write: everything up to
    /// it is durable and may be acknowledged.
    pub last_seq: u64,
    /// Events newly recorded.
    pub recorded: usize,
    /// Events already recorded before (not recorded again).
    pub duplicates: usize,
    /// Set when an event skipped ahead; it and the events after it were not recorded.
    pub gap: Option<SequenceGap>,
    /// Seqs of `Started` events recorded in the event log but refused as
    /// sessions: the host reused the id of a session that already ended
    /// there. The ended session's record is kept as it was; the events are
    /// acknowledged like any other (the agent must not be stuck on them).
    pub refused: Vec<u64>,
}

/// A resource as recorded (its live state is the registry's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResource {
    pub resource: ResourceId,
    pub group: Option<GroupName>,
    pub agent_version: String,
    pub image_version: String,
    pub host: HostFacts,
    /// Broker clock of the last registration.
    pub last_seen: UnixMillis,
    /// Sessions recorded open on it.
    pub open_sessions: u64,
}

/// A session as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSession {
    pub session: SessionId,
    pub resource: ResourceId,
    pub user: UserId,
    pub started_at: UnixMillis,
    pub ended_at: Option<UnixMillis>,
    pub end_reason: Option<String>,
}

/// Broker-wide counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreCounts {
    pub resources: u64,
    pub open_sessions: u64,
    pub events_recorded: u64,
}

/// How an end reason is written in the store and shown to operators.
pub fn end_reason_text(reason: &EndReason) -> String {
    end_reason_str(reason).to_owned()
}

/// [`end_reason_text`] without the copy (the writer's hot path).
pub(super) fn end_reason_str(reason: &EndReason) -> &str {
    match reason {
        EndReason::Logout => "logout",
        EndReason::Disconnected => "disconnected",
        EndReason::HostShutdown => "host shutdown",
        EndReason::Other(s) => s,
        EndReason::MaxSessionDuration => "max session duration",
        EndReason::Idle => "idle",
    }
}

pub(super) fn read_last_seq(c: &Db, resource: &str, spool: i64) -> Result<u64, StoreError> {
    let v: Option<i64> = c.query_opt(
        "SELECT last_seq FROM spools WHERE resource = ?1 AND spool_id = ?2",
        args![resource, spool],
    )?;
    to_u64(v.unwrap_or(0), "last_seq")
}

pub(super) fn apply_register(c: &Db, reg: &Registration) -> Result<Registered, StoreError> {
    let resource = reg.resource.as_str();
    c.execute(
        "INSERT INTO resources (resource, grp, agent_version, image_version, hostname, os,
                                kernel, vcpus, memory_bytes, first_seen, last_seen)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)
         ON CONFLICT (resource) DO UPDATE SET
            grp = excluded.grp, agent_version = excluded.agent_version,
            image_version = excluded.image_version, hostname = excluded.hostname,
            os = excluded.os, kernel = excluded.kernel, vcpus = excluded.vcpus,
            memory_bytes = excluded.memory_bytes, last_seen = excluded.last_seen",
        args![
            resource,
            reg.group.as_ref().map(|g| g.as_str()),
            reg.agent_version,
            reg.image_version,
            reg.host.hostname,
            reg.host.os,
            reg.host.kernel,
            i64::from(reg.host.vcpus),
            to_i64(reg.host.memory_bytes, "memory_bytes")?,
            reg.now.0,
        ],
    )?;
    let last_recorded_seq = read_last_seq(c, resource, spool_key(reg.spool_id))?;

    let open: Vec<String> = {
        c.query(
            "SELECT session FROM sessions WHERE resource = ?1 AND ended_at IS NULL",
            args![resource],
        )?
    };
    let mut ended = Vec::new();
    let mut still_open = Vec::new();
    for session in open {
        if reg.open_sessions.iter().any(|s| s.as_str() == session) {
            still_open.push(parse_id(session, "session")?);
            continue;
        }
        c.execute(
            "UPDATE sessions SET ended_at = ?1, end_reason = ?2, reconciled = ?5
             WHERE resource = ?3 AND session = ?4 AND ended_at IS NULL",
            args![reg.now.0, RECONCILE_REASON, resource, session, END_INFERRED],
        )?;
        ended.push(parse_id(session, "session")?);
    }
    still_open.sort();
    Ok(Registered {
        last_recorded_seq,
        ended,
        open: still_open,
    })
}

/// Records `events` of one spool; `known_last` is the spool's `last_seq` in
/// this transaction when the batch already read or wrote it.
pub(super) fn apply_record(
    c: &Db,
    resource: &ResourceId,
    spool_id: u64,
    known_last: Option<u64>,
    events: &[SequencedEvent],
    recorded_at: UnixMillis,
) -> Result<RecordOutcome, StoreError> {
    let w = SpoolWriter {
        c,
        res: resource.as_str(),
        spool: spool_key(spool_id),
        recorded_at,
    };
    let last = match known_last {
        Some(v) => v,
        None => read_last_seq(c, w.res, w.spool)?,
    };
    let mut out = RecordOutcome {
        last_seq: last,
        recorded: 0,
        duplicates: 0,
        gap: None,
        refused: Vec::new(),
    };
    for ev in events {
        if ev.seq <= out.last_seq {
            out.duplicates += 1;
            continue;
        }
        if ev.seq != out.last_seq + 1 {
            out.gap = Some(SequenceGap {
                got: ev.seq,
                expected: out.last_seq + 1,
            });
            break;
        }
        let seq = to_i64(ev.seq, "seq")?;
        match &ev.event {
            SessionEvent::Started { session, user, at } => {
                if w.started(seq, session, user, *at)? {
                    out.refused.push(ev.seq);
                }
            }
            SessionEvent::Ended {
                session,
                at,
                reason,
            } => w.ended(seq, session, *at, end_reason_str(reason))?,
        }
        out.last_seq = ev.seq;
        out.recorded += 1;
    }
    if out.last_seq != last {
        w.save_last_seq(out.last_seq)?;
    }
    Ok(out)
}

/// Where one spool's events are recorded: the transaction's connection,
/// the resource and spool, and when the batch was received.
struct SpoolWriter<'a> {
    c: &'a Db,
    res: &'a str,
    spool: i64,
    recorded_at: UnixMillis,
}

impl SpoolWriter<'_> {
    /// Records a `started` event and opens its session; returns whether the
    /// session was refused because the host reused the id of one that ended.
    fn started(
        &self,
        seq: i64,
        session: &SessionId,
        user: &UserId,
        at: UnixMillis,
    ) -> Result<bool, StoreError> {
        let (c, res) = (self.c, self.res);
        // The newest record of this id on this host: none (a new
        // session), open (a replay after the broker reconciled: the
        // open row stands) or ended (the id is reused: refused).
        let newest: Option<(i64, bool, i64)> = c.query_opt(
            "SELECT id, ended_at IS NULL, reconciled FROM sessions
             WHERE resource = ?1 AND session = ?2 ORDER BY id DESC LIMIT 1",
            args![res, session.as_str()],
        )?;
        let reused = matches!(newest, Some((_, false, _)));
        c.execute(
            "INSERT INTO session_events
                        (resource, spool_id, seq, kind, session, user, at, recorded_at, reason)
                     VALUES (?1, ?2, ?3, 'started', ?4, ?5, ?6, ?7, ?8)",
            args![
                res,
                self.spool,
                seq,
                session.as_str(),
                user.as_str(),
                at.0,
                self.recorded_at.0,
                reused.then_some(REUSED_ID_REASON)
            ],
        )?;
        match newest {
            None => {
                c.execute(
                    "INSERT INTO sessions (resource, session, user, started_at)
                             VALUES (?1, ?2, ?3, ?4)",
                    args![res, session.as_str(), user.as_str(), at.0],
                )?;
                Ok(false)
            }
            Some((_, true, _)) => Ok(false),
            Some((id, false, reconciled)) => {
                if reconciled == END_INFERRED {
                    // The reused id's own end must not replace the
                    // end the broker inferred (see `ended`).
                    c.execute(
                        "UPDATE sessions SET reconciled = ?1 WHERE id = ?2",
                        args![END_INFERRED_THEN_REUSED, id],
                    )?;
                }
                Ok(true)
            }
        }
    }

    /// Records an `ended` event and ends its session when this end is the
    /// one that counts.
    fn ended(
        &self,
        seq: i64,
        session: &SessionId,
        at: UnixMillis,
        reason: &str,
    ) -> Result<(), StoreError> {
        let (c, res) = (self.c, self.res);
        c.execute(
            "INSERT INTO session_events
                        (resource, spool_id, seq, kind, session, at, recorded_at, reason)
                     VALUES (?1, ?2, ?3, 'ended', ?4, ?5, ?6, ?7)",
            args![
                res,
                self.spool,
                seq,
                session.as_str(),
                at.0,
                self.recorded_at.0,
                reason
            ],
        )?;
        // The host's own end beats an end the broker inferred at a
        // reconnect (metering wants the real end time), and an end
        // the broker decided when it is earlier (it happened first).
        // Not once an inferred end's id was reused
        // (`END_INFERRED_THEN_REUSED`): this end is then the refused
        // session's.
        c.execute(
            "UPDATE sessions SET ended_at = ?1, end_reason = ?2, reconciled = 0
                     WHERE id = (SELECT id FROM sessions
                                 WHERE resource = ?3 AND session = ?4
                                   AND (ended_at IS NULL OR reconciled = ?5
                                        OR (reconciled = ?6 AND ended_at > ?1))
                                 ORDER BY id DESC LIMIT 1)",
            args![
                at.0,
                reason,
                res,
                session.as_str(),
                END_INFERRED,
                END_BY_BROKER
            ],
        )?;
        Ok(())
    }

    /// Advances the spool's `last_seq`.
    fn save_last_seq(&self, last_seq: u64) -> Result<(), StoreError> {
        self.c.execute(
            "INSERT INTO spools (resource, spool_id, last_seq) VALUES (?1, ?2, ?3)
             ON CONFLICT (resource, spool_id) DO UPDATE SET last_seq = excluded.last_seq",
            args![self.res, self.spool, to_i64(last_seq, "seq")?],
        )?;
        Ok(())
    }
}

impl Store {
    /// Broker-wide counts.
    pub async fn counts(&self) -> Result<StoreCounts, StoreError> {
        self.read(|c| {
            let n = |sql: &str| -> Result<u64, StoreError> {
                to_u64(c.query_one(sql, args![])?, "count")
            };
            Ok(StoreCounts {
                resources: n("SELECT COUNT(*) FROM resources")?,
                open_sessions: n("SELECT COUNT(*) FROM sessions WHERE ended_at IS NULL")?,
                events_recorded: n("SELECT COUNT(*) FROM session_events")?,
            })
        })
        .await
    }

    /// Records what a registered resource runs, from its agent's latest
    /// `Inventory` (an image switch or update it confirmed), so a host that
    /// goes away afterwards is shown with it, not with its last `Hello`'s.
    pub async fn record_versions(
        &self,
        resource: &ResourceId,
        agent_version: String,
        image_version: String,
    ) -> Result<(), StoreError> {
        let resource = resource.to_string();
        self.exec(move |c| {
            c.execute(
                "UPDATE resources SET agent_version = ?2, image_version = ?3 WHERE resource = ?1",
                args![resource, agent_version, image_version],
            )?;
            Ok(())
        })
        .await
    }

    /// Every registered resource, by id.
    pub async fn resources(&self) -> Result<Vec<StoredResource>, StoreError> {
        self.read(|c| {
            let rows = c.query::<(
                String,
                Option<String>,
                String,
                String,
                String,
                String,
                String,
                i64,
                i64,
                i64,
                i64,
            )>(
                "SELECT r.resource, r.grp, r.agent_version, r.image_version, r.hostname, r.os,
                        r.kernel, r.vcpus, r.memory_bytes, r.last_seen,
                        (SELECT COUNT(*) FROM sessions s
                          WHERE s.resource = r.resource AND s.ended_at IS NULL)
                 FROM resources r ORDER BY r.resource",
                args![],
            )?;
            let mut out = Vec::new();
            for (res, grp, av, iv, hostname, os, kernel, vcpus, mem, seen, open) in rows {
                out.push(StoredResource {
                    resource: parse_id(res, "resource")?,
                    group: grp.map(|g| parse_id(g, "group")).transpose()?,
                    agent_version: av,
                    image_version: iv,
                    host: HostFacts {
                        hostname,
                        os,
                        kernel,
                        vcpus: u32::try_from(vcpus)
                            .map_err(|_| StoreError::Corrupt("vcpus".into()))?,
                        memory_bytes: to_u64(mem, "memory_bytes")?,
                    },
                    last_seen: UnixMillis(seen),
                    open_sessions: to_u64(open, "count")?,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Sessions by start time; only open ones unless `all`.
    pub async fn sessions(&self, all: bool) -> Result<Vec<StoredSession>, StoreError> {
        self.read(move |c| {
            let sql = if all {
                "SELECT session, resource, user, started_at, ended_at, end_reason
                 FROM sessions ORDER BY started_at, id"
            } else {
                "SELECT session, resource, user, started_at, ended_at, end_reason
                 FROM sessions WHERE ended_at IS NULL ORDER BY started_at, id"
            };
            let rows = c.query::<(String, String, String, i64, Option<i64>, Option<String>)>(
                sql,
                args![],
            )?;
            let mut out = Vec::new();
            for (session, resource, user, started, ended, reason) in rows {
                out.push(StoredSession {
                    session: parse_id(session, "session")?,
                    resource: parse_id(resource, "resource")?,
                    user: parse_id(user, "user")?,
                    started_at: UnixMillis(started),
                    ended_at: ended.map(UnixMillis),
                    end_reason: reason,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Records when the broker last heard from `resource` (its link ended):
    /// what `resources list` shows and how long a gone host is counted from.
    pub async fn record_last_seen(
        &self,
        resource: &ResourceId,
        at: UnixMillis,
    ) -> Result<(), StoreError> {
        let resource = resource.to_string();
        self.exec(move |c| {
            c.execute(
                "UPDATE resources SET last_seen = MAX(last_seen, ?2) WHERE resource = ?1",
                args![resource, at.0],
            )?;
            Ok(())
        })
        .await
    }

    /// What `resource`'s agent reported of its host at its last
    /// registration; `None` when it never registered.
    pub async fn host_facts(&self, resource: &ResourceId) -> Result<Option<HostFacts>, StoreError> {
        let key = resource.to_string();
        self.read_with(move |c| {
            let row = c.query_opt::<(String, String, String, i64, i64)>(
                "SELECT hostname, os, kernel, vcpus, memory_bytes FROM resources
                 WHERE resource = ?1",
                args![key],
            )?;
            row.map(|(hostname, os, kernel, vcpus, memory)| {
                Ok(HostFacts {
                    hostname,
                    os,
                    kernel,
                    vcpus: u32::try_from(vcpus)
                        .map_err(|_| StoreError::Corrupt(format!("vcpus {vcpus}")))?,
                    memory_bytes: to_u64(memory, "memory_bytes")?,
                })
            })
            .transpose()
        })
        .await
    }

    /// Sessions recorded open on `resource`, in id order.
    pub async fn open_sessions_of(
        &self,
        resource: &ResourceId,
    ) -> Result<Vec<SessionId>, StoreError> {
        let resource = resource.to_string();
        self.read(move |c| {
            let rows: Vec<String> = c.query(
                "SELECT session FROM sessions WHERE resource = ?1 AND ended_at IS NULL
                 ORDER BY session",
                args![resource],
            )?;
            rows.into_iter().map(|r| parse_id(r, "session")).collect()
        })
        .await
    }

    /// Resources on which `session` is recorded open (normally zero or one).
    pub async fn open_session_hosts(
        &self,
        session: &SessionId,
    ) -> Result<Vec<ResourceId>, StoreError> {
        let session = session.to_string();
        self.read(move |c| {
            let rows: Vec<String> = c.query(
                "SELECT resource FROM sessions INDEXED BY sessions_open
                 WHERE session = ?1 AND ended_at IS NULL ORDER BY resource",
                args![session],
            )?;
            rows.into_iter().map(|r| parse_id(r, "resource")).collect()
        })
        .await
    }

    /// Highest seq recorded for (resource, spool); 0 when none.
    pub async fn last_recorded_seq(
        &self,
        resource: &ResourceId,
        spool_id: u64,
    ) -> Result<u64, StoreError> {
        let resource = resource.to_string();
        self.read(move |c| {
            let v: Option<i64> = c.query_opt(
                "SELECT last_seq FROM spools WHERE resource = ?1 AND spool_id = ?2",
                args![resource, spool_key(spool_id)],
            )?;
            to_u64(v.unwrap_or(0), "last_seq")
        })
        .await
    }

    /// Number of recorded events of (resource, spool) with this seq (0 or 1).
    pub async fn event_count(
        &self,
        resource: &ResourceId,
        spool_id: u64,
        seq: u64,
    ) -> Result<u64, StoreError> {
        let resource = resource.to_string();
        let seq = to_i64(seq, "seq")?;
        self.read(move |c| {
            let n: i64 = c.query_one(
                "SELECT COUNT(*) FROM session_events
                 WHERE resource = ?1 AND spool_id = ?2 AND seq = ?3",
                args![resource, spool_key(spool_id), seq],
            )?;
            to_u64(n, "count")
        })
        .await
    }
}
