//! `ferry-agent`: runs on every streaming host.
//!
//! Parses the command line, loads the config, sets up logging and calls the
//! library; errors become exit codes here and nowhere else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Parser, Subcommand};
use ferry_agent::config::{AgentConfig, ConfigError, CONFIG_ENV, DEFAULT_CONFIG_PATH};
use ferry_agent::link::TlsError;
use ferry_agent::local::{
    ErrorCode, LocalClient, LocalError, Request, Response, StartProof, StatusReply, TicketInfo,
};
use ferry_agent::pam::{self, PamAction};
use ferry_agent::AgentError;
use ferry_common::wire::EndReason;
use ferry_common::{SessionId, UnixMillis, UserId};
use ferry_process::exit;
use ferry_process::lock::LockError;
use ferry_process::output::{self, Output};
use tokio_util::sync::CancellationToken;

/// How long the runtime's leftover tasks get once the command returned.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// Run the agent daemon (enrolling first when there is no certificate
    /// and the config has an `enroll_token`).
    Run,
    /// Get this host's certificate from the broker with a one-time
    /// enrollment token (the key is made here and never leaves the host).
    Enroll {
        /// The broker's agent endpoint, host:port.
        #[arg(long)]
        broker: String,
        /// The CA certificate (PEM) that signed the broker's certificate.
        #[arg(long)]
        ca: PathBuf,
        /// The one-time enrollment token.
        #[arg(long)]
        token: String,
        /// Name the broker's certificate must carry (default: the host of
        /// --broker).
        #[arg(long)]
        broker_name: Option<String>,
        /// Where to write the certificate.
        #[arg(long, default_value = "/etc/ferry/agent/agent.pem")]
        cert: PathBuf,
        /// Where to write the private key (0600).
        #[arg(long, default_value = "/etc/ferry/agent/agent-key.pem")]
        key: PathBuf,
    },
    /// Report a session start or end; exits 0 once the event is durably spooled.
    #[command(subcommand)]
    Session(SessionCmd),
    /// pam_exec mode: reads PAM_TYPE, PAM_USER, PAM_SERVICE, PAM_TTY from the
    /// environment, and at `auth` (with pam_exec's `expose_authtok`) the
    /// user's ticket as the password on standard input.
    ///
    /// auth: exit 0 once the ticket is verified for this host and this user
    /// and marked used; exit 1 with the reason otherwise. open_session: the
    /// session the ticket named starts (or is attached to); close_session:
    /// it ends with its last login.
    Pam {
        /// Refuse to open a session for a login that did not authenticate
        /// with a Ferry ticket (instead of reporting it as trusted under a
        /// derived session id).
        #[arg(long)]
        require_ticket: bool,
    },
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
    /// Session tickets issued by the broker.
    #[command(subcommand)]
    Ticket(TicketCmd),
}

