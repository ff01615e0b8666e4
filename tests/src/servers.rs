//! Real streaming servers in front of Ferry, for the PAM tests: throwaway
//! Unix users, the PAM files shipped in `packaging/pam/`, OpenSSH's `sshd`
//! and `xrdp` on loopback high ports, a virtual X display for `xfreerdp`,
//! and `pamtester`.
//!
//! Each server runs in a private mount namespace where the shipped PAM file
//! (with the test's agent binary and socket in place of
//! `/usr/bin/ferry-agent`) is bind-mounted over the system's
//! `/etc/pam.d/<service>`: the real service name and the real stack, for
//! that server only; the machine's own files are never changed.
//!
//! Everything comes from the distribution's packages (`openssh-server`,
//! `openssh-client`, `xrdp`, `freerdp2-x11`, `xvfb`, `pamtester`), which
//! the README's test command installs; without them, or without root (the
//! users, the mounts, the servers), the tests fail and say so.

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::bins::bin;
use crate::harness::PATIENCE;
use crate::procs::{private_mounts, Daemon, Launch, Mount, StderrTo};

pub const SSHD: &str = "/usr/sbin/sshd";
pub const SSH: &str = "/usr/bin/ssh";
pub const SSH_KEYGEN: &str = "/usr/bin/ssh-keygen";
pub const XRDP: &str = "/usr/sbin/xrdp";
pub const XRDP_SESMAN: &str = "/usr/sbin/xrdp-sesman";
pub const XFREERDP: &str = "/usr/bin/xfreerdp";
pub const XVFB: &str = "/usr/bin/Xvfb";
pub const PAMTESTER: &str = "/usr/bin/pamtester";

/// Root, and each `(program, package)`: or a failure naming what is
/// missing.
pub fn require(programs: &[(&str, &str)]) {
    let uid = std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid());
    assert_eq!(
        uid, 0,
        "the PAM tests create Unix users, mount PAM files in private mount namespaces and run \
         sshd and xrdp: they need root (CI runs as root)"
    );
    let missing: Vec<&str> = programs
        .iter()
        .filter(|(program, _)| !Path::new(program).is_file())
        .map(|(_, package)| *package)
        .collect();
    assert!(
        missing.is_empty(),
        "missing the distribution's packages {missing:?}: tests/run installs them (apt-get \
         install -y {})",
        missing.join(" ")
    );
}

/// A Unix user that exists for one test: created with a home directory,
/// removed (with its processes and home) when dropped. Its name is also a
/// valid Ferry user id: PAM checks a ticket's user against the login name.
pub struct UnixUser {
    pub name: String,
}

impl UnixUser {
    pub fn create() -> anyhow::Result<UnixUser> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "fyt{}x{}",
            std::process::id() % 1_000_000,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let out = std::process::Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", "--comment"])
            .arg("Ferry test user")
            .arg(&name)
            .output()
            .context("run useradd")?;
        if !out.status.success() {
            bail!(
                "useradd {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(UnixUser { name })
    }
}

impl Drop for UnixUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-u", &self.name])
            .status();
        match std::process::Command::new("userdel")
            .args(["--remove", "--force", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "userdel {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("userdel {}: {e}", self.name),
        }
    }
}

/// The PAM file `packaging/pam/<example>` as the test runs it: the agent
/// at its built path, talking to the agent at `socket`.
pub fn pam_stack(example: &str, socket: &Path) -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/pam")
        .join(example);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let shipped = "/usr/bin/ferry-agent pam";
    if !text.contains(shipped) {
        bail!("{} does not run `{shipped}`", path.display());
    }
    let agent = bin("ferry-agent");
    Ok(text.replace(
        shipped,
        &format!("{} --socket {} pam", agent.display(), socket.display()),
    ))
}

/// A loopback port nobody listens on now (the server binds it next).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Polls `check` every 50 ms until it holds, failing after [`PATIENCE`]
/// with `what`. For servers whose only readiness signal is a port or a log.
pub async fn wait_for<F: FnMut() -> bool>(what: &str, mut check: F) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: not within {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn listening(port: u16) -> bool {
    ["127.0.0.1", "[::1]"].iter().any(|host| {
        format!("{host}:{port}")
            .parse()
            .ok()
            .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).ok())
            .is_some()
    })
}

