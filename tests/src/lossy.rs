//! A seeded lossy link: a UDP proxy between QUIC clients (agents) and a
//! server (the broker's endpoint) that drops, duplicates, reorders and
//! delays datagrams in both directions.
//!
//! The proxy listens on `127.0.0.1:0`; clients are given [`LossyProxy::addr`]
//! instead of the server's address. Each client address gets its own
//! upstream socket (`127.0.0.1:0`, connected to the server), so the server
//! sees one peer per client, as through a NAT. Every datagram, in either
//! direction, rolls its faults independently with probability
//! [`Faults::per_million`]:
//! - dropped;
//! - or held back and released after the next datagram of the same flow and
//!   direction (reordered), or after [`MAX_HOLD`] when no next one comes;
//! - duplicated (sent twice);
//! - delayed by 1 ms to [`Faults::max_delay`].
//!
//! The faults come from one PRNG seeded with [`Faults::seed`]. The order in
//! which datagrams reach the proxy depends on scheduling, so a seed replays
//! the fault pattern, not the exact datagrams it hits. [`LossyProxy::counts`]
//! tells what was done, so a test can check that faults really happened.
//!
//! [`LossyProxy::start`] returns once the listening socket is bound (ready),
//! and [`LossyProxy::wait_for`] wakes when the counts change. The only
//! timers are the faults' own (a delay, a hold). Dropping the [`LossyProxy`]
//! stops every task it started.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::harness::PATIENCE;

/// Largest UDP payload read; QUIC datagrams are far smaller.
const MAX_DATAGRAM: usize = 65_535;

/// Client addresses the proxy serves at once: a new one beyond replaces the
/// one quiet longest, so clients that reconnect (each time from a new port)
/// cannot make the proxy open sockets without bound.
pub const MAX_FLOWS: usize = 256;

/// Longest a reordered datagram is held when no later datagram of its flow
/// comes to overtake it.
pub const MAX_HOLD: Duration = Duration::from_millis(50);

/// What the link does to datagrams.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    /// Seed of the fault pattern.
    pub seed: u64,
    /// Probability of each fault per datagram, in millionths
    /// (10_000 = 1 %, 50_000 = 5 %).
    pub per_million: u32,
    /// Longest delay of a delayed datagram.
    pub max_delay: Duration,
}

/// What the proxy did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Datagrams received from either side.
    pub received: u64,
    /// Datagrams sent on (copies and released held ones included).
    pub sent: u64,
    /// Datagrams dropped by a fault.
    pub dropped: u64,
    /// Datagrams sent twice.
    pub duplicated: u64,
    /// Datagrams held and released after a later one.
    pub reordered: u64,
    /// Datagrams sent late.
    pub delayed: u64,
    /// Flows closed to make room for a new client ([`MAX_FLOWS`]).
    pub evicted: u64,
}

#[derive(Default)]
struct Counters {
    /// Woken at every count, for [`LossyProxy::wait_for`].
    changed: tokio::sync::Notify,
    received: AtomicU64,
    sent: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    delayed: AtomicU64,
    evicted: AtomicU64,
}

impl Counters {
    fn add(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    fn snapshot(&self) -> Counts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            received: get(&self.received),
            sent: get(&self.sent),
            dropped: get(&self.dropped),
            duplicated: get(&self.duplicated),
            reordered: get(&self.reordered),
            delayed: get(&self.delayed),
            evicted: get(&self.evicted),
        }
    }
}

/// A running lossy proxy; dropping it stops it.
pub struct LossyProxy {
    addr: SocketAddr,
    counters: Arc<Counters>,
    stop: CancellationToken,
}

