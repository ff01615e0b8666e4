//! Stores for the broker's unit tests, on either backend: SQLite in the
//! test's directory, or (with `FERRY_TEST_STORE=postgres`) a fresh
//! PostgreSQL database of its own, so one suite checks both.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Store, StoreOptions};

/// The backend the unit tests run on.
pub(crate) fn on_postgres() -> bool {
    std::env::var("FERRY_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// Opens the test store of `dir`: the same store again when `dir` had one.
pub(crate) fn open_for_test(dir: &Path) -> Store {
    open_for_test_with(dir, StoreOptions::default())
}

/// [`open_for_test`] with the writer's options.
pub(crate) fn open_for_test_with(dir: &Path, options: StoreOptions) -> Store {
    if !on_postgres() {
        return Store::open(&dir.join("ferry.db"), options).expect("open the SQLite store");
    }
    // The database of this directory, named in a file beside the SQLite one.
    let marker = dir.join("postgres-url");
    let url = match std::fs::read_to_string(&marker) {
        Ok(url) => url,
        Err(_) => {
            let url = fresh_database();
            std::fs::write(&marker, &url).expect("remember the test database");
            url
        }
    };
    Store::open_postgres(&url, options).expect("open the PostgreSQL store")
}

/// A new, empty database on the test cluster.
fn fresh_database() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "ferry_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let cluster = ferry_process::pg_cluster::shared().expect(
        "FERRY_TEST_STORE=postgres needs PostgreSQL's server programs (apt-get install -y \
         postgresql)",
    );
    cluster
        .create_database(&name)
        .expect("create a test database")
}
