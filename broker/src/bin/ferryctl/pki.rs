//! `ferryctl pki`: the broker's private CA and the hosts' certificates,
//! written as files (no broker needed).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use ferry_broker::pki;
use ferry_common::ResourceId;

use crate::confirm::confirm;

#[derive(Subcommand)]
pub(crate) enum PkiCmd {
    /// Create the CA and the broker certificate.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// A name (DNS or IP) agents use to reach the broker; repeatable.
        /// Default: localhost, 127.0.0.1, ::1.
        #[arg(long = "broker-name")]
        broker_names: Vec<String>,
    },
    /// Issue a certificate and key for one host. Replacing an existing key
    /// asks first on a terminal; elsewhere it needs --yes.
    IssueAgent {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        resource: String,
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate is valid (the agent renews it over the link
        /// when a third is left).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=366))]
        days: u32,
        /// Replace an existing key in --out without asking.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Re-issue the broker's certificate and key from the CA in --dir (for
    /// two years), keeping its names unless --broker-name is given. Agents
    /// keep working (same CA); restart the broker to use it. Asks first on a
    /// terminal; elsewhere it needs --yes.
    IssueBroker {
        #[arg(long)]
        dir: PathBuf,
        /// A name (DNS or IP) agents use to reach the broker; repeatable.
        /// Default: the names of the current broker certificate.
        #[arg(long = "broker-name")]
        broker_names: Vec<String>,
        /// Replace the broker's key without asking.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

pub(crate) fn run(cmd: PkiCmd, json: bool) -> anyhow::Result<String> {
    match cmd {
        PkiCmd::Init { dir, broker_names } => init(&dir, &broker_names, json),
        PkiCmd::IssueAgent {
            dir,
            resource,
            out,
            days,
            yes,
        } => issue_agent(&dir, &resource, &out, days, yes, json),
        PkiCmd::IssueBroker {
            dir,
            broker_names,
            yes,
        } => issue_broker(&dir, &broker_names, yes, json),
    }
}

/// `pki issue-broker`: a new broker key and certificate from the same CA.
fn issue_broker(
    dir: &Path,
    broker_names: &[String],
    yes: bool,
    json: bool,
) -> anyhow::Result<String> {
    if dir.join(pki::BROKER_KEY).exists() && !yes {
        confirm(
            &format!(
                "replace the broker key and certificate in {} (the broker uses the new ones \
                 from its next start)?",
                dir.display()
            ),
            "pki issue-broker",
        )?;
    }
    let names = pki::issue_broker(dir, broker_names).context("pki issue-broker")?;
    let files = [
        ("broker_cert", dir.join(pki::BROKER_CERT), true),
        ("broker_key", dir.join(pki::BROKER_KEY), false),
    ];
    output(
        json,
        &format!(
            "issued a broker certificate for {} in {}; restart the broker to use it",
            names.join(", "),
            dir.display()
        ),
        &files,
    )
}

/// `pki init`: the CA, the broker's certificate and the broker's ticket and
/// token keys.
fn init(dir: &Path, broker_names: &[String], json: bool) -> anyhow::Result<String> {
    pki::init(dir, broker_names).context("pki init")?;
    // The broker would create them at its first start; now they
    // exist with the rest of the PKI (and its owner).
    ferry_broker::tickets::TicketSigner::load_or_create(dir).context("ticket key")?;
    ferry_broker::tickets::TokenKey::load_or_create(dir).context("token key")?;
    let files = [
        ("ca_cert", dir.join(pki::CA_CERT), true),
        ("ca_key", dir.join(pki::CA_KEY), false),
        ("broker_cert", dir.join(pki::BROKER_CERT), true),
        ("broker_key", dir.join(pki::BROKER_KEY), false),
    ];
    output(
        json,
        &format!("created CA and broker certificate in {}", dir.display()),
        &files,
    )
}

/// `pki issue-agent`: one host's certificate and key (asking before it
/// replaces a key already there).
fn issue_agent(
    dir: &Path,
    resource: &str,
    out: &Path,
    days: u32,
    yes: bool,
    json: bool,
) -> anyhow::Result<String> {
    let resource: ResourceId = resource.parse()?;
    let key = out.join(pki::AGENT_KEY);
    if key.exists() && !yes {
        confirm(
            &format!(
                "replace the key and certificate in {} with new ones for {resource} \
                 (the agent using them must be given the new ones)?",
                out.display()
            ),
            "pki issue-agent",
        )?;
    }
    let lifetime = std::time::Duration::from_secs(u64::from(days) * 86_400);
    pki::issue_agent(dir, &resource, out, pki::Validity::starting_now(lifetime))
        .context("pki issue-agent")?;
    let files = [
        ("cert", out.join(pki::AGENT_CERT), true),
        ("key", out.join(pki::AGENT_KEY), false),
        ("ca_cert", out.join(pki::CA_CERT), true),
    ];
    output(
        json,
        &format!(
            "issued certificate for {resource} in {}, valid {days} days",
            out.display()
        ),
        &files,
    )
}

/// What `pki init` / `pki issue-agent` wrote: each file's path and, for
/// certificates, its SHA-256 fingerprint; as JSON (`{"message", "files":
/// {NAME: {"path", "fingerprint_sha256"}}}`) or as lines.
fn output(json: bool, message: &str, files: &[(&str, PathBuf, bool)]) -> anyhow::Result<String> {
    let mut described = Vec::new();
    for (name, path, cert) in files {
        let fingerprint = if *cert {
            Some(pki::fingerprint(path).with_context(|| format!("read {}", path.display()))?)
        } else {
            None
        };
        described.push((*name, path, fingerprint));
    }
    if json {
        let files: serde_json::Map<String, serde_json::Value> = described
            .iter()
            .map(|(name, path, fp)| {
                (
                    (*name).to_owned(),
                    serde_json::json!({
                        "path": path.display().to_string(),
                        "fingerprint_sha256": fp,
                    }),
                )
            })
            .collect();
        return Ok(format!(
            "{:#}\n",
            serde_json::json!({ "message": message, "files": files })
        ));
    }
    let mut out = format!("{message}\n");
    for (_, path, fp) in described {
        match fp {
            Some(fp) => out.push_str(&format!("  {}  sha256 {fp}\n", path.display())),
            None => out.push_str(&format!("  {}  (secret, mode 0600)\n", path.display())),
        }
    }
    Ok(out)
}
