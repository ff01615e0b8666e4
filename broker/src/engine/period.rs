//! Policy periods on the clock (SPEC section 4, scheduled scaling): which
//! period holds at an instant and when the next period boundary falls.
//!
//! Pure integer arithmetic on UTC milliseconds: a day is 86,400,000 ms (UTC
//! has no daylight saving; leap seconds do not exist in Unix time), day 0
//! (1970-01-01) was a Thursday. No clock is read.
//!
//! A period *holds* from its warm-up start (`start - warm_up`) to its end, end
//! excluded: during that window the engine creates elastic resources up to
//! `min_ready` and does not scale in while `ready <= min_ready` (what the
//! engine does then is in [`super::group`]). Periods are in UTC: minutes
//! after midnight on the chosen weekdays, computed from `now`. A period never
//! crosses midnight (its end may be `24:00`, which belongs to its own day),
//! but its warm-up may start the day before. When holds overlap (a warm-up
//! reaching into another period), the highest `min_ready` holds.

use super::policy::PolicyPeriod;

/// Milliseconds in a minute.
pub(crate) const MINUTE_MS: i64 = 60_000;
/// Milliseconds in a UTC day.
pub(crate) const DAY_MS: i64 = 24 * 60 * MINUTE_MS;

/// Days looked ahead for the next boundary: a period applies on at least one
/// weekday, so one comes within 8 days.
const LOOKAHEAD_DAYS: i64 = 8;

/// Weekday of UTC day `day` (days since 1970-01-01): Monday = 0 ... Sunday = 6,
/// the bit numbering of [`PolicyPeriod::weekdays`].
pub(crate) fn weekday(day: i64) -> u32 {
    // 1970-01-01 was a Thursday (3 with Monday = 0).
    (day + 3).rem_euclid(7) as u32
}

/// One period on one day, in absolute UTC milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Occurrence {
    /// Index of the period in the policy's list.
    pub index: usize,
    /// `start - warm_up`: elastic resources are created from here.
    pub warm_up_at: i64,
    /// The period's start.
    pub starts_at: i64,
    /// The period's end (excluded).
    pub ends_at: i64,
    /// Resources kept ready.
    pub min_ready: u32,
}

impl Occurrence {
    fn holds_at(&self, t: i64) -> bool {
        self.warm_up_at <= t && t < self.ends_at
    }
}

fn warm_up_ms(p: &PolicyPeriod) -> i64 {
    // Validation bounds warm_up by a day; the clamp keeps a bad value harmless.
    i64::try_from(p.warm_up.as_millis())
        .unwrap_or(DAY_MS)
        .min(DAY_MS)
}

/// The occurrence of period `index` on UTC day `day`, if it applies that weekday.
fn occurrence(index: usize, p: &PolicyPeriod, day: i64) -> Option<Occurrence> {
    if p.weekdays & (1 << weekday(day)) == 0 {
        return None;
    }
    let midnight = day.saturating_mul(DAY_MS);
    let starts_at = midnight.saturating_add(i64::from(p.start_minute) * MINUTE_MS);
    Some(Occurrence {
        index,
        warm_up_at: starts_at.saturating_sub(warm_up_ms(p)),
        starts_at,
        ends_at: midnight.saturating_add(i64::from(p.end_minute) * MINUTE_MS),
        min_ready: p.min_ready,
    })
}

/// The period holding at `t` with the highest `min_ready` (ties: the one
/// starting first, then the first in the policy), or `None`.
pub(crate) fn holding(periods: &[PolicyPeriod], t: i64) -> Option<Occurrence> {
    if periods.is_empty() {
        return None;
    }
    let day = t.div_euclid(DAY_MS);
    // A period of day d ends by the next midnight and warms up at most a day
    // ahead, so only today's and tomorrow's periods can hold at `t`.
    let mut best: Option<Occurrence> = None;
    for d in [day, day + 1] {
        for (i, p) in periods.iter().enumerate() {
            let Some(o) = occurrence(i, p, d).filter(|o| o.holds_at(t)) else {
                continue;
            };
            let better = best.is_none_or(|b| {
                (
                    o.min_ready,
                    std::cmp::Reverse(o.starts_at),
                    std::cmp::Reverse(o.index),
                ) > (
                    b.min_ready,
                    std::cmp::Reverse(b.starts_at),
                    std::cmp::Reverse(b.index),
                )
            });
            if better {
                best = Some(o);
            }
        }
    }
    best
}

