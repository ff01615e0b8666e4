//! The pictures as an operator makes them with the real `ferryctl`:
//! `simulate --svg/--html` against the same run's JSON, `simulate
//! --compare` against the two runs' JSON totals, and `usage --format svg`
//! against a real broker's JSON report.

use std::path::{Path, PathBuf};

use ferry_broker::endpoint::REFUSAL_LINGER;
use ferry_tests::bins::bin;
use ferry_tests::harness::PATIENCE;
use ferry_tests::procs::{
    ferryctl_json, fixed_size, run, run_ok, BrokerFiles, BrokerProcess, PROCESS_SHUTDOWN_GRACE,
};
use rust_decimal::Decimal;
use serde_json::Value;

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../broker/tests/scenarios")
        .join(name)
}

fn has_class(n: &roxmltree::Node, class: &str) -> bool {
    n.attribute("class")
        .is_some_and(|c| c.split_whitespace().any(|w| w == class))
}

fn count_class(d: &roxmltree::Document, a: &str, b: &str) -> usize {
    d.descendants()
        .filter(|n| has_class(n, a) && has_class(n, b))
        .count()
}

fn svg_doc(text: &str) -> roxmltree::Document<'_> {
    roxmltree::Document::parse(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn html_doc(text: &str) -> roxmltree::Document<'_> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    roxmltree::Document::parse_with_options(text, options).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn decimal(v: &Value) -> Decimal {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a decimal: {v}"))
}

async fn simulate_json(file: &Path) -> anyhow::Result<Value> {
    let out = run_ok(
        &bin("ferryctl"),
        ["simulate".as_ref(), file.as_os_str(), "--json".as_ref()],
    )
    .await?;
    Ok(serde_json::from_str(&out)?)
}

