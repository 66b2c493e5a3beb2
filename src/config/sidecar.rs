//! `[sidecar]`: the scaling sidecar (`damselfly sidecar`). It evaluates the
//! autoscaler's signal (the same Prometheus query a KEDA ScaledObject uses,
//! or a metric on a plain `/metrics` URL), computes the replicas KEDA will
//! want, and publishes a warm intent for the workload's images over the
//! swarm (`[swarm]`: the cluster key and bootstrap, like a daemon's).
//!
//! Without a `[sidecar]` table [`Config::sidecar`](super::Config) is `None`
//! and `damselfly sidecar` refuses to start, naming the key. Defaults are
//! read from [`KEYS`](super::KEYS) by the `Validator`'s readers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use toml::{Table, Value};
use url::Url;

use super::{GpuSelector, Validator};
use crate::oci::ImageRef;

/// Where the signal comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum SignalSource {
    /// Prometheus' `/api/v1/query` at `server` (KEDA's `serverAddress`).
    Prometheus { server: Url, query: String },
    /// A Prometheus text exposition page; the value is the sum of every
    /// sample of `metric` whose labels include `labels`.
    MetricsUrl {
        url: Url,
        metric: String,
        labels: BTreeMap<String, String>,
    },
}

/// KEDA's scaling parameters, as in the ScaledObject's trigger and spec.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scaling {
    /// The trigger's `threshold`: the value one replica handles.
    pub threshold: f64,
    /// `activationThreshold`: at or below it a workload at zero stays there.
    pub activation_threshold: f64,
    /// `minReplicaCount`, `maxReplicaCount`.
    pub min_replicas: u32,
    pub max_replicas: u32,
}

#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// The intent's id: `namespace/deployment`.
    pub workload: String,
    pub images: Vec<ImageRef>,
    pub source: SignalSource,
    pub scaling: Scaling,
    /// A PromQL query for the replicas that exist now (needs a Prometheus
    /// source).
    pub current_query: Option<String>,
    pub poll_interval: Duration,
    pub query_timeout: Duration,
    pub cooldown: Duration,
    pub intent_ttl: Duration,
    pub republish: Duration,
    pub listen: SocketAddr,
    /// `None`: every node.
    pub gpu: Option<GpuSelector>,
}

impl Validator {
    pub(super) fn sidecar(&mut self, t: &Table, swarm_enabled: bool) -> Option<SidecarConfig> {
        const S: &str = "sidecar";
        let workload = match self.opt_string(t, S, "workload") {
            Some(w) if valid_workload_id(&w) => w,
            Some(w) => {
                self.issue(
                    "sidecar.workload",
                    &format!("{w:?}: {WORKLOAD_ID_GRAMMAR} (e.g. \"inference/llm\")"),
                );
                String::new()
            }
            None => {
                if !t.contains_key("workload") {
                    self.issue(
                        "sidecar.workload",
                        "is required: the workload the images are for, \"namespace/deployment\"",
                    );
                }
                String::new()
            }
        };
        let images = self.rule_images(t, S);
        let source = self.signal_source(t);
        let current_query = self.opt_string(t, S, "current_query");
        let current_query = current_query.filter(|q| {
            if q.trim().is_empty() {
                self.issue("sidecar.current_query", "must not be empty");
            }
            matches!(source, Some(SignalSource::Prometheus { .. }))
        });
        let threshold = match self.number(t, S, "threshold") {
            Some(v) if v > 0.0 => v,
            Some(v) => {
                self.issue(
                    "sidecar.threshold",
                    &format!("must be greater than zero, not {v}"),
                );
                1.0
            }
            None => {
                if !t.contains_key("threshold") {
                    self.issue(
                        "sidecar.threshold",
                        "is required: the value one replica handles (the ScaledObject trigger's threshold)",
                    );
                }
                1.0
            }
        };
        let activation_threshold = self
            .number(t, S, "activation_threshold")
            .or_else(|| self.keys_default(S, "activation_threshold", str::parse::<f64>))
            .unwrap_or_default();
        let min_replicas = self.integer(t, S, "min_replicas", 0..=100_000) as u32;
        let max_replicas = self.integer(t, S, "max_replicas", 0..=100_000) as u32;
        if max_replicas == 0 {
            self.issue("sidecar.max_replicas", "must be at least 1");
        } else if min_replicas > max_replicas {
            self.issue(
                "sidecar.min_replicas",
                &format!("{min_replicas} is more than sidecar.max_replicas ({max_replicas})"),
            );
        }
        let poll_interval = self.duration(t, S, "poll_interval");
        let query_timeout = self.duration(t, S, "query_timeout");
        let cooldown = self.duration(t, S, "cooldown");
        let intent_ttl = self.duration(t, S, "intent_ttl");
        let republish = self.duration(t, S, "republish");
        for (key, v) in [
            ("poll_interval", poll_interval),
            ("query_timeout", query_timeout),
            ("republish", republish),
        ] {
            if v < Duration::from_millis(100) {
                self.issue(&format!("sidecar.{key}"), "must be at least 100ms");
            }
        }
        if intent_ttl < republish * 2 {
            self.issue(
                "sidecar.intent_ttl",
                &format!(
                    "must be at least twice sidecar.republish ({}), or a live intent can expire between two publications",
                    humantime::format_duration(republish)
                ),
            );
        }
        if intent_ttl < poll_interval * 2 {
            self.issue(
                "sidecar.intent_ttl",
                "must be at least twice sidecar.poll_interval, or a live intent can expire between two polls",
            );
        }
        let listen = self.addr(t, S, "listen");
        let gpu = match t.get("gpu") {
            None => None,
            Some(Value::Table(g)) => {
                self.check_keys(g, "sidecar.gpu", "sidecar.gpu");
                Some(self.selector(g, "sidecar.gpu"))
            }
            Some(other) => {
                self.issue(
                    "sidecar.gpu",
                    &format!("must be a table ([sidecar.gpu]), not {}", other.type_str()),
                );
                None
            }
        };
        if !swarm_enabled {
            self.issue(
                "sidecar",
                "the sidecar publishes over the swarm: [swarm] needs cluster_key_file and bootstrap (as on the daemons)",
            );
        }
        Some(SidecarConfig {
            workload,
            images,
            source: source?,
            scaling: Scaling {
                threshold,
                activation_threshold,
                min_replicas,
                max_replicas,
            },
            current_query,
            poll_interval,
            query_timeout,
            cooldown,
            intent_ttl,
            republish,
            listen,
            gpu,
        })
    }

