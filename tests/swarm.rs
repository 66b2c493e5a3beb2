//! The swarm: several damselfly nodes on one machine (each a real daemon on
//! its own loopback address with its own real containerd) fetch each blob
//! from the origin registry once and fan it out between themselves, and
//! keep pulls working when peers die, lie, or are strangers.
//!
//! Every test pushes its own image to its own repository of one shared
//! origin, and counts what the origin gave out for that repository from the
//! registry's access log (body bytes of blob GETs; manifests by tag always
//! go to the origin). The heavy tests take one lock so that no two
//! clusters compete for the two cores; deadlines are generous and nothing
//! asserts on speed.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cluster::{wait_members_of, Cluster, Key, Node, NodeSpec};
use common::{push_raw_image, BlobSource, OriginRequest, PushedImage, Registry, RegistryAuth};
use daemon::{Daemon, Options, SwarmOptions};
use damselfly_lab as common;
use damselfly_lab::{cluster, daemon};

const MIB: u64 = 1 << 20;

/// `eprintln!` with the UTC time of day, to line up with the daemons' logs.
macro_rules! note {
    ($($arg:tt)*) => {
        eprintln!("[{}] {}", clock(), format!($($arg)*))
    };
}

fn clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        now.subsec_millis()
    )
}
/// How long membership may take to settle.
const JOIN: Duration = Duration::from_secs(60);
/// One `ctr content fetch` of a big image on a loaded 2-core box.
const BIG_PULL: Duration = Duration::from_secs(300);
/// One `ctr content fetch` of a smaller image.
const PULL: Duration = Duration::from_secs(180);

fn origin() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| {
        common::require_tools();
        Registry::start(RegistryAuth::None).expect("registry")
    })
}

/// Pushes (once per process) an image of raw random layers `(seed, size)`
/// to `repo:v1`.
fn image(
    slot: &'static OnceLock<PushedImage>,
    repo: &str,
    layers: &[(u64, u64)],
) -> &'static PushedImage {
    slot.get_or_init(|| {
        let layers: Vec<BlobSource> = layers
            .iter()
            .map(|(seed, size)| BlobSource::random(*seed, *size))
            .collect();
        push_raw_image(origin(), repo, "v1", &layers).expect("push image")
    })
}

/// One 512 MiB layer.
fn big_image() -> &'static PushedImage {
    static I: OnceLock<PushedImage> = OnceLock::new();
    image(&I, "swarm/big", &[(501, 512 * MIB)])
}

/// Four layers of 8 to 40 MiB.
fn multi_image() -> &'static PushedImage {
    static I: OnceLock<PushedImage> = OnceLock::new();
    image(
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

/// Heavy tests run one at a time (each runs a cluster of real daemons and
/// containerds); a failed test's poison is ignored.
fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Body bytes of successful blob GETs of `img`'s repository at the origin
/// after `mark` (whole blobs and ranges; manifests are not counted).
fn origin_blob_bytes_since(img: &PushedImage, mark: usize) -> u64 {
    origin().blob_bytes_sent_in_repo_since(&img.repo, mark)
}

/// Blob requests of `img`'s repository after `mark` that did not come from a
/// damselfly daemon: containerd gave up on its mirror and went to the origin
/// itself (a mirror failure that a pull's success would hide).
fn bypassed_blob_requests(img: &PushedImage, mark: usize) -> Vec<OriginRequest> {
    origin()
        .requests_in_repo(&img.repo, mark)
        .into_iter()
        .filter(|r| r.is_blob() && !r.user_agent.starts_with("damselfly/"))
        .collect()
}

fn peer_out_bytes(d: &Daemon) -> f64 {
    d.metric_sum("damselfly_peer_bytes_total", &[("direction", "out")])
}

fn fetched_from(d: &Daemon, source: &str) -> f64 {
    d.metric(&format!(
        "damselfly_fetched_bytes_total{{source=\"{source}\"}}"
    ))
}

/// Fetches `img` on every node in `nodes` at once; returns each node's
/// result (time taken, or the error with its daemon's log tail).
fn fetch_all(
    nodes: &[&Node],
    img: &PushedImage,
    timeout: Duration,
) -> Vec<Result<Duration, String>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|node| scope.spawn(move || node.fetch_checked(img, timeout)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("fetch thread panicked".into()))
            })
            .collect()
    })
}

