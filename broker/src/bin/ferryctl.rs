//! `ferryctl`: the operator's CLI. Talks to the broker's admin socket; also
//! manages the PKI files and runs scenario simulations offline.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_broker::admin::{self, ADMIN_SOCKET_ENV, DEFAULT_ADMIN_SOCKET};
use ferry_broker::{pki, render};
use ferry_common::admin::{
    AdminRequestV1, AdminResponseV1, BillingSpec, GroupFilter, GroupSpec, ImageUpdateSpec,
    OtaOfferSpec, OtaScheduleSpec, PolicySpec, Secret, SessionType, UsageQuery, UserSpec,
};
use ferry_common::admin::{
    DisplayPolicySpec, PeriodSpec, PolicyLimit, PolicyPartsSpec, SessionPolicySpec,
};
use ferry_common::duration::parse_duration;
use ferry_common::limits::MAX_ADMIN_FRAME_LEN;
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis, UserId};

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
        /// table, csv or json (`--json` means json too).
        #[arg(long, default_value = "table")]
        format: String,
    },
}

#[derive(Subcommand)]
enum OtaCmd {
    /// Offer an update to a group (agent, image, or a component or application).
    Offer {
        group: String,
        /// `agent`, `image`, or the component's or application's name.
        #[arg(long)]
        component: String,
        /// The version it installs.
        #[arg(long)]
        version: String,
        /// Path or URL handed to the hosts' update hook.
        #[arg(long, default_value = "")]
        package: String,
        /// What it brings.
        #[arg(long)]
        description: String,
    },
    /// Offered updates (`update N`) and the schedules rolling them out
    /// (`schedule N`, with their state, start, wave and drain).
    List {
        /// Only this group's.
        #[arg(long)]
        group: Option<String>,
    },
    /// Schedule an offered update's rollout (start in the future, within 7
    /// days); prints the new schedule's own id.
    Schedule {
        group: String,
        /// The offered update's id (`update N` in `ota list`).
        #[arg(long)]
        update: u64,
        /// Start, RFC 3339.
        #[arg(long)]
        start: String,
        /// Resources updated at once.
        #[arg(long, default_value_t = 1)]
        wave: u32,
        /// How long sessions of a draining resource may go on (e.g. 30m).
        #[arg(long, default_value = "30m", value_parser = parse_duration)]
        drain: std::time::Duration,
    },
    /// Move a schedule's start (before it starts).
    Reschedule {
        /// The schedule's id (`schedule N` in `ota list`), not the update's.
        schedule: u64,
        /// New start, RFC 3339.
        #[arg(long)]
        start: String,
    },
    /// Cancel a schedule (before it starts).
    Cancel {
        /// The schedule's id (`schedule N` in `ota list`), not the update's.
        schedule: u64,
    },
    /// Every OTA of a group with each resource's outcome.
    History { group: String },
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

/// A mistake in the command line (a bad flag value, a missing
/// confirmation): exit [`EXIT_USAGE`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// The flag values of one command, parsed with every bad one collected, so
/// one run reports them all (as the broker does for a policy).
#[derive(Default)]
struct Flags {
    problems: Vec<String>,
}

impl Flags {
    /// `r`'s value, or `None` with the problem recorded against `--flag`.
    fn check<T, E: std::fmt::Display>(
        &mut self,
        flag: &str,
        text: &str,
        r: Result<T, E>,
    ) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                let e = e.to_string();
                // Messages that quote the value already need no second copy.
                if e.contains(&format!("{text:?}")) {
                    self.problems.push(format!("--{flag}: {e}"));
                } else {
                    self.problems.push(format!("--{flag} {text:?}: {e}"));
                }
                None
            }
        }
    }

    fn number(&mut self, flag: &str, v: Option<String>) -> Option<u32> {
        let v = v?;
        let r = v
            .trim()
            .parse::<u32>()
            .map_err(|_| "not a whole number (0 or more)");
        self.check(flag, &v, r)
    }

    fn duration_ms(&mut self, flag: &str, v: Option<String>) -> Option<u64> {
        let v = v?;
        let r = parse_duration(&v).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.check(flag, &v, r)
    }

    fn limit(&mut self, flag: &str, v: Option<String>, word: &str) -> Option<PolicyLimit> {
        let v = v?;
        let r = ferry_broker::groups::policy_parts::parse_limit(&v, word);
        self.check(flag, &v, r)
    }

    fn problem(&mut self, message: String) {
        self.problems.push(message);
    }

    /// `Err(Usage)` listing every problem, one a line.
    fn finish(self) -> anyhow::Result<()> {
        match self.problems.as_slice() {
            [] => Ok(()),
            [one] => Err(Usage(one.clone()).into()),
            many => Err(Usage(format!(
                "{} flag values are invalid:\n  {}",
                many.len(),
                many.join("\n  ")
            ))
            .into()),
        }
    }
}

