//! Several `ferry-broker` processes sharing one PostgreSQL database, as an
//! operator runs them: one PKI (the first broker's `ferryctl pki init`,
//! copied to the others), and for each broker its own state directory,
//! admin socket and `[cluster] broker_id`, listening on `127.0.0.1:0`. A
//! broker advertises the address it listens on, so each one tells agents
//! and users its real bound port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::procs::{BrokerFiles, BrokerProcess};

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
                 [cluster]\nbroker_id = {id:?}\nlease = {lease:?}\n"
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
