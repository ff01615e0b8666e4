//! Messages of the agent <-> broker link.
//!
//! One enum per direction ([`AgentToBroker`], [`BrokerToAgent`]), each wrapped in
//! a versioned envelope ([`AgentMessage::V1`], [`BrokerMessage::V1`]) so a `V2`
//! can be added beside it. bincode has no field tags: never reorder or remove a
//! variant, never add a field to a message that has shipped; add a new variant
//! instead. `tests` at the bottom freeze the encoding with golden bytes.
//!
//! These are wire types, not the broker's or agent's internal state: convert at
//! the edge.

use serde::{Deserialize, Serialize};

use crate::ids::{GroupName, ResourceId, SessionId, UserId};

/// Milliseconds since the Unix epoch, UTC. Hosts stamp session events with
/// their own clock; the broker records both that and its receive time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UnixMillis(pub i64);

/// Envelope of everything an agent sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    V1(AgentToBroker),
}

/// Envelope of everything a broker sends to an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerMessage {
    V1(BrokerToAgent),
}

/// Agent -> broker. The first message on a connection is always `Hello`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentToBroker {
    /// Registration: who the agent is and what the host has now.
    Hello(Hello),
    /// A session event, durably spooled by the agent before it was sent.
    Session(SequencedEvent),
    /// Periodic host health.
    Health(HealthReport),
    /// Outcome of a broker command.
    CommandResult(CommandResult),
    /// Where end users' clients reach this host's streaming server; sent
    /// after every `Welcome` (the `Hello` is frozen).
    Streaming(StreamingEndpoint),
    /// A session's user disconnected (the session is retained for a
    /// reconnect) or reconnected. Sent when it happens and again after every
    /// `Welcome` for each session still disconnected; not spooled: the
    /// session's start and end are the metered facts, this only times its
    /// retention.
    Presence(PresenceReport),
    /// The versions the host runs now. Sent after every `Welcome` (after
    /// `Streaming`) and again whenever one changes (an image switch, an
    /// update): `Hello::agent_version` and `Hello::image_version` are frozen
    /// at connect.
    Inventory(Inventory),
    /// A certificate signing request (DER) for a new key of this host, sent
    /// when the agent's certificate has a third of its lifetime left.
    /// Answered by `BrokerToAgent::Renewal`; the agent uses the new
    /// certificate from its next connection.
    Renew { csr_der: Vec<u8> },
    /// `Streaming` with the protocol the streaming server speaks, sent
    /// instead of it after every `Welcome` by an agent configured with one
    /// (`streaming_protocol`; without, it sends `Streaming`, which brokers
    /// older than this variant decode too). A broker takes either; the old
    /// `Streaming` means the protocol is not known.
    StreamingServer(StreamingServer),
}

/// What a host runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Version of the running `ferry-agent` build.
    pub agent_version: String,
    /// Version of the image the host runs (after any image switch).
    pub image_version: String,
    /// Platform components and applications the agent has updated, sorted by
    /// name, at most [`crate::limits::MAX_INVENTORY_COMPONENTS`].
    pub components: Vec<ComponentVersion>,
    /// The last update (`Command::ApplyUpdate`) the agent carried out or
    /// gave up on. An update of the agent itself restarts the agent, so the
    /// command's own `CommandResult` is never sent: the new process reports
    /// the outcome here instead.
    pub last_update: Option<UpdateReport>,
}

/// One component's version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentVersion {
    pub name: String,
    pub version: String,
}

/// How an update ended on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReport {
    /// `Command::ApplyUpdate::update`.
    pub update: u64,
    pub component: String,
    /// The version the update was to install.
    pub version: String,
    pub outcome: CommandOutcome,
}

/// Where the host's streaming server listens, as the agent is configured
/// (`streaming_address`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamingEndpoint {
    /// Host name or IP clients connect to; `None` = the address the broker
    /// sees the agent's connection come from.
    pub host: Option<String>,
    pub port: u16,
}

/// Where the host's streaming server listens and what it speaks, as the
/// agent is configured (`streaming_address`, `streaming_protocol`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamingServer {
    pub endpoint: StreamingEndpoint,
    /// `None`: the agent's configuration does not say.
    pub protocol: Option<StreamingProtocol>,
}

/// The protocol of a host's streaming server: which client an end user's
/// `ferry-connect --launch` starts. Append only (bincode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StreamingProtocol {
    /// Remote Desktop (e.g. xrdp); the client is an RDP client.
    Rdp,
    /// Secure Shell; the client is `ssh`.
    Ssh,
}

