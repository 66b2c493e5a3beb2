//! The piece engine against [`MemorySwarm`]: the schedule (holders, owners,
//! hedging, stalls, corrupt peers, the repair path, size adoption) checked
//! without a real peer.
//!
//! Tests whose pieces come only from peers run under paused time: a hedge
//! or a stall takes no wall-clock time, and the runtime advances the clock
//! only when every task waits on a timer (never while a `spawn_blocking`
//! write is in flight), so they run the same way every time. Tests that
//! need the origin run in real time with a registry stand-in on loopback
//! in the test's own runtime: under paused time the clock would jump ahead
//! whenever the client waits on the socket, and fire the engine's hedge and
//! stall timers early.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Full;
use sha2::Digest as _;

use crate::fetch::Fetcher;
use crate::oci::Digest;
use crate::origin::{Origin, Upstream};
use crate::store::{Store, SUM_CHUNK};
use crate::swarm::data::{PeerAsk, PeerBlobs, PeerRead};
use crate::swarm::memory::{MemorySwarm, Script, Tuning};
use crate::swarm::{rendezvous, PeerNet, PieceSource};
use crate::telemetry::Metrics;

mod relay;

const MIB: u64 = 1 << 20;
const PIECE: u64 = 2 * MIB;
const REPO: &str = "models/llm";

/// `n` bytes that differ everywhere, and their digest.
fn blob(n: u64) -> (Bytes, Digest) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let d = Digest::from_sha256(&sha2::Sha256::digest(&data));
    (Bytes::from(data), d)
}

/// What the registry stand-in served.
#[derive(Default)]
struct Served {
    bytes: AtomicU64,
    ranges: Mutex<Vec<(u64, u64)>>,
}

/// A registry on loopback that serves `data` as blob `digest` of [`REPO`],
/// with ranges, counting what it sends.
async fn origin(data: Bytes, digest: Digest) -> (SocketAddr, Arc<Served>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(Served::default());
    let seen = served.clone();
    let path = format!("/v2/{REPO}/blobs/{digest}");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (data, seen, path) = (data.clone(), seen.clone(), path.clone());
            let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                let (data, seen, path) = (data.clone(), seen.clone(), path.clone());
                async move {
                    let total = data.len() as u64;
                    if req.uri().path() != path {
                        return Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        );
                    }
                    let range = req
                        .headers()
                        .get(http::header::RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("bytes="))
                        .and_then(|v| v.split_once('-'))
                        .map(|(a, b)| {
                            let a: u64 = a.parse().unwrap();
                            let b: u64 = b.parse().map_or(total - 1, |b: u64| b.min(total - 1));
                            (a, b + 1)
                        });
                    let (start, end) = range.unwrap_or((0, total));
                    seen.bytes.fetch_add(end - start, Ordering::SeqCst);
                    seen.ranges.lock().unwrap().push((start, end));
                    let mut resp =
                        http::Response::builder().header(http::header::CONTENT_LENGTH, end - start);
                    resp = match range {
                        Some(_) => resp.status(206).header(
                            http::header::CONTENT_RANGE,
                            format!("bytes {start}-{}/{total}", end - 1),
                        ),
                        None => resp.status(200),
                    };
                    Ok(resp
                        .body(Full::new(data.slice(start as usize..end as usize)))
                        .unwrap())
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, served)
}

struct Lab {
    _dir: tempfile::TempDir,
    fetcher: Fetcher,
    swarm: MemorySwarm,
    up: Upstream,
    metrics: Metrics,
}

/// A node with an empty store, the fake swarm, and `origin` as the
/// registry `origin.test` (`None`: a port nothing listens on, so that a
/// test whose bytes must all come from peers fails if any is asked of the
/// origin).
fn lab(tuning: Tuning, origin: Option<SocketAddr>) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = origin.map_or("http://127.0.0.1:9".to_owned(), |a| format!("http://{a}"));
    let text = format!(
        "[store]\ndir = \"{}\"\n\n[origin]\nretries = 0\n\n[[registry]]\nhost = \"origin.test\"\nendpoint = \"{endpoint}\"\n",
        dir.path().join("store").display()
    );
    let cfg = crate::config::Config::parse(&text, &dir.path().join("c.toml")).unwrap();
    let (store, _) = Store::open(&dir.path().join("store"), 1 << 30).unwrap();
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let origin = Origin::new(&cfg, metrics.clone()).unwrap();
    let up = origin.upstream("origin.test").unwrap();
    let swarm = MemorySwarm::new(tuning);
    let peers: Arc<dyn PeerNet> = Arc::new(swarm.clone());
    let fetcher = Fetcher::new(&cfg, store, origin, metrics.clone(), Some(peers));
    Lab {
        _dir: dir,
        fetcher,
        swarm,
        up,
        metrics,
    }
}

