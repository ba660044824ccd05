//! Connections as state machines: what a socket's bytes mean, and what to send back, with no I/O.
//!
//! A worker keeps one [`Machine`] per connection in its slab and drives it with the quinn-proto
//! taxonomy: `handle_*` methods take what happened (bytes received, a send finished, a timer, a
//! drain), `poll_*` and `wants_*` methods say what the machine wants done next (bytes to send,
//! input wanted or not, a FIN, an upstream to connect). The worker's loop asks them after every
//! turn and turns the answers into backend operations; neither this module nor anything it calls
//! knows whether io_uring or epoll runs it.
//!
//! A machine is a [`Client`] (the upgrade request, plain HTTP, echo and pub/sub sessions) until a
//! request routes to a proxy, when it becomes a [`Relay`] (boxed: only proxied connections pay for
//! the second socket's state).
//!
//! Must never: block, perform I/O, or keep a pointer to the worker (the context is lent per call).

mod client;
mod relay;

use std::io;
use std::net::{IpAddr, SocketAddr};

pub use client::Client;
pub use relay::Relay;

use super::clock::Millis;
use super::context::WorkerContext;
use super::outgoing::Outgoing;
use super::token::Side;
use crate::gateway::address_limits::AddressRefusal;
use crate::gateway::rate_limit::{MessageBudget, RateLimitAction};

/// How long we wait for the peer's Close after sending ours.
pub const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long we keep reading after our FIN, so the peer reads our last bytes before the socket goes.
pub const LINGER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps the worker's gauge of per-connection decompressors in step with one side's assembler;
/// `counted` is that side's record of whether it is in the gauge.
fn count_inflater(assembler: &crate::proto::message::Assembler, counted: &mut bool, cx: &Cx<'_>) {
    let holds = assembler.holds_inflater();
    if holds != *counted {
        *counted = holds;
        cx.ctx.stats.compression.inflaters_add(if holds { 1 } else { -1 });
    }
}

/// When a connection whose token expires at `expires` (Unix seconds) must next look at it: then,
/// or in a day at most, since the worker's clock counts milliseconds in 32 bits.
fn token_deadline(expires: u64, cx: &Cx<'_>) -> Millis {
    let left = expires.saturating_sub(crate::gateway::auth::unix_now()).min(86_400);
    cx.now.after(std::time::Duration::from_secs(left))
}

/// What a client over one of its rates gets (`--rate-limit-action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OverRate {
    /// The message is discarded.
    Drop,
    /// The connection closes with 1008.
    Close,
}

/// Charges a client's message or control frame of `cost` payload bytes to its `budget`; one
/// over a rate is counted, and the caller drops it or closes as the answer says.
fn charge(budget: &mut MessageBudget, cost: usize, cx: &Cx<'_>) -> Result<(), OverRate> {
    let rates = &cx.ctx.rates;
    let Err(limit) = budget.spend(cost, rates) else {
        return Ok(());
    };
    let close = rates.action == RateLimitAction::Close;
    cx.ctx.stats.rate_limited(limit, close);
    Err(if close { OverRate::Close } else { OverRate::Drop })
}

/// What a machine is lent for one call.
pub struct Cx<'a> {
    /// The worker's shared state.
    pub ctx: &'a WorkerContext,
    /// The worker's clock at the start of this loop turn.
    pub now: Millis,
    /// The connection's own token (what pub/sub wake-ups name).
    pub owner: u64,
    /// The client's address, looked up only when a proxy needs it (`X-Forwarded-For`).
    pub peer_ip: &'a dyn Fn() -> Option<IpAddr>,
    /// The client came in over TLS (`X-Forwarded-Proto: https` to a proxy's upstream).
    pub secure: bool,
}

/// One connection's state machine.
#[expect(
    clippy::large_enum_variant,
    reason = "the client is nearly every connection and lives inline in the slab: boxing it would \
              add an allocation and a pointer per connection to save bytes on the rare relay"
)]
pub enum Machine {
    /// The client socket only.
    Client(Client),
    /// A proxied client and its upstream.
    Relay(Box<Relay>),
}

impl Machine {
    /// A freshly accepted connection, waiting for its request.
    pub fn accepted(cx: &Cx<'_>) -> Machine {
        Machine::Client(Client::new(cx))
    }

    /// A connection over `--max-conns`: answered 503 without reading its request.
    pub fn over_capacity(cx: &Cx<'_>) -> Machine {
        let body = "the gateway is at its connection limit; retry shortly\n";
        Machine::Client(Client::refused(503, body, cx))
    }

    /// A connection over its address's limits: answered 429 (RFC 6585) without reading its
    /// request.
    pub fn over_address_limit(refusal: AddressRefusal, cx: &Cx<'_>) -> Machine {
        let body = match refusal {
            AddressRefusal::TooManyConnections => "too many connections from this address\n",
            AddressRefusal::TooManyNewConnections => "too many new connections from this address\n",
        };
        Machine::Client(Client::refused(429, body, cx))
    }

