//! The groups as the rest of the broker sees them: the [`GroupService`]
//! that decides and records operators' changes, and the [`GroupActors`]
//! that run each live group. A change an actor must follow (a publish, a
//! new policy, a status or expiry change, a removal, an image update) brings
//! the group's actor in line before the verb answers, so a caller told
//! "done" already sees the actor's new state; callers never keep the two in
//! step by hand. Reads go to [`Groups::service`] and [`Groups::actors`].

use ferry_common::admin::{GroupDetail, GroupPolicyDetail, ImageUpdateSpec, PolicySpec};
use ferry_common::admin::{GroupSpec, PolicyPartsSpec};
use ferry_common::{GroupName, UnixMillis};

use super::lifecycle::Removal;
use super::{GroupActors, GroupError, GroupService};
use crate::store::Store;

/// The broker's groups: built once by the daemon. Cheap to clone.
#[derive(Clone)]
pub struct Groups {
    service: GroupService,
    actors: GroupActors,
}

impl Groups {
    /// `service` must be the one `actors` were built with.
    pub fn new(service: GroupService, actors: GroupActors) -> Groups {
        Groups { service, actors }
    }

    /// Reads and the verbs no actor follows (users, events, region).
    pub fn service(&self) -> &GroupService {
        &self.service
    }

    /// The live groups.
    pub fn actors(&self) -> &GroupActors {
        &self.actors
    }

    /// The groups' clock now.
    pub fn now(&self) -> UnixMillis {
        self.service.now()
    }

    /// Brings `group`'s actor in line with the row just committed. The
    /// change is committed either way: a failure here is logged, and the
    /// actor catches up at the next change or broker start.
    async fn follow(&self, group: &str) {
        if let Err(e) = self.actors.sync(group).await {
            tracing::error!(%group, "update the group's live state: {e}");
        }
    }

    /// Follows `group` when `result` says the change was made.
    async fn followed<T>(
        &self,
        group: &str,
        result: Result<T, GroupError>,
    ) -> Result<T, GroupError> {
        if result.is_ok() {
            self.follow(group).await;
        }
        result
    }

    /// `group publish` (the actor starts).
    pub async fn publish(
        &self,
        spec: GroupSpec,
        now: UnixMillis,
    ) -> Result<GroupDetail, GroupError> {
        let published = self.service.publish(spec, now).await?;
        self.follow(published.info.name.as_str()).await;
        Ok(published)
    }

    /// `group publish` with the policy parts (the actor starts).
    pub async fn publish_with_policy(
        &self,
        spec: GroupSpec,
        parts: PolicyPartsSpec,
        now: UnixMillis,
    ) -> Result<GroupPolicyDetail, GroupError> {
        let published = self.service.publish_with_policy(spec, parts, now).await?;
        self.follow(published.detail.info.name.as_str()).await;
        Ok(published)
    }

    /// `group update-policy` (the actor takes the new version).
    pub async fn update_policy(
        &self,
        group: &GroupName,
        policy: PolicySpec,
        now: UnixMillis,
    ) -> Result<GroupDetail, GroupError> {
        let r = self.service.update_policy(group, policy, now).await;
        self.followed(group.as_str(), r).await
    }

    /// `group update-policy` with the policy parts.
    pub async fn update_policy_parts(
        &self,
        group: &GroupName,
        policy: PolicySpec,
        parts: PolicyPartsSpec,
        now: UnixMillis,
    ) -> Result<GroupPolicyDetail, GroupError> {
        let r = self
            .service
            .update_policy_parts(group, policy, parts, now)
            .await;
        self.followed(group.as_str(), r).await
    }

    /// `group renew`: may move the expiry deadline and reopen an expired group.
    pub async fn renew(
        &self,
        group: &GroupName,
        duration: &str,
        now: UnixMillis,
    ) -> Result<GroupDetail, GroupError> {
        let r = self.service.renew(group, duration, now).await;
        self.followed(group.as_str(), r).await
    }

    /// `group set-payment-overdue` / `clear-payment-overdue`.
    pub async fn set_payment_overdue(
        &self,
        group: &GroupName,
        overdue: bool,
        now: UnixMillis,
    ) -> Result<GroupDetail, GroupError> {
        let r = self.service.set_payment_overdue(group, overdue, now).await;
        self.followed(group.as_str(), r).await
    }

    /// `group set-auto-renew`: moves the lifecycle deadline.
    pub async fn set_auto_renew(
        &self,
        group: &GroupName,
        on: bool,
        now: UnixMillis,
    ) -> Result<GroupDetail, GroupError> {
        let r = self.service.set_auto_renew(group, on, now).await;
        self.followed(group.as_str(), r).await
    }

    /// `group purge` / `group delete`: the actor stops and metering ends,
    /// whatever the answer (a refusal may follow a half-gone group).
    pub async fn remove(
        &self,
        group: &GroupName,
        action: Removal,
        now: UnixMillis,
    ) -> Result<String, GroupError> {
        let removed = self.service.remove(group, action, now).await;
        self.follow(group.as_str()).await;
        removed
    }

    /// `group update-image`: the group goes `updating` (its actor takes no
    /// new sessions) and the rollout timer runs the update.
    pub async fn update_image(
        &self,
        store: &Store,
        spec: ImageUpdateSpec,
        now: UnixMillis,
    ) -> Result<GroupDetail, GroupError> {
        let name = crate::rollout::image::begin(store, spec, now).await?;
        self.follow(&name).await;
        self.service.show(&name).await
    }
}
