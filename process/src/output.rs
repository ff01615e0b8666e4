//! A writer for logs and printed output that never panics and never blocks.
//!
//! A daemon's stderr is a pipe or a socket (journald's stream under
//! systemd). When the reader goes away (journald restarts), writes fail with
//! `EPIPE`, and `eprintln!` or `tracing`'s own error report on a failed write
//! panic; when the reader stops reading, the pipe fills and every write
//! blocks the thread that logs, a runtime worker, until signals are no longer
//! answered. Here each line goes through a bounded queue to one writer
//! thread: a full queue drops the line (and counts it), a failed stream stops
//! the writing (lines are discarded from then on), and nothing the daemon
//! does waits for the stream. At exit [`Output::flush`] gives the queue a
//! bounded time to drain.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// Lines queued for the writer thread; past this, lines are dropped. Enough
/// for a burst of logging while the stream is briefly slow.
pub const QUEUE_LINES: usize = 4096;

/// How long a daemon waits at exit for its queued lines to be written.
pub const EXIT_FLUSH: Duration = Duration::from_millis(500);

/// Which standard stream an [`Output`] writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// Whether colours may be used: the stream is a terminal and `NO_COLOR`
    /// is not set. Logs sent to a pipe, a file or journald carry no ANSI codes.
    pub fn wants_color(self) -> bool {
        let terminal = match self {
            Stream::Stdout => std::io::stdout().is_terminal(),
            Stream::Stderr => std::io::stderr().is_terminal(),
        };
        terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
    }
}

/// Counters shared by the senders and the writer thread.
#[derive(Debug, Default)]
struct Shared {
    /// Lines accepted into the queue.
    queued: AtomicU64,
    /// Lines dropped because the queue was full.
    dropped: AtomicU64,
    /// Lines the writer thread is done with (written or discarded).
    done: Mutex<u64>,
    /// Signalled when `done` grows.
    progress: Condvar,
}

/// A lossy, non-blocking line writer to stdout or stderr; cheap to clone.
/// Also a `tracing` [`MakeWriter`].
#[derive(Clone, Debug)]
pub struct Output {
    /// The writer thread's queue.
    tx: SyncSender<Vec<u8>>,
    /// Counters.
    shared: Arc<Shared>,
}

impl Output {
    /// Starts the writer thread of `stream`. If the thread cannot be started
    /// every line is dropped: output is never worth failing the daemon.
    pub fn spawn(stream: Stream) -> Output {
        Output::with_sink(stream_sink(stream), QUEUE_LINES)
    }

    /// An output writing to `sink` through a queue of `capacity` lines.
    pub fn with_sink(sink: Box<dyn Write + Send>, capacity: usize) -> Output {
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        let shared = Arc::new(Shared::default());
        let worker = shared.clone();
        // On failure the receiver is dropped with the closure: every send
        // fails and counts as dropped.
        let _ = std::thread::Builder::new()
            .name("ferry-output".into())
            .spawn(move || write_lines(rx, sink, &worker));
        Output { tx, shared }
    }

