//! Proxy routes against real processes over loopback: a gateway in front of a second ringgate's
//! `/echo` and of a `tungstenite` test server (std threads) that records what it was sent.

mod common;

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::prom::Exposition;
use common::server::Server;
use common::wire::{self, HttpConn};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::server::{Request, Response};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// What the test upstream does with a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Upgrade (choosing the first offered subprotocol), echo messages; "please close" makes it close
    /// with 4002 "as asked".
    Echo,
    /// Accept TCP and never answer.
    Silent,
    /// Upgrade, then never read again.
    Stall,
    /// Upgrade, then close TCP without a word.
    Vanish,
    /// Upgrade, then send 64 KiB messages as fast as the gateway takes them.
    Flood,
}

/// One upgrade the test upstream saw.
#[derive(Clone, Debug, Default)]
struct Seen {
    target: String,
    headers: Vec<(String, String)>,
    close: Option<(u16, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A tungstenite WebSocket server on its own threads.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    fn start(mode: Mode) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = Arc::clone(&seen);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let record = Arc::clone(&record);
                thread::spawn(move || serve_upstream(stream, mode, record));
            }
        });
        Upstream { addr, seen }
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }

    fn connections(&self) -> usize {
        self.seen.lock().expect("seen lock").len()
    }
}

// tungstenite's callback type returns its large `ErrorResponse` by value.
#[allow(clippy::result_large_err)]
fn serve_upstream(stream: TcpStream, mode: Mode, record: Arc<Mutex<Vec<Seen>>>) {
    if mode == Mode::Silent {
        record.lock().expect("seen lock").push(Seen::default());
        thread::sleep(Duration::from_secs(30));
        drop(stream);
        return;
    }
    let slot = Arc::new(Mutex::new(None::<usize>));
    let slot_in = Arc::clone(&slot);
    let record_in = Arc::clone(&record);
    let callback = move |request: &Request, mut response: Response| {
        let headers = request
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let target = request.uri().path_and_query().map_or("/".to_string(), |p| p.as_str().to_string());
        if let Some(offer) = request.headers().get("Sec-WebSocket-Protocol") {
            let first = offer.to_str().unwrap_or("").split(',').next().unwrap_or("").trim().to_string();
            response.headers_mut().insert("Sec-WebSocket-Protocol", first.parse().expect("header value"));
        }
        let mut seen = record_in.lock().expect("seen lock");
        seen.push(Seen { target, headers, close: None });
        *slot_in.lock().expect("slot") = Some(seen.len() - 1);
        Ok(response)
    };
    let Ok(mut ws) = tungstenite::accept_hdr(stream, callback) else { return };
    let index = slot.lock().expect("slot").expect("recorded");
    match mode {
        Mode::Stall => {
            thread::sleep(Duration::from_secs(30));
            return;
        }
        Mode::Vanish => return,
        Mode::Flood => {
            let message = Message::binary(vec![0xa5; 64 * 1024]);
            while ws.send(message.clone()).is_ok() {}
            return;
        }
        _ => {}
    }
    loop {
        match ws.read() {
            Ok(Message::Text(text)) if text.as_str() == "please close" => {
                let frame = CloseFrame { code: CloseCode::from(4002), reason: "as asked".into() };
                let _ = ws.close(Some(frame));
            }
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                if ws.send(message).is_err() {
                    return;
                }
            }
            Ok(Message::Close(frame)) => {
                let close = frame.map(|f| (u16::from(f.code), f.reason.as_str().to_string()));
                record.lock().expect("seen lock")[index].close = close;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// A loopback port with nothing listening on it.
fn dead_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

fn client(gateway: &Server, path: &str) -> WebSocket<TcpStream> {
    gateway.ws_client(path)
}

fn echo_once(ws: &mut WebSocket<TcpStream>, text: &str) {
    ws.send(Message::text(text)).expect("send");
    assert_eq!(ws.read().expect("echo"), Message::text(text));
}

fn expect_close(ws: &mut WebSocket<TcpStream>) -> (u16, String) {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => {
                return (u16::from(frame.code), frame.reason.as_str().to_string());
            }
            Ok(Message::Close(None)) => return (1005, String::new()),
            Ok(_) => continue,
            Err(error) => panic!("expected a Close, got {error}"),
        }
    }
}

fn http_status(gateway: &Server, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let mut stream = gateway.connect();
    stream.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    stream.write_all(wire::upgrade_request(path, "").as_bytes()).expect("send request");
    let response = wire::read_response_to_eof(&mut stream);
    (response.status, started.elapsed())
}

fn scrape(gateway: &Server) -> Exposition {
    let mut conn = HttpConn::connect(gateway.addr());
    common::prom::scrape(&mut conn, "/metrics")
}

/// A gateway whose `/app` route has two upstreams: a ringgate at `backend_path`, then a recording
/// echo server. Returns (backend, recorder, gateway), to be kept alive together.
fn gateway_over_ringgate_and_recorder(backend_path: &str) -> (Server, Upstream, Server) {
    let backend = Server::start(&[]);
    let recorder = Upstream::start(Mode::Echo);
    let route = format!("/app=ws://{}{backend_path},{}", backend.addr(), recorder.url());
    let gateway = Server::start(&["--route", &route]);
    (backend, recorder, gateway)
}

#[test]
fn round_robin_over_a_ringgate_and_a_tungstenite_upstream() {
    let (_backend, recorder, gateway) = gateway_over_ringgate_and_recorder("/echo");
    let mut pattern = Vec::new();
    for i in 0..6 {
        let before = recorder.connections();
        let mut ws = client(&gateway, "/app");
        echo_once(&mut ws, &format!("message {i}"));
        ws.close(None).expect("close");
        let _ = expect_close(&mut ws);
        pattern.push(recorder.connections() > before);
    }
    assert!(pattern.windows(2).all(|w| w[0] != w[1]), "not alternating: {pattern:?}");
    assert_eq!(recorder.connections(), 3);
    for seen in recorder.seen() {
        assert_eq!(seen.target, "/");
    }
    let metrics = scrape(&gateway);
    assert_eq!(metrics.sum_where("ringgate_upstream_connects_total", "route", "/app"), 6.0);
    assert!(metrics.sum_where("ringgate_upstream_bytes_total", "direction", "to_client") > 0.0);
    // Relayed messages count on the proxy route, both ways, like any other route's.
    let payload: f64 = (0..6).map(|i| format!("message {i}").len() as f64).sum();
    assert_eq!(metrics.sum_where("ringgate_messages_received_total", "route", "proxy"), 6.0);
    assert_eq!(metrics.sum_where("ringgate_messages_sent_total", "route", "proxy"), 6.0);
    assert_eq!(metrics.sum_where("ringgate_payload_received_bytes_total", "route", "proxy"), payload);
    assert_eq!(metrics.sum_where("ringgate_payload_sent_bytes_total", "route", "proxy"), payload);
    assert_eq!(metrics.sum_where("ringgate_messages_received_total", "route", "echo"), 0.0);
}

#[test]
fn identity_credentials_subprotocols_path_and_query_go_upstream() {
    let recorder = Upstream::start(Mode::Echo);
    let route = format!("/app={}", recorder.url());
    let gateway = Server::start(&["--route", &route]);
    let url = format!("ws://{}/app/x/y?q=1&r=2", gateway.addr());
    let mut request = url.into_client_request().expect("request");
    for (name, value) in [
        ("Sec-WebSocket-Protocol", "chat, superchat"),
        ("Cookie", "session=abc"),
        ("Authorization", "Bearer t0k3n"),
        ("Origin", "http://site.example"),
        ("X-Forwarded-For", "10.9.9.9"),
        ("User-Agent", "not-forwarded"),
    ] {
        request.headers_mut().insert(name, value.parse().expect("header"));
    }
    let (mut ws, response) = tungstenite::client::client(request, gateway.connect()).expect("upgrade");
    assert_eq!(
        response.headers().get("Sec-WebSocket-Protocol").map(|v| v.to_str().expect("ascii")),
        Some("chat")
    );
    echo_once(&mut ws, "hello");
    let seen = recorder.seen().pop().expect("one upgrade");
    assert_eq!(seen.target, "/x/y?q=1&r=2");
    assert_eq!(seen.header("X-Forwarded-For"), Some("10.9.9.9, 127.0.0.1"));
    assert_eq!(seen.header("X-Forwarded-Proto"), Some("http"));
    assert_eq!(seen.header("X-Forwarded-Host"), Some(gateway.addr().to_string().as_str()));
    assert_eq!(seen.header("Cookie"), Some("session=abc"));
    assert_eq!(seen.header("Authorization"), Some("Bearer t0k3n"));
    assert_eq!(seen.header("Origin"), Some("http://site.example"));
    assert_eq!(seen.header("Sec-WebSocket-Protocol"), Some("chat, superchat"));
    assert_eq!(seen.header("User-Agent"), None);
    assert_eq!(seen.header("Host"), Some(recorder.addr.to_string().as_str()));

    // The query alone: the upstream sees `/?q`.
    let mut ws = client(&gateway, "/app?only=query");
    echo_once(&mut ws, "again");
    assert_eq!(recorder.seen().pop().expect("second").target, "/?only=query");
    // Not a segment boundary: no route.
    let (status, _) = http_status(&gateway, "/apple");
    assert_eq!(status, 404);
}

#[test]
fn closes_are_relayed_with_code_and_reason_both_ways() {
    let recorder = Upstream::start(Mode::Echo);
    let route = format!("/app={}", recorder.url());
    let gateway = Server::start(&["--route", &route]);

    let mut ws = client(&gateway, "/app");
    echo_once(&mut ws, "before");
    ws.close(Some(CloseFrame { code: CloseCode::from(4001), reason: "bye now".into() })).expect("close");
    assert_eq!(expect_close(&mut ws).0, 4001);
    let deadline = Instant::now() + Duration::from_secs(5);
    while recorder.seen()[0].close.is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(recorder.seen()[0].close, Some((4001, "bye now".to_string())));

    let mut ws = client(&gateway, "/app");
    ws.send(Message::text("please close")).expect("send");
    assert_eq!(expect_close(&mut ws), (4002, "as asked".to_string()));

    // Pings are answered by the gateway.
    let mut raw = wire::Client::connect(gateway.addr(), "/app");
    raw.send(wire::PING, b"are you there");
    raw.expect_frame(wire::PONG, b"are you there");
}

#[test]
fn an_upstream_that_dies_mid_stream_gives_the_client_1011() {
    let backend = Server::start(&[]);
    let route = format!("/app=ws://{}/echo", backend.addr());
    let gateway = Server::start(&["--route", &route]);
    let mut ws = client(&gateway, "/app");
    echo_once(&mut ws, "alive");
    drop(backend); // SIGKILL
    assert_eq!(expect_close(&mut ws).0, 1011);
}

#[test]
fn a_dead_upstream_is_skipped_and_all_dead_is_502() {
    let recorder = Upstream::start(Mode::Echo);
    let dead = dead_port();
    let route = format!("/app=ws://{dead},{}", recorder.url());
    let all_dead = format!("/none=ws://{dead},ws://{}", dead_port());
    let gateway = Server::start(&["--route", &route, "--route", &all_dead]);
    for i in 0..4 {
        let mut ws = client(&gateway, "/app");
        echo_once(&mut ws, &format!("via the live one {i}"));
    }
    assert_eq!(recorder.connections(), 4);
    let (status, _) = http_status(&gateway, "/none");
    assert_eq!(status, 502);
    let (status, _) = http_status(&gateway, "/none");
    assert_eq!(status, 502, "both marked down now");
    let metrics = scrape(&gateway);
    assert!(metrics.sum_where("ringgate_upstream_connect_failures_total", "route", "/app") >= 1.0);
    assert!(metrics.sum_where("ringgate_upstream_connect_failures_total", "route", "/none") >= 2.0);
    let unavailable =
        metrics.sum_where("ringgate_handshake_failures_total", "reason", "upstream_unavailable");
    assert_eq!(unavailable, 2.0);
    // An upstream that answers the upgrade with something else than 101 (here a 404): 502.
    drop(gateway);
    let backend = Server::start(&[]);
    let route = format!("/app=ws://{}/no-such-route", backend.addr());
    let gateway = Server::start(&["--route", &route]);
    assert_eq!(http_status(&gateway, "/app").0, 502);
}

/// Upgrades through the gateway: the socket on a 101, the status of any other answer.
fn try_upgrade(gateway: &Server, path: &str) -> Result<WebSocket<TcpStream>, u16> {
    let url = format!("ws://{}{path}", gateway.addr());
    match tungstenite::client::client(url, gateway.connect()) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        Err(error) => panic!("upgrade through the gateway: {error}"),
    }
}