    fn signal_source(&mut self, t: &Table) -> Option<SignalSource> {
        const S: &str = "sidecar";
        let wrote = |k: &str| t.contains_key(k);
        let kind = match self.opt_string(t, S, "source").as_deref() {
            Some("prometheus") => "prometheus",
            Some("metrics_url") => "metrics_url",
            Some(other) => {
                self.issue(
                    "sidecar.source",
                    &format!("must be \"prometheus\" or \"metrics_url\", not {other:?}"),
                );
                return None;
            }
            None => match (wrote("prometheus"), wrote("metrics_url")) {
                (true, false) => "prometheus",
                (false, true) => "metrics_url",
                (true, true) => {
                    self.issue(
                        "sidecar.source",
                        "is required when both sidecar.prometheus and sidecar.metrics_url are set: say which one the signal comes from",
                    );
                    return None;
                }
                (false, false) => {
                    self.issue(
                        "sidecar.prometheus",
                        "is required (or sidecar.metrics_url): where the scaling signal comes from",
                    );
                    return None;
                }
            },
        };
        // The other source's keys are not read; say so rather than fail, so
        // that switching sources is a one-line change.
        let unused: &[&str] = if kind == "prometheus" {
            &["metrics_url", "metric", "metric_labels"]
        } else {
            &["prometheus", "query", "current_query"]
        };
        for k in unused.iter().filter(|k| wrote(k)) {
            self.warn(
                &format!("sidecar.{k}"),
                &format!("is not used: the signal comes from sidecar.{kind}"),
            );
        }
        if kind == "prometheus" {
            let server = match self.opt_string(t, S, "prometheus") {
                Some(u) => self.http_url("sidecar.prometheus", &u),
                None => {
                    self.issue(
                        "sidecar.prometheus",
                        "is required with sidecar.source = \"prometheus\": Prometheus' address (the trigger's serverAddress)",
                    );
                    None
                }
            };
            let query = match self.opt_string(t, S, "query") {
                Some(q) if !q.trim().is_empty() => Some(q),
                Some(_) => {
                    self.issue("sidecar.query", "must not be empty");
                    None
                }
                None => {
                    self.issue(
                        "sidecar.query",
                        "is required with sidecar.prometheus: the ScaledObject's query, e.g. \"sum(gpu_job_queue_depth) or vector(0)\"",
                    );
                    None
                }
            };
            return Some(SignalSource::Prometheus {
                server: server?,
                query: query?,
            });
        }
        let url = match self.opt_string(t, S, "metrics_url") {
            Some(u) => self.http_url("sidecar.metrics_url", &u),
            None => {
                self.issue(
                    "sidecar.metrics_url",
                    "is required with sidecar.source = \"metrics_url\"",
                );
                None
            }
        };
        let metric = match self.opt_string(t, S, "metric") {
            Some(m) if valid_metric_name(&m) => Some(m),
            Some(m) => {
                self.issue(
                    "sidecar.metric",
                    &format!("{m:?} is not a Prometheus metric name"),
                );
                None
            }
            None => {
                self.issue(
                    "sidecar.metric",
                    "is required with sidecar.metrics_url: the metric to read, e.g. \"gpu_job_queue_depth\"",
                );
                None
            }
        };
        let labels = self.string_table(t, "sidecar.metric_labels", "metric_labels");
        Some(SignalSource::MetricsUrl {
            url: url?,
            metric: metric?,
            labels: labels.unwrap_or_default(),
        })
    }

