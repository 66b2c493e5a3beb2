//! The byte path with a real daemon and a real `docker-registry`: the
//! mirror's own HTTP/1.1 connections that send blob bodies with sendfile,
//! and parallel ranged GETs from the origin (through the lab's proxy,
//! which counts, caps and breaks what passes).
//!
//! These would fail if the new paths broke: sendfile serving other bytes
//! than the cache holds (whole bodies, ranges, verified or not), keep-alive
//! and pipelining on the mirror's connections, corrupt bytes on one of the
//! parallel ranges reaching a client whole, a range that breaks mid-way not
//! being resumed, the window not bounding the parts in flight, and memory
//! growing with the number of readers.

use std::io::{Read, Write};
use std::sync::OnceLock;
use std::time::Duration;

use common::{get_hashed, random_bytes, Fault, FaultProxy, Registry, RegistryAuth};
use daemon::{Daemon, Options};
use damselfly_lab as common;
use damselfly_lab::daemon;

const MIB: u64 = 1 << 20;

type Blob = common::RandomBlob;

fn origin() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| {
        common::require_tools();
        Registry::start(RegistryAuth::None).expect("registry")
    })
}

fn blob(repo: &str, seed: u64, size: u64) -> Blob {
    common::push_random_blob(&origin().url(), repo, seed, size)
}

/// A blob that is not a whole number of chunks, so ranges and spans meet
/// a short last chunk.
fn odd_blob() -> &'static Blob {
    static B: OnceLock<Blob> = OnceLock::new();
    B.get_or_init(|| blob("bytepath/odd", 41, 6 * MIB + 12_345))
}

/// 12 MiB and a bit: 13 parts of 1 MiB.
fn parts_blob() -> &'static Blob {
    static B: OnceLock<Blob> = OnceLock::new();
    B.get_or_init(|| blob("bytepath/parts", 42, 12 * MIB + 333))
}

/// A daemon for `host` at `endpoint`, with extra `[origin]` and `[store]`
/// lines.
fn daemon(host: &str, endpoint: &str, origin_keys: &str, store_keys: &str) -> Daemon {
    Daemon::start_with(Options {
        store: store_keys.to_owned(),
        extra: format!(
            "[origin]\nretries = 5\nread_timeout = \"5s\"\n{origin_keys}\n\
             [[registry]]\nhost = \"{host}\"\nendpoint = \"{endpoint}\"\n"
        ),
        ..Default::default()
    })
}

fn blob_url(d: &Daemon, ns: &str, b: &Blob) -> String {
    format!("{}/v2/{}/blobs/{}?ns={ns}", d.url(), b.repo, b.digest)
}

/// GETs `url` with `range` (if any): status, headers, body.
async fn get(
    client: &reqwest::Client,
    url: &str,
    range: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = client.get(url);
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.bytes().await.expect("body").to_vec())
}

