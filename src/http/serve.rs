//! The one accept loop, for every listener: the mirror (TCP), the data
//! plane (TLS on TCP), telemetry (TCP) and the admin API (a Unix socket).
//!
//! [`serve`] accepts until shutdown, runs each connection as a task with
//! the handler it is given, backs off when accepting fails, and on shutdown
//! stops accepting and lets the open connections finish for a bounded
//! drain. A TLS handshake is part of the handler, not of accepting: one
//! slow client must not hold up the others.

use std::fmt;
use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long the loop waits after a failed accept. Out of file descriptors
/// (EMFILE), typically: without a pause it would spin and flood the log.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A socket that [`serve`] accepts connections from.
pub trait Listener: Send + 'static {
    type Conn: Send + 'static;
    type Addr: fmt::Debug + Send + 'static;

    fn accept(&self) -> impl Future<Output = io::Result<(Self::Conn, Self::Addr)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    fn accept(&self) -> impl Future<Output = io::Result<(Self::Conn, Self::Addr)>> + Send {
        tokio::net::TcpListener::accept(self)
    }
}

impl Listener for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    fn accept(&self) -> impl Future<Output = io::Result<(Self::Conn, Self::Addr)>> + Send {
        tokio::net::UnixListener::accept(self)
    }
}

/// Accepts connections on `listener` until `shutdown` fires, each served
/// by `handle(conn, addr, shutdown)` in a task of its own. Then the
/// listener is closed and the open connections have `drain` to finish
/// (each handler sees `shutdown` and should end at its next idle moment);
/// those still open after it are cut. `name` labels the log lines.
pub async fn serve<L, H, F>(
    name: &'static str,
    listener: L,
    handle: H,
    shutdown: CancellationToken,
    drain: Duration,
) where
    L: Listener,
    H: Fn(L::Conn, L::Addr, CancellationToken) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (conn, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        conns.spawn(handle(conn, addr, shutdown.clone()));
    }
    drop(listener);
    while conns.try_join_next().is_some() {}
    if conns.is_empty() {
        return;
    }
    tracing::info!(
        listener = name,
        open = conns.len(),
        drain_s = drain.as_secs_f64(),
        "draining"
    );
    let drained =
        tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            listener = name,
            open = conns.len(),
            "drain timeout passed; cutting remaining connections"
        );
        conns.abort_all();
        // The cut tasks end at once; wait so that their sockets are closed
        // when this returns.
        while conns.join_next().await.is_some() {}
    }
}

/// Serves one HTTP/1.1 connection with hyper. When `shutdown` fires, a
/// connection idle between requests closes at once, a busy one after the
/// response in flight, and one that has sent nothing yet after its first
/// response (hyper cannot tell it from a request on its way); [`serve`]'s
/// drain bounds how long any of them takes.
pub async fn serve_hyper<I, S, B>(
    io: I,
    service: S,
    builder: &hyper::server::conn::http1::Builder,
    shutdown: &CancellationToken,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    conn.await
}

#[cfg(test)]
mod tests;
