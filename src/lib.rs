//! damselfly: a node-local container image distribution daemon.
//!
//! containerd pulls through damselfly's registry mirror (wired in by
//! `hostsd`). The mirror fetches each blob from the origin registry once
//! per cluster (the swarm splits it into pieces between the nodes that want
//! it), verifies it against its digest while it streams, keeps it in a
//! content-addressed cache, and serves every later pull from that cache or
//! from peers.
//!
//! # Layout
//!
//! Read the modules in the order a blob travels:
//!
//! - [`config`]: TOML to a validated [`config::Config`]; every key has a
//!   documented default, and [`config::reference_markdown`] generates the
//!   reference in `docs/configuration.md`.
//! - [`oci`]: the distribution spec's vocabulary: digests, repository names,
//!   tags, image references and manifest descriptors ([`oci::image`]), and
//!   the error codes that the mirror answers with.
//! - [`http`](crate::http): the `Range` and `Content-Range` parsers, and
//!   the one accept loop (drain, accept backoff) of all four listeners.
//! - [`registry`]: the mirror's HTTP surface (`/v2/...`). It parses and
//!   validates requests, picks the upstream from containerd's `?ns=`, and maps
//!   every error to OCI error JSON in one place.
//! - [`origin`]: the client for upstream registries: bearer-token and basic
//!   auth, ECR tokens from the node's AWS identity ([`origin::ecr`]), retries
//!   with backoff, redirects that never carry credentials to another host.
//! - [`fetch`]: the engine. Single flight per digest, resumable downloads
//!   that readers stream from while they grow, tag resolution with a bounded
//!   stale fallback; with peers, piece downloads ([`fetch::pieces`]). Cache
//!   hits are checked chunk by chunk as they are served
//!   ([`fetch::verify`]); partials are bounded and the store scrubbed in
//!   the background ([`fetch::upkeep`]).
//! - [`swarm`]: the peer layer. libp2p for membership, announcements and
//!   content routing ([`swarm::control`]), TLS 1.3 Range requests for bytes
//!   ([`swarm::data`], [`swarm::tls`]), rendezvous hashing with bounded
//!   loads for who fetches which piece from the origin
//!   ([`swarm::rendezvous`]).
//! - [`store`]: the content-addressed cache on disk: verified commits by
//!   atomic rename, LRU eviction under a quota, crash recovery, chunk sums
//!   and the quarantine for blobs that rotted.
//! - [`telemetry`]: tracing set-up, the Prometheus metrics, and the
//!   `/metrics`, `/healthz`, `/readyz` endpoints.
//! - [`gpu`]: the node's GPUs behind one seam ([`gpu::Inventory`]): NVML
//!   loaded at run time, GPU Feature Discovery labels, or `[gpu.assume]`.
//! - [`cri`]: containerd over its socket: the kubelet's CRI image calls and
//!   containerd's images API (tonic clients generated from the protos).
//! - [`prewarm`]: on top of the fetch engine: the images a node's rules
//!   pick for its GPUs, fetched through the swarm at background priority,
//!   pinned, and pulled into containerd with CRI `PullImage`.
//! - [`node`]: Kubernetes node gating: the startup taint comes off this
//!   node's Node once containerd is wired and the daemon is ready.
//! - [`sidecar`]: `damselfly sidecar`, beside the autoscaler: the scaling
//!   signal (a Prometheus query, as KEDA reads it) turned into warm intents
//!   over the swarm, so every node prewarms before the scale-out lands.
//! - [`daemon`]: wires the parts together and owns graceful shutdown.
//! - [`admin`]: the admin API on a root-only Unix socket: cache listing,
//!   inspection, stats, verify, GC, pins, images, peers. [`admin::Node`]
//!   answers from the store, so the CLI can also read a store directly.
//! - [`cli`]: `damselfly cache|images|peers|gpu|prewarm|bench`: the client
//!   of the admin API, its tables and its JSON.
//! - [`bench`]: `damselfly bench pull`: a pull through the mirror as
//!   containerd does it, timed, with bytes by source and a warm verdict.
//! - `fuzzing` (hidden): the bodies of the fuzz targets, one per parser of
//!   outside input, shared by `fuzz/` and `tests/fuzz_corpus.rs`
//!   (docs/fuzzing.md).
//!
//! Imports point down. `oci` and `http` sit at the bottom and import
//! nothing of the crate; `config` imports only `oci`; `telemetry` imports
//! `config` and `http`; `store`, `origin`, `swarm`, `gpu` and `cri` sit
//! above them; `fetch` above those; `registry` (the mirror) on `fetch`;
//! `prewarm` on the fetch engine; `node` beside it; `sidecar` on `prewarm`'s
//! wire types and the swarm; `admin`, `cli`, `bench` and `daemon` on top.
//!
//! The fetch engine and the swarm meet at two seam traits, so neither names
//! the other's types and each is tested alone:
//! - the piece engine asks the swarm through [`swarm::PeerNet`] (plan a
//!   piece, find holders, open a piece from a peer, distrust, announce),
//!   and its unit tests run on the in-memory [`swarm::memory::MemorySwarm`];
//! - the data plane asks the engine through [`swarm::data::PeerBlobs`]
//!   (bytes of a blob for a peer), which [`fetch::Fetcher`] implements.
//!
//! What `config` validates for the swarm (`Role`, bootstrap addresses, the
//! cluster key) and for ECR (host names) is defined in `config`; `swarm` and
//! `origin::ecr` re-export it.
#![forbid(unsafe_code)]

pub mod admin;
pub mod bench;
pub mod cli;
pub mod config;
pub mod cri;
pub mod daemon;
pub mod fetch;
#[doc(hidden)]
pub mod fuzzing;
pub mod gpu;
pub mod http;
pub mod node;
pub mod oci;
pub mod origin;
pub mod prewarm;
pub mod registry;
pub mod sidecar;
pub mod store;
pub mod swarm;
pub mod telemetry;
