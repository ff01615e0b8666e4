//! Fuzz targets: one function per decoder of data from outside (a peer, a
//! file, an operator's text), each checking what that decoder promises:
//! it never panics, and what it accepts encodes back to itself where an
//! encoder exists. The suite drives every target with seeded mutations of
//! valid inputs (`tests/tests/fuzz_decoders.rs`, on the stable toolchain).

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use ferry_common::admin::{AdminRequest, AdminResponse};
use ferry_common::enroll::{EnrollMessage, EnrollReplyMessage};
use ferry_common::frame::{self, PreambleReply, PREAMBLE_LEN};
use ferry_common::limits::{MAX_ADMIN_FRAME_LEN, MAX_FRAME_LEN, MAX_LOCAL_FRAME_LEN};
use ferry_common::route::{RouteReply, RouteRequest};
use ferry_common::wire::{AgentMessage, BrokerMessage};
use ferry_common::{ResourceId, UnixMillis};
use serde::de::DeserializeOwned;
use serde::Serialize;

mod agent_state;
mod broker_inputs;

pub use agent_state::{
    check_spool_file, check_used_tickets_file, spool_file, unframed_spool, used_tickets_file,
};
pub use broker_inputs::{
    check_csr_der, check_policy_json, check_scenario_toml, csr_der, policy_json, scenario_toml,
};

/// One decoder under test.
pub struct Target {
    /// Its name (the corpus directory and the seed's label).
    pub name: &'static str,
    /// Runs the decoder on `data` and checks its promises (panics if not).
    pub run: fn(&[u8]),
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "agent_message",
        run: agent_message,
    },
    Target {
        name: "broker_message",
        run: broker_message,
    },
    Target {
        name: "route_request",
        run: route_request,
    },
    Target {
        name: "route_reply",
        run: route_reply,
    },
    Target {
        name: "enroll_message",
        run: enroll_message,
    },
    Target {
        name: "enroll_reply",
        run: enroll_reply,
    },
    Target {
        name: "admin_request",
        run: admin_request,
    },
    Target {
        name: "admin_response",
        run: admin_response,
    },
    Target {
        name: "local_request",
        run: local_request,
    },
    Target {
        name: "local_response",
        run: local_response,
    },
    Target {
        name: "preamble",
        run: preamble,
    },
    Target {
        name: "ticket_text",
        run: ticket_text,
    },
    Target {
        name: "users_csv",
        run: users_csv,
    },
    Target {
        name: "broker_config",
        run: broker_config,
    },
    Target {
        name: "agent_config",
        run: agent_config,
    },
    Target {
        name: "spool_file",
        run: spool_file,
    },
    Target {
        name: "used_tickets_file",
        run: used_tickets_file,
    },
    Target {
        name: "csr_der",
        run: csr_der,
    },
    Target {
        name: "scenario_toml",
        run: scenario_toml,
    },
    Target {
        name: "policy_json",
        run: policy_json,
    },
];

/// What a decoder made of an input; every seed a target builds
/// ([`seeds`]) is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Refused,
}

/// Valid inputs built for the targets whose inputs the suite's generic
/// seeds (variant tags, the shipped text files) do not reach: files with
/// checksums, certificate requests, scenarios, policies. Empty for the
/// others.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "spool_file" => agent_state::spool_seeds(),
        "used_tickets_file" => agent_state::used_tickets_seeds(),
        "csr_der" => broker_inputs::csr_seeds(),
        "scenario_toml" => broker_inputs::scenario_seeds(),
        "policy_json" => broker_inputs::policy_seeds(),
        _ => Vec::new(),
    }
}

