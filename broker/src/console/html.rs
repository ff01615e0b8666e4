//! The console's pages as HTML text: pure functions of what the admin
//! answers gave (no I/O), every value from a host, a user or the operator
//! escaped where it is written.

use std::fmt::Write as _;

use ferry_common::admin::{
    GroupEventDetail, GroupInfo, GroupPolicyDetail, GroupRolloutsInfo, LiveGroupView,
    OtaScheduleInfo, OtaUpdateInfo, ResourceInfo, SessionInfo, UsageDetail,
};
use ferry_common::UnixMillis;

use crate::render;

/// Text made safe for HTML element content and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// A path segment (group, resource or session id) made safe for a URL.
pub fn seg(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn time(t: UnixMillis) -> String {
    esc(&render::rfc3339_secs(t))
}

fn opt_time(t: Option<UnixMillis>) -> String {
    t.map(time).unwrap_or_else(|| "—".into())
}

/// Which part of the console a page belongs to (its menu entry).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Groups,
    Usage,
    Updates,
    None,
}

/// A whole page: head, menu (with the sign-out form), `body`.
pub fn page(title: &str, section: Section, form_token: Option<&str>, body: &str) -> String {
    let item = |s: Section, href: &str, label: &str| {
        let current = if s == section {
            " aria-current=\"page\""
        } else {
            ""
        };
        format!("<a href=\"{href}\"{current}>{label}</a>")
    };
    let menu = match form_token {
        Some(token) => format!(
            "<nav>{}{}{}<form method=\"post\" action=\"/logout\" class=\"logout\">\
             <input type=\"hidden\" name=\"form_token\" value=\"{}\">\
             <button type=\"submit\">Sign out</button></form></nav>",
            item(Section::Groups, "/", "Groups"),
            item(Section::Usage, "/usage", "Usage"),
            item(Section::Updates, "/updates", "Updates"),
            esc(token),
        ),
        None => String::new(),
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Ferry</title><link rel=\"stylesheet\" href=\"/static/console.css\">\
         <script src=\"/static/console.js\" defer></script></head>\
         <body><header><span class=\"brand\">Ferry</span>{menu}</header>\
         <main>{body}</main></body></html>\n",
        esc(title)
    )
}

/// A page that only says something (sign-in needed, not found, ...).
pub fn message(title: &str, text: &str) -> String {
    page(
        title,
        Section::None,
        None,
        &format!(
            "<h1>{}</h1><p class=\"message\">{}</p>",
            esc(title),
            esc(text)
        ),
    )
}

/// One group's line in the groups list: its record, its live state when
/// its actor runs here, its cost so far this month.
pub struct GroupLine<'a> {
    pub info: &'a GroupInfo,
    pub live: Option<&'a super::live::Figures>,
    /// Decimal text with its currency.
    pub cost: Option<String>,
}

fn sessions_of(live: &LiveGroupView) -> u64 {
    live.resources.iter().map(|r| r.sessions.len() as u64).sum()
}

fn load_text(live: &LiveGroupView) -> String {
    load_of(live.demand, live.capacity, live.usage_threshold)
}

/// Usage against the threshold: `62.5% of 80%`.
fn load_of(demand: u64, capacity: u64, threshold: u32) -> String {
    match render::usage_percent(demand, capacity) {
        Some(p) => format!("{p} of {threshold}%"),
        None => format!("no capacity (threshold {threshold}%)"),
    }
}

