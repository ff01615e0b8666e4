//! The daemons' HTTP listener (metrics endpoint, web console): HTTP/1.1 over
//! TCP, plain or TLS, with the limits a listener reachable by anyone on the
//! network needs.
//!
//! * at most [`HttpLimits::max_connections`] connections at once: past that,
//!   new ones wait in the kernel's backlog, nothing more is allocated;
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

use std::net::SocketAddr;
use std::sync::Arc;
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
        let (app, limits, shutdown, acceptor) = (
            app.clone(),
            limits.clone(),
            shutdown.clone(),
            acceptor.clone(),
        );
        connections.spawn(async move {
            let _permit = permit;
            match acceptor {
                None => {
                    let peer = Peer { addr, tls: false };
                    connection(stream, peer, app, &limits, &shutdown).await;
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await;
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

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
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
