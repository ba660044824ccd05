//! The counter audit: for every counter family in `/metrics`, a known action against the real
//! binary and the exact change it must make; and every step also checks that no other counter
//! moved (an action counted twice, or counted under the wrong label, fails here).
//!
//! A [`Meter`] keeps its own keep-alive connection and compares each scrape with the previous one.
//! Counters are updated by the worker that owns a connection, possibly a moment after the client
//! saw the bytes, so a step waits (up to [`SETTLE`]) for the expected change; a change past the
//! expected value fails at once, since counters never go back. The meter's own scrapes move three
//! things, left out of the comparisons and audited on their own: `http_requests{endpoint="metrics",
//! status="2xx"}`, the socket byte counters, and the io loop counters.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::prom::{self, Exposition};
use common::server::Server;
use common::wire::{self, BINARY, CLOSE, Client, HttpConn, TEXT};

/// How long a step waits for its counters.
const SETTLE: Duration = Duration::from_secs(3);
const APP: &str = "https://app.example";
const KEY: &str = "YXVkaXQta2V5";

/// One counter series: its family and its labels (sorted).
type SeriesKey = (String, Vec<(String, String)>);

/// Every counter series of a scrape.
fn counters(exposition: &Exposition) -> BTreeMap<SeriesKey, f64> {
    let mut all = BTreeMap::new();
    for family in exposition.families.iter().filter(|f| f.kind == "counter") {
        for sample in &family.samples {
            let mut labels = sample.labels.clone();
            labels.sort();
            all.insert((family.name.clone(), labels), sample.value);
        }
    }
    all
}

/// Series a meter's own scrapes move, checked by the steps that audit them.
fn moved_by_scrapes((family, labels): &SeriesKey) -> bool {
    let scrape = family == "ringgate_http_requests_total"
        && labels.contains(&("endpoint".into(), "metrics".into()))
        && labels.contains(&("status".into(), "2xx".into()));
    scrape || family.starts_with("ringgate_socket_") || family.starts_with("ringgate_io_")
}

/// An expected change: the sum over the series of `family` that carry all of `labels`.
type Change<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

fn matches(key: &SeriesKey, family: &str, labels: &[(&str, &str)]) -> bool {
    key.0 == family && labels.iter().all(|(k, v)| key.1.iter().any(|(lk, lv)| lk == k && lv == v))
}

/// Scrapes on a connection of its own and checks what moved since the last scrape.
struct Meter {
    addr: SocketAddr,
    conn: Option<HttpConn>,
    /// Scrape on a new connection each time (where idle connections do not last).
    fresh: bool,
    base: BTreeMap<SeriesKey, f64>,
    /// Only these families are compared (empty: all of them).
    families: Vec<String>,
}

impl Meter {
    /// A meter over every counter family.
    fn new(server: &Server) -> Meter {
        Meter::over(server, &[])
    }

    /// A meter over `families` only (for a server whose other counters a test cannot pin).
    fn over(server: &Server, families: &[&str]) -> Meter {
        let mut meter = Meter {
            addr: server.addr(),
            conn: None,
            fresh: false,
            base: BTreeMap::new(),
            families: families.iter().map(|f| f.to_string()).collect(),
        };
        meter.base = counters(&meter.scrape());
        meter
    }

    fn scrape(&mut self) -> Exposition {
        if self.fresh {
            self.conn = None;
        }
        let conn = self.conn.get_or_insert_with(|| HttpConn::connect(self.addr));
        prom::scrape(conn, "/metrics")
    }

    fn watched(&self, key: &SeriesKey) -> bool {
        !moved_by_scrapes(key) && (self.families.is_empty() || self.families.contains(&key.0))
    }

    /// Waits until the counters moved by exactly `changes` and nothing else moved; then counts
    /// from here. `what` names the step in failures.
    fn expect(&mut self, what: &str, changes: &[Change<'_>]) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let now = counters(&self.scrape());
            let delta =
                |key: &SeriesKey| now.get(key).copied().unwrap_or(0.0) - self.base.get(key).unwrap_or(&0.0);
            let mut short = Vec::new();
            for (family, labels, expected) in changes {
                let got: f64 = now.keys().filter(|k| matches(k, family, labels)).map(delta).sum();
                assert!(got <= *expected, "{what}: {family}{labels:?} moved by {got}, expected {expected}");
                if got < *expected {
                    short.push(format!("{family}{labels:?}: {got} of {expected}"));
                }
            }
            for key in now.keys().filter(|k| self.watched(k)) {
                let expected_somewhere = changes.iter().any(|(f, l, _)| matches(key, f, l));
                let moved = delta(key);
                assert!(
                    expected_somewhere || moved == 0.0,
                    "{what}: {}{:?} moved by {moved}, expected no change",
                    key.0,
                    key.1
                );
            }
            if short.is_empty() {
                self.base = now;
                return;
            }
            assert!(Instant::now() < deadline, "{what}: still short after {SETTLE:?}: {short:?}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Counts from here without checking (after warm-up traffic whose counts are not the point).
    fn rebase(&mut self) {
        thread::sleep(Duration::from_millis(100));
        self.base = counters(&self.scrape());
    }
}

/// Sends `request` on a fresh connection; the server must answer `status` and close.
fn refused(server: &Server, request: &[u8], status: u16) {
    let response = wire::http_exchange(server.addr(), request);
    assert_eq!(response.status, status, "{:?}: {response:?}", String::from_utf8_lossy(request));
}

/// An upstream that accepts connections and never answers.
fn silent_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    addr
}

fn dead_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr")
}

/// A key file of its own (tests run in parallel: a shared one could be read half-written).
fn key_file() -> String {
    static FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("ringgate-audit-{}-{n}.key", std::process::id()));
    std::fs::write(&path, format!("{KEY}\n")).expect("write key");
    path.to_string_lossy().into_owned()
}

