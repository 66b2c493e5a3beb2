//! Which node fetches a piece from the origin: rendezvous (highest random
//! weight) hashing of (digest, piece) over the live members.
//!
//! Every node computes the same ranking from the same member list, with no
//! coordinator and no messages: the top-ranked member is the piece's owner
//! and fetches it from the origin; the others take it from the owner. When a
//! member leaves, only the pieces it owned move (to their second-ranked
//! member); when one joins, it takes over about 1/N of the pieces. Nodes
//! whose member lists briefly differ (a heartbeat in flight) disagree only
//! about the pieces of the member that differs.

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

/// The owner of a piece: the highest-weight node.
pub fn owner<'a>(
    digest: &str,
    piece: u64,
    nodes: impl IntoIterator<Item = &'a [u8]>,
) -> Option<&'a [u8]> {
    nodes.into_iter().max_by(|a, b| {
        weight(digest, piece, a)
            .cmp(&weight(digest, piece, b))
            .then_with(|| a.cmp(b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    fn ids(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("node-{i}").into_bytes()).collect()
    }

    #[test]
    fn every_node_agrees_whatever_the_order() {
        let nodes = ids(8);
        let mut reversed = nodes.clone();
        reversed.reverse();
        for piece in 0..64 {
            let a = owner(D, piece, nodes.iter().map(|v| v.as_slice()));
            let b = owner(D, piece, reversed.iter().map(|v| v.as_slice()));
            assert_eq!(a, b);
            let r: Vec<&[u8]> = rank(D, piece, nodes.iter().map(|v| (v.as_slice(), v.as_slice())));
            assert_eq!(Some(r[0]), a);
        }
    }

    #[test]
    fn pieces_spread_evenly() {
        let nodes = ids(8);
        let mut counts = vec![0usize; nodes.len()];
        let pieces = 8000;
        for piece in 0..pieces {
            let o = owner(D, piece, nodes.iter().map(|v| v.as_slice())).unwrap();
            counts[nodes.iter().position(|n| n == o).unwrap()] += 1;
        }
        let fair = pieces as usize / nodes.len();
        for c in counts {
            assert!(
                c.abs_diff(fair) < fair / 10,
                "{c} pieces, fair share {fair}"
            );
        }
    }

    #[test]
    fn a_leaving_node_moves_only_its_own_pieces() {
        let nodes = ids(8);
        let fewer: Vec<&[u8]> = nodes[..7].iter().map(|v| v.as_slice()).collect();
        for piece in 0..512 {
            let before = owner(D, piece, nodes.iter().map(|v| v.as_slice())).unwrap();
            let after = owner(D, piece, fewer.iter().copied()).unwrap();
            if before != nodes[7].as_slice() {
                assert_eq!(
                    before, after,
                    "piece {piece} moved although its owner stayed"
                );
            }
        }
    }

    #[test]
    fn different_blobs_rank_differently() {
        let nodes = ids(4);
        let other = "sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9";
        let differ = (0..64)
            .filter(|&p| {
                owner(D, p, nodes.iter().map(|v| v.as_slice()))
                    != owner(other, p, nodes.iter().map(|v| v.as_slice()))
            })
            .count();
        assert!(differ > 20, "only {differ} of 64 pieces differ");
    }
}
