//! Engine unit tests (hand-built situations) and property tests (random traces
//! and policies, driven like the simulator: deadlines first, then the input).

use std::collections::VecDeque;
use std::time::Duration;

use ferry_common::{ResourceId, SessionId, UnixMillis};
use proptest::prelude::*;
use rust_decimal::Decimal;

use super::billing::{self, BaseBilling, Prices};
use super::*;

fn sid(s: &str) -> SessionId {
    SessionId::new(s).expect("valid session id")
}

fn rid(s: &str) -> ResourceId {
    ResourceId::new(s).expect("valid resource id")
}

const T0: i64 = 1_772_438_400_000; // 2026-03-02T08:00:00Z

fn at(secs: i64) -> UnixMillis {
    UnixMillis(T0 + secs * 1000)
}

fn policy(concurrent: u32, threshold: u32, step: u32, max_elastic: u32, idle_s: u64) -> Policy {
    Policy::new(
        concurrent,
        threshold,
        step,
        max_elastic,
        Duration::from_secs(idle_s),
    )
}

fn actions(g: &mut Group) -> Vec<Action> {
    g.drain_decisions().map(|d| d.action).collect()
}

fn placed_on(g: &mut Group) -> Vec<String> {
    g.drain_decisions()
        .filter_map(|d| match d.action {
            Action::Placed { resource, .. } => Some(resource.to_string()),
            _ => None,
        })
        .collect()
}

fn arrive(g: &mut Group, t: i64, s: &str) {
    g.handle(at(t), Input::Arrive { session: sid(s) })
        .expect("arrive");
}

#[test]
fn breadth_first_spreads_and_ties_go_to_the_first_created() {
    let mut g = Group::with_base_count(policy(3, 100, 1, 0, 60), None, 3, at(0)).unwrap();
    for (i, s) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        arrive(&mut g, i as i64, s);
    }
    assert_eq!(placed_on(&mut g), ["b1", "b2", "b3", "b1", "b2"]);
}

#[test]
fn depth_first_packs_the_fullest_resource_with_room() {
    let mut p = policy(2, 100, 1, 0, 60);
    p.load_balancing = LoadBalancing::DepthFirst;
    let mut g = Group::with_base_count(p, None, 3, at(0)).unwrap();
    for (i, s) in ["a", "b", "c", "d"].iter().enumerate() {
        arrive(&mut g, i as i64, s);
    }
    // a leaves b1: b1 has 1, b2 has 2 (full), b3 has 0 -> depth-first picks b1.
    g.handle(at(10), Input::Leave { session: sid("a") })
        .unwrap();
    arrive(&mut g, 11, "e");
    assert_eq!(placed_on(&mut g), ["b1", "b1", "b2", "b2", "b1"]);
}

#[test]
fn base_resources_fill_before_elastic_ones() {
    // threshold 1 %: the first session scales out; the elastic resource is ready
    // and empty, yet the base resource with room is still chosen first.
    let mut g = Group::with_base_count(policy(2, 1, 1, 1, 60), None, 1, at(0)).unwrap();
    arrive(&mut g, 0, "a");
    g.handle(
        at(1),
        Input::Created {
            resource: rid("e1"),
        },
    )
    .unwrap();
    arrive(&mut g, 2, "b");
    arrive(&mut g, 3, "c");
    assert_eq!(placed_on(&mut g), ["b1", "b1", "e1"]);
}

#[test]
fn pending_capacity_prevents_a_second_scale_out_during_one_burst() {
    let mut g = Group::with_base_count(policy(1, 80, 2, 10, 60), None, 1, at(0)).unwrap();
    arrive(&mut g, 0, "a"); // 1 > 0.8 x 1: +2 pending, capacity 3
    arrive(&mut g, 1, "b"); // no room: refused at once (wait 0), demand 1
    let acts = actions(&mut g);
    let scale_outs = acts
        .iter()
        .filter(|a| matches!(a, Action::ScaleOut { .. }))
        .count();
    assert_eq!(scale_outs, 1, "{acts:?}");
    assert!(matches!(acts.last(), Some(Action::Rejected { .. })));
    assert_eq!(g.snapshot().capacity, 3);
}

#[test]
fn usage_equal_to_the_threshold_does_not_scale_out() {
    // 4 sessions on 5 x 1 slots = 80 %: not above 80.
    let mut g = Group::with_base_count(policy(1, 80, 1, 1, 60), None, 5, at(0)).unwrap();
    for (i, s) in ["a", "b", "c", "d"].iter().enumerate() {
        arrive(&mut g, i as i64, s);
    }
    assert!(!actions(&mut g)
        .iter()
        .any(|a| matches!(a, Action::ScaleOut { .. })));
    arrive(&mut g, 5, "e");
    assert!(actions(&mut g)
        .iter()
        .any(|a| matches!(a, Action::ScaleOut { .. })));
}

#[test]
fn waiting_requests_are_placed_fifo_when_room_appears_or_refused_at_their_timeout() {
    let mut p = policy(1, 100, 1, 0, 60);
    p.wait_timeout = Duration::from_secs(30);
    let mut g = Group::with_base_count(p, None, 1, at(0)).unwrap();
    arrive(&mut g, 0, "a");
    arrive(&mut g, 1, "b");
    arrive(&mut g, 2, "c");
    arrive(&mut g, 3, "d");
    assert_eq!(g.snapshot().waiting, 3);
    // c withdraws; a leaves at 20: b (oldest) gets the slot.
    g.handle(at(4), Input::Leave { session: sid("c") }).unwrap();
    g.handle(at(20), Input::Leave { session: sid("a") })
        .unwrap();
    assert_eq!(g.session_resource(&sid("b")), Some(&rid("b1")));
    // d waited since 3: its deadline is 33.
    assert_eq!(g.poll_deadline(), Some(at(33)));
    g.drain_decisions().for_each(drop);
    g.handle_timeout(at(33)).unwrap();
    let d: Vec<Decision> = g.drain_decisions().collect();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].action, Action::Rejected { session: sid("d") });
    assert_eq!(d[0].at, at(33));
    assert!(matches!(
        d[0].reason,
        Reason::NoRoom {
            waited_ms: 30_000,
            ..
        }
    ));
    assert_eq!(g.poll_deadline(), None);
}

