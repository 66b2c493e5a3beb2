//! The network lab that the multi-node benches share: network namespaces
//! joined by veth pairs to one bridge, `tc tbf` shaping, `docker-registry`
//! (origin or pull-through cache) and damselfly daemons inside namespaces.
//!
//! Everything it makes (processes, namespaces, veths, the bridge) is removed
//! on drop, also when a bench panics; names start with `dfb` and the bench's
//! pid. Children die with the bench (`PR_SET_PDEATHSIG`); after a kill, the
//! next run removes the namespaces and bridge left behind.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::daemon::{
    command, is_up, multiaddr, parse_samples, scrape, store_blob_path, write_cluster_key,
    DaemonConfig, SwarmOptions,
};
use crate::members::{swarm_members, Members, SwarmMember};
use crate::process::{Proc, Spawn};
use crate::{http_get, parse_access_log_line};

pub const MIB: u64 = 1 << 20;
pub const GIB: f64 = (1u64 << 30) as f64;
/// The origin registry's port inside its namespace.
pub const ORIGIN_PORT: u16 = 5000;
/// How long a cluster may take to see all its members.
pub const JOIN: Duration = Duration::from_secs(60);

pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Runs a command to completion; panics with its output when it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", args.join(" ")));
    if !out.status.success() {
        panic!(
            "{} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Like [`sh`], but only reports a failure (for clean-up).
pub fn sh_quiet(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn sh_output(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The lab: namespaces, veths, a bridge, and the shaping.
// ---------------------------------------------------------------------------

/// One namespace and its veth pair: `host` in the root namespace (on the
/// bridge), `eth0` inside.
pub struct Link {
    pub ns: String,
    pub host: String,
    pub ip: String,
}

/// The network lab. Dropping it kills whatever still runs in its
/// namespaces, then removes the namespaces (which removes the veths) and
/// the bridge.
pub struct Lab {
    pub bridge: String,
    pub origin: Link,
    /// A spare namespace for one more server, such as a central
    /// pull-through cache.
    pub proxy: Link,
    pub nodes: Vec<Link>,
    pub dir: PathBuf,
    pub keep: bool,
    /// Extra lines for every daemon's `[swarm]` section.
    pub swarm_extra: String,
    /// Daemon generations, so that no daemon binds a port its predecessor in
    /// the same namespace just left in TIME_WAIT.
    pub generation: AtomicU16,
}

impl Lab {
    /// Removes namespaces and bridges that an earlier run of this bench left
    /// behind (its process is gone).
    pub fn clean_stale() {
        let alive = |name: &str| {
            let digits: String = name
                .trim_start_matches("dfb")
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            digits
                .parse::<u32>()
                .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
        };
        for line in sh_output(&["ip", "netns", "list"]).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with("dfb") && !alive(name) {
                kill_ns_pids(name);
                sh_quiet(&["ip", "netns", "del", name]);
                eprintln!("removed stale namespace {name}");
            }
        }
        for line in sh_output(&["ip", "-o", "link", "show", "type", "bridge"]).lines() {
            let name = line.split(':').nth(1).unwrap_or("").trim();
            if name.starts_with("dfb") && !alive(name) {
                sh_quiet(&["ip", "link", "del", name]);
                eprintln!("removed stale bridge {name}");
            }
        }
    }

    pub fn new(nodes: usize, keep: bool) -> Lab {
        Lab::clean_stale();
        let pid = std::process::id();
        let tag = format!("dfb{pid}");
        // A /24 of 10.213/16 chosen by pid, unlikely to meet another run.
        let net = format!("10.213.{}", 10 + pid % 200);
        let dir = std::env::temp_dir().join(format!("{tag}-lab"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("lab dir");
        let lab = Lab {
            bridge: format!("{tag}br"),
            origin: Link {
                ns: format!("{tag}-o"),
                host: format!("{tag}o"),
                ip: format!("{net}.2"),
            },
            proxy: Link {
                ns: format!("{tag}-p"),
                host: format!("{tag}p"),
                ip: format!("{net}.3"),
            },
            nodes: (1..=nodes)
                .map(|i| Link {
                    ns: format!("{tag}-n{i}"),
                    host: format!("{tag}n{i}"),
                    ip: format!("{net}.{}", 10 + i),
                })
                .collect(),
            dir,
            keep,
            swarm_extra: std::env::var("DAMSELFLY_BENCH_SWARM").unwrap_or_default(),
            generation: AtomicU16::new(0),
        };
        // From here on, Drop cleans up whatever was made.
        sh(&["ip", "link", "add", &lab.bridge, "type", "bridge"]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{net}.1/24"),
            "dev",
            &lab.bridge,
        ]);
        sh(&["ip", "link", "set", &lab.bridge, "up"]);
        let links: Vec<&Link> = lab.links().collect();
        for l in links {
            sh(&["ip", "netns", "add", &l.ns]);
            sh(&[
                "ip", "link", "add", &l.host, "type", "veth", "peer", "name", "eth0", "netns",
                &l.ns,
            ]);
            sh(&["ip", "link", "set", &l.host, "master", &lab.bridge, "up"]);
            sh(&[
                "ip",
                "-n",
                &l.ns,
                "addr",
                "add",
                &format!("{}/24", l.ip),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &l.ns, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &l.ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    pub fn links(&self) -> impl Iterator<Item = &Link> {
        [&self.origin, &self.proxy].into_iter().chain(&self.nodes)
    }

    /// Caps both directions of `link` at `mbit` with tbf on each end.
    pub fn shape_link(link: &Link, mbit: u64) {
        let rate = format!("{mbit}mbit");
        // The bucket must hold more than one (GSO) packet and cover a timer
        // tick (HZ 250: 4 ms) at the rate; never below 256 KiB.
        let burst = format!("{}", (mbit * 1_000_000 / 8 / 250).max(256 << 10));
        // How long a packet may wait in the bucket's queue: what a full
        // queue adds to every hop's round trip.
        let queue_ms: u64 = match std::env::var("DAMSELFLY_LAB_QUEUE_MS") {
            Ok(v) => v.trim().parse().unwrap_or_else(|_| {
                panic!("DAMSELFLY_LAB_QUEUE_MS={v:?}: want whole milliseconds, e.g. 50")
            }),
            Err(_) => 50,
        };
        let latency = format!("{queue_ms}ms");
        let tbf = [
            "root", "tbf", "rate", &rate, "burst", &burst, "latency", &latency,
        ];
        let mut outer = vec!["tc", "qdisc", "replace", "dev", &link.host];
        outer.extend(tbf);
        sh(&outer);
        let mut inner = vec![
            "ip", "netns", "exec", &link.ns, "tc", "qdisc", "replace", "dev", "eth0",
        ];
        inner.extend(tbf);
        sh(&inner);
    }

    pub fn shape(&self, node_mbit: u64, origin_mbit: u64) {
        Lab::shape_link(&self.origin, origin_mbit);
        for l in &self.nodes {
            Lab::shape_link(l, node_mbit);
        }
    }

    pub fn unshape(&self) {
        for l in self.links() {
            sh_quiet(&["tc", "qdisc", "del", "dev", &l.host, "root"]);
            sh_quiet(&[
                "ip", "netns", "exec", &l.ns, "tc", "qdisc", "del", "dev", "eth0", "root",
            ]);
        }
    }

    /// Writes a fresh cluster key ([`write_cluster_key`]) into the lab's
    /// dir and returns its path, for every daemon's `swarm.cluster_key_file`.
    pub fn cluster_key(&self) -> PathBuf {
        let key = self.dir.join("cluster.key");
        write_cluster_key(&key);
        key
    }

    pub fn next_generation(&self) -> u16 {
        self.generation.fetch_add(1, Ordering::Relaxed)
    }
}

/// Kills (SIGKILL) every process in namespace `ns`: only processes this
/// bench started live there.
pub fn kill_ns_pids(ns: &str) {
    for pid in sh_output(&["ip", "netns", "pids", ns]).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            // SAFETY: kill(2) on a pid we read from our own namespace.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for l in self.links() {
            kill_ns_pids(&l.ns);
        }
        std::thread::sleep(Duration::from_millis(200));
        for l in self.links() {
            sh_quiet(&["ip", "netns", "del", &l.ns]);
        }
        sh_quiet(&["ip", "link", "del", &self.bridge]);
        // The kernel removes a deleted namespace's veths asynchronously.
        let deadline = Instant::now() + Duration::from_secs(10);
        let prefix = self.bridge.trim_end_matches("br").to_owned();
        while Instant::now() < deadline
            && sh_output(&["ip", "-o", "link", "show"]).contains(&prefix)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_dir_all(self.dir.join("origin/storage"));
        if self.keep {
            eprintln!("kept {} (configs and logs)", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter_ns(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).expect("open namespace");
    // SAFETY: setns(2) on a namespace fd; affects this thread only.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// CPU seconds (user + system) of a process so far.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

// ---------------------------------------------------------------------------
// The origin registry.
// ---------------------------------------------------------------------------

/// A `docker-registry` in a namespace of the lab: the origin, or a
/// pull-through cache of it.
pub struct Origin {
    pub proc: Proc,
    pub ip: String,
    pub access_log: PathBuf,
    pub syncs: AtomicU64,
    /// A pull-through cache's storage, removed on drop.
    pub scratch: Option<PathBuf>,
}

impl Origin {
    /// The origin registry, in the lab's origin namespace.
    pub fn start(lab: &Lab) -> Origin {
        Origin::start_in(&lab.origin, &lab.dir.join("origin"), None)
    }

    /// A central pull-through cache of `upstream` (`proxy.remoteurl`, the
    /// "ECR pull-through cache" alternative), empty, in the lab's proxy
    /// namespace.
    pub fn start_proxy(lab: &Lab, upstream: &Origin) -> Origin {
        let dir = lab.dir.join(format!("proxy-g{}", lab.next_generation()));
        let mut proxy = Origin::start_in(&lab.proxy, &dir, Some(&upstream.url()));
        proxy.scratch = Some(dir.join("storage"));
        proxy
    }

    fn start_in(link: &Link, dir: &Path, proxy_of: Option<&str>) -> Origin {
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).expect("registry dir");
        let ip = link.ip.clone();
        let config = dir.join("config.yml");
        let proxy = proxy_of.map_or(String::new(), |url| format!("proxy:\n  remoteurl: {url}\n"));
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  formatter: text\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: {ip}:{ORIGIN_PORT}\n  secret: {}\n{proxy}",
                storage.display(),
                hex::encode(rand::random::<[u8; 16]>())
            ),
        )
        .expect("registry config");
        let access_log = dir.join("access.log");
        let error_log = dir.join("registry.log");
        // stdout is the access log; stderr goes to its own file.
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        let spawn = Spawn {
            stderr: Some(error_log.clone()),
            ..Spawn::new("docker-registry", &access_log).in_netns(&link.ns)
        };
        let mut proc = Proc::spawn(cmd, &spawn).expect("spawn docker-registry");
        {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok((200, _)) = http_get(&format!("{ip}:{ORIGIN_PORT}"), "/v2/?dfb=probe") {
                    break;
                }
                if let Some(status) = proc.exited() {
                    panic!(
                        "docker-registry exited ({status}):\n{}",
                        std::fs::read_to_string(&error_log).unwrap_or_default()
                    );
                }
                assert!(Instant::now() < deadline, "docker-registry not up in 20 s");
                std::thread::sleep(Duration::from_millis(50));
            }
            Origin {
                proc,
                ip,
                access_log,
                syncs: AtomicU64::new(0),
                scratch: None,
            }
        }
    }

    pub fn host(&self) -> String {
        format!("{}:{ORIGIN_PORT}", self.ip)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    pub fn blob_url(&self, repo: &str, digest: &str) -> String {
        format!("{}/v2/{repo}/blobs/{digest}", self.url())
    }

    /// Waits until every request that finished before this call is in the
    /// access log (a marked request's line appears after theirs), and
    /// returns the log's length: a mark for [`Origin::blob_bytes_since`].
    pub fn sync(&self) -> u64 {
        let n = self.syncs.fetch_add(1, Ordering::Relaxed);
        let marker = format!("dfb=sync-{n}");
        let _ = http_get(&self.host(), &format!("/v2/?{marker}"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
            if text.contains(&marker) {
                std::thread::sleep(Duration::from_millis(20));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::metadata(&self.access_log).map_or(0, |m| m.len())
    }

    /// Body bytes of successful GETs of blob `digest` logged after `mark`,
    /// and how many such GETs.
    pub fn blob_bytes_since(&self, mark: u64, digest: &str) -> (u64, usize) {
        self.blobs_bytes_since(mark, &[digest])
    }

    /// Like [`Origin::blob_bytes_since`], for any of the blobs `digests`.
    pub fn blobs_bytes_since(&self, mark: u64, digests: &[&str]) -> (u64, usize) {
        self.sync();
        let bytes = std::fs::read(&self.access_log).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes[(mark as usize).min(bytes.len())..]).into_owned();
        let mut total = 0;
        let mut n = 0;
        for r in text.lines().filter_map(parse_access_log_line) {
            if r.is_blob_get()
                && r.digest().is_some_and(|d| digests.contains(&d))
                && (200..300).contains(&r.status)
            {
                total += r.bytes;
                n += 1;
            }
        }
        (total, n)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.proc.kill9();
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

// ---------------------------------------------------------------------------
// Daemons.
// ---------------------------------------------------------------------------

pub struct Node {
    pub proc: Proc,
    pub ns: String,
    pub ip: String,
    pub mirror: u16,
    pub telemetry: u16,
    pub control: u16,
    pub dir: PathBuf,
}

impl Node {
    /// Starts a fresh daemon (empty store, new identity) in node namespace
    /// `index` (0-based), joining through `bootstrap` (control multiaddrs).
    pub fn start(
        lab: &Lab,
        index: usize,
        bootstrap: &[String],
        origin: &Origin,
        key: &Path,
    ) -> Node {
        Node::start_as(lab, index, bootstrap, origin, key, "node")
    }

    /// Like [`Node::start`], with `[swarm] role` set (`node` or `seed`).
    pub fn start_as(
        lab: &Lab,
        index: usize,
        bootstrap: &[String],
        origin: &Origin,
        key: &Path,
        role: &str,
    ) -> Node {
        Node::start_with(lab, index, bootstrap, origin, key, role, "")
    }

    /// Like [`Node::start_as`], with `extra` sections after the generated
    /// ones (`[prewarm]`, `[gpu.assume]`, `[containerd]`).
    pub fn start_with(
        lab: &Lab,
        index: usize,
        bootstrap: &[String],
        origin: &Origin,
        key: &Path,
        role: &str,
        extra: &str,
    ) -> Node {
        let link = &lab.nodes[index];
        let generation = lab.next_generation();
        let [mirror, telemetry, control, _data] = node_ports(generation);
        let dir = lab.dir.join(format!("node{}-g{generation}", index + 1));
        std::fs::create_dir_all(&dir).expect("node dir");
        let ip = &link.ip;
        let config = dir.join("damselfly.toml");
        let swarm = SwarmOptions {
            bootstrap: bootstrap.to_vec(),
            cluster_key_file: Some(key.to_path_buf()),
            role: Some(role.to_owned()),
            extra: lab.swarm_extra.clone(),
        };
        let sections = format!(
            "[[registry]]\nhost = \"{}\"\nendpoint = \"{}\"\n{extra}",
            origin.host(),
            origin.url()
        );
        node_config(link, &dir, generation, swarm, sections).write(&config);
        let log = dir.join("daemon.log");
        let spawn = Spawn::new("damselfly", &log).in_netns(&link.ns);
        let proc = Proc::spawn(command("daemon", &config), &spawn).expect("spawn damselfly");
        let mut node = Node {
            proc,
            ns: link.ns.clone(),
            ip: ip.clone(),
            mirror,
            telemetry,
            control,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if is_up(&node.telemetry_addr()) {
                break;
            }
            if let Some(status) = node.proc.exited() {
                panic!(
                    "damselfly in {} exited ({status}):\n{}",
                    node.ns,
                    node.log_tail(30)
                );
            }
            assert!(
                Instant::now() < deadline,
                "damselfly in {} not ready in 30 s:\n{}",
                node.ns,
                node.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        node
    }

    pub fn telemetry_addr(&self) -> String {
        format!("{}:{}", self.ip, self.telemetry)
    }

    /// `http://<ip>:<port>` of the registry mirror (for hosts.toml).
    pub fn mirror_base(&self) -> String {
        format!("http://{}:{}", self.ip, self.mirror)
    }

    /// Whether the daemon's store holds blob `digest` (committed).
    pub fn holds(&self, digest: &str) -> bool {
        store_blob_path(&self.dir.join("store"), digest).is_file()
    }

    pub fn control_addr(&self) -> String {
        multiaddr(SocketAddr::new(ns_ip(&self.ip), self.control))
    }

    pub fn mirror_url(&self, origin: &Origin, repo: &str, digest: &str) -> String {
        format!(
            "http://{}:{}/v2/{repo}/blobs/{digest}?ns={}",
            self.ip,
            self.mirror,
            origin.host()
        )
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The daemon's admin socket (a file: reachable from any namespace).
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("store/admin.sock")
    }

    /// Sum of every sample of metric `name` whose labels include all of
    /// `labels`, e.g. `&[("source", "peer")]` ([`parse_samples`]).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        parse_samples(&scrape(&self.telemetry_addr()), name, labels)
            .iter()
            .map(|(_, v)| v)
            .sum()
    }

    pub fn members(&self) -> usize {
        swarm_members(&self.telemetry_addr()) as usize
    }

    pub fn cpu(&self) -> f64 {
        cpu_secs(self.proc.pid())
    }
}

impl SwarmMember for Node {
    fn name(&self) -> String {
        self.ns.clone()
    }

    fn telemetry(&self) -> String {
        self.telemetry_addr()
    }

    fn report(&self) -> String {
        format!("--- {} ---\n{}", self.ns, self.log_tail(20))
    }
}

/// A namespace address (`Link::ip`) as an [`IpAddr`].
fn ns_ip(ip: &str) -> IpAddr {
    ip.parse()
        .unwrap_or_else(|_| panic!("{ip:?} is not an IP address"))
}

/// The mirror, telemetry, control and data ports of daemon generation
/// `generation`: fixed, since no other program binds in the namespace, and
/// new per generation, so that no daemon binds a port its predecessor left
/// in TIME_WAIT.
fn node_ports(generation: u16) -> [u16; 4] {
    let base = 20000 + generation * 10;
    [base + 1, base + 2, base + 3, base + 4]
}

/// The config of daemon generation `generation` in `link`'s namespace, with
/// its store in `dir`, `swarm` on its control and data ports and `extra`
/// after the generated sections: the writer [`crate::daemon::Daemon`]
/// uses, with the bench's own settings (`DAMSELFLY_BENCH_LOG`, a 64 GiB
/// store).
fn node_config(
    link: &Link,
    dir: &Path,
    generation: u16,
    swarm: SwarmOptions,
    extra: String,
) -> DaemonConfig {
    let ip = ns_ip(&link.ip);
    let [mirror, telemetry, control, data] = node_ports(generation);
    DaemonConfig {
        mirror: SocketAddr::new(ip, mirror),
        telemetry: SocketAddr::new(ip, telemetry),
        store_dir: dir.join("store"),
        drain_timeout: "1s".into(),
        log_level: std::env::var("DAMSELFLY_BENCH_LOG").unwrap_or_else(|_| "info".into()),
        mirror_extra: String::new(),
        store_extra: "max_size = \"64GiB\"".into(),
        extra,
        swarm: Some((
            SocketAddr::new(ip, control),
            SocketAddr::new(ip, data),
            swarm,
        )),
        sidecar: None,
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.proc.kill9();
        // Blobs go even with DAMSELFLY_BENCH_KEEP: nine stores of a 1 GiB
        // blob per scenario would fill the disk.
        let _ = std::fs::remove_dir_all(self.dir.join("store"));
    }
}

/// Waits (at most [`JOIN`]) until every node sees at least `expect` other
/// members ([`crate::members::wait_members`]); panics with each node's
/// count and log tail.
pub fn wait_members(nodes: &[&Node], expect: usize) -> Duration {
    crate::members::wait_members(nodes, Members::AtLeast(expect), JOIN)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The 1-minute load average: other work on the machine shows here.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_owned()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn max(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().fold(0.0, f64::max)
}

// ---------------------------------------------------------------------------

/// Prints the daemons' warnings and errors, which a figure alone would hide.
pub fn check_logs(nodes: &[&Node]) {
    for n in nodes {
        let bad: Vec<String> = n
            .log()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(str::to_owned)
            .collect();
        if !bad.is_empty() {
            eprintln!(
                "  {} logged {} warnings/errors, last: {}",
                n.ns,
                bad.len(),
                bad.last().map_or("", |s| s.as_str())
            );
        }
    }
}

pub fn machine() -> String {
    format!(
        "{} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c
                .lines()
                .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned)))
            .unwrap_or_default()
    )
}
