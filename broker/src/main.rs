//! `ferry-broker`: parses the command line, loads config, sets up logging,
//! runs the library and maps the outcome to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ferry_broker::config::{BrokerConfig, ConfigError};
use ferry_broker::demo::{self, DemoError, DemoOptions};
use ferry_broker::BrokerError;
use tokio_util::sync::CancellationToken;

/// Exit code for a configuration that cannot be used (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;
/// Exit code of `demo` when the agent binary is not built.
const EXIT_NOT_BUILT: u8 = 2;

#[derive(Parser)]
#[command(name = "ferry-broker", version, about = "Ferry broker daemon")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the broker daemon.
    Run {
        /// Configuration file (default: $FERRY_BROKER_CONFIG, then /etc/ferry/broker.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Ferry on this machine in one command: a throwaway broker with the
    /// local provisioner, base agents and simulated end users routed through
    /// it, every decision shown live, then the usage report and the cost.
    /// Stops by itself (or on Ctrl-C) and leaves nothing running. `dev` is
    /// an alias.
    #[command(alias = "dev")]
    Demo {
        /// How long the show runs (at least 20s); the policy's times scale
        /// with it.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        duration: Duration,
        /// Work in this directory (new or empty) instead of a temporary one.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Keep the working directory at the end (logs, store, certificates).
        #[arg(long)]
        keep: bool,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    ferry_common::duration::parse_duration(s).map_err(|e| e.to_string())
}

enum Failure {
    Config(ConfigError),
    Broker(BrokerError),
    Demo(DemoError),
    Runtime(std::io::Error),
}

/// The one place failures become exit codes.
fn exit_code(f: Failure) -> ExitCode {
    match f {
        Failure::Config(e) | Failure::Broker(BrokerError::Config(e)) => {
            eprintln!("ferry-broker: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Failure::Broker(e) => {
            eprintln!("ferry-broker: {e}");
            ExitCode::FAILURE
        }
        Failure::Demo(e @ DemoError::MissingAgent(_)) => {
            eprintln!("ferry-broker demo: {e}");
            ExitCode::from(EXIT_NOT_BUILT)
        }
        Failure::Demo(e) => {
            eprintln!("ferry-broker demo: {e}");
            ExitCode::FAILURE
        }
        Failure::Runtime(e) => {
            eprintln!("ferry-broker: start runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Cancels `token` on SIGTERM or SIGINT.
async fn on_signal(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    token.cancel();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return exit_code(Failure::Runtime(e)),
    };
    let shutdown = CancellationToken::new();
    let result = match cli.command {
        Cmd::Run { config } => {
            logging("info");
            let path = BrokerConfig::resolve_path(config.as_deref());
            match BrokerConfig::load(&path) {
                Err(e) => Err(Failure::Config(e)),
                Ok(config) => runtime.block_on(async {
                    tokio::spawn(on_signal(shutdown.clone()));
                    let (ready, _) = tokio::sync::oneshot::channel();
                    ferry_broker::daemon::run(config, shutdown, ready)
                        .await
                        .map_err(Failure::Broker)
                }),
            }
        }
        Cmd::Demo {
            duration,
            state_dir,
            keep,
        } => {
            // The group's events carry every decision and warning; RUST_LOG
            // shows the logs too.
            logging("error");
            runtime.block_on(async {
                tokio::spawn(on_signal(shutdown.clone()));
                let opts = DemoOptions {
                    duration,
                    state_dir,
                    keep,
                };
                demo::run(opts, shutdown).await.map_err(Failure::Demo)
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => exit_code(f),
    }
}
