//! Kernel receive timestamps (`SO_TIMESTAMPNS`): when the data of a receive reached the socket, as
//! the kernel recorded it, rather than when the reader got round to it.
//!
//! Why: a reader that batches its wake-ups (the bundled load generator, which sleeps until a batch
//! of echoes is in) would otherwise stamp every echo with the time it woke, overstating latency by
//! up to its batching window. With the kernel's stamp, batching costs nothing in accuracy. The
//! stamp of a read that took several segments is the last segment's, so an earlier message read
//! together with later ones is stamped late, never early.
//!
//! Layout of a multishot `RECVMSG` buffer (io_uring): an `io_uring_recvmsg_out` header (16 bytes),
//! then the name (none here), then [`CONTROL_LEN`] bytes of control messages, then the payload.
//!
//! Must never: report a stamp from a control message that is not `SCM_TIMESTAMPNS`, or read past
//! the control bytes the kernel says it wrote.

use std::io;
use std::os::fd::RawFd;

/// Control bytes reserved per receive: one `cmsghdr` (16 bytes) and a `timespec` (16 bytes).
pub const CONTROL_LEN: usize = 32;

/// Bytes of the `io_uring_recvmsg_out` header at the front of a multishot `RECVMSG` buffer.
const RECVMSG_OUT_LEN: usize = 16;

/// Asks the kernel to stamp what `fd` receives (`SO_TIMESTAMPNS`, CLOCK_REALTIME).
pub fn enable(fd: RawFd) -> io::Result<()> {
    super::sockopt::set_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)
}

/// The message header a multishot `RECVMSG` reads its layout from: no name, [`CONTROL_LEN`]
/// control bytes. Boxed by its owner, since the kernel reads it while the receive runs.
pub fn recvmsg_header() -> libc::msghdr {
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_controllen = CONTROL_LEN as _;
    header
}

/// Splits a multishot `RECVMSG` buffer into its payload and the kernel's receive time (realtime
/// ns, when the socket had timestamps on). `None` when the buffer is shorter than its header.
pub fn split_recvmsg(buffer: &mut [u8]) -> Option<(&mut [u8], Option<u64>)> {
    let payload_start = RECVMSG_OUT_LEN + CONTROL_LEN;
    if buffer.len() < payload_start {
        return None;
    }
    let word = |at: usize| u32::from_ne_bytes([buffer[at], buffer[at + 1], buffer[at + 2], buffer[at + 3]]);
    let (control_len, payload_len) = (word(4) as usize, word(8) as usize);
    let stamp = timestamp(&buffer[RECVMSG_OUT_LEN..RECVMSG_OUT_LEN + control_len.min(CONTROL_LEN)]);
    let payload_end = payload_start + payload_len.min(buffer.len() - payload_start);
    Some((&mut buffer[payload_start..payload_end], stamp))
}

/// The `SCM_TIMESTAMPNS` stamp among `control` messages, in realtime nanoseconds.
pub fn timestamp(control: &[u8]) -> Option<u64> {
    const HEADER: usize = std::mem::size_of::<libc::cmsghdr>();
    let mut at = 0;
    while at + HEADER <= control.len() {
        let field = |offset: usize, len: usize| &control[at + offset..at + offset + len];
        let len = usize::from_ne_bytes(field(0, 8).try_into().ok()?);
        let level = i32::from_ne_bytes(field(8, 4).try_into().ok()?);
        let kind = i32::from_ne_bytes(field(12, 4).try_into().ok()?);
        if len < HEADER || at + len > control.len() {
            return None;
        }
        if level == libc::SOL_SOCKET && kind == libc::SCM_TIMESTAMPNS && len >= HEADER + 16 {
            let secs = i64::from_ne_bytes(field(HEADER, 8).try_into().ok()?);
            let nanos = i64::from_ne_bytes(field(HEADER + 8, 8).try_into().ok()?);
            return u64::try_from(secs).ok().map(|s| s * 1_000_000_000 + nanos as u64);
        }
        // The next message starts at the aligned end of this one.
        at += len.div_ceil(8) * 8;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(16 + data.len()).to_ne_bytes());
        bytes.extend_from_slice(&level.to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(data);
        bytes.resize(bytes.len().div_ceil(8) * 8, 0);
        bytes
    }

    fn timespec(secs: i64, nanos: i64) -> Vec<u8> {
        [secs.to_ne_bytes(), nanos.to_ne_bytes()].concat()
    }

    #[test]
    fn the_timestamp_is_found_and_other_messages_are_skipped() {
        let mut control = cmsg(libc::IPPROTO_IP, 1, &[1, 2, 3]);
        control.extend(cmsg(libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, &timespec(3, 25)));
        assert_eq!(timestamp(&control), Some(3_000_000_025));
        assert_eq!(timestamp(&cmsg(libc::IPPROTO_IP, 1, &[0; 16])), None);
        assert_eq!(timestamp(&[]), None);
        // A length running past the control bytes is not trusted.
        let mut bad = cmsg(libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, &timespec(3, 25));
        bad[0] = 200;
        assert_eq!(timestamp(&bad), None);
    }

    #[test]
    fn a_recvmsg_buffer_splits_into_payload_and_stamp() {
        let control = cmsg(libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, &timespec(7, 9));
        let mut buffer = Vec::new();
        for word in [0u32, control.len() as u32, 5, 0] {
            buffer.extend_from_slice(&word.to_ne_bytes());
        }
        buffer.extend_from_slice(&control);
        buffer.extend_from_slice(b"hello");
        let (payload, stamp) = split_recvmsg(&mut buffer).expect("a whole header");
        assert_eq!((&*payload, stamp), (&b"hello"[..], Some(7_000_000_009)));
        assert!(split_recvmsg(&mut [0u8; 20]).is_none());
    }
}
