//! The client engine: one thread per `--threads`, each running its own tokio-uring runtime, with
//! connections dealt round-robin over the threads. Each thread starts its connections on the
//! ramp-up schedule, runs them, sends a snapshot of its statistics once a second, and hands its
//! final statistics back when its last connection has ended.
//!
//! Must never: share mutable state between threads (each thread's statistics are its own until
//! sent), or block a runtime thread.

mod closed_loop;
mod connect;
mod due;
mod hold;
mod open_loop;
mod pacer;
mod pipelined;
pub mod pubsub;
mod race;
mod sockops;
mod timer;
mod wire;

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::cli::{Mode, Plan};
use crate::clock;
use crate::schedule::Phases;
use crate::stats::{Snapshot, ThreadStats};
use crate::target::Target;

/// A measured message sent more than this after its intended time counts as a late send.
pub const LATE_THRESHOLD: Duration = Duration::from_millis(1);

/// How long a connection may take from the start of its TCP connect to the 101 response.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait for the server's Close (and end of stream) after sending ours.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often threads report to the progress line.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(1);

/// What a client thread tells the main thread.
pub enum Report {
    /// The per-second snapshot of thread `.0`.
    Snapshot(usize, Snapshot),
    /// Thread `.0` finished; its statistics.
    Done(usize, Box<ThreadStats>),
    /// A thread could not start; why, for the operator.
    Failed(String),
}

/// What every task of one thread shares.
pub struct ThreadCtx {
    /// The run's plan.
    pub plan: Arc<Plan>,
    /// The run's phase boundaries.
    pub phases: Phases,
    /// This thread's statistics; borrowed briefly, never across an await.
    pub stats: RefCell<ThreadStats>,
    /// Wakes connections at their scheduled times.
    pub pacer: Rc<pacer::Pacer>,
    /// Pubsub mode's state shared by every thread.
    pub pubsub: Option<Arc<pubsub::Shared>>,
}

/// Starts the client threads. Each reports through `reports`.
pub fn start(
    plan: Arc<Plan>,
    phases: Phases,
    pubsub: Option<Arc<pubsub::Shared>>,
    reports: Sender<Report>,
) -> io::Result<Vec<JoinHandle<()>>> {
    (0..plan.threads)
        .map(|index| {
            let plan = Arc::clone(&plan);
            let reports = reports.clone();
            let pubsub = pubsub.clone();
            std::thread::Builder::new()
                .name(format!("loadtest-{index}"))
                .spawn(move || run_thread(plan, phases, pubsub, index, reports))
        })
        .collect()
}

/// Submission queue entries per thread.
const RING_ENTRIES: u32 = 1024;

/// A ring with COOP_TASKRUN and SINGLE_ISSUER, falling back to plain flags on kernels without them
/// (5.19 and 6.0).
///
/// COOP_TASKRUN matters for honest figures: without it, each completion for this thread's ring is
/// delivered by interrupting this thread's CPU from the CPU that caused it, so every echo the server
/// wrote paid for an inter-processor interrupt that showed up as the *server's* CPU time. Measured
/// pinned at 100 connections x 20 B: ringgate 4.56 -> 3.53 µs per message, this client 4.61 -> 3.56.
fn new_runtime() -> std::io::Result<tokio_uring::Runtime> {
    let mut ring = tokio_uring::uring_builder();
    ring.setup_coop_taskrun().setup_single_issuer();
    match tokio_uring::Runtime::new(tokio_uring::builder().entries(RING_ENTRIES).uring_builder(&ring)) {
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            tokio_uring::Runtime::new(tokio_uring::builder().entries(RING_ENTRIES))
        }
        result => result,
    }
}

fn run_thread(
    plan: Arc<Plan>,
    phases: Phases,
    pubsub: Option<Arc<pubsub::Shared>>,
    index: usize,
    reports: Sender<Report>,
) {
    let runtime = match new_runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = reports.send(Report::Failed(format!("thread {index}: {}", explain_uring_error(&error))));
            return;
        }
    };
    let slack = plan.timer_slack.as_nanos() as u64;
    let ctx = Rc::new(ThreadCtx {
        plan,
        phases,
        stats: RefCell::new(ThreadStats::default()),
        pacer: Rc::new(pacer::Pacer::new(slack)),
        pubsub,
    });
    runtime.block_on(thread_main(Rc::clone(&ctx), index, reports.clone()));
    let stats = ctx.stats.replace(ThreadStats::default());
    let _ = reports.send(Report::Done(index, Box::new(stats)));
}

