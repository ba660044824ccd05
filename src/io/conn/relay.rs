//! One proxied client: connect an upstream, complete its handshake, then relay messages both ways.
//!
//! A [`Client`](super::Client) whose upgrade request routed to a proxy becomes a relay. The relay
//! asks the worker to connect an upstream (`poll_connect`), writes the upgrade request, reads the
//! answer, and only then answers the client: 101 with the upstream's subprotocol, 502 (refused, no
//! healthy upstream, not a 101) or 504 (timed out). Then it drives the two sockets symmetrically:
//! each side ("hop") has an `Assembler`, an unfinished tail, a staging buffer and at most one send
//! in flight. Messages are validated on the way in and re-encoded on the way out (masked towards
//! the upstream); pings are answered per hop; a Close is echoed on its hop and forwarded, with its
//! code and reason, to the other.
//!
//! Must never: read from one side while the bytes queued for the other pass `max_backpressure`,
//! forward a message that failed validation, or leave the upstream socket open when it is done.

use std::io;
use std::net::SocketAddr;
use std::sync::OnceLock;

use tracing::debug;

use super::client::Handoff;
use super::{CLOSE_TIMEOUT, Cx, LINGER_TIMEOUT, OverRate};
use crate::gateway::auth::{TOKEN_PROTOCOL, unix_now};
use crate::gateway::compression::{Compressor, ConnDeflate};
use crate::gateway::proxy::{ProxyRoute, UpstreamRequest};
use crate::gateway::rate_limit::MessageBudget;
use crate::io::buffers::process_after_tail;
use crate::io::clock::Millis;
use crate::io::outgoing::Outgoing;
use crate::io::token::Side;
use crate::metrics::{HandshakeFailure, RouteLabel, UpstreamStats, add};
use crate::proto::close::{CloseCode, write_close_body};
use crate::proto::deflate::Agreement;
use crate::proto::frame::{OpCode, write_frame};
use crate::proto::handshake::{
    Accepted, ClientHandshake, DEFAULT_MAX_HEADER_BYTES, ServerResponse, write_error_response,
};
use crate::proto::message::{Assembler, Event, MessageKind, Role};

/// The fault of a client over its rate with `--rate-limit-action close`: the code and reason it
/// gets, and what the upstream is told.
const OVER_RATE: (CloseCode, &str, &str) =
    (CloseCode::POLICY_VIOLATION, "rate limit exceeded", "client rate limit exceeded");

const CLIENT: usize = Side::Client as usize;
const UPSTREAM: usize = Side::Upstream as usize;

/// The pool's clock: milliseconds since the first proxied connection of the process.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    // Starts at a second so that "down until 0" (healthy) is always in the past.
    1000 + epoch.elapsed().as_millis() as u64
}

/// How a 502 or 504 answer is counted.
fn upstream_failure(status: u16) -> HandshakeFailure {
    if status == 504 { HandshakeFailure::UpstreamTimeout } else { HandshakeFailure::UpstreamUnavailable }
}

/// A small PRNG for masking keys (xorshift64*), seeded from the OS per relay. Masking keys must be
/// unpredictable to the page that might run in the client (section 10.3); the seed is.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let mut seed = [0u8; 8];
        if getrandom::fill(&mut seed).is_err() {
            // No OS randomness (never on Linux >= 3.17): fall back to the clock and an address.
            let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            seed = (time.as_nanos() as u64 ^ (&seed as *const _ as u64)).to_le_bytes();
        }
        Rng(u64::from_le_bytes(seed) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, out: &mut [u8]) {
        if getrandom::fill(out).is_err() {
            for chunk in out.chunks_mut(8) {
                let bytes = self.next_u64().to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
        }
    }

    fn mask(&mut self) -> [u8; 4] {
        let bytes = self.next_u64().to_le_bytes();
        [bytes[0], bytes[1], bytes[2], bytes[3]]
    }
}

