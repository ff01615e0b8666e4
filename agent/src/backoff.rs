//! Reconnect delays shared by the broker link and enrollment: a ceiling that
//! doubles with each failure, and full jitter under it. Pure.

use std::time::Duration;

/// First reconnect delay ceiling.
pub const BACKOFF_START: Duration = Duration::from_millis(200);
/// Longest reconnect delay ceiling: a broker that is back is found within it.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Ceiling of the reconnect delay after `attempt` failures in a row:
/// 200 ms doubling up to 30 s. Pure.
pub fn backoff_ceiling(attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    BACKOFF_START.saturating_mul(factor).min(BACKOFF_CAP)
}

/// "Full jitter": a delay uniform in `[0, ceiling]`, from a random number.
/// Pure; agents that lost the broker together do not come back together.
pub fn full_jitter(ceiling: Duration, random: u64) -> Duration {
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(random % ms.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_200ms_to_a_30s_cap() {
        let ceilings: Vec<u64> = (0..10)
            .map(|a| backoff_ceiling(a).as_millis() as u64)
            .collect();
        assert_eq!(
            ceilings,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        assert_eq!(backoff_ceiling(u32::MAX), BACKOFF_CAP);
        assert_eq!(backoff_ceiling(64), BACKOFF_CAP);
    }

    #[test]
    fn full_jitter_stays_within_the_ceiling() {
        let c = Duration::from_millis(800);
        assert_eq!(full_jitter(c, 0), Duration::ZERO);
        assert_eq!(full_jitter(c, 800), c);
        assert_eq!(full_jitter(c, 801), Duration::ZERO);
        assert_eq!(full_jitter(c, 1234), Duration::from_millis(1234 % 801));
        for r in [u64::MAX, u64::MAX - 1, 17, 999_999] {
            assert!(full_jitter(c, r) <= c);
        }
        assert_eq!(full_jitter(Duration::ZERO, 99), Duration::ZERO);
    }
}
