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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use ferry_common::wire::{Command, CommandOutcome, HostFacts, SessionEvent};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::hostfit;
use super::service::GroupService;
use super::RETRY_AFTER_ERROR;
use crate::clock::Clock;
use crate::config::GroupsConfig;
use crate::engine::{Action, Class, Decision, EngineError, Group, Input, Policy, ResourceState};
use crate::registry::{Registry, COMMAND_TIMEOUT};
use crate::store::{BrokerEnd, GroupCommit, GroupRecord, IntervalOp, Store, StoreError};
use elastic::{Elastic, ElasticParts};

pub mod elastic;
mod routing;
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
        address: String,
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

/// Every group that needs an actor and the live groups under their names.
#[derive(Clone)]
pub struct GroupActors {
    shared: Arc<Shared>,
}

struct Shared {
    /// The provisioner of elastic resources, set once by the daemon before
    /// the actors start; unset = none (hand-configured elastic hosts).
    provisioning: std::sync::OnceLock<Arc<crate::provision::Provisioning>>,
    store: Store,
    /// Weak: the registry holds this handle, and agents are reached through it.
    registry: Weak<Registry>,
    clock: Clock,
    /// Group settings (prices and currency, for usage reports).
    config: Arc<GroupsConfig>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Running actors by group name. A std mutex: only map updates under it.
    actors: Mutex<HashMap<GroupName, ActorHandle>>,
    /// Wakes the lifecycle follower (see [`GroupActors::start_all`]) after an
    /// operator's change, which may move a lifecycle deadline.
    lifecycle: Notify,
    /// Whether the lifecycle follower was started (it runs once per broker).
    follower_started: AtomicBool,
    /// Held while an actor is brought in line with its row: the broker's
    /// start, the lifecycle follower and admin verbs may ask at once, and
    /// two of them must never both start an actor for one group.
    syncing: tokio::sync::Mutex<()>,
    /// Deletes of retired groups' elastic resources in progress.
    retiring: Arc<elastic::Retiring>,
    /// OTA updates (`crate::ota`), set once by the daemon: the admin socket
    /// reaches them here, like the actors.
    ota: std::sync::OnceLock<crate::ota::Ota>,
    /// Policy pushes trying again ([`policy_push`]).
    policy_pushes: policy_push::InFlight,
}

#[derive(Clone)]
struct ActorHandle {
    tx: mpsc::Sender<Msg>,
    token: CancellationToken,
}

impl Shared {
    /// Sends `command` to `resource`'s agent and waits for its outcome. Not
    /// reaching the agent, or the broker shutting down first, is the error's
    /// text (for the group's events).
    async fn command(
        &self,
        resource: &ResourceId,
        command: Command,
    ) -> Result<CommandOutcome, String> {
        let Some(registry) = self.registry.upgrade() else {
            return Err("the broker is shutting down".to_owned());
        };
        tokio::select! {
            r = registry.command(resource, command, COMMAND_TIMEOUT) => r.map_err(|e| e.to_string()),
            _ = self.shutdown.cancelled() => {
                Err("the broker shut down before the agent answered".to_owned())
            }
        }
    }

    /// Writes one group event, stamped with the groups' clock.
    async fn event(&self, num: i64, kind: &'static str, message: String) -> Result<(), StoreError> {
        let at = self.clock.now();
        self.store.group_event(num, at, kind, message).await
    }
}

