//! A piece from peers: the plan's peers asked in turn, hedged when one is
//! slow, each chunk checked against the holder's checksums before it is
//! written.

use std::collections::HashSet;
use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::StatusCode;
use libp2p::PeerId;

use super::{Ctx, LAST_PEER_PATIENCE};
use crate::fetch::FetchError;
use crate::store::SUM_CHUNK;
use crate::swarm::{PeerRef, PieceRequest};

/// Bytes of a piece without checksums gathered before one write: few
/// enough that a relay passes the piece on close behind, enough that
/// writes stay large.
const RELAY_BATCH: u64 = 256 * 1024;

/// Why a peer transfer stopped.
#[derive(Debug, thiserror::Error)]
pub(super) enum PeerFail {
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
pub(super) async fn peer_piece(
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
        let ns = ctx.pull.up.host().to_owned();
        let repo = ctx.pull.repo.clone();
        async move {
            // A busy peer (all its upload slots taken) is asked again
            // shortly: it is alive and will have the piece, and going
            // elsewhere could mean the origin. Hedging still applies.
            let mut backoff = Duration::from_millis(10);
            let mut retried = false;
            loop {
                let r = swarm
                    .open_piece(PieceRequest {
                        peer: &p,
                        digest: &d,
                        start: from,
                        end_incl,
                        size: known_size,
                        registry: &ns,
                        repo: &repo,
                    })
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
    let peer_in = ctx.swarm.bytes_in_counter(&peer.id);
    let sums = resp.sums.clone();
    let resp_total = resp.total;
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
            let target = if sums.is_some() {
                (((pos / SUM_CHUNK) + 1) * SUM_CHUNK).min(end)
            } else {
                // Nothing to check per chunk: written as it comes (in
                // batches), so that a node that relays the piece passes it
                // on a few frames behind, not a chunk.
                (pos + buf_len).min(end)
            };
            let need = target - pos;
            if need == 0 {
                failed.insert(peer.id);
                return Err(PeerFail::Broken {
                    peer: peer.id,
                    reason: "sent more than asked".into(),
                });
            }
            if (buf_len < need || (sums.is_none() && buf_len < RELAY_BATCH && target < end))
                && !ended
            {
                break;
            }
            let take = need.min(buf_len);
            let data = take_frames(&mut buf, take);
            buf_len -= take;
            let mut checked = None;
            if let Some(sums) = &sums {
                if pos.is_multiple_of(SUM_CHUNK) && take == need {
                    let idx = ((pos - from) / SUM_CHUNK) as usize;
                    let sum = xxh3_of_frames(&data);
                    if sums.get(idx) != Some(&sum) {
                        ctx.swarm
                            .distrust(&peer.id, "sent a chunk that does not match its checksum");
                        failed.insert(peer.id);
                        return Err(PeerFail::Corrupt { peer: peer.id });
                    }
                    // A whole chunk as the hasher sums it (or the blob's
                    // tail), not the end of a piece that cuts a chunk.
                    if take == SUM_CHUNK.min(resp_total - pos) {
                        checked = Some(sum);
                    }
                }
            }
            write_at(&ctx.writer, pos, data).await?;
            if pos == from {
                // With the origin's own line: when each piece's bytes
                // reached each node, and from whom, is a relay tree's
                // per-hop delay (docs/benchmarks.md, "A step is a hop").
                tracing::debug!(piece = k, peer = %peer.id, whole = sums.is_some(),
                    waited_ms = asked.elapsed().as_millis() as u64, "piece's first bytes from a peer");
            }
            if let Some(sum) = checked {
                ctx.known_sums.record(pos / SUM_CHUNK, sum);
            }
            *wrote_peer = Some(peer.id);
            pos += take;
            let before = std::mem::replace(have, pos - start);
            ctx.wrote(k, before, *have);
            metrics
                .fetched_bytes
                .with_label_values(&["peer"])
                .inc_by(take);
            ctx.dl.count(crate::fetch::Source::Peer, take);
            if peer.relay {
                metrics.relayed_bytes.inc_by(take);
            }
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

/// Takes `n` bytes off the front of `buf`, as the frames they arrived in:
/// a chunk is checked and written from those buffers, never copied into one
/// (the copy was 0.1-0.2 CPU-s per GiB on the puller, benches/profile.sh).
fn take_frames(buf: &mut Vec<Bytes>, n: u64) -> Vec<Bytes> {
    let mut left = n as usize;
    let mut whole = 0;
    for b in buf.iter() {
        if b.len() > left {
            break;
        }
        left -= b.len();
        whole += 1;
    }
    let mut out: Vec<Bytes> = buf.drain(..whole).collect();
    if left > 0 {
        if let Some(first) = buf.first_mut() {
            out.push(first.split_to(left));
        }
    }
    out
}

/// xxh3-64 of the frames as one buffer: the holder's checksum of a chunk.
fn xxh3_of_frames(frames: &[Bytes]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for f in frames {
        h.update(f);
    }
    h.digest()
}

/// Writes `frames` back to back at `pos`, on a blocking thread, with as few
/// `pwritev` calls as the kernel takes (each frame of a peer's or origin's
/// body is one buffer; one blocking hop per frame cost more than the write).
pub(super) async fn write_at(
    file: &Arc<File>,
    pos: u64,
    frames: Vec<Bytes>,
) -> Result<(), FetchError> {
    let f = file.clone();
    tokio::task::spawn_blocking(move || write_frames_at(&f, pos, &frames))
        .await
        .map_err(FetchError::join("writing piece"))?
        .map_err(|source| FetchError::Io {
            what: "writing piece".into(),
            source,
        })
}

fn write_frames_at(file: &File, mut pos: u64, frames: &[Bytes]) -> std::io::Result<()> {
    // Linux's IOV_MAX.
    const MAX_IOV: usize = 1024;
    let (mut i, mut off) = (0usize, 0usize);
    while i < frames.len() {
        let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&frames[i][off..])
            .chain(frames[i + 1..].iter().map(|f| &f[..]))
            .take(MAX_IOV)
            .map(std::io::IoSlice::new)
            .collect();
        let mut n = match rustix::io::pwritev(file, &slices, pos) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e == rustix::io::Errno::INTR => continue,
            Err(e) => return Err(e.into()),
        };
        pos += n as u64;
        while n > 0 {
            let rest = frames[i].len() - off;
            if n >= rest {
                n -= rest;
                i += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
        while i < frames.len() && frames[i].len() == off {
            i += 1;
            off = 0;
        }
    }
    Ok(())
}

#[cfg(test)]
mod frame_tests {
    use super::*;

    fn frames(sizes: &[usize]) -> Vec<Bytes> {
        let mut n = 0u8;
        sizes
            .iter()
            .map(|&len| {
                Bytes::from_iter((0..len).map(|_| {
                    n = n.wrapping_add(1);
                    n
                }))
            })
            .collect()
    }

    #[test]
    fn take_frames_splits_without_losing_bytes() {
        let all = frames(&[3, 5, 0, 7, 2]);
        let flat: Vec<u8> = all.iter().flat_map(|b| b.to_vec()).collect();
        for n in 0..=flat.len() {
            let mut buf = all.clone();
            let taken = take_frames(&mut buf, n as u64);
            let got: Vec<u8> = taken.iter().flat_map(|b| b.to_vec()).collect();
            let rest: Vec<u8> = buf.iter().flat_map(|b| b.to_vec()).collect();
            assert_eq!(got, flat[..n], "taking {n}");
            assert_eq!(rest, flat[n..], "left after taking {n}");
            assert_eq!(
                xxh3_of_frames(&taken),
                xxhash_rust::xxh3::xxh3_64(&flat[..n])
            );
        }
    }

    #[test]
    fn frames_land_where_they_belong() {
        let dir = std::env::temp_dir().join(format!("damselfly-frames-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let file = File::create(&path).unwrap();
        // More frames than one pwritev takes, of uneven sizes, some empty.
        let sizes: Vec<usize> = (0..2500).map(|i| [1, 0, 17, 4096, 3][i % 5]).collect();
        let all = frames(&sizes);
        write_frames_at(&file, 10, &all).unwrap();
        let flat: Vec<u8> = all.iter().flat_map(|b| b.to_vec()).collect();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[10..], &flat[..]);
        assert!(on_disk[..10].iter().all(|&b| b == 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
