//! A scale model of the swarm's piece schedule, for more nodes than fit on
//! one machine.
//!
//! It runs the same assignment code as the daemon ([`super::rendezvous`]):
//! the piece's owner ([`rendezvous::round_owners`], balanced; or the
//! top-ranked member with `balanced: false`, the assignment before it)
//! fetches it from the origin, and every other node takes
//! it from its parent in the piece's relay tree ([`rendezvous::relay_rank`] and
//! [`rendezvous::tree_parent`], the parts of [`rendezvous::relay_parent`]),
//! or from the owner itself with `fanout: 0` (the schedule before relay
//! trees). Every node asks for the blob's pieces in order, at most `window`
//! at a time (`swarm.max_piece_transfers`); a node asked for a piece it has
//! not started starts it at once, outside its window, as the daemon does,
//! and passes on only bytes it already has (less `relay_lag`: the chunk a
//! relay holds before it can forward it). Bandwidth is a fluid shared
//! max-min fairly in each time step ([`max_min_shares`], as TCP flows on
//! shared links roughly are) between every node's upload, its download and
//! the origin's link; `max_min: false` gives the model's first, cruder
//! allocation ([`equal_shares`]: equal shares, the unused part lost). No
//! CPU or losses, and no latency but one step per hop ([`ModelParams::step`]):
//! it says what the schedule allows, and the lab says what the code does.

use super::rendezvous;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct ModelParams {
    pub nodes: usize,
    /// Blob size in bytes.
    pub blob: u64,
    pub piece_size: u64,
    /// Each node's upload and download, bytes per second.
    pub node_bandwidth: f64,
    /// The origin's link, bytes per second.
    pub origin_bandwidth: f64,
    /// Pieces a node fetches at once.
    pub window: usize,
    /// Simulation step in seconds. It is also the model's one latency: a
    /// byte that reaches a relay in one step is passed on in the next, and
    /// a piece asked for in one step starts to move in the next, so each
    /// hop of a relay tree costs a step at the start of every piece. A
    /// coarse step is not only less precise but a slower network: at 1,000
    /// nodes (ten hops) 0.05 s gives 1.43x the ideal where 0.01 s gives
    /// 1.25x (docs/benchmarks.md, "A step is a hop").
    pub step: f64,
    /// Children per node in each piece's relay tree; 0: every node takes
    /// each piece from its owner.
    pub fanout: usize,
    /// Bytes a relay holds back of a piece it is still receiving.
    pub relay_lag: f64,
    /// Max-min fair shares of the links ([`max_min_shares`]); else equal
    /// shares, the model's first allocation ([`equal_shares`]).
    pub max_min: bool,
    /// Owners balanced over each round of pieces, as the daemon assigns
    /// them ([`rendezvous::round_owners`]); else each piece's top-ranked
    /// node, the daemon's assignment before it.
    pub balanced: bool,
}

/// What the model says.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelResult {
    /// When the last node had the whole blob.
    pub slowest: f64,
    pub median: f64,
    /// Bytes the origin sent, over the blob size.
    pub origin_ratio: f64,
    /// `blob / min(origin, node bandwidth)`.
    pub ideal: f64,
    /// The most pieces one node fetched from the origin, and the mean.
    pub max_owned: usize,
    pub mean_owned: f64,
    /// The most bytes one node uploaded to others, over the mean.
    pub max_upload_ratio: f64,
}

struct Flow {
    node: usize,
    piece: usize,
    /// `None`: the origin.
    from: Option<usize>,
}

