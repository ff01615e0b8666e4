//! Agent configuration: a TOML file, parsed, then validated as a whole.
//!
//! Every field has a serde default so a missing field is reported by the
//! validator together with every other problem, never one error per run.
//! Validation happens before any socket or file is opened.

use ferry_common::wire::{StreamingEndpoint, StreamingProtocol};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_common::duration::parse_duration;
use ferry_common::{GroupName, ResourceId};
use serde::Deserialize;

/// Default path of the configuration file for the CLI verbs.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ferry/agent.toml";

/// Environment variable naming the configuration file for CLI verbs.
pub const CONFIG_ENV: &str = "FERRY_AGENT_CONFIG";

/// How long the disconnect hook may run before it is killed, unless
/// configured: a streaming server ends a session in well under this.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the update hook may run before it is killed, unless configured:
/// an update downloads and installs a package, which takes longer than the
/// other hooks.
pub const DEFAULT_UPDATE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How long a local connection may be silent (before or inside a request)
/// or leave its answer unread before it is closed (`local_idle_timeout`,
/// unless configured). Clients send their request right after connecting;
/// a minute covers any pause of a busy host.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Most addresses in `brokers`.
pub const MAX_BROKERS: usize = 32;

/// How long a handshake may take when other brokers are configured: a
/// broker that does not answer (stopped, paused, cut off) is given up for
/// the next one instead of waiting out the idle timeout (30 s). With one
/// broker there is nothing else to try and the handshake takes its time.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(5);

/// The handshake's time limit with `others` brokers besides the first (the
/// link's and enrollment's): [`HANDSHAKE_LIMIT`], or none without others.
pub fn handshake_limit(others: &[String]) -> Option<Duration> {
    (!others.is_empty()).then_some(HANDSHAKE_LIMIT)
}

/// The validated configuration of one agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// The host's resource id; must equal the id in the agent certificate.
    pub resource: ResourceId,
    /// Delivery group the host is configured for, reported in `Hello`.
    pub group: Option<GroupName>,
    /// Broker QUIC address as `host:port`; DNS names are resolved at each connect.
    pub broker_addr: String,
    /// Name the broker's certificate must carry (default: the host of
    /// `broker_addr`).
    pub broker_name: String,
    /// Other brokers sharing the first one's store (`brokers`), tried in
    /// turn when one cannot be reached (enrollment too); any of them sends
    /// the agent on to the broker owning its group.
    pub brokers: Vec<String>,
    /// CA certificate (PEM) that signed the broker's certificate.
    pub ca_cert: PathBuf,
    /// The agent's own certificate (PEM), its identity.
    pub cert: PathBuf,
    /// The agent's private key (PEM).
    pub key: PathBuf,
    /// Directory for the spool and the drain flag.
    pub state_dir: PathBuf,
    /// File the group's policy is written to when the broker pushes one
    /// (default `<state_dir>/policy.json`); the host's streaming server reads it.
    pub policy_file: PathBuf,
    /// Unix socket the host's streaming server reports sessions on.
    pub local_socket: PathBuf,
    /// How long a local connection may be silent, stall in a request or
    /// leave its answer unread before it is closed (`local_idle_timeout`).
    pub local_idle_timeout: Duration,
    /// Version of the image the host runs, reported in `Hello`.
    pub image_version: String,
    /// Commands the agent runs on the broker's behalf.
    pub hooks: HooksConfig,
    /// Where end users' clients reach this host's streaming server
    /// (`streaming_address`), told to the broker after each `Welcome`.
    pub streaming: StreamingEndpoint,
    /// What the streaming server speaks (`streaming_protocol`), told to
    /// the broker with `streaming` and handed to end users' `ferry-connect`
    /// (which starts the matching client); `None`: not said.
    pub streaming_protocol: Option<StreamingProtocol>,
    /// Where `GET /metrics` is served (`[metrics] listen`; port 0 picks
    /// one), plain HTTP; `None` (the default): nowhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// `streaming_address` when the file has none: the default port on the
/// address the broker sees the agent connect from.
pub fn default_streaming() -> StreamingEndpoint {
    StreamingEndpoint {
        host: None,
        port: ferry_common::route::DEFAULT_STREAMING_PORT,
    }
}

