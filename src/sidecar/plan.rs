//! An intent's life, decided from observations alone (no I/O, the clock
//! passed in), so every rule is unit-tested:
//!
//! - **Open** when the wanted replicas rise above the current ones (with
//!   `sidecar.current_query`), or above zero (without). The caller resolves
//!   the images, then [`Planner::open`]s the intent and publishes it.
//! - **Update** at once when the wanted replicas rise again above the
//!   intent's (and the current ones), or when an image that could not be
//!   resolved now is.
//! - **Renew** the expiry on every good read while the wanted replicas are
//!   above zero or the cooldown runs; the renewed intent goes out at the
//!   next republish.
//! - **Release** once the wanted replicas stayed at zero for the cooldown.
//! - **Hold** while the signal fails: no renewal, no new intent; the last
//!   one lives until its expiry and is then dropped (the daemons release it
//!   at the same moment on their own).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use crate::config::GpuSelector;
use crate::oci::{Digest, ImageRef};
use crate::prewarm::{Intent, IntentImage, IntentSelector};

/// What one read of the signal gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    Signal { wanted: u32, current: Option<u32> },
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    /// Resolve the images and [`Planner::open`] an intent for `replicas`.
    Open {
        replicas: u32,
    },
    /// The live intent changed: publish it now.
    PublishNow,
    /// Publish the release (see [`Live::release`]); the intent is gone.
    Release,
    /// The held intent reached its expiry while the signal failed.
    Expired,
}

/// One image of the live intent.
#[derive(Debug, Clone)]
pub struct LiveImage {
    pub image: ImageRef,
    pub digest: Option<Digest>,
    /// Why the last resolution failed.
    pub error: Option<String>,
    /// Publication to the first ack: the lead time.
    pub lead: Option<Duration>,
    /// Publication to each node's ack.
    pub ready_on: BTreeMap<PeerId, Duration>,
}

