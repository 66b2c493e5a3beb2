//! The warm-pull lab: a cluster on one machine that replays the cold and
//! warm story of a GPU node pool scaling out, against the two things people
//! use instead of damselfly, measured in the same run.
//!
//! Every node is a network namespace with its own real containerd and, on
//! the damselfly route, its own daemon (the bench's build of the binary);
//! the origin is a real `docker-registry` in a namespace of its own. Each
//! namespace has one veth pair to a bridge, with `tc tbf` on both ends, so
//! every node, the origin and the central cache have a capped upload and
//! download (no added latency: the kernel here has no netem). A node pulls
//! with `ctr content fetch` through the hosts.toml of its route, as the
//! kubelet's containerd would, without unpacking (the unpack costs the same
//! on every route). Origin bytes come from the origin's own access log.
//!
//! Routes:
//!
//! - **direct**: every node's containerd pulls from the origin.
//! - **central cache**: `docker-registry` in proxy mode (a pull-through
//!   cache, like ECR's) in its own namespace, capped like a node.
//! - **damselfly**: containerd pulls through the node's own daemon; the
//!   daemons form one swarm (`[swarm] enabled`, everything else at its
//!   defaults).
//!
//! Scenarios, for each image:
//!
//! - **burst** (N = 1 is the cold single node): N fresh nodes pull at once.
//! - **warm after scale-to-zero**: a seed (`role = "seed"`) and W nodes
//!   pull; the W nodes go away (stores and all), W fresh nodes pull again.
//!   The central cache route keeps its cache across the scale-down; direct
//!   has nothing to keep.
//!
//! Reported: the slowest and the median node, the slowest over the ideal
//! (image size over the tightest of the node and origin links), and origin
//! bytes over the image size. The run ends with a Markdown report (stdout
//! and `<out>/report.md`) and one SVG chart per image (`<out>/burst-<image>.svg`,
//! plotters): the slowest node against N for each route and the ideal.
//!
//! ```text
//! cargo bench --bench lab                              # full: 130 MB and 2 GiB images
//! DAMSELFLY_LAB_QUICK=1 cargo bench --bench lab        # quick: a 15 MiB image, N = 1, 2, 4
//! cargo test --bench lab                               # quick, debug build (CI runs this)
//! ```
//!
//! Every mode checks that every scenario completes with every blob in each
//! node's containerd, that direct pulls cost N times the image at the origin
//! (so the accounting is live), that damselfly's bursts cost between 1.00x
//! and 1.05x, a cold central cache at least 1x, and that damselfly's warm
//! pulls after scale-to-zero cost 0 origin bytes. It exits non-zero after
//! the report when a check fails. Times are never asserted.
//!
//! Needs root, `ip`, `tc`, `docker-registry`, `containerd`, `ctr`, `umoci`
//! and `skopeo`. Settings (environment): `DAMSELFLY_LAB_IMAGES`
//! (`article,large` in full mode, `small` in quick mode), `DAMSELFLY_LAB_NODES`
//! (node counts for every image, e.g. `1,2,4,8`), `DAMSELFLY_LAB_WARM_NODES`
//! (W, default 4, 2 in quick mode), `DAMSELFLY_LAB_NODE_MBIT`,
//! `DAMSELFLY_LAB_ORIGIN_MBIT` (400 each), `DAMSELFLY_LAB_PROXY_MBIT` (the
//! node rate), `DAMSELFLY_LAB_OUT` (default `target/damselfly-lab`),
//! `DAMSELFLY_LAB_ROUTES` (e.g. `damselfly`, for experiments; all three by
//! default), `DAMSELFLY_BENCH_SWARM` (extra `[swarm]` lines for every daemon),
//! `DAMSELFLY_BENCH_LOG` (the daemons' `log_level`, e.g.
//! `info,damselfly::fetch::pieces=debug` to see why pieces went to the
//! origin), `DAMSELFLY_BENCH_KEEP=1` (keep configs and logs).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{
    build_image, push_image, write_direct_hosts_toml, write_hosts_toml, Containerd, ImageSpec,
    LayerSpec, PushedImage,
};
use damselfly_lab as common;
use damselfly_lab::netlab;
use netlab::*;
use report::{chart, check, report, ImageResult};

