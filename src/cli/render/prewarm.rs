//! `damselfly gpu` and `damselfly prewarm status`.

use super::{short, size, Align, Table};
use crate::admin::api::{GpuFacts, PrewarmImage, PrewarmStatus};

pub fn gpu(f: &GpuFacts) -> String {
    let mut out = format!(
        "source: {}  driver: {}  CUDA: {}\n",
        f.source.as_str(),
        f.driver_version.as_deref().unwrap_or("-"),
        f.cuda_version.as_deref().unwrap_or("-")
    );
    if f.devices.is_empty() {
        out.push_str(&format!(
            "no GPUs{}\n",
            f.note
                .as_deref()
                .map_or(String::new(), |n| format!(": {n}"))
        ));
        return out;
    }
    use Align::*;
    let mut t = Table::new(
        &[
            ("GPU", Right),
            ("PRODUCT", Left),
            ("MEMORY", Right),
            ("COMPUTE", Left),
            ("MIG", Left),
            ("UUID", Left),
        ],
        1,
    );
    for d in &f.devices {
        t.row(vec![
            d.index.to_string(),
            d.product.clone(),
            size(d.memory_bytes),
            d.compute_capability.clone().unwrap_or_else(|| "-".into()),
            match d.mig_enabled {
                Some(true) => "on",
                Some(false) => "off",
                None => "-",
            }
            .into(),
            d.uuid.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    out.push_str(&t.render(None));
    out
}

fn progress(i: &PrewarmImage) -> String {
    match i.bytes_total {
        Some(t) if t > 0 => format!(
            "{}/{} ({:.0}%)",
            size(i.bytes_done),
            size(t),
            i.bytes_done as f64 * 100.0 / t as f64
        ),
        _ => "-".into(),
    }
}

/// The image rows, shared with `damselfly images`.
pub fn image_table(images: &[PrewarmImage], width: Option<usize>) -> String {
    use Align::*;
    let mut t = Table::new(
        &[
            ("RULE", Left),
            ("IMAGE", Left),
            ("STATE", Left),
            ("DIGEST", Left),
            ("PROGRESS", Right),
            ("CACHE", Right),
            ("PEERS", Right),
            ("ORIGIN", Right),
            ("READY", Right),
        ],
        1,
    );
    for i in images {
        t.row(vec![
            i.rule.clone(),
            i.reference.clone(),
            i.state.as_str().into(),
            i.digest.as_deref().map_or("-".into(), short),
            progress(i),
            size(i.sources.cache),
            size(i.sources.peers),
            size(i.sources.origin),
            i.ready_after_s.map_or("-".into(), |s| format!("{s:.1}s")),
        ]);
    }
    let mut out = t.render(width);
    for i in images {
        if let Some(e) = &i.error {
            let retry = i
                .retry_in_s
                .map_or(String::new(), |s| format!(" (retry in {s}s)"));
            out.push_str(&format!(
                "{} {}: {} after {} failure(s){retry}: {e}\n",
                i.rule,
                i.reference,
                i.state.as_str(),
                i.failures
            ));
        }
    }
    out
}

pub fn status(s: &PrewarmStatus, width: Option<usize>) -> String {
    let gpus = match s.gpu.devices.first() {
        Some(d) => format!(
            "{} x {} ({})",
            s.gpu.count(),
            d.product,
            s.gpu.source.as_str()
        ),
        None => format!("none ({})", s.gpu.note.as_deref().unwrap_or("no source")),
    };
    let mut out = format!(
        "GPUs: {gpus}\ninto containerd: {}  ready: {}\n",
        if s.into_containerd { "yes" } else { "no" },
        if s.ready { "yes" } else { "no" }
    );
    if s.rules.is_empty() && s.intents.is_empty() {
        out.push_str("no [[prewarm.rule]] is configured and no warm intent is live\n");
        return out;
    }
    out.push('\n');
    use Align::*;
    let mut t = Table::new(&[("RULE", Left), ("MATCHED", Left), ("WHY", Left)], 2);
    for r in &s.rules {
        t.row(vec![
            r.name.clone(),
            if r.matched { "yes" } else { "no" }.into(),
            r.reason.clone(),
        ]);
    }
    out.push_str(&t.render(width));
    if !s.intents.is_empty() {
        out.push_str("\nwarm intents:\n");
        for i in &s.intents {
            out.push_str(&format!(
                "  {}: {} (expires at {})\n",
                i.id,
                i.images.join(", "),
                i.expires_at
            ));
        }
    }
    if !s.images.is_empty() {
        out.push('\n');
        out.push_str(&image_table(&s.images, width));
    }
    out
}