fn assert_all_ok(what: &str, results: &[Result<Duration, String>], cluster: &Cluster) {
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{what}: {} of {} pulls failed:\n{}\n\n{}",
        failures.len(),
        results.len(),
        failures
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n\n"),
        cluster.report(30)
    );
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
}

impl NodeStats {
    fn of(d: &Daemon) -> NodeStats {
        NodeStats {
            from_peers: fetched_from(d, "peer"),
            from_origin: fetched_from(d, "origin"),
            peer_out: peer_out_bytes(d),
            hedges: d.metric("damselfly_hedges_total"),
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
        let reg = origin();
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
                origin_bytes: origin_blob_bytes_since(img, mark),
                bypassed: bypassed_blob_requests(img, mark),
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
    let _heavy = heavy();
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
                "  {}: {:?}; fetched from peers {}, from origin {}; peer out {}; hedges {}",
                node.name(),
                result.as_ref().map_err(|_| "FAILED"),
                after.from_peers - before.from_peers,
                after.from_origin - before.from_origin,
                after.peer_out - before.peer_out,
                after.hedges - before.hedges
            );
        }
    }
    for round in &pulled.rounds {
        let img = round.image;
        assert_all_ok(&img.reference, &round.results, &pulled.cluster);
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
}

/// After the eight, a ninth node joins and pulls both images: every blob
/// comes from peers, none from the origin.
#[test]
fn latecomer_pulls_from_peers() {
    let _heavy = heavy();
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
    let reg = origin();
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
        let origin_bytes = origin_blob_bytes_since(img, mark);
        note!(
            "{}: {} in {took:?}, origin blob bytes {origin_bytes}",
            late.name(),
            img.reference
        );
        let bypassed = bypassed_blob_requests(img, mark);
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
    let from_peers = fetched_from(&late.daemon, "peer");
    let want = (big_image().total_size + multi_image().total_size) as f64;
    assert!(
        from_peers >= want,
        "damselfly_fetched_bytes_total{{source=\"peer\"}} is {from_peers}, expected at least {want}:\n{}",
        late.report(40)
    );
}

// ---------------------------------------------------------------------------
// 3. A holder dies mid-transfer.

