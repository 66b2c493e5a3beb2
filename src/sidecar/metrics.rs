//! The sidecar's metric families, in its own registry (its `/metrics`).

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::telemetry::reg;

#[derive(Clone)]
pub struct SidecarMetrics {
    /// The last good value of the signal.
    pub signal_value: Gauge,
    /// 1 when the last read of the signal succeeded.
    pub signal_up: IntGauge,
    pub signal_errors: IntCounterVec,
    pub wanted_replicas: IntGauge,
    /// -1 while unknown.
    pub current_replicas: IntGauge,
    /// 0 or 1: this sidecar's workload has a live intent.
    pub live_intents: IntGauge,
    pub publications: IntCounterVec,
    /// Seconds from publication to the first node holding each image of the
    /// live intent.
    pub lead_seconds: GaugeVec,
    /// The same, over every intent since start.
    pub lead_time: Histogram,
    /// Nodes that acked each image of the live intent.
    pub nodes_ready: IntGaugeVec,
    pub resolve_failures: IntCounterVec,
    /// Members that serve data (daemons) the sidecar sees.
    pub members: IntGauge,
}

impl SidecarMetrics {
    pub fn new(registry: &Registry) -> Result<SidecarMetrics, prometheus::Error> {
        let r = registry;
        Ok(SidecarMetrics {
            signal_value: reg(
                r,
                Gauge::new(
                    "damselfly_sidecar_signal_value",
                    "The scaling signal's last good value (the query's result).",
                )?,
            )?,
            signal_up: reg(
                r,
                IntGauge::new(
                    "damselfly_sidecar_signal_up",
                    "1 when the last read of the signal succeeded, 0 when it failed (unreachable, refused, empty, NaN).",
                )?,
            )?,
            signal_errors: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "damselfly_sidecar_signal_errors_total",
                        "Failed reads of the signal, by reason (unreachable, http_status, refused, empty, nan, infinite, multiple, malformed).",
                    ),
                    &["reason"],
                )?,
            )?,
            wanted_replicas: reg(
                r,
                IntGauge::new(
                    "damselfly_sidecar_wanted_replicas",
                    "Replicas KEDA will want: ceil(value / threshold), clamped to min and max.",
                )?,
            )?,
            current_replicas: reg(
                r,
                IntGauge::new(
                    "damselfly_sidecar_current_replicas",
                    "Replicas that exist now (sidecar.current_query); -1 while unknown.",
                )?,
            )?,
            live_intents: reg(
                r,
                IntGauge::new(
                    "damselfly_sidecar_live_intents",
                    "Live warm intents this sidecar keeps published (0 or 1).",
                )?,
            )?,
            publications: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "damselfly_sidecar_intent_publications_total",
                        "Intent messages published, by kind (open: a new scale-out; update: more replicas or more images; refresh: the interval; join: a member joined; release).",
                    ),
                    &["kind"],
                )?,
            )?,
            lead_seconds: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        "damselfly_sidecar_lead_seconds",
                        "Seconds from the live intent's publication to the first node that holds the image (its ack).",
                    ),
                    &["image"],
                )?,
            )?,
            lead_time: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "damselfly_sidecar_lead_time_seconds",
                        "Seconds from an intent's publication to the first node that holds each image, every intent since start.",
                    )
                    .buckets(vec![
                        0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                    ]),
                )?,
            )?,
            nodes_ready: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "damselfly_sidecar_nodes_ready",
                        "Nodes that hold the live intent's image (acked it).",
                    ),
                    &["image"],
                )?,
            )?,
            resolve_failures: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "damselfly_sidecar_resolve_failures_total",
                        "Images the sidecar could not resolve to a digest at the origin (the others still go out).",
                    ),
                    &["image"],
                )?,
            )?,
            members: reg(
                r,
                IntGauge::new(
                    "damselfly_sidecar_members",
                    "Daemons (members with a data plane) the sidecar sees in the swarm.",
                )?,
            )?,
        })
    }
}
