//! The policy parts beside scaling (SPEC section 4, issue 7): session,
//! display and policy periods, as the broker stores, validates, shows and
//! pushes them.
//!
//! Storage. A group's `groups.policy` column holds the engine's [`Policy`]
//! (scaling and periods) as JSON; the session and display parts sit beside
//! it under `session` and `display` ([`stored_json`]). Both have serde
//! defaults, so a policy written before they existed loads with the
//! defaults (retention 15 minutes, no maximum duration, no idle disconnect,
//! 30 fps 1920x1080 adaptive, video, adaptive quality), and readers that
//! only want the [`Policy`] ignore the extra keys. The engine never sees
//! the session and display parts: scaling does not depend on them.
//!
//! Validation. [`merge_parts`] applies an admin request's parts over the
//! stored ones and lists every problem (the engine's
//! [`SessionPolicy::validate`] and [`DisplayPolicy::validate`]); periods are
//! checked by the engine's own period rules (through
//! [`Policy::validate_for_group`]) by the service, which knows the group's
//! base count.
//!
//! The document. [`policy_document`] is what agents receive in
//! `Command::ApplyPolicy`: canonical JSON (keys sorted, no whitespace) with
//! `display`, `periods`, `scaling` and `session` (durations in ms, `null` =
//! forever / none).

use std::time::Duration;

use ferry_common::admin::{
    DisplayPolicySpec, DisplayPolicyView, PeriodSpec, PolicyLimit, PolicyPartsSpec,
    PolicyPartsView, SessionPolicySpec, SessionPolicyView,
};
use ferry_common::duration::{format_duration, parse_duration};
use ferry_common::limits::MAX_POLICY_DOCUMENT_LEN;
use serde::{Deserialize, Serialize};

use crate::engine::{
    DisplayPolicy, Policy, PolicyPeriod, QualityStrategy, Retention, SessionPolicy, StreamingMode,
    MAX_PERIODS_PER_DAY,
};

/// Most periods one request may carry: three a day on each weekday. More
/// cannot be valid, and refusing them before checking keeps the refusal short.
pub const MAX_PERIODS: usize = 7 * MAX_PERIODS_PER_DAY;

/// Weekday names, bit 0 (Monday) first, as `ferryctl` and the document write them.
pub const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// The session and display parts, stored beside the scaling policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyParts {
    #[serde(default)]
    pub session: SessionPolicy,
    #[serde(default)]
    pub display: DisplayPolicy,
}

impl PolicyParts {
    /// The parts of a stored `groups.policy` value (defaults for a policy
    /// stored before they existed).
    pub fn from_stored(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }
}

/// The `groups.policy` value: the engine's policy with the parts beside it.
pub fn stored_json(policy: &Policy, parts: &PolicyParts) -> Result<String, serde_json::Error> {
    let mut value = serde_json::to_value(policy)?;
    if let Some(map) = value.as_object_mut() {
        map.insert("session".into(), serde_json::to_value(&parts.session)?);
        map.insert("display".into(), serde_json::to_value(&parts.display)?);
    }
    serde_json::to_string(&value)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn hhmm(minute: u16) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

/// `mon,tue,...` of a weekday bit set.
pub fn format_weekdays(bits: u8) -> String {
    weekday_names(bits).join(",")
}

fn weekday_names(bits: u8) -> Vec<&'static str> {
    WEEKDAYS
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, d)| *d)
        .collect()
}

