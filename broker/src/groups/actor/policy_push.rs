//! Pushing the group's policy to one agent (`Command::ApplyPolicy`) and
//! trying again while it fails.
//!
//! A child module of [`super`] (the actor), which starts one push per agent
//! and version ([`Actor::push_policy`](super::Actor)). The push runs in its
//! own tracked task, so the actor is never held up by an agent:
//!
//! - `Done`: the version is committed to `resource_policy` (the newest
//!   version wins) with a `policy-applied` event.
//! - The agent answers `Failed` (its policy hook failed, the document was
//!   refused) or does not answer in time: a `policy-failed` event, with the
//!   tail of the hook's output ([`crate::hook_failure::brief`]), and the
//!   same version is sent again after [`retry_after`] (30 s, doubling up to
//!   10 minutes) on the groups' clock, for as long as the agent stays
//!   connected. The agent keeps its previous policy while a version's hook
//!   fails (`agent/src/policy.rs`), so trying again is applying it again.
//! - The agent is not connected, or its connection closed: a `policy-failed`
//!   event; its next join sends the group's policy again.
//!
//! A push stops trying when a newer push to the same agent started (a new
//! version, or the agent re-joined: [`InFlight`]), when the group's version
//! moved on, when the agent left the group or went away, and at shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_common::duration::format_duration;
use ferry_common::wire::{Command, CommandOutcome};
use ferry_common::{GroupName, ResourceId, UnixMillis};

use super::policy_document;
use super::Shared;
use crate::hook_failure::brief;
use crate::registry::{CommandError, COMMAND_TIMEOUT};
use crate::store::{PolicyOutcome, PolicyPushState, StoreError};

/// Wait before the first new attempt after a failure.
pub const FIRST_RETRY: Duration = Duration::from_secs(30);

/// Longest wait between attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(10 * 60);

/// The wait after failed attempt number `attempt` (1 for the first):
/// [`FIRST_RETRY`], doubling, at most [`MAX_RETRY`].
pub fn retry_after(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1u32 << doublings).min(MAX_RETRY)
}

/// The push in progress per (group, agent): a newer one takes over, and the
/// older stops at its next attempt.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    next: AtomicU64,
    /// (group number, resource) -> the ticket of the push that may go on.
    pushes: Mutex<HashMap<(i64, ResourceId), u64>>,
}

impl InFlight {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(i64, ResourceId), u64>> {
        // One insert or remove per call: a panic cannot leave it half done.
        self.pushes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes a new push the one that goes on; returns its ticket.
    pub(super) fn claim(&self, num: i64, resource: &ResourceId) -> u64 {
        let ticket = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.map().insert((num, resource.clone()), ticket);
        ticket
    }

    fn is_current(&self, num: i64, resource: &ResourceId, ticket: u64) -> bool {
        self.map().get(&(num, resource.clone())) == Some(&ticket)
    }

    fn release(&self, num: i64, resource: &ResourceId, ticket: u64) {
        let mut map = self.map();
        if map.get(&(num, resource.clone())) == Some(&ticket) {
            map.remove(&(num, resource.clone()));
        }
    }
}

/// One push: the version, the document and whom to send it to.
pub(super) struct Push {
    pub num: i64,
    pub group: GroupName,
    pub resource: ResourceId,
    pub version: u64,
    pub document: String,
    /// From [`InFlight::claim`].
    pub ticket: u64,
}

/// Sends the policy until it is applied or trying again makes no sense
/// (see the module doc). Every attempt's outcome is written.
pub(super) async fn run(shared: Arc<Shared>, push: Push) {
    let Push {
        num,
        group,
        resource: real,
        version,
        document,
        ticket,
    } = push;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let command = Command::ApplyPolicy {
            group: group.clone(),
            version,
            document: document.clone(),
        };
        let outcome = tokio::select! {
            r = shared.registry.command(&real, command, COMMAND_TIMEOUT) => r,
            _ = shared.shutdown.cancelled() => break,
        };
        let now = shared.clock.now();
        let wait = retry_after(attempt);
        let due = UnixMillis(
            now.0
                .saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
        );
        let again = format!(
            "tried again at {} (in {}) while its agent stays connected",
            crate::render::rfc3339_secs(due),
            format_duration(wait)
        );
        let (applied, retry, kind, message) = match outcome {
            Ok(CommandOutcome::Done) => (
                true,
                false,
                "policy-applied",
                if attempt == 1 {
                    format!("policy version {version} applied on {real}")
                } else {
                    format!("policy version {version} applied on {real} at attempt {attempt}")
                },
            ),
            Ok(CommandOutcome::Failed(m)) => (
                false,
                true,
                "policy-failed",
                format!(
                    "policy version {version} failed on {real}: the agent says: {}; the host \
                     keeps its previous policy; {again}",
                    brief(&m)
                ),
            ),
            Err(e @ CommandError::Timeout(..)) => (
                false,
                true,
                "policy-failed",
                format!("policy version {version} not applied on {real}: {e}; {again}"),
            ),
            Err(e) => (
                false,
                false,
                "policy-failed",
                format!(
                    "policy version {version} not applied on {real}: {e}; it is sent again \
                     when its agent re-joins"
                ),
            ),
        };
        if !applied {
            tracing::warn!(%group, "{message}");
        }
        if let Err(e) = record(&shared, num, &real, version, applied, kind, message).await {
            tracing::error!(%group, resource = %real, "record policy version {version}: {e}");
        }
        if !retry {
            break;
        }
        // The groups' clock (a test's manual clock, or the wall clock,
        // whose sleeps are capped: wait until the due time is reached).
        while shared.clock.now() < due {
            tokio::select! {
                _ = shared.clock.sleep_until(Some(due)) => {}
                _ = shared.shutdown.cancelled() => {
                    shared.policy_pushes.release(num, &real, ticket);
                    return;
                }
            }
        }
        if !still_wanted(&shared, num, &group, &real, version, ticket).await {
            break;
        }
    }
    shared.policy_pushes.release(num, &real, ticket);
}

