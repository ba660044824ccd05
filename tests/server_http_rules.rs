//! The HTTP/1.1 message rules (RFC 9112 sections 3.2 and 6, RFC 9110 section 8.6) on every
//! endpoint of the real binary, over raw sockets: `/publish`, `/metrics`, `/healthz` and the
//! WebSocket upgrade refuse the same requests, each refusal closes the connection, and nothing
//! sent after a refused request is answered as a request of its own (request smuggling).

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::server::Server;
use common::wire::{self, Client, HttpConn, HttpResponse, TEXT};

/// The plain endpoints and the method each is used with.
const ENDPOINTS: [(&str, &str); 3] = [("POST", "/publish/t"), ("GET", "/metrics"), ("GET", "/healthz")];

/// A request to `method path` with `host_lines` (each ending in CRLF; the Host part), `headers`
/// (the same), `target_suffix` appended to the path, and a five-byte body.
fn request(method: &str, path: &str, target_suffix: &str, host_lines: &str, headers: &str) -> Vec<u8> {
    format!("{method} {path}{target_suffix} HTTP/1.1\r\n{host_lines}{headers}\r\nhello").into_bytes()
}

/// Each broken request as (what, target suffix, host lines, other headers, status).
fn broken_cases() -> Vec<(&'static str, &'static str, &'static str, &'static str, u16)> {
    const HOST: &str = "Host: 127.0.0.1\r\n";
    vec![
        ("no Host", "", "", "Content-Length: 5\r\n", 400),
        ("Host twice", "", "Host: a\r\nHost: a\r\n", "Content-Length: 5\r\n", 400),
        ("two different Hosts", "", "Host: a\r\nHost: b\r\n", "Content-Length: 5\r\n", 400),
        ("invalid Host", "", "Host: a b\r\n", "Content-Length: 5\r\n", 400),
        ("a tab in the target", "\tx", HOST, "Content-Length: 5\r\n", 400),
        ("DEL in the target", "\x7f", HOST, "Content-Length: 5\r\n", 400),
        ("NUL in the target", "\x00", HOST, "Content-Length: 5\r\n", 400),
        ("Content-Length: +5", "", HOST, "Content-Length: +5\r\n", 400),
        ("Content-Length: -5", "", HOST, "Content-Length: -5\r\n", 400),
        ("Content-Length: 5, 5", "", HOST, "Content-Length: 5, 5\r\n", 400),
        ("Content-Length: 5 5", "", HOST, "Content-Length: 5 5\r\n", 400),
        ("Content-Length: 0x5", "", HOST, "Content-Length: 0x5\r\n", 400),
        ("two Content-Lengths", "", HOST, "Content-Length: 5\r\nContent-Length: 5\r\n", 400),
        ("two different Content-Lengths", "", HOST, "Content-Length: 5\r\nContent-Length: 0\r\n", 400),
        (
            "Content-Length and Transfer-Encoding",
            "",
            HOST,
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            400,
        ),
        (
            "Transfer-Encoding and Content-Length",
            "",
            HOST,
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            400,
        ),
        ("chunked not last", "", HOST, "Transfer-Encoding: chunked, gzip\r\n", 400),
        ("a coding without chunked", "", HOST, "Transfer-Encoding: gzip\r\n", 400),
        ("chunked", "", HOST, "Transfer-Encoding: chunked\r\n", 411),
        ("an unknown coding", "", HOST, "Transfer-Encoding: gzip, chunked\r\n", 501),
    ]
}

