//! Logs, metrics and health.
//!
//! Metrics live in one [`prometheus::Registry`] that the daemon creates and
//! passes in; [`Metrics`] holds typed handles to each family. HTTP request
//! metrics are recorded once, in the mirror's service layer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryConfig};

/// Sets up tracing on stderr. `RUST_LOG`, when set, overrides the
/// configured level.
pub fn init_logging(cfg: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests start several daemons in one process) is fine to
    // ignore: the first subscriber stays.
    let _ = match cfg.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Handles to every metric family damselfly exports.
#[derive(Clone)]
pub struct Metrics {
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// Blob bytes sent to clients, by where they came from.
    pub bytes_served: IntCounterVec,
    /// Blob bytes received from origin registries.
    pub origin_bytes: IntCounter,
    pub origin_requests: IntCounterVec,
    pub origin_resumes: IntCounter,
    pub cache_lookups: IntCounterVec,
    pub digest_mismatches: IntCounter,
    /// Committed blobs found corrupt at rest and quarantined, by who found
    /// them (mirror, peer, scrub).
    pub corrupt_blobs: IntCounterVec,
    /// Bytes the background scrub re-verified.
    pub scrub_bytes: IntCounter,
    pub scrub_passes: IntCounter,
    /// Partial downloads removed while running, by reason (failed,
    /// expired, over_count).
    pub partials_removed: IntCounterVec,
    /// ECR `GetAuthorizationToken` calls by reason and result.
    pub ecr_token_fetches: IntCounterVec,
    pub stale_tags_served: IntCounter,
    pub downloads_in_flight: IntGauge,
    pub store_bytes: IntGauge,
    pub store_blobs: IntGauge,
    pub store_max_bytes: IntGauge,
    /// Live swarm members other than this node.
    pub swarm_members: IntGauge,
    /// Bytes that came into this node's downloads, by source (peer, origin).
    pub fetched_bytes: IntCounterVec,
    /// Data-plane bytes by peer and direction (in, out).
    pub peer_bytes: IntCounterVec,
    /// Time to get one piece, by where it came from (peer, origin).
    pub piece_seconds: HistogramVec,
    pub hedges: IntCounter,
    /// Piece bytes that came from peers asked as relays (nodes that pull
    /// the blob too), a part of `fetched_bytes{source="peer"}`.
    pub relayed_bytes: IntCounter,
    /// Piece bytes this node sent to peers that asked it as a relay.
    pub relay_served_bytes: IntCounter,
    pub distrusted_peers: IntCounter,
    /// Data-plane connections refused: not a member, or a failed handshake.
    pub peer_refused: IntCounter,
    /// Piece requests answered 503 because `swarm.max_uploads` were busy.
    pub uploads_busy: IntCounter,
}

