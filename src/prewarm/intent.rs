//! Warm intents: images the cluster is about to need, published by the
//! scaling sidecar when the autoscaler's signal says more replicas are
//! coming. Each daemon whose GPUs match the intent's selector (every seed,
//! whatever the selector) prewarms them like a rule's images, until the
//! intent expires or is released.
//!
//! The intent is a wire type: the sidecar serializes it, the swarm carries
//! the bytes, the daemon hands them to [`Prewarm::apply_intent`].

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{pin_target, rules, Entry, IntentStatus, Prewarm};
use crate::config::{
    valid_workload_id, GpuSelector, PrewarmRule, ProductGlob, RuleNodes, WORKLOAD_ID_GRAMMAR,
};
use crate::oci::{Digest, ImageRef};

/// How often expired intents are looked for.
pub const INTENT_SWEEP: Duration = Duration::from_secs(5);

/// The longest an intent may ask to live; a longer expiry (a clock gone
/// wrong, a bad message) is cut to this.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Most images an intent may carry: a peer's message must not make us
/// allocate without bound (ids are bounded by `valid_workload_id`).
const MAX_IMAGES: usize = 64;

const RULE_PREFIX: &str = "intent:";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentImage {
    /// As the workload names it, with its tag (`reg/repo:v3`).
    pub reference: String,
    /// What the sidecar resolved it to, once, at the origin.
    pub digest: String,
}

/// Which nodes an intent is for, as in `[prewarm.rule.gpu]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_memory: Option<u64>,
    #[serde(default = "one")]
    pub min_count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<bool>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// The workload (`namespace/deployment`): a newer intent with the same
    /// id replaces the older.
    pub id: String,
    pub images: Vec<IntentImage>,
    /// The replicas the autoscaler is expected to want.
    pub replicas: u32,
    /// Seconds since the Unix epoch when it was published.
    pub published_at: u64,
    /// Seconds since the Unix epoch after which it is released.
    pub expires_at: u64,
    /// `None`: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<IntentSelector>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IntentError {
    #[error("intent is not valid JSON: {0}")]
    Decode(String),
    #[error("intent {id:?}: {reason}")]
    Invalid { id: String, reason: String },
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Intent {
    /// Decodes and checks an intent from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Intent, IntentError> {
        let i: Intent =
            serde_json::from_slice(bytes).map_err(|e| IntentError::Decode(e.to_string()))?;
        i.check()?;
        Ok(i)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn check(&self) -> Result<(), IntentError> {
        let bad = |reason: String| IntentError::Invalid {
            id: self.id.chars().take(80).collect(),
            reason,
        };
        if !valid_workload_id(&self.id) {
            return Err(bad(WORKLOAD_ID_GRAMMAR.into()));
        }
        if self.images.is_empty() || self.images.len() > MAX_IMAGES {
            return Err(bad(format!("it must name 1 to {MAX_IMAGES} images")));
        }
        for img in &self.images {
            ImageRef::parse(&img.reference).map_err(|e| bad(e.to_string()))?;
            img.digest
                .parse::<Digest>()
                .map_err(|e| bad(format!("{}: {e}", img.reference)))?;
        }
        if let Some(sel) = &self.gpu {
            if let Some(p) = &sel.product {
                ProductGlob::new(p).map_err(bad)?;
            }
        }
        Ok(())
    }

    /// The images, each pinned to its digest (the tag kept for containerd).
    pub fn image_refs(&self) -> Vec<ImageRef> {
        self.images
            .iter()
            .filter_map(|i| {
                let mut r = ImageRef::parse(&i.reference).ok()?;
                r.digest = Some(i.digest.parse().ok()?);
                Some(r)
            })
            .collect()
    }

    /// The rule name its images are prewarmed under.
    pub fn rule_name(&self) -> String {
        format!("{RULE_PREFIX}{}", self.id)
    }

    /// The workload id of a rule name that [`Intent::rule_name`] made.
    pub fn id_of_rule(rule: &str) -> Option<&str> {
        rule.strip_prefix(RULE_PREFIX)
    }

    /// As a rule, for [`rules::evaluate`].
    fn as_rule(&self) -> PrewarmRule {
        let (nodes, gpu) = match &self.gpu {
            None => (RuleNodes::All, selector(&IntentSelector::default())),
            Some(s) => (RuleNodes::Gpu, selector(s)),
        };
        PrewarmRule {
            name: self.rule_name(),
            images: Vec::new(),
            platform: None,
            nodes,
            gpu,
        }
    }
}

