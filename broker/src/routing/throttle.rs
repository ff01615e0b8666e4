//! Failed-login throttling (issue 14): a pure core ([`LoginThrottle`], time
//! passed in) and the route service's shared, locked handle ([`Throttle`]).
//!
//! Two counters, one per source address (an IPv6 address counts as its /64,
//! which one machine usually holds whole) and one per user:
//!
//! - **Per source.** After `failures_per_source` failures from an address
//!   (whatever users they were for), every request from it is refused
//!   `throttled` for `first_delay`, doubling with each further failure up to
//!   `max_delay`. At most `checks_per_source` password checks from one
//!   address run at once, so a burst from one address cannot queue up the
//!   password hashing before its first failures are counted (token checks
//!   hash nothing and are not capped: a portal routing many users through
//!   one address uses tokens).
//! - **Per user.** After `failures_per_user` failures of one user (from any
//!   address), the user is delayed the same way, but only for addresses that
//!   have failed: an address with no failure on record still gets its
//!   check. So an attacker can slow down guessing against an account but
//!   cannot lock its owner out: the owner, from their own address, is not
//!   delayed by the user's count at all; from an address that failed (a
//!   typo, or a NAT shared with the attacker) by at most `max_delay`.
//! - A refused (`throttled`) request is answered before any hashing and is
//!   not a failure: it neither extends a delay nor counts, so every delay
//!   is bounded by `max_delay` after the last real check.
//! - A correct login forgets the user's count (not the address's: an
//!   attacker could otherwise reset its own address with an account of its
//!   own). A count is forgotten `failure_window` after its last failure.
//! - Memory: at most `tracked` users and `tracked` addresses; past it the
//!   least recently seen entry is forgotten.
//!
//! What this does not stop: a guesser with very many addresses gets
//! `failures_per_source` guesses from each (every address is its own
//! budget) and can keep the hashing busy; that is the endpoint's per-source
//! limits' and the network's problem, and the per-user delay still slows
//! guesses against one account from addresses that failed before.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_common::UserId;

use crate::config::LoginLimits;

/// The key of a source address: IPv4 as is (an IPv4-mapped IPv6 address
/// too), IPv6 cut to its /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// How a credential check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The credential was right.
    Success,
    /// Unknown user, wrong password or token.
    Failure,
    /// The check did not decide (the store failed, the request was
    /// cancelled): counts nothing.
    Undecided,
}

/// A request refused without a check: retry after this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttled {
    pub retry_after: Duration,
    /// Whether the user's count (rather than the address's) refused it.
    pub by_user: bool,
}

impl Throttled {
    /// Whole seconds to wait, at least 1.
    pub fn retry_after_secs(&self) -> u32 {
        let ms = self.retry_after.as_millis();
        u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX).max(1)
    }
}

/// A delay a failure started (for the broker's log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delay {
    /// Failures counted, this one included.
    pub failures: u32,
    pub delay: Duration,
}

/// The delays one failure started: the address's, the user's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delays {
    pub source: Option<Delay>,
    pub user: Option<Delay>,
}

/// One user's or one address's record.
#[derive(Clone, Debug, Default)]
struct Entry {
    /// Failures since the count was last forgotten.
    failures: u32,
    /// When the last failure was (ms on the throttle's clock).
    last_failure: u64,
    /// No check before this (ms); 0 = none.
    blocked_until: u64,
    /// Password checks in progress (addresses only).
    in_flight: u32,
    /// Its place in the least-recently-seen order.
    seen: u64,
}

impl Entry {
    /// Forgets the count once `window` passed since the last failure and no
    /// delay runs.
    fn expire(&mut self, now: u64, window: u64) {
        if self.failures > 0
            && now >= self.last_failure.saturating_add(window)
            && now >= self.blocked_until
        {
            self.failures = 0;
        }
    }

    /// Time left of the delay at `now`, if one runs.
    fn delay_left(&self, now: u64) -> Option<u64> {
        (self.blocked_until > now).then(|| self.blocked_until - now)
    }

    /// Counts a failure at `now`; from the `free`th one on, a delay of
    /// `first` doubling per further failure, at most `max`. The delay it
    /// set, if it set one.
    fn fail(&mut self, now: u64, free: u32, first: u64, max: u64) -> Option<Delay> {
        self.failures = self.failures.saturating_add(1);
        self.last_failure = now;
        if self.failures < free {
            return None;
        }
        let doublings = (self.failures - free).min(40);
        let delay = first.saturating_mul(1u64 << doublings).min(max);
        self.blocked_until = self.blocked_until.max(now.saturating_add(delay));
        Some(Delay {
            failures: self.failures,
            delay: Duration::from_millis(delay),
        })
    }
}

