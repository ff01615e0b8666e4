//! Charts as self-contained SVG: a timeline (counts and money over time,
//! with decisions marked) and bars (cost per day and group). No script, no
//! external asset, every text escaped; the same strings serve `ferryctl`
//! (`simulate --svg`/`--html`, `usage --format svg`) and the web console.
//!
//! Values are exact ([`Decimal`]) up to the drawing: only pixel
//! coordinates are `f64`. Stable hooks for tests and style sheets: the root
//! `<svg class="ferry-chart ...">` names its series in `data-series`; each
//! series is `<path class="series series-NAME" data-series="NAME">`; each
//! marker `<g class="marker scale-out" data-at-ms="...">` with a `<title>`
//! shown on hover; each point `<circle class="point" data-at-ms=..
//! data-value=..>` in a `<g class="points" data-series=..>`; each bar `<rect class="bar" data-series=..
//! data-category=.. data-value=..>`.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;

use ferry_common::admin::UsageDetail;

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeriesKind {
    /// Each value holds until the next point (counts that change at instants).
    Step,
    /// Straight lines between points (a quantity that accrues continuously).
    Line,
    /// A step line filled down to zero.
    Area,
}

/// Which vertical axis a series is read against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// The left axis (counts).
    Left,
    /// The right axis (money, percent).
    Right,
}

/// What a marker stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkerKind {
    ScaleOut,
    ScaleIn,
    /// A request turned away.
    Rejected,
    Other,
}

impl MarkerKind {
    /// Its CSS class beside `marker`.
    pub fn class(self) -> &'static str {
        match self {
            Self::ScaleOut => "scale-out",
            Self::ScaleIn => "scale-in",
            Self::Rejected => "rejected",
            Self::Other => "other",
        }
    }
}

/// How the time axis is labelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeLabels {
    /// Time since `start_ms`: `+01:30:00`.
    Relative,
    /// UTC wall time: `09:30` (with the date when the chart spans days).
    Absolute,
}

/// One line on a timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Series {
    /// Its name: shown in the legend, and its CSS hook (`series-NAME`,
    /// `data-series`).
    pub name: String,
    /// How it is drawn.
    pub kind: SeriesKind,
    /// The axis it is read against.
    pub axis: Axis,
    /// `(ms, value)` in time order; `ms` on the timeline's clock (Unix or
    /// virtual). Points outside the timeline are clipped to it.
    pub points: Vec<(i64, Decimal)>,
}

/// A vertical line at an instant, e.g. a scaling decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    /// When.
    pub at_ms: i64,
    /// What it stands for (its class).
    pub kind: MarkerKind,
    /// The text shown on hover (decision and reason).
    pub label: String,
}

/// A chart of values over time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeline {
    /// Its heading.
    pub title: String,
    /// Left edge of the time axis.
    pub start_ms: i64,
    /// Right edge of the time axis.
    pub end_ms: i64,
    /// How the time ticks read.
    pub time_labels: TimeLabels,
    /// What the left axis counts (e.g. `sessions, resources`).
    pub left_label: String,
    /// What the right axis measures (e.g. `CNY`); unused without right series.
    pub right_label: String,
    /// The left axis reaches at least this value: charts drawn one above
    /// the other share a scale this way.
    pub left_max: Option<Decimal>,
    /// The right axis reaches at least this value.
    pub right_max: Option<Decimal>,
    /// The lines, drawn in order, legend in order.
    pub series: Vec<Series>,
    /// The vertical markers.
    pub markers: Vec<Marker>,
}

/// One colour per series, in order, repeating.
const PALETTE: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Colour of a marker kind.
fn marker_colour(kind: MarkerKind) -> &'static str {
    match kind {
        MarkerKind::ScaleOut => "#2ca02c",
        MarkerKind::ScaleIn => "#d62728",
        MarkerKind::Rejected => "#9467bd",
        MarkerKind::Other => "#7f7f7f",
    }
}

/// Smallest drawing accepted; smaller sizes are raised to it.
const MIN_WIDTH: u32 = 240;
const MIN_HEIGHT: u32 = 160;
/// Largest drawing: a bigger one is no more readable, only bigger.
const MAX_SIDE: u32 = 20_000;
/// Most points of a timeline given a hover text of their own; beyond, the
/// lines are drawn without (the document stays small).
const MAX_HOVER_POINTS: usize = 2000;
/// Rough width of one character of the 12px labels, for laying out the legend.
const CHAR_PX: f64 = 7.0;

