//! The fetch engine under load and under faults, against a real
//! `docker-registry` (behind a fault-injecting proxy where a fault is
//! needed): single flight, ranges on growing blobs, resumption, corrupt
//! bytes, `kill -9`, and bad input.

use std::io::{Read, Write};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{get_hashed, random_bytes, Fault, FaultProxy, Registry, RegistryAuth, ALWAYS};
use daemon::Daemon;
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

/// A 32 MiB blob shared by the fault tests.
fn mid_blob() -> &'static Blob {
    static B: OnceLock<Blob> = OnceLock::new();
    B.get_or_init(|| blob("faults/mid", 11, 32 * MIB))
}

/// A daemon for the shared origin, reached directly.
fn daemon_for_origin() -> Daemon {
    let reg = origin();
    Daemon::start(&format!(
        "[[registry]]\nhost = \"{}\"\nendpoint = \"{}\"\n",
        reg.host(),
        reg.url()
    ))
}

/// A daemon whose origin is reached through `proxy`. Its blobs come as
/// one stream (`parallel_ranges = 1`): the faults below are placed at
/// offsets of that one body; tests/byte_path.rs puts them on parallel
/// ranges.
fn daemon_via(proxy: &FaultProxy) -> Daemon {
    Daemon::start(&format!(
        "[[registry]]\nhost = \"{}\"\nendpoint = \"{}\"\n[origin]\nretries = 5\nread_timeout = \"5s\"\nparallel_ranges = 1\n",
        proxy.host(),
        proxy.url()
    ))
}

fn blob_url(d: &Daemon, ns: &str, b: &Blob) -> String {
    format!("{}/v2/{}/blobs/{}?ns={ns}", d.url(), b.repo, b.digest)
}

/// 16 concurrent requests for one 256 MiB blob make exactly one origin
/// download (in parallel ranges, each byte once), and every reader gets
/// every byte right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_readers_one_origin_download() {
    let reg = origin();
    let b = tokio::task::spawn_blocking(|| blob("load/big", 21, 256 * MIB))
        .await
        .unwrap();
    let d = daemon_for_origin();
    let mark = reg.mark();
    let url = blob_url(&d, &reg.host(), &b);
    let client = reqwest::Client::new();
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { get_hashed(&client, &url).await })
        })
        .collect();
    for r in readers {
        let (status, digest, n) = r.await.unwrap().expect("reader failed");
        assert_eq!(status, 200);
        assert_eq!(n, b.size);
        assert_eq!(digest, b.digest);
    }
    let digest = b.digest.clone();
    let (gets, sent) = tokio::task::spawn_blocking(move || {
        (
            origin().blob_gets_of(&digest, mark),
            origin().blob_bytes_sent_of(&digest, mark),
        )
    })
    .await
    .unwrap();
    assert_eq!(gets, 32, "one download: 32 ranges of 8 MiB");
    assert_eq!(sent, 256 * MIB, "each byte once from the origin");
    assert_eq!(d.metric("damselfly_origin_bytes_total") as u64, 256 * MIB);
    assert_eq!(
        d.metric(r#"damselfly_bytes_served_total{source="origin"}"#)
            + d.metric(r#"damselfly_bytes_served_total{source="local"}"#),
        (16 * 256 * MIB) as f64
    );
}

/// Range requests on a blob still arriving (the origin stalls mid-body),
/// then on the complete blob; unsatisfiable ranges get a 416.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_on_growing_and_complete_blobs() {
    let b = tokio::task::spawn_blocking(mid_blob).await.unwrap();
    let proxy = FaultProxy::start(origin()).expect("proxy");
    proxy.set_fault(Fault::Stall {
        after: 8 * MIB,
        duration: Duration::from_secs(3),
        times: 1,
    });
    let d = daemon_via(&proxy);
    let url = blob_url(&d, &proxy.host(), b);
    let client = reqwest::Client::new();

    // Start the download; the origin stalls after 8 MiB.
    let full = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { get_hashed(&client, &url).await })
    };
    let partial = d.partial_path(&b.digest);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < 8 * MIB {
        assert!(Instant::now() < deadline, "download did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let range = |spec: String| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = client.get(&url).header("range", spec).send().await.unwrap();
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            (status, headers, r.bytes().await.unwrap())
        }
    };
    // Inside what has arrived: answered at once, while the blob is growing.
    let started = Instant::now();
    let (status, h, body) = range("bytes=1000-1999".into()).await;
    assert_eq!(status, 206);
    assert_eq!(
        h["content-range"],
        format!("bytes 1000-1999/{}", b.size).as_str()
    );
    assert_eq!(h["content-length"], "1000");
    assert_eq!(h["x-damselfly-source"], "origin");
    assert_eq!(&body[..], &random_bytes(b.seed, 1000, 1000)[..]);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a range inside the received part waited for the stall"
    );
    assert!(
        !d.blob_path(&b.digest).exists(),
        "blob should still be in progress"
    );
    // The tail: waits for the rest, then is served.
    let (status, h, body) = range("bytes=-100".into()).await;
    assert_eq!(status, 206);
    assert_eq!(
        h["content-range"],
        format!("bytes {}-{}/{}", b.size - 100, b.size - 1, b.size).as_str()
    );
    assert_eq!(&body[..], &random_bytes(b.seed, b.size - 100, 100)[..]);
    let (status, digest, n) = full.await.unwrap().expect("full read");
    assert_eq!((status, n), (200, b.size));
    assert_eq!(digest, b.digest);

    // Complete now: from the store.
    let (status, h, body) = range(format!("bytes={}-", b.size - 10)).await;
    assert_eq!(status, 206);
    assert_eq!(h["x-damselfly-source"], "local");
    assert_eq!(&body[..], &random_bytes(b.seed, b.size - 10, 10)[..]);
    let (status, h, body) = range(format!("bytes={}-", b.size)).await;
    assert_eq!(status, 416);
    assert_eq!(h["content-range"], format!("bytes */{}", b.size).as_str());
    let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(err["errors"][0]["code"], "RANGE_INVALID");
    let head = client.head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"],
        b.size.to_string().as_str()
    );
    assert_eq!(head.headers()["docker-content-digest"], b.digest.as_str());
}