/// Parses `streaming_address`: `host:port`, `[v6]:port`, or `:port` (the
/// address the broker sees, with this port).
pub fn parse_streaming_address(text: &str) -> Result<StreamingEndpoint, String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not host:port or :port"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{text:?}: the port must be 1..=65535"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Ok(StreamingEndpoint { host: None, port });
    }
    let ok = host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    if !ok {
        return Err(format!(
            "{text:?}: {host:?} is not a host name or IP address"
        ));
    }
    Ok(StreamingEndpoint {
        host: Some(host.to_owned()),
        port,
    })
}

/// Host commands the agent runs for broker commands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HooksConfig {
    /// argv of the disconnect hook; `--` and the session id are appended.
    /// `None`: the host cannot disconnect sessions on request.
    pub disconnect: Option<Vec<String>>,
    /// argv of the policy hook, run after a pushed policy is written; `--`
    /// and the policy file's path are appended. When it fails the previous file is
    /// put back. `None`: writing the file is all.
    pub policy: Option<Vec<String>>,
    /// How long a hook may run before it is killed (its process group) and
    /// the command fails.
    pub timeout: Duration,
    /// argv of the image hook (`Command::SwitchImage`); `--` and the image
    /// name are appended; the name is also in `FERRY_IMAGE`.
    pub image: Option<Vec<String>>,
    /// argv of the update hook (`Command::ApplyUpdate`); the update is in
    /// `FERRY_UPDATE_ID`, `FERRY_COMPONENT`, `FERRY_VERSION`, `FERRY_PACKAGE`.
    pub update: Option<Vec<String>>,
    /// argv of the warn hook (`Command::WarnSession`, and the agent's own
    /// `max_session_duration` warnings); `--` and the session id are appended, the
    /// text is in `FERRY_MESSAGE` and the end time (Unix ms) in
    /// `FERRY_DEADLINE_MS`.
    pub warn: Option<Vec<String>>,
    /// How long the update hook (and the image hook: both install
    /// software) may run before it is killed.
    pub update_timeout: Duration,
}

impl Default for HooksConfig {
    fn default() -> Self {
        Self {
            disconnect: None,
            policy: None,
            timeout: DEFAULT_HOOK_TIMEOUT,
            image: None,
            update: None,
            warn: None,
            update_timeout: DEFAULT_UPDATE_TIMEOUT,
        }
    }
}

/// Why a configuration cannot be used. Lists every problem at once.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config {path}:\n  - {}", .problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// The file as written, before validation.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawConfig {
    resource: Option<String>,
    group: Option<String>,
    broker_addr: Option<String>,
    broker_name: Option<String>,
    brokers: Vec<String>,
    ca_cert: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    state_dir: PathBuf,
    policy_file: Option<PathBuf>,
    local_socket: PathBuf,
    local_idle_timeout: Option<String>,
    image_version: String,
    hooks: RawHooks,
    /// `host:port` or `:port` of the host's streaming server.
    streaming_address: Option<String>,
    /// `rdp` or `ssh`: what the host's streaming server speaks.
    streaming_protocol: Option<String>,
    /// One-time enrollment token (issue 6): with no certificate at `cert`,
    /// `ferry-agent run` enrolls with it first (see [`crate::enroll`]).
    enroll_token: Option<String>,
    metrics: RawMetrics,
}

/// `[metrics]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawHooks {
    disconnect: Option<Vec<String>>,
    policy: Option<Vec<String>>,
    timeout: Option<String>,
    image: Option<Vec<String>>,
    update: Option<Vec<String>>,
    warn: Option<Vec<String>>,
    update_timeout: Option<String>,
}

