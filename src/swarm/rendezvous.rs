//! Which node fetches a piece from the origin: rendezvous (highest random
//! weight) hashing of (digest, piece) over the live members, with bounded
//! loads.
//!
//! Every node computes the same owners from the same member list, with no
//! coordinator and no messages. Rendezvous alone (each piece to its
//! top-ranked member) leaves the draw to chance: at 8 members and 32
//! pieces the busiest owns 8 where the mean is 4, and its download then
//! carries twice the origin transfers, which holds back every tree below it
//! (the scale model: 1.21x the ideal against 1.05x balanced). So the pieces
//! of each [`ROUND`] go, in order, to their highest-ranked member among
//! those that own fewer than their fair share of the round so far
//! ([`round_owners`]: consistent hashing with bounded loads, Mirrokni,
//! Thorup and Zadimoghaddam, 2018). Every member owns the floor or the
//! ceiling of the mean. The price: a member that joins or leaves moves its
//! own pieces and, through the bound, a few others (about a tenth of the
//! rest at 8 members and 32 pieces, a few hundredths at 1,280 pieces;
//! `rendezvous::tests`), where plain rendezvous moves only its own. Nodes
//! whose member lists briefly differ (a heartbeat in flight) disagree about
//! those pieces; the worst that does is a piece fetched from the origin
//! twice, never a loop (see [`relay_parent`]).
//!
//! After its owner, a piece's members are ranked by weight alone
//! ([`owner_order`]): the next one takes the piece over when the owner
//! fails.

/// The weight of `node` for piece `piece` of blob `digest`.
///
/// xxh3 over the three parts: the ranking needs good mixing, not secrecy
/// (a member chooses its own id, and can only claim pieces, not content).
pub fn weight(digest: &str, piece: u64, node: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(digest.as_bytes());
    h.update(&piece.to_le_bytes());
    h.update(node);
    h.digest()
}

/// `nodes` ordered by weight for (`digest`, `piece`), highest first. Ties
/// (equal weights, practically never) fall back to the node id, so every
/// node still agrees.
pub fn rank<'a, T>(
    digest: &str,
    piece: u64,
    nodes: impl IntoIterator<Item = (&'a [u8], T)>,
) -> Vec<T> {
    let mut scored: Vec<(u64, &'a [u8], T)> = nodes
        .into_iter()
        .map(|(id, t)| (weight(digest, piece, id), id, t))
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(a.1)));
    scored.into_iter().map(|(_, _, t)| t).collect()
}

/// How many consecutive pieces are balanced together: 2 GiB at the default
/// 8 MiB piece size. A round costs (pieces x members) weights once per
/// member list: 6.6 ms at 1,000 members, 0.6 ms at 100 (measured on the
/// 2-core CI machine, 2026-12-08); balancing the whole blob at
/// once would cost that per 2 GiB of it on every membership change.
pub const ROUND: u64 = 256;

/// The owners of the pieces of round `round` of a blob of `pieces` pieces,
/// as indices into `nodes` (a member list in any order): in piece order,
/// each piece goes to its highest-weight node among those that own fewer
/// than `ceil(len / nodes)` of the round's `len` pieces so far. Ties in
/// weight fall back to the node id, as in [`rank`].
pub fn round_owners(digest: &str, round: u64, pieces: u64, nodes: &[&[u8]]) -> Vec<usize> {
    let first = round.saturating_mul(ROUND);
    let len = pieces.saturating_sub(first).min(ROUND);
    if nodes.is_empty() {
        return Vec::new();
    }
    let cap = len.div_ceil(nodes.len() as u64).max(1);
    let mut load = vec![0u64; nodes.len()];
    (first..first + len)
        .map(|piece| {
            let mut best: Option<(u64, &[u8], usize)> = None;
            for (i, id) in nodes.iter().enumerate() {
                if load[i] >= cap {
                    continue;
                }
                let w = weight(digest, piece, id);
                if best.is_none_or(|(bw, bid, _)| (w, *id) > (bw, bid)) {
                    best = Some((w, id, i));
                }
            }
            // Some node is always under the cap: cap x nodes >= len.
            let i = best.map_or(0, |(_, _, i)| i);
            load[i] += 1;
            i
        })
        .collect()
}

