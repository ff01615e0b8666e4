//! The admin socket: a Unix socket speaking framed [`AdminRequest`] /
//! [`AdminResponse`], its server inside the broker and the client `ferryctl`
//! (and `dev`) use.
//!
//! Admin frames are `common::frame` frames with the larger
//! [`MAX_ADMIN_FRAME_LEN`] (fleet listings); the length prefix is checked
//! against it before a buffer is allocated, and the decoder runs with that
//! same byte limit.
//!
//! Before anything a peer sends is read, its credentials are checked
//! ([`access`]: root, the broker's user, or the admin group); others get a
//! `Forbidden` answer naming the group to join. A connection silent or
//! stalled in a request for [`ADMIN_IDLE_TIMEOUT`], or not reading its
//! answer for [`ADMIN_WRITE_TIMEOUT`], is closed and frees its slot (at most
//! [`MAX_ADMIN_CONNECTIONS`] at once; beyond, `Busy`).

pub mod access;
pub mod peer_service;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_common::admin::{
    AdminError, AdminErrorCode, AdminRequest, AdminRequestV1, AdminResponse, AdminResponseV1,
    ClusterBroker, ClusterInfo, GroupDetail, GroupOwnerInfo, LiveGroupView, LiveResourceView,
    ResourceInfo, RevocationInfo, SessionInfo, StatusReport, UsageQuery, MAX_ADMIN_CONNECTIONS,
};
use ferry_common::frame::{self, FrameError};
use ferry_common::limits::MAX_ADMIN_FRAME_LEN;
use ferry_common::wire::{Command, CommandOutcome, Refusal, RefusalCode};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Owner;
use crate::groups::lifecycle::Removal;
use crate::groups::{GroupError, Groups};
use crate::registry::{CommandError, Registry, COMMAND_TIMEOUT};
use crate::store::{Assigned, Store, StoreError, StoredSession};
use crate::usage::UsageError;

/// Default admin socket path (`ferryctl --socket` and the config default).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/ferry/admin.sock";

/// Environment variable `ferryctl` reads the socket path from.
pub const ADMIN_SOCKET_ENV: &str = "FERRY_ADMIN_SOCKET";

/// An admin connection idle this long is closed: `ferryctl` sends its
/// request right away, so silence means a stuck or hostile client.
pub const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// An answer the client does not read within this is dropped with its
/// connection: `ferryctl` reads at once, and the largest answer (a fleet
/// listing, [`MAX_ADMIN_FRAME_LEN`]) takes well under a second locally.
pub const ADMIN_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Mode of the admin socket: owner and group (the `ferry` operators group).
pub const ADMIN_SOCKET_MODE: u32 = 0o660;

/// How long an admin connection may be silent or stall (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct AdminLimits {
    /// Silence before a request, or a request not complete within it.
    pub idle: Duration,
    /// An answer not taken by the client within it.
    pub write: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            idle: ADMIN_IDLE_TIMEOUT,
            write: ADMIN_WRITE_TIMEOUT,
        }
    }
}

/// [`write_admin`] within `limit`; a client that does not read is an error.
async fn write_within<T: Serialize>(
    w: &mut UnixStream,
    msg: &T,
    limit: Duration,
) -> Result<(), FrameError> {
    match tokio::time::timeout(limit, write_admin(w, msg)).await {
        Ok(r) => r,
        Err(_) => Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client did not read its answer in time",
        ))),
    }
}

/// Reads one admin message; `Ok(None)` on a clean end of stream.
pub async fn read_admin<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<T>, FrameError> {
    frame::read_message_within::<T, R, MAX_ADMIN_FRAME_LEN>(r).await
}

/// Writes one admin message as a frame.
pub async fn write_admin<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    frame::write_message(w, msg, MAX_ADMIN_FRAME_LEN).await?;
    w.flush().await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum AdminSocketError {
    #[error("another broker is listening on {0}")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Access(#[from] access::AccessError),
}

/// Gives the socket at `path` to the admin group when it is not the
/// process's own group (the socket is created with the process's group), so
/// the group's members can reach it through its mode 0660.
pub fn set_group(path: &Path, access: &access::AdminAccess) -> Result<(), AdminSocketError> {
    if access.group_gid == rustix::process::getgid().as_raw() {
        return Ok(());
    }
    std::os::unix::fs::chown(path, None, Some(access.group_gid)).map_err(|error| {
        AdminSocketError::Io {
            what: "give the admin group the socket",
            path: path.to_path_buf(),
            error,
        }
    })
}