/// The origin cuts the connection mid-blob, twice: the download resumes
/// with Range from the last byte received, and the reader sees one
/// unbroken, correct body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_download_resumes_with_range() {
    let b = tokio::task::spawn_blocking(mid_blob).await.unwrap();
    let proxy = FaultProxy::start(origin()).expect("proxy");
    proxy.set_fault(Fault::CutAfter {
        bytes: 5 * MIB,
        times: 2,
    });
    let d = daemon_via(&proxy);
    let (status, digest, n) = get_hashed(&reqwest::Client::new(), &blob_url(&d, &proxy.host(), b))
        .await
        .expect("read");
    assert_eq!((status, n), (200, b.size));
    assert_eq!(digest, b.digest);
    assert_eq!(d.metric("damselfly_origin_resumes_total"), 2.0);
    let ranges: Vec<String> = proxy
        .requests()
        .iter()
        .filter(|r| r.is_blob_get())
        .filter_map(|r| r.header("range").map(str::to_owned))
        .collect();
    assert_eq!(ranges.len(), 2, "two resumptions with Range: {ranges:?}");
    assert!(ranges
        .iter()
        .all(|r| r.starts_with("bytes=") && r != "bytes=0-"));
    assert_eq!(d.metric("damselfly_origin_bytes_total") as u64, b.size);
}

/// The origin sends corrupt bytes: the reader never gets a complete body,
/// nothing is committed, and the next request (origin healthy again) gets
/// the right content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_bytes_are_never_committed_or_served_whole() {
    let b = tokio::task::spawn_blocking(mid_blob).await.unwrap();
    let proxy = FaultProxy::start(origin()).expect("proxy");
    proxy.set_fault(Fault::Corrupt {
        offset: 3 * MIB + 7,
        times: ALWAYS,
    });
    let d = daemon_via(&proxy);
    let client = reqwest::Client::new();
    let url = blob_url(&d, &proxy.host(), b);
    match get_hashed(&client, &url).await {
        Err(e) => assert!(e.contains("body broke"), "{e}"),
        Ok((status, digest, n)) => {
            panic!("a corrupt blob was served whole: status {status}, {n} bytes, {digest}")
        }
    }
    assert!(!d.blob_path(&b.digest).exists(), "corrupt blob committed");
    assert!(!d.partial_path(&b.digest).exists(), "corrupt partial kept");
    assert_eq!(d.metric("damselfly_digest_mismatches_total"), 1.0);
    // Still corrupt: still refused.
    assert!(get_hashed(&client, &url).await.is_err());

    proxy.clear_fault();
    let (status, digest, n) = get_hashed(&client, &url).await.expect("read");
    assert_eq!((status, n), (200, b.size));
    assert_eq!(digest, b.digest);
    assert!(d.blob_path(&b.digest).exists());
}