mod report;

// ---------------------------------------------------------------------------
// Settings.
// ---------------------------------------------------------------------------

/// One image of the run.
struct ImageCase {
    /// Short name: table headings, the repository, the chart's file name.
    label: &'static str,
    /// Random layers' sizes in MiB, on top of a busybox layer.
    layers_mib: Vec<u64>,
    nodes: Vec<usize>,
    /// Whether to run the scale-to-zero scenario with it.
    warm: bool,
}

impl ImageCase {
    fn named(label: &str, quick: bool) -> ImageCase {
        match label {
            // About 130 MB, the article's image: busybox and four layers.
            "article" => ImageCase {
                label: "article",
                layers_mib: vec![72, 36, 12, 3],
                nodes: vec![1, 2, 4, 8],
                warm: true,
            },
            // A model image: 2 GiB in four layers. Up to 4 nodes: each node
            // keeps the image twice (daemon store and containerd), and 8
            // nodes would need 32 GiB of scratch disk.
            "large" => ImageCase {
                label: "large",
                layers_mib: vec![512; 4],
                nodes: vec![1, 2, 4],
                warm: false,
            },
            "small" => ImageCase {
                label: "small",
                layers_mib: vec![8, 4, 2],
                nodes: if quick {
                    vec![1, 2, 4]
                } else {
                    vec![1, 2, 4, 8]
                },
                warm: true,
            },
            other => {
                panic!("DAMSELFLY_LAB_IMAGES: unknown image {other:?} (article, large, small)")
            }
        }
    }

    fn spec(&self) -> ImageSpec {
        let mut layers = vec![LayerSpec::Busybox];
        for (i, mib) in self.layers_mib.iter().enumerate() {
            layers.push(LayerSpec::Random {
                size: mib << 20,
                seed: 7000 + i as u64 + 100 * self.label.len() as u64,
            });
        }
        ImageSpec::new(layers)
    }
}

struct Settings {
    /// `cargo test`: the quick mode, output to stdout only.
    test: bool,
    quick: bool,
    images: Vec<ImageCase>,
    warm_nodes: usize,
    node_mbit: u64,
    origin_mbit: u64,
    proxy_mbit: u64,
    out: Option<PathBuf>,
    keep: bool,
    /// The routes to run (all by default; experiments may skip baselines).
    routes: Vec<Route>,
}

impl Settings {
    fn from_env(test: bool) -> Settings {
        let quick = test || std::env::var_os("DAMSELFLY_LAB_QUICK").is_some();
        let images_var = std::env::var("DAMSELFLY_LAB_IMAGES")
            .unwrap_or_else(|_| if quick { "small" } else { "article,large" }.into());
        let nodes_override = std::env::var("DAMSELFLY_LAB_NODES").ok().map(|v| {
            v.split(',')
                .map(|n| {
                    n.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| (1..=32).contains(&n))
                        .unwrap_or_else(|| panic!("DAMSELFLY_LAB_NODES: {n:?} is not 1..=32"))
                })
                .collect::<Vec<_>>()
        });
        let images = images_var
            .split(',')
            .map(|label| {
                let mut case = ImageCase::named(label.trim(), quick);
                if let Some(nodes) = &nodes_override {
                    case.nodes = nodes.clone();
                }
                case
            })
            .collect();
        let node_mbit = env_u64("DAMSELFLY_LAB_NODE_MBIT", 400);
        let out = (!test).then(|| match std::env::var_os("DAMSELFLY_LAB_OUT") {
            Some(dir) => PathBuf::from(dir),
            None => target_dir().join("damselfly-lab"),
        });
        Settings {
            test,
            quick,
            images,
            warm_nodes: env_u64("DAMSELFLY_LAB_WARM_NODES", if quick { 2 } else { 4 }).max(1)
                as usize,
            node_mbit,
            origin_mbit: env_u64("DAMSELFLY_LAB_ORIGIN_MBIT", 400),
            proxy_mbit: env_u64("DAMSELFLY_LAB_PROXY_MBIT", node_mbit),
            out,
            keep: std::env::var_os("DAMSELFLY_BENCH_KEEP").is_some(),
            routes: match std::env::var("DAMSELFLY_LAB_ROUTES") {
                Ok(v) => v
                    .split(',')
                    .map(|r| match r.trim() {
                        "direct" => Route::Direct,
                        "proxy" => Route::Proxy,
                        "damselfly" => Route::Damselfly,
                        other => panic!(
                            "DAMSELFLY_LAB_ROUTES: unknown route {other:?} (direct, proxy, damselfly)"
                        ),
                    })
                    .collect(),
                Err(_) => Route::ALL.to_vec(),
            },
        }
    }

    /// Seconds to move `bytes` over the tighter of a node's and the origin's
    /// link.
    fn ideal(&self, bytes: u64) -> f64 {
        bytes as f64 * 8.0 / (self.node_mbit.min(self.origin_mbit) as f64 * 1e6)
    }
}

