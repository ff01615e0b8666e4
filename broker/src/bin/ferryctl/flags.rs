//! Flag values parsed with every bad one collected (`Flags`), and the policy
//! flags shared by `group publish` and `group update-policy`.

use ferry_common::admin::{
    DisplayPolicySpec, PeriodSpec, PolicyLimit, PolicyPartsSpec, PolicySpec, SessionPolicySpec,
};
use ferry_common::duration::parse_duration;

use crate::Usage;

/// The flag values of one command, parsed with every bad one collected, so
/// one run reports them all (as the broker does for a policy).
#[derive(Default)]
pub(crate) struct Flags {
    problems: Vec<String>,
}

impl Flags {
    /// `r`'s value, or `None` with the problem recorded against `--flag`.
    pub(crate) fn check<T, E: std::fmt::Display>(
        &mut self,
        flag: &str,
        text: &str,
        r: Result<T, E>,
    ) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                let e = e.to_string();
                // Messages that quote the value already need no second copy.
                if e.contains(&format!("{text:?}")) {
                    self.problems.push(format!("--{flag}: {e}"));
                } else {
                    self.problems.push(format!("--{flag} {text:?}: {e}"));
                }
                None
            }
        }
    }

    pub(crate) fn number(&mut self, flag: &str, v: Option<String>) -> Option<u32> {
        let v = v?;
        let r = v
            .trim()
            .parse::<u32>()
            .map_err(|_| "not a whole number (0 or more)");
        self.check(flag, &v, r)
    }

    pub(crate) fn duration_ms(&mut self, flag: &str, v: Option<String>) -> Option<u64> {
        let v = v?;
        let r = parse_duration(&v).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.check(flag, &v, r)
    }

    pub(crate) fn limit(
        &mut self,
        flag: &str,
        v: Option<String>,
        word: &str,
    ) -> Option<PolicyLimit> {
        let v = v?;
        let r = ferry_broker::groups::policy_parts::parse_limit(&v, word);
        self.check(flag, &v, r)
    }

    pub(crate) fn problem(&mut self, message: String) {
        self.problems.push(message);
    }

    /// `Err(Usage)` listing every problem, one a line.
    pub(crate) fn finish(self) -> anyhow::Result<()> {
        match self.problems.as_slice() {
            [] => Ok(()),
            [one] => Err(Usage(one.clone()).into()),
            many => Err(Usage(format!(
                "{} flag values are invalid:\n  {}",
                many.len(),
                many.join("\n  ")
            ))
            .into()),
        }
    }
}

/// Scaling-policy parameters (SPEC section 4); durations like 90s, 1h.
#[derive(clap::Args, Default)]
pub(crate) struct PolicyArgs {
    /// (A) Sessions one resource takes at once.
    #[arg(long, value_name = "N")]
    concurrent_sessions: Option<String>,
    /// (B) Scale out above this percent of capacity (1..=100).
    #[arg(long, value_name = "PERCENT")]
    usage_threshold: Option<String>,
    /// (C) Elastic resources created per scale-out.
    #[arg(long, value_name = "N")]
    scale_out_step: Option<String>,
    /// (D) Most elastic resources.
    #[arg(long, value_name = "N")]
    max_elastic: Option<String>,
    /// (E) Idle time before an elastic resource may be scaled in (above
    /// zero, e.g. 60m).
    #[arg(long, value_name = "DURATION")]
    max_idle: Option<String>,
    /// Least time between two scale-ins (default 60s).
    #[arg(long, value_name = "DURATION")]
    scale_in_cooldown: Option<String>,
    /// How long a routing request may wait for room (default 0).
    #[arg(long, value_name = "DURATION")]
    wait_timeout: Option<String>,
    /// breadth-first (default) or depth-first.
    #[arg(long)]
    load_balancing: Option<String>,
}

impl PolicyArgs {
    pub(crate) fn into_spec(self, flags: &mut Flags) -> PolicySpec {
        let max_idle_ms = flags.duration_ms("max-idle", self.max_idle);
        PolicySpec {
            concurrent_sessions: flags.number("concurrent-sessions", self.concurrent_sessions),
            usage_threshold: flags.number("usage-threshold", self.usage_threshold),
            scale_out_step: flags.number("scale-out-step", self.scale_out_step),
            max_elastic: flags.number("max-elastic", self.max_elastic),
            max_idle_ms,
            scale_in_cooldown_ms: flags.duration_ms("scale-in-cooldown", self.scale_in_cooldown),
            wait_timeout_ms: flags.duration_ms("wait-timeout", self.wait_timeout),
            load_balancing: self.load_balancing,
        }
    }
}

