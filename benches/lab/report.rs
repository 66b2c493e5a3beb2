//! The lab's checks of origin bytes, its Markdown report and its SVG charts
//! (see the bench's doc in `main.rs`).

use std::fmt::Write as _;
use std::path::Path;

use damselfly_lab::netlab::{machine, sh_output};

use super::{Route, Run, Settings};

pub struct ImageResult {
    pub label: &'static str,
    pub size: u64,
    pub layers: usize,
    pub burst: Vec<(usize, Vec<Run>)>,
    /// W, then cold and warm runs: damselfly (seed + W), central cache,
    /// direct.
    pub warm: Option<(usize, Vec<(Run, Run)>)>,
}

/// The origin-byte checks; each failure as a line.
pub fn check(r: &ImageResult, failures: &mut Vec<String>) {
    let ratio = |run: &Run| run.origin_bytes as f64 / r.size as f64;
    let runs = r.burst.iter().flat_map(|(_, runs)| runs).chain(
        r.warm
            .iter()
            .flat_map(|(_, runs)| runs.iter().flat_map(|(c, w)| [c, w])),
    );
    for run in runs {
        let n = run.times.len() as u64;
        if let Some(served) = run.served {
            if served < n * r.size {
                failures.push(format!(
                    "{}: {} served {served} blob bytes to {n} nodes, less than {n} images: \
                     containerd fell back to the origin",
                    r.label,
                    run.route.name()
                ));
            }
        }
    }
    let mut expect = |what: String, got: f64, lo: f64, hi: f64| {
        if !(lo - 1e-9..=hi + 1e-9).contains(&got) {
            failures.push(format!(
                "{}: {what}: origin bytes {got:.3}x the image, expected {lo:.2}x..={hi:.2}x",
                r.label
            ));
        }
    };
    for (n, runs) in &r.burst {
        for run in runs {
            let what = format!("burst N={n}, {}", run.route.name());
            let n = *n as f64;
            match run.route {
                Route::Direct => expect(what, ratio(run), n, n * 1.05),
                Route::Proxy => expect(what, ratio(run), 1.0, f64::INFINITY),
                Route::Damselfly => expect(what, ratio(run), 1.0, 1.05),
            }
        }
    }
    if let Some((w, runs)) = &r.warm {
        for (cold, warm) in runs {
            if cold.route == Route::Damselfly {
                expect(
                    format!("seed + {w} nodes cold, damselfly"),
                    ratio(cold),
                    1.0,
                    1.05,
                );
                expect(
                    format!("{w} nodes warm after scale-to-zero, damselfly"),
                    ratio(warm),
                    0.0,
                    0.0,
                );
            }
        }
    }
}

fn git_commit() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let head = run(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    match run(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(s) if !s.is_empty() => format!("{head} + uncommitted changes"),
        _ => head,
    }
}

fn now_utc() -> String {
    sh_output(&["date", "-u", "+%Y-%m-%d %H:%M UTC"])
        .trim()
        .to_owned()
}

fn row(s: &Settings, size: u64, label: &str, run: &Run) -> String {
    let ideal = s.ideal(size);
    let peers = run.from_peers.map_or(String::new(), |b| {
        format!("{:.2}x ({} hedges)", b / size as f64, run.hedges)
    });
    format!(
        "| {label} | {} | {:.2} s | {:.2} s | {:.2}x | {:.3}x ({} GETs) | {peers} | {}, {} |\n",
        run.route.name(),
        run.slowest(),
        run.median(),
        run.slowest() / ideal,
        run.origin_bytes as f64 / size as f64,
        run.origin_gets,
        run.load.0,
        run.load.1,
    )
}

const TABLE_HEAD: &str = "| N | route | slowest node | median node | slowest / ideal | origin bytes / image | bytes from peers / image (hedged requests) | load avg before, after |\n\
                          |---|---|---|---|---|---|---|---|\n";

pub fn report(s: &Settings, results: &[ImageResult], command: &str, setup: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Warm-pull lab ({}), {}\n\n`{command}` at commit {}.\n\n{setup}\n",
        machine(),
        now_utc(),
        git_commit()
    );
    for r in results {
        let ideal = s.ideal(r.size);
        let _ = writeln!(
            out,
            "### Image `{}`: {:.1} MB ({:.1} MiB) in {} layers\n\nIdeal (image / min(node link, origin link)): {ideal:.2} s. N = 1 is the cold single node.\n",
            r.label,
            r.size as f64 / 1e6,
            r.size as f64 / (1u64 << 20) as f64,
            r.layers
        );
        out += "Burst: N fresh nodes pull at once.\n\n";
        out += TABLE_HEAD;
        for (n, runs) in &r.burst {
            for run in runs {
                out += &row(s, r.size, &n.to_string(), run);
            }
        }
        if let Some((w, runs)) = &r.warm {
            let _ = writeln!(
                out,
                "\nWarm after scale-to-zero: {w} nodes pull cold (damselfly: with a seed, which \
                 stays), go away, and {w} fresh nodes pull. The central cache keeps its cache; \
                 direct has nothing to keep.\n"
            );
            out += TABLE_HEAD;
            for (cold, warm) in runs {
                let who = if cold.route == Route::Damselfly {
                    format!("seed + {w}")
                } else {
                    w.to_string()
                };
                out += &row(s, r.size, &format!("{who}, cold"), cold);
                out += &row(s, r.size, &format!("{w}, warm"), warm);
            }
        }
        out += "\n";
    }
    out
}

/// Slowest node against N, one line per route, and the ideal.
pub fn chart(s: &Settings, r: &ImageResult, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let ideal = s.ideal(r.size);
    let max_n = r.burst.iter().map(|(n, _)| *n).max().unwrap_or(1) as f64;
    let top = r
        .burst
        .iter()
        .flat_map(|(_, runs)| runs.iter().map(Run::slowest))
        .fold(ideal, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{} ({:.0} MB): slowest node, N nodes pulling at once",
                r.label,
                r.size as f64 / 1e6
            ),
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..max_n + 0.5, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("nodes pulling at once (N)")
        .y_desc("seconds")
        .draw()?;
    let colors = [
        RGBColor(200, 40, 40),
        RGBColor(40, 90, 200),
        RGBColor(20, 140, 60),
    ];
    for (route, color) in Route::ALL.into_iter().zip(colors) {
        let points: Vec<(f64, f64)> = r
            .burst
            .iter()
            .filter_map(|(n, runs)| {
                runs.iter()
                    .find(|run| run.route == route)
                    .map(|run| (*n as f64, run.slowest()))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        let style = ShapeStyle::from(color).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.clone(), style))?
            .label(route.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart.draw_series(
            points
                .into_iter()
                .map(move |p| Circle::new(p, 4, ShapeStyle::from(color).filled())),
        )?;
    }
    let grey = ShapeStyle::from(BLACK.mix(0.5)).stroke_width(1);
    chart
        .draw_series(LineSeries::new(vec![(0.5, ideal), (max_n, ideal)], grey))?
        .label("ideal (image / tightest link)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
