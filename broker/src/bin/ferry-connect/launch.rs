//! `ferry-connect --launch`: after an admission, start the user's client for
//! the host's streaming protocol and hand it the ticket, never on a command
//! line (any user on the machine can read another's in `/proc`).
//!
//! - RDP: `xfreerdp /v:HOST:PORT /u:USER /from-stdin:force EXTRA...` (an
//!   IPv6 host as `[v6]`); the ticket is written as one line to the client's
//!   standard input (a pipe), which is then closed. FreeRDP reads the
//!   password from there with `/from-stdin:force`.
//! - SSH: `ssh -p PORT -o PreferredAuthentications=password,keyboard-interactive
//!   -o NumberOfPasswordPrompts=1 [-o K=V...] -l USER HOST EXTRA...` (an
//!   IPv6 host bare), with `SSH_ASKPASS` naming this very program,
//!   `SSH_ASKPASS_REQUIRE=force` (OpenSSH 8.4 or later) and
//!   [`TICKET_FILE_ENV`] naming a file that holds the ticket: mode 0600,
//!   created new in a fresh directory of mode 0700 under `$XDG_RUNTIME_DIR`
//!   (else the temporary directory). ssh runs `ferry-connect` with its
//!   prompt as the only argument; seeing [`TICKET_FILE_ENV`],
//!   `ferry-connect` answers as askpass ([`askpass`]): it prints the ticket
//!   once and deletes the file, so a second prompt gets nothing. A yes/no
//!   question (an unknown host key) is declined without giving the ticket.
//!   The directory goes when the client exits, whatever happened.
//!
//! The user name the client logs in with is the Ferry user id: the host's
//! PAM check compares the ticket's user with the login name. It is given as
//! `-l USER` to ssh (an id may hold `@` or begin with `-`).
//!
//! `ferry-connect` exits with the client's status (128 + the signal's number
//! if a signal ended it). While the client runs, an interrupt or quit from
//! the terminal (which the client gets too) does not end `ferry-connect`;
//! a hangup or termination is passed on to the client.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::net::Ipv6Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use ferry_common::limits::MAX_TICKET_LEN;
use ferry_common::wire::StreamingProtocol;
use ferry_common::UserId;
use rustix::process::Signal;

/// Longest password RDP carries: the client info's password field holds
/// 512 bytes of UTF-16 with its terminator (MS-RDPBCGR 2.2.1.11.1.1), and
/// xrdp refuses a longer one.
pub const RDP_MAX_PASSWORD: usize = 255;

/// Set in the client's environment to the ticket file's path: a
/// `ferry-connect` started with it answers as ssh's askpass.
pub const TICKET_FILE_ENV: &str = "FERRY_CONNECT_TICKET_FILE";

/// The client run for each protocol unless `--client` names another.
pub fn default_client(protocol: StreamingProtocol) -> &'static str {
    match protocol {
        StreamingProtocol::Rdp => "xfreerdp",
        StreamingProtocol::Ssh => "ssh",
    }
}

/// Why the client could not be started or its answer not given.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("the broker's streaming address {0:?} is not host:port")]
    Address(String),
    #[error(
        "the broker's ticket is not one line of printable text of at most {MAX_TICKET_LEN} bytes"
    )]
    Ticket,
    #[error(
        "the ticket is {0} characters long, and RDP carries passwords of at most \
         {RDP_MAX_PASSWORD}: shorter group, host or user names make shorter tickets"
    )]
    TooLongForRdp(usize),
    #[error("create the ticket file under {}: {source}", dir.display())]
    TicketFile {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("start {}: {source}{hint}", program.to_string_lossy())]
    Start {
        program: OsString,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("wait for {}: {source}", program.to_string_lossy())]
    Wait {
        program: OsString,
        source: std::io::Error,
    },
    #[error("find this program's own path for SSH_ASKPASS: {0}")]
    OwnPath(std::io::Error),
    #[error("handle signals while the client runs: {0}")]
    Signals(std::io::Error),
}

