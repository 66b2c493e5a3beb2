//! The node's GPUs: what prewarm rules select on.
//!
//! Three sources sit behind one seam, [`Inventory`]:
//!
//! - [`nvml::NvmlInventory`]: NVIDIA's management library, opened at run
//!   time. A node without the library (or without a GPU) simply has no
//!   GPUs; the daemon logs why, once, and never retries in a loop.
//! - [`LabelsInventory`]: the node labels that GPU Feature Discovery writes
//!   (`nvidia.com/gpu.product`, `nvidia.com/gpu.memory`, ...), for a daemon
//!   pod that runs without the NVIDIA runtime and so cannot load NVML. It
//!   reads them from a file (`key=value` lines, as GFD's own output file
//!   and a downward-API volume both write them) or from a map the caller
//!   got from the Kubernetes Node.
//! - [`StaticInventory`]: facts written in the config (`[gpu.assume]`),
//!   for nodes whose GPUs cannot be read and for tests.
//!
//! The daemon pod never requests `nvidia.com/gpu`: that would take a GPU
//! away from the workloads. NVML needs only the driver's library and the
//! device nodes, not an allocated GPU.

pub mod nvml;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{AssumedGpus, GpuConfig, GpuSource};

/// One GPU, as prewarm rules and `damselfly gpu` see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDevice {
    pub index: u32,
    /// `NVIDIA A10G`, as NVML names it (GFD's labels write `NVIDIA-A10G`).
    pub product: String,
    /// Total framebuffer memory, bytes.
    pub memory_bytes: u64,
    /// `8.6`; `None` when the source does not say.
    pub compute_capability: Option<String>,
    /// MIG mode: `None` when the GPU does not support MIG or the source
    /// does not say.
    pub mig_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

/// Where a node's GPU facts came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FactSource {
    Nvml,
    Labels,
    Static,
    /// No source gave facts: the node has no GPUs as far as rules go.
    None,
}

impl FactSource {
    pub fn as_str(self) -> &'static str {
        match self {
            FactSource::Nvml => "nvml",
            FactSource::Labels => "labels",
            FactSource::Static => "static",
            FactSource::None => "none",
        }
    }
}

/// Everything known about a node's GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuFacts {
    pub source: FactSource,
    pub devices: Vec<GpuDevice>,
    /// The kernel driver, `550.54.15`.
    pub driver_version: Option<String>,
    /// The newest CUDA version the driver supports, `12.4`.
    pub cuda_version: Option<String>,
    /// Why there are no GPUs, or what a source could not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl GpuFacts {
    /// A node with no GPUs, and why.
    pub fn none(note: impl Into<String>) -> GpuFacts {
        GpuFacts {
            source: FactSource::None,
            devices: Vec::new(),
            driver_version: None,
            cuda_version: None,
            note: Some(note.into()),
        }
    }

    pub fn count(&self) -> usize {
        self.devices.len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The library could not be opened or initialised: no GPUs here.
    #[error("NVML is not available ({library}): {reason}")]
    NvmlUnavailable { library: String, reason: String },
    #[error("NVML call {call} failed: {reason}")]
    Nvml { call: &'static str, reason: String },
    #[error("cannot read GPU labels from {path}: {source}")]
    LabelsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("GPU label {key}={value:?} is not {expected}")]
    Label {
        key: String,
        value: String,
        expected: &'static str,
    },
}

/// Where a node's GPU facts come from. Discovery is a one-off at start-up
/// (GPUs do not come and go on a running node), so it is synchronous: NVML
/// itself is.
pub trait Inventory: Send + Sync {
    /// The source's name in logs.
    fn name(&self) -> &'static str;
    fn discover(&self) -> Result<GpuFacts, GpuError>;
}

/// Facts from the config.
pub struct StaticInventory(pub GpuFacts);

impl Inventory for StaticInventory {
    fn name(&self) -> &'static str {
        "static"
    }

    fn discover(&self) -> Result<GpuFacts, GpuError> {
        Ok(self.0.clone())
    }
}

/// GPU Feature Discovery's node labels, from a file.
pub struct LabelsInventory {
    pub path: PathBuf,
}

impl Inventory for LabelsInventory {
    fn name(&self) -> &'static str {
        "labels"
    }

    fn discover(&self) -> Result<GpuFacts, GpuError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| GpuError::LabelsFile {
            path: self.path.clone(),
            source,
        })?;
        facts_from_labels(&parse_labels(&text))
    }
}

