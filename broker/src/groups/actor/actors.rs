//! The set of group actors: one per live group, started, told to reread
//! their row, or stopped as the group's row says ([`GroupActors::sync`]);
//! the lifecycle follower that applies lifecycle deadlines; and the way the
//! link, routing and the admin socket hand reports and questions to a
//! group's actor.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ferry_common::wire::{Command, CommandOutcome, SessionEvent};
use ferry_common::{GroupName, ResourceId, SessionId};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::elastic::{Elastic, ElasticParts};
use super::{
    base, connections, disconnects, elastic, gone, is_live, load_row, payment, policy_push,
    retry_at, routing, Actor, ActorError, Disconnects, GroupRow, GroupView, Msg, GROUP_INBOX_LEN,
};
use crate::clock::Clock;
use crate::config::GroupsConfig;
use crate::engine::{Group, Input};
use crate::groups::{GroupService, RETRY_AFTER_ERROR};
use crate::registry::{Registry, COMMAND_TIMEOUT};
use crate::store::{Store, StoreError};

/// Every group that needs an actor and the live groups under their names.
#[derive(Clone)]
pub struct GroupActors {
    shared: Arc<Shared>,
}

pub(super) struct Shared {
    /// The provisioner of elastic resources; `None`: hand-configured
    /// elastic hosts.
    pub(super) provisioning: Option<Arc<crate::provision::Provisioning>>,
    pub(super) store: Store,
    /// Agents are reached through it; it holds nothing of the actors.
    pub(super) registry: Arc<Registry>,
    /// The broker's one group service: lifecycle deadlines, provisioned
    /// base resources.
    pub(super) service: GroupService,
    pub(super) clock: Clock,
    /// Group settings (prices and currency, for usage reports).
    pub(super) config: Arc<GroupsConfig>,
    pub(super) tracker: TaskTracker,
    pub(super) shutdown: CancellationToken,
    /// Running actors by group name. A std mutex: only map updates under it.
    pub(super) actors: Mutex<HashMap<GroupName, ActorHandle>>,
    /// Wakes the lifecycle follower (see [`GroupActors::start_all`]) after an
    /// operator's change, which may move a lifecycle deadline.
    pub(super) lifecycle: Notify,
    /// Whether the lifecycle follower was started (it runs once per broker).
    pub(super) follower_started: AtomicBool,
    /// Held while an actor is brought in line with its row: the broker's
    /// start, the lifecycle follower and admin verbs may ask at once, and
    /// two of them must never both start an actor for one group.
    pub(super) syncing: tokio::sync::Mutex<()>,
    /// Deletes of retired groups' elastic resources in progress.
    pub(super) retiring: Arc<elastic::Retiring>,
    /// Woken after a group's row changed: image updates start or stop
    /// with their group's status (`crate::rollout`).
    pub(super) rollouts: crate::rollout::Board,
    /// Policy pushes trying again ([`policy_push`]).
    pub(super) policy_pushes: policy_push::InFlight,
    /// The groups this broker owns.
    pub(super) ownership: crate::cluster::Ownership,
}

/// What the group actors are built from, once, by the daemon.
pub struct ActorsParts {
    pub store: Store,
    /// Live connections: how actors reach agents.
    pub registry: Arc<Registry>,
    /// The broker's one group service (its settings are the actors').
    pub service: GroupService,
    /// The provisioner of elastic resources, if one is configured.
    pub provisioning: Option<Arc<crate::provision::Provisioning>>,
    /// The rollouts' board, woken when a group's row changed.
    pub rollouts: crate::rollout::Board,
    /// Where actors and their tasks are spawned.
    pub tracker: TaskTracker,
    /// Actors stop when it is cancelled.
    pub shutdown: CancellationToken,
    /// The groups this broker owns: only their actors run.
    pub ownership: crate::cluster::Ownership,
}

#[derive(Clone)]
pub(super) struct ActorHandle {
    pub(super) tx: mpsc::Sender<Msg>,
    token: CancellationToken,
}