#[test]
fn a_completion_at_the_timeout_instant_still_places_the_request() {
    let mut p = policy(1, 100, 1, 1, 60);
    p.usage_threshold = 50;
    p.wait_timeout = Duration::from_secs(30);
    let mut g = Group::with_base_count(p, None, 1, at(0)).unwrap();
    arrive(&mut g, 0, "a"); // scale-out e1
    arrive(&mut g, 1, "b"); // waits until 31
    g.handle_due(
        at(31),
        [Input::Created {
            resource: rid("e1"),
        }],
    )
    .unwrap();
    assert_eq!(g.session_resource(&sid("b")), Some(&rid("e1")));
    assert!(!actions(&mut g)
        .iter()
        .any(|a| matches!(a, Action::Rejected { .. })));
}

#[test]
fn late_polling_still_stamps_decisions_at_their_deadline() {
    let mut p = policy(1, 100, 1, 0, 60);
    p.wait_timeout = Duration::from_secs(10);
    let mut g = Group::with_base_count(p, None, 1, at(0)).unwrap();
    arrive(&mut g, 0, "a");
    arrive(&mut g, 1, "b");
    g.drain_decisions().for_each(drop);
    // The caller never polled; the next input at 100 first handles the timeout at 11.
    arrive(&mut g, 100, "c");
    let d: Vec<Decision> = g.drain_decisions().collect();
    assert_eq!(d[0].action, Action::Rejected { session: sid("b") });
    assert_eq!(d[0].at, at(11));
    assert_eq!(d.len(), 1, "{d:?}");
    // c waits in turn, until 110.
    assert_eq!(g.snapshot().waiting, 1);
    assert_eq!(g.poll_deadline(), Some(at(110)));
}

#[test]
fn reservations_hold_slots_until_connected_or_left() {
    let mut g = Group::with_base_count(policy(1, 100, 1, 0, 60), None, 1, at(0)).unwrap();
    g.handle(at(0), Input::Route { session: sid("a") }).unwrap();
    assert_eq!(g.snapshot().sessions, 1);
    g.handle(at(1), Input::Route { session: sid("b") }).unwrap();
    assert!(matches!(
        actions(&mut g).last(),
        Some(Action::Rejected { .. })
    ));
    g.handle(at(2), Input::Connected { session: sid("a") })
        .unwrap();
    assert!(matches!(
        g.handle(at(2), Input::Connected { session: sid("a") }),
        Err(EngineError::NotReserved { .. })
    ));
    assert!(matches!(
        g.handle(at(3), Input::Arrive { session: sid("a") }),
        Err(EngineError::DuplicateSession(_))
    ));
    assert!(matches!(
        g.handle(at(3), Input::Leave { session: sid("zz") }),
        Err(EngineError::UnknownSession(_))
    ));
    g.handle(at(4), Input::Leave { session: sid("a") }).unwrap();
    assert_eq!(g.snapshot().sessions, 0);
}

#[test]
fn scale_out_restarts_idle_countdowns_and_scale_in_waits_for_cooldown() {
    // 1 slot per resource, max_idle 100 s, cooldown 60 s, threshold 100.
    let mut p = policy(1, 100, 1, 3, 100);
    p.scale_in_cooldown = Duration::from_secs(60);
    let mut g = Group::with_base_count(p, None, 1, at(0)).unwrap();
    arrive(&mut g, 0, "a");
    arrive(&mut g, 1, "b"); // refused: no room; demand 1 = capacity 1, not above
    let mut lower = g.policy().clone();
    lower.usage_threshold = 50;
    g.handle(at(2), Input::Policy(lower)).unwrap(); // 1 x 100 > 50 x 1: +e1
    g.handle(
        at(3),
        Input::Created {
            resource: rid("e1"),
        },
    )
    .unwrap();
    // e1 is idle from 3: it may go at 103.
    assert_eq!(g.poll_deadline(), Some(at(103)));
    // At 50 usage rises above again (threshold lowered): scale-out at 50
    // restarts e1's countdown to 50, so the scale-in deadline moves to 150.
    let mut lower2 = g.policy().clone();
    lower2.usage_threshold = 40;
    g.handle(at(50), Input::Policy(lower2)).unwrap(); // 100 > 40 x 2: +e2
    assert!(actions(&mut g)
        .iter()
        .any(|a| matches!(a, Action::ScaleOut { resources } if resources == &[rid("e2")])));
    assert_eq!(g.poll_deadline(), Some(at(150)));
    g.handle(
        at(60),
        Input::Created {
            resource: rid("e2"),
        },
    )
    .unwrap();
    // a leaves: demand 0. e1 idle since 50, e2 since 60, b1 is base.
    g.handle(at(70), Input::Leave { session: sid("a") })
        .unwrap();
    g.drain_decisions().for_each(drop);
    g.handle_timeout(at(150)).unwrap();
    let d: Vec<Decision> = g.drain_decisions().collect();
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(
        d[0].action,
        Action::ScaleIn {
            resource: rid("e1")
        }
    );
    // e2 reached max_idle at 160, but the cooldown holds it until 210.
    assert_eq!(
        g.explain(at(170)).scale_in,
        ScaleInView::Cooldown {
            resource: rid("e2"),
            remaining_ms: 40_000
        }
    );
    assert!(matches!(
        g.explain(at(155)).scale_in,
        ScaleInView::IdleTooShort {
            idle_ms: 95_000,
            ..
        }
    ));
    assert_eq!(g.poll_deadline(), Some(at(210)));
    g.handle_timeout(at(210)).unwrap();
    let d: Vec<Decision> = g.drain_decisions().collect();
    assert_eq!(
        d[0].action,
        Action::ScaleIn {
            resource: rid("e2")
        }
    );
    assert!(matches!(
        d[0].reason,
        Reason::ScaleIn {
            since_last_scale_in_ms: Some(60_000),
            ..
        }
    ));
    assert_eq!(g.poll_deadline(), None);
}

