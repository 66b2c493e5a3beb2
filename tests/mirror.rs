//! The mirror against real components: containerd pulls through it from a
//! real `docker-registry`, with no auth, basic auth and token auth, and the
//! origin's own access log counts what reached it.

use std::sync::OnceLock;

use common::{
    build_image_cached, push_image, write_hosts_toml, Containerd, ImageSpec, PushedImage, Registry,
    RegistryAuth, TokenServer,
};
use daemon::Daemon;
use damselfly_lab as common;
use damselfly_lab::daemon;

/// One no-auth origin shared by the tests of this binary.
fn origin() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| {
        common::require_tools();
        Registry::start(RegistryAuth::None).expect("registry")
    })
}

/// Pushes the small three-layer image to its own repository, so a test can
/// count the origin's requests for that repository alone.
fn push_small(reg: &Registry, repo: &str, creds: Option<(&str, &str)>) -> PushedImage {
    let layout = build_image_cached(&ImageSpec::small()).expect("build image");
    push_image(&layout, reg, repo, "v1", creds).expect("push image")
}

fn registry_toml(host: &str, endpoint: &str) -> String {
    format!("[[registry]]\nhost = \"{host}\"\nendpoint = \"{endpoint}\"\n")
}

fn with_credentials(dir: &std::path::Path, user: &str, pass: &str) -> String {
    let pw = dir.join("password");
    std::fs::write(&pw, pass).expect("write password");
    format!(
        "username = \"{user}\"\npassword_file = \"{}\"\n",
        pw.display()
    )
}

/// A fresh containerd pulls `reference` with the daemon as its mirror for
/// `registry`; asserts the pull succeeded.
fn pull_through(d: &Daemon, registry: &str, reference: &str, extra: &[&str]) {
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), registry, &d.url()).unwrap();
    let c = Containerd::start().unwrap();
    let out = c.pull(reference, hosts.path(), extra).unwrap();
    assert!(out.success(), "pull {extra:?}: {out:?}\n{}", d.log_tail(30));
}

fn origin_bytes_served(d: &Daemon) -> u64 {
    d.metric(r#"damselfly_bytes_served_total{source="origin"}"#) as u64
}

/// The core promise: the first pull goes origin -> mirror -> containerd, the
/// second (by a containerd with an empty content store) is served from the
/// cache with zero blob requests at the origin.
#[test]
fn containerd_pulls_through_the_mirror_and_then_from_the_cache() {
    let reg = origin();
    let img = push_small(reg, "mirror/first", None);
    let d = Daemon::start(&registry_toml(&reg.host(), &reg.url()));
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), &reg.host(), &d.url()).unwrap();

    let mark = reg.mark();
    let first = Containerd::start().unwrap();
    let out = first.pull(&img.reference, hosts.path(), &[]).unwrap();
    assert!(
        out.success(),
        "first pull failed: {out:?}\n{}",
        d.log_tail(30)
    );

    let seen: Vec<_> = reg
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.repo() == Some("mirror/first"))
        .collect();
    let blob_gets: Vec<_> = seen.iter().filter(|r| r.is_blob_get()).collect();
    assert_eq!(
        blob_gets.len(),
        img.blob_digests().len(),
        "each blob once from the origin: {seen:#?}"
    );
    // The origin saw the daemon, never containerd itself.
    for r in &seen {
        assert!(
            r.user_agent.starts_with("damselfly/"),
            "containerd bypassed the mirror: {r:?}"
        );
    }
    assert_eq!(origin_bytes_served(&d), img.total_size);
    for digest in img.blob_digests() {
        assert!(d.blob_path(&digest).exists(), "{digest} not cached");
    }

    let mark = reg.mark();
    let second = Containerd::start().unwrap();
    let out = second.pull(&img.reference, hosts.path(), &[]).unwrap();
    assert!(out.success(), "second pull failed: {out:?}");
    let seen: Vec<_> = reg
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.repo() == Some("mirror/first"))
        .collect();
    assert_eq!(
        seen.iter().filter(|r| r.is_blob()).count(),
        0,
        "a warm pull touched origin blobs: {seen:#?}"
    );
    // The tag is still resolved at the origin: that is the auth check.
    assert!(seen.iter().all(|r| r.is_manifest()), "{seen:#?}");
    assert_eq!(
        d.metric(r#"damselfly_bytes_served_total{source="local"}"#) as u64,
        img.total_size
    );
}