/// Whole bodies and ranges of every shape, from the cache with verified
/// reads and without, are exactly the blob's bytes: what sendfile sends is
/// what the store holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendfile_serves_exactly_the_cached_bytes() {
    let b = tokio::task::spawn_blocking(odd_blob).await.unwrap();
    let reg = origin();
    let client = reqwest::Client::new();
    for verify in [true, false] {
        let d = daemon(
            &reg.host(),
            &reg.url(),
            "",
            &format!("verify_reads = {verify}"),
        );
        let url = blob_url(&d, &reg.host(), b);
        // Cold, then from the cache.
        for round in ["cold", "hit"] {
            let (status, digest, n) = get_hashed(&client, &url).await.expect(round);
            assert_eq!(
                (status, n, digest.as_str()),
                (200, b.size, b.digest.as_str()),
                "{round}"
            );
        }
        let size = b.size;
        let cases: Vec<(String, u64, u64)> = vec![
            ("bytes=0-0".into(), 0, 1),
            ("bytes=1000-1999".into(), 1000, 2000),
            // Across a chunk boundary, starting inside a chunk.
            (
                format!("bytes={}-{}", MIB - 7, 2 * MIB + 9),
                MIB - 7,
                2 * MIB + 10,
            ),
            // Exactly one chunk.
            (
                format!("bytes={}-{}", 3 * MIB, 4 * MIB - 1),
                3 * MIB,
                4 * MIB,
            ),
            // Open-ended, into the short last chunk.
            (format!("bytes={}-", 5 * MIB + 17), 5 * MIB + 17, size),
            ("bytes=-5000".into(), size - 5000, size),
            (format!("bytes={}-{}", size - 1, size - 1), size - 1, size),
        ];
        for (spec, start, end) in cases {
            let (status, h, body) = get(&client, &url, Some(&spec)).await;
            assert_eq!(status, 206, "{spec}, verify_reads = {verify}");
            assert_eq!(
                h["content-range"],
                format!("bytes {start}-{}/{size}", end - 1).as_str(),
                "{spec}"
            );
            assert_eq!(h["content-length"], (end - start).to_string().as_str());
            assert!(
                body == random_bytes(b.seed, start, (end - start) as usize),
                "{spec}, verify_reads = {verify}: the bytes differ from the blob's"
            );
        }
        let head = client.head(&url).send().await.expect("HEAD");
        assert_eq!(head.status(), 200);
        assert_eq!(head.headers()["content-length"], size.to_string().as_str());
        assert!(head.bytes().await.unwrap().is_empty());
        assert_eq!(
            d.metric(r#"damselfly_cache_lookups_total{kind="blob",result="hit"}"#) as u64,
            1 + 7 + 1,
            "every request after the first was a cache hit"
        );
    }
}

/// Sends `request` on a fresh connection and reads until the daemon closes
/// it (or 10 s pass).
fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// Splits raw HTTP/1.1 responses (each with a Content-Length) into
/// (head, body) pairs.
fn split_responses(mut raw: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let body_start = end + 4;
        let body_end = (body_start + len).min(raw.len());
        out.push((head, raw[body_start..body_end].to_vec()));
        raw = &raw[body_end..];
    }
    out
}

/// The mirror's own connections: pipelined requests are answered in order
/// on one connection, HTTP/1.0 closes unless asked to keep alive, a request
/// with a body is answered and closed, and a malformed head gets a 400.
#[test]
fn keep_alive_pipelining_and_closing() {
    let b = odd_blob();
    let reg = origin();
    let d = daemon(&reg.host(), &reg.url(), "", "");
    let addr: std::net::SocketAddr = d.url().trim_start_matches("http://").parse().unwrap();
    let path = format!("/v2/{}/blobs/{}?ns={}", b.repo, b.digest, reg.host());
    // Fill the cache.
    let raw = raw_exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    let r = split_responses(&raw);
    assert_eq!(r.len(), 1);
    assert!(r[0].0.starts_with("HTTP/1.1 200 OK"), "{}", r[0].0);
    assert_eq!(r[0].1.len() as u64, b.size);

    // Three pipelined requests in one write: two ranges and the base; the
    // last asks to close.
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: m\r\nRange: bytes=10-19\r\n\r\n\
         GET {path} HTTP/1.1\r\nHost: m\r\nRange: bytes={}-{}\r\n\r\n\
         GET /v2/ HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
        2 * MIB,
        2 * MIB + 99
    );
    let r = split_responses(&raw_exchange(addr, req.as_bytes()));
    assert_eq!(r.len(), 3, "{r:?}");
    assert!(r[0].0.starts_with("HTTP/1.1 206 "), "{}", r[0].0);
    assert_eq!(r[0].1, random_bytes(b.seed, 10, 10));
    assert!(r[1].0.starts_with("HTTP/1.1 206 "), "{}", r[1].0);
    assert_eq!(r[1].1, random_bytes(b.seed, 2 * MIB, 100));
    assert!(r[2].0.starts_with("HTTP/1.1 200 "), "{}", r[2].0);
    assert!(r[2].0.to_ascii_lowercase().contains("connection: close"));
    assert_eq!(r[2].1, b"{}");

    // HTTP/1.0 without keep-alive: one answer, then the daemon closes (the
    // second request is never answered).
    let req = "GET /v2/ HTTP/1.0\r\n\r\nGET /v2/ HTTP/1.0\r\n\r\n";
    let r = split_responses(&raw_exchange(addr, req.as_bytes()));
    assert_eq!(r.len(), 1, "{r:?}");
    // HTTP/1.0 with keep-alive: both answered (the second one closes).
    let req = "GET /v2/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /v2/ HTTP/1.0\r\n\r\n";
    let r = split_responses(&raw_exchange(addr, req.as_bytes()));
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(r[0]
        .0
        .to_ascii_lowercase()
        .contains("connection: keep-alive"));

    // A request body is not read: answered, then closed.
    let req = "GET /v2/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /v2/ HTTP/1.1\r\n\r\n";
    let r = split_responses(&raw_exchange(addr, req.as_bytes()));
    assert_eq!(r.len(), 1, "{r:?}");

    // HEAD: the length, no body, and the connection stays usable.
    let req = format!("HEAD {path} HTTP/1.1\r\n\r\nGET /v2/ HTTP/1.1\r\nConnection: close\r\n\r\n");
    let raw = raw_exchange(addr, req.as_bytes());
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains(&format!("content-length: {}", b.size)),
        "{text}"
    );
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(text.ends_with("{}"), "{text}");

    // Garbage: a 400, and the daemon is fine.
    let raw = raw_exchange(addr, b"\x00\x01 nonsense\r\n\r\n");
    assert!(
        String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 400"),
        "{raw:?}"
    );
    let raw = raw_exchange(addr, b"GET /v2/ HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"));
}

