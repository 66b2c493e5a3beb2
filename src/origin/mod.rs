//! The client for origin registries.
//!
//! It speaks the pull side of the distribution API with the auth flows that
//! registries use in the field:
//!
//! - a puller's own `Authorization` header (forwarded by containerd) is used
//!   for that request, so the origin authorizes the puller, not the node;
//! - otherwise the daemon's own credentials, from a [`CredentialSource`]:
//!   none, static ones from the config, or ECR tokens from the node's AWS
//!   identity ([`ecr`]). A `401` with a `WWW-Authenticate: Bearer` challenge
//!   starts the token flow (tokens are cached per registry, scope and
//!   identity until they expire), and a `Basic` challenge is answered with
//!   the credentials. When the registry refuses credentials that can be
//!   renewed (ECR), they are renewed once and the request is tried again;
//! - redirects (S3, CDNs) are followed by reqwest, which drops
//!   `Authorization` whenever the scheme, host or port changes;
//! - idempotent requests are retried with exponential backoff on connection
//!   errors, timeouts, `429` and `5xx`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use sha2::Digest as _;

use crate::config::{Auth, Config, Credentials, EcrAuth, OriginConfig, RegistryConfig};
use crate::oci::{Digest, Object};
use crate::telemetry::Metrics;

mod auth;
pub mod ecr;

use auth::{basic_header, client_basic, client_identity, refused, AuthState};
pub use auth::{parse_challenge, pull_scope, Challenge};

use ecr::{EcrCredentials, EcrError, EcrErrorKind, TokenSource};

/// Tokens are refreshed this long before the registry says they expire.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// The distribution token spec's default when `expires_in` is absent.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Largest token-service answer read; real ones are a few KiB.
const MAX_TOKEN_RESPONSE: usize = 64 << 10;
/// Redirect hops followed per request (S3 and CDNs use one or two).
const MAX_REDIRECTS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("origin {host} requires authentication{}", because(cause))]
    Unauthorized {
        host: String,
        /// The origin's `WWW-Authenticate`, passed on so the puller can
        /// authenticate itself.
        challenge: Option<HeaderValue>,
        /// Why the daemon's own credentials were missing or refused.
        cause: Option<CredentialError>,
    },
    #[error("origin {host} denied access{}", because(cause))]
    Denied {
        host: String,
        cause: Option<CredentialError>,
    },
    #[error("origin {host} has no such {what}")]
    NotFound { host: String, what: Object },
    #[error("origin {host} is rate limiting")]
    TooManyRequests { host: String },
    #[error("origin {host} answered {status}")]
    Status { host: String, status: StatusCode },
    // reqwest's own message ("error sending request for url ...") leaves
    // out the cause: a refused connection, a timeout, a certificate that
    // failed verification. The chain names it.
    #[error("origin {host} is unreachable: {}", ecr::error_chain(source))]
    Unreachable {
        host: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("token service {realm} for {host} failed: {reason}")]
    Token {
        host: String,
        realm: String,
        reason: String,
    },
    #[error("cannot set up the client for {host}: {reason}")]
    Setup { host: String, reason: String },
}

fn because(cause: &Option<CredentialError>) -> String {
    cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default()
}

/// Why the daemon had no usable credentials of its own.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    #[error(transparent)]
    Ecr(#[from] EcrError),
    /// The registry refused a token that was fetched for this very request.
    #[error("{host} refused a fresh ECR token for {target}; is this the registry's region (ecr_region)?")]
    FreshTokenRefused { host: String, target: String },
}

impl OriginError {
    /// True when the origin could not be asked at all (as opposed to
    /// answering no); only then may a stale tag answer stand in.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            OriginError::Unreachable { .. } | OriginError::TooManyRequests { .. }
        ) || matches!(self, OriginError::Status { status, .. } if status.is_server_error())
    }
}

/// A registry the mirror may fetch from, with its HTTP client.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub config: RegistryConfig,
    client: reqwest::Client,
    credentials: CredentialSource,
}

/// Where the daemon's own credentials for a registry come from. `origin`
/// asks it for the current credentials, and for new ones after a `401`.
#[derive(Clone, Debug)]
pub enum CredentialSource {
    None,
    Static(Credentials),
    Ecr(Arc<EcrCredentials>),
}

impl CredentialSource {
    /// The credentials to use now.
    pub async fn current(&self) -> Result<Option<Credentials>, CredentialError> {
        match self {
            CredentialSource::None => Ok(None),
            CredentialSource::Static(c) => Ok(Some(c.clone())),
            CredentialSource::Ecr(e) => Ok(Some(e.current().await?)),
        }
    }

