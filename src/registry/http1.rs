//! The mirror's HTTP/1.1 connections, written so that blob bodies can go
//! from a file to the socket with `sendfile(2)`.
//!
//! The mirror speaks plain HTTP on loopback, and nearly all it sends is
//! blob bytes that sit in the page cache already: the store's files, or a
//! download's partial file as it grows. hyper takes bodies as buffers and
//! owns the socket, so every byte would be read into user space and written
//! out again (a cache hit measured 0.85x of docker-registry, which uses
//! sendfile). So requests are parsed here with `httparse` (the parser hyper
//! uses) and responses written here: the head with one write, a blob body
//! as [`crate::fetch::FileSpan`]s handed to `sendfile` (rustix's safe
//! wrapper), anything else as one buffer.
//!
//! The protocol kept is what registry clients use: GET and HEAD (anything
//! else gets the mirror's 405), responses always with `Content-Length`,
//! keep-alive (HTTP/1.1 by default, HTTP/1.0 when asked for), pipelined
//! requests answered in order, and a limit on the time and bytes a request
//! head may take. A request that carries a body is answered and the
//! connection then closed, since the mirror reads no bodies. A body that
//! cannot be completed (a download failed, a chunk did not match its sum)
//! ends the connection, so the client sees a short body.

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{Body, Mirror};
use crate::fetch::FileSpan;

/// Headers a request may have; more get a 431 (hyper's default is 100).
const MAX_HEADERS: usize = 100;

/// What a connection's next step is after a response.
pub(crate) enum After {
    KeepAlive,
    Close,
}

/// Why a request head could not be read.
pub(crate) enum HeadError {
    /// The peer closed, timed out, or the daemon is shutting down: close
    /// without an answer.
    Gone,
    /// A malformed or oversized head: answered, then closed.
    Bad(StatusCode, &'static str),
}

/// Serves one connection until the client closes it, it idles past
/// `header_timeout`, a response cannot be completed, or `shutdown` fires
/// between requests.
pub(super) async fn serve_connection(
    mut stream: TcpStream,
    mirror: Mirror,
    max_head: usize,
    header_timeout: Duration,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(8 << 10);
    loop {
        let req = match read_head(&mut stream, &mut buf, max_head, header_timeout, &shutdown).await
        {
            Ok(r) => r,
            Err(HeadError::Gone) => return Ok(()),
            Err(HeadError::Bad(status, why)) => {
                let resp = Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_LENGTH, why.len())
                    .body(Body::Full(why.into()))
                    .unwrap_or_else(|_| Response::new(Body::Empty));
                write_response(&mut stream, resp, false, false, After::Close).await?;
                return Ok(());
            }
        };
        let (req, mut after) = req;
        let head_only = req.method() == Method::HEAD;
        let http10 = req.version() == Version::HTTP_10;
        let resp = mirror.handle(req).await;
        if shutdown.is_cancelled() {
            after = After::Close;
        }
        match write_response(&mut stream, resp, head_only, http10, after).await? {
            After::KeepAlive => {}
            After::Close => {
                let _ = stream.shutdown().await;
                return Ok(());
            }
        }
    }
}

/// Reads and parses the next request head from `stream` (after what `buf`
/// already holds), and consumes it from `buf`.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max_head: usize,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<(Request<()>, After), HeadError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !buf.is_empty() {
            if let Some(parsed) = parse_head(buf)? {
                return Ok(parsed);
            }
            if buf.len() >= max_head {
                return Err(HeadError::Bad(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "request head too large\n",
                ));
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8 << 10);
        }
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline, stream.read_buf(buf)) => r,
            // Only between requests: a request being read is as good as
            // idle, and clients retry idempotent requests on a closed one.
            _ = shutdown.cancelled() => return Err(HeadError::Gone),
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err(HeadError::Gone),
            Ok(Ok(_)) => {}
        }
    }
}

/// A complete request head at the start of `buf`, consumed; `None` when
/// more bytes are needed.
pub(crate) fn parse_head(buf: &mut BytesMut) -> Result<Option<(Request<()>, After)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::Bad(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many request headers\n",
            ))
        }
        Err(_) => {
            return Err(HeadError::Bad(
                StatusCode::BAD_REQUEST,
                "malformed request\n",
            ))
        }
    };
    let bad = || HeadError::Bad(StatusCode::BAD_REQUEST, "malformed request\n");
    let method = Method::from_bytes(parsed.method.unwrap_or("").as_bytes()).map_err(|_| bad())?;
    let uri: http::Uri = parsed.path.unwrap_or("").parse().map_err(|_| bad())?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad())?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad())?;
        map.append(name, value);
    }
    let after = keep_alive(version, &map);
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = map;
    buf.advance(len);
    Ok(Some((req, after)))
}

