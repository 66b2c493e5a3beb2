//! A damselfly swarm on one machine: N nodes, each a real daemon bound to
//! its own loopback address (node `i` on 127.0.0.(2+i)) with its own real
//! containerd whose hosts.toml points at that node's mirror, one shared
//! cluster key, and node 0 as everyone's bootstrap peer unless a
//! [`NodeSpec`] says otherwise.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::daemon::{write_cluster_key, Daemon, Options, SwarmOptions};
use crate::members::{swarm_members, wait_members, Members, SwarmMember};
use crate::{
    push_raw_image, write_hosts_toml, BlobSource, CmdOutput, Containerd, OriginRequest,
    PushedImage, Registry, RegistryAuth, TestDir,
};

/// The loopback address of node `index`: 127.0.0.(2+index).
pub fn node_ip(index: usize) -> Ipv4Addr {
    assert!(index < 250, "node index {index} out of loopback range");
    Ipv4Addr::new(127, 0, 0, 2 + index as u8)
}

/// Which key a node's `[swarm]` gets.
#[derive(Debug, Clone, Default)]
pub enum Key {
    /// The cluster's shared key file.
    #[default]
    Cluster,
    /// Another key file (a stranger's key).
    File(PathBuf),
    /// No `cluster_key_file` line (add `insecure_no_cluster_key = true` to
    /// [`NodeSpec::extra`] for a node that should start anyway).
    None,
}

/// How to configure one node.
#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    /// `role`: `Some("seed")` for a seed; `None` leaves the default.
    pub role: Option<String>,
    /// More lines inside `[swarm]` (`upload_limit = "50MiB"`).
    pub extra: String,
    /// The key file.
    pub key: Key,
    /// `bootstrap`; `None`: node 0's address (none for node 0 itself).
    pub bootstrap: Option<Vec<String>>,
    /// Lines inside `[store]` (`verify_reads = false`).
    pub store: String,
    /// More config after the `[[registry]]` table (`[prewarm]`,
    /// `[gpu.assume]`, ...). `{containerd_socket}` is replaced with the
    /// node's containerd socket.
    pub config: String,
    /// Start containerd before the daemon and let the daemon write its
    /// hosts.toml (`[containerd] configure_hosts`), as a DaemonSet does;
    /// otherwise the test writes it after the daemon is up.
    pub wire_containerd: bool,
}

impl NodeSpec {
    /// A node with role `seed`.
    pub fn seed() -> NodeSpec {
        NodeSpec {
            role: Some("seed".into()),
            ..NodeSpec::default()
        }
    }

    /// A default node with these extra `[swarm]` lines.
    pub fn with_extra(extra: &str) -> NodeSpec {
        NodeSpec {
            extra: extra.into(),
            ..NodeSpec::default()
        }
    }
}

/// One node: a daemon on its own loopback address and a containerd that
/// pulls through it.
pub struct Node {
    pub index: usize,
    pub daemon: Daemon,
    pub containerd: Containerd,
    hosts: TestDir,
}

impl Node {
    /// Starts node `index` for `origin` (daemon and containerd).
    pub fn start(index: usize, origin: &Registry, swarm: SwarmOptions) -> Node {
        Node::start_spec(index, origin, swarm, &NodeSpec::default())
    }

