//! Usage reports: the metering records of a period turned into session and
//! resource time and amounts, with the billing rules of
//! [`engine::billing`](crate::engine::billing) (the functions `ferryctl
//! simulate` uses), so the same records always give the same amounts.
//!
//! Loading reads committed rows only; [`compute`] is pure.
//!
//! Rules, per group over `[from, to)`:
//! - subscription: the orders (publish, renew, auto-renew) placed in the
//!   period, summed and rounded;
//! - pay-as-you-go base: every base resource per second from ready to
//!   released, clipped to the period;
//! - elastic: every elastic resource per second from ready to released,
//!   clipped to the period;
//! - each line rounded half-up to 0.01; the total is the sum of the lines.
//!
//! A session counts for a group when its resource was in the group (an
//! interval of it overlaps the session); it is counted in the period it
//! started in, and its time is clipped to the period.
//!
//! Nothing is billed that has not happened: a period that reaches past `now`
//! is billed up to `now` (a report "so far"), and the report's `to` says so
//! (it is the earlier of the asked end and `now`, never before `from`). The
//! same closed period always gives the same report.

use std::collections::BTreeMap;

use ferry_common::admin::{
    GroupUsage, ResourceAmount, ResourceUsage, UsageDetail, UsageQuery, UsageReport,
};
use ferry_common::{ResourceId, UnixMillis};
use rust_decimal::Decimal;

use crate::engine::billing::{billed_seconds, per_second_amount, round_line, Prices};
pub use crate::store::usage::{GroupRecords, Interval, Kind, SessionSpan};
use crate::store::{Store, StoreError};

/// Why a usage report cannot be given.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

fn overlaps(i: &Interval, s: &SessionSpan) -> bool {
    let i_end = i.released_at.map_or(i64::MAX, |t| t.0);
    let s_end = s.ended_at.map_or(i64::MAX, |t| t.0);
    i.ready_at.0 <= s_end && s.started_at.0 <= i_end
}

/// Seconds of `[start, end)` inside `[from, to)`, a started second billed whole.
fn clipped_seconds(
    start: UnixMillis,
    end: Option<UnixMillis>,
    from: UnixMillis,
    to: UnixMillis,
) -> u64 {
    billed_seconds(UnixMillis(start.0.max(from.0)), end, to)
}

/// The report of `groups` over `[from, to)`. Pure: the same records give the
/// same report.
pub fn compute(
    groups: &[GroupRecords],
    prices: &BTreeMap<String, Prices>,
    currency: &str,
    from: UnixMillis,
    to: UnixMillis,
) -> Result<UsageReport, UsageError> {
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        let mut resources: BTreeMap<ResourceId, ResourceUsage> = BTreeMap::new();
        let (mut base_seconds, mut elastic_seconds) = (0u64, 0u64);
        for i in &g.intervals {
            let secs = clipped_seconds(i.ready_at, i.released_at, from, to);
            match i.kind {
                Kind::Base => base_seconds = base_seconds.saturating_add(secs),
                Kind::Elastic => elastic_seconds = elastic_seconds.saturating_add(secs),
            }
            let entry = resources
                .entry(i.resource.clone())
                .or_insert_with(|| ResourceUsage {
                    resource: i.resource.clone(),
                    kind: match i.kind {
                        Kind::Base => "base".into(),
                        Kind::Elastic => "elastic".into(),
                    },
                    sessions: 0,
                    session_seconds: 0,
                    ready_seconds: 0,
                });
            entry.ready_seconds = entry.ready_seconds.saturating_add(secs);
        }
        for s in &g.sessions {
            let in_group = g
                .intervals
                .iter()
                .any(|i| i.resource == s.resource && overlaps(i, s));
            if !in_group {
                continue;
            }
            if let Some(r) = resources.get_mut(&s.resource) {
                if s.started_at >= from && s.started_at < to {
                    r.sessions += 1;
                }
                r.session_seconds = r.session_seconds.saturating_add(clipped_seconds(
                    s.started_at,
                    s.ended_at,
                    from,
                    to,
                ));
            }
        }
        let hourly = || {
            prices.get(&g.spec).map(|p| p.hourly).ok_or_else(|| {
                UsageError::Invalid(format!(
                    "no price is configured for spec {} of group {}",
                    g.spec, g.name
                ))
            })
        };
        let subscription = round_line(g.orders.iter().copied().sum());
        let base_payg = if g.billing == "pay-as-you-go" && base_seconds > 0 {
            round_line(per_second_amount(hourly()?, base_seconds))
        } else {
            round_line(Decimal::ZERO)
        };
        let elastic = if elastic_seconds > 0 {
            round_line(per_second_amount(hourly()?, elastic_seconds))
        } else {
            round_line(Decimal::ZERO)
        };
        let total = subscription + base_payg + elastic;
        out.push(GroupUsage {
            group: g.name.clone(),
            id: g.id.clone(),
            billing: g.billing.clone(),
            resources: resources.into_values().collect(),
            base_seconds,
            elastic_seconds,
            subscription: subscription.to_string(),
            base_payg: base_payg.to_string(),
            elastic: elastic.to_string(),
            total: total.to_string(),
        });
    }
    Ok(UsageReport {
        from,
        to,
        currency: currency.to_owned(),
        groups: out,
    })
}

