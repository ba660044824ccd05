//! The io core's hard cases, against the real binary on whichever backend `RINGGATE_IO` picks
//! (CI runs this file on both): the receive pool run dry by many connections at once, the
//! descriptor table full, a connection that goes away while its send is in flight.
//!
//! Each test bounds its own time and count; figures are checked through `/metrics`, as an operator
//! would see them.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::prom::Exposition;
use common::server::Server;
use common::wire::{self, BINARY, HttpConn};

fn scrape(server: &Server) -> Exposition {
    let mut conn = HttpConn::connect(server.addr());
    common::prom::scrape(&mut conn, "/metrics")
}

/// The backend the server says it runs on (`ringgate_build_info{io=...}`).
fn backend(server: &Server) -> String {
    let metrics = scrape(server);
    let info = metrics.samples("ringgate_build_info").next().expect("build info");
    info.label("io").expect("io label").to_string()
}

/// Raises this process's soft open-file limit to its hard limit (the test holds thousands of
/// client sockets).
fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}

/// Waits until `metrics` satisfies `done`, at most `timeout`; returns the last scrape.
fn wait_for(server: &Server, timeout: Duration, done: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = Instant::now() + timeout;
    loop {
        let metrics = scrape(server);
        if done(&metrics) || Instant::now() >= deadline {
            return metrics;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// 10,000 connections each send one message at the same moment into a worker whose receive pool
/// has 64 buffers: the pool runs dry many times over, receives stop and are started again, and
/// every message still comes back to its own connection, byte for byte.
#[test]
fn ten_thousand_connections_sending_at_once_through_a_tiny_pool_lose_nothing() {
    const CONNS: usize = 10_000;
    let limit = raise_open_file_limit();
    assert!(limit >= CONNS as u64 + 200, "the open-file limit ({limit}) is too low for this test");
    let server = Server::start_configured(&["--workers", "1", "--max-conns", "20000"], |command| {
        command.env("RINGGATE_RECV_BUFFERS", "64");
    });
    let upgrade = wire::upgrade_request("/echo", "");
    let mut clients = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        let mut stream = TcpStream::connect(server.addr()).expect("connect");
        stream.write_all(upgrade.as_bytes()).expect("send upgrade");
        clients.push(stream);
    }
    for stream in &mut clients {
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).expect("upgrade answer");
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    }
    // Every frame is written before any echo is read: they all wait in the sockets together.
    let payload = |i: usize| format!("message of connection {i:05} {}", "x".repeat(i % 300)).into_bytes();
    for (i, stream) in clients.iter_mut().enumerate() {
        stream.write_all(&wire::masked(BINARY, &payload(i))).expect("send");
    }
    for (i, stream) in clients.iter_mut().enumerate() {
        let expected = payload(i);
        let mut header = [0u8; 2];
        stream.read_exact(&mut header).expect("echo header");
        let len = match header[1] {
            126 => {
                let mut ext = [0u8; 2];
                stream.read_exact(&mut ext).expect("length");
                usize::from(u16::from_be_bytes(ext))
            }
            n => usize::from(n),
        };
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).expect("echo body");
        assert_eq!((header[0], body), (0x80 | BINARY, expected), "connection {i} got another's echo");
    }
    let metrics = scrape(&server);
    if backend(&server) == "uring" {
        let empty = metrics.sum("ringgate_io_buffer_ring_empty_total");
        let rearms = metrics.sum("ringgate_io_multishot_rearms_total");
        eprintln!("buffer ring ran dry {empty} times; {rearms} receives started again");
        assert!(empty > 0.0, "64 buffers for 10,000 connections never ran dry?");
        assert!(rearms >= empty, "every receive the kernel ended was started again");
    }
    assert_eq!(metrics.sum("ringgate_messages_received_total"), CONNS as f64);
    drop(clients);
}

