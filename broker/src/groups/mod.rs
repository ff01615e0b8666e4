//! Delivery groups as the broker manages them: the pure status machine
//! ([`lifecycle`]), their durable records and the admin requests that drive
//! them ([`service`]), the deadline and notification tasks ([`tasks`]), and
//! the live state of each group, an engine per group fed by agent reports
//! ([`actor`]); beside them the policy parts beyond scaling
//! ([`policy_parts`]) and the host-size check ([`hostfit`]).
//!
//! The daemon builds one `GroupService` and one `GroupActors` and pairs them
//! in the [`Groups`] facade the admin socket uses: a
//! write verb commits through the service, then brings the group's actor in
//! line (started, told to reread its row, or stopped), so no caller has to
//! remember to. The service never reaches an actor; the actors use the
//! service (lifecycle deadlines) but never the facade.

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