/// `ferryctl usage`: reads the committed records and computes the report up
/// to the earlier of the period's end and `now` (see the module doc).
pub async fn report(
    store: &Store,
    prices: &BTreeMap<String, Prices>,
    currency: &str,
    query: UsageQuery,
    now: UnixMillis,
) -> Result<UsageReport, UsageError> {
    if query.to <= query.from {
        return Err(UsageError::Invalid(format!(
            "the period is empty: --to ({} ms) must be after --from ({} ms)",
            query.to.0, query.from.0
        )));
    }
    let until = billed_until(&query, now);
    let records = store
        .usage_records(query.group.clone(), query.from, query.to)
        .await?;
    if let (Some(g), true) = (&query.group, records.is_empty()) {
        return Err(UsageError::NotFound(format!(
            "no group named {g} existed between the given times"
        )));
    }
    compute(&records, prices, currency, query.from, until)
}

/// The end of what a report over `query` may bill at `now`: the period's end
/// once it has passed, `now` inside it, and its start before it began.
pub fn billed_until(query: &UsageQuery, now: UnixMillis) -> UnixMillis {
    UnixMillis(query.to.0.min(now.0).max(query.from.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    const H: i64 = 3_600_000;

    fn rid(s: &str) -> ResourceId {
        s.parse().expect("id")
    }

    fn prices() -> BTreeMap<String, Prices> {
        BTreeMap::from([(
            "office-4c8g".to_string(),
            Prices {
                currency: "CNY".into(),
                subscription_month: dec!(199),
                hourly: dec!(0.62),
            },
        )])
    }

    fn interval(r: &str, kind: Kind, ready: i64, released: Option<i64>) -> Interval {
        Interval {
            resource: rid(r),
            kind,
            ready_at: UnixMillis(ready),
            released_at: released.map(UnixMillis),
        }
    }

    fn group(billing: &str, intervals: Vec<Interval>, sessions: Vec<SessionSpan>) -> GroupRecords {
        GroupRecords {
            name: "g1".parse().expect("name"),
            id: "dg-1".into(),
            spec: "office-4c8g".into(),
            billing: billing.into(),
            orders: vec![],
            intervals,
            sessions,
        }
    }

    #[test]
    fn lines_are_rounded_separately_and_clipped_to_the_period() {
        let g = group(
            "pay-as-you-go",
            vec![
                interval("h1", Kind::Base, 0, None),
                interval("h2", Kind::Base, 0, None),
                // Half of it before the period: only the inside half is billed.
                interval("g1-e1", Kind::Elastic, -H / 2, Some(H / 2)),
            ],
            vec![
                SessionSpan {
                    resource: rid("h1"),
                    started_at: UnixMillis(-H),
                    ended_at: Some(UnixMillis(H / 4)),
                },
                SessionSpan {
                    resource: rid("h1"),
                    started_at: UnixMillis(H / 2),
                    ended_at: None,
                },
                // Not a resource of the group.
                SessionSpan {
                    resource: rid("h9"),
                    started_at: UnixMillis(0),
                    ended_at: None,
                },
            ],
        );
        let r = compute(&[g], &prices(), "CNY", UnixMillis(0), UnixMillis(2 * H)).expect("report");
        let g = &r.groups[0];
        assert_eq!((g.base_seconds, g.elastic_seconds), (4 * 3600, 1800));
        // 0.62 x 4 = 2.48; 0.62 / 2 = 0.31.
        assert_eq!(
            (
                g.subscription.as_str(),
                g.base_payg.as_str(),
                g.elastic.as_str(),
                g.total.as_str()
            ),
            ("0.00", "2.48", "0.31", "2.79")
        );
        let h1 = g
            .resources
            .iter()
            .find(|r| r.resource == rid("h1"))
            .expect("h1");
        assert_eq!(
            (h1.sessions, h1.session_seconds, h1.ready_seconds),
            (1, 900 + 5400, 7200)
        );
        assert!(g.resources.iter().all(|r| r.resource != rid("h9")));
    }

    #[test]
    fn subscription_orders_in_the_period_are_the_subscription_line_and_base_is_not_billed_twice() {
        let mut g = group(
            "subscription",
            vec![interval("h1", Kind::Base, 0, None)],
            vec![],
        );
        g.orders = vec![dec!(92.87), dec!(0.004)];
        let r = compute(&[g], &prices(), "CNY", UnixMillis(0), UnixMillis(H)).expect("report");
        let g = &r.groups[0];
        assert_eq!(
            (
                g.subscription.as_str(),
                g.base_payg.as_str(),
                g.total.as_str()
            ),
            ("92.87", "0.00", "92.87")
        );
    }

    #[test]
    fn a_spec_without_prices_is_refused_only_when_time_must_be_priced() {
        let mut g = group(
            "pay-as-you-go",
            vec![interval("h1", Kind::Base, 0, None)],
            vec![],
        );
        g.spec = "unknown".into();
        assert!(matches!(
            compute(&[g.clone()], &prices(), "CNY", UnixMillis(0), UnixMillis(H)),
            Err(UsageError::Invalid(_))
        ));
        g.intervals.clear();
        assert!(compute(&[g], &prices(), "CNY", UnixMillis(0), UnixMillis(H)).is_ok());
    }
}

/// Each resource's amount in `report`, for information (the bill rounds
/// each line, not each resource): its ready seconds at its group's hourly
/// price, per second, unrounded; `None` for a base resource of a
/// subscription group (paid by the subscription). `specs` maps each group's
/// id to its spec.
pub fn resource_amounts(
    report: &UsageReport,
    specs: &BTreeMap<String, String>,
    prices: &BTreeMap<String, Prices>,
) -> Result<Vec<ResourceAmount>, UsageError> {
    let mut out = Vec::new();
    for g in &report.groups {
        let hourly = specs
            .get(&g.id)
            .and_then(|spec| prices.get(spec))
            .map(|p| p.hourly);
        for r in &g.resources {
            let billed_by_use = r.kind == "elastic" || g.billing == "pay-as-you-go";
            let amount = if !billed_by_use {
                None
            } else if r.ready_seconds == 0 {
                Some(Decimal::ZERO.to_string())
            } else {
                let hourly = hourly.ok_or_else(|| {
                    UsageError::Invalid(format!(
                        "no price is configured for the spec of group {}",
                        g.group
                    ))
                })?;
                Some(
                    per_second_amount(hourly, r.ready_seconds)
                        .normalize()
                        .to_string(),
                )
            };
            out.push(ResourceAmount {
                group: g.group.clone(),
                resource: r.resource.clone(),
                amount,
            });
        }
    }
    Ok(out)
}

/// `ferryctl usage`: [`report`] with each resource's amount, and the end
/// of the period asked for (later than the report's end for a report so far).
pub async fn report_detailed(
    store: &Store,
    prices: &BTreeMap<String, Prices>,
    currency: &str,
    query: UsageQuery,
    now: UnixMillis,
) -> Result<UsageDetail, UsageError> {
    let asked_to = query.to;
    let report = report(store, prices, currency, query, now).await?;
    let specs = store.group_specs().await?;
    let resources = resource_amounts(&report, &specs, prices)?;
    Ok(UsageDetail {
        report,
        resources,
        asked_to,
    })
}

#[cfg(test)]
mod amount_tests {
    use super::*;
    use ferry_common::admin::GroupUsage;

    fn usage(resource: &str, kind: &str, ready_seconds: u64) -> ResourceUsage {
        ResourceUsage {
            resource: resource.parse().expect("id"),
            kind: kind.into(),
            sessions: 0,
            session_seconds: 0,
            ready_seconds,
        }
    }

    #[test]
    fn resource_amounts_are_exact_and_subscription_base_is_paid_by_it() {
        let group = |name: &str, billing: &str, resources| GroupUsage {
            group: name.parse().expect("name"),
            id: format!("dg-{name}"),
            billing: billing.into(),
            resources,
            base_seconds: 0,
            elastic_seconds: 0,
            subscription: "0.00".into(),
            base_payg: "0.00".into(),
            elastic: "0.00".into(),
            total: "0.00".into(),
        };
        let report = UsageReport {
            from: UnixMillis(0),
            to: UnixMillis(1),
            currency: "CNY".into(),
            groups: vec![
                group(
                    "sub",
                    "subscription",
                    vec![usage("s1", "base", 3600), usage("sub-e1", "elastic", 1800)],
                ),
                group("payg", "pay-as-you-go", vec![usage("p1", "base", 100)]),
            ],
        };
        let prices = BTreeMap::from([(
            "office-4c8g".to_owned(),
            Prices {
                currency: "CNY".into(),
                subscription_month: Decimal::from(199),
                hourly: Decimal::new(62, 2),
            },
        )]);
        let specs = BTreeMap::from([
            ("dg-sub".to_owned(), "office-4c8g".to_owned()),
            ("dg-payg".to_owned(), "office-4c8g".to_owned()),
        ]);
        let amounts = resource_amounts(&report, &specs, &prices).expect("amounts");
        let got: Vec<(String, Option<String>)> = amounts
            .into_iter()
            .map(|a| (a.resource.to_string(), a.amount))
            .collect();
        assert_eq!(
            got,
            [
                ("s1".into(), None),
                ("sub-e1".into(), Some("0.31".into())),
                // 0.62 x 100 / 3600, exact (not rounded to the cent).
                ("p1".into(), Some("0.0172222222222222222222222222".into())),
            ]
        );
        assert!(resource_amounts(&report, &BTreeMap::new(), &prices).is_err());
    }
}
