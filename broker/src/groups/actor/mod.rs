//! One task per live delivery group, owning its [`Group`] (the engine).
//!
//! The engine is pure; this actor is its only owner in the live broker. Agent
//! reports (joins, availability, session starts and ends) arrive through a
//! bounded inbox after the store has committed them; each is fed to the engine
//! with the time of the groups' [`Clock`] (the wall clock, or a test's manual
//! clock), and every decision that follows is written to
//! the group's events with its reason before the sender is answered. Timers
//! come from [`Group::poll_deadline`]: the actor sleeps until the next one and
//! calls [`Group::handle_timeout`].
//!
//! Resources. The engine names base resources `b1..bN` and elastic ones `e1,
//! e2, ...`; the actor maps them to real resources. An agent whose `Hello`
//! names the group takes the first free base slot (up to the group's base
//! count; a further one is flagged in the events and not used). It joins
//! whenever the group's actor is there: at once, or when the group is
//! published or the broker restarts (the registry keeps each connection's
//! group and streaming address, and a starting actor takes in the agents
//! already connected). Elastic ids are made group-unique as `<group>-e1`:
//! without a provisioner an agent whose certificate names that id and whose
//! `Hello` names the group completes the creation, and an elastic host
//! already connected takes its slot when a scale-out asks for its id. A
//! scale-in sends `Drain` to the agent; the agent disconnecting afterwards
//! counts as the release (a host being removed goes away; nothing else tells
//! the broker it is gone). A session started for a user the broker does not
//! know counts like any other and is recorded as an `unknown-user` event.
//!
//! Host size. A joining agent's reported host facts (stored with its
//! registration) are checked against the group's spec
//! ([`super::hostfit`]); a smaller host is flagged in the events and in the
//! view, and still used: operators decide.
//!
//! Lifecycle. The group's status follows [`GroupActors::follow_lifecycle`].
//! `expired` closes the actor (a group-level state, chosen over marking
//! every resource unavailable in the engine because the engine would then
//! see demand with no capacity and scale out): the engine is frozen, every
//! resource shows unavailable, and each open session, and any started
//! afterwards, gets `Command::DisconnectSession` through the registry, its
//! outcome (failures too) written to the group's events. A renewal reopens
//! it: the engine learns the sessions that ended or began meanwhile and the
//! agents' availability. `recycling` and `gone` stop the actor and close its
//! metering intervals; its elastic hosts are then deleted through the
//! provisioner (`elastic::retire`).
//!
//! Policy. The group's policy goes to its agents as `Command::ApplyPolicy`
//! with the group's policy version: to every joined, connected agent when
//! an update-policy raises the version, and to an agent that (re)joins with
//! an older applied version than the group's (read from `resource_policy`).
//! Each push runs in its own tracked task (the `policy_push` child); an
//! acknowledgement is committed to `resource_policy` (the newest version
//! wins) with a `policy-applied` event, a failure or timeout becomes a
//! `policy-failed` event and is tried again with backoff while the agent
//! stays connected, and the next join of that agent tries again too.
//!
//! What is not kept across a broker restart: the binding of agents to base
//! slots (agents re-join when they reconnect, and their open sessions come
//! back with their `Hello`). Elastic resources are kept (issue 6, see
//! [`elastic`]): a restarted actor rebuilds its engine with the
//! pending, ready and releasing ones of the store, numbering continues, a
//! ready one keeps its open billing interval and its agent finds its slot
//! when it reconnects.
//!
//! Ownership. [`GroupActors`] is built once by the daemon and holds what the
//! actors need: the store (everything the actor records goes through the
//! store's group-live door, one commit per turn), the registry (to reach
//! agents; the registry does not point back), the provisioning and the
//! rollout board. Nothing here points back at the admin side: the groups
//! facade calls in. The child modules work on the actor's state: `routing`
//! (reservations, the waiting room, retained sessions), [`elastic`] and
//! `base` (provisioned resources), `payment`, `connections` (stale reports),
//! `disconnects` and `retention` (what survives a restart), `gone` (hosts
//! that stay away) and `policy_push`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use ferry_common::wire::SessionEvent;
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::RETRY_AFTER_ERROR;
use crate::engine::{Class, EngineError, Group, Input, Policy, ResourceState};
use crate::store::{BrokerEnd, GroupRecord, IntervalOp, Store, StoreError};
use elastic::Elastic;

mod actors;
pub mod elastic;
mod routing;
// Who belongs to the group: joins, adoption, host size, unknown users.
mod membership;
// Closed, reopened, updating: the group's status applied.
mod status;
// Session reports and ends the broker decides.
mod sessions;
// The engine's decisions carried out, and the commit of a turn.
mod decisions;
use actors::Shared;
pub use actors::{ActorsParts, GroupActors};
// Base resources created through the provisioner (publishing).
mod base;
// No scale-out while payment-overdue.
mod payment;
// The connection that speaks for each resource (stale reports ignored).
mod connections;
// Expiry disconnects kept across restarts, and their cap.
mod disconnects;
// Retained sessions kept across restarts.
mod retention;
// Hosts that stay away: their sessions end.
mod gone;
pub use routing::{Placement, RouteAsk, RouteProgress, RESERVATION_TTL};
// The policy sent to each agent, tried again while it fails.
mod policy_push;

/// Messages waiting for one group's actor. Senders wait when it is full, so
/// a burst of agent events slows the agents' acknowledgements instead of
/// growing memory.
pub const GROUP_INBOX_LEN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("group {0}: {1}")]
    Engine(GroupName, EngineError),
    #[error("group {0} has no running actor")]
    NotRunning(String),
}

/// One resource as the actor shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceView {
    /// The real resource id (`b3` when no agent is bound to that base slot yet).
    pub resource: ResourceId,
    /// Base or elastic.
    pub class: Class,
    /// Lifecycle state in the engine.
    pub state: ResourceState,
    /// Whether it takes sessions (connected, healthy, not draining).
    pub available: bool,
    /// Sessions on it.
    pub occupancy: u32,
    /// The sessions on it, as the actor knows them from the agent's reports.
    pub sessions: Vec<SessionId>,
    /// Why it is flagged (its host is below the group's spec), if it is.
    pub flagged: Option<String>,
}

/// What a group's actor holds now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupView {
    /// The group.
    pub group: GroupName,
    /// Every resource ever in the group, in creation order.
    pub resources: Vec<ResourceView>,
    /// The engine's next deadline (`None` while closed: the engine is frozen).
    pub deadline: Option<UnixMillis>,
    /// The group is expired: no new sessions, open ones are disconnected.
    pub closed: bool,
    /// Sessions plus waiting requests (SPEC: demand).
    pub demand: u64,
    /// Session slots of the resources counted in capacity.
    pub capacity: u64,
    /// Sessions per resource (policy).
    pub concurrent_sessions: u32,
    /// Scale-out threshold in percent (policy).
    pub usage_threshold: u32,
    /// Every flag the group raised: one line per agent, naming it and why.
    pub flagged: Vec<String>,
    /// Real resources joined to the group (bound to a base slot or an
    /// elastic id), connected or not, sorted.
    pub joined: Vec<ResourceId>,
    /// The group's policy version the actor pushes.
    pub policy_version: u64,
    /// Sessions whose user disconnected, kept for a reconnect: (session,
    /// disconnected at, retained until; `None` = forever), sorted.
    pub retained: Vec<(SessionId, UnixMillis, Option<UnixMillis>)>,
}

