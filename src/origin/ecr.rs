//! ECR credentials from the node's own AWS identity.
//!
//! containerd often withholds the kubelet's ECR credentials from a mirror
//! (containerd issue #10540), so the daemon gets its own: it resolves AWS
//! credentials through `aws-config`'s default chain (environment, profile,
//! web identity for IRSA, EKS Pod Identity, the EC2 instance role through
//! IMDS), optionally assumes `role_arn`, calls `GetAuthorizationToken` for the
//! account and region of the registry host, and uses the answer as basic
//! credentials (`AWS:<password>`).
//!
//! [`EcrCredentials`] is the per account-and-region cache in front of a
//! [`TokenSource`]:
//!
//! - a token is reused until half of its remaining lifetime has passed
//!   (ECR tokens last 12 h, so about 6 h), then refreshed; while a refresh
//!   fails the old token stays in use;
//! - a token whose `expiresAt` is already past when it arrives (moto answers
//!   2015-01-01) is used until the registry refuses it;
//! - [`EcrCredentials::refresh`] replaces a token the registry refused, at
//!   once, but at most once per [`MIN_REFRESH_INTERVAL`]; a failed fetch is
//!   also remembered for that long. So a broken identity costs one STS/ECR
//!   call and one log line per interval, never a storm.
//!
//! [`AwsTokenSource`] is the real source; [`MemoryTokenSource`] is an
//! in-memory one for tests.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use futures_util::future::BoxFuture;
use prometheus::IntCounterVec;
use tokio::time::Instant;

use crate::config::{Credentials, EcrAuth};

/// Forced refreshes (after a 401) and retries after a failed fetch happen at
/// most this often per account and region.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Used when `GetAuthorizationToken` gives no `expiresAt` (ECR's own value).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Bounds on one `GetAuthorizationToken` call, retries included, so that a
/// pull never hangs on the AWS API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(20);
const MAX_ATTEMPTS: u32 = 3;

/// The ECR host-name grammar lives in config, which picks ECR auth by it.
pub use crate::config::{
    is_aws_account as is_account, parse_ecr_host as parse_host, valid_aws_region as valid_region,
    EcrHost,
};

/// A readable name for an ECR cache key, for logs and errors.
pub fn describe(key: &EcrAuth) -> String {
    match &key.account {
        Some(a) => format!("account {a} in {}", key.region),
        None => format!("region {}", key.region),
    }
}

/// Why no ECR token could be had. Each kind has its own advice in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcrErrorKind {
    /// The default chain found no credentials at all.
    NoCredentials,
    /// AWS rejected the credentials (unknown key, bad signature, expired
    /// session).
    Rejected,
    /// The identity lacks `ecr:GetAuthorizationToken` (or may not assume
    /// `role_arn`).
    Denied,
    /// AWS throttled the call, even after the SDK's own retries.
    Throttled,
    /// The ECR API of that region could not be reached (wrong region, no
    /// route, a bad `ecr_endpoint`).
    Unreachable,
    /// Anything else, such as an answer without a usable token.
    Other,
}

impl EcrErrorKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            EcrErrorKind::NoCredentials => "no_credentials",
            EcrErrorKind::Rejected => "rejected",
            EcrErrorKind::Denied => "denied",
            EcrErrorKind::Throttled => "throttled",
            EcrErrorKind::Unreachable => "unreachable",
            EcrErrorKind::Other => "error",
        }
    }
}

/// A failed `GetAuthorizationToken`, with advice. Its `Display` is the one
/// log line an operator reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct EcrError {
    pub kind: EcrErrorKind,
    /// Which account and region (see [`describe`]).
    pub target: String,
    /// What the SDK said, on one line.
    pub detail: String,
}

impl EcrError {
    pub fn new(kind: EcrErrorKind, key: &EcrAuth, detail: impl fmt::Display) -> EcrError {
        let detail = detail.to_string().replace(['\n', '\r'], " ");
        EcrError {
            kind,
            target: describe(key),
            detail,
        }
    }

