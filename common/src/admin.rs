//! Messages of the broker's admin socket (`ferryctl` <-> `ferry-broker`).
//!
//! Framed like the agent link ([`crate::frame::read_message`] /
//! [`crate::frame::write_message`]) with [`crate::limits::MAX_ADMIN_FRAME_LEN`].
//! One request, one response, any number of times per connection. Both
//! directions sit in a versioned envelope so a `V2` can be added beside `V1`;
//! the same bincode rules as in [`crate::wire`] apply: never reorder or remove a
//! variant, never add a field to a shipped struct.
//!
//! These are wire types: the broker converts its state into them at the edge,
//! and `ferryctl` converts them into tables and JSON.

use serde::{Deserialize, Serialize};

use crate::ids::{GroupName, ResourceId, SessionId, UserId};
use crate::wire::{ComponentVersion, HostFacts, UnixMillis};

/// Most admin connections served at once. `ferryctl` opens one per command;
/// a handful of operators and scripts never need more, and the cap keeps a
/// runaway script from tying up the broker.
pub const MAX_ADMIN_CONNECTIONS: usize = 32;

/// Envelope of everything `ferryctl` sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    V1(AdminRequestV1),
}

/// Envelope of everything the broker answers on its admin socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminResponse {
    V1(AdminResponseV1),
}

/// What an operator can ask.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequestV1 {
    /// Broker-wide counters. Answered by [`AdminResponseV1::Status`].
    Status,
    /// Every resource the broker knows. Answered by [`AdminResponseV1::Resources`].
    ListResources,
    /// Sessions; only open ones unless `all`. Answered by [`AdminResponseV1::Sessions`].
    ListSessions { all: bool },
    /// Ask a connected resource to take no new sessions. Answered by `Done`.
    Drain { resource: ResourceId },
    /// Ask a connected resource to take sessions again. Answered by `Done`.
    Undrain { resource: ResourceId },
    /// Ask the host of an open session to end it. Answered by `Done`.
    DisconnectSession { session: SessionId },
    /// Publish a delivery group. Answered by [`AdminResponseV1::Group`].
    ///
    /// Superseded by [`AdminRequestV1::GroupPublishWithPolicy`], which
    /// `ferryctl` sends since the policy parts; kept (and answered) for
    /// older clients and for callers that set no policy part.
    GroupPublish(GroupSpec),
    /// Groups matching every given filter. Answered by [`AdminResponseV1::Groups`].
    GroupList(GroupFilter),
    /// One group (by name or id). Answered by [`AdminResponseV1::GroupShown`].
    ///
    /// Superseded by [`AdminRequestV1::GroupShowWithPolicy`], which `ferryctl`
    /// sends; kept (and answered) for older clients.
    GroupShow { group: GroupName },
    /// Change the given policy parameters; the rest stay. Answered by `Group`.
    ///
    /// Superseded by [`AdminRequestV1::GroupUpdatePolicyParts`], which
    /// `ferryctl` sends; kept (and answered, the same change with no part
    /// given) for older clients.
    GroupUpdatePolicy {
        group: GroupName,
        policy: PolicySpec,
    },
    /// Assign and unassign users. Answered by `Group`.
    GroupUpdateUsers {
        group: GroupName,
        add: Vec<UserId>,
        remove: Vec<UserId>,
    },
    /// Extend a subscription by `duration` (`Nw`, `Nmo`, `Ny`). Answered by `Group`.
    GroupRenew { group: GroupName, duration: String },
    /// Turn a subscription's auto-renew on or off. Answered by `Group`.
    GroupSetAutoRenew { group: GroupName, on: bool },
    /// Purge a group (per the purge/delete table). Answered by `Done`.
    GroupPurge { group: GroupName },
    /// Delete a group (per the purge/delete table). Answered by `Done`.
    GroupDelete { group: GroupName },
    /// The group's recorded decisions. Answered by [`AdminResponseV1::GroupEvents`].
    GroupEvents { group: GroupName },
    /// Move a group to another region: always refused unless it is the same
    /// region (regions are fixed at publish). Answered by `Done`.
    GroupSetRegion { group: GroupName, region: String },
    /// Create one user. Answered by [`AdminResponseV1::Users`] (the new user).
    UserCreate(UserSpec),
    /// Create or update users from CSV text (header `id,email,mobile`), all or
    /// nothing. Answered by `Users` (the imported users).
    UserImport { csv: String },
    /// Every user. Answered by [`AdminResponseV1::Users`].
    UserList,
    /// Metering over `[from, to)`, for one group or all. Answered by
    /// [`AdminResponseV1::Usage`].
    Usage(UsageQuery),
    /// Create one user with a password (hashed by the broker, never stored
    /// in clear), in one transaction. Answered by `Users` (the new user).
    UserCreateWithPassword { user: UserSpec, password: Secret },
    /// Replace a user's password. Answered by `Done`.
    UserSetPassword { user: UserId, password: Secret },
    /// Issue a token for `user` valid `ttl_secs` seconds. Answered by
    /// [`AdminResponseV1::UserToken`].
    UserToken { user: UserId, ttl_secs: u64 },
    /// Invalidate every token of `user` issued so far. Answered by `Done`.
    UserRevokeTokens { user: UserId },
    // ---- policy parts (session, display, periods) ----
    /// `group publish` with the session and display parts and the policy
    /// periods. Answered by [`AdminResponseV1::GroupWithPolicy`] (`live` = `None`).
    GroupPublishWithPolicy {
        spec: GroupSpec,
        parts: PolicyPartsSpec,
    },
    /// Change scaling parameters and policy parts; everything unset stays.
    /// Answered by `GroupWithPolicy` (`live` = `None`).
    GroupUpdatePolicyParts {
        group: GroupName,
        policy: PolicySpec,
        parts: PolicyPartsSpec,
    },
    /// `group show` with every part of the policy. Answered by `GroupWithPolicy`.
    GroupShowWithPolicy { group: GroupName },
    // ---- image updates and OTA ----
    /// Offer an update (`ferryctl ota offer`) to a group. Answered by
    /// [`AdminResponseV1::OtaUpdates`] (the new offer).
    OtaOffer(OtaOfferSpec),
    /// Offered updates, of one group or all. Answered by `OtaUpdates`.
    OtaList { group: Option<GroupName> },
    /// Schedule an offered update's rollout. Answered by
    /// [`AdminResponseV1::OtaSchedules`] (the new schedule).
    OtaSchedule(OtaScheduleSpec),
    /// Move a schedule's start (only before it starts). Answered by `OtaSchedules`.
    OtaReschedule { schedule: u64, start: UnixMillis },
    /// Cancel a schedule (only before it starts). Answered by `OtaSchedules`.
    OtaCancel { schedule: u64 },
    /// Every OTA schedule of a group with each resource's outcome. Answered
    /// by `OtaSchedules`.
    OtaHistory { group: GroupName },
    /// Switch every resource of a group to another image (`ferryctl group
    /// update-image`): sessions are warned, then disconnected, then each
    /// host switches. Answered by `Group` once the group is `updating`.
    GroupUpdateImage(ImageUpdateSpec),
    /// The image and agent versions each resource of a group runs. Answered
    /// by [`AdminResponseV1::GroupVersions`].
    GroupVersions { group: GroupName },
    // ---- group status (publishing, payment) ----
    /// The billing system (or an operator) says a pay-as-you-go group's
    /// account is in arrears: `published` -> `payment-overdue` (no new
    /// sessions, no scale-out; open sessions go on). Answered by `Group`.
    GroupSetPaymentOverdue { group: GroupName },
    /// The arrears are paid: `payment-overdue` -> `published`. Answered by
    /// `Group`.
    GroupClearPaymentOverdue { group: GroupName },
    // ---- operator output (issue 12) ----
    /// [`AdminRequestV1::Usage`] with each resource's amount. Answered by
    /// [`AdminResponseV1::UsageDetailed`].
    UsageDetailed(UsageQuery),
    /// [`AdminRequestV1::ListSessions`] with each session's group and
    /// state (open, retained, ended). Answered by
    /// [`AdminResponseV1::SessionsDetailed`].
    ListSessionsDetailed { all: bool },
    /// [`AdminRequestV1::UserList`] with whether each user has a password
    /// and tokens. Answered by [`AdminResponseV1::UsersDetailed`].
    UserListDetailed,
    /// [`AdminRequestV1::GroupEvents`] with the resource, session and user
    /// each event names. Answered by [`AdminResponseV1::GroupEventsDetailed`].
    GroupEventsDetailed { group: GroupName },
    // ---- fleet updates as the operator follows them ----
    /// `group show`'s update part: what each resource runs, and the image
    /// update or OTA rollout running (each host's step and deadline) or
    /// scheduled. Answered by [`AdminResponseV1::GroupRollouts`].
    GroupRollouts { group: GroupName },
    /// Offered updates with the schedules that roll them out, of one group
    /// or all (`ferryctl ota list`). Answered by
    /// [`AdminResponseV1::OtaUpdatesAndSchedules`].
    OtaListWithSchedules { group: Option<GroupName> },

    // --- Trust boundaries (issue 14). ---
    /// Put a host in a delivery group (`None`: in no group), the operator's
    /// decision: an agent whose `Hello` names another group is refused. A
    /// connected agent of the host is disconnected and checked again when
    /// it reconnects. Refused for resources the provisioner created for another
    /// group. Answered by `Done`.
    ResourcesAssign {
        resource: ResourceId,
        group: Option<GroupName>,
    },
    /// Revoke a host: every certificate of `resource` issued until now is
    /// refused from now on (also after a restart), its live connection is
    /// closed at once, and it cannot renew. A certificate issued later
    /// (`ferryctl pki issue-agent`) admits it again. `reason` is recorded
    /// (empty: none given). Answered by `Done`.
    ResourceRevoke {
        resource: ResourceId,
        reason: String,
    },
    /// [`AdminRequestV1::ListResources`] with the operator's revocations.
    /// Answered by [`AdminResponseV1::ResourcesWithRevocations`].
    ListResourcesWithRevocations,

    // --- Several brokers on one store (issue 16). ---
    /// The brokers sharing this broker's store and which owns each group.
    /// Answered by [`AdminResponseV1::Cluster`].
    Cluster,
    // --- The web console (issue 17). ---
    /// A one-time link that signs its opener in to this broker's web
    /// console. Answered by [`AdminResponseV1::ConsoleLink`].
    ConsoleLogin,
}

