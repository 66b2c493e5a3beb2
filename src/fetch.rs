//! The fetch engine: where a blob or manifest comes from.
//!
//! A blob is served from the store when it is there. Otherwise the request
//! joins the one download of that digest on this node (single flight), or
//! starts it. The download writes to `tmp/<hex>.partial`, hashing as it
//! goes, and publishes its progress on a watch channel. Every reader streams
//! from that growing file, so the first byte goes out long before the blob is
//! complete. The last byte of a blob is held back until the digest has been
//! checked and the blob committed: a client can never receive a complete
//! body whose content is wrong. When a download fails, readers see their
//! connection end early; the partial file stays, and the next request
//! re-hashes it and resumes with `Range` (a download that failed before its
//! first byte leaves nothing behind, and an origin's 404 is remembered
//! briefly: [`negative`]).
//!
//! Blobs served from the store are checked chunk by chunk as they go out
//! ([`verify`]); the background upkeep bounds partial downloads and scrubs
//! the store ([`upkeep`]).

mod manifest;
pub mod negative;
pub mod pieces;
mod ranges;
mod spans;
pub mod tags;
pub mod upkeep;
pub mod verify;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use http::{HeaderValue, StatusCode};
use sha2::Digest as _;
use tokio::sync::watch;

use crate::config::Config;
use crate::oci::Digest;
use crate::origin::{self, Origin, OriginError, Upstream};
use crate::store::{Lease, Provenance, Store, StoreError};
use crate::telemetry::Metrics;

pub use manifest::{Manifest, DEFAULT_ACCEPT, MAX_MANIFEST};
pub use spans::{FileSpan, Spans};

/// Bytes written to disk (and hashed) per batch while downloading.
const WRITE_BATCH: usize = 1 << 20;
/// Bytes per frame sent to a client. Larger frames mean fewer wake-ups per
/// GiB (cache hits measured 0.75x of docker-registry at 512 KiB, 0.99x at
/// 2 MiB); smaller ones a quicker first byte. 1 MiB sits between. Verified
/// reads read whole checksum chunks, so it is a multiple of them.
const READ_CHUNK: u64 = 1 << 20;
const _: () = assert!(READ_CHUNK.is_multiple_of(crate::store::SUM_CHUNK));
const RESUME_BACKOFF_START: Duration = Duration::from_millis(200);
const RESUME_BACKOFF_CAP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("content from the origin does not match {expected}: got {actual}")]
    DigestMismatch { expected: Digest, actual: String },
    #[error("origin sent {got} bytes for {digest}, more than the {expected} it announced")]
    Oversized {
        digest: Digest,
        expected: u64,
        got: u64,
    },
    #[error("origin's answer for {what} is unusable: {reason}")]
    BadOriginResponse { what: String, reason: String },
    #[error("download of {digest} failed after {attempts} attempts: {last}")]
    Exhausted {
        digest: Digest,
        attempts: u32,
        last: String,
    },
    #[error("manifest is larger than {limit} bytes")]
    ManifestTooLarge { limit: u64 },
    #[error("reading {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("download of {0} was abandoned")]
    Abandoned(Digest),
    /// A download's failure, as seen by each request that waited on it.
    #[error(transparent)]
    Shared(Arc<FetchError>),
}

impl FetchError {
    /// The underlying error, through any sharing.
    pub fn root(&self) -> &FetchError {
        match self {
            FetchError::Shared(e) => e.root(),
            e => e,
        }
    }
}

/// Where the bytes of an answer came from, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Local,
    /// A download in progress that takes pieces from peers (and the pieces
    /// nobody holds from the origin).
    Peer,
    Origin,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Peer => "peer",
            Source::Origin => "origin",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Progress {
    /// The blob's size, known once the origin (or a peer) answered.
    total: Option<u64>,
    /// Bytes on disk in the partial file, contiguous from the start.
    written: u64,
    /// Set once: committed, or failed.
    done: Option<Result<(), Arc<FetchError>>>,
    /// Piece downloads fill the file out of order: `filled[k]` bytes of
    /// piece `k` (of `piece_size`) are on disk, contiguous from the piece's
    /// start. Empty for a sequential download.
    piece_size: u64,
    filled: Vec<u64>,
    /// Bumped when a digest mismatch is being repaired: readers of an
    /// earlier epoch that already sent bytes past `poisoned_from` sent
    /// bytes that may be wrong, and are cut.
    epoch: u64,
    poisoned_from: Option<u64>,
}

impl Progress {
    /// The end of the bytes on disk contiguous from `pos`.
    fn available_from(&self, pos: u64) -> u64 {
        if self.filled.is_empty() || self.piece_size == 0 {
            return self.written.max(pos);
        }
        let ps = self.piece_size;
        let size = self.total.unwrap_or(u64::MAX);
        let mut end = pos;
        let mut k = (pos / ps) as usize;
        while k < self.filled.len() {
            let start = k as u64 * ps;
            let have = start + self.filled[k];
            if have <= end {
                break;
            }
            end = have;
            if have < (start + ps).min(size) {
                break;
            }
            k += 1;
        }
        end
    }
}

/// Who a download is for, which decides who yields bandwidth to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A pull on this node (containerd, the kubelet): never waits.
    Live,
    /// Prewarm and seeds following the cluster: pause while any live
    /// download runs, unless a live reader joins them.
    Background,
}

/// One download in flight.
struct Download {
    digest: Digest,
    progress: watch::Sender<Progress>,
    /// A read handle on the partial file. It stays valid across the rename
    /// that commits the blob.
    file: Arc<File>,
    /// For a piece download: where peers' requests for pieces go.
    wants: Option<tokio::sync::mpsc::UnboundedSender<pieces::Want>>,
    /// Counted in `Inner::live` (see [`Priority`]).
    live: std::sync::atomic::AtomicBool,
    /// Bytes this download took from the origin and from peers.
    from_origin: std::sync::atomic::AtomicU64,
    from_peers: std::sync::atomic::AtomicU64,
}

