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

mod download;
pub mod journal;
mod manifest;
pub mod negative;
mod peer;
pub mod pieces;
mod read;
mod sequential;
pub mod tags;
pub mod upkeep;
pub mod verify;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::watch;

use crate::config::Config;
use crate::oci::Digest;
use crate::origin::{self, Origin, OriginError, Upstream};
use crate::store::{Lease, Store, StoreError};
use crate::swarm::PeerNet;
use crate::telemetry::Metrics;

pub use manifest::{Manifest, DEFAULT_ACCEPT, MAX_MANIFEST};
pub use read::spans::{FileSpan, Spans};

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
    DigestMismatch { expected: Digest, actual: Digest },
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
    /// A task of the download panicked or was cancelled.
    #[error("{task} task failed: {source}")]
    Join {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// A download's failure, as seen by each request that waited on it.
    #[error(transparent)]
    Shared(Arc<FetchError>),
}

impl FetchError {
    /// Maps a failed `task` (its `JoinError`) into the download's error.
    fn join(task: &'static str) -> impl FnOnce(tokio::task::JoinError) -> FetchError {
        move |source| FetchError::Join { task, source }
    }

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
    /// Whether this node pulls the whole blob (a reader here wants it),
    /// not only the pieces peers ask for: only such a download relays
    /// pieces ([`crate::swarm::PeerRef::relay`]).
    pulling: std::sync::atomic::AtomicBool,
    /// Bytes this download took from the origin and from peers.
    from_origin: std::sync::atomic::AtomicU64,
    from_peers: std::sync::atomic::AtomicU64,
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
    /// The peers, when the swarm is on: downloads take pieces from them.
    swarm: Option<Arc<dyn PeerNet>>,
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
    /// The engine over `store` and `origin`; with `peers`, downloads take
    /// pieces from the swarm.
    pub fn new(
        cfg: &Config,
        store: Store,
        origin: Origin,
        metrics: Metrics,
        peers: Option<Arc<dyn PeerNet>>,
    ) -> Fetcher {
        Fetcher {
            inner: Arc::new(Inner {
                tags: tags::TagCache::new(store.tags_dir(), cfg.mirror.tag_stale_for),
                store,
                origin,
                metrics,
                swarm: peers,
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
        match self.join_or_start(
            &up,
            repo,
            digest,
            None,
            Ask::local(Priority::Background, false),
        ) {
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
            match self.join_or_start(
                up,
                repo,
                digest,
                client_auth,
                Ask::local(Priority::Live, attempt > 1),
            )? {
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

    /// Joins the download of `digest` in flight, or starts one; `None`
    /// when the blob is already in the store (unless `ask.last_try`).
    fn join_or_start(
        &self,
        up: &Upstream,
        repo: &str,
        digest: &Digest,
        client_auth: Option<&HeaderValue>,
        ask: Ask,
    ) -> Result<Option<(Arc<Download>, bool)>, FetchError> {
        let Ask {
            starter,
            priority,
            last_try,
        } = ask;
        let mut inflight = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(dl) = inflight.get(digest) {
            if priority == Priority::Live {
                dl.promote(&self.inner);
            }
            if let Starter::Local = starter {
                dl.pulling.store(true, std::sync::atomic::Ordering::Relaxed);
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
        // crash); with peers, for a peer, or to go on with a piece download
        // that a restart cut (its journal is there), piece by piece: the
        // sequential path could keep only the gap-free prefix, and a node
        // just restarted may not have heard from its peers yet.
        let cut_in_pieces = || {
            std::fs::symlink_metadata(self.inner.store.pieces_path(digest))
                .is_ok_and(|m| m.is_file())
        };
        let swarm = self
            .inner
            .swarm
            .as_ref()
            .filter(|s| matches!(starter, Starter::Peer { .. }) || s.has_peers() || cut_in_pieces())
            .cloned();
        let (wants_tx, wants_rx) = tokio::sync::mpsc::unbounded_channel();
        let dl = Arc::new(Download {
            digest: digest.clone(),
            progress: watch::Sender::new(Progress::default()),
            file: Arc::new(reader),
            wants: swarm.as_ref().map(|_| wants_tx.clone()),
            live: Default::default(),
            pulling: std::sync::atomic::AtomicBool::new(matches!(starter, Starter::Local)),
            from_origin: Default::default(),
            from_peers: Default::default(),
        });
        if priority == Priority::Live {
            dl.promote(&self.inner);
        }
        inflight.insert(digest.clone(), dl.clone());
        drop(inflight);
        self.inner.metrics.downloads_in_flight.inc();
        let pull = Pull {
            up: up.clone(),
            repo: repo.to_owned(),
            auth: client_auth.cloned(),
        };
        match swarm {
            Some(swarm) => {
                if let Starter::Peer { piece, .. } = starter {
                    let _ = wants_tx.send(pieces::Want::Piece(piece));
                }
                let job = pieces::PieceJob::new(
                    self.clone(),
                    swarm,
                    dl.clone(),
                    pull,
                    Arc::new(writer),
                    wants_rx,
                    starter,
                );
                tokio::spawn(job.run());
            }
            None => {
                let job = sequential::DownloadJob {
                    fetcher: self.clone(),
                    dl: dl.clone(),
                    pull,
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
            match self.join_or_start(up, repo, digest, None, Ask::local(priority, attempt > 1))? {
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
}

/// What a download asks its origin with: the registry, the repository, and
/// the puller's own credentials (sent on when the registry has none of its
/// own configured).
#[derive(Clone)]
struct Pull {
    up: Upstream,
    repo: String,
    auth: Option<HeaderValue>,
}

impl Pull {
    /// The GET of blob `digest`, whole or bytes `from..to` (`to` open:
    /// to the end).
    fn blob_get<'a>(
        &'a self,
        digest: &Digest,
        range: Option<(u64, Option<u64>)>,
    ) -> origin::Request<'a> {
        origin::Request::blob_get(&self.repo, digest, range, self.auth.as_ref())
    }
}

/// How a download is joined or started ([`Fetcher::join_or_start`]).
#[derive(Debug, Clone, Copy)]
struct Ask {
    starter: Starter,
    priority: Priority,
    /// A retry after the store's copy could not be opened: start a
    /// download even though the store lists the blob.
    last_try: bool,
}

impl Ask {
    /// For a reader on this node.
    fn local(priority: Priority, last_try: bool) -> Self {
        Ask {
            starter: Starter::Local,
            priority,
            last_try,
        }
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

#[cfg(test)]
mod tests {
    use super::sequential::ChunkSums;

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
