//! What a message looks like on a broker channel: a small binary header and the payload.
//!
//! ```text
//! 0..2   b"rg"        marks a ringgate envelope (anything else on the channel is counted malformed)
//! 2      version      1
//! 3      flags        bit 0: text (else binary); other bits reserved, must be 0
//! 4..12  node         the publishing node's id, big-endian: a node drops its own messages when
//!                     they come back (it delivered them locally already)
//! 12..20 sequence     the publishing node's count of messages sent to the broker, from 1:
//!                     per-node order and gaps are visible to receivers; history and recovery
//!                     (`?since=`) will carry a stream offset here instead (version 2)
//! 20..   payload      the message's payload, as the publisher sent it
//! ```
//!
//! Sans I/O and allocation-free on decode (borrows the channel message). Must never: trust a
//! length or a flag it has not checked; a short or foreign message decodes to `None`.

use crate::proto::message::MessageKind;

/// The envelope's header length.
pub const HEADER_LEN: usize = 20;
const MAGIC: &[u8; 2] = b"rg";
const VERSION: u8 = 1;
const TEXT: u8 = 1;

/// A decoded envelope, borrowing the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The publishing node.
    pub node: u64,
    /// The publishing node's sequence number for this message.
    pub sequence: u64,
    /// Text or binary.
    pub kind: MessageKind,
    /// The payload.
    pub payload: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Appends the encoded envelope to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(HEADER_LEN + self.payload.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(if self.kind == MessageKind::Text { TEXT } else { 0 });
        out.extend_from_slice(&self.node.to_be_bytes());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(self.payload);
    }

    /// Decodes `bytes`; `None` for anything that is not a version-1 ringgate envelope.
    pub fn decode(bytes: &'a [u8]) -> Option<Envelope<'a>> {
        let (header, payload) = bytes.split_at_checked(HEADER_LEN)?;
        if &header[0..2] != MAGIC || header[2] != VERSION || header[3] & !TEXT != 0 {
            return None;
        }
        let node = u64::from_be_bytes(header[4..12].try_into().ok()?);
        let sequence = u64::from_be_bytes(header[12..20].try_into().ok()?);
        let kind = if header[3] & TEXT != 0 { MessageKind::Text } else { MessageKind::Binary };
        Some(Envelope { node, sequence, kind, payload })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_round_trips() {
        for (kind, payload) in [(MessageKind::Text, &b"hello"[..]), (MessageKind::Binary, &[0u8, 255, 7][..])]
        {
            let envelope = Envelope { node: 0x0102_0304_0506_0708, sequence: 42, kind, payload };
            let mut wire = Vec::new();
            envelope.encode(&mut wire);
            assert_eq!(wire.len(), HEADER_LEN + payload.len());
            assert_eq!(Envelope::decode(&wire), Some(envelope));
        }
        let empty = Envelope { node: 1, sequence: 1, kind: MessageKind::Text, payload: b"" };
        let mut wire = Vec::new();
        empty.encode(&mut wire);
        assert_eq!(Envelope::decode(&wire), Some(empty));
    }

    #[test]
    fn anything_else_is_refused() {
        let mut wire = Vec::new();
        Envelope { node: 1, sequence: 2, kind: MessageKind::Text, payload: b"x" }.encode(&mut wire);
        for cut in 0..HEADER_LEN {
            assert_eq!(Envelope::decode(&wire[..cut]), None, "a {cut}-byte prefix");
        }
        for (at, value) in [(0, b'x'), (2, 2), (3, 0x80)] {
            let mut bad = wire.clone();
            bad[at] = value;
            assert_eq!(Envelope::decode(&bad), None, "byte {at} = {value}");
        }
        assert_eq!(Envelope::decode(b"plain text from someone else's PUBLISH"), None);
    }
}
