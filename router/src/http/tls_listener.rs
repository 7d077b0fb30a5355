//! The HTTP port over TLS: axum serves connections whose handshakes
//! [`moe_tls::server::incoming`] finished (each in its own task, bounded in time).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use moe_tls::server::ServerIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// An [`axum::serve::Listener`] of TLS connections.
pub struct TlsListener {
    conns: mpsc::Receiver<io::Result<ServerIo>>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, tls: Arc<moe_tls::ServerConfig>) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        Ok(TlsListener {
            conns: moe_tls::server::incoming(listener, Some(tls)),
            local,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = ServerIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ServerIo, SocketAddr) {
        loop {
            match self.conns.recv().await {
                Some(Ok(io)) => {
                    let addr = io.peer().remote.unwrap_or(self.local);
                    return (io, addr);
                }
                // Refused handshakes are logged where they happen.
                Some(Err(_)) => continue,
                // The accept task is gone (never while this listener lives).
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