/// Reads everything until the server closes: exactly one response, then EOF.
fn the_only_answer(stream: &mut std::net::TcpStream, what: &str) -> HttpResponse {
    let mut bytes = Vec::new();
    if let Err(error) = stream.read_to_end(&mut bytes) {
        panic!(
            "{what}: expected one answer and EOF, got {error} after {:?}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let (mut response, head_len) = wire::parse_head(&bytes)
        .unwrap_or_else(|| panic!("{what}: no answer: {:?}", String::from_utf8_lossy(&bytes)));
    response.body = bytes[head_len..].to_vec();
    let length: usize = response.header("Content-Length").expect("Content-Length").parse().expect("digits");
    assert_eq!(
        response.body.len(),
        length,
        "{what}: bytes after the answer (a second request was answered?): {:?}",
        String::from_utf8_lossy(&bytes)
    );
    response
}

#[test]
fn every_endpoint_refuses_each_broken_request_and_closes() {
    let server = Server::start(&[]);
    for (method, path) in ENDPOINTS {
        for (what, suffix, host, headers, status) in broken_cases() {
            let what = format!("{method} {path}: {what}");
            let mut stream = server.connect();
            stream.write_all(&request(method, path, suffix, host, headers)).expect("send");
            let response = the_only_answer(&mut stream, &what);
            assert_eq!(response.status, status, "{what}: {response:?}");
            assert_eq!(response.header("Connection"), Some("close"), "{what}: {response:?}");
        }
        // The same request done right gets its normal answer.
        let mut conn = HttpConn::connect(server.addr());
        conn.send(&request(method, path, "", "Host: 127.0.0.1\r\n", "Content-Length: 5\r\n"));
        let response = conn.read_response();
        let expected = if method == "POST" { 202 } else { 200 };
        assert_eq!(response.status, expected, "{method} {path}: {response:?}");
        assert_eq!(response.header("Connection"), Some("keep-alive"), "{response:?}");
    }
}

#[test]
fn http10_may_leave_host_out_but_not_send_it_twice() {
    let server = Server::start(&[]);
    let response = wire::http_exchange(server.addr(), b"GET /healthz HTTP/1.0\r\n\r\n");
    assert_eq!(response.status, 200, "{response:?}");
    let response = wire::http_exchange(server.addr(), b"GET /healthz HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n");
    assert_eq!(response.status, 400, "{response:?}");
    let chunked = b"POST /publish/t HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let response = wire::http_exchange(server.addr(), chunked);
    assert_eq!(response.status, 400, "Transfer-Encoding in HTTP/1.0 is faulty framing: {response:?}");
}

#[test]
fn a_smuggled_second_request_is_never_answered_or_published() {
    let server = Server::start(&[]);
    let mut subscriber = Client::connect(server.addr(), "/pubsub/t");
    let smuggled = "POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n\r\nsmuggled";
    let attacks: [(&str, String); 7] = [
        ("CL + TE", format!("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}")),
        ("TE + CL", format!("Transfer-Encoding: chunked\r\nContent-Length: 52\r\n\r\n0\r\n\r\n{smuggled}")),
        ("CL: +5", format!("Content-Length: +5\r\n\r\nhello{smuggled}")),
        ("CL: 5, 5", format!("Content-Length: 5, 5\r\n\r\nhello{smuggled}")),
        ("two CLs", format!("Content-Length: 0\r\nContent-Length: 5\r\n\r\nhello{smuggled}")),
        ("Host twice", format!("Host: y\r\nContent-Length: 0\r\n\r\n{smuggled}")),
        ("CL with a tab inside", format!("Content-Length: 0\t5\r\n\r\nhello{smuggled}")),
    ];
    for (what, rest) in &attacks {
        for (method, path) in ENDPOINTS {
            let mut stream = server.connect();
            let first = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{rest}");
            stream.write_all(first.as_bytes()).expect("send");
            let response = the_only_answer(&mut stream, &format!("{method} {path}: {what}"));
            assert_eq!(response.status, 400, "{method} {path}: {what}: {response:?}");
        }
    }
    for target in ["/publish/t\tx", "/publish/t\x7f"] {
        let mut stream = server.connect();
        let first = format!("POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n{smuggled}");
        stream.write_all(first.as_bytes()).expect("send");
        let response = the_only_answer(&mut stream, &format!("target {target:?}"));
        assert_eq!(response.status, 400, "{target:?}: {response:?}");
    }
    // Nothing reached the subscriber: the first frame it gets is the one published after.
    let mut conn = HttpConn::connect(server.addr());
    assert_eq!(conn.publish("/publish/t", Some("text/plain"), b"after").subscribers, 1);
    subscriber.expect_frame(TEXT, b"after");
}

#[test]
fn the_upgrade_refuses_the_same_requests() {
    let server = Server::start(&[]);
    let upgrade = |extra: &str, target: &str| {
        let request = wire::upgrade_request(target, extra);
        let mut stream = server.connect();
        stream.write_all(request.as_bytes()).expect("send");
        the_only_answer(&mut stream, &format!("upgrade {target:?} with {extra:?}"))
    };
    for (extra, target) in [
        ("Host: 127.0.0.1\r\n", "/echo"),
        ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "/echo"),
        ("Transfer-Encoding: chunked\r\n", "/echo"),
        ("Content-Length: +0\r\n", "/echo"),
        ("Content-Length: 0, 0\r\n", "/echo"),
        ("Content-Length: 5\r\n", "/echo"),
        ("", "/echo\tx"),
        ("", "/echo\x7f"),
        ("", "/pubsub/t\x01"),
    ] {
        let response = upgrade(extra, target);
        assert_eq!(response.status, 400, "{extra:?} {target:?}: {response:?}");
        assert_eq!(response.header("Connection"), Some("close"));
    }
    // A declared empty body is no body: still a WebSocket.
    let mut stream = server.connect();
    stream.write_all(wire::upgrade_request("/echo", "Content-Length: 0\r\n").as_bytes()).expect("send");
    let mut client = Client::finish_upgrade(stream);
    client.send(TEXT, b"still fine");
    client.expect_frame(TEXT, b"still fine");
}

#[test]
fn a_refusal_arrives_before_the_body_is_sent() {
    // A bad request is answered from its headers alone: the client learns at once, and the
    // server reads (and discards) what follows only until the client goes away.
    let server = Server::start(&[]);
    let mut stream = server.connect();
    stream
        .write_all(b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\nContent-Length: 9\r\n\r\n")
        .expect("send");
    stream.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let response = the_only_answer(&mut stream, "two Content-Lengths, no body");
    assert_eq!(response.status, 400, "{response:?}");
}
