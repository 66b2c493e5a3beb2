//! The seam between the fetch engine and the network of peers.
//!
//! [`PeerNet`] is everything the piece engine ([`crate::fetch::pieces`])
//! asks of the swarm: which sources a piece should come from, one piece
//! request to one peer, who holds a blob, and the verdicts it reports back
//! (a blob committed, a peer distrusted). [`super::Swarm`] is the real one,
//! over libp2p and the TLS data plane; [`super::memory::MemorySwarm`] is an
//! in-memory fake with scripted peers, so that the engine's schedule
//! (owners, holders, hedging, stalls, corrupt peers, the repair path) can be
//! unit-tested under paused time, without sockets.
//!
//! Both plan pieces with the same function, [`plan_piece`], over a
//! [`PlanView`] of the members: the fake runs the daemon's own schedule,
//! not a copy of it.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use libp2p::PeerId;

use super::rendezvous;
use crate::oci::Digest;

/// A peer to ask for bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRef {
    pub id: PeerId,
    pub addr: SocketAddr,
    /// Asked as a relay: a node that pulls the blob too, and passes on
    /// only what it has or is fetching anyway (see
    /// [`rendezvous::relay_parent`]); it never starts a download for it.
    pub relay: bool,
}

/// Where a piece may come from, best first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PieceSource {
    Peer(PeerRef),
    Origin,
}

/// One piece request: bytes `start..=end_incl` of `digest`, from `peer`.
#[derive(Debug, Clone)]
pub struct PieceRequest<'a> {
    pub peer: &'a PeerRef,
    pub digest: &'a Digest,
    pub start: u64,
    pub end_incl: u64,
    /// The blob's size, when this node knows it: a peer that does not hold
    /// the blob lays out its own download with it.
    pub size: Option<u64>,
    /// Where the blob lives (the registry as containerd names it, and the
    /// repository), should the peer have to fetch it from its origin.
    pub registry: &'a str,
    pub repo: &'a str,
}

impl PieceRequest<'_> {
    /// Whether the peer is asked as a relay ([`PeerRef::relay`]).
    pub fn relay(&self) -> bool {
        self.peer.relay
    }
}

/// A peer's answer to a piece request, before its body.
pub struct PeerResponse {
    pub start: u64,
    pub total: u64,
    /// Checksums of each [`crate::store::SUM_CHUNK`] from `start`, when the
    /// peer holds the whole verified blob.
    pub sums: Option<Vec<u64>>,
    /// The media type the peer recorded (manifests).
    pub content_type: Option<String>,
    pub body: BoxStream<'static, io::Result<Bytes>>,
}

/// A failed piece request to one peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The request did not get an answer (refused, reset, TLS, timeout).
    #[error("request to {addr} failed: {reason}")]
    Request { addr: SocketAddr, reason: String },
    #[error("{addr} answered {status}")]
    Status {
        addr: SocketAddr,
        status: http::StatusCode,
    },
    #[error("{addr} answered without a usable Content-Range")]
    NoRange { addr: SocketAddr },
}

