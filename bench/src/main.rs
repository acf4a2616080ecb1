//! `chart RESULTS.json OUT.svg`: throughput and p99 latency against concurrency, one line per
//! system, cluster size, mode and target, from what `bench/run.sh` measured.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use plotters::prelude::*;
use serde_json::Value;

/// One line of the chart: its label and (concurrency, value) points.
type Series = BTreeMap<String, Vec<(f64, f64)>>;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output] = args.as_slice() else {
        bail!("usage: chart RESULTS.json OUT.svg");
    };
    let text = std::fs::read_to_string(input).with_context(|| format!("reading {input}"))?;
    let doc: Value = serde_json::from_str(&text).with_context(|| format!("parsing {input}"))?;
    let runs = doc["runs"].as_array().context("no `runs` array")?;
    let (mut throughput, mut p99) = (Series::new(), Series::new());
    for run in runs {
        let label = format!(
            "{} {}n {} {}",
            run["system"].as_str().unwrap_or("sequencer"),
            run["nodes"],
            run["mode"].as_str().unwrap_or("?"),
            run["target"].as_str().unwrap_or("spread"),
        );
        let c = run["concurrency"].as_f64().unwrap_or(0.0);
        // ids/s for get-ids would dwarf every other line; calls per second compare alike.
        let ops = run["ops_per_s"].as_f64().unwrap_or(0.0);
        let lat = run["latency_us"]["p99"].as_f64().unwrap_or(0.0) / 1000.0;
        throughput.entry(label.clone()).or_default().push((c, ops));
        p99.entry(label).or_default().push((c, lat));
    }
    if throughput.is_empty() {
        bail!("{input} has no runs");
    }
    let root = SVGBackend::new(output, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(500);
    panel(&top, "calls per second", &throughput)?;
    panel(&bottom, "p99 latency (ms)", &p99)?;
    root.present()?;
    println!("{output}");
    Ok(())
}

fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    what: &str,
    series: &Series,
) -> anyhow::Result<()> {
    let max_x = series.values().flatten().map(|p| p.0).fold(1.0, f64::max);
    let max_y = series.values().flatten().map(|p| p.1).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{what} against concurrent callers"),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0..max_x * 1.1).log_scale(), 0.0..max_y * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("concurrent callers")
        .y_desc(what)
        .draw()?;
    for (i, (label, points)) in series.iter().enumerate() {
        let mut points = points.clone();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}
