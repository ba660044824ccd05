//! The receive side of one connection: the protocol core's [`Assembler`] fed in place from the
//! buffer the io backend lends, plus the unfinished tail kept between reads (ringgate's own
//! [`process_after_tail`], so an idle connection holds no receive buffer at all). Also the frames
//! the client writes: its messages, plain or compressed as its handshake agreed ([`put_message`]),
//! and the few control frames.
//!
//! permessage-deflate (RFC 7692, `--deflate`): the assembler inflates what the server compressed;
//! what the client sends is compressed at level 1 by one [`Deflater`] per thread and window size,
//! reset after every message, when the server asked for `client_no_context_takeover` (then a
//! message whose compressed form is not smaller goes plain, RSV1 clear: a per-message choice the
//! RFC allows), or else by the connection's own, made at its first message and kept (then every
//! message is compressed: the server's inflater follows the context).
//!
//! Must never: re-implement any part of RFC 6455 or 7692 (framing, validation and DEFLATE are
//! `ringgate::proto`'s), allocate per message (the library's inflater aside), keep an allocation
//! for an empty tail, or send a message plain once its bytes went into a context that is kept.

use ringgate::io::process_after_tail;
use ringgate::proto::close::{CloseCode, write_close_body};
use ringgate::proto::deflate::{Agreement, Deflater, MAX_WINDOW_BITS, MIN_WINDOW_BITS};
use ringgate::proto::frame::{OpCode, RSV1, write_frame, write_frame_with_rsv};
use ringgate::proto::message::{Assembler, Event, Limits, Role};

use crate::stats::Volume;

/// zlib's level for what the client compresses: the fastest, as browsers use.
pub const DEFLATE_LEVEL: u32 = 1;

/// A connection's receive state.
pub struct Receiver {
    /// Bytes of an unfinished frame (or handshake response) from earlier reads.
    pub tail: Vec<u8>,
    assembler: Assembler,
}

/// How a [`Receiver::receive`] left the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Everything complete was handled; more may come.
    Open,
    /// The server sent a Close, with this code (0 when it had none); anything after it is unread.
    Closed(u16),
    /// The server broke the protocol.
    Broken,
}

impl Receiver {
    /// A receiver for server frames carrying messages of at most `max_message` bytes.
    pub fn new(max_message: usize) -> Receiver {
        let limits = Limits { max_message_size: max_message, max_frame_size: max_message };
        Receiver { tail: Vec::new(), assembler: Assembler::new(Role::Client, limits) }
    }

    /// permessage-deflate was agreed: messages with RSV1 are inflated before they are handed
    /// over. `server_no_context_takeover`: the server resets its compressor after every message,
    /// so no inflater is kept for this connection between messages.
    pub fn enable_deflate(&mut self, server_no_context_takeover: bool) {
        self.assembler.enable_deflate(server_no_context_takeover);
    }

    /// Handles `data` (just read) after the kept tail: every complete message goes to
    /// `on_message` (inflated, if it came compressed) and is counted in `volume`, Pings are
    /// answered into `control`, Pongs are ignored, and a Close stops it. Only what is unfinished
    /// is kept.
    pub fn receive(
        &mut self,
        data: &mut [u8],
        control: &mut Vec<u8>,
        volume: &mut Volume,
        on_message: impl FnMut(&[u8]),
    ) -> Drained {
        let assembler = &mut self.assembler;
        let mut outcome = Drained::Open;
        process_after_tail(&mut self.tail, data, |buf| {
            drain(assembler, buf, control, volume, on_message, &mut outcome)
        });
        outcome
    }

    /// Handles what the tail already holds (frames that came with the handshake response).
    pub fn receive_tail(
        &mut self,
        control: &mut Vec<u8>,
        volume: &mut Volume,
        on_message: impl FnMut(&[u8]),
    ) -> Drained {
        let mut tail = std::mem::take(&mut self.tail);
        self.receive(&mut tail, control, volume, on_message)
    }
}

