//! `damselfly sidecar status`.

use super::{age, duration, short, Align, Table};
use crate::sidecar::SidecarStatus;

fn secs(s: f64) -> String {
    format!("{s:.2}s")
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

pub fn status(s: &SidecarStatus, now: u64, width: Option<usize>) -> String {
    let mut out = format!(
        "workload: {}  daemons seen: {}  peer: {}\n",
        s.workload, s.members, s.peer_id
    );
    let sig = &s.signal;
    let read = sig.polled_at.map_or("never read".into(), |t| age(now, t));
    match (&sig.error, sig.value) {
        (None, Some(v)) => out.push_str(&format!(
            "signal: {} from {} ({}), read {read}\n",
            number(v),
            sig.source,
            sig.query
        )),
        (Some(e), last) => out.push_str(&format!(
            "signal: FAILING ({} read(s) in a row) from {} ({}): {e}; last good value {}\n",
            sig.failures,
            sig.source,
            sig.query,
            last.map_or("none".into(), number)
        )),
        (None, None) => out.push_str(&format!(
            "signal: not read yet from {} ({})\n",
            sig.source, sig.query
        )),
    }
    let sc = &s.scaling;
    out.push_str(&format!(
        "replicas: wanted {}, current {}  (threshold {}, activation {}, {}..{})\n",
        s.wanted_replicas.map_or("-".into(), |w| w.to_string()),
        s.current_replicas.map_or("-".into(), |c| c.to_string()),
        number(sc.threshold),
        number(sc.activation_threshold),
        sc.min_replicas,
        sc.max_replicas
    ));
    let Some(i) = &s.intent else {
        out.push_str(&format!(
            "intent: none{}\n",
            s.released_at.map_or(String::new(), |t| format!(
                " (the last ended {})",
                age(now, t)
            ))
        ));
        return out;
    };
    out.push_str(&format!(
        "intent: {} replica(s), published {}, expires in {}{}\n\n",
        i.replicas,
        age(now, i.published_at),
        duration(i.expires_at.saturating_sub(now)),
        i.cooldown_left_s.map_or(String::new(), |c| format!(
            ", at zero: released in {}",
            duration(c.ceil() as u64)
        ))
    ));
    use Align::*;
    let mut images = Table::new(
        &[
            ("IMAGE", Left),
            ("DIGEST", Left),
            ("LEAD", Right),
            ("NODES", Right),
            ("ERROR", Left),
        ],
        0,
    );
    let mut nodes = Table::new(
        &[
            ("NODE", Left),
            ("ROLE", Left),
            ("IMAGE", Left),
            ("READY AFTER", Right),
        ],
        2,
    );
    for img in &i.images {
        images.row(vec![
            img.reference.clone(),
            img.digest.as_deref().map_or("-".into(), short),
            img.lead_time_s.map_or("-".into(), secs),
            img.nodes.len().to_string(),
            img.error.clone().unwrap_or_default(),
        ]);
        for n in &img.nodes {
            nodes.row(vec![
                n.peer_id.clone(),
                n.role.clone(),
                img.reference.clone(),
                secs(n.ready_after_s),
            ]);
        }
    }
    out.push_str(&images.render(width));
    if i.images.iter().any(|img| !img.nodes.is_empty()) {
        out.push('\n');
        out.push_str(&nodes.render(width));
    }
    out
}
