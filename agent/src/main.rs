//! `ferry-agent`: runs on every streaming host.
//!
//! Parses the command line, loads the config, sets up logging and calls the
//! library; errors become exit codes here and nowhere else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_agent::config::{AgentConfig, ConfigError, CONFIG_ENV, DEFAULT_CONFIG_PATH};
use ferry_agent::local::{LocalClient, Request, Response, StatusReply};
use ferry_agent::pam::{self, PamAction};
use ferry_common::wire::EndReason;
use ferry_common::{SessionId, UserId};
use tokio_util::sync::CancellationToken;

/// Exit code for a configuration that cannot be used (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(name = "ferry-agent", version, about = "Ferry host agent")]
struct Cli {
    /// Configuration file (default: $FERRY_AGENT_CONFIG, then /etc/ferry/agent.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Local socket of the running agent (default: `local_socket` from the config).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent daemon.
    Run,
    /// Report a session start or end; exits 0 once the event is durably spooled.
    #[command(subcommand)]
    Session(SessionCmd),
    /// pam_exec mode: reads PAM_TYPE, PAM_USER, PAM_SERVICE, PAM_TTY from the environment.
    Pam,
    /// Show the agent's link and spool status.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Wait until connected with nothing spooled (or fail after --timeout).
        #[arg(long)]
        wait_synced: bool,
        /// How long --wait-synced waits (e.g. 30s, 2m).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(Subcommand)]
enum SessionCmd {
    /// A session started on this host.
    Start {
        #[arg(long)]
        session: String,
        #[arg(long)]
        user: String,
    },
    /// A session on this host ended.
    End {
        #[arg(long)]
        session: String,
        /// logout (default), disconnected, host-shutdown, or any text.
        #[arg(long)]
        reason: Option<String>,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    ferry_common::duration::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Cmd::Run) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-agent: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry-agent: {}", error_text(&e));
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes, skipping causes the message already quotes
/// (library errors include their source in their own text).
fn error_text(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn config_path(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_owned)
        .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

/// The socket a client verb talks to: `--socket`, else the config's.
fn socket_path(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    let config = AgentConfig::load(&config_path(cli.config.as_deref()))?;
    Ok(config.local_socket)
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Cmd::Run => {
            let config = AgentConfig::load(&config_path(cli.config.as_deref()))?;
            run_daemon(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Session(cmd) => {
            // Ids are checked before the agent is contacted.
            let request = match cmd {
                SessionCmd::Start { session, user } => Request::SessionStart {
                    session: SessionId::new(session.as_str()).context("--session")?,
                    user: UserId::new(user.as_str()).context("--user")?,
                },
                SessionCmd::End { session, reason } => Request::SessionEnd {
                    session: SessionId::new(session.as_str()).context("--session")?,
                    reason: parse_reason(reason.as_deref()),
                },
            };
            let socket = socket_path(&cli)?;
            let mut client = LocalClient::connect(&socket).await?;
            let seq = match client.call(request).await?.into_result()? {
                Response::Recorded { seq } => seq,
                other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
            };
            println!("recorded seq {seq}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Pam => {
            let env: BTreeMap<String, String> = std::env::vars().collect();
            let action = pam::action_from_env(&env, std::os::unix::process::parent_id())?;
            let (session, seq) = match action {
                PamAction::Ignore => return Ok(ExitCode::SUCCESS),
                PamAction::Start { session, user } => {
                    let socket = socket_path(&cli)?;
                    let mut client = LocalClient::connect(&socket).await?;
                    let seq = client.session_start(session.clone(), user).await?;
                    (session, seq)
                }
                PamAction::End { session, reason } => {
                    let socket = socket_path(&cli)?;
                    let mut client = LocalClient::connect(&socket).await?;
                    let seq = client.session_end(session.clone(), reason).await?;
                    (session, seq)
                }
            };
            tracing::info!(%session, seq, "PAM session event recorded");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status {
            json,
            wait_synced,
            timeout,
        } => {
            let socket = socket_path(&cli)?;
            let mut client = LocalClient::connect(&socket).await?;
            let status = if *wait_synced {
                client.wait_synced(*timeout).await?
            } else {
                client.status().await?
            };
            print_status(&status, *json)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_reason(reason: Option<&str>) -> EndReason {
    match reason {
        None | Some("logout") => EndReason::Logout,
        Some("disconnected") => EndReason::Disconnected,
        Some("host-shutdown") => EndReason::HostShutdown,
        Some(other) => EndReason::Other(other.to_owned()),
    }
}

fn print_status(s: &StatusReply, json: bool) -> anyhow::Result<()> {
    let l = &s.link;
    if json {
        let v = serde_json::json!({
            "resource": s.resource,
            "connected": l.connected,
            "acked_seq": l.acked_seq,
            "last_seq": l.last_seq,
            "spooled": l.spooled,
            "draining": l.draining,
            "last_error": l.last_error,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("resource    {}", s.resource);
        println!("connected   {}", l.connected);
        println!("draining    {}", l.draining);
        println!("last_seq    {}", l.last_seq);
        println!("acked_seq   {}", l.acked_seq);
        println!("spooled     {}", l.spooled);
        println!("last_error  {}", l.last_error.as_deref().unwrap_or("-"));
    }
    Ok(())
}

async fn run_daemon(config: AgentConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    let signals = shutdown.clone();
    let signal_task = tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            _ = signals.cancelled() => return,
        }
        signals.cancel();
    });
    let (ready_tx, _ready_rx) = tokio::sync::oneshot::channel();
    let result = ferry_agent::run(config, shutdown.clone(), ready_tx).await;
    shutdown.cancel();
    // The signal task ends on the cancelled token; nothing outlives main.
    let _ = signal_task.await;
    result.context("agent")
}