impl Download {
    fn count(&self, source: Source, n: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        match source {
            Source::Peer => self.from_peers.fetch_add(n, Relaxed),
            _ => self.from_origin.fetch_add(n, Relaxed),
        };
    }

    fn is_live(&self) -> bool {
        self.live.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether this download should hold back now, with `live` live
    /// downloads in flight (this one is never among them when it holds
    /// back).
    fn yields_to(&self, live: usize) -> bool {
        live > 0 && !self.is_live()
    }

    /// Marks the download live (a live reader joined it); the count of live
    /// downloads wakes anything waiting on it.
    fn promote(&self, inner: &Inner) {
        if !self.live.swap(true, std::sync::atomic::Ordering::SeqCst) {
            inner.live.send_modify(|n| *n += 1);
        }
    }

    /// Waits until the download knows the blob's size (or failed).
    async fn size(&self) -> Result<u64, FetchError> {
        let mut rx = self.progress.subscribe();
        loop {
            {
                let p = rx.borrow_and_update();
                if let Some(Err(e)) = &p.done {
                    return Err(FetchError::Shared(e.clone()));
                }
                if let Some(total) = p.total {
                    return Ok(total);
                }
            }
            if rx.changed().await.is_err() {
                return Err(FetchError::Abandoned(self.digest.clone()));
            }
        }
    }

    /// Ends a download: out of the single-flight map (after the commit, so
    /// a new request finds the blob), and the verdict to every reader. An
    /// origin's 404 for `(registry, repo)` is remembered first, so that no
    /// request slips in between and asks the origin again.
    fn finish(&self, inner: &Inner, result: Result<(), FetchError>, asked: (&Upstream, &str)) {
        let result = result.map_err(Arc::new);
        if let Err(e) = &result {
            if negative::is_not_found(e) {
                inner.negative().insert(
                    asked.0.host(),
                    asked.1,
                    &self.digest,
                    e.clone(),
                    std::time::Instant::now(),
                );
            }
        }
        inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.digest);
        inner.metrics.downloads_in_flight.dec();
        if self.live.swap(false, std::sync::atomic::Ordering::SeqCst) {
            inner.live.send_modify(|n| *n = n.saturating_sub(1));
        }
        self.progress.send_modify(|p| p.done = Some(result));
    }
}

/// What [`Fetcher::ensure_blob`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ensured {
    /// `Local`: it was in the store already.
    pub source: Source,
    pub size: u64,
    /// Bytes the download took from the origin and from peers (a download
    /// joined mid-way counts everything it took).
    pub origin_bytes: u64,
    pub peer_bytes: u64,
}

/// A download in flight, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadStatus {
    pub digest: Digest,
    /// Bytes on disk so far.
    pub written: u64,
    /// The blob's size, once the origin said.
    pub total: Option<u64>,
    /// Requests following the download right now.
    pub readers: u32,
}

/// A blob ready to stream: its size and where its bytes come from.
pub struct Blob {
    pub size: u64,
    pub source: Source,
    /// Read by a peer: the last byte is not held back (the peer checks the
    /// digest itself), and bytes stream as soon as they are on disk.
    for_peer: bool,
    body: BlobBody,
}

impl Blob {
    /// Chunk checksums to send a peer with bytes from `start` on (a
    /// committed blob whose checksums were recorded, `start` on a chunk).
    pub fn sums_from(
        &self,
        store: &Store,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Option<Vec<u64>> {
        if !matches!(self.body, BlobBody::Local { .. })
            || !start.is_multiple_of(crate::store::SUM_CHUNK)
        {
            return None;
        }
        let first = (start / crate::store::SUM_CHUNK) as usize;
        let last = end.div_ceil(crate::store::SUM_CHUNK) as usize;
        store.sums_slice(digest, self.size, first, last)
    }
}

enum BlobBody {
    Local {
        file: Arc<File>,
        lease: Lease,
        /// Set when reads are verified against the chunk sums.
        guard: Option<Arc<verify::Guard>>,
    },
    Growing(Arc<Download>),
}

/// The engine. Cheap to clone.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    origin: Origin,
    metrics: Metrics,
    /// Set once the swarm is up (it needs the fetcher to serve peers).
    swarm: std::sync::OnceLock<crate::swarm::Swarm>,
    retries: u32,
    inflight: Mutex<HashMap<Digest, Arc<Download>>>,
    tags: tags::TagCache,
    /// Live downloads in flight (see [`Priority`]).
    live: watch::Sender<usize>,
    verify_reads: bool,
    negative: Mutex<negative::NegativeCache>,
    checks: verify::Checks,
    /// `origin.parallel_ranges` and `origin.range_size`.
    ranges: (usize, u64),
}

