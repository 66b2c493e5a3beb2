//! A small registry client for tests: raw blob push (streamed, chunked),
//! blob and manifest fetch, streamed verification, with basic and bearer
//! auth handled from the `WWW-Authenticate` challenge.

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context as _};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use sha2::{Digest as _, Sha256};

use super::proxy::FaultProxy;
use super::random::{fill_random, RandomReader};
use super::registry::Registry;
use super::util::block_on;

/// Something with an HTTP base URL that speaks the registry API: a
/// [`Registry`], a [`FaultProxy`] in front of one, or a URL string.
pub trait Endpoint {
    /// `http://host:port`, no trailing slash.
    fn base_url(&self) -> String;

    /// A PEM CA certificate that [`RegistryClient`] trusts for this
    /// endpoint: a TLS [`Registry`]'s own CA ([`Registry::ca_file`]).
    fn ca_file(&self) -> Option<std::path::PathBuf> {
        None
    }
}

impl Endpoint for Registry {
    fn base_url(&self) -> String {
        self.url()
    }

    fn ca_file(&self) -> Option<std::path::PathBuf> {
        Registry::ca_file(self).map(|p| p.to_path_buf())
    }
}

impl Endpoint for FaultProxy {
    fn base_url(&self) -> String {
        self.url()
    }
}

impl Endpoint for str {
    fn base_url(&self) -> String {
        self.trim_end_matches('/').to_string()
    }
}

impl Endpoint for String {
    fn base_url(&self) -> String {
        self.as_str().base_url()
    }
}