/// A secret (password) on the admin socket: never printed by `Debug`.
/// Encoded as its string.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The broker's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminResponseV1 {
    Status(StatusReport),
    Resources(Vec<ResourceInfo>),
    Sessions(Vec<SessionInfo>),
    /// The command was carried out; the message says what happened.
    Done {
        message: String,
    },
    /// The request was refused or failed; nothing was changed by it.
    Error(AdminError),
    Groups(Vec<GroupInfo>),
    Group(Box<GroupDetail>),
    GroupEvents(Vec<GroupEventInfo>),
    Users(Vec<UserInfo>),
    Usage(UsageReport),
    /// `group show`: the stored group and, when its actor runs, its live
    /// state. Answers [`AdminRequestV1::GroupShow`] (a new variant rather than
    /// a field on [`GroupDetail`], which is shipped).
    GroupShown {
        detail: Box<GroupDetail>,
        /// `None` when the group has no running actor (gone, recycling,
        /// publish failed, or this broker runs without group actors).
        live: Option<LiveGroupView>,
    },
    /// A new user token (printed once by `ferryctl user token`).
    UserToken {
        user: UserId,
        token: String,
        expires_at: UnixMillis,
    },
    // ---- policy parts (session, display, periods) ----
    /// A group with every part of its policy: answers `GroupPublishWithPolicy`,
    /// `GroupUpdatePolicyParts` and `GroupShowWithPolicy`.
    GroupWithPolicy(Box<GroupPolicyDetail>),
    // ---- image updates and OTA ----
    /// Offered updates (`ota offer`, `ota list`).
    OtaUpdates(Vec<OtaUpdateInfo>),
    /// OTA schedules with their per-resource outcomes (`ota schedule`,
    /// `reschedule`, `cancel`, `history`).
    OtaSchedules(Vec<OtaScheduleInfo>),
    /// The versions a group's resources run (`GroupVersions`).
    GroupVersions(GroupVersionsInfo),
    // ---- group status (publishing, payment) ----
    // ---- operator output (issue 12) ----
    /// Answers `UsageDetailed`.
    UsageDetailed(UsageDetail),
    /// Answers `ListSessionsDetailed`.
    SessionsDetailed(Vec<SessionDetail>),
    /// Answers `UserListDetailed`.
    UsersDetailed(Vec<UserDetail>),
    /// Answers `GroupEventsDetailed`.
    GroupEventsDetailed(Vec<GroupEventDetail>),
    // ---- fleet updates as the operator follows them ----
    /// Answers `GroupRollouts`.
    GroupRollouts(GroupRolloutsInfo),
    /// Answers `OtaListWithSchedules`: the offers, and every schedule of
    /// them (its own id, the update it rolls out, its state).
    OtaUpdatesAndSchedules {
        updates: Vec<OtaUpdateInfo>,
        schedules: Vec<OtaScheduleInfo>,
    },
    // ---- certificates (issue 14) ----
    /// `resources list`: every resource, and every revocation (also of
    /// resources that never registered), by resource.
    ResourcesWithRevocations {
        resources: Vec<ResourceInfo>,
        revocations: Vec<RevocationInfo>,
    },
    // ---- several brokers (issue 16) ----
    /// Answers `Cluster`.
    Cluster(ClusterInfo),
    /// Answers `ConsoleLogin`: the link (it holds a one-time secret) and
    /// when it stops working.
    ConsoleLink {
        url: String,
        expires_at: UnixMillis,
    },
}

/// The brokers sharing a store and the owners of its groups (`ferryctl
/// cluster`). A broker alone on its SQLite store lists none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The broker that answered (its `broker_id`); `None` when alone.
    pub this_broker: Option<String>,
    pub brokers: Vec<ClusterBroker>,
    pub groups: Vec<GroupOwnerInfo>,
}

/// A broker sharing the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterBroker {
    pub id: String,
    /// Where agents and users reach it.
    pub address: String,
    /// Its last heartbeat, by the database's clock.
    pub seen_at: UnixMillis,
    /// It heartbeated within its lease time and is not leaving.
    pub live: bool,
    /// It is shutting down (its groups were handed over).
    pub leaving: bool,
}