/// Scaling-policy parameters (SPEC section 4); durations like 90s, 1h.
#[derive(clap::Args, Default)]
struct PolicyArgs {
    /// (A) Sessions one resource takes at once.
    #[arg(long, value_name = "N")]
    concurrent_sessions: Option<String>,
    /// (B) Scale out above this percent of capacity (1..=100).
    #[arg(long, value_name = "PERCENT")]
    usage_threshold: Option<String>,
    /// (C) Elastic resources created per scale-out.
    #[arg(long, value_name = "N")]
    scale_out_step: Option<String>,
    /// (D) Most elastic resources.
    #[arg(long, value_name = "N")]
    max_elastic: Option<String>,
    /// (E) Idle time before an elastic resource may be scaled in (above
    /// zero, e.g. 60m).
    #[arg(long, value_name = "DURATION")]
    max_idle: Option<String>,
    /// Least time between two scale-ins (default 60s).
    #[arg(long, value_name = "DURATION")]
    scale_in_cooldown: Option<String>,
    /// How long a routing request may wait for room (default 0).
    #[arg(long, value_name = "DURATION")]
    wait_timeout: Option<String>,
    /// breadth-first (default) or depth-first.
    #[arg(long)]
    load_balancing: Option<String>,
}

impl PolicyArgs {
    fn into_spec(self, flags: &mut Flags) -> PolicySpec {
        let max_idle_ms = flags.duration_ms("max-idle", self.max_idle);
        PolicySpec {
            concurrent_sessions: flags.number("concurrent-sessions", self.concurrent_sessions),
            usage_threshold: flags.number("usage-threshold", self.usage_threshold),
            scale_out_step: flags.number("scale-out-step", self.scale_out_step),
            max_elastic: flags.number("max-elastic", self.max_elastic),
            max_idle_ms,
            scale_in_cooldown_ms: flags.duration_ms("scale-in-cooldown", self.scale_in_cooldown),
            wait_timeout_ms: flags.duration_ms("wait-timeout", self.wait_timeout),
            load_balancing: self.load_balancing,
        }
    }
}

/// The policy parts beside scaling (SPEC section 4): session, display and
/// periods. Unset ones keep their value (the default at publish).
#[derive(clap::Args, Default)]
struct PolicyPartsArgs {
    /// How long a disconnected session is kept for its user: 3m..300m, or
    /// `forever` (or -1). Default 15m.
    #[arg(long, allow_hyphen_values = true)]
    disconnect_retention: Option<String>,
    /// Longest a session may last (users are warned 5 minutes before), or
    /// `none` (default).
    #[arg(long)]
    max_session_duration: Option<String>,
    /// Disconnect a session idle this long, or `none` (default).
    #[arg(long)]
    idle_disconnect: Option<String>,
    /// Frames per second, 1..=60 (default 30).
    #[arg(long, value_name = "FPS")]
    frame_rate: Option<String>,
    /// Session resolution WIDTHxHEIGHT, even, 640x480..7680x4320 (default 1920x1080).
    #[arg(long)]
    resolution: Option<String>,
    /// on: the resolution is a maximum, sessions follow the client's window (default on).
    #[arg(long)]
    adaptive_resolution: Option<String>,
    /// video (default) or mixed.
    #[arg(long)]
    streaming_mode: Option<String>,
    /// Quality strategy: adaptive (default), smooth or quality.
    #[arg(long)]
    quality: Option<String>,
    /// A policy period, UTC: 'DAYS HH:MM-HH:MM min=N [warm-up=D]', e.g.
    /// 'mon-fri 09:00-18:00 min=2 warm-up=15m'; repeatable; replaces the
    /// group's periods.
    #[arg(long = "period")]
    periods: Vec<String>,
    /// Remove every policy period.
    #[arg(long, conflicts_with = "periods")]
    clear_periods: bool,
}

