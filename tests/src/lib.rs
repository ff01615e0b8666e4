//! Ferry's integration-test harness.
//!
//! - [`admin`]: admin requests and group helpers (publish, events, live view,
//!   usage, a group's agents) shared by the group and routing tests.
//! - [`harness`]: a real broker and real agents in this process, on
//!   `127.0.0.1:0` in temp dirs, started and observed through their
//!   readiness signals and status channels.
//! - [`procs`]: the real binaries as child processes, killed when a test
//!   fails, plus helpers to run `ferryctl` and `ferry-agent` verbs.
//! - [`bins`]: locate (and if needed build) the real `ferry-broker`, `ferry-agent` and
//!   `ferryctl` binaries, for tests that run them as an operator would.
//! - [`cluster`]: several broker processes sharing one PostgreSQL database.
//! - [`rollout`]: agent hooks that log each run, and waits on image updates and
//!   OTA schedules, for tests that kill a broker in the middle of a rollout.
//! - [`notify`]: a fake systemd `NOTIFY_SOCKET` that records what a daemon says.
//! - [`fuzz`]: one target per decoder of outside data, with the promises it checks.
//! - [`webdriver`]: headless Chromium over WebDriver, for the console's
//!   tests in a real browser.
//! - [`lossy`]: a seeded UDP proxy that drops, duplicates, reorders and delays
//!   datagrams between agents and a broker.
//!
//! Everything binds `127.0.0.1:0` or a socket in a temp dir and waits on readiness
//! signals, never on sleeps, so tests run in parallel on a shared machine.

pub mod admin;
pub mod bins;
pub mod cluster;
pub mod exposition;
pub mod fuzz;
pub mod harness;
pub mod lossy;
pub mod notify;
pub mod procs;
pub mod rollout;
pub mod servers;
pub mod webdriver;
