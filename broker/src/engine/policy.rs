//! A delivery group's scaling policy (SPEC section 4) and its validation.
//!
//! Validation collects every problem before refusing, so an operator fixes a
//! policy in one round instead of one error at a time.
//!
//! `max_idle` must be above zero, in a live group and in a scenario alike:
//! with zero an elastic resource would be released the instant its last
//! session ends, so every lull between two users would cost a scale-in and
//! the next one a scale-out (SPEC 4 (E) is a time to stay idle, not a
//! switch). Scale in soon with a short one (`1m`), never with zero.
//!
//! Policy periods (scheduled scaling, where the spec is silent): a period
//! lies inside one UTC day (`end` may be `24:00`), lasts at least
//! [`MIN_PERIOD_MINUTES`], is at least [`MIN_PERIOD_GAP_MINUTES`] from the
//! day's other periods (at most [`MAX_PERIODS_PER_DAY`]), and its
//! `min_ready` is at least 1 and at most `base + max_elastic`.

use std::fmt;
use std::time::Duration;

use ferry_common::duration::format_duration;
use serde::{Deserialize, Serialize};

/// Most resources of one class (base or elastic) a group may have. The engine keeps
/// one entry per resource in memory and ids are `e1`, `e2`, ...; a value from a
/// scenario file or an admin request above this is a typo, not a fleet.
pub const MAX_GROUP_RESOURCES: u32 = 100_000;

/// Most concurrent sessions on one resource when no spec names a limit. The spec
/// catalog's largest host takes 6; 1,000 leaves room for unusual hosts while keeping
/// `demand * 100` and `capacity * threshold` far from overflowing.
pub const MAX_CONCURRENT_SESSIONS: u32 = 1_000;

/// Longest policy duration (idle time, cooldown, wait). A year is far beyond any
/// sensible value and keeps millisecond arithmetic on `i64` far from overflow.
pub const MAX_POLICY_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Default least time between two scale-ins of one group (SPEC section 4).
pub const DEFAULT_SCALE_IN_COOLDOWN: Duration = Duration::from_secs(60);

/// Specs the broker knows and the most concurrent sessions each takes (SPEC section 4).
pub const SPEC_CATALOG: &[(&str, u32)] =
    &[("office-4c8g", 2), ("design-8c16g", 4), ("gpu-14c93g", 6)];

/// The most concurrent sessions of a catalog spec, `None` for an unknown spec.
pub fn catalog_max_sessions(spec: &str) -> Option<u32> {
    SPEC_CATALOG
        .iter()
        .find(|(name, _)| *name == spec)
        .map(|(_, max)| *max)
}

/// Which resource of a class takes the next session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancing {
    /// The resource with the fewest sessions: spreads load, keeps hosts responsive.
    #[default]
    BreadthFirst,
    /// The fullest resource that still has room: packs sessions so elastic
    /// resources empty out and can be scaled in sooner.
    DepthFirst,
}

impl LoadBalancing {
    /// Reads the scenario / config spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "breadth-first" => Some(Self::BreadthFirst),
            "depth-first" => Some(Self::DepthFirst),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BreadthFirst => "breadth-first",
            Self::DepthFirst => "depth-first",
        }
    }
}

impl fmt::Display for LoadBalancing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scaling part of a delivery group's policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// (A) Sessions one resource takes at once; also the slot count per resource
    /// in `capacity`.
    pub concurrent_sessions: u32,
    /// (B) Percent of capacity above which the group scales out (1..=100).
    pub usage_threshold: u32,
    /// (C) Elastic resources created by one scale-out (at most up to `max_elastic`).
    pub scale_out_step: u32,
    /// (D) Most elastic resources pending, ready or releasing at once.
    pub max_elastic: u32,
    /// (E) How long an elastic resource stays without sessions before it may be
    /// scaled in.
    pub max_idle: Duration,
    /// Least time between two scale-ins of the group, so a brief lull does not
    /// drain everything at once.
    pub scale_in_cooldown: Duration,
    /// How long a routing request may wait for room; zero refuses at once.
    pub wait_timeout: Duration,
    /// Placement strategy inside each class of resource.
    pub load_balancing: LoadBalancing,
    /// Scheduled-scaling periods (SPEC section 4); empty = none. A policy
    /// stored before periods existed loads with none.
    #[serde(default)]
    pub periods: Vec<PolicyPeriod>,
}