/// Whether `t` is the end of some period occurrence (where idle countdowns
/// restart).
pub(crate) fn ends_at(periods: &[PolicyPeriod], t: i64) -> bool {
    if periods.is_empty() || t.rem_euclid(MINUTE_MS) != 0 {
        return false;
    }
    let day = t.div_euclid(DAY_MS);
    // A period ending at 24:00 belongs to the day before.
    [day - 1, day].into_iter().any(|d| {
        periods
            .iter()
            .enumerate()
            .filter_map(|(i, p)| occurrence(i, p, d))
            .any(|o| o.ends_at == t)
    })
}

/// The first occurrence whose warm-up starts after `t` (ties: first in the
/// policy), looking up to 8 days ahead.
pub(crate) fn upcoming(periods: &[PolicyPeriod], t: i64) -> Option<Occurrence> {
    if periods.is_empty() {
        return None;
    }
    let day = t.div_euclid(DAY_MS);
    let mut best: Option<Occurrence> = None;
    for d in day..=day + LOOKAHEAD_DAYS {
        // Occurrences of day d warm up at the earliest on day d - 1.
        if best.is_some_and(|b| (d - 1).saturating_mul(DAY_MS) > b.warm_up_at) {
            break;
        }
        for (i, p) in periods.iter().enumerate() {
            if let Some(o) = occurrence(i, p, d).filter(|o| o.warm_up_at > t) {
                if best.is_none_or(|b| o.warm_up_at < b.warm_up_at) {
                    best = Some(o);
                }
            }
        }
    }
    best
}

/// The first period boundary (a warm-up start, a start or an end) strictly
/// after `t`.
pub(crate) fn next_boundary(periods: &[PolicyPeriod], t: i64) -> Option<i64> {
    if periods.is_empty() {
        return None;
    }
    let day = t.div_euclid(DAY_MS);
    let mut best: Option<i64> = None;
    // Start a day back: a period of yesterday may still end after `t`.
    for d in day - 1..=day + LOOKAHEAD_DAYS {
        // Every boundary of day d's occurrence is at or after midnight of d - 1.
        if best.is_some_and(|b| (d - 1).saturating_mul(DAY_MS) > b) {
            break;
        }
        for (i, p) in periods.iter().enumerate() {
            let Some(o) = occurrence(i, p, d) else {
                continue;
            };
            for b in [o.warm_up_at, o.starts_at, o.ends_at] {
                if b > t && best.is_none_or(|x| b < x) {
                    best = Some(b);
                }
            }
        }
    }
    best
}

