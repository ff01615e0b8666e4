//! PAM mode: `ferry-agent pam`, run by `pam_exec` on session open and close.
//!
//! One line of PAM configuration (e.g. in `/etc/pam.d/sshd` or the streaming
//! server's PAM service) is enough:
//!
//! ```text
//! session optional pam_exec.so /usr/bin/ferry-agent pam
//! ```
//!
//! `pam_exec` passes `PAM_TYPE`, `PAM_USER`, `PAM_SERVICE`, `PAM_TTY` and
//! `PAM_RHOST` in the environment. `open_session` reports a session start,
//! `close_session` its end; any other type (auth, account, password) exits 0
//! and does nothing.
//!
//! PAM has no broker ticket: its session start says it is trusted
//! ([`crate::local::StartProof::Trusted`]), which the agent accepts only from
//! root or the agent's own user. `pam_exec` runs as root in the session
//! phase of sshd and display managers; a PAM service running as another user
//! is refused with that reason.
//!
//! # Session ids
//! PAM has no session id, so one is derived deterministically from what is
//! the same at open and at close:
//!
//! * `pam-<service>-<tty>-<user>` when `PAM_TTY` names a terminal or display
//!   (`/dev/pts/3` -> `pts_3`, `tty2`, `:0`), which is unique per login;
//! * `pam-<service>-p<ppid>-<user>` otherwise (no tty, or a pseudo-name like
//!   sshd's `ssh`), where `ppid` is the PAM application process that calls
//!   `pam_exec` for both open and close of the session.
//!
//! Every character outside the session-id charset (letters, digits,
//! `. _ @ + -`) becomes `_`, and the id is cut to the id length limit.
//! [`action_from_env`] is a pure function of the environment map and the
//! parent pid, so this is unit-tested.

use std::collections::BTreeMap;

use ferry_common::limits::MAX_ID_LEN;
use ferry_common::wire::EndReason;
use ferry_common::{IdError, SessionId, UserId};

/// What PAM asks the agent to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PamAction {
    /// Report a session start.
    Start { session: SessionId, user: UserId },
    /// Report a session end.
    End {
        session: SessionId,
        reason: EndReason,
    },
    /// Not a session event (e.g. `auth`): do nothing, succeed.
    Ignore,
}

