//! permessage-deflate after the handshake (RFC 7692 sections 6 and 7.2), driven through the
//! public `Assembler` the way a connection uses it once the extension was agreed: RSV1 on a
//! message's first frame means compressed, the message is inflated within the size limit, and a
//! text message's UTF-8 is checked after inflating.

mod support;

use proptest::prelude::*;
use ringgate::proto::ProtocolError;
use ringgate::proto::deflate::Deflater;
use ringgate::proto::frame::OpCode;
use ringgate::proto::message::{Assembler, Limits, MessageKind, Role};
use support::{OwnedEvent, feed_all, feed_in_reads, push_frame};

const KEY: Option<[u8; 4]> = Some([9, 8, 7, 6]);
const RSV1: u8 = 0b100;

fn negotiated(limits: Limits, no_context: bool) -> Assembler {
    let mut assembler = Assembler::new(Role::Server, limits);
    assembler.enable_deflate(no_context);
    assembler
}

/// RFC 7692 section 7.2.3.1: "Hello" compressed, whole and in two fragments.
const HELLO: [u8; 7] = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];

#[test]
fn the_rfc_examples_inflate_whole_and_fragmented() {
    let mut wire = Vec::new();
    push_frame(&mut wire, true, RSV1, OpCode::Text, &HELLO, KEY);
    // The fragmented form: RSV1 on the first fragment only.
    push_frame(&mut wire, false, RSV1, OpCode::Text, &HELLO[..3], KEY);
    push_frame(&mut wire, true, 0, OpCode::Continuation, &HELLO[3..], KEY);
    let (events, result) = feed_all(&mut negotiated(Limits::default(), true), &wire);
    assert_eq!(result, Ok(()));
    let hello = OwnedEvent::Message(MessageKind::Text, b"Hello".to_vec());
    assert_eq!(events, [hello.clone(), hello]);
}

#[test]
fn rsv1_is_only_allowed_on_the_first_frame_of_a_data_message() {
    let mut continuation = Vec::new();
    push_frame(&mut continuation, false, RSV1, OpCode::Text, &HELLO[..3], KEY);
    push_frame(&mut continuation, true, RSV1, OpCode::Continuation, &HELLO[3..], KEY);
    let mut ping = Vec::new();
    push_frame(&mut ping, true, RSV1, OpCode::Ping, b"", KEY);
    let mut rsv2 = Vec::new();
    push_frame(&mut rsv2, true, 0b010, OpCode::Text, b"x", KEY);
    for wire in [continuation, ping, rsv2] {
        let (_, result) = feed_all(&mut negotiated(Limits::default(), true), &wire);
        assert_eq!(result, Err(ProtocolError::ReservedBits));
    }
    // Without the extension, RSV1 is an error as before.
    let mut wire = Vec::new();
    push_frame(&mut wire, true, RSV1, OpCode::Text, &HELLO, KEY);
    let (_, result) = feed_all(&mut Assembler::new(Role::Server, Limits::default()), &wire);
    assert_eq!(result, Err(ProtocolError::ReservedBits));
}

#[test]
fn a_bomb_is_message_too_big_and_corrupt_data_is_1007() {
    let mut deflater = Deflater::new(9, 15, true);
    let mut bomb = Vec::new();
    deflater.compress(&vec![b'a'; 4 << 20], &mut bomb);
    let limits = Limits { max_message_size: 1 << 20, max_frame_size: 1 << 20 };
    let mut wire = Vec::new();
    push_frame(&mut wire, true, RSV1, OpCode::Binary, &bomb, KEY);
    let (_, result) = feed_all(&mut negotiated(limits, true), &wire);
    assert_eq!(result, Err(ProtocolError::MessageTooBig));
    assert_eq!(ProtocolError::MessageTooBig.close_code().0, 1009);

    let mut wire = Vec::new();
    push_frame(&mut wire, true, RSV1, OpCode::Binary, &[0x07, 0x00], KEY);
    let (_, result) = feed_all(&mut negotiated(Limits::default(), true), &wire);
    assert_eq!(result, Err(ProtocolError::InvalidCompressedData));
    assert_eq!(ProtocolError::InvalidCompressedData.close_code().0, 1007);
}

