//! A blob read as ranges of its file rather than as buffers, for a sender
//! that can hand a range to the kernel (`sendfile(2)` on the mirror's plain
//! HTTP socket) so that the bytes go from the page cache to the socket
//! without a copy through user space.
//!
//! The rules are those of [`Blob::stream`]: a download in progress is
//! followed as it grows, its last byte held back until the digest is
//! checked; a cache hit with verified reads yields a range only after each
//! of its chunks was read and matched its sum. That check reads the chunk
//! through a small buffer (the page cache is warm after it) and the range
//! is then sent from the page cache: the bytes on the wire are those the
//! check saw unless the page was evicted and read from a disk that changed
//! in the milliseconds between, which is the one thing this path gives up
//! against checking the very buffer that is sent (the TLS data plane still
//! does that, through [`Blob::stream`]). The check runs one span ahead on a
//! blocking thread, so it overlaps the send of the span before.

use std::fs::File;
use std::io;
use std::sync::Arc;

use super::{verify, Blob, ReadState, READ_CHUNK};
use crate::store::SUM_CHUNK;
use crate::telemetry::Metrics;

/// The buffer a verified span is read through: small enough to stay in the
/// CPU cache between the read and the hash, and the most a reader holds.
const CHECK_BUF: usize = 256 << 10;
const _: () = assert!(SUM_CHUNK.is_multiple_of(CHECK_BUF as u64));

/// The most one unverified span covers: bytes that need no check go to
/// the socket in few large calls.
const PLAIN_SPAN: u64 = 8 << 20;

/// Bytes `offset..offset + len` of `file`, ready to be sent as they are.
#[derive(Debug, Clone)]
pub struct FileSpan {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: u64,
}

/// The ranges of a blob's file to send, in order (see the module docs).
pub struct Spans {
    st: ReadState,
    counter: prometheus::IntCounter,
    /// The check started one span ahead, and where that span starts.
    ahead: Option<(u64, verify::PendingCheck)>,
    /// The check buffer, while no check holds it.
    buf: Option<Vec<u8>>,
}

impl Blob {
    /// Bytes `start..end` of the blob as ranges of its file (see [`Spans`]).
    pub fn spans(self, start: u64, end: u64, metrics: Metrics) -> Spans {
        let counter = metrics
            .bytes_served
            .with_label_values(&[self.source.as_str()]);
        let st = self.reader(start, end);
        Spans {
            st,
            counter,
            ahead: None,
            buf: None,
        }
    }
}

impl Spans {
    /// Bytes left to yield.
    pub fn remaining(&self) -> u64 {
        self.st.end.saturating_sub(self.st.pos)
    }

    /// The next range that may be sent; `None` at the end. After an error
    /// the body cannot be completed: the connection has to be cut.
    pub async fn next(&mut self) -> Option<io::Result<FileSpan>> {
        let st = &mut self.st;
        if st.pos >= st.end {
            // An empty blob has no last byte to hold back: the end of its
            // body waits for the verdict instead.
            if st.size == 0 {
                if let Err(e) = st.wait_done().await {
                    st.rx = None;
                    return Some(Err(e));
                }
            }
            return None;
        }
        let r = if st.rx.is_some() {
            self.next_growing().await
        } else if st.verified.is_some() {
            self.next_verified().await
        } else {
            Ok(self.next_plain())
        };
        match r {
            Ok(span) => {
                self.counter.inc_by(span.len);
                Some(Ok(span))
            }
            Err(e) => {
                self.st.pos = self.st.end;
                Some(Err(e))
            }
        }
    }

    /// A download in progress: what is on disk past the reader.
    async fn next_growing(&mut self) -> io::Result<FileSpan> {
        let st = &mut self.st;
        let readable = st.readable().await?;
        let len = (readable - st.pos).min(PLAIN_SPAN);
        let span = FileSpan {
            file: st.file.clone(),
            offset: st.pos,
            len,
        };
        st.pos += len;
        Ok(span)
    }

    /// A cache hit without verified reads: the rest, in large spans.
    fn next_plain(&mut self) -> FileSpan {
        let st = &mut self.st;
        let len = (st.end - st.pos).min(PLAIN_SPAN);
        let span = FileSpan {
            file: st.file.clone(),
            offset: st.pos,
            len,
        };
        st.pos += len;
        span
    }

    /// A cache hit with verified reads: the span once its chunks matched;
    /// the next one's check starts before this one is sent.
    async fn next_verified(&mut self) -> io::Result<FileSpan> {
        let (at, span_end) = self.st.span_at(self.st.pos);
        let pending = match self.ahead.take() {
            Some((a, h)) if a == at => Some(h),
            _ => self.start_check(at, span_end),
        };
        let Some(pending) = pending else {
            return Err(io::Error::other(
                "the blob's chunk sums are gone: it was removed while being read",
            ));
        };
        let (buf, read) = pending
            .await
            .unwrap_or_else(|e| (Vec::new(), Err(verify::ReadFail::Io(io::Error::other(e)))));
        if !buf.is_empty() {
            self.buf = Some(buf);
        }
        match read {
            Ok(()) => {
                let upto = span_end.min(self.st.end);
                let span = FileSpan {
                    file: self.st.file.clone(),
                    offset: self.st.pos,
                    len: upto - self.st.pos,
                };
                self.st.pos = upto;
                if upto < self.st.end {
                    let (next, next_end) = self.st.span_at(upto);
                    self.ahead = self.start_check(next, next_end).map(|h| (next, h));
                }
                Ok(span)
            }
            Err(verify::ReadFail::Rot { offset }) => {
                if let Some(guard) = self.st.verified.as_ref().map(|v| v.guard.clone()) {
                    guard
                        .fetcher
                        .rotten(&guard, self.st.file.clone(), offset)
                        .await;
                }
                Err(io::Error::other(format!(
                    "bytes at {offset} do not match their checksum; stopped before them"
                )))
            }
            Err(verify::ReadFail::Io(e)) => Err(e),
        }
    }

    /// Starts checking `at..end`; `None` when the sums for it are gone.
    fn start_check(&mut self, at: u64, end: u64) -> Option<verify::PendingCheck> {
        let v = self.st.verified.as_ref()?;
        let k = (at / SUM_CHUNK) as usize - v.first;
        let n = (end - at).div_ceil(SUM_CHUNK) as usize;
        let sums = v.sums.as_ref()?.get(k..k + n)?.to_vec();
        let buf = self.buf.take().unwrap_or_else(|| vec![0u8; CHECK_BUF]);
        Some(verify::start_check(
            self.st.file.clone(),
            at,
            end - at,
            sums,
            buf,
        ))
    }
}

const _: () = assert!(READ_CHUNK.is_multiple_of(SUM_CHUNK));