/// `s` as XML text or attribute value: `& < > " '` escaped, and characters
/// XML 1.0 forbids (controls other than tab and newline) dropped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// A series name as a CSS class suffix: lowercase ASCII letters and
/// digits, anything else `-`.
pub fn class_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// A decimal for a label: no trailing zeros.
fn show(d: Decimal) -> String {
    d.normalize().to_string()
}

/// A value axis: from `lo` to `top`, ticks every `step`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ValueAxis {
    lo: Decimal,
    top: Decimal,
    step: Decimal,
}

impl ValueAxis {
    /// An axis that holds every value in `values` and zero, with about five
    /// round ticks (1, 2 or 5 times a power of ten).
    fn fit(values: impl Iterator<Item = Decimal>) -> Self {
        let (mut lo, mut hi) = (Decimal::ZERO, Decimal::ZERO);
        for v in values {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if hi == lo {
            hi = lo + Decimal::ONE;
        }
        // Saturating: extreme values still get an axis, if a coarse one.
        let raw = hi.saturating_sub(lo) / Decimal::from(5);
        let mut p = Decimal::ONE;
        while let Some(next) = p.checked_mul(Decimal::TEN) {
            if next > raw {
                break;
            }
            p = next;
        }
        let smallest = Decimal::new(1, 6);
        while p > raw && p > smallest {
            p /= Decimal::TEN;
        }
        let step = [1, 2, 5, 10]
            .into_iter()
            .filter_map(|m| p.checked_mul(Decimal::from(m)))
            .find(|s| *s >= raw)
            .unwrap_or(raw);
        let round = |v: Decimal, up: bool| {
            let n = v / step;
            let n = if up { n.ceil() } else { n.floor() };
            n.checked_mul(step).unwrap_or(v)
        };
        Self {
            lo: round(lo, false),
            top: round(hi, true),
            step,
        }
    }

    /// The ticks from `lo` to `top`.
    fn ticks(&self) -> Vec<Decimal> {
        let mut out = Vec::new();
        let mut v = self.lo;
        while v <= self.top && out.len() < 50 {
            out.push(v);
            match v.checked_add(self.step) {
                Some(next) => v = next,
                None => break,
            }
        }
        out
    }

    /// Where `v` falls between `lo` (0) and `top` (1).
    fn fraction(&self, v: Decimal) -> f64 {
        // Saturating: no difference overflows; the result stays in 0..=1.
        let span = self.top.saturating_sub(self.lo);
        if span <= Decimal::ZERO {
            return 0.0;
        }
        let v = v.clamp(self.lo, self.top);
        v.saturating_sub(self.lo)
            .checked_div(span)
            .and_then(|f| f.to_f64())
            .unwrap_or(0.0)
            .clamp(0.0, 1.0)
    }
}

/// The plot area inside the drawing.
#[derive(Clone, Copy, Debug)]
struct Plot {
    left: f64,
    top: f64,
    right: f64,
    bottom: f64,
}

impl Plot {
    fn y(&self, axis: &ValueAxis, v: Decimal) -> f64 {
        self.bottom - axis.fraction(v) * (self.bottom - self.top)
    }
}

/// Time ticks: every `step_ms`, aligned to the UTC clock (absolute) or to
/// the start (relative), at most about eight.
fn time_ticks(start: i64, end: i64, labels: TimeLabels) -> (i64, Vec<i64>) {
    const S: i64 = 1000;
    const STEPS: [i64; 24] = [
        S,
        2 * S,
        5 * S,
        10 * S,
        15 * S,
        30 * S,
        60 * S,
        120 * S,
        300 * S,
        600 * S,
        900 * S,
        1800 * S,
        3600 * S,
        7200 * S,
        3 * 3600 * S,
        6 * 3600 * S,
        12 * 3600 * S,
        86_400 * S,
        2 * 86_400 * S,
        7 * 86_400 * S,
        14 * 86_400 * S,
        30 * 86_400 * S,
        91 * 86_400 * S,
        365 * 86_400 * S,
    ];
    let span = i128::from(end) - i128::from(start);
    let mut step = STEPS[STEPS.len() - 1];
    for s in STEPS {
        if span / i128::from(s) <= 8 {
            step = s;
            break;
        }
    }
    // A span longer than eight years: widen the last step until it fits.
    while span / i128::from(step) > 8 {
        step = step.saturating_mul(2);
    }
    // Absolute ticks fall on whole steps of the UTC clock: the first at or after the start.
    let first = match labels {
        TimeLabels::Relative => start,
        TimeLabels::Absolute if start.rem_euclid(step) == 0 => start,
        TimeLabels::Absolute => start
            .div_euclid(step)
            .saturating_add(1)
            .saturating_mul(step),
    };
    let mut ticks = Vec::new();
    let mut t = first;
    while t <= end && ticks.len() < 20 {
        ticks.push(t);
        t = match t.checked_add(step) {
            Some(n) => n,
            None => break,
        };
    }
    (step, ticks)
}

/// The text of a time tick.
fn time_label(t: i64, start: i64, end: i64, step: i64, labels: TimeLabels) -> String {
    match labels {
        TimeLabels::Relative => {
            let d = t.saturating_sub(start);
            let sign = if d < 0 { "-" } else { "+" };
            let secs = d.unsigned_abs() / 1000;
            format!(
                "{sign}{:02}:{:02}:{:02}",
                secs / 3600,
                secs / 60 % 60,
                secs % 60
            )
        }
        TimeLabels::Absolute => {
            let Some(at) = DateTime::<Utc>::from_timestamp_millis(t) else {
                return format!("{t} ms");
            };
            let format = if step >= 86_400_000 {
                "%Y-%m-%d"
            } else if end.saturating_sub(start) > 86_400_000 {
                "%m-%d %H:%M"
            } else if step < 60_000 {
                "%H:%M:%S"
            } else {
                "%H:%M"
            };
            at.format(format).to_string()
        }
    }
}

/// Legend entries laid out in rows that fit `width`: `(x, row)` of each.
fn legend_layout(names: &[String], width: f64) -> (Vec<(f64, usize)>, usize) {
    let mut out = Vec::new();
    let (mut x, mut row) = (12.0, 0);
    for name in names {
        let w = 22.0 + CHAR_PX * name.chars().count() as f64 + 14.0;
        if x + w > width - 8.0 && x > 12.0 {
            x = 12.0;
            row += 1;
        }
        out.push((x, row));
        x += w;
    }
    let rows = if names.is_empty() { 0 } else { row + 1 };
    (out, rows)
}

/// The opening `<svg>` with its size, class and data attributes, the
/// inline style and the `<title>`.
fn open_svg(out: &mut String, class: &str, data: &[(&str, String)], w: u32, h: u32, title: &str) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="ferry-chart {class}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img""#
    );
    for (k, v) in data {
        let _ = write!(out, r#" data-{k}="{}""#, escape(v));
    }
    out.push('>');
    let _ = write!(
        out,
        "<title>{}</title><style>.ferry-chart text{{font:12px sans-serif;fill:#222}}.ferry-chart .chart-title{{font-weight:bold;font-size:14px}}.ferry-chart .axis line{{stroke:#444}}.ferry-chart .axis line.grid{{stroke:#e4e4e4}}.ferry-chart .marker:hover line.marker-line{{stroke-width:3}}</style>",
        escape(title)
    );
    let _ = write!(
        out,
        r##"<rect class="background" x="0" y="0" width="{w}" height="{h}" fill="#fff"/>"##
    );
    let _ = write!(
        out,
        r#"<text class="chart-title" x="12" y="18">{}</text>"#,
        escape(title)
    );
}

