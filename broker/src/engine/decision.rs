//! The engine's vocabulary: what goes in ([`Input`]) and what comes out
//! ([`Decision`]: an [`Action`] with the [`Reason`] an operator reads).
//!
//! Every reason carries the numbers that caused its decision, and its
//! `Display` is the sentence `group events` and `ferryctl simulate` show, so
//! "why did it scale?" is answered by the decision itself.

use std::fmt;

use ferry_common::{ResourceId, SessionId, UnixMillis};

use super::period::{self, Occurrence};
use super::policy::{LoadBalancing, Policy};

/// Base or elastic. Base resources are tried first and never scaled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    Base = 0,
    Elastic = 1,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Elastic => "elastic",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lifecycle of a resource (SPEC section 1). Only `Ready` resources take sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResourceState {
    Pending,
    Ready,
    Releasing,
    Released,
}

impl fmt::Display for ResourceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pending => "pending",
            Self::Ready => "ready",
            Self::Releasing => "releasing",
            Self::Released => "released",
        })
    }
}

/// Something that happened to the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A session arrives and connects as soon as it is placed (no ticket): what a
    /// scenario's `connect` means.
    Arrive { session: SessionId },
    /// A routing request: when placed, its slot is reserved by a ticket until
    /// [`Input::Connected`] or [`Input::Leave`].
    Route { session: SessionId },
    /// The client of a placed routing request arrived: the reservation becomes a
    /// session on the same slot.
    Connected { session: SessionId },
    /// A session ended, an unused ticket expired, or a waiting request was
    /// withdrawn; frees its slot or its place in the queue.
    Leave { session: SessionId },
    /// A pending resource became ready.
    Created { resource: ResourceId },
    /// A releasing resource is gone.
    Released { resource: ResourceId },
    /// A pending resource could not be created (the provisioner gave up, or
    /// its agent never registered): it leaves capacity and `max_elastic` at
    /// once, unbilled (it was never ready), as [`Action::Released`].
    CreateFailed { resource: ResourceId },
    /// A resource stops taking sessions (draining, unhealthy, being updated).
    Unavailable { resource: ResourceId },
    /// A resource takes sessions again.
    Available { resource: ResourceId },
    /// A new scaling policy; validated first, and on error nothing changes.
    Policy(Policy),
    /// A session already running on a resource (the live broker learns of
    /// sessions from the hosts, which started them without asking): it
    /// counts in occupancy and demand at once, even past the resource's
    /// `concurrent_sessions`, because the host has it whatever the engine
    /// thinks. No decision is made for it; the evaluation that follows may
    /// scale out.
    Occupy {
        session: SessionId,
        resource: ResourceId,
    },
    /// A reservation made before this engine existed (a broker restarted, or
    /// another broker took the group over): its ticket is out and its
    /// client not arrived. It holds its slot on `resource` as a placed
    /// [`Input::Route`] does, until [`Input::Connected`] or
    /// [`Input::Leave`]; like [`Input::Occupy`] it is counted even past the
    /// resource's `concurrent_sessions`, and no decision is made for it.
    Reserved {
        session: SessionId,
        resource: ResourceId,
    },
}

/// What the engine decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A request got a slot on a resource.
    Placed {
        session: SessionId,
        resource: ResourceId,
    },
    /// A request was refused: no room at once (`wait_timeout` 0) or in time.
    Rejected { session: SessionId },
    /// Elastic resources asked of the provider, in creation order.
    ScaleOut { resources: Vec<ResourceId> },
    /// A pending resource became ready (reported by the provider).
    Created { resource: ResourceId },
    /// An elastic resource is to be released.
    ScaleIn { resource: ResourceId },
    /// A releasing resource is gone (reported by the provider).
    Released { resource: ResourceId },
}

impl Action {
    /// The action's name in scenario output and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Placed { .. } => "placed",
            Self::Rejected { .. } => "rejected",
            Self::ScaleOut { .. } => "scale_out",
            Self::Created { .. } => "created",
            Self::ScaleIn { .. } => "scale_in",
            Self::Released { .. } => "released",
        }
    }
}

