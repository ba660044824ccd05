//! The main thread's side of a run: collects the client threads' reports, prints one progress line
//! per second (connections open, messages per second each way, the last second's p99, late sends,
//! errors; the phase reads `stop` once the run was interrupted), and merges the threads' final
//! statistics.
//!
//! Must never: slow the client threads down (they send and forget; all merging happens here), or
//! wait forever for a thread that died (a dropped channel ends the run with an error).

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::cli::Plan;
use crate::clock;
use crate::engine::{Report, SNAPSHOT_INTERVAL};
use crate::interrupt;
use crate::schedule::Phases;
use crate::stats::{Counters, ThreadStats, new_histogram};

/// Receives reports until every thread is done; returns the merged statistics.
pub fn collect(plan: &Plan, phases: &Phases, reports: Receiver<Report>) -> Result<ThreadStats> {
    let mut latest = vec![Counters::default(); plan.threads];
    let mut merged = ThreadStats::default();
    let mut interval = new_histogram();
    let mut done = 0;
    let step = SNAPSHOT_INTERVAL.as_nanos() as u64;
    // Print shortly after the threads' snapshot ticks, so each line has every thread's numbers.
    let mut next_print = phases.begin + step + step / 10;
    let mut last = (phases.begin, 0u64, 0u64);
    while done < plan.threads {
        let wait = Duration::from_nanos(next_print.saturating_sub(clock::now()));
        match reports.recv_timeout(wait) {
            Ok(Report::Snapshot(thread, snapshot)) => {
                latest[thread] = snapshot.counters;
                let _ = interval.add(&snapshot.interval);
            }
            Ok(Report::Done(thread, stats)) => {
                latest[thread] = stats.counters;
                let _ = interval.add(&stats.interval);
                merged.merge(&stats);
                done += 1;
            }
            Ok(Report::Failed(why)) => bail!(why),
            Err(RecvTimeoutError::Timeout) => {
                let now = clock::now();
                let total = latest.iter().fold(Counters::default(), |mut sum, c| {
                    sum.open += c.open;
                    sum.total_sent += c.total_sent;
                    sum.total_received += c.total_received;
                    sum.late_sends += c.late_sends;
                    sum.errors += c.errors;
                    sum.attempted += c.attempted;
                    sum
                });
                if !plan.quiet {
                    let secs = (now - last.0) as f64 / 1e9;
                    let p99 = if interval.is_empty() {
                        "-".to_string()
                    } else {
                        format!("{:.3} ms", interval.value_at_quantile(0.99) as f64 / 1e3)
                    };
                    eprintln!(
                        "[{:6.1}s {:<6}] open {}/{}  sent {:.0}/s  recv {:.0}/s  p99 {p99}  late {}  errors {}",
                        now.saturating_sub(phases.begin) as f64 / 1e9,
                        phase_name(phases, now),
                        total.open,
                        total.attempted,
                        (total.total_sent - last.1) as f64 / secs,
                        (total.total_received - last.2) as f64 / secs,
                        total.late_sends,
                        total.errors,
                    );
                }
                last = (now, total.total_sent, total.total_received);
                interval.reset();
                next_print += step;
            }
            Err(RecvTimeoutError::Disconnected) => {
                bail!("a client thread ended without reporting (it panicked; see above)")
            }
        }
    }
    Ok(merged)
}

fn phase_name(phases: &Phases, now: u64) -> &'static str {
    if interrupt::requested().is_some() {
        "stop"
    } else if now < phases.ramp_end {
        "ramp"
    } else if now < phases.measure_start {
        "warmup"
    } else if now < phases.end {
        "run"
    } else {
        "drain"
    }
}
