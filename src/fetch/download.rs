//! One download in flight: its progress, as readers see it, and how it
//! ends (out of the single-flight map, the verdict to every reader).

use std::io;
use std::sync::Arc;

use bytes::Bytes;

use super::{negative, Download, FetchError, Fetcher, Inner, Progress, Source};
use crate::oci::Digest;
use crate::origin::Upstream;
use crate::store::{Provenance, StoreError};

impl Progress {
    /// The end of the bytes on disk contiguous from `pos`.
    pub(super) fn available_from(&self, pos: u64) -> u64 {
        if self.filled.is_empty() || self.piece_size == 0 {
            return self.written.max(pos);
        }
        let ps = self.piece_size;
        let size = self.total.unwrap_or(u64::MAX);
        let mut end = pos;
        let mut k = (pos / ps) as usize;
        while k < self.filled.len() {
            let start = k as u64 * ps;
            let have = start + self.filled[k];
            if have <= end {
                break;
            }
            end = have;
            if have < (start + ps).min(size) {
                break;
            }
            k += 1;
        }
        end
    }
}

impl Download {
    pub(super) fn count(&self, source: Source, n: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        match source {
            Source::Peer => self.from_peers.fetch_add(n, Relaxed),
            _ => self.from_origin.fetch_add(n, Relaxed),
        };
    }

    pub(super) fn is_live(&self) -> bool {
        self.live.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether this download should hold back now, with `live` live
    /// downloads in flight (this one is never among them when it holds
    /// back).
    pub(super) fn yields_to(&self, live: usize) -> bool {
        live > 0 && !self.is_live()
    }

    /// Marks the download live (a live reader joined it); the count of live
    /// downloads wakes anything waiting on it.
    pub(super) fn promote(&self, inner: &Inner) {
        if !self.live.swap(true, std::sync::atomic::Ordering::SeqCst) {
            inner.live.send_modify(|n| *n += 1);
        }
    }

    /// Waits until the download knows the blob's size (or failed).
    pub(super) async fn size(&self) -> Result<u64, FetchError> {
        let mut rx = self.progress.subscribe();
        loop {
            {
                let p = rx.borrow_and_update();
                if let Some(Err(e)) = &p.done {
                    return Err(FetchError::Shared(e.clone()));
                }
                if let Some(total) = p.total {
                    return Ok(total);
                }
            }
            if rx.changed().await.is_err() {
                return Err(FetchError::Abandoned(self.digest.clone()));
            }
        }
    }

    /// Ends a download: out of the single-flight map (after the commit, so
    /// a new request finds the blob), and the verdict to every reader. An
    /// origin's 404 for `(registry, repo)` is remembered first, so that no
    /// request slips in between and asks the origin again.
    pub(super) fn finish(
        &self,
        inner: &Inner,
        result: Result<(), FetchError>,
        asked: (&Upstream, &str),
    ) {
        let result = result.map_err(Arc::new);
        if let Err(e) = &result {
            if negative::is_not_found(e) {
                inner.negative().insert(
                    asked.0.host(),
                    asked.1,
                    &self.digest,
                    e.clone(),
                    std::time::Instant::now(),
                );
            }
        }
        inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.digest);
        inner.metrics.downloads_in_flight.dec();
        if self.live.swap(false, std::sync::atomic::Ordering::SeqCst) {
            inner.live.send_modify(|n| *n = n.saturating_sub(1));
        }
        self.progress.send_modify(|p| p.done = Some(result));
    }
}

impl Fetcher {
    /// The one way a downloaded blob enters the store: its chunk sums
    /// first (a committed blob always has them, which verified reads need;
    /// a crash in between leaves a harmless orphan), then the rename of the
    /// proven partial file, its provenance, the store gauges, and the
    /// announcement to the swarm. `actual` is the digest the bytes hashed
    /// to, which the store checks against `digest` once more.
    pub(super) async fn commit_blob(
        &self,
        digest: &Digest,
        actual: Digest,
        size: u64,
        sums: &[u64],
        prov: &Provenance,
    ) -> Result<(), FetchError> {
        let inner = &self.inner;
        if let Err(e) = inner.store.set_sums(digest, sums) {
            tracing::debug!(digest = %digest, error = %e, "cannot record chunk checksums");
        }
        // fsync of a multi-GiB file, and any eviction it triggers, must not
        // hold a runtime worker.
        let store = inner.store.clone();
        let d = digest.clone();
        let path = inner.store.partial_path(digest);
        tokio::task::spawn_blocking(move || {
            store.commit(&d, &path, &actual, size, Some(size), None)
        })
        .await
        .map_err(FetchError::join("committing blob"))??;
        self.committed(digest, size, prov);
        Ok(())
    }

    /// Stores a small verified object (a manifest) whole, with its media
    /// type; the same bookkeeping as [`Fetcher::commit_blob`].
    pub(super) async fn commit_small(
        &self,
        digest: &Digest,
        body: &Bytes,
        media_type: &str,
        prov: &Provenance,
    ) -> Result<(), FetchError> {
        // fsyncs, and possibly an eviction: off the runtime.
        let store = self.inner.store.clone();
        let (d, b, mt) = (digest.clone(), body.clone(), media_type.to_owned());
        tokio::task::spawn_blocking(move || store.put_small(&d, &b, Some(&mt)))
            .await
            .map_err(FetchError::join("storing manifest"))??;
        self.committed(digest, body.len() as u64, prov);
        Ok(())
    }

    /// After a commit: provenance (best effort), gauges, announcement.
    fn committed(&self, digest: &Digest, size: u64, prov: &Provenance) {
        let inner = &self.inner;
        if let Err(e) = inner.store.set_provenance(digest, prov) {
            tracing::debug!(digest = %digest, error = %e, "cannot record provenance");
        }
        inner.store.usage().publish(&inner.metrics);
        if let Some(swarm) = &inner.swarm {
            swarm.blob_committed(digest, size);
        }
    }
}

/// Out of space (or quota) on the store's filesystem.
pub(super) fn is_disk_full(e: &FetchError) -> bool {
    let io = match e {
        FetchError::Io { source, .. } => source,
        FetchError::Store(StoreError::Io { source, .. }) => source,
        _ => return false,
    };
    matches!(
        io.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}
