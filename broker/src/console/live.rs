//! The console's live figures: each group whose actor runs here is asked
//! for its view once a [`SAMPLE_EVERY`] (a message to the actor, no store
//! access), and a point is kept when its figures change (with the last seen
//! time, so a flat stretch costs nothing). A group's page waits on its own
//! group's counter ([`Live::changed`]) to push a new chart the moment the
//! group moves.
//!
//! A group whose actor does not answer keeps its history (an actor
//! restarting, a turn taking long); a group is forgotten only once no actor
//! of it runs here. Bounded: at most [`MAX_GROUPS`] groups and
//! [`MAX_POINTS`] points each (the oldest dropped first).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use ferry_common::admin::LiveGroupView;
use ferry_common::{GroupName, UnixMillis};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::AdminContext;
use crate::groups::actor::GroupView;

/// How often a group's live state is read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Groups followed at once.
pub const MAX_GROUPS: usize = 256;
/// Points kept per group.
pub const MAX_POINTS: usize = 4096;

/// A group's figures at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Figures {
    pub sessions: u64,
    pub waiting: u64,
    /// Session slots of ready, available and pending resources.
    pub capacity: u64,
    pub ready: u64,
    pub pending: u64,
    pub releasing: u64,
    pub demand: u64,
    /// Percent that triggers a scale-out.
    pub threshold: u32,
}

impl Figures {
    /// The figures of a group's live view as `group show` gives it.
    pub fn of(live: &LiveGroupView) -> Figures {
        let resources = live
            .resources
            .iter()
            .map(|r| (r.state.as_str(), r.sessions.len()));
        Figures::counted(resources, live.demand, live.capacity, live.usage_threshold)
    }

    /// The figures of an actor's view.
    pub fn of_view(v: &GroupView) -> Figures {
        let states: Vec<String> = v.resources.iter().map(|r| r.state.to_string()).collect();
        let resources = states
            .iter()
            .zip(&v.resources)
            .map(|(state, r)| (state.as_str(), r.sessions.len()));
        Figures::counted(resources, v.demand, v.capacity, v.usage_threshold)
    }

    /// The figures of resources given as (state, sessions on it).
    fn counted<'a>(
        resources: impl Iterator<Item = (&'a str, usize)>,
        demand: u64,
        capacity: u64,
        threshold: u32,
    ) -> Figures {
        let mut f = Figures {
            sessions: 0,
            waiting: 0,
            capacity,
            ready: 0,
            pending: 0,
            releasing: 0,
            demand,
            threshold,
        };
        for (state, sessions) in resources {
            f.sessions += sessions as u64;
            match state {
                "ready" => f.ready += 1,
                "pending" => f.pending += 1,
                "releasing" => f.releasing += 1,
                _ => {}
            }
        }
        f.waiting = demand.saturating_sub(f.sessions);
        f
    }
}

/// One kept point: the figures from `at` until the next point (or `seen`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Point {
    pub at: UnixMillis,
    pub figures: Figures,
}

/// A group's kept points and when it was last read.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub points: VecDeque<Point>,
    pub seen: Option<UnixMillis>,
}

impl History {
    /// Keeps `figures` seen at `at`: a new point when they changed.
    /// Returns whether they did.
    pub fn record(&mut self, at: UnixMillis, figures: Figures) -> bool {
        self.seen = Some(at);
        if self.points.back().map(|p| &p.figures) == Some(&figures) {
            return false;
        }
        if self.points.len() >= MAX_POINTS {
            self.points.pop_front();
        }
        self.points.push_back(Point { at, figures });
        true
    }
}

/// One followed group: its history and a counter that moves when its
/// figures change (or when it stops being followed).
struct Followed {
    history: History,
    changes: watch::Sender<u64>,
}

impl Default for Followed {
    fn default() -> Self {
        Followed {
            history: History::default(),
            changes: watch::channel(0).0,
        }
    }
}

/// The followed groups.
#[derive(Default)]
pub struct Live {
    histories: Mutex<BTreeMap<GroupName, Followed>>,
}

