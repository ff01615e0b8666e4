use super::*;
use rust_decimal_macros::dec;

/// Parses `svg` as XML (a malformed document fails the test).
fn doc(svg: &str) -> roxmltree::Document<'_> {
    roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("{e}: {svg}"))
}

fn has_class(n: &roxmltree::Node, class: &str) -> bool {
    n.attribute("class")
        .is_some_and(|c| c.split_whitespace().any(|w| w == class))
}

fn with_class<'a, 'i>(d: &'a roxmltree::Document<'i>, class: &str) -> Vec<roxmltree::Node<'a, 'i>> {
    d.descendants().filter(|n| has_class(n, class)).collect()
}

/// Every number of a path's `d`, as (x, y) pairs.
fn path_points(d: &str) -> Vec<(f64, f64)> {
    let nums: Vec<f64> = d
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
        .collect();
    nums.chunks(2).map(|c| (c[0], c[1])).collect()
}

fn attr_f64(n: &roxmltree::Node, name: &str) -> f64 {
    n.attribute(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} on {n:?}"))
}

fn timeline(series: Vec<Series>, markers: Vec<Marker>) -> Timeline {
    Timeline {
        title: "Group <a> & \"b\"".into(),
        start_ms: 1_000_000,
        end_ms: 1_000_000 + 3_600_000,
        time_labels: TimeLabels::Relative,
        left_label: "count".into(),
        right_label: "CNY".into(),
        left_max: None,
        right_max: None,
        series,
        markers,
    }
}

fn step(name: &str, axis: Axis, points: &[(i64, Decimal)]) -> Series {
    Series {
        name: name.into(),
        kind: SeriesKind::Step,
        axis,
        points: points.to_vec(),
    }
}

/// The plot's bounds as the axes draw them: (left, top, right, bottom).
fn plot_bounds(d: &roxmltree::Document) -> (f64, f64, f64, f64) {
    let left = with_class(d, "axis-left")[0]
        .children()
        .rfind(|n| n.has_tag_name("line") && !has_class(n, "grid"))
        .expect("the left axis line");
    let time = with_class(d, "axis-time")[0]
        .children()
        .find(|n| n.has_tag_name("line"))
        .expect("the time axis line");
    (
        attr_f64(&left, "x1"),
        attr_f64(&left, "y1"),
        attr_f64(&time, "x2"),
        attr_f64(&left, "y2"),
    )
}

#[test]
fn series_points_fall_inside_the_plot_and_on_their_values() {
    let t = timeline(
        vec![
            step(
                "sessions",
                Axis::Left,
                &[
                    (1_000_000, dec!(0)),
                    (1_600_000, dec!(3)),
                    (2_000_000, dec!(10)),
                ],
            ),
            Series {
                name: "cost".into(),
                kind: SeriesKind::Line,
                axis: Axis::Right,
                points: vec![(1_000_000, dec!(0)), (4_600_000, dec!(94.48))],
            },
        ],
        vec![],
    );
    let svg = timeline_svg(&t, 800, 400);
    let d = doc(&svg);
    let root = d.root_element();
    assert!(has_class(&root, "ferry-chart"), "{svg}");
    assert_eq!(root.attribute("data-series"), Some("sessions,cost"));
    let (left, top, right, bottom) = plot_bounds(&d);
    let paths = with_class(&d, "series");
    assert_eq!(paths.len(), 2);
    assert!(has_class(&paths[0], "series-sessions"));
    assert_eq!(paths[1].attribute("data-series"), Some("cost"));
    assert_eq!(paths[1].attribute("data-axis"), Some("right"));
    for p in &paths {
        let pts = path_points(p.attribute("d").unwrap_or_default());
        assert!(!pts.is_empty());
        for (x, y) in pts {
            assert!(
                x >= left - 0.05 && x <= right + 0.05,
                "x {x} in {left}..{right}"
            );
            assert!(
                y >= top - 0.05 && y <= bottom + 0.05,
                "y {y} in {top}..{bottom}"
            );
        }
    }
    // The step starts at zero (the bottom), its highest value is the top of
    // a 0..10 axis, and it holds to the right edge.
    let pts = path_points(paths[0].attribute("d").unwrap_or_default());
    assert!((pts[0].1 - bottom).abs() < 0.1, "{pts:?}");
    let last = pts[pts.len() - 1];
    assert!(
        (last.0 - right).abs() < 0.1 && (last.1 - top).abs() < 0.1,
        "{pts:?}"
    );
    // The line ends at the right edge on 94.48 of a 0..100 axis.
    let pts = path_points(paths[1].attribute("d").unwrap_or_default());
    let end = pts[pts.len() - 1];
    let want = bottom - 0.9448 * (bottom - top);
    assert!((end.1 - want).abs() < 0.2, "{end:?} want y {want}");
    // Right axis ticks read money, left ones counts.
    let right_ticks: Vec<&str> = with_class(&d, "axis-right")[0]
        .descendants()
        .filter(|n| has_class(n, "tick"))
        .filter_map(|n| n.text())
        .collect();
    assert_eq!(right_ticks, ["0", "20", "40", "60", "80", "100"]);
    let left_ticks: Vec<&str> = with_class(&d, "axis-left")[0]
        .descendants()
        .filter(|n| has_class(n, "tick"))
        .filter_map(|n| n.text())
        .collect();
    assert_eq!(left_ticks, ["0", "2", "4", "6", "8", "10"]);
}

