//! What `damselfly sidecar status` shows and its `-o json` (the sidecar's
//! `/v1/status`), and the KEDA `metrics-api` answer (`/keda`). Fields are
//! only ever added. Times are seconds; instants are seconds since the Unix
//! epoch.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SidecarStatus {
    pub workload: String,
    /// The sidecar's swarm identity (new each start).
    pub peer_id: String,
    /// Daemons seen in the swarm (members with a data plane).
    pub members: usize,
    pub signal: SignalStatus,
    pub scaling: ScalingStatus,
    /// From the last good value; `None` before the first.
    pub wanted_replicas: Option<u32>,
    /// From `sidecar.current_query`; `None` without one or while it fails.
    pub current_replicas: Option<u32>,
    /// The live intent, if any.
    pub intent: Option<IntentView>,
    /// When the last intent was released (cooldown at zero) or expired.
    pub released_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalStatus {
    /// The Prometheus server or metrics URL.
    pub source: String,
    /// The query, or the metric with its labels.
    pub query: String,
    /// The last read succeeded.
    pub ok: bool,
    /// The last good value.
    pub value: Option<f64>,
    /// Why the last read failed.
    pub error: Option<String>,
    pub polled_at: Option<u64>,
    /// Reads that failed in a row.
    pub failures: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingStatus {
    pub threshold: f64,
    pub activation_threshold: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntentView {
    /// First published (this scale-out); acks name it.
    pub published_at: u64,
    pub expires_at: u64,
    pub replicas: u32,
    /// While the wanted replicas are at zero: seconds until the release.
    pub cooldown_left_s: Option<f64>,
    pub images: Vec<ImageView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageView {
    /// As configured (`sidecar.images`).
    pub reference: String,
    /// What it resolved to; `None` while it cannot be resolved.
    pub digest: Option<String>,
    /// Why it could not be resolved.
    pub error: Option<String>,
    /// Publication to the first node that holds it.
    pub lead_time_s: Option<f64>,
    /// Every node that holds it, first first.
    pub nodes: Vec<NodeView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub peer_id: String,
    /// `node` or `seed`; `unknown` for a node that acked but is not a member
    /// any more.
    pub role: String,
    /// Publication to this node's ack.
    pub ready_after_s: f64,
}

/// The `/keda` answer, for a ScaledObject trigger of type `metrics-api`:
/// `valueLocation: value` with `targetValue` = `sidecar.threshold` (KEDA
/// then computes the same replicas), or `valueLocation: wantedReplicas`
/// with `targetValue: "1"`. Either way with the default `AverageValue`
/// metric type: desired replicas = value / target, whatever the current
/// count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KedaMetric {
    pub workload: String,
    pub value: f64,
    pub threshold: f64,
    pub wanted_replicas: u32,
    pub current_replicas: Option<u32>,
    /// When the value was read.
    pub timestamp: u64,
}
