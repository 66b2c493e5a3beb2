//! The scaling sidecar (`damselfly sidecar`): the autoscaler's signal,
//! turned into warm intents before the scale-out lands.
//!
//! It reads the same signal a KEDA ScaledObject scales on ([`signal`]),
//! computes the replicas KEDA will want, and when they rise it resolves the
//! workload's images to digests once ([`resolve`]) and publishes a warm
//! intent over the swarm ([`crate::swarm::intents`]). Every daemon whose
//! GPUs match, booting nodes included, prewarms the images at once
//! (`prewarm::feed`); each acks when an image is ready on it, which gives
//! the lead time: publication to the first node that holds the image.
//!
//! When the intent is published, and for how long it lives, is [`plan`]'s
//! business; this module does the I/O around it:
//!
//! - the signal is read every `sidecar.poll_interval` in a task of its own,
//!   so a slow Prometheus never delays an ack's timestamp;
//! - a live intent is published again every `sidecar.republish`, and
//!   [`JOIN_SETTLE`] after a daemon joins (a node Karpenter just booted gets
//!   it within about a second of joining the swarm); daemons only refresh
//!   its expiry;
//! - a failing signal is logged once per [`SIGNAL_LOG_EVERY`] and counted;
//!   the last intent is held until it expires, and none is opened;
//! - on SIGTERM nothing is released: a restarted sidecar (a rollout) must
//!   not unpin a scale-out's images. The intent lives until its expiry.
//!
//! It serves its own `/metrics`, the KEDA `metrics-api` answer (`/keda`),
//! `/v1/status` for `damselfly sidecar status`, `/healthz` and `/readyz`.

pub mod metrics;
pub mod plan;
pub mod resolve;
pub mod signal;
pub mod status;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use libp2p::PeerId;
use prometheus::Registry;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SidecarConfig};
use crate::oci::Digest;
use crate::origin::{Origin, OriginError};
use crate::prewarm::feed::IntentReady;
use crate::prewarm::IntentSelector;
use crate::swarm::intents::{SidecarLink, TopicMessage, INTENTS_TOPIC, READY_TOPIC};
use crate::swarm::{Role, SwarmError};
use crate::telemetry::{self, Health, Throttle};
pub use metrics::SidecarMetrics;
use plan::{Decision, LiveImage, Observation, Planner, Policy};
use signal::{Signal, SignalError};
pub use status::{KedaMetric, SidecarStatus};

/// Paths the sidecar serves beside `/metrics`, `/healthz`, `/readyz`.
pub const KEDA_PATH: &str = "/keda";
pub const STATUS_PATH: &str = "/v1/status";

/// After a daemon joins, the live intent goes out again this much later
/// (its gossipsub subscriptions and mesh settle first; a burst of joins
/// costs one publication).
pub const JOIN_SETTLE: Duration = Duration::from_secs(1);