/// A gateway with every feature that has counters: an allow-list, a publish key, and proxy routes
/// to a live upstream (another ringgate), a dead port, and one that never answers.
fn gateway() -> (Server, Server) {
    let upstream = Server::start(&[]);
    let routes = [
        format!("/app=ws://{}/echo", upstream.addr()),
        format!("/dead=ws://{}", dead_port()),
        format!("/silent=ws://{}", silent_upstream()),
    ];
    let key = key_file();
    let mut flags = vec!["--allowed-origin", APP, "--publish-key-file", &key, "--upstream-timeout", "500ms"];
    for route in &routes {
        flags.extend(["--route", route.as_str()]);
    }
    (Server::start(&flags), upstream)
}

#[test]
fn websocket_counters_move_by_exactly_what_happened() {
    let (server, _upstream) = gateway();
    let mut meter = Meter::new(&server);

    // Echo: four messages, then a closing handshake with 1000.
    let mut client = server.raw_client();
    let sizes = [1usize, 10, 100, 1000];
    for (i, size) in sizes.iter().enumerate() {
        let opcode = if i % 2 == 0 { TEXT } else { BINARY };
        let payload = vec![b'e'; *size];
        client.send(opcode, &payload);
        client.expect_frame(opcode, &payload);
    }
    client.send(CLOSE, &wire::close_body(1000, b"bye"));
    client.expect_close(1000);
    let payload = sizes.iter().sum::<usize>() as f64;
    meter.expect(
        "an echo session",
        &[
            ("ringgate_connections_accepted_total", &[], 1.0),
            ("ringgate_handshakes_completed_total", &[], 1.0),
            ("ringgate_messages_received_total", &[("route", "echo")], 4.0),
            ("ringgate_messages_sent_total", &[("route", "echo")], 4.0),
            ("ringgate_payload_received_bytes_total", &[("route", "echo")], payload),
            ("ringgate_payload_sent_bytes_total", &[("route", "echo")], payload),
            ("ringgate_close_frames_received_total", &[("code", "1000")], 1.0),
            ("ringgate_close_frames_sent_total", &[("code", "1000")], 1.0),
        ],
    );

    // An application close code, and an empty Close (no code to count).
    let mut client = server.raw_client();
    client.send(CLOSE, &wire::close_body(4000, b""));
    client.expect_close(4000);
    let mut client = server.raw_client();
    client.send(CLOSE, b"");
    assert_eq!(client.read_frame().payload, b"", "an empty Close is echoed empty");
    client.expect_eof();
    meter.expect(
        "two closes",
        &[
            ("ringgate_connections_accepted_total", &[], 2.0),
            ("ringgate_handshakes_completed_total", &[], 2.0),
            ("ringgate_close_frames_received_total", &[("code", "other")], 1.0),
            ("ringgate_close_frames_sent_total", &[("code", "other")], 1.0),
        ],
    );

    // Pub/sub: three subscribers (wherever the kernel puts them), an HTTP and a WebSocket publisher.
    let mut subscribers: Vec<Client> =
        (0..3).map(|_| Client::connect(server.addr(), "/pubsub/news")).collect();
    let mut publisher = Client::connect(server.addr(), "/pubsub/news");
    let mut http = HttpConn::connect(server.addr());
    let auth = format!("Bearer {KEY}");
    let publish = |http: &mut HttpConn, body: &[u8]| {
        let headers = [("Authorization", auth.as_str()), ("Content-Type", "text/plain")];
        let response = http.request("POST", "/publish/news", &headers, body);
        assert_eq!(response.status, 202, "{response:?}");
        wire::parse_flat_json(std::str::from_utf8(&response.body).expect("UTF-8"))
    };
    // Warm-ups until every worker sees all four subscriptions (not counted: rebased after).
    let deadline = Instant::now() + SETTLE;
    while !publish(&mut http, b"warm-up").contains(&("subscribers".into(), wire::JsonValue::Int(4))) {
        assert!(Instant::now() < deadline, "the subscriptions never reached every worker");
        thread::sleep(Duration::from_millis(10));
    }
    publish(&mut http, b"sync");
    for client in subscribers.iter_mut().chain([&mut publisher]) {
        while client.read_frame().payload != b"sync" {}
    }
    meter.rebase();

    publish(&mut http, b"hello");
    for subscriber in &mut subscribers {
        subscriber.expect_frame(TEXT, b"hello");
    }
    publisher.expect_frame(TEXT, b"hello");
    meter.expect(
        "one HTTP publish to four subscribers",
        &[
            ("ringgate_http_requests_total", &[("endpoint", "publish"), ("status", "2xx")], 1.0),
            ("ringgate_pubsub_published_total", &[], 1.0),
            ("ringgate_pubsub_delivered_total", &[], 4.0),
            ("ringgate_messages_sent_total", &[("route", "pubsub")], 4.0),
            ("ringgate_payload_sent_bytes_total", &[("route", "pubsub")], 20.0),
        ],
    );

    publisher.send(BINARY, b"from ws");
    for subscriber in &mut subscribers {
        subscriber.expect_frame(BINARY, b"from ws");
    }
    meter.expect(
        "one WebSocket publish to three other subscribers",
        &[
            ("ringgate_messages_received_total", &[("route", "pubsub")], 1.0),
            ("ringgate_payload_received_bytes_total", &[("route", "pubsub")], 7.0),
            ("ringgate_pubsub_published_total", &[], 1.0),
            ("ringgate_pubsub_delivered_total", &[], 3.0),
            ("ringgate_messages_sent_total", &[("route", "pubsub")], 3.0),
            ("ringgate_payload_sent_bytes_total", &[("route", "pubsub")], 21.0),
        ],
    );
    // Fan-out that fits every worker's hand-off room drops nothing: handoff_drops stayed 0 above
    // (its exact count per missed subscriber is pinned by the pubsub unit tests; a test cannot
    // put 64 MiB behind a worker without also stalling this one).
}

