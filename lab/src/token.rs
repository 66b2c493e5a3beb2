//! A token server for the registry's `auth.token`, following the Docker
//! token spec: `GET /token?service=..&scope=..` with optional HTTP basic
//! credentials, and the OAuth2 `POST /token` form that containerd tries
//! first when it has credentials (`grant_type=password`).
//!
//! It signs RS256 JWTs with a fresh RSA key whose self-signed certificate
//! (made with the `openssl` CLI) is the registry's `rootcertbundle`; the
//! certificate also travels in each token's `x5c` header, which is how
//! distribution 2.8 finds the signing key.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use base64::Engine as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::registry::{RegistryAuth, TokenAuth};
use super::server::{simple_response, LabBody, ServerThread};
use super::util::TestDir;

/// What [`TokenServer::start_with`] can vary.
#[derive(Debug, Clone)]
pub struct TokenServerOptions {
    /// The one user that may log in.
    pub user: String,
    /// Its password.
    pub pass: String,
    /// Whether requests without credentials get a (pull-only) token; if not
    /// they get 401.
    pub allow_anonymous: bool,
    /// The registry's `service` name (the token audience).
    pub service: String,
    /// The `iss` claim.
    pub issuer: String,
    /// Token lifetime in seconds (`expires_in`).
    pub expires_in: u64,
}

impl Default for TokenServerOptions {
    fn default() -> Self {
        TokenServerOptions {
            user: "lab".into(),
            pass: "lab-pass".into(),
            allow_anonymous: false,
            service: "damselfly-lab-registry".into(),
            issuer: "damselfly-lab-issuer".into(),
            expires_in: 300,
        }
    }
}

/// One request the token server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// The authenticated user; `None` for anonymous or rejected requests.
    pub user: Option<String>,
    /// The requested scopes, as sent (`repository:foo:pull,push`).
    pub scopes: Vec<String>,
    /// The status answered.
    pub status: u16,
}

struct TokenState {
    options: TokenServerOptions,
    key: EncodingKey,
    cert_der_b64: String,
    requests: Mutex<Vec<TokenRequest>>,
}

/// A running token server on 127.0.0.1:<port>; stops on drop.
pub struct TokenServer {
    server: ServerThread,
    state: Arc<TokenState>,
    cert_bundle: PathBuf,
    // Held for its Drop: the key and certificate live in it.
    _dir: TestDir,
}

#[derive(Serialize)]
struct Access {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    actions: Vec<String>,
}

#[derive(Serialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: Vec<Access>,
}

impl TokenServer {
    /// Starts a server for `user`/`pass`, with defaults for the rest.
    pub fn start(user: &str, pass: &str, allow_anonymous: bool) -> anyhow::Result<TokenServer> {
        TokenServer::start_with(TokenServerOptions {
            user: user.into(),
            pass: pass.into(),
            allow_anonymous,
            ..Default::default()
        })
    }

    /// Starts a server with every option.
    pub fn start_with(options: TokenServerOptions) -> anyhow::Result<TokenServer> {
        let dir = TestDir::new("token").context("token server temp dir")?;
        let key_path = dir.join("key.pem");
        let cert_bundle = dir.join("cert.pem");
        let output = super::util::command("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3",
            ])
            .args(["-subj", "/CN=damselfly-lab-token"])
            .arg("-keyout")
            .arg(&key_path)
            .arg("-out")
            .arg(&cert_bundle)
            .output()
            .context("run openssl")?;
        if !output.status.success() {
            bail!(
                "openssl req failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let key_pem = std::fs::read(&key_path).context("read token key")?;
        let key = EncodingKey::from_rsa_pem(&key_pem).context("parse token key")?;
        let cert_der = pem_to_der(&cert_bundle)?;
        let state = Arc::new(TokenState {
            options,
            key,
            cert_der_b64: base64::engine::general_purpose::STANDARD.encode(cert_der),
            requests: Mutex::new(Vec::new()),
        });
        let handler_state = state.clone();
        let server = ServerThread::start("lab-token", 1, move |req| {
            let state = handler_state.clone();
            async move { handle(&state, req).await }
        })
        .context("start token server")?;
        Ok(TokenServer {
            server,
            state,
            cert_bundle,
            _dir: dir,
        })
    }

    /// `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.server.addr())
    }

    /// The service name (token audience).
    pub fn service(&self) -> &str {
        &self.state.options.service
    }

    /// The issuer.
    pub fn issuer(&self) -> &str {
        &self.state.options.issuer
    }

    /// The user and password it accepts.
    pub fn credentials(&self) -> (&str, &str) {
        (&self.state.options.user, &self.state.options.pass)
    }

    /// The PEM certificate bundle a registry must trust.
    pub fn cert_bundle_path(&self) -> &Path {
        &self.cert_bundle
    }