/// `HH:MM` of the UTC time of day of `t`; `24:00` when `t` is the midnight
/// ending `day_of`'s day.
pub(crate) fn hhmm(t: i64, day_of: i64) -> String {
    let minutes = (t - day_of.div_euclid(DAY_MS) * DAY_MS) / MINUTE_MS;
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// `YYYY-MM-DD` of the UTC day of `t`.
pub(crate) fn date(t: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(t)
        .map_or_else(|| format!("{t} ms"), |d| d.format("%Y-%m-%d").to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// 2026-03-02T00:00:00Z, a Monday.
    const MON: i64 = 1_772_409_600_000;
    const H: i64 = 3_600_000;

    fn period(
        weekdays: u8,
        start: u16,
        end: u16,
        min_ready: u32,
        warm_up_min: u64,
    ) -> PolicyPeriod {
        PolicyPeriod {
            weekdays,
            start_minute: start,
            end_minute: end,
            min_ready,
            warm_up: Duration::from_secs(warm_up_min * 60),
        }
    }

    #[test]
    fn weekdays_follow_the_calendar() {
        // Checked against a calendar: 1970-01-01 Thursday, 2026-03-02 Monday,
        // 2026-03-01 Sunday, 1969-12-31 Wednesday.
        assert_eq!(weekday(0), 3);
        assert_eq!(weekday(MON / DAY_MS), 0);
        assert_eq!(weekday(MON / DAY_MS - 1), 6);
        assert_eq!(weekday(-1), 2);
    }

    #[test]
    fn a_period_holds_from_its_warm_up_to_its_end_excluded() {
        let p = [period(0b1, 8 * 60, 9 * 60, 3, 10)];
        assert_eq!(holding(&p, MON + 7 * H + 50 * 60_000 - 1), None);
        let o = holding(&p, MON + 7 * H + 50 * 60_000).expect("warm-up holds");
        assert_eq!(
            (o.warm_up_at, o.starts_at, o.ends_at),
            (MON + 7 * H + 50 * 60_000, MON + 8 * H, MON + 9 * H)
        );
        assert!(holding(&p, MON + 9 * H - 1).is_some());
        assert_eq!(holding(&p, MON + 9 * H), None);
        // Monday only: Sunday and Tuesday are free.
        assert_eq!(holding(&p, MON - DAY_MS + 8 * H), None);
        assert_eq!(holding(&p, MON + DAY_MS + 8 * H), None);
        assert!(ends_at(&p, MON + 9 * H));
        assert!(!ends_at(&p, MON + DAY_MS + 9 * H));
    }

    #[test]
    fn a_warm_up_may_start_the_day_before() {
        // Tuesday 00:30 with 60 minutes warm-up: holds from Monday 23:30.
        let p = [period(0b10, 30, 120, 1, 60)];
        assert!(holding(&p, MON + 23 * H + 30 * 60_000).is_some());
        assert!(holding(&p, MON + 23 * H).is_none());
        assert_eq!(next_boundary(&p, MON), Some(MON + 23 * H + 30 * 60_000));
    }

    #[test]
    fn a_period_ending_at_midnight_ends_the_next_day() {
        let p = [period(0b1, 23 * 60, 24 * 60, 1, 0)];
        assert!(holding(&p, MON + DAY_MS - 1).is_some());
        assert!(holding(&p, MON + DAY_MS).is_none());
        assert!(ends_at(&p, MON + DAY_MS));
        assert_eq!(next_boundary(&p, MON + 23 * H), Some(MON + DAY_MS));
        assert_eq!(hhmm(MON + DAY_MS, MON + 23 * H), "24:00");
    }

    #[test]
    fn boundaries_come_in_order_and_skip_days_without_the_period() {
        // Monday and Thursday 08:00-09:00, warm-up 15 minutes.
        let p = [period(0b1001, 8 * 60, 9 * 60, 2, 15)];
        let mut t = MON - DAY_MS;
        let mut seen = Vec::new();
        while let Some(b) = next_boundary(&p, t) {
            if b > MON + 7 * DAY_MS {
                break;
            }
            seen.push((b - MON) / 60_000);
            t = b;
        }
        let thu = 3 * 24 * 60;
        assert_eq!(
            seen,
            [
                7 * 60 + 45,
                8 * 60,
                9 * 60,
                thu + 7 * 60 + 45,
                thu + 8 * 60,
                thu + 9 * 60
            ]
        );
        let next = upcoming(&p, MON + 8 * H).expect("Thursday's");
        assert_eq!(next.starts_at, MON + 3 * DAY_MS + 8 * H);
    }

    #[test]
    fn the_highest_min_ready_holds_when_windows_overlap() {
        // 08:00-09:00 needs 2; 09:05-10:00 needs 4 with 30 minutes warm-up
        // (from 08:35), so from 08:35 to 09:00 both hold.
        let p = [
            period(0x7f, 8 * 60, 9 * 60, 2, 0),
            period(0x7f, 9 * 60 + 5, 10 * 60, 4, 30),
        ];
        assert_eq!(holding(&p, MON + 8 * H).map(|o| o.min_ready), Some(2));
        let o = holding(&p, MON + 8 * H + 40 * 60_000).expect("both");
        assert_eq!((o.index, o.min_ready), (1, 4));
    }

    #[test]
    fn no_periods_no_work() {
        assert_eq!(holding(&[], MON), None);
        assert_eq!(next_boundary(&[], MON), None);
        assert_eq!(upcoming(&[], MON), None);
        assert!(!ends_at(&[], MON));
    }
}