/// Registers `c` in `r` and hands it back.
pub(crate) fn reg<T: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: T,
) -> Result<T, prometheus::Error> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let latency_buckets = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ];
        Ok(Metrics {
            http_requests: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "damselfly_http_requests_total",
                        "Mirror requests by route, method and status.",
                    ),
                    &["route", "method", "status"],
                )?,
            )?,
            http_duration: reg(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "damselfly_http_request_duration_seconds",
                        "Time from request to the end of the response body, by route.",
                    )
                    .buckets(latency_buckets),
                    &["route"],
                )?,
            )?,
            bytes_served: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "damselfly_bytes_served_total",
                        "Blob bytes sent to clients, by source (local; peer: a download taking pieces from peers; origin).",
                    ),
                    &["source"],
                )?,
            )?,
            origin_bytes: reg(
                registry,
                IntCounter::new(
                    "damselfly_origin_bytes_total",
                    "Blob bytes received from origin registries.",
                )?,
            )?,
            origin_requests: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "damselfly_origin_requests_total",
                        "Requests to origin registries by kind (manifest, blob, token) and status.",
                    ),
                    &["kind", "status"],
                )?,
            )?,
            origin_resumes: reg(
                registry,
                IntCounter::new(
                    "damselfly_origin_resumes_total",
                    "Blob downloads that broke and were resumed with Range.",
                )?,
            )?,
            cache_lookups: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "damselfly_cache_lookups_total",
                        "Cache lookups by kind (blob, manifest) and result (hit, miss, joined; negative: a recent 404 from the origin was answered again).",
                    ),
                    &["kind", "result"],
                )?,
            )?,
            digest_mismatches: reg(
                registry,
                IntCounter::new(
                    "damselfly_digest_mismatches_total",
                    "Downloads discarded because their content did not match the digest.",
                )?,
            )?,
            corrupt_blobs: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "damselfly_corrupt_blobs_total",
                        "Cached blobs whose bytes no longer matched (disk rot), quarantined and fetched again, \
                         by who found them (mirror: a cache hit for a client; peer: a cache hit for a peer; scrub).",
                    ),
                    &["found_by"],
                )?,
            )?,
            scrub_bytes: reg(
                registry,
                IntCounter::new(
                    "damselfly_scrub_bytes_total",
                    "Bytes of cached blobs re-verified by the background scrub.",
                )?,
            )?,
            scrub_passes: reg(
                registry,
                IntCounter::new(
                    "damselfly_scrub_passes_total",
                    "Background scrub passes completed over the whole cache.",
                )?,
            )?,
            partials_removed: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "damselfly_partials_removed_total",
                        "Partial downloads removed while running, by reason (failed: before its first byte; \
                         expired: idle past 24h; over_count: more idle partials than kept).",
                    ),
                    &["reason"],
                )?,
            )?,
            ecr_token_fetches: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "damselfly_ecr_token_fetches_total",
                        "ECR GetAuthorizationToken calls by reason (initial, expiring, unauthorized) \
                         and result (ok, no_credentials, rejected, denied, throttled, unreachable, error).",
                    ),
                    &["reason", "result"],
                )?,
            )?,
            stale_tags_served: reg(
                registry,
                IntCounter::new(
                    "damselfly_stale_tags_served_total",
                    "Tag resolutions answered from the last good answer while the origin was unreachable.",
                )?,
            )?,
            downloads_in_flight: reg(
                registry,
                IntGauge::new(
                    "damselfly_downloads_in_flight",
                    "Blob downloads in progress.",
                )?,
            )?,
            store_bytes: reg(
                registry,
                IntGauge::new("damselfly_store_bytes", "Bytes of committed blobs in the store.")?,
            )?,
            store_blobs: reg(
                registry,
                IntGauge::new("damselfly_store_blobs", "Committed blobs in the store.")?,
            )?,
            store_max_bytes: reg(
                registry,
                IntGauge::new("damselfly_store_max_bytes", "The store's quota in bytes.")?,
            )?,
            swarm_members: reg(
                registry,
                IntGauge::new(
                    "damselfly_swarm_members",
                    "Live swarm members other than this node.",
                )?,
            )?,
            fetched_bytes: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "damselfly_fetched_bytes_total",
                        "Blob bytes that came into this node's downloads, by source (peer, origin).",
                    ),
                    &["source"],
                )?,
            )?,
            peer_bytes: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "damselfly_peer_bytes_total",
                        "Data-plane bytes by peer (libp2p id) and direction (in, out).",
                    ),
                    &["peer", "direction"],
                )?,
            )?,
            piece_seconds: reg(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "damselfly_piece_seconds",
                        "Time to get one piece, by source (peer, origin).",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ]),
                    &["source"],
                )?,
            )?,
            relayed_bytes: reg(
                registry,
                IntCounter::new(
                    "damselfly_relayed_bytes_total",
                    "Piece bytes taken from peers that pull the blob too (relays), not from its owner or a holder.",
                )?,
            )?,
            relay_served_bytes: reg(
                registry,
                IntCounter::new(
                    "damselfly_relay_served_bytes_total",
                    "Piece bytes sent to peers that asked this node as a relay (a piece it pulled too, passed on).",
                )?,
            )?,
            hedges: reg(
                registry,
                IntCounter::new(
                    "damselfly_hedges_total",
                    "Piece requests hedged: a peer was slow to answer, so the next source was asked too.",
                )?,
            )?,
            distrusted_peers: reg(
                registry,
                IntCounter::new(
                    "damselfly_distrusted_peers_total",
                    "Peers distrusted for sending bytes that did not match.",
                )?,
            )?,
            peer_refused: reg(
                registry,
                IntCounter::new(
                    "damselfly_peer_refused_total",
                    "Data-plane connections refused (not a member, or a failed TLS handshake).",
                )?,
            )?,
            uploads_busy: reg(
                registry,
                IntCounter::new(
                    "damselfly_peer_uploads_busy_total",
                    "Piece requests turned away because swarm.max_uploads were in progress.",
                )?,
            )?,
        })
    }
}

