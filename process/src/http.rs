//! The daemons' HTTP listener (metrics endpoint, web console): HTTP/1.1 over
//! TCP, plain or TLS, with the limits a listener reachable by anyone on the
//! network needs.
//!
//! * at most [`HttpLimits::max_connections`] connections at once: past that,
//!   new ones wait in the kernel's backlog, nothing more is allocated; and
//!   at most [`HttpLimits::max_per_address`] from one address (IPv6: one
//!   /64), past which a new one is closed at once, so one client cannot
//!   take every slot;
//! * a TLS handshake and a request's head must arrive within
//!   [`HttpLimits::header_timeout`], and a head is at most
//!   [`HttpLimits::max_head_bytes`]: a slow or endless client holds one
//!   connection for that long, no more;
//! * at shutdown every connection is asked to close after its current
//!   response; long responses (server-sent events) are cut after
//!   [`HttpLimits::close_grace`].
//!
//! Each request carries the [`Peer`] it came from as an extension, for
//! handlers that decide by address or by transport.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Bounds of one HTTP listener.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once from one address (IPv6: one /64).
    pub max_per_address: usize,
    /// Time for a TLS handshake, and for each request's head to arrive.
    pub header_timeout: Duration,
    /// Largest request head (request line and headers) read.
    pub max_head_bytes: usize,
    /// How long open responses get to finish at shutdown.
    pub close_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 64,
            max_per_address: 16,
            header_timeout: Duration::from_secs(10),
            max_head_bytes: 16 * 1024,
            close_grace: Duration::from_secs(2),
        }
    }
}

/// Where a request came from: the client's address, and whether the
/// connection was TLS.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls: bool,
}

/// Serves `app` on `listener` until `shutdown` is cancelled: over TLS with
/// `tls`, else plain. Returns once every connection is closed (at most
/// `close_grace` after the cancellation). Connection errors are logged at
/// debug level (they are the client's), never returned.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: axum::Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let connections = TaskTracker::new();
    let per_address = Arc::new(Mutex::new(HashMap::<IpAddr, usize>::new()));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: the listener
                    // stays; the next accept may succeed.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(counted) = Counted::take(&per_address, addr.ip(), limits.max_per_address) else {
            tracing::debug!(%addr, "HTTP connection refused: too many from its address");
            drop(stream);
            continue;
        };
        let (app, limits, shutdown, acceptor) = (
            app.clone(),
            limits.clone(),
            shutdown.clone(),
            acceptor.clone(),
        );
        connections.spawn(async move {
            let _permit = permit;
            let _counted = counted;
            match acceptor {
                None => {
                    let peer = Peer { addr, tls: false };
                    connection(stream, peer, app, &limits, &shutdown).await;
                }
                Some(acceptor) => {
                    let handshake = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        h = tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)) => h,
                    };
                    match handshake {
                        Ok(Ok(stream)) => {
                            let peer = Peer { addr, tls: true };
                            connection(stream, peer, app, &limits, &shutdown).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// The block an address's connections are counted under: the address, or
/// its /64 for IPv6 (one host usually holds a whole /64).
fn counted_as(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
    }
}

/// One connection counted against its address until dropped.
struct Counted {
    table: Arc<Mutex<HashMap<IpAddr, usize>>>,
    key: IpAddr,
}

impl Counted {
    /// Counts a connection from `ip`, unless its address has `max` already.
    fn take(table: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, max: usize) -> Option<Counted> {
        let key = counted_as(ip);
        let mut t = table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = t.entry(key).or_insert(0);
        if *n >= max.max(1) {
            return None;
        }
        *n += 1;
        Some(Counted {
            table: table.clone(),
            key,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut t = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = t.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.remove(&self.key);
            }
        }
    }
}

/// One connection's requests, until the client closes it or shutdown.
async fn connection<S>(
    stream: S,
    peer: Peer,
    app: axum::Router,
    limits: &HttpLimits,
    shutdown: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(peer);
        app.clone().oneshot(req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_head_bytes.max(8192));
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        done = conn.as_mut() => {
            if let Err(e) = done {
                tracing::debug!(addr = %peer.addr, error = %e, "HTTP connection ended");
            }
            return;
        }
        _ = shutdown.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    if tokio::time::timeout(limits.close_grace, conn)
        .await
        .is_err()
    {
        tracing::debug!(addr = %peer.addr, "HTTP response cut at shutdown");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn started(
        limits: HttpLimits,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new().route(
            "/peer",
            axum::routing::get(|axum::Extension(peer): axum::Extension<Peer>| async move {
                format!("{} tls={}", peer.addr.ip(), peer.tls)
            }),
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, None, app, limits, stop.clone()));
        (addr, stop, task)
    }

    async fn try_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        try_get(addr, path).await.expect("GET")
    }

    #[tokio::test]
    async fn a_request_is_answered_with_its_peer() {
        let (addr, stop, task) = started(HttpLimits::default()).await;
        let reply = get(addr, "/peer").await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with("127.0.0.1 tls=false"), "{reply}");
        assert!(get(addr, "/nothing").await.starts_with("HTTP/1.1 404"));
        stop.cancel();
        task.await.expect("serve ends");
    }

    #[tokio::test]
    async fn a_head_larger_than_the_limit_is_refused() {
        let (addr, stop, task) = started(HttpLimits {
            max_head_bytes: 8192,
            ..HttpLimits::default()
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let huge = "a".repeat(64 * 1024);
        let _ = s
            .write_all(format!("GET /peer HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n").as_bytes())
            .await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
        stop.cancel();
        task.await.expect("serve ends");
    }

    #[tokio::test]
    async fn a_silent_client_is_closed_after_the_header_timeout() {
        let (addr, stop, task) = started(HttpLimits {
            header_timeout: Duration::from_millis(200),
            ..HttpLimits::default()
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /peer HTTP/1.1\r\n").await.expect("write");
        let mut out = Vec::new();
        // The server closes (possibly with a 408); the read ends either way.
        let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the connection was not closed");
        stop.cancel();
        task.await.expect("serve ends");
    }

    #[tokio::test]
    async fn one_address_cannot_take_every_connection() {
        let (addr, stop, task) = started(HttpLimits {
            max_per_address: 2,
            ..HttpLimits::default()
        })
        .await;
        let _a = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _b = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // The third is closed at once: it reads the end (or a reset), not
        // an answer.
        let reply = try_get(addr, "/peer").await.unwrap_or_default();
        assert_eq!(reply, "", "{reply}");
        drop((_a, _b));
        // Slots come back when connections close.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if try_get(addr, "/peer")
                .await
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "slots never came back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.expect("serve ends");
    }

    #[test]
    fn ipv6_addresses_are_counted_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(counted_as(a), counted_as(b));
        assert_ne!(counted_as(a), counted_as(c));
    }

    #[tokio::test]
    async fn shutdown_ends_open_connections() {
        let (addr, stop, task) = started(HttpLimits::default()).await;
        let _idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // Served once so the idle connection is surely accepted.
        assert!(get(addr, "/peer").await.starts_with("HTTP/1.1 200"));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("serve returns after shutdown")
            .expect("serve ends");
    }
}