impl Shared {
    /// Sends `command` to `resource`'s agent and waits for its outcome. Not
    /// reaching the agent, or the broker shutting down first, is the error's
    /// text (for the group's events).
    pub(super) async fn command(
        &self,
        resource: &ResourceId,
        command: Command,
    ) -> Result<CommandOutcome, String> {
        tokio::select! {
            r = self.registry.command(resource, command, COMMAND_TIMEOUT) => r.map_err(|e| e.to_string()),
            _ = self.shutdown.cancelled() => {
                Err("the broker shut down before the agent answered".to_owned())
            }
        }
    }

    /// Writes one group event, stamped with the groups' clock.
    pub(super) async fn event(
        &self,
        num: i64,
        kind: &'static str,
        message: String,
    ) -> Result<(), StoreError> {
        let at = self.clock.now();
        self.store.group_event(num, at, kind, message).await
    }
}

impl GroupActors {
    /// No actor runs yet; call [`GroupActors::start_all`]. Actors are spawned
    /// on `parts.tracker` and stop when `parts.shutdown` is cancelled.
    pub fn new(parts: ActorsParts) -> GroupActors {
        let config = parts.service.config().clone();
        GroupActors {
            shared: Arc::new(Shared {
                store: parts.store,
                registry: parts.registry,
                clock: config.clock.clone(),
                config: Arc::new(config),
                service: parts.service,
                tracker: parts.tracker,
                shutdown: parts.shutdown,
                actors: Mutex::default(),
                lifecycle: Notify::new(),
                follower_started: AtomicBool::new(false),
                syncing: tokio::sync::Mutex::new(()),
                provisioning: parts.provisioning,
                retiring: Arc::default(),
                rollouts: parts.rollouts,
                policy_pushes: policy_push::InFlight::default(),
                ownership: parts.ownership,
            }),
        }
    }

