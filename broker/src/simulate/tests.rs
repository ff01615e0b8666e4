//! Scenario parsing and rendering tests.

use std::path::{Path, PathBuf};

use rust_decimal::Decimal;

use super::*;

fn shared(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scenarios")
        .join(name)
}

#[test]
fn seed_table_prints_the_seed_amounts() {
    let table = run_cli(&shared("seed-elastic-billing.toml"), false).expect("simulate");
    println!("{table}");
    if std::env::var_os("FERRY_SHOW_SCENARIOS").is_some() {
        for name in ["waiting-room.toml", "cooldown-drain.toml"] {
            println!("{}", run_cli(&shared(name), false).expect("simulate"));
            println!("{}", run_cli(&shared(name), true).expect("simulate"));
        }
    }
    assert!(table.contains("92.87"));
    assert!(table.contains("1.61"));
    assert!(table.contains("94.48"));
}

const GOOD: &str = r#"
name = "t"
start = "2026-03-02T08:00:00Z"
end = "2026-03-02T12:00:00Z"

[group]
base_resources = 2
billing = "subscription"
duration = "1w"

[pricing]
currency = "CNY"
subscription_month = "199"
hourly = "0.726736"

[policy]
concurrent_sessions = 2
usage_threshold = 85
scale_out_step = 2
max_elastic = 2
max_idle = "60m"

[[event]]
at = "08:22"
connect = "s1"
"#;

fn problems(text: &str) -> Vec<Problem> {
    match parse(Path::new("bad.toml"), text) {
        Err(SimError::Invalid { problems, .. }) => problems,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn a_good_scenario_parses_with_defaults() {
    let sc = parse(Path::new("good.toml"), GOOD).expect("valid");
    assert_eq!(sc.provider, Provider::Explicit);
    assert_eq!(
        sc.policy.scale_in_cooldown,
        std::time::Duration::from_secs(60)
    );
    assert_eq!(sc.policy.wait_timeout, std::time::Duration::ZERO);
    assert_eq!(sc.events.len(), 1);
    assert_eq!(sc.events[0].line, 23);
    assert_eq!(sc.events[0].at.0 - sc.start.0, (22 * 60) * 1000);
}

#[test]
fn unknown_keys_name_their_line() {
    let text = GOOD.replace(
        "max_idle = \"60m\"",
        "max_idle = \"60m\"\nmax_idel = \"5m\"",
    );
    let p = problems(&text);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].line, 22, "{p:?}");
    assert!(p[0].message.contains("max_idel"), "{p:?}");
    let err = parse(Path::new("bad.toml"), &text).unwrap_err().to_string();
    assert!(err.starts_with("bad.toml:22: "), "{err}");
}

#[test]
fn every_problem_is_reported_with_its_line() {
    let text = GOOD
        .replace("base_resources = 2", "base_resources = -2")
        .replace("usage_threshold = 85", "usage_threshold = 185")
        .replace("at = \"08:22\"", "at = \"8h22\"")
        .replace("duration = \"1w\"", "duration = \"1week\"")
        + "\n[[event]]\nat = \"07:00\"\ncreated = -1\n"
        + "\n[[event]]\nat = \"09:00\"\nconnect = \"a\"\ndisconnect = \"a\"\n";
    let p = problems(&text);
    assert_eq!(p.len(), 7, "{p:?}");
    let lines: Vec<usize> = p.iter().map(|p| p.line).collect();
    let text_of = |line: usize| -> String {
        p.iter()
            .filter(|p| p.line == line)
            .map(|p| p.message.clone())
            .collect::<Vec<_>>()
            .join(" | ")
    };
    assert!(text_of(7).contains("negative"), "{p:?}");
    assert!(text_of(9).contains("1week"), "{p:?}");
    assert!(text_of(18).contains("185"), "{p:?}");
    assert!(text_of(24).contains("not a time"), "{p:?}");
    assert!(text_of(28).contains("before start"), "{p:?}");
    assert!(text_of(29).contains("negative"), "{p:?}");
    assert!(text_of(31).contains("more than one action"), "{p:?}");
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "sorted by line");
}

