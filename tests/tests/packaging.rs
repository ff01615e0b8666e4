//! The Debian packages (issue 6): `ferry-agent` and `ferry-broker` are built from the debug
//! binaries with cargo-deb's library and the `[package.metadata.deb]` sections that
//! `cargo deb` uses for releases, checked with `dpkg-deb`, then installed, reinstalled,
//! removed and purged with the real `dpkg` in a throwaway root.
//!
//! The throwaway root never touches this machine: dpkg runs with `--root` and
//! `--force-script-chrootless` (the maintainer scripts see `DPKG_ROOT` and write users with
//! `useradd --prefix`), under `fakeroot`, and, when the test runs as root, as the unprivileged
//! user `nobody` (`setpriv`), so a script that forgot `$DPKG_ROOT` fails with EPERM instead
//! of writing to `/`. What this cannot cover: a running systemd (the scripts' `daemon-reload`,
//! `start`, `try-restart` and `stop` run only when `/run/systemd/system` exists and
//! `DPKG_ROOT` is empty), NSS lookups (`getent`) and `chown` by name on a real system.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, ensure, Context};
use cargo_deb::compress::{CompressConfig, Format};
use cargo_deb::config::{BuildOptions, DebugSymbolOptions};
use cargo_deb::listener::Listener;
use cargo_deb::{BuildProfile, CargoDeb, CargoLockingFlags, OutputPath};
use ferry_tests::bins::bin;

const AGENT: &str = "ferry-agent";
const BROKER: &str = "ferry-broker";
/// The system user of each package: the units' `User=`.
const AGENT_USER: &str = "ferry-agent";
const BROKER_USER: &str = "ferry";
/// `nobody`/`nogroup` on Debian: who runs dpkg when the test itself runs as root.
const NOBODY: u32 = 65534;
/// The PATH dpkg runs with: it checks that ldconfig and start-stop-daemon are on it.
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_path_buf()
}

/// The external tools this test needs, with a clear failure instead of a silent skip.
fn require_tools() {
    for tool in [
        "dpkg-deb",
        "dpkg",
        "dpkg-shlibdeps",
        "fakeroot",
        "setpriv",
        "useradd",
    ] {
        let found = std::env::split_paths(SYSTEM_PATH)
            .chain(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            ))
            .any(|dir| dir.join(tool).is_file());
        assert!(
            found,
            "the packaging test needs `{tool}` (Debian: apt-get install dpkg-dev fakeroot \
             util-linux passwd); it is not on PATH"
        );
    }
}

/// cargo-deb's messages, printed with the test's output (shown when it fails).
#[derive(Default)]
struct Messages(Mutex<Vec<String>>);

impl Listener for Messages {
    fn warning(&self, s: String) {
        eprintln!("cargo-deb warning: {s}");
        self.0.lock().expect("listener lock").push(s);
    }
    fn info(&self, s: String) {
        eprintln!("cargo-deb: {s}");
    }
    fn generated_archive(&self, path: &Path) {
        eprintln!("cargo-deb wrote {}", path.display());
    }
}

/// Both packages, built once per test process into `target/tmp/ferry-packaging/debs`
/// (left there to inspect).
fn debs() -> &'static BTreeMap<&'static str, PathBuf> {
    static DEBS: OnceLock<BTreeMap<&'static str, PathBuf>> = OnceLock::new();
    DEBS.get_or_init(|| build_debs().expect("build the .deb packages"))
}