#[test]
fn an_upstream_that_refuses_the_upgrade_is_skipped_like_a_dead_one() {
    // A live ringgate at a path it has no route for answers the upgrade with 404: TCP works, the
    // upgrade does not. The one client sent there gets a 502 and the upstream is marked down, so
    // the next clients all go to the healthy one. (Were a TCP connect enough to count as healthy,
    // round-robin would send every other client to the broken one.)
    let (_broken, recorder, gateway) = gateway_over_ringgate_and_recorder("/no-such-route");
    let results: Vec<Result<(), u16>> = (0..6)
        .map(|i| try_upgrade(&gateway, "/app").map(|mut ws| echo_once(&mut ws, &format!("message {i}"))))
        .collect();
    assert_eq!(results.iter().filter(|r| **r == Err(502)).count(), 1, "{results:?}");
    assert_eq!(recorder.connections(), 5);
}

#[test]
fn an_upstream_that_never_answers_the_upgrade_gives_504_in_time() {
    let silent = Upstream::start(Mode::Silent);
    let route = format!("/app={}", silent.url());
    let gateway = Server::start(&["--route", &route, "--upstream-timeout", "1s"]);
    let (status, elapsed) = http_status(&gateway, "/app");
    assert_eq!(status, 504);
    let timeouts =
        scrape(&gateway).sum_where("ringgate_handshake_failures_total", "reason", "upstream_timeout");
    assert_eq!(timeouts, 1.0);
    assert!(elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4), "{elapsed:?}");
}

