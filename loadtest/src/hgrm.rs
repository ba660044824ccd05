//! HdrHistogram's percentile-distribution text format (`.hgrm`), as written by the Java and C
//! implementations' `outputPercentileDistribution` and read by HdrHistogram's online plotter and
//! wrk2-style tooling. Values are written in milliseconds.
//!
//! Must never: change the column layout (tools parse it by position).

use std::fmt::Write as _;

use hdrhistogram::Histogram;

/// Percentile ticks per half distance to 100%, HdrHistogram's customary 5.
const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// Renders `histogram` (values in microseconds) as a percentile distribution in milliseconds.
pub fn percentile_distribution(histogram: &Histogram<u64>) -> String {
    let scale = 1_000.0;
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for value in histogram.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
        total += value.count_since_last_iteration();
        let quantile = value.quantile_iterated_to();
        let ms = value.value_iterated_to() as f64 / scale;
        if quantile < 1.0 {
            let _ = writeln!(out, "{ms:12.3} {quantile:2.12} {total:10} {:14.2}", 1.0 / (1.0 - quantile));
        } else {
            let _ = writeln!(out, "{ms:12.3} {quantile:2.12} {total:10}");
        }
    }
    let (mean, stdev) =
        if histogram.is_empty() { (0.0, 0.0) } else { (histogram.mean() / scale, histogram.stdev() / scale) };
    let _ = writeln!(out, "#[Mean    = {mean:12.3}, StdDeviation   = {stdev:12.3}]");
    let _ = writeln!(
        out,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        histogram.max() as f64 / scale,
        histogram.len()
    );
    let sub_buckets = histogram.distinct_values() / (usize::from(histogram.buckets()) + 1) * 2;
    let _ = writeln!(out, "#[Buckets = {:12}, SubBuckets     = {:12}]", histogram.buckets(), sub_buckets);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_histogram;

    #[test]
    fn format_has_header_rows_and_footer() {
        let mut h = new_histogram();
        for v in [1_000u64, 2_000, 3_000, 4_000] {
            h.saturating_record(v);
        }
        let text = percentile_distribution(&h);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "       Value     Percentile TotalCount 1/(1-Percentile)");
        assert_eq!(lines[1], "");
        assert!(
            lines[2].starts_with("       1.000 0.000000000000          1           1.00"),
            "{}",
            lines[2]
        );
        let last_row = lines.iter().rev().find(|l| !l.starts_with('#')).unwrap();
        assert!(last_row.contains("1.000000000000          4"), "{last_row}");
        assert!(text.contains("#[Max     =        4.001, Total count    =            4]"), "{text}");
        let counts: Vec<u64> = lines[2..]
            .iter()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap())
            .collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]));
    }
}
