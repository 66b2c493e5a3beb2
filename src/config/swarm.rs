//! The `[swarm]` section, and the swarm's vocabulary that config needs to
//! validate it: [`Role`], the [`Bootstrap`] address grammar and the cluster
//! key file ([`load_psk`]). They live here, at the bottom of the layers, so
//! that config imports nothing above it; `swarm` re-exports them.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use super::Validator;

/// What a node is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Pulls what its containerd asks for, and serves peers.
    #[default]
    Node,
    /// Also keeps full copies of what it sees the cluster pull, so the cache
    /// survives when every other node has scaled away.
    Seed,
    /// The scaling sidecar (`damselfly sidecar`): publishes warm intents,
    /// stores and serves nothing. Daemons before this role existed cannot
    /// decode its heartbeat and so never count it as a member.
    Sidecar,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Seed => "seed",
            Role::Sidecar => "sidecar",
        }
    }

    /// Whether members of this role hold blobs and answer piece requests:
    /// only those are piece owners, holders, or peers to ask.
    pub fn serves_data(self) -> bool {
        !matches!(self, Role::Sidecar)
    }
}

/// Where to find the rest of the cluster at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// A libp2p multiaddr, e.g. `/ip4/10.0.0.5/tcp/4003` (a trailing
    /// `/p2p/<peer id>` is allowed and then checked).
    Addr(Multiaddr),
    /// A DNS name re-resolved every `dns_refresh` (e.g. a Kubernetes headless
    /// Service); every address it resolves to is dialed on `port`.
    Dns { host: String, port: u16 },
}

/// A `swarm.bootstrap` entry that is neither a TCP multiaddr nor
/// `dns:host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid bootstrap entry {input:?}: {reason}")]
pub struct BootstrapError {
    pub input: String,
    pub reason: String,
}

impl FromStr for Bootstrap {
    type Err = BootstrapError;

    /// Accepts a multiaddr (`/ip4/10.0.0.5/tcp/4003`, `/dns4/seed/tcp/4003`)
    /// or `dns:host:port`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = |reason: &str| BootstrapError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = s.strip_prefix("dns:") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| {
                bad("expected dns:host:port, e.g. dns:damselfly.kube-system.svc:4003")
            })?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(bad("the host is empty; expected dns:host:port"));
            }
            let port: u16 = port
                .parse()
                .map_err(|_| bad("the port is not a number in 1-65535"))?;
            if port == 0 {
                return Err(bad("port 0 cannot be dialed"));
            }
            return Ok(Bootstrap::Dns {
                host: host.to_string(),
                port,
            });
        }
        if !s.starts_with('/') {
            return Err(bad(
                "expected a multiaddr such as /ip4/10.0.0.5/tcp/4003 or dns:host:port",
            ));
        }
        let addr: Multiaddr = s
            .parse()
            .map_err(|e: libp2p::multiaddr::Error| bad(&format!("not a valid multiaddr: {e}")))?;
        if !addr.iter().any(|p| matches!(p, Protocol::Tcp(_))) {
            return Err(bad(
                "the multiaddr has no /tcp/<port>; the control plane only speaks TCP",
            ));
        }
        Ok(Bootstrap::Addr(addr))
    }
}

impl fmt::Display for Bootstrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bootstrap::Addr(a) => write!(f, "{a}"),
            Bootstrap::Dns { host, port } => write!(f, "dns:{host}:{port}"),
        }
    }
}

/// A cluster key file that cannot be used. The messages name the file but
/// never echo its content.
#[derive(Debug, thiserror::Error)]
pub enum ClusterKeyError {
    #[error("cluster key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cluster key file {path}: {reason}; expected the swarm.key format \
         (\"/key/swarm/psk/1.0.0/\", \"/base16/\", then 64 hex characters, one per line) \
         or a file holding just 64 hex characters"
    )]
    Format { path: PathBuf, reason: &'static str },
}

/// Reads a cluster key: the libp2p/IPFS `swarm.key` format or 64 bare hex
/// characters. Errors name the file but never echo its content.
pub fn load_psk(path: &Path) -> Result<[u8; 32], ClusterKeyError> {
    // The swarm.key format is 87 bytes; room for whitespace, no more.
    let bytes = super::read_secret(path, 4096).map_err(|source| ClusterKeyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    warn_if_readable_by_others(path, "cluster key");
    let bad = |reason| ClusterKeyError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("the file is not text"))?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let hex_line = match lines.as_slice() {
        [hex] => *hex,
        ["/key/swarm/psk/1.0.0/", "/base16/", hex] => *hex,
        ["/key/swarm/psk/1.0.0/", _, _] => {
            return Err(bad("only the /base16/ encoding is supported"))
        }
        [] => return Err(bad("the file is empty")),
        _ => return Err(bad("unrecognised layout")),
    };
    if hex_line.len() != 64 {
        return Err(bad("the key is not exactly 64 hex characters"));
    }
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_line, &mut key)
        .map_err(|_| bad("the key contains characters other than 0-9, a-f"))?;
    Ok(key)
}