/// Entries under a cap, the least recently seen forgotten first.
struct Tracked<K> {
    entries: HashMap<K, Entry>,
    /// `seen` -> key.
    order: BTreeMap<u64, K>,
    cap: usize,
}

impl<K: Clone + Eq + Hash> Tracked<K> {
    fn new(cap: usize) -> Self {
        Tracked {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            cap: cap.max(1),
        }
    }

    fn get_mut(&mut self, key: &K) -> Option<&mut Entry> {
        self.entries.get_mut(key)
    }

    /// The entry of `key`, created (forgetting the oldest one when full)
    /// if missing, and marked seen at `seq`.
    fn touch(&mut self, key: &K, seq: u64) -> &mut Entry {
        if !self.entries.contains_key(key) {
            while self.entries.len() >= self.cap {
                let Some((_, oldest)) = self.order.pop_first() else {
                    break;
                };
                self.entries.remove(&oldest);
            }
            self.entries.insert(key.clone(), Entry::default());
        }
        let entry = self.entries.get_mut(key).expect("inserted above");
        self.order.remove(&entry.seen);
        entry.seen = seq;
        self.order.insert(seq, key.clone());
        entry
    }

    fn remove(&mut self, key: &K) {
        if let Some(e) = self.entries.remove(key) {
            self.order.remove(&e.seen);
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The throttle's rules; every method takes `now` in ms of a monotonic
/// clock.
pub struct LoginThrottle {
    limits: LoginLimits,
    users: Tracked<UserId>,
    sources: Tracked<IpAddr>,
    /// Orders the entries by when they were last seen.
    seq: u64,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl LoginThrottle {
    pub fn new(limits: LoginLimits) -> LoginThrottle {
        let cap = limits.tracked as usize;
        LoginThrottle {
            limits,
            users: Tracked::new(cap),
            sources: Tracked::new(cap),
            seq: 0,
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Whether `user` may have a credential checked from `source` now; `Ok`
    /// counts a check in progress for `source` (a `password` one towards
    /// `checks_per_source`), to be ended by [`LoginThrottle::finish`] with
    /// the same `password`. `source` is a [`source_key`].
    pub fn begin(
        &mut self,
        user: &UserId,
        source: IpAddr,
        password: bool,
        now: u64,
    ) -> Result<(), Throttled> {
        let window = ms(self.limits.failure_window);
        let mut source_failed = false;
        if let Some(s) = self.sources.get_mut(&source) {
            s.expire(now, window);
            if let Some(left) = s.delay_left(now) {
                return Err(Throttled {
                    retry_after: Duration::from_millis(left),
                    by_user: false,
                });
            }
            if password && s.in_flight >= self.limits.checks_per_source {
                return Err(Throttled {
                    retry_after: self.limits.first_delay,
                    by_user: false,
                });
            }
            source_failed = s.failures > 0;
        }
        if let Some(u) = self.users.get_mut(user) {
            u.expire(now, window);
            if let Some(left) = u.delay_left(now).filter(|_| source_failed) {
                return Err(Throttled {
                    retry_after: Duration::from_millis(left),
                    by_user: true,
                });
            }
        }
        let seq = self.next_seq();
        let s = self.sources.touch(&source, seq);
        if password {
            s.in_flight = s.in_flight.saturating_add(1);
        }
        Ok(())
    }

    /// Ends a check [`LoginThrottle::begin`] let through.
    pub fn finish(
        &mut self,
        user: &UserId,
        source: IpAddr,
        password: bool,
        outcome: Outcome,
        now: u64,
    ) -> Delays {
        let (first, max) = (ms(self.limits.first_delay), ms(self.limits.max_delay));
        let seq = self.next_seq();
        let s = self.sources.touch(&source, seq);
        if password {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
        match outcome {
            Outcome::Undecided => Delays::default(),
            Outcome::Success => {
                self.users.remove(user);
                Delays::default()
            }
            Outcome::Failure => {
                let source = s.fail(now, self.limits.failures_per_source, first, max);
                let seq = self.next_seq();
                let free = self.limits.failures_per_user;
                let user = self.users.touch(user, seq).fail(now, free, first, max);
                Delays { source, user }
            }
        }
    }

    /// Users and addresses tracked now.
    pub fn tracked(&self) -> (usize, usize) {
        (self.users.len(), self.sources.len())
    }
}

/// The route service's throttle: [`LoginThrottle`] under a lock (held only
/// for a map update, never across an await) on a monotonic clock.
#[derive(Clone)]
pub struct Throttle {
    inner: Arc<Mutex<LoginThrottle>>,
    started: Instant,
}

/// A check in progress; dropped without [`Attempt::finish`] (cancelled) it
/// ends as [`Outcome::Undecided`].
pub struct Attempt {
    throttle: Throttle,
    user: UserId,
    source: IpAddr,
    password: bool,
    done: bool,
}

impl Throttle {
    pub fn new(limits: LoginLimits) -> Throttle {
        Throttle {
            inner: Arc::new(Mutex::new(LoginThrottle::new(limits))),
            started: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        ms(self.started.elapsed())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LoginThrottle> {
        // Every update is a few field writes: a panic cannot leave it torn.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// [`LoginThrottle::begin`] for the peer address `ip`.
    pub fn begin(&self, user: &UserId, ip: IpAddr, password: bool) -> Result<Attempt, Throttled> {
        let source = source_key(ip);
        let now = self.now();
        self.lock().begin(user, source, password, now)?;
        Ok(Attempt {
            throttle: self.clone(),
            user: user.clone(),
            source,
            password,
            done: false,
        })
    }
}

impl Attempt {
    /// Records how the check ended.
    /// Records how the check ended; the delays it started.
    pub fn finish(mut self, outcome: Outcome) -> Delays {
        self.end(outcome)
    }

    /// The address the check came from, as counted ([`source_key`]).
    pub fn source(&self) -> IpAddr {
        self.source
    }

    fn end(&mut self, outcome: Outcome) -> Delays {
        if self.done {
            return Delays::default();
        }
        self.done = true;
        let now = self.throttle.now();
        self.throttle
            .lock()
            .finish(&self.user, self.source, self.password, outcome, now)
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let _ = self.end(Outcome::Undecided);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LoginLimits {
        LoginLimits {
            failures_per_user: 3,
            failures_per_source: 5,
            failure_window: Duration::from_secs(60),
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            checks_per_source: 2,
            tracked: 100,
        }
    }

    fn user(s: &str) -> UserId {
        s.parse().expect("user id")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// One whole check: begin, then finish with `outcome`.
    fn check(
        t: &mut LoginThrottle,
        u: &str,
        src: &str,
        outcome: Outcome,
        now: u64,
    ) -> Result<(), Throttled> {
        t.begin(&user(u), ip(src), true, now)?;
        let _ = t.finish(&user(u), ip(src), true, outcome, now);
        Ok(())
    }

    #[test]
    fn an_address_is_delayed_after_its_failures_with_a_doubling_bounded_delay() {
        let mut t = LoginThrottle::new(limits());
        // Five failures over five users (no user reaches its own limit).
        for i in 0..5 {
            check(&mut t, &format!("u{i}"), "10.0.0.1", Outcome::Failure, 0).expect("free");
        }
        let e = t
            .begin(&user("u9"), ip("10.0.0.1"), true, 0)
            .expect_err("delayed");
        assert_eq!((e.retry_after, e.by_user), (Duration::from_secs(1), false));
        // Another address is not affected.
        check(&mut t, "u9", "10.0.0.2", Outcome::Success, 0).expect("other address");
        // Each further failure doubles the delay, up to max_delay.
        let mut now = 1_000;
        for expected in [2, 4, 8, 8, 8] {
            check(&mut t, "u9", "10.0.0.1", Outcome::Failure, now).expect("delay over");
            let e = t
                .begin(&user("u9"), ip("10.0.0.1"), true, now)
                .expect_err("delayed");
            assert_eq!(e.retry_after, Duration::from_secs(expected));
            now += expected * 1_000;
        }
        // Refused requests are not failures: the delay does not grow.
        for _ in 0..100 {
            assert!(t.begin(&user("u9"), ip("10.0.0.1"), true, now - 1).is_err());
        }
        assert!(t.begin(&user("u9"), ip("10.0.0.1"), true, now).is_ok());
    }

    #[test]
    fn checks_in_progress_from_one_address_are_capped() {
        let mut t = LoginThrottle::new(limits());
        let (a, src) = (user("a"), ip("10.0.0.1"));
        t.begin(&a, src, true, 0).expect("first");
        t.begin(&a, src, true, 0).expect("second");
        let e = t.begin(&a, src, true, 0).expect_err("third in progress");
        assert!(!e.by_user);
        assert_eq!(e.retry_after_secs(), 1);
        t.begin(&a, ip("10.0.0.2"), true, 0)
            .expect("another address");
        // Token checks hash nothing: not capped.
        for _ in 0..10 {
            t.begin(&a, src, false, 0).expect("a token check");
        }
        let _ = t.finish(&a, src, true, Outcome::Undecided, 0);
        t.begin(&a, src, true, 0).expect("a slot is free again");
    }

    #[test]
    fn a_user_under_attack_still_logs_in_from_a_clean_address_and_that_resets_the_count() {
        let mut t = LoginThrottle::new(limits());
        // An attacker fails three times for alice: alice's count is at its limit.
        for _ in 0..3 {
            check(&mut t, "alice", "10.6.6.6", Outcome::Failure, 0).expect("free");
        }
        let e = t
            .begin(&user("alice"), ip("10.6.6.6"), true, 0)
            .expect_err("delayed");
        assert!(
            e.by_user,
            "the address is under its own limit: the user's count refused"
        );
        // The attacker's other targets are not delayed by alice's count.
        check(&mut t, "bob", "10.6.6.6", Outcome::Failure, 0).expect("bob's count is 0");
        // Alice from her own address is checked at once, and succeeds.
        check(&mut t, "alice", "192.0.2.7", Outcome::Success, 0).expect("clean address");
        // That forgot alice's count: the attacker's address is checked again
        // (its own count, 4 of 5, is not reset by alice's success).
        check(&mut t, "alice", "10.6.6.6", Outcome::Failure, 0).expect("count reset");
        assert!(
            t.begin(&user("carol"), ip("10.6.6.6"), true, 0).is_err(),
            "5 failures"
        );
    }

    #[test]
    fn the_user_delay_is_bounded_even_when_failures_go_on() {
        let mut t = LoginThrottle::new(limits());
        // Every failure from a new address: each gets its check, and alice's
        // delay grows only up to max_delay.
        let mut now = 0;
        for i in 0..50 {
            check(
                &mut t,
                "alice",
                &format!("10.1.0.{i}"),
                Outcome::Failure,
                now,
            )
            .expect("a clean address is checked");
            now += 10;
        }
        let e = t
            .begin(&user("alice"), ip("10.1.0.1"), true, now)
            .expect_err("a failed address is delayed");
        assert!(e.by_user);
        assert!(e.retry_after <= Duration::from_secs(8), "{e:?}");
        // And after it, that address is checked again.
        assert!(t
            .begin(&user("alice"), ip("10.1.0.1"), true, now + 8_000)
            .is_ok());
    }

    #[test]
    fn counts_are_forgotten_after_the_window() {
        let mut t = LoginThrottle::new(limits());
        for _ in 0..2 {
            check(&mut t, "alice", "10.0.0.1", Outcome::Failure, 0).expect("free");
        }
        // 61 s later the two failures are forgotten: two more stay under 3.
        for _ in 0..2 {
            check(&mut t, "alice", "10.0.0.1", Outcome::Failure, 61_000).expect("forgotten");
        }
        check(&mut t, "alice", "10.0.0.1", Outcome::Failure, 61_000).expect("third is free");
        assert!(t
            .begin(&user("alice"), ip("10.0.0.1"), true, 61_000)
            .is_err());
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_entries_go_first() {
        let mut t = LoginThrottle::new(LoginLimits {
            tracked: 100,
            failures_per_source: 1_000,
            ..limits()
        });
        for i in 0..1_000 {
            check(
                &mut t,
                &format!("u{i}"),
                &format!("10.0.{}.{}", i / 250, i % 250),
                Outcome::Failure,
                i,
            )
            .expect("under every limit");
        }
        assert_eq!(t.tracked(), (100, 100));
        // The newest are kept, the oldest forgotten.
        assert!(t.users.entries.contains_key(&user("u999")));
        assert!(!t.users.entries.contains_key(&user("u0")));
    }

    #[test]
    fn ipv6_addresses_count_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            source_key(ip("2001:db8:1:2:aaaa::1")),
            source_key(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(
            source_key(ip("2001:db8:1:2::1")),
            source_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(source_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }

    #[test]
    fn a_dropped_attempt_frees_its_slot() {
        let t = Throttle::new(LoginLimits {
            checks_per_source: 1,
            ..limits()
        });
        let a = t.begin(&user("a"), ip("10.0.0.1"), true).expect("first");
        assert!(t.begin(&user("a"), ip("10.0.0.1"), true).is_err());
        drop(a);
        t.begin(&user("a"), ip("10.0.0.1"), true)
            .expect("free again")
            .finish(Outcome::Success);
        // The fifth failure from one address starts its delay, the third of
        // one user the user's.
        let mut started = Delays::default();
        for i in 0..5 {
            started = t
                .begin(&user(if i < 3 { "a" } else { "b" }), ip("10.0.0.9"), true)
                .expect("under the limits")
                .finish(Outcome::Failure);
            if i == 2 {
                assert_eq!(
                    started.user,
                    Some(Delay {
                        failures: 3,
                        delay: Duration::from_secs(1)
                    })
                );
            }
        }
        assert_eq!(
            started,
            Delays {
                source: Some(Delay {
                    failures: 5,
                    delay: Duration::from_secs(1)
                }),
                user: None,
            }
        );
    }
}
