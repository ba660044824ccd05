//! Helpers shared by the protocol tests: building wire frames as a client would, and driving an
//! [`Assembler`] the way a connection does (reads of arbitrary size, an unconsumed tail kept).

#![allow(dead_code)]

use ringgate::proto::ProtocolError;
use ringgate::proto::close::CloseCode;
use ringgate::proto::frame::{FrameHeader, MAX_HEADER_LEN, OpCode};
use ringgate::proto::mask::apply_mask;
use ringgate::proto::message::{Assembler, Event, MessageKind};

/// An owned copy of an [`Event`], so tests can collect and compare them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedEvent {
    Message(MessageKind, Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(CloseCode, String)>),
}

impl From<Event<'_>> for OwnedEvent {
    fn from(event: Event<'_>) -> Self {
        match event {
            Event::Message { kind, payload } => OwnedEvent::Message(kind, payload.to_vec()),
            Event::Ping(p) => OwnedEvent::Ping(p.to_vec()),
            Event::Pong(p) => OwnedEvent::Pong(p.to_vec()),
            Event::Close(c) => OwnedEvent::Close(c.map(|c| (c.code, c.reason.to_string()))),
        }
    }
}

/// Appends one raw frame with every header field under the test's control.
pub fn push_frame(
    wire: &mut Vec<u8>,
    fin: bool,
    rsv: u8,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    let header = FrameHeader { fin, rsv, opcode, mask, payload_len: payload.len() as u64 };
    let mut head = [0u8; MAX_HEADER_LEN];
    let len = header.encode(&mut head);
    wire.extend_from_slice(&head[..len]);
    let start = wire.len();
    wire.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut wire[start..], key, 0);
    }
}

/// A masked client frame, as every real client sends.
pub fn client_frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    push_frame(&mut wire, fin, 0, opcode, payload, Some([0xa1, 0xb2, 0xc3, 0xd4]));
    wire
}

/// Feeds `wire` to the assembler in reads whose sizes cycle through `read_sizes`, keeping the
/// unconsumed tail between reads as a connection does. Stops at the first error.
pub fn feed_in_reads(
    assembler: &mut Assembler,
    wire: &[u8],
    read_sizes: &[usize],
) -> (Vec<OwnedEvent>, Result<(), ProtocolError>) {
    let mut events = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut at = 0;
    let mut sizes = read_sizes.iter().copied().cycle();
    while at < wire.len() {
        let read = sizes.next().unwrap_or(wire.len()).max(1);
        let end = (at + read).min(wire.len());
        pending.extend_from_slice(&wire[at..end]);
        at = end;
        let mut start = 0;
        loop {
            match assembler.feed(&mut pending[start..]) {
                Ok(progress) => {
                    let consumed = progress.consumed;
                    let had_event = progress.event.is_some();
                    if let Some(event) = progress.event {
                        events.push(event.into());
                    }
                    start += consumed;
                    if consumed == 0 && !had_event {
                        break;
                    }
                }
                Err(error) => return (events, Err(error)),
            }
        }
        pending.drain(..start);
    }
    (events, Ok(()))
}

/// Feeds all of `wire` in one read.
pub fn feed_all(assembler: &mut Assembler, wire: &[u8]) -> (Vec<OwnedEvent>, Result<(), ProtocolError>) {
    feed_in_reads(assembler, wire, &[wire.len().max(1)])
}
