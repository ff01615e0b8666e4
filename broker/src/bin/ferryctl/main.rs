//! `ferryctl`: the operator's CLI. Talks to the broker's admin socket; also
//! manages the PKI files and runs scenario simulations offline.
//!
//! One module per verb family: each turns its flags into an admin request
//! (or, for `pki` and `simulate`, does the work itself); `show` renders the
//! broker's answer.

mod confirm;
mod flags;
mod groups;
mod ota;
mod pki;
mod resources;
mod show;
mod usage;
mod users;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_broker::admin::{self, ADMIN_SOCKET_ENV, DEFAULT_ADMIN_SOCKET};
use ferry_common::admin::AdminRequestV1;
use ferry_common::UnixMillis;

use groups::GroupCmd;
use ota::OtaCmd;
use pki::PkiCmd;
use resources::{ResourcesCmd, SessionsCmd};
use users::UserCmd;

#[derive(Parser)]
#[command(
    name = "ferryctl",
    version,
    about = "Operate a Ferry broker",
    after_help = "The broker's admin socket is --socket, else $FERRY_ADMIN_SOCKET, else \
                  /run/ferry/admin.sock.\nExit codes: 0 done, 1 error (refused by the broker, \
                  broker not running, unreadable file), 64 usage error (unknown flag, bad \
                  value, missing --yes)."
)]
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
    /// The brokers sharing this broker's PostgreSQL store, and which owns
    /// each group.
    Cluster,
    /// The broker's web console.
    #[command(subcommand)]
    Console(ConsoleCmd),
    /// Sessions.
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// The broker's private CA.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Delivery groups.
    #[command(subcommand)]
    Group(Box<GroupCmd>),
    /// End users.
    #[command(subcommand)]
    User(UserCmd),
    /// OTA updates: offers, rollout schedules, history.
    #[command(subcommand)]
    Ota(OtaCmd),
    /// Replay a scenario file through the delivery-group engine.
    Simulate {
        /// Scenario file (TOML).
        file: PathBuf,
        /// Also replay this scenario (the same events under another policy)
        /// and compare the two: decisions, costs and their difference.
        #[arg(long, value_name = "FILE")]
        compare: Option<PathBuf>,
        /// Also write the timeline as a self-contained HTML page (chart,
        /// decisions, bill) to this file.
        #[arg(long, value_name = "OUT.html")]
        html: Option<PathBuf>,
        /// Also write the timeline chart as an SVG document to this file.
        #[arg(long, value_name = "OUT.svg")]
        svg: Option<PathBuf>,
    },
    /// Metered usage and its amounts over a period, per group and resource.
    Usage {
        /// Only this group (name or id).
        #[arg(long)]
        group: Option<String>,
        /// Start of the period, RFC 3339 (included).
        #[arg(long)]
        from: String,
        /// End of the period, RFC 3339 (excluded).
        #[arg(long)]
        to: String,
        /// table, csv, json (`--json` means json too) or svg (a chart of the
        /// cost per UTC day and group, one report per day, at most 92 days).
        #[arg(long, default_value = "table")]
        format: String,
    },
}

#[derive(Subcommand)]
enum ConsoleCmd {
    /// A one-time link that signs its opener in to the web console (valid
    /// ten minutes; anyone who may use the admin socket may ask for one).
    Login,
}

/// A mistake in the command line (a bad flag value, a missing
/// confirmation): exit [`EXIT_USAGE`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    ferry_common::duration::parse_duration(s).map_err(|e| e.to_string())
}

/// Exit code of a failure: the request was refused or failed, the broker
/// is not running, a file could not be read.
const EXIT_ERROR: u8 = 1;
/// Exit code of a usage error (`EX_USAGE` of sysexits.h): an unknown flag,
/// a bad flag value, a missing confirmation.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                // --help, --version
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(out) => {
            print!("{}", ferry_broker::render::terminal_safe(&out));
            ExitCode::SUCCESS
        }
        Err(e) => exit_code(&e),
    }
}