/// A host's streaming server, from an admission's `address`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// A host name or IPv4 address, or an IPv6 address without brackets.
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// Parses `host:port` or `[v6]:port` as the broker sends it. The text
    /// came over the network: the host must be a plain name or address (it
    /// ends up in a client's arguments), never an option.
    pub fn parse(address: &str) -> Result<Endpoint, LaunchError> {
        let bad = || LaunchError::Address(address.chars().take(64).collect());
        let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
        let host = if let Some(inner) = host.strip_prefix('[') {
            let v6 = inner.strip_suffix(']').ok_or_else(bad)?;
            v6.parse::<Ipv6Addr>().map_err(|_| bad())?.to_string()
        } else {
            let ok = !host.is_empty()
                && host.len() <= 253
                && !host.starts_with('-')
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
            if !ok {
                return Err(bad());
            }
            host.to_owned()
        };
        Ok(Endpoint { host, port })
    }

    fn is_v6(&self) -> bool {
        self.host.contains(':')
    }
}

/// What to run: the program, its arguments and environment, and whether
/// the ticket goes to its standard input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCommand {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Added to the inherited environment.
    pub env: Vec<(&'static str, OsString)>,
    /// Write the ticket, one line, to the client's standard input.
    pub ticket_on_stdin: bool,
}

/// `xfreerdp /v:HOST:PORT /u:USER /from-stdin:force EXTRA...`.
pub fn rdp_command(
    program: &OsStr,
    target: &Endpoint,
    user: &UserId,
    extra: &[OsString],
) -> ClientCommand {
    let host = if target.is_v6() {
        format!("[{}]", target.host)
    } else {
        target.host.clone()
    };
    let mut args: Vec<OsString> = vec![
        format!("/v:{host}:{}", target.port).into(),
        format!("/u:{user}").into(),
        "/from-stdin:force".into(),
    ];
    args.extend(extra.iter().cloned());
    ClientCommand {
        program: program.to_owned(),
        args,
        env: Vec::new(),
        ticket_on_stdin: true,
    }
}

/// `ssh -p PORT -o ... [-o K=V...] -l USER HOST EXTRA...`, answered by
/// `askpass` (this program) from `ticket_file`.
pub fn ssh_command(
    program: &OsStr,
    target: &Endpoint,
    user: &UserId,
    options: &[String],
    extra: &[OsString],
    askpass: &Path,
    ticket_file: &Path,
) -> ClientCommand {
    let mut args: Vec<OsString> = vec![
        "-p".into(),
        target.port.to_string().into(),
        "-o".into(),
        "PreferredAuthentications=password,keyboard-interactive".into(),
        "-o".into(),
        "NumberOfPasswordPrompts=1".into(),
    ];
    for o in options {
        args.push("-o".into());
        args.push(o.into());
    }
    args.extend([
        "-l".into(),
        user.as_str().into(),
        target.host.clone().into(),
    ]);
    args.extend(extra.iter().cloned());
    ClientCommand {
        program: program.to_owned(),
        args,
        env: vec![
            ("SSH_ASKPASS", askpass.as_os_str().to_owned()),
            ("SSH_ASKPASS_REQUIRE", "force".into()),
            (TICKET_FILE_ENV, ticket_file.as_os_str().to_owned()),
        ],
        ticket_on_stdin: false,
    }
}

/// Checks `--ssh-option`'s `K=V` (one ssh_config option).
pub fn parse_ssh_option(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((k, _)) if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric()) => {
            Ok(s.to_owned())
        }
        _ => Err(
            "must be KEY=VALUE, an ssh_config option (e.g. StrictHostKeyChecking=accept-new)"
                .into(),
        ),
    }
}

/// Whether `ticket` can be handed on as one line: printable ASCII without
/// spaces, within [`MAX_TICKET_LEN`] (it came from the network).
fn check_ticket(ticket: &str) -> Result<(), LaunchError> {
    if ticket.is_empty()
        || ticket.len() > MAX_TICKET_LEN
        || !ticket.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(LaunchError::Ticket);
    }
    Ok(())
}

/// Where the ticket directory goes: `$XDG_RUNTIME_DIR` when it is a
/// directory (private to the user, in memory), else the temporary directory.
pub fn ticket_base() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() && dir.is_dir() => dir,
        _ => std::env::temp_dir(),
    }
}

/// The ticket in a file of mode 0600 in a fresh directory of mode 0700;
/// both are removed when this is dropped.
#[derive(Debug)]
pub struct TicketFile {
    dir: PathBuf,
    file: PathBuf,
}

impl TicketFile {
    /// Most names tried for the directory before giving up (each is random:
    /// a clash means someone else's directory, never ours to reuse).
    const TRIES: u32 = 8;