/// The owner of piece `piece` of a blob of `pieces` pieces among `nodes`,
/// as an index into `nodes`; `None` when `nodes` is empty. Computes the
/// piece's whole round: callers that ask for many pieces cache
/// [`round_owners`] instead (`swarm::net::OwnerCache`).
pub fn owner(digest: &str, piece: u64, pieces: u64, nodes: &[&[u8]]) -> Option<usize> {
    let (round, at) = round_of(piece);
    round_owners(digest, round, pieces.max(piece + 1), nodes)
        .get(at)
        .copied()
}

/// The round of `piece`, and its place in that round's [`round_owners`].
pub fn round_of(piece: u64) -> (u64, usize) {
    (piece / ROUND, (piece % ROUND) as usize)
}

/// `nodes` in the order in which they take piece `piece` over: its owner
/// (`nodes[owner]`, from [`round_owners`]) first, then the rest by
/// [`rank`]. Every node that agrees on the owner agrees on the order.
pub fn owner_order<T: Copy>(
    digest: &str,
    piece: u64,
    owner: usize,
    nodes: &[(&[u8], T)],
) -> Vec<T> {
    let first = nodes.get(owner).map(|(_, t)| *t);
    first
        .into_iter()
        .chain(rank(
            digest,
            piece,
            nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != owner)
                .map(|(_, (b, t))| (*b, *t)),
        ))
        .collect()
}

/// The peers to ask for a piece, best first; the origin comes after them.
///
/// - `holders`: peers that hold the whole blob and may be asked; they come
///   first, spread by rendezvous among themselves.
/// - `members`: for a download of the whole blob (`full`), every member
///   this node may ask, and this node itself as `None`, in the piece's
///   [`owner_order`]. The piece's owner is the first of them that has not
///   `failed`:
///   - this node: no peer is added (this node fetches the piece itself,
///     from the holders, then the origin);
///   - a holder: the first non-holder after it is added after the holders,
///     as a last peer before the origin;
///   - a peer that holds nothing yet: it goes first. It fetches the piece
///     once (from a holder or the origin) and passes it on, so that the
///     nodes that start together after a scale-to-zero share the work
///     rather than all taking the whole blob from the one seed.
///
/// A serving download (`members` empty) asks holders only, so requests
/// cannot loop between nodes that hold nothing.
pub fn plan<T: Copy + PartialEq>(
    digest: &str,
    piece: u64,
    holders: &[(&[u8], T)],
    members: impl IntoIterator<Item = Option<T>>,
    failed: impl Fn(&T) -> bool,
) -> Vec<T> {
    let mut out: Vec<T> = rank(digest, piece, holders.iter().map(|(b, t)| (*b, *t)));
    let mut holder_above = false;
    for id in members {
        let Some(id) = id else { break };
        if failed(&id) {
            continue;
        }
        if out.contains(&id) {
            holder_above = true;
            continue;
        }
        if holder_above {
            out.push(id);
        } else {
            out.insert(0, id);
        }
        break;
    }
    out
}

/// The default of `swarm.relay_fanout`: how many nodes each node of a
/// piece's relay tree passes the piece on to (see [`relay_parent`]). Two
/// gives ten hops at 1,000 nodes; the scale model and the lab picked it
/// (docs/benchmarks.md).
pub const RELAY_FANOUT: usize = 2;

/// The stripe of `node` for `digest`: with `fanout` stripes, a node passes
/// pieces on (sits inside the relay tree) only for the pieces of its own
/// stripe, and is a leaf for the rest. So every node's upload is about
/// its download, whatever the draw (SplitStream's interior-disjoint trees),
/// where a tree drawn per piece makes some node upload 1.4x the mean.
pub fn stripe(digest: &str, node: &[u8], fanout: usize) -> usize {
    (weight(digest, u64::MAX, node) % fanout.max(1) as u64) as usize
}

