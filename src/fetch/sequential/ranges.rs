//! How a download's bytes get from the origin's answers to the partial
//! file: in order, hashed and written from the buffers they arrived in
//! ([`Sink`]), and for a large blob fetched as several ranged GETs at once
//! ([`parallel`]).
//!
//! Object stores cap each connection (ECR redirects blob GETs to S3, where
//! one connection gets a fraction of the node's link), so one stream per
//! blob leaves most of the link idle. With `origin.parallel_ranges` > 1 the
//! first GET of a blob asks for `origin.range_size` bytes; when the origin
//! answers 206 and more remains, the rest is cut into parts of that size
//! and up to `parallel_ranges` of them are fetched at once. The window is
//! bounded and in order: a part starts only when it is among the next
//! `parallel_ranges` parts from the first byte not yet on disk, and the
//! parts ahead of that byte wait in memory (at most `parallel_ranges` x
//! `range_size` per download) until it reaches them. So the partial file
//! only ever grows contiguously from its start, readers stream it from the
//! first byte as before, SHA-256 and the chunk sums are computed once over
//! the bytes as they go to disk, and a crash leaves a prefix that the next
//! download resumes from. A part whose body breaks resumes itself with
//! `Range` from its last byte; a part that cannot be had fails the download
//! like a broken single stream does.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::StatusCode;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{write_and_hash, BlobHasher, DownloadJob, PendingWrite};
use crate::fetch::{Download, FetchError, Fetcher, Pull, WRITE_BATCH};

/// The first wait before a broken part is asked again; it doubles with each
/// break of the same part, up to the download's cap.
const PART_BACKOFF_START: Duration = Duration::from_millis(100);

/// Bytes of a download on their way to the partial file, in order. They are
/// gathered into batches of up to [`WRITE_BATCH`] (as the buffers they
/// arrived in, not copied) and each batch is hashed and written on a
/// blocking thread while the next one arrives.
pub(super) struct Sink<'a> {
    job: &'a DownloadJob,
    hasher: &'a mut BlobHasher,
    written: &'a mut u64,
    size: u64,
    batch: Vec<Bytes>,
    batch_len: u64,
    pending: Option<(PendingWrite, u64)>,
    submitted: u64,
}

impl<'a> Sink<'a> {
    pub(super) fn new(
        job: &'a DownloadJob,
        hasher: &'a mut BlobHasher,
        written: &'a mut u64,
        size: u64,
    ) -> Sink<'a> {
        let submitted = *written;
        Sink {
            job,
            hasher,
            written,
            size,
            batch: Vec::new(),
            batch_len: 0,
            pending: None,
            submitted,
        }
    }

    pub(super) fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.batch_len += b.len() as u64;
            self.batch.push(b);
        }
    }

    pub(super) fn is_full(&self) -> bool {
        self.batch_len >= WRITE_BATCH as u64
    }

    /// Where the bytes pushed so far end.
    pub(super) fn end(&self) -> u64 {
        self.submitted + self.batch_len
    }

    /// Hands the gathered bytes to the hasher and the disk, once the batch
    /// before them has landed.
    pub(super) async fn submit(&mut self) -> Result<(), FetchError> {
        if self.batch_len == 0 {
            return Ok(());
        }
        let n = std::mem::take(&mut self.batch_len);
        if self.submitted + n > self.size {
            self.batch.clear();
            return Err(FetchError::Oversized {
                digest: self.job.dl.digest.clone(),
                expected: self.size,
                got: self.submitted + n,
            });
        }
        self.settle().await?;
        let h = std::mem::take(self.hasher);
        let data = std::mem::take(&mut self.batch);
        self.pending = Some((
            write_and_hash(self.job.writer.clone(), self.submitted, data, h),
            self.submitted + n,
        ));
        self.submitted += n;
        Ok(())
    }

    /// Waits for the batch in flight, so that the hasher and `written`
    /// agree with the file (also after an error: the next attempt resumes
    /// from there). Bytes pushed but not submitted are dropped.
    pub(super) async fn settle(&mut self) -> Result<(), FetchError> {
        if let Some((prev, end)) = self.pending.take() {
            self.job
                .complete(prev, end, self.hasher, self.written)
                .await?;
        }
        Ok(())
    }
}

/// What one part task reports.
enum Msg {
    Data(usize, Bytes),
    Done(usize),
    Failed(FetchError),
}

/// A part between the first byte not yet on disk and the window's end.
struct Part {
    idx: usize,
    /// Bytes received ahead of the frontier, in order.
    held: Vec<Bytes>,
    done: bool,
}

/// What every part task needs.
struct PartCtx {
    fetcher: Fetcher,
    dl: Arc<Download>,
    pull: Pull,
    size: u64,
}

