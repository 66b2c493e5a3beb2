use std::time::{Duration, SystemTime};

use super::*;
use crate::telemetry::Metrics;

fn key() -> EcrAuth {
    EcrAuth {
        region: "us-east-1".into(),
        account: Some("123456789012".into()),
        endpoint: None,
        role_arn: None,
        fips: false,
    }
}

fn cache(source: Arc<MemoryTokenSource>) -> (EcrCredentials, IntCounterVec) {
    let fetches = Metrics::new(&prometheus::Registry::new())
        .unwrap()
        .ecr_token_fetches;
    (EcrCredentials::new(key(), source, fetches.clone()), fetches)
}

fn pw(c: &Credentials) -> &str {
    assert_eq!(c.username, "AWS");
    &c.password
}

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn ecr_host_names() {
    let h = parse_host("123456789012.dkr.ecr.us-east-1.amazonaws.com").unwrap();
    assert_eq!(
        h,
        EcrHost {
            account: "123456789012".into(),
            region: "us-east-1".into(),
            fips: false
        }
    );
    let h = parse_host("123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com").unwrap();
    assert!(h.fips);
    assert_eq!(h.region, "us-gov-west-1");
    let h = parse_host("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn").unwrap();
    assert_eq!(h.region, "cn-north-1");
    for not_ecr in [
        "docker.io",
        "127.0.0.1:5000",
        "public.ecr.aws",
        "12345678901.dkr.ecr.us-east-1.amazonaws.com",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com:443",
        "123456789012.dkr.ecr.useast1.amazonaws.com",
        "123456789012.dkr.ecr.us-east-1.amazonaws.org",
        "123456789012.api.ecr.us-east-1.amazonaws.com",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.test",
    ] {
        assert!(parse_host(not_ecr).is_none(), "{not_ecr}");
    }
    assert!(valid_region("eu-central-2"));
    assert!(!valid_region("US-EAST-1"));
    assert!(!valid_region("us-east-"));
    assert!(!valid_region("us-east-0"));
}

#[test]
fn tokens_decode_to_basic_credentials() {
    // What moto and ECR hand out: base64 of `AWS:<password>`.
    let c = decode_token("QVdTOjEyMzQ1Njc4OTAxMi1hdXRoLXRva2Vu").unwrap();
    assert_eq!(c.username, "AWS");
    assert_eq!(c.password, "123456789012-auth-token");
    assert!(decode_token("not base64!").is_none());
    assert!(decode_token("QVdT").is_none(), "no colon");
}

#[test]
fn errors_are_one_line_with_advice() {
    let e = EcrError::new(EcrErrorKind::NoCredentials, &key(), "chain\nempty");
    let line = e.to_string();
    assert!(!line.contains('\n'));
    assert!(line.contains("account 123456789012 in us-east-1"), "{line}");
    assert!(line.contains("no AWS credentials found"), "{line}");
    assert!(line.contains("IRSA"), "{line}");
    let e = EcrError::new(EcrErrorKind::Denied, &key(), "x");
    assert!(e.to_string().contains("ecr:GetAuthorizationToken"));
}

/// A token is reused until half its lifetime has passed, then replaced.
#[tokio::test(start_paused = true)]
async fn tokens_are_cached_and_refreshed_well_before_expiry() {
    let src = MemoryTokenSource::with_token("one", Some(SystemTime::now() + 12 * HOUR));
    let (c, fetches) = cache(src.clone());
    assert_eq!(pw(&c.current().await.unwrap()), "one");
    assert_eq!(pw(&c.current().await.unwrap()), "one");
    assert_eq!(src.calls(), 1);
    tokio::time::advance(5 * HOUR).await;
    c.current().await.unwrap();
    assert_eq!(src.calls(), 1);
    src.set_token("two", Some(SystemTime::now() + 12 * HOUR));
    tokio::time::advance(HOUR + Duration::from_secs(1)).await;
    assert_eq!(pw(&c.current().await.unwrap()), "two");
    assert_eq!(src.calls(), 2);
    assert_eq!(fetches.with_label_values(&["initial", "ok"]).get(), 1);
    assert_eq!(fetches.with_label_values(&["expiring", "ok"]).get(), 1);
}