impl StreamingProtocol {
    /// Every protocol, for messages that list them.
    pub const ALL: [StreamingProtocol; 2] = [StreamingProtocol::Rdp, StreamingProtocol::Ssh];

    /// The protocol's name in configuration, `--json` output and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamingProtocol::Rdp => "rdp",
            StreamingProtocol::Ssh => "ssh",
        }
    }
}

impl std::fmt::Display for StreamingProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is no [`StreamingProtocol`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown streaming protocol {0:?} (known: rdp, ssh)")]
pub struct UnknownProtocol(pub String);

impl std::str::FromStr for StreamingProtocol {
    type Err = UnknownProtocol;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StreamingProtocol::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                // The name comes from a user or a file: keep the message short.
                UnknownProtocol(s.chars().take(32).collect())
            })
    }
}

/// A change of a session's user connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceReport {
    pub session: SessionId,
    pub state: Presence,
    pub at: UnixMillis,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Presence {
    /// The user's client went away; the session keeps its slot for the
    /// group's `disconnect_retention`.
    Disconnected,
    /// The user is back on the retained session.
    Reconnected,
}

/// Broker -> agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerToAgent {
    /// Registration accepted.
    Welcome(Welcome),
    /// Every session event of the current spool with `seq <= up_to` is durably
    /// recorded; the agent may forget them.
    Ack { up_to: u64 },
    /// Something for the agent to carry out; answered by `CommandResult`.
    Command { id: u64, command: Command },
    /// The broker will not go on with this connection; it closes it after this.
    Refused(Refusal),
    /// The broker's ticket public key (raw Ed25519,
    /// [`crate::limits::TICKET_PUBLIC_KEY_LEN`] bytes), sent right after
    /// `Welcome`. The agent keeps it on disk and verifies session tickets
    /// with it, also while the broker is unreachable.
    TicketKey { public_key: Vec<u8> },
    /// The answer to `AgentToBroker::Renew`.
    Renewal(RenewalOutcome),
    /// Another broker owns the agent's group (brokers sharing a store): the
    /// agent connects to `address` (`host:port`) instead. The broker closes
    /// the connection after this.
    Redirect { address: String, message: String },
}

/// How the broker answered a renewal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RenewalOutcome {
    /// The new certificate (PEM), for the key of the request.
    Issued { cert_pem: String },
    /// Not now, and why; the agent tries again later while its certificate
    /// is valid.
    Failed { message: String },
}

/// The agent's registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The host. Must equal the resource id named by the agent's certificate.
    pub resource: ResourceId,
    /// The delivery group the host is configured for, if any.
    pub group: Option<GroupName>,
    /// Version of the `ferry-agent` build.
    pub agent_version: String,
    /// Version of the image the host runs.
    pub image_version: String,
    /// Static facts about the host.
    pub host: HostFacts,
    /// Identifies the agent's local spool. Sequence numbers are per
    /// (resource, spool); a host whose state directory was wiped starts a new
    /// spool and so a new sequence.
    pub spool_id: u64,
    /// Sessions open on the host right now, for the broker to reconcile.
    /// At most [`crate::limits::MAX_SESSIONS_PER_HELLO`].
    pub sessions: Vec<OpenSession>,
}

/// Static facts about a host, read with sysinfo.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
}

/// A session open on a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenSession {
    pub session: SessionId,
    pub user: UserId,
    pub started_at: UnixMillis,
}

/// A session event with its per-(resource, spool) sequence number: 1, 2, 3, ...
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequencedEvent {
    pub seq: u64,
    pub event: SessionEvent,
}

/// What happened to a session on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionEvent {
    Started {
        session: SessionId,
        user: UserId,
        at: UnixMillis,
    },
    Ended {
        session: SessionId,
        at: UnixMillis,
        reason: EndReason,
    },
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// The user logged out or closed the application.
    Logout,
    /// The broker asked for it (`Command::DisconnectSession`).
    Disconnected,
    /// The host is shutting down.
    HostShutdown,
    /// Anything else the host's streaming server reports.
    Other(String),
    /// The agent ended it at the group's `max_session_duration`.
    MaxSessionDuration,
    /// The agent ended it after the group's `idle_disconnect` without input.
    Idle,
}

/// Host health, sent every `Welcome::health_interval_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub at: UnixMillis,
    /// CPU use over all cores, in tenths of a percent (0..=1000).
    pub cpu_permille: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    /// 1, 5 and 15 minute load averages, times 1000.
    pub load_milli: [u32; 3],
    /// Sessions open on the host.
    pub sessions: u32,
    /// Whether the host is draining (takes no new sessions).
    pub draining: bool,
}

