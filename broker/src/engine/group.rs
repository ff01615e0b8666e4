//! One delivery group's live state and the rules that change it.
//!
//! Placement and scale-in candidates are kept in ordered indexes, so every input
//! costs O(log n) in the number of resources, never a scan: a 10,000-host group
//! decides as fast as a 100-host one, within a log factor.
//!
//! Rules where the spec is silent (the engine's tests pin them):
//! - A resource that is unavailable (draining, unhealthy, being updated) takes
//!   no session and is left out of capacity; its sessions still count in
//!   demand.
//! - With `wait_timeout = 0` a request that finds no room is rejected at once
//!   and never counts in demand, so a group at `usage_threshold = 100` scales
//!   out only through waiting requests.
//! - While a policy period holds ([`super::period`]), an evaluation first
//!   creates `min(min_ready - (ready + pending), max_elastic - elastic)`
//!   elastic resources (not limited by `scale_out_step`; pending ones count,
//!   so nothing is created twice), then makes its usage check, and scales
//!   nothing in while ready and available resources are at or below
//!   `min_ready`. A period creation is a scale-out: it restarts idle
//!   countdowns and that evaluation scales nothing in. At a period's end
//!   every idle elastic resource's countdown restarts. A base resource out of
//!   service during a period is replaced by an elastic one (it is not in
//!   capacity).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ferry_common::{ResourceId, SessionId, UnixMillis};

use super::decision::{period_number, Action, Class, Decision, Input, Reason, ResourceState};
use super::explain::{Explanation, PeriodView, ScaleInView, ScaleOutView, Snapshot};
use super::period::{self, Occurrence};
use super::policy::{LoadBalancing, Policy, PolicyError, MAX_GROUP_RESOURCES};

/// One resource of the group, as the engine sees it. Released resources stay in
/// the list so their ready-to-released interval can be billed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// A base id given to [`Group::new`], or `e1`, `e2`, ... for elastic ones.
    pub id: ResourceId,
    /// Base or elastic.
    pub class: Class,
    /// Where it is in its lifecycle.
    pub state: ResourceState,
    /// False while draining, unhealthy or being updated: it takes no session and
    /// does not count in capacity, but its sessions go on and count in demand.
    pub available: bool,
    /// Sessions plus reservations on it.
    pub occupancy: u32,
    /// When it was asked for (scale-out), or when the group was made (base).
    pub requested_at: UnixMillis,
    /// When it became ready; base resources are ready from the start.
    pub ready_at: Option<UnixMillis>,
    /// When its scale-in was decided.
    pub releasing_at: Option<UnixMillis>,
    /// When the provider reported it gone; billing stops here.
    pub released_at: Option<UnixMillis>,
    /// Start of the current idle stretch: the latest of becoming ready (or
    /// available), its last session ending, and the group's last scale-out.
    /// Only meaningful while `occupancy == 0`.
    pub idle_since: UnixMillis,
}

impl Resource {
    fn takes_sessions(&self) -> bool {
        self.state == ResourceState::Ready && self.available
    }

    fn in_capacity(&self) -> bool {
        self.state == ResourceState::Pending || self.takes_sessions()
    }

    fn is_idle_elastic(&self) -> bool {
        self.class == Class::Elastic && self.takes_sessions() && self.occupancy == 0
    }

    fn counts_toward_max_elastic(&self) -> bool {
        self.class == Class::Elastic && self.state != ResourceState::Released
    }
}

/// Where a restored elastic resource was in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoredState {
    Pending,
    Ready {
        ready_at: UnixMillis,
    },
    Releasing {
        ready_at: UnixMillis,
        releasing_at: UnixMillis,
    },
}

/// An elastic resource of an earlier run, for [`Group::restore_elastic`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoredElastic {
    /// Its engine id, `e<n>`.
    pub id: ResourceId,
    pub state: RestoredState,
    pub requested_at: UnixMillis,
}

/// Why an input was refused. The group is unchanged by a refused input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("time went backwards: {now} ms is before {last} ms already handled")]
    TimeWentBack { now: i64, last: i64 },
    #[error("session {0} is already placed or waiting in this group")]
    DuplicateSession(SessionId),
    #[error("session {0} is not placed or waiting in this group")]
    UnknownSession(SessionId),
    #[error("session {session} cannot connect: {why}")]
    NotReserved {
        session: SessionId,
        why: &'static str,
    },
    #[error("resource {0} is not in this group")]
    UnknownResource(ResourceId),
    #[error("resource {resource} is {state}; {what} needs it {expected}")]
    WrongState {
        resource: ResourceId,
        state: ResourceState,
        expected: ResourceState,
        what: &'static str,
    },
    #[error("base resource {0} is listed twice")]
    DuplicateResource(ResourceId),
    #[error(
        "base resource id {0} looks like an elastic id (e1, e2, ...), which the engine assigns"
    )]
    ReservedId(ResourceId),
    #[error("{count} base resources are more than the limit of {max}")]
    TooManyBase { count: usize, max: u32 },
}

/// Longest session id kept inline in [`SessionKey`]; streaming servers name
/// sessions with short tokens, so in practice every id fits.
const INLINE_SESSION_ID: usize = 22;

/// A session id as a map key. Short ids are stored inside the table, so a
/// lookup compares bytes next to the hash instead of following a pointer to a
/// heap string: in a 10,000-host group that pointer is a cache miss per input.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum SessionKey {
    /// Ids up to [`INLINE_SESSION_ID`] bytes, zero-padded.
    Inline {
        len: u8,
        bytes: [u8; INLINE_SESSION_ID],
    },
    /// Longer ids (always longer, so the two forms never compare equal).
    Heap(Box<str>),
}

impl SessionKey {
    fn of(id: &SessionId) -> Self {
        let s = id.as_str().as_bytes();
        if s.len() <= INLINE_SESSION_ID {
            let mut bytes = [0u8; INLINE_SESSION_ID];
            bytes[..s.len()].copy_from_slice(s);
            Self::Inline {
                len: s.len() as u8,
                bytes,
            }
        } else {
            Self::Heap(id.as_str().into())
        }
    }
}