/// `key=value` or `key="value"` lines; `#` comments and blank lines are
/// skipped. GFD's output file (`features.d/gfd`) and a downward-API labels
/// file both look like this.
pub fn parse_labels(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            (k.trim().to_owned(), v.to_owned())
        })
        .collect()
}

/// GPU facts from GPU Feature Discovery's labels. A node without
/// `nvidia.com/gpu.count` (or with 0) has no GPUs. Every GPU on a node gets
/// the same facts: GFD labels describe the node's GPUs as one kind.
pub fn facts_from_labels(labels: &BTreeMap<String, String>) -> Result<GpuFacts, GpuError> {
    let get = |k: &str| labels.get(k).map(String::as_str);
    let int = |k: &str| -> Result<Option<u64>, GpuError> {
        match get(k) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| GpuError::Label {
                key: k.into(),
                value: v.chars().take(64).collect(),
                expected: "a non-negative integer",
            }),
        }
    };
    let count = int("nvidia.com/gpu.count")?.unwrap_or(0);
    if count == 0 {
        return Ok(GpuFacts {
            source: FactSource::Labels,
            ..GpuFacts::none("the node's labels show no GPUs (no nvidia.com/gpu.count)")
        });
    }
    // GFD counts MIG devices when the strategy is `single`; more than a few
    // hundred is not a label we should lay out devices for.
    let count = count.min(1024) as u32;
    let product = get("nvidia.com/gpu.product")
        .unwrap_or("unknown")
        .to_owned();
    // GFD's memory label is in MiB.
    let memory_bytes = int("nvidia.com/gpu.memory")?
        .unwrap_or(0)
        .saturating_mul(1 << 20);
    let compute_capability = match (
        int("nvidia.com/gpu.compute.major")?,
        int("nvidia.com/gpu.compute.minor")?,
    ) {
        (Some(a), Some(b)) => Some(format!("{a}.{b}")),
        _ => None,
    };
    let mig_enabled = get("nvidia.com/mig.strategy").map(|s| s == "single" || s == "mixed");
    let driver_version = match (
        get("nvidia.com/cuda.driver.major"),
        get("nvidia.com/cuda.driver.minor"),
        get("nvidia.com/cuda.driver.rev"),
    ) {
        (Some(a), Some(b), Some(c)) if !c.is_empty() => Some(format!("{a}.{b}.{c}")),
        (Some(a), Some(b), _) => Some(format!("{a}.{b}")),
        _ => get("nvidia.com/cuda.driver-version.full").map(str::to_owned),
    };
    let cuda_version = match (
        get("nvidia.com/cuda.runtime.major"),
        get("nvidia.com/cuda.runtime.minor"),
    ) {
        (Some(a), Some(b)) => Some(format!("{a}.{b}")),
        _ => get("nvidia.com/cuda.runtime-version.full").map(str::to_owned),
    };
    Ok(GpuFacts {
        source: FactSource::Labels,
        devices: (0..count)
            .map(|index| GpuDevice {
                index,
                product: product.clone(),
                memory_bytes,
                compute_capability: compute_capability.clone(),
                mig_enabled,
                uuid: None,
            })
            .collect(),
        driver_version,
        cuda_version,
        note: None,
    })
}

/// `[gpu.assume]` as facts.
pub fn assumed(a: &AssumedGpus) -> GpuFacts {
    GpuFacts {
        source: FactSource::Static,
        devices: (0..a.count)
            .map(|index| GpuDevice {
                index,
                product: a.product.clone(),
                memory_bytes: a.memory,
                compute_capability: a.compute_capability.clone(),
                mig_enabled: a.mig,
                uuid: None,
            })
            .collect(),
        driver_version: a.driver.clone(),
        cuda_version: a.cuda.clone(),
        note: None,
    }
}

/// The inventories to try, in order, for this config.
pub fn inventories(cfg: &GpuConfig) -> Vec<Box<dyn Inventory>> {
    let nvml = || -> Box<dyn Inventory> {
        Box::new(nvml::NvmlInventory {
            library: cfg.nvml_library.clone(),
        })
    };
    let labels = |path: &Path| -> Box<dyn Inventory> {
        Box::new(LabelsInventory {
            path: path.to_owned(),
        })
    };
    match cfg.source {
        GpuSource::None => Vec::new(),
        GpuSource::Static => vec![Box::new(StaticInventory(match &cfg.assume {
            Some(a) => assumed(a),
            None => GpuFacts::none("gpu.source is \"static\" without [gpu.assume]"),
        }))],
        GpuSource::Nvml => vec![nvml()],
        // The Node is read by the daemon, which has the Kubernetes client.
        GpuSource::Node => Vec::new(),
        GpuSource::Labels => cfg.labels_file.as_deref().map(labels).into_iter().collect(),
        GpuSource::Auto => {
            let mut v = vec![nvml()];
            v.extend(cfg.labels_file.as_deref().map(labels));
            v
        }
    }
}

