//! The swarm when peers fail: a holder or a relay killed mid-transfer, a node
//! restarted mid-download, a peer that
//! serves corrupt bytes (with and without checksums), an honest holder whose
//! disk rotted, and every peer gone. Each pull still completes with the
//! right content. The swarm's normal work is in `tests/swarm.rs`.
//!
//! As there, every test pushes its own image to its own repository of this
//! binary's origin ([`Suite`]) and counts the origin's blob bytes for that
//! repository from its access log; the heavy tests take one lock so that no
//! two clusters compete for the two cores; nothing asserts on speed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cluster::{Cluster, NodeSpec, Suite};
use common::{note, PushedImage};
use damselfly_lab as common;
use damselfly_lab::cluster;

const MIB: u64 = 1 << 20;

/// The origin and the heavy tests' lock of this test binary.
static SUITE: Suite = Suite::new();

/// How long membership may take to settle.
const JOIN: Duration = Duration::from_secs(60);
/// One `ctr content fetch` of a smaller image on a loaded 2-core box.
const PULL: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------
// 1. A holder dies mid-transfer.

/// Several nodes pull an image that one node holds; that node is killed
/// (`kill -9`) once it has served bytes to peers: every other pull
/// completes with the right content.
#[test]
fn kill_holder_mid_transfer() {
    let _heavy = SUITE.heavy();
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = SUITE.image(&I, "swarm/kill", &[(510, 192 * MIB)]);
    let reg = SUITE.origin();
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
            let out = holder.daemon.peer_bytes_out();
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
    cluster
        .all_ok("pulls after the holder died", &results)
        .unwrap_or_else(|e| panic!("{e}"));
    note!(
        "origin blob bytes after the kill: {} (image {})",
        SUITE.origin_blob_bytes_since(img, mark),
        img.total_size
    );
    let bypassed = SUITE.bypassed_blob_requests(img, mark);
    assert!(
        bypassed.is_empty(),
        "containerd went around the mirror: {bypassed:#?}\n{}",
        cluster.report(30)
    );
}

/// Four nodes pull an image at once; one of them, once it has passed on
/// bytes of pieces it pulled itself to a peer that asked it as a relay
/// (`damselfly_relay_served_bytes_total` past 1 MiB: layer bytes, not the
/// config blob), is killed (`kill -9`):
/// every other pull completes with the right content.
#[test]
fn kill_relay_mid_burst() {
    let _heavy = SUITE.heavy();
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = SUITE.image(&I, "swarm/kill-relay", &[(511, 192 * MIB)]);
    let reg = SUITE.origin();
    // Slow uploads keep the burst going for a while after the first relay.
    let specs = vec![NodeSpec::with_extra("upload_limit = \"24MiB\"\n"); 4];
    let cluster = Cluster::start_specs(reg, specs);
    cluster
        .wait_members(3, JOIN)
        .unwrap_or_else(|e| panic!("{e}"));
    let finished: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
    let nodes = &cluster.nodes;
    let (victim, relayed, running, results) = std::thread::scope(|scope| {
        let handles: Vec<_> = nodes
            .iter()
            .zip(&finished)
            .map(|(node, done)| {
                scope.spawn(move || {
                    let r = node.fetch_checked(img, PULL);
                    done.store(1, Ordering::SeqCst);
                    r
                })
            })
            .collect();
        let deadline = Instant::now() + PULL;
        let found = loop {
            let hit = nodes.iter().enumerate().find(|(i, n)| {
                finished[*i].load(Ordering::SeqCst) == 0
                    && n.daemon.metric("damselfly_relay_served_bytes_total") > MIB as f64
            });
            if let Some((i, n)) = hit {
                break Some((i, n.daemon.metric("damselfly_relay_served_bytes_total")));
            }
            if finished.iter().all(|f| f.load(Ordering::SeqCst) == 1) || Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let running = finished
            .iter()
            .filter(|f| f.load(Ordering::SeqCst) == 0)
            .count();
        if let Some((i, _)) = found {
            // SIGKILL by pid: the pulls borrow every node; the daemon's
            // handle reaps it when the cluster drops.
            let pid = nodes[i].daemon.pid();
            let killed = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            assert!(killed.is_ok_and(|s| s.success()), "kill -9 {pid}");
        }
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("fetch thread panicked".into()))
            })
            .collect();
        let (victim, relayed) = found.unwrap_or_else(|| {
            panic!(
                "no node relayed a byte before the pulls ended:\n{}",
                nodes
                    .iter()
                    .map(|n| n.report(30))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        (victim, relayed, running, results)
    });
    note!("killed node {victim} after it relayed {relayed} bytes; {running} pulls were running");
    assert!(
        running > 1,
        "only the victim's pull was left; the test proved nothing"
    );
    let others: Vec<_> = results
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, r)| r)
        .collect();
    cluster
        .all_ok("pulls after a relay died", &others)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A node killed (`kill -9`) in the middle of a piece download, and