/// A directory of this thread's own for the targets that decode files,
/// made on first use and reused by every input; in `/dev/shm` when there is
/// one, since the decoders sync what they write. Removed when the thread
/// ends (libFuzzer's process exits without it: one small directory a run).
fn scratch(name: &str) -> PathBuf {
    thread_local! {
        static ROOT: tempfile::TempDir = {
            let shm = Path::new("/dev/shm");
            let base = if shm.is_dir() { shm.to_owned() } else { std::env::temp_dir() };
            tempfile::Builder::new()
                .prefix("ferry-fuzz-")
                .tempdir_in(base)
                .expect("a scratch directory")
        };
    }
    ROOT.with(|root| root.path().join(name))
}

/// Decodes `data` as a `T` within `LIMIT` bytes; what decodes must encode
/// and decode again to the same value.
fn round_trip<T, const LIMIT: usize>(data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Ok(msg) = frame::decode_payload_within::<T, LIMIT>(data) else {
        return;
    };
    let again = frame::encode_payload(&msg).expect("a decoded message encodes");
    let back =
        frame::decode_payload_within::<T, LIMIT>(&again).expect("an encoded message decodes");
    assert_eq!(back, msg, "decode(encode(x)) != x");
}

pub fn agent_message(data: &[u8]) {
    round_trip::<AgentMessage, MAX_FRAME_LEN>(data);
}

pub fn broker_message(data: &[u8]) {
    round_trip::<BrokerMessage, MAX_FRAME_LEN>(data);
}

pub fn route_request(data: &[u8]) {
    round_trip::<RouteRequest, MAX_FRAME_LEN>(data);
}

pub fn route_reply(data: &[u8]) {
    round_trip::<RouteReply, MAX_FRAME_LEN>(data);
}

pub fn enroll_message(data: &[u8]) {
    round_trip::<EnrollMessage, MAX_FRAME_LEN>(data);
}

pub fn enroll_reply(data: &[u8]) {
    round_trip::<EnrollReplyMessage, MAX_FRAME_LEN>(data);
}

pub fn admin_request(data: &[u8]) {
    round_trip::<AdminRequest, MAX_ADMIN_FRAME_LEN>(data);
}

pub fn admin_response(data: &[u8]) {
    round_trip::<AdminResponse, MAX_ADMIN_FRAME_LEN>(data);
}

pub fn local_request(data: &[u8]) {
    round_trip::<ferry_agent::local::Request, MAX_LOCAL_FRAME_LEN>(data);
}

pub fn local_response(data: &[u8]) {
    round_trip::<ferry_agent::local::Response, MAX_LOCAL_FRAME_LEN>(data);
}

/// The 8-byte preamble a peer opens with, and a reply a broker sends.
pub fn preamble(data: &[u8]) {
    if let Some(bytes) = data
        .get(..PREAMBLE_LEN)
        .and_then(|b| <&[u8; PREAMBLE_LEN]>::try_from(b).ok())
    {
        let _ = frame::parse_preamble(bytes);
    }
    if let Some(reply) = read_reply(data) {
        let again = read_reply(&reply.encode()).expect("an encoded reply reads");
        assert_eq!(again, reply, "read(encode(x)) != x");
    }
}

/// A preamble reply read from `data` (in memory, so it never waits).
fn read_reply(data: &[u8]) -> Option<PreambleReply> {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let mut r = data;
    let mut read = std::pin::pin!(PreambleReply::read(&mut r));
    match read.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(reply)) => Some(reply),
        _ => None,
    }
}

/// A ticket's text as a streaming server passes it to the agent.
pub fn ticket_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(resource) = "h1".parse::<ResourceId>() else {
        return;
    };
    let _ = ferry_common::ticket::verify_ticket(text, &[7u8; 32], UnixMillis(0), &resource);
}

/// `ferryctl user import`'s CSV.
pub fn users_csv(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ferry_broker::csv::parse(text);
    }
}

/// The broker's configuration file.
pub fn broker_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ferry_broker::config::BrokerConfig::from_toml(text);
    }
}

/// The agent's configuration file.
pub fn agent_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ =
            ferry_agent::config::AgentConfig::from_toml(text, Path::new("/etc/ferry/agent.toml"));
    }
}