#[test]
fn a_stalled_upstream_stalls_the_client_not_the_gateways_memory() {
    let stalled = Upstream::start(Mode::Stall);
    let route = format!("/app={}", stalled.url());
    let gateway = Server::start(&["--route", &route]);
    let rss_before = gateway.rss_kib();
    let mut raw = wire::Client::connect(gateway.addr(), "/app");
    let stream = &mut raw.stream;
    stream.set_write_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let frame = wire::masked(wire::BINARY, &vec![0x5a; 64 * 1024]);
    let limit = 256usize << 20;
    let mut sent = 0usize;
    let stalled_at = loop {
        match stream.write(&frame) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break sent,
            Err(e) => panic!("write failed: {e}"),
        }
        assert!(sent < limit, "the gateway kept reading {sent} bytes for an upstream that does not read");
    };
    let rss_after = gateway.rss_kib();
    let growth = rss_after.saturating_sub(rss_before);
    eprintln!("stalled after {stalled_at} bytes; gateway RSS {rss_before} -> {rss_after} KiB");
    assert!(growth < 24 * 1024, "gateway RSS grew by {growth} KiB (stalled after {stalled_at} bytes)");
    // Held back, not given up on: the relay is still open (no Close, no EOF for the client).
    raw.stream.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    match raw.try_read_frame() {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected the relay to wait for the upstream, got {other:?}"),
    }
    let open = scrape(&gateway).sum("ringgate_upstream_relays_open");
    assert_eq!(open, 1.0);
}

