//! The admin API over a Unix socket: HTTP/1.1 with JSON bodies.
//!
//! ```text
//! GET  /v1/blobs | /v1/stats | /v1/images | /v1/peers
//! POST /v1/inspect | /v1/pin | /v1/unpin   {"target": "..."}
//! POST /v1/gc                               {"target": bytes|null, "dry_run": bool}
//! POST /v1/verify                           {"repair": bool} -> NDJSON stream
//! ```
//!
//! The socket is created mode 0600 without a window in which anyone else
//! could connect: it is bound inside a fresh 0700 directory, chmodded, then
//! renamed into place. Connections are also checked by peer credentials:
//! only root and the daemon's own user may talk to it.

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::unix::SocketAddr as UnixAddr;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::api::{self, path, ErrorBody, GcRequest, TargetRequest, VerifyEvent, VerifyRequest};
use super::{AdminError, Node};

type Body = BoxBody<Bytes, io::Error>;

/// Requests are small JSON objects.
const MAX_REQUEST: usize = 64 << 10;
/// How often `verify` reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// A bound admin socket.
pub struct AdminListener {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's owner: the daemon's own user.
    owner: u32,
}

/// Binds the admin socket at `path`, replacing a stale socket file that
/// nothing answers on. Must run inside a tokio runtime.
pub fn bind(path: &Path) -> Result<AdminListener, AdminError> {
    let err = |reason: String| AdminError::Socket {
        path: path.to_owned(),
        reason,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err("another process answers on it".into()));
            }
            std::fs::remove_file(path).map_err(|e| err(format!("removing a stale socket: {e}")))?;
        }
        Ok(_) => return Err(err("exists and is not a socket".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| err(format!("creating its folder: {e}")))?;
    let private = parent.join(format!(".a{:08x}", rand::random::<u32>()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| err(format!("creating {}: {e}", private.display())))?;
    let staged = private.join("s");
    let result = (|| {
        let std_listener = std::os::unix::net::UnixListener::bind(&staged)
            .map_err(|e| err(format!("bind: {e}")))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| err(format!("chmod: {e}")))?;
        let owner = std::fs::metadata(&staged)
            .map_err(|e| err(e.to_string()))?
            .uid();
        std::fs::rename(&staged, path).map_err(|e| err(format!("rename: {e}")))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| err(e.to_string()))?;
        let listener = UnixListener::from_std(std_listener).map_err(|e| err(e.to_string()))?;
        Ok(AdminListener {
            listener,
            path: path.to_owned(),
            owner,
        })
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    result
}

impl AdminListener {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A command in flight at shutdown (a verify's stream, a GC) may finish
/// for this long.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `node` until `shutdown` fires, then removes the socket file.
pub async fn serve(admin: AdminListener, node: Arc<Node>, shutdown: CancellationToken) {
    let AdminListener {
        listener,
        path,
        owner,
    } = admin;
    let handle = move |stream: UnixStream, _: UnixAddr, stop: CancellationToken| {
        let node = node.clone();
        async move {
            match stream.peer_cred() {
                Ok(c) if c.uid() == 0 || c.uid() == owner => {}
                Ok(c) => {
                    tracing::warn!(
                        uid = c.uid(),
                        "admin connection refused: not root or the daemon's user"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin connection refused: no peer credentials");
                    return;
                }
            }
            let svc = hyper::service::service_fn(move |req| {
                let node = node.clone();
                async move { Ok::<_, Infallible>(route(req, node).await) }
            });
            let builder = hyper::server::conn::http1::Builder::new();
            let _ = crate::http::serve_hyper(stream, svc, &builder, &stop).await;
        }
    };
    crate::http::serve("admin", listener, handle, shutdown, DRAIN).await;
    let _ = std::fs::remove_file(&path);
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full(Vec::new())))
}

fn full(b: Vec<u8>) -> Body {
    Full::new(Bytes::from(b)).map_err(|n| match n {}).boxed()
}

fn error(e: &AdminError) -> Response<Body> {
    let status = match e {
        AdminError::InvalidDigest(_)
        | AdminError::InvalidReference(_)
        | AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
        AdminError::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json(status, &ErrorBody { error: e.to_api() })
}

async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, AdminError> {
    let bytes = Limited::new(req.into_body(), MAX_REQUEST)
        .collect()
        .await
        .map_err(|e| AdminError::BadRequest(format!("reading the request: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| AdminError::BadRequest(e.to_string()))
}

/// Runs blocking store work off the runtime.
async fn blocking<T: Send + 'static>(
    node: Arc<Node>,
    f: impl FnOnce(&Node) -> Result<T, AdminError> + Send + 'static,
) -> Result<T, AdminError> {
    tokio::task::spawn_blocking(move || f(&node))
        .await
        .map_err(|e| AdminError::BadRequest(format!("admin task failed: {e}")))?
}

async fn answer<T: Serialize + Send + 'static>(
    node: Arc<Node>,
    f: impl FnOnce(&Node) -> Result<T, AdminError> + Send + 'static,
) -> Response<Body> {
    match blocking(node, f).await {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => error(&e),
    }
}

#[tracing::instrument(skip_all, fields(method = %req.method(), path = %req.uri().path()))]
async fn route(req: Request<Incoming>, node: Arc<Node>) -> Response<Body> {
    let method = req.method().clone();
    let p = req.uri().path().to_owned();
    match (method, p.as_str()) {
        (Method::GET, path::BLOBS) => answer(node, |n| Ok(n.list())).await,
        (Method::GET, path::STATS) => answer(node, |n| Ok(n.stats())).await,
        (Method::GET, path::IMAGES) => answer(node, |n| Ok(n.images())).await,
        (Method::GET, path::PEERS) => answer(node, |n| Ok(n.peers())).await,
        (Method::GET, path::PREWARM) => answer(node, |n| n.prewarm()).await,
        (Method::GET, path::GPU) => answer(node, |n| n.gpu()).await,
        (Method::POST, path::INSPECT | path::PIN | path::UNPIN) => {
            let t: TargetRequest = match body(req).await {
                Ok(t) => t,
                Err(e) => return error(&e),
            };
            match p.as_str() {
                path::INSPECT => answer(node, move |n| n.inspect(&t.target)).await,
                path::PIN => answer(node, move |n| n.pin(&t.target)).await,
                _ => answer(node, move |n| n.unpin(&t.target)).await,
            }
        }
        (Method::POST, path::EVICT) => match body::<api::EvictRequest>(req).await {
            Ok(e) => answer(node, move |n| n.evict(&e.digests)).await,
            Err(e) => error(&e),
        },
        (Method::POST, path::GC) => match body::<GcRequest>(req).await {
            Ok(g) => answer(node, move |n| n.gc(&g)).await,
            Err(e) => error(&e),
        },
        (Method::POST, path::VERIFY) => match body::<VerifyRequest>(req).await {
            Ok(v) => verify(node, v.repair),
            Err(e) => error(&e),
        },
        _ => error(&AdminError::NotFound(format!("no admin endpoint {p}"))),
    }
}

/// Streams progress lines while verify runs, then the report.
fn verify(node: Arc<Node>, repair: bool) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<VerifyEvent>(16);
    tokio::task::spawn_blocking(move || {
        let mut last = Instant::now() - PROGRESS_EVERY;
        let mut on_progress = |p: &api::VerifyProgress| {
            let done = p.blobs_done == p.blobs_total;
            if done || last.elapsed() >= PROGRESS_EVERY {
                last = Instant::now();
                let _ = tx.blocking_send(VerifyEvent::Progress(*p));
            }
        };
        let event = match node.verify(repair, &mut on_progress) {
            Ok(r) => VerifyEvent::Report(r),
            Err(e) => VerifyEvent::Error(e.to_api()),
        };
        let _ = tx.blocking_send(event);
    });
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, io::Error>(Frame::data(Bytes::from(line))), rx))
    });
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(BodyExt::boxed(StreamBody::new(lines)))
        .unwrap_or_else(|_| Response::new(full(Vec::new())))
}