#[test]
fn time_ticks_read_relative_or_absolute() {
    let mut t = timeline(vec![step("s", Axis::Left, &[(1_000_000, dec!(1))])], vec![]);
    // 2026-03-02T08:00:00Z to 12:00.
    t.start_ms = 1_772_438_400_000;
    t.end_ms = t.start_ms + 4 * 3_600_000;
    let labels = |t: &Timeline| -> Vec<String> {
        let svg = timeline_svg(t, 900, 300);
        let d = doc(&svg);
        let out = with_class(&d, "axis-time")[0]
            .descendants()
            .filter(|n| has_class(n, "tick"))
            .filter_map(|n| n.text().map(str::to_owned))
            .collect();
        out
    };
    assert_eq!(
        labels(&t),
        [
            "+00:00:00",
            "+00:30:00",
            "+01:00:00",
            "+01:30:00",
            "+02:00:00",
            "+02:30:00",
            "+03:00:00",
            "+03:30:00",
            "+04:00:00"
        ]
    );
    t.time_labels = TimeLabels::Absolute;
    assert_eq!(
        labels(&t),
        ["08:00", "08:30", "09:00", "09:30", "10:00", "10:30", "11:00", "11:30", "12:00"]
    );
    // Over days, the date is shown.
    t.end_ms = t.start_ms + 3 * 86_400_000;
    let l = labels(&t);
    assert!(l.iter().all(|s| s.starts_with("03-0")), "{l:?}");
}

#[test]
fn every_text_is_escaped() {
    let evil = "</text><script>alert('x')</script> & \"q\"";
    let t = timeline(
        vec![step(evil, Axis::Left, &[(1_000_000, dec!(1))])],
        vec![Marker {
            at_ms: 1_500_000,
            kind: MarkerKind::ScaleOut,
            label: evil.into(),
        }],
    );
    let svg = timeline_svg(&t, 600, 300);
    assert!(!svg.contains("<script"), "{svg}");
    let d = doc(&svg);
    assert_eq!(
        d.descendants().filter(|n| n.has_tag_name("script")).count(),
        0
    );
    let marker = with_class(&d, "marker")[0];
    let title = marker
        .children()
        .find(|n| n.has_tag_name("title"))
        .and_then(|n| n.text());
    assert_eq!(title, Some(evil));
    assert_eq!(
        with_class(&d, "series")[0].attribute("data-series"),
        Some(evil)
    );
    let root_title = d
        .root_element()
        .children()
        .find(|n| n.has_tag_name("title"));
    assert_eq!(root_title.and_then(|n| n.text()), Some("Group <a> & \"b\""));
    // Control characters XML cannot carry are dropped.
    assert_eq!(escape("a\u{1}b\tc"), "ab\tc");
    assert_eq!(class_name("Waiting Requests!"), "waiting-requests-");
}

