//! Several `ferry-broker` processes sharing one PostgreSQL database, as an
//! operator runs them: one PKI (the first broker's `ferryctl pki init`,
//! copied to the others), and for each broker its own state directory,
//! admin socket and `[cluster] broker_id`, listening on `127.0.0.1:0`. A
//! broker advertises the address it listens on, so each one tells agents
//! and users its real bound port.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_process::pg_cluster::{self, PgCluster};

use crate::harness::PATIENCE;
use crate::procs::{ferryctl_json, run_ok, BrokerFiles, BrokerProcess};

/// One broker of a [`Cluster`].
pub struct Member {
    /// Its name among the brokers (`[cluster] broker_id`).
    pub id: String,
    pub files: BrokerFiles,
    /// The running process; `None` once the test stopped it for good.
    pub process: Option<BrokerProcess>,
    /// Where agents and users reach it (kept across restarts).
    pub addr: SocketAddr,
    /// Runs so far (numbers the logs and notify sockets).
    runs: u32,
}

impl Member {
    /// The running process.
    pub fn running(&self) -> anyhow::Result<&BrokerProcess> {
        self.process
            .as_ref()
            .with_context(|| format!("broker {} is not running", self.id))
    }

    /// The running process, mutably (to signal or stop it).
    pub fn running_mut(&mut self) -> anyhow::Result<&mut BrokerProcess> {
        let id = self.id.clone();
        self.process
            .as_mut()
            .with_context(|| format!("broker {id} is not running"))
    }

