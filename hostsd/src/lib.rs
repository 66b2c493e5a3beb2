//! hostsd wires containerd to the damselfly mirror. For each registry it
//! writes `certs.d/<registry>/hosts.toml` naming the mirror as the first host,
//! in the directory containerd's CRI plugin actually reads, without breaking
//! what is already there and without a containerd restart.
//!
//! # Layout
//!
//! Read in this order:
//!
//! - [`options`]: [`ReconcileOptions`], the one input struct that the CLI and
//!   the daemon's `[containerd]` config section fill.
//! - [`containerd_config`]: reads containerd's config.toml (versions 1, 2 and
//!   3) for `config_path`, and for inline `registry.mirrors` /
//!   `registry.configs.*.tls` that containerd refuses next to it; the one
//!   optional patch (adding `config_path`).
//! - [`registry`]: registry names, their certs.d directory names
//!   (`host_port_`, `host:port`, `_default`) and default origins.
//! - [`hosts_file`]: hosts.toml decoded the way containerd 1.6 decodes it, and
//!   the managed file rendered (mirror first, a foreign file's hosts and
//!   settings after it).
//! - [`reconcile`]: plans every change, then applies it; also `remove`.
//! - [`fsops`]: atomic writes (temp file + rename + fsync), hard-link backups
//!   that `remove` renames back, byte for byte and inode for inode.
//! - [`ecr`] and [`imds`]: ECR hostnames from account ids and regions, or
//!   from this instance's IMDSv2 identity.
//! - [`check`]: what containerd will do per registry, and a mirror probe.
//! - [`report`]: what was done, for people and for logs.
//!
//! # Entry points
//!
//! ```no_run
//! let opts = hostsd::ReconcileOptions {
//!     registries: vec![hostsd::RegistrySpec::new("docker.io")],
//!     ..Default::default()
//! };
//! let report = hostsd::reconcile(&opts)?;
//! if report.restart_required {
//!     eprintln!("containerd must be restarted: {report}");
//! }
//! let check = hostsd::check(&opts)?;
//! assert!(check.ok());
//! # Ok::<(), hostsd::Error>(())
//! ```
//!
//! # Rules
//!
//! - A file hostsd owns starts with [`hosts_file::MANAGED_MARKER`]. A foreign
//!   file is hard-linked to `hosts.toml.damselfly-orig` before it is replaced,
//!   and its hosts and settings are kept after the mirror.
//! - Nothing is written unless the whole plan is valid, every file is checked
//!   with the TOML parser and containerd's decode rules before its rename,
//!   and an unchanged file is not touched.
//! - Files are declarative: a managed file whose registry is no longer in the
//!   options is put back (original restored, or deleted).

#![forbid(unsafe_code)]

pub mod check;
pub mod containerd_config;
pub mod ecr;
pub mod error;
pub mod fsops;
pub mod hosts_file;
pub mod imds;
pub mod options;
pub mod reconcile;
pub mod registry;
pub mod report;

pub use check::{check, CheckReport, MirrorStatus, RegistryCheck};
pub use error::{Error, ErrorKind};
pub use options::{EcrOptions, ReconcileOptions};
pub use reconcile::{reconcile, remove};
pub use registry::RegistrySpec;
pub use report::{Action, ConfigChange, FileChange, Report};
