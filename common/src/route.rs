//! The route protocol ([`crate::ALPN_ROUTE`]): end users asking the broker
//! for a session (`ferry-connect`).
//!
//! A client connection carries many requests, one bidirectional stream per
//! request. Each stream starts with the same 8-byte preamble as the agent
//! link ([`crate::frame::preamble`], answered by a
//! [`crate::frame::PreambleReply`]), then the client sends one
//! [`RouteRequest`] frame (bounded by [`MAX_ROUTE_FRAME_LEN`]) and the broker
//! answers with [`RouteReply`] frames: zero or one `Waiting` while the
//! request waits for room, then exactly one `Admitted` or `Refused`, after
//! which the broker finishes the stream. While waiting, the client may send
//! `Cancel` (or just reset the stream) to withdraw.
//!
//! A client that wants the host's streaming protocol too (`ferry-connect`,
//! to start the user's client) asks with `RouteLaunch` instead of `Route`
//! and is admitted with `AdmittedLaunch` instead of `Admitted`. A broker
//! older than `RouteLaunch` cannot decode it and refuses it as `Malformed`:
//! such a client asks once more with `Route`, the protocol unknown.
//!
//! Wire rules as in [`crate::wire`]: versioned envelopes, append variants,
//! never change a shipped one; golden bytes below.

use serde::{Deserialize, Serialize};

use crate::ids::{GroupName, ResourceId, SessionId, UserId};
use crate::ticket::Credential;
use crate::wire::{StreamingProtocol, UnixMillis};

/// Largest route frame either way. A request is a group, a user and a
/// credential (at most a few KiB with every field at its limit); an answer a
/// ticket (at most [`crate::limits::MAX_TICKET_LEN`]), an address and a
/// message. 16 KiB is far above both and keeps a client from making the
/// broker allocate much.
pub const MAX_ROUTE_FRAME_LEN: usize = 16 * 1024;

/// Longest streaming address (`host:port`) carried in an admission: a DNS
/// name is at most 253 bytes, plus a port.
pub const MAX_STREAMING_ADDRESS_LEN: usize = 300;

/// Port of a host's streaming server when the agent's `streaming_address`
/// does not name one (the agent's default is `:8443`: this port on the
/// address the broker sees the agent connect from).
pub const DEFAULT_STREAMING_PORT: u16 = 8443;

/// Envelope of everything a route client sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteRequest {
    V1(ClientToBroker),
}

/// Envelope of everything the broker answers on a route stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteReply {
    V1(BrokerToClient),
}

/// Client -> broker. The first frame of a stream is always `Route` or
/// `RouteLaunch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientToBroker {
    /// Ask for a session in `group` as `user`.
    Route(RouteAsk),
    /// Withdraw the request of this stream (while it waits for room).
    Cancel,
    /// `Route`, from a client that takes `AdmittedLaunch` for an answer
    /// (everything else is answered as to `Route`).
    RouteLaunch(RouteAsk),
}

/// A request for a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteAsk {
    pub group: GroupName,
    pub user: UserId,
    /// Password or token (`ferryctl user token`); never logged.
    pub credential: Credential,
    /// Whether the client waits for room (up to the group's `wait_timeout`)
    /// when there is none now; without it the answer is at once.
    pub wait: bool,
}

/// Broker -> client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerToClient {
    /// No room now: the request waits in the group's queue at this place
    /// (1 = next). Sent once, when it starts waiting.
    Waiting { position: u32 },
    /// Where to connect, with the ticket the host checks.
    Admitted(Admission),
    /// Not admitted, and why.
    Refused(RouteRefused),
    /// Another broker owns the group (brokers sharing a store): ask the
    /// broker at `address` (`host:port`) instead.
    Redirect { address: String },
    /// `Admitted`, answering a `RouteLaunch`: with the protocol the host's
    /// streaming server speaks, `None` when its agent does not say.
    AdmittedLaunch {
        admission: Admission,
        protocol: Option<StreamingProtocol>,
    },
}

