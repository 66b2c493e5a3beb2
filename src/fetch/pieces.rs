//! Piece downloads: how a blob is fetched when the node is in a swarm.
//!
//! The blob is cut into fixed pieces (`swarm.piece_size`). Each piece comes
//! from the best source the swarm knows ([`Swarm::piece_plan`]): a peer that
//! holds the whole blob, else the piece's rendezvous owner (which fetches it
//! from the origin when asked, and streams it while it arrives), else the
//! origin itself as the last resort. Pieces are written where they belong in
//! the partial file, so readers on this node still stream the blob in order
//! as soon as the pieces in front of them are in.
//!
//! A peer that does not answer within `swarm.hedge_after` is hedged (the
//! next source is asked too; the first answer wins); one that stops sending
//! for `swarm.stall_timeout` is dropped, and the rest of the piece is asked
//! elsewhere. A peer that holds the whole blob sends checksums of each MiB
//! with the bytes, computed when it verified the blob: a chunk that does not
//! match is never written, and its sender is distrusted. SHA-256 of the whole
//! blob stays the root of trust: on a mismatch, every piece that came from a
//! peer is compared with the origin's bytes, the peers whose bytes differ are
//! distrusted, the pieces are replaced, and the blob is checked again.
//!
//! A node that is asked for a piece of a blob it is not pulling starts a
//! *serving* download that fetches only the pieces peers ask for; it is
//! dropped when nobody asks for a while, or committed if it got every piece.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{HeaderValue, StatusCode};
use libp2p::PeerId;
use sha2::Digest as _;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{Download, FetchError, Fetcher};
use crate::oci::Digest;
use crate::origin::{self, Upstream};
use crate::store::{Provenance, SUM_CHUNK};
use crate::swarm::{PeerRef, PieceSource, Swarm};

/// The largest blob a piece download lays out (1 TiB: 131072 pieces of
/// 8 MiB). Sizes come from peers and origins; neither may make us allocate
/// without bound.
const MAX_BLOB: u64 = 1 << 40;

/// The longest a node waits for the second look for holders before its
/// first origin piece: it delays that piece, and every peer waiting for it.
const RECHECK_HOLDERS: Duration = Duration::from_millis(100);

/// How many stall timeouts the last peer in a piece's plan may take to
/// answer before the piece goes to the origin instead (the data-plane
/// client's connect timeout is the same).
const LAST_PEER_PATIENCE: u32 = 3;

/// A serving download nobody asked anything of for this long is dropped.
const SERVING_IDLE: Duration = Duration::from_secs(30);

/// What a download is asked for.
#[derive(Debug, Clone, Copy)]
pub enum Want {
    /// A reader on this node wants the whole blob.
    All,
    /// A peer asked for this piece.
    Piece(usize),
}

/// Lays out a piece download whose size is not known yet with the size a
/// peer asked with (the same trust as the size a peer's answer gives).
pub(super) fn adopt_size(dl: &Download, size: u64, piece_size: u64) {
    if size > MAX_BLOB {
        return;
    }
    dl.progress.send_if_modified(|p| {
        if p.total.is_some() || p.done.is_some() {
            return false;
        }
        p.total = Some(size);
        p.piece_size = piece_size;
        p.filled = vec![0; size.div_ceil(piece_size).max(1) as usize];
        true
    });
}

/// Where a piece's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Supplier {
    Origin,
    Peer(PeerId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Missing,
    Fetching,
    Done,
}

/// What every piece task needs.
struct Ctx {
    fetcher: Fetcher,
    swarm: Swarm,
    dl: Arc<Download>,
    up: Upstream,
    repo: String,
    client_auth: Option<HeaderValue>,
    writer: Arc<File>,
    piece_size: u64,
    /// Set once the holders were looked up again (see `fetch_piece`).
    holders_rechecked: std::sync::atomic::AtomicBool,
}

pub(super) struct PieceJob {
    ctx: Arc<Ctx>,
    wants: mpsc::UnboundedReceiver<Want>,
    full: bool,
    size: Option<u64>,
}

