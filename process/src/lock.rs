//! The exclusive lock on a daemon's state directory.
//!
//! A broker writes its SQLite store and an agent its spool in their state
//! directory; a second daemon started on the same directory (another port,
//! another socket) would write into the live one's files. Each daemon takes
//! an exclusive `flock(2)` on `state_dir/lock` before it opens anything
//! there and holds it for its whole life; a second one is refused with the
//! holder's pid, which the holder writes into the file.
//!
//! The kernel releases a `flock` when its file is closed, so a crashed
//! daemon's leftover file never blocks the next start: only a live holder
//! does. Locks belong to the open file, not the process, so two daemons in
//! one test process exclude each other too.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

/// Name of the lock file inside a state directory.
pub const LOCK_FILE: &str = "lock";

/// Longest lock file read back for the holder's pid.
const MAX_LOCK_FILE_LEN: u64 = 64;

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds the lock.
    #[error(
        "state directory {dir} is in use by {holder}; stop it first, or give this one another \
         state_dir",
        dir = .dir.display(),
        holder = match .pid {
            Some(pid) => format!("another process (pid {pid})"),
            None => "another process".to_owned(),
        }
    )]
    Held {
        /// The state directory.
        dir: PathBuf,
        /// The holder's pid, as it wrote it (absent while it starts).
        pid: Option<u32>,
    },
    /// The state directory is on a read-only file system.
    #[error(
        "state directory {dir} is on a read-only file system: the daemon keeps its state there \
         and must write it; remount it read-write (or set state_dir to a writable directory)",
        dir = .dir.display()
    )]
    ReadOnly {
        /// The state directory.
        dir: PathBuf,
    },
    /// The lock file could not be opened, locked or written.
    #[error("{op} lock file {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The held lock of a state directory; released when dropped (or when the
/// process ends, however it ends).
#[derive(Debug)]
pub struct StateLock {
    /// The open, locked file. Dropping it closes it, which releases the lock.
    _file: File,
    /// Its path, for messages.
    path: PathBuf,
}

impl StateLock {
    /// Locks `dir` (which must exist) for this process and writes its pid
    /// into the lock file, or fails at once naming the holder.
    pub fn acquire(dir: &Path) -> Result<StateLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |op| {
            let path = path.clone();
            move |source| lock_io_error(op, dir, path, source)
        };
        // Not truncated on open: the holder's pid must survive a refused start.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("open"))?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(LockError::Held {
                    dir: dir.to_owned(),
                    pid: read_pid(&mut file),
                })
            }
            Err(e) => return Err(io("lock")(e.into())),
        }
        file.set_len(0).map_err(io("truncate"))?;
        file.seek(SeekFrom::Start(0)).map_err(io("write"))?;
        writeln!(file, "{}", std::process::id()).map_err(io("write"))?;
        Ok(StateLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid the holder of `dir`'s lock wrote, read without locking: what a
/// supervisor uses to find a daemon it did not start (a daemon that ended
/// leaves its pid behind, so check the process before trusting it).
pub fn holder(dir: &Path) -> Option<u32> {
    let mut file = File::open(dir.join(LOCK_FILE)).ok()?;
    read_pid(&mut file)
}

/// A failed operation on the lock file, said as a read-only state
/// directory when it is one (the lock is the first thing a daemon writes).
fn lock_io_error(op: &'static str, dir: &Path, path: PathBuf, source: std::io::Error) -> LockError {
    if source.kind() == std::io::ErrorKind::ReadOnlyFilesystem {
        LockError::ReadOnly {
            dir: dir.to_owned(),
        }
    } else {
        LockError::Io { op, path, source }
    }
}

/// The pid a holder wrote, if the file holds one.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.take(MAX_LOCK_FILE_LEN)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_state_directory_is_named_as_such() {
        let dir = Path::new("/var/lib/ferry");
        let erofs = std::io::Error::from_raw_os_error(30);
        let err = lock_io_error("open", dir, dir.join(LOCK_FILE), erofs);
        let message = err.to_string();
        assert!(matches!(err, LockError::ReadOnly { .. }), "{err:?}");
        assert!(
            message.starts_with("state directory /var/lib/ferry is on a read-only file system"),
            "{message}"
        );
        let eacces = std::io::Error::from_raw_os_error(13);
        let err = lock_io_error("open", dir, dir.join(LOCK_FILE), eacces);
        assert!(matches!(err, LockError::Io { op: "open", .. }), "{err:?}");
    }

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("tmp");
        let first = StateLock::acquire(dir.path()).expect("first lock");
        let text = std::fs::read_to_string(first.path()).expect("read");
        assert_eq!(text.trim(), std::process::id().to_string());

        let err = StateLock::acquire(dir.path()).expect_err("held");
        let pid = std::process::id();
        assert!(
            matches!(&err, LockError::Held { pid: Some(p), .. } if *p == pid),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&format!("pid {pid}")), "{message}");
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert_eq!(holder(dir.path()), Some(pid));
        // The refused attempt left the holder's pid in place.
        assert_eq!(
            std::fs::read_to_string(first.path()).expect("read").trim(),
            pid.to_string()
        );

        drop(first);
        let again = StateLock::acquire(dir.path()).expect("free again");
        drop(again);
    }

    #[test]
    fn a_leftover_file_of_a_dead_holder_does_not_block() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join(LOCK_FILE), "999999\n").expect("write");
        let lock = StateLock::acquire(dir.path()).expect("no live holder");
        assert_eq!(
            std::fs::read_to_string(lock.path()).expect("read").trim(),
            std::process::id().to_string()
        );
    }

    #[test]
    fn a_missing_directory_is_an_io_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let err = StateLock::acquire(&dir.path().join("nope")).expect_err("no dir");
        assert!(matches!(err, LockError::Io { op: "open", .. }), "{err:?}");
    }
}
