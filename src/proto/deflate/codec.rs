//! Compressing and inflating one message's payload as RFC 7692 section 7.2 says: raw DEFLATE,
//! ended with a sync flush whose `00 00 ff ff` tail is removed on send and put back on receive.
//!
//! Backend: `flate2` on `zlib-rs` (window bits, raw deflate, sync flush and reset, in Rust).
//!
//! Memory: a [`Deflater`] is zlib-rs's compression state (313 KiB measured with a 15-bit window),
//! which is why the shared mode keeps one per worker and resets it after every message; an
//! [`Inflater`] holds a 2^window-byte window (32 KiB at 15 bits) and is needed between messages
//! only when the client keeps its context.
//!
//! Must never: inflate past the caller's limit (a message is cut off with [`InflateError::TooBig`]
//! the moment its inflated size passes it, so a small bomb cannot allocate a large buffer), or
//! keep context across messages when no-context-takeover was agreed.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The tail a sync flush ends with, removed from every compressed message (section 7.2.1).
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Inflated bytes per step (a stack buffer): the limit is checked before each step is kept.
const INFLATE_STEP: usize = 4 * 1024;

/// Compresses whole messages for one connection, or for every connection of a worker when no
/// context is kept.
#[derive(Debug)]
pub struct Deflater {
    compress: Compress,
    no_context_takeover: bool,
}

impl Deflater {
    /// A compressor with `window_bits` (9-15) at `level` (0-9); `no_context_takeover` resets it
    /// after every message.
    pub fn new(level: u32, window_bits: u8, no_context_takeover: bool) -> Deflater {
        let bits = window_bits.clamp(super::MIN_WINDOW_BITS, super::MAX_WINDOW_BITS);
        Deflater {
            compress: Compress::new_with_window_bits(Compression::new(level.min(9)), false, bits),
            no_context_takeover,
        }
    }

    /// Appends the compressed form of `payload` to `out`: what goes in the message's frames, with
    /// RSV1 set on the first.
    pub fn compress(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        let before_in = self.compress.total_in();
        loop {
            let consumed = (self.compress.total_in() - before_in) as usize;
            // Room for the worst case of what is left, plus the flush's few bytes.
            out.reserve((payload.len() - consumed) / 2 + 64);
            let produced_before = out.len();
            // Errors cannot happen with a valid state and a non-empty output buffer; if one did,
            // the loop's progress check ends it.
            let status = self.compress.compress_vec(&payload[consumed..], out, FlushCompress::Sync);
            let consumed_now = (self.compress.total_in() - before_in) as usize;
            let done = consumed_now == payload.len() && out.len() < out.capacity();
            if done || status.is_err() || (out.len() == produced_before && consumed_now == consumed) {
                break;
            }
        }
        if out[start..].ends_with(&SYNC_TAIL) {
            out.truncate(out.len() - SYNC_TAIL.len());
        }
        if out.len() == start {
            // Nothing to flush (an empty message right after a flush leaves zlib nothing to write):
            // RFC 7692 section 7.2.3.6's empty message, one 0x00, so that the receiver's appended
            // tail is a whole empty stored block. Sending no bytes instead left the tail half a
            // block, and the receiver's stream out of step from the next message on.
            out.push(0x00);
        }
        if self.no_context_takeover {
            self.compress.reset();
        }
    }
}

/// Why a compressed message could not be inflated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit: close with 1009 (message too big).
    TooBig,
    /// It is not valid DEFLATE data: close with 1007 (invalid payload data).
    Corrupt,
}

/// Inflates whole messages for one connection.
#[derive(Debug)]
pub struct Inflater {
    decompress: Decompress,
    no_context_takeover: bool,
}

impl Inflater {
    /// A decompressor with a full window (it reads any smaller one); `no_context_takeover` resets
    /// it after every message.
    pub fn new(no_context_takeover: bool) -> Inflater {
        Inflater {
            decompress: Decompress::new_with_window_bits(false, super::MAX_WINDOW_BITS),
            no_context_takeover,
        }
    }

