//! The group policy the broker pushes (`Command::ApplyPolicy`), kept in one
//! file for the host's streaming server to read.
//!
//! The file is replaced atomically (temp file, fsync, rename, fsync of the
//! directory) before the command is acknowledged, so a host that crashes
//! right after holds either the old policy or the new one, never half of
//! one, and the broker never records a version the host does not have. It
//! holds the group and version beside the policy
//! (`{"group":..,"version":..,"policy":{..}}`) so a replayed older version is
//! recognised and acknowledged without going back in time.
//!
//! A version is applied only when the host's policy hook accepts it: the
//! hook reads the new file, and when it fails the previous file is put
//! back ([`PolicyStore::undo`]) unless a newer version replaced it
//! meanwhile. So the file, the limits the agent enforces and the version
//! the broker records as applied stay one version; the broker sends the
//! failed version again.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_common::limits::MAX_POLICY_DOCUMENT_LEN;
use ferry_common::GroupName;
use serde::{Deserialize, Serialize};

/// Most bytes read back from an existing policy file: the document plus the
/// group, version and pretty-printing around it. A larger file was not
/// written by this agent and is treated as unreadable.
const MAX_POLICY_FILE_LEN: u64 = MAX_POLICY_DOCUMENT_LEN as u64 * 2 + 4096;

/// Mode of the policy file: the host's streaming server, which may run as
/// another user, reads it; it holds no secret.
const POLICY_FILE_MODE: u32 = ferry_process::files::PUBLIC;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy document of {len} bytes is longer than the {max} allowed")]
    TooLong { len: usize, max: usize },
    #[error("policy document is not a JSON object: {0}")]
    NotAnObject(String),
    #[error("policy document's session part: {0}")]
    Session(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The file as written.
#[derive(Debug, Serialize, Deserialize)]
struct PolicyFile {
    /// Group whose policy this is.
    group: String,
    /// The group's policy version.
    version: u64,
    /// The document as the broker sent it.
    policy: serde_json::Value,
}

/// What [`PolicyStore::apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The file now holds this version (new, or the same one written again
    /// so the hook runs once more after an earlier failure).
    Written,
    /// The file already holds the newer version `have` of the same group; it
    /// is kept (a replayed or late command).
    Kept { have: u64 },
}

/// How to take back a version just written ([`PolicyStore::apply_undoable`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undo {
    group: String,
    version: u64,
    /// The file's bytes before; `None` when there was no file.
    previous: Option<Vec<u8>>,
}

/// The host's policy file.
#[derive(Clone, Debug)]
pub struct PolicyStore {
    /// Where the policy lives (config `policy_file`).
    path: PathBuf,
    /// Serialises read-compare-write: two commands may run at once and the
    /// older one must not overwrite the newer. Held only in blocking code.
    lock: Arc<Mutex<()>>,
}

impl PolicyStore {
    pub fn new(path: PathBuf) -> PolicyStore {
        PolicyStore {
            path,
            lock: Arc::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Group and version in the file; `None` when there is no readable file.
    /// Blocking.
    pub fn current(&self) -> Option<(String, u64)> {
        self.read().map(|f| (f.group, f.version))
    }

    /// The session limits of the policy in the file (none when there is no
    /// readable file, or it has no valid session part). Blocking.
    pub fn session_limits(&self) -> SessionLimits {
        self.read()
            .and_then(|f| SessionLimits::from_policy(&f.policy).ok())
            .unwrap_or_default()
    }

    fn read(&self) -> Option<PolicyFile> {
        let file = std::fs::File::open(&self.path).ok()?;
        let mut text = Vec::new();
        file.take(MAX_POLICY_FILE_LEN + 1)
            .read_to_end(&mut text)
            .ok()?;
        if text.len() as u64 > MAX_POLICY_FILE_LEN {
            return None;
        }
        serde_json::from_slice(&text).ok()
    }

    /// Checks `document` and writes it durably unless a newer version of the
    /// same group is already there. Blocking (file and directory sync).
    pub fn apply(
        &self,
        group: &GroupName,
        version: u64,
        document: &str,
    ) -> Result<Applied, PolicyError> {
        self.apply_undoable(group, version, document)
            .map(|(applied, _)| applied)
    }

    /// [`PolicyStore::apply`], and how to put the previous file back when
    /// the version was written (`None` when it was kept out).
    pub fn apply_undoable(
        &self,
        group: &GroupName,
        version: u64,
        document: &str,
    ) -> Result<(Applied, Option<Undo>), PolicyError> {
        let (policy, _) = check_document(document)?;
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, have)) = self.current() {
            if g == group.as_str() && have > version {
                return Ok((Applied::Kept { have }, None));
            }
        }
        let previous = match std::fs::read(&self.path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(PolicyError::Io {
                    op: "read",
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let file = PolicyFile {
            group: group.to_string(),
            version,
            policy,
        };
        let mut bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| PolicyError::NotAnObject(e.to_string()))?;
        bytes.push(b'\n');
        write_atomically(&self.path, &bytes, POLICY_FILE_MODE)?;
        let undo = Undo {
            group: group.to_string(),
            version,
            previous,
        };
        Ok((Applied::Written, Some(undo)))
    }

    /// Puts the file back as it was before `undo`'s version was written
    /// (removes it when there was none), unless another version replaced it
    /// meanwhile; whether it did. Blocking.
    pub fn undo(&self, undo: Undo) -> Result<bool, PolicyError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.current() != Some((undo.group, undo.version)) {
            return Ok(false);
        }
        match undo.previous {
            Some(bytes) => write_atomically(&self.path, &bytes, POLICY_FILE_MODE)?,
            None => match std::fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(PolicyError::Io {
                        op: "remove",
                        path: self.path.clone(),
                        source,
                    })
                }
            },
        }
        Ok(true)
    }
}

