//! Reading a blob: from the store (checked chunk by chunk when reads are
//! verified) or from a download in progress, following the file as it
//! grows and holding the last byte back until the digest is proven.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;

pub(super) mod spans;

use super::{verify, Blob, BlobBody, Progress, READ_CHUNK};
use crate::store::Lease;
use crate::telemetry::Metrics;

pub(super) async fn read_chunk(file: Arc<File>, pos: u64, len: u64) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read_at(&mut buf[filled..], pos + filled as u64)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob file is shorter than expected",
                ));
            }
            filled += n;
        }
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(io::Error::other)?
}

impl Blob {
    /// The state of a read of bytes `start..end`, shared by [`Blob::stream`]
    /// and [`Blob::spans`].
    fn reader(self, start: u64, end: u64) -> ReadState {
        let size = self.size;
        let end = end.min(size);
        let (file, rx, lease, verified) = match self.body {
            BlobBody::Local { file, lease, guard } => {
                let verified = guard.map(|guard| {
                    let cs = crate::store::SUM_CHUNK;
                    let first = (start / cs) as usize;
                    let sums = guard.fetcher.inner.store.sums_slice(
                        &guard.digest,
                        size,
                        first,
                        end.div_ceil(cs) as usize,
                    );
                    Verified { guard, first, sums }
                });
                (file, None, Some(lease), verified)
            }
            BlobBody::Growing(dl) => (dl.file.clone(), Some(dl.progress.subscribe()), None, None),
        };
        let epoch = rx.as_ref().map_or(0, |r| r.borrow().epoch);
        ReadState {
            for_peer: self.for_peer,
            epoch,
            pos: start,
            end,
            size,
            rx,
            file,
            _lease: lease,
            verified,
            ahead: None,
        }
    }

    /// Streams bytes `start..end` of the blob. For a download in progress
    /// the stream follows the file as it grows; it ends with an error (and
    /// so a cut connection) if the download fails.
    pub fn stream(
        self,
        start: u64,
        end: u64,
        metrics: Metrics,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let counter = metrics
            .bytes_served
            .with_label_values(&[self.source.as_str()]);
        let state = self.reader(start, end);
        futures_util::stream::unfold(state, move |mut st| {
            let counter = counter.clone();
            async move {
                if st.pos >= st.end {
                    // An empty blob has no last byte to hold back: the end
                    // of its body waits for the verdict instead.
                    if st.size == 0 {
                        if let Err(e) = st.wait_done().await {
                            st.rx = None;
                            return Some((Err(e), st));
                        }
                    }
                    return None;
                }
                if st.rx.is_none() {
                    return Some(st.next_local(&counter).await);
                }
                let readable = match st.readable().await {
                    Ok(r) => r,
                    Err(e) => {
                        st.pos = st.end;
                        return Some((Err(e), st));
                    }
                };
                let len = (readable - st.pos).min(READ_CHUNK);
                match read_chunk(st.file.clone(), st.pos, len).await {
                    Ok(b) => {
                        st.pos += len;
                        counter.inc_by(len);
                        Some((Ok(b), st))
                    }
                    Err(e) => {
                        st.pos = st.end;
                        Some((Err(e), st))
                    }
                }
            }
        })
    }
}

struct ReadState {
    for_peer: bool,
    /// The download's epoch when this reader last checked it.
    epoch: u64,
    pos: u64,
    end: u64,
    size: u64,
    rx: Option<watch::Receiver<Progress>>,
    file: Arc<File>,
    _lease: Option<Lease>,
    verified: Option<Verified>,
    /// A read from the store started ahead, and where it starts.
    ahead: Option<(u64, verify::PendingRead)>,
}

/// A read from the store checked against the blob's chunk sums.
struct Verified {
    guard: Arc<verify::Guard>,
    /// The chunk `sums[0]` belongs to.
    first: usize,
    /// The sums of the chunks the range covers; `None` when they vanished
    /// after the blob was opened (it was removed meanwhile).
    sums: Option<Vec<u64>>,
}