/// Where a known session is.
#[derive(Clone, Copy, Debug)]
enum Slot {
    /// On a resource; `connected` is false while only its ticket holds the slot.
    Placed { resource: u32, connected: bool },
    /// In the waiting queue under this ticket number.
    Waiting { ticket: u64 },
}

/// A request waiting for room.
#[derive(Clone, Debug)]
struct Waiting {
    /// Who is waiting.
    session: SessionId,
    /// When it arrived, for the reason of its placement or refusal.
    arrived: i64,
    /// When it is refused if still waiting (fixed at arrival).
    deadline: i64,
    /// Whether it becomes a connected session when placed (`Arrive`) or a
    /// reservation (`Route`).
    connect: bool,
}

/// One delivery group: resources, sessions, waiting requests, and the rules.
#[derive(Debug, Clone)]
pub struct Group {
    /// The scaling policy in force.
    policy: Policy,
    /// The group's spec, for catalog checks of later policy changes.
    spec: Option<String>,
    /// Every resource ever in the group, in creation order; the index is the
    /// tie-break "created first".
    resources: Vec<Resource>,
    /// Resource id to index in `resources`.
    by_id: HashMap<ResourceId, u32>,
    /// Number of the next elastic id (`e{n}`).
    next_elastic: u32,
    /// Per class, ready and available resources with room, keyed by
    /// (occupancy, creation order): first = breadth-first pick.
    room: [BTreeSet<(u32, u32)>; 2],
    /// Idle elastic resources keyed by (idle_since, creation order): first =
    /// the scale-in candidate.
    idle: BTreeSet<(i64, u32)>,
    /// Every placed or waiting session.
    sessions: HashMap<SessionKey, Slot>,
    /// Waiting requests in arrival order (FIFO).
    waiting: BTreeMap<u64, Waiting>,
    /// Waiting requests by (deadline, ticket); deadlines differ from FIFO order
    /// when `wait_timeout` changed while requests waited.
    timeouts: BTreeSet<(i64, u64)>,
    /// Next waiting ticket number.
    next_ticket: u64,
    /// Sum of occupancy over all resources.
    occupied: u64,
    /// Resources counted in capacity.
    capacity_resources: u64,
    /// Resources pending.
    pending: u32,
    /// Resources releasing.
    releasing: u32,
    /// Elastic resources not yet released.
    elastic_live: u32,
    /// When the last scale-in was decided, for the cooldown.
    last_scale_in: Option<i64>,
    /// Time of the last evaluation; deadlines at or before it have been seen.
    last_eval: i64,
    /// Base resources the group was made with, for `min_ready` bounds.
    base_count: u32,
    /// The next policy-period boundary to evaluate at (after `last_eval`), or
    /// the group's first instant when a period already holds then.
    period_deadline: Option<i64>,
    /// Latest time handled; inputs may not go back before it.
    now: i64,
    /// Decisions not yet drained.
    decisions: Vec<Decision>,
}

impl Group {
    /// A group whose base resources (in tie-break order) are ready at `now`.
    pub fn new(
        policy: Policy,
        spec: Option<&str>,
        base: Vec<ResourceId>,
        now: UnixMillis,
    ) -> Result<Self, EngineError> {
        policy.validate(spec)?;
        if base.len() > MAX_GROUP_RESOURCES as usize {
            return Err(EngineError::TooManyBase {
                count: base.len(),
                max: MAX_GROUP_RESOURCES,
            });
        }
        let base_count = base.len() as u32;
        policy.validate_for_group(spec, base_count)?;
        // A period holding at the group's first instant is due at once, so its
        // resources are asked for without waiting for an input.
        let period_deadline = if period::holding(&policy.periods, now.0).is_some() {
            Some(now.0)
        } else {
            period::next_boundary(&policy.periods, now.0)
        };
        let mut group = Self {
            policy,
            spec: spec.map(str::to_owned),
            resources: Vec::with_capacity(base.len()),
            by_id: HashMap::with_capacity(base.len()),
            next_elastic: 1,
            room: [BTreeSet::new(), BTreeSet::new()],
            idle: BTreeSet::new(),
            sessions: HashMap::new(),
            waiting: BTreeMap::new(),
            timeouts: BTreeSet::new(),
            next_ticket: 0,
            occupied: 0,
            capacity_resources: 0,
            pending: 0,
            releasing: 0,
            elastic_live: 0,
            last_scale_in: None,
            last_eval: now.0,
            base_count,
            period_deadline,
            now: now.0,
            decisions: Vec::new(),
        };
        for id in base {
            if is_elastic_id(id.as_str()) {
                return Err(EngineError::ReservedId(id));
            }
            if group.by_id.contains_key(&id) {
                return Err(EngineError::DuplicateResource(id));
            }
            group.push_resource(Resource {
                id,
                class: Class::Base,
                state: ResourceState::Ready,
                available: true,
                occupancy: 0,
                requested_at: now,
                ready_at: Some(now),
                releasing_at: None,
                released_at: None,
                idle_since: now,
            });
        }
        Ok(group)
    }

    /// A group with base resources `b1..=bN`, as scenario files name them.
    pub fn with_base_count(
        policy: Policy,
        spec: Option<&str>,
        count: u32,
        now: UnixMillis,
    ) -> Result<Self, EngineError> {
        if count > MAX_GROUP_RESOURCES {
            return Err(EngineError::TooManyBase {
                count: count as usize,
                max: MAX_GROUP_RESOURCES,
            });
        }
        let base = (1..=count).map(|n| numbered_id('b', n)).collect::<Vec<_>>();
        Self::new(policy, spec, base, now)
    }

