//! DESIGN.md's protocol checklist, after the handshake: one test per rule, each failing if the rule
//! is broken. Driven through the public `Assembler`, the way a connection uses it.

mod support;

use ringgate::proto::ProtocolError;
use ringgate::proto::close::{CloseBodyError, CloseCode};
use ringgate::proto::frame::OpCode;
use ringgate::proto::message::{Assembler, Limits, MessageKind, Role};
use support::{OwnedEvent, client_frame, feed_all, feed_in_reads, push_frame};

const KEY: Option<[u8; 4]> = Some([1, 2, 3, 4]);

fn server() -> Assembler {
    Assembler::new(Role::Server, Limits::default())
}

fn expect_error(wire: &[u8], expected: ProtocolError, code: u16) {
    let (_, result) = feed_all(&mut server(), wire);
    assert_eq!(result, Err(expected));
    assert_eq!(expected.close_code(), CloseCode(code));
}

#[test]
fn rsv_bits_without_an_extension_close_with_1002() {
    for rsv in 1..=7 {
        let mut wire = Vec::new();
        push_frame(&mut wire, true, rsv, OpCode::Text, b"hi", KEY);
        expect_error(&wire, ProtocolError::ReservedBits, 1002);
    }
}

#[test]
fn reserved_opcodes_close_with_1002() {
    for opcode in [3u8, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf] {
        let wire = [0x80 | opcode, 0x80, 1, 2, 3, 4];
        expect_error(&wire, ProtocolError::ReservedOpcode, 1002);
    }
}

#[test]
fn unmasked_client_frame_closes_with_1002() {
    let mut wire = Vec::new();
    push_frame(&mut wire, true, 0, OpCode::Text, b"hi", None);
    expect_error(&wire, ProtocolError::UnmaskedFrame, 1002);
}

#[test]
fn masked_server_frame_is_refused_by_a_client() {
    let wire = client_frame(true, OpCode::Binary, b"x");
    let (_, result) = feed_all(&mut Assembler::new(Role::Client, Limits::default()), &wire);
    assert_eq!(result, Err(ProtocolError::MaskedFrame));
}

#[test]
fn control_frame_over_125_bytes_closes_with_1002() {
    let wire = client_frame(true, OpCode::Ping, &[0u8; 126]);
    expect_error(&wire, ProtocolError::ControlFrameTooLong, 1002);
    let (events, result) = feed_all(&mut server(), &client_frame(true, OpCode::Ping, &[7u8; 125]));
    assert_eq!(result, Ok(()));
    assert_eq!(events, vec![OwnedEvent::Ping(vec![7u8; 125])]);
}

#[test]
fn fragmented_control_frame_closes_with_1002() {
    let wire = client_frame(false, OpCode::Ping, b"a");
    expect_error(&wire, ProtocolError::FragmentedControlFrame, 1002);
}

#[test]
fn continuation_without_a_start_closes_with_1002() {
    let wire = client_frame(true, OpCode::Continuation, b"orphan");
    expect_error(&wire, ProtocolError::UnexpectedContinuation, 1002);
}

#[test]
fn new_data_frame_inside_a_fragmented_message_closes_with_1002() {
    let mut wire = client_frame(false, OpCode::Text, b"first");
    wire.extend(client_frame(true, OpCode::Text, b"second"));
    expect_error(&wire, ProtocolError::ExpectedContinuation, 1002);
}

#[test]
fn control_frames_may_interleave_fragments() {
    let mut wire = client_frame(false, OpCode::Text, b"Hel");
    wire.extend(client_frame(true, OpCode::Ping, b"mid"));
    wire.extend(client_frame(false, OpCode::Continuation, b"l"));
    wire.extend(client_frame(true, OpCode::Pong, b""));
    wire.extend(client_frame(true, OpCode::Continuation, b"o"));
    for read in [1, 2, 3, 7, wire.len()] {
        let (events, result) = feed_in_reads(&mut server(), &wire, &[read]);
        assert_eq!(result, Ok(()));
        assert_eq!(
            events,
            vec![
                OwnedEvent::Ping(b"mid".to_vec()),
                OwnedEvent::Pong(vec![]),
                OwnedEvent::Message(MessageKind::Text, b"Hello".to_vec()),
            ],
            "reads of {read} bytes"
        );
    }
}