/// Logs a warning when a secret (`what`: the cluster key, a node identity)
/// is readable by group or others.
pub fn warn_if_readable_by_others(path: &Path, what: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "{what} file is accessible to group/others; chmod 600 it");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what);
}

/// The peer-to-peer layer (see `swarm`).
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    pub enabled: bool,
    /// The keys that turned the swarm on when `enabled` was not written
    /// (empty when it was, or when the swarm is off).
    pub implied_by: Vec<&'static str>,
    pub listen: String,
    pub data_listen: SocketAddr,
    pub advertise: Option<std::net::IpAddr>,
    pub bootstrap: Vec<String>,
    pub dns_refresh: Duration,
    /// `None` only with `insecure_no_cluster_key`.
    pub cluster_key_file: Option<PathBuf>,
    pub data_tls: bool,
    pub mdns: bool,
    pub role: Role,
    pub piece_size: u64,
    /// Bytes per second; 0 is unlimited.
    pub upload_limit: u64,
    pub download_limit: u64,
    pub max_piece_transfers: usize,
    /// Children per node in each piece's relay tree; 0: owners only.
    pub relay_fanout: usize,
    pub max_uploads: usize,
    pub hedge_after: Duration,
    pub stall_timeout: Duration,
    pub heartbeat: Duration,
}