#[test]
fn limits_apply_to_the_inflated_size_so_incompressible_data_at_the_limit_passes() {
    // Random bytes grow a little when deflated: a message of exactly the limit is over it on the
    // wire, and must still be accepted (Python websockets sends such frames).
    let limits = Limits { max_message_size: 64 << 10, max_frame_size: 64 << 10 };
    let mut noise = vec![0u8; 64 << 10];
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for byte in &mut noise {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    let mut compressed = Vec::new();
    Deflater::new(6, 15, true).compress(&noise, &mut compressed);
    assert!(compressed.len() > noise.len(), "incompressible: {} bytes on the wire", compressed.len());
    for fragments in [1, 3] {
        let mut wire = Vec::new();
        let pieces: Vec<&[u8]> = compressed.chunks(compressed.len().div_ceil(fragments)).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let (rsv, opcode) = if i == 0 { (RSV1, OpCode::Binary) } else { (0, OpCode::Continuation) };
            push_frame(&mut wire, i + 1 == pieces.len(), rsv, opcode, piece, KEY);
        }
        let (events, result) = feed_all(&mut negotiated(limits, true), &wire);
        assert_eq!(result, Ok(()), "{fragments} fragment(s)");
        assert_eq!(events, [OwnedEvent::Message(MessageKind::Binary, noise.clone())]);
    }
    // One byte more inflated is over the limit.
    let mut over = Vec::new();
    noise.push(0);
    Deflater::new(6, 15, true).compress(&noise, &mut over);
    let mut wire = Vec::new();
    push_frame(&mut wire, true, RSV1, OpCode::Binary, &over, KEY);
    let (_, result) = feed_all(&mut negotiated(limits, true), &wire);
    assert_eq!(result, Err(ProtocolError::MessageTooBig));
}

#[test]
fn text_is_checked_for_utf8_after_inflating() {
    let mut deflater = Deflater::new(6, 15, true);
    let mut compressed = Vec::new();
    deflater.compress(&[b'o', b'k', 0xff, 0xfe], &mut compressed);
    let mut wire = Vec::new();
    push_frame(&mut wire, true, RSV1, OpCode::Text, &compressed, KEY);
    let (_, result) = feed_all(&mut negotiated(Limits::default(), true), &wire);
    assert_eq!(result, Err(ProtocolError::InvalidUtf8));
    // The same bytes as a binary message are fine.
    let mut wire = Vec::new();
    push_frame(&mut wire, true, RSV1, OpCode::Binary, &compressed, KEY);
    let (events, result) = feed_all(&mut negotiated(Limits::default(), true), &wire);
    assert_eq!(result, Ok(()));
    assert_eq!(events, [OwnedEvent::Message(MessageKind::Binary, vec![b'o', b'k', 0xff, 0xfe])]);
}

proptest! {
    /// Random messages, compressed (with or without context kept between them), fragmented and
    /// delivered in random reads, come out as they went in; uncompressed messages in between are
    /// untouched.
    #[test]
    fn compressed_messages_survive_any_fragmentation_and_read_split(
        messages in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..2000), any::<bool>(), 1usize..4), 1..6),
        reads in proptest::collection::vec(1usize..300, 1..20),
        no_context in any::<bool>(),
    ) {
        let mut deflater = Deflater::new(6, 15, no_context);
        let mut wire = Vec::new();
        for (message, compress, fragments) in &messages {
            let body = if *compress {
                let mut out = Vec::new();
                deflater.compress(message, &mut out);
                out
            } else {
                message.clone()
            };
            let piece = body.len().div_ceil(*fragments).max(1);
            let pieces: Vec<&[u8]> = if body.is_empty() { vec![&[][..]] } else { body.chunks(piece).collect() };
            for (i, part) in pieces.iter().enumerate() {
                let first = i == 0;
                let rsv = if first && *compress { RSV1 } else { 0 };
                let opcode = if first { OpCode::Binary } else { OpCode::Continuation };
                push_frame(&mut wire, i + 1 == pieces.len(), rsv, opcode, part, KEY);
            }
        }
        let (events, result) = feed_in_reads(&mut negotiated(Limits::default(), no_context), &wire, &reads);
        prop_assert_eq!(result, Ok(()));
        let expected: Vec<OwnedEvent> =
            messages.iter().map(|(m, _, _)| OwnedEvent::Message(MessageKind::Binary, m.clone())).collect();
        prop_assert_eq!(events, expected);
    }
}
