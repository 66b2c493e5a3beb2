//! `[gpu]`, `[prewarm]` and `[[prewarm.rule]]`: what the node's GPUs are
//! and which images a node with such GPUs should hold before its pods ask.
//!
//! TOML cannot have both a `[prewarm]` table and a `[[prewarm]]` array, so
//! the settings are `[prewarm]` and the rules `[[prewarm.rule]]`, each with
//! an optional `[prewarm.rule.gpu]` selector.
//!
//! Defaults are read from [`KEYS`](super::KEYS) by the `Validator`'s
//! readers, so each is written once.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use globset::{GlobBuilder, GlobMatcher};
use toml::{Table, Value};

use super::validate::parse_size;
use super::Validator;
use crate::oci::{ImageRef, Platform};

/// Where the GPU inventory comes from (see `gpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuSource {
    /// `[gpu.assume]` when given, else NVML, then `labels_file` when set,
    /// then the Node's labels when the node's name is known.
    Auto,
    Nvml,
    Labels,
    /// GPU Feature Discovery's labels on this node's Kubernetes Node.
    Node,
    Static,
    None,
}

#[derive(Debug, Clone)]
pub struct GpuConfig {
    pub source: GpuSource,
    /// Library name or path handed to the dynamic loader.
    pub nvml_library: String,
    pub labels_file: Option<PathBuf>,
    pub assume: Option<AssumedGpus>,
}

/// `[gpu.assume]`: facts for the static inventory. Every GPU gets the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumedGpus {
    pub count: u32,
    pub product: String,
    /// Bytes per GPU.
    pub memory: u64,
    pub compute_capability: Option<String>,
    pub mig: Option<bool>,
    pub driver: Option<String>,
    pub cuda: Option<String>,
}

/// Which nodes a rule is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleNodes {
    /// Nodes with at least `gpu.min_count` GPUs that match the selector.
    Gpu,
    /// Every node, GPUs or not (the selector is ignored).
    All,
}

/// A product glob, matched case-insensitively, with spaces and dashes
/// equal (NVML says `NVIDIA A10G`, GPU Feature Discovery `NVIDIA-A10G`).
#[derive(Debug, Clone)]
pub struct ProductGlob {
    pub pattern: String,
    matcher: GlobMatcher,
}

impl ProductGlob {
    pub fn new(pattern: &str) -> Result<ProductGlob, String> {
        let glob = GlobBuilder::new(&normalize_product(pattern))
            .case_insensitive(true)
            .literal_separator(false)
            .build()
            .map_err(|e| format!("{pattern:?} is not a glob: {}", e.kind()))?;
        Ok(ProductGlob {
            pattern: pattern.to_owned(),
            matcher: glob.compile_matcher(),
        })
    }

    pub fn matches(&self, product: &str) -> bool {
        self.matcher.is_match(normalize_product(product))
    }
}

fn normalize_product(s: &str) -> String {
    s.trim().replace(' ', "-")
}

/// `[prewarm.rule.gpu]`: every field that is set must hold for at least
/// `min_count` of the node's GPUs.
#[derive(Debug, Clone)]
pub struct GpuSelector {
    pub product: Option<ProductGlob>,
    /// Bytes.
    pub min_memory: Option<u64>,
    pub min_count: u32,
    pub mig: Option<bool>,
    /// `(major, minor)`.
    pub min_compute_capability: Option<(u32, u32)>,
}

#[derive(Debug, Clone)]
pub struct PrewarmRule {
    pub name: String,
    pub images: Vec<ImageRef>,
    /// `None`: the node's own platform.
    pub platform: Option<Platform>,
    pub nodes: RuleNodes,
    pub gpu: GpuSelector,
}

#[derive(Debug, Clone)]
pub struct PrewarmConfig {
    pub into_containerd: bool,
    pub containerd_socket: PathBuf,
    pub containerd_namespace: String,
    pub pin_in_containerd: bool,
    /// Images prewarmed at once.
    pub concurrency: usize,
    /// Blobs of one image fetched at once.
    pub blob_concurrency: usize,
    /// Tags are resolved again this often; zero: never.
    pub refresh: Duration,
    pub retry_max: Duration,
    pub gate_readiness: bool,
    pub ready_deadline: Duration,
    pub swarm_wait: Duration,
    pub rules: Vec<PrewarmRule>,
}