#[derive(Debug, thiserror::Error)]
pub enum PamError {
    #[error("{0} is not set (is this run by pam_exec?)")]
    Missing(&'static str),
    #[error("PAM_USER: {0}")]
    BadUser(IdError),
    #[error("derived session id: {0}")]
    BadSession(IdError),
}

/// Reads the pam_exec environment. Pure: `env` is the environment, `ppid`
/// the parent process id.
pub fn action_from_env(env: &BTreeMap<String, String>, ppid: u32) -> Result<PamAction, PamError> {
    let get = |k: &str| env.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let kind = get("PAM_TYPE").ok_or(PamError::Missing("PAM_TYPE"))?;
    let open = match kind {
        "open_session" => true,
        "close_session" => false,
        _ => return Ok(PamAction::Ignore),
    };
    let user_raw = get("PAM_USER").ok_or(PamError::Missing("PAM_USER"))?;
    let service = get("PAM_SERVICE").ok_or(PamError::Missing("PAM_SERVICE"))?;
    let place = match get("PAM_TTY").filter(|t| is_terminal_name(t)) {
        Some(tty) => tty.strip_prefix("/dev/").unwrap_or(tty).to_owned(),
        None => format!("p{ppid}"),
    };
    let mut id = sanitize(&format!("pam-{service}-{place}-{user_raw}"));
    let mut end = id.len().min(MAX_ID_LEN);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    id.truncate(end);
    let session = SessionId::new(id).map_err(PamError::BadSession)?;
    if open {
        let user = UserId::new(user_raw).map_err(PamError::BadUser)?;
        Ok(PamAction::Start { session, user })
    } else {
        Ok(PamAction::End {
            session,
            reason: EndReason::Logout,
        })
    }
}

/// A real terminal or X display, as opposed to a service pseudo-name.
fn is_terminal_name(tty: &str) -> bool {
    tty.starts_with("/dev/")
        || tty.starts_with("pts/")
        || tty.starts_with("tty")
        || tty.starts_with(':')
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '+' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn open_and_close_name_the_same_session() {
        let base = [
            ("PAM_USER", "alice"),
            ("PAM_SERVICE", "sshd"),
            ("PAM_TTY", "/dev/pts/3"),
            ("PAM_RHOST", "10.0.0.9"),
        ];
        let mut open = env(&base);
        open.insert("PAM_TYPE".into(), "open_session".into());
        let mut close = env(&base);
        close.insert("PAM_TYPE".into(), "close_session".into());
        let a = action_from_env(&open, 100).unwrap();
        let b = action_from_env(&close, 100).unwrap();
        assert_eq!(
            a,
            PamAction::Start {
                session: "pam-sshd-pts_3-alice".parse().unwrap(),
                user: "alice".parse().unwrap()
            }
        );
        assert_eq!(
            b,
            PamAction::End {
                session: "pam-sshd-pts_3-alice".parse().unwrap(),
                reason: EndReason::Logout
            }
        );
    }

    #[test]
    fn without_a_terminal_the_parent_pid_names_the_session() {
        let e = env(&[
            ("PAM_TYPE", "open_session"),
            ("PAM_USER", "bob@example.com"),
            ("PAM_SERVICE", "sshd"),
            ("PAM_TTY", "ssh"),
        ]);
        let PamAction::Start { session, .. } = action_from_env(&e, 4242).unwrap() else {
            panic!("expected start");
        };
        assert_eq!(session.as_str(), "pam-sshd-p4242-bob@example.com");
        let e = env(&[
            ("PAM_TYPE", "open_session"),
            ("PAM_USER", "carol"),
            ("PAM_SERVICE", "gdm password"),
            ("PAM_TTY", ":0"),
        ]);
        let PamAction::Start { session, .. } = action_from_env(&e, 1).unwrap() else {
            panic!("expected start");
        };
        assert_eq!(session.as_str(), "pam-gdm_password-_0-carol");
    }

    #[test]
    fn other_types_are_ignored_and_missing_vars_reported() {
        let e = env(&[("PAM_TYPE", "auth")]);
        assert_eq!(action_from_env(&e, 1).unwrap(), PamAction::Ignore);
        assert!(matches!(
            action_from_env(&env(&[]), 1),
            Err(PamError::Missing("PAM_TYPE"))
        ));
        let e = env(&[("PAM_TYPE", "open_session"), ("PAM_SERVICE", "x")]);
        assert!(matches!(
            action_from_env(&e, 1),
            Err(PamError::Missing("PAM_USER"))
        ));
        let e = env(&[("PAM_TYPE", "open_session"), ("PAM_USER", "x")]);
        assert!(matches!(
            action_from_env(&e, 1),
            Err(PamError::Missing("PAM_SERVICE"))
        ));
        // A user name the id charset refuses is an error, not a guess.
        let e = env(&[
            ("PAM_TYPE", "open_session"),
            ("PAM_USER", "al ice"),
            ("PAM_SERVICE", "login"),
        ]);
        assert!(matches!(action_from_env(&e, 1), Err(PamError::BadUser(_))));
    }

    #[test]
    fn long_names_are_cut_to_the_id_limit() {
        let user = "u".repeat(200);
        let e = env(&[
            ("PAM_TYPE", "close_session"),
            ("PAM_USER", &user),
            ("PAM_SERVICE", "login"),
        ]);
        let PamAction::End { session, .. } = action_from_env(&e, 1).unwrap() else {
            panic!("expected end");
        };
        assert_eq!(session.as_str().len(), MAX_ID_LEN);
    }
}
