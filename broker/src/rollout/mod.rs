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
}

impl Default for Board {
    fn default() -> Board {
        Board {
            inner: Arc::new(BoardInner {
                wake: watch::Sender::new(0),
                images: Mutex::default(),
            }),
        }
    }
}

impl Board {
    /// Tells the rollout timer and every running rollout to look again.
    pub fn wake(&self) {
        self.inner.wake.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A receiver that sees a new value after every [`Board::wake`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.wake.subscribe()
    }

    fn images(&self) -> std::sync::MutexGuard<'_, HashMap<GroupName, ImageProgress>> {
        // Each update is one insert or remove: a panic cannot leave it half done.
        self.inner
            .images
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
