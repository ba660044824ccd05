//! Waking a worker from another thread: an eventfd the worker's backend always reads.
//!
//! Pub/sub hand-offs from other workers and the start of draining reach a worker this way. Wakes
//! coalesce: only the first wake after the worker last looked writes to the eventfd, so a burst of
//! hand-offs costs the publishing thread one system call, not one per message.
//!
//! Must never: lose a wake (the worker clears the flag *before* it looks at what it was woken for,
//! so anything queued after that look sets the flag again and writes).

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Wake;

/// One worker's wake-up descriptor.
pub struct WakeFd {
    fd: RawFd,
    pending: AtomicBool,
}

impl WakeFd {
    /// A fresh eventfd.
    pub fn new() -> io::Result<Arc<WakeFd>> {
        // SAFETY: eventfd has no memory-safety requirements.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(WakeFd { fd, pending: AtomicBool::new(false) }))
    }

    /// The descriptor the worker's backend reads.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Wakes the worker unless a wake is already on its way.
    pub fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: an 8-byte write from a u64 we own.
            unsafe { libc::write(self.fd, (&raw const one).cast(), 8) };
        }
    }

    /// The worker is about to look at what it was woken for: later wakes must write again.
    pub fn clear(&self) {
        self.pending.store(false, Ordering::Release);
    }
}

impl Wake for WakeFd {
    fn wake(self: Arc<Self>) {
        WakeFd::wake(&self);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        WakeFd::wake(self);
    }
}

impl Drop for WakeFd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::WakeFd;

    fn counter(fd: i32) -> Option<u64> {
        let mut value = 0u64;
        // SAFETY: an 8-byte read into a u64 we own.
        let n = unsafe { libc::read(fd, (&raw mut value).cast(), 8) };
        (n == 8).then_some(value)
    }

    #[test]
    fn a_burst_of_wakes_writes_once_and_a_wake_after_clear_writes_again() {
        let wake = WakeFd::new().expect("eventfd");
        wake.wake();
        wake.wake();
        wake.wake();
        assert_eq!(counter(wake.fd()), Some(1));
        assert_eq!(counter(wake.fd()), None, "nothing more was written");
        wake.clear();
        wake.wake();
        assert_eq!(counter(wake.fd()), Some(1));
    }
}