impl Default for RawConfig {
    // Fields the file leaves out keep these (serde's container `default`).
    fn default() -> Self {
        Self {
            resource: None,
            group: None,
            broker_addr: None,
            broker_name: None,
            brokers: Vec::new(),
            ca_cert: "/etc/ferry/agent/ca.pem".into(),
            cert: "/etc/ferry/agent/agent.pem".into(),
            key: "/etc/ferry/agent/agent-key.pem".into(),
            state_dir: "/var/lib/ferry-agent".into(),
            policy_file: None,
            local_socket: "/run/ferry-agent/agent.sock".into(),
            local_idle_timeout: None,
            image_version: "unknown".into(),
            hooks: RawHooks::default(),
            streaming_address: None,
            streaming_protocol: None,
            enroll_token: None,
            metrics: RawMetrics::default(),
        }
    }
}

impl AgentConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates configuration text; `path` only names it in
    /// errors. Every unknown key, wrong type and invalid value is listed in
    /// one [`ConfigError::Invalid`]; only a TOML syntax error stops earlier.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parsed = ferry_process::config_check::parse_all::<RawConfig>(text).map_err(|e| {
            ConfigError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            }
        })?;
        let mut problems: Vec<String> = parsed.problems.iter().map(ToString::to_string).collect();
        let validated = match parsed.value {
            Some(ref raw) => raw.clone().validate(),
            None => Err(Vec::new()),
        };
        match validated {
            Ok(config) if problems.is_empty() => Ok(config),
            Ok(_) => Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            }),
            Err(more) => {
                // A key already reported (its value was left out) is not
                // reported again as missing.
                problems.extend(
                    more.into_iter()
                        .filter(|p| !parsed.reported(p.split(':').next().unwrap_or_default())),
                );
                Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    problems,
                })
            }
        }
    }
}

impl RawConfig {
    /// The checked config, or every problem found, section by section.
    fn validate(self) -> Result<AgentConfig, Vec<String>> {
        let mut problems = Vec::new();
        let (resource, group) = self.identity(&mut problems);
        let (broker_addr, broker_name) = self.broker(&mut problems);
        self.check_paths(&mut problems);
        self.hooks.check_programs(&mut problems);
        self.check_policy_file(&mut problems);
        self.check_enroll_token(&mut problems);
        let (timeout, update_timeout) = self.hooks.timeouts(&mut problems);
        let streaming = self.streaming(&mut problems);
        let streaming_protocol = self.streaming_protocol(&mut problems);
        let local_idle_timeout = hook_timeout(
            "local_idle_timeout",
            self.local_idle_timeout.as_deref(),
            DEFAULT_IDLE_TIMEOUT,
            &mut problems,
        );
        let policy_file = self
            .policy_file
            .unwrap_or_else(|| self.state_dir.join("policy.json"));
        let metrics_listen = self.metrics.listen.as_deref().and_then(|text| {
            text.parse()
                .map_err(|_| {
                    problems.push(format!(
                        "metrics.listen: {text:?} is not an address with a port (e.g. \"127.0.0.1:9465\")"
                    ))
                })
                .ok()
        });
        match resource {
            Some(resource) if problems.is_empty() => Ok(AgentConfig {
                resource,
                group,
                broker_addr,
                broker_name,
                brokers: self.brokers.clone(),
                ca_cert: self.ca_cert,
                cert: self.cert,
                key: self.key,
                state_dir: self.state_dir,
                policy_file,
                local_socket: self.local_socket,
                local_idle_timeout,
                image_version: self.image_version,
                hooks: HooksConfig {
                    disconnect: self.hooks.disconnect,
                    policy: self.hooks.policy,
                    timeout,
                    image: self.hooks.image,
                    update: self.hooks.update,
                    warn: self.hooks.warn,
                    update_timeout,
                },
                streaming,
                streaming_protocol,
                metrics_listen,
            }),
            _ => Err(problems),
        }
    }

    /// `resource` (required) and `group`.
    fn identity(&self, problems: &mut Vec<String>) -> (Option<ResourceId>, Option<GroupName>) {
        let resource = match self.resource.as_deref() {
            None => {
                problems.push("resource: missing (the host's resource id)".to_owned());
                None
            }
            Some(s) => ResourceId::new(s)
                .map_err(|e| problems.push(format!("resource: {e}")))
                .ok(),
        };
        let group = match self.group.as_deref() {
            None => None,
            Some(s) => GroupName::new(s)
                .map_err(|e| problems.push(format!("group: {e}")))
                .ok(),
        };
        (resource, group)
    }