/// The numbers that caused a decision, so an operator can ask why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Placement: the chosen resource's class, the strategy, its occupancy before
    /// and how long the request waited.
    Placement {
        class: Class,
        load_balancing: LoadBalancing,
        occupancy_before: u32,
        waited_ms: i64,
    },
    /// No ready resource had room, at arrival or until the wait ran out.
    NoRoom {
        waited_ms: i64,
        wait_timeout_ms: i64,
        demand: u64,
        capacity: u64,
    },
    /// `demand * 100 > threshold * capacity` with room under `max_elastic`.
    ScaleOut {
        demand: u64,
        capacity: u64,
        threshold: u32,
        elastic_before: u32,
        max_elastic: u32,
        step: u32,
    },
    /// Idle long enough, past the cooldown, and usage stays at or under the
    /// threshold afterwards.
    ScaleIn {
        idle_ms: i64,
        max_idle_ms: i64,
        demand: u64,
        capacity_after: u64,
        threshold: u32,
        cooldown_ms: i64,
        since_last_scale_in_ms: Option<i64>,
    },
    /// The provider reported the work done.
    Provider,
    /// A policy period (scheduled scaling) holds: from `warm_up_at` to
    /// `ends_at` the group keeps `min_ready` resources ready, and only
    /// `ready_or_pending` were ready or being created.
    Period {
        /// The period's number in the policy, from 1.
        period: u32,
        /// When its warm-up began (`starts_at - warm_up`).
        warm_up_at: UnixMillis,
        /// Its start on this day.
        starts_at: UnixMillis,
        /// Its end on this day.
        ends_at: UnixMillis,
        /// Resources it keeps ready.
        min_ready: u32,
        /// Resources ready (and available) or pending before the decision.
        ready_or_pending: u64,
        /// Elastic resources before the decision.
        elastic_before: u32,
        /// The policy's `max_elastic`.
        max_elastic: u32,
    },
}

pub(super) fn secs(ms: i64) -> String {
    let d = std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    ferry_common::duration::format_duration(d)
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Placement {
                class,
                load_balancing,
                occupancy_before,
                waited_ms,
            } => {
                match class {
                    Class::Base => f.write_str("base resources first")?,
                    Class::Elastic => f.write_str("no base resource had room")?,
                }
                write!(
                    f,
                    "; {load_balancing}: it had {occupancy_before} session(s)"
                )?;
                if *waited_ms > 0 {
                    write!(f, ", after waiting {}", secs(*waited_ms))?;
                }
                Ok(())
            }
            Self::NoRoom {
                waited_ms,
                wait_timeout_ms,
                demand,
                capacity,
            } => write!(
                f,
                "no ready resource had room after {} (wait_timeout {}); demand {demand}, capacity {capacity}",
                secs(*waited_ms),
                secs(*wait_timeout_ms)
            ),
            Self::ScaleOut {
                demand,
                capacity,
                threshold,
                elastic_before,
                max_elastic,
                step,
            } => write!(
                f,
                "demand {demand} x 100 > threshold {threshold} x capacity {capacity}; elastic {elastic_before} of max {max_elastic}, step {step}"
            ),
            Self::ScaleIn {
                idle_ms,
                max_idle_ms,
                demand,
                capacity_after,
                threshold,
                cooldown_ms,
                since_last_scale_in_ms,
            } => {
                write!(
                    f,
                    "idle {} >= max_idle {}; afterwards demand {demand} x 100 <= threshold {threshold} x capacity {capacity_after}",
                    secs(*idle_ms),
                    secs(*max_idle_ms)
                )?;
                match since_last_scale_in_ms {
                    Some(ms) => write!(
                        f,
                        "; {} since the last scale-in >= cooldown {}",
                        secs(*ms),
                        secs(*cooldown_ms)
                    ),
                    None => write!(f, "; first scale-in"),
                }
            }
            Self::Provider => f.write_str("reported by the provider"),
            Self::Period {
                period,
                warm_up_at,
                starts_at,
                ends_at,
                min_ready,
                ready_or_pending,
                elastic_before,
                max_elastic,
            } => write!(
                f,
                "period {period} ({}-{} UTC, warm-up from {}) keeps {min_ready} resource(s) ready; {ready_or_pending} ready or being created; elastic {elastic_before} of max {max_elastic}",
                period::hhmm(starts_at.0, starts_at.0),
                period::hhmm(ends_at.0, starts_at.0),
                period::hhmm(warm_up_at.0, warm_up_at.0),
            ),
        }
    }
}

/// A decision with its time and cause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The instant of its cause (an input, a completion or a deadline).
    pub at: UnixMillis,
    /// What was decided.
    pub action: Action,
    /// Why.
    pub reason: Reason,
}

/// The number operators read for a policy period: its place in the policy, from 1.
pub(super) fn period_number(o: &Occurrence) -> u32 {
    u32::try_from(o.index + 1).unwrap_or(u32::MAX)
}
