//! The one error type of the library. Each variant carries the path or value
//! it is about, so that the CLI can print one clear line and the daemon can log
//! structured fields.

use std::path::PathBuf;

/// Everything that can stop `reconcile`, `remove` or `check`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// containerd's config.toml is not valid TOML, or a key has the wrong type.
    #[error("containerd config {}: {reason}", path.display())]
    ContainerdConfig { path: PathBuf, reason: String },

    /// The config names no `config_path`, so the CRI plugin reads no hosts.toml.
    #[error(
        "containerd config {}{note}: no `config_path` in [{table}], so containerd's CRI plugin \
         reads no hosts.toml and pulls go straight to the origin. Rerun with --patch-config \
         (adds config_path = \"{suggested}\"; needs a containerd restart), or set it yourself",
        path.display()
    )]
    ConfigPathMissing {
        path: PathBuf,
        table: String,
        suggested: String,
        /// Extra context, e.g. that the file does not exist.
        note: String,
    },

    /// Inline registry settings that containerd refuses next to `config_path`.
    #[error(
        "containerd config {}: {what} in [{table}] conflict with config_path (containerd's CRI \
         plugin then fails to load: \"{containerd_says}\"). Move them to \
         certs.d/<registry>/hosts.toml, delete them from config.toml, and rerun",
        path.display()
    )]
    InlineRegistryConflict {
        path: PathBuf,
        table: String,
        /// For example "registry.mirrors for docker.io, ghcr.io".
        what: String,
        containerd_says: &'static str,
    },

    /// A registry name that cannot be a certs.d directory.
    #[error("registry {name:?}: {reason}")]
    InvalidRegistry { name: String, reason: String },

    /// A server override that containerd would not accept.
    #[error("registry {registry}: server {server:?}: {reason}")]
    InvalidServer {
        registry: String,
        server: String,
        reason: String,
    },

    /// The mirror URL is not a plain `http(s)://host[:port]` URL.
    #[error("mirror {url:?}: {reason}")]
    InvalidMirror { url: String, reason: String },

    /// `dial_timeout` is not a Go duration that containerd would parse.
    #[error("dial timeout {value:?}: {reason}")]
    InvalidDialTimeout { value: String, reason: String },

    /// A malformed ECR account id or region.
    #[error("ECR {what} {value:?}: {reason}")]
    InvalidEcr {
        what: &'static str,
        value: String,
        reason: String,
    },

    /// Nothing to do: no registry given, none from ECR either.
    #[error(
        "no registries: give at least one --registry, ECR account and region, or --ecr-discover"
    )]
    NoRegistries,

    /// An existing hosts.toml that hostsd does not own and cannot merge with,
    /// because containerd could not decode it either.
    #[error(
        "existing {} is not a hosts.toml that containerd can decode ({reason}); \
         hostsd keeps files it does not own, so fix or delete it and rerun",
        path.display()
    )]
    ForeignFileUndecodable { path: PathBuf, reason: String },

    /// A guard: hostsd produced a file that would not decode. Nothing was written.
    #[error("refusing to write {}: the generated file does not decode ({reason}); this is a hostsd bug", path.display())]
    GeneratedInvalid { path: PathBuf, reason: String },

    /// EC2 instance metadata (IMDSv2) did not give an account and region.
    #[error("instance metadata {endpoint}: {step}: {reason}")]
    Imds {
        endpoint: String,
        step: &'static str,
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The class of the error, which the CLI maps to an exit code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } | Error::GeneratedInvalid { .. } => ErrorKind::Runtime,
            Error::InvalidRegistry { .. }
            | Error::InvalidServer { .. }
            | Error::InvalidMirror { .. }
            | Error::InvalidDialTimeout { .. }
            | Error::InvalidEcr { .. }
            | Error::NoRegistries => ErrorKind::Input,
            Error::ContainerdConfig { .. }
            | Error::ConfigPathMissing { .. }
            | Error::InlineRegistryConflict { .. }
            | Error::ForeignFileUndecodable { .. } => ErrorKind::NodeConfig,
            Error::Imds { .. } => ErrorKind::Discovery,
        }
    }
}

/// Coarse classes of [`Error`], one exit code each in the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// I/O failures and internal guards.
    Runtime,
    /// A flag or config value is malformed.
    Input,
    /// The node's containerd configuration needs a person's attention.
    NodeConfig,
    /// Instance metadata discovery failed.
    Discovery,
}