#[test]
fn length_with_top_bit_set_closes_with_1002() {
    let wire = [0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
    expect_error(&wire, ProtocolError::LengthTopBitSet, 1002);
}

#[test]
fn message_over_the_size_limit_closes_with_1009() {
    let limits = Limits { max_message_size: 100, max_frame_size: 100 };
    let (_, result) =
        feed_all(&mut Assembler::new(Role::Server, limits), &client_frame(true, OpCode::Binary, &[0; 101]));
    assert_eq!(result, Err(ProtocolError::FrameTooBig));
    assert_eq!(ProtocolError::FrameTooBig.close_code(), CloseCode(1009));

    // Fragments that fit one by one but not together.
    let limits = Limits { max_message_size: 100, max_frame_size: 60 };
    let mut wire = client_frame(false, OpCode::Binary, &[0; 60]);
    wire.extend(client_frame(true, OpCode::Continuation, &[0; 41]));
    let (_, result) = feed_all(&mut Assembler::new(Role::Server, limits), &wire);
    assert_eq!(result, Err(ProtocolError::MessageTooBig));
    assert_eq!(ProtocolError::MessageTooBig.close_code(), CloseCode(1009));

    // Exactly at the limit is fine.
    let mut wire = client_frame(false, OpCode::Binary, &[0; 60]);
    wire.extend(client_frame(true, OpCode::Continuation, &[0; 40]));
    let (events, result) = feed_all(&mut Assembler::new(Role::Server, limits), &wire);
    assert_eq!(result, Ok(()));
    assert_eq!(events, vec![OwnedEvent::Message(MessageKind::Binary, vec![0; 100])]);
}

#[test]
fn oversized_frame_is_refused_before_its_payload_arrives() {
    let limits = Limits { max_message_size: 1000, max_frame_size: 1000 };
    let wire = client_frame(true, OpCode::Binary, &[0; 5000]);
    // Only the header: the assembler must not wait for (or buffer) the payload to decide.
    let (_, result) = feed_all(&mut Assembler::new(Role::Server, limits), &wire[..8]);
    assert_eq!(result, Err(ProtocolError::FrameTooBig));
}

#[test]
fn invalid_utf8_text_closes_with_1007() {
    let wire =
        client_frame(true, OpCode::Text, &[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xed, 0xa0, 0x80]);
    expect_error(&wire, ProtocolError::InvalidUtf8, 1007);
}

#[test]
fn invalid_utf8_is_caught_on_the_first_bad_fragment() {
    // Autobahn 6.4.1: the second fragment holds bytes no continuation can fix; the final fragment
    // never arrives, and the assembler must fail anyway.
    let mut wire = client_frame(false, OpCode::Text, "κόσμε".as_bytes());
    wire.extend(client_frame(false, OpCode::Continuation, &[0xf4, 0x90, 0x80, 0x80]));
    expect_error(&wire, ProtocolError::InvalidUtf8, 1007);
}

#[test]
fn invalid_utf8_is_caught_inside_a_partly_received_frame() {
    // Autobahn 6.4.3/6.4.4: one frame whose payload trickles in; the bad bytes come first.
    let mut payload = "κόσμε".as_bytes().to_vec();
    payload.extend([0xf4, 0x90, 0x80, 0x80]);
    payload.extend(b"edited".repeat(10));
    let wire = client_frame(true, OpCode::Text, &payload);
    let cut = 6 + "κόσμε".len() + 2; // header, valid text, the two impossible bytes
    let (_, result) = feed_all(&mut server(), &wire[..cut]);
    assert_eq!(result, Err(ProtocolError::InvalidUtf8));
}

#[test]
fn text_split_inside_a_code_point_across_fragments_is_valid() {
    let text = "€uro";
    let bytes = text.as_bytes();
    let mut wire = client_frame(false, OpCode::Text, &bytes[..1]);
    wire.extend(client_frame(false, OpCode::Continuation, &bytes[1..2]));
    wire.extend(client_frame(true, OpCode::Continuation, &bytes[2..]));
    let (events, result) = feed_all(&mut server(), &wire);
    assert_eq!(result, Ok(()));
    assert_eq!(events, vec![OwnedEvent::Message(MessageKind::Text, bytes.to_vec())]);
}

#[test]
fn text_ending_inside_a_code_point_closes_with_1007() {
    let wire = client_frame(true, OpCode::Text, &"€".as_bytes()[..2]);
    expect_error(&wire, ProtocolError::InvalidUtf8, 1007);
    let mut wire = client_frame(false, OpCode::Text, b"ok");
    wire.extend(client_frame(true, OpCode::Continuation, &"€".as_bytes()[..2]));
    expect_error(&wire, ProtocolError::InvalidUtf8, 1007);
}

#[test]
fn close_with_one_byte_payload_closes_with_1002() {
    let wire = client_frame(true, OpCode::Close, &[0x03]);
    expect_error(&wire, ProtocolError::InvalidClose(CloseBodyError::OneByteBody), 1002);
}

#[test]
fn close_codes_outside_the_registry_close_with_1002() {
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
        let wire = client_frame(true, OpCode::Close, &code.to_be_bytes());
        expect_error(
            &wire,
            ProtocolError::InvalidClose(CloseBodyError::UnsendableCode(CloseCode(code))),
            1002,
        );
    }
}

