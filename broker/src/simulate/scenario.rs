//! Scenario files (SPEC section 7): parsed with spans, then checked whole, so
//! every problem is reported with its line at once. An event after the
//! scenario's `end` is one of those problems (the spec is silent; the replay
//! stops at `end`).
//!
//! Besides the keys of SPEC section 7, a scenario may give the policy's
//! scheduled-scaling periods (SPEC section 4), up to 3 a weekday, as
//! `[[policy.period]]` tables:
//!
//! ```toml
//! [[policy.period]]
//! weekdays = ["mon-fri"]   # or "mon-fri", or ["mon", "wed", "sat-sun"]
//! start = "08:00"          # HH:MM, UTC
//! end = "09:00"            # HH:MM, at most "24:00"; after start (same day)
//! min_ready = 3            # resources kept ready, base + elastic
//! warm_up = "10m"          # optional, default 0: elastic ones are asked this early
//! ```
//!
//! Weekday names are `mon tue wed thu fri sat sun`; `a-b` is a range inside
//! one week (`sat-mon` is refused: write `["sat-sun", "mon"]`). A period is
//! at least 15 minutes, periods of one day are at least 5 minutes apart,
//! `min_ready` is at most `group.base_resources + policy.max_elastic` and
//! `warm_up` at most a day.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use toml::Spanned;

use ferry_common::duration::parse_duration;
use ferry_common::{SessionId, UnixMillis};

use crate::engine::billing::{BaseBilling, Prices, Term};
use crate::engine::{
    LoadBalancing, Policy, PolicyPeriod, DEFAULT_SCALE_IN_COOLDOWN, MAX_GROUP_RESOURCES,
};

use super::{Problem, SimError};

/// Largest scenario file read. A scenario with the most events allowed stays far
/// below this; a larger file is a mistake (or a log pasted in), not a scenario.
pub const MAX_SCENARIO_BYTES: u64 = 8 * 1024 * 1024;

/// Most `[[event]]`s in one scenario, to bound the run's time and memory.
pub const MAX_SCENARIO_EVENTS: usize = 100_000;

/// Longest simulated period. A year of virtual time covers any "what would this
/// policy have cost" question and bounds the run.
pub const MAX_SCENARIO_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);

/// How resources are created and released in a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// Work completes only through `created = N` / `released = N` events.
    Explicit,
    /// Work completes by itself after fixed delays (milliseconds).
    Delays { create_ms: i64, release_ms: i64 },
}

/// What a scenario event does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A session arrives (and connects once placed).
    Connect(SessionId),
    /// A session ends, or a waiting request is withdrawn.
    Disconnect(SessionId),
    /// The N oldest pending creations complete.
    Created(u32),
    /// The N oldest pending releases complete.
    Released(u32),
}

/// One `[[event]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Line of its `[[event]]` header, for error messages.
    pub line: usize,
    /// When it happens.
    pub at: UnixMillis,
    /// What happens.
    pub kind: EventKind,
}

