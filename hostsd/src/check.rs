//! `check`: what containerd will do for each registry. Which hosts.toml it
//! reads, which hosts it tries in which order, whether the mirror answers, and
//! anything that would make it ignore the file.

use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::error::Error;
use crate::hosts_file::{self, HostEntry, HOSTS_FILE};
use crate::options::{normalized_mirror, ReconcileOptions};
use crate::reconcile::{inspect, wanted_registries, Wanted};
use crate::registry::{self, DEFAULT_DIR};

/// Whether the mirror answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorStatus {
    /// It answered; `detail` says how, `server` is its `Server` header.
    Live {
        detail: String,
        server: Option<String>,
    },
    /// It did not; `reason` says why.
    Down { reason: String },
}

impl MirrorStatus {
    pub fn is_live(&self) -> bool {
        matches!(self, MirrorStatus::Live { .. })
    }
}

/// containerd's view of one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryCheck {
    pub registry: String,
    /// The hosts.toml containerd reads for it; `None` if it reads none.
    pub file: Option<PathBuf>,
    /// The file is hostsd's.
    pub managed: bool,
    /// The hosts containerd tries, in order, `server` last.
    pub hosts: Vec<HostEntry>,
    /// Facts that are fine but worth knowing (e.g. `_default` applies).
    pub notes: Vec<String>,
    /// Why this registry does not go through the mirror.
    pub problems: Vec<String>,
}

