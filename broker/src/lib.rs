//! `ferry-broker`: the delivery-group engine, the agent link, metering and the
//! admin socket; `ferryctl` is built from this library too.

pub mod admin;
pub mod chart;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod console;
pub mod csv;
pub mod daemon;
pub mod demo;
pub mod endpoint;
pub mod engine;
pub mod enroll;
pub mod groups;
pub mod hook_failure;
pub mod link;
#[cfg(test)]
mod link_tests;
pub mod listing;
pub mod metrics;
pub mod notify;
pub mod ota;
pub mod peer;
pub mod pki;
pub mod provision;
pub mod registry;
pub mod render;
pub mod rollout;
pub mod routing;
pub mod scrape;
pub mod simulate;
pub mod store;
#[cfg(test)]
mod test_support;
pub mod tickets;
pub mod usage;

pub use config::BrokerConfig;
pub use daemon::{run, BrokerError, BrokerReady};