/// Outcome of a broker command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub id: u64,
    pub outcome: CommandOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    Done,
    Failed(String),
}

/// Registration accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The resource, as the broker knows it.
    pub resource: ResourceId,
    /// Highest sequence number of the agent's spool (`Hello::spool_id`) the
    /// broker has durably recorded; 0 when none. The agent drops its spooled
    /// events up to it and replays the rest, in order.
    pub last_recorded_seq: u64,
    /// How often the agent sends `Health`. The broker marks the resource
    /// unavailable after a few missed reports.
    pub health_interval_ms: u32,
    /// Version of the `ferry-broker` build.
    pub broker_version: String,
}

/// A broker command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// End one session (through the host's configured hook).
    DisconnectSession { session: SessionId, reason: String },
    /// Take no new sessions; existing ones go on.
    Drain,
    /// Take sessions again.
    Undrain,
    /// Apply version `version` of `group`'s policy. `document` is the whole
    /// policy as canonical JSON (object keys sorted), at most
    /// [`crate::limits::MAX_POLICY_DOCUMENT_LEN`] bytes. JSON text, not a
    /// typed struct, keeps this wire type stable while the policy grows (the
    /// session and display parts and the periods were added this way):
    /// bincode has no field tags, so a typed policy would need a new variant
    /// for every new field. An agent
    /// that already applied a newer version acknowledges without rewriting.
    ApplyPolicy {
        group: GroupName,
        version: u64,
        document: String,
    },
    /// Switch the host to `image` (SPEC section 9, update image) through the
    /// host's image hook. The broker has ended the host's sessions before.
    /// Answered once the hook finished; on success the agent then sends an
    /// `Inventory` with `image_version = image`.
    SwitchImage { image: String },
    /// Carry out OTA update `update`: bring `component` to `version` through
    /// the host's update hook, which gets `package` (a path or URL from the
    /// offer). `component` is `agent` (the agent itself: the hook installs
    /// the package and restarts the service), `image`, or the name of a
    /// platform component or application. The agent records the update on
    /// disk before it runs the hook and reports the outcome in a
    /// `CommandResult` and in `Inventory::last_update`.
    ApplyUpdate {
        update: u64,
        component: String,
        version: String,
        package: String,
    },
    /// Warn the user of `session` (through the host's warn hook) that the
    /// session will be ended at `deadline` and why (`message`).
    WarnSession {
        session: SessionId,
        message: String,
        deadline: UnixMillis,
    },
}

/// Why the broker will not go on with a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    /// The first message was not a `Hello`, or a `Hello` came twice.
    ProtocolViolation,
    /// `Hello::resource` is not the resource named by the certificate.
    IdentityMismatch,
    /// A frame could not be decoded or was too large.
    MalformedFrame,
    /// A session event's sequence number skips ahead of what was recorded.
    SequenceGap,
    /// The same resource connected again; this older connection is replaced.
    Superseded,
    /// The broker could not record the event; the agent retries later.
    StoreUnavailable,
    /// The broker is shutting down; reconnect later.
    ShuttingDown,
    /// `Hello::group` is not the group the operator put this host in (or
    /// the host is in none): the message names the group it belongs to and
    /// the command that changes it.
    NotMember,
    /// The certificate was issued before the host was revoked (`ferryctl
    /// resources revoke`) or before its name was enrolled anew: the host
    /// needs a new certificate from the operator.
    Revoked,
    /// No broker owns the agent's group right now (brokers sharing a store
    /// are handing it over, or its owner stopped and its lease has not
    /// expired yet): the agent tries again shortly.
    NotOwner,
}

#[cfg(test)]
mod tests {
    //! Golden bytes: these freeze the encoding. If one of these tests fails,
    //! the change breaks every deployed agent or broker; add a new variant
    //! instead of changing an existing one.
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

