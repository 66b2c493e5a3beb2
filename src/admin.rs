//! The admin API: what the CLI asks a node about its cache, images and
//! peers.
//!
//! [`Node`] answers every question, from the store (and, inside the daemon,
//! from the fetch engine and the metrics). The daemon serves it over a Unix
//! socket ([`server`]); the CLI, when no daemon answers, builds a `Node` on
//! the store directory itself. Both produce the same [`api`] types, so the
//! CLI's JSON does not depend on where the answer came from.

pub mod api;
pub mod images;
pub mod server;

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;

use crate::fetch::{DownloadStatus, Fetcher};
use crate::gpu::GpuFacts;
use crate::oci::{Digest, DigestError};
use crate::prewarm::{Prewarm, PrewarmStatus};
use crate::store::{Fetched, Provenance, Store, StoreError};
use crate::telemetry::Metrics;
use api::*;
use images::{Catalog, Target};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("invalid digest: {0}")]
    InvalidDigest(#[from] DigestError),
    #[error(transparent)]
    InvalidReference(#[from] crate::oci::ReferenceError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("admin socket {path}: {reason}")]
    Socket {
        path: std::path::PathBuf,
        reason: String,
    },
}

impl AdminError {
    /// The `code` of the error's JSON answer.
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::InvalidDigest(_) => "invalid_digest",
            AdminError::InvalidReference(_) => "invalid_reference",
            AdminError::NotFound(_) => "not_found",
            AdminError::BadRequest(_) => "bad_request",
            AdminError::Store(StoreError::ReadOnly { .. }) => "read_only",
            AdminError::Store(_) | AdminError::Socket { .. } => "internal",
        }
    }

    pub fn to_api(&self) -> ApiError {
        ApiError {
            code: self.code().to_owned(),
            message: self.to_string(),
        }
    }
}

/// Answers admin questions about one node.
pub struct Node {
    store: Store,
    fetcher: Option<Fetcher>,
    swarm: Option<crate::swarm::Swarm>,
    metrics: Option<Metrics>,
    prewarm: Option<Prewarm>,
    started_at: SystemTime,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn source_info(p: Provenance) -> SourceInfo {
    SourceInfo {
        from: match p.from {
            Fetched::Origin => "origin",
            Fetched::Peer => "peer",
        }
        .to_owned(),
        registry: p.registry,
        repository: p.repository,
        fetched_at: p.fetched_at,
    }
}

/// Where each blob stands: committed, downloading, or partial on disk.
struct States {
    downloads: HashMap<Digest, DownloadStatus>,
    partials: HashMap<Digest, u64>,
}

impl Node {
    /// The daemon's view: the store plus downloads in flight and counters.
    pub fn daemon(fetcher: Fetcher, metrics: Metrics) -> Node {
        Node {
            store: fetcher.store().clone(),
            fetcher: Some(fetcher),
            swarm: None,
            metrics: Some(metrics),
            prewarm: None,
            started_at: SystemTime::now(),
        }
    }

    /// Answers `peers` from the swarm, and withdraws evicted blobs from it.
    pub fn with_swarm(mut self, swarm: Option<crate::swarm::Swarm>) -> Node {
        self.swarm = swarm;
        self
    }

    /// Answers prewarm and GPU questions from `prewarm`.
    pub fn with_prewarm(mut self, prewarm: Prewarm) -> Node {
        self.prewarm = Some(prewarm);
        self
    }

    /// `prewarm status`: only a daemon has one.
    pub fn prewarm(&self) -> Result<PrewarmStatus, AdminError> {
        self.prewarm
            .as_ref()
            .map(Prewarm::status)
            .ok_or_else(|| AdminError::NotFound("this node runs no prewarm engine".into()))
    }

    /// `gpu`: the facts the daemon discovered at start-up.
    pub fn gpu(&self) -> Result<GpuFacts, AdminError> {
        self.prewarm
            .as_ref()
            .map(|p| p.status().gpu)
            .ok_or_else(|| AdminError::NotFound("this node runs no prewarm engine".into()))
    }