/// Where the relay is in setting up the upstream.
enum Stage {
    /// Waiting for a connect to `index` (asked for once through `poll_connect`).
    Connecting {
        request: Box<UpstreamRequest>,
        index: usize,
        /// The first upstream that failed, when this is the second try.
        failed: Option<usize>,
        addr: Option<SocketAddr>,
        deadline: Millis,
    },
    /// Connected; our upgrade request is out and the answer is being read.
    Upgrading {
        request: Box<UpstreamRequest>,
        index: usize,
        handshake: ClientHandshake,
        answer: Vec<u8>,
        deadline: Millis,
    },
    /// The upstream accepted: messages flow (or the hops are closing). `index` names the upstream
    /// for its counters.
    Relaying { index: usize },
    /// The client was answered with an error; nothing more happens upstream.
    Refused,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HopPhase {
    /// Messages flow.
    Open,
    /// We sent Close; waiting for the peer's.
    Closing,
    /// Done with messages: what is queued goes out, then FIN.
    Flushing,
    /// FIN sent; reading and discarding until the peer closes too.
    Lingering,
    /// Finished with (the socket may go).
    Done,
}

/// One side of the relay.
struct Hop {
    /// Our role on this hop: server towards the client, client towards the upstream.
    role: Role,
    assembler: Assembler,
    tail: Vec<u8>,
    out: Vec<u8>,
    in_flight: usize,
    phase: HopPhase,
    close_sent: bool,
    peer_eof: bool,
    received_any: bool,
    /// The hop holds a decompressor (its peer keeps its compression context), counted in the
    /// worker's `compression.inflaters` gauge.
    inflater_counted: bool,
    deadline: Option<Millis>,
    /// permessage-deflate towards this hop's peer, when agreed.
    deflate: Option<ConnDeflate>,
}

impl Hop {
    fn new(role: Role, cx: &Cx<'_>) -> Hop {
        Hop {
            role,
            assembler: Assembler::new(role, cx.ctx.limits),
            tail: Vec::new(),
            out: Vec::new(),
            in_flight: 0,
            phase: HopPhase::Open,
            close_sent: false,
            peer_eof: false,
            received_any: false,
            inflater_counted: false,
            deadline: None,
            deflate: None,
        }
    }

    /// Appends one message for this hop's peer: compressed when the hop agreed permessage-deflate,
    /// masked with a fresh key when we are the client on it. Returns its payload bytes as sent.
    fn push_message(
        &mut self,
        rng: &mut Rng,
        compressor: &Compressor,
        kind: MessageKind,
        payload: &[u8],
    ) -> usize {
        let mask = (self.role == Role::Client).then(|| rng.mask());
        compressor.write_message(&mut self.out, kind, payload, self.deflate.as_mut(), mask)
    }

    fn queued(&self) -> usize {
        self.out.len() + self.in_flight
    }

    fn takes_messages(&self) -> bool {
        self.phase == HopPhase::Open && !self.close_sent
    }
}

/// Appends one frame for a hop: masked with a fresh key when we are the client on it.
fn push_frame(out: &mut Vec<u8>, role: Role, rng: &mut Rng, opcode: OpCode, payload: &[u8]) {
    let mask = (role == Role::Client).then(|| rng.mask());
    write_frame(out, opcode, payload, mask);
}

/// Appends a Close with `code` and `reason` (or an empty one).
fn push_close(out: &mut Vec<u8>, role: Role, rng: &mut Rng, close: Option<(CloseCode, &str)>) {
    let mut body = [0u8; 125];
    let len = close.map_or(0, |(code, reason)| write_close_body(&mut body, code, reason));
    push_frame(out, role, rng, OpCode::Close, &body[..len]);
}

/// A proxied client and its upstream.
pub struct Relay {
    stage: Stage,
    /// Which proxy route.
    route: usize,
    hops: [Hop; 2],
    rng: Rng,
    last_activity: Millis,
    ping_sent: bool,
    /// The client broke the protocol: the Close it gets, held back until the upstream has answered
    /// our Close, so that the answers to the client's earlier messages still reach it first (as
    /// they would without the proxy).
    client_error: Option<(CloseCode, &'static str)>,
    /// When the client's token expires (Unix seconds; 0: no token): both hops close then.
    token_expires: u64,
    /// What the client may still send this second (`--max-message-rate`, `--max-byte-rate`).
    budget: MessageBudget,
    /// When `budget` was last refilled.
    refilled: Millis,
}

impl Relay {
    /// Takes over a client whose request routed to a proxy, and picks the upstream to connect.
    pub fn new(handoff: Handoff, cx: &Cx<'_>) -> Relay {
        let Handoff { request, early } = handoff;
        let route = request.route;
        let mut relay = Relay {
            stage: Stage::Refused,
            route,
            hops: [Hop::new(Role::Server, cx), Hop::new(Role::Client, cx)],
            rng: Rng::new(),
            last_activity: cx.now,
            ping_sent: false,
            client_error: None,
            token_expires: request.token_expires,
            budget: MessageBudget::full(&cx.ctx.rates),
            refilled: cx.now,
        };
        relay.hops[CLIENT].tail = early;
        let Some(pool_route) = cx.ctx.proxies.route(route) else {
            relay.refuse(502, "no such proxy route\n", None, cx);
            return relay;
        };
        if cx.ctx.draining.get() {
            relay.refuse(503, "the gateway is shutting down\n", None, cx);
            return relay;
        }
        let deadline = cx.now.after(cx.ctx.upstream_timeout);
        match pool_route.choose(now_ms(), None) {
            Some(index) => {
                let addr = Some(pool_route.upstreams[index].url.addr);
                relay.stage = Stage::Connecting { request, index, failed: None, addr, deadline };
            }
            None => relay.refuse(502, "no upstream accepted the connection\n", Some(502), cx),
        }
        relay
    }