#[test]
fn with_a_zero_cooldown_a_later_idle_deadline_is_an_evaluation_of_its_own() {
    // 1 base, 1 slot each, threshold 50: one session on b1 makes three elastic
    // resources. e1 is used 120..240; e2 and e3 stay idle from 60.
    let mut p = policy(1, 50, 3, 3, 300);
    p.scale_in_cooldown = Duration::ZERO;
    let mut g = Group::with_base_count(p, None, 1, at(0)).unwrap();
    arrive(&mut g, 0, "u1");
    let created: Vec<Input> = ["e1", "e2", "e3"]
        .iter()
        .map(|r| Input::Created { resource: rid(r) })
        .collect();
    g.handle_batch(at(60), created).unwrap();
    arrive(&mut g, 120, "u2");
    g.handle(at(240), Input::Leave { session: sid("u2") })
        .unwrap();
    g.drain_decisions().for_each(drop);
    // e2 and e3 reach max_idle at 360: one scale-in per evaluation (e2).
    assert_eq!(g.poll_deadline(), Some(at(360)));
    g.handle_timeout(at(360)).unwrap();
    assert_eq!(
        actions(&mut g),
        [Action::ScaleIn {
            resource: rid("e2")
        }]
    );
    // e3 is still a candidate, but the next cause is e1 reaching max_idle at
    // 540 (SPEC 5.4): then e3, idle longest, goes. Without that deadline it
    // would wait for the next input.
    assert_eq!(g.poll_deadline(), Some(at(540)));
    g.handle_timeout(at(540)).unwrap();
    assert_eq!(
        actions(&mut g),
        [Action::ScaleIn {
            resource: rid("e3")
        }]
    );
    // e1 would leave usage above the threshold (1 x 100 > 50 x 1): nothing
    // but an input changes that.
    assert_eq!(g.poll_deadline(), None);
}

#[test]
fn a_scale_in_that_would_push_usage_above_the_threshold_waits_for_demand_to_fall() {
    // Seed walk-through in miniature: 2 base x 2 slots, 2 elastic ready, 4
    // sessions on the base resources, threshold 85.
    let mut g = Group::with_base_count(policy(2, 85, 2, 2, 3600), None, 2, at(0)).unwrap();
    for (i, s) in ["s1", "s2", "s3", "s4"].iter().enumerate() {
        arrive(&mut g, i as i64, s);
    }
    g.handle_batch(
        at(300),
        [
            Input::Created {
                resource: rid("e1"),
            },
            Input::Created {
                resource: rid("e2"),
            },
        ],
    )
    .unwrap();
    g.drain_decisions().for_each(drop);
    assert_eq!(g.poll_deadline(), Some(at(3900)));
    g.handle_timeout(at(3900)).unwrap();
    assert_eq!(
        actions(&mut g),
        [Action::ScaleIn {
            resource: rid("e1")
        }]
    );
    // 4 x 100 > 85 x 4: e2 stays, and no deadline can change that.
    g.handle_timeout(at(3960)).unwrap();
    assert!(actions(&mut g).is_empty());
    assert_eq!(g.poll_deadline(), None);
    let why = g.explain(at(3960));
    assert_eq!(
        why.scale_in,
        ScaleInView::WouldExceed {
            resource: rid("e2"),
            demand: 4,
            threshold: 85,
            capacity_after: 4
        }
    );
    assert_eq!(why.scale_out, ScaleOutView::NotNeeded);
    assert!(
        why.to_string()
            .contains("afterwards demand 4 x 100 > threshold 85 x capacity 4"),
        "{why}"
    );
    g.handle(at(4000), Input::Leave { session: sid("s3") })
        .unwrap();
    assert_eq!(
        actions(&mut g),
        [Action::ScaleIn {
            resource: rid("e2")
        }]
    );
}

#[test]
fn unavailable_resources_take_no_sessions_and_leave_capacity() {
    let mut g = Group::with_base_count(policy(2, 100, 1, 0, 60), None, 2, at(0)).unwrap();
    g.handle(
        at(0),
        Input::Unavailable {
            resource: rid("b1"),
        },
    )
    .unwrap();
    assert_eq!(g.snapshot().capacity, 2);
    arrive(&mut g, 1, "a");
    arrive(&mut g, 2, "b");
    arrive(&mut g, 3, "c");
    g.handle(
        at(4),
        Input::Available {
            resource: rid("b1"),
        },
    )
    .unwrap();
    arrive(&mut g, 5, "d");
    assert_eq!(placed_on(&mut g), ["b2", "b2", "b1"]);
}

#[test]
fn refused_inputs_leave_the_group_unchanged() {
    let mut g =
        Group::with_base_count(policy(2, 85, 1, 1, 60), Some("office-4c8g"), 1, at(0)).unwrap();
    let mut bad = g.policy().clone();
    bad.concurrent_sessions = 3;
    bad.usage_threshold = 0;
    match g.handle(at(1), Input::Policy(bad)) {
        Err(EngineError::Policy(e)) => assert_eq!(e.problems.len(), 2),
        other => panic!("{other:?}"),
    }
    assert_eq!(g.policy().concurrent_sessions, 2);
    assert!(matches!(
        g.handle(at(0), Input::Arrive { session: sid("a") }),
        Err(EngineError::TimeWentBack { .. })
    ));
    assert!(matches!(
        g.handle(
            at(2),
            Input::Created {
                resource: rid("b1")
            }
        ),
        Err(EngineError::WrongState { .. })
    ));
    assert!(matches!(
        g.handle(
            at(2),
            Input::Released {
                resource: rid("e9")
            }
        ),
        Err(EngineError::UnknownResource(_))
    ));
    assert!(matches!(
        Group::new(policy(1, 50, 1, 1, 1), None, vec![rid("e1")], at(0)),
        Err(EngineError::ReservedId(_))
    ));
    assert!(matches!(
        Group::new(
            policy(1, 50, 1, 1, 1),
            None,
            vec![rid("h"), rid("h")],
            at(0)
        ),
        Err(EngineError::DuplicateResource(_))
    ));
}

// ---------------------------------------------------------------------------
// Property tests

#[derive(Clone, Debug)]
enum Op {
    Arrive(u8),
    Route(u8),
    Connect(u8),
    Leave(u8),
    /// The provider completes its oldest pending creation.
    Create,
    /// The provider completes its oldest pending release.
    Release,
    Unavailable(u8),
    Available(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..24).prop_map(Op::Arrive),
        1 => (0u8..24).prop_map(Op::Route),
        1 => (0u8..24).prop_map(Op::Connect),
        4 => (0u8..24).prop_map(Op::Leave),
        2 => Just(Op::Create),
        2 => Just(Op::Release),
        1 => (0u8..8).prop_map(Op::Unavailable),
        1 => (0u8..8).prop_map(Op::Available),
    ]
}

