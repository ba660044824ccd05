//! The upgrade handshake of the real binary, over raw sockets: every refusal with its exact status
//! code and required headers, followed by the server closing the connection; the handshake
//! timeout; the Origin allow-list; and the `--max-conns` cap with its 503.

mod common;

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use common::server::Server;
use common::wire::{self, HttpResponse, KEY, TEXT};
use tungstenite::Message;

/// Sends `request` and returns the answer, which must be followed by EOF.
fn ask(server: &Server, request: &str) -> HttpResponse {
    wire::http_exchange(server.addr(), request.as_bytes())
}

/// Asserts a refusal: status, `Connection: close`, and a plain-text body.
fn assert_refused(response: &HttpResponse, status: u16) {
    assert_eq!(response.status, status, "{response:?}");
    assert_eq!(response.header("Connection"), Some("close"), "{response:?}");
    assert!(response.header("Sec-WebSocket-Accept").is_none(), "{response:?}");
    assert!(!response.body.is_empty(), "a refusal says why: {response:?}");
}

#[test]
fn a_valid_upgrade_gets_101_with_the_accept_key() {
    let server = Server::start(&[]);
    let mut client = wire::Client::connect(server.addr(), "/echo");
    client.send(TEXT, b"upgraded");
    client.expect_frame(TEXT, b"upgraded");
    // Header names and token lists are case-insensitive; the query string is ignored by routing.
    let mut stream = server.connect();
    let request = format!(
        "GET /echo?room=1 HTTP/1.1\r\nhost: example.com:80\r\nuPgRaDe: WebSocket\r\n\
         connection: keep-alive, Upgrade\r\nsec-websocket-key: {KEY}\r\nsec-websocket-version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut client = wire::Client::finish_upgrade(stream);
    client.send(TEXT, b"still upgraded");
    client.expect_frame(TEXT, b"still upgraded");
}

#[test]
fn no_subprotocol_or_extension_is_negotiated_unasked() {
    // permessage-deflate is agreed by default (tests/server_compression.rs): off, it is declined.
    let server = Server::start(&["--compression", "off"]);
    let extra = "Sec-WebSocket-Protocol: chat, superchat\r\n\
                 Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
    let mut stream = server.connect();
    stream.write_all(wire::upgrade_request("/echo", extra).as_bytes()).expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).expect("read the 101"), 1, "EOF inside the 101");
        head.push(byte[0]);
    }
    let (response, _) = wire::parse_head(&head).expect("head");
    assert_eq!(response.status, 101, "{response:?}");
    assert!(response.header("Sec-WebSocket-Protocol").is_none(), "{response:?}");
    assert!(response.header("Sec-WebSocket-Extensions").is_none(), "{response:?}");
    // Without a negotiated permessage-deflate, RSV1 is still a protocol error.
    let mut client = wire::Client::finish_upgrade_after(stream, &head);
    client.send_raw(&wire::encode_frame(true, 0b100, TEXT, b"compressed?", Some([1, 2, 3, 4])));
    client.expect_close(1002);
}

#[test]
fn a_method_other_than_get_gets_405() {
    let server = Server::start(&[]);
    let request = wire::upgrade_request("/echo", "").replacen("GET", "POST", 1);
    let response = ask(&server, &request);
    assert_refused(&response, 405);
    assert_eq!(response.header("Allow"), Some("GET"));
}

#[test]
fn http_1_0_gets_400() {
    let server = Server::start(&[]);
    let request = wire::upgrade_request("/echo", "").replacen("HTTP/1.1", "HTTP/1.0", 1);
    assert_refused(&ask(&server, &request), 400);
}

#[test]
fn a_missing_or_repeated_host_gets_400() {
    let server = Server::start(&[]);
    let request = wire::upgrade_request("/echo", "").replacen("Host: 127.0.0.1\r\n", "", 1);
    assert_refused(&ask(&server, &request), 400);
    let request = wire::upgrade_request("/echo", "Host: other.example\r\n");
    assert_refused(&ask(&server, &request), 400);
}

