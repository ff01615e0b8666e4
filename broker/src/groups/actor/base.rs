//! Base resources created through the provisioner (SPEC section 3:
//! `publishing` -> `published` or `publish-failed`), in the group's actor.
//!
//! With `[provisioner] base = "provisioned"`, a group published with `base`
//! base resources starts `publishing` ([`crate::groups::service`]); its
//! actor creates `<group>-b1..<group>-bN` with the elastic resources' create
//! path ([`super::elastic`]: one-time enrollment token, retries with backoff,
//! `provision-failed` events, `register_timeout`), each recorded first in
//! `elastic_resources` under engine id `b<n>` with `created_at` set once the
//! provisioner's create succeeded. Base resource `<group>-b<n>` takes base
//! slot `n` when its agent registers (billing as base starts there, as for
//! a configured base host); in such a group no other agent takes a base slot.
//!
//! When every one has registered the group is `published` (a `status`
//! event; a subscription's paid period starts then, with its publish
//! order). At the first create that fails for good or agent that does not
//! register in time it is `publish-failed` (a `status` event naming the
//! failing resources): every billing interval opened is closed at its own
//! start (never billed), the actor stops with its in-flight creates, and the
//! created resources are deleted through the provisioner
//! (`elastic::retire`, which handles groups that went away).
//!
//! Restart: a broker restarted while a group is publishing creates only the
//! base resources whose create had not succeeded (`created_at` unset), waits
//! for the others' registration until `register_timeout` after their
//! request, and has the provisioner resume them (local agents); registered
//! ones count as registered.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ferry_common::ResourceId;

use super::elastic::Report;
use super::{Actor, ActorError};
use crate::store::elastic::BaseRecord;
use crate::store::StoreError;

/// What an actor knows of its group's provisioned base resources.
#[derive(Debug, Default)]
pub(super) struct ProvisionedBase {
    /// The group's base resources are created through the provisioner: only
    /// `<group>-b<n>` takes base slot `n`.
    pub active: bool,
    /// This actor follows the group's publish.
    pub publishing: bool,
    /// While publishing: base resources whose agent has not registered yet.
    pub waiting: BTreeSet<ResourceId>,
    /// While publishing: base resources that failed, and why.
    pub failed: BTreeMap<ResourceId, String>,
}

fn is_base(engine_id: &ResourceId) -> bool {
    engine_id.as_str().starts_with('b')
}

