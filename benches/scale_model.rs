//! The swarm's scale model (`damselfly::swarm::model`) for more nodes than
//! fit on one machine: the same rendezvous assignment and in-order piece
//! windows as the daemon, with bandwidth as a fluid and no CPU cost.
//!
//! ```text
//! cargo bench --bench scale_model
//! ```
//!
//! Settings (environment): `DAMSELFLY_MODEL_BLOB_MIB` (256),
//! `DAMSELFLY_MODEL_NODE_MBIT` and `DAMSELFLY_MODEL_ORIGIN_MBIT` (400 each,
//! as in `benches/swarm.rs`, so N = 2, 4, 8 can be read against its
//! measured points), `DAMSELFLY_MODEL_NODES` (`2,4,8,10,100,1000`),
//! `DAMSELFLY_MODEL_PIECE_MIB` (`8,1`), `DAMSELFLY_MODEL_FANOUT` (`2,0`:
//! relay trees of two, and 0 for owners alone, the schedule before them),
//! `DAMSELFLY_MODEL_WINDOW` (the daemon's
//! `swarm.max_piece_transfers` default), `DAMSELFLY_MODEL_SHARES` (`max-min`, or
//! `equal` for the model's first allocation), `DAMSELFLY_MODEL_STEP` (0.01:
//! seconds per step, which is also each hop's latency),
//! `DAMSELFLY_MODEL_LAG_KIB` (256: what a relay holds back of a piece it is
//! still receiving; the daemon's `RELAY_BATCH`), `DAMSELFLY_MODEL_BALANCE`
//! (`1`: owners balanced as the daemon assigns them; `0`: each piece's
//! top-ranked node, the assignment before it).

use damselfly::swarm::model::{simulate, ModelParams};

/// A setting from the environment; a value that does not parse stops the
/// bench with its name, rather than running on the default unseen.
fn env_f64(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(x) if x.is_finite() && x >= 0.0 => x,
            _ => panic!("{name}={v:?} is not a number of zero or more"),
        },
    }
}

/// A comma-separated list of whole numbers from the environment, checked
/// as [`env_f64`] is.
fn env_list(name: &str, default: &str) -> Vec<u64> {
    let v = std::env::var(name).unwrap_or_else(|_| default.into());
    v.split(',')
        .map(|x| {
            x.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}={v:?}: {x:?} is not a whole number"))
        })
        .collect()
}

fn main() {
    let blob_mib = env_f64("DAMSELFLY_MODEL_BLOB_MIB", 256.0) as u64;
    let node_mbit = env_f64("DAMSELFLY_MODEL_NODE_MBIT", 400.0);
    let origin_mbit = env_f64("DAMSELFLY_MODEL_ORIGIN_MBIT", 400.0);
    let nodes = env_list("DAMSELFLY_MODEL_NODES", "2,4,8,10,100,1000");
    let pieces = env_list("DAMSELFLY_MODEL_PIECE_MIB", "8,1");
    let fanouts = env_list("DAMSELFLY_MODEL_FANOUT", "2,0");
    // The daemon's own default unless told otherwise.
    let default_window = damselfly::config::Config::defaults()
        .map(|c| c.swarm.max_piece_transfers)
        .unwrap_or(16);
    let window = env_f64("DAMSELFLY_MODEL_WINDOW", default_window as f64) as usize;
    let step = env_f64("DAMSELFLY_MODEL_STEP", 0.01);
    let lag_kib = env_f64("DAMSELFLY_MODEL_LAG_KIB", 256.0);
    let max_min = match std::env::var("DAMSELFLY_MODEL_SHARES").as_deref() {
        Err(_) | Ok("max-min") => true,
        Ok("equal") => false,
        Ok(v) => panic!("DAMSELFLY_MODEL_SHARES={v:?}: `max-min` or `equal`"),
    };
    let balanced = match std::env::var("DAMSELFLY_MODEL_BALANCE").as_deref() {
        Err(_) | Ok("1") => true,
        Ok("0") => false,
        Ok(v) => panic!("DAMSELFLY_MODEL_BALANCE={v:?}: `1` or `0`"),
    };
    for (name, v) in [
        ("DAMSELFLY_MODEL_NODE_MBIT", node_mbit),
        ("DAMSELFLY_MODEL_ORIGIN_MBIT", origin_mbit),
        ("DAMSELFLY_MODEL_STEP", step),
        ("DAMSELFLY_MODEL_WINDOW", window as f64),
        ("DAMSELFLY_MODEL_BLOB_MIB", blob_mib as f64),
    ] {
        assert!(v > 0.0, "{name} must be above zero, not {v}");
    }
    assert!(
        nodes.iter().chain(&pieces).all(|&x| x > 0),
        "DAMSELFLY_MODEL_NODES and DAMSELFLY_MODEL_PIECE_MIB take numbers above zero"
    );
    println!(
        "scale model: blob {blob_mib} MiB, node links {node_mbit} Mbit/s, origin {origin_mbit} Mbit/s, window {window}, relays hold back {lag_kib} KiB, {step} s per step (and per hop), {} shares, {}\n",
        if max_min { "max-min fair" } else { "equal" },
        if balanced { "balanced owners" } else { "owners by rendezvous alone" }
    );
    println!("| N | piece | fanout | origin bytes / blob | slowest | slowest / ideal | median | most pieces one node owns (mean) | busiest uploader / mean | every node from the origin / ideal |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &n in &nodes {
        for &piece in &pieces {
            for &fanout in &fanouts {
                let p = ModelParams {
                    nodes: n as usize,
                    blob: blob_mib << 20,
                    piece_size: piece << 20,
                    node_bandwidth: node_mbit * 1e6 / 8.0,
                    origin_bandwidth: origin_mbit * 1e6 / 8.0,
                    window,
                    fanout: fanout as usize,
                    relay_lag: lag_kib * 1024.0,
                    max_min,
                    balanced,
                    // One step is one hop's latency (see `ModelParams::step`):
                    // 10 ms, more than a data centre's round trip plus the
                    // daemon's own forwarding, at every N alike.
                    step,
                };
                let r = simulate(&p);
                // Without the swarm, N clients share the origin's link.
                let direct = (n as f64 * p.blob as f64 / p.origin_bandwidth)
                    .max(p.blob as f64 / p.node_bandwidth)
                    / r.ideal;
                // The model stops at 100x the ideal; past it, say so.
                let secs = |t: f64| {
                    if t.is_finite() {
                        format!("{t:.2} s")
                    } else {
                        format!("> {:.0} s", 100.0 * r.ideal)
                    }
                };
                let ratio = if r.slowest.is_finite() {
                    format!("{:.2}x", r.slowest / r.ideal)
                } else {
                    "> 100x".into()
                };
                println!(
                "| {n} | {piece} MiB | {} | {:.3}x | {} | {ratio} | {} | {} ({:.1}) | {:.2}x | {:.1}x |",
                if fanout == 0 { "owners".to_string() } else { fanout.to_string() },
                r.origin_ratio,
                secs(r.slowest),
                secs(r.median),
                r.max_owned,
                r.mean_owned,
                r.max_upload_ratio,
                direct
            );
            }
        }
    }
}
