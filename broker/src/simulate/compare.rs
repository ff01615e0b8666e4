//! `ferryctl simulate A --compare B`: two policies over the same events.
//!
//! What may differ is what an operator chooses: the `[group]` (base
//! resources, billing, spec), the prices and the `[policy]`. The outside
//! world must be the same, or the comparison says nothing about the
//! policies: the period, the provider and every event (time and what
//! happens). The first difference found is named with both files' lines.

use std::fmt::Write as _;

use rust_decimal::Decimal;
use serde_json::json;

use crate::engine::Action;

use super::replay::Outcome;
use super::report::{describe_event, rfc3339};
use super::scenario::{Provider, Scenario};

/// Why two scenarios cannot be compared: the first difference in what
/// must be the same.
pub fn difference(a: &Scenario, a_file: &str, b: &Scenario, b_file: &str) -> Option<String> {
    if (a.start, a.end) != (b.start, b.end) {
        return Some(format!(
            "the periods differ: {a_file} runs {} .. {}, {b_file} runs {} .. {}",
            rfc3339(a.start),
            rfc3339(a.end),
            rfc3339(b.start),
            rfc3339(b.end)
        ));
    }
    if a.provider != b.provider {
        return Some(format!(
            "the [provider] differs: {a_file} {}, {b_file} {}",
            provider_text(a.provider),
            provider_text(b.provider)
        ));
    }
    if a.prices.currency != b.prices.currency {
        return Some(format!(
            "the currencies differ: {a_file} {}, {b_file} {}",
            a.prices.currency, b.prices.currency
        ));
    }
    let event = |file: &str, e: &super::Event| {
        format!(
            "{file} line {}: {} {}",
            e.line,
            rfc3339(e.at),
            describe_event(&e.kind)
        )
    };
    for (n, pair) in a.events.iter().zip(&b.events).enumerate() {
        let (ea, eb) = pair;
        if (ea.at, &ea.kind) != (eb.at, &eb.kind) {
            return Some(format!(
                "event {} differs: {} but {}",
                n + 1,
                event(a_file, ea),
                event(b_file, eb)
            ));
        }
    }
    let (na, nb) = (a.events.len(), b.events.len());
    if na != nb {
        let (longer, file, shorter_file) = if na > nb {
            (a, a_file, b_file)
        } else {
            (b, b_file, a_file)
        };
        let extra = na.min(nb);
        return Some(match longer.events.get(extra) {
            Some(e) => format!(
                "{file} has {} event(s) more than {shorter_file}, the first {}",
                na.abs_diff(nb),
                event(file, e)
            ),
            None => format!("{a_file} has {na} event(s), {b_file} {nb}"),
        });
    }
    None
}

fn provider_text(p: Provider) -> String {
    match p {
        Provider::Explicit => "explicit".to_owned(),
        Provider::Delays {
            create_ms,
            release_ms,
        } => format!("create in {create_ms} ms, release in {release_ms} ms"),
    }
}

/// Counts of the decisions an operator compares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Scale-out decisions (each may ask for several resources).
    pub scale_outs: usize,
    /// Resources asked for by those scale-outs.
    pub created: usize,
    /// Scale-in decisions.
    pub scale_ins: usize,
    /// Requests refused.
    pub rejected: usize,
}

/// The decisions of `out`, counted.
pub fn counts(out: &Outcome) -> Counts {
    let mut c = Counts::default();
    for d in &out.decisions {
        match &d.action {
            Action::ScaleOut { resources } => {
                c.scale_outs += 1;
                c.created += resources.len();
            }
            Action::ScaleIn { .. } => c.scale_ins += 1,
            Action::Rejected { .. } => c.rejected += 1,
            _ => {}
        }
    }
    c
}

/// The policy in one line, as the table's heading says it.
fn policy_text(sc: &Scenario) -> String {
    let p = &sc.policy;
    format!(
        "{}/resource, threshold {}%, step {}, max elastic {}, max idle {}, cooldown {}",
        p.concurrent_sessions,
        p.usage_threshold,
        p.scale_out_step,
        p.max_elastic,
        ferry_common::duration::format_duration(p.max_idle),
        ferry_common::duration::format_duration(p.scale_in_cooldown),
    )
}

/// The comparison as a short table: what each policy decided and cost,
/// and the difference (B minus A). No trailing newline.
pub fn render_text(a: (&str, &Scenario, &Outcome), b: (&str, &Scenario, &Outcome)) -> String {
    let (ca, cb) = (counts(a.2), counts(b.2));
    let (ta, tb) = (a.2.bill.total, b.2.bill.total);
    let cur = &a.1.prices.currency;
    let mut s = String::new();
    let _ = writeln!(s, "A: {}\n   {}", a.0, policy_text(a.1));
    let _ = writeln!(s, "B: {}\n   {}", b.0, policy_text(b.1));
    let _ = writeln!(
        s,
        "Same events: {} event(s), {} .. {}",
        a.1.events.len(),
        rfc3339(a.1.start),
        rfc3339(a.1.end)
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "{:<22} {:>12} {:>12} {:>12}", "", "A", "B", "B - A");
    let count_row = |s: &mut String, what: &str, x: usize, y: usize| {
        let diff = i128::try_from(y).unwrap_or(i128::MAX) - i128::try_from(x).unwrap_or(i128::MAX);
        let _ = writeln!(s, "{what:<22} {x:>12} {y:>12} {diff:>+12}");
    };
    count_row(&mut s, "scale-outs", ca.scale_outs, cb.scale_outs);
    count_row(&mut s, "resources created", ca.created, cb.created);
    count_row(&mut s, "scale-ins", ca.scale_ins, cb.scale_ins);
    count_row(&mut s, "rejected", ca.rejected, cb.rejected);
    for (what, x, y) in [
        ("subscription", a.2.bill.subscription, b.2.bill.subscription),
        ("pay-as-you-go base", a.2.bill.base_payg, b.2.bill.base_payg),
        ("elastic", a.2.bill.elastic, b.2.bill.elastic),
    ] {
        let _ = writeln!(s, "{what:<22} {x:>12} {y:>12} {:>12}", signed(y - x));
    }
    let _ = write!(
        s,
        "{:<22} {ta:>12} {tb:>12} {:>12}",
        format!("total ({cur})"),
        signed(tb - ta)
    );
    s
}

/// A difference with its sign (`+1.61`, `-0.30`, `0.00`).
fn signed(d: Decimal) -> String {
    if d > Decimal::ZERO {
        format!("+{d}")
    } else {
        d.to_string()
    }
}

/// The comparison as JSON: each side's file, decision counts and bill,
/// and the difference of the totals (B minus A).
pub fn render_json(
    a: (&str, &Scenario, &Outcome),
    b: (&str, &Scenario, &Outcome),
) -> Result<String, serde_json::Error> {
    let side = |(file, sc, out): (&str, &Scenario, &Outcome)| {
        let c = counts(out);
        json!({
            "file": file,
            "name": sc.name,
            "scale_outs": c.scale_outs,
            "resources_created": c.created,
            "scale_ins": c.scale_ins,
            "rejected": c.rejected,
            "cost": {
                "subscription": out.bill.subscription.to_string(),
                "base_payg": out.bill.base_payg.to_string(),
                "elastic": out.bill.elastic.to_string(),
                "total": out.bill.total.to_string(),
            },
        })
    };
    let diff = b.2.bill.total - a.2.bill.total;
    serde_json::to_string_pretty(&json!({
        "currency": a.1.prices.currency,
        "a": side(a),
        "b": side(b),
        "total_difference": diff.to_string(),
    }))
}