    /// Its logs of every run so far, oldest first.
    pub fn logs(&self) -> String {
        (0..self.runs)
            .map(|run| {
                std::fs::read_to_string(self.files.dir.join(format!("broker-{run}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Brokers `b0`, `b1`, ... on one database.
pub struct Cluster {
    pub brokers: Vec<Member>,
}

impl Cluster {
    /// Starts `n` brokers on the database at `url` (a libpq connection
    /// string) with lease time `lease` (e.g. `"3s"`), each under
    /// `dir/b<i>`, and waits for every one's READY=1.
    pub async fn start(dir: &Path, url: &str, n: usize, lease: &str) -> anyhow::Result<Cluster> {
        Cluster::start_with(dir, url, n, lease, "").await
    }

    /// As [`Cluster::start`], with `extra` TOML (e.g. a `[provisioner]`
    /// table every broker shares) at the end of each broker's config.
    pub async fn start_with(
        dir: &Path,
        url: &str,
        n: usize,
        lease: &str,
        extra: &str,
    ) -> anyhow::Result<Cluster> {
        let first = BrokerFiles::init(&dir.join("b0")).await?;
        let mut all = vec![first];
        for i in 1..n {
            let root = dir.join(format!("b{i}"));
            let pki_dir = root.join("pki");
            copy_dir(&all[0].pki_dir, &pki_dir)?;
            all.push(BrokerFiles {
                dir: root.clone(),
                pki_dir,
                state_dir: root.join("state"),
                admin_socket: root.join("admin.sock"),
                extra_config: String::new(),
            });
        }
        let mut brokers = Vec::new();
        for (i, mut files) in all.into_iter().enumerate() {
            let id = format!("b{i}");
            files.extra_config = format!(
                "\n[store]\nbackend = \"postgres\"\nurl = {url:?}\n\n\
                 [cluster]\nbroker_id = {id:?}\nlease = {lease:?}\n{extra}"
            );
            let process = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0)
                .await
                .with_context(|| format!("start broker {id}"))?;
            brokers.push(Member {
                id,
                addr: process.agent_addr,
                files,
                process: Some(process),
                runs: 1,
            });
        }
        Ok(Cluster { brokers })
    }

    /// The broker named `id`.
    pub fn member(&self, id: &str) -> anyhow::Result<&Member> {
        self.brokers
            .iter()
            .find(|m| m.id == id)
            .with_context(|| format!("no broker {id}"))
    }

    /// The broker named `id`, mutably.
    pub fn member_mut(&mut self, id: &str) -> anyhow::Result<&mut Member> {
        self.brokers
            .iter_mut()
            .find(|m| m.id == id)
            .with_context(|| format!("no broker {id}"))
    }

    /// The addresses of every broker but `id`, as an agent's `brokers`
    /// config line.
    pub fn others_line(&self, id: &str) -> String {
        let others: Vec<String> = self
            .brokers
            .iter()
            .filter(|m| m.id != id)
            .map(|m| format!("\"{}\"", m.addr))
            .collect();
        format!("brokers = [{}]\n", others.join(", "))
    }

    /// Admin sockets of the running brokers.
    pub fn admin_sockets(&self) -> Vec<PathBuf> {
        self.brokers
            .iter()
            .filter(|m| m.process.is_some())
            .map(|m| m.files.admin_socket.clone())
            .collect()
    }
}

/// A fresh database in the shared test cluster, or `None` when PostgreSQL
/// is missing and CI is not set.
pub fn database(name: &str) -> anyhow::Result<Option<(&'static PgCluster, String)>> {
    let Some(pg) = pg_cluster::shared_or_skip() else {
        return Ok(None);
    };
    let url = pg.create_database(name)?;
    Ok(Some((pg, url)))
}

/// A group's lease as the database has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// `None`: released, expired or never taken.
    pub owner: Option<String>,
    pub epoch: i64,
}

/// `psql -c SQL` on `url`, one row per line, fields split on `|`.
pub async fn psql(pg: &PgCluster, url: &str, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
    let out = run_ok(
        &pg.bin_dir().join("psql"),
        [
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ],
    )
    .await?;
    Ok(out
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('|').map(str::to_owned).collect())
        .collect())
}

/// Every group's live lease: a lease past its expiry counts as no owner.
pub async fn leases(pg: &PgCluster, url: &str) -> anyhow::Result<BTreeMap<String, Lease>> {
    let rows = psql(
        pg,
        url,
        "SELECT g.name, COALESCE(l.owner, ''), COALESCE(l.epoch, 0),
                COALESCE(l.expires_at > CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT), false)
         FROM groups g LEFT JOIN group_leases l ON l.group_num = g.num
         WHERE g.status != 'gone' ORDER BY g.name",
    )
    .await?;
    let mut out = BTreeMap::new();
    for r in rows {
        let [name, owner, epoch, live] = r.as_slice() else {
            bail!("unexpected row {r:?}");
        };
        let owner = (live == "t" && !owner.is_empty()).then(|| owner.clone());
        out.insert(
            name.clone(),
            Lease {
                owner,
                epoch: epoch.parse()?,
            },
        );
    }
    Ok(out)
}

/// Polls the leases until `done` holds of them (at most [`PATIENCE`]).
pub async fn wait_leases(
    pg: &PgCluster,
    url: &str,
    what: &str,
    done: impl Fn(&BTreeMap<String, Lease>) -> bool,
) -> anyhow::Result<BTreeMap<String, Lease>> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = leases(pg, url).await?;
        if done(&now) {
            return Ok(now);
        }
        if Instant::now() > deadline {
            bail!("{what}: not after {PATIENCE:?}; leases {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `ferryctl resources list` of the broker at `socket`: the resources its
/// agents are connected to right now.
pub async fn connected_here(socket: &Path) -> anyhow::Result<BTreeSet<String>> {
    let v = ferryctl_json(socket, &["resources", "list"]).await?;
    let list = v
        .as_array()
        .with_context(|| format!("resources list: {v}"))?;
    Ok(list
        .iter()
        .filter(|r| r["connected"] == true)
        .filter_map(|r| r["resource"].as_str().map(str::to_owned))
        .collect())
}

/// Polls until the broker at `socket` has `resource` connected.
pub async fn wait_connected(socket: &Path, resource: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if connected_here(socket).await?.contains(resource) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{resource} never connected to {}", socket.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Copies the files of directory `from` (no subdirectories) to a new
/// directory `to`, keeping their permissions.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))
                .with_context(|| format!("copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}
