//! `ferryctl resources` and `ferryctl sessions`: the streaming hosts and the
//! sessions on them.

use clap::Subcommand;
use ferry_common::admin::AdminRequestV1;
use ferry_common::SessionId;

#[derive(Subcommand)]
pub(crate) enum ResourcesCmd {
    /// Every resource the broker knows.
    List,
    /// Take no new sessions on a resource (existing ones go on).
    Drain { resource: String },
    /// Take sessions on a resource again.
    Undrain { resource: String },
    /// Put a host in a delivery group: its agent may join only that group
    /// (an agent naming another one is refused). A connected agent is
    /// disconnected and joins its new group when it reconnects.
    Assign { resource: String, group: String },
    /// Take a host out of its group: its agent joins no group.
    Unassign { resource: String },
}

#[derive(Subcommand)]
pub(crate) enum SessionsCmd {
    /// Open sessions (all recorded sessions with --all).
    List {
        #[arg(long)]
        all: bool,
    },
    /// Ask the host of an open session to end it.
    Disconnect { session: String },
}

/// The admin request of a `resources` verb.
pub(crate) fn resources_request(cmd: ResourcesCmd) -> anyhow::Result<AdminRequestV1> {
    Ok(match cmd {
        ResourcesCmd::List => AdminRequestV1::ListResources,
        ResourcesCmd::Drain { resource } => AdminRequestV1::Drain {
            resource: resource.parse()?,
        },
        ResourcesCmd::Undrain { resource } => AdminRequestV1::Undrain {
            resource: resource.parse()?,
        },
        ResourcesCmd::Assign { resource, group } => AdminRequestV1::ResourcesAssign {
            resource: resource.parse()?,
            group: Some(group.parse()?),
        },
        ResourcesCmd::Unassign { resource } => AdminRequestV1::ResourcesAssign {
            resource: resource.parse()?,
            group: None,
        },
    })
}

/// The admin request of a `sessions` verb.
pub(crate) fn sessions_request(cmd: SessionsCmd) -> anyhow::Result<AdminRequestV1> {
    Ok(match cmd {
        SessionsCmd::List { all } => AdminRequestV1::ListSessionsDetailed { all },
        SessionsCmd::Disconnect { session } => AdminRequestV1::DisconnectSession {
            session: session.parse::<SessionId>()?,
        },
    })
}
