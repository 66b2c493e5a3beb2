//! IMDSv2 discovery against a local stand-in for 169.254.169.254.

mod support;

use std::time::{Duration, Instant};

use hostsd::imds::{discover, Identity};
use support::{Response, Server};

const TOKEN: &str = "AQAEAFake-token==";

/// A fake IMDS: a token for a PUT with a TTL header, and answers only to
/// requests that present it, as IMDSv2 does.
fn imds(region: &'static str, doc: &'static str) -> Server {
    Server::start(move |r| match (r.method.as_str(), r.target.as_str()) {
        ("PUT", "/latest/api/token") => match r.header("X-aws-ec2-metadata-token-ttl-seconds") {
            Some(_) => Response::new(200, TOKEN),
            None => Response::new(400, ""),
        },
        ("GET", _) if r.header("X-aws-ec2-metadata-token") != Some(TOKEN) => Response::new(401, ""),
        ("GET", "/latest/meta-data/placement/region") => Response::new(200, region),
        ("GET", "/latest/dynamic/instance-identity/document") => Response::new(200, doc),
        _ => Response::new(404, ""),
    })
}

const DOC: &str = r#"{"accountId":"123456789012","region":"eu-west-1","instanceId":"i-0abc"}"#;

#[test]
fn discovers_account_and_region_with_a_token() {
    let s = imds("eu-west-1", DOC);
    let id = discover(&s.url(), Duration::from_secs(2)).unwrap();
    assert_eq!(
        id,
        Identity {
            account_id: "123456789012".into(),
            region: "eu-west-1".into()
        }
    );
    let reqs = s.requests();
    assert_eq!(reqs[0].method, "PUT", "the token comes first");
    assert!(reqs[1..]
        .iter()
        .all(|r| r.header("X-aws-ec2-metadata-token") == Some(TOKEN)));
}

#[test]
fn failures_name_the_step() {
    struct Case {
        name: &'static str,
        region: &'static str,
        doc: &'static str,
        want: &'static str,
    }
    let cases = [
        Case {
            name: "no accountId",
            region: "eu-west-1",
            doc: r#"{"region":"eu-west-1"}"#,
            want: "no accountId",
        },
        Case {
            name: "not JSON",
            region: "eu-west-1",
            doc: "<html>",
            want: "not JSON",
        },
        Case {
            name: "regions disagree",
            region: "us-east-1",
            doc: DOC,
            want: "disagrees",
        },
        Case {
            name: "malformed account",
            region: "eu-west-1",
            doc: r#"{"accountId":"12","region":"eu-west-1"}"#,
            want: "12 digits",
        },
    ];
    for c in cases {
        let s = imds(c.region, c.doc);
        let err = discover(&s.url(), Duration::from_secs(2)).unwrap_err();
        assert_eq!(err.kind(), hostsd::ErrorKind::Discovery, "{}", c.name);
        assert!(err.to_string().contains(c.want), "{}: {err}", c.name);
    }
}

#[test]
fn imdsv1_only_or_forbidden_token_is_an_error() {
    let s = Server::start(|_| Response::new(403, ""));
    let err = discover(&s.url(), Duration::from_secs(2))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("IMDSv2 token") && err.contains("HTTP 403"),
        "{err}"
    );
}

#[test]
fn silence_times_out_fast_with_the_hop_limit_hint() {
    let s = Server::silent();
    let t = Instant::now();
    let err = discover(&s.url(), Duration::from_millis(300))
        .unwrap_err()
        .to_string();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(err.contains("hop limit"), "{err}");
}

#[test]
fn reconcile_routes_the_discovered_registry() {
    let s = imds(
        "us-west-2",
        r#"{"accountId":"210987654321","region":"us-west-2"}"#,
    );
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs.d");
    let mut opts = hostsd::ReconcileOptions {
        containerd_config: tmp.path().join("none.toml"),
        certs_dir: Some(certs.clone()),
        ..Default::default()
    };
    opts.ecr.discover = true;
    opts.ecr.fips = true;
    opts.ecr.imds_endpoint = s.url();
    let r = hostsd::reconcile(&opts).unwrap();
    let mut regs: Vec<&str> = r.files.iter().map(|f| f.registry.as_str()).collect();
    regs.sort();
    assert_eq!(
        regs,
        [
            "210987654321.dkr.ecr-fips.us-west-2.amazonaws.com",
            "210987654321.dkr.ecr.us-west-2.amazonaws.com"
        ]
    );
    assert!(certs
        .join("210987654321.dkr.ecr.us-west-2.amazonaws.com/hosts.toml")
        .exists());
    assert!(r
        .warnings
        .iter()
        .any(|w| w.contains("account 210987654321 in us-west-2")));
}
