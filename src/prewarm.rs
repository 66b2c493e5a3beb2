//! Prewarm: the images a node will need, in containerd before its pods ask.
//!
//! At start-up the daemon reads its GPUs ([`crate::gpu`]) and evaluates
//! every `[[prewarm.rule]]` ([`rules`]). Each image of a matching rule gets
//! a task that:
//!
//! 1. resolves the reference at the origin with the node's own credentials
//!    ([`resolve`]): index, the platform's manifest, config and layers;
//! 2. refuses it, clearly, when it cannot fit `store.max_size` beside what
//!    other pins hold, rather than fetching half of it;
//! 3. pins every digest (before fetching, so eviction cannot take the first
//!    layers while the last arrive);
//! 4. fetches the blobs through the node's own fetch engine at background
//!    priority ([`Priority::Background`]): the same single flight, swarm
//!    pieces and digest checks as a pull, so a fleet of nodes booting
//!    together fetches the image from the origin once. No new blob starts
//!    while a live pull runs, and running ones pause for it;
//! 5. pulls it into containerd with CRI `PullImage`, the kubelet's own call,
//!    which goes through the mirror and so reads the cache; then labels it
//!    pinned in containerd, so the kubelet's image GC keeps it;
//! 6. with a tag, resolves it again every `prewarm.refresh`: when it moved,
//!    the new image goes through the same steps and the old one is unpinned.
//!
//! A failure is retried with backoff (1s doubling to `prewarm.retry_max`)
//! and shown in status, metrics and a log line.

pub mod feed;
pub mod intent;
mod land;
pub mod metrics;
pub mod resolve;
pub mod rules;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio::sync::{broadcast, watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, PrewarmConfig};
use crate::cri::Containerd;
use crate::fetch::{Fetcher, Priority, Source};
use crate::gpu::GpuFacts;
use crate::oci::{Digest, ImageRef, Platform};
pub use intent::{Intent, IntentImage, IntentSelector, INTENT_SWEEP};
pub use metrics::PrewarmMetrics;
use resolve::{BlobRef, Resolved};
pub use status::{
    BytesBySource, ImageState, ImageStatus, IntentStatus, PrewarmStatus, RuleStatus, StageTimes,
};