    /// Puts back the elastic resources of an earlier run (a broker restart),
    /// in creation order, and continues numbering after `next_elastic`
    /// (never below what is restored). Ready ones come back unavailable: they
    /// take sessions once their agent is back ([`Input::Available`]).
    /// No decision is made; call before any input.
    pub fn restore_elastic(
        &mut self,
        restored: Vec<RestoredElastic>,
        next_elastic: u32,
    ) -> Result<(), EngineError> {
        for r in restored {
            if !is_elastic_id(r.id.as_str()) {
                return Err(EngineError::ReservedId(r.id));
            }
            if self.by_id.contains_key(&r.id) {
                return Err(EngineError::DuplicateResource(r.id));
            }
            let n = r.id.as_str()[1..].parse::<u32>().unwrap_or(0);
            self.next_elastic = self.next_elastic.max(n.saturating_add(1));
            let (state, ready_at, releasing_at) = match r.state {
                RestoredState::Pending => (ResourceState::Pending, None, None),
                RestoredState::Ready { ready_at } => (ResourceState::Ready, Some(ready_at), None),
                RestoredState::Releasing {
                    ready_at,
                    releasing_at,
                } => (ResourceState::Releasing, Some(ready_at), Some(releasing_at)),
            };
            self.push_resource(Resource {
                id: r.id,
                class: Class::Elastic,
                state,
                available: state != ResourceState::Ready,
                occupancy: 0,
                requested_at: r.requested_at,
                ready_at,
                releasing_at,
                released_at: None,
                idle_since: UnixMillis(self.now),
            });
        }
        self.next_elastic = self.next_elastic.max(next_elastic);
        Ok(())
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Every resource ever in the group, in creation order.
    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    /// Where a session's slot is, if it is placed.
    pub fn session_resource(&self, session: &SessionId) -> Option<&ResourceId> {
        match self.sessions.get(&SessionKey::of(session))? {
            Slot::Placed { resource, .. } => Some(&self.resources[*resource as usize].id),
            Slot::Waiting { .. } => None,
        }
    }

    /// Whether a request is in the waiting queue.
    pub fn is_waiting(&self, session: &SessionId) -> bool {
        matches!(
            self.sessions.get(&SessionKey::of(session)),
            Some(Slot::Waiting { .. })
        )
    }

    /// Counts for a timeline or status page.
    pub fn snapshot(&self) -> Snapshot {
        let waiting = self.waiting.len() as u64;
        Snapshot {
            sessions: self.occupied,
            waiting,
            demand: self.demand(),
            capacity: self.capacity(),
            resources: self.capacity_resources,
            pending: self.pending,
            releasing: self.releasing,
            elastic: self.elastic_live,
        }
    }

    /// The numbers behind the next scaling decision at `now` (no change made):
    /// what an operator asks when the group did (not) scale.
    pub fn explain(&self, now: UnixMillis) -> Explanation {
        let holding = period::holding(&self.policy.periods, now.0);
        let snapshot = self.snapshot();
        let (demand, capacity) = (snapshot.demand, snapshot.capacity);
        let above = self.exceeds(demand, capacity);
        let scale_out = if !above {
            ScaleOutView::NotNeeded
        } else if self.elastic_live >= self.policy.max_elastic {
            ScaleOutView::AtMaxElastic
        } else {
            ScaleOutView::Due {
                count: self
                    .policy
                    .scale_out_step
                    .min(self.policy.max_elastic - self.elastic_live),
            }
        };
        let scale_in = match self.idle.first() {
            None => ScaleInView::NoIdleElastic,
            Some(_) if above => ScaleInView::UsageAbove,
            Some(&(since, i)) => {
                let resource = self.resources[i as usize].id.clone();
                let idle_ms = now.0 - since;
                let max_idle_ms = self.policy.max_idle_ms();
                let cooldown_end = self
                    .last_scale_in
                    .map(|t| t.saturating_add(self.policy.cooldown_ms()));
                let capacity_after = capacity - u64::from(self.policy.concurrent_sessions);
                let ready = self.ready_count();
                if idle_ms < max_idle_ms {
                    ScaleInView::IdleTooShort {
                        resource,
                        idle_ms,
                        max_idle_ms,
                    }
                } else if let Some(o) = holding.filter(|o| ready <= u64::from(o.min_ready)) {
                    ScaleInView::HeldByPeriod {
                        resource,
                        period: period_number(&o),
                        ready,
                        min_ready: o.min_ready,
                    }
                } else if let Some(end) = cooldown_end.filter(|&end| now.0 < end) {
                    ScaleInView::Cooldown {
                        resource,
                        remaining_ms: end - now.0,
                    }
                } else if self.exceeds(demand, capacity_after) {
                    ScaleInView::WouldExceed {
                        resource,
                        demand,
                        threshold: self.policy.usage_threshold,
                        capacity_after,
                    }
                } else {
                    ScaleInView::Due { resource }
                }
            }
        };
        let period = match holding {
            Some(o) => Some(PeriodView::Holding {
                period: period_number(&o),
                warm_up_at: UnixMillis(o.warm_up_at),
                starts_at: UnixMillis(o.starts_at),
                ends_at: UnixMillis(o.ends_at),
                min_ready: o.min_ready,
                ready: self.ready_count(),
                pending: self.pending,
            }),
            None => period::upcoming(&self.policy.periods, now.0).map(|o| PeriodView::Upcoming {
                period: period_number(&o),
                warm_up_at: UnixMillis(o.warm_up_at),
                starts_at: UnixMillis(o.starts_at),
                ends_at: UnixMillis(o.ends_at),
                min_ready: o.min_ready,
            }),
        };
        Explanation {
            at: now,
            snapshot,
            threshold: self.policy.usage_threshold,
            max_elastic: self.policy.max_elastic,
            scale_out,
            scale_in,
            period,
        }
    }

    /// Takes the decisions made so far, oldest first.
    pub fn drain_decisions(&mut self) -> std::vec::Drain<'_, Decision> {
        self.decisions.drain(..)
    }

    /// The next instant at which the group would decide something without any
    /// input: a waiting request's timeout, the first moment a scale-in may
    /// happen (the oldest idle resource reaching `max_idle`, or the cooldown
    /// ending, whichever is later), or a policy period's boundary (its warm-up
    /// start, start or end). Call [`Group::handle_timeout`] then.
    pub fn poll_deadline(&self) -> Option<UnixMillis> {
        let engine = self.engine_deadline();
        match (engine, self.period_deadline) {
            (Some(a), Some(b)) => Some(UnixMillis(a.0.min(b))),
            (a, b) => a.or(b.map(UnixMillis)),
        }
    }