#[test]
fn events_out_of_order_are_refused() {
    let text = GOOD.to_owned() + "\n[[event]]\nat = \"08:10\"\ndisconnect = \"s1\"\n";
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].line, 28);
    assert!(
        p[0].message.contains("before the event on line 23"),
        "{p:?}"
    );
}

#[test]
fn floats_policy_against_spec_and_provider_keys_are_checked() {
    let text = GOOD
        .replace("hourly = \"0.726736\"", "hourly = 0.726736")
        .replace(
            "duration = \"1w\"",
            "duration = \"1w\"\nspec = \"office-4c8g\"",
        )
        .replace("concurrent_sessions = 2", "concurrent_sessions = 3")
        + "\n[provider]\nmode = \"explicit\"\ncreate_delay = \"1m\"\n";
    let p = problems(&text);
    let all = format!("{p:?}");
    assert!(all.contains("float"), "{all}");
    assert!(all.contains("office-4c8g"), "{all}");
    assert!(all.contains("create_delay"), "{all}");
    assert_eq!(p.len(), 3, "{all}");
}

#[test]
fn replay_errors_name_the_event_line() {
    let text = GOOD.to_owned() + "\n[[event]]\nat = \"09:00\"\ncreated = 1\n";
    let sc = parse(Path::new("r.toml"), &text).expect("parses");
    let err = replay(Path::new("r.toml"), &sc).unwrap_err().to_string();
    assert!(
        err.starts_with("r.toml:27: created = 1, but only 0"),
        "{err}"
    );
    let text = GOOD.to_owned() + "\n[[event]]\nat = \"09:00\"\ndisconnect = \"nobody\"\n";
    let sc = parse(Path::new("r.toml"), &text).expect("parses");
    let err = replay(Path::new("r.toml"), &sc).unwrap_err().to_string();
    assert!(
        err.starts_with("r.toml:27: disconnect = \"nobody\""),
        "{err}"
    );
}

#[test]
fn missing_files_and_huge_files_are_refused_by_name() {
    let err = run_cli(Path::new("/nonexistent/x.toml"), true).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/x.toml"), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big.toml");
    let f = std::fs::File::create(&big).expect("create");
    f.set_len(MAX_SCENARIO_BYTES + 1).expect("grow");
    assert!(matches!(
        run_cli(&big, false),
        Err(SimError::TooLarge { .. })
    ));
}

#[test]
fn json_output_has_the_spec_shape() {
    let out = run_cli(&shared("waiting-room.toml"), true).expect("simulate");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    for key in ["cost", "resources", "elastic", "decisions", "timeline"] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["resources"][0]["kind"], "base");
    assert_eq!(v["resources"][0]["billed_seconds"], 7200);
    assert_eq!(v["resources"][1]["kind"], "elastic");
    let placed: Vec<&serde_json::Value> = v["decisions"]
        .as_array()
        .expect("array")
        .iter()
        .filter(|d| d["action"] == "placed")
        .collect();
    assert_eq!(placed.len(), 4, "w1..w4 placed, w5 rejected");
    assert_eq!(placed[2]["session"], "w3");
    assert_eq!(placed[2]["resource"], "e1");
    assert_eq!(placed[2]["at"], "2026-04-06T09:12:30Z");
    let row = v["timeline"]
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["at"] == "2026-04-06T09:12:10Z")
        .expect("row at 09:12:10");
    assert_eq!(row["sessions"], 2);
    assert_eq!(row["waiting"], 3);
    assert_eq!(row["resources"], 2);
    assert_eq!(row["usage_pct"], "125.0");
}

