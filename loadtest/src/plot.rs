//! The latency percentile curve as an SVG (`--plot`), in the style of HdrHistogram's plotter:
//! latency against percentile on a "number of nines" axis, so the tail is as visible as the median.
//!
//! Must never: pull in a raster or font backend (SVG only, text laid out by the viewer), or
//! plot a percentile the histogram does not have.

use std::path::Path;

use anyhow::{Result, anyhow};
use hdrhistogram::Histogram;
use plotters::prelude::*;

/// Draws the percentile curves of `series` (label, histogram in microseconds) into `path`.
pub fn percentile_curve(path: &Path, title: &str, series: &[(&str, &Histogram<u64>)]) -> Result<()> {
    let curves: Vec<(&str, Vec<(f64, f64)>)> =
        series.iter().filter(|(_, h)| !h.is_empty()).map(|(name, h)| (*name, points(h))).collect();
    let max_nines = curves.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x)).fold(1.0f64, f64::max).ceil();
    let max_ms = curves.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y)).fold(0.001f64, f64::max) * 1.1;

    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..max_nines, 0f64..max_ms)
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(max_nines as usize + 1)
        .x_label_formatter(&|nines| nines_label(*nines))
        .draw()
        .map_err(|e| draw(&e))?;
    let colours = [BLUE, RED, GREEN, MAGENTA];
    for (index, (name, points)) in curves.into_iter().enumerate() {
        let colour = colours[index % colours.len()];
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}

/// (nines, milliseconds) points: x = log10(1 / (1 - quantile)), so 90% is 1, 99% is 2, ...
fn points(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    let last = 1.0 - 1.0 / histogram.len().max(1) as f64;
    histogram
        .iter_quantiles(5)
        .map(|v| (v.quantile_iterated_to().min(last), v.value_iterated_to() as f64 / 1_000.0))
        .map(|(q, ms)| (-(1.0 - q).max(1e-9).log10(), ms))
        .collect()
}

fn nines_label(nines: f64) -> String {
    let percent = 100.0 * (1.0 - 10f64.powf(-nines));
    let text = format!("{percent:.4}");
    format!("{}%", text.trim_end_matches('0').trim_end_matches('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_labels() {
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(1.0), "90%");
        assert_eq!(nines_label(3.0), "99.9%");
    }
}
