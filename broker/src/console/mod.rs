//! The web console (`[console] listen`): what an operator looks at.
//!
//! Server-rendered HTML over [`ferry_process::http`]: the groups with
//! status, load and cost so far; a group's resources, waiting room, policy,
//! updates and decisions, with a live chart of sessions, capacity and usage
//! against the threshold (scale-outs and scale-ins marked) that the broker
//! draws as SVG and pushes as server-sent events the moment the group's
//! figures change; usage and cost per group and per day with a CSV
//! download; OTA offers, schedules and rollouts host by host.
//!
//! Every read and every action is an admin request answered by
//! [`admin::handle`]: the console has the same rules, validation and
//! messages as `ferryctl`, and in a cluster its drains, disconnections and
//! live views reach the group's owner the same way. Who may use it: see
//! [`auth`] (one-time links from `ferryctl console login`). Every
//! state-changing request is a POST carrying the session's form token.
//! The pages run one small same-origin script (the live updates) and load
//! nothing from elsewhere (a content security policy says so).

pub mod auth;
pub mod html;
pub mod live;
mod pictures;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use ferry_common::admin::{AdminRequestV1, AdminResponseV1, GroupFilter, PolicySpec, UsageQuery};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminContext};
use crate::config::ConsoleConfig;
use auth::{AuthError, Logins, Session};

/// How long the groups page waits for another broker's figures.
const REMOTE_FIGURES_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Longest period the usage chart draws, day by day.
const MAX_CHART_DAYS: usize = 62;

/// Largest form body read.
const MAX_FORM_BYTES: usize = 16 * 1024;

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("bind console {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("console TLS: {0}")]
    Tls(#[from] crate::pki::PkiError),
}

/// The console's listener, bound before the broker says it is ready.
pub struct Bound {
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    base_url: String,
    logins: Arc<Logins>,
}

impl Bound {
    /// Binds `config.listen` and loads the broker's certificate when the
    /// console serves TLS.
    pub async fn bind(
        config: &ConsoleConfig,
        pki_dir: &std::path::Path,
    ) -> Result<Bound, ConsoleError> {
        let tls = if config.tls {
            Some(crate::pki::https_server_config(pki_dir)?)
        } else {
            None
        };
        let bind_err = |error| ConsoleError::Bind {
            addr: config.listen,
            error,
        };
        let listener = TcpListener::bind(config.listen).await.map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let base_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| base_url(addr, config.tls));
        Ok(Bound {
            listener,
            addr,
            tls,
            base_url,
            logins: Arc::new(Logins::new(config.session_ttl)),
        })
    }

    /// Where the console listens (the real port when the config said 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What hands out login links (the admin request `ConsoleLogin`).
    pub fn issuer(&self) -> LinkIssuer {
        LinkIssuer {
            logins: self.logins.clone(),
            base_url: self.base_url.clone(),
        }
    }

    /// Serves the console until `shutdown`, and follows the groups' live
    /// figures for it.
    pub fn serve(self, ctx: AdminContext, tracker: &TaskTracker, shutdown: CancellationToken) {
        let live = Arc::new(live::Live::default());
        tracker.spawn(live::follow(ctx.clone(), live.clone(), shutdown.clone()));
        let console = Arc::new(Console {
            ctx,
            logins: self.logins,
            live,
            secure: self.tls.is_some() || self.base_url.starts_with("https://"),
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        });
        tracing::info!(url = %self.base_url, "console ready (`ferryctl console login` gives a sign-in link)");
        tracker.spawn(ferry_process::http::serve(
            self.listener,
            self.tls,
            router(console),
            ferry_process::http::HttpLimits::default(),
            shutdown,
        ));
    }
}

/// `http(s)://addr`, with the host's name for a wildcard address.
fn base_url(addr: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    if addr.ip().is_unspecified() {
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        format!("{scheme}://{host}:{}", addr.port())
    } else {
        format!("{scheme}://{addr}")
    }
}

/// Makes login links: held by the admin handler.
#[derive(Clone)]
pub struct LinkIssuer {
    logins: Arc<Logins>,
    base_url: String,
}

impl admin::ConsoleLinks for LinkIssuer {
    fn link(&self) -> Result<(String, UnixMillis), String> {
        self.new_link().map_err(|e| e.to_string())
    }
}