/// A signal that keeps failing is logged at most this often.
pub const SIGNAL_LOG_EVERY: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(
        "the config has no [sidecar] section; `damselfly sidecar` needs sidecar.workload, \
         sidecar.images, sidecar.prometheus and sidecar.query (or sidecar.metrics_url and \
         sidecar.metric) and sidecar.threshold (see docs/sidecar.md)"
    )]
    NoConfig,
    /// Prometheus cannot run the configured query: a config error.
    #[error("{key}: Prometheus refuses it: {reason}")]
    BadQuery { key: &'static str, reason: String },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("swarm: {0}")]
    Swarm(#[from] SwarmError),
    #[error("{0}")]
    Listen(std::io::Error),
    #[error("the signal's HTTP client: {0}")]
    Client(String),
}

impl SidecarError {
    /// Config errors (exit 2) against failures to run (exit 1).
    pub fn is_config(&self) -> bool {
        matches!(self, SidecarError::NoConfig | SidecarError::BadQuery { .. })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs the sidecar until `shutdown` fires.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<(), SidecarError> {
    for w in &cfg.warnings {
        tracing::warn!(key = %w.path, "config: {}", w.message);
    }
    let sc = cfg.sidecar.clone().ok_or(SidecarError::NoConfig)?;
    let signal = Signal::new(&sc).map_err(SidecarError::Client)?;
    check_queries(&signal).await?;
    let prom = Registry::new();
    let metrics = SidecarMetrics::new(&prom)?;
    // The origin client's own counters are not the sidecar's business.
    let origin = Origin::new(&cfg, telemetry::Metrics::new(&Registry::new())?)?;
    let listener = telemetry::bind(sc.listen, "the sidecar")
        .await
        .map_err(SidecarError::Listen)?;
    let link = SidecarLink::join(&cfg.swarm).await?;
    let shared = Arc::new(Mutex::new(Shared::default()));
    let health = Health::default();
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(telemetry::serve_with(
        listener,
        prom,
        health.clone(),
        routes(shared.clone()),
        http_stop.clone(),
    ));
    let (source, query) = signal.describe();
    tracing::info!(workload = %sc.workload, source = %source, query = %query,
        threshold = sc.scaling.threshold, listen = %sc.listen, images = sc.images.len(),
        "sidecar started");
    let mut s = Sidecar {
        gpu: sc.gpu.as_ref().map(plan::intent_selector),
        planner: Planner::new(Policy {
            cooldown: sc.cooldown,
            ttl: sc.intent_ttl,
        }),
        cfg: sc,
        origin,
        link: link.clone(),
        metrics,
        shared,
        source: (source, query),
        last: None,
        last_error: None,
        failures: 0,
        polled_at: None,
        wanted: None,
        current: None,
        signal_log: Throttle::new(SIGNAL_LOG_EVERY),
        current_log: Throttle::new(SIGNAL_LOG_EVERY),
        ack_log: Throttle::new(SIGNAL_LOG_EVERY),
        released_at: None,
        members: BTreeMap::new(),
        join_at: None,
    };
    s.metrics.current_replicas.set(-1);
    s.refresh_shared();
    s.run(signal, &health, shutdown).await;
    if s.planner.live.is_some() {
        tracing::info!(
            "sidecar stopping; the live intent stays until it expires (a restart must not unpin a scale-out)"
        );
    }
    http_stop.cancel();
    link.shutdown().await;
    let _ = http.await;
    tracing::info!("sidecar stopped");
    Ok(())
}

/// A query Prometheus cannot parse fails the start, naming its key; a
/// Prometheus that cannot be reached now is a runtime condition (the
/// sidecar starts and keeps trying).
async fn check_queries(signal: &Signal) -> Result<(), SidecarError> {
    let checks: [(&'static str, Option<Result<f64, SignalError>>); 2] = [
        ("sidecar.query", Some(signal.value().await)),
        (
            "sidecar.current_query",
            signal.current().await.map(|r| r.map(f64::from)),
        ),
    ];
    for (key, r) in checks {
        match r {
            Some(Err(e)) if e.is_bad_query() => {
                return Err(SidecarError::BadQuery {
                    key,
                    reason: e.to_string(),
                })
            }
            Some(Err(e)) => tracing::warn!(key, error = %e,
                "cannot check the query at start; it is read again every sidecar.poll_interval"),
            _ => {}
        }
    }
    Ok(())
}

/// What the HTTP routes answer from.
#[derive(Default)]
struct Shared {
    status: Option<SidecarStatus>,
    keda: Option<KedaMetric>,
    keda_error: Option<String>,
}

fn routes(shared: Arc<Mutex<Shared>>) -> telemetry::Routes {
    Arc::new(move |path| {
        let json = |status: StatusCode, body: Vec<u8>| {
            Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_default()
        };
        let s = shared.lock().unwrap_or_else(|p| p.into_inner());
        match path {
            KEDA_PATH => Some(match (&s.keda, &s.keda_error) {
                (Some(k), None) => json(StatusCode::OK, serde_json::to_vec(k).unwrap_or_default()),
                // KEDA counts a non-2xx as a failed scaler read and applies
                // the ScaledObject's fallback, if any.
                (_, err) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({
                        "error": err.clone().unwrap_or_else(|| "no value read yet".into())
                    })
                    .to_string()
                    .into_bytes(),
                ),
            }),
            STATUS_PATH => Some(json(
                StatusCode::OK,
                serde_json::to_vec_pretty(&s.status).unwrap_or_default(),
            )),
            _ => None,
        }
    })
}

/// One read of the signal (and of the current replicas).
struct Poll {
    value: Result<f64, SignalError>,
    current: Option<Result<u32, SignalError>>,
}

struct Sidecar {
    cfg: SidecarConfig,
    gpu: Option<IntentSelector>,
    planner: Planner,
    origin: Origin,
    link: SidecarLink,
    metrics: SidecarMetrics,
    shared: Arc<Mutex<Shared>>,
    source: (String, String),
    /// The last good value and when it was read.
    last: Option<(f64, u64)>,
    last_error: Option<String>,
    /// Failed reads in a row.
    failures: u64,
    polled_at: Option<u64>,
    wanted: Option<u32>,
    current: Option<u32>,
    signal_log: Throttle,
    current_log: Throttle,
    ack_log: Throttle,
    released_at: Option<u64>,
    /// Daemons seen, with their roles.
    members: BTreeMap<PeerId, Role>,
    join_at: Option<tokio::time::Instant>,
}

impl Sidecar {
    async fn run(&mut self, signal: Signal, health: &Health, shutdown: CancellationToken) {
        let (tx, mut polls) = mpsc::channel::<Poll>(1);
        let every = self.cfg.poll_interval;
        let poller_stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = poller_stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let poll = Poll {
                    value: signal.value().await,
                    current: signal.current().await,
                };
                if tx.send(poll).await.is_err() {
                    return;
                }
            }
        });
        let start = tokio::time::Instant::now() + self.cfg.republish;
        let mut republish = tokio::time::interval_at(start, self.cfg.republish);
        republish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut members = self.link.members();
        let mut messages = self.link.messages();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(p) = polls.recv() => {
                    self.on_poll(p).await;
                    health.set_ready(true);
                }
                _ = republish.tick() => self.publish_live("refresh"),
                changed = members.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = members.borrow_and_update().clone();
                    self.on_members(&now);
                }
                _ = sleep_until(self.join_at) => {
                    self.join_at = None;
                    self.publish_live("join");
                }
                m = messages.recv() => match m {
                    Ok(m) if m.topic == READY_TOPIC => self.on_ack(&m),
                    Ok(_) => {}
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "intent acks lagged; some nodes' ready times are missing");
                    }
                    Err(RecvError::Closed) => return,
                },
            }
            self.refresh_shared();
        }
    }

    async fn on_poll(&mut self, p: Poll) {
        let unix = unix_now();
        self.polled_at = Some(unix);
        match p.current {
            Some(Ok(c)) => {
                self.current = Some(c);
                self.metrics.current_replicas.set(i64::from(c));
                self.current_log.reset();
            }
            Some(Err(e)) => {
                self.current = None;
                self.metrics.current_replicas.set(-1);
                if let Some(held) = self.current_log.allow() {
                    tracing::warn!(error = %e, failed_since_last_line = held,
                        "cannot read the current replicas (sidecar.current_query); \
                         until it answers an intent goes out when the wanted replicas rise above zero");
                }
            }
            None => {}
        }
        let obs = match p.value {
            Ok(v) => {
                if self.failures > 0 {
                    tracing::info!(
                        value = v,
                        failed_reads = self.failures,
                        "the scaling signal answers again"
                    );
                }
                self.failures = 0;
                self.last_error = None;
                self.signal_log.reset();
                self.last = Some((v, unix));
                let wanted = signal::wanted_replicas(v, &self.cfg.scaling);
                if self.wanted != Some(wanted) {
                    tracing::info!(value = v, wanted, current = ?self.current, "wanted replicas");
                }
                self.wanted = Some(wanted);
                self.metrics.signal_value.set(v);
                self.metrics.signal_up.set(1);
                self.metrics.wanted_replicas.set(i64::from(wanted));
                Observation::Signal {
                    wanted,
                    current: self.current,
                }
            }
            Err(e) => {
                self.failures += 1;
                self.metrics.signal_up.set(0);
                self.metrics
                    .signal_errors
                    .with_label_values(&[e.reason()])
                    .inc();
                if let Some(held) = self.signal_log.allow() {
                    let holding = self.planner.live.as_ref().map(|l| l.expires_at);
                    tracing::warn!(error = %e, reason = e.reason(), failed_reads = self.failures,
                        failed_since_last_line = held, holding_intent_until = ?holding,
                        "cannot read the scaling signal; the last intent is held until it expires and no new one goes out");
                }
                self.last_error = Some(e.to_string());
                Observation::Failed
            }
        };
        match self.planner.observe(obs, Instant::now(), unix) {
            Decision::Nothing => {}
            Decision::Open { replicas } => self.open(replicas).await,
            Decision::PublishNow => self.publish_live("update"),
            Decision::Release => self.release(unix),
            Decision::Expired => {
                tracing::warn!(workload = %self.cfg.workload,
                    "the held intent expired while the signal failed; the daemons release it");
                self.closed(unix);
            }
        }
        self.resolve_missing().await;
    }

    /// Resolves every image, concurrently; the ones that fail are reported
    /// and retried at the next poll.
    async fn resolve_images(&self, images: &[LiveImage]) -> Vec<LiveImage> {
        let jobs = images.iter().map(|img| async move {
            let mut img = img.clone();
            if img.digest.is_some() {
                return img;
            }
            match resolve::resolve(&self.origin, &img.image).await {
                Ok(d) => {
                    tracing::info!(image = %img.image, digest = %d, "resolved");
                    img.digest = Some(d);
                    img.error = None;
                }
                Err(e) => {
                    self.metrics
                        .resolve_failures
                        .with_label_values(&[&img.image.to_string()])
                        .inc();
                    tracing::warn!(image = %img.image, error = %e,
                        "cannot resolve the image; the others go out without it, and it is tried again at the next poll");
                    img.error = Some(e.to_string());
                }
            }
            img
        });
        futures_util::future::join_all(jobs).await
    }

    async fn open(&mut self, replicas: u32) {
        let fresh: Vec<LiveImage> = self
            .cfg
            .images
            .iter()
            .cloned()
            .map(LiveImage::new)
            .collect();
        let images = self.resolve_images(&fresh).await;
        let resolved = images.iter().filter(|i| i.digest.is_some()).count();
        if resolved == 0 {
            tracing::warn!(workload = %self.cfg.workload, replicas,
                "a scale-out is coming but no image could be resolved: no intent yet; trying again at the next poll");
            return;
        }
        self.planner
            .open(replicas, images, Instant::now(), unix_now());
        self.metrics.live_intents.set(1);
        tracing::info!(workload = %self.cfg.workload, replicas, images = resolved,
            unresolved = self.cfg.images.len() - resolved, daemons = self.members.len(),
            "scale-out coming: warm intent published");
        self.publish_live("open");
    }

    /// Images of the live intent that could not be resolved, again.
    async fn resolve_missing(&mut self) {
        let Some(live) = &self.planner.live else {
            return;
        };
        if live.images.iter().all(|i| i.digest.is_some()) {
            return;
        }
        let images = self.resolve_images(&live.images).await;
        let Some(live) = self.planner.live.as_mut() else {
            return;
        };
        let mut newly = 0;
        for (old, new) in live.images.iter_mut().zip(images) {
            if old.digest.is_none() {
                newly += usize::from(new.digest.is_some());
                old.digest = new.digest;
                old.error = new.error;
            }
        }
        if newly > 0 {
            self.publish_live("update");
        }
    }

    fn release(&mut self, unix: u64) {
        if let Some(live) = self.planner.close() {
            if let Some(i) = live.release(&self.cfg.workload, self.gpu.as_ref(), unix) {
                self.link.publish(INTENTS_TOPIC, i.encode());
                self.metrics
                    .publications
                    .with_label_values(&["release"])
                    .inc();
            }
            tracing::info!(workload = %self.cfg.workload, cooldown_s = self.cfg.cooldown.as_secs(),
                "wanted replicas stayed at zero for the cooldown: warm intent released, the daemons unpin its images");
        }
        self.closed(unix);
    }

    fn closed(&mut self, unix: u64) {
        self.released_at = Some(unix);
        self.metrics.live_intents.set(0);
        self.metrics.lead_seconds.reset();
        self.metrics.nodes_ready.reset();
    }

    fn publish_live(&self, kind: &str) {
        let Some(live) = &self.planner.live else {
            return;
        };
        let Some(intent) = live.intent(&self.cfg.workload, self.gpu.as_ref()) else {
            return;
        };
        tracing::debug!(
            kind,
            replicas = intent.replicas,
            expires_at = intent.expires_at,
            "publishing the warm intent"
        );
        self.link.publish(INTENTS_TOPIC, intent.encode());
        self.metrics.publications.with_label_values(&[kind]).inc();
    }

    fn on_members(&mut self, now: &BTreeMap<PeerId, crate::swarm::control::Member>) {
        let serving: BTreeMap<PeerId, Role> = now
            .iter()
            .filter(|(_, m)| m.info.role.serves_data())
            .map(|(id, m)| (*id, m.info.role))
            .collect();
        let joined = serving.keys().any(|id| !self.members.contains_key(id));
        self.members = serving;
        self.metrics.members.set(self.members.len() as i64);
        if joined && self.planner.live.is_some() && self.join_at.is_none() {
            self.join_at = Some(tokio::time::Instant::now() + JOIN_SETTLE);
        }
    }

    fn on_ack(&mut self, m: &TopicMessage) {
        let now = Instant::now();
        let ack = match IntentReady::decode(&m.data) {
            Ok(a) => a,
            Err(e) => {
                if let Some(held) = self.ack_log.allow() {
                    tracing::warn!(from = %m.from, error = %e, refused_since_last_line = held, "ignoring a bad intent ack");
                }
                return;
            }
        };
        if ack.id != self.cfg.workload {
            return;
        }
        let Ok(digest) = ack.digest.parse::<Digest>() else {
            return;
        };
        let Some(live) = self.planner.live.as_mut() else {
            return;
        };
        let first = live.record_ready(m.from, ack.published_at, &digest, now);
        let Some(img) = live
            .images
            .iter()
            .find(|i| i.digest.as_ref() == Some(&digest))
        else {
            return;
        };
        let label = img.image.to_string();
        self.metrics
            .nodes_ready
            .with_label_values(&[&label])
            .set(img.ready_on.len() as i64);
        if let Some((_, lead)) = first {
            let secs = lead.as_secs_f64();
            self.metrics
                .lead_seconds
                .with_label_values(&[&label])
                .set(secs);
            self.metrics.lead_time.observe(secs);
            tracing::info!(image = %label, lead_time_s = secs, node = %m.from,
                "the first node holds the image");
        }
    }

    fn refresh_shared(&self) {
        let now = Instant::now();
        let intent = self.planner.live.as_ref().map(|l| status::IntentView {
            published_at: l.published_at,
            expires_at: l.expires_at,
            replicas: l.replicas,
            cooldown_left_s: self.planner.cooldown_left(now).map(|d| d.as_secs_f64()),
            images: l
                .images
                .iter()
                .map(|i| {
                    let mut nodes: Vec<status::NodeView> = i
                        .ready_on
                        .iter()
                        .map(|(peer, after)| status::NodeView {
                            peer_id: peer.to_string(),
                            role: self
                                .members
                                .get(peer)
                                .map_or("unknown", |r| r.as_str())
                                .to_owned(),
                            ready_after_s: after.as_secs_f64(),
                        })
                        .collect();
                    nodes.sort_by(|a, b| a.ready_after_s.total_cmp(&b.ready_after_s));
                    status::ImageView {
                        reference: i.image.to_string(),
                        digest: i.digest.as_ref().map(|d| d.to_string()),
                        error: i.error.clone(),
                        lead_time_s: i.lead.map(|d| d.as_secs_f64()),
                        nodes,
                    }
                })
                .collect(),
        });
        let sc = &self.cfg.scaling;
        let st = SidecarStatus {
            workload: self.cfg.workload.clone(),
            peer_id: self.link.local_peer_id().to_string(),
            members: self.members.len(),
            signal: status::SignalStatus {
                source: self.source.0.clone(),
                query: self.source.1.clone(),
                ok: self.failures == 0 && self.last.is_some(),
                value: self.last.map(|(v, _)| v),
                error: self.last_error.clone(),
                polled_at: self.polled_at,
                failures: self.failures,
            },
            scaling: status::ScalingStatus {
                threshold: sc.threshold,
                activation_threshold: sc.activation_threshold,
                min_replicas: sc.min_replicas,
                max_replicas: sc.max_replicas,
            },
            wanted_replicas: self.wanted,
            current_replicas: self.current,
            intent,
            released_at: self.released_at,
        };
        let keda = match (self.last, self.wanted) {
            (Some((value, at)), Some(wanted)) => Some(KedaMetric {
                workload: self.cfg.workload.clone(),
                value,
                threshold: sc.threshold,
                wanted_replicas: wanted,
                current_replicas: self.current,
                timestamp: at,
            }),
            _ => None,
        };
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        s.status = Some(st);
        s.keda = keda;
        s.keda_error = self.last_error.clone();
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn get(routes: &telemetry::Routes, path: &str) -> (StatusCode, serde_json::Value) {
        let resp = routes(path).expect("a route");
        let status = resp.status();
        let body = futures_util::FutureExt::now_or_never(resp.into_body().collect())
            .expect("a full body is ready")
            .unwrap()
            .to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[test]
    fn keda_sees_a_failure_as_a_non_2xx_and_a_value_as_json() {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let routes = routes(shared.clone());
        assert!(routes("/nothing").is_none());
        // Before the first read: no value to give, so KEDA's fallback.
        let (code, body) = get(&routes, KEDA_PATH);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"], "no value read yet");
        let metric = KedaMetric {
            workload: "inference/llm".into(),
            value: 12.0,
            threshold: 5.0,
            wanted_replicas: 3,
            current_replicas: None,
            timestamp: 1,
        };
        shared.lock().unwrap().keda = Some(metric.clone());
        let (code, body) = get(&routes, KEDA_PATH);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(serde_json::from_value::<KedaMetric>(body).unwrap(), metric);
        // The signal fails: the last value is kept for status, but KEDA
        // must not scale on a stale number.
        shared.lock().unwrap().keda_error = Some("cannot reach Prometheus".into());
        let (code, body) = get(&routes, KEDA_PATH);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"], "cannot reach Prometheus");
        let (code, body) = get(&routes, STATUS_PATH);
        assert_eq!((code, body), (StatusCode::OK, serde_json::Value::Null));
    }
}
