//! What a message looks like on a broker channel: a small binary header and the payload.
//!
//! Version 1 (no history):
//! ```text
//! 0..2   b"rg"        marks a ringgate envelope (anything else on the channel is counted malformed)
//! 2      version      1
//! 3      flags        bit 0: text (else binary); other bits reserved, must be 0
//! 4..12  node         the publishing node's id, big-endian: a node drops its own messages when
//!                     they come back (it delivered them locally already)
//! 12..20 sequence     the publishing node's count of messages sent to the broker, from 1:
//!                     per-node order and gaps are visible to receivers
//! 20..   payload      the message's payload, as the publisher sent it
//! ```
//!
//! Version 2 (history kept in Redis, `--history-size`/`--positions`): the publishing node sends
//! the first 20 bytes (its [`head`]) and the payload to the Redis script, which assigns the offset
//! and puts the topic's epoch and the offset between them, so that the same bytes go to the
//! channel and into the topic's stream:
//! ```text
//! 0..2   b"rg"
//! 2      version      2
//! 3      flags        as in version 1
//! 4..12  node         the publishing node's id; it is NOT dropped when it comes back: every node,
//!                     the publisher's included, delivers in the order Redis assigned the offsets
//! 12..20 origin       the publishing subscriber on that node (0: none, an HTTP publish), which
//!                     does not get its own message back (see [`origin`])
//! 20..28 epoch        the topic history's epoch
//! 28..36 offset       the message's offset in it, from 1
//! 36..   payload
//! ```
//!
//! Sans I/O and allocation-free on decode (borrows the channel message). Must never: trust a
//! length or a flag it has not checked; a short or foreign message decodes to `None`.

use crate::gateway::history::Position;
use crate::proto::message::MessageKind;

/// The version-1 header's length (and the length of a version-2 head, before epoch and offset).
pub const HEADER_LEN: usize = 20;
/// The version-2 header's length.
pub const HEADER_V2_LEN: usize = 36;
const MAGIC: &[u8; 2] = b"rg";
const VERSION: u8 = 1;
const VERSION_2: u8 = 2;
const TEXT: u8 = 1;

/// A decoded envelope, borrowing the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The publishing node.
    pub node: u64,
    /// Version 1: the publishing node's sequence number for this message; version 2: the
    /// publishing subscriber ([`origin`]).
    pub sequence: u64,
    /// Version 2: the message's position in its topic's history; `None` for version 1.
    pub position: Option<Position>,
    /// Text or binary.
    pub kind: MessageKind,
    /// The payload.
    pub payload: &'a [u8],
}

/// The `origin` of a version-2 envelope: which subscriber on the publishing node published it (so
/// that it does not get its own message back without `--pubsub-echo`): its worker plus one in the
/// top 16 bits, its id on that worker below. 0: no subscriber (an HTTP publish, or echo on).
pub fn origin(worker: usize, subscriber: u64) -> u64 {
    ((worker as u64 + 1) << 48) | (subscriber & ((1 << 48) - 1))
}

/// The worker and subscriber id an `origin` names, if any.
pub fn origin_parts(origin: u64) -> Option<(usize, u64)> {
    let worker = (origin >> 48) as usize;
    (worker != 0).then(|| (worker - 1, origin & ((1 << 48) - 1)))
}

/// Appends the first 20 bytes of a version-2 envelope (the script adds epoch, offset, payload).
pub fn head(node: u64, origin: u64, kind: MessageKind, out: &mut Vec<u8>) {
    out.extend_from_slice(MAGIC);
    out.push(VERSION_2);
    out.push(if kind == MessageKind::Text { TEXT } else { 0 });
    out.extend_from_slice(&node.to_be_bytes());
    out.extend_from_slice(&origin.to_be_bytes());
}

