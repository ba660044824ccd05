//! Precise sleeps for the send schedule: an io_uring absolute timeout (IORING_OP_TIMEOUT with
//! IORING_TIMEOUT_ABS on CLOCK_MONOTONIC), submitted through tokio-uring's public
//! `UnsubmittedOneshot`.
//!
//! tokio's timer has 1 ms granularity: an open-loop message scheduled with it is sent up to a
//! millisecond late, and that lateness is charged to the server's latency. The kernel's hrtimer
//! fires within microseconds, so the schedule is kept to what the machine can do.
//!
//! Used by the per-thread [`super::pacer::Pacer`] only: one armed timeout per thread, not one per
//! message (each armed hrtimer is a timer reprogramming, costly in a VM).
//!
//! Must never: be used for deadlines that are usually abandoned (a dropped timeout stays in the
//! ring until it fires); use `tokio::time` for those. The op is single-shot, never multishot.

use io_uring::{opcode, types};
use tokio_uring::{InFlightOneshot, OneshotOutputTransform, UnsubmittedOneshot};

use crate::clock;

/// The in-flight timeout; resolves when the time has come.
pub type Sleep = InFlightOneshot<Box<types::Timespec>, Expired>;

/// Turns the timeout's completion into `()`: -ETIME (expired) is the normal result, and any other
/// (-ECANCELED when the runtime shuts down) ends the wait just the same.
#[derive(Debug)]
pub struct Expired;

impl OneshotOutputTransform for Expired {
    type Output = ();
    type StoredData = Box<types::Timespec>;

    fn transform_oneshot_output(self, _data: Self::StoredData, _cqe: io_uring::cqueue::Entry) {}
}

/// Sleeps until `at` on the run clock. The timeout is submitted now; the returned future resolves
/// when it fires. Must be called inside a tokio-uring runtime.
pub fn sleep_until(at: u64) -> Sleep {
    let absolute = clock::epoch() + at;
    // Boxed so that its address is stable for the kernel while the op is in flight; tokio-uring
    // keeps the box alive until the completion arrives even if the future is dropped.
    let timespec = Box::new(
        types::Timespec::new().sec(absolute / 1_000_000_000).nsec((absolute % 1_000_000_000) as u32),
    );
    let sqe =
        opcode::Timeout::new(&*timespec as *const types::Timespec).flags(types::TimeoutFlags::ABS).build();
    UnsubmittedOneshot::new(timespec, Expired, sqe).submit()
}