fn tuning() -> Tuning {
    Tuning {
        piece_size: PIECE,
        max_piece_transfers: 4,
        hedge_after: Duration::from_millis(500),
        stall_timeout: Duration::from_secs(2),
        relay_fanout: rendezvous::RELAY_FANOUT,
    }
}

impl Lab {
    /// Pulls the whole blob as a reader on this node does.
    async fn pull(&self, digest: &Digest) -> Result<Vec<u8>, String> {
        let blob = self
            .fetcher
            .blob(&self.up, REPO, digest, None)
            .await
            .map_err(|e| e.to_string())?;
        let size = blob.size;
        let mut body = Box::pin(blob.stream(0, size, self.metrics.clone()));
        let mut out = Vec::new();
        while let Some(c) = body.next().await {
            out.extend_from_slice(&c.map_err(|e| e.to_string())?);
        }
        Ok(out)
    }

    /// Waits for the blob's commit, as prewarm does, then pulls it.
    async fn ensure_and_pull(&self, digest: &Digest) -> Vec<u8> {
        self.fetcher
            .ensure_blob(&self.up, REPO, digest, crate::fetch::Priority::Live)
            .await
            .unwrap();
        self.pull(digest).await.unwrap()
    }

    /// The first peer in the plan for piece `k` of a blob of `size` bytes
    /// (a fresh plan: nothing failed yet).
    fn first_for(&self, digest: &Digest, k: u64, size: u64) -> Option<libp2p::PeerId> {
        match self
            .swarm
            .piece_plan(digest, k, Some(pieces(size)), true, &HashSet::new())
            .first()
        {
            Some(PieceSource::Peer(p)) => Some(p.id),
            _ => None,
        }
    }
}

fn pieces(size: u64) -> u64 {
    size.div_ceil(PIECE)
}

#[tokio::test(start_paused = true)]
async fn a_holder_serves_every_piece_and_the_origin_nothing() {
    let (data, d) = blob(5 * MIB + 12_345);
    let lab = lab(tuning(), None);
    let h = lab.swarm.add_peer(Script::Serves {
        data: data.clone(),
        sums: true,
    });
    lab.swarm.announce_holder(&d, h);
    let got = lab.pull(&d).await.unwrap();
    assert!(got == data, "the bytes differ");
    let asked = lab.swarm.asked();
    assert_eq!(asked.len() as u64, pieces(data.len() as u64), "{asked:?}");
    assert!(asked.iter().all(|a| a.peer == h));
    // Every piece once, each where it starts.
    let starts: HashSet<u64> = asked.iter().map(|a| a.start).collect();
    let want: HashSet<u64> = (0..pieces(data.len() as u64)).map(|k| k * PIECE).collect();
    assert_eq!(starts, want);
    assert_eq!(lab.metrics.origin_bytes.get(), 0);
    assert_eq!(lab.swarm.wants(), vec![d.clone()]);
    assert_eq!(lab.swarm.committed(), vec![(d.clone(), data.len() as u64)]);
    assert!(lab.fetcher.store().contains(&d));
    // The sums this node will send are those of its bytes, though most
    // were taken from the holder's checked ones rather than summed again.
    assert_eq!(committed_sums(&lab, &d, &data), sums_of(&data));
}

/// The chunk sums committed with blob `d`.
fn committed_sums(lab: &Lab, d: &Digest, data: &[u8]) -> Vec<u64> {
    let size = data.len() as u64;
    lab.fetcher
        .store()
        .sums_slice(d, size, 0, size.div_ceil(SUM_CHUNK) as usize)
        .expect("sums committed")
}