/// `8.6` -> `(8, 6)`.
pub fn parse_compute_capability(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

impl Validator {
    pub(super) fn gpu(&mut self, t: &Table) -> GpuConfig {
        const S: &str = "gpu";
        let source = match self.string(t, S, "source").as_str() {
            "auto" => GpuSource::Auto,
            "nvml" => GpuSource::Nvml,
            "labels" => GpuSource::Labels,
            "node" => GpuSource::Node,
            "static" => GpuSource::Static,
            "none" => GpuSource::None,
            other => {
                self.issue(
                    "gpu.source",
                    &format!(
                        "must be \"auto\", \"nvml\", \"labels\", \"node\", \"static\" or \"none\", not {other:?}"
                    ),
                );
                GpuSource::Auto
            }
        };
        let nvml_library = self.string(t, S, "nvml_library");
        if nvml_library.is_empty() {
            self.issue("gpu.nvml_library", "must not be empty");
        }
        let labels_file = self.opt_path(t, S, "labels_file");
        let assume = match t.get("assume") {
            None => None,
            Some(Value::Table(a)) => {
                self.check_keys(a, "gpu.assume", "gpu.assume");
                Some(self.assumed(a))
            }
            Some(other) => {
                self.issue(
                    "gpu.assume",
                    &format!("must be a table ([gpu.assume]), not {}", other.type_str()),
                );
                None
            }
        };
        let source = match (source, &assume) {
            (GpuSource::Auto, Some(_)) => GpuSource::Static,
            (GpuSource::Static, None) => {
                self.issue("gpu.source", "\"static\" needs a [gpu.assume] table");
                source
            }
            (GpuSource::Nvml | GpuSource::Labels | GpuSource::Node | GpuSource::None, Some(_)) => {
                self.issue(
                    "gpu.assume",
                    "is only used with gpu.source = \"static\" or \"auto\"",
                );
                source
            }
            _ => source,
        };
        if source == GpuSource::Labels && labels_file.is_none() {
            self.issue(
                "gpu.labels_file",
                "is required with gpu.source = \"labels\"",
            );
        }
        GpuConfig {
            source,
            nvml_library,
            labels_file,
            assume,
        }
    }

    fn assumed(&mut self, a: &Table) -> AssumedGpus {
        const S: &str = "gpu.assume";
        let count = self.integer(a, S, "count", 0..=1024) as u32;
        let product = self.string(a, S, "product");
        let memory = match self.size_or_gib(a, S, "memory") {
            Some(m) => m,
            None => self
                .keys_default(S, "memory", parse_size)
                .unwrap_or_default(),
        };
        let compute_capability = self.opt_string(a, S, "compute_capability");
        if let Some(cc) = compute_capability.as_deref() {
            if parse_compute_capability(cc).is_none() {
                self.issue(
                    "gpu.assume.compute_capability",
                    &format!("{cc:?} is not a compute capability like \"8.6\""),
                );
            }
        }
        let mig = self.opt_bool(a, S, "mig");
        AssumedGpus {
            count,
            product,
            memory,
            compute_capability,
            mig,
            driver: self.opt_string(a, S, "driver"),
            cuda: self.opt_string(a, S, "cuda"),
        }
    }

    /// A size string (`"20GiB"`) or an integer count of GiB.
    fn size_or_gib(&mut self, t: &Table, section: &str, key: &str) -> Option<u64> {
        match t.get(key)? {
            Value::Integer(n) if *n >= 0 => Some((*n as u64).saturating_mul(1 << 30)),
            Value::String(_) => self.opt_size(t, section, key),
            other => {
                self.issue(
                    &format!("{section}.{key}"),
                    &format!(
                        "must be a size like \"20GiB\" or a whole number of GiB, not {}",
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    pub(super) fn prewarm(&mut self, t: &Table) -> PrewarmConfig {
        const S: &str = "prewarm";
        let into_containerd = self.bool(t, S, "into_containerd");
        let containerd_socket = self.path(t, S, "containerd_socket");
        let containerd_namespace = self.string(t, S, "containerd_namespace");
        if containerd_namespace.is_empty()
            || !containerd_namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            self.issue(
                "prewarm.containerd_namespace",
                &format!("{containerd_namespace:?} is not a containerd namespace name"),
            );
        }
        let concurrency = self.integer(t, S, "concurrency", 1..=16) as usize;
        let blob_concurrency = self.integer(t, S, "blob_concurrency", 1..=32) as usize;
        let pin_in_containerd = self.bool(t, S, "pin_in_containerd");
        let refresh = self.duration(t, S, "refresh");
        if !refresh.is_zero() && refresh < Duration::from_secs(1) {
            self.issue("prewarm.refresh", "must be 0s (never) or at least 1s");
        }
        let retry_max = self.duration(t, S, "retry_max");
        if retry_max < Duration::from_secs(1) {
            self.issue("prewarm.retry_max", "must be at least 1s");
        }
        let gate_readiness = self.bool(t, S, "gate_readiness");
        let ready_deadline = self.duration(t, S, "ready_deadline");
        let swarm_wait = self.duration(t, S, "swarm_wait");
        let rules = self.rules(t);
        PrewarmConfig {
            into_containerd,
            containerd_socket,
            containerd_namespace,
            pin_in_containerd,
            concurrency,
            blob_concurrency,
            refresh,
            retry_max,
            gate_readiness,
            ready_deadline,
            swarm_wait,
            rules,
        }
    }

    fn rules(&mut self, t: &Table) -> Vec<PrewarmRule> {
        let items = match t.get("rule") {
            None => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.issue(
                    "prewarm.rule",
                    "must be an array of tables ([[prewarm.rule]])",
                );
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        let mut names = HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("prewarm.rule[{i}]");
            let Value::Table(r) = item else {
                self.issue(&at, "must be a table");
                continue;
            };
            self.check_keys(r, "prewarm.rule[]", &at);
            let name = self
                .opt_string(r, &at, "name")
                .unwrap_or_else(|| format!("rule-{i}"));
            if name.is_empty()
                || name.len() > 63
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                self.issue(
                    &format!("{at}.name"),
                    &format!("{name:?} must be 1-63 letters, digits, '.', '-' or '_'"),
                );
            } else if !names.insert(name.clone()) {
                self.issue(&format!("{at}.name"), &format!("{name:?} is used twice"));
            }
            let images = self.rule_images(r, &at);
            let platform = self.opt_string(r, &at, "platform").and_then(|p| {
                p.parse::<Platform>()
                    .map_err(|e| self.issue(&format!("{at}.platform"), &e))
                    .ok()
            });
            let nodes = match self.string(r, &at, "nodes").as_str() {
                "gpu" => RuleNodes::Gpu,
                "all" => RuleNodes::All,
                other => {
                    self.issue(
                        &format!("{at}.nodes"),
                        &format!("must be \"gpu\" or \"all\", not {other:?}"),
                    );
                    RuleNodes::Gpu
                }
            };
            let gpu = match r.get("gpu") {
                // No selector: any GPU, with the selector keys' defaults.
                None => self.selector(&Table::new(), &format!("{at}.gpu")),
                Some(Value::Table(g)) => {
                    let gat = format!("{at}.gpu");
                    self.check_keys(g, "prewarm.rule[].gpu", &gat);
                    if nodes == RuleNodes::All {
                        self.issue(&gat, "a rule with nodes = \"all\" takes no GPU selector");
                    }
                    self.selector(g, &gat)
                }
                Some(other) => {
                    self.issue(
                        &format!("{at}.gpu"),
                        &format!(
                            "must be a table ([prewarm.rule.gpu]), not {}",
                            other.type_str()
                        ),
                    );
                    continue;
                }
            };
            out.push(PrewarmRule {
                name,
                images,
                platform,
                nodes,
                gpu,
            });
        }
        out
    }

    pub(super) fn rule_images(&mut self, r: &Table, at: &str) -> Vec<ImageRef> {
        let key = format!("{at}.images");
        let items = match r.get("images") {
            None => {
                self.issue(&key, "is required: the image references to prewarm");
                return Vec::new();
            }
            Some(Value::Array(items)) if items.is_empty() => {
                self.issue(&key, "must name at least one image");
                return Vec::new();
            }
            Some(Value::Array(items)) => items,
            Some(other) => {
                self.issue(
                    &key,
                    &format!(
                        "must be a list of image references, not {}",
                        other.type_str()
                    ),
                );
                return Vec::new();
            }
        };
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (j, item) in items.iter().enumerate() {
            let k = format!("{key}[{j}]");
            match item {
                Value::String(s) => match ImageRef::parse(s) {
                    Ok(img) if !seen.insert(img.to_string()) => {
                        self.issue(&k, &format!("{img} is listed twice"))
                    }
                    Ok(img) => out.push(img),
                    Err(e) => self.issue(&k, &e.to_string()),
                },
                other => self.issue(&k, &format!("must be a string, not {}", other.type_str())),
            }
        }
        out
    }

    pub(super) fn selector(&mut self, g: &Table, at: &str) -> GpuSelector {
        let product = self.opt_string(g, at, "product").and_then(|p| {
            if p.is_empty() {
                self.issue(&format!("{at}.product"), "must not be empty");
                return None;
            }
            ProductGlob::new(&p)
                .map_err(|e| self.issue(&format!("{at}.product"), &e))
                .ok()
        });
        let min_memory = self.size_or_gib(g, at, "min_memory");
        let min_count = self.integer(g, at, "min_count", 1..=1024) as u32;
        let mig = self.opt_bool(g, at, "mig");
        let min_compute_capability =
            self.opt_string(g, at, "min_compute_capability")
                .and_then(|s| match parse_compute_capability(&s) {
                    Some(cc) => Some(cc),
                    None => {
                        self.issue(
                            &format!("{at}.min_compute_capability"),
                            &format!("{s:?} is not a compute capability like \"8.0\""),
                        );
                        None
                    }
                });
        GpuSelector {
            product,
            min_memory,
            min_count,
            mig,
            min_compute_capability,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{default_of, Config, ConfigError};

    fn issues(text: &str) -> Vec<(String, String)> {
        match Config::parse(text, std::path::Path::new("/etc/damselfly/t.toml")) {
            Err(ConfigError::Invalid { issues, .. }) => {
                issues.into_iter().map(|i| (i.path, i.message)).collect()
            }
            other => panic!("expected validation issues, got {other:?}"),
        }
    }

    #[test]
    fn defaults_come_from_the_keys_table() {
        let c = Config::defaults().unwrap();
        let p = &c.prewarm;
        assert!(p.into_containerd && p.pin_in_containerd && !p.gate_readiness);
        assert_eq!(
            p.containerd_socket,
            PathBuf::from("/run/containerd/containerd.sock")
        );
        assert_eq!(p.containerd_namespace, "k8s.io");
        assert_eq!((p.concurrency, p.blob_concurrency), (1, 3));
        assert_eq!(p.refresh, Duration::from_secs(300));
        assert_eq!(p.retry_max, Duration::from_secs(300));
        assert_eq!(p.ready_deadline, Duration::from_secs(900));
        assert_eq!(p.swarm_wait, Duration::from_secs(10));
        assert!(p.rules.is_empty());
        assert_eq!(c.gpu.source, GpuSource::Auto);
        assert_eq!(c.gpu.nvml_library, "libnvidia-ml.so.1");
        assert!(c.gpu.assume.is_none());
    }

    #[test]
    fn a_full_rule_and_the_static_inventory() {
        let c = Config::parse(
            r#"
[gpu.assume]
count = 4
product = "NVIDIA A10G"
memory = "24GiB"
compute_capability = "8.6"
mig = false

[prewarm]
gate_readiness = true
refresh = "0s"

[[prewarm.rule]]
name = "llm"
images = ["123456789012.dkr.ecr.us-east-1.amazonaws.com/llm:v3",
          "reg.example.com/tok@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]
platform = "linux/arm64"
[prewarm.rule.gpu]
product = "*A10G*"
min_memory = 20
min_count = 2
mig = false
min_compute_capability = "8.0"
"#,
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.gpu.source, GpuSource::Static);
        let a = c.gpu.assume.as_ref().unwrap();
        assert_eq!((a.count, a.memory, a.mig), (4, 24 << 30, Some(false)));
        let r = &c.prewarm.rules[0];
        assert_eq!(r.name, "llm");
        assert_eq!(r.images.len(), 2);
        assert_eq!(r.platform.as_ref().unwrap().to_string(), "linux/arm64");
        assert_eq!(r.gpu.min_memory, Some(20 << 30));
        assert_eq!(r.gpu.min_count, 2);
        assert_eq!(r.gpu.min_compute_capability, Some((8, 0)));
        assert!(c.prewarm.refresh.is_zero());
    }

    #[test]
    fn bad_rules_name_their_keys() {
        let got = issues(
            r#"
[gpu]
source = "cuda"
[gpu.assume]
memory = true
colour = 1

[prewarm]
concurrency = 0
containerd_namespace = "k8s io"
typo = 1

[[prewarm.rule]]
images = ["Bad/Name", "ok.example.com/a:1", "ok.example.com/a:1", 7]
platform = "linux"
nodes = "some"
speed = "fast"
[prewarm.rule.gpu]
product = "[A10G"
min_memory = "lots"
min_count = 0
min_compute_capability = "eight"
vendor = "nvidia"

[[prewarm.rule]]
name = "no images"

[[prewarm.rule]]
name = "dup"
images = []

[[prewarm.rule]]
name = "dup"
images = ["a.example.com/x:1"]
nodes = "all"
[prewarm.rule.gpu]
mig = "yes"
"#,
        );
        let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        for want in [
            "gpu.source",
            "gpu.assume.memory",
            "gpu.assume.colour",
            "prewarm.concurrency",
            "prewarm.containerd_namespace",
            "prewarm.typo",
            "prewarm.rule[0].images[0]",
            "prewarm.rule[0].images[2]",
            "prewarm.rule[0].images[3]",
            "prewarm.rule[0].platform",
            "prewarm.rule[0].nodes",
            "prewarm.rule[0].speed",
            "prewarm.rule[0].gpu.product",
            "prewarm.rule[0].gpu.min_memory",
            "prewarm.rule[0].gpu.min_count",
            "prewarm.rule[0].gpu.min_compute_capability",
            "prewarm.rule[0].gpu.vendor",
            "prewarm.rule[1].name",
            "prewarm.rule[1].images",
            "prewarm.rule[2].images",
            "prewarm.rule[3].name",
            "prewarm.rule[3].gpu",
            "prewarm.rule[3].gpu.mig",
        ] {
            assert!(paths.contains(&want), "missing {want} in {got:#?}");
        }
        let msg = |p: &str| got.iter().find(|(k, _)| k == p).unwrap().1.clone();
        assert!(msg("prewarm.rule[0].images[0]").contains("Bad/Name"));
        assert!(msg("prewarm.rule[0].images[2]").contains("listed twice"));
        assert!(msg("prewarm.rule[3].name").contains("used twice"));
    }

    #[test]
    fn source_and_assume_must_agree() {
        let got = issues("[gpu]\nsource = \"static\"\n");
        assert_eq!(got[0].0, "gpu.source");
        let got = issues("[gpu]\nsource = \"nvml\"\n[gpu.assume]\ncount = 1\n");
        assert_eq!(got[0].0, "gpu.assume");
        let got = issues("[gpu]\nsource = \"labels\"\n");
        assert_eq!(got[0].0, "gpu.labels_file");
    }

    #[test]
    fn every_default_read_from_keys_exists_and_parses() {
        for k in [
            "prewarm.refresh",
            "prewarm.retry_max",
            "prewarm.ready_deadline",
            "prewarm.swarm_wait",
        ] {
            humantime::parse_duration(default_of(k)).unwrap_or_else(|e| panic!("{k}: {e}"));
        }
        for k in ["prewarm.concurrency", "prewarm.blob_concurrency"] {
            default_of(k)
                .parse::<i64>()
                .unwrap_or_else(|e| panic!("{k}: {e}"));
        }
        for k in [
            "prewarm.into_containerd",
            "prewarm.pin_in_containerd",
            "prewarm.gate_readiness",
        ] {
            default_of(k)
                .parse::<bool>()
                .unwrap_or_else(|e| panic!("{k}: {e}"));
        }
        for k in [
            "prewarm.containerd_socket",
            "prewarm.containerd_namespace",
            "gpu.nvml_library",
            "gpu.assume.product",
        ] {
            assert!(!default_of(k).is_empty(), "{k}");
        }
    }

    #[test]
    fn product_globs_ignore_case_and_the_space_dash_difference() {
        let g = ProductGlob::new("*A10G*").unwrap();
        assert!(g.matches("NVIDIA A10G"));
        assert!(g.matches("NVIDIA-A10G"));
        assert!(g.matches("nvidia a10g"));
        assert!(!g.matches("NVIDIA A100-SXM4-40GB"));
        let h = ProductGlob::new("NVIDIA H100 80GB*").unwrap();
        assert!(h.matches("NVIDIA H100 80GB HBM3"));
        assert!(h.matches("NVIDIA-H100-80GB-HBM3"));
        assert!(ProductGlob::new("[A10G").is_err());
    }

    #[test]
    fn compute_capabilities() {
        assert_eq!(parse_compute_capability("8.6"), Some((8, 6)));
        assert_eq!(parse_compute_capability("10.0"), Some((10, 0)));
        assert_eq!(parse_compute_capability("8"), None);
        assert_eq!(parse_compute_capability("8.x"), None);
    }
}
