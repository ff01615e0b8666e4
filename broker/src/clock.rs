//! Where the broker reads the time.
//!
//! The groups (actors, lifecycle deadlines, the notification outbox, OTA),
//! the agent link's last-seen times and the admin verbs read one [`Clock`]:
//! the system clock in production, a [`ManualClock`] a test moves by hand
//! (it can only be built in code, never from the config file). Nothing else
//! reads the wall clock, so a test can expire a week-long subscription
//! without waiting a week and without a shortened production setting.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_common::UnixMillis;
use tokio::sync::watch;

/// The system clock as Unix milliseconds.
pub fn now_millis() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    UnixMillis(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// Longest single sleep: the wall clock can jump (NTP, suspend), so a long
/// wait is re-checked against it at least this often.
pub const MAX_TIMER_SLEEP: Duration = Duration::from_secs(60);

/// Where the group tasks and [`GroupService::now`] read the time.
///
/// The default is the system clock. A [`ManualClock`] replaces it in tests;
/// it can only be built in code, never from the config file, so it is not a
/// production knob.
#[derive(Clone, Default)]
pub struct Clock {
    /// `None`: the system clock. `Some`: a hand-moved time whose changes
    /// wake sleepers.
    manual: Option<Arc<watch::Sender<UnixMillis>>>,
}

impl Clock {
    /// The system clock (the default).
    pub fn system() -> Clock {
        Clock::default()
    }

    /// The current time.
    pub fn now(&self) -> UnixMillis {
        match &self.manual {
            None => now_millis(),
            Some(t) => *t.borrow(),
        }
    }

    /// Resolves at `deadline` (`None`: when nothing is scheduled), or after
    /// [`MAX_TIMER_SLEEP`] on the system clock so a wall-clock jump is
    /// noticed. A manual clock resolves once it is moved to `deadline` or
    /// past it (never, for `None`). Cancel-safe.
    pub async fn sleep_until(&self, deadline: Option<UnixMillis>) {
        match &self.manual {
            None => tokio::time::sleep(until(deadline, now_millis())).await,
            Some(t) => {
                let mut rx = t.subscribe();
                match deadline {
                    Some(d) => {
                        // Err: the sender is gone, which cannot happen while
                        // `self` holds it; then there is nothing to wait for.
                        let _ = rx.wait_for(|now| *now >= d).await;
                    }
                    None => std::future::pending().await,
                }
            }
        }
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.manual {
            None => f.write_str("Clock(system)"),
            Some(t) => write!(f, "Clock(manual at {})", t.borrow().0),
        }
    }
}

/// Two clocks are equal when they tell the same time by construction: both
/// the system clock, or the same manual clock.
impl PartialEq for Clock {
    fn eq(&self, other: &Clock) -> bool {
        match (&self.manual, &other.manual) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Clock {}

/// A clock a test moves by hand; [`ManualClock::clock`] goes into
/// [`GroupsConfig::clock`].
#[derive(Clone, Debug)]
pub struct ManualClock {
    /// The clock handed to the broker.
    clock: Clock,
}

impl ManualClock {
    /// A clock standing at `start` until moved.
    pub fn new(start: UnixMillis) -> ManualClock {
        ManualClock {
            clock: Clock {
                manual: Some(Arc::new(watch::Sender::new(start))),
            },
        }
    }

    /// The clock to hand to the broker.
    pub fn clock(&self) -> Clock {
        self.clock.clone()
    }

    /// The time it shows.
    pub fn now(&self) -> UnixMillis {
        self.clock.now()
    }

    /// Moves the time forward by `by`, waking every sleeper it reaches.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.set(UnixMillis(self.now().0.saturating_add(ms)));
    }

    /// Sets the time (it may go backwards, as a wall clock can).
    pub fn set(&self, to: UnixMillis) {
        if let Some(t) = &self.clock.manual {
            t.send_replace(to);
        }
    }
}

fn until(next: Option<UnixMillis>, now: UnixMillis) -> Duration {
    match next {
        Some(t) => Duration::from_millis(u64::try_from(t.0.saturating_sub(now.0)).unwrap_or(0))
            .min(MAX_TIMER_SLEEP),
        None => MAX_TIMER_SLEEP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-03-02T00:00:00Z
    const T0: UnixMillis = UnixMillis(1_772_409_600_000);

    /// Bounds a wait that needs the sleeper: one that does has failed.
    const PATIENCE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_when_moved_past_their_deadline() {
        let clock = ManualClock::new(T0);
        let c = clock.clock();
        let sleeper =
            tokio::spawn(async move { c.sleep_until(Some(UnixMillis(T0.0 + 60_000))).await });
        clock.advance(Duration::from_secs(59));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(1));
        tokio::time::timeout(PATIENCE, sleeper)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(clock.now(), UnixMillis(T0.0 + 60_000));
        assert_eq!(Clock::system(), Clock::default());
        assert_ne!(clock.clock(), Clock::system());
        assert_eq!(clock.clock(), clock.clock());
        assert_ne!(clock.clock(), ManualClock::new(T0).clock());
    }

    #[test]
    fn long_waits_are_capped_so_clock_jumps_are_noticed() {
        assert_eq!(until(None, T0), MAX_TIMER_SLEEP);
        assert_eq!(until(Some(UnixMillis(T0.0 - 5)), T0), Duration::ZERO);
        assert_eq!(
            until(Some(UnixMillis(T0.0 + 1_500)), T0),
            Duration::from_millis(1_500)
        );
        assert_eq!(
            until(Some(UnixMillis(T0.0 + 86_400_000)), T0),
            MAX_TIMER_SLEEP
        );
    }
}
