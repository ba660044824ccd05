//! An echo server on `fastwebsockets`, written as its `examples/echo_server.rs` writes one: hyper 1.x
//! serves the HTTP/1.1 connection `with_upgrades()`, `upgrade::upgrade` answers the handshake, and
//! each WebSocket runs in its own task (`tokio::task::unconstrained`, as the example does) behind a
//! `FragmentCollector`, which reassembles fragmented messages and validates text. The defaults
//! answer pings and close handshakes (`auto_pong`, `auto_close`). Runtime: `#[tokio::main]`, tokio's
//! multi-thread scheduler with one worker per CPU the process may run on (under `taskset -c 0`: one).
//!
//! Only for `scripts/compare.sh`; never shipped.

use std::process::ExitCode;

use fastwebsockets::{FragmentCollector, OpCode, WebSocketError, upgrade};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const NAME: &str = "peer-fastwebsockets";
const DEFAULT_LISTEN: &str = "127.0.0.1:9002";

/// Echoes data messages until the client closes; control frames are answered by the library.
async fn echo(upgraded: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = FragmentCollector::new(upgraded.await?);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
}

/// hyper's service: upgrades any path, and runs the WebSocket in a task of its own.
async fn upgrade_any_path(mut request: Request<Incoming>) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, upgraded) = upgrade::upgrade(&mut request)?;
    tokio::spawn(async move {
        if let Err(error) = tokio::task::unconstrained(echo(upgraded)).await {
            eprintln!("{NAME}: websocket: {error}");
        }
    });
    Ok(response)
}

/// Serves one HTTP/1.1 connection, upgrading it on any path.
async fn serve(stream: TcpStream) {
    let connection =
        http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(upgrade_any_path));
    if let Err(error) = connection.with_upgrades().await {
        eprintln!("{NAME}: http: {error}");
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    ringgate_peers::run(NAME, DEFAULT_LISTEN, serve).await
}
