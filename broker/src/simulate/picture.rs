//! `ferryctl simulate --svg/--html`: a replay as a picture. The timeline
//! of sessions, waiting requests, capacity and the resources by state,
//! the demand at which the group scales out, the cost so far, and each
//! decision an operator looks for (scale-out, scale-in, rejection) marked
//! with its reason; the HTML page adds the decisions and the bill as tables.

use std::fmt::Write as _;

use rust_decimal::Decimal;

use crate::chart::{
    self, escape, Axis, Marker, MarkerKind, Series, SeriesKind, TimeLabels, Timeline,
};
use crate::engine::billing::{self, Bill};
use crate::engine::{Action, Class, Group, Snapshot};

use super::replay::Outcome;
use super::report::{describe_decision, short_time, usage_pct, write_heading};
use super::scenario::Scenario;

/// Width of a simulation chart, in pixels.
pub const CHART_WIDTH: u32 = 960;
/// Height of one simulation chart, in pixels.
pub const CHART_HEIGHT: u32 = 420;

/// The series names, in drawing order: the counts on the left axis, the
/// money on the right.
pub const SERIES: [&str; 8] = [
    "sessions",
    "waiting",
    "capacity",
    "threshold",
    "ready",
    "pending",
    "releasing",
    "cost",
];

/// The scenario's title: its name, else the file's.
fn title(sc: &Scenario, file: &str) -> String {
    sc.name.clone().unwrap_or_else(|| file.to_owned())
}

/// The group's counts before the first instant: its base resources ready,
/// nothing else (as the replay starts it).
fn start_snapshot(sc: &Scenario) -> Snapshot {
    Group::with_base_count(
        sc.policy.clone(),
        sc.spec.as_deref(),
        sc.base_resources,
        sc.start,
    )
    .map_or(
        Snapshot {
            sessions: 0,
            waiting: 0,
            demand: 0,
            capacity: 0,
            resources: 0,
            pending: 0,
            releasing: 0,
            elastic: 0,
        },
        |g| g.snapshot(),
    )
}

/// The bill as it stands at `t`: the same lines as the period's bill
/// (each rounded), counting the time up to `t` only; at the end it is the
/// period's bill.
fn bill_at(sc: &Scenario, out: &Outcome, t: i64) -> Bill {
    let at = ferry_common::UnixMillis(t.min(sc.end.0));
    let period = billing::billed_seconds(sc.start, None, at);
    let elastic = out
        .resources
        .iter()
        .filter(|r| r.class == Class::Elastic)
        .filter_map(|r| {
            r.ready_at
                .map(|ready| billing::billed_seconds(ready, r.released_at, at))
        });
    billing::bill(sc.billing, sc.base_resources, &sc.prices, period, elastic)
}

/// The replay as a timeline (Unix milliseconds, wall-clock labels).
pub fn timeline(sc: &Scenario, out: &Outcome, file: &str) -> Timeline {
    let mut points: Vec<Vec<(i64, Decimal)>> = vec![Vec::new(); SERIES.len()];
    let threshold = Decimal::from(sc.policy.usage_threshold);
    let mut push = |at: i64, s: &Snapshot| {
        let ready = s.resources.saturating_sub(u64::from(s.pending));
        let values = [
            Decimal::from(s.sessions),
            Decimal::from(s.waiting),
            Decimal::from(s.capacity),
            // The threshold in sessions: demand (sessions + waiting) above
            // it scales out (SPEC: usage above `usage_threshold`).
            Decimal::from(s.capacity) * threshold / Decimal::ONE_HUNDRED,
            Decimal::from(ready),
            Decimal::from(s.pending),
            Decimal::from(s.releasing),
        ];
        for (series, v) in points.iter_mut().zip(values) {
            series.push((at, v));
        }
    };
    push(sc.start.0, &start_snapshot(sc));
    for row in &out.rows {
        push(row.at.0, &row.snapshot);
    }
    // Cost changes slope where an elastic resource becomes ready or is
    // released: a point there and at every row keeps the line true.
    let mut cost_at: Vec<i64> = vec![sc.start.0, sc.end.0];
    cost_at.extend(out.rows.iter().map(|r| r.at.0));
    for r in out.resources.iter().filter(|r| r.class == Class::Elastic) {
        cost_at.extend(r.ready_at.map(|t| t.0));
        cost_at.extend(r.released_at.map(|t| t.0));
    }
    cost_at.retain(|t| (sc.start.0..=sc.end.0).contains(t));
    cost_at.sort_unstable();
    cost_at.dedup();
    if let Some(cost) = points.last_mut() {
        *cost = cost_at
            .into_iter()
            .map(|t| (t, bill_at(sc, out, t).total))
            .collect();
    }

    let series = SERIES
        .iter()
        .zip(points)
        .map(|(name, points)| Series {
            name: (*name).to_owned(),
            kind: if *name == "cost" {
                SeriesKind::Line
            } else {
                SeriesKind::Step
            },
            axis: if *name == "cost" {
                Axis::Right
            } else {
                Axis::Left
            },
            points,
        })
        .collect();
    let markers = out
        .decisions
        .iter()
        .filter_map(|d| {
            let kind = match d.action {
                Action::ScaleOut { .. } => MarkerKind::ScaleOut,
                Action::ScaleIn { .. } => MarkerKind::ScaleIn,
                Action::Rejected { .. } => MarkerKind::Rejected,
                _ => return None,
            };
            Some(Marker {
                at_ms: d.at.0,
                kind,
                label: format!("{} {}", short_time(d.at, sc.start), describe_decision(d)),
            })
        })
        .collect();
    Timeline {
        title: title(sc, file),
        start_ms: sc.start.0,
        end_ms: sc.end.0,
        time_labels: TimeLabels::Absolute,
        left_label: "sessions, resources".to_owned(),
        right_label: format!("cost ({})", sc.prices.currency),
        left_max: None,
        right_max: None,
        series,
        markers,
    }
}

