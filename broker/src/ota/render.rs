//! How `ferryctl ota` answers are shown: tables for people, JSON for scripts
//! (times RFC 3339 like the rest of `ferryctl`; see [`crate::render`]).

use std::time::Duration;

use ferry_common::admin::{OtaScheduleInfo, OtaUpdateInfo, RolloutInfo};
use ferry_common::duration::format_duration;
use ferry_common::UnixMillis;
use serde_json::{json, Value};

use crate::render::{rfc3339, rfc3339_secs, table};

fn opt_time(t: Option<UnixMillis>) -> Value {
    t.map(|t| Value::String(rfc3339(t))).unwrap_or(Value::Null)
}

/// A time in a table or a headline: whole seconds, like every `ferryctl`
/// table (JSON keeps the milliseconds).
fn opt_text(t: Option<UnixMillis>) -> String {
    t.map(rfc3339_secs).unwrap_or_else(|| "-".into())
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

/// `ota offer` / `ota list`. Ids read `update N`, never to be taken for a
/// schedule's.
pub fn updates_table(us: &[OtaUpdateInfo]) -> String {
    let rows: Vec<Vec<String>> = us
        .iter()
        .map(|u| {
            vec![
                format!("update {}", u.id),
                u.group.to_string(),
                u.component.clone(),
                u.version.clone(),
                if u.package.is_empty() {
                    "-".into()
                } else {
                    u.package.clone()
                },
                rfc3339_secs(u.offered_at),
                u.description.clone(),
            ]
        })
        .collect();
    table(
        &[
            "UPDATE",
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

/// One schedule (JSON).
fn schedule_json(s: &OtaScheduleInfo) -> Value {
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
}

/// `ota schedule|reschedule|cancel|history --json`.
pub fn schedules_json(ss: &[OtaScheduleInfo]) -> Value {
    Value::Array(ss.iter().map(schedule_json).collect())
}

/// `ota list --json`: the offers, each with the schedules that roll it out
/// (their own ids) under `schedules`.
pub fn list_json(us: &[OtaUpdateInfo], ss: &[OtaScheduleInfo]) -> Value {
    Value::Array(
        us.iter()
            .map(|u| {
                let mut v = update_json(u);
                v["schedules"] = Value::Array(
                    ss.iter()
                        .filter(|s| s.update.id == u.id)
                        .map(|s| {
                            json!({
                                "id": s.id,
                                "update": s.update.id,
                                "state": s.state,
                                "start": rfc3339(s.start),
                                "wave": s.wave,
                                "drain": format_duration(Duration::from_millis(s.drain_ms)),
                                "started_at": opt_time(s.started_at),
                                "finished_at": opt_time(s.finished_at),
                            })
                        })
                        .collect(),
                );
                v
            })
            .collect(),
    )
}

/// `ota list`: the offers, then the schedules (`schedule N` rolls out
/// `update M`).
pub fn list_table(us: &[OtaUpdateInfo], ss: &[OtaScheduleInfo]) -> String {
    let mut out = updates_table(us);
    if ss.is_empty() {
        out.push_str("\nno OTA schedules\n");
        return out;
    }
    let rows: Vec<Vec<String>> = ss
        .iter()
        .map(|s| {
            vec![
                format!("schedule {}", s.id),
                format!("update {}", s.update.id),
                s.update.group.to_string(),
                format!("{} {}", s.update.component, s.update.version),
                s.state.clone(),
                rfc3339_secs(s.start),
                s.wave.to_string(),
                format_duration(Duration::from_millis(s.drain_ms)),
                opt_text(s.finished_at),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &[
            "SCHEDULE",
            "UPDATE",
            "GROUP",
            "ROLLS OUT",
            "STATE",
            "START",
            "WAVE",
            "DRAIN",
            "FINISHED",
        ],
        &rows,
    ));
    out
}

/// `group show --json`'s `rollouts`.
pub fn rollouts_json(rs: &[RolloutInfo]) -> Value {
    Value::Array(
        rs.iter()
            .map(|r| {
                json!({
                    "kind": r.kind,
                    "id": r.id,
                    "update": r.update,
                    "component": r.component,
                    "version": r.version,
                    "state": r.state,
                    "start": rfc3339(r.start),
                    "deadline": opt_time(r.deadline),
                    "wave": r.wave,
                    "drain": format_duration(Duration::from_millis(r.drain_ms)),
                    "hosts": r.hosts.iter().map(|h| json!({
                        "resource": h.resource.as_str(),
                        "step": h.step,
                        "until": opt_time(h.until),
                        "detail": h.detail,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// The headline of an update in `group show`.
fn rollout_headline(r: &RolloutInfo) -> String {
    let drain = format_duration(Duration::from_millis(r.drain_ms));
    match (r.kind.as_str(), r.state.as_str()) {
        ("image-update", "warning") => format!(
            "image update {} to image {}: warning since {}; open sessions are disconnected \
             and hosts switched at {}",
            r.id,
            r.version,
            rfc3339_secs(r.start),
            opt_text(r.deadline)
        ),
        ("image-update", state) => format!(
            "image update {} to image {}: {state} since {} (started {}, warning {drain})",
            r.id,
            r.version,
            opt_text(r.deadline),
            rfc3339_secs(r.start)
        ),
        (_, "scheduled") => format!(
            "OTA schedule {} (update {}: {} {}): scheduled to start at {}, waves of {}, drain \
             deadline {drain} per resource",
            r.id,
            r.update.unwrap_or_default(),
            r.component,
            r.version,
            rfc3339_secs(r.start),
            r.wave
        ),
        (_, state) => format!(
            "OTA schedule {} (update {}: {} {}): {state} since {}, waves of {}, drain deadline \
             {drain} per resource",
            r.id,
            r.update.unwrap_or_default(),
            r.component,
            r.version,
            rfc3339_secs(r.start),
            r.wave
        ),
    }
}

/// `group show`'s updates: each running or scheduled update and where each
/// of its hosts is.
pub fn rollouts_table(rs: &[RolloutInfo]) -> String {
    if rs.is_empty() {
        return "\nupdates: none running or scheduled\n".into();
    }
    let mut out = String::new();
    for r in rs {
        out.push('\n');
        out.push_str(&rollout_headline(r));
        out.push('\n');
        if r.hosts.is_empty() {
            continue;
        }
        let rows: Vec<Vec<String>> = r
            .hosts
            .iter()
            .map(|h| {
                vec![
                    h.resource.to_string(),
                    h.step.clone(),
                    opt_text(h.until),
                    h.detail.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        for line in table(&["RESOURCE", "STEP", "UNTIL", "DETAIL"], &rows).lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
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
            rfc3339_secs(s.start),
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

#[cfg(test)]
mod tests {
    use ferry_common::admin::{OtaResourceInfo, RolloutHostInfo};

    use super::*;

    /// 2026-12-01T02:00:00.250Z and 02:30:00.750Z: times with milliseconds.
    const START: UnixMillis = UnixMillis(1_796_090_400_250);
    const LATER: UnixMillis = UnixMillis(1_796_092_200_750);

    fn offer() -> OtaUpdateInfo {
        OtaUpdateInfo {
            id: 1,
            group: "design".parse().expect("name"),
            component: "agent".into(),
            version: "0.3.0".into(),
            package: "/srv/ferry-agent_0.3.0_amd64.deb".into(),
            description: "agent 0.3.0".into(),
            offered_at: START,
        }
    }

    fn schedule() -> OtaScheduleInfo {
        OtaScheduleInfo {
            id: 1,
            update: offer(),
            start: START,
            wave: 2,
            drain_ms: 30 * 60 * 1000,
            state: "running".into(),
            created_at: START,
            started_at: Some(START),
            finished_at: Some(LATER),
            detail: None,
            resources: vec![OtaResourceInfo {
                resource: "host-1".parse().expect("id"),
                state: "done".into(),
                started_at: Some(START),
                finished_at: Some(LATER),
                detail: None,
            }],
        }
    }

    fn rollout() -> RolloutInfo {
        RolloutInfo {
            kind: "image-update".into(),
            id: 1,
            update: None,
            component: "image".into(),
            version: "img-2".into(),
            state: "warning".into(),
            start: START,
            deadline: Some(LATER),
            wave: 0,
            drain_ms: 30 * 60 * 1000,
            hosts: vec![RolloutHostInfo {
                resource: "host-1".parse().expect("id"),
                step: "warned".into(),
                until: Some(LATER),
                detail: None,
            }],
        }
    }

    /// Tables and headlines are for people: times in whole seconds, like
    /// every other `ferryctl` table; JSON keeps the milliseconds.
    #[test]
    fn tables_show_times_in_whole_seconds_and_json_keeps_milliseconds() {
        let texts = [
            list_table(&[offer()], &[schedule()]),
            schedules_table(&[schedule()]),
            rollouts_table(&[rollout()]),
        ];
        for text in &texts {
            assert!(text.contains("2026-12-01T02:"), "{text}");
            assert!(!text.contains(".250Z") && !text.contains(".750Z"), "{text}");
        }
        assert!(
            texts[1].contains("start 2026-12-01T02:00:00Z"),
            "{}",
            texts[1]
        );
        assert!(
            texts[2].contains("hosts switched at 2026-12-01T02:30:00Z"),
            "{}",
            texts[2]
        );
        let json = schedules_json(&[schedule()]);
        assert_eq!(json[0]["start"], "2026-12-01T02:00:00.250Z");
        assert_eq!(
            rollouts_json(&[rollout()])[0]["deadline"],
            "2026-12-01T02:30:00.750Z"
        );
    }
}