impl Validator {
    pub(super) fn swarm(&mut self, t: &Table) -> SwarmConfig {
        const S: &str = "swarm";
        // A wrong type was reported; it still counts as written, so the keys
        // that would imply the swarm raise no second issue.
        let explicit = t
            .get("enabled")
            .map(|_| self.opt_bool(t, S, "enabled").unwrap_or(false));
        let listen = self.string(t, S, "listen");
        if let Err(e) = listen.parse::<libp2p::Multiaddr>() {
            self.issue(
                "swarm.listen",
                &format!("{listen:?} is not a multiaddr: {e}"),
            );
        }
        let data_listen = self.addr(t, S, "data_listen");
        let advertise = self.opt_string(t, S, "advertise").and_then(|a| {
            a.parse()
                .map_err(|_| self.issue("swarm.advertise", &format!("{a:?} is not an IP address")))
                .ok()
        });
        let bootstrap = match t.get("bootstrap") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| match item {
                    Value::String(s) => match Bootstrap::from_str(s) {
                        Ok(_) => Some(s.clone()),
                        Err(e) => {
                            self.issue(&format!("swarm.bootstrap[{i}]"), &e.to_string());
                            None
                        }
                    },
                    other => {
                        self.issue(
                            &format!("swarm.bootstrap[{i}]"),
                            &format!("must be a string, not {}", other.type_str()),
                        );
                        None
                    }
                })
                .collect(),
            Some(other) => {
                self.issue(
                    "swarm.bootstrap",
                    &format!("must be a list of strings, not {}", other.type_str()),
                );
                Vec::new()
            }
        };
        let insecure = self.bool(t, S, "insecure_no_cluster_key");
        let cluster_key_file = self.opt_path(t, S, "cluster_key_file");
        let mdns = self.bool(t, S, "mdns");
        // A section that says how to join a cluster means to join it: a
        // ConfigMap with bootstrap and a key but no `enabled = true` once left
        // a lab's swarm silently off (8x the origin's bytes).
        let joins: Vec<&'static str> = [
            ("bootstrap", !bootstrap.is_empty()),
            ("cluster_key_file", cluster_key_file.is_some()),
            ("insecure_no_cluster_key", insecure),
            ("mdns", mdns),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        let enabled = explicit.unwrap_or(!joins.is_empty());
        match explicit {
            Some(false) if !joins.is_empty() => self.warn(
                "swarm.enabled",
                &format!(
                    "is false, so [swarm] {} are not used: this node is a single-node mirror",
                    joins.join(", ")
                ),
            ),
            None if joins.is_empty() && !t.is_empty() => {
                let mut keys: Vec<&str> = t.keys().map(String::as_str).collect();
                keys.sort_unstable();
                self.warn(
                    "swarm",
                    &format!(
                        "sets {} but nothing to join with (bootstrap, cluster_key_file, mdns):                          the swarm is off; write enabled = true to turn it on",
                        keys.join(", ")
                    ),
                );
            }
            _ => {}
        }
        match (&cluster_key_file, insecure) {
            (Some(_), true) => self.issue(
                "swarm.insecure_no_cluster_key",
                "contradicts swarm.cluster_key_file: set one or the other",
            ),
            (None, false) if enabled => self.issue(
                "swarm.cluster_key_file",
                "is required when the swarm is enabled (membership is closed by a pre-shared key); \
                 set swarm.insecure_no_cluster_key = true only on a trusted network",
            ),
            (Some(path), false) if enabled => {
                if let Err(e) = std::fs::metadata(path) {
                    self.issue(
                        "swarm.cluster_key_file",
                        &format!("cannot read {}: {e}", path.display()),
                    );
                } else if let Err(e) = load_psk(path) {
                    self.issue("swarm.cluster_key_file", &e.to_string());
                }
            }
            _ => {}
        }
        let role = match self.string(t, S, "role").as_str() {
            "node" => Role::Node,
            "seed" => Role::Seed,
            other => {
                self.issue(
                    "swarm.role",
                    &format!("must be \"node\" or \"seed\", not {other:?}"),
                );
                Role::Node
            }
        };
        let piece_size = self.size(t, S, "piece_size");
        if !(1 << 20..=64 << 20).contains(&piece_size) {
            self.issue("swarm.piece_size", "must be between 1MiB and 64MiB");
        }
        let hedge_after = self.duration(t, S, "hedge_after");
        let stall_timeout = self.duration(t, S, "stall_timeout");
        let heartbeat = self.duration(t, S, "heartbeat");
        for (key, d) in [
            ("hedge_after", hedge_after),
            ("stall_timeout", stall_timeout),
            ("heartbeat", heartbeat),
        ] {
            if d < Duration::from_millis(10) {
                self.issue(&format!("swarm.{key}"), "must be at least 10ms");
            }
        }
        SwarmConfig {
            enabled,
            implied_by: if explicit.is_none() && enabled {
                joins
            } else {
                Vec::new()
            },
            listen,
            data_listen,
            advertise,
            bootstrap,
            dns_refresh: self.duration(t, S, "dns_refresh"),
            cluster_key_file: if insecure { None } else { cluster_key_file },
            data_tls: self.bool(t, S, "data_tls"),
            mdns,
            role,
            piece_size,
            upload_limit: self.size(t, S, "upload_limit"),
            download_limit: self.size(t, S, "download_limit"),
            max_piece_transfers: self.integer(t, S, "max_piece_transfers", 1..=256) as usize,
            relay_fanout: self.integer(t, S, "relay_fanout", 0..=16) as usize,
            max_uploads: self.integer(t, S, "max_uploads", 1..=1024) as usize,
            hedge_after,
            stall_timeout,
            heartbeat,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_formats() {
        let dir = tempfile::tempdir().unwrap();
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let mut want = [0u8; 32];
        hex::decode_to_slice(hex, &mut want).unwrap();

        let swarm_key = dir.path().join("swarm.key");
        std::fs::write(
            &swarm_key,
            format!("/key/swarm/psk/1.0.0/\n/base16/\n{hex}\n"),
        )
        .unwrap();
        assert_eq!(load_psk(&swarm_key).unwrap(), want);

        let bare = dir.path().join("bare");
        std::fs::write(&bare, format!("  {}\n\n", hex.to_uppercase())).unwrap();
        assert_eq!(load_psk(&bare).unwrap(), want);

        for (name, content) in [
            ("short", &hex[..60]),
            (
                "nonhex",
                "zz112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
            ),
            ("b64", "/key/swarm/psk/1.0.0/\n/base64/\nABCD"),
            ("empty", ""),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            let err = load_psk(&p).unwrap_err().to_string();
            assert!(err.contains(&p.display().to_string()), "{err}");
            assert!(!err.contains("112233"), "error echoes the key: {err}");
        }
        let missing = dir.path().join("missing");
        assert!(load_psk(&missing)
            .unwrap_err()
            .to_string()
            .contains("missing"));
    }

    #[test]
    fn bootstrap_parsing() {
        assert_eq!(
            "dns:damselfly.kube-system.svc:4003"
                .parse::<Bootstrap>()
                .unwrap(),
            Bootstrap::Dns {
                host: "damselfly.kube-system.svc".into(),
                port: 4003
            }
        );
        let b: Bootstrap = "/ip4/10.0.0.5/tcp/4003".parse().unwrap();
        assert_eq!(b.to_string(), "/ip4/10.0.0.5/tcp/4003");
        for bad in [
            "dns:host",
            "dns::4003",
            "dns:host:99999",
            "10.0.0.5:4003",
            "/ip4/10.0.0.5/udp/4003",
            "/ip4/nope",
        ] {
            let err = bad.parse::<Bootstrap>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
