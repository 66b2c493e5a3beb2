//! The sequential download: one origin request after another, from where
//! the partial file ends, hashing as the bytes land, until the blob is
//! complete and its digest proven. A node without peers downloads this way,
//! and it resumes after a crash (the partial file is hashed again).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use http::StatusCode;
use sha2::Digest as _;

mod ranges;

use super::download::is_disk_full;
use super::Pull;
use super::{
    Download, FetchError, Fetcher, Source, RESUME_BACKOFF_CAP, RESUME_BACKOFF_START, WRITE_BATCH,
};
use crate::oci::Digest;
use crate::origin::OriginError;
use crate::store::Provenance;

pub(super) struct DownloadJob {
    pub(super) fetcher: Fetcher,
    pub(super) dl: Arc<Download>,
    pub(super) pull: Pull,
    pub(super) writer: Arc<File>,
}

impl DownloadJob {
    pub(super) async fn run(self) {
        let inner = self.fetcher.inner.clone();
        let digest = self.dl.digest.clone();
        let result = self.download().await;
        if let Err(e) = &result {
            if is_disk_full(e) {
                // Keeping the partial would only hold the space that every
                // other download needs; this blob does not fit anyway.
                let _ = inner.store.remove_partial(&digest);
                tracing::error!(digest = %digest, error = %e, dir = %inner.store.root().display(),
                    "the store's disk is full: store.max_size is larger than the free space; \
                     partial download removed");
            } else {
                tracing::warn!(digest = %digest, error = %e, "blob download failed");
            }
            if matches!(e, FetchError::DigestMismatch { .. }) {
                inner.metrics.digest_mismatches.inc();
            }
            // Failed before its first byte (a 404, an auth error, a refused
            // size): nothing to resume, so no file either. Still in the
            // single-flight map, so no other download uses the path.
            if self.writer.metadata().is_ok_and(|m| m.len() == 0)
                && inner.store.remove_partial(&digest).unwrap_or(false)
            {
                inner
                    .metrics
                    .partials_removed
                    .with_label_values(&["failed"])
                    .inc();
            }
        }
        // Commit happened inside download(); only now may a new request
        // start another download of this digest, and it will find the blob.
        self.dl
            .finish(&inner, result, (&self.pull.up, &self.pull.repo));
    }

    async fn download(&self) -> Result<(), FetchError> {
        let inner = &self.fetcher.inner;
        let digest = &self.dl.digest;
        self.keep_pieces_prefix()?;
        let (mut hasher, mut written) =
            rehash(self.writer.clone())
                .await
                .map_err(|source| FetchError::Io {
                    what: "partial download".into(),
                    source,
                })?;
        let mut total: Option<u64> = None;
        if written > 0 {
            if Digest::from_sha256(&hasher.sha.clone().finalize()) == *digest {
                // The process died after the last byte, before the commit:
                // the content is complete and proven, no origin needed.
                tracing::info!(digest = %digest, bytes = written, "partial download is complete");
                total = Some(written);
                self.dl.progress.send_modify(|p| {
                    p.total = Some(written);
                    p.written = written;
                });
            } else {
                tracing::info!(digest = %digest, bytes = written, "resuming partial download");
                self.dl.progress.send_modify(|p| p.written = written);
            }
        }
        let mut failures = 0u32;
        let mut backoff = RESUME_BACKOFF_START;
        let mut restarted = false;
        loop {
            if total == Some(written) {
                break;
            }
            match self.transfer(&mut hasher, &mut written, &mut total).await {
                Ok(()) => continue,
                // A partial the origin cannot continue (it is as long as the
                // blob or longer, or the origin refuses the range): start
                // over, once. No reader has seen a byte yet, since readers
                // wait for the size, which is only known after an answer.
                Err(e) if !restarted && total.is_none() && written > 0 && cannot_resume(&e) => {
                    tracing::warn!(digest = %digest, error = %e, at = written,
                        "partial download cannot be resumed, starting over");
                    restarted = true;
                    self.writer.set_len(0).map_err(|source| FetchError::Io {
                        what: "truncating partial download".into(),
                        source,
                    })?;
                    hasher = BlobHasher::default();
                    written = 0;
                    self.dl.progress.send_modify(|p| p.written = 0);
                }
                Err(e) if is_final(&e) => return Err(e),
                Err(e) => {
                    failures += 1;
                    if failures > inner.retries {
                        return Err(FetchError::Exhausted {
                            digest: digest.clone(),
                            attempts: failures,
                            last: e.to_string(),
                        });
                    }
                    inner.metrics.origin_resumes.inc();
                    tracing::warn!(digest = %digest, error = %e, at = written, attempt = failures,
                        "blob transfer broke, resuming");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RESUME_BACKOFF_CAP);
                }
            }
        }
        let BlobHasher { sha, sums } = hasher;
        let actual = Digest::from_sha256(&sha.finalize());
        let path = inner.store.partial_path(digest);
        if &actual != digest {
            let _ = std::fs::remove_file(&path);
            return Err(FetchError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        let prov = Provenance::origin(self.pull.up.host(), &self.pull.repo);
        self.fetcher
            .commit_blob(digest, actual, written, &sums.finish(), &prov)
            .await?;
        tracing::info!(digest = %digest, bytes = written, "blob committed");
        Ok(())
    }

    /// A partial file that a piece download left (this node had peers
    /// before it restarted) has holes: only the pieces from the start
    /// without a gap, as its journal lists them, are a prefix this download
    /// can resume from.
    fn keep_pieces_prefix(&self) -> Result<(), FetchError> {
        let store = &self.fetcher.inner.store;
        let path = store.pieces_path(&self.dl.digest);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(());
        }
        let keep =
            super::journal::read(&path, super::pieces::MAX_BLOB).map_or(0, |r| r.contiguous());
        let len = self.writer.metadata().map_or(0, |m| m.len());
        if keep < len {
            self.writer.set_len(keep).map_err(|source| FetchError::Io {
                what: "truncating partial download".into(),
                source,
            })?;
        }
        let _ = std::fs::remove_file(&path);
        tracing::info!(digest = %self.dl.digest, kept = keep.min(len),
            "partial download was fetched in pieces; resuming after its gap-free prefix");
        Ok(())
    }