/// Binds the admin socket with mode 0660. A socket file left by a dead
/// broker is removed; one a live broker listens on is not.
pub fn bind(path: &Path) -> Result<UnixListener, AdminSocketError> {
    let io = |what| {
        move |error| AdminSocketError::Io {
            what,
            path: path.to_path_buf(),
            error,
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(AdminSocketError::NotASocket(path.to_path_buf()));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(AdminSocketError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io("remove stale socket"))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect")(e)),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io("create directory of"))?;
    }
    let listener = UnixListener::bind(path).map_err(io("bind"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(ADMIN_SOCKET_MODE))
        .map_err(io("set mode of"))?;
    Ok(listener)
}

/// What admin requests are answered from.
#[derive(Clone)]
pub struct AdminContext {
    /// Recorded state.
    pub store: Store,
    /// Live state and the way to reach agents.
    pub registry: Arc<Registry>,
    /// Delivery groups (their records and their live actors) and users.
    pub groups: Groups,
    /// OTA updates.
    pub ota: crate::ota::Ota,
    /// Who this broker is among those sharing its store; `None` alone.
    pub cluster: Option<crate::cluster::ClusterSettings>,
    /// How requests that need a group's owner reach it when another broker
    /// owns the group; `None` alone, and for requests forwarded here.
    pub peers: Option<Arc<crate::peer::Peers>>,
    /// Where the web console's login links come from; `None` when the
    /// console is off.
    pub console: Option<Arc<dyn ConsoleLinks>>,
}

/// Hands out the web console's one-time sign-in links (the console,
/// above this module, implements it).
pub trait ConsoleLinks: Send + Sync {
    /// A new link and when it stops working.
    fn link(&self) -> Result<(String, ferry_common::UnixMillis), String>;
}

/// Serves admin connections until `shutdown`: peers `access` allows, with
/// the default [`AdminLimits`].
pub async fn serve(
    listener: UnixListener,
    ctx: AdminContext,
    access: access::AdminAccess,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    serve_with(
        listener,
        ctx,
        access,
        AdminLimits::default(),
        shutdown,
        tracker,
    )
    .await;
}

/// Whether the peer of `stream` may use the socket (see [`access`]).
async fn admitted(stream: &UnixStream, access: &Arc<access::AdminAccess>) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let peer = access::PeerCred {
        uid: cred.uid(),
        gid: cred.gid(),
    };
    let access = access.clone();
    tokio::task::spawn_blocking(move || access.check(peer))
        .await
        .map_err(|e| format!("credential check failed: {e}"))?
}

/// [`serve`] with explicit limits.
pub async fn serve_with(
    listener: UnixListener,
    ctx: AdminContext,
    access: access::AdminAccess,
    limits: AdminLimits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let access = Arc::new(access);
    let limit = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("accept admin connection: {e}");
                    continue;
                }
            },
        };
        let limit = limit.clone();
        let ctx = ctx.clone();
        let token = shutdown.child_token();
        let access = access.clone();
        tracker.spawn(async move {
            let mut stream = stream;
            // Nothing the peer sent is read before its credentials pass,
            // and a refused peer takes no slot.
            if let Err(why) = admitted(&stream, &access).await {
                tracing::warn!("admin connection refused: {why}");
                let refused = error(AdminErrorCode::Forbidden, why);
                let _ = write_within(&mut stream, &AdminResponse::V1(refused), limits.write).await;
                return;
            }
            let Ok(_permit) = limit.try_acquire_owned() else {
                let busy = error(
                    AdminErrorCode::Busy,
                    format!("{MAX_ADMIN_CONNECTIONS} admin connections are open; retry later"),
                );
                let _ = write_within(&mut stream, &AdminResponse::V1(busy), limits.write).await;
                return;
            };
            if let Err(e) = connection(&mut stream, &ctx, &token, limits).await {
                tracing::debug!("admin connection ended: {e}");
            }
        });
    }
}

async fn connection(
    stream: &mut UnixStream,
    ctx: &AdminContext,
    token: &CancellationToken,
    limits: AdminLimits,
) -> Result<(), FrameError> {
    loop {
        let req = tokio::select! {
            _ = token.cancelled() => {
                let bye = error(AdminErrorCode::ShuttingDown, "broker is shutting down".into());
                write_within(stream, &AdminResponse::V1(bye), limits.write).await?;
                return Ok(());
            }
            r = tokio::time::timeout(limits.idle, read_admin::<AdminRequest, _>(stream)) => match r {
                Err(_) => return Ok(()),
                Ok(r) => r,
            },
        };
        let resp = match req {
            Ok(None) => return Ok(()),
            Ok(Some(AdminRequest::V1(req))) => handle(ctx, req).await,
            Err(e) => {
                // The stream position is unknown after a bad frame: answer and close.
                tracing::warn!("bad admin request: {e}");
                let resp = error(AdminErrorCode::BadRequest, format!("bad request: {e}"));
                write_within(stream, &AdminResponse::V1(resp), limits.write).await?;
                return Ok(());
            }
        };
        match write_within(stream, &AdminResponse::V1(resp), limits.write).await {
            Err(FrameError::TooLarge { len, max }) => {
                // Nothing was written yet (the size is checked before writing).
                let resp = error(
                    AdminErrorCode::Internal,
                    format!("the answer is {len} bytes, over the admin frame limit of {max}"),
                );
                write_within(stream, &AdminResponse::V1(resp), limits.write).await?;
            }
            other => other?,
        }
    }
}

/// `ferryctl usage`, priced with the broker's configured prices.
async fn usage(ctx: &AdminContext, query: UsageQuery) -> AdminResponseV1 {
    let config = ctx.groups.service().config();
    let now = config.clock.now();
    match crate::usage::report(&ctx.store, &config.prices, &config.currency, query, now).await {
        Ok(r) => AdminResponseV1::Usage(r),
        Err(UsageError::Invalid(m)) => error(AdminErrorCode::Invalid, m),
        Err(UsageError::NotFound(m)) => error(AdminErrorCode::NotFound, m),
        Err(UsageError::Store(e)) => internal(e),
    }
}

/// `ferryctl usage`: [`usage`] with each resource's amount.
async fn usage_detailed(ctx: &AdminContext, query: UsageQuery) -> AdminResponseV1 {
    let config = ctx.groups.service().config();
    let now = config.clock.now();
    match crate::usage::report_detailed(&ctx.store, &config.prices, &config.currency, query, now)
        .await
    {
        Ok(r) => AdminResponseV1::UsageDetailed(r),
        Err(UsageError::Invalid(m)) => error(AdminErrorCode::Invalid, m),
        Err(UsageError::NotFound(m)) => error(AdminErrorCode::NotFound, m),
        Err(UsageError::Store(e)) => internal(e),
    }
}

/// The live state of `detail`'s group for `group show`: `None` when it has
/// no running actor (not live, or a broker without actors). With one, the
/// detail's policy state is narrowed to the resources joined to it.
async fn live_view(ctx: &AdminContext, detail: &mut GroupDetail) -> Option<LiveGroupView> {
    let v = ctx.groups.actors().view(&detail.info.name).await.ok()?;
    crate::groups::service::policy_of_joined(detail, &v.joined);
    Some(LiveGroupView {
        closed: v.closed,
        demand: v.demand,
        capacity: v.capacity,
        concurrent_sessions: v.concurrent_sessions,
        usage_threshold: v.usage_threshold,
        resources: v
            .resources
            .into_iter()
            .map(|r| LiveResourceView {
                resource: r.resource,
                class: r.class.as_str().into(),
                state: r.state.to_string(),
                available: r.available,
                sessions: r.sessions,
                flagged: r.flagged,
            })
            .collect(),
        flagged: v.flagged,
        engine_deadline: v.deadline,
    })
}

