//! An origin that serves HTTPS with a certificate from a private CA: a real
//! `docker-registry` with `http.tls`, its certificate signed by a CA made
//! with `openssl` for this run. `[[registry]] ca_file` must make the daemon
//! trust that CA; without it the daemon must refuse the origin; a `ca_file`
//! that holds no certificate must stop the daemon at start-up.

use std::path::Path;
use std::sync::OnceLock;

use common::{
    build_image_cached, push_blob, push_image, sha256_hex, write_hosts_file, BlobSource,
    Containerd, ImageSpec, Registry, RegistryOptions, TestDir, TlsFiles,
};
use daemon::{Daemon, Options};
use damselfly_lab as common;
use damselfly_lab::daemon;

/// One HTTPS origin shared by the tests of this binary; each test uses its
/// own repository.
fn origin() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| {
        common::require_tools();
        // The registry copies the files into its own dir.
        let certs = TestDir::new("tls").expect("cert dir");
        let tls = TlsFiles::generate(certs.path()).expect("make CA and server certificate");
        let reg = Registry::start_with(RegistryOptions {
            tls: Some(tls),
            ..Default::default()
        })
        .expect("start TLS registry");
        assert!(reg.url().starts_with("https://"), "{}", reg.url());
        reg
    })
}

/// The daemon's config for the TLS origin, trusting `ca_file` if given.
/// Default retries: a certificate that fails verification must not be
/// retried at all (it fails the same way every time).
fn registry_toml(reg: &Registry, ca_file: Option<&Path>) -> String {
    let mut s = format!(
        "[[registry]]\nhost = \"{}\"\nendpoint = \"{}\"\n",
        reg.host(),
        reg.url()
    );
    if let Some(ca) = ca_file {
        s += &format!("ca_file = \"{}\"\n", ca.display());
    }
    s
}

/// `GET <mirror>/v2/<repo>/blobs/<digest>?ns=<host>`: status, content type
/// and body.
fn mirror_get_blob(d: &Daemon, host: &str, repo: &str, digest: &str) -> (u16, String, Vec<u8>) {
    let url = format!("{}/v2/{repo}/blobs/{digest}?ns={host}", d.url());
    common::block_on(async move {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let resp = client
            .get(&url)
            .send()
            .await
            .expect("GET through the mirror");
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = resp.bytes().await.expect("read body").to_vec();
        (status, content_type, body)
    })
}

#[test]
fn ca_file_makes_the_mirror_trust_a_private_ca_origin() {
    let reg = origin();
    let repo = "tls/trusted";
    let source = BlobSource::random(0x715, 300_000);
    let (digest, size) = push_blob(reg, repo, source, None).expect("push blob over HTTPS");
    let d = Daemon::start(&registry_toml(reg, reg.ca_file()));

    let mark = reg.mark();
    let (status, _, body) = mirror_get_blob(&d, &reg.host(), repo, &digest);
    assert_eq!(
        status,
        200,
        "body: {}\n{}",
        String::from_utf8_lossy(&body),
        d.log_tail(30)
    );
    assert_eq!(body.len() as u64, size);
    assert_eq!(format!("sha256:{}", sha256_hex(&body)), digest);

    // The bytes came from the origin, over TLS, fetched by the daemon.
    let seen = reg.requests_in_repo(repo, mark);
    let gets: Vec<_> = seen
        .iter()
        .filter(|r| r.is_blob_get() && r.digest() == Some(digest.as_str()))
        .collect();
    assert_eq!(gets.len(), 1, "{seen:#?}");
    // 206: the first GET asks for a range (origin.parallel_ranges), which
    // covers this blob whole.
    assert_eq!(gets[0].status, 206, "{seen:#?}");
    assert_eq!(gets[0].bytes, size, "{seen:#?}");
    assert!(
        gets[0].user_agent.starts_with("damselfly/"),
        "{:?}",
        gets[0]
    );
    assert!(d.blob_path(&digest).exists(), "blob not cached");
}