    fn render(&self) -> String {
        let (what, advice) = match self.kind {
            EcrErrorKind::NoCredentials => (
                "no AWS credentials found",
                "give the node an IAM role, or use IRSA or EKS Pod Identity (docs/ecr.md)",
            ),
            EcrErrorKind::Rejected => (
                "AWS rejected the node's credentials",
                "check the access key, session token or web identity token",
            ),
            EcrErrorKind::Denied => (
                "AWS denied ecr:GetAuthorizationToken",
                "the role needs ecr:GetAuthorizationToken, ecr:BatchGetImage and \
                 ecr:GetDownloadUrlForLayer (docs/ecr.md)",
            ),
            EcrErrorKind::Throttled => (
                "AWS throttled GetAuthorizationToken",
                "the daemon tries again in 30s at the earliest",
            ),
            EcrErrorKind::Unreachable => (
                "cannot reach the ECR API",
                "check ecr_region, ecr_endpoint and the route to AWS",
            ),
            EcrErrorKind::Other => ("GetAuthorizationToken failed", "see the detail"),
        };
        format!(
            "ECR token for {}: {what}; {advice}: {}",
            self.target, self.detail
        )
    }
}

/// A token as `GetAuthorizationToken` gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcrToken {
    /// `AWS` and the password.
    pub credentials: Credentials,
    pub expires_at: Option<SystemTime>,
}

/// Where ECR tokens come from: the AWS API, or memory in tests.
pub trait TokenSource: Send + Sync + 'static {
    fn fetch<'a>(&'a self, key: &'a EcrAuth) -> BoxFuture<'a, Result<EcrToken, EcrError>>;
}

/// Why a token was fetched (a metric label).
#[derive(Debug, Clone, Copy)]
enum Reason {
    Initial,
    Expiring,
    Unauthorized,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Initial => "initial",
            Reason::Expiring => "expiring",
            Reason::Unauthorized => "unauthorized",
        }
    }
}

struct Cached {
    credentials: Credentials,
    /// When to fetch a new one; `None` when the token came already expired
    /// and is kept until the registry refuses it.
    refresh_at: Option<Instant>,
}

#[derive(Default)]
struct State {
    token: Option<Cached>,
    /// The last forced refresh, for the rate limit.
    last_forced: Option<Instant>,
    /// The last failed fetch; served from memory until the interval passed.
    failure: Option<(EcrError, Instant)>,
}

/// The ECR token of one account and region, cached and refreshed.
pub struct EcrCredentials {
    key: EcrAuth,
    source: Arc<dyn TokenSource>,
    /// Held across a fetch: concurrent requests wait for the one call.
    state: tokio::sync::Mutex<State>,
    fetches: IntCounterVec,
    min_interval: Duration,
}