    /// Bytes arrived on `side`, in a buffer the backend lends: processed in place.
    pub fn handle_data(&mut self, side: Side, data: &mut [u8], cx: &Cx<'_>) {
        match self {
            Machine::Client(client) if side == Side::Client => client.handle_data(data, cx),
            Machine::Client(client) => client.handle_stray(side),
            Machine::Relay(relay) => relay.handle_data(side, data, cx),
        }
    }

    /// The peer of `side` closed its sending side.
    pub fn handle_eof(&mut self, side: Side, cx: &Cx<'_>) {
        match self {
            Machine::Client(client) if side == Side::Client => client.handle_eof(cx),
            Machine::Client(client) => client.handle_stray(side),
            Machine::Relay(relay) => relay.handle_eof(side, cx),
        }
    }

    /// The socket of `side` failed.
    pub fn handle_error(&mut self, side: Side, error: &io::Error, cx: &Cx<'_>) {
        match self {
            Machine::Client(client) if side == Side::Client => client.handle_error(error, cx),
            Machine::Client(client) => client.handle_stray(side),
            Machine::Relay(relay) => relay.handle_error(side, error, cx),
        }
    }

    /// A send on `side` finished; `out` is what was being sent. Returns what is left of it to send
    /// before anything else (a short write).
    pub fn handle_sent(
        &mut self,
        side: Side,
        result: io::Result<usize>,
        out: Outgoing,
        cx: &Cx<'_>,
    ) -> Option<Outgoing> {
        match self {
            Machine::Client(client) => client.handle_sent(result, out, cx),
            Machine::Relay(relay) => relay.handle_sent(side, result, out, cx),
        }
    }

    /// The upstream connect finished.
    pub fn handle_connected(&mut self, result: io::Result<()>, cx: &Cx<'_>) {
        if let Machine::Relay(relay) = self {
            relay.handle_connected(result, cx);
        }
    }

    /// The machine's deadline passed.
    pub fn handle_timer(&mut self, cx: &Cx<'_>) {
        match self {
            Machine::Client(client) => client.handle_timer(cx),
            Machine::Relay(relay) => relay.handle_timer(cx),
        }
    }

    /// The gateway started draining.
    pub fn handle_drain(&mut self, cx: &Cx<'_>) {
        match self {
            Machine::Client(client) => client.handle_drain(cx),
            Machine::Relay(relay) => relay.handle_drain(cx),
        }
    }

    /// Moves on to the next shape when the current one is finished with: a client whose request
    /// routed to a proxy becomes a relay. Called by the worker between events.
    pub fn settle(&mut self, cx: &Cx<'_>) {
        if let Machine::Client(client) = self
            && let Some(handoff) = client.take_handoff()
        {
            *self = Machine::Relay(Box::new(Relay::new(handoff, cx)));
        }
    }

    /// Whether the machine wants input on `side` now.
    pub fn wants_read(&self, side: Side, cx: &Cx<'_>) -> bool {
        match self {
            Machine::Client(client) => side == Side::Client && client.wants_read(cx),
            Machine::Relay(relay) => relay.wants_read(side, cx),
        }
    }

    /// The next bytes to send on `side`, when nothing is being sent there.
    pub fn poll_transmit(&mut self, side: Side, cx: &Cx<'_>) -> Option<Outgoing> {
        match self {
            Machine::Client(client) => (side == Side::Client).then(|| client.poll_transmit(cx)).flatten(),
            Machine::Relay(relay) => relay.poll_transmit(side, cx),
        }
    }

    /// Nothing is being sent on `side` and nothing is left to send: returns whether to send FIN
    /// now (the machine moves on to lingering, or to done).
    pub fn poll_fin(&mut self, side: Side, cx: &Cx<'_>) -> bool {
        match self {
            Machine::Client(client) => side == Side::Client && client.poll_fin(cx),
            Machine::Relay(relay) => relay.poll_fin(side, cx),
        }
    }

    /// The upstream to connect to, once, and the name to speak TLS to it under (`wss://`).
    pub fn poll_connect<'a>(&mut self, cx: &Cx<'a>) -> Option<(SocketAddr, Option<&'a str>)> {
        match self {
            Machine::Client(_) => None,
            Machine::Relay(relay) => relay.poll_connect(cx),
        }
    }

    /// Whether the socket of `side` is finished with (it may be shut down and closed).
    pub fn is_side_done(&self, side: Side) -> bool {
        match self {
            Machine::Client(client) => side == Side::Upstream || client.is_done(),
            Machine::Relay(relay) => relay.is_side_done(side),
        }
    }

    /// Whether the whole connection is finished with.
    pub fn is_done(&self) -> bool {
        self.is_side_done(Side::Client) && self.is_side_done(Side::Upstream)
    }

    /// When [`Machine::handle_timer`] is next due.
    pub fn deadline(&self, cx: &Cx<'_>) -> Millis {
        match self {
            Machine::Client(client) => client.deadline(cx),
            Machine::Relay(relay) => relay.deadline(cx),
        }
    }

    /// The connection leaves the worker: give back what it holds outside itself (keep-alive
    /// count, subscription, relay gauge).
    pub fn finish(&mut self, cx: &Cx<'_>) {
        match self {
            Machine::Client(client) => client.finish(cx),
            Machine::Relay(relay) => relay.finish(cx),
        }
    }
}