/// The policy as agents receive it (see the module doc and the policy
/// document contract). Fails when it exceeds [`MAX_POLICY_DOCUMENT_LEN`].
pub fn policy_document(policy: &Policy, parts: &PolicyParts) -> Result<String, String> {
    let s = &parts.session;
    let d = &parts.display;
    let periods: Vec<serde_json::Value> = policy
        .periods
        .iter()
        .map(|p| {
            serde_json::json!({
                "days": weekday_names(p.weekdays),
                "end": hhmm(p.end_minute),
                "min_ready": p.min_ready,
                "start": hhmm(p.start_minute),
                "warm_up_ms": ms(p.warm_up),
            })
        })
        .collect();
    // serde_json's map keeps keys sorted: the text is canonical.
    let doc = serde_json::json!({
        "display": {
            "adaptive_resolution": d.adaptive_resolution,
            "frame_rate": d.frame_rate,
            "height": d.height,
            "quality_strategy": d.quality_strategy.as_str(),
            "streaming_mode": d.streaming_mode.as_str(),
            "width": d.width,
        },
        "periods": periods,
        "scaling": {
            "concurrent_sessions": policy.concurrent_sessions,
            "load_balancing": policy.load_balancing.as_str(),
            "max_elastic": policy.max_elastic,
            "max_idle_ms": ms(policy.max_idle),
            "scale_in_cooldown_ms": ms(policy.scale_in_cooldown),
            "scale_out_step": policy.scale_out_step,
            "usage_threshold": policy.usage_threshold,
            "wait_timeout_ms": ms(policy.wait_timeout),
        },
        "session": {
            "disconnect_retention_ms": match s.disconnect_retention {
                Retention::Forever => None,
                Retention::For(d) => Some(ms(d)),
            },
            "idle_disconnect_ms": s.idle_disconnect.map(ms),
            "max_session_duration_ms": s.max_session_duration.map(ms),
        },
    });
    let text = doc.to_string();
    if text.len() > MAX_POLICY_DOCUMENT_LEN {
        return Err(format!(
            "the policy document is {} bytes, more than the {MAX_POLICY_DOCUMENT_LEN} an agent accepts",
            text.len()
        ));
    }
    Ok(text)
}

fn limit_ms(d: Option<Duration>) -> PolicyLimit {
    d.map_or(PolicyLimit::Unlimited, |d| PolicyLimit::Ms(ms(d)))
}

fn limit_duration(l: PolicyLimit) -> Option<Duration> {
    match l {
        PolicyLimit::Unlimited => None,
        PolicyLimit::Ms(ms) => Some(Duration::from_millis(ms)),
    }
}

/// The engine's period of an admin request's.
pub fn period_of(p: &PeriodSpec) -> PolicyPeriod {
    PolicyPeriod {
        weekdays: p.weekdays,
        start_minute: p.start_minute,
        end_minute: p.end_minute,
        min_ready: p.min_ready,
        warm_up: Duration::from_millis(p.warm_up_ms),
    }
}

/// An admin view of an engine period.
pub fn period_spec(p: &PolicyPeriod) -> PeriodSpec {
    PeriodSpec {
        weekdays: p.weekdays,
        start_minute: p.start_minute,
        end_minute: p.end_minute,
        min_ready: p.min_ready,
        warm_up_ms: ms(p.warm_up),
    }
}

/// The parts as `group show` shows them.
pub fn parts_view(policy: &Policy, parts: &PolicyParts) -> PolicyPartsView {
    let s = &parts.session;
    let d = &parts.display;
    PolicyPartsView {
        session: SessionPolicyView {
            disconnect_retention: match s.disconnect_retention {
                Retention::Forever => PolicyLimit::Unlimited,
                Retention::For(d) => PolicyLimit::Ms(ms(d)),
            },
            max_session_duration: limit_ms(s.max_session_duration),
            idle_disconnect: limit_ms(s.idle_disconnect),
        },
        display: DisplayPolicyView {
            frame_rate: d.frame_rate,
            width: d.width,
            height: d.height,
            adaptive_resolution: d.adaptive_resolution,
            streaming_mode: d.streaming_mode.as_str().into(),
            quality_strategy: d.quality_strategy.as_str().into(),
        },
        periods: policy.periods.iter().map(period_spec).collect(),
    }
}

/// The periods an admin request asks for: `None` keeps `current`. More than
/// [`MAX_PERIODS`] is refused at once (the rest is checked with the
/// scaling policy, see the module doc).
pub fn merge_periods(
    current: &[PolicyPeriod],
    asked: Option<&[PeriodSpec]>,
) -> Result<Vec<PolicyPeriod>, String> {
    match asked {
        None => Ok(current.to_vec()),
        Some(list) if list.len() > MAX_PERIODS => Err(format!(
            "periods: {} periods, at most {MAX_PERIODS_PER_DAY} a day ({MAX_PERIODS} a week)",
            list.len()
        )),
        Some(list) => Ok(list.iter().map(period_of).collect()),
    }
}

fn merge_session(base: &SessionPolicy, spec: &SessionPolicySpec) -> SessionPolicy {
    SessionPolicy {
        disconnect_retention: match spec.disconnect_retention {
            None => base.disconnect_retention,
            Some(PolicyLimit::Unlimited) => Retention::Forever,
            Some(PolicyLimit::Ms(ms)) => Retention::For(Duration::from_millis(ms)),
        },
        max_session_duration: spec
            .max_session_duration
            .map_or(base.max_session_duration, limit_duration),
        idle_disconnect: spec
            .idle_disconnect
            .map_or(base.idle_disconnect, limit_duration),
    }
}