    /// [`Group::poll_deadline`] without the period boundaries.
    fn engine_deadline(&self) -> Option<UnixMillis> {
        let timeout = self.timeouts.first().map(|&(t, _)| t);
        let max_idle = self.policy.max_idle_ms();
        let scale_in = self.idle.first().and_then(|&(since, _)| {
            let mut t = since.saturating_add(max_idle);
            if let Some(last) = self.last_scale_in {
                t = t.max(last.saturating_add(self.policy.cooldown_ms()));
            }
            if t > self.last_eval {
                return Some(t);
            }
            // A scale-in was already possible at the last evaluation (it scaled
            // one in, or the threshold or a period held it back). The next cause
            // is another idle resource reaching `max_idle` (SPEC 5.4); with a
            // zero cooldown that is how a second candidate goes without waiting
            // for an unrelated input.
            let after = self.last_eval.saturating_sub(max_idle).saturating_add(1);
            self.idle
                .range((after, 0)..)
                .next()
                .map(|&(since, _)| since.saturating_add(max_idle))
        });
        match (timeout, scale_in) {
            (Some(a), Some(b)) => Some(UnixMillis(a.min(b))),
            (a, b) => a.or(b).map(UnixMillis),
        }
    }

    /// Applies one input, then evaluates. Deadlines that fell due before `now`
    /// are handled first, each at its own instant.
    pub fn handle(&mut self, now: UnixMillis, input: Input) -> Result<(), EngineError> {
        self.advance(now.0, true)?;
        let result = self.apply(now.0, input);
        if result.is_ok() {
            self.evaluate(now.0);
        }
        result
    }

    /// Applies several inputs that form one event (e.g. a provider reporting two
    /// creations at once), then evaluates once. Inputs that fail are skipped;
    /// the first failure is returned after the evaluation.
    pub fn handle_batch(
        &mut self,
        now: UnixMillis,
        inputs: impl IntoIterator<Item = Input>,
    ) -> Result<(), EngineError> {
        self.advance(now.0, true)?;
        let mut first_err = None;
        for input in inputs {
            if let Err(e) = self.apply(now.0, input) {
                first_err.get_or_insert(e);
            }
        }
        self.evaluate(now.0);
        first_err.map_or(Ok(()), Err)
    }

    /// SPEC 5.5: the completions due at `now` and the engine's own deadlines due
    /// at `now` are applied first, then one evaluation. Call this before the
    /// inputs of an instant. A waiting request whose timeout falls at `now` is
    /// still placed if a completion at `now` made room.
    pub fn handle_due(
        &mut self,
        now: UnixMillis,
        completions: impl IntoIterator<Item = Input>,
    ) -> Result<(), EngineError> {
        self.advance(now.0, false)?;
        let mut first_err = None;
        for input in completions {
            if let Err(e) = self.apply(now.0, input) {
                first_err.get_or_insert(e);
            }
        }
        self.expire_waiting(now.0);
        self.evaluate(now.0);
        first_err.map_or(Ok(()), Err)
    }

    /// Handles the deadlines due at `now` (see [`Group::poll_deadline`]).
    pub fn handle_timeout(&mut self, now: UnixMillis) -> Result<(), EngineError> {
        self.handle_due(now, std::iter::empty())
    }

    /// Checks that time does not go back, and handles every deadline before
    /// `now` (or at `now` too, with `through_now`) at its own instant, so a
    /// caller that polls late still gets decisions stamped when they were due,
    /// and deadlines at an input's instant come before the input (SPEC 5.5).
    fn advance(&mut self, now: i64, through_now: bool) -> Result<(), EngineError> {
        if now < self.now {
            return Err(EngineError::TimeWentBack {
                now,
                last: self.now,
            });
        }
        while let Some(UnixMillis(t)) = self.poll_deadline() {
            if t > now || (t == now && !through_now) {
                break;
            }
            self.now = t;
            self.expire_waiting(t);
            self.evaluate(t);
        }
        self.now = now;
        Ok(())
    }

    fn demand(&self) -> u64 {
        self.occupied + self.waiting.len() as u64
    }

    fn capacity(&self) -> u64 {
        self.capacity_resources * u64::from(self.policy.concurrent_sessions)
    }

    fn exceeds(&self, demand: u64, capacity: u64) -> bool {
        u128::from(demand) * 100 > u128::from(self.policy.usage_threshold) * u128::from(capacity)
    }

    fn index_of(&self, id: &ResourceId) -> Result<u32, EngineError> {
        self.by_id
            .get(id)
            .copied()
            .ok_or_else(|| EngineError::UnknownResource(id.clone()))
    }

    fn push_resource(&mut self, r: Resource) {
        let i = self.resources.len() as u32;
        self.by_id.insert(r.id.clone(), i);
        self.resources.push(r);
        self.index(i);
    }

    /// Takes resource `i` out of every index and counter it is in.
    fn unindex(&mut self, i: u32) {
        let r = &self.resources[i as usize];
        if r.takes_sessions() && r.occupancy < self.policy.concurrent_sessions {
            self.room[r.class as usize].remove(&(r.occupancy, i));
        }
        if r.is_idle_elastic() {
            self.idle.remove(&(r.idle_since.0, i));
        }
        if r.in_capacity() {
            self.capacity_resources -= 1;
        }
        match r.state {
            ResourceState::Pending => self.pending -= 1,
            ResourceState::Releasing => self.releasing -= 1,
            ResourceState::Ready | ResourceState::Released => {}
        }
        if r.counts_toward_max_elastic() {
            self.elastic_live -= 1;
        }
        self.occupied -= u64::from(r.occupancy);
    }

    /// Puts resource `i` into every index and counter its fields call for.
    fn index(&mut self, i: u32) {
        let r = &self.resources[i as usize];
        if r.takes_sessions() && r.occupancy < self.policy.concurrent_sessions {
            self.room[r.class as usize].insert((r.occupancy, i));
        }
        if r.is_idle_elastic() {
            self.idle.insert((r.idle_since.0, i));
        }
        if r.in_capacity() {
            self.capacity_resources += 1;
        }
        match r.state {
            ResourceState::Pending => self.pending += 1,
            ResourceState::Releasing => self.releasing += 1,
            ResourceState::Ready | ResourceState::Released => {}
        }
        if r.counts_toward_max_elastic() {
            self.elastic_live += 1;
        }
        self.occupied += u64::from(r.occupancy);
    }