#[test]
fn registered_and_application_close_codes_are_accepted() {
    for code in
        [1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
    {
        let mut body = code.to_be_bytes().to_vec();
        body.extend(b"reason");
        let (events, result) = feed_all(&mut server(), &client_frame(true, OpCode::Close, &body));
        assert_eq!(result, Ok(()), "code {code}");
        assert_eq!(events, vec![OwnedEvent::Close(Some((CloseCode(code), "reason".into())))]);
    }
}

#[test]
fn close_reason_with_invalid_utf8_closes_with_1007() {
    let wire = client_frame(true, OpCode::Close, &[0x03, 0xe8, 0xff, 0xfe]);
    expect_error(&wire, ProtocolError::InvalidClose(CloseBodyError::InvalidReasonUtf8), 1007);
}

#[test]
fn empty_close_is_a_close_without_a_code() {
    let (events, result) = feed_all(&mut server(), &client_frame(true, OpCode::Close, b""));
    assert_eq!(result, Ok(()));
    assert_eq!(events, vec![OwnedEvent::Close(None)]);
}

#[test]
fn input_after_close_is_discarded() {
    let mut wire = client_frame(true, OpCode::Close, &1000u16.to_be_bytes());
    wire.extend(client_frame(true, OpCode::Text, b"too late"));
    wire.extend([0xff, 0xff]); // even garbage
    let mut assembler = server();
    let (events, result) = feed_all(&mut assembler, &wire);
    assert_eq!(result, Ok(()));
    assert_eq!(events, vec![OwnedEvent::Close(Some((CloseCode::NORMAL, String::new())))]);
    assert!(assembler.is_closed());
}

#[test]
fn ping_payload_is_reported_for_an_identical_pong() {
    let (events, result) = feed_all(&mut server(), &client_frame(true, OpCode::Ping, b"are you there"));
    assert_eq!(result, Ok(()));
    assert_eq!(events, vec![OwnedEvent::Ping(b"are you there".to_vec())]);
}

#[test]
fn binary_messages_are_not_utf8_checked() {
    let wire = client_frame(true, OpCode::Binary, &[0xff, 0xfe, 0x00]);
    let (events, result) = feed_all(&mut server(), &wire);
    assert_eq!(result, Ok(()));
    assert_eq!(events, vec![OwnedEvent::Message(MessageKind::Binary, vec![0xff, 0xfe, 0x00])]);
}

#[test]
fn partial_control_frame_is_left_for_the_caller() {
    let wire = client_frame(true, OpCode::Ping, b"hello");
    let mut partial = wire[..wire.len() - 1].to_vec();
    let progress = server().feed(&mut partial).map(|p| (p.consumed, p.event.is_none()));
    assert_eq!(progress, Ok((0, true)));
}

#[test]
fn a_large_message_buffer_is_released_after_delivery() {
    let mut assembler = server();
    let wire = client_frame(true, OpCode::Binary, &vec![9u8; 512 * 1024]);
    let (events, result) = feed_in_reads(&mut assembler, &wire, &[4096]);
    assert_eq!(result, Ok(()));
    assert_eq!(events.len(), 1);
    let (_, result) = feed_all(&mut assembler, &client_frame(true, OpCode::Ping, b""));
    assert_eq!(result, Ok(()));
    assert_eq!(assembler.buffered_len(), 0);
}
