//! `ferryctl`: the operator's CLI. Talks to the broker's admin socket; also
//! manages the PKI files and runs scenario simulations offline.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_broker::admin::{self, ADMIN_SOCKET_ENV, DEFAULT_ADMIN_SOCKET};
use ferry_broker::{pki, render};
use ferry_common::admin::{AdminRequestV1, AdminResponseV1};
use ferry_common::{ResourceId, SessionId};

#[derive(Parser)]
#[command(name = "ferryctl", version, about = "Operate a Ferry broker")]
struct Cli {
    /// Admin socket of the broker.
    #[arg(long, global = true, env = ADMIN_SOCKET_ENV, default_value = DEFAULT_ADMIN_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Broker-wide counters.
    Status,
    /// Streaming hosts.
    #[command(subcommand)]
    Resources(ResourcesCmd),
    /// Sessions.
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// The broker's private CA.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Replay a scenario file through the delivery-group engine.
    Simulate {
        /// Scenario file (TOML).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum ResourcesCmd {
    /// Every resource the broker knows.
    List,
    /// Take no new sessions on a resource (existing ones go on).
    Drain { resource: String },
    /// Take sessions on a resource again.
    Undrain { resource: String },
}

#[derive(Subcommand)]
enum SessionsCmd {
    /// Open sessions (all recorded sessions with --all).
    List {
        #[arg(long)]
        all: bool,
    },
    /// Ask the host of an open session to end it.
    Disconnect { session: String },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create the CA and the broker certificate.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// A name (DNS or IP) agents use to reach the broker; repeatable.
        /// Default: localhost, 127.0.0.1, ::1.
        #[arg(long = "broker-name")]
        broker_names: Vec<String>,
    },
    /// Issue a certificate and key for one host.
    IssueAgent {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        resource: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => exit_code(&e),
    }
}

/// The one place errors become exit codes: every failure (refused request,
/// broker not running, bad argument, I/O) is reported on stderr with exit 1.
/// Usage errors are clap's (exit 2).
fn exit_code(e: &anyhow::Error) -> ExitCode {
    // The cause chain, skipping causes a message already quotes (many error
    // types print their source in their own message).
    let mut message = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
    }
    eprintln!("ferryctl: {message}");
    ExitCode::from(1)
}

fn run(cli: Cli) -> anyhow::Result<String> {
    let json = cli.json;
    let req = match cli.command {
        Cmd::Pki(PkiCmd::Init { dir, broker_names }) => {
            pki::init(&dir, &broker_names).context("pki init")?;
            return Ok(format!(
                "created CA and broker certificate in {}\n",
                dir.display()
            ));
        }
        Cmd::Pki(PkiCmd::IssueAgent { dir, resource, out }) => {
            let resource: ResourceId = resource.parse()?;
            pki::issue_agent(&dir, &resource, &out).context("pki issue-agent")?;
            return Ok(format!(
                "issued certificate for {resource} in {}\n",
                out.display()
            ));
        }
        Cmd::Simulate { file } => {
            let mut out = ferry_broker::simulate::run_cli(&file, json)?;
            if !out.ends_with('\n') {
                out.push('\n');
            }
            return Ok(out);
        }
        Cmd::Status => AdminRequestV1::Status,
        Cmd::Resources(ResourcesCmd::List) => AdminRequestV1::ListResources,
        Cmd::Resources(ResourcesCmd::Drain { resource }) => AdminRequestV1::Drain {
            resource: resource.parse()?,
        },
        Cmd::Resources(ResourcesCmd::Undrain { resource }) => AdminRequestV1::Undrain {
            resource: resource.parse()?,
        },
        Cmd::Sessions(SessionsCmd::List { all }) => AdminRequestV1::ListSessions { all },
        Cmd::Sessions(SessionsCmd::Disconnect { session }) => AdminRequestV1::DisconnectSession {
            session: session.parse::<SessionId>()?,
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    let resp = runtime.block_on(admin::request(&cli.socket, req))?;
    Ok(show(resp, json))
}

fn show(resp: AdminResponseV1, json: bool) -> String {
    let (value, table) = match resp {
        AdminResponseV1::Status(s) => (render::status_json(&s), render::status_table(&s)),
        AdminResponseV1::Resources(r) => (render::resources_json(&r), render::resources_table(&r)),
        AdminResponseV1::Sessions(s) => (render::sessions_json(&s), render::sessions_table(&s)),
        AdminResponseV1::Done { message } => (
            serde_json::json!({ "message": message }),
            format!("{message}\n"),
        ),
        // `admin::request` turns error answers into `Err`.
        AdminResponseV1::Error(e) => (
            serde_json::json!({ "error": e.message }),
            format!("{}\n", e.message),
        ),
    };
    if json {
        format!("{value:#}\n")
    } else {
        table
    }
}
