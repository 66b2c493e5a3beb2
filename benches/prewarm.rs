//! The prewarm bench: how long from a daemon's start until its image is
//! pulled and unpacked in containerd, against the bound the link sets
//! (image bytes over the node's bandwidth).
//!
//! Nodes are network namespaces with `tc tbf` links (the lab in
//! `damselfly_lab::netlab`), each with its own real containerd and a release
//! daemon whose static GPU inventory matches one `[[prewarm.rule]]`. The
//! origin is a docker-registry in its own shaped namespace. Scenarios:
//!
//! - **direct**: N fresh containerds pull the image straight from the
//!   origin with CRI `PullImage` at once, no damselfly (the baseline);
//! - **origin only**: N fresh daemons start at once with nothing cached
//!   anywhere; their prewarm fetches the image once through the swarm;
//! - **warm peer**: one more fresh daemon starts beside a node that holds
//!   the image.
//!
//! For each node it reports the wall time from spawning the daemon to
//! `in_containerd` in `damselfly prewarm status`, the daemon's own
//! `ready_after_s`, the bound, and origin bytes over the image. The goal is
//! within 2 s of the bound. Times are printed, never asserted; the run
//! fails only when a prewarm does not complete.
//!
//! `cargo bench --bench prewarm` (root). Settings: `DAMSELFLY_PREWARM_MIB`
//! (image size, default 256; 24 in quick mode), `DAMSELFLY_PREWARM_NODES`
//! (N, default 4; 2 in quick mode), `DAMSELFLY_PREWARM_MBIT` (every link,
//! default 400), `DAMSELFLY_BENCH_QUICK=1`. `cargo test` runs the quick
//! mode on the debug build.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{build_image, push_image, write_direct_hosts_toml, Containerd, ImageSpec, LayerSpec};
use damselfly_lab as common;
use damselfly_lab::netlab;
use netlab::*;

const WARM_TIMEOUT: Duration = Duration::from_secs(180);

struct Settings {
    quick: bool,
    mib: u64,
    nodes: usize,
    mbit: u64,
}

impl Settings {
    fn from_env(test: bool) -> Settings {
        let quick = test || std::env::var_os("DAMSELFLY_BENCH_QUICK").is_some();
        Settings {
            quick,
            mib: env_u64("DAMSELFLY_PREWARM_MIB", if quick { 24 } else { 256 }),
            nodes: env_u64("DAMSELFLY_PREWARM_NODES", if quick { 2 } else { 4 }) as usize,
            mbit: env_u64("DAMSELFLY_PREWARM_MBIT", 400),
        }
    }
}

/// One node's result.
struct Row {
    scenario: &'static str,
    node: String,
    /// From spawning the daemon (or starting the CRI pull) to ready.
    wall: f64,
    /// The daemon's own seconds from start to ready.
    in_daemon: Option<f64>,
    /// Seconds in each stage, from the daemon's status: waiting for the
    /// swarm to settle, resolving, fetching, CRI pull and unpack.
    stages: Option<[f64; 4]>,
}

/// One node's result as its daemon saw it.
struct Ready {
    wall: f64,
    in_daemon: Option<f64>,
    stages: Option<[f64; 4]>,
}

/// The time in each stage, from `prewarm status -o json`.
fn stages(status: &serde_json::Value, img: &serde_json::Value) -> Option<[f64; 4]> {
    let st = &img["stages"];
    let at = |k: &str| st[k].as_f64();
    let settled = status["settled_after_s"].as_f64()?;
    let (started, resolved) = (at("started_s")?, at("resolved_s")?);
    let (cached, landed) = (at("cached_s")?, at("in_containerd_s")?);
    Some([
        settled,
        resolved - started,
        cached - resolved,
        landed - cached,
    ])
}

/// A daemon with its own containerd, wired together and prewarming `image`.
struct WarmNode {
    node: Node,
    _ctrd: Containerd,
    spawned: Instant,
}

