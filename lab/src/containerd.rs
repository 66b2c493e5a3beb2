//! A private `containerd` (Debian 1.6) and the `hosts.toml` files that
//! route its pulls.
//!
//! Facts checked on this machine:
//!
//! - The hosts directory for a registry with a port is named literally
//!   `127.0.0.1:5000` (`<hosts dir>/127.0.0.1:5000/hosts.toml`).
//! - With `server = "http://..."` and `[host."http://..."]` entries, `ctr`
//!   pulls over plain HTTP without `--plain-http`.
//! - `ctr images pull` / `ctr content fetch` resolve and fetch in the `ctr`
//!   process itself (containerd 1.6 has no server-side transfer service),
//!   with the same resolver code and `User-Agent: containerd/1.6.20~ds1` as
//!   the daemon's CRI pulls, which read `config_path` instead of
//!   `--hosts-dir`.
//! - A hosts.toml with `server` and no `[host]` table fails to decode and is
//!   silently ignored, so [`write_direct_hosts_toml`] always writes a host
//!   table.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

use super::util::{self, log_tail, run_command, ChildGuard, CmdOutput, TestDir};

/// Timeout of one `ctr` invocation unless a caller gives another.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(180);

/// A running containerd with its own root, state, socket and log; killed on
/// drop (its dirs removed).
pub struct Containerd {
    child: ChildGuard,
    socket: PathBuf,
    hosts_dir: PathBuf,
    log: PathBuf,
    config: PathBuf,
    /// The network namespace it and its `ctr` commands run in (`ctr`
    /// fetches in its own process), or the caller's.
    netns: Option<String>,
    // Held for its Drop; last, so removed after the child is killed.
    _dir: TestDir,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("socket", &self.socket)
            .field("hosts_dir", &self.hosts_dir)
            .finish()
    }
}

impl Containerd {
    /// Starts a containerd whose CRI plugin reads hosts.toml files from its
    /// own (initially empty) [`Containerd::hosts_dir`]. Each call gives an
    /// independent instance with an empty content store.
    pub fn start() -> anyhow::Result<Containerd> {
        Containerd::start_inner(None, None)
    }

    /// Like [`Containerd::start`] with the CRI `config_path` set to
    /// `hosts_dir`.
    pub fn start_with_hosts_dir(hosts_dir: &Path) -> anyhow::Result<Containerd> {
        Containerd::start_inner(Some(hosts_dir), None)
    }

    /// Like [`Containerd::start_with_hosts_dir`], with containerd and every
    /// `ctr` command of this instance in network namespace `netns` (a node
    /// of the benches' network lab).
    pub fn start_in_netns(netns: &str, hosts_dir: &Path) -> anyhow::Result<Containerd> {
        Containerd::start_inner(Some(hosts_dir), Some(netns))
    }

