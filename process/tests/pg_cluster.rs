//! The throwaway PostgreSQL cluster (feature `pg-cluster`): it serves
//! databases over its own socket, survives an immediate stop, and leaves no
//! process nor directory behind, whether dropped or its process killed.
//!
//! Without PostgreSQL installed these tests skip, except under CI
//! (`pg_cluster::required`), where they fail.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_process::pg_cluster::{self, PgCluster, PgClusterError};
use rustix::process::{kill_process, kill_process_group, Pid, Signal};

/// Bounded wait for what happens after a process is gone.
const PATIENCE: Duration = Duration::from_secs(60);

/// A new cluster, or `None` when PostgreSQL is missing and not required.
fn start_or_skip() -> Option<PgCluster> {
    match PgCluster::start() {
        Err(e @ PgClusterError::NotInstalled { .. }) if !pg_cluster::required() => {
            eprintln!("skipped: {e}");
            None
        }
        other => Some(other.expect("start a cluster")),
    }
}

/// `psql -c sql` on `conn`: its trimmed output, or its error text.
fn psql(cluster: &PgCluster, conn: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(cluster.bin_dir().join("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conn,
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The pid in a data directory's `postmaster.pid`.
fn postmaster_pid(data: &Path) -> u32 {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).expect("read postmaster.pid");
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("a pid on the first line of postmaster.pid")
}

/// Processes whose working directory is `data` (every PostgreSQL server
/// process of that cluster works there), or `pid` itself.
fn cluster_processes(data: &Path, pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next())
            == Some("Z");
        if zombie || stat.is_empty() {
            continue;
        }
        // A removed directory reads as "<path> (deleted)".
        let in_data = std::fs::read_link(entry.path().join("cwd"))
            .is_ok_and(|cwd| cwd.to_string_lossy().starts_with(&*data.to_string_lossy()));
        if in_data || p == pid {
            found.push(p);
        }
    }
    found
}

/// Waits until no process of the cluster runs and `dir` is gone.
fn wait_gone(dir: &Path, data: &Path, pid: u32) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = cluster_processes(data, pid);
        if left.is_empty() && !dir.exists() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {PATIENCE:?}, processes {left:?} of the cluster still run or {} still exists",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_cluster_serves_databases_on_its_socket_survives_an_immediate_stop_and_is_removed_on_drop() {
    let Some(cluster) = start_or_skip() else {
        return;
    };
    assert_eq!(cluster.port(), 5432);
    assert_eq!(cluster.user(), "ferry");
    assert!(cluster.socket_dir().join(".s.PGSQL.5432").exists());

    let alpha = cluster.create_database("alpha").expect("create alpha");
    let beta = cluster.create_database("beta").expect("create beta");
    assert_eq!(
        alpha,
        format!(
            "host={} port=5432 user=ferry dbname=alpha",
            cluster.socket_dir().display()
        )
    );
    assert_eq!(psql(&cluster, &alpha, "select 1").as_deref(), Ok("1"));
    assert_eq!(
        psql(&cluster, &alpha, "select current_database()").as_deref(),
        Ok("alpha")
    );
    assert_eq!(
        psql(&cluster, &beta, "select current_database()").as_deref(),
        Ok("beta")
    );
    assert!(matches!(
        cluster.create_database("alpha"),
        Err(PgClusterError::Failed { .. })
    ));
    assert!(matches!(
        cluster.create_database("no-dashes"),
        Err(PgClusterError::InvalidName(_))
    ));
    // Real durability, and no TCP listener.
    assert_eq!(psql(&cluster, &alpha, "show fsync").as_deref(), Ok("on"));
    assert_eq!(
        psql(&cluster, &alpha, "show listen_addresses").as_deref(),
        Ok("")
    );

    // An immediate stop is a crash: a committed row is there after the restart.
    psql(
        &cluster,
        &alpha,
        "create table t (v int); insert into t values (42)",
    )
    .expect("write a row");
    let first = postmaster_pid(cluster.data_dir());
    cluster.stop_immediate().expect("stop");
    assert!(psql(&cluster, &alpha, "select 1").is_err());
    assert!(cluster_processes(cluster.data_dir(), first).is_empty());
    cluster.restart().expect("restart");
    assert_eq!(
        psql(&cluster, &alpha, "select v from t").as_deref(),
        Ok("42")
    );

    let (dir, data) = (
        cluster.socket_dir().to_owned(),
        cluster.data_dir().to_owned(),
    );
    let pid = postmaster_pid(&data);
    assert!(!cluster_processes(&data, pid).is_empty());
    drop(cluster);
    // Drop waits for the stop: nothing to wait for afterwards.
    assert_eq!(cluster_processes(&data, pid), Vec::<u32>::new());
    assert!(!dir.exists(), "{} is left", dir.display());
}

