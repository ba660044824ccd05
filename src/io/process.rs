//! Process-wide concerns of a server: the open-file limit and the shutdown signals.
//!
//! Must never: install a signal handler that does work inside the handler; signals are blocked in
//! every thread and taken synchronously with `sigwait` on the main thread.

use std::io;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, since every connection is a descriptor.
/// Returns the soft limit now in force.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

/// The signals taken synchronously: SIGINT and SIGTERM ask the gateway to drain (and, the second
/// time, to exit at once); SIGHUP asks it to read its key files again.
fn handled_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and modify the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and every thread it starts afterwards,
/// so that they are only ever taken by [`wait_for_signal`] (a process that never waits for SIGHUP
/// ignores it).
pub fn block_shutdown_signals() -> io::Result<()> {
    let set = handled_signals();
    // SAFETY: pthread_sigmask reads the set we pass; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 { Err(io::Error::from_raw_os_error(rc)) } else { Ok(()) }
}

/// Waits until SIGINT, SIGTERM or SIGHUP arrives and returns its number.
pub fn wait_for_signal() -> i32 {
    let set = handled_signals();
    let mut signal = 0;
    // SAFETY: sigwait reads the set and writes the signal number into our local.
    while unsafe { libc::sigwait(&set, &mut signal) } != 0 {}
    signal
}

/// Waits until SIGINT or SIGTERM arrives and returns its number (a SIGHUP meanwhile is ignored).
pub fn wait_for_shutdown_signal() -> i32 {
    loop {
        let signal = wait_for_signal();
        if signal != libc::SIGHUP {
            return signal;
        }
    }
}