#[test]
fn a_plain_get_gets_426_with_upgrade_websocket() {
    let server = Server::start(&[]);
    let response = ask(&server, "GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_refused(&response, 426);
    assert_eq!(response.header("Upgrade"), Some("websocket"), "{response:?}");

    // Upgrade without `Connection: upgrade`, and the other way round.
    let request = wire::upgrade_request("/echo", "").replacen("Connection: Upgrade\r\n", "", 1);
    let response = ask(&server, &request);
    assert_refused(&response, 426);
    assert_eq!(response.header("Upgrade"), Some("websocket"));
    let request = wire::upgrade_request("/echo", "").replacen("Upgrade: websocket\r\n", "", 1);
    assert_refused(&ask(&server, &request), 426);
    let request = wire::upgrade_request("/echo", "").replacen("Upgrade: websocket", "Upgrade: h2c", 1);
    assert_refused(&ask(&server, &request), 426);
}

#[test]
fn a_wrong_version_gets_426_naming_version_13() {
    let server = Server::start(&[]);
    for version in ["8", "12", "14", "1.3"] {
        let request = wire::upgrade_request("/echo", "").replacen(
            "Sec-WebSocket-Version: 13",
            &format!("Sec-WebSocket-Version: {version}"),
            1,
        );
        let response = ask(&server, &request);
        assert_refused(&response, 426);
        assert_eq!(response.header("Sec-WebSocket-Version"), Some("13"), "{response:?}");
    }
}

#[test]
fn a_missing_version_gets_400() {
    let server = Server::start(&[]);
    let request = wire::upgrade_request("/echo", "").replacen("Sec-WebSocket-Version: 13\r\n", "", 1);
    let response = ask(&server, &request);
    assert_refused(&response, 400);
    assert_eq!(response.header("Sec-WebSocket-Version"), Some("13"), "{response:?}");
}

#[test]
fn a_bad_key_gets_400() {
    let server = Server::start(&[]);
    let bad_keys = [
        "",
        "not base64 at all!!!!!!!",
        "dGhlIHNhbXBsZSBub25jZQ",       // 22 characters
        "dGhlIHNhbXBsZSBub25jZXh4",     // 24 characters, 18 bytes
        "dGhlIHNhbXBsZSBub25jZQ==AAAA", // too long
    ];
    for key in bad_keys {
        let request = wire::upgrade_request("/echo", "").replacen(KEY, key, 1);
        assert_refused(&ask(&server, &request), 400);
    }
    // No key at all.
    let request =
        wire::upgrade_request("/echo", "").replacen(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "", 1);
    assert_refused(&ask(&server, &request), 400);
}

#[test]
fn a_header_section_over_8_kib_gets_431() {
    let server = Server::start(&[]);
    let filler = format!("X-Filler: {}\r\n", "a".repeat(9000));
    let response = ask(&server, &wire::upgrade_request("/echo", &filler));
    assert_refused(&response, 431);
    // Even when the end of the headers never comes.
    let mut stream = server.connect();
    let mut endless = wire::upgrade_request("/echo", "").into_bytes();
    endless.truncate(endless.len() - 2);
    endless.extend(format!("X-Filler: {}", "b".repeat(10_000)).bytes());
    stream.write_all(&endless).expect("send");
    assert_refused(&wire::read_response_to_eof(&mut stream), 431);
    // Just under the limit is fine.
    let filler = format!("X-Filler: {}\r\n", "c".repeat(7000));
    let mut stream = server.connect();
    stream.write_all(wire::upgrade_request("/echo", &filler).as_bytes()).expect("send");
    let mut client = wire::Client::finish_upgrade(stream);
    client.send(TEXT, b"big headers, small message");
    client.expect_frame(TEXT, b"big headers, small message");
}

#[test]
fn an_unknown_path_gets_404() {
    let server = Server::start(&[]);
    for path in ["/", "/nope", "/echo/more", "/ECHO"] {
        assert_refused(&ask(&server, &wire::upgrade_request(path, "")), 404);
    }
}

#[test]
fn garbage_gets_400() {
    let server = Server::start(&[]);
    assert_refused(&ask(&server, "GET /echo HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n"), 400);
    assert_refused(&ask(&server, "GET /echo SPDY/3\r\nHost: x\r\n\r\n"), 400);
}

#[test]
fn an_origin_off_the_allow_list_gets_403() {
    let server = Server::start(&["--allowed-origin", "https://good.example"]);
    let response = ask(&server, &wire::upgrade_request("/echo", "Origin: https://evil.example\r\n"));
    assert_refused(&response, 403);
    // Listed origins (case-insensitively) and clients without Origin are let in.
    for extra in ["Origin: https://good.example\r\n", "Origin: HTTPS://GOOD.EXAMPLE\r\n", ""] {
        let mut stream = server.connect();
        stream.write_all(wire::upgrade_request("/echo", extra).as_bytes()).expect("send");
        let mut client = wire::Client::finish_upgrade(stream);
        client.send(TEXT, b"welcome");
        client.expect_frame(TEXT, b"welcome");
    }
}

#[test]
fn every_origin_is_allowed_without_an_allow_list() {
    let server = Server::start(&[]);
    let mut stream = server.connect();
    stream
        .write_all(wire::upgrade_request("/echo", "Origin: https://anywhere.example\r\n").as_bytes())
        .expect("send");
    wire::Client::finish_upgrade(stream);
}

#[test]
fn a_half_sent_request_is_closed_after_the_handshake_timeout() {
    let server = Server::start(&["--handshake-timeout", "500ms"]);
    let mut stream = server.connect();
    let started = Instant::now();
    stream.write_all(b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: web").expect("send");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("the server closes the connection, cleanly");
    let elapsed = started.elapsed();
    assert!(rest.is_empty(), "nothing is sent on a handshake timeout: {:?}", String::from_utf8_lossy(&rest));
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_millis(2000),
        "closed after {elapsed:?}, expected about 500 ms"
    );

    // A connection that sends nothing at all is closed too.
    let mut silent = server.connect();
    let started = Instant::now();
    assert_eq!(silent.read(&mut [0u8; 16]).expect("EOF"), 0);
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(400) && elapsed < Duration::from_millis(2000), "{elapsed:?}");
}

