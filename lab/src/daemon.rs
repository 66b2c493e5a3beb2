//! A damselfly daemon run as a real process, for integration tests and
//! benches: its own store, config and free ports on 127.0.0.1 (or on another
//! loopback address, [`Options::ip`], so that several daemons can form a
//! swarm on one machine).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::process::{Proc, Spawn};
use crate::util::{forget_at_exit, keep_dirs, remove_at_exit};

/// The binary under test: `DAMSELFLY_BIN` if set, else `damselfly` in the
/// profile directory of the running test or bench. Cargo puts a test
/// executable in `target/<profile>/deps/` and builds the root package's
/// binaries into `target/<profile>/` before it runs the root package's
/// integration tests and benches; `CARGO_BIN_EXE_damselfly` would only
/// exist when compiling those targets, not this library.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let (bin, whence) = match std::env::var_os("DAMSELFLY_BIN") {
            Some(path) => (PathBuf::from(path), "DAMSELFLY_BIN".to_owned()),
            None => {
                let exe = std::env::current_exe().expect("current_exe");
                let profile_dir = exe
                    .parent()
                    .and_then(Path::parent)
                    .unwrap_or_else(|| panic!("{} has no grandparent dir", exe.display()));
                (
                    profile_dir.join("damselfly"),
                    format!(
                        "the profile dir of {} (set DAMSELFLY_BIN to choose another)",
                        exe.display()
                    ),
                )
            }
        };
        assert!(
            bin.is_file(),
            "no damselfly binary at {}, from {whence}: build it first \
             (`cargo build --bin damselfly`, with `--release` for benches)",
            bin.display()
        );
        bin
    })
    .clone()
}

/// A free TCP port on `ip` (binds `ip:0`, reads the port, releases it).
pub fn free_addr_on(ip: Ipv4Addr) -> SocketAddr {
    let [addr] = free_addrs_on(ip);
    addr
}

/// `N` distinct free ports on `ip`. Every listener stays open until all are
/// picked: released one by one, the kernel once handed a daemon the same
/// port for its telemetry and its data plane.
pub fn free_addrs_on<const N: usize>(ip: Ipv4Addr) -> [SocketAddr; N] {
    let listeners: [std::net::TcpListener; N] = std::array::from_fn(|_| {
        std::net::TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"))
    });
    listeners.map(|l| l.local_addr().expect("local addr"))
}

/// What a daemon's `[swarm]` section says, apart from its own addresses
/// (those come from the daemon's [`Options::ip`]). See [`swarm_section`].
#[derive(Debug, Clone, Default)]
pub struct SwarmOptions {
    /// `bootstrap`: multiaddrs (`/ip4/127.0.0.2/tcp/4003`) or `dns:host:port`.
    pub bootstrap: Vec<String>,
    /// `cluster_key_file`; `None` leaves the key out.
    pub cluster_key_file: Option<PathBuf>,
    /// `role` (`"node"` or `"seed"`); `None` leaves it out (the default).
    pub role: Option<String>,
    /// More lines inside `[swarm]`, e.g. `upload_limit = "50MiB"`.
    pub extra: String,
}

/// The `[swarm]` section of a node whose control plane listens on
/// `listen` and data plane on `data_listen`: `enabled = true`, the
/// addresses, then what `opts` gives.
pub fn swarm_section(listen: SocketAddr, data_listen: SocketAddr, opts: &SwarmOptions) -> String {
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let mut text = format!(
        "[swarm]\nenabled = true\nlisten = {}\ndata_listen = {}\n",
        q(&multiaddr(listen)),
        q(&data_listen.to_string())
    );
    let bootstrap: Vec<String> = opts.bootstrap.iter().map(|b| q(b)).collect();
    text.push_str(&format!("bootstrap = [{}]\n", bootstrap.join(", ")));
    if let Some(key) = &opts.cluster_key_file {
        text.push_str(&format!(
            "cluster_key_file = {}\n",
            q(&key.to_string_lossy())
        ));
    }
    if let Some(role) = &opts.role {
        text.push_str(&format!("role = {}\n", q(role)));
    }
    text.push_str(&opts.extra);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// `/ip4/<ip>/tcp/<port>` (or `/ip6/...`).
pub fn multiaddr(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("/ip4/{ip}/tcp/{}", addr.port()),
        IpAddr::V6(ip) => format!("/ip6/{ip}/tcp/{}", addr.port()),
    }
}

