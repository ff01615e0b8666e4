//! The group actor's side of routing end users (SPEC section 8): the only
//! place that admits sessions, so the concurrent-session limit holds however
//! many requests arrive at once.
//!
//! A child module of [`super`] (the actor), so it works on the actor's state.
//!
//! - A route request is fed to the engine as [`Input::Route`] (same rules as
//!   `simulate`): placed at once, waiting (FIFO, the engine's waiting room, up
//!   to `wait_timeout`), or rejected. A placed request is a reservation: the
//!   slot is held until the ticket's expiry ([`RESERVATION_TTL`] after it was
//!   issued); the agent reporting `Started` for that session id turns it into
//!   the session ([`Input::Connected`]); unused at expiry it is left
//!   ([`Input::Leave`]) with a `ticket-expired` event. A `Started` for a
//!   reserved session on another resource than the reserved one frees the
//!   reservation, counts the session where it really is and is flagged in
//!   the group's events.
//! - Reservations are durable: each is a row of `route_reservations`
//!   written in the actor's commit, and the `Admitted` answer (from which
//!   the route service signs the ticket) goes out only once that commit is
//!   done. A broker restarted, or another broker taking the group over,
//!   loads them back ([`Input::Reserved`]), so a ticket given out keeps its
//!   slot and the limit holds across a failover.
//! - A request whose client does not wait and finds no room is withdrawn at
//!   once and refused `at-capacity`.
//! - `shared` groups: a user with a session or reservation in the group gets
//!   the same resource and session again (a new ticket, no new slot).
//! - Limits (`[routing]`, issue 14), checked before the engine sees the
//!   request, so neither changes the engine's rules: a user holds at most
//!   `max_requests_per_user` reservations plus waiting requests in the group
//!   (`user-limit`; a session given again counts nothing), and at most
//!   `waiting_room` requests wait (`waiting-room-full`). Since waiting
//!   requests count in demand, these two bound the demand, and so the
//!   billed scale-out, that one user can cause: at most their allowance.
//! - Disconnect retention: an agent's `Presence::Disconnected` keeps the
//!   session (and its slot) for the group's `disconnect_retention`; the same
//!   user routed meanwhile goes back to it. When it runs out the agent is asked
//!   to end the session (`DisconnectSession`); its end is reported and metered
//!   as usual. The retention is the group's policy's `disconnect_retention`
//!   (session part, issue 7; `forever` never ends a retained session), read
//!   when the user disconnects: a change applies to sessions disconnected
//!   after it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use ferry_common::route::{RouteRefusal, RouteRefused};
use ferry_common::wire::{Command, CommandOutcome, Presence, PresenceReport, StreamingProtocol};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis, UserId};
use tokio::sync::mpsc;

use super::{Actor, ActorError, GroupActors, Msg};
use crate::engine::{Input, Retention};
use crate::registry::StreamingTarget;
use crate::store::{ReservationOp, StoredReservation};

/// How long a ticket, and the slot it reserves, lives unused: the broker's
/// ticket lifetime.
pub const RESERVATION_TTL: Duration = crate::tickets::TICKET_TTL;

/// Messages one route request may get from the actor: at most one
/// `Waiting`, then the final answer.
pub const ROUTE_PROGRESS_LEN: usize = 2;

/// A route request as the actor sees it, after the route service checked the
/// user's credentials, assignment and the group's status.
#[derive(Clone, Debug)]
pub struct RouteAsk {
    pub user: UserId,
    /// The group's session type is `shared`.
    pub shared: bool,
    /// The client waits for room (up to `wait_timeout`).
    pub wait: bool,
}

/// A slot granted to a request; the route service signs its ticket with
/// exactly these times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The real resource.
    pub resource: ResourceId,
    /// `host:port` of its streaming server.
    pub address: String,
    /// What its streaming server speaks, if its agent said.
    pub protocol: Option<StreamingProtocol>,
    pub session: SessionId,
    pub issued_at: UnixMillis,
    pub expires_at: UnixMillis,
}

/// What the actor answers a route request with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteProgress {
    /// No room now; the request waits at `position` (1 = next) under this
    /// session id (to cancel it).
    Waiting {
        session: SessionId,
        position: u32,
    },
    Admitted(Placement),
    Refused(RouteRefused),
}

