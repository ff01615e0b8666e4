//! Exit codes of the daemons (sysexits.h), named once. Each `main.rs` maps
//! its errors to these in one place.

/// The configuration or the host's identity (certificate, key, CA) cannot be
/// used: restarting will not help until an operator fixes it. The systemd
/// units stop restarting on it (`RestartPreventExitStatus=78`).
pub const CONFIG: u8 = 78;

/// Another process holds the state directory's lock: try again later (it
/// may be a daemon that is still stopping). sysexits `EX_TEMPFAIL`.
pub const TEMPFAIL: u8 = 75;