/// The groups list.
pub fn groups_page(lines: &[GroupLine<'_>], month: &str, form_token: &str) -> String {
    let mut rows = String::new();
    for l in lines {
        let g = l.info;
        let (sessions, capacity, load) = match l.live {
            Some(f) => (
                f.sessions.to_string(),
                f.capacity.to_string(),
                load_of(f.demand, f.capacity, f.threshold),
            ),
            None => ("—".into(), "—".into(), "—".into()),
        };
        let _ = write!(
            rows,
            "<tr data-group=\"{name}\"><td><a href=\"/groups/{href}\">{name}</a></td>\
             <td class=\"status status-{status}\">{status}</td><td>{billing}</td>\
             <td class=\"num sessions\">{sessions}</td><td class=\"num capacity\">{capacity}</td>\
             <td class=\"load\">{load}</td><td class=\"num cost\">{cost}</td></tr>",
            name = esc(g.name.as_str()),
            href = seg(g.name.as_str()),
            status = esc(&g.status),
            billing = esc(&g.billing),
            load = esc(&load),
            cost = esc(l.cost.as_deref().unwrap_or("—")),
        );
    }
    if lines.is_empty() {
        rows.push_str(
            "<tr><td colspan=\"7\">No delivery groups yet: publish one with \
             <code>ferryctl group publish</code>.</td></tr>",
        );
    }
    page(
        "Delivery groups",
        Section::Groups,
        Some(form_token),
        &format!(
            "<h1>Delivery groups</h1><table id=\"groups\"><thead><tr><th>Group</th>\
             <th>Status</th><th>Billing</th><th>Sessions</th><th>Capacity</th><th>Load</th>\
             <th>Cost ({})</th></tr></thead><tbody>{rows}</tbody></table>",
            esc(month)
        ),
    )
}

/// Everything the group page shows.
pub struct GroupPage<'a> {
    pub policy: &'a GroupPolicyDetail,
    pub live: Option<&'a LiveGroupView>,
    /// Where the group is served when it is not here.
    pub served_by: Option<&'a str>,
    /// The connected hosts of the group, as the registry knows them.
    pub hosts: &'a [ResourceInfo],
    /// Open sessions on the group's hosts.
    pub sessions: &'a [SessionInfo],
    pub events: &'a [GroupEventDetail],
    pub rollouts: Option<&'a GroupRolloutsInfo>,
    /// The live chart (SVG).
    pub chart: &'a str,
    /// What the last action said: (ok, text).
    pub notice: Option<(bool, &'a str)>,
    /// Every problem of a refused policy change.
    pub problems: &'a [String],
    /// What the operator typed in the refused form (shown again).
    pub typed: Option<&'a std::collections::HashMap<String, String>>,
}

fn action(path: &str, label: &str, group: &str, token: &str, class: &str) -> String {
    format!(
        "<form method=\"post\" action=\"{path}\" class=\"inline\">\
         <input type=\"hidden\" name=\"form_token\" value=\"{}\">\
         <input type=\"hidden\" name=\"group\" value=\"{}\">\
         <button type=\"submit\" class=\"{class}\">{label}</button></form>",
        esc(token),
        esc(group)
    )
}

/// Live figures with ids the page's script updates from the event stream.
fn live_figures(live: Option<&LiveGroupView>) -> String {
    let Some(live) = live else {
        return "<p class=\"message\">The group has no live state here (not running, or \
                served by another broker).</p>"
            .into();
    };
    let sessions = sessions_of(live);
    let waiting = live.demand.saturating_sub(sessions);
    format!(
        "<dl class=\"figures\"><div><dt>Sessions</dt><dd id=\"live-sessions\">{sessions}</dd></div>\
         <div><dt>Waiting</dt><dd id=\"live-waiting\">{waiting}</dd></div>\
         <div><dt>Capacity</dt><dd id=\"live-capacity\">{}</dd></div>\
         <div><dt>Usage</dt><dd id=\"live-usage\">{}</dd></div>\
         <div><dt>Resources</dt><dd id=\"live-resource-count\">{}</dd></div></dl>",
        live.capacity,
        esc(&load_text(live)),
        live.resources
            .iter()
            .filter(|r| r.state != "released")
            .count(),
    )
}

pub fn group_page(p: &GroupPage<'_>, form_token: &str) -> String {
    let d = &p.policy.detail;
    let g = &d.info;
    let name = g.name.as_str();
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>{}</h1><p class=\"facts\"><span class=\"status status-{st}\">{st}</span> · {} · \
         {} · image {} · {} base</p>",
        esc(name),
        esc(&g.billing),
        esc(&g.region),
        esc(&g.image),
        g.base_resources,
        st = esc(&g.status),
    );
    if let Some(owner) = p.served_by {
        let _ = write!(
            body,
            "<p class=\"message\">Served by the broker at {}: its live figures come from there.</p>",
            esc(owner)
        );
    }
    if let Some((ok, text)) = p.notice {
        let class = if ok { "notice ok" } else { "notice error" };
        let _ = write!(
            body,
            "<p class=\"{class}\" role=\"status\">{}</p>",
            esc(text)
        );
    }
    let parts = live_parts(p, form_token);
    let chart = match p.served_by {
        Some(owner) => format!(
            "<p class=\"message\">The live chart is drawn by the console of the broker that \
             serves the group ({}); the figures above come from it.</p>",
            esc(owner)
        ),
        None => p.chart.to_owned(),
    };
    let _ = write!(
        body,
        "<div id=\"live-figures\">{}</div><section><h2>Load</h2>\
         <div id=\"live-chart\" data-live=\"/groups/{}/live\">{}</div></section>\
         <div id=\"live-table\">{}</div>",
        parts.figures,
        seg(name),
        chart,
        parts.resources
    );
    body.push_str(&policy_section(p, form_token));
    body.push_str(&rollouts_section(p.rollouts));
    let _ = write!(body, "<div id=\"live-decisions\">{}</div>", parts.decisions);
    page(name, Section::Groups, Some(form_token), &body)
}