impl PieceJob {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        fetcher: Fetcher,
        swarm: Swarm,
        dl: Arc<Download>,
        up: Upstream,
        repo: String,
        client_auth: Option<HeaderValue>,
        writer: Arc<File>,
        wants: mpsc::UnboundedReceiver<Want>,
        full: bool,
        size: Option<u64>,
    ) -> PieceJob {
        let piece_size = swarm.piece_size();
        PieceJob {
            ctx: Arc::new(Ctx {
                fetcher,
                swarm,
                dl,
                up,
                repo,
                client_auth,
                writer,
                piece_size,
                holders_rechecked: std::sync::atomic::AtomicBool::new(false),
            }),
            wants,
            full,
            size,
        }
    }

    pub(super) async fn run(mut self) {
        let ctx = self.ctx.clone();
        let inner = ctx.fetcher.inner.clone();
        let digest = ctx.dl.digest.clone();
        let result = self.download().await;
        match &result {
            Ok(()) => {}
            Err(FetchError::Abandoned(_)) => {
                tracing::debug!(digest = %digest, "serving download idle, dropped");
                let _ = std::fs::remove_file(inner.store.partial_path(&digest));
            }
            Err(e) => {
                tracing::warn!(digest = %digest, error = %e, "piece download failed");
                let _ = std::fs::remove_file(inner.store.partial_path(&digest));
                if matches!(e, FetchError::DigestMismatch { .. }) {
                    inner.metrics.digest_mismatches.inc();
                }
            }
        }
        ctx.dl.finish(&inner, result, (&ctx.up, &ctx.repo));
    }

    async fn download(&mut self) -> Result<(), FetchError> {
        let ctx = self.ctx.clone();
        let io_err = |what: &str| {
            let what = what.to_owned();
            move |source| FetchError::Io { what, source }
        };
        // Piece downloads do not resume across restarts: which pieces of a
        // partial file are good is not recorded, so it starts empty.
        ctx.writer
            .set_len(0)
            .map_err(io_err("truncating partial download"))?;
        let ps = ctx.piece_size;
        if self.full {
            // Seeds follow what the cluster pulls; holders of the whole blob
            // (a node that pulled it before) are found before any origin
            // owner is asked, so a latecomer takes nothing from the origin.
            ctx.swarm
                .announce_want(&ctx.dl.digest, ctx.up.host(), &ctx.repo);
            ctx.swarm
                .find_holders(&ctx.dl.digest, ctx.swarm.hedge_after())
                .await;
        }
        let mut wanted: VecDeque<usize> = VecDeque::new();
        // Without the size, only piece 0 can be asked for; its answer says
        // how large the blob is.
        let mut tasks: JoinSet<(usize, Result<Supplier, FetchError>)> = JoinSet::new();
        let size = match self.size {
            Some(s) => {
                ctx.set_size(s)?;
                s
            }
            None => {
                // Piece 0 goes first; the other pieces start as soon as its
                // answer's headers have told the size, not when it is done.
                let c = ctx.clone();
                let full = self.full;
                tasks.spawn(async move { (0, fetch_piece(c, 0, full).await) });
                let mut rx = ctx.dl.progress.subscribe();
                loop {
                    if let Some(total) = rx.borrow_and_update().total {
                        break total;
                    }
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() {
                            return Err(FetchError::Abandoned(ctx.dl.digest.clone()));
                        },
                        Some(joined) = tasks.join_next() => {
                            // Piece 0 ended before the size was seen here:
                            // an error, or a race with the size's update.
                            let (_, res) = joined.map_err(|e| FetchError::Io {
                                what: "piece task".into(),
                                source: io::Error::other(e),
                            })?;
                            let supplier = res?;
                            let total = ctx.dl.progress.borrow().total.unwrap_or(0);
                            ctx.set_size(total)?;
                            // Handed back to the main loop like any piece.
                            tasks.spawn(async move { (0, Ok(supplier)) });
                            break total;
                        }
                    }
                }
            }
        };
        let n = size.div_ceil(ps).max(1) as usize;
        let mut state = vec![State::Missing; n];
        let mut supplier: Vec<Option<Supplier>> = vec![None; n];
        if !tasks.is_empty() {
            state[0] = State::Fetching;
        }
        // The hasher follows the contiguous prefix as pieces land.
        let hasher = tokio::spawn(hash_prefix(ctx.dl.clone(), size));
        let limit = ctx.swarm.max_piece_transfers();
        let mut next = 0usize;
        let mut last_want = Instant::now();
        let mut live = ctx.fetcher.inner.live.subscribe();
        loop {
            while let Ok(w) = self.wants.try_recv() {
                last_want = Instant::now();
                match w {
                    Want::All => self.full = true,
                    Want::Piece(k) if k < n => wanted.push_back(k),
                    Want::Piece(_) => {}
                }
            }
            // Pieces peers wait for go first, whatever the window.
            while let Some(k) = wanted.pop_front() {
                if state[k] == State::Missing {
                    state[k] = State::Fetching;
                    let c = ctx.clone();
                    let full = self.full;
                    tasks.spawn(async move { (k, fetch_piece(c, k, full).await) });
                }
            }
            // A background download (prewarm) starts no piece of its own
            // while a live pull runs; pieces peers ask for still go.
            let yielding = ctx.dl.yields_to(*live.borrow_and_update());
            if self.full && !yielding {
                while tasks.len() < limit && next < n {
                    if state[next] == State::Missing {
                        state[next] = State::Fetching;
                        let c = ctx.clone();
                        let k = next;
                        tasks.spawn(async move { (k, fetch_piece(c, k, true).await) });
                    }
                    next += 1;
                }
            }
            if state.iter().all(|s| *s == State::Done) {
                break;
            }
            if tasks.is_empty() && !self.full && last_want.elapsed() >= SERVING_IDLE {
                hasher.abort();
                return Err(FetchError::Abandoned(ctx.dl.digest.clone()));
            }
            tokio::select! {
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    let (k, res) = joined.map_err(|e| FetchError::Io {
                        what: "piece task".into(),
                        source: io::Error::other(e),
                    })?;
                    match res {
                        Ok(s) => {
                            state[k] = State::Done;
                            supplier[k] = Some(s);
                        }
                        Err(e) => {
                            hasher.abort();
                            return Err(e);
                        }
                    }
                }
                w = self.wants.recv() => {
                    last_want = Instant::now();
                    match w {
                        Some(Want::All) => self.full = true,
                        Some(Want::Piece(k)) if k < n => wanted.push_back(k),
                        Some(Want::Piece(_)) => {}
                        // Every sender is gone: the download left the map.
                        None => if tasks.is_empty() && !self.full {
                            hasher.abort();
                            return Err(FetchError::Abandoned(ctx.dl.digest.clone()));
                        },
                    }
                }
                _ = tokio::time::sleep(SERVING_IDLE), if tasks.is_empty() && !self.full => {}
                _ = live.changed(), if yielding => {}
            }
        }
        let (actual, sums) = hasher.await.map_err(|e| FetchError::Io {
            what: "hashing pieces".into(),
            source: io::Error::other(e),
        })??;
        let (actual, sums) = if actual == ctx.dl.digest {
            (actual, sums)
        } else {
            repair(&ctx, size, &supplier, actual).await?
        };
        commit(&ctx, size, actual, sums, &supplier).await
    }
}