fn merge_display(
    base: &DisplayPolicy,
    spec: &DisplayPolicySpec,
    problems: &mut Vec<String>,
) -> DisplayPolicy {
    let streaming_mode = match &spec.streaming_mode {
        None => base.streaming_mode,
        Some(s) => StreamingMode::parse(s).unwrap_or_else(|| {
            problems.push(format!("streaming_mode: {s:?} is not video or mixed"));
            base.streaming_mode
        }),
    };
    let quality_strategy = match &spec.quality_strategy {
        None => base.quality_strategy,
        Some(s) => QualityStrategy::parse(s).unwrap_or_else(|| {
            problems.push(format!(
                "quality_strategy: {s:?} is not adaptive, smooth or quality"
            ));
            base.quality_strategy
        }),
    };
    DisplayPolicy {
        frame_rate: spec.frame_rate.unwrap_or(base.frame_rate),
        width: spec.resolution.map_or(base.width, |r| r.width),
        height: spec.resolution.map_or(base.height, |r| r.height),
        adaptive_resolution: spec.adaptive_resolution.unwrap_or(base.adaptive_resolution),
        streaming_mode,
        quality_strategy,
    }
}

/// Applies the session and display parameters of `spec` over `base` (the
/// stored parts, or the defaults at publish) and validates the result;
/// lists every problem.
pub fn merge_parts(base: &PolicyParts, spec: &PolicyPartsSpec) -> Result<PolicyParts, Vec<String>> {
    let mut problems = Vec::new();
    let parts = PolicyParts {
        session: merge_session(&base.session, &spec.session),
        display: merge_display(&base.display, &spec.display, &mut problems),
    };
    for checked in [parts.session.validate(), parts.display.validate()] {
        if let Err(e) = checked {
            problems.extend(
                e.problems
                    .into_iter()
                    .map(|p| format!("{}: {}", p.field, p.message)),
            );
        }
    }
    if problems.is_empty() {
        Ok(parts)
    } else {
        Err(problems)
    }
}

fn duration_text(d: Option<Duration>, unlimited: &str) -> String {
    d.map_or_else(|| unlimited.to_owned(), format_duration)
}

/// One line for the group's events: every part beside scaling.
pub fn describe_parts(policy: &Policy, parts: &PolicyParts) -> String {
    let s = &parts.session;
    let d = &parts.display;
    let periods: Vec<String> = policy
        .periods
        .iter()
        .map(|p| format_period(&period_spec(p)))
        .collect();
    format!(
        "disconnect_retention={} max_session_duration={} idle_disconnect={} frame_rate={} \
         resolution={}x{} adaptive_resolution={} streaming_mode={} quality_strategy={} periods=[{}]",
        match s.disconnect_retention {
            Retention::Forever => "forever".to_owned(),
            Retention::For(d) => format_duration(d),
        },
        duration_text(s.max_session_duration, "none"),
        duration_text(s.idle_disconnect, "none"),
        d.frame_rate,
        d.width,
        d.height,
        if d.adaptive_resolution { "on" } else { "off" },
        d.streaming_mode.as_str(),
        d.quality_strategy.as_str(),
        periods.join("; ")
    )
}

/// A period as `ferryctl` writes it: `mon,tue 09:00-18:00 min=2 warm-up=15m`.
pub fn format_period(p: &PeriodSpec) -> String {
    format!(
        "{} {}-{} min={} warm-up={}",
        format_weekdays(p.weekdays),
        hhmm(p.start_minute),
        hhmm(p.end_minute),
        p.min_ready,
        format_duration(Duration::from_millis(p.warm_up_ms))
    )
}

fn weekday_bit(name: &str) -> Option<u8> {
    WEEKDAYS
        .iter()
        .position(|d| d.eq_ignore_ascii_case(name))
        .map(|i| 1 << i)
}

