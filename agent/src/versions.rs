//! What the host runs, kept durably in `state_dir/versions.json`: the image
//! version after an image switch, the versions of the components OTA updates
//! brought, the update in progress and how the last one ended.
//!
//! Every change replaces the file atomically (temp file, fsync, rename, fsync
//! of the directory, as [`crate::policy`] does) before the command is
//! answered, so the broker never sees a version the host would forget.
//!
//! An update is recorded as pending before its hook runs. An update of the
//! agent itself ends with the service restarting (the hook installs the
//! package and restarts it), so its outcome is settled by the next process:
//! [`VersionStore::open`] finds the pending update and compares its own
//! version with the target. Any other update found pending was cut short by
//! a crash or a restart and is reported failed. The ids of the last
//! [`MAX_SUCCEEDED`] successful updates are kept so a replayed `ApplyUpdate`
//! is answered without running the hook again.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use ferry_common::limits::{MAX_INVENTORY_COMPONENTS, MAX_TEXT_LEN};
use ferry_common::wire::{CommandOutcome, ComponentVersion, Inventory, UpdateReport};
use serde::{Deserialize, Serialize};

use crate::policy::write_atomically;

/// File name in the state directory.
pub const VERSIONS_FILE: &str = "versions.json";

/// Component name of the agent itself.
pub const COMPONENT_AGENT: &str = "agent";

/// Component name of the host's image: an update of it sets the image version.
pub const COMPONENT_IMAGE: &str = "image";

/// Successful update ids remembered for replays.
pub const MAX_SUCCEEDED: usize = 64;

/// Most bytes read back from the file: every field at its limit, with room.
const MAX_VERSIONS_FILE_LEN: u64 =
    ((MAX_INVENTORY_COMPONENTS * 2 + 16) * (MAX_TEXT_LEN + 64) + MAX_SUCCEEDED * 24) as u64;

#[derive(Debug, thiserror::Error)]
pub enum VersionsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a versions file this agent wrote: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("{field} is {len} bytes; the limit is {MAX_TEXT_LEN}")]
    TooLong { field: &'static str, len: usize },
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("the host already has {MAX_INVENTORY_COMPONENTS} components; {0} would be one more")]
    TooManyComponents(String),
}

/// How an update ended, as kept on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Done,
    Failed(String),
}

/// An update, as kept on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRecord {
    /// `Command::ApplyUpdate::update`.
    pub update: u64,
    pub component: String,
    pub version: String,
}

/// The file's content.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct VersionsFile {
    /// Image version after the last switch or image update; `None`: the
    /// config's `image_version`.
    image_version: Option<String>,
    /// Components updated by OTA, by name.
    components: BTreeMap<String, String>,
    /// The update whose hook is running (or was when the agent stopped).
    pending: Option<UpdateRecord>,
    /// The last update that ended, and how.
    last_update: Option<(UpdateRecord, Outcome)>,
    /// Ids of the last successful updates, oldest first.
    succeeded: VecDeque<u64>,
}

/// The host's versions, shared by the command tasks and the link.
#[derive(Clone, Debug)]
pub struct VersionStore {
    /// `state_dir/versions.json`.
    path: PathBuf,
    /// The config's `image_version`, used until an image switch.
    configured_image: String,
    /// The running agent's version.
    agent_version: String,
    /// The file's content; every change is written before it is kept here.
    /// Held only in blocking code.
    state: Arc<Mutex<VersionsFile>>,
}