/// The parts of a group page that change as the group does, rendered
/// again for each live update: the figures, the resources with their
/// sessions and buttons, the decisions.
pub struct LiveParts {
    pub figures: String,
    pub resources: String,
    pub decisions: String,
}

pub fn live_parts(p: &GroupPage<'_>, form_token: &str) -> LiveParts {
    LiveParts {
        figures: live_figures(p.live),
        resources: resources_section(p, form_token),
        decisions: decisions_section(p.events),
    }
}

fn resources_section(p: &GroupPage<'_>, token: &str) -> String {
    let name = p.policy.detail.info.name.as_str();
    let per_host = p
        .live
        .map(|l| l.concurrent_sessions)
        .unwrap_or(p.policy.detail.policy.concurrent_sessions);
    let mut rows = String::new();
    let live_resources = p.live.map(|l| l.resources.as_slice()).unwrap_or(&[]);
    // The engine's resources first (its view of state and sessions), then
    // hosts of the group it does not count (yet).
    let mut listed: Vec<&str> = Vec::new();
    for r in live_resources {
        listed.push(r.resource.as_str());
        if r.state == "released" {
            continue;
        }
        let host = p.hosts.iter().find(|h| h.resource == r.resource);
        rows.push_str(&resource_row(
            r.resource.as_str(),
            &r.class,
            &r.state,
            r.available,
            &r.sessions
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect::<Vec<_>>(),
            per_host,
            host,
            name,
            token,
        ));
    }
    for h in p.hosts {
        // Connected hosts of the group the engine does not count (yet);
        // one it released is gone from the page.
        if listed.contains(&h.resource.as_str()) || !h.connected {
            continue;
        }
        let sessions: Vec<String> = p
            .sessions
            .iter()
            .filter(|s| s.resource == h.resource && s.ended_at.is_none())
            .map(|s| s.session.as_str().to_owned())
            .collect();
        rows.push_str(&resource_row(
            h.resource.as_str(),
            "—",
            if h.connected { "connected" } else { "offline" },
            h.available,
            &sessions,
            per_host,
            Some(h),
            name,
            token,
        ));
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"7\">No resources.</td></tr>");
    }
    let waiting = p
        .live
        .map(|l| l.demand.saturating_sub(sessions_of(l)))
        .unwrap_or(0);
    format!(
        "<section><h2>Resources</h2><table id=\"resources\"><thead><tr><th>Resource</th>\
         <th>Class</th><th>State</th><th>Sessions</th><th>Versions</th><th>Health</th>\
         <th></th></tr></thead><tbody>{rows}</tbody></table>\
         <h3>Waiting room</h3><p id=\"waiting-room\">{}</p></section>",
        if waiting == 0 {
            "Nobody is waiting.".to_owned()
        } else {
            format!(
                "{waiting} request{} waiting for room (admitted in arrival order as \
                 capacity comes up, or refused after the policy's wait timeout).",
                if waiting == 1 { "" } else { "s" }
            )
        }
    )
}

