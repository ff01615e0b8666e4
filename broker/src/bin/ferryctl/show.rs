//! A broker's answer as a table or as JSON (`--json`).

use ferry_broker::render;
use ferry_common::admin::AdminResponseV1;

/// The table or JSON of `resp`: one arm per answer, each naming its two
/// renderings.
pub(crate) fn show(resp: AdminResponseV1, json: bool) -> String {
    let (value, table) = match resp {
        AdminResponseV1::Status(s) => (render::status_json(&s), render::status_table(&s)),
        AdminResponseV1::Resources(r) => (render::resources_json(&r), render::resources_table(&r)),
        AdminResponseV1::ResourcesWithRevocations {
            resources,
            revocations,
        } => (
            render::resources_revoked_json(&resources, &revocations),
            render::resources_revoked_table(&resources, &revocations),
        ),
        AdminResponseV1::Sessions(s) => (render::sessions_json(&s), render::sessions_table(&s)),
        AdminResponseV1::Cluster(c) => (render::cluster_json(&c), render::cluster_table(&c)),
        AdminResponseV1::ConsoleLink { url, expires_at } => (
            serde_json::json!({ "url": url, "expires_at": render::rfc3339(expires_at) }),
            format!(
                "Open this link to sign in to the console (it works once, until {}):\n{url}\n",
                render::rfc3339_secs(expires_at)
            ),
        ),
        AdminResponseV1::Done { message } => (
            serde_json::json!({ "message": message }),
            format!("{message}\n"),
        ),
        AdminResponseV1::Groups(g) => (render::groups_json(&g), render::groups_table(&g)),
        AdminResponseV1::Group(d) => (render::group_json(&d), render::group_table(&d)),
        AdminResponseV1::GroupShown { detail, live } => (
            render::group_shown_json(&detail, live.as_ref()),
            render::group_shown_table(&detail, live.as_ref()),
        ),
        AdminResponseV1::GroupVersions(v) => (
            render::group_versions_json(&v),
            render::group_versions_table(&v),
        ),
        AdminResponseV1::GroupWithPolicy(d) => (
            render::group_policy_json(&d),
            render::group_policy_table(&d),
        ),
        AdminResponseV1::GroupEvents(e) => (
            render::group_events_json(&e),
            render::group_events_table(&e),
        ),
        AdminResponseV1::Users(u) => (render::users_json(&u), render::users_table(&u)),
        AdminResponseV1::Usage(r) => (render::usage_json(&r), render::usage_table(&r)),
        AdminResponseV1::OtaUpdates(u) => (
            ferry_broker::ota::render::updates_json(&u),
            ferry_broker::ota::render::updates_table(&u),
        ),
        AdminResponseV1::OtaSchedules(s) => (
            ferry_broker::ota::render::schedules_json(&s),
            ferry_broker::ota::render::schedules_table(&s),
        ),
        AdminResponseV1::OtaUpdatesAndSchedules { updates, schedules } => (
            ferry_broker::ota::render::list_json(&updates, &schedules),
            ferry_broker::ota::render::list_table(&updates, &schedules),
        ),
        AdminResponseV1::GroupRollouts(r) => {
            let mut value = render::group_versions_json(&r.versions);
            value["rollouts"] = ferry_broker::ota::render::rollouts_json(&r.rollouts);
            (
                value,
                render::group_versions_table(&r.versions)
                    + &ferry_broker::ota::render::rollouts_table(&r.rollouts),
            )
        }
        AdminResponseV1::UserToken {
            user,
            token,
            expires_at,
        } => (
            render::user_token_json(&user, &token, expires_at),
            render::user_token_text(&user, &token, expires_at),
        ),
        AdminResponseV1::UsageDetailed(d) => (
            render::usage_detail_json(&d),
            render::usage_detail_table(&d),
        ),
        AdminResponseV1::SessionsDetailed(s) => (
            render::sessions_detail_json(&s),
            render::sessions_detail_table(&s),
        ),
        AdminResponseV1::UsersDetailed(u) => (
            render::users_detail_json(&u),
            render::users_detail_table(&u),
        ),
        AdminResponseV1::GroupEventsDetailed(e) => (
            render::group_events_detail_json(&e),
            render::group_events_detail_table(&e),
        ),
        // `admin::request` turns error answers into `Err`.
        AdminResponseV1::Error(e) => (
            serde_json::json!({ "error": e.message }),
            format!("{}\n", e.message),
        ),
    };
    if json {
        format!("{value:#}\n")
    } else {
        table
    }
}
