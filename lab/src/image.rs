//! Multi-layer OCI images built with `umoci` and pushed with `skopeo`.
//!
//! Each [`LayerSpec`] becomes one layer through `umoci insert` (which
//! creates exactly one new layer per call; the unpack/edit/repack cycle gives
//! the same result with more work). Files get a fixed mtime and the history
//! and config a fixed `created`, so the same [`ImageSpec`] always yields the
//! same digests, and two specs that share a layer share its digest. A 3 MiB
//! image builds in well under a second.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;

use super::blob::{BlobSource, Endpoint, RegistryClient};
use super::random::RandomReader;
use super::util::{self, block_on, run_command, TestDir};

/// The mtime of every file in built layers (2000-01-01T00:00:00Z).
const FIXED_MTIME: i64 = 946_684_800;
const FIXED_CREATED: &str = "2000-01-01T00:00:00Z";
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// One layer of an [`ImageSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LayerSpec {
    /// One file `/data/random-<seed>-<size>.bin` of `size` pseudo-random
    /// (incompressible) bytes from stream `seed`; its gzip layer is a little
    /// larger than `size`. Equal `(size, seed)` give equal layer digests.
    Random {
        /// File size in bytes.
        size: u64,
        /// Stream seed.
        seed: u64,
    },
    /// `/bin/busybox` (the host's static busybox) and `/bin/sh -> busybox`,
    /// about 1 MiB compressed: enough to run the image.
    Busybox,
    /// One file with the given contents at an absolute path inside the image.
    File {
        /// Absolute path in the image, e.g. `/etc/motd`.
        path: String,
        /// The bytes.
        contents: Vec<u8>,
    },
}

/// An image to build: layers bottom-up, and the config's `Cmd`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageSpec {
    /// Layers, bottom first. May be empty (an image with no layers).
    pub layers: Vec<LayerSpec>,
    /// The config's `Cmd`.
    pub cmd: Vec<String>,
}

impl Default for ImageSpec {
    fn default() -> Self {
        ImageSpec {
            layers: Vec::new(),
            cmd: vec!["/bin/sh".to_string()],
        }
    }
}

impl ImageSpec {
    /// An image with these layers and the default `Cmd` (`/bin/sh`).
    pub fn new(layers: Vec<LayerSpec>) -> ImageSpec {
        ImageSpec {
            layers,
            ..Default::default()
        }
    }

    /// Busybox plus two random layers (1 MiB seed 1, 2 MiB seed 2): about
    /// 4 MiB, three layers, builds in a fraction of a second.
    pub fn small() -> ImageSpec {
        ImageSpec::new(vec![
            LayerSpec::Busybox,
            LayerSpec::Random {
                size: 1 << 20,
                seed: 1,
            },
            LayerSpec::Random {
                size: 2 << 20,
                seed: 2,
            },
        ])
    }
}

/// A built image: an OCI image layout in a temp dir, tagged [`OciLayout::tag`].
#[derive(Debug)]
pub struct OciLayout {
    path: PathBuf,
    tag: String,
    spec: ImageSpec,
    // Held for its Drop: the layout lives in it.
    _dir: TestDir,
}

impl OciLayout {
    /// The layout directory (holds `index.json`, `blobs/`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tag the image has in the layout.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The spec it was built from.
    pub fn spec(&self) -> &ImageSpec {
        &self.spec
    }

    /// The skopeo/containers-image reference: `oci:<path>:<tag>`.
    pub fn transport_reference(&self) -> String {
        format!("oci:{}:{}", self.path.display(), self.tag)
    }

    /// The manifest JSON as stored in the layout (skopeo pushes it as is,
    /// but [`PushedImage`] reads what the registry serves).
    pub fn manifest(&self) -> anyhow::Result<serde_json::Value> {
        let index: serde_json::Value = read_json(&self.path.join("index.json"))?;
        let digest = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == self.tag.as_str())
            .and_then(|m| m["digest"].as_str())
            .ok_or_else(|| anyhow!("tag {} not in {}", self.tag, self.path.display()))?;
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| anyhow!("unexpected digest {digest}"))?;
        read_json(&self.path.join("blobs/sha256").join(hex))
    }
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))
}