/// Blob content for [`push_blob`].
#[derive(Debug, Clone)]
pub enum BlobSource {
    /// These bytes.
    Bytes(Bytes),
    /// The first `len` bytes of [`super::random`] stream `seed`, generated
    /// while streaming (never held in memory).
    Random {
        /// Stream seed.
        seed: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl BlobSource {
    /// `BlobSource::Random { seed, len }`.
    pub fn random(seed: u64, len: u64) -> BlobSource {
        BlobSource::Random { seed, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            BlobSource::Bytes(b) => b.len() as u64,
            BlobSource::Random { len, .. } => *len,
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` with the content at `offset`.
    fn fill(&self, offset: u64, buf: &mut [u8]) {
        match self {
            BlobSource::Bytes(b) => {
                let start = offset as usize;
                buf.copy_from_slice(&b[start..start + buf.len()]);
            }
            BlobSource::Random { seed, .. } => fill_random(*seed, offset, buf),
        }
    }

    /// `len` bytes at `offset` as `Bytes` (a cheap slice for `Bytes`).
    fn chunk(&self, offset: u64, len: usize) -> Bytes {
        match self {
            BlobSource::Bytes(b) => b.slice(offset as usize..offset as usize + len),
            BlobSource::Random { seed, .. } => RandomReader::range(*seed, offset, len as u64)
                .next_chunk(len)
                .unwrap_or_default(),
        }
    }
}

/// A manifest as served by a registry.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// Raw bytes.
    pub bytes: Bytes,
    /// The `Content-Type`.
    pub media_type: String,
    /// `sha256:` of the bytes, computed here.
    pub digest: String,
    /// The `Docker-Content-Digest` header, if any.
    pub header_digest: Option<String>,
}

impl FetchedManifest {
    /// The manifest parsed as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.bytes).context("manifest is not JSON")
    }
}

/// The `Accept` header for manifests: OCI and Docker schema 2, images and
/// indexes.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// Size of each PATCH of a chunked upload.
pub const UPLOAD_CHUNK: u64 = 64 << 20;
/// Size of the pieces a streamed body is produced in.
const PIECE: usize = 1 << 20;

/// A registry API client that answers auth challenges: basic with the given
/// credentials, bearer by fetching a token from the challenge's realm (with
/// the credentials as basic auth, or anonymously).
pub struct RegistryClient {
    base: String,
    credentials: Option<(String, String)>,
    http: reqwest::Client,
    authorization: Mutex<Option<HeaderValue>>,
}

impl RegistryClient {
    /// A client for `endpoint` with optional `(user, pass)`; it also
    /// trusts the endpoint's [`Endpoint::ca_file`], if any.
    pub fn new(
        endpoint: &(impl Endpoint + ?Sized),
        credentials: Option<(&str, &str)>,
    ) -> anyhow::Result<RegistryClient> {
        let mut builder = reqwest::Client::builder().no_proxy();
        if let Some(ca) = endpoint.ca_file() {
            let pem = std::fs::read(&ca).with_context(|| format!("read {}", ca.display()))?;
            builder = builder.add_root_certificate(
                reqwest::Certificate::from_pem(&pem)
                    .with_context(|| format!("{} is not a PEM certificate", ca.display()))?,
            );
        }
        let http = builder.build().context("build HTTP client")?;
        Ok(RegistryClient {
            base: endpoint.base_url(),
            credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
            http,
            authorization: Mutex::new(None),
        })
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The underlying reqwest client (no proxy, default redirects).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The `Authorization` value in use (after a challenge was answered).
    pub fn authorization(&self) -> Option<HeaderValue> {
        self.authorization
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends `method url` (a path is joined to the base URL) with `headers`
    /// and a re-sendable `body`; on 401 answers the challenge and retries
    /// once.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Option<Bytes>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = self.resolve(url)?;
        let attempt = |auth: Option<HeaderValue>| {
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some(auth) = auth {
                request = request.header(header::AUTHORIZATION, auth);
            }
            if let Some(body) = &body {
                request = request.body(body.clone());
            }
            request.send()
        };
        let response = attempt(self.authorization())
            .await
            .with_context(|| format!("{method} {url}"))?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let challenge = response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{method} {url}: 401 without WWW-Authenticate"))?;
        let auth = self.answer_challenge(&challenge).await?;
        *self.authorization.lock().unwrap_or_else(|p| p.into_inner()) = Some(auth.clone());
        attempt(Some(auth))
            .await
            .with_context(|| format!("{method} {url} (authorized)"))
    }

    /// Joins a path (or keeps an absolute URL, e.g. an upload `Location`).
    pub fn resolve(&self, url: &str) -> anyhow::Result<reqwest::Url> {
        let base = reqwest::Url::parse(&format!("{}/", self.base))
            .with_context(|| format!("bad base URL {}", self.base))?;
        base.join(url).with_context(|| format!("bad URL {url}"))
    }

    async fn answer_challenge(&self, challenge: &str) -> anyhow::Result<HeaderValue> {
        let (scheme, params) =
            parse_challenge(challenge).ok_or_else(|| anyhow!("bad challenge {challenge:?}"))?;
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                let (user, pass) = self.credentials.as_ref().ok_or_else(|| {
                    anyhow!("registry wants basic auth and no credentials were given")
                })?;
                HeaderValue::from_str(&basic_auth(user, pass)).context("basic auth header")
            }
            "bearer" => {
                let param = |k: &str| {
                    params
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case(k))
                        .map(|(_, v)| v.as_str())
                };
                let realm = param("realm")
                    .ok_or_else(|| anyhow!("bearer challenge without realm: {challenge}"))?;
                let mut url =
                    reqwest::Url::parse(realm).with_context(|| format!("bad realm {realm}"))?;
                {
                    let mut query = url.query_pairs_mut();
                    if let Some(service) = param("service") {
                        query.append_pair("service", service);
                    }
                    if let Some(scope) = param("scope") {
                        query.append_pair("scope", scope);
                    }
                }
                let mut request = self.http.get(url.clone());
                if let Some((user, pass)) = &self.credentials {
                    request = request.basic_auth(user, Some(pass));
                }
                let response = request.send().await.with_context(|| format!("GET {url}"))?;
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                if !status.is_success() {
                    bail!("token server answered {status}: {text}");
                }
                let json: serde_json::Value =
                    serde_json::from_str(&text).context("token response")?;
                let token = json
                    .get("token")
                    .or_else(|| json.get("access_token"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| anyhow!("token response without token: {text}"))?;
                HeaderValue::from_str(&format!("Bearer {token}")).context("bearer header")
            }
            other => bail!("unsupported auth scheme {other}"),
        }
    }

    /// Pushes a blob: `POST /v2/<repo>/blobs/uploads/`, then one `PATCH` per
    /// [`UPLOAD_CHUNK`] with a streamed body (hashed while generated), then
    /// `PUT ?digest=`. Returns `(digest, size)`; checks the registry's
    /// `Docker-Content-Digest`.
    pub async fn push_blob(
        &self,
        repo: &str,
        source: &BlobSource,
    ) -> anyhow::Result<(String, u64)> {
        let response = self
            .send(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/"),
                HeaderMap::new(),
                None,
            )
            .await?;
        let mut location = expect_location(response, StatusCode::ACCEPTED, "start upload").await?;
        let hasher = Arc::new(Mutex::new(Sha256::new()));
        let len = source.len();
        let mut offset = 0u64;
        while offset < len {
            let n = (len - offset).min(UPLOAD_CHUNK);
            let url = self.resolve(&location)?;
            let body = reqwest::Body::wrap_stream(hashing_stream(
                source.clone(),
                offset,
                n,
                hasher.clone(),
            ));
            let mut request = self
                .http
                .patch(url.clone())
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, n)
                .header(
                    header::CONTENT_RANGE,
                    format!("{}-{}", offset, offset + n - 1),
                )
                .body(body);
            if let Some(auth) = self.authorization() {
                request = request.header(header::AUTHORIZATION, auth);
            }
            let response = request
                .send()
                .await
                .with_context(|| format!("PATCH {url}"))?;
            location = expect_location(response, StatusCode::ACCEPTED, "upload chunk").await?;
            offset += n;
        }
        let digest = {
            let hasher = hasher.lock().unwrap_or_else(|p| p.into_inner()).clone();
            format!("sha256:{}", hex::encode(hasher.finalize()))
        };
        let mut url = self.resolve(&location)?;
        url.query_pairs_mut().append_pair("digest", &digest);
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let response = self
            .send(Method::PUT, url.as_str(), headers, Some(Bytes::new()))
            .await?;
        let status = response.status();
        let header_digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if status != StatusCode::CREATED {
            bail!(
                "finish upload: {status}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        if let Some(d) = header_digest {
            if d != digest {
                bail!("registry stored {d}, lab computed {digest}");
            }
        }
        Ok((digest, len))
    }

    /// `GET /v2/<repo>/blobs/<digest>`, failing unless the answer is 200.
    async fn get_blob_response(
        &self,
        repo: &str,
        digest: &str,
    ) -> anyhow::Result<reqwest::Response> {
        let response = self
            .send(
                Method::GET,
                &format!("/v2/{repo}/blobs/{digest}"),
                HeaderMap::new(),
                None,
            )
            .await?;
        let status = response.status();
        if status != StatusCode::OK {
            bail!(
                "GET blob {digest}: {status}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        Ok(response)
    }

    /// `GET /v2/<repo>/blobs/<digest>` into memory (small blobs only).
    pub async fn get_blob(&self, repo: &str, digest: &str) -> anyhow::Result<Bytes> {
        let response = self.get_blob_response(repo, digest).await?;
        response.bytes().await.context("read blob body")
    }

    /// Streams `GET /v2/<repo>/blobs/<digest>` and checks it byte for byte
    /// and in length against `expected`. The error names the first differing
    /// offset or the length difference. (It does not hash: equal bytes have
    /// the digest [`push_blob`] already checked, and SHA-256 is slow in
    /// debug builds.)
    pub async fn verify_blob(
        &self,
        repo: &str,
        digest: &str,
        expected: &BlobSource,
    ) -> anyhow::Result<()> {
        let response = self.get_blob_response(repo, digest).await?;
        let mut offset = 0u64;
        let mut expected_buf = Vec::new();
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.with_context(|| format!("blob body broke at offset {offset}"))?;
            let end = offset + chunk.len() as u64;
            if end > expected.len() {
                bail!("blob is longer than the expected {} bytes", expected.len());
            }
            expected_buf.resize(chunk.len(), 0);
            expected.fill(offset, &mut expected_buf);
            // Slice equality is a memcmp, fast even unoptimized.
            if chunk[..] != expected_buf[..] {
                let i = chunk
                    .iter()
                    .zip(&expected_buf)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                bail!(
                    "blob differs from the expected content at offset {}",
                    offset + i as u64
                );
            }
            offset = end;
        }
        if offset != expected.len() {
            bail!("blob has {offset} bytes, expected {}", expected.len());
        }
        Ok(())
    }

    /// `GET /v2/<repo>/manifests/<reference>` with [`MANIFEST_ACCEPT`].
    pub async fn fetch_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> anyhow::Result<FetchedManifest> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        let response = self
            .send(
                Method::GET,
                &format!("/v2/{repo}/manifests/{reference}"),
                headers,
                None,
            )
            .await?;
        let status = response.status();
        if status != StatusCode::OK {
            bail!(
                "GET manifest {repo}:{reference}: {status}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        let media_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let header_digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = response.bytes().await.context("read manifest")?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
            header_digest,
        })
    }
}

async fn expect_location(
    response: reqwest::Response,
    want: StatusCode,
    what: &str,
) -> anyhow::Result<String> {
    let status = response.status();
    let location = response
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if status != want {
        bail!(
            "{what}: {status}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    location.ok_or_else(|| anyhow!("{what}: {status} without Location"))
}

fn hashing_stream(
    source: BlobSource,
    offset: u64,
    len: u64,
    hasher: Arc<Mutex<Sha256>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(0u64, move |done| {
        let source = source.clone();
        let hasher = hasher.clone();
        async move {
            if done >= len {
                return None;
            }
            let n = (len - done).min(PIECE as u64) as usize;
            let piece = source.chunk(offset + done, n);
            hasher
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .update(&piece);
            Some((Ok(piece), done + n as u64))
        }
    })
}

/// `Basic base64(user:pass)`.
pub fn basic_auth(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Parses `Scheme k="v", k2=v2` (quoted values may contain commas).
pub fn parse_challenge(value: &str) -> Option<(String, Vec<(String, String)>)> {
    let value = value.trim();
    let (scheme, rest) = match value.split_once(' ') {
        Some((s, r)) => (s, r),
        None => (value, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let mut rest = rest.trim_start();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().trim_start_matches(',').trim().to_string();
        let after = after.trim_start();
        let (val, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut val = String::new();
            let mut end = None;
            let mut chars = quoted.char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    '\\' => val.push(chars.next()?.1),
                    c => val.push(c),
                }
            }
            (val, &quoted[end?..])
        } else {
            match after.split_once(',') {
                Some((v, r)) => (v.trim().to_string(), r),
                None => (after.trim().to_string(), ""),
            }
        };
        params.push((key, val));
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some((scheme.to_string(), params))
}

/// Pushes a blob through the registry API (see [`RegistryClient::push_blob`]).
/// Sync; usable from any test. Returns `(digest, size)`.
pub fn push_blob(
    endpoint: &(impl Endpoint + ?Sized),
    repo: &str,
    source: BlobSource,
    credentials: Option<(&str, &str)>,
) -> anyhow::Result<(String, u64)> {
    let client = RegistryClient::new(endpoint, credentials)?;
    block_on(async { client.push_blob(repo, &source).await })
}

/// A blob of seeded random bytes pushed to a repository.
#[derive(Debug, Clone)]
pub struct RandomBlob {
    pub repo: String,
    pub digest: String,
    pub size: u64,
    /// Its bytes are `random_bytes(seed, 0, size)`.
    pub seed: u64,
}

/// Pushes `size` random bytes from `seed` to `repo`; panics if it fails.
pub fn push_random_blob(
    endpoint: &(impl Endpoint + ?Sized),
    repo: &str,
    seed: u64,
    size: u64,
) -> RandomBlob {
    let (digest, size) =
        push_blob(endpoint, repo, BlobSource::random(seed, size), None).expect("push blob");
    RandomBlob {
        repo: repo.to_owned(),
        digest,
        size,
        seed,
    }
}

/// Async [`push_blob`] for `#[tokio::test]`s.
pub async fn push_blob_async(
    endpoint: &(impl Endpoint + ?Sized),
    repo: &str,
    source: BlobSource,
    credentials: Option<(&str, &str)>,
) -> anyhow::Result<(String, u64)> {
    RegistryClient::new(endpoint, credentials)?
        .push_blob(repo, &source)
        .await
}

/// Fetches a (small) blob into memory.
pub fn get_blob(
    endpoint: &(impl Endpoint + ?Sized),
    repo: &str,
    digest: &str,
    credentials: Option<(&str, &str)>,
) -> anyhow::Result<Bytes> {
    let client = RegistryClient::new(endpoint, credentials)?;
    block_on(async { client.get_blob(repo, digest).await })
}

/// Streams a blob and checks it against `expected` (see
/// [`RegistryClient::verify_blob`]).
pub fn verify_blob(
    endpoint: &(impl Endpoint + ?Sized),
    repo: &str,
    digest: &str,
    expected: &BlobSource,
    credentials: Option<(&str, &str)>,
) -> anyhow::Result<()> {
    let client = RegistryClient::new(endpoint, credentials)?;
    block_on(async { client.verify_blob(repo, digest, expected).await })
}

/// Fetches a manifest (see [`RegistryClient::fetch_manifest`]).
pub fn fetch_manifest(
    endpoint: &(impl Endpoint + ?Sized),
    repo: &str,
    reference: &str,
    credentials: Option<(&str, &str)>,
) -> anyhow::Result<FetchedManifest> {
    let client = RegistryClient::new(endpoint, credentials)?;
    block_on(async { client.fetch_manifest(repo, reference).await })
}

/// GETs `url` and returns (status, `sha256:` of the body, body bytes), or
/// the error that broke the body (with how many bytes came before it).
pub async fn get_hashed(client: &reqwest::Client, url: &str) -> Result<(u16, String, u64), String> {
    let resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let mut hasher = Sha256::new();
    let mut n = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("body broke after {n} bytes: {e}"))?;
        n += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((
        status,
        format!("sha256:{}", hex::encode(hasher.finalize())),
        n,
    ))
}

/// Flips the byte at each of `offsets` in a stored file (chmod first: the
/// store keeps blobs read-only), as disk rot would.
pub fn flip_bytes_at(path: &std::path::Path, offsets: &[u64]) {
    use std::os::unix::fs::{FileExt as _, PermissionsExt as _};
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mode = meta.permissions().mode();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o600)).expect("chmod");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open blob for writing");
    for &offset in offsets {
        let mut byte = [0u8; 1];
        f.read_exact_at(&mut byte, offset)
            .expect("read the byte to flip");
        byte[0] ^= 0xff;
        f.write_all_at(&byte, offset)
            .expect("write the flipped byte");
    }
    f.sync_all().expect("sync");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod back");
}