/// OpenSSH's `sshd` on a loopback port, with the shipped `sshd` PAM file.
pub struct Sshd {
    pub daemon: Daemon,
    pub port: u16,
}

impl Sshd {
    pub async fn start(dir: &Path, agent_socket: &Path) -> anyhow::Result<Sshd> {
        std::fs::create_dir_all(dir)?;
        // The privilege-separation directory the package's service makes.
        std::fs::create_dir_all("/run/sshd")?;
        std::fs::set_permissions("/run/sshd", std::fs::Permissions::from_mode(0o755))?;
        let key = dir.join("host_key");
        if !key.exists() {
            let out = std::process::Command::new(SSH_KEYGEN)
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&key)
                .output()
                .context("run ssh-keygen")?;
            if !out.status.success() {
                bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let pam = dir.join("pam-sshd");
        std::fs::write(&pam, pam_stack("sshd", agent_socket)?)?;
        let mut last = String::new();
        for attempt in 0..3 {
            let port = free_port()?;
            let config = dir.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {key}\nPidFile {pid}\n\
                     UsePAM yes\nKbdInteractiveAuthentication yes\nPasswordAuthentication yes\n\
                     PubkeyAuthentication no\nPermitRootLogin no\nStrictModes no\n\
                     AuthorizedKeysFile none\nUseDNS no\nPrintMotd no\nLogLevel VERBOSE\n",
                    key = key.display(),
                    pid = dir.join("sshd.pid").display(),
                ),
            )?;
            let mut cmd = Command::new(SSHD);
            cmd.args(["-D", "-e", "-f"]).arg(&config);
            let launch = Launch {
                stderr: StderrTo::Pipe,
                wrap: private_mounts(&[Mount::Bind(&pam, Path::new("/etc/pam.d/sshd"))]),
                ..Launch::default()
            };
            let log = dir.join(format!("sshd-{attempt}.log"));
            let (daemon, pipe) = Daemon::launch("sshd", cmd, &log, &launch)?;
            let pipe = pipe.context("sshd's stderr")?;
            let mut lines = BufReader::new(pipe).lines();
            let ready = format!("Server listening on 127.0.0.1 port {port}");
            let mut seen = String::new();
            let up = tokio::time::timeout(PATIENCE, async {
                while let Ok(Some(line)) = lines.next_line().await {
                    seen.push_str(&line);
                    seen.push('\n');
                    if line.contains(&ready) {
                        return true;
                    }
                }
                false
            })
            .await
            .unwrap_or(false);
            // The rest of its log goes to the file, so the pipe never fills.
            let log_path = log.clone();
            let head = seen.clone();
            tokio::spawn(async move {
                let Ok(mut file) = tokio::fs::File::create(&log_path).await else {
                    return;
                };
                let _ = file.write_all(head.as_bytes()).await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = file.write_all(format!("{line}\n").as_bytes()).await;
                }
            });
            if up {
                return Ok(Sshd { daemon, port });
            }
            last = seen;
        }
        bail!("sshd did not start listening:\n{last}")
    }

    /// What sshd logged so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

/// `ssh USER@127.0.0.1 -p PORT COMMAND` with `password` answered through
/// `SSH_ASKPASS` (a file of mode 0600 read by a small script, never on a
/// command line); its standard streams are the caller's to set.
pub fn ssh_command(
    dir: &Path,
    port: u16,
    user: &str,
    password: &str,
    command: &[&str],
) -> anyhow::Result<Command> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let secret = dir.join(format!("askpass-{n}.secret"));
    std::fs::write(&secret, format!("{password}\n"))?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
    let script = dir.join(format!("askpass-{n}.sh"));
    std::fs::write(
        &script,
        format!("#!/bin/sh\nexec cat {}\n", secret.display()),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700))?;
    let mut cmd = Command::new(SSH);
    cmd.args(ssh_options(port))
        .arg(format!("{user}@127.0.0.1"))
        .args(command)
        .env("SSH_ASKPASS", &script)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .kill_on_drop(true);
    Ok(cmd)
}

/// [`ssh_command`] run to its end with no input; its output.
pub async fn ssh_with_password(
    dir: &Path,
    port: u16,
    user: &str,
    password: &str,
    command: &[&str],
) -> anyhow::Result<Output> {
    let mut cmd = ssh_command(dir, port, user, password, command)?;
    cmd.stdin(Stdio::null());
    let out = tokio::time::timeout(PATIENCE, cmd.output())
        .await
        .context("ssh did not finish")?
        .context("run ssh")?;
    Ok(out)
}