/// Why a deadline is in [`Routing::deadlines`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// A reservation's ticket expires.
    Ticket,
    /// A disconnected session's retention ends.
    Retention,
}

/// A reservation: a ticket issued, its client not arrived yet.
#[derive(Clone, Debug)]
struct Reservation {
    user: UserId,
    /// Engine id of the resource the slot is on.
    resource: ResourceId,
    expires_at: i64,
}

/// A disconnected session kept for its user to come back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Retained {
    /// The real resource it is on.
    pub resource: ResourceId,
    /// When its user disconnected (the host's stamp, never after the
    /// broker's now).
    pub since: UnixMillis,
    /// When it ends; `None` = kept for ever.
    pub deadline: Option<UnixMillis>,
}

/// A request in the engine's waiting room.
struct Waiter {
    user: UserId,
    reply: mpsc::Sender<RouteProgress>,
}

/// The routing state of one group's actor.
#[derive(Default)]
pub(super) struct Routing {
    /// Reserved slots by session.
    reservations: HashMap<SessionId, Reservation>,
    /// Requests waiting for room (or being decided) by session.
    waiters: HashMap<SessionId, Waiter>,
    /// Who each routed or started session belongs to.
    session_user: HashMap<SessionId, UserId>,
    /// Sessions (reserved or started) of each user in the group.
    user_sessions: HashMap<UserId, BTreeSet<SessionId>>,
    /// Disconnected sessions kept for a reconnect ([`super::retention`]).
    pub(super) retained: HashMap<SessionId, Retained>,
    /// Sessions whose retention ran out and whose end was asked for: never
    /// routed to again.
    ending: HashSet<SessionId>,
    /// Streaming address and protocol of each real resource.
    addresses: HashMap<ResourceId, StreamingTarget>,
    /// (when, why, session); entries no longer valid are skipped when due.
    deadlines: BTreeSet<(i64, Due, SessionId)>,
    /// Sessions to leave once the engine's decision loop is done.
    deferred_leave: Vec<SessionId>,
    /// Sessions whose entry of `retained` changed since the last commit.
    pub(super) retained_dirty: BTreeSet<SessionId>,
    /// The reservations as last written: session -> ticket expiry.
    written: HashMap<SessionId, i64>,
    /// Restored reservations whose host has not joined yet, by real
    /// resource ([`Actor::restore_reservations`]).
    unplaced: HashMap<ResourceId, Vec<StoredReservation>>,
    /// Answers that go out once the reservations they give are written.
    replies: Vec<Reply>,
}

/// An `Admitted` answer held until the actor's next commit is done.
struct Reply {
    session: SessionId,
    to: mpsc::Sender<RouteProgress>,
    progress: RouteProgress,
    /// The answer gives a new slot: unanswerable, the slot is freed.
    new_slot: bool,
}

impl Routing {
    fn link(&mut self, session: &SessionId, user: &UserId) {
        self.session_user.insert(session.clone(), user.clone());
        self.user_sessions
            .entry(user.clone())
            .or_default()
            .insert(session.clone());
    }

    pub(super) fn forget(&mut self, session: &SessionId) {
        self.reservations.remove(session);
        if self.retained.remove(session).is_some() {
            self.retained_dirty.insert(session.clone());
        }
        self.ending.remove(session);
        if let Some(user) = self.session_user.remove(session) {
            if let Some(set) = self.user_sessions.get_mut(&user) {
                set.remove(session);
                if set.is_empty() {
                    self.user_sessions.remove(&user);
                }
            }
        }
    }

