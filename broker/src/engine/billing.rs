//! Billing rules of SPEC section 6, exact with `rust_decimal`.
//!
//! Kept apart from the engine so the metering usage reports compute amounts with
//! the very same functions as `ferryctl simulate`: the same records always give
//! the same amounts.
//!
//! Where the spec is silent: per-second billing counts a started second as a
//! whole second.

use std::fmt;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use ferry_common::UnixMillis;

/// Longest subscription term in any unit. Far beyond what anyone buys; keeps
/// `price * count * months` far from `Decimal`'s range.
pub const MAX_TERM_UNITS: u32 = 1_000;

/// A subscription's paid duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Term {
    /// N weeks: billed as `7N / 30` months.
    Weeks(u32),
    /// N months.
    Months(u32),
    /// N years: billed as `12N` months.
    Years(u32),
}

/// Why a term string is not valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid subscription duration {input:?}: {why} (write Nw, Nmo or Ny, e.g. 1w, 3mo, 1y)")]
pub struct TermError {
    /// What was written.
    pub input: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl Term {
    /// Reads `Nw`, `Nmo` or `Ny` with `N >= 1`.
    pub fn parse(input: &str) -> Result<Self, TermError> {
        let err = |why| TermError {
            input: input.to_owned(),
            why,
        };
        let s = input.trim();
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err("expected a number first"));
        }
        let n: u32 = s[..digits].parse().map_err(|_| err("number too large"))?;
        if n == 0 {
            return Err(err("must be at least 1"));
        }
        if n > MAX_TERM_UNITS {
            return Err(err("longer than 1000 units"));
        }
        match &s[digits..] {
            "w" => Ok(Self::Weeks(n)),
            "mo" => Ok(Self::Months(n)),
            "y" => Ok(Self::Years(n)),
            "" => Err(err("missing unit")),
            _ => Err(err("unknown unit")),
        }
    }

    /// The billed months as an exact fraction `(numerator, denominator)`, so the
    /// division happens once, last, and nothing is lost before rounding.
    pub fn months_fraction(self) -> (u64, u64) {
        match self {
            Self::Weeks(n) => (7 * u64::from(n), 30),
            Self::Months(n) => (u64::from(n), 1),
            Self::Years(n) => (12 * u64::from(n), 1),
        }
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Weeks(n) => write!(f, "{n}w"),
            Self::Months(n) => write!(f, "{n}mo"),
            Self::Years(n) => write!(f, "{n}y"),
        }
    }
}

/// How a group's base resources are billed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BaseBilling {
    /// Paid ahead for a term, per resource per month.
    Subscription(Term),
    /// Per second over the billed period, per resource.
    PayAsYouGo,
}

/// Unit prices of one spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prices {
    /// Currency code printed beside every amount (e.g. `CNY`).
    pub currency: String,
    /// Price of one subscription resource per month.
    pub subscription_month: Decimal,
    /// Price of one pay-as-you-go resource (base or elastic) per hour.
    pub hourly: Decimal,
}

/// The amount lines of a bill, each rounded half-up to 0.01.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bill {
    /// Subscription base resources for their term.
    pub subscription: Decimal,
    /// Pay-as-you-go base resources over the period.
    pub base_payg: Decimal,
    /// Elastic resources from ready to released.
    pub elastic: Decimal,
    /// Sum of the rounded lines (not the rounding of the unrounded sum).
    pub total: Decimal,
}

/// Rounds one bill line half-up to two places, keeping two places (`199.00`).
pub fn round_line(amount: Decimal) -> Decimal {
    let mut d = amount.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
    d.rescale(2);
    d
}

/// Seconds billed for an interval: from `ready` to `released`, or to `period_end`
/// when still running; nothing before `ready`. A started second is billed whole,
/// as per-second billing means.
pub fn billed_seconds(
    ready: UnixMillis,
    released: Option<UnixMillis>,
    period_end: UnixMillis,
) -> u64 {
    let until = released.map_or(period_end, |r| r.min(period_end));
    let ms = until.0.saturating_sub(ready.0).max(0);
    u64::try_from(ms).map_or(0, |ms| ms.div_ceil(1000))
}

/// Unrounded cost of `count` subscription resources for `term`.
pub fn subscription_amount(price_month: Decimal, count: u32, term: Term) -> Decimal {
    let (num, den) = term.months_fraction();
    price_month * Decimal::from(count) * Decimal::from(num) / Decimal::from(den)
}