impl LinkIssuer {
    /// A new one-time link and when it stops working.
    pub fn new_link(&self) -> Result<(String, UnixMillis), AuthError> {
        let token = self.logins.new_link()?;
        let lifetime = i64::try_from(auth::LINK_LIFETIME.as_millis()).unwrap_or(i64::MAX);
        let expires = UnixMillis(crate::clock::now_millis().0.saturating_add(lifetime));
        Ok((format!("{}/login?token={token}", self.base_url), expires))
    }
}

struct Console {
    ctx: AdminContext,
    logins: Arc<Logins>,
    live: Arc<live::Live>,
    /// Cookies are `Secure`: the console is reached over HTTPS (its own
    /// TLS, or a proxy's when `public_url` is `https://`).
    secure: bool,
    /// Live streams open at once (each holds a connection and asks the
    /// broker again at each change of its group).
    streams: Arc<tokio::sync::Semaphore>,
}

/// Live streams served at once; past this a page works without live updates.
const MAX_STREAMS: usize = 32;
/// Shortest time between two updates of one stream.
const STREAM_MIN_GAP: std::time::Duration = std::time::Duration::from_secs(1);
/// How often a stream with nothing to say checks its session is still on.
const STREAM_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

type Shared = Arc<Console>;

fn router(console: Shared) -> Router {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/", get(groups_page))
        .route("/groups/{group}", get(group_page))
        .route("/groups/{group}/live", get(group_live))
        .route("/groups/{group}/policy", post(change_policy))
        .route("/resources/{resource}/{verb}", post(resource_action))
        .route("/sessions/{session}/disconnect", post(disconnect))
        .route("/usage", get(usage_page))
        .route("/usage.csv", get(usage_csv))
        .route("/updates", get(updates_page))
        .route("/static/console.css", get(css))
        .route("/static/console.js", get(js))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(console)
}

/// Headers on every answer: no caching of pages, no framing, scripts and
/// styles only from here.
async fn secure_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; connect-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn not_found() -> Response {
    html(
        StatusCode::NOT_FOUND,
        html::message("Not found", "There is no such page in the console."),
    )
}

/// A request from a signed-in session (its cookie is known and current).
struct Signed {
    cookie: String,
    session: Session,
}

impl Signed {
    /// A short name of the session for the logs (not the secret).
    fn id(&self) -> String {
        auth::short_id(&self.cookie)
    }
}

impl FromRequestParts<Shared> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, console: &Shared) -> Result<Self, Response> {
        match cookie_of(&parts.headers, auth::COOKIE)
            .and_then(|c| console.logins.session(&c).map(|s| (c, s)))
        {
            Some((cookie, session)) => Ok(Signed { cookie, session }),
            None => Err(html(
                StatusCode::UNAUTHORIZED,
                html::message(
                    "Sign in",
                    "Sign in with a link from `ferryctl console login`, run where the broker's \
                     admin socket is reachable. A link works once, for ten minutes.",
                ),
            )),
        }
    }
}

/// A POST's form with its form token checked against the session.
fn checked_form(signed: &Signed, form: &HashMap<String, String>) -> Result<(), Response> {
    match form.get("form_token") {
        Some(t) if auth::form_token_matches(&signed.session, t) => Ok(()),
        _ => Err(html(
            StatusCode::FORBIDDEN,
            html::message(
                "Refused",
                "The form did not carry this session's token (a page from before a sign-in, \
                 or a request from another site). Reload the page and try again.",
            ),
        )),
    }
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    token: String,
    /// A page of the console to go to once signed in.
    next: Option<String>,
}

/// `next` when it is a path of this console (not another site's address):
/// a `/` not followed by another `/`, and nothing a browser could read
/// another way.
fn local_path(next: Option<&str>) -> &str {
    let plain = |p: &str| {
        p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-._~?=&%".contains(&b))
    };
    match next {
        Some(p) if p.starts_with('/') && !p.starts_with("//") && plain(p) => p,
        _ => "/",
    }
}

/// The link's page: a button that signs in. Opening a link changes
/// nothing, so a mail scanner or a chat's preview does not use it up.
async fn login_page(Query(q): Query<LoginQuery>) -> Response {
    let body = format!(
        "<h1>Sign in</h1><p>This link signs you in to the Ferry console once.</p>\
         <form method=\"post\" action=\"/login\" id=\"sign-in\">\
         <input type=\"hidden\" name=\"token\" value=\"{}\">\
         <input type=\"hidden\" name=\"next\" value=\"{}\">\
         <button type=\"submit\">Sign in</button></form>",
        html::esc(&q.token),
        html::esc(local_path(q.next.as_deref())),
    );
    html(
        StatusCode::OK,
        html::page("Sign in", html::Section::None, None, &body),
    )
}