/// The client options of the tests' ssh runs: a throwaway host key, a
/// password (keyboard-interactive through PAM) asked once.
pub fn ssh_options(port: u16) -> Vec<String> {
    [
        "-p".to_owned(),
        port.to_string(),
        "-o".into(),
        "StrictHostKeyChecking=no".into(),
        "-o".into(),
        "UserKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
        "-o".into(),
        "PreferredAuthentications=keyboard-interactive,password".into(),
        "-o".into(),
        "NumberOfPasswordPrompts=1".into(),
    ]
    .into()
}

/// A virtual X display (`Xvfb`) for `xfreerdp`, which opens one even to
/// authenticate only.
pub struct Xvfb {
    _child: Child,
    pub display: String,
}

impl Xvfb {
    pub async fn start() -> anyhow::Result<Xvfb> {
        let mut child = Command::new(XVFB)
            .args([
                "-displayfd",
                "1",
                "-nolisten",
                "tcp",
                "-screen",
                "0",
                "640x480x24",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start Xvfb")?;
        let out = child.stdout.take().context("Xvfb's stdout")?;
        let mut lines = BufReader::new(out).lines();
        // Xvfb writes the display number once it accepts clients.
        let number = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .context("Xvfb never said its display")??
            .context("Xvfb exited before saying its display")?;
        let number: u32 = number.trim().parse().context("Xvfb's display number")?;
        Ok(Xvfb {
            _child: child,
            display: format!(":{number}"),
        })
    }
}

/// `xrdp` and its session manager on loopback ports, with the shipped
/// `xrdp-sesman` PAM file. No X server for sessions is installed: a login
/// is authenticated and its PAM session opened, then sesman gives up on
/// the display and its session process exits without closing PAM (the
/// agent's sweep closes it).
pub struct Xrdp {
    _sesman: Daemon,
    _xrdp: Daemon,
    pub port: u16,
    pub sesman_log: PathBuf,
    xrdp_log: PathBuf,
}

impl Xrdp {
    pub async fn start(dir: &Path, agent_socket: &Path) -> anyhow::Result<Xrdp> {
        std::fs::create_dir_all(dir)?;
        let pam = dir.join("pam-xrdp-sesman");
        std::fs::write(&pam, pam_stack("xrdp-sesman", agent_socket)?)?;
        let port = free_port()?;
        let sesman_port = free_port()?;
        let sesman_log = dir.join("xrdp-sesman.log");
        // The package's file with the first line of each key given replaced
        // (`port=` comes again in the session sections, which must stay).
        let ini = |name: &str, edit: &dyn Fn(&str) -> Option<String>| -> anyhow::Result<PathBuf> {
            let text = std::fs::read_to_string(Path::new("/etc/xrdp").join(name))
                .with_context(|| format!("read /etc/xrdp/{name}"))?;
            let mut done = std::collections::BTreeSet::new();
            let out: String = text
                .lines()
                .map(|l| {
                    let key = l.split('=').next().unwrap_or_default().to_owned();
                    match edit(l) {
                        Some(new) if done.insert(key) => new + "\n",
                        _ => format!("{l}\n"),
                    }
                })
                .collect();
            let path = dir.join(name);
            std::fs::write(&path, out)?;
            Ok(path)
        };
        let xrdp_log = dir.join("xrdp.log");
        let xrdp_ini = ini("xrdp.ini", &|l| {
            if l.starts_with("port=") {
                Some(format!("port=tcp://.:{port}"))
            } else if l.starts_with("LogFile=") {
                Some(format!("LogFile={}", xrdp_log.display()))
            } else {
                None
            }
        })?;
        let sesman_ini = ini("sesman.ini", &|l| {
            if l.starts_with("ListenPort=") {
                Some(format!("ListenPort={sesman_port}"))
            } else if l.starts_with("LogFile=") {
                Some(format!("LogFile={}", sesman_log.display()))
            } else {
                None
            }
        })?;
        // Both read the session manager's port from /etc/xrdp/sesman.ini;
        // their pid files go to a private /run/xrdp.
        let run_dir = Path::new("/run/xrdp");
        std::fs::create_dir_all(run_dir)?;
        let etc_sesman = Path::new("/etc/xrdp/sesman.ini");
        let mut cmd = Command::new(XRDP_SESMAN);
        cmd.args(["-n", "-c"]).arg(&sesman_ini);
        let launch = Launch {
            wrap: private_mounts(&[
                Mount::Bind(&sesman_ini, etc_sesman),
                Mount::Bind(&pam, Path::new("/etc/pam.d/xrdp-sesman")),
                Mount::Tmpfs {
                    dir: run_dir,
                    size: "16m",
                    mode: "0755",
                    subdirs: &["sockdir"],
                },
            ]),
            ..Launch::default()
        };
        let (sesman, _) =
            Daemon::launch("xrdp-sesman", cmd, &dir.join("xrdp-sesman.out"), &launch)?;
        wait_for("xrdp-sesman listening", || listening(sesman_port)).await?;
        let mut cmd = Command::new(XRDP);
        cmd.args(["-n", "-c"]).arg(&xrdp_ini);
        let launch = Launch {
            wrap: private_mounts(&[
                Mount::Bind(&sesman_ini, etc_sesman),
                Mount::Tmpfs {
                    dir: run_dir,
                    size: "16m",
                    mode: "0755",
                    subdirs: &["sockdir"],
                },
            ]),
            ..Launch::default()
        };
        let (xrdp, _) = Daemon::launch("xrdp", cmd, &dir.join("xrdp.out"), &launch)?;
        wait_for("xrdp listening", || listening(port)).await?;
        Ok(Xrdp {
            _sesman: sesman,
            _xrdp: xrdp,
            port,
            sesman_log,
            xrdp_log,
        })
    }

    /// The session manager's log so far.
    pub fn sesman_log(&self) -> String {
        std::fs::read_to_string(&self.sesman_log).unwrap_or_default()
    }

    /// Both servers' logs so far, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "xrdp-sesman:\n{}\nxrdp:\n{}",
            self.sesman_log(),
            std::fs::read_to_string(&self.xrdp_log).unwrap_or_default()
        )
    }