impl VersionStore {
    /// Reads the file (none: nothing switched or updated yet) and settles an
    /// update left pending by the previous process. Blocking.
    pub fn open(
        state_dir: &Path,
        configured_image: String,
        agent_version: &str,
    ) -> Result<VersionStore, VersionsError> {
        let path = state_dir.join(VERSIONS_FILE);
        let state = match read_file(&path) {
            Err(e @ VersionsError::Corrupt { .. }) => {
                // Refusing to start would keep the host out of service for
                // good; the versions fall back to the config's and the file
                // is replaced at the next change.
                tracing::error!(error = %e, "versions file unreadable; starting from the configured versions");
                VersionsFile::default()
            }
            other => other?,
        };
        let store = VersionStore {
            path,
            configured_image,
            agent_version: agent_version.to_owned(),
            state: Arc::new(Mutex::new(state)),
        };
        store.settle_pending()?;
        Ok(store)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, VersionsFile> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The running agent's version.
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    /// The image the host runs now.
    pub fn image_version(&self) -> String {
        self.state()
            .image_version
            .clone()
            .unwrap_or_else(|| self.configured_image.clone())
    }

    /// What the host runs, for the broker.
    pub fn inventory(&self) -> Inventory {
        let s = self.state();
        Inventory {
            agent_version: self.agent_version.clone(),
            image_version: s
                .image_version
                .clone()
                .unwrap_or_else(|| self.configured_image.clone()),
            components: s
                .components
                .iter()
                .take(MAX_INVENTORY_COMPONENTS)
                .map(|(name, version)| ComponentVersion {
                    name: name.clone(),
                    version: version.clone(),
                })
                .collect(),
            last_update: s.last_update.as_ref().map(|(u, o)| UpdateReport {
                update: u.update,
                component: u.component.clone(),
                version: u.version.clone(),
                outcome: match o {
                    Outcome::Done => CommandOutcome::Done,
                    Outcome::Failed(why) => CommandOutcome::Failed(why.clone()),
                },
            }),
        }
    }

    /// Whether update `update` already succeeded on this host.
    pub fn succeeded(&self, update: u64) -> bool {
        self.state().succeeded.contains(&update)
    }

    /// The update whose hook is running, if any.
    pub fn pending(&self) -> Option<UpdateRecord> {
        self.state().pending.clone()
    }

    /// Applies `change` to a copy, writes it durably, then keeps it.
    fn change(&self, change: impl FnOnce(&mut VersionsFile)) -> Result<(), VersionsError> {
        let mut s = self.state();
        let mut next = s.clone();
        change(&mut next);
        let mut bytes = serde_json::to_vec_pretty(&next).map_err(|e| VersionsError::Corrupt {
            path: self.path.clone(),
            why: e.to_string(),
        })?;
        bytes.push(b'\n');
        write_atomically(&self.path, &bytes, ferry_process::files::PRIVATE).map_err(
            |e| match e {
                crate::policy::PolicyError::Io { op, path, source } => {
                    VersionsError::Io { op, path, source }
                }
                other => VersionsError::Corrupt {
                    path: self.path.clone(),
                    why: other.to_string(),
                },
            },
        )?;
        *s = next;
        Ok(())
    }

    /// Records the image the host switched to. Blocking.
    pub fn set_image(&self, image: &str) -> Result<(), VersionsError> {
        check_text("image", image)?;
        self.change(|s| s.image_version = Some(image.to_owned()))
    }

    /// Checks an update and records it as pending before its hook runs.
    /// Blocking.
    pub fn begin_update(&self, update: &UpdateRecord) -> Result<(), VersionsError> {
        check_text("component", &update.component)?;
        check_text("version", &update.version)?;
        let new_component = update.component != COMPONENT_AGENT
            && update.component != COMPONENT_IMAGE
            && !self.state().components.contains_key(&update.component);
        if new_component && self.state().components.len() >= MAX_INVENTORY_COMPONENTS {
            return Err(VersionsError::TooManyComponents(update.component.clone()));
        }
        self.change(|s| s.pending = Some(update.clone()))
    }

    /// The update's hook succeeded: the component now runs its version. For
    /// the agent itself this is only called once the running agent is the
    /// target version. Blocking.
    pub fn finish_update(&self, update: &UpdateRecord) -> Result<(), VersionsError> {
        self.change(|s| {
            match update.component.as_str() {
                COMPONENT_AGENT => {}
                COMPONENT_IMAGE => s.image_version = Some(update.version.clone()),
                name => {
                    s.components.insert(name.to_owned(), update.version.clone());
                }
            }
            succeed(s, update);
        })
    }

    /// The update failed (its hook, or the restart of an agent update).
    /// Blocking.
    pub fn fail_update(&self, update: &UpdateRecord, why: &str) -> Result<(), VersionsError> {
        let mut why = why.to_owned();
        crate::health::truncate(&mut why, MAX_TEXT_LEN);
        self.change(|s| {
            if s.pending
                .as_ref()
                .is_some_and(|p| p.update == update.update)
            {
                s.pending = None;
            }
            s.last_update = Some((update.clone(), Outcome::Failed(why)));
        })
    }

    /// Settles the update the previous process left pending.
    fn settle_pending(&self) -> Result<(), VersionsError> {
        let Some(pending) = self.pending() else {
            return Ok(());
        };
        if pending.component == COMPONENT_AGENT {
            if pending.version == self.agent_version {
                tracing::info!(update = pending.update, version = %pending.version, "agent update done: running the new version");
                return self.finish_update(&pending);
            }
            let why = format!(
                "the agent restarted at version {}, not {}",
                self.agent_version, pending.version
            );
            tracing::error!(update = pending.update, "agent update failed: {why}");
            return self.fail_update(&pending, &why);
        }
        let why = "the agent stopped while the update hook was running";
        tracing::error!(update = pending.update, component = %pending.component, "update failed: {why}");
        self.fail_update(&pending, why)
    }
}

fn succeed(s: &mut VersionsFile, update: &UpdateRecord) {
    if s.pending
        .as_ref()
        .is_some_and(|p| p.update == update.update)
    {
        s.pending = None;
    }
    s.last_update = Some((update.clone(), Outcome::Done));
    if !s.succeeded.contains(&update.update) {
        if s.succeeded.len() >= MAX_SUCCEEDED {
            s.succeeded.pop_front();
        }
        s.succeeded.push_back(update.update);
    }
}

fn check_text(field: &'static str, text: &str) -> Result<(), VersionsError> {
    if text.is_empty() {
        return Err(VersionsError::Empty { field });
    }
    if text.len() > MAX_TEXT_LEN {
        return Err(VersionsError::TooLong {
            field,
            len: text.len(),
        });
    }
    Ok(())
}

/// Reads the file with a byte limit; a missing file is an empty state.
fn read_file(path: &Path) -> Result<VersionsFile, VersionsError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(VersionsFile::default()),
        Err(source) => {
            return Err(VersionsError::Io {
                op: "open",
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_VERSIONS_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| VersionsError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > MAX_VERSIONS_FILE_LEN {
        return Err(VersionsError::Corrupt {
            path: path.to_owned(),
            why: format!("longer than {MAX_VERSIONS_FILE_LEN} bytes"),
        });
    }
    let mut state: VersionsFile =
        serde_json::from_slice(&bytes).map_err(|e| VersionsError::Corrupt {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
    while state.succeeded.len() > MAX_SUCCEEDED {
        state.succeeded.pop_front();
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(update: u64, component: &str, version: &str) -> UpdateRecord {
        UpdateRecord {
            update,
            component: component.into(),
            version: version.into(),
        }
    }

    #[test]
    fn switches_and_updates_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let open = || VersionStore::open(dir.path(), "img-1".into(), "1.0.0").unwrap();
        let v = open();
        assert_eq!(v.image_version(), "img-1");
        assert_eq!(
            v.inventory(),
            Inventory {
                agent_version: "1.0.0".into(),
                image_version: "img-1".into(),
                components: vec![],
                last_update: None,
            }
        );
        v.set_image("img-2").unwrap();
        let u = rec(7, "office", "2.1");
        v.begin_update(&u).unwrap();
        assert_eq!(v.pending(), Some(u.clone()));
        v.finish_update(&u).unwrap();
        v.finish_update(&rec(8, "image", "img-3")).unwrap();
        let inv = open().inventory();
        assert_eq!(inv.image_version, "img-3");
        assert_eq!(
            inv.components,
            [ComponentVersion {
                name: "office".into(),
                version: "2.1".into()
            }]
        );
        assert_eq!(
            inv.last_update,
            Some(UpdateReport {
                update: 8,
                component: "image".into(),
                version: "img-3".into(),
                outcome: CommandOutcome::Done
            })
        );
        let again = open();
        assert!(again.succeeded(7) && again.succeeded(8) && !again.succeeded(9));
        assert_eq!(again.pending(), None);
    }

    #[test]
    fn an_agent_update_is_settled_by_the_next_process() {
        let dir = tempfile::tempdir().unwrap();
        let v = VersionStore::open(dir.path(), "i".into(), "1.0.0").unwrap();
        v.begin_update(&rec(3, "agent", "1.1.0")).unwrap();
        // Restarted at the target version: done, and remembered.
        let v = VersionStore::open(dir.path(), "i".into(), "1.1.0").unwrap();
        assert_eq!(v.pending(), None);
        assert!(v.succeeded(3));
        assert_eq!(
            v.inventory().last_update.map(|r| r.outcome),
            Some(CommandOutcome::Done)
        );
        // Restarted at the old version: failed, naming both.
        v.begin_update(&rec(4, "agent", "1.2.0")).unwrap();
        let v = VersionStore::open(dir.path(), "i".into(), "1.1.0").unwrap();
        assert!(!v.succeeded(4));
        let last = v.inventory().last_update.unwrap();
        assert_eq!(last.update, 4);
        assert!(
            matches!(&last.outcome, CommandOutcome::Failed(m) if m.contains("1.1.0") && m.contains("1.2.0")),
            "{last:?}"
        );
        // Another component left pending was cut short.
        v.begin_update(&rec(5, "office", "3")).unwrap();
        let v = VersionStore::open(dir.path(), "i".into(), "1.1.0").unwrap();
        assert!(matches!(
            v.inventory().last_update.unwrap().outcome,
            CommandOutcome::Failed(_)
        ));
        assert!(v.inventory().components.is_empty());
    }

    #[test]
    fn limits_are_checked_before_anything_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let v = VersionStore::open(dir.path(), "i".into(), "1").unwrap();
        assert!(matches!(
            v.set_image(&"x".repeat(MAX_TEXT_LEN + 1)),
            Err(VersionsError::TooLong { field: "image", .. })
        ));
        assert!(matches!(
            v.begin_update(&rec(1, "", "1")),
            Err(VersionsError::Empty { .. })
        ));
        for i in 0..MAX_INVENTORY_COMPONENTS {
            v.finish_update(&rec(i as u64, &format!("c{i}"), "1"))
                .unwrap();
        }
        assert!(matches!(
            v.begin_update(&rec(1000, "one-more", "1")),
            Err(VersionsError::TooManyComponents(_))
        ));
        // An existing component and the agent itself still update.
        v.begin_update(&rec(1001, "c0", "2")).unwrap();
        v.begin_update(&rec(1002, "agent", "2")).unwrap();
        // Only the last MAX_SUCCEEDED ids are remembered.
        assert!(v.succeeded(0));
        for i in 0..MAX_SUCCEEDED as u64 {
            v.finish_update(&rec(2000 + i, "c0", "3")).unwrap();
        }
        assert!(!v.succeeded(0) && v.succeeded(2000));
        assert_eq!(v.inventory().components.len(), MAX_INVENTORY_COMPONENTS);
    }

    #[test]
    fn a_damaged_file_falls_back_to_the_config_and_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(VERSIONS_FILE);
        std::fs::write(&path, "{not json").unwrap();
        let err = read_file(&path).unwrap_err();
        assert!(err.to_string().contains(VERSIONS_FILE), "{err}");
        let v = VersionStore::open(dir.path(), "img-1".into(), "1").unwrap();
        assert_eq!(v.image_version(), "img-1");
        v.set_image("img-2").unwrap();
        let v = VersionStore::open(dir.path(), "img-1".into(), "1").unwrap();
        assert_eq!(v.image_version(), "img-2");
    }
}
