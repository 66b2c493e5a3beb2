//! The admin API's wire types: what the daemon answers and what
//! `damselfly ... -o json` prints. Both sides use these structs, so the JSON
//! is the same whether the CLI asked the daemon or read the store itself.
//!
//! Stability: fields are only ever added. Sizes are bytes, times are
//! seconds since the Unix epoch, digests are `sha256:<hex>`.

use serde::{Deserialize, Serialize};

/// Paths under the socket's HTTP server.
pub mod path {
    pub const BLOBS: &str = "/v1/blobs";
    pub const INSPECT: &str = "/v1/inspect";
    pub const STATS: &str = "/v1/stats";
    pub const VERIFY: &str = "/v1/verify";
    pub const GC: &str = "/v1/gc";
    pub const PIN: &str = "/v1/pin";
    pub const UNPIN: &str = "/v1/unpin";
    pub const PEERS: &str = "/v1/peers";
    pub const IMAGES: &str = "/v1/images";
    pub const EVICT: &str = "/v1/evict";
    pub const GPU: &str = "/v1/gpu";
    pub const PREWARM: &str = "/v1/prewarm";
}

pub use crate::gpu::{GpuDevice, GpuFacts};
pub use crate::prewarm::{ImageStatus as PrewarmImage, PrewarmStatus, RuleStatus};

/// `POST /v1/evict`: remove these blobs from the store now (`bench pull
/// --cold`), pinned or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictRequest {
    pub digests: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictResponse {
    /// Blobs that were in the store and are gone.
    pub removed: u64,
}

/// Where a blob's bytes came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// `origin` or `peer`.
    pub from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    pub fetched_at: u64,
}

/// One committed blob (`cache ls`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlobEntry {
    pub digest: String,
    pub size: u64,
    /// Known for manifests (recorded when fetched) and for blobs that a
    /// stored manifest describes.
    pub media_type: Option<String>,
    /// `index`, `manifest`, `config`, `layer`, or null when no stored
    /// manifest mentions the blob.
    pub kind: Option<String>,
    pub last_access: u64,
    pub pinned: bool,
    /// Readers holding it open now (0 when read without the daemon).
    pub readers: u32,
    /// null when not recorded (blobs fetched before provenance was kept).
    pub source: Option<SourceInfo>,
    /// References of the images that use it.
    pub images: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlobList {
    pub blobs: Vec<BlobEntry>,
}

/// `cache inspect` takes a digest or an image reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRequest {
    pub target: String,
}

/// Partial download progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub written: u64,
    /// null until the origin has said how large the blob is.
    pub total: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlobInspection {
    pub digest: String,
    /// `committed`, `downloading` (in flight now), `partial` (a resumable
    /// download that is not running), or `absent`.
    pub state: String,
    pub size: Option<u64>,
    pub media_type: Option<String>,
    pub kind: Option<String>,
    pub last_access: Option<u64>,
    pub pinned: bool,
    /// Requests reading it now: leases on a committed blob, or followers of
    /// a download.
    pub readers: u32,
    pub progress: Option<Progress>,
    /// Who has the whole blob: `local` for this node. Peers join the list
    /// when the swarm lands.
    pub holders: Vec<String>,
    pub source: Option<SourceInfo>,
    pub images: Vec<String>,
}

/// One blob of an image, in `cache inspect <image>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageBlob {
    pub digest: String,
    /// `config` or `layer`.
    pub kind: String,
    pub media_type: Option<String>,
    pub size: u64,
    /// As in [`BlobInspection::state`].
    pub state: String,
    /// Bytes on disk (the size when committed).
    pub present: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInspection {
    pub reference: String,
    /// The digest the reference resolved to (an index or a manifest).
    pub digest: String,
    pub media_type: Option<String>,
    /// The platform manifest chosen from an index, e.g. `linux/amd64`.
    pub platform: Option<String>,
    /// The manifest whose blobs are listed (the index's child, or `digest`).
    pub manifest: Option<String>,
    pub pinned: bool,
    /// Config first, then layers bottom-up. Empty when the manifest is not
    /// stored.
    pub blobs: Vec<ImageBlob>,
    pub layers: u64,
    pub layers_present: u64,
    pub layer_bytes: u64,
    pub layer_bytes_present: u64,
    /// layer_bytes_present / layer_bytes, 0.0 to 1.0.
    pub complete: f64,
}

