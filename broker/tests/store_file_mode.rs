//! The store's files are private whatever the umask.
//!
//! The umask is process-wide: setting it in a test of the library would
//! change it under every test running beside it. This file is a test
//! binary of its own holding this single test, so its process's umask is
//! set for it alone.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ferry_broker::store::{Store, StoreOptions, STORE_FILE_MODE};

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn side(db: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

#[test]
fn the_database_and_its_wal_are_private_under_a_permissive_umask() {
    // The usual umask outside systemd: without an explicit mode SQLite
    // creates its files 0644, readable by every local user.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    assert_eq!(STORE_FILE_MODE, 0o600);
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("ferry.db");

    let store = Store::open(&db, StoreOptions::default()).expect("open");
    // Open: the migrations were written to the WAL, the shared memory file
    // exists.
    for p in [db.clone(), side(&db, "-wal"), side(&db, "-shm")] {
        assert_eq!(format!("{:o}", mode_of(&p)), "600", "{}", p.display());
    }
    drop(store);

    // A store an earlier version created with the umask's mode, and the
    // side files a crash left: made private on open.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    for suffix in ["-wal", "-shm"] {
        let p = side(&db, suffix);
        if !p.exists() {
            std::fs::write(&p, b"").expect("leftover");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let store = Store::open(&db, StoreOptions::default()).expect("reopen");
    for p in [db.clone(), side(&db, "-wal"), side(&db, "-shm")] {
        assert_eq!(format!("{:o}", mode_of(&p)), "600", "{}", p.display());
    }
    drop(store);
}
