//! A piece from the origin: the last resort, resumed with `Range` when
//! its body breaks.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::StreamExt;
use futures_util::FutureExt;
use http::StatusCode;

use super::peer::write_at;
use super::Ctx;
use crate::fetch::{FetchError, WRITE_BATCH};

/// Fetches the rest of piece `k` (from `have`) from the origin, resuming
/// with `Range` when the body breaks.
pub(super) async fn origin_piece(
    ctx: &Arc<Ctx>,
    k: usize,
    have: &mut u64,
) -> Result<(), FetchError> {
    let inner = &ctx.fetcher.inner;
    let digest = &ctx.dl.digest;
    let bad = |reason: String| FetchError::BadOriginResponse {
        what: digest.to_string(),
        reason,
    };
    let mut failures = 0u32;
    loop {
        let (start, end) = ctx.piece_range(k);
        let end = end.unwrap_or(start + ctx.piece_size);
        let known = ctx.dl.progress.borrow().total;
        if known.is_some() && start + *have >= end {
            return Ok(());
        }
        let from = start + *have;
        let req = ctx.pull.blob_get(digest, Some((from, Some(end))));
        let resp = inner.origin.send(&ctx.pull.up, &req).await?;
        let (rstart, total) = match resp.status() {
            StatusCode::PARTIAL_CONTENT => resp
                .headers()
                .get(http::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::http::parse_content_range)
                .map(|r| (r.first, r.size))
                .ok_or_else(|| bad("206 without a usable Content-Range".into()))?,
            StatusCode::OK => (
                0,
                resp.content_length()
                    .ok_or_else(|| bad("no Content-Length".into()))?,
            ),
            // An empty blob has no byte to ask a range of.
            StatusCode::RANGE_NOT_SATISFIABLE if from == 0 && known.is_none() => {
                ctx.set_size(0)?;
                return Ok(());
            }
            s => return Err(bad(format!("unexpected status {s}"))),
        };
        match known {
            Some(t) if t != total => {
                return Err(bad(format!("size is {total}, peers said {t}")));
            }
            None => ctx.set_size(total)?,
            _ => {}
        }
        let end = end.min(total);
        if rstart > from {
            return Err(bad(format!("range starts at {rstart}, wanted {from}")));
        }
        let mut skip = from - rstart;
        let mut pos = from;
        let mut body = resp.bytes_stream();
        let broke: Option<String> = loop {
            let first = match body.next().await {
                None => break None,
                Some(Err(e)) => break Some(e.to_string()),
                Some(Ok(c)) => c,
            };
            // Frames already received go to disk in one write, up to a
            // batch; an error among them ends the body after that write.
            let mut batch = Vec::new();
            let mut n = 0u64;
            let mut broke = None;
            let mut next = Some(Ok::<_, reqwest::Error>(first));
            while let Some(r) = next.take() {
                let mut c = match r {
                    Ok(c) => c,
                    Err(e) => {
                        broke = Some(Some(e.to_string()));
                        break;
                    }
                };
                if skip > 0 {
                    let k = skip.min(c.len() as u64);
                    skip -= k;
                    c = c.slice(k as usize..);
                }
                // A server that ignored the range sends past the piece.
                let room = end.saturating_sub(pos + n);
                if (c.len() as u64) > room {
                    c = c.slice(..room as usize);
                }
                n += c.len() as u64;
                if !c.is_empty() {
                    batch.push(c);
                }
                if pos + n >= end || n >= WRITE_BATCH as u64 {
                    break;
                }
                next = body.next().now_or_never().flatten();
            }
            if n > 0 {
                write_at(&ctx.writer, pos, batch).await?;
                if pos == start {
                    tracing::debug!(piece = k, "piece's first bytes from the origin");
                }
                pos += n;
                let before = std::mem::replace(have, pos - start);
                ctx.wrote(k, before, *have);
                inner.metrics.origin_bytes.inc_by(n);
                inner
                    .metrics
                    .fetched_bytes
                    .with_label_values(&["origin"])
                    .inc_by(n);
                ctx.dl.count(crate::fetch::Source::Origin, n);
            }
            if let Some(b) = broke {
                break b;
            }
            if pos >= end {
                break None;
            }
        };
        if pos >= end {
            return Ok(());
        }
        failures += 1;
        if failures > inner.retries {
            return Err(FetchError::Exhausted {
                digest: digest.clone(),
                attempts: failures,
                last: broke.unwrap_or_else(|| "body ended early".into()),
            });
        }
        inner.metrics.origin_resumes.inc();
        tracing::warn!(digest = %digest, piece = k, at = pos, error = ?broke, "origin piece broke, resuming");
        tokio::time::sleep(Duration::from_millis(200 * failures as u64)).await;
    }
}
