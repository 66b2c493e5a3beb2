//! The scaling sidecar with real parts: Debian's `prometheus` scraping a
//! `prometheus-pushgateway` that the test pushes `gpu_job_queue_depth` to
//! (as a seed's scripts do), `damselfly sidecar` reading it through
//! Prometheus' `/api/v1/query`, daemons on 127.0.0.N each with its own real
//! containerd (CRI `PullImage` through its mirror), a docker-registry
//! origin whose access log counts blob bytes.
//!
//! Times are reported, never asserted: waits have generous deadlines.

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cluster::{node_ip, Cluster, NodeSpec};
use common::{
    build_image_cached, cri_pull, push_image, ImageSpec, LayerSpec, Prometheus, PushedImage,
    Registry, RegistryAuth,
};
use daemon::{Daemon, Options, SwarmOptions};
use damselfly_lab as common;
use damselfly_lab::{cluster, daemon};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// A prewarm of a few MiB on a loaded 2-core box, containerd unpack
/// included.
const WARM: Duration = Duration::from_secs(120);
const WORKLOAD: &str = "inference/llm";
const QUERY: &str = "sum(gpu_job_queue_depth) or vector(0)";

/// `[gpu.assume]` for one A10G, and a prewarm engine with no rules: only
/// intents make these daemons prewarm.
const A10G_NODE: &str = "[gpu.assume]\ncount = 1\nproduct = \"NVIDIA A10G\"\nmemory = \"24GiB\"\n\
                         [prewarm]\ncontainerd_socket = \"{containerd_socket}\"\n";

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

fn pushed(repo: &str, seeds: &[(u64, u64)]) -> PushedImage {
    let mut layers = vec![LayerSpec::Busybox];
    layers.extend(seeds.iter().map(|(seed, size)| LayerSpec::Random {
        size: *size,
        seed: *seed,
    }));
    let layout = build_image_cached(&ImageSpec::new(layers)).expect("build image");
    push_image(&layout, origin(), repo, "v1", None).expect("push image")
}

/// A `damselfly sidecar` on 127.0.0.200 in `cluster`'s swarm (bootstrapped
/// to node 0), for `origin()`, with `body` in its `[sidecar]` section.
fn sidecar(cluster: &Cluster, body: &str) -> Daemon {
    Daemon::start_with(sidecar_options(cluster, body))
}

fn sidecar_options(cluster: &Cluster, body: &str) -> Options {
    Options {
        ip: Some(node_ip(198)),
        swarm: Some(SwarmOptions {
            bootstrap: vec![cluster.nodes[0].daemon.swarm_multiaddr()],
            cluster_key_file: Some(cluster.key_file.clone()),
            extra: "heartbeat = \"500ms\"\n".into(),
            ..SwarmOptions::default()
        }),
        extra: format!(
            "[[registry]]\nhost = \"{}\"\nendpoint = \"{}\"\n",
            origin().host(),
            origin().url()
        ),
        sidecar: Some(body.to_owned()),
        ..Options::default()
    }
}

/// The `[sidecar]` lines for `images`, reading `prom`, polling fast.
fn sidecar_body(prom: &Prometheus, images: &[&str], more: &str) -> String {
    let list: Vec<String> = images.iter().map(|i| format!("{i:?}")).collect();
    format!(
        "workload = \"{WORKLOAD}\"\nimages = [{}]\nprometheus = \"{}\"\nquery = \"{QUERY}\"\n\
         threshold = 5\nmax_replicas = 10\npoll_interval = \"500ms\"\nquery_timeout = \"2s\"\n\
         republish = \"2s\"\n{more}\n",
        list.join(", "),
        prom.url()
    )
}

/// A Prometheus whose queries see queue depth `depth`, and one A10G daemon
/// with its containerd.
fn queue_and_one_node(depth: u32) -> (Prometheus, Cluster) {
    let prom = Prometheus::start("1s").expect("prometheus");
    prom.push("queue", &format!("gpu_job_queue_depth {depth}\n"))
        .unwrap();
    prom.wait_value(QUERY, f64::from(depth), Duration::from_secs(30))
        .unwrap();
    let spec = NodeSpec {
        wire_containerd: true,
        config: A10G_NODE.into(),
        ..NodeSpec::default()
    };
    (prom, Cluster::start_specs(origin(), vec![spec]))
}

fn status(s: &Daemon) -> Value {
    let (code, v) = s.http_json("/v1/status");
    assert_eq!(code, 200, "sidecar status: {v}");
    v
}