#[test]
fn compression_counters_move_by_exactly_what_crossed_the_wire() {
    use ringgate::proto::deflate::{Deflater, Inflater};
    let (server, _upstream) = gateway();
    let mut meter = Meter::new(&server);
    let mut stream = server.connect();
    let offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
    stream.write_all(wire::upgrade_request("/echo", offer).as_bytes()).expect("send upgrade");
    let mut client = Client::finish_upgrade(stream);
    let text = br#"{"event":"tick","symbol":"ACME","price":1234.5}"#.repeat(10);
    let mut compressed = Vec::new();
    Deflater::new(6, 15, true).compress(&text, &mut compressed);
    client.send_raw(&wire::encode_frame(true, 0b100, TEXT, &compressed, Some([1, 2, 3, 4])));
    let echo = client.read_frame();
    assert_eq!((echo.rsv, echo.opcode), (0b100, TEXT), "compressed back");
    let mut inflated = Vec::new();
    Inflater::new(true).inflate(&echo.payload, 1 << 20, &mut inflated).expect("inflates");
    assert_eq!(inflated, text);
    let (wire_in, wire_out, plain) = (compressed.len() as f64, echo.payload.len() as f64, text.len() as f64);
    meter.expect(
        "one compressed echo",
        &[
            ("ringgate_connections_accepted_total", &[], 1.0),
            ("ringgate_handshakes_completed_total", &[], 1.0),
            ("ringgate_messages_received_total", &[("route", "echo")], 1.0),
            ("ringgate_messages_sent_total", &[("route", "echo")], 1.0),
            ("ringgate_payload_received_bytes_total", &[("route", "echo")], wire_in),
            ("ringgate_payload_sent_bytes_total", &[("route", "echo")], wire_out),
            ("ringgate_compression_runs_total", &[], 1.0),
            ("ringgate_compressed_messages_total", &[("direction", "in")], 1.0),
            ("ringgate_compressed_messages_total", &[("direction", "out")], 1.0),
            (
                "ringgate_compression_payload_bytes_total",
                &[("direction", "in"), ("stage", "compressed")],
                wire_in,
            ),
            (
                "ringgate_compression_payload_bytes_total",
                &[("direction", "in"), ("stage", "uncompressed")],
                plain,
            ),
            (
                "ringgate_compression_payload_bytes_total",
                &[("direction", "out"), ("stage", "compressed")],
                wire_out,
            ),
            (
                "ringgate_compression_payload_bytes_total",
                &[("direction", "out"), ("stage", "uncompressed")],
                plain,
            ),
        ],
    );
}

#[test]
fn every_handshake_failure_counts_once_under_its_reason() {
    let (server, _upstream) = gateway();
    let mut meter = Meter::new(&server);
    let upgrade = |path: &str, extra: &str| wire::upgrade_request(path, extra);
    let without = |header: &str| {
        upgrade("/echo", "")
            .lines()
            .filter(|line| !line.starts_with(header))
            .map(|line| format!("{line}\r\n"))
            .collect::<String>()
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed", b"GARBAGE\r\n\r\n".to_vec(), 400),
        ("method_not_allowed", upgrade("/echo", "").replacen("GET", "POST", 1).into_bytes(), 405),
        ("http_version", upgrade("/echo", "").replacen("HTTP/1.1", "HTTP/1.0", 1).into_bytes(), 400),
        ("bad_host", upgrade("/echo", "Host: other\r\n").into_bytes(), 400),
        ("upgrade_required", b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 426),
        ("missing_version", without("Sec-WebSocket-Version").into_bytes(), 400),
        ("unsupported_version", upgrade("/echo", "").replace("Version: 13", "Version: 8").into_bytes(), 426),
        ("bad_key", upgrade("/echo", "").replace(wire::KEY, "c2hvcnQ=").into_bytes(), 400),
        ("forbidden_origin", upgrade("/echo", "Origin: http://evil.example\r\n").into_bytes(), 403),
        ("not_found", upgrade("/nope", "").into_bytes(), 404),
        ("upstream_unavailable", upgrade("/dead", "").into_bytes(), 502),
    ];
    for (reason, request, status) in &cases {
        refused(&server, request, *status);
        let reason_label = [("reason", *reason)];
        let mut changes: Vec<Change<'_>> = vec![
            ("ringgate_connections_accepted_total", &[], 1.0),
            ("ringgate_handshake_failures_total", &reason_label, 1.0),
        ];
        if *reason == "upstream_unavailable" {
            changes.push(("ringgate_upstream_connect_failures_total", &[("route", "/dead")], 1.0));
        }
        meter.expect(reason, &changes);
    }

    // Over the header limit: answered 431 before the end of the headers arrives.
    let mut stream = server.connect();
    let mut head = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Filler: ".to_vec();
    head.resize(9 * 1024, b'a');
    stream.write_all(&head).expect("send");
    assert_eq!(wire::read_response_to_eof(&mut stream).status, 431);
    meter.expect(
        "headers_too_large",
        &[
            ("ringgate_connections_accepted_total", &[], 1.0),
            ("ringgate_handshake_failures_total", &[("reason", "headers_too_large")], 1.0),
        ],
    );

    // The client hangs up half-way through its request.
    let mut stream = server.connect();
    stream.write_all(b"GET /ec").expect("send");
    drop(stream);
    meter.expect(
        "disconnected",
        &[
            ("ringgate_connections_accepted_total", &[], 1.0),
            ("ringgate_handshake_failures_total", &[("reason", "disconnected")], 1.0),
        ],
    );

    // An upstream that accepts the connection and never answers the upgrade: 504.
    let mut stream = server.connect();
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    stream.write_all(upgrade("/silent", "").as_bytes()).expect("send");
    assert_eq!(wire::read_response_to_eof(&mut stream).status, 504);
    meter.expect(
        "upstream_timeout",
        &[
            ("ringgate_connections_accepted_total", &[], 1.0),
            ("ringgate_handshake_failures_total", &[("reason", "upstream_timeout")], 1.0),
            ("ringgate_upstream_connects_total", &[("route", "/silent")], 1.0),
        ],
    );
}

