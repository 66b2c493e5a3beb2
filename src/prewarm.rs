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

pub mod metrics;
pub mod resolve;
pub mod rules;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, PrewarmConfig};
use crate::cri::Containerd;
use crate::fetch::{Fetcher, Priority, Source};
use crate::gpu::GpuFacts;
use crate::oci::{Digest, ImageRef, Platform};
pub use metrics::PrewarmMetrics;
use resolve::{BlobRef, Resolved};
pub use status::{BytesBySource, ImageState, ImageStatus, PrewarmStatus, RuleStatus};

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

/// One image of one rule: what status shows, and what the task needs.
struct Entry {
    status: ImageStatus,
    image: ImageRef,
    platform: Platform,
    /// Blobs of the current resolution, for live progress.
    blobs: Vec<BlobRef>,
    /// containerd image records labelled pinned.
    containerd_names: Vec<String>,
}

struct Inner {
    cfg: PrewarmConfig,
    facts: GpuFacts,
    fetcher: Fetcher,
    containerd: Option<Containerd>,
    metrics: PrewarmMetrics,
    started: Instant,
    rules: Vec<RuleStatus>,
    entries: Mutex<Vec<Entry>>,
    ready: watch::Sender<bool>,
    host: Platform,
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
                entries.push(Entry {
                    status: ImageStatus {
                        rule: rule.name.clone(),
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
                        resolved_at: None,
                        pinned: false,
                        in_containerd: false,
                        cri_pinned: None,
                        previous: None,
                    },
                    image: image.clone(),
                    platform,
                    blobs: Vec::new(),
                    containerd_names: Vec::new(),
                });
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
        let p = Prewarm {
            inner: Arc::new(Inner {
                swarm_wait: cfg
                    .swarm
                    .enabled
                    .then_some((pcfg.swarm_wait, cfg.swarm.heartbeat.max(SWARM_SETTLED_MIN))),
                cfg: pcfg,
                facts,
                fetcher,
                containerd,
                metrics,
                started,
                rules,
                entries: Mutex::new(entries),
                ready: watch::Sender::new(ready),
                host,
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

    /// Removes prewarm pins that no current rule holds (a rule removed
    /// from the config, or one that no longer matches the node), then
    /// starts a task per image. Tasks end when `shutdown` fires.
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
        let n = self.lock().len();
        if n == 0 {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.settle_swarm(&shutdown).await;
            let slots = Arc::new(Semaphore::new(this.inner.cfg.concurrency));
            for idx in 0..n {
                let task = this.clone();
                let slots = slots.clone();
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = task.run_image(idx, slots) => {}
                    }
                });
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
        let Some(swarm) = self.inner.fetcher.swarm().cloned() else {
            return;
        };
        let deadline = Instant::now() + wait;
        let mut count = swarm.peers().len();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            if count > 0 && since.elapsed() >= settled {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            let now = swarm.peers().len();
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
        for e in entries.iter() {
            *by_state.entry(e.status.state).or_default() += 1;
            all_ready &= self.is_ready_state(e);
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
            ready: *self.inner.ready.borrow(),
            rules: self.inner.rules.clone(),
            images,
        }
    }

    /// The task of entry `idx`: warm it, then keep it warm.
    async fn run_image(&self, idx: usize, slots: Arc<Semaphore>) {
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
        if !refreshing {
            self.update(idx, |e| e.status.state = ImageState::Resolving);
        }
        let resolved = resolve::resolve(fetcher, &up, image, platform).await?;
        let digests = resolved.digests();
        let unchanged = current.is_some_and(|c| c.root == resolved.root)
            && digests.iter().all(|d| store.contains(d));
        self.update(idx, |e| e.status.resolved_at = Some(unix_now()));
        if unchanged && self.still_in_containerd(idx).await {
            return Ok(resolved);
        }
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
        self.update(idx, |e| {
            e.status.state = ImageState::Cached;
            e.status.bytes_done = bytes_total;
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
        let after = self.inner.started.elapsed().as_secs_f64();
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
            e.status.failures = 0;
            if e.status.ready_after_s.is_none() || current.is_some() {
                e.status.ready_after_s = Some(after);
            }
        });
        tracing::info!(rule = %rule, image = %image, digest = %resolved.root,
            bytes = bytes_total, seconds_since_start = after, state = ready_state.as_str(),
            "prewarmed");
        Ok(resolved)
    }

    /// An image that was landed in containerd is still there (a refresh
    /// found the same digest). Images not for containerd count as there.
    async fn still_in_containerd(&self, idx: usize) -> bool {
        let (goes, landed, reference) = {
            let entries = self.lock();
            let e = &entries[idx];
            (
                self.goes_to_containerd(e),
                e.status.in_containerd,
                e.status.reference.clone(),
            )
        };
        if !goes {
            return true;
        }
        if !landed {
            return false;
        }
        let Some(c) = &self.inner.containerd else {
            return true;
        };
        match c.image_status(&reference).await {
            Ok(Some(_)) => true,
            Ok(None) => {
                tracing::info!(image = %reference, "a prewarmed image left containerd; pulling it again");
                false
            }
            Err(e) => {
                tracing::debug!(image = %reference, error = %e, "cannot check containerd");
                true
            }
        }
    }

    /// Refuses an image that cannot fit the store beside the other pins.
    fn check_fits(&self, rule: &str, image: &ImageRef, r: &Resolved) -> Result<(), WarmError> {
        let store = self.inner.fetcher.store();
        let max = store.usage().max_size;
        let total = r.total_bytes();
        let size = |n: u64| bytesize::ByteSize(n).display().iec().to_string();
        if total > max {
            return Err(WarmError::Refused(format!(
                "the image is {} and store.max_size is {}",
                size(total),
                size(max)
            )));
        }
        let own: HashSet<Digest> = r.digests().into_iter().collect();
        let target = pin_target(rule, image);
        let mut others: HashSet<Digest> = HashSet::new();
        for rec in store.pins() {
            if rec.target == target {
                continue;
            }
            others.extend(
                rec.digests
                    .iter()
                    .filter_map(|d| d.parse::<Digest>().ok())
                    .filter(|d| !own.contains(d)),
            );
        }
        let held: u64 = others
            .iter()
            .filter_map(|d| store.blob_info(d))
            .map(|b| b.size)
            .sum();
        if held + total > max {
            return Err(WarmError::Refused(format!(
                "the image is {} and other pins hold {} of store.max_size {}",
                size(total),
                size(held),
                size(max)
            )));
        }
        Ok(())
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

    /// CRI `PullImage` through the mirror, then the pinned label on every
    /// containerd record of the image (and off the records of the image a
    /// moved tag named before).
    async fn land_in_containerd(
        &self,
        idx: usize,
        image: &ImageRef,
        resolved: &Resolved,
        old_names: &[String],
    ) -> Result<(), WarmError> {
        let Some(c) = &self.inner.containerd else {
            return Ok(());
        };
        self.update(idx, |e| e.status.state = ImageState::Pulling);
        let reference = image.to_string();
        let id = c.pull_image(&reference).await?;
        let mut names = vec![
            reference.clone(),
            image.pinned_to(&resolved.root).to_string(),
        ];
        let mut cri_pinned = None;
        if let Some(st) = c.image_status(&reference).await? {
            cri_pinned = Some(st.pinned);
            names.extend(st.repo_digests);
        }
        if !id.is_empty() {
            names.push(id);
        }
        names.sort();
        names.dedup();
        if self.inner.cfg.pin_in_containerd {
            c.set_pinned(&names, true).await?;
            if let Some(st) = c.image_status(&reference).await? {
                cri_pinned = Some(st.pinned);
            }
            let stale: Vec<String> = old_names
                .iter()
                .filter(|n| !names.contains(n))
                .cloned()
                .collect();
            if !stale.is_empty() {
                if let Err(e) = c.set_pinned(&stale, false).await {
                    tracing::warn!(error = %e, "cannot unpin the previous image in containerd");
                }
            }
        }
        self.update(idx, |e| {
            e.status.in_containerd = true;
            e.status.cri_pinned = cri_pinned;
            e.containerd_names = names;
        });
        Ok(())
    }
}