#[test]
fn the_handshake_timeout_does_not_touch_upgraded_connections() {
    let server = Server::start(&["--handshake-timeout", "300ms"]);
    let mut client = server.raw_client();
    thread::sleep(Duration::from_millis(700));
    client.send(TEXT, b"still open");
    client.expect_frame(TEXT, b"still open");
}

#[test]
fn over_max_conns_gets_503_until_a_connection_closes() {
    let server = Server::start(&["--max-conns", "2"]);
    let mut first = server.ws_client("/echo");
    let mut second = server.ws_client("/echo");
    first.send(Message::text("1")).expect("send");
    assert_eq!(first.read().expect("echo"), Message::text("1"));
    second.send(Message::text("2")).expect("send");
    assert_eq!(second.read().expect("echo"), Message::text("2"));

    let response = ask(&server, &wire::upgrade_request("/echo", ""));
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(response.header("Connection"), Some("close"));
    assert_eq!(response.header("Retry-After"), Some("1"));
    // The two admitted connections are unaffected.
    second.send(Message::text("2 again")).expect("send");
    assert_eq!(second.read().expect("echo"), Message::text("2 again"));

    // Close one (a full closing handshake); a new connection then gets in. The server counts the
    // closed one until it sees our FIN, so allow it a moment.
    first.close(None).expect("close");
    assert!(matches!(first.read(), Ok(Message::Close(_))));
    assert!(matches!(first.read(), Err(tungstenite::Error::ConnectionClosed)));
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut third = loop {
        let mut stream = server.connect();
        stream.write_all(wire::upgrade_request("/echo", "").as_bytes()).expect("send");
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).expect("status line");
        if &head == b"HTTP/1.1 101" {
            // Put the status line back in front of the rest of the 101 response.
            break wire::Client::finish_upgrade_after(stream, &head);
        }
        assert_eq!(&head, b"HTTP/1.1 503", "{:?}", String::from_utf8_lossy(&head));
        assert!(Instant::now() < deadline, "still 503 three seconds after a connection closed");
        thread::sleep(Duration::from_millis(50));
    };
    third.send(TEXT, b"third");
    third.expect_frame(TEXT, b"third");
}

/// Upgrades on `/echo`, or returns `None` if the server answers 503 (at its connection limit).
fn try_upgrade(server: &Server) -> Option<wire::Client> {
    let mut stream = server.connect();
    stream.write_all(wire::upgrade_request("/echo", "").as_bytes()).expect("send");
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).expect("status line");
    match &head {
        b"HTTP/1.1 101" => Some(wire::Client::finish_upgrade_after(stream, &head)),
        b"HTTP/1.1 503" => None,
        other => panic!("unexpected answer {:?}", String::from_utf8_lossy(other)),
    }
}

/// Connections that end abruptly at every stage must each give their slot back exactly once: after
/// many of them, `--max-conns 3` still admits exactly three connections.
#[test]
fn abrupt_disconnects_give_their_connection_slot_back_exactly_once() {
    let server = Server::start(&["--max-conns", "3", "--handshake-timeout", "1s"]);
    let reset = |stream: std::net::TcpStream| {
        // SO_LINGER 0: close(2) sends RST, discarding anything unsent or unread.
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
        drop(stream);
    };
    for round in 0..4 {
        // Connect and go away at once.
        drop(server.connect());
        // Half a request, then FIN; and then RST.
        let mut stream = server.connect();
        stream.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n").expect("send");
        drop(stream);
        let mut stream = server.connect();
        stream.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n").expect("send");
        reset(stream);
        // A refused request whose answer is never read.
        let mut stream = server.connect();
        stream.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        reset(stream);
        // Upgraded, then gone in the middle of a frame.
        if let Some(mut client) = try_upgrade(&server) {
            let frame = wire::masked(wire::BINARY, &[9u8; 1000]);
            client.send_raw(&frame[..500]);
            drop(client);
        }
        // Upgraded, a large echo queued, then a reset without reading anything.
        if let Some(mut client) = try_upgrade(&server) {
            client.send(wire::BINARY, &vec![round as u8; 900_000]);
            reset(client.stream);
        }
        // A protocol error whose Close is never read.
        if let Some(mut client) = try_upgrade(&server) {
            client.send_raw(&wire::encode_frame(true, 0, TEXT, b"unmasked", None));
            drop(client);
        }
    }

    // Give the server a moment to notice every disconnect, then fill it exactly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut admitted = loop {
        let clients: Vec<_> = (0..3).map_while(|_| try_upgrade(&server)).collect();
        if clients.len() == 3 {
            break clients;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of 3 slots came back: a leaked connection count",
            clients.len()
        );
        drop(clients);
        thread::sleep(Duration::from_millis(100));
    };
    assert!(try_upgrade(&server).is_none(), "a fourth connection was admitted: the count went below zero");
    for (i, client) in admitted.iter_mut().enumerate() {
        let text = format!("slot {i}");
        client.send(TEXT, text.as_bytes());
        client.expect_frame(TEXT, text.as_bytes());
    }
}