impl Policy {
    /// A policy with the spec's defaults for the parameters that have one.
    pub fn new(
        concurrent_sessions: u32,
        usage_threshold: u32,
        scale_out_step: u32,
        max_elastic: u32,
        max_idle: Duration,
    ) -> Self {
        Self {
            concurrent_sessions,
            usage_threshold,
            scale_out_step,
            max_elastic,
            max_idle,
            scale_in_cooldown: DEFAULT_SCALE_IN_COOLDOWN,
            wait_timeout: Duration::ZERO,
            load_balancing: LoadBalancing::BreadthFirst,
            periods: Vec::new(),
        }
    }

    /// Checks every parameter against SPEC section 4 and, when `spec` is given,
    /// against the spec catalog. Lists every problem, not just the first.
    ///
    /// Periods are checked too, except that `min_ready` is only bounded by
    /// what any group may hold: how many base resources the group has is not
    /// part of the policy. [`Policy::validate_for_group`] adds that bound; the
    /// engine uses it, since a group knows its base count.
    pub fn validate(&self, spec: Option<&str>) -> Result<(), PolicyError> {
        self.check(spec, None)
    }

    /// [`Policy::validate`], plus every period's `min_ready` within
    /// `base_count + max_elastic` (what the group can have ready at most).
    pub fn validate_for_group(
        &self,
        spec: Option<&str>,
        base_count: u32,
    ) -> Result<(), PolicyError> {
        self.check(spec, Some(base_count))
    }

    fn check(&self, spec: Option<&str>, base_count: Option<u32>) -> Result<(), PolicyError> {
        let mut problems = Vec::new();
        let mut add = |field: &'static str, message: String| {
            problems.push(PolicyProblem { field, message });
        };
        if self.concurrent_sessions < 1 {
            add("concurrent_sessions", "must be at least 1".into());
        } else if self.concurrent_sessions > MAX_CONCURRENT_SESSIONS {
            add(
                "concurrent_sessions",
                format!(
                    "{} is above the limit of {MAX_CONCURRENT_SESSIONS}",
                    self.concurrent_sessions
                ),
            );
        }
        if let Some(spec) = spec {
            match catalog_max_sessions(spec) {
                Some(max) if self.concurrent_sessions > max => add(
                    "concurrent_sessions",
                    format!(
                        "{} is above the {max} sessions spec {spec} takes",
                        self.concurrent_sessions
                    ),
                ),
                Some(_) => {}
                None => {
                    let known: Vec<&str> = SPEC_CATALOG.iter().map(|(n, _)| *n).collect();
                    add(
                        "spec",
                        format!("unknown spec {spec:?}; known: {}", known.join(", ")),
                    );
                }
            }
        }
        if !(1..=100).contains(&self.usage_threshold) {
            add(
                "usage_threshold",
                format!("{} is not a percent in 1..=100", self.usage_threshold),
            );
        }
        if self.scale_out_step < 1 {
            add("scale_out_step", "must be at least 1".into());
        } else if self.scale_out_step > MAX_GROUP_RESOURCES {
            add(
                "scale_out_step",
                format!(
                    "{} is above the limit of {MAX_GROUP_RESOURCES}",
                    self.scale_out_step
                ),
            );
        }
        if self.max_elastic > MAX_GROUP_RESOURCES {
            add(
                "max_elastic",
                format!(
                    "{} is above the limit of {MAX_GROUP_RESOURCES}",
                    self.max_elastic
                ),
            );
        }
        if self.max_idle.is_zero() {
            add(
                "max_idle",
                "must be above zero: an elastic resource would be released the instant its \
                 last session ends (write e.g. 10m)"
                    .into(),
            );
        }
        for (field, d) in [
            ("max_idle", self.max_idle),
            ("scale_in_cooldown", self.scale_in_cooldown),
            ("wait_timeout", self.wait_timeout),
        ] {
            if d > MAX_POLICY_DURATION {
                add(
                    field,
                    format!(
                        "{} is longer than the limit of 366 days",
                        format_duration(d)
                    ),
                );
            }
        }
        problems.extend(period_problems(&self.periods, base_count, self.max_elastic));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PolicyError { problems })
        }
    }

    pub(crate) fn max_idle_ms(&self) -> i64 {
        duration_ms(self.max_idle)
    }

    pub(crate) fn cooldown_ms(&self) -> i64 {
        duration_ms(self.scale_in_cooldown)
    }

    pub(crate) fn wait_timeout_ms(&self) -> i64 {
        duration_ms(self.wait_timeout)
    }
}

