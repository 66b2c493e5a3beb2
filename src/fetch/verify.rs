//! Verified reads: a cache hit is checked as it is served.
//!
//! Every blob committed by a download has its chunk sums recorded (xxh3-64
//! of each MiB, computed over the bytes that were hashed and written). A
//! blob served from the store, to the mirror's clients and to peers alike,
//! is read in whole chunks, and each chunk is compared with its sum on the
//! buffer that is about to be sent; nothing is read twice. A chunk that does
//! not match is never sent: the body stops before it (the client sees a
//! short body and retries), the blob is moved to `quarantine/`, counted in
//! `damselfly_corrupt_blobs_total`, logged with its path and offset, and
//! fetched again through the normal path (peers, else the origin), which
//! the client's retry joins.
//!
//! A committed blob without sums (one from before sums were recorded, or
//! whose sums file was lost) gets them from one full SHA-256 check, single
//! flight per digest, before it is served; the request waits for it.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{BoxFuture, Shared};
use futures_util::FutureExt;

use super::{Blob, BlobBody, FetchError, Fetcher, Source};
use crate::oci::Digest;
use crate::origin::Upstream;
use crate::store::{Checked, Opened, SUM_CHUNK};

/// Who found a blob's bytes wrong: the label of
/// `damselfly_corrupt_blobs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoundBy {
    /// A cache hit for the mirror's client.
    Mirror,
    /// A cache hit for a peer, on the data plane.
    Peer,
    Scrub,
}

impl FoundBy {
    pub fn as_str(self) -> &'static str {
        match self {
            FoundBy::Mirror => "mirror",
            FoundBy::Peer => "peer",
            FoundBy::Scrub => "scrub",
        }
    }
}

/// Where a blob is fetched again from: the registry and repository of the
/// request that found it bad, else those it was first fetched for.
pub(super) type Refetch = Option<(Upstream, String)>;

/// What a verified read needs to act on a bad chunk.
pub(super) struct Guard {
    pub(super) fetcher: Fetcher,
    pub(super) digest: Digest,
    pub(super) found_by: FoundBy,
    pub(super) refetch: Refetch,
}

/// The outcome of a sums check, shared by every request that waited on it.
type CheckFuture = Shared<BoxFuture<'static, Result<bool, Arc<FetchError>>>>;

/// Sums checks in flight, by digest.
pub(super) type Checks = std::sync::Mutex<HashMap<Digest, CheckFuture>>;

/// Why a verified read failed.
pub(super) enum ReadFail {
    Io(io::Error),
    /// The chunk at this offset does not match its sum.
    Rot {
        offset: u64,
    },
}

/// A read from the store in progress on a blocking thread.
pub(super) type PendingRead = tokio::task::JoinHandle<Result<Bytes, ReadFail>>;

/// Starts reading bytes `at..at + len`. With `sums` (the sums of the chunks
/// the span covers, in order; `at` on a chunk boundary), each chunk is
/// checked on the buffer that will be sent, before it is handed back.
pub(super) fn start_read(
    file: Arc<File>,
    at: u64,
    len: u64,
    sums: Option<Vec<u64>>,
) -> PendingRead {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, at).map_err(|e| {
            ReadFail::Io(if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(e.kind(), "blob file is shorter than expected")
            } else {
                e
            })
        })?;
        if let Some(sums) = sums {
            for (i, chunk) in buf.chunks(SUM_CHUNK as usize).enumerate() {
                if sums.get(i) != Some(&xxhash_rust::xxh3::xxh3_64(chunk)) {
                    return Err(ReadFail::Rot {
                        offset: at + i as u64 * SUM_CHUNK,
                    });
                }
            }
        }
        Ok(Bytes::from(buf))
    })
}

/// A check of bytes from the store in progress on a blocking thread; it
/// hands its buffer back for the next one.
pub(super) type PendingCheck = tokio::task::JoinHandle<(Vec<u8>, Result<(), ReadFail>)>;