    fn http_url(&mut self, key: &str, s: &str) -> Option<Url> {
        match Url::parse(s) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Some(u),
            Ok(_) => {
                self.issue(key, &format!("{s:?} is not an http(s) URL"));
                None
            }
            Err(e) => {
                self.issue(key, &format!("{s:?}: {e}"));
                None
            }
        }
    }

    /// An integer or a float.
    fn number(&mut self, t: &Table, section: &str, key: &str) -> Option<f64> {
        match t.get(key)? {
            Value::Integer(n) => Some(*n as f64),
            Value::Float(f) if f.is_finite() => Some(*f),
            other => {
                self.issue(
                    &format!("{section}.{key}"),
                    &format!("must be a finite number, not {other}"),
                );
                None
            }
        }
    }

    fn string_table(
        &mut self,
        t: &Table,
        path: &str,
        key: &str,
    ) -> Option<BTreeMap<String, String>> {
        match t.get(key)? {
            Value::Table(m) => {
                let mut out = BTreeMap::new();
                for (k, v) in m {
                    match v {
                        Value::String(s) if valid_label_name(k) => {
                            out.insert(k.clone(), s.clone());
                        }
                        Value::String(_) => {
                            self.issue(&format!("{path}.{k}"), "is not a Prometheus label name");
                        }
                        other => self.issue(
                            &format!("{path}.{k}"),
                            &format!("must be a string, not {}", other.type_str()),
                        ),
                    }
                }
                Some(out)
            }
            other => {
                self.issue(
                    path,
                    &format!(
                        "must be a table of label = \"value\", not {}",
                        other.type_str()
                    ),
                );
                None
            }
        }
    }
}

/// What a workload id may be, for messages.
pub const WORKLOAD_ID_GRAMMAR: &str =
    "a workload id is 1-253 letters, digits, '/', '.', '-' or '_'";

