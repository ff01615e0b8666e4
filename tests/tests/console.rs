//! The web console in a real browser (issue 17): headless Chromium from the
//! distribution's packages, driven over WebDriver, against a real
//! `ferry-broker` with real agents and the local provisioner.
//!
//! An operator signs in with a link from `ferryctl console login`, watches a
//! group scale out and in on its page without reloading it, drains a host
//! with the page's button, gets the policy form's problems listed, and
//! downloads the usage CSV. The pages' screenshots are written to
//! `FERRY_SCREENSHOTS` when it names a directory (the README's pictures
//! come from `FERRY_SCREENSHOTS=docs/console`), else next to the test's
//! files.
//!
//! Without Chromium and its driver these tests fail (they say which
//! packages to install); `tests/run` installs them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ferry_tests::bins::bin;
use ferry_tests::harness::PATIENCE;
use ferry_tests::procs::{ferryctl_json, publish_payg, AgentProcess, BrokerFiles, BrokerProcess};
use ferry_tests::webdriver::{self, Browser};

const GROUP: &str = "design";

/// Where the page screenshots go.
fn screenshot_dir(test_dir: &Path) -> PathBuf {
    match std::env::var_os("FERRY_SCREENSHOTS") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => test_dir.join("screenshots"),
    }
}

async fn save_screenshot(browser: &Browser, dir: &Path, name: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let png = browser.screenshot().await?;
    std::fs::write(dir.join(name), png).with_context(|| format!("write {name}"))?;
    Ok(())
}

/// A broker with the console on loopback and the local provisioner.
async fn broker_with_console(dir: &Path) -> anyhow::Result<(BrokerFiles, BrokerProcess)> {
    let mut files = BrokerFiles::init(dir).await?;
    files.extra_config = format!(
        "[provisioner]\nkind = \"local\"\nagent_binary = {:?}\nregister_timeout = \"20s\"\n\
         [console]\nlisten = \"127.0.0.1:0\"\n",
        bin("ferry-agent")
    );
    let broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    Ok((files, broker))
}

