//! Registry names as containerd sees them: which certs.d directory a registry
//! reads, and which origin `server` it falls back to.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::Error;

/// The certs.d directory that applies to every registry without its own.
pub const DEFAULT_DIR: &str = "_default";

/// One registry to route through the mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrySpec {
    /// The registry host as it appears in image references: `ghcr.io`,
    /// `127.0.0.1:5000`, `docker.io`, or `_default` for every registry.
    pub host: String,
    /// The origin to fall back to, instead of the default `https://<host>`
    /// (`https://registry-1.docker.io` for `docker.io`). Tests use plain-http
    /// origins: `127.0.0.1:5000=http://127.0.0.1:5000`.
    pub server: Option<String>,
}

impl RegistrySpec {
    /// A registry with the default origin.
    pub fn new(host: impl Into<String>) -> Self {
        RegistrySpec {
            host: host.into(),
            server: None,
        }
    }

    /// A registry with an explicit origin.
    pub fn with_server(host: impl Into<String>, server: impl Into<String>) -> Self {
        RegistrySpec {
            host: host.into(),
            server: Some(server.into()),
        }
    }

    /// Checks the host and the server override, and returns the `server` value
    /// to write: `None` for `_default`, whose origin containerd derives from
    /// each image reference.
    pub(crate) fn validate(&self) -> Result<Option<String>, Error> {
        validate_host(&self.host)?;
        match &self.server {
            Some(server) if self.host == DEFAULT_DIR => Err(Error::InvalidServer {
                registry: self.host.clone(),
                server: server.clone(),
                reason:
                    "_default must not name a server: it would send every registry to one origin"
                        .into(),
            }),
            Some(server) => {
                validate_url(server).map_err(|reason| Error::InvalidServer {
                    registry: self.host.clone(),
                    server: server.clone(),
                    reason,
                })?;
                Ok(Some(server.trim_end_matches('/').to_string()))
            }
            None => Ok(default_server(&self.host)),
        }
    }
}

impl FromStr for RegistrySpec {
    type Err = Error;

    /// `host` or `host=server`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let spec = match s.split_once('=') {
            Some((host, server)) => RegistrySpec::with_server(host.trim(), server.trim()),
            None => RegistrySpec::new(s.trim()),
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// containerd's own fallback when a hosts.toml has no `server`: `docker.io` is
/// served by `registry-1.docker.io`, every other registry by itself over https.
pub fn default_server(host: &str) -> Option<String> {
    match host {
        DEFAULT_DIR => None,
        "docker.io" => Some("https://registry-1.docker.io".into()),
        _ => Some(format!("https://{host}")),
    }
}

/// The directory names containerd tries for `host` inside one certs.d root, in
/// its order: `host_port_` (only for a host with a port), `host`, `_default`.
/// (containerd `remotes/docker/config`, `hostPaths` on unix.)
pub fn candidate_dirs(root: &Path, host: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::with_capacity(3);
    if host != DEFAULT_DIR {
        if let Some(underscored) = port_dir_name(host) {
            dirs.push(root.join(underscored));
        }
        dirs.push(root.join(host));
    }
    dirs.push(root.join(DEFAULT_DIR));
    dirs
}

/// `127.0.0.1:5000` → `127.0.0.1_5000_`, containerd's alternative directory
/// name for hosts with a port (a colon is awkward on some filesystems).
pub fn port_dir_name(host: &str) -> Option<String> {
    // Faithful to containerd's `hostDirectory`, IPv6 brackets included.
    let idx = host.rfind(':')?;
    if idx == 0 {
        return None;
    }
    Some(format!("{}_{}_", &host[..idx], &host[idx + 1..]))
}

/// The directory hostsd writes for `host` under `root`. containerd prefers
/// `host_port_` over `host:port`, so an existing `host_port_` directory is used
/// rather than shadowed by it.
pub fn target_dir(root: &Path, host: &str) -> PathBuf {
    if host != DEFAULT_DIR {
        if let Some(underscored) = port_dir_name(host) {
            let alt = root.join(underscored);
            if alt.is_dir() {
                return alt;
            }
        }
    }
    root.join(host)
}

/// A registry host must be a single path component that containerd could see
/// in an image reference: a DNS name, an IPv4 address or a bracketed IPv6
/// address, with an optional port.
pub fn validate_host(host: &str) -> Result<(), Error> {
    let bad = |reason: &str| Error::InvalidRegistry {
        name: host.to_string(),
        reason: reason.to_string(),
    };
    if host == DEFAULT_DIR {
        return Ok(());
    }
    if host.is_empty() {
        return Err(bad("empty"));
    }
    if host.contains("://") {
        return Err(bad(
            "give the registry host only (as in image references), without a scheme; \
             use host=URL to set its origin",
        ));
    }
    if host.contains('/') {
        return Err(bad("a registry host has no path"));
    }
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("unclosed '[' in an IPv6 address"))?;
        if inside.is_empty()
            || !inside
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Err(bad("not an IPv6 address"));
        }
        match after {
            "" => (inside, None),
            p => (
                inside,
                Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
            ),
        }
    } else {
        match host.split_once(':') {
            Some((n, p)) => {
                let name = validate_dns_name(n).map_err(|r| bad(&r))?;
                (name, Some(p))
            }
            None => (validate_dns_name(host).map_err(|r| bad(&r))?, None),
        }
    };
    let _ = name;
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p > 0 && !port.starts_with('0') => {}
            _ => return Err(bad("port must be a number from 1 to 65535")),
        }
    }
    Ok(())
}

