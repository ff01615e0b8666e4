//! Logs to the systemd journal with structured fields, never blocking.
//!
//! Under systemd a daemon's stderr is already a stream into the journal,
//! but every field is lost in it: a line is one `MESSAGE`. Here each
//! `tracing` event becomes one entry of journald's native protocol
//! (<https://systemd.io/JOURNAL_NATIVE_PROTOCOL/>): `MESSAGE`, `PRIORITY`
//! (error 3, warn 4, info 5, debug 6, trace 7), `SYSLOG_IDENTIFIER`,
//! `TARGET`, `CODE_FILE`, `CODE_LINE`, and every field of the event under
//! its own name in upper case (`GROUP`, `RESOURCE`, `SESSION`, ...; a name
//! journald reserves gets an `F_` prefix), so `journalctl GROUP=design`
//! finds a group's lines.
//!
//! The `tracing-journald` crate does the same but sends on a blocking
//! socket from the thread that logs: a journald that stops reading would
//! stall the runtime's workers. Here the entries go through the same
//! bounded queue and writer thread as stderr ([`crate::output::Output`]), to
//! a non-blocking datagram socket: an entry the journal does not take at
//! once is dropped (and counted), never waited for.
//!
//! [`choose`] is the pure rule of where logs go, [`JournalLayer`] the
//! layer, [`JournalSink`] the socket.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// journald's socket for native-protocol entries.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Names another socket than [`JOURNAL_SOCKET`] (a journal reached through
/// a bind mount, or a test's own socket).
pub const SOCKET_ENV: &str = "FERRY_JOURNAL_SOCKET";

/// Where logs go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogTarget {
    Stderr,
    Journal,
}

/// What [`choose`] decides from, read from the environment and stderr.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEnv {
    /// `JOURNAL_STREAM` (`device:inode` of the stream systemd connected
    /// stdout/stderr to), if set.
    pub journal_stream: Option<String>,
    /// stderr's device and inode, if it could be read.
    pub stderr: Option<(u64, u64)>,
    /// stderr is a regular file, a pipe or a terminal: someone reads it.
    pub stderr_captured: bool,
    /// `INVOCATION_ID` is set: started by systemd.
    pub invocation_id: bool,
    /// journald's socket exists.
    pub socket_exists: bool,
    /// journald's socket ([`SOCKET_ENV`], else [`JOURNAL_SOCKET`]).
    pub socket: PathBuf,
}

impl LogEnv {
    /// This process's environment.
    pub fn current() -> LogEnv {
        let stat = rustix::fs::fstat(std::io::stderr()).ok();
        let stderr_captured = stat.as_ref().is_some_and(|st| {
            matches!(
                rustix::fs::FileType::from_raw_mode(st.st_mode),
                rustix::fs::FileType::RegularFile | rustix::fs::FileType::Fifo
            )
        }) || std::io::IsTerminal::is_terminal(&std::io::stderr());
        let socket = std::env::var_os(SOCKET_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(JOURNAL_SOCKET));
        LogEnv {
            journal_stream: std::env::var("JOURNAL_STREAM").ok(),
            stderr: stat.map(|st| (st.st_dev, st.st_ino)),
            stderr_captured,
            invocation_id: std::env::var_os("INVOCATION_ID").is_some_and(|v| !v.is_empty()),
            socket_exists: socket.exists(),
            socket,
        }
    }
}

/// The journal when stderr is the stream systemd connected to it
/// (`JOURNAL_STREAM` names stderr's device and inode), or when systemd
/// started the process (`INVOCATION_ID`) without saying where stderr goes,
/// journald's socket is there and stderr is nothing anyone reads (not a
/// file, a pipe or a terminal: a child of a service inherits
/// `INVOCATION_ID`, and whoever captures its stderr wants the lines there);
/// else stderr. A `JOURNAL_STREAM` that names another file means stderr was
/// redirected on purpose: it is kept.
pub fn choose(env: &LogEnv) -> LogTarget {
    match &env.journal_stream {
        Some(stream) => match (parse_dev_ino(stream), env.stderr) {
            (Some(named), Some(stderr)) if named == stderr => LogTarget::Journal,
            _ => LogTarget::Stderr,
        },
        None if env.invocation_id && env.socket_exists && !env.stderr_captured => {
            LogTarget::Journal
        }
        None => LogTarget::Stderr,
    }
}

