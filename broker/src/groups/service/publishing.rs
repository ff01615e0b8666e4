//! Statuses set from outside the lifecycle deadlines (SPEC section 3), the
//! store side.
//!
//! Publishing through the provisioner (`publishing`, `published`,
//! `publish-failed`): which groups start `publishing`, and the one
//! transaction that ends it. The group's actor creates the base resources
//! and calls [`GroupService::finish_publish`] (the actor's `base` module).
//!
//! Payment (`payment-overdue`): Ferry has no payment system; the billing
//! system or an operator tells the broker ([`GroupService::set_payment_overdue`]).

use super::{find, save_life, GroupError, GroupService, Row};
use crate::config::{GroupsConfig, ProvisionerKind};
use crate::groups::lifecycle::{Billing, Lifecycle, Outcome, Status};
use crate::store::{GroupsTx, StoreError};
use ferry_common::admin::GroupDetail;
use ferry_common::{GroupName, UnixMillis};

/// The lifecycle of a group published now when its base resources are
/// created through the provisioner (`[provisioner] base = "provisioned"`, a
/// provisioner configured, at least one base resource): `publishing`.
/// `None`: base resources are agents configured with `group = ...` and the
/// group is published at once.
pub(super) fn lifecycle(config: &GroupsConfig, billing: Billing, base: u32) -> Option<Lifecycle> {
    (config.provision_base && config.provisioner.kind != ProvisionerKind::None && base > 0)
        .then(|| Lifecycle::publishing(billing))
}

/// The event that says a group is publishing (nothing for other statuses).
pub(super) fn note_started(
    tx: &GroupsTx<'_>,
    row: &Row,
    now: UnixMillis,
) -> Result<(), GroupError> {
    if row.life.status != Status::Publishing {
        return Ok(());
    }
    tx.event(
        row.num,
        now,
        "status",
        &format!(
            "publishing: its {n} base resource(s) {name}-b1..{name}-b{n} are created through \
             the provisioner; it is published once every one has registered",
            n = row.base_resources,
            name = row.name
        ),
    )?;
    Ok(())
}

impl GroupService {
    /// Ends the publish of group `num` (its actor saw every base resource
    /// register, or one fail): `published` with a subscription's publish
    /// order, or `publish-failed` with `why` (naming the failing resources)
    /// and every open billing interval of the group closed at its own start,
    /// so a base resource of a failed publish is never billed. One
    /// transaction; refused unless the group is `publishing`.
    pub async fn finish_publish(
        &self,
        num: i64,
        end: Result<(), String>,
        now: UnixMillis,
    ) -> Result<Status, GroupError> {
        let config = self.config.clone();
        let status = self
            .store
            .group_change(move |tx| {
                let record = tx
                    .by_num(num)?
                    .ok_or_else(|| StoreError::Corrupt(format!("no group number {num}")))?;
                let mut row = find(tx, &record.id)?;
                let out = match end {
                    Ok(()) => row.life.publish_done(now)?,
                    Err(why) => {
                        let t = row.life.publish_failed(now, why)?;
                        tx.unbill_open_intervals(num)?;
                        Outcome {
                            transitions: vec![t],
                            orders: vec![],
                        }
                    }
                };
                GroupService::apply_outcome(&config, tx, &row, &out)?;
                save_life(tx, &row, now)?;
                Ok::<_, GroupError>(row.life.status)
            })
            .await?;
        self.touch();
        Ok(status)
    }

    /// `group set-payment-overdue` (`overdue`) / `group
    /// clear-payment-overdue`: a pay-as-you-go group goes from `published`
    /// to `payment-overdue` or back, with a `status` event; anything else
    /// is refused naming the status and what is allowed.
    pub async fn set_payment_overdue(
        &self,
        group: &GroupName,
        overdue: bool,
        now: UnixMillis,
    ) -> Result<GroupDetail, GroupError> {
        self.lifecycle_change(group, now, move |_, row| {
            let t = if overdue {
                row.life.set_payment_overdue(now)?
            } else {
                row.life.clear_payment_overdue(now)?
            };
            Ok(Outcome {
                transitions: vec![t],
                orders: vec![],
            })
        })
        .await
    }
}
