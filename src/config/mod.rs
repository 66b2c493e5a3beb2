//! Configuration: TOML in, a validated [`Config`] out.
//!
//! Every key is declared once, in [`KEYS`], with its type, default and
//! meaning; the loader reads every plain default from there. The loader
//! accepts only those keys, and reports every problem in a file at once,
//! each with its path (`registry[1].endpoint: ...`), rather than stopping at
//! the first. `docs/configuration.md` embeds [`reference_markdown`], and a
//! test keeps the two equal.
//!
//! config sits at the bottom of the layers with `oci`: it imports nothing
//! else of the crate. What it needs to validate the swarm's and ECR's
//! settings ([`Role`], [`Bootstrap`], [`load_psk`], [`parse_ecr_host`])
//! is defined here and re-exported by `swarm` and `origin::ecr`.
//!
//! - `keys`: the [`KEYS`] table and the generated reference;
//! - `validate`: the `Validator` that turns TOML values into typed ones;
//! - one file per section that needs more than the generic readers:
//!   `swarm`, `registries`, `node`, `prewarm` (with `[gpu]`), `sidecar`;
//! - `layers`: a directory of drop-ins merged into one table.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Table;

mod keys;
mod layers;
mod node;
mod prewarm;
mod registries;
mod sidecar;
mod swarm;
mod validate;

pub(crate) use keys::default_of;
pub use keys::{reference_markdown, Key, KEYS};
pub use node::{valid_label_key, NodeConfig, TaintEffect, TaintSpec};
pub use prewarm::{
    parse_compute_capability, AssumedGpus, GpuConfig, GpuSelector, GpuSource, PrewarmConfig,
    PrewarmRule, ProductGlob, RuleNodes,
};
pub use registries::{
    default_endpoint, is_aws_account, parse_ecr_host, valid_aws_region, Auth, Credentials, EcrAuth,
    EcrHost, RegistryConfig,
};
pub use sidecar::{valid_workload_id, Scaling, SidecarConfig, SignalSource, WORKLOAD_ID_GRAMMAR};
pub use swarm::{
    load_psk, warn_if_readable_by_others, Bootstrap, BootstrapError, ClusterKeyError, Role,
    SwarmConfig,
};
use validate::Validator;

/// The validated configuration. Every field is filled; defaults were applied
/// at load time.
#[derive(Debug, Clone)]
pub struct Config {
    pub mirror: MirrorConfig,
    pub store: StoreConfig,
    pub admin: AdminConfig,
    pub telemetry: TelemetryConfig,
    pub origin: OriginConfig,
    pub containerd: ContainerdConfig,
    pub swarm: SwarmConfig,
    pub node: NodeConfig,
    pub gpu: GpuConfig,
    pub prewarm: PrewarmConfig,
    /// `[sidecar]`: only `damselfly sidecar` reads it.
    pub sidecar: Option<SidecarConfig>,
    /// Empty means: mirror any registry over HTTPS.
    pub registries: Vec<RegistryConfig>,
    /// Valid, but probably not what was meant (the daemon logs them at
    /// start-up, `config check` prints them).
    pub warnings: Vec<Issue>,
}

/// How the daemon wires containerd to itself at start-up (see hostsd).
#[derive(Debug, Clone)]
pub struct ContainerdConfig {
    pub configure_hosts: bool,
    pub config: PathBuf,
    pub certs_dir: Option<PathBuf>,
    pub dial_timeout: String,
    pub patch_config: bool,
}

#[derive(Debug, Clone)]
pub struct MirrorConfig {
    pub listen: SocketAddr,
    pub default_registry: Option<String>,
    pub tag_stale_for: Duration,
    pub max_header_size: u64,
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub dir: PathBuf,
    /// Bytes.
    pub max_size: u64,
    pub verify_reads: bool,
    /// Bytes per second; 0 is off.
    pub scrub_rate: u64,
    pub scrub_every: Duration,
}

/// The admin API for the CLI.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub socket: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub listen: SocketAddr,
    pub log_format: LogFormat,
    pub log_level: String,
}