#[test]
fn a_proxied_session_counts_once_per_hop_and_byte() {
    let (server, _upstream) = gateway();
    let mut meter = Meter::new(&server);
    let mut stream = server.connect();
    stream.write_all(wire::upgrade_request("/app", "").as_bytes()).expect("send");
    let head = read_head(&mut stream);
    let mut client = Client::finish_upgrade_after(stream, &head);
    client.send(TEXT, b"hello");
    client.expect_frame(TEXT, b"hello");
    client.send(CLOSE, &wire::close_body(1000, b""));
    assert_eq!(client.read_frame().close_code(), Some(1000));
    client.expect_eof();
    // Frames to the upstream are masked (6-byte headers here), frames to the client are not. The
    // upgrade request to the upstream is not counted, but the 101 to the client is: see the note
    // on `to_client`.
    let to_upstream = (6 + 5 + 6 + 2) as f64;
    // NOTE: `ringgate_upstream_bytes_total{direction="to_client"}` includes the relay's own 101
    // answer (`head`), although `UpstreamStats::bytes_to_client` says "frames, after the
    // handshake" and `to_upstream` leaves the upgrade request out. The count is made in
    // `io/conn/relay.rs` (`handle_sent`); this pins what it does today.
    let to_client = (head.len() + 2 + 5 + 2 + 2) as f64;
    meter.expect(
        "one relayed message and close",
        &[
            ("ringgate_connections_accepted_total", &[], 1.0),
            ("ringgate_handshakes_completed_total", &[], 1.0),
            ("ringgate_upstream_connects_total", &[("route", "/app")], 1.0),
            ("ringgate_messages_received_total", &[("route", "proxy")], 1.0),
            ("ringgate_messages_sent_total", &[("route", "proxy")], 1.0),
            ("ringgate_payload_received_bytes_total", &[("route", "proxy")], 5.0),
            ("ringgate_payload_sent_bytes_total", &[("route", "proxy")], 5.0),
            (
                "ringgate_upstream_bytes_total",
                &[("route", "/app"), ("direction", "to_upstream")],
                to_upstream,
            ),
            ("ringgate_upstream_bytes_total", &[("route", "/app"), ("direction", "to_client")], to_client),
            // Close frames count on the client's hop only: the client's Close, and the echo of it.
            ("ringgate_close_frames_received_total", &[("code", "1000")], 1.0),
            ("ringgate_close_frames_sent_total", &[("code", "1000")], 1.0),
        ],
    );
}

/// Reads a response head byte by byte, so that nothing after it is consumed.
fn read_head(stream: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).expect("read the answer"), 1, "EOF inside the answer");
        head.push(byte[0]);
    }
    head
}

#[test]
fn http_requests_and_refusals_count_once_by_endpoint_status_and_reason() {
    let (server, _upstream) = gateway();
    let mut meter = Meter::new(&server);
    let mut http = HttpConn::connect(server.addr());
    assert_eq!(http.request("GET", "/healthz", &[], b"").status, 200);
    assert_eq!(http.request("POST", "/metrics", &[], b"x").status, 405);
    let auth = format!("Bearer {KEY}");
    assert_eq!(http.request("POST", "/publish/nobody", &[("Authorization", &auth)], b"x").status, 202);
    let preflight = [("Origin", APP), ("Access-Control-Request-Method", "POST")];
    assert_eq!(http.request("OPTIONS", "/publish/nobody", &preflight, b"").status, 204);
    meter.expect(
        "answered requests",
        &[
            ("ringgate_connections_accepted_total", &[], 1.0),
            ("ringgate_http_requests_total", &[("endpoint", "healthz"), ("status", "2xx")], 1.0),
            ("ringgate_http_requests_total", &[("endpoint", "metrics"), ("status", "4xx")], 1.0),
            ("ringgate_http_requests_total", &[("endpoint", "publish"), ("status", "2xx")], 2.0),
            ("ringgate_pubsub_published_total", &[], 1.0),
        ],
    );

    let post = |headers: &str| format!("POST /publish/t HTTP/1.1\r\nHost: x\r\n{headers}\r\n").into_bytes();
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("malformed", "healthz", b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n".to_vec(), 400),
        ("bad_host", "metrics", b"GET /metrics HTTP/1.1\r\n\r\n".to_vec(), 400),
        ("bad_framing", "publish", post("Content-Length: +1\r\n"), 400),
        ("length_required", "publish", post("Transfer-Encoding: chunked\r\n"), 411),
        ("not_implemented", "publish", post("Transfer-Encoding: gzip, chunked\r\n"), 501),
        ("too_large", "publish", post("Content-Length: 2000000\r\n"), 413),
        (
            "forbidden_origin",
            "healthz",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nOrigin: http://e.example\r\n\r\n".to_vec(),
            403,
        ),
        ("unauthorized", "publish", post("Content-Length: 0\r\n"), 401),
        ("invalid_request", "publish", post("Authorization: Bearer\r\nContent-Length: 0\r\n"), 400),
        ("invalid_token", "publish", post("Authorization: Bearer bm9wZQ==\r\nContent-Length: 0\r\n"), 401),
    ];
    for (reason, endpoint, request, status) in &cases {
        refused(&server, request, *status);
        let class = if *status >= 500 { "5xx" } else { "4xx" };
        meter.expect(
            reason,
            &[
                ("ringgate_connections_accepted_total", &[], 1.0),
                ("ringgate_http_requests_total", &[("endpoint", *endpoint), ("status", class)], 1.0),
                ("ringgate_http_refusals_total", &[("reason", *reason)], 1.0),
            ],
        );
    }
}

