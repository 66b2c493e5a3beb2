//! Background upkeep while the daemon runs: the sweep that bounds partial
//! downloads in count and age, and the scrub that re-verifies committed
//! blobs at `store.scrub_rate`, so that rot is found before a pull needs
//! the blob.
//!
//! The scrub walks the blobs in digest order, one chunk at a time, sleeping
//! between chunks to hold its rate. Each blob gets a full check (SHA-256
//! and chunk sums): a good blob whose sums were missing or wrong gets them
//! written again, a bad one is quarantined and fetched again. Where it
//! stands is kept in `scrub.json`, so a restart resumes the pass instead of
//! starting over, and passes start `store.scrub_every` apart.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::verify::FoundBy;
use super::Fetcher;
use crate::config::StoreConfig;
use crate::oci::Digest;
use crate::store::{Checked, ScrubState, PARTIAL_TTL};

/// Partial downloads that no download is using are kept for resumption up
/// to this many (an image's worth of interrupted layers); the oldest go
/// first. Downloads in flight are never touched.
pub const MAX_IDLE_PARTIALS: usize = 64;

/// How often partial downloads are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// How often the scrub writes down where it is (at most; also at the end
/// of a pass).
const SCRUB_SAVE_EVERY: Duration = Duration::from_secs(10);

/// Holds a byte rate: after each `take(n)` the caller sleeps until the n
/// bytes are paid for. Time spent idle or reading slowly earns no credit,
/// so it never bursts.
pub(crate) struct Pacer {
    secs_per_byte: f64,
    next: Instant,
}

impl Pacer {
    pub(crate) fn new(bytes_per_sec: u64) -> Pacer {
        Pacer {
            secs_per_byte: 1.0 / bytes_per_sec.max(1) as f64,
            next: Instant::now(),
        }
    }

    pub(crate) async fn take(&mut self, n: u64) {
        let now = Instant::now();
        if self.next < now {
            self.next = now;
        }
        self.next += Duration::from_secs_f64(n as f64 * self.secs_per_byte);
        tokio::time::sleep_until(self.next).await;
    }
}

/// What one sweep removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    pub expired: u64,
    pub over_count: u64,
    pub bytes: u64,
}