/// What the fetch engine needs from the swarm. Object safe: the engine
/// holds an `Arc<dyn PeerNet>`.
pub trait PeerNet: Send + Sync + 'static {
    /// `swarm.piece_size`.
    fn piece_size(&self) -> u64;
    /// `swarm.max_piece_transfers`: pieces in flight per download.
    fn max_piece_transfers(&self) -> usize;
    /// `swarm.hedge_after`.
    fn hedge_after(&self) -> Duration;
    /// `swarm.stall_timeout`.
    fn stall_timeout(&self) -> Duration;

    /// Whether any other member that serves data is alive (else downloads
    /// go straight to the origin, sequentially).
    fn has_peers(&self) -> bool;

    /// Where piece `piece` of `digest` should come from, best first, always
    /// ending with the origin (see [`plan_piece`]). `pieces`: how many
    /// pieces the blob has, when its size is known (owners are balanced
    /// over them).
    fn piece_plan(
        &self,
        digest: &Digest,
        piece: u64,
        pieces: Option<u64>,
        full: bool,
        failed: &HashSet<PeerId>,
    ) -> Vec<PieceSource>;

    /// Looks up who holds `digest`, for at most `timeout`, and remembers
    /// the answer for [`PeerNet::piece_plan`].
    fn find_holders<'a>(&'a self, digest: &'a Digest, timeout: Duration) -> BoxFuture<'a, ()>;

    /// Asks a peer for a piece.
    fn open_piece<'a>(
        &'a self,
        req: PieceRequest<'a>,
    ) -> BoxFuture<'a, Result<PeerResponse, PeerError>>;

    /// Stops asking `peer` for anything, for the life of this process.
    fn distrust(&self, peer: &PeerId, why: &str);

    /// Tells the cluster this node starts pulling `digest` (seeds follow).
    fn announce_want(&self, digest: &Digest, registry: &str, repo: &str);

    /// Tells the cluster this node holds the whole verified blob.
    fn blob_committed(&self, digest: &Digest, size: u64);

    /// Waits as the download limit asks, for `n` bytes from peers.
    fn throttle_in(&self, n: u64) -> BoxFuture<'_, ()>;

    /// The counter of bytes received from `peer` (looked up once per
    /// transfer: its label is the peer id in base58).
    fn bytes_in_counter(&self, peer: &PeerId) -> prometheus::IntCounter;
}

/// What [`plan_piece`] plans over: the members as this node sees them.
pub struct PlanView<'a> {
    pub local: PeerId,
    /// Members that serve data, with their data-plane address.
    pub members: &'a [(PeerId, SocketAddr)],
    /// Peers known to hold the whole blob.
    pub holders: &'a HashSet<PeerId>,
    /// Peers known to pull the blob now (their `Want`s): the relays of
    /// its pieces.
    pub pulling: &'a HashSet<PeerId>,
    pub distrusted: &'a HashSet<PeerId>,
    /// `swarm.relay_fanout`; 0: no relays.
    pub relay_fanout: usize,
    /// The balanced owners computed so far.
    pub owners: &'a OwnerCache,
}

/// The owners of the rounds of pieces being planned
/// ([`rendezvous::round_owners`]), kept while the member list stays the
/// same: a round costs its pieces times the members to compute, and every
/// piece of a pull is planned at least once.
#[derive(Default)]
pub struct OwnerCache {
    rounds: Mutex<VecDeque<CachedRound>>,
}

struct CachedRound {
    digest: String,
    round: u64,
    pieces: u64,
    /// The member ids it was computed over, sorted.
    nodes: Vec<Vec<u8>>,
    owners: Arc<Vec<usize>>,
}

impl OwnerCache {
    /// Rounds kept: a few blobs pulled at once, each with a round or two
    /// in flight.
    const KEEP: usize = 16;

    /// The owner of `piece` of a blob of `pieces` pieces, as an index into
    /// `nodes`, which must be sorted (so that one member list is one key).
    pub fn owner(&self, digest: &str, piece: u64, pieces: u64, nodes: &[&[u8]]) -> Option<usize> {
        let (round, at) = rendezvous::round_of(piece);
        let pieces = pieces.max(piece + 1);
        let found = {
            let rounds = self.rounds.lock().unwrap_or_else(|p| p.into_inner());
            rounds
                .iter()
                .find(|c| {
                    c.round == round
                        && c.pieces == pieces
                        && c.digest == digest
                        && c.nodes.iter().map(Vec::as_slice).eq(nodes.iter().copied())
                })
                .map(|c| c.owners.clone())
        };
        let owners = match found {
            Some(o) => o,
            None => {
                // Computed outside the lock: two plans may both compute a
                // new round, and both get the same answer.
                let owners = Arc::new(rendezvous::round_owners(digest, round, pieces, nodes));
                let mut rounds = self.rounds.lock().unwrap_or_else(|p| p.into_inner());
                if rounds.len() >= Self::KEEP {
                    rounds.pop_front();
                }
                rounds.push_back(CachedRound {
                    digest: digest.to_owned(),
                    round,
                    pieces,
                    nodes: nodes.iter().map(|b| b.to_vec()).collect(),
                    owners: owners.clone(),
                });
                owners
            }
        };
        owners.get(at).copied()
    }
}

