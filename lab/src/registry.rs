//! A real origin registry: `docker-registry serve` (distribution 2.8) on
//! 127.0.0.1:<free port>, and request counting from its own access log.
//!
//! # What distribution 2.8 logs (checked on this machine)
//!
//! - **stdout** gets one Apache combined-format line per request, for *every*
//!   request, including 401s and 404s:
//!   `127.0.0.1 - - [27/Nov/2026:20:13:26 +0000] "GET /v2/foo/blobs/sha256:94.. HTTP/1.1" 200 20000000 "" "curl/7.88.1"`.
//!   The size is the number of body bytes the handler wrote: the full blob
//!   for a GET, the range length for a 206, 0 for a HEAD that succeeded,
//!   the error body's length (157) for a HEAD 404 (which Go does not send),
//!   and what was written before the client went away for a cut GET.
//! - **stderr** gets logrus lines (`formatter: text`):
//!   `msg="response completed" ... http.request.method=GET http.request.uri=/v2/...
//!   http.response.status=200 http.response.written=20000000`, or
//!   `msg="response completed with error"` at level error for 4xx. Requests
//!   rejected by auth (401) get **no** "response completed" line at all, so
//!   the lab counts from the access log on stdout.
//! - A line is written after the handler returns, i.e. possibly just after
//!   the client has the whole response. [`Registry::sync_log`] closes that
//!   gap with a sentinel request.
//! - With `http.tls` (see [`TlsFiles`]) a failed handshake never reaches the
//!   access log; Go's `http.Server` writes `http: TLS handshake error from
//!   ...` to **stderr** instead.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

use super::token::TokenServer;
use super::util::{self, block_on, log_tail, raw_http_request, ChildGuard, TestDir};

/// Query parameter that marks the lab's own probe and sync requests; lines
/// carrying it are left out of every count.
const LAB_MARKER: &str = "damselfly-lab=";

/// How the registry authenticates clients.
#[derive(Debug, Clone, Default)]
pub enum RegistryAuth {
    /// Anonymous read and write.
    #[default]
    None,
    /// HTTP basic auth with one user (an htpasswd file made with
    /// `htpasswd -Bbn`; distribution needs bcrypt).
    Htpasswd {
        /// User name.
        user: String,
        /// Password.
        pass: String,
    },
    /// Bearer tokens from a [`TokenServer`]; build it with
    /// [`RegistryAuth::token`].
    Token(TokenAuth),
}

/// The `auth.token` section of a registry configuration.
#[derive(Debug, Clone)]
pub struct TokenAuth {
    /// Where clients get tokens (`http://127.0.0.1:PORT/token`).
    pub realm: String,
    /// The `service` (token audience).
    pub service: String,
    /// The `iss` the registry requires.
    pub issuer: String,
    /// PEM file with the certificate that signs tokens; copied into the
    /// registry's own dir at start.
    pub cert_bundle: PathBuf,
}

impl RegistryAuth {
    /// [`RegistryAuth::Htpasswd`] from string slices.
    pub fn htpasswd(user: &str, pass: &str) -> RegistryAuth {
        RegistryAuth::Htpasswd {
            user: user.to_string(),
            pass: pass.to_string(),
        }
    }

    /// Token auth trusting `server`.
    pub fn token(server: &TokenServer) -> RegistryAuth {
        RegistryAuth::Token(server.token_auth())
    }
}

/// Everything [`Registry::start_with`] can vary.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Client authentication.
    pub auth: RegistryAuth,
    /// Pull-through cache mode (`proxy.remoteurl`): the upstream URL, e.g.
    /// another [`Registry::url`].
    pub proxy_remote_url: Option<String>,
    /// Credentials the pull-through cache uses upstream.
    pub proxy_credentials: Option<(String, String)>,
    /// Serve HTTPS (`http.tls`) with these files instead of plain HTTP.
    pub tls: Option<TlsFiles>,
}

/// A private CA and a server certificate it signed, for a registry that
/// serves HTTPS ([`RegistryOptions::tls`]). The registry copies all three
/// files into its own dir at start, so these may be removed afterwards.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate of the CA that signed `cert`: what clients must
    /// trust. The lab's own probes and [`super::RegistryClient`] do.
    pub ca: PathBuf,
    /// PEM server certificate (`http.tls.certificate`).
    pub cert: PathBuf,
    /// Its PEM private key (`http.tls.key`).
    pub key: PathBuf,
}

