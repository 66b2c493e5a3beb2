//! The mirror's HTTP surface: the pull side of the OCI distribution API,
//! as containerd uses it through `hosts.toml`.
//!
//! ```text
//! GET|HEAD /v2/
//! GET|HEAD /v2/<name>/manifests/<tag|digest>?ns=<registry>
//! GET|HEAD /v2/<name>/blobs/<digest>?ns=<registry>
//! ```
//!
//! Requests are parsed into a [`Route`] and validated before anything else
//! happens. Every failure becomes an [`ApiError`], and [`ApiError::response`]
//! is the one place that turns errors into OCI error JSON.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::fetch::{FetchError, Fetcher, Manifest};
use crate::http::{range_spec, unsatisfied_content_range, ContentRange, RangeSpec};
use crate::oci::{self, Digest, ErrorCode, Object, Reference};
use crate::origin::{OriginError, Upstream};
use crate::telemetry::Metrics;

/// A response body, as [`http1`] writes it.
pub enum Body {
    Empty,
    Full(Bytes),
    /// Blob bytes, sent from the file with sendfile(2).
    Blob(crate::fetch::Spans),
}

/// Slow clients may take this long to send their request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What a request asks for, after validation.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Base,
    Manifest {
        ns: Option<String>,
        name: String,
        reference: Reference,
    },
    Blob {
        ns: Option<String>,
        name: String,
        digest: Digest,
    },
}

impl Route {
    fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
        }
    }
}

/// An error on its way to becoming an OCI error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// `WWW-Authenticate` to pass on with a 401.
    pub challenge: Option<HeaderValue>,
    /// `Content-Range` for a 416.
    pub content_range: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            challenge: None,
            content_range: None,
        }
    }

    /// The one place errors become responses.
    pub fn response(self, head_only: bool) -> Response<Body> {
        let json = oci::error_json(self.code, &self.message);
        let mut b = Response::builder()
            .status(self.status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_LENGTH, json.len())
            .header("Docker-Distribution-API-Version", "registry/2.0");
        if let Some(c) = self.challenge {
            b = b.header(http::header::WWW_AUTHENTICATE, c);
        }
        if let Some(cr) = self.content_range {
            b = b.header(http::header::CONTENT_RANGE, cr);
        }
        let body = if head_only { empty() } else { full(json) };
        b.body(body).unwrap_or_else(|_| Response::new(empty()))
    }
}

impl From<&FetchError> for ApiError {
    fn from(e: &FetchError) -> ApiError {
        use StatusCode as S;
        let msg = e.to_string();
        match e.root() {
            FetchError::Origin(o) => match o {
                OriginError::Unauthorized { challenge, .. } => ApiError {
                    challenge: challenge.clone(),
                    ..ApiError::new(S::UNAUTHORIZED, ErrorCode::Unauthorized, msg)
                },
                OriginError::Denied { .. } => ApiError::new(S::FORBIDDEN, ErrorCode::Denied, msg),
                OriginError::NotFound { what, .. } => {
                    let code = match what {
                        Object::Blob => ErrorCode::BlobUnknown,
                        Object::Manifest => ErrorCode::ManifestUnknown,
                    };
                    ApiError::new(S::NOT_FOUND, code, msg)
                }
                OriginError::TooManyRequests { .. } => {
                    ApiError::new(S::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests, msg)
                }
                _ => ApiError::new(S::BAD_GATEWAY, ErrorCode::Unknown, msg),
            },
            FetchError::Store(_) | FetchError::Io { .. } => {
                ApiError::new(S::INTERNAL_SERVER_ERROR, ErrorCode::Unknown, msg)
            }
            _ => ApiError::new(S::BAD_GATEWAY, ErrorCode::Unknown, msg),
        }
    }
}

fn bad_request(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

/// Parses and validates a request's path and `ns` query parameter.
pub fn parse_route(path: &str, query: Option<&str>) -> Result<Route, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::Unsupported,
            "not a distribution API path",
        )
    };
    let rest = match path {
        "/v2" | "/v2/" => return Ok(Route::Base),
        p => p.strip_prefix("/v2/").ok_or_else(not_found)?,
    };
    let segments: Vec<&str> = rest.split('/').collect();
    if segments.iter().any(|s| *s == ".." || *s == ".") {
        return Err(bad_request(
            ErrorCode::NameInvalid,
            "path contains a '.' or '..' segment",
        ));
    }
    if segments.len() < 3 {
        return Err(not_found());
    }
    let (name_parts, tail) = segments.split_at(segments.len() - 2);
    let name = name_parts.join("/");
    let ns = parse_ns(query)?;
    match tail[0] {
        "manifests" => {
            oci::validate_repository(&name).map_err(|m| bad_request(ErrorCode::NameInvalid, m))?;
            let reference = if tail[1].contains(':') {
                Reference::Digest(tail[1].parse().map_err(|e: oci::DigestError| {
                    bad_request(ErrorCode::DigestInvalid, e.to_string())
                })?)
            } else {
                oci::validate_tag(tail[1])
                    .map_err(|m| bad_request(ErrorCode::ManifestInvalid, m))?;
                Reference::Tag(tail[1].to_owned())
            };
            Ok(Route::Manifest {
                ns,
                name,
                reference,
            })
        }
        "blobs" => {
            oci::validate_repository(&name).map_err(|m| bad_request(ErrorCode::NameInvalid, m))?;
            let digest = tail[1].parse().map_err(|e: oci::DigestError| {
                bad_request(ErrorCode::DigestInvalid, e.to_string())
            })?;
            Ok(Route::Blob { ns, name, digest })
        }
        _ => Err(not_found()),
    }
}

