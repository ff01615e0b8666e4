//! Delivery groups and users over the store: every admin verb of `ferryctl
//! group` / `ferryctl user` and the lifecycle deadlines.
//!
//! Each change runs as one transaction through the store's groups door
//! ([`Store::group_change`]) on the writer thread: the group's row is read,
//! the pure [`lifecycle`](super::lifecycle) decides, and the new row, its
//! orders, events and notifications are written in the same transaction. Two
//! operators (or an operator and the deadline timer) acting on one group are
//! therefore serialised, and an answer means "committed".
//!
//! The service changes records only: it starts, stops or reaches no actor.
//! The `Groups` facade pairs it with the group actors and brings the group's
//! actor in line after each write verb. Children: `credentials` (passwords,
//! tokens, the route service's checks), `policy` (publish, update-policy and
//! show with every policy part) and `publishing` (statuses set from outside
//! the deadlines).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_common::admin::{
    GroupDetail, GroupEventInfo, GroupFilter, GroupInfo, GroupSpec, PolicyPartsSpec, PolicySpec,
    PolicyView, ResourcePolicyInfo, SessionType, UserInfo, UserSpec,
};
use ferry_common::{GroupName, ResourceId, UnixMillis, UserId};

use tokio::sync::Notify;

use super::lifecycle::{
    check_region_change, Billing, Lifecycle, LifecycleError, Order, Outcome, Removal, Status,
};
use super::RETRY_AFTER_ERROR;
use crate::clock::Clock;
use crate::config::GroupsConfig;
use crate::engine::billing::{round_line, subscription_amount, Term};
use crate::engine::Policy;
use crate::groups::policy_parts::{stored_json, PolicyParts};
use crate::store::{GroupRecord, GroupStatus, GroupsTx, NewGroup, NewOrder, Store, StoreError};

// Users' credentials: a child module, so it shares this one's private helpers.
mod credentials;
pub use credentials::{max_concurrent_hashes, AuthError, HASHES_PER_CORE};

// Publish, update and show with every policy part (issue 7): a child
// module, so it shares this one's private helpers.
mod policy;

// Base resources created through the provisioner (`publishing`): a child
// module, so it shares this one's private helpers.
mod publishing;

// Users and their contact details.
mod users;
use users::checked_user;
pub use users::parse_users_csv;

// Specs and policies checked, merged and described.
mod validate;
use validate::{check_elastic_prefix, describe_policy, merge_policy, validate_spec};

/// Most users one `user import` may carry. The whole batch is one
/// transaction; 100,000 rows keep that transaction and the admin frame
/// reasonable while covering any real directory export.
pub const MAX_IMPORT_USERS: usize = 100_000;

/// Most problems listed in one refusal of an import: enough to fix a file in a
/// few rounds, short enough to read.
pub const MAX_LISTED_PROBLEMS: usize = 50;