/// Several nodes pull an image that one node holds; that node is killed
/// (`kill -9`) once it has served bytes to peers: every other pull
/// completes with the right content.
#[test]
fn kill_holder_mid_transfer() {
    let _heavy = heavy();
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = image(&I, "swarm/kill", &[(510, 192 * MIB)]);
    let reg = origin();
    // The holder uploads slowly, so its serving is surely still under way
    // when it dies.
    let mut specs = vec![NodeSpec::with_extra("upload_limit = \"32MiB\"\n")];
    specs.extend(vec![NodeSpec::default(); 3]);
    let mut cluster = Cluster::start_specs(reg, specs);
    cluster
        .wait_members(3, JOIN)
        .unwrap_or_else(|e| panic!("{e}"));
    let holder_took = cluster.nodes[0]
        .fetch_checked(img, PULL)
        .unwrap_or_else(|e| panic!("the holder's own pull: {e}"));
    note!("holder pulled from the origin in {holder_took:?}");

    let mark = reg.mark();
    let finished = AtomicUsize::new(0);
    let (first, rest) = cluster.nodes.split_at_mut(1);
    let holder = &mut first[0];
    let (results, out_at_kill, running_at_kill) = std::thread::scope(|scope| {
        let handles: Vec<_> = rest
            .iter()
            .map(|node| {
                let finished = &finished;
                scope.spawn(move || {
                    let r = node.fetch_checked(img, PULL);
                    finished.fetch_add(1, Ordering::SeqCst);
                    r
                })
            })
            .collect();
        let deadline = Instant::now() + PULL;
        let out = loop {
            let out = peer_out_bytes(&holder.daemon);
            if out > 0.0
                || finished.load(Ordering::SeqCst) == handles.len()
                || Instant::now() > deadline
            {
                break out;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let running = handles.len() - finished.load(Ordering::SeqCst);
        let holder_report = holder.report(40);
        holder.daemon.kill9();
        note!("killed the holder after it served {out} bytes; {running} pulls still running");
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("fetch thread panicked".into()))
            })
            .collect();
        if out == 0.0 {
            panic!(
                "the holder never served a byte to a peer (damselfly_peer_bytes_total{{direction=\"out\"}} stayed 0):\n{holder_report}\n{}",
                rest.iter().map(|n| n.report(30)).collect::<Vec<_>>().join("\n")
            );
        }
        (results, out, running)
    });
    assert!(
        running_at_kill > 0,
        "every pull had finished before the holder died ({out_at_kill} bytes out); the test proved nothing"
    );
    assert_all_ok("pulls after the holder died", &results, &cluster);
    note!(
        "origin blob bytes after the kill: {} (image {})",
        origin_blob_bytes_since(img, mark),
        img.total_size
    );
    let bypassed = bypassed_blob_requests(img, mark);
    assert!(
        bypassed.is_empty(),
        "containerd went around the mirror: {bypassed:#?}\n{}",
        cluster.report(30)
    );
}

// ---------------------------------------------------------------------------
// 4. A peer serves corrupt bytes.

/// Flips one byte in every `stride` bytes of a stored blob; returns the
/// offsets.
fn flip_bytes(path: &std::path::Path, stride: u64) -> Vec<u64> {
    let len = std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .len();
    let offsets: Vec<u64> = (0..)
        .map(|i| stride / 2 + 12345 + i * stride)
        .take_while(|o| *o < len)
        .collect();
    common::flip_bytes_at(path, &offsets);
    offsets
}

/// A liar (a node that does not check its own reads, `verify_reads =
/// false`, as a buggy or malicious peer would not) whose stored blob has a
/// flipped byte in every piece serves it to a peer; the peer's pull still
/// completes with the right content, and it distrusts the liar. The liar
/// sends the per-MiB checksums it recorded when it verified the blob: the
/// puller catches the bad chunks before writing them.
#[test]
fn corrupt_peer_is_distrusted() {
    let _heavy = heavy();
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = image(&I, "swarm/corrupt", &[(520, 48 * MIB)]);
    corrupt_case(img, false, Liar::Lies);
}

/// The same with a liar that got the blob before it had peers (its own
/// plain download), and a puller that joins only afterwards.
#[test]
fn corrupt_peer_without_checksums_is_repaired() {
    let _heavy = heavy();
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = image(&I, "swarm/corrupt-nosum", &[(521, 48 * MIB)]);
    corrupt_case(img, true, Liar::Lies);
}

/// An honest node whose disk rotted under a blob (a flipped byte in every
/// piece) serves it to a peer through the data plane: its verified read
/// stops before the first bad chunk, so the peer never receives a bad byte
/// and does not distrust it; the node quarantines the blob, counts it
/// (`damselfly_corrupt_blobs_total{found_by="peer"}` at 1) and fetches it
/// again; the peer's pull completes with the right content.
#[test]
fn rotten_holder_stops_before_the_bad_chunk_and_refetches() {
    let _heavy = heavy();
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = image(&I, "swarm/rotten", &[(522, 48 * MIB)]);
    corrupt_case(img, false, Liar::Rotten);
}

/// What the node with the bad blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liar {
    /// Serves what its disk holds without checking it.
    Lies,
    /// Checks its reads (the default): its disk rotted, it does not lie.
    Rotten,
}

