//! Rollouts watched from outside, for the tests that crash or fail over a
//! broker in the middle of one: agent hooks that log every run (so a host
//! that runs a hook twice is caught) and take a while (so a switch in
//! progress is a moment to kill a broker in), and waits on what
//! `ferryctl` shows of an image update or an OTA schedule.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::bins::bin;
use crate::harness::PATIENCE;
use crate::procs::ferryctl_json;

/// The `[hooks]` table of `resource`, whose agent lives in `homes/<resource>`
/// (as [`crate::procs::AgentProcess`] puts it). Each hook appends a line
/// `HOOK RESOURCE WHAT` to `log`; the image and update hooks first append
/// `switching RESOURCE IMAGE` or `updating RESOURCE COMPONENT-VERSION`,
/// then take `hook_secs` seconds (a `sleep` argument, e.g. `"0.3"`), then
/// log `image RESOURCE IMAGE` or `update RESOURCE COMPONENT-VERSION` (a
/// finished run). The disconnect hook ends the session through the agent.
pub fn hooks(homes: &Path, resource: &str, log: &Path, hook_secs: &str) -> anyhow::Result<String> {
    let agent = bin("ferry-agent");
    let config = homes.join(resource).join("agent.toml");
    let script = |name: &str, body: String| -> anyhow::Result<String> {
        let path = homes.join(format!("{resource}-{name}.sh"));
        std::fs::write(&path, body)?;
        // Run through sh: exec'ing a file just written could fail with ETXTBSY.
        Ok(format!("[\"/bin/sh\", {:?}]", path.display().to_string()))
    };
    let log = log.display();
    let warn = script("warn", format!("echo \"warn {resource} $2\" >> '{log}'\n"))?;
    let disconnect = script(
        "disconnect",
        format!(
            "echo \"disconnect {resource} $2\" >> '{log}'\n\
             exec '{agent}' --config '{config}' session end --session \"$2\" --reason disconnected\n",
            agent = agent.display(),
            config = config.display(),
        ),
    )?;
    let image = script(
        "image",
        format!(
            "echo \"switching {resource} $FERRY_IMAGE\" >> '{log}'\n\
             sleep {hook_secs}\necho \"image {resource} $FERRY_IMAGE\" >> '{log}'\n"
        ),
    )?;
    let update = script(
        "update",
        format!(
            "echo \"updating {resource} $FERRY_COMPONENT-$FERRY_VERSION\" >> '{log}'\n\
             sleep {hook_secs}\n\
             echo \"update {resource} $FERRY_COMPONENT-$FERRY_VERSION\" >> '{log}'\n"
        ),
    )?;
    Ok(format!(
        "[hooks]\nwarn = {warn}\ndisconnect = {disconnect}\nimage = {image}\nupdate = {update}\n"
    ))
}

/// How many times each host logged `word` for `what` in the hook log:
/// `runs(log, "image", "img-8")` counts finished image switches to `img-8`,
/// `runs(log, "switching", "img-8")` started ones.
pub fn runs(log: &Path, word: &str, what: &str) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split(' ');
        if let (Some(h), Some(host), Some(w)) = (words.next(), words.next(), words.next()) {
            if h == word && w == what {
                *out.entry(host.to_owned()).or_default() += 1;
            }
        }
    }
    out
}

/// Polls the hook log until some host logged `word` for `what` (at most
/// [`PATIENCE`]); returns that host.
pub async fn wait_run(log: &Path, word: &str, what: &str) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(host) = runs(log, word, what).into_keys().next() {
            return Ok(host);
        }
        if tokio::time::Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!("no host logged {word} {what} in {PATIENCE:?}; the log:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (at most three [`PATIENCE`]s) until `group`, asked through the
/// broker at `socket`, is `published` on `image` with each of `hosts` on
/// it; fails at once on `update-failed`.
pub async fn wait_updated(
    socket: &Path,
    group: &str,
    image: &str,
    hosts: &[&str],
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
    loop {
        let g = ferryctl_json(socket, &["group", "show", group]).await?;
        let v = &g["versions"];
        let on: Vec<(&str, &str)> = v["resources"]
            .as_array()
            .context("versions.resources")?
            .iter()
            .map(|r| {
                (
                    r["resource"].as_str().unwrap_or(""),
                    r["image_version"].as_str().unwrap_or(""),
                )
            })
            .collect();
        if g["status"] == "published"
            && g["image"] == image
            && on.len() == hosts.len()
            && on.iter().all(|(h, i)| hosts.contains(h) && *i == image)
        {
            return Ok(());
        }
        if g["status"] == "update-failed" {
            bail!("the update failed: {g:#}");
        }
        if tokio::time::Instant::now() > deadline {
            let events = ferryctl_json(socket, &["group", "events", group]).await?;
            bail!(
                "the update to {image} did not finish: status {}, image {}, hosts {on:?}\n\
                 rollouts {:#}\nevents {events:#}",
                g["status"],
                g["image"],
                g["rollouts"]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Offers `app1` at `version` to `group` through the admin socket `socket`
/// and schedules it one host at a time (1 s drain), starting `start_in`
/// from now; returns the schedule's id.
pub async fn offer_one_at_a_time(
    socket: &Path,
    group: &str,
    version: &str,
    description: &str,
    start_in: Duration,
) -> anyhow::Result<u64> {
    let offer = ferryctl_json(
        socket,
        &[
            "ota",
            "offer",
            group,
            "--component",
            "app1",
            "--version",
            version,
            "--description",
            description,
        ],
    )
    .await?;
    let update = offer[0]["id"].as_u64().context("offer id")?.to_string();
    let start = chrono::Utc::now() + chrono::Duration::from_std(start_in)?;
    let start = start.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let scheduled = ferryctl_json(
        socket,
        &[
            "ota", "schedule", group, "--update", &update, "--start", &start, "--wave", "1",
            "--drain", "1s",
        ],
    )
    .await?;
    scheduled[0]["id"].as_u64().context("schedule id")
}

/// The OTA schedule `id` of `group` in `ota history`.
pub async fn schedule(socket: &Path, group: &str, id: u64) -> anyhow::Result<serde_json::Value> {
    let history = ferryctl_json(socket, &["ota", "history", group]).await?;
    history
        .as_array()
        .context("ota history is an array")?
        .iter()
        .find(|s| s["id"] == id)
        .cloned()
        .with_context(|| format!("schedule {id} in {history:#}"))
}

/// Waits (at most three [`PATIENCE`]s) until OTA schedule `id` of `group`
/// succeeded, asked through the broker at `socket`; fails at once if it
/// failed. Returns the schedule.
pub async fn wait_schedule_done(
    socket: &Path,
    group: &str,
    id: u64,
) -> anyhow::Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
    loop {
        let s = schedule(socket, group, id).await?;
        if s["state"] == "succeeded" {
            return Ok(s);
        }
        if s["state"] == "failed" || tokio::time::Instant::now() > deadline {
            bail!("schedule {id} did not succeed: {s:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each host of an OTA schedule with its state, in the schedule's order.
pub fn host_states(s: &serde_json::Value) -> anyhow::Result<Vec<(String, String)>> {
    Ok(s["resources"]
        .as_array()
        .context("resources")?
        .iter()
        .map(|r| {
            (
                r["resource"].as_str().unwrap_or("").to_owned(),
                r["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect())
}
