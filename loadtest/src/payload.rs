//! What a message carries and how its echo is checked: the intended send time, a sequence number,
//! and filler bytes that are a pure function of both. The reader regenerates what it expects from
//! the sequence number and the schedule, so verification needs no copy of what was sent.
//!
//! Must never: allocate, or accept an echo that differs from what was sent in any byte.

/// Bytes at the front of every payload: the intended send time (ns since the run's epoch) and the
/// sequence number, both little-endian u64.
pub const HEADER_LEN: usize = 16;

/// Fills `buf` (the whole payload) for message `seq` intended to be sent at `intended_ns`.
pub fn fill(buf: &mut [u8], seq: u64, intended_ns: u64) {
    buf[..8].copy_from_slice(&intended_ns.to_le_bytes());
    buf[8..HEADER_LEN].copy_from_slice(&seq.to_le_bytes());
    let seed = filler_seed(seq);
    for (i, byte) in buf[HEADER_LEN..].iter_mut().enumerate() {
        *byte = seed.wrapping_add(i as u8);
    }
}

/// Whether `echo` is exactly the payload [`fill`] writes for `seq`, `intended_ns` and `size`.
pub fn verify(echo: &[u8], size: usize, seq: u64, intended_ns: u64) -> bool {
    if echo.len() != size || size < HEADER_LEN {
        return false;
    }
    if echo[..8] != intended_ns.to_le_bytes() || echo[8..HEADER_LEN] != seq.to_le_bytes() {
        return false;
    }
    let seed = filler_seed(seq);
    echo[HEADER_LEN..].iter().enumerate().all(|(i, &byte)| byte == seed.wrapping_add(i as u8))
}

/// The filler depends on the sequence number so that an echo of the wrong message (or a stale
/// buffer) fails verification even where the header happens to match.
fn filler_seed(seq: u64) -> u8 {
    (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for size in [16, 17, 32, 1000] {
            let mut buf = vec![0u8; size];
            fill(&mut buf, 42, 123_456_789);
            assert!(verify(&buf, size, 42, 123_456_789));
            assert!(!verify(&buf, size, 43, 123_456_789));
            assert!(!verify(&buf, size, 42, 123_456_788));
            assert!(!verify(&buf[..size - 1], size, 42, 123_456_789));
        }
    }

    #[test]
    fn every_single_byte_flip_is_caught() {
        let mut buf = vec![0u8; 64];
        fill(&mut buf, 7, 99);
        for at in 0..buf.len() {
            for bit in 0..8 {
                buf[at] ^= 1 << bit;
                assert!(!verify(&buf, 64, 7, 99), "flip of bit {bit} at {at} not caught");
                buf[at] ^= 1 << bit;
            }
        }
    }

    #[test]
    fn consecutive_messages_differ_in_filler() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        fill(&mut a, 1, 0);
        fill(&mut b, 2, 0);
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
    }
}
