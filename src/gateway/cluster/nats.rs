//! The NATS engine (`--broker nats://HOST:PORT`): not built yet; the URL is refused at start.

use std::sync::mpsc;

use super::{Node, Outgoing};

/// Refuses NATS URLs until the engine exists.
pub(super) fn check_url(url: &str) -> Result<(), String> {
    Err(format!("broker URL '{url}': the NATS engine is not built yet; use redis://HOST:PORT"))
}

/// Never reached: [`check_url`] refuses every NATS URL.
pub(super) async fn run(
    _url: String,
    _node: Node,
    _outgoing: Outgoing,
    first: mpsc::Sender<Result<(), String>>,
) {
    let _ = first.send(Err("the NATS engine is not built yet".into()));
}