/// A granted session: connect to `address` and present `ticket`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    /// The resource (host) the session is on.
    pub resource: ResourceId,
    /// `host:port` of the host's streaming server.
    pub address: String,
    /// The session's id (the same again for a shared or retained session).
    pub session: SessionId,
    /// Signed, single-use ticket (`common::ticket` text form).
    pub ticket: String,
    /// When the ticket, and the slot it reserves, expire if unused.
    pub expires_at: UnixMillis,
}

/// A refusal with a machine-readable reason and a readable message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRefused {
    pub reason: RouteRefusal,
    pub message: String,
}

/// Why a request was not admitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteRefusal {
    /// The user is not assigned to the group.
    NotAssigned,
    /// Unknown user or wrong password/token: the message never says which.
    BadCredentials,
    /// The group takes no sessions in its status (e.g. `expired`).
    GroupNotAvailable { status: String },
    /// No room now (and no waiting), or none before `wait_timeout`.
    AtCapacity,
    /// No live group of that name.
    NoSuchGroup,
    /// The broker has too many requests in flight; retry later.
    Busy,
    /// The request could not be decoded or broke the protocol.
    Malformed,
    /// The broker is shutting down.
    ShuttingDown,
    /// Something failed inside the broker (store, signing); retry later.
    Internal,
    /// The user already holds the most reservations plus waiting requests
    /// one user may have in the group (`[routing] max_requests_per_user`):
    /// use or withdraw them first (an unused ticket expires in a minute).
    UserLimit,
    /// The group's waiting room is full (`[routing] waiting_room`).
    WaitingRoomFull,
    /// Too many failed logins for this user or from this address: the
    /// credentials were not checked; retry after `retry_after_secs`.
    Throttled { retry_after_secs: u32 },
}

impl RouteRefusal {
    /// The reason's name in `--json` output, logs and documentation.
    pub fn as_str(&self) -> &'static str {
        match self {
            RouteRefusal::NotAssigned => "not-assigned",
            RouteRefusal::BadCredentials => "bad-credentials",
            RouteRefusal::GroupNotAvailable { .. } => "group-not-available",
            RouteRefusal::AtCapacity => "at-capacity",
            RouteRefusal::NoSuchGroup => "no-such-group",
            RouteRefusal::Busy => "busy",
            RouteRefusal::Malformed => "malformed",
            RouteRefusal::ShuttingDown => "shutting-down",
            RouteRefusal::Internal => "internal",
            RouteRefusal::UserLimit => "user-limit",
            RouteRefusal::WaitingRoomFull => "waiting-room-full",
            RouteRefusal::Throttled { .. } => "throttled",
        }
    }
}

