//! Who belongs to the group: an agent naming it joins a base slot or the
//! elastic slot its certificate names (or is flagged and not used), agents
//! already connected when the group or the slot appears are taken in
//! (`adopt`), a joining host's size is checked against the group's spec
//! ([`crate::groups::hostfit`]), and session reports naming users the
//! group does not know are recorded.

use std::collections::BTreeSet;

use ferry_common::wire::{HostFacts, SessionEvent};
use ferry_common::{ResourceId, SessionId};

use super::Actor;
use crate::engine::{Class, Input, ResourceState};
use crate::groups::hostfit;
use crate::store::IntervalOp;

impl Actor {
    /// An agent of the group registered on connection `conn` (`None`: not a
    /// connection's report) with `sessions` recorded open on its host.
    pub(super) async fn join(
        &mut self,
        resource: ResourceId,
        conn: Option<u64>,
        sessions: Vec<SessionId>,
    ) {
        if !self.current_conn(&resource, conn, true) {
            return;
        }
        let facts = self.host_facts(&resource).await;
        if !self.flagged.contains_key(&resource) && !self.recorded_flags.contains_key(&resource) {
            let flag = self.recorded_flag(&resource).await;
            self.recorded_flags
                .insert(resource.clone(), flag.unwrap_or_default());
        }
        self.joined(resource.clone(), sessions, facts.as_ref());
        if self.to_engine.contains_key(&resource)
            && self.applied_version(&resource).await < self.row.policy_version
        {
            self.push_policy(&resource);
        }
    }