fn parse_ns(query: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(q) = query else { return Ok(None) };
    let mut ns = None;
    for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
        if k == "ns" {
            if ns.is_some() {
                return Err(bad_request(ErrorCode::NameInvalid, "ns is given twice"));
            }
            crate::config::valid_host(&v).map_err(|m| bad_request(ErrorCode::NameInvalid, m))?;
            ns = Some(v.into_owned());
        }
    }
    Ok(ns)
}

fn empty() -> Body {
    Body::Empty
}

fn full(b: impl Into<Bytes>) -> Body {
    Body::Full(b.into())
}

/// The mirror service.
#[derive(Clone)]
pub struct Mirror {
    inner: Arc<MirrorInner>,
}

struct MirrorInner {
    cfg: Config,
    fetcher: Fetcher,
    metrics: Metrics,
}

impl Mirror {
    pub fn new(cfg: &Config, fetcher: Fetcher, metrics: Metrics) -> Mirror {
        Mirror {
            inner: Arc::new(MirrorInner {
                cfg: cfg.clone(),
                fetcher,
                metrics,
            }),
        }
    }

    /// Answers one request, recording its metrics.
    pub async fn handle(&self, req: Request<()>) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let head_only = method == Method::HEAD;
        let (route_label, resp) = match self.route(&req) {
            Ok(route) => {
                let label = route.label();
                let resp = match self.dispatch(route, req.headers(), head_only).await {
                    Ok(r) => r,
                    Err(e) => e.response(head_only),
                };
                (label, resp)
            }
            Err(e) => ("invalid", e.response(head_only)),
        };
        let m = &self.inner.metrics;
        // Any token is a method to the parser; only ours become label values, so
        // a client cannot mint new series.
        let method_label = match method {
            Method::GET => "GET",
            Method::HEAD => "HEAD",
            _ => "other",
        };
        m.http_requests
            .with_label_values(&[route_label, method_label, resp.status().as_str()])
            .inc();
        m.http_duration
            .with_label_values(&[route_label])
            .observe(started.elapsed().as_secs_f64());
        // The scheme only: the credential itself never reaches a log.
        let auth = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or("none");
        tracing::debug!(method = %method, path = %req.uri().path(), status = resp.status().as_u16(),
            route = route_label, auth, "answered");
        resp
    }

    fn route(&self, req: &Request<()>) -> Result<Route, ApiError> {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::Unsupported,
                "this mirror is read-only: only GET and HEAD are supported",
            ));
        }
        let header_bytes: u64 = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
            .sum();
        if header_bytes > self.inner.cfg.mirror.max_header_size {
            return Err(ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                ErrorCode::Unsupported,
                format!(
                    "request headers are {header_bytes} bytes, over the limit of {}",
                    self.inner.cfg.mirror.max_header_size
                ),
            ));
        }
        parse_route(req.uri().path(), req.uri().query())
    }

    fn upstream(&self, ns: Option<&str>) -> Result<Upstream, ApiError> {
        let ns = match ns.or(self.inner.cfg.mirror.default_registry.as_deref()) {
            Some(ns) => ns,
            None => {
                return Err(bad_request(
                    ErrorCode::NameInvalid,
                    "no ?ns=<registry> parameter and no mirror.default_registry configured",
                ))
            }
        };
        // A 404 makes containerd fall back to the registry itself.
        self.inner.fetcher.origin().upstream(ns).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NameUnknown,
                format!("registry {ns} is not mirrored here"),
            )
        })
    }

    async fn dispatch(
        &self,
        route: Route,
        headers: &HeaderMap,
        head_only: bool,
    ) -> Result<Response<Body>, ApiError> {
        let client_auth = headers.get(http::header::AUTHORIZATION);
        match route {
            Route::Base => Ok(base_response(head_only)),
            Route::Manifest {
                ns,
                name,
                reference,
            } => {
                let up = self.upstream(ns.as_deref())?;
                let accept = headers.get(http::header::ACCEPT);
                let m = self
                    .inner
                    .fetcher
                    .manifest(&up, &name, &reference, accept, client_auth)
                    .await
                    .map_err(|e| ApiError::from(&e))?;
                manifest_response(m, head_only)
            }
            Route::Blob { ns, name, digest } => {
                let up = self.upstream(ns.as_deref())?;
                let blob = self
                    .inner
                    .fetcher
                    .blob(&up, &name, &digest, client_auth)
                    .await
                    .map_err(|e| ApiError::from(&e))?;
                let size = blob.size;
                let range = headers
                    .get(http::header::RANGE)
                    .and_then(|v| v.to_str().ok());
                let (status, start, end) = match range_spec(range, size) {
                    RangeSpec::Full => (StatusCode::OK, 0, size),
                    RangeSpec::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start, end),
                    RangeSpec::Unsatisfiable => {
                        return Err(ApiError {
                            content_range: Some(unsatisfied_content_range(size)),
                            ..ApiError::new(
                                StatusCode::RANGE_NOT_SATISFIABLE,
                                ErrorCode::RangeInvalid,
                                format!("range not satisfiable for a blob of {size} bytes"),
                            )
                        })
                    }
                };
                let mut b = Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_TYPE, "application/octet-stream")
                    .header(http::header::CONTENT_LENGTH, end - start)
                    .header(http::header::ACCEPT_RANGES, "bytes")
                    .header(http::header::ETAG, format!("\"{digest}\""))
                    .header("Docker-Content-Digest", digest.to_string())
                    .header("Docker-Distribution-API-Version", "registry/2.0")
                    .header("X-Damselfly-Source", blob.source.as_str());
                if status == StatusCode::PARTIAL_CONTENT {
                    let range = ContentRange {
                        first: start,
                        last: end - 1,
                        size,
                    };
                    b = b.header(http::header::CONTENT_RANGE, range.to_string());
                }
                let body = if head_only {
                    empty()
                } else {
                    Body::Blob(blob.spans(start, end, self.inner.metrics.clone()))
                };
                b.body(body).map_err(|e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        ErrorCode::Unknown,
                        e.to_string(),
                    )
                })
            }
        }
    }
}