#[test]
fn zero_delays_complete_at_the_instant_they_are_asked() {
    let text = GOOD.replace("[[event]]", "[provider]\nmode = \"delays\"\n\n[[event]]")
        + "\n[[event]]\nat = \"08:23\"\nconnect = \"s2\"\n"
        + "\n[[event]]\nat = \"08:24\"\nconnect = \"s3\"\n"
        + "\n[[event]]\nat = \"08:25\"\nconnect = \"s4\"\n";
    let sc = parse(Path::new("z.toml"), &text).expect("parses");
    let out = replay(Path::new("z.toml"), &sc).expect("replays");
    let created: Vec<_> = out
        .decisions
        .iter()
        .filter(|d| d.action.name() == "created")
        .map(|d| d.at)
        .collect();
    let scale_out = out
        .decisions
        .iter()
        .find(|d| d.action.name() == "scale_out")
        .expect("scale-out");
    assert_eq!(created, [scale_out.at, scale_out.at]);
}

/// `GOOD` with `[[policy.period]]` tables after `max_idle` (line 21), so the
/// first table's header is on line 23.
fn with_periods(periods: &str) -> String {
    GOOD.replace(
        "max_idle = \"60m\"\n",
        &format!("max_idle = \"60m\"\n{periods}"),
    )
}

#[test]
fn policy_periods_parse() {
    let text = with_periods(
        "\n[[policy.period]]\nweekdays = \"mon-fri\"\nstart = \"08:00\"\nend = \"09:30\"\nmin_ready = 3\nwarm_up = \"10m\"\n\
         \n[[policy.period]]\nweekdays = [\"mon\", \"sat-sun\"]\nstart = \"23:00\"\nend = \"24:00\"\nmin_ready = 2\n",
    );
    let sc = parse(Path::new("p.toml"), &text).expect("valid");
    let p = &sc.policy.periods;
    assert_eq!(p.len(), 2);
    assert_eq!(
        (
            p[0].weekdays,
            p[0].start_minute,
            p[0].end_minute,
            p[0].min_ready
        ),
        (0b001_1111, 480, 570, 3)
    );
    assert_eq!(p[0].warm_up, std::time::Duration::from_secs(600));
    assert_eq!(
        (p[1].weekdays, p[1].start_minute, p[1].end_minute),
        (0b110_0001, 23 * 60, 24 * 60)
    );
    assert_eq!(p[1].warm_up, std::time::Duration::ZERO);
}

#[test]
fn policy_period_problems_name_their_lines() {
    // Lines: 23 header, 24 weekdays, 25 start, 26 end, 27 min_ready, 28 warm_up.
    let text = with_periods(
        "\n[[policy.period]]\nweekdays = [\"fri-mon\", \"moon\"]\nstart = \"8am\"\nend = \"25:00\"\nmin_ready = 0\nwarm_up = \"soon\"\n",
    );
    let p = problems(&text);
    let all = format!("{p:?}");
    let lines: Vec<usize> = p.iter().map(|p| p.line).collect();
    assert_eq!(lines, [24, 24, 25, 26, 27, 28], "{all}");
    assert!(p[0].message.contains("runs backwards"), "{all}");
    assert!(p[1].message.contains("\"moon\" is not a weekday"), "{all}");
    assert!(p[2].message.contains("start = \"8am\""), "{all}");
    assert!(p[3].message.contains("end = \"25:00\""), "{all}");
    assert!(p[4].message.contains("min_ready = 0"), "{all}");
    assert!(p[5].message.contains("warm_up"), "{all}");
    let err = parse(Path::new("bad.toml"), &text).unwrap_err().to_string();
    assert!(
        err.starts_with("bad.toml:24: policy.period weekdays"),
        "{err}"
    );
}