    /// [`Node::start`] with the daemon config and containerd wiring of
    /// `spec` (its swarm fields are already in `swarm`).
    pub fn start_spec(
        index: usize,
        origin: &Registry,
        swarm: SwarmOptions,
        spec: &NodeSpec,
    ) -> Node {
        let ip = node_ip(index);
        let hosts = TestDir::new("hosts").expect("hosts dir");
        let early = spec
            .wire_containerd
            .then(|| Containerd::start_with_hosts_dir(hosts.path()).expect("containerd"));
        let mut extra = format!(
            "[[registry]]\nhost = \"{}\"\nendpoint = \"{}\"\n",
            origin.host(),
            origin.url()
        );
        if let Some(c) = &early {
            extra.push_str(&format!(
                "[containerd]\nconfigure_hosts = true\nconfig = \"{}\"\n",
                c.config_path().display()
            ));
        }
        let socket = early
            .as_ref()
            .map(|c| c.socket().display().to_string())
            .unwrap_or_default();
        extra.push_str(&spec.config.replace("{containerd_socket}", &socket));
        let daemon = Daemon::start_with(Options {
            ip: Some(ip),
            swarm: Some(swarm),
            store: spec.store.clone(),
            extra,
            ..Options::default()
        });
        let containerd = match early {
            Some(c) => c,
            None => {
                write_hosts_toml(hosts.path(), &origin.host(), &daemon.url()).expect("hosts.toml");
                Containerd::start().expect("containerd")
            }
        };
        Node {
            index,
            daemon,
            containerd,
            hosts,
        }
    }

    /// `node 3 (127.0.0.5)`.
    pub fn name(&self) -> String {
        format!("node {} ({})", self.index, node_ip(self.index))
    }

    /// The hosts dir that routes this node's pulls through its daemon.
    pub fn hosts_dir(&self) -> &Path {
        self.hosts.path()
    }

    /// `ctr content fetch` of `img` through this node's daemon (every blob of
    /// the image into this node's containerd, no unpack), killed after
    /// `timeout`.
    pub fn fetch(&self, img: &PushedImage, timeout: Duration) -> anyhow::Result<CmdOutput> {
        let hosts = self.hosts.path().to_string_lossy().into_owned();
        self.containerd.ctr_with_timeout(
            &["content", "fetch", "--hosts-dir", &hosts, &img.reference],
            timeout,
        )
    }

    /// The digests of `img` (manifest, config, layers) that this node's
    /// containerd does not hold. containerd commits content only after
    /// checking its digest, so a digest it lists has the right bytes.
    pub fn missing_content(&self, img: &PushedImage) -> anyhow::Result<Vec<String>> {
        let have = self.containerd.content_digests()?;
        let mut want = vec![img.manifest_digest.clone()];
        want.extend(img.blob_digests());
        Ok(want.into_iter().filter(|d| !have.contains(d)).collect())
    }

    /// Fetches `img` and checks that every digest arrived; the error carries
    /// ctr's output and this node's daemon log tail.
    pub fn fetch_checked(&self, img: &PushedImage, timeout: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let out = self
            .fetch(img, timeout)
            .map_err(|e| format!("{}: ctr did not run: {e:#}", self.name()))?;
        let elapsed = started.elapsed();
        if !out.success() {
            return Err(format!(
                "{}: fetch of {} failed: {out:?}\n--- daemon log ---\n{}",
                self.name(),
                img.reference,
                self.daemon.log_tail(40)
            ));
        }
        match self.missing_content(img) {
            Ok(missing) if missing.is_empty() => Ok(elapsed),
            Ok(missing) => Err(format!(
                "{}: fetch of {} succeeded but containerd lacks {missing:?}\n--- daemon log ---\n{}",
                self.name(),
                img.reference,
                self.daemon.log_tail(40)
            )),
            Err(e) => Err(format!("{}: ctr content ls: {e:#}", self.name())),
        }
    }

    /// `damselfly_swarm_members`: live members other than itself.
    pub fn members(&self) -> f64 {
        swarm_members(&self.daemon.telemetry.to_string())
    }

    /// Whether the daemon process is still meant to be running.
    pub fn is_live(&self) -> bool {
        self.daemon.is_started()
    }

    /// Whether its store holds every blob (config and layers) of `img`.
    pub fn holds(&self, img: &PushedImage) -> bool {
        img.blob_digests()
            .iter()
            .all(|d| self.daemon.blob_path(d).is_file())
    }

    /// The name, the swarm metrics and the daemon's log tail, for messages.
    pub fn report(&self, lines: usize) -> String {
        let metrics: Vec<String> = self
            .daemon
            .metrics()
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && (l.contains("swarm")
                        || l.contains("peer")
                        || l.contains("fetched")
                        || l.contains("origin_bytes")
                        || l.contains("hedges")
                        || l.contains("distrusted"))
            })
            .map(str::to_string)
            .collect();
        format!(
            "=== {} ===\n{}\n--- daemon log ---\n{}",
            self.name(),
            metrics.join("\n"),
            self.daemon.log_tail(lines)
        )
    }
}