    /// Changes resource `i` with its indexes kept in step.
    fn modify(&mut self, i: u32, f: impl FnOnce(&mut Resource)) {
        self.unindex(i);
        f(&mut self.resources[i as usize]);
        self.index(i);
    }

    fn decide(&mut self, at: i64, action: Action, reason: Reason) {
        self.decisions.push(Decision {
            at: UnixMillis(at),
            action,
            reason,
        });
    }

    /// The resource the next session goes to: base before elastic; inside a
    /// class the fewest (breadth-first) or most (depth-first) sessions with
    /// room, ties to the one created first.
    fn pick(&self) -> Option<u32> {
        for set in &self.room {
            let found = match self.policy.load_balancing {
                LoadBalancing::BreadthFirst => set.first(),
                LoadBalancing::DepthFirst => set
                    .last()
                    .and_then(|&(most, _)| set.range((most, 0)..).next()),
            };
            if let Some(&(_, i)) = found {
                return Some(i);
            }
        }
        None
    }

    fn place(&mut self, now: i64, i: u32, session: SessionId, connected: bool, waited_ms: i64) {
        let r = &self.resources[i as usize];
        let reason = Reason::Placement {
            class: r.class,
            load_balancing: self.policy.load_balancing,
            occupancy_before: r.occupancy,
            waited_ms,
        };
        let resource = r.id.clone();
        self.modify(i, |r| r.occupancy += 1);
        self.sessions.insert(
            SessionKey::of(&session),
            Slot::Placed {
                resource: i,
                connected,
            },
        );
        self.decide(now, Action::Placed { session, resource }, reason);
    }

    fn apply(&mut self, now: i64, input: Input) -> Result<(), EngineError> {
        match input {
            Input::Arrive { session } => self.request(now, session, true),
            Input::Route { session } => self.request(now, session, false),
            Input::Connected { session } => self.connect(session),
            Input::Leave { session } => self.leave(now, session),
            Input::Created { resource } => self.created(now, resource),
            Input::Released { resource } => {
                self.provider_released(now, resource, ResourceState::Releasing, "released")
            }
            Input::CreateFailed { resource } => {
                self.provider_released(now, resource, ResourceState::Pending, "failed")
            }
            Input::Unavailable { resource } => {
                let i = self.index_of(&resource)?;
                self.modify(i, |r| r.available = false);
                Ok(())
            }
            Input::Available { resource } => self.available_again(now, &resource),
            Input::Occupy { session, resource } => self.occupy(session, resource, true),
            Input::Reserved { session, resource } => self.occupy(session, resource, false),
            Input::Policy(policy) => self.set_policy(policy),
        }
    }

    /// A reserved session's client connected.
    fn connect(&mut self, session: SessionId) -> Result<(), EngineError> {
        match self.sessions.get_mut(&SessionKey::of(&session)) {
            Some(Slot::Placed { connected, .. }) if !*connected => {
                *connected = true;
                Ok(())
            }
            Some(Slot::Placed { .. }) => Err(EngineError::NotReserved {
                session,
                why: "it is already connected",
            }),
            Some(Slot::Waiting { .. }) => Err(EngineError::NotReserved {
                session,
                why: "it is still waiting for room",
            }),
            None => Err(EngineError::UnknownSession(session)),
        }
    }

    /// The provider created a pending resource: it is ready and idle.
    fn created(&mut self, now: i64, resource: ResourceId) -> Result<(), EngineError> {
        let i = self.expect_state(&resource, ResourceState::Pending, "created")?;
        self.modify(i, |r| {
            r.state = ResourceState::Ready;
            r.ready_at = Some(UnixMillis(now));
            r.idle_since = UnixMillis(now);
        });
        self.decide(now, Action::Created { resource }, Reason::Provider);
        Ok(())
    }

    /// The provider released a resource (`Releasing`), or failed to create
    /// one (`Pending`): either way it is gone.
    fn provider_released(
        &mut self,
        now: i64,
        resource: ResourceId,
        expected: ResourceState,
        what: &'static str,
    ) -> Result<(), EngineError> {
        let i = self.expect_state(&resource, expected, what)?;
        self.modify(i, |r| {
            r.state = ResourceState::Released;
            r.released_at = Some(UnixMillis(now));
        });
        self.decide(now, Action::Released { resource }, Reason::Provider);
        Ok(())
    }

    /// A resource takes sessions again; its idle time starts over.
    fn available_again(&mut self, now: i64, resource: &ResourceId) -> Result<(), EngineError> {
        let i = self.index_of(resource)?;
        if !self.resources[i as usize].available {
            // Idle time while unable to take sessions does not count:
            // the resource was not offered, so its idleness says nothing.
            self.modify(i, |r| {
                r.available = true;
                r.idle_since = UnixMillis(now);
            });
        }
        Ok(())
    }

    /// A session already running on `resource`, as its host reports it:
    /// counted even past `concurrent_sessions`.
    fn occupy(
        &mut self,
        session: SessionId,
        resource: ResourceId,
        connected: bool,
    ) -> Result<(), EngineError> {
        if self.sessions.contains_key(&SessionKey::of(&session)) {
            return Err(EngineError::DuplicateSession(session));
        }
        let i = self.index_of(&resource)?;
        let state = self.resources[i as usize].state;
        if state == ResourceState::Released {
            return Err(EngineError::WrongState {
                resource,
                state,
                expected: ResourceState::Ready,
                what: "a session",
            });
        }
        self.modify(i, |r| r.occupancy += 1);
        self.sessions.insert(
            SessionKey::of(&session),
            Slot::Placed {
                resource: i,
                connected,
            },
        );
        Ok(())
    }

    /// A new policy, checked against the group; every resource is indexed
    /// again under it.
    fn set_policy(&mut self, policy: Policy) -> Result<(), EngineError> {
        policy.validate_for_group(self.spec.as_deref(), self.base_count)?;
        for i in 0..self.resources.len() as u32 {
            self.unindex(i);
        }
        self.policy = policy;
        for i in 0..self.resources.len() as u32 {
            self.index(i);
        }
        Ok(())
    }