impl LossyProxy {
    /// Binds `127.0.0.1:0` and starts forwarding to `server` with `faults`.
    pub async fn start(server: SocketAddr, faults: Faults) -> anyhow::Result<LossyProxy> {
        let front = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("bind the lossy proxy")?;
        let addr = front.local_addr().context("lossy proxy address")?;
        let link = Arc::new(Link {
            faults,
            rng: Mutex::new(StdRng::seed_from_u64(faults.seed)),
            counters: Arc::new(Counters::default()),
            stop: CancellationToken::new(),
            next_hold: AtomicU64::new(0),
        });
        let proxy = LossyProxy {
            addr,
            counters: link.counters.clone(),
            stop: link.stop.clone(),
        };
        tokio::spawn(front_loop(link, Arc::new(front), server));
        Ok(proxy)
    }

    /// Where clients send instead of the server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the proxy did so far.
    pub fn counts(&self) -> Counts {
        self.counters.snapshot()
    }

    /// Waits until the counts satisfy `done` (e.g. some traffic passed),
    /// failing after [`PATIENCE`] with the counts seen.
    pub async fn wait_for(
        &self,
        what: &str,
        done: impl Fn(&Counts) -> bool,
    ) -> anyhow::Result<Counts> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            // Registered before the check: a count in between wakes it.
            let changed = self.counters.changed.notified();
            let counts = self.counts();
            if done(&counts) {
                return Ok(counts);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                bail!("lossy proxy: not {what} after {PATIENCE:?}: {counts:?}");
            }
        }
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// State shared by the proxy's tasks.
struct Link {
    faults: Faults,
    rng: Mutex<StdRng>,
    counters: Arc<Counters>,
    stop: CancellationToken,
    /// Tags held datagrams, so a hold timer releases only its own.
    next_hold: AtomicU64,
}

/// Where one direction of one flow sends.
enum Sink {
    /// Client to server: the flow's upstream socket, connected to the server.
    Upstream(Arc<UdpSocket>),
    /// Server to client: the listening socket, to the client's address.
    Front(Arc<UdpSocket>, SocketAddr),
}

/// One direction of one flow.
struct Path {
    sink: Sink,
    /// A reordered datagram waiting for the next one to overtake it.
    held: Mutex<Option<(u64, Vec<u8>)>>,
}

/// What the faults decided for one datagram.
struct Plan {
    drop: bool,
    hold: bool,
    duplicate: bool,
    delay: Option<Duration>,
}

impl Link {
    fn plan(&self) -> Plan {
        let p = self.faults.per_million;
        let mut rng = lock(&self.rng);
        let mut roll = || rng.random_range(0..1_000_000u32) < p;
        let (drop, hold, duplicate, delayed) = (roll(), roll(), roll(), roll());
        let max_ms = u64::try_from(self.faults.max_delay.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let delay = delayed.then(|| Duration::from_millis(rng.random_range(1..=max_ms)));
        Plan {
            drop,
            hold,
            duplicate,
            delay,
        }
    }

    async fn send(&self, path: &Path, datagram: &[u8]) {
        // A send error (the client's socket closed) is what a real link
        // does with a datagram nobody receives: it is lost.
        let _ = match &path.sink {
            Sink::Upstream(s) => s.send(datagram).await,
            Sink::Front(s, to) => s.send_to(datagram, *to).await,
        };
        self.counters.add(&self.counters.sent);
    }

    fn send_later(self: &Arc<Self>, path: &Arc<Path>, datagram: Vec<u8>, delay: Duration) {
        let (link, path) = (self.clone(), path.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = link.stop.cancelled() => {}
                _ = tokio::time::sleep(delay) => link.send(&path, &datagram).await,
            }
        });
    }

    /// Passes one datagram through the faults.
    async fn forward(self: &Arc<Self>, path: &Arc<Path>, datagram: Vec<u8>) {
        self.counters.add(&self.counters.received);
        let plan = self.plan();
        if plan.drop {
            self.counters.add(&self.counters.dropped);
            return;
        }
        if plan.hold {
            self.counters.add(&self.counters.reordered);
            let tag = self.next_hold.fetch_add(1, Ordering::Relaxed);
            let before = lock(&path.held).replace((tag, datagram));
            // Only one is held at a time: an earlier one goes now, overtaken.
            if let Some((_, earlier)) = before {
                self.send(path, &earlier).await;
            }
            let (link, path) = (self.clone(), path.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = link.stop.cancelled() => {}
                    _ = tokio::time::sleep(MAX_HOLD) => {
                        let mine = {
                            let mut held = lock(&path.held);
                            match held.as_ref() {
                                Some((t, _)) if *t == tag => held.take(),
                                _ => None,
                            }
                        };
                        if let Some((_, d)) = mine {
                            link.send(&path, &d).await;
                        }
                    }
                }
            });
            return;
        }
        if plan.duplicate {
            self.counters.add(&self.counters.duplicated);
        }
        match plan.delay {
            Some(delay) => {
                self.counters.add(&self.counters.delayed);
                if plan.duplicate {
                    self.send_later(path, datagram.clone(), delay);
                }
                self.send_later(path, datagram, delay);
            }
            None => {
                self.send(path, &datagram).await;
                if plan.duplicate {
                    self.send(path, &datagram).await;
                }
            }
        }
        // A held datagram is released once this one overtook it.
        let held = lock(&path.held).take();
        if let Some((_, d)) = held {
            self.send(path, &d).await;
        }
    }
}