/// `kill -9` in the middle of a download, then a restart: the partial file
/// is re-hashed and resumed with Range, the pull succeeds, and nothing
/// corrupt is ever committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_download_then_restart() {
    let b = tokio::task::spawn_blocking(mid_blob).await.unwrap();
    let proxy = FaultProxy::start(origin()).expect("proxy");
    proxy.set_fault(Fault::Stall {
        after: 12 * MIB,
        duration: Duration::from_secs(30),
        times: 1,
    });
    let mut d = daemon_via(&proxy);
    let url = blob_url(&d, &proxy.host(), b);
    let reader = {
        let url = url.clone();
        tokio::spawn(async move { get_hashed(&reqwest::Client::new(), &url).await })
    };
    let partial = d.partial_path(&b.digest);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < 12 * MIB {
        assert!(Instant::now() < deadline, "download did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.kill9();
    assert!(
        reader.await.unwrap().is_err(),
        "the reader must see the cut"
    );
    assert!(!d.blob_path(&b.digest).exists());

    // Let the stalled request go, so the restart is not held up by it.
    proxy.clear_fault();
    let mark = proxy.mark();
    tokio::task::block_in_place(|| d.restart());
    let (status, digest, n) = get_hashed(&reqwest::Client::new(), &url)
        .await
        .expect("read after restart");
    assert_eq!((status, n), (200, b.size));
    assert_eq!(digest, b.digest);
    let resumed: Vec<String> = proxy
        .requests_since(mark)
        .iter()
        .filter(|r| r.is_blob_get())
        .filter_map(|r| r.header("range").map(str::to_owned))
        .collect();
    assert_eq!(resumed.len(), 1, "one resumed request: {resumed:?}");
    let from: u64 = resumed[0]
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(from >= 12 * MIB, "resumed from {from}");
    assert!(d.log().contains("resuming partial download"));
    assert_eq!(
        d.metric("damselfly_origin_bytes_total") as u64,
        b.size - from
    );
}

/// Sends raw bytes and returns the status line's code and the body.
fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// Bad input gets the right 4xx with OCI error JSON, and never a panic: the
/// daemon is still healthy afterwards.
#[test]
fn bad_input_gets_oci_errors() {
    let reg = origin();
    let d = daemon_for_origin();
    let ns = reg.host().replace(':', "%3A");
    let good = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let big_header = "x".repeat(32 << 10);
    let cases: Vec<(String, u16, &str)> = vec![
        (
            format!("GET /v2/../../etc/passwd/blobs/{good}?ns={ns}"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("GET /v2/a/../b/manifests/v1?ns={ns}"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("GET /v2/a%2F..%2Fb/blobs/{good}?ns={ns}"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("GET /v2/UPPER/blobs/{good}?ns={ns}"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("GET /v2/a/blobs/sha256:1234?ns={ns}"),
            400,
            "DIGEST_INVALID",
        ),
        (
            format!("GET /v2/a/blobs/sha256:../../x?ns={ns}"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("GET /v2/a/blobs/sha256:%2e%2e?ns={ns}"),
            400,
            "DIGEST_INVALID",
        ),
        (
            format!("GET /v2/a/manifests/bad..tag!?ns={ns}"),
            400,
            "MANIFEST_INVALID",
        ),
        (
            format!("GET /v2/a/blobs/{good}?ns=evil.example.com"),
            404,
            "NAME_UNKNOWN",
        ),
        (format!("GET /v2/a/blobs/{good}"), 400, "NAME_INVALID"),
        (
            format!("GET /v2/a/blobs/{good}?ns=bad%20host"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("DELETE /v2/a/blobs/{good}?ns={ns}"),
            405,
            "UNSUPPORTED",
        ),
        (
            format!("GET /v2/a/blobs/{good}?ns={ns}"),
            404,
            "BLOB_UNKNOWN",
        ),
    ];
    let mut requests: Vec<(String, String, u16, &str)> = cases
        .into_iter()
        .map(|(line, status, code)| {
            let req = format!("{line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            (line, req, status, code)
        })
        .collect();
    let line = format!("GET /v2/a/blobs/{good}?ns={ns} (32 KiB header)");
    let req = format!(
        "GET /v2/a/blobs/{good}?ns={ns} HTTP/1.1\r\nHost: x\r\nX-Big: {big_header}\r\nConnection: close\r\n\r\n"
    );
    requests.push((line, req, 431, "UNSUPPORTED"));
    for (line, req, status, code) in requests {
        let (got, body) = raw(d.mirror, req.as_bytes());
        let shown = &line[..line.len().min(80)];
        assert_eq!(got, status, "{shown}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{shown}: body is not JSON ({e}): {body}"));
        assert_eq!(json["errors"][0]["code"], code, "{shown}");
    }
    // Garbage that is not HTTP at all is refused by the HTTP layer.
    let (got, _) = raw(d.mirror, b"\x00\x01\x02 nonsense\r\n\r\n");
    assert!(got == 400 || got == 0, "garbage got {got}");
    // Still alive and serving.
    let (got, body) = raw(
        d.mirror,
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((got, body.as_str()), (200, "{}"));
    assert!(!d.log().contains("panicked"));
}

/// A crash after the last byte arrived but before the commit leaves a
/// complete partial file: the restart commits it without asking the origin.
/// A complete partial with wrong content is refused by the origin's 416
/// and the download starts over, instead of failing forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_partials_are_committed_or_restarted_after_a_crash() {
    let reg = origin();
    let b = tokio::task::spawn_blocking(|| blob("faults/complete", 31, 3 * MIB))
        .await
        .unwrap();
    let bad = tokio::task::spawn_blocking(|| blob("faults/complete", 32, 3 * MIB))
        .await
        .unwrap();
    let mut d = daemon_for_origin();
    d.kill9();
    std::fs::write(
        d.partial_path(&b.digest),
        random_bytes(b.seed, 0, b.size as usize),
    )
    .unwrap();
    let mut wrong = random_bytes(bad.seed, 0, bad.size as usize);
    wrong[1000] ^= 0xff;
    std::fs::write(d.partial_path(&bad.digest), wrong).unwrap();
    tokio::task::block_in_place(|| d.restart());

    let mark = reg.mark();
    let client = reqwest::Client::new();
    let (status, digest, n) = get_hashed(&client, &blob_url(&d, &reg.host(), &b))
        .await
        .expect("complete partial");
    assert_eq!((status, digest, n), (200, b.digest.clone(), b.size));
    let (status, digest, n) = get_hashed(&client, &blob_url(&d, &reg.host(), &bad))
        .await
        .expect("corrupt complete partial");
    assert_eq!((status, digest, n), (200, bad.digest.clone(), bad.size));
    let (good_gets, bad_gets) = tokio::task::spawn_blocking(move || {
        (
            origin().blob_gets_of(&b.digest, mark),
            origin().requests_since(mark),
        )
    })
    .await
    .unwrap();
    assert_eq!(good_gets, 0, "a complete, valid partial needs no origin");
    let bad_gets: Vec<_> = bad_gets
        .iter()
        .filter(|r| r.is_blob_get() && r.digest() == Some(bad.digest.as_str()))
        .map(|r| r.status)
        .collect();
    assert_eq!(
        bad_gets,
        vec![416, 206],
        "refused resume, then a fresh download (its first range covers the blob)"
    );
    assert!(d.log().contains("partial download is complete"));
    assert!(d.log().contains("starting over"));
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The store's disk fills up mid-download: the reader's connection is cut
/// (never a short 200), the error says what is wrong, the partial is
/// removed so the space is free again, and a blob that fits is then served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_download_cleanly_and_frees_its_space() {
    let reg = origin();
    let big = tokio::task::spawn_blocking(mid_blob).await.unwrap();
    let small = tokio::task::spawn_blocking(|| blob("faults/fits", 41, 2 * MIB))
        .await
        .unwrap();
    let mut d = daemon_for_origin();
    d.kill9();
    // 16 MiB of disk for a 32 MiB blob; the quota (100 GiB) cannot know.
    let _disk = Tmpfs::mount(&d.store_dir(), "16m");
    tokio::task::block_in_place(|| d.restart());

    let client = reqwest::Client::new();
    match get_hashed(&client, &blob_url(&d, &reg.host(), big)).await {
        Err(e) => assert!(e.contains("body broke"), "{e}"),
        Ok((status, _, n)) => assert!(
            status >= 500,
            "a blob that cannot be stored was answered {status} with {n} bytes"
        ),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log().contains("the store's disk is full") {
        assert!(Instant::now() < deadline, "{}", d.log_tail(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!d.blob_path(&big.digest).exists());
    assert!(
        !d.partial_path(&big.digest).exists(),
        "the partial kept the space"
    );

    let (status, digest, n) = get_hashed(&client, &blob_url(&d, &reg.host(), &small))
        .await
        .expect("a blob that fits");
    assert_eq!((status, digest, n), (200, small.digest.clone(), small.size));
    let (got, _) = raw(
        d.mirror,
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(got, 200, "daemon unhealthy after a full disk");
    d.kill9();
}
