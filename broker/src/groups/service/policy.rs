//! `group publish`, `group update-policy` and `group show` with every part
//! of the policy (issue 7): session, display and periods beside scaling.
//!
//! A child module of [`super`] (the group service), so it shares its private
//! helpers: the same transaction shape, the same scaling checks. Parts are
//! merged and checked by [`crate::groups::policy_parts`]; periods by the
//! engine's period rules against the group's base count
//! ([`Policy::validate_for_group`]). A refusal lists every problem of every
//! part. An accepted update is a new policy version, pushed to the agents by
//! the group's actor as before.

use crate::store::GroupsTx;
use ferry_common::admin::{GroupPolicyDetail, GroupSpec, PolicyPartsSpec, PolicySpec};
use ferry_common::{GroupName, UnixMillis};

use super::{
    corrupt, describe_policy, detail, find, merge_policy, publish_tx, validate_spec, GroupError,
    GroupService,
};
use crate::engine::{validate_periods, Policy, PolicyError};
use crate::groups::policy_parts::{
    describe_parts, merge_parts, merge_periods, parts_view, stored_json, PolicyParts,
};

fn listed(e: PolicyError) -> impl Iterator<Item = String> {
    e.problems
        .into_iter()
        .map(|p| format!("{}: {}", p.field, p.message))
}

impl GroupService {
    /// `group publish` with the policy parts.
    pub async fn publish_with_policy(
        &self,
        spec: GroupSpec,
        parts: PolicyPartsSpec,
        now: UnixMillis,
    ) -> Result<GroupPolicyDetail, GroupError> {
        let mut problems = Vec::new();
        let checked = match validate_spec(&self.config, &spec) {
            Ok(x) => Some(x),
            Err(GroupError::Invalid(p)) => {
                problems.extend(p);
                None
            }
            Err(e) => return Err(e),
        };
        let merged = merge_parts(&PolicyParts::default(), &parts)
            .map_err(|p| problems.extend(p))
            .ok();
        let periods = merge_periods(&[], parts.periods.as_deref()).unwrap_or_else(|p| {
            problems.push(p);
            Vec::new()
        });
        let max_elastic = checked
            .as_ref()
            .map(|(_, p)| p.max_elastic)
            .or(spec.policy.max_elastic)
            .unwrap_or(0);
        if let Err(e) = validate_periods(&periods, spec.base_resources, max_elastic) {
            problems.extend(listed(e));
        }
        let (Some((billing, mut policy)), Some(merged), true) =
            (checked, merged, problems.is_empty())
        else {
            return Err(GroupError::Invalid(problems));
        };
        policy.periods = periods;
        let config = self.config.clone();
        let id = self
            .store
            .group_change(move |tx| {
                let id = publish_tx(&config, tx, spec, billing, policy, merged, now)?;
                let row = find(tx, &id)?;
                tx.event(
                    row.num,
                    now,
                    "policy",
                    &format!("policy parts: {}", describe_parts(&row.policy, &row.parts)),
                )?;
                Ok::<_, GroupError>(id)
            })
            .await?;
        self.touch();
        self.show_with_policy(&id).await
    }

    /// `group update-policy` with the policy parts: merges everything given
    /// over the stored policy, checks every part, and stores a new version.
    pub async fn update_policy_parts(
        &self,
        group: &GroupName,
        patch: PolicySpec,
        parts: PolicyPartsSpec,
        now: UnixMillis,
    ) -> Result<GroupPolicyDetail, GroupError> {
        let group = group.to_string();
        let id = self
            .store
            .group_change(move |tx| {
                let row = find(tx, &group)?;
                row.life.check_editable("update the policy of")?;
                let mut problems = Vec::new();
                let policy = match merge_policy(Some(&row.policy), &patch, &row.spec) {
                    Ok(p) => Some(p),
                    Err(GroupError::Invalid(p)) => {
                        problems.extend(p);
                        None
                    }
                    Err(e) => return Err(e),
                };
                let merged = merge_parts(&row.parts, &parts)
                    .map_err(|p| problems.extend(p))
                    .ok();
                let periods = merge_periods(&row.policy.periods, parts.periods.as_deref())
                    .unwrap_or_else(|p| {
                        problems.push(p);
                        Vec::new()
                    });
                let policy = match policy {
                    Some(mut policy) => {
                        policy.periods = periods;
                        // Scaling and periods, with the group's base count.
                        if let Err(e) =
                            policy.validate_for_group(Some(&row.spec), row.base_resources)
                        {
                            problems.extend(listed(e));
                        }
                        Some(policy)
                    }
                    None => {
                        let max_elastic = patch.max_elastic.unwrap_or(row.policy.max_elastic);
                        if let Err(e) = validate_periods(&periods, row.base_resources, max_elastic)
                        {
                            problems.extend(listed(e));
                        }
                        None
                    }
                };
                let (Some(policy), Some(merged), true) = (policy, merged, problems.is_empty())
                else {
                    return Err(GroupError::Invalid(problems));
                };
                store_policy(tx, row.num, &policy, &merged, now)?;
                Ok::<_, GroupError>(row.id)
            })
            .await?;
        self.show_with_policy(&id).await
    }