impl Actor {
    /// At the actor's start: learns the group's provisioned base resources;
    /// while the group is publishing, creates those not created yet and
    /// waits for the others (see the module doc). A published group's
    /// provisioned base hosts are resumed (local agents).
    pub(super) async fn start_base(&mut self) -> Result<(), ActorError> {
        let num = self.row.num;
        let records = self.shared.store.provisioned_base(num).await?;
        let publishing = self.row.status == "publishing";
        if records.is_empty() && !publishing {
            return Ok(());
        }
        self.base.active = true;
        self.base.publishing = publishing;
        if publishing && !self.elastic.provisioned() {
            let why = "the broker has no provisioner configured any more".to_owned();
            self.base.failed.insert(
                ResourceId::new(format!("{}-b1", self.row.name)).map_err(|e| {
                    ActorError::Store(StoreError::Corrupt(format!("base resource id: {e}")))
                })?,
                why,
            );
            return Ok(());
        }
        let by_id: HashMap<ResourceId, BaseRecord> = records
            .into_iter()
            .map(|r| (r.engine_id.clone(), r))
            .collect();
        let now = self.now();
        for n in 1..=self.row.base {
            let (Ok(engine_id), Some(real)) =
                (ResourceId::new(format!("b{n}")), self.elastic.base_name(n))
            else {
                continue;
            };
            let record = by_id.get(&engine_id);
            match record.map(|r| (r.state.as_str(), r.created, r.requested_at)) {
                Some(("ready", _, _)) => self.elastic.resume(real),
                Some(("pending", true, requested_at)) if publishing => {
                    self.elastic.await_registration(engine_id, requested_at);
                    self.elastic.resume(real.clone());
                    self.note(
                        "restored",
                        format!(
                            "restored: base resource {real} was created before the broker \
                             restarted; waiting for its agent"
                        ),
                    );
                    self.base.waiting.insert(real);
                }
                None | Some(("pending", false, _)) if publishing => {
                    self.elastic
                        .create_base(engine_id, real.clone(), now)
                        .await?;
                    self.base.waiting.insert(real);
                }
                Some((state, _, _)) if publishing => {
                    self.base.failed.insert(real, format!("it is {state}"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The base slot (index) `resource` takes: in a group with provisioned
    /// base resources only `<group>-b<n>` takes slot `n` (free), and any
    /// other agent is flagged; otherwise the first free slot.
    pub(super) fn base_slot_for(&mut self, resource: &ResourceId) -> Option<usize> {
        if !self.base.active {
            return self.slots.iter().position(Option::is_none);
        }
        let n = resource
            .as_str()
            .strip_prefix(self.row.name.as_str())
            .and_then(|r| r.strip_prefix("-b"))
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<usize>().ok());
        match n {
            Some(n) if (1..=self.slots.len()).contains(&n) && self.slots[n - 1].is_none() => {
                Some(n - 1)
            }
            _ => {
                self.flag(
                    resource,
                    format!(
                        "resource {resource} registered for group {} whose base resources are \
                         created through the provisioner ({}-b1..); not used",
                        self.row.name, self.row.name
                    ),
                );
                None
            }
        }
    }

    /// The agent of a base resource was bound to slot `slot_id`.
    pub(super) fn base_registered(&mut self, resource: &ResourceId, slot_id: &ResourceId) {
        if !self.base.active {
            return;
        }
        let now = self.now();
        self.elastic.base_ready(slot_id, now);
        if self.base.publishing && self.base.waiting.remove(resource) {
            let left = self.base.waiting.len();
            self.note(
                "resource",
                format!("base resource {resource} registered; {left} still to register"),
            );
        }
    }

    /// A provisioning report about a base resource is handled here; one
    /// about an elastic resource is handed back.
    pub(super) fn base_report(&mut self, report: Report) -> Option<Report> {
        let engine_id = match &report {
            Report::CreateFailed { engine_id, .. } | Report::RegisterDeadline { engine_id }
                if is_base(engine_id) =>
            {
                engine_id.clone()
            }
            _ => return Some(report),
        };
        let Ok(real) = ResourceId::new(format!("{}-{engine_id}", self.row.name)) else {
            return None;
        };
        let (kind, why) = match report {
            Report::CreateFailed { why, .. } => ("create-failed", format!("create failed: {why}")),
            _ => {
                if !self.base.waiting.contains(&real) {
                    // It registered in time.
                    return None;
                }
                let timeout = self.register_timeout();
                (
                    "register-timeout",
                    format!("its agent did not register within {timeout}"),
                )
            }
        };
        let message = format!("{kind}: base resource {real}: {why}");
        self.note(kind, message.clone());
        self.flagged.insert(real.clone(), message);
        if self.base.publishing {
            self.base.waiting.remove(&real);
            self.base.failed.insert(real, why);
        }
        None
    }

    /// While publishing: once every base resource registered, the group is
    /// published; at the first failure it is publish-failed. Returns true
    /// when the actor must stop (the publish failed: its group is no longer
    /// live, and its in-flight creates are cancelled).
    pub(super) async fn settle_publish(&mut self) -> Result<bool, ActorError> {
        if !self.base.publishing {
            return Ok(false);
        }
        let end = if !self.base.failed.is_empty() {
            let failing: Vec<String> = self
                .base
                .failed
                .iter()
                .map(|(r, why)| format!("{r} ({why})"))
                .collect();
            Err(format!(
                "base resource(s) failed: {}; the resources created are deleted through the \
                 provisioner and never billed",
                failing.join(", ")
            ))
        } else if self.base.waiting.is_empty() {
            Ok(())
        } else {
            return Ok(false);
        };
        let failed = end.is_err();
        // The events that led here go first.
        self.commit().await?;
        let now = self.now();
        self.base.publishing = false;
        match self
            .shared
            .service
            .finish_publish(self.row.num, end, now)
            .await
        {
            Ok(status) => self.row.status = status.as_str().to_owned(),
            Err(crate::groups::service::GroupError::Store(e)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(group = %self.row.name, "finish publishing: {e}");
            }
        }
        // The lifecycle follower syncs the actor with the new status; after
        // a failure it finds the group not live and deletes its resources.
        self.shared.lifecycle.notify_one();
        if failed {
            self.elastic.cancel_tasks();
        }
        Ok(failed)
    }
}