    fn expect_state(
        &self,
        id: &ResourceId,
        expected: ResourceState,
        what: &'static str,
    ) -> Result<u32, EngineError> {
        let i = self.index_of(id)?;
        let state = self.resources[i as usize].state;
        if state != expected {
            return Err(EngineError::WrongState {
                resource: id.clone(),
                state,
                expected,
                what,
            });
        }
        Ok(i)
    }

    fn request(&mut self, now: i64, session: SessionId, connect: bool) -> Result<(), EngineError> {
        if self.sessions.contains_key(&SessionKey::of(&session)) {
            return Err(EngineError::DuplicateSession(session));
        }
        // Requests already waiting go first; when the queue is not empty there
        // is no room anyway (every evaluation drains it while room exists).
        if self.waiting.is_empty() {
            if let Some(i) = self.pick() {
                self.place(now, i, session, connect, 0);
                return Ok(());
            }
        }
        let wait = self.policy.wait_timeout_ms();
        if wait == 0 {
            let reason = Reason::NoRoom {
                waited_ms: 0,
                wait_timeout_ms: 0,
                demand: self.demand() + 1,
                capacity: self.capacity(),
            };
            self.decide(now, Action::Rejected { session }, reason);
            return Ok(());
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let deadline = now.saturating_add(wait);
        self.sessions
            .insert(SessionKey::of(&session), Slot::Waiting { ticket });
        self.waiting.insert(
            ticket,
            Waiting {
                session,
                arrived: now,
                deadline,
                connect,
            },
        );
        self.timeouts.insert((deadline, ticket));
        Ok(())
    }

    fn leave(&mut self, now: i64, session: SessionId) -> Result<(), EngineError> {
        match self.sessions.remove(&SessionKey::of(&session)) {
            Some(Slot::Placed { resource, .. }) => {
                self.modify(resource, |r| {
                    r.occupancy = r.occupancy.saturating_sub(1);
                    if r.occupancy == 0 {
                        r.idle_since = UnixMillis(now);
                    }
                });
                Ok(())
            }
            Some(Slot::Waiting { ticket }) => {
                if let Some(w) = self.waiting.remove(&ticket) {
                    self.timeouts.remove(&(w.deadline, ticket));
                }
                Ok(())
            }
            None => Err(EngineError::UnknownSession(session)),
        }
    }

    /// Places what can be placed, then refuses the waiting requests whose
    /// timeout is at or before `now`.
    fn expire_waiting(&mut self, now: i64) {
        self.place_waiting(now);
        while let Some(&(deadline, ticket)) = self.timeouts.first() {
            if deadline > now {
                break;
            }
            self.timeouts.pop_first();
            let reason_numbers = (self.demand(), self.capacity());
            if let Some(w) = self.waiting.remove(&ticket) {
                self.sessions.remove(&SessionKey::of(&w.session));
                let reason = Reason::NoRoom {
                    waited_ms: now - w.arrived,
                    wait_timeout_ms: w.deadline - w.arrived,
                    demand: reason_numbers.0,
                    capacity: reason_numbers.1,
                };
                self.decide(now, Action::Rejected { session: w.session }, reason);
            }
        }
    }

    /// Places waiting requests, oldest first, while room exists.
    fn place_waiting(&mut self, now: i64) {
        while let Some((&ticket, _)) = self.waiting.first_key_value() {
            let Some(i) = self.pick() else { break };
            if let Some(w) = self.waiting.remove(&ticket) {
                self.timeouts.remove(&(w.deadline, ticket));
                self.place(now, i, w.session, w.connect, now - w.arrived);
            }
        }
    }

    /// One evaluation (SPEC 5.2-5.4): waiting requests first, then at most one
    /// scale-out or one scale-in.
    ///
    /// With policy periods: at a period's end every idle countdown restarts;
    /// while a period holds, elastic resources are first created up to its
    /// `min_ready` (counting those being created), usage-driven scale-out
    /// comes on top, and nothing is scaled in while `ready <= min_ready`.
    fn evaluate(&mut self, now: i64) {
        self.last_eval = now;
        let holding = if self.policy.periods.is_empty() {
            // A policy change may have removed the periods.
            self.period_deadline = None;
            None
        } else {
            self.period_deadline = period::next_boundary(&self.policy.periods, now);
            if period::ends_at(&self.policy.periods, now) {
                self.restart_idle_countdowns(now);
            }
            period::holding(&self.policy.periods, now)
        };
        self.place_waiting(now);
        let mut scaled_out = false;
        if let Some(o) = holding {
            scaled_out = self.period_scale_out(now, &o);
        }
        let demand = self.demand();
        let capacity = self.capacity();
        if self.exceeds(demand, capacity) {
            if self.elastic_live < self.policy.max_elastic {
                self.scale_out(now, demand, capacity);
            }
            // Removing capacity cannot help when usage is already above.
            return;
        }
        if !scaled_out {
            self.try_scale_in(now, demand, capacity, holding.as_ref());
        }
    }

    /// Resources ready and taking sessions (base and elastic).
    fn ready_count(&self) -> u64 {
        self.capacity_resources - u64::from(self.pending)
    }

    /// Creates the elastic resources period `o` still needs, within
    /// `max_elastic`; resources being created count, so none is asked twice.
    fn period_scale_out(&mut self, now: i64, o: &Occurrence) -> bool {
        let have = self.capacity_resources;
        let want = u64::from(o.min_ready);
        let room = self.policy.max_elastic.saturating_sub(self.elastic_live);
        if have >= want || room == 0 {
            return false;
        }
        let count = u32::try_from(want - have).unwrap_or(u32::MAX).min(room);
        let reason = Reason::Period {
            period: period_number(o),
            warm_up_at: UnixMillis(o.warm_up_at),
            starts_at: UnixMillis(o.starts_at),
            ends_at: UnixMillis(o.ends_at),
            min_ready: o.min_ready,
            ready_or_pending: have,
            elastic_before: self.elastic_live,
            max_elastic: self.policy.max_elastic,
        };
        self.create_elastic(now, count, reason);
        true
    }

    /// Restarts the idle countdown of every idle elastic resource at `now`.
    fn restart_idle_countdowns(&mut self, now: i64) {
        let idle: Vec<u32> = self.idle.iter().map(|&(_, i)| i).collect();
        for i in idle {
            self.modify(i, |r| r.idle_since = UnixMillis(now));
        }
    }

    fn scale_out(&mut self, now: i64, demand: u64, capacity: u64) {
        let elastic_before = self.elastic_live;
        let count = self
            .policy
            .scale_out_step
            .min(self.policy.max_elastic - elastic_before);
        let reason = Reason::ScaleOut {
            demand,
            capacity,
            threshold: self.policy.usage_threshold,
            elastic_before,
            max_elastic: self.policy.max_elastic,
            step: self.policy.scale_out_step,
        };
        self.create_elastic(now, count, reason);
    }

    /// Asks for `count` elastic resources (a scale-out, SPEC 5.2).
    fn create_elastic(&mut self, now: i64, count: u32, reason: Reason) {
        // A scale-out restarts every idle countdown: load is rising, so keep
        // what is already there.
        self.restart_idle_countdowns(now);
        let mut ids = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let id = numbered_id('e', self.next_elastic);
            self.next_elastic += 1;
            ids.push(id.clone());
            self.push_resource(Resource {
                id,
                class: Class::Elastic,
                state: ResourceState::Pending,
                available: true,
                occupancy: 0,
                requested_at: UnixMillis(now),
                ready_at: None,
                releasing_at: None,
                released_at: None,
                idle_since: UnixMillis(now),
            });
        }
        self.decide(now, Action::ScaleOut { resources: ids }, reason);
    }

