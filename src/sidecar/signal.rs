//! The scaling signal: one number, read the way KEDA reads it, and the
//! replicas KEDA will want for it.
//!
//! - Prometheus: `GET <server>/api/v1/query?query=...`. An instant vector
//!   with one series, or a scalar, gives the value; no series, several
//!   series (KEDA refuses those too), NaN or an infinity is an error, never
//!   a value: the caller holds its last intent rather than guess.
//! - A metrics URL: a Prometheus text page, parsed with `prometheus-parse`;
//!   the value is the sum of the metric's samples that carry the labels.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::config::{Scaling, SidecarConfig, SignalSource};

/// Largest answer read from a source: a signal is one number, and a page
/// of metrics that big is a mistake.
const MAX_BODY: usize = 16 << 20;

/// Why the signal has no value this time.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SignalError {
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url} answered HTTP {status}: {body}")]
    HttpStatus {
        url: String,
        status: u16,
        body: String,
    },
    /// Prometheus said no (`bad_data` is a query it cannot parse).
    #[error("Prometheus refused the query ({error_type}): {error}")]
    Refused { error_type: String, error: String },
    #[error("{0}")]
    Empty(String),
    #[error("the value is NaN")]
    NaN,
    #[error("the value is {0} (infinite)")]
    Infinite(f64),
    #[error("the query returned {0} series; KEDA needs exactly one (wrap it in sum(...))")]
    Multiple(usize),
    #[error("cannot read the answer: {0}")]
    Malformed(String),
}

impl SignalError {
    /// The `reason` label of `damselfly_sidecar_signal_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            SignalError::Unreachable { .. } => "unreachable",
            SignalError::HttpStatus { .. } => "http_status",
            SignalError::Refused { .. } => "refused",
            SignalError::Empty(_) => "empty",
            SignalError::NaN => "nan",
            SignalError::Infinite(_) => "infinite",
            SignalError::Multiple(_) => "multiple",
            SignalError::Malformed(_) => "malformed",
        }
    }

    /// A query Prometheus cannot run: a config error, not a passing one.
    pub fn is_bad_query(&self) -> bool {
        matches!(self, SignalError::Refused { error_type, .. } if error_type == "bad_data")
    }
}

/// The replicas KEDA wants for `value`, with its default `AverageValue`
/// metric: `ceil(value / threshold)`, whatever the current count, clamped
/// to `min..=max`; at or below the activation threshold, `min` (zero for a
/// workload that scales to zero).
pub fn wanted_replicas(value: f64, s: &Scaling) -> u32 {
    if value.is_nan() || value <= s.activation_threshold {
        return s.min_replicas;
    }
    let n = (value / s.threshold).ceil();
    let n = if n >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        n as u32
    };
    n.clamp(s.min_replicas.max(1), s.max_replicas.max(1))
}

/// Reads the signal (and the current replicas) from the configured source.
#[derive(Clone)]
pub struct Signal {
    client: reqwest::Client,
    source: SignalSource,
    current_query: Option<String>,
}

impl Signal {
    pub fn new(cfg: &SidecarConfig) -> Result<Signal, String> {
        let client = reqwest::Client::builder()
            .timeout(cfg.query_timeout)
            .connect_timeout(cfg.query_timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Signal {
            client,
            source: cfg.source.clone(),
            current_query: cfg.current_query.clone(),
        })
    }

    /// Where the value comes from, for status and logs.
    pub fn describe(&self) -> (String, String) {
        match &self.source {
            SignalSource::Prometheus { server, query } => (server.to_string(), query.clone()),
            SignalSource::MetricsUrl {
                url,
                metric,
                labels,
            } => (url.to_string(), selector(metric, labels)),
        }
    }

    /// The signal's value now.
    pub async fn value(&self) -> Result<f64, SignalError> {
        match &self.source {
            SignalSource::Prometheus { server, query } => self.prometheus(server, query).await,
            SignalSource::MetricsUrl {
                url,
                metric,
                labels,
            } => {
                let text = self.get_text(url.clone()).await?;
                finite(metric_sum(&text, metric, labels)?)
            }
        }
    }