impl LiveImage {
    pub fn new(image: ImageRef) -> LiveImage {
        LiveImage {
            image,
            digest: None,
            error: None,
            lead: None,
            ready_on: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Live {
    /// Seconds since the Unix epoch of the first publication.
    pub published_at: u64,
    pub opened: Instant,
    pub replicas: u32,
    pub expires_at: u64,
    /// Since when the wanted replicas are zero.
    pub zero_since: Option<Instant>,
    pub images: Vec<LiveImage>,
}

impl Live {
    /// The intent to publish now; `None` while no image is resolved.
    pub fn intent(&self, workload: &str, gpu: Option<&IntentSelector>) -> Option<Intent> {
        self.intent_expiring(workload, gpu, self.expires_at)
    }

    /// The release: the same intent, expired at `unix` (daemons unpin an
    /// intent whose expiry passed as soon as they hear it).
    pub fn release(
        &self,
        workload: &str,
        gpu: Option<&IntentSelector>,
        unix: u64,
    ) -> Option<Intent> {
        self.intent_expiring(workload, gpu, unix)
    }

    fn intent_expiring(
        &self,
        workload: &str,
        gpu: Option<&IntentSelector>,
        expires_at: u64,
    ) -> Option<Intent> {
        let images: Vec<IntentImage> = self
            .images
            .iter()
            .filter_map(|i| {
                Some(IntentImage {
                    reference: i.image.to_string(),
                    digest: i.digest.as_ref()?.to_string(),
                })
            })
            .collect();
        if images.is_empty() {
            return None;
        }
        Some(Intent {
            id: workload.to_owned(),
            images,
            replicas: self.replicas,
            published_at: self.published_at,
            expires_at,
            gpu: gpu.cloned(),
        })
    }

    /// A node's ack; returns the lead time when it is the image's first.
    /// Acks of another publication, or for a digest the intent does not
    /// name, are ignored.
    pub fn record_ready(
        &mut self,
        peer: PeerId,
        published_at: u64,
        digest: &Digest,
        now: Instant,
    ) -> Option<(usize, Duration)> {
        if published_at != self.published_at {
            return None;
        }
        let after = now.saturating_duration_since(self.opened);
        let (idx, img) = self
            .images
            .iter_mut()
            .enumerate()
            .find(|(_, i)| i.digest.as_ref() == Some(digest))?;
        img.ready_on.entry(peer).or_insert(after);
        if img.lead.is_none() {
            img.lead = Some(after);
            return Some((idx, after));
        }
        None
    }
}

/// The intent's expiry and cooldown.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub cooldown: Duration,
    pub ttl: Duration,
}

#[derive(Debug)]
pub struct Planner {
    policy: Policy,
    pub live: Option<Live>,
}

impl Planner {
    pub fn new(policy: Policy) -> Planner {
        Planner { policy, live: None }
    }

    pub fn observe(&mut self, obs: Observation, now: Instant, unix: u64) -> Decision {
        let ttl = self.policy.ttl.as_secs().max(1);
        match (obs, self.live.as_mut()) {
            (Observation::Failed, None) => Decision::Nothing,
            (Observation::Failed, Some(l)) => {
                if l.expires_at <= unix {
                    self.live = None;
                    Decision::Expired
                } else {
                    Decision::Nothing
                }
            }
            (Observation::Signal { wanted: 0, .. }, None) => Decision::Nothing,
            (Observation::Signal { wanted: 0, .. }, Some(l)) => {
                let since = *l.zero_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= self.policy.cooldown {
                    Decision::Release
                } else {
                    l.expires_at = unix + ttl;
                    Decision::Nothing
                }
            }
            (Observation::Signal { wanted, current }, None) => {
                if wanted > current.unwrap_or(0) {
                    Decision::Open { replicas: wanted }
                } else {
                    Decision::Nothing
                }
            }
            (Observation::Signal { wanted, current }, Some(l)) => {
                l.zero_since = None;
                l.expires_at = unix + ttl;
                let rose = wanted > l.replicas && wanted > current.unwrap_or(0);
                l.replicas = wanted;
                if rose {
                    Decision::PublishNow
                } else {
                    Decision::Nothing
                }
            }
        }
    }

    /// Opens the intent after a [`Decision::Open`] with what resolution
    /// gave; the caller publishes it when [`Live::intent`] is `Some`.
    pub fn open(&mut self, replicas: u32, images: Vec<LiveImage>, now: Instant, unix: u64) {
        self.live = Some(Live {
            published_at: unix,
            opened: now,
            replicas,
            expires_at: unix + self.policy.ttl.as_secs().max(1),
            zero_since: None,
            images,
        });
    }

    /// Ends the live intent (after [`Decision::Release`] was published).
    pub fn close(&mut self) -> Option<Live> {
        self.live.take()
    }

    /// Seconds left of the cooldown, while it runs.
    pub fn cooldown_left(&self, now: Instant) -> Option<Duration> {
        let since = self.live.as_ref()?.zero_since?;
        Some(
            self.policy
                .cooldown
                .saturating_sub(now.saturating_duration_since(since)),
        )
    }
}

/// `[sidecar.gpu]` as the intent's selector.
pub fn intent_selector(g: &GpuSelector) -> IntentSelector {
    IntentSelector {
        product: g.product.as_ref().map(|p| p.pattern.clone()),
        min_memory: g.min_memory,
        min_count: g.min_count,
        mig: g.mig,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn planner() -> Planner {
        Planner::new(Policy {
            cooldown: Duration::from_secs(300),
            ttl: Duration::from_secs(600),
        })
    }

    fn image(digest: Option<u8>) -> LiveImage {
        let mut i = LiveImage::new(ImageRef::parse("reg.example.com/llm:v3").unwrap());
        i.digest = digest.map(|n| Digest::from_sha256(&[n; 32]));
        i
    }

    fn sig(wanted: u32) -> Observation {
        Observation::Signal {
            wanted,
            current: None,
        }
    }

    #[test]
    fn zero_then_twelve_opens_once_and_a_steady_signal_publishes_nothing_more() {
        let mut p = planner();
        let t = Instant::now();
        assert_eq!(p.observe(sig(0), t, T0), Decision::Nothing);
        assert_eq!(p.observe(sig(0), t, T0 + 15), Decision::Nothing);
        // Queue depth 12 at threshold 5: 3 replicas.
        let d = p.observe(sig(3), t, T0 + 30);
        assert_eq!(d, Decision::Open { replicas: 3 });
        p.open(3, vec![image(Some(1))], t, T0 + 30);
        let i = p
            .live
            .as_ref()
            .unwrap()
            .intent("inference/llm", None)
            .unwrap();
        assert_eq!(
            (i.replicas, i.published_at, i.expires_at),
            (3, T0 + 30, T0 + 630)
        );
        assert_eq!(i.images[0].reference, "reg.example.com/llm:v3");
        // The same signal again: the expiry is renewed, nothing is sent now.
        for k in 1..20 {
            assert_eq!(p.observe(sig(3), t, T0 + 30 + 15 * k), Decision::Nothing);
        }
        assert_eq!(p.live.as_ref().unwrap().expires_at, T0 + 30 + 15 * 19 + 600);
        // Falling and rising back to where it was is not a rise either.
        assert_eq!(p.observe(sig(2), t, T0 + 400), Decision::Nothing);
        assert_eq!(p.observe(sig(3), t, T0 + 415), Decision::PublishNow);
        assert_eq!(p.observe(sig(5), t, T0 + 430), Decision::PublishNow);
        assert_eq!(p.live.as_ref().unwrap().replicas, 5);
        assert_eq!(p.live.as_ref().unwrap().published_at, T0 + 30);
    }

    #[test]
    fn with_current_replicas_only_a_rise_above_them_opens() {
        let mut p = planner();
        let t = Instant::now();
        let obs = |wanted, current| Observation::Signal {
            wanted,
            current: Some(current),
        };
        assert_eq!(p.observe(obs(3, 3), t, T0), Decision::Nothing);
        assert_eq!(p.observe(obs(2, 3), t, T0), Decision::Nothing);
        assert_eq!(p.observe(obs(4, 3), t, T0), Decision::Open { replicas: 4 });
        p.open(4, vec![image(Some(1))], t, T0);
        // KEDA caught up: 4 exist, 4 wanted. No new publication.
        assert_eq!(p.observe(obs(4, 4), t, T0 + 15), Decision::Nothing);
        // Wanted above the intent's but not above what exists: nothing.
        assert_eq!(p.observe(obs(6, 8), t, T0 + 30), Decision::Nothing);
        assert_eq!(p.observe(obs(9, 8), t, T0 + 45), Decision::PublishNow);
    }

    #[test]
    fn the_cooldown_at_zero_releases_and_a_rise_in_it_cancels_it() {
        let mut p = planner();
        let t = Instant::now();
        assert_eq!(p.observe(sig(2), t, T0), Decision::Open { replicas: 2 });
        p.open(2, vec![image(Some(1))], t, T0);
        assert_eq!(p.observe(sig(0), t, T0 + 10), Decision::Nothing);
        let later = t + Duration::from_secs(200);
        assert_eq!(p.observe(sig(0), later, T0 + 210), Decision::Nothing);
        assert_eq!(p.cooldown_left(later), Some(Duration::from_secs(100)));
        // The expiry is renewed during the cooldown: it must not lapse first.
        assert_eq!(p.live.as_ref().unwrap().expires_at, T0 + 810);
        // Back up: the cooldown starts over later.
        assert_eq!(p.observe(sig(1), later, T0 + 211), Decision::Nothing);
        assert_eq!(p.cooldown_left(later), None);
        let z = t + Duration::from_secs(300);
        assert_eq!(p.observe(sig(0), z, T0 + 300), Decision::Nothing);
        let done = z + Duration::from_secs(300);
        assert_eq!(p.observe(sig(0), done, T0 + 600), Decision::Release);
        let live = p.close().unwrap();
        let r = live.release("inference/llm", None, T0 + 600).unwrap();
        assert_eq!(r.expires_at, T0 + 600);
        assert!(p.live.is_none());
        assert_eq!(p.observe(sig(0), done, T0 + 615), Decision::Nothing);
    }

    #[test]
    fn a_failing_signal_holds_the_last_intent_until_it_expires_and_opens_nothing() {
        let mut p = planner();
        let t = Instant::now();
        assert_eq!(p.observe(Observation::Failed, t, T0), Decision::Nothing);
        assert!(p.live.is_none());
        assert_eq!(p.observe(sig(3), t, T0), Decision::Open { replicas: 3 });
        p.open(3, vec![image(Some(1))], t, T0);
        for k in 1..40 {
            assert_eq!(
                p.observe(Observation::Failed, t, T0 + 15 * k),
                Decision::Nothing
            );
        }
        // Never renewed while failing.
        assert_eq!(p.live.as_ref().unwrap().expires_at, T0 + 600);
        assert_eq!(
            p.observe(Observation::Failed, t, T0 + 600),
            Decision::Expired
        );
        assert!(p.live.is_none());
        // A cooldown does not advance on failures either: only zeros count.
    }

    #[test]
    fn unresolved_images_stay_out_and_acks_give_the_lead_time_once() {
        let mut p = planner();
        let t = Instant::now();
        p.open(3, vec![image(None)], t, T0);
        assert!(p.live.as_ref().unwrap().intent("a/b", None).is_none());
        p.open(3, vec![image(Some(1)), image(None)], t, T0);
        let live = p.live.as_mut().unwrap();
        let i = live.intent("a/b", None).unwrap();
        assert_eq!(i.images.len(), 1);
        assert!(Intent::decode(&i.encode()).is_ok());
        let (a, b) = (PeerId::random(), PeerId::random());
        let d1 = Digest::from_sha256(&[1; 32]);
        let at = |s| t + Duration::from_millis(s);
        assert_eq!(
            live.record_ready(a, T0 - 1, &d1, at(100)),
            None,
            "old publication"
        );
        assert_eq!(
            live.record_ready(a, T0, &Digest::from_sha256(&[9; 32]), at(100)),
            None,
            "not its image"
        );
        assert_eq!(
            live.record_ready(a, T0, &d1, at(1800)),
            Some((0, Duration::from_millis(1800)))
        );
        assert_eq!(live.record_ready(b, T0, &d1, at(2500)), None);
        assert_eq!(live.record_ready(a, T0, &d1, at(9000)), None);
        let img = &live.images[0];
        assert_eq!(img.lead, Some(Duration::from_millis(1800)));
        assert_eq!(img.ready_on.len(), 2);
        assert_eq!(img.ready_on[&a], Duration::from_millis(1800));
    }

    #[test]
    fn the_gpu_selector_travels() {
        let g = GpuSelector {
            product: Some(crate::config::ProductGlob::new("*A10G*").unwrap()),
            min_memory: Some(20 << 30),
            min_count: 2,
            mig: Some(false),
            min_compute_capability: None,
        };
        let s = intent_selector(&g);
        assert_eq!(s.product.as_deref(), Some("*A10G*"));
        assert_eq!(
            (s.min_memory, s.min_count, s.mig),
            (Some(20 << 30), 2, Some(false))
        );
    }
}
