//! Elastic resources for real (issue 6): what a group's actor does with the
//! engine's scale decisions when a provisioner is configured, and the
//! durable record of every elastic resource that a restarted broker
//! rebuilds its engine from (kept through the store's elastic door,
//! `crate::store::elastic`).
//!
//! Lifecycle with a provisioner:
//! - scale-out: per new resource `<group>-e<n>` a one-time enrollment token
//!   (stored hashed, living `register_timeout`) and a create through the
//!   provisioner, retried with a doubling backoff ([`RETRY_FIRST`] up to
//!   [`RETRY_MAX`]) up to `attempts` times. Every failed attempt is a
//!   `provision-failed` event with the attempt number and the command's
//!   stderr tail. A create that finally fails, or a resource whose agent has
//!   not registered `register_timeout` after the scale-out, is a failed
//!   creation for the engine (`Input::CreateFailed`): out of capacity at
//!   once, never billed (billing starts only when the agent registers),
//!   flagged (`group show`) and deleted through the provisioner.
//! - ready: its agent enrolled with the token and registered (the actor's
//!   join path): billing starts.
//! - scale-in: the engine marks it `releasing` at the decision, so no session
//!   is placed on it from then on; the agent is sent `Drain`; its answer (or
//!   its connection ending) is the release, where billing stops; then the
//!   provisioner deletes it, with the same retries. A delete that keeps
//!   failing is a `delete-failed` event and the resource is flagged (`group
//!   show`): billing has stopped, the host must be removed by hand.
//! - the group goes away (recycling, purged, deleted): its actor stops, its
//!   billing ends with it, and `retire` deletes every resource not
//!   deleted yet (pending, ready, releasing) through the provisioner, its
//!   agent asked to drain first (best effort), with the same retries and
//!   events, in tasks that end only with the broker (not the actor).
//!   `deleted_at` is recorded; a broker start retries the deletes an
//!   earlier run left. A leftover delete never touches a host of a live
//!   group that reuses the name.
//!
//! Without a provisioner, elastic hosts are configured by hand as
//! `<group>-e<n>` and only the durable record is kept.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ferry_common::wire::{Command, CommandOutcome};
use ferry_common::{GroupName, ResourceId, UnixMillis};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Msg;
use crate::clock::Clock;
use crate::engine::{Action, Decision};
use crate::engine::{Input, ResourceState};
use crate::enroll;
use crate::provision::{CreateRequest, DeleteRequest, ProvisionError, Provisioning};
use crate::registry::{Registry, COMMAND_TIMEOUT};
use crate::store::elastic::{ElasticOp, ElasticState};
use crate::store::{Store, StoreError};

// The record's reads and writes inside the actor's own restore and commit
// transactions (`super::Actor`).

/// Wait before the second attempt of a create or delete; it doubles after
/// each failure.
pub const RETRY_FIRST: Duration = Duration::from_secs(2);

/// Longest wait between two attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// What a provisioning task tells the group's actor.
#[derive(Debug)]
pub enum Report {
    /// The create gave up after its last attempt.
    CreateFailed { engine_id: ResourceId, why: String },
    /// `register_timeout` passed since the scale-out: if the resource is
    /// still pending, its creation failed.
    RegisterDeadline { engine_id: ResourceId },
    /// The agent answered `Drain` (or could not be asked): it is released.
    Drained {
        engine_id: ResourceId,
        outcome: String,
    },
    /// The delete gave up after its last attempt.
    DeleteFailed { resource: ResourceId, why: String },
}

/// The wait before attempt `attempt + 1` (attempt counts from 1).
pub fn backoff(attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    RETRY_FIRST.saturating_mul(factor).min(RETRY_MAX)
}