/// `"device:inode"`, both decimal.
fn parse_dev_ino(text: &str) -> Option<(u64, u64)> {
    let (dev, ino) = text.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// A non-blocking datagram socket to journald; each write is one entry.
/// Every failure to send (journald busy, restarting, an entry too large)
/// loses that entry only: it is reported as "would block" so the writer
/// thread keeps the sink.
#[derive(Debug)]
pub struct JournalSink {
    socket: UnixDatagram,
    path: PathBuf,
    /// Entries the journal did not take since the last one it did: said
    /// in an entry of their own as soon as it takes one again.
    lost: u64,
}

impl JournalSink {
    /// Opens a socket to `path` and checks that something receives there
    /// (an empty datagram, which journald ignores).
    pub fn open(path: &Path) -> std::io::Result<JournalSink> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        socket.send_to(&[], path)?;
        Ok(JournalSink {
            socket,
            path: path.to_owned(),
            lost: 0,
        })
    }
}

impl Write for JournalSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Entries from the layer start with PRIORITY; anything else (the
        // output's own "lines dropped" note) becomes a MESSAGE.
        let entry;
        let payload = if buf.starts_with(b"PRIORITY=") {
            buf
        } else {
            let mut e = Vec::with_capacity(buf.len() + 32);
            put_field(&mut e, "PRIORITY", b"4");
            put_field(&mut e, "MESSAGE", trim_newline(buf));
            entry = e;
            &entry
        };
        match self.socket.send_to(payload, &self.path) {
            Ok(_) => {
                if self.lost > 0 {
                    let mut note = Vec::with_capacity(96);
                    put_field(&mut note, "PRIORITY", b"4");
                    let text = format!("[{} log entries were not taken by the journal]", self.lost);
                    put_field(&mut note, "MESSAGE", text.as_bytes());
                    if self.socket.send_to(&note, &self.path).is_ok() {
                        self.lost = 0;
                    }
                }
                Ok(buf.len())
            }
            Err(e) => {
                // Counted here: the writer drops the entry on WouldBlock.
                self.lost = self.lost.saturating_add(1);
                Err(std::io::Error::new(std::io::ErrorKind::WouldBlock, e))
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn trim_newline(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\n").unwrap_or(b)
}

/// Where the layer hands each entry: a queue that never blocks (the
/// daemons' [`crate::output::Output`], whose sink is a [`JournalSink`]).
pub type EntrySink = Box<dyn Fn(&[u8]) + Send + Sync>;

/// A `tracing` layer writing each event as one journal entry to `out`.
pub struct JournalLayer {
    out: EntrySink,
    identifier: String,
}

impl JournalLayer {
    /// Entries go to `out` under `SYSLOG_IDENTIFIER=identifier`.
    pub fn new(out: EntrySink, identifier: impl Into<String>) -> JournalLayer {
        JournalLayer {
            out,
            identifier: identifier.into(),
        }
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        (self.out)(&entry(event, &self.identifier));
    }
}

/// The native-protocol payload of `event`.
pub fn entry(event: &Event<'_>, identifier: &str) -> Vec<u8> {
    let meta = event.metadata();
    let mut buf = Vec::with_capacity(256);
    let priority: &[u8] = match *meta.level() {
        Level::ERROR => b"3",
        Level::WARN => b"4",
        Level::INFO => b"5",
        Level::DEBUG => b"6",
        Level::TRACE => b"7",
    };
    put_field(&mut buf, "PRIORITY", priority);
    put_field(&mut buf, "SYSLOG_IDENTIFIER", identifier.as_bytes());
    put_field(&mut buf, "TARGET", meta.target().as_bytes());
    if let Some(file) = meta.file() {
        put_field(&mut buf, "CODE_FILE", file.as_bytes());
    }
    if let Some(line) = meta.line() {
        put_field(&mut buf, "CODE_LINE", line.to_string().as_bytes());
    }
    event.record(&mut Fields { buf: &mut buf });
    buf
}

/// Journal fields every entry has (or journald sets): an event field of
/// that name gets an `F_` prefix instead of replacing them.
const RESERVED: &[&str] = &[
    "PRIORITY",
    "SYSLOG_IDENTIFIER",
    "TARGET",
    "CODE_FILE",
    "CODE_LINE",
    "CODE_FUNC",
    "ERRNO",
    "MESSAGE_ID",
    "SYSLOG_FACILITY",
    "SYSLOG_PID",
    "SYSLOG_TIMESTAMP",
];

struct Fields<'a> {
    buf: &'a mut Vec<u8>,
}

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: &[u8]) {
        if field.name() == "message" {
            put_field(self.buf, "MESSAGE", value);
            return;
        }
        let mut name = field_name(field.name());
        if name.is_empty() {
            return;
        }
        if RESERVED.contains(&name.as_str()) || name == "MESSAGE" {
            name.insert_str(0, "F_");
        }
        put_field(self.buf, &name, value);
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.as_bytes());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").as_bytes());
    }
}