/// Runs the model. Node ids are `node-<i>` (any distinct ids rank the same
/// way on average).
pub fn simulate(p: &ModelParams) -> ModelResult {
    let n = p.nodes.max(1);
    let pieces = p.blob.div_ceil(p.piece_size).max(1) as usize;
    let len = |k: usize| -> f64 {
        let start = k as u64 * p.piece_size;
        (p.blob.min(start + p.piece_size) - start) as f64
    };
    let digest = "sha256:model";
    let ids: Vec<Vec<u8>> = (0..n).map(|i| format!("node-{i}").into_bytes()).collect();
    // source[k][i]: where node i takes piece k from (`None`: the origin).
    let mut owner = vec![0usize; pieces];
    let id_refs: Vec<&[u8]> = ids.iter().map(|v| v.as_slice()).collect();
    let balanced: Vec<usize> = if p.balanced {
        (0..(pieces as u64).div_ceil(rendezvous::ROUND))
            .flat_map(|round| rendezvous::round_owners(digest, round, pieces as u64, &id_refs))
            .collect()
    } else {
        Vec::new()
    };
    let source: Vec<Vec<Option<usize>>> = (0..pieces)
        .map(|k| {
            let ranked = |nodes: &mut dyn Iterator<Item = (&[u8], usize)>| {
                if p.fanout > 0 {
                    rendezvous::relay_rank(digest, k as u64, nodes, p.fanout)
                } else {
                    rendezvous::rank(digest, k as u64, nodes)
                }
            };
            let top = balanced.get(k).copied().unwrap_or_else(|| {
                rendezvous::rank(
                    digest,
                    k as u64,
                    ids.iter().enumerate().map(|(i, v)| (v.as_slice(), i)),
                )[0]
            });
            let order: Vec<usize> = std::iter::once(top)
                .chain(
                    ranked(&mut ids.iter().enumerate().map(|(i, v)| (v.as_slice(), i)))
                        .into_iter()
                        .filter(|&i| i != top),
                )
                .collect();
            owner[k] = order[0];
            let mut from = vec![None; n];
            for (pos, &i) in order.iter().enumerate().skip(1) {
                from[i] = Some(match rendezvous::tree_parent(pos, p.fanout) {
                    Some(parent) if p.fanout > 0 => order[parent],
                    _ => order[0],
                });
            }
            from
        })
        .collect();
    let mut uploaded = vec![0f64; n];
    // have[i][k]: bytes of piece k on node i.
    let mut have = vec![vec![0f64; pieces]; n];
    let mut next = vec![0usize; n];
    let mut done_at = vec![f64::NAN; n];
    let mut flows: Vec<Flow> = Vec::new();
    let mut active: std::collections::HashSet<(usize, usize)> = Default::default();
    let mut per_node = vec![0usize; n];
    let mut origin_bytes = 0f64;
    let mut t = 0f64;
    // A generous bound: a hundred times the slowest conceivable schedule.
    let limit = 100.0 * p.blob as f64 / p.node_bandwidth.min(p.origin_bandwidth) + 10.0;
    let complete = |have: &[Vec<f64>], i: usize, k: usize| have[i][k] >= len(k) - 0.5;
    while t < limit {
        // Start transfers up to the window, in piece order.
        for i in 0..n {
            if !done_at[i].is_nan() {
                continue;
            }
            while per_node[i] < p.window && next[i] < pieces {
                let k = next[i];
                next[i] += 1;
                if complete(&have, i, k) || active.contains(&(i, k)) {
                    continue;
                }
                // Asked for a piece it has not started, a node starts it at
                // once, outside its window, and so on up its tree.
                let mut node = i;
                while !complete(&have, node, k) && active.insert((node, k)) {
                    flows.push(Flow {
                        node,
                        piece: k,
                        from: source[k][node],
                    });
                    per_node[node] += 1;
                    match source[k][node] {
                        Some(up) => node = up,
                        None => break,
                    }
                }
            }
        }
        // What each flow could take this step: what is left of the piece,
        // and no more than its sender already has.
        let demand: Vec<f64> = flows
            .iter()
            .map(|f| {
                let mut d = len(f.piece) - have[f.node][f.piece];
                if let Some(s) = f.from {
                    let lag = if complete(&have, s, f.piece) {
                        0.0
                    } else {
                        p.relay_lag
                    };
                    d = d.min((have[s][f.piece] - lag - have[f.node][f.piece]).max(0.0));
                }
                d.max(0.0)
            })
            .collect();
        let moves = if p.max_min {
            max_min_shares(p, n, &flows, &demand)
        } else {
            equal_shares(p, n, &flows, &demand, &per_node)
        };
        for (f, bytes) in flows.iter().zip(&moves) {
            have[f.node][f.piece] += bytes;
            match f.from {
                None => origin_bytes += bytes,
                Some(s) => uploaded[s] += bytes,
            }
        }
        t += p.step;
        flows.retain(|f| {
            let keep = !complete(&have, f.node, f.piece);
            if !keep {
                active.remove(&(f.node, f.piece));
                per_node[f.node] -= 1;
            }
            keep
        });
        for i in 0..n {
            if done_at[i].is_nan() && next[i] >= pieces && per_node[i] == 0 {
                done_at[i] = t;
            }
        }
        if done_at.iter().all(|d| !d.is_nan()) {
            break;
        }
    }
    let mut times: Vec<f64> = done_at
        .iter()
        .map(|d| if d.is_nan() { f64::INFINITY } else { *d })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let mut owned = vec![0usize; n];
    for o in &owner {
        owned[*o] += 1;
    }
    ModelResult {
        slowest: *times.last().unwrap_or(&0.0),
        median: times[times.len() / 2],
        origin_ratio: origin_bytes / p.blob as f64,
        ideal: p.blob as f64 / p.node_bandwidth.min(p.origin_bandwidth),
        max_owned: owned.iter().copied().max().unwrap_or(0),
        mean_owned: pieces as f64 / n as f64,
        max_upload_ratio: {
            let mean = uploaded.iter().sum::<f64>() / n as f64;
            if mean > 0.0 {
                uploaded.iter().copied().fold(0.0, f64::max) / mean
            } else {
                0.0
            }
        },
    }
}