/// The liar (node 0) pulls `img`, gets a flipped byte in every 8 MiB piece
/// (the default piece size), then node 1 pulls. With `puller_joins_late`
/// node 1 starts only after the liar's pull; otherwise both are members
/// from the start (and the puller may already hold the pieces it fetched
/// from the origin as their rendezvous owner).
fn corrupt_case(img: &PushedImage, puller_joins_late: bool, kind: Liar) {
    let reg = origin();
    // No scrub: the read is what must find the rot.
    let liar_spec = NodeSpec {
        store: match kind {
            Liar::Lies => "verify_reads = false\nscrub_rate = 0\n".into(),
            Liar::Rotten => "scrub_rate = 0\n".into(),
        },
        ..NodeSpec::default()
    };
    let mut specs = vec![liar_spec];
    if !puller_joins_late {
        specs.push(NodeSpec::default());
    }
    let mut cluster = Cluster::start_specs(reg, specs);
    if !puller_joins_late {
        cluster
            .wait_members(1, JOIN)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    cluster.nodes[0]
        .fetch_checked(img, PULL)
        .unwrap_or_else(|e| panic!("the liar's own pull: {e}"));
    let (layer, _) = &img.layers[0];
    let path = cluster.nodes[0].daemon.blob_path(layer);
    let offsets = flip_bytes(&path, 8 * MIB);
    note!("flipped the bytes at {offsets:?} of {}", path.display());
    if puller_joins_late {
        cluster.add(reg, NodeSpec::default());
        cluster
            .wait_members(1, JOIN)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let (liar, puller) = (&cluster.nodes[0], &cluster.nodes[1]);
    // When the puller owned every piece of the layer during the liar's pull,
    // it fetched them all from the origin and committed the blob: its own
    // pull would then ask the liar for nothing. Evicted, it must.
    let held = puller.daemon.blob_path(layer).exists();
    let removed = puller.daemon.evict(&[layer.as_str()]);
    assert!(removed <= 1, "evicted {removed} blobs for one digest");
    if held {
        assert_eq!(removed, 1, "the puller's copy was not evicted");
        note!("the puller already held the layer (it owned every piece); evicted it");
    }

    let mark = reg.mark();
    let out_before = peer_out_bytes(&liar.daemon);
    puller
        .fetch_checked(img, PULL)
        .unwrap_or_else(|e| panic!("{e}\n{}", liar.report(40)));
    let served = peer_out_bytes(&liar.daemon) - out_before;
    note!(
        "puller: from peers {}, from origin {}; origin blob bytes {}; the liar served {served}",
        fetched_from(&puller.daemon, "peer"),
        fetched_from(&puller.daemon, "origin"),
        origin_blob_bytes_since(img, mark)
    );
    let bypassed = bypassed_blob_requests(img, mark);
    assert!(
        bypassed.is_empty(),
        "containerd went around the mirror: {bypassed:#?}\n{}",
        cluster.report(40)
    );
    assert!(
        served > 0.0,
        "the liar served no byte to the puller, so nothing could be judged:\n{}",
        cluster.report(40)
    );
    let distrusted = puller.daemon.metric("damselfly_distrusted_peers_total");
    if kind == Liar::Lies {
        assert!(
            distrusted >= 1.0,
            "damselfly_distrusted_peers_total is {distrusted} on the puller after the liar served {served} bytes\n{}",
            cluster.report(60)
        );
        return;
    }
    assert_eq!(
        distrusted,
        0.0,
        "the rotten node sent a bad chunk\n{}",
        cluster.report(60)
    );
    let rotten = &liar.daemon;
    let found = rotten.metric(r#"damselfly_corrupt_blobs_total{found_by="peer"}"#);
    assert_eq!(found, 1.0, "{}", cluster.report(60));
    assert!(
        rotten.log().contains(&format!("{}", path.display())),
        "the log names the blob's path"
    );
    let quarantined: Vec<_> = std::fs::read_dir(rotten.store_dir().join("quarantine"))
        .expect("quarantine dir")
        .flatten()
        .collect();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    // Fetched again through the normal path (the puller, or the origin).
    rotten
        .wait_blob_intact(layer, PULL)
        .unwrap_or_else(|e| panic!("the rotten node did not fetch the blob again: {e}"));
}

// ---------------------------------------------------------------------------
// 5. Every peer is gone.

/// A node whose bootstrap peers are all stopped, one of them a holder of
/// the image it wants, still pulls: from the origin.
#[test]
fn all_peers_gone() {
    let _heavy = heavy();
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = image(&I, "swarm/gone", &[(530, 16 * MIB), (531, 4 * MIB)]);
    let reg = origin();
    let mut cluster = Cluster::start(reg, 2);
    cluster
        .wait_members(1, JOIN)
        .unwrap_or_else(|e| panic!("{e}"));
    cluster.nodes[0]
        .fetch_checked(img, PULL)
        .unwrap_or_else(|e| panic!("the holder's pull: {e}"));
    // Joins after that pull, so it holds no piece of the image.
    let bootstrap = vec![
        cluster.nodes[0].daemon.swarm_multiaddr(),
        cluster.nodes[1].daemon.swarm_multiaddr(),
    ];
    cluster.add(
        reg,
        NodeSpec {
            bootstrap: Some(bootstrap),
            ..NodeSpec::default()
        },
    );
    cluster
        .wait_members(2, JOIN)
        .unwrap_or_else(|e| panic!("{e}"));
    cluster.nodes[0].daemon.kill9();
    cluster.nodes[1].daemon.terminate();

    let alone = &cluster.nodes[2];
    let mark = reg.mark();
    let took = alone
        .fetch_checked(img, PULL)
        .unwrap_or_else(|e| panic!("the pull with every peer gone: {e}"));
    let origin_bytes = origin_blob_bytes_since(img, mark);
    note!("pulled alone in {took:?}; origin blob bytes {origin_bytes}");
    let bypassed = bypassed_blob_requests(img, mark);
    assert!(
        bypassed.is_empty(),
        "containerd went around the mirror: {bypassed:#?}\n{}",
        alone.report(40)
    );
    assert!(
        origin_bytes >= img.total_size,
        "the blobs should have come from the origin (the daemon's own GETs): {origin_bytes} of {}\n{}",
        img.total_size,
        alone.report(40)
    );
    assert_eq!(
        fetched_from(&alone.daemon, "peer"),
        0.0,
        "bytes from peers that are dead?\n{}",
        alone.report(40)
    );
}

// ---------------------------------------------------------------------------
// 6. Strangers stay out.

/// Nodes with another key, or with none (`insecure_no_cluster_key`), point
/// at members: they never become members, the members' counts do not move,
/// and a TLS client that accepts any certificate gets no blob byte from a
/// member's data port.
#[test]
fn keyless_node_cannot_join() {
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = image(&I, "swarm/keyless", &[(540, MIB)]);
    let reg = origin();
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
// 7. A seed keeps what the nodes pulled.

/// A seed and two nodes: the nodes pull, the seed ends up holding every
/// blob; the nodes go away; a new node pulls with no blob from the origin.
#[test]
fn seed_keeps_the_cache() {
    let _heavy = heavy();
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = image(&I, "swarm/seed", &[(550, 24 * MIB), (551, 8 * MIB)]);
    let reg = origin();
    let mut cluster = Cluster::start_specs(
        reg,
        vec![NodeSpec::seed(), NodeSpec::default(), NodeSpec::default()],
    );
    cluster
        .wait_members(2, JOIN)
        .unwrap_or_else(|e| panic!("{e}"));
    let pullers: Vec<&Node> = cluster.nodes[1..].iter().collect();
    let results = fetch_all(&pullers, img, PULL);
    assert_all_ok("the two nodes' pulls", &results, &cluster);

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
    let bypassed = bypassed_blob_requests(img, mark);
    assert!(
        bypassed.is_empty(),
        "containerd went around the mirror: {bypassed:#?}\n{}",
        fresh.report(40)
    );
    let origin_bytes = origin_blob_bytes_since(img, mark);
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
// 8. Configuration.

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