fn after(t: UnixMillis, d: Duration) -> UnixMillis {
    UnixMillis(t.0.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
}

/// One group's elastic resources, owned by its actor.
pub(super) struct Elastic {
    num: i64,
    group: GroupName,
    spec: String,
    ctx: Option<Arc<Provisioning>>,
    store: Store,
    registry: Arc<Registry>,
    clock: Clock,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    actor: mpsc::WeakSender<Msg>,
    /// Changes of the durable record, written with the actor's next commit.
    ops: Vec<ElasticOp>,
}

/// What [`Elastic::new`] needs from the actor.
pub(super) struct ElasticParts {
    pub num: i64,
    pub group: GroupName,
    pub spec: String,
    pub ctx: Option<Arc<Provisioning>>,
    pub store: Store,
    pub registry: Arc<Registry>,
    pub clock: Clock,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    pub(super) actor: mpsc::WeakSender<Msg>,
}

impl Elastic {
    pub fn new(p: ElasticParts) -> Elastic {
        Elastic {
            num: p.num,
            group: p.group,
            spec: p.spec,
            ctx: p.ctx,
            store: p.store,
            registry: p.registry,
            clock: p.clock,
            tracker: p.tracker,
            shutdown: p.shutdown,
            actor: p.actor,
            ops: Vec::new(),
        }
    }

    /// Whether a provisioner creates and deletes this group's resources.
    pub fn provisioned(&self) -> bool {
        self.ctx.is_some()
    }

    /// `<group>-e<n>` for the engine's `e<n>`.
    pub fn real(&self, engine_id: &ResourceId) -> Option<ResourceId> {
        ResourceId::new(format!("{}-{}", self.group, engine_id)).ok()
    }

    /// Follows one engine decision: records it, and with a provisioner
    /// starts the create or the delete.
    pub fn on_decision(&mut self, d: &Decision) {
        match &d.action {
            Action::ScaleOut { resources } => {
                for engine_id in resources {
                    let Some(resource) = self.real(engine_id) else {
                        continue;
                    };
                    self.ops.push(ElasticOp::Pending {
                        engine_id: engine_id.clone(),
                        resource: resource.clone(),
                        at: d.at,
                    });
                    self.create(engine_id.clone(), resource, d.at);
                }
            }
            Action::Created { resource } if is_elastic(resource) => {
                self.ops.push(ElasticOp::State {
                    engine_id: resource.clone(),
                    state: ElasticState::Ready,
                    at: d.at,
                })
            }
            Action::ScaleIn { resource } => self.ops.push(ElasticOp::State {
                engine_id: resource.clone(),
                state: ElasticState::Releasing,
                at: d.at,
            }),
            Action::Released { resource } if is_elastic(resource) => {
                self.ops.push(ElasticOp::State {
                    engine_id: resource.clone(),
                    state: ElasticState::Released,
                    at: d.at,
                });
                if let Some(real) = self.real(resource) {
                    self.delete(real);
                }
            }
            _ => {}
        }
    }

    /// A creation failed (after [`Elastic::on_decision`] saw its release).
    pub fn mark_failed(&mut self, engine_id: &ResourceId, at: UnixMillis) {
        self.ops.push(ElasticOp::State {
            engine_id: engine_id.clone(),
            state: ElasticState::Failed,
            at,
        });
    }

    /// Stops this actor's provisioning tasks (creates in flight, register
    /// deadlines, drains): its group failed to publish.
    pub fn cancel_tasks(&self) {
        self.shutdown.cancel();
    }

    /// `<group>-b<n>`: the base resource `n` a provisioner creates.
    pub fn base_name(&self, n: u32) -> Option<ResourceId> {
        ResourceId::new(format!("{}-b{n}", self.group)).ok()
    }

    /// The agent of base resource `engine_id` (`b<n>`) registered.
    pub fn base_ready(&mut self, engine_id: &ResourceId, at: UnixMillis) {
        self.ops.push(ElasticOp::State {
            engine_id: engine_id.clone(),
            state: ElasticState::Ready,
            at,
        });
    }

    /// Creates base resource `engine_id` (`b<n>`) as `resource` through the
    /// provisioner: its record (`pending`, `requested_at` = `at`) is
    /// committed first, then the create runs with the elastic resources'
    /// retries, events and register deadline, its outcome reported to the
    /// actor like theirs.
    pub async fn create_base(
        &self,
        engine_id: ResourceId,
        resource: ResourceId,
        at: UnixMillis,
    ) -> Result<(), StoreError> {
        self.store
            .record_pending_base(self.num, &engine_id, &resource, at)
            .await?;
        self.create(engine_id, resource, at);
        Ok(())
    }

    /// The pending record changes, for the actor's commit ([`write_ops`]).
    pub fn take_ops(&mut self) -> Vec<ElasticOp> {
        std::mem::take(&mut self.ops)
    }

    /// Scale-in of a connected agent with a provisioner: `Drain`, then the
    /// release is reported back.
    pub fn release(&self, real: &ResourceId, engine_id: &ResourceId) {
        let registry = self.registry.clone();
        let (real, engine_id) = (real.clone(), engine_id.clone());
        let actor = self.actor.clone();
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = registry.command(&real, Command::Drain, COMMAND_TIMEOUT) => r,
            };
            let outcome = match outcome {
                Ok(CommandOutcome::Done) => "the agent drained".to_owned(),
                Ok(CommandOutcome::Failed(m)) => format!("the agent could not drain: {m}"),
                Err(e) => format!("the agent was not reached: {e}"),
            };
            report(&actor, Report::Drained { engine_id, outcome }).await;
        });
    }

    fn create(&self, engine_id: ResourceId, resource: ResourceId, at: UnixMillis) {
        let Some(ctx) = self.ctx.clone() else { return };
        let (store, clock, shutdown) = (
            self.store.clone(),
            self.clock.clone(),
            self.shutdown.clone(),
        );
        let actor = self.actor.clone();
        let (num, group, spec) = (self.num, self.group.clone(), self.spec.clone());
        self.tracker.spawn(async move {
            let deadline = after(at, ctx.config.register_timeout);
            let result = create_with_retries(
                &ctx, &store, &clock, &shutdown, num, &group, &spec, &resource, deadline,
            )
            .await;
            match result {
                Ok(()) => {}
                Err(Some(why)) => {
                    report(&actor, Report::CreateFailed { engine_id, why }).await;
                    return;
                }
                Err(None) => return, // shutting down
            }
            if sleep_until(&clock, &shutdown, deadline).await {
                report(&actor, Report::RegisterDeadline { engine_id }).await;
            }
        });
    }

    /// Waits for the register deadline of a resource still pending after a
    /// broker restart (its create had been handed to the provisioner).
    pub fn await_registration(&self, engine_id: ResourceId, requested_at: UnixMillis) {
        let Some(ctx) = self.ctx.clone() else { return };
        let (clock, shutdown, actor) = (
            self.clock.clone(),
            self.shutdown.clone(),
            self.actor.clone(),
        );
        self.tracker.spawn(async move {
            let deadline = after(requested_at, ctx.config.register_timeout);
            if sleep_until(&clock, &shutdown, deadline).await {
                report(&actor, Report::RegisterDeadline { engine_id }).await;
            }
        });
    }

    /// After a restart: the provisioner brings back what it runs locally.
    pub fn resume(&self, resource: ResourceId) {
        let Some(ctx) = self.ctx.clone() else { return };
        let (store, clock, num) = (self.store.clone(), self.clock.clone(), self.num);
        self.tracker.spawn(async move {
            if let Err(e) = ctx.provisioner.resume(&resource).await {
                let message = format!("resume of {resource} after the broker restart failed: {e}");
                tracing::warn!("{message}");
                event(&store, num, clock.now(), "provision-failed", message).await;
            }
        });
    }

    fn delete(&self, resource: ResourceId) {
        let Some(ctx) = self.ctx.clone() else { return };
        let (store, clock, shutdown) = (
            self.store.clone(),
            self.clock.clone(),
            self.shutdown.clone(),
        );
        let actor = self.actor.clone();
        let (num, group) = (self.num, self.group.clone());
        self.tracker.spawn(async move {
            let result = delete_with_retries(
                &ctx, &store, &clock, &shutdown, num, group, &resource, false,
            )
            .await;
            if let Err(Some(why)) = result {
                report(&actor, Report::DeleteFailed { resource, why }).await;
            }
        });
    }
}

