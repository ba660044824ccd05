//! The closing handshake and every protocol violation that must close the connection, against the
//! real binary: the exact close code the server sends, and that it then closes TCP cleanly.

mod common;

use common::server::Server;
use common::wire::{self, BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT};
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

#[test]
fn client_close_is_echoed_then_tcp_closes() {
    let server = Server::start(&[]);
    let mut client = server.raw_client();
    client.send(TEXT, b"before");
    client.expect_frame(TEXT, b"before");
    client.send(CLOSE, &wire::close_body(1000, b"done here"));
    client.expect_close(1000);

    // An empty Close is answered with an empty Close.
    let mut client = server.raw_client();
    client.send(CLOSE, b"");
    let frame = client.read_frame();
    assert_eq!((frame.fin, frame.opcode, frame.close_code()), (true, CLOSE, None), "{frame:?}");
    client.expect_eof();
}

#[test]
fn tungstenite_close_handshake_completes() {
    let server = Server::start(&[]);
    let mut ws = server.ws_client("/echo");
    ws.send(Message::text("hi")).expect("send");
    assert_eq!(ws.read().expect("echo"), Message::text("hi"));
    ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).expect("close");
    match ws.read() {
        Ok(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the server's Close 1000, got {other:?}"),
    }
    match ws.read() {
        Err(tungstenite::Error::ConnectionClosed) => {}
        other => panic!("expected the connection to be closed, got {other:?}"),
    }
}

#[test]
fn data_after_close_is_not_echoed() {
    let server = Server::start(&[]);
    let mut client = server.raw_client();
    let mut wire = wire::masked(CLOSE, &wire::close_body(1000, b""));
    wire.extend(wire::masked(TEXT, b"too late"));
    client.send_raw(&wire);
    client.expect_close(1000);
}

#[test]
fn valid_close_codes_are_echoed() {
    let server = Server::start(&[]);
    for code in
        [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
    {
        let mut client = server.raw_client();
        client.send(CLOSE, &wire::close_body(code, b"reason"));
        let frame = client.expect_close(code);
        assert!(frame.payload.len() <= 125);
    }
}

#[test]
fn invalid_close_codes_get_1002() {
    let server = Server::start(&[]);
    for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
        let mut client = server.raw_client();
        client.send(CLOSE, &wire::close_body(code, b""));
        let frame = client.read_frame();
        assert_eq!(frame.close_code(), Some(1002), "close code {code} must be refused with 1002: {frame:?}");
        client.expect_eof();
    }
}

#[test]
fn close_with_a_one_byte_body_gets_1002() {
    let server = Server::start(&[]);
    let mut client = server.raw_client();
    client.send(CLOSE, &[0x03]);
    client.expect_close(1002);
}

#[test]
fn close_reason_that_is_not_utf8_gets_1007() {
    let server = Server::start(&[]);
    for reason in [&b"\xFF"[..], b"ok\xC3", b"\xED\xA0\x80", b"\xF4\x90\x80\x80"] {
        let mut client = server.raw_client();
        client.send(CLOSE, &wire::close_body(1000, reason));
        client.expect_close(1007);
    }
    // A valid multi-byte reason is fine.
    let mut client = server.raw_client();
    client.send(CLOSE, &wire::close_body(1000, "ça va ✓".as_bytes()));
    client.expect_close(1000);
}

#[test]
fn unmasked_client_frames_get_1002() {
    let server = Server::start(&[]);
    for opcode in [TEXT, BINARY, PING] {
        let mut client = server.raw_client();
        client.send_raw(&wire::encode_frame(true, 0, opcode, b"no mask", None));
        client.expect_close(1002);
    }
}

#[test]
fn reserved_bits_get_1002() {
    let server = Server::start(&[]);
    for rsv in [0b100, 0b010, 0b001, 0b111] {
        for opcode in [TEXT, PING] {
            let mut client = server.raw_client();
            client.send_raw(&wire::encode_frame(true, rsv, opcode, b"rsv", Some([1, 2, 3, 4])));
            client.expect_close(1002);
        }
    }
}

#[test]
fn reserved_opcodes_get_1002() {
    let server = Server::start(&[]);
    for opcode in [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        let mut client = server.raw_client();
        client.send_raw(&wire::encode_frame(true, 0, opcode, b"", Some([1, 2, 3, 4])));
        let frame = client.read_frame();
        assert_eq!(frame.close_code(), Some(1002), "opcode {opcode:#x}: {frame:?}");
        client.expect_eof();
    }
}