/// restarted on the same store: its next pull goes on from the pieces its
/// journal recorded, and each piece that was in flight from its last whole
/// MiB; the cluster takes one copy of the image from the origin, plus at
/// most the pieces that were in flight at the kill.
#[test]
fn restart_mid_piece_download_resumes() {
    let _heavy = SUITE.heavy();
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = SUITE.image(&I, "swarm/restart", &[(512, 192 * MIB)]);
    let (layer, layer_size) = (&img.layers[0].0, img.layers[0].1);
    let reg = SUITE.origin();
    // A sends slowly, so B's download is surely mid-way when it dies.
    let specs = vec![
        // The bound on what is fetched twice below is 8 pieces in flight.
        NodeSpec::with_extra("upload_limit = \"16MiB\"\nmax_piece_transfers = 8\n"),
        NodeSpec::with_extra("max_piece_transfers = 8\n"),
    ];
    let mut cluster = Cluster::start_specs(reg, specs);
    cluster
        .wait_members(1, JOIN)
        .unwrap_or_else(|e| panic!("{e}"));
    let mark = reg.mark();
    // B reads the layer straight from its mirror (as containerd would, but
    // without containerd's fallback to the origin once the mirror dies).
    let b_url = format!(
        "{}/v2/{}/blobs/{layer}?ns={}",
        cluster.nodes[1].daemon.url(),
        img.repo,
        img.registry
    );
    let before_kill = std::thread::scope(|scope| {
        let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
        let a_pull = scope.spawn(|| a.fetch_checked(img, PULL));
        let b_read = scope.spawn(|| http_get_len(&b_url));
        let deadline = Instant::now() + PULL;
        let got = loop {
            let got = b.daemon.fetched_bytes("peer") + b.daemon.fetched_bytes("origin");
            // Past half the layer: with 8 pieces of 8 MiB in flight, some
            // pieces are surely whole (and journaled).
            if got >= 112.0 * MIB as f64 || b_read.is_finished() || Instant::now() > deadline {
                break got;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            !b_read.is_finished(),
            "B's read ended before the kill; the test proved nothing"
        );
        let pid = b.daemon.pid();
        let killed = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        assert!(killed.is_ok_and(|s| s.success()), "kill -9 {pid}");
        let cut = b_read.join().unwrap_or(Ok(0));
        assert!(
            cut.as_ref().map_or(true, |n| *n < layer_size),
            "B's read got the whole layer from a dead daemon: {cut:?}"
        );
        a_pull
            .join()
            .unwrap_or_else(|_| Err("fetch thread panicked".into()))
            .unwrap_or_else(|e| panic!("A's pull: {e}"));
        got
    });
    note!("killed B after it fetched {before_kill} bytes of {layer_size}");
    cluster.nodes[1].daemon.restart();
    cluster
        .wait_members(1, JOIN)
        .unwrap_or_else(|e| panic!("{e}"));
    let b = &cluster.nodes[1];
    b.fetch_checked(img, PULL)
        .unwrap_or_else(|e| panic!("B's pull after the restart: {e}\n{}", b.report(40)));
    let after = b.daemon.fetched_bytes("peer") + b.daemon.fetched_bytes("origin");
    let origin = SUITE.origin_blob_bytes_since(img, mark);
    note!(
        "after the restart B fetched {after} bytes; origin blob bytes {origin} (image {})",
        img.total_size
    );
    let log = b.daemon.log();
    let resumed_mid_piece = log
        .lines()
        .filter(|l| l.contains("resuming piece download"))
        .filter_map(|l| l.split("partial=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .next();
    assert!(
        resumed_mid_piece.is_some_and(|n| n > 0),
        "B did not resume its piece download of {layer} mid-piece ({resumed_mid_piece:?}):\n{}",
        b.report(40)
    );
    // The journal records whole pieces and each whole MiB of a piece in
    // flight: what B fetches again is what it had not fetched before the
    // kill, plus less than a MiB of each piece in flight (its window of 8,
    // and up to 8 that A asked of B as their owner).
    let unjournaled = 16.0 * MIB as f64;
    assert!(
        after <= layer_size as f64 - before_kill + unjournaled,
        "B fetched {after} bytes of the {layer_size}-byte layer again, \
         after {before_kill} before the kill"
    );
    // What B took from the origin for pieces in flight at the kill, A
    // fetched again when it took B's pieces over while B was down: at most
    // `max_piece_transfers` pieces of 8 MiB.
    let in_flight = 8 * 8 * MIB;
    assert!(
        origin <= img.total_size + in_flight,
        "the origin gave out {origin} blob bytes for an image of {} (+ {in_flight} in flight at the kill)",
        img.total_size
    );
}

/// GETs `url` (plain HTTP) and counts the body's bytes; an error when the
/// connection breaks before the headers.
fn http_get_len(url: &str) -> Result<u64, String> {
    use std::io::{BufRead, BufReader, Read, Write};
    let rest = url.strip_prefix("http://").ok_or("not http")?;
    let (host, path) = rest.split_once('/').ok_or("no path")?;
    let mut s = std::net::TcpStream::connect(host).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(PULL)).map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("closed before the body".into());
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return Ok(n),
            Ok(k) => n += k as u64,
        }
    }
}