/// Who owns a group now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupOwnerInfo {
    pub group: GroupName,
    /// The broker holding its lease; `None` while nobody does.
    pub owner: Option<String>,
    /// The lease's epoch (grows at each change of owner).
    pub epoch: Option<u64>,
}

/// An operator's revocation of a host (`ferryctl resources revoke`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationInfo {
    pub resource: ResourceId,
    /// Certificates of the resource issued before this are refused.
    pub revoked_before: UnixMillis,
    /// When the operator revoked it.
    pub at: UnixMillis,
    pub reason: String,
}

/// A usage report with each resource's amount (a new struct: [`UsageReport`]
/// is shipped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageDetail {
    /// Billed up to `report.to`: the earlier of `asked_to` and the broker's
    /// now (time that has not happened is never billed).
    pub report: UsageReport,
    /// One per resource line of the report, in its order (group by group).
    pub resources: Vec<ResourceAmount>,
    /// The end of the period asked for; after `report.to` when the report
    /// is one "so far".
    pub asked_to: UnixMillis,
}

/// What one resource's ready time cost over the period, for information:
/// the bill rounds each line (subscription, pay-as-you-go base, elastic),
/// not each resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceAmount {
    pub group: GroupName,
    pub resource: ResourceId,
    /// Its exact amount (decimal text, unrounded); `None` when it is paid
    /// by the group's subscription (a base resource of a subscription group).
    pub amount: Option<String>,
}

/// A session with its group and state (`sessions list`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionDetail {
    pub info: SessionInfo,
    /// The delivery group of its resource, when the resource has one.
    pub group: Option<GroupName>,
    /// `open`, `retained` (its user disconnected; kept for a reconnect) or
    /// `ended`.
    pub state: String,
    /// When its user disconnected (retained sessions).
    pub disconnected_at: Option<UnixMillis>,
    /// When the retention ends (retained sessions; `None` with a retention
    /// of forever).
    pub retained_until: Option<UnixMillis>,
}

/// A user with what the broker knows of its credentials (`user list`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDetail {
    pub info: UserInfo,
    /// A password hash is set.
    pub password_set: bool,
    /// Times its tokens were revoked (the token generation): tokens issued
    /// before the last revocation no longer work.
    pub token_generation: u64,
    /// Expiry of the newest token issued since the last revocation; `None`
    /// when none was issued since (or before this was recorded).
    pub token_expires_at: Option<UnixMillis>,
}

/// A group event with the things it names, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupEventDetail {
    pub event: GroupEventInfo,
    /// The group it was recorded for.
    pub group: GroupName,
    /// The resource it is about.
    pub resource: Option<ResourceId>,
    /// The session it is about.
    pub session: Option<SessionId>,
    /// The user it is about.
    pub user: Option<UserId>,
}

/// A group's versions and the updates running on it or scheduled
/// (`group show`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRolloutsInfo {
    pub versions: GroupVersionsInfo,
    /// The running image update, the running or scheduled OTA rollout;
    /// empty when none.
    pub rollouts: Vec<RolloutInfo>,
}

/// An image update or OTA rollout as it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutInfo {
    /// `image-update` (`group update-image`) or `ota` (a schedule).
    pub kind: String,
    /// The image update's id, or the OTA schedule's id.
    pub id: u64,
    /// The offered update an OTA schedule rolls out; `None` for an image
    /// update.
    pub update: Option<u64>,
    /// What changes: `image` for an image update, else the OTA's component.
    pub component: String,
    /// The version (image) hosts move to.
    pub version: String,
    /// Image update: `warning` (sessions warned, the switch starts at
    /// `deadline`) or `switching`. OTA: `scheduled` or `running`.
    pub state: String,
    /// When it started (an OTA still scheduled: when it starts).
    pub start: UnixMillis,
    /// Image update: when warned sessions are disconnected and the switch
    /// starts. OTA: `None` (each host has its own drain deadline).
    pub deadline: Option<UnixMillis>,
    /// OTA: hosts updated at once; 0 for an image update.
    pub wave: u32,
    /// OTA: each host's drain deadline after its drain starts; image
    /// update: the warning.
    pub drain_ms: u64,
    /// Each host of it, in update order (empty for an OTA not started yet).
    pub hosts: Vec<RolloutHostInfo>,
}

/// Where one host is in a running update.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutHostInfo {
    pub resource: ResourceId,
    /// `waiting` (its turn has not come, or its agent is away), `warned`
    /// (image update: its sessions are warned), `draining` (OTA: no new
    /// sessions, its sessions warned), `switching`, `updating`, `done`,
    /// `failed` or `skipped`.
    pub step: String,
    /// When the step ends at the latest: the warning or drain deadline, or
    /// when a host still away fails.
    pub until: Option<UnixMillis>,
    /// What happened: why it failed (the tail of the hook's output and its
    /// exit status), sessions warned or disconnected.
    pub detail: Option<String>,
}

/// `group update-image`: what to switch to and how long users are warned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageUpdateSpec {
    pub group: GroupName,
    /// The image every resource switches to.
    pub image: String,
    /// Time between the warning of each open session and its disconnect.
    pub warning_ms: u64,
}

/// A group's image and what each of its resources runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupVersionsInfo {
    /// The group's image (the new one once an update succeeded).
    pub image: String,
    /// The group's status (`updating` while an image update runs).
    pub status: String,
    /// Resources registered with the group's name, sorted.
    pub resources: Vec<ResourceVersionInfo>,
}

/// What one resource runs: from its agent's last `Inventory` when it is
/// connected, else from its last `Hello`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceVersionInfo {
    pub resource: ResourceId,
    pub connected: bool,
    pub agent_version: String,
    pub image_version: String,
    /// Components and applications its agent updated, by name.
    pub components: Vec<ComponentVersion>,
    /// The outcome of the group's last image update on it (`done`,
    /// `failed: why`, `pending`); `None` when it took no part in one.
    pub image_update: Option<String>,
}

/// An update offered to a group (`ferryctl ota offer`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaOfferSpec {
    pub group: GroupName,
    /// `agent`, `image`, or a platform component's or application's name.
    pub component: String,
    /// The version the update installs.
    pub version: String,
    /// Path or URL handed to the host's update hook; empty when the hook
    /// knows where to get the version.
    pub package: String,
    /// What the update brings, for operators.
    pub description: String,
}

/// An offered update as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaUpdateInfo {
    /// Broker-assigned, never reused; also the id agents see.
    pub id: u64,
    pub group: GroupName,
    pub component: String,
    pub version: String,
    pub package: String,
    pub description: String,
    pub offered_at: UnixMillis,
}

/// `ferryctl ota schedule`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaScheduleSpec {
    pub group: GroupName,
    /// The offered update ([`OtaUpdateInfo::id`]).
    pub update: u64,
    /// When the rollout starts: in the future, within 7 days.
    pub start: UnixMillis,
    /// Resources updated at once (>= 1).
    pub wave: u32,
    /// How long a draining resource's sessions may go on before they are
    /// disconnected.
    pub drain_ms: u64,
}

/// One rollout schedule and where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaScheduleInfo {
    pub id: u64,
    pub update: OtaUpdateInfo,
    pub start: UnixMillis,
    pub wave: u32,
    pub drain_ms: u64,
    /// `scheduled`, `cancelled`, `running`, `succeeded` or `failed`.
    pub state: String,
    pub created_at: UnixMillis,
    pub started_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    /// Why it failed or was cancelled.
    pub detail: Option<String>,
    /// Each resource of the rollout in update order (empty before it starts).
    pub resources: Vec<OtaResourceInfo>,
}