#[test]
fn the_meters_own_scrapes_and_socket_bytes_add_up_exactly() {
    let server = Server::start(&[]);
    // A scrape is counted after it is rendered, so each scrape sees the ones before it.
    let mut conn = HttpConn::connect(server.addr());
    let request = wire::http_request("GET", "/metrics", &[], b"");
    let mut sizes = Vec::new();
    let mut scrapes = Vec::new();
    for _ in 0..3 {
        conn.send(&request);
        let response = conn.read_response();
        sizes.push(response_len(&response));
        scrapes.push(Exposition::parse(std::str::from_utf8(&response.body).expect("UTF-8")).expect("parses"));
    }
    let metrics_2xx = |e: &Exposition| {
        e.samples("ringgate_http_requests_total").filter(|s| is_metrics_2xx(s)).map(|s| s.value).sum::<f64>()
    };
    assert_eq!(metrics_2xx(&scrapes[1]) - metrics_2xx(&scrapes[0]), 1.0);
    assert_eq!(metrics_2xx(&scrapes[2]) - metrics_2xx(&scrapes[1]), 1.0);

    // Socket bytes: between two scrapes, in grows by the second request (read before it is
    // answered) and out by the first answer; an echo session in between adds its own bytes exactly.
    let mut stream = server.connect();
    let upgrade = wire::upgrade_request("/echo", "");
    stream.write_all(upgrade.as_bytes()).expect("send");
    let head = read_head(&mut stream);
    let mut client = Client::finish_upgrade_after(stream, &head);
    client.send(TEXT, b"twelve bytes");
    client.expect_frame(TEXT, b"twelve bytes");
    client.send(CLOSE, &wire::close_body(1000, b""));
    client.expect_close(1000);
    let sent_by_client = upgrade.len() + (6 + 12) + (6 + 2);
    let sent_by_server = head.len() + (2 + 12) + (2 + 2);

    let before = &scrapes[2];
    let deadline = Instant::now() + SETTLE;
    let mut previous_size = *sizes.last().expect("three scrapes");
    let mut requests_after = 0;
    let mut answers_after = 0;
    loop {
        conn.send(&request);
        let response = conn.read_response();
        requests_after += 1;
        let after = Exposition::parse(std::str::from_utf8(&response.body).expect("UTF-8")).expect("parses");
        answers_after += previous_size;
        previous_size = response_len(&response);
        let grew = |name: &str| after.sum(name) - before.sum(name);
        let want_in = (sent_by_client + requests_after * request.len()) as f64;
        let want_out = (sent_by_server + answers_after) as f64;
        let (got_in, got_out) =
            (grew("ringgate_socket_received_bytes_total"), grew("ringgate_socket_sent_bytes_total"));
        assert!(
            got_in <= want_in && got_out <= want_out,
            "in {got_in} of {want_in}, out {got_out} of {want_out}"
        );
        if got_in == want_in && got_out == want_out {
            break;
        }
        assert!(Instant::now() < deadline, "in {got_in} of {want_in}, out {got_out} of {want_out}");
        thread::sleep(Duration::from_millis(20));
    }
    // The io loop counters have no exact action; they only grow, and traffic moves them.
    let last = prom::scrape(&mut conn, "/metrics");
    for name in ["ringgate_io_loop_turns_total", "ringgate_io_events_total"] {
        assert!(last.sum(name) > before.sum(name), "{name} did not move with traffic");
    }
    for name in [
        "ringgate_io_buffer_ring_empty_total",
        "ringgate_io_cq_overflows_total",
        "ringgate_io_multishot_rearms_total",
    ] {
        assert!(last.sum(name) >= before.sum(name), "{name} went back");
    }
}

fn is_metrics_2xx(sample: &prom::Sample) -> bool {
    sample.label("endpoint") == Some("metrics") && sample.label("status") == Some("2xx")
}

/// The bytes of a response as the server wrote it (`Name: value` header lines).
fn response_len(response: &wire::HttpResponse) -> usize {
    let status_line = format!("HTTP/1.1 {} OK\r\n", response.status);
    let headers: usize = response.headers.iter().map(|(n, v)| n.len() + 2 + v.len() + 2).sum();
    status_line.len() + headers + 2 + response.body.len()
}