/// Whether each resource joined to a live group takes sessions, as its
/// group's engine says (one view per group of `stored`).
async fn engine_availability(
    ctx: &AdminContext,
    stored: &[crate::store::StoredResource],
) -> std::collections::HashMap<ResourceId, bool> {
    let mut out = std::collections::HashMap::new();
    let actors = ctx.groups.actors();
    let groups: std::collections::BTreeSet<&ferry_common::GroupName> =
        stored.iter().filter_map(|r| r.group.as_ref()).collect();
    for group in groups {
        let Ok(view) = actors.view(group).await else {
            continue;
        };
        for r in view.resources {
            if view.joined.contains(&r.resource) {
                out.insert(r.resource, r.available);
            }
        }
    }
    out
}

fn error(code: AdminErrorCode, message: String) -> AdminResponseV1 {
    AdminResponseV1::Error(AdminError { code, message })
}

fn internal(e: impl std::fmt::Display) -> AdminResponseV1 {
    tracing::error!("admin request failed: {e}");
    error(AdminErrorCode::Internal, format!("store: {e}"))
}

impl From<StoredSession> for SessionInfo {
    fn from(s: StoredSession) -> Self {
        SessionInfo {
            session: s.session,
            resource: s.resource,
            user: s.user,
            started_at: s.started_at,
            ended_at: s.ended_at,
            end_reason: s.end_reason,
        }
    }
}

/// Answers one request. Read requests change nothing; commands change only
/// what the agent confirms.
pub async fn handle(ctx: &AdminContext, req: AdminRequestV1) -> AdminResponseV1 {
    if let Some(peers) = &ctx.peers {
        if let Some((group, address)) = owner_elsewhere(ctx, &req).await {
            let show = matches!(
                req,
                AdminRequestV1::GroupShow { .. } | AdminRequestV1::GroupShowWithPolicy { .. }
            );
            return match peers.forward(&address, req.clone()).await {
                Ok(answer) => answer,
                // A group's record is here too: shown without its live
                // state (the owner may just have died).
                Err(e) if show => {
                    tracing::warn!(%group, %address, "live view of the group's owner: {e}");
                    handle_here(ctx, req).await
                }
                Err(e) => error(
                    AdminErrorCode::NotConnected,
                    format!(
                        "group {group} is served by the broker at {address}, which this broker \
                         could not ask: {e}"
                    ),
                ),
            };
        }
    }
    handle_here(ctx, req).await
}

/// The group `req` acts on and its owner's address, when the request needs
/// the owner's live state (an agent's command goes through the broker its
/// agent is connected to; a group's live view is its owner's) and another
/// broker owns the group: such a request is forwarded there
/// ([`crate::peer`]).
async fn owner_elsewhere(
    ctx: &AdminContext,
    req: &AdminRequestV1,
) -> Option<(ferry_common::GroupName, String)> {
    let group_of = |resource: ResourceId| async move {
        if ctx.registry.get(&resource).is_some() {
            // Its agent is connected here.
            return None;
        }
        known_resource(ctx, &resource).await.ok()??.group
    };
    let group = match req {
        AdminRequestV1::Drain { resource } | AdminRequestV1::Undrain { resource } => {
            group_of(resource.clone()).await?
        }
        AdminRequestV1::DisconnectSession { session } => {
            let hosts = ctx.store.open_session_hosts(session).await.ok()?;
            match hosts.as_slice() {
                [one] => group_of(one.clone()).await?,
                _ => return None,
            }
        }
        AdminRequestV1::GroupShow { group } | AdminRequestV1::GroupShowWithPolicy { group } => {
            group.clone()
        }
        _ => return None,
    };
    match ctx.groups.actors().ownership().owner(&group) {
        Owner::At(address) => Some((group, address)),
        _ => None,
    }
}

/// Answers `req` with this broker's state.
async fn handle_here(ctx: &AdminContext, req: AdminRequestV1) -> AdminResponseV1 {
    match req {
        AdminRequestV1::Status => match ctx.store.counts().await {
            Ok(c) => AdminResponseV1::Status(StatusReport {
                broker_version: env!("CARGO_PKG_VERSION").to_string(),
                agents_connected: ctx.registry.connected() as u64,
                resources: c.resources,
                open_sessions: c.open_sessions,
                events_recorded: c.events_recorded,
            }),
            Err(e) => internal(e),
        },
        AdminRequestV1::ListResources => match resource_list(ctx).await {
            Ok(r) => AdminResponseV1::Resources(r),
            Err(e) => internal(e),
        },
        AdminRequestV1::ListResourcesWithRevocations => {
            match (resource_list(ctx).await, ctx.store.revocations().await) {
                (Ok(resources), Ok(revoked)) => AdminResponseV1::ResourcesWithRevocations {
                    resources,
                    revocations: revoked
                        .into_iter()
                        .map(|r| RevocationInfo {
                            resource: r.resource,
                            revoked_before: r.revoked_before,
                            at: r.at,
                            reason: r.reason,
                        })
                        .collect(),
                },
                (Err(e), _) | (_, Err(e)) => internal(e),
            }
        }
        AdminRequestV1::ResourceRevoke { resource, reason } => revoke(ctx, resource, reason).await,
        AdminRequestV1::ConsoleLogin => match &ctx.console {
            None => error(
                AdminErrorCode::NotAllowed,
                "the web console is off on this broker: set [console] listen in its \
                 configuration (e.g. listen = \"127.0.0.1:8080\") and restart it"
                    .into(),
            ),
            Some(issuer) => match issuer.link() {
                Ok((url, expires_at)) => AdminResponseV1::ConsoleLink { url, expires_at },
                Err(e) => internal(e),
            },
        },
        AdminRequestV1::Cluster => match cluster(ctx).await {
            Ok(info) => AdminResponseV1::Cluster(info),
            Err(e) => internal(e),
        },
        AdminRequestV1::ListSessions { all } => match ctx.store.sessions(all).await {
            Ok(s) => AdminResponseV1::Sessions(s.into_iter().map(SessionInfo::from).collect()),
            Err(e) => internal(e),
        },
        AdminRequestV1::Drain { resource } => drain(ctx, resource, Command::Drain, true).await,
        AdminRequestV1::Undrain { resource } => drain(ctx, resource, Command::Undrain, false).await,
        AdminRequestV1::DisconnectSession { session } => disconnect(ctx, session).await,
        AdminRequestV1::ResourcesAssign { resource, group } => assign(ctx, resource, group).await,
        AdminRequestV1::Usage(query) => usage(ctx, query).await,
        AdminRequestV1::UsageDetailed(query) => usage_detailed(ctx, query).await,
        AdminRequestV1::ListSessionsDetailed { all } => {
            match crate::listing::sessions(&ctx.store, ctx.groups.actors(), all).await {
                Ok(s) => AdminResponseV1::SessionsDetailed(s),
                Err(e) => internal(e),
            }
        }
        AdminRequestV1::OtaOffer(_)
        | AdminRequestV1::OtaList { .. }
        | AdminRequestV1::OtaSchedule(_)
        | AdminRequestV1::OtaReschedule { .. }
        | AdminRequestV1::OtaCancel { .. }
        | AdminRequestV1::OtaHistory { .. }
        | AdminRequestV1::OtaListWithSchedules { .. } => crate::ota::handle(&ctx.ota, req).await,
        other => groups(ctx, other).await,
    }
}

