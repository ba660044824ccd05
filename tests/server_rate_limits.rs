//! Rate limits against the real binary: per-connection message and byte rates (close and drop,
//! echo and proxy routes, control frames), and per-address caps on open and new connections.
//! Clients that must count as different addresses connect from different loopback addresses
//! (127.0.0.2, 127.0.0.3, ...: all of 127.0.0.0/8 is the loopback interface on Linux).
//!
//! "Not before the rate" is shown by sending at or under it, with sleeps that can only make the
//! client slower; "at the rate" by a flood, which must get exactly one second's allowance through.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::prom::{Exposition, scrape};
use common::server::Server;
use common::wire::{self, Client, HttpConn, HttpResponse, IO_TIMEOUT};

const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

fn metrics(server: &Server) -> Exposition {
    scrape(&mut HttpConn::connect(server.addr()), "/metrics")
}

/// A TCP connection to `addr` from the loopback address `source`.
fn connect_from(addr: SocketAddr, source: [u8; 4]) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::from((source, 0)).into()).expect("bind the source address");
    socket.connect_timeout(&addr.into(), IO_TIMEOUT).expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("write timeout");
    stream
}

/// Sends an upgrade for `path` from `source`: the upgraded client, or the refusal.
fn upgrade_from(addr: SocketAddr, source: [u8; 4], path: &str) -> Result<Client, HttpResponse> {
    let mut stream = connect_from(addr, source);
    stream.write_all(wire::upgrade_request(path, "").as_bytes()).expect("send the upgrade");
    let mut head = Vec::new();
    let response = loop {
        if let Some((response, _)) = wire::parse_head(&head) {
            break response;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).expect("read the answer");
        assert!(n > 0, "EOF before an answer");
        head.extend_from_slice(&chunk[..n]);
    };
    if response.status == 101 { Ok(Client::finish_upgrade_after(stream, &head)) } else { Err(response) }
}

/// The answer must be a 429 with `Retry-After: 1`.
fn expect_429(result: Result<Client, HttpResponse>) {
    match result {
        Ok(_) => panic!("upgraded where a 429 was expected"),
        Err(response) => {
            assert_eq!(response.status, 429, "{response:?}");
            assert_eq!(response.header("Retry-After"), Some("1"), "{response:?}");
        }
    }
}

/// Reads frames until a Close: how many text frames came first, and the Close's code and reason.
fn texts_then_close(client: &mut Client) -> (usize, u16, String) {
    let mut texts = 0;
    loop {
        let frame = client.read_frame();
        match frame.opcode {
            TEXT => texts += 1,
            CLOSE => {
                let code = frame.close_code().expect("a code");
                return (texts, code, String::from_utf8_lossy(&frame.payload[2..]).into_owned());
            }
            other => panic!("unexpected frame with opcode {other}"),
        }
    }
}

/// Sends `count` text messages of `len` bytes at once (one write).
fn flood(client: &mut Client, count: usize, len: usize) {
    let payload = vec![b'x'; len];
    let frames: Vec<u8> = (0..count).flat_map(|_| wire::masked(TEXT, &payload)).collect();
    client.send_raw(&frames);
}

#[test]
fn under_the_message_rate_nothing_trips_and_a_flood_gets_one_seconds_allowance() {
    let server = Server::start(&["--max-message-rate", "100"]);
    let mut client = Client::connect(server.addr(), "/echo");
    // 150 messages at 100/s or slower (sleep only ever makes it slower): all echoed.
    for n in 0..150 {
        client.send(TEXT, format!("{n}").as_bytes());
        client.expect_frame(TEXT, format!("{n}").as_bytes());
        thread::sleep(Duration::from_millis(10));
    }
    // A full bucket again after a second of silence; a flood of 150 then gets 100 through (a
    // millisecond of refill at most adds one), and the first over the rate closes the connection.
    thread::sleep(Duration::from_millis(1100));
    flood(&mut client, 150, 10);
    let (echoed, code, reason) = texts_then_close(&mut client);
    assert!((100..=101).contains(&echoed), "{echoed} echoed before the close");
    assert_eq!((code, reason.as_str()), (1008, "rate limit exceeded"));
    client.expect_eof();

    let after = metrics(&server);
    assert_eq!(after.sum_where("ringgate_rate_limited_messages_total", "limit", "message_rate"), 1.0);
    assert_eq!(after.sum_where("ringgate_rate_limited_messages_total", "limit", "byte_rate"), 0.0);
    assert_eq!(after.sum_where("ringgate_rate_limit_closes_total", "limit", "message_rate"), 1.0);
    // Every message up to the one that went over was received; the rest came after our Close.
    let received = after.sum_where("ringgate_messages_received_total", "route", "echo");
    assert_eq!(received, 150.0 + echoed as f64 + 1.0);
}

