//! GPU prewarm with real parts: a docker-registry origin, real containerd
//! (its CRI plugin pulling through the daemon's mirror), daemons on
//! 127.0.0.N forming a swarm, and the static GPU inventory (`[gpu.assume]`)
//! standing in for NVML, which this machine does not have. NVML itself is
//! exercised by its absence: the clean fallback.
//!
//! Origin bytes are counted at the registry, from its access log. Nothing
//! here asserts a time; waits have generous deadlines.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cluster::{Cluster, NodeSpec};
use common::{
    build_image_cached, cri_pull, push_image, push_raw_image, BlobSource, Containerd, Fault,
    FaultProxy, ImageSpec, LayerSpec, PushedImage, Registry, RegistryAuth, ALWAYS,
};
use daemon::{Daemon, Options};
use damselfly_lab as common;
use damselfly_lab::{cluster, daemon};

const MIB: u64 = 1 << 20;
/// A prewarm of a few MiB on a loaded 2-core box, containerd unpack
/// included.
const WARM: Duration = Duration::from_secs(120);

fn origin() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| {
        common::require_tools();
        Registry::start(RegistryAuth::None).expect("registry")
    })
}

/// Tests with several daemons run one at a time.
fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

/// A runnable multi-layer image (busybox and random layers), pushed to
/// `repo:tag`.
fn pushed(repo: &str, tag: &str, seeds: &[(u64, u64)]) -> PushedImage {
    let mut layers = vec![LayerSpec::Busybox];
    layers.extend(seeds.iter().map(|(seed, size)| LayerSpec::Random {
        size: *size,
        seed: *seed,
    }));
    let layout = build_image_cached(&ImageSpec::new(layers)).expect("build image");
    push_image(&layout, origin(), repo, tag, None).expect("push image")
}

/// `[gpu.assume]` for one A10G.
const A10G: &str = "[gpu.assume]\ncount = 1\nproduct = \"NVIDIA A10G\"\nmemory = \"24GiB\"\n\
                    compute_capability = \"8.6\"\nmig = false\ndriver = \"550.54.15\"\ncuda = \"12.4\"\n";

/// A daemon for `origin()` wired to its own new containerd (hostsd writes
/// the hosts.toml), with `config` added.
fn node(config: &str) -> (Daemon, Containerd) {
    node_with_store("", config)
}

/// [`node`] with lines for the `[store]` section.
fn node_with_store(store: &str, config: &str) -> (Daemon, Containerd) {
    let c = Containerd::start().expect("containerd");
    let d = Daemon::start_with(Options {
        store: store.to_owned(),
        extra: format!(
            "[[registry]]\nhost = \"{}\"\nendpoint = \"{}\"\n\
             [containerd]\nconfigure_hosts = true\nconfig = \"{}\"\n{}",
            origin().host(),
            origin().url(),
            c.config_path().display(),
            config.replace("{containerd_socket}", &c.socket().display().to_string())
        ),
        ..Options::default()
    });
    (d, c)
}

/// `damselfly prewarm status` as JSON, from the admin socket.
fn status(d: &Daemon) -> serde_json::Value {
    d.prewarm_status()
}

/// Waits until `pred` holds for the status of image `reference`, and
/// returns that image's status.
fn wait_image(
    d: &Daemon,
    reference: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    d.wait_prewarm_image(|i| i["reference"] == reference, what, WARM, pred)
}

fn in_containerd(d: &Daemon, reference: &str) -> serde_json::Value {
    wait_image(d, reference, "in_containerd", |i| {
        i["state"] == "in_containerd"
    })
}

/// Blob body bytes of `repo` that the origin sent after `mark`.
fn origin_blob_bytes(repo: &str, mark: usize) -> u64 {
    origin().blob_bytes_sent_in_repo_since(repo, mark)
}