fn build_debs() -> anyhow::Result<BTreeMap<&'static str, PathBuf>> {
    require_tools();
    // The debug binaries, built by the same cargo if missing or stale.
    for name in ["ferry-agent", "ferry-broker", "ferryctl", "ferry-connect"] {
        bin(name);
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ferry-packaging/debs");
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    std::fs::create_dir_all(&out)?;
    let ws = workspace();
    let mut debs = BTreeMap::new();
    for (package, dir) in [(AGENT, "agent"), (BROKER, "broker")] {
        let manifest = ws.join(dir).join("Cargo.toml");
        let messages = Messages::default();
        let deb = CargoDeb {
            options: BuildOptions {
                manifest_path: Some(&manifest),
                selected_package_name: Some(package),
                // `target/release/…` assets resolve to target/debug: the binaries this test
                // profile built. Releases use `cargo deb` (release profile).
                build_profile: BuildProfile {
                    profile_name: Some("dev".into()),
                    ..BuildProfile::default()
                },
                debug: DebugSymbolOptions {
                    strip_override: Some(true),
                    ..DebugSymbolOptions::default()
                },
                cargo_locking_flags: CargoLockingFlags {
                    locked: true,
                    ..CargoLockingFlags::default()
                },
                ..BuildOptions::default()
            },
            no_build: true,
            // The system gzip: no compressor compiled into the test (and fast).
            compress_config: CompressConfig {
                fast: true,
                compress_type: Format::Gzip,
                compress_system: true,
                rsyncable: false,
            },
            deb_output: Some(OutputPath {
                path: &out,
                is_dir: true,
            }),
            ..CargoDeb::default()
        };
        deb.process(&messages)
            .map_err(|e| anyhow::anyhow!("cargo-deb for {package}: {e}"))?;
        // The only expected warning is cargo-deb's note that the dev profile is not for
        // releases; anything else (a missing asset, no $auto dependencies) is a failure.
        let warnings = messages.0.into_inner().expect("listener lock");
        let unexpected: Vec<_> = warnings
            .iter()
            .filter(|w| !w.contains("dev profile is not supported"))
            .collect();
        ensure!(
            unexpected.is_empty(),
            "cargo-deb warned for {package}: {unexpected:#?}"
        );
        let version = env!("CARGO_PKG_VERSION");
        let file = std::fs::read_dir(&out)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(OsStr::to_str)
                    .is_some_and(|n| n.starts_with(&format!("{package}_{version}-1_")))
            })
            .with_context(|| format!("no {package}_{version}-1_*.deb in {}", out.display()))?;
        debs.insert(package, file);
    }
    Ok(debs)
}

/// Runs a command, failing with its output if it fails; returns its stdout.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn dpkg_deb(args: &[&OsStr]) -> anyhow::Result<String> {
    run(Command::new("dpkg-deb").args(args))
}

/// One line of `dpkg-deb --contents`: mode string, owner, path (without the leading `.`).
struct Entry {
    mode: String,
    owner: String,
    path: String,
}

fn contents(deb: &Path) -> anyhow::Result<Vec<Entry>> {
    let listing = dpkg_deb(&["--contents".as_ref(), deb.as_os_str()])?;
    listing
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            ensure!(fields.len() >= 6, "unexpected dpkg-deb line: {line}");
            let path = fields[5].trim_start_matches('.').to_string();
            Ok(Entry {
                mode: fields[0].to_string(),
                owner: fields[1].to_string(),
                path,
            })
        })
        .collect()
}

struct Expected {
    package: &'static str,
    binaries: &'static [&'static str],
    unit: &'static str,
    config: &'static str,
    /// Examples shipped under `/usr/share/doc/PACKAGE/examples/`, from
    /// `packaging/` (path below both).
    examples: &'static [&'static str],
}

const EXPECTED: [Expected; 2] = [
    Expected {
        package: AGENT,
        binaries: &["ferry-agent"],
        unit: "ferry-agent.service",
        config: "agent.toml",
        examples: &["pam/sshd", "pam/xrdp-sesman"],
    },
    Expected {
        package: BROKER,
        binaries: &["ferry-broker", "ferryctl", "ferry-connect"],
        unit: "ferry-broker.service",
        config: "broker.toml",
        examples: &[],
    },
];

