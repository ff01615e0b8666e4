//! Scale-out survives broker crashes, with the real binaries and the local
//! provisioner (each elastic host is a `ferry-agent run` process the broker
//! started). The broker is SIGKILLed at a seeded moment of each scale-out
//! (before the decision, while the host is created, or once it runs) and
//! restarted on the same state: every elastic host ends up run by exactly
//! one agent process, and once the load is gone and the group scaled in,
//! no agent process and no directory of an elastic host is left.
//!
//! The seed is printed; `FERRY_CRASH_SEED=N` replays it and
//! `FERRY_CRASH_ROUNDS=N` makes N kills instead of a few.

use std::time::Duration;

use anyhow::{bail, Context};
use ferry_broker::provision::local::LOCAL_AGENTS_DIR;
use ferry_tests::bins::bin;
use ferry_tests::harness::{crash_rounds, seeded_rng, PATIENCE};
use ferry_tests::procs::{
    agents_under, live_resources, publish_payg, wait_elastic_released, AgentProcess, BrokerFiles,
    BrokerProcess, NoLeftovers,
};
use rand::Rng;

const GROUP: &str = "el";
/// Kill-and-restart rounds in the suite (one scale-out each).
const ROUNDS: u32 = 2;
/// The latest kill after the session that causes a scale-out.
const MAX_KILL_DELAY_MS: u64 = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sigkill_during_scale_out_runs_each_elastic_host_once_and_leaks_none(
) -> anyhow::Result<()> {
    let (seed, mut rng) = seeded_rng("FERRY_CRASH_SEED", "scale-out crash")?;
    let rounds = crash_rounds(ROUNDS)?;

    let tmp = tempfile::tempdir()?;
    let mut files = BrokerFiles::init(tmp.path()).await?;
    // A host created but never registered (the kill came before its
    // agent started) is given up quickly, not after the default 30 minutes.
    files.extra_config = format!(
        "[provisioner]\nkind = \"local\"\nagent_binary = {:?}\nregister_timeout = \"3s\"\n",
        bin("ferry-agent")
    );
    let root = files.state_dir.join(LOCAL_AGENTS_DIR);
    let _cleanup = NoLeftovers(root.clone());
    let mut broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    let addr = broker.agent_addr;
    let socket = files.admin_socket.clone();
    publish_payg(
        &socket,
        GROUP,
        &[
            "--base-resources",
            "1",
            "--concurrent-sessions",
            "1",
            "--max-elastic",
            "1",
            "--usage-threshold",
            "50",
            "--scale-out-step",
            "1",
            "--max-idle",
            "1s",
            "--scale-in-cooldown",
            "1s",
        ],
    )
    .await?;
    let host = AgentProcess::start_in_group(&files, "h1", addr, Some(GROUP)).await?;
    host.wait_synced().await?;

    let mut run = 0;
    for round in 0..rounds {
        // One session on the one base host: usage 100 % > 50 %, a scale-out.
        let session = format!("s{round}");
        host.start_session(&session, "alice").await?;
        let delay = rng.random_range(0..=MAX_KILL_DELAY_MS);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let status = broker.daemon.crash().await?;
        assert_eq!(status.code(), None, "killed by a signal, not exited");
        let before = agents_under(&root);
        eprintln!(
            "round {round}: broker killed {delay} ms after the session; local agents {before:?}"
        );
        run += 1;
        broker = BrokerProcess::start(&files, addr, run).await?;
        host.wait_synced().await?;

        // The scale-out completes (or is given up and made again): one
        // elastic host, ready, run by one process.
        let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
        let ready = loop {
            let l = live_resources(&socket, GROUP).await?;
            let ready: Vec<String> = l
                .iter()
                .filter(|r| r.1 == "elastic" && r.2 == "ready" && r.3)
                .map(|r| r.0.clone())
                .collect();
            if ready.len() == 1 {
                break ready[0].clone();
            }
            if tokio::time::Instant::now() > deadline {
                bail!("seed {seed} round {round}: no elastic host became ready: {l:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let agents = agents_under(&root);
        assert_eq!(
            agents.get(&ready).map(Vec::len),
            Some(1),
            "seed {seed} round {round}: {ready} must run once: {agents:?}"
        );

        // The load goes: scale-in releases it and the provisioner deletes it.
        host.cli(&[
            "session",
            "end",
            "--session",
            &session,
            "--reason",
            "logout",
        ])
        .await?;
        wait_elastic_released(&socket, GROUP)
            .await
            .with_context(|| format!("seed {seed} round {round}"))?;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let agents = agents_under(&root);
            let dirs: Vec<String> = match std::fs::read_dir(&root) {
                Ok(d) => d
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect(),
                Err(_) => Vec::new(),
            };
            if agents.is_empty() && dirs.is_empty() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "seed {seed} round {round}: after the scale-in, local agents {agents:?} \
                     and directories {dirs:?} are left"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}