/// Every resource the store knows with its live state.
async fn resource_list(ctx: &AdminContext) -> Result<Vec<ResourceInfo>, StoreError> {
    let stored = ctx.store.resources().await?;
    let live = ctx.registry.snapshot();
    let engine = engine_availability(ctx, &stored).await;
    Ok(stored
        .into_iter()
        .map(|r| {
            let l = live.get(&r.resource);
            // Whether it takes sessions: its group's engine
            // decides (what `group show` says); outside a
            // live group, connected, healthy and not draining.
            let available = match engine.get(&r.resource) {
                Some(a) => l.is_some() && *a,
                None => l.is_some_and(|l| l.available && !l.draining),
            };
            ResourceInfo {
                connected: l.is_some(),
                available,
                draining: l.is_some_and(|l| l.draining),
                // A host that is gone shows when it was last heard from.
                last_health_at: match l {
                    Some(l) => l.last_health_at,
                    None => Some(r.last_seen),
                },
                resource: r.resource,
                group: r.group,
                // What it last reported (`Hello` or
                // `Inventory`), as `group show` has it.
                agent_version: r.agent_version,
                image_version: r.image_version,
                sessions: r.open_sessions,
                host: r.host,
            }
        })
        .collect())
}

/// `resources revoke`: the floor recorded first (durable, also for a
/// connection racing in), then the live connection closed.
async fn revoke(ctx: &AdminContext, resource: ResourceId, reason: String) -> AdminResponseV1 {
    let mut reason = reason.trim().to_owned();
    if reason.is_empty() {
        reason = "no reason given".into();
    }
    if reason.len() > ferry_common::limits::MAX_TEXT_LEN {
        return error(
            AdminErrorCode::BadRequest,
            format!(
                "the reason is longer than {} bytes",
                ferry_common::limits::MAX_TEXT_LEN
            ),
        );
    }
    // Certificates are stamped with the system clock; so is the floor.
    let before = crate::clock::now_millis();
    let known = match ctx
        .store
        .revoke(&resource, before, ctx.groups.now(), reason.clone())
        .await
    {
        Ok(known) => known,
        Err(e) => return internal(e),
    };
    let closed = ctx.registry.dismiss(
        &resource,
        Refusal {
            code: RefusalCode::Revoked,
            message: "the operator revoked this host (ferryctl resources revoke); it needs a \
                      new certificate"
                .into(),
        },
    );
    tracing::warn!(%resource, closed, "resource revoked by the operator: {reason}");
    let mut message = format!(
        "revoked {resource}: its certificates issued before {} are refused",
        crate::render::rfc3339_secs(before)
    );
    if closed {
        message.push_str("; its live connection was closed");
    }
    if !known {
        message.push_str(" (the broker has never seen it register)");
    }
    message.push_str(&format!(
        "; to admit it again, give it a new certificate (ferryctl pki issue-agent --resource {resource})"
    ));
    AdminResponseV1::Done { message }
}

/// The delivery-group and user verbs; every refusal becomes one typed error here.
async fn groups(ctx: &AdminContext, req: AdminRequestV1) -> AdminResponseV1 {
    // Changes an actor follows go through the facade; the rest to the service.
    let g = &ctx.groups;
    let service = g.service();
    // The groups' clock (a test's manual one, or the wall clock).
    let now = g.now();
    let detail =
        |r: Result<GroupDetail, GroupError>| r.map(|d| AdminResponseV1::Group(Box::new(d)));
    let done = |r: Result<String, GroupError>| r.map(|message| AdminResponseV1::Done { message });
    let result = match req {
        AdminRequestV1::GroupPublish(spec) => detail(g.publish(spec, now).await),
        AdminRequestV1::GroupList(filter) => {
            service.list(filter).await.map(AdminResponseV1::Groups)
        }
        AdminRequestV1::GroupShow { group } => shown(ctx, &group).await,
        // ---- policy parts (session, display, periods) ----
        AdminRequestV1::GroupPublishWithPolicy { spec, parts } => g
            .publish_with_policy(spec, parts, now)
            .await
            .map(|d| AdminResponseV1::GroupWithPolicy(Box::new(d))),
        AdminRequestV1::GroupUpdatePolicyParts {
            group,
            policy,
            parts,
        } => g
            .update_policy_parts(&group, policy, parts, now)
            .await
            .map(|d| AdminResponseV1::GroupWithPolicy(Box::new(d))),
        AdminRequestV1::GroupShowWithPolicy { group } => shown_with_policy(ctx, &group).await,
        AdminRequestV1::GroupUpdatePolicy { group, policy } => {
            detail(g.update_policy(&group, policy, now).await)
        }
        AdminRequestV1::GroupUpdateUsers { group, add, remove } => {
            detail(service.update_users(&group, add, remove, now).await)
        }
        // Both can move the expiry deadline, and a renewal reopens an
        // expired group: its actor follows.
        AdminRequestV1::GroupRenew { group, duration } => {
            detail(g.renew(&group, &duration, now).await)
        }
        // ---- group status (publishing, payment) ----
        AdminRequestV1::GroupSetPaymentOverdue { group } => {
            detail(g.set_payment_overdue(&group, true, now).await)
        }
        AdminRequestV1::GroupClearPaymentOverdue { group } => {
            detail(g.set_payment_overdue(&group, false, now).await)
        }
        AdminRequestV1::GroupSetAutoRenew { group, on } => {
            detail(g.set_auto_renew(&group, on, now).await)
        }
        AdminRequestV1::GroupPurge { group } => done(g.remove(&group, Removal::Purge, now).await),
        AdminRequestV1::GroupDelete { group } => done(g.remove(&group, Removal::Delete, now).await),
        AdminRequestV1::GroupEvents { group } => service
            .events(&group)
            .await
            .map(AdminResponseV1::GroupEvents),
        AdminRequestV1::GroupSetRegion { group, region } => {
            done(service.set_region(&group, &region).await)
        }
        AdminRequestV1::GroupEventsDetailed { group } => crate::listing::events(service, &group)
            .await
            .map(AdminResponseV1::GroupEventsDetailed),
        req @ (AdminRequestV1::UserCreate(_)
        | AdminRequestV1::UserImport { .. }
        | AdminRequestV1::UserList
        | AdminRequestV1::UserListDetailed
        | AdminRequestV1::UserCreateWithPassword { .. }
        | AdminRequestV1::UserSetPassword { .. }
        | AdminRequestV1::UserToken { .. }
        | AdminRequestV1::UserRevokeTokens { .. }) => users(ctx, req, now).await,
        req @ (AdminRequestV1::GroupUpdateImage(_)
        | AdminRequestV1::GroupVersions { .. }
        | AdminRequestV1::GroupRollouts { .. }) => rollouts(ctx, req, now).await,
        AdminRequestV1::Status
        | AdminRequestV1::ListResources
        | AdminRequestV1::ListSessions { .. }
        | AdminRequestV1::Drain { .. }
        | AdminRequestV1::Undrain { .. }
        | AdminRequestV1::DisconnectSession { .. }
        | AdminRequestV1::ResourcesAssign { .. }
        | AdminRequestV1::Usage(_)
        | AdminRequestV1::UsageDetailed(_)
        | AdminRequestV1::ListSessionsDetailed { .. }
        | AdminRequestV1::OtaOffer(_)
        | AdminRequestV1::OtaList { .. }
        | AdminRequestV1::OtaSchedule(_)
        | AdminRequestV1::OtaReschedule { .. }
        | AdminRequestV1::OtaCancel { .. }
        | AdminRequestV1::OtaHistory { .. }
        | AdminRequestV1::OtaListWithSchedules { .. }
        | AdminRequestV1::ResourceRevoke { .. }
        | AdminRequestV1::ListResourcesWithRevocations
        | AdminRequestV1::Cluster
        | AdminRequestV1::ConsoleLogin => {
            return error(AdminErrorCode::Internal, "misrouted admin request".into())
        }
    };
    answer(result)
}

