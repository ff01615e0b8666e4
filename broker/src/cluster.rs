//! Several brokers on one PostgreSQL database: which broker owns which
//! group, and the task that keeps this broker's leases.
//!
//! Each group's live state (its actor, admissions, scale decisions,
//! rollouts) has one owner at a time: the broker holding its lease (table
//! `group_leases`, door `store::leases`). [`plan`] is the rule, pure: the
//! groups spread over the live brokers by rendezvous hashing (a broker
//! joining or leaving moves only its share), a broker takes a free or
//! expired lease of a group that falls to it, renews the ones it keeps and
//! releases the ones that fall to another live broker (a hand-over without
//! waiting for expiry). [`keep_leases`] applies it every third of the lease
//! time.
//!
//! Two clocks, one rule: a lease expires by the database's clock, and this
//! broker stops acting for a group on its own clock before that can have
//! happened (the lease time less a fifth, counted from before the renewal
//! was sent). A broker that cannot renew (paused, cut off from the
//! database) stops its actors at that deadline; a write it still makes is
//! refused by the lease's epoch (see `store::leases`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferry_common::GroupName;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use ferry_common::wire::{Refusal, RefusalCode};

use crate::groups::GroupActors;
use crate::registry::Registry;
use crate::store::{GroupOwner, LeaseChange, LeaseView, Store, StoreError};

/// Default lease time.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// How many lease times a broker that was silent past its lease (paused,
/// cut off from the database) takes no group, while heard from: the groups
/// taken over meanwhile stay with their new owners instead of coming back
/// at once (and again at each pause of a flaky broker), and its share
/// comes back to it once it has been steady that long.
pub const SETTLE_LEASES: u32 = 5;

/// Who this broker is among those sharing its database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    /// Its name, unique among the brokers of the database.
    pub broker_id: String,
    /// Where agents and end users reach it (`host:port`), told to those
    /// that reached another broker.
    pub advertise: String,
    /// How long a lease lasts without renewal.
    pub lease: Duration,
}

/// The broker the groups' hash gives `group_num` among `live` (rendezvous
/// hashing: each broker scores each group, the highest score wins).
pub fn owner_for<'a>(group_num: i64, live: &[&'a str]) -> Option<&'a str> {
    live.iter()
        .copied()
        .max_by_key(|broker| (score(group_num, broker), *broker))
}

fn score(group_num: i64, broker: &str) -> u64 {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{group_num}\u{0}{broker}").as_bytes(),
    );
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(first)
}

/// The lease changes broker `me` makes after reading `view` (see the module
/// documentation). A broker is live when it heartbeated within the lease
/// time and is not leaving; `me` counts as live.
pub fn plan(me: &str, view: &LeaseView, lease_ms: i64) -> Vec<LeaseChange> {
    let live: Vec<&str> = view
        .brokers
        .iter()
        .filter(|b| !b.leaving && (b.id == me || b.seen_at > view.now - lease_ms))
        .map(|b| b.id.as_str())
        .collect();
    let leases: BTreeMap<i64, _> = view.leases.iter().map(|l| (l.group_num, l)).collect();
    let mut changes = Vec::new();
    for (num, _) in &view.groups {
        let mine = owner_for(*num, &live) == Some(me);
        match leases.get(num) {
            Some(l) if l.owner.as_deref() == Some(me) && l.expires_at > view.now => {
                changes.push(if mine {
                    LeaseChange::Renew {
                        group_num: *num,
                        epoch: l.epoch,
                    }
                } else {
                    LeaseChange::Release {
                        group_num: *num,
                        epoch: l.epoch,
                    }
                });
            }
            // Another broker holds it.
            Some(l) if l.owner.is_some() && l.expires_at > view.now => {}
            Some(l) if mine => changes.push(LeaseChange::Acquire {
                group_num: *num,
                seen_epoch: l.epoch,
            }),
            None if mine => changes.push(LeaseChange::Acquire {
                group_num: *num,
                seen_epoch: 0,
            }),
            _ => {}
        }
    }
    changes
}

