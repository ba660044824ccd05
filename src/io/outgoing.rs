//! Bytes on their way to a socket: a staged buffer of frames (from a per-worker pool) or one
//! shared pub/sub frame, plus how much of it is written.
//!
//! Why pooled staging buffers: an echo writes one small batch per message, and a fresh allocation
//! for each was measurable; a finished write returns its buffer to the worker's pool instead of
//! freeing it. Why a shared frame is its own variant: a pub/sub message is encoded once and the
//! same `Bytes` goes to every subscriber without a copy.
//!
//! Must never: let the buffer go while the kernel may still read it (the socket holds the
//! `Outgoing` until the send's completion arrives), or hold more than [`POOL_BUFFERS`] buffers of
//! at most [`POOL_BUFFER_CAPACITY`] bytes in the pool.

use std::cell::RefCell;

use bytes::Bytes;

/// Buffers kept for reuse per worker. A cache, not a bound: more writes than this may be in flight
/// (each with its own buffer), and what comes back beyond it is freed.
pub const POOL_BUFFERS: usize = 256;
/// Larger buffers (a big message, a coalesced pub/sub batch) are freed rather than kept, so the
/// pool stays within `POOL_BUFFERS * POOL_BUFFER_CAPACITY` bytes (1 MiB) per worker.
pub const POOL_BUFFER_CAPACITY: usize = 4 * 1024;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer to encode frames into, from the worker's pool when it has one. A fresh one
/// starts without capacity and grows to what is written into it, so that buffers in flight cost
/// what their frames need (a buffer is in flight per busy connection: at 1,000 connections, 512
/// bytes reserved up front showed as +0.2 KiB of RSS per connection).
pub fn staging_buffer() -> Vec<u8> {
    POOL.with_borrow_mut(Vec::pop).unwrap_or_default()
}

fn recycle(mut buffer: Vec<u8>) {
    if buffer.capacity() == 0 || buffer.capacity() > POOL_BUFFER_CAPACITY {
        return;
    }
    buffer.clear();
    POOL.with_borrow_mut(|pool| {
        if pool.len() < POOL_BUFFERS {
            pool.push(buffer);
        }
    });
}

/// Bytes on their way to a socket, and how many of them are already written.
pub struct Outgoing {
    payload: Payload,
    written: usize,
}

enum Payload {
    /// Frames this connection encoded; the buffer goes back to the pool when done.
    Staged(Vec<u8>),
    /// One frame shared with other connections (a pub/sub message encoded once for all).
    Shared(Bytes),
    /// Several shared frames, sent together with one `sendmsg` (an iovec per frame, no copy).
    /// Boxed: the message header must stay where it is while the kernel reads it.
    Frames(Box<Vectored>),
}

/// Frames for one vectored send, and the header and iovecs that describe what is left of them.
struct Vectored {
    frames: Vec<Bytes>,
    /// Frames wholly written.
    first: usize,
    iovecs: Vec<libc::iovec>,
    header: libc::msghdr,
}

/// At most this many frames go in one vectored send (well under `IOV_MAX`).
pub const MAX_FRAMES_PER_SEND: usize = 64;

/// What the backend hands to the kernel for an [`Outgoing`].
pub enum SendBuf<'a> {
    /// One contiguous run of bytes (`send`).
    Slice(&'a [u8]),
    /// A message header with an iovec per frame (`sendmsg`); valid until the `Outgoing` is
    /// advanced, dropped or prepared again.
    Message(*const libc::msghdr),
}

impl Outgoing {
    /// Frames encoded into a staging buffer (from [`staging_buffer`] or not).
    pub fn staged(buffer: Vec<u8>) -> Outgoing {
        Outgoing { payload: Payload::Staged(buffer), written: 0 }
    }

    /// A frame shared with other connections, written without a copy.
    pub fn shared(frame: Bytes) -> Outgoing {
        Outgoing { payload: Payload::Shared(frame), written: 0 }
    }

    /// Several frames shared with other connections, written in one send without a copy. Empty
    /// frames are left out; a single frame is [`Outgoing::shared`].
    pub fn frames(mut frames: Vec<Bytes>) -> Outgoing {
        frames.retain(|frame| !frame.is_empty());
        if frames.len() <= 1 {
            return Outgoing::shared(frames.pop().unwrap_or_default());
        }
        // SAFETY: an all-zero msghdr is a valid empty header (null name, no iovecs, no control).
        let header: libc::msghdr = unsafe { std::mem::zeroed() };
        let vectored = Vectored { frames, first: 0, iovecs: Vec::new(), header };
        Outgoing { payload: Payload::Frames(Box::new(vectored)), written: 0 }
    }

