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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sha2::Digest as _;

    use super::*;
    use crate::store::Store;

    fn fetcher(dir: &std::path::Path) -> Fetcher {
        let cfg = crate::config::Config::defaults().unwrap();
        let (store, _) = Store::open(dir, 1 << 30).unwrap();
        let metrics = crate::telemetry::Metrics::new(&prometheus::Registry::new()).unwrap();
        let origin = crate::origin::Origin::new(&cfg, metrics.clone()).unwrap();
        Fetcher::new(&cfg, store, origin, metrics, None)
    }

    fn digest(i: u32) -> Digest {
        Digest::from_hex(&format!("{i:064x}")).unwrap()
    }

    fn put(store: &Store, data: &[u8]) -> Digest {
        let d = Digest::from_sha256(&sha2::Sha256::digest(data));
        let tmp = store.partial_path(&d);
        std::fs::write(&tmp, data).unwrap();
        let n = data.len() as u64;
        store.commit(&d, &tmp, &d, n, Some(n), None).unwrap();
        d
    }

    #[tokio::test(start_paused = true)]
    async fn the_pacer_holds_its_rate_and_never_bursts() {
        let mut p = Pacer::new(1 << 20);
        let t = Instant::now();
        for _ in 0..10 {
            p.take(1 << 20).await;
        }
        assert_eq!(t.elapsed().as_secs(), 10, "10 MiB at 1 MiB/s");
        // A long idle spell earns no credit.
        tokio::time::sleep(Duration::from_secs(100)).await;
        let t = Instant::now();
        for _ in 0..4 {
            p.take(256 << 10).await;
        }
        assert_eq!(t.elapsed().as_millis(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_scrub_pass_is_paced_resumes_and_quarantines_rot() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path());
        let store = f.store().clone();
        let blobs: Vec<(Digest, usize)> = (0..3u8)
            .map(|i| {
                let data = vec![i; (1 << 20) + 1000 * i as usize];
                (put(&store, &data), data.len())
            })
            .collect();
        let total: u64 = blobs.iter().map(|(_, n)| *n as u64).sum();
        let mut pacer = Pacer::new(1 << 20);
        let t = Instant::now();
        let pass = f
            .scrub_pass(&mut pacer, ScrubState::default())
            .await
            .unwrap();
        assert_eq!(
            pass,
            ScrubPass {
                blobs: 3,
                bytes: total,
                corrupt: 0,
                sums_fixed: 3,
            }
        );
        // Paced: about the bytes at 1 MiB/s (the last chunk of each blob
        // is not waited for).
        let took = t.elapsed().as_secs_f64();
        assert!(
            (2.9..=total as f64 / (1 << 20) as f64 + 0.01).contains(&took),
            "{took}"
        );
        let state = store.scrub_state();
        assert!(state.started > 0 && state.after.is_none());

        // Rot in the last blob by digest, and a pass that resumes after the
        // first: only two blobs are read.
        let mut sorted = blobs.clone();
        sorted.sort();
        let (bad, _) = &sorted[2];
        {
            use std::os::unix::fs::FileExt as _;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(store.blob_path_of(bad))
                .unwrap();
            file.write_all_at(b"\xff\xfe", 10).unwrap();
        }
        let resume = ScrubState {
            started: 1,
            after: Some(sorted[0].0.to_string()),
        };
        let pass = f.scrub_pass(&mut pacer, resume).await.unwrap();
        assert_eq!((pass.blobs, pass.corrupt, pass.sums_fixed), (2, 1, 0));
        assert!(!store.contains(bad));
        assert_eq!(store.quarantined().len(), 1);
        assert_eq!(
            f.inner
                .metrics
                .corrupt_blobs
                .with_label_values(&["scrub"])
                .get(),
            1
        );
        assert_eq!(f.inner.metrics.scrub_passes.get(), 2);
        assert_eq!(
            store.scrub_state().started,
            1,
            "a resumed pass keeps its start"
        );
    }

    #[test]
    fn idle_partials_are_bounded_in_age_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path());
        let store = f.store().clone();
        let now = SystemTime::now();
        let n = MAX_IDLE_PARTIALS + 10;
        for i in 0..n as u32 {
            let path = store.partial_path(&digest(i));
            std::fs::write(&path, b"part").unwrap();
            // i minutes old; the first three are two days old.
            let age = if i < 3 {
                Duration::from_secs(48 * 3600)
            } else {
                Duration::from_secs(60 * i as u64)
            };
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(now - age)
                .unwrap();
        }
        // The oldest partial of all is in flight: never touched.
        let busy = digest(n as u32 - 1);
        let file = Arc::new(std::fs::File::open(store.partial_path(&busy)).unwrap());
        f.inflight().insert(
            busy.clone(),
            Arc::new(super::super::Download {
                digest: busy.clone(),
                progress: tokio::sync::watch::Sender::new(Default::default()),
                file,
                wants: None,
                live: Default::default(),
                pulling: Default::default(),
                from_origin: Default::default(),
                from_peers: Default::default(),
            }),
        );
        let swept = f.sweep_partials(now);
        assert_eq!(swept.expired, 3);
        // n - 1 idle, 3 expired: the rest beyond the limit go, oldest first.
        assert_eq!(swept.over_count as usize, n - 1 - 3 - MAX_IDLE_PARTIALS);
        let left: Vec<Digest> = store
            .partials_aged()
            .into_iter()
            .map(|p| p.digest)
            .collect();
        assert_eq!(left.len(), MAX_IDLE_PARTIALS + 1);
        assert!(left.contains(&busy));
        assert!(left.contains(&digest(3)), "the newest stay");
        assert!(!left.contains(&digest(0)));
        assert!(
            !left.contains(&digest(n as u32 - 2)),
            "the oldest idle one went"
        );
        assert_eq!(f.sweep_partials(now), Swept::default());
    }
}
