//! The run's one clock: CLOCK_MONOTONIC in nanoseconds since a process-wide epoch taken at start.
//!
//! Every timestamp in the program (schedules, payloads, latencies, the pacing wheel)
//! is on this clock, so they can be compared and subtracted without conversions.
//!
//! Must never: go backwards, or be read through a clock that can be adjusted (wall time).

use std::sync::OnceLock;

static EPOCH: OnceLock<u64> = OnceLock::new();

/// Nanoseconds on CLOCK_MONOTONIC (the clock io_uring's absolute timeouts use).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Fixes the epoch (idempotent) and returns it as CLOCK_MONOTONIC nanoseconds.
pub fn epoch() -> u64 {
    *EPOCH.get_or_init(monotonic_ns)
}

/// Nanoseconds since the epoch.
pub fn now() -> u64 {
    monotonic_ns().saturating_sub(epoch())
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, in nanoseconds: what turns the kernel's receive
/// timestamps (realtime) into run-clock times. Sampled once per loop turn, so that a clock
/// adjustment during the run shifts at most one turn's stamps.
pub fn realtime_offset() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_REALTIME always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    let realtime = ts.tv_sec * 1_000_000_000 + ts.tv_nsec;
    realtime - monotonic_ns() as i64
}

/// The run-clock time of a kernel receive stamp `realtime_ns`, given the current
/// [`realtime_offset`]; never later than `now` (a stamp cannot be from the future).
pub fn from_realtime(realtime_ns: u64, offset: i64, now: u64) -> u64 {
    let monotonic = (realtime_ns as i64).saturating_sub(offset).max(0) as u64;
    monotonic.saturating_sub(epoch()).min(now)
}

/// Converts nanoseconds to whole microseconds, the unit of every histogram.
pub fn ns_to_us(ns: u64) -> u64 {
    ns / 1_000
}