/// `ferryctl cluster`: the brokers of the store and each group's owner.
async fn cluster(ctx: &AdminContext) -> Result<ClusterInfo, crate::store::StoreError> {
    let Some(settings) = &ctx.cluster else {
        return Ok(ClusterInfo {
            this_broker: None,
            brokers: Vec::new(),
            groups: Vec::new(),
        });
    };
    let lease_ms = i64::try_from(settings.lease.as_millis()).unwrap_or(i64::MAX);
    let (now, brokers) = ctx.store.brokers().await?;
    let owners = ctx.store.owners().await?;
    Ok(ClusterInfo {
        this_broker: Some(settings.broker_id.clone()),
        brokers: brokers
            .into_iter()
            .map(|b| ClusterBroker {
                live: !b.leaving && b.seen_at > now - lease_ms,
                id: b.id,
                address: b.address,
                seen_at: UnixMillis(b.seen_at),
                leaving: b.leaving,
            })
            .collect(),
        groups: owners
            .into_iter()
            .filter_map(|o| {
                Some(GroupOwnerInfo {
                    group: o.group.parse().ok()?,
                    owner: o.owner,
                    epoch: o.epoch.and_then(|e| u64::try_from(e).ok()),
                })
            })
            .collect(),
    })
}

/// A group verb's answer: its response, or its refusal as the admin error
/// of its kind.
fn answer(result: Result<AdminResponseV1, GroupError>) -> AdminResponseV1 {
    match result {
        Ok(resp) => resp,
        Err(GroupError::NotFound(m)) => error(AdminErrorCode::NotFound, m),
        Err(e @ GroupError::NotAllowed(_)) => error(AdminErrorCode::NotAllowed, e.to_string()),
        Err(e @ GroupError::Invalid(_)) => error(AdminErrorCode::Invalid, e.to_string()),
        Err(GroupError::Conflict(m)) => error(AdminErrorCode::Conflict, m),
        Err(GroupError::Store(e)) => internal(e),
    }
}

/// `group show` (as older clients ask it) with the live view.
async fn shown(
    ctx: &AdminContext,
    group: &ferry_common::GroupName,
) -> Result<AdminResponseV1, GroupError> {
    let mut d = ctx.groups.service().show(group.as_str()).await?;
    let live = live_view(ctx, &mut d).await;
    Ok(AdminResponseV1::GroupShown {
        detail: Box::new(d),
        live,
    })
}

/// `group show` with every policy part and the live view.
async fn shown_with_policy(
    ctx: &AdminContext,
    group: &ferry_common::GroupName,
) -> Result<AdminResponseV1, GroupError> {
    let mut d = ctx
        .groups
        .service()
        .show_with_policy(group.as_str())
        .await?;
    d.live = live_view(ctx, &mut d.detail).await;
    Ok(AdminResponseV1::GroupWithPolicy(Box::new(d)))
}

/// The verbs of image updates and what a group's hosts run.
async fn rollouts(
    ctx: &AdminContext,
    req: AdminRequestV1,
    now: ferry_common::UnixMillis,
) -> Result<AdminResponseV1, GroupError> {
    match req {
        AdminRequestV1::GroupUpdateImage(spec) => ctx
            .groups
            .update_image(&ctx.store, spec, now)
            .await
            .map(|d| AdminResponseV1::Group(Box::new(d))),
        AdminRequestV1::GroupVersions { group } => {
            crate::rollout::image::versions(&ctx.store, &ctx.registry, &group)
                .await
                .map(AdminResponseV1::GroupVersions)
        }
        AdminRequestV1::GroupRollouts { group } => {
            crate::ota::progress::group_rollouts(&ctx.store, &ctx.registry, ctx.ota.board(), &group)
                .await
                .map(AdminResponseV1::GroupRollouts)
        }
        _ => Ok(error(
            AdminErrorCode::Internal,
            "misrouted admin request".into(),
        )),
    }
}