impl Ctx {
    /// Publishes the blob's size and lays out the pieces. Idempotent. A
    /// size past [`MAX_BLOB`] (a peer's or a header's claim) is refused
    /// before anything is allocated for it.
    fn set_size(&self, size: u64) -> Result<(), FetchError> {
        if size > MAX_BLOB {
            return Err(FetchError::BadOriginResponse {
                what: self.dl.digest.to_string(),
                reason: format!("claimed size {size} is past the {MAX_BLOB}-byte limit"),
            });
        }
        adopt_size(&self.dl, size, self.piece_size);
        Ok(())
    }

    /// Records that `len` bytes of piece `k` are on disk.
    fn set_filled(&self, k: usize, len: u64) {
        self.dl.progress.send_modify(|p| {
            if let Some(f) = p.filled.get_mut(k) {
                *f = len;
            }
            let w = p.written;
            p.written = p.available_from(w);
        });
    }

    fn piece_range(&self, k: usize) -> (u64, Option<u64>) {
        let start = k as u64 * self.piece_size;
        let size = self.dl.progress.borrow().total;
        let end = match size {
            Some(s) => (start + self.piece_size).min(s),
            None => start + self.piece_size,
        };
        (start, size.map(|_| end).or(Some(end)))
    }
}

/// Fetches piece `k` from the best sources in turn, and returns where its
/// bytes came from. Fails only when the origin, the last resort, fails (or
/// the disk does).
async fn fetch_piece(ctx: Arc<Ctx>, k: usize, full: bool) -> Result<Supplier, FetchError> {
    let started = Instant::now();
    let digest = ctx.dl.digest.clone();
    let mut failed: HashSet<PeerId> = HashSet::new();
    let (start, _) = ctx.piece_range(k);
    // How much of the piece is on disk: a source that breaks mid-piece is
    // followed by one that sends the rest.
    let mut have = 0u64;
    // A peer that wrote any of the piece: the piece is checked against the
    // origin if the blob's digest fails.
    let mut wrote_peer: Option<PeerId> = None;
    let mut peer_tries = 0;
    let histogram = &ctx.fetcher.inner.metrics.piece_seconds;
    loop {
        let (_, end) = ctx.piece_range(k);
        let end = end.unwrap_or(start + ctx.piece_size);
        if ctx.dl.progress.borrow().total.is_some() && start + have >= end {
            break;
        }
        let plan: Vec<PeerRef> = if peer_tries < 8 {
            ctx.swarm
                .piece_plan(&digest, k as u64, full, &failed)
                .into_iter()
                .map_while(|s| match s {
                    PieceSource::Peer(p) => Some(p),
                    PieceSource::Origin => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        if plan.is_empty()
            && !ctx
                .holders_rechecked
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            // Before this node first fetches a piece from the origin, one
            // more look for holders: a node that just joined may not have
            // had its routing table filled when the download started, and
            // a serving download (a peer asked this node, as the piece's
            // owner, before this node pulled the blob itself) has not
            // looked at all. Without it, fresh nodes after a scale-to-zero
            // fetched pieces from the origin that the seed held.
            ctx.swarm
                .find_holders(&digest, ctx.swarm.hedge_after().min(RECHECK_HOLDERS))
                .await;
            continue;
        }
        if plan.is_empty() {
            // Why a piece went to the origin: what the lab's origin-byte
            // figures are explained with.
            tracing::debug!(digest = %digest, piece = k, full, have, failed = ?failed,
                peer_tries, "piece from the origin");
            origin_piece(&ctx, k, &mut have).await?;
            histogram
                .with_label_values(&["origin"])
                .observe(started.elapsed().as_secs_f64());
            break;
        }
        peer_tries += 1;
        match peer_piece(&ctx, k, &plan, &mut have, &mut failed, &mut wrote_peer).await {
            Ok(()) => {
                histogram
                    .with_label_values(&["peer"])
                    .observe(started.elapsed().as_secs_f64());
                break;
            }
            Err(PeerFail::Local(e)) => return Err(e),
            Err(e) => {
                tracing::debug!(digest = %digest, piece = k, error = %e, "peer piece transfer failed");
            }
        }
    }
    Ok(wrote_peer.map_or(Supplier::Origin, Supplier::Peer))
}

/// Why a peer transfer stopped.
#[derive(Debug, thiserror::Error)]
enum PeerFail {
    #[error("no peer answered")]
    NoAnswer,
    #[error("{peer} stalled")]
    Stalled { peer: PeerId },
    #[error("{peer}: {reason}")]
    Broken { peer: PeerId, reason: String },
    #[error("{peer} sent a chunk that does not match its checksum")]
    Corrupt { peer: PeerId },
    #[error(transparent)]
    Local(#[from] FetchError),
}

/// Tries the peers in `plan` (hedged), writing into piece `k` from `have`.
/// Returns the peer that completed the piece.
async fn peer_piece(
    ctx: &Arc<Ctx>,
    k: usize,
    plan: &[PeerRef],
    have: &mut u64,
    failed: &mut HashSet<PeerId>,
    wrote_peer: &mut Option<PeerId>,
) -> Result<(), PeerFail> {
    let digest = &ctx.dl.digest;
    let (start, end) = ctx.piece_range(k);
    let known_size = ctx.dl.progress.borrow().total;
    let from = start + *have;
    let end_incl = end.unwrap_or(start + ctx.piece_size) - 1;
    let hedge = ctx.swarm.hedge_after();
    let metrics = &ctx.fetcher.inner.metrics;
    let mut pending = FuturesUnordered::new();
    let mut idx = 0usize;
    let open = |p: PeerRef| {
        let swarm = ctx.swarm.clone();
        let d = digest.clone();
        let ns = ctx.up.host().to_owned();
        let repo = ctx.repo.clone();
        async move {
            // A busy peer (all its upload slots taken) is asked again
            // shortly: it is alive and will have the piece, and going
            // elsewhere could mean the origin. Hedging still applies.
            let mut backoff = Duration::from_millis(10);
            let mut retried = false;
            loop {
                let r = swarm
                    .open_piece(&p, &d, from, end_incl, known_size, &ns, &repo)
                    .await;
                match r {
                    // A pooled connection the peer had just closed as idle
                    // fails the request without the peer being gone: once,
                    // on a fresh connection. A dead peer fails again at once.
                    Err(crate::swarm::PeerError::Request { .. }) if !retried => {
                        retried = true;
                    }
                    Err(crate::swarm::PeerError::Status { status, .. })
                        if status == StatusCode::SERVICE_UNAVAILABLE
                            && backoff < Duration::from_secs(2) =>
                    {
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                    r => return (p, r),
                }
            }
        }
    };
    let asked = Instant::now();
    pending.push(open(plan[0].clone()));
    idx += 1;
    let (peer, resp) = loop {
        let hedge_timer = tokio::time::sleep(hedge);
        tokio::select! {
            r = pending.next() => match r {
                Some((p, Ok(resp))) => break (p, resp),
                Some((p, Err(e))) => {
                    tracing::debug!(peer = %p.id, error = %e, piece = k, "peer cannot serve the piece");
                    failed.insert(p.id);
                    if idx < plan.len() {
                        pending.push(open(plan[idx].clone()));
                        idx += 1;
                    } else if pending.is_empty() {
                        return Err(PeerFail::NoAnswer);
                    }
                }
                None => return Err(PeerFail::NoAnswer),
            },
            _ = hedge_timer => {
                if idx < plan.len() {
                    metrics.hedges.inc();
                    pending.push(open(plan[idx].clone()));
                    idx += 1;
                } else if asked.elapsed() >= ctx.swarm.stall_timeout() * LAST_PEER_PATIENCE {
                    // Nobody left to hedge with but the origin, which would
                    // fetch the piece a second time: a live peer that is
                    // only slow (a loaded node) gets a few stall timeouts
                    // to answer. A dead one fails at once (refused, reset)
                    // and never gets here.
                    metrics.hedges.inc();
                    for p in &plan[..idx] {
                        failed.insert(p.id);
                    }
                    return Err(PeerFail::NoAnswer);
                }
            }
        }
    };
    drop(pending);
    if known_size.is_none() {
        if let Err(e) = ctx.set_size(resp.total) {
            ctx.swarm
                .distrust(&peer.id, "claimed an impossible blob size");
            failed.insert(peer.id);
            return Err(PeerFail::Broken {
                peer: peer.id,
                reason: e.to_string(),
            });
        }
    } else if known_size != Some(resp.total) {
        failed.insert(peer.id);
        return Err(PeerFail::Broken {
            peer: peer.id,
            reason: format!(
                "says the blob has {} bytes, not {}",
                resp.total,
                known_size.unwrap_or(0)
            ),
        });
    }
    let end = {
        let (_, e) = ctx.piece_range(k);
        e.unwrap_or(resp.total).min(resp.total)
    };
    if resp.start != from {
        failed.insert(peer.id);
        return Err(PeerFail::Broken {
            peer: peer.id,
            reason: format!("range starts at {}, asked {from}", resp.start),
        });
    }
    let stall = ctx.swarm.stall_timeout();
    // Looked up once: the label is the peer id in base58.
    let peer_in = ctx.swarm.peer_counter(&peer.id, "in");
    let sums = resp.sums.clone();
    let mut body = resp.body;
    let mut pos = from;
    let mut buf: Vec<Bytes> = Vec::new();
    let mut buf_len = 0u64;
    loop {
        let next = match tokio::time::timeout(stall, body.next()).await {
            Err(_) => {
                failed.insert(peer.id);
                return Err(PeerFail::Stalled { peer: peer.id });
            }
            Ok(n) => n,
        };
        let chunk = match next {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                failed.insert(peer.id);
                return Err(PeerFail::Broken {
                    peer: peer.id,
                    reason: e.to_string(),
                });
            }
        };
        let ended = chunk.is_none();
        if let Some(c) = chunk {
            ctx.swarm.throttle_in(c.len() as u64).await;
            peer_in.inc_by(c.len() as u64);
            buf_len += c.len() as u64;
            buf.push(c);
        }
        // Write whole checksum chunks (or the piece's tail) at a time, so
        // each can be checked before any reader may see it.
        while buf_len > 0 {
            let chunk_end = ((pos / SUM_CHUNK) + 1) * SUM_CHUNK;
            let target = chunk_end.min(end);
            let need = target - pos;
            if buf_len < need && !ended {
                break;
            }
            let take = need.min(buf_len);
            let data = take_bytes(&mut buf, take);
            buf_len -= take;
            if let Some(sums) = &sums {
                if pos.is_multiple_of(SUM_CHUNK) && take == need {
                    let idx = ((pos - from) / SUM_CHUNK) as usize;
                    let ok = sums
                        .get(idx)
                        .is_some_and(|s| *s == xxhash_rust::xxh3::xxh3_64(&data));
                    if !ok {
                        ctx.swarm
                            .distrust(&peer.id, "sent a chunk that does not match its checksum");
                        failed.insert(peer.id);
                        return Err(PeerFail::Corrupt { peer: peer.id });
                    }
                }
            }
            write_at(&ctx.writer, pos, data).await?;
            *wrote_peer = Some(peer.id);
            pos += take;
            *have = pos - start;
            ctx.set_filled(k, *have);
            metrics
                .fetched_bytes
                .with_label_values(&["peer"])
                .inc_by(take);
            ctx.dl.count(super::Source::Peer, take);
            if pos > end {
                failed.insert(peer.id);
                return Err(PeerFail::Broken {
                    peer: peer.id,
                    reason: "sent more than asked".into(),
                });
            }
        }
        if ended {
            break;
        }
    }
    if pos < end {
        failed.insert(peer.id);
        return Err(PeerFail::Broken {
            peer: peer.id,
            reason: format!("body ended at {pos}, piece ends at {end}"),
        });
    }
    Ok(())
}

/// Takes `n` bytes off the front of `buf` as one buffer.
fn take_bytes(buf: &mut Vec<Bytes>, n: u64) -> Bytes {
    let n = n as usize;
    if buf.first().is_some_and(|b| b.len() == n) {
        return buf.remove(0);
    }
    if buf.first().is_some_and(|b| b.len() > n) {
        let b = &mut buf[0];
        let out = b.slice(..n);
        *b = b.slice(n..);
        return out;
    }
    let mut out = bytes::BytesMut::with_capacity(n);
    while out.len() < n {
        let Some(first) = buf.first_mut() else { break };
        let want = n - out.len();
        if first.len() <= want {
            out.extend_from_slice(first);
            buf.remove(0);
        } else {
            out.extend_from_slice(&first[..want]);
            *first = first.slice(want..);
        }
    }
    out.freeze()
}

async fn write_at(file: &Arc<File>, pos: u64, data: Bytes) -> Result<(), FetchError> {
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.write_all_at(&data, pos))
        .await
        .map_err(|e| FetchError::Io {
            what: "writing piece".into(),
            source: io::Error::other(e),
        })?
        .map_err(|source| FetchError::Io {
            what: "writing piece".into(),
            source,
        })
}

/// Fetches the rest of piece `k` (from `have`) from the origin, resuming
/// with `Range` when the body breaks.
async fn origin_piece(ctx: &Arc<Ctx>, k: usize, have: &mut u64) -> Result<(), FetchError> {
    let inner = &ctx.fetcher.inner;
    let digest = &ctx.dl.digest;
    let bad = |reason: String| FetchError::BadOriginResponse {
        what: digest.to_string(),
        reason,
    };
    let mut failures = 0u32;
    loop {
        let (start, end) = ctx.piece_range(k);
        let end = end.unwrap_or(start + ctx.piece_size);
        let known = ctx.dl.progress.borrow().total;
        if known.is_some() && start + *have >= end {
            return Ok(());
        }
        let from = start + *have;
        let req = origin::Request::blob_get(
            &ctx.repo,
            digest,
            Some((from, Some(end))),
            ctx.client_auth.as_ref(),
        );
        let resp = inner.origin.send(&ctx.up, &req).await?;
        let (rstart, total) = match resp.status() {
            StatusCode::PARTIAL_CONTENT => resp
                .headers()
                .get(http::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::http::parse_content_range)
                .map(|r| (r.first, r.size))
                .ok_or_else(|| bad("206 without a usable Content-Range".into()))?,
            StatusCode::OK => (
                0,
                resp.content_length()
                    .ok_or_else(|| bad("no Content-Length".into()))?,
            ),
            // An empty blob has no byte to ask a range of.
            StatusCode::RANGE_NOT_SATISFIABLE if from == 0 && known.is_none() => {
                ctx.set_size(0)?;
                return Ok(());
            }
            s => return Err(bad(format!("unexpected status {s}"))),
        };
        match known {
            Some(t) if t != total => {
                return Err(bad(format!("size is {total}, peers said {t}")));
            }
            None => ctx.set_size(total)?,
            _ => {}
        }
        let end = end.min(total);
        if rstart > from {
            return Err(bad(format!("range starts at {rstart}, wanted {from}")));
        }
        let mut skip = from - rstart;
        let mut pos = from;
        let mut body = resp.bytes_stream();
        let broke: Option<String> = loop {
            match body.next().await {
                None => break None,
                Some(Err(e)) => break Some(e.to_string()),
                Some(Ok(mut c)) => {
                    if skip > 0 {
                        let n = skip.min(c.len() as u64);
                        skip -= n;
                        c = c.slice(n as usize..);
                    }
                    // A server that ignored the range sends past the piece.
                    let room = end.saturating_sub(pos);
                    if (c.len() as u64) > room {
                        c = c.slice(..room as usize);
                    }
                    if c.is_empty() {
                        if pos >= end {
                            break None;
                        }
                        continue;
                    }
                    let n = c.len() as u64;
                    write_at(&ctx.writer, pos, c).await?;
                    pos += n;
                    *have = pos - start;
                    ctx.set_filled(k, *have);
                    inner.metrics.origin_bytes.inc_by(n);
                    inner
                        .metrics
                        .fetched_bytes
                        .with_label_values(&["origin"])
                        .inc_by(n);
                    ctx.dl.count(super::Source::Origin, n);
                    if pos >= end {
                        break None;
                    }
                }
            }
        };
        if pos >= end {
            return Ok(());
        }
        failures += 1;
        if failures > inner.retries {
            return Err(FetchError::Exhausted {
                digest: digest.clone(),
                attempts: failures,
                last: broke.unwrap_or_else(|| "body ended early".into()),
            });
        }
        inner.metrics.origin_resumes.inc();
        tracing::warn!(digest = %digest, piece = k, at = pos, error = ?broke, "origin piece broke, resuming");
        tokio::time::sleep(Duration::from_millis(200 * failures as u64)).await;
    }
}

/// Hashes the partial file's contiguous prefix as it grows, to `size`:
/// SHA-256 of the blob, and the chunk checksums peers will be sent.
async fn hash_prefix(dl: Arc<Download>, size: u64) -> Result<(Digest, Vec<u64>), FetchError> {
    let mut rx = dl.progress.subscribe();
    let mut hasher = sha2::Sha256::new();
    let mut sums = Vec::with_capacity(size.div_ceil(SUM_CHUNK) as usize);
    let mut hashed = 0u64;
    while hashed < size {
        let written = loop {
            let w = rx.borrow_and_update().written;
            if w > hashed {
                break w;
            }
            if rx.changed().await.is_err() {
                return Err(FetchError::Abandoned(dl.digest.clone()));
            }
        };
        // Whole chunks only, except at the end of the blob.
        let upto = if written >= size {
            size
        } else {
            (written / SUM_CHUNK) * SUM_CHUNK
        };
        if upto <= hashed {
            if rx.changed().await.is_err() {
                return Err(FetchError::Abandoned(dl.digest.clone()));
            }
            continue;
        }
        let file = dl.file.clone();
        let (h, s, res) = tokio::task::spawn_blocking(move || {
            let mut h = hasher;
            let mut s = Vec::new();
            let mut buf = vec![0u8; SUM_CHUNK as usize];
            let mut pos = hashed;
            while pos < upto {
                let n = (upto - pos).min(SUM_CHUNK) as usize;
                if let Err(e) = file.read_exact_at(&mut buf[..n], pos) {
                    return (h, s, Err(e));
                }
                h.update(&buf[..n]);
                s.push(xxhash_rust::xxh3::xxh3_64(&buf[..n]));
                pos += n as u64;
            }
            (h, s, Ok(()))
        })
        .await
        .map_err(|e| FetchError::Io {
            what: "hashing pieces".into(),
            source: io::Error::other(e),
        })?;
        hasher = h;
        sums.extend(s);
        res.map_err(|source| FetchError::Io {
            what: "reading partial download".into(),
            source,
        })?;
        hashed = upto;
    }
    Ok((Digest::from_sha256(&hasher.finalize()), sums))
}

/// xxh3-128 of bytes `start..end` of the partial file: enough to tell
/// whether a piece changed when it was fetched again.
async fn xxh3_of(file: &Arc<File>, start: u64, end: u64) -> Result<u128, FetchError> {
    let f = file.clone();
    let len = end.saturating_sub(start) as usize;
    let io = |source| FetchError::Io {
        what: "reading piece".into(),
        source,
    };
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, start)
            .map(|_| xxhash_rust::xxh3::xxh3_128(&buf))
    })
    .await
    .map_err(|e| io(io::Error::other(e)))?
    .map_err(io)
}