async fn login(
    State(c): State<Shared>,
    headers: axum::http::HeaderMap,
    peer: Option<axum::Extension<ferry_process::http::Peer>>,
    Form(q): Form<LoginQuery>,
) -> Response {
    match c.logins.sign_in(&q.token) {
        Ok((cookie, _)) => {
            // A sign-in replaces the browser's earlier session.
            if let Some(old) = cookie_of(&headers, auth::COOKIE) {
                c.logins.sign_out(&old);
            }
            let secure = if c.secure { "; Secure" } else { "" };
            let max_age = c.logins.session_ttl().as_secs();
            let set = format!(
                "{}={cookie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}",
                auth::COOKIE
            );
            tracing::info!(session = %auth::short_id(&cookie), client = ?peer.map(|p| p.0.addr),
                "console: signed in with a login link");
            let mut r = Redirect::to(local_path(q.next.as_deref())).into_response();
            if let Ok(v) = HeaderValue::from_str(&set) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => html(
            StatusCode::FORBIDDEN,
            html::message("Sign in", &e.to_string()),
        ),
    }
}

/// The session cookie a request carries, if any.
fn cookie_of(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|h| auth::cookie_value(h, name))
        .map(str::to_owned)
}

async fn logout(
    signed: Signed,
    State(c): State<Shared>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    if let Err(r) = checked_form(&signed, &f) {
        return r;
    }
    c.logins.sign_out(&signed.cookie);
    let mut r = html(
        StatusCode::OK,
        html::message("Signed out", "You are signed out of the console."),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("{}=; Path=/; Max-Age=0", auth::COOKIE)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// An admin answer that is an error, as the page that says it.
fn admin_error(answer: AdminResponseV1) -> Response {
    match answer {
        AdminResponseV1::Error(e) => {
            let status = match e.code {
                ferry_common::admin::AdminErrorCode::NotFound => StatusCode::NOT_FOUND,
                ferry_common::admin::AdminErrorCode::Invalid
                | ferry_common::admin::AdminErrorCode::NotAllowed => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                _ => StatusCode::BAD_GATEWAY,
            };
            html(status, html::message("Could not do that", &e.message))
        }
        other => html(
            StatusCode::INTERNAL_SERVER_ERROR,
            html::message(
                "Could not do that",
                &format!("unexpected answer from the broker: {}", answer_kind(&other)),
            ),
        ),
    }
}

fn answer_kind(a: &AdminResponseV1) -> &'static str {
    match a {
        AdminResponseV1::Error(_) => "an error",
        _ => "another kind of answer",
    }
}

/// The first day of the current month (UTC) and now.
fn this_month(now: UnixMillis) -> (UnixMillis, String) {
    use chrono::Datelike;
    let t = chrono::DateTime::from_timestamp_millis(now.0).unwrap_or_default();
    let start = chrono::NaiveDate::from_ymd_opt(t.year(), t.month(), 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc().timestamp_millis())
        .unwrap_or(0);
    (UnixMillis(start), t.format("%B %Y").to_string())
}

async fn groups_page(signed: Signed, State(c): State<Shared>) -> Response {
    let groups =
        match admin::handle(&c.ctx, AdminRequestV1::GroupList(GroupFilter::default())).await {
            AdminResponseV1::Groups(gs) => gs,
            other => return admin_error(other),
        };
    let now = c.ctx.groups.service().now();
    let (month_start, month) = this_month(now);
    let costs: HashMap<GroupName, String> = match admin::handle(
        &c.ctx,
        AdminRequestV1::Usage(UsageQuery {
            group: None,
            from: month_start,
            to: now,
        }),
    )
    .await
    {
        AdminResponseV1::Usage(r) => r
            .groups
            .into_iter()
            .map(|g| (g.group, format!("{} {}", g.total, r.currency)))
            .collect(),
        _ => HashMap::new(),
    };
    // Groups followed here: their newest figures. Groups served by other
    // brokers: asked all at once, each for at most a few seconds (a broker
    // that does not answer leaves its groups' figures blank).
    let mut lives: HashMap<GroupName, live::Figures> = HashMap::new();
    let mut elsewhere = Vec::new();
    for g in groups.iter().filter(|g| g.status != "gone") {
        match c
            .live
            .history(&g.name)
            .and_then(|h| h.points.back().cloned())
        {
            Some(point) => {
                lives.insert(g.name.clone(), point.figures);
            }
            None => elsewhere.push(g.name.clone()),
        }
    }
    let asks = elsewhere.into_iter().map(|group| {
        let ctx = c.ctx.clone();
        async move {
            let shown = tokio::time::timeout(
                REMOTE_FIGURES_LIMIT,
                admin::handle(
                    &ctx,
                    AdminRequestV1::GroupShow {
                        group: group.clone(),
                    },
                ),
            )
            .await;
            match shown {
                Ok(AdminResponseV1::GroupShown {
                    live: Some(live), ..
                }) => Some((group, live::Figures::of(&live))),
                _ => None,
            }
        }
    });
    lives.extend(
        futures_util::future::join_all(asks)
            .await
            .into_iter()
            .flatten(),
    );
    let lines: Vec<html::GroupLine<'_>> = groups
        .iter()
        .map(|g| html::GroupLine {
            info: g,
            live: lives.get(&g.name),
            cost: costs.get(&g.name).cloned(),
        })
        .collect();
    html(
        StatusCode::OK,
        html::groups_page(&lines, &month, &signed.session.form_token),
    )
}

fn parse_group(raw: &str) -> Result<GroupName, Response> {
    raw.parse::<GroupName>().map_err(|_| {
        html(
            StatusCode::NOT_FOUND,
            html::message("Not found", "That is not a group name."),
        )
    })
}

async fn group_page(
    signed: Signed,
    State(c): State<Shared>,
    Path(group): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    let notice = notice_of(&headers);
    let mut r = render_group(
        &c,
        &signed,
        &group,
        notice.as_ref().map(|(ok, t)| (*ok, t.as_str())),
        None,
        StatusCode::OK,
    )
    .await;
    if notice.is_some() {
        if let Ok(v) = HeaderValue::from_str(&format!("{NOTICE_COOKIE}=; Path=/; Max-Age=0")) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    r
}

/// Everything a group page shows, as the admin requests answer it.
struct GroupData {
    policy: Box<ferry_common::admin::GroupPolicyDetail>,
    hosts: Vec<ferry_common::admin::ResourceInfo>,
    sessions: Vec<ferry_common::admin::SessionInfo>,
    events: Vec<ferry_common::admin::GroupEventDetail>,
    rollouts: Option<ferry_common::admin::GroupRolloutsInfo>,
    served_by: Option<String>,
    chart: String,
}

impl GroupData {
    /// Everything of `group`; the broker's answer when the group cannot
    /// be shown.
    async fn gather(c: &Console, group: &GroupName) -> Result<GroupData, AdminResponseV1> {
        let group = group.clone();
        let policy = match admin::handle(
            &c.ctx,
            AdminRequestV1::GroupShowWithPolicy {
                group: group.clone(),
            },
        )
        .await
        {
            AdminResponseV1::GroupWithPolicy(p) => p,
            other => return Err(other),
        };
        let hosts = match admin::handle(&c.ctx, AdminRequestV1::ListResources).await {
            AdminResponseV1::Resources(rs) => rs
                .into_iter()
                .filter(|r| r.group.as_ref() == Some(&group))
                .collect(),
            _ => Vec::new(),
        };
        // Open sessions of the group's hosts (the store's list, no actor asked).
        let sessions =
            match admin::handle(&c.ctx, AdminRequestV1::ListSessions { all: false }).await {
                AdminResponseV1::Sessions(ss) => ss
                    .into_iter()
                    .filter(|s| {
                        hosts
                            .iter()
                            .any(|h: &ferry_common::admin::ResourceInfo| h.resource == s.resource)
                    })
                    .collect(),
                _ => Vec::new(),
            };
        let events = group_events(c, &group).await;
        let rollouts = match admin::handle(
            &c.ctx,
            AdminRequestV1::GroupRollouts {
                group: group.clone(),
            },
        )
        .await
        {
            AdminResponseV1::GroupRollouts(r) => Some(r),
            _ => None,
        };
        let served_by = match c.ctx.groups.actors().ownership().owner(&group) {
            crate::cluster::Owner::At(address) => Some(address),
            _ => None,
        };
        // A group served elsewhere has its chart on its owner's console.
        let chart = match served_by {
            None => chart_of(c, &group, &events),
            Some(_) => String::new(),
        };
        Ok(GroupData {
            policy,
            hosts,
            sessions,
            events,
            rollouts,
            served_by,
            chart,
        })
    }

    fn page<'a>(
        &'a self,
        notice: Option<(bool, &'a str)>,
        refused: Option<(&'a [String], &'a HashMap<String, String>)>,
    ) -> html::GroupPage<'a> {
        html::GroupPage {
            policy: &self.policy,
            live: self.policy.live.as_ref(),
            served_by: self.served_by.as_deref(),
            hosts: &self.hosts,
            sessions: &self.sessions,
            events: &self.events,
            rollouts: self.rollouts.as_ref(),
            chart: &self.chart,
            notice,
            problems: refused.map(|(p, _)| p).unwrap_or(&[]),
            typed: refused.map(|(_, typed)| typed),
        }
    }
}

async fn render_group(
    c: &Console,
    signed: &Signed,
    group: &str,
    notice: Option<(bool, &str)>,
    refused: Option<(&[String], &HashMap<String, String>)>,
    status: StatusCode,
) -> Response {
    let group = match parse_group(group) {
        Ok(g) => g,
        Err(r) => return r,
    };
    match GroupData::gather(c, &group).await {
        Ok(data) => html(
            status,
            html::group_page(&data.page(notice, refused), &signed.session.form_token),
        ),
        Err(answer) => admin_error(answer),
    }
}

async fn group_events(
    c: &Console,
    group: &GroupName,
) -> Vec<ferry_common::admin::GroupEventDetail> {
    match admin::handle(
        &c.ctx,
        AdminRequestV1::GroupEventsDetailed {
            group: group.clone(),
        },
    )
    .await
    {
        AdminResponseV1::GroupEventsDetailed(es) => es,
        _ => Vec::new(),
    }
}

/// The group's live chart from what the console followed.
fn chart_of(
    c: &Console,
    group: &GroupName,
    events: &[ferry_common::admin::GroupEventDetail],
) -> String {
    let history = c.live.history(group).unwrap_or_default();
    pictures::live_chart(group, &history, events, c.ctx.groups.service().now())
}

/// Server-sent events for a group page: an `update` (the chart and the
/// page's changing parts, rendered) now and whenever the group's figures
/// change, at most one a [`STREAM_MIN_GAP`]. The stream ends when the
/// session does (sign-out, expiry: checked at every change and every
/// [`STREAM_CHECK_EVERY`]), and after saying `gone` when the group is no
/// more. A group whose live figures are not followed here (served by
/// another broker) gets one update and the browser asks again after ten
/// seconds. At most [`MAX_STREAMS`] at once.
async fn group_live(
    signed: Signed,
    State(c): State<Shared>,
    Path(group): Path<String>,
) -> Response {
    let group = match parse_group(&group) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let Ok(slot) = c.streams.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "30")],
            "too many live pages are open on this console",
        )
            .into_response();
    };
    let state = LiveStream {
        changes: c.live.changed(&group),
        c,
        group,
        cookie: signed.cookie,
        token: signed.session.form_token,
        first: true,
        done: false,
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        let event = st.next().await?;
        Some((Ok::<_, std::convert::Infallible>(event), st))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// One group page's stream of updates.
struct LiveStream {
    c: Shared,
    group: GroupName,
    /// `None` when the group's figures are not followed here.
    changes: Option<tokio::sync::watch::Receiver<u64>>,
    cookie: String,
    token: String,
    first: bool,
    done: bool,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl LiveStream {
    /// The next event; `None` ends the stream.
    async fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        if !self.first {
            let changes = self.changes.as_mut()?;
            tokio::time::sleep(STREAM_MIN_GAP).await;
            loop {
                self.c.logins.session(&self.cookie)?;
                match tokio::time::timeout(STREAM_CHECK_EVERY, changes.changed()).await {
                    Ok(Ok(())) => break,
                    Ok(Err(_)) => return None,
                    Err(_) => continue,
                }
            }
            changes.mark_unchanged();
        }
        self.first = false;
        self.c.logins.session(&self.cookie)?;
        Some(match GroupData::gather(&self.c, &self.group).await {
            Ok(data) => {
                let parts = html::live_parts(&data.page(None, None), &self.token);
                let payload = serde_json::json!({
                    "chart": data.chart,
                    "figures": parts.figures,
                    "resources": parts.resources,
                    "decisions": parts.decisions,
                });
                let event = Event::default().event("update").data(payload.to_string());
                if self.changes.is_none() {
                    self.done = true;
                    event.retry(std::time::Duration::from_secs(10))
                } else {
                    event
                }
            }
            Err(AdminResponseV1::Error(e))
                if e.code == ferry_common::admin::AdminErrorCode::NotFound =>
            {
                self.done = true;
                Event::default()
                    .event("update")
                    .data(serde_json::json!({ "gone": true }).to_string())
            }
            // A passing failure (the owner or the store did not answer):
            // nothing new to show this time.
            Err(_) => Event::default().comment("not available now"),
        })
    }
}

/// Where an action on a resource or session returns: the group page
/// named in the form. What happened travels in a short-lived cookie (not
/// in the address, where anyone could write a message for the page).
fn back_to(form: &HashMap<String, String>, ok: bool, text: &str) -> Response {
    let group = form.get("group").and_then(|g| g.parse::<GroupName>().ok());
    let mut r = match &group {
        Some(g) => Redirect::to(&format!("/groups/{}", html::seg(g.as_str()))).into_response(),
        None => Redirect::to("/").into_response(),
    };
    let value =
        serde_urlencoded::to_string([(if ok { "ok" } else { "error" }, text)]).unwrap_or_default();
    // Form encoding never writes a character a cookie value may not hold.
    let set = format!("{NOTICE_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age=60");
    if let Ok(v) = HeaderValue::from_str(&set) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

/// The cookie that carries what an action did to the page it returns to.
const NOTICE_COOKIE: &str = "ferry_notice";

/// The notice a request carries: (ok, text).
fn notice_of(headers: &axum::http::HeaderMap) -> Option<(bool, String)> {
    let raw = cookie_of(headers, NOTICE_COOKIE)?;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&raw).ok()?;
    let (key, text) = pairs.into_iter().next()?;
    Some((key == "ok", text))
}

async fn command(
    c: &Console,
    form: &HashMap<String, String>,
    req: AdminRequestV1,
    done: String,
) -> Response {
    match admin::handle(&c.ctx, req).await {
        AdminResponseV1::Done { .. } => back_to(form, true, &done),
        AdminResponseV1::Error(e) => back_to(form, false, &e.message),
        other => back_to(form, false, answer_kind(&other)),
    }
}

/// An action a form asks for on one resource or session (`raw`, from the
/// path): the form token checked, the id parsed, the action logged with the
/// session, the admin request sent, and back to the group's page.
async fn form_action<T: std::str::FromStr + std::fmt::Display>(
    signed: &Signed,
    c: &Console,
    form: &HashMap<String, String>,
    (action, raw): (&str, &str),
    make: impl FnOnce(T) -> (AdminRequestV1, String),
) -> Response {
    if let Err(r) = checked_form(signed, form) {
        return r;
    }
    let Ok(target) = raw.parse::<T>() else {
        return back_to(form, false, &format!("{raw:?} is not a valid id"));
    };
    tracing::info!(%target, session = %signed.id(), "console: {action}");
    let (req, done) = make(target);
    command(c, form, req, done).await
}

/// `POST /resources/{resource}/drain` and `.../undrain`.
async fn resource_action(
    signed: Signed,
    State(c): State<Shared>,
    Path((resource, verb)): Path<(String, String)>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let drain = match verb.as_str() {
        "drain" => true,
        "undrain" => false,
        _ => return not_found().await,
    };
    form_action(
        &signed,
        &c,
        &f,
        (&verb, &resource),
        |resource: ResourceId| {
            if drain {
                let done = format!("{resource} drains: it takes no new sessions");
                (AdminRequestV1::Drain { resource }, done)
            } else {
                let done = format!("{resource} takes new sessions again");
                (AdminRequestV1::Undrain { resource }, done)
            }
        },
    )
    .await
}

/// `POST /sessions/{session}/disconnect`.
async fn disconnect(
    signed: Signed,
    State(c): State<Shared>,
    Path(session): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    form_action(
        &signed,
        &c,
        &f,
        ("disconnect", &session),
        |session: SessionId| {
            let done = format!("session {session} disconnected");
            (AdminRequestV1::DisconnectSession { session }, done)
        },
    )
    .await
}

/// The policy form as a [`PolicySpec`]: a field left as it was shown
/// (`was_KEY`) or empty keeps the stored value; every field that does not
/// parse is one problem; the broker's validation lists the rest.
fn policy_of(form: &HashMap<String, String>) -> Result<PolicySpec, Vec<String>> {
    let mut problems = Vec::new();
    let changed = |key: &str| -> Option<&str> {
        let v = form.get(key).map(|s| s.trim()).filter(|v| !v.is_empty())?;
        match form.get(&format!("was_{key}")) {
            Some(was) if was.trim() == v => None,
            _ => Some(v),
        }
    };
    let mut count = |key: &str, label: &str| -> Option<u32> {
        let v = changed(key)?;
        match v.parse::<u32>() {
            Ok(n) => Some(n),
            Err(_) => {
                problems.push(format!(
                    "{label}: {v:?} is not a whole number from 0 to {}",
                    u32::MAX
                ));
                None
            }
        }
    };
    let concurrent_sessions = count("concurrent_sessions", "sessions per resource");
    let usage_threshold = count("usage_threshold", "usage threshold");
    let scale_out_step = count("scale_out_step", "scale-out step");
    let max_elastic = count("max_elastic", "elastic resources at most");
    let mut seconds = |key: &str, label: &str| -> Option<u64> {
        let v = changed(key)?;
        let ms = v
            .parse::<rust_decimal::Decimal>()
            .ok()
            .filter(|d| !d.is_sign_negative())
            .and_then(|d| d.checked_mul(rust_decimal::Decimal::ONE_THOUSAND))
            .filter(|ms| ms.fract().is_zero())
            .and_then(|ms| u64::try_from(ms).ok());
        if ms.is_none() {
            problems.push(format!(
                "{label}: {v:?} is not a number of seconds (at most three decimals)"
            ));
        }
        ms
    };
    let spec = PolicySpec {
        concurrent_sessions,
        usage_threshold,
        scale_out_step,
        max_elastic,
        max_idle_ms: seconds("max_idle_s", "idle time before release"),
        scale_in_cooldown_ms: seconds("scale_in_cooldown_s", "scale-in cooldown"),
        wait_timeout_ms: seconds("wait_timeout_s", "wait timeout"),
        load_balancing: changed("load_balancing").map(str::to_owned),
    };
    if problems.is_empty() {
        Ok(spec)
    } else {
        Err(problems)
    }
}

async fn change_policy(
    signed: Signed,
    State(c): State<Shared>,
    Path(group): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    if let Err(r) = checked_form(&signed, &f) {
        return r;
    }
    let name = match parse_group(&group) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let policy = match policy_of(&f) {
        Ok(p) => p,
        Err(problems) => {
            return render_group(
                &c,
                &signed,
                &group,
                None,
                Some((&problems, &f)),
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await
        }
    };
    tracing::info!(group = %name, session = %signed.id(), "console: policy change");
    match admin::handle(
        &c.ctx,
        AdminRequestV1::GroupUpdatePolicy {
            group: name.clone(),
            policy,
        },
    )
    .await
    {
        AdminResponseV1::Group(_) | AdminResponseV1::GroupWithPolicy(_) => back_to(
            &HashMap::from([("group".into(), group)]),
            true,
            "policy changed",
        ),
        AdminResponseV1::Error(e) => {
            let problems: Vec<String> = e.message.lines().map(str::to_owned).collect();
            render_group(
                &c,
                &signed,
                &group,
                None,
                Some((&problems, &f)),
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await
        }
        other => admin_error(other),
    }
}

#[derive(serde::Deserialize, Default)]
struct PeriodQuery {
    from: Option<String>,
    to: Option<String>,
    group: Option<String>,
}

/// The period of a usage page: `from` and `to` as days (`YYYY-MM-DD`,
/// `to` included); this month so far by default.
fn period_of(q: &PeriodQuery, now: UnixMillis) -> Result<(UsageQuery, String, String), String> {
    let day = |s: &str, what: &str| {
        chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_err(|_| format!("{what}: {s:?} is not a day (YYYY-MM-DD)"))
    };
    let (month_start, _) = this_month(now);
    let today = chrono::DateTime::from_timestamp_millis(now.0)
        .unwrap_or_default()
        .date_naive();
    let from = match q.from.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => day(s, "from")?,
        None => chrono::DateTime::from_timestamp_millis(month_start.0)
            .unwrap_or_default()
            .date_naive(),
    };
    let to = match q.to.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => day(s, "to")?,
        None => today,
    };
    if to < from {
        return Err(format!("to ({to}) is before from ({from})"));
    }
    let millis = |d: chrono::NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis())
            .unwrap_or(0)
    };
    let group = match q.group.as_deref().filter(|s| !s.is_empty()) {
        Some(g) => Some(
            g.parse::<GroupName>()
                .map_err(|_| format!("group: {g:?} is not a group name"))?,
        ),
        None => None,
    };
    Ok((
        UsageQuery {
            group,
            from: UnixMillis(millis(from)),
            to: UnixMillis(millis(to).saturating_add(86_400_000)),
        },
        from.to_string(),
        to.to_string(),
    ))
}