impl TlsFiles {
    /// Makes a self-signed CA (`CN=damselfly-lab-ca`) and a server
    /// certificate for `127.0.0.1` (SAN `IP:127.0.0.1`, serverAuth) signed by
    /// it, with the `openssl` CLI, into `dir`: `ca.pem`, `server.pem`,
    /// `server-key.pem` (and the CA's key and scratch files). P-256 keys,
    /// valid for 3 days.
    pub fn generate(dir: &Path) -> anyhow::Result<TlsFiles> {
        let ca_key = dir.join("ca-key.pem");
        let ca = dir.join("ca.pem");
        let key = dir.join("server-key.pem");
        let csr = dir.join("server.csr");
        let ext = dir.join("server-ext.cnf");
        let cert = dir.join("server.pem");
        let openssl = |args: &[&str], paths: &[(&str, &Path)]| -> anyhow::Result<()> {
            let mut cmd = util::command("openssl");
            cmd.args(args);
            for (flag, path) in paths {
                cmd.arg(flag).arg(path);
            }
            let output = cmd.output().context("run openssl")?;
            if !output.status.success() {
                bail!(
                    "openssl {} failed: {}",
                    args.first().unwrap_or(&""),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            Ok(())
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let mut args = vec!["req", "-x509", "-nodes", "-sha256", "-days", "3"];
        args.extend(ec);
        args.extend([
            "-subj",
            "/CN=damselfly-lab-ca",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&args, &[("-keyout", &ca_key), ("-out", &ca)])?;
        let mut args = vec!["req", "-new", "-nodes", "-sha256", "-subj", "/CN=127.0.0.1"];
        args.extend(ec);
        openssl(&args, &[("-keyout", &key), ("-out", &csr)])?;
        std::fs::write(
            &ext,
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\n\
             subjectAltName=IP:127.0.0.1\n",
        )
        .context("write server-ext.cnf")?;
        let serial = format!("0x{}", hex::encode(rand::random::<[u8; 8]>()));
        openssl(
            &[
                "x509",
                "-req",
                "-sha256",
                "-days",
                "3",
                "-set_serial",
                &serial,
            ],
            &[
                ("-in", &csr),
                ("-CA", &ca),
                ("-CAkey", &ca_key),
                ("-extfile", &ext),
                ("-out", &cert),
            ],
        )?;
        Ok(TlsFiles { ca, cert, key })
    }
}

/// One request as the registry logged it (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginRequest {
    /// Client address as logged (`127.0.0.1`).
    pub remote: String,
    /// `GET`, `HEAD`, `PUT`, ...
    pub method: String,
    /// The request URI: path and query (`/v2/foo/manifests/v1?ns=...`).
    pub uri: String,
    /// `uri` without the query.
    pub path: String,
    /// Response status.
    pub status: u16,
    /// Body bytes the handler wrote (see the module docs for HEAD).
    pub bytes: u64,
    /// The `User-Agent` header.
    pub user_agent: String,
}

impl OriginRequest {
    /// `/v2/<name>/blobs/<digest>` (not an upload URL).
    pub fn is_blob(&self) -> bool {
        blob_digest(&self.path).is_some()
    }

    /// A GET of a blob by digest: the requests a mirror must not repeat.
    pub fn is_blob_get(&self) -> bool {
        self.method == "GET" && self.is_blob()
    }

    /// `/v2/<name>/manifests/<reference>`.
    pub fn is_manifest(&self) -> bool {
        manifest_reference(&self.path).is_some()
    }

    /// The digest of a blob request.
    pub fn digest(&self) -> Option<&str> {
        blob_digest(&self.path)
    }

    /// The repository name of a blob or manifest request.
    pub fn repo(&self) -> Option<&str> {
        repo_of(&self.path)
    }
}

/// The digest in `/v2/<name>/blobs/<digest>`, `None` for other paths
/// (including `/blobs/uploads/...`).
pub fn blob_digest(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, digest) = rest.rsplit_once("/blobs/")?;
    (!name.is_empty() && !digest.contains('/') && digest.contains(':')).then_some(digest)
}

/// The reference in `/v2/<name>/manifests/<reference>`.
pub fn manifest_reference(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, reference) = rest.rsplit_once("/manifests/")?;
    (!name.is_empty() && !reference.is_empty() && !reference.contains('/')).then_some(reference)
}

fn repo_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    rest.rsplit_once("/blobs/")
        .or_else(|| rest.rsplit_once("/manifests/"))
        .or_else(|| rest.rsplit_once("/tags/"))
        .map(|(name, _)| name)
}