fn prewarm_config(ctrd: &Containerd, image: &str) -> String {
    format!(
        "[containerd]\nconfigure_hosts = true\nconfig = \"{cfg}\"\n\
         [gpu.assume]\ncount = 1\nproduct = \"NVIDIA A10G\"\nmemory = \"24GiB\"\n\
         [prewarm]\ncontainerd_socket = \"{sock}\"\n\
         [[prewarm.rule]]\nname = \"bench\"\nimages = [\"{image}\"]\n\
         [prewarm.rule.gpu]\nproduct = \"*A10G*\"\n",
        cfg = ctrd.config_path().display(),
        sock = ctrd.socket().display(),
    )
}

fn start_node(
    lab: &Lab,
    index: usize,
    bootstrap: &[String],
    origin: &Origin,
    key: &Path,
    image: &str,
) -> WarmNode {
    let hosts = lab
        .dir
        .join(format!("hosts-{index}-g{}", lab.next_generation()));
    std::fs::create_dir_all(&hosts).expect("hosts dir");
    let ctrd = Containerd::start_in_netns(&lab.nodes[index].ns, &hosts)
        .unwrap_or_else(|e| panic!("containerd in node {}: {e:#}", index + 1));
    let extra = prewarm_config(&ctrd, image);
    let spawned = Instant::now();
    let node = Node::start_with(lab, index, bootstrap, origin, key, "node", &extra);
    WarmNode {
        node,
        _ctrd: ctrd,
        spawned,
    }
}

