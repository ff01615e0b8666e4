//! `ferry-connect`: an end user asks the broker for a session in a delivery
//! group and learns where to connect, with the ticket the host checks.
//!
//! Credentials, first found wins: `--password-file F` or `--token-file F`
//! (first line), the environment (`FERRY_PASSWORD`, `FERRY_TOKEN`), else a
//! password prompt without echo on the terminal (no terminal: an error).
//!
//! The admission names the host's streaming protocol (`rdp`, `ssh`) when
//! its agent is configured with one. With `--launch`, `ferry-connect` then
//! starts the user's client for it and hands it the ticket without putting
//! it on a command line (see `launch.rs`); the client logs in with the Ferry
//! user id (`--user`), which the host's PAM check compares with the
//! ticket's user.
//!
//! Exit codes: 0 admitted, 2 refused (the reason is printed: e.g.
//! `at-capacity`, `user-limit`, `waiting-room-full`, `throttled` with the
//! seconds to wait before retrying), 1 error (no
//! answer: unreachable broker, TLS or protocol failure, unreadable file),
//! 64 usage error (a bad or missing argument, no credentials given; as
//! `EX_USAGE` of sysexits.h). With `--launch`, an admission exits with the
//! client's status instead of 0.
//!
//! Started with `FERRY_CONNECT_TICKET_FILE` in its environment,
//! `ferry-connect` is ssh's askpass instead ([`launch::askpass`]): no
//! command line is parsed then.

mod launch;

use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use ferry_broker::routing::{RouteAnswer, RouteClient};
use ferry_common::route::{Admission, RouteAsk, RouteRefusal};
use ferry_common::ticket::Credential;
use ferry_common::wire::StreamingProtocol;
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
    after_help = "With --launch, the client (ssh, or xfreerdp for rdp) logs in as your Ferry \
                  user id (--user): the host checks the ticket's user against the login name. \
                  The ticket never goes on a command line: xfreerdp reads it on its standard \
                  input (/from-stdin:force), ssh gets it from ferry-connect as its SSH_ASKPASS \
                  (OpenSSH 8.4 or later). Arguments after -- go to the client (for ssh, after \
                  the host: the remote command).\n\n\
                  Exit codes: 0 admitted, 2 refused (with its reason), 1 error (no answer: \
                  unreachable broker, TLS or protocol failure), 64 usage error. With --launch, \
                  an admission exits with the client's status."
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
    /// Once admitted, start the client for the host's streaming protocol and
    /// exit with its status (the admission, without the ticket, goes to stderr).
    #[arg(long)]
    launch: bool,
    /// The host's streaming protocol, rdp or ssh (default: what the broker says).
    #[arg(long, value_name = "rdp|ssh")]
    protocol: Option<StreamingProtocol>,
    /// The client program to start (default: ssh for ssh, xfreerdp for rdp, from PATH).
    #[arg(long, value_name = "PROGRAM", requires = "launch")]
    client: Option<OsString>,
    /// An ssh_config option KEY=VALUE for ssh (`-o KEY=VALUE`); repeatable.
    #[arg(long, value_name = "KEY=VALUE", requires = "launch", value_parser = launch::parse_ssh_option)]
    ssh_option: Vec<String>,
    /// Arguments for the client, after `--` (for ssh: after the host).
    #[arg(last = true, value_name = "CLIENT ARGS", requires = "launch")]
    client_args: Vec<OsString>,
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
) -> anyhow::Result<(RouteAnswer, Option<StreamingProtocol>)> {
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
    let request = RouteAsk {
        group: cli.group.clone(),
        user: cli.user.clone(),
        credential: credential.clone(),
        wait: cli.wait,
    };
    let on_waiting = |position| {
        if !json {
            eprintln!("No room yet: waiting (position {position})...");
        }
    };
    let answer = client
        .route_launch(request.clone(), on_waiting)
        .await
        .context("route request")?;
    let answer = match answer {
        // A broker older than `RouteLaunch` cannot decode it: ask it the
        // old way, the protocol unknown.
        (RouteAnswer::Refused(r), _) if r.reason == RouteRefusal::Malformed => {
            let answer = client
                .route(request, on_waiting)
                .await
                .context("route request")?;
            (answer, None)
        }
        other => other,
    };
    client.close().await;
    Ok(answer)
}