#[test]
fn with_drop_the_messages_over_the_rate_are_discarded_and_the_connection_stays() {
    let server = Server::start(&["--max-message-rate", "10", "--rate-limit-action", "drop"]);
    let mut client = Client::connect(server.addr(), "/echo");
    flood(&mut client, 30, 5);
    let started = Instant::now();
    let mut echoed = 0;
    while echoed < 10 {
        client.expect_frame(TEXT, b"xxxxx");
        echoed += 1;
    }
    // The first message after the refill is the next thing echoed: the 20 over the rate are gone.
    thread::sleep(Duration::from_millis(300).saturating_sub(started.elapsed()));
    client.send(TEXT, b"after");
    client.expect_frame(TEXT, b"after");

    let after = metrics(&server);
    let dropped = after.sum_where("ringgate_rate_limited_messages_total", "limit", "message_rate");
    assert!((19.0..=20.0).contains(&dropped), "{dropped} dropped");
    assert_eq!(after.sum("ringgate_rate_limit_closes_total"), 0.0);
    assert_eq!(after.sum_where("ringgate_messages_received_total", "route", "echo"), 31.0);
    client.send(CLOSE, &wire::close_body(1000, b""));
    client.expect_close(1000);
}

#[test]
fn the_byte_rate_trips_at_its_allowance_and_lets_a_large_message_through_into_debt() {
    let server = Server::start(&["--max-byte-rate", "10KiB"]);
    let mut client = Client::connect(server.addr(), "/echo");
    flood(&mut client, 20, 1024);
    let (echoed, code, _) = texts_then_close(&mut client);
    assert_eq!((echoed, code), (10, 1008), "ten 1 KiB messages fill a 10 KiB/s allowance");

    // A message larger than the whole allowance passes on a full bucket, and the next is in debt.
    let mut client = Client::connect(server.addr(), "/echo");
    let large = vec![b'y'; 50 * 1024];
    client.send(TEXT, &large);
    client.expect_frame(TEXT, &large);
    client.send(TEXT, b"z");
    let (echoed, code, _) = texts_then_close(&mut client);
    assert_eq!((echoed, code), (0, 1008));

    let after = metrics(&server);
    assert_eq!(after.sum_where("ringgate_rate_limited_messages_total", "limit", "byte_rate"), 2.0);
    assert_eq!(after.sum_where("ringgate_rate_limit_closes_total", "limit", "byte_rate"), 2.0);
}

#[test]
fn pings_and_pongs_count_against_the_message_rate() {
    let server = Server::start(&["--max-message-rate", "5"]);
    let mut client = Client::connect(server.addr(), "/echo");
    client.send(PONG, b"unsolicited");
    for n in 0..4u8 {
        client.send(PING, &[n]);
        client.expect_frame(PONG, &[n]);
    }
    client.send(PING, b"over");
    let frame = client.read_frame();
    assert_eq!((frame.opcode, frame.close_code()), (CLOSE, Some(1008)), "no Pong, a Close");
    assert_eq!(
        metrics(&server).sum_where("ringgate_rate_limited_messages_total", "limit", "message_rate"),
        1.0
    );
}

#[test]
fn a_proxied_client_over_its_rate_is_closed_after_its_earlier_messages_came_back() {
    let backend = Server::start(&[]);
    let route = format!("/app=ws://{}/echo", backend.addr());
    let gateway = Server::start(&["--route", &route, "--max-message-rate", "10"]);
    let mut client = Client::connect(gateway.addr(), "/app");
    flood(&mut client, 30, 8);
    let (echoed, code, reason) = texts_then_close(&mut client);
    assert_eq!((echoed, code, reason.as_str()), (10, 1008, "rate limit exceeded"));
    let backend_received = metrics(&backend).sum_where("ringgate_messages_received_total", "route", "echo");
    assert_eq!(backend_received, 10.0, "what went over the rate was not relayed");
    let after = metrics(&gateway);
    assert_eq!(after.sum_where("ringgate_rate_limit_closes_total", "limit", "message_rate"), 1.0);
}