/// The blob's digest did not match: compare every piece that came from a
/// peer with the origin's bytes, distrust the peers whose bytes differ,
/// replace their pieces, and hash again.
async fn repair(
    ctx: &Arc<Ctx>,
    size: u64,
    supplier: &[Option<Supplier>],
    actual: Digest,
) -> Result<(Digest, Vec<u64>), FetchError> {
    let digest = ctx.dl.digest.clone();
    tracing::warn!(digest = %digest, got = %actual,
        "pieces do not add up to the digest; checking peers' pieces against the origin");
    let from_peers: Vec<usize> = supplier
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, Some(Supplier::Peer(_))))
        .map(|(k, _)| k)
        .collect();
    // From now on no reader may read a piece that came from a peer until it
    // has been fetched again; readers that already sent bytes past the first
    // such piece are cut (a new epoch), new readers wait for the refetch.
    let first_bad = from_peers.first().map(|&k| ctx.piece_range(k).0);
    ctx.dl.progress.send_modify(|p| {
        for &k in &from_peers {
            if let Some(f) = p.filled.get_mut(k) {
                *f = 0;
            }
        }
        p.written = 0;
        p.written = p.available_from(0);
        p.poisoned_from = first_bad;
        p.epoch += 1;
    });
    let mut bad = 0usize;
    for &k in &from_peers {
        let Some(Supplier::Peer(peer)) = &supplier[k] else {
            continue;
        };
        let (start, end) = ctx.piece_range(k);
        let end = end.unwrap_or(size).min(size);
        let mine = xxh3_of(&ctx.writer, start, end).await?;
        let mut have = 0u64;
        origin_piece(ctx, k, &mut have).await?;
        if xxh3_of(&ctx.writer, start, end).await? != mine {
            bad += 1;
            ctx.swarm
                .distrust(peer, "sent a piece that differs from the origin's bytes");
        }
    }
    let hasher = hash_prefix(ctx.dl.clone(), size);
    // The prefix is complete: reset the hasher's view by hashing anew.
    let (again, sums) = hasher.await?;
    if again != digest {
        return Err(FetchError::DigestMismatch {
            expected: digest,
            actual: again.to_string(),
        });
    }
    tracing::info!(digest = %digest, bad_pieces = bad, "blob repaired from the origin");
    Ok((again, sums))
}