fn validate_dns_name(name: &str) -> Result<&str, String> {
    if name.is_empty() || name.len() > 253 {
        return Err("host name must be 1 to 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label in host name".into());
        }
        if label.len() > 63 {
            return Err("host name label longer than 63 characters".into());
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err("host names use letters, digits, '-' and '.' only".into());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a host name label cannot start or end with '-'".into());
        }
    }
    Ok(name)
}

/// An origin or mirror URL: `http(s)://host[:port][/path]`, no query, no
/// credentials, nothing that needs quoting in TOML.
pub(crate) fn validate_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        return Err("no host".into());
    }
    if authority.contains('@') {
        return Err("credentials do not belong in the URL".into());
    }
    if url
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\\' | '?' | '#'))
    {
        return Err("contains whitespace, quotes, '?' or '#'".into());
    }
    validate_host(authority).map_err(|e| match e {
        Error::InvalidRegistry { reason, .. } => reason,
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_table() {
        let ok = [
            "docker.io",
            "ghcr.io",
            "127.0.0.1:5000",
            "localhost:5000",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com",
            "[::1]:5000",
            "[fd00::1]",
            "_default",
        ];
        for h in ok {
            validate_host(h).unwrap_or_else(|e| panic!("{h}: {e}"));
        }
        let bad = [
            "",
            "https://ghcr.io",
            "ghcr.io/foo",
            "..",
            ".",
            "a..b",
            "host:0",
            "host:65536",
            "host:abc",
            "-bad.io",
            "[::1",
            "has space.io",
            "quote\".io",
        ];
        for h in bad {
            assert!(validate_host(h).is_err(), "{h:?} should be rejected");
        }
    }

    #[test]
    fn default_servers() {
        assert_eq!(
            default_server("docker.io").as_deref(),
            Some("https://registry-1.docker.io")
        );
        assert_eq!(
            default_server("ghcr.io").as_deref(),
            Some("https://ghcr.io")
        );
        assert_eq!(
            default_server("127.0.0.1:5000").as_deref(),
            Some("https://127.0.0.1:5000")
        );
        assert_eq!(default_server("_default"), None);
    }

    #[test]
    fn specs_parse() {
        let s: RegistrySpec = "127.0.0.1:5000=http://127.0.0.1:5000/".parse().unwrap();
        assert_eq!(
            s.validate().unwrap().as_deref(),
            Some("http://127.0.0.1:5000")
        );
        assert!("_default=https://x.io".parse::<RegistrySpec>().is_err());
        assert!("ghcr.io=ftp://x".parse::<RegistrySpec>().is_err());
        assert!("ghcr.io=https://u:p@x.io".parse::<RegistrySpec>().is_err());
        let d: RegistrySpec = "docker.io".parse().unwrap();
        assert_eq!(
            d.validate().unwrap().as_deref(),
            Some("https://registry-1.docker.io")
        );
    }

    #[test]
    fn containerd_dir_order() {
        let root = Path::new("/c");
        assert_eq!(
            candidate_dirs(root, "127.0.0.1:5000"),
            vec![
                PathBuf::from("/c/127.0.0.1_5000_"),
                PathBuf::from("/c/127.0.0.1:5000"),
                PathBuf::from("/c/_default"),
            ]
        );
        assert_eq!(
            candidate_dirs(root, "docker.io"),
            vec![PathBuf::from("/c/docker.io"), PathBuf::from("/c/_default")]
        );
        assert_eq!(
            candidate_dirs(root, "_default"),
            vec![PathBuf::from("/c/_default")]
        );
        assert_eq!(port_dir_name("[::1]").as_deref(), Some("[:_1]_"));
        assert_eq!(port_dir_name("[::1]:5000").as_deref(), Some("[::1]_5000_"));
    }
}