/// The GETs of blob `digest` the proxy saw, with their Range headers.
fn ranged_gets(proxy: &FaultProxy, mark: usize, digest: &str) -> Vec<common::ProxyRequest> {
    proxy
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.is_blob_get() && r.digest() == Some(digest))
        .collect()
}

/// `bytes=<a>-<b>` to `(a, b)`.
fn range_of(r: &common::ProxyRequest) -> (u64, u64) {
    let spec = r.header("range").expect("a Range header");
    let (a, b) = spec
        .trim_start_matches("bytes=")
        .split_once('-')
        .expect("a-b");
    (a.parse().unwrap(), b.parse().unwrap())
}

/// A cold blob from an origin whose every connection is capped: fetched as
/// ranged parts, at most `parallel_ranges` at once and more than one at a
/// time, each byte once, and the client gets the blob from its first byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_blob_comes_in_parallel_ranges() {
    let b = tokio::task::spawn_blocking(parts_blob).await.unwrap();
    let proxy = FaultProxy::start(origin()).expect("proxy");
    // 8 MiB/s per response: one stream would take 1.5 s; the parts overlap.
    proxy.set_rate_per_response(8 * MIB);
    let d = ranged_daemon(&proxy);
    let mark = proxy.mark();
    let (status, digest, n) = get_hashed(&reqwest::Client::new(), &blob_url(&d, &proxy.host(), b))
        .await
        .expect("read");
    assert_eq!(
        (status, n, digest.as_str()),
        (200, b.size, b.digest.as_str())
    );
    let gets = ranged_gets(&proxy, mark, &b.digest);
    assert_eq!(gets.len(), 13, "13 parts of 1 MiB: {gets:#?}");
    let mut ranges: Vec<(u64, u64)> = gets.iter().map(range_of).collect();
    ranges.sort();
    for (k, (a, z)) in ranges.iter().enumerate() {
        assert_eq!(*a, k as u64 * MIB, "{ranges:?}");
        assert_eq!(*z, ((k as u64 + 1) * MIB).min(b.size) - 1, "{ranges:?}");
    }
    assert!(gets.iter().all(|r| r.status == 206 && r.completed));
    assert_eq!(gets.iter().map(|r| r.body_bytes).sum::<u64>(), b.size);
    let most = proxy.max_in_flight();
    assert!(
        (2..=4).contains(&most),
        "parts streaming at once: {most}, the window is 4"
    );
    assert_eq!(d.metric("damselfly_origin_bytes_total") as u64, b.size);
    assert!(d.blob_path(&b.digest).exists());
}