/// Discovers the node's GPUs from the local sources: the first that
/// answers wins. A source that fails is logged once at INFO (a node
/// without NVIDIA drivers is normal, not an error) and the next is tried;
/// with none left, the node has no GPUs as far as these sources go (the
/// daemon may still read the Node's labels, see [`from_node_labels`]).
pub fn discover(cfg: &GpuConfig) -> GpuFacts {
    discover_with(&inventories(cfg))
}

/// Whether the daemon should ask the Kubernetes Node for GPU Feature
/// Discovery's labels after the local sources found nothing.
pub fn wants_node_labels(cfg: &GpuConfig, local: &GpuFacts, node_name_known: bool) -> bool {
    local.source == FactSource::None
        && match cfg.source {
            GpuSource::Node => true,
            GpuSource::Auto => cfg.assume.is_none() && node_name_known,
            _ => false,
        }
}

/// Facts from the Node's labels, or the local answer with the reason the
/// labels gave none added to its note.
pub fn from_node_labels(
    local: GpuFacts,
    labels: Result<BTreeMap<String, String>, String>,
) -> GpuFacts {
    let why = match labels.map(|l| facts_from_labels(&l)) {
        Ok(Ok(f)) if f.count() > 0 => {
            tracing::info!(
                source = "node labels",
                gpus = f.count(),
                product = f.devices.first().map(|d| d.product.as_str()).unwrap_or(""),
                "GPU inventory"
            );
            return f;
        }
        Ok(Ok(f)) => f.note.unwrap_or_default(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => format!("cannot read the Node's labels: {e}"),
    };
    tracing::info!(source = "node labels", reason = %why, "no GPU facts from this source");
    let note = match local.note {
        Some(n) => format!("{n}; {why}"),
        None => why,
    };
    GpuFacts {
        note: Some(note),
        ..local
    }
}

/// [`discover`] over given inventories.
pub fn discover_with(sources: &[Box<dyn Inventory>]) -> GpuFacts {
    let mut notes = Vec::new();
    for inv in sources {
        match inv.discover() {
            Ok(facts) => {
                tracing::info!(
                    source = inv.name(),
                    gpus = facts.count(),
                    product = facts
                        .devices
                        .first()
                        .map(|d| d.product.as_str())
                        .unwrap_or(""),
                    driver = facts.driver_version.as_deref().unwrap_or(""),
                    cuda = facts.cuda_version.as_deref().unwrap_or(""),
                    "GPU inventory"
                );
                return facts;
            }
            Err(e) => {
                tracing::info!(source = inv.name(), reason = %e, "no GPU facts from this source");
                notes.push(e.to_string());
            }
        }
    }
    if notes.is_empty() {
        notes.push("no local GPU source is configured".into());
    }
    GpuFacts::none(notes.join("; "))
}

/// The final word when no source gave facts: one INFO line.
pub fn log_no_gpus(facts: &GpuFacts) {
    if facts.source == FactSource::None {
        tracing::info!(
            reason = facts.note.as_deref().unwrap_or(""),
            "this node has no GPUs for prewarm rules"
        );
    }
}

/// `damselfly_gpu_info`, `damselfly_gpus` and `damselfly_gpu_memory_bytes`
/// for the facts, in `registry`.
pub fn export_metrics(
    facts: &GpuFacts,
    registry: &prometheus::Registry,
) -> Result<(), prometheus::Error> {
    use prometheus::{IntGauge, IntGaugeVec, Opts};
    let info = IntGaugeVec::new(
        Opts::new(
            "damselfly_gpu_info",
            "One series per GPU that prewarm rules see, always 1, with its facts as labels.",
        ),
        &["index", "product", "driver", "cuda", "source"],
    )?;
    let count = IntGauge::new(
        "damselfly_gpus",
        "GPUs found on this node (0 when no source gave facts).",
    )?;
    let memory = IntGaugeVec::new(
        Opts::new(
            "damselfly_gpu_memory_bytes",
            "Total memory of each GPU, bytes.",
        ),
        &["index", "product"],
    )?;
    for d in &facts.devices {
        let index = d.index.to_string();
        info.with_label_values(&[
            index.as_str(),
            &d.product,
            facts.driver_version.as_deref().unwrap_or(""),
            facts.cuda_version.as_deref().unwrap_or(""),
            facts.source.as_str(),
        ])
        .set(1);
        memory
            .with_label_values(&[index.as_str(), &d.product])
            .set(d.memory_bytes.min(i64::MAX as u64) as i64);
    }
    count.set(facts.count() as i64);
    registry.register(Box::new(info))?;
    registry.register(Box::new(count))?;
    registry.register(Box::new(memory))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The labels GFD 0.17 writes on a g5.xlarge (one A10G), as in its
    /// README's label table.
    const G5_LABELS: &str = "\
nvidia.com/cuda.driver.major=535
nvidia.com/cuda.driver.minor=161
nvidia.com/cuda.driver.rev=07
nvidia.com/cuda.runtime.major=12
nvidia.com/cuda.runtime.minor=2
nvidia.com/gfd.timestamp=1712345678
nvidia.com/gpu.compute.major=8
nvidia.com/gpu.compute.minor=6
nvidia.com/gpu.count=1
nvidia.com/gpu.family=ampere
nvidia.com/gpu.machine=g5.xlarge
nvidia.com/gpu.memory=23028
nvidia.com/gpu.product=NVIDIA-A10G
nvidia.com/gpu.mode=compute
";

    #[test]
    fn gfd_labels_map_to_facts() {
        let f = facts_from_labels(&parse_labels(G5_LABELS)).unwrap();
        assert_eq!(f.source, FactSource::Labels);
        assert_eq!(f.count(), 1);
        let d = &f.devices[0];
        assert_eq!(d.product, "NVIDIA-A10G");
        assert_eq!(d.memory_bytes, 23028 << 20);
        assert_eq!(d.compute_capability.as_deref(), Some("8.6"));
        assert_eq!(d.mig_enabled, None);
        assert_eq!(f.driver_version.as_deref(), Some("535.161.07"));
        assert_eq!(f.cuda_version.as_deref(), Some("12.2"));
    }

    #[test]
    fn mig_single_strategy_labels() {
        let text = "nvidia.com/mig.strategy=single\n\
                    nvidia.com/gpu.product=A100-SXM4-40GB-MIG-1g.5gb\n\
                    nvidia.com/gpu.count=56\nnvidia.com/gpu.memory=5120\n";
        let f = facts_from_labels(&parse_labels(text)).unwrap();
        assert_eq!(f.count(), 56);
        assert!(f.devices.iter().all(|d| d.mig_enabled == Some(true)));
        assert_eq!(f.devices[55].index, 55);
        assert_eq!(f.devices[0].memory_bytes, 5120 << 20);
    }

    #[test]
    fn labels_files_take_quotes_and_comments_and_bad_values_are_named() {
        let m = parse_labels("# from the downward API\nnvidia.com/gpu.count=\"2\"\n\nx\n");
        assert_eq!(m.get("nvidia.com/gpu.count").map(String::as_str), Some("2"));
        assert_eq!(facts_from_labels(&m).unwrap().count(), 2);
        let bad = parse_labels("nvidia.com/gpu.count=two");
        let e = facts_from_labels(&bad).unwrap_err().to_string();
        assert!(e.contains("nvidia.com/gpu.count"), "{e}");
        let none = facts_from_labels(&parse_labels("kubernetes.io/os=linux")).unwrap();
        assert_eq!(none.count(), 0);
        assert!(none.note.is_some());
    }

    struct Failing;
    impl Inventory for Failing {
        fn name(&self) -> &'static str {
            "failing"
        }
        fn discover(&self) -> Result<GpuFacts, GpuError> {
            Err(GpuError::NvmlUnavailable {
                library: "libnvidia-ml.so.1".into(),
                reason: "not found".into(),
            })
        }
    }

    #[test]
    fn the_first_source_that_answers_wins_and_failures_leave_no_gpus() {
        let one = GpuFacts {
            source: FactSource::Static,
            devices: vec![GpuDevice {
                index: 0,
                product: "NVIDIA L4".into(),
                memory_bytes: 24 << 30,
                compute_capability: Some("8.9".into()),
                mig_enabled: None,
                uuid: None,
            }],
            driver_version: None,
            cuda_version: None,
            note: None,
        };
        let f = discover_with(&[Box::new(Failing), Box::new(StaticInventory(one.clone()))]);
        assert_eq!(f, one);
        let none = discover_with(&[Box::new(Failing)]);
        assert_eq!(none.source, FactSource::None);
        assert_eq!(none.count(), 0);
        assert!(none.note.unwrap().contains("libnvidia-ml.so.1"));
    }
}
