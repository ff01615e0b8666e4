//! How admin answers are shown: plain tables for people, JSON (with field
//! names scripts and tests rely on) for machines. Shared by `ferryctl` and
//! `ferry-broker dev`.

use chrono::{DateTime, SecondsFormat, Utc};
use ferry_common::admin::{
    GroupDetail, GroupEventDetail, GroupEventInfo, GroupInfo, LiveGroupView, ResourceInfo,
    SessionDetail, SessionInfo, StatusReport, UsageDetail, UsageReport, UserDetail, UserInfo,
};
use ferry_common::duration::format_duration;
use ferry_common::{UnixMillis, UserId};
use serde_json::{json, Value};

/// An error and its causes on one line (`a: b: c`), skipping a cause its
/// parent's message already quotes (many error types print their source).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = String::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
        cause = c.source();
    }
    escape(&message).into_owned()
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-03-02T10:02:00.000Z`.
pub fn rfc3339(t: UnixMillis) -> String {
    DateTime::<Utc>::from_timestamp_millis(t.0)
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("@{}ms", t.0))
}

/// RFC 3339 UTC in whole seconds, for people: `2026-12-01T02:00:00Z`
/// (milliseconds dropped, not rounded).
pub fn rfc3339_secs(t: UnixMillis) -> String {
    DateTime::<Utc>::from_timestamp_millis(t.0.div_euclid(1000) * 1000)
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("@{}ms", t.0))
}

/// How long until a deadline `ms` milliseconds away, for people: whole
/// seconds rounded up, so a deadline set 5 minutes ahead and read a moment
/// later says `5m`, never `4m59s999ms`. Past deadlines read `0s`.
pub fn time_left(ms: i64) -> String {
    let secs = u64::try_from(ms.max(0)).unwrap_or(0).div_ceil(1000);
    format_duration(std::time::Duration::from_secs(secs))
}

fn opt_time(t: Option<UnixMillis>) -> Value {
    t.map(|t| Value::String(rfc3339(t))).unwrap_or(Value::Null)
}

/// `text` safe to print on a terminal: control characters (escape, CSI,
/// line breaks, tabs) and bidirectional-text overrides written as escapes
/// (`\n`, `\u001b`, `\u202e`), so a value a host or a user chose can neither
/// drive the operator's terminal nor break a table's lines. Every cell of
/// [`table`] and every error line goes through it. The escapes are JSON's,
/// so [`terminal_safe`] may be applied to JSON text too.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    escape_controls(text, false)
}

/// What `ferryctl` prints, made safe as a whole: [`escape`] keeping line
/// breaks. Catches text no renderer escaped (a message, a free-form line,
/// C1 controls and bidirectional overrides serde leaves in JSON strings);
/// in JSON it gives an equal document, as only strings hold such characters.
pub fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    escape_controls(text, true)
}

fn escape_controls(text: &str, keep_newlines: bool) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && !(keep_newlines && c == '\n'))
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.contains(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !unsafe_char(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push_str(&format!("\\u{:04x}", u32::from(c))),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A left-aligned table with a header row; columns as wide as their widest
/// cell. Cells are [`escape`]d.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<std::borrow::Cow<'_, str>>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| escape(cell)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
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
    for row in &rows {
        out.push_str(&line(&mut row.iter().map(|c| c.as_ref())));
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

/// `resources list` with the operator's revocations: each resource's
/// `revoked` (its revocation, or null), then the revoked resources that
/// never registered.
pub fn resources_revoked_json(
    rs: &[ResourceInfo],
    revocations: &[ferry_common::admin::RevocationInfo],
) -> Value {
    let revocation = |r: &ferry_common::admin::RevocationInfo| {
        json!({
            "revoked_before": rfc3339(r.revoked_before),
            "at": rfc3339(r.at),
            "reason": r.reason,
        })
    };
    let mut out = Vec::new();
    let Value::Array(listed) = resources_json(rs) else {
        return Value::Null;
    };
    for (mut value, info) in listed.into_iter().zip(rs) {
        let revoked = revocations.iter().find(|v| v.resource == info.resource);
        if let Value::Object(map) = &mut value {
            map.insert(
                "revoked".into(),
                revoked.map(revocation).unwrap_or(Value::Null),
            );
        }
        out.push(value);
    }
    for r in revocations {
        if !rs.iter().any(|i| i.resource == r.resource) {
            out.push(json!({ "resource": r.resource.as_str(), "revoked": revocation(r) }));
        }
    }
    Value::Array(out)
}

/// [`resources_table`] with a REVOKED column: when certificates issued
/// before stop working, or `-`; revoked resources that never registered
/// follow.
/// `ferryctl cluster`: the brokers sharing the store, then each group's
/// owner.
pub fn cluster_table(c: &ferry_common::admin::ClusterInfo) -> String {
    let Some(me) = &c.this_broker else {
        return "This broker is alone on its store (SQLite): it owns every group.\n".into();
    };
    let brokers: Vec<Vec<String>> = c
        .brokers
        .iter()
        .map(|b| {
            vec![
                if &b.id == me {
                    format!("{} (this)", b.id)
                } else {
                    b.id.clone()
                },
                b.address.clone(),
                if b.leaving {
                    "leaving".into()
                } else if b.live {
                    "live".into()
                } else {
                    "silent".into()
                },
                rfc3339_secs(b.seen_at),
            ]
        })
        .collect();
    let groups: Vec<Vec<String>> = c
        .groups
        .iter()
        .map(|g| {
            vec![
                g.group.to_string(),
                g.owner.clone().unwrap_or_else(|| "- (none now)".into()),
                g.epoch.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut text = table(&["BROKER", "ADDRESS", "STATE", "LAST SEEN"], &brokers);
    text.push('\n');
    text.push_str(&table(&["GROUP", "OWNER", "EPOCH"], &groups));
    text
}

pub fn cluster_json(c: &ferry_common::admin::ClusterInfo) -> serde_json::Value {
    serde_json::json!({
        "this_broker": c.this_broker,
        "brokers": c.brokers.iter().map(|b| serde_json::json!({
            "id": b.id,
            "address": b.address,
            "live": b.live,
            "leaving": b.leaving,
            "seen_at": rfc3339(b.seen_at),
        })).collect::<Vec<_>>(),
        "groups": c.groups.iter().map(|g| serde_json::json!({
            "group": g.group.as_str(),
            "owner": g.owner,
            "epoch": g.epoch,
        })).collect::<Vec<_>>(),
    })
}

pub fn resources_revoked_table(
    rs: &[ResourceInfo],
    revocations: &[ferry_common::admin::RevocationInfo],
) -> String {
    let mut text = resources_table(rs);
    let revoked: Vec<Vec<String>> = revocations
        .iter()
        .map(|r| {
            vec![
                r.resource.to_string(),
                format!(
                    "certificates issued before {}",
                    rfc3339_secs(r.revoked_before)
                ),
                r.reason.clone(),
            ]
        })
        .collect();
    if !revoked.is_empty() {
        text.push('\n');
        text.push_str(&table(&["REVOKED", "REFUSED", "REASON"], &revoked));
    }
    text
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
                opt_text(r.last_health_at),
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
                rfc3339_secs(s.started_at),
                opt_text(s.ended_at),
                s.end_reason.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &["SESSION", "RESOURCE", "USER", "STARTED", "ENDED", "REASON"],
        &rows,
    )
}

/// A time for a table (whole seconds), `-` without one.
fn opt_text(t: Option<UnixMillis>) -> String {
    t.map(rfc3339_secs).unwrap_or_else(|| "-".into())
}

/// Milliseconds as people write a duration (`1h30m`, `90s`).
fn duration_text(ms: u64) -> String {
    format_duration(std::time::Duration::from_millis(ms))
}

fn group_info_json(g: &GroupInfo) -> Value {
    json!({
        "id": g.id,
        "name": g.name.as_str(),
        "status": g.status,
        "region": g.region,
        "spec": g.spec,
        "image": g.image,
        "billing": g.billing,
        "term": g.term,
        "auto_renew": g.auto_renew,
        "base_resources": g.base_resources,
        "session_type": g.session_type.as_str(),
        "users": g.users,
        "expires_at": opt_time(g.expires_at),
        "created_at": rfc3339(g.created_at),
    })
}

pub fn groups_json(gs: &[GroupInfo]) -> Value {
    Value::Array(gs.iter().map(group_info_json).collect())
}

pub fn groups_table(gs: &[GroupInfo]) -> String {
    let rows: Vec<Vec<String>> = gs
        .iter()
        .map(|g| {
            vec![
                g.id.clone(),
                g.name.to_string(),
                g.status.clone(),
                g.region.clone(),
                g.spec.clone(),
                match &g.term {
                    Some(t) => format!(
                        "{} {t}{}",
                        g.billing,
                        if g.auto_renew { " auto-renew" } else { "" }
                    ),
                    None => g.billing.clone(),
                },
                g.base_resources.to_string(),
                g.users.to_string(),
                opt_text(g.expires_at),
            ]
        })
        .collect();
    table(
        &[
            "ID", "NAME", "STATUS", "REGION", "SPEC", "BILLING", "BASE", "USERS", "EXPIRES",
        ],
        &rows,
    )
}

pub fn group_json(d: &GroupDetail) -> Value {
    let mut v = group_info_json(&d.info);
    let p = &d.policy;
    v["office_network"] = json!(d.office_network);
    v["policy"] = json!({
        "concurrent_sessions": p.concurrent_sessions,
        "usage_threshold": p.usage_threshold,
        "scale_out_step": p.scale_out_step,
        "max_elastic": p.max_elastic,
        "max_idle_ms": p.max_idle_ms,
        "scale_in_cooldown_ms": p.scale_in_cooldown_ms,
        "wait_timeout_ms": p.wait_timeout_ms,
        "load_balancing": p.load_balancing,
    });
    v["policy_version"] = json!(d.policy_version);
    v["policy_applied"] = json!(d.policy_applied);
    v["policy_resources"] = Value::Array(
        d.policy_resources
            .iter()
            .map(|r| json!({"resource": r.resource.as_str(), "applied_version": r.applied_version}))
            .collect(),
    );
    v["notes"] = json!(d.notes);
    v["assigned_users"] = json!(d.users.iter().map(|u| u.as_str()).collect::<Vec<_>>());
    v["resources"] = json!(d.resources.iter().map(|r| r.as_str()).collect::<Vec<_>>());
    v["orders"] = Value::Array(
        d.orders
            .iter()
            .map(|o| {
                json!({
                    "kind": o.kind,
                    "term": o.term,
                    "base_resources": o.base_resources,
                    "amount": o.amount,
                    "currency": o.currency,
                    "period_start": rfc3339(o.period_start),
                    "period_end": rfc3339(o.period_end),
                    "at": rfc3339(o.at),
                })
            })
            .collect(),
    );
    v["next_deadline"] = opt_time(d.next_deadline);
    v
}

pub fn group_table(d: &GroupDetail) -> String {
    let g = &d.info;
    let p = &d.policy;
    let mut rows = vec![
        vec!["id".into(), g.id.clone()],
        vec!["name".into(), g.name.to_string()],
        vec!["status".into(), g.status.clone()],
        vec!["region".into(), g.region.clone()],
        vec!["office_network".into(), d.office_network.clone()],
        vec!["spec".into(), g.spec.clone()],
        vec!["image".into(), g.image.clone()],
        vec!["billing".into(), g.billing.clone()],
        vec!["term".into(), g.term.clone().unwrap_or_else(|| "-".into())],
        vec!["auto_renew".into(), yes_no(g.auto_renew)],
        vec!["base_resources".into(), g.base_resources.to_string()],
        vec!["session_type".into(), g.session_type.as_str().into()],
        vec!["expires_at".into(), opt_text(g.expires_at)],
        vec!["next_deadline".into(), opt_text(d.next_deadline)],
        vec![
            "policy".into(),
            format!(
                "concurrent_sessions={} usage_threshold={}% scale_out_step={} max_elastic={} max_idle={} scale_in_cooldown={} wait_timeout={} {}",
                p.concurrent_sessions, p.usage_threshold, p.scale_out_step, p.max_elastic,
                duration_text(p.max_idle_ms), duration_text(p.scale_in_cooldown_ms),
                duration_text(p.wait_timeout_ms), p.load_balancing
            ),
        ],
        vec!["policy_version".into(), d.policy_version.to_string()],
        vec!["policy_applied".into(), yes_no(d.policy_applied)],
        vec![
            "users".into(),
            d.users.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(", "),
        ],
        vec![
            "resources".into(),
            d.resources.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", "),
        ],
    ];
    for o in &d.orders {
        rows.push(vec![
            "order".into(),
            format!(
                "{} {} x{} {} {} ({} .. {})",
                o.kind,
                o.term,
                o.base_resources,
                o.amount,
                o.currency,
                rfc3339_secs(o.period_start),
                rfc3339_secs(o.period_end)
            ),
        ]);
    }
    for r in &d.policy_resources {
        let applied = match r.applied_version {
            Some(v) if v >= d.policy_version => format!("{} (version {v}, current)", r.resource),
            Some(v) => format!("{} (version {v}, behind)", r.resource),
            None => format!("{} (none applied)", r.resource),
        };
        rows.push(vec!["policy_on".into(), applied]);
    }
    for n in &d.notes {
        rows.push(vec!["note".into(), n.clone()]);
    }
    table(&["FIELD", "VALUE"], &rows)
}

/// Usage as `demand / capacity` in percent, exact and rounded half up to
/// one decimal; `None` without capacity.
pub fn usage_percent(demand: u64, capacity: u64) -> Option<String> {
    if capacity == 0 {
        return None;
    }
    let pct = rust_decimal::Decimal::from(demand) * rust_decimal::Decimal::from(100)
        / rust_decimal::Decimal::from(capacity);
    let mut pct =
        pct.round_dp_with_strategy(1, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
    // Always one decimal: `50.0`, not `50`.
    pct.rescale(1);
    Some(pct.to_string())
}

fn live_json(l: &LiveGroupView) -> Value {
    json!({
        "closed": l.closed,
        "demand": l.demand,
        "capacity": l.capacity,
        "usage_percent": usage_percent(l.demand, l.capacity),
        "usage_threshold": l.usage_threshold,
        "concurrent_sessions": l.concurrent_sessions,
        "engine_deadline": opt_time(l.engine_deadline),
        "flagged": l.flagged,
        "resources": l.resources.iter().map(|r| json!({
            "resource": r.resource.as_str(),
            "class": r.class,
            "state": r.state,
            "available": r.available,
            "sessions": r.sessions.len(),
            "concurrent_sessions": l.concurrent_sessions,
            "load": format!("{}/{}", r.sessions.len(), l.concurrent_sessions),
            "session_ids": r.sessions.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "flagged": r.flagged,
        })).collect::<Vec<_>>(),
    })
}

/// `group show --json`: the stored group, its live state under `live`
/// (`null` without a running actor) and the flags raised under `flagged`.
pub fn group_shown_json(d: &GroupDetail, live: Option<&LiveGroupView>) -> Value {
    let mut v = group_json(d);
    v["live"] = live.map(live_json).unwrap_or(Value::Null);
    v["flagged"] = json!(live.map(|l| l.flagged.clone()).unwrap_or_default());
    v
}

/// `group show`: the stored group, then its live state.
pub fn group_shown_table(d: &GroupDetail, live: Option<&LiveGroupView>) -> String {
    let mut out = group_table(d);
    let Some(l) = live else {
        out.push_str("\nlive: no running state (the group is not live in this broker)\n");
        return out;
    };
    out.push_str(&format!(
        "\nlive: {}  demand {}  capacity {}  usage {}  threshold {}%  next engine deadline {}\n",
        if l.closed {
            "closed (expired: no new sessions)"
        } else {
            "open"
        },
        l.demand,
        l.capacity,
        usage_percent(l.demand, l.capacity)
            .map(|u| format!("{u}%"))
            .unwrap_or_else(|| "-".into()),
        l.usage_threshold,
        opt_text(l.engine_deadline),
    ));
    let rows: Vec<Vec<String>> = l
        .resources
        .iter()
        .map(|r| {
            vec![
                r.resource.to_string(),
                r.class.clone(),
                r.state.clone(),
                yes_no(r.available),
                format!("{}/{}", r.sessions.len(), l.concurrent_sessions),
                if r.sessions.is_empty() {
                    "-".into()
                } else {
                    r.sessions
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                },
                if r.flagged.is_some() { "yes" } else { "-" }.into(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "RESOURCE",
            "CLASS",
            "STATE",
            "AVAILABLE",
            "LOAD",
            "SESSIONS",
            "FLAGGED",
        ],
        &rows,
    ));
    for f in &l.flagged {
        out.push_str(&format!("flagged: {}\n", escape(f)));
    }
    out
}

/// `group show`'s versions (JSON): the group's image and what each resource runs.
pub fn group_versions_json(v: &ferry_common::admin::GroupVersionsInfo) -> Value {
    json!({
        "image": v.image,
        "status": v.status,
        "resources": v.resources.iter().map(|r| json!({
            "resource": r.resource.as_str(),
            "connected": r.connected,
            "agent_version": r.agent_version,
            "image_version": r.image_version,
            "components": r.components.iter()
                .map(|c| json!({ "name": c.name, "version": c.version }))
                .collect::<Vec<_>>(),
            "image_update": r.image_update,
        })).collect::<Vec<_>>(),
    })
}

/// `group show`'s versions (table).
pub fn group_versions_table(v: &ferry_common::admin::GroupVersionsInfo) -> String {
    let mut out = format!("\nimage: {} (status {})\n", v.image, v.status);
    let rows: Vec<Vec<String>> = v
        .resources
        .iter()
        .map(|r| {
            vec![
                r.resource.to_string(),
                yes_no(r.connected),
                r.image_version.clone(),
                r.agent_version.clone(),
                if r.components.is_empty() {
                    "-".into()
                } else {
                    r.components
                        .iter()
                        .map(|c| format!("{}={}", c.name, c.version))
                        .collect::<Vec<_>>()
                        .join(",")
                },
                r.image_update.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "RESOURCE",
            "CONNECTED",
            "IMAGE",
            "AGENT",
            "COMPONENTS",
            "LAST IMAGE UPDATE",
        ],
        &rows,
    ));
    out
}

/// A group with every policy part (publish, update-policy and show with
/// the parts): the group (and its live state when present), the session and
/// display parts and the periods under `policy`.
pub fn group_policy_json(d: &ferry_common::admin::GroupPolicyDetail) -> Value {
    use ferry_common::admin::PolicyLimit;
    let limit = |l: PolicyLimit| match l {
        PolicyLimit::Unlimited => Value::Null,
        PolicyLimit::Ms(ms) => json!(ms),
    };
    let (s, disp) = (&d.parts.session, &d.parts.display);
    let mut v = group_shown_json(&d.detail, d.live.as_ref());
    v["policy"]["session"] = json!({
        "disconnect_retention_ms": limit(s.disconnect_retention),
        "max_session_duration_ms": limit(s.max_session_duration),
        "idle_disconnect_ms": limit(s.idle_disconnect),
    });
    v["policy"]["display"] = json!({
        "frame_rate": disp.frame_rate,
        "width": disp.width,
        "height": disp.height,
        "adaptive_resolution": disp.adaptive_resolution,
        "streaming_mode": disp.streaming_mode,
        "quality_strategy": disp.quality_strategy,
    });
    v["policy"]["periods"] = Value::Array(
        d.parts
            .periods
            .iter()
            .map(|p| {
                json!({
                    "days": crate::groups::policy_parts::format_weekdays(p.weekdays),
                    "start_minute": p.start_minute,
                    "end_minute": p.end_minute,
                    "min_ready": p.min_ready,
                    "warm_up_ms": p.warm_up_ms,
                    "text": crate::groups::policy_parts::format_period(p),
                })
            })
            .collect(),
    );
    v
}

/// [`group_policy_json`] as tables: the group, its policy parts, then its
/// live state when present.
pub fn group_policy_table(d: &ferry_common::admin::GroupPolicyDetail) -> String {
    use crate::groups::policy_parts::{format_limit, format_period};
    let (s, disp) = (&d.parts.session, &d.parts.display);
    let mut rows = vec![
        vec![
            "disconnect_retention".into(),
            format_limit(s.disconnect_retention, "forever"),
        ],
        vec![
            "max_session_duration".into(),
            format_limit(s.max_session_duration, "none"),
        ],
        vec![
            "idle_disconnect".into(),
            format_limit(s.idle_disconnect, "none"),
        ],
        vec!["frame_rate".into(), disp.frame_rate.to_string()],
        vec![
            "resolution".into(),
            format!("{}x{}", disp.width, disp.height),
        ],
        vec![
            "adaptive_resolution".into(),
            if disp.adaptive_resolution {
                "on"
            } else {
                "off"
            }
            .into(),
        ],
        vec!["streaming_mode".into(), disp.streaming_mode.clone()],
        vec!["quality_strategy".into(), disp.quality_strategy.clone()],
    ];
    if d.parts.periods.is_empty() {
        rows.push(vec!["period".into(), "none".into()]);
    }
    for p in &d.parts.periods {
        rows.push(vec!["period".into(), format!("{} (UTC)", format_period(p))]);
    }
    let group = group_table(&d.detail);
    let mut out = group.clone();
    out.push_str("\npolicy parts:\n");
    out.push_str(&table(&["FIELD", "VALUE"], &rows));
    if d.live.is_some() {
        let shown = group_shown_table(&d.detail, d.live.as_ref());
        out.push_str(shown.strip_prefix(group.as_str()).unwrap_or(&shown));
    }
    out
}

pub fn group_events_json(es: &[GroupEventInfo]) -> Value {
    Value::Array(
        es.iter()
            .map(|e| json!({ "at": rfc3339(e.at), "kind": e.kind, "message": e.message }))
            .collect(),
    )
}

pub fn group_events_table(es: &[GroupEventInfo]) -> String {
    let rows: Vec<Vec<String>> = es
        .iter()
        .map(|e| vec![rfc3339_secs(e.at), e.kind.clone(), e.message.clone()])
        .collect();
    table(&["AT", "KIND", "MESSAGE"], &rows)
}

/// `user token --json`.
pub fn user_token_json(user: &UserId, token: &str, expires_at: UnixMillis) -> Value {
    json!({
        "user": user.as_str(),
        "token": token,
        "expires_at": rfc3339(expires_at),
    })
}

/// `user token`: the token alone on its line (easy to copy or pipe), then
/// what it is; it is shown only this once.
pub fn user_token_text(user: &UserId, token: &str, expires_at: UnixMillis) -> String {
    format!(
        "{token}\n# token for {user}, valid until {}; shown only once (revoke with `ferryctl user revoke-tokens {user}`)\n",
        rfc3339_secs(expires_at)
    )
}

pub fn users_json(us: &[UserInfo]) -> Value {
    Value::Array(
        us.iter()
            .map(|u| {
                json!({
                    "id": u.id.as_str(),
                    "email": u.email,
                    "mobile": u.mobile,
                    "groups": u.groups.iter().map(|g| g.as_str()).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

pub fn users_table(us: &[UserInfo]) -> String {
    let rows: Vec<Vec<String>> = us
        .iter()
        .map(|u| {
            vec![
                u.id.to_string(),
                u.email.clone(),
                u.mobile.clone(),
                u.groups
                    .iter()
                    .map(|g| g.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            ]
        })
        .collect();
    table(&["ID", "EMAIL", "MOBILE", "GROUPS"], &rows)
}

/// Seconds as hours with two decimals (`1.50`), exact (no float).
pub fn hours(seconds: u64) -> String {
    let h = rust_decimal::Decimal::from(seconds) / rust_decimal::Decimal::from(3600);
    let mut h = h.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
    h.rescale(2);
    h.to_string()
}

/// An informative amount (decimal text) to 4 places, half up: `0.0172`.
fn amount_4dp(text: &str) -> String {
    match text.parse::<rust_decimal::Decimal>() {
        Ok(d) => {
            let mut d =
                d.round_dp_with_strategy(4, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
            d.rescale(4);
            d.to_string()
        }
        Err(_) => text.to_owned(),
    }
}

/// The amount cell of one resource: `None` when the report has no amounts
/// (an answer without them), `Some(None)` when the subscription pays it.
fn amount_cell(amount: Option<Option<&str>>) -> String {
    match amount {
        None => String::new(),
        Some(None) => "subscription".into(),
        Some(Some(a)) => amount_4dp(a),
    }
}

/// One row per resource (with its amount when `amounts` has it), then a
/// `(total)` row per group with its total.
fn usage_rows(
    r: &UsageReport,
    amounts: Option<&[ferry_common::admin::ResourceAmount]>,
) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for g in &r.groups {
        for res in &g.resources {
            let amount = amounts.map(|all| {
                all.iter()
                    .find(|a| a.group == g.group && a.resource == res.resource)
                    .and_then(|a| a.amount.as_deref())
            });
            rows.push(vec![
                g.group.to_string(),
                res.resource.to_string(),
                res.kind.clone(),
                res.sessions.to_string(),
                hours(res.session_seconds),
                hours(res.ready_seconds),
                amount_cell(amount),
            ]);
        }
        let sessions: u64 = g.resources.iter().map(|r| r.sessions).sum();
        let session_seconds: u64 = g.resources.iter().map(|r| r.session_seconds).sum();
        rows.push(vec![
            g.group.to_string(),
            "(total)".into(),
            g.billing.clone(),
            sessions.to_string(),
            hours(session_seconds),
            hours(g.base_seconds.saturating_add(g.elastic_seconds)),
            format!("{} {}", g.total, r.currency),
        ]);
    }
    rows
}

const USAGE_HEADER: [&str; 7] = [
    "GROUP",
    "RESOURCE",
    "KIND",
    "SESSIONS",
    "SESSION_HOURS",
    "RESOURCE_HOURS",
    "AMOUNT",
];

/// Each group's total as the sum of its billing lines.
fn usage_totals(r: &UsageReport) -> String {
    let mut out = String::new();
    for g in &r.groups {
        out.push_str(&format!(
            "{}: total {} {cur} = subscription {} + base {} + elastic {}\n",
            g.group,
            g.total,
            g.subscription,
            g.base_payg,
            g.elastic,
            cur = r.currency,
        ));
    }
    out
}

fn usage_text(r: &UsageReport, amounts: Option<&[ferry_common::admin::ResourceAmount]>) -> String {
    let mut out = format!(
        "usage from {} to {}\n{}\n{}",
        rfc3339_secs(r.from),
        rfc3339_secs(r.to),
        table(&USAGE_HEADER, &usage_rows(r, amounts)),
        usage_totals(r),
    );
    if amounts.is_some() {
        out.push_str(
            "\nA resource's AMOUNT is its exact amount to 4 places, for information. The bill \
             rounds each line\n(subscription, pay-as-you-go base, elastic) half up to 0.01; the \
             total is the sum of the\nrounded lines (SPEC 6).\n",
        );
    }
    out
}

/// `ferryctl usage` of a report without resource amounts.
pub fn usage_table(r: &UsageReport) -> String {
    usage_text(r, None)
}

/// `ferryctl usage`: the table with each resource's amount, each group's
/// total as the sum of its lines, and how the amounts are rounded.
pub fn usage_detail_table(d: &UsageDetail) -> String {
    let text = usage_text(&d.report, Some(&d.resources));
    let Some(note) = usage_so_far(d) else {
        return text;
    };
    // A report so far: say so on its first line.
    match text.split_once('\n') {
        Some((_, rest)) => format!("{note}\n{rest}"),
        None => text,
    }
}

/// What a report of a period that has not all passed covers, said the way
/// the table's first line says it; `None` for a period in the past. A
/// period that has not started yet bills nothing.
pub fn usage_so_far(d: &UsageDetail) -> Option<String> {
    if d.asked_to <= d.report.to {
        return None;
    }
    let from = rfc3339_secs(d.report.from);
    let ends = rfc3339_secs(d.asked_to);
    Some(if d.report.to <= d.report.from {
        format!(
            "usage from {from} to {ends}: the period has not started yet; nothing is billed \
             before time has passed"
        )
    } else {
        format!(
            "usage from {from} to {} (so far: the period ends {ends}; nothing later is billed)",
            rfc3339_secs(d.report.to)
        )
    })
}

/// `ferryctl usage --json`: [`usage_json`] with each resource's exact
/// `amount` (decimal text; `null` when the subscription pays it).
pub fn usage_detail_json(d: &UsageDetail) -> Value {
    let mut v = usage_json(&d.report);
    // `to` is where billing stops; a period still running is billed so far.
    v["so_far"] = json!(d.asked_to > d.report.to);
    v["period_to"] = json!(rfc3339(d.asked_to));
    for (gi, g) in d.report.groups.iter().enumerate() {
        for (ri, res) in g.resources.iter().enumerate() {
            let amount = d
                .resources
                .iter()
                .find(|a| a.group == g.group && a.resource == res.resource)
                .and_then(|a| a.amount.clone());
            v["groups"][gi]["resources"][ri]["amount"] = json!(amount);
        }
    }
    v
}

/// CSV with one row per resource and per group total; fields that may hold a
/// comma or a quote are quoted (RFC 4180).
pub fn usage_csv(r: &UsageReport) -> String {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_owned()
        }
    }
    let mut out = String::from(
        "group,resource,kind,sessions,session_seconds,resource_seconds,subscription,base_payg,elastic,total,currency\n",
    );
    for g in &r.groups {
        for res in &g.resources {
            let cells = [
                g.group.to_string(),
                res.resource.to_string(),
                res.kind.clone(),
                res.sessions.to_string(),
                res.session_seconds.to_string(),
                res.ready_seconds.to_string(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                r.currency.clone(),
            ];
            out.push_str(&cells.iter().map(|c| field(c)).collect::<Vec<_>>().join(","));
            out.push('\n');
        }
        let cells = [
            g.group.to_string(),
            String::new(),
            g.billing.clone(),
            g.resources
                .iter()
                .map(|r| r.sessions)
                .sum::<u64>()
                .to_string(),
            g.resources
                .iter()
                .map(|r| r.session_seconds)
                .sum::<u64>()
                .to_string(),
            (g.base_seconds.saturating_add(g.elastic_seconds)).to_string(),
            g.subscription.clone(),
            g.base_payg.clone(),
            g.elastic.clone(),
            g.total.clone(),
            r.currency.clone(),
        ];
        out.push_str(&cells.iter().map(|c| field(c)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

pub fn usage_json(r: &UsageReport) -> Value {
    json!({
        "from": rfc3339(r.from),
        "to": rfc3339(r.to),
        "currency": r.currency,
        "groups": r.groups.iter().map(|g| json!({
            "group": g.group.as_str(),
            "id": g.id,
            "billing": g.billing,
            "base_seconds": g.base_seconds,
            "base_hours": hours(g.base_seconds),
            "elastic_seconds": g.elastic_seconds,
            "elastic_hours": hours(g.elastic_seconds),
            "subscription": g.subscription,
            "base_payg": g.base_payg,
            "elastic": g.elastic,
            "total": g.total,
            "resources": g.resources.iter().map(|res| json!({
                "resource": res.resource.as_str(),
                "kind": res.kind,
                "sessions": res.sessions,
                "session_seconds": res.session_seconds,
                "session_hours": hours(res.session_seconds),
                "resource_seconds": res.ready_seconds,
                "resource_hours": hours(res.ready_seconds),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// `sessions list --json`: [`sessions_json`]'s fields, plus `group`, `state`
/// (`open`, `retained`, `ended`), `disconnected_at` and `retained_until`.
pub fn sessions_detail_json(ss: &[SessionDetail]) -> Value {
    let infos: Vec<SessionInfo> = ss.iter().map(|s| s.info.clone()).collect();
    let mut v = sessions_json(&infos);
    if let Value::Array(items) = &mut v {
        for (item, s) in items.iter_mut().zip(ss) {
            item["group"] = json!(s.group.as_ref().map(|g| g.as_str()));
            item["state"] = json!(s.state);
            item["disconnected_at"] = opt_time(s.disconnected_at);
            item["retained_until"] = opt_time(s.retained_until);
        }
    }
    v
}

/// A session's state for people: `open`, `ended`, or `retained
/// (disconnected since T, until T)`.
fn session_state(s: &SessionDetail) -> String {
    if s.state != "retained" {
        return s.state.clone();
    }
    format!(
        "retained (disconnected since {}, until {})",
        opt_text(s.disconnected_at),
        s.retained_until
            .map(rfc3339_secs)
            .unwrap_or_else(|| "the user is back: forever".into())
    )
}