/// Parses one access-log line of distribution 2.8 (Apache combined format,
/// written by gorilla/handlers). `None` for anything else, never panics.
pub fn parse_access_log_line(line: &str) -> Option<OriginRequest> {
    let (prefix, rest) = line.split_once("] \"")?;
    let remote = prefix.split_whitespace().next()?.to_string();
    let (request_line, rest) = split_quoted(rest)?;
    let mut parts = request_line.split(' ');
    let method = parts.next().filter(|m| !m.is_empty())?.to_string();
    let uri = parts.next()?.to_string();
    let _protocol = parts.next()?;
    let mut fields = rest.trim_start().splitn(3, ' ');
    let status = fields.next()?.parse::<u16>().ok()?;
    let bytes = fields.next()?.parse::<u64>().unwrap_or(0);
    let rest = fields.next().unwrap_or("").trim_start();
    let user_agent = rest
        .strip_prefix('"')
        .and_then(split_quoted)
        .and_then(|(_referer, rest)| rest.trim_start().strip_prefix('"').and_then(split_quoted))
        .map(|(ua, _)| ua)
        .unwrap_or_default();
    let path = uri.split('?').next().unwrap_or_default().to_string();
    Some(OriginRequest {
        remote,
        method,
        uri,
        path,
        status,
        bytes,
        user_agent,
    })
}

/// Splits `content" rest` at the first unescaped quote, unescaping `\"` and
/// `\\`. The opening quote must already be stripped.
fn split_quoted(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => out.push(chars.next()?.1),
            c => out.push(c),
        }
    }
    None
}

/// A running `docker-registry`; killed on drop, storage removed with it.
pub struct Registry {
    child: Mutex<Option<ChildGuard>>,
    port: u16,
    options: RegistryOptions,
    config_path: PathBuf,
    access_log: PathBuf,
    error_log: PathBuf,
    storage: PathBuf,
    /// The CA the lab's probes trust, when the registry serves HTTPS.
    tls_ca: Option<PathBuf>,
    sync_counter: AtomicU64,
    // Last: removed after the child is killed.
    dir: TestDir,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("url", &self.url())
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Registry {
    /// Starts a registry with `auth` and waits until `GET /v2/` answers.
    pub fn start(auth: RegistryAuth) -> anyhow::Result<Registry> {
        Registry::start_with(RegistryOptions {
            auth,
            ..Default::default()
        })
    }

    /// Starts a pull-through cache of `remote_url` (no client auth), the
    /// "central cache" baseline.
    pub fn start_proxy(
        remote_url: &str,
        credentials: Option<(&str, &str)>,
    ) -> anyhow::Result<Registry> {
        Registry::start_with(RegistryOptions {
            auth: RegistryAuth::None,
            proxy_remote_url: Some(remote_url.to_string()),
            proxy_credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
            tls: None,
        })
    }

    /// Starts a registry with every option. Retries with another port when
    /// the chosen one was taken in the meantime.
    pub fn start_with(options: RegistryOptions) -> anyhow::Result<Registry> {
        let dir = TestDir::new("reg").context("registry temp dir")?;
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).context("registry storage dir")?;
        let auth_yaml = auth_section(&options.auth, &dir)?;
        let proxy_yaml = match &options.proxy_remote_url {
            None => String::new(),
            Some(url) => {
                let mut s = format!("proxy:\n  remoteurl: {}\n", yaml_str(url));
                if let Some((user, pass)) = &options.proxy_credentials {
                    s += &format!(
                        "  username: {}\n  password: {}\n",
                        yaml_str(user),
                        yaml_str(pass)
                    );
                }
                s
            }
        };
        let (tls_yaml, tls_ca) = match &options.tls {
            None => (String::new(), None),
            Some(tls) => {
                let copy = |from: &Path, name: &str| -> anyhow::Result<PathBuf> {
                    let to = dir.join(name);
                    std::fs::copy(from, &to).with_context(|| format!("copy {}", from.display()))?;
                    Ok(to)
                };
                let ca = copy(&tls.ca, "tls-ca.pem")?;
                let cert = copy(&tls.cert, "tls-cert.pem")?;
                let key = copy(&tls.key, "tls-key.pem")?;
                let yaml = format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    yaml_str(&cert.to_string_lossy()),
                    yaml_str(&key.to_string_lossy())
                );
                (yaml, Some(ca))
            }
        };
        let secret = hex::encode(rand::random::<[u8; 16]>());
        let mut registry = Registry {
            child: Mutex::new(None),
            port: 0,
            options,
            config_path: dir.join("config.yml"),
            access_log: dir.join("access.log"),
            error_log: dir.join("registry.log"),
            storage: storage.clone(),
            tls_ca,
            sync_counter: AtomicU64::new(0),
            dir,
        };
        let mut last_error = None;
        for _attempt in 0..5 {
            let port = util::free_port().context("free port")?;
            let config = format!(
                "version: 0.1\n\
                 log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: {secret}\n{tls_yaml}\
                 {auth_yaml}{proxy_yaml}",
                storage = yaml_str(&storage.to_string_lossy()),
            );
            std::fs::write(&registry.config_path, config).context("write registry config")?;
            registry.port = port;
            match registry.spawn_and_wait() {
                Ok(()) => return Ok(registry),
                Err(SpawnError::PortInUse) => {
                    last_error = Some(anyhow!("port {port} was taken"));
                    continue;
                }
                Err(SpawnError::Other(e)) => return Err(e),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context("registry could not bind a port in 5 attempts"))
    }

