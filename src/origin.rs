//! The client for origin registries.
//!
//! It speaks the pull side of the distribution API with the auth flows that
//! registries use in the field:
//!
//! - a puller's own `Authorization` header (forwarded by containerd) is used
//!   for that request, so the origin authorizes the puller, not the node;
//! - otherwise the configured credentials, or none: a `401` with a
//!   `WWW-Authenticate: Bearer` challenge starts the token flow (tokens are
//!   cached per registry, scope and identity until they expire), and a
//!   `Basic` challenge is answered with the configured credentials;
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

use crate::config::{Config, Credentials, OriginConfig, RegistryConfig};
use crate::oci::Digest;
use crate::telemetry::Metrics;

/// Tokens are refreshed this long before the registry says they expire.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// The distribution token spec's default when `expires_in` is absent.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Redirect hops followed per request (S3 and CDNs use one or two).
const MAX_REDIRECTS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("origin {host} requires authentication")]
    Unauthorized {
        host: String,
        /// The origin's `WWW-Authenticate`, passed on so the puller can
        /// authenticate itself.
        challenge: Option<HeaderValue>,
    },
    #[error("origin {host} denied access")]
    Denied { host: String },
    #[error("origin {host} has no such {what}")]
    NotFound { host: String, what: &'static str },
    #[error("origin {host} is rate limiting")]
    TooManyRequests { host: String },
    #[error("origin {host} answered {status}")]
    Status { host: String, status: StatusCode },
    #[error("origin {host} is unreachable: {source}")]
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

impl OriginError {
    /// True when the origin could not be asked at all (as opposed to
    /// answering no); only then may a stale tag answer stand in.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            OriginError::Unreachable { .. }
                | OriginError::Status { .. }
                | OriginError::TooManyRequests { .. }
        )
    }
}

/// A registry the mirror may fetch from, with its HTTP client.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub config: RegistryConfig,
    client: reqwest::Client,
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
    pub kind: &'static str,
}

