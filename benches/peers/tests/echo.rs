//! Each peer binary starts on port 0, says where it listens, and echoes a text and a binary message
//! through an independent client (tungstenite, blocking) with their kinds intact, then closes cleanly.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use tungstenite::Message;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A running peer, killed and reaped when dropped.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bin --listen 127.0.0.1:0` and waits for its `listening on ADDR` line.
fn start(bin: &str) -> (Peer, SocketAddr) {
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let peer = Peer(child);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        // Keeps draining after the first line so the peer never blocks on a full pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(TIMEOUT).unwrap_or_else(|e| panic!("{bin} printed no listening line: {e}"));
    let addr = line
        .strip_prefix("listening on ")
        .and_then(|addr| addr.trim().parse().ok())
        .unwrap_or_else(|| panic!("{bin}: unexpected first line {line:?}"));
    (peer, addr)
}

fn echoes_text_and_binary(bin: &str) {
    let (_peer, addr) = start(bin);
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    stream.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
    let (mut ws, response) = tungstenite::client(format!("ws://{addr}/echo"), stream).expect("handshake");
    assert_eq!(response.status(), 101);

    for message in [Message::text("hello, peer"), Message::binary(vec![0u8, 1, 2, 0xff, 0xfe])] {
        ws.send(message.clone()).expect("send");
        assert_eq!(ws.read().expect("echo"), message, "{bin}");
    }
    let big = Message::binary((0..70_000u32).map(|i| i as u8).collect::<Vec<u8>>());
    ws.send(big.clone()).expect("send 70 kB");
    assert_eq!(ws.read().expect("echo 70 kB"), big, "{bin}");

    ws.close(None).expect("close");
    loop {
        match ws.read() {
            Ok(Message::Close(_)) => {}
            Ok(other) => panic!("{bin}: unexpected {other:?} after close"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(error) => panic!("{bin}: closing handshake: {error}"),
        }
    }
}

#[test]
fn fastwebsockets_echoes() {
    echoes_text_and_binary(env!("CARGO_BIN_EXE_peer-fastwebsockets"));
}

#[test]
fn tokio_tungstenite_echoes() {
    echoes_text_and_binary(env!("CARGO_BIN_EXE_peer-tokio-tungstenite"));
}
