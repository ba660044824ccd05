//! `loadtest`: ringgate's bundled WebSocket load generator.
//!
//! Opens `--conns` connections on io_uring (ringgate's own driver, one loop per thread; epoll where
//! io_uring is blocked), sends messages on
//! a fixed schedule or ping-pong, verifies every echo, and reports coordinated-omission-corrected
//! latency percentiles from HdrHistogram. The protocol itself is `ringgate::proto`'s; this crate
//! is scheduling, measurement and reporting.
//!
//! `main` only wires the parts together: parse, check limits, take Ctrl-C, run the engine, report,
//! and exit with a status that says how the run went: 0 complete and clean, 1 failed connections or
//! errors (0 with `--allow-errors`) or no connection at all, 2 a usage error, 130 interrupted.
//! Must never: hide a failure (a run with no connection established, or with errors and no
//! `--allow-errors`, exits non-zero), or let an interrupted run exit 0.

mod cli;
mod clock;
mod cpu;
mod engine;
mod hgrm;
mod interrupt;
mod limits;
mod payload;
mod plot;
mod progress;
mod report;
mod schedule;
mod stats;
mod target;
mod tls;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

use crate::cli::{Args, Mode};
use crate::report::{Ending, PubSubTotals, Summary};
use crate::schedule::Phases;

/// Time between fixing the schedule and the first connection, for the threads to start.
const LEAD_TIME: Duration = Duration::from_millis(50);

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("loadtest: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<ExitCode> {
    let plan = match args.into_plan() {
        Ok(plan) => plan,
        Err(error) => {
            // A flag value that makes no sense: a usage error, like clap's own (exit status 2).
            eprintln!("loadtest: error: {error:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let nofile = limits::raise_nofile()?;
    limits::check_fds(plan.conns, nofile)?;
    limits::check_ports(plan.conns, plan.source_ips.len(), limits::ephemeral_ports()?)?;

    clock::epoch();
    // Before any client thread starts, so that every thread inherits the blocked signals.
    interrupt::take_signals().context("taking SIGINT and SIGTERM on a thread of their own")?;
    let phases = Phases::new(&plan, clock::now() + LEAD_TIME.as_nanos() as u64);
    if !plan.quiet {
        let what = match (plan.mode, plan.rate) {
            (Mode::Connect, _) => "holding idle connections".to_string(),
            (Mode::Echo, Some(rate)) => format!("open loop, {rate} msg/s per connection"),
            (Mode::Echo, None) => format!("closed loop{}", report::in_flight(plan.pipeline)),
            (Mode::Pubsub, rate) => {
                let l = plan.pubsub.as_ref().context("pubsub layout")?;
                format!(
                    "pubsub: {} publishers at {} msg/s, {} subscribers, {} topics",
                    l.publishers,
                    rate.unwrap_or(0.0),
                    l.subscribers,
                    l.topics
                )
            }
        };
        eprintln!(
            "loadtest: {} connections to {} ({}), {} B{}, ramp {:.2}s + warmup {:.1}s + {:.1}s, {} threads",
            plan.conns,
            plan.targets.iter().map(|target| target.url()).collect::<Vec<_>>().join(", "),
            what,
            plan.size,
            if plan.deflate { " (permessage-deflate offered)" } else { "" },
            plan.ramp().as_secs_f64(),
            plan.warmup.as_secs_f64(),
            plan.duration.as_secs_f64(),
            plan.threads,
        );
    }
    // `--ca`'s file is read once, here, before any connection starts.
    let tls = plan.trust.as_ref().map(tls::client_config).transpose()?;
    let (backend, fallback) = engine::choose_backend(plan.io)?;
    if let Some(cause) = fallback {
        eprintln!("loadtest: io_uring is not usable here, running on epoll: {cause}");
    }
    let plan = Arc::new(plan);
    let cpu_at_start = cpu::CpuTime::now();
    let (reports, received) = mpsc::channel();
    let pubsub = plan.pubsub.as_ref().map(|layout| Arc::new(engine::pubsub::Shared::new(layout)));
    let threads = engine::start(Arc::clone(&plan), phases, backend, pubsub.clone(), tls, reports)
        .context("starting client threads")?;
    let stats = progress::collect(&plan, &phases, received)?;
    for thread in threads {
        let _ = thread.join();
    }

    let cpu = cpu::CpuTime::now().since(cpu_at_start);
    let totals = pubsub.map(|shared| {
        let pairs_expected = shared.pairs_expected();
        PubSubTotals {
            deliveries_expected: pairs_expected.iter().sum(),
            pairs_expected,
            publish_start: shared.publish_start(),
        }
    });
    let ending = Ending { interrupted_at: interrupt::requested() };
    let summary = Summary::new(&plan, &phases, &stats, cpu, totals.as_ref(), ending);
    print!("{}", summary.text());
    if let Some(path) = &plan.json {
        summary.write_json(path)?;
    }
    if let Some(path) = &plan.hgrm {
        std::fs::write(path, hgrm::percentile_distribution(&stats.latency))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &plan.plot {
        let title = format!("{} — {} connections, {} B", summary.config.url, plan.conns, plan.size);
        let series: Vec<(&str, &hdrhistogram::Histogram<u64>)> = match plan.mode {
            Mode::Echo => vec![("message latency", &stats.latency), ("handshake", &stats.handshake)],
            Mode::Pubsub if plan.targets.len() > 1 => vec![
                ("delivery latency", &stats.latency),
                ("cross-node delivery latency", &stats.cross_latency),
                ("handshake", &stats.handshake),
            ],
            Mode::Pubsub => vec![("delivery latency", &stats.latency), ("handshake", &stats.handshake)],
            Mode::Connect => vec![("handshake", &stats.handshake)],
        };
        plot::percentile_curve(path, &title, &series)?;
    }
    let verdict = summary.verdict(plan.allow_errors);
    if let Some(reason) = &verdict.reason {
        eprintln!("loadtest: {reason}");
    }
    Ok(ExitCode::from(verdict.status))
}
