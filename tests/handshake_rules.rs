//! DESIGN.md's protocol checklist, the handshake half: every rule with the HTTP status it earns, the
//! RFC's own key/accept example, and client and server sides talking to each other in memory.

use proptest::prelude::*;
use ringgate::proto::handshake::{
    AcceptKey, ClientHandshake, ClientHandshakeError, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADERS,
    HandshakeError, Parsed, ServerResponse, StaticPolicy, accept, find_header_end, parse_request,
};

const GOOD: &str = "GET /chat?room=1 HTTP/1.1\r\n\
Host: server.example.com\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Origin: http://example.com\r\n\
Sec-WebSocket-Protocol: chat, superchat\r\n\
Sec-WebSocket-Version: 13\r\n\r\n";

/// Parses, validates and accepts with `policy`; returns the full server answer on success.
fn answer(request: &[u8], policy: &StaticPolicy) -> Result<Vec<u8>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
    match parse_request(request, &mut headers, DEFAULT_MAX_HEADER_BYTES)? {
        Parsed::Partial => panic!("request unexpectedly partial"),
        Parsed::Complete(request, _) => {
            let accepted = accept(&request, policy)?;
            let mut out = Vec::new();
            accepted.write_response(&mut out);
            Ok(out)
        }
    }
}

fn status_for(request: &str) -> u16 {
    match answer(request.as_bytes(), &StaticPolicy::default()) {
        Ok(_) => 101,
        Err(error) => error.status(),
    }
}

fn with_header_replaced(name: &str, replacement: Option<&str>) -> String {
    GOOD.lines()
        .filter_map(|line| {
            if line.to_ascii_lowercase().starts_with(&format!("{}:", name.to_ascii_lowercase())) {
                replacement.map(|r| format!("{r}\r\n"))
            } else {
                Some(format!("{line}\r\n"))
            }
        })
        .collect::<String>()
}

