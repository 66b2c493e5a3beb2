//! `damselfly bench pull`: pull an image through this node's mirror the way
//! containerd does, and say where every byte came from.
//!
//! A run resolves the tag (the same `Accept` list containerd sends), picks
//! the platform's manifest from an index, then fetches the config and the
//! layers a few at a time, hashing each body against its digest. Bytes by
//! source come from two places: each blob's `X-Damselfly-Source` header
//! (`local`, `peer`, `origin`), and the node's own counters, read from its
//! telemetry endpoint before and after the run, which split a blob whose
//! pieces came partly from peers and partly from the origin. A run marked
//! warm (`--expect-warm`) fails when the origin sent any blob byte.

pub mod cri;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use sha2::Digest as _;

use crate::admin::images::ImageRef;
use crate::oci::Digest;

/// What containerd sends when it resolves a tag.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("mirror at {url}: {reason}")]
    Mirror { url: String, reason: String },
    #[error("{what} does not match its digest {digest}: got {actual}")]
    Corrupt {
        what: String,
        digest: String,
        actual: String,
    },
    #[error("manifest {0}: {1}")]
    Manifest(String, String),
    #[error("CRI: {0}")]
    Cri(String),
}

/// How to run `bench pull`.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub image: ImageRef,
    /// `http://127.0.0.1:4001`.
    pub mirror: String,
    /// `http://127.0.0.1:4002/metrics`, when known.
    pub metrics: Option<String>,
    /// `os/arch[/variant]`.
    pub platform: String,
    /// Blobs fetched at once (containerd's default is 3).
    pub concurrency: usize,
}

/// One blob of one run.
#[derive(Debug, Clone, Serialize)]
pub struct BlobResult {
    pub digest: String,
    /// `config` or `layer`.
    pub kind: String,
    pub bytes: u64,
    /// The mirror's `X-Damselfly-Source`: `local`, `peer` or `origin`.
    pub source: String,
    pub ttfb_ms: f64,
    pub total_ms: f64,
}

/// Bytes by source over a run, from the node's counters.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Sources {
    pub local: u64,
    pub peer: u64,
    pub origin: u64,
}

/// One pull.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub run: u32,
    /// The image's blobs were evicted first.
    pub cold: bool,
    pub evicted: u64,
    pub resolve_ms: f64,
    /// From the first blob request to its first body byte.
    pub ttfb_ms: f64,
    pub total_ms: f64,
    pub bytes: u64,
    pub mib_per_s: f64,
    /// From the node's counters; `None` when they could not be read.
    pub sources: Option<Sources>,
    pub blobs: Vec<BlobResult>,
    /// containerd's own `PullImage`, when a CRI socket was given.
    pub cri_pull_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub pass: bool,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PullReport {
    pub image: String,
    pub manifest: String,
    pub platform: String,
    pub runs: Vec<RunResult>,
    pub verdict: Verdict,
}

/// The image's manifest and blobs, as resolved through the mirror.
pub struct Resolved {
    pub manifest: Digest,
    /// The index's digest too, when the tag named one.
    pub manifests: Vec<Digest>,
    pub config: (Digest, u64),
    pub layers: Vec<(Digest, u64)>,
    pub resolve: Duration,
}

impl Resolved {
    /// Every digest the pull touches: what `--cold` evicts.
    pub fn digests(&self) -> Vec<Digest> {
        let mut all = self.manifests.clone();
        all.push(self.config.0.clone());
        all.extend(self.layers.iter().map(|(d, _)| d.clone()));
        all
    }
}

pub struct Puller {
    opts: PullOptions,
    http: reqwest::Client,
}