/// A checked scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// The scenario's title, if it has one.
    pub name: Option<String>,
    /// Start of the billed period; base resources are ready from here.
    pub start: UnixMillis,
    /// End of the billed period; the run stops here.
    pub end: UnixMillis,
    /// Number of base resources `b1..bN`.
    pub base_resources: u32,
    /// How base resources are billed.
    pub billing: BaseBilling,
    /// The group's spec, for the catalog's session limit.
    pub spec: Option<String>,
    /// Unit prices.
    pub prices: Prices,
    /// The scaling policy.
    pub policy: Policy,
    /// How creations and releases complete.
    pub provider: Provider,
    /// The events, in time order.
    pub events: Vec<Event>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Option<String>,
    start: Spanned<String>,
    end: Option<Spanned<String>>,
    group: Spanned<RawGroup>,
    pricing: Spanned<RawPricing>,
    policy: Spanned<RawPolicy>,
    provider: Option<Spanned<RawProvider>>,
    #[serde(default)]
    event: Vec<Spanned<RawEvent>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    base_resources: Spanned<i64>,
    billing: Spanned<String>,
    duration: Option<Spanned<String>>,
    spec: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPricing {
    currency: Spanned<String>,
    subscription_month: Option<Spanned<toml::Value>>,
    hourly: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    concurrent_sessions: Spanned<i64>,
    usage_threshold: Spanned<i64>,
    scale_out_step: Spanned<i64>,
    max_elastic: Spanned<i64>,
    max_idle: Spanned<String>,
    scale_in_cooldown: Option<Spanned<String>>,
    wait_timeout: Option<Spanned<String>>,
    load_balancing: Option<Spanned<String>>,
    #[serde(default)]
    period: Vec<Spanned<RawPeriod>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeriod {
    weekdays: Spanned<toml::Value>,
    start: Spanned<String>,
    end: Spanned<String>,
    min_ready: Spanned<i64>,
    warm_up: Option<Spanned<String>>,
}

const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Bits (bit 0 = Monday) of one weekday name or an `a-b` range.
fn weekday_bits(s: &str) -> Result<u8, String> {
    let day = |name: &str| {
        WEEKDAYS
            .iter()
            .position(|d| d.eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| format!("{name:?} is not a weekday (mon, tue, wed, thu, fri, sat, sun)"))
    };
    match s.split_once('-') {
        None => Ok(1 << day(s)?),
        Some((a, b)) => {
            let (a, b) = (day(a)?, day(b)?);
            if a > b {
                return Err(format!(
                    "{s:?} runs backwards; a range stays inside one week (Monday first)"
                ));
            }
            Ok((a..=b).fold(0u8, |bits, d| bits | 1 << d))
        }
    }
}

/// Minutes after midnight of `HH:MM` (`24:00` is the end of the day).
fn minute_of_day(s: &str) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    if h.len() != 2 || m.len() != 2 || !(h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit())) {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m) {
        (24, 0) => Some(24 * 60),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    mode: Spanned<String>,
    create_delay: Option<Spanned<String>>,
    release_delay: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    at: Spanned<String>,
    connect: Option<Spanned<String>>,
    disconnect: Option<Spanned<String>>,
    created: Option<Spanned<i64>>,
    released: Option<Spanned<i64>>,
}

/// 1-based line of byte `offset` in `text`.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Collects problems with their lines while a scenario is checked.
struct Checker<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn at<T>(&mut self, spanned: &Spanned<T>, message: String) {
        let line = line_of(self.text, spanned.span().start);
        self.problems.push(Problem { line, message });
    }

    /// A count or number in `lo..=hi`; out of range reports and gives `None`.
    fn int(&mut self, v: &Spanned<i64>, key: &str, lo: i64, hi: i64) -> Option<u32> {
        let n = *v.get_ref();
        if n < 0 && lo >= 0 {
            self.at(
                v,
                format!("{key} = {n} is negative; it must be in {lo}..={hi}"),
            );
            return None;
        }
        if n < lo || n > hi {
            self.at(v, format!("{key} = {n} is out of range {lo}..={hi}"));
            return None;
        }
        u32::try_from(n).ok()
    }

    fn duration(&mut self, v: &Spanned<String>, key: &str) -> Option<Duration> {
        match parse_duration(v.get_ref()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.at(v, format!("{key}: {e}"));
                None
            }
        }
    }

    fn amount(&mut self, v: &Spanned<toml::Value>, key: &str) -> Option<Decimal> {
        let parsed = match v.get_ref() {
            toml::Value::String(s) => Decimal::from_str(s.trim())
                .map_err(|e| format!("{key} = {s:?} is not a decimal number: {e}")),
            toml::Value::Integer(i) => Ok(Decimal::from(*i)),
            toml::Value::Float(_) => Err(format!(
                "{key} is a float; write prices as strings (e.g. \"0.726736\") so they stay exact"
            )),
            other => Err(format!(
                "{key} must be a decimal string, not a {}",
                other.type_str()
            )),
        };
        match parsed {
            Ok(d) if d.is_sign_negative() && !d.is_zero() => {
                self.at(v, format!("{key} = {d} is negative"));
                None
            }
            Ok(d) => Some(d),
            Err(message) => {
                self.at(v, message);
                None
            }
        }
    }
}