impl Inner {
    fn negative(&self) -> std::sync::MutexGuard<'_, negative::NegativeCache> {
        self.negative.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Fetcher {
    pub fn new(cfg: &Config, store: Store, origin: Origin, metrics: Metrics) -> Fetcher {
        Fetcher {
            inner: Arc::new(Inner {
                tags: tags::TagCache::new(store.tags_dir(), cfg.mirror.tag_stale_for),
                store,
                origin,
                metrics,
                swarm: std::sync::OnceLock::new(),
                retries: cfg.origin.retries,
                inflight: Mutex::new(HashMap::new()),
                verify_reads: cfg.store.verify_reads,
                negative: Mutex::new(negative::NegativeCache::default()),
                checks: Mutex::new(HashMap::new()),
                live: watch::Sender::new(0),
                ranges: (cfg.origin.parallel_ranges, cfg.origin.range_size),
            }),
        }
    }

    /// The single-flight map, locked.
    fn inflight(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Download>>> {
        self.inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn origin(&self) -> &Origin {
        &self.inner.origin
    }

    /// Hands the fetcher the swarm; from then on downloads take pieces from
    /// peers. Only the first call counts.
    pub fn attach_swarm(&self, swarm: crate::swarm::Swarm) {
        let _ = self.inner.swarm.set(swarm);
    }

    pub fn swarm(&self) -> Option<&crate::swarm::Swarm> {
        self.inner.swarm.get()
    }

    /// A seed's answer to a peer starting a pull: fetch the same blob, whole,
    /// from the swarm, so that a copy outlives the nodes that pulled it.
    pub fn follow(&self, digest: &Digest, ns: &str, repo: &str) {
        if self.inner.store.contains(digest) {
            return;
        }
        let Some(up) = self.inner.origin.upstream(ns) else {
            tracing::debug!(digest = %digest, registry = ns, "not following a pull of a registry not mirrored here");
            return;
        };
        if crate::oci::validate_repository(repo).is_err() {
            return;
        }
        match self.join_or_start(&up, repo, digest, None, false, Priority::Background) {
            Ok(Some((_, true))) => {
                tracing::info!(digest = %digest, registry = ns, repo, "seed: keeping a copy of a blob the cluster pulls");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(digest = %digest, error = %e, "seed cannot follow a pull"),
        }
    }

    /// A snapshot of the downloads in flight, for the admin API.
    pub fn downloads(&self) -> Vec<DownloadStatus> {
        let inflight = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        inflight
            .values()
            .map(|dl| {
                let p = dl.progress.borrow();
                DownloadStatus {
                    digest: dl.digest.clone(),
                    written: p.written,
                    total: p.total,
                    readers: dl.progress.receiver_count() as u32,
                }
            })
            .collect()
    }

    /// Opens blob `digest` of `repo`: from the store, or by joining or
    /// starting its download. Returns once the size is known.
    #[tracing::instrument(skip_all, fields(digest = %digest, registry = %up.host()))]
    pub async fn blob(
        &self,
        up: &Upstream,
        repo: &str,
        digest: &Digest,
        client_auth: Option<&HeaderValue>,
    ) -> Result<Blob, FetchError> {
        let m = &self.inner.metrics;
        // Twice at most: a download may commit between our store lookup and
        // the in-flight lookup, and then the blob is in the store.
        let mut attempt = 0;
        let (dl, started) = loop {
            if let Some(opened) = self.inner.store.open_blob(digest)? {
                let refetch = Some((up.clone(), repo.to_owned()));
                // `None`: it was bad, and its refetch is joined below.
                if let Some(blob) = self
                    .local_blob(opened, digest, verify::FoundBy::Mirror, refetch)
                    .await?
                {
                    m.cache_lookups.with_label_values(&["blob", "hit"]).inc();
                    return Ok(blob);
                }
            }
            attempt += 1;
            match self.join_or_start(up, repo, digest, client_auth, attempt > 1, Priority::Live)? {
                Some(found) => break found,
                None => continue,
            }
        };
        m.cache_lookups
            .with_label_values(&["blob", if started { "miss" } else { "joined" }])
            .inc();
        let size = dl.size().await?;
        let source = if dl.wants.is_some() {
            Source::Peer
        } else {
            Source::Origin
        };
        Ok(Blob {
            size,
            source,
            for_peer: false,
            body: BlobBody::Growing(dl),
        })
    }

    fn join_or_start(
        &self,
        up: &Upstream,
        repo: &str,
        digest: &Digest,
        client_auth: Option<&HeaderValue>,
        last_try: bool,
        priority: Priority,
    ) -> Result<Option<(Arc<Download>, bool)>, FetchError> {
        self.join_or_start_as(
            up,
            repo,
            digest,
            client_auth,
            last_try,
            Starter::Local,
            priority,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn join_or_start_as(
        &self,
        up: &Upstream,
        repo: &str,
        digest: &Digest,
        client_auth: Option<&HeaderValue>,
        last_try: bool,
        starter: Starter,
        priority: Priority,
    ) -> Result<Option<(Arc<Download>, bool)>, FetchError> {
        let mut inflight = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(dl) = inflight.get(digest) {
            if priority == Priority::Live {
                dl.promote(&self.inner);
            }
            if let Some(w) = &dl.wants {
                let _ = w.send(match starter {
                    Starter::Local => pieces::Want::All,
                    Starter::Peer { piece, .. } => pieces::Want::Piece(piece),
                });
            }
            return Ok(Some((dl.clone(), false)));
        }
        // Downloads commit before they leave the map, so under this lock a
        // blob is either in flight or (if it just finished) in the store.
        if !last_try && self.inner.store.contains(digest) {
            return Ok(None);
        }
        let known_missing =
            self.inner
                .negative()
                .get(up.host(), repo, digest, std::time::Instant::now());
        if let Some(e) = known_missing {
            self.inner
                .metrics
                .cache_lookups
                .with_label_values(&["blob", "negative"])
                .inc();
            return Err(FetchError::Shared(e));
        }
        let path = self.inner.store.partial_path(digest);
        let io = |source| FetchError::Io {
            what: path.display().to_string(),
            source,
        };
        let writer = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let reader = File::open(&path).map_err(io)?;
        // Alone, a node downloads sequentially (and can resume after a
        // crash); with peers, or for a peer, piece by piece.
        let swarm = self
            .inner
            .swarm
            .get()
            .filter(|s| matches!(starter, Starter::Peer { .. }) || s.has_peers())
            .cloned();
        let (wants_tx, wants_rx) = tokio::sync::mpsc::unbounded_channel();
        let dl = Arc::new(Download {
            digest: digest.clone(),
            progress: watch::Sender::new(Progress::default()),
            file: Arc::new(reader),
            wants: swarm.as_ref().map(|_| wants_tx.clone()),
            live: Default::default(),
            from_origin: Default::default(),
            from_peers: Default::default(),
        });
        if priority == Priority::Live {
            dl.promote(&self.inner);
        }
        inflight.insert(digest.clone(), dl.clone());
        drop(inflight);
        self.inner.metrics.downloads_in_flight.inc();
        match swarm {
            Some(swarm) => {
                let (full, size) = match starter {
                    Starter::Local => (true, None),
                    Starter::Peer { piece, size } => {
                        let _ = wants_tx.send(pieces::Want::Piece(piece));
                        (false, size)
                    }
                };
                let job = pieces::PieceJob::new(
                    self.clone(),
                    swarm,
                    dl.clone(),
                    up.clone(),
                    repo.to_owned(),
                    client_auth.cloned(),
                    Arc::new(writer),
                    wants_rx,
                    full,
                    size,
                );
                tokio::spawn(job.run());
            }
            None => {
                let job = DownloadJob {
                    fetcher: self.clone(),
                    dl: dl.clone(),
                    up: up.clone(),
                    repo: repo.to_owned(),
                    client_auth: client_auth.cloned(),
                    writer: Arc::new(writer),
                };
                tokio::spawn(job.run());
            }
        }
        Ok(Some((dl, true)))
    }

    /// Gets blob `digest` of `repo` into the store without reading it:
    /// joins or starts its download at `priority` and waits for the
    /// commit. This is prewarm's way in: the same single flight, swarm and
    /// digest checks as a pull, none of the copying.
    pub async fn ensure_blob(
        &self,
        up: &Upstream,
        repo: &str,
        digest: &Digest,
        priority: Priority,
    ) -> Result<Ensured, FetchError> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut attempt = 0;
        let dl = loop {
            if let Some(info) = self.inner.store.blob_info(digest) {
                return Ok(Ensured {
                    source: Source::Local,
                    size: info.size,
                    origin_bytes: 0,
                    peer_bytes: 0,
                });
            }
            attempt += 1;
            match self.join_or_start(up, repo, digest, None, attempt > 1, priority)? {
                Some((dl, _)) => break dl,
                None => continue,
            }
        };
        let mut rx = dl.progress.subscribe();
        loop {
            {
                let p = rx.borrow_and_update();
                match &p.done {
                    Some(Ok(())) => {
                        let (origin_bytes, peer_bytes) =
                            (dl.from_origin.load(Relaxed), dl.from_peers.load(Relaxed));
                        return Ok(Ensured {
                            source: if peer_bytes > 0 || dl.wants.is_some() {
                                Source::Peer
                            } else {
                                Source::Origin
                            },
                            size: p.total.unwrap_or(p.written),
                            origin_bytes,
                            peer_bytes,
                        });
                    }
                    Some(Err(e)) => return Err(FetchError::Shared(e.clone())),
                    None => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(FetchError::Abandoned(digest.clone()));
            }
        }
    }

    /// Live downloads in flight now.
    pub fn live_downloads(&self) -> usize {
        *self.inner.live.borrow()
    }

    /// Waits until no live download is in flight (returns at once when
    /// none is).
    pub async fn until_no_live(&self) {
        let mut rx = self.inner.live.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Holds a background download back while live downloads run; returns
    /// at once for a live one, or when a live reader joins this one.
    async fn yield_to_live(&self, dl: &Download) {
        let mut rx = self.inner.live.subscribe();
        let _ = rx.wait_for(|n| !dl.yields_to(*n)).await;
    }

    /// Opens bytes of blob `digest` for a peer: from the store, from a
    /// download in flight (asking it for the piece at `start`), or, with
    /// `origin` given, from a new serving download of just the pieces peers
    /// ask for. `None`: not here and not fetchable.
    pub async fn blob_for_peer(
        &self,
        digest: &Digest,
        start: u64,
        size: Option<u64>,
        origin: Option<(Upstream, String)>,
    ) -> Result<Option<Blob>, FetchError> {
        if let Some(opened) = self.inner.store.open_blob(digest)? {
            if let Some(blob) = self
                .local_blob(opened, digest, verify::FoundBy::Peer, origin.clone())
                .await?
            {
                return Ok(Some(blob));
            }
            // It was bad: its refetch is in flight now, and serves the peer.
        }
        let piece = self
            .inner
            .swarm
            .get()
            .map_or(0, |s| (start / s.piece_size()) as usize);
        let existing = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned();
        let dl = match (existing, origin) {
            (Some(dl), _) => {
                if let Some(w) = &dl.wants {
                    // A download still waiting for its first answer takes
                    // the size the peer knows, so the peer's piece can be
                    // started (and answered) at once.
                    if let (Some(size), Some(swarm)) = (size, self.inner.swarm.get()) {
                        pieces::adopt_size(&dl, size, swarm.piece_size());
                    }
                    let _ = w.send(pieces::Want::Piece(piece));
                }
                dl
            }
            (None, Some((up, repo))) => {
                match self.join_or_start_as(
                    &up,
                    &repo,
                    digest,
                    None,
                    false,
                    Starter::Peer { piece, size },
                    // Priority is this node's: a peer's request only adds
                    // pieces, which go first whatever the priority.
                    Priority::Background,
                )? {
                    Some((dl, _)) => dl,
                    None => return Box::pin(self.blob_for_peer(digest, start, size, None)).await,
                }
            }
            (None, None) => return Ok(None),
        };
        let size = dl.size().await?;
        Ok(Some(Blob {
            size,
            source: Source::Peer,
            for_peer: true,
            body: BlobBody::Growing(dl),
        }))
    }
}

/// Who starts a download, which decides how much of it is fetched.
#[derive(Debug, Clone, Copy)]
enum Starter {
    /// A reader on this node: the whole blob.
    Local,
    /// A peer asking for one piece: only what peers ask for.
    Peer { piece: usize, size: Option<u64> },
}

struct DownloadJob {
    fetcher: Fetcher,
    dl: Arc<Download>,
    up: Upstream,
    repo: String,
    client_auth: Option<HeaderValue>,
    writer: Arc<File>,
}

impl DownloadJob {
    async fn run(self) {
        let inner = self.fetcher.inner.clone();
        let digest = self.dl.digest.clone();
        let result = self.download().await;
        if let Err(e) = &result {
            if is_disk_full(e) {
                // Keeping the partial would only hold the space that every
                // other download needs; this blob does not fit anyway.
                let _ = std::fs::remove_file(inner.store.partial_path(&digest));
                tracing::error!(digest = %digest, error = %e, dir = %inner.store.root().display(),
                    "the store's disk is full: store.max_size is larger than the free space; \
                     partial download removed");
            } else {
                tracing::warn!(digest = %digest, error = %e, "blob download failed");
            }
            if matches!(e, FetchError::DigestMismatch { .. }) {
                inner.metrics.digest_mismatches.inc();
            }
            // Failed before its first byte (a 404, an auth error, a refused
            // size): nothing to resume, so no file either. Still in the
            // single-flight map, so no other download uses the path.
            if self.writer.metadata().is_ok_and(|m| m.len() == 0)
                && inner.store.remove_partial(&digest).unwrap_or(false)
            {
                inner
                    .metrics
                    .partials_removed
                    .with_label_values(&["failed"])
                    .inc();
            }
        }
        // Commit happened inside download(); only now may a new request
        // start another download of this digest, and it will find the blob.
        self.dl.finish(&inner, result, (&self.up, &self.repo));
    }

    async fn download(&self) -> Result<(), FetchError> {
        let inner = &self.fetcher.inner;
        let digest = &self.dl.digest;
        let (mut hasher, mut written) =
            rehash(self.writer.clone())
                .await
                .map_err(|source| FetchError::Io {
                    what: "partial download".into(),
                    source,
                })?;
        let mut total: Option<u64> = None;
        if written > 0 {
            if Digest::from_sha256(&hasher.sha.clone().finalize()) == *digest {
                // The process died after the last byte, before the commit:
                // the content is complete and proven, no origin needed.
                tracing::info!(digest = %digest, bytes = written, "partial download is complete");
                total = Some(written);
                self.dl.progress.send_modify(|p| {
                    p.total = Some(written);
                    p.written = written;
                });
            } else {
                tracing::info!(digest = %digest, bytes = written, "resuming partial download");
                self.dl.progress.send_modify(|p| p.written = written);
            }
        }
        let mut failures = 0u32;
        let mut backoff = RESUME_BACKOFF_START;
        let mut restarted = false;
        loop {
            if total == Some(written) {
                break;
            }
            match self.transfer(&mut hasher, &mut written, &mut total).await {
                Ok(()) => continue,
                // A partial the origin cannot continue (it is as long as the
                // blob or longer, or the origin refuses the range): start
                // over, once. No reader has seen a byte yet, since readers
                // wait for the size, which is only known after an answer.
                Err(e) if !restarted && total.is_none() && written > 0 && cannot_resume(&e) => {
                    tracing::warn!(digest = %digest, error = %e, at = written,
                        "partial download cannot be resumed, starting over");
                    restarted = true;
                    self.writer.set_len(0).map_err(|source| FetchError::Io {
                        what: "truncating partial download".into(),
                        source,
                    })?;
                    hasher = BlobHasher::default();
                    written = 0;
                    self.dl.progress.send_modify(|p| p.written = 0);
                }
                Err(e) if is_final(&e) => return Err(e),
                Err(e) => {
                    failures += 1;
                    if failures > inner.retries {
                        return Err(FetchError::Exhausted {
                            digest: digest.clone(),
                            attempts: failures,
                            last: e.to_string(),
                        });
                    }
                    inner.metrics.origin_resumes.inc();
                    tracing::warn!(digest = %digest, error = %e, at = written, attempt = failures,
                        "blob transfer broke, resuming");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RESUME_BACKOFF_CAP);
                }
            }
        }
        let BlobHasher { sha, sums } = hasher;
        let actual = Digest::from_sha256(&sha.finalize());
        let path = inner.store.partial_path(digest);
        if &actual != digest {
            let _ = std::fs::remove_file(&path);
            return Err(FetchError::DigestMismatch {
                expected: digest.clone(),
                actual: actual.to_string(),
            });
        }
        // Before the commit: a committed blob always has its sums, which
        // verified reads need (a crash in between leaves a harmless orphan).
        if let Err(e) = inner.store.set_sums(digest, &sums.finish()) {
            tracing::debug!(digest = %digest, error = %e, "cannot record chunk checksums");
        }
        // fsync of a multi-GiB file, and any eviction it triggers, must not
        // hold a runtime worker.
        let store = inner.store.clone();
        let d = digest.clone();
        tokio::task::spawn_blocking(move || store.commit(&d, &path, &actual, written, total, None))
            .await
            .map_err(|e| FetchError::Io {
                what: "committing blob".into(),
                source: io::Error::other(e),
            })??;
        let prov = Provenance::origin(self.up.host(), &self.repo);
        if let Err(e) = inner.store.set_provenance(digest, &prov) {
            tracing::debug!(digest = %digest, error = %e, "cannot record provenance");
        }
        inner.metrics.observe_store(inner.store.usage());
        if let Some(swarm) = inner.swarm.get() {
            swarm.blob_committed(digest, written);
        }
        tracing::info!(digest = %digest, bytes = written, "blob committed");
        Ok(())
    }

    /// One origin request, from `written` on, until the body ends; with
    /// parallel ranges, the rest of the blob in parts ([`ranges`]).
    async fn transfer(
        &self,
        hasher: &mut BlobHasher,
        written: &mut u64,
        total: &mut Option<u64>,
    ) -> Result<(), FetchError> {
        let inner = &self.fetcher.inner;
        let digest = &self.dl.digest;
        let bad = |reason: String| FetchError::BadOriginResponse {
            what: digest.to_string(),
            reason,
        };
        let (parallel, part) = inner.ranges;
        // With parallel ranges, the first GET asks for one part: a 206 says
        // the origin takes ranges (and the size); a 200 streams the blob.
        let range = match (*written, parallel > 1) {
            (w, true) => Some((w, Some(w.saturating_add(part)))),
            (0, false) => None,
            (w, false) => Some((w, None)),
        };
        let req = origin::Request::blob_get(&self.repo, digest, range, self.client_auth.as_ref());
        let resp = inner.origin.send(&self.up, &req).await?;
        // Where the body starts and ends, and the blob's full size.
        let (start, end, size) = match resp.status() {
            StatusCode::PARTIAL_CONTENT => resp
                .headers()
                .get(http::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::http::parse_content_range)
                .map(|r| (r.first, r.last + 1, r.size))
                .ok_or_else(|| bad("206 without a usable Content-Range".into()))?,
            StatusCode::OK => {
                let len = resp
                    .content_length()
                    .ok_or_else(|| bad("no Content-Length".into()))?;
                (0, len, len)
            }
            s => return Err(bad(format!("unexpected status {s}"))),
        };
        match *total {
            Some(t) if t != size => {
                return Err(bad(format!(
                    "size changed from {t} to {size} between requests"
                )))
            }
            _ => {}
        }
        if start > *written {
            return Err(bad(format!("range starts at {start}, wanted {}", *written)));
        }
        if *written > size {
            return Err(FetchError::Oversized {
                digest: digest.clone(),
                expected: size,
                got: *written,
            });
        }
        if total.is_none() {
            *total = Some(size);
            self.dl.progress.send_modify(|p| p.total = Some(size));
        }
        let mut sink = ranges::Sink::new(self, hasher, written, size);
        let received = if end < size {
            ranges::parallel(self, &mut sink, resp, start, end, part, parallel).await
        } else {
            self.stream_body(&mut sink, resp, start).await
        };
        // Whatever happened, the batch in flight lands first, so the hasher
        // and `written` agree with the file for the next attempt.
        sink.settle().await?;
        received?;
        if *written < size {
            return Err(bad(format!("body ended at {} of {size} bytes", *written)));
        }
        Ok(())
    }

    /// Streams one answer whose body starts at `start` into `sink`.
    async fn stream_body(
        &self,
        sink: &mut ranges::Sink<'_>,
        resp: reqwest::Response,
        start: u64,
    ) -> Result<(), FetchError> {
        let bad = |reason: String| FetchError::BadOriginResponse {
            what: self.dl.digest.to_string(),
            reason,
        };
        // A server that ignored our Range resends what we already have.
        let mut skip = sink.end().saturating_sub(start);
        let mut body = resp.bytes_stream();
        loop {
            self.fetcher.yield_to_live(&self.dl).await;
            let first = match body.next().await {
                None => return Ok(()),
                Some(chunk) => chunk,
            };
            // Chunks already buffered are gathered, up to a batch, so the
            // disk and the hasher get few large calls.
            let mut chunk = Some(first);
            while let Some(c) = chunk.take() {
                let c = c.map_err(|e| bad(format!("body broke: {e}")))?;
                let c = if skip > 0 {
                    let n = skip.min(c.len() as u64);
                    skip -= n;
                    c.slice(n as usize..)
                } else {
                    c
                };
                sink.push(c);
                if sink.is_full() {
                    break;
                }
                chunk = body.next().now_or_never().flatten();
            }
            sink.submit().await?;
        }
    }

    /// Waits for a batch handed to [`write_and_hash`], takes the hasher
    /// back and publishes the new end of the file to readers.
    async fn complete(
        &self,
        write: PendingWrite,
        end: u64,
        hasher: &mut BlobHasher,
        written: &mut u64,
    ) -> Result<(), FetchError> {
        let io_err = |source| FetchError::Io {
            what: "writing partial download".into(),
            source,
        };
        // A panicked writer took the hasher with it; failing the download
        // is safe, since the next attempt re-hashes the file from disk.
        let (h, res) = write.await.map_err(|e| io_err(io::Error::other(e)))?;
        *hasher = h;
        res.map_err(io_err)?;
        let n = end - *written;
        *written = end;
        self.fetcher.inner.metrics.origin_bytes.inc_by(n);
        self.dl.count(Source::Origin, n);
        self.dl.progress.send_modify(|p| p.written = end);
        Ok(())
    }
}

/// Out of space (or quota) on the store's filesystem.
fn is_disk_full(e: &FetchError) -> bool {
    let io = match e {
        FetchError::Io { source, .. } => source,
        FetchError::Store(StoreError::Io { source, .. }) => source,
        _ => return false,
    };
    matches!(
        io.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Errors that say the partial file, not the network, is the problem.
fn cannot_resume(e: &FetchError) -> bool {
    matches!(
        e,
        FetchError::Oversized { .. }
            | FetchError::Origin(OriginError::Status {
                status: StatusCode::RANGE_NOT_SATISFIABLE,
                ..
            })
    )
}

/// Errors that another attempt would not fix.
///
/// Origin errors are final here: the origin client already retried the
/// request with backoff, and retrying its retries would multiply them
/// (`origin.retries` squared against a dead origin). What the download loop
/// retries is a body that broke after a good answer.
fn is_final(e: &FetchError) -> bool {
    matches!(
        e,
        FetchError::Origin(_)
            | FetchError::Store(_)
            | FetchError::Io { .. }
            | FetchError::Oversized { .. }
            // A part of a parallel download that used up its own retries.
            | FetchError::Exhausted { .. }
    )
}

type PendingWrite = tokio::task::JoinHandle<(BlobHasher, io::Result<()>)>;

/// What a download computes over the bytes as they land: the blob's
/// SHA-256, and the chunk checksums peers are sent with its pieces.
#[derive(Clone, Default)]
struct BlobHasher {
    sha: sha2::Sha256,
    sums: ChunkSums,
}

impl BlobHasher {
    fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.sums.update(data);
    }
}

/// xxh3-64 of every [`crate::store::SUM_CHUNK`] bytes of a stream, fed in
/// pieces of any size.
#[derive(Clone)]
pub(crate) struct ChunkSums {
    cur: xxhash_rust::xxh3::Xxh3,
    in_cur: u64,
    sums: Vec<u64>,
}

impl Default for ChunkSums {
    fn default() -> Self {
        ChunkSums {
            cur: xxhash_rust::xxh3::Xxh3::new(),
            in_cur: 0,
            sums: Vec::new(),
        }
    }
}

impl ChunkSums {
    pub(crate) fn update(&mut self, mut data: &[u8]) {
        let chunk = crate::store::SUM_CHUNK;
        while !data.is_empty() {
            let n = ((chunk - self.in_cur) as usize).min(data.len());
            self.cur.update(&data[..n]);
            self.in_cur += n as u64;
            data = &data[n..];
            if self.in_cur == chunk {
                self.sums.push(self.cur.digest());
                self.cur.reset();
                self.in_cur = 0;
            }
        }
    }

    pub(crate) fn finish(mut self) -> Vec<u64> {
        if self.in_cur > 0 {
            self.sums.push(self.cur.digest());
        }
        self.sums
    }
}

/// Hashes `chunks` and writes them at `at`, on a blocking thread.
fn write_and_hash(
    file: Arc<File>,
    at: u64,
    chunks: Vec<Bytes>,
    mut hasher: BlobHasher,
) -> PendingWrite {
    tokio::task::spawn_blocking(move || {
        let mut pos = at;
        for c in &chunks {
            hasher.update(c);
            if let Err(e) = file.write_all_at(c, pos) {
                return (hasher, Err(e));
            }
            pos += c.len() as u64;
        }
        (hasher, Ok(()))
    })
}

/// Hashes what a partial file already holds, so a download can resume.
async fn rehash(file: Arc<File>) -> io::Result<(BlobHasher, u64)> {
    tokio::task::spawn_blocking(move || {
        let mut hasher = BlobHasher::default();
        let mut buf = vec![0u8; WRITE_BATCH];
        let mut pos = 0u64;
        loop {
            let n = file.read_at(&mut buf, pos)?;
            if n == 0 {
                return Ok((hasher, pos));
            }
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
    })
    .await
    .map_err(io::Error::other)?
}

async fn read_chunk(file: Arc<File>, pos: u64, len: u64) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read_at(&mut buf[filled..], pos + filled as u64)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob file is shorter than expected",
                ));
            }
            filled += n;
        }
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(io::Error::other)?
}

impl Blob {
    /// The state of a read of bytes `start..end`, shared by [`Blob::stream`]
    /// and [`Blob::spans`].
    fn reader(self, start: u64, end: u64) -> ReadState {
        let size = self.size;
        let end = end.min(size);
        let (file, rx, lease, verified) = match self.body {
            BlobBody::Local { file, lease, guard } => {
                let verified = guard.map(|guard| {
                    let cs = crate::store::SUM_CHUNK;
                    let first = (start / cs) as usize;
                    let sums = guard.fetcher.inner.store.sums_slice(
                        &guard.digest,
                        size,
                        first,
                        end.div_ceil(cs) as usize,
                    );
                    Verified { guard, first, sums }
                });
                (file, None, Some(lease), verified)
            }
            BlobBody::Growing(dl) => (dl.file.clone(), Some(dl.progress.subscribe()), None, None),
        };
        let epoch = rx.as_ref().map_or(0, |r| r.borrow().epoch);
        ReadState {
            for_peer: self.for_peer,
            epoch,
            pos: start,
            end,
            size,
            rx,
            file,
            _lease: lease,
            verified,
            ahead: None,
        }
    }

    /// Streams bytes `start..end` of the blob. For a download in progress
    /// the stream follows the file as it grows; it ends with an error (and
    /// so a cut connection) if the download fails.
    pub fn stream(
        self,
        start: u64,
        end: u64,
        metrics: Metrics,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let counter = metrics
            .bytes_served
            .with_label_values(&[self.source.as_str()]);
        let state = self.reader(start, end);
        futures_util::stream::unfold(state, move |mut st| {
            let counter = counter.clone();
            async move {
                if st.pos >= st.end {
                    // An empty blob has no last byte to hold back: the end
                    // of its body waits for the verdict instead.
                    if st.size == 0 {
                        if let Err(e) = st.wait_done().await {
                            st.rx = None;
                            return Some((Err(e), st));
                        }
                    }
                    return None;
                }
                if st.rx.is_none() {
                    return Some(st.next_local(&counter).await);
                }
                let readable = match st.readable().await {
                    Ok(r) => r,
                    Err(e) => {
                        st.pos = st.end;
                        return Some((Err(e), st));
                    }
                };
                let len = (readable - st.pos).min(READ_CHUNK);
                match read_chunk(st.file.clone(), st.pos, len).await {
                    Ok(b) => {
                        st.pos += len;
                        counter.inc_by(len);
                        Some((Ok(b), st))
                    }
                    Err(e) => {
                        st.pos = st.end;
                        Some((Err(e), st))
                    }
                }
            }
        })
    }
}

struct ReadState {
    for_peer: bool,
    /// The download's epoch when this reader last checked it.
    epoch: u64,
    pos: u64,
    end: u64,
    size: u64,
    rx: Option<watch::Receiver<Progress>>,
    file: Arc<File>,
    _lease: Option<Lease>,
    verified: Option<Verified>,
    /// A read from the store started ahead, and where it starts.
    ahead: Option<(u64, verify::PendingRead)>,
}

/// A read from the store checked against the blob's chunk sums.
struct Verified {
    guard: Arc<verify::Guard>,
    /// The chunk `sums[0]` belongs to.
    first: usize,
    /// The sums of the chunks the range covers; `None` when they vanished
    /// after the blob was opened (it was removed meanwhile).
    sums: Option<Vec<u64>>,
}

impl ReadState {
    /// The next frame of a read from the store. With verified reads, whole
    /// chunks are read and checked before any of their bytes go out. The
    /// next span is read (and checked) on a blocking thread while this one
    /// is sent: one span ahead, so a reader holds two at most.
    async fn next_local(
        mut self,
        counter: &prometheus::IntCounter,
    ) -> (io::Result<Bytes>, ReadState) {
        let (at, span_end) = self.span_at(self.pos);
        let pending = match self.ahead.take() {
            Some((a, h)) if a == at => Some(h),
            _ => self.start_read(at, span_end),
        };
        let Some(pending) = pending else {
            self.pos = self.end;
            let e =
                io::Error::other("the blob's chunk sums are gone: it was removed while being read");
            return (Err(e), self);
        };
        let read = pending
            .await
            .unwrap_or_else(|e| Err(verify::ReadFail::Io(io::Error::other(e))));
        match read {
            Ok(b) => {
                let upto = span_end.min(self.end);
                let out = b.slice((self.pos - at) as usize..(upto - at) as usize);
                counter.inc_by(upto - self.pos);
                self.pos = upto;
                if upto < self.end {
                    let (next, next_end) = self.span_at(upto);
                    self.ahead = self.start_read(next, next_end).map(|h| (next, h));
                }
                (Ok(out), self)
            }
            Err(verify::ReadFail::Rot { offset }) => {
                self.pos = self.end;
                if let Some(guard) = self.verified.as_ref().map(|v| v.guard.clone()) {
                    guard
                        .fetcher
                        .rotten(&guard, self.file.clone(), offset)
                        .await;
                }
                let e = io::Error::other(format!(
                    "bytes at {offset} do not match their checksum; stopped before them"
                ));
                (Err(e), self)
            }
            Err(verify::ReadFail::Io(e)) => {
                self.pos = self.end;
                (Err(e), self)
            }
        }
    }

    /// The span a read from the store at `pos` covers: up to a frame, from
    /// the start of its chunk when reads are verified.
    fn span_at(&self, pos: u64) -> (u64, u64) {
        let at = if self.verified.is_some() {
            pos / crate::store::SUM_CHUNK * crate::store::SUM_CHUNK
        } else {
            pos
        };
        (at, (at + READ_CHUNK).min(self.size))
    }

    /// Starts reading `at..end` (with its chunk sums when verified); `None`
    /// when the sums for that span are gone.
    fn start_read(&self, at: u64, end: u64) -> Option<verify::PendingRead> {
        let sums = match &self.verified {
            None => None,
            Some(v) => {
                let cs = crate::store::SUM_CHUNK;
                let k = (at / cs) as usize - v.first;
                let n = (end - at).div_ceil(cs) as usize;
                Some(v.sums.as_ref()?.get(k..k + n)?.to_vec())
            }
        };
        Some(verify::start_read(self.file.clone(), at, end - at, sums))
    }

    /// Waits until a download in progress is committed (at once for a
    /// blob from the store).
    async fn wait_done(&mut self) -> io::Result<()> {
        let Some(rx) = self.rx.as_mut() else {
            return Ok(());
        };
        loop {
            match &rx.borrow_and_update().done {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => return Err(io::Error::other(format!("download failed: {e}"))),
                None => {}
            }
            if rx.changed().await.is_err() {
                return Err(io::Error::other("download abandoned"));
            }
        }
    }

    /// Waits until bytes past `pos` may be sent, and returns how far.
    async fn readable(&mut self) -> io::Result<u64> {
        let Some(rx) = self.rx.as_mut() else {
            return Ok(self.end);
        };
        loop {
            {
                let p = rx.borrow_and_update();
                if p.epoch != self.epoch {
                    if p.poisoned_from.is_some_and(|f| self.pos > f) {
                        return Err(io::Error::other(
                            "bytes already sent may be wrong (digest mismatch, being repaired)",
                        ));
                    }
                    // Everything sent so far lies before the repaired part.
                    self.epoch = p.epoch;
                }
                let limit = match &p.done {
                    Some(Ok(())) => self.size,
                    Some(Err(e)) => {
                        return Err(io::Error::other(format!("download failed: {e}")));
                    }
                    None if self.for_peer => p.available_from(self.pos),
                    // The final byte waits for the digest check.
                    None => p.available_from(self.pos).min(self.size.saturating_sub(1)),
                };
                let limit = limit.min(self.end);
                if limit > self.pos {
                    return Ok(limit);
                }
            }
            if rx.changed().await.is_err() {
                return Err(io::Error::other("download abandoned"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sums_do_not_depend_on_how_the_stream_is_cut() {
        let chunk = crate::store::SUM_CHUNK as usize;
        let data: Vec<u8> = (0..chunk * 2 + 777).map(|i| (i * 31 % 251) as u8).collect();
        let whole: Vec<u64> = data.chunks(chunk).map(xxhash_rust::xxh3::xxh3_64).collect();
        for cut in [1usize, 4096, 65537, chunk, chunk + 3] {
            let mut s = ChunkSums::default();
            for part in data.chunks(cut) {
                s.update(part);
            }
            assert_eq!(s.finish(), whole, "cut every {cut} bytes");
        }
        assert!(ChunkSums::default().finish().is_empty());
    }
}