/// Builds `spec` into a fresh OCI layout (tag `latest`).
pub fn build_image(spec: &ImageSpec) -> anyhow::Result<OciLayout> {
    let dir = TestDir::new("img").context("image temp dir")?;
    let layout = dir.join("oci");
    let tag = "latest".to_string();
    let image = format!("{}:base", layout.display());
    let rootless = !util::is_root();
    umoci(&["init", "--layout", &layout.to_string_lossy()])?;
    umoci(&["new", "--image", &image])?;
    for (index, layer) in spec.layers.iter().enumerate() {
        let src = dir.join(format!("layer{index}"));
        write_layer_source(layer, &src).with_context(|| format!("layer {index} ({layer:?})"))?;
        let created_by = format!("damselfly-lab layer {index}: {}", layer_label(layer));
        let mut args = vec![
            "insert",
            "--image",
            &image,
            "--history.created",
            FIXED_CREATED,
            "--history.created_by",
            &created_by,
        ];
        if rootless {
            args.push("--rootless");
        }
        let src_str = src.to_string_lossy().into_owned();
        args.extend([src_str.as_str(), "/"]);
        umoci(&args)?;
    }
    let mut args: Vec<String> = [
        "config",
        "--image",
        &image,
        "--tag",
        &tag,
        "--created",
        FIXED_CREATED,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--history.created".into(), FIXED_CREATED.into()]);
    for arg in &spec.cmd {
        args.push("--config.cmd".into());
        args.push(arg.clone());
    }
    umoci(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(OciLayout {
        path: layout,
        tag,
        spec: spec.clone(),
        _dir: dir,
    })
}

/// [`build_image`] once per distinct spec per test process; concurrent
/// callers with the same spec wait for one build. The layouts live until the
/// process exits (their temp dirs are removed then).
pub fn build_image_cached(spec: &ImageSpec) -> anyhow::Result<Arc<OciLayout>> {
    type Slot = Arc<Mutex<Option<Arc<OciLayout>>>>;
    static CACHE: OnceLock<Mutex<HashMap<ImageSpec, Slot>>> = OnceLock::new();
    let slot = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(spec.clone())
        .or_default()
        .clone();
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(layout) = slot.as_ref() {
        return Ok(layout.clone());
    }
    let layout = Arc::new(build_image(spec)?);
    *slot = Some(layout.clone());
    Ok(layout)
}

fn layer_label(layer: &LayerSpec) -> String {
    match layer {
        LayerSpec::Random { size, seed } => format!("random size={size} seed={seed}"),
        LayerSpec::Busybox => "busybox".into(),
        LayerSpec::File { path, contents } => format!("file {path} ({} bytes)", contents.len()),
    }
}

fn umoci(args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = util::command("umoci");
    cmd.args(args);
    run_command(cmd, TOOL_TIMEOUT)?.check()?;
    Ok(())
}

fn write_layer_source(layer: &LayerSpec, src: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(src)?;
    match layer {
        LayerSpec::Random { size, seed } => {
            let data = src.join("data");
            std::fs::create_dir_all(&data)?;
            let path = data.join(format!("random-{seed}-{size}.bin"));
            let mut file = std::fs::File::create(&path)?;
            std::io::copy(&mut RandomReader::new(*seed, *size), &mut file)?;
        }
        LayerSpec::Busybox => {
            let busybox = ["/bin/busybox", "/usr/bin/busybox"]
                .into_iter()
                .map(Path::new)
                .find(|p| p.is_file())
                .ok_or_else(|| anyhow!("no static busybox (apt-get install busybox-static)"))?;
            let bin = src.join("bin");
            std::fs::create_dir_all(&bin)?;
            std::fs::copy(busybox, bin.join("busybox"))?;
            std::os::unix::fs::symlink("busybox", bin.join("sh"))?;
        }
        LayerSpec::File { path, contents } => {
            let rel = Path::new(path)
                .strip_prefix("/")
                .map_err(|_| anyhow!("layer file path {path:?} must be absolute"))?;
            if rel.as_os_str().is_empty()
                || rel.components().any(|c| !matches!(c, Component::Normal(_)))
            {
                bail!("layer file path {path:?} must be a plain absolute file path");
            }
            let target = src.join(rel);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&target, contents)?;
        }
    }
    normalize_tree(src)
}

/// Mode 0755 on dirs and a fixed mtime on everything (symlinks included), so
/// layers are reproducible.
fn normalize_tree(root: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut stack = vec![root.to_path_buf()];
    let mut all = Vec::new();
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
        all.push(path);
    }
    for path in all {
        set_mtime_nofollow(&path, FIXED_MTIME)?;
    }
    Ok(())
}