/// The user verbs.
async fn users(
    ctx: &AdminContext,
    req: AdminRequestV1,
    now: ferry_common::UnixMillis,
) -> Result<AdminResponseV1, GroupError> {
    let service = ctx.groups.service();
    let done = |r: Result<String, GroupError>| r.map(|message| AdminResponseV1::Done { message });
    match req {
        AdminRequestV1::UserCreate(user) => service
            .create_user(user, now)
            .await
            .map(AdminResponseV1::Users),
        AdminRequestV1::UserImport { csv } => service
            .import_users(&csv, now)
            .await
            .map(AdminResponseV1::Users),
        AdminRequestV1::UserList => service.users().await.map(AdminResponseV1::Users),
        AdminRequestV1::UserListDetailed => crate::listing::users(service, &ctx.store)
            .await
            .map(AdminResponseV1::UsersDetailed),
        AdminRequestV1::UserCreateWithPassword { user, password } => service
            .create_user_with_password(user, &password.0, now)
            .await
            .map(AdminResponseV1::Users),
        AdminRequestV1::UserSetPassword { user, password } => {
            done(service.set_password(&user, &password.0, now).await)
        }
        AdminRequestV1::UserToken { user, ttl_secs } => service
            .issue_token(&user, std::time::Duration::from_secs(ttl_secs), now)
            .await
            .map(|(token, expires_at)| AdminResponseV1::UserToken {
                user,
                token,
                expires_at,
            }),
        AdminRequestV1::UserRevokeTokens { user } => done(service.revoke_tokens(&user, now).await),
        _ => Ok(error(
            AdminErrorCode::Internal,
            "misrouted admin request".into(),
        )),
    }
}

async fn known_resource(
    ctx: &AdminContext,
    resource: &ResourceId,
) -> Result<Option<crate::store::StoredResource>, AdminResponseV1> {
    match ctx.store.resources().await {
        Ok(all) => Ok(all.into_iter().find(|r| &r.resource == resource)),
        Err(e) => Err(internal(e)),
    }
}

async fn command_error(ctx: &AdminContext, e: CommandError) -> AdminResponseV1 {
    match e {
        CommandError::NotConnected(r) => match known_resource(ctx, &r).await {
            Ok(None) => error(AdminErrorCode::NotFound, format!("no resource named {r}")),
            Ok(Some(known)) => {
                // Brokers sharing a store: its agent is at its group's owner.
                let owner = known
                    .group
                    .as_ref()
                    .map(|g| (g, ctx.groups.actors().ownership().owner(g)));
                let message = match owner {
                    Some((g, Owner::At(address))) => format!(
                        "resource {r} is served by the broker owning group {g}, at {address}: \
                         run this command with ferryctl on that broker"
                    ),
                    Some((g, Owner::Nobody)) => format!(
                        "resource {r} is not connected here and group {g} is changing broker: \
                         try again in a few seconds (ferryctl cluster shows the owners)"
                    ),
                    _ => {
                        format!("resource {r} is not connected; the command cannot reach its agent")
                    }
                };
                error(AdminErrorCode::NotConnected, message)
            }
            Err(resp) => resp,
        },
        CommandError::Timeout(..) => error(AdminErrorCode::Timeout, e.to_string()),
        CommandError::ConnectionClosed(_) => error(AdminErrorCode::NotConnected, e.to_string()),
    }
}

async fn drain(
    ctx: &AdminContext,
    resource: ResourceId,
    command: Command,
    draining: bool,
) -> AdminResponseV1 {
    let verb = if draining { "drain" } else { "undrain" };
    match ctx
        .registry
        .command(&resource, command, COMMAND_TIMEOUT)
        .await
    {
        Ok(CommandOutcome::Done) => {
            ctx.registry.set_draining(&resource, draining);
            AdminResponseV1::Done {
                message: if draining {
                    format!("{resource} is draining: it takes no new sessions")
                } else {
                    format!("{resource} takes sessions again")
                },
            }
        }
        Ok(CommandOutcome::Failed(why)) => error(
            AdminErrorCode::CommandFailed,
            format!("{resource} could not {verb}: {why}"),
        ),
        Err(e) => command_error(ctx, e).await,
    }
}

/// `resources assign`: the operator puts a host in a group (or in none). A
/// connected agent of the host is dismissed and checked against its new
/// group when it reconnects.
async fn assign(
    ctx: &AdminContext,
    resource: ResourceId,
    group: Option<GroupName>,
) -> AdminResponseV1 {
    let now = ctx.groups.now();
    let previous = match ctx
        .store
        .assign_resource(&resource, group.clone(), now)
        .await
    {
        Ok(Assigned::Done { previous }) => previous,
        Ok(Assigned::Provisioned { group: owner }) => {
            return error(
                AdminErrorCode::NotAllowed,
                format!(
                    "{resource} was created for group {owner} by its provisioner: it belongs to \
                     that group until the group releases it, and cannot be assigned"
                ),
            )
        }
        Err(e) => return internal(e),
    };
    let target = match &group {
        Some(g) => format!("group {g}"),
        None => "no group".to_owned(),
    };
    if previous == group {
        return AdminResponseV1::Done {
            message: format!("{resource} is in {target} already"),
        };
    }
    let mut message = match &previous {
        Some(p) => format!("{resource} is in {target} now (it was in group {p})"),
        None => format!("{resource} is in {target} now"),
    };
    let dismissed = ctx.registry.dismiss(
        &resource,
        Refusal {
            code: RefusalCode::NotMember,
            message: format!(
                "an operator put resource {resource} in {target}: reconnect, the link is \
                 checked against it"
            ),
        },
    );
    if dismissed {
        message.push_str("; its agent was disconnected and joins when it reconnects");
    }
    if let Some(g) = &group {
        match ctx.store.live_group(g.as_str()).await {
            Ok(Some(_)) => {}
            Ok(None) => message.push_str(&format!(
                "; group {g} does not exist yet: the host joins it once it is published"
            )),
            Err(e) => tracing::warn!(group = %g, "look the group up: {e}"),
        }
    }
    tracing::info!("{message}");
    AdminResponseV1::Done { message }
}

