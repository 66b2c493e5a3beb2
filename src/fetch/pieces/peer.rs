//! A piece from peers: the plan's peers asked in turn, hedged when one is
//! slow, each chunk checked against the holder's checksums before it is
//! written.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
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
            ctx.dl.count(crate::fetch::Source::Peer, take);
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

pub(super) async fn write_at(file: &Arc<File>, pos: u64, data: Bytes) -> Result<(), FetchError> {
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.write_all_at(&data, pos))
        .await
        .map_err(FetchError::join("writing piece"))?
        .map_err(|source| FetchError::Io {
            what: "writing piece".into(),
            source,
        })
}