/// How long a disconnected session is kept for its user to reconnect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Retention {
    /// Kept until the user comes back (`-1` in the console).
    Forever,
    /// Kept this long (3..=300 minutes), then ended.
    For(Duration),
}

/// Shortest and longest finite `disconnect_retention` (SPEC section 4).
pub const MIN_RETENTION: Duration = Duration::from_secs(3 * 60);
pub const MAX_RETENTION: Duration = Duration::from_secs(300 * 60);
/// Default `disconnect_retention`.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(15 * 60);
/// How long before `max_session_duration` the user is warned; a shorter
/// maximum would warn before the session even starts.
pub const SESSION_END_WARNING: Duration = Duration::from_secs(5 * 60);

/// The session part of the policy, carried out by the agents. A retained
/// session keeps its slot: the broker reports its end to the engine only when
/// the retention runs out, so demand counts it meanwhile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionPolicy {
    /// How long a disconnected session is kept for a reconnect.
    pub disconnect_retention: Retention,
    /// Longest a session may last; the user is warned `SESSION_END_WARNING` (5 minutes) before.
    pub max_session_duration: Option<Duration>,
    /// A session idle this long is disconnected.
    pub idle_disconnect: Option<Duration>,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        Self {
            disconnect_retention: Retention::For(DEFAULT_RETENTION),
            max_session_duration: None,
            idle_disconnect: None,
        }
    }
}

impl SessionPolicy {
    /// Checks every field; lists every problem.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let mut problems = Vec::new();
        if let Retention::For(d) = self.disconnect_retention {
            if d < MIN_RETENTION || d > MAX_RETENTION {
                problems.push(PolicyProblem {
                    field: "disconnect_retention",
                    message: format!(
                        "{} is not -1 (forever) or 3..=300 minutes",
                        format_duration(d)
                    ),
                });
            }
        }
        if let Some(d) = self.max_session_duration {
            if d <= SESSION_END_WARNING || d > MAX_POLICY_DURATION {
                problems.push(PolicyProblem {
                    field: "max_session_duration",
                    message: format!(
                        "{} must be longer than the 5 minute warning and at most 366 days",
                        format_duration(d)
                    ),
                });
            }
        }
        if let Some(d) = self.idle_disconnect {
            // Agents receive it in whole milliseconds: under one would reach
            // them as 0, which they refuse.
            if d < Duration::from_millis(1) || d > MAX_POLICY_DURATION {
                problems.push(PolicyProblem {
                    field: "idle_disconnect",
                    message: format!(
                        "{} must be at least 1ms and at most 366 days",
                        format_duration(d)
                    ),
                });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PolicyError { problems })
        }
    }
}

/// How the host's streaming server encodes a session (SPEC section 4, display).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamingMode {
    /// The whole screen as video.
    #[default]
    Video,
    /// Video for moving regions, images for the rest (text stays sharp).
    Mixed,
}

impl StreamingMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "video" => Some(Self::Video),
            "mixed" => Some(Self::Mixed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Video => "video",
            Self::Mixed => "mixed",
        }
    }
}

/// What the streaming server favours when bandwidth is short.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QualityStrategy {
    /// Follows the network: the server picks.
    #[default]
    Adaptive,
    /// Keeps the frame rate, lowers the image quality.
    Smooth,
    /// Keeps the image quality, lowers the frame rate.
    Quality,
}

