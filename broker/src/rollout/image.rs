//! `group update-image` (SPEC section 9): the admin side of image updates.
//!
//! - [`begin`] (the admin request) checks the status (`published` or
//!   `update-failed`, [`lifecycle::check_image_update`]), that no OTA
//!   rollout runs, and the image (as at publish), and in one transaction
//!   records the update (`image_updates`), sets the group `updating` and
//!   writes the status event. From then on the route service refuses new
//!   sessions (`group-not-available`), and so does the group's actor (a
//!   request already on its way).
//! - The rollout timer ([`super::run`]) starts the update's task as soon as
//!   it is recorded (and resumes it after a broker restart), which runs it
//!   on the rollout machine ([`super::machine`], kind `image`): warning,
//!   switch, each host's outcome, the group's image and status at the end.
//! - Nothing is added or billed for it: the update feeds the group's engine
//!   nothing but the drain of a host it failed on (and the undrain of one
//!   it switched after an earlier failure); resources stay available to it
//!   while their sessions are warned, and demand cannot grow since routing
//!   refuses new sessions, so no scale-out is decided for it.
//! - [`versions`]: `group show`'s versions, with each host's outcome in the
//!   group's latest image update.

use std::time::Duration;

use ferry_common::admin::{GroupVersionsInfo, ImageUpdateSpec, ResourceVersionInfo};
use ferry_common::limits::MAX_TEXT_LEN;
use ferry_common::{GroupName, ResourceId, UnixMillis};

use crate::groups::lifecycle::{self, Status};
use crate::groups::service::GroupError;
use crate::registry::Registry;
use crate::store::rollouts::{
    GroupEvent, GroupVersions, ImageBegun, NewImageUpdate, StoredVersions,
};
use crate::store::{Store, StoreError};

/// Longest warning an operator may give: a day.
pub const MAX_WARNING: Duration = Duration::from_secs(24 * 3600);

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The problems of an image name, as at publish.
fn check_image(image: &str) -> Result<(), GroupError> {
    let problem = if image.trim().is_empty() {
        "image: required".to_owned()
    } else if image.len() > MAX_TEXT_LEN {
        format!("image: longer than {MAX_TEXT_LEN} bytes")
    } else {
        return Ok(());
    };
    Err(GroupError::Invalid(vec![problem]))
}

/// `group update-image`: records the update and sets the group `updating`
/// (see the module doc); the caller then syncs the group's actor, which
/// takes no new sessions from then on and wakes the rollout timer, which
/// starts the update. Returns the group's name.
pub async fn begin(
    store: &Store,
    spec: ImageUpdateSpec,
    now: UnixMillis,
) -> Result<String, GroupError> {
    check_image(&spec.image)?;
    let warning = Duration::from_millis(spec.warning_ms);
    if warning > MAX_WARNING {
        return Err(GroupError::Invalid(vec![format!(
            "warning: {} is longer than the longest, {}",
            ferry_common::duration::format_duration(warning),
            ferry_common::duration::format_duration(MAX_WARNING)
        )]));
    }
    let begun = store
        .begin_image_update(spec.group.to_string(), move |g, ota| {
            let status = Status::parse(&g.status)
                .ok_or_else(|| StoreError::Corrupt(format!("status {:?}", g.status)))?;
            let billing = if g.billing == "subscription" {
                "subscription"
            } else {
                "pay-as-you-go"
            };
            lifecycle::check_image_update(billing, status)?;
            // One update at a time: an OTA rollout drains and updates hosts
            // one wave after another, and switching their image under it
            // would mix the two.
            if let Some(ota) = ota {
                return Err(GroupError::Conflict(format!(
                    "group {} is rolling out OTA schedule {}; update the image after it \
                     ends (ferryctl ota history {})",
                    g.name, ota.id, g.name
                )));
            }
            Ok(NewImageUpdate {
                warning_ms: u64::try_from(ms(warning)).unwrap_or(0),
                started_at: now,
                disconnect_at: UnixMillis(now.0.saturating_add(ms(warning))),
                status: Status::Updating.as_str().to_owned(),
                event: GroupEvent {
                    kind: "status",
                    message: format!(
                        "{status} -> updating: image update from {} to {}; open \
                         sessions are warned and disconnected in {}, no new sessions meanwhile",
                        g.image,
                        spec.image,
                        ferry_common::duration::format_duration(warning)
                    ),
                },
                image: spec.image,
            })
        })
        .await?;
    match begun {
        ImageBegun::NoGroup => Err(GroupError::NotFound(format!(
            "no group named {}",
            spec.group
        ))),
        ImageBegun::Refused(e) => Err(e),
        ImageBegun::Begun(g) => Ok(g.name.to_string()),
    }
}

