//! The swarm: several damselfly nodes on one machine (each a real daemon on
//! its own loopback address with its own real containerd) fetch each blob
//! from the origin registry once and fan it out between themselves, a
//! latecomer and a seed's successor take everything from peers, and
//! strangers stay out. The fault cases (a holder killed, peers that lie or
//! rot, every peer gone) are in `tests/swarm_faults.rs`.
//!
//! Every test pushes its own image to its own repository of one shared
//! origin ([`Suite`]), and counts what the origin gave out for that
//! repository from the registry's access log (body bytes of blob GETs;
//! manifests by tag always go to the origin). The heavy tests take one lock
//! so that no two clusters compete for the two cores; deadlines are
//! generous and nothing asserts on speed.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cluster::{fetch_all, wait_members_of, Cluster, Key, Node, NodeSpec, Suite};
use common::{note, OriginRequest, PushedImage};
use daemon::{Daemon, Options, SwarmOptions};
use damselfly_lab as common;
use damselfly_lab::{cluster, daemon};

const MIB: u64 = 1 << 20;

/// The origin and the heavy tests' lock of this test binary.
static SUITE: Suite = Suite::new();

/// How long membership may take to settle.
const JOIN: Duration = Duration::from_secs(60);
/// One `ctr content fetch` of a big image on a loaded 2-core box.
const BIG_PULL: Duration = Duration::from_secs(300);
/// One `ctr content fetch` of a smaller image.
const PULL: Duration = Duration::from_secs(180);

/// One 512 MiB layer.
fn big_image() -> &'static PushedImage {
    static I: OnceLock<PushedImage> = OnceLock::new();
    SUITE.image(&I, "swarm/big", &[(501, 512 * MIB)])
}

/// Four layers of 8 to 40 MiB.
fn multi_image() -> &'static PushedImage {
    static I: OnceLock<PushedImage> = OnceLock::new();
    SUITE.image(
        &I,
        "swarm/multi",
        &[
            (502, 8 * MIB),
            (503, 16 * MIB),
            (504, 24 * MIB),
            (505, 40 * MIB),
        ],
    )
}

// ---------------------------------------------------------------------------
// 1 and 2: eight nodes pull at once; a ninth joins later.

/// A node's counters at one moment: fetched from peers, fetched from the
/// origin, peer bytes out, hedges.
#[derive(Clone, Copy, Default)]
struct NodeStats {
    from_peers: f64,
    from_origin: f64,
    peer_out: f64,
    hedges: f64,
    /// From peers asked as relays (pullers), not owners or holders.
    relayed: f64,
}

impl NodeStats {
    fn of(d: &Daemon) -> NodeStats {
        NodeStats {
            from_peers: d.fetched_bytes("peer"),
            from_origin: d.fetched_bytes("origin"),
            peer_out: d.peer_bytes_out(),
            hedges: d.metric("damselfly_hedges_total"),
            relayed: d.metric("damselfly_relayed_bytes_total"),
        }
    }
}

struct Round {
    image: &'static PushedImage,
    results: Vec<Result<Duration, String>>,
    /// Each node's counters before and after the round.
    stats: Vec<(NodeStats, NodeStats)>,
    wall: Duration,
    origin_bytes: u64,
    bypassed: Vec<OriginRequest>,
}

struct Pulled {
    cluster: Cluster,
    rounds: Vec<Round>,
}

static PULLED: Mutex<Option<Pulled>> = Mutex::new(None);
/// How many of the two tests that share [`PULLED`] are done with it; the
/// second to finish drops the cluster (else the exit hooks clean it up).
static PULLED_USERS_DONE: AtomicUsize = AtomicUsize::new(0);

struct ReleasePulled;

impl Drop for ReleasePulled {
    fn drop(&mut self) {
        if PULLED_USERS_DONE.fetch_add(1, Ordering::SeqCst) + 1 == 2 {
            let cluster = PULLED.lock().unwrap_or_else(|p| p.into_inner()).take();
            drop(cluster);
        }
    }
}