#[allow(clippy::too_many_arguments)]
fn resource_row(
    resource: &str,
    class: &str,
    state: &str,
    available: bool,
    sessions: &[String],
    per_host: u32,
    host: Option<&ResourceInfo>,
    group: &str,
    token: &str,
) -> String {
    let mut session_list = String::new();
    for s in sessions {
        let _ = write!(
            session_list,
            "<li><code>{}</code>{}</li>",
            esc(s),
            action(
                &format!("/sessions/{}/disconnect", seg(s)),
                "Disconnect",
                group,
                token,
                "small"
            )
        );
    }
    let (versions, health, draining) = match host {
        Some(h) => (
            format!(
                "agent {} · image {}",
                esc(&h.agent_version),
                esc(&h.image_version)
            ),
            format!(
                "{}{}",
                if !h.connected {
                    "offline".to_owned()
                } else if h.available {
                    "healthy".to_owned()
                } else {
                    "health late".to_owned()
                },
                h.last_health_at
                    .map(|t| format!(" (last {})", time(t)))
                    .unwrap_or_default()
            ),
            h.draining,
        ),
        None => ("—".into(), "not connected".into(), false),
    };
    let button = match host {
        Some(h) if h.connected && draining => action(
            &format!("/resources/{}/undrain", seg(resource)),
            "Undrain",
            group,
            token,
            "",
        ),
        Some(h) if h.connected => action(
            &format!("/resources/{}/drain", seg(resource)),
            "Drain",
            group,
            token,
            "",
        ),
        _ => String::new(),
    };
    format!(
        "<tr data-resource=\"{r}\" data-draining=\"{draining}\"><td><code>{r}</code></td>\
         <td>{}</td><td class=\"state\">{}{}</td><td>{} of {per_host}<ul class=\"sessions\">\
         {session_list}</ul></td><td>{versions}</td><td>{}</td><td>{button}</td></tr>",
        esc(class),
        esc(state),
        if draining {
            " · draining"
        } else if !available {
            " · not taking sessions"
        } else {
            ""
        },
        sessions.len(),
        esc(&health),
        r = esc(resource),
    )
}

