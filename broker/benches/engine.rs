//! Engine throughput on one core: a group of 100, 1,000 and 10,000 resources
//! under a seeded random connect/disconnect stream, with the provider completing
//! creations and releases after fixed delays and every deadline handled.
//!
//! `cargo bench -p ferry-broker --bench engine` prints a table of medians.
//! An "event" is one engine call: an input (`handle`), a provider completion
//! batch (`handle_due`) or a deadline (`handle_timeout`). The timed loop also
//! includes the driver's own work (PRNG, id bookkeeping, draining decisions),
//! so the numbers are a lower bound for the engine alone.
//!
//! A last row runs 1,000 resources with three daily policy periods over the
//! run's virtual morning (each keeping base + half the elastic budget ready),
//! for the cost of scheduled scaling.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ferry_broker::engine::{Action, Group, Input, LoadBalancing, Policy, PolicyPeriod};
use ferry_common::{ResourceId, SessionId, UnixMillis};

/// Engine calls per timed run: bounded so a run takes about a second.
const EVENTS_PER_RUN: u64 = 500_000;
/// Timed runs per size; the median is reported.
const RUNS: usize = 5;
const CONCURRENT: u32 = 4;
const CREATE_DELAY_MS: i64 = 5_000;
const RELEASE_DELAY_MS: i64 = 2_000;

/// splitmix64: tiny, seeded, identical on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Stats {
    events: u64,
    inputs: u64,
    elapsed: Duration,
    scale_outs: u64,
    scale_ins: u64,
    rejected: u64,
}

/// Three periods on every weekday inside the run's virtual time (Monday
/// from 08:00 for about 1.5 hours), each keeping `min_ready` ready.
fn morning_periods(min_ready: u32) -> Vec<PolicyPeriod> {
    [
        (8 * 60 + 5, 8 * 60 + 25),
        (8 * 60 + 30, 9 * 60),
        (9 * 60 + 10, 10 * 60),
    ]
    .into_iter()
    .map(|(start_minute, end_minute)| PolicyPeriod {
        weekdays: 0x7f,
        start_minute,
        end_minute,
        min_ready,
        warm_up: Duration::from_secs(5 * 60),
    })
    .collect()
}