/// Eight nodes, then two rounds of eight concurrent pulls (the 512 MiB
/// image, then the four-layer one), once per process; the outcome is kept
/// for the tests to judge.
fn pulled() -> MutexGuard<'static, Option<Pulled>> {
    let mut guard = PULLED.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        let reg = SUITE.origin();
        let images = [big_image(), multi_image()];
        let started = Instant::now();
        let cluster = Cluster::start(reg, 8);
        note!("8 nodes started in {:?}", started.elapsed());
        if let Err(e) = cluster.wait_members(7, JOIN) {
            panic!("the eight nodes did not form a swarm: {e}");
        }
        note!("8 nodes joined after {:?}", started.elapsed());
        let nodes: Vec<&Node> = cluster.nodes.iter().collect();
        let mut rounds = Vec::new();
        for img in images {
            let mark = reg.mark();
            let before: Vec<NodeStats> = nodes.iter().map(|n| NodeStats::of(&n.daemon)).collect();
            let started = Instant::now();
            note!("8 pulls of {} start", img.reference);
            let results = fetch_all(&nodes, img, BIG_PULL);
            let wall = started.elapsed();
            note!("8 pulls of {} done in {wall:?}", img.reference);
            let stats = nodes
                .iter()
                .zip(before)
                .map(|(n, b)| (b, NodeStats::of(&n.daemon)))
                .collect();
            rounds.push(Round {
                image: img,
                results,
                stats,
                wall,
                origin_bytes: SUITE.origin_blob_bytes_since(img, mark),
                bypassed: SUITE.bypassed_blob_requests(img, mark),
            });
        }
        *guard = Some(Pulled { cluster, rounds });
    }
    guard
}

/// Eight nodes pull the same image at the same moment: each gets every
/// blob, and the origin gives out about one copy.
#[test]
fn eight_nodes_pull_at_once() {
    let _heavy = SUITE.heavy();
    let _release = ReleasePulled;
    let guard = pulled();
    let pulled = guard.as_ref().expect("set up");
    for round in &pulled.rounds {
        let img = round.image;
        note!(
            "{} ({} layers, {} bytes): all pulls in {:?}, origin blob bytes {} ({:.3}x)",
            img.reference,
            img.layers.len(),
            img.total_size,
            round.wall,
            round.origin_bytes,
            round.origin_bytes as f64 / img.total_size as f64
        );
        for ((node, result), (before, after)) in pulled
            .cluster
            .nodes
            .iter()
            .zip(&round.results)
            .zip(&round.stats)
        {
            note!(
                "  {}: {:?}; fetched from peers {} (relayed {}), from origin {}; peer out {}; hedges {}",
                node.name(),
                result.as_ref().map_err(|_| "FAILED"),
                after.from_peers - before.from_peers,
                after.relayed - before.relayed,
                after.from_origin - before.from_origin,
                after.peer_out - before.peer_out,
                after.hedges - before.hedges
            );
        }
    }
    for round in &pulled.rounds {
        let img = round.image;
        pulled
            .cluster
            .all_ok(&img.reference, &round.results)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            round.bypassed.is_empty(),
            "{}: containerd fetched blobs from the origin itself, around its mirror: {:#?}\n{}",
            img.reference,
            round.bypassed,
            pulled.cluster.report(30)
        );
        let limit = img.total_size as f64 * 1.05;
        assert!(
            round.origin_bytes as f64 <= limit,
            "{}: the origin gave out {} blob bytes for an image of {} (limit {limit}):\n{}",
            img.reference,
            round.origin_bytes,
            img.total_size,
            pulled.cluster.report(30)
        );
    }
    // Receivers pass pieces on: in the big round, bytes came from relays
    // (nodes that pulled too, not the piece's owner), and no node uploaded
    // more than three times the mean.
    let big = &pulled.rounds[0];
    let delta = |f: fn(&NodeStats) -> f64| -> Vec<f64> {
        big.stats.iter().map(|(b, a)| f(a) - f(b)).collect()
    };
    let relayed: f64 = delta(|s| s.relayed).iter().sum();
    assert!(
        relayed > 0.0,
        "{}: no node took a byte from a relay\n{}",
        big.image.reference,
        pulled.cluster.report(30)
    );
    let out = delta(|s| s.peer_out);
    let mean = out.iter().sum::<f64>() / out.len() as f64;
    let most = out.iter().copied().fold(0.0, f64::max);
    assert!(
        most <= 3.0 * mean,
        "{}: the busiest node uploaded {most} bytes, the mean is {mean}: {out:?}",
        big.image.reference
    );
}