/// One resource's outcome in a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaResourceInfo {
    pub resource: ResourceId,
    /// `pending`, `draining`, `updating`, `done`, `failed`, or `skipped`
    /// (released by a scale-in before its turn).
    pub state: String,
    pub started_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    /// What happened (why it failed, sessions disconnected at the deadline).
    pub detail: Option<String>,
}

/// What `ferryctl usage` asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageQuery {
    /// One group (name or id), or every group when `None`.
    pub group: Option<GroupName>,
    /// Start of the period, included.
    pub from: UnixMillis,
    /// End of the period, excluded.
    pub to: UnixMillis,
}

/// Metering of a period, per group and resource, with its amounts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// Start of the period, included.
    pub from: UnixMillis,
    /// End of the period, excluded.
    pub to: UnixMillis,
    /// Currency of every amount.
    pub currency: String,
    /// Groups that existed during the period, by publish order.
    pub groups: Vec<GroupUsage>,
}

/// One group's usage and bill over the period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupUsage {
    /// The group's name.
    pub group: GroupName,
    /// The group's id.
    pub id: String,
    /// `subscription` or `pay-as-you-go`.
    pub billing: String,
    /// Its resources that were ready or had sessions during the period.
    pub resources: Vec<ResourceUsage>,
    /// Resource seconds of base resources in the period.
    pub base_seconds: u64,
    /// Resource seconds of elastic resources in the period.
    pub elastic_seconds: u64,
    /// Subscription orders placed in the period, rounded (decimal text, `199.00`).
    pub subscription: String,
    /// Pay-as-you-go base resources per second, rounded (decimal text).
    pub base_payg: String,
    /// Elastic resources per second from ready to released, rounded (decimal text).
    pub elastic: String,
    /// Sum of the three rounded lines (decimal text).
    pub total: String,
}

/// One resource's usage over the period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUsage {
    /// The resource.
    pub resource: ResourceId,
    /// `base` or `elastic`.
    pub kind: String,
    /// Sessions that started in the period.
    pub sessions: u64,
    /// Seconds of sessions (all sessions on it, clipped to the period).
    pub session_seconds: u64,
    /// Seconds it was ready (billed whole seconds, clipped to the period).
    pub ready_seconds: u64,
}

/// Every attribute of a delivery group set at publish (SPEC section 2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    /// Unique among live groups; generated (readable, unique) when `None`.
    pub name: Option<GroupName>,
    /// Where its resources run; fixed after publish.
    pub region: String,
    /// The network its resources are attached to.
    pub office_network: String,
    /// Host size from the spec catalog (e.g. `office-4c8g`).
    pub spec: String,
    /// The image its resources run.
    pub image: String,
    /// How its base resources are paid for.
    pub billing: BillingSpec,
    /// Base resources bought with the group.
    pub base_resources: u32,
    /// How application launches map to sessions.
    pub session_type: SessionType,
    /// Users assigned at publish (they must exist).
    pub users: Vec<UserId>,
    /// The scaling policy; unset parameters take the defaults where SPEC
    /// section 4 has one and are reported missing otherwise.
    pub policy: PolicySpec,
}

/// Billing method as asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BillingSpec {
    /// Paid ahead for `duration` (`Nw`, `Nmo`, `Ny`).
    Subscription {
        duration: String,
        auto_renew: bool,
    },
    PayAsYouGo,
}

/// SPEC section 4: `independent` = one session per launch, `shared` = one per user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionType {
    Independent,
    Shared,
}

impl SessionType {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionType::Independent => "independent",
            SessionType::Shared => "shared",
        }
    }
}

/// Scaling-policy parameters; `None` = keep the current value (or the
/// default at publish). Durations in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    pub concurrent_sessions: Option<u32>,
    pub usage_threshold: Option<u32>,
    pub scale_out_step: Option<u32>,
    pub max_elastic: Option<u32>,
    pub max_idle_ms: Option<u64>,
    pub scale_in_cooldown_ms: Option<u64>,
    pub wait_timeout_ms: Option<u64>,
    /// `breadth-first` or `depth-first`.
    pub load_balancing: Option<String>,
}

/// A group's policy as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    pub concurrent_sessions: u32,
    pub usage_threshold: u32,
    pub scale_out_step: u32,
    pub max_elastic: u32,
    pub max_idle_ms: u64,
    pub scale_in_cooldown_ms: u64,
    pub wait_timeout_ms: u64,
    pub load_balancing: String,
}

/// A duration of the session policy that may be unlimited: `Unlimited` is
/// "forever" for `disconnect_retention` (SPEC `-1`) and "none" for
/// `max_session_duration` and `idle_disconnect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyLimit {
    Unlimited,
    Ms(u64),
}

/// Session-policy parameters (SPEC section 4); `None` = keep the current
/// value (the default at publish).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionPolicySpec {
    /// `Unlimited` = forever, else 3..=300 minutes (default 15 minutes).
    pub disconnect_retention: Option<PolicyLimit>,
    /// `Unlimited` = none (default), else longer than the 5-minute warning.
    pub max_session_duration: Option<PolicyLimit>,
    /// `Unlimited` = none (default).
    pub idle_disconnect: Option<PolicyLimit>,
}

/// A session resolution in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub width: u32,
    pub height: u32,
}

/// Display-policy parameters (SPEC section 4); `None` = keep (the default at
/// publish).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplayPolicySpec {
    pub frame_rate: Option<u32>,
    pub resolution: Option<Resolution>,
    pub adaptive_resolution: Option<bool>,
    /// `video` or `mixed`.
    pub streaming_mode: Option<String>,
    /// `adaptive`, `smooth` or `quality`.
    pub quality_strategy: Option<String>,
}

/// One policy period (scheduled scaling): on the chosen weekdays from
/// `start_minute` to `end_minute` (minutes after midnight UTC, end at most
/// 1440), at least `min_ready` resources ready, created `warm_up_ms` ahead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodSpec {
    /// Bit 0 = Monday ... bit 6 = Sunday.
    pub weekdays: u8,
    pub start_minute: u16,
    pub end_minute: u16,
    pub min_ready: u32,
    pub warm_up_ms: u64,
}

/// The policy parts beside scaling, as asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyPartsSpec {
    pub session: SessionPolicySpec,
    pub display: DisplayPolicySpec,
    /// `None` = keep the periods (none at publish); `Some(vec![])` = clear them.
    pub periods: Option<Vec<PeriodSpec>>,
}

/// The session part as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionPolicyView {
    pub disconnect_retention: PolicyLimit,
    pub max_session_duration: PolicyLimit,
    pub idle_disconnect: PolicyLimit,
}

/// The display part as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplayPolicyView {
    pub frame_rate: u32,
    pub width: u32,
    pub height: u32,
    pub adaptive_resolution: bool,
    pub streaming_mode: String,
    pub quality_strategy: String,
}

/// Every policy part beside scaling, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyPartsView {
    pub session: SessionPolicyView,
    pub display: DisplayPolicyView,
    pub periods: Vec<PeriodSpec>,
}

/// `group show` with every part of the policy (a new struct: [`GroupDetail`]
/// is shipped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPolicyDetail {
    pub detail: GroupDetail,
    /// The live state, as in `GroupShown`; `None` when the group has no
    /// running actor, and in answers to publish and update.
    pub live: Option<LiveGroupView>,
    pub parts: PolicyPartsView,
}

