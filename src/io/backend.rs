//! The interface between a worker's loop and whatever moves its bytes: the io_uring driver
//! (`driver`) or the epoll fallback (`epoll`).
//!
//! The loop asks for operations on sockets named by a [`Token`]; the backend reports their
//! outcomes as [`Event`]s, completion-shaped whichever backend runs: data that arrived (in a buffer
//! the backend lends for the duration of the call), a send that finished, a connect that finished.
//! The epoll backend performs a send or connect at once and queues its outcome as an event for
//! the next wait, so the loop and the connection state machines are the same code on both.
//!
//! Must never: deliver an event for an operation that was not asked for, or lose the bytes of a
//! receive that ended early (a receive that stops, for an empty buffer ring or a cancellation, is
//! reported as [`Received::Stopped`] and the data stays in the socket for the next one).

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

use super::outgoing::Outgoing;
use super::token::Token;

/// What a receive produced.
pub enum Received<'a> {
    /// Bytes, in a buffer the backend lends until the handler returns: processed in place
    /// (handshake parsing, unmasking), anything unfinished copied out.
    Data(&'a mut [u8]),
    /// The peer closed its side (or reset the connection).
    Eof,
    /// The receive ended without data or error: the buffer ring was empty, or it was cancelled.
    /// Nothing is lost; the loop starts another if it still wants to read.
    Stopped,
    /// The socket failed.
    Error(io::Error),
}

/// One outcome reported by a backend. Every variant names the operation's owner by the [`Token`]
/// it was started with, so that a late outcome for a closed owner is recognised and dropped.
pub enum Event<'a> {
    /// A receive produced something.
    Recv {
        /// The receive's owner.
        token: Token,
        /// What came.
        received: Received<'a>,
        /// False when the receive has ended and must be started again to read further.
        more: bool,
        /// When the data reached the socket (CLOCK_REALTIME ns, the kernel's stamp), if receive
        /// timestamps are on ([`Backend::stamp_receives`]) and the kernel gave one.
        arrived: Option<u64>,
    },
    /// A send finished.
    Sent {
        /// The send's owner.
        token: Token,
        /// Bytes written (possibly fewer than asked, or 0: try again), or the error.
        result: io::Result<usize>,
    },
    /// A connect finished.
    Connected {
        /// The connect's owner.
        token: Token,
        /// Whether the socket is connected.
        result: io::Result<()>,
    },
    /// A listener accepted a socket (or failed to).
    Accepted {
        /// The listener's index.
        listener: usize,
        /// The new socket, or why there is none.
        result: io::Result<RawFd>,
        /// False when accepting has ended and must be started again.
        more: bool,
    },
    /// Another thread woke the worker (pub/sub hand-offs, drain).
    Woken,
}

/// Counters a backend keeps about itself, for `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackendCounters {
    /// Receives that ended because the provided-buffer ring was empty (io_uring only).
    pub buffer_ring_empty: u64,
    /// Times the completion queue overflowed (io_uring only; the kernel kept the completions).
    pub cq_overflows: u64,
    /// Multishot operations started again after the kernel ended them.
    pub multishot_rearms: u64,
    /// Events handled, and loop turns that handled them, for events per turn.
    pub events: u64,
    /// Waits for events (loop turns).
    pub turns: u64,
}

/// What a worker's loop needs from an io backend. Each method only queues or performs the
/// operation; outcomes come back through [`Backend::wait`].
pub trait Backend {
    /// The name `/metrics` and the log give this backend.
    fn name(&self) -> &'static str;

    /// Takes a freshly accepted or connected socket under the backend's care (the epoll backend
    /// registers it; io_uring needs nothing).
    fn attach(&mut self, fd: RawFd, token: Token) -> io::Result<()>;

    /// Starts accepting on listener number `index`.
    fn accept(&mut self, index: usize, listener: RawFd);

    /// Starts (or restarts) receiving on `fd`; results come as `Event::Recv` for `token`.
    fn start_recv(&mut self, fd: RawFd, token: Token);

    /// Stops receiving on `fd`. Returns whether a final `Event::Recv` with `more: false` will
    /// still come (io_uring: the cancelled receive completes; epoll: nothing is in flight).
    fn stop_recv(&mut self, fd: RawFd, token: Token) -> bool;

    /// Sends what `out` holds (preparing its message header when it is several frames). `out`
    /// must stay where it is, untouched, until the `Event::Sent` for `token` arrives.
    fn send(&mut self, fd: RawFd, token: Token, out: &mut Outgoing);

    /// Connects `fd` to `addr`; `addr` must stay where it is until `Event::Connected` arrives.
    fn connect(&mut self, fd: RawFd, token: Token, addr: &socket2::SockAddr);

    /// Closes a socket that has nothing in flight.
    fn close(&mut self, fd: RawFd);

    /// Makes a socket for an upstream connection to `addr`, set up the way this backend drives
    /// sockets (blocking for io_uring, non-blocking for epoll).
    fn upstream_socket(&self, addr: SocketAddr) -> io::Result<socket2::Socket>;

    /// Submits what is queued, waits until something happens or `timeout` passes (`None`: no
    /// limit; zero: do not wait), and hands every event to `handle`.
    fn wait(&mut self, timeout: Option<Duration>, handle: &mut dyn FnMut(Event<'_>)) -> io::Result<()>;

    /// From now on, receives report when their data reached the socket (`Event::Recv::arrived`),
    /// for sockets that have kernel timestamps on ([`crate::io::stamp::enable`]). For a reader
    /// that batches its wake-ups and still wants exact arrival times (the load generator); the
    /// gateway never asks.
    fn stamp_receives(&mut self);

    /// From now on, a sleeping wait that has a completion waits up to `window` for more before it
    /// returns (never past its own timeout): fewer wake-ups, for a caller whose receives carry
    /// their arrival times ([`Backend::stamp_receives`]) so that handling them late costs nothing.
    /// Returns whether this backend can (io_uring's min-wait, Linux 6.12); epoll cannot.
    fn coalesce_waits(&mut self, window: Duration) -> bool;

    /// How many receives stopped by an empty buffer pool may start again per loop turn: about
    /// what the pool can serve at once, so that a dry pool is refilled before everyone asks again.
    fn rearm_budget(&self) -> usize;

    /// The backend's own counters so far.
    fn counters(&self) -> BackendCounters;
}