#[test]
fn packages_hold_the_binaries_units_configs_and_scripts() -> anyhow::Result<()> {
    let ws = workspace();
    for exp in &EXPECTED {
        let deb = &debs()[exp.package];
        let field = |name: &str| -> anyhow::Result<String> {
            Ok(
                dpkg_deb(&["--field".as_ref(), deb.as_os_str(), name.as_ref()])?
                    .trim()
                    .to_string(),
            )
        };
        assert_eq!(field("Package")?, exp.package);
        assert_eq!(
            field("Version")?,
            format!("{}-1", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(field("Section")?, "net");
        assert!(!field("Maintainer")?.is_empty());
        assert!(!field("Description")?.is_empty());
        let depends = field("Depends")?;
        let depends: BTreeSet<&str> = depends
            .split(',')
            .map(|d| d.split_whitespace().next().unwrap_or(""))
            .collect();
        // libc6 from dpkg-shlibdeps ($auto), passwd for useradd; nothing unresolved, and no
        // -dev package or other library (rusqlite is bundled, TLS is rustls).
        assert_eq!(
            depends,
            BTreeSet::from(["libc6", "passwd"]),
            "{}: Depends",
            exp.package
        );
        let info = dpkg_deb(&["--info".as_ref(), deb.as_os_str()])?;
        assert!(
            info.contains(&format!("Package: {}", exp.package)),
            "{info}"
        );

        // The exact file set: nothing missing, nothing extra.
        let entries = contents(deb)?;
        for e in &entries {
            assert!(
                e.owner == "root/root" || e.owner == "0/0",
                "{}: {} owned by {}",
                exp.package,
                e.path,
                e.owner
            );
        }
        let files: BTreeMap<&str, &str> = entries
            .iter()
            .filter(|e| !e.mode.starts_with('d'))
            .map(|e| (e.path.as_str(), e.mode.as_str()))
            .collect();
        let mut want: BTreeMap<String, &str> = BTreeMap::new();
        for b in exp.binaries {
            want.insert(format!("/usr/bin/{b}"), "-rwxr-xr-x");
        }
        want.insert(format!("/lib/systemd/system/{}", exp.unit), "-rw-r--r--");
        want.insert(format!("/etc/ferry/{}", exp.config), "-rw-r--r--");
        want.insert(
            format!("/usr/share/doc/{}/README.md", exp.package),
            "-rw-r--r--",
        );
        want.insert(
            format!("/usr/share/doc/{}/copyright", exp.package),
            "-rw-r--r--",
        );
        for e in exp.examples {
            want.insert(
                format!("/usr/share/doc/{}/examples/{e}", exp.package),
                "-rw-r--r--",
            );
        }
        let want: BTreeMap<&str, &str> = want.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(files, want, "{}: files and modes", exp.package);

        // The control part: conffiles and the three maintainer scripts, as written (cargo-deb
        // writes no md5sums).
        let tmp = tempfile::tempdir()?;
        let control = tmp.path().join("DEBIAN");
        dpkg_deb(&["--control".as_ref(), deb.as_os_str(), control.as_os_str()])?;
        assert_eq!(
            std::fs::read_to_string(control.join("conffiles"))?,
            format!("/etc/ferry/{}\n", exp.config),
            "{}: conffiles",
            exp.package
        );
        let script_dir = ws.join("packaging").join(match exp.package {
            AGENT => "agent",
            _ => "broker",
        });
        for script in ["postinst", "prerm", "postrm"] {
            let shipped = control.join(script);
            let meta = std::fs::metadata(&shipped)
                .with_context(|| format!("{}: no {script}", exp.package))?;
            assert_eq!(meta.permissions().mode() & 0o777, 0o755, "{script} mode");
            let text = std::fs::read_to_string(&shipped)?;
            assert_eq!(text, std::fs::read_to_string(script_dir.join(script))?);
            assert!(text.starts_with("#!/bin/sh\n"), "{script}: POSIX sh");
            assert!(text.contains("\nset -e\n"), "{script}: set -e");
            run(Command::new("sh").arg("-n").arg(&shipped))?;
        }
        let extra: Vec<_> = std::fs::read_dir(&control)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                ![
                    "control",
                    "conffiles",
                    "md5sums",
                    "postinst",
                    "prerm",
                    "postrm",
                ]
                .contains(&n.as_str())
            })
            .collect();
        assert!(extra.is_empty(), "unexpected control files: {extra:?}");

        // The data part: the shipped unit, config and docs are the repository's files, and
        // the binaries are the real ones (they run).
        let data = tmp.path().join("data");
        dpkg_deb(&["--extract".as_ref(), deb.as_os_str(), data.as_os_str()])?;
        let same = |shipped: &str, source: PathBuf| -> anyhow::Result<()> {
            ensure!(
                std::fs::read(data.join(shipped))? == std::fs::read(&source)?,
                "{shipped} differs from {}",
                source.display()
            );
            Ok(())
        };
        same(
            &format!("lib/systemd/system/{}", exp.unit),
            ws.join("systemd").join(exp.unit),
        )?;
        same(
            &format!("etc/ferry/{}", exp.config),
            ws.join("packaging").join(exp.config),
        )?;
        same(
            &format!("usr/share/doc/{}/README.md", exp.package),
            ws.join("README.md"),
        )?;
        same(
            &format!("usr/share/doc/{}/copyright", exp.package),
            ws.join("packaging/copyright"),
        )?;
        for e in exp.examples {
            same(
                &format!("usr/share/doc/{}/examples/{e}", exp.package),
                ws.join("packaging").join(e),
            )?;
        }
        let unit = std::fs::read_to_string(data.join("lib/systemd/system").join(exp.unit))?;
        for b in exp.binaries {
            let help = run(Command::new(data.join("usr/bin").join(b)).arg("--help"))?;
            assert!(help.contains("Usage"), "{b} --help: {help}");
        }
        assert!(unit.contains(&format!("ExecStart=/usr/bin/{} ", exp.binaries[0])));
        let user = match exp.package {
            AGENT => AGENT_USER,
            _ => BROKER_USER,
        };
        // The scripts create the user the unit runs as.
        assert!(
            unit.contains(&format!("\nUser={user}\n")),
            "{}: User=",
            exp.unit
        );
        let postinst = std::fs::read_to_string(control.join("postinst"))?;
        assert!(postinst.contains(&format!("USER_NAME={user}\n")));
    }
    Ok(())
}

