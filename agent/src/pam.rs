//! PAM mode: `ferry-agent pam`, run by `pam_exec` at a login's
//! authentication and at its session's open and close.
//!
//! Two lines of PAM configuration put Ferry in front of any server that
//! authenticates through PAM (xrdp's `xrdp-sesman`, OpenSSH's `sshd`):
//!
//! ```text
//! auth    required pam_exec.so expose_authtok quiet /usr/bin/ferry-agent pam
//! session required pam_exec.so quiet /usr/bin/ferry-agent pam --require-ticket
//! ```
//!
//! `pam_exec` passes `PAM_TYPE`, `PAM_USER`, `PAM_SERVICE`, `PAM_TTY` and
//! `PAM_RHOST` in the environment, and with `expose_authtok` the password on
//! standard input.
//!
//! * `auth`: the password is the user's ticket. The agent verifies it
//!   (signed by the broker, for this host, for this PAM user, unexpired,
//!   never used) and marks it used before the login succeeds.
//! * `open_session`: the login (the process holding the PAM handle, which
//!   is `pam_exec`'s parent) is bound to the session the ticket named, and
//!   that session is reported started, so the broker's reservation becomes
//!   this session; a second login for the same session (a `shared` group)
//!   attaches to it. See [`crate::pam_logins`].
//! * `close_session`: the login is unbound; the session ends with its last
//!   login.
//!
//! A session opened without a ticket login before it (a server that does
//! not run the auth stack, e.g. sshd with a public key) is refused with
//! `--require-ticket`. Without it, it is reported as before Ferry's ticket
//! logins: as trusted ([`crate::local::StartProof::Trusted`], accepted from
//! root or the agent's user only), under a session id derived from what is
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
    /// Authenticate `user`: the password (standard input) is a ticket.
    Auth { service: String, user: UserId },
    /// A session opened. `session` is the derived id, used only for a login
    /// that did not authenticate with a ticket.
    Start {
        service: String,
        session: SessionId,
        user: UserId,
    },
    /// A session closed. `user` is `None` when the PAM user is not a Ferry
    /// user id (then only the derived `session` can name it).
    End {
        service: String,
        session: SessionId,
        user: Option<UserId>,
        reason: EndReason,
    },
    /// Neither (e.g. `account`): do nothing, succeed.
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
        "auth" => {
            let user_raw = get("PAM_USER").ok_or(PamError::Missing("PAM_USER"))?;
            let service = get("PAM_SERVICE").ok_or(PamError::Missing("PAM_SERVICE"))?;
            let user = UserId::new(user_raw).map_err(PamError::BadUser)?;
            return Ok(PamAction::Auth {
                service: service.to_owned(),
                user,
            });
        }
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
    let service = service.to_owned();
    if open {
        let user = UserId::new(user_raw).map_err(PamError::BadUser)?;
        Ok(PamAction::Start {
            service,
            session,
            user,
        })
    } else {
        Ok(PamAction::End {
            service,
            session,
            user: UserId::new(user_raw).ok(),
            reason: EndReason::Logout,
        })
    }
}

/// The ticket `pam_exec` writes with `expose_authtok`: the password and a
/// NUL (some versions also a newline), at most `max` bytes. `None` when
/// empty or longer.
pub fn ticket_from_authtok(bytes: &[u8], max: usize) -> Option<String> {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    let text = std::str::from_utf8(&bytes[..end]).ok()?;
    let text = text.trim_end_matches(['\r', '\n']);
    (!text.is_empty() && text.len() <= max).then(|| text.to_owned())
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
                service: "sshd".into(),
                session: "pam-sshd-pts_3-alice".parse().unwrap(),
                user: "alice".parse().unwrap()
            }
        );
        assert_eq!(
            b,
            PamAction::End {
                service: "sshd".into(),
                session: "pam-sshd-pts_3-alice".parse().unwrap(),
                user: Some("alice".parse().unwrap()),
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
        let e = env(&[("PAM_TYPE", "account")]);
        assert_eq!(action_from_env(&e, 1).unwrap(), PamAction::Ignore);
        let e = env(&[
            ("PAM_TYPE", "auth"),
            ("PAM_USER", "alice"),
            ("PAM_SERVICE", "xrdp-sesman"),
        ]);
        assert_eq!(
            action_from_env(&e, 1).unwrap(),
            PamAction::Auth {
                service: "xrdp-sesman".into(),
                user: "alice".parse().unwrap()
            }
        );
        let e = env(&[("PAM_TYPE", "auth"), ("PAM_SERVICE", "sshd")]);
        assert!(matches!(
            action_from_env(&e, 1),
            Err(PamError::Missing("PAM_USER"))
        ));
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
        let PamAction::End { session, user, .. } = action_from_env(&e, 1).unwrap() else {
            panic!("expected end");
        };
        assert_eq!(session.as_str().len(), MAX_ID_LEN);
        assert_eq!(
            user, None,
            "not a Ferry user id: only the derived id names it"
        );
    }

    #[test]
    fn the_ticket_is_read_up_to_its_nul() {
        assert_eq!(
            ticket_from_authtok(b"v1.abc.def\0", 100).as_deref(),
            Some("v1.abc.def")
        );
        assert_eq!(
            ticket_from_authtok(b"v1.abc\n\0", 100).as_deref(),
            Some("v1.abc")
        );
        assert_eq!(
            ticket_from_authtok(b"v1.abc", 100).as_deref(),
            Some("v1.abc")
        );
        assert_eq!(ticket_from_authtok(b"\0", 100), None);
        assert_eq!(ticket_from_authtok(b"", 100), None);
        assert_eq!(ticket_from_authtok(b"v1.abcdef", 4), None);
        assert_eq!(ticket_from_authtok(b"\xff\xfe\0", 100), None);
    }
}