/// After the eight, a ninth node joins and pulls both images: every blob
/// comes from peers, none from the origin.
#[test]
fn latecomer_pulls_from_peers() {
    let _heavy = SUITE.heavy();
    let _release = ReleasePulled;
    let mut guard = pulled();
    let pulled = guard.as_mut().expect("set up");
    for round in &pulled.rounds {
        if let Some(Err(e)) = round.results.iter().find(|r| r.is_err()) {
            panic!(
                "needs the eight nodes' pulls of {} (see eight_nodes_pull_at_once): {e}",
                round.image.reference
            );
        }
    }
    let reg = SUITE.origin();
    let cluster = &mut pulled.cluster;
    cluster.add(reg, NodeSpec::default());
    cluster
        .wait_members(8, JOIN)
        .unwrap_or_else(|e| panic!("{e}"));
    let late = cluster.nodes.last().expect("the ninth node");
    for img in [multi_image(), big_image()] {
        let mark = reg.mark();
        let took = late
            .fetch_checked(img, BIG_PULL)
            .unwrap_or_else(|e| panic!("{e}\n{}", cluster.report(20)));
        let origin_bytes = SUITE.origin_blob_bytes_since(img, mark);
        note!(
            "{}: {} in {took:?}, origin blob bytes {origin_bytes}",
            late.name(),
            img.reference
        );
        let bypassed = SUITE.bypassed_blob_requests(img, mark);
        assert!(
            bypassed.is_empty(),
            "containerd went around the mirror: {bypassed:#?}\n{}",
            late.report(40)
        );
        assert_eq!(
            origin_bytes,
            0,
            "{}: the latecomer took blob bytes from the origin although 8 peers hold them:\n{:#?}\n{}",
            img.reference,
            reg.requests_in_repo(&img.repo, mark),
            late.report(60)
        );
        // The tag is resolved at the origin (the authorization check); the
        // manifest by digest comes from the peers like any blob.
        let by_digest: Vec<_> = reg
            .requests_in_repo(&img.repo, mark)
            .into_iter()
            .filter(|r| r.method == "GET" && r.is_manifest() && r.path.contains("sha256:"))
            .collect();
        assert!(
            by_digest.is_empty(),
            "{}: the latecomer fetched manifests by digest from the origin: {by_digest:#?}\n{}",
            img.reference,
            late.report(40)
        );
    }
    let from_peers = late.daemon.fetched_bytes("peer");
    let want = (big_image().total_size + multi_image().total_size) as f64;
    assert!(
        from_peers >= want,
        "damselfly_fetched_bytes_total{{source=\"peer\"}} is {from_peers}, expected at least {want}:\n{}",
        late.report(40)
    );
}

// ---------------------------------------------------------------------------
// 3. Strangers stay out.

/// Nodes with another key, or with none (`insecure_no_cluster_key`), point
/// at members: they never become members, the members' counts do not move,
/// and a TLS client that accepts any certificate gets no blob byte from a
/// member's data port.
#[test]
fn keyless_node_cannot_join() {
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = SUITE.image(&I, "swarm/keyless", &[(540, MIB)]);
    let reg = SUITE.origin();
    let mut cluster = Cluster::start(reg, 2);
    cluster
        .wait_members(1, JOIN)
        .unwrap_or_else(|e| panic!("{e}"));
    cluster.nodes[0]
        .fetch_checked(img, PULL)
        .unwrap_or_else(|e| panic!("{e}"));
    let stranger_key = cluster.stranger_key("stranger");
    let member = cluster.nodes[0].daemon.swarm_multiaddr();
    cluster.add(
        reg,
        NodeSpec {
            key: Key::File(stranger_key),
            bootstrap: Some(vec![member.clone()]),
            ..NodeSpec::default()
        },
    );
    cluster.add(
        reg,
        NodeSpec {
            key: Key::None,
            extra: "insecure_no_cluster_key = true\n".into(),
            bootstrap: Some(vec![member]),
            ..NodeSpec::default()
        },
    );
    let (members, strangers) = cluster.nodes.split_at(2);
    for s in strangers {
        assert!(
            s.daemon.metrics().contains("damselfly_swarm_members"),
            "{} does not export damselfly_swarm_members\n{}",
            s.name(),
            s.report(30)
        );
    }
    // Several heartbeats' worth of chances to (wrongly) join.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        for m in members {
            assert_eq!(
                m.members(),
                1.0,
                "a member's count moved:\n{}",
                cluster.report(30)
            );
        }
        for s in strangers {
            assert_eq!(
                s.members(),
                0.0,
                "a stranger joined:\n{}",
                cluster.report(30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let holder = &members[0].daemon;
    let (layer, _) = &img.layers[0];
    let hex = layer.trim_start_matches("sha256:");
    let url = format!("https://{}/v1/blobs/sha256:{hex}", holder.data_addr());
    let refused_before = holder.metric("damselfly_peer_refused_total");
    let outcome = common::block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .danger_accept_invalid_certs(true)
            .danger_accept_invalid_hostnames(true)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        match client
            .get(&url)
            .header("range", "bytes=0-1048575")
            .send()
            .await
        {
            Err(e) => Err(format!("{e:?}")),
            Ok(resp) => {
                let status = resp.status();
                let body = resp.bytes().await;
                Ok((status, body.map(|b| b.len()).map_err(|e| format!("{e:?}"))))
            }
        }
    });
    match &outcome {
        Err(e) => note!("TLS client refused as expected: {e}"),
        Ok((status, body)) => panic!(
            "a client without the cluster's certificate got an HTTP answer from {url}: {status}, body {body:?}\n{}",
            holder.log_tail(30)
        ),
    }
    // Plain HTTP on the data port gets nothing either.
    if let Ok((status, _)) = common::util::raw_http_request(
        &holder.data_addr().to_string(),
        "GET",
        &format!("/v1/blobs/sha256:{hex}"),
        Duration::from_secs(5),
    ) {
        assert!(
            !(200..300).contains(&status),
            "plain HTTP on the data port answered {status}"
        );
    }
    let refused = holder.metric("damselfly_peer_refused_total");
    assert!(
        refused > refused_before,
        "damselfly_peer_refused_total did not count the refused handshake ({refused_before} -> {refused})\n{}",
        members[0].report(30)
    );
}