/// Provisioner deletes of retired groups in progress, by (group number,
/// resource): a group synced twice (recycling, then gone) or a restart
/// racing a sync does not start a second delete of the same resource.
#[derive(Default)]
pub(super) struct Retiring(std::sync::Mutex<HashSet<(i64, ResourceId)>>);

impl Retiring {
    fn claim(self: &Arc<Self>, num: i64, resource: &ResourceId) -> Option<RetireClaim> {
        let key = (num, resource.clone());
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(key.clone()).then(|| RetireClaim {
            owner: self.clone(),
            key,
        })
    }
}

/// Held by one retire task; frees its resource when the task ends.
struct RetireClaim {
    owner: Arc<Retiring>,
    key: (i64, ResourceId),
}

impl Drop for RetireClaim {
    fn drop(&mut self) {
        let mut set = self.owner.0.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&self.key);
    }
}

/// What [`retire`] needs from the daemon: its tasks outlive the group's
/// actor and end only with the broker (`shutdown`).
pub(super) struct RetireParts<'a> {
    pub ctx: Option<Arc<Provisioning>>,
    pub store: &'a Store,
    pub registry: &'a Arc<Registry>,
    pub clock: &'a Clock,
    pub tracker: &'a TaskTracker,
    pub shutdown: &'a CancellationToken,
    pub retiring: &'a Arc<Retiring>,
}