/// Checks a policy document as the broker sends it (`Command::ApplyPolicy`):
/// at most [`MAX_POLICY_DOCUMENT_LEN`] bytes, a JSON object, and a session
/// part the agent can enforce. Returns the document and its session limits.
pub fn check_document(document: &str) -> Result<(serde_json::Value, SessionLimits), PolicyError> {
    if document.len() > MAX_POLICY_DOCUMENT_LEN {
        return Err(PolicyError::TooLong {
            len: document.len(),
            max: MAX_POLICY_DOCUMENT_LEN,
        });
    }
    let policy: serde_json::Value =
        serde_json::from_str(document).map_err(|e| PolicyError::NotAnObject(e.to_string()))?;
    if !policy.is_object() {
        return Err(PolicyError::NotAnObject(format!(
            "found {}",
            json_kind(&policy)
        )));
    }
    let limits = SessionLimits::from_policy(&policy).map_err(PolicyError::Session)?;
    Ok((policy, limits))
}

/// The session part of a policy the agent enforces itself
/// (`session.max_session_duration_ms`, `session.idle_disconnect_ms`): whole
/// milliseconds, `null` or missing = no limit. The rest of the document is
/// the streaming server's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionLimits {
    /// A session is warned 5 minutes before this and ended at it.
    pub max_session_duration_ms: Option<u64>,
    /// A session reported idle this long is ended.
    pub idle_disconnect_ms: Option<u64>,
}

