//! `ferryctl ota`: offered updates, their rollout schedules and history.

use anyhow::Context;
use clap::Subcommand;
use ferry_common::admin::{AdminRequestV1, OtaOfferSpec, OtaScheduleSpec};
use ferry_common::duration::parse_duration;
use ferry_common::GroupName;

use crate::time;

#[derive(Subcommand)]
pub(crate) enum OtaCmd {
    /// Offer an update to a group (agent, image, or a component or application).
    Offer {
        group: String,
        /// `agent`, `image`, or the component's or application's name.
        #[arg(long)]
        component: String,
        /// The version it installs.
        #[arg(long)]
        version: String,
        /// Path or URL handed to the hosts' update hook.
        #[arg(long, default_value = "")]
        package: String,
        /// What it brings.
        #[arg(long)]
        description: String,
    },
    /// Offered updates (`update N`) and the schedules rolling them out
    /// (`schedule N`, with their state, start, wave and drain).
    List {
        /// Only this group's.
        #[arg(long)]
        group: Option<String>,
    },
    /// Schedule an offered update's rollout (start in the future, within 7
    /// days); prints the new schedule's own id.
    Schedule {
        group: String,
        /// The offered update's id (`update N` in `ota list`).
        #[arg(long)]
        update: u64,
        /// Start, RFC 3339.
        #[arg(long)]
        start: String,
        /// Resources updated at once.
        #[arg(long, default_value_t = 1)]
        wave: u32,
        /// How long sessions of a draining resource may go on (e.g. 30m).
        #[arg(long, default_value = "30m", value_parser = parse_duration)]
        drain: std::time::Duration,
    },
    /// Move a schedule's start (before it starts).
    Reschedule {
        /// The schedule's id (`schedule N` in `ota list`), not the update's.
        schedule: u64,
        /// New start, RFC 3339.
        #[arg(long)]
        start: String,
    },
    /// Cancel a schedule (before it starts).
    Cancel {
        /// The schedule's id (`schedule N` in `ota list`), not the update's.
        schedule: u64,
    },
    /// Every OTA of a group with each resource's outcome.
    History { group: String },
}

/// The admin request of an `ota` verb.
pub(crate) fn request(cmd: OtaCmd) -> anyhow::Result<AdminRequestV1> {
    Ok(match cmd {
        OtaCmd::Offer {
            group,
            component,
            version,
            package,
            description,
        } => AdminRequestV1::OtaOffer(OtaOfferSpec {
            group: group.parse()?,
            component,
            version,
            package,
            description,
        }),
        OtaCmd::List { group } => AdminRequestV1::OtaListWithSchedules {
            group: group.map(|g| g.parse::<GroupName>()).transpose()?,
        },
        OtaCmd::Schedule {
            group,
            update,
            start,
            wave,
            drain,
        } => AdminRequestV1::OtaSchedule(OtaScheduleSpec {
            group: group.parse()?,
            update,
            start: time(&start).context("--start")?,
            wave,
            drain_ms: u64::try_from(drain.as_millis()).context("--drain")?,
        }),
        OtaCmd::Reschedule { schedule, start } => AdminRequestV1::OtaReschedule {
            schedule,
            start: time(&start).context("--start")?,
        },
        OtaCmd::Cancel { schedule } => AdminRequestV1::OtaCancel { schedule },
        OtaCmd::History { group } => AdminRequestV1::OtaHistory {
            group: group.parse()?,
        },
    })
}