fn policy_section(p: &GroupPage<'_>, token: &str) -> String {
    let v = &p.policy.detail.policy;
    let name = p.policy.detail.info.name.as_str();
    // Each field carries the value it was shown with: only what the
    // operator changed is sent as a change (a value the form rounds, such
    // as 1500 ms shown as 1.5 s, stays as stored).
    // After a refusal the fields show what was typed, beside the problems.
    let field = |key: &str, label: &str, value: String, hint: &str| {
        let shown = p
            .typed
            .and_then(|t| t.get(key))
            .cloned()
            .unwrap_or_else(|| value.clone());
        format!(
            "<label>{label}<input name=\"{key}\" value=\"{}\" inputmode=\"decimal\">\
             <input type=\"hidden\" name=\"was_{key}\" value=\"{}\">\
             <small>{hint}</small></label>",
            esc(&shown),
            esc(&value)
        )
    };
    let mut problems = String::new();
    if !p.problems.is_empty() {
        problems.push_str("<ul class=\"problems\" role=\"alert\">");
        for pr in p.problems {
            let _ = write!(problems, "<li>{}</li>", esc(pr));
        }
        problems.push_str("</ul>");
    }
    let secs = |ms: u64| {
        let d = rust_decimal::Decimal::from(ms) / rust_decimal::Decimal::ONE_THOUSAND;
        d.normalize().to_string()
    };
    format!(
        "<section><h2>Policy</h2><p>Version {} · {}</p>{problems}\
         <form method=\"post\" action=\"/groups/{}/policy\" id=\"policy\" class=\"policy\">\
         <input type=\"hidden\" name=\"form_token\" value=\"{}\">{}{}{}{}{}{}{}\
         <label>Load balancing<select name=\"load_balancing\">{}</select>\
         <input type=\"hidden\" name=\"was_load_balancing\" value=\"{}\"></label>\
         <button type=\"submit\">Change the policy</button></form></section>",
        p.policy.detail.policy_version,
        if p.policy.detail.policy_applied {
            "applied by every host"
        } else {
            "not yet applied by every host"
        },
        seg(name),
        esc(token),
        field(
            "concurrent_sessions",
            "Sessions per resource",
            v.concurrent_sessions.to_string(),
            ""
        ),
        field(
            "usage_threshold",
            "Usage threshold (%)",
            v.usage_threshold.to_string(),
            "scale out above it"
        ),
        field(
            "scale_out_step",
            "Scale-out step",
            v.scale_out_step.to_string(),
            "resources added at once"
        ),
        field(
            "max_elastic",
            "Elastic resources at most",
            v.max_elastic.to_string(),
            ""
        ),
        field(
            "max_idle_s",
            "Idle time before release (s)",
            secs(v.max_idle_ms),
            ""
        ),
        field(
            "scale_in_cooldown_s",
            "Scale-in cooldown (s)",
            secs(v.scale_in_cooldown_ms),
            ""
        ),
        field(
            "wait_timeout_s",
            "Wait timeout (s)",
            secs(v.wait_timeout_ms),
            "how long a request may wait for room"
        ),
        ["breadth-first", "depth-first"]
            .iter()
            .map(|o| format!(
                "<option{}>{o}</option>",
                if *o == v.load_balancing {
                    " selected"
                } else {
                    ""
                }
            ))
            .collect::<String>(),
        esc(&v.load_balancing),
    )
}

fn rollouts_section(r: Option<&GroupRolloutsInfo>) -> String {
    let Some(r) = r else {
        return String::new();
    };
    if r.rollouts.is_empty() {
        return "<section><h2>Updates</h2><p>No update running or scheduled.</p></section>".into();
    }
    let mut out = String::from("<section><h2>Updates</h2>");
    for ro in &r.rollouts {
        out.push_str(&rollout_block(ro));
    }
    out.push_str("</section>");
    out
}

/// A running image update or OTA wave with its hosts' progress.
fn rollout_block(ro: &ferry_common::admin::RolloutInfo) -> String {
    let (kind, id, component, version, state, start) = (
        ro.kind.as_str(),
        ro.id,
        ro.component.as_str(),
        ro.version.as_str(),
        ro.state.as_str(),
        ro.start,
    );
    let hosts = &ro.hosts;
    let done = hosts
        .iter()
        .filter(|h| matches!(h.step.as_str(), "done" | "skipped"))
        .count();
    let mut rows = String::new();
    for h in hosts {
        let (resource, step, detail) = (h.resource.as_str(), &h.step, &h.detail);
        let _ = write!(
            rows,
            "<tr><td><code>{}</code></td><td class=\"step step-{s}\">{s}</td><td>{}</td></tr>",
            esc(resource),
            esc(detail.as_deref().unwrap_or("")),
            s = esc(step),
        );
    }
    format!(
        "<div class=\"rollout\" data-rollout=\"{id}\"><h3>{} #{id}: {} {} · {}</h3>\
         <p>Starts {} · {done} of {} hosts done</p><progress value=\"{done}\" max=\"{}\">\
         </progress><table><thead><tr><th>Host</th><th>Step</th><th>Detail</th></tr></thead>\
         <tbody>{rows}</tbody></table></div>",
        esc(kind),
        esc(component),
        esc(version),
        esc(state),
        time(start),
        hosts.len(),
        hosts.len().max(1),
    )
}