    /// Records a session started for a user the broker does not know (no
    /// `ferryctl user create`): it counts as reported (it happened on the
    /// host), but an operator should know that nobody was routed there.
    pub(super) async fn check_users(&mut self, resource: &ResourceId, events: &[SessionEvent]) {
        let started: Vec<(SessionId, ferry_common::UserId)> = events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Started { session, user, .. } => {
                    Some((session.clone(), user.clone()))
                }
                SessionEvent::Ended { .. } => None,
            })
            .collect();
        if started.is_empty() {
            return;
        }
        let users = started.iter().map(|(_, u)| u.clone()).collect();
        let known = self.shared.store.known_users(users).await;
        let Ok(known) = known else { return };
        for ((session, user), known) in started.into_iter().zip(known) {
            if !known {
                self.note(
                    "unknown-user",
                    format!(
                        "session {session} on {resource} started for user {user}, whom the \
                         broker does not know (create it with `ferryctl user create`); it \
                         counts, but no route led there"
                    ),
                );
            }
        }
    }

    /// Takes in agents that named this group and are connected, but joined
    /// when the group had no actor (published after they connected, a
    /// broker restart) or no slot for them (an elastic id not asked for
    /// yet): `only` these resources, or every such agent when `None`. What
    /// the group counts of each is what the store records open on it, read
    /// here in the actor's turn: a session event committed before the read
    /// is in it, one committed after it is in the inbox behind this.
    pub(super) async fn adopt(&mut self, only: Option<&[ResourceId]>) {
        let registry = self.shared.registry.clone();
        for (resource, conn, live) in registry.members(&self.row.name) {
            if only.is_some_and(|o| !o.contains(&resource)) {
                continue;
            }
            let sessions = match self.shared.store.open_sessions_of(&resource).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(group = %self.row.name, %resource,
                        "read open sessions to take the host in: {e}; it joins when it reconnects");
                    continue;
                }
            };
            if let Some(target) = live.streaming {
                self.set_address(resource.clone(), target);
            }
            self.join(resource.clone(), Some(conn), sessions).await;
            if !live.available || live.draining {
                // Its link tells only changes: say what holds now.
                if let Some(id) = self.to_engine.get(&resource).cloned() {
                    self.input(Input::Unavailable { resource: id });
                }
            }
        }
    }

    /// The host facts the store has for `resource` (written with its
    /// registration, before the actor hears of the join). `None` if unknown
    /// or unreadable: the host is then not checked against the spec.
    pub(super) async fn host_facts(&self, resource: &ResourceId) -> Option<HostFacts> {
        match self.shared.store.host_facts(resource).await {
            Ok(facts) => facts,
            Err(e) => {
                tracing::warn!(group = %self.row.name, %resource, "read host facts: {e}");
                None
            }
        }
    }

    /// Flags a host below the group's spec (it still serves: operators
    /// decide), or lifts the flag once it re-joins with a host that fits.
    pub(super) fn check_host(&mut self, resource: &ResourceId, facts: Option<&HostFacts>) {
        let Some(facts) = facts else { return };
        match hostfit::shortfall(&self.row.spec, facts) {
            Some(short) => self.flag(
                resource,
                format!(
                    "resource {resource} joined group {} with a host below its spec: it {short}; \
                     it is used, operators decide",
                    self.row.name
                ),
            ),
            None => {
                if self.flagged.remove(resource).is_some() {
                    self.note(
                        "flag-lifted",
                        format!(
                            "resource {resource} re-joined with a host that fits spec {}",
                            self.row.spec
                        ),
                    );
                }
            }
        }
    }

    pub(super) fn joined(
        &mut self,
        resource: ResourceId,
        sessions: Vec<SessionId>,
        facts: Option<&HostFacts>,
    ) {
        let id = match self.to_engine.get(&resource).cloned() {
            Some(id) => id,
            None => {
                if let Some(e) = self.elastic_engine_id(&resource) {
                    if self.state_of(&e) != Some(ResourceState::Pending) {
                        self.flag_unused(
                            &resource,
                            format!(
                                "resource {resource} registered for group {} with an elastic id \
                                 the group did not ask for; not used until a scale-out asks \
                                 for it",
                                self.row.name
                            ),
                        );
                        return;
                    }
                    self.bind(&resource, e.clone());
                    self.lift_unused(&resource, &format!("elastic resource {e}"));
                    e
                } else if let Some(slot) = self.base_slot_for(&resource) {
                    self.slots[slot] = Some(resource.clone());
                    let Ok(slot_id) = ResourceId::new(format!("b{}", slot + 1)) else {
                        return;
                    };
                    self.bind(&resource, slot_id.clone());
                    self.lift_unused(&resource, &format!("base resource {slot_id}"));
                    self.base_registered(&resource, &slot_id);
                    let at = self.now();
                    self.intervals.push(IntervalOp::Open {
                        resource: resource.clone(),
                        class: Class::Base.as_str(),
                        at,
                    });
                    self.note(
                        "resource",
                        format!(
                            "resource {resource} joined as base resource {} of {}",
                            slot + 1,
                            self.row.base
                        ),
                    );
                    slot_id
                } else {
                    self.flag_unused(
                        &resource,
                        format!(
                            "resource {resource} registered for group {} whose {} base \
                             resource(s) are all taken; not used",
                            self.row.name, self.row.base
                        ),
                    );
                    return;
                }
            }
        };
        // Slots reserved before this broker took the group, on this host:
        // taken before it takes sessions.
        self.place_reservations(&resource, &id);
        self.check_host(&resource, facts);
        self.host_back(&resource);
        match self.state_of(&id) {
            Some(ResourceState::Pending) => {
                self.input(Input::Created {
                    resource: id.clone(),
                });
            }
            Some(ResourceState::Ready) => {
                self.input(Input::Available {
                    resource: id.clone(),
                });
            }
            // Releasing: it is being drained for removal; it comes back only
            // to finish its sessions. Released: gone for the engine.
            _ => {}
        }
        let now_on_host: BTreeSet<SessionId> = sessions
            .into_iter()
            .filter(|s| !self.foreign_report(&id, s, "as open on its host"))
            .collect();
        let known = self.sessions.get(&id).cloned().unwrap_or_default();
        for gone in known.difference(&now_on_host) {
            self.input(Input::Leave {
                session: gone.clone(),
            });
        }
        for new in now_on_host.difference(&known) {
            // A reservation's client may have arrived while no broker held
            // the group.
            if !self.route_connected(&id, new) {
                self.input(Input::Occupy {
                    session: new.clone(),
                    resource: id.clone(),
                });
            }
        }
        if self.closed.is_some() {
            for session in &now_on_host {
                self.disconnect(&resource, session.clone());
            }
        }
        self.sessions.insert(id, now_on_host);
    }

    /// Flags an agent of the group that takes no slot.
    pub(super) fn flag_unused(&mut self, resource: &ResourceId, message: String) {
        self.flag(resource, message);
        self.unused.insert(resource.clone());
    }

    /// An agent flagged as not used takes a slot (`now`), or left: its flag
    /// no longer says what holds.
    pub(super) fn lift_unused(&mut self, resource: &ResourceId, now: &str) {
        if self.unused.remove(resource) && self.flagged.remove(resource).is_some() {
            self.note(
                "flag-lifted",
                format!("resource {resource} is used now: it joined as {now}"),
            );
        }
    }

    /// The newest `flagged` event of `resource` in the group, unless a
    /// `flag-lifted` came after it.
    pub(super) async fn recorded_flag(&self, resource: &ResourceId) -> Option<String> {
        match self
            .shared
            .store
            .recorded_flag(self.row.num, resource)
            .await
        {
            Ok(flag) => flag,
            Err(e) => {
                tracing::warn!(group = %self.row.name, %resource, "read recorded flags: {e}");
                None
            }
        }
    }

    pub(super) fn flag(&mut self, resource: &ResourceId, message: String) {
        if self.recorded_flags.get(resource) == Some(&message) {
            // Recorded by an earlier run of the actor: kept, not repeated.
            self.flagged.insert(resource.clone(), message);
            return;
        }
        if !self.flagged.contains_key(resource) {
            tracing::warn!(group = %self.row.name, "{message}");
            self.flagged.insert(resource.clone(), message.clone());
            self.note("flagged", message);
        }
    }
}