/// RFC 6455 section 1.3.
#[test]
fn rfc_key_gives_rfc_accept() {
    assert_eq!(AcceptKey::for_key(b"dGhlIHNhbXBsZSBub25jZQ==").as_bytes(), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[test]
fn a_valid_request_gets_101_with_the_accept_key() {
    let out = answer(GOOD.as_bytes(), &StaticPolicy::default()).expect("accepted");
    let text = String::from_utf8(out).expect("ascii");
    assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
    assert!(text.contains("\r\nUpgrade: websocket\r\n"));
    assert!(text.contains("\r\nConnection: Upgrade\r\n"));
    assert!(text.contains("\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    assert!(!text.contains("Sec-WebSocket-Protocol"), "no subprotocol configured, none chosen");
    assert!(text.ends_with("\r\n\r\n"));
}

#[test]
fn the_request_borrows_path_host_and_origin() {
    let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
    let Ok(Parsed::Complete(request, len)) = parse_request(GOOD.as_bytes(), &mut headers, 8192) else {
        panic!("expected a complete request");
    };
    assert_eq!(len, GOOD.len());
    assert_eq!(request.path, "/chat?room=1");
    assert_eq!(request.host, "server.example.com");
    assert_eq!(request.origin, Some("http://example.com"));
    assert_eq!(request.subprotocols().collect::<Vec<_>>(), ["chat", "superchat"]);
}

#[test]
fn method_other_than_get_is_refused() {
    assert_eq!(status_for(&GOOD.replacen("GET", "POST", 1)), 405);
}

#[test]
fn http_1_0_is_refused_with_400() {
    assert_eq!(status_for(&GOOD.replacen("HTTP/1.1", "HTTP/1.0", 1)), 400);
}

#[test]
fn missing_or_duplicate_host_is_refused_with_400() {
    assert_eq!(status_for(&with_header_replaced("Host", None)), 400);
    assert_eq!(status_for(&with_header_replaced("Host", Some("Host: a\r\nHost: b"))), 400);
    assert_eq!(status_for(&with_header_replaced("Host", Some("Host:"))), 400);
}

#[test]
fn plain_http_request_gets_426_with_upgrade_header() {
    let plain = "GET /chat HTTP/1.1\r\nHost: example.com\r\n\r\n";
    let error = answer(plain.as_bytes(), &StaticPolicy::default()).expect_err("not an upgrade");
    assert_eq!(error, HandshakeError::UpgradeRequired);
    let mut out = Vec::new();
    error.write_response(&mut out);
    let text = String::from_utf8(out).expect("ascii");
    assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{text}");
    assert!(text.contains("\r\nUpgrade: websocket\r\n"));
    assert!(text.contains("\r\nConnection: close\r\n"));
}

#[test]
fn upgrade_and_connection_are_case_insensitive_token_lists() {
    let request = with_header_replaced("Upgrade", Some("upgrade: h2c, WebSocket"))
        .replace("Connection: Upgrade", "connection: keep-alive, UPGRADE");
    assert_eq!(status_for(&request), 101);
}

#[test]
fn missing_upgrade_or_connection_token_gets_426() {
    assert_eq!(status_for(&with_header_replaced("Upgrade", Some("Upgrade: h2c"))), 426);
    assert_eq!(status_for(&with_header_replaced("Upgrade", None)), 426);
    assert_eq!(status_for(&with_header_replaced("Connection", Some("Connection: keep-alive"))), 426);
}

#[test]
fn wrong_version_gets_426_naming_version_13() {
    let request = with_header_replaced("Sec-WebSocket-Version", Some("Sec-WebSocket-Version: 8"));
    let error = answer(request.as_bytes(), &StaticPolicy::default()).expect_err("version 8");
    assert_eq!(error.status(), 426);
    let mut out = Vec::new();
    error.write_response(&mut out);
    assert!(String::from_utf8(out).expect("ascii").contains("\r\nSec-WebSocket-Version: 13\r\n"));
}

#[test]
fn missing_version_is_refused_with_400_naming_version_13() {
    let request = with_header_replaced("Sec-WebSocket-Version", None);
    let error = answer(request.as_bytes(), &StaticPolicy::default()).expect_err("no version");
    assert_eq!(error.status(), 400);
    let mut out = Vec::new();
    error.write_response(&mut out);
    assert!(String::from_utf8(out).expect("ascii").contains("\r\nSec-WebSocket-Version: 13\r\n"));
}

#[test]
fn key_must_be_base64_of_16_bytes() {
    for bad in [
        None,
        Some("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ"), // unpadded
        Some("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZWU="), // 17 bytes
        Some("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j"),   // 12 bytes
        Some("Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!=="), // not base64
        Some("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="),
    ] {
        assert_eq!(status_for(&with_header_replaced("Sec-WebSocket-Key", bad)), 400, "{bad:?}");
    }
}

#[test]
fn header_section_over_the_limit_gets_431() {
    let padding = format!("X-Padding: {}\r\n", "a".repeat(DEFAULT_MAX_HEADER_BYTES));
    let request = GOOD.replacen("\r\n", &format!("\r\n{padding}"), 1);
    assert_eq!(status_for(&request), 431);

    // An unfinished header section that has already reached the limit is refused without waiting.
    let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
    let unfinished = &request.as_bytes()[..DEFAULT_MAX_HEADER_BYTES];
    assert_eq!(
        parse_request(unfinished, &mut headers, DEFAULT_MAX_HEADER_BYTES).map(|_| ()),
        Err(HandshakeError::HeadersTooLarge)
    );
}

#[test]
fn too_many_headers_gets_431() {
    let extra: String = (0..DEFAULT_MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
    let request = GOOD.replacen("\r\n", &format!("\r\n{extra}"), 1);
    assert_eq!(status_for(&request), 431);
}

#[test]
fn garbage_gets_400() {
    assert_eq!(status_for("\u{1}\u{2}\u{3} nonsense\r\n\r\n"), 400);
}

#[test]
fn every_prefix_of_a_request_is_partial() {
    for cut in 0..GOOD.len() {
        let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
        let parsed = parse_request(&GOOD.as_bytes()[..cut], &mut headers, DEFAULT_MAX_HEADER_BYTES);
        assert!(matches!(parsed, Ok(Parsed::Partial)), "cut at {cut}: {parsed:?}");
    }
}

#[test]
fn origin_allow_list_refuses_others_with_403() {
    let policy =
        StaticPolicy { allowed_origins: vec!["https://app.example.com".into()], ..Default::default() };
    assert_eq!(answer(GOOD.as_bytes(), &policy).map(|_| ()), Err(HandshakeError::ForbiddenOrigin));
    assert_eq!(HandshakeError::ForbiddenOrigin.status(), 403);
    let allowed = with_header_replaced("Origin", Some("Origin: HTTPS://APP.example.com"));
    assert!(answer(allowed.as_bytes(), &policy).is_ok());
    // Non-browser clients send no Origin; an Origin check does not apply to them.
    let no_origin = with_header_replaced("Origin", None);
    assert!(answer(no_origin.as_bytes(), &policy).is_ok());
}

#[test]
fn subprotocol_is_the_clients_most_preferred_one_we_speak() {
    let policy = StaticPolicy { subprotocols: vec!["superchat".into(), "chat".into()], ..Default::default() };
    let out = String::from_utf8(answer(GOOD.as_bytes(), &policy).expect("ok")).expect("ascii");
    assert!(out.contains("\r\nSec-WebSocket-Protocol: chat\r\n"), "{out}");
    let policy = StaticPolicy { subprotocols: vec!["mqtt".into()], ..Default::default() };
    let out = String::from_utf8(answer(GOOD.as_bytes(), &policy).expect("ok")).expect("ascii");
    assert!(!out.contains("Sec-WebSocket-Protocol"));
}

#[test]
fn header_end_is_found_incrementally() {
    let bytes = GOOD.as_bytes();
    let mut scanned = 0;
    for end in 1..=bytes.len() {
        let found = find_header_end(&bytes[..end], scanned);
        if end < bytes.len() {
            assert_eq!(found, None, "end {end}");
        } else {
            assert_eq!(found, Some(bytes.len()));
        }
        scanned = end;
    }
    assert_eq!(find_header_end(b"GET / HTTP/1.1\nHost: x\n\nrest", 0), Some(24));
}

#[test]
fn client_and_server_agree() {
    let client = ClientHandshake::new(*b"0123456789abcdef");
    let mut request = Vec::new();
    client.write_request(&mut request, "127.0.0.1:8080", "/echo", &["chat"]);
    let policy = StaticPolicy { subprotocols: vec!["chat".into()], ..Default::default() };
    let mut response = answer(&request, &policy).expect("server accepts our client");
    response.extend_from_slice(&[0x81, 0x00]); // a frame right behind the response
    let parsed = client.parse_response(&response, &["chat"]);
    assert_eq!(
        parsed,
        Ok(ServerResponse::Upgraded { subprotocol: Some("chat"), len: response.len() - 2, deflate: None })
    );
}

#[test]
fn a_client_fails_an_extension_it_did_not_offer_and_reads_the_one_it_did() {
    let plain = ClientHandshake::new([5; 16]);
    let deflating = plain.offering_deflate();
    let mut request = Vec::new();
    deflating.write_request(&mut request, "h", "/", &[]);
    let text = String::from_utf8(request).expect("ascii");
    assert!(text.contains("\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"));
    let accept = std::str::from_utf8(AcceptKey::for_key(plain.key()).as_bytes()).expect("base64").to_string();
    let response = |extensions: &str| {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n{extensions}\r\n"
        )
        .into_bytes()
    };
    let agreed = response("Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n");
    assert_eq!(
        plain.parse_response(&agreed, &[]),
        Err(ClientHandshakeError::UnexpectedExtension),
        "not offered, so not accepted"
    );
    match deflating.parse_response(&agreed, &[]) {
        Ok(ServerResponse::Upgraded { deflate: Some(agreement), .. }) => {
            assert!(agreement.server_no_context_takeover && !agreement.client_no_context_takeover);
        }
        other => panic!("expected an agreement, got {other:?}"),
    }
    let declined = response("");
    assert!(matches!(
        deflating.parse_response(&declined, &[]),
        Ok(ServerResponse::Upgraded { deflate: None, .. })
    ));
    let twice = response(
        "Sec-WebSocket-Extensions: permessage-deflate\r\nSec-WebSocket-Extensions: permessage-deflate\r\n",
    );
    assert_eq!(deflating.parse_response(&twice, &[]), Err(ClientHandshakeError::UnexpectedExtension));
    let unknown = response("Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n");
    assert_eq!(deflating.parse_response(&unknown, &[]), Err(ClientHandshakeError::UnexpectedExtension));
}

#[test]
fn client_request_carries_extra_headers_but_never_a_split_line() {
    let client = ClientHandshake::new([3; 16]);
    let mut request = Vec::new();
    let extra: &[(&str, &[u8])] =
        &[("X-Forwarded-For", b"10.0.0.1, 127.0.0.1"), ("Cookie", b"a=1"), ("X-Evil", b"x\r\nInjected: yes")];
    client.write_request_with_headers(&mut request, "up:9000", "/x?q=1", &["chat"], extra);
    let text = String::from_utf8(request.clone()).expect("ascii");
    assert!(text.starts_with("GET /x?q=1 HTTP/1.1\r\nHost: up:9000\r\n"), "{text}");
    assert!(text.contains("\r\nX-Forwarded-For: 10.0.0.1, 127.0.0.1\r\n"), "{text}");
    assert!(text.contains("\r\nCookie: a=1\r\n"), "{text}");
    assert!(!text.contains("Injected") && !text.contains("X-Evil"), "{text}");
    let policy = StaticPolicy { subprotocols: vec!["chat".into()], ..Default::default() };
    answer(&request, &policy).expect("still a valid upgrade request");
}

#[test]
fn client_refuses_a_wrong_accept_key_or_a_rejection() {
    let client = ClientHandshake::new([7; 16]);
    let forged = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    assert_eq!(client.parse_response(forged, &[]), Err(ClientHandshakeError::BadAcceptKey));
    let refused = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(client.parse_response(refused, &[]), Err(ClientHandshakeError::Rejected(503)));
    assert_eq!(client.parse_response(b"HTTP/1.1 101 Swi", &[]), Ok(ServerResponse::Partial));
}

proptest! {
    /// Arbitrary bytes (and arbitrary prefixes of a valid request with noise) never panic the
    /// parser and never produce a 101 for something that is not a complete request.
    #[test]
    fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
        let _ = parse_request(&bytes, &mut headers, 512);
        let _ = ClientHandshake::new([0; 16]).parse_response(&bytes, &["a"]);
    }

    #[test]
    fn a_corrupted_byte_never_panics(at in 0usize..GOOD.len(), byte in any::<u8>()) {
        let mut bytes = GOOD.as_bytes().to_vec();
        bytes[at] = byte;
        let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
        let _ = parse_request(&bytes, &mut headers, DEFAULT_MAX_HEADER_BYTES);
    }
}