/// Up to two policy periods around the traces' span (Monday 08:00 to about
/// noon): the first starts 08:00..11:00, the second at least 5 minutes after
/// the first ends, on random weekdays (Monday often), with warm-ups up to 30
/// minutes. `min_ready` is fitted to the group later ([`fit_periods`]).
fn any_periods() -> impl Strategy<Value = Vec<PolicyPeriod>> {
    let one = (
        prop_oneof![2 => Just(0x7fu8), 1 => 1u8..0x80],
        0u16..180,
        15u16..120,
        1u32..6,
        0u64..=30,
    );
    (0usize..=2, one.clone(), 5u16..60, one).prop_map(|(n, a, gap, b)| {
        let make = |(days, start, len, min_ready, warm_up): (u8, u16, u16, u32, u64),
                    offset: u16| PolicyPeriod {
            weekdays: days,
            start_minute: offset + start,
            end_minute: offset + start + len,
            min_ready,
            warm_up: Duration::from_secs(warm_up * 60),
        };
        let first = make(a, 8 * 60);
        let second = make((b.0, 0, b.2, b.3, b.4), first.end_minute + gap);
        [first, second].into_iter().take(n).collect()
    })
}

/// Keeps `min_ready` within what the group can have (base + max_elastic),
/// dropping the periods when it can have nothing.
fn fit_periods(policy: &mut Policy, base: u32) {
    let most = base + policy.max_elastic;
    if most == 0 {
        policy.periods.clear();
    }
    for p in &mut policy.periods {
        p.min_ready = p.min_ready.clamp(1, most.max(1));
    }
}

/// The `min_ready` holding at `t` (from warm-up start to end, end excluded),
/// worked out with chrono's calendar rather than the engine's arithmetic.
fn holding_min_ready(policy: &Policy, t: i64) -> Option<u32> {
    use chrono::{Datelike, Duration as Days, TimeZone, Utc};
    let at = Utc.timestamp_millis_opt(t).single().expect("valid time");
    let mut best = None;
    for ahead in 0..=1 {
        let date = at.date_naive() + Days::days(ahead);
        let midnight = date
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp_millis();
        let weekday = date.weekday().num_days_from_monday();
        for p in &policy.periods {
            if p.weekdays & (1 << weekday) == 0 {
                continue;
            }
            let start = midnight + i64::from(p.start_minute) * 60_000;
            let end = midnight + i64::from(p.end_minute) * 60_000;
            let warm = start - p.warm_up.as_millis() as i64;
            if warm <= t && t < end {
                best = best.max(Some(p.min_ready));
            }
        }
    }
    best
}

fn any_policy() -> impl Strategy<Value = Policy> {
    (
        1u32..4,
        1u32..=100,
        1u32..4,
        0u32..5,
        // max_idle is above zero (see `policy`'s module doc).
        1u64..400,
        0u64..200,
        0u64..100,
        any::<bool>(),
        any_periods(),
    )
        .prop_map(|(cs, th, st, me, idle, cd, wait, depth, periods)| Policy {
            concurrent_sessions: cs,
            usage_threshold: th,
            scale_out_step: st,
            max_elastic: me,
            max_idle: Duration::from_secs(idle),
            scale_in_cooldown: Duration::from_secs(cd),
            wait_timeout: Duration::from_secs(wait),
            load_balancing: if depth {
                LoadBalancing::DepthFirst
            } else {
                LoadBalancing::BreadthFirst
            },
            periods,
        })
}

/// Drives a group like `ferryctl simulate` does and checks the invariants after
/// every engine call.
struct Driver {
    group: Group,
    policy: Policy,
    creating: VecDeque<ResourceId>,
    releasing: VecDeque<ResourceId>,
    log: Vec<Decision>,
    last_scale_in: Option<i64>,
    /// Time of the last engine call.
    now: i64,
}

impl Driver {
    fn new(mut policy: Policy, base: u32) -> Self {
        fit_periods(&mut policy, base);
        Self {
            group: Group::with_base_count(policy.clone(), None, base, at(0)).unwrap(),
            policy,
            creating: VecDeque::new(),
            releasing: VecDeque::new(),
            log: Vec::new(),
            last_scale_in: None,
            now: T0,
        }
    }

    fn check(&mut self) {
        let snap = self.group.snapshot();
        let decisions: Vec<Decision> = self.group.drain_decisions().collect();
        let ready = snap.resources - u64::from(snap.pending);
        for d in &decisions {
            // Every engine call of the driver decides at one instant (it
            // polls each deadline itself), with one evaluation.
            if let Some(min_ready) = holding_min_ready(&self.policy, d.at.0) {
                if let Action::ScaleIn { resource } = &d.action {
                    assert!(
                        ready >= u64::from(min_ready),
                        "{resource} scaled in at {} in a period keeping {min_ready} ready; {ready} left: {snap:?}",
                        d.at.0
                    );
                }
            }
            match &d.action {
                Action::ScaleOut { resources } => self.creating.extend(resources.iter().cloned()),
                Action::ScaleIn { resource } => {
                    if let Some(last) = self.last_scale_in {
                        assert!(
                            d.at.0 - last >= self.policy.scale_in_cooldown.as_millis() as i64,
                            "scale-ins {last} and {} closer than the cooldown",
                            d.at.0
                        );
                    }
                    self.last_scale_in = Some(d.at.0);
                    self.releasing.push_back(resource.clone());
                    // The scale-in ends its evaluation: the state now is the
                    // state right after it.
                    assert!(
                        u128::from(snap.demand) * 100
                            <= u128::from(self.policy.usage_threshold) * u128::from(snap.capacity),
                        "scale-in left usage above the threshold: {snap:?}"
                    );
                }
                Action::Rejected { .. } => {
                    if let Reason::NoRoom { waited_ms, .. } = d.reason {
                        assert!(waited_ms <= self.policy.wait_timeout.as_millis() as i64);
                    }
                }
                _ => {}
            }
        }
        self.log.extend(decisions);
        for r in self.group.resources() {
            assert!(
                r.occupancy <= self.policy.concurrent_sessions,
                "{} holds {} sessions, more than {}",
                r.id,
                r.occupancy,
                self.policy.concurrent_sessions
            );
        }
        let elastic = self
            .group
            .resources()
            .iter()
            .filter(|r| r.class == Class::Elastic && r.state != ResourceState::Released)
            .count() as u32;
        assert!(elastic <= self.policy.max_elastic);
        assert_eq!(elastic, snap.elastic);
        let occupied: u64 = self
            .group
            .resources()
            .iter()
            .map(|r| u64::from(r.occupancy))
            .sum();
        assert_eq!(occupied, snap.sessions);
        // While a period holds, what is ready or being created covers its
        // min_ready unless the elastic budget is spent.
        if let Some(min_ready) = holding_min_ready(&self.policy, self.group_now()) {
            assert!(
                snap.resources >= u64::from(min_ready) || snap.elastic == self.policy.max_elastic,
                "period keeps {min_ready} ready at {}, only {snap:?}",
                self.group_now()
            );
        }
    }