async fn usage_page(
    signed: Signed,
    State(c): State<Shared>,
    Query(q): Query<PeriodQuery>,
) -> Response {
    let (query, from, to) = match period_of(&q, c.ctx.groups.service().now()) {
        Ok(p) => p,
        Err(e) => return html(StatusCode::BAD_REQUEST, html::message("Usage", &e)),
    };
    let group = query
        .group
        .as_ref()
        .map(|g| g.as_str().to_owned())
        .unwrap_or_default();
    let csv_href = format!(
        "/usage.csv?{}",
        serde_urlencoded::to_string([("from", &from), ("to", &to), ("group", &group)])
            .unwrap_or_default()
    );
    // One report per day for the chart (a period of at most MAX_CHART_DAYS).
    let mut days = Vec::new();
    if let Some(spans) = crate::chart::utc_days(query.from.0, query.to.0, MAX_CHART_DAYS) {
        for (from, to) in spans {
            let day = UsageQuery {
                group: query.group.clone(),
                from: UnixMillis(from),
                to: UnixMillis(to),
            };
            match admin::handle(&c.ctx, AdminRequestV1::UsageDetailed(day)).await {
                AdminResponseV1::UsageDetailed(d) => days.push(d),
                // A day left out would shift the bars: no chart rather
                // than a wrong one.
                other => return admin_error(other),
            }
        }
    }
    match admin::handle(&c.ctx, AdminRequestV1::UsageDetailed(query)).await {
        AdminResponseV1::UsageDetailed(d) => {
            let chart = if days.is_empty() {
                format!(
                    "<p class=\"message\">The chart shows at most {MAX_CHART_DAYS} days: \
                     choose a shorter period.</p>"
                )
            } else {
                pictures::usage_chart(&days)
            };
            html(
                StatusCode::OK,
                html::usage_page(
                    &d,
                    (&from, &to, &group),
                    &csv_href,
                    &chart,
                    &signed.session.form_token,
                ),
            )
        }
        other => admin_error(other),
    }
}

