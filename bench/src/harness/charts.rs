//! SVG charts of a run (plotters, SVG backend only): zero-loss throughput against payload
//! size, latency percentiles against offered load, and the session-scale curve. Written next
//! to result.json; summary.md links them. With several rounds, the charts draw the first.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use plotters::prelude::*;

use super::report::{BenchResult, PathRun};

const SIZE: (u32, u32) = (800, 480);

fn color(path: &str) -> RGBColor {
    match path {
        "direct" => RGBColor(120, 120, 120),
        "plain" => RGBColor(31, 119, 180),
        "tokio" => RGBColor(44, 160, 44),
        "coturn" => RGBColor(214, 39, 40),
        "ferry-fast" => RGBColor(148, 103, 189),
        _ => RGBColor(255, 127, 14),
    }
}

fn paths(runs: &[PathRun]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in runs {
        if !out.contains(&r.path) {
            out.push(r.path.clone());
        }
    }
    out
}

/// Draws every chart `result` has data for into `dir`; returns the files written.
pub fn draw(result: &BenchResult, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    if let Some(file) = throughput(result, dir)? {
        written.push(file);
    }
    if let Some(file) = latency(result, dir)? {
        written.push(file);
    }
    if let Some(file) = scale(result, dir)? {
        written.push(file);
    }
    Ok(written)
}

/// Zero-loss datagrams per second against mean payload bytes, one line per path.
fn throughput(result: &BenchResult, dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let points = |path: &str| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = result
            .runs
            .iter()
            .filter(|r| r.path == path && r.round == 1)
            .filter_map(|r| Some((r.mean_body_bytes, r.zero_loss.as_ref()?.pps)))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let all: Vec<(f64, f64)> = paths(&result.runs).iter().flat_map(|p| points(p)).collect();
    if all.is_empty() {
        return Ok(None);
    }
    let x_max = all.iter().map(|p| p.0).fold(0.0, f64::max) * 1.1 + 10.0;
    let y_max = all.iter().map(|p| p.1).fold(0.0, f64::max) * 1.1 + 1.0;
    let file = dir.join("throughput.svg");
    let root = SVGBackend::new(&file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("zero-loss throughput", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("mean DATA body bytes")
        .y_desc("datagrams per second")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for path in paths(&result.runs) {
        let c = color(&path);
        let pts = points(&path);
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(path.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    drop(chart);
    drop(root);
    Ok(Some(file))
}

/// p50 and p99 one-way latency against delivered load (log scale), first payload, per path.
fn latency(result: &BenchResult, dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let Some(payload) = result.config.payloads.first() else {
        return Ok(None);
    };
    let series = |path: &str, pick: fn(&super::report::Latency) -> f64| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = result
            .runs
            .iter()
            .filter(|r| r.path == path && &r.payload == payload && r.round == 1)
            .flat_map(|r| r.points.iter())
            .filter(|p| p.trial.delivered_pps > 0.0)
            .filter_map(|p| Some((p.trial.offered_pps, pick(&p.trial.latency_us?).max(1.0))))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let names = paths(&result.runs);
    let all: Vec<(f64, f64)> = names.iter().flat_map(|p| series(p, |l| l.p99)).collect();
    if all.is_empty() {
        return Ok(None);
    }
    let x_max = all.iter().map(|p| p.0).fold(0.0, f64::max) * 1.2 + 10.0;
    let y_max = all.iter().map(|p| p.1).fold(0.0, f64::max) * 2.0 + 10.0;
    let file = dir.join("latency.svg");
    let root = SVGBackend::new(&file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("one-way latency, {payload} B (solid p99, dashed p50)"),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((500f64..x_max).log_scale(), (1f64..y_max).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("offered datagrams per second")
        .y_desc("µs")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for path in names {
        let c = color(&path);
        chart
            .draw_series(LineSeries::new(series(&path, |l| l.p99), c.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(path.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        chart
            .draw_series(DashedLineSeries::new(
                series(&path, |l| l.p50),
                6,
                4,
                c.stroke_width(1),
            ))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    drop(chart);
    drop(root);
    Ok(Some(file))
}

/// Zero-loss datagrams per second against sessions (log scale), the scale scenario.
fn scale(result: &BenchResult, dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let pts: Vec<(f64, f64)> = result
        .scale
        .iter()
        .filter_map(|r| Some((r.sessions as f64, r.zero_loss.as_ref()?.pps)))
        .collect();
    if pts.is_empty() {
        return Ok(None);
    }
    let x_max = pts.iter().map(|p| p.0).fold(1.0, f64::max) * 2.0;
    let y_max = pts.iter().map(|p| p.1).fold(0.0, f64::max) * 1.1 + 1.0;
    let file = dir.join("scale.svg");
    let root = SVGBackend::new(&file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "ferry: zero-loss throughput as sessions grow",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0.5f64..x_max).log_scale(), 0f64..y_max)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("concurrent sessions")
        .y_desc("datagrams per second")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let c = color("ferry");
    chart
        .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    drop(chart);
    drop(root);
    Ok(Some(file))
}