fn selector(s: &IntentSelector) -> GpuSelector {
    GpuSelector {
        product: s.product.as_deref().and_then(|p| ProductGlob::new(p).ok()),
        min_memory: s.min_memory,
        min_count: s.min_count.max(1),
        mig: s.mig,
        min_compute_capability: None,
    }
}

impl Prewarm {
    /// Acts on an intent: prewarms its images when this node matches (a
    /// seed always does), or refreshes the expiry of the same intent seen
    /// before. A newer intent for the same workload with other images
    /// replaces the older one's. Returns whether this node acts on it.
    pub fn apply_intent(&self, intent: &Intent) -> bool {
        let now = unix_now();
        let expires = intent.expires_at.min(now + MAX_LIFETIME.as_secs());
        if expires <= now {
            return false;
        }
        let verdict = rules::evaluate(&intent.as_rule(), &self.inner.facts);
        if !verdict.matched && !self.inner.seed {
            tracing::debug!(intent = %intent.id, reason = %verdict.reason, "warm intent not for this node");
            return false;
        }
        let rule = intent.rule_name();
        let wanted: Vec<ImageRef> = intent.image_refs();
        let mut added = Vec::new();
        {
            let mut entries = self.lock();
            let mut have: HashSet<String> = HashSet::new();
            for e in entries
                .iter_mut()
                .filter(|e| !e.retired && e.status.rule == rule)
            {
                if wanted.contains(&e.image) {
                    e.intent = Some((intent.id.clone(), expires));
                    have.insert(e.image.to_string());
                }
            }
            for image in wanted {
                if have.contains(&image.to_string()) {
                    continue;
                }
                let platform = self.inner.host.clone();
                entries.push(Entry::new(
                    &rule,
                    image,
                    platform,
                    Some((intent.id.clone(), expires)),
                ));
                added.push(entries.len() - 1);
            }
        }
        // Images the workload no longer names go.
        let keep: HashSet<ImageRef> = intent.image_refs().into_iter().collect();
        let stale: Vec<usize> = self
            .lock()
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.retired && e.status.rule == rule && !keep.contains(&e.image))
            .map(|(i, _)| i)
            .collect();
        for idx in stale {
            self.retire(idx, "the workload's intent no longer names it");
        }
        if !added.is_empty() {
            tracing::info!(intent = %intent.id, images = added.len(), replicas = intent.replicas,
                expires_in_s = expires - now, "warm intent: prewarming");
        }
        for idx in added {
            self.spawn_entry(idx);
        }
        self.publish();
        true
    }

    /// Releases every image of workload `id`'s intent now (the sidecar's
    /// release after its cooldown at zero: an intent whose expiry passed).
    /// Returns how many images went.
    pub fn release_intent(&self, id: &str) -> usize {
        let mine: Vec<usize> = self
            .lock()
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.retired && e.intent.as_ref().is_some_and(|(i, _)| i == id))
            .map(|(i, _)| i)
            .collect();
        for &idx in &mine {
            self.retire(idx, "its warm intent was released");
        }
        mine.len()
    }

    /// The digests of workload `id`'s images that are ready on this node.
    pub fn intent_ready(&self, id: &str) -> Vec<Digest> {
        let entries = self.lock();
        entries
            .iter()
            .filter(|e| !e.retired && e.intent.as_ref().is_some_and(|(i, _)| i == id))
            .filter(|e| e.status.ready_after_s.is_some() && self.is_ready_state(e))
            .filter_map(|e| e.image.digest.clone())
            .collect()
    }

    /// Releases every image of intents that expired by `now`.
    pub fn expire_intents(&self, now: u64) {
        let expired: Vec<usize> = self
            .lock()
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.retired && e.intent.as_ref().is_some_and(|(_, t)| *t <= now))
            .map(|(i, _)| i)
            .collect();
        for idx in expired {
            self.retire(idx, "its warm intent expired");
        }
    }

    pub(super) async fn expire_intents_every(&self, every: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => self.expire_intents(unix_now()),
            }
        }
    }

    /// Stops entry `idx`'s task, unpins its image in the store (blobs that
    /// other pins list stay pinned) and in containerd.
    fn retire(&self, idx: usize, why: &str) {
        let (rule, image, names) = {
            let mut entries = self.lock();
            let Some(e) = entries.get_mut(idx) else {
                return;
            };
            if e.retired {
                return;
            }
            e.retired = true;
            e.stop.cancel();
            (
                e.status.rule.clone(),
                e.image.clone(),
                std::mem::take(&mut e.containerd_names),
            )
        };
        tracing::info!(rule = %rule, image = %image, why, "prewarmed image released");
        if let Err(e) = self.inner.fetcher.store().unpin(&pin_target(&rule, &image)) {
            tracing::warn!(image = %image, error = %e, "cannot unpin a released image");
        }
        if let (Some(c), false) = (self.inner.containerd.clone(), names.is_empty()) {
            tokio::spawn(async move {
                if let Err(e) = c.set_pinned(&names, false).await {
                    tracing::warn!(error = %e, "cannot unpin a released image in containerd");
                }
            });
        }
        self.publish();
    }

    /// The live intents this node acts on.
    pub(super) fn intent_statuses(&self, entries: &[Entry]) -> Vec<IntentStatus> {
        let mut by_id: BTreeMap<String, IntentStatus> = BTreeMap::new();
        for e in entries.iter().filter(|e| !e.retired) {
            if let Some((id, expires_at)) = &e.intent {
                let s = by_id.entry(id.clone()).or_insert_with(|| IntentStatus {
                    id: id.clone(),
                    expires_at: *expires_at,
                    images: Vec::new(),
                });
                s.images.push(e.status.reference.clone());
            }
        }
        by_id.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent() -> Intent {
        Intent {
            id: "inference/llm".into(),
            images: vec![IntentImage {
                reference: "reg.example.com/llm:v3".into(),
                digest: format!("sha256:{}", "a".repeat(64)),
            }],
            replicas: 3,
            published_at: 1,
            expires_at: 2,
            gpu: Some(IntentSelector {
                product: Some("*A10G*".into()),
                ..IntentSelector::default()
            }),
        }
    }

    #[test]
    fn intents_round_trip_and_bad_ones_are_refused() {
        let i = intent();
        assert_eq!(Intent::decode(&i.encode()).unwrap(), i);
        let refs = i.image_refs();
        assert_eq!(refs[0].tag.as_deref(), Some("v3"));
        assert!(refs[0].digest.is_some());
        assert!(matches!(
            Intent::decode(b"{not json"),
            Err(IntentError::Decode(_))
        ));
        for bad in [
            Intent {
                id: "".into(),
                ..intent()
            },
            Intent {
                id: "a b".into(),
                ..intent()
            },
            Intent {
                images: vec![],
                ..intent()
            },
            Intent {
                images: vec![IntentImage {
                    reference: "Bad/Ref".into(),
                    digest: format!("sha256:{}", "a".repeat(64)),
                }],
                ..intent()
            },
            Intent {
                images: vec![IntentImage {
                    reference: "reg.example.com/llm:v3".into(),
                    digest: "sha256:short".into(),
                }],
                ..intent()
            },
            Intent {
                gpu: Some(IntentSelector {
                    product: Some("[x".into()),
                    ..IntentSelector::default()
                }),
                ..intent()
            },
        ] {
            assert!(
                matches!(
                    Intent::decode(&bad.encode()),
                    Err(IntentError::Invalid { .. })
                ),
                "{bad:?}"
            );
        }
        let too_many = Intent {
            images: vec![intent().images[0].clone(); MAX_IMAGES + 1],
            ..intent()
        };
        assert!(Intent::decode(&too_many.encode()).is_err());
    }

    #[test]
    fn an_intent_selects_nodes_like_a_rule() {
        use crate::gpu::{FactSource, GpuDevice, GpuFacts};
        let facts = |product: &str| GpuFacts {
            source: FactSource::Static,
            devices: vec![GpuDevice {
                index: 0,
                product: product.into(),
                memory_bytes: 24 << 30,
                compute_capability: None,
                mig_enabled: None,
                uuid: None,
            }],
            driver_version: None,
            cuda_version: None,
            note: None,
        };
        let i = intent();
        assert!(rules::evaluate(&i.as_rule(), &facts("NVIDIA A10G")).matched);
        assert!(!rules::evaluate(&i.as_rule(), &facts("NVIDIA L4")).matched);
        let everyone = Intent {
            gpu: None,
            ..intent()
        };
        assert!(rules::evaluate(&everyone.as_rule(), &GpuFacts::none("no NVML")).matched);
    }
}