/// How commands reach the throwaway root: `fakeroot` with a saved state (so owners set in
/// one dpkg run are seen by the next), as `nobody` when the test runs as root.
struct Root {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    dir: PathBuf,
    fakeroot_state: PathBuf,
    log: PathBuf,
    as_root: bool,
}

impl Root {
    fn new() -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let base = tmp.path().to_path_buf();
        let dir = base.join("root");
        for d in [
            "var/lib/dpkg/info",
            "var/lib/dpkg/updates",
            "var/lib/dpkg/triggers",
            // A systemd machine has it; `systemctl enable` adds the .wants directory.
            "etc/systemd/system",
            "run",
            "tmp",
        ] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        std::fs::write(dir.join("var/lib/dpkg/status"), "")?;
        std::fs::write(dir.join("var/lib/dpkg/available"), "")?;
        // The accounts of a minimal Debian system.
        std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n")?;
        std::fs::write(dir.join("etc/group"), "root:x:0:\n")?;
        std::fs::write(dir.join("etc/shadow"), "root:*:20000:0:99999:7:::\n")?;
        std::fs::write(dir.join("etc/gshadow"), "root:*::\n")?;
        for f in ["etc/shadow", "etc/gshadow"] {
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o640))?;
        }
        let fakeroot_state = base.join("fakeroot.state");
        std::fs::write(&fakeroot_state, "")?;
        let log = base.join("dpkg.log");
        std::fs::write(&log, "")?;
        let as_root = std::fs::metadata("/proc/self")?.uid() == 0;
        if as_root {
            chown_tree(&base, NOBODY)?;
        }
        Ok(Root {
            _tmp: tmp,
            base,
            dir,
            fakeroot_state,
            log,
            as_root,
        })
    }

    /// A command run (unprivileged if need be) under this root's fakeroot session.
    fn command(&self, program: &str, args: &[&OsStr]) -> Command {
        let mut cmd = if self.as_root {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "--",
            ]);
            c.arg("fakeroot");
            c
        } else {
            Command::new("fakeroot")
        };
        cmd.arg("-i")
            .arg(&self.fakeroot_state)
            .arg("-s")
            .arg(&self.fakeroot_state)
            .arg("--")
            .arg(program)
            .args(args)
            .env("PATH", SYSTEM_PATH)
            .env("HOME", &self.base)
            .env("TMPDIR", self.base.join("root/tmp"))
            .current_dir(&self.base);
        cmd
    }

    fn dpkg(&self, args: &[&OsStr]) -> anyhow::Result<String> {
        let mut all: Vec<&OsStr> = vec![
            "--root".as_ref(),
            self.dir.as_os_str(),
            "--force-not-root".as_ref(),
            "--force-script-chrootless".as_ref(),
            // The throwaway root has no libc6 or passwd package; the test checks Depends.
            "--force-depends".as_ref(),
        ];
        let log = format!("--log={}", self.log.display());
        all.push(log.as_ref());
        all.extend_from_slice(args);
        run(&mut self.command("dpkg", &all))
    }

    /// `dpkg-query -W` status of a package ("" when dpkg does not know it).
    fn status(&self, package: &str) -> anyhow::Result<String> {
        let admindir = self.dir.join("var/lib/dpkg");
        let out = self
            .command(
                "dpkg-query",
                &[
                    "--admindir".as_ref(),
                    admindir.as_os_str(),
                    "-W".as_ref(),
                    "-f".as_ref(),
                    "${Status}".as_ref(),
                    package.as_ref(),
                ],
            )
            .output()?;
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// Owner (as numbers, from the fakeroot state) and mode of a path in the root.
    fn stat(&self, path: &str) -> anyhow::Result<String> {
        let p = self.dir.join(path);
        Ok(
            run(&mut self.command("stat", &["-c".as_ref(), "%u:%g %a".as_ref(), p.as_os_str()]))?
                .trim()
                .to_string(),
        )
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    fn exists(&self, p: &str) -> bool {
        self.path(p).symlink_metadata().is_ok()
    }

    fn read(&self, p: &str) -> anyhow::Result<String> {
        std::fs::read_to_string(self.path(p)).with_context(|| p.to_string())
    }

    /// Every path in the root but dpkg's own bookkeeping, with each file's contents.
    fn snapshot(&self) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
        let mut all = BTreeMap::new();
        walk(&self.dir, &self.dir, &mut all)?;
        all.retain(|p, _| {
            !(p.starts_with("var/lib/dpkg/")
                // the shadow tools' backups of the account files
                || ["etc/passwd-", "etc/group-", "etc/shadow-", "etc/gshadow-"]
                    .contains(&p.as_str()))
        });
        Ok(all)
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            out.insert(format!("{rel}/"), Vec::new());
            walk(root, &path, out)?;
        } else if kind.is_symlink() {
            out.insert(
                rel,
                std::fs::read_link(&path)?
                    .into_os_string()
                    .into_encoded_bytes(),
            );
        } else {
            out.insert(rel, std::fs::read(&path)?);
        }
    }
    Ok(())
}