/// A poisoned lock only means another task panicked holding it; what it
/// guards (a generator, a held datagram) is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One client's flow: its client-to-server path, when it last sent, and
/// the token that stops its return task.
struct Flow {
    path: Arc<Path>,
    last: tokio::time::Instant,
    stop: CancellationToken,
}

/// Receives from clients and forwards each to its flow's upstream socket,
/// opening the flow (and its return task) on a client's first datagram.
/// With [`MAX_FLOWS`] open, a new client's flow replaces the one that was
/// quiet longest (a client that reconnects comes from a new port, and its
/// old flow is dead).
async fn front_loop(link: Arc<Link>, front: Arc<UdpSocket>, server: SocketAddr) {
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = tokio::select! {
            _ = link.stop.cancelled() => return,
            r = front.recv_from(&mut buf) => match r {
                Ok(got) => got,
                // An ICMP error from an earlier send to a closed client
                // port surfaces here on some systems; it is not fatal.
                Err(_) => continue,
            },
        };
        let now = tokio::time::Instant::now();
        if let Some(flow) = flows.get_mut(&client) {
            flow.last = now;
            let path = flow.path.clone();
            link.forward(&path, buf[..n].to_vec()).await;
            continue;
        }
        if flows.len() >= MAX_FLOWS {
            let oldest = flows.iter().min_by_key(|(_, f)| f.last).map(|(a, _)| *a);
            if let Some(f) = oldest.and_then(|a| flows.remove(&a)) {
                f.stop.cancel();
                link.counters.add(&link.counters.evicted);
            }
        }
        let Ok(up) = open_upstream(server).await else {
            // No socket for it now: the datagram is lost, as on a real link.
            link.counters.add(&link.counters.dropped);
            continue;
        };
        let up = Arc::new(up);
        let stop = link.stop.child_token();
        let back = Arc::new(Path {
            sink: Sink::Front(front.clone(), client),
            held: Mutex::new(None),
        });
        tokio::spawn(back_loop(link.clone(), up.clone(), back, stop.clone()));
        let path = Arc::new(Path {
            sink: Sink::Upstream(up),
            held: Mutex::new(None),
        });
        flows.insert(
            client,
            Flow {
                path: path.clone(),
                last: now,
                stop,
            },
        );
        link.forward(&path, buf[..n].to_vec()).await;
    }
}

async fn open_upstream(server: SocketAddr) -> std::io::Result<UdpSocket> {
    let up = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    up.connect(server).await?;
    Ok(up)
}