    /// One origin request, from `written` on, until the body ends; with
    /// parallel ranges, the rest of the blob in parts ([`ranges`]).
    async fn transfer(
        &self,
        hasher: &mut BlobHasher,
        written: &mut u64,
        total: &mut Option<u64>,
    ) -> Result<(), FetchError> {
        let inner = &self.fetcher.inner;
        let digest = &self.dl.digest;
        let bad = |reason: String| FetchError::BadOriginResponse {
            what: digest.to_string(),
            reason,
        };
        let (parallel, part) = inner.ranges;
        // With parallel ranges, the first GET asks for one part: a 206 says
        // the origin takes ranges (and the size); a 200 streams the blob.
        let range = match (*written, parallel > 1) {
            (w, true) => Some((w, Some(w.saturating_add(part)))),
            (0, false) => None,
            (w, false) => Some((w, None)),
        };
        let req = self.pull.blob_get(digest, range);
        let resp = inner.origin.send(&self.pull.up, &req).await?;
        // Where the body starts and ends, and the blob's full size.
        let (start, end, size) = match resp.status() {
            StatusCode::PARTIAL_CONTENT => resp
                .headers()
                .get(http::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::http::parse_content_range)
                .map(|r| (r.first, r.last + 1, r.size))
                .ok_or_else(|| bad("206 without a usable Content-Range".into()))?,
            StatusCode::OK => {
                let len = resp
                    .content_length()
                    .ok_or_else(|| bad("no Content-Length".into()))?;
                (0, len, len)
            }
            s => return Err(bad(format!("unexpected status {s}"))),
        };
        match *total {
            Some(t) if t != size => {
                return Err(bad(format!(
                    "size changed from {t} to {size} between requests"
                )))
            }
            _ => {}
        }
        if start > *written {
            return Err(bad(format!("range starts at {start}, wanted {}", *written)));
        }
        if *written > size {
            return Err(FetchError::Oversized {
                digest: digest.clone(),
                expected: size,
                got: *written,
            });
        }
        if total.is_none() {
            *total = Some(size);
            self.dl.progress.send_modify(|p| p.total = Some(size));
        }
        let mut sink = ranges::Sink::new(self, hasher, written, size);
        let received = if end < size {
            ranges::parallel(self, &mut sink, resp, start, end, part, parallel).await
        } else {
            self.stream_body(&mut sink, resp, start).await
        };
        // Whatever happened, the batch in flight lands first, so the hasher
        // and `written` agree with the file for the next attempt.
        sink.settle().await?;
        received?;
        if *written < size {
            return Err(bad(format!("body ended at {} of {size} bytes", *written)));
        }
        Ok(())
    }

    /// Streams one answer whose body starts at `start` into `sink`.
    async fn stream_body(
        &self,
        sink: &mut ranges::Sink<'_>,
        resp: reqwest::Response,
        start: u64,
    ) -> Result<(), FetchError> {
        let bad = |reason: String| FetchError::BadOriginResponse {
            what: self.dl.digest.to_string(),
            reason,
        };
        // A server that ignored our Range resends what we already have.
        let mut skip = sink.end().saturating_sub(start);
        let mut body = resp.bytes_stream();
        loop {
            self.fetcher.yield_to_live(&self.dl).await;
            let first = match body.next().await {
                None => return Ok(()),
                Some(chunk) => chunk,
            };
            // Chunks already buffered are gathered, up to a batch, so the
            // disk and the hasher get few large calls.
            let mut chunk = Some(first);
            while let Some(c) = chunk.take() {
                let c = c.map_err(|e| bad(format!("body broke: {e}")))?;
                let c = if skip > 0 {
                    let n = skip.min(c.len() as u64);
                    skip -= n;
                    c.slice(n as usize..)
                } else {
                    c
                };
                sink.push(c);
                if sink.is_full() {
                    break;
                }
                chunk = body.next().now_or_never().flatten();
            }
            sink.submit().await?;
        }
    }

