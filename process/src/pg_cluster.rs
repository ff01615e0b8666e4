//! A throwaway PostgreSQL cluster for tests (feature `pg-cluster`).
//!
//! [`PgCluster::start`] runs the distribution's own server programs
//! (Debian's `postgresql` package: `/usr/lib/postgresql/<version>/bin`, the
//! newest version there, or the directory in `FERRY_PG_BIN`) with
//! `std::process`; nothing is downloaded:
//!
//! * a new private temporary directory holds everything: the data directory
//!   (`data/`), the server's log (`server.log`) and the server's only
//!   listening socket (`listen_addresses = ''`, `unix_socket_directories` =
//!   that directory), so clusters never collide with each other nor with a
//!   system cluster, whatever the port number in the socket's name;
//! * `initdb` refuses to run as root: when the process is root, the server
//!   programs run as an unprivileged account (`postgres` when the package
//!   created it, else `nobody`) through `runuser`, and that account owns the
//!   directory;
//! * clients are trusted on the socket (`--auth=trust`) and connect as the
//!   superuser role [`PgCluster::user`]; [`PgCluster::create_database`]
//!   returns a libpq key/value connection string
//!   (`host=<socket dir> port=<port> user=<role> dbname=<name>`) which the
//!   `postgres`/`tokio-postgres` crates and `psql` read as "over the Unix
//!   socket in that directory";
//! * durability is the real one (`fsync` stays on): only `initdb` skips its
//!   syncs (`--no-sync`), which matters for nothing but a crash of the
//!   machine during `initdb`.
//!
//! The calls block (they run the server programs to their end): from async
//! code, call them from `spawn_blocking` or accept a short stall.
//!
//! # Nothing left running
//!
//! Each cluster has a watchdog: a small `sh` process, in its own process
//! group (so a Ctrl-C of the test run does not end it first) and ignoring
//! `SIGINT`/`SIGHUP`, that waits for end-of-file on a pipe whose only
//! writer is this process, then stops the server (`pg_ctl stop -m
//! immediate`) and removes the directory. The pipe closes when the cluster
//! is dropped, and also when this process exits in any way, killed by
//! `SIGKILL` included (the kernel closes its descriptors). So the
//! process-wide [`shared`] cluster, a static that is never dropped, does
//! not outlive its test binary; nor does a cluster whose owner was killed
//! mid-test. The watchdog is started before `initdb`, so a process killed
//! during [`PgCluster::start`] leaves nothing behind either.
//!
//! # Missing PostgreSQL
//!
//! Without the server programs, [`PgCluster::start`] fails with
//! [`PgClusterError::NotInstalled`], which names the package to install
//! (`tests/run`, the README's test command, installs it). A test may skip
//! then, except under CI ([`required`]): [`shared_or_skip`] does that.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

/// Where Debian's `postgresql-<version>` packages put their programs:
/// `<this>/<version>/bin`.
pub const DEBIAN_PG_LIB: &str = "/usr/lib/postgresql";

/// Environment variable naming the directory of `initdb`, `pg_ctl`,
/// `createdb` (instead of the newest version under [`DEBIAN_PG_LIB`]).
pub const PG_BIN_ENV: &str = "FERRY_PG_BIN";

/// The port number of every cluster: it only names the socket file in the
/// cluster's own directory (no TCP listener), so clusters never collide.
pub const PORT: u16 = 5432;

/// The superuser role created by `initdb`, which clients connect as.
pub const ROLE: &str = "ferry";

/// Accounts the server runs as when this process is root, first existing
/// one wins.
const SERVER_ACCOUNTS: [&str; 2] = ["postgres", "nobody"];

/// Longest path of a Unix socket (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How much of a failed command's output (and of the server log) an error
/// keeps: its end, where the reason is.
const OUTPUT_TAIL: usize = 2000;

/// Longest database name PostgreSQL keeps whole (NAMEDATALEN - 1).
const MAX_NAME: usize = 63;