/// The policy parts beside scaling (SPEC section 4): session, display and
/// periods. Unset ones keep their value (the default at publish).
#[derive(clap::Args, Default)]
pub(crate) struct PolicyPartsArgs {
    /// How long a disconnected session is kept for its user: 3m..300m, or
    /// `forever` (or -1). Default 15m.
    #[arg(long, allow_hyphen_values = true)]
    disconnect_retention: Option<String>,
    /// Longest a session may last (users are warned 5 minutes before), or
    /// `none` (default).
    #[arg(long)]
    max_session_duration: Option<String>,
    /// Disconnect a session idle this long, or `none` (default).
    #[arg(long)]
    idle_disconnect: Option<String>,
    /// Frames per second, 1..=60 (default 30).
    #[arg(long, value_name = "FPS")]
    frame_rate: Option<String>,
    /// Session resolution WIDTHxHEIGHT, even, 640x480..7680x4320 (default 1920x1080).
    #[arg(long)]
    resolution: Option<String>,
    /// on: the resolution is a maximum, sessions follow the client's window (default on).
    #[arg(long)]
    adaptive_resolution: Option<String>,
    /// video (default) or mixed.
    #[arg(long)]
    streaming_mode: Option<String>,
    /// Quality strategy: adaptive (default), smooth or quality.
    #[arg(long)]
    quality: Option<String>,
    /// A policy period, UTC: 'DAYS HH:MM-HH:MM min=N [warm-up=D]', e.g.
    /// 'mon-fri 09:00-18:00 min=2 warm-up=15m'; repeatable; replaces the
    /// group's periods.
    #[arg(long = "period")]
    periods: Vec<String>,
    /// Remove every policy period.
    #[arg(long, conflicts_with = "periods")]
    clear_periods: bool,
}

impl PolicyPartsArgs {
    pub(crate) fn into_spec(self, flags: &mut Flags) -> PolicyPartsSpec {
        use ferry_broker::groups::policy_parts::{parse_on_off, parse_period, parse_resolution};
        let periods = if self.clear_periods {
            Some(Vec::new())
        } else if self.periods.is_empty() {
            None
        } else {
            let parsed: Vec<Option<PeriodSpec>> = self
                .periods
                .iter()
                .map(|p| flags.check("period", p, parse_period(p)))
                .collect();
            parsed.into_iter().collect::<Option<Vec<_>>>()
        };
        PolicyPartsSpec {
            session: SessionPolicySpec {
                disconnect_retention: flags.limit(
                    "disconnect-retention",
                    self.disconnect_retention,
                    "forever",
                ),
                max_session_duration: flags.limit(
                    "max-session-duration",
                    self.max_session_duration,
                    "none",
                ),
                idle_disconnect: flags.limit("idle-disconnect", self.idle_disconnect, "none"),
            },
            display: DisplayPolicySpec {
                frame_rate: flags.number("frame-rate", self.frame_rate),
                resolution: self
                    .resolution
                    .and_then(|r| flags.check("resolution", &r, parse_resolution(&r))),
                adaptive_resolution: self
                    .adaptive_resolution
                    .and_then(|a| flags.check("adaptive-resolution", &a, parse_on_off(&a))),
                streaming_mode: self.streaming_mode,
                quality_strategy: self.quality,
            },
            periods,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_flag_value_is_reported_at_once() {
        let mut flags = Flags::default();
        let parts = PolicyPartsArgs {
            disconnect_retention: Some("xx".into()),
            idle_disconnect: Some("banana".into()),
            frame_rate: Some("fast".into()),
            ..Default::default()
        };
        let policy = PolicyArgs {
            max_idle: Some("soon".into()),
            concurrent_sessions: Some("2".into()),
            ..Default::default()
        };
        let spec = policy.into_spec(&mut flags);
        parts.into_spec(&mut flags);
        assert_eq!(spec.concurrent_sessions, Some(2));
        let err = flags.finish().expect_err("bad values");
        assert!(err.downcast_ref::<Usage>().is_some());
        let text = err.to_string();
        assert!(text.starts_with("4 flag values are invalid:"), "{text}");
        for flag in [
            "--max-idle: invalid duration \"soon\"",
            "--disconnect-retention",
            "--idle-disconnect",
            "--frame-rate \"fast\"",
        ] {
            assert!(text.contains(flag), "{flag} in {text}");
        }
        assert!(
            text.contains("\"xx\"") && text.contains("\"banana\""),
            "{text}"
        );
        assert!(Flags::default().finish().is_ok());
    }
}
