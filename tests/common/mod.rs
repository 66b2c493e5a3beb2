//! The integration-test lab: real components on loopback.
//!
//! Integration tests use it with `mod common;`, benches with
//! `#[path = "../tests/common/mod.rs"] mod common;`. Everything here runs the
//! real programs (`docker-registry` from distribution 2.8, `containerd` 1.6
//! with `ctr`, `umoci`, `skopeo`, `htpasswd`, `openssl`) and binds only
//! 127.0.0.1.
//!
//! | piece | what it is |
//! |---|---|
//! | [`Registry`] | a `docker-registry serve` with no auth, htpasswd, token auth, or as a pull-through cache, over HTTP or HTTPS ([`TlsFiles`]); counts requests from its own access log |
//! | [`TokenServer`] | an RS256 JWT token server that the registry's `auth.token` trusts |
//! | [`build_image`], [`push_image`] | multi-layer OCI images built with `umoci`, pushed with `skopeo` |
//! | [`push_raw_image`] | an image of raw random layers pushed blob by blob (big layers in seconds; fetch-only) |
//! | [`push_blob`], [`verify_blob`], [`random_bytes`] | raw blobs of any size streamed from a seeded generator |
//! | [`get_hashed`], [`flip_bytes_at`] | a GET hashed as it streams (or where its body broke); disk rot in a stored file |
//! | [`Containerd`], [`write_hosts_toml`] | a private containerd and the `hosts.toml` that points it at a mirror |
//! | [`ApiServer`] | a stand-in for the Kubernetes API server's node endpoints (GET, JSON-patch PATCH, 403/409/422), for the node gate |
//! | [`FaultProxy`] | a streaming HTTP/1.1 reverse proxy that counts requests and injects faults |
//! | [`Prometheus`] | a `prometheus` server scraping a `prometheus-pushgateway` that the test pushes to; can be stopped and started again |
//!
//! # Rules the lab keeps
//!
//! - No fixed ports, no fixed paths, no global state a test can see: every
//!   server picks its own port and every component its own temp dir, so the
//!   tests of one binary can run in parallel.
//! - Children are killed and temp dirs removed on `Drop`. Children are also
//!   spawned with `PR_SET_PDEATHSIG`, and the lab removes its temp dirs at
//!   process exit, so a component kept in a `static OnceLock` (never dropped)
//!   does not outlive the test binary.
//! - Helpers return `anyhow::Result` (with the component's log tail in the
//!   error) rather than panicking on odd input; [`require_tools`] is the one
//!   assertion. Non-zero exits of `ctr` and friends come back as a
//!   [`CmdOutput`] for the test to judge ([`CmdOutput::check`] turns them
//!   into errors).
//! - Set `DAMSELFLY_LAB_KEEP=1` to keep every temp dir (logs, configs,
//!   storage) for debugging; their paths are printed.
//!
//! # Sharing one image between tests
//!
//! ```ignore
//! static LAB: OnceLock<(Registry, PushedImage)> = OnceLock::new();
//! fn lab() -> &'static (Registry, PushedImage) {
//!     LAB.get_or_init(|| {
//!         let reg = Registry::start(RegistryAuth::None).expect("registry");
//!         let img = build_image_cached(&ImageSpec::small()).expect("image");
//!         let pushed = push_image(&img, &reg, "lab/small", "v1", None).expect("push");
//!         (reg, pushed)
//!     })
//! }
//! ```
#![allow(dead_code)]

pub mod apiserver;
pub mod blob;
pub mod containerd;
pub mod cri;
pub mod image;
pub mod prometheus;
pub mod proxy;
pub mod random;
pub mod registry;
mod server;
pub mod token;
pub mod util;

// Each test binary uses a different subset of these re-exports.
#[allow(unused_imports)]
pub use apiserver::{ApiRequest, ApiServer};
#[allow(unused_imports)]
pub use blob::{
    fetch_manifest, flip_bytes_at, get_blob, get_hashed, push_blob, push_blob_async,
    push_random_blob, verify_blob, BlobSource, Endpoint, FetchedManifest, RandomBlob,
    RegistryClient,
};
#[allow(unused_imports)]
pub use containerd::{write_direct_hosts_toml, write_hosts_file, write_hosts_toml, Containerd};
#[allow(unused_imports)]
pub use cri::cri_pull;
#[allow(unused_imports)]
pub use image::{
    build_image, build_image_cached, push_image, push_raw_image, ImageSpec, LayerSpec, OciLayout,
    PushedImage,
};
#[allow(unused_imports)]
pub use prometheus::Prometheus;
#[allow(unused_imports)]
pub use proxy::{Fault, FaultProxy, ProxyRequest, ALWAYS};
#[allow(unused_imports)]
pub use random::{random_bytes, random_digest, RandomReader};
#[allow(unused_imports)]
pub use registry::{
    parse_access_log_line, OriginRequest, Registry, RegistryAuth, RegistryOptions, TlsFiles,
    TokenAuth,
};
#[allow(unused_imports)]
pub use token::{TokenServer, TokenServerOptions};
#[allow(unused_imports)]
pub use util::{
    block_on, free_port, http_get, missing_tools, require_tools, run_command, sha256_hex,
    wait_for_http, CmdOutput, TestDir,
};