/// Whether a broker other than `me` is live and takes groups in `view`: a
/// broker back from silence settles only while another one serves.
pub fn others_serve(me: &str, view: &LeaseView, lease_ms: i64) -> bool {
    view.brokers
        .iter()
        .any(|b| b.id != me && !b.leaving && b.seen_at > view.now - lease_ms)
}

/// Which groups this broker owns, and where the others' owners are: what
/// the actors, the agent link and the route service ask.
#[derive(Clone, Default)]
pub struct Ownership {
    /// `None`: this broker is alone on its store and owns every group.
    inner: Option<Arc<Shared>>,
}

#[derive(Default)]
struct Shared {
    owned: RwLock<Owned>,
    /// A group without an owner here was asked for (one just published):
    /// the keeper takes its turn now rather than at the next renewal.
    wanted: tokio::sync::Notify,
}

#[derive(Default)]
struct Owned {
    /// This broker's id.
    me: String,
    mine: BTreeSet<GroupName>,
    /// The numbers of the groups in `mine`.
    nums: BTreeSet<i64>,
    /// Address of the broker owning each group owned elsewhere.
    elsewhere: BTreeMap<GroupName, String>,
}

/// Groups owned here, by number.
type Mine = BTreeMap<i64, GroupName>;

/// Where a group is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// Here.
    Here,
    /// By the broker at this address.
    At(String),
    /// Nobody holds it right now (a hand-over or a failover is under way).
    Nobody,
}

impl Ownership {
    /// A broker alone on its store: it owns every group.
    pub fn everything() -> Ownership {
        Ownership { inner: None }
    }

    /// Broker `me` among others: it owns nothing until its leases say so.
    pub fn shared(me: &str) -> Ownership {
        Ownership {
            inner: Some(Arc::new(Shared {
                owned: RwLock::new(Owned {
                    me: me.to_owned(),
                    ..Owned::default()
                }),
                wanted: tokio::sync::Notify::new(),
            })),
        }
    }

    pub fn owns(&self, group: &GroupName) -> bool {
        self.owner(group) == Owner::Here
    }

    pub fn owner(&self, group: &GroupName) -> Owner {
        let Some(inner) = &self.inner else {
            return Owner::Here;
        };
        let Ok(o) = inner.owned.read() else {
            return Owner::Nobody;
        };
        if o.mine.contains(group) {
            Owner::Here
        } else {
            match o.elsewhere.get(group) {
                Some(addr) => Owner::At(addr.clone()),
                None => Owner::Nobody,
            }
        }
    }

    /// Whether group number `num` is owned here.
    pub fn owns_num(&self, num: i64) -> bool {
        match &self.inner {
            None => true,
            Some(inner) => inner.owned.read().is_ok_and(|o| o.nums.contains(&num)),
        }
    }

    /// A live group that has no actor here was synced (published, say):
    /// its lease may be free, so the keeper looks at once.
    pub fn want_leases(&self) {
        if let Some(inner) = &self.inner {
            inner.wanted.notify_one();
        }
    }

    /// Resolves when [`Ownership::want_leases`] was called (never when
    /// alone).
    async fn leases_wanted(&self) {
        match &self.inner {
            Some(inner) => inner.wanted.notified().await,
            None => std::future::pending().await,
        }
    }

    /// As [`Ownership::owner`], but where this broker's view has no
    /// owner for `group` it asks the database: the view is as of this
    /// broker's last lease turn, so a group taken by another broker (or
    /// published) since then has an owner it does not know of yet.
    pub async fn locate(&self, store: &Store, group: &GroupName) -> Owner {
        let seen = self.owner(group);
        let Some(inner) = &self.inner else {
            return seen;
        };
        if seen != Owner::Nobody {
            return seen;
        }
        let me = match inner.owned.read() {
            Ok(o) => o.me.clone(),
            Err(_) => return seen,
        };
        match store.owner_of(group.as_str()).await {
            Ok(Some(GroupOwner {
                owner: Some(owner),
                address: Some(address),
                ..
            })) if owner != me => Owner::At(address),
            Ok(_) => Owner::Nobody,
            Err(e) => {
                tracing::warn!(%group, error = %e, "look up the owner of a group");
                Owner::Nobody
            }
        }
    }