fn set_mtime_nofollow(path: &Path, secs: i64) -> anyhow::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes()).context("path with NUL")?;
    let time = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [time, time];
    // SAFETY: valid NUL-terminated path and a two-element timespec array.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("set mtime of {}", path.display()));
    }
    Ok(())
}

/// An image as pushed to and served by a registry.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// `127.0.0.1:PORT/repo:tag`: what `ctr images pull` takes.
    pub reference: String,
    /// `127.0.0.1:PORT`.
    pub registry: String,
    /// Repository name.
    pub repo: String,
    /// Tag.
    pub tag: String,
    /// Digest of the manifest as served.
    pub manifest_digest: String,
    /// Its media type (skopeo keeps the OCI manifest:
    /// `application/vnd.oci.image.manifest.v1+json`).
    pub manifest_media_type: String,
    /// The manifest bytes.
    pub manifest: Bytes,
    /// Config blob digest.
    pub config_digest: String,
    /// Config blob size.
    pub config_size: u64,
    /// Layer `(digest, size)`, bottom first.
    pub layers: Vec<(String, u64)>,
    /// Config plus layer sizes: the blob bytes a full pull fetches.
    pub total_size: u64,
}

impl PushedImage {
    /// `127.0.0.1:PORT/repo@sha256:...`.
    pub fn digest_reference(&self) -> String {
        format!("{}/{}@{}", self.registry, self.repo, self.manifest_digest)
    }

    /// Config and layer digests (each once): the blobs a pull GETs.
    pub fn blob_digests(&self) -> Vec<String> {
        let mut digests = vec![self.config_digest.clone()];
        for (digest, _) in &self.layers {
            if !digests.contains(digest) {
                digests.push(digest.clone());
            }
        }
        digests
    }
}

/// Pushes `layout` to `endpoint` (a [`super::Registry`], or anything with a
/// `http://host:port` base URL) as `repo:tag` with `skopeo copy
/// --dest-tls-verify=false` (`--dest-creds` when `credentials` are given;
/// skopeo does basic or token auth itself), then reads back what the
/// registry serves. An `https://` endpoint works too (skopeo does not
/// verify it; the read-back trusts the endpoint's [`Endpoint::ca_file`]).
pub fn push_image(
    layout: &OciLayout,
    endpoint: &(impl Endpoint + ?Sized),
    repo: &str,
    tag: &str,
    credentials: Option<(&str, &str)>,
) -> anyhow::Result<PushedImage> {
    let base = endpoint.base_url();
    let host = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("https://"))
        .ok_or_else(|| anyhow!("push_image needs an http(s):// endpoint, got {base}"))?
        .trim_end_matches('/')
        .to_string();
    let reference = format!("{host}/{repo}:{tag}");
    let mut cmd: Command = util::command("skopeo");
    cmd.args([
        "copy",
        "--insecure-policy",
        "--dest-tls-verify=false",
        "--retry-times",
        "2",
    ]);
    if let Some((user, pass)) = credentials {
        cmd.arg("--dest-creds").arg(format!("{user}:{pass}"));
    }
    cmd.arg(layout.transport_reference())
        .arg(format!("docker://{reference}"));
    run_command(cmd, TOOL_TIMEOUT)?.check()?;

    let client = RegistryClient::new(endpoint, credentials)?;
    let manifest = block_on(async { client.fetch_manifest(repo, tag).await })?;
    let json = manifest.json()?;
    let descriptor = |v: &serde_json::Value| -> anyhow::Result<(String, u64)> {
        let digest = v["digest"]
            .as_str()
            .ok_or_else(|| anyhow!("descriptor without digest: {v}"))?;
        let size = v["size"]
            .as_u64()
            .ok_or_else(|| anyhow!("descriptor without size: {v}"))?;
        Ok((digest.to_string(), size))
    };
    let (config_digest, config_size) = descriptor(&json["config"])?;
    let layers = json["layers"]
        .as_array()
        .ok_or_else(|| anyhow!("manifest without layers: {json}"))?
        .iter()
        .map(descriptor)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let total_size = config_size + layers.iter().map(|(_, s)| s).sum::<u64>();
    if let Some(header) = &manifest.header_digest {
        if header != &manifest.digest {
            bail!(
                "registry says manifest {header}, bytes hash to {}",
                manifest.digest
            );
        }
    }
    Ok(PushedImage {
        reference,
        registry: host,
        repo: repo.to_string(),
        tag: tag.to_string(),
        manifest_digest: manifest.digest,
        manifest_media_type: manifest.media_type,
        manifest: manifest.bytes,
        config_digest,
        config_size,
        layers,
        total_size,
    })
}