impl QualityStrategy {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "adaptive" => Some(Self::Adaptive),
            "smooth" => Some(Self::Smooth),
            "quality" => Some(Self::Quality),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Adaptive => "adaptive",
            Self::Smooth => "smooth",
            Self::Quality => "quality",
        }
    }
}

/// Frame rates a group may ask for (frames per second). The seed names no
/// limits; 1..=60 covers every desktop streaming server's settings.
pub const MIN_FRAME_RATE: u32 = 1;
pub const MAX_FRAME_RATE: u32 = 60;
/// Default frame rate.
pub const DEFAULT_FRAME_RATE: u32 = 30;
/// Smallest session resolution (width, height): anything smaller is unusable.
pub const MIN_RESOLUTION: (u32, u32) = (640, 480);
/// Largest session resolution: 8K UHD.
pub const MAX_RESOLUTION: (u32, u32) = (7680, 4320);
/// Default session resolution: full HD.
pub const DEFAULT_RESOLUTION: (u32, u32) = (1920, 1080);

/// The display part of the policy: handed by the agent to the host's streaming
/// server as is. The engine never looks at it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplayPolicy {
    /// Frames per second.
    pub frame_rate: u32,
    /// Session resolution, pixels.
    pub width: u32,
    pub height: u32,
    /// The resolution becomes a maximum: the session follows the client's window.
    pub adaptive_resolution: bool,
    pub streaming_mode: StreamingMode,
    pub quality_strategy: QualityStrategy,
}

impl Default for DisplayPolicy {
    fn default() -> Self {
        Self {
            frame_rate: DEFAULT_FRAME_RATE,
            width: DEFAULT_RESOLUTION.0,
            height: DEFAULT_RESOLUTION.1,
            adaptive_resolution: true,
            streaming_mode: StreamingMode::Video,
            quality_strategy: QualityStrategy::Adaptive,
        }
    }
}

impl DisplayPolicy {
    /// Checks every field; lists every problem.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let mut problems = Vec::new();
        if !(MIN_FRAME_RATE..=MAX_FRAME_RATE).contains(&self.frame_rate) {
            problems.push(PolicyProblem {
                field: "frame_rate",
                message: format!(
                    "{} is not in {MIN_FRAME_RATE}..={MAX_FRAME_RATE} frames per second",
                    self.frame_rate
                ),
            });
        }
        let (w, h) = (self.width, self.height);
        if !(MIN_RESOLUTION.0..=MAX_RESOLUTION.0).contains(&w)
            || !(MIN_RESOLUTION.1..=MAX_RESOLUTION.1).contains(&h)
            || w % 2 != 0
            || h % 2 != 0
        {
            problems.push(PolicyProblem {
                field: "resolution",
                message: format!(
                    "{w}x{h} is not an even width x height from {}x{} to {}x{}",
                    MIN_RESOLUTION.0, MIN_RESOLUTION.1, MAX_RESOLUTION.0, MAX_RESOLUTION.1
                ),
            });
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PolicyError { problems })
        }
    }
}

/// Most scheduled periods on one weekday (SPEC section 4).
pub const MAX_PERIODS_PER_DAY: usize = 3;
/// Shortest period, in minutes.
pub const MIN_PERIOD_MINUTES: u16 = 15;
/// Least gap between two periods of one day, in minutes.
pub const MIN_PERIOD_GAP_MINUTES: u16 = 5;
/// Minutes in a day: a period ends at the latest at 24:00.
pub const MINUTES_PER_DAY: u16 = 24 * 60;

/// A scheduled-scaling period: on the chosen weekdays, from `start` to `end`
/// (minutes after midnight UTC), at least `min_ready` resources are kept ready.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyPeriod {
    /// Weekdays it applies on, bit 0 = Monday ... bit 6 = Sunday.
    pub weekdays: u8,
    /// Start, minutes after midnight.
    pub start_minute: u16,
    /// End, minutes after midnight (at most 1440).
    pub end_minute: u16,
    /// Resources kept ready during the period.
    pub min_ready: u32,
    /// How long before `start` elastic resources are created to be ready in time.
    pub warm_up: Duration,
}