impl PolicyPartsArgs {
    fn into_spec(self, flags: &mut Flags) -> PolicyPartsSpec {
        use ferry_broker::groups::policy_parts::{parse_on_off, parse_period, parse_resolution};
        let periods = if self.clear_periods {
            Some(Vec::new())
        } else if self.periods.is_empty() {
            None
        } else {
            let parsed: Vec<Option<PeriodSpec>> = self
                .periods
                .iter()
                .map(|p| flags.check("period", p, parse_period(p)))
                .collect();
            parsed.into_iter().collect::<Option<Vec<_>>>()
        };
        PolicyPartsSpec {
            session: SessionPolicySpec {
                disconnect_retention: flags.limit(
                    "disconnect-retention",
                    self.disconnect_retention,
                    "forever",
                ),
                max_session_duration: flags.limit(
                    "max-session-duration",
                    self.max_session_duration,
                    "none",
                ),
                idle_disconnect: flags.limit("idle-disconnect", self.idle_disconnect, "none"),
            },
            display: DisplayPolicySpec {
                frame_rate: flags.number("frame-rate", self.frame_rate),
                resolution: self
                    .resolution
                    .and_then(|r| flags.check("resolution", &r, parse_resolution(&r))),
                adaptive_resolution: self
                    .adaptive_resolution
                    .and_then(|a| flags.check("adaptive-resolution", &a, parse_on_off(&a))),
                streaming_mode: self.streaming_mode,
                quality_strategy: self.quality,
            },
            periods,
        }
    }
}

