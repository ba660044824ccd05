//! The client engine: one thread per `--threads`, each a loop over ringgate's own io backend (the
//! io_uring driver, or its epoll fallback: `--io`) and a table of connection state machines, with
//! connections dealt round-robin over the threads. Each thread starts its connections on the
//! ramp-up schedule, runs them, sends a snapshot of its statistics once a second, and hands its
//! final statistics back when its last connection has ended.
//!
//! Why ringgate's backend and not a client driver of our own: a client needs what the gateway's
//! driver already does (multishot receive into a provided-buffer ring, sends from a connection's
//! own buffer, connects, one `io_uring_enter` per loop turn) and nothing it lacks; sharing it means
//! loadtest runs wherever the gateway does, on the same two backends, and the figures of both
//! sides come from the same io code.
//!
//! `wss://`: each connection's TLS session ([`tls`], rustls' unbuffered API) sits between its
//! socket and its WebSocket state machine, on either backend: the backends move ciphertext, the
//! session turns it into the plaintext the machine reads, and the machine's frames into records.
//!
//! Must never: share mutable state between threads (each thread's statistics are its own until
//! sent), or block a thread.

mod conn;
mod due;
mod env;
pub mod pubsub;
mod thread;
mod tls;
mod traffic;
mod wheel;
mod window;
mod wire;

use std::io;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Duration;

use ringgate::config::IoChoice;
use ringgate::io::{Backend, BackendKind, EpollBackend, UringBackend, WakeFd, select_backend};
use rustls::ClientConfig;

use crate::cli::Plan;
use crate::schedule::Phases;
use crate::stats::{Snapshot, ThreadStats};
use thread::ClientThread;

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

/// Picks the io backend for `choice` (`auto`: io_uring where it works, else epoll); returns it
/// and, when `auto` fell back, why, for the operator.
pub fn choose_backend(choice: IoChoice) -> io::Result<(BackendKind, Option<String>)> {
    // No kernel min-wait: the engine batches its own waits (`Backend::batch_waits`), bounded by
    // its timers, so sends keep their schedule.
    match select_backend(choice, Duration::ZERO) {
        Ok(selection) => Ok((selection.kind, selection.fallback.map(|cause| cause.to_string()))),
        Err(error) => Err(io::Error::other(error.to_string())),
    }
}

/// Starts the client threads on backend `kind`, their connections speaking TLS with `tls` when
/// given (`wss://`). Each reports through `reports`.
pub fn start(
    plan: Arc<Plan>,
    phases: Phases,
    kind: BackendKind,
    pubsub: Option<Arc<pubsub::Shared>>,
    tls: Option<Arc<ClientConfig>>,
    reports: Sender<Report>,
) -> io::Result<Vec<JoinHandle<()>>> {
    (0..plan.threads)
        .map(|index| {
            let plan = Arc::clone(&plan);
            let reports = reports.clone();
            let pubsub = pubsub.clone();
            let tls = tls.clone();
            std::thread::Builder::new()
                .name(format!("loadtest-{index}"))
                .spawn(move || run_thread(plan, phases, kind, pubsub, tls, index, reports))
        })
        .collect()
}

fn run_thread(
    plan: Arc<Plan>,
    phases: Phases,
    kind: BackendKind,
    pubsub: Option<Arc<pubsub::Shared>>,
    tls: Option<Arc<ClientConfig>>,
    index: usize,
    reports: Sender<Report>,
) {
    let thread = ClientThread::new(index, plan, phases, pubsub, tls);
    let result = WakeFd::new().and_then(|wake| match kind {
        BackendKind::Uring(setup, _) => {
            let mut backend = UringBackend::new(setup, wake.fd())?;
            drive(thread, &mut backend, &reports)
        }
        BackendKind::Epoll => {
            let mut backend = EpollBackend::new(wake.fd())?;
            drive(thread, &mut backend, &reports)
        }
    });
    match result {
        Ok(stats) => {
            let _ = reports.send(Report::Done(index, Box::new(stats)));
        }
        Err(error) => {
            let _ = reports.send(Report::Failed(format!("thread {index}: {}", explain_io_error(&error))));
        }
    }
}

fn drive<B: Backend>(
    thread: ClientThread,
    backend: &mut B,
    reports: &Sender<Report>,
) -> io::Result<ThreadStats> {
    let stats = thread.run(backend, reports);
    // For sizing the engine (turns per message is what a message costs in wake-ups).
    if std::env::var_os("LOADTEST_IO_COUNTERS").is_some() {
        let c = backend.counters();
        eprintln!("loadtest: {} backend: {} loop turns, {} events", backend.name(), c.turns, c.events);
    }
    stats
}

/// Turns a failure to set up or run the io backend into advice.
fn explain_io_error(error: &io::Error) -> String {
    let cause = match error.raw_os_error() {
        Some(libc::EPERM) => {
            "io_uring is not permitted: a seccomp profile blocks it (Docker's default does), or \
             sysctl kernel.io_uring_disabled is set; run with --io epoll"
        }
        Some(libc::ENOSYS) => "this kernel has no io_uring; run with --io epoll",
        Some(libc::ENOMEM) => "not enough locked memory for the ring: raise RLIMIT_MEMLOCK (ulimit -l)",
        _ => return format!("io failed: {error}"),
    };
    format!("cannot run the io backend: {error}. {cause}")
}
