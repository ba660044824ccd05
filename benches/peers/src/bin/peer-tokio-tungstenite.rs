//! An echo server on `tokio-tungstenite`, written as its `examples/echo-server.rs` writes one: each
//! accepted TCP stream gets a task that runs `accept_async` (any path), splits the WebSocket and
//! forwards every text and binary message from the read half into the write half (tungstenite
//! answers pings and the close handshake itself). Runtime: `#[tokio::main]`, tokio's multi-thread
//! scheduler with one worker per CPU the process may run on (under `taskset -c 0`: one).
//!
//! Only for `scripts/compare.sh`; never shipped.

use std::process::ExitCode;

use futures_util::{StreamExt, TryStreamExt, future};
use tokio::net::TcpStream;

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
    ringgate_peers::run(NAME, DEFAULT_LISTEN, echo).await
}