    /// The instant the last engine call was at.
    fn group_now(&self) -> i64 {
        self.now
    }

    fn run(&mut self, trace: &[(u16, Op)]) -> i64 {
        let mut now = 0i64;
        for (dt, op) in trace {
            now += i64::from(*dt) * 1000;
            while let Some(t) = self.group.poll_deadline() {
                if t.0 > T0 + now {
                    break;
                }
                self.now = t.0;
                self.group.handle_timeout(t).unwrap();
                self.check();
            }
            let t = UnixMillis(T0 + now);
            self.now = t.0;
            let s = |n: &u8| sid(&format!("s{n}"));
            let r = |n: &u8| {
                let all = self.group.resources();
                all[usize::from(*n) % all.len().max(1)].id.clone()
            };
            // Inputs that do not fit the state (leave of an unknown session, ...)
            // are refused by the engine without a change; that is fine here.
            let _ = match op {
                Op::Arrive(n) => self.group.handle(t, Input::Arrive { session: s(n) }),
                Op::Route(n) => self.group.handle(t, Input::Route { session: s(n) }),
                Op::Connect(n) => self.group.handle(t, Input::Connected { session: s(n) }),
                Op::Leave(n) => self.group.handle(t, Input::Leave { session: s(n) }),
                Op::Create => match self.creating.pop_front() {
                    Some(resource) => self.group.handle(t, Input::Created { resource }),
                    None => self.group.handle_timeout(t),
                },
                Op::Release => match self.releasing.pop_front() {
                    Some(resource) => self.group.handle(t, Input::Released { resource }),
                    None => self.group.handle_timeout(t),
                },
                Op::Unavailable(n) if !self.group.resources().is_empty() => {
                    let id = r(n);
                    self.group.handle(t, Input::Unavailable { resource: id })
                }
                Op::Available(n) if !self.group.resources().is_empty() => {
                    let id = r(n);
                    self.group.handle(t, Input::Available { resource: id })
                }
                Op::Unavailable(_) | Op::Available(_) => self.group.handle_timeout(t),
            };
            self.check();
        }
        T0 + now
    }
}

fn trace() -> impl Strategy<Value = Vec<(u16, Op)>> {
    prop::collection::vec((prop_oneof![2 => Just(0u16), 5 => 1u16..120], op()), 1..120)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Never more than concurrent_sessions on a resource, never more than
    /// max_elastic elastic resources, scale-ins leave usage at or under the
    /// threshold and are a cooldown apart (all checked in `Driver::check`).
    #[test]
    fn invariants_hold_on_random_traces(policy in any_policy(), base in 0u32..4, trace in trace()) {
        let mut d = Driver::new(policy, base);
        d.run(&trace);
    }

    /// The same inputs always give the same decisions.
    #[test]
    fn same_input_same_output(policy in any_policy(), base in 0u32..4, trace in trace()) {
        let mut a = Driver::new(policy.clone(), base);
        let mut b = Driver::new(policy, base);
        a.run(&trace);
        b.run(&trace);
        prop_assert_eq!(&a.log, &b.log);
        prop_assert_eq!(a.group.resources(), b.group.resources());
    }

    /// Billed elastic seconds equal the sum of the ready-to-released intervals
    /// seen in the decision stream, and the elastic line is that sum priced.
    #[test]
    fn billed_seconds_are_the_ready_to_released_intervals(policy in any_policy(), base in 0u32..4, trace in trace()) {
        let mut d = Driver::new(policy, base);
        let end = UnixMillis(d.run(&trace) + 1000);
        let mut intervals: std::collections::HashMap<ResourceId, (i64, Option<i64>)> = Default::default();
        for dec in &d.log {
            match &dec.action {
                Action::Created { resource } => { intervals.insert(resource.clone(), (dec.at.0, None)); }
                Action::Released { resource } => {
                    if let Some(iv) = intervals.get_mut(resource) { iv.1 = Some(dec.at.0); }
                }
                _ => {}
            }
        }
        let from_decisions: u64 = intervals
            .values()
            .map(|(ready, released)| ((released.unwrap_or(end.0) - ready) / 1000) as u64)
            .sum();
        let from_records: Vec<u64> = d
            .group
            .resources()
            .iter()
            .filter(|r| r.class == Class::Elastic)
            .filter_map(|r| r.ready_at.map(|ready| billing::billed_seconds(ready, r.released_at, end)))
            .collect();
        prop_assert_eq!(from_records.iter().sum::<u64>(), from_decisions);
        let hourly = Decimal::new(726_736, 6);
        let prices = Prices { currency: "CNY".into(), subscription_month: Decimal::ZERO, hourly };
        let bill = billing::bill(BaseBilling::PayAsYouGo, 0, &prices, 0, from_records);
        prop_assert_eq!(
            bill.elastic,
            billing::round_line(hourly * Decimal::from(from_decisions) / Decimal::from(3600))
        );
    }
}

#[test]
fn long_and_short_session_ids_are_both_found() {
    let mut g = Group::with_base_count(policy(4, 100, 1, 0, 60), None, 1, at(0)).unwrap();
    let long = "a-very-long-session-identifier-from-a-streaming-server";
    let edge = "exactly-22-bytes-long.";
    assert_eq!(edge.len(), 22);
    for (i, s) in [long, "s", edge].iter().enumerate() {
        arrive(&mut g, i as i64, s);
        assert_eq!(g.session_resource(&sid(s)), Some(&rid("b1")), "{s}");
    }
    assert!(matches!(
        g.handle(at(5), Input::Arrive { session: sid(long) }),
        Err(EngineError::DuplicateSession(_))
    ));
    for s in [long, "s", edge] {
        g.handle(at(6), Input::Leave { session: sid(s) }).unwrap();
    }
    assert_eq!(g.snapshot().sessions, 0);
}