    /// What is still to be written, for the backend to send. For several frames this (re)builds
    /// the message header over what is left.
    pub fn prepare(&mut self) -> SendBuf<'_> {
        match &mut self.payload {
            Payload::Staged(buffer) => SendBuf::Slice(&buffer[self.written.min(buffer.len())..]),
            Payload::Shared(frame) => SendBuf::Slice(&frame[self.written.min(frame.len())..]),
            Payload::Frames(vectored) => {
                let Vectored { frames, first, iovecs, header } = &mut **vectored;
                iovecs.clear();
                for (i, frame) in frames[*first..].iter().enumerate() {
                    // `written` counts bytes of the first unfinished frame.
                    let skip = if i == 0 { self.written.min(frame.len()) } else { 0 };
                    let rest = &frame[skip..];
                    iovecs.push(libc::iovec {
                        iov_base: rest.as_ptr() as *mut libc::c_void,
                        iov_len: rest.len(),
                    });
                }
                header.msg_iov = iovecs.as_mut_ptr();
                header.msg_iovlen = iovecs.len();
                SendBuf::Message(std::ptr::from_ref(header))
            }
        }
    }

    /// What is still to be written, as one slice: the contiguous forms only (tests and logs).
    pub fn remaining(&self) -> &[u8] {
        match &self.payload {
            Payload::Staged(buffer) => &buffer[self.written.min(buffer.len())..],
            Payload::Shared(frame) => &frame[self.written.min(frame.len())..],
            Payload::Frames(_) => &[],
        }
    }

    /// Calls `each` with every run of bytes still to be written, in order (TLS encrypts them).
    pub fn for_each_remaining(&self, mut each: impl FnMut(&[u8])) {
        match &self.payload {
            Payload::Frames(vectored) => {
                for (i, frame) in vectored.frames[vectored.first..].iter().enumerate() {
                    let skip = if i == 0 { self.written.min(frame.len()) } else { 0 };
                    each(&frame[skip..]);
                }
            }
            _ => each(self.remaining()),
        }
    }

    /// How many bytes are still to be written.
    pub fn len(&self) -> usize {
        match &self.payload {
            Payload::Frames(vectored) => {
                let left: usize = vectored.frames[vectored.first..].iter().map(Bytes::len).sum();
                left - self.written
            }
            _ => self.remaining().len(),
        }
    }

    /// Whether everything has been written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks `n` more bytes as written (a short write leaves the rest for the next op).
    pub fn advance(&mut self, n: usize) {
        let n = n.min(self.len());
        match &mut self.payload {
            Payload::Frames(vectored) => {
                let mut left = self.written + n;
                while let Some(frame) = vectored.frames.get(vectored.first) {
                    if left < frame.len() {
                        break;
                    }
                    left -= frame.len();
                    vectored.first += 1;
                }
                self.written = left;
            }
            _ => self.written += n,
        }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if let Payload::Staged(buffer) = &mut self.payload {
            recycle(std::mem::take(buffer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Outgoing, POOL_BUFFER_CAPACITY, SendBuf, staging_buffer};
    use bytes::Bytes;

    #[test]
    fn a_short_write_leaves_exactly_the_rest() {
        let mut out = Outgoing::shared(Bytes::from_static(b"hello world"));
        out.advance(6);
        assert_eq!(out.remaining(), b"world");
        out.advance(5);
        assert!(out.is_empty());
    }

    #[test]
    fn a_vectored_send_advances_across_frames_and_describes_only_what_is_left() {
        let frames = vec![
            Bytes::from_static(b"abc"),
            Bytes::new(),
            Bytes::from_static(b"defg"),
            Bytes::from_static(b"hi"),
        ];
        let mut out = Outgoing::frames(frames);
        assert_eq!(out.len(), 9);
        let left = |out: &mut Outgoing| -> Vec<u8> {
            let SendBuf::Message(header) = out.prepare() else { panic!("vectored") };
            // SAFETY: the header and its iovecs point into `out`, alive and unchanged here.
            let header = unsafe { &*header };
            let iovecs = unsafe { std::slice::from_raw_parts(header.msg_iov, header.msg_iovlen) };
            iovecs
                .iter()
                .flat_map(|v| {
                    unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) }.to_vec()
                })
                .collect()
        };
        assert_eq!(left(&mut out), b"abcdefghi");
        out.advance(2);
        assert_eq!(left(&mut out), b"cdefghi");
        out.advance(3);
        assert_eq!(left(&mut out), b"fghi", "the first frame is done, the second is part-written");
        out.advance(2);
        assert_eq!(left(&mut out), b"hi");
        out.advance(5);
        assert!(out.is_empty());
        assert_eq!(Outgoing::frames(vec![Bytes::from_static(b"x")]).remaining(), b"x", "one frame: plain");
    }

    #[test]
    fn finished_small_buffers_come_back_from_the_pool_empty_and_big_ones_do_not() {
        let mut small = Vec::with_capacity(64);
        small.extend_from_slice(b"frame");
        let small_ptr = small.as_ptr();
        drop(Outgoing::staged(small));
        let again = staging_buffer();
        assert_eq!(again.as_ptr(), small_ptr, "reused");
        assert!(again.is_empty());

        drop(Outgoing::staged(Vec::with_capacity(POOL_BUFFER_CAPACITY * 2)));
        assert!(staging_buffer().capacity() <= POOL_BUFFER_CAPACITY, "a big buffer is not kept");
    }
}