/// A daemon behind `proxy` that fetches in 1 MiB parts, 4 at once.
fn ranged_daemon(proxy: &FaultProxy) -> Daemon {
    daemon(
        &proxy.host(),
        &proxy.url(),
        "parallel_ranges = 4\nrange_size = \"1MiB\"",
        "",
    )
}

/// `fault` on the blob GET whose range starts at byte `from`.
fn fault_on_part_at(proxy: &FaultProxy, from: u64, fault: Fault) {
    let part = format!("bytes={from}-");
    proxy.set_fault_matching_headers(fault, move |m, p, h| {
        m == "GET"
            && p.contains("/blobs/")
            && h.get("range")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with(&part))
    });
}

/// Corrupt bytes in one of the parallel ranges: the client never gets the
/// whole body, nothing is committed, and once the origin is healthy the
/// next GET gets the right blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_bytes_on_a_parallel_range_are_never_served_whole() {
    let b = tokio::task::spawn_blocking(parts_blob).await.unwrap();
    let proxy = FaultProxy::start(origin()).expect("proxy");
    fault_on_part_at(
        &proxy,
        5 * MIB,
        Fault::Corrupt {
            offset: 12_345,
            times: 1,
        },
    );
    let d = ranged_daemon(&proxy);
    let client = reqwest::Client::new();
    let url = blob_url(&d, &proxy.host(), b);
    match get_hashed(&client, &url).await {
        Err(e) => assert!(e.contains("body broke"), "{e}"),
        Ok((status, digest, n)) => {
            panic!("a corrupt blob was served whole: status {status}, {n} bytes, {digest}")
        }
    }
    assert_eq!(proxy.faults_applied(), 1, "the fault hit one part");
    assert!(!d.blob_path(&b.digest).exists(), "corrupt blob committed");
    assert!(!d.partial_path(&b.digest).exists(), "corrupt partial kept");
    assert_eq!(d.metric("damselfly_digest_mismatches_total"), 1.0);
    let (status, digest, n) = get_hashed(&client, &url).await.expect("read");
    assert_eq!(
        (status, n, digest.as_str()),
        (200, b.size, b.digest.as_str())
    );
    assert!(d.blob_path(&b.digest).exists());
}

/// A part whose body breaks mid-way is asked again from its last byte, on
/// its own: the other parts are not fetched again, and the client sees one
/// unbroken body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_that_breaks_midway_is_resumed() {
    let b = tokio::task::spawn_blocking(parts_blob).await.unwrap();
    let proxy = FaultProxy::start(origin()).expect("proxy");
    fault_on_part_at(
        &proxy,
        7 * MIB,
        Fault::CutAfter {
            bytes: 300_000,
            times: 1,
        },
    );
    let d = ranged_daemon(&proxy);
    let mark = proxy.mark();
    let (status, digest, n) = get_hashed(&reqwest::Client::new(), &blob_url(&d, &proxy.host(), b))
        .await
        .expect("read");
    assert_eq!(
        (status, n, digest.as_str()),
        (200, b.size, b.digest.as_str())
    );
    assert_eq!(d.metric("damselfly_origin_resumes_total"), 1.0);
    let gets = ranged_gets(&proxy, mark, &b.digest);
    let resumed: Vec<_> = gets
        .iter()
        .filter(|r| range_of(r) == (7 * MIB + 300_000, 8 * MIB - 1))
        .collect();
    assert_eq!(
        resumed.len(),
        1,
        "the cut part resumed from its last byte: {gets:#?}"
    );
    assert_eq!(gets.len(), 14, "13 parts and one resumption");
    // Every byte crossed the proxy once: the cut part's first 300 000 bytes
    // were kept.
    assert_eq!(gets.iter().map(|r| r.body_bytes).sum::<u64>(), b.size);
    assert_eq!(d.metric("damselfly_origin_bytes_total") as u64, b.size);
}

