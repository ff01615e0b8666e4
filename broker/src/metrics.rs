//! The broker's metrics: Prometheus text exposition (`GET /metrics`) on the
//! `[metrics] listen` address, off by default.
//!
//! Two kinds of numbers:
//!
//! * counters and histograms, counted where things happen: a group actor's
//!   decisions and the time from its input to the committed decisions
//!   (`groups/actor/`), route answers (`routing/server.rs`), agents'
//!   handshakes and recorded events (`link.rs`), store commits
//!   (`store/writer.rs`);
//! * gauges read at scrape time from the live state: each group's view from
//!   its actor (sessions, waiting requests, resources by class and state,
//!   capacity, usage against its threshold), the registry's connected
//!   agents, the notification outbox and rollouts from the store. Nothing
//!   keeps them in step by hand, so they cannot drift.
//!
//! The handle is per broker, never process-wide (explicit, not a global):
//! a broker opens one `Store`, which carries its [`BrokerMetrics`]
//! (`StoreOptions::metrics`, a fresh one by default); the store's writer
//! times its commits there, and the parts that count (actors, the link, the
//! route service) reach it through the `Store` they already hold
//! (`Store::metrics`), as the metrics endpoint does. No context struct grows
//! a field for it, and two brokers in one test process keep their own
//! numbers.
//!
//! Labels are bounded: group names (operator-made), class, state, kind,
//! reason, result. Never a session, user or resource id.
//!
//! Values are integers everywhere in Ferry's rules; ratios and seconds are
//! turned into `f64` only here, at the export edge.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry as Exposition, Unit};

use crate::engine::{Class, Reason, ResourceState};

/// A label set of one group.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: String,
}

/// A group's resources of one class in one state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub group: String,
    pub class: ClassLabel,
    pub state: StateLabel,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ClassLabel {
    base,
    elastic,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StateLabel {
    pending,
    ready,
    releasing,
}

/// One engine decision: its action and the kind of its reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub group: String,
    pub kind: &'static str,
    pub reason: &'static str,
}

/// A label set of one reason (route refusals).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// A label set of one result (agent handshakes).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Rollouts of one kind in one state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabels {
    pub kind: String,
    pub state: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Seconds of a turn or a commit: 0.5 ms to about 16 s.
fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

/// Writes in one commit: 1 to 1024.
fn batch_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 2.0, 11,
    ))
}

/// The ratio gauges' type: `f64` at the export edge only.
type Ratio = Gauge<f64, std::sync::atomic::AtomicU64>;

