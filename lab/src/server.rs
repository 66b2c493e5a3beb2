//! A hyper 1 HTTP/1.1 server on 127.0.0.1:<free port>, running on a tokio
//! runtime of its own on a thread of its own, so tests can use it from sync
//! or async code and drop it anywhere (dropping a runtime inside another
//! runtime would panic).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// The error type of lab bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type lab servers answer with.
pub type LabBody = BoxBody<Bytes, BoxError>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> LabBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A response with a status, a content type and a complete body.
pub fn simple_response(
    status: u16,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<LabBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// A running server; shuts its runtime down (dropping every connection) on
/// drop.
pub struct ServerThread {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    /// Binds 127.0.0.1:0 and serves every connection with `handler`.
    /// `worker_threads` of 1 gives a current-thread runtime.
    pub fn start<H, Fut>(name: &str, worker_threads: usize, handler: H) -> io::Result<ServerThread>
    where
        H: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<LabBody>> + Send + 'static,
    {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = if worker_threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(worker_threads)
                .thread_name(format!("{name}-rt"))
                .enable_all()
                .build()?
        };
        let handler = Arc::new(handler);
        let (shutdown_tx, mut shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(e) => {
                            eprintln!("lab server: cannot register listener: {e}");
                            return;
                        }
                    };
                    loop {
                        tokio::select! {
                            _ = &mut shutdown_rx => break,
                            accepted = listener.accept() => {
                                let stream = match accepted {
                                    Ok((stream, _)) => stream,
                                    Err(_) => {
                                        // E.g. out of file descriptors: back off.
                                        tokio::time::sleep(Duration::from_millis(10)).await;
                                        continue;
                                    }
                                };
                                let _ = stream.set_nodelay(true);
                                let handler = handler.clone();
                                tokio::spawn(async move {
                                    let service = service_fn(move |req| {
                                        let handler = handler.clone();
                                        async move { Ok::<_, Infallible>(handler(req).await) }
                                    });
                                    let _ = http1::Builder::new()
                                        .serve_connection(TokioIo::new(stream), service)
                                        .await;
                                });
                            }
                        }
                    }
                });
                runtime.shutdown_timeout(Duration::from_millis(200));
            })?;
        Ok(ServerThread {
            addr,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    /// The bound address (127.0.0.1:port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