/// Where piece `piece` of `digest` should come from, best first, always
/// ending with the origin: [`rendezvous::plan`] over the live members that
/// are not distrusted and have not `failed`. Holders of the whole blob,
/// spread by rendezvous; for a node pulling the whole blob (`full`), the
/// piece's owner too (balanced over the blob's `pieces` when that is
/// known, [`rendezvous::round_owners`]; else the top-ranked member, which
/// is the same owner for the first piece of every round): first when it
/// holds nothing yet (it fetches the piece once and passes it on), none
/// when it is this node (this node fetches it). A serving download (`full == false`) never asks non-holders, so
/// requests cannot loop.
///
/// When no holder can be asked, a node pulling the whole blob asks its
/// parent in the piece's relay tree first ([`rendezvous::relay_parent`],
/// over the owner and the peers known to pull the blob), then the owner:
/// each piece leaves its owner a few times, not once per node.
pub fn plan_piece(
    view: &PlanView<'_>,
    digest: &Digest,
    piece: u64,
    pieces: Option<u64>,
    full: bool,
    failed: &HashSet<PeerId>,
) -> Vec<PieceSource> {
    let addr_of = |id: &PeerId| {
        view.members
            .iter()
            .find(|(m, _)| m == id)
            .map(|(_, addr)| *addr)
    };
    let usable = |id: &PeerId| {
        addr_of(id).is_some() && !view.distrusted.contains(id) && !failed.contains(id)
    };
    let key = digest.to_string();
    let holder_bytes: Vec<(Vec<u8>, PeerId)> = view
        .holders
        .iter()
        .filter(|id| **id != view.local && usable(id))
        .map(|id| (id.to_bytes(), *id))
        .collect();
    let mut all: Vec<(Vec<u8>, Option<PeerId>)> = if full {
        view.members
            .iter()
            .map(|(id, _)| id)
            .filter(|id| **id != view.local && !view.distrusted.contains(id))
            .map(|id| (id.to_bytes(), Some(*id)))
            .chain(std::iter::once((view.local.to_bytes(), None)))
            .collect()
    } else {
        Vec::new()
    };
    let holder_refs: Vec<(&[u8], PeerId)> = holder_bytes
        .iter()
        .map(|(b, id)| (b.as_slice(), *id))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let member_refs: Vec<(&[u8], Option<PeerId>)> =
        all.iter().map(|(b, id)| (b.as_slice(), *id)).collect();
    let owner = match pieces {
        _ if all.is_empty() => None,
        Some(pieces) => {
            let ids: Vec<&[u8]> = member_refs.iter().map(|(b, _)| *b).collect();
            view.owners.owner(&key, piece, pieces, &ids)
        }
        None => rendezvous::rank(
            &key,
            piece,
            member_refs.iter().enumerate().map(|(i, (b, _))| (*b, i)),
        )
        .first()
        .copied(),
    };
    let order = owner
        .map(|o| rendezvous::owner_order(&key, piece, o, &member_refs))
        .unwrap_or_default();
    // Only the first owner that has not failed: asking the next one as a
    // hedge would make it fetch the piece from the origin too. The next one
    // is asked once this one failed.
    let mut out: Vec<PieceSource> =
        rendezvous::plan(&key, piece, &holder_refs, order, |id| failed.contains(id))
            .into_iter()
            .filter_map(|id| {
                addr_of(&id).map(|addr| {
                    PieceSource::Peer(PeerRef {
                        id,
                        addr,
                        relay: false,
                    })
                })
            })
            .collect();
    if full && holder_refs.is_empty() && view.relay_fanout > 0 {
        if let Some(PieceSource::Peer(owner)) = out.first() {
            let pulling: Vec<(Vec<u8>, PeerId)> = view
                .pulling
                .iter()
                .filter(|id| **id != view.local && usable(id))
                .chain(std::iter::once(&view.local))
                .map(|id| (id.to_bytes(), *id))
                .collect();
            let refs: Vec<(&[u8], PeerId)> =
                pulling.iter().map(|(b, id)| (b.as_slice(), *id)).collect();
            let parent = rendezvous::relay_parent(
                &key,
                piece,
                owner.id,
                &refs,
                view.local,
                view.relay_fanout,
            );
            if let Some((id, addr)) = parent.and_then(|id| addr_of(&id).map(|a| (id, a))) {
                out.insert(
                    0,
                    PieceSource::Peer(PeerRef {
                        id,
                        addr,
                        relay: true,
                    }),
                );
            }
        }
    }
    out.push(PieceSource::Origin);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swarm::memory::peer_id;

    /// Who each of `pieces` pieces is planned from by `local` (`None`: its
    /// own, from the origin), with no holders and no relays.
    fn owners(
        local: PeerId,
        others: &[PeerId],
        pieces: u64,
        cache: &OwnerCache,
    ) -> Vec<Option<PeerId>> {
        let members: Vec<(PeerId, SocketAddr)> = others
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, SocketAddr::from(([127, 0, 0, 2 + i as u8], 4002))))
            .collect();
        let none = HashSet::new();
        let view = PlanView {
            local,
            members: &members,
            holders: &none,
            pulling: &none,
            distrusted: &none,
            relay_fanout: 0,
            owners: cache,
        };
        let d = Digest::from_sha256(&[7; 32]);
        (0..pieces)
            .map(
                |k| match plan_piece(&view, &d, k, Some(pieces), true, &none).first() {
                    Some(PieceSource::Peer(p)) => Some(p.id),
                    _ => None,
                },
            )
            .collect()
    }

    #[test]
    fn every_node_plans_the_same_balanced_owners() {
        let ids: Vec<PeerId> = (1..=8).map(peer_id).collect();
        // Each node's plans, as ids (its own pieces as its own id).
        let seen: Vec<Vec<PeerId>> = ids
            .iter()
            .map(|me| {
                let others: Vec<PeerId> = ids.iter().copied().filter(|p| p != me).collect();
                owners(*me, &others, 32, &OwnerCache::default())
                    .into_iter()
                    .map(|o| o.unwrap_or(*me))
                    .collect()
            })
            .collect();
        assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
        for id in &ids {
            assert_eq!(seen[0].iter().filter(|o| *o == id).count(), 4, "{id}");
        }
    }

    #[test]
    fn the_owner_cache_follows_the_member_list() {
        let ids: Vec<PeerId> = (1..=8).map(peer_id).collect();
        let cache = OwnerCache::default();
        let all = owners(ids[0], &ids[1..], 40, &cache);
        assert_eq!(all, owners(ids[0], &ids[1..], 40, &OwnerCache::default()));
        // A member leaves: planned with the same cache, nothing goes to it,
        // and nobody owns more than ceil(40 / 7).
        let fewer = owners(ids[0], &ids[1..7], 40, &cache);
        assert!(!fewer.contains(&Some(ids[7])));
        for id in &ids[..7] {
            let c = fewer.iter().filter(|o| o.unwrap_or(ids[0]) == *id).count();
            assert!(c <= 6, "{id}: {c}");
        }
        // And it comes back: the first answer again.
        assert_eq!(owners(ids[0], &ids[1..], 40, &cache), all);
    }
}