/// `group list` filters; a group must match all that are set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupFilter {
    /// Exact status (`published`, `expired`, ...).
    pub status: Option<String>,
    /// Part of the name.
    pub name: Option<String>,
    /// Exact id.
    pub id: Option<String>,
}

/// One line of `group list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Broker-assigned id (`dg-000001`), never reused.
    pub id: String,
    pub name: GroupName,
    /// Status of SPEC section 3 (`gone` after purge/delete).
    pub status: String,
    pub region: String,
    pub spec: String,
    pub image: String,
    /// `subscription` or `pay-as-you-go`.
    pub billing: String,
    /// Subscription duration (`1w`); `None` for pay-as-you-go.
    pub term: Option<String>,
    pub auto_renew: bool,
    pub base_resources: u32,
    pub session_type: SessionType,
    /// Users assigned.
    pub users: u64,
    /// End of the paid period (subscriptions).
    pub expires_at: Option<UnixMillis>,
    pub created_at: UnixMillis,
}

/// `group show`: the list line and everything else recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupDetail {
    pub info: GroupInfo,
    pub office_network: String,
    pub policy: PolicyView,
    /// Whether every resource joined to the group acknowledged
    /// `policy_version` (true when none has joined).
    pub policy_applied: bool,
    /// Operator-facing remarks (e.g. what is not live yet).
    pub notes: Vec<String>,
    pub users: Vec<UserId>,
    /// Resources registered with this group's name.
    pub resources: Vec<ResourceId>,
    pub orders: Vec<OrderInfo>,
    /// When the broker next acts on the group by itself (expiry, renewal, recycling).
    pub next_deadline: Option<UnixMillis>,
    /// Version of the stored policy: 1 at publish, plus one per accepted
    /// update-policy.
    pub policy_version: u64,
    /// The policy version each resource of the group acknowledged: the
    /// resources joined to the live group when it has an actor, else every
    /// resource that ever acknowledged one.
    pub policy_resources: Vec<ResourcePolicyInfo>,
}

/// The policy version one resource has applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourcePolicyInfo {
    pub resource: ResourceId,
    /// Newest version its agent acknowledged; `None` when it never did.
    pub applied_version: Option<u64>,
}

/// One ledger line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderInfo {
    /// `publish`, `renew` or `auto-renew`.
    pub kind: String,
    pub term: String,
    pub base_resources: u32,
    /// Decimal with two places.
    pub amount: String,
    pub currency: String,
    pub period_start: UnixMillis,
    pub period_end: UnixMillis,
    pub at: UnixMillis,
}

/// One recorded decision about a group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupEventInfo {
    pub at: UnixMillis,
    /// `published`, `status`, `policy`, `users`, `order`, ...
    pub kind: String,
    /// What happened and why.
    pub message: String,
}

/// A user to create.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSpec {
    pub id: UserId,
    pub email: String,
    pub mobile: String,
}

/// A user as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub id: UserId,
    pub email: String,
    pub mobile: String,
    /// Names of the live groups the user is assigned to.
    pub groups: Vec<GroupName>,
}

/// Broker-wide counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Version of the `ferry-broker` build.
    pub broker_version: String,
    /// Agents with a live, registered connection.
    pub agents_connected: u64,
    /// Resources the broker has ever registered.
    pub resources: u64,
    /// Sessions recorded as started and not yet ended.
    pub open_sessions: u64,
    /// Distinct session events ever durably recorded.
    pub events_recorded: u64,
}

/// One resource as the broker sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceInfo {
    pub resource: ResourceId,
    /// Delivery group from the agent's last `Hello`.
    pub group: Option<GroupName>,
    /// An agent connection for it is live and registered.
    pub connected: bool,
    /// Connected and reporting health on time: may take new sessions.
    pub available: bool,
    /// The host reports it takes no new sessions.
    pub draining: bool,
    pub agent_version: String,
    pub image_version: String,
    /// Broker receive time of the last health report on the live connection;
    /// for a resource not connected, when the broker last heard from it.
    pub last_health_at: Option<UnixMillis>,
    /// Sessions recorded open on it.
    pub sessions: u64,
    /// Static facts from the agent's last `Hello`.
    pub host: HostFacts,
}

/// One session as recorded by the broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session: SessionId,
    pub resource: ResourceId,
    pub user: UserId,
    /// Host clock at the start.
    pub started_at: UnixMillis,
    /// Host clock at the end (broker clock when the broker ended it); `None` while open.
    pub ended_at: Option<UnixMillis>,
    /// Why it ended; `None` while open.
    pub end_reason: Option<String>,
}

/// Why an admin request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminError {
    pub code: AdminErrorCode,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminErrorCode {
    /// The request could not be decoded or was too large.
    BadRequest,
    /// The named resource or session is not known.
    NotFound,
    /// The resource's agent is not connected, so the command cannot reach it.
    NotConnected,
    /// The agent did not answer the command in time.
    Timeout,
    /// The agent carried out the command and reported a failure.
    CommandFailed,
    /// The broker's store failed.
    Internal,
    /// Too many admin connections are open; retry later.
    Busy,
    /// The broker is shutting down.
    ShuttingDown,
    /// Not allowed in the group's current status; the message names the
    /// status and what is allowed.
    NotAllowed,
    /// The request's content is invalid (policy, CSV, duration, ...); the
    /// message lists every problem.
    Invalid,
    /// It already exists (a group name, a user id).
    Conflict,
    /// The peer's credentials do not allow the admin socket (not root, not
    /// the broker's user, not in the admin group); the message says which
    /// group to join.
    Forbidden,
}

/// A group's live state as its actor holds it (`group show`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveGroupView {
    /// The group is expired: it takes no new sessions and its open ones are
    /// being disconnected; the engine is frozen until it is renewed.
    pub closed: bool,
    /// Sessions on resources plus requests waiting for room (SPEC: demand).
    pub demand: u64,
    /// Session slots of ready, available and pending resources.
    pub capacity: u64,
    /// Sessions one resource takes (the policy's `concurrent_sessions`).
    pub concurrent_sessions: u32,
    /// The usage threshold in percent that triggers a scale-out.
    pub usage_threshold: u32,
    /// Every resource of the group, in creation order.
    pub resources: Vec<LiveResourceView>,
    /// Agents flagged by the group (host below the spec, beyond the base
    /// count, an elastic id it did not ask for): one line each, naming the
    /// resource and why.
    pub flagged: Vec<String>,
    /// When the engine next acts by itself (scale-in, wait timeouts).
    pub engine_deadline: Option<UnixMillis>,
}

/// One resource of [`LiveGroupView`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveResourceView {
    /// The real resource id; a base slot no agent has taken yet shows as `b2`.
    pub resource: ResourceId,
    /// `base` or `elastic`.
    pub class: String,
    /// `pending`, `ready`, `releasing` or `released`.
    pub state: String,
    /// Whether it takes new sessions now.
    pub available: bool,
    /// Sessions on it (its load is `sessions.len()` of `concurrent_sessions`).
    pub sessions: Vec<SessionId>,
    /// Why the resource is flagged (its host is below the group's spec);
    /// `None` when it is not.
    pub flagged: Option<String>,
}

