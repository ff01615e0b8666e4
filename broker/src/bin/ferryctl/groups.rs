//! `ferryctl group`: delivery groups, from publish to purge.

use std::path::Path;

use anyhow::Context;
use clap::Subcommand;
use ferry_broker::admin;
use ferry_broker::render;
use ferry_common::admin::{
    AdminRequestV1, AdminResponseV1, BillingSpec, GroupDetail, GroupFilter, GroupSpec,
    ImageUpdateSpec, SessionType,
};
use ferry_common::{GroupName, UserId};

use crate::confirm::confirm;
use crate::flags::{Flags, PolicyArgs, PolicyPartsArgs};
use crate::show::show;
use crate::{parse_ttl, runtime};

// Parsed once per run and boxed in `Cmd`: the size of `Publish` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub(crate) enum GroupCmd {
    /// Publish a delivery group.
    Publish {
        #[command(flatten)]
        args: PublishArgs,
    },
    /// Groups, filtered by status, name (substring) or id.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        id: Option<String>,
    },
    /// One group by name or id.
    Show { group: String },
    /// Change policy parameters (the others stay).
    UpdatePolicy {
        group: String,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        parts: PolicyPartsArgs,
    },
    /// Assign (--add) and unassign (--remove) users.
    UpdateUsers {
        group: String,
        #[arg(long)]
        add: Vec<String>,
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Extend a subscription (writes an order).
    Renew {
        group: String,
        #[arg(long)]
        duration: String,
    },
    /// Turn auto-renew on or off.
    SetAutoRenew { group: String, state: String },
    /// The billing system says a published pay-as-you-go group's account is
    /// in arrears: no new sessions, no scale-out; open sessions go on.
    SetPaymentOverdue { group: String },
    /// The arrears are paid: the group is published again.
    ClearPaymentOverdue { group: String },
    /// Move to another region (always refused: regions are fixed at publish).
    SetRegion { group: String, region: String },
    /// Purge a group (subscription: expired; pay-as-you-go: in service).
    /// Asks first on a terminal; elsewhere needs --yes.
    Purge {
        group: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Delete a group (subscription: recycling or publish-failed;
    /// pay-as-you-go: publish-failed). Asks first on a terminal; elsewhere
    /// needs --yes.
    Delete {
        group: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// The group's recorded decisions with their reasons.
    Events { group: String },
    /// Switch every resource to another image: open sessions are warned,
    /// disconnected after --warning, then each host switches (status
    /// `updating`, then `published` or `update-failed`).
    UpdateImage {
        group: String,
        image: String,
        /// Time users get between the warning and the disconnect.
        #[arg(long, default_value = "5m", value_parser = parse_ttl)]
        warning: std::time::Duration,
    },
}

/// `group publish`'s flags.
#[derive(clap::Args)]
pub(crate) struct PublishArgs {
    /// Unique name; generated (REGION-SPEC-N) when absent.
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    region: String,
    #[arg(long)]
    office_network: String,
    /// Spec from the catalog, e.g. office-4c8g.
    #[arg(long)]
    spec: String,
    #[arg(long)]
    image: String,
    /// subscription or pay-as-you-go.
    #[arg(long)]
    billing: String,
    /// Subscription duration: Nw, Nmo or Ny.
    #[arg(long)]
    duration: Option<String>,
    /// Renew the subscription by itself at the end of each period.
    #[arg(long)]
    auto_renew: bool,
    #[arg(long, value_name = "N")]
    base_resources: String,
    /// independent or shared.
    #[arg(long, default_value = "independent")]
    session_type: String,
    /// An assigned user; repeatable.
    #[arg(long = "user")]
    users: Vec<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    parts: PolicyPartsArgs,
}

/// Runs a `group` verb: asks before a removal (without `--yes`), sends the
/// request, and for `group show` adds what each resource runs and the
/// updates running or scheduled (a second request).
pub(crate) fn run(socket: &Path, cmd: GroupCmd, json: bool) -> anyhow::Result<String> {
    let versions_of = match &cmd {
        GroupCmd::Show { group } => Some(group.clone()),
        _ => None,
    };
    confirm_if_removal(socket, &cmd)?;
    let req = request(cmd)?;
    let runtime = runtime()?;
    let out = show(runtime.block_on(admin::request(socket, req))?, json);
    match versions_of {
        Some(group) => with_versions(&runtime, socket, &group, out, json),
        None => Ok(out),
    }
}

/// The admin request of a `group` verb.
fn request(cmd: GroupCmd) -> anyhow::Result<AdminRequestV1> {
    Ok(match cmd {
        GroupCmd::Publish { args } => publish(args)?,
        GroupCmd::List { status, name, id } => {
            AdminRequestV1::GroupList(GroupFilter { status, name, id })
        }
        GroupCmd::Show { group } => AdminRequestV1::GroupShowWithPolicy {
            group: name(group)?,
        },
        GroupCmd::UpdatePolicy {
            group,
            policy,
            parts,
        } => update_policy(group, policy, parts)?,
        GroupCmd::UpdateUsers { group, add, remove } => AdminRequestV1::GroupUpdateUsers {
            group: name(group)?,
            add: users(add)?,
            remove: users(remove)?,
        },
        GroupCmd::Renew { group, duration } => AdminRequestV1::GroupRenew {
            group: name(group)?,
            duration,
        },
        GroupCmd::SetAutoRenew { group, state } => AdminRequestV1::GroupSetAutoRenew {
            group: name(group)?,
            on: on_off(&state)?,
        },
        GroupCmd::SetPaymentOverdue { group } => AdminRequestV1::GroupSetPaymentOverdue {
            group: name(group)?,
        },
        GroupCmd::ClearPaymentOverdue { group } => AdminRequestV1::GroupClearPaymentOverdue {
            group: name(group)?,
        },
        GroupCmd::SetRegion { group, region } => AdminRequestV1::GroupSetRegion {
            group: name(group)?,
            region,
        },
        GroupCmd::Purge { group, .. } => AdminRequestV1::GroupPurge {
            group: name(group)?,
        },
        GroupCmd::Delete { group, .. } => AdminRequestV1::GroupDelete {
            group: name(group)?,
        },
        GroupCmd::Events { group } => AdminRequestV1::GroupEventsDetailed {
            group: name(group)?,
        },
        GroupCmd::UpdateImage {
            group,
            image,
            warning,
        } => AdminRequestV1::GroupUpdateImage(ImageUpdateSpec {
            group: name(group)?,
            image,
            warning_ms: u64::try_from(warning.as_millis()).unwrap_or(u64::MAX),
        }),
    })
}

fn name(g: String) -> anyhow::Result<GroupName> {
    Ok(g.parse()?)
}

fn users(ids: Vec<String>) -> anyhow::Result<Vec<UserId>> {
    ids.iter().map(|u| Ok(u.parse::<UserId>()?)).collect()
}

/// `group publish`: every bad flag value reported at once.
fn publish(args: PublishArgs) -> anyhow::Result<AdminRequestV1> {
    let PublishArgs {
        name: group_name,
        region,
        office_network,
        spec,
        image,
        billing,
        duration,
        auto_renew,
        base_resources,
        session_type,
        users: assigned,
        policy,
        parts,
    } = args;
    let mut flags = Flags::default();
    let billing = billing_spec(&mut flags, &billing, duration, auto_renew);
    let session_type = session_type_of(&mut flags, &session_type);
    let base_resources = flags.number("base-resources", Some(base_resources));
    let group_name = group_name.and_then(|g| flags.check("name", &g, g.parse::<GroupName>()));
    let assigned: Vec<Option<UserId>> = assigned
        .iter()
        .map(|u| flags.check("user", u, u.parse::<UserId>()))
        .collect();
    let policy = policy.into_spec(&mut flags);
    let parts = parts.into_spec(&mut flags);
    flags.finish()?;
    let (Some(billing), Some(session_type), Some(base_resources)) =
        (billing, session_type, base_resources)
    else {
        anyhow::bail!("unreachable: a bad flag was not reported");
    };
    Ok(AdminRequestV1::GroupPublishWithPolicy {
        spec: GroupSpec {
            name: group_name,
            region,
            office_network,
            spec,
            image,
            billing,
            base_resources,
            session_type,
            users: assigned.into_iter().flatten().collect(),
            policy,
        },
        parts,
    })
}

/// `--billing` with `--duration` and `--auto-renew`, or `None` with the
/// problem recorded.
fn billing_spec(
    flags: &mut Flags,
    billing: &str,
    duration: Option<String>,
    auto_renew: bool,
) -> Option<BillingSpec> {
    match (billing, duration) {
        ("subscription", Some(duration)) => Some(BillingSpec::Subscription {
            duration,
            auto_renew,
        }),
        ("subscription", None) => {
            flags.problem("--billing subscription needs --duration (Nw, Nmo or Ny)".into());
            None
        }
        ("pay-as-you-go", None) if !auto_renew => Some(BillingSpec::PayAsYouGo),
        ("pay-as-you-go", _) => {
            flags.problem("--duration and --auto-renew apply to subscriptions only".into());
            None
        }
        (other, _) => {
            flags.problem(format!(
                "--billing {other:?}: write subscription or pay-as-you-go"
            ));
            None
        }
    }
}

/// `--session-type`, or `None` with the problem recorded.
fn session_type_of(flags: &mut Flags, session_type: &str) -> Option<SessionType> {
    match session_type {
        "independent" => Some(SessionType::Independent),
        "shared" => Some(SessionType::Shared),
        other => {
            flags.problem(format!(
                "--session-type {other:?}: write independent or shared"
            ));
            None
        }
    }
}

/// `group update-policy`: every bad flag value reported at once.
fn update_policy(
    group: String,
    policy: PolicyArgs,
    parts: PolicyPartsArgs,
) -> anyhow::Result<AdminRequestV1> {
    let mut flags = Flags::default();
    let policy = policy.into_spec(&mut flags);
    let parts = parts.into_spec(&mut flags);
    flags.finish()?;
    Ok(AdminRequestV1::GroupUpdatePolicyParts {
        group: name(group)?,
        policy,
        parts,
    })
}

/// `set-auto-renew`'s state: on or off.
fn on_off(state: &str) -> anyhow::Result<bool> {
    match state {
        "on" => Ok(true),
        "off" => Ok(false),
        other => anyhow::bail!("set-auto-renew {other:?}: write on or off"),
    }
}

/// `group purge` / `group delete` without `--yes` asks first.
fn confirm_if_removal(socket: &Path, cmd: &GroupCmd) -> anyhow::Result<()> {
    match cmd {
        GroupCmd::Purge { group, yes: false } => confirm_removal(socket, "purge", group),
        GroupCmd::Delete { group, yes: false } => confirm_removal(socket, "delete", group),
        _ => Ok(()),
    }
}

/// `group purge` / `group delete` without `--yes`: says what would be
/// removed (`purge group design (pay-as-you-go, published, 2 resources)?`)
/// and asks.
fn confirm_removal(socket: &Path, verb: &str, group: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let command = format!("group {verb}");
    if !std::io::stdin().is_terminal() {
        // Refused before the broker is asked anything.
        return confirm(&format!("{verb} group {group}?"), &command);
    }
    let req = AdminRequestV1::GroupShowWithPolicy {
        group: group.parse()?,
    };
    let question = match runtime()?.block_on(admin::request(socket, req))? {
        AdminResponseV1::GroupWithPolicy(d) => removal_question(verb, &d.detail),
        _ => format!("{verb} group {group}?"),
    };
    confirm(&question, &command)
}

/// `purge group design (pay-as-you-go, published, 2 resources)?`
fn removal_question(verb: &str, d: &GroupDetail) -> String {
    let n = d.resources.len();
    format!(
        "{verb} group {} ({}, {}, {n} resource{})?",
        d.info.name,
        d.info.billing,
        d.info.status,
        if n == 1 { "" } else { "s" }
    )
}

/// `out` (`group show`'s answer) followed by what each resource runs and the
/// updates running or scheduled.
fn with_versions(
    runtime: &tokio::runtime::Runtime,
    socket: &Path,
    group: &str,
    out: String,
    json: bool,
) -> anyhow::Result<String> {
    let req = AdminRequestV1::GroupRollouts {
        group: group.parse()?,
    };
    // A broker that cannot answer it (older, or the group went
    // away meanwhile) still gets its `group show` printed.
    match runtime.block_on(admin::request(socket, req)) {
        Ok(AdminResponseV1::GroupRollouts(r)) if json => {
            let mut value: serde_json::Value =
                serde_json::from_str(&out).context("group show's JSON")?;
            value["versions"] = render::group_versions_json(&r.versions);
            value["rollouts"] = ferry_broker::ota::render::rollouts_json(&r.rollouts);
            Ok(format!("{value:#}\n"))
        }
        Ok(AdminResponseV1::GroupRollouts(r)) => Ok(out
            + &render::group_versions_table(&r.versions)
            + &ferry_broker::ota::render::rollouts_table(&r.rollouts)),
        _ => Ok(out),
    }
}
