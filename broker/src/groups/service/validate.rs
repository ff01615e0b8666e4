//! What a group spec and its scaling policy must be before anything is
//! written: every problem of a spec or a policy found and listed at once,
//! a policy patch merged over the stored one, and a policy described for
//! the group's events.

use std::time::Duration;

use ferry_common::admin::{BillingSpec, GroupSpec, PolicySpec};
use ferry_common::limits::MAX_TEXT_LEN;
use ferry_common::ResourceId;

use super::GroupError;
use crate::config::GroupsConfig;
use crate::engine::billing::Term;
use crate::engine::{LoadBalancing, Policy, DEFAULT_SCALE_IN_COOLDOWN, MAX_GROUP_RESOURCES};
use crate::groups::lifecycle::Billing;

pub(super) fn describe_policy(p: &Policy) -> String {
    use ferry_common::duration::format_duration as f;
    format!(
        "concurrent_sessions={} usage_threshold={}% scale_out_step={} max_elastic={} max_idle={} scale_in_cooldown={} wait_timeout={} load_balancing={}",
        p.concurrent_sessions,
        p.usage_threshold,
        p.scale_out_step,
        p.max_elastic,
        f(p.max_idle),
        f(p.scale_in_cooldown),
        f(p.wait_timeout),
        p.load_balancing
    )
}

/// Fills a policy from `patch` over `base` (the current policy), or over the
/// defaults at publish, where the parameters without a default are required.
pub(super) fn merge_policy(
    base: Option<&Policy>,
    patch: &PolicySpec,
    spec: &str,
) -> Result<Policy, GroupError> {
    let mut problems = Vec::new();
    let mut req = |field: &str, v: Option<u32>, cur: Option<u32>| match v.or(cur) {
        Some(v) => v,
        None => {
            problems.push(format!("{field}: required at publish"));
            0
        }
    };
    let concurrent_sessions = req(
        "concurrent_sessions",
        patch.concurrent_sessions,
        base.map(|b| b.concurrent_sessions),
    );
    let usage_threshold = req(
        "usage_threshold",
        patch.usage_threshold,
        base.map(|b| b.usage_threshold),
    );
    let scale_out_step = req(
        "scale_out_step",
        patch.scale_out_step,
        base.map(|b| b.scale_out_step),
    );
    let max_elastic = req(
        "max_elastic",
        patch.max_elastic,
        base.map(|b| b.max_elastic),
    );
    let max_idle = match patch
        .max_idle_ms
        .map(Duration::from_millis)
        .or(base.map(|b| b.max_idle))
    {
        Some(d) => d,
        None => {
            problems.push("max_idle: required at publish".into());
            Duration::ZERO
        }
    };
    let load_balancing = match &patch.load_balancing {
        Some(s) => match LoadBalancing::parse(s) {
            Some(l) => l,
            None => {
                problems.push(format!(
                    "load_balancing: {s:?} is not breadth-first or depth-first"
                ));
                LoadBalancing::default()
            }
        },
        None => base.map(|b| b.load_balancing).unwrap_or_default(),
    };
    let policy = Policy {
        concurrent_sessions,
        usage_threshold,
        scale_out_step,
        max_elastic,
        max_idle,
        scale_in_cooldown: patch
            .scale_in_cooldown_ms
            .map(Duration::from_millis)
            .or(base.map(|b| b.scale_in_cooldown))
            .unwrap_or(DEFAULT_SCALE_IN_COOLDOWN),
        wait_timeout: patch
            .wait_timeout_ms
            .map(Duration::from_millis)
            .or(base.map(|b| b.wait_timeout))
            .unwrap_or(Duration::ZERO),
        load_balancing,
        // The admin API does not set periods yet: an update keeps the current ones.
        periods: base.map(|b| b.periods.clone()).unwrap_or_default(),
    };
    if problems.is_empty() {
        Ok(policy)
    } else {
        // Report the other parameters' problems too, so one round fixes all.
        if let Err(e) = policy.validate(Some(spec)) {
            for p in e.problems {
                if !problems.iter().any(|x| x.starts_with(p.field)) {
                    problems.push(format!("{}: {}", p.field, p.message));
                }
            }
        }
        Err(GroupError::Invalid(problems))
    }
}

fn validate_policy(policy: &Policy, spec: &str) -> Result<(), GroupError> {
    policy.validate(Some(spec)).map_err(|e| {
        GroupError::Invalid(
            e.problems
                .into_iter()
                .map(|p| format!("{}: {}", p.field, p.message))
                .collect(),
        )
    })
}

/// Checks every attribute of a publish request; lists every problem.
/// A group's elastic hosts are named `<group>-eN` (their certificates carry
/// that id), so a group name must make a valid resource id with the longest
/// such suffix: lower-case letters, digits and inner '-', short enough.
pub(super) fn check_elastic_prefix(name: &str) -> Result<(), String> {
    ResourceId::new(format!("{name}-e{MAX_GROUP_RESOURCES}"))
        .map(|_| ())
        .map_err(|e| {
            format!(
                "name: {name:?} cannot prefix its elastic hosts' ids ({name}-e1, ...): {e}; \
                 use lower-case letters, digits and '-', at most {} bytes",
                ferry_common::limits::MAX_RESOURCE_ID_LEN
                    - format!("-e{MAX_GROUP_RESOURCES}").len()
            )
        })
}

pub(super) fn validate_spec(
    config: &GroupsConfig,
    spec: &GroupSpec,
) -> Result<(Billing, Policy), GroupError> {
    let mut problems = Vec::new();
    if let Some(name) = &spec.name {
        if let Err(problem) = check_elastic_prefix(name.as_str()) {
            problems.push(problem);
        }
    }
    for (field, value) in [
        ("region", &spec.region),
        ("office_network", &spec.office_network),
        ("spec", &spec.spec),
        ("image", &spec.image),
    ] {
        if value.trim().is_empty() {
            problems.push(format!("{field}: required"));
        } else if value.len() > MAX_TEXT_LEN {
            problems.push(format!("{field}: longer than {MAX_TEXT_LEN} bytes"));
        }
    }
    if spec.base_resources > MAX_GROUP_RESOURCES {
        problems.push(format!(
            "base_resources: {} is above the limit of {MAX_GROUP_RESOURCES}",
            spec.base_resources
        ));
    }
    let billing = match &spec.billing {
        BillingSpec::PayAsYouGo => Billing::PayAsYouGo,
        BillingSpec::Subscription {
            duration,
            auto_renew,
        } => match Term::parse(duration) {
            Ok(term) => {
                if !config.prices.contains_key(&spec.spec) {
                    problems.push(format!(
                        "spec: no subscription price for {} in the broker config ([prices.{}])",
                        spec.spec, spec.spec
                    ));
                }
                Billing::Subscription {
                    term,
                    auto_renew: *auto_renew,
                }
            }
            Err(e) => {
                problems.push(format!("duration: {e}"));
                Billing::PayAsYouGo
            }
        },
    };
    let policy = match merge_policy(None, &spec.policy, &spec.spec) {
        Ok(p) => {
            if let Err(GroupError::Invalid(more)) = validate_policy(&p, &spec.spec) {
                problems.extend(more);
            }
            Some(p)
        }
        Err(GroupError::Invalid(more)) => {
            problems.extend(more);
            None
        }
        Err(e) => return Err(e),
    };
    match policy {
        Some(p) if problems.is_empty() => Ok((billing, p)),
        _ => Err(GroupError::Invalid(problems)),
    }
}