impl RegistryCheck {
    /// Routed to the mirror: the mirror is the first host, can pull and
    /// resolve, and nothing stops containerd from reading the file.
    pub fn routed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The result of `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub mirror: String,
    pub mirror_status: MirrorStatus,
    /// The certs.d roots, in containerd's search order.
    pub roots: Vec<PathBuf>,
    /// Problems with containerd's config that affect every registry.
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
    pub registries: Vec<RegistryCheck>,
}

impl CheckReport {
    /// True only when every registry is routed to a live mirror.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
            && self.mirror_status.is_live()
            && self.registries.iter().all(RegistryCheck::routed)
    }
}

/// Reports what containerd will do for every registry in `opts`. Only
/// malformed options (or unreadable files) are errors; everything about the
/// node's state is in the report.
pub fn check(opts: &ReconcileOptions) -> Result<CheckReport, Error> {
    let mirror = normalized_mirror(&opts.mirror)?;
    let mut insp = inspect(opts)?;
    let global = insp.problem.take().map(|e| e.to_string());
    let (wanted, notes) = wanted_registries(opts)?;
    let mut warnings = insp.warnings;
    warnings.extend(notes);
    let mirror_status = probe_mirror(&mirror, opts.probe_timeout);
    if let Some(w) = foreign_listener(&mirror, &mirror_status) {
        warnings.push(w);
    }
    let registries = wanted
        .iter()
        .map(|w| check_registry(&insp.roots, w, &mirror))
        .collect();
    Ok(CheckReport {
        mirror,
        mirror_status,
        roots: insp.roots,
        problems: global.into_iter().collect(),
        warnings,
        registries,
    })
}

fn check_registry(roots: &[PathBuf], w: &Wanted, mirror: &str) -> RegistryCheck {
    let mut rc = RegistryCheck {
        registry: w.host.clone(),
        file: None,
        managed: false,
        hosts: Vec::new(),
        notes: Vec::new(),
        problems: Vec::new(),
    };
    let origin = w
        .default_server
        .clone()
        .unwrap_or_else(|| "each registry's own origin".into());
    // containerd takes the first root that has any candidate directory.
    let found = roots.iter().enumerate().find_map(|(i, root)| {
        registry::candidate_dirs(root, &w.host)
            .into_iter()
            .find(|d| d.exists())
            .map(|d| (i, d))
    });
    let Some((root_index, dir)) = found else {
        rc.problems.push(format!(
            "no directory for it in {}: containerd goes straight to {origin}",
            list(roots)
        ));
        return rc;
    };
    if root_index > 0 {
        rc.notes.push(format!(
            "found in config_path entry {} ({}); the earlier entries have nothing for it",
            root_index + 1,
            roots[root_index].display()
        ));
    }
    if w.host != DEFAULT_DIR && dir.file_name().is_some_and(|n| n == DEFAULT_DIR) {
        rc.notes
            .push("no directory of its own: containerd uses _default".into());
    }
    let file = dir.join(HOSTS_FILE);
    let text = match std::fs::read(&file) {
        Ok(b) if !b.is_empty() => b,
        _ => {
            rc.problems.push(format!(
                "{} has no hosts.toml (or an empty one): containerd uses only the certificate \
                 files there and goes straight to {origin}{}",
                dir.display(),
                if w.host != DEFAULT_DIR && !dir.ends_with(DEFAULT_DIR) {
                    "; the directory also hides _default"
                } else {
                    ""
                }
            ));
            return rc;
        }
    };
    rc.file = Some(file.clone());
    rc.managed = hosts_file::is_managed(&text);
    let text = String::from_utf8_lossy(&text);
    let hosts = match hosts_file::decode(&text) {
        Ok(h) => h,
        Err(e) => {
            rc.problems.push(format!(
                "containerd cannot decode {}: {e}; it ignores the file and goes straight to {origin}",
                file.display()
            ));
            return rc;
        }
    };
    match hosts.iter().position(|h| h.origin() == mirror) {
        None => rc
            .problems
            .push(format!("the mirror {mirror} is not one of its hosts")),
        Some(0) => {
            let caps = hosts[0].capabilities;
            if !(caps.pull && caps.resolve) {
                rc.problems.push(format!(
                    "the mirror has capabilities [{caps}]; it needs pull and resolve"
                ));
            }
        }
        Some(i) => rc.problems.push(format!(
            "the mirror is host {} of {}; containerd tries {} first",
            i + 1,
            hosts.len(),
            hosts[0].origin()
        )),
    }
    rc.hosts = hosts;
    rc
}

/// GET `<mirror>/v2/` with a short timeout. Any HTTP answer counts as live,
/// whatever the status: it shows a server is listening and speaking HTTP,
/// and containerd falls back on 404s and 5xx anyway. An https mirror is only
/// connected to (hostsd carries no TLS stack).
pub fn probe_mirror(mirror: &str, timeout: Duration) -> MirrorStatus {
    if let Some(rest) = mirror.strip_prefix("https://") {
        let authority = rest.split('/').next().unwrap_or(rest);
        let addr = if authority.ends_with(']') || !authority.contains(':') {
            format!("{authority}:443")
        } else {
            authority.to_string()
        };
        let addrs = match addr.to_socket_addrs() {
            Ok(a) => a.collect::<Vec<_>>(),
            Err(e) => {
                return MirrorStatus::Down {
                    reason: e.to_string(),
                }
            }
        };
        return match addrs
            .iter()
            .find_map(|a| TcpStream::connect_timeout(a, timeout).ok())
        {
            Some(_) => MirrorStatus::Live {
                detail: "TCP connect (https is not probed further)".into(),
                server: None,
            },
            None => MirrorStatus::Down {
                reason: format!("no TCP connection to {addr}"),
            },
        };
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    match agent.get(format!("{mirror}/v2/")).call() {
        Ok(resp) => MirrorStatus::Live {
            detail: format!("HTTP {} on GET /v2/", resp.status().as_u16()),
            server: resp
                .headers()
                .get("server")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        },
        Err(ureq::Error::Timeout(_)) => MirrorStatus::Down {
            reason: format!("no answer to GET /v2/ within {timeout:?}"),
        },
        Err(e) => MirrorStatus::Down {
            reason: e.to_string(),
        },
    }
}

/// The damselfly mirror answers `/v2/` with `Server: damselfly/<version>`.
/// Anything else on its address is another program holding the port, such
/// as a Dragonfly dfdaemon or a Spegel left from an earlier install:
/// containerd would pull through it, and damselfly cannot listen there.
fn foreign_listener(mirror: &str, status: &MirrorStatus) -> Option<String> {
    let MirrorStatus::Live { server, detail } = status else {
        return None;
    };
    if mirror.starts_with("https://")
        || server
            .as_deref()
            .is_some_and(|s| s.starts_with("damselfly"))
    {
        return None;
    }
    Some(format!(
        "{mirror} answers ({detail}, Server: {}) but not as damselfly: another program holds the \
         port (a Dragonfly dfdaemon or another mirror?); containerd sends its pulls there, and the \
         damselfly daemon cannot listen on it",
        server.as_deref().unwrap_or("none")
    ))
}

fn list(roots: &[PathBuf]) -> String {
    if roots.is_empty() {
        return "(no config_path)".into();
    }
    roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "certs.d (search order): {}", list(&self.roots))?;
        match &self.mirror_status {
            MirrorStatus::Live { detail, .. } => {
                writeln!(f, "mirror {}: live ({detail})", self.mirror)?
            }
            MirrorStatus::Down { reason } => {
                writeln!(f, "mirror {}: DOWN ({reason})", self.mirror)?
            }
        }
        for p in &self.problems {
            writeln!(f, "problem: {p}")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        for r in &self.registries {
            let ok = r.routed() && self.problems.is_empty() && self.mirror_status.is_live();
            let file = match &r.file {
                Some(p) => format!(
                    "{}{}",
                    p.display(),
                    if r.managed {
                        " (managed)"
                    } else {
                        " (not hostsd's)"
                    }
                ),
                None => "no hosts.toml".into(),
            };
            writeln!(
                f,
                "{} {}: {file}",
                if ok { "OK  " } else { "FAIL" },
                r.registry
            )?;
            for (i, h) in r.hosts.iter().enumerate() {
                writeln!(
                    f,
                    "       {}. {} [{}]{}",
                    i + 1,
                    h.origin(),
                    h.capabilities,
                    if h.is_server { " (server)" } else { "" }
                )?;
            }
            for n in &r.notes {
                writeln!(f, "       note: {n}")?;
            }
            for p in &r.problems {
                writeln!(f, "       problem: {p}")?;
            }
        }
        Ok(())
    }
}