impl Origin {
    pub fn new(cfg: &Config, metrics: Metrics) -> Result<Origin, OriginError> {
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
                metrics,
            }),
        })
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
        Some(Upstream { config, client })
    }

    /// Sends `req`, handling auth challenges and retries. Any status other
    /// than 2xx becomes an error, so the caller sees only usable responses.
    #[tracing::instrument(skip_all, fields(host = %up.host(), kind = req.kind, path = %req.path))]
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
        let creds = up.config.credentials.as_ref();
        // Pick the first Authorization to try without a round trip.
        let mut auth: Option<HeaderValue> = match req.client_auth {
            Some(h) => Some(h.clone()),
            None => self.cached_token(&host, &req.scope, creds).or_else(|| {
                let basic = self.lock_basic().contains(&host);
                creds.filter(|_| basic).map(basic_header)
            }),
        };
        let mut challenged = false;
        loop {
            let resp = self.send_with_retries(up, req, &url, auth.as_ref()).await?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            let challenge = resp.headers().get(http::header::WWW_AUTHENTICATE).cloned();
            match status {
                StatusCode::UNAUTHORIZED if !challenged => {
                    challenged = true;
                    match self
                        .answer_challenge(up, req, challenge.as_ref(), creds)
                        .await
                    {
                        Ok(Some(next)) => auth = Some(next),
                        // Nothing to try, or the token service refused our
                        // identity: hand the origin's challenge on, so the
                        // puller can authenticate itself.
                        Ok(None) | Err(OriginError::Unauthorized { .. }) => {
                            return Err(OriginError::Unauthorized { host, challenge })
                        }
                        Err(e) => return Err(e),
                    }
                }
                StatusCode::UNAUTHORIZED => {
                    return Err(OriginError::Unauthorized { host, challenge })
                }
                StatusCode::FORBIDDEN => return Err(OriginError::Denied { host }),
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

    /// Works out the next `Authorization` after a 401, or `None` when there
    /// is nothing better to try and the puller must authenticate itself.
    async fn answer_challenge(
        &self,
        up: &Upstream,
        req: &Request<'_>,
        challenge: Option<&HeaderValue>,
        creds: Option<&Credentials>,
    ) -> Result<Option<HeaderValue>, OriginError> {
        let Some(ch) = challenge
            .and_then(|c| c.to_str().ok())
            .and_then(parse_challenge)
        else {
            return Ok(None);
        };
        // The puller's basic credentials may be used to get a token for it;
        // a puller's bearer token that was refused is final.
        let client_basic = req
            .client_auth
            .and_then(|h| h.to_str().ok())
            .and_then(|s| {
                s.strip_prefix("Basic ")
                    .or_else(|| s.strip_prefix("basic "))
            })
            .map(str::to_owned);
        if req.client_auth.is_some() && client_basic.is_none() {
            return Ok(None);
        }
        match ch.scheme.as_str() {
            "bearer" => {
                let identity = match (&client_basic, creds) {
                    (Some(b), _) => {
                        format!("client:{}", hex::encode(sha2::Sha256::digest(b.as_bytes())))
                    }
                    (None, Some(c)) => format!("configured:{}", c.username),
                    (None, None) => "anonymous".to_owned(),
                };
                let basic = match (&client_basic, creds) {
                    (Some(b), _) => HeaderValue::from_str(&format!("Basic {b}")).ok(),
                    (None, Some(c)) => Some(basic_header(c)),
                    (None, None) => None,
                };
                let token = self
                    .fetch_token(up, &ch, &req.scope, basic.as_ref(), identity)
                    .await?;
                Ok(Some(token))
            }
            "basic" if req.client_auth.is_none() => match creds {
                Some(c) => {
                    self.lock_basic().insert(up.host().to_owned());
                    Ok(Some(basic_header(c)))
                }
                None => Ok(None),
            },
            _ => Ok(None),
        }
    }

    async fn fetch_token(
        &self,
        up: &Upstream,
        ch: &Challenge,
        scope: &str,
        basic: Option<&HeaderValue>,
        identity: String,
    ) -> Result<HeaderValue, OriginError> {
        let host = up.host().to_owned();
        let realm = ch.params.get("realm").cloned().unwrap_or_default();
        let token_err = |reason: String| OriginError::Token {
            host: host.clone(),
            realm: realm.clone(),
            reason,
        };
        let mut url =
            url::Url::parse(&realm).map_err(|e| token_err(format!("realm is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(token_err("realm is not http(s)".into()));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = ch.params.get("service") {
                q.append_pair("service", service);
            }
            // The scope we need, even when the challenge names another (a
            // challenge from /v2/ has none).
            q.append_pair("scope", scope);
        }
        let mut rb = up.client.get(url);
        if let Some(b) = basic {
            rb = rb.header(http::header::AUTHORIZATION, b.clone());
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| token_err(format!("request failed: {e}")))?;
        self.inner
            .metrics
            .origin_requests
            .with_label_values(&["token", resp.status().as_str()])
            .inc();
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED => {
                return Err(OriginError::Unauthorized {
                    host,
                    challenge: None,
                })
            }
            StatusCode::FORBIDDEN => return Err(OriginError::Denied { host }),
            s => return Err(token_err(format!("answered {s}"))),
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let body: TokenResponse = resp
            .json()
            .await
            .map_err(|e| token_err(format!("bad token response: {e}")))?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| token_err("response has no token".into()))?;
        let header = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| token_err("token is not a valid header value".into()))?;
        let lifetime = body
            .expires_in
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        let expiry = Instant::now() + lifetime.saturating_sub(TOKEN_EXPIRY_MARGIN);
        self.lock_tokens().insert(
            TokenKey {
                host,
                scope: scope.to_owned(),
                identity,
            },
            (token, expiry),
        );
        Ok(header)
    }

    fn cached_token(
        &self,
        host: &str,
        scope: &str,
        creds: Option<&Credentials>,
    ) -> Option<HeaderValue> {
        let key = TokenKey {
            host: host.to_owned(),
            scope: scope.to_owned(),
            identity: creds.map_or("anonymous".to_owned(), |c| {
                format!("configured:{}", c.username)
            }),
        };
        let mut tokens = self.lock_tokens();
        match tokens.get(&key) {
            Some((t, expiry)) if *expiry > Instant::now() => {
                HeaderValue::from_str(&format!("Bearer {t}")).ok()
            }
            Some(_) => {
                tokens.remove(&key);
                None
            }
            None => None,
        }
    }

    fn lock_tokens(&self) -> std::sync::MutexGuard<'_, HashMap<TokenKey, (String, Instant)>> {
        self.inner.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_basic(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.inner
            .basic_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
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
                Err(e) => !e.is_builder() && !e.is_redirect(),
            };
            let label = match &result {
                Ok(r) => r.status().as_str().to_owned(),
                Err(_) => "error".to_owned(),
            };
            self.inner
                .metrics
                .origin_requests
                .with_label_values(&[req.kind, &label])
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
                Err(e) => tracing::warn!(error = %e, attempt, "origin request failed, retrying"),
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_CAP);
        }
    }
}

/// Spreads retries of many nodes apart: 50-100% of `d`.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

fn basic_header(c: &Credentials) -> HeaderValue {
    let raw =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
    let mut h = HeaderValue::from_str(&format!("Basic {raw}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    h.set_sensitive(true);
    h
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
    if let Some(ca) = registry.and_then(|r| r.ca_file.as_ref()) {
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
    b.build().map_err(|e| OriginError::Setup {
        host,
        reason: e.to_string(),
    })
}

/// A parsed `WWW-Authenticate` challenge. The scheme is lowercased.
#[derive(Debug, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

/// Parses the first challenge of a `WWW-Authenticate` value:
/// `Bearer realm="https://auth",service="registry",scope="repository:x:pull"`.
pub fn parse_challenge(s: &str) -> Option<Challenge> {
    let s = s.trim();
    let (scheme, mut rest) = match s.split_once(char::is_whitespace) {
        Some((a, b)) => (a, b.trim_start()),
        None => (s, ""),
    };
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return None;
    }
    let mut params = HashMap::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(q) = after.strip_prefix('"') {
            // A quoted-string, with backslash escapes.
            let mut value = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.push(chars.next()?.1),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &q[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.insert(key, value);
        rest = remaining.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// `repository:<name>:pull`, the scope a puller needs.
pub fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

/// The origin path of a blob.
pub fn blob_path(repo: &str, digest: &Digest) -> String {
    format!("/v2/{repo}/blobs/{digest}")
}

#[cfg(test)]
mod tests;
