//! The delivery-group engine: the scaling rules of SPEC sections 4 and 5 as a
//! pure state machine, and the billing rules of section 6.
//!
//! Inputs and `now` go in, [`Decision`]s (each with its [`Reason`]) and the next
//! deadline come out. The engine never reads a clock, never awaits, never does
//! I/O and uses no floats, so the live broker's group actor and `ferryctl
//! simulate` drive one implementation of the rules, and a test can jump virtual
//! time from deadline to deadline.
//!
//! Driving it: call [`Group::handle`] for each input, [`Group::handle_due`] with
//! the provider completions due at an instant (or [`Group::handle_timeout`] when
//! [`Group::poll_deadline`] is reached), and drain [`Group::drain_decisions`].

pub mod billing;
mod decision;
mod explain;
mod group;
mod period;
mod policy;

pub use decision::{Action, Class, Decision, Input, Reason, ResourceState};
pub use explain::{Explanation, PeriodView, ScaleInView, ScaleOutView, Snapshot};
pub use group::{EngineError, Group, Resource};
pub use group::{RestoredElastic, RestoredState};
pub use policy::{
    catalog_max_sessions, validate_periods, DisplayPolicy, LoadBalancing, Policy, PolicyError,
    PolicyPeriod, PolicyProblem, QualityStrategy, Retention, SessionPolicy, StreamingMode,
    DEFAULT_FRAME_RATE, DEFAULT_RESOLUTION, DEFAULT_RETENTION, DEFAULT_SCALE_IN_COOLDOWN,
    MAX_CONCURRENT_SESSIONS, MAX_FRAME_RATE, MAX_GROUP_RESOURCES, MAX_PERIODS_PER_DAY,
    MAX_POLICY_DURATION, MAX_RESOLUTION, MAX_RETENTION, MIN_FRAME_RATE, MIN_PERIOD_GAP_MINUTES,
    MIN_PERIOD_MINUTES, MIN_RESOLUTION, MIN_RETENTION, SESSION_END_WARNING, SPEC_CATALOG,
};

#[cfg(test)]
mod tests;