/// The watchdog: waits for end-of-file on its stdin, then stops the server
/// and removes the directory. `$1` pg_ctl, `$2` data directory, `$3` the
/// cluster's directory, `$4` the account to run pg_ctl as (empty: as is).
const WATCHDOG: &str = r#"trap '' INT HUP
while read -r _; do :; done
if [ -f "$2/postmaster.pid" ]; then
  if [ -n "$4" ]; then
    runuser -u "$4" -- "$1" stop -D "$2" -m immediate -s
  else
    "$1" stop -D "$2" -m immediate -s
  fi
fi
rm -rf -- "$3"
"#;

/// Why a cluster could not be started or used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PgClusterError {
    /// The server programs are not on this machine.
    #[error(
        "PostgreSQL's server programs (initdb, pg_ctl) were not found in {searched}: install \
         them with `apt-get install -y postgresql` (the test command `tests/run` does), or set \
         {PG_BIN_ENV} to the directory that holds them"
    )]
    NotInstalled {
        /// Where they were looked for.
        searched: String,
    },
    /// Running as root without an unprivileged account to run the server
    /// as (`initdb` refuses root).
    #[error(
        "running as root and neither of the accounts {SERVER_ACCOUNTS:?} exists to run \
         PostgreSQL as (initdb refuses root): install the postgresql package, which creates \
         `postgres`, or run as an unprivileged user"
    )]
    NoServerAccount,
    /// A file system or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The system's error.
        source: Arc<io::Error>,
    },
    /// A server program ran and failed.
    #[error("{what} failed ({status}): {output}")]
    Failed {
        /// The command.
        what: String,
        /// How it ended.
        status: String,
        /// The end of its output (and of the server log when starting).
        output: String,
    },
    /// A database name this module does not accept.
    #[error(
        "database name {0:?} is not accepted: use 1 to {MAX_NAME} ASCII letters, digits and \
         underscores"
    )]
    InvalidName(String),
    /// The temporary directory's path is too long for a socket in it.
    #[error(
        "the socket path {} is longer than a Unix socket allows ({MAX_SOCKET_PATH} bytes): set \
         TMPDIR to a shorter directory",
        .0.display()
    )]
    SocketPathTooLong(PathBuf),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> PgClusterError {
    let what = what.into();
    move |e| PgClusterError::Io {
        what,
        source: Arc::new(e),
    }
}

/// A running throwaway cluster; stopped and removed on drop (see the
/// module documentation for what happens when the process ends first).
#[derive(Debug)]
pub struct PgCluster {
    /// `initdb`, `pg_ctl`, `createdb`, `psql` are here.
    bin: PathBuf,
    /// The temporary directory: socket, `data/`, `server.log`.
    dir: PathBuf,
    /// The data directory.
    data: PathBuf,
    /// The server's log.
    log: PathBuf,
    /// The account the server programs run as (`runuser`) when this process
    /// is root; `None`: as this process.
    account: Option<String>,
    /// Stops the server and removes `dir` once its stdin closes.
    watchdog: Child,
    /// The port: [`PORT`] until [`PgCluster::serve_tls`] moves it.
    port: AtomicU16,
}