/// The replay's chart as an SVG document.
pub fn svg(sc: &Scenario, out: &Outcome, file: &str) -> String {
    chart::timeline_svg(&timeline(sc, out, file), CHART_WIDTH, CHART_HEIGHT)
}

/// The inline style of the HTML pages.
const PAGE_STYLE: &str = "body{font:14px sans-serif;margin:24px;color:#222}\
h1{font-size:20px}h2{font-size:16px;margin-top:28px}\
table{border-collapse:collapse;margin:8px 0}\
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}\
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}\
pre{background:#f6f6f6;padding:8px;overflow-x:auto}\
.chart{margin:12px 0}";

/// What the lines of a chart are, under it.
const LEGEND_NOTE: &str = "<p class=\"legend-note\">Left axis: sessions on resources, requests \
waiting for room, capacity (session slots of ready and pending resources), threshold (the \
demand, sessions plus waiting, above which the group scales out: capacity times \
usage_threshold), and resources ready, pending (being created) and releasing. Right axis: \
the cost so far, each bill line rounded as the bill rounds it. Dashed lines: scale-outs, \
scale-ins and rejections; hover for the reason.</p>\n";

/// A whole HTML page around `body` (already escaped).
fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/><title>{}</title><style>{PAGE_STYLE}</style></head><body>\n{body}</body></html>\n",
        escape(title)
    )
}

/// The decisions worth a marker, as a table: time, action, what and why.
fn decisions_table(sc: &Scenario, out: &Outcome) -> String {
    let mut s = String::from(
        "<table class=\"decisions\"><thead><tr><th>time</th><th>action</th><th>decision and reason</th></tr></thead><tbody>\n",
    );
    for d in &out.decisions {
        if !matches!(
            d.action,
            Action::ScaleOut { .. } | Action::ScaleIn { .. } | Action::Rejected { .. }
        ) {
            continue;
        }
        let _ = writeln!(
            s,
            "<tr data-action=\"{}\"><td>{}</td><td>{}</td><td>{}</td></tr>",
            d.action.name(),
            escape(&short_time(d.at, sc.start)),
            d.action.name(),
            escape(&describe_decision(d))
        );
    }
    s.push_str("</tbody></table>\n");
    s
}

/// The bill's lines as a table.
fn cost_table(sc: &Scenario, bill: &Bill) -> String {
    let cur = escape(&sc.prices.currency);
    let mut s = format!(
        "<table class=\"cost\"><thead><tr><th>cost</th><th class=\"num\">{cur}</th></tr></thead><tbody>\n"
    );
    for (line, amount) in [
        ("subscription", bill.subscription),
        ("pay-as-you-go base", bill.base_payg),
        ("elastic", bill.elastic),
        ("total", bill.total),
    ] {
        let _ = writeln!(
            s,
            "<tr data-line=\"{line}\"><td>{line}</td><td class=\"num\">{amount}</td></tr>"
        );
    }
    s.push_str("</tbody></table>\n");
    s
}

/// The instants of the replay with their counts (the table's columns).
fn rows_table(sc: &Scenario, out: &Outcome) -> String {
    let mut s = String::from(
        "<table class=\"timeline\"><thead><tr><th>time</th><th class=\"num\">sessions</th><th class=\"num\">waiting</th><th class=\"num\">resources</th><th class=\"num\">pending</th><th class=\"num\">releasing</th><th class=\"num\">usage</th></tr></thead><tbody>\n",
    );
    for row in &out.rows {
        let snap = &row.snapshot;
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&short_time(row.at, sc.start)),
            snap.sessions,
            snap.waiting,
            snap.resources,
            snap.pending,
            snap.releasing,
            usage_pct(snap).map_or_else(|| "-".to_owned(), |u| format!("{u}%"))
        );
    }
    s.push_str("</tbody></table>\n");
    s
}