/// Deletes through the provisioner every elastic resource not deleted yet
/// (pending, ready, releasing) of the groups that went away (recycling,
/// gone, publish-failed) named `group` (a name or an id), or of every such
/// group when `group` is `None` (broker start: deletes an earlier run left
/// unfinished). Their agents are asked to drain first (best effort); then
/// the same retries, backoff and events as a scale-in delete, and
/// `deleted_at` recorded so nothing is deleted twice across restarts. A
/// resource whose id a live group's record uses again is left alone.
/// Returns how many deletes started.
pub(super) async fn retire(p: RetireParts<'_>, group: Option<String>) -> Result<usize, StoreError> {
    let Some(ctx) = p.ctx else { return Ok(0) };
    let rows = p.store.elastic_to_retire(group).await?;
    let mut started = 0;
    for row in rows {
        let (num, group, resource) = (row.group_num, row.group, row.resource);
        let Some(claim) = p.retiring.claim(num, &resource) else {
            continue;
        };
        let (ctx, store, clock, shutdown) = (
            ctx.clone(),
            p.store.clone(),
            p.clock.clone(),
            p.shutdown.clone(),
        );
        let registry = p.registry.clone();
        let connected = row.state != "pending";
        p.tracker.spawn(async move {
            let _claim = claim;
            if connected {
                let outcome = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = registry.command(&resource, Command::Drain, COMMAND_TIMEOUT) => r,
                };
                tracing::info!(%resource, ?outcome, "drain before the retired group's delete");
            }
            let result =
                delete_with_retries(&ctx, &store, &clock, &shutdown, num, group, &resource, true)
                    .await;
            if let Err(Some(why)) = result {
                let message = format!(
                    "delete-failed: {why} (the group went away; its billing stopped with it)"
                );
                tracing::warn!("{message}");
                event(&store, num, clock.now(), "delete-failed", message).await;
            }
        });
        started += 1;
    }
    Ok(started)
}

