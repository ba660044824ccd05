//! The completion-based accept loop: one accept op always in flight per listener.
//!
//! Each accepted socket becomes a connection task on this worker. Over `--max-conns` (counted across
//! all workers) the socket gets a fast 503 instead. When the process runs out of file descriptors
//! (EMFILE/ENFILE) the loop logs at most once a second and backs off briefly instead of spinning.
//! Must never: drop an accept future while it is in flight (an accepted fd would leak): to stop, the
//! listener is shut down, which completes the pending accept, and the loop awaits it.

use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_uring::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::conn::{self, WorkerContext};
use super::drain::DrainSlot;
use crate::metrics::add;

/// How long to wait before accepting again after running out of file descriptors or memory.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts connections until the gateway starts draining. `max_conns` bounds connections across
/// all workers.
pub async fn accept_loop(listener: TcpListener, ctx: Rc<WorkerContext>, max_conns: usize) {
    let mut last_warning: Option<Instant> = None;
    let mut accepting = Box::pin(listener.accept());
    let drain_slot = DrainSlot::default();
    loop {
        if ctx.draining.get() {
            // Stop accepting: shutting the listener down completes the pending accept.
            // SAFETY: shutdown(2) on a descriptor we own has no memory-safety requirements.
            unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
            if let Ok((stream, _)) = accepting.await {
                drop(stream); // accepted in the last instant: close it, we are draining
            }
            ctx.drain.release(&drain_slot);
            return;
        }
        let result = tokio::select! {
            result = &mut accepting => result,
            () = ctx.drain.wait(&drain_slot) => continue,
        };
        accepting = Box::pin(listener.accept());
        match result {
            Ok((stream, _peer)) => admit(stream, &ctx, max_conns),
            Err(error) if is_resource_exhaustion(&error) => {
                let now = Instant::now();
                if last_warning.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
                    warn!(%error, "accept failed: out of file descriptors or memory; backing off \
                           (raise the open-file limit or lower --max-conns)");
                    last_warning = Some(now);
                }
                tokio::time::sleep(RESOURCE_BACKOFF).await;
            }
            Err(error) => debug!(%error, "accept failed"),
        }
    }
}

/// Starts serving an accepted socket, or refusing it when the gateway is full.
fn admit(stream: TcpStream, ctx: &Rc<WorkerContext>, max_conns: usize) {
    let open_before = ctx.open_connections.fetch_add(1, Ordering::Relaxed);
    add(&ctx.stats.connections_accepted, 1);
    add(&ctx.stats.connections_open, 1);
    if open_before >= max_conns {
        add(&ctx.stats.connections_rejected, 1);
        tokio_uring::spawn(conn::reject_over_capacity(stream, Rc::clone(ctx)));
    } else {
        tokio_uring::spawn(conn::serve(stream, Rc::clone(ctx)));
    }
}

fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}