/// Feeds `buf` to the assembler until it needs more bytes or a Close came; returns the bytes used.
fn drain(
    assembler: &mut Assembler,
    buf: &mut [u8],
    control: &mut Vec<u8>,
    volume: &mut Volume,
    mut on_message: impl FnMut(&[u8]),
    outcome: &mut Drained,
) -> usize {
    let mut start = 0;
    while start < buf.len() {
        let progress = match assembler.feed(&mut buf[start..]) {
            Ok(progress) => progress,
            Err(_) => {
                *outcome = Drained::Broken;
                return buf.len();
            }
        };
        start += progress.consumed;
        match progress.event {
            Some(Event::Message { payload, .. }) => {
                let len = payload.len();
                on_message(payload);
                // Known once the message is handed out: its payload as it crossed the wire.
                volume.add(len, assembler.compressed_len().unwrap_or(len));
            }
            Some(Event::Ping(data)) => put_pong(control, data),
            Some(Event::Pong(_)) => {}
            Some(Event::Close(frame)) => {
                *outcome = Drained::Closed(frame.map_or(0, |f| f.code.0));
                return start;
            }
            None if progress.consumed == 0 => break,
            None => {}
        }
    }
    start
}

/// How a connection's messages go out, as its handshake agreed.
pub enum Compression {
    /// Plain: no `--deflate`, or the server declined it.
    Plain,
    /// Compressed by the thread's deflater for `window_bits`, reset after each message (the server
    /// asked for `client_no_context_takeover`).
    Shared {
        /// The window the server allows the client (`client_max_window_bits`; 15 when unnamed).
        window_bits: u8,
    },
    /// Compressed by the connection's own deflater, which keeps its context (made at the first
    /// message: a zlib state of up to about 256 KiB, less with a smaller window).
    Own {
        /// The window the server allows the client.
        window_bits: u8,
        /// The deflater, once the connection has sent a message.
        deflater: Option<Box<Deflater>>,
    },
}

impl Compression {
    /// How messages go out under `agreement` (`None`: not agreed).
    pub fn agreed(agreement: Option<&Agreement>) -> Compression {
        let Some(agreement) = agreement else { return Compression::Plain };
        let window_bits = agreement.client_window_bits.unwrap_or(MAX_WINDOW_BITS);
        if agreement.client_no_context_takeover {
            Compression::Shared { window_bits }
        } else {
            Compression::Own { window_bits, deflater: None }
        }
    }
}

/// A client thread's compression state: a deflater per window size for the connections that keep
/// no context (made when first needed), and the buffer messages are compressed into.
#[derive(Default)]
pub struct Compressors {
    shared: [Option<Box<Deflater>>; (MAX_WINDOW_BITS - MIN_WINDOW_BITS + 1) as usize],
    compressed: Vec<u8>,
}

/// Appends `payload` as one masked Binary message, compressed as `compression` says, and counts it
/// in `volume` (payload bytes, and payload bytes on the wire).
pub fn put_message(
    out: &mut Vec<u8>,
    payload: &[u8],
    compression: &mut Compression,
    compressors: &mut Compressors,
    volume: &mut Volume,
) {
    let compressed = &mut compressors.compressed;
    compressed.clear();
    let keeps_context = match compression {
        Compression::Plain => {
            volume.add(payload.len(), payload.len());
            return write_frame(out, OpCode::Binary, payload, Some(mask_key()));
        }
        Compression::Shared { window_bits } => {
            // The handshake only agrees windows of 9 to 15 bits; the clamp keeps the index in range.
            let bits = (*window_bits).clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
            compressors.shared[usize::from(bits - MIN_WINDOW_BITS)]
                .get_or_insert_with(|| Box::new(Deflater::new(DEFLATE_LEVEL, bits, true)))
                .compress(payload, compressed);
            false
        }
        Compression::Own { window_bits, deflater } => {
            let bits = *window_bits;
            deflater
                .get_or_insert_with(|| Box::new(Deflater::new(DEFLATE_LEVEL, bits, false)))
                .compress(payload, compressed);
            true
        }
    };
    if !keeps_context && compressed.len() >= payload.len() {
        volume.add(payload.len(), payload.len());
        return write_frame(out, OpCode::Binary, payload, Some(mask_key()));
    }
    volume.add(payload.len(), compressed.len());
    write_frame_with_rsv(out, OpCode::Binary, RSV1, compressed, Some(mask_key()));
}

