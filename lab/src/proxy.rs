//! `FaultProxy`: a streaming HTTP/1.1 reverse proxy on 127.0.0.1 that
//! counts what passes and breaks blob downloads on demand.
//!
//! Requests are forwarded with hyper's own client: method, URI, and every
//! end-to-end header unchanged (`Host`, `Authorization`, `Range`, ...);
//! responses come back with their headers unchanged (a `Location` is passed
//! through as is). Bodies stream both ways, so multi-GiB blobs pass without
//! buffering. Faults apply to responses of `GET /v2/<name>/blobs/<digest>`
//! (or to what [`FaultProxy::set_fault_matching`] selects) that the upstream
//! answered with 2xx. The proxy runs on its own tokio runtime thread, so it
//! is controlled from sync or async tests alike.
//!
//! [`FaultProxy::set_rate_per_response`] caps every response body at a rate
//! of its own: an origin whose connections are each capped, as S3's are
//! behind ECR, so that one stream cannot fill the link and parallel ranged
//! GETs multiply the throughput.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName};
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::blob::Endpoint;
use super::registry::blob_digest;
use super::server::{simple_response, BoxError, LabBody, ServerThread};

/// `times` value for a fault that applies to every matching request.
pub const ALWAYS: usize = usize::MAX;

/// How long a cut connection waits after its last allowed byte before it
/// closes, so that hyper flushes those bytes first.
const CUT_FLUSH_DELAY: Duration = Duration::from_millis(30);

/// A fault to inject. `times` counts matching requests (GET blob, 2xx from
/// upstream, unless [`FaultProxy::set_fault_matching`] says otherwise) that
/// get the fault; later ones pass untouched. [`ALWAYS`] never runs out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Pass everything through.
    None,
    /// Send the status, the headers (with the full `Content-Length`) and the
    /// first `bytes` body bytes, then close the TCP connection.
    CutAfter {
        /// Body bytes to let through.
        bytes: u64,
        /// Requests to cut.
        times: usize,
    },
    /// Flip every bit of the body byte at `offset` (relative to the body
    /// served, so to the range start for a 206); the length is unchanged.
    Corrupt {
        /// Body offset of the byte to flip.
        offset: u64,
        /// Requests to corrupt.
        times: usize,
    },
    /// Send `after` body bytes, then nothing for `duration`, then the rest.
    Stall {
        /// Body bytes before the pause.
        after: u64,
        /// Length of the pause.
        duration: Duration,
        /// Requests to stall.
        times: usize,
    },
    /// Answer `code` with an OCI error body without asking upstream.
    Status {
        /// HTTP status code, e.g. 500 or 404.
        code: u16,
        /// Requests to answer so.
        times: usize,
    },
}

impl Fault {
    fn times(&self) -> usize {
        match self {
            Fault::None => 0,
            Fault::CutAfter { times, .. }
            | Fault::Corrupt { times, .. }
            | Fault::Stall { times, .. }
            | Fault::Status { times, .. } => *times,
        }
    }
}

type Filter = Arc<dyn Fn(&str, &str, &HeaderMap) -> bool + Send + Sync>;

struct FaultRule {
    fault: Fault,
    remaining: usize,
    filter: Option<Filter>,
}

const OUTCOME_STREAMING: u8 = 0;
const OUTCOME_COMPLETE: u8 = 1;
const OUTCOME_CUT: u8 = 2;
const OUTCOME_ABORTED: u8 = 3;

struct Record {
    method: String,
    uri: String,
    path: String,
    request_headers: Vec<(String, String)>,
    at: Instant,
    status: AtomicU16,
    body_bytes: AtomicU64,
    content_length: Mutex<Option<u64>>,
    fault: Mutex<Option<Fault>>,
    outcome: AtomicU8,
}

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct ProxyRequest {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// Path and query as received (`/v2/foo/blobs/sha256:..?ns=127.0.0.1%3A5000`).
    pub uri: String,
    /// Path only.
    pub path: String,
    /// Request headers (names lower case).
    pub request_headers: Vec<(String, String)>,
    /// Status sent to the client (502 when upstream was unreachable; 0 while
    /// upstream has not answered yet).
    pub status: u16,
    /// Body bytes sent to the client so far.
    pub body_bytes: u64,
    /// The response's `Content-Length`, if it had one.
    pub content_length: Option<u64>,
    /// The fault applied to this request, if any.
    pub fault: Option<Fault>,
    /// The whole body went out.
    pub completed: bool,
    /// The proxy cut it (a [`Fault::CutAfter`]).
    pub cut: bool,
    /// When it arrived.
    pub at: Instant,
}