#[tokio::test]
async fn simulate_draws_each_scenario_as_its_json_says() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    for name in [
        "seed-elastic-billing.toml",
        "cooldown-drain.toml",
        "waiting-room.toml",
        "zero-cooldown.toml",
    ] {
        let file = scenario(name);
        let (svg, html) = (tmp.path().join("t.svg"), tmp.path().join("t.html"));
        let plain = run_ok(&bin("ferryctl"), ["simulate".as_ref(), file.as_os_str()]).await?;
        let drawn = run_ok(
            &bin("ferryctl"),
            [
                "simulate".as_ref(),
                file.as_os_str(),
                "--svg".as_ref(),
                svg.as_os_str(),
                "--html".as_ref(),
                html.as_os_str(),
            ],
        )
        .await?;
        assert_eq!(drawn, plain, "{name}: the table is unchanged");
        let json = simulate_json(&file).await?;
        let decisions = json["decisions"].as_array().expect("decisions");
        let actions = |what: &str| decisions.iter().filter(|d| d["action"] == what).count();

        let svg_text = std::fs::read_to_string(&svg)?;
        let d = svg_doc(&svg_text);
        let root = d.root_element();
        assert!(has_class(&root, "ferry-chart"), "{name}");
        let series = root.attribute("data-series").unwrap_or_default();
        for s in [
            "sessions",
            "waiting",
            "capacity",
            "threshold",
            "ready",
            "pending",
            "cost",
        ] {
            assert!(series.split(',').any(|x| x == s), "{name}: {s} in {series}");
        }
        assert_eq!(
            count_class(&d, "marker", "scale-out"),
            actions("scale_out"),
            "{name}"
        );
        assert_eq!(
            count_class(&d, "marker", "scale-in"),
            actions("scale_in"),
            "{name}"
        );
        assert_eq!(
            count_class(&d, "marker", "rejected"),
            actions("rejected"),
            "{name}"
        );
        // Each scale-out marker says why, in the JSON's words.
        let reasons: Vec<&str> = decisions
            .iter()
            .zip(json["decision_reasons"].as_array().expect("reasons"))
            .filter(|(d, _)| d["action"] == "scale_out")
            .filter_map(|(_, r)| r.as_str())
            .collect();
        let titles: Vec<String> = d
            .descendants()
            .filter(|n| has_class(n, "marker") && has_class(n, "scale-out"))
            .filter_map(|n| n.children().find(|c| c.has_tag_name("title")))
            .filter_map(|t| t.text().map(str::to_owned))
            .collect();
        for (reason, title) in reasons.iter().zip(&titles) {
            assert!(title.contains(reason), "{name}: {title:?} has {reason:?}");
        }

        let html_text = std::fs::read_to_string(&html)?;
        let page = html_doc(&html_text);
        assert_eq!(
            page.descendants().filter(|n| n.has_tag_name("svg")).count(),
            1,
            "{name}"
        );
        assert_eq!(
            page.descendants()
                .filter(|n| n.has_tag_name("script"))
                .count(),
            0
        );
        let total = page
            .descendants()
            .find(|n| n.attribute("data-line") == Some("total"))
            .and_then(|n| n.last_element_child())
            .and_then(|n| n.text())
            .unwrap_or_default();
        assert_eq!(total, json["cost"]["total"], "{name}");
        let rows = |action: &str| {
            page.descendants()
                .filter(|n| n.attribute("data-action") == Some(action))
                .count()
        };
        assert_eq!(rows("scale_out"), actions("scale_out"), "{name}");
        assert_eq!(rows("scale_in"), actions("scale_in"), "{name}");
        assert_eq!(rows("rejected"), actions("rejected"), "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn simulate_compare_shows_both_policies_and_the_cost_difference() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let a = scenario("waiting-room.toml");
    let b = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/examples/waiting-room-two-elastic.toml");
    let (ja, jb) = (simulate_json(&a).await?, simulate_json(&b).await?);
    let want = decimal(&jb["cost"]["total"]) - decimal(&ja["cost"]["total"]);
    assert_ne!(
        want,
        Decimal::ZERO,
        "the example policies should cost differently"
    );

    let svg = tmp.path().join("c.svg");
    let html = tmp.path().join("c.html");
    let text = run_ok(
        &bin("ferryctl"),
        [
            "simulate".as_ref(),
            a.as_os_str(),
            "--compare".as_ref(),
            b.as_os_str(),
            "--svg".as_ref(),
            svg.as_os_str(),
            "--html".as_ref(),
            html.as_os_str(),
        ],
    )
    .await?;
    let row = |what: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("no {what} row: {text}"))[what.len()..]
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let total = row("total (CNY)");
    assert_eq!(total[0], ja["cost"]["total"], "{text}");
    assert_eq!(total[1], jb["cost"]["total"], "{text}");
    assert_eq!(
        total[2].trim_start_matches('+').parse::<Decimal>()?,
        want,
        "{text}"
    );
    let count = |j: &Value, what: &str| {
        j["decisions"]
            .as_array()
            .map_or(0, |d| d.iter().filter(|d| d["action"] == what).count())
    };
    let outs = row("scale-outs");
    assert_eq!(outs[0], count(&ja, "scale_out").to_string(), "{text}");
    assert_eq!(outs[1], count(&jb, "scale_out").to_string(), "{text}");
    let ins = row("scale-ins");
    assert_eq!(ins[0], count(&ja, "scale_in").to_string(), "{text}");
    assert_eq!(ins[1], count(&jb, "scale_in").to_string(), "{text}");

    let json = run_ok(
        &bin("ferryctl"),
        [
            "simulate".as_ref(),
            a.as_os_str(),
            "--compare".as_ref(),
            b.as_os_str(),
            "--json".as_ref(),
        ],
    )
    .await?;
    let json: Value = serde_json::from_str(&json)?;
    assert_eq!(decimal(&json["total_difference"]), want);

    // Two charts, A above B, each with its own markers.
    let svg_text = std::fs::read_to_string(&svg)?;
    let d = svg_doc(&svg_text);
    let parts: Vec<_> = d
        .descendants()
        .filter(|n| has_class(n, "stack-part"))
        .collect();
    assert_eq!(parts.len(), 2);
    for (part, j) in parts.iter().zip([&ja, &jb]) {
        let outs = part
            .descendants()
            .filter(|n| has_class(n, "marker") && has_class(n, "scale-out"))
            .count();
        assert_eq!(outs, count(j, "scale_out"));
    }
    let title = d
        .root_element()
        .children()
        .find(|n| n.has_tag_name("title"))
        .and_then(|n| n.text())
        .unwrap_or_default();
    assert!(
        title.contains(&format!("B costs {} CNY more", want.abs())),
        "{title}"
    );
    let page_text = std::fs::read_to_string(&html)?;
    let page = html_doc(&page_text);
    assert_eq!(
        page.descendants()
            .filter(|n| n.attribute("data-line") == Some("total"))
            .count(),
        2
    );

    // Other events are refused, naming the first difference.
    let other = scenario("seed-elastic-billing.toml");
    let out = run(
        &bin("ferryctl"),
        [
            "simulate".as_ref(),
            a.as_os_str(),
            "--compare".as_ref(),
            other.as_os_str(),
        ],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot be compared: the periods differ"),
        "{stderr}"
    );
    let shifted = tmp.path().join("shifted.toml");
    std::fs::write(
        &shifted,
        std::fs::read_to_string(&a)?.replace("at = \"09:40:00\"", "at = \"09:40:30\""),
    )?;
    let out = run(
        &bin("ferryctl"),
        [
            "simulate".as_ref(),
            a.as_os_str(),
            "--compare".as_ref(),
            shifted.as_os_str(),
        ],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("event 6 differs"), "{stderr}");
    assert!(stderr.contains("09:40:00Z w3 disconnects but"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_svg_draws_the_cost_per_day_the_report_gives() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let mut broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    let socket = &files.admin_socket;
    let sock = socket.to_str().unwrap_or_default();
    let publish = |name: &'static str, billing: &'static [&'static str]| {
        let mut args = vec![
            "group",
            "publish",
            "--name",
            name,
            "--region",
            "cn-hangzhou",
            "--office-network",
            "office-net-1",
            "--spec",
            "office-4c8g",
            "--image",
            "img-7",
        ];
        args.extend_from_slice(billing);
        args.extend(fixed_size("2", "2"));
        async move { ferryctl_json(socket, &args).await }
    };
    let g = publish("design", &["--billing", "subscription", "--duration", "1w"]).await?;
    assert_eq!(g["orders"][0]["amount"], "92.87", "{g}");
    publish("build", &["--billing", "pay-as-you-go"]).await?;

    // A day until a minute from now (billed so far): the publish order
    // falls on today.
    let secs = chrono::SecondsFormat::Secs;
    let now = chrono::Utc::now();
    let end = now + chrono::Duration::minutes(1);
    let to = end.to_rfc3339_opts(secs, true);
    let from = (end - chrono::Duration::days(1)).to_rfc3339_opts(secs, true);
    let out = run(
        &bin("ferryctl"),
        [
            "--socket", sock, "usage", "--from", &from, "--to", &to, "--format", "svg",
        ],
    )
    .await?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // The last day is billed so far, and said so on stderr.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "(so far: the period ends {to}; nothing later is billed)"
        )),
        "{stderr}"
    );
    let out = String::from_utf8(out.stdout)?;
    let d = svg_doc(&out);
    let root = d.root_element();
    assert!(has_class(&root, "ferry-bars"), "{out}");
    assert_eq!(root.attribute("data-series"), Some("design,build"), "{out}");
    let days: Vec<String> = (0..)
        .map(|n| end - chrono::Duration::days(1) + chrono::Duration::days(n))
        .take_while(|t| t.date_naive() <= end.date_naive())
        .map(|t| t.date_naive().to_string())
        .collect();
    let categories = root.attribute("data-categories").unwrap_or_default();
    let drawn: Vec<&str> = categories.split(',').collect();
    assert_eq!(drawn.len(), days.len(), "{categories} vs {days:?}");
    // Every bar's value is what the report of its day says.
    let bars: Vec<_> = d.descendants().filter(|n| has_class(n, "bar")).collect();
    assert_eq!(bars.len(), 2 * days.len());
    let mut sum = Decimal::ZERO;
    for bar in &bars {
        let v: Decimal = bar.attribute("data-value").unwrap_or_default().parse()?;
        sum += v;
        if bar.attribute("data-series") == Some("build") {
            // A pay-as-you-go group with no host costs nothing.
            assert_eq!(v, Decimal::ZERO);
        }
    }
    assert_eq!(sum, "92.87".parse::<Decimal>()?);
    let today = bars
        .iter()
        .find(|b| {
            b.attribute("data-series") == Some("design")
                && b.attribute("data-category")
                    .is_some_and(|c| c.starts_with(&now.date_naive().to_string()))
        })
        .and_then(|b| b.attribute("data-value"));
    assert_eq!(today, Some("92.87"), "{out}");
    // The whole period's report agrees.
    let report = ferryctl_json(
        socket,
        &[
            "usage", "--group", "design", "--from", &from, "--to", &to, "--format", "json",
        ],
    )
    .await?;
    assert_eq!(report["groups"][0]["total"], "92.87", "{report}");

    // More than a quarter of days is a usage error, said before asking.
    let out = run(
        &bin("ferryctl"),
        [
            "--socket",
            sock,
            "usage",
            "--from",
            "2026-01-01T00:00:00Z",
            "--to",
            "2026-06-01T00:00:00Z",
            "--format",
            "svg",
        ],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("at most 92 days"), "{stderr}");
    broker.daemon.signal("TERM").await?;
    let status = broker
        .daemon
        .wait(PROCESS_SHUTDOWN_GRACE + REFUSAL_LINGER + PATIENCE)
        .await?;
    assert_eq!(status.code(), Some(0), "{}", broker.daemon.log());
    Ok(())
}

/// The README's comparison picture is what the command it names makes
/// today: regenerate it with that command when this fails.
#[test]
fn the_docs_comparison_is_what_ferryctl_makes() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = tempfile::tempdir()?;
    let (svg, html) = (tmp.path().join("c.svg"), tmp.path().join("c.html"));
    let out = std::process::Command::new(bin("ferryctl"))
        .current_dir(&root)
        .args([
            "simulate",
            "broker/tests/scenarios/waiting-room.toml",
            "--compare",
            "docs/examples/waiting-room-two-elastic.toml",
        ])
        .arg("--svg")
        .arg(&svg)
        .arg("--html")
        .arg(&html)
        .output()?;
    assert!(out.status.success(), "{out:?}");
    for (made, kept) in [
        (svg, "docs/simulate-compare.svg"),
        (html, "docs/simulate-compare.html"),
    ] {
        assert_eq!(
            std::fs::read_to_string(made)?,
            std::fs::read_to_string(root.join(kept))?,
            "{kept} is out of date: run `ferryctl simulate broker/tests/scenarios/waiting-room.toml \
             --compare docs/examples/waiting-room-two-elastic.toml --svg {kept}` (and --html) \
             from the repository's root"
        );
    }
    Ok(())
}