/// Receives the server's datagrams for one client and forwards them.
async fn back_loop(link: Arc<Link>, up: Arc<UdpSocket>, back: Arc<Path>, stop: CancellationToken) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            r = up.recv(&mut buf) => match r {
                Ok(n) => n,
                // The server's port refused a datagram (it restarted or
                // stopped): later ones may be taken again.
                Err(_) => continue,
            },
        };
        link.forward(&back, buf[..n].to_vec()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP server that answers each datagram with itself (`echo`) or
    /// only reads it.
    async fn server(echo: bool) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let s = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = s.local_addr()?;
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                if echo {
                    let _ = s.send_to(&buf[..n], from).await;
                }
            }
        });
        Ok((addr, task))
    }

    #[tokio::test]
    async fn a_clean_link_forwards_every_datagram_both_ways_in_order() -> anyhow::Result<()> {
        let (server, task) = server(true).await?;
        let proxy = LossyProxy::start(
            server,
            Faults {
                seed: 1,
                per_million: 0,
                max_delay: Duration::from_millis(10),
            },
        )
        .await?;
        let client = UdpSocket::bind("127.0.0.1:0").await?;
        client.connect(proxy.addr()).await?;
        let mut buf = [0u8; 16];
        for i in 0u8..50 {
            client.send(&[i]).await?;
            let n = tokio::time::timeout(PATIENCE, client.recv(&mut buf)).await??;
            assert_eq!(&buf[..n], &[i]);
        }
        let c = proxy.counts();
        assert_eq!((c.received, c.sent), (100, 100));
        assert_eq!(
            (c.dropped, c.duplicated, c.reordered, c.delayed),
            (0, 0, 0, 0)
        );
        // Dropped, it stops: its tasks end and release its port.
        let addr = proxy.addr();
        drop(proxy);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while std::net::UdpSocket::bind(addr).is_err() {
            assert!(tokio::time::Instant::now() < deadline, "{addr} still bound");
            tokio::task::yield_now().await;
        }
        task.abort();
        Ok(())
    }

    #[tokio::test]
    async fn a_lossy_link_drops_duplicates_reorders_and_delays() -> anyhow::Result<()> {
        let (server, task) = server(false).await?;
        let proxy = LossyProxy::start(
            server,
            Faults {
                seed: 7,
                per_million: 200_000,
                max_delay: Duration::from_millis(5),
            },
        )
        .await?;
        let client = UdpSocket::bind("127.0.0.1:0").await?;
        client.connect(proxy.addr()).await?;
        // One at a time, each once the proxy took the one before, so no
        // socket buffer overflows: the faults are the proxy's alone.
        for i in 0..400u64 {
            client.send(&i.to_le_bytes()).await?;
            proxy.wait_for("received", |c| c.received > i).await?;
        }
        let c = proxy.counts();
        // At least 400 rolls at 20 % from a fixed seed: each fault happened.
        assert!(c.dropped > 0 && c.duplicated > 0, "{c:?}");
        assert!(c.reordered > 0 && c.delayed > 0, "{c:?}");
        drop(proxy);
        task.abort();
        Ok(())
    }

    #[tokio::test]
    async fn a_new_client_beyond_the_limit_replaces_the_quietest_flow() -> anyhow::Result<()> {
        let (server, task) = server(false).await?;
        let proxy = LossyProxy::start(
            server,
            Faults {
                seed: 3,
                per_million: 0,
                max_delay: Duration::from_millis(1),
            },
        )
        .await?;
        let mut clients = Vec::new();
        for i in 0..=MAX_FLOWS as u64 {
            let c = UdpSocket::bind("127.0.0.1:0").await?;
            c.send_to(&[1], proxy.addr()).await?;
            // Each flow opens (and forwards) in turn, so the first is the
            // quietest.
            proxy.wait_for("forwarded", |c| c.sent > i).await?;
            clients.push(c);
        }
        let c = proxy.counts();
        assert_eq!((c.received, c.sent, c.evicted), (257, 257, 1), "{c:?}");
        task.abort();
        Ok(())
    }
}
