//! The plain HTTP endpoints against the real binary: `/healthz` (200, and 503 while draining),
//! `/metrics` (strictly parsed Prometheus text whose counters follow the traffic), `POST
//! /publish/{topic}` (202 with a JSON body; text or binary frames by Content-Type and UTF-8 validity;
//! 405/411/413), 404s, HTTP/1.1 keep-alive and pipelining, and routes moved or turned off by flags.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::prom::{self, Exposition};
use common::server::Server;
use common::wire::{self, BINARY, CLOSE, Client, HttpConn, HttpResponse, TEXT};

fn get(conn: &mut HttpConn, path: &str) -> HttpResponse {
    conn.request("GET", path, &[], b"")
}

fn assert_status(response: &HttpResponse, status: u16) {
    assert_eq!(response.status, status, "{response:?} (body {:?})", String::from_utf8_lossy(&response.body));
}

/// The answer to a plain `method` request for `path` (with a one-byte body for a `POST`), on a
/// connection of its own.
fn plain_answer(server: &Server, method: &str, path: &str) -> HttpResponse {
    let mut conn = HttpConn::connect(server.addr());
    conn.request(method, path, &[], if method == "POST" { b"x" } else { b"" })
}

/// The answer to an upgrade request for `path` (which must not be a 101).
fn upgrade_answer(server: &Server, path: &str) -> HttpResponse {
    let mut conn = HttpConn::connect(server.addr());
    conn.send(wire::upgrade_request(path, "").as_bytes());
    conn.read_response()
}

#[test]
fn healthz_answers_ok_while_serving() {
    let server = Server::start(&[]);
    let mut conn = HttpConn::connect(server.addr());
    let response = get(&mut conn, "/healthz");
    assert_status(&response, 200);
    assert_eq!(response.body, b"ok\n");
    assert!(response.header("Content-Type").is_some_and(|ct| ct.starts_with("text/plain")), "{response:?}");
    assert_eq!(response.header("Connection"), Some("keep-alive"));
    // A query string does not change the route.
    assert_status(&get(&mut conn, "/healthz?probe=1"), 200);
}

#[test]
fn metrics_are_strict_prometheus_text_and_follow_the_traffic() {
    const MESSAGES: usize = 25;
    let server = Server::start(&[]);
    let mut conn = HttpConn::connect(server.addr());
    // A second, independent parser agrees that the exposition is valid.
    let response = get(&mut conn, "/metrics");
    let text = String::from_utf8(response.body).expect("UTF-8 exposition");
    if let Err(error) = openmetrics_parser::prometheus::parse_prometheus(&text) {
        panic!("openmetrics-parser rejects the exposition: {error:?}\n{text}");
    }
    let before = prom::scrape(&mut conn, "/metrics");
    for name in [
        "ringgate_connections_accepted_total",
        "ringgate_messages_received_total",
        "ringgate_messages_sent_total",
        "ringgate_slow_consumer_drops_total",
        "ringgate_slow_consumer_closes_total",
        "ringgate_http_requests_total",
    ] {
        assert_eq!(before.family(name).map(|f| f.kind.as_str()), Some("counter"), "{name}");
        assert!(before.family(name).is_some_and(|f| f.help.is_some()), "{name} has no HELP");
    }
    assert_eq!(before.sum_where("ringgate_messages_received_total", "route", "echo"), 0.0);

    let mut echo = server.raw_client();
    let mut other = server.raw_client();
    for i in 0..MESSAGES {
        let payload = format!("message {i}");
        echo.send(TEXT, payload.as_bytes());
        echo.expect_frame(TEXT, payload.as_bytes());
    }
    other.send(BINARY, b"one more");
    other.expect_frame(BINARY, b"one more");

    let after = prom::scrape(&mut conn, "/metrics");
    let grew = |name: &str, route: &str| {
        after.sum_where(name, "route", route) - before.sum_where(name, "route", route)
    };
    assert_eq!(grew("ringgate_messages_received_total", "echo"), MESSAGES as f64 + 1.0);
    assert_eq!(grew("ringgate_messages_sent_total", "echo"), MESSAGES as f64 + 1.0);
    assert_eq!(grew("ringgate_messages_received_total", "pubsub"), 0.0);
    let accepted =
        after.sum("ringgate_connections_accepted_total") - before.sum("ringgate_connections_accepted_total");
    assert_eq!(accepted, 2.0, "two WebSocket connections since the first scrape");
    // Per-worker series: one per worker, and the two workers' counts add up.
    assert_eq!(after.samples("ringgate_connections_accepted_total").count(), 2);
    assert!(after.sum("ringgate_connections_open") >= 3.0, "two clients and this scrape are open");
    assert!(after.sum_where("ringgate_http_requests_total", "endpoint", "metrics") >= 1.0);
    assert_eq!(after.sum("ringgate_draining"), 0.0);
}