    /// How many of `user`'s logins the session manager refused so far.
    pub fn refusals(&self, user: &str) -> usize {
        let needle = format!("AUTHFAIL: user={user} ");
        self.sesman_log().matches(&needle).count()
    }
}

/// `xfreerdp /auth-only` to `port` as `user`, the password on its standard
/// input (`/from-stdin:force`), on `display`; returns its output.
pub async fn xfreerdp_auth_only(
    home: &Path,
    display: &str,
    port: u16,
    user: &str,
    password: &str,
) -> anyhow::Result<Output> {
    let mut child = Command::new(XFREERDP)
        .args(["/auth-only", "/cert:ignore", "/from-stdin:force"])
        .arg(format!("/v:127.0.0.1:{port}"))
        .arg(format!("/u:{user}"))
        .env("DISPLAY", display)
        .env("HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start xfreerdp")?;
    let mut stdin = child.stdin.take().context("xfreerdp's stdin")?;
    stdin.write_all(format!("{password}\n").as_bytes()).await?;
    drop(stdin);
    tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .context("xfreerdp did not finish")?
        .context("run xfreerdp")
}

/// `pamtester SERVICE USER OPS...` with `stack` standing in for
/// `/etc/pam.d/SERVICE` (private mount namespace) and `password` on its
/// standard input.
pub async fn pamtester(
    dir: &Path,
    service: &str,
    stack: &str,
    user: &str,
    password: &str,
    ops: &[&str],
) -> anyhow::Result<Output> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let file = dir.join(format!(
        "pam-{service}-{}",
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::write(&file, stack)?;
    let target = Path::new("/etc/pam.d").join(service);
    let wrap = private_mounts(&[Mount::Bind(&file, &target)]);
    let (program, args) = wrap.split_first().context("wrap")?;
    let mut child = Command::new(program)
        .args(args)
        .arg(PAMTESTER)
        .arg("-v")
        .args([OsStr::new(service), OsStr::new(user)])
        .args(ops)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start pamtester")?;
    let mut stdin = child.stdin.take().context("pamtester's stdin")?;
    stdin.write_all(format!("{password}\n").as_bytes()).await?;
    drop(stdin);
    tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .context("pamtester did not finish")?
        .context("run pamtester")
}
