//! The data plane: piece bytes between members, as HTTP/1.1 Range requests
//! over TLS 1.3, on the peer port.
//!
//! One route: `GET /v1/blobs/sha256:<hex>` with `Range: bytes=<a>-<b>`.
//! Peers ask for content by digest only; the registry and repository
//! headers only tell a node that does not have the blob where its own
//! configured origin keeps it (an unconfigured registry is refused), so the
//! port cannot be used as a proxy. A connection whose certificate is not a
//! live member's is refused in the handshake.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{tls, Swarm, SwarmError};
use crate::config::SwarmConfig;
use crate::oci::Digest;
use crate::telemetry::Metrics;

pub const REGISTRY_HEADER: &str = "x-damselfly-registry";
pub const REPOSITORY_HEADER: &str = "x-damselfly-repository";
pub const SIZE_HEADER: &str = "x-damselfly-size";
pub const SUMS_HEADER: &str = "x-damselfly-sums";
/// `1`: the asker takes this node for a relay of the piece (a node that
/// pulls the blob too): answer from the store or a download in flight,
/// never start one.
pub const RELAY_HEADER: &str = "x-damselfly-relay";

/// A peer that sends nothing of its request for this long is dropped.
/// hyper also applies it to a kept-alive connection waiting for its next
/// request, so it is the idle limit too: long enough to keep connections
/// between members warm across pieces.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A TLS handshake that takes longer is dropped (and counted as refused).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A piece in flight at shutdown may finish for this long.
const DRAIN: Duration = Duration::from_secs(5);

type Body = BoxBody<Bytes, std::io::Error>;

/// What the data plane needs from the engine: bytes of a blob, for a peer.
/// The fetch engine is the real one (`fetch::Fetcher`); the data plane
/// knows nothing else of it.
pub trait PeerBlobs: Send + Sync + 'static {
    /// Opens bytes of `ask.digest` for a peer: from the store, from a
    /// download in flight, or (with `ask.origin` a configured registry)
    /// from a new download of just the pieces peers ask for.
    fn read_for_peer<'a>(
        &'a self,
        ask: PeerAsk<'a>,
    ) -> futures_util::future::BoxFuture<'a, Result<PeerRead, ServeError>>;
}

/// A peer's piece request, as the data plane parsed it.
#[derive(Debug, Clone, Copy)]
pub struct PeerAsk<'a> {
    pub digest: &'a Digest,
    pub start: u64,
    pub end_incl: u64,
    /// The size the peer knows the blob to have.
    pub size: Option<u64>,
    /// Where the peer's origin keeps the blob, `(registry, repository)`.
    pub origin: Option<(&'a str, &'a str)>,
    /// Asked as a relay ([`RELAY_HEADER`]): only a download that pulls the
    /// whole blob here, or the store, may answer.
    pub relay: bool,
}

/// The engine's answer to a [`PeerAsk`].
pub enum PeerRead {
    /// Not here, and not fetchable here.
    NotHere,
    /// `start` lies past the end of a blob of `size` bytes.
    OutOfRange { size: u64 },
    /// Bytes `start..end` of a blob of `size` bytes.
    Bytes {
        size: u64,
        start: u64,
        end: u64,
        /// Chunk checksums from `start`, when this node holds the verified
        /// blob.
        sums: Option<Vec<u64>>,
        media_type: Option<String>,
        body: PeerBody,
    },
}

/// Bytes for a peer: `Sync` too, as hyper's boxed bodies must be.
pub type PeerBody = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static>,
>;

/// Why the engine could not open bytes for a peer (answered as 502).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ServeError(pub String);

/// The bound data-plane socket, with its TLS acceptor.
pub struct Listener {
    tcp: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    metrics: Metrics,
}

impl Listener {
    pub async fn bind(
        cfg: &SwarmConfig,
        identity: &tls::TlsIdentity,
        trusted: tls::Trusted,
        metrics: Metrics,
    ) -> Result<Listener, SwarmError> {
        let tcp =
            TcpListener::bind(cfg.data_listen)
                .await
                .map_err(|source| SwarmError::DataListen {
                    addr: cfg.data_listen,
                    source,
                })?;
        let tls = if cfg.data_tls {
            Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
                identity, trusted,
            )?))
        } else {
            None
        };
        Ok(Listener { tcp, tls, metrics })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.tcp
            .local_addr()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