fn parse_weekdays(text: &str) -> Result<u8, String> {
    let mut bits = 0u8;
    for item in text.split(',') {
        let item = item.trim();
        let bit = |name: &str| {
            weekday_bit(name)
                .ok_or_else(|| format!("{name:?} is not a weekday ({})", WEEKDAYS.join(", ")))
        };
        if item.eq_ignore_ascii_case("daily") {
            bits |= 0x7f;
        } else if let Some((from, to)) = item.split_once('-') {
            let (from, to) = (bit(from)?.trailing_zeros(), bit(to)?.trailing_zeros());
            if from > to {
                return Err(format!("{item:?}: a range of days goes Monday to Sunday"));
            }
            for i in from..=to {
                bits |= 1 << i;
            }
        } else {
            bits |= bit(item)?;
        }
    }
    Ok(bits)
}

/// `HH:MM` as minutes after midnight; `24:00` is the end of the day.
fn parse_hhmm(text: &str) -> Result<u16, String> {
    let bad = || format!("{text:?} is not a time HH:MM (00:00 to 24:00)");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) || text.len() != 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// Reads a period as `ferryctl --period` takes it:
/// `DAYS HH:MM-HH:MM min=N [warm-up=DURATION]`, where DAYS is a comma list
/// of `mon`..`sun`, ranges like `mon-fri`, or `daily`. Times are UTC; the
/// limits (length, gaps, three a day) are the broker's to check.
pub fn parse_period(text: &str) -> Result<PeriodSpec, String> {
    let fail = |why: String| format!("period {text:?}: {why}");
    let mut words = text.split_whitespace();
    let (Some(days), Some(times)) = (words.next(), words.next()) else {
        return Err(fail(
            "write DAYS HH:MM-HH:MM min=N [warm-up=DURATION], e.g. 'mon-fri 09:00-18:00 min=2 warm-up=15m'"
                .into(),
        ));
    };
    let weekdays = parse_weekdays(days).map_err(fail)?;
    let (start, end) = times
        .split_once('-')
        .ok_or_else(|| fail(format!("{times:?} is not HH:MM-HH:MM")))?;
    let (start_minute, end_minute) = (
        parse_hhmm(start).map_err(fail)?,
        parse_hhmm(end).map_err(fail)?,
    );
    let (mut min_ready, mut warm_up_ms) = (None, 0u64);
    for word in words {
        match word.split_once('=') {
            Some(("min" | "min-ready" | "min_ready", n)) => {
                min_ready = Some(
                    n.parse::<u32>()
                        .map_err(|_| fail(format!("min={n:?} is not a number")))?,
                );
            }
            Some(("warm-up" | "warm_up", d)) => {
                let d = parse_duration(d).map_err(|e| fail(format!("warm-up: {e}")))?;
                warm_up_ms = ms(d);
            }
            _ => {
                return Err(fail(format!(
                    "unknown {word:?}; expected min=N or warm-up=D"
                )))
            }
        }
    }
    let min_ready = min_ready.ok_or_else(|| fail("min=N is required".into()))?;
    Ok(PeriodSpec {
        weekdays,
        start_minute,
        end_minute,
        min_ready,
        warm_up_ms,
    })
}

/// A duration flag that may be unlimited: `unlimited_word` (`forever`,
/// `none`) or, for `forever`, `-1`, else a duration (`15m`, `8h`).
pub fn parse_limit(text: &str, unlimited_word: &str) -> Result<PolicyLimit, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case(unlimited_word) || (unlimited_word == "forever" && t == "-1") {
        return Ok(PolicyLimit::Unlimited);
    }
    parse_duration(t)
        .map(|d| PolicyLimit::Ms(ms(d)))
        .map_err(|e| format!("{e}; or write {unlimited_word}"))
}

/// `WIDTHxHEIGHT`, e.g. `1920x1080`.
pub fn parse_resolution(text: &str) -> Result<ferry_common::admin::Resolution, String> {
    let bad = || format!("{text:?} is not WIDTHxHEIGHT (e.g. 1920x1080)");
    let (w, h) = text.trim().split_once(['x', 'X']).ok_or_else(bad)?;
    Ok(ferry_common::admin::Resolution {
        width: w.parse().map_err(|_| bad())?,
        height: h.parse().map_err(|_| bad())?,
    })
}

/// `on` / `off`.
pub fn parse_on_off(text: &str) -> Result<bool, String> {
    match text.trim() {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        other => Err(format!("{other:?}: write on or off")),
    }
}

/// A [`PolicyLimit`] as `ferryctl` shows it.
pub fn format_limit(l: PolicyLimit, unlimited_word: &str) -> String {
    match l {
        PolicyLimit::Unlimited => unlimited_word.to_owned(),
        PolicyLimit::Ms(ms) => format_duration(Duration::from_millis(ms)),
    }
}

