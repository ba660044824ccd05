//! Waiting for a socket to become readable, as one io_uring `POLL_ADD` completion.
//!
//! This is how an idle connection holds no read buffer: it waits on readiness, and only when data is
//! there does it borrow the worker's scratch buffer for a non-blocking `recv` (see `buffers`). The
//! op goes through tokio-uring's public `UnsubmittedOneshot`, which submits any single-completion
//! SQE. Must never: submit a multishot poll (tokio-uring's driver panics on extra completions), or be
//! dropped while in flight and then forgotten: callers keep the future until it completes, and wake
//! it early with `shutdown(2)` on the socket.

use std::io;
use std::os::fd::RawFd;

use io_uring::{cqueue, opcode, types};
use tokio_uring::{InFlightOneshot, OneshotOutputTransform, UnsubmittedOneshot};

/// A `POLL_ADD` for readability (or hang-up/error) submitted to the worker's ring.
pub type Readable = InFlightOneshot<(), ReadableTransform>;

/// Turns the completion into the poll mask, or the error that ended the wait.
pub struct ReadableTransform;

impl OneshotOutputTransform for ReadableTransform {
    type Output = io::Result<u32>;
    type StoredData = ();

    fn transform_oneshot_output(self, _: (), cqe: cqueue::Entry) -> io::Result<u32> {
        let result = cqe.result();
        if result < 0 { Err(io::Error::from_raw_os_error(-result)) } else { Ok(result as u32) }
    }
}

/// Submits a one-shot poll for `fd` becoming readable. The caller must keep `fd` open until the
/// returned future completes (the kernel holds the file for the poll's lifetime anyway).
pub fn readable(fd: RawFd) -> Readable {
    let mask = (libc::POLLIN | libc::POLLRDHUP | libc::POLLERR | libc::POLLHUP) as u32;
    let sqe = opcode::PollAdd::new(types::Fd(fd), mask).build();
    UnsubmittedOneshot::new((), ReadableTransform, sqe).submit()
}

/// Submits a one-shot poll for `fd` becoming writable (a non-blocking connect completing, or
/// failing: errors and hang-ups end the wait too). Same op type and rules as [`readable`].
pub fn writable(fd: RawFd) -> Readable {
    let mask = (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) as u32;
    let sqe = opcode::PollAdd::new(types::Fd(fd), mask).build();
    UnsubmittedOneshot::new((), ReadableTransform, sqe).submit()
}