#[test]
fn the_per_address_cap_refuses_the_next_connection_and_frees_slots_on_close() {
    let server = Server::start(&["--max-conns-per-ip", "3"]);
    let addr = server.addr();
    let held: Vec<Client> =
        (0..3).map(|_| upgrade_from(addr, [127, 0, 0, 2], "/echo").expect("under the cap")).collect();
    expect_429(upgrade_from(addr, [127, 0, 0, 2], "/echo"));
    // Plain HTTP counts too: the cap is on connections, whatever they ask.
    let mut healthz = connect_from(addr, [127, 0, 0, 2]);
    healthz.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    assert_eq!(wire::read_response_to_eof(&mut healthz).status, 429);
    // Another address has its own cap (the workers share one table, whichever accepts).
    let others: Vec<Client> =
        (0..3).map(|_| upgrade_from(addr, [127, 0, 0, 3], "/echo").expect("its own cap")).collect();

    // Closing one frees its slot: the next upgrade from that address succeeds (once the gateway
    // has seen the close; closing is asynchronous, so it is retried for a bounded time).
    let mut held = held.into_iter();
    let mut first = held.next().expect("three held");
    first.send(CLOSE, &wire::close_body(1000, b""));
    first.expect_close(1000);
    drop(first); // the gateway lingers until the client's side is closed too
    let deadline = Instant::now() + Duration::from_secs(5);
    let replacement = loop {
        match upgrade_from(addr, [127, 0, 0, 2], "/echo") {
            Ok(client) => break client,
            Err(response) if Instant::now() < deadline => {
                assert_eq!(response.status, 429);
                thread::sleep(Duration::from_millis(20));
            }
            Err(response) => panic!("the slot was not freed: {response:?}"),
        }
    };
    let retries =
        metrics(&server).sum_where("ringgate_address_refusals_total", "reason", "conns_per_ip") - 2.0;
    expect_429(upgrade_from(addr, [127, 0, 0, 2], "/echo"));

    let after = metrics(&server);
    assert_eq!(after.sum_where("ringgate_address_refusals_total", "reason", "conns_per_ip"), 3.0 + retries);
    assert_eq!(after.sum_where("ringgate_address_refusals_total", "reason", "conn_rate_per_ip"), 0.0);
    assert_eq!(after.sum("ringgate_tracked_addresses"), 3.0, "127.0.0.2, 127.0.0.3, and the scraper");
    drop((replacement, held, others));
}

#[test]
fn the_new_connection_rate_per_address_admits_a_seconds_worth_then_refills() {
    let server = Server::start(&["--max-conn-rate-per-ip", "5"]);
    let addr = server.addr();
    // Six upgrades sent before any answer is read: they reach the gateway within milliseconds.
    let mut streams: Vec<TcpStream> = (0..6).map(|_| connect_from(addr, [127, 0, 0, 4])).collect();
    for stream in &mut streams {
        stream.write_all(wire::upgrade_request("/echo", "").as_bytes()).expect("send");
    }
    let mut statuses: Vec<u16> = streams
        .iter_mut()
        .map(|stream| {
            let mut head = Vec::new();
            loop {
                if let Some((response, _)) = wire::parse_head(&head) {
                    break response.status;
                }
                let mut chunk = [0u8; 1024];
                let n = stream.read(&mut chunk).expect("read");
                assert!(n > 0, "EOF before an answer");
                head.extend_from_slice(&chunk[..n]);
            }
        })
        .collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [101, 101, 101, 101, 101, 429]);
    upgrade_from(addr, [127, 0, 0, 5], "/echo").expect("another address has its own bucket");
    thread::sleep(Duration::from_millis(250));
    upgrade_from(addr, [127, 0, 0, 4], "/echo").expect("a fifth of a second refilled one");
    let after = metrics(&server);
    assert_eq!(after.sum_where("ringgate_address_refusals_total", "reason", "conn_rate_per_ip"), 1.0);
    assert_eq!(after.sum_where("ringgate_address_refusals_total", "reason", "conns_per_ip"), 0.0);
}

#[test]
fn limits_are_read_from_the_config_file() {
    let dir = std::env::temp_dir().join(format!("ringgate-rate-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("limits.toml");
    std::fs::write(
        &file,
        "[rate_limits]\nmax_message_rate = 3\naction = \"close\"\nmax_byte_rate = \"1MiB\"\n",
    )
    .expect("write");
    let server = Server::start(&["--config", file.to_str().expect("utf-8 path")]);
    let mut client = Client::connect(server.addr(), "/echo");
    flood(&mut client, 5, 1);
    let (echoed, code, _) = texts_then_close(&mut client);
    assert_eq!((echoed, code), (3, 1008));
}