/// `ctr -n k8s.io images ls` lines naming `needle`.
fn k8s_images(c: &Containerd, needle: &str) -> Vec<String> {
    let out = c
        .ctr(&["-n", "k8s.io", "images", "ls"])
        .expect("ctr")
        .check()
        .expect("ctr images ls");
    out.stdout
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The image's records in containerd's `k8s.io` namespace, each complete
/// and unpacked (`ctr images check`).
fn assert_unpacked(c: &Containerd, reference: &str) {
    c.unpacked(reference).expect("ctr images check");
}

fn cri_status(c: &Containerd, reference: &str) -> Option<damselfly::cri::CriImage> {
    let client = damselfly::cri::Containerd::new(c.socket(), "k8s.io", Duration::from_secs(30));
    common::util::block_on(client.image_status(reference)).expect("CRI ImageStatus")
}

fn pinned_in_store(d: &Daemon, digest: &str) -> bool {
    d.pinned_in_store(digest)
}

#[test]
fn a_matching_rule_lands_the_image_in_containerd_and_the_kubelets_pull_is_local() {
    let _g = heavy();
    let img = pushed("prewarm/one", "v1", &[(11, 2 * MIB), (12, 3 * MIB)]);
    let mark = origin().mark();
    let (d, c) = node(&format!(
        "{A10G}[prewarm]\ncontainerd_socket = \"{{containerd_socket}}\"\ngate_readiness = true\n\
         [[prewarm.rule]]\nname = \"a10g\"\nimages = [\"{r}\"]\n\
         [prewarm.rule.gpu]\nproduct = \"*A10G*\"\nmin_memory = 20\n\
         [[prewarm.rule]]\nname = \"h100\"\nimages = [\"{r}\"]\n\
         [prewarm.rule.gpu]\nproduct = \"*H100*\"\n",
        r = img.reference
    ));
    let got = in_containerd(&d, &img.reference);
    let s = status(&d);
    assert_eq!(s["rules"][0]["matched"], true, "{s:#}");
    assert_eq!(s["rules"][1]["matched"], false, "{s:#}");
    let why = s["rules"][1]["reason"].as_str().unwrap();
    assert!(
        why.contains("*H100*") && why.contains("NVIDIA A10G"),
        "{why}"
    );
    assert_eq!(
        s["images"].as_array().unwrap().len(),
        1,
        "only a10g's image: {s:#}"
    );
    assert_eq!(got["digest"], img.manifest_digest.as_str());
    assert_eq!(got["pinned"], true);
    assert_eq!(got["in_containerd"], true);
    assert!(got["ready_after_s"].as_f64().unwrap() > 0.0, "{got:#}");
    // The stages follow each other and the last one is the ready time.
    let stage = |k: &str| {
        got["stages"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("no {k}: {got:#}"))
    };
    let settled = s["settled_after_s"].as_f64().expect("settled_after_s");
    let times = [
        settled,
        stage("started_s"),
        stage("resolved_s"),
        stage("cached_s"),
        stage("in_containerd_s"),
    ];
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}: {got:#}");
    assert_eq!(Some(times[4]), got["ready_after_s"].as_f64(), "{got:#}");
    assert_eq!(got["bytes_done"], got["bytes_total"], "{got:#}");
    assert_eq!(
        got["sources"]["origin"].as_u64().unwrap(),
        img.total_size,
        "{got:#}"
    );

    // The origin sent each blob once, to the daemon: the CRI pull read the
    // cache through the mirror.
    assert_eq!(origin_blob_bytes(&img.repo, mark), img.total_size);
    let bypass: Vec<_> = origin()
        .requests_in_repo(&img.repo, mark)
        .into_iter()
        .filter(|r| !r.user_agent.starts_with("damselfly/"))
        .collect();
    assert!(
        bypass.is_empty(),
        "containerd went to the origin: {bypass:#?}"
    );
    assert_unpacked(&c, &img.reference);
    for b in img.blob_digests() {
        assert!(pinned_in_store(&d, &b), "{b} not pinned in the store");
    }

    // The pinned label is on the image's records in containerd. Whether
    // CRI reports `pinned` depends on the containerd version (1.7 reads the
    // label); the status says what this one reports.
    let lines = k8s_images(&c, &img.repo);
    assert!(!lines.is_empty(), "no k8s.io image for {}", img.repo);
    for l in &lines {
        assert!(l.contains("io.cri-containerd.pinned=pinned"), "{l}");
    }
    let cri = cri_status(&c, &img.reference).expect("CRI has the image");
    assert_eq!(got["cri_pinned"], cri.pinned, "{got:#}");
    eprintln!(
        "containerd's CRI reports pinned = {} for a labelled image",
        cri.pinned
    );

    // The kubelet's pull now moves no origin blob byte.
    let mark = origin().mark();
    let local_before = d.metric(r#"damselfly_bytes_served_total{source="local"}"#);
    cri_pull(c.socket(), &img.reference).expect("kubelet's PullImage");
    assert_eq!(origin_blob_bytes(&img.repo, mark), 0);
    assert_unpacked(&c, &img.reference);
    // containerd already holds every blob, so it asked the mirror for none.
    assert_eq!(
        d.metric(r#"damselfly_bytes_served_total{source="local"}"#),
        local_before
    );

    // Readiness waited for the prewarm and is now given; the metrics agree.
    assert_eq!(
        common::util::http_get(&d.telemetry.to_string(), "/readyz")
            .expect("readyz")
            .0,
        200
    );
    assert_eq!(
        d.metric(r#"damselfly_prewarm_images{state="in_containerd"}"#),
        1.0
    );
    assert_eq!(d.metric("damselfly_gpus"), 1.0);
    let info = d.metric_samples("damselfly_gpu_info", &[]);
    assert!(
        info.iter().any(|(labels, v)| *v == 1.0
            && labels.get("product").map(String::as_str) == Some("NVIDIA A10G")
            && labels.get("driver").map(String::as_str) == Some("550.54.15")
            && labels.get("source").map(String::as_str) == Some("static")),
        "{info:?}"
    );
    assert_eq!(
        d.metric(r#"damselfly_prewarm_bytes_total{source="origin"}"#) as u64,
        img.total_size
    );
    let ready_s = d.metric_samples("damselfly_prewarm_ready_seconds", &[]);
    assert_eq!(ready_s.len(), 1, "{ready_s:?}");

    // `damselfly gpu` and `prewarm status` through the CLI.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(daemon::binary())
            .args(args)
            .arg("--config")
            .arg(&d.config_path)
            .output()
            .expect("run damselfly");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // DAMSELFLY_CLI_DOCS=<dir> keeps the outputs for docs/cli.md.
    if let Some(dir) = std::env::var_os("DAMSELFLY_CLI_DOCS") {
        for (file, args) in [
            ("gpu.txt", &["gpu"][..]),
            ("gpu.json", &["gpu", "-o", "json"][..]),
            ("prewarm-status.txt", &["prewarm", "status"][..]),
            (
                "prewarm-status.json",
                &["prewarm", "status", "-o", "json"][..],
            ),
            ("images-prewarm.txt", &["images"][..]),
        ] {
            std::fs::write(Path::new(&dir).join(file), cli(args)).unwrap();
        }
    }
    let gpu: serde_json::Value = serde_json::from_str(&cli(&["gpu", "-o", "json"])).unwrap();
    assert_eq!(gpu["source"], "static");
    assert_eq!(gpu["devices"][0]["memory_bytes"], 24u64 << 30);
    let table = cli(&["prewarm", "status"]);
    assert!(
        table.contains("in_containerd") && table.contains("a10g"),
        "{table}"
    );
    let images = cli(&["images"]);
    assert!(
        images.contains("prewarm:") && images.contains(&img.reference),
        "{images}"
    );
}

#[test]
fn four_nodes_prewarm_one_image_with_one_origin_fetch() {
    let _g = heavy();
    let img = pushed(
        "prewarm/fleet",
        "v1",
        &[(21, 4 * MIB), (22, 6 * MIB), (23, 8 * MIB), (24, 10 * MIB)],
    );
    let mark = origin().mark();
    let spec = NodeSpec {
        wire_containerd: true,
        config: format!(
            "{A10G}[prewarm]\ncontainerd_socket = \"{{containerd_socket}}\"\n\
             [[prewarm.rule]]\nname = \"fleet\"\nimages = [\"{}\"]\n",
            img.reference
        ),
        ..NodeSpec::default()
    };
    let cluster = Cluster::start_specs(origin(), vec![spec; 4]);
    for n in &cluster.nodes {
        let s = in_containerd(&n.daemon, &img.reference);
        eprintln!(
            "{}: ready after {:.2}s, cache {} peers {} origin {}",
            n.name(),
            s["ready_after_s"].as_f64().unwrap_or(0.0),
            s["sources"]["cache"],
            s["sources"]["peers"],
            s["sources"]["origin"]
        );
        assert_unpacked(&n.containerd, &img.reference);
    }
    let sent = origin_blob_bytes(&img.repo, mark);
    let ratio = sent as f64 / img.total_size as f64;
    eprintln!(
        "4 nodes prewarmed {} bytes; the origin sent {sent} ({ratio:.3}x)",
        img.total_size
    );
    assert!(
        (1.0..=1.05).contains(&ratio),
        "origin blob bytes {ratio:.3}x the image\n{}",
        cluster.report(30)
    );
    // Then the kubelet's pull on each node: nothing from the origin.
    let mark = origin().mark();
    for n in &cluster.nodes {
        cri_pull(n.containerd.socket(), &img.reference)
            .unwrap_or_else(|e| panic!("{}: {e}", n.name()));
        assert_unpacked(&n.containerd, &img.reference);
    }
    assert_eq!(origin_blob_bytes(&img.repo, mark), 0);
}

#[test]
fn a_live_pull_goes_first_and_prewarm_carries_on_after_it() {
    let _g = heavy();
    // Six 16 MiB blobs for prewarm, one at a time. Every blob GET through
    // the proxy stalls a second after its first 256 KiB, so each prewarm
    // blob takes a second, and the live pull (ten blobs, containerd takes
    // three at a time) takes about four: a prewarm that ignored it would
    // start three or four blobs meanwhile.
    let layers: Vec<BlobSource> = (0..6)
        .map(|i| BlobSource::random(31 + i, 16 * MIB))
        .collect();
    let big = push_raw_image(origin(), "prewarm/big", "v1", &layers).expect("push");
    let live_layers: Vec<(u64, u64)> = (0..8).map(|i| (41 + i, 512 << 10)).collect();
    let live = pushed("prewarm/live", "v1", &live_layers);
    let proxy = FaultProxy::start(origin()).expect("proxy");
    proxy.set_fault(Fault::Stall {
        after: 256 << 10,
        duration: Duration::from_secs(1),
        times: ALWAYS,
    });
    let c = Containerd::start().expect("containerd");
    let d = Daemon::start_with(Options {
        extra: format!(
            "[[registry]]\nhost = \"{host}\"\nendpoint = \"{url}\"\n\
             [containerd]\nconfigure_hosts = true\nconfig = \"{cfg}\"\n\
             {A10G}[prewarm]\ninto_containerd = false\nblob_concurrency = 1\ngate_readiness = true\n\
             [[prewarm.rule]]\nname = \"big\"\nimages = [\"{host}/prewarm/big:v1\"]\n",
            host = proxy.host(),
            url = proxy.url(),
            cfg = c.config_path().display(),
        ),
        ..Options::default()
    });
    let reference = format!("{}/prewarm/big:v1", proxy.host());
    wait_image(&d, &reference, "fetching a second blob", |i| {
        i["state"] == "fetching" && i["bytes_done"].as_u64().unwrap_or(0) > 16 * MIB
    });
    // Readiness waits for prewarm.
    let (code, body) = common::util::http_get(&d.telemetry.to_string(), "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("waiting for prewarm"), "{body}");

    let live_ref = format!("{}/{}:{}", proxy.host(), live.repo, live.tag);
    let started = Instant::now();
    let out = c
        .ctr_with_timeout(
            &[
                "content",
                "fetch",
                "--hosts-dir",
                &c.hosts_dir().to_string_lossy(),
                &live_ref,
            ],
            WARM,
        )
        .expect("ctr");
    let ended = Instant::now();
    assert!(out.success(), "live pull: {out:?}\n{}", d.log_tail(30));
    let during = wait_image(&d, &reference, "anything", |_| true);
    assert_eq!(
        during["state"], "fetching",
        "the live pull waited for the prewarm to finish: {during:#}"
    );
    // No prewarm blob started while the live pull ran (the margin covers
    // the moment between the live download's commit and ctr's exit).
    let reqs = proxy.requests();
    let live_start = reqs
        .iter()
        .filter(|r| r.is_blob_get() && r.path.contains(&live.repo))
        .map(|r| r.at)
        .min()
        .expect("the live pull reached the origin");
    let window_end = ended - Duration::from_millis(200);
    let overlapping: Vec<_> = reqs
        .iter()
        .filter(|r| r.is_blob_get() && r.path.contains("prewarm/big"))
        .filter(|r| r.at > live_start && r.at < window_end)
        .map(|r| r.path.clone())
        .collect();
    eprintln!(
        "live pull took {:?}; prewarm blobs started during it: {overlapping:?}",
        ended - started
    );
    assert!(
        overlapping.is_empty(),
        "prewarm started blobs during a live pull"
    );

    // Prewarm then finishes, and readiness follows.
    let done = wait_image(&d, &reference, "cached", |i| i["state"] == "cached");
    assert_eq!(done["bytes_done"], done["bytes_total"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::util::http_get(&d.telemetry.to_string(), "/readyz")
        .unwrap()
        .0
        != 200
    {
        assert!(Instant::now() < deadline, "never ready after prewarm");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        big.total_size,
        done["bytes_total"].as_u64().unwrap() - big.manifest.len() as u64
    );
}

#[test]
fn a_moved_tag_is_prewarmed_again_and_the_old_image_unpinned() {
    let _g = heavy();
    let v1 = pushed("prewarm/moving", "stable", &[(51, MIB)]);
    let (d, c) = node(&format!(
        "{A10G}[prewarm]\ncontainerd_socket = \"{{containerd_socket}}\"\nrefresh = \"1s\"\n\
         [[prewarm.rule]]\nname = \"moving\"\nimages = [\"{}\"]\n",
        v1.reference
    ));
    let first = in_containerd(&d, &v1.reference);
    assert_eq!(first["digest"], v1.manifest_digest.as_str());
    let old_layer = v1.layers.last().unwrap().0.clone();
    assert!(pinned_in_store(&d, &old_layer));

    let v2 = pushed("prewarm/moving", "stable", &[(52, MIB)]);
    assert_ne!(v1.manifest_digest, v2.manifest_digest);
    let moved = wait_image(&d, &v1.reference, "moved to the new digest", |i| {
        i["digest"] == v2.manifest_digest.as_str() && i["state"] == "in_containerd"
    });
    assert_eq!(moved["previous"], v1.manifest_digest.as_str());
    let new_layer = v2.layers.last().unwrap().0.clone();
    assert!(pinned_in_store(&d, &new_layer), "the new image is pinned");
    assert!(
        !pinned_in_store(&d, &old_layer),
        "the old image is still pinned"
    );
    // In containerd: the tag names the new image; the old image's digest
    // record lost its pinned label, the new one has it.
    let cri = cri_status(&c, &v1.reference).expect("CRI has the tag");
    assert!(
        cri.repo_digests
            .iter()
            .any(|r| r.ends_with(&v2.manifest_digest)),
        "{cri:?}"
    );
    let old_ref = format!("{}/{}@{}", v1.registry, v1.repo, v1.manifest_digest);
    for l in k8s_images(&c, &old_ref) {
        assert!(
            !l.contains("io.cri-containerd.pinned"),
            "old record still pinned: {l}"
        );
    }
    let new_ref = format!("{}/{}@{}", v2.registry, v2.repo, v2.manifest_digest);
    let new_lines = k8s_images(&c, &new_ref);
    assert!(!new_lines.is_empty());
    for l in new_lines {
        assert!(l.contains("io.cri-containerd.pinned=pinned"), "{l}");
    }
}

#[test]
fn a_rule_too_big_for_the_store_is_refused_before_any_blob_is_fetched() {
    let img = pushed("prewarm/huge", "v1", &[(61, 3 * MIB)]);
    let mark = origin().mark();
    let (d, _c) = node_with_store(
        "max_size = \"2MiB\"\n",
        &format!(
            "{A10G}[prewarm]\ncontainerd_socket = \"{{containerd_socket}}\"\n\
         [[prewarm.rule]]\nname = \"huge\"\nimages = [\"{}\"]\n",
            img.reference
        ),
    );
    let got = wait_image(&d, &img.reference, "refused", |i| i["state"] == "refused");
    let err = got["error"].as_str().unwrap();
    assert!(err.contains("store.max_size"), "{err}");
    assert_eq!(
        origin_blob_bytes(&img.repo, mark),
        0,
        "fetched part of a refused image"
    );
    assert!(d.log().contains("prewarm failed"), "no log line");
    assert!(d.metric(r#"damselfly_prewarm_failures_total{rule="huge"}"#) >= 1.0);
}

#[test]
fn bad_rules_are_refused_at_start_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[prewarm.rule]]\nimages = [\"Not/A/Ref\"]\n[prewarm.rule.gpu]\nproduct = \"[x\"\nmin_count = 0\n",
    )
    .unwrap();
    for args in [
        vec!["config", "check", "--config"],
        vec!["daemon", "--config"],
    ] {
        let out = std::process::Command::new(daemon::binary())
            .args(&args)
            .arg(&path)
            .output()
            .expect("run damselfly");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for key in [
            "prewarm.rule[0].images[0]",
            "prewarm.rule[0].gpu.product",
            "prewarm.rule[0].gpu.min_count",
        ] {
            assert!(err.contains(key), "{args:?} does not name {key}: {err}");
        }
    }
}

#[test]
fn without_nvml_the_node_has_no_gpus_and_says_why_once() {
    let img = pushed("prewarm/cpu", "v1", &[(71, MIB)]);
    let (d, _c) = node(&format!(
        "[gpu]\nnvml_library = \"/nonexistent/libnvidia-ml.so.1\"\n\
         [prewarm]\ncontainerd_socket = \"{{containerd_socket}}\"\n\
         [[prewarm.rule]]\nname = \"gpu-only\"\nimages = [\"{r}\"]\n\
         [[prewarm.rule]]\nname = \"everyone\"\nnodes = \"all\"\nimages = [\"{r}\"]\n",
        r = img.reference
    ));
    in_containerd(&d, &img.reference);
    let s = status(&d);
    assert_eq!(s["gpu"]["source"], "none");
    assert_eq!(s["gpu"]["devices"].as_array().unwrap().len(), 0);
    assert_eq!(s["rules"][0]["matched"], false);
    let why = s["rules"][0]["reason"].as_str().unwrap();
    assert!(why.contains("/nonexistent/libnvidia-ml.so.1"), "{why}");
    assert_eq!(s["rules"][1]["matched"], true);
    let log = d.log();
    assert_eq!(
        log.matches("this node has no GPUs").count(),
        1,
        "the fallback is one line, not a retry loop:\n{log}"
    );
    assert_eq!(d.metric("damselfly_gpus"), 0.0);
    // The daemon runs on: it serves and answers.
    assert_eq!(
        common::util::http_get(&d.telemetry.to_string(), "/healthz")
            .unwrap()
            .0,
        200
    );
}