async fn usage_csv(
    _signed: Signed,
    State(c): State<Shared>,
    Query(q): Query<PeriodQuery>,
) -> Response {
    let (query, from, to) = match period_of(&q, c.ctx.groups.service().now()) {
        Ok(p) => p,
        Err(e) => return html(StatusCode::BAD_REQUEST, html::message("Usage", &e)),
    };
    match admin::handle(&c.ctx, AdminRequestV1::Usage(query)).await {
        AdminResponseV1::Usage(r) => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"ferry-usage-{from}-{to}.csv\""),
                ),
            ],
            crate::render::usage_csv(&r),
        )
            .into_response(),
        other => admin_error(other),
    }
}

async fn updates_page(signed: Signed, State(c): State<Shared>) -> Response {
    let (updates, schedules) =
        match admin::handle(&c.ctx, AdminRequestV1::OtaListWithSchedules { group: None }).await {
            AdminResponseV1::OtaUpdatesAndSchedules { updates, schedules } => (updates, schedules),
            other => return admin_error(other),
        };
    let groups =
        match admin::handle(&c.ctx, AdminRequestV1::GroupList(GroupFilter::default())).await {
            AdminResponseV1::Groups(gs) => gs,
            other => return admin_error(other),
        };
    let mut rollouts = Vec::new();
    for g in groups.iter().filter(|g| g.status != "gone") {
        if let AdminResponseV1::GroupRollouts(r) = admin::handle(
            &c.ctx,
            AdminRequestV1::GroupRollouts {
                group: g.name.clone(),
            },
        )
        .await
        {
            rollouts.push((g.name.as_str().to_owned(), r));
        }
    }
    html(
        StatusCode::OK,
        html::updates_page(&updates, &schedules, &rollouts, &signed.session.form_token),
    )
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("console.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("console.js"),
    )
        .into_response()
}

#[cfg(test)]
mod tests;