/// Unrounded cost of `resource_seconds` (resources x seconds) at an hourly price.
pub fn per_second_amount(hourly: Decimal, resource_seconds: u64) -> Decimal {
    hourly * Decimal::from(resource_seconds) / Decimal::from(3600)
}

/// The bill of one group over one period.
///
/// `base_count` base resources billed by `base`; `period_seconds` is the billed
/// period (pay-as-you-go base); `elastic_seconds` the billed seconds of each
/// elastic resource ([`billed_seconds`]).
pub fn bill(
    base: BaseBilling,
    base_count: u32,
    prices: &Prices,
    period_seconds: u64,
    elastic_seconds: impl IntoIterator<Item = u64>,
) -> Bill {
    let subscription = match base {
        BaseBilling::Subscription(term) => round_line(subscription_amount(
            prices.subscription_month,
            base_count,
            term,
        )),
        BaseBilling::PayAsYouGo => round_line(Decimal::ZERO),
    };
    let base_payg = match base {
        BaseBilling::Subscription(_) => round_line(Decimal::ZERO),
        BaseBilling::PayAsYouGo => round_line(per_second_amount(
            prices.hourly,
            u64::from(base_count).saturating_mul(period_seconds),
        )),
    };
    let elastic_total: u64 = elastic_seconds
        .into_iter()
        .fold(0u64, |a, s| a.saturating_add(s));
    let elastic = round_line(per_second_amount(prices.hourly, elastic_total));
    let total = subscription + base_payg + elastic;
    Bill {
        subscription,
        base_payg,
        elastic,
        total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn cny(month: Decimal, hourly: Decimal) -> Prices {
        Prices {
            currency: "CNY".into(),
            subscription_month: month,
            hourly,
        }
    }

    #[test]
    fn seed_example() {
        let prices = cny(dec!(199), dec!(0.726736));
        let b = bill(
            BaseBilling::Subscription(Term::Weeks(1)),
            2,
            &prices,
            4 * 3600,
            [3600, 4398],
        );
        assert_eq!(b.subscription.to_string(), "92.87");
        assert_eq!(b.base_payg.to_string(), "0.00");
        assert_eq!(b.elastic.to_string(), "1.61");
        assert_eq!(b.total.to_string(), "94.48");
    }

    #[test]
    fn terms() {
        assert_eq!(Term::parse("1w"), Ok(Term::Weeks(1)));
        assert_eq!(Term::parse("3mo"), Ok(Term::Months(3)));
        assert_eq!(Term::parse("2y"), Ok(Term::Years(2)));
        for bad in ["", "w", "0w", "1m", "1", "-1w", "1 w", "1001y"] {
            assert!(Term::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(subscription_amount(dec!(10), 1, Term::Years(2)), dec!(240));
        assert_eq!(
            round_line(subscription_amount(dec!(199), 1, Term::Months(1))).to_string(),
            "199.00"
        );
    }

    #[test]
    fn half_up_per_line_then_sum() {
        assert_eq!(round_line(dec!(0.125)), dec!(0.13));
        assert_eq!(round_line(dec!(0.124999)), dec!(0.12));
        // Two lines of 0.005 each round to 0.01 each: the total is 0.02, not
        // round(0.010) = 0.01.
        let prices = cny(dec!(0), dec!(18));
        let b = bill(BaseBilling::PayAsYouGo, 1, &prices, 1, [1]);
        assert_eq!(b.base_payg, dec!(0.01));
        assert_eq!(b.elastic, dec!(0.01));
        assert_eq!(b.total, dec!(0.02));
    }

    #[test]
    fn billed_seconds_counts_started_seconds_up_to_the_period_end() {
        assert_eq!(
            billed_seconds(
                UnixMillis(0),
                Some(UnixMillis(3_600_000)),
                UnixMillis(9_000_000)
            ),
            3600
        );
        assert_eq!(billed_seconds(UnixMillis(0), None, UnixMillis(10_001)), 11);
        assert_eq!(
            billed_seconds(UnixMillis(0), Some(UnixMillis(50_000)), UnixMillis(20_000)),
            20
        );
        assert_eq!(
            billed_seconds(UnixMillis(30_000), None, UnixMillis(20_000)),
            0
        );
    }
}