#[test]
fn a_deadline_at_an_inputs_instant_comes_before_the_input() {
    // Seed at 11:00 without polling: the scale-in due at 11:00 is decided first,
    // so the release reported at 11:00 completes it.
    let mut g = Group::with_base_count(policy(2, 85, 2, 2, 3600), None, 2, at(0)).unwrap();
    for (i, s) in ["s1", "s2", "s3", "s4"].iter().enumerate() {
        arrive(&mut g, i as i64, s);
    }
    g.handle_batch(
        at(300),
        [
            Input::Created {
                resource: rid("e1"),
            },
            Input::Created {
                resource: rid("e2"),
            },
        ],
    )
    .unwrap();
    g.drain_decisions().for_each(drop);
    g.handle(
        at(3900),
        Input::Released {
            resource: rid("e1"),
        },
    )
    .unwrap();
    let d: Vec<Decision> = g.drain_decisions().collect();
    assert_eq!(
        d.iter()
            .map(|d| (d.at, d.action.clone()))
            .collect::<Vec<_>>(),
        [
            (
                at(3900),
                Action::ScaleIn {
                    resource: rid("e1")
                }
            ),
            (
                at(3900),
                Action::Released {
                    resource: rid("e1")
                }
            ),
        ]
    );
}

// ---------------------------------------------------------------------------
// Policy periods (scheduled scaling)

const MIN: i64 = 60;

/// Monday (T0's day) 08:00-09:00, keeping `min_ready` ready, warm-up 10 minutes.
fn morning(min_ready: u32) -> PolicyPeriod {
    PolicyPeriod {
        weekdays: 0b1,
        start_minute: 8 * 60,
        end_minute: 9 * 60,
        min_ready,
        warm_up: Duration::from_secs(600),
    }
}

fn with_periods(mut p: Policy, periods: Vec<PolicyPeriod>) -> Policy {
    p.periods = periods;
    p
}

#[test]
fn a_period_creates_elastic_resources_at_its_warm_up_and_holds_them_to_its_end() {
    // 1 base, 2 sessions each, max 3 elastic, max_idle 30m; the group starts 07:00.
    let p = with_periods(policy(2, 80, 1, 3, 30 * 60), vec![morning(3)]);
    let mut g = Group::with_base_count(p, None, 1, at(-60 * MIN)).unwrap();
    assert_eq!(g.poll_deadline(), Some(at(-10 * MIN)), "warm-up at 07:50");
    assert!(matches!(
        g.explain(at(-60 * MIN)).period,
        Some(PeriodView::Upcoming {
            period: 1,
            min_ready: 3,
            ..
        })
    ));
    g.handle_timeout(at(-10 * MIN)).unwrap();
    let d: Vec<Decision> = g.drain_decisions().collect();
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0].action,
        Action::ScaleOut {
            resources: vec![rid("e1"), rid("e2")]
        },
        "not bounded by scale_out_step 1: the period asks for what it lacks"
    );
    assert_eq!(
        d[0].reason,
        Reason::Period {
            period: 1,
            warm_up_at: at(-10 * MIN),
            starts_at: at(0),
            ends_at: at(60 * MIN),
            min_ready: 3,
            ready_or_pending: 1,
            elastic_before: 0,
            max_elastic: 3,
        }
    );
    assert!(d[0]
        .reason
        .to_string()
        .contains("period 1 (08:00-09:00 UTC"));
    g.handle_batch(
        at(-6 * MIN),
        [
            Input::Created {
                resource: rid("e1"),
            },
            Input::Created {
                resource: rid("e2"),
            },
        ],
    )
    .unwrap();
    g.drain_decisions().for_each(drop);
    // The period start is a deadline; nothing changes there.
    assert_eq!(g.poll_deadline(), Some(at(0)));
    g.handle_timeout(at(0)).unwrap();
    assert!(actions(&mut g).is_empty());
    // Idle 30m at 08:24, but 3 ready = min_ready: held.
    assert_eq!(g.poll_deadline(), Some(at(24 * MIN)));
    g.handle_timeout(at(24 * MIN)).unwrap();
    assert!(actions(&mut g).is_empty());
    let why = g.explain(at(24 * MIN));
    assert_eq!(
        why.scale_in,
        ScaleInView::HeldByPeriod {
            resource: rid("e1"),
            period: 1,
            ready: 3,
            min_ready: 3
        }
    );
    assert!(
        why.to_string().contains("Period 1 (08:00-09:00 UTC"),
        "{why}"
    );
    // Next: the period's end, where the idle countdowns restart.
    assert_eq!(g.poll_deadline(), Some(at(60 * MIN)));
    g.handle_timeout(at(60 * MIN)).unwrap();
    assert!(g.resources()[1..]
        .iter()
        .all(|r| r.idle_since == at(60 * MIN)));
    assert_eq!(g.poll_deadline(), Some(at(90 * MIN)));
    g.handle_timeout(at(90 * MIN)).unwrap();
    assert_eq!(
        actions(&mut g),
        [Action::ScaleIn {
            resource: rid("e1")
        }]
    );
}

#[test]
fn a_period_does_not_apply_on_other_weekdays() {
    // Tuesday only: Monday's 07:50 passes without a decision.
    let mut period = morning(2);
    period.weekdays = 0b10;
    let p = with_periods(policy(2, 80, 1, 3, 30 * 60), vec![period]);
    let mut g = Group::with_base_count(p, None, 1, at(-60 * MIN)).unwrap();
    let tuesday_warm_up = at(24 * 60 * MIN - 10 * MIN);
    assert_eq!(g.poll_deadline(), Some(tuesday_warm_up));
    arrive(&mut g, 0, "s1");
    assert_eq!(placed_on(&mut g), ["b1"]);
    g.handle_timeout(tuesday_warm_up).unwrap();
    assert_eq!(
        actions(&mut g),
        [Action::ScaleOut {
            resources: vec![rid("e1")]
        }]
    );
}