#[test]
fn markers_carry_their_kind_time_and_reason() {
    let t = timeline(
        vec![step("sessions", Axis::Left, &[(1_000_000, dec!(1))])],
        vec![
            Marker {
                at_ms: 1_200_000,
                kind: MarkerKind::ScaleOut,
                label: "SCALE-OUT +2: usage 100% > 85%".into(),
            },
            Marker {
                at_ms: 3_000_000,
                kind: MarkerKind::ScaleIn,
                label: "SCALE-IN e1: idle 60m".into(),
            },
            Marker {
                // Before the start: drawn on the left edge.
                at_ms: 0,
                kind: MarkerKind::Other,
                label: "early".into(),
            },
        ],
    );
    let svg = timeline_svg(&t, 700, 300);
    let d = doc(&svg);
    let (left, _, right, _) = plot_bounds(&d);
    let outs = with_class(&d, "scale-out")
        .into_iter()
        .filter(|n| has_class(n, "marker"))
        .collect::<Vec<_>>();
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].attribute("data-at-ms"), Some("1200000"));
    let ins: Vec<_> = with_class(&d, "marker")
        .into_iter()
        .filter(|n| has_class(n, "scale-in"))
        .collect();
    assert_eq!(ins.len(), 1);
    assert_eq!(
        ins[0]
            .children()
            .find(|n| n.has_tag_name("title"))
            .and_then(|n| n.text()),
        Some("SCALE-IN e1: idle 60m")
    );
    let x = |m: &roxmltree::Node| {
        let line = m
            .children()
            .find(|n| has_class(n, "marker-line"))
            .expect("a line");
        attr_f64(&line, "x1")
    };
    let want = left + (1_200_000.0 - 1_000_000.0) / 3_600_000.0 * (right - left);
    assert!(
        (x(&outs[0]) - want).abs() < 0.1,
        "{} vs {want}",
        x(&outs[0])
    );
    let early = with_class(&d, "marker")
        .into_iter()
        .find(|n| has_class(n, "other"))
        .expect("the early marker");
    assert!((x(&early) - left).abs() < 0.1);
    // The legend names the marker kinds too.
    let legend: Vec<&str> = with_class(&d, "legend-item")
        .iter()
        .filter_map(|n| n.attribute("data-marker"))
        .collect();
    assert_eq!(legend, ["other", "scale-in", "scale-out"]);
}

#[test]
fn empty_single_point_and_zero_timelines_still_draw() {
    for t in [
        timeline(vec![], vec![]),
        timeline(vec![step("none", Axis::Left, &[])], vec![]),
        timeline(
            vec![step("one", Axis::Left, &[(1_500_000, dec!(7))])],
            vec![],
        ),
        timeline(
            vec![step(
                "zero",
                Axis::Right,
                &[(1_000_000, dec!(0)), (2_000_000, dec!(0))],
            )],
            vec![],
        ),
        Timeline {
            end_ms: 0,
            ..timeline(vec![step("backwards", Axis::Left, &[(5, dec!(1))])], vec![])
        },
    ] {
        let svg = timeline_svg(&t, 10, 10);
        let d = doc(&svg);
        let root = d.root_element();
        // Raised to the smallest size that can be drawn.
        assert_eq!(root.attribute("width"), Some("240"));
        for p in with_class(&d, "series") {
            for (x, y) in path_points(p.attribute("d").unwrap_or_default()) {
                assert!(
                    x.is_finite() && y.is_finite() && (0.0..=240.0).contains(&x),
                    "{svg}"
                );
                assert!((0.0..=160.0).contains(&y), "{svg}");
            }
        }
    }
    // One point: a flat line from it to the right edge, at the top of a 0..7 axis.
    let svg = timeline_svg(
        &timeline(
            vec![step("one", Axis::Left, &[(1_500_000, dec!(7))])],
            vec![],
        ),
        600,
        300,
    );
    let d = doc(&svg);
    let pts = path_points(
        with_class(&d, "series")[0]
            .attribute("d")
            .unwrap_or_default(),
    );
    assert_eq!(pts.len(), 2, "{pts:?}");
    assert_eq!(pts[0].1, pts[1].1);
}

