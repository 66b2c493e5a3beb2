//! The daemon's side of warm intents: what arrives on the swarm's
//! [`INTENTS_TOPIC`] goes to [`Prewarm::apply_intent`], and each image of an
//! intent that becomes ready on this node is acked on [`READY_TOPIC`] once
//! per publication, so the sidecar can measure the lead time.
//!
//! - A message that does not decode, or fails [`Intent::decode`]'s checks,
//!   is refused: counted (`damselfly_prewarm_intents_total{result="refused"}`)
//!   and logged at most once per [`REFUSED_LOG_EVERY`], never acted on.
//! - An intent whose expiry has passed is a release: its images are
//!   unpinned now rather than at the next sweep.
//! - The sidecar publishes the same intent again (on an interval, and when
//!   a member joins); [`Prewarm::apply_intent`] only refreshes its expiry,
//!   and no ack is sent twice for one publication (`published_at`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::intent::Intent;
use super::{unix_now, Prewarm, Ready};
use crate::oci::Digest;
use crate::swarm::intents::{TopicMessage, INTENTS_TOPIC, READY_TOPIC};
use crate::swarm::Swarm;
use crate::telemetry::Throttle;

/// Bad intents are logged at most this often (the rest are counted).
pub const REFUSED_LOG_EVERY: Duration = Duration::from_secs(10);

/// A daemon's ack: image `digest` of workload `id`'s intent, published at
/// `published_at`, is ready on the sending node (the gossipsub source).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentReady {
    pub id: String,
    pub published_at: u64,
    pub digest: String,
}

impl IntentReady {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes and checks an ack from a peer.
    pub fn decode(bytes: &[u8]) -> Result<IntentReady, String> {
        let r: IntentReady = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if !crate::config::valid_workload_id(&r.id) {
            return Err(format!("bad workload id {:?}", truncate(&r.id)));
        }
        r.digest
            .parse::<Digest>()
            .map_err(|e| format!("{}: {e}", truncate(&r.digest)))?;
        Ok(r)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Follows the intents topic until `shutdown`.
pub fn follow(prewarm: Prewarm, swarm: Swarm, shutdown: CancellationToken) {
    let mut feed = Feed {
        prewarm,
        swarm,
        latest: HashMap::new(),
        acked: HashSet::new(),
        refused: Throttle::new(REFUSED_LOG_EVERY),
    };
    tokio::spawn(async move { feed.run(shutdown).await });
}

struct Feed {
    prewarm: Prewarm,
    swarm: Swarm,
    /// Workload id -> the publication this node acted on last.
    latest: HashMap<String, u64>,
    /// Acks sent: (id, published_at, digest).
    acked: HashSet<(String, u64, Digest)>,
    refused: Throttle,
}

impl Feed {
    async fn run(&mut self, shutdown: CancellationToken) {
        let mut messages = self.swarm.topic_messages();
        let mut ready = self.prewarm.ready_events();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                m = messages.recv() => match m {
                    Ok(m) if m.topic == INTENTS_TOPIC => self.on_intent(&m),
                    // Acks are for the sidecar.
                    Ok(_) => {}
                    Err(RecvError::Lagged(n)) => {
                        // The sidecar publishes again within its interval.
                        tracing::warn!(missed = n, "warm intent messages lagged");
                    }
                    Err(RecvError::Closed) => return,
                },
                r = ready.recv() => match r {
                    Ok(r) => self.on_ready(&r),
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }

    fn count(&self, result: &str) {
        self.prewarm
            .inner
            .metrics
            .intents
            .with_label_values(&[result])
            .inc();
    }

    fn on_intent(&mut self, m: &TopicMessage) {
        let intent = match Intent::decode(&m.data) {
            Ok(i) => i,
            Err(e) => {
                self.count("refused");
                if let Some(held) = self.refused.allow() {
                    tracing::warn!(from = %m.from, error = %e, bytes = m.data.len(),
                        refused_since_last_line = held, "refusing a warm intent");
                }
                return;
            }
        };
        if intent.expires_at <= unix_now() {
            let n = self.prewarm.release_intent(&intent.id);
            self.count("released");
            self.latest.remove(&intent.id);
            self.acked.retain(|(id, _, _)| *id != intent.id);
            if n > 0 {
                tracing::info!(intent = %intent.id, images = n, from = %m.from,
                    "warm intent released: its images are unpinned");
            }
            return;
        }
        if !self.prewarm.apply_intent(&intent) {
            self.count("other_nodes");
            return;
        }
        self.count("applied");
        let published = intent.published_at;
        if self.latest.insert(intent.id.clone(), published) != Some(published) {
            tracing::debug!(intent = %intent.id, published, "warm intent publication");
            self.acked
                .retain(|(id, p, _)| *id != intent.id || *p == published);
        }
        // Images that were ready before this publication (a restarted
        // sidecar, an intent that named them before) are acked at once.
        let wanted: HashSet<Digest> = intent
            .image_refs()
            .into_iter()
            .filter_map(|r| r.digest)
            .collect();
        for d in self.prewarm.intent_ready(&intent.id) {
            if wanted.contains(&d) {
                self.ack(&intent.id, published, d);
            }
        }
    }

    fn on_ready(&mut self, r: &Ready) {
        let Some(id) = Intent::id_of_rule(&r.rule) else {
            return;
        };
        if let Some(published) = self.latest.get(id).copied() {
            let id = id.to_owned();
            self.ack(&id, published, r.digest.clone());
        }
    }

    fn ack(&mut self, id: &str, published_at: u64, digest: Digest) {
        if !self
            .acked
            .insert((id.to_owned(), published_at, digest.clone()))
        {
            return;
        }
        tracing::info!(intent = %id, digest = %digest, "warm intent image ready here; acking");
        let msg = IntentReady {
            id: id.to_owned(),
            published_at,
            digest: digest.to_string(),
        };
        self.swarm.publish(READY_TOPIC, msg.encode());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_round_trip_and_bad_ones_are_refused() {
        let ok = IntentReady {
            id: "inference/llm".into(),
            published_at: 7,
            digest: format!("sha256:{}", "b".repeat(64)),
        };
        assert_eq!(IntentReady::decode(&ok.encode()).unwrap(), ok);
        for bad in [
            IntentReady {
                id: "no spaces".into(),
                ..ok.clone()
            },
            IntentReady {
                digest: "sha256:abc".into(),
                ..ok.clone()
            },
        ] {
            assert!(IntentReady::decode(&bad.encode()).is_err(), "{bad:?}");
        }
        assert!(IntentReady::decode(b"\xff\x00").is_err());
        assert!(IntentReady::decode(b"{}").is_err());
    }
}