// ---------------------------------------------------------------------------
// 2. A peer serves corrupt bytes.

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
    let _heavy = SUITE.heavy();
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = SUITE.image(&I, "swarm/corrupt", &[(520, 48 * MIB)]);
    corrupt_case(img, false, Liar::Lies);
}

/// The same with a liar that got the blob before it had peers (its own
/// plain download), and a puller that joins only afterwards.
#[test]
fn corrupt_peer_without_checksums_is_repaired() {
    let _heavy = SUITE.heavy();
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = SUITE.image(&I, "swarm/corrupt-nosum", &[(521, 48 * MIB)]);
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
    let _heavy = SUITE.heavy();
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = SUITE.image(&I, "swarm/rotten", &[(522, 48 * MIB)]);
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
    let reg = SUITE.origin();
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
    let out_before = liar.daemon.peer_bytes_out();
    puller
        .fetch_checked(img, PULL)
        .unwrap_or_else(|e| panic!("{e}\n{}", liar.report(40)));
    let served = liar.daemon.peer_bytes_out() - out_before;
    note!(
        "puller: from peers {}, from origin {}; origin blob bytes {}; the liar served {served}",
        puller.daemon.fetched_bytes("peer"),
        puller.daemon.fetched_bytes("origin"),
        SUITE.origin_blob_bytes_since(img, mark)
    );
    let bypassed = SUITE.bypassed_blob_requests(img, mark);
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
// 3. Every peer is gone.

/// A node whose bootstrap peers are all stopped, one of them a holder of
/// the image it wants, still pulls: from the origin.
#[test]
fn all_peers_gone() {
    let _heavy = SUITE.heavy();
    static I: OnceLock<PushedImage> = OnceLock::new();
    let img = SUITE.image(&I, "swarm/gone", &[(530, 16 * MIB), (531, 4 * MIB)]);
    let reg = SUITE.origin();
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
    let origin_bytes = SUITE.origin_blob_bytes_since(img, mark);
    note!("pulled alone in {took:?}; origin blob bytes {origin_bytes}");
    let bypassed = SUITE.bypassed_blob_requests(img, mark);
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
        alone.daemon.fetched_bytes("peer"),
        0.0,
        "bytes from peers that are dead?\n{}",
        alone.report(40)
    );
}
