//! What `group show` says about a group's updates: what each resource runs
//! (`crate::rollout::image::versions`) and the update running or
//! scheduled, with each host's step and until when.
//!
//! The image update's steps are its rollout machine's (its task publishes
//! them on the [`crate::rollout::Board`] after every step), an OTA
//! rollout's are its rows (`ota_results`, written before each step). Hosts' deadlines are computed from the same values the
//! update itself uses: the warning's deadline, each host's drain start plus
//! the schedule's drain ([`crate::rollout::machine::drain_deadline`]).

use ferry_common::admin::{GroupRolloutsInfo, OtaScheduleInfo, RolloutHostInfo, RolloutInfo};
use ferry_common::GroupName;

use crate::groups::service::GroupError;
use crate::registry::Registry;
use crate::rollout::image::versions as group_versions;
use crate::rollout::machine::drain_deadline;
use crate::rollout::ImageProgress;
use crate::store::Store;

/// `group show`'s update part (`GroupRollouts`).
pub async fn group_rollouts(
    store: &Store,
    registry: &Registry,
    board: &crate::rollout::Board,
    group: &GroupName,
) -> Result<GroupRolloutsInfo, GroupError> {
    let versions = group_versions(store, registry, group).await?;
    let (name, ota) = match store.active_ota_of(group.to_string()).await? {
        Some((name, ota)) => (Some(name), ota),
        None => (None, None),
    };
    let mut rollouts = Vec::new();
    if let Some(name) = name.as_ref() {
        // The image update's task publishes where it is.
        rollouts.extend(board.image(name).map(image_rollout));
    }
    rollouts.extend(ota.as_ref().map(ota_rollout));
    Ok(GroupRolloutsInfo { versions, rollouts })
}

/// A running image update as the admin socket carries it.
pub fn image_rollout(p: ImageProgress) -> RolloutInfo {
    RolloutInfo {
        kind: "image-update".into(),
        id: u64::try_from(p.id).unwrap_or_default(),
        update: None,
        component: "image".into(),
        version: p.image,
        state: if p.switching { "switching" } else { "warning" }.into(),
        start: p.started_at,
        deadline: Some(p.disconnect_at),
        wave: 0,
        drain_ms: u64::try_from(p.disconnect_at.0.saturating_sub(p.started_at.0)).unwrap_or(0),
        hosts: p
            .hosts
            .into_iter()
            .map(|h| RolloutHostInfo {
                resource: h.resource,
                step: h.step.into(),
                until: h.until,
                detail: h.detail,
            })
            .collect(),
    }
}

/// A running or scheduled OTA rollout: each host's step from its row, the
/// drain deadline of the hosts draining.
pub fn ota_rollout(s: &OtaScheduleInfo) -> RolloutInfo {
    RolloutInfo {
        kind: "ota".into(),
        id: s.id,
        update: Some(s.update.id),
        component: s.update.component.clone(),
        version: s.update.version.clone(),
        state: s.state.clone(),
        start: s.started_at.unwrap_or(s.start),
        deadline: None,
        wave: s.wave,
        drain_ms: s.drain_ms,
        hosts: s
            .resources
            .iter()
            .map(|r| {
                let (step, until) = match r.state.as_str() {
                    "pending" => ("waiting", None),
                    "draining" => (
                        r.state.as_str(),
                        r.started_at.map(|t| drain_deadline(t, s.drain_ms)),
                    ),
                    other => (other, None),
                };
                RolloutHostInfo {
                    resource: r.resource.clone(),
                    step: step.into(),
                    until,
                    detail: r.detail.clone(),
                }
            })
            .collect(),
    }
}