    /// `broker_addr` (required) and `broker_name` (default: the address's
    /// host).
    fn broker(&self, problems: &mut Vec<String>) -> (String, String) {
        let broker_addr = match &self.broker_addr {
            None => {
                problems.push("broker_addr: missing (host:port of the broker)".to_owned());
                String::new()
            }
            Some(a) => {
                if let Err(why) = check_host_port(a) {
                    problems.push(format!("broker_addr: {a:?} {why}"));
                }
                a.clone()
            }
        };
        // The name the broker's certificate must carry is normally the
        // name agents reach it by.
        let broker_name = match &self.broker_name {
            Some(name) => name.clone(),
            None => broker_host(&broker_addr).to_owned(),
        };
        if self.broker_name.is_some() || !broker_addr.is_empty() {
            if broker_name.trim().is_empty() {
                problems.push("broker_name: empty".to_owned());
            } else if rustls_pki_types::ServerName::try_from(broker_name.as_str()).is_err() {
                problems.push(format!(
                    "broker_name: {broker_name:?} is not a DNS name or IP address"
                ));
            }
        }
        for (i, a) in self.brokers.iter().enumerate() {
            if let Err(why) = check_host_port(a) {
                problems.push(format!("brokers[{i}]: {a:?} {why}"));
            }
        }
        if self.brokers.len() > MAX_BROKERS {
            problems.push(format!(
                "brokers: {} addresses, at most {MAX_BROKERS}",
                self.brokers.len()
            ));
        }
        (broker_addr, broker_name)
    }

    /// The files and directories (not empty) and `image_version` (bounded).
    fn check_paths(&self, problems: &mut Vec<String>) {
        for (name, p) in [
            ("ca_cert", &self.ca_cert),
            ("cert", &self.cert),
            ("key", &self.key),
            ("state_dir", &self.state_dir),
            ("local_socket", &self.local_socket),
        ] {
            if p.as_os_str().is_empty() {
                problems.push(format!("{name}: empty path"));
            }
        }
        if self.image_version.len() > ferry_common::limits::MAX_TEXT_LEN {
            problems.push(format!(
                "image_version: longer than {} bytes",
                ferry_common::limits::MAX_TEXT_LEN
            ));
        }
    }

    /// `policy_file`, when given, names a file.
    fn check_policy_file(&self, problems: &mut Vec<String>) {
        if self
            .policy_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty() || p.file_name().is_none())
        {
            problems.push("policy_file: must name a file".to_owned());
        }
    }

    /// `enroll_token`, when given, is a token's text.
    fn check_enroll_token(&self, problems: &mut Vec<String>) {
        if let Some(t) = &self.enroll_token {
            if !ferry_common::enroll::is_token_text(t) {
                problems.push(
                    "enroll_token: must be the 64 lowercase hex characters the provisioner gave"
                        .to_owned(),
                );
            }
        }
    }

    /// `streaming_address` (default: the usual port on this host).
    fn streaming(&self, problems: &mut Vec<String>) -> StreamingEndpoint {
        match self.streaming_address.as_deref() {
            None => default_streaming(),
            Some(text) => parse_streaming_address(text).unwrap_or_else(|why| {
                problems.push(format!("streaming_address: {why}"));
                default_streaming()
            }),
        }
    }

    /// `streaming_protocol` (default: not said).
    fn streaming_protocol(&self, problems: &mut Vec<String>) -> Option<StreamingProtocol> {
        let text = self.streaming_protocol.as_deref()?;
        text.parse()
            .map_err(|e| problems.push(format!("streaming_protocol: {e}")))
            .ok()
    }
}