/// Whether trying `version` on `real` again still makes sense: this push
/// is the newest to it, the group's version is still `version` and the
/// group live, the agent is connected, still in the group, and has not
/// applied it meanwhile.
async fn still_wanted(
    shared: &Shared,
    num: i64,
    group: &GroupName,
    real: &ResourceId,
    version: u64,
    ticket: u64,
) -> bool {
    if !shared.policy_pushes.is_current(num, real, ticket) {
        return false;
    }
    let connected = shared.registry.snapshot().contains_key(real);
    if !connected {
        return false;
    }
    let read = shared.store.policy_push_state(num, real).await;
    match read {
        Ok(PolicyPushState {
            group: Some((v, status)),
            resource_group: Some(grp),
            applied,
        }) => {
            v == version
                && status != "gone"
                && grp == group.as_str()
                && applied.is_none_or(|a| a < version)
        }
        Ok(_) => false,
        Err(e) => {
            tracing::warn!(%group, resource = %real, "read policy state: {e}; not trying again");
            false
        }
    }
}

/// Commits an attempt's outcome: the applied version (never lowered by a
/// late answer for an older one) and its event.
async fn record(
    shared: &Shared,
    num: i64,
    real: &ResourceId,
    version: u64,
    applied: bool,
    kind: &'static str,
    message: String,
) -> Result<(), StoreError> {
    let at = shared.clock.now();
    shared
        .store
        .record_policy_outcome(
            num,
            real,
            PolicyOutcome {
                version,
                applied,
                at,
                kind,
                message,
            },
        )
        .await
}

impl super::Actor {
    /// The newest policy version `resource` acknowledged for this group; 0
    /// when none (or unreadable: pushing again is harmless).
    pub(super) async fn applied_version(&self, resource: &ResourceId) -> u64 {
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
    pub(super) fn push_policy(&mut self, real: &ResourceId) {
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
        let push = Push {
            num,
            group,
            resource,
            version,
            document,
            ticket,
        };
        self.shared.tracker.spawn(run(self.shared.clone(), push));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_wait_30_seconds_doubling_up_to_10_minutes() {
        let secs: Vec<u64> = (1..=8).map(|a| retry_after(a).as_secs()).collect();
        assert_eq!(secs, [30, 60, 120, 240, 480, 600, 600, 600]);
        assert_eq!(retry_after(u32::MAX), MAX_RETRY);
    }

    #[test]
    fn a_newer_push_takes_over() {
        let f = InFlight::default();
        let r: ResourceId = "h1".parse().expect("id");
        let old = f.claim(1, &r);
        let new = f.claim(1, &r);
        assert!(!f.is_current(1, &r, old) && f.is_current(1, &r, new));
        // The older one finishing does not drop the newer one.
        f.release(1, &r, old);
        assert!(f.is_current(1, &r, new));
        f.release(1, &r, new);
        assert!(f.map().is_empty());
    }
}
