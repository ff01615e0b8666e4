//! `ferry-broker`: parses the command line, loads config, sets up logging,
//! runs the library and maps the outcome to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ferry_broker::config::{BrokerConfig, ConfigError};
use ferry_broker::demo::{self, DemoError, DemoOptions};
use ferry_broker::BrokerError;
use ferry_process::exit;
use ferry_process::output::{self, Output, Stream};
use tokio_util::sync::CancellationToken;

/// How long the runtime's leftover tasks get once `run` or `demo` returned.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

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

/// The one place failures become exit codes (and their message, written
/// through `log` so that a closed or full stderr never panics or blocks).
fn exit_code(f: Failure, log: &Output) -> ExitCode {
    match f {
        Failure::Config(e) | Failure::Broker(BrokerError::Config(e)) => {
            log.line(format_args!("ferry-broker: {e}"));
            ExitCode::from(exit::CONFIG)
        }
        Failure::Broker(e) => {
            log.line(format_args!("ferry-broker: {e}"));
            ExitCode::from(broker_exit_code(&e))
        }
        Failure::Demo(e @ DemoError::MissingAgent(_)) => {
            log.line(format_args!("ferry-broker demo: {e}"));
            ExitCode::from(EXIT_NOT_BUILT)
        }
        Failure::Demo(e) => {
            log.line(format_args!("ferry-broker demo: {e}"));
            ExitCode::FAILURE
        }
        Failure::Runtime(e) => {
            log.line(format_args!("ferry-broker: start runtime: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// The exit code of a broker that could not run: 78 for what an operator
/// must fix in the configuration or the PKI files (restarting cannot help),
/// 75 when another process holds the state directory or the database does
/// not answer (trying again later can help), 1 otherwise.
fn broker_exit_code(e: &BrokerError) -> u8 {
    match e {
        BrokerError::Config(_) | BrokerError::Pki(_) | BrokerError::Keys(_) => exit::CONFIG,
        // Not a wait for another process: 1, like any unwritable state.
        BrokerError::Locked(ferry_process::lock::LockError::ReadOnly { .. }) => 1,
        BrokerError::Locked(_) | BrokerError::StoreUnreachable { .. } => exit::TEMPFAIL,
        _ => 1,
    }
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
    // Logs go to stderr through a writer that drops lines rather than block
    // or panic; the demo's show likewise to stdout. `demo` shows its group's
    // events; RUST_LOG adds the logs.
    let log = output::init_logging(match cli.command {
        Cmd::Run { .. } => "info",
        Cmd::Demo { .. } => "error",
    });
    let code = run(cli, &log);
    // Queued lines get a moment to reach the stream, but exit never waits
    // on a stream nobody reads.
    log.flush(output::EXIT_FLUSH);
    code
}

fn run(cli: Cli, log: &Output) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return exit_code(Failure::Runtime(e), log),
    };
    let shutdown = CancellationToken::new();
    let result = match cli.command {
        Cmd::Run { config } => {
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
            let out = Output::spawn(Stream::Stdout);
            let result = runtime.block_on(async {
                tokio::spawn(on_signal(shutdown.clone()));
                let opts = DemoOptions {
                    duration,
                    state_dir,
                    keep,
                    out: out.clone(),
                };
                demo::run(opts, shutdown).await.map_err(Failure::Demo)
            });
            out.flush(output::EXIT_FLUSH);
            result
        }
    };
    // Tasks still blocked (none should be) do not hold the exit up.
    runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => exit_code(f, log),
    }
}
