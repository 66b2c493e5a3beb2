//! The integration-test lab: real components on loopback, and the network
//! lab of the multi-node benches.
//!
//! damselfly's integration tests and benches, and hostsd's tests, take it as
//! a dev-dependency (`use damselfly_lab as common;`, `use
//! damselfly_lab::{daemon, cluster};`). Everything here runs the real
//! programs (`docker-registry` from distribution 2.8, `containerd` 1.6 with
//! `ctr`, `umoci`, `skopeo`, `htpasswd`, `openssl`, the damselfly binary) and
//! binds only 127.0.0.x, except [`netlab`], which builds network namespaces.
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
//! | [`cri_pull`] | the kubelet's CRI `PullImage`, with the daemon's own CRI client |
//! | [`daemon::Daemon`] | a damselfly daemon (or sidecar) as a real process, with its own store, config and free ports; admin socket, metrics, log |
//! | [`cluster::Cluster`] | N daemons on 127.0.0.2, .3, ... forming one swarm, each with its own containerd; [`cluster::Suite`], the origin and lock a swarm test binary shares |
//! | [`netlab::Lab`] | network namespaces on one bridge, `tc tbf` shaping, an origin and daemons inside them, for the multi-node benches |
//!
//! One daemon harness: [`daemon::DaemonConfig`] writes every daemon's config
//! (on loopback or in a namespace), [`process::Proc`] runs every daemon
//! and netlab registry as a process with a log file, [`daemon::parse_samples`]
//! reads every metric, [`members::wait_members`] waits for every swarm's
//! membership and [`daemon::write_cluster_key`] makes every cluster key.
//!
//! # Finding the daemon binary
//!
//! `env!("CARGO_BIN_EXE_damselfly")` exists only in the root package's own
//! tests and benches, so [`daemon::binary`] looks at run time:
//! `DAMSELFLY_BIN` if set, else `damselfly` in the profile directory above
//! the running test executable (`target/<profile>/deps/<test>-<hash>`).
//! Cargo builds that binary before it runs the root package's integration
//! tests and benches.
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
//! - [`netlab`] is the exception to the first rule: it needs root, fixed
//!   ports inside its own namespaces and names derived from the bench's
//!   pid, and the benches that use it run one scenario at a time.
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

pub mod apiserver;
pub mod blob;
pub mod cluster;
pub mod containerd;
pub mod cri;
pub mod daemon;
pub mod image;
pub mod members;
pub mod memory;
pub mod netlab;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod random;
pub mod registry;
mod server;
pub mod token;
pub mod util;

pub use apiserver::{ApiRequest, ApiServer};
pub use blob::{
    fetch_manifest, flip_bytes_at, get_blob, get_hashed, push_blob, push_blob_async,
    push_random_blob, verify_blob, BlobSource, Endpoint, FetchedManifest, RandomBlob,
    RegistryClient,
};
pub use containerd::{write_direct_hosts_toml, write_hosts_file, write_hosts_toml, Containerd};
pub use cri::cri_pull;
pub use image::{
    build_image, build_image_cached, push_image, push_raw_image, ImageSpec, LayerSpec, OciLayout,
    PushedImage,
};
pub use prometheus::Prometheus;
pub use proxy::{Fault, FaultProxy, ProxyRequest, ALWAYS};
pub use random::{random_bytes, random_digest, RandomReader};
pub use registry::{
    parse_access_log_line, OriginRequest, Registry, RegistryAuth, RegistryOptions, TlsFiles,
    TokenAuth,
};
pub use token::{TokenServer, TokenServerOptions};
pub use util::{
    block_on, clock, free_port, http_get, missing_tools, require_tools, run_command, sha256_hex,
    wait_for_http, CmdOutput, TestDir,
};

/// `eprintln!` with the UTC time of day ([`clock`]), to line up a test's
/// notes with the daemons' logs.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        eprintln!("[{}] {}", $crate::util::clock(), format!($($arg)*))
    };
}