    #[test]
    fn golden_session_started() {
        let msg = AgentMessage::V1(AgentToBroker::Session(SequencedEvent {
            seq: 7,
            event: SessionEvent::Started {
                session: id("s1"),
                user: id("alice"),
                at: UnixMillis(1_772_438_520_000),
            },
        }));
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), "0001070002733105616c696365fd8001235b39030000");
        assert_eq!(
            frame::decode_payload::<AgentMessage>(&bytes).expect("decode"),
            msg
        );
    }

    #[test]
    fn golden_ack() {
        let msg = BrokerMessage::V1(BrokerToAgent::Ack { up_to: 300 });
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), "0001fb2c01");
    }

    #[test]
    fn golden_command() {
        let msg = BrokerMessage::V1(BrokerToAgent::Command {
            id: 1,
            command: Command::Drain,
        });
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), "00020101");
    }

    #[test]
    fn golden_apply_policy() {
        let msg = BrokerMessage::V1(BrokerToAgent::Command {
            id: 2,
            command: Command::ApplyPolicy {
                group: id("g"),
                version: 3,
                document: "{}".into(),
            },
        });
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), "00020203016703027b7d");
        assert_eq!(
            frame::decode_payload::<BrokerMessage>(&bytes).expect("decode"),
            msg
        );
    }

    #[test]
    fn golden_update_commands() {
        let cases = [
            (
                Command::SwitchImage { image: "i2".into() },
                "00020104026932",
            ),
            (
                Command::ApplyUpdate {
                    update: 7,
                    component: "agent".into(),
                    version: "1.1".into(),
                    package: "p".into(),
                },
                "0002010507056167656e7403312e310170",
            ),
            (
                Command::WarnSession {
                    session: id("s1"),
                    message: "m".into(),
                    deadline: UnixMillis(1000),
                },
                "00020106027331016dfbd007",
            ),
        ];
        for (command, golden) in cases {
            let msg = BrokerMessage::V1(BrokerToAgent::Command { id: 1, command });
            let bytes = frame::encode_payload(&msg).expect("encode");

            assert_eq!(hex(&bytes), golden);
            assert_eq!(
                frame::decode_payload::<BrokerMessage>(&bytes).expect("decode"),
                msg
            );
        }
    }

    #[test]
    fn golden_inventory_and_new_end_reasons() {
        let msg = AgentMessage::V1(AgentToBroker::Inventory(Inventory {
            agent_version: "1".into(),
            image_version: "i".into(),
            components: vec![ComponentVersion {
                name: "app".into(),
                version: "2".into(),
            }],
            last_update: Some(UpdateReport {
                update: 3,
                component: "agent".into(),
                version: "1".into(),
                outcome: CommandOutcome::Failed("x".into()),
            }),
        }));
        let bytes = frame::encode_payload(&msg).expect("encode");

        assert_eq!(
            hex(&bytes),
            "000601310169010361707001320103056167656e740131010178"
        );
        assert_eq!(
            frame::decode_payload::<AgentMessage>(&bytes).expect("decode"),
            msg
        );
        for (reason, golden) in [
            (EndReason::MaxSessionDuration, "0001010101730004"),
            (EndReason::Idle, "0001010101730005"),
        ] {
            let msg = AgentMessage::V1(AgentToBroker::Session(SequencedEvent {
                seq: 1,
                event: SessionEvent::Ended {
                    session: id("s"),
                    at: UnixMillis(0),
                    reason,
                },
            }));
            let bytes = frame::encode_payload(&msg).expect("encode");

            assert_eq!(hex(&bytes), golden);
        }
    }

    #[test]
    fn golden_streaming_and_presence() {
        let msg = AgentMessage::V1(AgentToBroker::Streaming(StreamingEndpoint {
            host: Some("h".into()),
            port: 8443,
        }));
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), "0004010168fbfb20");
        assert_eq!(
            frame::decode_payload::<AgentMessage>(&bytes).expect("decode"),
            msg
        );
        let msg = AgentMessage::V1(AgentToBroker::Presence(PresenceReport {
            session: id("s1"),
            state: Presence::Reconnected,
            at: UnixMillis(1000),
        }));
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), "000502733101fbd007");
        assert_eq!(
            frame::decode_payload::<AgentMessage>(&bytes).expect("decode"),
            msg
        );
    }

    #[test]
    fn golden_streaming_server() {
        let cases = [
            (Some(StreamingProtocol::Ssh), "0008010168fbfb200101"),
            (Some(StreamingProtocol::Rdp), "0008010168fbfb200100"),
            (None, "0008010168fbfb2000"),
        ];
        for (protocol, golden) in cases {
            let msg = AgentMessage::V1(AgentToBroker::StreamingServer(StreamingServer {
                endpoint: StreamingEndpoint {
                    host: Some("h".into()),
                    port: 8443,
                },
                protocol,
            }));
            let bytes = frame::encode_payload(&msg).expect("encode");
            assert_eq!(hex(&bytes), golden, "{protocol:?}");
            assert_eq!(
                frame::decode_payload::<AgentMessage>(&bytes).expect("decode"),
                msg
            );
        }
        // A protocol this build does not know is a decode error, not a guess.
        assert!(frame::decode_payload::<AgentMessage>(&[0, 8, 0, 0xfb, 0xfb, 0x20, 1, 2]).is_err());
    }

    #[test]
    fn streaming_protocol_names() {
        for p in StreamingProtocol::ALL {
            assert_eq!(p.as_str().parse::<StreamingProtocol>(), Ok(p));
            assert_eq!(p.to_string(), p.as_str());
        }
        assert_eq!("ssh".parse(), Ok(StreamingProtocol::Ssh));
        assert_eq!("rdp".parse(), Ok(StreamingProtocol::Rdp));
        let err = "SSH"
            .parse::<StreamingProtocol>()
            .expect_err("names are lowercase");
        assert!(err.to_string().contains("known: rdp, ssh"), "{err}");
        assert!("".parse::<StreamingProtocol>().is_err());
    }

    #[test]
    fn golden_not_member_refusal() {
        let msg = BrokerMessage::V1(BrokerToAgent::Refused(Refusal {
            code: RefusalCode::NotMember,
            message: "m".into(),
        }));
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), "000307016d");
        assert_eq!(
            frame::decode_payload::<BrokerMessage>(&bytes).expect("decode"),
            msg
        );
    }

    #[test]
    fn golden_redirect_and_not_owner() {
        let msg = BrokerMessage::V1(BrokerToAgent::Redirect {
            address: "b:1".into(),
            message: "m".into(),
        });
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), "000603623a31016d");
        assert_eq!(
            frame::decode_payload::<BrokerMessage>(&bytes).expect("decode"),
            msg
        );
        let msg = BrokerMessage::V1(BrokerToAgent::Refused(Refusal {
            code: RefusalCode::NotOwner,
            message: String::new(),
        }));
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), "00030900");
    }

    #[test]
    fn golden_ticket_key() {
        let msg = BrokerMessage::V1(BrokerToAgent::TicketKey {
            public_key: vec![0xab; 32],
        });
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), format!("000420{}", "ab".repeat(32)));
        assert_eq!(
            frame::decode_payload::<BrokerMessage>(&bytes).expect("decode"),
            msg
        );
    }

    #[test]
    fn golden_renewal() {
        let msg = AgentMessage::V1(AgentToBroker::Renew {
            csr_der: vec![0x30, 0x01],
        });
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), "0007023001");
        assert_eq!(
            frame::decode_payload::<AgentMessage>(&bytes).expect("decode"),
            msg
        );
        for (outcome, golden) in [
            (
                RenewalOutcome::Issued {
                    cert_pem: "c".into(),
                },
                "0005000163",
            ),
            (
                RenewalOutcome::Failed {
                    message: "m".into(),
                },
                "000501016d",
            ),
        ] {
            let msg = BrokerMessage::V1(BrokerToAgent::Renewal(outcome));
            let bytes = frame::encode_payload(&msg).expect("encode");
            assert_eq!(hex(&bytes), golden);
            assert_eq!(
                frame::decode_payload::<BrokerMessage>(&bytes).expect("decode"),
                msg
            );
        }
        let msg = BrokerMessage::V1(BrokerToAgent::Refused(Refusal {
            code: RefusalCode::Revoked,
            message: String::new(),
        }));
        let bytes = frame::encode_payload(&msg).expect("encode");
        assert_eq!(hex(&bytes), "00030800");
    }

    #[test]
    fn golden_hello() {
        let msg = AgentMessage::V1(AgentToBroker::Hello(Hello {
            resource: id("h1"),
            group: Some(id("g")),
            agent_version: "0.1.0".into(),
            image_version: "img-1".into(),
            host: HostFacts {
                hostname: "h".into(),
                os: "Debian".into(),
                kernel: "6.1".into(),
                vcpus: 4,
                memory_bytes: 8 << 30,
            },
            spool_id: 42,
            sessions: vec![OpenSession {
                session: id("s1"),
                user: id("bob"),
                started_at: UnixMillis(1000),
            }],
        }));
        let bytes = frame::encode_payload(&msg).expect("encode");
        let expected = concat!(
            "0000026831010167",
            "05302e312e3005696d672d3101680644656269616e03362e3104",
            "fd0000000002000000",
            "2a0102733103626f62fbd007",
        );
        assert_eq!(hex(&bytes), expected);
        assert_eq!(
            frame::decode_payload::<AgentMessage>(&bytes).expect("decode"),
            msg
        );
    }
}
