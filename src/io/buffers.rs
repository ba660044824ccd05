//! The per-worker read buffer.
//!
//! Connections wait for readability without a buffer (see `readiness`); when data is there, they
//! `recv` into this one buffer, which belongs to the worker thread, process it in place (handshake
//! parsing and frame unmasking borrow it), and copy only an unfinished tail into their own small
//! buffer. Processing is synchronous, so the buffer is never held across an `.await` and one buffer
//! serves every connection of the worker: it cannot run out, so no connection ever waits for it.
//!
//! Measured on this machine kind (DESIGN.md): this costs ~0.65 KiB of user-space memory per idle
//! connection, against ~4.6 KiB for a pending 4 KiB read per connection.
//!
//! Must never: be borrowed across an await point (the `RefCell` would panic), or leak bytes of one
//! connection into another (every use starts from what `recv` wrote).

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;

/// Large enough that a busy connection drains its socket in few calls, small enough to stay in L2.
pub const SCRATCH_LEN: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

/// What a non-blocking `recv` found.
#[derive(Debug)]
pub enum Received {
    /// `n` bytes are at the start of the scratch buffer.
    Data(usize),
    /// The peer closed its side (or reset the connection).
    Closed,
    /// Nothing to read after all (a spurious wake-up).
    WouldBlock,
}

/// Runs `f` with the worker's scratch buffer. `f` must not await.
pub fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with_borrow_mut(|scratch| f(scratch))
}

/// One non-blocking `recv(2)` from `fd` into `buf`.
///
/// Made as the raw system call: libc's `recv` is a thread-cancellation point and wraps every call
/// in enabling and disabling asynchronous cancellation, which ringgate never uses and which cost
/// about 0.7% of a worker's CPU in echo (one call per message).
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Received> {
    let no_address = std::ptr::null_mut::<libc::sockaddr>();
    let no_address_len = std::ptr::null_mut::<libc::socklen_t>();
    // SAFETY: `buf` is a valid, writable slice for its whole length, recvfrom writes at most
    // `buf.len()` bytes into it, and null address pointers ask for no peer address.
    let n = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            buf.as_mut_ptr(),
            buf.len(),
            libc::MSG_DONTWAIT,
            no_address,
            no_address_len,
        )
    };
    match n {
        0 => Ok(Received::Closed),
        n if n > 0 => Ok(Received::Data(n as usize)),
        _ => {
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(Received::WouldBlock),
                io::ErrorKind::ConnectionReset => Ok(Received::Closed),
                _ => Err(error),
            }
        }
    }
}

/// Processes freshly read `data` in place, after whatever `tail` kept from earlier reads, and keeps
/// in `tail` only what `process` left unconsumed (it returns how much it used). `data` is copied
/// only when a tail was waiting; a tail that empties gives its allocation back, so an idle
/// connection holds no buffer.
pub fn process_after_tail(tail: &mut Vec<u8>, data: &mut [u8], process: impl FnOnce(&mut [u8]) -> usize) {
    if tail.is_empty() {
        let used = process(data);
        tail.extend_from_slice(&data[used..]);
    } else {
        tail.extend_from_slice(data);
        let used = process(tail);
        tail.drain(..used);
    }
    if tail.is_empty() && tail.capacity() > 0 {
        *tail = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::process_after_tail;

    #[test]
    fn only_the_unconsumed_rest_is_kept_and_an_empty_tail_holds_nothing() {
        let mut tail = Vec::new();
        // Nothing waiting: processed in place, the last 3 bytes kept.
        process_after_tail(&mut tail, &mut [1, 2, 3, 4, 5], |buf| {
            assert_eq!(buf, [1, 2, 3, 4, 5]);
            2
        });
        assert_eq!(tail, [3, 4, 5]);
        // A tail waiting: processed after it, everything used, allocation released.
        process_after_tail(&mut tail, &mut [6], |buf| {
            assert_eq!(buf, [3, 4, 5, 6]);
            4
        });
        assert!(tail.is_empty());
        assert_eq!(tail.capacity(), 0);
    }
}
