//! Auth with an origin: the puller's own header, the daemon's credentials
//! (static or ECR, renewed once when refused), `WWW-Authenticate`
//! challenges answered with a bearer token (cached per registry, scope and
//! identity) or basic credentials.

use super::*;

impl Origin {
    /// The next `Authorization` to try after a `401` to a request that
    /// carried `sent`, or `None` to give up. Our own credentials, when
    /// refused, are renewed once (ECR tokens; at a bounded rate); a challenge
    /// is answered once.
    pub(super) async fn after_unauthorized(
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
    pub(super) async fn answer_challenge(
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
    pub(super) fn fresh_token_refused(
        &self,
        up: &Upstream,
        st: &mut AuthState,
    ) -> Option<HeaderValue> {
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

    pub(super) async fn fetch_token(
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

    pub(super) fn cached_token(
        &self,
        host: &str,
        scope: &str,
        creds: Option<&Credentials>,
    ) -> Option<HeaderValue> {
        let identity = creds.map_or("anonymous".to_owned(), own_identity);
        self.token_for(host, scope, &identity)
    }

    /// A live cached token for (host, scope, identity).
    pub(super) fn token_for(&self, host: &str, scope: &str, identity: &str) -> Option<HeaderValue> {
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

    pub(super) fn lock_tokens(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<TokenKey, (String, Instant)>> {
        self.inner.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn lock_basic(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.inner
            .basic_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// Where a request stands with auth, across its retries.
#[derive(Default)]
pub(super) struct AuthState {
    /// The daemon's own credentials (`None` when the puller brought its own,
    /// or none could be had).
    pub(super) own: Option<Credentials>,
    pub(super) sent: Sent,
    pub(super) challenged: bool,
    /// A renewal was asked for (at most one per request).
    pub(super) refreshed: bool,
    /// `own` was renewed for this request.
    pub(super) fresh: bool,
    /// Why our own credentials were missing or refused.
    pub(super) cause: Option<CredentialError>,
}

/// The error for a `401` we give up on: `DENIED` when AWS refused the
/// identity, else `UNAUTHORIZED` with the origin's challenge.
pub(super) fn refused(
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

/// The base64 part of a puller's `Authorization: Basic ...`.
pub(super) fn client_basic(h: &HeaderValue) -> Option<&str> {
    let s = h.to_str().ok()?;
    s.strip_prefix("Basic ")
        .or_else(|| s.strip_prefix("basic "))
}

/// Cache identity of a puller's basic credentials: a hash, never the secret.
pub(super) fn client_identity(basic_b64: &str) -> String {
    format!(
        "client:{}",
        hex::encode(sha2::Sha256::digest(basic_b64.as_bytes()))
    )
}

/// The token cache's name for our own credentials. The password's hash is
/// part of it: a token got with credentials that were since renewed (ECR)
/// is not reused.
pub(super) fn own_identity(c: &Credentials) -> String {
    let h = hex::encode(sha2::Sha256::digest(c.password.as_bytes()));
    format!("configured:{}:{}", c.username, &h[..16])
}

pub(super) fn basic_header(c: &Credentials) -> HeaderValue {
    let raw =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
    let mut h = HeaderValue::from_str(&format!("Basic {raw}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    h.set_sensitive(true);
    h
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