fn hhmm(m: u16) -> String {
    format!("{:02}:{:02}", m / 60, m % 60)
}

/// Checks a day's schedule: at most 3 periods per weekday, each at least 15
/// minutes inside one day, not overlapping and at least 5 minutes apart, and
/// `min_ready` reachable with `base_count + max_elastic` resources.
pub fn validate_periods(
    periods: &[PolicyPeriod],
    base_count: u32,
    max_elastic: u32,
) -> Result<(), PolicyError> {
    let problems = period_problems(periods, Some(base_count), max_elastic);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PolicyError { problems })
    }
}

/// Every problem of a schedule; without `base_count`, `min_ready` is bounded
/// by the most base resources any group may have.
fn period_problems(
    periods: &[PolicyPeriod],
    base_count: Option<u32>,
    max_elastic: u32,
) -> Vec<PolicyProblem> {
    let mut problems = Vec::new();
    let mut add = |message: String| {
        problems.push(PolicyProblem {
            field: "periods",
            message,
        })
    };
    for (n, p) in periods.iter().enumerate() {
        let name = format!(
            "period {} ({}-{})",
            n + 1,
            hhmm(p.start_minute),
            hhmm(p.end_minute)
        );
        if p.weekdays & 0x7f == 0 || p.weekdays & 0x80 != 0 {
            add(format!(
                "{name}: choose weekdays (bits 0..=6, Monday..Sunday)"
            ));
        }
        if p.end_minute > MINUTES_PER_DAY || p.start_minute >= p.end_minute {
            add(format!("{name}: must start before it ends, inside one day"));
        } else if p.end_minute - p.start_minute < MIN_PERIOD_MINUTES {
            add(format!("{name}: shorter than {MIN_PERIOD_MINUTES} minutes"));
        }
        let most = u64::from(base_count.unwrap_or(MAX_GROUP_RESOURCES)) + u64::from(max_elastic);
        if p.min_ready == 0 {
            add(format!("{name}: min_ready must be at least 1"));
        } else if u64::from(p.min_ready) > most {
            match base_count {
                Some(base_count) => add(format!(
                    "{name}: min_ready {} is more than {base_count} base + {max_elastic} elastic resources",
                    p.min_ready
                )),
                None => add(format!(
                    "{name}: min_ready {} is more than any group can have ready ({MAX_GROUP_RESOURCES} base + {max_elastic} elastic)",
                    p.min_ready
                )),
            }
        }
        if p.warm_up > Duration::from_secs(24 * 3600) {
            add(format!("{name}: warm_up is longer than a day"));
        }
    }
    for day in 0..7u8 {
        let mut today: Vec<(usize, &PolicyPeriod)> = periods
            .iter()
            .enumerate()
            .filter(|(_, p)| p.weekdays & (1 << day) != 0)
            .collect();
        const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
        if today.len() > MAX_PERIODS_PER_DAY {
            add(format!(
                "{}: {} periods, at most {MAX_PERIODS_PER_DAY} a day",
                DAYS[usize::from(day)],
                today.len()
            ));
        }
        today.sort_by_key(|(_, p)| p.start_minute);
        for pair in today.windows(2) {
            let ((a, pa), (b, pb)) = (pair[0], pair[1]);
            if pb.start_minute < pa.end_minute.saturating_add(MIN_PERIOD_GAP_MINUTES) {
                add(format!(
                    "{}: periods {} and {} overlap or are less than {MIN_PERIOD_GAP_MINUTES} minutes apart",
                    DAYS[usize::from(day)],
                    a + 1,
                    b + 1
                ));
            }
        }
    }
    problems
}

/// Milliseconds of a validated policy duration (bounded by [`MAX_POLICY_DURATION`]).
fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// One thing wrong with a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyProblem {
    /// The parameter (`concurrent_sessions`, ..., or `spec`), so a caller can point
    /// at the line or form field it came from.
    pub field: &'static str,
    /// What is wrong, in words an operator understands.
    pub message: String,
}

