//! Property tests: random messages, encoded as a client would (fragmented at random, control frames
//! interleaved, masked with random keys), then fed to the server's assembler in reads split at
//! random points, come out as the same events in the same order.

mod support;

use proptest::prelude::*;
use ringgate::proto::close::CloseCode;
use ringgate::proto::frame::OpCode;
use ringgate::proto::message::{Assembler, Limits, MessageKind, Role};
use support::{OwnedEvent, feed_in_reads, push_frame};

/// One thing the client sends: a data message split into fragments, or a control frame.
#[derive(Clone, Debug)]
enum Sent {
    Message { kind: MessageKind, payload: Vec<u8>, fragment_lens: Vec<usize>, pings_between: Vec<Vec<u8>> },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

fn payload_for(kind: MessageKind) -> BoxedStrategy<Vec<u8>> {
    match kind {
        MessageKind::Text => "\\PC{0,300}".prop_map(String::into_bytes).boxed(),
        MessageKind::Binary => proptest::collection::vec(any::<u8>(), 0..2000).boxed(),
    }
}

fn sent() -> impl Strategy<Value = Sent> {
    let control = proptest::collection::vec(any::<u8>(), 0..=125);
    prop_oneof![
        4 => prop_oneof![Just(MessageKind::Text), Just(MessageKind::Binary)]
            .prop_flat_map(|kind| (
                Just(kind),
                payload_for(kind),
                proptest::collection::vec(0usize..700, 0..4),
                proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..=125), 0..3),
            ))
            .prop_map(|(kind, payload, fragment_lens, pings_between)| Sent::Message {
                kind, payload, fragment_lens, pings_between,
            }),
        1 => control.clone().prop_map(Sent::Ping),
        1 => control.prop_map(Sent::Pong),
    ]
}

/// Encodes `sent` as masked client frames and returns the events a correct server must see.
fn encode(sent: &[Sent], key: [u8; 4]) -> (Vec<u8>, Vec<OwnedEvent>) {
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    for item in sent {
        match item {
            Sent::Ping(p) => {
                push_frame(&mut wire, true, 0, OpCode::Ping, p, Some(key));
                expected.push(OwnedEvent::Ping(p.clone()));
            }
            Sent::Pong(p) => {
                push_frame(&mut wire, true, 0, OpCode::Pong, p, Some(key));
                expected.push(OwnedEvent::Pong(p.clone()));
            }
            Sent::Message { kind, payload, fragment_lens, pings_between } => {
                // Cut the payload at the given lengths (the rest is the last fragment); a cut may
                // fall inside a UTF-8 code point, which the assembler must accept.
                let mut pieces = Vec::new();
                let mut rest = payload.as_slice();
                for &len in fragment_lens {
                    let (piece, after) = rest.split_at(len.min(rest.len()));
                    pieces.push(piece);
                    rest = after;
                }
                pieces.push(rest);
                let mut pings = pings_between.iter();
                for (i, piece) in pieces.iter().enumerate() {
                    let opcode = if i == 0 { kind.opcode() } else { OpCode::Continuation };
                    push_frame(&mut wire, i + 1 == pieces.len(), 0, opcode, piece, Some(key));
                    if i + 1 < pieces.len() {
                        if let Some(ping) = pings.next() {
                            push_frame(&mut wire, true, 0, OpCode::Ping, ping, Some(key));
                            expected.push(OwnedEvent::Ping(ping.clone()));
                        }
                    }
                }
                expected.push(OwnedEvent::Message(*kind, payload.clone()));
            }
        }
    }
    (wire, expected)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn random_messages_split_at_random_points_give_the_same_events(
        sent in proptest::collection::vec(sent(), 1..8),
        key in any::<[u8; 4]>(),
        read_sizes in proptest::collection::vec(1usize..600, 1..6),
        close_code in prop_oneof![Just(1000u16), Just(1001), 3000u16..5000],
    ) {
        let (mut wire, mut expected) = encode(&sent, key);
        let mut close_body = close_code.to_be_bytes().to_vec();
        close_body.extend_from_slice("bye ✓".as_bytes());
        push_frame(&mut wire, true, 0, OpCode::Close, &close_body, Some(key));
        expected.push(OwnedEvent::Close(Some((CloseCode(close_code), "bye ✓".to_string()))));

        let mut assembler = Assembler::new(Role::Server, Limits::default());
        let (events, result) = feed_in_reads(&mut assembler, &wire, &read_sizes);
        prop_assert_eq!(result, Ok(()));
        prop_assert_eq!(events, expected);
        prop_assert!(assembler.is_closed());
    }

    /// The same for the client role: unmasked server frames.
    #[test]
    fn client_role_reads_unmasked_server_frames(
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..70_000), 1..4),
        read_sizes in proptest::collection::vec(1usize..9000, 1..4),
    ) {
        let mut wire = Vec::new();
        for payload in &payloads {
            push_frame(&mut wire, true, 0, OpCode::Binary, payload, None);
        }
        let expected: Vec<OwnedEvent> =
            payloads.iter().map(|p| OwnedEvent::Message(MessageKind::Binary, p.clone())).collect();
        let mut assembler = Assembler::new(Role::Client, Limits::default());
        let (events, result) = feed_in_reads(&mut assembler, &wire, &read_sizes);
        prop_assert_eq!(result, Ok(()));
        prop_assert_eq!(events, expected);
    }

    /// Arbitrary bytes never panic the assembler, whatever the read boundaries.
    #[test]
    fn arbitrary_input_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        read_sizes in proptest::collection::vec(1usize..50, 1..4),
    ) {
        let limits = Limits { max_message_size: 256, max_frame_size: 128 };
        let mut assembler = Assembler::new(Role::Server, limits);
        let _ = feed_in_reads(&mut assembler, &bytes, &read_sizes);
    }
}