#[test]
fn an_upstream_that_hangs_up_without_a_word_gives_1014() {
    let vanishing = Upstream::start(Mode::Vanish);
    let route = format!("/app={}", vanishing.url());
    let gateway = Server::start(&["--route", &route]);
    // A raw client: tungstenite does not know 1014 (registered after RFC 6455) and reports 1002.
    let mut raw = wire::Client::connect(gateway.addr(), "/app");
    let close = raw.read_frame();
    assert_eq!((close.opcode, close.close_code()), (wire::CLOSE, Some(1014)), "{close:?}");
}

#[test]
fn draining_closes_the_client_with_1001_and_the_upstream_too() {
    let recorder = Upstream::start(Mode::Echo);
    let route = format!("/app={}", recorder.url());
    let mut gateway = Server::start(&["--route", &route]);
    let mut ws = client(&gateway, "/app");
    echo_once(&mut ws, "before the drain");
    gateway.sigterm();
    assert_eq!(expect_close(&mut ws).0, 1001);
    while ws.read().is_ok() {} // sends our Close answer, then sees the end
    let status = gateway.wait_exit(Duration::from_secs(8)).expect("the gateway exits after draining");
    assert!(status.success(), "{status:?}");
    assert_eq!(recorder.seen()[0].close.as_ref().map(|c| c.0), Some(1001));
}