    /// Groups owned here.
    pub fn mine(&self) -> BTreeSet<GroupName> {
        match &self.inner {
            Some(inner) => inner
                .owned
                .read()
                .map(|o| o.mine.clone())
                .unwrap_or_default(),
            None => BTreeSet::new(),
        }
    }

    fn set(&self, mine: &Mine, elsewhere: BTreeMap<GroupName, String>) {
        if let Some(inner) = &self.inner {
            if let Ok(mut o) = inner.owned.write() {
                o.mine = mine.values().cloned().collect();
                o.nums = mine.keys().copied().collect();
                o.elsewhere = elsewhere;
            }
        }
    }
}

/// Keeps this broker's leases until `shutdown`, then hands its groups over.
/// Starts and stops the actors of the groups it gains and loses.
pub async fn keep_leases(
    store: Store,
    registry: Arc<Registry>,
    actors: GroupActors,
    settings: ClusterSettings,
    shutdown: CancellationToken,
) {
    let ownership = actors.ownership().clone();
    let owned = OwnedGroups {
        ownership: &ownership,
        actors: &actors,
        registry: &registry,
    };
    let lease_ms = i64::try_from(settings.lease.as_millis()).unwrap_or(i64::MAX);
    let period = settings.lease / 3;
    // Until the first renewal, nothing is owned.
    let mut valid_until = Instant::now();
    // When the last turn that reached the database started.
    let mut last_turn: Option<Instant> = None;
    // Back from silence: takes no group until then (see SETTLE_LEASES).
    let mut settle_until: Option<Instant> = None;
    // Each live group's mark at the last turn (see `Store::group_marks`).
    let mut marks: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let started = Instant::now();
        if last_turn.is_some_and(|t| started.duration_since(t) > settings.lease) {
            let settle = settings.lease * SETTLE_LEASES;
            tracing::warn!(
                ?settle,
                "this broker was silent past its lease (paused, or cut off \
                from the database): the groups it lost stay with the brokers that took them, \
                and it takes none for a while"
            );
            settle_until = Some(started + settle);
        }
        let settling = settle_until.is_some_and(|until| started < until);
        let turn = tokio::time::timeout(period.max(Duration::from_millis(100)), async {
            // Settling, it says it is leaving: the others take its groups
            // and hand it none.
            let mut view = store
                .lease_view(&settings.broker_id, &settings.advertise, settling)
                .await?;
            let alone = settling && !others_serve(&settings.broker_id, &view, lease_ms);
            if alone {
                // Nobody else serves the groups: this broker does.
                for b in view.brokers.iter_mut() {
                    if b.id == settings.broker_id {
                        b.leaving = false;
                    }
                }
            }
            let changes = plan(&settings.broker_id, &view, lease_ms);
            let held = store
                .apply_leases(&settings.broker_id, lease_ms, changes)
                .await?;
            let marks = store.group_marks().await?;
            Ok::<_, StoreError>((view, held, alone, marks))
        })
        .await;
        match turn {
            Ok(Ok((view, held, alone, new_marks))) => {
                last_turn = Some(started);
                if alone {
                    settle_until = None;
                }
                valid_until = started + settings.lease - settings.lease / 5;
                let names: BTreeMap<i64, String> = view.groups.iter().cloned().collect();
                let addresses: BTreeMap<&str, &str> = view
                    .brokers
                    .iter()
                    .map(|b| (b.id.as_str(), b.address.as_str()))
                    .collect();
                let mut mine = Mine::new();
                let mut elsewhere = BTreeMap::new();
                for (num, name) in &names {
                    let Ok(group) = name.parse::<GroupName>() else {
                        continue;
                    };
                    if held.contains_key(num) {
                        mine.insert(*num, group);
                    } else if let Some(addr) = view
                        .leases
                        .iter()
                        .find(|l| l.group_num == *num && l.expires_at > view.now)
                        .and_then(|l| l.owner.as_deref())
                        .filter(|o| *o != settings.broker_id)
                        .and_then(|o| addresses.get(o))
                    {
                        elsewhere.insert(group, (*addr).to_owned());
                    }
                }
                store.fences().set(held);
                // Groups kept whose row changed (an operator's verb through
                // another broker, which could not tell this one's actors).
                let changed: Vec<GroupName> = ownership
                    .mine()
                    .into_iter()
                    .filter(|g| mine.values().any(|m| m == g))
                    .filter(|g| {
                        marks
                            .get(g.as_str())
                            .is_some_and(|m| new_marks.get(g.as_str()) != Some(m))
                    })
                    .collect();
                marks = new_marks;
                owned.change(mine, elsewhere).await;
                for group in changed {
                    tracing::info!(%group, "group changed: its actor follows");
                    if let Err(e) = actors.sync(group.as_str()).await {
                        tracing::warn!(%group, error = %e, "follow a change of an owned group");
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "renew group leases"),
            Err(_) => tracing::warn!(?period, "renew group leases: the database did not answer"),
        }
        if Instant::now() >= valid_until && !ownership.mine().is_empty() {
            tracing::error!(
                "group leases could not be renewed in time: this broker stops acting for its \
                 groups until it holds their leases again"
            );
            store.fences().set(Default::default());
            owned.change(Mine::new(), BTreeMap::new()).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(started + period) => {}
            // A new group: take its lease now if it falls to this broker,
            // not up to a third of the lease later.
            _ = ownership.leases_wanted() => {}
        }
    }
    // Graceful hand-over: the others take these groups at their next turn.
    owned.change(Mine::new(), BTreeMap::new()).await;
    store.fences().set(Default::default());
    match store.leave_cluster(&settings.broker_id).await {
        Ok(()) => tracing::info!("group leases handed over"),
        Err(e) => tracing::warn!(error = %e, "hand the group leases over (they expire instead)"),
    }
}

/// What changes with the owned groups.
struct OwnedGroups<'a> {
    ownership: &'a Ownership,
    actors: &'a GroupActors,
    registry: &'a Registry,
}

