//! `ferry-connect`: an end user asks the broker for a session in a delivery
//! group and learns where to connect, with the ticket the host checks.
//!
//! Credentials, first found wins: `--password-file F` or `--token-file F`
//! (first line), the environment (`FERRY_PASSWORD`, `FERRY_TOKEN`), else a
//! password prompt without echo on the terminal (no terminal: an error).
//!
//! Exit codes: 0 admitted, 2 refused (the reason is printed: e.g.
//! `at-capacity`, `user-limit`, `waiting-room-full`, `throttled` with the
//! seconds to wait before retrying), 1 error (no
//! answer: unreachable broker, TLS or protocol failure, unreadable file),
//! 64 usage error (a bad or missing argument, no credentials given; as
//! `EX_USAGE` of sysexits.h).

use std::io::{BufRead, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use ferry_broker::routing::{RouteAnswer, RouteClient};
use ferry_common::route::{RouteAsk, RouteRefusal};
use ferry_common::ticket::Credential;
use ferry_common::{GroupName, UserId};

/// Exit code of a refusal.
const EXIT_REFUSED: u8 = 2;
/// Exit code of an error (no answer).
const EXIT_ERROR: u8 = 1;
/// Exit code of a usage error (`EX_USAGE`): clap's own 2 would read as a
/// refusal.
const EXIT_USAGE: u8 = 64;

/// How long the handshake may go unanswered before the user is told what
/// is awaited.
const SLOW_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(1);

/// A mistake in the command line: exit [`EXIT_USAGE`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// Longest credential file read (a password or token is far shorter).
const MAX_CREDENTIAL_FILE: u64 = 8 * 1024;

#[derive(Parser)]
#[command(
    name = "ferry-connect",
    version,
    about = "Ask a Ferry broker for a streaming session",
    after_help = "Exit codes: 0 admitted, 2 refused (with its reason), 1 error (no answer: \
                  unreachable broker, TLS or protocol failure), 64 usage error."
)]
struct Cli {
    /// The broker's address, host:port.
    #[arg(long)]
    broker: String,
    /// CA certificate (PEM) that signed the broker's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// Name the broker's certificate must carry (default: the host of --broker).
    #[arg(long)]
    server_name: Option<String>,
    /// The delivery group.
    #[arg(long)]
    group: GroupName,
    /// Your user id.
    #[arg(long)]
    user: UserId,
    /// Read the password from this file (first line).
    #[arg(long, conflicts_with = "token_file")]
    password_file: Option<PathBuf>,
    /// Read a token (`ferryctl user token`) from this file (first line).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Wait for room (up to the group's wait_timeout) instead of a refusal at once.
    #[arg(long)]
    wait: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// How long to wait for the broker to answer the connection (e.g. 15s).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    connect_timeout: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    match ferry_common::duration::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be above zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn first_line(path: &PathBuf) -> anyhow::Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut line = String::new();
    std::io::BufReader::new(std::io::Read::take(file, MAX_CREDENTIAL_FILE))
        .read_line(&mut line)
        .with_context(|| format!("read {}", path.display()))?;
    let line = line.trim_end_matches(['\r', '\n']).to_owned();
    if line.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(line)
}

/// Reads a password from the terminal with echo off.
fn prompt_password(user: &UserId) -> anyhow::Result<String> {
    use rustix::termios::{isatty, tcgetattr, tcsetattr, LocalModes, OptionalActions};
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .ok()
        .filter(|f| isatty(f));
    let Some(mut tty) = tty else {
        return Err(Usage(
            "no credentials: give --password-file, --token-file, FERRY_PASSWORD or FERRY_TOKEN \
             (there is no terminal to ask on)"
                .into(),
        )
        .into());
    };
    write!(tty, "Password for {user}: ").context("write the prompt")?;
    tty.flush().context("write the prompt")?;
    let before = tcgetattr(&tty).context("read the terminal's mode")?;
    let mut quiet = before.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    quiet.local_modes.insert(LocalModes::ECHONL);
    tcsetattr(&tty, OptionalActions::Now, &quiet).context("turn echo off")?;
    let mut line = String::new();
    let read = std::io::BufReader::new(std::io::Read::take(&tty, MAX_CREDENTIAL_FILE))
        .read_line(&mut line);
    // Echo back on whatever happened.
    let restored = tcsetattr(&tty, OptionalActions::Now, &before);
    read.context("read the password")?;
    restored.context("turn echo back on")?;
    let line = line.trim_end_matches(['\r', '\n']).to_owned();
    if line.is_empty() {
        bail!("empty password");
    }
    Ok(line)
}

fn credential(cli: &Cli) -> anyhow::Result<Credential> {
    let c = if let Some(f) = &cli.password_file {
        Credential::Password(first_line(f)?)
    } else if let Some(f) = &cli.token_file {
        Credential::Token(first_line(f)?)
    } else if let Ok(p) = std::env::var("FERRY_PASSWORD") {
        Credential::Password(p)
    } else if let Ok(t) = std::env::var("FERRY_TOKEN") {
        Credential::Token(t)
    } else {
        Credential::Password(prompt_password(&cli.user)?)
    };
    c.validate()
        .map_err(|e| Usage(format!("credential: {e}")))?;
    Ok(c)
}