    /// The next routing deadline.
    pub(super) fn next_deadline(&self) -> Option<UnixMillis> {
        self.deadlines.first().map(|(t, _, _)| UnixMillis(*t))
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A new session id: `r` and 16 random hex digits (valid, short enough to
/// stay inline in the engine's session table).
fn new_session_id() -> Option<SessionId> {
    SessionId::new(format!("r{:016x}", rand::random::<u64>())).ok()
}

fn refused(reason: RouteRefusal, message: impl Into<String>) -> RouteProgress {
    RouteProgress::Refused(RouteRefused {
        reason,
        message: message.into(),
    })
}

impl GroupActors {
    /// Asks the actor of `group` to place a request. Answers arrive on the
    /// returned channel: at most one `Waiting`, then `Admitted` or `Refused`.
    pub async fn route(
        &self,
        group: &GroupName,
        ask: RouteAsk,
    ) -> Result<mpsc::Receiver<RouteProgress>, ActorError> {
        let handle = self
            .actors()
            .get(group)
            .cloned()
            .ok_or_else(|| ActorError::NotRunning(group.to_string()))?;
        let (reply, rx) = mpsc::channel(ROUTE_PROGRESS_LEN);
        handle
            .tx
            .send(Msg::Route { ask, reply })
            .await
            .map_err(|_| ActorError::NotRunning(group.to_string()))?;
        Ok(rx)
    }

    /// Withdraws a waiting request, or frees a slot reserved for a client
    /// that went away before it got its ticket.
    pub async fn cancel_route(&self, group: &GroupName, session: &SessionId) {
        let session = session.clone();
        self.ask(group, |reply| Msg::CancelRoute { session, reply })
            .await
    }

    /// Where end users reach `resource`'s streaming server.
    pub async fn streaming_address(
        &self,
        group: &GroupName,
        resource: &ResourceId,
        target: StreamingTarget,
    ) {
        let resource = resource.clone();
        self.ask(group, |reply| Msg::Streaming {
            resource,
            target,
            reply,
        })
        .await
    }

    /// A session's user disconnected or reconnected.
    pub async fn presence(&self, group: &GroupName, resource: &ResourceId, report: PresenceReport) {
        let resource = resource.clone();
        self.ask(group, |reply| Msg::Presence {
            resource,
            report,
            reply,
        })
        .await
    }
}

impl Actor {
    /// How long the group keeps a disconnected session; `None` = forever.
    fn retention(&self) -> Option<Duration> {
        match self.row.parts.session.disconnect_retention {
            Retention::Forever => None,
            Retention::For(d) => Some(d),
        }
    }

    /// Places a route request (see the module doc).
    pub(super) fn route(&mut self, ask: RouteAsk, reply: mpsc::Sender<RouteProgress>) {
        if self.closed.is_some() || self.updating() {
            let _ = reply.try_send(refused(
                RouteRefusal::GroupNotAvailable {
                    status: self.row.status.clone(),
                },
                format!(
                    "group {} is {}: it takes no new sessions",
                    self.row.name, self.row.status
                ),
            ));
            return;
        }
        if let Some(session) = self.existing_session(&ask) {
            self.readmit(session, &ask.user, &reply);
            return;
        }
        if let Some(refusal) = self.over_limits(&ask) {
            let _ = reply.try_send(refusal);
            return;
        }
        let Some(session) = (0..4)
            .filter_map(|_| new_session_id())
            .find(|s| self.engine.session_resource(s).is_none() && !self.engine.is_waiting(s))
        else {
            let _ = reply.try_send(refused(RouteRefusal::Internal, "no session id available"));
            return;
        };
        self.routing.waiters.insert(
            session.clone(),
            Waiter {
                user: ask.user.clone(),
                reply: reply.clone(),
            },
        );
        // Placement or refusal is answered by `route_decision` from the
        // engine's decisions of this input.
        self.input(Input::Route {
            session: session.clone(),
        });
        if !self.routing.waiters.contains_key(&session) {
            return;
        }
        if self.engine.is_waiting(&session) {
            // A waiting room of 0: nobody waits.
            if ask.wait && self.shared.config.routing.waiting_room > 0 {
                let position = u32::try_from(self.engine.snapshot().waiting).unwrap_or(u32::MAX);
                let _ = reply.try_send(RouteProgress::Waiting { session, position });
            } else {
                self.routing.waiters.remove(&session);
                self.input(Input::Leave { session });
                let _ = reply.try_send(refused(
                    RouteRefusal::AtCapacity,
                    format!("group {} has no room now", self.row.name),
                ));
            }
        } else {
            // Neither placed nor waiting nor rejected: the engine refused the
            // input itself (logged by `input`).
            self.routing.waiters.remove(&session);
            let _ = reply.try_send(refused(
                RouteRefusal::Internal,
                "the group could not take the request",
            ));
        }
    }

    /// The refusal of a new request that would pass the user's allowance or
    /// fill the waiting room, if it would.
    fn over_limits(&self, ask: &RouteAsk) -> Option<RouteProgress> {
        let limits = &self.shared.config.routing;
        let held = self.held_by(&ask.user);
        if held >= limits.max_requests_per_user as usize {
            return Some(refused(
                RouteRefusal::UserLimit,
                format!(
                    "user {} already holds {held} reserved or waiting requests in group {} \
                     (the most one user may hold); use or withdraw them first (an unused \
                     ticket expires after {})",
                    ask.user,
                    self.row.name,
                    ferry_common::duration::format_duration(RESERVATION_TTL)
                ),
            ));
        }
        // With anybody waiting there is no room (waiting requests are placed
        // as soon as room appears): this request would wait too.
        let waiting = self.engine.snapshot().waiting;
        if ask.wait && limits.waiting_room > 0 && waiting >= u64::from(limits.waiting_room) {
            return Some(refused(
                RouteRefusal::WaitingRoomFull,
                format!(
                    "group {} has no room and its waiting room is full ({waiting} waiting); \
                     retry later",
                    self.row.name
                ),
            ));
        }
        None
    }

    /// The user's reservations (restored ones whose host has not joined
    /// yet included) plus waiting requests in the group.
    fn held_by(&self, user: &UserId) -> usize {
        let reserved = self.routing.user_sessions.get(user).map_or(0, |mine| {
            mine.iter()
                .filter(|s| self.routing.reservations.contains_key(*s))
                .count()
        });
        let unplaced = self
            .routing
            .unplaced
            .values()
            .flatten()
            .filter(|r| &r.user == user && r.expires_at.0 > self.last_now)
            .count();
        let waiting = self
            .routing
            .waiters
            .values()
            .filter(|w| &w.user == user)
            .count();
        reserved + unplaced + waiting
    }

    /// The session a user goes back to: a retained (disconnected) one, or in
    /// a `shared` group any session or reservation of theirs.
    fn existing_session(&self, ask: &RouteAsk) -> Option<SessionId> {
        let mine = self.routing.user_sessions.get(&ask.user)?;
        let placed = |s: &&SessionId| {
            !self.routing.ending.contains(*s) && self.engine.session_resource(s).is_some()
        };
        if let Some(s) = mine
            .iter()
            .filter(placed)
            .find(|s| self.routing.retained.contains_key(*s))
        {
            return Some(s.clone());
        }
        if ask.shared {
            return mine.iter().find(placed).cloned();
        }
        None
    }

    /// A new ticket for a session the user already has (no new slot). A
    /// reservation's deadline moves to the new ticket's expiry.
    fn readmit(&mut self, session: SessionId, user: &UserId, reply: &mpsc::Sender<RouteProgress>) {
        let Some(engine_id) = self.engine.session_resource(&session).cloned() else {
            return;
        };
        let issued_at = self.now();
        let expires_at = issued_at.0.saturating_add(ms(RESERVATION_TTL));
        if let Some(r) = self.routing.reservations.get_mut(&session) {
            r.expires_at = r.expires_at.max(expires_at);
            self.routing
                .deadlines
                .insert((expires_at, Due::Ticket, session.clone()));
        }
        let real = self.external(&engine_id);
        let retained = self.routing.retained.contains_key(&session);
        self.note(
            "routed",
            format!(
                "routed: user {user} back to session {session} on {real} ({})",
                if retained {
                    "retained after a disconnect"
                } else {
                    "shared session"
                }
            ),
        );
        let (address, protocol) = self.address_of(&real);
        let placement = Placement {
            address,
            protocol,
            resource: real,
            session: session.clone(),
            issued_at,
            expires_at: UnixMillis(expires_at),
        };
        self.routing.replies.push(Reply {
            session,
            to: reply.clone(),
            progress: RouteProgress::Admitted(placement),
            new_slot: false,
        });
    }

    /// Where users reach `real`'s streaming server and what it speaks.
    fn address_of(&self, real: &ResourceId) -> (String, Option<StreamingProtocol>) {
        match self.routing.addresses.get(real) {
            Some(t) => (t.address.clone(), t.protocol),
            None => (real.to_string(), None),
        }
    }

    /// The engine placed or rejected a session: answer its waiter, if any.
    pub(super) fn route_decision(
        &mut self,
        session: &SessionId,
        placed_on: Option<&ResourceId>,
        at: UnixMillis,
    ) {
        let Some(waiter) = self.routing.waiters.remove(session) else {
            return;
        };
        let Some(engine_id) = placed_on else {
            let _ = waiter.reply.try_send(refused(
                RouteRefusal::AtCapacity,
                format!(
                    "group {} had no room within its wait_timeout",
                    self.row.name
                ),
            ));
            return;
        };
        if waiter.reply.is_closed() {
            // The client went away while it waited: free the slot at once.
            self.routing.deferred_leave.push(session.clone());
            return;
        }
        let expires_at = at.0.saturating_add(ms(RESERVATION_TTL));
        self.routing.reservations.insert(
            session.clone(),
            Reservation {
                user: waiter.user.clone(),
                resource: engine_id.clone(),
                expires_at,
            },
        );
        self.routing
            .deadlines
            .insert((expires_at, Due::Ticket, session.clone()));
        self.routing.link(session, &waiter.user);
        let real = self.external(engine_id);
        let (address, protocol) = self.address_of(&real);
        let placement = Placement {
            address,
            protocol,
            resource: real,
            session: session.clone(),
            issued_at: at,
            expires_at: UnixMillis(expires_at),
        };
        self.routing.replies.push(Reply {
            session: session.clone(),
            to: waiter.reply,
            progress: RouteProgress::Admitted(placement),
            new_slot: true,
        });
    }

    /// The record changes of the reservations since the last commit.
    pub(super) fn reservation_ops(&mut self) -> Vec<ReservationOp> {
        let mut ops = Vec::new();
        // Restored ones still waiting for their host stay written until
        // they expire.
        let now = self.now().0;
        let waiting: HashSet<SessionId> = self
            .routing
            .unplaced
            .values_mut()
            .flat_map(|rows| {
                rows.retain(|r| r.expires_at.0 > now);
                rows.iter().map(|r| r.session.clone())
            })
            .collect();
        self.routing.unplaced.retain(|_, rows| !rows.is_empty());
        let gone: Vec<SessionId> = self
            .routing
            .written
            .keys()
            .filter(|s| !self.routing.reservations.contains_key(*s) && !waiting.contains(*s))
            .cloned()
            .collect();
        for session in gone {
            self.routing.written.remove(&session);
            ops.push(ReservationOp::Delete(session));
        }
        let mut changed: Vec<(SessionId, Reservation)> = self
            .routing
            .reservations
            .iter()
            .filter(|(s, r)| self.routing.written.get(*s) != Some(&r.expires_at))
            .map(|(s, r)| (s.clone(), r.clone()))
            .collect();
        changed.sort_by(|a, b| a.0.cmp(&b.0));
        for (session, r) in changed {
            self.routing.written.insert(session.clone(), r.expires_at);
            ops.push(ReservationOp::Upsert(StoredReservation {
                session,
                resource: self.external(&r.resource),
                user: r.user,
                expires_at: UnixMillis(r.expires_at),
            }));
        }
        ops
    }

    /// The held answers go out (their reservations are written); a slot
    /// whose client went away meanwhile is freed. Returns whether any was.
    pub(super) fn send_replies(&mut self) -> bool {
        let mut freed = false;
        for r in std::mem::take(&mut self.routing.replies) {
            if r.to.try_send(r.progress).is_err() && r.new_slot {
                self.routing.deferred_leave.push(r.session);
                freed = true;
            }
        }
        freed
    }

    /// Reloads the reservations of an earlier owner or run (actor start).
    /// Each holds its slot until its ticket expires or its client arrives:
    /// at once on a resource the engine knows now, else (a base host, bound
    /// to its slot when it joins) as its host joins, before it takes
    /// sessions. One expired, or whose host never comes back before it
    /// expires, is dropped.
    pub(super) async fn restore_reservations(&mut self) -> Result<(), ActorError> {
        let stored = self.shared.store.route_reservations(self.row.num).await?;
        let n = stored.len();
        for r in stored {
            // As the store has it: a row dropped is deleted by a commit.
            self.routing
                .written
                .insert(r.session.clone(), r.expires_at.0);
            self.routing
                .unplaced
                .entry(r.resource.clone())
                .or_default()
                .push(r);
        }
        let known: Vec<(ResourceId, ResourceId)> = self
            .routing
            .unplaced
            .keys()
            .filter_map(|real| {
                let id = self.to_engine.get(real).cloned().or_else(|| {
                    self.elastic_engine_id(real)
                        .filter(|e| self.state_of(e).is_some())
                })?;
                Some((real.clone(), id))
            })
            .collect();
        for (real, id) in known {
            self.place_reservations(&real, &id);
        }
        if n > 0 {
            self.note(
                "restored",
                format!(
                    "restored: {n} reserved slot(s) of tickets given out before this broker \
                     took the group keep their expiry"
                ),
            );
        }
        Ok(())
    }

    /// The restored reservations on `real` take their slots on `engine_id`.
    pub(super) fn place_reservations(&mut self, real: &ResourceId, engine_id: &ResourceId) {
        if self.closed.is_some() {
            // A closed group's engine takes no input: they wait, and expire.
            return;
        }
        let Some(rows) = self.routing.unplaced.remove(real) else {
            return;
        };
        let now = self.now().0;
        for r in rows {
            if r.expires_at.0 <= now
                || !self.input(Input::Reserved {
                    session: r.session.clone(),
                    resource: engine_id.clone(),
                })
            {
                continue;
            }
            self.routing.reservations.insert(
                r.session.clone(),
                Reservation {
                    user: r.user.clone(),
                    resource: engine_id.clone(),
                    expires_at: r.expires_at.0,
                },
            );
            self.routing
                .deadlines
                .insert((r.expires_at.0, Due::Ticket, r.session.clone()));
            self.routing.link(&r.session, &r.user);
        }
    }

    /// A host reports `session` open as it joins: when it is a reservation's,
    /// its client arrived ([`Actor::route_started`]); `true` when counted so.
    pub(super) fn route_connected(&mut self, engine_id: &ResourceId, session: &SessionId) -> bool {
        let Some(user) = self
            .routing
            .reservations
            .get(session)
            .map(|r| r.user.clone())
        else {
            return false;
        };
        self.route_started(engine_id, session, &user)
    }

    /// Leaves queued by `route_decision` (it runs inside the engine's
    /// decision loop, where no input can be fed).
    pub(super) fn flush_deferred_leaves(&mut self) {
        while !self.routing.deferred_leave.is_empty() {
            for session in std::mem::take(&mut self.routing.deferred_leave) {
                self.routing.forget(&session);
                self.input(Input::Leave { session });
            }
        }
    }

    /// A client withdrew: a waiting request leaves the queue; a reservation
    /// whose ticket never reached its client is freed.
    pub(super) fn cancel_route(&mut self, session: SessionId) {
        if self.routing.waiters.remove(&session).is_some() || self.engine.is_waiting(&session) {
            self.input(Input::Leave { session });
        } else if self.routing.reservations.contains_key(&session) {
            self.routing.forget(&session);
            self.input(Input::Leave {
                session: session.clone(),
            });
            self.note(
                "ticket-expired",
                format!("ticket-expired: session {session}: its client went away"),
            );
        }
    }

    /// Handles a `Started` of a routed session; `true` when it was one (the
    /// caller then does not feed `Occupy`).
    pub(super) fn route_started(
        &mut self,
        engine_id: &ResourceId,
        session: &SessionId,
        user: &UserId,
    ) -> bool {
        let Some(r) = self.routing.reservations.remove(session) else {
            self.routing.link(session, user);
            return false;
        };
        if &r.resource == engine_id {
            self.input(Input::Connected {
                session: session.clone(),
            });
            self.routing.link(session, &r.user);
            return true;
        }
        // Started somewhere else than reserved: the reservation is freed and
        // the session counts where it really is.
        let (reserved, real) = (self.external(&r.resource), self.external(engine_id));
        self.note(
            "flagged",
            format!(
                "session {session} of user {} was reserved on {reserved} but started on {real}",
                r.user
            ),
        );
        self.input(Input::Leave {
            session: session.clone(),
        });
        self.routing.link(session, user);
        false
    }

    /// A session ended: routing forgets it.
    pub(super) fn route_ended(&mut self, session: &SessionId) {
        self.routing.forget(session);
    }

    /// Ticket expiries and retention ends due at the clock's now.
    pub(super) fn route_timeouts(&mut self) {
        let now = self.now().0;
        while let Some((t, due, session)) = self.routing.deadlines.first().cloned() {
            if t > now {
                break;
            }
            self.routing.deadlines.pop_first();
            match due {
                Due::Ticket => {
                    let expired = self
                        .routing
                        .reservations
                        .get(&session)
                        .is_some_and(|r| r.expires_at <= now);
                    if !expired {
                        continue;
                    }
                    let user = self
                        .routing
                        .reservations
                        .get(&session)
                        .map(|r| r.user.clone());
                    let real = self
                        .engine
                        .session_resource(&session)
                        .map(|r| self.external(r));
                    self.routing.forget(&session);
                    self.input(Input::Leave {
                        session: session.clone(),
                    });
                    self.note(
                        "ticket-expired",
                        format!(
                            "ticket-expired: session {session} of user {} on {}: unused, its slot is free",
                            user.map(|u| u.to_string()).unwrap_or_default(),
                            real.map(|r| r.to_string()).unwrap_or_default()
                        ),
                    );
                }
                Due::Retention => {
                    let Some(r) = self
                        .routing
                        .retained
                        .get(&session)
                        .filter(|r| r.deadline == Some(UnixMillis(t)))
                        .cloned()
                    else {
                        continue;
                    };
                    self.retention_ended(session, r);
                }
            }
        }
    }

    /// Keeps a disconnected session for its user, until `r.deadline`.
    pub(super) fn retain(&mut self, session: SessionId, r: Retained) {
        if let Some(t) = r.deadline {
            self.routing
                .deadlines
                .insert((t.0, Due::Retention, session.clone()));
        }
        self.routing.retained_dirty.insert(session.clone());
        self.routing.retained.insert(session, r);
    }

    /// The session is no longer retained (its user is back, or it ends);
    /// `true` when it was.
    pub(super) fn unretain(&mut self, session: &SessionId) -> bool {
        let was = self.routing.retained.remove(session).is_some();
        if was {
            self.routing.retained_dirty.insert(session.clone());
        }
        was
    }

    /// A retained session's retention ran out: the session ends now for the
    /// group (its slot is free, its metering stops at the deadline), whether
    /// or not its host can close it, and its agent is asked to close it.
    fn retention_ended(&mut self, session: SessionId, r: Retained) {
        let at = r.deadline.unwrap_or_else(|| self.now());
        self.unretain(&session);
        self.note(
            "retention-ended",
            format!(
                "retention-ended: session {session} on {} stayed disconnected past the \
                 disconnect retention (since {}); it ends now and its agent is asked to \
                 close it",
                r.resource,
                crate::render::rfc3339_secs(r.since)
            ),
        );
        self.end_by_broker(&r.resource, &session, at, "disconnect retention ended");
        self.end_session(&r.resource, session);
    }

    /// Retained sessions: (session, disconnected at, retained until;
    /// `None` = forever), for `sessions list`.
    pub(super) fn retained_sessions(&self) -> Vec<(SessionId, i64, Option<i64>)> {
        let mut out: Vec<_> = self
            .routing
            .retained
            .iter()
            .map(|(s, r)| (s.clone(), r.since.0, r.deadline.map(|t| t.0)))
            .collect();
        out.sort();
        out
    }

    /// An agent told where its streaming server listens.
    pub(super) fn set_address(&mut self, resource: ResourceId, target: StreamingTarget) {
        self.routing.addresses.insert(resource, target);
    }

    /// A session's user disconnected or came back.
    pub(super) fn presence(&mut self, resource: &ResourceId, report: PresenceReport) {
        let session = report.session;
        if let Some(id) = self.to_engine.get(resource).cloned() {
            let what = match report.state {
                Presence::Disconnected => "the user's disconnect from",
                Presence::Reconnected => "the user's return to",
            };
            if self.foreign_report(&id, &session, what) {
                return;
            }
        } else if self.engine.session_resource(&session).is_some() {
            // A member with no slot in the group holds none of its sessions.
            self.note(
                super::sessions::IGNORED_REPORT,
                format!(
                    "ignored: resource {resource} reported a presence change of session \
                     {session}, but it holds no slot in group {}",
                    self.row.name
                ),
            );
            return;
        }
        // Only a session the group has on this host is retained or let go:
        // a report of one it does not know changes nothing (and keeps
        // nothing, also in a group that expired).
        let on_host = self.to_engine.get(resource).is_some_and(|id| {
            self.engine.session_resource(&session) == Some(id)
                || self
                    .sessions
                    .get(id)
                    .is_some_and(|open| open.contains(&session))
        });
        if !on_host {
            return;
        }
        match report.state {
            Presence::Disconnected => {
                if self.routing.retained.contains_key(&session)
                    || self.routing.ending.contains(&session)
                {
                    // Sent again after a reconnect of the agent: the
                    // retention already runs.
                    return;
                }
                // From the disconnect (the host's stamp), never later than
                // now: a report that waited in a link outage is not
                // retained longer for it.
                let now = self.now();
                let since = UnixMillis(report.at.0.min(now.0));
                let deadline = self
                    .retention()
                    .map(|d| UnixMillis(since.0.saturating_add(ms(d))));
                self.retain(
                    session.clone(),
                    Retained {
                        resource: resource.clone(),
                        since,
                        deadline,
                    },
                );
                self.note(
                    "session-disconnected",
                    format!(
                        "session {session} on {resource}: its user disconnected; the session is \
                         retained for {}",
                        match self.retention() {
                            Some(d) => ferry_common::duration::format_duration(d),
                            None => "ever".into(),
                        }
                    ),
                );
            }
            Presence::Reconnected => {
                if self.unretain(&session) {
                    self.note(
                        "session-reconnected",
                        format!("session {session} on {resource}: its user reconnected"),
                    );
                }
            }
        }
    }

    /// The group closed: waiting requests are refused.
    pub(super) fn refuse_waiters(&mut self) {
        let status = self.row.status.clone();
        for (_, w) in self.routing.waiters.drain() {
            let _ = w.reply.try_send(refused(
                RouteRefusal::GroupNotAvailable {
                    status: status.clone(),
                },
                format!("group {} is {status}", self.row.name),
            ));
        }
    }

    /// Asks the agent of `real` to close a session whose retention ran out
    /// (the group already ended it), without holding up the actor; the
    /// outcome goes to the group's events.
    fn end_session(&self, real: &ResourceId, session: SessionId) {
        let shared = self.shared.clone();
        let (num, group, real) = (self.row.num, self.row.name.clone(), real.clone());
        self.shared.tracker.spawn(async move {
            let command = Command::DisconnectSession {
                session: session.clone(),
                reason: "disconnect retention ended".into(),
            };
            let outcome = shared.command(&real, command).await;
            let why = match outcome {
                Ok(CommandOutcome::Done) => None,
                Ok(CommandOutcome::Failed(m)) => Some(format!(
                    "the agent says: {}",
                    crate::hook_failure::brief(&m)
                )),
                Err(e) => Some(e),
            };
            let (kind, message) = match why {
                None => (
                    "disconnected",
                    format!("disconnected: session {session} on {real}, its retention ended"),
                ),
                Some(why) => (
                    "disconnect-failed",
                    format!(
                        "disconnect failed: session {session} on {real}: {why}; the session \
                         ended for the group and its metering anyway, the host may keep it \
                         until its user logs out (configure [hooks] disconnect on the host \
                         to enforce retention)"
                    ),
                ),
            };
            if let Err(e) = shared.event(num, kind, message).await {
                tracing::error!(%group, "record the end of retained session {session}: {e}");
            }
        });
    }
}
