//! Mirror benchmarks, each against a baseline measured in the same run:
//!
//! 1. cache-hit throughput of one blob through the mirror, against
//!    `docker-registry` serving the same blob (goal: at least 1.0x), with
//!    verified reads (every MiB checked against its xxh3 sum as it is
//!    sent, the default) and without them (`store.verify_reads = false`),
//!    to show what the check costs (goal: under 10%);
//! 2. a cold pull through the mirror (origin to mirror to client), against
//!    the same client pulling straight from the origin (goal: at least 0.8x, issue 16);
//! 3. the daemon's peak RSS while it streams a large blob cold (goal: at
//!    most 100 MiB whatever the blob size), and its CPU time per GiB;
//! 4. a cold pull from an origin that caps each connection (200 Mbit/s
//!    each, through the lab's proxy: S3 behind ECR), against the same
//!    client pulling straight through that origin, with one stream and with
//!    parallel ranged GETs (goal: at least 3x with 4 or more ranges).
//!
//! The daemon's CPU per GiB cold includes filling the page cache with the
//! blob. On this kind of VM the first touch of free pages that were handed
//! back to the host costs about ten times a plain write, so before each
//! measured transfer that fills the page cache the bench warms as much
//! memory (`damselfly_lab::memory`); it also measures the floor in the same
//! run (a new file of the big blob's size, written and hashed by nobody,
//! warmed the same way) and prints it beside the daemon's figure. Figures
//! before 2026-12-07 11:30 UTC were taken without the warm-up.
//!
//! ```text
//! cargo bench --bench mirror                 # 1 GiB and 4 GiB blobs
//! DAMSELFLY_BENCH_QUICK=1 cargo bench --bench mirror   # 256 MiB / 512 MiB
//! ```
//!
//! The client streams each body and drops the bytes; it is the same client
//! for the baseline and for damselfly. Everything runs on loopback, on the
//! same cores, so the figures compare software, not networks.

use std::time::{Duration, Instant};

use common::{push_blob, BlobSource, FaultProxy, Registry, RegistryAuth};
use daemon::Daemon;
use damselfly_lab as common;
use damselfly_lab::{daemon, netlab};
use futures_util::StreamExt;
use netlab::median;

const RUNS: usize = 3;
/// Verified and unverified cache hits per run, alternating: the two differ
/// by a few percent, less than this machine's run-to-run noise, so they get
/// more samples than the other figures.
const HIT_PAIRS: usize = 3;
const MIB: f64 = (1u64 << 20) as f64;

struct Pull {
    secs: f64,
    bytes: u64,
    ttfb: f64,
}

impl Pull {
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / MIB / self.secs
    }
}

/// Streams `url`; with `sink`, writes the body to that file as it arrives,
/// the way containerd writes a layer into its content store.
async fn pull_to(client: &reqwest::Client, url: &str, sink: Option<&std::path::Path>) -> Pull {
    use std::io::Write;
    let mut file = sink.map(|p| std::fs::File::create(p).expect("sink file"));
    let start = Instant::now();
    let resp = client.get(url).send().await.expect("request");
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    let mut body = resp.bytes_stream();
    let mut bytes = 0u64;
    let mut ttfb = None;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("body");
        ttfb.get_or_insert_with(|| start.elapsed().as_secs_f64());
        bytes += chunk.len() as u64;
        if let Some(f) = file.as_mut() {
            f.write_all(&chunk).expect("sink write");
        }
    }
    drop(file);
    if let Some(p) = sink {
        let _ = std::fs::remove_file(p);
    }
    Pull {
        secs: start.elapsed().as_secs_f64(),
        bytes,
        ttfb: ttfb.unwrap_or(0.0),
    }
}

async fn pull(client: &reqwest::Client, url: &str) -> Pull {
    pull_to(client, url, None).await
}

/// Peak resident set (VmHWM) and CPU seconds (user + system) of a process.
fn process_usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (hwm_kib * 1024, netlab::cpu_secs(pid))
}