#[test]
fn huge_and_negative_values_stay_in_the_drawing() {
    let t = timeline(
        vec![
            step(
                "huge",
                Axis::Left,
                &[
                    (1_000_000, Decimal::MAX),
                    (2_000_000, Decimal::MIN),
                    (3_000_000, dec!(0.000001)),
                ],
            ),
            step("tiny", Axis::Right, &[(1_000_000, dec!(0.0000001))]),
        ],
        vec![],
    );
    let svg = timeline_svg(&t, 500, 300);
    let d = doc(&svg);
    let (_, top, _, bottom) = plot_bounds(&d);
    for p in with_class(&d, "series") {
        for (_, y) in path_points(p.attribute("d").unwrap_or_default()) {
            assert!(y >= top - 0.05 && y <= bottom + 0.05, "{y}");
        }
    }
    let ticks = with_class(&d, "axis-left")[0]
        .descendants()
        .filter(|n| has_class(n, "tick"))
        .count();
    assert!((2..=12).contains(&ticks), "{ticks} ticks");
}

fn bars() -> Bars {
    Bars {
        title: "Cost per day".into(),
        unit: "CNY".into(),
        categories: vec![
            "2026-03-02".into(),
            "2026-03-03".into(),
            "2026-03-04".into(),
        ],
        series: vec![
            BarSeries {
                name: "design".into(),
                values: vec![dec!(10.50), dec!(0), dec!(3.25)],
            },
            BarSeries {
                name: "r&d <lab>".into(),
                // One value short: the last category counts zero.
                values: vec![dec!(4.00), dec!(20.01)],
            },
        ],
        stacked: true,
    }
}