/// Where cargo puts build output (the report goes under it by default).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

// ---------------------------------------------------------------------------
// Nodes' containerds.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    Proxy,
    Damselfly,
}

impl Route {
    const ALL: [Route; 3] = [Route::Direct, Route::Proxy, Route::Damselfly];

    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct from origin",
            Route::Proxy => "central cache",
            Route::Damselfly => "damselfly",
        }
    }
}

/// A node's containerd with the hosts.toml of one route.
struct Puller {
    ctrd: Containerd,
    hosts: PathBuf,
}

impl Puller {
    /// A fresh containerd (empty content store) in node namespace `index`,
    /// pulling the origin's images from `via` (`http://host:port`), or
    /// straight from the origin.
    fn start(lab: &Lab, index: usize, origin: &Origin, via: Option<&str>) -> Puller {
        let hosts = lab.dir.join(format!("hosts-g{}", lab.next_generation()));
        match via {
            Some(url) => write_hosts_toml(&hosts, &origin.host(), url),
            None => write_direct_hosts_toml(&hosts, &origin.host()),
        }
        .expect("hosts.toml");
        let ctrd = Containerd::start_in_netns(&lab.nodes[index].ns, &hosts)
            .unwrap_or_else(|e| panic!("containerd in node {}: {e:#}", index + 1));
        Puller { ctrd, hosts }
    }
}

impl Drop for Puller {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.hosts);
    }
}

