//! Ferry's integration-test harness.
//!
//! - [`bins`]: locate (and if needed build) the real `ferry-broker`, `ferry-agent` and
//!   `ferryctl` binaries, for tests that run them as an operator would.
//! - [`notify`]: a fake systemd `NOTIFY_SOCKET` that records what a daemon says.
//!
//! Everything binds `127.0.0.1:0` or a socket in a temp dir and waits on readiness
//! signals, never on sleeps, so tests run in parallel on a shared machine.

pub mod bins;
pub mod notify;