    pub fn create(base: &Path, ticket: &str) -> Result<TicketFile, LaunchError> {
        check_ticket(ticket)?;
        let failed = |source| LaunchError::TicketFile {
            dir: base.to_owned(),
            source,
        };
        let mut tries = 0;
        let dir = loop {
            let dir = base.join(format!("ferry-connect-{:016x}", rand::random::<u64>()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => break dir,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < Self::TRIES => {
                    tries += 1;
                }
                Err(e) => return Err(failed(e)),
            }
        };
        let file = dir.join("ticket");
        let made = TicketFile { dir, file };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&made.file)
            .map_err(failed)?;
        f.write_all(ticket.as_bytes()).map_err(failed)?;
        f.sync_all().map_err(failed)?;
        Ok(made)
    }

    pub fn path(&self) -> &Path {
        &self.file
    }

    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TicketFile {
    fn drop(&mut self) {
        // Askpass normally removed the file already.
        let _ = std::fs::remove_file(&self.file);
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("ferry-connect: remove {}: {e}", self.dir.display());
            }
        }
    }
}

/// Why askpass gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum AskpassError {
    #[error("the ticket was given already, or {} is gone: askpass answers once", .0.display())]
    Gone(PathBuf),
    #[error("read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} does not hold a ticket", .0.display())]
    NotTicket(PathBuf),
    #[error("remove {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "declined to answer {0:?} with the ticket (a yes/no question, such as an unknown host \
         key: check the host's key first, or pass --ssh-option StrictHostKeyChecking=accept-new)"
    )]
    Question(String),
}

/// Askpass mode: the ticket in `file`, which is deleted first so that it is
/// given once. `prompt` is ssh's question and `hint` its
/// `SSH_ASKPASS_PROMPT`: a confirmation is declined and leaves the ticket.
pub fn askpass(
    file: &Path,
    prompt: Option<&str>,
    hint: Option<&str>,
) -> Result<String, AskpassError> {
    let question = hint == Some("confirm")
        || prompt.is_some_and(|p| p.contains("(yes/no") || p.contains("yes/no)"));
    if question {
        let shown: String = prompt.unwrap_or_default().chars().take(200).collect();
        return Err(AskpassError::Question(shown));
    }
    let read_failed = |source| AskpassError::Read {
        path: file.to_owned(),
        source,
    };
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(AskpassError::Gone(file.to_owned()))
        }
        Err(e) => return Err(read_failed(e)),
    };
    let mut text = Vec::new();
    f.take(MAX_TICKET_LEN as u64 + 2)
        .read_to_end(&mut text)
        .map_err(read_failed)?;
    // Gone before it is shown: a second prompt never gets it.
    std::fs::remove_file(file).map_err(|source| AskpassError::Remove {
        path: file.to_owned(),
        source,
    })?;
    let text = text.strip_suffix(b"\n").unwrap_or(&text);
    let ticket = std::str::from_utf8(text)
        .ok()
        .filter(|t| check_ticket(t).is_ok())
        .ok_or_else(|| AskpassError::NotTicket(file.to_owned()))?;
    Ok(ticket.to_owned())
}

/// The ticket's way to the client for `protocol`, then the client run:
/// its exit status.
pub async fn launch(
    protocol: StreamingProtocol,
    program: Option<&OsStr>,
    target: &Endpoint,
    user: &UserId,
    ssh_options: &[String],
    extra: &[OsString],
    ticket: &str,
) -> Result<ExitStatus, LaunchError> {
    check_ticket(ticket)?;
    let program = program.unwrap_or_else(|| OsStr::new(default_client(protocol)));
    match protocol {
        StreamingProtocol::Rdp => {
            if ticket.len() > RDP_MAX_PASSWORD {
                return Err(LaunchError::TooLongForRdp(ticket.len()));
            }
            let cmd = rdp_command(program, target, user, extra);
            run_client(&cmd, Some(ticket)).await
        }
        StreamingProtocol::Ssh => {
            let askpass = std::env::current_exe().map_err(LaunchError::OwnPath)?;
            // Removed (with what askpass left) when this returns, however.
            let file = TicketFile::create(&ticket_base(), ticket)?;
            let cmd = ssh_command(
                program,
                target,
                user,
                ssh_options,
                extra,
                &askpass,
                file.path(),
            );
            let status = run_client(&cmd, None).await;
            drop(file);
            status
        }
    }
}

