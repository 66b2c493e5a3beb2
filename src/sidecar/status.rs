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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Scaling;
    use crate::sidecar::signal::wanted_replicas;

    /// What KEDA's `metrics-api` scaler does with the answer under the
    /// default `AverageValue`: the number at `valueLocation`, over
    /// `targetValue`, rounded up (the HPA's arithmetic), whatever the
    /// current count.
    fn keda_desired(body: &serde_json::Value, value_location: &str, target: f64) -> u32 {
        let v = body[value_location]
            .as_f64()
            .expect("a number at valueLocation");
        (v / target).ceil() as u32
    }

    #[test]
    fn the_keda_answer_gives_keda_the_replicas_the_sidecar_wants() {
        let scaling = Scaling {
            threshold: 5.0,
            activation_threshold: 0.0,
            min_replicas: 0,
            max_replicas: 10,
        };
        for (value, current) in [
            (12.0, None),
            (12.0, Some(7)),
            (3.0, Some(1)),
            (40.0, Some(0)),
            (80.0, Some(2)),
        ] {
            let m = KedaMetric {
                workload: "inference/llm".into(),
                value,
                threshold: scaling.threshold,
                wanted_replicas: wanted_replicas(value, &scaling),
                current_replicas: current,
                timestamp: 1_796_596_235,
            };
            let body: serde_json::Value = serde_json::to_value(&m).unwrap();
            // The keys KEDA's valueLocation names (GJSON paths).
            assert_eq!(body["value"], value);
            assert_eq!(body["threshold"], 5.0);
            assert_eq!(body["wantedReplicas"], m.wanted_replicas);
            assert_eq!(body["currentReplicas"], serde_json::json!(current));
            assert_eq!(body["workload"], "inference/llm");
            assert!(body.get("wanted_replicas").is_none(), "{body}");
            // Both documented triggers give the sidecar's count, whatever
            // the current one (within the bounds KEDA clamps to itself).
            let want = m.wanted_replicas;
            assert_eq!(keda_desired(&body, "value", 5.0).min(10), want, "{body}");
            assert_eq!(keda_desired(&body, "wantedReplicas", 1.0), want, "{body}");
            let back: KedaMetric = serde_json::from_value(body).unwrap();
            assert_eq!(back, m);
        }
        // 12 at threshold 5 is the 3 replicas; 80 would be 16,
        // capped at max_replicas in wantedReplicas.
        assert_eq!(wanted_replicas(12.0, &scaling), 3);
        assert_eq!(wanted_replicas(80.0, &scaling), 10);
    }
}
