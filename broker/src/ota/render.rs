//! How `ferryctl ota` answers are shown: tables for people, JSON for scripts
//! (times RFC 3339 like the rest of `ferryctl`; see [`crate::render`]).

use std::time::Duration;

use ferry_common::admin::{OtaScheduleInfo, OtaUpdateInfo};
use ferry_common::duration::format_duration;
use ferry_common::UnixMillis;
use serde_json::{json, Value};

use crate::render::{rfc3339, table};

fn opt_time(t: Option<UnixMillis>) -> Value {
    t.map(|t| Value::String(rfc3339(t))).unwrap_or(Value::Null)
}

fn opt_text(t: Option<UnixMillis>) -> String {
    t.map(rfc3339).unwrap_or_else(|| "-".into())
}

fn update_json(u: &OtaUpdateInfo) -> Value {
    json!({
        "id": u.id,
        "group": u.group.as_str(),
        "component": u.component,
        "version": u.version,
        "package": u.package,
        "description": u.description,
        "offered_at": rfc3339(u.offered_at),
    })
}

/// `ota offer` / `ota list --json`.
pub fn updates_json(us: &[OtaUpdateInfo]) -> Value {
    Value::Array(us.iter().map(update_json).collect())
}

/// `ota offer` / `ota list`.
pub fn updates_table(us: &[OtaUpdateInfo]) -> String {
    let rows: Vec<Vec<String>> = us
        .iter()
        .map(|u| {
            vec![
                u.id.to_string(),
                u.group.to_string(),
                u.component.clone(),
                u.version.clone(),
                if u.package.is_empty() {
                    "-".into()
                } else {
                    u.package.clone()
                },
                rfc3339(u.offered_at),
                u.description.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "GROUP",
            "COMPONENT",
            "VERSION",
            "PACKAGE",
            "OFFERED",
            "DESCRIPTION",
        ],
        &rows,
    )
}

/// `ota schedule|reschedule|cancel|history --json`.
pub fn schedules_json(ss: &[OtaScheduleInfo]) -> Value {
    Value::Array(
        ss.iter()
            .map(|s| {
                json!({
                    "id": s.id,
                    "update": update_json(&s.update),
                    "start": rfc3339(s.start),
                    "wave": s.wave,
                    "drain": format_duration(Duration::from_millis(s.drain_ms)),
                    "drain_ms": s.drain_ms,
                    "state": s.state,
                    "created_at": rfc3339(s.created_at),
                    "started_at": opt_time(s.started_at),
                    "finished_at": opt_time(s.finished_at),
                    "detail": s.detail,
                    "resources": s.resources.iter().map(|r| json!({
                        "resource": r.resource.as_str(),
                        "state": r.state,
                        "started_at": opt_time(r.started_at),
                        "finished_at": opt_time(r.finished_at),
                        "detail": r.detail,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// `ota schedule|reschedule|cancel|history`: one block per schedule, its
/// resources' outcomes under it.
pub fn schedules_table(ss: &[OtaScheduleInfo]) -> String {
    if ss.is_empty() {
        return "no OTA schedules\n".into();
    }
    let mut out = String::new();
    for (i, s) in ss.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "schedule {}: update {} ({} {}) for {}, {}\n",
            s.id, s.update.id, s.update.component, s.update.version, s.update.group, s.state
        ));
        out.push_str(&format!(
            "  start {}, waves of {}, drain deadline {}; started {}, finished {}\n",
            rfc3339(s.start),
            s.wave,
            format_duration(Duration::from_millis(s.drain_ms)),
            opt_text(s.started_at),
            opt_text(s.finished_at)
        ));
        if let Some(d) = &s.detail {
            out.push_str(&format!("  {d}\n"));
        }
        if !s.resources.is_empty() {
            let rows: Vec<Vec<String>> = s
                .resources
                .iter()
                .map(|r| {
                    vec![
                        r.resource.to_string(),
                        r.state.clone(),
                        opt_text(r.started_at),
                        opt_text(r.finished_at),
                        r.detail.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            for line in table(
                &["RESOURCE", "STATE", "STARTED", "FINISHED", "DETAIL"],
                &rows,
            )
            .lines()
            {
                out.push_str("  ");
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}
