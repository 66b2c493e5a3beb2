use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;

use super::*;

#[test]
fn challenges() {
    let c = parse_challenge(
        r#"Bearer realm="https://auth.test/token",service="registry.test",scope="repository:a/b:pull,push""#,
    )
    .unwrap();
    assert_eq!(c.scheme, "bearer");
    assert_eq!(c.params["realm"], "https://auth.test/token");
    assert_eq!(c.params["service"], "registry.test");
    assert_eq!(c.params["scope"], "repository:a/b:pull,push");

    let c = parse_challenge(r#"Basic realm="r \"q\"", charset=UTF-8"#).unwrap();
    assert_eq!(c.scheme, "basic");
    assert_eq!(c.params["realm"], r#"r "q""#);
    assert_eq!(c.params["charset"], "UTF-8");

    assert_eq!(parse_challenge("Basic").unwrap().params.len(), 0);
    assert!(parse_challenge("").is_none());
    assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
    assert!(parse_challenge("Bearer realm").is_none());
}

/// One request as a test server saw it.
#[derive(Clone, Debug)]
struct Seen1 {
    path: String,
    auth: Option<String>,
    range: Option<String>,
}

type Seen = Arc<Mutex<Vec<Seen1>>>;

/// A tiny HTTP server on `ip` that records each request's path,
/// Authorization and Range, and answers with `answer(path, auth)`.
async fn server(
    ip: [u8; 4],
    answer: impl Fn(&str, Option<&str>) -> Response<Full<Bytes>> + Send + Sync + 'static,
) -> (std::net::SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::from(ip), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let answer = Arc::new(answer);
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (answer, log) = (answer.clone(), log.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let auth = req
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_owned());
                    let path = req.uri().path().to_owned();
                    let range = req
                        .headers()
                        .get("range")
                        .map(|v| v.to_str().unwrap().to_owned());
                    log.lock().unwrap().push(Seen1 {
                        path: path.clone(),
                        auth: auth.clone(),
                        range,
                    });
                    let resp = answer(&path, auth.as_deref());
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

use http::Response;

/// A 401 sending the client to the token service at `auth`.
fn bearer_challenge(auth: std::net::SocketAddr) -> Response<Full<Bytes>> {
    Response::builder()
        .status(401)
        .header(
            "www-authenticate",
            format!(r#"Bearer realm="http://{auth}/token",service="svc""#),
        )
        .body(Full::default())
        .unwrap()
}

fn origin_for(endpoint: &str, creds: Option<Credentials>) -> (Origin, Upstream) {
    let dir = tempfile::tempdir().unwrap();
    let mut text = format!("[[registry]]\nhost = \"origin.test\"\nendpoint = \"{endpoint}\"\n");
    if let Some(c) = &creds {
        std::fs::write(dir.path().join("pw"), &c.password).unwrap();
        text += &format!("username = \"{}\"\npassword_file = \"pw\"\n", c.username);
    }
    let cfg = Config::parse(&text, &dir.path().join("c.toml")).unwrap();
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let origin = Origin::new(&cfg, metrics).unwrap();
    let up = origin.upstream("origin.test").unwrap();
    (origin, up)
}

fn blob_request(client_auth: Option<&HeaderValue>) -> Request<'_> {
    Request {
        method: Method::GET,
        path: "/v2/a/blobs/sha256:00".into(),
        scope: pull_scope("a"),
        headers: HeaderMap::new(),
        client_auth,
        kind: Object::Blob,
    }
}

/// Credentials, configured or the puller's, never follow a redirect to
/// another host (S3 and CDNs get only the presigned URL).
#[tokio::test]
async fn credentials_never_follow_a_redirect_to_another_host() {
    let (cdn, cdn_seen) = server([127, 0, 0, 2], |_, _| Response::new(Full::from("data"))).await;
    let (reg, reg_seen) = server([127, 0, 0, 1], move |_, auth| match auth {
        None => Response::builder()
            .status(401)
            .header("www-authenticate", "Basic realm=\"r\"")
            .body(Full::default())
            .unwrap(),
        Some(_) => Response::builder()
            .status(307)
            .header("location", format!("http://{cdn}/presigned?sig=1"))
            .body(Full::default())
            .unwrap(),
    })
    .await;
    let creds = Credentials {
        username: "bob".into(),
        password: "pw".into(),
    };
    let (origin, up) = origin_for(&format!("http://{reg}"), Some(creds));

    // Configured credentials, after a Basic challenge.
    let resp = origin.send(&up, &blob_request(None)).await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "data");
    // A puller's own header.
    let theirs = HeaderValue::from_static("Bearer puller-token");
    let resp = origin
        .send(&up, &blob_request(Some(&theirs)))
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "data");

    let reg_seen = reg_seen.lock().unwrap().clone();
    assert_eq!(reg_seen.len(), 3, "{reg_seen:?}");
    assert!(reg_seen[1].auth.as_deref().unwrap().starts_with("Basic "));
    assert_eq!(reg_seen[2].auth.as_deref(), Some("Bearer puller-token"));
    let cdn_seen = cdn_seen.lock().unwrap().clone();
    assert_eq!(cdn_seen.len(), 2);
    for r in cdn_seen {
        assert_eq!(r.path, "/presigned");
        assert_eq!(r.auth, None, "credentials leaked to the redirect target");
    }
}

/// The bearer flow: a 401 challenge, a token from the realm with the
/// configured credentials, the retry, and the token reused from the cache.
#[tokio::test]
async fn bearer_tokens_are_fetched_once_and_cached_per_scope() {
    let (auth, auth_seen) = server([127, 0, 0, 1], |_, _| {
        Response::new(Full::from(r#"{"token":"t0k","expires_in":300}"#))
    })
    .await;
    let (reg, reg_seen) = server([127, 0, 0, 1], move |_, a| match a {
        Some("Bearer t0k") => Response::new(Full::from("ok")),
        _ => bearer_challenge(auth),
    })
    .await;
    let creds = Credentials {
        username: "bob".into(),
        password: "pw".into(),
    };
    let (origin, up) = origin_for(&format!("http://{reg}"), Some(creds));
    for _ in 0..3 {
        let resp = origin.send(&up, &blob_request(None)).await.unwrap();
        assert_eq!(resp.text().await.unwrap(), "ok");
    }
    let auth_seen = auth_seen.lock().unwrap().clone();
    assert_eq!(auth_seen.len(), 1, "token fetched more than once");
    assert!(auth_seen[0].auth.as_deref().unwrap().starts_with("Basic "));
    // One challenged request, then three with the token.
    assert_eq!(reg_seen.lock().unwrap().len(), 4);
}

/// A puller's own basic credentials buy a token once; its next requests
/// reuse it, and another puller's credentials never do.
#[tokio::test]
async fn tokens_bought_with_puller_credentials_are_reused_only_by_that_puller() {
    let (auth, auth_seen) = server([127, 0, 0, 1], |_, a| {
        let body = if a == Some("Basic YWxpY2U6cHc=") {
            r#"{"token":"alice-tok","expires_in":300}"#
        } else {
            r#"{"token":"other-tok","expires_in":300}"#
        };
        Response::new(Full::from(body))
    })
    .await;
    let (reg, reg_seen) = server([127, 0, 0, 1], move |_, a| match a {
        Some("Bearer alice-tok") | Some("Bearer other-tok") => Response::new(Full::from("ok")),
        _ => bearer_challenge(auth),
    })
    .await;
    let (origin, up) = origin_for(&format!("http://{reg}"), None);
    let alice = HeaderValue::from_static("Basic YWxpY2U6cHc=");
    let bob = HeaderValue::from_static("Basic Ym9iOnB3");
    for _ in 0..3 {
        let resp = origin.send(&up, &blob_request(Some(&alice))).await.unwrap();
        assert_eq!(resp.text().await.unwrap(), "ok");
    }
    let resp = origin.send(&up, &blob_request(Some(&bob))).await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "ok");
    let auth_seen = auth_seen.lock().unwrap().clone();
    assert_eq!(auth_seen.len(), 2, "one token per puller: {auth_seen:?}");
    let reg_auth: Vec<_> = reg_seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.auth.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        reg_auth,
        vec![
            "Basic YWxpY2U6cHc=",
            "Bearer alice-tok",
            "Bearer alice-tok",
            "Bearer alice-tok",
            "Basic Ym9iOnB3",
            "Bearer other-tok",
        ]
    );
}

/// A 401 the daemon cannot answer is passed on with the origin's challenge,
/// so the puller can authenticate itself.
#[tokio::test]
async fn unanswerable_challenges_pass_through() {
    let (reg, _) = server([127, 0, 0, 1], |_, _| {
        Response::builder()
            .status(401)
            .header("www-authenticate", "Basic realm=\"private\"")
            .body(Full::default())
            .unwrap()
    })
    .await;
    let (origin, up) = origin_for(&format!("http://{reg}"), None);
    match origin.send(&up, &blob_request(None)).await {
        Err(OriginError::Unauthorized { challenge, .. }) => {
            assert_eq!(challenge.unwrap(), "Basic realm=\"private\"")
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
}

/// 5xx answers are retried with backoff, up to `origin.retries`.
#[tokio::test]
async fn server_errors_are_retried() {
    let count = Arc::new(Mutex::new(0));
    let c = count.clone();
    let (reg, _) = server([127, 0, 0, 1], move |_, _| {
        let mut n = c.lock().unwrap();
        *n += 1;
        if *n < 3 {
            Response::builder()
                .status(503)
                .body(Full::default())
                .unwrap()
        } else {
            Response::new(Full::from("ok"))
        }
    })
    .await;
    let (origin, up) = origin_for(&format!("http://{reg}"), None);
    let resp = origin.send(&up, &blob_request(None)).await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "ok");
    assert_eq!(*count.lock().unwrap(), 3);
}

fn ecr_origin_for(endpoint: &str, src: Arc<ecr::MemoryTokenSource>) -> (Origin, Upstream) {
    let text = format!(
        "[[registry]]\nhost = \"origin.test\"\nendpoint = \"{endpoint}\"\n\
         auth = \"ecr\"\necr_region = \"us-east-1\"\n"
    );
    let cfg = Config::parse(&text, std::path::Path::new("/nonexistent/c.toml")).unwrap();
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let origin = Origin::with_ecr_source(&cfg, metrics, src).unwrap();
    let up = origin.upstream("origin.test").unwrap();
    (origin, up)
}

fn aws_basic(password: &str) -> String {
    let raw = base64::engine::general_purpose::STANDARD.encode(format!("AWS:{password}"));
    format!("Basic {raw}")
}

fn basic_challenge() -> Response<Full<Bytes>> {
    Response::builder()
        .status(401)
        .header("www-authenticate", "Basic realm=\"ecr\"")
        .body(Full::default())
        .unwrap()
}

/// ECR answers blob GETs with a redirect to S3: the ECR token goes to the
/// registry only, and the `Range` of a resumed download goes along to S3.
#[tokio::test]
async fn ecr_credentials_never_follow_a_redirect_to_another_host() {
    let (s3, s3_seen) = server([127, 0, 0, 2], |_, _| Response::new(Full::from("data"))).await;
    let want = aws_basic("tok");
    let (reg, reg_seen) = server([127, 0, 0, 1], move |_, auth| {
        if auth == Some(want.as_str()) {
            Response::builder()
                .status(307)
                .header("location", format!("http://{s3}/layer?X-Amz-Signature=1"))
                .body(Full::default())
                .unwrap()
        } else {
            basic_challenge()
        }
    })
    .await;
    let src = ecr::MemoryTokenSource::with_token("tok", None);
    let (origin, up) = ecr_origin_for(&format!("http://{reg}"), src.clone());
    let mut req = blob_request(None);
    req.headers
        .insert(http::header::RANGE, HeaderValue::from_static("bytes=5-"));
    let resp = origin.send(&up, &req).await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "data");

    let reg_seen = reg_seen.lock().unwrap().clone();
    assert_eq!(
        reg_seen.len(),
        1,
        "ECR gets the token up front: {reg_seen:?}"
    );
    assert_eq!(reg_seen[0].auth.as_deref(), Some(aws_basic("tok").as_str()));
    let s3_seen = s3_seen.lock().unwrap().clone();
    assert_eq!(s3_seen.len(), 1);
    assert_eq!(s3_seen[0].path, "/layer");
    assert_eq!(s3_seen[0].auth, None, "the ECR token leaked to S3");
    assert_eq!(s3_seen[0].range.as_deref(), Some("bytes=5-"));
    assert_eq!(src.calls(), 1);
}

/// After the registry refuses the token, a new one is fetched once and the
/// request goes through; a second refusal within the interval gives up
/// without asking AWS again.
#[tokio::test]
async fn a_refused_ecr_token_is_renewed_once() {
    let accepted = Arc::new(Mutex::new(aws_basic("one")));
    let a = accepted.clone();
    let (reg, reg_seen) = server([127, 0, 0, 1], move |_, auth| {
        if auth == Some(a.lock().unwrap().as_str()) {
            Response::new(Full::from("ok"))
        } else {
            basic_challenge()
        }
    })
    .await;
    let src = ecr::MemoryTokenSource::with_token("one", None);
    let (origin, up) = ecr_origin_for(&format!("http://{reg}"), src.clone());
    let resp = origin.send(&up, &blob_request(None)).await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "ok");
    assert_eq!(src.calls(), 1);

    // The password changes at the registry and at AWS.
    *accepted.lock().unwrap() = aws_basic("two");
    src.set_token("two", None);
    let resp = origin.send(&up, &blob_request(None)).await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "ok");
    assert_eq!(src.calls(), 2, "exactly one refresh");
    let auths: Vec<_> = reg_seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.auth.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        auths,
        [aws_basic("one"), aws_basic("one"), aws_basic("two")],
        "no anonymous round trip, no repeat of a refused token"
    );

    // Again, at once: the rate limit holds the refresh back.
    *accepted.lock().unwrap() = aws_basic("three");
    src.set_token("three", None);
    match origin.send(&up, &blob_request(None)).await {
        Err(OriginError::Unauthorized { challenge, .. }) => {
            assert_eq!(challenge.unwrap(), "Basic realm=\"ecr\"")
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    assert_eq!(src.calls(), 2);
    assert_eq!(reg_seen.lock().unwrap().len(), 4);
}

/// A registry that refuses even a token fetched for this very request (a
/// token of the wrong region, say) gets a clear cause, not a loop.
#[tokio::test]
async fn a_refused_fresh_token_is_reported() {
    let (reg, reg_seen) = server([127, 0, 0, 1], |_, _| basic_challenge()).await;
    let src = ecr::MemoryTokenSource::with_token("a", None);
    let (origin, up) = ecr_origin_for(&format!("http://{reg}"), src.clone());
    match origin.send(&up, &blob_request(None)).await {
        Err(
            e @ OriginError::Unauthorized {
                cause: Some(CredentialError::FreshTokenRefused { .. }),
                ..
            },
        ) => assert!(e.to_string().contains("ecr_region"), "{e}"),
        other => panic!("expected a refused fresh token, got {other:?}"),
    }
    // The same token again (moto always answers the same): not resent.
    assert_eq!(src.calls(), 2);
    assert_eq!(reg_seen.lock().unwrap().len(), 1);

    // A different token (as ECR gives) that is refused too.
    let src = ecr::MemoryTokenSource::with_token("a", None);
    let (origin, up) = ecr_origin_for(&format!("http://{reg}"), src.clone());
    up.credentials.current().await.unwrap();
    src.set_token("b", None);
    assert!(matches!(
        origin.send(&up, &blob_request(None)).await,
        Err(OriginError::Unauthorized {
            cause: Some(CredentialError::FreshTokenRefused { .. }),
            ..
        })
    ));
    assert_eq!(src.calls(), 2);
    assert_eq!(reg_seen.lock().unwrap().len(), 3);
}

/// Without AWS credentials the request goes out anonymously, and the
/// origin's challenge comes back with the ECR error as the cause, so that
/// containerd can fall back or authenticate itself. AWS is not asked again
/// within the interval. An identity that AWS denies becomes `DENIED`.
#[tokio::test]
async fn ecr_failures_become_unauthorized_or_denied() {
    let (reg, reg_seen) = server([127, 0, 0, 1], |_, _| basic_challenge()).await;
    let src = Arc::new(ecr::MemoryTokenSource::default());
    src.set_error(EcrErrorKind::NoCredentials);
    let (origin, up) = ecr_origin_for(&format!("http://{reg}"), src.clone());
    for _ in 0..3 {
        match origin.send(&up, &blob_request(None)).await {
            Err(
                e @ OriginError::Unauthorized {
                    cause: Some(CredentialError::Ecr(_)),
                    ..
                },
            ) => {
                assert!(e.to_string().contains("no AWS credentials found"), "{e}");
                let OriginError::Unauthorized { challenge, .. } = e else {
                    unreachable!()
                };
                assert_eq!(challenge.unwrap(), "Basic realm=\"ecr\"");
            }
            other => panic!("expected Unauthorized, got {other:?}"),
        }
    }
    assert_eq!(src.calls(), 1);
    assert!(reg_seen.lock().unwrap().iter().all(|r| r.auth.is_none()));

    let src = Arc::new(ecr::MemoryTokenSource::default());
    src.set_error(EcrErrorKind::Denied);
    let (origin, up) = ecr_origin_for(&format!("http://{reg}"), src);
    match origin.send(&up, &blob_request(None)).await {
        Err(e @ OriginError::Denied { .. }) => {
            assert!(e.to_string().contains("ecr:GetAuthorizationToken"), "{e}")
        }
        other => panic!("expected Denied, got {other:?}"),
    }
}

/// A puller's own `Authorization` wins: the daemon does not even ask AWS.
#[tokio::test]
async fn a_pullers_credentials_win_over_ecr() {
    let (reg, reg_seen) = server([127, 0, 0, 1], |_, _| Response::new(Full::from("ok"))).await;
    let src = ecr::MemoryTokenSource::with_token("ours", None);
    let (origin, up) = ecr_origin_for(&format!("http://{reg}"), src.clone());
    let theirs = HeaderValue::from_static("Basic dGhlaXJzOnB3");
    origin
        .send(&up, &blob_request(Some(&theirs)))
        .await
        .unwrap();
    assert_eq!(src.calls(), 0);
    assert_eq!(
        reg_seen.lock().unwrap()[0].auth.as_deref(),
        Some("Basic dGhlaXJzOnB3")
    );
}