/// `sessions list`.
pub fn sessions_detail_table(ss: &[SessionDetail]) -> String {
    let rows: Vec<Vec<String>> = ss
        .iter()
        .map(|s| {
            vec![
                s.info.session.to_string(),
                s.info.resource.to_string(),
                s.group
                    .as_ref()
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "-".into()),
                s.info.user.to_string(),
                session_state(s),
                rfc3339_secs(s.info.started_at),
                opt_text(s.info.ended_at),
                s.info.end_reason.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "SESSION", "RESOURCE", "GROUP", "USER", "STATE", "STARTED", "ENDED", "REASON",
        ],
        &rows,
    )
}

/// `user list --json`: [`users_json`]'s fields plus `password_set`,
/// `token_generation` and `token_expires_at`.
pub fn users_detail_json(us: &[UserDetail]) -> Value {
    let infos: Vec<UserInfo> = us.iter().map(|u| u.info.clone()).collect();
    let mut v = users_json(&infos);
    if let Value::Array(items) = &mut v {
        for (item, u) in items.iter_mut().zip(us) {
            item["password_set"] = json!(u.password_set);
            item["token_generation"] = json!(u.token_generation);
            item["token_expires_at"] = opt_time(u.token_expires_at);
        }
    }
    v
}

/// What a user's tokens are: `until T` (the newest issued since the last
/// revocation), `none issued`, or `revoked` (none since).
fn tokens_text(u: &UserDetail) -> String {
    match (u.token_expires_at, u.token_generation) {
        (Some(t), _) => format!("issued, until {}", rfc3339_secs(t)),
        (None, 0) => "none issued".into(),
        (None, _) => "revoked".into(),
    }
}