fn base_response(head_only: bool) -> Response<Body> {
    let body = if head_only { empty() } else { full("{}") };
    Response::builder()
        // `hostsd check` tells damselfly from another program on its port.
        .header(
            http::header::SERVER,
            concat!("damselfly/", env!("CARGO_PKG_VERSION")),
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, 2)
        .header("Docker-Distribution-API-Version", "registry/2.0")
        .body(body)
        .unwrap_or_else(|_| Response::new(empty()))
}

fn manifest_response(m: Manifest, head_only: bool) -> Result<Response<Body>, ApiError> {
    let len = m.body.len();
    let digest = m.digest.to_string();
    let body = if head_only { empty() } else { full(m.body) };
    // The media type comes from the origin or the manifest itself; one that
    // is not a valid header value must not turn into an empty 200.
    Response::builder()
        .header(http::header::CONTENT_TYPE, m.media_type)
        .header(http::header::CONTENT_LENGTH, len)
        .header(http::header::ETAG, format!("\"{digest}\""))
        .header("Docker-Content-Digest", digest)
        .header("Docker-Distribution-API-Version", "registry/2.0")
        .header("X-Damselfly-Source", m.source.as_str())
        .header("X-Damselfly-Stale", if m.stale { "1" } else { "0" })
        .body(body)
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::ManifestInvalid,
                format!("manifest cannot be served: {e}"),
            )
        })
}

/// Serves the mirror on `listener` until `shutdown` fires, then lets
/// in-flight requests finish for up to `drain`.
pub async fn serve(
    listener: TcpListener,
    mirror: Mirror,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let max_head = (mirror.inner.cfg.mirror.max_header_size as usize)
        .saturating_mul(4)
        .saturating_add(64 << 10);
    // Idle connections close at once; those serving a response finish it.
    let handle = move |stream: TcpStream, peer: SocketAddr, stop: CancellationToken| {
        let mirror = mirror.clone();
        async move {
            let _ = stream.set_nodelay(true);
            let conn = http1::serve_connection(stream, mirror, max_head, HEADER_READ_TIMEOUT, stop);
            if let Err(e) = conn.await {
                tracing::debug!(peer = %peer, error = %e, "mirror connection ended with an error");
            }
        }
    };
    crate::http::serve("mirror", listener, handle, shutdown, drain).await
}

pub(crate) mod http1;

#[cfg(test)]
mod tests;
