//! What `damselfly prewarm status` shows, and its `-o json`: the wire
//! types of the admin API's `/v1/prewarm`. Fields are only ever added.
//! Sizes are bytes, times seconds.

use serde::{Deserialize, Serialize};

use crate::gpu::GpuFacts;

/// Where an image stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageState {
    /// Not started: waiting for a slot, for the swarm to settle, or for a
    /// live pull to finish.
    Waiting,
    /// Asking the origin what the reference names.
    Resolving,
    Fetching,
    /// Every blob is in the cache (and the image is not for containerd,
    /// or containerd is still to be asked).
    Cached,
    /// CRI `PullImage` through the mirror is running.
    Pulling,
    /// Present and unpacked in containerd: the kubelet's pull is a no-op.
    InContainerd,
    /// The last attempt failed; it is retried with backoff.
    Failed,
    /// It can never fit the store (`store.max_size`); retried only in case
    /// other pins went away.
    Refused,
}

impl ImageState {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::Waiting => "waiting",
            ImageState::Resolving => "resolving",
            ImageState::Fetching => "fetching",
            ImageState::Cached => "cached",
            ImageState::Pulling => "pulling",
            ImageState::InContainerd => "in_containerd",
            ImageState::Failed => "failed",
            ImageState::Refused => "refused",
        }
    }

    pub const ALL: [ImageState; 8] = [
        ImageState::Waiting,
        ImageState::Resolving,
        ImageState::Fetching,
        ImageState::Cached,
        ImageState::Pulling,
        ImageState::InContainerd,
        ImageState::Failed,
        ImageState::Refused,
    ];
}

/// Bytes of an image by where they came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BytesBySource {
    /// Already in this node's cache.
    pub cache: u64,
    pub peers: u64,
    pub origin: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleStatus {
    pub name: String,
    pub matched: bool,
    /// Why it matched or not.
    pub reason: String,
    pub images: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageStatus {
    pub rule: String,
    /// The reference as configured, normalized (`docker.io/library/x:1`).
    pub reference: String,
    pub state: ImageState,
    /// `os/arch[/variant]` prewarmed.
    pub platform: String,
    /// What the reference resolved to (an index or a manifest).
    pub digest: Option<String>,
    /// The platform's manifest.
    pub manifest: Option<String>,
    /// Known once resolved: manifests, config and layers.
    pub bytes_total: Option<u64>,
    pub bytes_done: u64,
    pub sources: BytesBySource,
    /// Attempts that failed since the last success.
    pub failures: u32,
    pub error: Option<String>,
    /// Seconds until the next attempt, while failed.
    pub retry_in_s: Option<u64>,
    /// Seconds from the daemon's start to the image being ready.
    pub ready_after_s: Option<f64>,
    /// Where the last attempt's time went, for the bench and for a slow
    /// prewarm: seconds from the daemon's start to the end of each stage.
    #[serde(default)]
    pub stages: StageTimes,
    /// Seconds since the Unix epoch of the last resolution at the origin.
    pub resolved_at: Option<u64>,
    /// The blobs are pinned in the store.
    pub pinned: bool,
    /// Pulled into containerd (through CRI) at least once.
    pub in_containerd: bool,
    /// What CRI reports for the image's `pinned` (containerd 1.7+ read the
    /// label damselfly sets); `None` before the CRI pull.
    pub cri_pinned: Option<bool>,
    /// The digest a moved tag named before, now unpinned.
    pub previous: Option<String>,
}

/// Seconds from the daemon's start to the end of each stage of the last
/// attempt (`None` until the stage is reached). Resolving starts once the
/// swarm settled ([`PrewarmStatus::settled_after_s`]); fetching ends at
/// `cached_s`; the CRI pull and unpack in containerd at `in_containerd_s`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTimes {
    /// The attempt began (a prewarm slot was free and the swarm settled).
    pub started_s: Option<f64>,
    /// Index and manifest resolved at the origin.
    pub resolved_s: Option<f64>,
    /// Every blob in the store.
    pub cached_s: Option<f64>,
    /// CRI `PullImage` returned: pulled and unpacked in containerd.
    pub in_containerd_s: Option<f64>,
}

/// A warm intent this node acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentStatus {
    pub id: String,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
    pub images: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrewarmStatus {
    pub gpu: GpuFacts,
    pub into_containerd: bool,
    /// Seconds from the daemon's start until prewarm began: with the swarm
    /// on, until the membership held still (`prewarm.swarm_wait` at most).
    #[serde(default)]
    pub settled_after_s: Option<f64>,
    /// Every image of every matching rule is ready (intents not counted).
    pub ready: bool,
    pub rules: Vec<RuleStatus>,
    /// Warm intents from the scaling sidecar that this node acts on; their
    /// images are in `images` under the rule `intent:<id>`.
    #[serde(default)]
    pub intents: Vec<IntentStatus>,
    pub images: Vec<ImageStatus>,
}