/// Why a group or user request failed; mapped to admin error codes in one place.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    NotAllowed(#[from] LifecycleError),
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("{0}")]
    Conflict(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Groups and users, shared by the admin socket and the deadline timer.
#[derive(Clone)]
pub struct GroupService {
    store: Store,
    config: Arc<GroupsConfig>,
    /// Woken after every change that may move a deadline or queue a notification.
    changed: Arc<Notify>,
    /// Secret of user tokens (`credentials`); `None`: tokens are off.
    token_key: Option<Arc<crate::tickets::TokenKey>>,
}

/// A group's row.
#[derive(Clone, Debug)]
struct Row {
    num: i64,
    id: String,
    name: GroupName,
    region: String,
    office_network: String,
    spec: String,
    image: String,
    life: Lifecycle,
    base_resources: u32,
    session_type: SessionType,
    policy: Policy,
    /// Session and display parts, stored beside `policy` (issue 7).
    parts: PolicyParts,
    created_at: UnixMillis,
    /// Version of the policy.
    policy_version: u64,
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

impl Row {
    /// The service's view of a stored row: its billing, lifecycle and
    /// policy parsed.
    fn from_record(r: GroupRecord) -> Result<Row, StoreError> {
        let billing = match (r.billing.as_str(), &r.term) {
            ("subscription", Some(t)) => Billing::Subscription {
                term: Term::parse(t).map_err(corrupt)?,
                auto_renew: r.auto_renew,
            },
            ("pay-as-you-go", _) => Billing::PayAsYouGo,
            (b, _) => return Err(corrupt(format!("billing {b:?}"))),
        };
        let parts = PolicyParts::from_stored(&r.policy).map_err(corrupt)?;
        let policy: Policy = serde_json::from_str(&r.policy).map_err(corrupt)?;
        Ok(Row {
            num: r.num,
            id: r.id,
            name: r.name,
            region: r.region,
            office_network: r.office_network,
            spec: r.spec,
            image: r.image,
            life: Lifecycle {
                status: Status::parse(&r.status)
                    .ok_or_else(|| corrupt(format!("status {:?}", r.status)))?,
                billing,
                expires_at: r.expires_at,
                expired_at: r.expired_at,
            },
            base_resources: r.base_resources,
            session_type: match r.session_type.as_str() {
                "shared" => SessionType::Shared,
                _ => SessionType::Independent,
            },
            policy,
            parts,
            created_at: r.created_at,
            policy_version: r.policy_version,
        })
    }
}

/// The group named `group` (a live name first, else an id or a gone name).
fn find(tx: &GroupsTx<'_>, group: &str) -> Result<Row, GroupError> {
    match tx.find(group)? {
        Some(r) => Ok(Row::from_record(r)?),
        None => Err(GroupError::NotFound(format!("no group named {group}"))),
    }
}

fn all_rows(tx: &GroupsTx<'_>, filter: &GroupFilter) -> Result<Vec<Row>, GroupError> {
    let mut out = Vec::new();
    for record in tx.all()? {
        let row = Row::from_record(record)?;
        if filter
            .status
            .as_deref()
            .is_some_and(|s| s != row.life.status.as_str())
            || filter
                .name
                .as_deref()
                .is_some_and(|n| !row.name.as_str().contains(n))
            || filter.id.as_deref().is_some_and(|i| i != row.id)
        {
            continue;
        }
        out.push(row);
    }
    Ok(out)
}

fn save_life(tx: &GroupsTx<'_>, row: &Row, now: UnixMillis) -> Result<(), GroupError> {
    let status = GroupStatus {
        status: row.life.status.as_str(),
        expires_at: row.life.expires_at,
        expired_at: row.life.expired_at,
        auto_renew: matches!(
            row.life.billing,
            Billing::Subscription {
                auto_renew: true,
                ..
            }
        ),
        gone: row.life.status == Status::Gone,
    };
    tx.save_status(row.num, &status, now)?;
    Ok(())
}

impl GroupService {
    pub fn new(store: Store, config: GroupsConfig) -> GroupService {
        GroupService {
            store,
            config: Arc::new(config),
            changed: Arc::new(Notify::new()),
            token_key: None,
        }
    }

    /// Resolves when something changed that may move a deadline or queue a
    /// notification (cancel-safe).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The configured retention of expired subscriptions.
    pub fn retention(&self) -> Duration {
        self.config.retention
    }

    fn touch(&self) {
        self.changed.notify_waiters();
        self.changed.notify_one();
    }

    /// Writes the orders and transitions of a lifecycle step.
    fn apply_outcome(
        config: &GroupsConfig,
        tx: &GroupsTx<'_>,
        row: &Row,
        out: &Outcome,
    ) -> Result<(), GroupError> {
        for o in &out.orders {
            write_order(config, tx, row, o)?;
        }
        for t in &out.transitions {
            tx.event(
                row.num,
                t.at,
                "status",
                &format!("{} -> {}: {}", t.from, t.to, t.reason),
            )?;
        }
        Ok(())
    }

    /// `group publish`.
    pub async fn publish(
        &self,
        spec: GroupSpec,
        now: UnixMillis,
    ) -> Result<GroupDetail, GroupError> {
        let (billing, policy) = validate_spec(&self.config, &spec)?;
        let config = self.config.clone();
        let id = self
            .store
            .group_change(move |tx| {
                publish_tx(
                    &config,
                    tx,
                    spec,
                    billing,
                    policy,
                    PolicyParts::default(),
                    now,
                )
            })
            .await?;
        self.touch();
        self.show(&id).await
    }

    /// `group list`.
    pub async fn list(&self, filter: GroupFilter) -> Result<Vec<GroupInfo>, GroupError> {
        if let Some(s) = filter.status.as_deref() {
            if Status::parse(s).is_none() {
                return Err(GroupError::Invalid(vec![format!(
                    "unknown status {s:?}; statuses: {}",
                    super::lifecycle::ALL_STATUSES
                        .map(|s| s.as_str())
                        .join(", ")
                )]));
            }
        }
        self.store
            .group_read(move |tx| {
                all_rows(tx, &filter)?
                    .iter()
                    .map(|r| info(tx, r))
                    .collect::<Result<Vec<_>, GroupError>>()
            })
            .await
    }

    /// `group show`.
    pub async fn show(&self, group: &str) -> Result<GroupDetail, GroupError> {
        let group = group.to_owned();
        let retention = self.config.retention;
        self.store
            .group_read(move |tx| detail(tx, &group, retention))
            .await
    }

    /// `group update-policy` without policy parts (what an older
    /// `ferryctl` sends): [`GroupService::update_policy_parts`] with none.
    pub async fn update_policy(
        &self,
        group: &GroupName,
        patch: PolicySpec,
        now: UnixMillis,
    ) -> Result<GroupDetail, GroupError> {
        self.update_policy_parts(group, patch, PolicyPartsSpec::default(), now)
            .await
            .map(|d| d.detail)
    }

    /// `group update-users`: assigns `add` (writing an activation notification
    /// for each newly assigned user) and unassigns `remove`.
    pub async fn update_users(
        &self,
        group: &GroupName,
        add: Vec<UserId>,
        remove: Vec<UserId>,
        now: UnixMillis,
    ) -> Result<GroupDetail, GroupError> {
        let group = group.to_string();
        let id = self
            .store
            .group_change(move |tx| {
                let row = find(tx, &group)?;
                row.life.check_editable("change the users of")?;
                let assigned = tx.assigned_users(row.num)?;
                let mut problems = unknown_users(tx, &add)?;
                for u in &remove {
                    if !assigned.contains(u) {
                        problems.push(format!("user {u} is not assigned to {}", row.name));
                    }
                }
                if !problems.is_empty() {
                    return Err(GroupError::Invalid(problems));
                }
                let added = tx.assign(row.num, &add, now)?;
                tx.unassign(row.num, Some(&remove))?;
                tx.event(
                    row.num,
                    now,
                    "users",
                    &format!(
                        "users assigned: [{}]; unassigned: [{}]",
                        join(&added),
                        join(&remove)
                    ),
                )?;
                Ok(row.id)
            })
            .await?;
        self.touch();
        self.show(&id).await
    }

    /// `group renew`: extends a subscription by `duration` and writes an order.
    pub async fn renew(
        &self,
        group: &GroupName,
        duration: &str,
        now: UnixMillis,
    ) -> Result<GroupDetail, GroupError> {
        let term = Term::parse(duration).map_err(|e| GroupError::Invalid(vec![e.to_string()]))?;
        self.lifecycle_change(group, now, move |_, row| Ok(row.life.renew(term, now)?))
            .await
    }

    /// `group set-auto-renew`.
    pub async fn set_auto_renew(
        &self,
        group: &GroupName,
        on: bool,
        now: UnixMillis,
    ) -> Result<GroupDetail, GroupError> {
        self.lifecycle_change(group, now, move |tx, row| {
            row.life.set_auto_renew(on)?;
            tx.event(
                row.num,
                now,
                "auto-renew",
                if on {
                    "auto-renew turned on"
                } else {
                    "auto-renew turned off"
                },
            )?;
            Ok(Outcome::default())
        })
        .await
    }

    /// `group purge` / `group delete` per the table; orders and metering stay.
    pub async fn remove(
        &self,
        group: &GroupName,
        action: Removal,
        now: UnixMillis,
    ) -> Result<String, GroupError> {
        let d = self
            .lifecycle_change(group, now, move |tx, row| {
                let t = row.life.remove(action, now)?;
                tx.unassign(row.num, None)?;
                Ok(Outcome {
                    transitions: vec![t],
                    orders: vec![],
                })
            })
            .await?;
        Ok(format!(
            "group {} ({}) {}d; its orders and metering are kept",
            d.info.name,
            d.info.id,
            action.as_str()
        ))
    }

    async fn lifecycle_change(
        &self,
        group: &GroupName,
        now: UnixMillis,
        f: impl FnOnce(&GroupsTx<'_>, &mut Row) -> Result<Outcome, GroupError> + Send + 'static,
    ) -> Result<GroupDetail, GroupError> {
        let group = group.to_string();
        let config = self.config.clone();
        let id = self
            .store
            .group_change(move |tx| {
                let mut row = find(tx, &group)?;
                let out = f(tx, &mut row)?;
                Self::apply_outcome(&config, tx, &row, &out)?;
                save_life(tx, &row, now)?;
                Ok::<_, GroupError>(row.id)
            })
            .await?;
        self.touch();
        self.show(&id).await
    }

    /// `group events`.
    pub async fn events(&self, group: &GroupName) -> Result<Vec<GroupEventInfo>, GroupError> {
        let group = group.to_string();
        self.store
            .group_read(move |tx| {
                let row = find(tx, &group)?;
                Ok(tx.events(row.num)?)
            })
            .await
    }

    /// A region change: refused unless it names the current region.
    pub async fn set_region(&self, group: &GroupName, region: &str) -> Result<String, GroupError> {
        let d = self.show(group.as_str()).await?;
        check_region_change(&d.info.region, region)?;
        Ok(format!(
            "group {} is already in region {region}",
            d.info.name
        ))
    }

    /// Applies every lifecycle deadline due at `now` (expiry, auto-renew,
    /// recycling) and returns the next one.
    ///
    /// Each group changes in its own savepoint: a group whose step fails is
    /// logged, left as it was and retried after [`RETRY_AFTER_ERROR`],
    /// while the other groups' deadlines still run.
    pub async fn run_due(&self, now: UnixMillis) -> Result<Option<UnixMillis>, GroupError> {
        let config = self.config.clone();
        self.store
            .group_changes(move |batch| {
                let mut next: Option<UnixMillis> = None;
                let mut earliest = |d: UnixMillis| next = Some(next.map_or(d, |n| n.min(d)));
                let rows = all_rows(&batch.read(), &GroupFilter::default())?;
                for mut row in rows {
                    let due = row
                        .life
                        .next_deadline(config.retention)
                        .is_some_and(|d| d <= now);
                    if due {
                        if let Err(e) =
                            batch.each(|tx| apply_deadlines(&config, tx, &mut row, now))?
                        {
                            tracing::error!(group = %row.name, "apply lifecycle deadline: {e}");
                            let ms = i64::try_from(RETRY_AFTER_ERROR.as_millis()).unwrap_or(0);
                            earliest(UnixMillis(now.0.saturating_add(ms)));
                            continue;
                        }
                    }
                    if let Some(d) = row.life.next_deadline(config.retention) {
                        earliest(d);
                    }
                }
                Ok::<_, GroupError>(next)
            })
            .await
    }

    /// The clock the group tasks run on (see [`GroupsConfig::clock`]).
    pub fn clock(&self) -> Clock {
        self.config.clock.clone()
    }

    /// The current time on [`GroupService::clock`]: what the admin verbs
    /// should pass as `now`, so orders and deadlines share one timeline.
    pub fn now(&self) -> UnixMillis {
        self.config.clock.now()
    }

    /// The group settings it was built with.
    pub fn config(&self) -> &GroupsConfig {
        &self.config
    }

    /// Every notification of the outbox, delivered or not, oldest first (at
    /// most `limit`): what an operator checks when a user says no activation
    /// message came.
    pub async fn outbox(&self, limit: usize) -> Result<Vec<OutboxEntry>, GroupError> {
        Ok(self
            .store
            .outbox(limit)
            .await?
            .into_iter()
            .map(|r| OutboxEntry {
                id: r.id,
                user: r.user,
                group: r.group,
                kind: r.kind,
                attempts: r.attempts,
                next_attempt_at: r.next_attempt_at,
                delivered_at: r.delivered_at,
                last_error: r.last_error,
            })
            .collect())
    }

    /// Writes a user that must not exist yet, with its password hash when
    /// given, in one transaction; answers the user as stored. The caller has
    /// checked `user` with [`checked_user`].
    pub(super) async fn insert_new_user(
        &self,
        user: UserSpec,
        password_hash: Option<String>,
        now: UnixMillis,
    ) -> Result<Vec<UserInfo>, GroupError> {
        let id = user.id.clone();
        if !self.store.create_user(user, password_hash, now).await? {
            return Err(GroupError::Conflict(format!("user {id} already exists")));
        }
        Ok(self
            .users()
            .await?
            .into_iter()
            .filter(|u| u.id == id)
            .collect())
    }

    /// Pending activation notifications due at `now` (oldest first, at most `limit`).
    pub async fn due_notifications(
        &self,
        now: UnixMillis,
        limit: usize,
    ) -> Result<Vec<Notification>, GroupError> {
        Ok(self
            .store
            .due_notifications(now, limit)
            .await?
            .into_iter()
            .map(|r| Notification {
                id: r.id,
                user: r.user,
                email: r.email,
                mobile: r.mobile,
                kind: r.kind,
                group: r.group,
                attempts: r.attempts,
            })
            .collect())
    }

    /// When the next pending notification is due, if any.
    pub async fn next_notification_at(&self) -> Result<Option<UnixMillis>, GroupError> {
        Ok(self.store.next_notification_at().await?)
    }

    /// Records one delivery attempt: delivered, or retried after a doubling wait.
    pub async fn notification_attempted(
        &self,
        id: i64,
        result: Result<(), String>,
        now: UnixMillis,
    ) -> Result<(), GroupError> {
        let max = i64::try_from(self.config.notify_retry_max.as_millis()).unwrap_or(i64::MAX);
        Ok(self
            .store
            .notification_attempted(id, result, now, max)
            .await?)
    }
}

/// One row of the activation outbox, as [`GroupService::outbox`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Outbox row id.
    pub id: i64,
    /// The user to activate.
    pub user: String,
    /// Name of the group the user was assigned to.
    pub group: String,
    /// `activation`.
    pub kind: String,
    /// Hook runs so far (failed ones, plus the successful one if delivered).
    pub attempts: i64,
    /// When the next attempt is due (meaningless once delivered).
    pub next_attempt_at: UnixMillis,
    /// When a hook run exited 0; `None` while pending.
    pub delivered_at: Option<UnixMillis>,
    /// Why the last failed attempt failed, while pending.
    pub last_error: Option<String>,
}

/// One activation notification waiting in the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// Outbox row id.
    pub id: i64,
    /// The user to activate.
    pub user: String,
    /// Where the activation e-mail goes (as recorded when assigned).
    pub email: String,
    /// Where the activation text message goes (as recorded when assigned).
    pub mobile: String,
    /// `activation`.
    pub kind: String,
    /// Name of the group the user was assigned to.
    pub group: String,
    /// Attempts made so far.
    pub attempts: i64,
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A problem for each of `users` that does not exist.
fn unknown_users(tx: &GroupsTx<'_>, users: &[UserId]) -> Result<Vec<String>, GroupError> {
    Ok(tx
        .unknown_users(users)?
        .into_iter()
        .map(|u| {
            format!(
                "user {u} does not exist (create it with `ferryctl user create` or `user import`)"
            )
        })
        .collect())
}

fn write_order(
    config: &GroupsConfig,
    tx: &GroupsTx<'_>,
    row: &Row,
    o: &Order,
) -> Result<(), GroupError> {
    let price = config.prices.get(&row.spec).ok_or_else(|| {
        GroupError::Invalid(vec![format!(
            "no price for spec {} in the broker config ([prices.{}]); cannot write a {} order",
            row.spec,
            row.spec,
            o.kind.as_str()
        )])
    })?;
    let amount = round_line(subscription_amount(
        price.subscription_month,
        row.base_resources,
        o.term,
    ));
    tx.insert_order(
        row.num,
        &NewOrder {
            kind: o.kind.as_str(),
            term: o.term.to_string(),
            base_resources: row.base_resources,
            amount: amount.to_string(),
            currency: &config.currency,
            period_start: o.period_start,
            period_end: o.period_end,
            at: o.at,
        },
    )?;
    tx.event(
        row.num,
        o.at,
        "order",
        &format!(
            "{} order: {} x {} for {}: {amount} {}",
            o.kind.as_str(),
            row.base_resources,
            row.spec,
            o.term,
            config.currency
        ),
    )?;
    Ok(())
}

/// The deadlines of one group due at `now`, written with their orders and
/// events. An auto-renewing subscription whose spec lost its price (the
/// config changed) cannot be billed: auto-renew is turned off with an event
/// saying why, and the group expires at the end of its paid period like any
/// other, instead of failing at every tick.
fn apply_deadlines(
    config: &GroupsConfig,
    tx: &GroupsTx<'_>,
    row: &mut Row,
    now: UnixMillis,
) -> Result<(), GroupError> {
    let renews = matches!(
        row.life.billing,
        Billing::Subscription {
            auto_renew: true,
            ..
        }
    ) && row.life.status.in_service();
    if renews && !config.prices.contains_key(&row.spec) {
        row.life.set_auto_renew(false)?;
        tx.event(
            row.num,
            row.life.expires_at.unwrap_or(now),
            "auto-renew",
            &format!(
                "auto-renew turned off: no subscription price for spec {} in the broker config ([prices.{}]), so the period cannot be billed",
                row.spec, row.spec
            ),
        )?;
    }
    let out = row.life.handle_timeout(now, config.retention);
    GroupService::apply_outcome(config, tx, row, &out)?;
    save_life(tx, row, now)
}

fn publish_tx(
    config: &GroupsConfig,
    tx: &GroupsTx<'_>,
    spec: GroupSpec,
    billing: Billing,
    policy: Policy,
    parts: PolicyParts,
    now: UnixMillis,
) -> Result<String, GroupError> {
    let problems = unknown_users(tx, &spec.users)?;
    if !problems.is_empty() {
        return Err(GroupError::Invalid(problems));
    }
    let num = tx.next_num()?;
    let id = format!("dg-{num:06}");
    let name = match spec.name {
        Some(n) => {
            if tx.live_name_taken(n.as_str())? {
                return Err(GroupError::Conflict(format!(
                    "a group named {n} already exists; choose another name or leave it out to get one generated"
                )));
            }
            n
        }
        None => generate_name(tx, &spec.region, &spec.spec)?,
    };
    let (life, out) = match publishing::lifecycle(config, billing, spec.base_resources) {
        Some(life) => (life, Outcome::default()),
        None => Lifecycle::publish(billing, now)?,
    };
    let term = match billing {
        Billing::Subscription { term, .. } => Some(term.to_string()),
        Billing::PayAsYouGo => None,
    };
    let json = stored_json(&policy, &parts).map_err(corrupt)?;
    tx.insert(&NewGroup {
        num,
        id: &id,
        name: &name,
        region: &spec.region,
        office_network: &spec.office_network,
        spec: &spec.spec,
        image: &spec.image,
        billing: billing.kind(),
        term,
        auto_renew: matches!(
            billing,
            Billing::Subscription {
                auto_renew: true,
                ..
            }
        ),
        base_resources: spec.base_resources,
        session_type: spec.session_type.as_str(),
        policy: &json,
        status: life.status.as_str(),
        expires_at: life.expires_at,
        now,
    })?;
    let row = Row {
        num,
        id: id.clone(),
        name,
        region: spec.region,
        office_network: spec.office_network,
        spec: spec.spec,
        image: spec.image,
        life,
        base_resources: spec.base_resources,
        session_type: spec.session_type,
        policy,
        parts,
        created_at: now,
        policy_version: 1,
    };
    GroupService::apply_outcome(config, tx, &row, &out)?;
    publishing::note_started(tx, &row, now)?;
    let added = tx.assign(num, &spec.users, now)?;
    if !added.is_empty() {
        tx.event(
            num,
            now,
            "users",
            &format!("users assigned: [{}]", join(&added)),
        )?;
    }
    tx.event(
        num,
        now,
        "policy",
        &format!("policy: {}", describe_policy(&row.policy)),
    )?;
    Ok(id)
}

/// `REGION-SPEC-N` with the smallest N no group (live or gone) has used:
/// unique, and readable in listings and logs.
fn generate_name(tx: &GroupsTx<'_>, region: &str, spec: &str) -> Result<GroupName, GroupError> {
    // Lower-case letters, digits and '-' only, short enough that
    // `<name>-eN` is still a resource id (see `check_elastic_prefix`).
    let clean = |s: &str| -> String {
        let mapped: String = s
            .chars()
            .map(|ch| {
                if ch.is_ascii_alphanumeric() {
                    ch.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(20)
            .collect();
        mapped.trim_matches('-').to_owned()
    };
    let base = format!("{}-{}", clean(region), clean(spec));
    for n in 1..=u32::MAX {
        let candidate = format!("{base}-{n}");
        if !tx.name_used(&candidate)? {
            check_elastic_prefix(&candidate)
                .map_err(|e| GroupError::Invalid(vec![format!("generated {e}")]))?;
            return candidate
                .parse()
                .map_err(|e| GroupError::Invalid(vec![format!("generated name: {e}")]));
        }
    }
    Err(GroupError::Conflict("no free generated name".into()))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn info(tx: &GroupsTx<'_>, r: &Row) -> Result<GroupInfo, GroupError> {
    let users = tx.user_count(r.num)?;
    let (term, auto_renew) = match r.life.billing {
        Billing::Subscription { term, auto_renew } => (Some(term.to_string()), auto_renew),
        Billing::PayAsYouGo => (None, false),
    };
    Ok(GroupInfo {
        id: r.id.clone(),
        name: r.name.clone(),
        status: r.life.status.as_str().into(),
        region: r.region.clone(),
        spec: r.spec.clone(),
        image: r.image.clone(),
        billing: r.life.billing.kind().into(),
        term,
        auto_renew,
        base_resources: r.base_resources,
        session_type: r.session_type,
        users,
        expires_at: r.life.expires_at,
        created_at: r.created_at,
    })
}

fn detail(tx: &GroupsTx<'_>, group: &str, retention: Duration) -> Result<GroupDetail, GroupError> {
    let r = find(tx, group)?;
    let orders = tx.orders(r.num)?;
    let resources = tx.resources_naming(&r.name)?;
    let policy_version = r.policy_version;
    let policy_resources: Vec<ResourcePolicyInfo> = tx
        .applied_versions(r.num)?
        .into_iter()
        .map(|(resource, version)| ResourcePolicyInfo {
            resource,
            applied_version: Some(version),
        })
        .collect();
    let p = &r.policy;
    Ok(GroupDetail {
        info: info(tx, &r)?,
        office_network: r.office_network.clone(),
        policy: PolicyView {
            concurrent_sessions: p.concurrent_sessions,
            usage_threshold: p.usage_threshold,
            scale_out_step: p.scale_out_step,
            max_elastic: p.max_elastic,
            max_idle_ms: ms(p.max_idle),
            scale_in_cooldown_ms: ms(p.scale_in_cooldown),
            wait_timeout_ms: ms(p.wait_timeout),
            load_balancing: p.load_balancing.as_str().into(),
        },
        policy_applied: policy_resources
            .iter()
            .all(|x| x.applied_version >= Some(policy_version)),
        policy_version,
        policy_resources,
        notes: Vec::new(),
        users: tx.assigned_users(r.num)?,
        resources,
        orders,
        next_deadline: r.life.next_deadline(retention),
    })
}

/// Narrows `detail`'s policy state to the resources joined to the live
/// group (`joined`), which may include some that never acknowledged one.
pub fn policy_of_joined(detail: &mut GroupDetail, joined: &[ResourceId]) {
    let stored: HashMap<ResourceId, Option<u64>> = detail
        .policy_resources
        .drain(..)
        .map(|x| (x.resource, x.applied_version))
        .collect();
    detail.policy_resources = joined
        .iter()
        .map(|r| ResourcePolicyInfo {
            resource: r.clone(),
            applied_version: stored.get(r).copied().flatten(),
        })
        .collect();
    detail.policy_applied = detail
        .policy_resources
        .iter()
        .all(|x| x.applied_version >= Some(detail.policy_version));
}

#[cfg(test)]
mod tests {
    //! The lifecycle deadlines through the real store: `run_due(now)` with
    //! time passed in, and "restarts" that close the store and open it again
    //! under a new `GroupService`, as a broker restart does.

    use std::path::Path;

    #[test]
    fn group_names_must_prefix_elastic_host_ids() {
        assert!(super::check_elastic_prefix("design-1").is_ok());
        assert!(super::check_elastic_prefix(&"a".repeat(55)).is_ok());
        let long = super::check_elastic_prefix(&"a".repeat(56)).unwrap_err();
        assert!(long.contains("at most 55 bytes"), "{long}");
        let upper = super::check_elastic_prefix("Design").unwrap_err();
        assert!(upper.contains("Design-e1"), "{upper}");
        assert!(super::check_elastic_prefix("design.team").is_err());
    }

    use ferry_common::admin::{BillingSpec, GroupSpec};
    use rust_decimal::Decimal;

    use super::*;
    use crate::engine::billing::Prices;

    const DAY: i64 = 86_400_000;
    /// 2026-03-02T00:00:00Z
    const T0: UnixMillis = UnixMillis(1_772_409_600_000);

    fn at(days: i64) -> UnixMillis {
        UnixMillis(T0.0 + days * DAY)
    }

    fn open(dir: &Path, config: GroupsConfig) -> (Store, GroupService) {
        let store = crate::store::testing::open_for_test(dir);
        (store.clone(), GroupService::new(store, config))
    }

    fn group(name: &str, spec: &str, billing: BillingSpec) -> GroupSpec {
        GroupSpec {
            spec: spec.into(),
            billing,
            ..crate::test_support::group_spec(name)
        }
    }

    fn weekly(auto_renew: bool) -> BillingSpec {
        BillingSpec::Subscription {
            duration: "1w".into(),
            auto_renew,
        }
    }

    async fn status(g: &GroupService, name: &str) -> String {
        g.show(name).await.expect("show").info.status
    }

    /// `(at, message)` of the group's status events.
    async fn transitions(g: &GroupService, name: &str) -> Vec<(UnixMillis, String)> {
        g.events(&name.parse().expect("name"))
            .await
            .expect("events")
            .into_iter()
            .filter(|e| e.kind == "status")
            .map(|e| (e.at, e.message))
            .collect()
    }

    #[tokio::test]
    async fn expiry_then_recycling_survive_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, g) = open(dir.path(), GroupsConfig::default());
        g.publish(group("g1", "office-4c8g", weekly(false)), T0)
            .await
            .expect("publish");
        g.publish(group("p1", "office-4c8g", BillingSpec::PayAsYouGo), T0)
            .await
            .expect("publish payg");
        assert_eq!(g.run_due(T0).await.expect("run"), Some(at(7)));
        // A millisecond early: nothing happens.
        assert_eq!(
            g.run_due(UnixMillis(at(7).0 - 1)).await.expect("run"),
            Some(at(7))
        );
        assert_eq!(status(&g, "g1").await, "published");

        // Restart: the new service finds the same deadline in the store.
        store.close().await;
        let (store, g) = open(dir.path(), GroupsConfig::default());
        assert_eq!(g.run_due(T0).await.expect("run"), Some(at(7)));

        // The timer fires late (an hour after the expiry): the transition is
        // dated at the deadline, and the retention counts from there.
        let next = g
            .run_due(UnixMillis(at(7).0 + 3_600_000))
            .await
            .expect("run");
        assert_eq!(next, Some(at(14)));
        let d = g.show("g1").await.expect("show");
        assert_eq!(d.info.status, "expired");
        assert_eq!(d.next_deadline, Some(at(14)));
        assert_eq!(d.orders.len(), 1, "no auto-renew, no new order");
        assert_eq!(d.orders[0].kind, "publish");
        assert_eq!(d.orders[0].amount, "92.87");
        assert_eq!(
            status(&g, "p1").await,
            "published",
            "pay-as-you-go never expires"
        );
        let err = g
            .remove(&"g1".parse().expect("name"), Removal::Delete, at(8))
            .await
            .expect_err("delete of an expired subscription");
        assert_eq!(
            err.to_string(),
            "cannot delete a subscription group in status expired; allowed in this status: purge"
        );

        store.close().await;
        let (store, g) = open(dir.path(), GroupsConfig::default());
        assert_eq!(g.run_due(at(10)).await.expect("run"), Some(at(14)));
        assert_eq!(g.run_due(at(14)).await.expect("run"), None);
        // A second tick at the same instant writes nothing twice.
        assert_eq!(g.run_due(at(14)).await.expect("run"), None);
        assert_eq!(status(&g, "g1").await, "recycling");
        let steps = transitions(&g, "g1").await;
        let expected = [
            (T0, "publishing -> published"),
            (at(7), "published -> expired"),
            (at(14), "expired -> recycling"),
        ];
        assert_eq!(steps.len(), expected.len(), "{steps:?}");
        for ((when, message), (want_at, want)) in steps.iter().zip(expected) {
            assert_eq!(*when, want_at, "{message}");
            assert!(message.starts_with(want), "{message}");
        }
        let err = g
            .remove(&"g1".parse().expect("name"), Removal::Purge, at(15))
            .await
            .expect_err("purge of a recycling subscription");
        assert!(
            err.to_string()
                .contains("cannot purge a subscription group in status recycling"),
            "{err}"
        );
        g.remove(&"g1".parse().expect("name"), Removal::Delete, at(15))
            .await
            .expect("delete when recycling");
        assert_eq!(status(&g, "g1").await, "gone");
        assert_eq!(
            g.show("g1").await.expect("show").orders.len(),
            1,
            "orders stay"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn auto_renew_writes_one_exact_order_per_period() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, g) = open(dir.path(), GroupsConfig::default());
        g.publish(group("g1", "office-4c8g", weekly(true)), T0)
            .await
            .expect("publish");
        assert_eq!(g.run_due(at(7)).await.expect("run"), Some(at(14)));
        assert_eq!(g.run_due(at(7)).await.expect("run"), Some(at(14)));
        let d = g.show("g1").await.expect("show");
        assert_eq!(d.info.status, "published");
        assert_eq!(d.info.expires_at, Some(at(14)));
        assert_eq!(
            d.orders.len(),
            2,
            "publish + one auto-renew: {:?}",
            d.orders
        );

        // Down for three more periods: on restart, one order per period.
        store.close().await;
        let (store, g) = open(dir.path(), GroupsConfig::default());
        assert_eq!(g.run_due(at(30)).await.expect("run"), Some(at(35)));
        let d = g.show("g1").await.expect("show");
        let periods: Vec<_> = d
            .orders
            .iter()
            .map(|o| (o.kind.as_str(), o.period_start, o.period_end, o.at))
            .collect();
        assert_eq!(
            periods,
            [
                ("publish", T0, at(7), T0),
                ("auto-renew", at(7), at(14), at(7)),
                ("auto-renew", at(14), at(21), at(14)),
                ("auto-renew", at(21), at(28), at(21)),
                ("auto-renew", at(28), at(35), at(28)),
            ]
        );
        // 199 a month x 2 resources x 7/30, to the cent, in every order.
        for o in &d.orders {
            assert_eq!(
                (o.amount.as_str(), o.currency.as_str(), o.term.as_str()),
                ("92.87", "CNY", "1w")
            );
            assert_eq!(o.base_resources, 2);
        }
        let renew_events = g
            .events(&"g1".parse().expect("name"))
            .await
            .expect("events")
            .into_iter()
            .filter(|e| e.kind == "order" && e.message.starts_with("auto-renew order"))
            .count();
        assert_eq!(renew_events, 4);

        // Turned off, it expires at the end of the period already paid.
        g.set_auto_renew(&"g1".parse().expect("name"), false, at(31))
            .await
            .expect("auto-renew off");
        assert_eq!(g.run_due(at(35)).await.expect("run"), Some(at(42)));
        let d = g.show("g1").await.expect("show");
        assert_eq!(d.info.status, "expired");
        assert_eq!(d.orders.len(), 5);
        store.close().await;
    }

    #[tokio::test]
    async fn a_spec_without_a_price_turns_auto_renew_off_and_blocks_no_other_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut priced = GroupsConfig::default();
        priced.prices.insert(
            "design-8c16g".into(),
            Prices {
                currency: "CNY".into(),
                subscription_month: Decimal::from(300),
                hourly: Decimal::ONE,
            },
        );
        let (store, g) = open(dir.path(), priced);
        g.publish(group("design", "design-8c16g", weekly(true)), T0)
            .await
            .expect("publish");
        g.publish(group("office", "office-4c8g", weekly(false)), T0)
            .await
            .expect("publish");
        // The operator drops the design price and restarts.
        store.close().await;
        let (store, g) = open(dir.path(), GroupsConfig::default());
        let err = g
            .renew(&"design".parse().expect("name"), "1w", at(1))
            .await
            .expect_err("renew without a price");
        assert!(
            err.to_string().contains("no price for spec design-8c16g"),
            "{err}"
        );
        assert_eq!(g.show("design").await.expect("show").orders.len(), 1);

        // Both expire on time; the unbillable one says why it did not renew,
        // and the next deadline is in the future (the timer does not spin).
        assert_eq!(g.run_due(at(7)).await.expect("run"), Some(at(14)));
        assert_eq!(status(&g, "office").await, "expired");
        let d = g.show("design").await.expect("show");
        assert_eq!(d.info.status, "expired");
        assert!(!d.info.auto_renew);
        assert_eq!(d.orders.len(), 1, "nothing billed without a price");
        let events = g
            .events(&"design".parse().expect("name"))
            .await
            .expect("events");
        assert!(
            events
                .iter()
                .any(|e| e.kind == "auto-renew" && e.message.contains("no subscription price")),
            "{events:?}"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn the_outbox_records_attempts_with_a_doubling_capped_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = GroupsConfig {
            notify_retry_max: Duration::from_secs(5),
            ..GroupsConfig::default()
        };
        let (store, g) = open(dir.path(), config.clone());
        g.create_user(
            UserSpec {
                id: "alice".parse().expect("user"),
                email: "alice@example.com".into(),
                mobile: "+8613800000001".into(),
            },
            T0,
        )
        .await
        .expect("user");
        let mut spec = group("g1", "office-4c8g", BillingSpec::PayAsYouGo);
        spec.users = vec!["alice".parse().expect("user")];
        g.publish(spec, T0).await.expect("publish");
        let due = g.due_notifications(T0, 10).await.expect("due");
        assert_eq!(due.len(), 1);
        let id = due[0].id;
        assert_eq!(
            (
                due[0].user.as_str(),
                due[0].email.as_str(),
                due[0].group.as_str()
            ),
            ("alice", "alice@example.com", "g1")
        );
        // Waits of 1s, 2s, 4s, then capped at notify_retry_max (5s).
        let mut now = T0;
        for wait in [1_000, 2_000, 4_000, 5_000, 5_000] {
            g.notification_attempted(id, Err("exit 1".into()), now)
                .await
                .expect("attempt");
            let next = UnixMillis(now.0 + wait);
            assert_eq!(g.next_notification_at().await.expect("next"), Some(next));
            assert!(g
                .due_notifications(UnixMillis(next.0 - 1), 10)
                .await
                .expect("due")
                .is_empty());
            now = next;
        }
        // Pending survives a restart.
        store.close().await;
        let (store, g) = open(dir.path(), config);
        let entry = g.outbox(10).await.expect("outbox");
        assert_eq!(entry.len(), 1);
        assert_eq!(entry[0].attempts, 5);
        assert_eq!(entry[0].delivered_at, None);
        assert_eq!(entry[0].last_error.as_deref(), Some("exit 1"));
        g.notification_attempted(id, Ok(()), now)
            .await
            .expect("delivered");
        let entry = g.outbox(10).await.expect("outbox");
        assert_eq!(entry[0].delivered_at, Some(now));
        assert_eq!(entry[0].attempts, 6);
        assert_eq!(g.next_notification_at().await.expect("next"), None);
        store.close().await;
    }
}
