//! What a Ferry daemon process needs around its library, shared by
//! `ferry-agent` and `ferry-broker`:
//!
//! * [`lock`]: the exclusive lock on a state directory, so two daemons never
//!   write the same spool or database;
//! * [`output`]: a log and output writer that never panics and never blocks
//!   the process (a closed or full stderr pipe loses lines, not the daemon);
//! * [`journal`]: under systemd, log entries with their fields (group,
//!   resource, session, ...) to the journal through the same kind of
//!   writer, on a non-blocking socket;
//! * [`files`]: files replaced whole (temporary, fsync, rename) with an
//!   explicit mode, never written through a planted symlink;
//! * [`exit`]: the exit codes both daemons use, named once;
//! * [`config_check`]: every unknown key and wrong type of a config file at
//!   once, with its line;
//! * [`child`]: an operator's command (hook, provisioning tool) run in its
//!   own process group, its output read to the end with a bounded tail
//!   kept, the whole group killed past its timeout;
//! * [`http`]: the HTTP listener of the metrics endpoint and the web
//!   console (plain or TLS, bounded connections and request heads);
//! * `pg_cluster` (feature `pg-cluster`, for tests): a throwaway
//!   PostgreSQL cluster on a private Unix socket, removed when dropped or
//!   when the process ends.
//!
//! `ferry-common` stays free of I/O; this crate is where the daemons' shared
//! process plumbing lives.

pub mod child;
pub mod config_check;
pub mod exit;
pub mod files;
pub mod http;
pub mod journal;
pub mod lock;
pub mod output;
#[cfg(feature = "pg-cluster")]
pub mod pg_cluster;