impl PgCluster {
    /// Starts a new cluster in a new temporary directory and waits until it
    /// accepts connections.
    pub fn start() -> Result<PgCluster, PgClusterError> {
        let bin = find_bin()?;
        let account = if rustix::process::geteuid().is_root() {
            Some(server_account()?)
        } else {
            None
        };
        let dir = make_dir(account.as_deref())?;
        let data = dir.join("data");
        let watchdog = match spawn_watchdog(&bin, &data, &dir, account.as_deref()) {
            Ok(watchdog) => watchdog,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // From here on, dropping `cluster` (an error below) cleans up.
        let cluster = PgCluster {
            log: dir.join("server.log"),
            bin,
            dir,
            data,
            account,
            watchdog,
            port: AtomicU16::new(PORT),
        };
        cluster.init()?;
        cluster.restart()?;
        Ok(cluster)
    }

    /// `initdb` and the settings that keep the server on its own socket.
    fn init(&self) -> Result<(), PgClusterError> {
        let mut initdb = self.server_command("initdb");
        initdb
            .arg("--pgdata")
            .arg(&self.data)
            .arg(format!("--username={ROLE}"))
            .args(["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"]);
        run(initdb, "initdb", None)?;
        let conf = self.data.join("postgresql.conf");
        let settings = format!(
            "\n# Throwaway test cluster: no TCP listener, only the socket in its own directory.\n\
             listen_addresses = ''\n\
             unix_socket_directories = '{}'\n\
             port = {PORT}\n",
            conf_quote(&self.dir.to_string_lossy())
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| f.write_all(settings.as_bytes()))
            .map_err(io_err(format!("append settings to {}", conf.display())))
    }

    /// The directory of the server's socket (the `host` of a connection).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The port number in the socket's name (the `port` of a connection).
    pub fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }

    /// The role clients connect as (a superuser, trusted on the socket).
    pub fn user(&self) -> &str {
        ROLE
    }