#[test]
fn a_group_made_inside_a_period_asks_at_once() {
    let p = with_periods(policy(2, 80, 1, 3, 30 * 60), vec![morning(3)]);
    let mut g = Group::with_base_count(p, None, 2, at(30 * MIN)).unwrap();
    assert_eq!(g.poll_deadline(), Some(at(30 * MIN)));
    g.handle_timeout(at(30 * MIN)).unwrap();
    assert_eq!(
        actions(&mut g),
        [Action::ScaleOut {
            resources: vec![rid("e1")]
        }]
    );
    assert_eq!(
        g.poll_deadline(),
        Some(at(60 * MIN)),
        "then the period's end"
    );
}

#[test]
fn pending_creations_count_and_are_not_asked_twice() {
    let p = with_periods(policy(2, 80, 1, 3, 30 * 60), vec![morning(3)]);
    let mut g = Group::with_base_count(p, None, 1, at(-10 * MIN)).unwrap();
    g.handle_timeout(at(-10 * MIN)).unwrap();
    assert_eq!(actions(&mut g).len(), 1);
    // Still pending at the start and afterwards: no second request.
    g.handle_timeout(at(0)).unwrap();
    arrive(&mut g, 60, "s1");
    assert_eq!(g.snapshot().pending, 2);
    assert!(actions(&mut g)
        .iter()
        .all(|a| matches!(a, Action::Placed { .. })));
}

#[test]
fn a_base_resource_out_of_service_in_a_period_is_made_up_by_an_elastic_one() {
    let p = with_periods(policy(2, 80, 1, 2, 30 * 60), vec![morning(2)]);
    let mut g = Group::with_base_count(p, None, 2, at(-30 * MIN)).unwrap();
    g.handle_timeout(at(-10 * MIN)).unwrap();
    assert!(actions(&mut g).is_empty(), "2 base = min_ready 2");
    g.handle(
        at(5 * MIN),
        Input::Unavailable {
            resource: rid("b2"),
        },
    )
    .unwrap();
    let d: Vec<Decision> = g.drain_decisions().collect();
    assert_eq!(
        d[0].action,
        Action::ScaleOut {
            resources: vec![rid("e1")]
        }
    );
    assert!(matches!(
        d[0].reason,
        Reason::Period {
            ready_or_pending: 1,
            ..
        }
    ));
}

#[test]
fn usage_scale_out_comes_on_top_of_a_period_and_excess_may_go_during_it() {
    // 1 session per resource, threshold 70, period keeping 2 from 07:50.
    let p = with_periods(policy(1, 70, 1, 3, 5 * 60), vec![morning(2)]);
    let mut g = Group::with_base_count(p, None, 1, at(-10 * MIN)).unwrap();
    g.handle_timeout(at(-10 * MIN)).unwrap();
    g.handle(
        at(-5 * MIN),
        Input::Created {
            resource: rid("e1"),
        },
    )
    .unwrap();
    g.drain_decisions().for_each(drop);
    arrive(&mut g, 0, "a");
    arrive(&mut g, 0, "b");
    let d: Vec<Decision> = g.drain_decisions().collect();
    // a on b1, b on e1: 2 x 100 > 70 x 2 -> usage scale-out (reason ScaleOut).
    assert_eq!(d.len(), 3, "{d:?}");
    assert_eq!(
        d[2].action,
        Action::ScaleOut {
            resources: vec![rid("e2")]
        }
    );
    assert!(matches!(d[2].reason, Reason::ScaleOut { .. }), "{d:?}");
    g.handle(
        at(MIN),
        Input::Created {
            resource: rid("e2"),
        },
    )
    .unwrap();
    g.handle(at(2 * MIN), Input::Leave { session: sid("a") })
        .unwrap();
    g.handle(at(2 * MIN), Input::Leave { session: sid("b") })
        .unwrap();
    g.drain_decisions().for_each(drop);
    // 3 ready > min_ready 2: e2 (idle since 08:01) goes after 5 minutes.
    assert_eq!(g.poll_deadline(), Some(at(6 * MIN)));
    g.handle_timeout(at(6 * MIN)).unwrap();
    assert_eq!(
        actions(&mut g),
        [Action::ScaleIn {
            resource: rid("e2")
        }]
    );
    // Now 2 ready = min_ready: e1 (idle since 08:02) is held to 09:00, then
    // idle from 09:00.
    g.handle(
        at(6 * MIN + 30),
        Input::Released {
            resource: rid("e2"),
        },
    )
    .unwrap();
    g.drain_decisions().for_each(drop);
    let mut seen = Vec::new();
    while let Some(d) = g.poll_deadline().filter(|d| d.0 < at(65 * MIN).0) {
        seen.push((d.0 - T0) / 60_000);
        g.handle_timeout(d).unwrap();
        assert!(actions(&mut g).is_empty(), "no scale-in during the period");
    }
    assert_eq!(seen, [7, 60], "held at 08:07, period end at 09:00");
    assert_eq!(g.poll_deadline(), Some(at(65 * MIN)));
    g.handle_timeout(at(65 * MIN)).unwrap();
    assert_eq!(
        actions(&mut g),
        [Action::ScaleIn {
            resource: rid("e1")
        }]
    );
}

#[test]
fn min_ready_beyond_what_the_group_can_have_is_refused() {
    let p = with_periods(policy(2, 80, 1, 2, 60), vec![morning(4)]);
    // 1 base + 2 elastic < 4.
    match Group::with_base_count(p.clone(), None, 1, at(0)) {
        Err(EngineError::Policy(e)) => assert!(
            e.to_string()
                .contains("min_ready 4 is more than 1 base + 2 elastic"),
            "{e}"
        ),
        other => panic!("expected a refused policy, got {other:?}"),
    }
    assert!(Group::with_base_count(p.clone(), None, 2, at(0)).is_ok());
    // A policy change is checked against the group's base count too.
    let mut g = Group::with_base_count(policy(2, 80, 1, 2, 60), None, 1, at(0)).unwrap();
    let before = g.policy().clone();
    assert!(matches!(
        g.handle(at(1), Input::Policy(p)),
        Err(EngineError::Policy(_))
    ));
    assert_eq!(g.policy(), &before);
}

