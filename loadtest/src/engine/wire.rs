//! The receive side of one connection: the protocol core's [`Assembler`] fed in place from the
//! buffer the io backend lends, plus the unfinished tail kept between reads (ringgate's own
//! [`process_after_tail`], so an idle connection holds no receive buffer at all). Also the few
//! frames the client writes besides messages.
//!
//! Must never: re-implement any part of RFC 6455 (framing and validation are `ringgate::proto`'s),
//! allocate per message, or keep an allocation for an empty tail.

use ringgate::io::process_after_tail;
use ringgate::proto::close::{CloseCode, write_close_body};
use ringgate::proto::frame::{OpCode, write_frame};
use ringgate::proto::message::{Assembler, Event, Limits, Role};

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

    /// Handles `data` (just read) after the kept tail: every complete message goes to
    /// `on_message`, Pings are answered into `control`, Pongs are ignored, and a Close stops it.
    /// Only what is unfinished is kept.
    pub fn receive(
        &mut self,
        data: &mut [u8],
        control: &mut Vec<u8>,
        on_message: impl FnMut(&[u8]),
    ) -> Drained {
        let assembler = &mut self.assembler;
        let mut outcome = Drained::Open;
        process_after_tail(&mut self.tail, data, |buf| {
            drain(assembler, buf, control, on_message, &mut outcome)
        });
        outcome
    }

    /// Handles what the tail already holds (frames that came with the handshake response).
    pub fn receive_tail(&mut self, control: &mut Vec<u8>, on_message: impl FnMut(&[u8])) -> Drained {
        let mut tail = std::mem::take(&mut self.tail);
        self.receive(&mut tail, control, on_message)
    }
}

/// Feeds `buf` to the assembler until it needs more bytes or a Close came; returns the bytes used.
fn drain(
    assembler: &mut Assembler,
    buf: &mut [u8],
    control: &mut Vec<u8>,
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
            Some(Event::Message { payload, .. }) => on_message(payload),
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
    use ringgate::proto::frame::{OpCode, write_frame};

    use super::{Drained, Receiver};

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
        let drained = receiver.receive(&mut bytes, &mut control, |payload| messages.push(payload.to_vec()));
        assert_eq!(drained, Drained::Closed(1001));
        assert_eq!(messages, [b"a".to_vec(), b"b".to_vec()]);
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
            let drained =
                receiver.receive(&mut [*byte], &mut control, |payload| messages.push(payload.len()));
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
            receiver.receive(&mut [0x81, 0x05, b'h', b'e'], &mut control, |_| panic!("not complete yet"));
        assert_eq!(drained, Drained::Open);
        // A reserved opcode (0x3).
        let mut broken = Receiver::new(1 << 20);
        assert_eq!(broken.receive(&mut [0x83, 0x00], &mut control, |_| {}), Drained::Broken);
        assert!(control.is_empty());
    }
}