#[derive(Subcommand)]
enum TicketCmd {
    /// Verify a ticket a client presented and mark it used (single use).
    ///
    /// Checks the broker's signature (with the key the agent keeps, so it
    /// works while the broker is unreachable), the expiry, that the ticket is
    /// for this host, and that it was not used before. Exit 0 and prints the
    /// user, session, group and expiry when valid; exit 1 with the reason
    /// (expired, reused, other host, forged, malformed) otherwise. The
    /// streaming server must then report the session with the printed
    /// session id (`ferry-agent session start --session ID --user USER`):
    /// the broker reserved the slot under it.
    Verify {
        /// The ticket text (`v1.…`).
        ticket: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SessionCmd {
    /// A session started on this host. Exits 0 once it is durably spooled;
    /// says whether the broker also acknowledged it within --ack-wait.
    ///
    /// Accepted only for a session the broker admitted: the user's ticket
    /// for this session and user was verified on this host with `ticket
    /// verify` (the streaming server's path), or is given with --ticket, or
    /// the caller is root or the agent's user and says --trusted (the
    /// operator's path).
    Start {
        #[arg(long)]
        session: String,
        #[arg(long)]
        user: String,
        /// The user's ticket: verified now (and marked used); it must name
        /// this session and user.
        #[arg(long, conflicts_with = "trusted")]
        ticket: Option<String>,
        /// Start it without a ticket, on the caller's word (root or the
        /// agent's user only).
        #[arg(long)]
        trusted: bool,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// A session on this host ended (exit and output as for `start`).
    End {
        #[arg(long)]
        session: String,
        /// logout (default), disconnected, host-shutdown, or any text.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// The user of an open session disconnected: the broker keeps the
    /// session for the group's disconnect_retention, then ends it.
    Disconnected {
        /// The session id.
        session: String,
    },
    /// The user is back on a retained session.
    Reconnected {
        /// The session id.
        session: String,
    },
    /// The session has had no user input since --since (default: now): the
    /// group's idle_disconnect counts from then, and the agent ends the
    /// session when it runs out.
    Idle {
        /// The session id.
        session: String,
        /// Unix time in milliseconds, or how long ago (e.g. 90s, 5m).
        #[arg(long, value_parser = parse_since)]
        since: Option<Since>,
    },
    /// The session has user input again (its idle time is reset).
    Active {
        /// The session id.
        session: String,
    },
}

/// How `session start|end` report what happened.
#[derive(clap::Args, Clone, Copy, Debug)]
struct ReportArgs {
    /// Print JSON: {"session", "event", "seq", "acknowledged"}.
    #[arg(long)]
    json: bool,
    /// How long to wait for the broker's acknowledgement while the link is
    /// up (0s: do not wait). Either way the event is durable and exit is 0.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    ack_wait: Duration,
}

/// `--since`: a Unix time in ms, or a duration before now.
#[derive(Clone, Copy, Debug)]
enum Since {
    At(i64),
    Ago(Duration),
}

fn parse_since(s: &str) -> Result<Since, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Since::At)
            .map_err(|_| "Unix time in milliseconds too large".to_owned());
    }
    parse_duration(s)
        .map(Since::Ago)
        .map_err(|e| format!("{e} (give Unix milliseconds or a duration like 5m)"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    ferry_common::duration::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr through a writer that drops lines rather than block
    // or panic (a closed or full pipe under systemd must not stop the daemon).
    let log = output::init_logging(if matches!(cli.command, Cmd::Run) {
        "info"
    } else {
        "warn"
    });
    let code = run(cli, &log);
    log.flush(output::EXIT_FLUSH);
    code
}

fn run(cli: Cli, log: &Output) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log.line(format_args!("ferry-agent: start runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli));
    // Tasks still blocked (none should be) do not hold the exit up.
    runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
    match result {
        Ok(code) => code,
        Err(e) => {
            log.line(format_args!("ferry-agent: {}", error_text(&e)));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The one place errors become exit codes: 78 for what an operator must fix
/// in the configuration or the host's certificate, key or CA (restarting
/// cannot help), 75 when another agent holds the state directory, 1 for the
/// rest.
fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.downcast_ref::<ConfigError>().is_some()
            || cause.downcast_ref::<TlsError>().is_some()
        {
            return exit::CONFIG;
        }
        let lock = match cause.downcast_ref::<AgentError>() {
            Some(AgentError::Tls(_)) => return exit::CONFIG,
            Some(AgentError::Locked(e)) => Some(e),
            _ => cause.downcast_ref::<LockError>(),
        };
        match lock {
            // Not a wait for another process: 1, like any unwritable state.
            Some(LockError::ReadOnly { .. }) => return 1,
            Some(_) => return exit::TEMPFAIL,
            None => {}
        }
    }
    1
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

/// Runs one command: a map from each verb to the function doing it.
async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Cmd::Run => run_agent(&cli).await,
        Cmd::Enroll {
            broker,
            ca,
            token,
            broker_name,
            cert,
            key,
        } => enroll(broker, ca, token, broker_name.as_deref(), cert, key).await,
        Cmd::Session(cmd) => session(&cli, cmd).await,
        Cmd::Pam { require_ticket } => pam_event(&cli, *require_ticket).await,
        Cmd::Ticket(TicketCmd::Verify { ticket, json }) => verify_ticket(&cli, ticket, *json).await,
        Cmd::Status {
            json,
            wait_synced,
            timeout,
        } => status(&cli, *json, *wait_synced, *timeout).await,
    }
}

/// `run`: the daemon, enrolling first when there is no certificate and the
/// config has an `enroll_token`.
async fn run_agent(cli: &Cli) -> anyhow::Result<ExitCode> {
    let path = config_path(cli.config.as_deref());
    let config = AgentConfig::load(&path)?;
    if !config.cert.exists() {
        // Only one agent enrolls and runs on a state directory: a second one
        // started beside it (a supervisor that lost track of the first) is
        // refused here, before it spends the token. Released for the daemon,
        // which takes it again; the certificate is looked at again under it.
        let _lock = ferry_agent::lock_state_dir(&config)?;
        if config.cert.exists() {
            // Another agent of this directory enrolled meanwhile.
        } else if let Some(token) = ferry_agent::config::enroll_token(&path)? {
            let target = ferry_agent::enroll::EnrollTarget {
                broker_addr: config.broker_addr.clone(),
                broker_name: config.broker_name.clone(),
                ca_cert: config.ca_cert.clone(),
                token,
                cert: config.cert.clone(),
                key: config.key.clone(),
                expect: Some(config.resource.clone()),
            };
            let resource = ferry_agent::enroll::enroll_among(&target, &config.brokers)
                .await
                .context("enroll")?;
            tracing::info!(%resource, "enrolled: certificate written");
        }
    }
    run_daemon(config).await?;
    Ok(ExitCode::SUCCESS)
}

/// `enroll`: this host's certificate from the broker, with a one-time token.
async fn enroll(
    broker: &str,
    ca: &Path,
    token: &str,
    broker_name: Option<&str>,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<ExitCode> {
    let target = ferry_agent::enroll::EnrollTarget {
        broker_addr: broker.to_owned(),
        broker_name: broker_name
            .unwrap_or_else(|| ferry_agent::config::broker_host(broker))
            .to_owned(),
        ca_cert: ca.to_owned(),
        token: token.to_owned(),
        cert: cert.to_owned(),
        key: key.to_owned(),
        expect: None,
    };
    let resource = ferry_agent::enroll::enroll(&target)
        .await
        .context("enroll")?;
    println!(
        "enrolled as {resource}: certificate {}, key {}",
        cert.display(),
        key.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `session VERB`: ids are checked before the agent is contacted.
async fn session(cli: &Cli, cmd: &SessionCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SessionCmd::Start {
            session,
            user,
            ticket,
            trusted,
            report,
        } => {
            let session = SessionId::new(session.as_str()).context("--session")?;
            let proof = match (ticket, trusted) {
                (Some(t), _) => StartProof::Ticket(t.clone()),
                (None, true) => StartProof::Trusted,
                (None, false) => StartProof::VerifiedTicket,
            };
            let request = Request::SessionStartWith {
                session: session.clone(),
                user: UserId::new(user.as_str()).context("--user")?,
                proof,
            };
            session_event(cli, request, &session, "started", *report).await
        }
        SessionCmd::End {
            session,
            reason,
            report,
        } => {
            let session = SessionId::new(session.as_str()).context("--session")?;
            let request = Request::SessionEnd {
                session: session.clone(),
                reason: parse_reason(reason.as_deref()),
            };
            session_event(cli, request, &session, "ended", *report).await
        }
        SessionCmd::Disconnected { session } => presence(cli, session, true).await,
        SessionCmd::Reconnected { session } => presence(cli, session, false).await,
        SessionCmd::Idle { session, since } => idle(cli, session, *since).await,
        SessionCmd::Active { session } => active(cli, session).await,
    }
}

/// `session start|end`: the event spooled, then (within `--ack-wait`)
/// acknowledged by the broker or not.
async fn session_event(
    cli: &Cli,
    request: Request,
    session: &SessionId,
    event: &str,
    report: ReportArgs,
) -> anyhow::Result<ExitCode> {
    let socket = socket_path(cli)?;
    let mut client = LocalClient::connect(&socket).await?;
    let seq = match client.call(request).await?.into_result()? {
        Response::Recorded { seq } => seq,
        other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
    };
    // The event is durable now; an agent that cannot say (an older
    // one) counts as "not acknowledged yet".
    let acknowledged = report.ack_wait > Duration::ZERO
        && client
            .wait_acked(seq, report.ack_wait)
            .await
            .unwrap_or(false);
    print_reported(session, event, seq, acknowledged, report.json)?;
    Ok(ExitCode::SUCCESS)
}

/// `session disconnected` (`away`) and `session reconnected`.
async fn presence(cli: &Cli, session: &str, away: bool) -> anyhow::Result<ExitCode> {
    let session = SessionId::new(session).context("session")?;
    let mut client = LocalClient::connect(&socket_path(cli)?).await?;
    client.session_presence(session.clone(), away).await?;
    if away {
        println!("session {session}: user disconnected, session retained");
    } else {
        println!("session {session}: user reconnected");
    }
    Ok(ExitCode::SUCCESS)
}

/// `session idle`: idle since `--since` (default: now).
async fn idle(cli: &Cli, session: &str, since: Option<Since>) -> anyhow::Result<ExitCode> {
    let session = SessionId::new(session).context("session")?;
    let since = since.map(|s| match s {
        Since::At(ms) => UnixMillis(ms),
        Since::Ago(d) => {
            let ago = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            UnixMillis(ferry_agent::clock::now().0.saturating_sub(ago))
        }
    });
    let mut client = LocalClient::connect(&socket_path(cli)?).await?;
    client
        .session_idleness(session.clone(), Some(since))
        .await?;
    println!("session {session}: idle");
    Ok(ExitCode::SUCCESS)
}

/// `session active`: user input again.
async fn active(cli: &Cli, session: &str) -> anyhow::Result<ExitCode> {
    let session = SessionId::new(session).context("session")?;
    let mut client = LocalClient::connect(&socket_path(cli)?).await?;
    client.session_idleness(session.clone(), None).await?;
    println!("session {session}: active");
    Ok(ExitCode::SUCCESS)
}

/// How long a PAM step waits for the agent: a stuck agent fails logins
/// rather than hanging them.
const PAM_TIMEOUT: Duration = Duration::from_secs(15);

/// `pam`: what PAM's environment describes, within [`PAM_TIMEOUT`].
async fn pam_event(cli: &Cli, require_ticket: bool) -> anyhow::Result<ExitCode> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let ppid = std::os::unix::process::parent_id();
    let action = pam::action_from_env(&env, ppid)?;
    tokio::time::timeout(PAM_TIMEOUT, pam_step(cli, action, require_ticket))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the agent did not answer within {}s: the PAM step fails",
                PAM_TIMEOUT.as_secs()
            )
        })?
}

/// A refusal the PAM step reports and fails with (exit 1).
fn pam_refused(what: &str, message: &str) -> ExitCode {
    tracing::warn!("PAM {what} refused: {message}");
    eprintln!("ferry-agent pam: {what} refused: {message}");
    ExitCode::FAILURE
}

async fn pam_step(cli: &Cli, action: PamAction, require_ticket: bool) -> anyhow::Result<ExitCode> {
    let connect = || async { anyhow::Ok(LocalClient::connect(&socket_path(cli)?).await?) };
    match action {
        PamAction::Ignore => Ok(ExitCode::SUCCESS),
        PamAction::Auth { service, user } => {
            let ticket = tokio::task::spawn_blocking(read_authtok)
                .await
                .context("read the password")??;
            let Some(ticket) = ticket else {
                return Ok(pam_refused(
                    "login",
                    "no ticket on standard input (the auth line needs pam_exec's expose_authtok)",
                ));
            };
            let mut client = connect().await?;
            match client.pam_auth(service, user.clone(), ticket).await {
                Ok(info) => {
                    tracing::info!(%user, session = %info.session, "PAM login: ticket accepted");
                    Ok(ExitCode::SUCCESS)
                }
                Err(LocalError::Refused { message, .. }) => Ok(pam_refused("login", &message)),
                Err(e) => Err(e.into()),
            }
        }
        PamAction::Start {
            service,
            session,
            user,
        } => {
            let mut client = connect().await?;
            match client.pam_session(true, service, user.clone()).await {
                Ok(r) => {
                    tracing::info!(session = %r.session, others = r.others, "PAM session opened");
                    Ok(ExitCode::SUCCESS)
                }
                Err(LocalError::Refused {
                    code: ErrorCode::NotVerified,
                    message,
                }) if require_ticket => Ok(pam_refused("session", &message)),
                Err(LocalError::Refused {
                    code: ErrorCode::NotVerified,
                    ..
                }) => {
                    // No ticket login before it: reported as trusted, as
                    // PAM mode did before ticket logins.
                    let seq = client
                        .session_start(session.clone(), user, StartProof::Trusted)
                        .await?;
                    tracing::info!(%session, seq, "PAM session without a ticket recorded");
                    Ok(ExitCode::SUCCESS)
                }
                Err(LocalError::Refused { message, .. }) => Ok(pam_refused("session", &message)),
                Err(e) => Err(e.into()),
            }
        }
        PamAction::End {
            service,
            session,
            user,
            reason,
        } => {
            let mut client = connect().await?;
            if let Some(user) = user {
                match client.pam_session(false, service, user).await {
                    Ok(r) => {
                        tracing::info!(session = %r.session, others = r.others, "PAM session closed");
                        return Ok(ExitCode::SUCCESS);
                    }
                    Err(LocalError::Refused {
                        code: ErrorCode::UnknownSession,
                        message,
                    }) if require_ticket => return Ok(pam_refused("session close", &message)),
                    Err(LocalError::Refused {
                        code: ErrorCode::UnknownSession,
                        ..
                    }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let seq = client.session_end(session.clone(), reason).await?;
            tracing::info!(%session, seq, "PAM session without a ticket ended");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The password `pam_exec` writes to standard input with `expose_authtok`:
/// `None` when there is none (or it cannot be a ticket).
fn read_authtok() -> anyhow::Result<Option<String>> {
    use std::io::Read;
    let max = ferry_common::limits::MAX_TICKET_LEN;
    let mut bytes = Vec::with_capacity(max + 2);
    std::io::stdin()
        .take(u64::try_from(max).unwrap_or(u64::MAX) + 2)
        .read_to_end(&mut bytes)
        .context("read the password from standard input")?;
    Ok(pam::ticket_from_authtok(&bytes, max))
}

/// `ticket verify`: exit 0 with the ticket's facts, exit 1 with the reason
/// it was refused.
async fn verify_ticket(cli: &Cli, ticket: &str, json: bool) -> anyhow::Result<ExitCode> {
    let socket = socket_path(cli)?;
    let mut client = LocalClient::connect(&socket).await?;
    match client.verify_ticket(ticket.to_owned()).await {
        Ok(t) => {
            print_ticket(&t, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(LocalError::Refused { code, message }) => {
            if json {
                let v = serde_json::json!({
                    "valid": false,
                    "reason": ticket_reason(code),
                    "message": message,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                eprintln!(
                    "ferry-agent: ticket refused ({}): {message}",
                    ticket_reason(code)
                );
            }
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}

/// A valid ticket's user, session, group and expiry.
fn print_ticket(t: &TicketInfo, json: bool) -> anyhow::Result<()> {
    if json {
        let v = serde_json::json!({
            "valid": true,
            "ticket_id": t.ticket_id,
            "user": t.user,
            "session": t.session,
            "group": t.group,
            "expires_at": rfc3339(t.expires_at, SecondsFormat::Millis),
            "expires_at_ms": t.expires_at.0,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("user        {}", t.user);
        println!("session     {}", t.session);
        println!("group       {}", t.group);
        println!("expires_at  {}", rfc3339(t.expires_at, SecondsFormat::Secs));
    }
    Ok(())
}

/// `status`: the link and spool, now or once synced (`--wait-synced`).
async fn status(
    cli: &Cli,
    json: bool,
    wait_synced: bool,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let socket = socket_path(cli)?;
    let mut client = LocalClient::connect(&socket).await?;
    let status = if wait_synced {
        client.wait_synced(timeout).await?
    } else {
        client.status().await?
    };
    print_status(&status, json)?;
    Ok(ExitCode::SUCCESS)
}

/// What `session start|end` print: the event is durable either way; the
/// broker has it too when `acknowledged`.
fn print_reported(
    session: &SessionId,
    event: &str,
    seq: u64,
    acknowledged: bool,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let v = serde_json::json!({
            "session": session.as_str(),
            "event": event,
            "seq": seq,
            "acknowledged": acknowledged,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if acknowledged {
        println!("session {session} {event}: recorded by the broker (seq {seq})");
    } else {
        println!(
            "session {session} {event}: spooled (seq {seq}): the broker has not acknowledged it \
             yet; it will be sent when the link is up"
        );
    }
    Ok(())
}

/// A time as RFC 3339 UTC (`2026-12-01T02:00:00Z` for people, with
/// milliseconds in JSON), like every time `ferryctl` prints.
fn rfc3339(t: UnixMillis, format: SecondsFormat) -> String {
    let t = match format {
        SecondsFormat::Secs => UnixMillis(t.0.div_euclid(1000) * 1000),
        _ => t,
    };
    DateTime::<Utc>::from_timestamp_millis(t.0)
        .map(|d| d.to_rfc3339_opts(format, true))
        .unwrap_or_else(|| format!("@{}ms", t.0))
}

/// The refusal reason of a ticket, as printed.
fn ticket_reason(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::TicketMalformed => "malformed",
        ErrorCode::TicketForged => "forged",
        ErrorCode::TicketExpired => "expired",
        ErrorCode::TicketOtherHost => "other-host",
        ErrorCode::TicketReused => "reused",
        ErrorCode::NoTicketKey => "no-key",
        _ => "error",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_unix_millis_or_a_duration_ago() {
        assert!(matches!(
            parse_since("1700000000000"),
            Ok(Since::At(1_700_000_000_000))
        ));
        assert!(matches!(parse_since("90s"), Ok(Since::Ago(d)) if d == Duration::from_secs(90)));
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("").is_err());
        assert!(parse_since("99999999999999999999").is_err());
    }
}