/// `group show`'s versions: the group's image and what each resource
/// registered with its name runs (its live inventory when connected).
pub async fn versions(
    store: &Store,
    registry: &Registry,
    group: &GroupName,
) -> Result<GroupVersionsInfo, GroupError> {
    // Like `group show`: the live group of that name first, else a gone one.
    let GroupVersions {
        image,
        status,
        resources: stored,
        outcomes,
    } = store
        .group_versions(group.to_string())
        .await?
        .ok_or_else(|| GroupError::NotFound(format!("no group named {group}")))?;
    let live = registry.snapshot();
    let mut resources = Vec::with_capacity(stored.len());
    for StoredVersions {
        resource,
        agent_version,
        image_version,
    } in stored
    {
        let Ok(id) = resource.parse::<ResourceId>() else {
            continue;
        };
        let inventory = live.get(&id).and_then(|l| l.inventory.clone());
        let image_update = outcomes.get(&resource).cloned();
        resources.push(match inventory {
            Some(inv) => ResourceVersionInfo {
                resource: id,
                connected: true,
                agent_version: inv.agent_version,
                image_version: inv.image_version,
                components: inv.components,
                image_update,
            },
            None => ResourceVersionInfo {
                connected: live.contains_key(&id),
                resource: id,
                agent_version,
                image_version,
                components: Vec::new(),
                image_update,
            },
        });
    }
    Ok(GroupVersionsInfo {
        image,
        status,
        resources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::clock::ManualClock;
    use crate::config::GroupsConfig;
    use crate::groups::{GroupActors, GroupService};
    use crate::rollout::driver::{Ctx, Driver, Which};
    use crate::rollout::Settings;

    use ferry_common::admin::{GroupSpec, OtaOfferSpec, OtaScheduleSpec};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    const T0: i64 = 1_700_000_000_000;

    /// One base host, one elastic at half use.
    fn spec(name: &str) -> GroupSpec {
        let mut spec = crate::test_support::group_spec(name);
        spec.base_resources = 1;
        spec.policy.usage_threshold = Some(50);
        spec.policy.scale_out_step = Some(1);
        spec.policy.max_elastic = Some(1);
        spec.policy.max_idle_ms = Some(600_000);
        spec
    }

    fn update(group: &str, image: &str, warning_ms: u64) -> ImageUpdateSpec {
        ImageUpdateSpec {
            group: group.parse().expect("name"),
            image: image.into(),
            warning_ms,
        }
    }

    #[tokio::test]
    async fn begin_checks_status_and_image_and_the_switch_starts_at_the_warning_s_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::testing::open_for_test(dir.path());
        let registry = Arc::new(Registry::new());
        let clock = ManualClock::new(UnixMillis(T0));
        let config = GroupsConfig {
            clock: clock.clock(),
            ..GroupsConfig::default()
        };
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let service = GroupService::new(store.clone(), config);
        let actors = GroupActors::new(crate::groups::ActorsParts {
            store: store.clone(),
            registry: registry.clone(),
            service: service.clone(),
            provisioning: None,
            rollouts: crate::rollout::Board::default(),
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
            ownership: crate::cluster::Ownership::everything(),
        });
        service
            .publish(spec("g1"), UnixMillis(T0))
            .await
            .expect("publish");
        actors.start_all().await.expect("actors");
        let name: GroupName = "g1".parse().expect("name");

        // Refused: an empty image, a warning past the longest, an unknown group.
        let err = begin(&store, update("g1", "  ", 0), UnixMillis(T0))
            .await
            .expect_err("empty image");
        assert!(err.to_string().contains("image: required"), "{err}");
        let err = begin(
            &store,
            update("g1", "img-2", 25 * 3_600_000),
            UnixMillis(T0),
        )
        .await
        .expect_err("too long a warning");
        assert!(err.to_string().contains("longer than the longest"), "{err}");
        assert!(matches!(
            begin(&store, update("nope", "img-2", 0), UnixMillis(T0)).await,
            Err(GroupError::NotFound(_))
        ));

        // Accepted: updating at once, durably, with its event.
        let got = begin(&store, update("g1", "img-2", 300_000), UnixMillis(T0))
            .await
            .expect("begin");
        assert_eq!(got, "g1");
        actors.sync("g1").await.expect("sync");
        let d = service.show("g1").await.expect("show");
        assert_eq!(
            (d.info.status.as_str(), d.info.image.as_str()),
            ("updating", "img-1")
        );
        // Not twice: the refusal names the status and what is allowed.
        let err = begin(&store, update("g1", "img-3", 0), UnixMillis(T0))
            .await
            .expect_err("already updating")
            .to_string();
        assert!(
            err.contains("status updating") && err.contains("published or update-failed"),
            "{err}"
        );

        // The update's task, stepped by hand on the manual clock.
        let ota = crate::ota::Ota::new(store.clone(), clock.clock());
        let ctx = Ctx::new(
            &ota,
            registry.clone(),
            actors.clone(),
            Settings::default(),
            shutdown.clone(),
        );
        let work = store.rollout_work().await.expect("read");
        let [running] = work.images.as_slice() else {
            panic!("one running update: {work:?}");
        };
        let id = running.id;
        let mut driver = Driver::load(ctx, Which::Image(id))
            .await
            .expect("load")
            .expect("running");
        driver.turn().await.expect("turn");

        // Before the deadline nothing is switched.
        clock.advance(Duration::from_secs(299));
        driver.turn().await.expect("turn");
        assert_eq!(
            service.show("g1").await.expect("show").info.status,
            "updating"
        );
        // At it the switch starts; no agent joined the group, so the set is
        // empty and the update is done.
        clock.advance(Duration::from_secs(1));
        driver.turn().await.expect("turn");
        let d = service.show("g1").await.expect("show");
        assert_eq!(
            (d.info.status.as_str(), d.info.image.as_str()),
            ("published", "img-2")
        );
        let events = service.events(&name).await.expect("events");
        let statuses: Vec<&str> = events
            .iter()
            .filter(|e| e.kind == "status")
            .map(|e| e.message.as_str())
            .collect();
        assert_eq!(statuses.len(), 3, "{statuses:?}");
        assert!(
            statuses[1].starts_with("published -> updating"),
            "{statuses:?}"
        );
        assert!(
            statuses[2].starts_with("updating -> published"),
            "{statuses:?}"
        );
        let v = versions(&store, &registry, &name).await.expect("versions");
        assert_eq!(
            (v.image.as_str(), v.status.as_str()),
            ("img-2", "published")
        );
        // From published again, a new update may start.
        begin(&store, update("g1", "img-3", 0), UnixMillis(T0 + 300_000))
            .await
            .expect("a second update");
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn an_image_update_is_refused_while_an_ota_rolls_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::testing::open_for_test(dir.path());
        let service = GroupService::new(store.clone(), GroupsConfig::default());
        service
            .publish(spec("g1"), UnixMillis(T0))
            .await
            .expect("publish");
        // OTA schedule 1 of group g1, running.
        let ota = crate::ota::Ota::new(store.clone(), ManualClock::new(UnixMillis(T0)).clock());
        let offer = ota
            .offer(OtaOfferSpec {
                group: "g1".parse().expect("name"),
                component: "app".into(),
                version: "2".into(),
                package: String::new(),
                description: "app 2".into(),
            })
            .await
            .expect("offer");
        let schedule = ota
            .schedule(OtaScheduleSpec {
                group: "g1".parse().expect("name"),
                update: offer.id,
                start: UnixMillis(T0 + 1_000),
                wave: 1,
                drain_ms: 0,
            })
            .await
            .expect("schedule");
        store
            .running_schedule_for_test(schedule.id, Vec::new(), UnixMillis(T0))
            .await;
        let err = begin(&store, update("g1", "img-2", 0), UnixMillis(T0))
            .await
            .expect_err("refused while the OTA runs");
        assert!(
            matches!(&err, GroupError::Conflict(m) if m.contains("OTA schedule 1")),
            "{err}"
        );
        assert_eq!(
            service.show("g1").await.expect("show").info.status,
            "published"
        );
    }
}