fn decisions_section(events: &[GroupEventDetail]) -> String {
    let mut items = String::new();
    for e in events.iter().rev().take(200) {
        let _ = write!(
            items,
            "<li class=\"event kind-{k}\"><time>{}</time> <span class=\"kind\">{k}</span> {}{}</li>",
            time(e.event.at),
            esc(&e.event.message),
            e.resource
                .as_ref()
                .map(|r| format!(" <code>{}</code>", esc(r.as_str())))
                .unwrap_or_default(),
            k = esc(&e.event.kind),
        );
    }
    if items.is_empty() {
        items.push_str("<li>No decisions recorded yet.</li>");
    }
    format!(
        "<section><h2>Decisions</h2><ol id=\"decisions\" class=\"timeline\">{items}</ol></section>"
    )
}

/// The usage page: the period's form, the chart, the report's table, the
/// CSV link.
pub fn usage_page(
    d: &UsageDetail,
    (from, to, group): (&str, &str, &str),
    csv_href: &str,
    chart: &str,
    form_token: &str,
) -> String {
    let r = &d.report;
    let mut rows = String::new();
    for g in &r.groups {
        let _ = write!(
            rows,
            "<tr data-group=\"{n}\"><td><a href=\"/groups/{h}\">{n}</a></td><td>{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num total\">{}</td></tr>",
            esc(&g.billing),
            esc(&render::hours(g.base_seconds)),
            esc(&render::hours(g.elastic_seconds)),
            esc(&g.subscription),
            esc(&g.base_payg),
            esc(&g.elastic),
            esc(&g.total),
            n = esc(g.group.as_str()),
            h = seg(g.group.as_str()),
        );
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"8\">No usage in this period.</td></tr>");
    }
    let so_far = render::usage_so_far(d)
        .map(|n| format!("<p class=\"message\">{}</p>", esc(&n)))
        .unwrap_or_default();
    page(
        "Usage",
        Section::Usage,
        Some(form_token),
        &format!(
            "<h1>Usage and cost</h1><form method=\"get\" action=\"/usage\" class=\"period\">\
             <label>From <input type=\"date\" name=\"from\" value=\"{}\"></label>\
             <label>To <input type=\"date\" name=\"to\" value=\"{}\"></label>\
             <input type=\"hidden\" name=\"group\" value=\"{}\">\
             <button type=\"submit\">Show</button></form>{so_far}\
             <div class=\"chart\" id=\"usage-chart\">{chart}</div>\
             <table id=\"usage\"><thead><tr><th>Group</th><th>Billing</th><th>Base hours</th>\
             <th>Elastic hours</th><th>Subscription</th><th>Base (pay-as-you-go)</th>\
             <th>Elastic</th><th>Total ({})</th></tr></thead><tbody>{rows}</tbody></table>\
             <p><a id=\"usage-csv\" href=\"{}\" download>Download CSV</a></p>",
            esc(from),
            esc(to),
            esc(group),
            esc(&r.currency),
            esc(csv_href),
        ),
    )
}