#[test]
fn policy_period_rules_point_at_the_period() {
    // Period 1 (line 23) needs 5 ready with 2 base + 2 elastic; period 2
    // (line 30) crosses midnight; period 3 (line 36) overlaps period 1.
    let text = with_periods(
        "\n[[policy.period]]\nweekdays = \"mon\"\nstart = \"08:00\"\nend = \"09:00\"\nmin_ready = 5\nwarm_up = \"10m\"\n\
         \n[[policy.period]]\nweekdays = \"tue\"\nstart = \"23:00\"\nend = \"01:00\"\nmin_ready = 1\n\
         \n[[policy.period]]\nweekdays = \"mon\"\nstart = \"09:02\"\nend = \"10:00\"\nmin_ready = 1\n",
    );
    let p = problems(&text);
    let all = format!("{p:?}");
    assert_eq!(p.len(), 3, "{all}");
    assert_eq!(p[0].line, 23, "{all}");
    assert!(
        p[0].message.contains(
            "policy.periods: period 1 (08:00-09:00): min_ready 5 is more than 2 base + 2 elastic"
        ),
        "{all}"
    );
    assert_eq!(p[1].line, 30, "{all}");
    assert!(p[1].message.contains("inside one day"), "{all}");
    assert_eq!(p[2].line, 36, "{all}");
    assert!(
        p[2].message
            .contains("Mon: periods 1 and 3 overlap or are less than 5 minutes apart"),
        "{all}"
    );
}

#[test]
fn the_table_lists_the_periods_and_why_a_deadline_held() {
    let table = run_cli(&shared("period-warm-up.toml"), false).expect("simulate");
    assert!(
        table.contains("Period 1: mon-fri 08:00-09:00 UTC, min_ready 3, warm-up 10m"),
        "{table}"
    );
    assert!(
        table.contains("No scale-in of e1: period 1 keeps 3 ready and 3 are."),
        "{table}"
    );
    let table = run_cli(&shared("period-weekdays.toml"), false).expect("simulate");
    assert!(
        table.contains("Period 1: mon 08:00-10:00 UTC, min_ready 2, warm-up 15m"),
        "{table}"
    );
}

#[test]
fn weekday_names_group_runs() {
    assert_eq!(report::weekday_names(0b001_1111), "mon-fri");
    assert_eq!(report::weekday_names(0b110_0001), "mon,sat,sun");
    assert_eq!(report::weekday_names(0b101_0101), "mon,wed,fri,sun");
    assert_eq!(report::weekday_names(0b000_0011), "mon,tue");
}

fn loaded(name: &str) -> (Scenario, Outcome) {
    let path = shared(name);
    let sc = load(&path).expect("load");
    let out = replay(&path, &sc).expect("replay");
    (sc, out)
}

fn series<'a>(t: &'a crate::chart::Timeline, name: &str) -> &'a crate::chart::Series {
    t.series
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no series {name}"))
}