/// A field name as journald accepts it: upper-case letters, digits and
/// `_`, not starting with `_` (those are journald's own) or a digit.
fn field_name(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' => c.to_ascii_uppercase(),
            'A'..='Z' | '0'..='9' => c,
            _ => '_',
        })
        .collect();
    mapped
        .trim_start_matches(|c: char| c == '_' || c.is_ascii_digit())
        .to_owned()
}

/// `NAME=value\n`, or for a value with a newline the binary form:
/// `NAME\n`, its length as 64-bit little endian, the value, `\n`.
/// Longest value of one field: a longer one is cut, with a note of how much
/// was, so an entry stays well under the socket's datagram limit (about
/// 208 KiB by default) and the output queue's memory stays bounded.
pub const MAX_FIELD_BYTES: usize = 16 * 1024;

fn put_field(buf: &mut Vec<u8>, name: &str, value: &[u8]) {
    let cut;
    let value = if value.len() > MAX_FIELD_BYTES {
        let mut v = value[..MAX_FIELD_BYTES].to_vec();
        v.extend_from_slice(
            format!("…[{} more bytes cut]", value.len() - MAX_FIELD_BYTES).as_bytes(),
        );
        cut = v;
        &cut[..]
    } else {
        value
    };
    buf.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

/// Reads a native-protocol payload back into (name, value) pairs.
pub fn parse_entry(mut payload: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut fields = Vec::new();
    while !payload.is_empty() {
        let end = payload.iter().position(|b| *b == b'\n')?;
        let line = &payload[..end];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            fields.push((
                String::from_utf8(line[..eq].to_vec()).ok()?,
                line[eq + 1..].to_vec(),
            ));
            payload = &payload[end + 1..];
        } else {
            let name = String::from_utf8(line.to_vec()).ok()?;
            let rest = &payload[end + 1..];
            let len = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
            let len = usize::try_from(len).ok()?;
            let value = rest.get(8..8 + len)?.to_vec();
            if rest.get(8 + len) != Some(&b'\n') {
                return None;
            }
            fields.push((name, value));
            payload = &rest[8 + len + 1..];
        }
    }
    Some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn env(stream: Option<&str>, stderr: Option<(u64, u64)>, inv: bool, sock: bool) -> LogEnv {
        LogEnv {
            journal_stream: stream.map(str::to_owned),
            stderr,
            stderr_captured: false,
            invocation_id: inv,
            socket_exists: sock,
            socket: PathBuf::from(JOURNAL_SOCKET),
        }
    }

    #[test]
    fn the_journal_is_chosen_when_stderr_is_the_stream_systemd_named() {
        let here = Some((2049, 77));
        assert_eq!(
            choose(&env(Some("2049:77"), here, true, true)),
            LogTarget::Journal
        );
        // stderr redirected elsewhere by the operator: kept.
        assert_eq!(
            choose(&env(Some("2049:78"), here, true, true)),
            LogTarget::Stderr
        );
        assert_eq!(
            choose(&env(Some("garbage"), here, true, true)),
            LogTarget::Stderr
        );
        assert_eq!(
            choose(&env(Some("2049:77"), None, true, true)),
            LogTarget::Stderr
        );
        // Started by systemd without JOURNAL_STREAM: the journal, if it is there.
        assert_eq!(choose(&env(None, here, true, true)), LogTarget::Journal);
        assert_eq!(choose(&env(None, here, true, false)), LogTarget::Stderr);
        // ... unless its stderr is read (a file, a pipe, a terminal).
        let captured = LogEnv {
            stderr_captured: true,
            ..env(None, here, true, true)
        };
        assert_eq!(choose(&captured), LogTarget::Stderr);
        // A shell.
        assert_eq!(choose(&env(None, here, false, true)), LogTarget::Stderr);
    }

    #[test]
    fn field_names_follow_journald_rules() {
        assert_eq!(field_name("group"), "GROUP");
        assert_eq!(field_name("spool.id"), "SPOOL_ID");
        assert_eq!(field_name("_hidden"), "HIDDEN");
        assert_eq!(field_name("1st"), "ST");
    }

    #[test]
    fn entries_round_trip_including_multi_line_values() {
        let mut buf = Vec::new();
        put_field(&mut buf, "MESSAGE", b"two\nlines");
        put_field(&mut buf, "GROUP", b"design");
        assert_eq!(
            parse_entry(&buf).expect("parse"),
            vec![
                ("MESSAGE".to_owned(), b"two\nlines".to_vec()),
                ("GROUP".to_owned(), b"design".to_vec()),
            ]
        );
        assert!(parse_entry(b"MESSAGE\n\x05\0\0\0\0\0\0\0ab").is_none());
    }

    /// A real datagram socket in place of journald's: an event logged with
    /// the group, resource, session and decision fields arrives as one
    /// entry carrying each of them.
    #[test]
    fn an_event_reaches_a_journal_socket_with_its_fields() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("journal.socket");
        let journal = UnixDatagram::bind(&path).expect("bind");
        let sink = JournalSink::open(&path).expect("open");
        // The empty probe datagram.
        let mut probe = [0u8; 16];
        assert_eq!(journal.recv(&mut probe).expect("probe"), 0);
        // Written at once here (the daemons queue entries for a writer thread).
        let sink = std::sync::Mutex::new(sink);
        let write: EntrySink = Box::new(move |entry| {
            if let Ok(mut sink) = sink.lock() {
                let _ = sink.write(entry);
            }
        });
        let subscriber =
            tracing_subscriber::registry().with(JournalLayer::new(write, "ferry-broker"));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                group = "design",
                resource = "host-1",
                session = "s1",
                decision = "placed",
                priority = 9,
                "route\nadmitted"
            );
        });
        let mut got = vec![0u8; 64 * 1024];
        let n = journal.recv(&mut got).expect("entry");
        let fields = parse_entry(&got[..n]).expect("a native-protocol entry");
        let field = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(field("PRIORITY").as_deref(), Some("4"));
        assert_eq!(field("SYSLOG_IDENTIFIER").as_deref(), Some("ferry-broker"));
        assert_eq!(field("MESSAGE").as_deref(), Some("route\nadmitted"));
        assert_eq!(field("GROUP").as_deref(), Some("design"));
        assert_eq!(field("RESOURCE").as_deref(), Some("host-1"));
        assert_eq!(field("SESSION").as_deref(), Some("s1"));
        assert_eq!(field("DECISION").as_deref(), Some("placed"));
        // A field named like a journal field does not replace it.
        assert_eq!(field("F_PRIORITY").as_deref(), Some("9"));
        assert!(field("TARGET").is_some_and(|t| t.contains("journal")));
    }

    #[test]
    fn a_journal_that_does_not_read_loses_entries_and_never_blocks() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("journal.socket");
        let _journal = UnixDatagram::bind(&path).expect("bind");
        let mut sink = JournalSink::open(&path).expect("open");
        // Nobody reads: the socket's queue fills, and each send after that
        // fails at once as "would block" (the entry is lost).
        let entry = vec![b'x'; 1024];
        let mut lost = 0;
        for _ in 0..10_000 {
            if let Err(e) = sink.write(&entry) {
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
                lost += 1;
            }
        }
        assert!(lost > 0, "a socket nobody reads took 10,000 entries");
        assert_eq!(sink.lost, lost);
    }

    #[test]
    fn lost_entries_are_said_once_the_journal_reads_again() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("journal.socket");
        let journal = UnixDatagram::bind(&path).expect("bind");
        let mut sink = JournalSink::open(&path).expect("open");
        let mut entry = Vec::new();
        put_field(&mut entry, "PRIORITY", b"5");
        put_field(&mut entry, "MESSAGE", &[b'x'; 1024]);
        let mut lost = 0u64;
        while lost < 3 {
            if sink.write(&entry).is_err() {
                lost += 1;
            }
        }
        // The journal reads everything queued, then takes the next entry.
        journal.set_nonblocking(true).expect("nonblocking");
        let mut datagram = vec![0u8; 4096];
        while journal.recv(&mut datagram).is_ok() {}
        assert_eq!(sink.write(&entry).expect("taken"), entry.len());
        let mut said = Vec::new();
        while let Ok(n) = journal.recv(&mut datagram) {
            said.push(parse_entry(&datagram[..n]).expect("entry"));
        }
        let note = said
            .iter()
            .flatten()
            .find(|(k, v)| k == "MESSAGE" && v.starts_with(b"[3 log entries"))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        assert_eq!(
            note.as_deref(),
            Some("[3 log entries were not taken by the journal]")
        );
        assert_eq!(sink.lost, 0);
    }

    #[test]
    fn a_huge_field_is_cut_and_says_so() {
        let mut buf = Vec::new();
        put_field(&mut buf, "MESSAGE", &vec![b'y'; MAX_FIELD_BYTES + 100]);
        let fields = parse_entry(&buf).expect("entry");
        let (_, v) = &fields[0];
        assert!(v.len() < MAX_FIELD_BYTES + 64, "{}", v.len());
        assert!(v.ends_with("…[100 more bytes cut]".as_bytes()));
    }

    #[test]
    fn no_journal_socket_is_an_error_at_open() {
        let dir = tempfile::tempdir().expect("tmp");
        assert!(JournalSink::open(&dir.path().join("none")).is_err());
    }
}
