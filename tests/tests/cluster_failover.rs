//! A group's owner SIGKILLed in the middle of its work, with three real
//! `ferry-broker` processes on one PostgreSQL database: another broker
//! takes the group (a higher lease epoch) and finishes what the dead one
//! had started, from what the database holds.
//! - An image update of three real agents, the owner killed while a host
//!   runs its (slow, logging) image hook: the new owner finishes it, the
//!   group ends `published` on the new image with every host on it, the
//!   open session warned and disconnected is ended once, and no host
//!   started or ran the image hook twice.
//! - An OTA wave (one host at a time), the owner killed while a host runs
//!   its update hook: the new owner finishes the schedule, every host is
//!   `done`, and no host started or ran the update hook twice.
//! - A scale-out through the `exec` provisioner (scripts shared by every
//!   broker that run each elastic host as a real `ferry-agent` under one
//!   shared directory and log every create and delete by resource id), the
//!   owner killed while its create script runs: the new owner does not
//!   create that resource again; the host, told to enroll with the dead
//!   broker, enrolls with another one of its `brokers` and registers with
//!   the new owner, and is the group's one elastic host, run once; once the
//!   load goes, the group scales in and every resource created was deleted
//!   exactly once, with no host process or directory left.
//! - A scale-in, the owner killed while its delete script runs (the script
//!   stops short when its broker died, as a command killed with the
//!   broker's control group would): the new owner deletes the host again,
//!   to its end, and nothing is left or created again.
//!
//! Each agent is configured with every broker, the owner first (its
//! `broker_addr`), so the owner's death sends every one of them to the
//! others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_process::pg_cluster::PgCluster;
use ferry_tests::bins::bin;
use ferry_tests::cluster::{database, wait_connected, wait_leases, Cluster, Lease};
use ferry_tests::harness::PATIENCE;
use ferry_tests::procs::{
    agents_under, ferryctl_json, live_resources, publish_payg, wait_elastic_released, AgentProcess,
    NoLeftovers,
};
use ferry_tests::rollout::{
    hooks, host_states, offer_one_at_a_time, runs, wait_run, wait_schedule_done, wait_updated,
};

/// The lease of the brokers (the shortest allowed): a dead owner's groups
/// are taken within about four seconds.
const LEASE_TOML: &str = "3s";
const LEASE: Duration = Duration::from_secs(3);

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];

/// The group of the elastic tests.
const ELASTIC: &str = "el";

/// How long each image or update hook runs: long enough that the owner is
/// killed while one runs, short enough for three hosts one after another.
const HOOK_SECS: &str = "2";