#[test]
fn stacked_bars_sum_per_category_and_rise_with_their_values() {
    let b = bars();
    assert_eq!(b.totals(), [dec!(14.50), dec!(20.01), dec!(3.25)]);
    let svg = bars_svg(&b, 600, 300);
    let d = doc(&svg);
    assert_eq!(
        d.root_element().attribute("data-series"),
        Some("design,r&d <lab>")
    );
    let rects = with_class(&d, "bar");
    assert_eq!(rects.len(), 6);
    let totals: Vec<(&str, &str)> = with_class(&d, "bar-total")
        .iter()
        .map(|n| {
            (
                n.attribute("data-category").unwrap_or_default(),
                n.text().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        totals,
        [
            ("2026-03-02", "14.50"),
            ("2026-03-03", "20.01"),
            ("2026-03-04", "3.25")
        ]
    );
    // Heights are proportional to the values.
    let height = |series: &str, cat: &str| {
        let r = rects
            .iter()
            .find(|r| {
                r.attribute("data-series") == Some(series)
                    && r.attribute("data-category") == Some(cat)
            })
            .unwrap_or_else(|| panic!("{series} {cat}"));
        attr_f64(r, "height")
    };
    let ratio = height("r&d <lab>", "2026-03-03") / height("design", "2026-03-02");
    assert!((ratio - 20.01 / 10.5).abs() < 0.01, "{ratio}");
    assert_eq!(height("design", "2026-03-03"), 0.0);
    // The second series sits on top of the first.
    let y = |series: &str| {
        rects
            .iter()
            .find(|r| {
                r.attribute("data-series") == Some(series)
                    && r.attribute("data-category") == Some("2026-03-02")
            })
            .map(|r| (attr_f64(r, "y"), attr_f64(r, "height")))
            .expect("a bar")
    };
    let (y_design, _) = y("design");
    let (y_rd, h_rd) = y("r&d <lab>");
    assert!(
        (y_rd + h_rd - y_design).abs() < 0.2,
        "{y_rd} + {h_rd} vs {y_design}"
    );
}

#[test]
fn grouped_bars_stand_side_by_side_from_zero() {
    let b = Bars {
        stacked: false,
        ..bars()
    };
    let svg = bars_svg(&b, 600, 300);
    let d = doc(&svg);
    assert!(with_class(&d, "bar-total").is_empty());
    let rects = with_class(&d, "bar");
    let first: Vec<_> = rects
        .iter()
        .filter(|r| r.attribute("data-category") == Some("2026-03-02"))
        .collect();
    assert_eq!(first.len(), 2);
    let bottom = |r: &roxmltree::Node| attr_f64(r, "y") + attr_f64(r, "height");
    assert!((bottom(first[0]) - bottom(first[1])).abs() < 0.1);
    assert!(attr_f64(first[0], "x") < attr_f64(first[1], "x"));
}

#[test]
fn empty_bars_still_draw() {
    let b = Bars {
        title: "nothing".into(),
        unit: "CNY".into(),
        categories: vec![],
        series: vec![],
        stacked: true,
    };
    let svg = bars_svg(&b, 600, 300);
    let d = doc(&svg);
    assert!(with_class(&d, "bar").is_empty());
}

#[test]
fn utc_days_split_a_period_at_midnight() {
    let day = 86_400_000;
    let t0 = 1_772_409_600_000; // 2026-03-02T00:00:00Z
    assert_eq!(
        utc_days(t0 + 3_600_000, t0 + 2 * day + 60_000, 10),
        Some(vec![
            (t0 + 3_600_000, t0 + day),
            (t0 + day, t0 + 2 * day),
            (t0 + 2 * day, t0 + 2 * day + 60_000)
        ])
    );
    assert_eq!(utc_days(t0, t0 + day, 10), Some(vec![(t0, t0 + day)]));
    assert_eq!(utc_days(t0, t0, 10), Some(vec![]));
    assert_eq!(utc_days(t0, t0 + 11 * day, 10), None);
    assert_eq!(period_label(t0, t0 + day), "2026-03-02");
    assert_eq!(
        period_label(t0 + 3_600_000, t0 + day),
        "2026-03-02T01:00:00Z..2026-03-03"
    );
}

fn day_report(from: i64, groups: &[(&str, &str)]) -> UsageDetail {
    use ferry_common::admin::{GroupUsage, UsageReport};
    UsageDetail {
        report: UsageReport {
            from: ferry_common::UnixMillis(from),
            to: ferry_common::UnixMillis(from + 86_400_000),
            currency: "CNY".into(),
            groups: groups
                .iter()
                .map(|(name, total)| GroupUsage {
                    group: name.parse().expect("a group name"),
                    id: format!("id-{name}"),
                    billing: "pay-as-you-go".into(),
                    resources: vec![],
                    base_seconds: 0,
                    elastic_seconds: 0,
                    subscription: "0.00".into(),
                    base_payg: (*total).into(),
                    elastic: "0.00".into(),
                    total: (*total).into(),
                })
                .collect(),
        },
        resources: vec![],
        asked_to: ferry_common::UnixMillis(from + 86_400_000),
    }
}

#[test]
fn usage_reports_become_one_stacked_bar_per_day() {
    let t0 = 1_772_409_600_000; // 2026-03-02T00:00:00Z
    let days = [
        day_report(t0, &[("design", "17.44")]),
        day_report(t0 + 86_400_000, &[("design", "17.44"), ("build", "3.01")]),
    ];
    let b = usage_bars(&days).expect("bars");
    assert_eq!(b.categories, ["2026-03-02", "2026-03-03"]);
    assert_eq!(b.series.len(), 2);
    assert_eq!(b.series[1].name, "build");
    assert_eq!(b.series[1].values, [dec!(0), dec!(3.01)]);
    assert_eq!(b.totals(), [dec!(17.44), dec!(20.45)]);
    assert_eq!(b.unit, "CNY");
    assert!(b.title.contains("2026-03-02 to 2026-03-04"), "{}", b.title);
    let svg = usage_svg(&days).expect("svg");
    let d = doc(&svg);
    let totals: Vec<&str> = with_class(&d, "bar-total")
        .iter()
        .filter_map(|n| n.text())
        .collect();
    assert_eq!(totals, ["17.44", "20.45"]);

    let mut bad = day_report(t0, &[("design", "17.44")]);
    bad.report.groups[0].total = "lots".into();
    assert_eq!(
        usage_bars(&[bad]),
        Err(ChartError::BadAmount {
            group: "design".into(),
            text: "lots".into()
        })
    );
    assert!(usage_bars(&[]).is_ok_and(|b| b.categories.is_empty()));
}

#[test]
fn each_point_says_its_value_on_hover() {
    let t = timeline(
        vec![step(
            "sessions",
            Axis::Left,
            &[
                (1_000_000, dec!(0)),
                (1_600_000, dec!(3)),
                (2_000_000, dec!(2.50)),
            ],
        )],
        vec![],
    );
    let svg = timeline_svg(&t, 800, 400);
    let d = doc(&svg);
    let points: Vec<_> = with_class(&d, "point");
    let got: Vec<(&str, &str, &str)> = points
        .iter()
        .map(|p| {
            (
                p.attribute("data-at-ms").unwrap_or_default(),
                p.attribute("data-value").unwrap_or_default(),
                p.children()
                    .find(|n| n.has_tag_name("title"))
                    .and_then(|n| n.text())
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("1000000", "0", "sessions +00:00:00: 0"),
            ("1600000", "3", "sessions +00:10:00: 3"),
            ("2000000", "2.50", "sessions +00:16:40: 2.50"),
        ]
    );
    // The circles sit on the line's corners.
    let line = path_points(
        with_class(&d, "series")[0]
            .attribute("d")
            .unwrap_or_default(),
    );
    for p in &points {
        let (x, y) = (attr_f64(p, "cx"), attr_f64(p, "cy"));
        assert!(
            line.iter()
                .any(|&(lx, ly)| (lx - x).abs() < 0.05 && (ly - y).abs() < 0.05),
            "{x},{y} on {line:?}"
        );
    }
    // A long series stops getting hover points at the limit.
    let many: Vec<(i64, Decimal)> = (0..2500)
        .map(|i| (1_000_000 + i, Decimal::from(i)))
        .collect();
    let svg = timeline_svg(
        &timeline(vec![step("many", Axis::Left, &many)], vec![]),
        800,
        400,
    );
    assert_eq!(with_class(&doc(&svg), "point").len(), MAX_HOVER_POINTS);
}

#[test]
fn an_area_is_closed_down_to_zero() {
    let mut s = step(
        "load",
        Axis::Left,
        &[(1_000_000, dec!(2)), (2_000_000, dec!(4))],
    );
    s.kind = SeriesKind::Area;
    let svg = timeline_svg(&timeline(vec![s], vec![]), 600, 300);
    let d = doc(&svg);
    let (left, _, right, bottom) = plot_bounds(&d);
    let path = with_class(&d, "series")[0];
    let text = path.attribute("d").unwrap_or_default();
    assert!(text.ends_with('Z'), "{text}");
    assert_eq!(path.attribute("fill-opacity"), Some("0.15"));
    let pts = path_points(text);
    // ... to the right edge, down to zero, back to the first point's time.
    let n = pts.len();
    assert!(
        (pts[n - 2].0 - right).abs() < 0.1 && (pts[n - 2].1 - bottom).abs() < 0.1,
        "{pts:?}"
    );
    assert!(
        (pts[n - 1].0 - left).abs() < 0.1 && (pts[n - 1].1 - bottom).abs() < 0.1,
        "{pts:?}"
    );
}
