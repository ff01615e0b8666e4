//! Delivery groups as the broker manages them: the pure status machine
//! ([`lifecycle`]), their durable records and the admin requests that drive
//! them ([`service`]), the deadline and notification tasks ([`tasks`]), and
//! the live state of each group, an engine per group fed by agent reports
//! ([`actor`]), and the two together as the rest of the broker uses them
//! ([`Groups`]: a change an actor must follow brings it in line).

pub mod actor;
mod facade;

pub mod hostfit;
pub mod lifecycle;
pub mod policy_parts;
pub mod service;
pub mod tasks;

pub use actor::{ActorsParts, GroupActors};
pub use facade::Groups;

/// Wait after a store failure before trying again, so a broken disk does not
/// spin a task.
pub const RETRY_AFTER_ERROR: std::time::Duration = std::time::Duration::from_secs(5);
pub use service::{GroupError, GroupService};