impl RawHooks {
    /// Each hook given names a program.
    fn check_programs(&self, problems: &mut Vec<String>) {
        if let Some(argv) = &self.disconnect {
            if argv.first().is_none_or(|p| p.is_empty()) {
                problems.push(
                    "hooks.disconnect: must name a program (argv; `--` and the session id are appended)"
                        .to_owned(),
                );
            }
        }
        if let Some(argv) = &self.policy {
            if argv.first().is_none_or(|p| p.is_empty()) {
                problems.push(
                    "hooks.policy: must name a program (argv; `--` and the policy file's path are appended)"
                        .to_owned(),
                );
            }
        }
        for (name, argv, appended) in [
            (
                "image",
                &self.image,
                "; `--` and the image name are appended",
            ),
            ("update", &self.update, ""),
            ("warn", &self.warn, "; `--` and the session id are appended"),
        ] {
            if argv
                .as_ref()
                .is_some_and(|a| a.first().is_none_or(|p| p.is_empty()))
            {
                problems.push(format!(
                    "hooks.{name}: must name a program (argv{appended})"
                ));
            }
        }
    }

    /// `timeout` and `update_timeout`, or their defaults.
    fn timeouts(&self, problems: &mut Vec<String>) -> (Duration, Duration) {
        let timeout = hook_timeout(
            "hooks.timeout",
            self.timeout.as_deref(),
            DEFAULT_HOOK_TIMEOUT,
            problems,
        );
        let update_timeout = hook_timeout(
            "hooks.update_timeout",
            self.update_timeout.as_deref(),
            DEFAULT_UPDATE_TIMEOUT,
            problems,
        );
        (timeout, update_timeout)
    }
}

/// A timeout (a hook's, the local socket's): `text` parsed, more than 0,
/// else `default` and a problem.
fn hook_timeout(
    name: &str,
    text: Option<&str>,
    default: Duration,
    problems: &mut Vec<String>,
) -> Duration {
    match text.map(parse_duration) {
        None => default,
        Some(Ok(d)) if d.is_zero() => {
            problems.push(format!("{name}: must be more than 0"));
            default
        }
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            problems.push(format!("{name}: {e}"));
            default
        }
    }
}

/// The `enroll_token` of a configuration file, if it has one (the file is
/// checked whole by [`AgentConfig::load`] first).
pub fn enroll_token(path: &Path) -> Result<Option<String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Ok(raw.enroll_token)
}

