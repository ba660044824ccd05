//! Ctrl-C (SIGINT) and SIGTERM: the run stops early and still reports what it measured.
//!
//! The signal is taken by a thread of its own (`sigwait`), which records when it came on the run
//! clock; every client thread looks at [`requested`] once per loop turn, stops sending, closes its
//! connections and hands its statistics back, so the summary covers the measured window up to the
//! interruption. A second signal exits at once.
//!
//! Must never: run anything in a signal handler (there is none: the signals are blocked in every
//! thread and taken synchronously), or let a run that was cut short look like a complete one.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::clock;

/// The exit status of an interrupted run, as a shell reports a process killed by SIGINT (128 + 2),
/// so scripts tell a cut-short run from a complete one.
pub const EXIT_STATUS: u8 = 130;

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

/// Blocks SIGINT and SIGTERM in the calling thread, and so in every thread it starts afterwards,
/// and starts the thread that takes them. Call it before starting the client threads: a thread
/// started earlier would still die of the signal's default action.
pub fn take_signals() -> io::Result<()> {
    // The gateway's own: blocked here, taken synchronously by one thread.
    ringgate::io::block_shutdown_signals()?;
    std::thread::Builder::new().name("loadtest-signals".into()).spawn(take)?;
    Ok(())
}

/// The signal thread: the first signal asks the run to stop, the second ends the process.
fn take() {
    loop {
        ringgate::io::wait_for_shutdown_signal();
        if requested().is_some() {
            eprintln!("loadtest: interrupted again, quitting without a report");
            std::process::exit(i32::from(EXIT_STATUS));
        }
        request(clock::now());
        eprintln!("loadtest: interrupted, finishing and reporting what was measured (again to quit at once)");
    }
}