impl SessionLimits {
    /// Reads the limits from a policy document (a JSON object). A document
    /// without a `session` object (from an older broker) has no limits; a
    /// limit that is neither `null` nor a positive integer is an error.
    pub fn from_policy(policy: &serde_json::Value) -> Result<SessionLimits, String> {
        let session = match policy.get("session") {
            None | Some(serde_json::Value::Null) => return Ok(SessionLimits::default()),
            Some(serde_json::Value::Object(o)) => o,
            Some(other) => return Err(format!("session is {}, not an object", json_kind(other))),
        };
        let limit = |key: &str| -> Result<Option<u64>, String> {
            match session.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(ms) if ms > 0 => Ok(Some(ms)),
                    _ => Err(format!(
                        "session.{key} is {v}; expected a positive whole number of milliseconds or null"
                    )),
                },
            }
        };
        Ok(SessionLimits {
            max_session_duration_ms: limit("max_session_duration_ms")?,
            idle_disconnect_ms: limit("idle_disconnect_ms")?,
        })
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Replaces `path` whole with `bytes`, mode `mode`, through
/// [`ferry_process::files::write_atomic`]: a temporary of its own beside it
/// (never a planted symlink), fsync, rename, fsync of the directory; after
/// a crash `path` is the old or the new content.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PolicyError> {
    ferry_process::files::write_atomic(path, bytes, mode).map_err(|e| PolicyError::Io {
        op: e.op,
        path: e.path,
        source: e.source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> GroupName {
        s.parse().unwrap()
    }

    #[test]
    fn the_policy_file_is_not_written_through_a_planted_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        // At the fixed temporary name earlier versions used.
        std::os::unix::fs::symlink(&victim, dir.path().join("policy.json.tmp")).unwrap();
        let store = PolicyStore::new(dir.path().join("policy.json"));
        assert_eq!(
            store.apply(&g("g1"), 1, r#"{"a":1}"#).unwrap(),
            Applied::Written
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(store.current(), Some(("g1".into(), 1)));
        // Readable by the streaming server, whatever the umask.
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn a_newer_version_replaces_the_file_and_an_older_one_is_kept_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::new(dir.path().join("sub").join("policy.json"));
        assert_eq!(store.current(), None);
        assert_eq!(
            store.apply(&g("g1"), 1, r#"{"a":1}"#).unwrap(),
            Applied::Written
        );
        assert_eq!(
            store.apply(&g("g1"), 3, r#"{"a":3}"#).unwrap(),
            Applied::Written
        );
        assert_eq!(
            store.apply(&g("g1"), 2, r#"{"a":2}"#).unwrap(),
            Applied::Kept { have: 3 }
        );
        // The same version again is written again (its hook may have failed).
        assert_eq!(
            store.apply(&g("g1"), 3, r#"{"a":3}"#).unwrap(),
            Applied::Written
        );
        assert_eq!(store.current(), Some(("g1".into(), 3)));
        let text = std::fs::read_to_string(store.path()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["policy"]["a"], 3);
        assert_eq!(v["group"], "g1");
        // No temp file left behind.
        let names: Vec<_> = std::fs::read_dir(store.path().parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["policy.json"]);
    }

    #[test]
    fn undo_puts_the_previous_file_back_unless_a_newer_version_came() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::new(dir.path().join("policy.json"));
        // No file before: undo removes it.
        let (_, undo) = store.apply_undoable(&g("g1"), 1, r#"{"a":1}"#).unwrap();
        assert!(store.undo(undo.unwrap()).unwrap());
        assert_eq!(store.current(), None);
        assert!(!store.path().exists());
        store.apply(&g("g1"), 1, r#"{"a":1}"#).unwrap();
        let before = std::fs::read(store.path()).unwrap();
        let (_, undo) = store.apply_undoable(&g("g1"), 2, r#"{"a":2}"#).unwrap();
        assert!(store.undo(undo.unwrap()).unwrap());
        assert_eq!(std::fs::read(store.path()).unwrap(), before);
        // Version 3 was replaced by 4 before its undo: 4 stays.
        let (_, undo3) = store.apply_undoable(&g("g1"), 3, r#"{"a":3}"#).unwrap();
        store.apply(&g("g1"), 4, r#"{"a":4}"#).unwrap();
        assert!(!store.undo(undo3.unwrap()).unwrap());
        assert_eq!(store.current(), Some(("g1".into(), 4)));
        // An older version is kept out: nothing to undo.
        let (applied, undo) = store.apply_undoable(&g("g1"), 2, "{}").unwrap();
        assert_eq!((applied, undo), (Applied::Kept { have: 4 }, None));
    }

    #[test]
    fn another_group_replaces_whatever_version_it_had() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::new(dir.path().join("policy.json"));
        store.apply(&g("old"), 9, "{}").unwrap();
        assert_eq!(store.apply(&g("new"), 1, "{}").unwrap(), Applied::Written);
        assert_eq!(store.current(), Some(("new".into(), 1)));
    }

    #[test]
    fn bad_documents_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::new(dir.path().join("policy.json"));
        store.apply(&g("g1"), 1, "{}").unwrap();
        let long = format!(r#"{{"x":"{}"}}"#, "a".repeat(MAX_POLICY_DOCUMENT_LEN));
        assert!(matches!(
            store.apply(&g("g1"), 2, &long),
            Err(PolicyError::TooLong { .. })
        ));
        let err = store.apply(&g("g1"), 2, "[1]").unwrap_err();
        assert!(err.to_string().contains("an array"), "{err}");
        assert!(matches!(
            store.apply(&g("g1"), 2, "{not json"),
            Err(PolicyError::NotAnObject(_))
        ));
        assert_eq!(store.current(), Some(("g1".into(), 1)));
    }

    #[test]
    fn session_limits_are_read_from_the_document_and_the_file() {
        let parse = |t: &str| SessionLimits::from_policy(&serde_json::from_str(t).unwrap());
        assert_eq!(parse(r#"{"scaling":{}}"#), Ok(SessionLimits::default()));
        assert_eq!(
            parse(
                r#"{"session":{"disconnect_retention_ms":null,"idle_disconnect_ms":null,"max_session_duration_ms":null}}"#
            ),
            Ok(SessionLimits::default())
        );
        assert_eq!(
            parse(r#"{"session":{"idle_disconnect_ms":600000,"max_session_duration_ms":7200000}}"#),
            Ok(SessionLimits {
                max_session_duration_ms: Some(7_200_000),
                idle_disconnect_ms: Some(600_000),
            })
        );
        for bad in [
            r#"{"session":[]}"#,
            r#"{"session":{"idle_disconnect_ms":-1}}"#,
            r#"{"session":{"idle_disconnect_ms":0}}"#,
            r#"{"session":{"max_session_duration_ms":"1h"}}"#,
            r#"{"session":{"max_session_duration_ms":1.5}}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }

        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::new(dir.path().join("policy.json"));
        assert_eq!(store.session_limits(), SessionLimits::default());
        store
            .apply(
                &g("g1"),
                1,
                r#"{"session":{"max_session_duration_ms":60000}}"#,
            )
            .unwrap();
        assert_eq!(store.session_limits().max_session_duration_ms, Some(60_000));
        // A bad session part is refused and the file kept.
        let err = store
            .apply(&g("g1"), 2, r#"{"session":{"idle_disconnect_ms":"soon"}}"#)
            .unwrap_err();
        assert!(matches!(err, PolicyError::Session(_)), "{err}");
        assert_eq!(store.current(), Some(("g1".into(), 1)));
    }

    #[test]
    fn an_unreadable_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.json");
        std::fs::write(&path, "garbage").unwrap();
        let store = PolicyStore::new(path);
        assert_eq!(store.current(), None);
        assert_eq!(store.apply(&g("g1"), 1, "{}").unwrap(), Applied::Written);
        assert_eq!(store.current(), Some(("g1".into(), 1)));
    }
}