#[test]
fn fragmentation_violations_get_1002() {
    let server = Server::start(&[]);
    // A continuation with nothing to continue.
    let mut client = server.raw_client();
    client.send_fragment(true, CONTINUATION, b"orphan");
    client.expect_close(1002);

    // A new data frame inside a fragmented message.
    let mut client = server.raw_client();
    client.send_fragment(false, TEXT, b"start");
    client.send_fragment(true, BINARY, b"interloper");
    client.expect_close(1002);

    // A fragmented control frame.
    let mut client = server.raw_client();
    client.send_fragment(false, PING, b"half a ping");
    client.expect_close(1002);

    // A control frame over 125 bytes.
    let mut client = server.raw_client();
    client.send(PING, &[0u8; 126]);
    client.expect_close(1002);
    let mut client = server.raw_client();
    client.send(PONG, &[0u8; 126]);
    client.expect_close(1002);
}

#[test]
fn a_64_bit_length_with_the_top_bit_set_gets_1002() {
    let server = Server::start(&[]);
    let mut client = server.raw_client();
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    client.send_raw(&header);
    client.expect_close(1002);
}

#[test]
fn invalid_utf8_text_gets_1007() {
    let server = Server::start(&[]);
    for bad in [&b"\xFF"[..], b"abc\xC3", b"\xC0\xAF", b"\xED\xA0\x80", b"\xF8\x88\x80\x80\x80"] {
        let mut client = server.raw_client();
        client.send(TEXT, bad);
        client.expect_close(1007);
    }
    // Fail fast: a first fragment that can never become valid UTF-8 is refused before the message
    // ends.
    let mut client = server.raw_client();
    client.send_fragment(
        false,
        TEXT,
        b"fine so far \xCE\xBA\xE1\xBD\xB9\xCF\x83\xCE\xBC\xCE\xB5\xF4\x90\x80\x80",
    );
    client.expect_close(1007);
    // Valid fragments that end in an invalid sequence.
    let mut client = server.raw_client();
    client.send_fragment(false, TEXT, "κόσμε".as_bytes());
    client.send_fragment(true, CONTINUATION, b"\xC3");
    client.expect_close(1007);
}

#[test]
fn messages_over_the_size_limit_get_1009() {
    let server = Server::start(&["--max-message-size", "1KiB"]);
    // At the limit: fine.
    let mut client = server.raw_client();
    client.send(BINARY, &[7u8; 1024]);
    client.expect_frame(BINARY, &[7u8; 1024]);
    // One byte over, in one frame.
    client.send(BINARY, &[7u8; 1025]);
    client.expect_close(1009);

    // At the limit in fragments: fine.
    let mut client = server.raw_client();
    client.send_fragment(false, TEXT, &[b'a'; 512]);
    client.send_fragment(true, CONTINUATION, &[b'b'; 512]);
    let mut expected = vec![b'a'; 512];
    expected.extend([b'b'; 512]);
    client.expect_frame(TEXT, &expected);

    // Over the limit only when the fragments are added up.
    let mut client = server.raw_client();
    client.send_fragment(false, TEXT, &[b'a'; 600]);
    client.send_fragment(true, CONTINUATION, &[b'b'; 600]);
    client.expect_close(1009);

    // A header announcing a huge frame is refused at once, without waiting for its payload.
    let mut client = server.raw_client();
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    client.send_raw(&header);
    client.expect_close(1009);
}

#[test]
fn a_frame_size_limit_below_the_message_limit_applies_per_frame() {
    let server = Server::start(&["--max-message-size", "4KiB", "--max-frame-size", "1KiB"]);
    let mut client = server.raw_client();
    // Three 1 KiB fragments: each frame within its limit, the message within its own.
    client.send_fragment(false, BINARY, &[1u8; 1024]);
    client.send_fragment(false, CONTINUATION, &[2u8; 1024]);
    client.send_fragment(true, CONTINUATION, &[3u8; 1024]);
    let mut expected = vec![1u8; 1024];
    expected.extend([2u8; 1024]);
    expected.extend([3u8; 1024]);
    client.expect_frame(BINARY, &expected);
    // One frame over 1 KiB.
    client.send(BINARY, &[0u8; 1025]);
    client.expect_close(1009);
}

#[test]
fn the_close_reason_of_a_protocol_error_is_utf8_and_fits_a_control_frame() {
    let server = Server::start(&[]);
    let mut client = server.raw_client();
    client.send(TEXT, b"\xFF");
    let frame = client.expect_close(1007);
    assert!(frame.payload.len() <= 125, "{frame:?}");
}
