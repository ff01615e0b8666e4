//! Who may use the admin socket: the peer's credentials (`SO_PEERCRED`)
//! checked before anything it sends is read.
//!
//! Allowed are root, the broker's own user, and members of the admin group
//! (`admin_group` in the broker's config; default: the broker's own group,
//! `ferry` under the packaged unit). A peer is a member when the group is
//! its primary group (the gid the kernel reports for it), or when
//! `/etc/group` lists the peer's user name (from `/etc/passwd`) as a member.
//! Group memberships that live only in another name service (LDAP, sssd)
//! are not seen: make such operators' primary group the admin group, or list
//! them in `/etc/group`. The socket file's mode (0660, owner and group) is a
//! first gate; this check holds even if the file's mode or owner is widened.
//!
//! [`decide`] is a pure function of the peer and the settings, so the rule
//! is unit-tested; [`AdminAccess::check`] reads the files it needs.

use std::io::Read;
use std::path::PathBuf;

/// Largest `/etc/passwd` or `/etc/group` read: far above any real one.
const MAX_ACCOUNT_FILE_LEN: u64 = 8 * 1024 * 1024;

/// The peer of an admin connection, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    /// The peer's primary (effective) group.
    pub gid: u32,
}

/// Who may use the socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminAccess {
    /// The broker's own uid (always allowed, as is root).
    pub broker_uid: u32,
    /// The admin group's gid.
    pub group_gid: u32,
    /// The admin group's name, for refusals.
    pub group_name: String,
    /// Where user names come from (`/etc/passwd`).
    pub passwd_file: PathBuf,
    /// Where group members come from (`/etc/group`).
    pub group_file: PathBuf,
}

/// Why the admin group of the config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("admin_group {0:?}: no such group in /etc/group (create it, or name an existing group or gid)")]
    UnknownGroup(String),
    #[error("read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Whether `peer` may use the socket: `Err` with a message for the peer.
/// `supplementary` are the gids the peer's user is listed in.
pub fn decide(peer: PeerCred, supplementary: &[u32], access: &AdminAccess) -> Result<(), String> {
    if peer.uid == 0
        || peer.uid == access.broker_uid
        || peer.gid == access.group_gid
        || supplementary.contains(&access.group_gid)
    {
        return Ok(());
    }
    Err(format!(
        "uid {} is not allowed to use the admin socket: add it to group {} (gid {}), or run \
         ferryctl as root or as the broker's user",
        peer.uid, access.group_name, access.group_gid
    ))
}

/// One line of `/etc/group`: name, gid, members.
fn group_line(line: &str) -> Option<(&str, u32, impl Iterator<Item = &str>)> {
    let mut f = line.split(':');
    let name = f.next()?;
    let _password = f.next()?;
    let gid = f.next()?.trim().parse().ok()?;
    let members = f.next().unwrap_or("").split(',').map(str::trim);
    Some((name, gid, members.filter(|m| !m.is_empty())))
}

/// The name of `uid` in `/etc/passwd` text.
pub fn user_name(passwd: &str, uid: u32) -> Option<&str> {
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        (f.next()?.trim().parse::<u32>().ok()? == uid).then_some(name)
    })
}

/// The gids whose `/etc/group` line lists `user` as a member.
pub fn groups_listing(group: &str, user: &str) -> Vec<u32> {
    group
        .lines()
        .filter_map(group_line)
        .filter_map(|(_, gid, mut members)| members.any(|m| m == user).then_some(gid))
        .collect()
}

/// The gid and name of `spec` (a group name or a number) in `/etc/group`
/// text; a number not listed there is taken as is.
pub fn resolve_group(group: &str, spec: &str) -> Option<(u32, String)> {
    if let Some((name, gid, _)) = group
        .lines()
        .filter_map(group_line)
        .find(|(n, _, _)| *n == spec)
    {
        return Some((gid, name.to_owned()));
    }
    let gid: u32 = spec.parse().ok()?;
    let name = group
        .lines()
        .filter_map(group_line)
        .find(|(_, g, _)| *g == gid)
        .map_or_else(|| spec.to_owned(), |(n, _, _)| n.to_owned());
    Some((gid, name))
}