// Parsed once per run and boxed in `Cmd`: the size of `Publish` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum GroupCmd {
    /// Publish a delivery group.
    Publish {
        /// Unique name; generated (REGION-SPEC-N) when absent.
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        region: String,
        #[arg(long)]
        office_network: String,
        /// Spec from the catalog, e.g. office-4c8g.
        #[arg(long)]
        spec: String,
        #[arg(long)]
        image: String,
        /// subscription or pay-as-you-go.
        #[arg(long)]
        billing: String,
        /// Subscription duration: Nw, Nmo or Ny.
        #[arg(long)]
        duration: Option<String>,
        /// Renew the subscription by itself at the end of each period.
        #[arg(long)]
        auto_renew: bool,
        #[arg(long, value_name = "N")]
        base_resources: String,
        /// independent or shared.
        #[arg(long, default_value = "independent")]
        session_type: String,
        /// An assigned user; repeatable.
        #[arg(long = "user")]
        users: Vec<String>,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        parts: PolicyPartsArgs,
    },
    /// Groups, filtered by status, name (substring) or id.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        id: Option<String>,
    },
    /// One group by name or id.
    Show { group: String },
    /// Change policy parameters (the others stay).
    UpdatePolicy {
        group: String,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        parts: PolicyPartsArgs,
    },
    /// Assign (--add) and unassign (--remove) users.
    UpdateUsers {
        group: String,
        #[arg(long)]
        add: Vec<String>,
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Extend a subscription (writes an order).
    Renew {
        group: String,
        #[arg(long)]
        duration: String,
    },
    /// Turn auto-renew on or off.
    SetAutoRenew { group: String, state: String },
    /// The billing system says a published pay-as-you-go group's account is
    /// in arrears: no new sessions, no scale-out; open sessions go on.
    SetPaymentOverdue { group: String },
    /// The arrears are paid: the group is published again.
    ClearPaymentOverdue { group: String },
    /// Move to another region (always refused: regions are fixed at publish).
    SetRegion { group: String, region: String },
    /// Purge a group (subscription: expired; pay-as-you-go: in service).
    /// Asks first on a terminal; elsewhere needs --yes.
    Purge {
        group: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Delete a group (subscription: recycling or publish-failed;
    /// pay-as-you-go: publish-failed). Asks first on a terminal; elsewhere
    /// needs --yes.
    Delete {
        group: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// The group's recorded decisions with their reasons.
    Events { group: String },
    /// Switch every resource to another image: open sessions are warned,
    /// disconnected after --warning, then each host switches (status
    /// `updating`, then `published` or `update-failed`).
    UpdateImage {
        group: String,
        image: String,
        /// Time users get between the warning and the disconnect.
        #[arg(long, default_value = "5m", value_parser = parse_ttl)]
        warning: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create one user; with a password (never on the command line) the
    /// user can be routed at once.
    Create {
        #[arg(long)]
        id: String,
        #[arg(long)]
        email: String,
        #[arg(long)]
        mobile: String,
        #[command(flatten)]
        password: PasswordSource,
    },
    /// Create or update users from a CSV file (header id,email,mobile); all or
    /// nothing. Passwords are not imported: a user without one cannot be
    /// routed until `user set-password` (or `user token`).
    Import { file: PathBuf },
    /// Every user.
    List,
    /// Set or replace a user's password (stored as a salted Argon2id hash).
    SetPassword {
        /// The user id.
        name: String,
        #[command(flatten)]
        password: PasswordSource,
    },
    /// Issue a token the user presents instead of a password; printed once.
    Token {
        /// The user id.
        name: String,
        /// How long the token is valid (e.g. 8h, 30d; at most 90d).
        #[arg(long, default_value = "8h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
    },
    /// Invalidate every token of the user issued so far.
    RevokeTokens {
        /// The user id.
        name: String,
    },
}

/// Where a password comes from: never the command line (it would show in
/// `ps` and shell history).
#[derive(clap::Args)]
#[group(multiple = false)]
struct PasswordSource {
    /// Read the password from this file (its first line).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Read the password from standard input (its first line).
    #[arg(long)]
    password_stdin: bool,
}

impl PasswordSource {
    /// The password, if one was asked for: one line, without its line end,
    /// at most `MAX_PASSWORD_LEN` bytes.
    fn read(&self) -> anyhow::Result<Option<String>> {
        use std::io::Read;
        let limit = ferry_common::limits::MAX_PASSWORD_LEN;
        let mut bytes = Vec::new();
        if let Some(f) = &self.password_file {
            std::fs::File::open(f)
                .and_then(|file| file.take(limit as u64 + 3).read_to_end(&mut bytes))
                .with_context(|| format!("read {}", f.display()))?;
        } else if self.password_stdin {
            std::io::stdin()
                .take(limit as u64 + 3)
                .read_to_end(&mut bytes)
                .context("read the password from standard input")?;
        } else {
            return Ok(None);
        }
        let text = String::from_utf8(bytes).context("the password is not UTF-8")?;
        let line = text.lines().next().unwrap_or("").to_owned();
        if line.is_empty() {
            anyhow::bail!("the password is empty");
        }
        // The broker refuses it too; saying so here spares a round trip.
        let min = ferry_common::limits::MIN_PASSWORD_CHARS;
        let chars = line.chars().count();
        if chars < min {
            return Err(Usage(format!(
                "the password has {chars} characters; a password needs at least {min} \
                 characters (a longer phrase is better)"
            ))
            .into());
        }
        if line.len() > limit {
            anyhow::bail!("the password is longer than {limit} bytes");
        }
        Ok(Some(line))
    }

    fn require(&self) -> anyhow::Result<String> {
        self.read()?
            .ok_or_else(|| anyhow::anyhow!("give --password-file FILE or --password-stdin"))
    }
}

fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    ferry_common::duration::parse_duration(s).map_err(|e| e.to_string())
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
    /// Issue a certificate and key for one host. Replacing an existing key
    /// asks first on a terminal; elsewhere it needs --yes.
    IssueAgent {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        resource: String,
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing key in --out without asking.
        #[arg(long, short = 'y')]
        yes: bool,
    },
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
            print!("{out}");
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
    // A bad id on the command line is a usage error too.
    if e.downcast_ref::<Usage>().is_some()
        || e.downcast_ref::<ferry_common::ids::IdError>().is_some()
    {
        ExitCode::from(EXIT_USAGE)
    } else {
        ExitCode::from(EXIT_ERROR)
    }
}

fn run(cli: Cli) -> anyhow::Result<String> {
    let json = cli.json;
    // `group show` adds what each resource runs and the updates running or
    // scheduled (a second request).
    let versions_of = match &cli.command {
        Cmd::Group(g) => match g.as_ref() {
            GroupCmd::Show { group } => Some(group.clone()),
            _ => None,
        },
        _ => None,
    };
    let req = match cli.command {
        Cmd::Pki(PkiCmd::Init { dir, broker_names }) => {
            pki::init(&dir, &broker_names).context("pki init")?;
            // The broker would create them at its first start; now they
            // exist with the rest of the PKI (and its owner).
            ferry_broker::tickets::TicketSigner::load_or_create(&dir).context("ticket key")?;
            ferry_broker::tickets::TokenKey::load_or_create(&dir).context("token key")?;
            let files = [
                ("ca_cert", dir.join(pki::CA_CERT), true),
                ("ca_key", dir.join(pki::CA_KEY), false),
                ("broker_cert", dir.join(pki::BROKER_CERT), true),
                ("broker_key", dir.join(pki::BROKER_KEY), false),
            ];
            return pki_output(
                json,
                &format!("created CA and broker certificate in {}", dir.display()),
                &files,
            );
        }
        Cmd::Pki(PkiCmd::IssueAgent {
            dir,
            resource,
            out,
            yes,
        }) => {
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
            pki::issue_agent(&dir, &resource, &out).context("pki issue-agent")?;
            let files = [
                ("cert", out.join(pki::AGENT_CERT), true),
                ("key", out.join(pki::AGENT_KEY), false),
                ("ca_cert", out.join(pki::CA_CERT), true),
            ];
            return pki_output(
                json,
                &format!("issued certificate for {resource} in {}", out.display()),
                &files,
            );
        }
        Cmd::Simulate { file } => {
            let mut out = ferry_broker::simulate::run_cli(&file, json)?;
            if !out.ends_with('\n') {
                out.push('\n');
            }
            return Ok(out);
        }
        Cmd::Usage {
            group,
            from,
            to,
            format,
        } => {
            let format = if json { "json".to_string() } else { format };
            if !["table", "csv", "json"].contains(&format.as_str()) {
                return Err(Usage(format!(
                    "--format must be table, csv or json, not {format:?}"
                ))
                .into());
            }
            let query = UsageQuery {
                group: group.map(|g| g.parse::<GroupName>()).transpose()?,
                from: time(&from).context("--from")?,
                to: time(&to).context("--to")?,
            };
            if query.to <= query.from {
                return Err(Usage(format!(
                    "--to {} must be after --from {}",
                    render::rfc3339_secs(query.to),
                    render::rfc3339_secs(query.from)
                ))
                .into());
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("start runtime")?;
            let resp = runtime.block_on(admin::request(
                &cli.socket,
                AdminRequestV1::UsageDetailed(query),
            ))?;
            return match resp {
                AdminResponseV1::UsageDetailed(d) => Ok(match format.as_str() {
                    "csv" => {
                        // CSV rows have no room for it: a period still
                        // running is said on stderr.
                        if let Some(note) = render::usage_so_far(&d) {
                            eprintln!("ferryctl: {note}");
                        }
                        render::usage_csv(&d.report)
                    }
                    "json" => format!("{:#}\n", render::usage_detail_json(&d)),
                    _ => render::usage_detail_table(&d),
                }),
                other => Ok(show(other, json)),
            };
        }
        Cmd::Ota(cmd) => ota_request(cmd)?,
        Cmd::Status => AdminRequestV1::Status,
        Cmd::Resources(ResourcesCmd::List) => AdminRequestV1::ListResources,
        Cmd::Resources(ResourcesCmd::Drain { resource }) => AdminRequestV1::Drain {
            resource: resource.parse()?,
        },
        Cmd::Resources(ResourcesCmd::Undrain { resource }) => AdminRequestV1::Undrain {
            resource: resource.parse()?,
        },
        Cmd::Sessions(SessionsCmd::List { all }) => AdminRequestV1::ListSessionsDetailed { all },
        Cmd::Sessions(SessionsCmd::Disconnect { session }) => AdminRequestV1::DisconnectSession {
            session: session.parse::<SessionId>()?,
        },
        Cmd::Group(cmd) => {
            if let GroupCmd::Purge { group, yes: false } | GroupCmd::Delete { group, yes: false } =
                cmd.as_ref()
            {
                let verb = match cmd.as_ref() {
                    GroupCmd::Purge { .. } => "purge",
                    _ => "delete",
                };
                confirm_removal(&cli.socket, verb, group)?;
            }
            group_request(*cmd)?
        }
        Cmd::User(UserCmd::Create {
            id,
            email,
            mobile,
            password,
        }) => {
            let user = UserSpec {
                id: id.parse()?,
                email,
                mobile,
            };
            match password.read()? {
                Some(p) => AdminRequestV1::UserCreateWithPassword {
                    user,
                    password: Secret(p),
                },
                None => AdminRequestV1::UserCreate(user),
            }
        }
        Cmd::User(UserCmd::SetPassword { name, password }) => AdminRequestV1::UserSetPassword {
            user: name.parse()?,
            password: Secret(password.require()?),
        },
        Cmd::User(UserCmd::Token { name, ttl }) => AdminRequestV1::UserToken {
            user: name.parse()?,
            ttl_secs: ttl.as_secs(),
        },
        Cmd::User(UserCmd::RevokeTokens { name }) => AdminRequestV1::UserRevokeTokens {
            user: name.parse()?,
        },
        Cmd::User(UserCmd::Import { file }) => {
            let meta =
                std::fs::metadata(&file).with_context(|| format!("read {}", file.display()))?;
            // The whole file travels in one admin frame; refuse before reading more.
            if meta.len() > (MAX_ADMIN_FRAME_LEN / 2) as u64 {
                anyhow::bail!(
                    "{} is larger than {} bytes; split it",
                    file.display(),
                    MAX_ADMIN_FRAME_LEN / 2
                );
            }
            let bytes = std::fs::read(&file).with_context(|| format!("read {}", file.display()))?;
            let csv = String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not UTF-8 text (byte {} is not); save it as \"CSV UTF-8\"",
                    file.display(),
                    e.utf8_error().valid_up_to() + 1
                )
            })?;
            AdminRequestV1::UserImport { csv }
        }
        Cmd::User(UserCmd::List) => AdminRequestV1::UserListDetailed,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    let resp = runtime.block_on(admin::request(&cli.socket, req))?;
    let out = show(resp, json);
    match versions_of {
        Some(group) => {
            let req = AdminRequestV1::GroupRollouts {
                group: group.parse()?,
            };
            // A broker that cannot answer it (older, or the group went
            // away meanwhile) still gets its `group show` printed.
            match runtime.block_on(admin::request(&cli.socket, req)) {
                Ok(AdminResponseV1::GroupRollouts(r)) if json => {
                    let mut value: serde_json::Value =
                        serde_json::from_str(&out).context("group show's JSON")?;
                    value["versions"] = render::group_versions_json(&r.versions);
                    value["rollouts"] = ferry_broker::ota::render::rollouts_json(&r.rollouts);
                    Ok(format!("{value:#}\n"))
                }
                Ok(AdminResponseV1::GroupRollouts(r)) => Ok(out
                    + &render::group_versions_table(&r.versions)
                    + &ferry_broker::ota::render::rollouts_table(&r.rollouts)),
                _ => Ok(out),
            }
        }
        None => Ok(out),
    }
}

/// What `pki init` / `pki issue-agent` wrote: each file's path and, for
/// certificates, its SHA-256 fingerprint; as JSON (`{"message", "files":
/// {NAME: {"path", "fingerprint_sha256"}}}`) or as lines.
fn pki_output(
    json: bool,
    message: &str,
    files: &[(&str, PathBuf, bool)],
) -> anyhow::Result<String> {
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

/// Asks `question` on the terminal and goes on only on `y` or `yes`. Without
/// a terminal on standard input it refuses (a usage error) and says to add
/// `--yes`: a script must say so.
fn confirm(question: &str, command: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Err(Usage(format!(
            "{command} asks for confirmation and standard input is not a terminal: add --yes \
             to go ahead ({question})"
        ))
        .into());
    }
    let stdin = std::io::stdin();
    let yes =
        ask(question, &mut stdin.lock(), &mut std::io::stderr()).context("read the answer")?;
    if yes {
        Ok(())
    } else {
        anyhow::bail!("{command}: not confirmed; nothing was changed")
    }
}

/// Writes `question [y/N] ` to `out`, reads one line from `input`: true on
/// `y` or `yes` (any case), false on anything else or end of input.
fn ask(
    question: &str,
    input: &mut impl std::io::BufRead,
    out: &mut impl std::io::Write,
) -> std::io::Result<bool> {
    write!(out, "{question} [y/N] ")?;
    out.flush()?;
    let mut line = String::new();
    input.read_line(&mut line)?;
    Ok(matches!(
        line.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// `group purge` / `group delete` without `--yes`: says what would be
/// removed (`purge group design (pay-as-you-go, published, 2 resources)?`)
/// and asks.
fn confirm_removal(socket: &std::path::Path, verb: &str, group: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let command = format!("group {verb}");
    if !std::io::stdin().is_terminal() {
        // Refused before the broker is asked anything.
        return confirm(&format!("{verb} group {group}?"), &command);
    }
    let req = AdminRequestV1::GroupShow {
        group: group.parse()?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    let question = match runtime.block_on(admin::request(socket, req))? {
        AdminResponseV1::GroupShown { detail, .. } => removal_question(verb, &detail),
        _ => format!("{verb} group {group}?"),
    };
    confirm(&question, &command)
}

/// `purge group design (pay-as-you-go, published, 2 resources)?`
fn removal_question(verb: &str, d: &ferry_common::admin::GroupDetail) -> String {
    let n = d.resources.len();
    format!(
        "{verb} group {} ({}, {}, {n} resource{})?",
        d.info.name,
        d.info.billing,
        d.info.status,
        if n == 1 { "" } else { "s" }
    )
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

fn ota_request(cmd: OtaCmd) -> anyhow::Result<AdminRequestV1> {
    Ok(match cmd {
        OtaCmd::Offer {
            group,
            component,
            version,
            package,
            description,
        } => AdminRequestV1::OtaOffer(OtaOfferSpec {
            group: group.parse()?,
            component,
            version,
            package,
            description,
        }),
        OtaCmd::List { group } => AdminRequestV1::OtaListWithSchedules {
            group: group.map(|g| g.parse::<GroupName>()).transpose()?,
        },
        OtaCmd::Schedule {
            group,
            update,
            start,
            wave,
            drain,
        } => AdminRequestV1::OtaSchedule(OtaScheduleSpec {
            group: group.parse()?,
            update,
            start: time(&start).context("--start")?,
            wave,
            drain_ms: u64::try_from(drain.as_millis()).context("--drain")?,
        }),
        OtaCmd::Reschedule { schedule, start } => AdminRequestV1::OtaReschedule {
            schedule,
            start: time(&start).context("--start")?,
        },
        OtaCmd::Cancel { schedule } => AdminRequestV1::OtaCancel { schedule },
        OtaCmd::History { group } => AdminRequestV1::OtaHistory {
            group: group.parse()?,
        },
    })
}

fn users(ids: Vec<String>) -> anyhow::Result<Vec<UserId>> {
    ids.iter().map(|u| Ok(u.parse::<UserId>()?)).collect()
}

fn group_request(cmd: GroupCmd) -> anyhow::Result<AdminRequestV1> {
    let name = |g: String| -> anyhow::Result<GroupName> { Ok(g.parse()?) };
    Ok(match cmd {
        GroupCmd::Publish {
            name: group_name,
            region,
            office_network,
            spec,
            image,
            billing,
            duration,
            auto_renew,
            base_resources,
            session_type,
            users: assigned,
            policy,
            parts,
        } => {
            let mut flags = Flags::default();
            let billing = match (billing.as_str(), duration) {
                ("subscription", Some(duration)) => Some(BillingSpec::Subscription {
                    duration,
                    auto_renew,
                }),
                ("subscription", None) => {
                    flags.problem("--billing subscription needs --duration (Nw, Nmo or Ny)".into());
                    None
                }
                ("pay-as-you-go", None) if !auto_renew => Some(BillingSpec::PayAsYouGo),
                ("pay-as-you-go", _) => {
                    flags.problem("--duration and --auto-renew apply to subscriptions only".into());
                    None
                }
                (other, _) => {
                    flags.problem(format!(
                        "--billing {other:?}: write subscription or pay-as-you-go"
                    ));
                    None
                }
            };
            let session_type = match session_type.as_str() {
                "independent" => Some(SessionType::Independent),
                "shared" => Some(SessionType::Shared),
                other => {
                    flags.problem(format!(
                        "--session-type {other:?}: write independent or shared"
                    ));
                    None
                }
            };
            let base_resources = flags.number("base-resources", Some(base_resources));
            let group_name =
                group_name.and_then(|g| flags.check("name", &g, g.parse::<GroupName>()));
            let assigned: Vec<Option<UserId>> = assigned
                .iter()
                .map(|u| flags.check("user", u, u.parse::<UserId>()))
                .collect();
            let policy = policy.into_spec(&mut flags);
            let parts = parts.into_spec(&mut flags);
            flags.finish()?;
            let (Some(billing), Some(session_type), Some(base_resources)) =
                (billing, session_type, base_resources)
            else {
                anyhow::bail!("unreachable: a bad flag was not reported");
            };
            AdminRequestV1::GroupPublishWithPolicy {
                spec: GroupSpec {
                    name: group_name,
                    region,
                    office_network,
                    spec,
                    image,
                    billing,
                    base_resources,
                    session_type,
                    users: assigned.into_iter().flatten().collect(),
                    policy,
                },
                parts,
            }
        }
        GroupCmd::List { status, name, id } => {
            AdminRequestV1::GroupList(GroupFilter { status, name, id })
        }
        GroupCmd::Show { group } => AdminRequestV1::GroupShowWithPolicy {
            group: name(group)?,
        },
        GroupCmd::UpdatePolicy {
            group,
            policy,
            parts,
        } => {
            let mut flags = Flags::default();
            let policy = policy.into_spec(&mut flags);
            let parts = parts.into_spec(&mut flags);
            flags.finish()?;
            AdminRequestV1::GroupUpdatePolicyParts {
                group: name(group)?,
                policy,
                parts,
            }
        }
        GroupCmd::UpdateUsers { group, add, remove } => AdminRequestV1::GroupUpdateUsers {
            group: name(group)?,
            add: users(add)?,
            remove: users(remove)?,
        },
        GroupCmd::Renew { group, duration } => AdminRequestV1::GroupRenew {
            group: name(group)?,
            duration,
        },
        GroupCmd::SetAutoRenew { group, state } => AdminRequestV1::GroupSetAutoRenew {
            group: name(group)?,
            on: match state.as_str() {
                "on" => true,
                "off" => false,
                other => anyhow::bail!("set-auto-renew {other:?}: write on or off"),
            },
        },
        GroupCmd::SetPaymentOverdue { group } => AdminRequestV1::GroupSetPaymentOverdue {
            group: name(group)?,
        },
        GroupCmd::ClearPaymentOverdue { group } => AdminRequestV1::GroupClearPaymentOverdue {
            group: name(group)?,
        },
        GroupCmd::SetRegion { group, region } => AdminRequestV1::GroupSetRegion {
            group: name(group)?,
            region,
        },
        GroupCmd::Purge { group, .. } => AdminRequestV1::GroupPurge {
            group: name(group)?,
        },
        GroupCmd::Delete { group, .. } => AdminRequestV1::GroupDelete {
            group: name(group)?,
        },
        GroupCmd::Events { group } => AdminRequestV1::GroupEventsDetailed {
            group: name(group)?,
        },
        GroupCmd::UpdateImage {
            group,
            image,
            warning,
        } => AdminRequestV1::GroupUpdateImage(ImageUpdateSpec {
            group: name(group)?,
            image,
            warning_ms: u64::try_from(warning.as_millis()).unwrap_or(u64::MAX),
        }),
    })
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
        AdminResponseV1::Groups(g) => (render::groups_json(&g), render::groups_table(&g)),
        AdminResponseV1::Group(d) => (render::group_json(&d), render::group_table(&d)),
        AdminResponseV1::GroupShown { detail, live } => (
            render::group_shown_json(&detail, live.as_ref()),
            render::group_shown_table(&detail, live.as_ref()),
        ),
        AdminResponseV1::GroupVersions(v) => (
            render::group_versions_json(&v),
            render::group_versions_table(&v),
        ),
        AdminResponseV1::GroupWithPolicy(d) => (
            render::group_policy_json(&d),
            render::group_policy_table(&d),
        ),
        AdminResponseV1::GroupEvents(e) => (
            render::group_events_json(&e),
            render::group_events_table(&e),
        ),
        AdminResponseV1::Users(u) => (render::users_json(&u), render::users_table(&u)),
        AdminResponseV1::Usage(r) => (render::usage_json(&r), render::usage_table(&r)),
        AdminResponseV1::OtaUpdates(u) => (
            ferry_broker::ota::render::updates_json(&u),
            ferry_broker::ota::render::updates_table(&u),
        ),
        AdminResponseV1::OtaSchedules(s) => (
            ferry_broker::ota::render::schedules_json(&s),
            ferry_broker::ota::render::schedules_table(&s),
        ),
        AdminResponseV1::OtaUpdatesAndSchedules { updates, schedules } => (
            ferry_broker::ota::render::list_json(&updates, &schedules),
            ferry_broker::ota::render::list_table(&updates, &schedules),
        ),
        AdminResponseV1::GroupRollouts(r) => {
            let mut value = render::group_versions_json(&r.versions);
            value["rollouts"] = ferry_broker::ota::render::rollouts_json(&r.rollouts);
            (
                value,
                render::group_versions_table(&r.versions)
                    + &ferry_broker::ota::render::rollouts_table(&r.rollouts),
            )
        }
        AdminResponseV1::UserToken {
            user,
            token,
            expires_at,
        } => (
            render::user_token_json(&user, &token, expires_at),
            render::user_token_text(&user, &token, expires_at),
        ),
        AdminResponseV1::UsageDetailed(d) => (
            render::usage_detail_json(&d),
            render::usage_detail_table(&d),
        ),
        AdminResponseV1::SessionsDetailed(s) => (
            render::sessions_detail_json(&s),
            render::sessions_detail_table(&s),
        ),
        AdminResponseV1::UsersDetailed(u) => (
            render::users_detail_json(&u),
            render::users_detail_table(&u),
        ),
        AdminResponseV1::GroupEventsDetailed(e) => (
            render::group_events_detail_json(&e),
            render::group_events_detail_table(&e),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ask_goes_on_only_on_y_or_yes() {
        for (answer, want) in [
            ("y\n", true),
            ("YES\n", true),
            (" yes \r\n", true),
            ("n\n", false),
            ("\n", false),
            ("", false),
            ("yess\n", false),
        ] {
            let mut out = Vec::new();
            let got = ask("purge group g?", &mut answer.as_bytes(), &mut out).expect("ask");
            assert_eq!(got, want, "{answer:?}");
            assert_eq!(String::from_utf8_lossy(&out), "purge group g? [y/N] ");
        }
    }

    #[test]
    fn every_bad_flag_value_is_reported_at_once() {
        let mut flags = Flags::default();
        let parts = PolicyPartsArgs {
            disconnect_retention: Some("xx".into()),
            idle_disconnect: Some("banana".into()),
            frame_rate: Some("fast".into()),
            ..Default::default()
        };
        let policy = PolicyArgs {
            max_idle: Some("soon".into()),
            concurrent_sessions: Some("2".into()),
            ..Default::default()
        };
        let spec = policy.into_spec(&mut flags);
        parts.into_spec(&mut flags);
        assert_eq!(spec.concurrent_sessions, Some(2));
        let err = flags.finish().expect_err("bad values");
        assert!(err.downcast_ref::<Usage>().is_some());
        let text = err.to_string();
        assert!(text.starts_with("4 flag values are invalid:"), "{text}");
        for flag in [
            "--max-idle: invalid duration \"soon\"",
            "--disconnect-retention",
            "--idle-disconnect",
            "--frame-rate \"fast\"",
        ] {
            assert!(text.contains(flag), "{flag} in {text}");
        }
        assert!(
            text.contains("\"xx\"") && text.contains("\"banana\""),
            "{text}"
        );
        assert!(Flags::default().finish().is_ok());
    }
}