    /// `group show` with every policy part (`live` is the caller's to add).
    pub async fn show_with_policy(&self, group: &str) -> Result<GroupPolicyDetail, GroupError> {
        let group = group.to_owned();
        let retention = self.config.retention;
        self.store
            .group_read(move |tx| {
                let detail = detail(tx, &group, retention)?;
                let row = find(tx, &group)?;
                Ok::<_, GroupError>(GroupPolicyDetail {
                    detail,
                    live: None,
                    parts: parts_view(&row.policy, &row.parts),
                })
            })
            .await
    }
}

/// Writes an accepted policy as the group's next version, with its event.
fn store_policy(
    tx: &GroupsTx<'_>,
    num: i64,
    policy: &Policy,
    parts: &PolicyParts,
    now: UnixMillis,
) -> Result<(), GroupError> {
    let json = stored_json(policy, parts).map_err(corrupt)?;
    let version = tx.set_policy(num, &json, now)?;
    tx.event(
        num,
        now,
        "policy",
        &format!(
            "policy updated to version {version}: {}; {}",
            describe_policy(policy),
            describe_parts(policy, parts)
        ),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The service through a real store: publish with parts, update, refuse,
    //! and the older requests keep the parts.

    use std::time::Duration;

    use ferry_common::admin::{
        DisplayPolicySpec, PeriodSpec, PolicyLimit, Resolution, SessionPolicySpec,
    };

    use super::*;
    use crate::config::GroupsConfig;
    use crate::engine::Retention;

    const T0: UnixMillis = UnixMillis(1_772_409_600_000);

    fn service(dir: &std::path::Path) -> GroupService {
        let store = crate::store::testing::open_for_test(dir);
        GroupService::new(store, GroupsConfig::default())
    }

    use crate::test_support::group_spec as spec;

    fn period(weekdays: u8, start: u16, end: u16, min_ready: u32) -> PeriodSpec {
        PeriodSpec {
            weekdays,
            start_minute: start,
            end_minute: end,
            min_ready,
            warm_up_ms: 600_000,
        }
    }

    fn invalid(e: GroupError) -> Vec<String> {
        match e {
            GroupError::Invalid(p) => p,
            other => panic!("not a refusal: {other}"),
        }
    }

    #[tokio::test]
    async fn parts_are_stored_updated_kept_and_refused_with_every_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = service(dir.path());
        let parts = PolicyPartsSpec {
            session: SessionPolicySpec {
                disconnect_retention: Some(PolicyLimit::Unlimited),
                max_session_duration: Some(PolicyLimit::Ms(8 * 3_600_000)),
                idle_disconnect: None,
            },
            display: DisplayPolicySpec {
                frame_rate: Some(60),
                resolution: Some(Resolution {
                    width: 2560,
                    height: 1440,
                }),
                adaptive_resolution: Some(false),
                streaming_mode: Some("mixed".into()),
                quality_strategy: Some("smooth".into()),
            },
            periods: Some(vec![period(0b11111, 540, 1080, 3)]),
        };
        let d = g
            .publish_with_policy(spec("g1"), parts, T0)
            .await
            .expect("publish");
        assert_eq!(d.detail.policy_version, 1);
        assert_eq!(d.parts.session.disconnect_retention, PolicyLimit::Unlimited);
        assert_eq!(
            d.parts.session.max_session_duration,
            PolicyLimit::Ms(28_800_000)
        );
        assert_eq!(d.parts.session.idle_disconnect, PolicyLimit::Unlimited);
        assert_eq!(
            (
                d.parts.display.width,
                d.parts.display.streaming_mode.as_str()
            ),
            (2560, "mixed")
        );
        assert_eq!(d.parts.periods, vec![period(0b11111, 540, 1080, 3)]);

        // An older update-policy (scaling only) keeps the parts.
        g.update_policy(
            &"g1".parse().expect("name"),
            PolicySpec {
                usage_threshold: Some(70),
                ..PolicySpec::default()
            },
            T0,
        )
        .await
        .expect("update");
        let shown = g.show_with_policy("g1").await.expect("show");
        assert_eq!(shown.detail.policy_version, 2);
        assert_eq!(shown.detail.policy.usage_threshold, 70);
        assert_eq!(shown.parts, d.parts);

        // Update: a finite retention, periods cleared, the rest kept.
        let d = g
            .update_policy_parts(
                &"g1".parse().expect("name"),
                PolicySpec::default(),
                PolicyPartsSpec {
                    session: SessionPolicySpec {
                        disconnect_retention: Some(PolicyLimit::Ms(180_000)),
                        ..SessionPolicySpec::default()
                    },
                    periods: Some(vec![]),
                    ..PolicyPartsSpec::default()
                },
                T0,
            )
            .await
            .expect("update parts");
        assert_eq!(d.detail.policy_version, 3);
        assert_eq!(
            d.parts.session.disconnect_retention,
            PolicyLimit::Ms(180_000)
        );
        assert_eq!(d.parts.display.frame_rate, 60);
        assert!(d.parts.periods.is_empty());
        // The actor reads the same row.
        let stored = g
            .store
            .live_group("g1")
            .await
            .expect("read")
            .expect("g1 is live")
            .policy;
        let parts = PolicyParts::from_stored(&stored).expect("parts");
        assert_eq!(
            parts.session.disconnect_retention,
            Retention::For(Duration::from_secs(180))
        );

        // Every problem of every part at once, and nothing changes.
        let problems = invalid(
            g.update_policy_parts(
                &"g1".parse().expect("name"),
                PolicySpec {
                    usage_threshold: Some(0),
                    ..PolicySpec::default()
                },
                PolicyPartsSpec {
                    session: SessionPolicySpec {
                        disconnect_retention: Some(PolicyLimit::Ms(301 * 60_000)),
                        max_session_duration: Some(PolicyLimit::Ms(60_000)),
                        idle_disconnect: None,
                    },
                    display: DisplayPolicySpec {
                        frame_rate: Some(120),
                        quality_strategy: Some("best".into()),
                        ..DisplayPolicySpec::default()
                    },
                    // Too short; more than 2 base + 2 elastic ready.
                    periods: Some(vec![period(1, 540, 550, 1), period(2, 600, 700, 5)]),
                },
                T0,
            )
            .await
            .unwrap_err(),
        );
        let text = problems.join("\n");
        for needle in [
            "usage_threshold",
            "disconnect_retention",
            "max_session_duration",
            "frame_rate",
            "quality_strategy",
            "shorter than 15 minutes",
            "min_ready 5 is more than 2 base + 2 elastic",
        ] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
        let after = g.show_with_policy("g1").await.expect("show");
        assert_eq!(after.detail.policy_version, 3);
        assert_eq!(after.parts, d.parts);

        // A publish is refused with its scaling and parts problems together.
        let mut bad = spec("g2");
        bad.policy.concurrent_sessions = Some(3);
        let problems = invalid(
            g.publish_with_policy(
                bad,
                PolicyPartsSpec {
                    display: DisplayPolicySpec {
                        streaming_mode: Some("audio".into()),
                        ..DisplayPolicySpec::default()
                    },
                    periods: Some(vec![period(1, 540, 600, 1), period(1, 602, 700, 1)]),
                    ..PolicyPartsSpec::default()
                },
                T0,
            )
            .await
            .unwrap_err(),
        );
        let text = problems.join("\n");
        assert!(text.contains("concurrent_sessions"), "{text}");
        assert!(text.contains("streaming_mode"), "{text}");
        assert!(text.contains("less than 5 minutes apart"), "{text}");
        assert!(g.show("g2").await.is_err(), "nothing published");
    }

    #[tokio::test]
    async fn a_group_published_without_parts_shows_the_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = service(dir.path());
        g.publish(spec("old"), T0).await.expect("publish");
        let d = g.show_with_policy("old").await.expect("show");
        assert_eq!(
            d.parts,
            parts_view(
                &Policy::new(2, 85, 2, 2, Duration::from_secs(3600)),
                &PolicyParts::default()
            )
        );
        assert_eq!(
            d.parts.session.disconnect_retention,
            PolicyLimit::Ms(15 * 60_000)
        );
        // A gone group still shows, parts and all.
        g.remove(
            &"old".parse().expect("name"),
            crate::groups::lifecycle::Removal::Purge,
            T0,
        )
        .await
        .expect("purge");
        let gone = g.show_with_policy("old").await.expect("show gone");
        assert_eq!(gone.detail.info.status, "gone");
        assert_eq!(gone.parts, d.parts);
    }
}