#[test]
fn timeouts_and_rejections_count_once() {
    // The handshake timeout is also the keep-alive idle time, so the meter cannot keep its
    // connection here: it watches only the failure family.
    let server = Server::start(&["--handshake-timeout", "200ms"]);
    let mut meter = Meter::over(&server, &["ringgate_handshake_failures_total"]);
    meter.fresh = true;
    let mut stream = server.connect();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("closed after the timeout");
    assert!(rest.is_empty(), "closed without an answer: {rest:?}");
    meter.expect("timeout", &[("ringgate_handshake_failures_total", &[("reason", "timeout")], 1.0)]);

    // Over --max-conns: 503, counted as accepted and rejected.
    let server = Server::start(&["--max-conns", "2"]);
    let mut meter = Meter::new(&server);
    let _held = server.raw_client();
    let response = wire::http_exchange(server.addr(), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(response.status, 503, "{response:?}");
    meter.expect(
        "one connection over the limit",
        &[
            ("ringgate_connections_accepted_total", &[], 2.0),
            ("ringgate_connections_rejected_total", &[], 1.0),
            ("ringgate_handshakes_completed_total", &[], 1.0),
        ],
    );
}

#[test]
fn one_slow_consumer_closed_counts_exactly_one_close() {
    // One worker: a publish's reply then counts the frames queued, not handed to another worker.
    let server = Server::start(&["--max-backpressure", "64KiB", "--workers", "1"]);
    let mut meter = Meter::new(&server);
    let mut slow = wire::slow_subscriber(server.addr(), "firehose");
    let mut http = HttpConn::connect(server.addr());
    let mut published = 0;
    let mut delivered = 0;
    loop {
        let reply = http.publish("/publish/firehose", None, &[0x5a; 1024]);
        published += 1;
        delivered += reply.subscribers;
        if reply.subscribers == 0 {
            assert!(delivered > 0, "the subscriber was closed before its first message");
            break;
        }
        assert!(published < 100_000, "never closed as slow");
    }
    // Two more: the closed subscriber is no longer on the topic.
    for _ in 0..2 {
        assert_eq!(http.publish("/publish/firehose", None, b"after").subscribers, 0);
        published += 1;
    }
    // It reads what it was sent, then the Close; it answers, and the server hangs up.
    slow.stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut received = 0u32;
    let close = loop {
        let frame = slow.read_frame();
        if frame.opcode == CLOSE {
            break frame;
        }
        received += 1;
    };
    assert_eq!(close.close_code(), Some(1008));
    assert!(i64::from(received) < delivered, "some queued frames were dropped with the subscriber");
    slow.send(CLOSE, &wire::close_body(1008, b""));
    slow.expect_eof();
    meter.expect(
        "one slow consumer",
        &[
            ("ringgate_connections_accepted_total", &[], 2.0),
            ("ringgate_handshakes_completed_total", &[], 1.0),
            ("ringgate_http_requests_total", &[("endpoint", "publish"), ("status", "2xx")], published as f64),
            ("ringgate_pubsub_published_total", &[], published as f64),
            ("ringgate_pubsub_delivered_total", &[], delivered as f64),
            // Sent: what the subscriber read before the Close (its queue was dropped with it).
            ("ringgate_messages_sent_total", &[("route", "pubsub")], f64::from(received)),
            ("ringgate_payload_sent_bytes_total", &[("route", "pubsub")], f64::from(received) * 1024.0),
            ("ringgate_slow_consumer_closes_total", &[], 1.0),
            ("ringgate_close_frames_sent_total", &[("code", "1008")], 1.0),
            ("ringgate_close_frames_received_total", &[("code", "1008")], 1.0),
        ],
    );
}

/// The history's counters (only in the exposition of a node that keeps a history, so not in the
/// list of [`every_counter_family_is_audited_here`], whose gateway keeps none).
#[test]
fn every_recovery_and_history_eviction_counts_once() {
    let server = Server::start(&["--history-size", "5", "--positions"]);
    let families = [
        "ringgate_history_recoveries_total",
        "ringgate_history_replayed_total",
        "ringgate_history_evicted_total",
    ];
    let mut meter = Meter::over(&server, &families);
    let recover = |since: &str| -> serde_json::Value {
        let mut client = Client::connect(server.addr(), &format!("/pubsub/h?since={since}"));
        let frame = client.read_frame();
        assert_eq!(frame.opcode, TEXT);
        serde_json::from_slice(&frame.payload).expect("the recovery message")
    };
    let first = recover("0:0");
    let epoch = first["epoch"].as_str().expect("epoch").to_owned();
    meter.expect(
        "a first connect without a position",
        &[("ringgate_history_recoveries_total", &[("outcome", "epoch_changed")], 1.0)],
    );
    let mut http = HttpConn::connect(server.addr());
    for i in 0..8 {
        http.publish("/publish/h", Some("text/plain"), format!("m{i}").as_bytes());
    }
    meter.expect(
        "8 published into a history of 5",
        &[("ringgate_history_evicted_total", &[("reason", "size")], 3.0)],
    );
    assert_eq!(recover(&format!("{epoch}:3"))["replayed"], 5);
    meter.expect(
        "a recovery of 5",
        &[
            ("ringgate_history_recoveries_total", &[("outcome", "recovered")], 1.0),
            ("ringgate_history_replayed_total", &[], 5.0),
        ],
    );
    assert_eq!(recover(&format!("{epoch}:1"))["reason"], "too_old");
    meter.expect(
        "a position no longer held",
        &[("ringgate_history_recoveries_total", &[("outcome", "too_old")], 1.0)],
    );
}

#[test]
fn with_the_drop_policy_every_frame_is_either_delivered_or_dropped() {
    let server = Server::start(&["--max-backpressure", "64KiB", "--slow-consumer", "drop", "--workers", "1"]);
    let _slow = wire::slow_subscriber(server.addr(), "firehose");
    let mut http = HttpConn::connect(server.addr());
    assert_eq!(http.publish("/publish/firehose", None, b"first").subscribers, 1);
    let mut meter = Meter::over(
        &server,
        &[
            "ringgate_slow_consumer_drops_total",
            "ringgate_pubsub_delivered_total",
            "ringgate_slow_consumer_closes_total",
        ],
    );
    let (mut delivered, mut dropped) = (0, 0);
    while dropped < 10 {
        if http.publish("/publish/firehose", None, &[0x5a; 1024]).subscribers == 1 {
            delivered += 1;
        } else {
            dropped += 1;
        }
        assert!(delivered < 100_000, "nothing was ever dropped");
    }
    meter.expect(
        "drops",
        &[
            ("ringgate_pubsub_delivered_total", &[], f64::from(delivered)),
            ("ringgate_slow_consumer_drops_total", &[], f64::from(dropped)),
        ],
    );
}

/// A JWT signed with `secret` (HS256) carrying `claims`.
fn token(secret: &[u8], claims: &serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret).expect("key");
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), claims, &key)
        .expect("token")
}