#[derive(Debug, Clone)]
pub struct OriginConfig {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub retries: u32,
    pub parallel_ranges: usize,
    pub range_size: u64,
}

/// One problem in a config file, with the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub path: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n{}", issues.len(), render_issues(issues))]
    Invalid { path: PathBuf, issues: Vec<Issue> },
}

fn render_issues(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(|i| format!("  {}: {}", i.path, i.message))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// The built-in defaults, as used when no config file is given. They
    /// go through the same validation as a file (an empty one).
    pub fn defaults() -> Result<Config, ConfigError> {
        Config::parse("", Path::new("<built-in defaults>"))
    }

    /// Reads and validates a config file, or a directory of `*.toml`
    /// drop-ins merged in name order (see [`layers`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if path.is_dir() {
            let table = layers::load_dir(path)?;
            return Config::from_table(&table, path).map_err(|issues| ConfigError::Invalid {
                path: path.to_owned(),
                issues,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Validates config text. `origin` names the file in errors, and relative
    /// paths inside it (`password_file`, `ca_file`) resolve against its folder.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: origin.to_owned(),
                message: e.message().to_owned(),
            })?;
        let base = origin.parent().unwrap_or(Path::new("."));
        Config::from_table(&table, base).map_err(|issues| ConfigError::Invalid {
            path: origin.to_owned(),
            issues,
        })
    }

    fn from_table(root: &Table, base: &Path) -> Result<Config, Vec<Issue>> {
        let mut v = Validator::new(base.to_owned());
        let sections: HashSet<&str> = KEYS
            .iter()
            .map(|k| keys::section_of(k.path).trim_end_matches("[]"))
            .collect();
        for key in root.keys() {
            if !sections.contains(key.as_str()) {
                v.issue(key, "unknown section or key");
            }
        }
        let empty = Table::new();
        let mirror = v.section(root, "mirror").unwrap_or(&empty);
        let store = v.section(root, "store").unwrap_or(&empty);
        let telemetry = v.section(root, "telemetry").unwrap_or(&empty);
        let origin = v.section(root, "origin").unwrap_or(&empty);
        let containerd = v.section(root, "containerd").unwrap_or(&empty);

        let mirror_cfg = MirrorConfig {
            listen: v.addr(mirror, "mirror", "listen"),
            default_registry: v.opt_string(mirror, "mirror", "default_registry"),
            tag_stale_for: v.duration(mirror, "mirror", "tag_stale_for"),
            max_header_size: v.size(mirror, "mirror", "max_header_size"),
            drain_timeout: v.duration(mirror, "mirror", "drain_timeout"),
        };
        let store_cfg = StoreConfig {
            dir: v
                .opt_path(store, "store", "dir")
                .unwrap_or_else(default_store_dir),
            max_size: v.size(store, "store", "max_size"),
            verify_reads: v.bool(store, "store", "verify_reads"),
            scrub_rate: v.size(store, "store", "scrub_rate"),
            scrub_every: v.duration(store, "store", "scrub_every"),
        };
        let admin = v.section(root, "admin").unwrap_or(&empty);
        let admin_cfg = AdminConfig {
            socket: v
                .opt_path(admin, "admin", "socket")
                .unwrap_or_else(|| store_cfg.dir.join("admin.sock")),
        };
        let log_format = match v.string(telemetry, "telemetry", "log_format").as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                v.issue(
                    "telemetry.log_format",
                    &format!("must be \"text\" or \"json\", not {other:?}"),
                );
                LogFormat::Text
            }
        };
        let telemetry_cfg = TelemetryConfig {
            listen: v.addr(telemetry, "telemetry", "listen"),
            log_format,
            log_level: v.string(telemetry, "telemetry", "log_level"),
        };
        let origin_cfg = OriginConfig {
            connect_timeout: v.duration(origin, "origin", "connect_timeout"),
            read_timeout: v.duration(origin, "origin", "read_timeout"),
            retries: v.integer(origin, "origin", "retries", 0..=100) as u32,
            parallel_ranges: v.integer(origin, "origin", "parallel_ranges", 1..=32) as usize,
            range_size: v.size(origin, "origin", "range_size"),
        };
        if !(1 << 20..=64 << 20).contains(&origin_cfg.range_size) {
            v.issue("origin.range_size", "must be between 1MiB and 64MiB");
        }
        let containerd_cfg = ContainerdConfig {
            configure_hosts: v.bool(containerd, "containerd", "configure_hosts"),
            config: v.path(containerd, "containerd", "config"),
            certs_dir: v.opt_path(containerd, "containerd", "certs_dir"),
            dial_timeout: v.string(containerd, "containerd", "dial_timeout"),
            patch_config: v.bool(containerd, "containerd", "patch_config"),
        };
        if let Err(e) = hostsd::options::parse_go_duration(&containerd_cfg.dial_timeout) {
            v.issue("containerd.dial_timeout", &e.to_string());
        }
        let registries = v.registries(root);
        let swarm = v.section(root, "swarm").unwrap_or(&empty);
        let swarm_cfg = v.swarm(swarm);
        let node = v.section(root, "node").unwrap_or(&empty);
        let node_cfg = v.node(node);
        let gpu = v.section(root, "gpu").unwrap_or(&empty);
        let gpu_cfg = v.gpu(gpu);
        let prewarm = v.section(root, "prewarm").unwrap_or(&empty);
        let prewarm_cfg = v.prewarm(prewarm);
        let sidecar_cfg = match root.get("sidecar") {
            Some(_) => v
                .section(root, "sidecar")
                .and_then(|t| v.sidecar(t, swarm_cfg.enabled)),
            None => None,
        };

        if let Some(default) = &mirror_cfg.default_registry {
            if !registries.iter().any(|r| &r.host == default) {
                v.issue(
                    "mirror.default_registry",
                    &format!("{default:?} is not the host of any [[registry]]"),
                );
            }
        }
        if mirror_cfg.listen == telemetry_cfg.listen {
            v.issue(
                "telemetry.listen",
                "must differ from mirror.listen (both are HTTP servers)",
            );
        }
        if store_cfg.max_size == 0 {
            v.issue("store.max_size", "must be larger than zero");
        }
        if store_cfg.scrub_every < Duration::from_secs(1) {
            v.issue("store.scrub_every", "must be at least 1s");
        }

        if v.issues.is_empty() {
            Ok(Config {
                mirror: mirror_cfg,
                store: store_cfg,
                admin: admin_cfg,
                telemetry: telemetry_cfg,
                origin: origin_cfg,
                containerd: containerd_cfg,
                swarm: swarm_cfg,
                node: node_cfg,
                gpu: gpu_cfg,
                prewarm: prewarm_cfg,
                sidecar: sidecar_cfg,
                registries,
                warnings: v.warnings,
            })
        } else {
            Err(v.issues)
        }
    }

    /// The registry config for a `?ns=` value, or `None` when it is not
    /// mirrored. With no registries configured, any syntactically valid host
    /// is mirrored over HTTPS.
    pub fn registry_for(&self, ns: &str) -> Option<RegistryConfig> {
        if self.registries.is_empty() {
            valid_host(ns).ok()?;
            return Some(RegistryConfig {
                host: ns.to_owned(),
                endpoint: default_endpoint(ns)?,
                credentials: None,
                ca_file: None,
                auth: Auth::default_for(ns),
            });
        }
        self.registries.iter().find(|r| r.host == ns).cloned()
    }
}

pub use crate::oci::valid_host;

fn default_store_dir() -> PathBuf {
    if running_as_root() {
        return PathBuf::from("/var/lib/damselfly");
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("damselfly");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache/damselfly"),
        None => std::env::temp_dir().join("damselfly"),
    }
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self is owned by the process's effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Reads a small secret file that the config names (a password, the
/// cluster key): a regular file of at most `limit` bytes. A device, a FIFO
/// or a directory is refused rather than read, so a config that names
/// `/dev/zero` or a pipe fails to load instead of hanging it.
pub(crate) fn read_secret(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    let not_regular = || Error::new(ErrorKind::InvalidInput, "not a regular file");
    // Before the open too: opening a FIFO blocks until a writer comes.
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(not_regular());
    }
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