/// Manifests answer with the distribution headers, by tag and by digest,
/// for GET and HEAD.
#[tokio::test]
async fn manifests_carry_the_distribution_headers() {
    let reg = origin();
    let img = push_small(reg, "mirror/headers", None);
    let d = Daemon::start(&registry_toml(&reg.host(), &reg.url()));
    let client = reqwest::Client::new();
    for reference in ["v1".to_string(), img.manifest_digest.clone()] {
        for head in [false, true] {
            let url = format!(
                "{}/v2/mirror/headers/manifests/{reference}?ns={}",
                d.url(),
                reg.host()
            );
            let req = if head {
                client.head(&url)
            } else {
                client.get(&url)
            };
            let resp = req
                .header("accept", "application/vnd.oci.image.manifest.v1+json")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{url}");
            let h = resp.headers().clone();
            assert_eq!(h["docker-content-digest"], img.manifest_digest.as_str());
            assert_eq!(h["content-type"], img.manifest_media_type.as_str());
            assert_eq!(h["content-length"], img.manifest.len().to_string().as_str());
            assert_eq!(h["docker-distribution-api-version"], "registry/2.0");
            let body = resp.bytes().await.unwrap();
            if head {
                assert!(body.is_empty());
            } else {
                assert_eq!(body, img.manifest);
            }
        }
    }
    let base = client.get(format!("{}/v2/", d.url())).send().await.unwrap();
    assert_eq!(base.status(), 200);
    assert_eq!(
        base.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
}

/// An origin with htpasswd basic auth: the daemon's own credentials work
/// for an anonymous containerd, and without them a containerd with
/// credentials gets the challenge and authenticates through the mirror.
#[test]
fn basic_auth_origin() {
    let reg = Registry::start(RegistryAuth::htpasswd("puller", "s3cret")).expect("registry");
    let img = push_small(&reg, "auth/basic", Some(("puller", "s3cret")));

    let dir = tempfile::tempdir().unwrap();
    let with_creds = Daemon::start(&format!(
        "{}{}",
        registry_toml(&reg.host(), &reg.url()),
        with_credentials(dir.path(), "puller", "s3cret")
    ));
    pull_through(&with_creds, &reg.host(), &img.reference, &[]);
    assert_eq!(origin_bytes_served(&with_creds), img.total_size);

    let without = Daemon::start(&registry_toml(&reg.host(), &reg.url()));
    pull_through(
        &without,
        &reg.host(),
        &img.reference,
        &["--user", "puller:s3cret"],
    );
    assert!(
        without.metric(
            r#"damselfly_http_requests_total{method="HEAD",route="manifest",status="401"}"#
        ) >= 1.0,
        "the mirror should have passed the origin's challenge on"
    );
    assert_eq!(origin_bytes_served(&without), img.total_size);
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), &reg.host(), &without.url()).unwrap();
    let c = Containerd::start().unwrap();
    let out = c.pull(&img.reference, hosts.path(), &[]).unwrap();
    assert!(
        !out.success(),
        "an anonymous pull of a private image must fail"
    );
}

/// An origin with token auth (distribution's `auth.token` and a token
/// server): the daemon runs the bearer flow with its credentials and caches
/// the token; a puller with its own credentials also gets through.
#[test]
fn token_auth_origin() {
    let tokens = TokenServer::start("puller", "s3cret", false).expect("token server");
    let reg = Registry::start(RegistryAuth::token(&tokens)).expect("registry");
    let img = push_small(&reg, "auth/token", Some(("puller", "s3cret")));

    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&format!(
        "{}{}",
        registry_toml(&reg.host(), &reg.url()),
        with_credentials(dir.path(), "puller", "s3cret")
    ));
    let before = tokens.token_requests();
    pull_through(&d, &reg.host(), &img.reference, &[]);
    let used = tokens.token_requests() - before;
    assert_eq!(used, 1, "one token for the repository scope, then cached");
    assert_eq!(origin_bytes_served(&d), img.total_size);

    let anon = Daemon::start(&registry_toml(&reg.host(), &reg.url()));
    pull_through(
        &anon,
        &reg.host(),
        &img.reference,
        &["--user", "puller:s3cret"],
    );
    assert_eq!(
        origin_bytes_served(&anon),
        img.total_size,
        "{}\n{}",
        anon.log_tail(40),
        anon.metrics()
    );
}

/// When the origin is unreachable, a tag resolves to its last good answer
/// within `tag_stale_for`, and the answer says it is stale.
#[tokio::test]
async fn stale_tag_answer_while_the_origin_is_down() {
    let reg = Registry::start(RegistryAuth::None).expect("registry");
    let img = push_small(&reg, "mirror/stale", None);
    let d = Daemon::start_with(daemon::Options {
        mirror: "tag_stale_for = \"1h\"".into(),
        extra: format!(
            "{}[origin]\nretries = 1\nconnect_timeout = \"1s\"\n",
            registry_toml(&reg.host(), &reg.url())
        ),
        ..Default::default()
    });
    let url = format!("{}/v2/mirror/stale/manifests/v1?ns={}", d.url(), reg.host());
    let fresh = reqwest::get(&url).await.unwrap();
    assert_eq!(fresh.status(), 200, "{}", d.log_tail(20));
    assert_eq!(fresh.headers()["x-damselfly-stale"], "0");

    reg.stop();
    let stale = reqwest::get(&url).await.unwrap();
    assert_eq!(stale.status(), 200, "{}", d.log_tail(20));
    assert_eq!(stale.headers()["x-damselfly-stale"], "1");
    assert_eq!(
        stale.headers()["docker-content-digest"],
        img.manifest_digest.as_str()
    );
    // A tag never seen has no fallback: containerd gets an error and falls
    // back to the origin itself.
    let unknown = reqwest::get(format!(
        "{}/v2/mirror/stale/manifests/other?ns={}",
        d.url(),
        reg.host()
    ))
    .await
    .unwrap();
    assert_eq!(unknown.status(), 502);
    assert_eq!(d.metric("damselfly_stale_tags_served_total"), 1.0);
}

/// SIGTERM drains and exits cleanly.
#[test]
fn sigterm_shuts_down_cleanly() {
    let mut d = Daemon::start("");
    let status = d.terminate().expect("daemon was running");
    assert!(status.success(), "exit status {status}\n{}", d.log_tail(20));
    assert!(d.log().contains("damselfly stopped"));
}
