//! [`MemorySwarm`]: the swarm as an in-memory fake, for unit tests of the
//! fetch engine (after spegel's `memory.go` router).
//!
//! Peers are scripted ([`Script`]): one that holds the blob and sends chunk
//! sums as a real holder does, one that answers late, stalls, corrupts a
//! byte, refuses, or is busy. Pieces are planned with the daemon's own
//! [`plan_piece`], so a test of the engine's schedule tests the real one.
//! Every request, distrust, announcement and commit is recorded for the
//! test to check. No socket, no libp2p: with tokio's paused time a test of
//! hedging or stalls runs in milliseconds and the same way every time.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, StreamExt};
use libp2p::PeerId;

use super::net::{
    plan_piece, PeerError, PeerNet, PeerRef, PeerResponse, PieceRequest, PieceSource, PlanView,
};
use crate::oci::Digest;
use crate::store::SUM_CHUNK;

/// Bytes per body chunk a fake peer sends (a network delivers bodies cut
/// up; the engine must not depend on where).
const BODY_CHUNK: usize = 64 * 1024;

/// How a fake peer answers a piece request.
#[derive(Debug, Clone)]
pub enum Script {
    /// Serves `data` (the whole blob); with `sums`, sends the chunk
    /// checksums a holder of the verified blob sends.
    Serves { data: Bytes, sums: bool },
    /// As `Serves`, after `delay`.
    Late {
        data: Bytes,
        sums: bool,
        delay: Duration,
    },
    /// Sends `after` bytes of the range, then nothing, forever.
    Stalls { data: Bytes, after: u64 },
    /// Serves `data` with the byte at blob offset `at` flipped; with `sums`,
    /// the sums of the true bytes (a holder whose disk rotted after it
    /// verified the blob).
    Corrupts { data: Bytes, at: u64, sums: bool },
    /// Says the blob is `total` bytes long, and sends nothing.
    ClaimsSize { total: u64 },
    /// The connection is refused.
    Refuses,
    /// Answers 503 (every upload slot taken).
    Busy,
}

/// A request a fake peer received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    pub peer: PeerId,
    pub digest: Digest,
    pub start: u64,
    pub end_incl: u64,
    pub size: Option<u64>,
    /// Asked as a relay ([`PeerRef::relay`]).
    pub relay: bool,
}

/// Tuning the engine reads from the swarm.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub piece_size: u64,
    pub max_piece_transfers: usize,
    pub hedge_after: Duration,
    pub stall_timeout: Duration,
    pub relay_fanout: usize,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            piece_size: 1 << 20,
            max_piece_transfers: 4,
            hedge_after: Duration::from_millis(500),
            stall_timeout: Duration::from_secs(2),
            relay_fanout: super::rendezvous::RELAY_FANOUT,
        }
    }
}

/// The fake swarm. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct MemorySwarm {
    inner: Arc<Inner>,
}

struct Inner {
    local: PeerId,
    tuning: Tuning,
    state: Mutex<State>,
    owners: super::net::OwnerCache,
    /// Registered nowhere: the fake's record of bytes is its request log.
    counter: prometheus::IntCounter,
}

#[derive(Default)]
struct State {
    peers: Vec<(PeerId, SocketAddr, Script)>,
    /// Announced holders: what `piece_plan` knows without a lookup.
    holders: HashMap<Digest, HashSet<PeerId>>,
    /// What a lookup (`find_holders`) finds, as Kademlia would.
    providers: HashMap<Digest, HashSet<PeerId>>,
    /// Peers whose `Want` for a digest this node received.
    pulling: HashMap<Digest, HashSet<PeerId>>,
    distrusted: Vec<(PeerId, String)>,
    asked: Vec<Asked>,
    wants: Vec<Digest>,
    committed: Vec<(Digest, u64)>,
    lookups: usize,
}

/// The peer id of fake member `n`: the same every run, so that which
/// member owns which piece (rendezvous over the ids) is too.
pub fn peer_id(n: u8) -> PeerId {
    let kp = libp2p::identity::Keypair::ed25519_from_bytes([n; 32])
        .unwrap_or_else(|_| libp2p::identity::Keypair::generate_ed25519());
    kp.public().to_peer_id()
}