    pub(super) fn actors(&self) -> std::sync::MutexGuard<'_, HashMap<GroupName, ActorHandle>> {
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
                ctx: s.provisioning.clone(),
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
    /// or gone one stops and its metering ends; and starts again the actor of
    /// every live group whose actor stopped on a failure.
    ///
    /// This is the daemon's one lifecycle-deadline task. Running `run_due`
    /// here means a status is never read before the step
    /// that changes it was committed. Admin verbs that change a deadline call
    /// [`GroupActors::sync`], which wakes it.
    pub async fn follow_lifecycle(self) {
        let service = self.shared.service.clone();
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
                    let running: BTreeSet<String> =
                        self.running().iter().map(|g| g.to_string()).collect();
                    for (name, status) in statuses {
                        // A live group whose actor stopped on a failure
                        // (see `restart_later`) is started again.
                        let orphaned = is_live(&status) && !running.contains(&name);
                        if seen.get(&name) == Some(&status) && !orphaned {
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
        self.shared.rollouts.wake();
        let _one_at_a_time = self.shared.syncing.lock().await;
        let row = load_row(&self.shared.store, group).await?;
        let Some(row) = row.filter(|r| is_live(&r.status)) else {
            self.stop_gone(group).await?;
            return Ok(false);
        };
        if !self.shared.ownership.owns(&row.name) {
            // Another broker owns it (or nobody does yet, a new group): its
            // actor runs at its owner.
            self.stop(&row.name);
            self.shared.ownership.want_leases();
            return Ok(false);
        }
        let running = self.actors().get(&row.name).cloned();
        if let Some(handle) = running {
            let (reply, rx) = oneshot::channel();
            if handle.tx.send(Msg::Reload { reply }).await.is_ok() && rx.await.is_ok() {
                return Ok(true);
            }
            // It ended on its own (a store failure); start a fresh one.
            self.stop(&row.name);
        }
        let (mut actor, inbox, handle) = self.build(&row).await?;
        {
            let mut actors = self.actors();
            if actors.contains_key(&row.name) {
                // Another caller started it meanwhile; keep that one.
                return Ok(true);
            }
            actors.insert(row.name.clone(), handle.clone());
        }
        tracing::info!(group = %row.name, base = row.base, "group actor started");
        let this = self.clone();
        self.shared.tracker.spawn(async move {
            let name = actor.row.name.clone();
            let failed = match actor.run(inbox, handle.token).await {
                Ok(()) => false,
                Err(e) => {
                    tracing::error!(group = %name,
                        "group actor stopped: {e}; starting it again in {RETRY_AFTER_ERROR:?}");
                    true
                }
            };
            this.forget_if_closed(&name);
            if failed {
                this.restart_later().await;
            }
        });
        Ok(true)
    }

    /// `group` (a name or an id) is gone (purged, deleted), recycling or
    /// was never live: whatever runs under its names stops, its metering
    /// ends and its elastic hosts are deleted.
    async fn stop_gone(&self, group: &str) -> Result<(), ActorError> {
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
        let retention = i64::try_from(self.shared.config.retention.as_millis()).unwrap_or(i64::MAX);
        self.shared
            .store
            .stop_group_metering(group, retention, now)
            .await?;
        // Its elastic hosts go too (the actor that owned them stopped).
        self.retire(Some(group.to_owned())).await?;
        Ok(())
    }

    /// A new actor for `row`: its engine with the base slots (unavailable
    /// until agents join) and the elastic resources an earlier run left,
    /// its inbox and its handle. Nothing runs yet.
    async fn build(
        &self,
        row: &GroupRow,
    ) -> Result<(Actor, mpsc::Receiver<Msg>, ActorHandle), ActorError> {
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
        let undeleted = self.shared.store.elastic_undeleted(num).await?;
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
        let (tx, inbox) = mpsc::channel(GROUP_INBOX_LEN);
        let token = self.shared.shutdown.child_token();
        let mut actor = Actor {
            row: row.clone(),
            engine,
            last_now: now.0,
            slots: vec![None; row.base as usize],
            to_engine: HashMap::new(),
            from_engine: HashMap::new(),
            sessions: HashMap::new(),
            ignored_reports: HashMap::new(),
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
                ctx: self.shared.provisioning.clone(),
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
            decided_since: None,
            turn_started: std::time::Instant::now(),
            decided: Vec::new(),
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
        actor.delete_again(undeleted);
        Ok((actor, inbox, ActorHandle { tx, token }))
    }

    fn forget_if_closed(&self, name: &GroupName) {
        let mut actors = self.actors();
        if actors.get(name).is_some_and(|h| h.tx.is_closed()) {
            actors.remove(name);
        }
    }

    /// After an actor stopped on a failure (a full disk, say): once
    /// [`RETRY_AFTER_ERROR`] has passed, wakes the lifecycle follower, which
    /// starts again every live group without an actor. Without this a group
    /// would stay without its actor (no routing, no metering) until an
    /// operator's change or a restart.
    async fn restart_later(&self) {
        let at = retry_at(self.shared.clock.now());
        tokio::select! {
            _ = self.shared.shutdown.cancelled() => {}
            _ = self.shared.clock.sleep_until(Some(at)) => self.shared.lifecycle.notify_one(),
        }
    }

    /// Stops the actor of `group`, if one runs.
    pub fn stop(&self, group: &GroupName) {
        if let Some(h) = self.actors().remove(group) {
            h.token.cancel();
        }
    }

    /// Which groups this broker owns (only their actors run).
    pub fn ownership(&self) -> &crate::cluster::Ownership {
        &self.shared.ownership
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

    pub(super) async fn ask(
        &self,
        group: &GroupName,
        make: impl FnOnce(oneshot::Sender<()>) -> Msg,
    ) {
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
        self.request(group, |reply| Msg::Tick { reply }).await
    }

    /// The actor's state of `group`.
    pub async fn view(&self, group: &GroupName) -> Result<GroupView, ActorError> {
        self.request(group, |reply| Msg::View { reply }).await
    }

    /// Asks `group`'s actor and waits for its answer; an actor that is not
    /// running (or stops before answering) is [`ActorError::NotRunning`].
    async fn request<T>(
        &self,
        group: &GroupName,
        make: impl FnOnce(oneshot::Sender<T>) -> Msg,
    ) -> Result<T, ActorError> {
        let not_running = || ActorError::NotRunning(group.to_string());
        let handle = self.actors().get(group).cloned().ok_or_else(not_running)?;
        let (reply, rx) = oneshot::channel();
        handle
            .tx
            .send(make(reply))
            .await
            .map_err(|_| not_running())?;
        rx.await.map_err(|_| not_running())
    }
}