/// The config file of every daemon the lab runs: a [`Daemon`] on loopback
/// and a [`crate::netlab::Node`] in a network namespace differ only in
/// these values.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// `mirror.listen`.
    pub mirror: SocketAddr,
    /// `telemetry.listen`, and `sidecar.listen` for a sidecar.
    pub telemetry: SocketAddr,
    /// `store.dir`.
    pub store_dir: PathBuf,
    /// `mirror.drain_timeout`, e.g. `"2s"`.
    pub drain_timeout: String,
    /// `telemetry.log_level`.
    pub log_level: String,
    /// More lines inside `[mirror]`.
    pub mirror_extra: String,
    /// More lines inside `[store]` (`max_size = "64GiB"`).
    pub store_extra: String,
    /// Sections after `[telemetry]` (`[[registry]]` tables, `[origin]`,
    /// `[prewarm]`).
    pub extra: String,
    /// A `[swarm]` section ([`swarm_section`]) whose control plane listens
    /// on the first address and data plane on the second.
    pub swarm: Option<(SocketAddr, SocketAddr, SwarmOptions)>,
    /// A `[sidecar]` section with these lines, listening on `telemetry`.
    pub sidecar: Option<String>,
}

impl DaemonConfig {
    /// The TOML text: `[mirror]`, `[store]`, `[telemetry]`, `extra`, then
    /// `[swarm]` and `[sidecar]` when set.
    pub fn to_toml(&self) -> String {
        let swarm = self
            .swarm
            .as_ref()
            .map(|(listen, data_listen, opts)| swarm_section(*listen, *data_listen, opts))
            .unwrap_or_default();
        let sidecar = self
            .sidecar
            .as_ref()
            .map(|s| format!("[sidecar]\nlisten = \"{}\"\n{s}\n", self.telemetry))
            .unwrap_or_default();
        format!(
            "[mirror]\nlisten = \"{}\"\ndrain_timeout = \"{}\"\n{}\n\
             [store]\ndir = \"{}\"\n{}\n\
             [telemetry]\nlisten = \"{}\"\nlog_level = \"{}\"\n\
             {}\n{swarm}{sidecar}",
            self.mirror,
            self.drain_timeout,
            self.mirror_extra,
            self.store_dir.display(),
            self.store_extra,
            self.telemetry,
            self.log_level,
            self.extra
        )
    }