    /// The replicas that exist now, when `sidecar.current_query` says how
    /// to know; `None` without one.
    pub async fn current(&self) -> Option<Result<u32, SignalError>> {
        let (SignalSource::Prometheus { server, .. }, Some(q)) =
            (&self.source, &self.current_query)
        else {
            return None;
        };
        Some(
            self.prometheus(server, q)
                .await
                .map(|v| v.max(0.0).round().min(f64::from(u32::MAX)) as u32),
        )
    }

    /// The current-replicas query alone (for the start-up check).
    pub fn has_current(&self) -> bool {
        self.current_query.is_some()
    }

    async fn prometheus(&self, server: &Url, query: &str) -> Result<f64, SignalError> {
        let mut url = server.clone();
        url.path_segments_mut()
            .map_err(|_| SignalError::Malformed(format!("{server} cannot be a base URL")))?
            .pop_if_empty()
            .extend(["api", "v1", "query"]);
        url.query_pairs_mut().append_pair("query", query);
        let shown = format!("{server}");
        let (status, body) = self.get(url, &shown).await?;
        // Prometheus answers errors as JSON too (400 bad_data, 422
        // execution, 503 timeout); anything else is not Prometheus.
        match serde_json::from_slice::<PromResponse>(&body) {
            Ok(r) => parse_prometheus(r),
            Err(_) if !status.is_success() => Err(SignalError::HttpStatus {
                url: shown,
                status: status.as_u16(),
                body: snippet(&body),
            }),
            Err(e) => Err(SignalError::Malformed(format!(
                "not a Prometheus API answer: {e}"
            ))),
        }
    }

    async fn get_text(&self, url: Url) -> Result<String, SignalError> {
        let shown = url.to_string();
        let (status, body) = self.get(url, &shown).await?;
        if !status.is_success() {
            return Err(SignalError::HttpStatus {
                url: shown,
                status: status.as_u16(),
                body: snippet(&body),
            });
        }
        String::from_utf8(body).map_err(|_| SignalError::Malformed("the page is not UTF-8".into()))
    }

    /// The status and the body (at most [`MAX_BODY`]); `shown` names the
    /// URL in errors.
    async fn get(
        &self,
        url: Url,
        shown: &str,
    ) -> Result<(reqwest::StatusCode, Vec<u8>), SignalError> {
        let resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| unreachable(shown, &e))?;
        let status = resp.status();
        Ok((status, read_limited(resp, shown).await?))
    }
}

fn unreachable(url: &str, e: &reqwest::Error) -> SignalError {
    let mut reason = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        reason.push_str(": ");
        reason.push_str(&c.to_string());
        cur = c.source();
    }
    if e.is_timeout() {
        reason.push_str(" (sidecar.query_timeout)");
    }
    SignalError::Unreachable {
        url: url.to_owned(),
        reason,
    }
}

async fn read_limited(mut resp: reqwest::Response, url: &str) -> Result<Vec<u8>, SignalError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| unreachable(url, &e))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(SignalError::Malformed(format!(
                "the answer is larger than {} MiB",
                MAX_BODY >> 20
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)])
        .trim()
        .to_owned()
}

