//! Admin requests and group helpers the group, provisioning and routing tests
//! share: each is one real admin request (or a bounded series of them)
//! against a [`TestBroker`], answering an error for any other answer.

use anyhow::{bail, Context};
use ferry_common::admin::{
    AdminRequestV1, AdminResponseV1, BillingSpec, GroupDetail, GroupEventInfo, GroupRolloutsInfo,
    GroupSpec, LiveGroupView, PolicySpec, SessionType, UsageQuery, UsageReport,
};
use ferry_common::{GroupName, UnixMillis};

use crate::harness::{AgentIdentity, TestAgent, TestBroker, PATIENCE};

/// A pay-as-you-go group of independent sessions named `name` with `base`
/// base resources: two sessions a host, scale-out above 80 % one host at a
/// time up to one elastic host, idle hosts released after an hour. Tests
/// change what they are about.
pub fn pay_as_you_go(name: &str, base: u32) -> GroupSpec {
    GroupSpec {
        name: Some(name.parse().expect("group name")),
        region: "cn-hangzhou".into(),
        office_network: "office-net-1".into(),
        spec: "office-4c8g".into(),
        image: "img-1".into(),
        billing: BillingSpec::PayAsYouGo,
        base_resources: base,
        session_type: SessionType::Independent,
        users: vec![],
        policy: PolicySpec {
            concurrent_sessions: Some(2),
            usage_threshold: Some(80),
            scale_out_step: Some(1),
            max_elastic: Some(1),
            max_idle_ms: Some(3_600_000),
            ..PolicySpec::default()
        },
    }
}

/// `group publish`: the stored group.
pub async fn publish(broker: &TestBroker, spec: GroupSpec) -> anyhow::Result<GroupDetail> {
    match broker.admin(AdminRequestV1::GroupPublish(spec)).await? {
        AdminResponseV1::Group(g) => Ok(*g),
        other => bail!("publish answered {other:?}"),
    }
}

/// Starts the agent of `resource` in `group`, with a fresh identity, and
/// waits until it is synced with the broker.
pub async fn agent_of(
    broker: &TestBroker,
    resource: &str,
    group: &str,
) -> anyhow::Result<TestAgent> {
    let identity = broker.issue_identity(resource)?;
    agent_with(broker, resource, group, &identity).await
}

/// `resources assign`: the operator puts `resource` in `group`.
pub async fn assign(broker: &TestBroker, resource: &str, group: &str) -> anyhow::Result<String> {
    match broker
        .admin(AdminRequestV1::ResourcesAssign {
            resource: resource.parse()?,
            group: Some(group.parse()?),
        })
        .await?
    {
        AdminResponseV1::Done { message } => Ok(message),
        other => bail!("assign answered {other:?}"),
    }
}

/// [`agent_of`] with a given identity; the host is assigned to `group`
/// first, as its operator does.
pub async fn agent_with(
    broker: &TestBroker,
    resource: &str,
    group: &str,
    identity: &AgentIdentity,
) -> anyhow::Result<TestAgent> {
    assign(broker, resource, group).await?;
    let mut config = broker.agent_config(resource, identity)?;
    config.group = Some(group.parse()?);
    let agent = TestAgent::start_with(config).await?;
    agent.wait_synced().await?;
    Ok(agent)
}

/// `group events`: the group's recorded events, oldest first.
pub async fn events(broker: &TestBroker, group: &str) -> anyhow::Result<Vec<GroupEventInfo>> {
    match broker
        .admin(AdminRequestV1::GroupEvents {
            group: group.parse()?,
        })
        .await?
    {
        AdminResponseV1::GroupEvents(e) => Ok(e),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// The events of `kind`.
pub fn of_kind<'a>(events: &'a [GroupEventInfo], kind: &str) -> Vec<&'a GroupEventInfo> {
    events.iter().filter(|e| e.kind == kind).collect()
}

/// Waits until the group has at least `n` events of `kind`. The broker
/// writes them from its group actor and tasks, which a test cannot subscribe
/// to from outside; each round is one admin request (a real answer),
/// bounded by twice [`PATIENCE`] (provisioning starts processes).
pub async fn wait_events(
    broker: &TestBroker,
    group: &str,
    kind: &str,
    n: usize,
) -> anyhow::Result<Vec<GroupEventInfo>> {
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    loop {
        let evs = events(broker, group).await?;
        if of_kind(&evs, kind).len() >= n {
            return Ok(evs);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no {n} {kind} event(s) in {evs:#?}");
        }
        tokio::task::yield_now().await;
    }
}

/// `group show`: the stored group and its live view.
pub async fn show(
    broker: &TestBroker,
    group: &str,
) -> anyhow::Result<(GroupDetail, Option<LiveGroupView>)> {
    match broker
        .admin(AdminRequestV1::GroupShow {
            group: group.parse()?,
        })
        .await?
    {
        AdminResponseV1::GroupShown { detail, live } => Ok((*detail, live)),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// The live view of a group that must have one.
pub async fn live(broker: &TestBroker, group: &str) -> anyhow::Result<LiveGroupView> {
    show(broker, group)
        .await?
        .1
        .with_context(|| format!("group {group} has no live view"))
}

/// `group show`'s update part: versions and the updates running or
/// scheduled, with each host's step.
pub async fn rollouts(broker: &TestBroker, group: &str) -> anyhow::Result<GroupRolloutsInfo> {
    match broker
        .admin(AdminRequestV1::GroupRollouts {
            group: group.parse()?,
        })
        .await?
    {
        AdminResponseV1::GroupRollouts(r) => Ok(r),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// `usage` of one group over `[from, to)`.
pub async fn usage(
    broker: &TestBroker,
    group: &str,
    from: UnixMillis,
    to: UnixMillis,
) -> anyhow::Result<UsageReport> {
    match broker
        .admin(AdminRequestV1::Usage(UsageQuery {
            group: Some(group.parse::<GroupName>()?),
            from,
            to,
        }))
        .await?
    {
        AdminResponseV1::Usage(r) => Ok(r),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// Waits (bounded by [`PATIENCE`]) until `group` has a live view that
/// satisfies `done`, and returns it. An actor takes connected agents in on
/// its own turn after an admin change, which a test cannot subscribe to from
/// outside; each round is one real admin request.
pub async fn wait_live(
    broker: &TestBroker,
    group: &str,
    done: impl Fn(&LiveGroupView) -> bool,
) -> anyhow::Result<LiveGroupView> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let view = show(broker, group).await?.1;
        if let Some(v) = view.as_ref().filter(|v| done(v)) {
            return Ok(v.clone());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("group {group} never reached the expected live state: {view:#?}");
        }
        tokio::task::yield_now().await;
    }
}
