//! Socket reads and writes as io_uring `RECV` and `SEND`, each op owning its `Vec<u8>` the way
//! tokio-uring's `read` and `write_all` do.
//!
//! Why not tokio-uring's own: they submit `READ` and `WRITE`, which on a socket go through the VFS
//! path (kiocb, iov_iter, `sock_read_iter`/`sock_write_iter`) before reaching TCP. Profiled at
//! 10,000 connections in open loop, that path was about a tenth of loadtest's CPU. Since the load
//! generator's core is the limit in several benchmark cases, its cost per message matters.
//!
//! Must never: touch a buffer while the kernel may write into it (the op owns the `Vec` until its
//! completion), or report bytes the kernel did not write (the length grows only by the count the
//! completion reports).

use std::io;
use std::os::fd::AsRawFd;

use io_uring::{cqueue, opcode, types};
use tokio_uring::net::TcpStream;
use tokio_uring::{OneshotOutputTransform, UnsubmittedOneshot};

/// Completes a `RECV` into the spare capacity of the op's buffer.
struct Received;

impl OneshotOutputTransform for Received {
    type Output = (io::Result<usize>, Vec<u8>);
    type StoredData = Vec<u8>;

    fn transform_oneshot_output(self, mut buf: Vec<u8>, cqe: cqueue::Entry) -> Self::Output {
        let result = cqe.result();
        if result < 0 {
            return (Err(io::Error::from_raw_os_error(-result)), buf);
        }
        let n = (result as usize).min(buf.capacity() - buf.len());
        // SAFETY: the kernel wrote `n` bytes (bounded by the spare capacity it was given) right
        // after the initialised part, so the first `len + n` bytes are initialised.
        unsafe { buf.set_len(buf.len() + n) };
        (Ok(n), buf)
    }
}

/// Completes a `SEND` from the op's buffer, starting at an offset.
struct Sent;

impl OneshotOutputTransform for Sent {
    type Output = (io::Result<usize>, Vec<u8>);
    type StoredData = Vec<u8>;

    fn transform_oneshot_output(self, buf: Vec<u8>, cqe: cqueue::Entry) -> Self::Output {
        let result = cqe.result();
        let result =
            if result < 0 { Err(io::Error::from_raw_os_error(-result)) } else { Ok(result as usize) };
        (result, buf)
    }
}

/// Receives into `buf` after its current contents, up to its capacity; `Ok(0)` is the end of the
/// stream (or a full buffer: callers keep room). Owns the buffer for the op's lifetime and hands
/// it back with the result, so the future borrows nothing but the stream.
pub async fn recv_more(stream: &TcpStream, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
    let spare = buf.spare_capacity_mut();
    let len = u32::try_from(spare.len()).unwrap_or(u32::MAX);
    // The pointer stays valid until the completion: the op owns `buf`, and moving a `Vec` does not
    // move its heap allocation.
    let sqe = opcode::Recv::new(types::Fd(stream.as_raw_fd()), spare.as_mut_ptr().cast(), len).build();
    UnsubmittedOneshot::new(buf, Received, sqe).submit().await
}

/// Sends all of `buf`, one `SEND` after another until everything is written or one fails.
pub async fn send_all(stream: &TcpStream, mut buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
    let mut written = 0;
    while written < buf.len() {
        let rest = &buf[written..];
        let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
        let sqe = opcode::Send::new(types::Fd(stream.as_raw_fd()), rest.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        let (result, back) = UnsubmittedOneshot::new(buf, Sent, sqe).submit().await;
        buf = back;
        match result {
            Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
            Ok(n) => written += n,
            Err(error) => return (Err(error), buf),
        }
    }
    (Ok(()), buf)
}