/// The host part of `host:port` or `[v6]:port` (the whole text when it has
/// no port): the default `broker_name`.
pub fn broker_host(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Checks `host:port` (or `[v6]:port`) without resolving the name.
fn check_host_port(addr: &str) -> Result<(), &'static str> {
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or("is not host:port (the port is missing)")?;
    if host.is_empty() {
        return Err("has an empty host");
    }
    if host.contains(':') {
        return Err("is not host:port (write an IPv6 address as [addr]:port)");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err("has no valid port (1-65535)"),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_toml(text, Path::new("agent.toml"))
    }

    #[test]
    fn an_enrollment_token_is_checked_and_read_back() {
        let base = "resource = \"g-e1\"\nbroker_addr = \"b:7443\"\n";
        let token = "0a".repeat(32);
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, format!("{base}enroll_token = \"{token}\"\n")).expect("write");
        AgentConfig::load(&path).expect("valid");
        assert_eq!(enroll_token(&path).expect("read"), Some(token));
        let err = parse(&format!("{base}enroll_token = \"short\"\n")).expect_err("invalid");
        assert!(err.to_string().contains("enroll_token"), "{err}");
    }

    #[test]
    fn the_metrics_endpoint_is_off_by_default_and_its_address_is_checked() {
        let base = "resource = \"host-1\"\nbroker_addr = \"b:7443\"\n";
        assert_eq!(parse(base).expect("valid").metrics_listen, None);
        let c = parse(&format!("{base}[metrics]\nlisten = \"127.0.0.1:0\"\n")).expect("valid");
        assert_eq!(c.metrics_listen, Some("127.0.0.1:0".parse().expect("addr")));
        // The packaged example, uncommented, is valid.
        let commented = "#[metrics]\n#listen = \"127.0.0.1:9465\"\n";
        let text = include_str!("../../packaging/agent.toml");
        assert!(text.contains(commented), "the example's [metrics] changed");
        let example = text.replace(commented, &commented.replace('#', ""));
        let c = parse(&example).expect("the example's [metrics]");
        assert_eq!(
            c.metrics_listen,
            Some("127.0.0.1:9465".parse().expect("addr"))
        );
        let err = parse(&format!("{base}[metrics]\nlisten = \"nowhere\"\n")).expect_err("bad");
        assert!(
            err.to_string().contains("metrics.listen: \"nowhere\""),
            "{err}"
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c =
            parse("resource = \"host-1\"\nbroker_addr = \"broker.example:7443\"\n").expect("valid");
        assert_eq!(c.resource.as_str(), "host-1");
        // The name agents reach the broker by.
        assert_eq!(c.broker_name, "broker.example");
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/ferry-agent"));
        assert_eq!(c.local_socket, PathBuf::from("/run/ferry-agent/agent.sock"));
        assert_eq!(
            c.policy_file,
            PathBuf::from("/var/lib/ferry-agent/policy.json")
        );
        assert_eq!(c.image_version, "unknown");
        assert_eq!(c.hooks, HooksConfig::default());
        assert_eq!(c.group, None);
    }

    #[test]
    fn full_config_is_read() {
        let c = parse(
            r#"
            resource = "host-1"
            group = "g1"
            broker_addr = "[::1]:7443"
            broker_name = "broker.internal"
            ca_cert = "/x/ca.pem"
            cert = "/x/a.pem"
            key = "/x/k.pem"
            state_dir = "/s"
            policy_file = "/etc/stream/policy.json"
            local_socket = "/r/a.sock"
            image_version = "img-7"
            [hooks]
            disconnect = ["/bin/kick", "--now"]
            policy = ["/bin/reload"]
            timeout = "5s"
            image = ["/bin/switch-image", "--now"]
            update = ["/bin/update"]
            warn = ["/bin/warn"]
            update_timeout = "2h"
            "#,
        )
        .expect("valid");
        assert_eq!(
            c.hooks.image,
            Some(vec!["/bin/switch-image".to_owned(), "--now".to_owned()])
        );
        assert_eq!(c.hooks.update, Some(vec!["/bin/update".to_owned()]));
        assert_eq!(c.hooks.warn, Some(vec!["/bin/warn".to_owned()]));
        assert_eq!(c.hooks.update_timeout, Duration::from_secs(7200));
        assert_eq!(c.policy_file, PathBuf::from("/etc/stream/policy.json"));
        assert_eq!(c.hooks.policy, Some(vec!["/bin/reload".to_owned()]));
        assert_eq!(c.group.as_ref().map(|g| g.as_str()), Some("g1"));
        assert_eq!(
            c.hooks.disconnect,
            Some(vec!["/bin/kick".to_owned(), "--now".to_owned()])
        );
        assert_eq!(c.hooks.timeout, Duration::from_secs(5));
        assert_eq!(c.broker_name, "broker.internal");
    }

    #[test]
    fn every_invalid_field_is_reported_at_once() {
        let err = parse(
            r#"
            resource = "Host_1"
            group = "bad group"
            broker_addr = "nowhere"
            broker_name = ""
            state_dir = ""
            policy_file = ""
            [hooks]
            disconnect = []
            policy = [""]
            timeout = "soon"
            image = []
            update = [""]
            warn = []
            update_timeout = "0s"
            "#,
        )
        .expect_err("invalid");
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("expected Invalid, got {err}");
        };
        let fields: Vec<&str> = problems
            .iter()
            .map(|p| p.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            fields,
            [
                "resource",
                "group",
                "broker_addr",
                "broker_name",
                "state_dir",
                "hooks.disconnect",
                "hooks.policy",
                "hooks.image",
                "hooks.update",
                "hooks.warn",
                "policy_file",
                "hooks.timeout",
                "hooks.update_timeout"
            ],
            "{err}"
        );
    }

    #[test]
    fn missing_required_fields_are_both_reported() {
        let err = parse("").expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("resource: missing"), "{text}");
        assert!(text.contains("broker_addr: missing"), "{text}");
    }

    #[test]
    fn unknown_fields_and_bad_toml_are_refused() {
        assert!(matches!(
            parse("resource = \"h\"\nbroker_adr = \"x:1\"\n"),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            parse("resource = "),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn every_unknown_key_and_wrong_type_is_reported_with_the_other_problems() {
        let err = parse(
            r#"
            resource = "host-1"
            broker_addr = 7443
            broker_nam = "b.example"
            image_version = "img"
            [hooks]
            timeout = 30
            disconect = ["/bin/kick"]
            policy = [""]
            "#,
        )
        .expect_err("invalid");
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("expected Invalid, got {err}");
        };
        assert_eq!(
            problems,
            &[
                "broker_addr (line 3): invalid type: integer `7443`, expected a string",
                "broker_nam (line 4): unknown key (known keys here: resource, group, \
                 broker_addr, broker_name, brokers, ca_cert, cert, key, state_dir, \
                 policy_file, local_socket, local_idle_timeout, image_version, hooks, streaming_address, \
                 streaming_protocol, enroll_token, metrics)",
                "hooks.timeout (line 7): invalid type: integer `30`, expected a string",
                "hooks.disconect (line 8): unknown key (known keys here: disconnect, policy, \
                 timeout, image, update, warn, update_timeout)",
                // The validation of what could be read, in the same message
                // (broker_addr was reported above, not again as missing).
                "hooks.policy: must name a program (argv; `--` and the policy file's path are appended)",
            ],
            "{err}"
        );
    }

    #[test]
    fn streaming_protocol_is_rdp_or_ssh_and_optional() {
        let with = |line: &str| {
            parse(&format!(
                "resource = \"h\"\nbroker_addr = \"b:1\"\n{line}\n"
            ))
        };
        assert_eq!(with("").expect("valid").streaming_protocol, None);
        assert_eq!(
            with("streaming_protocol = \"ssh\"")
                .expect("valid")
                .streaming_protocol,
            Some(StreamingProtocol::Ssh)
        );
        assert_eq!(
            with("streaming_protocol = \"rdp\"")
                .expect("valid")
                .streaming_protocol,
            Some(StreamingProtocol::Rdp)
        );
        let err = with("streaming_protocol = \"vnc\"").expect_err("unknown");
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("expected Invalid, got {err}");
        };
        assert_eq!(
            problems,
            &["streaming_protocol: unknown streaming protocol \"vnc\" (known: rdp, ssh)"],
            "{err}"
        );
    }

    #[test]
    fn the_packaged_config_is_valid_and_shows_the_defaults() {
        let text = include_str!("../../packaging/agent.toml");
        let packaged = parse(text).expect("packaging/agent.toml is valid");
        let minimal = parse(&format!(
            "resource = {:?}\nbroker_addr = {:?}\n",
            packaged.resource.as_str(),
            packaged.broker_addr
        ))
        .expect("valid");
        assert_eq!(packaged, minimal);
    }

    #[test]
    fn broker_name_defaults_to_the_host_of_broker_addr() {
        let name = |addr: &str| {
            parse(&format!("resource = \"h\"\nbroker_addr = {addr:?}\n"))
                .map(|c| c.broker_name)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            name("broker.example.net:7443"),
            Ok("broker.example.net".into())
        );
        assert_eq!(name("127.0.0.1:7443"), Ok("127.0.0.1".into()));
        assert_eq!(name("[::1]:7443"), Ok("::1".into()));
        assert_eq!(broker_host("nowhere"), "nowhere");
        // Given, it wins; no broker_addr is one problem, not two.
        let c =
            parse("resource = \"h\"\nbroker_addr = \"10.0.0.1:1\"\nbroker_name = \"b.example\"\n")
                .expect("valid");
        assert_eq!(c.broker_name, "b.example");
        let err = parse("resource = \"h\"\n")
            .expect_err("no broker_addr")
            .to_string();
        assert!(!err.contains("broker_name"), "{err}");
    }

    #[test]
    fn host_port_forms() {
        assert!(check_host_port("127.0.0.1:7443").is_ok());
        assert!(check_host_port("[::1]:7443").is_ok());
        assert!(check_host_port("broker:7443").is_ok());
        assert!(check_host_port("broker").is_err());
        assert!(check_host_port("broker:0").is_err());
        assert!(check_host_port(":7443").is_err());
        assert!(check_host_port("::1:7443").is_err());
    }
}