/// `nodes` in relay order for (`digest`, `piece`): the nodes of the
/// piece's stripe first, then the rest, each part by weight. Two nodes
/// compare the same way in every view of the cluster.
pub fn relay_rank<'a, T>(
    digest: &str,
    piece: u64,
    nodes: impl IntoIterator<Item = (&'a [u8], T)>,
    fanout: usize,
) -> Vec<T> {
    let f = fanout.max(1);
    let own = (piece % f as u64) as usize;
    let mut scored: Vec<(bool, u64, &'a [u8], T)> = nodes
        .into_iter()
        .map(|(id, t)| {
            (
                stripe(digest, id, f) == own,
                weight(digest, piece, id),
                id,
                t,
            )
        })
        .collect();
    scored.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| b.1.cmp(&a.1))
            .then_with(|| b.2.cmp(a.2))
    });
    scored.into_iter().map(|(_, _, _, t)| t).collect()
}

/// The position a node at `pos` of a relay tree takes its piece from:
/// `None` for the root (the owner). Parents always sit before their
/// children.
pub fn tree_parent(pos: usize, fanout: usize) -> Option<usize> {
    (pos > 0).then(|| (pos - 1) / fanout.max(1))
}

/// Who node `me` takes piece `piece` from in its relay tree, when that is
/// not the owner itself.
///
/// The tree is laid out over the piece's `owner` (the root) and the nodes
/// known to pull the blob (`pulling`: `me` among them) in [`relay_rank`]
/// order: the node at position `i` takes the piece from the one at
/// [`tree_parent`]`(i)`, and passes it on to its own children while it
/// still arrives. So each node uploads each piece it takes to at most
/// `fanout` others, and the owner uploads it to as many, not to every
/// node.
///
/// Requests cannot loop whatever each node's view of the cluster: a parent
/// always comes before its child in relay order (the owner, the root, is
/// asked as the owner, never as a relay), so every chain of relay requests
/// climbs that order and ends at the owner. `None`: `me` is the owner, is
/// not among `pulling`, or is a child of the owner.
pub fn relay_parent<T: Copy + PartialEq>(
    digest: &str,
    piece: u64,
    owner: T,
    pulling: &[(&[u8], T)],
    me: T,
    fanout: usize,
) -> Option<T> {
    if owner == me {
        return None;
    }
    let order: Vec<T> = std::iter::once(owner)
        .chain(
            relay_rank(digest, piece, pulling.iter().map(|(b, t)| (*b, *t)), fanout)
                .into_iter()
                .filter(|t| *t != owner),
        )
        .collect();
    let pos = order.iter().position(|t| *t == me)?;
    let parent = order[tree_parent(pos, fanout)?];
    (parent != owner).then_some(parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    fn ids(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("node-{i}").into_bytes()).collect()
    }

    /// `nodes` with their indices, as `rank` and the relay order take them.
    fn indexed(nodes: &[Vec<u8>]) -> Vec<(&[u8], usize)> {
        nodes
            .iter()
            .enumerate()
            .map(|(i, v)| (v.as_slice(), i))
            .collect()
    }

    fn refs(nodes: &[Vec<u8>]) -> Vec<&[u8]> {
        nodes.iter().map(|v| v.as_slice()).collect()
    }

    /// Every piece's owner, as node ids, round by round.
    fn owners_of(digest: &str, pieces: u64, nodes: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let r = refs(nodes);
        (0..pieces.div_ceil(ROUND))
            .flat_map(|round| round_owners(digest, round, pieces, &r))
            .map(|i| nodes[i].clone())
            .collect()
    }

    #[test]
    fn every_node_agrees_whatever_the_order() {
        let nodes = ids(8);
        let mut reversed = nodes.clone();
        reversed.reverse();
        assert_eq!(owners_of(D, 300, &nodes), owners_of(D, 300, &reversed));
        for piece in 0..64 {
            let a: Vec<&[u8]> = rank(D, piece, nodes.iter().map(|v| (v.as_slice(), v.as_slice())));
            let b: Vec<&[u8]> = rank(
                D,
                piece,
                reversed.iter().map(|v| (v.as_slice(), v.as_slice())),
            );
            assert_eq!(a, b);
            let o = owner(D, piece, 64, &refs(&nodes)).unwrap();
            assert_eq!(nodes[o], owners_of(D, 64, &nodes)[piece as usize]);
        }
        assert_eq!(owner(D, 0, 64, &[]), None);
    }

    #[test]
    fn every_member_owns_its_fair_share() {
        for (n, pieces) in [
            (8, 32),
            (8, 1280),
            (3, 32),
            (100, 1280),
            (1000, 300),
            (5, 1),
        ] {
            let nodes = ids(n);
            let owners = owners_of(D, pieces, &nodes);
            assert_eq!(owners.len() as u64, pieces);
            // Per round, the floor or the ceiling of the round's mean.
            for (round, chunk) in owners.chunks(ROUND as usize).enumerate() {
                let cap = (chunk.len() as u64).div_ceil(n as u64);
                for id in &nodes {
                    let c = chunk.iter().filter(|o| *o == id).count() as u64;
                    assert!(
                        c <= cap,
                        "N = {n}, {pieces} pieces, round {round}: {c} pieces, cap {cap}"
                    );
                }
            }
        }
        // The case rendezvous alone gets wrong: 8 of 32 where the mean is 4.
        let nodes = ids(8);
        let owners = owners_of(D, 32, &nodes);
        for id in &nodes {
            assert_eq!(owners.iter().filter(|o| *o == id).count(), 4);
        }
        let plain_max = nodes
            .iter()
            .map(|id| {
                (0..32)
                    .filter(|&p| {
                        rank(D, p, nodes.iter().map(|v| (v.as_slice(), v.as_slice())))[0] == id
                    })
                    .count()
            })
            .max();
        assert!(
            plain_max > Some(4),
            "{plain_max:?}: the draw was even anyway"
        );
    }

    #[test]
    fn a_rounds_first_piece_goes_to_its_top_ranked_member() {
        // Before the blob's size is known, a node can still agree on
        // piece 0.
        let nodes = ids(8);
        for pieces in [1, 7, 32, 1000] {
            let top = rank(D, 0, nodes.iter().map(|v| (v.as_slice(), v.clone())))[0].clone();
            assert_eq!(owners_of(D, pieces, &nodes)[0], top);
        }
    }

    #[test]
    fn weights_spread_evenly() {
        let nodes = ids(8);
        let mut counts = vec![0usize; nodes.len()];
        let pieces = 8000;
        for piece in 0..pieces {
            let top = rank(
                D,
                piece,
                nodes.iter().enumerate().map(|(i, v)| (v.as_slice(), i)),
            )[0];
            counts[top] += 1;
        }
        let fair = pieces as usize / nodes.len();
        for c in counts {
            assert!(
                c.abs_diff(fair) < fair / 10,
                "{c} pieces, fair share {fair}"
            );
        }
    }

    /// Of the pieces not owned by the member that leaves (or that joins),
    /// the share whose owner changes.
    fn moved(n: usize, pieces: u64) -> (f64, f64) {
        let nodes = ids(n + 1);
        let (with, without) = (&nodes[..], &nodes[..n]);
        let joiner = &nodes[n];
        let (a, b) = (owners_of(D, pieces, without), owners_of(D, pieces, with));
        let kept = a.iter().zip(&b).filter(|(_, y)| *y != joiner);
        let total = kept.clone().count() as f64;
        let moved = kept.filter(|(x, y)| x != y).count() as f64;
        // Leaving: the same pair of lists read the other way.
        let left = b.iter().zip(&a).filter(|(x, _)| *x != joiner);
        let total_l = left.clone().count() as f64;
        let moved_l = left.filter(|(x, y)| x != y).count() as f64;
        (moved / total, moved_l / total_l)
    }

    #[test]
    fn a_member_that_joins_or_leaves_moves_few_other_pieces() {
        // Plain rendezvous moves none; the bound moves some (the module's
        // doc gives these figures).
        for (n, pieces, most) in [(8, 32, 0.25), (8, 1280, 0.05), (100, 1280, 0.08)] {
            let (join, leave) = moved(n, pieces);
            assert!(
                join <= most && leave <= most,
                "N = {n}, {pieces} pieces: {join:.3} moved on a join, {leave:.3} on a leave"
            );
        }
        // The fallback order is plain rendezvous: a member that leaves
        // changes nobody else's place in it.
        let nodes = ids(8);
        for piece in 0..512 {
            let all: Vec<&[u8]> =
                rank(D, piece, nodes.iter().map(|v| (v.as_slice(), v.as_slice())));
            let fewer: Vec<&[u8]> = rank(
                D,
                piece,
                nodes[..7].iter().map(|v| (v.as_slice(), v.as_slice())),
            );
            let kept: Vec<&[u8]> = all
                .into_iter()
                .filter(|v| *v != nodes[7].as_slice())
                .collect();
            assert_eq!(kept, fewer, "piece {piece}");
        }
    }

    #[test]
    fn owner_order_puts_the_owner_first_then_the_ranking() {
        let nodes = ids(6);
        let pairs = indexed(&nodes);
        for piece in 0..16 {
            let r = ranked(&nodes, piece);
            for o in 0..nodes.len() {
                let order = owner_order(D, piece, o, &pairs);
                let rest: Vec<usize> = r.iter().copied().filter(|&i| i != o).collect();
                assert_eq!(order[0], o);
                assert_eq!(order[1..], rest[..]);
            }
        }
    }

    #[test]
    fn different_blobs_rank_differently() {
        let nodes = ids(4);
        let other = "sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9";
        let (a, b) = (owners_of(D, 64, &nodes), owners_of(other, 64, &nodes));
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(differ > 20, "only {differ} of 64 pieces differ");
    }

    /// Node indices ranked for `piece`.
    fn ranked(nodes: &[Vec<u8>], piece: u64) -> Vec<usize> {
        rank(
            D,
            piece,
            nodes.iter().enumerate().map(|(i, v)| (v.as_slice(), i)),
        )
    }

    /// `plan` with node `me` as this node, `holders` holding the blob.
    fn plan_for(
        nodes: &[Vec<u8>],
        piece: u64,
        me: usize,
        holders: &[usize],
        failed: &[usize],
    ) -> Vec<usize> {
        let h: Vec<(&[u8], usize)> = holders.iter().map(|&i| (nodes[i].as_slice(), i)).collect();
        let m = ranked(nodes, piece)
            .into_iter()
            .map(|i| (i != me).then_some(i));
        plan(D, piece, &h, m, |i| failed.contains(i))
    }

    #[test]
    fn cold_the_owner_or_nobody() {
        let nodes = ids(6);
        for piece in 0..32 {
            let r = ranked(&nodes, piece);
            let owner = r[0];
            for me in 0..nodes.len() {
                let p = plan_for(&nodes, piece, me, &[], &[]);
                if me == owner {
                    assert!(p.is_empty(), "piece {piece}: the owner asks nobody");
                } else {
                    assert_eq!(p, vec![owner], "piece {piece}");
                }
            }
            // A failed owner: the next one, unless that is this node.
            let me = r[2];
            assert_eq!(plan_for(&nodes, piece, me, &[], &[owner]), vec![r[1]]);
            assert!(plan_for(&nodes, piece, r[1], &[], &[owner]).is_empty());
        }
    }

    #[test]
    fn an_owner_that_holds_nothing_goes_before_the_holders() {
        // After a scale-to-zero: node 0 is the seed, 1..=4 pull afresh.
        let nodes = ids(5);
        let mut from_seed = 0;
        for piece in 0..64 {
            let r = ranked(&nodes, piece);
            let owner = r[0];
            for me in 1..5 {
                let p = plan_for(&nodes, piece, me, &[0], &[]);
                if owner == 0 {
                    // The seed owns it: the seed, then the best non-holder
                    // that is not this node (if it ranks before this node).
                    assert_eq!(p[0], 0, "piece {piece}");
                    assert!(p.len() <= 2);
                } else if owner == me {
                    assert_eq!(
                        p,
                        vec![0],
                        "piece {piece}: the owner takes it from the seed"
                    );
                    from_seed += 1;
                } else {
                    assert_eq!(p, vec![owner, 0], "piece {piece}");
                }
            }
        }
        // Each piece the seed does not own leaves it once, to its owner.
        let seed_owned = (0..64).filter(|&p| ranked(&nodes, p)[0] == 0).count();
        assert_eq!(from_seed, 64 - seed_owned);
    }

    #[test]
    fn serving_downloads_ask_holders_only() {
        let nodes = ids(5);
        let h: Vec<(&[u8], usize)> = [1usize, 3]
            .iter()
            .map(|&i| (nodes[i].as_slice(), i))
            .collect();
        for piece in 0..16 {
            let mut p = plan(D, piece, &h, std::iter::empty(), |_| false);
            p.sort();
            assert_eq!(p, vec![1, 3]);
        }
    }

    #[test]
    fn a_failed_holder_is_passed_over() {
        let nodes = ids(4);
        for piece in 0..16 {
            let r = ranked(&nodes, piece);
            let me = r[3];
            // Every other node holds the blob but the top one failed: the
            // holders list (the caller already dropped failed holders)
            // comes first, nobody else is added.
            let p = plan_for(&nodes, piece, me, &[r[1], r[2]], &[r[0]]);
            assert_eq!(p.len(), 2, "piece {piece}: {p:?}");
            assert!(!p.contains(&r[0]));
        }
    }

    #[test]
    fn relay_trees_climb_the_ranking_and_spread_the_uploads() {
        let nodes = ids(16);
        let all = indexed(&nodes);
        let mut uploads = vec![0usize; nodes.len()];
        let pieces = 512;
        for piece in 0..pieces {
            let owner = ranked(&nodes, piece)[0];
            let mut r = vec![owner];
            r.extend(
                relay_rank(D, piece, all.iter().copied(), RELAY_FANOUT)
                    .into_iter()
                    .filter(|&i| i != owner),
            );
            let pos = |i: usize| r.iter().position(|&x| x == i).unwrap();
            let mut children = vec![0usize; nodes.len()];
            for me in 0..nodes.len() {
                let parent = relay_parent(D, piece, owner, &all, me, RELAY_FANOUT);
                if me == owner {
                    assert_eq!(parent, None);
                    continue;
                }
                let from = parent.unwrap_or(owner);
                assert!(
                    pos(from) < pos(me),
                    "piece {piece}: {me} asks {from}, ranked below it"
                );
                children[from] += 1;
            }
            assert!(
                children.iter().all(|&c| c <= RELAY_FANOUT),
                "piece {piece}: {children:?}"
            );
            for (u, c) in uploads.iter_mut().zip(&children) {
                *u += c;
            }
        }
        // Each piece goes to 15 nodes: the mean node uploads 15/16 of the
        // pieces; none more than twice that.
        let mean = uploads.iter().sum::<usize>() as f64 / nodes.len() as f64;
        for u in &uploads {
            assert!((*u as f64) < 2.0 * mean, "{uploads:?}");
        }
    }

    #[test]
    fn relay_parents_stay_above_their_children_in_any_view() {
        // Two nodes that know different sets of pullers still never ask
        // each other both ways: every ask climbs the weights.
        let nodes = ids(12);
        for piece in 0..64 {
            let r = ranked(&nodes, piece);
            let owner = r[0];
            let f = RELAY_FANOUT;
            let key = |i: usize| {
                (
                    stripe(D, &nodes[i], f) == piece as usize % f,
                    weight(D, piece, &nodes[i]),
                )
            };
            for drop in 0..nodes.len() {
                let view: Vec<(&[u8], usize)> = nodes
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != drop)
                    .map(|(i, v)| (v.as_slice(), i))
                    .collect();
                for me in (0..nodes.len()).filter(|&i| i != drop) {
                    if let Some(p) = relay_parent(D, piece, owner, &view, me, RELAY_FANOUT) {
                        assert!(key(p) > key(me), "piece {piece}: {me} asks {p}");
                    }
                }
            }
            // Not among the pullers: no tree for it.
            let few: Vec<(&[u8], usize)> = vec![(nodes[r[1]].as_slice(), r[1])];
            assert_eq!(
                relay_parent(D, piece, owner, &few, r[5], RELAY_FANOUT),
                None
            );
        }
    }

    #[test]
    fn tree_parents() {
        assert_eq!(tree_parent(0, 2), None);
        assert_eq!(
            (1..7)
                .map(|i| tree_parent(i, 2).unwrap())
                .collect::<Vec<_>>(),
            vec![0, 0, 1, 1, 2, 2]
        );
        assert_eq!(
            (1..4)
                .map(|i| tree_parent(i, 1).unwrap())
                .collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
    }
}