/// A fresh daemon for `reg`; `verify`: `store.verify_reads`. No scrub, so
/// that nothing else reads the store while it is measured.
fn daemon_for(reg: &Registry, verify: bool) -> Daemon {
    daemon_at(&reg.host(), &reg.url(), verify, "")
}

/// A fresh daemon for registry `host` at `endpoint`, with more `[origin]`
/// keys.
fn daemon_at(host: &str, endpoint: &str, verify: bool, origin: &str) -> Daemon {
    Daemon::start_with(daemon::Options {
        store: format!("max_size = \"64GiB\"\nscrub_rate = 0\nverify_reads = {verify}"),
        extra: format!(
            "[origin]\n{origin}\n[[registry]]\nhost = \"{host}\"\nendpoint = \"{endpoint}\"\n"
        ),
        ..Default::default()
    })
}

/// System CPU seconds this process spends writing a new file of `len`
/// bytes (then removed): what filling the page cache costs here, whoever
/// does it.
fn new_file_floor(dir: &std::path::Path, len: u64) -> f64 {
    use std::io::Write;
    let path = dir.join("floor");
    let buf = vec![0x5au8; 1 << 20];
    let before = self_sys_secs();
    let mut f = std::fs::File::create(&path).expect("floor file");
    for _ in 0..len >> 20 {
        f.write_all(&buf).expect("floor write");
    }
    f.sync_all().expect("floor sync");
    let secs = self_sys_secs() - before;
    drop(f);
    let _ = std::fs::remove_file(&path);
    secs
}