    /// The directory of the PostgreSQL programs it runs (`psql` is there
    /// too).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The cluster's data directory (the working directory of its
    /// processes).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The libpq key/value connection string of database `dbname` in this
    /// cluster: `host=<socket dir> port=<port> user=<role> dbname=<name>`.
    pub fn connection_string(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user={} dbname={}",
            conninfo_quote(&self.dir.to_string_lossy()),
            self.port(),
            conninfo_quote(ROLE),
            conninfo_quote(dbname)
        )
    }

    /// Creates the new, empty database `name` and returns its connection
    /// string ([`PgCluster::connection_string`]). Fails when it exists.
    pub fn create_database(&self, name: &str) -> Result<String, PgClusterError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(PgClusterError::InvalidName(name.to_owned()));
        }
        // A client, run as this process: what it can reach, the caller can.
        let mut createdb = self.client_command("createdb");
        createdb.arg(name);
        run(createdb, &format!("createdb {name}"), None)?;
        Ok(self.connection_string(name))
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m
    /// immediate`): connections break, the next start recovers from the
    /// write-ahead log.
    pub fn stop_immediate(&self) -> Result<(), PgClusterError> {
        let mut stop = self.server_command("pg_ctl");
        stop.arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-s"]);
        run(stop, "pg_ctl stop -m immediate", None)
    }

    /// Starts the server (again, after [`PgCluster::stop_immediate`]) and
    /// waits until it accepts connections (`pg_ctl start -w`).
    pub fn restart(&self) -> Result<(), PgClusterError> {
        let mut start = self.server_command("pg_ctl");
        start
            .arg("start")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-s"]);
        run(start, "pg_ctl start", Some(&self.log))
    }

    /// Serves TCP on 127.0.0.1 too, with TLS (`ssl = on`) from the
    /// certificate and key given (PEM), on a new free port, and restarts;
    /// returns the port. The socket moves to that port number as well
    /// ([`PgCluster::connection_string`] follows).
    pub fn serve_tls(&self, cert_pem: &str, key_pem: &str) -> Result<u16, PgClusterError> {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map_err(io_err("find a free port"))?
            .port();
        for (name, text) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = self.data.join(name);
            std::fs::write(&path, text).map_err(io_err(format!("write {}", path.display())))?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(io_err(format!("set the mode of {}", path.display())))?;
            if let Some(account) = &self.account {
                let mut chown = Command::new("chown");
                chown.arg(format!("{account}:")).arg(&path);
                run(chown, &format!("chown {}", path.display()), None)?;
            }
        }
        let conf = self.data.join("postgresql.conf");
        let settings = format!(
            "\n# TLS on the loopback address.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             ssl = on\n\
             ssl_cert_file = 'server.crt'\n\
             ssl_key_file = 'server.key'\n"
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| f.write_all(settings.as_bytes()))
            .map_err(io_err(format!("append settings to {}", conf.display())))?;
        let mut stop = self.server_command("pg_ctl");
        stop.arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "-s"]);
        run(stop, "pg_ctl stop -m fast", None)?;
        self.port.store(port, Ordering::SeqCst);
        self.restart()?;
        Ok(port)
    }

    /// A server program, run as the server's account.
    fn server_command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = match &self.account {
            Some(account) => {
                let mut c = Command::new("runuser");
                c.args([OsStr::new("-u"), OsStr::new(account), OsStr::new("--")])
                    .arg(path);
                c
            }
            None => Command::new(path),
        };
        // The account may not be allowed into the caller's directory.
        command.current_dir(&self.dir).env("LC_ALL", "C");
        command
    }

    /// A client program connecting to this cluster, run as this process.
    fn client_command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command
            .env("LC_ALL", "C")
            .arg("--host")
            .arg(&self.dir)
            .arg(format!("--port={}", self.port()))
            .arg(format!("--username={ROLE}"))
            .arg("--no-password");
        command
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // End-of-file for the watchdog: it stops the server and removes the
        // directory.
        drop(self.watchdog.stdin.take());
        let _ = self.watchdog.wait();
        // The watchdog was killed by someone: do its work.
        if self.dir.exists() {
            if self.data.join("postmaster.pid").exists() {
                let _ = self.stop_immediate();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether PostgreSQL must be there: under CI (`CI` set and not empty) a
/// test that needs it fails instead of skipping.
pub fn required() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// The process-wide cluster, started by the first call; the later calls
/// return it (or the first call's error). It is never dropped: its watchdog
/// stops and removes it once the process exits, however it ends.
pub fn shared() -> Result<&'static PgCluster, PgClusterError> {
    static SHARED: OnceLock<Result<PgCluster, PgClusterError>> = OnceLock::new();
    SHARED
        .get_or_init(PgCluster::start)
        .as_ref()
        .map_err(Clone::clone)
}

/// For tests: the [`shared`] cluster, or `None` (with a note on stderr)
/// when PostgreSQL is not installed and not [`required`]. Panics on any
/// other error, and on a missing PostgreSQL under CI.
pub fn shared_or_skip() -> Option<&'static PgCluster> {
    match shared() {
        Ok(cluster) => Some(cluster),
        Err(e @ PgClusterError::NotInstalled { .. }) if !required() => {
            eprintln!("skipped (PostgreSQL is not installed and CI is not set): {e}");
            None
        }
        Err(e) => panic!("PostgreSQL test cluster: {e}"),
    }
}

/// The directory of the server programs: `FERRY_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` that has `initdb`.
fn find_bin() -> Result<PathBuf, PgClusterError> {
    let has_programs = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os(PG_BIN_ENV).filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_programs(&dir) {
            Ok(dir)
        } else {
            Err(PgClusterError::NotInstalled {
                searched: format!("{} ({PG_BIN_ENV})", dir.display()),
            })
        };
    }
    let not_installed = || PgClusterError::NotInstalled {
        searched: format!("{DEBIAN_PG_LIB}/*/bin"),
    };
    let entries = match std::fs::read_dir(DEBIAN_PG_LIB) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_installed()),
        Err(e) => return Err(io_err(format!("read {DEBIAN_PG_LIB}"))(e)),
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let version = parse_version(&entry.file_name())?;
            let bin = entry.path().join("bin");
            has_programs(&bin).then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
        .ok_or_else(not_installed)
}

/// `15` -> `[15]`, `9.6` -> `[9, 6]`; anything else is no version.
fn parse_version(name: &OsStr) -> Option<Vec<u32>> {
    name.to_str()?
        .split('.')
        .map(|part| part.parse().ok())
        .collect()
}