impl GroupActors {
    /// No actor runs yet; call [`GroupActors::start_all`]. Actors are spawned
    /// on `tracker` and stop when `shutdown` is cancelled.
    pub fn new(
        store: Store,
        registry: &Arc<Registry>,
        config: &GroupsConfig,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> GroupActors {
        GroupActors {
            shared: Arc::new(Shared {
                store,
                registry: Arc::downgrade(registry),
                clock: config.clock.clone(),
                config: Arc::new(config.clone()),
                tracker,
                shutdown,
                actors: Mutex::default(),
                lifecycle: Notify::new(),
                follower_started: AtomicBool::new(false),
                syncing: tokio::sync::Mutex::new(()),
                provisioning: std::sync::OnceLock::new(),
                retiring: Arc::default(),
                ota: std::sync::OnceLock::new(),
                policy_pushes: policy_push::InFlight::default(),
            }),
        }
    }

    fn actors(&self) -> std::sync::MutexGuard<'_, HashMap<GroupName, ActorHandle>> {
        // Each update is one insert or remove: a panic cannot leave it half done.
        self.shared
            .actors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts an actor for every live group in the store (broker start), and
    /// once per broker the lifecycle follower: the task that brings actors in
    /// line when a lifecycle deadline changes their group's status (see
    /// [`GroupActors::follow_lifecycle`]).
    pub async fn start_all(&self) -> Result<usize, ActorError> {
        if !self.shared.follower_started.swap(true, Ordering::SeqCst) {
            let this = self.clone();
            self.shared.tracker.spawn(this.follow_lifecycle());
        }
        let names = self.shared.store.live_group_names().await?;
        let mut started = 0;
        for name in names {
            if self.sync(&name).await? {
                started += 1;
            }
        }
        // Elastic deletes of groups that went away, unfinished by an
        // earlier run (recycling ones were retried by their sync above).
        self.retire(None).await?;
        Ok(started)
    }

    /// Deletes the elastic resources left by groups that went away (see
    /// [`elastic::retire`]), in tasks that end only with the broker.
    async fn retire(&self, group: Option<String>) -> Result<(), ActorError> {
        let s = &self.shared;
        let started = elastic::retire(
            elastic::RetireParts {
                ctx: s.provisioning.get().cloned(),
                store: &s.store,
                registry: &s.registry,
                clock: &s.clock,
                tracker: &s.tracker,
                shutdown: &s.shutdown,
                retiring: &s.retiring,
            },
            group,
        )
        .await?;
        if started > 0 {
            tracing::info!(started, "deletes of elastic resources of retired groups");
        }
        Ok(())
    }

    /// Brings the actor of `group` (a name or an id) in line with its row:
    /// started when live and not running, told to reread its row (policy,
    /// status: an expired group closes, a renewed one reopens) when running,
    /// stopped when the group is recycling or gone. Returns whether it runs.
    /// Also wakes the lifecycle follower, since the change that called for
    /// this may have moved a deadline.
    pub async fn sync(&self, group: &str) -> Result<bool, ActorError> {
        let r = self.sync_row(group).await;
        self.shared.lifecycle.notify_one();
        r
    }

    /// Follows lifecycle deadlines until shutdown: at each one (and after
    /// each operator change) applies what is due through
    /// [`GroupService::run_due`] and syncs every actor whose group's status
    /// changed since it last looked, so an expired group closes, a recycling
    /// or gone one stops and its metering ends.
    ///
    /// This is the daemon's one lifecycle-deadline task. Running `run_due`
    /// here means a status is never read before the step
    /// that changes it was committed. Admin verbs that change a deadline call
    /// [`GroupActors::sync`], which wakes it.
    pub async fn follow_lifecycle(self) {
        let service = GroupService::new(self.shared.store.clone(), (*self.shared.config).clone());
        let clock = self.shared.clock.clone();
        let shutdown = self.shared.shutdown.clone();
        // Last status each group was synced with.
        let mut seen: HashMap<String, String> = HashMap::new();
        loop {
            let now = clock.now();
            let mut next = match service.run_due(now).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!("group lifecycle deadlines: {e}");
                    Some(retry_at(now))
                }
            };
            match self.statuses().await {
                Ok(statuses) => {
                    // Forget groups that are gone and have no actor left.
                    seen.retain(|name, _| statuses.iter().any(|(n, _)| n == name));
                    for (name, status) in statuses {
                        if seen.get(&name) == Some(&status) {
                            continue;
                        }
                        match self.sync_row(&name).await {
                            Ok(_) => {
                                seen.insert(name, status);
                            }
                            Err(e) => {
                                tracing::error!(group = %name, "follow its status: {e}");
                                next = Some(next.map_or(retry_at(now), |n| n.min(retry_at(now))));
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::error!("read group statuses: {e}");
                    next = Some(retry_at(now));
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = clock.sleep_until(next) => {}
                _ = self.shared.lifecycle.notified() => {}
            }
        }
    }

    /// (name, status) of every group that has, or just had, an actor: the
    /// not-gone groups and those with a running actor.
    async fn statuses(&self) -> Result<Vec<(String, String)>, ActorError> {
        let running: Vec<String> = self.running().iter().map(|g| g.to_string()).collect();
        let mut out = self.shared.store.group_statuses().await?;
        for name in running {
            if !out.iter().any(|(n, _)| *n == name) {
                out.push((name, "gone".into()));
            }
        }
        Ok(out)
    }

    async fn sync_row(&self, group: &str) -> Result<bool, ActorError> {
        // Rollouts look again: an image update recorded starts, one whose
        // group left `updating` (expiry, purge) stops.
        if let Some(ota) = self.shared.ota.get() {
            ota.wake();
        }
        let _one_at_a_time = self.shared.syncing.lock().await;
        let row = load_row(&self.shared.store, group).await?;
        let Some(row) = row.filter(|r| is_live(&r.status)) else {
            // Gone (purged, deleted) or never live: stop whatever runs under
            // the names `group` had, unless another live group took the name.
            // Stopped first, so no actor writes to the group once its
            // metering is closed.
            for name in self.shared.store.group_names_of(group).await? {
                let live = load_row(&self.shared.store, &name).await?;
                if live.is_some_and(|r| is_live(&r.status)) {
                    continue;
                }
                if let Ok(name) = name.parse::<GroupName>() {
                    self.stop(&name);
                }
            }
            // A group that is gone or recycling has released its resources:
            // metering stops when it went, or when recycling began (expiry
            // plus retention). Idempotent: only open intervals are touched.
            let now = self.shared.clock.now();
            let retention =
                i64::try_from(self.shared.config.retention.as_millis()).unwrap_or(i64::MAX);
            self.shared
                .store
                .stop_group_metering(group, retention, now)
                .await?;
            // Its elastic hosts go too (the actor that owned them stopped).
            self.retire(Some(group.to_owned())).await?;
            return Ok(false);
        };
        let running = self.actors().get(&row.name).cloned();
        if let Some(handle) = running {
            let (reply, rx) = oneshot::channel();
            if handle.tx.send(Msg::Reload { reply }).await.is_ok() && rx.await.is_ok() {
                return Ok(true);
            }
            // It ended on its own (a store failure); start a fresh one.
            self.stop(&row.name);
        }
        let now = self.shared.clock.now();
        // Elastic resources of an earlier run come back from the store (see
        // the module doc); an open elastic interval without a live record
        // (a broker from before migration 6) ends now, and it is written down.
        let num = row.num;
        let closed = self
            .shared
            .store
            .end_unrecorded_elastic_intervals(num, now)
            .await?;
        let (restored, next_elastic) = self.shared.store.elastic_of(num).await?;
        if closed > 0 {
            tracing::warn!(group = %row.name, closed, "closed elastic intervals of an earlier run");
        }
        let policy = payment::engine_policy(&row.policy, &row.status);
        let mut engine = Group::with_base_count(policy, Some(&row.spec), row.base, now)
            .map_err(|e| ActorError::Engine(row.name.clone(), e))?;
        engine
            .restore_elastic(
                restored.iter().map(|(r, _)| r.clone()).collect(),
                next_elastic,
            )
            .map_err(|e| ActorError::Engine(row.name.clone(), e))?;
        let (tx, rx) = mpsc::channel(GROUP_INBOX_LEN);
        let token = self.shared.shutdown.child_token();
        let mut actor = Actor {
            row: row.clone(),
            engine,
            last_now: now.0,
            slots: vec![None; row.base as usize],
            to_engine: HashMap::new(),
            from_engine: HashMap::new(),
            sessions: HashMap::new(),
            flagged: BTreeMap::new(),
            unused: BTreeSet::new(),
            recorded_flags: HashMap::new(),
            to_adopt: Vec::new(),
            closed: None,
            notes: Vec::new(),
            intervals: Vec::new(),
            ends: Vec::new(),
            gone: gone::GoneHosts::default(),
            routing: routing::Routing::default(),
            elastic: Elastic::new(ElasticParts {
                num: row.num,
                group: row.name.clone(),
                spec: row.spec.clone(),
                ctx: self.shared.provisioning.get().cloned(),
                store: self.shared.store.clone(),
                registry: self.shared.registry.clone(),
                clock: self.shared.clock.clone(),
                tracker: self.shared.tracker.clone(),
                shutdown: token.clone(),
                actor: tx.downgrade(),
            }),
            disconnects: Disconnects {
                pending: BTreeMap::new(),
                actor: tx.downgrade(),
                dirty: disconnects::Dirty::default(),
            },
            shared: self.shared.clone(),
            base: base::ProvisionedBase::default(),
            conns: connections::Connections::default(),
        };
        // Base slots take sessions only once an agent is bound and connected.
        let slots: Vec<Input> = (1..=row.base)
            .filter_map(|n| ResourceId::new(format!("b{n}")).ok())
            .map(|resource| Input::Unavailable { resource })
            .collect();
        actor
            .engine
            .handle_batch(now, slots)
            .map_err(|e| ActorError::Engine(row.name.clone(), e))?;
        actor.engine.drain_decisions().for_each(drop);
        actor.restore_elastic(restored);
        {
            let mut actors = self.actors();
            if actors.contains_key(&row.name) {
                // Another caller started it meanwhile; keep that one.
                return Ok(true);
            }
            actors.insert(
                row.name.clone(),
                ActorHandle {
                    tx,
                    token: token.clone(),
                },
            );
        }
        tracing::info!(group = %row.name, base = row.base, "group actor started");
        let this = self.clone();
        self.shared.tracker.spawn(async move {
            let name = actor.row.name.clone();
            if let Err(e) = actor.run(rx, token).await {
                tracing::error!(group = %name, "group actor stopped: {e}");
            }
            this.forget_if_closed(&name);
        });
        Ok(true)
    }

    fn forget_if_closed(&self, name: &GroupName) {
        let mut actors = self.actors();
        if actors.get(name).is_some_and(|h| h.tx.is_closed()) {
            actors.remove(name);
        }
    }

    /// Stops the actor of `group`, if one runs.
    pub fn stop(&self, group: &GroupName) {
        if let Some(h) = self.actors().remove(group) {
            h.token.cancel();
        }
    }

    /// Sets the provisioner of elastic resources (before
    /// [`GroupActors::start_all`]).
    pub fn set_provisioning(&self, provisioning: Arc<crate::provision::Provisioning>) {
        if self.shared.provisioning.set(provisioning).is_err() {
            tracing::warn!("a provisioner was already set; keeping the first");
        }
    }

    /// Sets the OTA updates' handle (once, by the daemon).
    pub fn set_ota(&self, ota: crate::ota::Ota) {
        let _ = self.shared.ota.set(ota);
    }

    /// The OTA updates' handle, when the daemon runs them.
    pub fn ota(&self) -> Option<&crate::ota::Ota> {
        self.shared.ota.get()
    }

    /// The group settings the actors were started with.
    pub fn config(&self) -> &GroupsConfig {
        &self.shared.config
    }

    /// Groups with a running actor.
    pub fn running(&self) -> Vec<GroupName> {
        let mut names: Vec<_> = self.actors().keys().cloned().collect();
        names.sort();
        names
    }

    async fn ask(&self, group: &GroupName, make: impl FnOnce(oneshot::Sender<()>) -> Msg) {
        let Some(handle) = self.actors().get(group).cloned() else {
            tracing::debug!(%group, "report for a group without an actor");
            return;
        };
        let (reply, rx) = oneshot::channel();
        if handle.tx.send(make(reply)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// An agent whose `Hello` names `group` registered (after the store
    /// committed it); `sessions` are the ones its host has now.
    pub async fn joined(&self, group: &GroupName, resource: &ResourceId, sessions: Vec<SessionId>) {
        self.joined_on(group, resource, None, sessions).await
    }

    /// [`GroupActors::joined`] by the agent's connection `conn` (the
    /// registry's connection id): a join of a connection older than one
    /// already joined is ignored ([`connections`]).
    pub async fn joined_on(
        &self,
        group: &GroupName,
        resource: &ResourceId,
        conn: Option<u64>,
        sessions: Vec<SessionId>,
    ) {
        let resource = resource.clone();
        self.ask(group, |reply| Msg::Joined {
            resource,
            conn,
            sessions,
            reply,
        })
        .await
    }

    /// The agent's connection ended.
    pub async fn left(&self, group: &GroupName, resource: &ResourceId) {
        self.left_on(group, resource, None).await
    }

    /// The agent's connection `conn` ended: ignored unless it is the
    /// resource's newest joined connection ([`connections`]).
    pub async fn left_on(&self, group: &GroupName, resource: &ResourceId, conn: Option<u64>) {
        let resource = resource.clone();
        self.ask(group, |reply| Msg::Left {
            resource,
            conn,
            reply,
        })
        .await
    }

    /// The agent can (not) take sessions: silent or draining is not available.
    pub async fn availability(&self, group: &GroupName, resource: &ResourceId, available: bool) {
        self.availability_on(group, resource, None, available).await
    }

    /// [`GroupActors::availability`] reported by connection `conn`: ignored
    /// unless it is the resource's newest joined connection.
    pub async fn availability_on(
        &self,
        group: &GroupName,
        resource: &ResourceId,
        conn: Option<u64>,
        available: bool,
    ) {
        let resource = resource.clone();
        self.ask(group, |reply| Msg::Availability {
            resource,
            conn,
            available,
            why: None,
            reply,
        })
        .await
    }

    /// [`GroupActors::availability_on`] after the host went silent or came
    /// back (`why`), which the group records as an event.
    pub async fn health_changed(
        &self,
        group: &GroupName,
        resource: &ResourceId,
        conn: u64,
        available: bool,
        why: String,
    ) {
        let resource = resource.clone();
        self.ask(group, |reply| Msg::Availability {
            resource,
            conn: Some(conn),
            available,
            why: Some(why),
            reply,
        })
        .await
    }

    /// Session events of `resource` that the store has just committed.
    pub async fn sessions(
        &self,
        group: &GroupName,
        resource: &ResourceId,
        events: Vec<SessionEvent>,
    ) {
        if events.is_empty() {
            return;
        }
        let resource = resource.clone();
        self.ask(group, |reply| Msg::Sessions {
            resource,
            events,
            reply,
        })
        .await
    }

    /// Handles the deadlines of `group` due at the clock's now (the actor's
    /// own timer does this too; tests with a
    /// [`ManualClock`](crate::clock::ManualClock) call it).
    pub async fn tick(&self, group: &GroupName) -> Result<(), ActorError> {
        let handle = self
            .actors()
            .get(group)
            .cloned()
            .ok_or_else(|| ActorError::NotRunning(group.to_string()))?;
        let (reply, rx) = oneshot::channel();
        handle
            .tx
            .send(Msg::Tick { reply })
            .await
            .map_err(|_| ActorError::NotRunning(group.to_string()))?;
        rx.await
            .map_err(|_| ActorError::NotRunning(group.to_string()))
    }

    /// The actor's state of `group`.
    pub async fn view(&self, group: &GroupName) -> Result<GroupView, ActorError> {
        let handle = self
            .actors()
            .get(group)
            .cloned()
            .ok_or_else(|| ActorError::NotRunning(group.to_string()))?;
        let (reply, rx) = oneshot::channel();
        handle
            .tx
            .send(Msg::View { reply })
            .await
            .map_err(|_| ActorError::NotRunning(group.to_string()))?;
        rx.await
            .map_err(|_| ActorError::NotRunning(group.to_string()))
    }
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
}

impl Actor {
    async fn run(
        &mut self,
        mut inbox: mpsc::Receiver<Msg>,
        token: CancellationToken,
    ) -> Result<(), ActorError> {
        // A group already expired when its actor starts (broker restart)
        // starts closed.
        self.apply_status();
        self.start_base().await?;
        self.restore_disconnects().await?;
        self.restore_retained().await?;
        self.restore_gone().await?;
        // Agents that named the group before it had an actor join now.
        self.adopt(None).await;
        self.commit().await?;
        if self.settle_publish().await? {
            return Ok(());
        }
        loop {
            let deadline = match self.closed {
                Some(_) => None,
                None => match (self.engine.poll_deadline(), self.routing.next_deadline()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                },
            };
            // Expiry disconnects to retry are due while closed, too.
            let deadline = match (deadline, self.disconnects.next_due()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let deadline = match (deadline, self.gone_deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
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
            match msg {
                None => self.timeout(),
                Some(Msg::Tick { reply }) => {
                    self.timeout();
                    self.commit().await?;
                    let _ = reply.send(());
                    continue;
                }
                Some(Msg::View { reply }) => {
                    let _ = reply.send(self.view());
                    continue;
                }
                Some(Msg::Joined {
                    resource,
                    conn,
                    sessions,
                    reply,
                }) => {
                    self.join(resource, conn, sessions).await;
                    self.commit().await?;
                    let stop = self.settle_publish().await?;
                    let _ = reply.send(());
                    if stop {
                        return Ok(());
                    }
                    continue;
                }
                Some(Msg::Left {
                    resource,
                    conn,
                    reply,
                }) => {
                    if self.current_conn(&resource, conn, false) {
                        self.left(resource);
                    }
                    self.commit().await?;
                    let _ = reply.send(());
                    continue;
                }
                Some(Msg::Availability {
                    resource,
                    conn,
                    available,
                    why,
                    reply,
                }) => {
                    let current = self.current_conn(&resource, conn, false);
                    if let Some(id) = self.to_engine.get(&resource).cloned().filter(|_| current) {
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
                    self.commit().await?;
                    let _ = reply.send(());
                    continue;
                }
                Some(Msg::Sessions {
                    resource,
                    events,
                    reply,
                }) => {
                    if let Some(id) = self.to_engine.get(&resource).cloned() {
                        self.check_users(&resource, &events).await;
                        for ev in events {
                            self.session_event(&id, ev);
                        }
                    }
                    self.commit().await?;
                    let _ = reply.send(());
                    continue;
                }
                Some(Msg::Reload { reply }) => {
                    self.reload().await?;
                    self.commit().await?;
                    let _ = reply.send(());
                    continue;
                }
                Some(Msg::Elastic(report)) => self.elastic_report(report),
                Some(Msg::Disconnect(report)) => self.disconnect_report(report),
                Some(Msg::Route { ask, reply }) => self.route(ask, reply),
                Some(Msg::CancelRoute { session, reply }) => {
                    self.cancel_route(session);
                    self.commit().await?;
                    let _ = reply.send(());
                    continue;
                }
                Some(Msg::Streaming {
                    resource,
                    address,
                    reply,
                }) => {
                    self.set_address(resource, address);
                    let _ = reply.send(());
                    continue;
                }
                Some(Msg::Presence {
                    resource,
                    report,
                    reply,
                }) => {
                    self.presence(&resource, report);
                    self.commit().await?;
                    let _ = reply.send(());
                    continue;
                }
            }
            self.commit().await?;
            if self.settle_publish().await? {
                return Ok(());
            }
        }
    }

    /// An agent of the group registered on connection `conn` (`None`: not a
    /// connection's report) with `sessions` recorded open on its host.
    async fn join(&mut self, resource: ResourceId, conn: Option<u64>, sessions: Vec<SessionId>) {
        if !self.current_conn(&resource, conn, true) {
            return;
        }
        let facts = self.host_facts(&resource).await;
        if !self.flagged.contains_key(&resource) && !self.recorded_flags.contains_key(&resource) {
            let flag = self.recorded_flag(&resource).await;
            self.recorded_flags
                .insert(resource.clone(), flag.unwrap_or_default());
        }
        self.joined(resource.clone(), sessions, facts.as_ref());
        if self.to_engine.contains_key(&resource)
            && self.applied_version(&resource).await < self.row.policy_version
        {
            self.push_policy(&resource);
        }
    }

    /// Records a session started for a user the broker does not know (no
    /// `ferryctl user create`): it counts as reported (it happened on the
    /// host), but an operator should know that nobody was routed there.
    async fn check_users(&mut self, resource: &ResourceId, events: &[SessionEvent]) {
        let started: Vec<(SessionId, ferry_common::UserId)> = events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Started { session, user, .. } => {
                    Some((session.clone(), user.clone()))
                }
                SessionEvent::Ended { .. } => None,
            })
            .collect();
        if started.is_empty() {
            return;
        }
        let users = started.iter().map(|(_, u)| u.clone()).collect();
        let known = self.shared.store.known_users(users).await;
        let Ok(known) = known else { return };
        for ((session, user), known) in started.into_iter().zip(known) {
            if !known {
                self.note(
                    "unknown-user",
                    format!(
                        "session {session} on {resource} started for user {user}, whom the \
                         broker does not know (create it with `ferryctl user create`); it \
                         counts, but no route led there"
                    ),
                );
            }
        }
    }

    /// Takes in agents that named this group and are connected, but joined
    /// when the group had no actor (published after they connected, a
    /// broker restart) or no slot for them (an elastic id not asked for
    /// yet): `only` these resources, or every such agent when `None`. What
    /// the group counts of each is what the store records open on it, read
    /// here in the actor's turn: a session event committed before the read
    /// is in it, one committed after it is in the inbox behind this.
    async fn adopt(&mut self, only: Option<&[ResourceId]>) {
        let Some(registry) = self.shared.registry.upgrade() else {
            return;
        };
        for (resource, conn, live) in registry.members(&self.row.name) {
            if only.is_some_and(|o| !o.contains(&resource)) {
                continue;
            }
            let sessions = match self.shared.store.open_sessions_of(&resource).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(group = %self.row.name, %resource,
                        "read open sessions to take the host in: {e}; it joins when it reconnects");
                    continue;
                }
            };
            if let Some(address) = live.streaming {
                self.set_address(resource.clone(), address);
            }
            self.join(resource.clone(), Some(conn), sessions).await;
            if !live.available || live.draining {
                // Its link tells only changes: say what holds now.
                if let Some(id) = self.to_engine.get(&resource).cloned() {
                    self.input(Input::Unavailable { resource: id });
                }
            }
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

    /// The host facts the store has for `resource` (written with its
    /// registration, before the actor hears of the join). `None` if unknown
    /// or unreadable: the host is then not checked against the spec.
    async fn host_facts(&self, resource: &ResourceId) -> Option<HostFacts> {
        match self.shared.store.host_facts(resource).await {
            Ok(facts) => facts,
            Err(e) => {
                tracing::warn!(group = %self.row.name, %resource, "read host facts: {e}");
                None
            }
        }
    }

    /// Flags a host below the group's spec (it still serves: operators
    /// decide), or lifts the flag once it re-joins with a host that fits.
    fn check_host(&mut self, resource: &ResourceId, facts: Option<&HostFacts>) {
        let Some(facts) = facts else { return };
        match hostfit::shortfall(&self.row.spec, facts) {
            Some(short) => self.flag(
                resource,
                format!(
                    "resource {resource} joined group {} with a host below its spec: it {short}; \
                     it is used, operators decide",
                    self.row.name
                ),
            ),
            None => {
                if self.flagged.remove(resource).is_some() {
                    self.note(
                        "flag-lifted",
                        format!(
                            "resource {resource} re-joined with a host that fits spec {}",
                            self.row.spec
                        ),
                    );
                }
            }
        }
    }

    fn joined(
        &mut self,
        resource: ResourceId,
        sessions: Vec<SessionId>,
        facts: Option<&HostFacts>,
    ) {
        let id = match self.to_engine.get(&resource).cloned() {
            Some(id) => id,
            None => {
                if let Some(e) = self.elastic_engine_id(&resource) {
                    if self.state_of(&e) != Some(ResourceState::Pending) {
                        self.flag_unused(
                            &resource,
                            format!(
                                "resource {resource} registered for group {} with an elastic id \
                                 the group did not ask for; not used until a scale-out asks \
                                 for it",
                                self.row.name
                            ),
                        );
                        return;
                    }
                    self.bind(&resource, e.clone());
                    self.lift_unused(&resource, &format!("elastic resource {e}"));
                    e
                } else if let Some(slot) = self.base_slot_for(&resource) {
                    self.slots[slot] = Some(resource.clone());
                    let Ok(slot_id) = ResourceId::new(format!("b{}", slot + 1)) else {
                        return;
                    };
                    self.bind(&resource, slot_id.clone());
                    self.lift_unused(&resource, &format!("base resource {slot_id}"));
                    self.base_registered(&resource, &slot_id);
                    let at = self.now();
                    self.intervals.push(IntervalOp::Open {
                        resource: resource.clone(),
                        class: Class::Base.as_str(),
                        at,
                    });
                    self.note(
                        "resource",
                        format!(
                            "resource {resource} joined as base resource {} of {}",
                            slot + 1,
                            self.row.base
                        ),
                    );
                    slot_id
                } else {
                    self.flag_unused(
                        &resource,
                        format!(
                            "resource {resource} registered for group {} whose {} base \
                             resource(s) are all taken; not used",
                            self.row.name, self.row.base
                        ),
                    );
                    return;
                }
            }
        };
        self.check_host(&resource, facts);
        self.host_back(&resource);
        match self.state_of(&id) {
            Some(ResourceState::Pending) => {
                self.input(Input::Created {
                    resource: id.clone(),
                });
            }
            Some(ResourceState::Ready) => {
                self.input(Input::Available {
                    resource: id.clone(),
                });
            }
            // Releasing: it is being drained for removal; it comes back only
            // to finish its sessions. Released: gone for the engine.
            _ => {}
        }
        let now_on_host: BTreeSet<SessionId> = sessions.into_iter().collect();
        let known = self.sessions.get(&id).cloned().unwrap_or_default();
        for gone in known.difference(&now_on_host) {
            self.input(Input::Leave {
                session: gone.clone(),
            });
        }
        for new in now_on_host.difference(&known) {
            self.input(Input::Occupy {
                session: new.clone(),
                resource: id.clone(),
            });
        }
        if self.closed.is_some() {
            for session in &now_on_host {
                self.disconnect(&resource, session.clone());
            }
        }
        self.sessions.insert(id, now_on_host);
    }

    /// Flags an agent of the group that takes no slot.
    fn flag_unused(&mut self, resource: &ResourceId, message: String) {
        self.flag(resource, message);
        self.unused.insert(resource.clone());
    }

    /// An agent flagged as not used takes a slot (`now`), or left: its flag
    /// no longer says what holds.
    fn lift_unused(&mut self, resource: &ResourceId, now: &str) {
        if self.unused.remove(resource) && self.flagged.remove(resource).is_some() {
            self.note(
                "flag-lifted",
                format!("resource {resource} is used now: it joined as {now}"),
            );
        }
    }

    /// The newest `flagged` event of `resource` in the group, unless a
    /// `flag-lifted` came after it.
    async fn recorded_flag(&self, resource: &ResourceId) -> Option<String> {
        match self
            .shared
            .store
            .recorded_flag(self.row.num, resource)
            .await
        {
            Ok(flag) => flag,
            Err(e) => {
                tracing::warn!(group = %self.row.name, %resource, "read recorded flags: {e}");
                None
            }
        }
    }

    fn flag(&mut self, resource: &ResourceId, message: String) {
        if self.recorded_flags.get(resource) == Some(&message) {
            // Recorded by an earlier run of the actor: kept, not repeated.
            self.flagged.insert(resource.clone(), message);
            return;
        }
        if !self.flagged.contains_key(resource) {
            tracing::warn!(group = %self.row.name, "{message}");
            self.flagged.insert(resource.clone(), message.clone());
            self.note("flagged", message);
        }
    }

    /// Closes or reopens the group after its status changed.
    fn apply_status(&mut self) {
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
    fn updating(&self) -> bool {
        self.row.status == super::lifecycle::Status::Updating.as_str()
    }

    /// The group expired: freeze the engine and disconnect every open session.
    fn close(&mut self) {
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
    fn reopen(&mut self) {
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
        let live = self
            .shared
            .registry
            .upgrade()
            .map(|r| r.snapshot())
            .unwrap_or_default();
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

    /// Asks the agent of `real` to end `session` because the group expired,
    /// without holding up the actor: the attempt runs in its own task and
    /// reports to the actor ([`Actor::disconnect_report`]), which records
    /// it and, after a failure, tries again later while the session is open.
    /// An attempt in flight is not doubled; a retry that was waiting (its
    /// agent just re-joined) is made now.
    fn disconnect(&mut self, real: &ResourceId, session: SessionId) {
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

    fn launch_disconnect(&self, real: ResourceId, session: SessionId, attempt: u32) {
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
    fn session_open_on(&self, real: &ResourceId, session: &SessionId) -> bool {
        self.to_engine
            .get(real)
            .and_then(|id| self.sessions.get(id))
            .is_some_and(|set| set.contains(session))
    }

    /// Records a disconnect attempt's outcome; after a failure, schedules
    /// the next attempt while the group is closed and the session open.
    fn disconnect_report(&mut self, r: DisconnectReport) {
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
    fn retry_disconnects(&mut self) {
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

    fn left(&mut self, resource: ResourceId) {
        let Some(id) = self.to_engine.get(&resource).cloned() else {
            // A flagged agent that took no slot went away: nothing to flag.
            if self.unused.remove(&resource) {
                self.flagged.remove(&resource);
            }
            return;
        };
        match self.state_of(&id) {
            Some(ResourceState::Releasing) => {
                self.input(Input::Released { resource: id });
            }
            Some(ResourceState::Ready) => {
                self.input(Input::Unavailable {
                    resource: id.clone(),
                });
                self.host_left(&resource, &id);
            }
            _ => {}
        }
    }

    fn session_event(&mut self, id: &ResourceId, ev: SessionEvent) {
        if self.closed.is_some() {
            match ev {
                SessionEvent::Started { session, .. } => {
                    let real = self.external(id);
                    self.note(
                        "rejected",
                        format!(
                            "rejected: session {session} on {real} started after group {} \
                             expired; asking its agent to disconnect it",
                            self.row.name
                        ),
                    );
                    self.sessions
                        .entry(id.clone())
                        .or_default()
                        .insert(session.clone());
                    self.disconnect(&real, session);
                }
                SessionEvent::Ended { session, .. } => {
                    if let Some(set) = self.sessions.get_mut(id) {
                        set.remove(&session);
                    }
                }
            }
            return;
        }
        match ev {
            SessionEvent::Started { session, user, .. } => {
                // A routed session connects on its reservation; any other
                // occupies a slot as the host reports it.
                let counted = self.route_started(id, &session, &user)
                    || self.input(Input::Occupy {
                        session: session.clone(),
                        resource: id.clone(),
                    });
                if counted {
                    self.sessions.entry(id.clone()).or_default().insert(session);
                }
            }
            SessionEvent::Ended { session, .. } => {
                if let Some(set) = self.sessions.get_mut(id) {
                    set.remove(&session);
                }
                self.route_ended(&session);
                self.input(Input::Leave { session });
            }
        }
    }

    /// Ends `session` on `real` at `at` because the broker decided so (its
    /// retention ran out, its host stayed away): the group frees its slot
    /// now and its record ends at `at` with `reason` in the next commit,
    /// whether or not the host can close it. The host's own later report of
    /// the end does not move it (an earlier one does: see the store).
    fn end_by_broker(
        &mut self,
        real: &ResourceId,
        session: &SessionId,
        at: UnixMillis,
        reason: &str,
    ) {
        self.ends.push(BrokerEnd {
            resource: real.clone(),
            session: session.clone(),
            at,
            reason: reason.to_owned(),
        });
        if let Some(set) = self
            .to_engine
            .get(real)
            .and_then(|id| self.sessions.get_mut(id))
        {
            set.remove(session);
        }
        self.route_ended(session);
        if self.engine.session_resource(session).is_some() {
            self.input(Input::Leave {
                session: session.clone(),
            });
        }
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
            let live = self
                .shared
                .registry
                .upgrade()
                .map(|r| r.snapshot())
                .unwrap_or_default();
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

    /// The newest policy version `resource` acknowledged for this group; 0
    /// when none (or unreadable: pushing again is harmless).
    async fn applied_version(&self, resource: &ResourceId) -> u64 {
        match self
            .shared
            .store
            .applied_policy_version(self.row.num, resource)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(group = %self.row.name, %resource, "read applied policy: {e}");
                0
            }
        }
    }

    /// Sends the group's current policy to the agent of `real` without
    /// holding up the actor; the acknowledgement is committed, a failure is
    /// written to the group's events.
    fn push_policy(&mut self, real: &ResourceId) {
        let version = self.row.policy_version;
        let document = match policy_document(&self.row.policy, &self.row.parts) {
            Ok(d) => d,
            Err(why) => {
                self.note(
                    "policy-failed",
                    format!("policy version {version} not sent to {real}: {why}"),
                );
                return;
            }
        };
        let (num, group, resource) = (self.row.num, self.row.name.clone(), real.clone());
        let ticket = self.shared.policy_pushes.claim(num, &resource);
        let push = policy_push::Push {
            num,
            group,
            resource,
            version,
            document,
            ticket,
        };
        self.shared
            .tracker
            .spawn(policy_push::run(self.shared.clone(), push));
    }

    /// Turns the engine's decisions into events and agent commands.
    fn take_decisions(&mut self) {
        let decisions: Vec<Decision> = self.engine.drain_decisions().collect();
        for d in decisions {
            self.elastic.on_decision(&d);
            let message = match &d.action {
                Action::ScaleOut { resources } => {
                    let real: Vec<ResourceId> =
                        resources.iter().map(|r| self.external(r)).collect();
                    let names: Vec<String> = real.iter().map(|r| r.to_string()).collect();
                    self.to_adopt.extend(real);
                    format!(
                        "scale-out: asked for {} because {}; an agent named for it \
                         completes the creation",
                        names.join(", "),
                        d.reason
                    )
                }
                Action::Created { resource } => {
                    let real = self.external(resource);
                    self.intervals.push(IntervalOp::Open {
                        resource: real.clone(),
                        class: Class::Elastic.as_str(),
                        at: d.at,
                    });
                    format!("created: {real} is ready")
                }
                Action::ScaleIn { resource } => {
                    let real = self.external(resource);
                    self.drain(&real, resource);
                    format!(
                        "scale-in: {real} is drained for release because {}",
                        d.reason
                    )
                }
                Action::Released { resource } => {
                    let real = self.external(resource);
                    self.intervals.push(IntervalOp::Close {
                        resource: real.clone(),
                        at: d.at,
                    });
                    format!("released: {real} is gone")
                }
                Action::Placed { session, resource } => {
                    self.route_decision(session, Some(resource), d.at);
                    format!(
                        "placed: session {session} on {} because {}",
                        self.external(resource),
                        d.reason
                    )
                }
                Action::Rejected { session } => {
                    self.route_decision(session, None, d.at);
                    format!("rejected: session {session} because {}", d.reason)
                }
            };
            self.notes.push((d.at, d.action.name(), message));
        }
    }

    /// Sends `Drain` to a scaled-in resource's agent without holding up the
    /// actor. An agent that is not connected is gone already: released.
    fn drain(&mut self, real: &ResourceId, engine_id: &ResourceId) {
        let registry = self.shared.registry.upgrade();
        let connected = registry
            .as_ref()
            .is_some_and(|r| r.snapshot().contains_key(real));
        if !connected {
            // Deferred: the engine is inside `take_decisions`' loop; the
            // release is applied as a new input right after.
            let id = engine_id.clone();
            let now = UnixMillis(self.last_now);
            if let Err(e) = self.engine.handle(now, Input::Released { resource: id }) {
                tracing::warn!(group = %self.row.name, "release of {real}: {e}");
            }
            return;
        }
        if self.elastic.provisioned() {
            // Issue 6: the agent's answer to `Drain` is the release.
            self.elastic.release(real, engine_id);
            return;
        }
        let Some(registry) = registry else { return };
        let real = real.clone();
        let group = self.row.name.clone();
        self.shared.tracker.spawn(async move {
            match registry
                .command(&real, Command::Drain, COMMAND_TIMEOUT)
                .await
            {
                Ok(outcome) => {
                    tracing::info!(%group, resource = %real, ?outcome, "scale-in drain")
                }
                Err(e) => tracing::warn!(%group, resource = %real, "scale-in drain: {e}"),
            }
        });
    }

    /// Writes the pending events in one transaction. The engine's decision
    /// stands whether or not this succeeds; a store failure stops the actor
    /// (its group is restarted from the store by the next `sync`).
    async fn commit(&mut self) -> Result<(), ActorError> {
        // Agents already connected for the elastic ids just asked for take
        // their slots first (their joins' decisions go into this commit).
        while !self.to_adopt.is_empty() {
            let asked = std::mem::take(&mut self.to_adopt);
            self.adopt(Some(&asked)).await;
        }
        // Slots of route requests whose client went away.
        self.flush_deferred_leaves();
        // Decisions made while handling a deferred release.
        self.take_decisions();
        let commit = GroupCommit {
            disconnects: self.disconnect_ops(),
            retained: self.retention_ops(),
            notes: std::mem::take(&mut self.notes),
            intervals: std::mem::take(&mut self.intervals),
            ends: std::mem::take(&mut self.ends),
            elastic: self.elastic.take_ops(),
        };
        if commit.is_empty() {
            return Ok(());
        }
        self.shared
            .store
            .commit_group(self.row.num, self.row.billing.clone(), commit)
            .await?;
        Ok(())
    }

    // ---- Elastic resources (issue 6; the logic is in `super::elastic`) ----

    /// Puts the elastic resources of an earlier run back in service: their
    /// agents find their slots when they reconnect; releasing ones are
    /// released now (their agent's answer was lost with the broker).
    fn restore_elastic(&mut self, restored: Vec<(crate::engine::RestoredElastic, ResourceId)>) {
        use crate::engine::RestoredState;
        for (r, real) in restored {
            self.bind(&real, r.id.clone());
            let what = match r.state {
                RestoredState::Pending => {
                    self.elastic
                        .await_registration(r.id.clone(), r.requested_at);
                    self.elastic.resume(real.clone());
                    "pending: waiting for its agent"
                }
                RestoredState::Ready { .. } => {
                    self.elastic.resume(real.clone());
                    "ready: billing goes on; it takes sessions when its agent is back"
                }
                RestoredState::Releasing { .. } => {
                    self.input(Input::Released {
                        resource: r.id.clone(),
                    });
                    "releasing: released now"
                }
            };
            self.note(
                "restored",
                format!(
                    "restored: elastic resource {real} ({}) of the earlier broker run is {what}",
                    r.id
                ),
            );
        }
    }

    /// A provisioning task's outcome.
    fn elastic_report(&mut self, report: elastic::Report) {
        use elastic::Report;
        let Some(report) = self.base_report(report) else {
            return;
        };
        match report {
            Report::CreateFailed { engine_id, why } => {
                let real = self.external(&engine_id);
                if self.input(Input::CreateFailed {
                    resource: engine_id.clone(),
                }) {
                    let now = self.now();
                    self.elastic.mark_failed(&engine_id, now);
                }
                let message = format!(
                    "create-failed: {real} given up: {why}; it no longer counts in capacity and was never billed"
                );
                self.note("create-failed", message.clone());
                self.flagged.insert(real, message);
            }
            Report::RegisterDeadline { engine_id } => {
                if self.state_of(&engine_id) != Some(ResourceState::Pending) {
                    return;
                }
                let real = self.external(&engine_id);
                let timeout = self
                    .shared
                    .provisioning
                    .get()
                    .map(|p| crate::provision::show(p.config.register_timeout))
                    .unwrap_or_default();
                let message = format!(
                    "register-timeout: the agent of {real} did not register within {timeout}; \
                     the creation failed and it is deleted"
                );
                self.note("register-timeout", message.clone());
                self.flagged.insert(real, message);
                if self.input(Input::CreateFailed {
                    resource: engine_id.clone(),
                }) {
                    let now = self.now();
                    self.elastic.mark_failed(&engine_id, now);
                }
            }
            Report::Drained { engine_id, outcome } => {
                if self.state_of(&engine_id) == Some(ResourceState::Releasing) {
                    let real = self.external(&engine_id);
                    self.note("drained", format!("drained: {real}: {outcome}"));
                    self.input(Input::Released {
                        resource: engine_id,
                    });
                }
            }
            Report::DeleteFailed { resource, why } => {
                self.note("delete-failed", format!("delete-failed: {why}"));
                // Replaces any earlier flag of it (e.g. its host size):
                // this is what an operator must act on now.
                let message = format!("resource {resource} was not deleted: {why}");
                tracing::warn!(group = %self.row.name, "{message}");
                self.flagged.insert(resource, message);
            }
        }
    }

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
    use crate::store::StoreOptions;
    use ferry_common::admin::{BillingSpec, GroupSpec, PolicySpec, SessionType};
    use ferry_common::wire::EndReason;
    use std::time::Duration;

    const T0: i64 = 1_700_000_000_000;

    fn rid(s: &str) -> ResourceId {
        s.parse().expect("resource id")
    }

    fn sid(s: &str) -> SessionId {
        s.parse().expect("session id")
    }

    fn spec(name: &str) -> GroupSpec {
        GroupSpec {
            name: Some(name.parse().expect("name")),
            region: "cn-hangzhou".into(),
            office_network: "office-net-1".into(),
            spec: "office-4c8g".into(),
            image: "img-1".into(),
            billing: BillingSpec::PayAsYouGo,
            base_resources: 2,
            session_type: SessionType::Independent,
            users: vec![],
            policy: PolicySpec {
                concurrent_sessions: Some(2),
                usage_threshold: Some(50),
                scale_out_step: Some(1),
                max_elastic: Some(2),
                max_idle_ms: Some(600_000),
                scale_in_cooldown_ms: Some(60_000),
                ..PolicySpec::default()
            },
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        service: GroupService,
        clock: ManualClock,
        actors: GroupActors,
        _registry: Arc<Registry>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            Store::open(&dir.path().join("ferry.db"), StoreOptions::default()).expect("store");
        let registry = Arc::new(Registry::new());
        let clock = ManualClock::new(UnixMillis(T0));
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let actors = GroupActors::new(
            store.clone(),
            &registry,
            &GroupsConfig {
                clock: clock.clock(),
                ..GroupsConfig::default()
            },
            tracker.clone(),
            shutdown.clone(),
        );
        Fixture {
            service: GroupService::new(store.clone(), Default::default()),
            _dir: dir,
            store,
            clock,
            actors,
            _registry: registry,
            shutdown,
            tracker,
        }
    }

    impl Fixture {
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
            self.shutdown.cancel();
            self.tracker.close();
            self.tracker.wait().await;
            self.store.close().await;
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

    #[tokio::test]
    async fn reports_drive_scale_out_creation_scale_in_and_release_with_recorded_reasons() {
        let f = fixture();
        let g: GroupName = "g1".parse().expect("name");
        f.service
            .publish(spec("g1"), UnixMillis(T0))
            .await
            .expect("publish");
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
        f.service
            .publish(spec("g1"), UnixMillis(T0))
            .await
            .expect("publish");
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
        f.service
            .publish(spec("g1"), UnixMillis(T0))
            .await
            .expect("publish");
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
        f.service
            .publish(spec("g1"), UnixMillis(T0))
            .await
            .expect("publish");
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
        f.service
            .publish(spec("g1"), UnixMillis(T0))
            .await
            .expect("publish");
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
