//! Swarm benchmarks, each against a baseline measured in the same run:
//!
//! 1. **The burst**: N nodes (2, 4, 8), cold, all pulling one blob at once
//!    through their own daemon, against the same N clients pulling straight
//!    from the origin registry. Reported: origin bytes over the blob size
//!    (goal: at most 1.05x), the slowest node's completion time against the
//!    ideal `blob / min(origin link, node link)` (goal: within 1.25x), and
//!    the time to first body byte; then a warm peer hit: one more fresh node
//!    pulls the blob that the cluster now holds (goal: TTFB under 50 ms).
//! 2. **One peer**: node B pulls a blob (1 GiB) through its mirror from node
//!    A, which holds it, against a plain GET of the same blob from
//!    `docker-registry` on the same machine (goal: at least 0.8x), with the
//!    CPU seconds per GiB of A and B (goal: about 1 or less).
//!
//! ```text
//! cargo bench --bench swarm                            # 1 GiB burst blob
//! DAMSELFLY_BENCH_QUICK=1 cargo bench --bench swarm    # 256 MiB burst blob
//! ```
//!
//! It needs root, `ip`, `tc` and `docker-registry`. Every node is a real
//! daemon (the release binary) in a network namespace of its own, and the
//! origin `docker-registry` in another; each namespace has one veth pair to a
//! bridge in the root namespace. For the burst, `tc tbf` on both ends of
//! every pair caps each node's (and the origin's) upload and download. The
//! client of a node runs in that node's namespace (a thread that entered it
//! with `setns`), so client-to-daemon traffic stays on the namespace's own
//! address and is not shaped. Origin bytes are counted from the registry's
//! own access log. Everything (processes, namespaces, veths, the bridge) is
//! removed on exit, also when the bench panics; names start with `dfb` and
//! the bench's pid. Children die with the bench (`PR_SET_PDEATHSIG`); after
//! a kill, the next run removes the namespaces and bridge left behind.
//!
//! Settings (environment): `DAMSELFLY_BENCH_BLOB_MIB` (burst blob),
//! `DAMSELFLY_BENCH_PEER_MIB` (one-peer blob, default 1024),
//! `DAMSELFLY_BENCH_NODES` (`2,4,8`), `DAMSELFLY_BENCH_NODE_MBIT` and
//! `DAMSELFLY_BENCH_ORIGIN_MBIT` (400 each), `DAMSELFLY_BENCH_PEER_RUNS` (3),
//! `DAMSELFLY_BENCH_ONLY` (`burst` or `peer`), `DAMSELFLY_BENCH_SWARM`
//! (extra lines for every daemon's `[swarm]` section, e.g.
//! `hedge_after = "2s"`), `DAMSELFLY_BENCH_KEEP=1` (keep configs and logs, and
//! print where; blobs are always removed).
//!
//! In the one-peer scenario the holder A pulls the blob with a helper node in
//! the cluster, which then leaves. One extra run has A pull while it is
//! alone (the sequential download path), and reports on its own row where a
//! latecomer then takes the blob from: before `e2f06a6` that path did not
//! announce the blob, and the latecomer took about half from the origin.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{parse_access_log_line, push_blob, BlobSource};
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// The origin registry's port inside its namespace.
const ORIGIN_PORT: u16 = 5000;
/// How long a cluster may take to see all its members.
const JOIN: Duration = Duration::from_secs(60);

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_damselfly"))
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Runs a command to completion; panics with its output when it fails.
fn sh(args: &[&str]) {
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
fn sh_quiet(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn sh_output(args: &[&str]) -> String {
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
struct Link {
    ns: String,
    host: String,
    ip: String,
}

/// The network lab. Dropping it kills whatever still runs in its
/// namespaces, then removes the namespaces (which removes the veths) and
/// the bridge.
struct Lab {
    bridge: String,
    origin: Link,
    nodes: Vec<Link>,
    dir: PathBuf,
    keep: bool,
    /// Extra lines for every daemon's `[swarm]` section.
    swarm_extra: String,
    /// Daemon generations, so that no daemon binds a port its predecessor in
    /// the same namespace just left in TIME_WAIT.
    generation: AtomicU16,
}

impl Lab {
    /// Removes namespaces and bridges that an earlier run of this bench left
    /// behind (its process is gone).
    fn clean_stale() {
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

    fn new(nodes: usize, keep: bool) -> Lab {
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
        let links: Vec<&Link> = std::iter::once(&lab.origin).chain(&lab.nodes).collect();
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

    fn links(&self) -> impl Iterator<Item = &Link> {
        std::iter::once(&self.origin).chain(&self.nodes)
    }

    /// Caps both directions of `link` at `mbit` with tbf on each end.
    fn shape_link(link: &Link, mbit: u64) {
        let rate = format!("{mbit}mbit");
        // The bucket must hold more than one (GSO) packet and cover a timer
        // tick (HZ 250: 4 ms) at the rate; never below 256 KiB.
        let burst = format!("{}", (mbit * 1_000_000 / 8 / 250).max(256 << 10));
        let tbf = [
            "root", "tbf", "rate", &rate, "burst", &burst, "latency", "50ms",
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

    fn shape(&self, node_mbit: u64, origin_mbit: u64) {
        Lab::shape_link(&self.origin, origin_mbit);
        for l in &self.nodes {
            Lab::shape_link(l, node_mbit);
        }
    }

    fn unshape(&self) {
        for l in self.links() {
            sh_quiet(&["tc", "qdisc", "del", "dev", &l.host, "root"]);
            sh_quiet(&[
                "ip", "netns", "exec", &l.ns, "tc", "qdisc", "del", "dev", "eth0", "root",
            ]);
        }
    }

    fn next_generation(&self) -> u16 {
        self.generation.fetch_add(1, Ordering::Relaxed)
    }
}

/// Kills (SIGKILL) every process in namespace `ns`: only processes this
/// bench started live there.
fn kill_ns_pids(ns: &str) {
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
fn enter_ns(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).expect("open namespace");
    // SAFETY: setns(2) on a namespace fd; affects this thread only.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// A child process in a namespace; killed on drop. It also dies with the
/// bench (PR_SET_PDEATHSIG; spawned from the main thread).
struct Proc {
    child: Option<Child>,
}

impl Proc {
    /// Starts `cmd` in namespace `ns`, its stdout into `stdout` and its
    /// stderr into `stderr` (the same file when equal).
    fn spawn(ns: &str, mut cmd: Command, stdout: &Path, stderr: &Path) -> Proc {
        let nsfile = File::open(format!("/run/netns/{ns}")).expect("open namespace");
        let fd = nsfile.as_raw_fd();
        let out = File::create(stdout).expect("log file");
        let err = if stderr == stdout {
            out.try_clone().expect("clone log")
        } else {
            File::create(stderr).expect("log file")
        };
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn");
        drop(nsfile);
        Proc { child: Some(child) }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CPU seconds (user + system) of a process so far.
fn cpu_secs(pid: u32) -> f64 {
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

// Plain HTTP/1.1 GETs go out from the calling thread's namespace.
use common::http_get;

// ---------------------------------------------------------------------------
// The origin registry.
// ---------------------------------------------------------------------------

struct Origin {
    _proc: Proc,
    ip: String,
    access_log: PathBuf,
    syncs: AtomicU64,
}

impl Origin {
    fn start(lab: &Lab) -> Origin {
        let dir = lab.dir.join("origin");
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).expect("origin dir");
        let ip = lab.origin.ip.clone();
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  formatter: text\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: {ip}:{ORIGIN_PORT}\n  secret: {}\n",
                storage.display(),
                hex::encode(rand::random::<[u8; 16]>())
            ),
        )
        .expect("origin config");
        let access_log = dir.join("access.log");
        let error_log = dir.join("registry.log");
        // stdout is the access log; stderr goes to its own file.
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        let mut proc = Proc::spawn(&lab.origin.ns, cmd, &access_log, &error_log);
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
                _proc: proc,
                ip,
                access_log,
                syncs: AtomicU64::new(0),
            }
        }
    }

    fn host(&self) -> String {
        format!("{}:{ORIGIN_PORT}", self.ip)
    }

    fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    fn blob_url(&self, repo: &str, digest: &str) -> String {
        format!("{}/v2/{repo}/blobs/{digest}", self.url())
    }

    /// Waits until every request that finished before this call is in the
    /// access log (a marked request's line appears after theirs), and
    /// returns the log's length: a mark for [`Origin::blob_bytes_since`].
    fn sync(&self) -> u64 {
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
    fn blob_bytes_since(&self, mark: u64, digest: &str) -> (u64, usize) {
        self.sync();
        let bytes = std::fs::read(&self.access_log).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes[(mark as usize).min(bytes.len())..]).into_owned();
        let mut total = 0;
        let mut n = 0;
        for r in text.lines().filter_map(parse_access_log_line) {
            if r.is_blob_get() && r.digest() == Some(digest) && (200..300).contains(&r.status) {
                total += r.bytes;
                n += 1;
            }
        }
        (total, n)
    }
}

// ---------------------------------------------------------------------------
// Daemons.
// ---------------------------------------------------------------------------

struct Node {
    proc: Proc,
    ns: String,
    ip: String,
    mirror: u16,
    telemetry: u16,
    control: u16,
    dir: PathBuf,
}

impl Node {
    /// Starts a fresh daemon (empty store, new identity) in node namespace
    /// `index` (0-based), joining through `bootstrap` (control multiaddrs).
    fn start(lab: &Lab, index: usize, bootstrap: &[String], origin: &Origin, key: &Path) -> Node {
        let link = &lab.nodes[index];
        let generation = lab.next_generation();
        let base = 20000 + generation * 10;
        let (mirror, telemetry, control, data) = (base + 1, base + 2, base + 3, base + 4);
        let dir = lab.dir.join(format!("node{}-g{generation}", index + 1));
        std::fs::create_dir_all(&dir).expect("node dir");
        let ip = &link.ip;
        let bootstrap: Vec<String> = bootstrap.iter().map(|b| format!("{b:?}")).collect();
        let config = dir.join("damselfly.toml");
        std::fs::write(
            &config,
            format!(
                "[mirror]\nlisten = \"{ip}:{mirror}\"\ndrain_timeout = \"1s\"\n\
                 [store]\ndir = \"{store}\"\nmax_size = \"64GiB\"\n\
                 [telemetry]\nlisten = \"{ip}:{telemetry}\"\nlog_level = \"info\"\n\
                 [swarm]\nenabled = true\nlisten = \"/ip4/{ip}/tcp/{control}\"\n\
                 data_listen = \"{ip}:{data}\"\nbootstrap = [{boot}]\n\
                 cluster_key_file = \"{key}\"\n{extra}\n\
                 [[registry]]\nhost = \"{host}\"\nendpoint = \"{url}\"\n",
                store = dir.join("store").display(),
                boot = bootstrap.join(", "),
                key = key.display(),
                extra = lab.swarm_extra,
                host = origin.host(),
                url = origin.url(),
            ),
        )
        .expect("node config");
        let mut cmd = Command::new(binary());
        cmd.env_remove("RUST_LOG")
            .arg("daemon")
            .arg("--config")
            .arg(&config);
        let log = dir.join("daemon.log");
        let proc = Proc::spawn(&link.ns, cmd, &log, &log);
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
            if let Ok((200, _)) = http_get(&node.telemetry_addr(), "/readyz") {
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

    fn telemetry_addr(&self) -> String {
        format!("{}:{}", self.ip, self.telemetry)
    }

    fn control_addr(&self) -> String {
        format!("/ip4/{}/tcp/{}", self.ip, self.control)
    }

    fn mirror_url(&self, origin: &Origin, repo: &str, digest: &str) -> String {
        format!(
            "http://{}:{}/v2/{repo}/blobs/{digest}?ns={}",
            self.ip,
            self.mirror,
            origin.host()
        )
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Sum of every sample of metric `name` whose labels contain all of
    /// `labels` (`key="value"` strings).
    fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = http_get(&self.telemetry_addr(), "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (sample, value) = l.rsplit_once(' ')?;
                let (n, rest) = sample.split_once('{').unwrap_or((sample, ""));
                (n == name && labels.iter().all(|want| rest.contains(want)))
                    .then(|| value.parse::<f64>().ok())?
            })
            .sum()
    }

    fn members(&self) -> usize {
        self.metric("damselfly_swarm_members", &[]) as usize
    }

    fn cpu(&self) -> f64 {
        cpu_secs(self.proc.pid())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.proc.kill();
        // Blobs go even with DAMSELFLY_BENCH_KEEP: nine stores of a 1 GiB
        // blob per scenario would fill the disk.
        let _ = std::fs::remove_dir_all(self.dir.join("store"));
    }
}

/// Waits until every node sees `expect` other members.
fn wait_members(nodes: &[&Node], expect: usize) -> Duration {
    let start = Instant::now();
    loop {
        let seen: Vec<usize> = nodes.iter().map(|n| n.members()).collect();
        if seen.iter().all(|&m| m >= expect) {
            return start.elapsed();
        }
        if start.elapsed() > JOIN {
            let logs: Vec<String> = nodes
                .iter()
                .map(|n| format!("--- {} ---\n{}", n.ns, n.log_tail(20)))
                .collect();
            panic!(
                "members after {JOIN:?}: {seen:?}, expected {expect} each\n{}",
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// The client.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Pull {
    /// From the request to the first body byte.
    ttfb: f64,
    /// From the request to the last body byte.
    secs: f64,
    bytes: u64,
}

impl Pull {
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / MIB as f64 / self.secs
    }
}

/// GETs `url`, counting (and with `verify`, hashing) the body; panics on a
/// bad status, a short body or a digest mismatch.
async fn pull(client: &reqwest::Client, url: &str, digest: &str, size: u64, verify: bool) -> Pull {
    let start = Instant::now();
    let resp = client.get(url).send().await.expect("request");
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    let mut body = resp.bytes_stream();
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut ttfb = None;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("{url}: body: {e}"));
        ttfb.get_or_insert_with(|| start.elapsed().as_secs_f64());
        bytes += chunk.len() as u64;
        if verify {
            hasher.update(&chunk);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(bytes, size, "{url}: short body");
    if verify {
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        assert_eq!(got, digest, "{url}: digest mismatch");
    }
    Pull {
        ttfb: ttfb.unwrap_or(secs),
        secs,
        bytes,
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .no_gzip()
        .tcp_nodelay(true)
        .build()
        .expect("client")
}

/// Runs one GET per `(namespace, url)`, each from a thread inside that
/// namespace, all released at once.
fn pull_all(targets: &[(String, String)], digest: &str, size: u64, verify: bool) -> Vec<Pull> {
    let barrier = Arc::new(Barrier::new(targets.len()));
    std::thread::scope(|scope| {
        let handles: Vec<_> = targets
            .iter()
            .map(|(ns, url)| {
                let barrier = barrier.clone();
                scope.spawn(move || {
                    enter_ns(ns);
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    let client = http_client();
                    barrier.wait();
                    rt.block_on(pull(&client, url, digest, size, verify))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

fn pull_one(ns: &str, url: &str, digest: &str, size: u64, verify: bool) -> Pull {
    pull_all(&[(ns.to_owned(), url.to_owned())], digest, size, verify)[0]
}

/// The 1-minute load average: other work on the machine shows here.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_owned()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn max(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().fold(0.0, f64::max)
}

// ---------------------------------------------------------------------------
// Scenarios.
// ---------------------------------------------------------------------------

struct Settings {
    quick: bool,
    blob: u64,
    peer_blob: u64,
    nodes: Vec<usize>,
    node_mbit: u64,
    origin_mbit: u64,
    peer_runs: usize,
    burst: bool,
    peer: bool,
    keep: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = std::env::var_os("DAMSELFLY_BENCH_QUICK").is_some();
        let nodes = std::env::var("DAMSELFLY_BENCH_NODES")
            .unwrap_or_else(|_| "2,4,8".into())
            .split(',')
            .map(|n| {
                n.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n >= 2)
                    .unwrap_or_else(|| panic!("DAMSELFLY_BENCH_NODES: {n:?} is not a count >= 2"))
            })
            .collect();
        let only = std::env::var("DAMSELFLY_BENCH_ONLY").unwrap_or_default();
        Settings {
            quick,
            blob: env_u64("DAMSELFLY_BENCH_BLOB_MIB", if quick { 256 } else { 1024 }) * MIB,
            peer_blob: env_u64("DAMSELFLY_BENCH_PEER_MIB", 1024) * MIB,
            nodes,
            node_mbit: env_u64("DAMSELFLY_BENCH_NODE_MBIT", 400),
            origin_mbit: env_u64("DAMSELFLY_BENCH_ORIGIN_MBIT", 400),
            peer_runs: env_u64("DAMSELFLY_BENCH_PEER_RUNS", 3).max(1) as usize,
            burst: only.is_empty() || only == "burst",
            peer: only.is_empty() || only == "peer",
            keep: std::env::var_os("DAMSELFLY_BENCH_KEEP").is_some(),
        }
    }

    /// Seconds to move the burst blob over the tighter of the two links.
    fn ideal(&self) -> f64 {
        self.blob as f64 * 8.0 / (self.node_mbit.min(self.origin_mbit) as f64 * 1e6)
    }
}

struct BurstRow {
    n: usize,
    direct: Vec<Pull>,
    direct_origin: u64,
    swarm: Vec<Pull>,
    swarm_origin: u64,
    swarm_origin_gets: usize,
    swarm_origin_metric: f64,
    peer_in: f64,
    hedges: f64,
    /// 1-minute load average before and after the swarm burst.
    load: (String, String),
    warm: Pull,
    warm_origin: u64,
    warm_peer_in: f64,
}

fn burst(s: &Settings, lab: &Lab, origin: &Origin, key: &Path, digest: &str, n: usize) -> BurstRow {
    let repo = "bench/burst";
    // Baseline: every node's client straight from the origin.
    let mark = origin.sync();
    let targets: Vec<(String, String)> = lab.nodes[..n]
        .iter()
        .map(|l| (l.ns.clone(), origin.blob_url(repo, digest)))
        .collect();
    let direct = pull_all(&targets, digest, s.blob, true);
    let (direct_origin, _) = origin.blob_bytes_since(mark, digest);
    eprintln!(
        "  N={n} direct: slowest {:.2} s",
        max(direct.iter().map(|p| p.secs))
    );

    // The swarm: N fresh daemons, joined, then all at once.
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..n {
        let boot: Vec<String> = nodes.iter().map(Node::control_addr).collect();
        nodes.push(Node::start(lab, i, &boot, origin, key));
    }
    let join = wait_members(&nodes.iter().collect::<Vec<_>>(), n - 1);
    eprintln!(
        "  N={n}: membership settled {:.1} s after the last start",
        join.as_secs_f64()
    );
    let mark = origin.sync();
    let targets: Vec<(String, String)> = nodes
        .iter()
        .map(|d| (d.ns.clone(), d.mirror_url(origin, repo, digest)))
        .collect();
    let load_before = loadavg();
    let swarm = pull_all(&targets, digest, s.blob, true);
    let load = (load_before, loadavg());
    let hedges: f64 = nodes
        .iter()
        .map(|d| d.metric("damselfly_hedges_total", &[]))
        .sum();
    let (swarm_origin, swarm_origin_gets) = origin.blob_bytes_since(mark, digest);
    let swarm_origin_metric: f64 = nodes
        .iter()
        .map(|d| d.metric("damselfly_origin_bytes_total", &[]))
        .sum();
    let peer_in: f64 = nodes
        .iter()
        .map(|d| d.metric("damselfly_fetched_bytes_total", &["source=\"peer\""]))
        .sum();
    eprintln!(
        "  N={n} swarm: slowest {:.2} s, origin {:.3}x in {swarm_origin_gets} GETs",
        max(swarm.iter().map(|p| p.secs)),
        swarm_origin as f64 / s.blob as f64
    );

    // Warm peer hit: one more fresh node, the blob held by the others.
    let boot: Vec<String> = nodes.iter().map(Node::control_addr).collect();
    let fresh = Node::start(lab, n, &boot, origin, key);
    let mut all: Vec<&Node> = nodes.iter().collect();
    all.push(&fresh);
    wait_members(&all, n);
    let mark = origin.sync();
    let warm = pull_one(
        &fresh.ns,
        &fresh.mirror_url(origin, repo, digest),
        digest,
        s.blob,
        true,
    );
    let (warm_origin, _) = origin.blob_bytes_since(mark, digest);
    let warm_peer_in = fresh.metric("damselfly_fetched_bytes_total", &["source=\"peer\""]);
    eprintln!(
        "  N={n} warm node: TTFB {:.1} ms, {:.2} s",
        warm.ttfb * 1000.0,
        warm.secs
    );
    check_logs(&all);
    BurstRow {
        n,
        direct,
        direct_origin,
        swarm,
        swarm_origin,
        swarm_origin_gets,
        swarm_origin_metric,
        peer_in,
        hedges,
        load,
        warm,
        warm_origin,
        warm_peer_in,
    }
}

/// Prints the daemons' warnings and errors, which a figure alone would hide.
fn check_logs(nodes: &[&Node]) {
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

struct PeerRow {
    direct: Vec<Pull>,
    swarm: Vec<Pull>,
    cpu_a: Vec<f64>,
    cpu_b: Vec<f64>,
    from_peer: Vec<f64>,
    from_origin: Vec<u64>,
    hedges: Vec<f64>,
    load: Vec<String>,
    /// B's pull after a holder that pulled while alone: the pull, bytes
    /// from the peer, bytes from the origin.
    alone: Option<(Pull, f64, u64)>,
}

fn one_peer(s: &Settings, lab: &Lab, origin: &Origin, key: &Path, digest: &str) -> PeerRow {
    let repo = "bench/peer";
    let size = s.peer_blob;
    let mut row = PeerRow {
        direct: Vec::new(),
        swarm: Vec::new(),
        cpu_a: Vec::new(),
        cpu_b: Vec::new(),
        from_peer: Vec::new(),
        from_origin: Vec::new(),
        hedges: Vec::new(),
        load: Vec::new(),
        alone: None,
    };
    // First, a holder that pulled while it was alone (a plain sequential
    // origin download): does a latecomer find it?
    {
        let a = Node::start(lab, 0, &[], origin, key);
        let p = pull_one(
            &a.ns,
            &a.mirror_url(origin, repo, digest),
            digest,
            size,
            false,
        );
        eprintln!("  A (alone) pulled from the origin: {:.0} MiB/s", p.mib_s());
        let b = Node::start(lab, 1, &[a.control_addr()], origin, key);
        wait_members(&[&a, &b], 1);
        let mark = origin.sync();
        let p = pull_one(
            &b.ns,
            &b.mirror_url(origin, repo, digest),
            digest,
            size,
            false,
        );
        let from_peer = b.metric("damselfly_fetched_bytes_total", &["source=\"peer\""]);
        let (from_origin, _) = origin.blob_bytes_since(mark, digest);
        eprintln!(
            "  B after a holder that pulled alone: {:.0} MiB/s, {:.0} MiB from A, {:.0} MiB from the origin",
            p.mib_s(),
            from_peer / MIB as f64,
            from_origin as f64 / MIB as f64
        );
        row.alone = Some((p, from_peer, from_origin));
    }
    // The measured holder: A pulls with a helper node H in the cluster (so
    // the pull goes piece by piece and A announces the blob when it commits),
    // then H leaves. Each run, a fresh B joins A and pulls.
    let a = Node::start(lab, 0, &[], origin, key);
    {
        let h = Node::start(lab, 2, &[a.control_addr()], origin, key);
        wait_members(&[&a, &h], 1);
        let p = pull_one(
            &a.ns,
            &a.mirror_url(origin, repo, digest),
            digest,
            size,
            false,
        );
        eprintln!(
            "  A (with H) pulled from the origin: {:.0} MiB/s",
            p.mib_s()
        );
    }
    // H is gone; let A notice (4 heartbeats).
    let deadline = Instant::now() + JOIN;
    while a.members() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let b_ns = lab.nodes[1].ns.clone();
    for run in 0..s.peer_runs {
        row.direct.push(pull_one(
            &b_ns,
            &origin.blob_url(repo, digest),
            digest,
            size,
            false,
        ));
        let b = Node::start(lab, 1, &[a.control_addr()], origin, key);
        wait_members(&[&a, &b], 1);
        let mark = origin.sync();
        let (a0, b0) = (a.cpu(), b.cpu());
        let p = pull_one(
            &b.ns,
            &b.mirror_url(origin, repo, digest),
            digest,
            size,
            false,
        );
        // Let the commit and the last writes land before reading CPU.
        std::thread::sleep(Duration::from_millis(300));
        let (a1, b1) = (a.cpu(), b.cpu());
        let gib = size as f64 / GIB;
        row.cpu_a.push((a1 - a0) / gib);
        row.cpu_b.push((b1 - b0) / gib);
        row.from_peer
            .push(b.metric("damselfly_fetched_bytes_total", &["source=\"peer\""]));
        row.from_origin
            .push(origin.blob_bytes_since(mark, digest).0);
        row.hedges.push(b.metric("damselfly_hedges_total", &[]));
        row.load.push(loadavg());
        row.swarm.push(p);
        check_logs(&[&a, &b]);
        drop(b);
        row.direct.push(pull_one(
            &b_ns,
            &origin.blob_url(repo, digest),
            digest,
            size,
            false,
        ));
        eprintln!(
            "  run {run}: from A {:.0} MiB/s (TTFB {:.1} ms), registry {:.0} MiB/s, CPU/GiB A {:.2} B {:.2}",
            p.mib_s(),
            p.ttfb * 1000.0,
            row.direct[row.direct.len() - 1].mib_s(),
            row.cpu_a[run],
            row.cpu_b[run]
        );
    }
    row
}

fn machine() -> String {
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

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("swarm bench: run with `cargo bench --bench swarm` (as root)");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the swarm bench needs root (network namespaces, tc)"
    );
    for tool in ["ip", "tc", "docker-registry"] {
        assert!(
            common::util::find_in_path(tool).is_some(),
            "the swarm bench needs `{tool}`"
        );
    }
    let s = Settings::from_env();
    let max_n = s.nodes.iter().copied().max().unwrap_or(2);
    let lab = Lab::new((max_n + 1).max(3), s.keep);
    eprintln!("lab: {} (bridge {})", lab.dir.display(), lab.bridge);
    let key = lab.dir.join("cluster.key");
    std::fs::write(&key, hex::encode(rand::random::<[u8; 32]>())).expect("cluster key");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    }
    let origin = Origin::start(&lab);

    let settings_line = format!(
        "burst blob {} MiB, nodes {:?}, node link {} Mbit/s, origin link {} Mbit/s \
         (tc tbf on both ends of each veth), one-peer blob {} MiB x {} runs{}",
        s.blob >> 20,
        s.nodes,
        s.node_mbit,
        s.origin_mbit,
        s.peer_blob >> 20,
        s.peer_runs,
        if s.quick { ", quick mode" } else { "" }
    ) + &if lab.swarm_extra.is_empty() {
        String::new()
    } else {
        format!(
            ", extra [swarm] config: `{}`",
            lab.swarm_extra.replace('\n', "; ")
        )
    };
    eprintln!("{settings_line}");

    let mut out = String::new();
    let machine = machine();
    out += &format!("\n## swarm bench ({machine})\n\n{settings_line}.\n");

    if s.peer {
        eprintln!("pushing the {} MiB one-peer blob...", s.peer_blob >> 20);
        let (digest, _) = push_blob(
            &origin.url(),
            "bench/peer",
            BlobSource::random(12, s.peer_blob),
            None,
        )
        .expect("push");
        eprintln!("one peer (unshaped):");
        let r = one_peer(&s, &lab, &origin, &key, &digest);
        let direct = median(r.direct.iter().map(Pull::mib_s).collect());
        let swarm = median(r.swarm.iter().map(Pull::mib_s).collect());
        let runs = r.swarm.len();
        out += &format!(
            "\n### One peer: node B pulls {} MiB through its mirror from node A (unshaped veths, median of {runs})\n\n",
            s.peer_blob >> 20
        );
        out += "| measure | baseline | damselfly | ratio | goal |\n|---|---|---|---|---|\n";
        out += &format!(
            "| throughput | docker-registry to B's namespace {direct:.0} MiB/s | A to B's mirror {swarm:.0} MiB/s | {:.2}x | >= 0.8x |\n",
            swarm / direct
        );
        out += &format!(
            "| CPU-s per GiB, holder A | | {:.2} | | <= ~1 |\n",
            median(r.cpu_a.clone())
        );
        out += &format!(
            "| CPU-s per GiB, puller B | | {:.2} | | <= ~1 |\n",
            median(r.cpu_b.clone())
        );
        out += &format!(
            "| B's bytes from the peer / from the origin | | {:.0} MiB / {:.0} MiB (worst run) | | all from the peer |\n",
            r.from_peer.iter().copied().fold(f64::INFINITY, f64::min) / MIB as f64,
            r.from_origin.iter().copied().max().unwrap_or(0) as f64 / MIB as f64
        );
        if let Some((p, from_peer, from_origin)) = r.alone {
            out += &format!(
                "| B after a holder that pulled while alone (one run) | | {:.0} MiB/s; {:.0} MiB from A, {:.0} MiB from the origin | | all from the peer |\n",
                p.mib_s(),
                from_peer / MIB as f64,
                from_origin as f64 / MIB as f64
            );
        }
        out += &format!(
            "| time to first byte through B (median) | | {:.1} ms | | |\n",
            median(r.swarm.iter().map(|p| p.ttfb * 1000.0).collect())
        );
        out += &format!(
            "\nPer run: registry MiB/s {:?}; from A MiB/s {:?}; CPU-s/GiB A {:?}, B {:?}; \
             B's hedges {:?}; 1-min load average after each run {:?}.\n",
            r.direct
                .iter()
                .map(|p| p.mib_s().round())
                .collect::<Vec<_>>(),
            r.swarm
                .iter()
                .map(|p| p.mib_s().round())
                .collect::<Vec<_>>(),
            r.cpu_a
                .iter()
                .map(|c| (c * 100.0).round() / 100.0)
                .collect::<Vec<_>>(),
            r.cpu_b
                .iter()
                .map(|c| (c * 100.0).round() / 100.0)
                .collect::<Vec<_>>(),
            r.hedges,
            r.load,
        );
    }

    if s.burst {
        eprintln!("pushing the {} MiB burst blob...", s.blob >> 20);
        let (digest, _) = push_blob(
            &origin.url(),
            "bench/burst",
            BlobSource::random(11, s.blob),
            None,
        )
        .expect("push");
        lab.shape(s.node_mbit, s.origin_mbit);
        // What one client alone gets through the shaped links.
        let alone = pull_one(
            &lab.nodes[0].ns,
            &origin.blob_url("bench/burst", &digest),
            &digest,
            s.blob,
            true,
        );
        eprintln!(
            "one client alone from the origin: {:.2} s ({:.0} Mbit/s of goodput)",
            alone.secs,
            s.blob as f64 * 8.0 / alone.secs / 1e6
        );
        let mut rows = Vec::new();
        for &n in &s.nodes {
            eprintln!("burst, {n} nodes:");
            rows.push(burst(&s, &lab, &origin, &key, &digest, n));
        }
        lab.unshape();
        let ideal = s.ideal();
        out += &format!(
            "\n### Burst: N nodes pull one {} MiB blob cold, at once\n\n\
             Ideal (blob / min(origin link, node link)): {ideal:.2} s. One client alone \
             from the origin through the shaped links: {:.2} s ({:.0} Mbit/s of goodput). \
             Clients hash every byte. TTFB: request to first body byte.\n\n",
            s.blob >> 20,
            alone.secs,
            s.blob as f64 * 8.0 / alone.secs / 1e6
        );
        out += "| N | path | origin bytes / blob | slowest node | slowest / ideal | median node | TTFB median | TTFB max |\n";
        out += "|---|---|---|---|---|---|---|---|\n";
        for r in &rows {
            for (path, pulls, origin_bytes) in [
                ("direct from origin", &r.direct, r.direct_origin),
                ("swarm", &r.swarm, r.swarm_origin),
            ] {
                let slowest = max(pulls.iter().map(|p| p.secs));
                out += &format!(
                    "| {} | {path} | {:.3}x | {slowest:.2} s | {:.2}x | {:.2} s | {:.1} ms | {:.1} ms |\n",
                    r.n,
                    origin_bytes as f64 / s.blob as f64,
                    slowest / ideal,
                    median(pulls.iter().map(|p| p.secs).collect()),
                    median(pulls.iter().map(|p| p.ttfb * 1000.0).collect()),
                    max(pulls.iter().map(|p| p.ttfb * 1000.0)),
                );
            }
        }
        out += "\nGoals: swarm origin bytes <= 1.05x; swarm slowest node <= 1.25x ideal.\n\n";
        out += "| N | swarm: origin GETs | origin bytes (daemons' own count) | bytes nodes took from peers | hedges | load avg before, after | warm node TTFB | warm node pull | warm node origin bytes | warm node bytes from peers |\n";
        out += "|---|---|---|---|---|---|---|---|---|---|\n";
        for r in &rows {
            out += &format!(
                "| {} | {} | {:.3}x | {:.2}x blob | {} | {}, {} | {:.1} ms | {:.2} s | {:.0} MiB | {:.0} MiB |\n",
                r.n,
                r.swarm_origin_gets,
                r.swarm_origin_metric / s.blob as f64,
                r.peer_in / s.blob as f64,
                r.hedges,
                r.load.0,
                r.load.1,
                r.warm.ttfb * 1000.0,
                r.warm.secs,
                r.warm_origin as f64 / MIB as f64,
                r.warm_peer_in / MIB as f64,
            );
        }
        out += "\nGoal: warm node (peer hit) TTFB < 50 ms.\n";
    }
    println!("{out}");
    drop(origin);
    drop(lab);
}