fn run(resources: u32, seed: u64, periods: bool) -> Stats {
    let base = resources * 9 / 10;
    let max_elastic = resources - base;
    let mut policy = Policy::new(
        CONCURRENT,
        80,
        (max_elastic / 10).max(1),
        max_elastic,
        Duration::from_secs(120),
    );
    policy.scale_in_cooldown = Duration::from_secs(5);
    policy.wait_timeout = Duration::from_secs(30);
    policy.load_balancing = LoadBalancing::BreadthFirst;
    if periods {
        policy.periods = morning_periods(base + max_elastic / 2);
    }
    let t0 = 1_772_438_400_000i64;
    let mut group =
        Group::with_base_count(policy, None, base, UnixMillis(t0)).expect("valid bench group");

    let slots = u64::from(resources) * u64::from(CONCURRENT);
    // Ids are made fresh for each input, as a decoded request's would be; a
    // pool of ready-made ids would measure the pool's cache misses instead.
    let pool_len = (slots * 2) as usize;
    let id = |i: u32| SessionId::new(format!("s{i}")).expect("valid id");
    // Sessions placed or waiting, with each one's position for O(1) removal.
    let mut active: Vec<u32> = Vec::new();
    let mut pos: Vec<u32> = vec![u32::MAX; pool_len];
    let mut free: Vec<u32> = (0..pool_len as u32).rev().collect();
    let mut creating: VecDeque<(i64, ResourceId)> = VecDeque::new();
    let mut releasing: VecDeque<(i64, ResourceId)> = VecDeque::new();
    let mut rng = Rng(seed);
    let mut now = t0;
    let mut stats = Stats {
        events: 0,
        inputs: 0,
        elapsed: Duration::ZERO,
        scale_outs: 0,
        scale_ins: 0,
        rejected: 0,
    };

    // Untimed: fill the group to 70 % of its base slots, so every size starts in
    // the same regime, and the waves below cross the threshold at every size.
    let prefill = u64::from(base) * u64::from(CONCURRENT) * 70 / 100;
    for _ in 0..prefill {
        let Some(i) = free.pop() else { break };
        pos[i as usize] = active.len() as u32;
        active.push(i);
        now += 1;
        group
            .handle(UnixMillis(now), Input::Arrive { session: id(i) })
            .expect("prefill");
    }
    group.drain_decisions().for_each(drop);
    // A wave (busy then quiet) lasts long enough to cross from 45 % to 88 % of
    // the slots and back, whatever the size.
    let phase = (slots * 3).max(2_000);

    let start = Instant::now();
    while stats.events < EVENTS_PER_RUN {
        // Load in waves: busy phases push usage over the threshold (scale-out),
        // quiet phases let elastic resources go idle (scale-in).
        let busy = (stats.inputs / phase) % 2 == 0;
        let target = if busy {
            slots * 88 / 100
        } else {
            slots * 45 / 100
        };
        now += rng.below(20) as i64;

        // Completions and deadlines due first, like the live broker.
        let mut due = Vec::new();
        while creating.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, resource)) = creating.pop_front() {
                due.push(Input::Created { resource });
            }
        }
        while releasing.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, resource)) = releasing.pop_front() {
                due.push(Input::Released { resource });
            }
        }
        let deadline_due = group.poll_deadline().is_some_and(|t| t.0 <= now);
        if !due.is_empty() || deadline_due {
            group.handle_due(UnixMillis(now), due).expect("completions");
            stats.events += 1;
        }

        let connect = (active.len() as u64) < target && rng.below(100) < 60
            || (active.len() as u64) >= target && rng.below(100) < 40;
        let result = if connect || active.is_empty() {
            let Some(i) = free.pop() else { continue };
            pos[i as usize] = active.len() as u32;
            active.push(i);
            group.handle(UnixMillis(now), Input::Arrive { session: id(i) })
        } else {
            let k = rng.below(active.len() as u64) as usize;
            let i = active.swap_remove(k);
            if let Some(&moved) = active.get(k) {
                pos[moved as usize] = k as u32;
            }
            pos[i as usize] = u32::MAX;
            free.push(i);
            group.handle(UnixMillis(now), Input::Leave { session: id(i) })
        };
        result.expect("bench inputs fit the state");
        stats.events += 1;
        stats.inputs += 1;

        for d in group.drain_decisions() {
            match d.action {
                Action::ScaleOut { resources } => {
                    stats.scale_outs += 1;
                    creating.extend(resources.into_iter().map(|r| (now + CREATE_DELAY_MS, r)));
                }
                Action::ScaleIn { resource } => {
                    stats.scale_ins += 1;
                    releasing.push_back((now + RELEASE_DELAY_MS, resource));
                }
                Action::Rejected { session } => {
                    stats.rejected += 1;
                    let i: usize = session.as_str()[1..].parse().expect("bench id");
                    let k = pos[i] as usize;
                    active.swap_remove(k);
                    if let Some(&moved) = active.get(k) {
                        pos[moved as usize] = k as u32;
                    }
                    pos[i] = u32::MAX;
                    free.push(i as u32);
                }
                _ => {}
            }
        }
    }
    stats.elapsed = start.elapsed();
    stats
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    println!(
        "engine throughput, one thread, {EVENTS_PER_RUN} engine calls per run, median of {RUNS} runs (after 1 warm-up)"
    );
    println!(
        "{:>9} {:>14} {:>10} {:>10} {:>10} {:>9}",
        "resources", "events/s", "ns/event", "scale-out", "scale-in", "rejected"
    );
    let mut ns_per_event = Vec::new();
    // FERRY_BENCH_SIZES=10000 runs one size (e.g. under `perf stat`).
    let sizes: Vec<u32> = std::env::var("FERRY_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1_000, 10_000]);
    let mut rows: Vec<(u32, bool)> = sizes.iter().map(|&n| (n, false)).collect();
    if std::env::var_os("FERRY_BENCH_SIZES").is_none() {
        rows.push((1_000, true));
    }
    for &(resources, periods) in &rows {
        let _ = run(resources, 1, periods);
        let mut rates = Vec::new();
        let mut nss = Vec::new();
        let mut last = None;
        for r in 0..RUNS {
            let s = run(resources, 42 + r as u64, periods);
            let secs = s.elapsed.as_secs_f64();
            rates.push(s.events as f64 / secs);
            nss.push(secs * 1e9 / s.events as f64);
            last = Some(s);
        }
        let rate = median(rates);
        let ns = median(nss);
        if !periods {
            ns_per_event.push(ns);
        }
        if let Some(s) = last {
            println!(
                "{:>9} {:>14.0} {:>10.1} {:>10} {:>10} {:>9}{}",
                resources,
                rate,
                ns,
                s.scale_outs,
                s.scale_ins,
                s.rejected,
                if periods {
                    "  with 3 policy periods"
                } else {
                    ""
                }
            );
        }
    }
    if let (Some(first), Some(last)) = (ns_per_event.first(), ns_per_event.last()) {
        println!(
            "cost per event, 10,000 vs 100 resources: {:.2}x",
            last / first
        );
    }
}