/// Fetches `first_start..size` as parts of `part` bytes, `window` at once,
/// into `sink`. `first` is the origin's 206 for the first part,
/// `first_start..first_end`; the sink's end is at or after `first_start`.
pub(super) async fn parallel(
    job: &DownloadJob,
    sink: &mut Sink<'_>,
    first: reqwest::Response,
    first_start: u64,
    first_end: u64,
    part: u64,
    window: usize,
) -> Result<(), FetchError> {
    let size = sink.size;
    let ctx = Arc::new(PartCtx {
        fetcher: job.fetcher.clone(),
        dl: job.dl.clone(),
        pull: job.pull.clone(),
        size,
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Dropped on every way out, which aborts the parts still running.
    let mut tasks = JoinSet::new();
    let skip = sink.end().saturating_sub(first_start);
    tasks.spawn(fetch_part(
        ctx.clone(),
        0,
        first_start,
        first_end,
        Some((first, skip)),
        tx.clone(),
    ));
    let mut parts: VecDeque<Part> = VecDeque::from([Part {
        idx: 0,
        held: Vec::new(),
        done: false,
    }]);
    let mut next_start = first_end;
    let mut next_idx = 1usize;
    loop {
        // Keep the window full: at most `window` parts from the frontier.
        while parts.len() < window && next_start < size {
            let end = next_start.saturating_add(part).min(size);
            tasks.spawn(fetch_part(
                ctx.clone(),
                next_idx,
                next_start,
                end,
                None,
                tx.clone(),
            ));
            parts.push_back(Part {
                idx: next_idx,
                held: Vec::new(),
                done: false,
            });
            next_idx += 1;
            next_start = end;
        }
        let Some(front) = parts.front() else {
            break;
        };
        if front.done {
            parts.pop_front();
            // The next part's bytes so far go to disk now, in order.
            if let Some(next) = parts.front_mut() {
                for b in std::mem::take(&mut next.held) {
                    sink.push(b);
                    if sink.is_full() {
                        sink.submit().await?;
                    }
                }
            }
            continue;
        }
        let front_idx = front.idx;
        // Everything already waiting is taken before the batch goes out, so
        // the disk and the hasher get few large calls.
        let mut msg = tokio::select! {
            m = rx.recv() => m,
            // A part task that panicked sends nothing more.
            Some(Err(e)) = tasks.join_next() => {
                return Err(FetchError::Join { task: "origin range", source: e });
            }
        };
        while let Some(m) = msg.take() {
            match m {
                Msg::Data(i, b) if i == front_idx => sink.push(b),
                Msg::Data(i, b) => {
                    if let Some(p) = i.checked_sub(front_idx).and_then(|k| parts.get_mut(k)) {
                        p.held.push(b);
                    }
                }
                Msg::Done(i) => {
                    if let Some(p) = i.checked_sub(front_idx).and_then(|k| parts.get_mut(k)) {
                        p.done = true;
                    }
                    if i == front_idx {
                        break;
                    }
                }
                Msg::Failed(e) => return Err(e),
            }
            if sink.is_full() {
                break;
            }
            msg = rx.try_recv().ok();
        }
        sink.submit().await?;
    }
    // The last parts' bytes may have been taken from `held` after the
    // last submit.
    sink.submit().await
}

/// Fetches bytes `start..end` of the blob and sends them on `tx` in order,
/// resuming with `Range` where the body breaks. `first`: an answer already
/// received for `start..end`, and how many of its bytes to skip.
async fn fetch_part(
    ctx: Arc<PartCtx>,
    idx: usize,
    start: u64,
    end: u64,
    first: Option<(reqwest::Response, u64)>,
    tx: mpsc::UnboundedSender<Msg>,
) {
    let inner = &ctx.fetcher.inner;
    let digest = &ctx.dl.digest;
    let mut pos = start;
    let mut first = first;
    let mut failures = 0u32;
    let mut backoff = PART_BACKOFF_START;
    loop {
        let (resp, mut skip) = match first.take() {
            Some(f) => f,
            None => match request(&ctx, pos, end).await {
                Ok(r) => (r, 0),
                Err(e) => {
                    let _ = tx.send(Msg::Failed(e));
                    return;
                }
            },
        };
        let mut body = resp.bytes_stream();
        let mut broke = None;
        while pos < end {
            ctx.fetcher.yield_to_live(&ctx.dl).await;
            match body.next().await {
                None => break,
                Some(Err(e)) => {
                    broke = Some(e.to_string());
                    break;
                }
                Some(Ok(mut c)) => {
                    if skip > 0 {
                        let n = skip.min(c.len() as u64);
                        skip -= n;
                        c = c.slice(n as usize..);
                    }
                    let room = end - pos;
                    if c.len() as u64 > room {
                        c = c.slice(..room as usize);
                    }
                    if c.is_empty() {
                        continue;
                    }
                    pos += c.len() as u64;
                    if tx.send(Msg::Data(idx, c)).is_err() {
                        return;
                    }
                }
            }
        }
        if pos >= end {
            let _ = tx.send(Msg::Done(idx));
            return;
        }
        failures += 1;
        let why = broke.unwrap_or_else(|| "body ended early".into());
        if failures > inner.retries {
            let _ = tx.send(Msg::Failed(FetchError::Exhausted {
                digest: digest.clone(),
                attempts: failures,
                last: why,
            }));
            return;
        }
        inner.metrics.origin_resumes.inc();
        tracing::warn!(digest = %digest, part = idx, at = pos, end, error = %why,
            "origin range broke, resuming it");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(super::RESUME_BACKOFF_CAP);
    }
}

/// One ranged GET of bytes `from..end`, checked to answer exactly that.
async fn request(ctx: &PartCtx, from: u64, end: u64) -> Result<reqwest::Response, FetchError> {
    let digest = &ctx.dl.digest;
    let bad = |reason: String| FetchError::BadOriginResponse {
        what: digest.to_string(),
        reason,
    };
    let req = ctx.pull.blob_get(digest, Some((from, Some(end))));
    let resp = ctx.fetcher.inner.origin.send(&ctx.pull.up, &req).await?;
    if resp.status() != StatusCode::PARTIAL_CONTENT {
        return Err(bad(format!(
            "answered {} to a range after answering 206 to the first",
            resp.status()
        )));
    }
    let (start, size) = resp
        .headers()
        .get(http::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::http::parse_content_range)
        .map(|r| (r.first, r.size))
        .ok_or_else(|| bad("206 without a usable Content-Range".into()))?;
    if size != ctx.size {
        return Err(bad(format!(
            "size changed from {} to {size} between requests",
            ctx.size
        )));
    }
    if start != from {
        return Err(bad(format!("range starts at {start}, wanted {from}")));
    }
    Ok(resp)
}
