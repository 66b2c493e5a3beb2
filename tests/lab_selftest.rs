//! Proves that each piece of the test lab (the `damselfly-lab` crate in
//! `lab/`) works against the real programs: registry auth modes and
//! log-based counting, the token flow, image build and push, containerd
//! pulls directly and through a counting relay, large blob push, and the
//! fault proxy.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use damselfly_lab as common;
use futures_util::StreamExt as _;

const MIB: u64 = 1 << 20;

/// One registry with one pushed small image, shared by the tests that only
/// read from it.
fn shared() -> &'static (Registry, PushedImage) {
    static LAB: OnceLock<(Registry, PushedImage)> = OnceLock::new();
    LAB.get_or_init(|| {
        require_tools();
        let registry = Registry::start(RegistryAuth::None).expect("start shared registry");
        let layout = build_image_cached(&ImageSpec::small()).expect("build small image");
        let pushed =
            push_image(&layout, &registry, "lab/small", "v1", None).expect("push small image");
        (registry, pushed)
    })
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client")
}

#[test]
fn utilities() {
    require_tools();
    let port = free_port().expect("free port");
    assert!(port > 0);
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );

    // The generator is deterministic, seekable, and differs by seed.
    let whole = random_bytes(7, 0, 1000);
    assert_eq!(&whole[13..213], &random_bytes(7, 13, 200)[..]);
    assert_ne!(whole, random_bytes(8, 0, 1000));
    let mut read = Vec::new();
    std::io::Read::read_to_end(&mut RandomReader::range(7, 5, 990), &mut read).expect("read");
    assert_eq!(&read[..], &whole[5..995]);
    assert_eq!(
        random_digest(7, 1000),
        format!("sha256:{}", sha256_hex(&whole))
    );

    // Short temp dirs, removed on drop.
    let dir = TestDir::new("selftest").expect("test dir");
    let path = dir.path().to_path_buf();
    assert!(
        path.as_os_str().len() < 40,
        "temp dir path too long: {}",
        path.display()
    );
    assert!(path.is_dir());
    drop(dir);
    assert!(!path.exists(), "TestDir not removed on drop");

    // Access-log lines exactly as distribution 2.8 writes them.
    let head = parse_access_log_line(
        r#"127.0.0.1 - - [27/Nov/2026:20:13:16 +0000] "HEAD /v2/foo/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000 HTTP/1.1" 404 157 "" "curl/7.88.1""#,
    )
    .expect("parse HEAD line");
    assert_eq!(head.method, "HEAD");
    assert_eq!(head.status, 404);
    assert_eq!(head.bytes, 157);
    assert_eq!(head.user_agent, "curl/7.88.1");
    assert!(head.is_blob() && !head.is_blob_get());
    assert_eq!(head.repo(), Some("foo"));
    let get = parse_access_log_line(
        r#"127.0.0.1 - - [27/Nov/2026:20:13:52 +0000] "GET /v2/test/img/blobs/sha256:d2f6?ns=127.0.0.1%3A5000 HTTP/1.1" 200 1083961 "" "containerd/1.6.20~ds1""#,
    )
    .expect("parse GET line");
    assert!(get.is_blob_get());
    assert_eq!(get.path, "/v2/test/img/blobs/sha256:d2f6");
    assert_eq!(get.digest(), Some("sha256:d2f6"));
    assert_eq!(get.bytes, 1_083_961);
    let upload = parse_access_log_line(
        r#"127.0.0.1 - - [27/Nov/2026:20:13:26 +0000] "POST /v2/foo/blobs/uploads/ HTTP/1.1" 202 0 "" "skopeo/1.9.3""#,
    )
    .expect("parse POST line");
    assert!(!upload.is_blob());
    for junk in [
        "",
        "garbage",
        "time=\"x\" level=info msg=\"response completed\"",
        "1.2.3.4 - - [x] \"GET",
    ] {
        assert!(
            parse_access_log_line(junk).is_none(),
            "parsed junk {junk:?}"
        );
    }

    let (scheme, params) = common::blob::parse_challenge(
        r#"Bearer realm="http://127.0.0.1:1/token",service="svc",scope="repository:a/b:pull,push""#,
    )
    .expect("parse challenge");
    assert_eq!(scheme, "Bearer");
    assert_eq!(
        params[2],
        ("scope".to_string(), "repository:a/b:pull,push".to_string())
    );
}