/// Pushes an image made by hand, without `umoci` or `skopeo`: each layer is
/// a raw blob of `layers[i]` (streamed, never held in memory; e.g.
/// [`BlobSource::random`]) with media type
/// `application/vnd.oci.image.layer.v1.tar`, plus a small config that lists
/// them as its `diff_ids` and an OCI manifest tagged `repo:tag`. Quick for
/// big layers (a 512 MiB layer takes a few seconds), and fine for `ctr
/// content fetch`; the layers are not real tars, so the image cannot be
/// unpacked. Returns what the registry serves, as [`push_image`] does.
pub fn push_raw_image(
    endpoint: &(impl Endpoint + ?Sized),
    repo: &str,
    tag: &str,
    layers: &[BlobSource],
) -> anyhow::Result<PushedImage> {
    use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
    let base = endpoint.base_url();
    let host = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("https://"))
        .ok_or_else(|| anyhow!("push_raw_image needs an http(s):// endpoint, got {base}"))?
        .trim_end_matches('/')
        .to_string();
    let client = RegistryClient::new(endpoint, None)?;
    let manifest = block_on(async {
        let mut pushed = Vec::new();
        for layer in layers {
            pushed.push(client.push_blob(repo, layer).await?);
        }
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "created": FIXED_CREATED,
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": pushed.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
            },
        });
        let config = Bytes::from(serde_json::to_vec(&config)?);
        let (config_digest, config_size) =
            client.push_blob(repo, &BlobSource::Bytes(config)).await?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": pushed.iter().map(|(digest, size)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest,
                "size": size,
            })).collect::<Vec<_>>(),
        });
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
        );
        let response = client
            .send(
                reqwest::Method::PUT,
                &format!("/v2/{repo}/manifests/{tag}"),
                headers,
                Some(Bytes::from(serde_json::to_vec(&manifest)?)),
            )
            .await?;
        let status = response.status();
        if status != reqwest::StatusCode::CREATED {
            bail!(
                "PUT manifest {repo}:{tag}: {status}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        client.fetch_manifest(repo, tag).await
    })?;
    let json = manifest.json()?;
    let descriptor = |v: &serde_json::Value| -> anyhow::Result<(String, u64)> {
        Ok((
            v["digest"]
                .as_str()
                .ok_or_else(|| anyhow!("descriptor without digest: {v}"))?
                .to_string(),
            v["size"]
                .as_u64()
                .ok_or_else(|| anyhow!("descriptor without size: {v}"))?,
        ))
    };
    let (config_digest, config_size) = descriptor(&json["config"])?;
    let layers = json["layers"]
        .as_array()
        .ok_or_else(|| anyhow!("manifest without layers: {json}"))?
        .iter()
        .map(descriptor)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let total_size = config_size + layers.iter().map(|(_, s)| s).sum::<u64>();
    Ok(PushedImage {
        reference: format!("{host}/{repo}:{tag}"),
        registry: host,
        repo: repo.to_string(),
        tag: tag.to_string(),
        manifest_digest: manifest.digest,
        manifest_media_type: manifest.media_type,
        manifest: manifest.bytes,
        config_digest,
        config_size,
        layers,
        total_size,
    })
}