#[test]
fn the_timeline_follows_the_replay_rows_and_bill() {
    use crate::chart::{Axis, MarkerKind};
    use rust_decimal_macros::dec;
    let (sc, out) = loaded("seed-elastic-billing.toml");
    let t = timeline(&sc, &out, "seed.toml");
    assert_eq!(
        t.title,
        "seed: pay-as-you-go elastic resource billing example"
    );
    assert_eq!((t.start_ms, t.end_ms), (sc.start.0, sc.end.0));
    let names: Vec<&str> = t.series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, SERIES);
    // One point at the start (2 base resources ready, nothing else), then one per row.
    let sessions = series(&t, "sessions");
    assert_eq!(sessions.points.len(), out.rows.len() + 1);
    assert_eq!(sessions.points[0], (sc.start.0, dec!(0)));
    assert_eq!(series(&t, "ready").points[0], (sc.start.0, dec!(2)));
    assert_eq!(series(&t, "capacity").points[0], (sc.start.0, dec!(4)));
    for (row, p) in out.rows.iter().zip(&sessions.points[1..]) {
        assert_eq!(*p, (row.at.0, Decimal::from(row.snapshot.sessions)));
    }
    for (row, p) in out.rows.iter().zip(&series(&t, "waiting").points[1..]) {
        assert_eq!(p.1, Decimal::from(row.snapshot.waiting));
    }
    // Threshold: 85 % of the capacity, exactly.
    assert_eq!(series(&t, "threshold").points[0].1, dec!(3.4));
    let pending_max = series(&t, "pending").points.iter().map(|p| p.1).max();
    assert_eq!(pending_max, Some(dec!(2)));
    // Cost: the subscription from the start, the bill's total at the end,
    // never going down.
    let cost = series(&t, "cost");
    assert_eq!(cost.axis, Axis::Right);
    assert_eq!(cost.points.first(), Some(&(sc.start.0, dec!(92.87))));
    assert_eq!(cost.points.last(), Some(&(sc.end.0, out.bill.total)));
    assert_eq!(out.bill.total, dec!(94.48));
    assert!(cost
        .points
        .windows(2)
        .all(|w| w[0].1 <= w[1].1 && w[0].0 < w[1].0));
    // A marker per scale decision, with its reason.
    let outs: Vec<_> = out
        .decisions
        .iter()
        .filter(|d| d.action.name() == "scale_out")
        .collect();
    let out_markers: Vec<_> = t
        .markers
        .iter()
        .filter(|m| m.kind == MarkerKind::ScaleOut)
        .collect();
    assert_eq!(out_markers.len(), outs.len());
    assert_eq!(out_markers[0].at_ms, outs[0].at.0);
    assert!(out_markers[0].label.contains(&outs[0].reason.to_string()));
    assert!(
        out_markers[0].label.contains("SCALE-OUT +2"),
        "{}",
        out_markers[0].label
    );
    let ins = t
        .markers
        .iter()
        .filter(|m| m.kind == MarkerKind::ScaleIn)
        .count();
    assert_eq!(ins, 2);
}

/// Parses an HTML page as XML (the pages are well-formed XHTML with an
/// HTML5 doctype); a malformed page fails the test.
fn xhtml(page: &str) -> roxmltree::Document<'_> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    roxmltree::Document::parse_with_options(page, options).unwrap_or_else(|e| panic!("{e}: {page}"))
}

#[test]
fn pictures_leave_the_printed_output_alone() {
    for json in [false, true] {
        let path = shared("waiting-room.toml");
        let plain = run_cli(&path, json).expect("simulate");
        let run = run_with_pictures(
            &path,
            json,
            Pictures {
                html: true,
                svg: true,
            },
        )
        .expect("simulate");
        assert_eq!(run.output, plain);
        let svg = run.svg.expect("svg");
        let doc = roxmltree::Document::parse(&svg).expect("an XML document");
        assert_eq!(
            doc.root_element().attribute("data-series"),
            Some(SERIES.join(",").as_str())
        );
        // The page is well-formed too, with the chart inline, one row per
        // rejection and the bill's total.
        let html = run.html.expect("html");
        let page = xhtml(&html);
        assert_eq!(
            page.descendants().filter(|n| n.has_tag_name("svg")).count(),
            1
        );
        assert_eq!(
            page.descendants()
                .filter(|n| n.attribute("data-action") == Some("rejected"))
                .count(),
            1
        );
        let total = page
            .descendants()
            .find(|n| n.attribute("data-line") == Some("total"))
            .and_then(|n| n.last_element_child())
            .and_then(|n| n.text());
        assert_eq!(total, Some("3.41"));
        assert!(!html.contains("<script"));
    }
    let none = run_with_pictures(&shared("waiting-room.toml"), false, Pictures::default())
        .expect("simulate");
    assert_eq!((none.html, none.svg), (None, None));
}

