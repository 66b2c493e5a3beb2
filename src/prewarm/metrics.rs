//! Prewarm's metric families, registered in the daemon's registry.

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct PrewarmMetrics {
    /// Images of matching rules, by state.
    pub images: IntGaugeVec,
    /// Blob bytes prewarm got, by source (cache, peer, origin).
    pub bytes: IntCounterVec,
    /// Seconds from the daemon's start to each image being ready.
    pub ready_seconds: GaugeVec,
    pub failures: IntCounterVec,
    /// Warm intents received over the swarm, by what came of them.
    pub intents: IntCounterVec,
}

impl PrewarmMetrics {
    pub fn new(registry: &Registry) -> Result<PrewarmMetrics, prometheus::Error> {
        let images = IntGaugeVec::new(
            Opts::new(
                "damselfly_prewarm_images",
                "Images of matching prewarm rules, by state (waiting, resolving, fetching, cached, pulling, in_containerd, failed, refused).",
            ),
            &["state"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "damselfly_prewarm_bytes_total",
                "Bytes of prewarmed images, by source (cache: already on the node; peer; origin).",
            ),
            &["source"],
        )?;
        let ready_seconds = GaugeVec::new(
            Opts::new(
                "damselfly_prewarm_ready_seconds",
                "Seconds from the daemon's start to the image being ready (in containerd, or cached when it is not for containerd).",
            ),
            &["rule", "image"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "damselfly_prewarm_failures_total",
                "Failed prewarm attempts, by rule (each is retried with backoff).",
            ),
            &["rule"],
        )?;
        let intents = IntCounterVec::new(
            Opts::new(
                "damselfly_prewarm_intents_total",
                "Warm intent messages from the swarm, by result (applied; other_nodes: its GPU selector does not match this node; released; refused: not a valid intent, logged).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(images.clone()))?;
        registry.register(Box::new(intents.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(ready_seconds.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        Ok(PrewarmMetrics {
            images,
            bytes,
            ready_seconds,
            failures,
            intents,
        })
    }
}