async fn disconnect(ctx: &AdminContext, session: SessionId) -> AdminResponseV1 {
    let hosts = match ctx.store.open_session_hosts(&session).await {
        Ok(h) => h,
        Err(e) => return internal(e),
    };
    let resource = match hosts.as_slice() {
        [] => {
            return error(
                AdminErrorCode::NotFound,
                format!("no open session named {session}"),
            )
        }
        [one] => one.clone(),
        many => {
            let names: Vec<&str> = many.iter().map(|r| r.as_str()).collect();
            return error(
                AdminErrorCode::BadRequest,
                format!(
                    "session {session} is open on several resources ({}); end it on the host",
                    names.join(", ")
                ),
            );
        }
    };
    let command = Command::DisconnectSession {
        session: session.clone(),
        reason: "disconnected by operator".into(),
    };
    match ctx
        .registry
        .command(&resource, command, COMMAND_TIMEOUT)
        .await
    {
        Ok(CommandOutcome::Done) => AdminResponseV1::Done {
            message: format!(
                "{resource} is ending session {session}; its end is recorded when the host reports it"
            ),
        },
        Ok(CommandOutcome::Failed(why)) => error(
            AdminErrorCode::CommandFailed,
            format!("{resource} could not end session {session}: {why}"),
        ),
        Err(e) => command_error(ctx, e).await,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("no broker is listening on {path} ({error}); is ferry-broker running? (set --socket or FERRY_ADMIN_SOCKET)")]
    NotRunning {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("admin socket {path}: {error}")]
    Connect {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("admin socket: {0}")]
    Frame(#[from] FrameError),
    #[error("broker closed the admin connection without answering")]
    NoAnswer,
    #[error("{}", .0.message)]
    Remote(AdminError),
    #[error("unexpected answer from broker: {0}")]
    Unexpected(String),
}

/// A connection to the broker's admin socket.
pub struct AdminClient {
    stream: UnixStream,
}

impl AdminClient {
    pub async fn connect(path: &Path) -> Result<AdminClient, AdminClientError> {
        match UnixStream::connect(path).await {
            Ok(stream) => Ok(AdminClient { stream }),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Err(AdminClientError::NotRunning {
                    path: path.to_path_buf(),
                    error,
                })
            }
            Err(error) => Err(AdminClientError::Connect {
                path: path.to_path_buf(),
                error,
            }),
        }
    }

    /// Sends one request and returns the answer; an `Error` answer is `Err(Remote)`.
    pub async fn call(&mut self, req: AdminRequestV1) -> Result<AdminResponseV1, AdminClientError> {
        let sent = write_admin(&mut self.stream, &AdminRequest::V1(req)).await;
        // A broker that turns the peer away (its credentials, too many
        // connections) answers and closes without reading the request: the
        // write may then fail, and the answer waiting to be read says why.
        let answer = read_admin::<AdminResponse, _>(&mut self.stream).await;
        match (sent, answer) {
            (_, Ok(Some(AdminResponse::V1(AdminResponseV1::Error(e))))) => {
                Err(AdminClientError::Remote(e))
            }
            (Ok(()), Ok(Some(AdminResponse::V1(resp)))) => Ok(resp),
            (Err(e), _) => Err(e.into()),
            (Ok(()), Err(e)) => Err(e.into()),
            (Ok(()), Ok(None)) => Err(AdminClientError::NoAnswer),
        }
    }
}

