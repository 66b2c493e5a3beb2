use super::*;

const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn route(path: &str, q: Option<&str>) -> Result<Route, ApiError> {
    parse_route(path, q)
}

#[test]
fn routes() {
    assert_eq!(route("/v2/", None).unwrap(), Route::Base);
    assert_eq!(route("/v2", None).unwrap(), Route::Base);
    assert_eq!(
        route("/v2/library/busybox/manifests/latest", Some("ns=docker.io")).unwrap(),
        Route::Manifest {
            ns: Some("docker.io".into()),
            name: "library/busybox".into(),
            reference: Reference::Tag("latest".into()),
        }
    );
    // containerd URL-encodes the port's colon.
    let r = route(&format!("/v2/a/blobs/{D}"), Some("ns=127.0.0.1%3A5000")).unwrap();
    assert_eq!(
        r,
        Route::Blob {
            ns: Some("127.0.0.1:5000".into()),
            name: "a".into(),
            digest: D.parse().unwrap(),
        }
    );
    // A repository may itself contain "blobs" or "manifests".
    let r = route(&format!("/v2/x/blobs/y/manifests/{D}"), None).unwrap();
    assert!(matches!(r, Route::Manifest { name, .. } if name == "x/blobs/y"));
}

#[test]
fn bad_requests_get_the_right_code() {
    let cases: &[(&str, Option<&str>, StatusCode, ErrorCode)] = &[
        (
            "/v2/../etc/blobs/x",
            None,
            StatusCode::BAD_REQUEST,
            ErrorCode::NameInvalid,
        ),
        (
            "/v2/a/../../blobs/sha256:00",
            None,
            StatusCode::BAD_REQUEST,
            ErrorCode::NameInvalid,
        ),
        (
            "/v2/a%2f..%2fb/manifests/v1",
            None,
            StatusCode::BAD_REQUEST,
            ErrorCode::NameInvalid,
        ),
        (
            "/v2/a/blobs/sha256:zz",
            None,
            StatusCode::BAD_REQUEST,
            ErrorCode::DigestInvalid,
        ),
        (
            "/v2/a/blobs/md5:00",
            None,
            StatusCode::BAD_REQUEST,
            ErrorCode::DigestInvalid,
        ),
        (
            "/v2/a/blobs/latest",
            None,
            StatusCode::BAD_REQUEST,
            ErrorCode::DigestInvalid,
        ),
        (
            "/v2/a/manifests/-bad",
            None,
            StatusCode::BAD_REQUEST,
            ErrorCode::ManifestInvalid,
        ),
        (
            "/v2/a/manifests/v1",
            Some("ns=a%20b"),
            StatusCode::BAD_REQUEST,
            ErrorCode::NameInvalid,
        ),
        (
            "/v2/a/manifests/v1",
            Some("ns=a&ns=b"),
            StatusCode::BAD_REQUEST,
            ErrorCode::NameInvalid,
        ),
        (
            "/v2/a/tags/list",
            None,
            StatusCode::NOT_FOUND,
            ErrorCode::Unsupported,
        ),
        (
            "/v2/a/blobs/uploads/",
            None,
            StatusCode::NOT_FOUND,
            ErrorCode::Unsupported,
        ),
        (
            "/v1/a/blobs/x",
            None,
            StatusCode::NOT_FOUND,
            ErrorCode::Unsupported,
        ),
        ("/", None, StatusCode::NOT_FOUND, ErrorCode::Unsupported),
    ];
    for (path, q, status, code) in cases {
        let e = route(path, *q).expect_err(path);
        assert_eq!(
            (e.status, e.code),
            (*status, *code),
            "{path} {q:?}: {}",
            e.message
        );
    }
}

#[test]
fn error_responses_are_oci_json() {
    let resp = ApiError::new(StatusCode::NOT_FOUND, ErrorCode::BlobUnknown, "gone").response(false);
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(
        resp.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
}