/// The updates page: offers, their schedules with per-host outcomes, and
/// each group's running rollouts.
pub fn updates_page(
    updates: &[OtaUpdateInfo],
    schedules: &[OtaScheduleInfo],
    rollouts: &[(String, GroupRolloutsInfo)],
    form_token: &str,
) -> String {
    let mut body = String::from("<h1>Updates</h1><section><h2>Offered</h2>");
    if updates.is_empty() {
        body.push_str("<p>No update offered (<code>ferryctl ota offer</code>).</p>");
    } else {
        body.push_str(
            "<table id=\"offers\"><thead><tr><th>#</th><th>Group</th><th>Component</th>\
             <th>Version</th><th>Description</th><th>Offered</th></tr></thead><tbody>",
        );
        for u in updates {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                u.id,
                esc(u.group.as_str()),
                esc(&u.component),
                esc(&u.version),
                esc(&u.description),
                time(u.offered_at)
            );
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("</section><section><h2>Schedules</h2>");
    if schedules.is_empty() {
        body.push_str("<p>Nothing scheduled.</p>");
    }
    for s in schedules {
        let _ = write!(
            body,
            "<div class=\"schedule\" data-schedule=\"{}\"><h3>Schedule #{}: {} {} on {} · {}</h3>\
             <p>Starts {} · waves of {} · started {} · finished {}{}</p>",
            s.id,
            s.id,
            esc(&s.update.component),
            esc(&s.update.version),
            esc(s.update.group.as_str()),
            esc(&s.state),
            time(s.start),
            s.wave,
            opt_time(s.started_at),
            opt_time(s.finished_at),
            s.detail
                .as_ref()
                .map(|d| format!(" · {}", esc(d)))
                .unwrap_or_default(),
        );
        if !s.resources.is_empty() {
            body.push_str(
                "<table><thead><tr><th>Host</th><th>State</th><th>Started</th>\
                 <th>Finished</th><th>Detail</th></tr></thead><tbody>",
            );
            for r in &s.resources {
                let _ = write!(
                    body,
                    "<tr><td><code>{}</code></td><td class=\"step step-{st}\">{st}</td><td>{}</td>\
                     <td>{}</td><td>{}</td></tr>",
                    esc(r.resource.as_str()),
                    opt_time(r.started_at),
                    opt_time(r.finished_at),
                    esc(r.detail.as_deref().unwrap_or("")),
                    st = esc(&r.state),
                );
            }
            body.push_str("</tbody></table>");
        }
        body.push_str("</div>");
    }
    body.push_str("</section><section><h2>Running now</h2>");
    let mut any = false;
    for (group, r) in rollouts {
        for ro in &r.rollouts {
            any = true;
            let _ = write!(body, "<p class=\"group-of\">{}</p>", esc(group));
            body.push_str(&rollout_block(ro));
        }
    }
    if !any {
        body.push_str("<p>No image update or OTA wave is running.</p>");
    }
    body.push_str("</section>");
    page("Updates", Section::Updates, Some(form_token), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_segments_are_escaped() {
        assert_eq!(
            esc("<script>\"a\" & 'b'</script>"),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
        assert_eq!(esc("a\u{1b}b"), "a\\u{001b}b");
        assert_eq!(seg("host 1/../x"), "host%201%2F..%2Fx");
        assert_eq!(seg("dg-1_a.b~"), "dg-1_a.b~");
    }

    #[test]
    fn a_rollout_shows_each_host_s_step_and_how_many_are_done() {
        use ferry_common::admin::{RolloutHostInfo, RolloutInfo};
        let host = |r: &str, step: &str, detail: Option<&str>| RolloutHostInfo {
            resource: r.parse().expect("id"),
            step: step.into(),
            until: None,
            detail: detail.map(str::to_owned),
        };
        let ro = RolloutInfo {
            kind: "ota".into(),
            id: 7,
            update: Some(3),
            component: "client<x>".into(),
            version: "2.1".into(),
            state: "running".into(),
            start: UnixMillis(0),
            deadline: None,
            wave: 2,
            drain_ms: 0,
            hosts: vec![
                host("h1", "done", None),
                host("h2", "skipped", None),
                host("h3", "failed", Some("hook exited 3: <disk full>")),
                host("h4", "waiting", None),
            ],
        };
        let html = rollout_block(&ro);
        assert!(html.contains("2 of 4 hosts done"), "{html}");
        assert!(html.contains("<progress value=\"2\" max=\"4\">"), "{html}");
        assert!(html.contains("client&lt;x&gt;"));
        assert!(html.contains("hook exited 3: &lt;disk full&gt;"));
        assert!(html.contains("class=\"step step-failed\">failed"));
    }

    #[test]
    fn a_page_carries_the_sign_out_form_only_when_signed_in() {
        let signed = page("T", Section::Groups, Some("tok\"en"), "<p>x</p>");
        assert!(signed.contains("value=\"tok&quot;en\""));
        assert!(signed.contains("aria-current=\"page\">Groups"));
        let anonymous = message("Sign in", "use a link");
        assert!(!anonymous.contains("/logout"));
    }
}