/// Serves piece requests until `shutdown` fires.
pub async fn serve(
    listener: Listener,
    blobs: Arc<dyn PeerBlobs>,
    swarm: Swarm,
    shutdown: CancellationToken,
) {
    let uploads = Arc::new(Semaphore::new(swarm.max_uploads()));
    let Listener { tcp, tls, metrics } = listener;
    let handle = move |stream: TcpStream, remote: SocketAddr, stop: CancellationToken| {
        let _ = stream.set_nodelay(true);
        let blobs = blobs.clone();
        let swarm = swarm.clone();
        let uploads = uploads.clone();
        let tls = tls.clone();
        let metrics = metrics.clone();
        async move {
            match tls {
                Some(acceptor) => {
                    let accepted =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                    let stream = match accepted {
                        Ok(Ok(s)) => s,
                        // rustls' verdicts arrive as InvalidData; a peer that
                        // hung up mid-handshake (a hedge that lost its race)
                        // is not a refusal.
                        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                            metrics.peer_refused.inc();
                            tracing::info!(remote = %remote, error = %e, "data plane handshake refused");
                            return;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(remote = %remote, error = %e, "data plane handshake abandoned");
                            return;
                        }
                        Err(_) => {
                            metrics.peer_refused.inc();
                            return;
                        }
                    };
                    let peer = tls::peer_fingerprint(stream.get_ref().1)
                        .and_then(|fp| swarm.member_by_fingerprint(&fp));
                    serve_conn(stream, remote, peer, blobs, swarm, uploads, stop).await;
                }
                None => {
                    let peer = swarm.member_by_ip(remote.ip());
                    serve_conn(stream, remote, peer, blobs, swarm, uploads, stop).await;
                }
            }
        }
    };
    crate::http::serve("data plane", tcp, handle, shutdown, DRAIN).await
}

