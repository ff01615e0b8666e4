//! `ferryctl usage`: metered usage and its amounts over a period, as a
//! table, CSV, JSON or an SVG chart of the cost per day and group.

use std::path::Path;

use anyhow::Context;
use ferry_broker::{chart, render};
use ferry_common::admin::{AdminRequestV1, AdminResponseV1, UsageDetail, UsageQuery};
use ferry_common::{GroupName, UnixMillis};

use crate::show::show;
use crate::{runtime, time, Usage};

/// Asks the broker for the usage of `group` (every group without one)
/// between `from` and `to` and renders it in `format` (`--json` means json).
pub(crate) fn run(
    socket: &Path,
    group: Option<String>,
    from: &str,
    to: &str,
    format: String,
    json: bool,
) -> anyhow::Result<String> {
    let format = if json { "json".to_string() } else { format };
    if !["table", "csv", "json", "svg"].contains(&format.as_str()) {
        return Err(Usage(format!(
            "--format must be table, csv, json or svg, not {format:?}"
        ))
        .into());
    }
    let query = query(group, from, to)?;
    if format == "svg" {
        return per_day_svg(socket, &query);
    }
    let resp = runtime()?.block_on(ferry_broker::admin::request(
        socket,
        AdminRequestV1::UsageDetailed(query),
    ))?;
    Ok(match resp {
        AdminResponseV1::UsageDetailed(d) => rendered(&d, &format),
        other => show(other, json),
    })
}

/// The cost per UTC day and group as an SVG chart: one report asked of the
/// broker per day of the period (the first and last clipped to it), each
/// billed as the broker bills any period, so each day's lines are rounded
/// on their own and their sum may differ from the whole period's by cents.
fn per_day_svg(socket: &Path, query: &UsageQuery) -> anyhow::Result<String> {
    let days =
        chart::utc_days(query.from.0, query.to.0, chart::MAX_USAGE_DAYS).ok_or_else(|| {
            Usage(format!(
                "--format svg draws one bar per day, at most {} days: ask a shorter period",
                chart::MAX_USAGE_DAYS
            ))
        })?;
    let rt = runtime()?;
    let mut reports = Vec::with_capacity(days.len());
    for (from, to) in days {
        let day = UsageQuery {
            group: query.group.clone(),
            from: UnixMillis(from),
            to: UnixMillis(to),
        };
        match rt.block_on(ferry_broker::admin::request(
            socket,
            AdminRequestV1::UsageDetailed(day),
        ))? {
            AdminResponseV1::UsageDetailed(d) => reports.push(d),
            other => return Err(anyhow::anyhow!("{}", show(other, false).trim_end())),
        }
    }
    // A picture has no room for it either: a period still running is said
    // on stderr, as for CSV.
    if let Some(note) = reports.last().and_then(render::usage_so_far) {
        eprintln!("ferryctl: {note}");
    }
    let mut svg = chart::usage_svg(&reports)?;
    svg.push('\n');
    Ok(svg)
}

/// The period asked for, checked: RFC 3339 times, `to` after `from`.
fn query(group: Option<String>, from: &str, to: &str) -> anyhow::Result<UsageQuery> {
    let query = UsageQuery {
        group: group.map(|g| g.parse::<GroupName>()).transpose()?,
        from: time(from).context("--from")?,
        to: time(to).context("--to")?,
    };
    if query.to <= query.from {
        return Err(Usage(format!(
            "--to {} must be after --from {}",
            render::rfc3339_secs(query.to),
            render::rfc3339_secs(query.from)
        ))
        .into());
    }
    Ok(query)
}

/// The report in `format` (table, csv or json).
fn rendered(d: &UsageDetail, format: &str) -> String {
    match format {
        "csv" => {
            // CSV rows have no room for it: a period still
            // running is said on stderr.
            if let Some(note) = render::usage_so_far(d) {
                eprintln!("ferryctl: {note}");
            }
            render::usage_csv(&d.report)
        }
        "json" => format!("{:#}\n", render::usage_detail_json(d)),
        _ => render::usage_detail_table(d),
    }
}