#[test]
fn every_token_refusal_and_token_event_counts_once() {
    const SECRET: &[u8] = b"an HS256 secret for the audit, longer than 32 bytes";
    let secret = std::env::temp_dir().join(format!("ringgate-audit-{}.secret", std::process::id()));
    std::fs::write(&secret, SECRET).expect("write the secret");
    let flags = [
        "--jwt-secret-file",
        secret.to_str().expect("UTF-8 path"),
        "--jwt-issuer",
        "audit",
        "--refused-publish",
        "drop",
    ];
    let server = Server::start(&flags);
    let mut meter = Meter::new(&server);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let claims = |extra: serde_json::Value| {
        let mut claims = serde_json::json!({
            "sub": "u1", "iss": "audit", "exp": now + 600,
            "ringgate": {"subscribe": ["news.*"], "publish": ["news.u1"]},
        });
        if let (Some(base), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
            base.extend(extra.clone());
        }
        claims
    };
    let bearer = |claims: &serde_json::Value| format!("Authorization: Bearer {}\r\n", token(SECRET, claims));
    let cases: Vec<(&str, &str, String, u16)> = vec![
        ("missing", "/echo", String::new(), 401),
        ("invalid", "/echo", "Authorization: Bearer not.a.token\r\n".into(), 401),
        ("expired", "/echo", bearer(&claims(serde_json::json!({"exp": now - 3600}))), 401),
        ("not_yet_valid", "/echo", bearer(&claims(serde_json::json!({"nbf": now + 3600}))), 401),
        ("wrong_issuer_or_audience", "/echo", bearer(&claims(serde_json::json!({"iss": "other"}))), 401),
        ("forbidden", "/pubsub/sports", bearer(&claims(serde_json::json!({}))), 403),
    ];
    for (reason, path, extra, status) in &cases {
        assert_eq!(wire::upgrade_with(server.addr(), path, extra).0.status, *status, "{reason}");
        let handshake_reason = if *reason == "forbidden" { "forbidden" } else { "unauthorized" };
        meter.expect(
            reason,
            &[
                ("ringgate_connections_accepted_total", &[], 1.0),
                ("ringgate_auth_failures_total", &[("reason", *reason)], 1.0),
                ("ringgate_handshake_failures_total", &[("reason", handshake_reason)], 1.0),
            ],
        );
    }

    // A publish the token does not grant is received (and counted so), then dropped and counted
    // as refused, not published.
    let valid = bearer(&claims(serde_json::json!({})));
    let (_, client) = wire::upgrade_with(server.addr(), "/pubsub/news.eu", &valid);
    let mut client = client.expect("news.* may be subscribed to");
    client.send(TEXT, b"not granted");
    client.send(wire::PING, b"");
    assert_eq!(client.read_frame().opcode, wire::PONG, "dropped, not closed");
    meter.expect(
        "a refused publish",
        &[
            ("ringgate_connections_accepted_total", &[], 1.0),
            ("ringgate_handshakes_completed_total", &[], 1.0),
            ("ringgate_auth_refused_publishes_total", &[], 1.0),
            ("ringgate_messages_received_total", &[("route", "pubsub")], 1.0),
            ("ringgate_payload_received_bytes_total", &[("route", "pubsub")], 11.0),
        ],
    );

    // A token that expires while connected: the connection is closed with 3000, once.
    let soon = bearer(&claims(serde_json::json!({"exp": now + 2})));
    let (_, client) = wire::upgrade_with(server.addr(), "/echo", &soon);
    let mut client = client.expect("valid for two more seconds");
    client.stream.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    assert_eq!(client.read_frame().close_code(), Some(3000));
    client.send(CLOSE, &wire::close_body(3000, b""));
    client.expect_eof();
    meter.expect(
        "a token expiry",
        &[
            ("ringgate_connections_accepted_total", &[], 1.0),
            ("ringgate_handshakes_completed_total", &[], 1.0),
            ("ringgate_auth_token_expiries_total", &[], 1.0),
            ("ringgate_close_frames_sent_total", &[("code", "other")], 1.0),
            ("ringgate_close_frames_received_total", &[("code", "other")], 1.0),
        ],
    );
}

#[test]
fn every_rate_limit_trip_and_address_refusal_counts_once() {
    let server = Server::start(&["--max-message-rate", "2", "--max-conns-per-ip", "3"]);
    let mut meter = Meter::new(&server);

    // Three messages in one write against two a second: two echoed, the third closes (1008).
    let mut client = Client::connect(server.addr(), "/echo");
    let frames: Vec<u8> = (0..3).flat_map(|_| wire::masked(TEXT, b"12345")).collect();
    client.send_raw(&frames);
    client.expect_frame(TEXT, b"12345");
    client.expect_frame(TEXT, b"12345");
    assert_eq!(client.read_frame().close_code(), Some(1008));
    client.send(CLOSE, &wire::close_body(1008, b""));
    client.expect_eof();
    meter.expect(
        "a message over the rate",
        &[
            ("ringgate_connections_accepted_total", &[], 1.0),
            ("ringgate_handshakes_completed_total", &[], 1.0),
            ("ringgate_messages_received_total", &[("route", "echo")], 3.0),
            ("ringgate_payload_received_bytes_total", &[("route", "echo")], 15.0),
            ("ringgate_messages_sent_total", &[("route", "echo")], 2.0),
            ("ringgate_payload_sent_bytes_total", &[("route", "echo")], 10.0),
            ("ringgate_rate_limited_messages_total", &[("limit", "message_rate")], 1.0),
            ("ringgate_rate_limit_closes_total", &[("limit", "message_rate")], 1.0),
            ("ringgate_close_frames_sent_total", &[("code", "1008")], 1.0),
            ("ringgate_close_frames_received_total", &[("code", "1008")], 1.0),
        ],
    );

    // The meter holds one connection from 127.0.0.1; two more fill the address's cap of three
    // once the closed one has left (the gateway lingers until the client's side closes too).
    drop(client);
    let deadline = Instant::now() + SETTLE;
    while meter.scrape().sum("ringgate_connections_open") > 1.0 {
        assert!(Instant::now() < deadline, "the closed connection did not leave");
        thread::sleep(Duration::from_millis(20));
    }
    let held: Vec<Client> = (0..2).map(|_| Client::connect(server.addr(), "/echo")).collect();
    let (refusal, _) = wire::upgrade_with(server.addr(), "/echo", "");
    assert_eq!(refusal.status, 429);
    meter.expect(
        "a connection over the address's cap",
        &[
            ("ringgate_connections_accepted_total", &[], 3.0),
            ("ringgate_handshakes_completed_total", &[], 2.0),
            ("ringgate_address_refusals_total", &[("reason", "conns_per_ip")], 1.0),
        ],
    );
    drop(held);
}

