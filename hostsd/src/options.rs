//! The inputs of `reconcile`, `remove` and `check`, as one plain struct that
//! both the `hostsd` CLI and the daemon's `[containerd]` config section fill.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::Error;
use crate::registry::{validate_url, RegistrySpec};

/// Where containerd's config lives unless told otherwise.
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// The damselfly mirror on every node.
pub const DEFAULT_MIRROR: &str = "http://127.0.0.1:4001";
/// How long containerd waits for a TCP connection to the mirror before it
/// tries the next host. A refused connection (daemon down) falls back at once
/// whatever this says; the timeout matters when connects hang, as they do when
/// a wedged daemon's listen queue is full and the kernel drops SYNs. A loopback
/// connect takes microseconds, and Linux retransmits a dropped SYN only after
/// 1 s, so 500 ms gives up before that retry instead of stalling every blob.
/// containerd reads it from 2.1 on; older versions ignore the key.
pub const DEFAULT_DIAL_TIMEOUT: &str = "500ms";
/// EC2 instance metadata, IPv4.
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";

/// Everything `reconcile`, `remove` and `check` need. Each field documents its
/// default, which [`ReconcileOptions::default`] fills in.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconcileOptions {
    /// containerd's config file, read to find `config_path`.
    /// Default: `/etc/containerd/config.toml`.
    pub containerd_config: PathBuf,
    /// Write here instead of the first `config_path` entry, and do not require
    /// containerd's config to name it (problems found there become warnings).
    /// For `ctr --hosts-dir` and tests. Default: none.
    pub certs_dir: Option<PathBuf>,
    /// The mirror URL, written as the first `[host."..."]` table.
    /// Default: `http://127.0.0.1:4001`.
    pub mirror: String,
    /// Registries to route through the mirror. Default: none.
    pub registries: Vec<RegistrySpec>,
    /// containerd's `dial_timeout` for the mirror, a Go duration such as
    /// `"500ms"`. Default: `"500ms"` (see [`DEFAULT_DIAL_TIMEOUT`]).
    pub dial_timeout: String,
    /// Add `config_path` to containerd's config when it has none, keeping a
    /// backup. This one change needs a containerd restart. Default: false.
    pub patch_config: bool,
    /// ECR registries to add to `registries`.
    pub ecr: EcrOptions,
    /// Plan and report, write nothing. Default: false.
    pub dry_run: bool,
    /// `remove` only: also restore config.toml if hostsd patched it.
    /// Default: false.
    pub restore_config: bool,
    /// How long `check` waits for the mirror to answer. Default: 1 s.
    pub probe_timeout: Duration,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            containerd_config: PathBuf::from(DEFAULT_CONTAINERD_CONFIG),
            certs_dir: None,
            mirror: DEFAULT_MIRROR.to_string(),
            registries: Vec::new(),
            dial_timeout: DEFAULT_DIAL_TIMEOUT.to_string(),
            patch_config: false,
            ecr: EcrOptions::default(),
            dry_run: false,
            restore_config: false,
            probe_timeout: Duration::from_secs(1),
        }
    }
}

/// ECR registry hostnames, from config or from EC2 instance metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct EcrOptions {
    /// 12-digit AWS account ids. Default: none.
    pub accounts: Vec<String>,
    /// Regions, such as `us-east-1` or `cn-north-1`. Every account is paired
    /// with every region. Default: none.
    pub regions: Vec<String>,
    /// Also write the `dkr.ecr-fips` hostnames where the region has them.
    /// Default: false.
    pub fips: bool,
    /// Add this instance's own account and region, read from IMDSv2.
    /// Default: false.
    pub discover: bool,
    /// The IMDS base URL. Default: `http://169.254.169.254`.
    pub imds_endpoint: String,
    /// Per-request IMDS timeout. Default: 2 s.
    pub imds_timeout: Duration,
}

impl Default for EcrOptions {
    fn default() -> Self {
        EcrOptions {
            accounts: Vec::new(),
            regions: Vec::new(),
            fips: false,
            discover: false,
            imds_endpoint: DEFAULT_IMDS_ENDPOINT.to_string(),
            imds_timeout: Duration::from_secs(2),
        }
    }
}

/// The mirror URL as it is written in the `[host."..."]` key: validated, with
/// no trailing slash so that reruns compare equal.
pub(crate) fn normalized_mirror(url: &str) -> Result<String, Error> {
    validate_url(url).map_err(|reason| Error::InvalidMirror {
        url: url.to_string(),
        reason,
    })?;
    Ok(url.trim_end_matches('/').to_string())
}

/// Parses a Go duration (`time.ParseDuration`): `300ms`, `1.5s`, `1m30s`.
/// containerd 2.1+ rejects the whole hosts.toml if this does not parse, so it
/// is checked here. Zero and negative values are refused: Go would read them as
/// "no timeout".
pub fn parse_go_duration(s: &str) -> Result<Duration, Error> {
    let bad = |reason: &str| Error::InvalidDialTimeout {
        value: s.to_string(),
        reason: reason.to_string(),
    };
    if s.starts_with('-') {
        return Err(bad("must be positive"));
    }
    let body = s.strip_prefix('+').unwrap_or(s);
    if body.is_empty() {
        return Err(bad("empty"));
    }
    let mut total = 0f64;
    let mut rest = body;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| bad("missing unit (ns, us, ms, s, m, h)"))?;
        let (num, after) = rest.split_at(num_len);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(bad("expected a number before the unit"));
        }
        let value: f64 = num.parse().map_err(|_| bad("bad number"))?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad("unknown unit: use ns, us, ms, s, m or h")),
        };
        total += value * scale;
        rest = next;
    }
    if total <= 0.0 {
        return Err(bad("must be positive"));
    }
    if total > 3600.0 {
        return Err(bad(
            "longer than an hour: the mirror would never be skipped",
        ));
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ok = [
            ("500ms", Duration::from_millis(500)),
            ("1s", Duration::from_secs(1)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m30s", Duration::from_secs(90)),
            ("250us", Duration::from_micros(250)),
            ("+2s", Duration::from_secs(2)),
        ];
        for (s, d) in ok {
            let got = parse_go_duration(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert!((got.as_secs_f64() - d.as_secs_f64()).abs() < 1e-9, "{s}");
        }
        for s in ["", "1", "0s", "-1s", "1sec", "ms", "1..5s", "2h", "1 s"] {
            assert!(parse_go_duration(s).is_err(), "{s:?} should fail");
        }
    }

    #[test]
    fn mirror_urls() {
        assert_eq!(
            normalized_mirror("http://127.0.0.1:4001/").unwrap(),
            "http://127.0.0.1:4001"
        );
        assert!(normalized_mirror("127.0.0.1:4001").is_err());
        assert!(normalized_mirror("http://").is_err());
        assert!(normalized_mirror("http://a b").is_err());
    }
}