/// What one scrub pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrubPass {
    pub blobs: u64,
    pub bytes: u64,
    pub corrupt: u64,
    pub sums_fixed: u64,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Fetcher {
    /// Starts the partial sweep and (with a rate) the scrub, until `stop`.
    pub fn spawn_upkeep(&self, cfg: &StoreConfig, stop: CancellationToken) {
        let me = self.clone();
        let sweep_stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tokio::select! {
                    _ = sweep_stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let f = me.clone();
                let _ =
                    tokio::task::spawn_blocking(move || f.sweep_partials(SystemTime::now())).await;
            }
        });
        if cfg.scrub_rate > 0 {
            let me = self.clone();
            let (rate, every) = (cfg.scrub_rate, cfg.scrub_every);
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = me.scrub_forever(rate, every) => {}
                }
            });
        }
    }

    /// Removes partial downloads that nothing uses and that are older than
    /// [`PARTIAL_TTL`], then the oldest of those past
    /// [`MAX_IDLE_PARTIALS`]. Blocking.
    pub fn sweep_partials(&self, now: SystemTime) -> Swept {
        let mut idle: Vec<_> = {
            let inflight = self.inflight();
            self.inner
                .store
                .partials_aged()
                .into_iter()
                .filter(|p| !inflight.contains_key(&p.digest))
                .collect()
        };
        idle.sort_by_key(|p| std::cmp::Reverse(p.modified));
        let mut swept = Swept::default();
        for (i, p) in idle.iter().enumerate() {
            let expired = now
                .duration_since(p.modified)
                .is_ok_and(|age| age > PARTIAL_TTL);
            if !expired && i < MAX_IDLE_PARTIALS {
                continue;
            }
            // Under the single-flight lock: a download that starts now
            // opens the file under it too, so it never writes to a file
            // that is being removed.
            let inflight = self.inflight();
            if inflight.contains_key(&p.digest) {
                continue;
            }
            match self.inner.store.remove_partial(&p.digest) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(digest = %p.digest, error = %e, "cannot remove a partial download");
                    continue;
                }
            }
            drop(inflight);
            let reason = if expired { "expired" } else { "over_count" };
            if expired {
                swept.expired += 1;
            } else {
                swept.over_count += 1;
            }
            swept.bytes += p.bytes;
            self.inner
                .metrics
                .partials_removed
                .with_label_values(&[reason])
                .inc();
        }
        if swept != Swept::default() {
            tracing::info!(
                expired = swept.expired,
                over_count = swept.over_count,
                bytes = swept.bytes,
                max_idle = MAX_IDLE_PARTIALS,
                "removed idle partial downloads"
            );
        }
        swept
    }

    async fn scrub_forever(&self, rate: u64, every: Duration) {
        let mut pacer = Pacer::new(rate);
        loop {
            let state = self.inner.store.scrub_state();
            if state.after.is_none() && state.started > 0 {
                let due = state.started.saturating_add(every.as_secs());
                let now = unix(SystemTime::now());
                if due > now {
                    tokio::time::sleep(Duration::from_secs(due - now)).await;
                    continue;
                }
            }
            let started = std::time::Instant::now();
            match self.scrub_pass(&mut pacer, state).await {
                Ok(p) => tracing::info!(
                    blobs = p.blobs,
                    bytes = p.bytes,
                    corrupt = p.corrupt,
                    sums_fixed = p.sums_fixed,
                    secs = started.elapsed().as_secs(),
                    "scrub pass done"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "scrub pass stopped; trying again in a minute");
                    tokio::time::sleep(SWEEP_EVERY).await;
                }
            }
        }
    }

    /// One scrub pass: from where `state` says, or from the start.
    pub(crate) async fn scrub_pass(
        &self,
        pacer: &mut Pacer,
        mut state: ScrubState,
    ) -> Result<ScrubPass, crate::store::StoreError> {
        let store = self.inner.store.clone();
        if state.after.is_none() {
            state.started = unix(SystemTime::now());
        } else {
            tracing::info!(after = ?state.after, "resuming the scrub pass");
        }
        store.set_scrub_state(&state)?;
        let after: Option<Digest> = state.after.as_deref().and_then(|d| d.parse().ok());
        let mut todo: Vec<Digest> = store
            .blobs()
            .into_iter()
            .map(|b| b.digest)
            .filter(|d| after.as_ref().is_none_or(|a| d > a))
            .collect();
        todo.sort();
        let mut pass = ScrubPass::default();
        let mut saved = std::time::Instant::now();
        for digest in todo {
            let Some(mut check) = store.check_blob(&digest)? else {
                continue;
            };
            let checked = loop {
                let (c, n) = tokio::task::spawn_blocking(move || {
                    let n = check.step();
                    (check, n)
                })
                .await
                .map_err(|e| crate::store::StoreError::Io {
                    path: store.root().to_owned(),
                    source: std::io::Error::other(e),
                })?;
                check = c;
                let n = match n {
                    Ok(n) => n,
                    // Evicted under us is fine (the handle stays valid);
                    // an unreadable file is rot too, but it has no bytes to
                    // compare: leave it to the next read.
                    Err(e) => {
                        tracing::warn!(digest = %digest, error = %e, "scrub cannot read a blob");
                        break None;
                    }
                };
                self.inner.metrics.scrub_bytes.inc_by(n);
                pass.bytes += n;
                if n == 0 {
                    // Before the verdict: a quarantine removes the record.
                    let target = self.provenance_target(&digest);
                    let s = store.clone();
                    let verdict = tokio::task::spawn_blocking(move || check.finish(&s))
                        .await
                        .map_err(|e| crate::store::StoreError::Io {
                            path: store.root().to_owned(),
                            source: std::io::Error::other(e),
                        })??;
                    break Some((verdict, target));
                }
                pacer.take(n).await;
            };
            pass.blobs += 1;
            if let Some((verdict, target)) = checked {
                match &verdict {
                    Checked::Good {
                        sums_fixed: true, ..
                    } => pass.sums_fixed += 1,
                    Checked::Corrupt { .. } => pass.corrupt += 1,
                    _ => {}
                }
                self.judged(&digest, &verdict, FoundBy::Scrub, target);
            }
            state.after = Some(digest.to_string());
            if saved.elapsed() >= SCRUB_SAVE_EVERY {
                store.set_scrub_state(&state)?;
                saved = std::time::Instant::now();
            }
        }
        state.after = None;
        store.set_scrub_state(&state)?;
        self.inner.metrics.scrub_passes.inc();
        Ok(pass)
    }
}