async fn serve_conn<S>(
    stream: S,
    remote: SocketAddr,
    peer: Option<libp2p::PeerId>,
    blobs: Arc<dyn PeerBlobs>,
    swarm: Swarm,
    uploads: Arc<Semaphore>,
    stop: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let label = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
    let svc = hyper::service::service_fn(move |req| {
        let (blobs, swarm, uploads, label) =
            (blobs.clone(), swarm.clone(), uploads.clone(), label.clone());
        async move { Ok::<_, Infallible>(handle(req, blobs, swarm, uploads, label).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(IDLE_TIMEOUT)
        .max_buf_size(64 << 10);
    if let Err(e) = crate::http::serve_hyper(stream, svc, &builder, &stop).await {
        tracing::debug!(remote = %remote, error = %e, "data plane connection ended with an error");
    }
}

fn plain(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

async fn handle(
    req: Request<Incoming>,
    blobs: Arc<dyn PeerBlobs>,
    swarm: Swarm,
    uploads: Arc<Semaphore>,
    peer: String,
) -> Response<Body> {
    if req.method() != http::Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET");
    }
    let Some(digest) = req
        .uri()
        .path()
        .strip_prefix("/v1/blobs/")
        .and_then(|d| d.parse::<Digest>().ok())
    else {
        return plain(StatusCode::NOT_FOUND, "only /v1/blobs/sha256:<hex>");
    };
    let range = req.headers().get(http::header::RANGE);
    let range = range.and_then(|v| crate::http::parse_range(v.to_str().ok()?).ok());
    // `bytes=<a>-<b>`, both given: the only form peers send.
    let Some((start, end_incl)) = range.and_then(crate::http::ByteRange::bounded) else {
        return plain(
            StatusCode::BAD_REQUEST,
            "Range: bytes=<start>-<end> is required",
        );
    };
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let size_hint = header(SIZE_HEADER).and_then(|s| s.parse::<u64>().ok());
    let (registry, repo) = (header(REGISTRY_HEADER), header(REPOSITORY_HEADER));
    let Ok(permit) = uploads.clone().try_acquire_owned() else {
        swarm.metrics().uploads_busy.inc();
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many uploads in progress",
        );
    };
    let ask = PeerAsk {
        digest: &digest,
        start,
        end_incl,
        size: size_hint,
        origin: registry.as_deref().zip(repo.as_deref()),
        relay: header(RELAY_HEADER).is_some_and(|v| v == "1"),
    };
    let ask_relay = ask.relay;
    let (size, start, end, sums, media_type, body) = match blobs.read_for_peer(ask).await {
        Ok(PeerRead::Bytes {
            size,
            start,
            end,
            sums,
            media_type,
            body,
        }) => (size, start, end, sums, media_type, body),
        Ok(PeerRead::NotHere) => return plain(StatusCode::NOT_FOUND, "not here"),
        Ok(PeerRead::OutOfRange { size }) => {
            let mut r = plain(StatusCode::RANGE_NOT_SATISFIABLE, "range outside the blob");
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(http::header::CONTENT_RANGE, v);
            }
            return r;
        }
        Err(e) => {
            tracing::debug!(digest = %digest, error = %e, "cannot serve a peer");
            return plain(StatusCode::BAD_GATEWAY, &e.to_string());
        }
    };
    let counter = swarm
        .metrics()
        .peer_bytes
        .with_label_values(&[&peer, "out"]);
    let relayed = ask_relay.then(|| swarm.metrics().relay_served_bytes.clone());
    let throttle = swarm.clone();
    // Held by the body: the upload slot is free when the body is dropped.
    let permit = Arc::new(permit);
    let stream = body.and_then(move |chunk: Bytes| {
        let counter = counter.clone();
        let relayed = relayed.clone();
        let throttle = throttle.clone();
        let _slot = permit.clone();
        async move {
            throttle.throttle_out(chunk.len() as u64).await;
            counter.inc_by(chunk.len() as u64);
            if let Some(r) = &relayed {
                r.inc_by(chunk.len() as u64);
            }
            Ok(chunk)
        }
    });
    let mut r = Response::new(StreamBody::new(stream.map_ok(Frame::data)).boxed());
    *r.status_mut() = StatusCode::PARTIAL_CONTENT;
    let h = r.headers_mut();
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end.saturating_sub(1)))
    {
        h.insert(http::header::CONTENT_RANGE, v);
    }
    if let Some(mt) = media_type.and_then(|mt| HeaderValue::from_str(&mt).ok()) {
        h.insert(http::header::CONTENT_TYPE, mt);
    }
    if let Some(sums) = sums {
        let text: Vec<String> = sums.iter().map(|s| format!("{s:016x}")).collect();
        if let Ok(v) = HeaderValue::from_str(&text.join(",")) {
            h.insert(SUMS_HEADER, v);
        }
    }
    r
}

/// Parses the checksum header: comma-separated 16-digit hex values.
pub fn parse_sums(v: &str) -> Option<Vec<u64>> {
    v.split(',')
        .map(|s| u64::from_str_radix(s.trim(), 16).ok())
        .collect()
}

/// A byte-rate limit shared by every transfer in one direction. Callers
/// take what they send and sleep off any debt, so the rate holds on average
/// without a buffer of its own.
pub struct RateLimiter {
    rate: f64,
    state: std::sync::Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// `None` for 0 (unlimited).
    pub fn new(bytes_per_sec: u64) -> Option<RateLimiter> {
        (bytes_per_sec > 0).then(|| RateLimiter {
            rate: bytes_per_sec as f64,
            state: std::sync::Mutex::new((0.0, Instant::now())),
        })
    }

    pub async fn take(&self, n: u64) {
        let wait = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // Credit for idle time is capped at 50 ms of traffic, so a quiet
            // link does not allow a long burst.
            let credit = (now - st.1).as_secs_f64() * self.rate;
            st.0 = (st.0 - credit).max(-self.rate * 0.05);
            st.1 = now;
            st.0 += n as f64;
            st.0 / self.rate
        };
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_header() {
        assert_eq!(
            parse_sums("00000000000000ff,0000000000000001"),
            Some(vec![255, 1])
        );
        assert_eq!(parse_sums("xyz"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_holds_the_rate() {
        let l = RateLimiter::new(1_000_000).unwrap();
        let t = tokio::time::Instant::now();
        for _ in 0..10 {
            l.take(100_000).await;
        }
        let took = t.elapsed().as_secs_f64();
        assert!(
            (0.85..1.2).contains(&took),
            "took {took} s for 1 MB at 1 MB/s"
        );
    }
}