fn read_bounded(path: &std::path::Path) -> Result<String, AccessError> {
    let read_err = |error| AccessError::Read {
        path: path.to_owned(),
        error,
    };
    let f = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    f.take(MAX_ACCOUNT_FILE_LEN)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

impl AdminAccess {
    /// The access of this broker process: `admin_group` from the config
    /// (a name or gid), or the process's own group.
    pub fn for_process(admin_group: Option<&str>) -> Result<AdminAccess, AccessError> {
        let passwd_file = PathBuf::from("/etc/passwd");
        let group_file = PathBuf::from("/etc/group");
        let groups = match read_bounded(&group_file) {
            Ok(text) => text,
            // A system without /etc/group: the own gid still works.
            Err(_) if admin_group.is_none() => String::new(),
            Err(e) => return Err(e),
        };
        let (group_gid, group_name) = match admin_group {
            Some(spec) => resolve_group(&groups, spec)
                .ok_or_else(|| AccessError::UnknownGroup(spec.to_owned()))?,
            None => {
                let gid = rustix::process::getgid().as_raw();
                resolve_group(&groups, &gid.to_string()).unwrap_or((gid, gid.to_string()))
            }
        };
        Ok(AdminAccess {
            broker_uid: rustix::process::getuid().as_raw(),
            group_gid,
            group_name,
            passwd_file,
            group_file,
        })
    }

    /// [`decide`] for `peer`, reading the account files only when the
    /// peer's uid and primary group do not already decide. Blocking (small
    /// file reads); a file that cannot be read counts as no membership.
    pub fn check(&self, peer: PeerCred) -> Result<(), String> {
        if decide(peer, &[], self).is_ok() {
            return Ok(());
        }
        let supplementary = read_bounded(&self.passwd_file)
            .ok()
            .and_then(|passwd| {
                let name = user_name(&passwd, peer.uid)?.to_owned();
                let groups = read_bounded(&self.group_file).ok()?;
                Some(groups_listing(&groups, &name))
            })
            .unwrap_or_default();
        decide(peer, &supplementary, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        ferry:x:998:998::/nonexistent:/usr/sbin/nologin\n\
        ops:x:1000:1000:Op:/home/ops:/bin/bash\n\
        eve:x:1001:1001::/home/eve:/bin/bash\n\
        broken line\n";
    const GROUP: &str = "root:x:0:\n\
        ferry:x:998:ops,alice\n\
        ops:x:1000:\n\
        eve:x:1001:\n\
        garbage\n";

    fn access() -> AdminAccess {
        AdminAccess {
            broker_uid: 998,
            group_gid: 998,
            group_name: "ferry".into(),
            passwd_file: PathBuf::from("/nonexistent"),
            group_file: PathBuf::from("/nonexistent"),
        }
    }

    #[test]
    fn root_the_broker_and_the_admin_group_are_allowed_others_refused() {
        let a = access();
        let peer = |uid, gid| PeerCred { uid, gid };
        assert!(decide(peer(0, 0), &[], &a).is_ok());
        assert!(decide(peer(998, 998), &[], &a).is_ok());
        // The admin group as primary group, or as a listed membership.
        assert!(decide(peer(1002, 998), &[], &a).is_ok());
        assert!(decide(peer(1000, 1000), &[4, 998], &a).is_ok());
        let refused = decide(peer(1001, 1001), &[1001, 27], &a).expect_err("refused");
        assert!(
            refused.contains("uid 1001 is not allowed")
                && refused.contains("add it to group ferry (gid 998)"),
            "{refused}"
        );
    }

    #[test]
    fn account_files_give_names_memberships_and_groups() {
        assert_eq!(user_name(PASSWD, 1000), Some("ops"));
        assert_eq!(user_name(PASSWD, 4242), None);
        assert_eq!(groups_listing(GROUP, "ops"), vec![998]);
        assert_eq!(groups_listing(GROUP, "eve"), Vec::<u32>::new());
        // "ops" the group is not "ops" the member of another group.
        assert_eq!(resolve_group(GROUP, "ferry"), Some((998, "ferry".into())));
        assert_eq!(resolve_group(GROUP, "1000"), Some((1000, "ops".into())));
        assert_eq!(resolve_group(GROUP, "4242"), Some((4242, "4242".into())));
        assert_eq!(resolve_group(GROUP, "nope"), None);
    }

    #[test]
    fn check_reads_the_membership_from_the_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut a = access();
        a.passwd_file = dir.path().join("passwd");
        a.group_file = dir.path().join("group");
        std::fs::write(&a.passwd_file, PASSWD).expect("write");
        std::fs::write(&a.group_file, GROUP).expect("write");
        assert!(a
            .check(PeerCred {
                uid: 1000,
                gid: 1000
            })
            .is_ok());
        assert!(a
            .check(PeerCred {
                uid: 1001,
                gid: 1001
            })
            .is_err());
        // Unreadable files: no membership, the refusal still says why.
        std::fs::remove_file(&a.group_file).expect("rm");
        let refused = a
            .check(PeerCred {
                uid: 1000,
                gid: 1000,
            })
            .expect_err("refused");
        assert!(refused.contains("add it to group ferry"), "{refused}");
    }
}