/// The admission as `--json` or text; with `--launch` (on stderr) without
/// the ticket, which goes to the client alone.
fn print_admission(
    cli: &Cli,
    a: &Admission,
    protocol: Option<StreamingProtocol>,
    out: &mut dyn Write,
) {
    let ticket = (!cli.launch).then_some(a.ticket.as_str());
    let written = if cli.json {
        let mut v = serde_json::json!({
            "admitted": true,
            "group": cli.group.as_str(),
            "user": cli.user.as_str(),
            "resource": a.resource.as_str(),
            "address": a.address,
            "protocol": protocol.map(StreamingProtocol::as_str),
            "session": a.session.as_str(),
            "expires_at": ferry_broker::render::rfc3339(a.expires_at),
        });
        if let Some(ticket) = ticket {
            v["ticket"] = ticket.into();
        }
        writeln!(out, "{v}")
    } else {
        let mut text = format!(
            "Admitted to group {}.\nresource:   {}\naddress:    {}\nprotocol:   {}\nsession:    {}\n",
            cli.group,
            a.resource,
            a.address,
            protocol.map_or("(not known)", StreamingProtocol::as_str),
            a.session
        );
        if let Some(ticket) = ticket {
            text.push_str(&format!("ticket:     {ticket}\n"));
        }
        text.push_str(&format!(
            "expires at: {}\n",
            ferry_broker::render::rfc3339_secs(a.expires_at)
        ));
        out.write_all(text.as_bytes())
    };
    // A closed stdout is the reader's choice, not a failed admission.
    let _ = written.and_then(|()| out.flush());
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
    let (answer, told) = loop {
        let (answer, protocol) = ask(&cli, &broker, &server_name, &credential, json).await?;
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
            other => break (other, protocol),
        }
    };
    match answer {
        RouteAnswer::Admitted(a) => {
            // The user's word wins over the host's.
            let protocol = cli.protocol.or(told);
            if !cli.launch {
                print_admission(&cli, &a, protocol, &mut std::io::stdout());
                return Ok(ExitCode::SUCCESS);
            }
            let Some(protocol) = protocol else {
                return Err(Usage(format!(
                    "--launch: the broker does not say which protocol the host at {} speaks \
                     (its agent has no streaming_protocol): name it with --protocol rdp|ssh",
                    a.address
                ))
                .into());
            };
            // stdout is the client's.
            print_admission(&cli, &a, Some(protocol), &mut std::io::stderr());
            let target = launch::Endpoint::parse(&a.address)?;
            let status = launch::launch(
                protocol,
                cli.client.as_deref(),
                &target,
                &cli.user,
                &cli.ssh_option,
                &cli.client_args,
                &a.ticket,
            )
            .await?;
            Ok(ExitCode::from(launch::exit_code(status)))
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

/// Askpass mode (`FERRY_CONNECT_TICKET_FILE` set): ssh runs this with its
/// prompt as the only argument. Prints the ticket once; any failure is
/// exit 1, which ssh takes as no answer.
fn askpass(file: OsString) -> ExitCode {
    let prompt = std::env::args_os()
        .nth(1)
        .map(|p| p.to_string_lossy().into_owned());
    let hint = std::env::var("SSH_ASKPASS_PROMPT").ok();
    match launch::askpass(
        std::path::Path::new(&file),
        prompt.as_deref(),
        hint.as_deref(),
    ) {
        Ok(ticket) => {
            let mut out = std::io::stdout().lock();
            match writeln!(out, "{ticket}").and_then(|()| out.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ferry-connect: askpass: write the ticket: {e}");
                    ExitCode::from(EXIT_ERROR)
                }
            }
        }
        Err(e) => {
            eprintln!("ferry-connect: askpass: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn main() -> ExitCode {
    if let Some(file) = std::env::var_os(launch::TICKET_FILE_ENV) {
        return askpass(file);
    }
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