    /// Appends the inflated form of one message's compressed payload to `out`, failing as soon as
    /// `out` would grow past `limit` bytes of this message.
    pub fn inflate(
        &mut self,
        compressed: &[u8],
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        let start = out.len();
        if compressed.is_empty() {
            // No compressed bytes: an empty message, and nothing for the stream (the tail appended
            // to nothing would be half a stored block; see `Deflater::compress`).
            return Ok(());
        }
        let result = match self.inflate_part(compressed, start, limit, out) {
            // A final block (BFINAL) ended the stream inside the message (section 7.2.3.3): the
            // tail is past its end, and the next message starts a new stream.
            Ok(Ended::Stream) => {
                self.decompress.reset(false);
                Ok(())
            }
            Ok(Ended::Input) => self.inflate_part(&SYNC_TAIL, start, limit, out).map(drop),
            Err(error) => Err(error),
        };
        if self.no_context_takeover || result.is_err() {
            self.decompress.reset(false);
        }
        result
    }

    /// Inflates `input` into `out` in steps of a stack buffer, checking the limit before each step
    /// is kept.
    fn inflate_part(
        &mut self,
        input: &[u8],
        start: usize,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<Ended, InflateError> {
        let mut chunk = [0u8; INFLATE_STEP];
        let before_in = self.decompress.total_in();
        loop {
            let consumed = (self.decompress.total_in() - before_in) as usize;
            let before_out = self.decompress.total_out();
            let status = self
                .decompress
                .decompress(&input[consumed..], &mut chunk, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            let produced = (self.decompress.total_out() - before_out) as usize;
            if out.len() - start + produced > limit {
                return Err(InflateError::TooBig);
            }
            out.extend_from_slice(&chunk[..produced]);
            let consumed_now = (self.decompress.total_in() - before_in) as usize;
            if status == Status::StreamEnd {
                return Ok(Ended::Stream);
            }
            if consumed_now == input.len() && produced < chunk.len() {
                return Ok(Ended::Input);
            }
            if produced == 0 && consumed_now == consumed {
                return Err(InflateError::Corrupt);
            }
        }
    }
}

/// How a part of a message's input ended.
enum Ended {
    /// All of it was read.
    Input,
    /// A final DEFLATE block ended the stream.
    Stream,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(deflater: &mut Deflater, inflater: &mut Inflater, message: &[u8]) -> Vec<u8> {
        let mut compressed = Vec::new();
        deflater.compress(message, &mut compressed);
        assert!(!compressed.ends_with(&SYNC_TAIL), "the sync tail must be removed");
        let mut inflated = Vec::new();
        inflater.inflate(&compressed, usize::MAX / 2, &mut inflated).expect("inflates");
        inflated
    }

    /// An empty message between two others, context kept, at every level: the empty one is the
    /// RFC's single 0x00, and the stream stays in step for the next one (found by the property
    /// test below: an empty message compressed to no bytes, and the next one inflated wrong).
    #[test]
    fn an_empty_message_keeps_the_stream_in_step() {
        for level in 0..=9 {
            for no_context in [false, true] {
                let mut deflater = Deflater::new(level, 15, no_context);
                let mut inflater = Inflater::new(no_context);
                for message in [&b"hello hello hello"[..], b"", b"", b"world world"] {
                    let mut compressed = Vec::new();
                    deflater.compress(message, &mut compressed);
                    if message.is_empty() {
                        assert_eq!(compressed, [0x00], "level {level}");
                    }
                    let mut out = Vec::new();
                    assert_eq!(inflater.inflate(&compressed, 1 << 20, &mut out), Ok(()), "level {level}");
                    assert_eq!(out, message, "level {level}, context kept: {}", !no_context);
                }
                // A peer that sends no bytes for an empty message is read as one, in step too.
                let mut out = Vec::new();
                assert_eq!(inflater.inflate(&[], 1 << 20, &mut out), Ok(()));
                assert!(out.is_empty());
            }
        }
    }

    #[test]
    fn messages_round_trip_with_and_without_context_takeover() {
        for no_context in [true, false] {
            let mut deflater = Deflater::new(6, 15, no_context);
            let mut inflater = Inflater::new(no_context);
            for message in [&b""[..], b"Hello", &[b'a'; 70_000], br#"{"topic":"prices","bid":101.5}"#] {
                assert_eq!(round_trip(&mut deflater, &mut inflater, message), message);
            }
        }
    }

    #[test]
    fn the_example_of_rfc_7692_section_7_2_3_1_inflates_to_hello() {
        let mut inflater = Inflater::new(true);
        let mut out = Vec::new();
        inflater.inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 100, &mut out).expect("valid");
        assert_eq!(out, b"Hello");
        // And the same with no compression (section 7.2.3.2), a stored block.
        out.clear();
        inflater
            .inflate(&[0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00], 100, &mut out)
            .expect("valid");
        assert_eq!(out, b"Hello");
    }

    #[test]
    fn context_takeover_makes_a_repeat_smaller_and_no_context_does_not() {
        let message = br#"{"symbol":"ACME","price":101.25,"volume":1200,"exchange":"XNYS"}"#;
        let sizes = |no_context| {
            let mut deflater = Deflater::new(6, 15, no_context);
            let (mut first, mut second) = (Vec::new(), Vec::new());
            deflater.compress(message, &mut first);
            deflater.compress(message, &mut second);
            (first.len(), second.len())
        };
        let (first, second) = sizes(false);
        assert!(second < first / 2, "with context the repeat is a back-reference: {first} -> {second}");
        let (first, second) = sizes(true);
        assert_eq!(first, second, "without context every message is compressed alone");
    }

    #[test]
    fn a_bomb_stops_at_the_limit_without_inflating_the_rest() {
        // 16 MiB of zeros compresses to about 16 KiB; the limit is 1 MiB.
        let mut deflater = Deflater::new(9, 15, true);
        let mut bomb = Vec::new();
        deflater.compress(&vec![0u8; 16 << 20], &mut bomb);
        assert!(bomb.len() < 32 * 1024, "{} bytes", bomb.len());
        let mut inflater = Inflater::new(true);
        let mut out = Vec::new();
        assert_eq!(inflater.inflate(&bomb, 1 << 20, &mut out), Err(InflateError::TooBig));
        assert!(out.len() <= (1 << 20) + INFLATE_STEP, "inflated {} bytes past a 1 MiB limit", out.len());
        // Exactly at the limit is fine.
        let mut exact = Vec::new();
        let mut small = Vec::new();
        deflater.compress(&[7u8; 1000], &mut small);
        assert_eq!(inflater.inflate(&small, 1000, &mut exact), Ok(()));
        assert_eq!(exact.len(), 1000);
        exact.clear();
        assert_eq!(inflater.inflate(&small, 999, &mut exact), Err(InflateError::TooBig));
    }

    proptest::proptest! {
        /// Any sequence of messages, at any level and window, inflates back to itself, whether
        /// or not context is kept between them.
        #[test]
        fn any_messages_round_trip(
            messages in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
                    proptest::collection::vec(proptest::sample::select(b"abc {}:,\"0123".to_vec()), 0..3000),
                ],
                1..6,
            ),
            level in 0u32..=9,
            window in MIN..=MAX,
            no_context in proptest::bool::ANY,
        ) {
            let mut deflater = Deflater::new(level, window, no_context);
            let mut inflater = Inflater::new(no_context);
            for message in &messages {
                proptest::prop_assert_eq!(&round_trip(&mut deflater, &mut inflater, message), message);
            }
        }

        /// Arbitrary input never panics and never inflates past the limit.
        #[test]
        fn arbitrary_input_is_bounded(input in proptest::collection::vec(proptest::num::u8::ANY, 0..2000), limit in 0usize..5000) {
            let mut inflater = Inflater::new(true);
            let mut out = Vec::new();
            let _ = inflater.inflate(&input, limit, &mut out);
            proptest::prop_assert!(out.len() <= limit);
        }
    }

    const MIN: u8 = super::super::MIN_WINDOW_BITS;
    const MAX: u8 = super::super::MAX_WINDOW_BITS;

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        let mut inflater = Inflater::new(true);
        for input in [&[0xffu8; 10][..], &[0x07], &[0x03, 0x00, 0x01]] {
            let mut out = Vec::new();
            assert!(inflater.inflate(input, 1 << 20, &mut out).is_err() || out.len() <= 1 << 20);
        }
        // A bad block type is corrupt.
        let mut out = Vec::new();
        assert_eq!(inflater.inflate(&[0x07, 0x00], 1 << 20, &mut out), Err(InflateError::Corrupt));
    }
}