    fn spawn_and_wait(&self) -> Result<(), SpawnError> {
        let open = |path: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("open {}", path.display()))
        };
        let mut cmd = util::command("docker-registry");
        cmd.arg("serve")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(open(&self.access_log)?)
            .stderr(open(&self.error_log)?);
        // Only this run's part of the (appended) log counts.
        let log_start = std::fs::metadata(&self.error_log)
            .map(|m| m.len())
            .unwrap_or(0);
        let this_run_log = || {
            let bytes = std::fs::read(&self.error_log).unwrap_or_default();
            let start = (log_start as usize).min(bytes.len());
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        };
        // Logged right after the listener is bound: an answer on the port
        // before this line may come from another process that took it.
        let bound_line = format!("listening on 127.0.0.1:{}", self.port);
        let mut child = ChildGuard::spawn(cmd, "docker-registry")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = this_run_log();
            if log.contains(&bound_line) {
                if let Ok(status) =
                    self.probe(&format!("/v2/?{LAB_MARKER}probe"), Duration::from_secs(2))
                {
                    if status == 200 || status == 401 {
                        break;
                    }
                }
            }
            if let Some(status) = child.try_wait().context("wait for docker-registry")? {
                if this_run_log().contains("address already in use") {
                    return Err(SpawnError::PortInUse);
                }
                return Err(anyhow!(
                    "docker-registry exited ({status}) before serving\n{}",
                    log_tail(&self.error_log, 30)
                )
                .into());
            }
            if Instant::now() > deadline {
                return Err(anyhow!(
                    "docker-registry did not answer GET /v2/ within 20 s\n{}",
                    log_tail(&self.error_log, 30)
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        Ok(())
    }

    /// `127.0.0.1:PORT`: the registry name in image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`, or `https://127.0.0.1:PORT` when it serves
    /// TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.host())
    }

    /// The CA certificate (PEM) that clients must trust, when the registry
    /// serves HTTPS ([`RegistryOptions::tls`]); a copy in the registry's dir.
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls_ca.as_deref()
    }

    /// One lab GET of `path_and_query` (a marked probe or sync request):
    /// [`raw_http_request`] for a plain registry, HTTPS trusting only
    /// [`Registry::ca_file`] for a TLS one. Returns the status.
    fn probe(&self, path_and_query: &str, timeout: Duration) -> anyhow::Result<u16> {
        let Some(ca) = &self.tls_ca else {
            let (status, _) = raw_http_request(&self.host(), "GET", path_and_query, timeout)?;
            return Ok(status);
        };
        let pem = std::fs::read(ca).with_context(|| format!("read {}", ca.display()))?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
            .timeout(timeout)
            .user_agent("damselfly-lab")
            .build()?;
        let url = format!("{}{path_and_query}", self.url());
        block_on(async { Ok(client.get(url).send().await?.status().as_u16()) })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The htpasswd user and password, when the registry uses htpasswd auth.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        match &self.options.auth {
            RegistryAuth::Htpasswd { user, pass } => Some((user.as_str(), pass.as_str())),
            _ => None,
        }
    }

    /// The options it was started with.
    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// The storage root (`storage.filesystem.rootdirectory`).
    pub fn storage_dir(&self) -> &Path {
        &self.storage
    }

    /// The access log (stdout): one line per request.
    pub fn access_log_path(&self) -> &Path {
        &self.access_log
    }

    /// The logrus log (stderr).
    pub fn log_path(&self) -> &Path {
        &self.error_log
    }

    /// The last `lines` lines of both logs, for assertion messages.
    pub fn log_tail(&self, lines: usize) -> String {
        format!(
            "{}\n{}",
            log_tail(&self.access_log, lines),
            log_tail(&self.error_log, lines)
        )
    }

    /// Kills the registry (connections are refused until [`Registry::restart`]).
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            child.kill();
        }
    }

    /// Starts it again on the same port with the same storage.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.stop();
        self.spawn_and_wait().map_err(|e| match e {
            SpawnError::PortInUse => {
                anyhow!("port {} was taken while the registry was down", self.port)
            }
            SpawnError::Other(e) => e,
        })
    }

    /// Gives the htpasswd user `user` the password `pass` and restarts the
    /// registry on the same port and storage (distribution 2.8 reads the
    /// file at start only), like a registry whose credentials were rotated.
    /// [`Registry::credentials`] still reports the original password.
    pub fn set_htpasswd(&self, user: &str, pass: &str) -> anyhow::Result<()> {
        if !matches!(self.options.auth, RegistryAuth::Htpasswd { .. }) {
            bail!("set_htpasswd needs a registry started with htpasswd auth");
        }
        // Rewrites the same `<dir>/htpasswd` file that the config names.
        auth_section(&RegistryAuth::htpasswd(user, pass), &self.dir)?;
        self.restart()
    }

    /// Freezes the process (SIGSTOP, and waits until every thread is
    /// stopped): connections are accepted by the kernel but never answered,
    /// like a hung origin. Undo with [`Registry::resume`].
    pub fn pause(&self) -> anyhow::Result<()> {
        let guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let child = guard
            .as_ref()
            .ok_or_else(|| anyhow!("registry is stopped"))?;
        child.stop_process().context("pause docker-registry")
    }

    /// Resumes a paused registry (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        let guard = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let child = guard
            .as_ref()
            .ok_or_else(|| anyhow!("registry is stopped"))?;
        child.continue_process().context("resume docker-registry")
    }

    /// Waits until every request that completed before this call is in the
    /// access log: sends a marked sentinel request and waits for its line,
    /// which the registry writes after the earlier ones (a few ms; bounded to
    /// 5 s). If the registry is down or paused it instead waits for the log
    /// to stop growing for 100 ms (same bound).
    pub fn sync_log(&self) {
        let n = self.sync_counter.fetch_add(1, Ordering::Relaxed);
        let marker = format!("/v2/?{LAB_MARKER}sync-{}-{n}", std::process::id());
        let deadline = Instant::now() + Duration::from_secs(2);
        let sent = self.probe(&marker, Duration::from_millis(500)).is_ok();
        if sent {
            while Instant::now() < deadline {
                let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
                if text.contains(&marker) {
                    // Lines of requests that finished just before are written
                    // by their own goroutines; give a straggler a moment.
                    std::thread::sleep(Duration::from_millis(10));
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Fallback: wait for two equal sizes 100 ms apart.
        let mut last = u64::MAX;
        while Instant::now() < deadline {
            let size = std::fs::metadata(&self.access_log)
                .map(|m| m.len())
                .unwrap_or(0);
            if size == last {
                return;
            }
            last = size;
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every request so far, in log order, without the lab's own probes;
    /// calls [`Registry::sync_log`] first. Unparseable lines are skipped.
    pub fn requests(&self) -> Vec<OriginRequest> {
        self.sync_log();
        self.requests_unsynced()
    }

    /// [`Registry::requests`] without waiting for the log to catch up.
    pub fn requests_unsynced(&self) -> Vec<OriginRequest> {
        let bytes = std::fs::read(&self.access_log).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        // Only complete lines: the last one may be half written.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => "",
        };
        complete
            .lines()
            .filter_map(parse_access_log_line)
            .filter(|r| !r.uri.contains(LAB_MARKER))
            .collect()
    }

    /// A position in the request list; pass it to the `*_since` methods to
    /// count only what happened after this call.
    pub fn mark(&self) -> usize {
        self.requests().len()
    }

    /// Requests after `mark` (see [`Registry::mark`]).
    pub fn requests_since(&self, mark: usize) -> Vec<OriginRequest> {
        self.requests().into_iter().skip(mark).collect()
    }

    /// Number of `GET /v2/*/blobs/<digest>` requests so far (any status).
    pub fn blob_gets(&self) -> usize {
        self.blob_gets_since(0)
    }

    /// Number of blob GETs after `mark`.
    pub fn blob_gets_since(&self, mark: usize) -> usize {
        self.requests_since(mark)
            .iter()
            .filter(|r| r.is_blob_get())
            .count()
    }

    /// Number of blob GETs of `digest` after `mark`.
    pub fn blob_gets_of(&self, digest: &str, mark: usize) -> usize {
        self.requests_since(mark)
            .iter()
            .filter(|r| r.is_blob_get() && r.digest() == Some(digest))
            .count()
    }

    /// Requests for repository `repo` after `mark`: what to count when
    /// other tests share the registry (give each test its own repo).
    pub fn requests_in_repo(&self, repo: &str, mark: usize) -> Vec<OriginRequest> {
        self.requests_since(mark)
            .into_iter()
            .filter(|r| r.repo() == Some(repo))
            .collect()
    }

    /// Body bytes written for successful GETs of blob `digest` after `mark`.
    pub fn blob_bytes_sent_of(&self, digest: &str, mark: usize) -> u64 {
        self.requests_since(mark)
            .iter()
            .filter(|r| {
                r.is_blob_get() && r.digest() == Some(digest) && (200..300).contains(&r.status)
            })
            .map(|r| r.bytes)
            .sum()
    }

    /// Body bytes written for successful blob GETs so far.
    pub fn blob_bytes_sent(&self) -> u64 {
        self.blob_bytes_sent_since(0)
    }

    /// Body bytes written for successful (2xx) blob GETs after `mark`
    /// (error bodies of 404s and the like do not count).
    pub fn blob_bytes_sent_since(&self, mark: usize) -> u64 {
        self.requests_since(mark)
            .iter()
            .filter(|r| r.is_blob_get() && (200..300).contains(&r.status))
            .map(|r| r.bytes)
            .sum()
    }

    /// Body bytes written for successful (2xx: whole blobs and ranges) blob
    /// GETs in repository `repo` after `mark`: what the origin gave out for
    /// one test's images when other tests share the registry.
    pub fn blob_bytes_sent_in_repo_since(&self, repo: &str, mark: usize) -> u64 {
        self.requests_in_repo(repo, mark)
            .iter()
            .filter(|r| r.is_blob_get() && (200..300).contains(&r.status))
            .map(|r| r.bytes)
            .sum()
    }

    /// Whether the registry's storage holds blob `digest` (a committed
    /// `.../blobs/sha256/<ab>/<hex>/data` file). A pull-through cache stores
    /// a missed blob in the background, so tests can wait on this.
    pub fn has_blob(&self, digest: &str) -> bool {
        let Some(hex) = digest.strip_prefix("sha256:") else {
            return false;
        };
        if hex.len() < 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return false;
        }
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
            .is_file()
    }

    /// Number of manifest requests (GET or HEAD) after `mark`.
    pub fn manifest_requests_since(&self, mark: usize) -> usize {
        self.requests_since(mark)
            .iter()
            .filter(|r| r.is_manifest())
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

enum SpawnError {
    PortInUse,
    Other(anyhow::Error),
}

impl From<anyhow::Error> for SpawnError {
    fn from(e: anyhow::Error) -> Self {
        SpawnError::Other(e)
    }
}

/// A YAML double-quoted scalar (JSON strings are valid YAML).
fn yaml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn auth_section(auth: &RegistryAuth, dir: &TestDir) -> anyhow::Result<String> {
    Ok(match auth {
        RegistryAuth::None => String::new(),
        RegistryAuth::Htpasswd { user, pass } => {
            if user.is_empty() || user.contains(':') {
                bail!("htpasswd user {user:?} must be non-empty and contain no ':'");
            }
            let output = util::command("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .context("run htpasswd (apache2-utils)")?;
            if !output.status.success() {
                bail!(
                    "htpasswd failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let line = String::from_utf8_lossy(&output.stdout).trim().to_string();
            let path = dir.join("htpasswd");
            std::fs::write(&path, format!("{line}\n")).context("write htpasswd")?;
            format!(
                "auth:\n  htpasswd:\n    realm: damselfly-lab\n    path: {}\n",
                yaml_str(&path.to_string_lossy())
            )
        }
        RegistryAuth::Token(token) => {
            let bundle = dir.join("token-ca.pem");
            std::fs::copy(&token.cert_bundle, &bundle)
                .with_context(|| format!("copy {}", token.cert_bundle.display()))?;
            format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                yaml_str(&token.realm),
                yaml_str(&token.service),
                yaml_str(&token.issuer),
                yaml_str(&bundle.to_string_lossy())
            )
        }
    })
}