/// A fresh masking key; RFC 6455 section 5.3 wants it unpredictable per frame.
pub fn mask_key() -> [u8; 4] {
    fastrand::u32(..).to_ne_bytes()
}

/// Appends a masked Pong answering a Ping's payload.
pub fn put_pong(dst: &mut Vec<u8>, ping: &[u8]) {
    write_frame(dst, OpCode::Pong, ping, Some(mask_key()));
}

/// Appends a masked Close frame with status 1000 (normal closure).
pub fn put_close(dst: &mut Vec<u8>) {
    let mut body = [0u8; 125];
    let len = write_close_body(&mut body, CloseCode::NORMAL, "loadtest done");
    write_frame(dst, OpCode::Close, &body[..len], Some(mask_key()));
}

#[cfg(test)]
mod tests {
    use ringgate::proto::close::{CloseCode, write_close_body};
    use ringgate::proto::deflate::{Agreement, Deflater, parse_answer};
    use ringgate::proto::frame::{OpCode, RSV1, write_frame, write_frame_with_rsv};
    use ringgate::proto::message::{Assembler, Event, Limits, Role};

    use super::{Compression, Compressors, Drained, Receiver, put_message};
    use crate::payload;
    use crate::stats::Volume;

    fn server_frames(frames: &[(OpCode, &[u8])]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (opcode, payload) in frames {
            write_frame(&mut bytes, *opcode, payload, None);
        }
        bytes
    }

    #[test]
    fn messages_are_handed_over_pings_answered_and_a_close_stops_the_drain() {
        let mut close = [0u8; 125];
        let close_len = write_close_body(&mut close, CloseCode::GOING_AWAY, "bye");
        let mut bytes = server_frames(&[
            (OpCode::Text, b"a"),
            (OpCode::Ping, b"p"),
            (OpCode::Pong, b"ignored"),
            (OpCode::Text, b"b"),
            (OpCode::Close, &close[..close_len]),
            (OpCode::Text, b"after the close"),
        ]);
        let mut receiver = Receiver::new(1 << 20);
        let mut control = Vec::new();
        let mut messages = Vec::new();
        let mut volume = Volume::default();
        let drained = receiver
            .receive(&mut bytes, &mut control, &mut volume, |payload| messages.push(payload.to_vec()));
        assert_eq!(drained, Drained::Closed(1001));
        assert_eq!(messages, [b"a".to_vec(), b"b".to_vec()]);
        // Plain messages: as many bytes on the wire as in the payload; control frames not counted.
        assert_eq!(volume, Volume { payload: 2, wire: 2 });
        // One masked Pong carrying the Ping's payload: 2 header bytes, 4 key bytes, 1 payload byte.
        assert_eq!(control.len(), 7);
        assert_eq!(control[0], 0x80 | 0xA);
        assert_eq!(control[6] ^ control[2], b'p');
        assert!(!receiver.tail.is_empty(), "the frame after the Close stays unread");
    }