/// Delete attempts of one resource. On success `deleted_at` is recorded
/// (with `retired`, the resource of a group that went away, a pending one
/// is recorded failed and a ready or releasing one released too) and a
/// `deleted` event written. `Err(Some(why))`: gave up; `Err(None)`: the
/// broker is shutting down.
#[allow(clippy::too_many_arguments)]
async fn delete_with_retries(
    ctx: &Provisioning,
    store: &Store,
    clock: &Clock,
    shutdown: &CancellationToken,
    num: i64,
    group: GroupName,
    resource: &ResourceId,
    retired: bool,
) -> Result<(), Option<String>> {
    let req = DeleteRequest {
        group,
        resource: resource.clone(),
    };
    let attempts = ctx.config.attempts.max(1);
    let retries = Retries {
        store,
        clock,
        shutdown,
        num,
        op: "delete",
        resource,
        attempts,
    };
    for attempt in 1..=attempts {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return Err(None),
            r = ctx.provisioner.delete(&req) => r,
        };
        match result {
            Ok(()) => {
                let now = clock.now();
                let written = store
                    .record_elastic_deleted(num, resource, now, retired)
                    .await;
                if let Err(e) = written {
                    tracing::error!(%resource, "record the delete: {e}");
                }
                let message = format!(
                    "deleted: {resource} removed by the {} provisioner (attempt {attempt})",
                    ctx.provisioner.kind()
                );
                event(store, num, now, "deleted", message).await;
                return Ok(());
            }
            Err(e) => {
                let note = "; its billing stopped at its release; remove the host by hand";
                retries.failed(attempt, &e, note).await?;
            }
        }
    }
    Err(Some(format!("delete of {resource}: no attempt made")))
}

fn is_elastic(id: &ResourceId) -> bool {
    id.as_str().starts_with('e')
}

async fn report(actor: &mpsc::WeakSender<Msg>, report: Report) {
    if let Some(tx) = actor.upgrade() {
        if tx.send(Msg::Elastic(report)).await.is_err() {
            tracing::debug!("elastic report for a stopped actor");
        }
    }
}

/// One resource's create or delete attempts: the failure branch the two
/// retry loops share.
struct Retries<'a> {
    store: &'a Store,
    clock: &'a Clock,
    shutdown: &'a CancellationToken,
    num: i64,
    /// `create` or `delete`.
    op: &'static str,
    resource: &'a ResourceId,
    attempts: u32,
}

impl Retries<'_> {
    /// After failed attempt `attempt` (counting from 1): a `provision-failed`
    /// event, then the backoff. `Ok(())`: time for the next attempt;
    /// `Err(Some(why))`: that was the last one (`why` ends with `note`);
    /// `Err(None)`: the broker is shutting down.
    async fn failed(
        &self,
        attempt: u32,
        e: &ProvisionError,
        note: &str,
    ) -> Result<(), Option<String>> {
        let (op, resource, attempts) = (self.op, self.resource, self.attempts);
        // The next attempt's time is taken before the event is written:
        // whoever reads the event and moves the clock moves it past this wait.
        let wake = after(self.clock.now(), backoff(attempt));
        let message = format!(
            "provision-failed: {op} of {resource} failed (attempt {attempt} of {attempts}): {e}"
        );
        tracing::warn!("{message}");
        event(
            self.store,
            self.num,
            self.clock.now(),
            "provision-failed",
            message,
        )
        .await;
        if attempt == attempts {
            return Err(Some(format!(
                "{op} of {resource} failed {attempts} time(s), last: {e}{note}"
            )));
        }
        if !sleep_until(self.clock, self.shutdown, wake).await {
            return Err(None);
        }
        Ok(())
    }
}

/// Sleeps on the groups' clock until `t`; false if shutdown came first.
async fn sleep_until(clock: &Clock, shutdown: &CancellationToken, t: UnixMillis) -> bool {
    while clock.now() < t {
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = clock.sleep_until(Some(t)) => {}
        }
    }
    true
}

/// Appends one group event (a provisioning task's own record).
pub async fn event(store: &Store, num: i64, at: UnixMillis, kind: &'static str, message: String) {
    let written = store
        .record_provisioning_event(num, at, kind, message)
        .await;
    if let Err(e) = written {
        tracing::error!(num, "record a {kind} event: {e}");
    }
}

