//! The detailed listings `ferryctl` prints (issue 12): sessions with their
//! group and state, users with the state of their credentials, and group
//! events with the resource, session and user they name.
//!
//! Group events are stored as (time, kind, message). What an event names is
//! read from its message here, with what the broker knows of the group: a
//! resource is a word of the message that is one of the group's resources
//! (registered with its name, or its `<group>-eN` / `<group>-bN`), a session
//! the word after `session`, a user the word after `user` when it is one of
//! the group's users.

use std::collections::{BTreeMap, BTreeSet};

use ferry_common::admin::{GroupEventDetail, SessionDetail, SessionInfo, UserDetail};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis, UserId};

use crate::groups::{GroupActors, GroupError, GroupService};
use crate::store::{Store, StoreError};

/// `sessions list`: every session (open ones unless `all`) with the group
/// of its resource and its state: `retained` while its group's actor keeps
/// it for a reconnect, else `open` or `ended`.
pub async fn sessions(
    store: &Store,
    actors: &GroupActors,
    all: bool,
) -> Result<Vec<SessionDetail>, StoreError> {
    let sessions = store.sessions(all).await?;
    let groups: BTreeMap<ResourceId, GroupName> = store
        .resources()
        .await?
        .into_iter()
        .filter_map(|r| Some((r.resource, r.group?)))
        .collect();
    let mut retained: BTreeMap<SessionId, (UnixMillis, Option<UnixMillis>)> = BTreeMap::new();
    let names: BTreeSet<&GroupName> = sessions
        .iter()
        .filter(|s| s.ended_at.is_none())
        .filter_map(|s| groups.get(&s.resource))
        .collect();
    for name in names {
        // A group without a running actor keeps nothing.
        if let Ok(view) = actors.view(name).await {
            for (session, since, until) in view.retained {
                retained.insert(session, (since, until));
            }
        }
    }
    Ok(sessions
        .into_iter()
        .map(|s| {
            let group = groups.get(&s.resource).cloned();
            let kept = match s.ended_at {
                None => retained.get(&s.session).copied(),
                Some(_) => None,
            };
            let state = match (s.ended_at, kept) {
                (Some(_), _) => "ended",
                (None, Some(_)) => "retained",
                (None, None) => "open",
            };
            SessionDetail {
                info: SessionInfo::from(s),
                group,
                state: state.into(),
                disconnected_at: kept.map(|k| k.0),
                retained_until: kept.and_then(|k| k.1),
            }
        })
        .collect())
}

/// `user list`: every user with whether a password is set, its token
/// generation and the expiry of its newest token since the last revocation.
pub async fn users(groups: &GroupService, store: &Store) -> Result<Vec<UserDetail>, GroupError> {
    let infos = groups.users().await?;
    let creds = store.credential_states().await?;
    Ok(infos
        .into_iter()
        .map(|info| {
            let c = creds.get(&info.id).cloned().unwrap_or_default();
            UserDetail {
                info,
                password_set: c.password_set,
                token_generation: c.token_generation,
                token_expires_at: c.token_expires_at,
            }
        })
        .collect())
}

/// `group events`: the group's events with what each names.
pub async fn events(
    groups: &GroupService,
    group: &GroupName,
) -> Result<Vec<GroupEventDetail>, GroupError> {
    let detail = groups.show(group.as_str()).await?;
    let events = groups.events(group).await?;
    let known: BTreeSet<ResourceId> = detail.resources.iter().cloned().collect();
    let users: BTreeSet<UserId> = detail.users.iter().cloned().collect();
    Ok(events
        .into_iter()
        .map(|event| {
            let (resource, session, user) =
                subjects(&event.message, &detail.info.name, &known, &users);
            GroupEventDetail {
                event,
                group: detail.info.name.clone(),
                resource,
                session,
                user,
            }
        })
        .collect())
}

/// What `message`, an event of group `group` with resources `known` and
/// users `users`, names.
pub fn subjects(
    message: &str,
    group: &GroupName,
    known: &BTreeSet<ResourceId>,
    users: &BTreeSet<UserId>,
) -> (Option<ResourceId>, Option<SessionId>, Option<UserId>) {
    let words: Vec<&str> = message
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| ":,;.()'\"".contains(c)))
        .collect();
    let after = |keyword: &'static str| {
        words
            .windows(2)
            .filter(move |w| w[0].eq_ignore_ascii_case(keyword))
            .map(|w| w[1])
    };
    let of_group = |w: &str| {
        w.strip_prefix(group.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.strip_prefix(['e', 'b']))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let resource = words
        .iter()
        .filter_map(|w| w.parse::<ResourceId>().ok())
        .find(|r| known.contains(r) || of_group(r.as_str()));
    let session = after("session").find_map(|w| w.parse::<SessionId>().ok());
    let user = after("user")
        .filter_map(|w| w.parse::<UserId>().ok())
        .find(|u| users.contains(u));
    (resource, session, user)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(message: &str) -> (Option<String>, Option<String>, Option<String>) {
        let group: GroupName = "design".parse().expect("name");
        let known: BTreeSet<ResourceId> = ["host-1".parse().expect("id")].into();
        let users: BTreeSet<UserId> = ["alice".parse().expect("id")].into();
        let (r, s, u) = subjects(message, &group, &known, &users);
        (
            r.map(|r| r.to_string()),
            s.map(|s| s.to_string()),
            u.map(|u| u.to_string()),
        )
    }

    #[test]
    fn events_name_their_resource_session_and_user() {
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            names("session s7 on host-1: its user disconnected; the session is retained for 15m"),
            (some("host-1"), some("s7"), None)
        );
        assert_eq!(
            names(
                "ticket-expired: session s2 of user alice on design-e3: unused, its slot is free"
            ),
            (some("design-e3"), some("s2"), some("alice"))
        );
        assert_eq!(
            names("scale-out: asked for design-e1 because demand 3 x 100 > 85 x capacity 2"),
            (some("design-e1"), None, None)
        );
        assert_eq!(
            names("routed: user alice back to session s9 on host-1 (retained after a disconnect)"),
            (some("host-1"), some("s9"), some("alice"))
        );
        assert_eq!(
            names("created: design-e12 is ready"),
            (some("design-e12"), None, None)
        );
        // Words that only look like ids are not taken for resources.
        assert_eq!(
            names("policy version 2 pushed to every agent"),
            (None, None, None)
        );
        assert_eq!(names("design-extra joined"), (None, None, None));
    }
}