/// Checks bytes `at..at + len` against `sums` (the sums of the chunks the
/// span covers, in order; `at` on a chunk boundary) without keeping them:
/// for a sender that hands the same range of the file to the kernel
/// (sendfile), which sends it from the page cache the check just read.
/// Reads through `buf`, which can be smaller than a chunk, so that a
/// reader needs no chunk-sized buffer and the bytes stay in the CPU cache
/// between the read and the hash.
pub(super) fn start_check(
    file: Arc<File>,
    at: u64,
    len: u64,
    sums: Vec<u64>,
    mut buf: Vec<u8>,
) -> PendingCheck {
    tokio::task::spawn_blocking(move || {
        let r = check_span(&file, at, len, &sums, &mut buf);
        (buf, r)
    })
}

fn check_span(
    file: &File,
    at: u64,
    len: u64,
    sums: &[u64],
    buf: &mut [u8],
) -> Result<(), ReadFail> {
    let end = at + len;
    let mut chunk_start = at;
    for sum in sums {
        if chunk_start >= end {
            break;
        }
        let chunk_end = (chunk_start + SUM_CHUNK).min(end);
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut pos = chunk_start;
        while pos < chunk_end {
            let n = ((chunk_end - pos) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], pos).map_err(|e| {
                ReadFail::Io(if e.kind() == io::ErrorKind::UnexpectedEof {
                    io::Error::new(e.kind(), "blob file is shorter than expected")
                } else {
                    e
                })
            })?;
            h.update(&buf[..n]);
            pos += n as u64;
        }
        if h.digest() != *sum {
            return Err(ReadFail::Rot {
                offset: chunk_start,
            });
        }
        chunk_start = chunk_end;
    }
    if chunk_start < end {
        // Fewer sums than chunks: the sums file does not fit the blob.
        return Err(ReadFail::Rot {
            offset: chunk_start,
        });
    }
    Ok(())
}

impl Fetcher {
    /// A committed blob, ready to serve with verified reads (when they are
    /// on). `None` when its bytes turned out wrong: it was quarantined and
    /// its refetch started, so the caller joins that download.
    pub(super) async fn local_blob(
        &self,
        opened: Opened,
        digest: &Digest,
        found_by: FoundBy,
        refetch: Refetch,
    ) -> Result<Option<Blob>, FetchError> {
        let guard = if self.inner.verify_reads {
            if !self.inner.store.has_sums(digest, opened.size)
                && !self
                    .ensure_sums(digest, found_by, refetch.clone())
                    .await
                    .map_err(FetchError::Shared)?
            {
                return Ok(None);
            }
            Some(Arc::new(Guard {
                fetcher: self.clone(),
                digest: digest.clone(),
                found_by,
                refetch,
            }))
        } else {
            None
        };
        Ok(Some(Blob {
            size: opened.size,
            source: Source::Local,
            for_peer: found_by == FoundBy::Peer,
            body: BlobBody::Local {
                file: Arc::new(opened.file),
                lease: opened.lease,
                guard,
            },
        }))
    }