impl fmt::Debug for EcrCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EcrCredentials")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl EcrCredentials {
    /// `fetches` is `damselfly_ecr_token_fetches_total{reason,result}`.
    pub fn new(key: EcrAuth, source: Arc<dyn TokenSource>, fetches: IntCounterVec) -> Self {
        EcrCredentials {
            key,
            source,
            state: tokio::sync::Mutex::new(State::default()),
            fetches,
            min_interval: MIN_REFRESH_INTERVAL,
        }
    }

    /// Changes [`MIN_REFRESH_INTERVAL`] (tests).
    pub fn with_min_interval(mut self, d: Duration) -> Self {
        self.min_interval = d;
        self
    }

    pub fn key(&self) -> &EcrAuth {
        &self.key
    }

    /// The credentials to use now: the cached token, or a new one.
    pub async fn current(&self) -> Result<Credentials, EcrError> {
        let mut st = self.state.lock().await;
        let now = Instant::now();
        let recent_failure = st
            .failure
            .as_ref()
            .filter(|(_, at)| now < *at + self.min_interval)
            .map(|(e, _)| e.clone());
        match &st.token {
            Some(t) if t.refresh_at.is_none_or(|r| now < r) => Ok(t.credentials.clone()),
            Some(t) => {
                // Due for a refresh, but the old token is still good for a
                // while: keep it if the refresh fails.
                let old = t.credentials.clone();
                if recent_failure.is_some() {
                    return Ok(old);
                }
                Ok(self.fetch(&mut st, Reason::Expiring).await.unwrap_or(old))
            }
            None => match recent_failure {
                Some(e) => Err(e),
                None => self.fetch(&mut st, Reason::Initial).await,
            },
        }
    }

    /// Called after the registry refused `stale`. Returns the token AWS
    /// gives now (which may be `stale` again), or `None` when a refresh is
    /// not allowed yet (at most one per interval), so that the caller gives
    /// up on this request.
    pub async fn refresh(&self, stale: &Credentials) -> Result<Option<Credentials>, EcrError> {
        let mut st = self.state.lock().await;
        if let Some(t) = &st.token {
            if &t.credentials != stale {
                // Another request refreshed it while this one waited.
                return Ok(Some(t.credentials.clone()));
            }
        }
        let now = Instant::now();
        if st
            .last_forced
            .is_some_and(|at| now < at + self.min_interval)
        {
            tracing::debug!(ecr = %describe(&self.key), "token refused again; next refresh allowed later");
            return Ok(None);
        }
        st.last_forced = Some(now);
        self.fetch(&mut st, Reason::Unauthorized).await.map(Some)
    }

    async fn fetch(&self, st: &mut State, reason: Reason) -> Result<Credentials, EcrError> {
        let started = std::time::Instant::now();
        let result = self.source.fetch(&self.key).await;
        let now = Instant::now();
        match result {
            Ok(token) => {
                self.fetches
                    .with_label_values(&[reason.as_str(), "ok"])
                    .inc();
                let remaining = token
                    .expires_at
                    .map(|at| at.duration_since(SystemTime::now()).unwrap_or_default())
                    .unwrap_or(DEFAULT_LIFETIME);
                let refresh_at = (!remaining.is_zero()).then(|| now + remaining / 2);
                tracing::info!(
                    ecr = %describe(&self.key),
                    reason = reason.as_str(),
                    ms = started.elapsed().as_millis() as u64,
                    valid_for_s = remaining.as_secs(),
                    "got an ECR token"
                );
                st.token = Some(Cached {
                    credentials: token.credentials.clone(),
                    refresh_at,
                });
                st.failure = None;
                Ok(token.credentials)
            }
            Err(e) => {
                self.fetches
                    .with_label_values(&[reason.as_str(), e.kind.as_str()])
                    .inc();
                tracing::error!(kind = e.kind.as_str(), reason = reason.as_str(), "{e}");
                st.failure = Some((e.clone(), now));
                Err(e)
            }
        }
    }
}

/// Decodes an ECR `authorizationToken`: base64 of `AWS:<password>`.
pub fn decode_token(token: &str) -> Option<Credentials> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, pass) = text.split_once(':')?;
    (!user.is_empty() && !pass.is_empty()).then(|| Credentials {
        username: user.to_owned(),
        password: pass.to_owned(),
    })
}

/// Tokens from the AWS API through `aws-sdk-ecr`, one client per key,
/// built on first use.
#[derive(Default)]
pub struct AwsTokenSource {
    clients: tokio::sync::Mutex<HashMap<EcrAuth, aws_sdk_ecr::Client>>,
}

impl AwsTokenSource {
    async fn client(&self, key: &EcrAuth) -> aws_sdk_ecr::Client {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(key) {
            return c.clone();
        }
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_timeout(OPERATION_TIMEOUT)
            .build();
        let base = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(key.region.clone()))
            .timeout_config(timeouts)
            .retry_config(
                aws_config::retry::RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS),
            )
            .load()
            .await;
        let mut conf = aws_sdk_ecr::config::Builder::from(&base);
        if let Some(role) = &key.role_arn {
            let provider = aws_config::sts::AssumeRoleProvider::builder(role)
                .session_name("damselfly")
                .configure(&base)
                .build()
                .await;
            conf = conf.credentials_provider(provider);
        }
        if let Some(endpoint) = &key.endpoint {
            conf = conf.endpoint_url(endpoint.as_str().trim_end_matches('/'));
        }
        if key.fips {
            conf = conf.use_fips(true);
        }
        let client = aws_sdk_ecr::Client::from_conf(conf.build());
        clients.insert(key.clone(), client.clone());
        client
    }
}