fn resolve(broker: &str) -> anyhow::Result<(SocketAddr, String)> {
    let addr = broker
        .to_socket_addrs()
        .with_context(|| format!("resolve {broker}"))?
        .next()
        .with_context(|| format!("{broker} resolves to no address"))?;
    let host = match broker.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_owned(),
        None => broker.to_owned(),
    };
    Ok((addr, host))
}

/// Most times a request follows a broker's redirect.
const MAX_REDIRECTS: u32 = 4;

/// Connects to the broker at `broker` and asks it for the session.
async fn ask(
    cli: &Cli,
    broker: &str,
    server_name: &str,
    credential: &Credential,
    json: bool,
) -> anyhow::Result<RouteAnswer> {
    let (addr, _) = resolve(broker)?;
    let connecting = RouteClient::connect_within(addr, server_name, &cli.ca, cli.connect_timeout);
    tokio::pin!(connecting);
    // Silence while a handshake goes unanswered looks like a hang: say
    // what is awaited (on stderr; `--json` output stays one object).
    let connected = tokio::select! {
        c = &mut connecting => c,
        () = tokio::time::sleep(SLOW_HANDSHAKE) => {
            eprintln!(
                "ferry-connect: waiting for the broker at {broker} ({addr}) to answer, up to {}...",
                ferry_common::duration::format_duration(cli.connect_timeout)
            );
            connecting.await
        }
    };
    let client = connected.with_context(|| format!("connect to the broker at {broker}"))?;
    let answer = client
        .route(
            RouteAsk {
                group: cli.group.clone(),
                user: cli.user.clone(),
                credential: credential.clone(),
                wait: cli.wait,
            },
            |position| {
                if !json {
                    eprintln!("No room yet: waiting (position {position})...");
                }
            },
        )
        .await
        .context("route request")?;
    client.close().await;
    Ok(answer)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let credential = credential(&cli)?;
    let (_, host) = resolve(&cli.broker)?;
    let server_name = cli.server_name.clone().unwrap_or(host);
    let json = cli.json;
    // Brokers sharing a store send a request on to the group's owner; the
    // hops are bounded so brokers that disagree cannot make it spin.
    let mut broker = cli.broker.clone();
    let mut hops = 0;
    let answer = loop {
        let answer = ask(&cli, &broker, &server_name, &credential, json).await?;
        match answer {
            RouteAnswer::Redirect(address) if hops < MAX_REDIRECTS => {
                hops += 1;
                if !json {
                    eprintln!(
                        "ferry-connect: group {} is served by the broker at {address}",
                        cli.group
                    );
                }
                broker = address;
            }
            RouteAnswer::Redirect(address) => {
                anyhow::bail!(
                    "the brokers sent the request on {hops} times (last to {address}): they do \
                     not agree which owns group {}; try again shortly",
                    cli.group
                )
            }
            other => break other,
        }
    };
    match answer {
        RouteAnswer::Admitted(a) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "admitted": true,
                        "group": cli.group.as_str(),
                        "user": cli.user.as_str(),
                        "resource": a.resource.as_str(),
                        "address": a.address,
                        "session": a.session.as_str(),
                        "ticket": a.ticket,
                        "expires_at": ferry_broker::render::rfc3339(a.expires_at),
                    })
                );
            } else {
                println!("Admitted to group {}.", cli.group);
                println!("resource:   {}", a.resource);
                println!("address:    {}", a.address);
                println!("session:    {}", a.session);
                println!("ticket:     {}", a.ticket);
                println!(
                    "expires at: {}",
                    ferry_broker::render::rfc3339_secs(a.expires_at)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        // Followed above until an answer.
        RouteAnswer::Redirect(address) => anyhow::bail!("sent on to the broker at {address}"),
        RouteAnswer::Refused(r) => {
            if json {
                let mut v = serde_json::json!({
                    "admitted": false,
                    "group": cli.group.as_str(),
                    "user": cli.user.as_str(),
                    "reason": r.reason.as_str(),
                    "message": r.message,
                });
                match &r.reason {
                    RouteRefusal::GroupNotAvailable { status } => {
                        v["status"] = serde_json::Value::String(status.clone());
                    }
                    RouteRefusal::Throttled { retry_after_secs } => {
                        v["retry_after_secs"] = (*retry_after_secs).into();
                    }
                    _ => {}
                }
                println!("{v}");
            } else {
                println!("Refused ({}): {}", r.reason, r.message);
            }
            Ok(ExitCode::from(EXIT_REFUSED))
        }
    }
}

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
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry-connect: start the runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "ferry-connect: {}",
                ferry_broker::render::error_chain(e.as_ref())
            );
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::from(EXIT_ERROR)
            }
        }
    }
}