/// A fresh sign-in link from `ferryctl console login`.
async fn login_link(files: &BrokerFiles) -> anyhow::Result<String> {
    let v = ferryctl_json(&files.admin_socket, &["console", "login"]).await?;
    v["url"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no url in {v}"))
}

/// The console's address from a link.
fn console_addr(link: &str) -> anyhow::Result<std::net::SocketAddr> {
    let rest = link
        .strip_prefix("http://")
        .context("the link is http on loopback")?;
    let host = rest.split('/').next().context("host")?;
    host.parse().with_context(|| format!("address in {link}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_a_scale_out_live_drains_a_host_and_downloads_usage(
) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let shots = screenshot_dir(tmp.path());
    let (files, broker) = broker_with_console(tmp.path()).await?;
    let socket = files.admin_socket.clone();
    publish_payg(
        &socket,
        GROUP,
        &[
            "--base-resources",
            "1",
            "--concurrent-sessions",
            "2",
            "--max-elastic",
            "1",
            "--usage-threshold",
            "50",
            "--scale-out-step",
            "1",
            "--max-idle",
            "3s",
            "--scale-in-cooldown",
            "1s",
        ],
    )
    .await?;
    let host =
        AgentProcess::start_in_group(&files, "host-1", broker.agent_addr, Some(GROUP)).await?;
    host.wait_synced().await?;

    // Anyone without a session is asked to sign in.
    let link = login_link(&files).await?;
    let addr = console_addr(&link)?;
    let (status, body) = webdriver::http(addr, "GET", &format!("/groups/{GROUP}"), None).await?;
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));

    let browser = Browser::start(&tmp.path().join("downloads")).await?;
    browser
        .goto(&format!("{link}&next=/groups/{GROUP}"))
        .await?;
    let sign_in = browser.find("#sign-in button").await?;
    browser.click(&sign_in).await?;
    browser.wait_for("#live-chart", PATIENCE).await?;
    let h1 = browser.find("main h1").await?;
    assert_eq!(browser.text(&h1).await?, GROUP);
    // The live stream is open; mark the page to prove it is never reloaded.
    browser
        .wait_until(
            "return document.getElementById('live-chart').getAttribute('data-stream') === 'open'",
            PATIENCE,
        )
        .await?;
    browser
        .script("window.ferryNotReloaded = true; return true")
        .await?;
    let sessions = browser.find("#live-sessions").await?;
    assert_eq!(browser.text(&sessions).await?, "0");

    // A session on the only host: usage 50 % of 2 slots reaches the
    // threshold, and one more takes it above: scale-out.
    host.start_session("s1", "alice").await?;
    host.start_session("s2", "bob").await?;
    browser
        .wait_until(
            "return document.querySelectorAll('#live-chart .marker.scale-out').length > 0",
            3 * PATIENCE,
        )
        .await
        .context("the scale-out appears on the chart without a reload")?;
    browser
        .wait_until(
            "return document.getElementById('live-sessions').textContent === '2'",
            PATIENCE,
        )
        .await?;
    assert_eq!(
        browser
            .script("return window.ferryNotReloaded === true")
            .await?,
        serde_json::Value::Bool(true),
        "the page was reloaded"
    );
    let title = browser
        .script("return document.querySelector('#live-chart .marker.scale-out title').textContent")
        .await?;
    assert!(
        title.as_str().is_some_and(|t| t.contains("scale-out")),
        "the marker says the decision: {title}"
    );
    // The elastic host comes up and shows in the capacity.
    browser
        .wait_until(
            "return Number(document.getElementById('live-capacity').textContent) >= 4",
            3 * PATIENCE,
        )
        .await
        .context("the elastic host's slots appear live")?;
    browser
        .wait_until(
            "return document.querySelectorAll('#live-decisions li.kind-scale_out').length > 0 \
             && document.querySelectorAll('#live-table tr[data-resource^=\"design-e\"]').length > 0",
            PATIENCE,
        )
        .await
        .context("the decision and the elastic host are listed live")?;

    // Sessions end: after the idle time the elastic host is scaled in,
    // live too.
    host.cli(&["session", "end", "--session", "s1"]).await?;
    host.cli(&["session", "end", "--session", "s2"]).await?;
    browser
        .wait_until(
            "return document.querySelectorAll('#live-chart .marker.scale-in').length > 0 \
             && document.querySelectorAll('table#resources').length === 1 \
             && document.querySelectorAll('#live-table tr[data-resource^=\"design-e\"]').length === 0",
            3 * PATIENCE,
        )
        .await
        .context("the scale-in appears on the chart without a reload")?;
    assert_eq!(
        browser
            .script("return window.ferryNotReloaded === true")
            .await?,
        serde_json::Value::Bool(true)
    );
    browser.resize(1280, 1900).await?;
    save_screenshot(&browser, &shots, "group.png").await?;
    browser.resize(1280, 1000).await?;

    // Drain the host with its button: the agent is told, ferryctl sees it.
    let drain = browser
        .find("tr[data-resource='host-1'] form[action$='/drain'] button")
        .await?;
    browser.click(&drain).await?;
    let notice = browser.wait_for(".notice.ok", PATIENCE).await?;
    assert!(browser.text(&notice).await?.contains("host-1 drains"));
    let resources = ferryctl_json(&socket, &["resources", "list"]).await?;
    let draining = resources
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["resource"] == "host-1"))
        .map(|r| r["draining"].clone());
    assert_eq!(draining, Some(serde_json::Value::Bool(true)), "{resources}");
    browser
        .find("tr[data-resource='host-1'] form[action$='/undrain'] button")
        .await
        .context("the host now offers Undrain")?;

    // A policy the broker refuses: every problem is listed, nothing changes.
    let threshold = browser
        .find("#policy input[name='usage_threshold']")
        .await?;
    browser.fill(&threshold, "150").await?;
    let step = browser.find("#policy input[name='scale_out_step']").await?;
    browser.fill(&step, "0").await?;
    let submit = browser.find("#policy button").await?;
    browser.click(&submit).await?;
    browser.wait_for(".problems li", PATIENCE).await?;
    let problems = browser.find_all(".problems li").await?;
    let mut said = Vec::new();
    for p in &problems {
        said.push(browser.text(p).await?);
    }
    assert!(
        said.iter().any(|p| p.contains("usage_threshold"))
            && said.iter().any(|p| p.contains("scale_out_step")),
        "both problems are listed: {said:?}"
    );
    let typed = browser
        .script("return document.querySelector(\"#policy input[name='usage_threshold']\").value")
        .await?;
    assert_eq!(typed, "150", "the refused form shows what was typed");
    let shown = ferryctl_json(&socket, &["group", "show", GROUP]).await?;
    assert_eq!(shown["policy"]["usage_threshold"], 50, "{shown}");

    // Usage: the page, its chart, the CSV download.
    browser.goto(&format!("http://{addr}/usage")).await?;
    browser
        .find(&format!("#usage tr[data-group='{GROUP}']"))
        .await
        .context("the group's usage line")?;
    browser
        .find("#usage-chart svg")
        .await
        .context("the usage chart")?;
    save_screenshot(&browser, &shots, "usage.png").await?;
    let csv_link = browser.find("#usage-csv").await?;
    browser.click(&csv_link).await?;
    let csv = browser
        .wait_download("ferry-usage-", PATIENCE)
        .await
        .context("the CSV download")?;
    let csv = std::fs::read_to_string(&csv)?;
    let mut lines = csv.lines();
    let header = lines.next().context("a CSV header")?;
    assert!(header.starts_with("group,resource,"), "{header}");
    assert!(
        lines.any(|l| l.starts_with(&format!("{GROUP},host-1,"))),
        "the host's line: {csv}"
    );

    // The groups list and the updates page.
    browser.goto(&format!("http://{addr}/")).await?;
    let row = browser
        .find(&format!("#groups tr[data-group='{GROUP}'] td.status"))
        .await?;
    assert_eq!(browser.text(&row).await?, "published");
    save_screenshot(&browser, &shots, "groups.png").await?;
    browser.goto(&format!("http://{addr}/updates")).await?;
    browser.find("main h1").await?;
    save_screenshot(&browser, &shots, "updates.png").await?;

    // The link worked once: a second use is refused.
    browser.goto(&link).await?;
    let sign_in = browser.find("#sign-in button").await?;
    browser.click(&sign_in).await?;
    browser.wait_for("main p.message", PATIENCE).await?;
    let h1 = browser.find("main h1").await?;
    assert_eq!(browser.text(&h1).await?, "Sign in");
    let said = browser.text(&browser.find("main p").await?).await?;
    assert!(said.contains("used already"), "{said}");

    browser.quit().await?;
    for shot in ["group.png", "usage.png", "groups.png", "updates.png"] {
        let bytes = std::fs::read(shots.join(shot))?;
        if !bytes.starts_with(b"\x89PNG") {
            bail!("{shot} is not a PNG");
        }
    }
    drop(host);
    drop(broker);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_without_the_session_token_are_refused() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (files, broker) = broker_with_console(tmp.path()).await?;
    let host = AgentProcess::start(&files, "host-1", broker.agent_addr).await?;
    host.wait_synced().await?;
    let link = login_link(&files).await?;
    let addr = console_addr(&link)?;
    let browser = Browser::start(&tmp.path().join("downloads")).await?;
    browser.goto(&link).await?;
    let sign_in = browser.find("#sign-in button").await?;
    browser.click(&sign_in).await?;
    browser.wait_for("#groups", PATIENCE).await?;
    // A form posted from the signed-in browser but without the token (as
    // another site's page would): refused, the host is not drained.
    let status = browser
        .script(
            "const r = new XMLHttpRequest(); r.open('POST', '/resources/host-1/drain', false); \
             r.setRequestHeader('Content-Type', 'application/x-www-form-urlencoded'); \
             r.send('group=design'); return r.status;",
        )
        .await?;
    assert_eq!(status, 403);
    let resources = ferryctl_json(&files.admin_socket, &["resources", "list"]).await?;
    assert!(
        resources
            .as_array()
            .is_some_and(|rs| rs.iter().all(|r| r["draining"] == false)),
        "{resources}"
    );
    // Without the cookie at all: asked to sign in.
    let (status, _) = webdriver::http(addr, "POST", "/resources/host-1/drain", None).await?;
    assert_eq!(status, 401);
    browser.quit().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_off_says_how_to_turn_it_on() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let _broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    let out = ferry_tests::procs::run(
        &bin("ferryctl"),
        [
            std::ffi::OsStr::new("--socket"),
            files.admin_socket.as_os_str(),
            std::ffi::OsStr::new("console"),
            std::ffi::OsStr::new("login"),
        ],
    )
    .await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[console] listen"), "{err}");
    Ok(())
}