impl ReadState {
    /// The next frame of a read from the store. With verified reads, whole
    /// chunks are read and checked before any of their bytes go out. The
    /// next span is read (and checked) on a blocking thread while this one
    /// is sent: one span ahead, so a reader holds two at most.
    async fn next_local(
        mut self,
        counter: &prometheus::IntCounter,
    ) -> (io::Result<Bytes>, ReadState) {
        let (at, span_end) = self.span_at(self.pos);
        let pending = match self.ahead.take() {
            Some((a, h)) if a == at => Some(h),
            _ => self.start_read(at, span_end),
        };
        let Some(pending) = pending else {
            self.pos = self.end;
            let e =
                io::Error::other("the blob's chunk sums are gone: it was removed while being read");
            return (Err(e), self);
        };
        let read = pending
            .await
            .unwrap_or_else(|e| Err(verify::ReadFail::Io(io::Error::other(e))));
        match read {
            Ok(b) => {
                let upto = span_end.min(self.end);
                let out = b.slice((self.pos - at) as usize..(upto - at) as usize);
                counter.inc_by(upto - self.pos);
                self.pos = upto;
                if upto < self.end {
                    let (next, next_end) = self.span_at(upto);
                    self.ahead = self.start_read(next, next_end).map(|h| (next, h));
                }
                (Ok(out), self)
            }
            Err(verify::ReadFail::Rot { offset }) => {
                self.pos = self.end;
                if let Some(guard) = self.verified.as_ref().map(|v| v.guard.clone()) {
                    guard
                        .fetcher
                        .rotten(&guard, self.file.clone(), offset)
                        .await;
                }
                let e = io::Error::other(format!(
                    "bytes at {offset} do not match their checksum; stopped before them"
                ));
                (Err(e), self)
            }
            Err(verify::ReadFail::Io(e)) => {
                self.pos = self.end;
                (Err(e), self)
            }
        }
    }

    /// The span a read from the store at `pos` covers: up to a frame, from
    /// the start of its chunk when reads are verified.
    fn span_at(&self, pos: u64) -> (u64, u64) {
        let at = if self.verified.is_some() {
            pos / crate::store::SUM_CHUNK * crate::store::SUM_CHUNK
        } else {
            pos
        };
        (at, (at + READ_CHUNK).min(self.size))
    }

    /// Starts reading `at..end` (with its chunk sums when verified); `None`
    /// when the sums for that span are gone.
    fn start_read(&self, at: u64, end: u64) -> Option<verify::PendingRead> {
        let sums = match &self.verified {
            None => None,
            Some(v) => {
                let cs = crate::store::SUM_CHUNK;
                let k = (at / cs) as usize - v.first;
                let n = (end - at).div_ceil(cs) as usize;
                Some(v.sums.as_ref()?.get(k..k + n)?.to_vec())
            }
        };
        Some(verify::start_read(self.file.clone(), at, end - at, sums))
    }

    /// Waits until a download in progress is committed (at once for a
    /// blob from the store).
    async fn wait_done(&mut self) -> io::Result<()> {
        let Some(rx) = self.rx.as_mut() else {
            return Ok(());
        };
        loop {
            match &rx.borrow_and_update().done {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => return Err(io::Error::other(format!("download failed: {e}"))),
                None => {}
            }
            if rx.changed().await.is_err() {
                return Err(io::Error::other("download abandoned"));
            }
        }
    }

    /// Waits until bytes past `pos` may be sent, and returns how far.
    async fn readable(&mut self) -> io::Result<u64> {
        let Some(rx) = self.rx.as_mut() else {
            return Ok(self.end);
        };
        loop {
            {
                let p = rx.borrow_and_update();
                if p.epoch != self.epoch {
                    if p.poisoned_from.is_some_and(|f| self.pos > f) {
                        return Err(io::Error::other(
                            "bytes already sent may be wrong (digest mismatch, being repaired)",
                        ));
                    }
                    // Everything sent so far lies before the repaired part.
                    self.epoch = p.epoch;
                }
                let limit = match &p.done {
                    Some(Ok(())) => self.size,
                    Some(Err(e)) => {
                        return Err(io::Error::other(format!("download failed: {e}")));
                    }
                    None if self.for_peer => p.available_from(self.pos),
                    // The final byte waits for the digest check.
                    None => p.available_from(self.pos).min(self.size.saturating_sub(1)),
                };
                let limit = limit.min(self.end);
                if limit > self.pos {
                    return Ok(limit);
                }
            }
            if rx.changed().await.is_err() {
                return Err(io::Error::other("download abandoned"));
            }
        }
    }
}
