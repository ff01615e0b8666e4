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
    deps.parent().expect("deps/ lives in target/<profile>").to_path_buf()
}

fn build_all() -> PathBuf {
    let dir = target_dir();
    let profile_release = dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--bin",
        "ferry-broker",
        "--bin",
        "ferryctl",
        "--bin",
        "ferry-agent",
    ]);
    if profile_release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build for the real binaries");
    assert!(status.success(), "cargo build of the Ferry binaries failed");
    dir
}

/// Path to one of Ferry's binaries (`ferry-broker`, `ferry-agent`, `ferryctl`), built
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