/// Every puller fetches `image` at once (`ctr content fetch`, released
/// together); returns each one's seconds. Panics when a fetch fails or a
/// blob is missing from a content store afterwards.
fn pull_all(pullers: &[Puller], image: &PushedImage, timeout: Duration) -> Vec<f64> {
    let barrier = Arc::new(Barrier::new(pullers.len()));
    let times: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = pullers
            .iter()
            .map(|p| {
                let barrier = barrier.clone();
                scope.spawn(move || {
                    let hosts = p.hosts.to_string_lossy().into_owned();
                    let args = [
                        "content",
                        "fetch",
                        "--hosts-dir",
                        hosts.as_str(),
                        image.reference.as_str(),
                    ];
                    barrier.wait();
                    let start = Instant::now();
                    let out = p.ctrd.ctr_with_timeout(&args, timeout).expect("run ctr");
                    let secs = start.elapsed().as_secs_f64();
                    assert!(
                        out.success(),
                        "ctr content fetch {} failed after {secs:.1} s: {}{}\ncontainerd log:\n{}",
                        image.reference,
                        out.stdout,
                        out.stderr,
                        p.ctrd.log_tail(20)
                    );
                    secs
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    for p in pullers {
        let have = p.ctrd.content_digests().expect("ctr content ls");
        for digest in image.blob_digests() {
            assert!(
                have.contains(&digest),
                "{digest} missing from a node's containerd after its pull"
            );
        }
    }
    times
}

// ---------------------------------------------------------------------------
// Scenarios.
// ---------------------------------------------------------------------------

/// One route's pull by N nodes.
struct Run {
    route: Route,
    times: Vec<f64>,
    origin_bytes: u64,
    origin_gets: usize,
    /// damselfly only: bytes the daemons took from peers, by their own
    /// count, and their hedged piece requests.
    from_peers: Option<f64>,
    hedges: f64,
    /// Blob bytes the route's cache served to the containerds (the central
    /// cache's access log; the daemons' `bytes_served_total`). Less than
    /// N images means containerd fell back to the origin.
    served: Option<u64>,
    /// 1-minute load average before and after.
    load: (String, String),
}

impl Run {
    fn slowest(&self) -> f64 {
        max(self.times.iter().copied())
    }

    fn median(&self) -> f64 {
        median(self.times.clone())
    }
}

/// What the whole lab needs to run a scenario.
struct Ctx<'a> {
    s: &'a Settings,
    lab: &'a Lab,
    origin: &'a Origin,
    key: &'a Path,
}

impl Ctx<'_> {
    fn timeout(&self, image: &PushedImage, n: usize) -> Duration {
        // Ten times every node pulling alone through the origin link, and
        // a minute for a loaded machine.
        Duration::from_secs_f64(self.s.ideal(image.total_size) * 10.0 * n as f64 + 60.0)
    }

    /// Every puller pulls `image`; `cache` is the central cache they pull
    /// through, if any.
    fn measure(
        &self,
        route: Route,
        image: &PushedImage,
        pullers: &[Puller],
        cache: Option<&Origin>,
    ) -> Run {
        let digests = image.blob_digests();
        let digests: Vec<&str> = digests.iter().map(String::as_str).collect();
        let mark = self.origin.sync();
        let cache_mark = cache.map(Origin::sync);
        let before = loadavg();
        let times = pull_all(pullers, image, self.timeout(image, pullers.len()));
        let load = (before, loadavg());
        let (origin_bytes, origin_gets) = self.origin.blobs_bytes_since(mark, &digests);
        let served = cache
            .zip(cache_mark)
            .map(|(c, mark)| c.blobs_bytes_since(mark, &digests).0);
        Run {
            route,
            times,
            origin_bytes,
            origin_gets,
            from_peers: None,
            hedges: 0.0,
            served,
            load,
        }
    }

    fn direct(&self, image: &PushedImage, n: usize) -> Run {
        let pullers: Vec<Puller> = (0..n)
            .map(|i| Puller::start(self.lab, i, self.origin, None))
            .collect();
        self.measure(Route::Direct, image, &pullers, None)
    }

    /// A fresh central cache; N nodes pull through it cold, and with
    /// `warm`, N fresh nodes pull again through the same cache.
    fn proxy(&self, image: &PushedImage, n: usize, warm: bool) -> (Run, Option<Run>) {
        let proxy = Origin::start_proxy(self.lab, self.origin);
        let via = proxy.url();
        let cold = {
            let pullers: Vec<Puller> = (0..n)
                .map(|i| Puller::start(self.lab, i, self.origin, Some(&via)))
                .collect();
            self.measure(Route::Proxy, image, &pullers, Some(&proxy))
        };
        let warm = warm.then(|| {
            let pullers: Vec<Puller> = (0..n)
                .map(|i| Puller::start(self.lab, i, self.origin, Some(&via)))
                .collect();
            self.measure(Route::Proxy, image, &pullers, Some(&proxy))
        });
        (cold, warm)
    }

    /// Starts daemons in node namespaces `range`, each joining through the
    /// ones before it and `bootstrap`.
    fn daemons(
        &self,
        range: std::ops::Range<usize>,
        bootstrap: &[String],
        role: &str,
    ) -> Vec<Node> {
        let mut nodes: Vec<Node> = Vec::new();
        for i in range {
            let mut boot = bootstrap.to_vec();
            boot.extend(nodes.iter().map(Node::control_addr));
            nodes.push(Node::start_as(
                self.lab,
                i,
                &boot,
                self.origin,
                self.key,
                role,
            ));
        }
        nodes
    }

    fn damselfly_run(&self, image: &PushedImage, nodes: &[Node], first: usize) -> Run {
        let pullers: Vec<Puller> = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                Puller::start(self.lab, first + i, self.origin, Some(&node.mirror_base()))
            })
            .collect();
        let mut run = self.measure(Route::Damselfly, image, &pullers, None);
        let sum = |name: &str, labels: &[(&str, &str)]| {
            nodes
                .iter()
                .map(|d| d.metric(name, labels))
                .fold(0.0, |a, b| a + b)
        };
        run.from_peers = Some(sum("damselfly_fetched_bytes_total", &[("source", "peer")]));
        run.served = Some(sum("damselfly_bytes_served_total", &[]) as u64);
        run.hedges = sum("damselfly_hedges_total", &[]);
        check_logs(&nodes.iter().collect::<Vec<_>>());
        run
    }

    /// N fresh daemons, joined, then every node pulls.
    fn damselfly(&self, image: &PushedImage, n: usize) -> Run {
        let nodes = self.daemons(0..n, &[], "node");
        if n > 1 {
            wait_members(&nodes.iter().collect::<Vec<_>>(), n - 1);
        }
        self.damselfly_run(image, &nodes, 0)
    }

    /// A seed and `w` nodes pull; the `w` nodes go away; `w` fresh nodes
    /// pull. Returns the cold and the warm run.
    fn scale_to_zero(&self, image: &PushedImage, w: usize) -> (Run, Run) {
        let seed = self.daemons(0..1, &[], "seed").remove(0);
        let seed_addr = [seed.control_addr()];
        let cold = {
            let nodes = self.daemons(1..w + 1, &seed_addr, "node");
            let mut all: Vec<&Node> = nodes.iter().collect();
            all.push(&seed);
            wait_members(&all, w);
            let run = self.damselfly_run(image, &nodes, 1);
            // The seed follows every Want; wait until it holds the image
            // before the pool scales to zero.
            let deadline = Instant::now() + self.timeout(image, 1);
            while !image.blob_digests().iter().all(|d| seed.holds(d)) {
                assert!(
                    Instant::now() < deadline,
                    "the seed did not take the whole image:\n{}",
                    seed.log_tail(30)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            run
        };
        // Scaled to zero: the nodes and their containerds are gone.
        let nodes = self.daemons(1..w + 1, &seed_addr, "node");
        let mut all: Vec<&Node> = nodes.iter().collect();
        all.push(&seed);
        wait_members(&all, w);
        let warm = self.damselfly_run(image, &nodes, 1);
        (cold, warm)
    }
}

// ---------------------------------------------------------------------------
// The run.
// ---------------------------------------------------------------------------

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let s = Settings::from_env(!bench);
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the lab needs root (network namespaces, tc, containerd)"
    );
    let missing: Vec<&str> = [
        "ip",
        "tc",
        "docker-registry",
        "containerd",
        "ctr",
        "umoci",
        "skopeo",
    ]
    .into_iter()
    .filter(|tool| common::util::find_in_path(tool).is_none())
    .collect();
    assert!(
        missing.is_empty(),
        "the lab needs {missing:?} (see .ci/run)"
    );

    let max_n = s
        .images
        .iter()
        .flat_map(|i| {
            i.nodes
                .iter()
                .copied()
                .chain(i.warm.then_some(s.warm_nodes + 1))
        })
        .max()
        .unwrap_or(1);
    let lab = Lab::new(max_n, s.keep);
    eprintln!("lab: {} (bridge {})", lab.dir.display(), lab.bridge);
    let key = lab.cluster_key();
    let origin = Origin::start(&lab);
    let ctx = Ctx {
        s: &s,
        lab: &lab,
        origin: &origin,
        key: &key,
    };

    let mut results = Vec::new();
    for case in &s.images {
        let built = Instant::now();
        let layout = build_image(&case.spec()).expect("build image");
        let image = push_image(
            &layout,
            origin.url().as_str(),
            &format!("lab/{}", case.label),
            "v1",
            None,
        )
        .expect("push image");
        drop(layout);
        eprintln!(
            "image {}: {:.1} MB in {} layers, built and pushed in {:.1} s",
            case.label,
            image.total_size as f64 / 1e6,
            image.layers.len(),
            built.elapsed().as_secs_f64()
        );
        lab.shape(s.node_mbit, s.origin_mbit);
        Lab::shape_link(&lab.proxy, s.proxy_mbit);
        let mut result = ImageResult {
            label: case.label,
            size: image.total_size,
            layers: image.layers.len(),
            burst: Vec::new(),
            warm: None,
        };
        for &n in &case.nodes {
            let mut runs = Vec::new();
            for &route in &s.routes {
                let run = match route {
                    Route::Direct => ctx.direct(&image, n),
                    Route::Proxy => ctx.proxy(&image, n, false).0,
                    Route::Damselfly => ctx.damselfly(&image, n),
                };
                eprintln!(
                    "  N={n} {}: slowest {:.2} s, origin {:.3}x",
                    route.name(),
                    run.slowest(),
                    run.origin_bytes as f64 / image.total_size as f64
                );
                runs.push(run);
            }
            result.burst.push((n, runs));
        }
        if case.warm {
            let w = s.warm_nodes;
            let mut runs = Vec::new();
            for &route in &s.routes {
                let (cold, warm) = match route {
                    Route::Damselfly => ctx.scale_to_zero(&image, w),
                    Route::Proxy => {
                        let (cold, warm) = ctx.proxy(&image, w, true);
                        (cold, warm.expect("warm run"))
                    }
                    Route::Direct => (ctx.direct(&image, w), ctx.direct(&image, w)),
                };
                eprintln!(
                    "  scale-to-zero, {w} nodes, {}: cold {:.2} s, warm {:.2} s, warm origin {:.3}x",
                    route.name(),
                    cold.slowest(),
                    warm.slowest(),
                    warm.origin_bytes as f64 / image.total_size as f64
                );
                runs.push((cold, warm));
            }
            result.warm = Some((w, runs));
        }
        lab.unshape();
        results.push(result);
    }

    let command = if s.test {
        "cargo test --bench lab".to_owned()
    } else if s.quick {
        "DAMSELFLY_LAB_QUICK=1 cargo bench --bench lab".to_owned()
    } else {
        "cargo bench --bench lab".to_owned()
    };
    let setup = format!(
        "Links (tc tbf on both ends of each veth): node {} Mbit/s, origin {} Mbit/s, central \
         cache {} Mbit/s. Pulls: `ctr content fetch` in each node's namespace, no unpack. \
         damselfly: one daemon per node ({} build), swarm defaults{}.",
        s.node_mbit,
        s.origin_mbit,
        s.proxy_mbit,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        if lab.swarm_extra.is_empty() {
            String::new()
        } else {
            format!(" plus `{}`", lab.swarm_extra.replace('\n', "; "))
        }
    );
    let text = report(&s, &results, &command, &setup);
    println!("{text}");
    if let Some(dir) = &s.out {
        std::fs::create_dir_all(dir).expect("output dir");
        std::fs::write(dir.join("report.md"), &text).expect("write report");
        for r in &results {
            let path = dir.join(format!("burst-{}.svg", r.label));
            match chart(&s, r, &path) {
                Ok(()) => eprintln!("chart: {}", path.display()),
                Err(e) => eprintln!("chart {}: {e}", path.display()),
            }
        }
        eprintln!("report: {}", dir.join("report.md").display());
    }

    let mut failures = Vec::new();
    for r in &results {
        check(r, &mut failures);
    }
    drop(origin);
    drop(lab);
    if !failures.is_empty() {
        eprintln!("lab checks FAILED:");
        for f in &failures {
            eprintln!("  {f}");
        }
        std::process::exit(1);
    }
    eprintln!("lab checks passed: every scenario completed, origin bytes as expected");
}
