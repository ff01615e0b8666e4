//! Rollouts survive broker crashes, with the real binaries: three hosts
//! whose image and update hooks take a while, and the broker SIGKILLed at a
//! seeded moment of each rollout and restarted on the same state.
//! - An image update (one open session warned and disconnected; the kill
//!   lands while warning, disconnecting, switching or confirming): the
//!   restarted broker finishes it, the group ends `published` on the new
//!   image, every host runs it, and no host ran the image hook twice.
//! - An OTA wave (one host at a time; the kill lands while draining,
//!   updating or between hosts): the restarted broker finishes the
//!   schedule, every host is `done`, and no host ran the update hook twice.
//!
//! The seed is printed; `FERRY_CRASH_SEED=N` replays it and
//! `FERRY_CRASH_ROUNDS=N` makes N kills instead of a few.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_tests::harness::{crash_rounds, seeded_rng, PATIENCE};
use ferry_tests::procs::{ferryctl_json, publish_payg, AgentProcess, BrokerFiles, BrokerProcess};
use ferry_tests::rollout::{hooks, offer_one_at_a_time, runs, schedule, wait_updated};
use rand::Rng;

const GROUP: &str = "img";
const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
/// Kill-and-restart rounds in the suite (one image update each).
const ROUNDS: u32 = 2;
/// The latest kill after the update is asked for.
const MAX_KILL_DELAY_MS: u64 = 1_800;

/// How many times each host ran the image hook for `image`.
fn switches(log: &Path, image: &str) -> BTreeMap<String, usize> {
    runs(log, "image", image)
}

/// A broker with group [`GROUP`] of three base hosts, each agent with the
/// hooks of [`hooks`] logging to `log`, all synced.
async fn fleet(
    dir: &Path,
    log: &Path,
) -> anyhow::Result<(BrokerFiles, BrokerProcess, Vec<AgentProcess>)> {
    let files = BrokerFiles::init(dir).await?;
    let broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    let addr = broker.agent_addr;
    let socket = files.admin_socket.clone();
    publish_payg(
        &socket,
        GROUP,
        &[
            "--base-resources",
            "3",
            "--concurrent-sessions",
            "2",
            "--max-elastic",
            "0",
            "--usage-threshold",
            "90",
            "--scale-out-step",
            "1",
            "--max-idle",
            "1h",
        ],
    )
    .await?;
    let mut agents = Vec::new();
    for host in HOSTS {
        let extra = hooks(dir, host, log, "0.3")?;
        let agent = AgentProcess::start_configured(&files, host, addr, Some(GROUP), &extra).await?;
        agent.wait_synced().await?;
        agents.push(agent);
    }

    Ok((files, broker, agents))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sigkill_during_an_image_update_finishes_it_switching_each_host_once(
) -> anyhow::Result<()> {
    let (seed, mut rng) = seeded_rng("FERRY_CRASH_SEED", "image update crash")?;
    let rounds = crash_rounds(ROUNDS)?;

    let tmp = tempfile::tempdir()?;
    let log = tmp.path().join("hooks.log");
    let (files, mut broker, agents) = fleet(tmp.path(), &log).await?;
    let addr = broker.agent_addr;
    let socket = files.admin_socket.clone();

    let mut run = 0;
    for round in 0..rounds {
        let image = format!("img-{}", 8 + round);
        // An open session: the update warns it, then disconnects it.
        let session = format!("s{round}");
        agents[0].start_session(&session, "alice").await?;
        agents[0].wait_synced().await?;
        ferryctl_json(
            &socket,
            &["group", "update-image", GROUP, &image, "--warning", "1s"],
        )
        .await?;
        let delay = rng.random_range(0..=MAX_KILL_DELAY_MS);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let status = broker.daemon.crash().await?;
        assert_eq!(status.code(), None, "killed by a signal, not exited");
        eprintln!(
            "round {round}: broker killed {delay} ms into the update to {image}; switched so far {:?}",
            switches(&log, &image)
        );
        run += 1;
        broker = BrokerProcess::start(&files, addr, run).await?;

        wait_updated(&socket, GROUP, &image, &HOSTS)
            .await
            .with_context(|| format!("seed {seed} round {round}"))?;
        let done = switches(&log, &image);
        let want: BTreeMap<String, usize> = HOSTS.iter().map(|h| (h.to_string(), 1)).collect();
        assert_eq!(
            done, want,
            "seed {seed} round {round}: image hook runs per host"
        );
        // The session was disconnected, its end recorded once.
        for a in &agents {
            a.wait_synced().await?;
        }
        let listed = ferryctl_json(&socket, &["sessions", "list", "--all"]).await?;
        let ended: Vec<_> = listed
            .as_array()
            .context("sessions")?
            .iter()
            .filter(|s| s["session"] == session.as_str())
            .collect();
        assert_eq!(ended.len(), 1, "seed {seed}: {listed:#}");
        assert!(!ended[0]["ended_at"].is_null(), "seed {seed}: {listed:#}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sigkill_during_an_ota_wave_finishes_it_updating_each_host_once(
) -> anyhow::Result<()> {
    let (seed, mut rng) = seeded_rng("FERRY_CRASH_SEED", "OTA crash")?;
    let rounds = crash_rounds(ROUNDS)?;

    let tmp = tempfile::tempdir()?;
    let log = tmp.path().join("hooks.log");
    let (files, mut broker, _agents) = fleet(tmp.path(), &log).await?;
    let addr = broker.agent_addr;
    let socket = files.admin_socket.clone();

    let mut run = 0;
    for round in 0..rounds {
        let version = format!("v{round}");
        // One host at a time, starting a moment from now.
        let id = offer_one_at_a_time(
            &socket,
            GROUP,
            &version,
            "crash test",
            Duration::from_millis(1_000),
        )
        .await?;
        // From before the start (a broker restarted as it comes) to the last host.
        let delay = 500 + rng.random_range(0..=MAX_KILL_DELAY_MS + 500);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let status = broker.daemon.crash().await?;
        assert_eq!(status.code(), None, "killed by a signal, not exited");
        let what = format!("app1-{version}");
        eprintln!(
            "round {round}: broker killed {delay} ms after scheduling {what}; updated so far {:?}",
            runs(&log, "update", &what)
        );
        run += 1;
        broker = BrokerProcess::start(&files, addr, run).await?;

        let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
        let s = loop {
            let s = schedule(&socket, GROUP, id).await?;
            if s["state"] == "succeeded" {
                break s;
            }
            if s["state"] == "failed" || tokio::time::Instant::now() > deadline {
                bail!("seed {seed} round {round}: schedule {id} did not succeed: {s:#}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let states: Vec<(&str, &str)> = s["resources"]
            .as_array()
            .context("resources")?
            .iter()
            .map(|r| {
                (
                    r["resource"].as_str().unwrap_or(""),
                    r["state"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            states,
            [("h1", "done"), ("h2", "done"), ("h3", "done")],
            "seed {seed} round {round}: {s:#}"
        );
        let want: BTreeMap<String, usize> = HOSTS.iter().map(|h| (h.to_string(), 1)).collect();
        assert_eq!(
            runs(&log, "update", &what),
            want,
            "seed {seed} round {round}: update hook runs per host"
        );
    }
    Ok(())
}