#[test]
fn the_prometheus_reader_is_strict() {
    let text = "# HELP a_total A \\\\ thing\\n.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\\n\"} 3\n\
                a_total{x=\"2\",} 4 1700000000000\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\n\
                h_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\nplain NaN\n";
    let exposition = Exposition::parse(text).expect("valid");
    assert_eq!(exposition.sum("a_total"), 7.0);
    assert_eq!(exposition.sum_where("a_total", "y", "q\"\\\n"), 3.0);
    assert_eq!(exposition.family("h").map(|f| f.samples.len()), Some(4));
    assert_eq!(exposition.family("plain").map(|f| f.kind.as_str()), Some("untyped"));
    for bad in [
        "a 1",                                  // no final line feed
        "1a 1\n",                               // bad name
        "a{x=\"1\" 1\n",                        // unterminated labels
        "a{x=\"\\t\"} 1\n",                     // bad escape
        "a{x=\"1\",x=\"2\"} 1\n",               // repeated label
        "a one\n",                              // bad value
        "a inf\n",                              // Rust's spelling, not Prometheus's
        "a 1\na 2\n",                           // duplicate series
        "a 1\n# TYPE a counter\n",              // TYPE after samples
        "# TYPE a counter\n# TYPE a counter\n", // TYPE twice
        "# TYPE a counter\na -1\n",             // negative counter
        "a{x=\"1\"} 1\nb 1\na{x=\"2\"} 1\n",    // split family
        "# TYPE a countr\n",                    // unknown type
        "a 1 2 3\n",                            // trailing fields
    ] {
        assert!(Exposition::parse(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn wrong_methods_get_405_with_allow() {
    let server = Server::start(&[]);
    let mut conn = HttpConn::connect(server.addr());
    for (method, path, allowed) in [
        ("GET", "/publish/t", "POST"),
        ("PUT", "/publish/t", "POST"),
        ("POST", "/metrics", "GET"),
        ("DELETE", "/metrics", "GET"),
        ("POST", "/healthz", "GET"),
    ] {
        let body: &[u8] = if method == "POST" { b"x" } else { b"" };
        let response = conn.request(method, path, &[], body);
        assert_status(&response, 405);
        let allow = response.header("Allow").unwrap_or_else(|| panic!("no Allow in {response:?}"));
        assert!(allow.split(',').any(|m| m.trim() == allowed), "{method} {path}: Allow {allow:?}");
        assert!(!allow.split(',').any(|m| m.trim() == method), "{method} {path}: Allow {allow:?}");
    }
}

#[test]
fn every_method_named_in_allow_is_served() {
    let server = Server::start(&[]);
    let mut conn = HttpConn::connect(server.addr());
    for path in ["/metrics", "/healthz", "/publish/t"] {
        let response = conn.request("PATCH", path, &[], b"");
        assert_status(&response, 405);
        let allow = response.header("Allow").expect("Allow").to_string();
        for method in allow.split(',').map(str::trim) {
            let response = if method == "HEAD" {
                conn.send(&wire::http_request("HEAD", path, &[], b""));
                conn.read_head_only()
            } else {
                conn.request(method, path, &[], if method == "POST" { b"x" } else { b"" })
            };
            assert!(
                (200..300).contains(&response.status),
                "{path} says Allow: {allow}, but {method} gets {response:?}"
            );
        }
    }
}

#[test]
fn a_head_request_gets_no_body() {
    let server = Server::start(&[]);
    for path in ["/healthz", "/metrics", "/publish/t", "/nope"] {
        // HEAD, then a GET on the same connection: right after the HEAD's head comes the GET's answer.
        let mut stream = server.connect();
        let mut requests = wire::http_request("HEAD", path, &[], b"");
        requests.extend(wire::http_request("GET", "/healthz", &[("Connection", "close")], b""));
        stream.write_all(&requests).expect("send");
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        let (head, head_len) = wire::parse_head(&bytes).expect("an answer to HEAD");
        let rest = &bytes[head_len..];
        assert!(
            // (On a connection it closes, stray bytes after the head harm no one.)
            head.header("Connection") == Some("close") || rest.starts_with(b"HTTP/1.1 200 "),
            "HEAD {path} was answered {} with a body: {:?}",
            head.status,
            String::from_utf8_lossy(rest)
        );
    }
}

#[test]
fn a_chunked_publish_gets_411_and_a_body_over_the_limit_413() {
    let server = Server::start(&["--max-message-size", "4KiB"]);
    let mut conn = HttpConn::connect(server.addr());
    let response = conn.request("POST", "/publish/t", &[], &[b'a'; 4096]);
    assert_status(&response, 202);

    let mut conn = HttpConn::connect(server.addr());
    conn.send(
        b"POST /publish/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert_status(&conn.read_response(), 411);

    // Over the limit: answered from the headers alone, before any body is sent.
    let mut conn = HttpConn::connect(server.addr());
    conn.send(
        b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 4097\r\n\r\n",
    );
    assert_status(&conn.read_response(), 413);
    let mut conn = HttpConn::connect(server.addr());
    conn.send(b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n");
    let response = conn.read_response();
    assert!(response.status == 413 || response.status == 400, "{response:?}");
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection_pipelined_or_not() {
    let server = Server::start(&[]);
    let mut conn = HttpConn::connect(server.addr());
    // One after the other.
    let health = get(&mut conn, "/healthz");
    assert_status(&health, 200);
    let metrics = get(&mut conn, "/metrics");
    assert_status(&metrics, 200);
    let publish = conn.publish("/publish/nobody", Some("text/plain"), b"hello");
    assert_eq!((publish.topic.as_str(), publish.kind.as_str(), publish.subscribers), ("nobody", "text", 0));
    for response in [&health, &metrics] {
        assert_eq!(response.header("Connection"), Some("keep-alive"), "{response:?}");
    }

    // Pipelined: three requests in one write, answered in order.
    let mut pipelined = wire::http_request("GET", "/healthz", &[], b"");
    pipelined.extend(wire::http_request(
        "POST",
        "/publish/p",
        &[("Content-Type", "application/json")],
        b"{}",
    ));
    pipelined.extend(wire::http_request("GET", "/nope", &[], b""));
    conn.send(&pipelined);
    let first = conn.read_response();
    assert_status(&first, 200);
    assert_eq!(first.body, b"ok\n");
    let second = conn.read_response();
    assert_status(&second, 202);
    let fields = wire::parse_flat_json(std::str::from_utf8(&second.body).expect("UTF-8"));
    assert!(fields.contains(&("kind".into(), wire::JsonValue::Str("text".into()))), "{fields:?}");
    let not_found = conn.read_response();
    assert_status(&not_found, 404);
    // A 404 may end the connection, if it says so.
    if not_found.header("Connection") == Some("close") {
        conn.expect_eof();
        conn = HttpConn::connect(server.addr());
    } else {
        assert_eq!(not_found.header("Connection"), Some("keep-alive"), "{not_found:?}");
    }

    // A request split across writes, byte by byte in its head.
    let request = wire::http_request("GET", "/healthz", &[], b"");
    for byte in &request {
        conn.send(std::slice::from_ref(byte));
    }
    assert_status(&conn.read_response(), 200);

    // `Connection: close` is honoured: the answer says so, and the server closes.
    let last = conn.request("GET", "/healthz", &[("Connection", "close")], b"");
    assert_status(&last, 200);
    assert_eq!(last.header("Connection"), Some("close"));
    conn.expect_eof();

    // HTTP/1.0 without keep-alive closes after one answer too.
    let response = wire::http_exchange(server.addr(), b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n");
    assert_status(&response, 200);
}

#[test]
fn unknown_paths_and_invalid_topics_get_404() {
    let server = Server::start(&[]);
    for path in ["/", "/nope", "/healthz/x", "/metricsx", "/publish", "/publish/", "/publish/a/b"] {
        assert_status(&plain_answer(&server, "POST", path), 404);
        assert_status(&plain_answer(&server, "GET", path), 404);
    }
    for path in ["/nope", "/pubsub", "/pubsub/", "/pubsub/a/b", "/echo/x"] {
        assert_status(&upgrade_answer(&server, path), 404);
    }
    // A topic is at most 256 bytes.
    let longest = "t".repeat(256);
    let reply = HttpConn::connect(server.addr()).publish(&format!("/publish/{longest}"), None, b"x");
    assert_eq!(reply.topic, longest);
    Client::connect(server.addr(), &format!("/pubsub/{longest}"));
    let too_long = "t".repeat(257);
    assert_status(&plain_answer(&server, "POST", &format!("/publish/{too_long}")), 404);
    assert_status(&upgrade_answer(&server, &format!("/pubsub/{too_long}")), 404);
}

#[test]
fn publish_sends_text_only_for_declared_text_that_is_utf8() {
    let server = Server::start(&[]);
    let mut subscriber = Client::connect(server.addr(), "/pubsub/kinds");
    let mut conn = HttpConn::connect(server.addr());
    let cases: [(Option<&str>, &[u8], u8); 10] = [
        (Some("text/plain"), "héllo".as_bytes(), TEXT),
        (Some("text/plain; charset=utf-8"), b"plain", TEXT),
        (Some("TEXT/HTML"), b"<p>", TEXT),
        (Some("application/json"), b"{\"a\":1}", TEXT),
        (Some("application/vnd.api+json"), b"{}", TEXT),
        (Some("text/plain"), b"bad \xFF utf-8", BINARY),
        (Some("text/plain"), b"cut \xC3", BINARY),
        (Some("application/octet-stream"), b"valid text, binary type", BINARY),
        (None, b"no type", BINARY),
        (Some("text/plain"), b"", TEXT),
    ];
    for (content_type, body, opcode) in cases {
        let reply = conn.publish("/publish/kinds", content_type, body);
        let kind = if opcode == TEXT { "text" } else { "binary" };
        assert_eq!((reply.kind.as_str(), reply.subscribers), (kind, 1), "{content_type:?} {body:?}");
        subscriber.expect_frame(opcode, body);
    }
}

#[test]
fn routes_can_be_moved_or_turned_off_by_flags() {
    let server = Server::start(&[
        "--echo-path",
        "off",
        "--pubsub-path",
        "/ws/topics",
        "--publish-path",
        "/api/publish",
        "--metrics-path",
        "/internal/metrics",
        "--healthz-path",
        "off",
    ]);
    assert_status(&upgrade_answer(&server, "/echo"), 404);
    assert_status(&upgrade_answer(&server, "/pubsub/x"), 404);
    let mut subscriber = Client::connect(server.addr(), "/ws/topics/x");
    assert_status(&plain_answer(&server, "POST", "/publish/x"), 404);
    assert_status(&plain_answer(&server, "GET", "/metrics"), 404);
    assert_status(&plain_answer(&server, "GET", "/healthz"), 404);
    let mut conn = HttpConn::connect(server.addr());
    let reply = conn.publish("/api/publish/x", Some("text/plain"), b"moved");
    assert_eq!(reply.subscribers, 1);
    subscriber.expect_frame(TEXT, b"moved");
    prom::scrape(&mut conn, "/internal/metrics");

    // Turning pub/sub off leaves the others alone.
    let server = Server::start(&["--pubsub-path", "off", "--publish-path", "off", "--metrics-path", "off"]);
    assert_status(&upgrade_answer(&server, "/pubsub/x"), 404);
    assert_status(&plain_answer(&server, "POST", "/publish/x"), 404);
    assert_status(&plain_answer(&server, "GET", "/metrics"), 404);
    assert_status(&plain_answer(&server, "GET", "/healthz"), 200);
    let mut echo = server.raw_client();
    echo.send(TEXT, b"still echoing");
    echo.expect_frame(TEXT, b"still echoing");
}

#[test]
fn healthz_turns_503_while_draining_on_a_keep_alive_connection() {
    let mut server = Server::start(&["--drain-timeout", "5s"]);
    // A WebSocket that will not answer the server's Close keeps the drain going.
    let mut websocket = server.raw_client();
    // Several keep-alive connections, so that both workers hold some (whichever holds the WebSocket).
    let mut probes: Vec<HttpConn> = (0..8).map(|_| HttpConn::connect(server.addr())).collect();
    for probe in &mut probes {
        assert_status(&get(probe, "/healthz"), 200);
    }
    let mut metrics = HttpConn::connect(server.addr());
    assert_eq!(prom::scrape(&mut metrics, "/metrics").sum("ringgate_draining"), 0.0);

    server.sigterm();
    assert_eq!(websocket.read_frame().close_code(), Some(1001), "the drain has started");
    for (i, probe) in probes.iter_mut().enumerate() {
        probe.send(&wire::http_request("GET", "/healthz", &[], b""));
        let mut bytes = Vec::new();
        // Read to the end: the answer must close the connection.
        if let Err(error) = probe.stream.read_to_end(&mut bytes) {
            panic!("keep-alive connection {i}: {error} after {:?}", String::from_utf8_lossy(&bytes));
        }
        assert!(!bytes.is_empty(), "keep-alive connection {i} was closed at the start of the drain");
        let (response, head_len) = wire::parse_head(&bytes).expect("a complete response head");
        assert_status(&response, 503);
        assert_eq!(&bytes[head_len..], b"draining\n", "keep-alive connection {i}");
        assert_eq!(response.header("Connection"), Some("close"), "{response:?}");
    }
    let exposition = prom::scrape(&mut metrics, "/metrics");
    assert_eq!(exposition.sum("ringgate_draining"), 1.0);
    metrics.expect_eof();
    assert!(server.wait_exit(Duration::ZERO).is_none(), "exited while a WebSocket was still open");

    websocket.send(CLOSE, &wire::close_body(1001, b""));
    websocket.expect_eof();
    drop(websocket);
    let status = server.wait_exit(Duration::from_secs(3)).expect("exit once drained");
    assert!(status.success(), "exit status {status:?}; stderr:\n{}", server.stderr());
    assert!(!server.stderr().contains("panicked"), "{}", server.stderr());
}