/// What an actor is asked to do. Every variant carries a reply sent once the
/// input is applied and its decisions are committed to the store.
pub(super) enum Msg {
    /// A provisioning task's outcome (issue 6, [`elastic`]).
    Elastic(elastic::Report),
    /// An expiry disconnect's outcome ([`Actor::disconnect`]).
    Disconnect(DisconnectReport),
    /// An agent naming the group registered, with the sessions its host has.
    /// `conn`: its connection's id ([`connections`]).
    Joined {
        resource: ResourceId,
        conn: Option<u64>,
        sessions: Vec<SessionId>,
        reply: oneshot::Sender<()>,
    },
    /// The agent's connection `conn` ended.
    Left {
        resource: ResourceId,
        conn: Option<u64>,
        reply: oneshot::Sender<()>,
    },
    /// The agent went silent or started draining (false), or is healthy and
    /// not draining again (true); `conn`: reported by that connection.
    Availability {
        resource: ResourceId,
        conn: Option<u64>,
        available: bool,
        /// Why its health changed, recorded as an event (`None`: a change
        /// not worth one, e.g. the agent's own drain state).
        why: Option<String>,
        reply: oneshot::Sender<()>,
    },
    /// Session events committed to the store, in order.
    Sessions {
        resource: ResourceId,
        events: Vec<SessionEvent>,
        reply: oneshot::Sender<()>,
    },
    /// The group's row changed (policy); reread it.
    Reload { reply: oneshot::Sender<()> },
    /// Handle the deadlines due at the clock's now.
    Tick { reply: oneshot::Sender<()> },
    /// A copy of the state, for status pages and tests.
    View { reply: oneshot::Sender<GroupView> },
    /// An end user asks for a session ([`routing`]).
    Route {
        ask: RouteAsk,
        reply: mpsc::Sender<RouteProgress>,
    },
    /// A route request's client went away.
    CancelRoute {
        session: SessionId,
        reply: oneshot::Sender<()>,
    },
    /// Where a resource's streaming server is reached.
    Streaming {
        resource: ResourceId,
        target: crate::registry::StreamingTarget,
        reply: oneshot::Sender<()>,
    },
    /// A session's user disconnected or reconnected.
    Presence {
        resource: ResourceId,
        report: ferry_common::wire::PresenceReport,
        reply: oneshot::Sender<()>,
    },
}