impl Live {
    fn histories(&self) -> std::sync::MutexGuard<'_, BTreeMap<GroupName, Followed>> {
        self.histories
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of one group's history.
    pub fn history(&self, group: &GroupName) -> Option<History> {
        self.histories().get(group).map(|f| f.history.clone())
    }

    /// Wakes when `group`'s figures change; `None` when it is not
    /// followed here.
    pub fn changed(&self, group: &GroupName) -> Option<watch::Receiver<u64>> {
        self.histories().get(group).map(|f| f.changes.subscribe())
    }

    /// Keeps what was read at `at`. `running` are the groups whose actors
    /// run here: the others are forgotten (their watchers woken); a running
    /// group missing from `read` (its actor did not answer) keeps its
    /// history.
    pub fn record(&self, at: UnixMillis, running: &[GroupName], read: Vec<(GroupName, Figures)>) {
        let mut histories = self.histories();
        histories.retain(|g, f| {
            let keep = running.contains(g);
            if !keep {
                f.changes.send_modify(|n| *n = n.wrapping_add(1));
            }
            keep
        });
        for (group, figures) in read {
            if histories.len() >= MAX_GROUPS && !histories.contains_key(&group) {
                continue;
            }
            let followed = histories.entry(group).or_default();
            if followed.history.record(at, figures) {
                followed.changes.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }
}

/// Reads every group served here once a [`SAMPLE_EVERY`] until `shutdown`.
pub async fn follow(ctx: AdminContext, live: std::sync::Arc<Live>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let actors = ctx.groups.actors();
        let mut running = actors.running();
        running.truncate(MAX_GROUPS);
        let mut read = Vec::with_capacity(running.len());
        for group in &running {
            if let Ok(view) = actors.view(group).await {
                read.push((group.clone(), Figures::of_view(&view)));
            }
        }
        live.record(ctx.groups.service().now(), &running, read);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(sessions: u64) -> Figures {
        Figures {
            sessions,
            waiting: 0,
            capacity: 4,
            ready: 2,
            pending: 0,
            releasing: 0,
            demand: sessions,
            threshold: 80,
        }
    }

    #[test]
    fn a_point_is_kept_only_when_the_figures_change() {
        let mut h = History::default();
        assert!(h.record(UnixMillis(1), figures(1)));
        assert!(!h.record(UnixMillis(2), figures(1)));
        assert!(h.record(UnixMillis(3), figures(2)));
        assert_eq!(h.points.len(), 2);
        assert_eq!(h.seen, Some(UnixMillis(3)));
    }

    #[test]
    fn the_history_is_bounded() {
        let mut h = History::default();
        for i in 0..(MAX_POINTS as u64 + 10) {
            h.record(UnixMillis(i as i64), figures(i));
        }
        assert_eq!(h.points.len(), MAX_POINTS);
        assert_eq!(h.points.front().map(|p| p.figures.sessions), Some(10));
    }

    #[test]
    fn a_change_wakes_its_group_s_watchers_and_gone_groups_are_forgotten() {
        let live = Live::default();
        let g: GroupName = "g1".parse().expect("name");
        let other: GroupName = "g2".parse().expect("name");
        let both = [g.clone(), other.clone()];
        live.record(
            UnixMillis(1),
            &both,
            vec![(g.clone(), figures(1)), (other.clone(), figures(1))],
        );
        let mut rx = live.changed(&g).expect("followed");
        live.record(
            UnixMillis(2),
            &both,
            vec![(g.clone(), figures(1)), (other.clone(), figures(2))],
        );
        assert!(!rx.has_changed().expect("open"), "another group's change");
        live.record(UnixMillis(3), &both, vec![(g.clone(), figures(2))]);
        assert!(rx.has_changed().expect("open"));
        rx.mark_unchanged();
        // Its actor did not answer: the history stays.
        live.record(UnixMillis(4), &both, Vec::new());
        assert_eq!(live.history(&g).map(|h| h.points.len()), Some(2));
        assert!(!rx.has_changed().expect("open"));
        // No actor of it runs here any more: forgotten, watchers woken.
        live.record(UnixMillis(5), &[other], Vec::new());
        assert!(rx.has_changed().unwrap_or(true));
        assert!(live.history(&g).is_none());
    }
}