    /// The registry `auth.token` section for this server.
    pub fn token_auth(&self) -> TokenAuth {
        TokenAuth {
            realm: self.realm(),
            service: self.service().to_string(),
            issuer: self.issuer().to_string(),
            cert_bundle: self.cert_bundle.clone(),
        }
    }

    /// `RegistryAuth::Token` for this server.
    pub fn registry_auth(&self) -> RegistryAuth {
        RegistryAuth::token(self)
    }

    /// Number of token requests answered (any outcome).
    pub fn token_requests(&self) -> usize {
        self.lock_requests().len()
    }

    /// Every token request answered, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.lock_requests().clone()
    }

    fn lock_requests(&self) -> std::sync::MutexGuard<'_, Vec<TokenRequest>> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Signs a token for `subject` granting `actions` on `repo`, valid for
    /// `ttl` (tests of expiry can pass a short one).
    pub fn mint(
        &self,
        subject: &str,
        repo: &str,
        actions: &[&str],
        ttl: Duration,
    ) -> anyhow::Result<String> {
        let access = vec![Access {
            kind: "repository".into(),
            name: repo.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }];
        sign(&self.state, subject, access, ttl.as_secs())
    }
}

fn pem_to_der(path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    if body.is_empty() {
        return Err(anyhow!("no certificate in {}", path.display()));
    }
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .context("certificate base64")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sign(
    state: &TokenState,
    subject: &str,
    access: Vec<Access>,
    ttl: u64,
) -> anyhow::Result<String> {
    let now = now_secs();
    let claims = Claims {
        iss: state.options.issuer.clone(),
        sub: subject.to_string(),
        aud: state.options.service.clone(),
        exp: now + ttl,
        nbf: now.saturating_sub(5),
        iat: now,
        jti: hex::encode(rand::random::<[u8; 12]>()),
        access,
    };
    let mut header = Header::new(Algorithm::RS256);
    header.typ = Some("JWT".into());
    header.x5c = Some(vec![state.cert_der_b64.clone()]);
    jsonwebtoken::encode(&header, &claims, &state.key).context("sign token")
}

/// Parses `type:name:actions` (the name may itself contain ':' only when
/// it has a port, e.g. `repository:localhost:5000/foo:pull`).
fn parse_scope(scope: &str) -> Option<Access> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    if kind.is_empty() || name.is_empty() {
        return None;
    }
    Some(Access {
        kind: kind.into(),
        name: name.into(),
        actions: actions
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

async fn handle(state: &TokenState, req: Request<Incoming>) -> Response<LabBody> {
    let method = req.method().clone();
    let basic = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        });
    let mut params: Vec<(String, String)> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    if method == Method::POST {
        match req.into_body().collect().await {
            Ok(body) => params.extend(url::form_urlencoded::parse(&body.to_bytes()).into_owned()),
            Err(_) => return record(state, &method, None, vec![], error(400, "invalid_request")),
        }
    }
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();

    let credentials = if method == Method::POST {
        match param("grant_type").as_deref() {
            Some("password") => param("username").zip(param("password")),
            // Refresh tokens are not issued; 400 makes containerd fall back
            // to GET.
            _ => {
                return record(
                    state,
                    &method,
                    None,
                    scopes,
                    error(400, "unsupported_grant_type"),
                )
            }
        }
    } else {
        basic
    };
    let user = match credentials {
        Some((user, pass)) if user == state.options.user && pass == state.options.pass => {
            Some(user)
        }
        Some(_) => return record(state, &method, None, scopes, unauthorized()),
        None if state.options.allow_anonymous => None,
        None => return record(state, &method, None, scopes, unauthorized()),
    };

    let access: Vec<Access> = scopes
        .iter()
        .filter_map(|s| parse_scope(s))
        .map(|mut a| {
            if user.is_none() {
                a.actions.retain(|action| action == "pull");
            }
            a
        })
        .collect();
    let token = match sign(
        state,
        user.as_deref().unwrap_or(""),
        access,
        state.options.expires_in,
    ) {
        Ok(token) => token,
        Err(e) => return record(state, &method, user, scopes, error(500, &e.to_string())),
    };
    let issued_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": state.options.expires_in,
        "issued_at": issued_at,
    });
    record(
        state,
        &method,
        user,
        scopes,
        simple_response(200, "application/json", body.to_string()),
    )
}

fn record(
    state: &TokenState,
    method: &Method,
    user: Option<String>,
    scopes: Vec<String>,
    response: Response<LabBody>,
) -> Response<LabBody> {
    state
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(TokenRequest {
            method: method.to_string(),
            user,
            scopes,
            status: response.status().as_u16(),
        });
    response
}

fn error(status: u16, code: &str) -> Response<LabBody> {
    let body = serde_json::json!({ "error": code, "details": code });
    simple_response(status, "application/json", body.to_string())
}

fn unauthorized() -> Response<LabBody> {
    let mut response = error(401, "unauthorized");
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"damselfly-lab-token\""),
    );
    response
}