impl std::fmt::Display for RouteRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    //! Golden bytes: these freeze the route protocol's encoding.
    use super::*;
    use crate::frame;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn id<T: std::str::FromStr>(s: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        s.parse().expect("valid id in test")
    }

    fn round_trip<T>(msg: &T, expected: &str)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let bytes = frame::encode_payload(msg).expect("encode");
        assert_eq!(hex(&bytes), expected);
        let back: T =
            frame::decode_payload_within::<T, MAX_ROUTE_FRAME_LEN>(&bytes).expect("decode");
        assert_eq!(&back, msg);
    }

    #[test]
    fn golden_route() {
        round_trip(
            &RouteRequest::V1(ClientToBroker::Route(RouteAsk {
                group: id("g"),
                user: id("bob"),
                credential: Credential::Token("t".into()),
                wait: true,
            })),
            "0000016703626f6201017401",
        );
        round_trip(&RouteRequest::V1(ClientToBroker::Cancel), "0001");
    }

    #[test]
    fn golden_launch() {
        round_trip(
            &RouteRequest::V1(ClientToBroker::RouteLaunch(RouteAsk {
                group: id("g"),
                user: id("bob"),
                credential: Credential::Token("t".into()),
                wait: true,
            })),
            "0002016703626f6201017401",
        );
        let admission = Admission {
            resource: id("h1"),
            address: "h:1".into(),
            session: id("s1"),
            ticket: "v1.x".into(),
            expires_at: UnixMillis(1000),
        };
        // The admission's bytes are `Admitted`'s, then the protocol.
        round_trip(
            &RouteReply::V1(BrokerToClient::AdmittedLaunch {
                admission: admission.clone(),
                protocol: Some(StreamingProtocol::Ssh),
            }),
            "000402683103683a310273310476312e78fbd0070101",
        );
        round_trip(
            &RouteReply::V1(BrokerToClient::AdmittedLaunch {
                admission: admission.clone(),
                protocol: Some(StreamingProtocol::Rdp),
            }),
            "000402683103683a310273310476312e78fbd0070100",
        );
        round_trip(
            &RouteReply::V1(BrokerToClient::AdmittedLaunch {
                admission,
                protocol: None,
            }),
            "000402683103683a310273310476312e78fbd00700",
        );
    }

    #[test]
    fn golden_answers() {
        round_trip(
            &RouteReply::V1(BrokerToClient::Waiting { position: 3 }),
            "000003",
        );
        round_trip(
            &RouteReply::V1(BrokerToClient::Admitted(Admission {
                resource: id("h1"),
                address: "h:1".into(),
                session: id("s1"),
                ticket: "v1.x".into(),
                expires_at: UnixMillis(1000),
            })),
            "000102683103683a310273310476312e78fbd007",
        );
        round_trip(
            &RouteReply::V1(BrokerToClient::Refused(RouteRefused {
                reason: RouteRefusal::GroupNotAvailable {
                    status: "expired".into(),
                },
                message: "m".into(),
            })),
            concat!("0002020765787069726564", "016d"),
        );
    }

    #[test]
    fn golden_limit_refusals() {
        let refused = |reason| {
            RouteReply::V1(BrokerToClient::Refused(RouteRefused {
                reason,
                message: "m".into(),
            }))
        };
        round_trip(&refused(RouteRefusal::UserLimit), "000209016d");
        round_trip(&refused(RouteRefusal::WaitingRoomFull), "00020a016d");
        round_trip(
            &refused(RouteRefusal::Throttled {
                retry_after_secs: 300,
            }),
            "00020bfb2c01016d",
        );
        assert_eq!(RouteRefusal::UserLimit.as_str(), "user-limit");
        assert_eq!(RouteRefusal::WaitingRoomFull.as_str(), "waiting-room-full");
        assert_eq!(
            RouteRefusal::Throttled {
                retry_after_secs: 1
            }
            .as_str(),
            "throttled"
        );
    }

    #[test]
    fn an_empty_credential_is_refused_by_the_decoder() {
        let bytes = frame::encode_payload(&RouteRequest::V1(ClientToBroker::Route(RouteAsk {
            group: id("g"),
            user: id("bob"),
            credential: Credential::Token("t".into()),
            wait: false,
        })))
        .expect("encode");
        // Shorten the token to zero bytes: the length byte 01 -> 00, drop "t".
        let mut bad = bytes.clone();
        let at = bad.len() - 3;
        bad[at] = 0;
        bad.remove(at + 1);
        assert!(frame::decode_payload_within::<RouteRequest, MAX_ROUTE_FRAME_LEN>(&bad).is_err());
    }

    #[test]
    fn refusal_names_are_stable() {
        assert_eq!(RouteRefusal::AtCapacity.as_str(), "at-capacity");
        assert_eq!(RouteRefusal::NotAssigned.as_str(), "not-assigned");
        assert_eq!(
            RouteRefusal::GroupNotAvailable {
                status: "expired".into()
            }
            .as_str(),
            "group-not-available"
        );
    }
}