/// The scenario's heading lines (period, group, policy), as the table prints them.
fn heading(sc: &Scenario) -> String {
    let mut s = String::new();
    write_heading(&mut s, sc);
    s
}

/// One scenario's section of a page: heading, chart, decisions, bill, rows.
fn section(sc: &Scenario, out: &Outcome, file: &str, chart_svg: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<section class=\"scenario\" data-file=\"{}\"><h2>{}</h2><pre>{}</pre>",
        escape(file),
        escape(&title(sc, file)),
        escape(&heading(sc))
    );
    if !chart_svg.is_empty() {
        let _ = writeln!(s, "<div class=\"chart\">{chart_svg}</div>");
        s.push_str(LEGEND_NOTE);
    }
    s.push_str("<h3>Scale decisions and rejections</h3>\n");
    s.push_str(&decisions_table(sc, out));
    s.push_str(&cost_table(sc, &out.bill));
    s.push_str("<details><summary>Every instant</summary>\n");
    s.push_str(&rows_table(sc, out));
    s.push_str("</details></section>\n");
    s
}

/// The replay as one self-contained HTML page: the chart inline, the
/// decisions, the bill, every instant. No script, no external asset.
pub fn html(sc: &Scenario, out: &Outcome, file: &str) -> String {
    let t = title(sc, file);
    let body = format!(
        "<h1>{}</h1>\n{}",
        escape(&t),
        section(sc, out, file, &svg(sc, out, file))
    );
    page(&t, &body)
}

/// One side of a comparison.
pub struct Side<'a> {
    /// The file it was read from (its name in the output).
    pub file: &'a str,
    pub scenario: &'a Scenario,
    pub outcome: &'a Outcome,
}

/// Two timelines on one scale, A above B.
pub fn compare_svg(a: &Side, b: &Side) -> String {
    let (mut ta, mut tb) = (
        timeline(a.scenario, a.outcome, a.file),
        timeline(b.scenario, b.outcome, b.file),
    );
    ta.title = format!("A: {}", ta.title);
    tb.title = format!("B: {}", tb.title);
    let max = |t: &Timeline, axis: Axis| {
        t.series
            .iter()
            .filter(|s| s.axis == axis)
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .max()
    };
    let left = max(&ta, Axis::Left).max(max(&tb, Axis::Left));
    let right = max(&ta, Axis::Right).max(max(&tb, Axis::Right));
    for t in [&mut ta, &mut tb] {
        t.left_max = left;
        t.right_max = right;
    }
    let diff = b.outcome.bill.total - a.outcome.bill.total;
    let short = |file: &str| {
        std::path::Path::new(file)
            .file_name()
            .map_or_else(|| file.to_owned(), |f| f.to_string_lossy().into_owned())
    };
    chart::stacked_svg(
        &format!(
            "A {} against B {}: {}",
            short(a.file),
            short(b.file),
            match diff.cmp(&Decimal::ZERO) {
                std::cmp::Ordering::Equal => "both cost the same".to_owned(),
                std::cmp::Ordering::Greater =>
                    format!("B costs {diff} {} more", a.scenario.prices.currency),
                std::cmp::Ordering::Less =>
                    format!("B costs {} {} less", diff.abs(), a.scenario.prices.currency),
            }
        ),
        &[
            (
                chart::timeline_svg(&ta, CHART_WIDTH, CHART_HEIGHT),
                CHART_HEIGHT,
            ),
            (
                chart::timeline_svg(&tb, CHART_WIDTH, CHART_HEIGHT),
                CHART_HEIGHT,
            ),
        ],
        CHART_WIDTH,
    )
}

/// Both replays on one HTML page: the comparison table, the two charts on
/// one scale, then each scenario's decisions and bill.
pub fn compare_html(a: &Side, b: &Side, comparison_text: &str) -> String {
    let title = format!("{} against {}", a.file, b.file);
    let mut body = format!("<h1>{}</h1>\n", escape(&title));
    let _ = writeln!(
        body,
        "<pre class=\"comparison\">{}</pre>",
        escape(comparison_text)
    );
    let _ = writeln!(body, "<div class=\"chart\">{}</div>", compare_svg(a, b));
    body.push_str(LEGEND_NOTE);
    body.push_str(&section(a.scenario, a.outcome, a.file, ""));
    body.push_str(&section(b.scenario, b.outcome, b.file, ""));
    page(&title, &body)
}