/// A stream that counts the bytes that cross it, to know exactly what TLS put on the wire.
struct Counting {
    inner: TcpStream,
    read: usize,
    written: usize,
}

impl Read for Counting {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n;
        Ok(n)
    }
}

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn every_tls_handshake_failure_and_record_byte_counts_once() {
    let dir = common::tls::temp_dir("audit-tls");
    let ca = common::tls::TestCa::new("audit CA");
    let leaf = ca.leaf(&dir, "localhost", &["localhost"]);
    let tls_port = TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
    let file = dir.join("audit.toml");
    std::fs::write(
        &file,
        format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[[listener]]\naddress = \"127.0.0.1:{tls_port}\"\n\
             tls_cert = [\"{}\"]\ntls_key = [\"{}\"]\n",
            leaf.cert_path.display(),
            leaf.key_path.display()
        ),
    )
    .expect("write the configuration");
    // The meter scrapes the plain listener (the first); the TLS one is the second.
    let server = Server::start_configured(&[], |command| {
        let args: Vec<std::ffi::OsString> = command.get_args().map(|a| a.to_os_string()).collect();
        let mut fresh = std::process::Command::new(command.get_program());
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "--listen" {
                args.next();
            } else {
                fresh.arg(arg);
            }
        }
        fresh.arg("--config").arg(&file);
        *command = fresh;
    });
    let tls_addr = SocketAddr::from(([127, 0, 0, 1], tls_port));
    let mut meter = Meter::new(&server);

    // One request over TLS 1.3: one handshake, and the record bytes the client saw, both ways.
    let tcp = TcpStream::connect(tls_addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(ca.client_config(&[]), name).expect("client");
    let mut stream = rustls::StreamOwned::new(conn, Counting { inner: tcp, read: 0, written: 0 });
    let answer =
        common::tls::exchange(&mut stream, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(answer.status, 200);
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest); // close_notify, then EOF
    let (read, written) = (stream.sock.read as f64, stream.sock.written as f64);
    drop(stream);
    meter.expect(
        "a request over TLS",
        &[
            ("ringgate_connections_accepted_total", &[], 1.0),
            ("ringgate_tls_handshakes_total", &[("version", "1.3")], 1.0),
            ("ringgate_tls_bytes_total", &[("direction", "in")], written),
            ("ringgate_tls_bytes_total", &[("direction", "out")], read),
            ("ringgate_http_requests_total", &[("endpoint", "healthz"), ("status", "2xx")], 1.0),
        ],
    );

    // Plaintext on the TLS port: refused as not TLS, with rustls' alert, then closed.
    let mut plain = TcpStream::connect(tls_addr).expect("connect");
    plain.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    plain.write_all(request).expect("send");
    let mut alert = Vec::new();
    let _ = plain.read_to_end(&mut alert);
    meter.expect(
        "plaintext on a TLS port",
        &[
            ("ringgate_connections_accepted_total", &[], 1.0),
            ("ringgate_tls_handshake_failures_total", &[("reason", "not_tls")], 1.0),
            ("ringgate_tls_bytes_total", &[("direction", "in")], request.len() as f64),
            ("ringgate_tls_bytes_total", &[("direction", "out")], alert.len() as f64),
            ("ringgate_handshake_failures_total", &[("reason", "disconnected")], 1.0),
        ],
    );
}

#[test]
fn every_counter_family_is_audited_here() {
    // A new counter family must get its step in this file: the list below is what is audited.
    const AUDITED: [&str; 39] = [
        "ringgate_connections_accepted_total",
        "ringgate_connections_rejected_total",
        "ringgate_handshakes_completed_total",
        "ringgate_handshake_failures_total",
        "ringgate_messages_received_total",
        "ringgate_messages_sent_total",
        "ringgate_payload_received_bytes_total",
        "ringgate_payload_sent_bytes_total",
        "ringgate_socket_received_bytes_total",
        "ringgate_socket_sent_bytes_total",
        "ringgate_close_frames_sent_total",
        "ringgate_close_frames_received_total",
        "ringgate_pubsub_published_total",
        "ringgate_pubsub_delivered_total",
        "ringgate_slow_consumer_closes_total",
        "ringgate_slow_consumer_drops_total",
        "ringgate_pubsub_handoff_drops_total",
        "ringgate_io_buffer_ring_empty_total",
        "ringgate_io_cq_overflows_total",
        "ringgate_io_multishot_rearms_total",
        "ringgate_io_loop_turns_total",
        "ringgate_io_events_total",
        "ringgate_http_requests_total",
        "ringgate_http_refusals_total",
        "ringgate_compression_runs_total",
        "ringgate_compressed_messages_total",
        "ringgate_compression_payload_bytes_total",
        "ringgate_upstream_connects_total",
        "ringgate_upstream_connect_failures_total",
        "ringgate_upstream_bytes_total",
        "ringgate_auth_failures_total",
        "ringgate_auth_refused_publishes_total",
        "ringgate_auth_token_expiries_total",
        "ringgate_rate_limited_messages_total",
        "ringgate_rate_limit_closes_total",
        "ringgate_address_refusals_total",
        "ringgate_tls_handshakes_total",
        "ringgate_tls_handshake_failures_total",
        "ringgate_tls_bytes_total",
    ];
    let (server, _upstream) = gateway();
    let exposition = prom::scrape(&mut HttpConn::connect(server.addr()), "/metrics");
    let counters: Vec<&str> =
        exposition.families.iter().filter(|f| f.kind == "counter").map(|f| f.name.as_str()).collect();
    for name in &counters {
        assert!(AUDITED.contains(name), "{name} is a counter with no audit step");
    }
    assert_eq!(counters.len(), AUDITED.len(), "{counters:?}");
}