/// Whether the connection may carry another request after this one.
fn keep_alive(version: Version, headers: &HeaderMap) -> After {
    let has = |token: &str| {
        headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    // The mirror reads no request bodies: with one, the bytes after the
    // head are not a next request.
    let has_body = headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let keep = match version {
        Version::HTTP_10 => has("keep-alive"),
        _ => !has("close"),
    };
    if keep && !has_body {
        After::KeepAlive
    } else {
        After::Close
    }
}

/// Writes `resp` to a request of HTTP/1.0 (`http10`) or 1.1; returns what
/// the connection does next (`Close` also when a body could not be
/// completed).
async fn write_response(
    stream: &mut TcpStream,
    resp: Response<Body>,
    head_only: bool,
    http10: bool,
    after: After,
) -> io::Result<After> {
    let (parts, body) = resp.into_parts();
    // A response without a length could only end by closing.
    let after = if parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        after
    } else {
        After::Close
    };
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match after {
        After::Close => head.extend_from_slice(b"connection: close\r\n"),
        // An HTTP/1.0 client keeps the connection only when told so.
        After::KeepAlive if http10 => head.extend_from_slice(b"connection: keep-alive\r\n"),
        After::KeepAlive => {}
    }
    head.extend_from_slice(b"\r\n");
    if head_only {
        stream.write_all(&head).await?;
        return Ok(after);
    }
    match body {
        Body::Empty => stream.write_all(&head).await?,
        Body::Full(b) => {
            head.extend_from_slice(&b);
            stream.write_all(&head).await?;
        }
        Body::Blob(mut spans) => {
            stream.write_all(&head).await?;
            while let Some(span) = spans.next().await {
                match span {
                    Ok(span) => send_span(stream, &span).await?,
                    Err(e) => {
                        tracing::debug!(error = %e, left = spans.remaining(),
                            "blob body cut short");
                        return Ok(After::Close);
                    }
                }
            }
        }
    }
    Ok(after)
}

/// Sends `span` with sendfile(2), waiting for the socket whenever it is
/// full.
async fn send_span(stream: &TcpStream, span: &FileSpan) -> io::Result<()> {
    let end = span.offset + span.len;
    let mut offset = span.offset;
    while offset < end {
        // The kernel caps one call at 2 GiB less a page; spans are smaller.
        let count = (end - offset).min(1 << 30) as usize;
        let sent = stream
            .async_io(Interest::WRITABLE, || {
                let mut at = offset;
                rustix::fs::sendfile(stream, &*span.file, Some(&mut at), count)
                    .map_err(io::Error::from)
            })
            .await?;
        if sent == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob file is shorter than expected",
            ));
        }
        offset += sent as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<(Request<()>, After)>, HeadError> {
        parse_head(&mut BytesMut::from(text))
    }

    #[test]
    fn heads_parse_and_keep_alive_follows_the_version() {
        let (req, after) = parse("GET /v2/a/blobs/x?ns=r HTTP/1.1\r\nHost: h\r\n\r\n")
            .ok()
            .flatten()
            .expect("complete");
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/v2/a/blobs/x");
        assert_eq!(req.uri().query(), Some("ns=r"));
        assert_eq!(req.headers()["host"], "h");
        assert!(matches!(after, After::KeepAlive));
        let close = |t: &str| matches!(parse(t).ok().flatten(), Some((_, After::Close)));
        assert!(close("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(close("GET / HTTP/1.0\r\n\r\n"));
        assert!(!close("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(close("GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"));
        assert!(close(
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!close("GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"));
    }

    #[test]
    fn partial_and_bad_heads() {
        assert!(matches!(parse("GET / HTTP/1.1\r\nHost:"), Ok(None)));
        assert!(matches!(
            parse("GET / HTTP/9\r\n\r\n"),
            Err(HeadError::Bad(StatusCode::BAD_REQUEST, _))
        ));
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect();
        assert!(matches!(
            parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Err(HeadError::Bad(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                _
            ))
        ));
    }

    #[test]
    fn pipelined_requests_are_taken_one_at_a_time() {
        let mut buf = BytesMut::from("GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n");
        let first = parse_head(&mut buf).ok().flatten().expect("first");
        assert_eq!(first.0.uri().path(), "/a");
        let second = parse_head(&mut buf).ok().flatten().expect("second");
        assert_eq!(second.0.uri().path(), "/b");
        assert!(buf.is_empty());
    }
}