// ---------------------------------------------------------------------------
// 4. A seed keeps what the nodes pulled.

/// A seed and two nodes: the nodes pull, the seed ends up holding every
/// blob; the nodes go away; a new node pulls with no blob from the origin.
#[test]
fn seed_keeps_the_cache() {
    let _heavy = SUITE.heavy();
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = SUITE.image(&I, "swarm/seed", &[(550, 24 * MIB), (551, 8 * MIB)]);
    let reg = SUITE.origin();
    let mut cluster = Cluster::start_specs(
        reg,
        vec![NodeSpec::seed(), NodeSpec::default(), NodeSpec::default()],
    );
    cluster
        .wait_members(2, JOIN)
        .unwrap_or_else(|e| panic!("{e}"));
    let pullers: Vec<&Node> = cluster.nodes[1..].iter().collect();
    let results = fetch_all(&pullers, img, PULL);
    cluster
        .all_ok("the two nodes' pulls", &results)
        .unwrap_or_else(|e| panic!("{e}"));

    let seed = &cluster.nodes[0];
    let deadline = Instant::now() + Duration::from_secs(120);
    while !seed.holds(img) {
        assert!(
            Instant::now() < deadline,
            "the seed does not hold {:?} 120 s after the pulls:\n{}",
            img.blob_digests()
                .iter()
                .filter(|d| !seed.daemon.blob_path(d).is_file())
                .collect::<Vec<_>>(),
            cluster.report(40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for node in &mut cluster.nodes[1..] {
        node.daemon.terminate();
    }
    cluster.add(reg, NodeSpec::default());
    {
        let seed = &cluster.nodes[0];
        let fresh = cluster.nodes.last().expect("the new node");
        wait_members_of(&[seed, fresh], 1, JOIN).unwrap_or_else(|e| panic!("{e}"));
    }
    let fresh = cluster.nodes.last().expect("the new node");
    let mark = reg.mark();
    fresh
        .fetch_checked(img, PULL)
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.nodes[0].report(40)));
    let bypassed = SUITE.bypassed_blob_requests(img, mark);
    assert!(
        bypassed.is_empty(),
        "containerd went around the mirror: {bypassed:#?}\n{}",
        fresh.report(40)
    );
    let origin_bytes = SUITE.origin_blob_bytes_since(img, mark);
    assert_eq!(
        origin_bytes,
        0,
        "the new node took blob bytes from the origin although the seed holds them: {:#?}\n{}\n{}",
        reg.requests_in_repo(&img.repo, mark),
        fresh.report(40),
        cluster.nodes[0].report(40)
    );
}

// ---------------------------------------------------------------------------
// 5. Configuration.

/// `enabled = true` with neither a cluster key nor the explicit opt-out:
/// the daemon refuses to start and names the missing key.
#[test]
fn bad_config() {
    let (status, log) = Daemon::start_expecting_exit(Options {
        ip: Some(Ipv4Addr::new(127, 0, 0, 2)),
        swarm: Some(SwarmOptions::default()),
        ..Options::default()
    });
    assert!(!status.success(), "exited {status}\n{log}");
    assert!(
        log.contains("swarm.cluster_key_file"),
        "the error does not name swarm.cluster_key_file:\n{log}"
    );
}
