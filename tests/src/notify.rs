//! A fake systemd notification socket.
//!
//! systemd passes `NOTIFY_SOCKET` to a `Type=notify` service, which sends datagrams such
//! as `READY=1`, `STOPPING=1` and `WATCHDOG=1`. This binds such a socket in a temp dir so a
//! test can start a real daemon with it and check what the daemon says, in order.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct FakeNotifySocket {
    path: PathBuf,
    socket: UnixDatagram,
}

impl FakeNotifySocket {
    pub fn bind(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path)?;
        Ok(Self { path, socket })
    }

    /// The value for the daemon's `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next datagram, up to `timeout`; each datagram is a list of
    /// `KEY=VALUE` lines.
    pub fn recv(&self, timeout: Duration) -> std::io::Result<Vec<String>> {
        self.socket.set_read_timeout(Some(timeout))?;
        let mut buf = vec![0u8; 4096];
        let n = self.socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// Waits until a datagram contains `line` (e.g. `READY=1`), returning every line seen
    /// on the way. Fails after `timeout` in total.
    pub fn wait_for(&self, line: &str, timeout: Duration) -> std::io::Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no {line:?} within {timeout:?}; saw {seen:?}"),
                ));
            }
            let lines = match self.recv(left) {
                Ok(lines) => lines,
                // A signal (e.g. SIGCHLD from a daemon the test stopped) interrupts
                // the blocking receive; that is not the daemon's answer.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let found = lines.iter().any(|l| l == line);
            seen.extend(lines);
            if found {
                return Ok(seen);
            }
        }
    }
}
