//! Delivery groups as the broker manages them: the pure status machine
//! ([`lifecycle`]), their durable records ([`db`]) and the admin requests that
//! drive them ([`service`]).

pub mod lifecycle;
pub mod service;
pub mod tasks;

pub use service::{GroupError, GroupService};
