//! The fuzz targets' bodies: one function per parser that takes outside
//! input, each asserting what holds for every input (no panic; what parses
//! prints and parses back to the same value; a parsed range lies inside the
//! blob).
//!
//! `fuzz/` (cargo fuzz, nightly) hands libFuzzer's inputs to these, and
//! `tests/fuzz_corpus.rs` replays every file of `fuzz/corpus/<target>/`
//! through the same functions on stable, so `cargo test` checks each input
//! that was ever kept, crashes included. They live in the library because
//! several parsers are crate-private; nothing else calls them.

use std::path::Path;
use std::str::from_utf8;

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::http::{ByteRange, RangeSpec};
use crate::oci::{self, Digest, ImageRef, Platform, RawManifest};
use crate::registry::{self, Route};

/// A target's body: any bytes in, a panic when a property fails.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/<name>.rs` and
/// `fuzz/corpus/<name>/` call it.
pub const TARGETS: &[(&str, Target)] = &[
    ("ranges", ranges),
    ("oci_names", oci_names),
    ("registry_route", registry_route),
    ("challenge", challenge),
    ("manifest", manifest),
    ("swarm_messages", swarm_messages),
    ("request_head", request_head),
    ("hosts_toml", hosts_toml),
    ("containerd_config", containerd_config),
    ("daemon_config", daemon_config),
];

/// Blob sizes a `Range` header is resolved against when the input names none.
const SIZES: &[u64] = &[0, 1, 20, 4 << 20, u64::MAX];

/// `Range` (mirror and data plane), `Content-Range` and the data plane's
/// chunk sums header. An input `<size>\n<value>` resolves the range against
/// `size`; any other input against each of [`SIZES`].
pub fn ranges(data: &[u8]) {
    let (size, value) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => match from_utf8(&data[..i]).ok().and_then(|s| s.parse().ok()) {
            Some(size) => (Some(size), &data[i + 1..]),
            None => (None, data),
        },
        None => (None, data),
    };
    if let Ok(v) = HeaderValue::from_bytes(value) {
        let sizes = match &size {
            Some(s) => std::slice::from_ref(s),
            None => SIZES,
        };
        for &size in sizes {
            check_range(&v, size);
        }
        if let Some((a, b)) = piece_range(Some(&v)) {
            assert!(a <= b, "piece range {a}-{b} from {v:?}");
        }
    }
    let Ok(s) = from_utf8(value) else { return };
    if let Some(r) = crate::http::parse_content_range(s) {
        assert!(r.first <= r.last && r.last < r.size, "Content-Range {s:?}");
        let printed = r.to_string();
        assert_eq!(
            crate::http::parse_content_range(&printed),
            Some(r),
            "{s:?} printed as {printed:?}"
        );
    }
    if let Some(sums) = crate::swarm::data::parse_sums(s) {
        let printed: Vec<String> = sums.iter().map(|x| format!("{x:016x}")).collect();
        assert_eq!(
            crate::swarm::data::parse_sums(&printed.join(",")),
            Some(sums),
            "sums {s:?}"
        );
    }
}

/// The data plane's reading of a peer's `Range`: `bytes=<a>-<b>`, both
/// given (swarm::data's handler).
fn piece_range(v: Option<&HeaderValue>) -> Option<(u64, u64)> {
    crate::http::parse_range(v?.to_str().ok()?)
        .ok()
        .and_then(ByteRange::bounded)
}

fn check_range(v: &HeaderValue, size: u64) {
    match crate::http::range_spec(v.to_str().ok(), size) {
        RangeSpec::Partial { start, end } => {
            assert!(
                start < end && end <= size,
                "{v:?} for {size} bytes gave {start}..{end}"
            );
            assert!(
                start > 0 || end < size,
                "{v:?}: a whole-blob range must be Full"
            );
            // As the mirror would ask a peer or the origin for it, and as
            // its Content-Range would say.
            let asked = HeaderValue::from_str(&format!("bytes={start}-{}", end - 1))
                .expect("digits are a valid header value");
            assert_eq!(
                crate::http::range_spec(asked.to_str().ok(), size),
                RangeSpec::Partial { start, end },
                "{v:?} printed as {asked:?}"
            );
            let answer = format!("bytes {start}-{}/{size}", end - 1);
            assert_eq!(
                crate::http::parse_content_range(&answer).map(|r| (r.first, r.last, r.size)),
                Some((start, end - 1, size)),
                "{answer:?}"
            );
        }
        RangeSpec::Unsatisfiable | RangeSpec::Full => {}
    }
}

