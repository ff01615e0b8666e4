//! The console's live figures: each group served here is read from its
//! actor once a [`SAMPLE_EVERY`], and a point is kept when its figures
//! change (with the last seen time, so a flat stretch costs nothing). Pages
//! wait on [`Live::changed`] to push a new chart the moment the group moves.
//!
//! Bounded: at most [`MAX_GROUPS`] groups and [`MAX_POINTS`] points each
//! (the oldest dropped first).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use ferry_common::admin::{AdminRequestV1, AdminResponseV1, GroupFilter, LiveGroupView};
use ferry_common::{GroupName, UnixMillis};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminContext};
use crate::cluster::Owner;

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
    pub fn of(live: &LiveGroupView) -> Figures {
        let sessions: u64 = live.resources.iter().map(|r| r.sessions.len() as u64).sum();
        let count = |state: &str| live.resources.iter().filter(|r| r.state == state).count() as u64;
        Figures {
            sessions,
            waiting: live.demand.saturating_sub(sessions),
            capacity: live.capacity,
            ready: count("ready"),
            pending: count("pending"),
            releasing: count("releasing"),
            demand: live.demand,
            threshold: live.usage_threshold,
        }
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

/// The followed groups' histories, and a counter that moves whenever one
/// of them changes.
pub struct Live {
    histories: Mutex<BTreeMap<GroupName, History>>,
    changes: watch::Sender<u64>,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            histories: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
        }
    }
}

impl Live {
    fn histories(&self) -> std::sync::MutexGuard<'_, BTreeMap<GroupName, History>> {
        self.histories
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of one group's history.
    pub fn history(&self, group: &GroupName) -> Option<History> {
        self.histories().get(group).cloned()
    }

    /// The newest figures of every followed group.
    pub fn latest(&self) -> BTreeMap<GroupName, Figures> {
        self.histories()
            .iter()
            .filter_map(|(g, h)| h.points.back().map(|p| (g.clone(), p.figures.clone())))
            .collect()
    }

    /// Wakes when any group's figures change.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Keeps what was read at `at`; forgets groups no longer served here.
    pub fn record(&self, at: UnixMillis, read: Vec<(GroupName, Figures)>) {
        let mut changed = false;
        {
            let mut histories = self.histories();
            let served: std::collections::BTreeSet<&GroupName> =
                read.iter().map(|(g, _)| g).collect();
            let before = histories.len();
            histories.retain(|g, _| served.contains(g));
            changed |= histories.len() != before;
            for (group, figures) in read {
                if histories.len() >= MAX_GROUPS && !histories.contains_key(&group) {
                    continue;
                }
                changed |= histories.entry(group).or_default().record(at, figures);
            }
        }
        if changed {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
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
        let read = read_groups(&ctx).await;
        live.record(ctx.groups.service().now(), read);
    }
}

/// The live figures of the groups whose actors run on this broker.
async fn read_groups(ctx: &AdminContext) -> Vec<(GroupName, Figures)> {
    let groups = match admin::handle(ctx, AdminRequestV1::GroupList(GroupFilter::default())).await {
        AdminResponseV1::Groups(gs) => gs,
        other => {
            tracing::debug!(?other, "console: group list failed");
            return Vec::new();
        }
    };
    let mut read = Vec::new();
    for g in groups
        .into_iter()
        .filter(|g| g.status != "gone")
        .take(MAX_GROUPS)
    {
        if matches!(ctx.groups.actors().ownership().owner(&g.name), Owner::At(_)) {
            continue;
        }
        if let AdminResponseV1::GroupShown {
            live: Some(live), ..
        } = admin::handle(
            ctx,
            AdminRequestV1::GroupShow {
                group: g.name.clone(),
            },
        )
        .await
        {
            read.push((g.name, Figures::of(&live)));
        }
    }
    read
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
    fn a_change_wakes_watchers_and_gone_groups_are_forgotten() {
        let live = Live::default();
        let mut rx = live.changed();
        let g: GroupName = "g1".parse().expect("name");
        live.record(UnixMillis(1), vec![(g.clone(), figures(1))]);
        assert!(rx.has_changed().expect("open"));
        rx.mark_unchanged();
        live.record(UnixMillis(2), vec![(g.clone(), figures(1))]);
        assert!(!rx.has_changed().expect("open"));
        live.record(UnixMillis(3), Vec::new());
        assert!(rx.has_changed().expect("open"));
        assert!(live.history(&g).is_none());
    }
}