/// The one place errors become exit codes: every failure (refused request,
/// broker not running, I/O) is reported on stderr with exit 1 ([`EXIT_ERROR`]);
/// usage errors (clap's, bad flag values, a missing `--yes`) with 64
/// ([`EXIT_USAGE`]).
fn exit_code(e: &anyhow::Error) -> ExitCode {
    let message = ferry_broker::render::error_chain(e.as_ref());
    eprintln!("ferryctl: {message}");
    // A bad id on the command line is a usage error too.
    if e.downcast_ref::<Usage>().is_some()
        || e.downcast_ref::<ferry_common::ids::IdError>().is_some()
    {
        ExitCode::from(EXIT_USAGE)
    } else {
        ExitCode::from(EXIT_ERROR)
    }
}

/// Runs one command: its output, or the error [`exit_code`] reports.
fn run(cli: Cli) -> anyhow::Result<String> {
    let Cli {
        socket,
        json,
        command,
    } = cli;
    match command {
        Cmd::Pki(cmd) => pki::run(cmd, json),
        Cmd::Simulate {
            file,
            compare,
            html,
            svg,
        } => simulate(
            &file,
            compare.as_deref(),
            html.as_deref(),
            svg.as_deref(),
            json,
        ),
        Cmd::Usage {
            group,
            from,
            to,
            format,
        } => usage::run(&socket, group, &from, &to, format, json),
        Cmd::Group(cmd) => groups::run(&socket, *cmd, json),
        Cmd::Ota(cmd) => send(&socket, ota::request(cmd)?, json),
        Cmd::Status => send(&socket, AdminRequestV1::Status, json),
        Cmd::Resources(cmd) => send(&socket, resources::resources_request(cmd)?, json),
        Cmd::Cluster => send(&socket, AdminRequestV1::Cluster, json),
        Cmd::Console(ConsoleCmd::Login) => send(&socket, AdminRequestV1::ConsoleLogin, json),
        Cmd::Sessions(cmd) => send(&socket, resources::sessions_request(cmd)?, json),
        Cmd::User(cmd) => send(&socket, users::request(cmd)?, json),
    }
}

/// The runtime one command's requests to the broker run on.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start runtime")
}

/// Sends `req` to the broker and renders its answer.
fn send(socket: &Path, req: AdminRequestV1, json: bool) -> anyhow::Result<String> {
    let resp = runtime()?.block_on(admin::request(socket, req))?;
    Ok(show::show(resp, json))
}

/// `ferryctl simulate`: a scenario replayed offline, no broker needed;
/// with `compare`, two scenarios side by side; the pictures asked for are
/// written before the output is printed.
fn simulate(
    file: &Path,
    compare: Option<&Path>,
    html: Option<&Path>,
    svg: Option<&Path>,
    json: bool,
) -> anyhow::Result<String> {
    use ferry_broker::simulate::{compare_cli, run_with_pictures, Pictures};
    let pictures = Pictures {
        html: html.is_some(),
        svg: svg.is_some(),
    };
    let run = match compare {
        Some(other) => compare_cli(file, other, json, pictures)?,
        None => run_with_pictures(file, json, pictures)?,
    };
    for (path, doc) in [(html, &run.html), (svg, &run.svg)] {
        if let (Some(path), Some(doc)) = (path, doc) {
            std::fs::write(path, doc).with_context(|| format!("write {}", path.display()))?;
        }
    }
    let mut out = run.output;
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

/// An RFC 3339 time (`2026-03-02T09:00:00Z`, any offset) as Unix
/// milliseconds; anything else is a usage error.
fn time(s: &str) -> anyhow::Result<UnixMillis> {
    let t = chrono::DateTime::parse_from_rfc3339(s.trim()).map_err(|e| {
        Usage(format!(
            "{s:?} is not an RFC 3339 time (e.g. 2026-03-02T09:00:00Z): {e}"
        ))
    })?;
    Ok(UnixMillis(t.timestamp_millis()))
}