async fn commit(
    ctx: &Arc<Ctx>,
    size: u64,
    actual: Digest,
    sums: Vec<u64>,
    supplier: &[Option<Supplier>],
) -> Result<(), FetchError> {
    let inner = &ctx.fetcher.inner;
    let digest = ctx.dl.digest.clone();
    let path = inner.store.partial_path(&digest);
    let store = inner.store.clone();
    let d = digest.clone();
    // Before the commit, so that a committed blob always has its sums.
    if let Err(e) = inner.store.set_sums(&digest, &sums) {
        tracing::debug!(digest = %digest, error = %e, "cannot record chunk checksums");
    }
    tokio::task::spawn_blocking(move || store.commit(&d, &path, &actual, size, Some(size), None))
        .await
        .map_err(|e| FetchError::Io {
            what: "committing blob".into(),
            source: io::Error::other(e),
        })??;
    let from_peers = supplier
        .iter()
        .filter(|s| matches!(s, Some(Supplier::Peer(_))))
        .count();
    let mut prov = Provenance::origin(ctx.up.host(), &ctx.repo);
    if from_peers * 2 > supplier.len() {
        prov.from = crate::store::Fetched::Peer;
    }
    if let Err(e) = inner.store.set_provenance(&digest, &prov) {
        tracing::debug!(digest = %digest, error = %e, "cannot record provenance");
    }
    inner.metrics.observe_store(inner.store.usage());
    ctx.swarm.blob_committed(&digest, size);
    tracing::info!(digest = %digest, bytes = size, pieces = supplier.len(), from_peers,
        "blob committed");
    Ok(())
}