const RETRY_START: Duration = Duration::from_secs(1);
/// The least time a swarm's membership must hold still before prewarm
/// starts; otherwise one heartbeat (every live member is heard once a
/// heartbeat).
const SWARM_SETTLED_MIN: Duration = Duration::from_millis(200);
/// One CRI `PullImage` of an image whose blobs are cached (unpacking a
/// 40 GB image takes minutes on a slow disk).
const CRI_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
enum WarmError {
    #[error("registry {0:?} is not mirrored by this daemon (add a [[registry]])")]
    NotMirrored(String),
    #[error(transparent)]
    Resolve(Box<resolve::ResolveError>),
    #[error("{0}")]
    Refused(String),
    #[error("blob {digest}: {source}")]
    Blob {
        digest: Digest,
        #[source]
        source: Box<crate::fetch::FetchError>,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Cri(#[from] crate::cri::CriError),
}

impl From<resolve::ResolveError> for WarmError {
    fn from(e: resolve::ResolveError) -> WarmError {
        WarmError::Resolve(Box::new(e))
    }
}

/// One image of one rule (or intent): what status shows, and what the
/// task needs.
struct Entry {
    status: ImageStatus,
    image: ImageRef,
    platform: Platform,
    /// Blobs of the current resolution, for live progress.
    blobs: Vec<BlobRef>,
    /// containerd image records labelled pinned.
    containerd_names: Vec<String>,
    /// Ends this entry's task when it is retired.
    stop: CancellationToken,
    /// A warm intent's id and expiry; `None` for a configured rule.
    intent: Option<(String, u64)>,
    /// Released: no task, no pin, not in status.
    retired: bool,
}

impl Entry {
    fn new(
        rule: &str,
        image: ImageRef,
        platform: Platform,
        intent: Option<(String, u64)>,
    ) -> Entry {
        Entry {
            status: ImageStatus {
                rule: rule.to_owned(),
                reference: image.to_string(),
                state: ImageState::Waiting,
                platform: platform.to_string(),
                digest: None,
                manifest: None,
                bytes_total: None,
                bytes_done: 0,
                sources: BytesBySource::default(),
                failures: 0,
                error: None,
                retry_in_s: None,
                ready_after_s: None,
                stages: StageTimes::default(),
                resolved_at: None,
                pinned: false,
                in_containerd: false,
                cri_pinned: None,
                previous: None,
            },
            image,
            platform,
            blobs: Vec::new(),
            containerd_names: Vec::new(),
            stop: CancellationToken::new(),
            intent,
            retired: false,
        }
    }
}

/// An image of a rule or intent became ready on this node (in containerd,
/// or cached when it is not for containerd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub rule: String,
    /// What the reference resolved to.
    pub digest: Digest,
}

struct Inner {
    cfg: PrewarmConfig,
    facts: GpuFacts,
    fetcher: Fetcher,
    /// With the swarm on: how prewarm tells that membership settled.
    swarm: Option<crate::swarm::Swarm>,
    containerd: Option<Containerd>,
    metrics: PrewarmMetrics,
    started: Instant,
    rules: Vec<RuleStatus>,
    entries: Mutex<Vec<Entry>>,
    ready: watch::Sender<bool>,
    /// Each image as it becomes ready (the intent feed acks them).
    ready_events: broadcast::Sender<Ready>,
    host: Platform,
    /// Images prewarmed at once (`prewarm.concurrency`).
    slots: Arc<Semaphore>,
    /// Set by [`Prewarm::start`]: the daemon's shutdown, and the moment
    /// the swarm settled (tasks wait for both).
    shutdown: std::sync::OnceLock<CancellationToken>,
    settled: watch::Sender<bool>,
    /// Seconds from the start until the swarm settled and prewarm began.
    settled_after: std::sync::OnceLock<f64>,
    /// Seeds act on every intent, whatever its GPU selector.
    seed: bool,
    /// With the swarm on: how long prewarm may wait for it, and how long
    /// its membership must hold still.
    swarm_wait: Option<(Duration, Duration)>,
}

/// The prewarm engine. Cheap to clone.
#[derive(Clone)]
pub struct Prewarm {
    inner: Arc<Inner>,
}

/// The pin record name of an image of a rule.
fn pin_target(rule: &str, image: &ImageRef) -> String {
    format!("prewarm/{rule}/{image}")
}

const PIN_PREFIX: &str = "prewarm/";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Prewarm {
    /// Evaluates the rules against `facts`. Nothing is fetched before
    /// [`Prewarm::start`].
    pub fn new(
        cfg: &Config,
        facts: GpuFacts,
        fetcher: Fetcher,
        swarm: Option<crate::swarm::Swarm>,
        metrics: PrewarmMetrics,
        started: Instant,
    ) -> Prewarm {
        let pcfg = cfg.prewarm.clone();
        let host = Platform::host();
        let mut rules = Vec::new();
        let mut entries = Vec::new();
        for rule in &pcfg.rules {
            let v = rules::evaluate(rule, &facts);
            if v.matched {
                tracing::info!(rule = %rule.name, reason = %v.reason, images = rule.images.len(), "prewarm rule matches this node");
            } else {
                tracing::info!(rule = %rule.name, reason = %v.reason, "prewarm rule does not match this node");
            }
            rules.push(RuleStatus {
                name: rule.name.clone(),
                matched: v.matched,
                reason: v.reason,
                images: rule.images.iter().map(|i| i.to_string()).collect(),
            });
            if !v.matched {
                continue;
            }
            for image in &rule.images {
                let platform = rule.platform.clone().unwrap_or_else(|| host.clone());
                entries.push(Entry::new(&rule.name, image.clone(), platform, None));
            }
        }
        let containerd = pcfg.into_containerd.then(|| {
            Containerd::new(
                &pcfg.containerd_socket,
                &pcfg.containerd_namespace,
                CRI_TIMEOUT,
            )
        });
        let ready = entries.is_empty();
        let pcfg_concurrency = pcfg.concurrency;
        let p = Prewarm {
            inner: Arc::new(Inner {
                swarm_wait: cfg
                    .swarm
                    .enabled
                    .then_some((pcfg.swarm_wait, cfg.swarm.heartbeat.max(SWARM_SETTLED_MIN))),
                cfg: pcfg,
                facts,
                fetcher,
                swarm,
                containerd,
                metrics,
                started,
                rules,
                entries: Mutex::new(entries),
                ready: watch::Sender::new(ready),
                ready_events: broadcast::channel(256).0,
                host,
                slots: Arc::new(Semaphore::new(pcfg_concurrency)),
                shutdown: std::sync::OnceLock::new(),
                settled: watch::Sender::new(false),
                settled_after: std::sync::OnceLock::new(),
                seed: cfg.swarm.enabled && cfg.swarm.role == crate::swarm::Role::Seed,
            }),
        };
        p.publish();
        p
    }

    /// Whether any rule matched this node.
    pub fn has_work(&self) -> bool {
        !self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.inner.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `true` once every image of every matching rule is ready.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.inner.ready.subscribe()
    }

    /// Every image, rule or intent, as it becomes ready from now on.
    pub fn ready_events(&self) -> broadcast::Receiver<Ready> {
        self.inner.ready_events.subscribe()
    }

    /// Removes prewarm pins that no current rule holds (a rule removed
    /// from the config, or one that no longer matches the node; intents of
    /// an earlier run come again while they live), then starts a task per
    /// image. Tasks end when `shutdown` fires.
    pub fn start(&self, shutdown: CancellationToken) {
        let keep: HashSet<String> = self
            .lock()
            .iter()
            .map(|e| pin_target(&e.status.rule, &e.image))
            .collect();
        let store = self.inner.fetcher.store();
        for rec in store.pins() {
            if rec.target.starts_with(PIN_PREFIX) && !keep.contains(&rec.target) {
                match store.unpin(&rec.target) {
                    Ok(_) => {
                        tracing::info!(pin = %rec.target, "prewarm pin released: its rule is gone or no longer matches")
                    }
                    Err(e) => {
                        tracing::warn!(pin = %rec.target, error = %e, "cannot release a stale prewarm pin")
                    }
                }
            }
        }
        if self.inner.shutdown.set(shutdown.clone()).is_err() {
            return;
        }
        let (this, stop) = (self.clone(), shutdown.clone());
        tokio::spawn(async move {
            this.settle_swarm(&stop).await;
            let _ = this
                .inner
                .settled_after
                .set(this.inner.started.elapsed().as_secs_f64());
            this.inner.settled.send_replace(true);
        });
        let this = self.clone();
        tokio::spawn(async move { this.expire_intents_every(INTENT_SWEEP, shutdown).await });
        let n = self.lock().len();
        for idx in 0..n {
            self.spawn_entry(idx);
        }
    }

    /// The task of entry `idx`, once the swarm settled, until the daemon
    /// stops or the entry is retired. Before [`Prewarm::start`], nothing.
    fn spawn_entry(&self, idx: usize) {
        let Some(shutdown) = self.inner.shutdown.get().cloned() else {
            return;
        };
        let Some(stop) = self.lock().get(idx).map(|e| e.stop.clone()) else {
            return;
        };
        let task = self.clone();
        let mut settled = self.inner.settled.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = stop.cancelled() => {}
                _ = async {
                    let _ = settled.wait_for(|s| *s).await;
                    task.run_image(idx).await
                } => {}
            }
        });
    }

    /// With the swarm on, waits (at most `prewarm.swarm_wait`) until this
    /// node has peers and their number held still for a heartbeat, so
    /// nodes booting together share the pieces instead of each taking the
    /// image from the origin alone (a download that starts with no peers
    /// is fetched whole from the origin).
    async fn settle_swarm(&self, shutdown: &CancellationToken) {
        let Some((wait, settled)) = self.inner.swarm_wait else {
            return;
        };
        let Some(swarm) = self.inner.swarm.clone() else {
            return;
        };
        let deadline = Instant::now() + wait;
        // Data peers only: the scaling sidecar is a member with nothing to
        // share.
        let peers =
            |s: &crate::swarm::Swarm| s.peers().iter().filter(|p| p.role.serves_data()).count();
        let mut count = peers(&swarm);
        let mut since = Instant::now();
        while Instant::now() < deadline {
            if count > 0 && since.elapsed() >= settled {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            let now = peers(&swarm);
            if now != count {
                count = now;
                since = Instant::now();
            }
        }
        tracing::info!(
            peers = count,
            waited_ms = (Instant::now() + wait)
                .saturating_duration_since(deadline)
                .as_millis() as u64,
            "prewarm starts"
        );
    }

    fn since_start(&self) -> f64 {
        self.inner.started.elapsed().as_secs_f64()
    }

    fn update(&self, idx: usize, f: impl FnOnce(&mut Entry)) {
        {
            let mut entries = self.lock();
            if let Some(e) = entries.get_mut(idx) {
                f(e);
            }
        }
        self.publish();
    }

    /// Metrics and readiness from the entries.
    fn publish(&self) {
        let entries = self.lock();
        let mut by_state: HashMap<ImageState, i64> = HashMap::new();
        let mut all_ready = true;
        for e in entries.iter().filter(|e| !e.retired) {
            *by_state.entry(e.status.state).or_default() += 1;
            // Readiness is about the node's own rules, known at start-up;
            // intents come and go.
            if e.intent.is_none() {
                all_ready &= self.is_ready_state(e);
            }
        }
        drop(entries);
        for s in ImageState::ALL {
            self.inner
                .metrics
                .images
                .with_label_values(&[s.as_str()])
                .set(by_state.get(&s).copied().unwrap_or(0));
        }
        // Readiness latches: a tag that moves later, or a retry, must not
        // take a serving node out of its Service.
        self.inner.ready.send_if_modified(|r| {
            let changed = !*r && all_ready;
            *r |= all_ready;
            changed
        });
    }

    fn goes_to_containerd(&self, e: &Entry) -> bool {
        self.inner.containerd.is_some() && e.platform.matches(&self.inner.host)
    }

    fn is_ready_state(&self, e: &Entry) -> bool {
        match e.status.state {
            ImageState::InContainerd => true,
            ImageState::Cached => !self.goes_to_containerd(e),
            _ => false,
        }
    }

    /// The status of every rule and image, with live byte counts.
    pub fn status(&self) -> PrewarmStatus {
        let downloads: HashMap<Digest, u64> = self
            .inner
            .fetcher
            .downloads()
            .into_iter()
            .map(|d| (d.digest, d.written))
            .collect();
        let store = self.inner.fetcher.store();
        let entries = self.lock();
        let images = entries
            .iter()
            .filter(|e| !e.retired)
            .map(|e| {
                let mut s = e.status.clone();
                if s.state == ImageState::Fetching {
                    let manifests = s.bytes_total.unwrap_or(0)
                        - e.blobs
                            .iter()
                            .map(|b| b.size)
                            .sum::<u64>()
                            .min(s.bytes_total.unwrap_or(0));
                    s.bytes_done = manifests
                        + e.blobs
                            .iter()
                            .map(|b| {
                                if store.contains(&b.digest) {
                                    b.size
                                } else {
                                    downloads.get(&b.digest).copied().unwrap_or(0)
                                }
                            })
                            .sum::<u64>();
                }
                s
            })
            .collect();
        PrewarmStatus {
            gpu: self.inner.facts.clone(),
            into_containerd: self.inner.containerd.is_some(),
            settled_after_s: self.inner.settled_after.get().copied(),
            ready: *self.inner.ready.borrow(),
            rules: self.inner.rules.clone(),
            intents: self.intent_statuses(&entries),
            images,
        }
    }

    /// The task of entry `idx`: warm it, then keep it warm.
    async fn run_image(&self, idx: usize) {
        let slots = self.inner.slots.clone();
        let cfg = &self.inner.cfg;
        let (image, platform) = {
            let entries = self.lock();
            (entries[idx].image.clone(), entries[idx].platform.clone())
        };
        let mut backoff = RETRY_START;
        let mut current: Option<Resolved> = None;
        loop {
            let result = {
                let Ok(_slot) = slots.acquire().await else {
                    return;
                };
                self.warm(idx, &image, &platform, current.as_ref()).await
            };
            let wait = match result {
                Ok(r) => {
                    current = Some(r);
                    backoff = RETRY_START;
                    if image.digest.is_some() || cfg.refresh.is_zero() {
                        // A digest never moves: nothing more to do.
                        return;
                    }
                    cfg.refresh
                }
                Err(e) => {
                    let refused = matches!(e, WarmError::Refused(_));
                    let wait = if refused { cfg.retry_max } else { backoff };
                    backoff = (backoff * 2).min(cfg.retry_max);
                    let rule = self.lock()[idx].status.rule.clone();
                    self.inner
                        .metrics
                        .failures
                        .with_label_values(&[rule.as_str()])
                        .inc();
                    tracing::warn!(rule = %rule, image = %image, error = %e,
                        retry_in_s = wait.as_secs(), "prewarm failed");
                    self.update(idx, |en| {
                        en.status.state = if refused {
                            ImageState::Refused
                        } else {
                            ImageState::Failed
                        };
                        en.status.failures += 1;
                        en.status.error = Some(e.to_string());
                        en.status.retry_in_s = Some(wait.as_secs());
                    });
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One attempt: resolve, and unless nothing changed, pin, fetch and
    /// land the image. Returns what the reference resolved to.
    async fn warm(
        &self,
        idx: usize,
        image: &ImageRef,
        platform: &Platform,
        current: Option<&Resolved>,
    ) -> Result<Resolved, WarmError> {
        let fetcher = &self.inner.fetcher;
        let store = fetcher.store();
        let up = fetcher
            .origin()
            .upstream(&image.registry)
            .ok_or_else(|| WarmError::NotMirrored(image.registry.clone()))?;
        let refreshing = current.is_some();
        let started = self.since_start();
        self.update(idx, |e| {
            if !refreshing {
                e.status.state = ImageState::Resolving;
            }
        });
        let resolved = resolve::resolve(fetcher, &up, image, platform).await?;
        let digests = resolved.digests();
        let unchanged = current.is_some_and(|c| c.root == resolved.root)
            && digests.iter().all(|d| store.contains(d));
        self.update(idx, |e| e.status.resolved_at = Some(unix_now()));
        if unchanged && self.still_in_containerd(idx).await {
            return Ok(resolved);
        }
        let resolved_s = self.since_start();
        self.update(idx, |e| {
            e.status.stages = StageTimes {
                started_s: Some(started),
                resolved_s: Some(resolved_s),
                ..StageTimes::default()
            }
        });
        let (rule, old_names) = {
            let entries = self.lock();
            (
                entries[idx].status.rule.clone(),
                entries[idx].containerd_names.clone(),
            )
        };
        if let Some(c) = current.filter(|c| c.root != resolved.root) {
            tracing::info!(rule = %rule, image = %image, from = %c.root, to = %resolved.root,
                "prewarmed tag moved; prewarming the new image");
        }
        self.check_fits(&rule, image, &resolved)?;
        let target = pin_target(&rule, image);
        // Pin the new image beside the old one until it is ready.
        let mut pinned = digests.clone();
        if let Some(c) = current {
            pinned.extend(c.digests().into_iter().filter(|d| !digests.contains(d)));
        }
        store.pin(&target, &pinned)?;
        let blobs = resolved.blobs();
        self.update(idx, |e| {
            e.status.state = ImageState::Fetching;
            e.status.digest = Some(resolved.root.to_string());
            e.status.manifest = Some(resolved.manifest.to_string());
            e.status.bytes_total = Some(resolved.total_bytes());
            e.status.pinned = true;
            e.status.error = None;
            e.status.retry_in_s = None;
            e.status.sources = BytesBySource {
                cache: resolved.manifest_bytes,
                ..BytesBySource::default()
            };
            e.blobs = blobs.clone();
        });
        self.fetch_blobs(idx, &up, &image.repository, &blobs)
            .await?;
        let bytes_total = resolved.total_bytes();
        let cached_s = self.since_start();
        self.update(idx, |e| {
            e.status.state = ImageState::Cached;
            e.status.bytes_done = bytes_total;
            e.status.stages.cached_s = Some(cached_s);
        });
        let goes = {
            let entries = self.lock();
            self.goes_to_containerd(&entries[idx])
        };
        if goes {
            self.land_in_containerd(idx, image, &resolved, &old_names)
                .await?;
        }
        // The new image is ready: the old one's digests go free.
        if current.is_some_and(|c| c.root != resolved.root) {
            store.pin(&target, &digests)?;
            let previous = current.map(|c| c.root.to_string());
            self.update(idx, |e| e.status.previous = previous);
        }
        let after = self.since_start();
        self.inner
            .metrics
            .ready_seconds
            .with_label_values(&[rule.as_str(), &image.to_string()])
            .set(after);
        let ready_state = if goes {
            ImageState::InContainerd
        } else {
            ImageState::Cached
        };
        self.update(idx, |e| {
            e.status.state = ready_state;
            if goes {
                e.status.stages.in_containerd_s = Some(after);
            }
            e.status.failures = 0;
            if e.status.ready_after_s.is_none() || current.is_some() {
                e.status.ready_after_s = Some(after);
            }
        });
        tracing::info!(rule = %rule, image = %image, digest = %resolved.root,
            bytes = bytes_total, seconds_since_start = after, state = ready_state.as_str(),
            "prewarmed");
        // No receiver (no swarm, no intent feed) is fine.
        let _ = self.inner.ready_events.send(Ready {
            rule: rule.clone(),
            digest: resolved.root.clone(),
        });
        Ok(resolved)
    }

    async fn fetch_blobs(
        &self,
        idx: usize,
        up: &crate::origin::Upstream,
        repo: &str,
        blobs: &[BlobRef],
    ) -> Result<(), WarmError> {
        let fetcher = &self.inner.fetcher;
        let mut results = futures_util::stream::iter(blobs.iter().cloned())
            .map(|b| async move {
                // Live pulls first: no new prewarm blob while one runs.
                fetcher.until_no_live().await;
                let r = fetcher
                    .ensure_blob(up, repo, &b.digest, Priority::Background)
                    .await;
                (b, r)
            })
            .buffer_unordered(self.inner.cfg.blob_concurrency);
        while let Some((b, r)) = results.next().await {
            let got = r.map_err(|source| WarmError::Blob {
                digest: b.digest.clone(),
                source: Box::new(source),
            })?;
            let m = &self.inner.metrics.bytes;
            let add = match got.source {
                Source::Local => BytesBySource {
                    cache: got.size,
                    ..Default::default()
                },
                _ => BytesBySource {
                    cache: 0,
                    peers: got.peer_bytes,
                    origin: got.origin_bytes,
                },
            };
            m.with_label_values(&["cache"]).inc_by(add.cache);
            m.with_label_values(&["peer"]).inc_by(add.peers);
            m.with_label_values(&["origin"]).inc_by(add.origin);
            self.update(idx, |e| {
                let s = &mut e.status.sources;
                s.cache += add.cache;
                s.peers += add.peers;
                s.origin += add.origin;
            });
        }
        Ok(())
    }
}