#[test]
fn compare_refuses_other_events_and_names_the_first_difference() {
    let (a, _) = loaded("seed-elastic-billing.toml");
    let mut b = a.clone();
    b.policy.usage_threshold = 70;
    b.billing = crate::engine::billing::BaseBilling::PayAsYouGo;
    assert_eq!(difference(&a, "a.toml", &b, "b.toml"), None);
    b.events[2].at = ferry_common::UnixMillis(b.events[2].at.0 + 60_000);
    let why = difference(&a, "a.toml", &b, "b.toml").expect("a difference");
    assert!(why.starts_with("event 3 differs: a.toml line"), "{why}");
    assert!(
        why.contains("09:10:00Z s3 connects but b.toml line"),
        "{why}"
    );
    assert!(why.contains("09:11:00Z s3 connects"), "{why}");
    let mut c = a.clone();
    c.events.pop();
    let why = difference(&a, "a.toml", &c, "c.toml").expect("a difference");
    assert!(
        why.starts_with("a.toml has 1 event(s) more than c.toml, the first a.toml line"),
        "{why}"
    );
    let mut d = a.clone();
    d.end = ferry_common::UnixMillis(d.end.0 + 1000);
    assert!(
        difference(&a, "a.toml", &d, "d.toml").is_some_and(|w| w.starts_with("the periods differ"))
    );
    let mut e = a.clone();
    e.prices.currency = "EUR".into();
    assert!(difference(&a, "a.toml", &e, "e.toml").is_some_and(|w| w.contains("currencies")));
    let mut f = a;
    f.provider = Provider::Delays {
        create_ms: 0,
        release_ms: 0,
    };
    assert!(difference(&f, "f.toml", &e, "e.toml").is_some_and(|w| w.contains("[provider]")));
}

#[test]
fn compare_counts_decisions_and_the_cost_difference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = shared("waiting-room.toml");
    let b = dir.path().join("two-elastic.toml");
    let text = std::fs::read_to_string(&a).expect("read");
    let text = text
        .replace("max_elastic = 1", "max_elastic = 2")
        .replace("scale_out_step = 1", "scale_out_step = 2");
    std::fs::write(&b, text).expect("write");
    let run = compare_cli(
        &a,
        &b,
        true,
        Pictures {
            html: true,
            svg: true,
        },
    )
    .expect("compare");
    let v: serde_json::Value = serde_json::from_str(&run.output).expect("json");
    let total = |side: &str| -> Decimal {
        v[side]["cost"]["total"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("a total")
    };
    let plain = |path: &Path| -> serde_json::Value {
        serde_json::from_str(&run_cli(path, true).expect("simulate")).expect("json")
    };
    assert_eq!(v["a"]["cost"]["total"], plain(&a)["cost"]["total"]);
    assert_eq!(v["b"]["cost"]["total"], plain(&b)["cost"]["total"]);
    assert_eq!(
        v["total_difference"]
            .as_str()
            .and_then(|s| s.parse::<Decimal>().ok()),
        Some(total("b") - total("a"))
    );
    assert_eq!(v["a"]["rejected"], 1);
    assert_eq!(v["b"]["rejected"], 0);
    assert_eq!(v["b"]["resources_created"], 2);
    let svg = run.svg.expect("svg");
    let doc = roxmltree::Document::parse(&svg).expect("svg");
    let parts: Vec<_> = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("stack-part"))
        .collect();
    assert_eq!(parts.len(), 2);
    // One scale: both charts' right axes have the same ticks.
    let ticks = |part: &roxmltree::Node| -> Vec<String> {
        part.descendants()
            .filter(|n| n.attribute("class") == Some("axis axis-right"))
            .flat_map(|n| n.descendants())
            .filter(|n| n.attribute("class") == Some("tick"))
            .filter_map(|n| n.text().map(str::to_owned))
            .collect()
    };
    assert_eq!(ticks(&parts[0]), ticks(&parts[1]));
    assert!(!ticks(&parts[0]).is_empty());
    let text = compare_cli(&a, &b, false, Pictures::default()).expect("compare");
    let last = text.output.lines().last().unwrap_or_default().to_owned();
    let cells: Vec<&str> = last.split_whitespace().collect();
    assert_eq!(cells, ["total", "(CNY)", "3.41", "5.03", "+1.62"]);
    // The page holds the stack and its two charts.
    let html = run.html.expect("html");
    let svgs = xhtml(&html)
        .descendants()
        .filter(|n| n.has_tag_name("svg"))
        .count();
    assert_eq!(svgs, 3);
}