    /// Freshly fetched credentials after the registry refused `stale`
    /// (possibly equal to it), or `None` when nothing can be fetched
    /// (static ones, or the rate limit).
    pub async fn refresh(
        &self,
        stale: &Credentials,
    ) -> Result<Option<Credentials>, CredentialError> {
        match self {
            CredentialSource::None | CredentialSource::Static(_) => Ok(None),
            CredentialSource::Ecr(e) => Ok(e.refresh(stale).await?),
        }
    }

    /// Registries known to take basic auth get it on the first request.
    fn basic_up_front(&self) -> bool {
        matches!(self, CredentialSource::Ecr(_))
    }
}

/// What a request carried, to decide what a `401` means.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
enum Sent {
    #[default]
    Nothing,
    /// The puller's own header.
    Client,
    /// Our credentials, as basic auth or through a token got with them.
    Own,
}

impl Upstream {
    pub fn host(&self) -> &str {
        &self.config.host
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TokenKey {
    host: String,
    scope: String,
    /// Whose credentials got the token: tokens obtained with one puller's
    /// credentials must never serve another.
    identity: String,
}

/// The origin client. Cheap to clone.
#[derive(Clone)]
pub struct Origin {
    inner: Arc<OriginInner>,
}

struct OriginInner {
    cfg: Config,
    /// One client per configured registry (each may trust its own CA).
    clients: HashMap<String, reqwest::Client>,
    /// For registries not in the config (the open "any registry" mode).
    default_client: reqwest::Client,
    tokens: Mutex<HashMap<TokenKey, (String, Instant)>>,
    /// Hosts known to want basic auth, so later requests send it at once.
    basic_hosts: Mutex<std::collections::HashSet<String>>,
    /// One ECR token cache per account, region and way of getting there.
    ecr: Mutex<HashMap<EcrAuth, Arc<EcrCredentials>>>,
    ecr_source: Arc<dyn TokenSource>,
    metrics: Metrics,
}

/// One origin request, before auth is applied.
pub struct Request<'a> {
    pub method: Method,
    /// Path and query after the endpoint, starting with `/v2/`.
    pub path: String,
    /// The token scope, `repository:<name>:pull`.
    pub scope: String,
    pub headers: HeaderMap,
    /// The puller's own `Authorization`, if containerd sent one.
    pub client_auth: Option<&'a HeaderValue>,
    /// Label for metrics: `manifest` or `blob`.
    pub kind: Object,
}

impl<'a> Request<'a> {
    /// A GET of blob `digest` in `repo`: the whole blob, or with `range`
    /// the bytes from `.0` to `.1` (exclusive; to the end when `None`).
    /// The one place a blob GET to the origin is written.
    pub fn blob_get(
        repo: &str,
        digest: &Digest,
        range: Option<(u64, Option<u64>)>,
        client_auth: Option<&'a HeaderValue>,
    ) -> Request<'a> {
        let mut headers = HeaderMap::new();
        if let Some((from, end)) = range {
            let spec = match end {
                Some(end) => format!("bytes={from}-{}", end.saturating_sub(1)),
                None => format!("bytes={from}-"),
            };
            // Digits, '=' and '-' only: always a valid header value.
            if let Ok(v) = HeaderValue::from_str(&spec) {
                headers.insert(http::header::RANGE, v);
            }
        }
        Request {
            method: Method::GET,
            path: blob_path(repo, digest),
            scope: pull_scope(repo),
            headers,
            client_auth,
            kind: Object::Blob,
        }
    }
}

impl Origin {
    pub fn new(cfg: &Config, metrics: Metrics) -> Result<Origin, OriginError> {
        Origin::with_ecr_source(cfg, metrics, Arc::new(ecr::AwsTokenSource::default()))
    }

    /// [`Origin::new`] with ECR tokens from `ecr_source` (tests use
    /// [`ecr::MemoryTokenSource`]).
    pub fn with_ecr_source(
        cfg: &Config,
        metrics: Metrics,
        ecr_source: Arc<dyn TokenSource>,
    ) -> Result<Origin, OriginError> {
        let mut clients = HashMap::new();
        for r in &cfg.registries {
            clients.insert(r.host.clone(), build_client(&cfg.origin, Some(r))?);
        }
        Ok(Origin {
            inner: Arc::new(OriginInner {
                cfg: cfg.clone(),
                clients,
                default_client: build_client(&cfg.origin, None)?,
                tokens: Mutex::new(HashMap::new()),
                basic_hosts: Mutex::new(Default::default()),
                ecr: Mutex::new(HashMap::new()),
                ecr_source,
                metrics,
            }),
        })
    }