#[cfg(test)]
mod tests {
    use ferry_common::admin::Resolution;

    use super::*;

    fn seed() -> Policy {
        Policy::new(2, 85, 2, 2, Duration::from_secs(3600))
    }

    #[test]
    fn the_document_has_every_part_in_canonical_json() {
        let mut p = seed();
        p.periods = vec![PolicyPeriod {
            weekdays: 0b11,
            start_minute: 9 * 60,
            end_minute: 18 * 60,
            min_ready: 2,
            warm_up: Duration::from_secs(15 * 60),
        }];
        let doc = policy_document(&p, &PolicyParts::default()).expect("small");
        assert_eq!(
            doc,
            concat!(
                r#"{"display":{"adaptive_resolution":true,"frame_rate":30,"height":1080,"#,
                r#""quality_strategy":"adaptive","streaming_mode":"video","width":1920},"#,
                r#""periods":[{"days":["mon","tue"],"end":"18:00","min_ready":2,"#,
                r#""start":"09:00","warm_up_ms":900000}],"#,
                r#""scaling":{"concurrent_sessions":2,"load_balancing":"breadth-first","#,
                r#""max_elastic":2,"max_idle_ms":3600000,"scale_in_cooldown_ms":60000,"#,
                r#""scale_out_step":2,"usage_threshold":85,"wait_timeout_ms":0},"#,
                r#""session":{"disconnect_retention_ms":900000,"idle_disconnect_ms":null,"#,
                r#""max_session_duration_ms":null}}"#
            )
        );
        let parts = PolicyParts {
            session: SessionPolicy {
                disconnect_retention: Retention::Forever,
                max_session_duration: Some(Duration::from_secs(8 * 3600)),
                idle_disconnect: Some(Duration::from_secs(1800)),
            },
            display: DisplayPolicy {
                frame_rate: 60,
                width: 2560,
                height: 1440,
                adaptive_resolution: false,
                streaming_mode: StreamingMode::Mixed,
                quality_strategy: QualityStrategy::Smooth,
            },
        };
        let doc = policy_document(&seed(), &parts).expect("small");
        let v: serde_json::Value = serde_json::from_str(&doc).expect("json");
        assert_eq!(
            v["session"],
            serde_json::json!({"disconnect_retention_ms": null,
                "idle_disconnect_ms": 1_800_000, "max_session_duration_ms": 28_800_000})
        );
        assert_eq!(
            v["display"],
            serde_json::json!({"adaptive_resolution": false, "frame_rate": 60, "height": 1440,
                "quality_strategy": "smooth", "streaming_mode": "mixed", "width": 2560})
        );
        assert_eq!(v["periods"], serde_json::json!([]));
        assert!(doc.starts_with(r#"{"display":{"#) && !doc.contains(' '));
    }

    #[test]
    fn stored_parts_round_trip_and_old_policies_load_with_defaults() {
        let old = serde_json::to_string(&seed()).expect("json");
        assert_eq!(
            PolicyParts::from_stored(&old).expect("loads"),
            PolicyParts::default()
        );
        let parts = PolicyParts {
            session: SessionPolicy {
                disconnect_retention: Retention::Forever,
                ..SessionPolicy::default()
            },
            ..PolicyParts::default()
        };
        let text = stored_json(&seed(), &parts).expect("json");
        assert_eq!(PolicyParts::from_stored(&text).expect("parts"), parts);
        // Readers of the scaling policy ignore the parts.
        assert_eq!(
            serde_json::from_str::<Policy>(&text).expect("policy"),
            seed()
        );
    }

    #[test]
    fn merging_keeps_what_is_not_asked_and_lists_every_problem() {
        let base = PolicyParts::default();
        let spec = PolicyPartsSpec {
            session: SessionPolicySpec {
                idle_disconnect: Some(PolicyLimit::Ms(1_800_000)),
                ..SessionPolicySpec::default()
            },
            display: DisplayPolicySpec {
                frame_rate: Some(60),
                ..DisplayPolicySpec::default()
            },
            periods: None,
        };
        let merged = merge_parts(&base, &spec).expect("valid");
        assert_eq!(
            merged.session.idle_disconnect,
            Some(Duration::from_secs(1800))
        );
        assert_eq!(
            merged.session.disconnect_retention,
            base.session.disconnect_retention
        );
        assert_eq!(merged.display.frame_rate, 60);
        assert_eq!(merged.display.width, 1920);
        // `Unlimited` clears an optional limit.
        let cleared = merge_parts(
            &merged,
            &PolicyPartsSpec {
                session: SessionPolicySpec {
                    idle_disconnect: Some(PolicyLimit::Unlimited),
                    ..SessionPolicySpec::default()
                },
                ..PolicyPartsSpec::default()
            },
        )
        .expect("valid");
        assert_eq!(cleared.session.idle_disconnect, None);
        assert_eq!(cleared.display.frame_rate, 60);

        let bad = PolicyPartsSpec {
            session: SessionPolicySpec {
                disconnect_retention: Some(PolicyLimit::Ms(60_000)),
                max_session_duration: Some(PolicyLimit::Ms(5 * 60_000)),
                idle_disconnect: Some(PolicyLimit::Ms(0)),
            },
            display: DisplayPolicySpec {
                frame_rate: Some(0),
                resolution: Some(Resolution {
                    width: 100,
                    height: 100,
                }),
                adaptive_resolution: None,
                streaming_mode: Some("audio".into()),
                quality_strategy: Some("best".into()),
            },
            periods: None,
        };
        let problems = merge_parts(&base, &bad).unwrap_err();
        let fields: Vec<&str> = problems
            .iter()
            .map(|p| p.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            fields,
            [
                "streaming_mode",
                "quality_strategy",
                "disconnect_retention",
                "max_session_duration",
                "idle_disconnect",
                "frame_rate",
                "resolution"
            ],
            "{problems:?}"
        );
    }

    #[test]
    fn periods_read_and_print_as_ferryctl_writes_them() {
        let p = parse_period("mon,tue,wed 09:00-18:00 min=2 warm-up=15m").expect("ok");
        assert_eq!(
            p,
            PeriodSpec {
                weekdays: 0b111,
                start_minute: 540,
                end_minute: 1080,
                min_ready: 2,
                warm_up_ms: 900_000,
            }
        );
        assert_eq!(
            format_period(&p),
            "mon,tue,wed 09:00-18:00 min=2 warm-up=15m"
        );
        let p = parse_period("mon-fri,sun 22:00-24:00 min=1").expect("ok");
        assert_eq!(
            (p.weekdays, p.end_minute, p.warm_up_ms),
            (0b101_1111, 1440, 0)
        );
        assert_eq!(
            parse_period("daily 00:00-00:15 min=1")
                .expect("ok")
                .weekdays,
            0x7f
        );
        for bad in [
            "mon 09:00-18:00",
            "funday 09:00-18:00 min=1",
            "mon 9:00-18:00 min=1",
            "mon 09:00-24:30 min=1",
            "mon 09:00 min=1",
            "fri-mon 09:00-10:00 min=1",
            "mon 09:00-10:00 min=1 extra=2",
            "mon",
        ] {
            assert!(parse_period(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flag_values() {
        assert_eq!(
            parse_limit("forever", "forever"),
            Ok(PolicyLimit::Unlimited)
        );
        assert_eq!(parse_limit("-1", "forever"), Ok(PolicyLimit::Unlimited));
        assert_eq!(parse_limit("15m", "forever"), Ok(PolicyLimit::Ms(900_000)));
        assert_eq!(parse_limit("none", "none"), Ok(PolicyLimit::Unlimited));
        assert!(parse_limit("-1", "none").is_err());
        assert_eq!(
            parse_resolution("1920x1080"),
            Ok(Resolution {
                width: 1920,
                height: 1080
            })
        );
        assert!(parse_resolution("1920*1080").is_err());
        assert_eq!(parse_on_off("off"), Ok(false));
        assert!(parse_on_off("maybe").is_err());
        assert_eq!(format_limit(PolicyLimit::Ms(28_800_000), "none"), "8h");
        assert_eq!(format_limit(PolicyLimit::Unlimited, "forever"), "forever");
    }

    #[test]
    fn too_many_periods_are_refused_before_checking() {
        let one = PeriodSpec {
            weekdays: 1,
            start_minute: 0,
            end_minute: 15,
            min_ready: 1,
            warm_up_ms: 0,
        };
        let many = vec![one.clone(); MAX_PERIODS + 1];
        assert!(merge_periods(&[], Some(&many)).is_err());
        assert_eq!(merge_periods(&[], Some(&[])), Ok(vec![]));
        let kept = merge_periods(&[period_of(&one)], None).expect("kept");
        assert_eq!(kept, vec![period_of(&one)]);
    }
}
