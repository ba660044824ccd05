//! The WebSocket frame header (RFC 6455 section 5.2): decode and encode.
//!
//! Decoding borrows the caller's bytes and consumes nothing until a whole header is there: a short
//! read is a normal state ([`Decoded::Partial`]), not an error. The rules that can be judged from a
//! header alone (reserved opcodes, control frame size and fragmentation, the 64-bit length's top bit)
//! are judged here; the rules that need the connection's state (masking direction, RSV bits of
//! negotiated extensions, fragmentation order) belong to [`crate::proto::message`].
//!
//! Must never: read past the bytes it is given, or allocate.

use bytes::BufMut;

use super::ProtocolError;
use super::mask::{MaskKey, apply_mask};

/// The longest header: 2 bytes + 8 bytes of extended length + 4 bytes of masking key.
pub const MAX_HEADER_LEN: usize = 14;

/// The largest payload a control frame may carry (section 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// What a frame carries. Reserved opcodes (3-7, 0xB-0xF) have no variant: they are a protocol error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpCode {
    /// A later fragment of a fragmented message.
    Continuation,
    /// The first (or only) frame of a UTF-8 text message.
    Text,
    /// The first (or only) frame of a binary message.
    Binary,
    /// Starts or answers the closing handshake.
    Close,
    /// Asks the peer for a Pong.
    Ping,
    /// Answers a Ping, or serves as a unidirectional heartbeat.
    Pong,
}

impl OpCode {
    /// The opcode for the low 4 bits of a header's first byte, or `None` for a reserved one.
    pub fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// The 4-bit wire value.
    pub fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Control frames (Close, Ping, Pong) may interleave fragments but may not be fragmented.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A decoded frame header. The payload follows it on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Whether this is the last frame of its message.
    pub fin: bool,
    /// The three RSV bits, in the low bits (RSV1 = 0b100). Non-zero only with a negotiated extension.
    pub rsv: u8,
    /// What the frame carries.
    pub opcode: OpCode,
    /// The masking key; clients must mask, servers must not.
    pub mask: Option<MaskKey>,
    /// Payload length in bytes.
    pub payload_len: u64,
}

/// The outcome of [`FrameHeader::decode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Not enough bytes for a whole header yet; nothing was consumed.
    Partial,
    /// A whole header, and how many bytes of input it took.
    Header(FrameHeader, usize),
}

impl FrameHeader {
    /// Decodes a header from the start of `buf`, judging the rules a header alone can break.
    pub fn decode(buf: &[u8]) -> Result<Decoded, ProtocolError> {
        let [first, second, rest @ ..] = buf else {
            return Ok(Decoded::Partial);
        };
        let opcode = OpCode::from_bits(first & 0x0f).ok_or(ProtocolError::ReservedOpcode)?;
        let fin = first & 0x80 != 0;
        let masked = second & 0x80 != 0;
        let (payload_len, len_bytes) = match second & 0x7f {
            126 => match rest {
                [a, b, ..] => (u64::from(u16::from_be_bytes([*a, *b])), 2),
                _ => return Ok(Decoded::Partial),
            },
            127 => match rest.first_chunk::<8>() {
                Some(bytes) => (u64::from_be_bytes(*bytes), 8),
                None => return Ok(Decoded::Partial),
            },
            short => (u64::from(short), 0),
        };
        if payload_len >> 63 != 0 {
            return Err(ProtocolError::LengthTopBitSet);
        }
        if opcode.is_control() {
            if !fin {
                return Err(ProtocolError::FragmentedControlFrame);
            }
            if payload_len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(ProtocolError::ControlFrameTooLong);
            }
        }
        let rest = &rest[len_bytes..];
        let mask = if masked {
            match rest.first_chunk::<4>() {
                Some(key) => Some(*key),
                None => return Ok(Decoded::Partial),
            }
        } else {
            None
        };
        let header = FrameHeader { fin, rsv: (first >> 4) & 0x7, opcode, mask, payload_len };
        Ok(Decoded::Header(header, header.encoded_len()))
    }

    /// The number of bytes this header takes on the wire.
    pub fn encoded_len(&self) -> usize {
        let len_bytes = match self.payload_len {
            0..=125 => 0,
            126..=0xffff => 2,
            _ => 8,
        };
        2 + len_bytes + if self.mask.is_some() { 4 } else { 0 }
    }

    /// Writes the header (with the shortest length encoding, as section 5.2 requires) into `dst`
    /// and returns the number of bytes written.
    pub fn encode(&self, dst: &mut [u8; MAX_HEADER_LEN]) -> usize {
        dst[0] = (u8::from(self.fin) << 7) | ((self.rsv & 0x7) << 4) | self.opcode.bits();
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let mut at = match self.payload_len {
            len @ 0..=125 => {
                dst[1] = mask_bit | len as u8;
                2
            }
            len @ 126..=0xffff => {
                dst[1] = mask_bit | 126;
                dst[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                4
            }
            len => {
                dst[1] = mask_bit | 127;
                dst[2..10].copy_from_slice(&len.to_be_bytes());
                10
            }
        };
        if let Some(key) = self.mask {
            dst[at..at + 4].copy_from_slice(&key);
            at += 4;
        }
        at
    }
}

