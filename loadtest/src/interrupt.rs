//! Ctrl-C (SIGINT) and SIGTERM: the run stops early and still reports what it measured.
//!
//! The signal is taken by a thread of its own (`sigwait`), which records when it came on the run
//! clock; every client thread looks at [`requested`] once per loop turn, stops sending, closes its
//! connections and hands its statistics back, so the summary covers the measured window up to the
//! interruption. A second signal exits at once.
//!
//! Must never: run anything in a signal handler (there is none: the signals are blocked in every
//! thread and taken synchronously), or let a run that was cut short look like a complete one.

use std::sync::atomic::{AtomicU64, Ordering};

/// When the run was interrupted (run clock, ns); `u64::MAX` while it was not.
static AT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Records that the run was interrupted at `at` (run clock). The first call wins.
pub fn request(at: u64) {
    let _ = AT.compare_exchange(u64::MAX, at, Ordering::AcqRel, Ordering::Acquire);
}

/// When the run was interrupted, if it was.
pub fn requested() -> Option<u64> {
    Some(AT.load(Ordering::Acquire)).filter(|&at| at != u64::MAX)
}