/// `cache inspect`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Inspection {
    Blob(BlobInspection),
    Image(ImageInspection),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Lookups {
    pub hit: u64,
    pub miss: u64,
    pub joined: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BySource {
    pub local: u64,
    pub peer: u64,
    pub origin: u64,
}

/// Counters since the daemon started; absent when read without it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStats {
    pub started_at: u64,
    pub uptime_s: u64,
    pub blob_lookups: Lookups,
    pub manifest_lookups: Lookups,
    /// Blob lookups answered from the store / all blob lookups; null before
    /// the first lookup.
    pub hit_ratio: Option<f64>,
    /// Blob bytes sent to clients, by where they came from.
    pub bytes_served: BySource,
    /// Blob bytes received from origin registries.
    pub origin_bytes: u64,
    pub downloads_in_flight: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub store_dir: String,
    pub used_bytes: u64,
    pub quota_bytes: u64,
    pub blobs: u64,
    pub pinned_blobs: u64,
    pub pinned_bytes: u64,
    pub in_use_blobs: u64,
    pub partials: u64,
    pub partial_bytes: u64,
    pub daemon: Option<DaemonStats>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRequest {
    pub repair: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VerifyProgress {
    pub blobs_done: u64,
    pub blobs_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorruptBlob {
    pub digest: String,
    pub size: u64,
    /// What the bytes hash to, or why they could not be read.
    pub actual: String,
    pub removed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub checked: u64,
    pub bytes: u64,
    pub corrupt: Vec<CorruptBlob>,
    /// Evicted or removed while the check ran; not a fault.
    pub vanished: Vec<String>,
    pub repair: bool,
}

/// The verify endpoint streams one JSON object per line: progress while it
/// works, then the report (or an error).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyEvent {
    Progress(VerifyProgress),
    Report(VerifyReport),
    Error(ApiError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRequest {
    /// Bytes to free down to; null means the store's quota.
    pub target: Option<u64>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evicted {
    pub digest: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub target: u64,
    pub before: u64,
    pub after: u64,
    pub freed: u64,
    /// Least recently used first.
    pub evicted: Vec<Evicted>,
    pub kept_pinned_blobs: u64,
    pub kept_pinned_bytes: u64,
    pub kept_in_use_blobs: u64,
    pub kept_in_use_bytes: u64,
    /// Whether the store is now at or under the target.
    pub reached: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinResponse {
    /// The pin's name: the normalized image reference, or the digest.
    pub target: String,
    pub digests: Vec<String>,
    /// true after `pin`; after `unpin`, whether a pin was there to remove.
    pub changed: bool,
    /// Other pins that still hold some of these digests (after `unpin`).
    pub still_pinned_by: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    pub id: String,
    pub role: String,
    pub addresses: Vec<String>,
    /// Always null for now: the control plane does not report round trips.
    pub latency_ms: Option<f64>,
    /// Milliseconds since the peer's last membership heartbeat.
    #[serde(default)]
    pub last_seen_ms: Option<u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peers {
    /// `enabled`, or `disabled` when `[swarm] enabled = false` (or the
    /// daemon is not running).
    pub swarm: String,
    /// This node's libp2p id, with the swarm enabled.
    #[serde(default)]
    pub local_peer_id: Option<String>,
    /// `node` or `seed`.
    #[serde(default)]
    pub local_role: Option<String>,
    pub peers: Vec<Peer>,
    pub distrusted: Vec<Peer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSummary {
    pub reference: String,
    pub digest: String,
    pub media_type: Option<String>,
    pub platform: Option<String>,
    pub layers: u64,
    pub layers_present: u64,
    pub layer_bytes: u64,
    pub layer_bytes_present: u64,
    pub complete: f64,
    pub pinned: bool,
    /// When the origin last confirmed the tag; null for images seen by
    /// digest only.
    pub confirmed_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageList {
    pub images: Vec<ImageSummary>,
    /// The prewarm engine's images (empty without a daemon or rules).
    #[serde(default)]
    pub prewarm: Vec<PrewarmImage>,
}

/// An error answer: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// `invalid_digest`, `invalid_reference`, `not_found`, `read_only`,
    /// `bad_request`, or `internal`.
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}
