//! Files replaced whole, with an explicit mode, never through a symlink.
//!
//! [`write_atomic`] (or [`stage`] then [`Staged::commit`], to write several
//! files before renaming any) writes a temporary file beside the target,
//! fsyncs it, renames it over the target and fsyncs the directory: after a
//! crash the target holds the old or the new content, never a mix.
//!
//! The temporary has a name of its own (`.NAME.tmp-PID-N`) and is created
//! with `O_CREAT|O_EXCL|O_NOFOLLOW`: a file or symlink planted at a
//! predictable name is never opened, truncated or written through; the
//! next name is tried instead. Its mode is set with `fchmod` to exactly the
//! one asked for, whatever the umask, before any byte is written. The
//! rename replaces a symlink at the target itself, not what it points to.
//!
//! A crash between the create and the rename leaves the temporary behind;
//! a daemon removes those of its state directory when it starts
//! ([`remove_stale_temporaries`], under the directory's lock).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode of secrets and daemon state: read and written by the owner only.
pub const PRIVATE: u32 = 0o600;

/// Mode of a file other users must read (a certificate, the policy the
/// streaming server reads).
pub const PUBLIC: u32 = 0o644;

/// Names tried for a temporary before giving up (each taken name is one
/// left by a crash or planted by someone else).
const MAX_TRIES: u32 = 64;

/// Why a file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", .path.display())]
pub struct WriteError {
    /// What was being done: `create`, `write`, `rename`, ...
    pub op: &'static str,
    /// The file or directory it was done to.
    pub path: PathBuf,
    /// The system's error.
    pub source: std::io::Error,
}

fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> WriteError + 'a {
    move |source| WriteError {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Whether `name` is one [`stage`] gives a temporary: `.NAME.tmp-PID-N`.
fn is_temporary(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix('.')
        .and_then(|rest| rest.rsplit_once(".tmp-"))
        .and_then(|(_, tail)| tail.split_once('-'))
        .is_some_and(|(pid, n)| digits(pid) && digits(n))
}

/// Removes the temporaries a crashed writer left in `dir` (not below it):
/// every `.NAME.tmp-PID-N`, whatever its PID (a daemon that is pid 1 in a
/// container has the same pid at every start). Only for a directory whose
/// lock the caller has just taken, before it writes there, so no live
/// writer's temporary is removed. The entry itself is removed (a symlink is
/// never followed). Returns what it removed; an entry it cannot remove is
/// left and not returned.
pub fn remove_stale_temporaries(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(is_temporary) {
            continue;
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        if std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// The directory of `path` (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// fsyncs directory `dir`, so the names created or renamed in it last.
pub fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("sync directory", dir))
}

/// A temporary file written and fsynced, waiting to be renamed over its
/// target; removed when dropped uncommitted.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staged {
    /// The temporary's path.
    pub fn temporary(&self) -> &Path {
        &self.tmp
    }

    /// Renames the temporary over the target and fsyncs the directory.
    pub fn commit(mut self) -> Result<(), WriteError> {
        std::fs::rename(&self.tmp, &self.target).map_err(err("rename into", &self.target))?;
        self.committed = true;
        sync_dir(&parent_dir(&self.target))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Creates a new temporary beside `path` (exclusively, not through a
/// symlink) with exactly `mode`, writes `bytes` and fsyncs it. The
/// directory is created when missing.
pub fn stage(path: &Path, bytes: &[u8], mode: u32) -> Result<Staged, WriteError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = parent_dir(path);
    std::fs::create_dir_all(&dir).map_err(err("create directory", &dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let pid = std::process::id();
    let mut tries = 0;
    let (tmp, mut file) = loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.tmp-{pid}-{n}"));
        let opened = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&tmp);
        match opened {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < MAX_TRIES => {
                tries += 1;
            }
            Err(e) => return Err(err("create", &tmp)(e)),
        }
    };
    let staged = Staged {
        tmp,
        target: path.to_owned(),
        committed: false,
    };
    // Exactly `mode`: the umask only ever removed bits from it.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err("set the mode of", &staged.tmp))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(err("write", &staged.tmp))?;
    Ok(staged)
}

/// Replaces `path` whole with `bytes`, mode `mode` (see the module docs).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    stage(path, bytes, mode)?.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn a_file_is_replaced_whole_with_its_mode_and_no_temporary_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("state");
        write_atomic(&path, b"one", PRIVATE).expect("write");
        assert_eq!(mode_of(&path), 0o600);
        // An existing file of another mode gets the mode asked for.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        write_atomic(&path, b"two", PRIVATE).expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        assert_eq!(mode_of(&path), 0o600);
        write_atomic(&path, b"three", PUBLIC).expect("public");
        assert_eq!(mode_of(&path), 0o644);
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state")]);
    }

    #[test]
    fn planted_symlinks_are_never_written_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").expect("victim");
        let path = dir.path().join("state");
        // Symlinks at the names the temporaries of this process take next,
        // and at the names earlier versions used.
        let next = stage(&dir.path().join("probe"), b"", PRIVATE).expect("probe");
        let probe = next.temporary().to_string_lossy().into_owned();
        let n: u64 = probe
            .rsplit('-')
            .next()
            .expect("n")
            .parse()
            .expect("number");
        drop(next);
        let pid = std::process::id();
        for k in n + 1..n + 8 {
            std::os::unix::fs::symlink(&victim, dir.path().join(format!(".state.tmp-{pid}-{k}")))
                .expect("plant");
        }
        for old in ["state.tmp", ".state.tmp"] {
            std::os::unix::fs::symlink(&victim, dir.path().join(old)).expect("plant");
        }
        write_atomic(&path, b"new", PRIVATE).expect("write beside the planted links");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"untouched");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");

        // A symlink at the target is replaced, not followed.
        std::fs::remove_file(&path).expect("rm");
        std::os::unix::fs::symlink(&victim, &path).expect("plant");
        write_atomic(&path, b"newer", PRIVATE).expect("write over the link");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"untouched");
        assert!(!std::fs::symlink_metadata(&path)
            .expect("stat")
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&path).expect("read"), b"newer");
    }

    #[test]
    fn an_uncommitted_temporary_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        let staged = stage(&path, b"x", PRIVATE).expect("stage");
        let tmp = staged.temporary().to_owned();
        assert!(tmp.exists());
        drop(staged);
        assert!(!tmp.exists());
        assert!(!path.exists());
    }

    #[test]
    fn temporaries_left_by_a_crash_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tmp");
        let me = std::process::id();
        // Also one of this pid: a daemon that is pid 1 in a container has
        // the same pid at every start.
        let own = format!(".spool.tmp-{me}-3");
        let stale = [".spool.tmp-1-0", ".agent.pem.tmp-4242-17", own.as_str()];
        let kept = [
            "spool".to_owned(),
            ".spool.tmp-x-1".to_owned(),
            ".spool.tmp-12".to_owned(),
            "spool.tmp-1-0".to_owned(),
        ];
        for name in stale.iter().copied().chain(kept.iter().map(String::as_str)) {
            std::fs::write(dir.path().join(name), b"x").expect("write");
        }
        // A planted symlink of that shape is removed itself, not followed.
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").expect("target");
        std::os::unix::fs::symlink(&target, dir.path().join(".x.tmp-7-7")).expect("symlink");

        let mut removed: Vec<String> = remove_stale_temporaries(dir.path())
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect();
        removed.sort();
        let mut want = vec![
            ".agent.pem.tmp-4242-17".to_owned(),
            ".spool.tmp-1-0".to_owned(),
            own.clone(),
            ".x.tmp-7-7".to_owned(),
        ];
        want.sort();
        assert_eq!(removed, want);
        for name in &kept {
            assert!(dir.path().join(name).exists(), "{name} kept");
        }
        assert_eq!(std::fs::read(&target).expect("target"), b"keep");
    }
}
