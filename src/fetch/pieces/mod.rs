//! Piece downloads: how a blob is fetched when the node is in a swarm.
//!
//! The blob is cut into fixed pieces (`swarm.piece_size`). Each piece comes
//! from the best source the swarm knows ([`Swarm::piece_plan`]): a peer that
//! holds the whole blob, else the piece's owner (balanced rendezvous,
//! [`crate::swarm::rendezvous`]; it fetches the piece from the origin when
//! asked, and streams it while it arrives), else the origin itself as the
//! last resort. Pieces are written where they belong in
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
//! Each piece is recorded in a journal beside the partial file once its
//! bytes are written, and so is each whole MiB of a piece in flight
//! ([`crate::fetch::journal`]), so a download cut by a restart goes on with
//! the pieces that are missing, and each piece that was in flight from its
//! last journaled MiB.
//!
//! A node that is asked for a piece of a blob it is not pulling starts a
//! *serving* download that fetches only the pieces peers ask for; it is
//! dropped when nobody asks for a while, or committed if it got every piece.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

mod origin;
mod peer;
#[cfg(test)]
mod tests;
mod verify;

use origin::origin_piece;
use peer::{peer_piece, PeerFail};
use verify::{commit, hash_prefix, repair, KnownSums};

use super::journal::{self, Journal};
use super::{Download, FetchError, Fetcher, Pull, Starter};
use crate::store::SUM_CHUNK;
use crate::swarm::{PeerNet, PeerRef, PieceSource};

/// The largest blob a piece download lays out (1 TiB: 131072 pieces of
/// 8 MiB). Sizes come from peers and origins; neither may make us allocate
/// without bound.
pub(super) const MAX_BLOB: u64 = 1 << 40;

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
    /// On disk when the download started: journaled before a restart.
    Resumed,
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
    swarm: Arc<dyn PeerNet>,
    dl: Arc<Download>,
    pull: Pull,
    writer: Arc<File>,
    piece_size: u64,
    /// Set once the holders were looked up again (see `fetch_piece`).
    holders_rechecked: std::sync::atomic::AtomicBool,
    /// Sums of chunks checked against a holder's as they arrived.
    known_sums: Arc<KnownSums>,
    /// Where pieces and their progress are recorded; `None` when it could
    /// not be written (the download goes on, and will not resume).
    journal: std::sync::Mutex<Option<Journal>>,
}

pub(super) struct PieceJob {
    ctx: Arc<Ctx>,
    wants: mpsc::UnboundedReceiver<Want>,
    full: bool,
    size: Option<u64>,
}

