//! The real binaries, for tests that run Ferry as an operator would.
//!
//! Integration tests in this crate cannot use `CARGO_BIN_EXE_*` (that only names binaries
//! of the test's own package), so the binaries are looked up next to the test executable
//! (`target/<profile>/`) and built once with the same cargo if they are missing or older
//! than the test itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `target/<profile>` of the running test executable (`target/<profile>/deps/test-xxxx`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary lives in deps/");
    deps.parent()
        .expect("deps/ lives in target/<profile>")
        .to_path_buf()
}

fn build_all() -> PathBuf {
    let dir = target_dir();
    let profile_release = dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // Name the packages: the test runs in `tests/`, where a bare `--bin`
    // only looks at this crate's (nonexistent) binaries.
    cmd.args([
        "build",
        "-p",
        "ferry-broker",
        "-p",
        "ferry-agent",
        "--bin",
        "ferry-broker",
        "--bin",
        "ferryctl",
        "--bin",
        "ferry-connect",
        "--bin",
        "ferry-agent",
    ]);
    // cargo runs tests with the test package's CARGO_PKG_*, CARGO_MANIFEST_*
    // ... in the environment. Build scripts that watch such variables (ring's
    // does) would see them change and rebuild half the tree, and the next
    // `cargo test` would rebuild it back. The nested build gets a clean slate.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let per_package = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| key.starts_with(p));
        if per_package || key == "CARGO_PRIMARY_PACKAGE" || key == "CARGO_TARGET_TMPDIR" {
            cmd.env_remove(key);
        }
    }
    if profile_release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build for the real binaries");
    assert!(status.success(), "cargo build of the Ferry binaries failed");
    dir
}

/// Path to one of Ferry's binaries (`ferry-broker`, `ferry-agent`, `ferryctl`,
/// `ferry-connect`), built
/// once per test process so a test never runs a stale binary.
pub fn bin(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(build_all);
    let path = dir.join(name);
    assert!(is_file(&path), "{} was not built", path.display());
    path
}

fn is_file(p: &Path) -> bool {
    p.metadata().map(|m| m.is_file()).unwrap_or(false)
}