/// Readiness as the health endpoint reports it: the daemon is up, and
/// nothing holds readiness back (prewarm with `gate_readiness`). Every
/// change is also published on a watch channel, so that the node gate can
/// wait for it ([`Health::subscribe`]).
#[derive(Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
    holds: Arc<std::sync::Mutex<std::collections::BTreeSet<&'static str>>>,
    published: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Health {
    fn default() -> Health {
        Health {
            ready: Arc::default(),
            holds: Arc::default(),
            published: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.publish();
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.waiting_for().is_empty()
    }

    /// Holds readiness back until [`Health::release`] of the same `what`.
    pub fn hold(&self, what: &'static str) {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(what);
        self.publish();
    }

    pub fn release(&self, what: &'static str) {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(what);
        self.publish();
    }

    /// What readiness waits for.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Follows [`Health::is_ready`]: `wait_for(|r| *r)` returns once it is.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.published.subscribe()
    }

    fn publish(&self) {
        self.published.send_replace(self.is_ready());
    }
}

/// One log line per `every` for a repeating event (bad peer messages, a
/// signal that keeps failing), so a flood of them cannot flood the log.
#[derive(Debug)]
pub struct Throttle {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    held: u64,
}

impl Throttle {
    pub fn new(every: std::time::Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            held: 0,
        }
    }

    /// `Some(n)` when this occurrence should be logged, `n` being how many
    /// were held back since the last line; `None` to stay quiet.
    pub fn allow(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }

    /// The next occurrence is logged whatever the time (the condition
    /// cleared, so a new one is news).
    pub fn reset(&mut self) {
        self.last = None;
        self.held = 0;
    }
}

/// The telemetry paths (the DaemonSet's probes use them; tests/daemonset.rs
/// checks that they match).
pub const METRICS_PATH: &str = "/metrics";
pub const HEALTH_PATH: &str = "/healthz";
pub const READY_PATH: &str = "/readyz";

/// More GET routes beside the telemetry ones (the sidecar's `/keda` and
/// `/v1/status`): the answer for a path, or `None` for a 404.
pub type Routes = Arc<dyn Fn(&str) -> Option<Response<Full<Bytes>>> + Send + Sync>;

/// A scrape or a probe in flight at shutdown may finish for this long.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    health: Health,
    shutdown: CancellationToken,
) {
    serve_with(listener, registry, health, Arc::new(|_| None), shutdown).await
}

/// [`serve`] with `routes` answered too.
pub async fn serve_with(
    listener: TcpListener,
    registry: Registry,
    health: Health,
    routes: Routes,
    shutdown: CancellationToken,
) {
    let handle = move |stream: TcpStream, _: SocketAddr, stop: CancellationToken| {
        let registry = registry.clone();
        let health = health.clone();
        let routes = routes.clone();
        async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r =
                    routes(req.uri().path()).unwrap_or_else(|| answer(&req, &registry, &health));
                async move { Ok::<_, Infallible>(r) }
            });
            let builder = hyper::server::conn::http1::Builder::new();
            let _ = crate::http::serve_hyper(stream, svc, &builder, &stop).await;
        }
    };
    crate::http::serve("telemetry", listener, handle, shutdown, DRAIN).await
}

fn answer(req: &Request<Incoming>, registry: &Registry, health: &Health) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match req.uri().path() {
        METRICS_PATH => {
            let mut buf = Vec::new();
            let encoder = TextEncoder::new();
            match encoder.encode(&registry.gather(), &mut buf) {
                Ok(()) => Response::builder()
                    .header(http::header::CONTENT_TYPE, encoder.format_type())
                    .body(Full::new(Bytes::from(buf)))
                    .unwrap_or_default(),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        HEALTH_PATH => text(StatusCode::OK, "ok\n".into()),
        READY_PATH if health.is_ready() => text(StatusCode::OK, "ready\n".into()),
        READY_PATH => {
            let waiting = health.waiting_for();
            let body = if waiting.is_empty() {
                "not ready\n".to_owned()
            } else {
                format!("not ready: waiting for {}\n", waiting.join(", "))
            };
            text(StatusCode::SERVICE_UNAVAILABLE, body)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Binds a listener, naming the address in the error.
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen for {what} on {addr}: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let mut t = Throttle::new(std::time::Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        t.reset();
        assert_eq!(t.allow(), Some(0));
        let mut fast = Throttle::new(std::time::Duration::ZERO);
        assert_eq!(fast.allow(), Some(0));
        assert_eq!(fast.allow(), Some(0));
    }

    /// The node gate follows readiness through `subscribe`, holds included
    /// (prewarm with `gate_readiness` holds it until the images are warm).
    #[test]
    fn subscribers_see_holds_and_releases() {
        let health = Health::default();
        let rx = health.subscribe();
        assert!(!*rx.borrow());
        health.hold("prewarm");
        health.set_ready(true);
        assert!(!health.is_ready() && !*rx.borrow());
        health.release("prewarm");
        assert!(health.is_ready() && *rx.borrow());
        health.set_ready(false);
        assert!(!*rx.borrow());
    }
}