#[test]
fn an_idle_client_is_pinged_then_closed_even_if_the_upstream_answers_pings() {
    let recorder = Upstream::start(Mode::Echo);
    let route = format!("/app={}", recorder.url());
    let gateway = Server::start(&["--route", &route, "--idle-timeout", "1s"]);
    let started = Instant::now();
    let mut raw = wire::Client::connect(gateway.addr(), "/app");
    let ping = raw.read_frame();
    assert_eq!(ping.opcode, wire::PING, "{ping:?}");
    let close = raw.read_frame();
    assert_eq!((close.opcode, close.close_code()), (wire::CLOSE, Some(1001)), "{close:?}");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    raw.send(wire::CLOSE, &wire::close_body(1001, b""));
    raw.expect_eof();
}

#[test]
fn a_client_that_stops_reading_stalls_the_upstream_not_the_gateways_memory() {
    let flood = Upstream::start(Mode::Flood);
    let route = format!("/app={}", flood.url());
    let gateway = Server::start(&["--route", &route]);
    let rss_before = gateway.rss_kib();
    let raw = wire::Client::connect(gateway.addr(), "/app");
    let mut samples = Vec::new();
    for _ in 0..6 {
        thread::sleep(Duration::from_millis(500));
        samples.push(gateway.rss_kib());
    }
    let growth = samples.iter().max().copied().unwrap_or(0).saturating_sub(rss_before);
    let relayed = scrape(&gateway).sum_where("ringgate_upstream_bytes_total", "direction", "to_client");
    assert!(relayed > 0.0, "nothing relayed");
    assert!(
        relayed < (64 << 20) as f64,
        "the gateway kept relaying ({relayed} bytes) to a client that does not read"
    );
    assert!(growth < 24 * 1024, "gateway RSS grew by {growth} KiB: {rss_before} -> {samples:?}");
    drop(raw);
}

#[test]
fn an_upstream_that_never_completes_the_tcp_handshake_gives_504_in_time() {
    // A listener whose accept queue is full drops further SYNs: connects to it hang.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind");
    socket.listen(0).expect("listen");
    let addr = socket.local_addr().expect("addr").as_socket().expect("inet");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let filler =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        filler.set_nonblocking(true).expect("nonblocking");
        let _ = filler.connect(&addr.into());
        fillers.push(filler);
    }
    thread::sleep(Duration::from_millis(100));
    let route = format!("/app=ws://{addr}");
    let gateway = Server::start(&["--route", &route, "--upstream-timeout", "1s"]);
    let (status, elapsed) = http_status(&gateway, "/app");
    assert_eq!(status, 504);
    assert!(elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4), "{elapsed:?}");
    // The timed-out connect marked it down: the next client gets a fast 502.
    let (status, elapsed) = http_status(&gateway, "/app");
    assert_eq!(status, 502);
    assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");
    drop(socket);
}
