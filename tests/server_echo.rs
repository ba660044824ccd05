//! The `/echo` route of the real binary, over real sockets: text stays text, binary stays binary,
//! fragmented messages come back whole in one frame, large and trickled messages arrive intact,
//! pings get pongs, and a client that stops reading is throttled without losing a byte.

mod common;

use std::io::{ErrorKind, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::server::Server;
use common::wire::{self, BINARY, CONTINUATION, PING, PONG, Rng, TEXT};
use tungstenite::Message;

#[test]
fn text_and_binary_echo_with_their_own_opcode() {
    let server = Server::start(&[]);
    let mut ws = server.ws_client("/echo");
    let text = "héllo, wörld — ✓ 𝄞";
    ws.send(Message::text(text)).expect("send text");
    assert_eq!(ws.read().expect("read text echo"), Message::text(text));

    let binary: Vec<u8> = (0..=255u8).chain([0, 0xFF, 0x80]).collect();
    ws.send(Message::binary(binary.clone())).expect("send binary");
    assert_eq!(ws.read().expect("read binary echo"), Message::binary(binary));

    // Empty messages are messages too.
    ws.send(Message::text("")).expect("send empty text");
    assert_eq!(ws.read().expect("read empty text echo"), Message::text(""));
    ws.send(Message::binary(Vec::new())).expect("send empty binary");
    assert_eq!(ws.read().expect("read empty binary echo"), Message::binary(Vec::new()));

    // Bytes that are valid UTF-8 but sent as binary stay binary, and vice versa.
    ws.send(Message::binary(b"plain ascii".to_vec())).expect("send");
    assert_eq!(ws.read().expect("read"), Message::binary(b"plain ascii".to_vec()));

    // Many messages in one burst come back in order.
    for i in 0..200 {
        ws.write(Message::text(format!("message {i}"))).expect("queue");
    }
    ws.flush().expect("flush");
    for i in 0..200 {
        assert_eq!(ws.read().expect("read burst echo"), Message::text(format!("message {i}")));
    }
}

#[test]
fn raw_frames_echo_as_single_unmasked_frames() {
    let server = Server::start(&[]);
    let mut client = server.raw_client();
    client.send(TEXT, b"one frame");
    client.expect_frame(TEXT, b"one frame");
    // 16-bit and 64-bit length encodings.
    let medium = Rng::new(7).bytes(300);
    client.send(BINARY, &medium);
    client.expect_frame(BINARY, &medium);
    let big = Rng::new(8).bytes(70_000);
    client.send(BINARY, &big);
    client.expect_frame(BINARY, &big);
}

#[test]
fn fragmented_messages_echo_whole_in_one_frame() {
    let server = Server::start(&[]);
    let mut client = server.raw_client();

    // Text in three fragments, a multi-byte character split across two of them ("ö" is C3 B6), and
    // a ping between fragments that must be answered at once.
    client.send_fragment(false, TEXT, b"Hello, w\xC3");
    client.send_fragment(false, CONTINUATION, b"\xB6rld");
    client.send_fragment(true, PING, b"in the middle");
    client.expect_frame(PONG, b"in the middle");
    client.send_fragment(true, CONTINUATION, b"!");
    client.expect_frame(TEXT, "Hello, wörld!".as_bytes());

    // Binary in many fragments, including empty ones.
    let data = Rng::new(3).bytes(10_000);
    let mut pieces = data.chunks(997).peekable();
    let mut opcode = BINARY;
    client.send_fragment(false, opcode, b"");
    opcode = CONTINUATION;
    while let Some(piece) = pieces.next() {
        client.send_fragment(pieces.peek().is_none(), opcode, piece);
    }
    client.expect_frame(BINARY, &data);

    // All fragments in one write.
    let mut wire = Vec::new();
    wire.extend(wire::encode_frame(false, 0, BINARY, b"ab", Some([1, 2, 3, 4])));
    wire.extend(wire::encode_frame(false, 0, CONTINUATION, b"cd", Some([5, 6, 7, 8])));
    wire.extend(wire::encode_frame(true, 0, CONTINUATION, b"ef", Some([9, 10, 11, 12])));
    client.send_raw(&wire);
    client.expect_frame(BINARY, b"abcdef");
}

#[test]
fn sixteen_mebibyte_messages_echo_intact() {
    let server = Server::start(&["--max-message-size", "16MiB"]);
    let mut ws = server.ws_client("/echo");
    let binary = Rng::new(16).bytes(16 << 20);
    ws.send(Message::binary(binary.clone())).expect("send 16 MiB binary");
    match ws.read().expect("read 16 MiB echo") {
        Message::Binary(echo) => assert!(echo == binary, "16 MiB binary echo differs"),
        other => panic!("expected a binary echo, got {:?}", other.len()),
    }
    // Text at the limit exactly, ending in a multi-byte character.
    let mut text = "ringgate ".repeat((16 << 20) / 9 + 1);
    text.truncate((16 << 20) - 2);
    text.push('é');
    assert_eq!(text.len(), 16 << 20);
    ws.send(Message::text(text.clone())).expect("send 16 MiB text");
    match ws.read().expect("read 16 MiB text echo") {
        Message::Text(echo) => assert!(echo.as_str() == text, "16 MiB text echo differs"),
        other => panic!("expected a text echo, got {:?}", other.len()),
    }
}

#[test]
fn a_large_fragmented_message_echoes_as_one_frame() {
    let server = Server::start(&["--max-message-size", "4MiB"]);
    let mut client = server.raw_client();
    let data = Rng::new(44).bytes(3 << 20);
    let mut first = true;
    let mut pieces = data.chunks(256 << 10).peekable();
    while let Some(piece) = pieces.next() {
        client.send_fragment(pieces.peek().is_none(), if first { BINARY } else { CONTINUATION }, piece);
        first = false;
    }
    client.expect_frame(BINARY, &data);
}

#[test]
fn a_mebibyte_trickled_in_random_chunks_echoes_intact() {
    let server = Server::start(&[]);
    let mut rng = Rng::new(0x5EED);
    let mut stream = server.connect();
    // The upgrade request itself arrives in small pieces too.
    let request = wire::upgrade_request("/echo", "");
    for piece in request.as_bytes().chunks(7) {
        stream.write_all(piece).expect("send request piece");
        thread::sleep(Duration::from_millis(1));
    }
    let mut client = wire::Client::finish_upgrade(stream);

    let payload = rng.bytes(1 << 20);
    let frame = wire::encode_frame(true, 0, BINARY, &payload, Some([0xA1, 0xB2, 0xC3, 0xD4]));
    // Split the 14-byte header itself, then random pieces of up to 48 KiB.
    let mut at = 0;
    let mut writes = 0;
    for first in [1, 2, 3, 8] {
        client.send_raw(&frame[at..at + first]);
        at += first;
        thread::sleep(Duration::from_millis(2));
    }
    while at < frame.len() {
        let len = rng.range(1, 48 << 10).min(frame.len() - at);
        client.send_raw(&frame[at..at + len]);
        client.stream.flush().expect("flush");
        at += len;
        writes += 1;
        if writes % 4 == 0 {
            thread::sleep(Duration::from_millis(1));
        }
    }
    client.expect_frame(BINARY, &payload);
    // The connection is still in a clean state: the next message echoes normally.
    client.send(TEXT, b"after");
    client.expect_frame(TEXT, b"after");
}

#[test]
fn ping_gets_a_pong_with_the_same_payload() {
    let server = Server::start(&[]);
    let mut client = server.raw_client();
    client.send(PING, b"are you there?");
    client.expect_frame(PONG, b"are you there?");
    client.send(PING, b"");
    client.expect_frame(PONG, b"");
    let max = [0xABu8; 125];
    client.send(PING, &max);
    client.expect_frame(PONG, &max);
    // An unsolicited pong is ignored: the next thing back is the echo.
    client.send(PONG, b"unsolicited");
    client.send(TEXT, b"still here");
    client.expect_frame(TEXT, b"still here");

    // tungstenite sees the pong as well.
    let mut ws = server.ws_client("/echo");
    ws.send(Message::Ping(b"tungstenite ping".to_vec().into())).expect("ping");
    assert_eq!(ws.read().expect("pong"), Message::Pong(b"tungstenite ping".to_vec().into()));
}

/// A client that writes a lot of echo traffic without reading is throttled: the server stops reading
/// from it once `--max-backpressure` bytes wait to be sent, so the server's memory stays bounded and
/// the client's writes block. When the client reads again, every echo arrives, intact and in order.
#[test]
fn a_client_that_stops_reading_is_throttled_and_loses_nothing() {
    const MESSAGE: usize = 64 << 10;
    const MESSAGES: usize = 384; // 24 MiB: more than the loopback socket buffers can hold
    let server = Server::start(&["--max-backpressure", "256KiB", "--max-message-size", "1MiB"]);

    // Small client socket buffers, so that the kernel cannot absorb the test's traffic.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(64 << 10).expect("SO_RCVBUF");
    socket.set_send_buffer_size(64 << 10).expect("SO_SNDBUF");
    socket.connect_timeout(&server.addr().into(), wire::IO_TIMEOUT).expect("connect");
    let mut stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(wire::IO_TIMEOUT)).expect("read timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream.write_all(wire::upgrade_request("/echo", "").as_bytes()).expect("upgrade");
    let mut client = wire::Client::finish_upgrade(stream);

    let baseline_rss = server.rss_kib();
    let sent = Arc::new(AtomicUsize::new(0));
    let mut writer_stream = client.stream.try_clone().expect("clone");
    // Long enough that it never fires while the reader below makes progress.
    writer_stream.set_write_timeout(Some(Duration::from_secs(20))).expect("write timeout");
    let writer = {
        let sent = Arc::clone(&sent);
        thread::spawn(move || {
            for i in 0..MESSAGES {
                let frame = wire::masked(BINARY, &message(i, MESSAGE));
                if let Err(error) = writer_stream.write_all(&frame) {
                    return Err(format!("write of message {i} failed: {error}"));
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        })
    };

    // Wait until the writer is stuck: no progress for half a second.
    let mut last = usize::MAX;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        thread::sleep(Duration::from_millis(500));
        let now = sent.load(Ordering::SeqCst);
        if now == last || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let stalled_at = sent.load(Ordering::SeqCst);
    let grown_kib = server.rss_kib().saturating_sub(baseline_rss);
    eprintln!("writer stalled after {stalled_at} of {MESSAGES} messages; server RSS grew by {grown_kib} KiB");
    assert!(
        stalled_at < MESSAGES,
        "all {MESSAGES} messages ({} MiB) were accepted although the client read nothing: \
         the server did not stop reading",
        (MESSAGES * MESSAGE) >> 20
    );
    assert!(
        grown_kib < 8 << 10,
        "the server's RSS grew by {grown_kib} KiB while the client was not reading \
         (max backpressure 256 KiB; writer stalled after {stalled_at} messages)"
    );

    // Now read: everything arrives, in order, intact, as the writer gets unblocked.
    for i in 0..MESSAGES {
        let frame = client.read_frame();
        assert_eq!((frame.fin, frame.opcode), (true, BINARY), "echo {i}: {}", wire::summary(&frame));
        assert!(frame.payload == message(i, MESSAGE), "echo {i} is not message {i}");
    }
    writer.join().expect("writer thread").expect("writer");
    client.send(wire::CLOSE, &wire::close_body(1000, b""));
    client.expect_close(1000);
}

/// Message `i`: its index in every 8-byte word, plus a position-dependent pattern.
fn message(i: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let word = (i as u64) << 32 | out.len() as u64;
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn errors_of_one_client_do_not_disturb_another() {
    let server = Server::start(&[]);
    let mut good = server.ws_client("/echo");
    let mut bad = server.raw_client();
    bad.send_raw(&wire::encode_frame(true, 0, TEXT, b"unmasked", None));
    bad.expect_close(1002);
    good.send(Message::text("unaffected")).expect("send");
    assert_eq!(good.read().expect("echo"), Message::text("unaffected"));
    // A read with nothing sent times out rather than returning data or closing.
    good.get_mut().set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    match good.read() {
        Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
        }
        other => panic!("expected silence, got {other:?}"),
    }
}

#[test]
fn frames_sent_with_the_upgrade_request_are_echoed() {
    let server = Server::start(&[]);
    let mut stream = server.connect();
    let mut wire = wire::upgrade_request("/echo", "").into_bytes();
    wire.extend(wire::masked(TEXT, b"right behind the request"));
    wire.extend(wire::masked(PING, b"p"));
    wire.extend(wire::masked(BINARY, &[1, 2, 3]));
    stream.write_all(&wire).expect("send");
    let mut client = wire::Client::finish_upgrade(stream);
    client.expect_frame(TEXT, b"right behind the request");
    client.expect_frame(PONG, b"p");
    client.expect_frame(BINARY, &[1, 2, 3]);
}

#[test]
fn a_half_closed_client_still_gets_its_echoes() {
    let server = Server::start(&[]);
    let mut client = server.raw_client();
    let big = Rng::new(9).bytes(200_000);
    client.send(TEXT, b"first");
    client.send(BINARY, &big);
    client.stream.shutdown(std::net::Shutdown::Write).expect("half-close");
    client.expect_frame(TEXT, b"first");
    client.expect_frame(BINARY, &big);
    // No closing handshake happened: the server just closes its side too.
    client.expect_eof();
}

#[test]
fn multi_byte_text_trickled_in_random_chunks_echoes_intact() {
    let server = Server::start(&[]);
    let mut rng = Rng::new(0xC0FFEE);
    let mut client = server.raw_client();
    let text = "κόσμε ✓ 𝄞 ringgate ".repeat(20_000); // ~560 KB, characters of 1 to 4 bytes
    let frame = wire::encode_frame(true, 0, TEXT, text.as_bytes(), Some([0x11, 0x22, 0x33, 0x44]));
    let mut at = 0;
    while at < frame.len() {
        // Odd sizes, so that chunk edges fall inside characters.
        let len = rng.range(1, 9_999).min(frame.len() - at);
        client.send_raw(&frame[at..at + len]);
        at += len;
    }
    client.expect_frame(TEXT, text.as_bytes());
}

#[test]
fn many_concurrent_clients_on_both_workers_get_their_own_echoes() {
    const CLIENTS: usize = 40;
    const ROUNDS: usize = 25;
    let server = Server::start(&[]);
    let addr = server.addr();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            thread::spawn(move || {
                let mut client = wire::Client::connect(addr, "/echo");
                let mut rng = Rng::new(c as u64 + 1);
                for round in 0..ROUNDS {
                    let mut payload = format!("client {c} round {round} ").into_bytes();
                    let extra = rng.range(0, 3000);
                    payload.extend(rng.bytes(extra));
                    client.send(BINARY, &payload);
                    client.expect_frame(BINARY, &payload);
                }
                client.send(wire::CLOSE, &wire::close_body(1000, b""));
                client.expect_close(1000);
            })
        })
        .collect();
    for (c, thread) in threads.into_iter().enumerate() {
        thread.join().unwrap_or_else(|_| panic!("client {c} failed"));
    }
}