/// Each sender's upload (the origin's link for origin pieces) and each
/// receiver's download split equally between their flows; a flow gets the
/// smaller of its two shares, and what it cannot use is lost.
fn equal_shares(
    p: &ModelParams,
    n: usize,
    flows: &[Flow],
    demand: &[f64],
    per_node: &[usize],
) -> Vec<f64> {
    let mut up = vec![0usize; n];
    let mut origin_flows = 0usize;
    for f in flows {
        match f.from {
            Some(s) => up[s] += 1,
            None => origin_flows += 1,
        }
    }
    flows
        .iter()
        .zip(demand)
        .map(|(f, d)| {
            let send = match f.from {
                Some(s) => p.node_bandwidth / up[s] as f64,
                None => p.origin_bandwidth / origin_flows as f64,
            };
            let recv = p.node_bandwidth / per_node[f.node].max(1) as f64;
            (send.min(recv) * p.step).min(*d)
        })
        .collect()
}

/// Max-min fair shares (progressive filling), as TCP flows that share
/// links tend to get: every flow's rate grows alike until a link it uses
/// is full or it has all it can take; the others go on growing. Bounded
/// to a few dozen rounds per step; flows still growing then keep what
/// they have (the error is on the slow side).
fn max_min_shares(p: &ModelParams, n: usize, flows: &[Flow], demand: &[f64]) -> Vec<f64> {
    // Links: node i's upload (i), its download (n + i), the origin (2n).
    let res = |f: &Flow| -> [usize; 2] {
        match f.from {
            Some(s) => [s, n + f.node],
            None => [2 * n, n + f.node],
        }
    };
    let mut left: Vec<f64> = (0..=2 * n)
        .map(|r| {
            if r == 2 * n {
                p.origin_bandwidth * p.step
            } else {
                p.node_bandwidth * p.step
            }
        })
        .collect();
    let mut users = vec![0usize; 2 * n + 1];
    let mut growing: Vec<bool> = demand.iter().map(|d| *d > 1e-9).collect();
    for (f, g) in flows.iter().zip(&growing) {
        if *g {
            for r in res(f) {
                users[r] += 1;
            }
        }
    }
    let mut rate = vec![0f64; flows.len()];
    for _ in 0..48 {
        let mut inc = f64::INFINITY;
        for (r, u) in users.iter().enumerate() {
            if *u > 0 {
                inc = inc.min(left[r] / *u as f64);
            }
        }
        for (i, g) in growing.iter().enumerate() {
            if *g {
                inc = inc.min(demand[i] - rate[i]);
            }
        }
        if !inc.is_finite() || inc <= 1e-9 {
            break;
        }
        for (r, u) in users.iter().enumerate() {
            left[r] -= inc * *u as f64;
        }
        let mut any = false;
        for (i, f) in flows.iter().enumerate() {
            if !growing[i] {
                continue;
            }
            rate[i] += inc;
            let full = res(f).iter().any(|r| left[*r] <= 1e-6);
            if full || rate[i] >= demand[i] - 1e-9 {
                growing[i] = false;
                for r in res(f) {
                    users[r] -= 1;
                }
            } else {
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    rate
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn params(nodes: usize, node_mbit: f64, origin_mbit: f64) -> ModelParams {
        ModelParams {
            nodes,
            blob: 256 * MIB,
            piece_size: 8 * MIB,
            node_bandwidth: node_mbit * 1e6 / 8.0,
            origin_bandwidth: origin_mbit * 1e6 / 8.0,
            window: 8,
            step: 0.01,
            fanout: rendezvous::RELAY_FANOUT,
            relay_lag: (MIB / 4) as f64,
            max_min: true,
            balanced: true,
        }
    }

    #[test]
    fn one_node_takes_the_blob_over_the_tighter_link() {
        for (node, origin) in [(400.0, 400.0), (1000.0, 200.0), (200.0, 1000.0)] {
            let r = simulate(&params(1, node, origin));
            assert!((r.origin_ratio - 1.0).abs() < 1e-6, "{r:?}");
            let ratio = r.slowest / r.ideal;
            assert!(
                (0.99..1.02).contains(&ratio),
                "node {node}, origin {origin}: {r:?}"
            );
        }
    }

    #[test]
    fn owners_alone_are_bound_by_the_busiest_owner() {
        // Owners by rendezvous alone, whose busiest owner holds several
        // pieces: balanced, each of 32 owns one, and the in-order windows
        // (not the busiest owner) set the pace.
        for nodes in [2, 8, 32] {
            let p = ModelParams {
                fanout: 0,
                balanced: false,
                ..params(nodes, 400.0, 400.0)
            };
            let r = simulate(&p);
            assert!((r.origin_ratio - 1.0).abs() < 1e-6, "{nodes} nodes: {r:?}");
            // Every other node takes each of an owner's pieces from it: the
            // owner with the most pieces uploads max_owned * (N - 1) pieces.
            let busiest =
                r.max_owned as f64 * (nodes - 1) as f64 * p.piece_size as f64 / p.node_bandwidth;
            let bound = r.ideal.max(busiest);
            let ratio = r.slowest / bound;
            // In-order windows leave some upload idle: within 1.6x of it.
            assert!(
                (0.95..1.6).contains(&ratio),
                "{nodes} nodes, bound {bound} s: {r:?}"
            );
        }
    }

    #[test]
    fn relay_trees_keep_a_burst_near_the_ideal() {
        for nodes in [2, 8, 32] {
            let trees = simulate(&params(nodes, 400.0, 400.0));
            let owners = simulate(&ModelParams {
                fanout: 0,
                ..params(nodes, 400.0, 400.0)
            });
            assert!(
                (trees.origin_ratio - 1.0).abs() < 1e-6,
                "{nodes} nodes: {trees:?}"
            );
            // 256 MiB is 32 pieces: the in-order windows leave a tail.
            assert!(
                trees.slowest / trees.ideal < 1.6,
                "{nodes} nodes: {trees:?}"
            );
            assert!(trees.max_upload_ratio < 2.0, "{nodes} nodes: {trees:?}");
            if nodes >= 8 {
                assert!(
                    trees.slowest < owners.slowest,
                    "{trees:?} against {owners:?}"
                );
            }
        }
    }

    #[test]
    fn smaller_pieces_spread_the_owners_load() {
        let mut p = ModelParams {
            fanout: 0,
            ..params(8, 400.0, 400.0)
        };
        let big = simulate(&p);
        p.piece_size = MIB;
        let small = simulate(&p);
        assert!(
            small.slowest < big.slowest,
            "1 MiB pieces {small:?} against 8 MiB {big:?}"
        );
    }

    #[test]
    fn each_hop_costs_a_step() {
        // 64 nodes make trees six hops deep: a coarser step is a slower
        // network there, by about a step per hop per piece, and barely
        // matters for two nodes (one hop).
        let at = |nodes: usize, step: f64| {
            simulate(&ModelParams {
                step,
                ..params(nodes, 400.0, 400.0)
            })
        };
        let (fine, coarse) = (at(64, 0.01), at(64, 0.05));
        assert!(
            coarse.slowest > fine.slowest * 1.025,
            "0.05 s {coarse:?} against 0.01 s {fine:?}"
        );
        let (fine, coarse) = (at(2, 0.01), at(2, 0.05));
        assert!(
            coarse.slowest < fine.slowest * 1.025,
            "0.05 s {coarse:?} against 0.01 s {fine:?}"
        );
    }

    #[test]
    fn a_slow_origin_bounds_the_burst() {
        let r = simulate(&params(8, 1000.0, 100.0));
        let ratio = r.slowest / r.ideal;
        assert!((0.99..1.2).contains(&ratio), "{r:?}");
    }

    #[test]
    fn without_the_swarm_n_nodes_would_take_n_times_longer() {
        // The baseline the model is read against: N clients sharing the
        // origin's link need N times the ideal; the swarm model does not.
        let one = simulate(&params(1, 400.0, 400.0)).slowest;
        let eight = simulate(&params(8, 400.0, 400.0)).slowest;
        assert!(
            eight < 2.0 * one,
            "8 nodes {eight} s against 1 node {one} s"
        );
    }
}