fn chown_tree(path: &Path, id: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(path, Some(id), Some(id))?;
    if path.symlink_metadata()?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), id)?;
        }
    }
    Ok(())
}

/// `name:x:uid:gid:...` of an account in the root's passwd or group file.
fn account(root: &Root, file: &str, name: &str) -> anyhow::Result<Option<Vec<String>>> {
    let text = root.read(file)?;
    let mut found = text
        .lines()
        .filter(|l| l.split(':').next() == Some(name))
        .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>());
    let first = found.next();
    ensure!(found.next().is_none(), "{name} twice in {file}");
    Ok(first)
}

#[test]
fn install_reinstall_remove_and_purge_in_a_throwaway_root() -> anyhow::Result<()> {
    let debs = debs();
    let root = Root::new()?;
    let before = root.snapshot()?;
    let agent_deb = debs[AGENT].as_os_str();
    let broker_deb = debs[BROKER].as_os_str();
    let has_systemctl = std::env::split_paths(SYSTEM_PATH).any(|d| d.join("systemctl").is_file());

    // Install both, then again (the upgrade path: prerm upgrade, postinst configure VERSION).
    for _ in 0..2 {
        root.dpkg(&["--install".as_ref(), agent_deb, broker_deb])?;
        for exp in &EXPECTED {
            assert_eq!(root.status(exp.package)?, "install ok installed");
            for b in exp.binaries {
                let meta = std::fs::metadata(root.path(&format!("usr/bin/{b}")))?;
                assert_eq!(meta.permissions().mode() & 0o777, 0o755);
            }
            assert!(root.exists(&format!("lib/systemd/system/{}", exp.unit)));
            assert!(root.exists(&format!("etc/ferry/{}", exp.config)));
            assert!(root.exists(&format!("usr/share/doc/{}/copyright", exp.package)));
        }
        for (user, home) in [
            (AGENT_USER, "/var/lib/ferry-agent"),
            (BROKER_USER, "/var/lib/ferry"),
        ] {
            let pw =
                account(&root, "etc/passwd", user)?.with_context(|| format!("no user {user}"))?;
            let gr =
                account(&root, "etc/group", user)?.with_context(|| format!("no group {user}"))?;
            let uid: u32 = pw[2].parse()?;
            assert!(uid > 0 && uid < 1000, "{user}: system uid, not {uid}");
            assert_eq!(pw[3], gr[2], "{user}: its own group");
            assert_eq!(pw[5], home);
            assert_eq!(pw[6], "/usr/sbin/nologin");
            ensure!(
                account(&root, "etc/shadow", user)?.is_some(),
                "{user}: no shadow entry"
            );
            // No home made: systemd's StateDirectory= does that.
            assert!(!root.exists(home.trim_start_matches('/')), "{home} created");
        }
        let agent_gid = account(&root, "etc/group", AGENT_USER)?.context("agent group")?[2].clone();
        assert_eq!(root.stat("etc/ferry/agent")?, format!("0:{agent_gid} 770"));
        if has_systemctl {
            for unit in ["ferry-agent.service", "ferry-broker.service"] {
                let link = root.path(&format!(
                    "etc/systemd/system/multi-user.target.wants/{unit}"
                ));
                assert_eq!(
                    std::fs::read_link(&link).with_context(|| format!("{unit} not enabled"))?,
                    Path::new("/lib/systemd/system").join(unit)
                );
            }
        }
    }

    // What the services and the administrator would have made meanwhile.
    for (file, text) in [
        ("var/lib/ferry-agent/spool.log", "events"),
        ("run/ferry-agent/agent.sock", ""),
        ("etc/ferry/agent/agent-key.pem", "key"),
        ("var/lib/ferry/ferry.db", "store"),
        ("var/lib/ferry/pki/ca-key.pem", "key"),
        ("run/ferry/admin.sock", ""),
    ] {
        std::fs::create_dir_all(root.path(file).parent().context("parent")?)?;
        std::fs::write(root.path(file), text)?;
    }
    if root.as_root {
        chown_tree(&root.dir, NOBODY)?;
    }
    // The administrator edited the agent's config: dpkg keeps it on remove.
    let edited = format!("{}# edited\n", root.read("etc/ferry/agent.toml")?);
    std::fs::write(root.path("etc/ferry/agent.toml"), &edited)?;

    // Remove the agent: its files go, its conffile, user and state stay; the broker is
    // untouched.
    root.dpkg(&["--remove".as_ref(), AGENT.as_ref()])?;
    assert_eq!(root.status(AGENT)?, "deinstall ok config-files");
    assert!(!root.exists("usr/bin/ferry-agent"));
    assert!(!root.exists("lib/systemd/system/ferry-agent.service"));
    assert!(!root.exists("usr/share/doc/ferry-agent"));
    assert_eq!(root.read("etc/ferry/agent.toml")?, edited);
    assert!(root.exists("var/lib/ferry-agent/spool.log"));
    assert!(account(&root, "etc/passwd", AGENT_USER)?.is_some());
    assert_eq!(root.status(BROKER)?, "install ok installed");
    assert!(root.exists("usr/bin/ferryctl"));

    // Purge the agent: everything of it goes; /etc/ferry stays for the broker.
    root.dpkg(&["--purge".as_ref(), AGENT.as_ref()])?;
    assert_eq!(root.status(AGENT)?, "");
    for gone in [
        "etc/ferry/agent.toml",
        "etc/ferry/agent",
        "var/lib/ferry-agent",
        "run/ferry-agent",
        "etc/systemd/system/multi-user.target.wants/ferry-agent.service",
    ] {
        assert!(!root.exists(gone), "{gone} left after purge");
    }
    assert!(account(&root, "etc/passwd", AGENT_USER)?.is_none());
    assert!(account(&root, "etc/group", AGENT_USER)?.is_none());
    assert!(account(&root, "etc/shadow", AGENT_USER)?.is_none());
    assert!(account(&root, "etc/gshadow", AGENT_USER)?.is_none());
    assert!(root.exists("etc/ferry/broker.toml"));
    assert!(account(&root, "etc/passwd", BROKER_USER)?.is_some());

    // Purge the broker straight from installed.
    root.dpkg(&["--purge".as_ref(), BROKER.as_ref()])?;
    assert_eq!(root.status(BROKER)?, "");
    let info: Vec<_> = std::fs::read_dir(root.path("var/lib/dpkg/info"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ferry"))
        .collect();
    assert!(info.is_empty(), "dpkg still has {info:?}");

    // Nothing left: the root is as it was before the first install, file by file (account
    // files included), but for dpkg's own database and the shadow tools' backups.
    let after = root.snapshot()?;
    let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    let removed: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    let changed: Vec<_> = before
        .iter()
        .filter(|(k, v)| after.get(*k).is_some_and(|a| a != *v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        added.is_empty() && removed.is_empty() && changed.is_empty(),
        "left behind: {added:?}, removed: {removed:?}, changed: {changed:?}"
    );
    let log = std::fs::read_to_string(&root.log)?;
    assert!(log.contains("status not-installed ferry-agent"), "{log}");
    assert!(log.contains("status not-installed ferry-broker"), "{log}");
    Ok(())
}