/// With its descriptor table full, the gateway backs off accepting (saying so), keeps serving the
/// connections it has, and accepts again once descriptors are free.
#[test]
fn a_full_descriptor_table_backs_off_and_recovers() {
    let server = Server::start_configured(&["--workers", "1"], |command| {
        // SAFETY: setrlimit in the child before exec touches only the child's own limits.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit { rlim_cur: 64, rlim_max: 64 };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let mut served = server.raw_client();
    // Far more connections than descriptors: those beyond the limit wait in the listen queue.
    let hogs: Vec<TcpStream> =
        (0..120).map(|_| TcpStream::connect(server.addr()).expect("connect")).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.stderr().contains("out of file descriptors") {
        assert!(Instant::now() < deadline, "no warning about descriptors; stderr:\n{}", server.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The connection it already had is still served.
    served.send(BINARY, b"still here");
    served.expect_frame(BINARY, b"still here");
    drop(hogs);
    // Once the hogs are gone, new connections are accepted and served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = TcpStream::connect(server.addr()).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        stream.write_all(wire::upgrade_request("/echo", "").as_bytes()).expect("send");
        let mut answer = [0u8; 12];
        match stream.read_exact(&mut answer) {
            Ok(()) if &answer == b"HTTP/1.1 101" => break,
            other => {
                assert!(Instant::now() < deadline, "not accepting again: {other:?} {answer:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    assert!(!server.stderr().contains("panicked"), "{}", server.stderr());
}

/// A client that stops reading gets a send stuck in flight; when it then vanishes (a reset), the
/// send fails, the connection's slot and its queued bytes are given back, and the gateway goes on.
#[test]
fn a_connection_reset_while_its_send_is_in_flight_gives_everything_back() {
    let server = Server::start(&["--workers", "1", "--max-backpressure", "256KiB"]);
    let mut stuck = server.raw_client();
    stuck.stream.set_write_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let message = wire::masked(BINARY, &vec![7u8; 64 * 1024]);
    // Write until the gateway stops reading: its echoes fill our receive buffer and its send
    // buffer, and a send of its own is waiting in the kernel.
    let mut written = 0usize;
    loop {
        match stuck.stream.write(&message) {
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("write failed: {e}"),
        }
        assert!(written < 512 << 20, "the gateway never pushed back");
    }
    let queued = scrape(&server).sum("ringgate_outbound_queue_bytes");
    assert!(queued > 0.0, "nothing is waiting to be sent");
    // Reset: SO_LINGER 0 then close sends RST instead of FIN.
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt reads the struct we own, on a socket we own.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            stuck.stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stuck);
    // Only the scrape's own connection stays open, and nothing is queued any more.
    let metrics = wait_for(&server, Duration::from_secs(10), |m| {
        m.sum("ringgate_connections_open") == 1.0 && m.sum("ringgate_outbound_queue_bytes") == 0.0
    });
    assert_eq!(metrics.sum("ringgate_connections_open"), 1.0, "the reset connection's slot is still held");
    assert_eq!(metrics.sum("ringgate_outbound_queue_bytes"), 0.0, "its queued bytes are still counted");
    let mut next = server.raw_client();
    next.send(BINARY, b"after");
    next.expect_frame(BINARY, b"after");
    let _ = next.stream.shutdown(Shutdown::Both);
}

/// With a coalescing wait, a lone client is still answered (after at most the wait), and a burst
/// is too: the wait batches wake-ups, it never holds a completion back for longer.
#[test]
fn a_coalescing_wait_delays_nothing_beyond_itself() {
    let server = Server::start(&["--coalesce-wait", "2ms"]);
    let mut client = server.raw_client();
    for round in 0..20u8 {
        let started = Instant::now();
        client.send(BINARY, &[round; 10]);
        client.expect_frame(BINARY, &[round; 10]);
        // Generous for a loaded CI machine; a completion held until some later event would take
        // seconds (the next timer), not milliseconds.
        assert!(started.elapsed() < Duration::from_millis(500), "round {round}: {:?}", started.elapsed());
    }
}
