//! One worker: a thread with its own tokio-uring runtime and its own `SO_REUSEPORT` listener per
//! listen address. The kernel spreads incoming connections over the workers' listeners, so workers
//! share nothing on the hot path (only relaxed counters).
//!
//! Must never: panic on a setup failure (the error goes back to the main thread, which exits with a
//! message), or exit before its connections have drained or the main thread gives up on them.

use std::io;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use tokio_uring::net::TcpListener;

use super::accept::accept_loop;
use super::conn::WorkerContext;
use crate::gateway::pubsub::Delivery;

/// Submission queue size: enough for a burst of accepts and writes per loop turn; completions get
/// twice as many slots, and the kernel buffers overflow beyond that.
const RING_ENTRIES: u32 = 4096;

/// Everything a worker thread needs, built on the main thread (`WorkerContext` itself is `!Send`,
/// being per-thread, so the thread assembles it).
pub struct WorkerSetup {
    /// The worker's number, for thread names and logs.
    pub index: usize,
    /// Bound, listening sockets: one per `--listen` address.
    pub listeners: Vec<std::net::TcpListener>,
    /// Builds the worker's context on its own thread.
    pub context: Box<dyn FnOnce() -> WorkerContext + Send>,
    /// Connection cap across all workers.
    pub max_conns: usize,
    /// Becomes `true` when the gateway starts draining.
    pub drain: tokio::sync::watch::Receiver<bool>,
    /// Pub/sub messages other workers hand to this one.
    pub deliveries: tokio::sync::mpsc::UnboundedReceiver<Delivery>,
}

/// Starts the worker thread. It reports on `ready` whether its io_uring could be set up, then serves
/// until draining ends, then reports on `done`.
pub fn spawn(
    setup: WorkerSetup,
    ready: mpsc::Sender<io::Result<()>>,
    done: mpsc::Sender<usize>,
) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new().name(format!("ringgate-w{}", setup.index)).spawn(move || {
        let runtime = match new_runtime() {
            Ok(runtime) => runtime,
            Err(error) => {
                let _ = ready.send(Err(error));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        runtime.block_on(serve(setup, done));
    })
}

/// A runtime with the ring flags that help a thread-per-core server, falling back to plain flags on
/// kernels that lack them (COOP_TASKRUN: 5.19, SINGLE_ISSUER: 6.0).
fn new_runtime() -> io::Result<tokio_uring::Runtime> {
    let mut tuned = tokio_uring::uring_builder();
    tuned.setup_coop_taskrun().setup_single_issuer();
    let with_flags =
        tokio_uring::Runtime::new(tokio_uring::builder().entries(RING_ENTRIES).uring_builder(&tuned));
    match with_flags {
        Ok(runtime) => Ok(runtime),
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            tokio_uring::Runtime::new(tokio_uring::builder().entries(RING_ENTRIES))
        }
        Err(error) => Err(error),
    }
}

async fn serve(setup: WorkerSetup, done: mpsc::Sender<usize>) {
    let ctx = Rc::new((setup.context)());
    let mut drain = setup.drain;
    let drain_ctx = Rc::clone(&ctx);
    let mut deliveries = setup.deliveries;
    let broker = Rc::clone(&ctx.broker);
    tokio_uring::spawn(async move {
        while let Some(delivery) = deliveries.recv().await {
            broker.deliver(&delivery);
        }
    });
    tokio_uring::spawn(async move {
        // A closed channel means the main thread is gone: drain as well.
        let _ = drain.wait_for(|draining| *draining).await;
        drain_ctx.draining.set(true);
        drain_ctx.drain.start();
    });
    let mut accept_loops = Vec::new();
    for listener in setup.listeners {
        let listener = TcpListener::from_std(listener);
        accept_loops.push(tokio_uring::spawn(accept_loop(listener, Rc::clone(&ctx), setup.max_conns)));
    }
    for handle in accept_loops {
        let _ = handle.await;
    }
    // Accepting has stopped (draining); wait for this worker's connections to finish their closing
    // handshakes (idle HTTP keep-alive connections are not waited for). The main thread stops
    // waiting at --drain-timeout.
    while ctx.stats.connections_open.load(Ordering::Relaxed) > ctx.keepalive_connections.get() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = done.send(setup.index);
    // Keep serving the idle keep-alive connections (their requests are answered `Connection:
    // close`, /healthz with 503) until every worker is done and the process exits.
    std::future::pending::<()>().await;
}
