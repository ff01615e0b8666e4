//! How admin answers are shown: plain tables for people, JSON (with field
//! names scripts and tests rely on) for machines. Shared by `ferryctl` and
//! `ferry-broker dev`.

use chrono::{DateTime, SecondsFormat, Utc};
use ferry_common::admin::{ResourceInfo, SessionInfo, StatusReport};
use ferry_common::UnixMillis;
use serde_json::{json, Value};

/// RFC 3339 UTC with milliseconds, e.g. `2026-03-02T10:02:00.000Z`.
pub fn rfc3339(t: UnixMillis) -> String {
    DateTime::<Utc>::from_timestamp_millis(t.0)
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("@{}ms", t.0))
}

fn opt_time(t: Option<UnixMillis>) -> Value {
    t.map(|t| Value::String(rfc3339(t))).unwrap_or(Value::Null)
}

/// A left-aligned table with a header row; columns as wide as their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(cell);
            if i + 1 < widths.len() {
                out.push_str(&" ".repeat(w.saturating_sub(cell.chars().count())));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

pub fn status_json(s: &StatusReport) -> Value {
    json!({
        "broker_version": s.broker_version,
        "agents_connected": s.agents_connected,
        "resources": s.resources,
        "open_sessions": s.open_sessions,
        "events_recorded": s.events_recorded,
    })
}

pub fn status_table(s: &StatusReport) -> String {
    table(
        &["FIELD", "VALUE"],
        &[
            vec!["broker_version".into(), s.broker_version.clone()],
            vec!["agents_connected".into(), s.agents_connected.to_string()],
            vec!["resources".into(), s.resources.to_string()],
            vec!["open_sessions".into(), s.open_sessions.to_string()],
            vec!["events_recorded".into(), s.events_recorded.to_string()],
        ],
    )
}

pub fn resources_json(rs: &[ResourceInfo]) -> Value {
    Value::Array(
        rs.iter()
            .map(|r| {
                json!({
                    "resource": r.resource.as_str(),
                    "group": r.group.as_ref().map(|g| g.as_str()),
                    "connected": r.connected,
                    "available": r.available,
                    "draining": r.draining,
                    "agent_version": r.agent_version,
                    "image_version": r.image_version,
                    "last_health_at": opt_time(r.last_health_at),
                    "sessions": r.sessions,
                    "host": {
                        "hostname": r.host.hostname,
                        "os": r.host.os,
                        "kernel": r.host.kernel,
                        "vcpus": r.host.vcpus,
                        "memory_bytes": r.host.memory_bytes,
                    },
                })
            })
            .collect(),
    )
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

pub fn resources_table(rs: &[ResourceInfo]) -> String {
    let rows: Vec<Vec<String>> = rs
        .iter()
        .map(|r| {
            vec![
                r.resource.to_string(),
                r.group
                    .as_ref()
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "-".into()),
                yes_no(r.connected),
                yes_no(r.available),
                yes_no(r.draining),
                r.sessions.to_string(),
                r.agent_version.clone(),
                r.image_version.clone(),
                format!("{} vCPU, {} MiB", r.host.vcpus, r.host.memory_bytes >> 20),
                r.last_health_at.map(rfc3339).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "RESOURCE",
            "GROUP",
            "CONNECTED",
            "AVAILABLE",
            "DRAINING",
            "SESSIONS",
            "AGENT",
            "IMAGE",
            "HOST",
            "LAST HEALTH",
        ],
        &rows,
    )
}

pub fn sessions_json(ss: &[SessionInfo]) -> Value {
    Value::Array(
        ss.iter()
            .map(|s| {
                json!({
                    "session": s.session.as_str(),
                    "resource": s.resource.as_str(),
                    "user": s.user.as_str(),
                    "started_at": rfc3339(s.started_at),
                    "ended_at": opt_time(s.ended_at),
                    "end_reason": s.end_reason,
                })
            })
            .collect(),
    )
}

pub fn sessions_table(ss: &[SessionInfo]) -> String {
    let rows: Vec<Vec<String>> = ss
        .iter()
        .map(|s| {
            vec![
                s.session.to_string(),
                s.resource.to_string(),
                s.user.to_string(),
                rfc3339(s.started_at),
                s.ended_at.map(rfc3339).unwrap_or_else(|| "-".into()),
                s.end_reason.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &["SESSION", "RESOURCE", "USER", "STARTED", "ENDED", "REASON"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::wire::HostFacts;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(
            rfc3339(UnixMillis(1_772_445_720_000)),
            "2026-03-02T10:02:00.000Z"
        );
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "LONG HEADER"],
            &[vec!["wide cell".into(), "x".into()]],
        );
        assert_eq!(t, "A          LONG HEADER\nwide cell  x\n");
    }

    #[test]
    fn json_shapes_keep_their_field_names() {
        let s = SessionInfo {
            session: "s1".parse().expect("id"),
            resource: "h1".parse().expect("id"),
            user: "u".parse().expect("id"),
            started_at: UnixMillis(0),
            ended_at: None,
            end_reason: None,
        };
        let v = sessions_json(&[s]);
        assert_eq!(v[0]["started_at"], "1970-01-01T00:00:00.000Z");
        assert!(v[0]["ended_at"].is_null() && v[0]["end_reason"].is_null());

        let r = ResourceInfo {
            resource: "h1".parse().expect("id"),
            group: None,
            connected: true,
            available: false,
            draining: false,
            agent_version: "a".into(),
            image_version: "i".into(),
            last_health_at: None,
            sessions: 2,
            host: HostFacts {
                hostname: "h".into(),
                os: "o".into(),
                kernel: "k".into(),
                vcpus: 4,
                memory_bytes: 8,
            },
        };
        let v = resources_json(&[r]);
        for key in [
            "resource",
            "group",
            "connected",
            "available",
            "draining",
            "agent_version",
            "image_version",
            "last_health_at",
            "sessions",
            "host",
        ] {
            assert!(v[0].get(key).is_some(), "{key}");
        }
        assert_eq!(v[0]["host"]["vcpus"], 4);
    }
}
