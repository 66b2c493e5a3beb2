//! The control plane at scale: N libp2p nodes (the daemon's own
//! [`Control`], with the cluster key) in one process on loopback, the way
//! a DaemonSet forms one: every node bootstraps from the nodes started
//! before it (what the headless Service's DNS name answers at that moment).
//! Once every node sees every other, it measures for a while what one
//! node pays for the cluster's size: TCP bytes in and out per second
//! (every protocol and the pnet, noise and yamux framing included), gossip
//! messages delivered per second, and connections. Each N runs twice: with
//! the heartbeat period that grows with the cluster (the daemon's), and
//! with the fixed 1 s period it replaced.
//!
//! ```text
//! cargo bench --bench control_plane
//! ```
//!
//! Settings (environment): `DAMSELFLY_CP_NODES` (`25,50,100`),
//! `DAMSELFLY_CP_SECONDS` (measured window, 20), `DAMSELFLY_CP_MODES`
//! (`adaptive,fixed`), `DAMSELFLY_CP_TTL_S` (`member_ttl` in seconds, 4 as
//! in the daemon; longer keeps members that a starved process hears late). Every connection has both ends in this process, two
//! file descriptors each: N nodes in full mesh need N (N - 1) of them,
//! about 20,000 (this machine's limit) at N = 100. A run whose nodes do not
//! all see each other within a minute or so is reported as failed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use damselfly::config::Role;
use damselfly::swarm::control::{Bootstrap, Control, ControlConfig};
use damselfly::swarm::MemberInfo;

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect()
}

fn config(
    i: usize,
    dir: &std::path::Path,
    bootstrap: Vec<Bootstrap>,
    adaptive: bool,
) -> ControlConfig {
    ControlConfig {
        listen: "/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr"),
        bootstrap,
        psk: Some([9; 32]),
        mdns: false,
        identity_file: Some(dir.join(format!("n{i}.key"))),
        dns_refresh: Duration::from_secs(30),
        // The daemon's defaults: `swarm.heartbeat` 1 s, four of them.
        heartbeat: Duration::from_secs(1),
        member_ttl: Duration::from_secs(
            std::env::var("DAMSELFLY_CP_TTL_S")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(4),
        ),
        adaptive_heartbeat: adaptive,
        info: MemberInfo {
            data_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 20000 + i as u16)),
            fingerprint: format!("{i:064x}"),
            role: Role::Node,
        },
    }
}

struct Row {
    n: usize,
    mode: &'static str,
    join: Duration,
    in_per_s: (f64, f64),
    out_per_s: (f64, f64),
    msgs_per_s: (f64, f64),
    members: (usize, usize),
    connected: (usize, usize),
}

fn mean_max(v: &[f64]) -> (f64, f64) {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    (mean, v.iter().copied().fold(0.0, f64::max))
}

async fn run(n: usize, adaptive: bool, window: Duration) -> Result<Row, String> {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("damselfly-cp-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut nodes: Vec<Control> = Vec::with_capacity(n);
    let mut seeds: Vec<Bootstrap> = Vec::new();
    for i in 0..n {
        let c = Control::start(config(i, &dir, seeds.clone(), adaptive))
            .await
            .map_err(|e| format!("node {i}: {e}"))?;
        seeds.push(Bootstrap::Addr(c.listen_addrs()[0].clone()));
        nodes.push(c);
    }
    // Early nodes learn the later ones as those dial in.
    let deadline = Instant::now() + Duration::from_secs(60 + n as u64);
    loop {
        let least = nodes
            .iter()
            .map(|c| c.members().borrow().len())
            .min()
            .unwrap_or(0);
        if least + 1 >= n {
            break;
        }
        if Instant::now() > deadline {
            for c in &nodes {
                c.shutdown().await;
            }
            return Err(format!(
                "{n} nodes: the least-informed sees {least} members after {:?}",
                started.elapsed()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let join = started.elapsed();
    // Let the heartbeat periods settle (they adapt on their next tick).
    // Both modes wait alike: the first seconds after a join carry
    // Kademlia and identify traffic that is not the steady state.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let before: Vec<(u64, u64, u64)> = nodes.iter().map(|c| c.traffic()).collect();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t0.elapsed().as_secs_f64();
    let after: Vec<(u64, u64, u64)> = nodes.iter().map(|c| c.traffic()).collect();
    let d = |f: fn(&(u64, u64, u64)) -> u64| -> Vec<f64> {
        before
            .iter()
            .zip(&after)
            .map(|(b, a)| (f(a) - f(b)) as f64 / secs)
            .collect()
    };
    let members: Vec<usize> = nodes.iter().map(|c| c.members().borrow().len()).collect();
    let connected: Vec<usize> = nodes.iter().map(|c| c.connected_peers()).collect();
    let row = Row {
        n,
        mode: if adaptive { "adaptive" } else { "fixed 1 s" },
        join,
        in_per_s: mean_max(&d(|t| t.0)),
        out_per_s: mean_max(&d(|t| t.1)),
        msgs_per_s: mean_max(&d(|t| t.2)),
        members: (
            members.iter().copied().min().unwrap_or(0),
            members.iter().copied().max().unwrap_or(0),
        ),
        connected: (
            connected.iter().copied().min().unwrap_or(0),
            connected.iter().copied().max().unwrap_or(0),
        ),
    };
    for c in &nodes {
        c.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(row)
}

fn main() {
    let nodes: Vec<usize> = env_list("DAMSELFLY_CP_NODES", "25,50,100")
        .iter()
        .filter_map(|v| v.parse().ok())
        .collect();
    let window = Duration::from_secs(
        std::env::var("DAMSELFLY_CP_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );
    let modes = env_list("DAMSELFLY_CP_MODES", "adaptive,fixed");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("control plane, one process, loopback, cluster key on; per node over {window:?}\n");
    println!("| N | heartbeat | joined in | TCP in KiB/s (mean, max) | TCP out KiB/s (mean, max) | gossip messages/s (mean, max) | members seen (min, max) | connected peers (min, max) |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut failed = false;
    for &n in &nodes {
        for mode in &modes {
            let adaptive = mode != "fixed";
            match rt.block_on(run(n, adaptive, window)) {
                Ok(r) => println!(
                    "| {} | {} | {:.1} s | {:.1}, {:.1} | {:.1}, {:.1} | {:.1}, {:.1} | {}, {} | {}, {} |",
                    r.n,
                    r.mode,
                    r.join.as_secs_f64(),
                    r.in_per_s.0 / 1024.0,
                    r.in_per_s.1 / 1024.0,
                    r.out_per_s.0 / 1024.0,
                    r.out_per_s.1 / 1024.0,
                    r.msgs_per_s.0,
                    r.msgs_per_s.1,
                    r.members.0,
                    r.members.1,
                    r.connected.0,
                    r.connected.1
                ),
                Err(e) => {
                    println!("| {n} | {mode} | failed: {e} | | | | | |");
                    failed = true;
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