/// One broker's metrics; cheap to clone.
#[derive(Clone)]
pub struct BrokerMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Exposition,
    // Counted where they happen.
    decisions: Family<DecisionLabels, Counter>,
    decision_latency: HistogramFamily<GroupLabel>,
    routes_admitted: Family<GroupLabel, Counter>,
    routes_refused: Family<ReasonLabel, Counter>,
    handshakes: Family<ResultLabel, Counter>,
    events_recorded: Counter,
    commit_seconds: Histogram,
    commit_batch: Histogram,
    // Refreshed at each scrape from the live state.
    sessions: Family<GroupLabel, Gauge>,
    waiting: Family<GroupLabel, Gauge>,
    demand: Family<GroupLabel, Gauge>,
    capacity: Family<GroupLabel, Gauge>,
    resources: Family<ResourceLabels, Gauge>,
    usage: Family<GroupLabel, Ratio>,
    threshold: Family<GroupLabel, Ratio>,
    agents: Gauge,
    outbox: Gauge,
    rollouts: Family<RolloutLabels, Gauge>,
    /// One scrape refreshes and encodes at a time, so two never mix their
    /// gauges.
    scrape: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for BrokerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerMetrics")
    }
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl BrokerMetrics {
    /// Every metric, registered under the `ferry_` prefix.
    pub fn new() -> BrokerMetrics {
        let mut registry = Exposition::with_prefix("ferry");
        let inner = Inner {
            decisions: Family::default(),
            decision_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            routes_admitted: Family::default(),
            routes_refused: Family::default(),
            handshakes: Family::default(),
            events_recorded: Counter::default(),
            commit_seconds: latency_histogram(),
            commit_batch: batch_histogram(),
            sessions: Family::default(),
            waiting: Family::default(),
            demand: Family::default(),
            capacity: Family::default(),
            resources: Family::default(),
            usage: Family::default(),
            threshold: Family::default(),
            agents: Gauge::default(),
            outbox: Gauge::default(),
            rollouts: Family::default(),
            scrape: tokio::sync::Mutex::new(()),
            registry: Exposition::default(),
        };
        let r = &mut registry;
        r.register(
            "group_decisions",
            "Engine decisions of a group, by action and the kind of their reason",
            inner.decisions.clone(),
        );
        r.register_with_unit(
            "group_decision_latency",
            "Time from a group's actor taking an input to its decisions committed (the wait in its inbox not included)",
            Unit::Seconds,
            inner.decision_latency.clone(),
        );
        r.register(
            "route_admitted",
            "Route requests admitted (a slot reserved and a ticket given), by group",
            inner.routes_admitted.clone(),
        );
        r.register(
            "route_refused",
            "Route requests refused, by reason",
            inner.routes_refused.clone(),
        );
        r.register(
            "agent_handshakes",
            "Agent link handshakes, by result (accepted or the refusal)",
            inner.handshakes.clone(),
        );
        r.register(
            "events_recorded",
            "Session events of agents committed to the store (duplicates not counted)",
            inner.events_recorded.clone(),
        );
        r.register_with_unit(
            "store_commit",
            "Time of one store transaction (a batch of writes), commit included",
            Unit::Seconds,
            inner.commit_seconds.clone(),
        );
        r.register(
            "store_commit_batch_writes",
            "Writes in one store transaction",
            inner.commit_batch.clone(),
        );
        r.register(
            "group_sessions",
            "Sessions and reserved slots of a group",
            inner.sessions.clone(),
        );
        r.register(
            "group_waiting_requests",
            "Route requests of a group waiting for room",
            inner.waiting.clone(),
        );
        r.register(
            "group_demand",
            "Demand of a group: sessions plus waiting requests",
            inner.demand.clone(),
        );
        r.register(
            "group_capacity_sessions",
            "Session slots of the resources counted in a group's capacity",
            inner.capacity.clone(),
        );
        r.register(
            "group_resources",
            "Resources of a group by class and state",
            inner.resources.clone(),
        );
        r.register(
            "group_usage_ratio",
            "Demand over capacity of a group (absent while its capacity is 0)",
            inner.usage.clone(),
        );
        r.register(
            "group_usage_threshold_ratio",
            "The scale-out threshold of a group's policy, as a ratio",
            inner.threshold.clone(),
        );
        r.register(
            "agents_connected",
            "Agents with a live link to this broker",
            inner.agents.clone(),
        );
        r.register(
            "notification_outbox_depth",
            "Activation notifications not delivered yet",
            inner.outbox.clone(),
        );
        r.register(
            "rollouts",
            "Image updates and OTA schedules by kind and state",
            inner.rollouts.clone(),
        );
        BrokerMetrics {
            inner: Arc::new(Inner { registry, ..inner }),
        }
    }

    /// An engine decision of `group` was taken.
    /// A committed decision of `group` of `kind`, for a reason of the kind
    /// [`reason_kind`] names.
    pub fn decision(&self, group: &str, kind: &'static str, reason: &'static str) {
        self.inner
            .decisions
            .get_or_create(&DecisionLabels {
                group: group.to_owned(),
                kind,
                reason,
            })
            .inc();
    }

    /// A turn of `group`'s actor with decisions committed them `elapsed`
    /// after its input arrived.
    pub fn decision_latency(&self, group: &str, elapsed: Duration) {
        self.inner
            .decision_latency
            .get_or_create(&GroupLabel {
                group: group.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// A route request to `group` was admitted.
    pub fn route_admitted(&self, group: &str) {
        self.inner
            .routes_admitted
            .get_or_create(&GroupLabel {
                group: group.to_owned(),
            })
            .inc();
    }

    /// A route request was refused for `reason` (a `RouteRefusal` name).
    pub fn route_refused(&self, reason: &'static str) {
        self.inner
            .routes_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// An agent's handshake ended with `result` (`accepted`, or the refusal).
    pub fn handshake(&self, result: &'static str) {
        self.inner
            .handshakes
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// `n` session events were committed.
    pub fn events_recorded(&self, n: u64) {
        self.inner.events_recorded.inc_by(n);
    }

    /// A store transaction of `writes` writes took `elapsed`.
    pub fn store_commit(&self, writes: usize, elapsed: Duration) {
        self.inner.commit_seconds.observe(elapsed.as_secs_f64());
        self.inner.commit_batch.observe(writes as f64);
    }

    /// The exposition: the gauges set from `live`, then every metric, in
    /// the OpenMetrics text format.
    pub async fn render(&self, live: &Live) -> String {
        let _one = self.inner.scrape.lock().await;
        self.refresh(live);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            // Writing to a String does not fail; say so if it ever does.
            let _ = writeln!(out, "# encoding failed: {e}");
        }
        out
    }

    fn refresh(&self, live: &Live) {
        let i = &self.inner;
        for family in [&i.sessions, &i.waiting, &i.demand, &i.capacity] {
            family.clear();
        }
        i.resources.clear();
        i.usage.clear();
        i.threshold.clear();
        for view in &live.groups {
            let numbers = &view.numbers;
            let label = GroupLabel {
                group: view.group.clone(),
            };
            let gauge = |f: &Family<GroupLabel, Gauge>, v: u64| {
                f.get_or_create(&label)
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            };
            gauge(&i.sessions, numbers.sessions);
            gauge(&i.waiting, numbers.waiting);
            gauge(&i.demand, view.demand);
            gauge(&i.capacity, view.capacity);
            for ((class, state), n) in numbers.resources.iter().copied() {
                i.resources
                    .get_or_create(&ResourceLabels {
                        group: label.group.clone(),
                        class,
                        state,
                    })
                    .set(i64::from(n));
            }
            if let Some(ratio) = usage_ratio(view.demand, view.capacity) {
                i.usage.get_or_create(&label).set(ratio);
            }
            i.threshold
                .get_or_create(&label)
                .set(f64::from(view.usage_threshold) / 100.0);
        }
        i.agents.set(i64::try_from(live.agents).unwrap_or(i64::MAX));
        // The store did not answer: its last numbers stay (zeros would
        // read as an empty outbox during an outage).
        if !live.store_read {
            return;
        }
        i.outbox.set(i64::try_from(live.outbox).unwrap_or(i64::MAX));
        i.rollouts.clear();
        // Every state a rollout can be in, zeros included, so a
        // dashboard's series do not vanish while nothing runs.
        for (kind, states) in ROLLOUT_STATES {
            for state in *states {
                i.rollouts
                    .get_or_create(&RolloutLabels {
                        kind: (*kind).to_owned(),
                        state: (*state).to_owned(),
                    })
                    .set(0);
            }
        }
        for (kind, state, n) in &live.rollouts {
            i.rollouts
                .get_or_create(&RolloutLabels {
                    kind: kind.clone(),
                    state: state.clone(),
                })
                .set(*n);
        }
    }
}

/// The states of the store's rollout rows (`image_updates`,
/// `ota_schedules`).
const ROLLOUT_STATES: &[(&str, &[&str])] = &[
    ("image", &["running", "succeeded", "failed"]),
    (
        "ota",
        &["scheduled", "cancelled", "running", "succeeded", "failed"],
    ),
];

/// What a scrape reads from the live broker.
#[derive(Debug, Default)]
pub struct Live {
    /// Each running group's figures, from its actor's view.
    pub groups: Vec<GroupFigures>,
    /// Connected agents.
    pub agents: usize,
    /// Notifications not delivered yet.
    pub outbox: u64,
    /// Rollouts: (kind, state, count).
    pub rollouts: Vec<(String, String, i64)>,
    /// The store answered for `outbox` and `rollouts`.
    pub store_read: bool,
}

/// One group's figures at a scrape.
#[derive(Debug, PartialEq, Eq)]
pub struct GroupFigures {
    pub group: String,
    pub numbers: GroupNumbers,
    pub demand: u64,
    pub capacity: u64,
    /// Percent of capacity above which it scales out.
    pub usage_threshold: u32,
}

/// The counts of one group's view that the gauges show.
#[derive(Debug, PartialEq, Eq)]
pub struct GroupNumbers {
    /// Sessions and reserved slots on its resources.
    pub sessions: u64,
    /// Demand beyond the sessions: requests waiting.
    pub waiting: u64,
    /// Resources by class and state (released ones are not counted: they
    /// are history). Every combination is present, zeros included, so a
    /// dashboard's series do not vanish.
    pub resources: Vec<((ClassLabel, StateLabel), u32)>,
}

impl GroupNumbers {
    /// The numbers of a group whose resources are `(class, state,
    /// occupancy)` and whose demand is `demand`.
    pub fn of(of: &[(Class, ResourceState, u32)], demand: u64) -> GroupNumbers {
        let sessions: u64 = of.iter().map(|r| u64::from(r.2)).sum();
        let mut resources = Vec::new();
        for class in [ClassLabel::base, ClassLabel::elastic] {
            for state in [
                StateLabel::pending,
                StateLabel::ready,
                StateLabel::releasing,
            ] {
                let n = of
                    .iter()
                    .filter(|r| class_label(r.0) == class && state_label(r.1) == Some(state))
                    .count();
                resources.push(((class, state), u32::try_from(n).unwrap_or(u32::MAX)));
            }
        }
        GroupNumbers {
            sessions,
            waiting: demand.saturating_sub(sessions),
            resources,
        }
    }
}

fn class_label(class: Class) -> ClassLabel {
    match class {
        Class::Base => ClassLabel::base,
        Class::Elastic => ClassLabel::elastic,
    }
}

fn state_label(state: ResourceState) -> Option<StateLabel> {
    match state {
        ResourceState::Pending => Some(StateLabel::pending),
        ResourceState::Ready => Some(StateLabel::ready),
        ResourceState::Releasing => Some(StateLabel::releasing),
        ResourceState::Released => None,
    }
}

/// Demand over capacity, or nothing while there is no capacity (the ratio
/// has no value then; the demand and capacity gauges say what is there).
pub fn usage_ratio(demand: u64, capacity: u64) -> Option<f64> {
    (capacity > 0).then(|| demand as f64 / capacity as f64)
}

/// The kind of a decision's reason, as a label value.
pub fn reason_kind(reason: &Reason) -> &'static str {
    match reason {
        Reason::Placement { .. } => "placement",
        Reason::NoRoom { .. } => "no_room",
        Reason::ScaleOut { .. } => "scale_out",
        Reason::ScaleIn { .. } => "scale_in",
        Reason::Provider => "provider",
        Reason::Period { .. } => "period",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(
        resources: &[(Class, ResourceState, u32)],
        demand: u64,
        capacity: u64,
    ) -> GroupFigures {
        GroupFigures {
            group: "design".into(),
            numbers: GroupNumbers::of(resources, demand),
            demand,
            capacity,
            usage_threshold: 85,
        }
    }

    #[test]
    fn a_groups_numbers_count_sessions_waiting_and_resources_by_class_and_state() {
        let n = GroupNumbers::of(
            &[
                (Class::Base, ResourceState::Ready, 2),
                (Class::Base, ResourceState::Ready, 1),
                (Class::Elastic, ResourceState::Pending, 0),
                (Class::Elastic, ResourceState::Released, 0),
                (Class::Elastic, ResourceState::Releasing, 0),
            ],
            5,
        );
        assert_eq!(n.sessions, 3);
        assert_eq!(n.waiting, 2);
        let count = |c, s| {
            n.resources
                .iter()
                .find(|((class, state), _)| *class == c && *state == s)
                .map(|(_, n)| *n)
        };
        assert_eq!(count(ClassLabel::base, StateLabel::ready), Some(2));
        assert_eq!(count(ClassLabel::base, StateLabel::pending), Some(0));
        assert_eq!(count(ClassLabel::elastic, StateLabel::pending), Some(1));
        assert_eq!(count(ClassLabel::elastic, StateLabel::releasing), Some(1));
        assert_eq!(count(ClassLabel::elastic, StateLabel::ready), Some(0));
        assert_eq!(n.resources.len(), 6);
    }

    #[test]
    fn usage_has_no_ratio_without_capacity() {
        assert_eq!(usage_ratio(3, 0), None);
        assert_eq!(usage_ratio(3, 4), Some(0.75));
        assert_eq!(usage_ratio(0, 4), Some(0.0));
    }

    #[tokio::test]
    async fn the_exposition_carries_counters_histograms_and_the_live_gauges() {
        let m = BrokerMetrics::new();
        m.route_admitted("design");
        m.route_refused("at-capacity");
        m.route_refused("at-capacity");
        m.events_recorded(3);
        m.handshake("accepted");
        m.store_commit(4, Duration::from_millis(3));
        m.decision(
            "design",
            "placed",
            reason_kind(&Reason::Placement {
                class: Class::Base,
                load_balancing: Default::default(),
                occupancy_before: 0,
                waited_ms: 0,
            }),
        );
        let live = Live {
            groups: vec![figures(&[(Class::Base, ResourceState::Ready, 1)], 1, 2)],
            agents: 1,
            outbox: 0,
            store_read: true,
            rollouts: vec![("image".into(), "running".into(), 1)],
        };
        let text = m.render(&live).await;
        for line in [
            "ferry_route_admitted_total{group=\"design\"} 1",
            "ferry_route_refused_total{reason=\"at-capacity\"} 2",
            "ferry_events_recorded_total 3",
            "ferry_agent_handshakes_total{result=\"accepted\"} 1",
            "ferry_store_commit_seconds_count 1",
            "ferry_store_commit_batch_writes_sum 4.0",
            "ferry_group_decisions_total{group=\"design\",kind=\"placed\",reason=\"placement\"} 1",
            "ferry_group_sessions{group=\"design\"} 1",
            "ferry_group_capacity_sessions{group=\"design\"} 2",
            "ferry_group_usage_ratio{group=\"design\"} 0.5",
            "ferry_group_usage_threshold_ratio{group=\"design\"} 0.85",
            "ferry_group_resources{group=\"design\",class=\"base\",state=\"ready\"} 1",
            "ferry_agents_connected 1",
            "ferry_rollouts{kind=\"image\",state=\"running\"} 1",
            "ferry_rollouts{kind=\"ota\",state=\"running\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        // A group gone since is gone from the next scrape.
        let text = m.render(&Live::default()).await;
        assert!(!text.contains("ferry_group_sessions{"), "{text}");
    }
}