impl OwnedGroups<'_> {
    /// Makes `mine` the owned groups: actors of groups gained start; those
    /// of groups lost stop, and their agents are sent away (they reconnect
    /// and are redirected to the new owner).
    async fn change(&self, mine: Mine, elsewhere: BTreeMap<GroupName, String>) {
        let before = self.ownership.mine();
        self.ownership.set(&mine, elsewhere);
        let mine: BTreeSet<GroupName> = mine.into_values().collect();
        for lost in before.difference(&mine) {
            tracing::info!(group = %lost, "group lease lost or handed over: its actor stops");
            self.actors.stop(lost);
            for (resource, _, _) in self.registry.members(lost) {
                self.registry.dismiss(
                    &resource,
                    Refusal {
                        code: RefusalCode::NotOwner,
                        message: format!(
                            "this broker no longer owns group {lost}: reconnect to be sent to \
                             its owner"
                        ),
                    },
                );
            }
        }
        for gained in mine.difference(&before) {
            tracing::info!(group = %gained, "group lease taken: its actor starts");
            if let Err(e) = self.actors.sync(gained.as_str()).await {
                tracing::warn!(group = %gained, error = %e, "start the actor of an owned group");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BrokerRow, LeaseRow};

    fn broker(id: &str, seen_at: i64) -> BrokerRow {
        BrokerRow {
            id: id.into(),
            address: format!("{id}:4433"),
            seen_at,
            leaving: false,
        }
    }

    fn view(brokers: Vec<BrokerRow>, leases: Vec<LeaseRow>, groups: i64) -> LeaseView {
        LeaseView {
            now: 100_000,
            brokers,
            groups: (1..=groups).map(|n| (n, format!("g{n}"))).collect(),
            leases,
        }
    }

    fn lease(num: i64, owner: Option<&str>, epoch: i64, expires_at: i64) -> LeaseRow {
        LeaseRow {
            group_num: num,
            owner: owner.map(str::to_owned),
            epoch,
            expires_at,
        }
    }

    #[test]
    fn groups_spread_over_the_live_brokers_and_a_leaving_one_moves_only_its_share() {
        let three = ["a", "b", "c"];
        let owners: Vec<_> = (1..=300).map(|g| owner_for(g, &three)).collect();
        for b in three {
            let n = owners.iter().filter(|o| **o == Some(b)).count();
            assert!((60..=140).contains(&n), "{b} owns {n} of 300");
        }
        let two = ["a", "b"];
        for g in 1..=300 {
            let before = owner_for(g, &three);
            let after = owner_for(g, &two);
            if before != Some("c") {
                assert_eq!(before, after, "group {g} moved though its owner stayed");
            }
        }
        assert_eq!(owner_for(1, &[]), None);
    }

    #[test]
    fn a_free_or_expired_lease_is_taken_by_its_broker_only() {
        let brokers = vec![broker("a", 100_000), broker("b", 99_000)];
        let v = view(brokers, vec![lease(2, Some("x"), 7, 99_999)], 2);
        let live = ["a", "b"];
        for me in live {
            let changes = plan(me, &v, 10_000);
            for (num, epoch) in [(1, 0), (2, 7)] {
                let take = LeaseChange::Acquire {
                    group_num: num,
                    seen_epoch: epoch,
                };
                assert_eq!(
                    changes.contains(&take),
                    owner_for(num, &live) == Some(me),
                    "{me} {num}: {changes:?}"
                );
            }
        }
    }

    #[test]
    fn a_held_lease_is_renewed_by_its_owner_and_left_alone_by_the_others() {
        let brokers = vec![broker("a", 100_000), broker("b", 100_000)];
        let owner = owner_for(1, &["a", "b"]).expect("owner");
        let other = if owner == "a" { "b" } else { "a" };
        let v = view(brokers, vec![lease(1, Some(owner), 3, 105_000)], 1);
        assert_eq!(
            plan(owner, &v, 10_000),
            vec![LeaseChange::Renew {
                group_num: 1,
                epoch: 3
            }]
        );
        assert_eq!(plan(other, &v, 10_000), vec![]);
    }

    #[test]
    fn a_lease_that_falls_to_another_live_broker_is_handed_over() {
        let joined = ["a", "b"];
        // A group that moves to b when b joins.
        let num = (1..100)
            .find(|g| owner_for(*g, &joined) == Some("b"))
            .expect("some group moves to b");
        let brokers = vec![broker("a", 100_000), broker("b", 100_000)];
        let v = view(brokers, vec![lease(num, Some("a"), 4, 105_000)], num);
        assert!(plan("a", &v, 10_000).contains(&LeaseChange::Release {
            group_num: num,
            epoch: 4
        }));
        // b waits until a let it go.
        assert!(!plan("b", &v, 10_000)
            .iter()
            .any(|c| matches!(c, LeaseChange::Acquire { group_num, .. } if *group_num == num)));
    }

    #[test]
    fn a_broker_back_from_silence_settles_only_while_another_serves() {
        let mut settling = broker("a", 100_000);
        settling.leaving = true;
        let others = |b: Vec<BrokerRow>| {
            let mut all = vec![settling.clone()];
            all.extend(b);
            others_serve("a", &view(all, vec![], 1), 10_000)
        };
        assert!(others(vec![broker("b", 99_000)]));
        assert!(!others(vec![]));
        // Silent, or settling too: nobody serves.
        let mut leaving = broker("b", 100_000);
        leaving.leaving = true;
        assert!(!others(vec![broker("b", 89_000)]));
        assert!(!others(vec![leaving]));
        // A settling broker takes nothing and gives back what it holds.
        let v = view(
            vec![settling.clone(), broker("b", 100_000)],
            vec![lease(1, Some("a"), 2, 105_000)],
            3,
        );
        assert_eq!(
            plan("a", &v, 10_000),
            vec![LeaseChange::Release {
                group_num: 1,
                epoch: 2
            }]
        );
    }

    #[test]
    fn a_silent_or_leaving_broker_is_not_live() {
        let mut leaving = broker("b", 100_000);
        leaving.leaving = true;
        for b in [broker("b", 89_000), leaving] {
            let v = view(vec![broker("a", 100_000), b], vec![], 20);
            let changes = plan("a", &v, 10_000);
            assert_eq!(changes.len(), 20, "a takes every group: {changes:?}");
        }
    }
}
