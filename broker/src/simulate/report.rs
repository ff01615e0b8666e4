//! What `ferryctl simulate` prints: the JSON object of SPEC section 7, or a
//! readable table like the seed document's.
//!
//! `--json` prints the decision objects with exactly SPEC section 7's fields,
//! so expected outputs compare equal; the reason for each is in
//! `decision_reasons`, one entry per decision, in the same order.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;

use ferry_common::duration::format_duration;
use ferry_common::UnixMillis;

use crate::engine::billing::BaseBilling;
use crate::engine::{Action, Class, Decision, Snapshot};

use super::replay::{Happening, Outcome};
use super::scenario::{EventKind, Provider, Scenario};

/// RFC 3339 in UTC with whole seconds and a `Z`.
pub(crate) fn rfc3339(t: UnixMillis) -> String {
    DateTime::<Utc>::from_timestamp_millis(t.0).map_or_else(
        || format!("{} ms", t.0),
        |d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

/// `HH:MM:SS` when on the start's date, else the full time.
pub(super) fn short_time(t: UnixMillis, start: UnixMillis) -> String {
    let (Some(d), Some(s)) = (
        DateTime::<Utc>::from_timestamp_millis(t.0),
        DateTime::<Utc>::from_timestamp_millis(start.0),
    ) else {
        return rfc3339(t);
    };
    if d.date_naive() == s.date_naive() {
        d.format("%H:%M:%S").to_string()
    } else {
        rfc3339(t)
    }
}

/// `demand / capacity` in percent with one place, half-up; `None` without capacity.
pub(super) fn usage_pct(s: &Snapshot) -> Option<String> {
    if s.capacity == 0 {
        return None;
    }
    let mut pct = (Decimal::from(s.demand) * Decimal::from(100) / Decimal::from(s.capacity))
        .round_dp_with_strategy(1, RoundingStrategy::MidpointAwayFromZero);
    pct.rescale(1);
    Some(pct.to_string())
}

#[derive(Serialize)]
struct JsonOut<'a> {
    name: Option<&'a str>,
    cost: JsonCost,
    resources: Vec<JsonResource>,
    elastic: Vec<JsonElastic>,
    /// Exactly the fields of SPEC section 7, so the expected outputs compare equal.
    decisions: Vec<JsonDecision>,
    /// Why each decision was made, one entry per entry of `decisions`, same order:
    /// the numbers behind it (demand, capacity, threshold, idle time, cooldown).
    decision_reasons: Vec<String>,
    timeline: Vec<JsonTimeline>,
}

#[derive(Serialize)]
struct JsonCost {
    currency: String,
    subscription: String,
    base_payg: String,
    elastic: String,
    total: String,
}

#[derive(Serialize)]
struct JsonResource {
    id: String,
    kind: &'static str,
    ready_at: Option<String>,
    released_at: Option<String>,
    /// Null for subscription base resources, which are billed by term.
    billed_seconds: Option<u64>,
}

#[derive(Serialize)]
struct JsonElastic {
    id: String,
    ready_at: Option<String>,
    released_at: Option<String>,
    billed_seconds: u64,
}

#[derive(Serialize)]
struct JsonDecision {
    at: String,
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resources: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<String>,
}

#[derive(Serialize)]
struct JsonTimeline {
    at: String,
    sessions: u64,
    waiting: u64,
    resources: u64,
    usage_pct: Option<String>,
}

fn json_decision(d: &Decision) -> JsonDecision {
    let mut j = JsonDecision {
        at: rfc3339(d.at),
        action: d.action.name(),
        count: None,
        resources: None,
        session: None,
        resource: None,
    };
    match &d.action {
        Action::Placed { session, resource } => {
            j.session = Some(session.to_string());
            j.resource = Some(resource.to_string());
        }
        Action::Rejected { session } => j.session = Some(session.to_string()),
        Action::ScaleOut { resources } => {
            j.count = Some(resources.len());
            j.resources = Some(resources.iter().map(ToString::to_string).collect());
        }
        Action::Created { resource }
        | Action::ScaleIn { resource }
        | Action::Released { resource } => j.resource = Some(resource.to_string()),
    }
    j
}

fn billed_elastic(sc: &Scenario, ready: Option<UnixMillis>, released: Option<UnixMillis>) -> u64 {
    ready.map_or(0, |r| {
        crate::engine::billing::billed_seconds(r, released, sc.end)
    })
}

/// The JSON object of SPEC section 7 (pretty-printed).
pub fn render_json(sc: &Scenario, out: &Outcome) -> Result<String, serde_json::Error> {
    let resources = out
        .resources
        .iter()
        .map(|r| JsonResource {
            id: r.id.to_string(),
            kind: r.class.as_str(),
            ready_at: r.ready_at.map(rfc3339),
            released_at: r.released_at.map(rfc3339),
            billed_seconds: match (r.class, sc.billing) {
                (Class::Elastic, _) => Some(billed_elastic(sc, r.ready_at, r.released_at)),
                (Class::Base, BaseBilling::PayAsYouGo) => Some(out.period_seconds),
                (Class::Base, BaseBilling::Subscription(_)) => None,
            },
        })
        .collect();
    let elastic = out
        .resources
        .iter()
        .filter(|r| r.class == Class::Elastic)
        .map(|r| JsonElastic {
            id: r.id.to_string(),
            ready_at: r.ready_at.map(rfc3339),
            released_at: r.released_at.map(rfc3339),
            billed_seconds: billed_elastic(sc, r.ready_at, r.released_at),
        })
        .collect();
    let timeline = out
        .rows
        .iter()
        .map(|row| JsonTimeline {
            at: rfc3339(row.at),
            sessions: row.snapshot.sessions,
            waiting: row.snapshot.waiting,
            resources: row.snapshot.resources,
            usage_pct: usage_pct(&row.snapshot),
        })
        .collect();
    let doc = JsonOut {
        name: sc.name.as_deref(),
        cost: JsonCost {
            currency: sc.prices.currency.clone(),
            subscription: out.bill.subscription.to_string(),
            base_payg: out.bill.base_payg.to_string(),
            elastic: out.bill.elastic.to_string(),
            total: out.bill.total.to_string(),
        },
        resources,
        elastic,
        decisions: out.decisions.iter().map(json_decision).collect(),
        decision_reasons: out.decisions.iter().map(|d| d.reason.to_string()).collect(),
        timeline,
    };
    serde_json::to_string_pretty(&doc)
}

pub(super) fn describe_event(kind: &EventKind) -> String {
    match kind {
        EventKind::Connect(s) => format!("{s} connects"),
        EventKind::Disconnect(s) => format!("{s} disconnects"),
        EventKind::Created(n) => format!("provider: {n} creation(s) complete"),
        EventKind::Released(n) => format!("provider: {n} release(s) complete"),
    }
}

pub(super) fn describe_decision(d: &Decision) -> String {
    let what = match &d.action {
        Action::Placed { session, resource } => format!("placed {session} on {resource}"),
        Action::Rejected { session } => format!("REJECTED {session}"),
        Action::ScaleOut { resources } => {
            let ids: Vec<String> = resources.iter().map(ToString::to_string).collect();
            format!("SCALE-OUT +{} ({})", resources.len(), ids.join(", "))
        }
        Action::Created { resource } => format!("{resource} is ready"),
        Action::ScaleIn { resource } => format!("SCALE-IN {resource}"),
        Action::Released { resource } => format!("{resource} released"),
    };
    format!("{what}: {}", d.reason)
}

/// `mon,wed-fri` from weekday bits (bit 0 = Monday).
pub(super) fn weekday_names(bits: u8) -> String {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let mut parts = Vec::new();
    let mut day = 0;
    while day < 7 {
        if bits & (1 << day) == 0 {
            day += 1;
            continue;
        }
        let first = day;
        while day + 1 < 7 && bits & (1 << (day + 1)) != 0 {
            day += 1;
        }
        parts.push(if day > first + 1 {
            format!("{}-{}", NAMES[first], NAMES[day])
        } else if day == first + 1 {
            format!("{},{}", NAMES[first], NAMES[day])
        } else {
            NAMES[first].to_owned()
        });
        day += 1;
    }
    parts.join(",")
}

/// `HH:MM` of minutes after midnight (`24:00` for the end of the day).
fn hhmm(minute: u16) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

fn resources_cell(s: &Snapshot) -> String {
    let mut cell = s.resources.to_string();
    let mut notes = Vec::new();
    if s.pending > 0 {
        notes.push(format!("{} pending", s.pending));
    }
    if s.releasing > 0 {
        notes.push(format!("{} releasing", s.releasing));
    }
    if !notes.is_empty() {
        let _ = write!(cell, " ({})", notes.join(", "));
    }
    cell
}

/// The readable table: one block per instant (time, sessions, waiting,
/// resources, usage, what happened and why), then the cost lines.
pub fn render_table(sc: &Scenario, out: &Outcome) -> String {
    let mut s = String::new();
    write_heading(&mut s, sc);
    let _ = writeln!(s);
    write_timeline(&mut s, sc, out);
    let _ = writeln!(s);
    write_cost(&mut s, sc, out);
    s
}

/// The scenario's name, period, group, policy and policy periods.
pub(super) fn write_heading(s: &mut String, sc: &Scenario) {
    let p = &sc.policy;
    if let Some(name) = &sc.name {
        let _ = writeln!(s, "Scenario: {name}");
    }
    let _ = writeln!(s, "Period:   {} .. {}", rfc3339(sc.start), rfc3339(sc.end));
    let _ = writeln!(s, "Group:    {}", group_line(sc));
    let _ = writeln!(
        s,
        "Policy:   {} session(s) per resource, threshold {}%, step {}, max elastic {}, max idle {}, cooldown {}, wait {}, {}",
        p.concurrent_sessions,
        p.usage_threshold,
        p.scale_out_step,
        p.max_elastic,
        format_duration(p.max_idle),
        format_duration(p.scale_in_cooldown),
        format_duration(p.wait_timeout),
        p.load_balancing
    );
    for (n, period) in p.periods.iter().enumerate() {
        let _ = writeln!(
            s,
            "Period {}: {} {}-{} UTC, min_ready {}, warm-up {}",
            n + 1,
            weekday_names(period.weekdays),
            hhmm(period.start_minute),
            hhmm(period.end_minute),
            period.min_ready,
            format_duration(period.warm_up)
        );
    }
}

/// The group's base resources, billing, spec and provider.
fn group_line(sc: &Scenario) -> String {
    let billing = match sc.billing {
        BaseBilling::Subscription(term) => format!("subscription {term}"),
        BaseBilling::PayAsYouGo => "pay-as-you-go".to_owned(),
    };
    let spec = sc
        .spec
        .as_deref()
        .map_or_else(String::new, |s| format!(", spec {s}"));
    let provider = match sc.provider {
        Provider::Explicit => "explicit".to_owned(),
        Provider::Delays {
            create_ms,
            release_ms,
        } => format!(
            "create in {}, release in {}",
            format_duration(std::time::Duration::from_millis(create_ms.max(0) as u64)),
            format_duration(std::time::Duration::from_millis(release_ms.max(0) as u64))
        ),
    };
    format!(
        "{} base resource(s), {billing}{spec}; provider {provider}",
        sc.base_resources
    )
}

/// The header and one block per row: the counts on the first line, each
/// further happening indented below.
fn write_timeline(s: &mut String, sc: &Scenario, out: &Outcome) {
    let header = format!(
        "{:<9} {:>8} {:>7}  {:<24} {:>6}  what happened",
        "time", "sessions", "waiting", "resources", "usage"
    );
    let _ = writeln!(s, "{header}");
    let _ = writeln!(s, "{}", "-".repeat(header.len() + 30));
    let indent = " ".repeat(9 + 1 + 8 + 1 + 7 + 2 + 24 + 1 + 6 + 2);
    for row in &out.rows {
        let usage = usage_pct(&row.snapshot).map_or_else(|| "-".to_owned(), |u| format!("{u}%"));
        let mut lines = row.happenings.iter().map(|h| match h {
            Happening::Event(e) => describe_event(e),
            Happening::Decision(d) => format!("-> {}", describe_decision(d)),
            Happening::Note(n) => format!("   ({n})"),
        });
        let first = lines.next().unwrap_or_default();
        let _ = writeln!(
            s,
            "{:<9} {:>8} {:>7}  {:<24} {:>6}  {first}",
            short_time(row.at, sc.start),
            row.snapshot.sessions,
            row.snapshot.waiting,
            resources_cell(&row.snapshot),
            usage
        );
        for line in lines {
            let _ = writeln!(s, "{indent}{line}");
        }
    }
}

/// The cost lines, each with how it was computed.
fn write_cost(s: &mut String, sc: &Scenario, out: &Outcome) {
    let b = &out.bill;
    let cur = &sc.prices.currency;
    let _ = writeln!(s, "Cost ({cur}, each line rounded half-up to 0.01)");
    let _ = writeln!(
        s,
        "  subscription        {:>12}  {}",
        b.subscription,
        subscription_note(sc)
    );
    let _ = writeln!(
        s,
        "  pay-as-you-go base  {:>12}  {}",
        b.base_payg,
        payg_note(sc, out)
    );
    let _ = writeln!(
        s,
        "  elastic             {:>12}  {}",
        b.elastic,
        elastic_note(sc, out)
    );
    let _ = write!(s, "  total               {:>12}  {cur}", b.total);
}

/// How the subscription line was computed.
fn subscription_note(sc: &Scenario) -> String {
    let cur = &sc.prices.currency;
    match sc.billing {
        BaseBilling::Subscription(term) => {
            let (num, den) = term.months_fraction();
            format!(
                "{} x {} {cur}/month x {term} ({num}/{den} month(s))",
                sc.base_resources, sc.prices.subscription_month
            )
        }
        BaseBilling::PayAsYouGo => "not a subscription group".to_owned(),
    }
}

/// How the pay-as-you-go base line was computed.
fn payg_note(sc: &Scenario, out: &Outcome) -> String {
    let cur = &sc.prices.currency;
    match sc.billing {
        BaseBilling::PayAsYouGo => format!(
            "{} x {} s x {} {cur}/hour",
            sc.base_resources, out.period_seconds, sc.prices.hourly
        ),
        BaseBilling::Subscription(_) => "not a pay-as-you-go group".to_owned(),
    }
}

/// How the elastic line was computed: each ready elastic resource's
/// billed seconds.
fn elastic_note(sc: &Scenario, out: &Outcome) -> String {
    let elastic_secs: Vec<String> = out
        .resources
        .iter()
        .filter(|r| r.class == Class::Elastic && r.ready_at.is_some())
        .map(|r| {
            format!(
                "{} {} s",
                r.id,
                billed_elastic(sc, r.ready_at, r.released_at)
            )
        })
        .collect();
    if elastic_secs.is_empty() {
        "no elastic resource was ready".to_owned()
    } else {
        format!(
            "({}) x {} {}/hour",
            elastic_secs.join(" + "),
            sc.prices.hourly,
            sc.prices.currency
        )
    }
}
