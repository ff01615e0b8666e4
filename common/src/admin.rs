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
    fn golden_error_response() {
        let resp = AdminResponse::V1(AdminResponseV1::Error(AdminError {
            code: AdminErrorCode::NotFound,
            message: "x".into(),
        }));
        let bytes = frame::encode_payload(&resp).expect("encode");
        assert_eq!(hex(&bytes), "0004010178");
    }

    #[test]
    fn invalid_ids_do_not_decode() {
        // A Drain naming "H!" (not a DNS label) must fail in the decoder.
        let bytes = [0u8, 3, 2, b'H', b'!'];
        assert!(frame::decode_payload::<AdminRequest>(&bytes).is_err());
    }
}