/// `user list`.
pub fn users_detail_table(us: &[UserDetail]) -> String {
    let rows: Vec<Vec<String>> = us
        .iter()
        .map(|u| {
            vec![
                u.info.id.to_string(),
                u.info.email.clone(),
                u.info.mobile.clone(),
                if u.password_set { "set" } else { "-" }.into(),
                tokens_text(u),
                u.info
                    .groups
                    .iter()
                    .map(|g| g.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            ]
        })
        .collect();
    table(
        &["ID", "EMAIL", "MOBILE", "PASSWORD", "TOKENS", "GROUPS"],
        &rows,
    )
}

/// `group events --json`: `at`, `kind`, `message`, `group`, and
/// `resource`, `session`, `user` where the event names them (else `null`).
pub fn group_events_detail_json(es: &[GroupEventDetail]) -> Value {
    Value::Array(
        es.iter()
            .map(|e| {
                json!({
                    "at": rfc3339(e.event.at),
                    "kind": e.event.kind,
                    "message": e.event.message,
                    "group": e.group.as_str(),
                    "resource": e.resource.as_ref().map(|r| r.as_str()),
                    "session": e.session.as_ref().map(|s| s.as_str()),
                    "user": e.user.as_ref().map(|u| u.as_str()),
                })
            })
            .collect(),
    )
}

/// `group events`.
pub fn group_events_detail_table(es: &[GroupEventDetail]) -> String {
    let events: Vec<GroupEventInfo> = es.iter().map(|e| e.event.clone()).collect();
    group_events_table(&events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::wire::HostFacts;

    #[test]
    fn time_left_is_whole_seconds_rounded_up() {
        assert_eq!(time_left(299_999), "5m");
        assert_eq!(time_left(300_000), "5m");
        assert_eq!(time_left(300_001), "5m1s");
        assert_eq!(time_left(1), "1s");
        assert_eq!(time_left(0), "0s");
        assert_eq!(time_left(-5_000), "0s");
    }

    #[test]
    fn usage_is_exact_with_one_decimal() {
        assert_eq!(usage_percent(3, 6).as_deref(), Some("50.0"));
        assert_eq!(usage_percent(1, 3).as_deref(), Some("33.3"));
        assert_eq!(usage_percent(2, 3).as_deref(), Some("66.7"));
        assert_eq!(usage_percent(1, 8).as_deref(), Some("12.5"));
        assert_eq!(usage_percent(1, 16).as_deref(), Some("6.3"), "half up");
        assert_eq!(usage_percent(9, 4).as_deref(), Some("225.0"));
        assert_eq!(usage_percent(0, 0), None);
    }

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

    /// A value a host or a user chose never reaches the operator's terminal
    /// as a control character, in a table, an error line or JSON.
    #[test]
    fn text_from_outside_is_escaped_on_output() {
        let hostile = "1.0\u{1b}[2J\u{1b}]0;t\u{7}\u{9b}31m\u{202e}\r\nfake row";
        let raw = |out: &str| {
            out.chars()
                .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}')
        };
        let s = SessionInfo {
            session: "s1".parse().expect("id"),
            resource: "h1".parse().expect("id"),
            user: "u".parse().expect("id"),
            started_at: UnixMillis(0),
            ended_at: Some(UnixMillis(1_000)),
            end_reason: Some(hostile.into()),
        };
        let t = sessions_table(std::slice::from_ref(&s));
        assert!(!raw(&t), "{t:?}");
        assert_eq!(t.lines().count(), 2, "{t}");
        assert!(
            t.contains("1.0\\u001b[2J\\u001b]0;t\\u0007\\u009b31m\\u202e\\r\\nfake row"),
            "{t}"
        );
        // serde escapes C0 controls in JSON, not C1 ones or bidi overrides;
        // what ferryctl prints is made safe as a whole, to an equal document.
        let value = sessions_json(&[s]);
        let json = terminal_safe(&format!("{value:#}")).into_owned();
        assert!(!raw(&json), "{json:?}");
        let back: Value = serde_json::from_str(&json).expect("still JSON");
        assert_eq!(back, value);

        let r = ResourceInfo {
            resource: "h1".parse().expect("id"),
            group: None,
            connected: true,
            available: true,
            draining: false,
            agent_version: hostile.into(),
            image_version: hostile.into(),
            last_health_at: None,
            sessions: 0,
            host: HostFacts {
                hostname: hostile.into(),
                os: hostile.into(),
                kernel: hostile.into(),
                vcpus: 1,
                memory_bytes: 1,
            },
        };
        let t = resources_table(std::slice::from_ref(&r));
        assert!(!raw(&t) && t.lines().count() == 2, "{t:?}");
        let json = terminal_safe(&resources_json(&[r]).to_string()).into_owned();
        assert!(!raw(&json), "{json:?}");
        assert_eq!(terminal_safe("a\nb\u{1b}"), "a\nb\\u001b");

        let e = std::io::Error::other(hostile);
        let line = error_chain(&e);
        assert!(!raw(&line) && !line.contains('\n'), "{line:?}");
        assert_eq!(escape("plain text, é"), "plain text, é");
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

    #[test]
    fn usage_hours_are_exact_and_csv_totals_carry_the_amounts() {
        use ferry_common::admin::{GroupUsage, ResourceUsage};
        assert_eq!(super::hours(5400), "1.50");
        assert_eq!(super::hours(18), "0.01");
        let r = UsageReport {
            from: UnixMillis(0),
            to: UnixMillis(3_600_000),
            currency: "CNY".into(),
            groups: vec![GroupUsage {
                group: "g1".parse().expect("name"),
                id: "dg-1".into(),
                billing: "pay-as-you-go".into(),
                resources: vec![ResourceUsage {
                    resource: "h1".parse().expect("id"),
                    kind: "base".into(),
                    sessions: 2,
                    session_seconds: 3600,
                    ready_seconds: 3600,
                }],
                base_seconds: 3600,
                elastic_seconds: 0,
                subscription: "0.00".into(),
                base_payg: "0.62".into(),
                elastic: "0.00".into(),
                total: "0.62".into(),
            }],
        };
        let csv = super::usage_csv(&r);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1], "g1,h1,base,2,3600,3600,,,,,CNY");
        assert_eq!(
            lines[2],
            "g1,,pay-as-you-go,2,3600,3600,0.00,0.62,0.00,0.62,CNY"
        );
        assert_eq!(super::usage_json(&r)["groups"][0]["total"], "0.62");
    }

    fn one_group_report() -> UsageReport {
        use ferry_common::admin::{GroupUsage, ResourceUsage};
        UsageReport {
            from: UnixMillis(1_772_409_600_000),
            to: UnixMillis(1_772_496_000_000),
            currency: "CNY".into(),
            groups: vec![GroupUsage {
                group: "design".parse().expect("name"),
                id: "dg-1".into(),
                billing: "pay-as-you-go".into(),
                resources: vec![
                    ResourceUsage {
                        resource: "h1".parse().expect("id"),
                        kind: "base".into(),
                        sessions: 2,
                        session_seconds: 100,
                        ready_seconds: 100,
                    },
                    ResourceUsage {
                        resource: "design-e1".parse().expect("id"),
                        kind: "elastic".into(),
                        sessions: 1,
                        session_seconds: 50,
                        ready_seconds: 62,
                    },
                ],
                base_seconds: 100,
                elastic_seconds: 62,
                subscription: "0.00".into(),
                base_payg: "0.02".into(),
                elastic: "0.01".into(),
                total: "0.03".into(),
            }],
        }
    }

    #[test]
    fn a_report_so_far_says_so_and_when_the_period_ends() {
        let report = one_group_report();
        let asked_to = UnixMillis(report.to.0 + 3_600_000);
        let d = UsageDetail {
            report,
            resources: vec![],
            asked_to,
        };
        let t = usage_detail_table(&d);
        assert!(
            t.starts_with(
                "usage from 2026-03-02T00:00:00Z to 2026-03-03T00:00:00Z (so far: the period \
                 ends 2026-03-03T01:00:00Z; nothing later is billed)\n"
            ),
            "{t}"
        );
        assert_eq!(usage_so_far(&d).as_deref(), t.lines().next());
        let j = usage_detail_json(&d);
        assert_eq!(j["so_far"], true);
        assert_eq!(j["to"], "2026-03-03T00:00:00.000Z");
        assert_eq!(j["period_to"], "2026-03-03T01:00:00.000Z");
    }

    #[test]
    fn a_period_not_started_yet_says_so_and_bills_nothing() {
        let mut report = one_group_report();
        // Asked entirely in the future: the report stops where it starts.
        report.to = report.from;
        let asked_to = UnixMillis(report.from.0 + 86_400_000);
        let d = UsageDetail {
            report,
            resources: vec![],
            asked_to,
        };
        let t = usage_detail_table(&d);
        assert!(
            t.starts_with(
                "usage from 2026-03-02T00:00:00Z to 2026-03-03T00:00:00Z: the period has not \
                 started yet; nothing is billed before time has passed\n"
            ),
            "{t}"
        );
        assert_eq!(usage_so_far(&d).as_deref(), t.lines().next());
        let past = UsageDetail {
            asked_to: d.report.to,
            ..d
        };
        assert_eq!(usage_so_far(&past), None);
    }

    #[test]
    fn the_usage_table_fills_each_amount_and_sums_the_rounded_lines() {
        use ferry_common::admin::ResourceAmount;
        let d = UsageDetail {
            report: one_group_report(),
            asked_to: one_group_report().to,
            resources: vec![
                ResourceAmount {
                    group: "design".parse().expect("name"),
                    resource: "h1".parse().expect("id"),
                    amount: Some("0.0172222222222222222222222222".into()),
                },
                ResourceAmount {
                    group: "design".parse().expect("name"),
                    resource: "design-e1".parse().expect("id"),
                    amount: Some("0.01068".into()),
                },
            ],
        };
        let t = usage_detail_table(&d);
        assert!(
            t.starts_with("usage from 2026-03-02T00:00:00Z to 2026-03-03T00:00:00Z\n"),
            "{t}"
        );
        let line = |needle: &str| {
            t.lines()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle} in {t}"))
                .to_owned()
        };
        assert!(line("h1 ").ends_with("0.0172"), "{t}");
        assert!(line("design-e1").ends_with("0.0107"), "half up: {t}");
        let total = line("(total)");
        assert!(total.ends_with("0.03 CNY"), "{t}");
        assert!(total.contains("0.05"), "resource hours summed: {t}");
        assert!(
            t.contains("design: total 0.03 CNY = subscription 0.00 + base 0.02 + elastic 0.01\n"),
            "{t}"
        );
        assert!(t.contains("sum of the\nrounded lines"), "{t}");
        let j = usage_detail_json(&d);
        assert_eq!(
            j["groups"][0]["resources"][0]["amount"],
            "0.0172222222222222222222222222"
        );
        assert_eq!(j["groups"][0]["total"], "0.03");
    }

    #[test]
    fn sessions_show_their_group_and_retention_in_whole_seconds() {
        let info = |id: &str, ended: Option<i64>| SessionInfo {
            session: id.parse().expect("id"),
            resource: "h1".parse().expect("id"),
            user: "alice".parse().expect("id"),
            started_at: UnixMillis(1_772_445_720_123),
            ended_at: ended.map(UnixMillis),
            end_reason: ended.map(|_| "logout".into()),
        };
        let detail = |id: &str, state: &str, ended: Option<i64>| SessionDetail {
            info: info(id, ended),
            group: Some("design".parse().expect("name")),
            state: state.into(),
            disconnected_at: (state == "retained").then_some(UnixMillis(1_772_445_780_000)),
            retained_until: (state == "retained").then_some(UnixMillis(1_772_446_680_000)),
        };
        let ss = [
            detail("s1", "open", None),
            detail("s2", "retained", None),
            detail("s3", "ended", Some(1_772_445_900_000)),
        ];
        let t = sessions_detail_table(&ss);
        assert!(
            t.starts_with("SESSION  RESOURCE  GROUP   USER   STATE"),
            "{t}"
        );
        assert!(
            t.contains(
                "retained (disconnected since 2026-03-02T10:03:00Z, until 2026-03-02T10:18:00Z)"
            ),
            "{t}"
        );
        assert!(t.contains("2026-03-02T10:02:00Z"), "whole seconds: {t}");
        assert!(!t.contains(".123"), "{t}");
        let j = sessions_detail_json(&ss);
        assert_eq!(j[1]["state"], "retained");
        assert_eq!(j[1]["group"], "design");
        assert_eq!(j[1]["retained_until"], "2026-03-02T10:18:00.000Z");
        assert_eq!(j[0]["session"], "s1", "the old fields stay");
        assert!(j[0]["retained_until"].is_null());
    }

    #[test]
    fn users_show_password_and_tokens() {
        let user = |id: &str, password_set, token_generation, expires: Option<i64>| UserDetail {
            info: UserInfo {
                id: id.parse().expect("id"),
                email: format!("{id}@example.com"),
                mobile: "+8613800000000".into(),
                groups: vec![],
            },
            password_set,
            token_generation,
            token_expires_at: expires.map(UnixMillis),
        };
        let us = [
            user("alice", true, 0, Some(1_772_445_720_000)),
            user("bob", false, 0, None),
            user("carol", true, 2, None),
        ];
        let t = users_detail_table(&us);
        let row = |id: &str| {
            t.lines()
                .find(|l| l.starts_with(id))
                .unwrap_or_else(|| panic!("{id} in {t}"))
                .to_owned()
        };
        assert!(
            t.starts_with("ID     EMAIL              MOBILE          PASSWORD  TOKENS"),
            "{t}"
        );
        assert!(
            row("alice").contains("set       issued, until 2026-03-02T10:02:00Z"),
            "{t}"
        );
        assert!(row("bob").contains(" -         none issued"), "{t}");
        assert!(row("carol").contains("set       revoked"), "{t}");
        let j = users_detail_json(&us);
        assert_eq!(j[1]["password_set"], false);
        assert_eq!(j[2]["token_generation"], 2);
        assert_eq!(j[0]["id"], "alice", "the old fields stay");
    }

    #[test]
    fn whole_seconds_and_written_durations() {
        assert_eq!(
            rfc3339_secs(UnixMillis(1_796_528_090_994)),
            "2026-12-06T03:34:50Z"
        );
        assert_eq!(duration_text(3_600_000), "1h");
        assert_eq!(duration_text(5_400_000), "1h30m");
        assert_eq!(duration_text(0), "0s");
        let text = user_token_text(
            &"u".parse().expect("id"),
            "t",
            UnixMillis(1_796_528_090_994),
        );
        assert!(text.contains("valid until 2026-12-06T03:34:50Z;"), "{text}");
    }
}