    fn start_inner(hosts_dir: Option<&Path>, netns: Option<&str>) -> anyhow::Result<Containerd> {
        if !util::is_root() {
            bail!("containerd needs root; run the lab tests as root");
        }
        let dir = TestDir::new("ctrd").context("containerd temp dir")?;
        let socket = dir.join("c.sock");
        if socket.as_os_str().len() > 100 {
            bail!(
                "socket path {} is too long for a unix socket; set DAMSELFLY_LAB_TMP to a short dir",
                socket.display()
            );
        }
        let hosts_dir = match hosts_dir {
            Some(path) => path.to_path_buf(),
            None => dir.join("hosts"),
        };
        std::fs::create_dir_all(&hosts_dir).context("create hosts dir")?;
        let log = dir.join("containerd.log");
        let config = dir.join("config.toml");
        let q = |p: &Path| toml_str(&p.to_string_lossy());
        let text = format!(
            r#"version = 2
root = {root}
state = {state}
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[debug]
  level = "info"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "native"

[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = {hosts}
"#,
            root = q(&dir.join("root")),
            state = q(&dir.join("state")),
            socket = q(&socket),
            ttrpc = q(&dir.join("c.sock.ttrpc")),
            hosts = q(&hosts_dir),
        );
        std::fs::write(&config, text).context("write containerd config")?;
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .context("open containerd log")?;
        let mut cmd = util::command("containerd");
        cmd.arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("dup log fd")?)
            .stderr(log_file);
        if let Some(ns) = netns {
            util::in_netns(&mut cmd, ns).with_context(|| format!("network namespace {ns}"))?;
        }
        let mut child = ChildGuard::spawn(cmd, "containerd")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if socket.exists() {
                let version = ctr_command(&socket, netns, &["version"], Duration::from_secs(5))?;
                if version.success() {
                    break;
                }
            }
            if let Some(status) = child.try_wait().context("wait for containerd")? {
                bail!(
                    "containerd exited ({status}) at start\n{}",
                    log_tail(&log, 30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer `ctr version` within 20 s\n{}",
                    log_tail(&log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Containerd {
            child,
            socket,
            hosts_dir,
            log,
            config,
            netns: netns.map(str::to_owned),
            _dir: dir,
        })
    }

    /// The gRPC socket (`ctr -a <socket>`; CRI clients use it too).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The CRI plugin's `config_path` (hosts.toml root).
    pub fn hosts_dir(&self) -> &Path {
        &self.hosts_dir
    }

    /// containerd's own log (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The config file it runs with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// `ctr -a <socket> <args>` with [`CTR_TIMEOUT`].
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<CmdOutput> {
        ctr_command(&self.socket, self.netns.as_deref(), args, CTR_TIMEOUT)
    }

    /// Ok when `reference`'s records in the `k8s.io` namespace (where the
    /// CRI plugin keeps images) are complete and unpacked (`ctr images
    /// check`); the error quotes what ctr said.
    pub fn unpacked(&self, reference: &str) -> anyhow::Result<()> {
        let out = self
            .ctr(&[
                "-n",
                "k8s.io",
                "images",
                "check",
                "--snapshotter",
                "native",
                &format!("name=={reference}"),
            ])?
            .check()?;
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(reference))
            .ok_or_else(|| anyhow!("containerd has no {reference}: {}", out.stdout))?;
        if !line.contains("complete") || !line.trim_end().ends_with("true") {
            bail!("not complete and unpacked: {line}");
        }
        Ok(())
    }

    /// `ctr -a <socket> <args>`, killed after `timeout`.
    pub fn ctr_with_timeout(&self, args: &[&str], timeout: Duration) -> anyhow::Result<CmdOutput> {
        ctr_command(&self.socket, self.netns.as_deref(), args, timeout)
    }

    /// `ctr images pull --hosts-dir <hosts_dir> --snapshotter native
    /// <extra_args> <reference>`: fetch and unpack. `extra_args` may be e.g.
    /// `["--user", "u:p"]`; `--plain-http` is not needed when hosts.toml
    /// says `http://`. `Err` only if ctr cannot run; check
    /// [`CmdOutput::success`].
    pub fn pull(
        &self,
        reference: &str,
        hosts_dir: &Path,
        extra_args: &[&str],
    ) -> anyhow::Result<CmdOutput> {
        let hosts = hosts_dir.to_string_lossy();
        let mut args = vec![
            "images",
            "pull",
            "--hosts-dir",
            &hosts,
            "--snapshotter",
            "native",
        ];
        args.extend_from_slice(extra_args);
        args.push(reference);
        self.ctr(&args)
    }

    /// `ctr content fetch --hosts-dir <hosts_dir> <extra_args> <reference>`:
    /// fetch every blob of the image (all platforms' manifests are not
    /// followed; the default platform is) without unpacking.
    pub fn content_fetch(
        &self,
        reference: &str,
        hosts_dir: &Path,
        extra_args: &[&str],
    ) -> anyhow::Result<CmdOutput> {
        let hosts = hosts_dir.to_string_lossy();
        let mut args = vec!["content", "fetch", "--hosts-dir", &hosts];
        args.extend_from_slice(extra_args);
        args.push(reference);
        self.ctr(&args)
    }

    /// `ctr images rm --sync <reference>` (garbage-collects its content and
    /// snapshots when nothing else uses them).
    pub fn remove_image(&self, reference: &str) -> anyhow::Result<CmdOutput> {
        self.ctr(&["images", "rm", "--sync", reference])
    }

    /// The non-empty lines `ctr` prints for `args`.
    fn ctr_lines(&self, args: &[&str]) -> anyhow::Result<Vec<String>> {
        let output = self.ctr(args)?.check()?;
        Ok(output
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// Image names in the `default` namespace.
    pub fn images(&self) -> anyhow::Result<Vec<String>> {
        self.ctr_lines(&["images", "ls", "-q"])
    }

    /// Digests in the content store.
    pub fn content_digests(&self) -> anyhow::Result<Vec<String>> {
        self.ctr_lines(&["content", "ls", "-q"])
    }

    /// Removes every image and every blob, so the next pull fetches
    /// everything again. Errors if content is left.
    pub fn clear_content(&self) -> anyhow::Result<()> {
        let images = self.images()?;
        if !images.is_empty() {
            let mut args = vec!["images", "rm", "--sync"];
            args.extend(images.iter().map(String::as_str));
            self.ctr(&args)?.check()?;
        }
        let digests = self.content_digests()?;
        if !digests.is_empty() {
            let mut args = vec!["content", "rm"];
            args.extend(digests.iter().map(String::as_str));
            self.ctr(&args)?.check()?;
        }
        let left = self.content_digests()?;
        if !left.is_empty() {
            return Err(anyhow!("content left after clear: {left:?}"));
        }
        Ok(())
    }
}

fn ctr_command(
    socket: &Path,
    netns: Option<&str>,
    args: &[&str],
    timeout: Duration,
) -> anyhow::Result<CmdOutput> {
    let mut cmd = util::command("ctr");
    cmd.arg("--address").arg(socket).args(args);
    if let Some(ns) = netns {
        util::in_netns(&mut cmd, ns).with_context(|| format!("network namespace {ns}"))?;
    }
    run_command(cmd, timeout)
}

/// A TOML basic string (JSON escapes are valid TOML for these inputs).
fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn check_registry_host(registry_host: &str) -> anyhow::Result<()> {
    if registry_host.is_empty()
        || registry_host == "."
        || registry_host == ".."
        || registry_host
            .chars()
            .any(|c| c == '/' || c == '\\' || c == '"' || c.is_whitespace() || c.is_control())
    {
        bail!("{registry_host:?} is not a registry host (like 127.0.0.1:5000)");
    }
    Ok(())
}

fn check_url(url: &str) -> anyhow::Result<()> {
    if !(url.starts_with("http://") || url.starts_with("https://"))
        || url
            .chars()
            .any(|c| c == '"' || c == '\\' || c.is_whitespace() || c.is_control())
    {
        bail!("{url:?} is not an http(s) URL usable in hosts.toml");
    }
    Ok(())
}

/// Writes `<dir>/<registry_host>/hosts.toml` with `contents`, creating the
/// directory. Returns the file's path.
pub fn write_hosts_file(
    dir: &Path,
    registry_host: &str,
    contents: &str,
) -> anyhow::Result<PathBuf> {
    check_registry_host(registry_host)?;
    let host_dir = dir.join(registry_host);
    std::fs::create_dir_all(&host_dir).with_context(|| format!("create {}", host_dir.display()))?;
    let path = host_dir.join("hosts.toml");
    std::fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// Routes pulls of `registry_host` (e.g. `127.0.0.1:5000`) through
/// `mirror_url` (e.g. `http://127.0.0.1:4001`), falling back to the origin
/// over plain HTTP:
///
/// ```toml
/// server = "http://127.0.0.1:5000"
///
/// [host."http://127.0.0.1:4001"]
///   capabilities = ["pull", "resolve"]
/// ```
pub fn write_hosts_toml(
    dir: &Path,
    registry_host: &str,
    mirror_url: &str,
) -> anyhow::Result<PathBuf> {
    check_registry_host(registry_host)?;
    check_url(mirror_url)?;
    let contents = format!(
        "server = \"http://{registry_host}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        mirror = mirror_url.trim_end_matches('/'),
    );
    write_hosts_file(dir, registry_host, &contents)
}

/// Makes containerd pull `registry_host` directly over plain HTTP (no
/// mirror). Writes a `[host]` table for the origin itself, since a file with
/// only `server` is ignored.
pub fn write_direct_hosts_toml(dir: &Path, registry_host: &str) -> anyhow::Result<PathBuf> {
    check_registry_host(registry_host)?;
    let contents = format!(
        "server = \"http://{registry_host}\"\n\n[host.\"http://{registry_host}\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n"
    );
    write_hosts_file(dir, registry_host, &contents)
}