/// Token, then create attempts. `Err(Some(why))`: gave up; `Err(None)`:
/// the broker is shutting down.
#[allow(clippy::too_many_arguments)]
async fn create_with_retries(
    ctx: &Provisioning,
    store: &Store,
    clock: &Clock,
    shutdown: &CancellationToken,
    num: i64,
    group: &GroupName,
    spec: &str,
    resource: &ResourceId,
    token_expiry: UnixMillis,
) -> Result<(), Option<String>> {
    let token = enroll::new_token().map_err(|e| Some(e.to_string()))?;
    let now = clock.now();
    let image = store
        .record_enroll_token(num, resource, enroll::token_hash(&token), now, token_expiry)
        .await
        .map_err(|e| Some(format!("store the enrollment token of {resource}: {e}")))?;
    let req = CreateRequest {
        group: group.clone(),
        spec: spec.to_owned(),
        image,
        resource: resource.clone(),
        enrollment_token: token,
        broker_addr: ctx.broker_addr.clone(),
        ca_cert_path: ctx.ca_cert.clone(),
    };
    let attempts = ctx.config.attempts.max(1);
    let retries = Retries {
        store,
        clock,
        shutdown,
        num,
        op: "create",
        resource,
        attempts,
    };
    for attempt in 1..=attempts {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return Err(None),
            r = ctx.provisioner.create(&req) => r,
        };
        match result {
            Ok(()) => {
                // Remembered so a restart does not create it again (base
                // resources; an elastic one's record may not be written yet).
                let written = store
                    .record_elastic_created(num, resource, clock.now())
                    .await;
                if let Err(e) = written {
                    tracing::error!(%resource, "record the creation: {e}");
                }
                let message = format!(
                    "provisioned: {resource} created by the {} provisioner (attempt {attempt}); \
                     it is ready when its agent registers",
                    ctx.provisioner.kind()
                );
                event(store, num, clock.now(), "provisioned", message).await;
                return Ok(());
            }
            Err(e) => retries.failed(attempt, &e, "").await?,
        }
    }
    Err(Some(format!("create of {resource}: no attempt made")))
}

impl super::Actor {
    /// Puts the elastic resources of an earlier run back in service: their
    /// agents find their slots when they reconnect; releasing ones are
    /// released now (their agent's answer was lost with the broker).
    pub(super) fn restore_elastic(
        &mut self,
        restored: Vec<(crate::engine::RestoredElastic, ResourceId)>,
    ) {
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

    /// Deletes again, through the provisioner, the released or failed
    /// resources whose delete is not recorded: an earlier owner of the group
    /// (this broker before a restart, or another broker that died or lost
    /// the group) decided it and did not see it through. Their state is
    /// final, so nothing else would delete them; a delete is idempotent by
    /// resource id, a host left running is not.
    pub(super) fn delete_again(&mut self, undeleted: Vec<ResourceId>) {
        if !self.elastic.provisioned() {
            return;
        }
        for real in undeleted {
            self.note(
                "restored",
                format!(
                    "restored: {real} was released but its delete was not seen through by \
                     the earlier owner of the group; it is deleted again"
                ),
            );
            self.elastic.delete(real);
        }
    }

    /// How long a created host has to register, as events say it (empty
    /// without a provisioner).
    pub(super) fn register_timeout(&self) -> String {
        self.shared
            .provisioning
            .as_ref()
            .map(|p| crate::provision::show(p.config.register_timeout))
            .unwrap_or_default()
    }

    /// A provisioning task's outcome.
    pub(super) fn elastic_report(&mut self, report: Report) {
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
                let timeout = self.register_timeout();
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_first_wait_and_is_capped() {
        assert_eq!(backoff(1), RETRY_FIRST);
        assert_eq!(backoff(2), RETRY_FIRST * 2);
        assert_eq!(backoff(3), RETRY_FIRST * 4);
        assert_eq!(backoff(40), RETRY_MAX);
    }
}