impl SwarmMember for Node {
    fn name(&self) -> String {
        Node::name(self)
    }

    fn telemetry(&self) -> String {
        self.daemon.telemetry.to_string()
    }

    fn report(&self) -> String {
        Node::report(self, 25)
    }
}

/// N nodes sharing one cluster key.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub key_file: PathBuf,
    origin_host: String,
    origin_url: String,
    // Last: the key file goes with it.
    dir: TestDir,
}

impl Cluster {
    /// `n` default nodes: node 0 first, then the others in parallel, all
    /// bootstrapped to node 0.
    pub fn start(origin: &Registry, n: usize) -> Cluster {
        Cluster::start_specs(origin, vec![NodeSpec::default(); n])
    }

    /// One node per spec, node 0 first, then the others in parallel.
    pub fn start_specs(origin: &Registry, specs: Vec<NodeSpec>) -> Cluster {
        let dir = TestDir::new("cluster").expect("cluster dir");
        let key_file = dir.join("cluster.key");
        write_cluster_key(&key_file);
        let mut cluster = Cluster {
            nodes: Vec::new(),
            key_file,
            origin_host: origin.host(),
            origin_url: origin.url(),
            dir,
        };
        let mut specs = specs.into_iter();
        if let Some(first) = specs.next() {
            let swarm = cluster.swarm_options(0, &first);
            cluster
                .nodes
                .push(Node::start_spec(0, origin, swarm, &first));
        }
        let rest: Vec<(usize, SwarmOptions, NodeSpec)> = specs
            .enumerate()
            .map(|(i, spec)| (i + 1, cluster.swarm_options(i + 1, &spec), spec))
            .collect();
        let started: Vec<Node> = std::thread::scope(|scope| {
            let handles: Vec<_> = rest
                .into_iter()
                .map(|(index, swarm, spec)| {
                    scope.spawn(move || Node::start_spec(index, origin, swarm, &spec))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        cluster.nodes.extend(started);
        cluster
    }

    /// Starts one more node (the next index) and returns it.
    pub fn add(&mut self, origin: &Registry, spec: NodeSpec) -> &Node {
        let index = self.nodes.len();
        let swarm = self.swarm_options(index, &spec);
        self.nodes
            .push(Node::start_spec(index, origin, swarm, &spec));
        self.nodes.last().expect("just pushed")
    }

    /// The `[swarm]` options for node `index` of this cluster.
    pub fn swarm_options(&self, index: usize, spec: &NodeSpec) -> SwarmOptions {
        let bootstrap = match &spec.bootstrap {
            Some(list) => list.clone(),
            None if index == 0 => Vec::new(),
            None => vec![self.nodes[0].daemon.swarm_multiaddr()],
        };
        SwarmOptions {
            bootstrap,
            cluster_key_file: match &spec.key {
                Key::Cluster => Some(self.key_file.clone()),
                Key::File(path) => Some(path.clone()),
                Key::None => None,
            },
            role: spec.role.clone(),
            // The defaults (300ms, 1s) are for real nodes. Here 8 debug
            // daemons, 8 containerds and the origin share 2 cores while
            // they hash and encrypt GiBs: a live peer can take seconds to
            // answer, and hedging to the origin would only measure that.
            extra: format!(
                "hedge_after = \"1s\"\nstall_timeout = \"5s\"\n{}",
                spec.extra
            ),
        }
    }

    /// A fresh key file in the cluster's dir that is not the cluster key.
    pub fn stranger_key(&self, name: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.key"));
        write_cluster_key(&path);
        path
    }

    /// The nodes whose daemons are still running.
    pub fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.is_live())
    }

    /// Waits until every live node's `damselfly_swarm_members` is `n` (the
    /// number of *other* members each should see). The error gives each
    /// node's count and log tail.
    pub fn wait_members(&self, n: usize, timeout: Duration) -> Result<(), String> {
        let nodes: Vec<&Node> = self.live().collect();
        wait_members_of(&nodes, n, timeout)
    }

    /// `Ok` when every pull in `results` succeeded; otherwise how many
    /// failed, their errors and every live node's report, under `what`.
    pub fn all_ok(&self, what: &str, results: &[Result<Duration, String>]) -> Result<(), String> {
        let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        if failures.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{what}: {} of {} pulls failed:\n{}\n\n{}",
            failures.len(),
            results.len(),
            failures
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n\n"),
            self.report(30)
        ))
    }