/// While a due refresh fails, the old token stays in use (it has not
/// expired yet), and the source is asked again only after the interval.
#[tokio::test(start_paused = true)]
async fn a_failed_refresh_keeps_the_old_token() {
    let src = MemoryTokenSource::with_token("one", Some(SystemTime::now() + 12 * HOUR));
    let (c, _) = cache(src.clone());
    c.current().await.unwrap();
    src.set_error(EcrErrorKind::Throttled);
    tokio::time::advance(7 * HOUR).await;
    assert_eq!(pw(&c.current().await.unwrap()), "one");
    assert_eq!(pw(&c.current().await.unwrap()), "one");
    assert_eq!(src.calls(), 2, "one failed refresh, then the old token");
    tokio::time::advance(MIN_REFRESH_INTERVAL).await;
    c.current().await.unwrap();
    assert_eq!(src.calls(), 3);
}

/// moto's `expiresAt` is 2015-01-01: such a token is used until the
/// registry refuses it, not refetched on every request.
#[tokio::test(start_paused = true)]
async fn an_already_expired_token_is_used_until_refused() {
    let past = SystemTime::UNIX_EPOCH + Duration::from_secs(1_420_070_400);
    let src = MemoryTokenSource::with_token("old", Some(past));
    let (c, _) = cache(src.clone());
    let got = c.current().await.unwrap();
    tokio::time::advance(48 * HOUR).await;
    assert_eq!(c.current().await.unwrap(), got);
    assert_eq!(src.calls(), 1);
    src.set_token("new", Some(past));
    assert_eq!(pw(&c.refresh(&got).await.unwrap().unwrap()), "new");
    assert_eq!(src.calls(), 2);
}

/// A refused token is replaced at once, but at most once per interval: a
/// registry that keeps refusing cannot make the daemon hammer AWS.
#[tokio::test(start_paused = true)]
async fn forced_refreshes_are_rate_limited() {
    let src = MemoryTokenSource::with_token("one", None);
    let (c, fetches) = cache(src.clone());
    let one = c.current().await.unwrap();
    src.set_token("two", None);
    let two = c.refresh(&one).await.unwrap().unwrap();
    assert_eq!(pw(&two), "two", "the first refresh happens at once");
    assert_eq!(src.calls(), 2);

    // Still refused: within the interval nothing is fetched, and the
    // caller gets nothing new (so it gives up).
    src.set_token("three", None);
    for _ in 0..100 {
        assert_eq!(c.refresh(&two).await.unwrap(), None);
    }
    tokio::time::advance(MIN_REFRESH_INTERVAL - Duration::from_millis(1)).await;
    assert_eq!(c.refresh(&two).await.unwrap(), None);
    assert_eq!(src.calls(), 2);

    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(pw(&c.refresh(&two).await.unwrap().unwrap()), "three");
    assert_eq!(src.calls(), 3);
    assert_eq!(fetches.with_label_values(&["unauthorized", "ok"]).get(), 2);
}

/// Requests that were refused with the same token while another request
/// refreshed it get the new token without another fetch.
#[tokio::test(start_paused = true)]
async fn concurrent_refusals_share_one_refresh() {
    let src = MemoryTokenSource::with_token("one", None);
    let (c, _) = cache(src.clone());
    let c = Arc::new(c);
    let one = c.current().await.unwrap();
    src.set_token("two", None);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (c, one) = (c.clone(), one.clone());
            tokio::spawn(async move { c.refresh(&one).await.unwrap().unwrap() })
        })
        .collect();
    for t in tasks {
        assert_eq!(pw(&t.await.unwrap()), "two");
    }
    assert_eq!(src.calls(), 2);
}

/// Without credentials every request fails fast with the remembered error;
/// AWS is asked again only once the interval has passed.
#[tokio::test(start_paused = true)]
async fn failures_are_remembered_for_the_interval() {
    let src = Arc::new(MemoryTokenSource::default());
    src.set_error(EcrErrorKind::NoCredentials);
    let (c, fetches) = cache(src.clone());
    for _ in 0..50 {
        let e = c.current().await.unwrap_err();
        assert_eq!(e.kind, EcrErrorKind::NoCredentials);
    }
    assert_eq!(src.calls(), 1);
    assert_eq!(
        fetches
            .with_label_values(&["initial", "no_credentials"])
            .get(),
        1
    );
    tokio::time::advance(MIN_REFRESH_INTERVAL).await;
    src.set_token("late", None);
    assert_eq!(pw(&c.current().await.unwrap()), "late");
    assert_eq!(src.calls(), 2);
}