    #[test]
    fn a_frame_split_across_reads_is_kept_until_complete_and_then_the_tail_is_freed() {
        let bytes = server_frames(&[(OpCode::Binary, &[7u8; 300]), (OpCode::Text, b"z")]);
        let mut receiver = Receiver::new(1 << 20);
        let mut control = Vec::new();
        let mut messages = Vec::new();
        // One byte at a time: the worst a socket can do.
        for byte in &bytes {
            let drained = receiver.receive(&mut [*byte], &mut control, &mut Volume::default(), |payload| {
                messages.push(payload.len())
            });
            assert_eq!(drained, Drained::Open);
        }
        assert_eq!(messages, [300, 1]);
        assert_eq!(receiver.tail.capacity(), 0, "an empty tail keeps no allocation");
    }

    #[test]
    fn a_protocol_error_is_broken_and_a_partial_frame_waits() {
        let mut receiver = Receiver::new(1 << 20);
        let mut control = Vec::new();
        let drained =
            receiver.receive(&mut [0x81, 0x05, b'h', b'e'], &mut control, &mut Volume::default(), |_| {
                panic!("not complete yet")
            });
        assert_eq!(drained, Drained::Open);
        // A reserved opcode (0x3).
        let mut broken = Receiver::new(1 << 20);
        assert_eq!(
            broken.receive(&mut [0x83, 0x00], &mut control, &mut Volume::default(), |_| {}),
            Drained::Broken
        );
        assert!(control.is_empty());
    }

    /// Feeds client frames to a server-side assembler that agreed deflate (keeping the client's
    /// context or not); returns every message, inflated, and whether each had RSV1.
    fn server_reads(mut frames: Vec<u8>, client_keeps_context: bool) -> Vec<(Vec<u8>, bool)> {
        let mut server = Assembler::new(Role::Server, Limits::default());
        server.enable_deflate(!client_keeps_context);
        let mut messages = Vec::new();
        let mut at = 0;
        while at < frames.len() {
            let rsv1 = frames[at] & (RSV1 << 4) != 0;
            let progress = server.feed(&mut frames[at..]).expect("valid client frames");
            assert!(progress.consumed > 0);
            at += progress.consumed;
            if let Some(Event::Message { payload, .. }) = progress.event {
                messages.push((payload.to_vec(), rsv1));
            }
        }
        messages
    }

    fn agreement(client_no_context_takeover: bool, client_window_bits: Option<u8>) -> Agreement {
        let mut answer = String::from("permessage-deflate; server_no_context_takeover");
        if client_no_context_takeover {
            answer.push_str("; client_no_context_takeover");
        }
        if let Some(bits) = client_window_bits {
            answer.push_str(&format!("; client_max_window_bits={bits}"));
        }
        parse_answer(&answer).expect("a valid answer")
    }

    /// 1 KiB payloads as loadtest fills them, which compress, and every third one 64 random bytes,
    /// which do not.
    fn payloads() -> Vec<Vec<u8>> {
        (0..6u64)
            .map(|seq| {
                if seq % 3 == 2 {
                    let mut rng = fastrand::Rng::with_seed(seq);
                    return (0..64).map(|_| rng.u8(..)).collect();
                }
                let mut buf = vec![0u8; 1024];
                payload::fill(&mut buf, seq, 1_000_000_007 * seq);
                buf
            })
            .collect()
    }