    /// Checks committed blob `digest` in full (SHA-256) and records its
    /// chunk sums; one check per digest however many requests wait.
    /// `Ok(true)`: good (or gone, and so not served from the store);
    /// `Ok(false)`: corrupt, quarantined, refetch started.
    async fn ensure_sums(
        &self,
        digest: &Digest,
        found_by: FoundBy,
        refetch: Refetch,
    ) -> Result<bool, Arc<FetchError>> {
        let fut = {
            let mut checks = self.inner.checks.lock().unwrap_or_else(|p| p.into_inner());
            checks
                .entry(digest.clone())
                .or_insert_with(|| {
                    let me = self.clone();
                    let d = digest.clone();
                    async move {
                        let r = me.check_now(&d, found_by, refetch).await;
                        me.inner
                            .checks
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&d);
                        r.map_err(Arc::new)
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        fut.await
    }

    async fn check_now(
        &self,
        digest: &Digest,
        found_by: FoundBy,
        refetch: Refetch,
    ) -> Result<bool, FetchError> {
        // Read before a quarantine removes it.
        let refetch = refetch.or_else(|| self.provenance_target(digest));
        let store = self.inner.store.clone();
        let d = digest.clone();
        let checked = tokio::task::spawn_blocking(move || match store.check_blob(&d)? {
            Some(check) => check.run(&store),
            None => Ok(Checked::Vanished),
        })
        .await
        .map_err(|e| FetchError::Io {
            what: format!("checking {digest}"),
            source: io::Error::other(e),
        })??;
        Ok(self.judged(digest, &checked, found_by, refetch))
    }

    /// Acts on a full check's verdict: logs, counts and refetches a corrupt
    /// blob. Returns whether the blob may be served.
    pub(super) fn judged(
        &self,
        digest: &Digest,
        checked: &Checked,
        found_by: FoundBy,
        refetch: Refetch,
    ) -> bool {
        match checked {
            Checked::Good { size, sums_fixed } => {
                if *sums_fixed {
                    tracing::info!(digest = %digest, bytes = size, found_by = found_by.as_str(),
                        "recorded the chunk sums of a blob that had none (or wrong ones) after a full SHA-256 check");
                }
                true
            }
            Checked::Vanished => true,
            Checked::Corrupt {
                size,
                actual,
                first_bad,
                quarantined,
            } => {
                if let Some(to) = quarantined {
                    self.inner
                        .metrics
                        .corrupt_blobs
                        .with_label_values(&[found_by.as_str()])
                        .inc();
                    tracing::error!(digest = %digest, path = %self.inner.store.blob_path_of(digest).display(),
                        offset = ?first_bad, bytes = size, actual = %actual, quarantine = %to.display(),
                        found_by = found_by.as_str(),
                        "a cached blob no longer matches its digest: quarantined, fetching it again");
                    self.refetch(digest, refetch, found_by);
                }
                false
            }
        }
    }

    /// A verified read found chunk `offset` of the blob in `held` wrong.
    pub(super) async fn rotten(&self, guard: &Guard, held: Arc<File>, offset: u64) {
        let digest = &guard.digest;
        let refetch = guard
            .refetch
            .clone()
            .or_else(|| self.provenance_target(digest));
        let store = self.inner.store.clone();
        let d = digest.clone();
        let moved = tokio::task::spawn_blocking(move || store.quarantine(&d, &held))
            .await
            .map_err(|e| io::Error::other(e).to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let path = self.inner.store.blob_path_of(digest);
        match moved {
            Ok(Some(to)) => {
                self.inner
                    .metrics
                    .corrupt_blobs
                    .with_label_values(&[guard.found_by.as_str()])
                    .inc();
                tracing::error!(digest = %digest, path = %path.display(), offset,
                    quarantine = %to.display(), found_by = guard.found_by.as_str(),
                    "a cached blob does not match its chunk sum: response stopped before the chunk, \
                     blob quarantined, fetching it again");
                self.refetch(digest, refetch, guard.found_by);
            }
            // Another reader got there first, or the blob is gone.
            Ok(None) => {
                tracing::debug!(digest = %digest, offset, "bad chunk in a blob already quarantined");
            }
            Err(e) => {
                tracing::error!(digest = %digest, path = %path.display(), offset, error = %e,
                    "a cached blob does not match its chunk sum and cannot be quarantined");
            }
        }
    }

    /// The registry and repository a blob was first fetched for.
    pub(super) fn provenance_target(&self, digest: &Digest) -> Refetch {
        let p = self.inner.store.provenance(digest)?;
        let up = self.inner.origin.upstream(p.registry.as_deref()?)?;
        Some((up, p.repository?))
    }

    /// Fetches a quarantined blob again, through peers or the origin, so the
    /// next request finds it (or joins the download).
    fn refetch(&self, digest: &Digest, target: Refetch, found_by: FoundBy) {
        let Some((up, repo)) = target else {
            tracing::warn!(digest = %digest,
                "no registry known for a quarantined blob; the next pull fetches it again");
            return;
        };
        // A client retries a cut read at once: that refetch is live. What a
        // peer or the scrub found is only for this node's cache.
        let priority = match found_by {
            FoundBy::Mirror => super::Priority::Live,
            FoundBy::Peer | FoundBy::Scrub => super::Priority::Background,
        };
        match self.join_or_start(&up, &repo, digest, None, super::Ask::local(priority, false)) {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(digest = %digest, error = %e, "cannot fetch a quarantined blob again");
            }
        }
    }
}
