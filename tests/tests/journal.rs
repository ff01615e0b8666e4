//! A real `ferry-broker run` started the way systemd starts it: its stderr
//! is the stream `JOURNAL_STREAM` names, so its logs go to the journal as
//! native-protocol entries with their fields; the test's own datagram
//! socket stands in for journald's (`FERRY_JOURNAL_SOCKET`). And with the
//! journal's socket missing, the same start logs to stderr and says why.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::process::Stdio;

use anyhow::{bail, Context};
use ferry_process::journal::{parse_entry, SOCKET_ENV};
use ferry_tests::bins::bin;
use ferry_tests::harness::PATIENCE;
use ferry_tests::notify::FakeNotifySocket;
use ferry_tests::procs::{run_ok, wait_notify, BrokerFiles};

type Entry = Vec<(String, Vec<u8>)>;

fn field(entry: &Entry, name: &str) -> Option<String> {
    entry
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// `ferry-broker run` on `files` with stderr to `stderr` (and
/// `JOURNAL_STREAM` naming it), the journal at `socket` and systemd's
/// notify socket at `notify`.
fn start(
    files: &BrokerFiles,
    stderr: &std::path::Path,
    socket: &std::path::Path,
    notify: Option<&std::path::Path>,
) -> anyhow::Result<tokio::process::Child> {
    let config = files.write_config("127.0.0.1:0".parse()?)?;
    let err = std::fs::File::create(stderr)?;
    let meta = err.metadata()?;
    let mut cmd = tokio::process::Command::new(bin("ferry-broker"));
    match notify {
        Some(path) => cmd.env("NOTIFY_SOCKET", path),
        None => cmd.env_remove("NOTIFY_SOCKET"),
    };
    Ok(cmd
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env(SOCKET_ENV, socket)
        .env_remove("INVOCATION_ID")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .kill_on_drop(true)
        .spawn()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_broker_logs_to_the_journal_with_fields() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let socket = tmp.path().join("journal.socket");
    let journal = UnixDatagram::bind(&socket)?;
    journal.set_read_timeout(Some(PATIENCE))?;
    let stderr = tmp.path().join("stderr.log");
    let mut broker = start(&files, &stderr, &socket, None)?;

    // Entries until the broker says it is ready (each recv waits for one).
    let ready = tokio::task::spawn_blocking(move || -> anyhow::Result<Entry> {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = journal.recv(&mut buf).context("a journal entry in time")?;
            let Some(entry) = parse_entry(&buf[..n]) else {
                bail!(
                    "not a native-protocol entry: {:?}",
                    String::from_utf8_lossy(&buf[..n])
                );
            };
            if field(&entry, "MESSAGE").as_deref() == Some("broker ready") {
                return Ok(entry);
            }
        }
    })
    .await??;
    assert_eq!(field(&ready, "PRIORITY").as_deref(), Some("5"), "{ready:?}");
    assert_eq!(
        field(&ready, "SYSLOG_IDENTIFIER").as_deref(),
        Some("ferry-broker")
    );
    assert_eq!(
        field(&ready, "TARGET").as_deref(),
        Some("ferry_broker::daemon")
    );
    let agent_addr = field(&ready, "AGENT_ADDR").context("the agent_addr field")?;
    assert!(agent_addr.starts_with("127.0.0.1:"), "{agent_addr}");
    assert!(field(&ready, "ADMIN_SOCKET").is_some(), "{ready:?}");
    broker.start_kill()?;
    broker.wait().await?;
    let text = std::fs::read_to_string(&stderr)?;
    assert!(
        !text.contains("broker ready"),
        "logged to stderr too:\n{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_journal_socket_the_broker_logs_to_stderr_and_says_why() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let files = BrokerFiles::init(tmp.path()).await?;
    let socket = tmp.path().join("no-journal.socket");
    let stderr = tmp.path().join("stderr.log");
    let notify = FakeNotifySocket::bind(tmp.path())?;
    let mut broker = start(&files, &stderr, &socket, Some(notify.path()))?;
    wait_notify(&notify, "READY=1", PATIENCE)?;
    // Stopped, it flushes its log before it exits.
    let pid = broker.id().context("the broker's pid")?.to_string();
    run_ok(std::path::Path::new("kill"), ["-TERM", pid.as_str()]).await?;
    let status = tokio::time::timeout(PATIENCE, broker.wait()).await??;
    let text = std::fs::read_to_string(&stderr)?;
    assert!(status.success(), "{status}:\n{text}");
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.contains("the journal cannot be written to; logging to stderr"),
        "{text}"
    );
    assert!(text.contains("broker ready"), "{text}");
    Ok(())
}
