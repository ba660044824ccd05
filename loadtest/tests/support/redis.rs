//! A `redis-server` of the test's own, for the cross-node tests: ringgate's own broker test helper
//! (`tests/common/broker.rs`), included rather than copied, so both crates start servers the same
//! way (a free loopback port, no persistence, killed when dropped, the server taken for ours only
//! once it says it is) and skip them the same way (`RINGGATE_SKIP_BROKER_TESTS=1`).

#[path = "../../../tests/common/broker.rs"]
mod broker;

use broker::{Broker, Kind};

/// Whether broker tests are to be skipped (`RINGGATE_SKIP_BROKER_TESTS=1`); says so on stderr.
pub fn skipped() -> bool {
    broker::skipped()
}

/// A running `redis-server`, killed when dropped.
pub struct Redis {
    /// `redis://127.0.0.1:PORT`, for ringgate's `--broker`.
    pub url: String,
    _server: Broker,
}

impl Redis {
    /// Starts a server on a free loopback port and waits until it answers.
    pub fn start() -> Redis {
        let server = Broker::start(Kind::Redis);
        Redis { url: server.url(), _server: server }
    }
}