/// An origin that ignores Range (answers 200 to the first ranged GET): the
/// blob streams as one body, as before parallel ranges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_without_ranges_gets_one_stream() {
    let b = tokio::task::spawn_blocking(parts_blob).await.unwrap();
    let proxy = FaultProxy::start(origin()).expect("proxy");
    let d = daemon(&proxy.host(), &proxy.url(), "parallel_ranges = 1", "");
    let mark = proxy.mark();
    let (status, digest, n) = get_hashed(&reqwest::Client::new(), &blob_url(&d, &proxy.host(), b))
        .await
        .expect("read");
    assert_eq!(
        (status, n, digest.as_str()),
        (200, b.size, b.digest.as_str())
    );
    let gets = ranged_gets(&proxy, mark, &b.digest);
    assert_eq!(gets.len(), 1, "{gets:#?}");
    assert_eq!(gets[0].header("range"), None);
    assert_eq!(gets[0].status, 200);
}

/// Peak resident memory (VmHWM) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// 32 readers at once, of a blob arriving (one download, parallel ranges)
/// and then of the cached blob: the daemon's peak memory grows by far less
/// than one copy of the blob per reader, and less than the old two 1 MiB
/// buffers per reader of a verified hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_with_many_readers() {
    const READERS: usize = 32;
    let b = tokio::task::spawn_blocking(|| blob("bytepath/many", 43, 64 * MIB))
        .await
        .unwrap();
    let reg = origin();
    let client = reqwest::Client::new();
    let all = |url: String| {
        let client = client.clone();
        let digest = b.digest.clone();
        async move {
            let readers: Vec<_> = (0..READERS)
                .map(|_| {
                    let (client, url) = (client.clone(), url.clone());
                    tokio::spawn(async move { get_hashed(&client, &url).await })
                })
                .collect();
            for r in readers {
                let (status, got, n) = r.await.unwrap().expect("reader");
                assert_eq!((status, n), (200, 64 * MIB));
                assert_eq!(got, digest);
            }
        }
    };
    // Cold: 32 readers follow one download.
    let d = daemon(&reg.host(), &reg.url(), "", "");
    let url = blob_url(&d, &reg.host(), &b);
    let before = peak_rss(d.pid());
    all(url.clone()).await;
    let cold = peak_rss(d.pid()) - before;
    // Cache hits, on a daemon whose peak so far is one reader's: filled
    // with one stream, so that the parts window (32 MiB) does not set a
    // high-water mark that the hits could hide under.
    let d = daemon(&reg.host(), &reg.url(), "parallel_ranges = 1", "");
    let url = blob_url(&d, &reg.host(), &b);
    get_hashed(&client, &url).await.expect("fill the cache");
    let before = peak_rss(d.pid());
    all(url.clone()).await;
    let hit = peak_rss(d.pid()) - before;
    eprintln!(
        "peak RSS growth: {READERS} cold readers {} MiB, {READERS} cache hits {} MiB",
        cold >> 20,
        hit >> 20
    );
    // The parts window (4 x 8 MiB) and the runtime's buffers; one copy of
    // the blob per reader would be 2 GiB.
    assert!(
        cold < 64 * MIB,
        "{READERS} cold readers grew the daemon by {} MiB",
        cold >> 20
    );
    // A 256 KiB check buffer per reader (two 1 MiB spans each before
    // sendfile: 64 MiB for 32 readers).
    assert!(
        hit < 32 * MIB,
        "{READERS} cache hits grew the daemon by {} MiB",
        hit >> 20
    );
    assert_eq!(
        d.metric(r#"damselfly_cache_lookups_total{kind="blob",result="hit"}"#) as usize,
        READERS
    );
}