impl PieceJob {
    /// A download for `starter`: of the whole blob for a reader here, of
    /// the pieces peers ask for (`wants`) for a peer.
    pub(super) fn new(
        fetcher: Fetcher,
        swarm: Arc<dyn PeerNet>,
        dl: Arc<Download>,
        pull: Pull,
        writer: Arc<File>,
        wants: mpsc::UnboundedReceiver<Want>,
        starter: Starter,
    ) -> PieceJob {
        let piece_size = swarm.piece_size();
        let (full, size) = match starter {
            Starter::Local => (true, None),
            Starter::Peer { size, .. } => (false, size),
        };
        PieceJob {
            ctx: Arc::new(Ctx {
                fetcher,
                swarm,
                dl,
                pull,
                writer,
                piece_size,
                holders_rechecked: std::sync::atomic::AtomicBool::new(false),
                known_sums: Arc::default(),
                journal: std::sync::Mutex::new(None),
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
        // Committed, or failed with its partial gone: either way the
        // journal has nothing left to say.
        let _ = std::fs::remove_file(inner.store.pieces_path(&digest));
        ctx.dl
            .finish(&inner, result, (&ctx.pull.up, &ctx.pull.repo));
    }

    async fn download(&mut self) -> Result<(), FetchError> {
        let ctx = self.ctx.clone();
        let io_err = |what: &str| {
            let what = what.to_owned();
            move |source| FetchError::Io { what, source }
        };
        let ps = ctx.piece_size;
        let journal_path = ctx.fetcher.inner.store.pieces_path(&ctx.dl.digest);
        let (resume, journal) = self.resume(&journal_path);
        if resume.is_none() {
            // Nothing recorded: what the file holds cannot be told apart
            // from holes, so it starts empty.
            let _ = std::fs::remove_file(&journal_path);
            ctx.writer
                .set_len(0)
                .map_err(io_err("truncating partial download"))?;
        }
        if self.full {
            // Seeds follow what the cluster pulls; holders of the whole blob
            // (a node that pulled it before) are found before any origin
            // owner is asked, so a latecomer takes nothing from the origin.
            ctx.swarm
                .announce_want(&ctx.dl.digest, ctx.pull.up.host(), &ctx.pull.repo);
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
                tasks.spawn(async move { (0, fetch_piece(c, 0, full, 0).await) });
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
                            let (_, res) = joined.map_err(FetchError::join("piece task"))?;
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
        // Bytes of each piece on disk at the start, from a piece that was in
        // flight when the daemon stopped: its task goes on from there.
        let mut resumed = vec![0u64; n];
        if !tasks.is_empty() {
            state[0] = State::Fetching;
        }
        let journal = match &resume {
            Some(r) => {
                for &k in &r.done {
                    state[k] = State::Done;
                    supplier[k] = Some(Supplier::Resumed);
                    let (start, end) = ctx.piece_range(k);
                    ctx.set_filled(k, end.unwrap_or(size) - start);
                }
                for &(k, len) in &r.partial {
                    resumed[k] = len;
                    ctx.set_filled(k, len);
                }
                let bytes: u64 = (0..n).map(|k| r.have(k)).sum();
                tracing::info!(digest = %ctx.dl.digest, pieces = r.done.len(),
                    partial = r.partial.len(), of = n, bytes, "resuming piece download");
                journal
            }
            None => Journal::create(&journal_path, size, ps)
                .map_err(|e| {
                    tracing::debug!(path = %journal_path.display(), error = %e,
                        "cannot start a pieces journal; this download will not resume");
                })
                .ok(),
        };
        if let Ok(mut j) = ctx.journal.lock() {
            *j = journal;
        }
        // Piece 0 may have written bytes before the size was known and the
        // journal made.
        if state[0] == State::Fetching {
            let len = ctx.dl.progress.borrow().filled.first().copied();
            ctx.journal_progress(0, 0, len.unwrap_or(0));
        }
        // The hasher follows the contiguous prefix as pieces land.
        let hasher = tokio::spawn(hash_prefix(ctx.dl.clone(), size, ctx.known_sums.clone()));
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
                    let (full, have) = (self.full, resumed[k]);
                    tasks.spawn(async move { (k, fetch_piece(c, k, full, have).await) });
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
                        let (k, have) = (next, resumed[next]);
                        tasks.spawn(async move { (k, fetch_piece(c, k, true, have).await) });
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
                    let (k, res) = joined.map_err(FetchError::join("piece task"))?;
                    match res {
                        Ok(s) => {
                            state[k] = State::Done;
                            supplier[k] = Some(s);
                            ctx.journal_write(|j| j.done(k));
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
        let (actual, sums) = hasher.await.map_err(FetchError::join("hashing pieces"))??;
        let (actual, sums) = if actual == ctx.dl.digest {
            (actual, sums)
        } else {
            repair(&ctx, size, &supplier, actual).await?
        };
        commit(&ctx, size, actual, sums, &supplier).await
    }
}

impl PieceJob {
    /// What a journal left by an earlier run of this download says, if it
    /// can be used: the partial file holds bytes, the piece size is this
    /// node's, and the size agrees with the one a peer asked with. The
    /// journal is reopened for appending.
    fn resume(&mut self, path: &std::path::Path) -> (Option<journal::Resume>, Option<Journal>) {
        let ctx = &self.ctx;
        let has_bytes = ctx.writer.metadata().is_ok_and(|m| m.len() > 0);
        let Some(r) = journal::read(path, MAX_BLOB)
            .filter(|r| has_bytes && r.piece_size == ctx.piece_size)
            .filter(|r| self.size.is_none_or(|s| s == r.size))
        else {
            return (None, None);
        };
        let journal = match Journal::reopen(path) {
            Ok(j) => Some(j),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e,
                    "cannot append to the pieces journal; this download will not resume again");
                None
            }
        };
        if ctx.set_size(r.size).is_err() {
            return (None, None);
        }
        self.size = Some(r.size);
        (Some(r), journal)
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

    /// Records that piece `k`, which held `before` bytes from its start,
    /// now holds `after`: for readers here, for peers, and (once a whole
    /// checksum chunk more is on disk) in the journal, so a restart goes on
    /// from the last whole chunk.
    fn wrote(&self, k: usize, before: u64, after: u64) {
        self.set_filled(k, after);
        self.journal_progress(k, before, after);
    }

    /// The journal's side of [`Ctx::wrote`].
    fn journal_progress(&self, k: usize, before: u64, after: u64) {
        let (start, end) = self.piece_range(k);
        let upto = (start + after) / SUM_CHUNK * SUM_CHUNK;
        // A piece's end gets its own line when its task is done.
        if upto > start + before && Some(start + after) != end {
            self.journal_write(|j| j.partial(k, upto - start));
        }
    }

    /// Appends to the journal; the first write that fails drops it, and
    /// the download goes on without one.
    fn journal_write(&self, f: impl FnOnce(&mut Journal) -> std::io::Result<()>) {
        let Ok(mut journal) = self.journal.lock() else {
            return;
        };
        if let Some(Err(e)) = journal.as_mut().map(f) {
            tracing::debug!(digest = %self.dl.digest, error = %e,
                "cannot write the pieces journal; this download will not resume");
            *journal = None;
        }
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

/// Fetches piece `k`, of which `resumed` bytes are on disk from before a
/// restart, from the best sources in turn, and returns where its bytes came
/// from. Fails only when the origin, the last resort, fails (or the disk
/// does).
async fn fetch_piece(
    ctx: Arc<Ctx>,
    k: usize,
    full: bool,
    resumed: u64,
) -> Result<Supplier, FetchError> {
    let started = Instant::now();
    let digest = ctx.dl.digest.clone();
    let mut failed: HashSet<PeerId> = HashSet::new();
    let (start, _) = ctx.piece_range(k);
    // How much of the piece is on disk: a source that breaks mid-piece is
    // followed by one that sends the rest.
    let mut have = resumed;
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
            let pieces = ctx
                .dl
                .progress
                .borrow()
                .total
                .map(|s| s.div_ceil(ctx.piece_size));
            ctx.swarm
                .piece_plan(&digest, k as u64, pieces, full, &failed)
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
    // A piece that began before a restart is as suspect as a whole resumed
    // one if the blob's digest fails (a power cut can lose written bytes
    // but keep their journal line): it is compared with the origin then,
    // and nobody is distrusted for it, since the bad bytes may be the old
    // ones.
    if resumed > 0 {
        return Ok(Supplier::Resumed);
    }
    Ok(wrote_peer.map_or(Supplier::Origin, Supplier::Peer))
}