/// Whether `id` can name a workload (`namespace/deployment`): a warm
/// intent's id.
pub fn valid_workload_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 253
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'-' | b'_'))
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
fn valid_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`
fn valid_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{default_of, Config, ConfigError};

    /// A key file the swarm check can read.
    fn with_key(body: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("cluster.key");
        std::fs::write(&key, format!("{}\n", "ab".repeat(32))).unwrap();
        let text = format!(
            "[swarm]\ncluster_key_file = {:?}\nbootstrap = [\"/ip4/127.0.0.2/tcp/4003\"]\n{body}",
            key.display().to_string()
        );
        (dir, text)
    }

    fn parse(body: &str) -> Result<Config, ConfigError> {
        let (_dir, text) = with_key(body);
        Config::parse(&text, std::path::Path::new("/etc/damselfly/sidecar.toml"))
    }

    fn issues(body: &str) -> Vec<(String, String)> {
        match parse(body) {
            Err(ConfigError::Invalid { issues, .. }) => {
                issues.into_iter().map(|i| (i.path, i.message)).collect()
            }
            other => panic!("expected validation issues, got {other:?}"),
        }
    }

    const GOOD: &str = r#"
[sidecar]
workload = "inference/llm"
images = ["123456789012.dkr.ecr.us-east-1.amazonaws.com/llm:v3"]
prometheus = "http://prometheus-operated.monitoring.svc:9090"
query = "sum(gpu_job_queue_depth) or vector(0)"
threshold = 5
"#;

    #[test]
    fn a_minimal_sidecar_gets_the_documented_defaults() {
        let c = parse(GOOD).unwrap();
        let s = c.sidecar.expect("a sidecar");
        assert_eq!(s.workload, "inference/llm");
        assert_eq!(s.images.len(), 1);
        assert!(
            matches!(&s.source, SignalSource::Prometheus { query, .. } if query.starts_with("sum("))
        );
        assert_eq!(
            s.scaling,
            Scaling {
                threshold: 5.0,
                activation_threshold: 0.0,
                min_replicas: 0,
                max_replicas: 100,
            }
        );
        assert_eq!(s.poll_interval, Duration::from_secs(15));
        assert_eq!(s.query_timeout, Duration::from_secs(10));
        assert_eq!(s.cooldown, Duration::from_secs(300));
        assert_eq!(s.intent_ttl, Duration::from_secs(600));
        assert_eq!(s.republish, Duration::from_secs(30));
        assert_eq!(s.listen, "127.0.0.1:4010".parse().unwrap());
        assert!(s.gpu.is_none() && s.current_query.is_none());
        // A daemon's config has none.
        assert!(Config::defaults().unwrap().sidecar.is_none());
    }

    #[test]
    fn a_metrics_url_source_and_a_gpu_selector() {
        let c = parse(
            r#"
[sidecar]
workload = "jobs/worker"
images = ["reg.example.com/w:1", "reg.example.com/tok:2"]
metrics_url = "http://queue.jobs.svc:9100/metrics"
metric = "gpu_job_queue_depth"
metric_labels = { queue = "a10g" }
threshold = 2.5
activation_threshold = 1
min_replicas = 1
max_replicas = 10
[sidecar.gpu]
product = "*A10G*"
min_memory = 20
"#,
        )
        .unwrap();
        let s = c.sidecar.unwrap();
        match &s.source {
            SignalSource::MetricsUrl {
                url,
                metric,
                labels,
            } => {
                assert_eq!(url.as_str(), "http://queue.jobs.svc:9100/metrics");
                assert_eq!(metric, "gpu_job_queue_depth");
                assert_eq!(labels.get("queue").map(String::as_str), Some("a10g"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.scaling.threshold, 2.5);
        assert_eq!((s.scaling.min_replicas, s.scaling.max_replicas), (1, 10));
        let g = s.gpu.unwrap();
        assert!(g.product.unwrap().matches("NVIDIA A10G"));
        assert_eq!(g.min_memory, Some(20 << 30));
    }

    #[test]
    fn bad_sidecar_config_names_every_key() {
        let got = issues(
            r#"
[sidecar]
workload = "not a workload"
images = ["Bad/Ref"]
prometheus = "ftp://prometheus"
query = ""
metric = "x"
threshold = 0
min_replicas = 5
max_replicas = 2
poll_interval = "soon"
republish = "1m"
intent_ttl = "1m"
current_query = "  "
speed = 1
[sidecar.gpu]
product = "[x"
min_compute_capability = "8.0"
"#,
        );
        let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        for want in [
            "sidecar.workload",
            "sidecar.images[0]",
            "sidecar.prometheus",
            "sidecar.query",
            "sidecar.threshold",
            "sidecar.min_replicas",
            "sidecar.poll_interval",
            "sidecar.intent_ttl",
            "sidecar.current_query",
            "sidecar.speed",
            "sidecar.gpu.product",
            "sidecar.gpu.min_compute_capability",
        ] {
            assert!(paths.contains(&want), "missing {want} in {got:#?}");
        }
        let got = issues("[sidecar]\nthreshold = 1\n");
        let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        for want in ["sidecar.workload", "sidecar.images", "sidecar.prometheus"] {
            assert!(paths.contains(&want), "missing {want} in {got:#?}");
        }
        let both = "[sidecar]\nworkload = \"a/b\"\nimages = [\"r.example.com/a:1\"]\n\
                    prometheus = \"http://p:9090\"\nmetrics_url = \"http://q/metrics\"\n\
                    query = \"up\"\nmetric = \"up\"\nthreshold = 1\n";
        let got = issues(both);
        assert_eq!(got[0].0, "sidecar.source", "{got:?}");
        // Saying which one makes the other's keys a warning, not an error.
        let c = parse(&format!("{both}source = \"metrics_url\"\n")).unwrap();
        assert!(matches!(
            c.sidecar.unwrap().source,
            SignalSource::MetricsUrl { .. }
        ));
        let warned: Vec<&str> = c.warnings.iter().map(|w| w.path.as_str()).collect();
        assert_eq!(warned, ["sidecar.prometheus", "sidecar.query"]);
        // No swarm to publish on.
        let got = match Config::parse(GOOD, std::path::Path::new("s.toml")) {
            Err(ConfigError::Invalid { issues, .. }) => issues,
            other => panic!("{other:?}"),
        };
        assert_eq!(got[0].path, "sidecar", "{got:?}");
        assert!(got[0].message.contains("swarm"), "{got:?}");
    }

    #[test]
    fn every_default_read_from_keys_parses() {
        for k in [
            "poll_interval",
            "query_timeout",
            "cooldown",
            "intent_ttl",
            "republish",
        ] {
            humantime::parse_duration(default_of(&format!("sidecar.{k}")))
                .unwrap_or_else(|e| panic!("{k}: {e}"));
        }
        for k in ["min_replicas", "max_replicas"] {
            default_of(&format!("sidecar.{k}"))
                .parse::<u32>()
                .unwrap_or_else(|e| panic!("{k}: {e}"));
        }
        default_of("sidecar.activation_threshold")
            .parse::<f64>()
            .unwrap();
        default_of("sidecar.listen").parse::<SocketAddr>().unwrap();
    }
}