impl ProxyRequest {
    /// The value of request header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.request_headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A GET of `/v2/<name>/blobs/<digest>`.
    pub fn is_blob_get(&self) -> bool {
        self.method == "GET" && blob_digest(&self.path).is_some()
    }

    /// The digest of a blob request.
    pub fn digest(&self) -> Option<&str> {
        blob_digest(&self.path)
    }

    /// The decoded `ns` query parameter containerd adds for mirrors.
    pub fn ns(&self) -> Option<String> {
        let query = self.uri.split_once('?')?.1;
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "ns")
            .map(|(_, v)| v.into_owned())
    }
}

struct ProxyState {
    upstream_scheme: String,
    upstream_authority: String,
    client: Client<HttpConnector, LabBody>,
    rule: Mutex<FaultRule>,
    latency: Mutex<Duration>,
    /// Bytes per second for each response body; 0: unlimited.
    rate: AtomicU64,
    records: Mutex<Vec<Arc<Record>>>,
    in_flight: AtomicUsize,
    /// The most response bodies that streamed at once.
    max_in_flight: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ProxyState {
    fn matches(
        &self,
        filter: &Option<Filter>,
        method: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> bool {
        match filter {
            Some(f) => f(method, path, headers),
            None => method == "GET" && blob_digest(path).is_some(),
        }
    }

    /// Takes one use of the current fault if it applies to this request at
    /// this stage (`before_upstream`: only `Status`; after: body faults).
    fn take_fault(
        &self,
        method: &str,
        path: &str,
        headers: &HeaderMap,
        before_upstream: bool,
    ) -> Option<Fault> {
        let mut rule = lock(&self.rule);
        let is_status = matches!(rule.fault, Fault::Status { .. });
        if rule.fault == Fault::None || rule.remaining == 0 || is_status != before_upstream {
            return None;
        }
        if !self.matches(&rule.filter, method, path, headers) {
            return None;
        }
        if rule.remaining != ALWAYS {
            rule.remaining -= 1;
        }
        Some(rule.fault.clone())
    }
}

/// A running reverse proxy; stops (dropping all connections) on drop.
pub struct FaultProxy {
    server: ServerThread,
    state: Arc<ProxyState>,
    upstream: String,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("url", &self.url())
            .field("upstream", &self.upstream)
            .finish()
    }
}

impl FaultProxy {
    /// Starts a proxy in front of `upstream` (a [`super::Registry`], or a
    /// `http://host:port` URL) with no fault.
    pub fn start(upstream: &(impl Endpoint + ?Sized)) -> anyhow::Result<FaultProxy> {
        let upstream = upstream.base_url();
        let uri: Uri = upstream
            .parse()
            .with_context(|| format!("bad upstream URL {upstream}"))?;
        let scheme = uri.scheme_str().unwrap_or("http").to_string();
        if scheme != "http" {
            return Err(anyhow!(
                "FaultProxy forwards to http:// only, got {upstream}"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("upstream URL {upstream} has no host"))?
            .to_string();
        if !matches!(uri.path(), "" | "/") {
            return Err(anyhow!("upstream URL {upstream} must not have a path"));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let state = Arc::new(ProxyState {
            upstream_scheme: scheme,
            upstream_authority: authority,
            client,
            rule: Mutex::new(FaultRule {
                fault: Fault::None,
                remaining: 0,
                filter: None,
            }),
            latency: Mutex::new(Duration::ZERO),
            rate: AtomicU64::new(0),
            records: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let handler_state = state.clone();
        let server = ServerThread::start("lab-proxy", 2, move |req| {
            let state = handler_state.clone();
            async move { handle(state, req).await }
        })
        .context("start fault proxy")?;
        Ok(FaultProxy {
            server,
            state,
            upstream,
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.server.addr().to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// The upstream base URL.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Sets the fault for GET blob requests (replacing any earlier fault and
    /// filter).
    pub fn set_fault(&self, fault: Fault) {
        let mut rule = lock(&self.state.rule);
        rule.remaining = fault.times();
        rule.fault = fault;
        rule.filter = None;
    }

    /// Sets the fault for requests where `filter(method, path)` is true.
    pub fn set_fault_matching(
        &self,
        fault: Fault,
        filter: impl Fn(&str, &str) -> bool + Send + Sync + 'static,
    ) {
        self.set_fault_matching_headers(fault, move |m, p, _| filter(m, p));
    }

    /// Sets the fault for requests where `filter(method, path, request
    /// headers)` is true, e.g. only the GET whose `Range` starts at a given
    /// offset.
    pub fn set_fault_matching_headers(
        &self,
        fault: Fault,
        filter: impl Fn(&str, &str, &HeaderMap) -> bool + Send + Sync + 'static,
    ) {
        let mut rule = lock(&self.state.rule);
        rule.remaining = fault.times();
        rule.fault = fault;
        rule.filter = Some(Arc::new(filter));
    }

    /// Caps every response body from now on at `bytes_per_sec`, each on its
    /// own (0: no cap). Responses already streaming keep their cap.
    pub fn set_rate_per_response(&self, bytes_per_sec: u64) {
        self.state.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Back to pass-through.
    pub fn clear_fault(&self) {
        self.set_fault(Fault::None);
    }

    /// How many more requests the current fault will hit.
    pub fn fault_remaining(&self) -> usize {
        lock(&self.state.rule).remaining
    }

    /// Delays every request by `latency` before forwarding it (zero: none).
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.state.latency) = latency;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<ProxyRequest> {
        lock(&self.state.records)
            .iter()
            .map(|r| snapshot(r))
            .collect()
    }

    /// A position in the request list for [`FaultProxy::requests_since`].
    pub fn mark(&self) -> usize {
        lock(&self.state.records).len()
    }

    /// Requests after `mark`.
    pub fn requests_since(&self, mark: usize) -> Vec<ProxyRequest> {
        lock(&self.state.records)
            .iter()
            .skip(mark)
            .map(|r| snapshot(r))
            .collect()
    }

    /// Forgets all recorded requests.
    pub fn reset_counts(&self) {
        lock(&self.state.records).clear();
    }

    /// Number of requests whose path contains `needle`.
    pub fn count_path(&self, needle: &str) -> usize {
        lock(&self.state.records)
            .iter()
            .filter(|r| r.path.contains(needle))
            .count()
    }

    /// Body bytes sent for requests whose path contains `needle`.
    pub fn bytes_for_path(&self, needle: &str) -> u64 {
        lock(&self.state.records)
            .iter()
            .filter(|r| r.path.contains(needle))
            .map(|r| r.body_bytes.load(Ordering::Relaxed))
            .sum()
    }

    /// Number of GET blob requests.
    pub fn blob_gets(&self) -> usize {
        self.requests().iter().filter(|r| r.is_blob_get()).count()
    }

    /// Body bytes sent for GET blob requests.
    pub fn blob_bytes(&self) -> u64 {
        self.requests()
            .iter()
            .filter(|r| r.is_blob_get())
            .map(|r| r.body_bytes)
            .sum()
    }

    /// Number of requests that got a fault.
    pub fn faults_applied(&self) -> usize {
        lock(&self.state.records)
            .iter()
            .filter(|r| lock(&r.fault).is_some())
            .count()
    }

    /// The most response bodies that were streaming at the same moment.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Waits (at most `timeout`) until no response body is streaming.
    /// Returns whether it got there.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.state.in_flight.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

fn snapshot(r: &Record) -> ProxyRequest {
    let outcome = r.outcome.load(Ordering::SeqCst);
    ProxyRequest {
        method: r.method.clone(),
        uri: r.uri.clone(),
        path: r.path.clone(),
        request_headers: r.request_headers.clone(),
        status: r.status.load(Ordering::SeqCst),
        body_bytes: r.body_bytes.load(Ordering::SeqCst),
        content_length: *lock(&r.content_length),
        fault: lock(&r.fault).clone(),
        completed: outcome == OUTCOME_COMPLETE,
        cut: outcome == OUTCOME_CUT,
        at: r.at,
    }
}

/// Hop-by-hop headers (RFC 9110 7.6.1) plus `expect` (hyper's client does
/// not do 100-continue; the server side already answered it).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    ] {
        headers.remove(name);
    }
}

fn oci_error(code: u16, message: &str) -> Response<LabBody> {
    let body = serde_json::json!({
        "errors": [{ "code": "UNKNOWN", "message": message, "detail": null }]
    });
    simple_response(code, "application/json", body.to_string())
}

async fn handle(state: Arc<ProxyState>, req: Request<Incoming>) -> Response<LabBody> {
    let latency = *lock(&state.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let method = req.method().as_str().to_string();
    let uri = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    let path = req.uri().path().to_string();
    let record = Arc::new(Record {
        method: method.clone(),
        uri: uri.clone(),
        path: path.clone(),
        request_headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        at: Instant::now(),
        status: AtomicU16::new(0),
        body_bytes: AtomicU64::new(0),
        content_length: Mutex::new(None),
        fault: Mutex::new(None),
        outcome: AtomicU8::new(OUTCOME_STREAMING),
    });
    lock(&state.records).push(record.clone());

    if let Some(fault @ Fault::Status { code, .. }) =
        state.take_fault(&method, &path, req.headers(), true)
    {
        *lock(&record.fault) = Some(fault);
        record.status.store(code, Ordering::SeqCst);
        record.outcome.store(OUTCOME_COMPLETE, Ordering::SeqCst);
        return oci_error(code, "damselfly lab: injected status");
    }

    let (mut parts, body) = req.into_parts();
    let target = format!(
        "{}://{}{}",
        state.upstream_scheme, state.upstream_authority, uri
    );
    parts.uri = match target.parse() {
        Ok(uri) => uri,
        Err(e) => {
            record.status.store(400, Ordering::SeqCst);
            record.outcome.store(OUTCOME_COMPLETE, Ordering::SeqCst);
            return oci_error(400, &format!("damselfly lab proxy: bad URI: {e}"));
        }
    };
    strip_hop_by_hop(&mut parts.headers);
    let request_headers = parts.headers.clone();
    let upstream_request =
        Request::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed());
    let response = match state.client.request(upstream_request).await {
        Ok(response) => response,
        Err(e) => {
            record.status.store(502, Ordering::SeqCst);
            record.outcome.store(OUTCOME_COMPLETE, Ordering::SeqCst);
            return oci_error(502, &format!("damselfly lab proxy: upstream: {e}"));
        }
    };
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    record.status.store(parts.status.as_u16(), Ordering::SeqCst);
    let content_length = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    *lock(&record.content_length) = content_length;
    let fault = if parts.status.is_success() {
        state.take_fault(&method, &path, &request_headers, false)
    } else {
        None
    };
    *lock(&record.fault) = fault.clone();
    let rate = state.rate.load(Ordering::SeqCst);
    let mut body = FaultBody::new(body, fault, record, content_length, state.clone());
    if rate > 0 {
        body.pace = Some(Pace {
            rate: rate as f64,
            started: tokio::time::Instant::now(),
        });
    }
    Response::from_parts(parts, body.boxed())
}

/// The response body: passes upstream frames through, counting bytes and
/// applying the fault.
struct FaultBody {
    inner: Incoming,
    fault: Option<Fault>,
    sent: u64,
    content_length: Option<u64>,
    pending: Option<Bytes>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    stalled: bool,
    cutting: bool,
    ended: bool,
    /// The per-response rate cap, if any.
    pace: Option<Pace>,
    record: Arc<Record>,
    state: Arc<ProxyState>,
}

/// A response's own rate cap: each frame waits until the bytes sent so far
/// fit the rate since the first byte.
struct Pace {
    rate: f64,
    started: tokio::time::Instant,
}

/// Frames larger than this are split, so a capped body flows smoothly.
const PACE_FRAME: usize = 64 << 10;

impl FaultBody {
    fn new(
        inner: Incoming,
        fault: Option<Fault>,
        record: Arc<Record>,
        content_length: Option<u64>,
        state: Arc<ProxyState>,
    ) -> FaultBody {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        FaultBody {
            inner,
            fault,
            sent: 0,
            content_length,
            pending: None,
            sleep: None,
            stalled: false,
            cutting: false,
            ended: false,
            pace: None,
            record,
            state,
        }
    }

    fn emit(&mut self, mut data: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(pace) = &self.pace {
            // (A fault that already holds back the rest keeps its frame.)
            if data.len() > PACE_FRAME && self.pending.is_none() {
                self.pending = Some(data.split_off(PACE_FRAME));
            }
            // The wait comes before the next frame: this one may go now.
            let due = pace.started
                + Duration::from_secs_f64((self.sent + data.len() as u64) as f64 / pace.rate);
            if due > tokio::time::Instant::now() {
                self.sleep = Some(Box::pin(tokio::time::sleep_until(due)));
            }
        }
        self.sent += data.len() as u64;
        self.record
            .body_bytes
            .fetch_add(data.len() as u64, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

impl Body for FaultBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            if let Some(sleep) = this.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
                if this.cutting {
                    this.ended = true;
                    this.record.outcome.store(OUTCOME_CUT, Ordering::SeqCst);
                    return Poll::Ready(Some(Err("damselfly lab: connection cut by fault".into())));
                }
            }
            if let Some(Fault::CutAfter { bytes, .. }) = this.fault {
                let whole_body_sent = this.content_length.is_some_and(|len| this.sent >= len);
                if this.sent >= bytes && !whole_body_sent {
                    // Let hyper flush what was sent, then fail the body,
                    // which makes hyper close the connection.
                    this.cutting = true;
                    this.sleep = Some(Box::pin(tokio::time::sleep(CUT_FLUSH_DELAY)));
                    continue;
                }
            }
            let data = match this.pending.take() {
                Some(data) => data,
                None => match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                    None => {
                        this.ended = true;
                        this.record
                            .outcome
                            .store(OUTCOME_COMPLETE, Ordering::SeqCst);
                        return Poll::Ready(None);
                    }
                    Some(Err(e)) => {
                        this.ended = true;
                        this.record.outcome.store(OUTCOME_ABORTED, Ordering::SeqCst);
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    },
                },
            };
            if data.is_empty() {
                continue;
            }
            let start = this.sent;
            let end = start + data.len() as u64;
            match this.fault.clone() {
                Some(Fault::CutAfter { bytes, .. }) => {
                    let allowed = bytes.saturating_sub(start).min(data.len() as u64) as usize;
                    return this.emit(data.slice(..allowed));
                }
                Some(Fault::Stall {
                    after, duration, ..
                }) if !this.stalled => {
                    if start >= after {
                        this.stalled = true;
                        this.pending = Some(data);
                        this.sleep = Some(Box::pin(tokio::time::sleep(duration)));
                        continue;
                    }
                    if end > after {
                        let split = (after - start) as usize;
                        this.pending = Some(data.slice(split..));
                        return this.emit(data.slice(..split));
                    }
                    return this.emit(data);
                }
                Some(Fault::Corrupt { offset, .. }) if (start..end).contains(&offset) => {
                    let mut copy = BytesMut::from(&data[..]);
                    copy[(offset - start) as usize] ^= 0xff;
                    return this.emit(copy.freeze());
                }
                _ => return this.emit(data),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
            || (self.pending.is_none()
                && self.sleep.is_none()
                && !self.cutting
                && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // The Content-Length header (kept) tells hyper the length.
        SizeHint::default()
    }
}

impl Drop for FaultBody {
    fn drop(&mut self) {
        if self.record.outcome.load(Ordering::SeqCst) == OUTCOME_STREAMING {
            let complete = self.content_length.is_some_and(|len| len == self.sent);
            self.record.outcome.store(
                if complete {
                    OUTCOME_COMPLETE
                } else {
                    OUTCOME_ABORTED
                },
                Ordering::SeqCst,
            );
        }
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