    /// Writes [`DaemonConfig::to_toml`] to `path`.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_toml())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// Writes a fresh random cluster key (64 hex characters, mode 0600: the
/// daemon warns about a key that group or others can read) to `path`, for
/// `swarm.cluster_key_file`.
pub fn write_cluster_key(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let key = hex::encode(rand::random::<[u8; 32]>());
    std::fs::write(path, format!("{key}\n"))
        .unwrap_or_else(|e| panic!("write cluster key {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 600 {}: {e}", path.display()));
}

/// The `damselfly <subcommand> --config <config>` command line, without
/// the test's `RUST_LOG` (the config's `log_level` rules).
pub fn command(subcommand: &str, config: &Path) -> Command {
    let mut cmd = Command::new(binary());
    cmd.env_remove("RUST_LOG")
        .arg(subcommand)
        .arg("--config")
        .arg(config);
    cmd
}

/// Whether the daemon whose telemetry listens on `telemetry` (`host:port`)
/// is up: ready, or serving and holding readiness back on purpose
/// (`prewarm.gate_readiness`), which tests and benches then watch.
pub fn is_up(telemetry: &str) -> bool {
    match crate::http_get(telemetry, "/readyz") {
        Ok((200, _)) => true,
        Ok((503, body)) => body.contains("waiting for"),
        _ => false,
    }
}

/// Where the store at `store` keeps committed blob `digest`.
pub fn store_blob_path(store: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    store.join("blobs/sha256").join(hex)
}

/// The last `lines` lines of the file at `path` (empty when unreadable).
pub fn file_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The Prometheus text of the daemon whose telemetry listens on
/// `telemetry` (`host:port`); empty when it does not answer. Blocking and
/// runtime-free, so it works from sync and async tests alike.
pub fn scrape(telemetry: &str) -> String {
    crate::http_get(telemetry, "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// Every sample of metric family `name` in Prometheus text `text` whose
/// labels include all of `labels`, as `(labels, value)`.
pub fn parse_samples(
    text: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> Vec<(HashMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (family, label_text) = match series.split_once('{') {
                Some((f, rest)) => (f, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if family != name {
                return None;
            }
            let found = parse_labels(label_text);
            labels
                .iter()
                .all(|(k, v)| found.get(*k).map(String::as_str) == Some(*v))
                .then(|| Some((found, value.parse().ok()?)))?
        })
        .collect()
}

pub struct Daemon {
    /// The running process; `None` before the first start and after a
    /// kill, a termination or an exit that a helper here saw.
    proc: Option<Proc>,
    pub dir: tempfile::TempDir,
    pub mirror: SocketAddr,
    pub telemetry: SocketAddr,
    /// The swarm control plane's address (`[swarm] listen` when the config
    /// has a swarm section; reserved either way).
    pub swarm_listen: SocketAddr,
    /// The swarm data plane's address (`[swarm] data_listen`).
    pub data_listen: SocketAddr,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    /// How every start spawns the process: appending to `log_path`, with
    /// [`Options::env`] and [`Options::env_remove`].
    spawn: Spawn,
    /// `daemon` or `sidecar`.
    command: &'static str,
}

/// Extra config lines: `mirror` and `store` go into those sections,
/// `extra` after them (`[[registry]]` tables, `[origin]`).
#[derive(Default, Clone)]
pub struct Options {
    pub mirror: String,
    pub store: String,
    pub extra: String,
    /// Set in the daemon's environment, on top of the test's own
    /// (`RUST_LOG` is always removed).
    pub env: Vec<(String, String)>,
    /// Removed from the daemon's environment before `env` is applied; a name
    /// ending in `*` removes every variable with that prefix (`AWS_*`).
    pub env_remove: Vec<String>,
    /// The loopback address every listener binds (mirror, telemetry, swarm
    /// control and data planes), each on a free port; 127.0.0.1 when
    /// `None`.
    pub ip: Option<Ipv4Addr>,
    /// A `[swarm]` section ([`swarm_section`]) on this daemon's own swarm
    /// addresses; none when `None`.
    pub swarm: Option<SwarmOptions>,
    /// Run `damselfly sidecar` instead of the daemon, with these lines in
    /// its `[sidecar]` section; `sidecar.listen` is the reserved telemetry
    /// address, so readiness, [`Daemon::metrics`] and [`Daemon::http_json`]
    /// talk to the sidecar.
    pub sidecar: Option<String>,
}

impl Daemon {
    /// Starts a daemon with `extra` after the generated sections.
    pub fn start(extra: &str) -> Daemon {
        Daemon::start_with(Options {
            extra: extra.to_owned(),
            ..Options::default()
        })
    }

    pub fn start_with(opts: Options) -> Daemon {
        // The ports are free when picked, but another test of the same
        // binary may take one before the daemon binds it: a daemon that
        // exits for a port in use is started again on new ports.
        for attempt in 1.. {
            let mut d = Daemon::configure(opts.clone());
            d.spawn_child();
            match d.wait_ready_or_exit() {
                None => return d,
                Some(log) if attempt < 3 && log.contains("Address already in use") => {
                    eprintln!("damselfly: a port was taken before it bound; again on new ports");
                }
                Some(log) => panic!("damselfly exited before it was ready:\n{log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Starts a daemon that should refuse to start: waits (20 s at most)
    /// for the process to exit and returns its exit status and its whole
    /// log (stdout and stderr). Panics if it becomes ready instead.
    pub fn start_expecting_exit(opts: Options) -> (ExitStatus, String) {
        let mut d = Daemon::configure(opts);
        d.spawn_child();
        let deadline = Instant::now() + Duration::from_secs(20);
        let telemetry = d.telemetry.to_string();
        loop {
            if let Some(status) = d.proc.as_mut().and_then(Proc::exited) {
                d.proc = None;
                return (status, d.log());
            }
            if matches!(crate::http_get(&telemetry, "/readyz"), Ok((200, _))) {
                panic!(
                    "damselfly became ready, expected it to exit:\n{}",
                    d.log_tail(40)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "damselfly neither exited nor became ready in 20 s:\n{}",
                    d.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Writes the config; no process yet.
    fn configure(opts: Options) -> Daemon {
        // DAMSELFLY_LAB_KEEP=1 keeps the dir (config, log, store), as the
        // lab does with its own temp dirs.
        let dir = tempfile::Builder::new()
            .disable_cleanup(keep_dirs())
            .tempdir()
            .expect("tempdir");
        if keep_dirs() {
            eprintln!("lab: keeping {}", dir.path().display());
        } else {
            // A daemon in a `static` is never dropped; its store can hold GiBs.
            remove_at_exit(dir.path());
        }
        let ip = opts.ip.unwrap_or(Ipv4Addr::LOCALHOST);
        let [mirror, telemetry, swarm_listen, data_listen] = free_addrs_on(ip);
        let config_path = dir.path().join("damselfly.toml");
        DaemonConfig {
            mirror,
            telemetry,
            store_dir: dir.path().join("store"),
            drain_timeout: "2s".into(),
            log_level: "info,damselfly=debug".into(),
            mirror_extra: opts.mirror,
            store_extra: opts.store,
            extra: opts.extra,
            swarm: opts.swarm.map(|s| (swarm_listen, data_listen, s)),
            sidecar: opts.sidecar.clone(),
        }
        .write(&config_path);
        let log_path = dir.path().join("daemon.log");
        let spawn = Spawn {
            name: "damselfly".into(),
            log: log_path.clone(),
            append: true,
            env: opts.env,
            env_remove: opts.env_remove,
            ..Spawn::default()
        };
        Daemon {
            proc: None,
            dir,
            mirror,
            telemetry,
            swarm_listen,
            data_listen,
            config_path,
            log_path,
            spawn,
            command: if opts.sidecar.is_some() {
                "sidecar"
            } else {
                "daemon"
            },
        }
    }

    fn spawn(&mut self) {
        self.spawn_child();
        self.wait_ready();
    }

    /// Waits (20 s at most) until the daemon is up (`None`) or has
    /// exited (`Some` of its exit status and the end of its log).
    fn wait_ready_or_exit(&mut self) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let telemetry = self.telemetry.to_string();
        loop {
            if is_up(&telemetry) {
                return None;
            }
            if let Some(status) = self.proc.as_mut().and_then(Proc::exited) {
                self.proc = None;
                return Some(format!("{status}\n{}", self.log_tail(40)));
            }
            if Instant::now() > deadline {
                panic!("damselfly not ready after 20 s:\n{}", self.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn spawn_child(&mut self) {
        let cmd = command(self.command, &self.config_path);
        self.proc = Some(Proc::spawn(cmd, &self.spawn).expect("spawn damselfly"));
    }

    fn wait_ready(&mut self) {
        if let Some(exit) = self.wait_ready_or_exit() {
            panic!("damselfly exited with {exit} before it was ready");
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.mirror)
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Removes blobs from the running daemon's store through its admin
    /// socket (`POST /v1/evict`, what `bench pull --cold` uses); returns how
    /// many were there.
    pub fn evict(&self, digests: &[&str]) -> u64 {
        let body = serde_json::json!({ "digests": digests });
        let (status, v) = self.admin("POST", "/v1/evict", Some(&body));
        assert_eq!(status, 200, "evict: {v}");
        v["removed"]
            .as_u64()
            .unwrap_or_else(|| panic!("evict answered {v}"))
    }

    /// `GET path` on the admin socket: the status and the JSON answer
    /// (`Null` when the body is not JSON).
    pub fn admin_get(&self, path: &str) -> (u16, serde_json::Value) {
        self.admin("GET", path, None)
    }

    /// One request on the daemon's admin socket, the way the CLI sends it.
    pub fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        use std::io::{Read as _, Write as _};
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let sock = self.store_dir().join("admin.sock");
        let mut s = std::os::unix::net::UnixStream::connect(&sock)
            .unwrap_or_else(|e| panic!("admin socket {}: {e}", sock.display()));
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: damselfly\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write admin request");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read admin response");
        let (head, json) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        // A chunked body (hyper's default for streamed answers) is not
        // used by these endpoints: they answer with a Content-Length.
        let value = serde_json::from_str(json.trim()).unwrap_or(serde_json::Value::Null);
        (status, value)
    }

    /// `damselfly prewarm status -o json`: the admin API's `/v1/prewarm`.
    pub fn prewarm_status(&self) -> serde_json::Value {
        let (code, v) = self.admin_get("/v1/prewarm");
        assert_eq!(code, 200, "prewarm status: {v}");
        v
    }

    /// Waits (at most `timeout`) until the prewarm image that `select`
    /// picks exists and `pred` holds for it, and returns its status. The
    /// panic shows the last status and the log tail.
    pub fn wait_prewarm_image(
        &self,
        select: impl Fn(&serde_json::Value) -> bool,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.prewarm_status();
            let img = s["images"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|i| select(i))
                .cloned();
            if let Some(img) = img.filter(|i| pred(i)) {
                return img;
            }
            if Instant::now() > deadline {
                panic!(
                    "no prewarm image became {what} within {timeout:?}: {s:#}
--- daemon log ---
{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the store lists `digest` as pinned.
    pub fn pinned_in_store(&self, digest: &str) -> bool {
        let (code, v) = self.admin_get("/v1/blobs");
        assert_eq!(code, 200, "{v}");
        v["blobs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["digest"] == digest)
            .is_some_and(|b| b["pinned"] == true)
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        store_blob_path(&self.store_dir(), digest)
    }

    /// Waits until committed blob `digest` is in the store with the right
    /// bytes (fetched again after a quarantine, say); the error carries the
    /// log tail.
    pub fn wait_blob_intact(&self, digest: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(bytes) = std::fs::read(self.blob_path(digest)) {
                if crate::util::sha256_digest(&bytes) == digest {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{digest} is not in the store with the right bytes after {timeout:?}\n{}",
                    self.log_tail(30)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn partial_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.store_dir().join("tmp").join(format!("{hex}.partial"))
    }

    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log_path, lines)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The swarm control plane's multiaddr, `/ip4/127.0.0.N/tcp/PORT`: what
    /// other nodes put in `bootstrap`.
    pub fn swarm_multiaddr(&self) -> String {
        multiaddr(self.swarm_listen)
    }

    /// The data plane's `host:port`.
    pub fn data_addr(&self) -> SocketAddr {
        self.data_listen
    }

    /// The loopback address it binds.
    pub fn ip(&self) -> IpAddr {
        self.mirror.ip()
    }

    /// Whether the process was started and not yet killed or reaped by a
    /// helper here (it may still have died on its own: see
    /// [`Daemon::has_exited`]).
    pub fn is_started(&self) -> bool {
        self.proc.is_some()
    }

    /// Whether a started process has exited (on its own).
    pub fn has_exited(&mut self) -> bool {
        self.proc.as_mut().and_then(Proc::exited).is_some()
    }

    /// `GET path` on the telemetry address (a sidecar's `/keda`,
    /// `/v1/status`): the status and the JSON (`Null` when not JSON).
    pub fn http_json(&self, path: &str) -> (u16, serde_json::Value) {
        let (code, body) = crate::http_get(&self.telemetry.to_string(), path).unwrap_or_default();
        (
            code,
            serde_json::from_str(body.trim()).unwrap_or(serde_json::Value::Null),
        )
    }

    /// The Prometheus exposition text.
    pub fn metrics(&self) -> String {
        scrape(&self.telemetry.to_string())
    }

    /// The value of one sample, e.g. `damselfly_bytes_served_total{source="local"}`;
    /// 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == sample).then(|| value.parse().ok())?
            })
            .unwrap_or(0.0)
    }

    /// Every sample of metric family `name` whose labels include all of
    /// `labels`, as `(labels, value)`; e.g. `("damselfly_peer_bytes_total",
    /// &[("direction", "out")])` gives one sample per peer.
    pub fn metric_samples(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Vec<(HashMap<String, String>, f64)> {
        parse_samples(&self.metrics(), name, labels)
    }

    /// The sum of [`Daemon::metric_samples`]; 0 when there are none.
    pub fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metric_samples(name, labels)
            .iter()
            .map(|(_, v)| v)
            .sum()
    }

    /// `damselfly_peer_bytes_total{direction="out"}` over all peers: what
    /// it served to the swarm.
    pub fn peer_bytes_out(&self) -> f64 {
        self.metric_sum("damselfly_peer_bytes_total", &[("direction", "out")])
    }

    /// `damselfly_fetched_bytes_total{source="<source>"}` (`peer`,
    /// `origin`).
    pub fn fetched_bytes(&self, source: &str) -> f64 {
        self.metric(&format!(
            "damselfly_fetched_bytes_total{{source=\"{source}\"}}"
        ))
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Proc::pid)
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// SIGTERM, then waits (15 s at most, then SIGKILL) for the exit.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        self.proc.take()?.terminate(Duration::from_secs(15))
    }

    /// Starts the process again on the same config and store.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        forget_at_exit(self.dir.path());
    }
}

/// `{a="b",c="d"}`'s inside as a map (Prometheus escapes `\\`, `\"`, `\n`).
fn parse_labels(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    end = i + 1;
                    break;
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => {}
                },
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    out
}
