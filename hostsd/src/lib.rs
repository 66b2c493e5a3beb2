//! hostsd: containerd `certs.d/<registry>/hosts.toml` management.
pub mod containerd_config;
pub mod error;
pub mod options;
pub mod registry;
pub use error::{Error, ErrorKind};
