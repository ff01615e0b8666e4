//! What the console draws, as [`crate::chart`] charts: a group's live
//! figures with its scaling decisions, and cost per day and group.

use ferry_common::admin::{GroupEventDetail, UsageDetail};
use ferry_common::{GroupName, UnixMillis};
use rust_decimal::Decimal;

use super::live::{Figures, History};
use crate::chart::{self, Axis, Marker, MarkerKind, Series, SeriesKind, TimeLabels, Timeline};

/// How much of a group's past the live chart shows.
pub const LIVE_WINDOW_MS: i64 = 30 * 60 * 1000;

/// Shortest time the live chart spans.
const MIN_SPAN_MS: i64 = 20_000;

/// Size of the live chart.
const WIDTH: u32 = 960;
const HEIGHT: u32 = 360;

/// The live chart of `group`: sessions, waiting requests, capacity and
/// resources by state on the left axis, usage and threshold (percent) on
/// the right, each scale-out and scale-in marked with its reason, over the
/// last [`LIVE_WINDOW_MS`] (or since the console started following it).
pub fn live_chart(
    group: &GroupName,
    history: &History,
    events: &[GroupEventDetail],
    now: UnixMillis,
) -> String {
    chart::timeline_svg(&live_timeline(group, history, events, now), WIDTH, HEIGHT)
}

/// The timeline [`live_chart`] draws.
pub fn live_timeline(
    group: &GroupName,
    history: &History,
    events: &[GroupEventDetail],
    now: UnixMillis,
) -> Timeline {
    let end = now.0.max(history.seen.map_or(now.0, |s| s.0));
    let first = history.points.front().map_or(end, |p| p.at.0);
    // The window starts with the first point kept (at most LIVE_WINDOW_MS
    // back), and spans at least MIN_SPAN_MS so a new group's chart reads.
    let start = first
        .max(end.saturating_sub(LIVE_WINDOW_MS))
        .min(end.saturating_sub(MIN_SPAN_MS));
    let series_of =
        |name: &str, kind: SeriesKind, axis: Axis, value: &dyn Fn(&Figures) -> Decimal| {
            let mut points: Vec<(i64, Decimal)> = history
                .points
                .iter()
                .map(|p| (p.at.0, value(&p.figures)))
                .collect();
            // The last figures hold until now.
            if let Some(last) = history.points.back() {
                points.push((end, value(&last.figures)));
            }
            Series {
                name: name.into(),
                kind,
                axis,
                points,
            }
        };
    let count = |n: u64| Decimal::from(n);
    let series = vec![
        series_of("sessions", SeriesKind::Area, Axis::Left, &|f| {
            count(f.sessions)
        }),
        series_of("waiting", SeriesKind::Step, Axis::Left, &|f| {
            count(f.waiting)
        }),
        series_of("capacity", SeriesKind::Step, Axis::Left, &|f| {
            count(f.capacity)
        }),
        series_of("ready", SeriesKind::Step, Axis::Left, &|f| count(f.ready)),
        series_of("pending", SeriesKind::Step, Axis::Left, &|f| {
            count(f.pending)
        }),
        series_of("usage %", SeriesKind::Step, Axis::Right, &usage_percent),
        series_of("threshold %", SeriesKind::Step, Axis::Right, &|f| {
            Decimal::from(f.threshold)
        }),
    ];
    let markers = events
        .iter()
        .filter(|e| e.event.at.0 >= start && e.event.at.0 <= end)
        .filter_map(|e| {
            let kind = match e.event.kind.as_str() {
                "scale_out" => MarkerKind::ScaleOut,
                "scale_in" => MarkerKind::ScaleIn,
                _ => return None,
            };
            Some(Marker {
                at_ms: e.event.at.0,
                kind,
                label: format!("{}: {}", e.event.kind.replace('_', "-"), e.event.message),
            })
        })
        .collect();
    Timeline {
        title: format!("{group}: sessions, capacity and usage"),
        start_ms: start,
        end_ms: end,
        time_labels: TimeLabels::Absolute,
        left_label: "count".into(),
        right_label: "%".into(),
        left_max: None,
        // Usage is read against its threshold: the axis reaches 100 %.
        right_max: Some(Decimal::ONE_HUNDRED),
        series,
        markers,
    }
}

/// Demand over capacity in percent, exact; 0 without capacity.
fn usage_percent(f: &Figures) -> Decimal {
    if f.capacity == 0 {
        return Decimal::ZERO;
    }
    (Decimal::from(f.demand) * Decimal::ONE_HUNDRED / Decimal::from(f.capacity)).round_dp(1)
}

/// Cost per day and group as bars, from one report per day.
pub fn usage_chart(days: &[UsageDetail]) -> String {
    match chart::usage_svg(days) {
        Ok(svg) => svg,
        Err(e) => format!(
            "<p class=\"message\">{}</p>",
            super::html::esc(&e.to_string())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::admin::GroupEventInfo;

    fn figures(sessions: u64, capacity: u64) -> Figures {
        Figures {
            sessions,
            waiting: 0,
            capacity,
            ready: capacity / 2,
            pending: 0,
            releasing: 0,
            demand: sessions,
            threshold: 80,
        }
    }

    fn event(at: i64, kind: &str, message: &str) -> GroupEventDetail {
        GroupEventDetail {
            event: GroupEventInfo {
                at: UnixMillis(at),
                kind: kind.into(),
                message: message.into(),
            },
            group: "g1".parse().expect("name"),
            resource: None,
            session: None,
            user: None,
        }
    }

    #[test]
    fn the_live_chart_holds_the_last_figures_until_now_and_marks_scaling() {
        let mut h = History::default();
        h.record(UnixMillis(1_000_000), figures(1, 2));
        h.record(UnixMillis(1_010_000), figures(2, 2));
        let g: GroupName = "g1".parse().expect("name");
        let events = [
            event(1_010_000, "scale_out", "usage 100% above 80% <b>"),
            event(1_020_000, "session", "not a scaling decision"),
            event(1_030_000, "scale_in", "idle for 60 s"),
        ];
        let t = live_timeline(&g, &h, &events, UnixMillis(1_040_000));
        assert_eq!(t.end_ms, 1_040_000);
        let sessions = t
            .series
            .iter()
            .find(|s| s.name == "sessions")
            .expect("sessions");
        assert_eq!(
            sessions.points,
            vec![
                (1_000_000, Decimal::from(1)),
                (1_010_000, Decimal::from(2)),
                (1_040_000, Decimal::from(2))
            ]
        );
        let usage = t
            .series
            .iter()
            .find(|s| s.name == "usage %")
            .expect("usage");
        assert_eq!(usage.points[0].1, Decimal::from(50));
        assert_eq!(t.markers.len(), 2);
        assert_eq!(t.markers[0].kind, MarkerKind::ScaleOut);
        let svg = live_chart(&g, &h, &events, UnixMillis(1_040_000));
        assert!(svg.contains("marker scale-out"), "{svg}");
        assert!(svg.contains("marker scale-in"));
        assert!(svg.contains("&lt;b&gt;"), "the reason is escaped");
        assert!(!svg.contains("<b>"));
    }

    #[test]
    fn an_empty_history_draws_an_empty_chart() {
        let g: GroupName = "g1".parse().expect("name");
        let svg = live_chart(&g, &History::default(), &[], UnixMillis(5_000_000));
        assert!(svg.starts_with("<svg"), "{svg}");
    }
}
