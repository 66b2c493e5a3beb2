//! A scale model of the swarm's piece schedule, for more nodes than fit on
//! one machine.
//!
//! It runs the same assignment code as the daemon ([`super::rendezvous`]) to
//! decide which node fetches each piece from the origin, and the same
//! schedule: every node asks for the blob's pieces in order, at most
//! `window` at a time (`swarm.max_piece_transfers`); a piece it owns comes
//! from the origin, any other from its owner, which can only pass on bytes
//! it already has (it streams pieces while they arrive). Bandwidth is a
//! fluid: in each time step every transfer gets an equal share of its
//! sender's upload (the origin's link for origin pieces) and of its
//! receiver's download, the smaller of the two. No CPU, latency or losses:
//! it says what the schedule allows, and the lab says what the code does.

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
    /// Simulation step in seconds.
    pub step: f64,
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
    let owner: Vec<usize> = (0..pieces)
        .map(|k| {
            let o = super::rendezvous::owner(digest, k as u64, ids.iter().map(|v| v.as_slice()))
                .unwrap_or(&ids[0]);
            ids.iter().position(|v| v.as_slice() == o).unwrap_or(0)
        })
        .collect();
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
                let o = owner[k];
                if o != i {
                    flows.push(Flow {
                        node: i,
                        piece: k,
                        from: Some(o),
                    });
                    active.insert((i, k));
                    per_node[i] += 1;
                    // Asked for a piece it has not started, the owner
                    // fetches it from the origin at once, outside its window.
                    if !complete(&have, o, k) && active.insert((o, k)) {
                        flows.push(Flow {
                            node: o,
                            piece: k,
                            from: None,
                        });
                        per_node[o] += 1;
                    }
                } else {
                    flows.push(Flow {
                        node: i,
                        piece: k,
                        from: None,
                    });
                    active.insert((i, k));
                    per_node[i] += 1;
                }
            }
        }
        // Equal shares of every sender's upload and receiver's download.
        let mut up = vec![0usize; n];
        let mut origin_flows = 0usize;
        for f in &flows {
            match f.from {
                Some(s) => up[s] += 1,
                None => origin_flows += 1,
            }
        }
        let mut moves: Vec<f64> = Vec::with_capacity(flows.len());
        for f in &flows {
            let send = match f.from {
                Some(s) => p.node_bandwidth / up[s] as f64,
                None => p.origin_bandwidth / origin_flows as f64,
            };
            let recv = p.node_bandwidth / per_node[f.node] as f64;
            let mut bytes = send.min(recv) * p.step;
            bytes = bytes.min(len(f.piece) - have[f.node][f.piece]);
            if let Some(s) = f.from {
                // An owner passes on only what it already has.
                bytes = bytes.min((have[s][f.piece] - have[f.node][f.piece]).max(0.0));
            }
            moves.push(bytes);
        }
        for (f, bytes) in flows.iter().zip(&moves) {
            have[f.node][f.piece] += bytes;
            if f.from.is_none() {
                origin_bytes += bytes;
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
    }
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
    fn a_burst_fetches_each_byte_once_and_is_bound_by_the_busiest_owner() {
        for nodes in [2, 8, 32] {
            let p = params(nodes, 400.0, 400.0);
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
    fn smaller_pieces_spread_the_owners_load() {
        let mut p = params(8, 400.0, 400.0);
        let big = simulate(&p);
        p.piece_size = MIB;
        let small = simulate(&p);
        assert!(
            small.slowest < big.slowest,
            "1 MiB pieces {small:?} against 8 MiB {big:?}"
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
