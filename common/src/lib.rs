//! Ferry's shared vocabulary: wire types, identifiers, framing and limits.
//!
//! This crate does no I/O of its own: no sockets, no tasks, no configuration
//! loading. It defines what crosses the wire between `ferry-agent` and
//! `ferry-broker` and how it is framed, so that exactly one crate knows the
//! encoding.

pub mod admin;
pub mod certs;
pub mod duration;
pub mod enroll;
pub mod frame;
pub mod ids;
pub mod limits;
pub mod route;
pub mod ticket;
pub mod transport;
pub mod wire;

pub use ids::{GroupName, IdError, ResourceId, SessionId, UserId};
pub use wire::UnixMillis;

/// Version of the agent <-> broker protocol spoken by this build.
///
/// It is sent in the connection preamble before any frame; a peer that speaks
/// another version is refused with a readable reason (see [`frame::PreambleReply`]).
pub const PROTOCOL_VERSION: u16 = 1;

/// ALPN identifier of the agent <-> broker link on the broker's QUIC endpoint.
pub const ALPN_AGENT: &[u8] = b"ferry-agent/1";

/// ALPN identifier of end users' routing requests (`ferry-connect`) on the same
/// endpoint. Route clients present no certificate: they authenticate with the
/// user's credentials inside the protocol.
pub const ALPN_ROUTE: &[u8] = b"ferry-route/1";

/// ALPN identifier of enrollment: a new host without a certificate presents a
/// one-time enrollment token and receives its agent certificate.
pub const ALPN_ENROLL: &[u8] = b"ferry-enroll/1";

/// Every protocol the broker's QUIC endpoint serves, in order of preference.
/// ALPN identifier of requests between brokers sharing a store (an
/// operator's request forwarded to the broker owning its group).
pub const ALPN_PEER: &[u8] = b"ferry-peer/1";

pub const BROKER_ALPNS: [&[u8]; 4] = [ALPN_AGENT, ALPN_ROUTE, ALPN_ENROLL, ALPN_PEER];