#[derive(Deserialize)]
struct PromResponse {
    status: String,
    #[serde(default)]
    data: Option<PromData>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct PromData {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct VectorSample {
    value: (serde_json::Value, String),
}

fn parse_prometheus(r: PromResponse) -> Result<f64, SignalError> {
    if r.status != "success" {
        return Err(SignalError::Refused {
            error_type: r.error_type.unwrap_or_else(|| "unknown".into()),
            error: r.error.unwrap_or_default(),
        });
    }
    let data = r
        .data
        .ok_or_else(|| SignalError::Malformed("a success without data".into()))?;
    let text = match data.result_type.as_str() {
        "vector" => {
            let samples: Vec<VectorSample> = serde_json::from_value(data.result)
                .map_err(|e| SignalError::Malformed(format!("vector: {e}")))?;
            match samples.len() {
                0 => {
                    return Err(SignalError::Empty(
                        "the query returned no series (`... or vector(0)` gives 0 instead)".into(),
                    ))
                }
                1 => samples.into_iter().next().map(|s| s.value.1),
                n => return Err(SignalError::Multiple(n)),
            }
        }
        "scalar" => {
            let (_, v): (serde_json::Value, String) = serde_json::from_value(data.result)
                .map_err(|e| SignalError::Malformed(format!("scalar: {e}")))?;
            Some(v)
        }
        other => {
            return Err(SignalError::Malformed(format!(
                "a {other} result; the query must give an instant vector or a scalar"
            )))
        }
    };
    finite(parse_float(text.as_deref().unwrap_or_default())?)
}

/// Prometheus' float text: Go's `NaN`, `+Inf`, `-Inf`, or a number.
fn parse_float(s: &str) -> Result<f64, SignalError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "nan" => Ok(f64::NAN),
        "+inf" | "inf" => Ok(f64::INFINITY),
        "-inf" => Ok(f64::NEG_INFINITY),
        t => t
            .parse()
            .map_err(|_| SignalError::Malformed(format!("{s:?} is not a number"))),
    }
}

fn finite(v: f64) -> Result<f64, SignalError> {
    if v.is_nan() {
        Err(SignalError::NaN)
    } else if v.is_infinite() {
        Err(SignalError::Infinite(v))
    } else {
        Ok(v)
    }
}

/// `name{a="b"}`, for messages.
fn selector(metric: &str, labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return metric.to_owned();
    }
    let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{metric}{{{}}}", l.join(","))
}

