//! The engine's answers to "what would it do now, and why not?": counts for
//! a timeline ([`Snapshot`]) and the verdicts behind the next scaling
//! decision ([`Explanation`]), for `group show` and `ferryctl simulate`.

use std::fmt;

use ferry_common::{ResourceId, UnixMillis};

use super::decision::secs;
use super::period;

/// Counts for a timeline or a status page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Sessions and reservations on resources.
    pub sessions: u64,
    /// Requests waiting for room.
    pub waiting: u64,
    /// `sessions + waiting` (SPEC: demand).
    pub demand: u64,
    /// `(ready and available + pending resources) x concurrent_sessions`.
    pub capacity: u64,
    /// Resources counted in capacity (ready and available, or pending).
    pub resources: u64,
    /// Resources being created.
    pub pending: u32,
    /// Resources whose scale-in is decided and not yet released.
    pub releasing: u32,
    /// Elastic resources pending, ready or releasing (what `max_elastic` bounds).
    pub elastic: u32,
}

/// Whether the group would scale out now, and why (not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScaleOutView {
    /// `demand * 100 <= threshold * capacity`: usage is not above the threshold.
    NotNeeded,
    /// Usage is above the threshold but `max_elastic` elastic resources exist.
    AtMaxElastic,
    /// Usage is above the threshold: the next evaluation creates `count`.
    Due { count: u32 },
}

/// Whether the group would scale in now, and why (not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScaleInView {
    /// No elastic resource is ready, available and without sessions.
    NoIdleElastic,
    /// Usage is above the threshold: removing capacity cannot be right.
    UsageAbove,
    /// The longest-idle candidate has not been idle for `max_idle` yet.
    IdleTooShort {
        resource: ResourceId,
        idle_ms: i64,
        max_idle_ms: i64,
    },
    /// The last scale-in was less than `scale_in_cooldown` ago.
    Cooldown {
        resource: ResourceId,
        remaining_ms: i64,
    },
    /// Scaling it in would push usage above the threshold.
    WouldExceed {
        resource: ResourceId,
        demand: u64,
        threshold: u32,
        capacity_after: u64,
    },
    /// The next evaluation scales this one in.
    Due { resource: ResourceId },
    /// A policy period holds and only `ready <= min_ready` resources are
    /// ready: nothing is scaled in before the period ends.
    HeldByPeriod {
        resource: ResourceId,
        period: u32,
        ready: u64,
        min_ready: u32,
    },
}

impl fmt::Display for ScaleInView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoIdleElastic => f.write_str("No scale-in: no idle elastic resource."),
            Self::UsageAbove => f.write_str("No scale-in: usage is above the threshold."),
            Self::IdleTooShort {
                resource,
                idle_ms,
                max_idle_ms,
            } => write!(
                f,
                "No scale-in: {resource} has been idle {} of max_idle {}.",
                secs(*idle_ms),
                secs(*max_idle_ms)
            ),
            Self::Cooldown {
                resource,
                remaining_ms,
            } => write!(
                f,
                "No scale-in of {resource} yet: cooldown ends in {}.",
                secs(*remaining_ms)
            ),
            Self::WouldExceed {
                resource,
                demand,
                threshold,
                capacity_after,
            } => write!(
                f,
                "No scale-in of {resource}: afterwards demand {demand} x 100 > threshold {threshold} x capacity {capacity_after}."
            ),
            Self::Due { resource } => write!(f, "Scale-in of {resource} due."),
            Self::HeldByPeriod {
                resource,
                period,
                ready,
                min_ready,
            } => write!(
                f,
                "No scale-in of {resource}: period {period} keeps {min_ready} ready and {ready} are."
            ),
        }
    }
}

/// The policy period that holds now, or the next one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeriodView {
    /// A period holds (from its warm-up start to its end).
    Holding {
        period: u32,
        warm_up_at: UnixMillis,
        starts_at: UnixMillis,
        ends_at: UnixMillis,
        min_ready: u32,
        /// Resources ready and available now.
        ready: u64,
        /// Resources being created now.
        pending: u32,
    },
    /// No period holds; this one's warm-up comes next.
    Upcoming {
        period: u32,
        warm_up_at: UnixMillis,
        starts_at: UnixMillis,
        ends_at: UnixMillis,
        min_ready: u32,
    },
}

impl fmt::Display for PeriodView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Holding {
                period,
                warm_up_at,
                starts_at,
                ends_at,
                min_ready,
                ready,
                pending,
            } => write!(
                f,
                "Period {period} ({}-{} UTC, warm-up from {}) holds: keeps {min_ready} ready; {ready} ready, {pending} being created.",
                period::hhmm(starts_at.0, starts_at.0),
                period::hhmm(ends_at.0, starts_at.0),
                period::hhmm(warm_up_at.0, warm_up_at.0),
            ),
            Self::Upcoming {
                period,
                warm_up_at,
                starts_at,
                ends_at,
                min_ready,
            } => write!(
                f,
                "Next period {period}: {} {}-{} UTC (warm-up from {}), keeps {min_ready} ready.",
                period::date(starts_at.0),
                period::hhmm(starts_at.0, starts_at.0),
                period::hhmm(ends_at.0, starts_at.0),
                period::hhmm(warm_up_at.0, warm_up_at.0),
            ),
        }
    }
}

/// The numbers behind the group's next scaling decision: the answer to "why
/// did it (not) scale?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// The instant explained.
    pub at: UnixMillis,
    /// Counts now.
    pub snapshot: Snapshot,
    /// The policy's usage threshold, percent.
    pub threshold: u32,
    /// The policy's `max_elastic`.
    pub max_elastic: u32,
    /// Scale-out verdict.
    pub scale_out: ScaleOutView,
    /// Scale-in verdict.
    pub scale_in: ScaleInView,
    /// The policy period holding now or coming next; `None` without periods.
    pub period: Option<PeriodView>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.snapshot;
        write!(
            f,
            "demand {} ({} sessions + {} waiting), capacity {} on {} resources; threshold {}%. ",
            s.demand, s.sessions, s.waiting, s.capacity, s.resources, self.threshold
        )?;
        match &self.scale_out {
            ScaleOutView::NotNeeded => write!(
                f,
                "No scale-out: {} x 100 <= {} x {}. ",
                s.demand, self.threshold, s.capacity
            )?,
            ScaleOutView::AtMaxElastic => write!(
                f,
                "No scale-out although usage is above the threshold: {} elastic resources is the maximum ({}). ",
                s.elastic, self.max_elastic
            )?,
            ScaleOutView::Due { count } => write!(f, "Scale-out of {count} due. ")?,
        }
        write!(f, "{}", self.scale_in)?;
        if let Some(p) = &self.period {
            write!(f, " {p}")?;
        }
        Ok(())
    }
}
