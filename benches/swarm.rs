//! Swarm benchmarks, each against a baseline measured in the same run:
//!
//! 1. **The burst**: N nodes (2, 4, 8), cold, all pulling one blob at once
//!    through their own daemon, against the same N clients pulling straight
//!    from the origin registry. Reported: origin bytes over the blob size
//!    (goal: at most 1.05x), the slowest node's completion time against the
//!    ideal `blob / min(origin link, node link)` (goal: within 1.25x), and
//!    the time to first body byte, and the busiest node's origin bytes and
//!    upload over the mean (the daemons' own counters); then a warm peer hit: one more fresh node
//!    pulls the blob that the cluster now holds (goal: TTFB under 50 ms).
//! 2. **One peer**: node B pulls a blob (1 GiB) through its mirror from node
//!    A, which holds it, against a plain GET of the same blob from
//!    `docker-registry` on the same machine (goal: at least 0.8x), with the
//!    CPU seconds per GiB of A and B (goal: about 1 or less).
//!
//! ```text
//! cargo bench --bench swarm                            # 1 GiB burst blob
//! DAMSELFLY_BENCH_QUICK=1 cargo bench --bench swarm    # 256 MiB burst blob
//! ```
//!
//! It needs root, `ip`, `tc` and `docker-registry`. Every node is a real
//! daemon (the release binary) in a network namespace of its own, and the
//! origin `docker-registry` in another; each namespace has one veth pair to a
//! bridge in the root namespace. For the burst, `tc tbf` on both ends of
//! every pair caps each node's (and the origin's) upload and download. The
//! client of a node runs in that node's namespace (a thread that entered it
//! with `setns`), so client-to-daemon traffic stays on the namespace's own
//! address and is not shaped. Origin bytes are counted from the registry's
//! own access log. Everything (processes, namespaces, veths, the bridge) is
//! removed on exit, also when the bench panics; names start with `dfb` and
//! the bench's pid. Children die with the bench (`PR_SET_PDEATHSIG`); after
//! a kill, the next run removes the namespaces and bridge left behind.
//!
//! Settings (environment): `DAMSELFLY_BENCH_BLOB_MIB` (burst blob),
//! `DAMSELFLY_BENCH_PEER_MIB` (one-peer blob, default 1024),
//! `DAMSELFLY_BENCH_NODES` (`2,4,8`), `DAMSELFLY_BENCH_NODE_MBIT` and
//! `DAMSELFLY_BENCH_ORIGIN_MBIT` (400 each), `DAMSELFLY_BENCH_PEER_RUNS` (3),
//! `DAMSELFLY_BENCH_ONLY` (`burst` or `peer`), `DAMSELFLY_BENCH_SWARM`
//! (extra lines for every daemon's `[swarm]` section, e.g.
//! `hedge_after = "2s"`), `DAMSELFLY_BENCH_KEEP=1` (keep configs and logs, and
//! print where; blobs are always removed), `DAMSELFLY_LAB_QUEUE_MS` (50: how
//! long tbf lets a packet wait, which a full queue adds to each hop), and
//! `TMPDIR`, where the nodes' stores and the registry's files go: every
//! node writes the whole blob, and on one shared disk the nodes' writeback
//! competes as real nodes' separate disks do not (`TMPDIR=/dev/shm` keeps
//! it in memory; the 1 GiB burst at N = 8 needs about 10 GiB there).
//!
//! In the one-peer scenario the holder A pulls the blob with a helper node in
//! the cluster, which then leaves. One extra run has A pull while it is
//! alone (the sequential download path), and reports on its own row where a
//! latecomer then takes the blob from: before `e2f06a6` that path did not
//! announce the blob, and the latecomer took about half from the origin.

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{push_blob, BlobSource};
use damselfly_lab as common;
use damselfly_lab::netlab;
use futures_util::StreamExt;
use netlab::*;
use sha2::{Digest as _, Sha256};

// ---------------------------------------------------------------------------
// The client.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Pull {
    /// From the request to the first body byte.
    ttfb: f64,
    /// From the request to the last body byte.
    secs: f64,
    bytes: u64,
}

impl Pull {
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / MIB as f64 / self.secs
    }
}

