//! The router's HTTP server: HTTP/1.1 and HTTP/2 (prior knowledge, or over TLS when
//! `--api-tls-*` is set) on one port, served by hyper-util's auto builder so the bounds against slow and greedy
//! clients can be set: a client must have sent its first bytes (enough to tell HTTP/1
//! from HTTP/2's preface) and, for HTTP/1, its request headers, each within
//! `--http-header-timeout-secs`; an HTTP/2 connection carries at most
//! `--max-concurrent-streams` streams at once; keep-alive pings find vanished HTTP/2
//! peers. Bodies are bounded per request by [`super::body`].
//!
//! Shutdown matches `axum::serve`'s graceful mode, which this replaces: once `stop` is
//! cancelled the listener closes, every connection finishes its in-flight requests
//! (HTTP/1 then closes, HTTP/2 sends GOAWAY), and [`serve`] returns when all are gone.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use moe_tls::server::ServerIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::limits::{HttpLimits, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

/// What every HTTP/2 connection starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves `app` on the connections `conns` yields ([`moe_tls::server::incoming`]: plain
/// TCP, or TLS whose handshakes already finished) until `stop` is cancelled and every
/// connection has closed. Dropping `conns` closes the listener behind it.
pub async fn serve(
    mut conns: mpsc::Receiver<io::Result<ServerIo>>,
    app: Router,
    limits: HttpLimits,
    stop: CancellationToken,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let graceful = GracefulShutdown::new();
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => break,
            conn = conns.recv() => match conn {
                Some(Ok(conn)) => conn,
                // Refused TLS handshakes were logged where they happened.
                Some(Err(_)) => continue,
                // The accept task is gone (never while `conns` lives).
                None => break,
            },
        };
        let peer = conn.peer().remote;
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_timeout = limits.header_read_timeout;
        let app = app.clone();
        tokio::spawn(async move {
            // The auto builder waits for the protocol's first bytes without a deadline.
            let mut tcp = conn;
            let head = match tokio::time::timeout(header_timeout, first_bytes(&mut tcp)).await {
                Ok(Ok(head)) => head,
                Ok(Err(e)) => {
                    tracing::debug!(?peer, error = %e, "HTTP connection ended before a request");
                    return;
                }
                Err(_) => {
                    tracing::debug!(?peer, "HTTP client sent nothing in time; closing");
                    return;
                }
            };
            let io = TokioIo::new(Replay { head, pos: 0, tcp });
            let conn = builder
                .serve_connection(io, TowerToHyperService::new(app))
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(?peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(conns);
    graceful.shutdown().await;
    Ok(())
}

/// Reads until the bytes either are HTTP/2's whole preface or stop matching it (HTTP/1).
async fn first_bytes(tcp: &mut ServerIo) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(H2_PREFACE.len());
    let mut chunk = [0u8; H2_PREFACE.len()];
    while head.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&head) {
        let n = tcp
            .read(&mut chunk[..H2_PREFACE.len() - head.len()])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(head)
}

/// A connection whose first bytes were already read: they are read again first.
struct Replay {
    head: Vec<u8>,
    pos: usize,
    tcp: ServerIo,
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.head.len() {
            let n = buf.remaining().min(this.head.len() - this.pos);
            buf.put_slice(&this.head[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A server of one route on a free port, with a short header timeout.
    async fn start(header_timeout: Duration) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "hello" }));
        let limits = HttpLimits {
            header_read_timeout: header_timeout,
            ..HttpLimits::default()
        };
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            moe_tls::server::incoming(listener, None),
            app,
            limits,
            stop.clone(),
        ));
        (addr, stop)
    }

    /// Everything the server sends until it closes (bounded, so a hang fails the test).
    async fn until_closed(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
            .await
            .expect("the server should close the connection")
            .ok();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_http1_and_closes_on_clients_too_slow_with_their_headers() {
        let (addr, stop) = start(Duration::from_millis(200)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = until_closed(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("hello"), "{answer}");

        // Silent after connecting.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert_eq!(until_closed(&mut silent).await, "");
        // Stalls inside its headers.
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        let answer = until_closed(&mut partial).await;
        assert!(!answer.contains("200"), "{answer}");
        // Stalls inside what could still be HTTP/2's preface.
        let mut preface = TcpStream::connect(addr).await.unwrap();
        preface.write_all(b"PRI * HTTP/2").await.unwrap();
        assert_eq!(until_closed(&mut preface).await, "");
        stop.cancel();
    }

    #[tokio::test]
    async fn stops_accepting_once_stopped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "hello" }));
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(
            moe_tls::server::incoming(listener, None),
            app,
            HttpLimits::default(),
            stop.clone(),
        ));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("serve returns once stopped")
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