fn sums_of(data: &[u8]) -> Vec<u64> {
    data.chunks(SUM_CHUNK as usize)
        .map(xxhash_rust::xxh3::xxh3_64)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_slow_holder_is_hedged_by_the_next() {
    let (data, d) = blob(8 * MIB);
    let lab = lab(tuning(), None);
    let delay = Duration::from_secs(60);
    let slow = lab.swarm.add_peer(Script::Late {
        data: data.clone(),
        sums: true,
        delay,
    });
    let fast = lab.swarm.add_peer(Script::Serves {
        data: data.clone(),
        sums: true,
    });
    lab.swarm.announce_holder(&d, slow);
    lab.swarm.announce_holder(&d, fast);
    let slow_first = (0..pieces(data.len() as u64))
        .filter(|k| lab.first_for(&d, *k, data.len() as u64) == Some(slow))
        .count() as u64;
    assert!(
        slow_first > 0,
        "the slow holder should rank first for some piece"
    );
    let t0 = tokio::time::Instant::now();
    let got = lab.pull(&d).await.unwrap();
    assert!(got == data);
    // Each piece the slow holder was asked first for was hedged once, and
    // nothing waited for the slow answer.
    assert_eq!(lab.metrics.hedges.get(), slow_first);
    assert!(t0.elapsed() < delay, "waited {:?}", t0.elapsed());
    assert!(lab.swarm.distrusted().is_empty(), "slow is not bad");
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_stalls_mid_piece_is_dropped_and_another_sends_the_rest() {
    let (data, d) = blob(8 * MIB);
    let lab = lab(tuning(), None);
    // Past one checksum chunk: that chunk is written, the rest is asked of
    // the other holder from there.
    let after = SUM_CHUNK + 100_000;
    let stalls = lab.swarm.add_peer(Script::Stalls {
        data: data.clone(),
        after,
    });
    let good = lab.swarm.add_peer(Script::Serves {
        data: data.clone(),
        sums: true,
    });
    lab.swarm.announce_holder(&d, stalls);
    lab.swarm.announce_holder(&d, good);
    let stalled: Vec<u64> = (0..pieces(data.len() as u64))
        .filter(|k| lab.first_for(&d, *k, data.len() as u64) == Some(stalls))
        .collect();
    assert!(!stalled.is_empty());
    let t0 = tokio::time::Instant::now();
    let got = lab.pull(&d).await.unwrap();
    assert!(got == data);
    let asked = lab.swarm.asked();
    for k in &stalled {
        let resume = k * PIECE + SUM_CHUNK;
        assert!(
            asked.iter().any(|a| a.peer == good && a.start == resume),
            "piece {k}: the rest was not asked from {resume}: {asked:?}"
        );
    }
    // One stall timeout per stalled piece at most, in parallel.
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(
        lab.swarm.distrusted().is_empty(),
        "a stall is not corruption"
    );
    assert_eq!(committed_sums(&lab, &d, &data), sums_of(&data));
}

#[tokio::test(start_paused = true)]
async fn a_chunk_that_does_not_match_its_checksum_is_never_written_and_its_sender_distrusted() {
    let (data, d) = blob(8 * MIB);
    let lab = lab(tuning(), None);
    let liar = lab.swarm.add_peer(Script::Serves {
        data: data.clone(),
        sums: true,
    });
    let good = lab.swarm.add_peer(Script::Serves {
        data: data.clone(),
        sums: true,
    });
    // The corrupt byte lies in a piece the liar ranks first for.
    lab.swarm.announce_holder(&d, liar);
    lab.swarm.announce_holder(&d, good);
    let k = (0..pieces(data.len() as u64))
        .find(|k| lab.first_for(&d, *k, data.len() as u64) == Some(liar))
        .expect("the liar ranks first for some piece");
    let at = k * PIECE + SUM_CHUNK + 7;
    lab.swarm.script(
        liar,
        Script::Corrupts {
            data: data.clone(),
            at,
            sums: true,
        },
    );
    let got = lab.pull(&d).await.unwrap();
    assert!(got == data);
    let distrusted = lab.swarm.distrusted();
    assert_eq!(distrusted.len(), 1, "{distrusted:?}");
    assert_eq!(distrusted[0].0, liar);
    assert!(distrusted[0].1.contains("checksum"), "{}", distrusted[0].1);
    // Caught chunk by chunk: the blob's digest never failed.
    assert_eq!(lab.metrics.digest_mismatches.get(), 0);
    assert_eq!(lab.metrics.origin_bytes.get(), 0);
    assert_eq!(committed_sums(&lab, &d, &data), sums_of(&data));
}

#[tokio::test(start_paused = true)]
async fn a_peer_asking_for_one_piece_starts_a_download_of_just_that_piece_with_its_size() {
    let (data, d) = blob(6 * MIB + 1);
    let lab = lab(tuning(), None);
    let h = lab.swarm.add_peer(Script::Serves {
        data: data.clone(),
        sums: true,
    });
    lab.swarm.announce_holder(&d, h);
    let size = data.len() as u64;
    let (start, end_incl) = (PIECE, 2 * PIECE - 1);
    let read = lab
        .fetcher
        .read_for_peer(PeerAsk {
            digest: &d,
            start,
            end_incl,
            size: Some(size),
            origin: Some(("origin.test", REPO)),
            relay: false,
        })
        .await
        .unwrap();
    let PeerRead::Bytes {
        size: got_size,
        start: s,
        end,
        body,
        ..
    } = read
    else {
        panic!("not served");
    };
    // The size the peer asked with laid the download out: piece 1 was
    // asked for at once, and nothing else.
    assert_eq!((got_size, s, end), (size, start, end_incl + 1));
    let bytes: Vec<u8> = body.map(|c| c.unwrap()).collect::<Vec<_>>().await.concat();
    assert!(bytes[..] == data[start as usize..=end_incl as usize]);
    let asked = lab.swarm.asked();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!((asked[0].start, asked[0].end_incl), (start, end_incl));
    assert_eq!(asked[0].size, Some(size));
    assert!(
        lab.swarm.committed().is_empty(),
        "one piece is not the blob"
    );
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_claims_an_impossible_size_is_distrusted() {
    let (data, d) = blob(4 * MIB);
    let lab = lab(tuning(), None);
    let liar = lab.swarm.add_peer(Script::ClaimsSize { total: 1 << 50 });
    let good = lab.swarm.add_peer(Script::Serves {
        data: data.clone(),
        sums: true,
    });
    lab.swarm.announce_holder(&d, liar);
    lab.swarm.announce_holder(&d, good);
    // The size is learnt from piece 0's answer; the liar must be asked it.
    if lab.first_for(&d, 0, data.len() as u64) != Some(liar) {
        lab.swarm
            .script(good, Script::ClaimsSize { total: 1 << 50 });
        lab.swarm.script(
            liar,
            Script::Serves {
                data: data.clone(),
                sums: true,
            },
        );
    }
    let claimer = if lab.first_for(&d, 0, data.len() as u64) == Some(liar) {
        liar
    } else {
        good
    };
    let got = lab.pull(&d).await.unwrap();
    assert!(got == data);
    let distrusted = lab.swarm.distrusted();
    assert_eq!(distrusted.len(), 1, "{distrusted:?}");
    assert_eq!(distrusted[0].0, claimer);
    assert!(distrusted[0].1.contains("size"), "{}", distrusted[0].1);
}

/// The owner of piece `k` of a blob of `size` bytes among this node and
/// `peers` (balanced rendezvous).
fn owner(lab: &Lab, d: &Digest, k: u64, size: u64, peers: &[libp2p::PeerId]) -> libp2p::PeerId {
    let ids: Vec<libp2p::PeerId> = std::iter::once(lab.swarm.local())
        .chain(peers.iter().copied())
        .collect();
    let bytes: Vec<Vec<u8>> = ids.iter().map(|p| p.to_bytes()).collect();
    let refs: Vec<&[u8]> = bytes.iter().map(|b| b.as_slice()).collect();
    ids[rendezvous::owner(&d.to_string(), k, pieces(size), &refs).unwrap()]
}

#[tokio::test]
async fn each_piece_comes_from_its_owner_and_this_nodes_own_from_the_origin_once() {
    let (data, d) = blob(16 * MIB + 3);
    let (addr, served) = origin(data.clone(), d.clone()).await;
    let lab = lab(tuning(), Some(addr));
    // Owners that hold nothing yet: each fetches its pieces from its own
    // origin and passes them on (here they simply have the bytes).
    let peers = [
        lab.swarm.add_peer(Script::Serves {
            data: data.clone(),
            sums: false,
        }),
        lab.swarm.add_peer(Script::Serves {
            data: data.clone(),
            sums: false,
        }),
    ];
    let got = lab.pull(&d).await.unwrap();
    assert!(got == data);
    let size = data.len() as u64;
    let mut mine = 0u64;
    let asked = lab.swarm.asked();
    for k in 0..pieces(size) {
        let len = PIECE.min(size - k * PIECE);
        let o = owner(&lab, &d, k, size, &peers);
        let to_owner = asked
            .iter()
            .filter(|a| a.start == k * PIECE && a.peer == o)
            .count();
        if o == lab.swarm.local() {
            mine += len;
            assert!(asked.iter().all(|a| a.start != k * PIECE), "piece {k}");
        } else {
            assert_eq!(
                to_owner, 1,
                "piece {k} not asked once of its owner: {asked:?}"
            );
        }
    }
    assert!(mine > 0 && mine < size, "this node should own some pieces");
    assert_eq!(served.bytes.load(Ordering::SeqCst), mine, "origin bytes");
    assert_eq!(lab.metrics.origin_bytes.get(), mine);
}

#[tokio::test]
async fn a_corrupt_piece_without_checksums_is_repaired_from_the_origin_and_its_sender_distrusted() {
    let (data, d) = blob(12 * MIB);
    let (addr, served) = origin(data.clone(), d.clone()).await;
    let lab = lab(tuning(), Some(addr));
    let a = lab.swarm.add_peer(Script::Serves {
        data: data.clone(),
        sums: false,
    });
    let b = lab.swarm.add_peer(Script::Serves {
        data: data.clone(),
        sums: false,
    });
    let size = data.len() as u64;
    let k = (0..pieces(size))
        .find(|k| owner(&lab, &d, *k, size, &[a, b]) == a)
        .expect("a owns some piece");
    lab.swarm.script(
        a,
        Script::Corrupts {
            data: data.clone(),
            at: k * PIECE + 5,
            sums: false,
        },
    );
    // A reader that streamed past the first peer piece has sent bytes that
    // may be wrong: it is cut, never handed a complete wrong body.
    let first = lab.pull(&d).await;
    assert!(
        first.as_ref().is_err_and(|e| e.contains("may be wrong")),
        "{:?}",
        first.map(|b| b.len())
    );
    // The repaired blob is committed; the next pull reads it.
    let got = lab.ensure_and_pull(&d).await;
    assert!(got == data, "the repaired blob differs");
    let distrusted = lab.swarm.distrusted();
    assert_eq!(distrusted.len(), 1, "{distrusted:?}");
    assert_eq!(distrusted[0].0, a);
    assert!(distrusted[0].1.contains("origin"), "{}", distrusted[0].1);
    // Every piece that came from a peer was fetched again from the origin
    // to find the bad one.
    let ranges = served.ranges.lock().unwrap().clone();
    assert!(
        ranges.iter().any(|r| r.0 == k * PIECE),
        "piece {k} was not fetched from the origin: {ranges:?}"
    );
    assert!(lab.fetcher.store().contains(&d));
}

#[tokio::test]
async fn the_origin_is_the_last_resort_when_no_peer_answers() {
    let (data, d) = blob(7 * MIB);
    let (addr, served) = origin(data.clone(), d.clone()).await;
    let lab = lab(tuning(), Some(addr));
    lab.swarm.add_peer(Script::Refuses);
    lab.swarm.add_peer(Script::Busy);
    let got = lab.pull(&d).await.unwrap();
    assert!(got == data);
    // Each byte once, whoever owned the piece.
    assert_eq!(served.bytes.load(Ordering::SeqCst), data.len() as u64);
    assert!(lab.swarm.distrusted().is_empty());
}

/// Leaves what a download killed mid-way leaves: the bytes of `pieces` in
/// the partial file, and their journal lines (in `piece_size` pieces).
fn crashed_download(lab: &Lab, d: &Digest, data: &Bytes, piece_size: u64, pieces: &[u64]) {
    crashed_mid_piece(lab, d, data, piece_size, pieces, &[]);
}

/// As [`crashed_download`], with pieces that were in flight too: the
/// first `len` bytes of piece `k` for each `(k, len)` of `partial`.
fn crashed_mid_piece(
    lab: &Lab,
    d: &Digest,
    data: &Bytes,
    piece_size: u64,
    pieces: &[u64],
    partial: &[(u64, u64)],
) {
    use std::os::unix::fs::FileExt;
    let store = lab.fetcher.store();
    let file = std::fs::File::create(store.partial_path(d)).unwrap();
    let size = data.len() as u64;
    let mut journal =
        crate::fetch::journal::Journal::create(&store.pieces_path(d), size, piece_size).unwrap();
    for &k in pieces {
        let (start, end) = (k * piece_size, ((k + 1) * piece_size).min(size));
        file.write_all_at(&data[start as usize..end as usize], start)
            .unwrap();
        journal.done(k as usize).unwrap();
    }
    for &(k, len) in partial {
        let start = k * piece_size;
        file.write_all_at(&data[start as usize..(start + len) as usize], start)
            .unwrap();
        journal.partial(k as usize, len).unwrap();
    }
}

/// A node with a holder of a 9 MiB blob (five pieces) and the origin, for
/// the restart tests.
async fn restarted_with_holder() -> (Lab, Bytes, Digest, Arc<Served>) {
    let (data, d) = blob(9 * MIB + 5);
    let (addr, served) = origin(data.clone(), d.clone()).await;
    let lab = lab(tuning(), Some(addr));
    let h = lab.swarm.add_peer(Script::Serves {
        data: data.clone(),
        sums: true,
    });
    lab.swarm.announce_holder(&d, h);
    (lab, data, d, served)
}

#[tokio::test]
async fn a_restarted_piece_download_fetches_only_what_its_journal_lacks() {
    let (lab, data, d, served) = restarted_with_holder().await;
    crashed_download(&lab, &d, &data, PIECE, &[0, 2, 4]);
    let got = lab.pull(&d).await.unwrap();
    assert!(got == data, "the bytes differ");
    let mut asked: Vec<u64> = lab.swarm.asked().iter().map(|a| a.start).collect();
    asked.sort_unstable();
    assert_eq!(asked, vec![PIECE, 3 * PIECE], "pieces asked of peers");
    assert_eq!(served.bytes.load(Ordering::SeqCst), 0, "origin bytes");
    let store = lab.fetcher.store();
    assert!(store.contains(&d));
    assert!(!store.pieces_path(&d).exists(), "journal left behind");
}

#[tokio::test]
async fn a_piece_in_flight_at_a_restart_goes_on_from_its_last_journaled_mib() {
    let (lab, data, d, served) = restarted_with_holder().await;
    // Pieces 0 and 4 whole, 1 MiB of piece 1 and 1 MiB of piece 3.
    crashed_mid_piece(&lab, &d, &data, PIECE, &[0, 4], &[(1, MIB), (3, MIB)]);
    let got = lab.pull(&d).await.unwrap();
    assert!(got == data, "the bytes differ");
    let mut asked: Vec<(u64, u64)> = lab
        .swarm
        .asked()
        .iter()
        .map(|a| (a.start, a.end_incl))
        .collect();
    asked.sort_unstable();
    assert_eq!(
        asked,
        vec![
            (PIECE + MIB, 2 * PIECE - 1),
            (2 * PIECE, 3 * PIECE - 1),
            (3 * PIECE + MIB, 4 * PIECE - 1)
        ],
        "ranges asked of peers"
    );
    assert_eq!(served.bytes.load(Ordering::SeqCst), 0, "origin bytes");
    // The holder's checksums covered the rest of each resumed piece (they
    // start on a chunk): nobody was distrusted, nothing was refetched.
    assert!(lab.swarm.distrusted().is_empty());
    assert!(!lab.fetcher.store().pieces_path(&d).exists());
}

#[tokio::test(start_paused = true)]
async fn a_piece_in_flight_is_journaled_at_each_whole_mib() {
    let (data, d) = blob(9 * MIB + 5);
    let lab = Arc::new(lab(tuning(), None));
    // Every piece stops after 1.5 MiB: its first MiB is checked and on disk.
    let h = lab.swarm.add_peer(Script::Stalls {
        data: data.clone(),
        after: MIB + MIB / 2,
    });
    lab.swarm.announce_holder(&d, h);
    let l = lab.clone();
    let d2 = d.clone();
    let pull = tokio::spawn(async move { l.pull(&d2).await });
    let path = lab.fetcher.store().pieces_path(&d);
    let want: Vec<(usize, u64)> = (0..4).map(|k| (k, MIB)).collect();
    let mut seen = None;
    for _ in 0..1000 {
        seen = crate::fetch::journal::read(&path, 1 << 40);
        if seen.as_ref().is_some_and(|r| r.partial == want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    pull.abort();
    let r = seen.expect("no journal");
    // Four transfers at once (max_piece_transfers), none of them whole.
    assert_eq!(r.partial, want, "{r:?}");
    assert!(r.done.is_empty(), "{r:?}");
}

#[tokio::test]
async fn a_node_alone_after_a_restart_resumes_mid_piece_from_the_origin() {
    let (data, d) = blob(9 * MIB + 5);
    let (addr, served) = origin(data.clone(), d.clone()).await;
    let lab = lab(tuning(), Some(addr));
    crashed_mid_piece(&lab, &d, &data, PIECE, &[0, 3], &[(1, MIB), (4, MIB)]);
    let got = lab.pull(&d).await.unwrap();
    assert!(got == data, "the bytes differ");
    let size = data.len() as u64;
    let mut ranges = served.ranges.lock().unwrap().clone();
    ranges.sort_unstable();
    assert_eq!(
        served.bytes.load(Ordering::SeqCst),
        size - 2 * PIECE - 2 * MIB,
        "origin bytes: {ranges:?}"
    );
    assert!(!lab.fetcher.store().pieces_path(&d).exists());
}

#[tokio::test]
async fn a_resumed_piece_that_is_wrong_is_refetched_from_the_origin_and_nobody_distrusted() {
    use std::os::unix::fs::FileExt;
    let (lab, data, d, served) = restarted_with_holder().await;
    crashed_download(&lab, &d, &data, PIECE, &[0, 2, 4]);
    // Journaled, but its bytes were lost (a power cut after the line).
    let partial = std::fs::OpenOptions::new()
        .write(true)
        .open(lab.fetcher.store().partial_path(&d))
        .unwrap();
    partial.write_all_at(&[0; 100], 2 * PIECE + 7).unwrap();
    // A reader may be cut (it streamed past a suspect piece); the blob
    // that is committed is the right one.
    let _ = lab.pull(&d).await;
    let got = lab.ensure_and_pull(&d).await;
    assert!(got == data, "the repaired blob differs");
    let ranges = served.ranges.lock().unwrap().clone();
    assert!(
        ranges.iter().any(|r| r.0 == 2 * PIECE),
        "the bad resumed piece was not fetched from the origin: {ranges:?}"
    );
    assert!(
        lab.swarm.distrusted().is_empty(),
        "{:?}",
        lab.swarm.distrusted()
    );
}

#[tokio::test]
async fn a_journal_for_another_piece_size_is_not_trusted() {
    let (lab, data, d, served) = restarted_with_holder().await;
    // Pieces of 1 MiB on disk; this node cuts blobs in 2 MiB pieces.
    crashed_download(&lab, &d, &data, MIB, &[0, 1, 2, 3]);
    let got = lab.pull(&d).await.unwrap();
    assert!(got == data);
    let asked = lab.swarm.asked();
    for k in 0..pieces(data.len() as u64) {
        assert!(
            asked.iter().any(|a| a.start == k * PIECE),
            "piece {k} was not fetched: {asked:?}"
        );
    }
    assert_eq!(served.bytes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_node_alone_after_a_restart_fetches_only_the_pieces_its_journal_lacks() {
    let (data, d) = blob(9 * MIB + 5);
    let (addr, served) = origin(data.clone(), d.clone()).await;
    // No peers: the missing pieces come from the origin, piece by piece
    // (a sequential download could keep only the gap-free prefix).
    let lab = lab(tuning(), Some(addr));
    crashed_download(&lab, &d, &data, PIECE, &[0, 1, 3]);
    let got = lab.pull(&d).await.unwrap();
    assert!(got == data, "the bytes differ");
    let size = data.len() as u64;
    assert_eq!(
        served.bytes.load(Ordering::SeqCst),
        size - 3 * PIECE,
        "origin bytes: {:?}",
        served.ranges.lock().unwrap()
    );
    assert!(!lab.fetcher.store().pieces_path(&d).exists());
}