#[test]
fn adding_a_period_by_policy_change_takes_effect_at_once() {
    let mut g = Group::with_base_count(policy(2, 80, 1, 2, 60), None, 1, at(0)).unwrap();
    assert_eq!(g.poll_deadline(), None);
    g.handle(
        at(MIN),
        Input::Policy(with_periods(policy(2, 80, 1, 2, 60), vec![morning(2)])),
    )
    .unwrap();
    assert_eq!(
        actions(&mut g),
        [Action::ScaleOut {
            resources: vec![rid("e1")]
        }]
    );
    assert_eq!(g.poll_deadline(), Some(at(60 * MIN)));
}

#[test]
fn removing_the_periods_removes_their_deadlines() {
    let p = with_periods(policy(2, 80, 1, 2, 60), vec![morning(2)]);
    let mut g = Group::with_base_count(p, None, 2, at(-60 * MIN)).unwrap();
    assert_eq!(g.poll_deadline(), Some(at(-10 * MIN)));
    g.handle(at(-30 * MIN), Input::Policy(policy(2, 80, 1, 2, 60)))
        .unwrap();
    assert_eq!(g.poll_deadline(), None);
    // Time passes the old boundaries without a decision (and terminates).
    arrive(&mut g, 2 * 60 * MIN, "s1");
    assert_eq!(placed_on(&mut g), ["b1"]);
}

/// A group under a random session stream with a provider completing work
/// after fixed delays (like `ferryctl simulate`'s `delays` mode).
fn run_with_delays(
    policy: Policy,
    base: u32,
    create_ms: i64,
    release_ms: i64,
    trace: &[(u16, bool, u8)],
    mut check: impl FnMut(i64, &Group),
) {
    let mut g = Group::with_base_count(policy, None, base, at(0)).unwrap();
    let mut due: std::collections::BTreeMap<(i64, u64), Input> = Default::default();
    let mut seq = 0u64;
    let mut now = T0;
    let mut ask = |g: &mut Group, due: &mut std::collections::BTreeMap<(i64, u64), Input>| {
        for d in g.drain_decisions() {
            let (when, inputs): (i64, Vec<Input>) = match d.action {
                Action::ScaleOut { resources } => (
                    d.at.0 + create_ms,
                    resources
                        .into_iter()
                        .map(|resource| Input::Created { resource })
                        .collect(),
                ),
                Action::ScaleIn { resource } => {
                    (d.at.0 + release_ms, vec![Input::Released { resource }])
                }
                _ => continue,
            };
            for input in inputs {
                due.insert((when, seq), input);
                seq += 1;
            }
        }
    };
    for &(dt, arrive, n) in trace {
        now += i64::from(dt) * 1000;
        loop {
            let next_done = due.first_key_value().map(|(&(t, _), _)| t);
            let next = [next_done, g.poll_deadline().map(|t| t.0)]
                .into_iter()
                .flatten()
                .min();
            let Some(t) = next.filter(|&t| t <= now) else {
                break;
            };
            let mut batch = Vec::new();
            while let Some(entry) = due.first_entry().filter(|e| e.key().0 <= t) {
                batch.push(entry.remove());
            }
            g.handle_due(UnixMillis(t), batch).unwrap();
            ask(&mut g, &mut due);
            check(t, &g);
        }
        let session = sid(&format!("s{n}"));
        let input = if arrive {
            Input::Arrive { session }
        } else {
            Input::Leave { session }
        };
        let _ = g.handle(UnixMillis(now), input);
        ask(&mut g, &mut due);
        check(now, &g);
    }
}

/// One period on every weekday starting 08:00..10:00 (the traces run from
/// Monday 08:00 for up to 4 hours).
fn one_daily_period() -> impl Strategy<Value = PolicyPeriod> {
    (0u16..120, 15u16..120, 1u32..8, 0u64..=30).prop_map(|(start, len, min_ready, warm)| {
        PolicyPeriod {
            weekdays: 0x7f,
            start_minute: 8 * 60 + start,
            end_minute: 8 * 60 + start + len,
            min_ready,
            warm_up: Duration::from_secs(warm * 60),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// With a provider that completes creations after `D` and releases after
    /// `R`, and no resource taken out of service: from `R + D` after a
    /// period's warm-up start (or the group's creation, if later), when
    /// releases decided before it are done and what it asked for is ready,
    /// until its end, at least `min_ready`
    /// resources are ready; and no scale-in during the period (warm-up
    /// included) leaves fewer than `min_ready` ready.
    #[test]
    fn a_period_keeps_min_ready_ready_with_a_delays_provider(
        policy in any_policy(),
        period in one_daily_period(),
        base in 0u32..4,
        create_s in 0i64..600,
        release_s in 0i64..300,
        trace in prop::collection::vec((prop_oneof![2 => Just(0u16), 5 => 1u16..240], any::<bool>(), 0u8..24), 1..120),
    ) {
        let mut policy = with_periods(policy, vec![period.clone()]);
        fit_periods(&mut policy, base);
        prop_assume!(!policy.periods.is_empty());
        let p = policy.periods[0].clone();
        let (create_ms, release_ms) = (create_s * 1000, release_s * 1000);
        let warm_ms = p.warm_up.as_millis() as i64;
        let start = T0 + (i64::from(p.start_minute) - 8 * 60) * 60_000;
        let end = T0 + (i64::from(p.end_minute) - 8 * 60) * 60_000;
        // The group exists from T0 only: a warm-up before that counts from T0.
        let settled = ((start - warm_ms).max(T0) + release_ms + create_ms).max(start);
        let mut last_ready = 0u64;
        run_with_delays(policy.clone(), base, create_ms, release_ms, &trace, |t, g| {
            let snap = g.snapshot();
            let ready = snap.resources - u64::from(snap.pending);
            if (settled..end).contains(&t) {
                assert!(
                    ready >= u64::from(p.min_ready),
                    "{ready} ready at {t} in a period keeping {} (settled {settled}): {snap:?}",
                    p.min_ready
                );
            }
            if (start - warm_ms..end).contains(&t) && ready < last_ready {
                // Ready fell inside the period: only a scale-in of an excess
                // resource does that without unavailability.
                assert!(ready >= u64::from(p.min_ready).min(last_ready), "{last_ready} -> {ready} at {t}");
            }
            last_ready = ready;
        });
    }
}