impl<'a> Envelope<'a> {
    /// Appends the encoded envelope to `out`: version 2 with a position, else version 1.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(HEADER_V2_LEN + self.payload.len());
        match self.position {
            Some(position) => {
                head(self.node, self.sequence, self.kind, out);
                out.extend_from_slice(&position.epoch.to_be_bytes());
                out.extend_from_slice(&position.offset.to_be_bytes());
            }
            None => {
                out.extend_from_slice(MAGIC);
                out.push(VERSION);
                out.push(if self.kind == MessageKind::Text { TEXT } else { 0 });
                out.extend_from_slice(&self.node.to_be_bytes());
                out.extend_from_slice(&self.sequence.to_be_bytes());
            }
        }
        out.extend_from_slice(self.payload);
    }

    /// Decodes `bytes`; `None` for anything that is not a version-1 or version-2 ringgate envelope.
    pub fn decode(bytes: &'a [u8]) -> Option<Envelope<'a>> {
        let header = bytes.get(..HEADER_LEN)?;
        let version = header[2];
        if &header[0..2] != MAGIC || !(version == VERSION || version == VERSION_2) || header[3] & !TEXT != 0 {
            return None;
        }
        let word = |at: usize| bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        let node = word(4)?;
        let sequence = word(12)?;
        let kind = if header[3] & TEXT != 0 { MessageKind::Text } else { MessageKind::Binary };
        if version == VERSION {
            return Some(Envelope { node, sequence, position: None, kind, payload: &bytes[HEADER_LEN..] });
        }
        let position = Position { epoch: word(20)?, offset: word(28)? };
        let payload = bytes.get(HEADER_V2_LEN..)?;
        Some(Envelope { node, sequence, position: Some(position), kind, payload })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_round_trips() {
        let at = Some(Position { epoch: 0xfeed_0000_0000_beef, offset: 77 });
        for position in [None, at] {
            for (kind, payload) in
                [(MessageKind::Text, &b"hello"[..]), (MessageKind::Binary, &[0u8, 255, 7][..])]
            {
                let envelope =
                    Envelope { node: 0x0102_0304_0506_0708, sequence: 42, position, kind, payload };
                let mut wire = Vec::new();
                envelope.encode(&mut wire);
                let header = if position.is_some() { HEADER_V2_LEN } else { HEADER_LEN };
                assert_eq!(wire.len(), header + payload.len());
                assert_eq!(Envelope::decode(&wire), Some(envelope));
            }
        }
        let empty = Envelope { node: 1, sequence: 1, position: None, kind: MessageKind::Text, payload: b"" };
        let mut wire = Vec::new();
        empty.encode(&mut wire);
        assert_eq!(Envelope::decode(&wire), Some(empty));
    }

    #[test]
    fn a_version_2_head_is_what_the_script_completes() {
        let mut wire = Vec::new();
        head(9, origin(3, 5), MessageKind::Binary, &mut wire);
        assert_eq!(wire.len(), HEADER_LEN);
        wire.extend_from_slice(&7u64.to_be_bytes());
        wire.extend_from_slice(&8u64.to_be_bytes());
        wire.extend_from_slice(b"p");
        let envelope = Envelope::decode(&wire).expect("version 2");
        assert_eq!(envelope.position, Some(Position { epoch: 7, offset: 8 }));
        assert_eq!(origin_parts(envelope.sequence), Some((3, 5)));
        assert_eq!(origin_parts(0), None);
        assert_eq!(envelope.payload, b"p");
    }

    #[test]
    fn anything_else_is_refused() {
        let mut wire = Vec::new();
        let envelope =
            Envelope { node: 1, sequence: 2, position: None, kind: MessageKind::Text, payload: b"x" };
        envelope.encode(&mut wire);
        for cut in 0..HEADER_LEN {
            assert_eq!(Envelope::decode(&wire[..cut]), None, "a {cut}-byte prefix");
        }
        for (at, value) in [(0, b'x'), (2, 3), (3, 0x80)] {
            let mut bad = wire.clone();
            bad[at] = value;
            assert_eq!(Envelope::decode(&bad), None, "byte {at} = {value}");
        }
        let mut short_v2 = wire.clone();
        short_v2[2] = 2;
        assert_eq!(Envelope::decode(&short_v2), None, "a version-2 header cut short");
        assert_eq!(Envelope::decode(b"plain text from someone else's PUBLISH"), None);
    }
}