/// Appends a whole unfragmented frame to `dst`: unmasked as a server sends it (`mask: None`), or
/// masked with `key` as a client must.
///
/// Server frames carry no per-receiver bytes, so pub/sub fan-out encodes a message once and shares
/// the result. Masking goes through a small stack block, so no `dst` type needs in-place access.
pub fn write_frame(dst: &mut impl BufMut, opcode: OpCode, payload: &[u8], mask: Option<MaskKey>) {
    write_frame_with_rsv(dst, opcode, 0, payload, mask);
}

/// RSV1, which permessage-deflate (RFC 7692 section 6) sets on a compressed message's first frame.
pub const RSV1: u8 = 0b100;

/// [`write_frame`] with reserved bits set, for an extension that gives them meaning (RSV1 on a
/// message compressed by permessage-deflate).
pub fn write_frame_with_rsv(
    dst: &mut impl BufMut,
    opcode: OpCode,
    rsv: u8,
    payload: &[u8],
    mask: Option<MaskKey>,
) {
    let header = FrameHeader { fin: true, rsv, opcode, mask, payload_len: payload.len() as u64 };
    let mut head = [0u8; MAX_HEADER_LEN];
    let head_len = header.encode(&mut head);
    dst.put_slice(&head[..head_len]);
    match mask {
        None => dst.put_slice(payload),
        Some(key) => {
            let mut block = [0u8; 512];
            for (index, piece) in payload.chunks(block.len()).enumerate() {
                let block = &mut block[..piece.len()];
                block.copy_from_slice(piece);
                apply_mask(block, key, index * 512);
                dst.put_slice(block);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_whole(bytes: &[u8]) -> (FrameHeader, usize) {
        match FrameHeader::decode(bytes) {
            Ok(Decoded::Header(header, len)) => (header, len),
            other => panic!("expected a header, got {other:?}"),
        }
    }

    /// RFC 6455 section 5.7: a single-frame unmasked text message "Hello".
    #[test]
    fn rfc_unmasked_hello() {
        let wire = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let (header, len) = decode_whole(&wire);
        assert_eq!(len, 2);
        assert_eq!(
            header,
            FrameHeader { fin: true, rsv: 0, opcode: OpCode::Text, mask: None, payload_len: 5 }
        );
        let mut encoded = Vec::new();
        write_frame(&mut encoded, OpCode::Text, b"Hello", None);
        assert_eq!(encoded, wire);
    }

    /// RFC 6455 section 5.7: a single-frame masked text message "Hello".
    #[test]
    fn rfc_masked_hello() {
        let wire = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let (header, len) = decode_whole(&wire);
        assert_eq!(len, 6);
        assert_eq!(header.mask, Some([0x37, 0xfa, 0x21, 0x3d]));
        let mut encoded = Vec::new();
        write_frame(&mut encoded, OpCode::Text, b"Hello", Some([0x37, 0xfa, 0x21, 0x3d]));
        assert_eq!(encoded, wire);
    }

    /// RFC 6455 section 5.7: a fragmented unmasked text message, "Hel" then "lo".
    #[test]
    fn rfc_fragmented_hello() {
        let (first, _) = decode_whole(&[0x01, 0x03, 0x48, 0x65, 0x6c]);
        assert!(!first.fin);
        assert_eq!(first.opcode, OpCode::Text);
        let (second, _) = decode_whole(&[0x80, 0x02, 0x6c, 0x6f]);
        assert!(second.fin);
        assert_eq!(second.opcode, OpCode::Continuation);
    }

    /// RFC 6455 section 5.7: unmasked Ping "Hello", and a masked Pong "Hello".
    #[test]
    fn rfc_ping_and_pong() {
        let (ping, _) = decode_whole(&[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        assert_eq!(ping.opcode, OpCode::Ping);
        let pong_wire = [0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let (pong, _) = decode_whole(&pong_wire);
        assert_eq!(pong.opcode, OpCode::Pong);
        assert!(pong.mask.is_some());
    }

    /// RFC 6455 section 5.7: 256 bytes and 64 KiB binary messages in a single unmasked frame.
    #[test]
    fn rfc_extended_lengths() {
        let (header, len) = decode_whole(&[0x82, 0x7e, 0x01, 0x00]);
        assert_eq!((header.payload_len, len), (256, 4));
        let (header, len) = decode_whole(&[0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!((header.payload_len, len), (65536, 10));
    }

    #[test]
    fn every_short_prefix_is_partial_and_consumes_nothing() {
        let wire = [0x82, 0xff, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4];
        for cut in 0..wire.len() {
            assert_eq!(FrameHeader::decode(&wire[..cut]), Ok(Decoded::Partial), "cut {cut}");
        }
        assert_eq!(decode_whole(&wire).1, 14);
    }

    #[test]
    fn reserved_opcodes_are_protocol_errors() {
        for bits in [3, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf] {
            assert_eq!(
                FrameHeader::decode(&[0x80 | bits, 0x80]),
                Err(ProtocolError::ReservedOpcode),
                "opcode {bits:#x}"
            );
        }
    }

    #[test]
    fn length_with_top_bit_set_is_a_protocol_error() {
        let wire = [0x82, 0x7f, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(FrameHeader::decode(&wire), Err(ProtocolError::LengthTopBitSet));
    }

    #[test]
    fn control_frame_over_125_bytes_is_a_protocol_error() {
        assert_eq!(FrameHeader::decode(&[0x89, 0x7e, 0x00, 0x7e]), Err(ProtocolError::ControlFrameTooLong));
        assert!(FrameHeader::decode(&[0x89, 0x7d]).is_ok());
    }

    #[test]
    fn fragmented_control_frame_is_a_protocol_error() {
        assert_eq!(FrameHeader::decode(&[0x09, 0x00]), Err(ProtocolError::FragmentedControlFrame));
    }

    #[test]
    fn encode_then_decode_round_trips_at_every_length_boundary() {
        for payload_len in [0, 1, 125, 126, 127, 0xffff, 0x10000, u64::MAX >> 1] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let header =
                    FrameHeader { fin: false, rsv: 0b101, opcode: OpCode::Binary, mask, payload_len };
                let mut wire = [0u8; MAX_HEADER_LEN];
                let len = header.encode(&mut wire);
                assert_eq!(len, header.encoded_len());
                assert_eq!(decode_whole(&wire[..len]), (header, len));
            }
        }
    }
}