/// `damselfly prewarm status -o json` of a node.
fn status(socket: &Path) -> Option<serde_json::Value> {
    let out = std::process::Command::new(damselfly_lab::daemon::binary())
        .args(["prewarm", "status", "-o", "json", "--socket"])
        .arg(socket)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Waits until the node's image is in containerd: the wall seconds since
/// its daemon was spawned, and the daemon's own `ready_after_s` and stages.
fn wait_ready(w: &WarmNode) -> Ready {
    let deadline = Instant::now() + WARM_TIMEOUT;
    let socket: PathBuf = w.node.admin_socket();
    loop {
        if let Some(s) = status(&socket) {
            let img = &s["images"][0];
            if img["state"] == "in_containerd" {
                return Ready {
                    wall: w.spawned.elapsed().as_secs_f64(),
                    in_daemon: img["ready_after_s"].as_f64(),
                    stages: stages(&s, img),
                };
            }
            if img["state"] == "failed" || img["state"] == "refused" {
                eprintln!("{}: {}: {}", w.node.ns, img["state"], img["error"]);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{}: prewarm not done in {WARM_TIMEOUT:?}:\n{}",
            w.node.ns,
            w.node.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CRI `PullImage` straight from the origin on `n` fresh containerds at
/// once: each one's seconds.
fn direct(lab: &Lab, origin: &Origin, n: usize, image: &str) -> Vec<f64> {
    let pullers: Vec<(Containerd, PathBuf)> = (0..n)
        .map(|i| {
            let hosts = lab
                .dir
                .join(format!("direct-{i}-g{}", lab.next_generation()));
            write_direct_hosts_toml(&hosts, &origin.host()).expect("hosts.toml");
            let c = Containerd::start_in_netns(&lab.nodes[i].ns, &hosts).expect("containerd");
            (c, hosts)
        })
        .collect();
    let barrier = std::sync::Barrier::new(n);
    std::thread::scope(|scope| {
        let handles: Vec<_> = pullers
            .iter()
            .map(|(c, _)| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    let t = Instant::now();
                    common::cri_pull(c.socket(), image).expect("direct CRI pull");
                    t.elapsed().as_secs_f64()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("puller"))
            .collect()
    })
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let s = Settings::from_env(!bench);
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the prewarm bench needs root (network namespaces, tc, containerd)"
    );
    Lab::clean_stale();
    let keep = std::env::var_os("DAMSELFLY_BENCH_KEEP").is_some();
    let lab = Lab::new(s.nodes + 1, keep);
    lab.shape(s.mbit, s.mbit);
    let key = lab.cluster_key();
    let origin = Origin::start(&lab);

    let layer = s.mib * MIB / 4;
    let spec = ImageSpec::new(
        std::iter::once(LayerSpec::Busybox)
            .chain((0..4).map(|i| LayerSpec::Random {
                size: layer,
                seed: 900 + i,
            }))
            .collect(),
    );
    let layout = build_image(&spec).expect("build image");
    let pushed = push_image(&layout, origin.url().as_str(), "bench/prewarm", "v1", None)
        .expect("push image");
    drop(layout);
    let image = pushed.reference.clone();
    let owned = pushed.blob_digests();
    let digests: Vec<&str> = owned.iter().map(String::as_str).collect();
    let bytes = pushed.total_size;
    let bound = bytes as f64 * 8.0 / (s.mbit as f64 * 1e6);
    eprintln!(
        "image {image}: {bytes} bytes in {} blobs; {} Mbit/s links; bound {bound:.2}s",
        digests.len(),
        s.mbit
    );
    let mut rows = Vec::new();

    // The baseline: every node straight from the origin.
    for (i, t) in direct(&lab, &origin, s.nodes, &image)
        .into_iter()
        .enumerate()
    {
        rows.push(Row {
            scenario: "direct",
            node: format!("node{}", i + 1),
            wall: t,
            in_daemon: None,
            stages: None,
        });
    }

    // N fresh daemons at once, nothing cached anywhere.
    let mark = origin.sync();
    let first = start_node(&lab, 0, &[], &origin, &key, &image);
    let boot = vec![first.node.control_addr()];
    let mut fleet = vec![first];
    // One after the other from this thread (each start returns once the
    // daemon listens, a fraction of a second): the lab's children die with
    // the thread that spawned them (PR_SET_PDEATHSIG), so not from scoped
    // threads. Each node's time counts from its own spawn.
    for i in 1..s.nodes {
        fleet.push(start_node(&lab, i, &boot, &origin, &key, &image));
    }
    for w in &fleet {
        let r = wait_ready(w);
        rows.push(Row {
            scenario: "origin only",
            node: w.node.ns.clone(),
            wall: r.wall,
            in_daemon: r.in_daemon,
            stages: r.stages,
        });
    }
    let (origin_bytes, _) = origin.blobs_bytes_since(mark, &digests);
    let fleet_ratio = origin_bytes as f64 / bytes as f64;

    // One more fresh daemon beside a node that holds the image.
    let peer = fleet.remove(0);
    drop(fleet);
    let mark = origin.sync();
    let late = start_node(
        &lab,
        s.nodes,
        &[peer.node.control_addr()],
        &origin,
        &key,
        &image,
    );
    let r = wait_ready(&late);
    rows.push(Row {
        scenario: "warm peer",
        node: late.node.ns.clone(),
        wall: r.wall,
        in_daemon: r.in_daemon,
        stages: r.stages,
    });
    let (late_origin, _) = origin.blobs_bytes_since(mark, &digests);

    println!(
        "\n## Prewarm: daemon start to image in containerd ({}, {} MiB image, {} Mbit/s links)\n",
        if s.quick { "quick" } else { "full" },
        bytes >> 20,
        s.mbit
    );
    println!("{}\n", machine());
    println!("bound (image over the link): {bound:.2} s\n");
    println!(
        "| scenario | node | from spawn | in the daemon | over the bound \
         | settle | resolve | fetch | CRI pull + unpack |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let st = r.stages.map_or("| - | - | - | - |".into(), |st| {
            st.iter()
                .map(|t| format!("| {t:.2} s "))
                .collect::<String>()
                + "|"
        });
        println!(
            "| {} | {} | {:.2} s | {} | {:+.2} s {st}",
            r.scenario,
            r.node,
            r.wall,
            r.in_daemon.map_or("-".into(), |t| format!("{t:.2} s")),
            r.wall - bound
        );
    }
    println!(
        "\n(spawn to the daemon's start is \"from spawn\" less \"in the daemon\"; \
         the stages are the daemon's own, from `prewarm status`)"
    );
    println!(
        "\norigin blob bytes: origin only {fleet_ratio:.3}x the image for {} nodes; \
         warm peer {:.3}x",
        s.nodes,
        late_origin as f64 / bytes as f64
    );
    let worst = |scenario: &str| {
        rows.iter()
            .filter(|r| r.scenario == scenario)
            .map(|r| r.wall - bound)
            .fold(f64::MIN, f64::max)
    };
    for sc in ["origin only", "warm peer"] {
        let over = worst(sc);
        println!(
            "{sc}: slowest node {over:+.2} s over the bound: goal (within 2 s) {}",
            if over <= 2.0 { "met" } else { "MISSED" }
        );
    }
    drop(peer);
    drop(late);
}
