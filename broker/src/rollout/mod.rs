//! Rollouts: a group's image update (`group update-image`) and its OTA
//! rollouts are one machine ([`machine`]): warn, wait, disconnect, command,
//! confirm, record, resume after a restart.

pub mod machine;

pub use machine::{Rollout, Settings};