/// Connects, sends one request, returns the answer.
pub async fn request(
    path: &Path,
    req: AdminRequestV1,
) -> Result<AdminResponseV1, AdminClientError> {
    AdminClient::connect(path).await?.call(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::AsyncReadExt;

    struct Fixture {
        _tmp: tempfile::TempDir,
        socket: PathBuf,
        store: Store,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    }

    async fn start() -> Fixture {
        start_with(AdminLimits::default()).await
    }

    /// The access of this test process (root, or the user running it).
    fn own_access() -> access::AdminAccess {
        access::AdminAccess::for_process(None).expect("own access")
    }

    async fn start_with(limits: AdminLimits) -> Fixture {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = crate::store::testing::open_for_test(tmp.path());
        let socket = tmp.path().join("admin.sock");
        let listener = bind(&socket).expect("bind");
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let registry = Arc::new(Registry::new());
        let (groups, ota) =
            crate::test_support::wire(&store, &registry, Default::default(), &tracker, &shutdown);
        let ctx = AdminContext {
            store: store.clone(),
            registry,
            groups,
            ota,
            cluster: None,
            peers: None,
            console: None,
        };
        tracker.spawn(serve_with(
            listener,
            ctx,
            own_access(),
            limits,
            shutdown.clone(),
            tracker.clone(),
        ));
        Fixture {
            _tmp: tmp,
            socket,
            store,
            shutdown,
            tracker,
        }
    }

    impl Fixture {
        async fn stop(self) {
            self.shutdown.cancel();
            self.tracker.close();
            self.tracker.wait().await;
            self.store.close().await;
        }
    }

    #[tokio::test]
    async fn the_socket_has_mode_0660_and_answers_status() {
        let f = start().await;
        let mode = std::fs::metadata(&f.socket)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o660);
        let resp = request(&f.socket, AdminRequestV1::Status)
            .await
            .expect("status");
        let AdminResponseV1::Status(s) = resp else {
            panic!("unexpected {resp:?}")
        };
        assert_eq!(
            (s.agents_connected, s.resources, s.events_recorded),
            (0, 0, 0)
        );
        f.stop().await;
    }

    #[tokio::test]
    async fn garbage_gets_a_clear_error_and_changes_nothing() {
        let f = start().await;
        for bad in [
            // A well-framed payload that is not a request.
            vec![0, 0, 0, 3, 9, 9, 9],
            // A length over the admin limit, refused from the prefix alone
            // (the body is never sent, nothing is allocated for it).
            vec![0xff, 0xff, 0xff, 0xff],
            u32::try_from(MAX_ADMIN_FRAME_LEN + 1)
                .expect("fits")
                .to_be_bytes()
                .to_vec(),
            // A Drain naming an invalid resource id.
            vec![0, 0, 0, 5, 0, 3, 2, b'H', b'!'],
        ] {
            let mut s = UnixStream::connect(&f.socket).await.expect("connect");
            s.write_all(&bad).await.expect("write");
            let resp: AdminResponse = read_admin(&mut s).await.expect("read").expect("answer");
            let AdminResponse::V1(AdminResponseV1::Error(e)) = resp else {
                panic!("unexpected {resp:?}")
            };
            assert_eq!(e.code, AdminErrorCode::BadRequest);
            assert!(e.message.starts_with("bad request"), "{}", e.message);
            // The broker closes the connection after a bad frame.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.expect("eof");
            assert!(rest.is_empty());
        }
        let AdminResponseV1::Status(s) = request(&f.socket, AdminRequestV1::Status)
            .await
            .expect("status")
        else {
            panic!("status")
        };
        assert_eq!((s.resources, s.events_recorded), (0, 0));
        f.stop().await;
    }

    #[tokio::test]
    async fn commands_for_unknown_things_are_not_found() {
        let f = start().await;
        let err = request(
            &f.socket,
            AdminRequestV1::Drain {
                resource: "nope".parse().expect("id"),
            },
        )
        .await
        .expect_err("unknown resource");
        let AdminClientError::Remote(e) = err else {
            panic!("{err:?}")
        };
        assert_eq!(e.code, AdminErrorCode::NotFound);
        assert!(e.message.contains("nope"));

        let err = request(
            &f.socket,
            AdminRequestV1::DisconnectSession {
                session: "s1".parse().expect("id"),
            },
        )
        .await
        .expect_err("unknown session");
        assert!(matches!(
            err,
            AdminClientError::Remote(AdminError {
                code: AdminErrorCode::NotFound,
                ..
            })
        ));
        f.stop().await;
    }

    #[tokio::test]
    async fn a_live_socket_is_not_replaced_and_a_stale_one_is() {
        let f = start().await;
        assert!(matches!(bind(&f.socket), Err(AdminSocketError::InUse(_))));
        let socket = f.socket.clone();
        let dir = tempfile::tempdir().expect("tmp");
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
        assert!(stale.exists());
        bind(&stale).expect("stale socket replaced");
        let plain = dir.path().join("file");
        std::fs::write(&plain, b"x").expect("write");
        assert!(matches!(bind(&plain), Err(AdminSocketError::NotASocket(_))));
        f.stop().await;
        let _ = socket;
    }

    #[tokio::test]
    async fn a_missing_socket_says_the_broker_is_not_running() {
        let dir = tempfile::tempdir().expect("tmp");
        let err = request(&dir.path().join("none.sock"), AdminRequestV1::Status)
            .await
            .expect_err("no broker");
        assert!(matches!(err, AdminClientError::NotRunning { .. }));
        assert!(err.to_string().contains("is ferry-broker running"));
    }

    /// Waits (bounded) until the broker has closed `s`: writing to it fails.
    async fn closed_by_broker(s: &mut UnixStream) {
        let status = frame::encode_frame(
            &AdminRequest::V1(AdminRequestV1::Status),
            MAX_ADMIN_FRAME_LEN,
        )
        .expect("frame");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, s.write_all(&status)).await {
                Err(_) => panic!("the broker did not close the connection in time"),
                Ok(Err(_)) => return,
                Ok(Ok(())) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    fn quick() -> AdminLimits {
        AdminLimits {
            idle: Duration::from_millis(300),
            write: Duration::from_millis(300),
        }
    }

    #[tokio::test]
    async fn a_client_that_stalls_or_does_not_read_is_dropped_and_frees_its_slot() {
        let f = start_with(quick()).await;
        // Enough users that a listing fills the socket's buffer many times.
        let mut csv = String::from("id,email,mobile\n");
        for i in 0..10_000 {
            csv.push_str(&format!("user-{i:05},user{i}@example.com,+4912345{i:05}\n"));
        }
        let done = request(&f.socket, AdminRequestV1::UserImport { csv })
            .await
            .expect("import");
        assert!(matches!(&done, AdminResponseV1::Users(u) if u.len() == 10_000));

        // Half a frame, then silence.
        let mut stalled = UnixStream::connect(&f.socket).await.expect("connect");
        stalled.write_all(&[0, 0, 0, 40, 0]).await.expect("write");
        // Listings asked for and never read.
        let mut deaf = UnixStream::connect(&f.socket).await.expect("connect");
        let list = frame::encode_frame(
            &AdminRequest::V1(AdminRequestV1::UserList),
            MAX_ADMIN_FRAME_LEN,
        )
        .expect("frame");
        for _ in 0..3 {
            deaf.write_all(&list).await.expect("write");
        }
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stalled.read_to_end(&mut rest))
            .await
            .expect("stalled client dropped in time")
            .expect("eof");
        assert!(rest.is_empty(), "no answer to half a frame");
        closed_by_broker(&mut deaf).await;
        f.stop().await;
    }

    #[tokio::test]
    async fn a_refusal_sent_before_the_request_was_read_reaches_the_client() {
        // The broker answers a peer it turns away and closes without reading:
        // a request too large for the socket's buffer then fails to be
        // written, and the client must still report the answer.
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("admin.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let refused = error(AdminErrorCode::Forbidden, "uid 7 is not allowed".into());
            write_admin(&mut stream, &AdminResponse::V1(refused))
                .await
                .expect("answer");
        });
        let mut client = AdminClient::connect(&path).await.expect("connect");
        let big = AdminRequestV1::UserImport {
            csv: "x".repeat(4 << 20),
        };
        match client.call(big).await {
            Err(AdminClientError::Remote(e)) => {
                assert_eq!(e.code, AdminErrorCode::Forbidden);
                assert!(e.message.contains("uid 7"), "{}", e.message);
            }
            other => panic!("expected the refusal, got {other:?}"),
        }
        server.await.expect("server");
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_told_busy() {
        let f = start().await;
        let mut open = Vec::new();
        for _ in 0..MAX_ADMIN_CONNECTIONS {
            let mut c = AdminClient::connect(&f.socket).await.expect("connect");
            c.call(AdminRequestV1::Status).await.expect("served");
            open.push(c);
        }
        let mut one_more = UnixStream::connect(&f.socket).await.expect("connect");
        let resp: AdminResponse = read_admin(&mut one_more)
            .await
            .expect("read")
            .expect("answer");
        assert!(
            matches!(
                &resp,
                AdminResponse::V1(AdminResponseV1::Error(AdminError {
                    code: AdminErrorCode::Busy,
                    ..
                }))
            ),
            "{resp:?}"
        );
        drop(open);
        f.stop().await;
    }
}