/// Polls `f` on the sidecar's status until it gives `Some`.
fn wait_status<T>(s: &Daemon, what: &str, timeout: Duration, f: impl Fn(&Value) -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let st = status(s);
        if let Some(t) = f(&st) {
            return t;
        }
        if Instant::now() > deadline {
            panic!(
                "sidecar: not {what} within {timeout:?}: {st:#}\n--- sidecar log ---\n{}",
                s.log_tail(40)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The intent image of `img` on a daemon.
fn is_intent_image(img: &PushedImage) -> impl Fn(&Value) -> bool + '_ {
    move |i: &Value| {
        i["rule"] == format!("intent:{WORKLOAD}").as_str()
            && i["reference"]
                .as_str()
                .is_some_and(|r| r.starts_with(&img.reference))
    }
}

#[test]
fn a_rising_queue_warms_every_node_before_its_pull_and_a_node_that_joins_later() {
    let _g = heavy();
    let img = pushed(
        "sidecar/llm",
        &[(101, 4 * MIB), (102, 6 * MIB), (103, 8 * MIB)],
    );
    let prom = Prometheus::start("1s").expect("prometheus");
    prom.push("queue", "gpu_job_queue_depth 0\n").unwrap();
    prom.wait_value(QUERY, 0.0, Duration::from_secs(30))
        .unwrap();
    let spec = NodeSpec {
        wire_containerd: true,
        config: A10G_NODE.into(),
        extra: "heartbeat = \"500ms\"\n".into(),
        ..NodeSpec::default()
    };
    let mut cluster = Cluster::start_specs(origin(), vec![spec.clone(); 4]);
    cluster.wait_members(3, Duration::from_secs(30)).unwrap();
    let sc = sidecar(
        &cluster,
        &sidecar_body(
            &prom,
            &[&img.reference],
            "cooldown = \"4s\"\nintent_ttl = \"120s\"\n[sidecar.gpu]\nproduct = \"*A10G*\"\n",
        ),
    );
    wait_status(&sc, "seeing the 4 daemons and a good zero", WARM, |s| {
        (s["members"] == 4 && s["signal"]["ok"] == true && s["wanted_replicas"] == 0).then_some(())
    });
    // The sidecar is a member the daemons see, never a data peer.
    for n in &cluster.nodes {
        assert_eq!(
            n.members(),
            3.0,
            "{}: the sidecar counted as a data peer",
            n.name()
        );
    }
    // At zero nothing goes out.
    std::thread::sleep(Duration::from_secs(2));
    assert!(status(&sc)["intent"].is_null());
    assert_eq!(
        sc.metric_sum("damselfly_sidecar_intent_publications_total", &[]),
        0.0
    );
    for n in &cluster.nodes {
        assert_eq!(n.daemon.prewarm_status()["intents"], serde_json::json!([]));
    }

    // The queue fills: 12 jobs at threshold 5 is 3 replicas.
    let mark = origin().mark();
    let pushed_at = Instant::now();
    prom.push("queue", "gpu_job_queue_depth 12\n").unwrap();
    let replicas = wait_status(&sc, "publishing an intent", WARM, |s| {
        s["intent"]["replicas"].as_u64()
    });
    let published = pushed_at.elapsed();
    assert_eq!(replicas, 3);
    let st = status(&sc);
    assert_eq!(st["wanted_replicas"], 3);
    assert_eq!(st["signal"]["value"], 12.0);
    assert_eq!(
        st["intent"]["images"][0]["digest"],
        img.manifest_digest.as_str()
    );
    let (code, keda) = sc.http_json("/keda");
    assert_eq!(code, 200, "{keda}");
    assert_eq!(
        (&keda["value"], &keda["threshold"], &keda["wantedReplicas"]),
        (
            &serde_json::json!(12.0),
            &serde_json::json!(5.0),
            &serde_json::json!(3)
        )
    );

    // Every node holds the image, in containerd, before any pull asks.
    let mut ready_after = Vec::new();
    for n in &cluster.nodes {
        let s = n
            .daemon
            .wait_prewarm_image(is_intent_image(&img), "in_containerd", WARM, |i| {
                i["state"] == "in_containerd"
            });
        ready_after.push((n.name(), pushed_at.elapsed(), s["sources"].clone()));
        n.containerd.unpacked(&img.reference).unwrap();
    }
    let lead = wait_status(&sc, "acked by the 4 nodes", WARM, |s| {
        let i = &s["intent"]["images"][0];
        (i["nodes"].as_array()?.len() == 4).then(|| i["lead_time_s"].as_f64())?
    });
    eprintln!("push to intent published: {:.2}s; lead time (publication to the first node holding the image): {lead:.2}s", published.as_secs_f64());
    for (name, after, sources) in &ready_after {
        eprintln!(
            "{name}: push to ready (seen by the test, polling): {:.2}s; bytes cache {} peers {} origin {}",
            after.as_secs_f64(),
            sources["cache"],
            sources["peers"],
            sources["origin"]
        );
    }
    for node in status(&sc)["intent"]["images"][0]["nodes"]
        .as_array()
        .unwrap()
    {
        eprintln!(
            "  ack from {} ({}): {:.2}s after publication",
            node["peer_id"], node["role"], node["ready_after_s"]
        );
    }

    // A GPU node that Karpenter boots now gets the live intent when it joins.
    let late = cluster.add(origin(), spec.clone());
    let late_started = Instant::now();
    let s = late
        .daemon
        .wait_prewarm_image(is_intent_image(&img), "in_containerd", WARM, |i| {
            i["state"] == "in_containerd"
        });
    eprintln!(
        "{} (started after the intent): daemon start to ready {:.2}s; bytes cache {} peers {} origin {}",
        late.name(),
        late_started.elapsed().as_secs_f64(),
        s["sources"]["cache"],
        s["sources"]["peers"],
        s["sources"]["origin"]
    );
    late.containerd.unpacked(&img.reference).unwrap();
    assert!(
        sc.metric(r#"damselfly_sidecar_intent_publications_total{kind="join"}"#) >= 1.0,
        "no publication for the joining node\n{}",
        sc.log_tail(30)
    );
    wait_status(&sc, "acked by 5 nodes", WARM, |s| {
        (s["intent"]["images"][0]["nodes"].as_array()?.len() == 5).then_some(())
    });

    // Five nodes, and the origin sent each blob byte once.
    let sent = origin().blob_bytes_sent_in_repo_since(&img.repo, mark);
    let ratio = sent as f64 / img.total_size as f64;
    eprintln!(
        "5 nodes warmed {} bytes; the origin sent {sent} blob bytes ({ratio:.3}x)",
        img.total_size
    );
    assert!(
        (1.0..=1.05).contains(&ratio),
        "origin blob bytes {ratio:.3}x the image\n{}",
        cluster.report(30)
    );
    // The kubelet's pull on each node moves nothing from the origin.
    let mark = origin().mark();
    for n in &cluster.nodes {
        let t = Instant::now();
        cri_pull(n.containerd.socket(), &img.reference)
            .unwrap_or_else(|e| panic!("{}: {e}", n.name()));
        eprintln!(
            "{}: the pod's CRI PullImage of the warmed image: {:.2}s",
            n.name(),
            t.elapsed().as_secs_f64()
        );
        n.containerd.unpacked(&img.reference).unwrap();
    }
    assert_eq!(origin().blob_bytes_sent_in_repo_since(&img.repo, mark), 0);
    // The baseline, in the same run: an image of the same layer sizes that
    // no intent names, pulled only when "the pod lands" (CRI PullImage
    // through the same mirror, from the origin, on a node of this cluster).
    let cold = pushed(
        "sidecar/cold",
        &[(104, 4 * MIB), (105, 6 * MIB), (106, 8 * MIB)],
    );
    let n = &cluster.nodes[1];
    let t = Instant::now();
    cri_pull(n.containerd.socket(), &cold.reference)
        .unwrap_or_else(|e| panic!("{}: {e}", n.name()));
    eprintln!(
        "{}: baseline, a pull that starts when the pod lands ({} bytes, nothing warm): {:.2}s; load average {}",
        n.name(),
        cold.total_size,
        t.elapsed().as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    n.containerd.unpacked(&cold.reference).unwrap();
    let layer = img.layers.last().unwrap().0.clone();
    for n in &cluster.nodes {
        assert!(n.daemon.pinned_in_store(&layer), "{}: not pinned", n.name());
    }
    // One open; the rest are refreshes and joins, never a flood.
    assert_eq!(
        sc.metric(r#"damselfly_sidecar_intent_publications_total{kind="open"}"#),
        1.0
    );
    assert_eq!(
        sc.metric(r#"damselfly_sidecar_intent_publications_total{kind="update"}"#),
        0.0
    );
    assert_eq!(sc.metric("damselfly_sidecar_live_intents"), 1.0);
    assert!(sc.metric_sum("damselfly_sidecar_lead_seconds", &[]) > 0.0);

    // `damselfly sidecar status`, for people and for scripts.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(daemon::binary())
            .args(["sidecar", "status"])
            .args(args)
            .arg("--config")
            .arg(&sc.config_path)
            .output()
            .expect("run damselfly");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let table = cli(&[]);
    eprintln!("$ damselfly sidecar status\n{table}");
    assert!(
        table.contains(WORKLOAD) && table.contains("READY AFTER") && table.contains("3 replica"),
        "{table}"
    );
    let json: Value = serde_json::from_str(&cli(&["-o", "json"])).unwrap();
    assert_eq!(json["intent"]["replicas"], 3);
    if let Some(dir) = std::env::var_os("DAMSELFLY_CLI_DOCS") {
        let dir = std::path::Path::new(&dir);
        std::fs::write(dir.join("sidecar-status.txt"), &table).unwrap();
        std::fs::write(dir.join("sidecar-status.json"), cli(&["-o", "json"])).unwrap();
    }

    // The queue drains: after the cooldown at zero the intent is released
    // and every daemon unpins the image.
    prom.push("queue", "gpu_job_queue_depth 0\n").unwrap();
    wait_status(&sc, "releasing the intent", WARM, |s| {
        (s["intent"].is_null() && !s["released_at"].is_null()).then_some(())
    });
    for n in &cluster.nodes {
        let deadline = Instant::now() + Duration::from_secs(30);
        while n.daemon.pinned_in_store(&layer)
            || n.daemon.prewarm_status()["intents"] != serde_json::json!([])
        {
            assert!(
                Instant::now() < deadline,
                "{}: the released intent's image is still pinned\n{}",
                n.name(),
                n.daemon.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            n.daemon
                .metric(r#"damselfly_prewarm_intents_total{result="released"}"#)
                >= 1.0
        );
    }
    assert_eq!(
        sc.metric(r#"damselfly_sidecar_intent_publications_total{kind="release"}"#),
        1.0
    );
}

#[test]
fn prometheus_down_holds_the_intent_until_it_expires_without_a_flood() {
    let _g = heavy();
    let img = pushed("sidecar/hold", &[(111, MIB)]);
    let (mut prom, cluster) = queue_and_one_node(12);
    let sc = sidecar(
        &cluster,
        &sidecar_body(&prom, &[&img.reference], "intent_ttl = \"8s\"\n"),
    );
    let node = &cluster.nodes[0].daemon;
    node.wait_prewarm_image(is_intent_image(&img), "in_containerd", WARM, |i| {
        i["state"] == "in_containerd"
    });
    let layer = img.layers.last().unwrap().0.clone();
    assert!(node.pinned_in_store(&layer));

    prom.stop_server();
    let down = Instant::now();
    wait_status(&sc, "seeing the signal fail", WARM, |s| {
        (s["signal"]["ok"] == false).then_some(())
    });
    let st = status(&sc);
    assert!(
        st["signal"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot reach"),
        "{st:#}"
    );
    assert_eq!(st["signal"]["value"], 12.0, "the last good value is kept");
    assert!(!st["intent"].is_null(), "the intent is held");
    let (code, keda) = sc.http_json("/keda");
    assert_eq!(code, 503, "KEDA must see the failure: {keda}");
    // Held until its expiry (8s after the last good read), then gone on
    // the sidecar and on the node.
    wait_status(
        &sc,
        "dropping the expired intent",
        Duration::from_secs(60),
        |s| s["intent"].is_null().then_some(()),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.pinned_in_store(&layer) {
        assert!(
            Instant::now() < deadline,
            "the expired intent's image is still pinned"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let held = down.elapsed();
    let failures = sc.metric(r#"damselfly_sidecar_signal_errors_total{reason="unreachable"}"#);
    let lines = sc.log().matches("cannot read the scaling signal").count();
    eprintln!(
        "Prometheus down: intent held {:.1}s; {failures} failed reads, {lines} log line(s)",
        held.as_secs_f64()
    );
    assert!(failures >= 3.0, "{failures}");
    assert_eq!(
        lines,
        1,
        "one line for a signal that keeps failing\n{}",
        sc.log_tail(30)
    );
    assert_eq!(sc.metric("damselfly_sidecar_signal_up"), 0.0);
    for kind in ["update", "release"] {
        assert_eq!(
            sc.metric(&format!(
                r#"damselfly_sidecar_intent_publications_total{{kind="{kind}"}}"#
            )),
            0.0,
            "{kind}"
        );
    }
    assert_eq!(
        sc.metric(r#"damselfly_sidecar_intent_publications_total{kind="open"}"#),
        1.0
    );

    // Back: the signal still says 12, so a new intent goes out.
    prom.start_server().unwrap();
    wait_status(&sc, "publishing again", WARM, |s| {
        (s["signal"]["ok"] == true && !s["intent"].is_null()).then_some(())
    });
    assert_eq!(
        sc.metric(r#"damselfly_sidecar_intent_publications_total{kind="open"}"#),
        2.0
    );
    assert!(sc.log().contains("the scaling signal answers again"));
}

#[test]
fn an_image_that_cannot_be_resolved_is_reported_and_the_others_still_go_out() {
    let _g = heavy();
    let img = pushed("sidecar/good", &[(121, MIB)]);
    let missing = format!("{}/sidecar/missing:v1", origin().host());
    let (prom, cluster) = queue_and_one_node(3);
    let sc = sidecar(
        &cluster,
        &sidecar_body(&prom, &[&missing, &img.reference], ""),
    );
    let node = &cluster.nodes[0].daemon;
    node.wait_prewarm_image(is_intent_image(&img), "in_containerd", WARM, |i| {
        i["state"] == "in_containerd"
    });
    let st = status(&sc);
    let images = st["intent"]["images"].as_array().unwrap();
    let bad = images
        .iter()
        .find(|i| i["reference"] == missing.as_str())
        .unwrap();
    assert!(bad["digest"].is_null(), "{bad}");
    assert!(
        bad["error"].as_str().unwrap().contains("no such manifest"),
        "{bad}"
    );
    assert!(sc.metric_sum("damselfly_sidecar_resolve_failures_total", &[]) >= 1.0);
    // The node was told only of the good image.
    let intents = node.prewarm_status()["intents"].clone();
    assert_eq!(
        intents[0]["images"].as_array().unwrap().len(),
        1,
        "{intents}"
    );

    // Bad intents over the real swarm are refused, counted, and harmless.
    let link = common::util::block_on(async {
        let cfg = damselfly::config::Config::load(&sc.config_path).unwrap();
        let mut swarm = cfg.swarm.clone();
        swarm.listen = format!("/ip4/{}/tcp/0", node_ip(197));
        let link = damselfly::swarm::intents::SidecarLink::join(&swarm)
            .await
            .unwrap();
        let before = node.metric(r#"damselfly_prewarm_intents_total{result="refused"}"#);
        let deadline = Instant::now() + Duration::from_secs(30);
        while node.metric(r#"damselfly_prewarm_intents_total{result="refused"}"#) < before + 3.0 {
            assert!(
                Instant::now() < deadline,
                "bad intents were not refused\n{}",
                node.log_tail(20)
            );
            for bad in [
                &b"not json"[..],
                br#"{"id":"a b","images":[],"replicas":1,"published_at":1,"expires_at":99999999999}"#,
                br#"{"id":"x/y","images":[{"reference":"Bad/Ref","digest":"sha256:00"}],"replicas":1,"published_at":1,"expires_at":99999999999}"#,
            ] {
                link.publish(damselfly::swarm::intents::INTENTS_TOPIC, bad.to_vec());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        link
    });
    common::util::block_on(link.shutdown());
    assert!(node.log().contains("refusing a warm intent"));
    // Still serving, still holding the good intent.
    assert_eq!(node.prewarm_status()["intents"][0]["id"], WORKLOAD);
}

#[test]
fn a_bad_query_or_config_stops_the_sidecar_at_start_naming_the_key() {
    let _g = heavy();
    let prom = Prometheus::start("1s").expect("prometheus");
    let cluster = Cluster::start_specs(origin(), vec![NodeSpec::default()]);
    let image = format!("{}/sidecar/any:v1", origin().host());
    let (code, log) = Daemon::start_expecting_exit(sidecar_options(
        &cluster,
        &sidecar_body(&prom, &[&image], "").replace(QUERY, "sum((gpu_job_queue_depth"),
    ));
    assert_eq!(code.code(), Some(2), "{log}");
    assert!(
        log.contains("sidecar.query") && log.contains("parse error"),
        "{log}"
    );
    let (code, log) = Daemon::start_expecting_exit(sidecar_options(
        &cluster,
        &format!("workload = \"{WORKLOAD}\"\nimages = [\"{image}\"]\nthreshold = -1\n"),
    ));
    assert_eq!(code.code(), Some(2), "{log}");
    for key in ["sidecar.threshold", "sidecar.prometheus"] {
        assert!(log.contains(key), "{key} not named: {log}");
    }
}