#[cfg(test)]
mod tests {
    //! Golden bytes: freeze the admin encoding so a `ferryctl` of one build
    //! keeps talking to a broker of another.
    use super::*;
    use crate::frame;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn golden_requests() {
        let cases = [
            (AdminRequest::V1(AdminRequestV1::Status), "0000"),
            (
                AdminRequest::V1(AdminRequestV1::ListSessions { all: true }),
                "000201",
            ),
            (
                AdminRequest::V1(AdminRequestV1::GroupShow {
                    group: "g1".parse().expect("id"),
                }),
                "0008026731",
            ),
            (AdminRequest::V1(AdminRequestV1::UserList), "0013"),
            (
                AdminRequest::V1(AdminRequestV1::Usage(UsageQuery {
                    group: Some("g1".parse().expect("id")),
                    from: UnixMillis(1),
                    to: UnixMillis(2),
                })),
                "0014010267310204",
            ),
            (
                AdminRequest::V1(AdminRequestV1::Drain {
                    resource: "h1".parse().expect("id"),
                }),
                "0003026831",
            ),
        ];
        for (req, golden) in cases {
            let bytes = frame::encode_payload(&req).expect("encode");
            assert_eq!(hex(&bytes), golden);
            assert_eq!(
                frame::decode_payload::<AdminRequest>(&bytes).expect("decode"),
                req
            );
        }
    }

    #[test]
    fn golden_credential_requests() {
        let u = || -> UserId { "u".parse().expect("id") };
        let cases = [
            (
                AdminRequest::V1(AdminRequestV1::UserSetPassword {
                    user: u(),
                    password: Secret("pw".into()),
                }),
                "00160175027077",
            ),
            (
                AdminRequest::V1(AdminRequestV1::UserToken {
                    user: u(),
                    ttl_secs: 60,
                }),
                "001701753c",
            ),
            (
                AdminRequest::V1(AdminRequestV1::UserRevokeTokens { user: u() }),
                "00180175",
            ),
            (
                AdminRequest::V1(AdminRequestV1::UserCreateWithPassword {
                    user: UserSpec {
                        id: u(),
                        email: "e".into(),
                        mobile: "m".into(),
                    },
                    password: Secret("pw".into()),
                }),
                "001501750165016d027077",
            ),
        ];
        for (req, golden) in cases {
            let bytes = frame::encode_payload(&req).expect("encode");
            assert_eq!(hex(&bytes), golden);
            assert_eq!(
                frame::decode_payload::<AdminRequest>(&bytes).expect("decode"),
                req
            );
        }
        assert_eq!(format!("{:?}", Secret("pw".into())), "Secret(<redacted>)");
        let resp = AdminResponse::V1(AdminResponseV1::UserToken {
            user: u(),
            token: "t".into(),
            expires_at: UnixMillis(1),
        });
        let bytes = frame::encode_payload(&resp).expect("encode");
        assert_eq!(hex(&bytes), "000b0175017402");
    }

    #[test]
    fn golden_error_response() {
        let resp = AdminResponse::V1(AdminResponseV1::Error(AdminError {
            code: AdminErrorCode::NotFound,
            message: "x".into(),
        }));
        let bytes = frame::encode_payload(&resp).expect("encode");
        assert_eq!(hex(&bytes), "0004010178");
        let refused = AdminResponse::V1(AdminResponseV1::Error(AdminError {
            code: AdminErrorCode::NotAllowed,
            message: "x".into(),
        }));
        let bytes = frame::encode_payload(&refused).expect("encode");
        assert_eq!(hex(&bytes), "0004080178");
        let forbidden = AdminResponse::V1(AdminResponseV1::Error(AdminError {
            code: AdminErrorCode::Forbidden,
            message: "x".into(),
        }));
        let bytes = frame::encode_payload(&forbidden).expect("encode");
        assert_eq!(hex(&bytes), "00040b0178");
    }

    #[test]
    fn golden_live_group_view() {
        let live = LiveGroupView {
            closed: true,
            demand: 3,
            capacity: 4,
            concurrent_sessions: 2,
            usage_threshold: 50,
            resources: vec![LiveResourceView {
                resource: "h1".parse().expect("id"),
                class: "base".into(),
                state: "ready".into(),
                available: false,
                sessions: vec!["s1".parse().expect("id")],
                flagged: None,
            }],
            flagged: vec![],
            engine_deadline: None,
        };
        let bytes = frame::encode_payload(&live).expect("encode");
        assert_eq!(
            hex(&bytes),
            "01030402320102683104626173650572656164790001027331000000"
        );
        assert_eq!(
            frame::decode_payload::<LiveGroupView>(&bytes).expect("decode"),
            live
        );
    }

    #[test]
    fn golden_policy_parts() {
        let parts = PolicyPartsSpec {
            session: SessionPolicySpec {
                disconnect_retention: Some(PolicyLimit::Unlimited),
                max_session_duration: Some(PolicyLimit::Ms(1)),
                idle_disconnect: None,
            },
            display: DisplayPolicySpec {
                frame_rate: Some(30),
                resolution: Some(Resolution {
                    width: 2,
                    height: 3,
                }),
                adaptive_resolution: Some(false),
                streaming_mode: Some("v".into()),
                quality_strategy: None,
            },
            periods: Some(vec![PeriodSpec {
                weekdays: 3,
                start_minute: 4,
                end_minute: 5,
                min_ready: 6,
                warm_up_ms: 7,
            }]),
        };
        let bytes = frame::encode_payload(&parts).expect("encode");
        assert_eq!(
            hex(&bytes),
            "010001010100011e01020301000101760001010304050607"
        );
        assert_eq!(
            frame::decode_payload::<PolicyPartsSpec>(&bytes).expect("decode"),
            parts
        );
        let show = AdminRequest::V1(AdminRequestV1::GroupShowWithPolicy {
            group: "g1".parse().expect("id"),
        });
        let bytes = frame::encode_payload(&show).expect("encode");
        assert_eq!(hex(&bytes), "001b026731");
        let update = AdminRequest::V1(AdminRequestV1::GroupUpdatePolicyParts {
            group: "g1".parse().expect("id"),
            policy: PolicySpec::default(),
            parts: PolicyPartsSpec::default(),
        });
        let bytes = frame::encode_payload(&update).expect("encode");
        assert_eq!(hex(&bytes), "001a0267310000000000000000000000000000000000");
        let view = PolicyPartsView {
            session: SessionPolicyView {
                disconnect_retention: PolicyLimit::Ms(900_000),
                max_session_duration: PolicyLimit::Unlimited,
                idle_disconnect: PolicyLimit::Unlimited,
            },
            display: DisplayPolicyView {
                frame_rate: 30,
                width: 1920,
                height: 1080,
                adaptive_resolution: true,
                streaming_mode: "video".into(),
                quality_strategy: "adaptive".into(),
            },
            periods: vec![],
        };
        let bytes = frame::encode_payload(&view).expect("encode");
        assert_eq!(
            hex(&bytes),
            "01fca0bb0d0000001efb8007fb38040105766964656f08616461707469766500"
        );
        assert_eq!(
            frame::decode_payload::<PolicyPartsView>(&bytes).expect("decode"),
            view
        );
    }