    /// Waits for a batch handed to [`write_and_hash`], takes the hasher
    /// back and publishes the new end of the file to readers.
    async fn complete(
        &self,
        write: PendingWrite,
        end: u64,
        hasher: &mut BlobHasher,
        written: &mut u64,
    ) -> Result<(), FetchError> {
        let io_err = |source| FetchError::Io {
            what: "writing partial download".into(),
            source,
        };
        // A panicked writer took the hasher with it; failing the download
        // is safe, since the next attempt re-hashes the file from disk.
        let (h, res) = write
            .await
            .map_err(FetchError::join("writing partial download"))?;
        *hasher = h;
        res.map_err(io_err)?;
        let n = end - *written;
        *written = end;
        self.fetcher.inner.metrics.origin_bytes.inc_by(n);
        self.dl.count(Source::Origin, n);
        self.dl.progress.send_modify(|p| p.written = end);
        Ok(())
    }
}

/// Errors that say the partial file, not the network, is the problem.
fn cannot_resume(e: &FetchError) -> bool {
    matches!(
        e,
        FetchError::Oversized { .. }
            | FetchError::Origin(OriginError::Status {
                status: StatusCode::RANGE_NOT_SATISFIABLE,
                ..
            })
    )
}

/// Errors that another attempt would not fix.
///
/// Origin errors are final here: the origin client already retried the
/// request with backoff, and retrying its retries would multiply them
/// (`origin.retries` squared against a dead origin). What the download loop
/// retries is a body that broke after a good answer.
fn is_final(e: &FetchError) -> bool {
    matches!(
        e,
        FetchError::Origin(_)
            | FetchError::Store(_)
            | FetchError::Io { .. }
            | FetchError::Join { .. }
            | FetchError::Oversized { .. }
            // A part of a parallel download that used up its own retries.
            | FetchError::Exhausted { .. }
    )
}

type PendingWrite = tokio::task::JoinHandle<(BlobHasher, io::Result<()>)>;

/// What a download computes over the bytes as they land: the blob's
/// SHA-256, and the chunk checksums peers are sent with its pieces.
#[derive(Clone, Default)]
struct BlobHasher {
    sha: sha2::Sha256,
    sums: ChunkSums,
}

impl BlobHasher {
    fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.sums.update(data);
    }
}

/// xxh3-64 of every [`crate::store::SUM_CHUNK`] bytes of a stream, fed in
/// pieces of any size.
#[derive(Clone)]
pub(crate) struct ChunkSums {
    cur: xxhash_rust::xxh3::Xxh3,
    in_cur: u64,
    sums: Vec<u64>,
}

impl Default for ChunkSums {
    fn default() -> Self {
        ChunkSums {
            cur: xxhash_rust::xxh3::Xxh3::new(),
            in_cur: 0,
            sums: Vec::new(),
        }
    }
}

impl ChunkSums {
    pub(crate) fn update(&mut self, mut data: &[u8]) {
        let chunk = crate::store::SUM_CHUNK;
        while !data.is_empty() {
            let n = ((chunk - self.in_cur) as usize).min(data.len());
            self.cur.update(&data[..n]);
            self.in_cur += n as u64;
            data = &data[n..];
            if self.in_cur == chunk {
                self.sums.push(self.cur.digest());
                self.cur.reset();
                self.in_cur = 0;
            }
        }
    }

    pub(crate) fn finish(mut self) -> Vec<u64> {
        if self.in_cur > 0 {
            self.sums.push(self.cur.digest());
        }
        self.sums
    }
}

/// Hashes `chunks` and writes them at `at`, on a blocking thread.
fn write_and_hash(
    file: Arc<File>,
    at: u64,
    chunks: Vec<Bytes>,
    mut hasher: BlobHasher,
) -> PendingWrite {
    tokio::task::spawn_blocking(move || {
        let mut pos = at;
        for c in &chunks {
            hasher.update(c);
            if let Err(e) = file.write_all_at(c, pos) {
                return (hasher, Err(e));
            }
            pos += c.len() as u64;
        }
        (hasher, Ok(()))
    })
}

/// Hashes what a partial file already holds, so a download can resume.
async fn rehash(file: Arc<File>) -> io::Result<(BlobHasher, u64)> {
    tokio::task::spawn_blocking(move || {
        let mut hasher = BlobHasher::default();
        let mut buf = vec![0u8; WRITE_BATCH];
        let mut pos = 0u64;
        loop {
            let n = file.read_at(&mut buf, pos)?;
            if n == 0 {
                return Ok((hasher, pos));
            }
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
    })
    .await
    .map_err(io::Error::other)?
}
