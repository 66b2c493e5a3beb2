//! The end of a piece download: the blob's digest over the pieces as they
//! land, the repair when it does not match (peers' pieces compared with the
//! origin's), and the commit.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use sha2::Digest as _;

use super::origin::origin_piece;
use super::{Ctx, Supplier};
use crate::fetch::{Download, FetchError};
use crate::oci::Digest;
use crate::store::{Provenance, SUM_CHUNK};

/// Chunk checksums already known for bytes on disk: chunks that matched
/// the holder's checksum when they arrived, written from the very buffers
/// that were summed. The hasher takes them instead of summing those bytes
/// again (xxh3 twice was 0.05 CPU-s per GiB on the puller,
/// benches/profile.sh). Entries leave as the hasher takes them; a serving
/// download whose prefix never closes keeps them to its end, one entry per
/// MiB of the blob at most (160 KiB for 10 GiB).
#[derive(Default)]
pub(super) struct KnownSums(std::sync::Mutex<std::collections::HashMap<u64, u64>>);

impl KnownSums {
    /// `sum` is the xxh3-64 of chunk `chunk` (bytes from
    /// `chunk * SUM_CHUNK`, a whole chunk or the blob's tail) as written.
    pub(super) fn record(&self, chunk: u64, sum: u64) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(chunk, sum);
        }
    }

    fn take(&self, chunk: u64) -> Option<u64> {
        self.0.lock().ok()?.remove(&chunk)
    }

    /// Forgets every sum: the bytes are about to be replaced.
    pub(super) fn clear(&self) {
        if let Ok(mut m) = self.0.lock() {
            m.clear();
        }
    }
}

/// Hashes the partial file's contiguous prefix as it grows, to `size`:
/// SHA-256 of the blob, and the chunk checksums peers will be sent (taken
/// from `known` where a chunk's is there).
pub(super) async fn hash_prefix(
    dl: Arc<Download>,
    size: u64,
    known: Arc<KnownSums>,
) -> Result<(Digest, Vec<u64>), FetchError> {
    let mut rx = dl.progress.subscribe();
    let mut hasher = sha2::Sha256::new();
    let mut sums = Vec::with_capacity(size.div_ceil(SUM_CHUNK) as usize);
    let mut hashed = 0u64;
    // One buffer for the whole blob, handed to each blocking batch and
    // back: a fresh zeroed MiB per batch was a memset of every byte hashed
    // (the prefix grows a few hundred KiB at a time).
    let mut buf = vec![0u8; SUM_CHUNK as usize];
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
        let known = known.clone();
        let (h, s, b, res) = tokio::task::spawn_blocking(move || {
            let mut h = hasher;
            let mut s = Vec::new();
            let mut buf = buf;
            let mut pos = hashed;
            while pos < upto {
                let n = (upto - pos).min(SUM_CHUNK) as usize;
                if let Err(e) = file.read_exact_at(&mut buf[..n], pos) {
                    return (h, s, buf, Err(e));
                }
                h.update(&buf[..n]);
                s.push(
                    known
                        .take(pos / SUM_CHUNK)
                        .unwrap_or_else(|| xxhash_rust::xxh3::xxh3_64(&buf[..n])),
                );
                pos += n as u64;
            }
            (h, s, buf, Ok(()))
        })
        .await
        .map_err(FetchError::join("hashing pieces"))?;
        hasher = h;
        buf = b;
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
    .map_err(FetchError::join("reading piece"))?
    .map_err(io)
}

/// The blob's digest did not match: compare every piece that came from a
/// peer with the origin's bytes, distrust the peers whose bytes differ,
/// replace their pieces, and hash again.
pub(super) async fn repair(
    ctx: &Arc<Ctx>,
    size: u64,
    supplier: &[Option<Supplier>],
    actual: Digest,
) -> Result<(Digest, Vec<u64>), FetchError> {
    let digest = ctx.dl.digest.clone();
    tracing::warn!(digest = %digest, got = %actual,
        "pieces do not add up to the digest; checking peers' pieces against the origin");
    // Pieces resumed from an earlier run are as suspect as peers' (a power
    // cut can lose written bytes but keep their journal line).
    let from_peers: Vec<usize> = supplier
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, Some(Supplier::Peer(_) | Supplier::Resumed)))
        .map(|(k, _)| k)
        .collect();
    // From now on no reader may read a piece that came from a peer until it
    // has been fetched again; readers that already sent bytes past the first
    // such piece are cut (a new epoch), new readers wait for the refetch.
    let first_bad = from_peers.first().map(|&k| ctx.piece_range(k).0);
    ctx.known_sums.clear();
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
        let (start, end) = ctx.piece_range(k);
        let end = end.unwrap_or(size).min(size);
        let mine = xxh3_of(&ctx.writer, start, end).await?;
        let mut have = 0u64;
        origin_piece(ctx, k, &mut have).await?;
        if xxh3_of(&ctx.writer, start, end).await? != mine {
            bad += 1;
            if let Some(Supplier::Peer(peer)) = &supplier[k] {
                ctx.swarm
                    .distrust(peer, "sent a piece that differs from the origin's bytes");
            }
        }
    }
    // Every sum is computed from the bytes as they are now.
    let hasher = hash_prefix(ctx.dl.clone(), size, Arc::new(KnownSums::default()));
    // The prefix is complete: reset the hasher's view by hashing anew.
    let (again, sums) = hasher.await?;
    if again != digest {
        return Err(FetchError::DigestMismatch {
            expected: digest,
            actual: again,
        });
    }
    tracing::info!(digest = %digest, bad_pieces = bad, "blob repaired from the origin");
    Ok((again, sums))
}

pub(super) async fn commit(
    ctx: &Arc<Ctx>,
    size: u64,
    actual: Digest,
    sums: Vec<u64>,
    supplier: &[Option<Supplier>],
) -> Result<(), FetchError> {
    let digest = ctx.dl.digest.clone();
    let from_peers = supplier
        .iter()
        .filter(|s| matches!(s, Some(Supplier::Peer(_))))
        .count();
    let mut prov = Provenance::origin(ctx.pull.up.host(), &ctx.pull.repo);
    if from_peers * 2 > supplier.len() {
        prov.from = crate::store::Fetched::Peer;
    }
    ctx.fetcher
        .commit_blob(&digest, actual, size, &sums, &prov)
        .await?;
    tracing::info!(digest = %digest, bytes = size, pieces = supplier.len(), from_peers,
        "blob committed");
    Ok(())
}
