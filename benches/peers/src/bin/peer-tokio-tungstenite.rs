//! An echo server on `tokio-tungstenite`, written as its `examples/echo-server.rs` writes one: each
//! accepted TCP stream gets a task that runs `accept_async` (any path), splits the WebSocket and
//! forwards every text and binary message from the read half into the write half (tungstenite
//! answers pings and the close handshake itself). Runtime: `#[tokio::main]`, tokio's multi-thread
//! scheduler with one worker per CPU the process may run on (under `taskset -c 0`: one).
//!
//! Only for `scripts/compare.sh`; never shipped.

use std::process::ExitCode;

use futures_util::{StreamExt, TryStreamExt, future};
use tokio::net::{TcpListener, TcpStream};

const NAME: &str = "peer-tokio-tungstenite";
const DEFAULT_LISTEN: &str = "127.0.0.1:9003";

/// Handshakes, then echoes data messages until the client closes.
async fn echo(stream: TcpStream) {
    let ws = match tokio_tungstenite::accept_async(stream).await {
        Ok(ws) => ws,
        Err(error) => {
            eprintln!("{NAME}: handshake: {error}");
            return;
        }
    };
    let (write, read) = ws.split();
    // Only data messages are echoed; pings, pongs and the close are the library's.
    let forwarded = read
        .try_filter(|message| future::ready(message.is_text() || message.is_binary()))
        .forward(write)
        .await;
    if let Err(error) = forwarded {
        eprintln!("{NAME}: websocket: {error}");
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let addr = match ringgate_peers::listen_addr(NAME, DEFAULT_LISTEN) {
        Ok(addr) => addr,
        Err(code) => return code,
    };
    ringgate_peers::raise_nofile_limit();
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("{NAME}: cannot listen on {addr}: {error}");
            return ExitCode::FAILURE;
        }
    };
    ringgate_peers::announce(listener.local_addr().unwrap_or(addr));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(echo(stream));
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning; the client sees the refusals.
                eprintln!("{NAME}: accept: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}