/// Parses an RFC 3339 time.
fn parse_rfc3339(s: &str) -> Option<UnixMillis> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| UnixMillis(t.timestamp_millis()))
}

/// Parses `HH:MM[:SS]` on `date_of`'s UTC date, or a full RFC 3339 time.
fn parse_time(s: &str, date_of: UnixMillis) -> Result<UnixMillis, String> {
    let s = s.trim();
    if s.contains('T') || s.contains('t') {
        return parse_rfc3339(s)
            .ok_or_else(|| format!("{s:?} is not an RFC 3339 time (e.g. 2026-03-02T08:22:00Z)"));
    }
    let time = NaiveTime::parse_from_str(s, "%H:%M:%S")
        .or_else(|_| NaiveTime::parse_from_str(s, "%H:%M"))
        .map_err(|_| format!("{s:?} is not a time: write HH:MM, HH:MM:SS or RFC 3339"))?;
    let date = DateTime::<Utc>::from_timestamp_millis(date_of.0)
        .ok_or_else(|| "start is out of range".to_owned())?
        .date_naive();
    Ok(UnixMillis(date.and_time(time).and_utc().timestamp_millis()))
}

/// Checks the `[[policy.period]]` tables; `None` when one is wrong (reported).
fn parse_periods(c: &mut Checker<'_>, raw: &[Spanned<RawPeriod>]) -> Option<Vec<PolicyPeriod>> {
    let mut out = Vec::with_capacity(raw.len().min(7 * crate::engine::MAX_PERIODS_PER_DAY));
    let mut ok = true;
    for rp in raw {
        let p = rp.get_ref();
        let names: Vec<Result<&str, String>> = match p.weekdays.get_ref() {
            toml::Value::String(s) => vec![Ok(s.as_str())],
            toml::Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| format!("weekdays: {} is not a weekday name", v.type_str()))
                })
                .collect(),
            other => vec![Err(format!(
                "weekdays must be a name, a range like \"mon-fri\" or a list of them, not a {}",
                other.type_str()
            ))],
        };
        let mut weekdays = 0u8;
        for name in names {
            match name.and_then(|n| weekday_bits(n).map_err(|e| format!("weekdays: {e}"))) {
                Ok(bits) => weekdays |= bits,
                Err(m) => {
                    c.at(&p.weekdays, format!("policy.period {m}"));
                    ok = false;
                }
            }
        }
        if weekdays == 0 && ok {
            c.at(
                &p.weekdays,
                "policy.period weekdays: name at least one weekday".into(),
            );
            ok = false;
        }
        let mut minute = |v: &Spanned<String>, key: &str| {
            let m = minute_of_day(v.get_ref());
            if m.is_none() {
                c.at(
                    v,
                    format!(
                        "policy.period {key} = {:?} is not a time of day: write HH:MM (UTC, up to 24:00)",
                        v.get_ref()
                    ),
                );
            }
            m
        };
        let start = minute(&p.start, "start");
        let end = minute(&p.end, "end");
        let min_ready = c.int(
            &p.min_ready,
            "policy.period min_ready",
            1,
            i64::from(MAX_GROUP_RESOURCES) * 2,
        );
        let warm_up = match &p.warm_up {
            Some(v) => c.duration(v, "policy.period warm_up"),
            None => Some(Duration::ZERO),
        };
        match (start, end, min_ready, warm_up) {
            (Some(start_minute), Some(end_minute), Some(min_ready), Some(warm_up)) if ok => out
                .push(PolicyPeriod {
                    weekdays,
                    start_minute,
                    end_minute,
                    min_ready,
                    warm_up,
                }),
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

/// The line of the `[[policy.period]]` a period problem names: "period N
/// ..." is table N, "...: periods A and B ..." is table B.
fn period_problem_line(text: &str, raw: &[Spanned<RawPeriod>], message: &str) -> Option<usize> {
    let number_after = |key: &str| -> Option<usize> {
        let rest = &message[message.find(key)? + key.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let n = match number_after(" and ") {
        Some(n) if message.contains("periods ") => n,
        _ => number_after("period ")?,
    };
    let table = raw.get(n.checked_sub(1)?)?;
    Some(line_of(text, table.span().start))
}

/// Reads and checks the scenario text of `path` (used only in messages).
pub fn parse(path: &Path, text: &str) -> Result<Scenario, SimError> {
    let invalid = |problems| SimError::Invalid {
        file: path.to_owned(),
        problems,
    };
    let raw: RawScenario = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let line = e.span().map_or(1, |s| line_of(text, s.start));
            return Err(invalid(vec![Problem {
                line,
                message: e.message().trim().to_owned(),
            }]));
        }
    };
    let mut c = Checker {
        text,
        problems: Vec::new(),
    };

    let (start, end) = period_of(&mut c, &raw);
    let (base, billing, spec) = group_of(&mut c, &raw.group);
    let (currency, subscription_month, hourly) = pricing_of(&mut c, &raw.pricing, billing.as_ref());
    let policy = policy_of(&mut c, &raw, base, spec.as_deref());
    let provider = provider_of(&mut c, raw.provider.as_ref());
    let events = events_of(&mut c, &raw.event, start, end, provider.as_ref());

    if !c.problems.is_empty() {
        c.problems.sort_by_key(|p| p.line);
        return Err(invalid(c.problems));
    }
    let end = match end {
        Some(e) => Some(e),
        None => events.last().map(|e| e.at),
    };
    match (
        start,
        end,
        base,
        billing,
        subscription_month,
        hourly,
        policy,
        provider,
    ) {
        (
            Some(start),
            Some(end),
            Some(base),
            Some(billing),
            Some(sm),
            Some(hourly),
            Some(policy),
            Some(provider),
        ) => Ok(Scenario {
            name: raw.name,
            start,
            end,
            base_resources: base,
            billing,
            spec,
            prices: Prices {
                currency,
                subscription_month: sm,
                hourly,
            },
            policy,
            provider,
            events,
        }),
        (_, None, ..) => Err(invalid(vec![Problem {
            line: 1,
            message: "the scenario has neither `end` nor any event, so its period is empty".into(),
        }])),
        _ => Err(invalid(vec![Problem {
            line: 1,
            message: "the scenario is incomplete".into(),
        }])),
    }
}

/// `start` and `end`, each checked.
fn period_of(c: &mut Checker<'_>, raw: &RawScenario) -> (Option<UnixMillis>, Option<UnixMillis>) {
    let start = parse_rfc3339(raw.start.get_ref());
    if start.is_none() {
        c.at(
            &raw.start,
            format!(
                "start = {:?} is not an RFC 3339 time (e.g. 2026-03-02T08:00:00Z)",
                raw.start.get_ref()
            ),
        );
    }
    let end = match (&raw.end, start) {
        (Some(e), Some(s)) => match parse_time(e.get_ref(), s) {
            Ok(t) if t <= s => {
                c.at(e, format!("end = {:?} is not after start", e.get_ref()));
                None
            }
            Ok(t) if (t.0 - s.0) as u128 > MAX_SCENARIO_PERIOD.as_millis() => {
                c.at(e, "end is more than 366 days after start".into());
                None
            }
            Ok(t) => Some(t),
            Err(m) => {
                c.at(e, format!("end: {m}"));
                None
            }
        },
        _ => None,
    };

    (start, end)
}

/// `[group]`: the base count, its billing and its spec.
fn group_of(
    c: &mut Checker<'_>,
    group: &Spanned<RawGroup>,
) -> (Option<u32>, Option<BaseBilling>, Option<String>) {
    let g = group.get_ref();
    let base = c.int(
        &g.base_resources,
        "group.base_resources",
        0,
        i64::from(MAX_GROUP_RESOURCES),
    );
    let billing = match g.billing.get_ref().as_str() {
        "subscription" => match &g.duration {
            Some(d) => match Term::parse(d.get_ref()) {
                Ok(term) => Some(BaseBilling::Subscription(term)),
                Err(e) => {
                    c.at(d, format!("group.duration: {e}"));
                    None
                }
            },
            None => {
                c.at(
                    group,
                    "group.billing = \"subscription\" needs group.duration (e.g. \"1w\", \"1mo\", \"1y\")"
                        .into(),
                );
                None
            }
        },
        "pay-as-you-go" => Some(BaseBilling::PayAsYouGo),
        other => {
            c.at(
                &g.billing,
                format!(
                    "group.billing = {other:?}: expected \"subscription\" or \"pay-as-you-go\""
                ),
            );
            None
        }
    };
    let spec = g.spec.as_ref().map(|s| s.get_ref().clone());

    (base, billing, spec)
}

/// `[pricing]`: currency and prices (a subscription needs its monthly price).
fn pricing_of(
    c: &mut Checker<'_>,
    pricing: &Spanned<RawPricing>,
    billing: Option<&BaseBilling>,
) -> (String, Option<Decimal>, Option<Decimal>) {
    let p = pricing.get_ref();
    let currency = p.currency.get_ref().clone();
    if currency.is_empty()
        || currency.len() > 8
        || !currency.bytes().all(|b| b.is_ascii_uppercase())
    {
        c.at(
            &p.currency,
            format!("pricing.currency = {currency:?}: expected a code like \"CNY\""),
        );
    }
    let subscription_month = match &p.subscription_month {
        Some(v) => c.amount(v, "pricing.subscription_month"),
        None if matches!(billing, Some(BaseBilling::Subscription(_))) => {
            c.at(
                pricing,
                "pricing.subscription_month is needed for a subscription group".into(),
            );
            None
        }
        None => Some(Decimal::ZERO),
    };
    let hourly = match &p.hourly {
        Some(v) => c.amount(v, "pricing.hourly"),
        None => {
            c.at(
                pricing,
                "pricing.hourly is needed (elastic and pay-as-you-go resources)".into(),
            );
            None
        }
    };

    (currency, subscription_month, hourly)
}

/// `[policy]` with its periods, validated like a live group's (each problem
/// on the line of its key).
fn policy_of(
    c: &mut Checker<'_>,
    raw: &RawScenario,
    base: Option<u32>,
    spec: Option<&str>,
) -> Option<Policy> {
    let policy = policy_fields(c, raw.policy.get_ref())?;
    let checked = match base {
        Some(base) => policy.validate_for_group(spec, base),
        None => policy.validate(spec),
    };
    let Err(e) = checked else {
        return Some(policy);
    };
    for problem in e.problems {
        let line = policy_problem_line(c.text, raw, problem.field, &problem.message);
        let prefix = if problem.field == "spec" {
            "group"
        } else {
            "policy"
        };
        c.problems.push(Problem {
            line,
            message: format!("{prefix}.{}: {}", problem.field, problem.message),
        });
    }
    None
}

/// Each `[policy]` key read on its own (defaults for those not written);
/// `None` when any of them is wrong, every problem noted.
fn policy_fields(c: &mut Checker<'_>, rp: &RawPolicy) -> Option<Policy> {
    let concurrent = c.int(
        &rp.concurrent_sessions,
        "policy.concurrent_sessions",
        1,
        i64::from(u32::MAX),
    );
    let threshold = c.int(&rp.usage_threshold, "policy.usage_threshold", 1, 100);
    let step = c.int(
        &rp.scale_out_step,
        "policy.scale_out_step",
        1,
        i64::from(u32::MAX),
    );
    let max_elastic = c.int(
        &rp.max_elastic,
        "policy.max_elastic",
        0,
        i64::from(u32::MAX),
    );
    let max_idle = c.duration(&rp.max_idle, "policy.max_idle");
    let cooldown = match &rp.scale_in_cooldown {
        Some(v) => c.duration(v, "policy.scale_in_cooldown"),
        None => Some(DEFAULT_SCALE_IN_COOLDOWN),
    };
    let wait = match &rp.wait_timeout {
        Some(v) => c.duration(v, "policy.wait_timeout"),
        None => Some(Duration::ZERO),
    };
    let load_balancing = match &rp.load_balancing {
        Some(v) => load_balancing_of(c, v),
        None => Some(LoadBalancing::BreadthFirst),
    };
    let periods = parse_periods(c, &rp.period);
    Some(Policy {
        concurrent_sessions: concurrent?,
        usage_threshold: threshold?,
        scale_out_step: step?,
        max_elastic: max_elastic?,
        max_idle: max_idle?,
        scale_in_cooldown: cooldown?,
        wait_timeout: wait?,
        load_balancing: load_balancing?,
        periods: periods?,
    })
}

/// `policy.load_balancing`, one of its two names.
fn load_balancing_of(c: &mut Checker<'_>, v: &Spanned<String>) -> Option<LoadBalancing> {
    let lb = LoadBalancing::parse(v.get_ref());
    if lb.is_none() {
        c.at(
            v,
            format!(
                "policy.load_balancing = {:?}: expected \"breadth-first\" or \"depth-first\"",
                v.get_ref()
            ),
        );
    }
    lb
}

/// The line of the key a policy problem is about (the `[policy]` table's
/// line when the key is not written).
fn policy_problem_line(text: &str, raw: &RawScenario, field: &str, message: &str) -> usize {
    let rp = raw.policy.get_ref();
    let table = || line_of(text, raw.policy.span().start);
    let at =
        |span: Option<std::ops::Range<usize>>| span.map_or_else(table, |s| line_of(text, s.start));
    match field {
        "periods" => period_problem_line(text, &rp.period, message).unwrap_or_else(table),
        "concurrent_sessions" => at(Some(rp.concurrent_sessions.span())),
        "usage_threshold" => at(Some(rp.usage_threshold.span())),
        "scale_out_step" => at(Some(rp.scale_out_step.span())),
        "max_elastic" => at(Some(rp.max_elastic.span())),
        "max_idle" => at(Some(rp.max_idle.span())),
        "spec" => raw
            .group
            .get_ref()
            .spec
            .as_ref()
            .map_or(1, |s| line_of(text, s.span().start)),
        "scale_in_cooldown" => at(rp.scale_in_cooldown.as_ref().map(|s| s.span())),
        "wait_timeout" => at(rp.wait_timeout.as_ref().map(|s| s.span())),
        _ => table(),
    }
}

/// `[provider]`: how creations and releases complete.
fn provider_of(c: &mut Checker<'_>, provider: Option<&Spanned<RawProvider>>) -> Option<Provider> {
    match provider {
        None => Some(Provider::Explicit),
        Some(p) => {
            let rp = p.get_ref();
            match rp.mode.get_ref().as_str() {
                "explicit" => {
                    for d in [&rp.create_delay, &rp.release_delay].into_iter().flatten() {
                        c.at(
                            d,
                            "create_delay / release_delay apply only with provider.mode = \"delays\"".into(),
                        );
                    }
                    Some(Provider::Explicit)
                }
                "delays" => {
                    let create = match &rp.create_delay {
                        Some(d) => c.duration(d, "provider.create_delay"),
                        None => Some(Duration::ZERO),
                    };
                    let release = match &rp.release_delay {
                        Some(d) => c.duration(d, "provider.release_delay"),
                        None => Some(Duration::ZERO),
                    };
                    match (create, release) {
                        (Some(cr), Some(re))
                            if cr <= MAX_SCENARIO_PERIOD && re <= MAX_SCENARIO_PERIOD =>
                        {
                            Some(Provider::Delays {
                                create_ms: i64::try_from(cr.as_millis()).unwrap_or(i64::MAX),
                                release_ms: i64::try_from(re.as_millis()).unwrap_or(i64::MAX),
                            })
                        }
                        (Some(_), Some(_)) => {
                            c.at(p, "provider delays must be at most 366 days".into());
                            None
                        }
                        _ => None,
                    }
                }
                other => {
                    c.at(
                        &rp.mode,
                        format!("provider.mode = {other:?}: expected \"explicit\" or \"delays\""),
                    );
                    None
                }
            }
        }
    }
}

/// `[[event]]`: each with its time in order and exactly one action.
fn events_of(
    c: &mut Checker<'_>,
    raw: &[Spanned<RawEvent>],
    start: Option<UnixMillis>,
    end: Option<UnixMillis>,
    provider: Option<&Provider>,
) -> Vec<Event> {
    let text = c.text;
    if raw.len() > MAX_SCENARIO_EVENTS {
        c.problems.push(Problem {
            line: 1,
            message: format!(
                "{} events are more than the limit of {MAX_SCENARIO_EVENTS}",
                raw.len()
            ),
        });
    }
    let mut events = Vec::with_capacity(raw.len().min(MAX_SCENARIO_EVENTS));
    let mut previous: Option<(UnixMillis, usize)> = None;
    for ev in raw.iter().take(MAX_SCENARIO_EVENTS) {
        let line = line_of(text, ev.span().start);
        let e = ev.get_ref();
        let at = match start {
            Some(s) => match parse_time(e.at.get_ref(), s) {
                Ok(t) => Some(t),
                Err(m) => {
                    c.at(&e.at, format!("event at: {m}"));
                    None
                }
            },
            None => None,
        };
        if let (Some(t), Some(s)) = (at, start) {
            if t < s {
                c.at(
                    &e.at,
                    format!("event at {:?} is before start", e.at.get_ref()),
                );
            }
            if let Some(end) = end {
                if t > end {
                    c.at(&e.at, format!("event at {:?} is after end", e.at.get_ref()));
                }
            }
            if t > s && (t.0 - s.0) as u128 > MAX_SCENARIO_PERIOD.as_millis() {
                c.at(&e.at, "event is more than 366 days after start".into());
            }
            match previous {
                Some((prev, prev_line)) if t < prev => c.at(
                    &e.at,
                    format!(
                        "event at {:?} is before the event on line {prev_line}; events must be in time order",
                        e.at.get_ref()
                    ),
                ),
                _ => previous = Some((t, line)),
            }
        }
        let mut kinds = event_actions(c, e, provider);
        match kinds.len() {
            1 => {
                if let (Some(at), Some(Some(kind))) = (at, kinds.pop()) {
                    events.push(Event { line, at, kind });
                }
            }
            0 => c.problems.push(Problem {
                line,
                message: "event has no action: give one of connect, disconnect, created, released".into(),
            }),
            _ => c.problems.push(Problem {
                line,
                message: "event has more than one action: give exactly one of connect, disconnect, created, released".into(),
            }),
        }
    }

    events
}

/// The actions one `[[event]]` names (`None` for one that is invalid; the
/// caller wants exactly one).
fn event_actions(
    c: &mut Checker<'_>,
    e: &RawEvent,
    provider: Option<&Provider>,
) -> Vec<Option<EventKind>> {
    let mut kinds = Vec::new();
    if let Some(s) = &e.connect {
        match SessionId::new(s.get_ref().as_str()) {
            Ok(id) => kinds.push(Some(EventKind::Connect(id))),
            Err(err) => {
                c.at(s, format!("connect: {err}"));
                kinds.push(None);
            }
        }
    }
    if let Some(s) = &e.disconnect {
        match SessionId::new(s.get_ref().as_str()) {
            Ok(id) => kinds.push(Some(EventKind::Disconnect(id))),
            Err(err) => {
                c.at(s, format!("disconnect: {err}"));
                kinds.push(None);
            }
        }
    }
    for (value, key, make) in [
        (
            &e.created,
            "created",
            EventKind::Created as fn(u32) -> EventKind,
        ),
        (
            &e.released,
            "released",
            EventKind::Released as fn(u32) -> EventKind,
        ),
    ] {
        if let Some(v) = value {
            let n = c.int(v, key, 1, i64::from(MAX_GROUP_RESOURCES));
            if matches!(provider, Some(Provider::Delays { .. })) {
                c.at(
                    v,
                    format!("{key} events complete work only with provider.mode = \"explicit\"; with \"delays\" it completes by itself"),
                );
            }
            kinds.push(n.map(make));
        }
    }
    kinds
}
