//! Tables for people: aligned columns that fit the terminal, human sizes
//! and ages. Every function takes `now` so that output is testable.

use std::time::{SystemTime, UNIX_EPOCH};

mod prewarm;
mod sidecar;

pub use prewarm::{gpu, status as prewarm_status};
pub use sidecar::status as sidecar_status;

use super::{LsArgs, SortKey, SourceFilter};
use crate::admin::api::*;

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn size(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

/// `12s ago`, `3m ago`, `5h ago`, `2d ago`; `-` for an unknown time.
pub fn age(now: u64, t: u64) -> String {
    if t == 0 {
        return "-".into();
    }
    let s = now.saturating_sub(t);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn duration(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn percent(r: f64) -> String {
    format!("{:.1}%", r * 100.0)
}

/// `sha256:` and the first 12 hex digits, as docker and ctr shorten them.
/// Anything else (digests read from a cached manifest are not validated:
/// too short, another algorithm, non-ASCII) is shown as it is, unshortened.
pub fn short(digest: &str) -> String {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() > 12 => match hex.get(..12) {
            Some(head) => format!("sha256:{head}"),
            None => digest.to_owned(),
        },
        _ => digest.to_owned(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// Columns sized to their contents. With a width, the `flex` column gives
/// up space (its cells end in `…`) so that lines fit.
struct Table {
    headers: Vec<&'static str>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
    flex: usize,
}

impl Table {
    fn new(headers: &[(&'static str, Align)], flex: usize) -> Table {
        Table {
            headers: headers.iter().map(|(h, _)| *h).collect(),
            align: headers.iter().map(|(_, a)| *a).collect(),
            rows: Vec::new(),
            flex,
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, width: Option<usize>) -> String {
        const GAP: usize = 2;
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        if let Some(w) = width {
            let total: usize = widths.iter().sum::<usize>() + GAP * (n - 1);
            if total > w {
                let others = total - widths[self.flex];
                widths[self.flex] = w.saturating_sub(others).max(8);
            }
        }
        let mut out = String::new();
        let headers: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for r in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                let cell = fit(c, widths[i]);
                let pad = widths[i] - cell.chars().count();
                let last = i == n - 1;
                match self.align[i] {
                    Align::Right => {
                        line.push_str(&" ".repeat(pad));
                        line.push_str(&cell);
                    }
                    Align::Left => {
                        line.push_str(&cell);
                        if !last {
                            line.push_str(&" ".repeat(pad));
                        }
                    }
                }
                if !last {
                    line.push_str(&" ".repeat(GAP));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn fit(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(w.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// Key-value lines, keys aligned.
fn pairs(rows: &[(&str, String)]) -> String {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<w$}  {v}\n"))
        .collect()
}

fn kind_rank(k: Option<&str>) -> u8 {
    match k {
        Some("index") => 0,
        Some("manifest") => 1,
        Some("config") => 2,
        Some("layer") => 3,
        _ => 4,
    }
}

/// Applies `cache ls` filters and ordering.
pub fn filter_sort(list: &mut BlobList, args: &LsArgs, image: Option<&str>) {
    list.blobs.retain(|b| {
        (!args.pinned || b.pinned)
            && (!args.unpinned || !b.pinned)
            && args.min_size.is_none_or(|m| b.size >= m)
            && image.is_none_or(|i| b.images.iter().any(|x| x == i))
            && args.source.is_none_or(|s| {
                let from = b.source.as_ref().map(|s| s.from.as_str());
                match s {
                    SourceFilter::Origin => from == Some("origin"),
                    SourceFilter::Peer => from == Some("peer"),
                    SourceFilter::Unknown => from.is_none(),
                }
            })
    });
    list.blobs.sort_by(|a, b| {
        let o = match args.sort {
            SortKey::Accessed => b.last_access.cmp(&a.last_access),
            SortKey::Size => b.size.cmp(&a.size),
            SortKey::Digest => std::cmp::Ordering::Equal,
            SortKey::Type => kind_rank(a.kind.as_deref()).cmp(&kind_rank(b.kind.as_deref())),
        };
        o.then_with(|| a.digest.cmp(&b.digest))
    });
    if args.reverse {
        list.blobs.reverse();
    }
}

fn images_cell(images: &[String]) -> String {
    match images {
        [] => "-".into(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first} (+{})", rest.len()),
    }
}

fn source_cell(s: Option<&SourceInfo>) -> String {
    s.map_or("-".into(), |s| s.from.clone())
}

pub fn ls(list: &BlobList, full: bool, now: u64, width: Option<usize>) -> String {
    use Align::*;
    let mut t = Table::new(
        &[
            ("DIGEST", Left),
            ("TYPE", Left),
            ("SIZE", Right),
            ("ACCESSED", Left),
            ("PINNED", Left),
            ("SOURCE", Left),
            ("IMAGES", Left),
        ],
        6,
    );
    for b in &list.blobs {
        t.row(vec![
            if full {
                b.digest.clone()
            } else {
                short(&b.digest)
            },
            b.kind.clone().unwrap_or_else(|| "-".into()),
            size(b.size),
            age(now, b.last_access),
            if b.pinned { "yes" } else { "-" }.into(),
            source_cell(b.source.as_ref()),
            images_cell(&b.images),
        ]);
    }
    let total: u64 = list.blobs.iter().map(|b| b.size).sum();
    format!(
        "{}{} blob(s), {}\n",
        t.render(width),
        list.blobs.len(),
        size(total)
    )
}

fn progress_cell(p: Option<&Progress>) -> String {
    match p {
        Some(Progress {
            written,
            total: Some(t),
        }) if *t > 0 => format!(
            "{} of {} ({})",
            size(*written),
            size(*t),
            percent(*written as f64 / *t as f64)
        ),
        Some(p) => format!("{} so far", size(p.written)),
        None => "-".into(),
    }
}

pub fn inspect(i: &Inspection, now: u64) -> String {
    match i {
        Inspection::Blob(b) => {
            let source = match &b.source {
                Some(s) => {
                    let mut v = s.from.clone();
                    if let (Some(reg), Some(repo)) = (&s.registry, &s.repository) {
                        v.push_str(&format!(" {reg}/{repo}"));
                    }
                    format!("{v}, {}", age(now, s.fetched_at))
                }
                None => "-".into(),
            };
            let rows = [
                ("digest", b.digest.clone()),
                ("state", b.state.clone()),
                ("size", b.size.map_or("-".into(), size)),
                ("type", b.kind.clone().unwrap_or_else(|| "-".into())),
                (
                    "media type",
                    b.media_type.clone().unwrap_or_else(|| "-".into()),
                ),
                (
                    "accessed",
                    b.last_access.map_or("-".into(), |t| age(now, t)),
                ),
                ("pinned", if b.pinned { "yes" } else { "no" }.into()),
                ("readers", b.readers.to_string()),
                ("progress", progress_cell(b.progress.as_ref())),
                (
                    "holders",
                    if b.holders.is_empty() {
                        "-".into()
                    } else {
                        b.holders.join(", ")
                    },
                ),
                ("source", source),
                (
                    "images",
                    if b.images.is_empty() {
                        "-".into()
                    } else {
                        b.images.join(", ")
                    },
                ),
            ];
            pairs(&rows)
        }
        Inspection::Image(img) => {
            let mut out = pairs(&[
                ("image", img.reference.clone()),
                ("digest", img.digest.clone()),
                (
                    "media type",
                    img.media_type.clone().unwrap_or_else(|| "-".into()),
                ),
                (
                    "platform",
                    img.platform.clone().unwrap_or_else(|| "-".into()),
                ),
                ("pinned", if img.pinned { "yes" } else { "no" }.into()),
                (
                    "complete",
                    format!(
                        "{} ({} of {} layers, {} of {})",
                        percent(img.complete),
                        img.layers_present,
                        img.layers,
                        size(img.layer_bytes_present),
                        size(img.layer_bytes)
                    ),
                ),
            ]);
            if img.manifest.is_none() {
                out.push_str("\nthe manifest is not stored on this node; its layers are unknown\n");
                return out;
            }
            use Align::*;
            let mut t = Table::new(
                &[
                    ("BLOB", Left),
                    ("TYPE", Left),
                    ("SIZE", Right),
                    ("STATE", Left),
                    ("PRESENT", Right),
                ],
                0,
            );
            for b in &img.blobs {
                t.row(vec![
                    short(&b.digest),
                    b.kind.clone(),
                    size(b.size),
                    b.state.clone(),
                    size(b.present),
                ]);
            }
            out.push('\n');
            out.push_str(&t.render(None));
            out
        }
    }
}

pub fn stats(s: &Stats) -> String {
    let used = if s.quota_bytes > 0 {
        format!(
            "{} of {} ({})",
            size(s.used_bytes),
            size(s.quota_bytes),
            percent(s.used_bytes as f64 / s.quota_bytes as f64)
        )
    } else {
        size(s.used_bytes)
    };
    let mut rows = vec![
        ("store", s.store_dir.clone()),
        ("used", used),
        (
            "blobs",
            format!(
                "{} ({} pinned, {}; {} in use)",
                s.blobs,
                s.pinned_blobs,
                size(s.pinned_bytes),
                s.in_use_blobs
            ),
        ),
        (
            "partials",
            format!("{} ({})", s.partials, size(s.partial_bytes)),
        ),
    ];
    match &s.daemon {
        Some(d) => {
            let l = d.blob_lookups;
            rows.push((
                "hit ratio",
                format!(
                    "{} of blob lookups ({} hit, {} miss, {} joined)",
                    d.hit_ratio.map_or("-".into(), percent),
                    l.hit,
                    l.miss,
                    l.joined
                ),
            ));
            let b = d.bytes_served;
            rows.push((
                "served",
                format!(
                    "{} local, {} peer, {} origin",
                    size(b.local),
                    size(b.peer),
                    size(b.origin)
                ),
            ));
            rows.push(("from origin", size(d.origin_bytes)));
            rows.push(("downloading", d.downloads_in_flight.to_string()));
            rows.push(("uptime", duration(d.uptime_s)));
        }
        None => rows.push((
            "counters",
            "not available: the daemon is not running".into(),
        )),
    }
    pairs(&rows)
}

pub fn verify(r: &VerifyReport) -> String {
    let mut out = format!(
        "checked {} blob(s), {}: {} corrupt",
        r.checked,
        size(r.bytes),
        r.corrupt.len()
    );
    if !r.vanished.is_empty() {
        out.push_str(&format!(", {} evicted meanwhile", r.vanished.len()));
    }
    out.push('\n');
    if !r.corrupt.is_empty() {
        use Align::*;
        let mut t = Table::new(
            &[
                ("DIGEST", Left),
                ("SIZE", Right),
                ("ACTUAL", Left),
                ("ACTION", Left),
            ],
            2,
        );
        for c in &r.corrupt {
            t.row(vec![
                c.digest.clone(),
                size(c.size),
                short(&c.actual),
                if c.removed { "removed" } else { "kept" }.into(),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render(None));
    }
    out
}

pub fn gc(r: &GcReport) -> String {
    let verb = if r.dry_run { "would free" } else { "freed" };
    let mut out = format!(
        "{verb} {} in {} blob(s): {} -> {} (target {})\n",
        size(r.freed),
        r.evicted.len(),
        size(r.before),
        size(r.after),
        size(r.target)
    );
    out.push_str(&format!(
        "kept {} pinned blob(s) ({}) and {} in use ({})\n",
        r.kept_pinned_blobs,
        size(r.kept_pinned_bytes),
        r.kept_in_use_blobs,
        size(r.kept_in_use_bytes)
    ));
    if !r.reached {
        out.push_str("the target was not reached: everything left is pinned or in use\n");
    }
    if !r.evicted.is_empty() {
        use Align::*;
        let mut t = Table::new(&[("EVICTED", Left), ("SIZE", Right)], 0);
        for e in &r.evicted {
            t.row(vec![e.digest.clone(), size(e.size)]);
        }
        out.push('\n');
        out.push_str(&t.render(None));
    }
    out
}

pub fn pin(r: &PinResponse, pinned: bool) -> String {
    let mut out = match (pinned, r.changed) {
        (true, _) => format!("pinned {} ({} blob(s))\n", r.target, r.digests.len()),
        (false, true) => format!("unpinned {} ({} blob(s))\n", r.target, r.digests.len()),
        (false, false) => format!("{} was not pinned\n", r.target),
    };
    if !r.still_pinned_by.is_empty() {
        out.push_str(&format!(
            "some of its blobs stay pinned by: {}\n",
            r.still_pinned_by.join(", ")
        ));
    }
    out
}

pub fn peers(p: &Peers) -> String {
    if p.swarm == "disabled" {
        return "the swarm is not enabled on this node ([swarm] enabled = false, or no daemon is running); it has no peers\n".into();
    }
    let me = format!(
        "this node: {} ({})\n",
        p.local_peer_id.as_deref().unwrap_or("-"),
        p.local_role.as_deref().unwrap_or("node")
    );
    if p.peers.is_empty() && p.distrusted.is_empty() {
        return format!("{me}no live peers\n");
    }
    use Align::*;
    let mut t = Table::new(
        &[
            ("PEER", Left),
            ("ROLE", Left),
            ("SEEN", Right),
            ("SENT", Right),
            ("RECEIVED", Right),
            ("ADDRESSES", Left),
        ],
        5,
    );
    for (peer, distrusted) in p
        .peers
        .iter()
        .map(|x| (x, false))
        .chain(p.distrusted.iter().map(|x| (x, true)))
    {
        let role = if distrusted {
            format!("{} (distrusted)", peer.role)
        } else {
            peer.role.clone()
        };
        t.row(vec![
            peer.id.clone(),
            role,
            peer.last_seen_ms
                .map_or("-".into(), |ms| format!("{:.1}s ago", ms as f64 / 1000.0)),
            size(peer.bytes_sent),
            size(peer.bytes_received),
            peer.addresses.join(", "),
        ]);
    }
    format!("{me}{}", t.render(None))
}

pub fn images(l: &ImageList, now: u64, width: Option<usize>) -> String {
    let mut out = cached_images(l, now, width);
    if !l.prewarm.is_empty() {
        out.push_str("\nprewarm:\n");
        out.push_str(&prewarm::image_table(&l.prewarm, width));
    }
    out
}

fn cached_images(l: &ImageList, now: u64, width: Option<usize>) -> String {
    if l.images.is_empty() {
        return "no images have been pulled through this node\n".into();
    }
    use Align::*;
    let mut t = Table::new(
        &[
            ("IMAGE", Left),
            ("DIGEST", Left),
            ("PLATFORM", Left),
            ("LAYERS", Right),
            ("SIZE", Right),
            ("COMPLETE", Right),
            ("PINNED", Left),
            ("CONFIRMED", Left),
        ],
        0,
    );
    for i in &l.images {
        t.row(vec![
            i.reference.clone(),
            short(&i.digest),
            i.platform.clone().unwrap_or_else(|| "-".into()),
            format!("{}/{}", i.layers_present, i.layers),
            size(i.layer_bytes),
            percent(i.complete),
            if i.pinned { "yes" } else { "-" }.into(),
            i.confirmed_at.map_or("-".into(), |t| age(now, t)),
        ]);
    }
    t.render(width)
}

#[cfg(test)]
mod tests;