    #[test]
    fn golden_image_update_types() {
        let spec = ImageUpdateSpec {
            group: "g1".parse().expect("id"),
            image: "i2".into(),
            warning_ms: 300_000,
        };
        let bytes = frame::encode_payload(&spec).expect("encode");
        assert_eq!(hex(&bytes), "026731026932fce0930400");
        assert_eq!(
            frame::decode_payload::<ImageUpdateSpec>(&bytes).expect("decode"),
            spec
        );
        let versions = GroupVersionsInfo {
            image: "i2".into(),
            status: "updating".into(),
            resources: vec![ResourceVersionInfo {
                resource: "h1".parse().expect("id"),
                connected: true,
                agent_version: "1".into(),
                image_version: "i1".into(),
                components: vec![ComponentVersion {
                    name: "a".into(),
                    version: "2".into(),
                }],
                image_update: Some("done".into()),
            }],
        };
        let bytes = frame::encode_payload(&versions).expect("encode");
        assert_eq!(
            hex(&bytes),
            "026932087570646174696e670102683101013102693101016101320104646f6e65"
        );
        assert_eq!(
            frame::decode_payload::<GroupVersionsInfo>(&bytes).expect("decode"),
            versions
        );
    }

    #[test]
    fn golden_ota_structs() {
        // The OTA request and answer variants sit in a section other
        // helpers append to, so their indexes are pinned by the lead when
        // the sections are merged; the structs they carry are frozen here.
        let offer = OtaOfferSpec {
            group: "g".parse().expect("id"),
            component: "c".into(),
            version: "1".into(),
            package: String::new(),
            description: "d".into(),
        };
        let bytes = frame::encode_payload(&offer).expect("encode");
        assert_eq!(hex(&bytes), "016701630131000164");
        assert_eq!(
            frame::decode_payload::<OtaOfferSpec>(&bytes).expect("decode"),
            offer
        );
        let schedule = OtaScheduleSpec {
            group: "g".parse().expect("id"),
            update: 1,
            start: UnixMillis(2),
            wave: 3,
            drain_ms: 4,
        };
        let bytes = frame::encode_payload(&schedule).expect("encode");
        assert_eq!(hex(&bytes), "016701040304");
        assert_eq!(
            frame::decode_payload::<OtaScheduleSpec>(&bytes).expect("decode"),
            schedule
        );
        let result = OtaResourceInfo {
            resource: "h1".parse().expect("id"),
            state: "done".into(),
            started_at: Some(UnixMillis(1)),
            finished_at: None,
            detail: None,
        };
        let bytes = frame::encode_payload(&result).expect("encode");
        assert_eq!(hex(&bytes), "02683104646f6e6501020000");
        assert_eq!(
            frame::decode_payload::<OtaResourceInfo>(&bytes).expect("decode"),
            result
        );
    }

    #[test]
    fn invalid_ids_do_not_decode() {
        // A Drain naming "H!" (not a DNS label) must fail in the decoder.
        let bytes = [0u8, 3, 2, b'H', b'!'];
        assert!(frame::decode_payload::<AdminRequest>(&bytes).is_err());
    }

    #[test]
    fn golden_payment_overdue_requests() {
        let g = || -> GroupName { "g1".parse().expect("id") };
        let cases = [
            (
                AdminRequest::V1(AdminRequestV1::GroupSetPaymentOverdue { group: g() }),
                "0024026731",
            ),
            (
                AdminRequest::V1(AdminRequestV1::GroupClearPaymentOverdue { group: g() }),
                "0025026731",
            ),
        ];
        for (req, golden) in cases {
            let bytes = frame::encode_payload(&req).expect("encode");
            assert_eq!(hex(&bytes), golden);
            assert_eq!(
                frame::decode_payload::<AdminRequest>(&bytes).expect("decode"),
                req
            );
        }
    }

    /// The variant numbers of the operator output section (issue 12).
    #[test]
    fn golden_variant_numbers_of_the_operator_output_section() {
        let g = || -> GroupName { "g1".parse().expect("id") };
        let query = UsageQuery {
            group: None,
            from: UnixMillis(0),
            to: UnixMillis(1),
        };
        let requests = [
            (AdminRequestV1::UsageDetailed(query.clone()), 0x26),
            (AdminRequestV1::ListSessionsDetailed { all: true }, 0x27),
            (AdminRequestV1::UserListDetailed, 0x28),
            (AdminRequestV1::GroupEventsDetailed { group: g() }, 0x29),
        ];
        for (req, number) in requests {
            let bytes = frame::encode_payload(&AdminRequest::V1(req)).expect("encode");
            assert_eq!(bytes.get(..2), Some(&[0, number][..]), "{}", hex(&bytes));
        }
        let report = UsageReport {
            from: UnixMillis(0),
            to: UnixMillis(1),
            currency: "CNY".into(),
            groups: vec![],
        };
        let responses = [
            (
                AdminResponseV1::UsageDetailed(UsageDetail {
                    report,
                    resources: vec![],
                    asked_to: UnixMillis(1),
                }),
                0x10,
            ),
            (AdminResponseV1::SessionsDetailed(vec![]), 0x11),
            (AdminResponseV1::UsersDetailed(vec![]), 0x12),
            (AdminResponseV1::GroupEventsDetailed(vec![]), 0x13),
        ];
        for (resp, number) in responses {
            let bytes = frame::encode_payload(&AdminResponse::V1(resp)).expect("encode");
            assert_eq!(bytes.get(..2), Some(&[0, number][..]), "{}", hex(&bytes));
        }
    }

    #[test]
    fn golden_operator_output_types() {
        let g = || -> GroupName { "g1".parse().expect("id") };
        let detail = SessionDetail {
            info: SessionInfo {
                session: "s1".parse().expect("id"),
                resource: "h1".parse().expect("id"),
                user: "u".parse().expect("id"),
                started_at: UnixMillis(1),
                ended_at: None,
                end_reason: None,
            },
            group: Some(g()),
            state: "retained".into(),
            disconnected_at: Some(UnixMillis(2)),
            retained_until: None,
        };
        let bytes = frame::encode_payload(&detail).expect("encode");
        assert_eq!(
            hex(&bytes),
            "0273310268310175020000010267310872657461696e6564010400"
        );
        assert_eq!(
            frame::decode_payload::<SessionDetail>(&bytes).expect("decode"),
            detail
        );
        let user = UserDetail {
            info: UserInfo {
                id: "u".parse().expect("id"),
                email: "e".into(),
                mobile: "m".into(),
                groups: vec![],
            },
            password_set: true,
            token_generation: 1,
            token_expires_at: Some(UnixMillis(3)),
        };
        let bytes = frame::encode_payload(&user).expect("encode");
        assert_eq!(hex(&bytes), "01750165016d0001010106");
        let event = GroupEventDetail {
            event: GroupEventInfo {
                at: UnixMillis(1),
                kind: "k".into(),
                message: "m".into(),
            },
            group: g(),
            resource: Some("h1".parse().expect("id")),
            session: None,
            user: None,
        };
        let bytes = frame::encode_payload(&event).expect("encode");
        assert_eq!(hex(&bytes), "02016b016d026731010268310000");
        let amounts = ResourceAmount {
            group: g(),
            resource: "h1".parse().expect("id"),
            amount: Some("0.5".into()),
        };
        let bytes = frame::encode_payload(&amounts).expect("encode");
        assert_eq!(hex(&bytes), "0267310268310103302e35");
    }