    fn credential_source(&self, config: &RegistryConfig) -> CredentialSource {
        match &config.auth {
            Auth::None => CredentialSource::None,
            Auth::Basic => config
                .credentials
                .clone()
                .map_or(CredentialSource::None, CredentialSource::Static),
            Auth::Ecr(key) => {
                let mut ecr = self.inner.ecr.lock().unwrap_or_else(|p| p.into_inner());
                let creds = ecr.entry(key.clone()).or_insert_with(|| {
                    Arc::new(EcrCredentials::new(
                        key.clone(),
                        self.inner.ecr_source.clone(),
                        self.inner.metrics.ecr_token_fetches.clone(),
                    ))
                });
                CredentialSource::Ecr(creds.clone())
            }
        }
    }

    /// Starts fetching the ECR token of every configured ECR registry in
    /// the background, so that the first pull on a fresh node does not wait
    /// for it, and a broken identity shows in the log at start-up.
    pub fn prefetch_ecr_tokens(&self) {
        for r in &self.inner.cfg.registries {
            if let CredentialSource::Ecr(creds) = self.credential_source(r) {
                // Errors are logged (once) by the cache itself.
                tokio::spawn(async move { creds.current().await.map(|_| ()) });
            }
        }
    }

    /// The upstream for containerd's `?ns=`, or `None` when that registry is
    /// not mirrored.
    pub fn upstream(&self, ns: &str) -> Option<Upstream> {
        let config = self.inner.cfg.registry_for(ns)?;
        let client = self
            .inner
            .clients
            .get(&config.host)
            .unwrap_or(&self.inner.default_client)
            .clone();
        let credentials = self.credential_source(&config);
        Some(Upstream {
            config,
            client,
            credentials,
        })
    }

    /// Sends `req`, handling auth challenges and retries. Any status other
    /// than 2xx becomes an error, so the caller sees only usable responses.
    #[tracing::instrument(skip_all, fields(host = %up.host(), kind = %req.kind, path = %req.path))]
    pub async fn send(
        &self,
        up: &Upstream,
        req: &Request<'_>,
    ) -> Result<reqwest::Response, OriginError> {
        let host = up.host().to_owned();
        let url = format!(
            "{}{}",
            up.config.endpoint.as_str().trim_end_matches('/'),
            req.path
        );
        // The daemon's own credentials; not even looked up when the puller
        // brought its own, which win for this request.
        let mut st = AuthState::default();
        if req.client_auth.is_none() {
            match up.credentials.current().await {
                Ok(c) => st.own = c,
                Err(e) => st.cause = Some(e),
            }
        }
        // Pick the first Authorization to try without a round trip.
        let mut auth: Option<HeaderValue> = match req.client_auth {
            Some(h) => {
                st.sent = Sent::Client;
                // A token this puller's basic credentials already bought
                // saves the 401 round trip.
                let cached = client_basic(h)
                    .and_then(|b| self.token_for(&host, &req.scope, &client_identity(b)));
                Some(cached.unwrap_or_else(|| h.clone()))
            }
            None => self
                .cached_token(&host, &req.scope, st.own.as_ref())
                .or_else(|| {
                    let basic =
                        up.credentials.basic_up_front() || self.lock_basic().contains(&host);
                    st.own.as_ref().filter(|_| basic).map(basic_header)
                }),
        };
        if auth.is_some() && st.sent == Sent::Nothing {
            st.sent = Sent::Own;
        }
        loop {
            let resp = self.send_with_retries(up, req, &url, auth.as_ref()).await?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            let challenge = resp.headers().get(http::header::WWW_AUTHENTICATE).cloned();
            match status {
                StatusCode::UNAUTHORIZED => {
                    match self
                        .after_unauthorized(up, req, &mut st, auth.as_ref(), challenge.as_ref())
                        .await?
                    {
                        Some(next) => auth = Some(next),
                        // Nothing better to try: hand the origin's challenge
                        // on, so the puller can authenticate itself.
                        None => return Err(refused(host, challenge, st.cause)),
                    }
                }
                StatusCode::FORBIDDEN => return Err(OriginError::Denied { host, cause: None }),
                StatusCode::NOT_FOUND => {
                    return Err(OriginError::NotFound {
                        host,
                        what: req.kind,
                    })
                }
                StatusCode::TOO_MANY_REQUESTS => return Err(OriginError::TooManyRequests { host }),
                _ => return Err(OriginError::Status { host, status }),
            }
        }
    }

