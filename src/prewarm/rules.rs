//! Whether a `[[prewarm.rule]]` applies to this node's GPUs, and if not,
//! why not (the reason is what `damselfly prewarm status` shows).

use crate::config::{parse_compute_capability, GpuSelector, PrewarmRule, RuleNodes};
use crate::gpu::{GpuDevice, GpuFacts};

/// A rule's verdict for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub matched: bool,
    /// Why it matched or did not, in words.
    pub reason: String,
}

/// Why one GPU fails a selector, or `None` when it passes.
fn device_fails(sel: &GpuSelector, d: &GpuDevice) -> Option<String> {
    if let Some(p) = &sel.product {
        if !p.matches(&d.product) {
            return Some(format!("product {:?} is not {:?}", d.product, p.pattern));
        }
    }
    if let Some(min) = sel.min_memory {
        if d.memory_bytes < min {
            return Some(format!(
                "memory {} is under {}",
                bytesize::ByteSize(d.memory_bytes).display().iec(),
                bytesize::ByteSize(min).display().iec()
            ));
        }
    }
    if let Some(want) = sel.mig {
        // A GPU without MIG support has MIG off.
        let has = d.mig_enabled.unwrap_or(false);
        if has != want {
            return Some(format!("MIG is {}", if has { "on" } else { "off" }));
        }
    }
    if let Some(min) = sel.min_compute_capability {
        match d
            .compute_capability
            .as_deref()
            .and_then(parse_compute_capability)
        {
            Some(cc) if cc >= min => {}
            Some((a, b)) => {
                return Some(format!(
                    "compute capability {a}.{b} is under {}.{}",
                    min.0, min.1
                ))
            }
            None => return Some("compute capability unknown".into()),
        }
    }
    None
}

/// Evaluates `rule` against the node's GPUs.
pub fn evaluate(rule: &PrewarmRule, facts: &GpuFacts) -> Verdict {
    if rule.nodes == RuleNodes::All {
        return Verdict {
            matched: true,
            reason: "applies to every node".into(),
        };
    }
    if facts.devices.is_empty() {
        let why = facts.note.as_deref().unwrap_or("no GPUs found");
        return Verdict {
            matched: false,
            reason: format!("no GPUs on this node ({why})"),
        };
    }
    let sel = &rule.gpu;
    let mut passing = 0u32;
    let mut first_failure = None;
    for d in &facts.devices {
        match device_fails(sel, d) {
            None => passing += 1,
            Some(why) => {
                first_failure.get_or_insert(format!("GPU {}: {why}", d.index));
            }
        }
    }
    if passing >= sel.min_count {
        Verdict {
            matched: true,
            reason: format!(
                "{passing} of {} GPU(s) match ({})",
                facts.devices.len(),
                facts.devices[0].product
            ),
        }
    } else {
        let mut reason = format!(
            "{passing} of {} GPU(s) match, {} needed",
            facts.devices.len(),
            sel.min_count
        );
        if let Some(f) = first_failure {
            reason.push_str(&format!("; {f}"));
        }
        Verdict {
            matched: false,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::gpu::FactSource;

    fn facts(product: &str, gib: u64, count: u32, mig: Option<bool>, cc: &str) -> GpuFacts {
        GpuFacts {
            source: FactSource::Static,
            devices: (0..count)
                .map(|index| GpuDevice {
                    index,
                    product: product.into(),
                    memory_bytes: gib << 30,
                    compute_capability: Some(cc.into()),
                    mig_enabled: mig,
                    uuid: None,
                })
                .collect(),
            driver_version: None,
            cuda_version: None,
            note: None,
        }
    }

    fn rules(toml: &str) -> Vec<PrewarmRule> {
        Config::parse(toml, std::path::Path::new("t.toml"))
            .unwrap()
            .prewarm
            .rules
    }

    #[test]
    fn selectors_match_on_every_field() {
        let r = rules(
            r#"
[[prewarm.rule]]
name = "a10g"
images = ["reg.example.com/llm:v1"]
[prewarm.rule.gpu]
product = "*A10G*"
min_memory = "20GiB"

[[prewarm.rule]]
name = "big"
images = ["reg.example.com/llm:v1"]
[prewarm.rule.gpu]
min_memory = 40
min_count = 4

[[prewarm.rule]]
name = "mig"
images = ["reg.example.com/llm:v1"]
[prewarm.rule.gpu]
mig = true

[[prewarm.rule]]
name = "hopper"
images = ["reg.example.com/llm:v1"]
[prewarm.rule.gpu]
min_compute_capability = "9.0"

[[prewarm.rule]]
name = "any-gpu"
images = ["reg.example.com/llm:v1"]

[[prewarm.rule]]
name = "everyone"
nodes = "all"
images = ["reg.example.com/base:v1"]
"#,
        );
        let a10g = facts("NVIDIA A10G", 24, 1, None, "8.6");
        let h100x8 = facts("NVIDIA H100 80GB HBM3", 80, 8, Some(false), "9.0");
        let a100_mig = facts("NVIDIA A100-SXM4-40GB", 40, 2, Some(true), "8.0");
        let none = GpuFacts::none("NVML is not available");
        let matched = |f: &GpuFacts| -> Vec<&str> {
            r.iter()
                .filter(|rule| evaluate(rule, f).matched)
                .map(|rule| rule.name.as_str())
                .collect()
        };
        assert_eq!(matched(&a10g), ["a10g", "any-gpu", "everyone"]);
        assert_eq!(matched(&h100x8), ["big", "hopper", "any-gpu", "everyone"]);
        assert_eq!(matched(&a100_mig), ["mig", "any-gpu", "everyone"]);
        assert_eq!(matched(&none), ["everyone"]);
    }

    #[test]
    fn a_miss_says_why() {
        let r = rules(
            r#"
[[prewarm.rule]]
images = ["reg.example.com/llm:v1"]
[prewarm.rule.gpu]
product = "*H100*"
min_count = 2
"#,
        );
        let v = evaluate(&r[0], &facts("NVIDIA L4", 24, 1, None, "8.9"));
        assert!(!v.matched);
        assert!(
            v.reason.contains("0 of 1 GPU(s) match, 2 needed"),
            "{}",
            v.reason
        );
        assert!(v.reason.contains("\"*H100*\""), "{}", v.reason);
        let v = evaluate(&r[0], &GpuFacts::none("NVML is not available: not found"));
        assert!(v.reason.contains("NVML is not available"), "{}", v.reason);
        let small = rules(
            r#"
[[prewarm.rule]]
images = ["reg.example.com/llm:v1"]
[prewarm.rule.gpu]
min_memory = "40GiB"
"#,
        );
        let v = evaluate(&small[0], &facts("NVIDIA A10G", 24, 1, None, "8.6"));
        assert!(
            v.reason.contains("memory 24.0 GiB is under 40.0 GiB"),
            "{}",
            v.reason
        );
    }
}