/// Digests, image references, repository names, tags and platforms.
pub fn oci_names(data: &[u8]) {
    let Ok(s) = from_utf8(data) else { return };
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s, "a digest prints as it was written");
    }
    if let Ok(d) = Digest::from_hex(s) {
        assert_eq!(d.hex(), s);
    }
    if oci::validate_tag(s).is_ok() {
        assert!(!s.is_empty() && s.len() <= 128, "tag {s:?}");
    }
    if oci::validate_repository(s).is_ok() {
        assert!(
            !s.split('/').any(|c| c.is_empty() || c == "." || c == ".."),
            "repository {s:?} could leave its directory"
        );
    }
    if let Ok(r) = ImageRef::parse(s) {
        let printed = r.to_string();
        assert_eq!(
            ImageRef::parse(&printed),
            Ok(r.clone()),
            "{s:?} printed as {printed:?}"
        );
        oci::valid_host(&r.registry).expect("a parsed reference's registry is valid");
        oci::validate_repository(&r.repository).expect("a parsed reference's repository is valid");
        let pull = r.pull_reference();
        assert!(
            ImageRef::parse(&pull).is_ok(),
            "pull reference {pull:?} of {s:?}"
        );
    }
    if let Ok(p) = s.parse::<Platform>() {
        assert_eq!(p.to_string(), s, "a platform prints as it was written");
    }
}

/// The mirror's routes and containerd's `?ns=`: `<path>[?<query>]`.
pub fn registry_route(data: &[u8]) {
    let Ok(s) = from_utf8(data) else { return };
    let (path, query) = match s.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (s, None),
    };
    let Ok(route) = registry::parse_route(path, query) else {
        return;
    };
    let (ns, printed) = match &route {
        Route::Base => return,
        Route::Manifest {
            ns,
            name,
            reference,
        } => (ns, format!("/v2/{name}/manifests/{reference}")),
        Route::Blob { ns, name, digest } => (ns, format!("/v2/{name}/blobs/{digest}")),
    };
    if let Some(ns) = ns {
        oci::valid_host(ns).expect("a parsed ns is a valid host");
    }
    let query = ns.as_ref().map(|ns| {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("ns", ns)
            .finish()
    });
    match registry::parse_route(&printed, query.as_deref()) {
        Ok(again) => assert_eq!(again, route, "{s:?} printed as {printed:?} {query:?}"),
        Err(e) => panic!(
            "{s:?} printed as {printed:?} {query:?} fails: {}",
            e.message
        ),
    }
}

/// The origin's `WWW-Authenticate` challenge.
pub fn challenge(data: &[u8]) {
    let Ok(s) = from_utf8(data) else { return };
    let Some(c) = crate::origin::parse_challenge(s) else {
        return;
    };
    let mut printed = c.scheme.clone();
    for (i, (k, v)) in c.params.iter().enumerate() {
        let quoted = v.replace('\\', "\\\\").replace('"', "\\\"");
        printed.push_str(if i == 0 { " " } else { ", " });
        printed.push_str(&format!("{k}=\"{quoted}\""));
    }
    assert_eq!(
        crate::origin::parse_challenge(&printed).as_ref(),
        Some(&c),
        "{s:?} printed as {printed:?}"
    );
}

/// Manifests and indexes, as the prewarm resolver and the admin catalog
/// read them.
pub fn manifest(data: &[u8]) {
    let Ok(raw) = serde_json::from_slice::<RawManifest>(data) else {
        return;
    };
    for d in raw.config.iter().chain(&raw.layers) {
        let _ = d.digest.parse::<Digest>();
    }
    if let Some(entries) = &raw.manifests {
        let index = Digest::from_sha256(&[0; 32]);
        let host = Platform::host();
        if let Ok(child) = crate::prewarm::resolve::pick_platform(&index, entries, &host) {
            assert!(
                entries.iter().any(|e| e.digest == child.to_string()
                    && e.platform.as_ref().is_some_and(|p| host.matches(p))),
                "picked {child} is not an entry for {host}"
            );
        }
    }
}