    /// The variant numbers and bytes of the fleet-update section (after
    /// the operator output section).
    #[test]
    fn golden_rollout_requests_and_answers() {
        let g = || -> GroupName { "g1".parse().expect("id") };
        let cases = [
            (
                AdminRequest::V1(AdminRequestV1::GroupRollouts { group: g() }),
                "002a026731",
            ),
            (
                AdminRequest::V1(AdminRequestV1::OtaListWithSchedules { group: None }),
                "002b00",
            ),
            (
                AdminRequest::V1(AdminRequestV1::OtaListWithSchedules { group: Some(g()) }),
                "002b01026731",
            ),
        ];
        for (req, golden) in cases {
            let bytes = frame::encode_payload(&req).expect("encode");
            assert_eq!(hex(&bytes), golden);
            assert_eq!(
                frame::decode_payload::<AdminRequest>(&bytes).expect("decode"),
                req
            );
        }
        let rollouts = GroupRolloutsInfo {
            versions: GroupVersionsInfo {
                image: "i".into(),
                status: "s".into(),
                resources: vec![],
            },
            rollouts: vec![RolloutInfo {
                kind: "ota".into(),
                id: 5,
                update: Some(3),
                component: "c".into(),
                version: "2".into(),
                state: "running".into(),
                start: UnixMillis(1),
                deadline: None,
                wave: 2,
                drain_ms: 60_000,
                hosts: vec![RolloutHostInfo {
                    resource: "h1".parse().expect("id"),
                    step: "draining".into(),
                    until: Some(UnixMillis(2)),
                    detail: None,
                }],
            }],
        };
        let resp = AdminResponse::V1(AdminResponseV1::GroupRollouts(rollouts));
        let bytes = frame::encode_payload(&resp).expect("encode");
        assert_eq!(hex(&bytes), "0014016901730001036f7461050103016301320772756e6e696e67020002fb60ea0102683108647261696e696e67010400");
        assert_eq!(
            frame::decode_payload::<AdminResponse>(&bytes).expect("decode"),
            resp
        );
        let list = AdminResponse::V1(AdminResponseV1::OtaUpdatesAndSchedules {
            updates: vec![],
            schedules: vec![],
        });
        let bytes = frame::encode_payload(&list).expect("encode");
        assert_eq!(hex(&bytes), "00150000");
        assert_eq!(
            frame::decode_payload::<AdminResponse>(&bytes).expect("decode"),
            list
        );
    }

    /// The variant numbers of this session's requests and responses (the
    /// first byte after the envelope's): they freeze the order of the
    /// sections above.
    #[test]
    fn golden_variant_numbers_of_the_policy_update_and_status_sections() {
        let g = || -> GroupName { "g1".parse().expect("id") };
        let requests = [
            (AdminRequestV1::GroupShowWithPolicy { group: g() }, 0x1b),
            (AdminRequestV1::OtaList { group: None }, 0x1d),
            (
                AdminRequestV1::OtaReschedule {
                    schedule: 1,
                    start: UnixMillis(0),
                },
                0x1f,
            ),
            (AdminRequestV1::OtaCancel { schedule: 1 }, 0x20),
            (AdminRequestV1::OtaHistory { group: g() }, 0x21),
            (
                AdminRequestV1::GroupUpdateImage(ImageUpdateSpec {
                    group: g(),
                    image: "i".into(),
                    warning_ms: 0,
                }),
                0x22,
            ),
            (AdminRequestV1::GroupVersions { group: g() }, 0x23),
            (AdminRequestV1::GroupSetPaymentOverdue { group: g() }, 0x24),
        ];
        for (req, number) in requests {
            let bytes = frame::encode_payload(&AdminRequest::V1(req)).expect("encode");
            assert_eq!(bytes.get(..2), Some(&[0, number][..]), "{}", hex(&bytes));
        }
        let responses = [
            (AdminResponseV1::OtaUpdates(vec![]), 0x0d),
            (AdminResponseV1::OtaSchedules(vec![]), 0x0e),
            (
                AdminResponseV1::GroupVersions(GroupVersionsInfo {
                    image: "i".into(),
                    status: "published".into(),
                    resources: vec![],
                }),
                0x0f,
            ),
        ];
        for (resp, number) in responses {
            let bytes = frame::encode_payload(&AdminResponse::V1(resp)).expect("encode");
            assert_eq!(bytes.get(..2), Some(&[0, number][..]), "{}", hex(&bytes));
        }
    }

    #[test]
    fn golden_cluster() {
        let ask = AdminRequest::V1(AdminRequestV1::Cluster);
        let bytes = frame::encode_payload(&ask).expect("encode");
        assert_eq!(hex(&bytes), "002f");
        let answer = AdminResponse::V1(AdminResponseV1::Cluster(ClusterInfo {
            this_broker: Some("b".into()),
            brokers: vec![ClusterBroker {
                id: "b".into(),
                address: "a".into(),
                seen_at: UnixMillis(1000),
                live: true,
                leaving: false,
            }],
            groups: vec![GroupOwnerInfo {
                group: "g".parse().expect("name"),
                owner: Some("b".into()),
                epoch: Some(2),
            }],
        }));
        let bytes = frame::encode_payload(&answer).expect("encode");
        assert_eq!(
            hex(&bytes),
            "00170101620101620161fbd00701000101670101620102"
        );
        assert_eq!(
            frame::decode_payload::<AdminResponse>(&bytes).expect("decode"),
            answer
        );
    }

    #[test]
    fn golden_certificate_requests_and_answers() {
        let revoke = AdminRequest::V1(AdminRequestV1::ResourceRevoke {
            resource: "h1".parse().expect("id"),
            reason: "r".into(),
        });
        let bytes = frame::encode_payload(&revoke).expect("encode");
        assert_eq!(hex(&bytes), "002d0268310172");
        assert_eq!(
            frame::decode_payload::<AdminRequest>(&bytes).expect("decode"),
            revoke
        );
        let list = AdminRequest::V1(AdminRequestV1::ListResourcesWithRevocations);
        let bytes = frame::encode_payload(&list).expect("encode");
        assert_eq!(hex(&bytes), "002e");
        let answer = AdminResponse::V1(AdminResponseV1::ResourcesWithRevocations {
            resources: vec![],
            revocations: vec![RevocationInfo {
                resource: "h1".parse().expect("id"),
                revoked_before: UnixMillis(1000),
                at: UnixMillis(1000),
                reason: "r".into(),
            }],
        });
        let bytes = frame::encode_payload(&answer).expect("encode");
        assert_eq!(hex(&bytes), "00160001026831fbd007fbd0070172");
        assert_eq!(
            frame::decode_payload::<AdminResponse>(&bytes).expect("decode"),
            answer
        );
    }

    /// The variant numbers and bytes of the trust-boundaries section.
    #[test]
    fn golden_trust_boundary_requests() {
        let cases = [
            (
                AdminRequestV1::ResourcesAssign {
                    resource: "h1".parse().expect("id"),
                    group: Some("g1".parse().expect("id")),
                },
                "002c02683101026731",
            ),
            (
                AdminRequestV1::ResourcesAssign {
                    resource: "h1".parse().expect("id"),
                    group: None,
                },
                "002c02683100",
            ),
        ];
        for (req, golden) in cases {
            let req = AdminRequest::V1(req);
            let bytes = frame::encode_payload(&req).expect("encode");
            assert_eq!(hex(&bytes), golden);
            assert_eq!(
                frame::decode_payload::<AdminRequest>(&bytes).expect("decode"),
                req
            );
        }
    }
}
