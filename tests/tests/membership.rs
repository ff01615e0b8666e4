//! Membership is the operator's decision: an agent's `Hello` only says
//! which group it expects. A host in no group, or in another group than
//! the one it names, is refused with what to do, the group it named records
//! the attempt, and no base slot is handed to it; `resources assign` moves a
//! connected host at once.

use ferry_common::admin::{AdminRequestV1, AdminResponseV1, GroupSpec, LiveGroupView};
use ferry_tests::admin::{assign, events, of_kind, publish, wait_events, wait_live};
use ferry_tests::harness::{init_logging, TestAgent, TestBroker};

fn group_spec(name: &str) -> GroupSpec {
    ferry_tests::admin::pay_as_you_go(name, 1)
}

fn members(v: &LiveGroupView) -> Vec<String> {
    v.resources
        .iter()
        .filter(|r| r.available)
        .map(|r| r.resource.to_string())
        .collect()
}

/// An agent naming a group it was not put in.
async fn agent_naming(
    broker: &TestBroker,
    resource: &str,
    group: Option<&str>,
) -> anyhow::Result<TestAgent> {
    let identity = broker.issue_identity(resource)?;
    let mut config = broker.agent_config(resource, &identity)?;
    config.group = group.map(str::parse).transpose()?;
    TestAgent::start_with(config).await
}

#[tokio::test]
async fn an_agent_takes_no_base_slot_of_a_group_it_was_not_put_in() -> anyhow::Result<()> {
    init_logging();
    let tmp = tempfile::tempdir()?;
    let broker = TestBroker::start(tmp.path()).await?;
    publish(&broker, group_spec("design")).await?;

    // Enrolled, with a valid certificate, in no group: refused, and the
    // group it named says so.
    let intruder = agent_naming(&broker, "h9", Some("design")).await?;
    let refused = intruder
        .wait_for("refused", |s| s.last_error.is_some())
        .await?;
    let why = refused.last_error.unwrap_or_default();
    assert!(why.contains("NotMember"), "{why}");
    assert!(
        why.contains("ferryctl resources assign h9 design"),
        "says what to do: {why}"
    );
    let evs = wait_events(&broker, "design", "membership", 1).await?;
    let membership = of_kind(&evs, "membership");
    assert!(
        membership[0].message.contains("h9 is in no group"),
        "{membership:?}"
    );
    assert!(!intruder.link().connected);

    // The operator's host takes the slot; the intruder, still retrying,
    // gets nothing and its retries do not fill the log.
    let _h1 = ferry_tests::admin::agent_of(&broker, "h1", "design").await?;
    let v = wait_live(&broker, "design", |v| members(v) == ["h1"]).await?;
    assert_eq!(members(&v), ["h1"]);
    assert!(!intruder.link().connected);
    let evs = events(&broker, "design").await?;
    let refusals = of_kind(&evs, "membership")
        .into_iter()
        .filter(|e| e.message.contains("h9"))
        .count();
    assert_eq!(refusals, 1, "{evs:?}");
    Ok(())
}

#[tokio::test]
async fn a_host_moves_between_groups_only_by_the_operators_command() -> anyhow::Result<()> {
    init_logging();
    let tmp = tempfile::tempdir()?;
    let broker = TestBroker::start(tmp.path()).await?;
    publish(&broker, group_spec("red")).await?;
    publish(&broker, group_spec("blue")).await?;

    // An agent that names no group joins the one its operator chose.
    assign(&broker, "h1", "red").await?;
    let h1 = agent_naming(&broker, "h1", None).await?;
    h1.wait_synced().await?;
    wait_live(&broker, "red", |v| members(v) == ["h1"]).await?;

    // Naming another group is refused, and that group records it.
    let identity = broker.issue_identity("h2")?;
    assign(&broker, "h2", "red").await?;
    let mut config = broker.agent_config("h2", &identity)?;
    config.group = Some("blue".parse()?);
    let h2 = TestAgent::start_with(config).await?;
    let refused = h2.wait_for("refused", |s| s.last_error.is_some()).await?;
    let why = refused.last_error.unwrap_or_default();
    assert!(why.contains("belongs to group red"), "{why}");
    let evs = wait_events(&broker, "blue", "membership", 1).await?;
    assert!(of_kind(&evs, "membership")[0]
        .message
        .contains("resource h2 belongs to group red, its Hello names group blue"));

    // The operator moves h1: its connection is ended, it reconnects and
    // joins blue; red records that it left.
    let said = assign(&broker, "h1", "blue").await?;
    assert!(
        said.contains("h1 is in group blue now (it was in group red)"),
        "{said}"
    );
    wait_live(&broker, "blue", |v| members(v) == ["h1"]).await?;
    wait_live(&broker, "red", |v| members(v).is_empty()).await?;
    let red = events(&broker, "red").await?;
    assert!(
        of_kind(&red, "membership")
            .iter()
            .any(|e| e.message.contains("resource h1 left group red")),
        "{red:?}"
    );

    // Taken out of every group, it is nobody's member.
    match broker
        .admin(AdminRequestV1::ResourcesAssign {
            resource: "h1".parse()?,
            group: None,
        })
        .await?
    {
        AdminResponseV1::Done { message } => {
            assert!(message.contains("h1 is in no group now"), "{message}")
        }
        other => anyhow::bail!("unassign answered {other:?}"),
    }
    wait_live(&broker, "blue", |v| members(v).is_empty()).await?;
    Ok(())
}