impl MemorySwarm {
    /// A swarm seen from member 0 ([`peer_id`]); peers are 1, 2, ...
    pub fn new(tuning: Tuning) -> MemorySwarm {
        MemorySwarm {
            inner: Arc::new(Inner {
                local: peer_id(0),
                tuning,
                state: Mutex::new(State::default()),
                owners: Default::default(),
                counter: prometheus::IntCounter::new("memory_swarm_bytes_in", "fake")
                    .unwrap_or_else(|e| unreachable!("a constant metric name: {e}")),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn local(&self) -> PeerId {
        self.inner.local
    }

    /// Adds a member that answers as `script` says: member 1, 2, ...
    pub fn add_peer(&self, script: Script) -> PeerId {
        let mut st = self.state();
        let n = st.peers.len() as u16;
        let id = peer_id(n as u8 + 1);
        let addr = SocketAddr::from(([10, 0, 0, 1], 7000 + n));
        st.peers.push((id, addr, script));
        id
    }

    /// Changes how `peer` answers from now on.
    pub fn script(&self, peer: PeerId, script: Script) {
        if let Some(p) = self.state().peers.iter_mut().find(|p| p.0 == peer) {
            p.2 = script;
        }
    }

    /// `peer` announced that it holds `digest`.
    pub fn announce_holder(&self, digest: &Digest, peer: PeerId) {
        self.state()
            .holders
            .entry(digest.clone())
            .or_default()
            .insert(peer);
    }

    /// `peer` announced that it pulls `digest` (a relay for its pieces).
    pub fn announce_pulling(&self, digest: &Digest, peer: PeerId) {
        self.state()
            .pulling
            .entry(digest.clone())
            .or_default()
            .insert(peer);
    }

    /// A lookup for `digest` will find `peer`.
    pub fn add_provider(&self, digest: &Digest, peer: PeerId) {
        self.state()
            .providers
            .entry(digest.clone())
            .or_default()
            .insert(peer);
    }

    /// Every request the peers received, in order.
    pub fn asked(&self) -> Vec<Asked> {
        self.state().asked.clone()
    }

    /// The peers distrusted, with why, in order.
    pub fn distrusted(&self) -> Vec<(PeerId, String)> {
        self.state().distrusted.clone()
    }

    /// The blobs committed (announced), in order.
    pub fn committed(&self) -> Vec<(Digest, u64)> {
        self.state().committed.clone()
    }

    /// The pulls announced (`Want`), in order.
    pub fn wants(&self) -> Vec<Digest> {
        self.state().wants.clone()
    }

    /// How many holder lookups the engine made.
    pub fn lookups(&self) -> usize {
        self.state().lookups
    }
}

/// The chunk sums a holder sends with bytes from `start` (on a chunk) to
/// `end` of `data`.
fn sums_of(data: &[u8], start: u64, end: u64) -> Option<Vec<u64>> {
    if !start.is_multiple_of(SUM_CHUNK) {
        return None;
    }
    let end = end.min(data.len() as u64);
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let to = (pos + SUM_CHUNK).min(data.len() as u64);
        out.push(xxhash_rust::xxh3::xxh3_64(&data[pos as usize..to as usize]));
        pos = to;
    }
    Some(out)
}

/// A body of `bytes`, in [`BODY_CHUNK`]s, that never ends when `hang`.
fn body(bytes: Bytes, hang: bool) -> futures_util::stream::BoxStream<'static, io::Result<Bytes>> {
    let chunks: Vec<io::Result<Bytes>> = (0..bytes.len())
        .step_by(BODY_CHUNK)
        .map(|at| Ok(bytes.slice(at..(at + BODY_CHUNK).min(bytes.len()))))
        .collect();
    let s = stream::iter(chunks);
    if hang {
        s.chain(stream::pending()).boxed()
    } else {
        s.boxed()
    }
}

impl PeerNet for MemorySwarm {
    fn piece_size(&self) -> u64 {
        self.inner.tuning.piece_size
    }

    fn max_piece_transfers(&self) -> usize {
        self.inner.tuning.max_piece_transfers
    }

    fn hedge_after(&self) -> Duration {
        self.inner.tuning.hedge_after
    }

    fn stall_timeout(&self) -> Duration {
        self.inner.tuning.stall_timeout
    }

    fn has_peers(&self) -> bool {
        !self.state().peers.is_empty()
    }

    fn piece_plan(
        &self,
        digest: &Digest,
        piece: u64,
        pieces: Option<u64>,
        full: bool,
        failed: &HashSet<PeerId>,
    ) -> Vec<PieceSource> {
        let st = self.state();
        let members: Vec<(PeerId, SocketAddr)> =
            st.peers.iter().map(|(id, addr, _)| (*id, *addr)).collect();
        let distrusted: HashSet<PeerId> = st.distrusted.iter().map(|(p, _)| *p).collect();
        let holders = st.holders.get(digest).cloned().unwrap_or_default();
        let pulling = st.pulling.get(digest).cloned().unwrap_or_default();
        let view = PlanView {
            local: self.inner.local,
            members: &members,
            holders: &holders,
            pulling: &pulling,
            distrusted: &distrusted,
            relay_fanout: self.inner.tuning.relay_fanout,
            owners: &self.inner.owners,
        };
        plan_piece(&view, digest, piece, pieces, full, failed)
    }

    fn find_holders<'a>(&'a self, digest: &'a Digest, _timeout: Duration) -> BoxFuture<'a, ()> {
        let mut st = self.state();
        st.lookups += 1;
        let found = st.providers.get(digest).cloned().unwrap_or_default();
        st.holders.entry(digest.clone()).or_default().extend(found);
        Box::pin(async {})
    }

    fn open_piece<'a>(
        &'a self,
        req: PieceRequest<'a>,
    ) -> BoxFuture<'a, Result<PeerResponse, PeerError>> {
        let PeerRef { id, addr, relay } = *req.peer;
        let script = {
            let mut st = self.state();
            st.asked.push(Asked {
                peer: id,
                digest: req.digest.clone(),
                start: req.start,
                end_incl: req.end_incl,
                size: req.size,
                relay,
            });
            st.peers.iter().find(|p| p.0 == id).map(|p| p.2.clone())
        };
        let (start, end_incl) = (req.start, req.end_incl);
        Box::pin(async move {
            let range = |data: &Bytes| {
                let total = data.len() as u64;
                if start >= total && total > 0 {
                    return Err(PeerError::Status {
                        addr,
                        status: http::StatusCode::RANGE_NOT_SATISFIABLE,
                    });
                }
                let end = end_incl.saturating_add(1).min(total);
                Ok((total, end))
            };
            let answer =
                |data: &Bytes, end: u64, sums: bool, bytes: Bytes, hang: bool| PeerResponse {
                    start,
                    total: data.len() as u64,
                    sums: if sums {
                        sums_of(data, start, end)
                    } else {
                        None
                    },
                    content_type: None,
                    body: body(bytes, hang),
                };
            match script {
                None | Some(Script::Refuses) => Err(PeerError::Request {
                    addr,
                    reason: "connection refused".into(),
                }),
                Some(Script::Busy) => Err(PeerError::Status {
                    addr,
                    status: http::StatusCode::SERVICE_UNAVAILABLE,
                }),
                Some(Script::ClaimsSize { total }) => Ok(PeerResponse {
                    start,
                    total,
                    sums: None,
                    content_type: None,
                    body: body(Bytes::new(), true),
                }),
                Some(Script::Serves { data, sums }) => {
                    let (_, end) = range(&data)?;
                    let bytes = data.slice(start as usize..end as usize);
                    Ok(answer(&data, end, sums, bytes, false))
                }
                Some(Script::Late { data, sums, delay }) => {
                    tokio::time::sleep(delay).await;
                    let (_, end) = range(&data)?;
                    let bytes = data.slice(start as usize..end as usize);
                    Ok(answer(&data, end, sums, bytes, false))
                }
                Some(Script::Stalls { data, after }) => {
                    let (_, end) = range(&data)?;
                    let cut = (start + after).min(end);
                    let bytes = data.slice(start as usize..cut as usize);
                    Ok(answer(&data, end, false, bytes, true))
                }
                Some(Script::Corrupts { data, at, sums }) => {
                    let (_, end) = range(&data)?;
                    let mut bad = data[start as usize..end as usize].to_vec();
                    if (start..end).contains(&at) {
                        bad[(at - start) as usize] ^= 0xff;
                    }
                    Ok(answer(&data, end, sums, Bytes::from(bad), false))
                }
            }
        })
    }

    fn distrust(&self, peer: &PeerId, why: &str) {
        let mut st = self.state();
        if !st.distrusted.iter().any(|(p, _)| p == peer) {
            st.distrusted.push((*peer, why.to_owned()));
        }
    }

    fn announce_want(&self, digest: &Digest, _registry: &str, _repo: &str) {
        self.state().wants.push(digest.clone());
    }

    fn blob_committed(&self, digest: &Digest, size: u64) {
        self.state().committed.push((digest.clone(), size));
    }

    fn throttle_in(&self, _n: u64) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn bytes_in_counter(&self, _peer: &PeerId) -> prometheus::IntCounter {
        self.inner.counter.clone()
    }
}