    /// Every live node's report, for failure messages.
    pub fn report(&self, lines: usize) -> String {
        self.live()
            .map(|n| n.report(lines))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The origin this cluster mirrors (`127.0.0.1:PORT`, `http://...`).
    pub fn origin(&self) -> (&str, &str) {
        (&self.origin_host, &self.origin_url)
    }
}

/// Waits until each of `nodes` reports `damselfly_swarm_members == n`
/// ([`wait_members`]).
pub fn wait_members_of(nodes: &[&Node], n: usize, timeout: Duration) -> Result<(), String> {
    wait_members(nodes, Members::Exactly(n), timeout).map(drop)
}

/// Fetches `img` on every node in `nodes` at once; returns each node's
/// result (time taken, or the error with its daemon's log tail).
pub fn fetch_all(
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

/// What the tests of one swarm test binary share: one origin registry
/// (started on first use) and a lock that the heavy tests take, so that no
/// two clusters compete for the cores. Kept in a `static` of the test
/// file, so each test binary has its own.
pub struct Suite {
    origin: OnceLock<Registry>,
    heavy: Mutex<()>,
}

impl Default for Suite {
    fn default() -> Suite {
        Suite::new()
    }
}

impl Suite {
    pub const fn new() -> Suite {
        Suite {
            origin: OnceLock::new(),
            heavy: Mutex::new(()),
        }
    }

    /// The origin, with no auth (checks the lab's tools first).
    pub fn origin(&self) -> &Registry {
        self.origin.get_or_init(|| {
            crate::require_tools();
            Registry::start(RegistryAuth::None).expect("registry")
        })
    }

    /// Heavy tests run one at a time (each runs a cluster of real daemons
    /// and containerds); a failed test's poison is ignored.
    pub fn heavy(&self) -> MutexGuard<'_, ()> {
        self.heavy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pushes (once per process) an image of raw random layers `(seed,
    /// size)` to `repo:v1` of the origin.
    pub fn image<'a>(
        &'a self,
        slot: &'a OnceLock<PushedImage>,
        repo: &str,
        layers: &[(u64, u64)],
    ) -> &'a PushedImage {
        slot.get_or_init(|| {
            let layers: Vec<BlobSource> = layers
                .iter()
                .map(|(seed, size)| BlobSource::random(*seed, *size))
                .collect();
            push_raw_image(self.origin(), repo, "v1", &layers).expect("push image")
        })
    }

    /// Body bytes of successful blob GETs of `img`'s repository at the
    /// origin after `mark` (whole blobs and ranges; manifests are not
    /// counted).
    pub fn origin_blob_bytes_since(&self, img: &PushedImage, mark: usize) -> u64 {
        self.origin().blob_bytes_sent_in_repo_since(&img.repo, mark)
    }

    /// Blob requests of `img`'s repository after `mark` that did not come
    /// from a damselfly daemon: containerd gave up on its mirror and went
    /// to the origin itself (a mirror failure that a pull's success would
    /// hide).
    pub fn bypassed_blob_requests(&self, img: &PushedImage, mark: usize) -> Vec<OriginRequest> {
        self.origin()
            .requests_in_repo(&img.repo, mark)
            .into_iter()
            .filter(|r| r.is_blob() && !r.user_agent.starts_with("damselfly/"))
            .collect()
    }
}
