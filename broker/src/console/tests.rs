//! The console's router in-process (no browser): sign-in, the form token,
//! the period and policy forms, and what nobody signed in gets.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::*;
use crate::registry::Registry;

struct Fixture {
    _tmp: tempfile::TempDir,
    console: Shared,
    app: Router,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = crate::store::testing::open_for_test(tmp.path());
    let registry = Arc::new(Registry::new());
    let (groups, ota) = crate::test_support::wire(
        &store,
        &registry,
        Default::default(),
        &TaskTracker::new(),
        &CancellationToken::new(),
    );
    let ctx = AdminContext {
        store,
        registry,
        groups,
        ota,
        cluster: None,
        peers: None,
        console: None,
    };
    let console = Arc::new(Console {
        ctx,
        logins: Arc::new(Logins::new(std::time::Duration::from_secs(60))),
        live: Arc::new(live::Live::default()),
        secure: true,
        streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
    });
    Fixture {
        _tmp: tmp,
        app: router(console.clone()),
        console,
    }
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let r = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = r.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.expect("body");
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn get(path: &str, cookie: Option<&str>) -> Request<Body> {
    let mut b = Request::get(path);
    if let Some(c) = cookie {
        b = b.header("cookie", format!("{}={c}", auth::COOKIE));
    }
    b.body(Body::empty()).expect("request")
}

/// Signs in through `/login` and returns the cookie value.
async fn signed_in(f: &Fixture) -> String {
    let token = f.console.logins.new_link().expect("link");
    // Opening the link shows a form and uses nothing up.
    let (status, _, page) = send(
        &f.app,
        get(&format!("/login?token={token}&next=/usage"), None),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("id=\"sign-in\""), "{page}");
    let req = Request::post("/login")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(format!("token={token}&next=/usage")))
        .expect("request");
    let (status, headers, _) = send(&f.app, req).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers["location"], "/usage");
    let set = headers["set-cookie"].to_str().expect("ascii");
    for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(set.contains(flag), "{flag} missing from {set}");
    }
    set.split(';')
        .next()
        .and_then(|kv| kv.split_once('='))
        .map(|(_, v)| v.to_owned())
        .expect("cookie value")
}

#[tokio::test]
async fn pages_need_a_session_and_a_link_works_once() {
    let f = fixture();
    let (status, headers, body) = send(&f.app, get("/", None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("ferryctl console login"), "{body}");
    assert!(headers["content-security-policy"]
        .to_str()
        .expect("ascii")
        .contains("script-src 'self'"));
    let (status, _, _) = send(&f.app, get("/", Some("made-up"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let cookie = signed_in(&f).await;
    let (status, _, body) = send(&f.app, get("/", Some(&cookie))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("No delivery groups yet"), "{body}");
    let (status, _, _) = send(&f.app, get("/static/console.js", None)).await;
    assert_eq!(status, StatusCode::OK, "static files need no session");
}

#[tokio::test]
async fn a_post_without_the_form_token_is_refused() {
    let f = fixture();
    let cookie = signed_in(&f).await;
    let post = |body: &str| {
        Request::post("/resources/host-1/drain")
            .header("cookie", format!("{}={cookie}", auth::COOKIE))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(body.to_owned()))
            .expect("request")
    };
    let (status, _, _) = send(&f.app, post("group=g1")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = send(&f.app, post("group=g1&form_token=guess")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // With the session's token the request reaches the broker, which says
    // the host is not known (nothing is connected here).
    let token = f
        .console
        .logins
        .session(&cookie)
        .expect("session")
        .form_token;
    let (status, headers, _) = send(&f.app, post(&format!("group=g1&form_token={token}"))).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let location = headers["location"].to_str().expect("ascii");
    assert_eq!(location, "/groups/g1");
    let notice = headers["set-cookie"].to_str().expect("ascii");
    assert!(notice.starts_with("ferry_notice="), "{notice}");
    // The notice comes back as the cookie and is read as it was said.
    let value = notice.split(';').next().expect("pair");
    let mut h = axum::http::HeaderMap::new();
    h.insert(
        header::COOKIE,
        HeaderValue::from_str(&format!("a=1; {value}")).expect("header"),
    );
    let (ok, text) = notice_of(&h).expect("a notice");
    assert!(!ok);
    assert!(text.contains("host-1"), "{text}");
}

#[tokio::test]
async fn sign_out_ends_the_session() {
    let f = fixture();
    let cookie = signed_in(&f).await;
    let token = f
        .console
        .logins
        .session(&cookie)
        .expect("session")
        .form_token;
    let req = Request::post("/logout")
        .header("cookie", format!("{}={cookie}", auth::COOKIE))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(format!("form_token={token}")))
        .expect("request");
    let (status, _, _) = send(&f.app, req).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send(&f.app, get("/", Some(&cookie))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[test]
fn next_is_only_a_path_of_this_console() {
    assert_eq!(local_path(Some("/groups/g1")), "/groups/g1");
    assert_eq!(local_path(Some("//evil.example/x")), "/");
    assert_eq!(local_path(Some("https://evil.example/")), "/");
    assert_eq!(local_path(Some("/\\evil.example")), "/");
    assert_eq!(local_path(Some("/\t/evil.example")), "/");
    assert_eq!(local_path(Some("/%0A")), "/%0A", "escapes stay escaped");
    assert_eq!(local_path(None), "/");
}

#[test]
fn the_policy_form_sends_only_what_changed_and_lists_what_does_not_parse() {
    let form = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let problems = policy_of(&form(&[
        ("usage_threshold", "eighty"),
        ("scale_out_step", "-1"),
        ("max_idle_s", "1.0005"),
        ("max_elastic", "99999999999"),
    ]))
    .expect_err("four problems");
    assert_eq!(problems.len(), 4, "{problems:?}");
    let spec = policy_of(&form(&[
        ("max_idle_s", "90"),
        ("wait_timeout_s", "1.5"),
        ("was_wait_timeout_s", "1.5"),
        ("scale_in_cooldown_s", "0.25"),
        ("load_balancing", "depth-first"),
        ("was_load_balancing", "breadth-first"),
        ("concurrent_sessions", ""),
    ]))
    .expect("valid");
    assert_eq!(spec.max_idle_ms, Some(90_000));
    assert_eq!(
        spec.wait_timeout_ms, None,
        "shown as it was: kept as stored"
    );
    assert_eq!(spec.scale_in_cooldown_ms, Some(250));
    assert_eq!(
        spec.concurrent_sessions, None,
        "an empty field keeps the value"
    );
    assert_eq!(spec.load_balancing.as_deref(), Some("depth-first"));
}

#[test]
fn a_usage_period_is_whole_days_this_month_by_default() {
    // 2026-12-06T20:00:00Z
    let now = UnixMillis(1_796_587_200_000);
    let (q, from, to) = period_of(&PeriodQuery::default(), now).expect("default");
    assert_eq!((from.as_str(), to.as_str()), ("2026-12-01", "2026-12-06"));
    assert_eq!(q.from, UnixMillis(1_796_083_200_000));
    assert_eq!(q.to.0 - q.from.0, 6 * 86_400_000);
    let bad = PeriodQuery {
        from: Some("2026-12-07".into()),
        to: Some("2026-12-01".into()),
        group: None,
    };
    assert!(period_of(&bad, now).is_err());
    let junk = PeriodQuery {
        from: Some("yesterday".into()),
        ..PeriodQuery::default()
    };
    assert!(period_of(&junk, now)
        .expect_err("junk")
        .contains("YYYY-MM-DD"));
}