/// A group's row, as the actor needs it.
#[derive(Clone, Debug)]
struct GroupRow {
    num: i64,
    name: GroupName,
    spec: String,
    base: u32,
    policy: Policy,
    status: String,
    /// `subscription` or `pay-as-you-go`, written on each resource interval.
    billing: String,
    /// Version of `policy`, pushed to agents with it.
    policy_version: u64,
    /// Session and display parts stored beside `policy` (issue 7).
    parts: super::policy_parts::PolicyParts,
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

impl GroupRow {
    /// What the actor needs of a stored row, its policy parsed.
    fn from_record(r: GroupRecord) -> Result<GroupRow, StoreError> {
        Ok(GroupRow {
            num: r.num,
            name: r.name,
            spec: r.spec,
            base: r.base_resources,
            parts: super::policy_parts::PolicyParts::from_stored(&r.policy).map_err(corrupt)?,
            policy: serde_json::from_str(&r.policy).map_err(corrupt)?,
            status: r.status,
            billing: r.billing,
            policy_version: r.policy_version,
        })
    }
}

/// The live (not gone) group named `group` (a name or an id).
async fn load_row(store: &Store, group: &str) -> Result<Option<GroupRow>, StoreError> {
    store
        .live_group(group)
        .await?
        .map(GroupRow::from_record)
        .transpose()
}

/// The policy as agents receive it: every part, canonical JSON (see
/// [`super::policy_parts`]).
pub use super::policy_parts::policy_document;

/// Whether a group in this status has live state to own. A group that failed
/// to publish has no resources; a recycling one is having its resources
/// reclaimed (they are released when it starts); a gone one has nothing.
fn is_live(status: &str) -> bool {
    !matches!(status, "gone" | "publish-failed" | "recycling")
}

/// When to try again after a failure at `now`.
fn retry_at(now: UnixMillis) -> UnixMillis {
    let ms = i64::try_from(RETRY_AFTER_ERROR.as_millis()).unwrap_or(i64::MAX);
    UnixMillis(now.0.saturating_add(ms))
}

/// The status in which a group's actor is closed: no new sessions, its open
/// ones disconnected (SPEC section 3).
const CLOSED_STATUS: &str = "expired";

/// Wait after the first failed expiry disconnect of a session, in ms;
/// doubled after each further failure, up to [`DISCONNECT_RETRY_MAX_MS`].
const DISCONNECT_RETRY_FIRST_MS: i64 = 5_000;
/// Longest wait between two disconnect attempts of a session: 5 min.
const DISCONNECT_RETRY_MAX_MS: i64 = 300_000;

/// Wait after the `attempt`th failed disconnect: 5 s, 10 s, 20 s, ... 5 min.
fn disconnect_backoff(attempt: u32) -> i64 {
    let doublings = attempt.saturating_sub(1).min(16);
    DISCONNECT_RETRY_FIRST_MS
        .saturating_mul(1_i64 << doublings)
        .min(DISCONNECT_RETRY_MAX_MS)
}

/// The outcome of one expiry disconnect attempt, reported to the actor.
pub(super) struct DisconnectReport {
    resource: ResourceId,
    session: SessionId,
    /// 1 for the first attempt.
    attempt: u32,
    /// `Err` with why it failed (the agent's answer, or no answer).
    outcome: Result<(), String>,
}

/// A session of an expired group whose disconnect is not confirmed yet.
struct PendingDisconnect {
    /// Attempts made, the one in flight included.
    attempts: u32,
    /// When the next attempt is due; `None` while one is in flight.
    due: Option<UnixMillis>,
    /// When the first attempt was made (the cap runs from it, [`disconnects`]).
    first_at: UnixMillis,
    /// Reloaded after a broker restart: until its host re-joins, the
    /// session counts as open ([`disconnects`]).
    restored: bool,
}

/// An expired group's disconnects: each attempt runs in its own task and
/// reports its outcome to the actor's inbox; failed ones wait for their
/// deadline on the actor's timer (no polling).
struct Disconnects {
    /// By (real resource, session).
    pending: BTreeMap<(ResourceId, SessionId), PendingDisconnect>,
    /// The actor's inbox (weak: the actor's handle owns it).
    actor: mpsc::WeakSender<Msg>,
    /// Keys of `pending` to write with the next commit ([`disconnects`]).
    dirty: disconnects::Dirty,
}

impl Disconnects {
    /// The earliest retry due.
    fn next_due(&self) -> Option<UnixMillis> {
        self.pending.values().filter_map(|p| p.due).min()
    }
}

/// What a turn still owes after its message was handled.
enum After {
    /// Nothing: answered, nothing to write.
    Answered,
    /// The commit, then the answer.
    Commit(oneshot::Sender<()>),
    /// The commit, a finished publish settled (which may stop the actor),
    /// then the answer if one is owed.
    Settle(Option<oneshot::Sender<()>>),
}

/// The state one actor task owns.
struct Actor {
    /// The group's row as last read.
    row: GroupRow,
    /// The rules.
    engine: Group,
    /// Latest time given to the engine; a wall clock stepping back is held here.
    last_now: i64,
    /// Base slot `b{i+1}` -> the agent bound to it.
    slots: Vec<Option<ResourceId>>,
    /// Real resource id -> engine id (bound base slots and joined elastic ids).
    to_engine: HashMap<ResourceId, ResourceId>,
    /// Engine id -> real resource id.
    from_engine: HashMap<ResourceId, ResourceId>,
    /// Sessions the engine holds, per engine resource id, to reconcile a
    /// re-joining host's list.
    sessions: HashMap<ResourceId, BTreeSet<SessionId>>,
    /// Reports about other hosts' sessions ignored this run, per reporting
    /// host: the first few are recorded, the rest only counted.
    ignored_reports: HashMap<ResourceId, u32>,
    /// Agents flagged, with why: not used (beyond the base count, unknown
    /// elastic id) or a host below the group's spec. Kept so a reconnecting
    /// one is flagged once, and for `group show`.
    flagged: BTreeMap<ResourceId, String>,
    /// The flagged agents that are not used: their flag goes when they are
    /// taken in or leave.
    unused: BTreeSet<ResourceId>,
    /// The newest flag recorded for a resource by an earlier run of the
    /// group's actor, read at its first join: the same flag is not recorded
    /// again after a broker restart.
    recorded_flags: HashMap<ResourceId, String>,
    /// Elastic resources just asked for (real names): an agent of that name
    /// already connected takes the slot before the next commit.
    to_adopt: Vec<ResourceId>,
    /// `Some` while the group is expired: the engine is frozen (no inputs, no
    /// timers), every resource counts as unavailable, and each session seen
    /// is disconnected. Holds the sessions per engine id the engine had when
    /// it froze, to reconcile it with what happened meanwhile on reopening.
    closed: Option<HashMap<ResourceId, BTreeSet<SessionId>>>,
    /// Events to write with the next commit: (at, kind, message).
    notes: Vec<(UnixMillis, &'static str, String)>,
    /// Resource intervals to open or close with the next commit.
    intervals: Vec<IntervalOp>,
    /// Sessions the broker ends itself, to record with the next commit.
    ends: Vec<BrokerEnd>,
    /// Joined hosts whose link closed ([`gone`]).
    gone: gone::GoneHosts,
    /// Reservations, waiting route requests, retained sessions ([`routing`]).
    routing: routing::Routing,
    /// Elastic resources' provisioning and durable record ([`elastic`]).
    elastic: Elastic,
    /// Expiry disconnects not yet confirmed, and their retries.
    disconnects: Disconnects,
    shared: Arc<Shared>,
    /// Base resources created through the provisioner ([`base`]).
    base: base::ProvisionedBase,
    /// The newest joined connection per resource ([`connections`]).
    conns: connections::Connections,
    /// When the input of this turn arrived, while it has decisions not
    /// committed yet: their latency is observed at the commit
    /// (`crate::metrics`).
    decided_since: Option<std::time::Instant>,
    /// When the actor took the input being handled.
    turn_started: std::time::Instant,
    /// The decisions of this turn as the metrics count them (kind and
    /// reason), counted once the turn is committed.
    decided: Vec<(&'static str, &'static str)>,
}

impl Actor {
    async fn run(
        &mut self,
        mut inbox: mpsc::Receiver<Msg>,
        token: CancellationToken,
    ) -> Result<(), ActorError> {
        if self.start().await? {
            return Ok(());
        }
        loop {
            let deadline = self.next_deadline();
            let msg = tokio::select! {
                _ = token.cancelled() => return Ok(()),
                m = inbox.recv() => match m {
                    Some(m) => Some(m),
                    None => return Ok(()),
                },
                // Cancel-safe; with nothing scheduled it still wakes now and
                // then on the wall clock, which handles nothing.
                _ = self.shared.clock.sleep_until(deadline) => None,
            };
            self.turn_started = std::time::Instant::now();
            let after = match msg {
                None => {
                    self.timeout();
                    After::Settle(None)
                }
                Some(msg) => self.handle(msg).await?,
            };
            match after {
                After::Answered => {}
                After::Commit(reply) => {
                    self.commit().await?;
                    let _ = reply.send(());
                }
                After::Settle(reply) => {
                    self.commit().await?;
                    let stop = self.settle_publish().await?;
                    if let Some(reply) = reply {
                        let _ = reply.send(());
                    }
                    if stop {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// What a restarted or new actor does first: the group's status,
    /// provisioned base, pending disconnects, retained sessions and gone
    /// hosts from the store, agents that named the group before it had an
    /// actor, one commit. Returns whether the actor stops (its publishing
    /// failed).
    async fn start(&mut self) -> Result<bool, ActorError> {
        // A group already expired when its actor starts (broker restart)
        // starts closed.
        self.apply_status();
        self.start_base().await?;
        self.restore_disconnects().await?;
        self.restore_retained().await?;
        self.restore_reservations().await?;
        self.restore_gone().await?;
        // Agents that named the group before it had an actor join now.
        self.adopt(None).await;
        self.commit().await?;
        self.settle_publish().await
    }

    /// The earliest of the engine's, routing's, the expiry disconnects'
    /// and the gone hosts' deadlines; a closed group's engine and routing
    /// wait.
    fn next_deadline(&self) -> Option<UnixMillis> {
        let earliest = |a: Option<UnixMillis>, b: Option<UnixMillis>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let open = match self.closed {
            Some(_) => None,
            None => earliest(self.engine.poll_deadline(), self.routing.next_deadline()),
        };
        // Expiry disconnects to retry are due while closed, too.
        earliest(
            earliest(open, self.disconnects.next_due()),
            self.gone_deadline(),
        )
    }

    /// Handles one message; what the turn still owes is returned.
    async fn handle(&mut self, msg: Msg) -> Result<After, ActorError> {
        Ok(match msg {
            Msg::Tick { reply } => {
                self.timeout();
                After::Commit(reply)
            }
            Msg::View { reply } => {
                let _ = reply.send(self.view());
                After::Answered
            }
            Msg::Joined {
                resource,
                conn,
                sessions,
                reply,
            } => {
                self.join(resource, conn, sessions).await;
                After::Settle(Some(reply))
            }
            Msg::Left {
                resource,
                conn,
                reply,
            } => {
                if self.current_conn(&resource, conn, false) {
                    self.left(resource);
                }
                After::Commit(reply)
            }
            Msg::Availability {
                resource,
                conn,
                available,
                why,
                reply,
            } => {
                self.availability(resource, conn, available, why);
                After::Commit(reply)
            }
            Msg::Sessions {
                resource,
                events,
                reply,
            } => {
                if let Some(id) = self.to_engine.get(&resource).cloned() {
                    self.check_users(&resource, &events).await;
                    for ev in events {
                        self.session_event(&id, ev);
                    }
                }
                After::Commit(reply)
            }
            Msg::Reload { reply } => {
                self.reload().await?;
                After::Commit(reply)
            }
            Msg::Elastic(report) => {
                self.elastic_report(report);
                After::Settle(None)
            }
            Msg::Disconnect(report) => {
                self.disconnect_report(report);
                After::Settle(None)
            }
            Msg::Route { ask, reply } => {
                self.route(ask, reply);
                After::Settle(None)
            }
            Msg::CancelRoute { session, reply } => {
                self.cancel_route(session);
                After::Commit(reply)
            }
            Msg::Streaming {
                resource,
                target,
                reply,
            } => {
                self.set_address(resource, target);
                let _ = reply.send(());
                After::Answered
            }
            Msg::Presence {
                resource,
                report,
                reply,
            } => {
                self.presence(&resource, report);
                After::Commit(reply)
            }
        })
    }

    /// The agent of `resource` can (not) take sessions, said by connection
    /// `conn`; `why` (silence, a comeback) is recorded as an event.
    fn availability(
        &mut self,
        resource: ResourceId,
        conn: Option<u64>,
        available: bool,
        why: Option<String>,
    ) {
        let current = self.current_conn(&resource, conn, false);
        let Some(id) = self.to_engine.get(&resource).cloned().filter(|_| current) else {
            return;
        };
        let input = if available {
            Input::Available { resource: id }
        } else {
            Input::Unavailable { resource: id }
        };
        self.input(input);
        if let Some(why) = why {
            let kind = if available {
                "available"
            } else {
                "unavailable"
            };
            self.note(kind, format!("{kind}: {resource} {why}"));
        }
    }

    fn now(&mut self) -> UnixMillis {
        self.last_now = self.last_now.max(self.shared.clock.now().0);
        UnixMillis(self.last_now)
    }

    fn timeout(&mut self) {
        self.retry_disconnects();
        self.gone_timeouts();
        if self.closed.is_some() {
            return;
        }
        self.route_timeouts();
        let now = self.now();
        if let Err(e) = self.engine.handle_timeout(now) {
            tracing::warn!(group = %self.row.name, "deadline: {e}");
        }
        self.take_decisions();
    }

    /// Feeds one input. A refused input (a replayed start already known, an
    /// end of a session never seen) changes nothing and is only logged.
    fn input(&mut self, input: Input) -> bool {
        if self.closed.is_some() {
            // Frozen: reconciled with what happened meanwhile on reopening.
            return false;
        }
        let now = self.now();
        let ok = match self.engine.handle(now, input) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(group = %self.row.name, "input not applied: {e}");
                false
            }
        };
        self.take_decisions();
        ok
    }

    fn note(&mut self, kind: &'static str, message: String) {
        let now = UnixMillis(self.last_now.max(self.shared.clock.now().0));
        self.notes.push((now, kind, message));
    }

    fn external(&self, engine_id: &ResourceId) -> ResourceId {
        self.from_engine
            .get(engine_id)
            .cloned()
            .unwrap_or_else(|| self.elastic_name(engine_id).unwrap_or(engine_id.clone()))
    }

    /// `<group>-e1` for the engine's `e1`; `None` for base slots.
    fn elastic_name(&self, engine_id: &ResourceId) -> Option<ResourceId> {
        let id = engine_id.as_str();
        if !id.starts_with('e') {
            return None;
        }
        ResourceId::new(format!("{}-{id}", self.row.name)).ok()
    }

    /// The engine's `e1` for `<group>-e1`.
    fn elastic_engine_id(&self, resource: &ResourceId) -> Option<ResourceId> {
        let rest = resource
            .as_str()
            .strip_prefix(self.row.name.as_str())?
            .strip_prefix('-')?;
        let digits = rest.strip_prefix('e')?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        ResourceId::new(rest).ok()
    }

    fn bind(&mut self, resource: &ResourceId, engine_id: ResourceId) {
        self.to_engine.insert(resource.clone(), engine_id.clone());
        self.from_engine.insert(engine_id, resource.clone());
    }

    fn state_of(&self, engine_id: &ResourceId) -> Option<ResourceState> {
        self.engine
            .resources()
            .iter()
            .find(|r| &r.id == engine_id)
            .map(|r| r.state)
    }

    async fn reload(&mut self) -> Result<(), ActorError> {
        let row = load_row(&self.shared.store, self.row.name.as_str()).await?;
        let Some(row) = row else { return Ok(()) };
        if row.policy != self.row.policy {
            let policy = payment::engine_policy(&row.policy, &row.status);
            if self.input(Input::Policy(policy)) {
                self.note("policy", "policy in force in the group's engine".into());
            }
        }
        let newer_policy = row.policy_version > self.row.policy_version;
        self.row = row;
        self.apply_status();
        if newer_policy {
            // Agents not connected now get it when they join again.
            let live = self.shared.registry.snapshot();
            let mut targets: Vec<ResourceId> = self
                .to_engine
                .keys()
                .filter(|r| live.contains_key(*r))
                .cloned()
                .collect();
            targets.sort();
            for real in targets {
                self.push_policy(&real);
            }
        }
        Ok(())
    }

    // ---- Elastic resources (issue 6; the logic is in `super::elastic`) ----

    fn view(&self) -> GroupView {
        let closed = self.closed.is_some();
        let snapshot = self.engine.snapshot();
        let policy = self.engine.policy();
        let resources: Vec<ResourceView> = self
            .engine
            .resources()
            .iter()
            .map(|r| {
                let resource = self.external(&r.id);
                let sessions: Vec<SessionId> = self
                    .sessions
                    .get(&r.id)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default();
                ResourceView {
                    flagged: self.flagged.get(&resource).cloned(),
                    resource,
                    class: r.class,
                    state: r.state,
                    // Closed: nothing takes sessions, whatever the frozen
                    // engine last knew; the load is what agents report since.
                    // Only a ready resource takes sessions: a pending one is
                    // not there yet (the engine's flag says only that it is
                    // not drained or unhealthy).
                    available: r.available && r.state == ResourceState::Ready && !closed,
                    occupancy: if closed {
                        u32::try_from(sessions.len()).unwrap_or(u32::MAX)
                    } else {
                        r.occupancy
                    },
                    sessions,
                }
            })
            .collect();
        let (demand, capacity) = if closed {
            let open: u64 = resources.iter().map(|r| u64::from(r.occupancy)).sum();
            (open, 0)
        } else {
            (snapshot.demand, snapshot.capacity)
        };
        GroupView {
            group: self.row.name.clone(),
            resources,
            deadline: if closed {
                None
            } else {
                self.engine.poll_deadline()
            },
            closed,
            demand,
            capacity,
            concurrent_sessions: policy.concurrent_sessions,
            usage_threshold: policy.usage_threshold,
            flagged: self.flagged.values().cloned().collect(),
            joined: {
                let mut joined: Vec<ResourceId> = self.to_engine.keys().cloned().collect();
                joined.sort();
                joined
            },
            policy_version: self.row.policy_version,
            retained: self
                .retained_sessions()
                .into_iter()
                .map(|(s, since, until)| (s, UnixMillis(since), until.map(UnixMillis)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::groups::lifecycle::Removal;
    use crate::groups::GroupService;
    use ferry_common::admin::{BillingSpec, GroupSpec, PolicySpec};
    use ferry_common::wire::EndReason;
    use std::time::Duration;

    const T0: i64 = 1_700_000_000_000;

    use crate::test_support::{rid, sid};

    /// The shared group with a scale-out at half use, one host at a time,
    /// idle hosts released after 10 minutes.
    fn spec(name: &str) -> GroupSpec {
        let mut spec = crate::test_support::group_spec(name);
        spec.policy.usage_threshold = Some(50);
        spec.policy.scale_out_step = Some(1);
        spec.policy.max_idle_ms = Some(600_000);
        spec.policy.scale_in_cooldown_ms = Some(60_000);
        spec
    }

    /// The groups as the daemon wires them, on a manual clock at `T0`.
    struct Fixture {
        store: Store,
        service: GroupService,
        clock: ManualClock,
        actors: GroupActors,
        rig: crate::test_support::Rig,
    }

    fn fixture() -> Fixture {
        let rig = crate::test_support::Rig::new(UnixMillis(T0));
        Fixture {
            store: rig.store.clone(),
            service: rig.service.clone(),
            clock: rig.clock.clone(),
            actors: rig.actors.clone(),
            rig,
        }
    }

    impl Fixture {
        /// Publishes [`spec`]`(name)` at `T0` (its actor is not started).
        async fn publish(&self, name: &str) {
            self.service
                .publish(spec(name), UnixMillis(T0))
                .await
                .expect("publish");
        }

        async fn events(&self, group: &str) -> Vec<(String, String)> {
            self.service
                .events(&group.parse().expect("name"))
                .await
                .expect("events")
                .into_iter()
                .map(|e| (e.kind, e.message))
                .collect()
        }

        /// (resource, kind, ready_at, released_at) in id order.
        async fn intervals(&self) -> Vec<(String, String, i64, Option<i64>)> {
            self.store.intervals_for_test().await
        }

        async fn close(self) {
            self.rig.close().await;
        }
    }

    fn started(s: &str) -> SessionEvent {
        SessionEvent::Started {
            session: sid(s),
            user: "u1".parse().expect("user"),
            at: UnixMillis(T0),
        }
    }

    fn ended(s: &str) -> SessionEvent {
        SessionEvent::Ended {
            session: sid(s),
            at: UnixMillis(T0),
            reason: EndReason::Logout,
        }
    }

    /// One host's reports about another host's session change nothing:
    /// its end, its user's disconnect, its start, its listing as open.
    /// The messages of the `ignored-report` events among `events`.
    fn ignored_reports(events: &[(String, String)]) -> Vec<&str> {
        events
            .iter()
            .filter(|(k, _)| k == "ignored-report")
            .map(|(_, m)| m.as_str())
            .collect()
    }

    #[tokio::test]
    async fn a_host_reports_only_its_own_sessions() {
        use ferry_common::wire::{Presence, PresenceReport};
        let f = fixture();
        let g: GroupName = "g1".parse().expect("name");
        f.publish("g1").await;
        assert!(f.actors.sync("g1").await.expect("sync"));
        f.actors.joined(&g, &rid("h1"), vec![]).await;
        f.actors.joined(&g, &rid("h2"), vec![]).await;
        f.actors.sessions(&g, &rid("h1"), vec![started("s1")]).await;
        let occupancy = |v: &GroupView| -> Vec<(String, u32)> {
            v.resources
                .iter()
                .map(|r| (r.resource.to_string(), r.occupancy))
                .collect()
        };
        let before = vec![("h1".to_owned(), 1), ("h2".to_owned(), 0)];
        assert_eq!(occupancy(&f.actors.view(&g).await.expect("view")), before);

        f.actors.sessions(&g, &rid("h2"), vec![ended("s1")]).await;
        f.actors
            .presence(
                &g,
                &rid("h2"),
                PresenceReport {
                    session: sid("s1"),
                    state: Presence::Disconnected,
                    at: UnixMillis(T0),
                },
            )
            .await;
        f.actors.sessions(&g, &rid("h2"), vec![started("s1")]).await;
        f.actors.joined(&g, &rid("h2"), vec![sid("s1")]).await;
        // h2 leaves and comes back without it: nothing of h1's is freed.
        f.actors.joined(&g, &rid("h2"), vec![]).await;
        assert_eq!(occupancy(&f.actors.view(&g).await.expect("view")), before);

        let events = f.events("g1").await;
        let ignored = ignored_reports(&events);
        assert_eq!(ignored.len(), 4, "{events:?}");
        assert!(ignored[0].contains("resource h2 reported the end of session s1, which is on h1"));
        assert!(ignored[1].contains("the user's disconnect from session s1"));
        assert!(ignored[2].contains("the start of session s1"));
        assert!(ignored[3].contains("as open on its host session s1"));
        assert!(!events.iter().any(|(k, _)| k == "session-disconnected"));

        // A host that keeps at it fills no log: 20 are recorded, the last
        // saying the rest are not.
        for _ in 0..30 {
            f.actors.sessions(&g, &rid("h2"), vec![ended("s1")]).await;
        }
        let events = f.events("g1").await;
        let ignored = ignored_reports(&events);
        assert_eq!(ignored.len(), 20, "{events:?}");
        assert!(ignored[19].contains("further such reports of h2 are ignored"));

        // The host that has it ends it.
        f.actors.sessions(&g, &rid("h1"), vec![ended("s1")]).await;
        assert_eq!(
            occupancy(&f.actors.view(&g).await.expect("view")),
            vec![("h1".to_owned(), 0), ("h2".to_owned(), 0)]
        );
        f.close().await;
    }

    /// Waits (bounded) until the running actors are `want`.
    async fn wait_running(f: &Fixture, want: &[GroupName]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while f.actors.running() != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "running {:?}, not {want:?}",
                f.actors.running()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A store that refuses writes (a full or read-only disk) stops the
    /// group's actor at its next commit; once the wait after a failure has
    /// passed it runs again, without an operator's change.
    #[tokio::test]
    async fn an_actor_stopped_by_a_failing_store_runs_again_after_the_retry_wait() {
        let f = fixture();
        let g: GroupName = "g1".parse().expect("name");
        f.publish("g1").await;
        f.actors.start_all().await.expect("start");
        assert_eq!(f.actors.running(), vec![g.clone()]);

        f.store.refuse_writes_for_test(true).await;
        // Its join opens the host's billing interval: a commit, refused.
        f.actors.joined(&g, &rid("h1"), vec![]).await;
        wait_running(&f, &[]).await;

        f.store.refuse_writes_for_test(false).await;
        f.clock.advance(RETRY_AFTER_ERROR);
        wait_running(&f, std::slice::from_ref(&g)).await;
        f.actors.joined(&g, &rid("h1"), vec![]).await;
        f.actors.sessions(&g, &rid("h1"), vec![started("s1")]).await;
        let view = f.actors.view(&g).await.expect("view");
        let h1 = view.resources.iter().find(|r| r.resource == rid("h1"));
        assert_eq!(h1.map(|r| r.occupancy), Some(1), "{view:?}");
        f.close().await;
    }

    #[tokio::test]
    async fn reports_drive_scale_out_creation_scale_in_and_release_with_recorded_reasons() {
        let f = fixture();
        let g: GroupName = "g1".parse().expect("name");
        f.publish("g1").await;
        assert!(f.actors.sync("g1").await.expect("sync"));
        assert_eq!(f.actors.running(), vec![g.clone()]);

        // Base slots take nothing until agents join.
        let v = f.actors.view(&g).await.expect("view");
        assert!(v.resources.iter().all(|r| !r.available));

        f.actors.joined(&g, &rid("h1"), vec![]).await;
        f.actors.joined(&g, &rid("h2"), vec![sid("s0")]).await;
        f.actors.joined(&g, &rid("h3"), vec![]).await;
        let v = f.actors.view(&g).await.expect("view");
        assert_eq!(
            v.resources
                .iter()
                .map(|r| (r.resource.to_string(), r.available, r.occupancy))
                .collect::<Vec<_>>(),
            vec![("h1".into(), true, 0), ("h2".into(), true, 1)]
        );

        // demand 3 x 100 > 50 x 4: one elastic resource, named for the group.
        f.clock.advance(Duration::from_secs(60));
        f.actors
            .sessions(&g, &rid("h1"), vec![started("s1"), started("s2")])
            .await;
        let events = f.events("g1").await;
        let scale_out: Vec<_> = events.iter().filter(|(k, _)| k == "scale_out").collect();
        assert_eq!(scale_out.len(), 1, "{events:?}");
        assert!(scale_out[0].1.contains("g1-e1"), "{}", scale_out[0].1);
        assert!(scale_out[0]
            .1
            .contains("demand 3 x 100 > threshold 50 x capacity 4"));
        assert!(events
            .iter()
            .any(|(k, m)| k == "flagged" && m.contains("h3")));

        // A replayed start changes nothing; the elastic agent completes the creation.
        f.actors.sessions(&g, &rid("h1"), vec![started("s1")]).await;
        f.clock.advance(Duration::from_secs(30));
        let created_at = f.clock.now().0;
        f.actors.joined(&g, &rid("g1-e1"), vec![]).await;
        let v = f.actors.view(&g).await.expect("view");
        let e1 = &v.resources[2];
        assert_eq!(
            (e1.resource.as_str(), e1.class, e1.state, e1.occupancy),
            ("g1-e1", Class::Elastic, ResourceState::Ready, 0)
        );
        assert_eq!(v.resources[0].occupancy, 2);

        // Load goes away; after max_idle the elastic one is scaled in. Its
        // agent is not connected, so it counts as released at once.
        f.actors
            .sessions(&g, &rid("h1"), vec![ended("s1"), ended("s2")])
            .await;
        f.actors.sessions(&g, &rid("h2"), vec![ended("s0")]).await;
        let v = f.actors.view(&g).await.expect("view");
        let deadline = v.deadline.expect("a scale-in deadline");
        f.clock.set(UnixMillis(deadline.0 - 1));
        f.actors.tick(&g).await.expect("tick");
        assert!(!f.events("g1").await.iter().any(|(k, _)| k == "scale_in"));
        f.clock.set(deadline);
        f.actors.tick(&g).await.expect("tick");
        let events = f.events("g1").await;
        let kinds: Vec<_> = events
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| ["scale_out", "created", "scale_in", "released"].contains(k))
            .collect();
        assert_eq!(kinds, ["scale_out", "created", "scale_in", "released"]);
        let scale_in = events
            .iter()
            .find(|(k, _)| k == "scale_in")
            .expect("scale-in");
        assert!(scale_in.1.contains("g1-e1") && scale_in.1.contains("idle"));
        let v = f.actors.view(&g).await.expect("view");
        assert_eq!(v.resources[2].state, ResourceState::Released);
        assert_eq!(
            f.intervals().await,
            vec![
                ("h1".into(), "base".into(), T0, None),
                ("h2".into(), "base".into(), T0, None),
                (
                    "g1-e1".into(),
                    "elastic".into(),
                    created_at,
                    Some(deadline.0)
                ),
            ]
        );

        // Purging the group stops its actor and ends its metering.
        f.clock.advance(Duration::from_secs(5));
        f.service
            .remove(&g, Removal::Purge, f.clock.now())
            .await
            .expect("purge");
        f.actors.sync("g1").await.expect("sync");
        let ends: Vec<_> = f.intervals().await.into_iter().map(|i| i.3).collect();
        assert!(ends.iter().all(Option::is_some), "{ends:?}");
        assert!(f.actors.running().is_empty());
        f.close().await;
    }

    #[tokio::test]
    async fn actors_start_for_live_groups_and_stop_when_the_group_goes() {
        let f = fixture();
        f.publish("g1").await;
        f.service
            .publish(spec("g2"), UnixMillis(T0))
            .await
            .expect("publish");
        assert_eq!(f.actors.start_all().await.expect("start"), 2);
        let g1: GroupName = "g1".parse().expect("name");
        f.service
            .remove(&g1, Removal::Purge, UnixMillis(T0 + 1))
            .await
            .expect("purge");
        assert!(!f.actors.sync("g1").await.expect("sync"));
        assert_eq!(
            f.actors.running(),
            vec!["g2".parse::<GroupName>().expect("name")]
        );
        assert!(matches!(
            f.actors.tick(&g1).await,
            Err(ActorError::NotRunning(_))
        ));
        f.close().await;
    }

    #[tokio::test]
    async fn a_policy_change_reaches_the_running_engine() {
        let f = fixture();
        let g: GroupName = "g1".parse().expect("name");
        f.publish("g1").await;
        f.actors.sync("g1").await.expect("sync");
        f.actors.joined(&g, &rid("h1"), vec![]).await;
        f.actors.joined(&g, &rid("h2"), vec![]).await;
        // Threshold 100: three sessions on four slots do not scale out.
        f.service
            .update_policy(
                &g,
                PolicySpec {
                    usage_threshold: Some(100),
                    ..PolicySpec::default()
                },
                UnixMillis(T0),
            )
            .await
            .expect("update");
        f.actors.sync("g1").await.expect("sync");
        f.actors
            .sessions(&g, &rid("h1"), vec![started("s1"), started("s2")])
            .await;
        f.actors.sessions(&g, &rid("h2"), vec![started("s3")]).await;
        let events = f.events("g1").await;
        assert!(!events.iter().any(|(k, _)| k == "scale_out"), "{events:?}");
        assert!(events.iter().any(|(k, _)| k == "policy"));
        // No agent is connected in this fixture: each join's push fails and
        // is written down, never dropped.
        wait_events(&f, |evs| {
            evs.iter()
                .filter(|(k, m)| k == "policy-failed" && m.contains("is not connected"))
                .count()
                >= 2
        })
        .await;
        f.close().await;
    }

    #[test]
    fn the_policy_document_keeps_the_scaling_part_under_scaling() {
        let mut p = Policy::new(2, 50, 1, 3, Duration::from_secs(60));
        p.wait_timeout = Duration::from_millis(1500);
        let doc = policy_document(&p, &Default::default()).expect("small");
        assert!(
            doc.contains(concat!(
                r#""scaling":{"concurrent_sessions":2,"load_balancing":"breadth-first","#,
                r#""max_elastic":3,"max_idle_ms":60000,"scale_in_cooldown_ms":"#,
                r#"60000,"scale_out_step":1,"usage_threshold":50,"wait_timeout_ms":1500}"#
            )),
            "{doc}"
        );
        // The same policy gives the same bytes.
        assert_eq!(
            policy_document(&p.clone(), &Default::default()).expect("small"),
            doc
        );
    }

    /// Writes the host facts an agent's registration would have stored.
    async fn register_host(store: &Store, resource: &str, vcpus: i64, memory_gib: i64) {
        store
            .register_host_for_test(resource, vcpus, memory_gib)
            .await;
    }

    #[tokio::test]
    async fn a_host_below_the_spec_is_flagged_but_used_until_it_fits() {
        let f = fixture();
        let g: GroupName = "g1".parse().expect("name");
        f.publish("g1").await;
        f.actors.sync("g1").await.expect("sync");
        register_host(&f.store, "h1", 2, 4).await;
        register_host(&f.store, "h2", 8, 16).await;
        f.actors.joined(&g, &rid("h1"), vec![]).await;
        f.actors.joined(&g, &rid("h2"), vec![]).await;
        // Re-joining with the same host does not flag it twice.
        f.actors.joined(&g, &rid("h1"), vec![]).await;

        let flagged: Vec<_> = f
            .events("g1")
            .await
            .into_iter()
            .filter(|(k, _)| k == "flagged")
            .collect();
        assert_eq!(flagged.len(), 1, "{flagged:?}");
        assert!(
            flagged[0].1.contains("resource h1")
                && flagged[0]
                    .1
                    .contains("has 2 vCPU / 4.00 GiB but spec office-4c8g needs 4 vCPU / 8 GiB"),
            "{}",
            flagged[0].1
        );
        let v = f.actors.view(&g).await.expect("view");
        let h1 = &v.resources[0];
        assert_eq!(h1.resource, rid("h1"));
        assert!(h1.available, "a flagged host still takes sessions");
        assert!(h1
            .flagged
            .as_deref()
            .is_some_and(|m| m.contains("short of vCPUs and memory")));
        assert_eq!(v.resources[1].flagged, None);
        assert_eq!(v.flagged.len(), 1);

        // The host is resized and its agent re-joins: the flag lifts.
        register_host(&f.store, "h1", 4, 8).await;
        f.actors.joined(&g, &rid("h1"), vec![]).await;
        let v = f.actors.view(&g).await.expect("view");
        assert_eq!(v.resources[0].flagged, None);
        assert!(v.flagged.is_empty());
        assert!(f
            .events("g1")
            .await
            .iter()
            .any(|(k, m)| k == "flag-lifted" && m.contains("h1")));
        f.close().await;
    }

    /// Waits (bounded) for the group's events to satisfy `done`: disconnects
    /// run in their own tasks, which give no other signal.
    async fn wait_events(f: &Fixture, done: impl Fn(&[(String, String)]) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let evs = f.events("g1").await;
            if done(&evs) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{evs:?}");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_expired_group_closes_a_renewed_one_reopens_and_recycling_stops_it() {
        let (f, g) = weekly_subscription().await;
        f.actors.joined(&g, &rid("h1"), vec![sid("s0")]).await;
        f.actors.joined(&g, &rid("h2"), vec![]).await;

        // The week ends: the deadline step expires the group, its actor closes.
        f.clock.set(UnixMillis(T0 + 7 * 86_400_000));
        f.service.run_due(f.clock.now()).await.expect("deadlines");
        assert!(f.actors.sync("g1").await.expect("sync"));
        let v = f.actors.view(&g).await.expect("view");
        assert!(v.closed);
        assert!(v.resources.iter().all(|r| !r.available));
        assert_eq!((v.demand, v.capacity, v.deadline), (1, 0, None));
        // h1's agent is not connected here: the disconnect fails, and says so.
        wait_events(&f, |e| e.iter().any(|(k, _)| k == "disconnect-failed")).await;
        let events = f.events("g1").await;
        assert!(events
            .iter()
            .any(|(k, m)| k == "closed" && m.contains("1 open session")));
        assert!(events.iter().any(|(k, m)| k == "disconnect-failed"
            && m.contains("session s0 on h1")
            && m.contains("not connected")));

        // A session started anyway is refused and disconnected too; ends are followed.
        f.actors.sessions(&g, &rid("h2"), vec![started("s1")]).await;
        wait_events(&f, |e| {
            e.iter().filter(|(k, _)| k == "disconnect-failed").count() == 2
        })
        .await;
        assert!(f
            .events("g1")
            .await
            .iter()
            .any(|(k, m)| k == "rejected" && m.contains("s1 on h2")));
        f.actors.sessions(&g, &rid("h1"), vec![ended("s0")]).await;
        let v = f.actors.view(&g).await.expect("view");
        assert_eq!(v.demand, 1);
        assert_eq!(v.resources[1].sessions, vec![sid("s1")]);
        assert!(
            !f.events("g1").await.iter().any(|(k, _)| k == "scale_out"),
            "a closed group never scales"
        );

        // Renewed: it reopens with the sessions that are left.
        f.service
            .renew(&g, "1w", f.clock.now())
            .await
            .expect("renew");
        f.actors.sync("g1").await.expect("sync");
        let v = f.actors.view(&g).await.expect("view");
        assert!(!v.closed);
        assert_eq!(v.demand, 1);
        assert_eq!(v.resources[1].occupancy, 1);
        assert!(f.events("g1").await.iter().any(|(k, _)| k == "reopened"));

        // Expired again and past retention: recycling stops the actor and
        // ends the base intervals when recycling began.
        let expires = f
            .service
            .show("g1")
            .await
            .expect("show")
            .info
            .expires_at
            .expect("expiry");
        f.clock.set(expires);
        f.service.run_due(f.clock.now()).await.expect("deadlines");
        f.actors.sync("g1").await.expect("sync");
        assert!(f.actors.view(&g).await.expect("view").closed);
        let recycle = expires.0 + 7 * 86_400_000;
        f.clock.set(UnixMillis(recycle + 5_000));
        f.service.run_due(f.clock.now()).await.expect("deadlines");
        assert_eq!(
            f.service.show("g1").await.expect("show").info.status,
            "recycling"
        );
        assert!(!f.actors.sync("g1").await.expect("sync"));
        assert!(f.actors.running().is_empty());
        let ends: Vec<_> = f.intervals().await.into_iter().map(|i| i.3).collect();
        assert_eq!(ends, vec![Some(recycle), Some(recycle)]);
        assert!(f
            .events("g1")
            .await
            .iter()
            .any(|(k, m)| k == "released" && m.contains("2 resource(s) released")));
        f.close().await;
    }

    /// The reconnect race ([`connections`]): the old connection's end
    /// reaches the actor after the new connection's join. Ordered by hand:
    /// each report is applied before the next is sent.
    #[tokio::test]
    async fn a_stale_connections_leave_does_not_mark_a_rejoined_resource_unavailable() {
        let f = fixture();
        let g: GroupName = "g1".parse().expect("name");
        f.publish("g1").await;
        f.actors.sync("g1").await.expect("sync");
        let h1 = rid("h1");
        let available = |v: &GroupView| v.resources[0].available;
        f.actors.joined_on(&g, &h1, Some(1), vec![]).await;
        assert!(available(&f.actors.view(&g).await.expect("view")));
        // The agent reconnects: connection 2 joins, then connection 1's
        // last reports arrive.
        f.actors.joined_on(&g, &h1, Some(2), vec![]).await;
        f.actors.availability_on(&g, &h1, Some(1), false).await;
        f.actors.left_on(&g, &h1, Some(1)).await;
        let v = f.actors.view(&g).await.expect("view");
        assert_eq!(v.resources[0].resource, h1);
        assert!(available(&v), "a stale leave made {h1} unavailable");
        // A late join of the old connection changes nothing either.
        f.actors
            .joined_on(&g, &h1, Some(1), vec![sid("ghost")])
            .await;
        let v = f.actors.view(&g).await.expect("view");
        assert!(v.resources[0].sessions.is_empty(), "{v:?}");
        // The current connection's reports do apply.
        f.actors.availability_on(&g, &h1, Some(2), false).await;
        assert!(!available(&f.actors.view(&g).await.expect("view")));
        f.actors.availability_on(&g, &h1, Some(2), true).await;
        assert!(available(&f.actors.view(&g).await.expect("view")));
        f.actors.left_on(&g, &h1, Some(2)).await;
        assert!(!available(&f.actors.view(&g).await.expect("view")));
        f.close().await;
    }

    /// A fixture with `g1` published as a one-week subscription without
    /// auto-renew, its actor running.
    async fn weekly_subscription() -> (Fixture, GroupName) {
        let f = fixture();
        let mut sub = spec("g1");
        sub.billing = BillingSpec::Subscription {
            duration: "1w".into(),
            auto_renew: false,
        };
        f.service
            .publish(sub, UnixMillis(T0))
            .await
            .expect("publish");
        f.actors.sync("g1").await.expect("sync");
        (f, "g1".parse().expect("name"))
    }

    /// An expired group with session s0 on h1, whose agent is not connected
    /// (so every disconnect fails), after its first failed attempt.
    async fn expired_with_a_failing_disconnect() -> (Fixture, GroupName) {
        let (f, g) = weekly_subscription().await;
        f.actors.joined(&g, &rid("h1"), vec![sid("s0")]).await;
        f.clock.set(UnixMillis(T0 + 7 * 86_400_000));
        f.service.run_due(f.clock.now()).await.expect("deadlines");
        f.actors.sync("g1").await.expect("sync");
        wait_events(&f, |e| e.iter().any(|(k, _)| k == "disconnect-failed")).await;
        (f, g)
    }

    /// (resource, session, attempts) of the stored pending disconnects.
    async fn stored_disconnects(f: &Fixture) -> Vec<(String, String, i64)> {
        let mut out: Vec<(String, String, i64)> = f
            .store
            .pending_disconnects(1)
            .await
            .expect("read")
            .into_iter()
            .map(|d| {
                (
                    d.resource.to_string(),
                    d.session.to_string(),
                    i64::from(d.attempts),
                )
            })
            .collect();
        out.sort_by(|a, b| a.1.cmp(&b.1));
        out
    }

    fn count(evs: &[(String, String)], kind: &str, needle: &str) -> usize {
        evs.iter()
            .filter(|(k, m)| k == kind && m.contains(needle))
            .count()
    }

    #[tokio::test]
    async fn expiry_disconnects_go_on_after_a_restart_and_stop_when_the_session_ended() {
        let (f, g) = expired_with_a_failing_disconnect().await;
        // The attempt (1) and its retry wait are on disk.
        let want = |n: i64| vec![("h1".to_owned(), "s0".to_owned(), n)];
        wait_stored(&f, &want(1)).await;

        // The actor stops (as with the broker) and a new one starts from the
        // store: it retries when the stored wait is over, counting on.
        f.actors.stop(&g);
        assert!(f.actors.sync("g1").await.expect("sync"));
        wait_events(&f, |e| count(e, "restored", "") == 1).await;
        f.clock.advance(Duration::from_secs(5));
        wait_events(&f, |e| count(e, "disconnect-failed", "attempt 2") == 1).await;
        assert_eq!(
            count(&f.events("g1").await, "restored", "1 expiry disconnect"),
            1
        );
        wait_stored(&f, &want(2)).await;

        // h1 comes back without s0: at the next retry the disconnect is
        // abandoned, and forgotten.
        f.actors.joined(&g, &rid("h1"), vec![]).await;
        f.clock.advance(Duration::from_secs(10));
        f.actors.tick(&g).await.expect("tick");
        wait_events(&f, |e| {
            count(e, "disconnect-abandoned", "session s0 on h1") == 1
        })
        .await;
        let evs = f.events("g1").await;
        assert_eq!(count(&evs, "disconnect-abandoned", "the session ended"), 1);
        wait_stored(&f, &[]).await;
        f.close().await;
    }

    #[tokio::test]
    async fn expiry_disconnects_are_abandoned_24_hours_after_the_first_attempt() {
        let (f, g) = expired_with_a_failing_disconnect().await;
        let first = f.clock.now();
        // Retries on their backoff until 24 h have passed since the first.
        f.clock.set(UnixMillis(first.0 + 86_400_000 - 1));
        f.actors.tick(&g).await.expect("tick");
        wait_events(&f, |e| count(e, "disconnect-failed", "attempt 2") == 1).await;
        assert_eq!(count(&f.events("g1").await, "disconnect-abandoned", ""), 0);
        f.clock.set(UnixMillis(first.0 + 86_400_000 + 60_000));
        f.actors.tick(&g).await.expect("tick");
        wait_events(&f, |e| {
            count(e, "disconnect-abandoned", "session s0 on h1") == 1
        })
        .await;
        let evs = f.events("g1").await;
        assert_eq!(
            count(&evs, "disconnect-abandoned", "within 24 h"),
            1,
            "{evs:?}"
        );
        wait_stored(&f, &[]).await;
        // Nothing more is tried.
        f.clock.advance(Duration::from_secs(3_600));
        f.actors.tick(&g).await.expect("tick");
        assert_eq!(
            count(&f.events("g1").await, "disconnect-failed", "attempt 3"),
            0
        );
        f.close().await;
    }

    /// Waits (bounded) until the stored pending disconnects are `want`.
    async fn wait_stored(f: &Fixture, want: &[(String, String, i64)]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let now = stored_disconnects(f).await;
            if now == want {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{now:?}");
            tokio::task::yield_now().await;
        }
    }
}