    fn try_scale_in(&mut self, now: i64, demand: u64, capacity: u64, holding: Option<&Occurrence>) {
        let Some(&(since, i)) = self.idle.first() else {
            return;
        };
        let max_idle = self.policy.max_idle_ms();
        if now - since < max_idle {
            return;
        }
        // A holding period keeps its min_ready: no scale-in before it ends
        // unless more than min_ready are ready.
        if holding.is_some_and(|o| self.ready_count() <= u64::from(o.min_ready)) {
            return;
        }
        let cooldown = self.policy.cooldown_ms();
        let since_last = self.last_scale_in.map(|t| now - t);
        if since_last.is_some_and(|d| d < cooldown) {
            return;
        }
        let capacity_after = capacity - u64::from(self.policy.concurrent_sessions);
        if self.exceeds(demand, capacity_after) {
            return;
        }
        self.modify(i, |r| {
            r.state = ResourceState::Releasing;
            r.releasing_at = Some(UnixMillis(now));
        });
        self.last_scale_in = Some(now);
        let reason = Reason::ScaleIn {
            idle_ms: now - since,
            max_idle_ms: max_idle,
            demand,
            capacity_after,
            threshold: self.policy.usage_threshold,
            cooldown_ms: cooldown,
            since_last_scale_in_ms: since_last,
        };
        let resource = self.resources[i as usize].id.clone();
        self.decide(now, Action::ScaleIn { resource }, reason);
    }
}

/// `b7`, `e12`: always a valid resource id.
fn numbered_id(prefix: char, n: u32) -> ResourceId {
    ResourceId::new(format!("{prefix}{n}")).expect("a letter and digits is a valid resource id")
}

/// Whether `id` has the shape of an engine-assigned elastic id.
fn is_elastic_id(id: &str) -> bool {
    id.len() > 1 && id.starts_with('e') && id[1..].bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod occupy_tests {
    use super::*;

    fn sid(s: &str) -> SessionId {
        s.parse().expect("session id")
    }

    fn rid(s: &str) -> ResourceId {
        s.parse().expect("resource id")
    }

    fn group(concurrent: u32, base: u32) -> Group {
        let p = Policy::new(concurrent, 50, 1, 2, std::time::Duration::from_secs(600));
        Group::with_base_count(p, None, base, UnixMillis(0)).expect("group")
    }

    #[test]
    fn occupied_sessions_count_as_demand_and_drive_a_scale_out() {
        let mut g = group(2, 1);
        g.handle(
            UnixMillis(1_000),
            Input::Occupy {
                session: sid("s1"),
                resource: rid("b1"),
            },
        )
        .expect("occupy");
        assert_eq!(g.snapshot().sessions, 1);
        assert!(g.drain_decisions().next().is_none(), "1 x 100 <= 50 x 2");
        g.handle(
            UnixMillis(2_000),
            Input::Occupy {
                session: sid("s2"),
                resource: rid("b1"),
            },
        )
        .expect("occupy");
        let d: Vec<_> = g.drain_decisions().collect();
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].action,
            Action::ScaleOut {
                resources: vec![rid("e1")]
            }
        );
        assert_eq!(g.session_resource(&sid("s2")), Some(&rid("b1")));
        // The host may run more than the policy allows; the engine counts it.
        g.handle(
            UnixMillis(3_000),
            Input::Occupy {
                session: sid("s3"),
                resource: rid("b1"),
            },
        )
        .expect("occupy past the limit");
        assert_eq!(g.resources()[0].occupancy, 3);
        g.handle(UnixMillis(4_000), Input::Leave { session: sid("s3") })
            .expect("leave");
        assert_eq!(g.resources()[0].occupancy, 2);
    }

    #[test]
    fn a_restored_reservation_holds_its_slot_until_its_client_connects() {
        let mut g = group(2, 1);
        g.handle(
            UnixMillis(0),
            Input::Reserved {
                session: sid("s1"),
                resource: rid("b1"),
            },
        )
        .expect("reserved");
        assert_eq!(g.snapshot().sessions, 1);
        assert_eq!(g.session_resource(&sid("s1")), Some(&rid("b1")));
        assert!(g.drain_decisions().next().is_none());
        g.handle(UnixMillis(1_000), Input::Connected { session: sid("s1") })
            .expect("its client arrives");
        assert_eq!(
            g.handle(UnixMillis(1_000), Input::Connected { session: sid("s1") }),
            Err(EngineError::NotReserved {
                session: sid("s1"),
                why: "it is already connected",
            })
        );
        g.handle(UnixMillis(2_000), Input::Leave { session: sid("s1") })
            .expect("leave");
        assert_eq!(g.snapshot().sessions, 0);
    }

    #[test]
    fn occupy_refuses_duplicates_unknown_and_released_resources_without_change() {
        let mut g = group(2, 1);
        g.handle(
            UnixMillis(0),
            Input::Occupy {
                session: sid("s1"),
                resource: rid("b1"),
            },
        )
        .expect("occupy");
        let before = g.snapshot();
        assert_eq!(
            g.handle(
                UnixMillis(0),
                Input::Occupy {
                    session: sid("s1"),
                    resource: rid("b1")
                }
            ),
            Err(EngineError::DuplicateSession(sid("s1")))
        );
        assert_eq!(
            g.handle(
                UnixMillis(0),
                Input::Occupy {
                    session: sid("s2"),
                    resource: rid("b9")
                }
            ),
            Err(EngineError::UnknownResource(rid("b9")))
        );
        assert_eq!(g.snapshot(), before);
    }
}