impl TokenSource for AwsTokenSource {
    fn fetch<'a>(&'a self, key: &'a EcrAuth) -> BoxFuture<'a, Result<EcrToken, EcrError>> {
        Box::pin(async move {
            let client = self.client(key).await;
            let out = client
                .get_authorization_token()
                .send()
                .await
                .map_err(|e| classify(key, &e))?;
            let data = out.authorization_data().first().ok_or_else(|| {
                EcrError::new(
                    EcrErrorKind::Other,
                    key,
                    "the answer has no authorizationData",
                )
            })?;
            let credentials = data
                .authorization_token()
                .and_then(decode_token)
                .ok_or_else(|| {
                    EcrError::new(
                        EcrErrorKind::Other,
                        key,
                        "authorizationToken is not base64 of user:password",
                    )
                })?;
            let expires_at = data
                .expires_at()
                .and_then(|d| SystemTime::try_from(*d).ok());
            Ok(EcrToken {
                credentials,
                expires_at,
            })
        })
    }
}

/// Sorts an SDK error into the kinds an operator acts on.
fn classify<E, R>(key: &EcrAuth, e: &aws_sdk_ecr::error::SdkError<E, R>) -> EcrError
where
    E: aws_sdk_ecr::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug + 'static,
{
    use aws_credential_types::provider::error::CredentialsError;
    use aws_sdk_ecr::error::SdkError;
    let detail = error_chain(e);
    // A credentials failure sits somewhere in the source chain.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(ce) = s.downcast_ref::<CredentialsError>() {
            let kind = match ce {
                CredentialsError::CredentialsNotLoaded(_) => EcrErrorKind::NoCredentials,
                CredentialsError::ProviderTimedOut(_) => EcrErrorKind::NoCredentials,
                // e.g. STS refusing AssumeRole.
                _ if detail.contains("AccessDenied") => EcrErrorKind::Denied,
                _ => EcrErrorKind::Rejected,
            };
            return EcrError::new(kind, key, detail);
        }
        source = s.source();
    }
    let kind = match e {
        SdkError::ServiceError(se) => match se.err().code().unwrap_or_default() {
            "AccessDeniedException" | "AccessDenied" => EcrErrorKind::Denied,
            "ThrottlingException"
            | "ThrottledException"
            | "TooManyRequestsException"
            | "RequestLimitExceeded" => EcrErrorKind::Throttled,
            "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "InvalidSignatureException"
            | "SignatureDoesNotMatch"
            | "ExpiredTokenException"
            | "IncompleteSignature" => EcrErrorKind::Rejected,
            _ => EcrErrorKind::Other,
        },
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => EcrErrorKind::Unreachable,
        _ => EcrErrorKind::Other,
    };
    EcrError::new(kind, key, detail)
}

/// An error and its sources on one line: `a: b: c`, without repeats.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// An in-memory [`TokenSource`] for tests: hands out what it was given and
/// counts the calls.
#[derive(Default)]
pub struct MemoryTokenSource {
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    next: Option<Result<EcrToken, EcrErrorKind>>,
    calls: usize,
}

impl MemoryTokenSource {
    /// Answers every fetch with `password`, valid until `expires_at`.
    pub fn with_token(password: &str, expires_at: Option<SystemTime>) -> Arc<Self> {
        let s = Arc::new(MemoryTokenSource::default());
        s.set_token(password, expires_at);
        s
    }

    pub fn set_token(&self, password: &str, expires_at: Option<SystemTime>) {
        self.lock().next = Some(Ok(EcrToken {
            credentials: Credentials {
                username: "AWS".into(),
                password: password.into(),
            },
            expires_at,
        }));
    }

    pub fn set_error(&self, kind: EcrErrorKind) {
        self.lock().next = Some(Err(kind));
    }

    /// Fetches so far.
    pub fn calls(&self) -> usize {
        self.lock().calls
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TokenSource for MemoryTokenSource {
    fn fetch<'a>(&'a self, key: &'a EcrAuth) -> BoxFuture<'a, Result<EcrToken, EcrError>> {
        let answer = {
            let mut inner = self.lock();
            inner.calls += 1;
            match &inner.next {
                Some(Ok(t)) => Ok(t.clone()),
                Some(Err(kind)) => Err(EcrError::new(*kind, key, "injected by the test")),
                None => Err(EcrError::new(
                    EcrErrorKind::NoCredentials,
                    key,
                    "no token set",
                )),
            }
        };
        Box::pin(async move { answer })
    }
}

#[cfg(test)]
mod tests;
