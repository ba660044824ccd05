//! The load generator's own CPU time (getrusage of this process), so every report states what the
//! measurement cost: a tool that saturates its cores measures itself, not the server.
//!
//! Must never: include child processes or other processes' time.

use std::time::Duration;

/// User and system CPU time consumed by this process so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTime {
    /// Time in user space.
    pub user: Duration,
    /// Time in the kernel on our behalf (io_uring submissions, TCP).
    pub sys: Duration,
}

impl CpuTime {
    /// Reads RUSAGE_SELF (all threads of this process).
    pub fn now() -> CpuTime {
        // SAFETY: an all-zero rusage is a valid value; getrusage only writes into it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: RUSAGE_SELF with a valid pointer cannot fail.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        let time = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1_000);
        CpuTime { user: time(usage.ru_utime), sys: time(usage.ru_stime) }
    }

    /// The time used since `earlier`.
    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime { user: self.user.saturating_sub(earlier.user), sys: self.sys.saturating_sub(earlier.sys) }
    }

    /// User plus system time.
    pub fn total(self) -> Duration {
        self.user + self.sys
    }
}

/// CPU time (user and system) the calling thread has used, in nanoseconds: what a client thread
/// samples at the start and end of the measured window, to tell whether it was saturated.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_THREAD_CPUTIME_ID exists on
    // every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