async fn thread_main(ctx: Rc<ThreadCtx>, index: usize, reports: Sender<Report>) {
    let ticker = tokio_uring::spawn(ticker(Rc::clone(&ctx), index, reports));
    let pacer = tokio_uring::spawn(Rc::clone(&ctx.pacer).drive());
    let plan = Arc::clone(&ctx.plan);
    let mut tasks = Vec::new();
    for conn in (index as u32..plan.conns).step_by(plan.threads) {
        let at = ctx.phases.connect_at(conn, plan.connect_rate);
        if at > clock::now() {
            ctx.pacer.sleep_until(at).await;
        }
        tasks.push(tokio_uring::spawn(connection(Rc::clone(&ctx), conn)));
    }
    for task in tasks {
        // A panicking connection task is a bug; the others go on and the run still reports.
        let _ = task.await;
    }
    ticker.abort();
    ctx.pacer.stop();
    let _ = pacer.await;
}

async fn ticker(ctx: Rc<ThreadCtx>, index: usize, reports: Sender<Report>) {
    let mut next = ctx.phases.begin;
    loop {
        next += SNAPSHOT_INTERVAL.as_nanos() as u64;
        tokio::time::sleep_until(clock::tokio_instant(next)).await;
        let snapshot = ctx.stats.borrow_mut().snapshot();
        if reports.send(Report::Snapshot(index, snapshot)).is_err() {
            return;
        }
    }
}

/// One connection from start to end: connect, handshake, then what the mode says.
async fn connection(ctx: Rc<ThreadCtx>, index: u32) {
    let plan = &ctx.plan;
    ctx.stats.borrow_mut().counters.attempted += 1;
    let source = match plan.source_ips.len() {
        0 => None,
        n => Some(plan.source_ips[index as usize % n]),
    };
    let started = clock::now();
    let deadline = started + HANDSHAKE_TIMEOUT.as_nanos() as u64;
    let role = ctx.pubsub.as_ref().map(|shared| shared.role(index));
    let target = match (&ctx.pubsub, role) {
        (Some(shared), Some(role)) => {
            std::borrow::Cow::Owned(Target { path: shared.path(role), ..plan.target.clone() })
        }
        _ => std::borrow::Cow::Borrowed(&plan.target),
    };
    let established = match connect::open(&target, source, deadline).await {
        Ok(established) => established,
        Err(reason) => {
            ctx.stats.borrow_mut().connect_failed(reason);
            if let (Some(shared), Some(role)) = (&ctx.pubsub, role) {
                shared.connected(role, false);
            }
            return;
        }
    };
    drop(target);
    let now = clock::now();
    ctx.stats.borrow_mut().established(now, now - started);
    let reader = wire::FrameReader::new(established.leftover, plan.size.max(wire::READ_BUFFER));
    let stream = established.stream;
    match (plan.mode, plan.rate, &ctx.pubsub, role) {
        (Mode::Pubsub, Some(rate), Some(shared), Some(role)) => {
            shared.connected(role, true);
            match role {
                pubsub::Role::Subscriber { topic } => {
                    pubsub::subscribe(&ctx, shared, stream, reader, topic).await;
                }
                pubsub::Role::Publisher { id, .. } => {
                    pubsub::publish(&ctx, shared, stream, reader, id, rate).await;
                }
            }
        }
        (Mode::Echo, Some(rate), ..) => open_loop::run(&ctx, stream, reader, rate, now).await,
        (Mode::Echo, None, ..) if plan.pipeline > 1 => pipelined::run(&ctx, stream, reader).await,
        (Mode::Echo, None, ..) => closed_loop::run(&ctx, stream, reader).await,
        (Mode::Connect | Mode::Pubsub, ..) => hold::run(&ctx, stream, reader).await,
    }
    ctx.stats.borrow_mut().counters.open -= 1;
}

/// Turns a failure to create an io_uring instance into advice.
fn explain_uring_error(error: &io::Error) -> String {
    let cause = match error.raw_os_error() {
        Some(libc::EPERM) => {
            "io_uring is not permitted: a seccomp profile blocks it (Docker's default does; run with \
             --security-opt seccomp=unconfined or a profile allowing io_uring_setup), or \
             sysctl kernel.io_uring_disabled is set (0 enables it for everyone)"
        }
        Some(libc::ENOSYS) => "this kernel has no io_uring (Linux 5.11 or later is needed)",
        Some(libc::ENOMEM) => {
            "not enough locked memory for the ring: raise RLIMIT_MEMLOCK (ulimit -l) or use a kernel \
             5.12 or later, which accounts ring memory differently"
        }
        _ => "io_uring_setup failed",
    };
    format!("cannot start an io_uring runtime: {error}. {cause}")
}
