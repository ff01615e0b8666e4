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
use crate::wire::{HostFacts, UnixMillis};

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
    GroupPublish(GroupSpec),
    /// Groups matching every given filter. Answered by [`AdminResponseV1::Groups`].
    GroupList(GroupFilter),
    /// One group (by name or id). Answered by [`AdminResponseV1::GroupShown`].
    GroupShow { group: GroupName },
    /// Change the given policy parameters; the rest stay. Answered by `Group`.
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
    // ---- image updates and OTA ----
    // ---- group status (publishing, payment) ----
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
    // ---- image updates and OTA ----
    // ---- group status (publishing, payment) ----
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
    /// Broker receive time of the last health report on the live connection.
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
    fn invalid_ids_do_not_decode() {
        // A Drain naming "H!" (not a DNS label) must fail in the decoder.
        let bytes = [0u8, 3, 2, b'H', b'!'];
        assert!(frame::decode_payload::<AdminRequest>(&bytes).is_err());
    }
}