/// A refused policy, with every problem found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    /// Every problem, in parameter order; never empty.
    pub problems: Vec<PolicyProblem>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid policy: ")?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", p.field, p.message)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Policy {
        Policy::new(2, 85, 2, 2, Duration::from_secs(3600))
    }

    #[test]
    fn seed_policy_is_valid_for_its_spec() {
        assert_eq!(seed().validate(Some("office-4c8g")), Ok(()));
        assert_eq!(seed().validate(None), Ok(()));
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let mut p = seed();
        p.concurrent_sessions = 3;
        p.usage_threshold = 0;
        p.scale_out_step = 0;
        p.max_elastic = MAX_GROUP_RESOURCES + 1;
        p.wait_timeout = MAX_POLICY_DURATION + Duration::from_secs(1);
        let err = p.validate(Some("office-4c8g")).unwrap_err();
        let fields: Vec<_> = err.problems.iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            [
                "concurrent_sessions",
                "usage_threshold",
                "scale_out_step",
                "max_elastic",
                "wait_timeout"
            ]
        );
        assert!(err
            .to_string()
            .contains("above the 2 sessions spec office-4c8g"));
    }

    #[test]
    fn a_zero_max_idle_is_refused_with_the_reason() {
        let mut p = seed();
        p.max_idle = Duration::ZERO;
        p.usage_threshold = 101;
        let err = p.validate(None).unwrap_err();
        let fields: Vec<_> = err.problems.iter().map(|p| p.field).collect();
        assert_eq!(fields, ["usage_threshold", "max_idle"], "{err}");
        assert!(
            err.to_string().contains("max_idle: must be above zero"),
            "{err}"
        );
        p.usage_threshold = 85;
        p.max_idle = Duration::from_millis(1);
        assert_eq!(p.validate(None), Ok(()));
    }

    #[test]
    fn catalog_limits() {
        let mut p = seed();
        p.concurrent_sessions = 4;
        assert!(p.validate(Some("design-8c16g")).is_ok());
        p.concurrent_sessions = 5;
        assert!(p.validate(Some("design-8c16g")).is_err());
        p.concurrent_sessions = 6;
        assert!(p.validate(Some("gpu-14c93g")).is_ok());
        p.concurrent_sessions = 7;
        assert!(p.validate(Some("gpu-14c93g")).is_err());
        let err = seed().validate(Some("tiny")).unwrap_err();
        assert_eq!(err.problems[0].field, "spec");
    }

    #[test]
    fn session_policy_ranges() {
        assert!(SessionPolicy::default().validate().is_ok());
        let mut s = SessionPolicy {
            disconnect_retention: Retention::Forever,
            ..SessionPolicy::default()
        };
        assert!(s.validate().is_ok());
        s.disconnect_retention = Retention::For(Duration::from_secs(2 * 60));
        s.max_session_duration = Some(Duration::from_secs(5 * 60));
        s.idle_disconnect = Some(Duration::ZERO);
        let err = s.validate().unwrap_err();
        assert_eq!(err.problems.len(), 3, "{err}");
        s.disconnect_retention = Retention::For(Duration::from_secs(300 * 60));
        s.max_session_duration = Some(Duration::from_secs(6 * 60));
        s.idle_disconnect = Some(Duration::from_secs(60));
        assert!(s.validate().is_ok());
    }

    #[test]
    fn an_idle_disconnect_under_a_millisecond_is_refused() {
        // The policy document carries it in whole milliseconds: 0.5 ms
        // would reach agents as 0, which they refuse.
        let mut s = SessionPolicy {
            idle_disconnect: Some(Duration::from_micros(500)),
            ..SessionPolicy::default()
        };
        let err = s.validate().unwrap_err();
        assert_eq!(err.problems[0].field, "idle_disconnect", "{err}");
        s.idle_disconnect = Some(Duration::from_millis(1));
        assert!(s.validate().is_ok());
    }

    #[test]
    fn display_policy_ranges() {
        assert!(DisplayPolicy::default().validate().is_ok());
        let mut d = DisplayPolicy {
            frame_rate: 60,
            width: 7680,
            height: 4320,
            ..DisplayPolicy::default()
        };
        assert!(d.validate().is_ok());
        d.frame_rate = 0;
        d.width = 1921;
        let err = d.validate().unwrap_err();
        let fields: Vec<_> = err.problems.iter().map(|p| p.field).collect();
        assert_eq!(fields, ["frame_rate", "resolution"], "{err}");
        d.frame_rate = 61;
        d.width = 640;
        d.height = 478;
        assert_eq!(d.validate().unwrap_err().problems.len(), 2);
        assert_eq!(StreamingMode::parse("mixed"), Some(StreamingMode::Mixed));
        assert_eq!(StreamingMode::parse("audio"), None);
        assert_eq!(
            QualityStrategy::parse("smooth"),
            Some(QualityStrategy::Smooth)
        );
        assert_eq!(QualityStrategy::Quality.as_str(), "quality");
    }

    fn period(days: u8, start: u16, end: u16) -> PolicyPeriod {
        PolicyPeriod {
            weekdays: days,
            start_minute: start,
            end_minute: end,
            min_ready: 2,
            warm_up: Duration::from_secs(600),
        }
    }

    #[test]
    fn period_rules() {
        let ok = [
            period(0b1, 540, 555),
            period(0b1, 560, 600),
            period(0b11, 1000, 1440),
        ];
        assert!(validate_periods(&ok, 2, 0).is_ok());
        // too short, overlapping, too close, fourth on Monday, no weekday, min_ready.
        let bad = [
            period(0b1, 540, 550),
            period(0b1, 545, 600),
            period(0b1, 603, 700),
            period(0b1, 800, 900),
            period(0, 100, 200),
        ];
        let err = validate_periods(&bad, 1, 0).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("shorter than 15"), "{text}");
        assert!(text.contains("at most 3 a day"), "{text}");
        assert!(text.contains("periods 1 and 2 overlap"), "{text}");
        assert!(
            text.contains("periods 2 and 3 overlap or are less than 5"),
            "{text}"
        );
        assert!(text.contains("choose weekdays"), "{text}");
        assert!(text.contains("min_ready 2 is more than 1 base"), "{text}");
        assert!(validate_periods(&[period(1, 600, 1441)], 2, 0).is_err());
    }

    #[test]
    fn a_group_checks_min_ready_against_its_base_count() {
        let mut p = seed();
        p.periods = vec![period(0b1, 480, 540)];
        p.periods[0].min_ready = 4;
        // 2 elastic + up to MAX_GROUP_RESOURCES base: fine without a group.
        assert!(p.validate(None).is_ok());
        assert!(p.validate_for_group(None, 2).is_ok());
        let err = p.validate_for_group(None, 1).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(err
            .to_string()
            .contains("min_ready 4 is more than 1 base + 2 elastic"));
        p.periods[0].min_ready = 0;
        assert!(p
            .validate(None)
            .unwrap_err()
            .to_string()
            .contains("at least 1"));
        p.periods[0].min_ready = MAX_GROUP_RESOURCES + 3;
        assert!(p
            .validate(None)
            .unwrap_err()
            .to_string()
            .contains("more than any group can have ready"));
    }

    #[test]
    fn a_stored_policy_without_periods_still_loads() {
        let mut old = serde_json::to_value(seed()).expect("to json");
        old.as_object_mut().expect("object").remove("periods");
        let loaded: Policy = serde_json::from_value(old).expect("loads");
        assert_eq!(loaded, seed());
        let mut with = seed();
        with.periods = vec![period(0b11111, 480, 540)];
        let text = serde_json::to_string(&with).expect("to json");
        assert_eq!(serde_json::from_str::<Policy>(&text).expect("back"), with);
    }

    #[test]
    fn threshold_bounds_are_inclusive() {
        let mut p = seed();
        p.usage_threshold = 1;
        assert!(p.validate(None).is_ok());
        p.usage_threshold = 100;
        assert!(p.validate(None).is_ok());
        p.usage_threshold = 101;
        assert!(p.validate(None).is_err());
        p.usage_threshold = 85;
        p.concurrent_sessions = 0;
        assert!(p.validate(None).is_err());
        p.concurrent_sessions = 1;
        p.max_elastic = 0;
        assert!(p.validate(None).is_ok());
    }
}
