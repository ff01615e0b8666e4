//! `ferry-broker`: the delivery-group engine, the agent link, metering and the
//! admin socket; `ferryctl` is built from this library too.

pub mod engine;
pub mod simulate;
