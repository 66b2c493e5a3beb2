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
use crate::oci::Digest;
use crate::telemetry::Metrics;

pub mod ecr;

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
    NotFound { host: String, what: &'static str },
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
    pub kind: &'static str,
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
            kind: "blob",
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

    /// The next `Authorization` to try after a `401` to a request that
    /// carried `sent`, or `None` to give up. Our own credentials, when
    /// refused, are renewed once (ECR tokens; at a bounded rate); a challenge
    /// is answered once.
    async fn after_unauthorized(
        &self,
        up: &Upstream,
        req: &Request<'_>,
        st: &mut AuthState,
        sent: Option<&HeaderValue>,
        challenge: Option<&HeaderValue>,
    ) -> Result<Option<HeaderValue>, OriginError> {
        if st.sent == Sent::Own {
            if st.fresh {
                return Ok(self.fresh_token_refused(up, st));
            }
            if let (false, Some(stale)) = (st.refreshed, st.own.clone()) {
                st.refreshed = true;
                match up.credentials.refresh(&stale).await {
                    // AWS hands out the very token the registry refused.
                    Ok(Some(fresh)) if fresh == stale => {
                        return Ok(self.fresh_token_refused(up, st));
                    }
                    Ok(Some(fresh)) => {
                        st.own = Some(fresh);
                        st.fresh = true;
                        // The challenge is answered again, with the new ones.
                        st.challenged = false;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        st.cause = Some(e);
                        return Ok(None);
                    }
                }
            }
        }
        if st.challenged {
            return Ok(None);
        }
        st.challenged = true;
        match self
            .answer_challenge(up, req, challenge, st.own.as_ref())
            .await
        {
            // The same header again would only be refused again.
            Ok(Some(next)) if Some(&next) == sent => Ok(None),
            Ok(Some(next)) => {
                if st.sent == Sent::Nothing {
                    st.sent = Sent::Own;
                }
                Ok(Some(next))
            }
            // The token service refused the identity: give up like a 401.
            Ok(None) | Err(OriginError::Unauthorized { .. }) => Ok(None),
            Err(e) => Err(e),
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
        let client_basic = req.client_auth.and_then(client_basic).map(str::to_owned);
        if req.client_auth.is_some() && client_basic.is_none() {
            return Ok(None);
        }
        match ch.scheme.as_str() {
            "bearer" => {
                let identity = match (&client_basic, creds) {
                    (Some(b), _) => client_identity(b),
                    (None, Some(c)) => own_identity(c),
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

    /// Logs and records that the registry refused a token fetched for this
    /// request; there is nothing more to try.
    fn fresh_token_refused(&self, up: &Upstream, st: &mut AuthState) -> Option<HeaderValue> {
        let e = CredentialError::FreshTokenRefused {
            host: up.host().to_owned(),
            target: match &up.credentials {
                CredentialSource::Ecr(e) => ecr::describe(e.key()),
                _ => up.host().to_owned(),
            },
        };
        tracing::error!("{e}");
        st.cause = Some(e);
        None
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
        // A token service that is down is the origin being down: the stale
        // tag fallback may stand in.
        let resp = rb.send().await.map_err(|source| OriginError::Unreachable {
            host: host.clone(),
            source,
        })?;
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
                    cause: None,
                })
            }
            StatusCode::FORBIDDEN => return Err(OriginError::Denied { host, cause: None }),
            StatusCode::TOO_MANY_REQUESTS => return Err(OriginError::TooManyRequests { host }),
            s if s.is_server_error() => return Err(OriginError::Status { host, status: s }),
            s => return Err(token_err(format!("answered {s}"))),
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        // The realm comes from whatever registry a pull names; its answer
        // is read with a bound, never whole.
        let mut raw = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
            let chunk = chunk.map_err(|e| token_err(format!("token response broke: {e}")))?;
            if raw.len() + chunk.len() > MAX_TOKEN_RESPONSE {
                return Err(token_err(format!(
                    "token response is over {MAX_TOKEN_RESPONSE} bytes"
                )));
            }
            raw.extend_from_slice(&chunk);
        }
        let body: TokenResponse = serde_json::from_slice(&raw)
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
        let mut tokens = self.lock_tokens();
        // Expired tokens go whenever a new one comes in, so the cache holds
        // at most the live tokens of live (scope, identity) pairs.
        let now = Instant::now();
        tokens.retain(|_, (_, exp)| *exp > now);
        tokens.insert(
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
        let identity = creds.map_or("anonymous".to_owned(), own_identity);
        self.token_for(host, scope, &identity)
    }

    /// A live cached token for (host, scope, identity).
    fn token_for(&self, host: &str, scope: &str, identity: &str) -> Option<HeaderValue> {
        let key = TokenKey {
            host: host.to_owned(),
            scope: scope.to_owned(),
            identity: identity.to_owned(),
        };
        let tokens = self.lock_tokens();
        match tokens.get(&key) {
            Some((t, expiry)) if *expiry > Instant::now() => {
                HeaderValue::from_str(&format!("Bearer {t}")).ok()
            }
            _ => None,
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
                Err(e) => !e.is_builder() && !e.is_redirect() && !is_tls_failure(e),
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
                Err(e) => {
                    tracing::warn!(error = %ecr::error_chain(e), attempt, "origin request failed, retrying")
                }
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_CAP);
        }
    }
}

/// Where a request stands with auth, across its retries.
#[derive(Default)]
struct AuthState {
    /// The daemon's own credentials (`None` when the puller brought its own,
    /// or none could be had).
    own: Option<Credentials>,
    sent: Sent,
    challenged: bool,
    /// A renewal was asked for (at most one per request).
    refreshed: bool,
    /// `own` was renewed for this request.
    fresh: bool,
    /// Why our own credentials were missing or refused.
    cause: Option<CredentialError>,
}

/// The error for a `401` we give up on: `DENIED` when AWS refused the
/// identity, else `UNAUTHORIZED` with the origin's challenge.
fn refused(
    host: String,
    challenge: Option<HeaderValue>,
    cause: Option<CredentialError>,
) -> OriginError {
    match &cause {
        Some(CredentialError::Ecr(e)) if e.kind == EcrErrorKind::Denied => {
            OriginError::Denied { host, cause }
        }
        _ => OriginError::Unauthorized {
            host,
            challenge,
            cause,
        },
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

/// The base64 part of a puller's `Authorization: Basic ...`.
fn client_basic(h: &HeaderValue) -> Option<&str> {
    let s = h.to_str().ok()?;
    s.strip_prefix("Basic ")
        .or_else(|| s.strip_prefix("basic "))
}

/// Cache identity of a puller's basic credentials: a hash, never the secret.
fn client_identity(basic_b64: &str) -> String {
    format!(
        "client:{}",
        hex::encode(sha2::Sha256::digest(basic_b64.as_bytes()))
    )
}

/// The token cache's name for our own credentials. The password's hash is
/// part of it: a token got with credentials that were since renewed (ECR)
/// is not reused.
fn own_identity(c: &Credentials) -> String {
    let h = hex::encode(sha2::Sha256::digest(c.password.as_bytes()));
    format!("configured:{}:{}", c.username, &h[..16])
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