    /// Queues `bytes` (normally one line with its newline); drops them when
    /// the queue is full or the writer is gone. Never blocks.
    pub fn write_bytes(&self, bytes: &[u8]) {
        match self.tx.try_send(bytes.to_vec()) {
            Ok(()) => {
                self.shared.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queues `text` followed by a newline.
    pub fn line(&self, text: impl std::fmt::Display) {
        self.write_bytes(format!("{text}\n").as_bytes());
    }

    /// Lines dropped so far because the stream did not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits at most `limit` for every line queued so far to be written (or
    /// discarded after a write error); returns whether they all were.
    pub fn flush(&self, limit: Duration) -> bool {
        let target = self.shared.queued.load(Ordering::Relaxed);
        let deadline = Instant::now() + limit;
        let mut done = self
            .shared
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while *done < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            done = self
                .shared
                .progress
                .wait_timeout(done, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// The standard stream as a sink for the writer thread.
fn stream_sink(stream: Stream) -> Box<dyn Write + Send> {
    match stream {
        Stream::Stdout => Box::new(std::io::stdout()),
        Stream::Stderr => Box::new(std::io::stderr()),
    }
}

/// The writer thread: writes each line whole; after a write error other
/// than "would block" the stream is dead and lines are discarded. Returns
/// when every sender is gone.
fn write_lines(rx: Receiver<Vec<u8>>, mut sink: Box<dyn Write + Send>, shared: &Shared) {
    let mut broken = false;
    let mut reported_drops = 0;
    for line in rx {
        if !broken {
            let dropped = shared.dropped.load(Ordering::Relaxed);
            if dropped > reported_drops {
                let note = format!(
                    "[{} output lines dropped: the stream was not keeping up]\n",
                    dropped - reported_drops
                );
                reported_drops = dropped;
                broken = write_whole(&mut *sink, note.as_bytes());
            }
        }
        if !broken {
            broken = write_whole(&mut *sink, &line);
        }
        let mut done = shared.done.lock().unwrap_or_else(PoisonError::into_inner);
        *done += 1;
        shared.progress.notify_all();
    }
}

/// Writes and flushes `bytes`; returns whether the stream is now dead.
fn write_whole(sink: &mut dyn Write, bytes: &[u8]) -> bool {
    match sink.write_all(bytes).and_then(|()| sink.flush()) {
        Ok(()) => false,
        // Someone made the stream non-blocking: lose this line, not the stream.
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// One `tracing` event's writer: the formatted event arrives in one write.
#[derive(Debug)]
pub struct OutputWriter<'a>(&'a Output);

impl Write for OutputWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Output {
    type Writer = OutputWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        OutputWriter(self)
    }
}

/// Sets up a daemon's or CLI's logging: `tracing` events at `default_level`
/// (or `RUST_LOG`) to stderr through an [`Output`], with colours only on a
/// terminal; or, under systemd (see [`crate::journal::choose`]), to the
/// journal as entries with their fields, through an output of their own.
/// If the journal's socket cannot be opened, logs go to stderr and the
/// first line says why. Returns the stderr output, which also carries the
/// process's own messages (its final error) and is flushed at exit.
pub fn init_logging(default_level: &str) -> Output {
    use crate::journal::{self, JournalLayer, JournalSink, LogTarget};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let out = Output::spawn(Stream::Stderr);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let env = journal::LogEnv::current();
    let (journal, failed) = match journal::choose(&env) {
        LogTarget::Stderr => (None, None),
        LogTarget::Journal => match JournalSink::open(&env.socket) {
            Ok(sink) => {
                let identifier = std::env::args_os()
                    .next()
                    .as_ref()
                    .and_then(|p| std::path::Path::new(p).file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "ferry".into());
                let entries = Output::with_sink(Box::new(sink), QUEUE_LINES);
                let write: journal::EntrySink = Box::new(move |entry| entries.write_bytes(entry));
                (Some(JournalLayer::new(write, identifier)), None)
            }
            Err(e) => (None, Some(e)),
        },
    };
    let stderr = journal.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(Stream::Stderr.wants_color())
            .with_writer(out.clone())
    });
    // A second initialisation (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(journal)
        .with(stderr)
        .try_init();
    if let Some(e) = failed {
        tracing::warn!(socket = %env.socket.display(), error = %e,
            "the journal cannot be written to; logging to stderr");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records what it got, fails, or blocks until released.
    #[derive(Clone, Default)]
    struct TestSink {
        got: Arc<Mutex<Vec<u8>>>,
        fail: bool,
        gate: Option<Arc<(Mutex<bool>, Condvar)>>,
    }

    impl Write for TestSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(gate) = &self.gate {
                let (open, cv) = &**gate;
                let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
                while !*open {
                    open = cv.wait(open).unwrap_or_else(PoisonError::into_inner);
                }
            }
            if self.fail {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            self.got
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn text(sink: &TestSink) -> String {
        String::from_utf8_lossy(&sink.got.lock().unwrap_or_else(PoisonError::into_inner))
            .into_owned()
    }

    #[test]
    fn lines_are_written_in_order_and_flush_waits_for_them() {
        let sink = TestSink::default();
        let out = Output::with_sink(Box::new(sink.clone()), 16);
        out.line("one");
        out.line(format_args!("two {}", 2));
        assert!(out.flush(Duration::from_secs(10)));
        assert_eq!(text(&sink), "one\ntwo 2\n");
        assert_eq!(out.dropped(), 0);
    }

    #[test]
    fn a_broken_stream_is_never_an_error_to_the_caller() {
        let sink = TestSink {
            fail: true,
            ..TestSink::default()
        };
        let out = Output::with_sink(Box::new(sink), 4);
        for i in 0..100 {
            out.line(i);
            // Lines are discarded by the thread; the queue never stays full.
            assert!(out.flush(Duration::from_secs(10)));
        }
    }

    #[test]
    fn a_blocked_stream_drops_lines_instead_of_blocking_and_says_so() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = TestSink {
            gate: Some(gate.clone()),
            ..TestSink::default()
        };
        let out = Output::with_sink(Box::new(sink.clone()), 2);
        // The thread takes the first line and blocks in write; two more fill
        // the queue; the rest are dropped at once.
        for i in 0..10 {
            out.line(i);
        }
        assert!(out.dropped() >= 7, "dropped {}", out.dropped());
        assert!(
            !out.flush(Duration::from_millis(50)),
            "the stream is blocked"
        );
        let (open, cv) = &*gate;
        *open.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cv.notify_all();
        assert!(out.flush(Duration::from_secs(10)));
        out.line("after");
        assert!(out.flush(Duration::from_secs(10)));
        let written = text(&sink);
        assert!(written.contains("0\n"), "{written}");
        assert!(written.contains("output lines dropped"), "{written}");
        assert!(written.ends_with("after\n"), "{written}");
    }
}
