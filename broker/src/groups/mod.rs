//! Delivery groups as the broker manages them: the pure status machine
//! ([`lifecycle`]), their durable records and the admin requests that drive
//! them ([`service`]), the deadline and notification tasks ([`tasks`]), and
//! the live state of each group, an engine per group fed by agent reports
//! ([`actor`]).

pub mod actor;
pub mod elastic;
pub mod hostfit;
pub mod lifecycle;
pub mod policy_parts;
pub mod service;
pub mod tasks;

pub use actor::GroupActors;
pub use service::{GroupError, GroupService};