/// Width and height bounded to what can be drawn.
fn bounded(width: u32, height: u32) -> (u32, u32) {
    (
        width.clamp(MIN_WIDTH, MAX_SIDE),
        height.clamp(MIN_HEIGHT, MAX_SIDE),
    )
}

/// The timeline as an SVG document of `width` x `height` pixels.
pub fn timeline_svg(t: &Timeline, width: u32, height: u32) -> String {
    let (width, height) = bounded(width, height);
    let (w, h) = (f64::from(width), f64::from(height));
    let has_right = t.series.iter().any(|s| s.axis == Axis::Right);
    let (start, end) = if t.end_ms > t.start_ms {
        (t.start_ms, t.end_ms)
    } else {
        (t.start_ms, t.start_ms.saturating_add(1000))
    };

    let mut legend_names: Vec<String> = t.series.iter().map(|s| s.name.clone()).collect();
    let mut kinds_shown: Vec<MarkerKind> = Vec::new();
    for m in &t.markers {
        if !kinds_shown.contains(&m.kind) {
            kinds_shown.push(m.kind);
        }
    }
    kinds_shown.sort_by_key(|k| k.class());
    legend_names.extend(kinds_shown.iter().map(|k| k.class().replace('-', " ")));
    let (legend_at, legend_rows) = legend_layout(&legend_names, w);

    let plot = Plot {
        left: 56.0,
        top: 30.0 + 18.0 * legend_rows as f64 + 8.0,
        right: w - if has_right { 64.0 } else { 16.0 },
        bottom: h - 34.0,
    };
    let plot = Plot {
        bottom: plot.bottom.max(plot.top + 20.0),
        ..plot
    };
    let left_axis = ValueAxis::fit(
        t.series
            .iter()
            .filter(|s| s.axis == Axis::Left)
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .chain(t.left_max),
    );
    let right_axis = ValueAxis::fit(
        t.series
            .iter()
            .filter(|s| s.axis == Axis::Right)
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .chain(t.right_max),
    );
    let x_of = |ms: i64| -> f64 {
        let ms = ms.clamp(start, end);
        let f = (i128::from(ms) - i128::from(start)) as f64
            / (i128::from(end) - i128::from(start)) as f64;
        plot.left + f * (plot.right - plot.left)
    };

    let names: Vec<&str> = t.series.iter().map(|s| s.name.as_str()).collect();
    let mut out = String::new();
    open_svg(
        &mut out,
        "ferry-timeline",
        &[
            ("series", names.join(",")),
            ("start-ms", start.to_string()),
            ("end-ms", end.to_string()),
        ],
        width,
        height,
        &t.title,
    );

    // Grid and left axis.
    out.push_str(r#"<g class="axis axis-left">"#);
    for v in left_axis.ticks() {
        let y = plot.y(&left_axis, v);
        let _ = write!(
            out,
            r#"<line class="grid" x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}"/><text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            plot.left,
            plot.right,
            plot.left - 6.0,
            y + 4.0,
            escape(&show(v))
        );
    }
    let _ = write!(
        out,
        r#"<line x1="{l:.1}" y1="{t:.1}" x2="{l:.1}" y2="{b:.1}"/><text class="axis-label" x="4" y="{y:.1}">{}</text></g>"#,
        escape(&t.left_label),
        l = plot.left,
        t = plot.top,
        b = plot.bottom,
        y = plot.top - 6.0,
    );
    if has_right {
        out.push_str(r#"<g class="axis axis-right">"#);
        for v in right_axis.ticks() {
            let y = plot.y(&right_axis, v);
            let _ = write!(
                out,
                r#"<text class="tick" x="{:.1}" y="{:.1}">{}</text>"#,
                plot.right + 6.0,
                y + 4.0,
                escape(&show(v))
            );
        }
        let _ = write!(
            out,
            r#"<line x1="{r:.1}" y1="{t:.1}" x2="{r:.1}" y2="{b:.1}"/><text class="axis-label" x="{e:.1}" y="{y:.1}" text-anchor="end">{}</text></g>"#,
            escape(&t.right_label),
            r = plot.right,
            e = w - 4.0,
            t = plot.top,
            b = plot.bottom,
            y = plot.top - 6.0,
        );
    }
    // Time axis.
    let (step, ticks) = time_ticks(start, end, t.time_labels);
    out.push_str(r#"<g class="axis axis-time">"#);
    let _ = write!(
        out,
        r#"<line x1="{:.1}" y1="{b:.1}" x2="{:.1}" y2="{b:.1}"/>"#,
        plot.left,
        plot.right,
        b = plot.bottom
    );
    for tick in ticks {
        let x = x_of(tick);
        let _ = write!(
            out,
            r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}"/><text class="tick" data-at-ms="{tick}" x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            plot.bottom,
            plot.bottom + 5.0,
            plot.bottom + 18.0,
            escape(&time_label(tick, start, end, step, t.time_labels))
        );
    }
    out.push_str("</g>");

    // Series.
    let mut hover_points = MAX_HOVER_POINTS;
    for (i, s) in t.series.iter().enumerate() {
        let axis = match s.axis {
            Axis::Left => &left_axis,
            Axis::Right => &right_axis,
        };
        let colour = PALETTE[i % PALETTE.len()];
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|&(ms, v)| (x_of(ms), plot.y(axis, v)))
            .collect();
        let d = series_path(&points, s.kind, x_of(end), plot.y(axis, Decimal::ZERO));
        let fill = if s.kind == SeriesKind::Area {
            format!(r#"fill="{colour}" fill-opacity="0.15""#)
        } else {
            r#"fill="none""#.to_owned()
        };
        let _ = write!(
            out,
            r#"<path class="series series-{}" data-series="{}" data-axis="{}" d="{d}" stroke="{colour}" stroke-width="2" {fill}><title>{}</title></path>"#,
            class_name(&s.name),
            escape(&s.name),
            match s.axis {
                Axis::Left => "left",
                Axis::Right => "right",
            },
            escape(&s.name)
        );
        // Each point, hovered, says its value.
        let _ = write!(
            out,
            r#"<g class="points" data-series="{}">"#,
            escape(&s.name)
        );
        for (&(ms, v), &(x, y)) in s.points.iter().zip(&points) {
            if hover_points == 0 {
                break;
            }
            hover_points -= 1;
            let _ = write!(
                out,
                r#"<circle class="point" data-at-ms="{ms}" data-value="{v}" cx="{x:.1}" cy="{y:.1}" r="4" fill="transparent"><title>{} {}: {v}</title></circle>"#,
                escape(&s.name),
                escape(&time_label(ms, start, end, 1000, t.time_labels)),
            );
        }
        out.push_str("</g>");
    }

    // Markers.
    out.push_str(r#"<g class="markers">"#);
    for m in &t.markers {
        let x = x_of(m.at_ms);
        let colour = marker_colour(m.kind);
        let _ = write!(
            out,
            r#"<g class="marker {}" data-at-ms="{}"><title>{}</title><line class="marker-hit" x1="{x:.1}" y1="{t:.1}" x2="{x:.1}" y2="{b:.1}" stroke="transparent" stroke-width="8"/><line class="marker-line" x1="{x:.1}" y1="{t:.1}" x2="{x:.1}" y2="{b:.1}" stroke="{colour}" stroke-width="1.5" stroke-dasharray="4 3"/></g>"#,
            m.kind.class(),
            m.at_ms,
            escape(&m.label),
            t = plot.top,
            b = plot.bottom,
        );
    }
    out.push_str("</g>");

    // Legend.
    out.push_str(r#"<g class="legend">"#);
    for (i, (name, (x, row))) in legend_names.iter().zip(legend_at).enumerate() {
        let y = 30.0 + 18.0 * row as f64;
        let (swatch, data) = match t.series.get(i) {
            Some(s) => (
                format!(
                    r#"<rect x="{x:.1}" y="{:.1}" width="16" height="4" fill="{}"/>"#,
                    y - 2.0,
                    PALETTE[i % PALETTE.len()]
                ),
                format!(r#" data-series="{}""#, escape(&s.name)),
            ),
            None => {
                let kind = kinds_shown
                    .get(i - t.series.len())
                    .copied()
                    .unwrap_or(MarkerKind::Other);
                (
                    format!(
                        r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="1.5" stroke-dasharray="4 3"/>"#,
                        x + 8.0,
                        y - 6.0,
                        x + 8.0,
                        y + 6.0,
                        marker_colour(kind)
                    ),
                    format!(r#" data-marker="{}""#, kind.class()),
                )
            }
        };
        let _ = write!(
            out,
            r#"<g class="legend-item"{data}>{swatch}<text x="{:.1}" y="{:.1}">{}</text></g>"#,
            x + 22.0,
            y + 4.0,
            escape(name)
        );
    }
    out.push_str("</g></svg>");
    out
}

/// Charts (each a whole SVG document from this module) one above the
/// other in one SVG document, `width` wide: `(svg, height)` of each, in
/// order. The root is `<svg class="ferry-chart ferry-stack">`, each part
/// a `<g class="stack-part" data-part="N">` holding its chart.
pub fn stacked_svg(title: &str, parts: &[(String, u32)], width: u32) -> String {
    let width = width.clamp(MIN_WIDTH, MAX_SIDE);
    let heading = 28u32;
    let height = parts
        .iter()
        .fold(heading, |h, (_, ph)| h.saturating_add(*ph))
        .min(MAX_SIDE.saturating_mul(8));
    let mut out = String::new();
    open_svg(
        &mut out,
        "ferry-stack",
        &[("parts", parts.len().to_string())],
        width,
        height,
        title,
    );
    let mut y = heading;
    for (n, (svg, h)) in parts.iter().enumerate() {
        let _ = write!(
            out,
            r#"<g class="stack-part" data-part="{n}" transform="translate(0,{y})">{svg}</g>"#
        );
        y = y.saturating_add(*h);
    }
    out.push_str("</svg>");
    out
}

/// The `d` of a series: a step, a line or a filled step down to `zero_y`;
/// steps and areas hold their last value to `end_x`.
fn series_path(points: &[(f64, f64)], kind: SeriesKind, end_x: f64, zero_y: f64) -> String {
    let mut d = String::new();
    let Some(&(x0, y0)) = points.first() else {
        return d;
    };
    let _ = write!(d, "M{x0:.1},{y0:.1}");
    let mut last_y = y0;
    for &(x, y) in &points[1..] {
        match kind {
            SeriesKind::Line => {
                let _ = write!(d, " L{x:.1},{y:.1}");
            }
            SeriesKind::Step | SeriesKind::Area => {
                let _ = write!(d, " L{x:.1},{last_y:.1} L{x:.1},{y:.1}");
            }
        }
        last_y = y;
    }
    if kind != SeriesKind::Line {
        let _ = write!(d, " L{end_x:.1},{last_y:.1}");
    }
    if kind == SeriesKind::Area {
        let _ = write!(d, " L{end_x:.1},{zero_y:.1} L{x0:.1},{zero_y:.1} Z");
    }
    d
}

/// One named set of bars: a value per category.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarSeries {
    /// Its name (legend, `data-series`).
    pub name: String,
    /// One value per category of the chart, in its order; missing ones are zero.
    pub values: Vec<Decimal>,
}

/// A bar chart: categories along the bottom (e.g. days), one bar per
/// series in each, stacked or side by side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bars {
    /// Its heading.
    pub title: String,
    /// What the values are in (e.g. `CNY`): the axis label and hover text.
    pub unit: String,
    /// The categories, left to right.
    pub categories: Vec<String>,
    /// The series, bottom to top when stacked.
    pub series: Vec<BarSeries>,
    /// Stack the series in one bar per category (totals on top), else side
    /// by side.
    pub stacked: bool,
}

impl Bars {
    fn value(&self, series: usize, category: usize) -> Decimal {
        self.series
            .get(series)
            .and_then(|s| s.values.get(category))
            .copied()
            .unwrap_or(Decimal::ZERO)
    }

    /// The sum of each category over the series.
    pub fn totals(&self) -> Vec<Decimal> {
        (0..self.categories.len())
            .map(|c| {
                (0..self.series.len())
                    .map(|s| self.value(s, c))
                    .fold(Decimal::ZERO, |a, v| a.saturating_add(v))
            })
            .collect()
    }
}

/// The bars as an SVG document of `width` x `height` pixels.
pub fn bars_svg(b: &Bars, width: u32, height: u32) -> String {
    let (width, height) = bounded(width, height);
    let (w, h) = (f64::from(width), f64::from(height));
    let names: Vec<String> = b.series.iter().map(|s| s.name.clone()).collect();
    let (legend_at, legend_rows) = legend_layout(&names, w);
    let plot = Plot {
        left: 64.0,
        top: 30.0 + 18.0 * legend_rows as f64 + 14.0,
        right: w - 16.0,
        bottom: h - 34.0,
    };
    let plot = Plot {
        bottom: plot.bottom.max(plot.top + 20.0),
        ..plot
    };
    let ncat = b.categories.len();
    // Stacked: positive values go up from zero, negative ones down.
    let extents: Vec<Decimal> = if b.stacked {
        (0..ncat)
            .flat_map(|c| {
                let (mut pos, mut neg) = (Decimal::ZERO, Decimal::ZERO);
                for s in 0..b.series.len() {
                    let v = b.value(s, c);
                    if v >= Decimal::ZERO {
                        pos = pos.saturating_add(v);
                    } else {
                        neg = neg.saturating_add(v);
                    }
                }
                [pos, neg]
            })
            .collect()
    } else {
        (0..ncat)
            .flat_map(|c| (0..b.series.len()).map(move |s| (s, c)))
            .map(|(s, c)| b.value(s, c))
            .collect()
    };
    let axis = ValueAxis::fit(extents.into_iter());

    let mut out = String::new();
    open_svg(
        &mut out,
        "ferry-bars",
        &[
            ("series", names.join(",")),
            ("categories", b.categories.join(",")),
        ],
        width,
        height,
        &b.title,
    );
    out.push_str(r#"<g class="axis axis-left">"#);
    for v in axis.ticks() {
        let y = plot.y(&axis, v);
        let _ = write!(
            out,
            r#"<line class="grid" x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}"/><text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            plot.left,
            plot.right,
            plot.left - 6.0,
            y + 4.0,
            escape(&show(v))
        );
    }
    let _ = write!(
        out,
        r#"<line x1="{l:.1}" y1="{t:.1}" x2="{l:.1}" y2="{b:.1}"/><text class="axis-label" x="4" y="{y:.1}">{}</text></g>"#,
        escape(&b.unit),
        l = plot.left,
        t = plot.top,
        b = plot.bottom,
        y = plot.top - 6.0,
    );
    let zero_y = plot.y(&axis, Decimal::ZERO);
    let slot = (plot.right - plot.left) / ncat.max(1) as f64;
    // At most about 16 category labels, so they do not overlap.
    let label_every = ncat.div_ceil(16).max(1);
    let _ = write!(
        out,
        r#"<g class="axis axis-categories"><line x1="{:.1}" y1="{zero_y:.1}" x2="{:.1}" y2="{zero_y:.1}"/>"#,
        plot.left, plot.right
    );
    for (c, name) in b.categories.iter().enumerate() {
        if c % label_every != 0 {
            continue;
        }
        let _ = write!(
            out,
            r#"<text class="tick" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            plot.left + slot * (c as f64 + 0.5),
            plot.bottom + 18.0,
            escape(name)
        );
    }
    out.push_str(r#"</g><g class="bars">"#);
    let nseries = b.series.len().max(1);
    for (c, cat) in b.categories.iter().enumerate() {
        let x0 = plot.left + slot * c as f64 + slot * 0.1;
        let bar_w = slot * 0.8;
        let (mut pos, mut neg) = (Decimal::ZERO, Decimal::ZERO);
        for (s, series) in b.series.iter().enumerate() {
            let v = b.value(s, c);
            let (x, bw, from, to) = if b.stacked {
                let from = if v >= Decimal::ZERO { pos } else { neg };
                let to = from.saturating_add(v);
                if v >= Decimal::ZERO {
                    pos = to;
                } else {
                    neg = to;
                }
                (x0, bar_w, from, to)
            } else {
                let bw = bar_w / nseries as f64;
                (x0 + bw * s as f64, bw, Decimal::ZERO, v)
            };
            let (y1, y2) = (plot.y(&axis, from), plot.y(&axis, to));
            let _ = write!(
                out,
                r#"<rect class="bar series-{}" data-series="{}" data-category="{}" data-value="{}" x="{x:.1}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="{}"><title>{}</title></rect>"#,
                class_name(&series.name),
                escape(&series.name),
                escape(cat),
                escape(&v.to_string()),
                y1.min(y2),
                (y1 - y2).abs(),
                PALETTE[s % PALETTE.len()],
                escape(&format!("{} {cat}: {v} {}", series.name, b.unit))
            );
        }
        if b.stacked {
            let total = pos.saturating_add(neg);
            let _ = write!(
                out,
                r#"<text class="bar-total" data-category="{}" data-value="{}" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                escape(cat),
                escape(&total.to_string()),
                x0 + bar_w / 2.0,
                plot.y(&axis, pos) - 4.0,
                escape(&total.to_string())
            );
        }
    }
    out.push_str(r#"</g><g class="legend">"#);
    for (i, (name, (x, row))) in names.iter().zip(legend_at).enumerate() {
        let y = 30.0 + 18.0 * row as f64;
        let _ = write!(
            out,
            r#"<g class="legend-item" data-series="{}"><rect x="{x:.1}" y="{:.1}" width="16" height="10" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text></g>"#,
            escape(name),
            y - 5.0,
            PALETTE[i % PALETTE.len()],
            x + 22.0,
            y + 4.0,
            escape(name)
        );
    }
    out.push_str("</g></svg>");
    out
}

/// Why a usage report could not be drawn.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChartError {
    /// An amount that is not decimal text (the broker sent something else).
    #[error("group {group}: the total {text:?} is not a decimal amount")]
    BadAmount { group: String, text: String },
}

/// Cost per period and group as stacked bars: one category per report in
/// `reports` (e.g. one report per day, labelled with its UTC start date,
/// or its start and end when it is not a whole day), one series per group
/// (the group's billed total: its subscription, pay-as-you-go base and
/// elastic lines, each rounded, as the report says).
pub fn usage_bars(reports: &[UsageDetail]) -> Result<Bars, ChartError> {
    let mut groups: Vec<String> = Vec::new();
    for d in reports {
        for g in &d.report.groups {
            let name = g.group.to_string();
            if !groups.contains(&name) {
                groups.push(name);
            }
        }
    }
    let mut series: Vec<BarSeries> = groups
        .iter()
        .map(|g| BarSeries {
            name: g.clone(),
            values: vec![Decimal::ZERO; reports.len()],
        })
        .collect();
    for (c, d) in reports.iter().enumerate() {
        for g in &d.report.groups {
            let name = g.group.to_string();
            let total: Decimal = g.total.parse().map_err(|_| ChartError::BadAmount {
                group: name.clone(),
                text: g.total.clone(),
            })?;
            if let Some(s) = series.iter_mut().find(|s| s.name == name) {
                if let Some(v) = s.values.get_mut(c) {
                    *v = v.saturating_add(total);
                }
            }
        }
    }
    let currency = reports
        .first()
        .map_or_else(String::new, |d| d.report.currency.clone());
    let categories = reports
        .iter()
        .map(|d| period_label(d.report.from.0, d.asked_to.0))
        .collect();
    let title = match (reports.first(), reports.last()) {
        (Some(first), Some(last)) => format!(
            "Cost per {} and group, {} to {} ({currency})",
            if reports.len() > 1 { "day" } else { "period" },
            utc_text(first.report.from.0),
            utc_text(last.asked_to.0)
        ),
        _ => "Cost per group: no period".to_owned(),
    };
    Ok(Bars {
        title,
        unit: currency,
        categories,
        series,
        stacked: true,
    })
}

/// [`usage_bars`] drawn as an SVG document (960 x 420 pixels).
pub fn usage_svg(reports: &[UsageDetail]) -> Result<String, ChartError> {
    Ok(bars_svg(&usage_bars(reports)?, 960, 420))
}

/// Most days in one chart of usage per day: a quarter, one bar each.
pub const MAX_USAGE_DAYS: usize = 92;

/// Milliseconds in a day.
const DAY_MS: i64 = 86_400_000;

/// `YYYY-MM-DD` for a whole UTC day, else both ends.
fn period_label(from: i64, to: i64) -> String {
    let date = |t: i64| {
        DateTime::<Utc>::from_timestamp_millis(t)
            .map_or_else(|| format!("{t} ms"), |d| d.format("%Y-%m-%d").to_string())
    };
    if from.rem_euclid(DAY_MS) == 0 && to.saturating_sub(from) == DAY_MS {
        date(from)
    } else {
        format!("{}..{}", utc_text(from), utc_text(to))
    }
}

/// RFC 3339 UTC with whole seconds; the bare date at midnight.
fn utc_text(t: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(t).map_or_else(
        || format!("{t} ms"),
        |d| {
            if t.rem_euclid(DAY_MS) == 0 {
                d.format("%Y-%m-%d").to_string()
            } else {
                d.format("%Y-%m-%dT%H:%M:%SZ").to_string()
            }
        },
    )
}

/// The UTC days that `from..to` covers, each clipped to it, in order;
/// `None` when they are more than `max_days`.
pub fn utc_days(from: i64, to: i64, max_days: usize) -> Option<Vec<(i64, i64)>> {
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        if out.len() == max_days {
            return None;
        }
        let next = at
            .div_euclid(DAY_MS)
            .saturating_add(1)
            .saturating_mul(DAY_MS)
            .min(to);
        out.push((at, next));
        at = next;
    }
    Some(out)
}

#[cfg(test)]
mod tests;