    /// A view of a store without a daemon (read-only unless the store was
    /// opened with its lock).
    pub fn offline(store: Store) -> Node {
        Node {
            store,
            fetcher: None,
            swarm: None,
            metrics: None,
            prewarm: None,
            started_at: SystemTime::now(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn states(&self) -> States {
        let downloads = self
            .fetcher
            .as_ref()
            .map(|f| f.downloads())
            .unwrap_or_default()
            .into_iter()
            .map(|d| (d.digest.clone(), d))
            .collect();
        States {
            downloads,
            partials: self.store.partials().into_iter().collect(),
        }
    }

    /// `(state, bytes present, progress)` of a blob not committed.
    fn pending(states: &States, d: &Digest) -> (&'static str, u64, Option<Progress>) {
        if let Some(dl) = states.downloads.get(d) {
            let p = Progress {
                written: dl.written,
                total: dl.total,
            };
            return ("downloading", dl.written, Some(p));
        }
        if let Some(&n) = states.partials.get(d) {
            let p = Progress {
                written: n,
                total: None,
            };
            return ("partial", n, Some(p));
        }
        ("absent", 0, None)
    }

    /// Every committed blob (`cache ls`), most recently used first.
    pub fn list(&self) -> BlobList {
        let cat = Catalog::load(&self.store);
        let users = cat.users();
        let mut blobs: Vec<BlobEntry> = self
            .store
            .blobs()
            .into_iter()
            .map(|b| {
                let (kind, media_type) = cat.role(&b.digest);
                BlobEntry {
                    digest: b.digest.to_string(),
                    size: b.size,
                    media_type,
                    kind,
                    last_access: unix(b.accessed),
                    pinned: b.pinned,
                    readers: b.readers,
                    source: self.store.provenance(&b.digest).map(source_info),
                    images: users.get(&b.digest).cloned().unwrap_or_default(),
                }
            })
            .collect();
        blobs.sort_by(|a, b| {
            b.last_access
                .cmp(&a.last_access)
                .then(a.digest.cmp(&b.digest))
        });
        BlobList { blobs }
    }

    /// `cache inspect`: a blob's state, or an image's blobs and how
    /// complete it is.
    pub fn inspect(&self, target: &str) -> Result<Inspection, AdminError> {
        match Target::parse(target)? {
            Target::Digest(d) => Ok(Inspection::Blob(self.inspect_blob(&d))),
            Target::Image(r) => {
                let cat = Catalog::load(&self.store);
                let d = cat.lookup(&r).ok_or_else(|| not_seen(&r.to_string()))?;
                let img = cat.resolve(r.to_string(), &d);
                Ok(Inspection::Image(self.inspect_image(&img)))
            }
        }
    }

    fn inspect_blob(&self, d: &Digest) -> BlobInspection {
        let cat = Catalog::load(&self.store);
        let (kind, media_type) = cat.role(d);
        let images = cat.users().remove(d).unwrap_or_default();
        let pinned = self.store.is_pinned(d);
        let source = self.store.provenance(d).map(source_info);
        match self.store.blob_info(d) {
            Some(b) => BlobInspection {
                digest: d.to_string(),
                state: "committed".into(),
                size: Some(b.size),
                media_type,
                kind,
                last_access: Some(unix(b.accessed)),
                pinned,
                readers: b.readers,
                progress: None,
                holders: vec!["local".into()],
                source,
                images,
            },
            None => {
                let states = self.states();
                let (state, _, progress) = Node::pending(&states, d);
                let readers = states.downloads.get(d).map_or(0, |dl| dl.readers);
                BlobInspection {
                    digest: d.to_string(),
                    state: state.into(),
                    size: progress.as_ref().and_then(|p| p.total),
                    media_type,
                    kind,
                    last_access: None,
                    pinned,
                    readers,
                    progress,
                    holders: Vec::new(),
                    source: None,
                    images,
                }
            }
        }
    }

    fn inspect_image(&self, img: &images::Resolved) -> ImageInspection {
        let states = self.states();
        let pinned = img.digests().iter().any(|d| self.store.is_pinned(d));
        let mut blobs = Vec::new();
        let described = img
            .config
            .iter()
            .map(|c| ("config", c))
            .chain(img.layers.iter().map(|l| ("layer", l)));
        for (kind, desc) in described {
            let (state, present) = match desc.digest.parse::<Digest>() {
                Ok(d) if self.store.contains(&d) => ("committed", desc.size),
                Ok(d) => {
                    let (s, n, _) = Node::pending(&states, &d);
                    (s, n.min(desc.size))
                }
                Err(_) => ("absent", 0),
            };
            blobs.push(ImageBlob {
                digest: desc.digest.clone(),
                kind: kind.into(),
                media_type: desc.media_type.clone(),
                size: desc.size,
                state: state.into(),
                present,
            });
        }
        let layers: Vec<&ImageBlob> = blobs.iter().filter(|b| b.kind == "layer").collect();
        let layer_bytes: u64 = layers.iter().map(|b| b.size).sum();
        let layer_bytes_present: u64 = layers.iter().map(|b| b.present).sum();
        ImageInspection {
            reference: img.reference.clone(),
            digest: img.digest.to_string(),
            media_type: img.media_type.clone(),
            platform: img.platform.clone(),
            manifest: img.manifest.as_ref().map(|d| d.to_string()),
            pinned,
            layers: layers.len() as u64,
            layers_present: layers.iter().filter(|b| b.state == "committed").count() as u64,
            layer_bytes,
            layer_bytes_present,
            complete: ratio(layer_bytes_present, layer_bytes, img.manifest.is_some()),
            blobs,
        }
    }

    /// `images`: every image the node has seen, and how complete it is.
    pub fn images(&self) -> ImageList {
        let cat = Catalog::load(&self.store);
        let images = cat
            .images
            .iter()
            .map(|img| {
                let i = self.inspect_image(img);
                ImageSummary {
                    reference: i.reference,
                    digest: i.digest,
                    media_type: i.media_type,
                    platform: i.platform,
                    layers: i.layers,
                    layers_present: i.layers_present,
                    layer_bytes: i.layer_bytes,
                    layer_bytes_present: i.layer_bytes_present,
                    complete: i.complete,
                    pinned: i.pinned,
                    confirmed_at: img.confirmed_at,
                }
            })
            .collect();
        let prewarm = self
            .prewarm
            .as_ref()
            .map(|p| p.status().images)
            .unwrap_or_default();
        ImageList { images, prewarm }
    }

    /// `cache stats`.
    pub fn stats(&self) -> Stats {
        let usage = self.store.usage();
        let blobs = self.store.blobs();
        let partials = self.store.partials();
        let pinned: Vec<_> = blobs.iter().filter(|b| b.pinned).collect();
        let daemon = self.metrics.as_ref().map(|m| {
            let lookups = counts(&m.cache_lookups, "kind", "result");
            let pick = |kind: &str| Lookups {
                hit: lookups
                    .get(&(kind.into(), "hit".into()))
                    .copied()
                    .unwrap_or(0),
                miss: lookups
                    .get(&(kind.into(), "miss".into()))
                    .copied()
                    .unwrap_or(0),
                joined: lookups
                    .get(&(kind.into(), "joined".into()))
                    .copied()
                    .unwrap_or(0),
            };
            let blob = pick("blob");
            let served = counts(&m.bytes_served, "source", "");
            let by = |s: &str| served.get(&(s.into(), String::new())).copied().unwrap_or(0);
            let all = blob.hit + blob.miss + blob.joined;
            DaemonStats {
                started_at: unix(self.started_at),
                uptime_s: self.started_at.elapsed().map_or(0, |d| d.as_secs()),
                blob_lookups: blob,
                manifest_lookups: pick("manifest"),
                hit_ratio: (all > 0).then(|| blob.hit as f64 / all as f64),
                bytes_served: BySource {
                    local: by("local"),
                    peer: by("peer"),
                    origin: by("origin"),
                },
                origin_bytes: m.origin_bytes.get(),
                downloads_in_flight: m.downloads_in_flight.get().max(0) as u64,
            }
        });
        Stats {
            store_dir: self.store.root().display().to_string(),
            used_bytes: usage.bytes,
            quota_bytes: usage.max_size,
            blobs: usage.blobs,
            pinned_blobs: pinned.len() as u64,
            pinned_bytes: pinned.iter().map(|b| b.size).sum(),
            in_use_blobs: blobs.iter().filter(|b| b.readers > 0).count() as u64,
            partials: partials.len() as u64,
            partial_bytes: partials.iter().map(|(_, n)| n).sum(),
            daemon,
        }
    }

    /// `cache verify`. Blocking: reads every byte of the store.
    pub fn verify(
        &self,
        repair: bool,
        progress: &mut dyn FnMut(&VerifyProgress),
    ) -> Result<VerifyReport, AdminError> {
        let mut forward = |p: &crate::store::VerifyProgress| {
            progress(&VerifyProgress {
                blobs_done: p.blobs_done,
                blobs_total: p.blobs_total,
                bytes_done: p.bytes_done,
                bytes_total: p.bytes_total,
            })
        };
        let r = self.store.verify(repair, &mut forward)?;
        if let Some(m) = &self.metrics {
            self.store.usage().publish(m);
        }
        Ok(VerifyReport {
            checked: r.checked,
            bytes: r.bytes,
            corrupt: r
                .corrupt
                .iter()
                .map(|c| CorruptBlob {
                    digest: c.digest.to_string(),
                    size: c.size,
                    actual: c.actual.clone(),
                    removed: r.removed.contains(&c.digest),
                })
                .collect(),
            vanished: r.vanished.iter().map(|d| d.to_string()).collect(),
            repair,
        })
    }

    /// `cache gc`: evicts down to `target` (the quota by default).
    pub fn gc(&self, req: &GcRequest) -> Result<GcReport, AdminError> {
        let target = req.target.unwrap_or(self.store.usage().max_size);
        let r = self.store.gc(target, req.dry_run)?;
        if let Some(m) = &self.metrics {
            self.store.usage().publish(m);
        }
        Ok(GcReport {
            dry_run: r.dry_run,
            target: r.target,
            before: r.before,
            after: r.after,
            freed: r.before - r.after,
            evicted: r
                .evicted
                .iter()
                .map(|e| Evicted {
                    digest: e.digest.to_string(),
                    size: e.size,
                })
                .collect(),
            kept_pinned_blobs: r.kept_pinned_blobs,
            kept_pinned_bytes: r.kept_pinned_bytes,
            kept_in_use_blobs: r.kept_in_use_blobs,
            kept_in_use_bytes: r.kept_in_use_bytes,
            reached: r.after <= r.target,
        })
    }

    /// What a pin of `target` covers: the digest, or every blob of the
    /// image as stored now.
    fn pin_set(&self, target: &str) -> Result<(String, Vec<Digest>), AdminError> {
        match Target::parse(target)? {
            Target::Digest(d) => Ok((d.to_string(), vec![d])),
            Target::Image(r) => {
                let cat = Catalog::load(&self.store);
                let name = r.to_string();
                let d = cat.lookup(&r).ok_or_else(|| not_seen(&name))?;
                Ok((name.clone(), cat.resolve(name, &d).digests()))
            }
        }
    }

    pub fn pin(&self, target: &str) -> Result<PinResponse, AdminError> {
        let (name, digests) = self.pin_set(target)?;
        let rec = self.store.pin(&name, &digests)?;
        Ok(PinResponse {
            target: name,
            digests: rec.digests,
            changed: true,
            still_pinned_by: Vec::new(),
        })
    }

    pub fn unpin(&self, target: &str) -> Result<PinResponse, AdminError> {
        let name = match Target::parse(target)? {
            Target::Digest(d) => d.to_string(),
            Target::Image(r) => r.to_string(),
        };
        let removed = self.store.unpin(&name)?;
        let digests = match &removed {
            Some(rec) => rec.digests.clone(),
            None if name.starts_with("sha256:") => vec![name.clone()],
            None => Vec::new(),
        };
        let mut still: Vec<String> = self
            .store
            .pins()
            .into_iter()
            .filter(|p| p.digests.iter().any(|d| digests.contains(d)))
            .map(|p| p.target)
            .collect();
        still.sort();
        Ok(PinResponse {
            target: name,
            digests,
            changed: removed.is_some(),
            still_pinned_by: still,
        })
    }

    /// `peers`: the swarm's live members, and the ones this node stopped
    /// trusting.
    pub fn peers(&self) -> Peers {
        let Some(swarm) = self.swarm.as_ref() else {
            return Node::peers_disabled();
        };
        let (id, _, role, _) = swarm.local_info();
        let mut out = Peers {
            swarm: "enabled".into(),
            local_peer_id: Some(id),
            local_role: Some(role.as_str().into()),
            peers: Vec::new(),
            distrusted: Vec::new(),
        };
        let mut all = swarm.peers();
        all.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        for p in all {
            let distrusted = p.distrusted;
            let peer = Peer {
                id: p.peer_id,
                role: p.role.as_str().into(),
                addresses: vec![p.data_addr.to_string()],
                latency_ms: None,
                last_seen_ms: Some(p.last_seen_ms),
                bytes_sent: p.bytes_out,
                bytes_received: p.bytes_in,
            };
            if distrusted {
                out.distrusted.push(peer);
            } else {
                out.peers.push(peer);
            }
        }
        out
    }

    /// Removes blobs now, for `bench pull --cold`.
    pub fn evict(&self, digests: &[String]) -> Result<api::EvictResponse, AdminError> {
        let parsed = digests
            .iter()
            .map(|d| d.parse::<Digest>().map_err(AdminError::InvalidDigest))
            .collect::<Result<Vec<_>, _>>()?;
        let mut removed = 0;
        for d in &parsed {
            // The store tells the swarm (`Store::on_removed`).
            if self.store.remove(d)? {
                removed += 1;
            }
        }
        if let Some(m) = &self.metrics {
            self.store.usage().publish(m);
        }
        Ok(api::EvictResponse { removed })
    }

    /// The answer when this node runs without the swarm.
    pub fn peers_disabled() -> Peers {
        Peers {
            swarm: "disabled".into(),
            local_peer_id: None,
            local_role: None,
            peers: Vec::new(),
            distrusted: Vec::new(),
        }
    }
}

fn not_seen(reference: &str) -> AdminError {
    AdminError::NotFound(format!(
        "image {reference} has not been pulled through this node"
    ))
}

fn ratio(part: u64, whole: u64, known: bool) -> f64 {
    match (known, whole) {
        (false, _) => 0.0,
        (true, 0) => 1.0,
        (true, w) => part as f64 / w as f64,
    }
}

/// Current values of an integer counter family by two labels (`b` may be
/// empty for one-label families). Reads the collected samples, so that no
/// series is created just by looking.
fn counts(c: &prometheus::IntCounterVec, a: &str, b: &str) -> HashMap<(String, String), u64> {
    let mut out = HashMap::new();
    for mf in c.collect() {
        for m in mf.get_metric() {
            let label = |name: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default()
            };
            let key = (
                label(a),
                if b.is_empty() {
                    String::new()
                } else {
                    label(b)
                },
            );
            out.insert(key, m.get_counter().get_value() as u64);
        }
    }
    out
}
