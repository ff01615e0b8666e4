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
    /// Revoke a host: its certificates issued until now are refused (also
    /// after a restart), its live connection is closed at once and it cannot
    /// renew. A certificate issued afterwards (`pki issue-agent`) admits it
    /// again. Asks first on a terminal; elsewhere it needs --yes.
    Revoke {
        resource: String,
        /// Recorded with the revocation.
        #[arg(long, default_value = "")]
        reason: String,
        /// Revoke without asking.
        #[arg(long, short = 'y')]
        yes: bool,
    },
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
        ResourcesCmd::List => AdminRequestV1::ListResourcesWithRevocations,
        ResourcesCmd::Revoke {
            resource,
            reason,
            yes,
        } => {
            let resource: ferry_common::ResourceId = resource.parse()?;
            if !yes {
                crate::confirm::confirm(
                    &format!(
                        "revoke {resource}? Its certificates stop working now and its \
                         connection is closed; it needs a new certificate to come back"
                    ),
                    "resources revoke",
                )?;
            }
            AdminRequestV1::ResourceRevoke { resource, reason }
        }
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