/// This process's system CPU seconds.
fn self_sys_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: f64 = after
        .split_whitespace()
        .nth(12)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    ticks / 100.0
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing
    // useful either way. Run only when asked to benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("mirror bench: run with `cargo bench --bench mirror`");
        return;
    }
    common::require_tools();
    let quick = std::env::var_os("DAMSELFLY_BENCH_QUICK").is_some();
    let (size, big) = if quick {
        (256u64 << 20, 512u64 << 20)
    } else {
        (1u64 << 30, 4u64 << 30)
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = reqwest::Client::builder()
        .no_gzip()
        .build()
        .expect("client");

    let reg = Registry::start(RegistryAuth::None).expect("registry");
    eprintln!("pushing {} MiB and {} MiB blobs...", size >> 20, big >> 20);
    let (digest, _) =
        push_blob(&reg.url(), "bench/blob", BlobSource::random(1, size), None).expect("push");
    let (big_digest, _) =
        push_blob(&reg.url(), "bench/big", BlobSource::random(2, big), None).expect("push big");
    let origin_url = format!("{}/v2/bench/blob/blobs/{digest}", reg.url());

    // 1 and 2: direct, cold through the mirror, then hits.
    let mut direct = Vec::new();
    let mut cold = Vec::new();
    let mut hits = Vec::new();
    let mut hit_ttfb = Vec::new();
    let mut hit_cpu = Vec::new();
    let mut plain_hits = Vec::new();
    let mut plain_cpu = Vec::new();
    // One hit, timed, with the daemon's CPU seconds per GiB.
    let hit = |d: &Daemon, url: &str| {
        let cpu_before = netlab::cpu_secs(d.pid());
        let h = rt.block_on(pull(&client, url));
        let cpu = (netlab::cpu_secs(d.pid()) - cpu_before) / (h.bytes as f64 / (1u64 << 30) as f64);
        (h, cpu)
    };
    for run in 0..RUNS {
        direct.push(rt.block_on(pull(&client, &origin_url)));
        let d = daemon_for(&reg, true);
        let plain = daemon_for(&reg, false);
        let mirror_url = format!("{}/v2/bench/blob/blobs/{digest}?ns={}", d.url(), reg.host());
        let plain_url = format!(
            "{}/v2/bench/blob/blobs/{digest}?ns={}",
            plain.url(),
            reg.host()
        );
        common::memory::warm(size);
        cold.push(rt.block_on(pull(&client, &mirror_url)));
        // Fills the unverified daemon's cache; not a figure.
        rt.block_on(pull(&client, &plain_url));
        // Verified and unverified hits alternate, the first one changing
        // each time, so that neither always sees a warmer machine.
        let order = (0..HIT_PAIRS).flat_map(|i| {
            if (run + i) % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            }
        });
        for verified in order {
            if verified {
                let (h, cpu) = hit(&d, &mirror_url);
                hit_ttfb.push(h.ttfb);
                hits.push(h);
                hit_cpu.push(cpu);
            } else {
                let (h, cpu) = hit(&plain, &plain_url);
                plain_hits.push(h);
                plain_cpu.push(cpu);
            }
        }
        eprintln!(
            "run {run}: direct {:.0} MiB/s, cold {:.0} MiB/s, hit {:.0} MiB/s ({:.2} CPU-s/GiB), \
             unverified hit {:.0} MiB/s ({:.2} CPU-s/GiB)",
            direct[run * 2].mib_s(),
            cold[run].mib_s(),
            median(hits[run * HIT_PAIRS..].iter().map(Pull::mib_s).collect()),
            median(hit_cpu[run * HIT_PAIRS..].to_vec()),
            median(
                plain_hits[run * HIT_PAIRS..]
                    .iter()
                    .map(Pull::mib_s)
                    .collect()
            ),
            median(plain_cpu[run * HIT_PAIRS..].to_vec())
        );
        // One more origin pull after the hit, so the baseline sees the same
        // page-cache state as the mirror did.
        direct.push(rt.block_on(pull(&client, &origin_url)));
    }
    let direct_mib = median(direct.iter().map(Pull::mib_s).collect());
    let cold_mib = median(cold.iter().map(Pull::mib_s).collect());
    let hit_mib = median(hits.iter().map(Pull::mib_s).collect());
    let plain_mib = median(plain_hits.iter().map(Pull::mib_s).collect());

    // 2b: the same cold comparison with a client that stores what it
    // receives, as containerd does. Writing to disk costs both paths alike.
    let sink_dir = tempfile::tempdir().expect("tempdir");
    let sink = sink_dir.path().join("sink");
    let mut direct_store = Vec::new();
    let mut cold_store = Vec::new();
    for _ in 0..RUNS {
        common::memory::warm(size);
        direct_store.push(rt.block_on(pull_to(&client, &origin_url, Some(&sink))));
        let d = daemon_for(&reg, true);
        let mirror_url = format!("{}/v2/bench/blob/blobs/{digest}?ns={}", d.url(), reg.host());
        // The mirror fills the page cache with the blob, and the client's
        // sink as well: twice the pages of the direct pull.
        common::memory::warm(2 * size);
        cold_store.push(rt.block_on(pull_to(&client, &mirror_url, Some(&sink))));
    }
    let direct_store_mib = median(direct_store.iter().map(Pull::mib_s).collect());
    let cold_store_mib = median(cold_store.iter().map(Pull::mib_s).collect());

    // 3: peak RSS and CPU streaming a big blob cold.
    let d = daemon_for(&reg, true);
    let (rss_before, _) = process_usage(d.pid());
    let big_url = format!(
        "{}/v2/bench/big/blobs/{big_digest}?ns={}",
        d.url(),
        reg.host()
    );
    common::memory::warm(big);
    let big_pull = rt.block_on(pull(&client, &big_url));
    // Let the commit finish before reading the counters.
    std::thread::sleep(Duration::from_millis(500));
    let (rss_peak, cpu) = process_usage(d.pid());
    let gib = big as f64 / (1u64 << 30) as f64;

    // 4: an origin that caps each connection. One stream is bound by the
    // cap; parallel ranges multiply it.
    let capped_size = if quick { 128u64 << 20 } else { 256u64 << 20 };
    let (capped_digest, _) = push_blob(
        &reg.url(),
        "bench/capped",
        BlobSource::random(3, capped_size),
        None,
    )
    .expect("push capped");
    let proxy = FaultProxy::start(&reg).expect("proxy");
    proxy.set_rate_per_response(CAP_BYTES_PER_SEC);
    let capped_direct = rt.block_on(pull(
        &client,
        &format!("{}/v2/bench/capped/blobs/{capped_digest}", proxy.url()),
    ));
    let mut capped = Vec::new();
    for ranges in [1usize, 4, 8] {
        let d = daemon_at(
            &proxy.host(),
            &proxy.url(),
            true,
            &format!("parallel_ranges = {ranges}"),
        );
        let url = format!(
            "{}/v2/bench/capped/blobs/{capped_digest}?ns={}",
            d.url(),
            proxy.host()
        );
        let p = rt.block_on(pull(&client, &url));
        eprintln!(
            "capped origin, {ranges} range(s): {:.0} MiB/s (direct {:.0} MiB/s)",
            p.mib_s(),
            capped_direct.mib_s()
        );
        capped.push((ranges, p));
    }
    drop(proxy);

    // Warmed like every measured write above (lab::memory), so it is the
    // cost of filling the page cache, not of the VM's first touch.
    common::memory::warm(big);
    let floor = new_file_floor(sink_dir.path(), big) / gib;

    let machine = netlab::machine();
    println!("\n## mirror bench ({machine})\n");
    println!("| measure | baseline | damselfly | ratio | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| cache hit, {} MiB blob, verified reads (median of {}) | docker-registry {direct_mib:.0} MiB/s | {hit_mib:.0} MiB/s | {:.2}x | >= 1.0x |",
        size >> 20,
        RUNS * HIT_PAIRS,
        hit_mib / direct_mib
    );
    println!(
        "| cache hit, {} MiB blob, verify_reads = false (median of {}) | docker-registry {direct_mib:.0} MiB/s | {plain_mib:.0} MiB/s | {:.2}x | |",
        size >> 20,
        RUNS * HIT_PAIRS,
        plain_mib / direct_mib
    );
    println!(
        "| cost of verified reads on a cache hit | unverified {plain_mib:.0} MiB/s, {:.2} CPU-s per GiB | verified {hit_mib:.0} MiB/s, {:.2} CPU-s per GiB | {:.2}x | >= 0.90x |",
        median(plain_cpu),
        median(hit_cpu),
        hit_mib / plain_mib
    );
    println!(
        "| cold pull, {} MiB blob (median of {RUNS}) | direct from origin {direct_mib:.0} MiB/s | through the mirror {cold_mib:.0} MiB/s | {:.2}x | >= 0.8x |",
        size >> 20,
        cold_mib / direct_mib
    );
    println!(
        "| cold pull, {} MiB blob, client stores to disk like containerd (median of {RUNS}) | direct from origin {direct_store_mib:.0} MiB/s | through the mirror {cold_store_mib:.0} MiB/s | {:.2}x | >= 0.8x |",
        size >> 20,
        cold_store_mib / direct_store_mib
    );
    println!(
        "| peak RSS streaming {} MiB cold | idle daemon {:.1} MiB | {:.1} MiB | | <= 100 MiB |",
        big >> 20,
        rss_before as f64 / MIB,
        rss_peak as f64 / MIB
    );
    println!(
        "| daemon CPU streaming {} MiB cold ({:.0} MiB/s) | writing a new {} MiB file here: {floor:.2} CPU-s per GiB | {:.2} CPU-s per GiB | | <= 1.2 |",
        big >> 20,
        big_pull.mib_s(),
        big >> 20,
        cpu / gib
    );
    println!(
        "| time to first byte, cache hit (median) | | {:.1} ms | | |",
        median(hit_ttfb) * 1000.0
    );
    for (ranges, p) in &capped {
        println!(
            "| cold pull, {} MiB blob, origin capped at {} Mbit/s per connection, parallel_ranges = {ranges} | direct through the capped origin {:.0} MiB/s | through the mirror {:.0} MiB/s | {:.2}x | {} |",
            capped_size >> 20,
            CAP_BYTES_PER_SEC * 8 / 1_000_000,
            capped_direct.mib_s(),
            p.mib_s(),
            p.mib_s() / capped_direct.mib_s(),
            if *ranges >= 4 { ">= 3x" } else { "" }
        );
    }
}

/// The per-connection cap of the capped origin: 200 Mbit/s.
const CAP_BYTES_PER_SEC: u64 = 25_000_000;
