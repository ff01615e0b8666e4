//! Provisioners: what turns the engine's scale decisions into machines that
//! appear and disappear (issue 6).
//!
//! A provisioner creates one elastic resource per [`CreateRequest`] (a host
//! whose agent enrolls with the request's one-time token, then registers)
//! and deletes one per [`DeleteRequest`]. Which one runs is the broker's
//! `[provisioner]` setting: [`exec`] (operator commands, so any cloud CLI,
//! hypervisor or bare-metal tool plugs in), [`local`] (`ferry-agent`
//! processes on this machine) or none (elastic hosts configured by hand).
//!
//! A provisioner only runs one attempt; retries with backoff, events and
//! what the engine learns are the group actor's ([`crate::groups::actor::elastic`]).

pub mod exec;
pub mod local;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_common::{GroupName, ResourceId};

use crate::config::{ProvisionerConfig, ProvisionerKind};

/// Most bytes of a command's stdout or stderr kept; the rest is dropped as
/// it is read, so a chatty command cannot grow the broker's memory.
pub const MAX_CAPTURE: usize = 16 * 1024;

/// Bytes of stderr quoted in a `provision-failed` event.
pub const STDERR_TAIL: usize = 512;

/// One elastic resource to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateRequest {
    pub group: GroupName,
    pub spec: String,
    pub image: String,
    /// The resource's id, `<group>-e<n>`: the name in its certificate.
    pub resource: ResourceId,
    /// One-time token the host's agent enrolls with (`ferry-agent enroll`).
    pub enrollment_token: String,
    /// Where the agent connects (`host:port`).
    pub broker_addr: String,
    /// The CA certificate the agent checks the broker with.
    pub ca_cert_path: PathBuf,
}

/// One elastic resource to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeleteRequest {
    pub group: GroupName,
    pub resource: ResourceId,
}

/// Why one attempt failed. The text is what the group's events show.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("could not start {program}: {error}")]
    Spawn {
        program: String,
        error: std::io::Error,
    },
    #[error("{program} exited with {status}; stderr: {stderr_tail}")]
    Exit {
        program: String,
        status: String,
        stderr_tail: String,
    },
    #[error(
        "{program} ran longer than {timeout}; its process group was killed; stderr: {stderr_tail}"
    )]
    Timeout {
        program: String,
        timeout: String,
        stderr_tail: String,
    },
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{0}")]
    Config(String),
}

/// The configured provisioner (enum dispatch: two kinds, no trait objects).
pub enum Provisioner {
    Exec(exec::ExecProvisioner),
    Local(local::LocalProvisioner),
}

impl Provisioner {
    /// One attempt at creating `req.resource`.
    pub async fn create(&self, req: &CreateRequest) -> Result<(), ProvisionError> {
        match self {
            Self::Exec(p) => p.create(req).await,
            Self::Local(p) => p.create(req).await,
        }
    }

    /// One attempt at deleting `req.resource`. Deleting what is not there
    /// succeeds (a retry after a lost answer must not fail forever).
    pub async fn delete(&self, req: &DeleteRequest) -> Result<(), ProvisionError> {
        match self {
            Self::Exec(p) => p.delete(req).await,
            Self::Local(p) => p.delete(req).await,
        }
    }

    /// After a broker restart, an elastic resource of the earlier run that is
    /// still alive in the store: the local provisioner starts its agent again
    /// (its processes ended with the broker); hosts of other provisioners
    /// outlive the broker.
    pub async fn resume(&self, resource: &ResourceId) -> Result<(), ProvisionError> {
        match self {
            Self::Exec(_) => Ok(()),
            Self::Local(p) => p.resume(resource).await,
        }
    }

    /// Stops what the provisioner runs on this machine (the local agents)
    /// when the broker shuts down.
    pub async fn shutdown(&self) {
        if let Self::Local(p) = self {
            p.shutdown().await;
        }
    }

    /// `exec` or `local`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Exec(_) => "exec",
            Self::Local(_) => "local",
        }
    }
}

/// The provisioner with what every request needs from the broker.
pub struct Provisioning {
    pub provisioner: Provisioner,
    pub config: ProvisionerConfig,
    /// The agent endpoint, as agents are told to reach it.
    pub broker_addr: String,
    /// The broker's CA certificate.
    pub ca_cert: PathBuf,
}

/// The provisioner `config` asks for; `None` for `kind = "none"`.
pub fn build(
    config: &ProvisionerConfig,
    state_dir: &Path,
    ca_cert: &Path,
    broker_addr: String,
) -> Result<Option<Arc<Provisioning>>, ProvisionError> {
    let provisioner = match &config.kind {
        ProvisionerKind::None => return Ok(None),
        ProvisionerKind::Exec { create, delete } => Provisioner::Exec(exec::ExecProvisioner {
            create: create.clone(),
            delete: delete.clone(),
            timeout: config.timeout,
        }),
        ProvisionerKind::Local { agent_binary } => {
            let binary = match agent_binary {
                Some(b) => b.clone(),
                None => local::default_agent_binary()?,
            };
            Provisioner::Local(local::LocalProvisioner::new(
                binary,
                state_dir.join(local::LOCAL_AGENTS_DIR),
            ))
        }
    };
    Ok(Some(Arc::new(Provisioning {
        provisioner,
        config: config.clone(),
        broker_addr,
        ca_cert: ca_cert.to_path_buf(),
    })))
}

/// The address agents are told to connect to: `provisioner.broker_addr`,
/// else the bound endpoint, with an unspecified IP (`0.0.0.0`) replaced by
/// the loopback address (right for the local provisioner).
pub fn advertised_addr(config: &ProvisionerConfig, bound: std::net::SocketAddr) -> String {
    if let Some(a) = &config.broker_addr {
        return a.clone();
    }
    let mut addr = bound;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr.to_string()
}

/// Keeps at most `max` bytes of `buf` (the last ones), on a char boundary.
pub(crate) fn tail(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end();
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

/// `d` for messages.
pub(crate) fn show(d: Duration) -> String {
    ferry_common::duration::format_duration(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail(b"short\n", 10), "short");
        assert_eq!(tail(b"0123456789abc", 3), "...abc");
        assert_eq!(tail("aé".as_bytes(), 1), "...");
    }
}
