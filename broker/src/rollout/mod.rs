//! Rollouts: a group's image update (`group update-image`) and its OTA
//! rollouts. Both do the same steps (warn, wait for a deadline, disconnect,
//! command, confirm, record each host's outcome, resume after a restart),
//! so they are one machine driven the same way:
//!
//! - [`machine`]: the sans-IO step machine (observations, answers and `now`
//!   in; commands, records, what the group's actor is told and the next
//!   deadline out), an image update being a rollout of kind `image`.
//! - [`driver`]: one task per running rollout feeds it from the registry,
//!   the group's actor and the store and carries its outputs out; the
//!   rollout timer ([`run`]) starts OTA schedules at their start and image
//!   updates as soon as they are recorded, and resumes running ones after a
//!   broker restart.
//! - [`image`]: `group update-image` and `group show`'s versions.
//! - Their rows: [`crate::store::rollouts`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferry_common::GroupName;
use tokio::sync::watch;

pub mod driver;
pub mod image;
pub mod machine;

pub use driver::run;
pub use machine::{HostStep, ImageProgress, Rollout, Settings};

/// What the admin side and the rollout tasks share: the wake of the rollout
/// timer and of running rollouts, and the image updates' progress as
/// `group show` has it. Cheap to clone.
#[derive(Clone)]
pub struct Board {
    inner: Arc<BoardInner>,
}

struct BoardInner {
    /// Bumped after every change of rollouts' rows or of a group's status.
    wake: watch::Sender<u64>,
    /// Each running image update's progress, by group. A std mutex: only
    /// map reads and writes under it.
    images: Mutex<HashMap<GroupName, ImageProgress>>,
    /// How many rollouts run on each group (their tasks say so).
    rolling: Mutex<HashMap<GroupName, usize>>,
}

impl Default for Board {
    fn default() -> Board {
        Board {
            inner: Arc::new(BoardInner {
                wake: watch::Sender::new(0),
                images: Mutex::default(),
                rolling: Mutex::default(),
            }),
        }
    }
}

impl Board {
    /// Tells the rollout timer and every running rollout to look again.
    pub fn wake(&self) {
        self.inner.wake.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A session of `group` ended: a rollout running on the group (it may
    /// wait for a drained host's sessions to end) looks again now; with
    /// none running nothing is woken, so session ends cost nothing here.
    pub fn session_ended(&self, group: &GroupName) {
        let running = lock(&self.inner.rolling).contains_key(group);
        if running {
            self.wake();
        }
    }

    /// A rollout of `group` starts (`true`) or stops running.
    fn rolling(&self, group: &GroupName, running: bool) {
        let mut rolling = lock(&self.inner.rolling);
        let n = rolling.entry(group.clone()).or_default();
        *n = if running { *n + 1 } else { n.saturating_sub(1) };
        if *n == 0 {
            rolling.remove(group);
        }
    }

    /// A receiver that sees a new value after every [`Board::wake`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.wake.subscribe()
    }

    fn images(&self) -> std::sync::MutexGuard<'_, HashMap<GroupName, ImageProgress>> {
        lock(&self.inner.images)
    }

    /// The image update running on `group`, with each host's step.
    pub fn image(&self, group: &GroupName) -> Option<ImageProgress> {
        self.images().get(group).cloned()
    }

    /// Sets (or, with `None`, clears) the progress of `group`'s image update.
    fn set_image(&self, group: &GroupName, progress: Option<ImageProgress>) {
        let mut images = self.images();
        match progress {
            Some(p) => images.insert(group.clone(), p),
            None => images.remove(group),
        };
    }
}

/// Locks one of the board's maps. Each change under it is one insert,
/// update or remove: a panic cannot leave it half done.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