/// What peers publish: heartbeats, content announcements, warm intents and
/// their acks. Each decoder is tried on every input.
pub fn swarm_messages(data: &[u8]) {
    use crate::prewarm::feed::IntentReady;
    use crate::prewarm::intent::Intent;
    use crate::swarm::control::{Announce, Heartbeat};

    if let Ok(hb) = serde_json::from_slice::<Heartbeat>(data) {
        let bytes = serde_json::to_vec(&hb).expect("a heartbeat encodes");
        let again: Heartbeat = serde_json::from_slice(&bytes).expect("a heartbeat decodes");
        assert_eq!(again.info, hb.info);
    }
    if let Ok(a) = serde_json::from_slice::<Announce>(data) {
        let bytes = serde_json::to_vec(&a).expect("an announcement encodes");
        assert_eq!(serde_json::from_slice::<Announce>(&bytes).ok(), Some(a));
    }
    if let Ok(i) = Intent::decode(data) {
        assert_eq!(Intent::decode(&i.encode()), Ok(i.clone()));
        assert_eq!(
            i.image_refs().len(),
            i.images.len(),
            "every image of a checked intent pins"
        );
    }
    if let Ok(r) = IntentReady::decode(data) {
        assert_eq!(IntentReady::decode(&r.encode()), Ok(r));
    }
}

/// HTTP/1.1 request heads: the mirror's own parser and route, and what the
/// data plane reads from a peer's request (hyper parses its heads with the
/// same httparse).
pub fn request_head(data: &[u8]) {
    if let Ok(Some((req, _))) = registry::http1::parse_head(&mut BytesMut::from(data)) {
        let _ = registry::parse_route(req.uri().path(), req.uri().query());
        for &size in SIZES {
            if let Some(v) = req.headers().get(http::header::RANGE) {
                check_range(v, size);
            }
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    if !matches!(parsed.parse(data), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let mut map = HeaderMap::new();
    for h in parsed.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return;
        };
        map.append(name, value);
    }
    let path = parsed.path.unwrap_or_default();
    if let Some(d) = path.strip_prefix("/v1/blobs/") {
        if let Ok(digest) = d.parse::<Digest>() {
            assert_eq!(digest.to_string(), d);
        }
    }
    if let Some((a, b)) = piece_range(map.get(http::header::RANGE)) {
        assert!(a <= b);
    }
    let text = |name: &str| map.get(name).and_then(|v| v.to_str().ok());
    let _ = text(crate::swarm::data::SIZE_HEADER).map(str::parse::<u64>);
    if let Some(repo) = text(crate::swarm::data::REPOSITORY_HEADER) {
        let _ = oci::validate_repository(repo);
    }
    if let Some(sums) = text(crate::swarm::data::SUMS_HEADER) {
        let _ = crate::swarm::data::parse_sums(sums);
    }
}

/// A hosts.toml as containerd decodes it, and hostsd's take-over of it: the
/// managed file rendered from any file containerd accepts decodes too, with
/// the mirror first.
pub fn hosts_toml(data: &[u8]) {
    use hostsd::hosts_file::{decode, render, Desired};

    let Ok(s) = from_utf8(data) else { return };
    let _ = decode(s);
    let mirror = "http://127.0.0.1:4001";
    let desired = Desired {
        mirror,
        dial_timeout: "1s",
        server_override: None,
        default_server: Some("https://registry-1.docker.io"),
        has_original: true,
    };
    let Ok(rendered) = render(&desired, Some(s)) else {
        return;
    };
    match decode(&rendered.text) {
        Ok(hosts) => assert_eq!(
            hosts.first().map(|h| h.origin()).as_deref(),
            Some(mirror),
            "the mirror comes first in\n{}",
            rendered.text
        ),
        Err(e) => panic!(
            "{s:?} renders a file containerd refuses ({e}):\n{}",
            rendered.text
        ),
    }
}

/// containerd's config.toml as hostsd reads it, and the `config_path` patch.
pub fn containerd_config(data: &[u8]) {
    use hostsd::containerd_config::{patch_config_path, ContainerdConfig};

    let Ok(s) = from_utf8(data) else { return };
    let path = Path::new("/etc/containerd/config.toml");
    let Ok(cfg) = ContainerdConfig::parse(path, Some(s)) else {
        return;
    };
    let _ = (
        cfg.conflict(),
        cfg.warnings(),
        cfg.soci_warning(),
        cfg.roots(),
    );
    // An error is a refusal hostsd reports; only a panic is a finding
    // (the patch reads its own output back before it returns it).
    let _ = patch_config_path(&cfg, Some(s), Path::new("/etc/containerd/certs.d"));
}

/// The daemon's config file. Paths inside it resolve against a folder that
/// does not exist, so no input names a real file by a relative path.
pub fn daemon_config(data: &[u8]) {
    let Ok(s) = from_utf8(data) else { return };
    match crate::config::Config::parse(s, Path::new("/nonexistent/damselfly-fuzz/config.toml")) {
        Ok(_) => {}
        Err(e) => {
            let _ = e.to_string();
        }
    }
}