    #[test]
    fn without_context_a_shared_deflater_serves_every_connection_and_small_messages_go_plain() {
        let mut compressors = Compressors::default();
        let agreed = agreement(true, None);
        // Two connections of one thread, interleaved, share the thread's deflater.
        let (mut a, mut b) = (Compression::agreed(Some(&agreed)), Compression::agreed(Some(&agreed)));
        assert!(matches!(a, Compression::Shared { window_bits: 15 }));
        let (mut frames_a, mut frames_b, mut volume) = (Vec::new(), Vec::new(), Volume::default());
        for (i, message) in payloads().iter().enumerate() {
            let (frames, compression) =
                if i % 2 == 0 { (&mut frames_a, &mut a) } else { (&mut frames_b, &mut b) };
            put_message(frames, message, compression, &mut compressors, &mut volume);
        }
        let expected = payloads();
        let mut got: Vec<(Vec<u8>, bool)> = Vec::new();
        let (read_a, read_b) = (server_reads(frames_a, false), server_reads(frames_b, false));
        for i in 0..expected.len() {
            got.push(if i % 2 == 0 { read_a[i / 2].clone() } else { read_b[i / 2].clone() });
        }
        for (message, (read, rsv1)) in expected.iter().zip(&got) {
            assert_eq!(read, message, "the server inflates exactly what was sent");
            // 1 KiB of filler compresses; random bytes do not, so they go plain.
            assert_eq!(*rsv1, message.len() == 1024, "RSV1 on a {} B message", message.len());
        }
        let payload_total: usize = expected.iter().map(Vec::len).sum();
        assert_eq!(volume.payload, payload_total as u64);
        assert!(volume.wire < volume.payload / 2, "{volume:?}: the filler compresses");
        assert_eq!(compressors.shared.iter().flatten().count(), 1, "one deflater for the window size");
    }

    #[test]
    fn with_context_kept_each_connection_has_its_own_deflater_and_every_message_is_compressed() {
        let mut compressors = Compressors::default();
        let mut own = Compression::agreed(Some(&agreement(false, Some(10))));
        assert!(matches!(own, Compression::Own { window_bits: 10, deflater: None }));
        let (mut frames, mut volume) = (Vec::new(), Volume::default());
        for message in payloads() {
            put_message(&mut frames, &message, &mut own, &mut compressors, &mut volume);
        }
        assert!(matches!(own, Compression::Own { deflater: Some(_), .. }));
        assert!(compressors.shared.iter().all(Option::is_none));
        let read = server_reads(frames, true);
        assert_eq!(read.iter().map(|(m, _)| m.clone()).collect::<Vec<_>>(), payloads());
        // Even the random ones: their bytes are in the context the server follows.
        assert!(read.iter().all(|(_, rsv1)| *rsv1));
        assert!(volume.wire < volume.payload);
    }

    #[test]
    fn plain_connections_send_plain_frames_and_count_them() {
        let mut frames = Vec::new();
        let mut volume = Volume::default();
        put_message(
            &mut frames,
            &[9u8; 300],
            &mut Compression::Plain,
            &mut Compressors::default(),
            &mut volume,
        );
        assert_eq!(volume, Volume { payload: 300, wire: 300 });
        assert_eq!(server_reads(frames, false), [(vec![9u8; 300], false)]);
    }

    #[test]
    fn compressed_messages_from_the_server_are_inflated_and_counted_as_on_the_wire() {
        let message = {
            let mut buf = vec![0u8; 2048];
            payload::fill(&mut buf, 3, 7);
            buf
        };
        let mut compressed = Vec::new();
        Deflater::new(1, 15, true).compress(&message, &mut compressed);
        let mut bytes = Vec::new();
        write_frame_with_rsv(&mut bytes, OpCode::Binary, RSV1, &compressed, None);
        write_frame(&mut bytes, OpCode::Binary, b"plain", None);
        let mut receiver = Receiver::new(1 << 20);
        receiver.enable_deflate(true);
        let (mut control, mut volume, mut messages) = (Vec::new(), Volume::default(), Vec::new());
        let drained = receiver.receive(&mut bytes, &mut control, &mut volume, |p| messages.push(p.to_vec()));
        assert_eq!(drained, Drained::Open);
        assert_eq!(messages, [message.clone(), b"plain".to_vec()]);
        assert_eq!(volume, Volume { payload: 2048 + 5, wire: compressed.len() as u64 + 5 });
        // Without the agreement, RSV1 is a protocol error.
        let mut bytes = Vec::new();
        write_frame_with_rsv(&mut bytes, OpCode::Binary, RSV1, &compressed, None);
        assert_eq!(
            Receiver::new(1 << 20).receive(&mut bytes, &mut control, &mut Volume::default(), |_| {}),
            Drained::Broken
        );
    }
}