#[cfg(test)]
mod elastic_lifecycle_tests {
    //! Issue 6: a failed creation and elastic resources restored after a
    //! broker restart.
    use super::*;

    fn sid(s: &str) -> SessionId {
        s.parse().expect("session id")
    }

    fn rid(s: &str) -> ResourceId {
        s.parse().expect("resource id")
    }

    fn group() -> Group {
        let p = Policy::new(1, 50, 1, 2, std::time::Duration::from_secs(600));
        Group::with_base_count(p, None, 1, UnixMillis(0)).expect("group")
    }

    #[test]
    fn a_failed_creation_leaves_capacity_at_once_and_the_next_scale_out_asks_again() {
        let mut g = group();
        g.handle(UnixMillis(1), Input::Arrive { session: sid("s1") })
            .expect("arrive");
        g.drain_decisions().for_each(drop);
        assert_eq!(g.snapshot().pending, 1);
        g.handle(
            UnixMillis(2),
            Input::CreateFailed {
                resource: rid("e1"),
            },
        )
        .expect("failed");
        let d: Vec<Decision> = g.drain_decisions().collect();
        // Released (never ready: nothing to bill), then the still-high usage
        // asks for the next one.
        assert_eq!(
            d[0].action,
            Action::Released {
                resource: rid("e1")
            }
        );
        assert_eq!(
            d[1].action,
            Action::ScaleOut {
                resources: vec![rid("e2")]
            }
        );
        let e1 = &g.resources()[1];
        assert_eq!((e1.state, e1.ready_at), (ResourceState::Released, None));
        // Only a pending resource can fail to be created.
        assert!(g
            .handle(
                UnixMillis(3),
                Input::CreateFailed {
                    resource: rid("b1")
                }
            )
            .is_err());
    }

    #[test]
    fn no_session_is_placed_on_a_resource_once_its_scale_in_is_decided() {
        // Two slots per resource so the base has room after the scale-in.
        let p = Policy::new(2, 90, 1, 1, std::time::Duration::from_secs(600));
        let mut g = Group::with_base_count(p, None, 1, UnixMillis(0)).expect("group");
        for s in ["s1", "s2"] {
            g.handle(UnixMillis(0), Input::Arrive { session: sid(s) })
                .expect("arrive");
        }
        g.handle(
            UnixMillis(0),
            Input::Created {
                resource: rid("e1"),
            },
        )
        .expect("ready");
        g.handle(UnixMillis(0), Input::Leave { session: sid("s2") })
            .expect("leave");
        g.drain_decisions().for_each(drop);
        // max_idle later e1 is scaled in; a request at that same instant
        // (after the decision) goes to the base, never to e1, and once the
        // base is full the next one waits or is refused: e1 takes nothing.
        g.handle_timeout(UnixMillis(600_000)).expect("deadline");
        let d: Vec<Action> = g.drain_decisions().map(|d| d.action).collect();
        assert_eq!(
            d,
            [Action::ScaleIn {
                resource: rid("e1")
            }]
        );
        for s in ["r1", "r2"] {
            g.handle(UnixMillis(600_000), Input::Route { session: sid(s) })
                .expect("route");
        }
        let placed: Vec<Action> = g
            .drain_decisions()
            .map(|d| d.action)
            .filter(|a| matches!(a, Action::Placed { .. }))
            .collect();
        assert_eq!(
            placed,
            [Action::Placed {
                session: sid("r1"),
                resource: rid("b1")
            }]
        );
        assert_eq!(g.resources()[1].occupancy, 0);
        assert_eq!(g.resources()[1].state, ResourceState::Releasing);
    }

    #[test]
    fn restored_elastic_resources_keep_their_state_and_numbering_goes_on() {
        let p = Policy::new(1, 50, 1, 3, std::time::Duration::from_secs(600));
        let mut g = Group::with_base_count(p, None, 1, UnixMillis(0)).expect("group");
        g.restore_elastic(
            vec![
                RestoredElastic {
                    id: rid("e2"),
                    state: RestoredState::Ready {
                        ready_at: UnixMillis(-50),
                    },
                    requested_at: UnixMillis(-60),
                },
                RestoredElastic {
                    id: rid("e3"),
                    state: RestoredState::Pending,
                    requested_at: UnixMillis(-10),
                },
            ],
            4,
        )
        .expect("restore");
        let s = g.snapshot();
        // e3 pending counts in capacity; e2 waits for its agent.
        assert_eq!((s.pending, s.elastic, s.capacity), (1, 2, 2));
        assert_eq!(g.resources()[1].ready_at, Some(UnixMillis(-50)));
        g.handle(
            UnixMillis(1),
            Input::Available {
                resource: rid("e2"),
            },
        )
        .expect("back");
        assert_eq!(g.snapshot().capacity, 3);
        // Two sessions on three slots: 200 > 150, the next one is e4.
        for s in ["s1", "s2"] {
            g.handle(UnixMillis(2), Input::Arrive { session: sid(s) })
                .expect("arrive");
        }
        let out: Vec<Action> = g.drain_decisions().map(|d| d.action).collect();
        assert!(
            out.contains(&Action::ScaleOut {
                resources: vec![rid("e4")]
            }),
            "{out:?}"
        );
        assert!(g.restore_elastic(vec![], 1).is_ok());
        let dup = RestoredElastic {
            id: rid("e2"),
            state: RestoredState::Pending,
            requested_at: UnixMillis(0),
        };
        assert!(g.restore_elastic(vec![dup], 1).is_err());
    }
}