    async fn send_with_retries(
        &self,
        up: &Upstream,
        req: &Request<'_>,
        url: &str,
        auth: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, OriginError> {
        let retries = self.inner.cfg.origin.retries;
        let mut backoff = BACKOFF_START;
        let mut attempt = 0;
        loop {
            let mut rb = up
                .client
                .request(req.method.clone(), url)
                .headers(req.headers.clone());
            if let Some(a) = auth {
                rb = rb.header(http::header::AUTHORIZATION, a.clone());
            }
            let result = rb.send().await;
            let retryable = match &result {
                Ok(r) => {
                    r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS
                }
                Err(e) => !e.is_builder() && !e.is_redirect() && !is_tls_failure(e),
            };
            let label = match &result {
                Ok(r) => r.status().as_str().to_owned(),
                Err(_) => "error".to_owned(),
            };
            self.inner
                .metrics
                .origin_requests
                .with_label_values(&[req.kind.as_str(), &label])
                .inc();
            if !retryable || attempt >= retries {
                return result.map_err(|source| OriginError::Unreachable {
                    host: up.host().to_owned(),
                    source,
                });
            }
            attempt += 1;
            match &result {
                Ok(r) => {
                    tracing::warn!(status = %r.status(), attempt, "origin request failed, retrying")
                }
                Err(e) => {
                    tracing::warn!(error = %ecr::error_chain(e), attempt, "origin request failed, retrying")
                }
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_CAP);
        }
    }
}

/// A TLS handshake the origin failed (an untrusted or invalid certificate,
/// or plain HTTP on a TLS port): it fails the same way every time, so it
/// is not retried. They surface as a `rustls::Error` somewhere in the
/// chain, or as tokio-rustls' `InvalidData` I/O error.
fn is_tls_failure(e: &reqwest::Error) -> bool {
    std::error::Error::source(e).is_some_and(tls_in_chain)
}

fn tls_in_chain(err: &(dyn std::error::Error + 'static)) -> bool {
    if err.downcast_ref::<rustls::Error>().is_some() {
        return true;
    }
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        if io.kind() == std::io::ErrorKind::InvalidData {
            return true;
        }
        // An I/O error's `source()` skips the error it wraps; look inside.
        if let Some(inner) = io.get_ref() {
            return tls_in_chain(inner);
        }
    }
    err.source().is_some_and(tls_in_chain)
}

/// Spreads retries of many nodes apart: 50-100% of `d`.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

fn build_client(
    cfg: &OriginConfig,
    registry: Option<&RegistryConfig>,
) -> Result<reqwest::Client, OriginError> {
    let host = registry.map_or("<any>", |r| r.host.as_str()).to_owned();
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(cfg.connect_timeout)
        .read_timeout(cfg.read_timeout)
        .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
        // Blobs are content-addressed: a transparently decompressed body
        // would not match its digest.
        .no_gzip()
        .user_agent(concat!("damselfly/", env!("CARGO_PKG_VERSION")));
    let ca_file = registry.and_then(|r| r.ca_file.as_ref());
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| OriginError::Setup {
            host: host.clone(),
            reason: format!("cannot read ca_file {}: {e}", ca.display()),
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| OriginError::Setup {
                host: host.clone(),
                reason: format!("ca_file {} is not PEM: {e}", ca.display()),
            })?;
        if certs.is_empty() {
            return Err(OriginError::Setup {
                host,
                reason: format!("ca_file {} holds no certificate", ca.display()),
            });
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    // With rustls the roots are parsed here: a PEM block that holds no
    // usable certificate fails the build ("builder error" alone), so name
    // the file and the cause.
    b.build().map_err(|e| OriginError::Setup {
        host,
        reason: match ca_file {
            Some(ca) => format!("ca_file {}: {}", ca.display(), ecr::error_chain(&e)),
            None => ecr::error_chain(&e),
        },
    })
}

/// The origin path of a blob.
pub fn blob_path(repo: &str, digest: &Digest) -> String {
    format!("/v2/{repo}/blobs/{digest}")
}

#[cfg(test)]
mod tests;