/// Runs the client to its end, writing `stdin_ticket` to its standard
/// input when given; terminal interrupts are left to the client, a hangup
/// or termination is passed on to it.
async fn run_client(
    cmd: &ClientCommand,
    stdin_ticket: Option<&str>,
) -> Result<ExitStatus, LaunchError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut command = tokio::process::Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .stdin(if stdin_ticket.is_some() {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .kill_on_drop(true);
    // Handlers first: from here an interrupt no longer ends this process
    // (which would leave the ticket directory behind).
    let handle = |kind| signal(kind).map_err(LaunchError::Signals);
    let mut interrupt = handle(SignalKind::interrupt())?;
    let mut quit = handle(SignalKind::quit())?;
    let mut terminate = handle(SignalKind::terminate())?;
    let mut hangup = handle(SignalKind::hangup())?;
    let mut child = command.spawn().map_err(|source| LaunchError::Start {
        program: cmd.program.clone(),
        hint: if source.kind() == std::io::ErrorKind::NotFound {
            " (is the client installed and in PATH? --client names another)"
        } else {
            ""
        },
        source,
    })?;
    if let (Some(ticket), Some(mut stdin)) = (stdin_ticket, child.stdin.take()) {
        use tokio::io::AsyncWriteExt;
        let line = format!("{ticket}\n");
        // A client that exits without reading is told by its status.
        let _ = stdin.write_all(line.as_bytes()).await;
        let _ = stdin.shutdown().await;
        drop(stdin);
    }
    let pid = child.id();
    loop {
        // Every arm is cancel-safe.
        tokio::select! {
            status = child.wait() => {
                return status.map_err(|source| LaunchError::Wait {
                    program: cmd.program.clone(),
                    source,
                });
            }
            // The terminal sent it to the client too: it decides.
            _ = interrupt.recv() => {}
            _ = quit.recv() => {}
            _ = terminate.recv() => forward(pid, Signal::TERM),
            _ = hangup.recv() => forward(pid, Signal::HUP),
        }
    }
}

/// Sends `signal` to the client `pid`, if it has not been waited for.
fn forward(pid: Option<u32>, signal: Signal) {
    if let Some(pid) = pid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// The exit code for the client's status: its code, or 128 + the signal
/// that ended it (as a shell says).
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(255),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICKET: &str = "v1.eyJzZWNyZXQiOiJ0aWNrZXQifQ.c2lnbmF0dXJl";

    fn user(s: &str) -> UserId {
        s.parse().expect("user id")
    }

    fn strings(v: &[OsString]) -> Vec<String> {
        v.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn addresses_from_the_broker() {
        let ep = |h: &str, port| Endpoint {
            host: h.into(),
            port,
        };
        assert_eq!(
            Endpoint::parse("h.example:22").ok(),
            Some(ep("h.example", 22))
        );
        assert_eq!(
            Endpoint::parse("10.0.0.7:3389").ok(),
            Some(ep("10.0.0.7", 3389))
        );
        assert_eq!(
            Endpoint::parse("[fd00::7]:22").ok(),
            Some(ep("fd00::7", 22))
        );
        for bad in [
            "h1",
            "h:0",
            "h:70000",
            ":22",
            "-oProxyCommand=x:22",
            "-v:22",
            "a b:22",
            "[fd00::7:22",
            "[not-v6]:22",
            "fd00::7:22",
            "h\n:22",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rdp_gets_the_ticket_on_stdin_and_never_in_argv() {
        let target = Endpoint::parse("rdp.example:3389").expect("address");
        let extra: Vec<OsString> = vec!["/auth-only".into(), "/cert:ignore".into()];
        let cmd = rdp_command(OsStr::new("xfreerdp"), &target, &user("alice"), &extra);
        assert_eq!(cmd.program, "xfreerdp");
        assert_eq!(
            strings(&cmd.args),
            [
                "/v:rdp.example:3389",
                "/u:alice",
                "/from-stdin:force",
                "/auth-only",
                "/cert:ignore"
            ]
        );
        assert!(cmd.ticket_on_stdin);
        assert!(cmd.env.is_empty());
        // IPv6 in brackets.
        let v6 = Endpoint::parse("[fd00::7]:3389").expect("address");
        let cmd = rdp_command(OsStr::new("xfreerdp"), &v6, &user("alice"), &[]);
        assert_eq!(strings(&cmd.args)[0], "/v:[fd00::7]:3389");
    }

    #[test]
    fn ssh_gets_the_ticket_through_askpass_and_never_in_argv() {
        let target = Endpoint::parse("[fd00::7]:2222").expect("address");
        let extra: Vec<OsString> = vec![
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "true".into(),
        ];
        let options = vec!["UserKnownHostsFile=/dev/null".to_owned()];
        let cmd = ssh_command(
            OsStr::new("ssh"),
            &target,
            &user("alice@example.com"),
            &options,
            &extra,
            Path::new("/usr/bin/ferry-connect"),
            Path::new("/run/user/1000/ferry-connect-1/ticket"),
        );
        assert_eq!(
            strings(&cmd.args),
            [
                "-p",
                "2222",
                "-o",
                "PreferredAuthentications=password,keyboard-interactive",
                "-o",
                "NumberOfPasswordPrompts=1",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-l",
                "alice@example.com",
                "fd00::7",
                "-o",
                "StrictHostKeyChecking=no",
                "true"
            ]
        );
        assert!(!cmd.ticket_on_stdin);
        let env: Vec<(&str, String)> = cmd
            .env
            .iter()
            .map(|(k, v)| (*k, v.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            env,
            [
                ("SSH_ASKPASS", "/usr/bin/ferry-connect".to_owned()),
                ("SSH_ASKPASS_REQUIRE", "force".to_owned()),
                (
                    TICKET_FILE_ENV,
                    "/run/user/1000/ferry-connect-1/ticket".to_owned()
                ),
            ]
        );
        for arg in &cmd.args {
            assert!(!arg.to_string_lossy().contains("v1."), "{arg:?}");
        }
    }

    #[test]
    fn ssh_options_are_key_value() {
        assert!(parse_ssh_option("StrictHostKeyChecking=accept-new").is_ok());
        assert!(parse_ssh_option("ProxyCommand=nc %h %p").is_ok());
        assert!(parse_ssh_option("novalue").is_err());
        assert!(parse_ssh_option("=x").is_err());
        assert!(parse_ssh_option("-oX=y").is_err());
    }

    #[test]
    fn the_ticket_file_is_private_answered_once_and_removed_with_its_directory() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().expect("tempdir");
        let file = TicketFile::create(base.path(), TICKET).expect("ticket file");
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(file.dir()), 0o700);
        assert_eq!(mode(file.path()), 0o600);
        assert_eq!(file.dir().parent(), Some(base.path()));

        // A yes/no question does not spend it.
        let q = askpass(
            file.path(),
            Some("Are you sure you want to continue connecting (yes/no/[fingerprint])? "),
            None,
        );
        assert!(matches!(q, Err(AskpassError::Question(_))), "{q:?}");
        assert!(askpass(file.path(), Some("Allow?"), Some("confirm")).is_err());
        assert!(file.path().exists());

        let answer = askpass(file.path(), Some("alice@h's password: "), None);
        assert_eq!(answer.ok().as_deref(), Some(TICKET));
        assert!(!file.path().exists(), "deleted on the first answer");
        let again = askpass(file.path(), Some("Password: "), None);
        assert!(matches!(again, Err(AskpassError::Gone(_))), "{again:?}");

        let dir = file.dir().to_owned();
        drop(file);
        assert!(!dir.exists(), "the directory goes with it");
    }

    #[test]
    fn a_ticket_that_is_not_one_printable_line_is_never_handed_on() {
        let base = tempfile::tempdir().expect("tempdir");
        for bad in ["", "v1.a\nexit", "v1 a", &"x".repeat(MAX_TICKET_LEN + 1)] {
            assert!(TicketFile::create(base.path(), bad).is_err(), "{bad:?}");
        }
        // A file that holds more than a ticket is not answered.
        let path = base.path().join("big");
        std::fs::write(&path, "x".repeat(MAX_TICKET_LEN + 5)).expect("write");
        assert!(matches!(
            askpass(&path, None, None),
            Err(AskpassError::NotTicket(_))
        ));
        assert_eq!(std::fs::read_dir(base.path()).expect("list").count(), 0);
    }

    #[tokio::test]
    async fn a_ticket_too_long_for_rdp_is_refused_before_the_client_starts() {
        let target = Endpoint::parse("127.0.0.1:3389").expect("address");
        let long = "v".repeat(RDP_MAX_PASSWORD + 1);
        let r = launch(
            StreamingProtocol::Rdp,
            Some(OsStr::new("/nonexistent/xfreerdp")),
            &target,
            &user("alice"),
            &[],
            &[],
            &long,
        )
        .await;
        assert!(
            matches!(r, Err(LaunchError::TooLongForRdp(n)) if n == RDP_MAX_PASSWORD + 1),
            "{r:?}"
        );
    }

    #[test]
    fn exit_codes_follow_the_client() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(255 << 8)), 255);
        // Killed by SIGTERM (15).
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
    }
}