#[test]
fn registry_counts_requests_from_its_access_log() {
    require_tools();
    let registry = Registry::start(RegistryAuth::None).expect("start registry");
    let (digest, size) =
        push_blob(&registry, "count/me", BlobSource::random(11, MIB), None).expect("push blob");
    assert_eq!(size, MIB);

    let mark = registry.mark();
    let base = format!("{}/v2/count/me/blobs/", registry.url());
    let missing = format!("sha256:{}", "0".repeat(64));
    block_on(async {
        let http = http();
        let head = http
            .head(format!("{base}{digest}"))
            .send()
            .await
            .expect("HEAD");
        assert_eq!(head.status(), 200);
        let full = http
            .get(format!("{base}{digest}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(full.bytes().await.expect("body").len() as u64, MIB);
        let range = http
            .get(format!("{base}{digest}"))
            .header("Range", "bytes=0-99")
            .send()
            .await
            .expect("GET range");
        assert_eq!(range.status(), 206);
        assert_eq!(range.bytes().await.expect("body").len(), 100);
        let gone = http
            .get(format!("{base}{missing}"))
            .send()
            .await
            .expect("GET missing");
        assert_eq!(gone.status(), 404);
    });

    let seen: Vec<(String, u16, u64)> = registry
        .requests_since(mark)
        .into_iter()
        .map(|r| (r.method, r.status, r.bytes))
        .collect();
    let context = format!("origin log after mark:\n{}", registry.log_tail(20));
    assert_eq!(seen.len(), 4, "{context}");
    assert_eq!(seen[0], ("HEAD".to_string(), 200, 0), "{context}");
    assert_eq!(seen[1], ("GET".to_string(), 200, MIB), "{context}");
    assert_eq!(seen[2], ("GET".to_string(), 206, 100), "{context}");
    // A 404 logs the length of its JSON error body.
    assert_eq!((seen[3].0.as_str(), seen[3].1), ("GET", 404), "{context}");
    assert!(seen[3].2 > 0, "{context}");
    assert_eq!(registry.blob_gets_since(mark), 3);
    assert_eq!(registry.blob_gets_of(&digest, mark), 2);
    assert_eq!(
        registry.blob_bytes_sent_since(mark),
        MIB + 100,
        "only 2xx bodies count"
    );
    // The lab's own probe and sync requests never show up.
    assert!(registry
        .requests()
        .iter()
        .all(|r| !r.uri.contains("damselfly-lab")));
    // The push itself: POST, one PATCH, PUT.
    let methods: Vec<String> = registry.requests()[..mark]
        .iter()
        .map(|r| r.method.clone())
        .collect();
    assert_eq!(methods, ["POST", "PATCH", "PUT"]);
}

#[test]
fn registry_with_htpasswd() {
    require_tools();
    let registry =
        Registry::start(RegistryAuth::htpasswd("bob", "hunter2")).expect("start registry");
    let (status, headers) =
        common::util::raw_http_request(&registry.host(), "GET", "/v2/", Duration::from_secs(2))
            .expect("GET /v2/");
    assert_eq!(status, 401);
    let challenge = headers
        .iter()
        .find(|(k, _)| k == "www-authenticate")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(challenge.starts_with("Basic "), "challenge: {challenge}");

    let denied = push_blob(&registry, "private/blob", BlobSource::random(1, 1000), None);
    assert!(denied.is_err(), "anonymous push should fail");
    let wrong = push_blob(
        &registry,
        "private/blob",
        BlobSource::random(1, 1000),
        Some(("bob", "nope")),
    );
    assert!(wrong.is_err(), "wrong password should fail");
    let (digest, _) = push_blob(
        &registry,
        "private/blob",
        BlobSource::random(1, 1000),
        Some(("bob", "hunter2")),
    )
    .expect("push with credentials");
    let data =
        get_blob(&registry, "private/blob", &digest, Some(("bob", "hunter2"))).expect("get blob");
    assert_eq!(&data[..], &random_bytes(1, 0, 1000)[..]);
    assert!(
        registry.requests().iter().any(|r| r.status == 401),
        "401s are in the access log"
    );
}

#[test]
fn token_auth_end_to_end() {
    require_tools();
    let tokens = TokenServer::start("alice", "s3cret", false).expect("start token server");
    let registry = Registry::start(RegistryAuth::token(&tokens)).expect("start registry");
    let layout = build_image_cached(&ImageSpec::small()).expect("build image");
    // skopeo does the token flow itself.
    let pushed = push_image(
        &layout,
        &registry,
        "secure/app",
        "v1",
        Some(("alice", "s3cret")),
    )
    .expect("push image");
    assert!(tokens.token_requests() > 0);

    let manifest_url = format!("{}/v2/secure/app/manifests/v1", registry.url());
    block_on(async {
        let http = http();
        let challenge = http.get(&manifest_url).send().await.expect("GET manifest");
        assert_eq!(challenge.status(), 401);
        let header = challenge
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(header.starts_with("Bearer "), "challenge: {header}");
        assert!(
            header.contains(&format!("realm=\"{}\"", tokens.realm())),
            "challenge: {header}"
        );
        assert!(
            header.contains("scope=\"repository:secure/app:pull\""),
            "challenge: {header}"
        );

        let token_url = format!(
            "{}?service={}&scope=repository:secure/app:pull",
            tokens.realm(),
            tokens.service()
        );
        let anonymous = http.get(&token_url).send().await.expect("anonymous token");
        assert_eq!(anonymous.status(), 401, "anonymous is not allowed");
        let bad = http
            .get(&token_url)
            .basic_auth("alice", Some("wrong"))
            .send()
            .await
            .expect("token");
        assert_eq!(bad.status(), 401);
        let answer: serde_json::Value = http
            .get(&token_url)
            .basic_auth("alice", Some("s3cret"))
            .send()
            .await
            .expect("token")
            .json()
            .await
            .expect("token JSON");
        assert_eq!(answer["expires_in"], 300);
        assert!(answer["issued_at"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z')));
        assert_eq!(answer["token"], answer["access_token"]);
        let token = answer["token"].as_str().expect("token string");

        let ok = http
            .get(&manifest_url)
            .bearer_auth(token)
            .header("Accept", common::blob::MANIFEST_ACCEPT)
            .send()
            .await
            .expect("GET manifest with token");
        assert_eq!(ok.status(), 200);
        assert_eq!(ok.bytes().await.expect("manifest"), pushed.manifest);

        // The OAuth2 form containerd tries first.
        let form: serde_json::Value = http
            .post(tokens.realm())
            .form(&[
                ("grant_type", "password"),
                ("username", "alice"),
                ("password", "s3cret"),
                ("service", tokens.service()),
                ("scope", "repository:secure/app:pull"),
                ("client_id", "selftest"),
            ])
            .send()
            .await
            .expect("POST token")
            .json()
            .await
            .expect("POST token JSON");
        assert!(form["access_token"].as_str().is_some());

        // A token for another repository does not open this one.
        let other = tokens
            .mint("alice", "other/repo", &["pull"], Duration::from_secs(60))
            .expect("mint");
        let denied = http
            .get(&manifest_url)
            .bearer_auth(other)
            .send()
            .await
            .expect("GET");
        assert_eq!(denied.status(), 401);
    });

    // containerd does the token flow too (POST first, with --user).
    let containerd = Containerd::start().expect("start containerd");
    write_direct_hosts_toml(containerd.hosts_dir(), &registry.host()).expect("hosts.toml");
    let before = tokens.token_requests();
    let pull = containerd
        .pull(
            &pushed.reference,
            containerd.hosts_dir(),
            &["--user", "alice:s3cret"],
        )
        .expect("run ctr");
    assert!(pull.success(), "{}", pull.describe());
    let after = tokens.requests();
    assert!(after.len() > before);
    eprintln!(
        "containerd token requests: {:?}",
        after[before..]
            .iter()
            .map(|r| (r.method.as_str(), r.status))
            .collect::<Vec<_>>()
    );
    assert!(
        after[before..]
            .iter()
            .any(|r| r.status == 200 && r.user.as_deref() == Some("alice")),
        "containerd got a token: {:?}",
        &after[before..]
    );
}

#[test]
fn anonymous_tokens_are_pull_only() {
    require_tools();
    let tokens = TokenServer::start("alice", "s3cret", true).expect("start token server");
    let registry = Registry::start(RegistryAuth::token(&tokens)).expect("start registry");
    let (digest, _) = push_blob(
        &registry,
        "open/repo",
        BlobSource::random(3, 4096),
        Some(("alice", "s3cret")),
    )
    .expect("push with credentials");
    let data = get_blob(&registry, "open/repo", &digest, None).expect("anonymous pull");
    assert_eq!(data.len(), 4096);
    let denied = push_blob(&registry, "open/repo", BlobSource::random(4, 4096), None);
    assert!(denied.is_err(), "anonymous push must be refused");
}

#[test]
fn image_build_push_and_direct_containerd_pull() {
    let (registry, pushed) = shared();
    assert_eq!(
        pushed.manifest_media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(pushed.layers.len(), 3);
    assert_eq!(
        pushed.reference,
        format!("{}/lab/small:v1", registry.host())
    );
    assert!(
        pushed.layers[1].1 > MIB && pushed.layers[2].1 > 2 * MIB,
        "random layers are incompressible"
    );
    assert_eq!(
        pushed.total_size,
        pushed.config_size + pushed.layers.iter().map(|l| l.1).sum::<u64>()
    );
    // Same spec, same digests (a fresh, uncached build).
    let again = build_image(&ImageSpec::small()).expect("rebuild");
    let manifest = again.manifest().expect("layout manifest");
    assert_eq!(manifest["config"]["digest"], pushed.config_digest.as_str());
    assert_eq!(manifest["layers"][2]["digest"], pushed.layers[2].0.as_str());

    // Its own repository, so that counts ignore the other tests' traffic
    // on the shared registry.
    let layout = build_image_cached(&ImageSpec::small()).expect("cached image");
    let direct = push_image(&layout, registry, "lab/direct", "v1", None).expect("push");
    assert_eq!(direct.manifest_digest, pushed.manifest_digest);

    let containerd = Containerd::start().expect("start containerd");
    let hosts = containerd.hosts_dir().to_path_buf();
    let file = write_direct_hosts_toml(&hosts, &registry.host()).expect("hosts.toml");
    assert!(file.ends_with(format!("{}/hosts.toml", registry.host())));

    let mark = registry.mark();
    let pull = containerd
        .pull(&direct.reference, &hosts, &[])
        .expect("run ctr");
    assert!(
        pull.success(),
        "{}\n{}",
        pull.describe(),
        containerd.log_tail(20)
    );
    let blob_gets: Vec<OriginRequest> = registry
        .requests_in_repo("lab/direct", mark)
        .into_iter()
        .filter(|r| r.is_blob_get())
        .collect();
    assert_eq!(blob_gets.len(), 4, "config + 3 layers:\n{blob_gets:#?}");
    assert_eq!(
        blob_gets.iter().map(|r| r.bytes).sum::<u64>(),
        direct.total_size
    );
    let content = containerd.content_digests().expect("content ls");
    for digest in direct.blob_digests() {
        assert!(content.contains(&digest), "{digest} not in content store");
    }

    // Cleared, a second fetch goes to the origin again.
    containerd.clear_content().expect("clear content");
    let mark = registry.mark();
    let fetch = containerd
        .content_fetch(&direct.reference, &hosts, &[])
        .expect("run ctr");
    assert!(fetch.success(), "{}", fetch.describe());
    let again = registry.requests_in_repo("lab/direct", mark);
    assert_eq!(again.iter().filter(|r| r.is_blob_get()).count(), 4);

    // A second containerd starts empty.
    let other = Containerd::start().expect("second containerd");
    assert!(other.content_digests().expect("content ls").is_empty());
}

#[test]
fn containerd_pulls_through_a_counting_relay() {
    let (registry, pushed) = shared();
    let relay = FaultProxy::start(registry).expect("start relay");
    let hosts = TestDir::new("hosts").expect("hosts dir");
    write_hosts_toml(hosts.path(), &registry.host(), &relay.url()).expect("hosts.toml");
    let containerd = Containerd::start().expect("start containerd");

    let origin_mark = registry.mark();
    let pull = containerd
        .pull(&pushed.reference, hosts.path(), &[])
        .expect("run ctr");
    assert!(pull.success(), "{}", pull.describe());
    assert!(relay.wait_idle(Duration::from_secs(5)));

    let seen = relay.requests();
    assert!(!seen.is_empty(), "containerd did not use the mirror");
    for request in &seen {
        assert_eq!(
            request.ns().as_deref(),
            Some(registry.host().as_str()),
            "request without ns: {}",
            request.uri
        );
        assert!(
            request.uri.contains("ns=127.0.0.1%3A"),
            "ns is URL-encoded: {}",
            request.uri
        );
        assert!(
            request.path != "/v2/" && request.path != "/v2",
            "containerd never probes /v2/ on a mirror"
        );
    }
    assert_eq!(seen[0].method, "HEAD");
    assert_eq!(seen[0].path, "/v2/lab/small/manifests/v1");
    assert_eq!(relay.blob_gets(), 4);
    assert_eq!(relay.blob_bytes(), pushed.total_size);
    assert!(seen.iter().filter(|r| r.is_blob_get()).all(|r| r.completed));

    // The origin's log agrees with the relay, request for request (other
    // tests use the shared registry at the same time, hence the filter;
    // containerd fetches blobs in parallel, hence the sort).
    let mut origin: Vec<(String, String, u16, u64)> = registry
        .requests_since(origin_mark)
        .into_iter()
        .filter(|r| r.uri.starts_with("/v2/lab/small/") && r.uri.contains("?ns="))
        .map(|r| {
            // Go does not send the body of a HEAD (the log may count it).
            let bytes = if r.method == "HEAD" { 0 } else { r.bytes };
            (r.method, r.uri, r.status, bytes)
        })
        .collect();
    let mut relayed: Vec<(String, String, u16, u64)> = seen
        .iter()
        .map(|r| (r.method.clone(), r.uri.clone(), r.status, r.body_bytes))
        .collect();
    origin.sort();
    relayed.sort();
    assert_eq!(origin, relayed);
    for digest in pushed.blob_digests() {
        assert_eq!(relay.count_path(&digest), 1);
        assert_eq!(origin.iter().filter(|r| r.1.contains(&digest)).count(), 1);
    }
}

#[test]
fn blob_push_64mib_and_verify() {
    let (registry, _) = shared();
    let source = BlobSource::random(64, 64 * MIB);
    let started = Instant::now();
    let (digest, size) =
        push_blob(registry, "big/blob", source.clone(), None).expect("push 64 MiB");
    eprintln!("pushed 64 MiB in {:?}", started.elapsed());
    assert_eq!(size, 64 * MIB);
    assert_eq!(digest, random_digest(64, 64 * MIB));
    let mark = registry.mark();
    verify_blob(registry, "big/blob", &digest, &source, None).expect("verify");
    assert_eq!(registry.blob_bytes_sent_of(&digest, mark), 64 * MIB);
    let wrong = verify_blob(
        registry,
        "big/blob",
        &digest,
        &BlobSource::random(65, 64 * MIB),
        None,
    )
    .expect_err("other content must not verify");
    assert!(wrong.to_string().contains("offset 0"), "{wrong}");
}

#[test]
fn fault_proxy_cuts_corrupts_stalls_and_fails() {
    let (registry, _) = shared();
    let len = 4 * MIB;
    let (digest, _) =
        push_blob(registry, "faults/blob", BlobSource::random(44, len), None).expect("push");
    let expected = random_bytes(44, 0, len as usize);
    let proxy = FaultProxy::start(registry).expect("start proxy");
    let url = format!("{}/v2/faults/blob/blobs/{digest}", proxy.url());

    /// GET through the proxy: (status, content-length, bytes received, error?)
    async fn fetch(url: &str) -> (u16, Option<u64>, Vec<u8>, Option<String>) {
        let response = http().get(url).send().await.expect("GET through proxy");
        let status = response.status().as_u16();
        let length = response.content_length();
        let mut body = response.bytes_stream();
        let mut data = Vec::new();
        let mut error = None;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        (status, length, data, error)
    }

    block_on(async {
        // Cut once after 1 MiB: headers announce 4 MiB, exactly 1 MiB arrives.
        proxy.set_fault(Fault::CutAfter {
            bytes: MIB,
            times: 1,
        });
        let (status, length, data, error) = fetch(&url).await;
        assert_eq!((status, length), (200, Some(len)));
        assert!(error.is_some(), "a cut body must end in an error");
        assert_eq!(data.len() as u64, MIB, "exactly the allowed bytes arrive");
        assert_eq!(&data[..], &expected[..MIB as usize]);
        // The fault is used up: the next GET is whole.
        let (status, _, data, error) = fetch(&url).await;
        assert_eq!((status, error), (200, None));
        assert!(data == expected);

        proxy.set_fault(Fault::Corrupt {
            offset: 100,
            times: 1,
        });
        let (_, _, data, error) = fetch(&url).await;
        assert_eq!(error, None);
        assert_eq!(data.len(), expected.len());
        assert_eq!(data[100], expected[100] ^ 0xff);
        assert_eq!(&data[..100], &expected[..100]);
        assert_eq!(&data[101..], &expected[101..]);

        proxy.set_fault(Fault::Stall {
            after: MIB,
            duration: Duration::from_millis(400),
            times: 1,
        });
        let started = Instant::now();
        let (_, _, data, error) = fetch(&url).await;
        assert!(started.elapsed() >= Duration::from_millis(400));
        assert_eq!(error, None);
        assert!(data == expected);

        proxy.set_fault(Fault::Status {
            code: 500,
            times: 1,
        });
        let (status, _, _, _) = fetch(&url).await;
        assert_eq!(status, 500);
        let (status, _, _, _) = fetch(&url).await;
        assert_eq!(status, 200);

        // Range and HEAD pass through untouched.
        let range = http()
            .get(&url)
            .header("Range", "bytes=10-19")
            .send()
            .await
            .expect("range");
        assert_eq!(range.status(), 206);
        assert_eq!(&range.bytes().await.expect("body")[..], &expected[10..20]);
        let head = http().head(&url).send().await.expect("HEAD");
        assert_eq!(head.status(), 200);
        assert_eq!(
            head.headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok()),
            Some(len.to_string().as_str())
        );
    });
    assert!(proxy.wait_idle(Duration::from_secs(5)));

    let seen = proxy.requests();
    assert_eq!(seen.len(), 8);
    let mark = proxy.mark();
    assert!(seen[0].cut && seen[0].body_bytes == MIB);
    assert!(seen[1].completed && seen[1].body_bytes == len);
    assert_eq!(
        seen[2].fault,
        Some(Fault::Corrupt {
            offset: 100,
            times: 1
        })
    );
    assert_eq!(seen[6].header("range"), Some("bytes=10-19"));
    assert_eq!(seen[7].method, "HEAD");
    assert_eq!(proxy.faults_applied(), 4);
    assert_eq!(proxy.count_path(&digest), 8);
    assert_eq!(proxy.blob_gets(), 7);

    // Uploads pass too: Host is kept, so the registry's absolute Location
    // URLs point back at the proxy.
    let (pushed, _) = push_blob(
        &proxy,
        "faults/upload",
        BlobSource::random(45, 3 * MIB),
        None,
    )
    .expect("push via proxy");
    let methods: Vec<String> = proxy
        .requests_since(mark)
        .into_iter()
        .map(|r| r.method)
        .collect();
    assert_eq!(methods, ["POST", "PATCH", "PUT"]);
    verify_blob(
        registry,
        "faults/upload",
        &pushed,
        &BlobSource::random(45, 3 * MIB),
        None,
    )
    .expect("stored");
}

#[test]
fn pull_through_cache_registry() {
    let (origin, _) = shared();
    let source = BlobSource::random(5, 2 * MIB);
    let (digest, _) = push_blob(origin, "cached/blob", source.clone(), None).expect("push");
    let cache = Registry::start_proxy(&origin.url(), None).expect("start proxy registry");
    let mark = origin.mark();
    verify_blob(&cache, "cached/blob", &digest, &source, None).expect("first pull via cache");
    // distribution 2.8 fetches a missed blob twice: one stream to the
    // client, one to its own storage (in the background).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cache.has_blob(&digest) {
        assert!(Instant::now() < deadline, "the cache never stored the blob");
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = origin.blob_gets_of(&digest, mark);
    assert!((1..=2).contains(&first), "{first} origin GETs for one miss");
    for _ in 0..2 {
        verify_blob(&cache, "cached/blob", &digest, &source, None).expect("pull via cache");
    }
    assert_eq!(
        origin.blob_gets_of(&digest, mark),
        first,
        "hits must not reach the origin:\n{:#?}",
        origin.requests_since(mark)
    );
    assert_eq!(cache.blob_gets(), 3);
    eprintln!("origin GETs for one cache miss: {first}");
}

#[test]
fn registry_stop_restart_pause() {
    require_tools();
    let registry = Registry::start(RegistryAuth::None).expect("start registry");
    assert_eq!(
        wait_for_http(&format!("{}/v2/", registry.url()), Duration::from_secs(5)).expect("up"),
        200
    );
    let (digest, _) =
        push_blob(&registry, "restart/me", BlobSource::random(9, 1000), None).expect("push");
    registry.stop();
    assert!(
        get_blob(&registry, "restart/me", &digest, None).is_err(),
        "stopped registry answered"
    );
    registry.restart().expect("restart");
    let data =
        get_blob(&registry, "restart/me", &digest, None).expect("storage survives a restart");
    assert_eq!(data.len(), 1000);

    registry.pause().expect("pause");
    let started = Instant::now();
    let status =
        common::util::raw_http_request(&registry.host(), "GET", "/v2/", Duration::from_millis(300));
    assert!(status.is_err(), "a paused registry must not answer");
    assert!(started.elapsed() >= Duration::from_millis(250));
    registry.resume().expect("resume");
    get_blob(&registry, "restart/me", &digest, None).expect("answers after resume");
    // The log spans both processes.
    assert_eq!(registry.blob_gets(), 2);
}

/// Manual check that blobs stream: `cargo test --test lab_selftest -- --ignored`.
#[test]
#[ignore = "slow: pushes and verifies 1 GiB"]
fn blob_push_1gib_streams() {
    let (registry, _) = shared();
    let source = BlobSource::random(1024, 1 << 30);
    let started = Instant::now();
    let (digest, _) = push_blob(registry, "huge/blob", source.clone(), None).expect("push 1 GiB");
    let pushed = started.elapsed();
    let proxy = FaultProxy::start(registry).expect("proxy");
    let started = Instant::now();
    verify_blob(&proxy, "huge/blob", &digest, &source, None).expect("verify through the proxy");
    eprintln!(
        "1 GiB: push {pushed:?}, verify through FaultProxy {:?}",
        started.elapsed()
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("VmHWM: ?");
    eprintln!("peak RSS of the test process: {rss}");
}