/// The first of [`SERVER_ACCOUNTS`] that exists.
fn server_account() -> Result<String, PgClusterError> {
    for account in SERVER_ACCOUNTS {
        let exists = Command::new("id")
            .args(["-u", account])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(io_err("run id -u"))?
            .success();
        if exists {
            return Ok(account.to_owned());
        }
    }
    Err(PgClusterError::NoServerAccount)
}

/// A new directory (mode 0700) in the temporary directory, owned by
/// `account` when given.
fn make_dir(account: Option<&str>) -> Result<PathBuf, PgClusterError> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let parent = std::env::temp_dir();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut attempt = 0;
    let dir = loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!("ferry-pg-{}-{n}-{nanos:x}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => break dir,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(e) => return Err(io_err(format!("create {}", dir.display()))(e)),
        }
    };
    let socket = dir.join(format!(".s.PGSQL.{PORT}"));
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        let _ = std::fs::remove_dir(&dir);
        return Err(PgClusterError::SocketPathTooLong(socket));
    }
    if let Some(account) = account {
        let mut chown = Command::new("chown");
        chown.arg(format!("{account}:")).arg(&dir);
        if let Err(e) = run(chown, &format!("chown {account}: {}", dir.display()), None) {
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
    }
    Ok(dir)
}

/// Starts the watchdog of the cluster in `dir` (see the module
/// documentation); its stdin is the pipe this process holds.
fn spawn_watchdog(
    bin: &Path,
    data: &Path,
    dir: &Path,
    account: Option<&str>,
) -> Result<Child, PgClusterError> {
    Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("ferry-pg-watchdog")
        .arg(bin.join("pg_ctl"))
        .arg(data)
        .arg(dir)
        .arg(account.unwrap_or(""))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(io_err("start the cluster's watchdog (sh)"))
}

/// Runs `command` to its end; a failure carries the end of its output and,
/// with `log`, of that log.
fn run(mut command: Command, what: &str, log: Option<&Path>) -> Result<(), PgClusterError> {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("run {what}")))?;
    if status.success() {
        return Ok(());
    }
    let mut output = [stdout, stderr]
        .iter()
        .map(|o| String::from_utf8_lossy(tail(o)).trim().to_owned())
        .filter(|o| !o.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    if let Some(log) = log {
        if let Ok(text) = std::fs::read(log) {
            output.push_str(&format!(
                "\nserver log {}:\n{}",
                log.display(),
                String::from_utf8_lossy(tail(&text)).trim()
            ));
        }
    }
    Err(PgClusterError::Failed {
        what: what.to_owned(),
        status: status.to_string(),
        output,
    })
}

/// The last [`OUTPUT_TAIL`] bytes of `bytes`.
fn tail(bytes: &[u8]) -> &[u8] {
    &bytes[bytes.len().saturating_sub(OUTPUT_TAIL)..]
}

/// `value` inside single quotes of `postgresql.conf`.
fn conf_quote(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "''")
}

/// `value` as a libpq connection string value: bare when it can be, else
/// single-quoted with `\` before `'` and `\`.
fn conninfo_quote(value: &str) -> String {
    let bare = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if bare {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_numerically() {
        let v = |s: &str| parse_version(OsStr::new(s));
        assert!(v("15") > v("9.6"));
        assert!(v("16") > v("15"));
        assert_eq!(v("15"), Some(vec![15]));
        assert_eq!(v("common"), None);
        assert_eq!(v(""), None);
    }

    #[test]
    fn connection_string_values_are_quoted_when_needed() {
        assert_eq!(conninfo_quote("/tmp/ferry-pg-1"), "/tmp/ferry-pg-1");
        assert_eq!(conninfo_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(conninfo_quote(r"it's\"), r"'it\'s\\'");
        assert_eq!(conninfo_quote(""), "''");
        assert_eq!(conf_quote("/tmp/it's"), "/tmp/it''s");
    }
}