impl Puller {
    pub fn new(opts: PullOptions) -> Result<Puller, BenchError> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| BenchError::Usage(e.to_string()))?;
        Ok(Puller { opts, http })
    }

    fn url(&self, kind: &str, reference: &str) -> String {
        format!(
            "{}/v2/{}/{kind}/{reference}?ns={}",
            self.opts.mirror.trim_end_matches('/'),
            self.opts.image.repository,
            percent_encoding::utf8_percent_encode(
                &self.opts.image.registry,
                percent_encoding::NON_ALPHANUMERIC
            )
        )
    }

    async fn get_manifest(
        &self,
        reference: &str,
    ) -> Result<(Digest, serde_json::Value), BenchError> {
        let url = self.url("manifests", reference);
        let err = |reason: String| BenchError::Mirror {
            url: url.clone(),
            reason,
        };
        let resp = self
            .http
            .get(&url)
            .header(http::header::ACCEPT, ACCEPT)
            .send()
            .await
            .map_err(|e| err(e.to_string()))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(err(format!("{status}: {}", body.trim())));
        }
        let body = resp.bytes().await.map_err(|e| err(e.to_string()))?;
        let digest = Digest::from_sha256(&sha2::Sha256::digest(&body));
        if let Ok(want) = reference.parse::<Digest>() {
            if want != digest {
                return Err(BenchError::Corrupt {
                    what: "manifest".into(),
                    digest: want.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        let json = serde_json::from_slice(&body)
            .map_err(|e| BenchError::Manifest(reference.into(), e.to_string()))?;
        Ok((digest, json))
    }

    /// Resolves the tag (or digest) to the platform's manifest.
    pub async fn resolve(&self) -> Result<Resolved, BenchError> {
        let started = Instant::now();
        let reference = match (&self.opts.image.digest, &self.opts.image.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        };
        let (mut digest, mut json) = self.get_manifest(&reference).await?;
        let mut manifests = vec![digest.clone()];
        if json.get("manifests").is_some() {
            let want: Vec<&str> = self.opts.platform.split('/').collect();
            let pick = json["manifests"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| {
                    let p = &m["platform"];
                    p["os"].as_str() == want.first().copied()
                        && p["architecture"].as_str() == want.get(1).copied()
                        && want
                            .get(2)
                            .is_none_or(|v| p["variant"].as_str() == Some(*v))
                })
                .and_then(|m| m["digest"].as_str())
                .ok_or_else(|| {
                    BenchError::Manifest(
                        digest.to_string(),
                        format!("the index has no manifest for {}", self.opts.platform),
                    )
                })?
                .to_owned();
            let (d, j) = self.get_manifest(&pick).await?;
            digest = d;
            json = j;
            manifests.push(digest.clone());
        }
        let desc = |v: &serde_json::Value| -> Result<(Digest, u64), BenchError> {
            let d = v["digest"]
                .as_str()
                .and_then(|s| s.parse::<Digest>().ok())
                .ok_or_else(|| {
                    BenchError::Manifest(
                        digest.to_string(),
                        "a descriptor has no sha256 digest".into(),
                    )
                })?;
            Ok((d, v["size"].as_u64().unwrap_or(0)))
        };
        let config = desc(&json["config"])?;
        let layers = json["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(desc)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Resolved {
            manifest: digest,
            manifests,
            config,
            layers,
            resolve: started.elapsed(),
        })
    }

    /// Fetches and checks one blob.
    async fn blob(
        &self,
        digest: &Digest,
        kind: &str,
        t0: Instant,
        first_byte: Arc<std::sync::Mutex<Option<Duration>>>,
        bar: &indicatif::ProgressBar,
    ) -> Result<BlobResult, BenchError> {
        let url = self.url("blobs", &digest.to_string());
        let err = |reason: String| BenchError::Mirror {
            url: url.clone(),
            reason,
        };
        let started = Instant::now();
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| err(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(err(format!("answered {}", resp.status())));
        }
        let source = resp
            .headers()
            .get("x-damselfly-source")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown")
            .to_owned();
        let mut body = resp.bytes_stream();
        let mut hasher = sha2::Sha256::new();
        let mut bytes = 0u64;
        let mut ttfb = None;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| err(format!("body broke after {bytes} bytes: {e}")))?;
            if ttfb.is_none() {
                ttfb = Some(started.elapsed());
                let mut first = first_byte.lock().unwrap_or_else(|p| p.into_inner());
                if first.is_none() {
                    *first = Some(t0.elapsed());
                }
            }
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            bar.inc(chunk.len() as u64);
        }
        let actual = Digest::from_sha256(&hasher.finalize());
        if &actual != digest {
            return Err(BenchError::Corrupt {
                what: format!("{kind} blob"),
                digest: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(BlobResult {
            digest: digest.to_string(),
            kind: kind.into(),
            bytes,
            source,
            ttfb_ms: ms(ttfb.unwrap_or_default()),
            total_ms: ms(started.elapsed()),
        })
    }

    /// Pulls every blob of `r` once.
    pub async fn pull(
        &self,
        r: &Resolved,
        run: u32,
        cold: bool,
        evicted: u64,
        bar: &indicatif::ProgressBar,
    ) -> Result<RunResult, BenchError> {
        let before = self.sources().await;
        let total: u64 = r.config.1 + r.layers.iter().map(|l| l.1).sum::<u64>();
        bar.set_length(total);
        bar.set_position(0);
        let t0 = Instant::now();
        let first = Arc::new(std::sync::Mutex::new(None));
        let mut jobs: Vec<(Digest, &str)> = vec![(r.config.0.clone(), "config")];
        jobs.extend(r.layers.iter().map(|(d, _)| (d.clone(), "layer")));
        let results: Vec<Result<BlobResult, BenchError>> = futures_util::stream::iter(jobs)
            .map(|(d, kind)| {
                let first = first.clone();
                async move { self.blob(&d, kind, t0, first, bar).await }
            })
            .buffered(self.opts.concurrency.max(1))
            .collect()
            .await;
        let blobs = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        let elapsed = t0.elapsed();
        let after = self.sources().await;
        let bytes: u64 = blobs.iter().map(|b| b.bytes).sum();
        let ttfb = first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or_default();
        Ok(RunResult {
            run,
            cold,
            evicted,
            resolve_ms: ms(r.resolve),
            ttfb_ms: ms(ttfb),
            total_ms: ms(elapsed),
            bytes,
            mib_per_s: bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64().max(1e-9),
            sources: match (before, after) {
                (Some(b), Some(a)) => Some(Sources {
                    local: a.local.saturating_sub(b.local),
                    peer: a.peer.saturating_sub(b.peer),
                    origin: a.origin.saturating_sub(b.origin),
                }),
                _ => None,
            },
            blobs,
            cri_pull_ms: None,
        })
    }

    /// The node's byte counters: blob bytes served from the store, and
    /// bytes its downloads took from peers and from the origin.
    async fn sources(&self) -> Option<Sources> {
        let url = self.opts.metrics.as_ref()?;
        let text = self.http.get(url).send().await.ok()?.text().await.ok()?;
        Some(parse_sources(&text))
    }
}

/// Reads the three counters out of Prometheus text.
pub fn parse_sources(text: &str) -> Sources {
    let mut s = Sources::default();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let v = value.parse::<f64>().unwrap_or(0.0) as u64;
        match name {
            "damselfly_bytes_served_total{source=\"local\"}" => s.local = v,
            "damselfly_fetched_bytes_total{source=\"peer\"}" => s.peer = v,
            "damselfly_origin_bytes_total" => s.origin = v,
            _ => {}
        }
    }
    s
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// The verdict over all runs: with `expect_warm`, every run must have taken
/// no byte from the origin.
pub fn verdict(runs: &[RunResult], expect_warm: bool) -> Verdict {
    let total = |f: fn(&Sources) -> u64| -> u64 {
        runs.iter().filter_map(|r| r.sources.as_ref()).map(f).sum()
    };
    let known = runs.iter().all(|r| r.sources.is_some());
    let (local, peer, origin) = (total(|s| s.local), total(|s| s.peer), total(|s| s.origin));
    let bytes: u64 = runs.iter().map(|r| r.bytes).sum();
    let pct = |n: u64| 100.0 * n as f64 / bytes.max(1) as f64;
    if !known {
        return Verdict {
            pass: !expect_warm,
            message: "the node's counters could not be read (is [telemetry] listen reachable?): sources unknown".into(),
        };
    }
    let split = format!(
        "{:.0}% cache, {:.0}% peers, {:.0}% origin",
        pct(local),
        pct(peer),
        pct(origin)
    );
    match (expect_warm, origin) {
        (true, 0) => Verdict {
            pass: true,
            message: format!("warm pull served 100% from peers and cache ({split}): PASS"),
        },
        (true, n) => Verdict {
            pass: false,
            message: format!("warm pull took {n} bytes from the origin ({split}): FAIL"),
        },
        (false, _) => Verdict {
            pass: true,
            message: format!("pull served {split}"),
        },
    }
}

/// The report as a table for people.
pub fn render(r: &PullReport) -> String {
    let mut out = format!(
        "image {} ({})\nmanifest {}\n\n",
        r.image, r.platform, r.manifest
    );
    out.push_str("RUN  COLD  RESOLVE   TTFB     TOTAL      BYTES        MiB/s   CACHE       PEERS       ORIGIN      CRI PULL\n");
    let size = |n: u64| bytesize::ByteSize(n).display().iec().to_string();
    for run in &r.runs {
        let (l, p, o) = run
            .sources
            .as_ref()
            .map_or(("?".into(), "?".into(), "?".into()), |s| {
                (size(s.local), size(s.peer), size(s.origin))
            });
        out.push_str(&format!(
            "{:<4} {:<5} {:>7.1}ms {:>6.1}ms {:>8.1}ms {:<12} {:>7.1}  {:<11} {:<11} {:<11} {}\n",
            run.run,
            if run.cold { "yes" } else { "-" },
            run.resolve_ms,
            run.ttfb_ms,
            run.total_ms,
            size(run.bytes),
            run.mib_per_s,
            l,
            p,
            o,
            run.cri_pull_ms.map_or("-".into(), |m| format!("{m:.1}ms")),
        ));
    }
    if let Some(last) = r.runs.last() {
        out.push_str("\nblobs of the last run:\n");
        for b in &last.blobs {
            out.push_str(&format!(
                "  {:<6} {}  {:>10}  {:<6}  ttfb {:.1}ms  total {:.1}ms\n",
                b.kind,
                &b.digest[..b.digest.len().min(19)],
                size(b.bytes),
                b.source,
                b.ttfb_ms,
                b.total_ms
            ));
        }
    }
    out.push('\n');
    out.push_str(&r.verdict.message);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(local: u64, peer: u64, origin: u64) -> RunResult {
        RunResult {
            run: 1,
            cold: false,
            evicted: 0,
            resolve_ms: 1.0,
            ttfb_ms: 1.0,
            total_ms: 2.0,
            bytes: local + peer + origin,
            mib_per_s: 1.0,
            sources: Some(Sources {
                local,
                peer,
                origin,
            }),
            blobs: vec![],
            cri_pull_ms: None,
        }
    }

    #[test]
    fn counters_are_read_from_prometheus_text() {
        let text = "# HELP x\n\
            damselfly_bytes_served_total{source=\"local\"} 100\n\
            damselfly_bytes_served_total{source=\"origin\"} 7\n\
            damselfly_fetched_bytes_total{source=\"peer\"} 2.5e3\n\
            damselfly_origin_bytes_total 42\n";
        assert_eq!(
            parse_sources(text),
            Sources {
                local: 100,
                peer: 2500,
                origin: 42
            }
        );
    }

    #[test]
    fn warm_verdicts() {
        let ok = verdict(&[run(10, 90, 0)], true);
        assert!(ok.pass, "{}", ok.message);
        assert!(ok.message.ends_with("PASS"), "{}", ok.message);
        let bad = verdict(&[run(10, 80, 10)], true);
        assert!(!bad.pass);
        assert!(
            bad.message.contains("10 bytes from the origin"),
            "{}",
            bad.message
        );
        let cold = verdict(&[run(0, 0, 100)], false);
        assert!(
            cold.pass && cold.message.contains("100% origin"),
            "{}",
            cold.message
        );
        let mut unknown = run(0, 0, 0);
        unknown.sources = None;
        assert!(!verdict(&[unknown], true).pass);
    }
}