#[test]
fn without_ca_file_the_mirror_refuses_the_origin_certificate() {
    let reg = origin();
    let repo = "tls/untrusted";
    let (digest, _) =
        push_blob(reg, repo, BlobSource::random(0x716, 50_000), None).expect("push blob");
    let d = Daemon::start(&registry_toml(reg, None));

    let mark = reg.mark();
    let (status, content_type, body) = mirror_get_blob(&d, &reg.host(), repo, &digest);
    assert_eq!(
        status,
        502,
        "body: {}\n{}",
        String::from_utf8_lossy(&body),
        d.log_tail(30)
    );
    assert!(content_type.contains("json"), "{content_type}");
    let json: serde_json::Value = serde_json::from_slice(&body).expect("OCI error JSON");
    assert_eq!(json["errors"][0]["code"], "UNKNOWN", "{json}");
    assert!(!d.blob_path(&digest).exists(), "refused blob was cached");

    // The handshake failed, so no request reached the registry's handler;
    // Go logs the failed handshake on stderr instead.
    let seen = reg.requests_in_repo(repo, mark);
    assert!(seen.is_empty(), "{seen:#?}");
    let registry_log = std::fs::read_to_string(reg.log_path()).unwrap_or_default();
    assert!(
        registry_log.contains("TLS handshake error"),
        "{}",
        reg.log_tail(20)
    );

    // The error body and the daemon's log say why: rustls' verdict on the
    // certificate.
    let message = json["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("UnknownIssuer"), "{json}");
    // One handshake, no retries with backoff.
    assert_eq!(
        d.metric(r#"damselfly_origin_requests_total{kind="blob",status="error"}"#),
        1.0,
        "{}",
        d.metrics()
    );
    assert!(
        d.log().contains("invalid peer certificate: UnknownIssuer"),
        "the log does not name the certificate problem:\n{}",
        d.log_tail(30)
    );
    assert_eq!(
        d.metric(r#"damselfly_bytes_served_total{source="origin"}"#),
        0.0
    );
}

#[test]
fn a_ca_file_that_is_not_pem_stops_the_daemon_at_start() {
    let reg = origin();
    let dir = TestDir::new("badca").expect("temp dir");
    let cases = [
        ("not-pem.txt", "this is not a certificate\n".to_string()),
        // PEM armour around bytes that are no certificate.
        (
            "junk.pem",
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
                .to_string(),
        ),
    ];
    for (name, contents) in cases {
        let bad = dir.join(name);
        std::fs::write(&bad, contents).unwrap();
        let (status, log) = Daemon::start_expecting_exit(Options {
            extra: registry_toml(reg, Some(&bad)),
            ..Options::default()
        });
        assert!(!status.success(), "{name}: exited {status}\n{log}");
        assert!(
            log.contains(&format!("ca_file {}", bad.display())),
            "{name}: the error does not name the file:\n{log}"
        );
    }
}

/// containerd pulls a whole image through the mirror (plain HTTP on
/// 127.0.0.1) from the HTTPS origin. containerd's fallback, the origin
/// itself, does not trust the lab CA, so it cannot hide a mirror failure.
#[test]
fn containerd_pulls_through_the_mirror_from_the_tls_origin() {
    let reg = origin();
    let repo = "tls/image";
    let layout = build_image_cached(&ImageSpec::small()).expect("build image");
    let img = push_image(&layout, reg, repo, "v1", None).expect("push image over HTTPS");
    let d = Daemon::start(&registry_toml(reg, reg.ca_file()));
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_file(
        hosts.path(),
        &reg.host(),
        &format!(
            "server = \"{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.url(),
            d.url()
        ),
    )
    .unwrap();

    let mark = reg.mark();
    let c = Containerd::start().expect("containerd");
    let out = c.pull(&img.reference, hosts.path(), &[]).unwrap();
    assert!(out.success(), "pull failed: {out:?}\n{}", d.log_tail(30));

    let seen = reg.requests_in_repo(repo, mark);
    for r in &seen {
        assert!(
            r.user_agent.starts_with("damselfly/"),
            "not the mirror: {r:?}"
        );
    }
    let blob_gets = seen.iter().filter(|r| r.is_blob_get()).count();
    assert_eq!(blob_gets, img.blob_digests().len(), "{seen:#?}");
    for digest in img.blob_digests() {
        assert!(d.blob_path(&digest).exists(), "{digest} not cached");
    }
}