/// The sum of `metric`'s samples on a text page whose labels include
/// `labels`.
pub fn metric_sum(
    text: &str,
    metric: &str,
    labels: &BTreeMap<String, String>,
) -> Result<f64, SignalError> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines)
        .map_err(|e| SignalError::Malformed(format!("not a Prometheus text page: {e}")))?;
    let mut found = 0usize;
    let mut sum = 0.0;
    for s in scrape.samples.iter().filter(|s| s.metric == metric) {
        if !labels
            .iter()
            .all(|(k, v)| s.labels.get(k) == Some(v.as_str()))
        {
            continue;
        }
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => {
                return Err(SignalError::Malformed(format!(
                    "{metric} is a histogram or summary; name one of its series (`{metric}_sum`)"
                )))
            }
        };
        found += 1;
        sum += v;
    }
    if found == 0 {
        return Err(SignalError::Empty(format!(
            "the page has no sample of {}",
            selector(metric, labels)
        )));
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(threshold: f64, activation: f64, min: u32, max: u32) -> Scaling {
        Scaling {
            threshold,
            activation_threshold: activation,
            min_replicas: min,
            max_replicas: max,
        }
    }

    #[test]
    fn replicas_are_kedas_average_value_arithmetic() {
        let k = s(5.0, 0.0, 0, 10);
        // The issue's example: queue depth 12, threshold 5.
        assert_eq!(wanted_replicas(12.0, &k), 3);
        assert_eq!(wanted_replicas(0.0, &k), 0);
        assert_eq!(wanted_replicas(0.1, &k), 1);
        assert_eq!(wanted_replicas(5.0, &k), 1);
        assert_eq!(wanted_replicas(5.0001, &k), 2);
        assert_eq!(wanted_replicas(10.0, &k), 2);
        assert_eq!(wanted_replicas(1e9, &k), 10);
        assert_eq!(wanted_replicas(f64::MAX, &k), 10);
        assert_eq!(wanted_replicas(-3.0, &k), 0);
        // Activation: at or below it the workload stays at zero.
        let a = s(5.0, 2.0, 0, 10);
        assert_eq!(wanted_replicas(2.0, &a), 0);
        assert_eq!(wanted_replicas(2.5, &a), 1);
        // A floor above zero holds whatever the value.
        let floor = s(5.0, 0.0, 2, 4);
        assert_eq!(wanted_replicas(0.0, &floor), 2);
        assert_eq!(wanted_replicas(6.0, &floor), 2);
        assert_eq!(wanted_replicas(16.0, &floor), 4);
        assert_eq!(wanted_replicas(f64::NAN, &floor), 2);
        // Fractional thresholds.
        assert_eq!(wanted_replicas(1.0, &s(0.3, 0.0, 0, 100)), 4);
    }

    fn prom(json: &str) -> Result<f64, SignalError> {
        parse_prometheus(serde_json::from_str(json).unwrap())
    }

    #[test]
    fn prometheus_answers_as_prometheus_2_writes_them() {
        // Captured from Debian's prometheus 2.42.
        assert_eq!(
            prom(
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1796596235.391,"12"]}]}}"#
            ),
            Ok(12.0)
        );
        assert_eq!(
            prom(
                r#"{"status":"success","data":{"resultType":"scalar","result":[1796596230.259,"3.5"]}}"#
            ),
            Ok(3.5)
        );
        assert!(matches!(
            prom(r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#),
            Err(SignalError::Empty(_))
        ));
        assert_eq!(
            prom(
                r#"{"status":"success","data":{"resultType":"scalar","result":[1796596230.259,"NaN"]}}"#
            ),
            Err(SignalError::NaN)
        );
        assert_eq!(
            prom(r#"{"status":"success","data":{"resultType":"scalar","result":[1,"+Inf"]}}"#),
            Err(SignalError::Infinite(f64::INFINITY))
        );
        assert_eq!(
            prom(
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"a":"1"},"value":[1,"1"]},{"metric":{"a":"2"},"value":[1,"2"]}]}}"#
            ),
            Err(SignalError::Multiple(2))
        );
        assert!(matches!(
            prom(r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#),
            Err(SignalError::Malformed(_))
        ));
        let bad = prom(r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:6: parse error: unclosed left parenthesis"}"#)
            .unwrap_err();
        assert!(bad.is_bad_query(), "{bad}");
        assert!(bad.to_string().contains("unclosed left parenthesis"));
        let timeout = prom(r#"{"status":"error","errorType":"timeout","error":"query timed out"}"#)
            .unwrap_err();
        assert!(!timeout.is_bad_query());
        assert_eq!(timeout.reason(), "refused");
    }

    #[test]
    fn a_metrics_page_sums_the_samples_with_the_labels() {
        let page = "# HELP gpu_job_queue_depth Jobs waiting.\n\
                    # TYPE gpu_job_queue_depth gauge\n\
                    gpu_job_queue_depth{queue=\"a10g\"} 7\n\
                    gpu_job_queue_depth{queue=\"a10g\",shard=\"2\"} 5\n\
                    gpu_job_queue_depth{queue=\"h100\"} 100\n\
                    other_metric 3\n";
        let none = BTreeMap::new();
        assert_eq!(metric_sum(page, "gpu_job_queue_depth", &none), Ok(112.0));
        let a10g: BTreeMap<String, String> = [("queue".to_owned(), "a10g".to_owned())].into();
        assert_eq!(metric_sum(page, "gpu_job_queue_depth", &a10g), Ok(12.0));
        let l4: BTreeMap<String, String> = [("queue".to_owned(), "l4".to_owned())].into();
        let e = metric_sum(page, "gpu_job_queue_depth", &l4).unwrap_err();
        assert!(e.to_string().contains("queue=\"l4\""), "{e}");
        assert!(matches!(
            metric_sum(page, "absent", &none),
            Err(SignalError::Empty(_))
        ));
        assert_eq!(
            metric_sum("x NaN\n", "x", &none).and_then(finite),
            Err(SignalError::NaN)
        );
    }
}