#[test]
fn two_clusters_run_side_by_side_with_the_same_port_number() {
    let (Some(one), Some(two)) = (start_or_skip(), start_or_skip()) else {
        return;
    };
    assert_ne!(one.socket_dir(), two.socket_dir());
    let a = one.create_database("same").expect("create in one");
    let b = two.create_database("same").expect("create in two");
    psql(&one, &a, "create table only_in_one (v int)").expect("create table");
    assert_eq!(
        psql(
            &one,
            &a,
            "select count(*) from pg_tables where tablename = 'only_in_one'"
        )
        .as_deref(),
        Ok("1")
    );
    assert_eq!(
        psql(
            &two,
            &b,
            "select count(*) from pg_tables where tablename = 'only_in_one'"
        )
        .as_deref(),
        Ok("0")
    );
}

/// Set in the child process of the tests below: the test named by the
/// child's command line then only holds the shared cluster.
const CHILD_ENV: &str = "FERRY_PG_CLUSTER_TEST_CHILD";

/// In the child: starts the shared cluster, says where on stdout, and waits
/// for its stdin to close (the parent kills it first).
fn hold_shared_cluster() {
    let said = match pg_cluster::shared_or_skip() {
        Some(cluster) => format!(
            "\ncluster dir={} data={}\n",
            cluster.socket_dir().display(),
            cluster.data_dir().display()
        ),
        None => "\ncluster skipped\n".to_owned(),
    };
    // On a line of its own (the harness has begun one), and not by
    // println!, which the harness may capture.
    let mut stdout = std::io::stdout();
    stdout.write_all(said.as_bytes()).expect("write stdout");
    stdout.flush().expect("flush stdout");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// Runs this test binary's test `name` as a child holding the shared
/// cluster (in a process group of its own when `own_group`), has it ended
/// by `end`, and checks that the cluster's processes and directory go.
fn shared_cluster_goes_with_its_process(name: &str, own_group: bool, end: impl FnOnce(&Child)) {
    let exe = std::env::current_exe().expect("current exe");
    let mut command = Command::new(exe);
    command
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if own_group {
        command.process_group(0);
    }
    let mut child = command.spawn().expect("start the child test process");
    // Its line about the cluster, read by a thread so the wait is bounded
    // (a child that ends or is killed ends the read).
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let line = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("cluster "));
        let _ = tx.send(line);
    });
    let said = match rx.recv_timeout(PATIENCE) {
        Ok(Some(line)) if line == "cluster skipped" => {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        Ok(Some(line)) => line,
        Ok(None) | Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child did not say where its shared cluster is within {PATIENCE:?}");
        }
    };
    let (dir, data) = said
        .strip_prefix("cluster dir=")
        .and_then(|rest| rest.split_once(" data="))
        .expect("cluster dir=... data=...");
    let (dir, data) = (PathBuf::from(dir), PathBuf::from(data));
    let pid = postmaster_pid(&data);
    assert!(
        !cluster_processes(&data, pid).is_empty(),
        "the child's cluster runs"
    );

    end(&child);
    let status = child.wait().expect("reap the child");
    assert!(!status.success(), "the child was ended by a signal");
    wait_gone(&dir, &data, pid);
}

#[test]
fn the_shared_cluster_is_removed_when_its_process_is_killed() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return hold_shared_cluster();
    }
    shared_cluster_goes_with_its_process(
        "the_shared_cluster_is_removed_when_its_process_is_killed",
        false,
        |child| kill_process(Pid::from_child(child), Signal::KILL).expect("SIGKILL the child"),
    );
}

/// A Ctrl-C reaches the whole foreground process group: the watchdog is
/// in none of the test's groups, and ignores SIGINT anyway.
#[test]
fn the_shared_cluster_is_removed_after_a_ctrl_c_of_its_process_group() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return hold_shared_cluster();
    }
    shared_cluster_goes_with_its_process(
        "the_shared_cluster_is_removed_after_a_ctrl_c_of_its_process_group",
        true,
        |child| {
            kill_process_group(Pid::from_child(child), Signal::INT)
                .expect("SIGINT the child's process group")
        },
    );
}