/// Three brokers, group `group` of three base hosts owned by one of them,
/// whose agents (configured with the owner first, then the others, as
/// `brokers`; hooks of [`hooks`] logging to `log`) are connected to the
/// owner and synced: when the owner dies, its agents must find another.
/// Returns the cluster, the group's lease and the agents.
async fn fleet(
    pg: &PgCluster,
    url: &str,
    dir: &Path,
    group: &str,
    log: &Path,
) -> anyhow::Result<(Cluster, Lease, Vec<AgentProcess>)> {
    let cluster = Cluster::start(dir, url, 3, LEASE_TOML).await?;
    let b0 = cluster.member("b0")?;
    publish_payg(
        &b0.files.admin_socket,
        group,
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
    let leases = wait_leases(pg, url, "the group owned", |l| {
        l.get(group).is_some_and(|l| l.owner.is_some())
    })
    .await?;
    let lease = leases[group].clone();
    let owner = lease.owner.clone().context("owned")?;
    let owner_socket = cluster.member(&owner)?.files.admin_socket.clone();
    let owner_addr = cluster.member(&owner)?.addr;
    let mut agents = Vec::new();
    for host in HOSTS {
        // `brokers` before the `[hooks]` table.
        let extra = format!(
            "{}{}",
            cluster.others_line(&owner),
            hooks(&b0.files.dir, host, log, HOOK_SECS)?
        );
        let agent =
            AgentProcess::start_configured(&b0.files, host, owner_addr, Some(group), &extra)
                .await?;
        agent.wait_synced().await?;
        wait_connected(&owner_socket, host).await?;
        agents.push(agent);
    }
    Ok((cluster, lease, agents))
}

/// SIGKILLs the broker owning a group (lease `before`) and reaps it.
async fn kill_owner(cluster: &mut Cluster, before: &Lease) -> anyhow::Result<Instant> {
    let victim = before.owner.clone().context("owned")?;
    let member = cluster.member_mut(&victim)?;
    let status = member.running_mut()?.daemon.crash().await?;
    assert_eq!(status.code(), None, "killed by a signal, not exited");
    member.process = None;
    Ok(Instant::now())
}

/// Waits until a broker other than the killed owner (lease `before`) holds
/// `group`'s lease at a higher epoch; returns that broker's admin socket.
async fn wait_heir(
    pg: &PgCluster,
    url: &str,
    cluster: &Cluster,
    group: &str,
    before: &Lease,
    killed: Instant,
) -> anyhow::Result<std::path::PathBuf> {
    let victim = before.owner.clone().context("owned")?;
    let after = wait_leases(pg, url, "taken over", |l| {
        l[group].owner.as_ref().is_some_and(|o| *o != victim) && l[group].epoch > before.epoch
    })
    .await?;
    let heir = after[group].owner.clone().context("owned")?;
    eprintln!(
        "{group}: {victim} killed, taken by {heir} {:?} later (lease {LEASE:?})",
        killed.elapsed()
    );
    Ok(cluster.member(&heir)?.files.admin_socket.clone())
}

/// One run of `word` per host.
fn once_each() -> BTreeMap<String, usize> {
    HOSTS.iter().map(|h| (h.to_string(), 1)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_update_survives_its_owners_sigkill_on_another_broker_switching_each_host_once(
) -> anyhow::Result<()> {
    let Some((pg, url)) = database("failover_image")? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let log = tmp.path().join("hooks.log");
    let group = "img";
    let (mut cluster, before, agents) = fleet(pg, &url, tmp.path(), group, &log).await?;
    let owner = before.owner.clone().context("owned")?;
    let owner_socket = cluster.member(&owner)?.files.admin_socket.clone();

    // An open session: the update warns it, then disconnects it.
    agents[0].start_session("s1", "alice").await?;
    agents[0].wait_synced().await?;
    let image = "img-8";
    ferryctl_json(
        &owner_socket,
        &["group", "update-image", group, image, "--warning", "1s"],
    )
    .await?;
    // The owner dies while a host switches.
    let switching = wait_run(&log, "switching", image).await?;
    let killed = kill_owner(&mut cluster, &before).await?;
    let finished = runs(&log, "image", image);
    eprintln!("killed while {switching} switched; switched before the kill: {finished:?}");
    assert!(
        !finished.contains_key(&switching),
        "the kill was to land while {switching} switched"
    );
    let heir_socket = wait_heir(pg, &url, &cluster, group, &before, killed).await?;

    wait_updated(&heir_socket, group, image, &HOSTS).await?;
    assert_eq!(
        runs(&log, "switching", image),
        once_each(),
        "switches started"
    );
    assert_eq!(runs(&log, "image", image), once_each(), "switches finished");
    // The session was disconnected, its end recorded once.
    for a in &agents {
        a.wait_synced().await?;
    }
    let listed = ferryctl_json(&heir_socket, &["sessions", "list", "--all"]).await?;
    let s1: Vec<_> = listed
        .as_array()
        .context("sessions")?
        .iter()
        .filter(|s| s["session"] == "s1")
        .collect();
    assert_eq!(s1.len(), 1, "{listed:#}");
    assert!(!s1[0]["ended_at"].is_null(), "{listed:#}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ota_wave_survives_its_owners_sigkill_on_another_broker_updating_each_host_once(
) -> anyhow::Result<()> {
    let Some((pg, url)) = database("failover_ota")? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let log = tmp.path().join("hooks.log");
    let group = "ota";
    let (mut cluster, before, _agents) = fleet(pg, &url, tmp.path(), group, &log).await?;
    let owner = before.owner.clone().context("owned")?;
    let owner_socket = cluster.member(&owner)?.files.admin_socket.clone();

    // One host at a time, starting a moment from now.
    let id = offer_one_at_a_time(
        &owner_socket,
        group,
        "v2",
        "failover test",
        Duration::from_millis(500),
    )
    .await?;
    let what = "app1-v2";
    // The owner dies while a host updates.
    let updating = wait_run(&log, "updating", what).await?;
    let killed = kill_owner(&mut cluster, &before).await?;
    let finished = runs(&log, "update", what);
    eprintln!("killed while {updating} updated; updated before the kill: {finished:?}");
    assert!(
        !finished.contains_key(&updating),
        "the kill was to land while {updating} updated"
    );
    let heir_socket = wait_heir(pg, &url, &cluster, group, &before, killed).await?;

    let s = wait_schedule_done(&heir_socket, group, id).await?;
    let states: Vec<(String, String)> = HOSTS
        .iter()
        .map(|h| (h.to_string(), "done".to_owned()))
        .collect();
    assert_eq!(host_states(&s)?, states, "{s:#}");
    assert_eq!(runs(&log, "updating", what), once_each(), "updates started");
    assert_eq!(runs(&log, "update", what), once_each(), "updates finished");
    Ok(())
}

/// The `[provisioner]` of every broker: `exec` scripts under `dir` that run
/// elastic hosts under `dir/hosts` and log to `dir/provision.log` (see
/// [`write_scripts`]); a host that has not registered 30 s after its
/// scale-out is given up (time for a host whose creator died to try it
/// first, then another broker).
fn provisioner_toml(dir: &Path) -> String {
    let script = |name: &str| {
        format!(
            "[\"/bin/sh\", {:?}, \"{{resource}}\"]",
            dir.join(format!("{name}.sh")).display().to_string()
        )
    };
    format!(
        "\n[provisioner]\nkind = \"exec\"\ncreate = {}\ndelete = {}\n\
         register_timeout = \"30s\"\ntimeout = \"30s\"\n",
        script("create"),
        script("delete")
    )
}

/// The provisioner's scripts, as a cloud's would be: one host per resource
/// id, whichever broker asks. `create RESOURCE` logs `create RESOURCE`,
/// takes a second (a create in progress is a moment to kill the broker
/// in), then writes the host's agent config (the broker that asked as
/// `broker_addr`, every broker in `brokers`, the enrollment token) and
/// starts `ferry-agent run` in its own session, its pid in `pid`; a host
/// already there is left as it is (a create is idempotent by resource id).
/// `delete RESOURCE` logs `delete RESOURCE`, takes two seconds, then stops
/// short (logging `abandoned RESOURCE`, failing) if the broker that ran it
/// died meanwhile, as a command killed with its broker's control group
/// would: a delete in progress is lost with its broker. Else it stops the
/// agent (SIGTERM, then SIGKILL after 5 s), removes the host's directory
/// and logs `deleted RESOURCE`; deleting what is not there succeeds.
fn write_scripts(dir: &Path, cluster: &Cluster) -> anyhow::Result<()> {
    let (log, hosts) = (dir.join("provision.log"), dir.join("hosts"));
    std::fs::create_dir_all(&hosts)?;
    let brokers: Vec<String> = cluster
        .brokers
        .iter()
        .map(|m| format!("\"{}\"", m.addr))
        .collect();
    let create = format!(
        r#"d='{hosts}'/"$1"
echo "create $1" >> '{log}'
sleep 1
if [ -e "$d" ]; then exit 0; fi
mkdir -p "$d"
cat > "$d/agent.toml" <<EOT
resource = "$1"
group = "$FERRY_GROUP"
broker_addr = "$FERRY_BROKER_ADDR"
brokers = [{brokers}]
broker_name = "localhost"
ca_cert = "$FERRY_CA_CERT"
cert = "$d/agent.pem"
key = "$d/agent-key.pem"
state_dir = "$d/state"
local_socket = "$d/agent.sock"
image_version = "$FERRY_IMAGE"
enroll_token = "$FERRY_ENROLL_TOKEN"
EOT
setsid '{agent}' --config "$d/agent.toml" run > "$d/agent.log" 2>&1 < /dev/null &
echo $! > "$d/pid"
"#,
        hosts = hosts.display(),
        log = log.display(),
        brokers = brokers.join(", "),
        agent = bin("ferry-agent").display(),
    );
    let delete = format!(
        r#"d='{hosts}'/"$1"
echo "delete $1" >> '{log}'
sleep 2
if ! kill -0 "$PPID" 2>/dev/null; then echo "abandoned $1" >> '{log}'; exit 1; fi
if [ -f "$d/pid" ]; then
  pid=$(cat "$d/pid")
  kill -TERM "$pid" 2>/dev/null
  n=0
  while kill -0 "$pid" 2>/dev/null && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
  kill -KILL "$pid" 2>/dev/null
fi
rm -rf "$d"
echo "deleted $1" >> '{log}'
"#,
        hosts = hosts.display(),
        log = log.display(),
    );
    std::fs::write(dir.join("create.sh"), create)?;
    std::fs::write(dir.join("delete.sh"), delete)?;
    Ok(())
}

/// How many times the provisioner's log says `op` (`create`, `delete`,
/// `abandoned`, `deleted`) of each resource.
fn provisioned(dir: &Path, op: &str) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(dir.join("provision.log")).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some((o, r)) = line.split_once(' ') {
            if o == op {
                *out.entry(r.to_owned()).or_default() += 1;
            }
        }
    }
    out
}

/// Polls the provisioner's log until it says `op` of some resource;
/// returns it.
async fn wait_op(dir: &Path, op: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(r) = provisioned(dir, op).into_keys().next() {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("no {op} in {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three brokers with the provisioner of [`write_scripts`] under
/// `dir/provisioner`, group `el` (one base host, one session a host,
/// scale-out above 50 %, one elastic host at most, scale-in after a second
/// idle) owned by one of them, and its base host `h1` connected to the
/// owner. Returns the cluster, the provisioner's directory, the group's
/// lease and the host.
async fn elastic_fleet(
    pg: &PgCluster,
    url: &str,
    dir: &Path,
) -> anyhow::Result<(Cluster, PathBuf, Lease, AgentProcess)> {
    let prov = dir.join("provisioner");
    std::fs::create_dir_all(&prov)?;
    let cluster = Cluster::start_with(dir, url, 3, LEASE_TOML, &provisioner_toml(&prov)).await?;
    write_scripts(&prov, &cluster)?;
    let b0 = cluster.member("b0")?;
    publish_payg(
        &b0.files.admin_socket,
        ELASTIC,
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
    let before = wait_leases(pg, url, "the group owned", |l| {
        l.get(ELASTIC).is_some_and(|l| l.owner.is_some())
    })
    .await?[ELASTIC]
        .clone();
    let owner = before.owner.clone().context("owned")?;
    let host = AgentProcess::start_configured(
        &b0.files,
        "h1",
        cluster.member(&owner)?.addr,
        Some(ELASTIC),
        &cluster.others_line(&owner),
    )
    .await?;
    host.wait_synced().await?;
    wait_connected(&cluster.member(&owner)?.files.admin_socket, "h1").await?;
    Ok((cluster, prov, before, host))
}

/// Waits until the group has one elastic host, ready and available, as the
/// broker at `socket` sees it; returns it.
async fn wait_one_ready(socket: &Path, prov: &Path) -> anyhow::Result<String> {
    let deadline = Instant::now() + 3 * PATIENCE;
    loop {
        let l = live_resources(socket, ELASTIC).await?;
        let ready: Vec<String> = l
            .iter()
            .filter(|r| r.1 == "elastic" && r.2 == "ready" && r.3)
            .map(|r| r.0.clone())
            .collect();
        if let [one] = ready.as_slice() {
            return Ok(one.clone());
        }
        if Instant::now() > deadline {
            bail!(
                "no elastic host became ready: {l:?}; created {:?}",
                provisioned(prov, "create")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After the scale-in (every elastic resource released, as the broker at
/// `socket` sees it): waits until every resource created was deleted
/// (the delete ran to its end) exactly once, and no host process or
/// directory is left.
async fn wait_nothing_left(socket: &Path, prov: &Path) -> anyhow::Result<()> {
    wait_elastic_released(socket, ELASTIC).await?;
    let hosts = prov.join("hosts");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let created = provisioned(prov, "create");
        let deleted = provisioned(prov, "deleted");
        let agents = agents_under(&hosts);
        let dirs: Vec<String> = std::fs::read_dir(&hosts)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if deleted == created && agents.is_empty() && dirs.is_empty() {
            return Ok(());
        }
        if deleted.values().any(|n| *n > 1) || Instant::now() > deadline {
            bail!(
                "after the scale-in: created {created:?}, deleted {deleted:?}, \
                 host agents {agents:?}, host directories {dirs:?}; the provisioner's log:\n{}",
                std::fs::read_to_string(prov.join("provision.log")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_out_survives_its_owners_sigkill_on_another_broker_creating_nothing_twice_and_leaking_nothing(
) -> anyhow::Result<()> {
    let Some((pg, url)) = database("failover_scale_out")? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let _cleanup = NoLeftovers(tmp.path().join("provisioner").join("hosts"));
    let (mut cluster, prov, before, host) = elastic_fleet(pg, &url, tmp.path()).await?;

    // One session on the one base host: usage 100 % > 50 %, a scale-out;
    // the owner dies while the provisioner creates the host.
    host.start_session("s1", "alice").await?;
    let first = wait_op(&prov, "create").await?;
    let killed = kill_owner(&mut cluster, &before).await?;
    eprintln!("the owner was killed while {first} was created");
    let heir_socket = wait_heir(pg, &url, &cluster, ELASTIC, &before, killed).await?;

    // The scale-out completes at the new owner: one elastic host, ready,
    // run by one process, the one being created at the kill.
    host.wait_synced().await?;
    let ready = wait_one_ready(&heir_socket, &prov).await?;
    let created = provisioned(&prov, "create");
    eprintln!("ready: {ready}; created {created:?}");
    assert!(
        created.values().all(|n| *n == 1),
        "a resource was created twice: {created:?}"
    );
    // Not given up for another: the host whose creator died joined.
    assert_eq!(ready, first, "created {created:?}");
    assert_eq!(created.len(), 1, "created {created:?}");
    let agents = agents_under(&prov.join("hosts"));
    assert_eq!(
        agents.get(&ready).map(Vec::len),
        Some(1),
        "{ready} must run once: {agents:?}"
    );

    // The load goes: the group scales in and every host created is deleted
    // once; no host process or directory is left.
    host.cli(&["session", "end", "--session", "s1", "--reason", "logout"])
        .await?;
    wait_nothing_left(&heir_socket, &prov).await?;
    assert_eq!(provisioned(&prov, "create"), created, "created again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_in_delete_lost_with_its_owner_is_made_again_by_another_broker_leaking_nothing(
) -> anyhow::Result<()> {
    let Some((pg, url)) = database("failover_scale_in")? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let _cleanup = NoLeftovers(tmp.path().join("provisioner").join("hosts"));
    let (mut cluster, prov, before, host) = elastic_fleet(pg, &url, tmp.path()).await?;
    let owner = before.owner.clone().context("owned")?;
    let owner_socket = cluster.member(&owner)?.files.admin_socket.clone();

    // A scale-out, completed by the owner.
    host.start_session("s1", "alice").await?;
    let ready = wait_one_ready(&owner_socket, &prov).await?;

    // The load goes; the owner dies while the provisioner deletes the host
    // (its delete is lost with it).
    host.cli(&["session", "end", "--session", "s1", "--reason", "logout"])
        .await?;
    let deleting = wait_op(&prov, "delete").await?;
    assert_eq!(deleting, ready);
    let killed = kill_owner(&mut cluster, &before).await?;
    eprintln!("the owner was killed while {deleting} was deleted");
    let heir_socket = wait_heir(pg, &url, &cluster, ELASTIC, &before, killed).await?;

    // The new owner deletes it: nothing is left, nothing created again.
    wait_nothing_left(&heir_socket, &prov).await?;
    assert_eq!(
        provisioned(&prov, "abandoned"),
        BTreeMap::from([(ready.clone(), 1)]),
        "the first delete was to be lost with its broker"
    );
    assert_eq!(
        provisioned(&prov, "create"),
        BTreeMap::from([(ready, 1)]),
        "created again"
    );
    Ok(())
}