/// GETs `url`, counting (and with `verify`, hashing) the body; panics on a
/// bad status, a short body or a digest mismatch.
async fn pull(client: &reqwest::Client, url: &str, digest: &str, size: u64, verify: bool) -> Pull {
    let start = Instant::now();
    let resp = client.get(url).send().await.expect("request");
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    let mut body = resp.bytes_stream();
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut ttfb = None;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("{url}: body: {e}"));
        ttfb.get_or_insert_with(|| start.elapsed().as_secs_f64());
        bytes += chunk.len() as u64;
        if verify {
            hasher.update(&chunk);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(bytes, size, "{url}: short body");
    if verify {
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        assert_eq!(got, digest, "{url}: digest mismatch");
    }
    Pull {
        ttfb: ttfb.unwrap_or(secs),
        secs,
        bytes,
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .no_gzip()
        .tcp_nodelay(true)
        .build()
        .expect("client")
}

/// Runs one GET per `(namespace, url)`, each from a thread inside that
/// namespace, all released at once.
fn pull_all(targets: &[(String, String)], digest: &str, size: u64, verify: bool) -> Vec<Pull> {
    let barrier = Arc::new(Barrier::new(targets.len()));
    std::thread::scope(|scope| {
        let handles: Vec<_> = targets
            .iter()
            .map(|(ns, url)| {
                let barrier = barrier.clone();
                scope.spawn(move || {
                    enter_ns(ns);
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    let client = http_client();
                    barrier.wait();
                    rt.block_on(pull(&client, url, digest, size, verify))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

fn pull_one(ns: &str, url: &str, digest: &str, size: u64, verify: bool) -> Pull {
    pull_all(&[(ns.to_owned(), url.to_owned())], digest, size, verify)[0]
}

// Scenarios.
// ---------------------------------------------------------------------------

struct Settings {
    quick: bool,
    blob: u64,
    peer_blob: u64,
    nodes: Vec<usize>,
    node_mbit: u64,
    origin_mbit: u64,
    peer_runs: usize,
    burst: bool,
    peer: bool,
    keep: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = std::env::var_os("DAMSELFLY_BENCH_QUICK").is_some();
        let nodes = std::env::var("DAMSELFLY_BENCH_NODES")
            .unwrap_or_else(|_| "2,4,8".into())
            .split(',')
            .map(|n| {
                n.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n >= 2)
                    .unwrap_or_else(|| panic!("DAMSELFLY_BENCH_NODES: {n:?} is not a count >= 2"))
            })
            .collect();
        let only = std::env::var("DAMSELFLY_BENCH_ONLY").unwrap_or_default();
        Settings {
            quick,
            blob: env_u64("DAMSELFLY_BENCH_BLOB_MIB", if quick { 256 } else { 1024 }) * MIB,
            peer_blob: env_u64("DAMSELFLY_BENCH_PEER_MIB", 1024) * MIB,
            nodes,
            node_mbit: env_u64("DAMSELFLY_BENCH_NODE_MBIT", 400),
            origin_mbit: env_u64("DAMSELFLY_BENCH_ORIGIN_MBIT", 400),
            peer_runs: env_u64("DAMSELFLY_BENCH_PEER_RUNS", 3).max(1) as usize,
            burst: only.is_empty() || only == "burst",
            peer: only.is_empty() || only == "peer",
            keep: std::env::var_os("DAMSELFLY_BENCH_KEEP").is_some(),
        }
    }

    /// Seconds to move the burst blob over the tighter of the two links.
    fn ideal(&self) -> f64 {
        self.blob as f64 * 8.0 / (self.node_mbit.min(self.origin_mbit) as f64 * 1e6)
    }
}

struct BurstRow {
    n: usize,
    direct: Vec<Pull>,
    direct_origin: u64,
    swarm: Vec<Pull>,
    swarm_origin: u64,
    swarm_origin_gets: usize,
    swarm_origin_metric: f64,
    peer_in: f64,
    /// The most any node fetched from the origin, and uploaded to peers,
    /// each over the mean across nodes.
    origin_max_over_mean: f64,
    upload_max_over_mean: f64,
    hedges: f64,
    /// 1-minute load average before and after the swarm burst.
    load: (String, String),
    warm: Pull,
    warm_origin: u64,
    warm_peer_in: f64,
}

fn burst(s: &Settings, lab: &Lab, origin: &Origin, key: &Path, digest: &str, n: usize) -> BurstRow {
    let repo = "bench/burst";
    // Baseline: every node's client straight from the origin.
    let mark = origin.sync();
    let targets: Vec<(String, String)> = lab.nodes[..n]
        .iter()
        .map(|l| (l.ns.clone(), origin.blob_url(repo, digest)))
        .collect();
    let direct = pull_all(&targets, digest, s.blob, true);
    let (direct_origin, _) = origin.blob_bytes_since(mark, digest);
    eprintln!(
        "  N={n} direct: slowest {:.2} s",
        max(direct.iter().map(|p| p.secs))
    );

    // The swarm: N fresh daemons, joined, then all at once.
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..n {
        let boot: Vec<String> = nodes.iter().map(Node::control_addr).collect();
        nodes.push(Node::start(lab, i, &boot, origin, key));
    }
    let join = wait_members(&nodes.iter().collect::<Vec<_>>(), n - 1);
    eprintln!(
        "  N={n}: membership settled {:.1} s after the last start",
        join.as_secs_f64()
    );
    let mark = origin.sync();
    let targets: Vec<(String, String)> = nodes
        .iter()
        .map(|d| (d.ns.clone(), d.mirror_url(origin, repo, digest)))
        .collect();
    let load_before = loadavg();
    let swarm = pull_all(&targets, digest, s.blob, true);
    let load = (load_before, loadavg());
    let hedges: f64 = nodes
        .iter()
        .map(|d| d.metric("damselfly_hedges_total", &[]))
        .sum();
    let (swarm_origin, swarm_origin_gets) = origin.blob_bytes_since(mark, digest);
    let swarm_origin_metric: f64 = nodes
        .iter()
        .map(|d| d.metric("damselfly_origin_bytes_total", &[]))
        .sum();
    let peer_in: f64 = nodes
        .iter()
        .map(|d| d.metric("damselfly_fetched_bytes_total", &[("source", "peer")]))
        .sum();
    let max_over_mean = |v: Vec<f64>| {
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        if mean > 0.0 {
            v.iter().copied().fold(0.0, f64::max) / mean
        } else {
            0.0
        }
    };
    let origin_max_over_mean = max_over_mean(
        nodes
            .iter()
            .map(|d| d.metric("damselfly_origin_bytes_total", &[]))
            .collect(),
    );
    let upload_max_over_mean = max_over_mean(
        nodes
            .iter()
            .map(|d| d.metric("damselfly_peer_bytes_total", &[("direction", "out")]))
            .collect(),
    );
    eprintln!(
        "  N={n} swarm: slowest {:.2} s, origin {:.3}x in {swarm_origin_gets} GETs",
        max(swarm.iter().map(|p| p.secs)),
        swarm_origin as f64 / s.blob as f64
    );

    // Warm peer hit: one more fresh node, the blob held by the others.
    let boot: Vec<String> = nodes.iter().map(Node::control_addr).collect();
    let fresh = Node::start(lab, n, &boot, origin, key);
    let mut all: Vec<&Node> = nodes.iter().collect();
    all.push(&fresh);
    wait_members(&all, n);
    let mark = origin.sync();
    let warm = pull_one(
        &fresh.ns,
        &fresh.mirror_url(origin, repo, digest),
        digest,
        s.blob,
        true,
    );
    let (warm_origin, _) = origin.blob_bytes_since(mark, digest);
    let warm_peer_in = fresh.metric("damselfly_fetched_bytes_total", &[("source", "peer")]);
    eprintln!(
        "  N={n} warm node: TTFB {:.1} ms, {:.2} s",
        warm.ttfb * 1000.0,
        warm.secs
    );
    check_logs(&all);
    BurstRow {
        n,
        direct,
        direct_origin,
        swarm,
        swarm_origin,
        swarm_origin_gets,
        swarm_origin_metric,
        peer_in,
        origin_max_over_mean,
        upload_max_over_mean,
        hedges,
        load,
        warm,
        warm_origin,
        warm_peer_in,
    }
}

struct PeerRow {
    direct: Vec<Pull>,
    swarm: Vec<Pull>,
    cpu_a: Vec<f64>,
    cpu_b: Vec<f64>,
    from_peer: Vec<f64>,
    from_origin: Vec<u64>,
    hedges: Vec<f64>,
    load: Vec<String>,
    /// B's pull after a holder that pulled while alone: the pull, bytes
    /// from the peer, bytes from the origin.
    alone: Option<(Pull, f64, u64)>,
}

fn one_peer(s: &Settings, lab: &Lab, origin: &Origin, key: &Path, digest: &str) -> PeerRow {
    let repo = "bench/peer";
    let size = s.peer_blob;
    let mut row = PeerRow {
        direct: Vec::new(),
        swarm: Vec::new(),
        cpu_a: Vec::new(),
        cpu_b: Vec::new(),
        from_peer: Vec::new(),
        from_origin: Vec::new(),
        hedges: Vec::new(),
        load: Vec::new(),
        alone: None,
    };
    // First, a holder that pulled while it was alone (a plain sequential
    // origin download): does a latecomer find it?
    {
        let a = Node::start(lab, 0, &[], origin, key);
        let p = pull_one(
            &a.ns,
            &a.mirror_url(origin, repo, digest),
            digest,
            size,
            false,
        );
        eprintln!("  A (alone) pulled from the origin: {:.0} MiB/s", p.mib_s());
        let b = Node::start(lab, 1, &[a.control_addr()], origin, key);
        wait_members(&[&a, &b], 1);
        let mark = origin.sync();
        let p = pull_one(
            &b.ns,
            &b.mirror_url(origin, repo, digest),
            digest,
            size,
            false,
        );
        let from_peer = b.metric("damselfly_fetched_bytes_total", &[("source", "peer")]);
        let (from_origin, _) = origin.blob_bytes_since(mark, digest);
        eprintln!(
            "  B after a holder that pulled alone: {:.0} MiB/s, {:.0} MiB from A, {:.0} MiB from the origin",
            p.mib_s(),
            from_peer / MIB as f64,
            from_origin as f64 / MIB as f64
        );
        row.alone = Some((p, from_peer, from_origin));
    }
    // The measured holder: A pulls with a helper node H in the cluster (so
    // the pull goes piece by piece and A announces the blob when it commits),
    // then H leaves. Each run, a fresh B joins A and pulls.
    let a = Node::start(lab, 0, &[], origin, key);
    {
        let h = Node::start(lab, 2, &[a.control_addr()], origin, key);
        wait_members(&[&a, &h], 1);
        let p = pull_one(
            &a.ns,
            &a.mirror_url(origin, repo, digest),
            digest,
            size,
            false,
        );
        eprintln!(
            "  A (with H) pulled from the origin: {:.0} MiB/s",
            p.mib_s()
        );
    }
    // H is gone; let A notice (4 heartbeats).
    let deadline = Instant::now() + JOIN;
    while a.members() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let b_ns = lab.nodes[1].ns.clone();
    for run in 0..s.peer_runs {
        row.direct.push(pull_one(
            &b_ns,
            &origin.blob_url(repo, digest),
            digest,
            size,
            false,
        ));
        let b = Node::start(lab, 1, &[a.control_addr()], origin, key);
        wait_members(&[&a, &b], 1);
        let mark = origin.sync();
        common::memory::warm(size);
        let (a0, b0) = (a.cpu(), b.cpu());
        let p = pull_one(
            &b.ns,
            &b.mirror_url(origin, repo, digest),
            digest,
            size,
            false,
        );
        // Let the commit and the last writes land before reading CPU.
        std::thread::sleep(Duration::from_millis(300));
        let (a1, b1) = (a.cpu(), b.cpu());
        let gib = size as f64 / GIB;
        row.cpu_a.push((a1 - a0) / gib);
        row.cpu_b.push((b1 - b0) / gib);
        row.from_peer
            .push(b.metric("damselfly_fetched_bytes_total", &[("source", "peer")]));
        row.from_origin
            .push(origin.blob_bytes_since(mark, digest).0);
        row.hedges.push(b.metric("damselfly_hedges_total", &[]));
        row.load.push(loadavg());
        row.swarm.push(p);
        check_logs(&[&a, &b]);
        drop(b);
        row.direct.push(pull_one(
            &b_ns,
            &origin.blob_url(repo, digest),
            digest,
            size,
            false,
        ));
        eprintln!(
            "  run {run}: from A {:.0} MiB/s (TTFB {:.1} ms), registry {:.0} MiB/s, CPU/GiB A {:.2} B {:.2}",
            p.mib_s(),
            p.ttfb * 1000.0,
            row.direct[row.direct.len() - 1].mib_s(),
            row.cpu_a[run],
            row.cpu_b[run]
        );
    }
    row
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("swarm bench: run with `cargo bench --bench swarm` (as root)");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the swarm bench needs root (network namespaces, tc)"
    );
    for tool in ["ip", "tc", "docker-registry"] {
        assert!(
            common::util::find_in_path(tool).is_some(),
            "the swarm bench needs `{tool}`"
        );
    }
    let s = Settings::from_env();
    let max_n = s.nodes.iter().copied().max().unwrap_or(2);
    let lab = Lab::new((max_n + 1).max(3), s.keep);
    eprintln!("lab: {} (bridge {})", lab.dir.display(), lab.bridge);
    let key = lab.cluster_key();
    let origin = Origin::start(&lab);

    let settings_line = format!(
        "burst blob {} MiB, nodes {:?}, node link {} Mbit/s, origin link {} Mbit/s \
         (tc tbf on both ends of each veth), one-peer blob {} MiB x {} runs{}",
        s.blob >> 20,
        s.nodes,
        s.node_mbit,
        s.origin_mbit,
        s.peer_blob >> 20,
        s.peer_runs,
        if s.quick { ", quick mode" } else { "" }
    ) + &if lab.swarm_extra.is_empty() {
        String::new()
    } else {
        format!(
            ", extra [swarm] config: `{}`",
            lab.swarm_extra.replace('\n', "; ")
        )
    };
    eprintln!("{settings_line}");

    let mut out = String::new();
    let machine = machine();
    out += &format!("\n## swarm bench ({machine})\n\n{settings_line}.\n");

    if s.peer {
        eprintln!("pushing the {} MiB one-peer blob...", s.peer_blob >> 20);
        let (digest, _) = push_blob(
            &origin.url(),
            "bench/peer",
            BlobSource::random(12, s.peer_blob),
            None,
        )
        .expect("push");
        eprintln!("one peer (unshaped):");
        let r = one_peer(&s, &lab, &origin, &key, &digest);
        let direct = median(r.direct.iter().map(Pull::mib_s).collect());
        let swarm = median(r.swarm.iter().map(Pull::mib_s).collect());
        let runs = r.swarm.len();
        out += &format!(
            "\n### One peer: node B pulls {} MiB through its mirror from node A (unshaped veths, median of {runs})\n\n",
            s.peer_blob >> 20
        );
        out += "| measure | baseline | damselfly | ratio | goal |\n|---|---|---|---|---|\n";
        out += &format!(
            "| throughput | docker-registry to B's namespace {direct:.0} MiB/s | A to B's mirror {swarm:.0} MiB/s | {:.2}x | >= 0.8x |\n",
            swarm / direct
        );
        out += &format!(
            "| CPU-s per GiB, holder A | | {:.2} | | <= ~1 |\n",
            median(r.cpu_a.clone())
        );
        out += &format!(
            "| CPU-s per GiB, puller B | | {:.2} | | <= ~1 |\n",
            median(r.cpu_b.clone())
        );
        out += &format!(
            "| B's bytes from the peer / from the origin | | {:.0} MiB / {:.0} MiB (worst run) | | all from the peer |\n",
            r.from_peer.iter().copied().fold(f64::INFINITY, f64::min) / MIB as f64,
            r.from_origin.iter().copied().max().unwrap_or(0) as f64 / MIB as f64
        );
        if let Some((p, from_peer, from_origin)) = r.alone {
            out += &format!(
                "| B after a holder that pulled while alone (one run) | | {:.0} MiB/s; {:.0} MiB from A, {:.0} MiB from the origin | | all from the peer |\n",
                p.mib_s(),
                from_peer / MIB as f64,
                from_origin as f64 / MIB as f64
            );
        }
        out += &format!(
            "| time to first byte through B (median) | | {:.1} ms | | |\n",
            median(r.swarm.iter().map(|p| p.ttfb * 1000.0).collect())
        );
        out += &format!(
            "\nPer run: registry MiB/s {:?}; from A MiB/s {:?}; CPU-s/GiB A {:?}, B {:?}; \
             B's hedges {:?}; 1-min load average after each run {:?}.\n",
            r.direct
                .iter()
                .map(|p| p.mib_s().round())
                .collect::<Vec<_>>(),
            r.swarm
                .iter()
                .map(|p| p.mib_s().round())
                .collect::<Vec<_>>(),
            r.cpu_a
                .iter()
                .map(|c| (c * 100.0).round() / 100.0)
                .collect::<Vec<_>>(),
            r.cpu_b
                .iter()
                .map(|c| (c * 100.0).round() / 100.0)
                .collect::<Vec<_>>(),
            r.hedges,
            r.load,
        );
    }

    if s.burst {
        eprintln!("pushing the {} MiB burst blob...", s.blob >> 20);
        let (digest, _) = push_blob(
            &origin.url(),
            "bench/burst",
            BlobSource::random(11, s.blob),
            None,
        )
        .expect("push");
        lab.shape(s.node_mbit, s.origin_mbit);
        // What one client alone gets through the shaped links.
        let alone = pull_one(
            &lab.nodes[0].ns,
            &origin.blob_url("bench/burst", &digest),
            &digest,
            s.blob,
            true,
        );
        eprintln!(
            "one client alone from the origin: {:.2} s ({:.0} Mbit/s of goodput)",
            alone.secs,
            s.blob as f64 * 8.0 / alone.secs / 1e6
        );
        let mut rows = Vec::new();
        for &n in &s.nodes {
            eprintln!("burst, {n} nodes:");
            rows.push(burst(&s, &lab, &origin, &key, &digest, n));
        }
        lab.unshape();
        let ideal = s.ideal();
        out += &format!(
            "\n### Burst: N nodes pull one {} MiB blob cold, at once\n\n\
             Ideal (blob / min(origin link, node link)): {ideal:.2} s. One client alone \
             from the origin through the shaped links: {:.2} s ({:.0} Mbit/s of goodput). \
             Clients hash every byte. TTFB: request to first body byte.\n\n",
            s.blob >> 20,
            alone.secs,
            s.blob as f64 * 8.0 / alone.secs / 1e6
        );
        // The ideal is at the links' nominal rate; one client alone shows
        // what a shaped link carries as payload (tbf counts the TCP/IP and
        // Ethernet headers too, about 4.5% at this MTU), and is the fairer
        // yardstick for the schedule.
        out += "| N | path | origin bytes / blob | slowest node | slowest / ideal | slowest / payload ideal | median node | TTFB median | TTFB max |\n";
        out += "|---|---|---|---|---|---|---|---|---|\n";
        for r in &rows {
            for (path, pulls, origin_bytes) in [
                ("direct from origin", &r.direct, r.direct_origin),
                ("swarm", &r.swarm, r.swarm_origin),
            ] {
                let slowest = max(pulls.iter().map(|p| p.secs));
                // Direct pulls share the origin's link N ways; a swarm node
                // at best takes the blob once at one link's payload rate.
                let measured = match path {
                    "swarm" => alone.secs,
                    _ => alone.secs * r.n as f64,
                };
                out += &format!(
                    "| {} | {path} | {:.3}x | {slowest:.2} s | {:.2}x | {:.2}x | {:.2} s | {:.1} ms | {:.1} ms |\n",
                    r.n,
                    origin_bytes as f64 / s.blob as f64,
                    slowest / ideal,
                    slowest / measured,
                    median(pulls.iter().map(|p| p.secs).collect()),
                    median(pulls.iter().map(|p| p.ttfb * 1000.0).collect()),
                    max(pulls.iter().map(|p| p.ttfb * 1000.0)),
                );
            }
        }
        out +=
            "\nPayload ideal: one client alone through the shaped links (direct: N times that).\n\
                Goals: swarm origin bytes <= 1.05x; swarm slowest node <= 1.25x ideal.\n\n";
        out += "| N | swarm: origin GETs | origin bytes (daemons' own count) | busiest node's origin bytes / mean | busiest uploader / mean | bytes nodes took from peers | hedges | load avg before, after | warm node TTFB | warm node pull | warm node origin bytes | warm node bytes from peers |\n";
        out += "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
        for r in &rows {
            out += &format!(
                "| {} | {} | {:.3}x | {:.2}x | {:.2}x | {:.2}x blob | {} | {}, {} | {:.1} ms | {:.2} s | {:.0} MiB | {:.0} MiB |\n",
                r.n,
                r.swarm_origin_gets,
                r.swarm_origin_metric / s.blob as f64,
                r.origin_max_over_mean,
                r.upload_max_over_mean,
                r.peer_in / s.blob as f64,
                r.hedges,
                r.load.0,
                r.load.1,
                r.warm.ttfb * 1000.0,
                r.warm.secs,
                r.warm_origin as f64 / MIB as f64,
                r.warm_peer_in / MIB as f64,
            );
        }
        out += "\nGoal: warm node (peer hit) TTFB < 50 ms.\n";
    }
    println!("{out}");
    drop(origin);
    drop(lab);
}