    fn pool_route<'a>(&self, cx: &Cx<'a>) -> Option<&'a ProxyRoute> {
        cx.ctx.proxies.route(self.route)
    }

    fn upstream_stats<'a>(&self, cx: &Cx<'a>) -> Option<&'a UpstreamStats> {
        let Stage::Relaying { index } = self.stage else { return None };
        self.pool_route(cx).map(|route| &route.upstreams[index].stats)
    }

    /// Answers the client with an HTTP error and lets the upstream go. `failure` counts it as a
    /// handshake failure (502/504 for upstream trouble).
    fn refuse(&mut self, status: u16, body: &str, failure: Option<u16>, cx: &Cx<'_>) {
        if let Some(status) = failure {
            cx.ctx.stats.handshake_failed(upstream_failure(status));
        }
        self.stage = Stage::Refused;
        let client = &mut self.hops[CLIENT];
        client.out.clear();
        write_error_response(&mut client.out, status, &[], body);
        client.tail = Vec::new();
        client.phase = HopPhase::Flushing;
        client.deadline = Some(cx.now.after(CLOSE_TIMEOUT));
        self.set_done(UPSTREAM);
    }

    /// The upstream to connect to, handed out once per attempt.
    pub fn poll_connect<'a>(&mut self, cx: &Cx<'a>) -> Option<(SocketAddr, Option<&'a str>)> {
        let Stage::Connecting { addr, index, .. } = &mut self.stage else { return None };
        let addr = addr.take()?;
        let tls_name = cx.ctx.proxies.route(self.route)?.upstreams.get(*index)?.url.tls_name.as_deref();
        Some((addr, tls_name))
    }

    /// The upstream connect finished.
    pub fn handle_connected(&mut self, result: io::Result<()>, cx: &Cx<'_>) {
        let Stage::Connecting { index, failed, deadline, .. } = &self.stage else { return };
        let (index, failed, deadline) = (*index, *failed, *deadline);
        let Some(route) = self.pool_route(cx) else { return };
        let upstream = &route.upstreams[index];
        match result {
            Ok(()) => {
                // Healthy only once the upgrade succeeds too: an upstream whose port is open but
                // whose application refuses upgrades must stay marked down.
                add(&upstream.stats.connects, 1);
                let Stage::Connecting { request, .. } = std::mem::replace(&mut self.stage, Stage::Refused)
                else {
                    return;
                };
                let mut nonce = [0u8; 16];
                self.rng.fill(&mut nonce);
                let mut handshake = ClientHandshake::new(nonce);
                if cx.ctx.compressor.offers_upstream() {
                    handshake = handshake.offering_deflate();
                }
                let up = &mut self.hops[UPSTREAM];
                up.out.reserve(512);
                request.write(&mut up.out, &handshake, &upstream.url);
                let deadline = cx.now.after(cx.ctx.upstream_timeout);
                self.stage = Stage::Upgrading { request, index, handshake, answer: Vec::new(), deadline };
            }
            Err(error) => {
                debug!(upstream = %upstream.url.url, %error, "upstream connect failed");
                add(&upstream.stats.connect_failures, 1);
                route.mark_down(index, now_ms());
                // One more try on another healthy upstream, within the same deadline.
                let next = if failed.is_none() { route.choose(now_ms(), Some(index)) } else { None };
                match (next, &mut self.stage) {
                    (Some(next), Stage::Connecting { index, failed, addr, .. }) if next != *index => {
                        *failed = Some(*index);
                        *index = next;
                        *addr = Some(route.upstreams[next].url.addr);
                        let _ = deadline;
                    }
                    _ => self.refuse(502, "no upstream accepted the connection\n", Some(502), cx),
                }
            }
        }
    }

    /// Bytes arrived on `side`.
    pub fn handle_data(&mut self, side: Side, data: &mut [u8], cx: &Cx<'_>) {
        let side = side as usize;
        if side == CLIENT {
            // Idleness is the client's: traffic from it, or messages to it (an upstream answering
            // our pings does not keep a silent client open).
            add(&cx.ctx.stats.bytes_in, data.len() as u64);
            self.last_activity = cx.now;
            self.ping_sent = false;
        }
        match &mut self.stage {
            Stage::Relaying { .. } => {
                self.hops[side].received_any = true;
                self.process_bytes(side, data, cx);
            }
            Stage::Upgrading { answer, .. } if side == UPSTREAM => {
                let room = (DEFAULT_MAX_HEADER_BYTES + 1).saturating_sub(answer.len());
                answer.extend_from_slice(&data[..data.len().min(room)]);
                let rest_from = data.len().min(room);
                self.on_upgrade_answer(&mut data[rest_from..], cx);
            }
            // The client's early frames wait until the upstream has answered.
            _ if side == CLIENT && self.hops[CLIENT].phase == HopPhase::Open => {
                self.hops[CLIENT].tail.extend_from_slice(data);
            }
            _ => {}
        }
    }

    /// Parses the upstream's answer so far; on a 101, starts relaying.
    fn on_upgrade_answer(&mut self, beyond: &mut [u8], cx: &Cx<'_>) {
        let Stage::Upgrading { request, handshake, answer, index, .. } = &self.stage else { return };
        let index = *index;
        let parsed = handshake.parse_response(answer, &request.offered());
        let (subprotocol, len) = match parsed {
            Ok(ServerResponse::Partial) => return,
            Ok(ServerResponse::Upgraded { subprotocol, len, deflate }) => {
                if let Some(agreement) = deflate {
                    let up = &mut self.hops[UPSTREAM];
                    up.assembler.enable_deflate(agreement.server_no_context_takeover);
                    up.deflate = Some(ConnDeflate::for_client(&agreement));
                    cx.ctx.stats.compression.connections_add(1);
                }
                (subprotocol.map(str::to_string), len)
            }
            Err(error) => {
                debug!(?error, "upstream refused the upgrade");
                return self.upgrade_failed(index, 502, "the upstream refused the WebSocket upgrade\n", cx);
            }
        };
        let Stage::Upgrading { request, mut answer, .. } =
            std::mem::replace(&mut self.stage, Stage::Relaying { index })
        else {
            return;
        };
        if let Some(route) = self.pool_route(cx) {
            route.mark_up(index);
            route.upstreams[index].stats.relay_opened();
        }
        add(&cx.ctx.stats.handshakes_completed, 1);
        // A browser that sent its token as a subprotocol needs one answered.
        let subprotocol = subprotocol.as_deref().or(request.token_protocol.then_some(TOKEN_PROTOCOL));
        let accepted = Accepted { accept_key: request.client_accept, subprotocol };
        let extensions = request.client_deflate.as_ref().map(Agreement::response_value);
        let client = &mut self.hops[CLIENT];
        accepted.write_response_with_extensions(&mut client.out, extensions.as_deref());
        if let Some(agreement) = &request.client_deflate {
            client.assembler.enable_deflate(agreement.client_no_context_takeover);
            client.deflate = Some(ConnDeflate::new(agreement));
            cx.ctx.stats.compression.connections_add(1);
        }
        self.last_activity = cx.now;
        // Frames the upstream sent right behind its 101, then the client's early frames.
        answer.drain(..len);
        answer.extend_from_slice(beyond);
        if !answer.is_empty() {
            self.hops[UPSTREAM].received_any = true;
            self.process_bytes(UPSTREAM, &mut answer, cx);
        }
        let mut early = std::mem::take(&mut self.hops[CLIENT].tail);
        if !early.is_empty() {
            self.process_bytes(CLIENT, &mut early, cx);
        }
        // An end that came while the upstream was being set up takes effect now.
        for side in [CLIENT, UPSTREAM] {
            if self.hops[side].peer_eof && self.hops[side].phase == HopPhase::Open {
                self.hops[side].peer_eof = false;
                self.on_peer_eof(side, cx);
            }
        }
    }

    fn upgrade_failed(&mut self, index: usize, status: u16, body: &str, cx: &Cx<'_>) {
        if let Some(route) = self.pool_route(cx) {
            debug!(upstream = %route.upstreams[index].url.url, status, "upstream upgrade failed");
            route.mark_down(index, now_ms());
        }
        self.refuse(status, body, Some(status), cx);
    }

    /// The peer of `side` closed its sending side.
    pub fn handle_eof(&mut self, side: Side, cx: &Cx<'_>) {
        let side = side as usize;
        match &self.stage {
            Stage::Relaying { .. } | Stage::Refused => self.on_peer_eof(side, cx),
            Stage::Upgrading { index, .. } if side == UPSTREAM => {
                let index = *index;
                self.hops[UPSTREAM].peer_eof = true;
                self.upgrade_failed(index, 502, "the upstream refused the WebSocket upgrade\n", cx);
            }
            // Noted now, acted on once relaying (or refused).
            _ => self.hops[side].peer_eof = true,
        }
    }

    /// The socket of `side` failed.
    pub fn handle_error(&mut self, side: Side, error: &io::Error, cx: &Cx<'_>) {
        debug!(?side, %error, "relay I/O error");
        let side = side as usize;
        if let Stage::Upgrading { index, .. } = &self.stage
            && side == UPSTREAM
        {
            let index = *index;
            self.hops[UPSTREAM].peer_eof = true;
            return self.upgrade_failed(index, 502, "the upstream refused the WebSocket upgrade\n", cx);
        }
        if side == CLIENT && !matches!(self.stage, Stage::Relaying { .. }) {
            // The client is gone before it could be answered.
            self.hops[CLIENT].peer_eof = true;
            self.set_done(CLIENT);
            self.set_done(UPSTREAM);
            self.stage = Stage::Refused;
            return;
        }
        let was_open = self.hops[side].phase == HopPhase::Open;
        self.hops[side].peer_eof = true;
        self.set_done(side);
        if was_open {
            self.peer_vanished(side, cx);
        }
    }

    /// A send on `side` finished. Returns the unsent rest of a short write.
    pub fn handle_sent(
        &mut self,
        side: Side,
        result: io::Result<usize>,
        mut out: Outgoing,
        cx: &Cx<'_>,
    ) -> Option<Outgoing> {
        let index = side as usize;
        self.hops[index].in_flight = 0;
        match result {
            Ok(written) => {
                let stats = self.upstream_stats(cx);
                if side == Side::Client {
                    add(&cx.ctx.stats.bytes_out, written as u64);
                    if let Some(stats) = stats {
                        add(&stats.bytes_to_client, written as u64);
                    }
                } else if let Some(stats) = stats {
                    add(&stats.bytes_to_upstream, written as u64);
                }
                out.advance(written);
                if out.is_empty() || self.hops[index].phase == HopPhase::Done {
                    return None;
                }
                self.hops[index].in_flight = out.len();
                Some(out)
            }
            Err(error) => {
                self.handle_error(side, &error, cx);
                None
            }
        }
    }

    /// The deadline passed.
    pub fn handle_timer(&mut self, cx: &Cx<'_>) {
        let now = cx.now;
        match &self.stage {
            Stage::Connecting { index, deadline, .. } if deadline.is_at_or_before(now) => {
                let index = *index;
                if let Some(route) = self.pool_route(cx) {
                    add(&route.upstreams[index].stats.connect_failures, 1);
                    route.mark_down(index, now_ms());
                }
                return self.refuse(
                    504,
                    "the upstream did not accept the connection in time\n",
                    Some(504),
                    cx,
                );
            }
            Stage::Upgrading { index, deadline, .. } if deadline.is_at_or_before(now) => {
                let index = *index;
                return self.upgrade_failed(
                    index,
                    504,
                    "the upstream did not answer the upgrade in time\n",
                    cx,
                );
            }
            _ => {}
        }
        for side in [CLIENT, UPSTREAM] {
            let hop = &self.hops[side];
            if hop.deadline.is_some_and(|d| d.is_at_or_before(now)) {
                match hop.phase {
                    // The peer did not answer our Close in time: close anyway.
                    HopPhase::Closing => self.start_flushing(side, cx),
                    HopPhase::Flushing | HopPhase::Lingering => self.set_done(side),
                    HopPhase::Open | HopPhase::Done => self.hops[side].deadline = None,
                }
            }
        }
        if matches!(self.stage, Stage::Relaying { .. }) && self.hops.iter().all(|h| h.phase == HopPhase::Open)
        {
            if self.token_expires != 0 && unix_now() >= self.token_expires {
                add(&cx.ctx.stats.token_expiries, 1);
                self.start_closing(CLIENT, CloseCode::UNAUTHORIZED, "token expired", cx);
                self.start_closing(UPSTREAM, CloseCode::GOING_AWAY, "client token expired", cx);
                return;
            }
            let idle = self.last_activity.until(now);
            if idle >= cx.ctx.idle_timeout {
                self.start_closing(CLIENT, CloseCode::GOING_AWAY, "idle timeout", cx);
                self.start_closing(UPSTREAM, CloseCode::GOING_AWAY, "idle timeout", cx);
            } else if idle >= cx.ctx.idle_timeout / 2 && !self.ping_sent {
                let Relay { hops, rng, .. } = self;
                for hop in hops.iter_mut() {
                    push_frame(&mut hop.out, hop.role, rng, OpCode::Ping, b"ringgate");
                }
                self.ping_sent = true;
            }
        }
    }

    /// The gateway started draining.
    pub fn handle_drain(&mut self, cx: &Cx<'_>) {
        match self.stage {
            Stage::Connecting { .. } | Stage::Upgrading { .. } => {
                self.refuse(503, "the gateway is shutting down\n", None, cx);
            }
            Stage::Relaying { .. } => {
                self.start_closing(CLIENT, CloseCode::GOING_AWAY, "server shutting down", cx);
                self.start_closing(UPSTREAM, CloseCode::GOING_AWAY, "gateway shutting down", cx);
            }
            Stage::Refused => {}
        }
    }

    /// Whether input is wanted on `side`.
    pub fn wants_read(&self, side: Side, cx: &Cx<'_>) -> bool {
        let side = side as usize;
        match self.stage {
            Stage::Connecting { .. } => return false,
            Stage::Upgrading { .. } => return side == UPSTREAM,
            Stage::Relaying { .. } | Stage::Refused => {}
        }
        let hop = &self.hops[side];
        let other = &self.hops[1 - side];
        match hop.phase {
            HopPhase::Done => false,
            _ if hop.peer_eof => false,
            _ if side == CLIENT && self.client_error.is_some() => false,
            HopPhase::Open | HopPhase::Closing => {
                let max = cx.ctx.max_backpressure;
                hop.queued() < max && (!other.takes_messages() || other.queued() < max)
            }
            HopPhase::Flushing | HopPhase::Lingering => true,
        }
    }

    /// The next bytes to send on `side`.
    pub fn poll_transmit(&mut self, side: Side, cx: &Cx<'_>) -> Option<Outgoing> {
        if side == Side::Client {
            self.send_client_error_when_due(cx);
        }
        let hop = &mut self.hops[side as usize];
        if hop.out.is_empty() || hop.phase == HopPhase::Done {
            return None;
        }
        let out = Outgoing::staged(std::mem::take(&mut hop.out));
        hop.in_flight = out.len();
        Some(out)
    }

    /// Nothing is in flight or queued on `side`: when flushing, it is time for FIN.
    pub fn poll_fin(&mut self, side: Side, cx: &Cx<'_>) -> bool {
        let side = side as usize;
        let hop = &mut self.hops[side];
        if hop.phase != HopPhase::Flushing {
            return false;
        }
        if hop.peer_eof {
            self.set_done(side);
            return false;
        }
        hop.phase = HopPhase::Lingering;
        hop.deadline = Some(cx.now.after(LINGER_TIMEOUT));
        true
    }

    /// Whether the socket of `side` is finished with.
    pub fn is_side_done(&self, side: Side) -> bool {
        self.hops[side as usize].phase == HopPhase::Done
    }

    /// When [`Relay::handle_timer`] is next due.
    pub fn deadline(&self, cx: &Cx<'_>) -> Millis {
        let stage = match &self.stage {
            Stage::Connecting { deadline, .. } | Stage::Upgrading { deadline, .. } => Some(*deadline),
            Stage::Relaying { .. } | Stage::Refused => None,
        };
        let relaying = matches!(self.stage, Stage::Relaying { .. })
            && self.hops.iter().all(|h| h.phase == HopPhase::Open);
        let idle = relaying.then(|| {
            let idle = cx.ctx.idle_timeout;
            self.last_activity.after(if self.ping_sent { idle } else { idle / 2 })
        });
        let expiry =
            (relaying && self.token_expires != 0).then(|| super::token_deadline(self.token_expires, cx));
        self.hops
            .iter()
            .filter_map(|h| h.deadline)
            .chain(stage)
            .chain(idle)
            .chain(expiry)
            .reduce(Millis::earliest)
            .unwrap_or_else(|| cx.now.after(std::time::Duration::from_secs(3600)))
    }

    /// The connection leaves the worker.
    pub fn finish(&mut self, cx: &Cx<'_>) {
        if let Some(stats) = self.upstream_stats(cx) {
            stats.relay_closed();
        }
        let compression = &cx.ctx.stats.compression;
        for hop in &mut self.hops {
            if let Some(deflate) = hop.deflate.take() {
                cx.ctx.compressor.release(&deflate);
                compression.connections_add(-1);
            }
            if std::mem::take(&mut hop.inflater_counted) {
                compression.inflaters_add(-1);
            }
        }
        self.stage = Stage::Refused;
    }

    /// Sends the held-back protocol-error Close to the client once the upstream hop is closed.
    fn send_client_error_when_due(&mut self, cx: &Cx<'_>) {
        let upstream_closed = !matches!(self.hops[UPSTREAM].phase, HopPhase::Open | HopPhase::Closing);
        if upstream_closed && let Some((code, reason)) = self.client_error.take() {
            self.start_closing(CLIENT, code, reason, cx);
            self.start_flushing(CLIENT, cx);
        }
    }

    /// The hop is finished: its socket goes once nothing is in flight on it.
    fn set_done(&mut self, side: usize) {
        let hop = &mut self.hops[side];
        hop.phase = HopPhase::Done;
        hop.deadline = None;
        hop.out = Vec::new();
    }

    fn start_flushing(&mut self, side: usize, cx: &Cx<'_>) {
        let hop = &mut self.hops[side];
        if matches!(hop.phase, HopPhase::Open | HopPhase::Closing) {
            hop.phase = HopPhase::Flushing;
            hop.deadline = Some(cx.now.after(CLOSE_TIMEOUT));
        }
    }

    /// Sends Close on a hop that is still open and waits for the peer's answer.
    fn start_closing(&mut self, side: usize, code: CloseCode, reason: &str, cx: &Cx<'_>) {
        let Relay { hops, rng, .. } = self;
        let hop = &mut hops[side];
        if hop.phase != HopPhase::Open || hop.close_sent {
            return;
        }
        push_close(&mut hop.out, hop.role, rng, Some((code, reason)));
        hop.close_sent = true;
        hop.phase = HopPhase::Closing;
        hop.deadline = Some(cx.now.after(CLOSE_TIMEOUT));
        if side == CLIENT {
            cx.ctx.stats.close_sent(code);
        }
    }

    /// The peer of `side` went away without a Close: tell the other side.
    fn peer_vanished(&mut self, side: usize, cx: &Cx<'_>) {
        if side == UPSTREAM && self.client_error.is_some() {
            return; // the client gets its protocol error instead
        }
        if side == UPSTREAM {
            if self.hops[UPSTREAM].received_any {
                self.start_closing(CLIENT, CloseCode::INTERNAL_ERROR, "upstream went away", cx);
            } else {
                self.start_closing(CLIENT, CloseCode::BAD_GATEWAY, "upstream closed without a word", cx);
            }
        } else {
            self.start_closing(UPSTREAM, CloseCode::GOING_AWAY, "client went away", cx);
        }
    }

    fn on_peer_eof(&mut self, side: usize, cx: &Cx<'_>) {
        let hop = &mut self.hops[side];
        hop.peer_eof = true;
        match hop.phase {
            HopPhase::Open => {
                self.start_flushing(side, cx);
                self.peer_vanished(side, cx);
            }
            HopPhase::Closing => self.start_flushing(side, cx),
            HopPhase::Lingering => self.set_done(side),
            HopPhase::Flushing | HopPhase::Done => {}
        }
    }

    fn process_bytes(&mut self, side: usize, data: &mut [u8], cx: &Cx<'_>) {
        let mut tail = std::mem::take(&mut self.hops[side].tail);
        process_after_tail(&mut tail, data, |buf| self.process(side, buf, cx));
        self.hops[side].tail = tail;
    }

    fn process(&mut self, side: usize, buf: &mut [u8], cx: &Cx<'_>) -> usize {
        // A client that broke the protocol (or went over a rate) waits, still open, for the
        // upstream to answer its earlier messages; what it sent after the fault is not read. Such
        // bytes can still arrive: receives already under way complete after reading stopped (a
        // multishot receive is cancelled asynchronously). Fed to the assembler, they would be a
        // second fault, answered at once, ahead of the upstream's answers.
        if side == CLIENT && self.client_error.is_some() {
            return buf.len();
        }
        if matches!(self.hops[side].phase, HopPhase::Open | HopPhase::Closing) {
            self.process_frames(side, buf, cx)
        } else {
            buf.len()
        }
    }

    /// Feeds a hop's frames to its assembler: messages go to the other hop, pings are answered here.
    fn process_frames(&mut self, side: usize, buf: &mut [u8], cx: &Cx<'_>) -> usize {
        if side == CLIENT && cx.ctx.rates.is_enabled() {
            let elapsed = self.refilled.until(cx.now).as_millis() as u32;
            self.budget.refill(elapsed, &cx.ctx.rates);
            self.refilled = cx.now;
        }
        let mut at = 0;
        let (me, other) = {
            let [client, upstream] = &mut self.hops;
            if side == CLIENT { (client, upstream) } else { (upstream, client) }
        };
        let rng = &mut self.rng;
        let rates = &cx.ctx.rates;
        // The client's messages are charged to its rates; the upstream's are not limited.
        let mut budget = (side == CLIENT && rates.is_enabled()).then_some(&mut self.budget);
        // A Close received, copied out of the assembler: code and reason (or none).
        let mut close: Option<Option<(CloseCode, [u8; 125], usize)>> = None;
        // The peer broke the protocol, or the client went over a rate: the code and reason it
        // gets, and the reason the other side is told.
        let mut fault: Option<(CloseCode, &'static str, &'static str)> = None;
        let mut relayed = false;
        // Messages (and payload bytes) of this read, for the proxy route's counters.
        let (mut messages, mut payload_bytes) = (0u64, 0u64);
        while matches!(me.phase, HopPhase::Open | HopPhase::Closing) && close.is_none() {
            let progress = match me.assembler.feed(&mut buf[at..]) {
                Ok(progress) => progress,
                Err(error) => {
                    debug!(side, %error, "relay protocol error");
                    let told =
                        if side == CLIENT { "client protocol error" } else { "upstream protocol error" };
                    fault = Some((error.close_code(), error.reason(), told));
                    at = buf.len();
                    break;
                }
            };
            at += progress.consumed;
            let Some(event) = progress.event else {
                if progress.consumed == 0 {
                    break;
                }
                continue;
            };
            let control = match &event {
                Event::Ping(payload) | Event::Pong(payload) => Some(payload.len()),
                _ => None,
            };
            if let Some(cost) = control
                && me.phase == HopPhase::Open
                && let Some(budget) = budget.as_deref_mut()
                && let Err(over) = super::charge(budget, cost, cx)
            {
                if over == OverRate::Close {
                    fault = Some(OVER_RATE);
                    at = buf.len();
                    break;
                }
                continue;
            }
            match event {
                Event::Message { kind, payload } => {
                    let inflated = payload.len();
                    if me.phase == HopPhase::Open
                        && let Some(budget) = budget.as_deref_mut()
                        && let Err(over) = super::charge(budget, inflated, cx)
                    {
                        // Received all the same (counted as such), and not relayed.
                        messages += 1;
                        payload_bytes += me.assembler.compressed_len().unwrap_or(inflated) as u64;
                        if over == OverRate::Close {
                            fault = Some(OVER_RATE);
                            at = buf.len();
                            break;
                        }
                        continue;
                    }
                    if other.takes_messages() {
                        let sent = other.push_message(rng, &cx.ctx.compressor, kind, payload);
                        relayed = true;
                        if side == UPSTREAM {
                            // As it crosses the wire to the client (compressed where it is).
                            messages += 1;
                            payload_bytes += sent as u64;
                        }
                    }
                    if side == CLIENT {
                        messages += 1;
                        payload_bytes += match me.assembler.compressed_len() {
                            Some(compressed) => {
                                cx.ctx.stats.compression.received(compressed, inflated);
                                compressed
                            }
                            None => inflated,
                        } as u64;
                    }
                }
                Event::Ping(payload) => {
                    if me.phase == HopPhase::Open && !me.close_sent {
                        push_frame(&mut me.out, me.role, rng, OpCode::Pong, payload);
                    }
                }
                Event::Pong(_) => {}
                Event::Close(frame) => {
                    close = Some(frame.map(|f| {
                        let mut reason = [0u8; 125];
                        let len = f.reason.len().min(123);
                        reason[..len].copy_from_slice(&f.reason.as_bytes()[..len]);
                        (f.code, reason, len)
                    }));
                }
            }
        }
        super::count_inflater(&me.assembler, &mut me.inflater_counted, cx);
        if relayed && side == UPSTREAM {
            self.last_activity = cx.now;
        }
        if messages > 0 {
            let stats = &cx.ctx.stats;
            if side == CLIENT {
                stats.messages_in(RouteLabel::Proxy, messages, payload_bytes);
            } else {
                stats.messages_out(RouteLabel::Proxy, messages, payload_bytes);
            }
        }
        if let Some((code, reason, told)) = fault {
            if side == CLIENT && self.hops[UPSTREAM].takes_messages() {
                self.client_error = Some((code, reason));
                self.start_closing(UPSTREAM, CloseCode::GOING_AWAY, told, cx);
                return buf.len();
            }
            let me = &mut self.hops[side];
            let rng = &mut self.rng;
            if !me.close_sent {
                push_close(&mut me.out, me.role, rng, Some((code, reason)));
                me.close_sent = true;
                if side == CLIENT {
                    cx.ctx.stats.close_sent(code);
                }
            }
            self.start_flushing(side, cx);
            if side == CLIENT {
                self.start_closing(UPSTREAM, CloseCode::GOING_AWAY, told, cx);
            } else {
                self.start_closing(CLIENT, CloseCode::BAD_GATEWAY, told, cx);
            }
            return buf.len();
        }
        if let Some(close) = close {
            self.on_close(side, close, cx);
            return buf.len();
        }
        at
    }

    /// A Close arrived on `side`: answer it there (if we had not sent ours) and pass it on.
    fn on_close(&mut self, side: usize, close: Option<(CloseCode, [u8; 125], usize)>, cx: &Cx<'_>) {
        let reason_text;
        let forwarded = match &close {
            Some((code, reason, len)) => {
                reason_text = std::str::from_utf8(&reason[..*len]).unwrap_or("");
                Some((*code, reason_text))
            }
            None => None,
        };
        let stats = &cx.ctx.stats;
        if side == CLIENT
            && let Some((code, _)) = forwarded
        {
            stats.close_received(code);
        }
        let Relay { hops, rng, .. } = self;
        let me = &mut hops[side];
        if !me.close_sent {
            // Echo the code (section 5.5.1); the reason goes to the other side.
            push_close(&mut me.out, me.role, rng, forwarded.map(|(code, _)| (code, "")));
            me.close_sent = true;
            if side == CLIENT
                && let Some((code, _)) = forwarded
            {
                stats.close_sent(code);
            }
        }
        self.start_flushing(side, cx);
        let other = 1 - side;
        let hop = &mut self.hops[other];
        if hop.takes_messages() && !(other == CLIENT && self.client_error.is_some()) {
            push_close(&mut hop.out, hop.role, &mut self.rng, forwarded);
            hop.close_sent = true;
            hop.phase = HopPhase::Closing;
            hop.deadline = Some(cx.now.after(CLOSE_TIMEOUT));
            if other == CLIENT
                && let Some((code, _)) = forwarded
            {
                stats.close_sent(code);
            }
        }
    }
}
