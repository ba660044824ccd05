//! One proxied client: connect an upstream, complete its handshake, then relay messages both ways.
//!
//! `conn` hands over the client socket (borrowed: it stays the connection's) once the client's
//! upgrade request routed to a proxy route. The relay connects the upstream through io_uring (a
//! non-blocking `connect`, a one-shot `POLL_ADD` for writability, `SO_ERROR`), writes the upgrade
//! request, reads the answer, and only then answers the client: 101 with the upstream's
//! subprotocol, 502 (refused, no healthy upstream, not a 101) or 504 (timed out). Then it drives
//! the two sockets symmetrically: each side ("hop") has an `Assembler`, an unfinished tail, a
//! staging buffer and at most one readiness poll and one write in flight, like a connection.
//! Messages are validated on the way in and re-encoded on the way out (masked towards the
//! upstream); pings are answered per hop; a Close is echoed on its hop and forwarded, with its code
//! and reason, to the other.
//!
//! Must never: drop an in-flight op (to stop early it shuts the socket down and awaits the op),
//! read from one side while the bytes queued for the other pass `max_backpressure`, or leave the
//! upstream socket open when it returns.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::time::Instant;
use tokio_uring::net::TcpStream;
use tracing::debug;

use super::buffers::{Received, process_after_tail, recv, with_scratch};
use super::conn::{WorkerContext, in_flight};
use super::drain::DrainSlot;
use super::readiness::{self, Readable};
use super::send::{self, Outgoing, Sending};
use crate::gateway::proxy::{ProxyRoute, UpstreamRequest};
use crate::metrics::{HandshakeFailure, RouteLabel, UpstreamStats, add};
use crate::proto::close::{CloseCode, write_close_body};
use crate::proto::frame::{OpCode, write_frame};
use crate::proto::handshake::{
    Accepted, ClientHandshake, ClientHandshakeError, DEFAULT_MAX_HEADER_BYTES, ServerResponse,
    write_error_response,
};
use crate::proto::message::{Assembler, Event, Role};

/// How long we wait for a peer's Close after sending ours.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long we keep reading after our FIN, so the peer reads our last bytes.
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

const CLIENT: usize = 0;
const UPSTREAM: usize = 1;

/// The pool's clock: milliseconds since the first proxied connection of the process.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    // Starts at a second so that "down until 0" (healthy) is always in the past.
    1000 + epoch.elapsed().as_millis() as u64
}

/// Relays one client (whose upgrade request is `request`, followed by `early` bytes) to an
/// upstream of its route, until both sides are closed.
pub async fn run(client: &TcpStream, ctx: Rc<WorkerContext>, request: Box<UpstreamRequest>, early: Vec<u8>) {
    let pool = Arc::clone(&ctx.proxies);
    let Some(route) = pool.route(request.route) else {
        return refuse(client, 502, "no such proxy route\n").await;
    };
    if ctx.draining.get() {
        return refuse(client, 503, "the gateway is shutting down\n").await;
    }
    let (index, upstream) = match connect_upstream(route, ctx.upstream_timeout).await {
        Ok(connected) => connected,
        Err(status) => {
            ctx.stats.handshake_failed(upstream_failure(status));
            let body = if status == 504 {
                "the upstream did not accept the connection in time\n"
            } else {
                "no upstream accepted the connection\n"
            };
            return refuse(client, status, body).await;
        }
    };
    let stats = &route.upstreams[index].stats;
    let url = &route.upstreams[index].url;
    let mut nonce = [0u8; 16];
    let mut rng = Rng::new();
    rng.fill(&mut nonce);
    let handshake = ClientHandshake::new(nonce);
    let mut bytes = Vec::with_capacity(512);
    request.write(&mut bytes, &handshake, url);
    let (written, _) = upstream.write_all(bytes).await;
    let answer = match written {
        Ok(()) => read_upgrade_answer(&upstream, &handshake, &request, ctx.upstream_timeout).await,
        Err(error) => Err(UpgradeFailure::Io(error)),
    };
    let (subprotocol, leftover) = match answer {
        Ok(answer) => {
            route.mark_up(index);
            answer
        }
        Err(failure) => {
            debug!(upstream = %url.url, ?failure, "upstream upgrade failed");
            route.mark_down(index, now_ms());
            let _ = upstream.shutdown(std::net::Shutdown::Both);
            let (status, body) = match failure {
                UpgradeFailure::TimedOut => (504, "the upstream did not answer the upgrade in time\n"),
                _ => (502, "the upstream refused the WebSocket upgrade\n"),
            };
            ctx.stats.handshake_failed(upstream_failure(status));
            return refuse(client, status, body).await;
        }
    };

    add(&ctx.stats.handshakes_completed, 1);
    stats.relay_opened();
    let mut relay = Relay::new(client, &upstream, &ctx, stats, rng);
    let accepted = Accepted { accept_key: request.client_accept, subprotocol: subprotocol.as_deref() };
    accepted.write_response(&mut relay.hops[CLIENT].out);
    drop(request);
    if !leftover.is_empty() {
        relay.hops[UPSTREAM].received_any = true;
        relay.on_bytes(UPSTREAM, leftover);
    }
    if !early.is_empty() {
        relay.on_bytes(CLIENT, early);
    }
    relay.run().await;
    stats.relay_closed();
    // `upstream` is dropped (closed) here: the relay awaited all of its ops.
}

/// How a 502 or 504 answer is counted.
fn upstream_failure(status: u16) -> HandshakeFailure {
    if status == 504 { HandshakeFailure::UpstreamTimeout } else { HandshakeFailure::UpstreamUnavailable }
}

/// Connects a healthy upstream of `route`, trying a second one once if the first fails. Errors are
/// the HTTP status for the client: 502 (refused, none healthy) or 504 (timed out).
async fn connect_upstream(route: &ProxyRoute, timeout: Duration) -> Result<(usize, TcpStream), u16> {
    let deadline = Instant::now() + timeout;
    let mut failed = None;
    for _ in 0..2 {
        let Some(index) = route.choose(now_ms(), failed) else { break };
        let upstream = &route.upstreams[index];
        match connect(upstream.url.addr, deadline).await {
            Ok(stream) => {
                // Healthy only once the upgrade succeeds too (`run`): an upstream whose port is
                // open but whose application refuses upgrades must stay marked down.
                add(&upstream.stats.connects, 1);
                let _ = stream.set_nodelay(true);
                // Like accepted sockets: io_uring writes wait for room, reads use MSG_DONTWAIT.
                let _ = stream.set_nonblocking(false);
                return Ok((index, TcpStream::from_std(stream)));
            }
            Err(failure) => {
                debug!(upstream = %upstream.url.url, ?failure, "upstream connect failed");
                add(&upstream.stats.connect_failures, 1);
                route.mark_down(index, now_ms());
                if matches!(failure, ConnectFailure::TimedOut) {
                    return Err(504);
                }
                failed = Some(index);
            }
        }
    }
    Err(502)
}

#[derive(Debug)]
enum ConnectFailure {
    Refused(#[allow(dead_code)] io::Error),
    TimedOut,
}

/// A non-blocking connect, completed by a one-shot poll for writability on the worker's ring.
async fn connect(
    addr: std::net::SocketAddr,
    deadline: Instant,
) -> Result<std::net::TcpStream, ConnectFailure> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))
        .map_err(ConnectFailure::Refused)?;
    match socket.connect(&addr.into()) {
        Ok(()) => return Ok(socket.into()),
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(error) => return Err(ConnectFailure::Refused(error)),
    }
    let mut poll = Some(readiness::writable(socket.as_raw_fd()));
    let completed = tokio::select! {
        result = in_flight(&mut poll) => { poll = None; Some(result) }
        () = tokio::time::sleep_until(deadline) => None,
    };
    if completed.is_none() {
        // Shutting the socket down ends the connect attempt and completes the pending poll.
        let _ = socket.shutdown(std::net::Shutdown::Both);
        if let Some(op) = poll.take() {
            let _ = op.await;
        }
        return Err(ConnectFailure::TimedOut);
    }
    match socket.take_error() {
        Ok(None) => Ok(socket.into()),
        Ok(Some(error)) | Err(error) => Err(ConnectFailure::Refused(error)),
    }
}

#[derive(Debug)]
enum UpgradeFailure {
    TimedOut,
    Closed,
    Io(#[allow(dead_code)] io::Error),
    Refused(#[allow(dead_code)] ClientHandshakeError),
}

/// Reads the upstream's answer to our upgrade request: its subprotocol and any frames after it.
async fn read_upgrade_answer(
    upstream: &TcpStream,
    handshake: &ClientHandshake,
    request: &UpstreamRequest,
    timeout: Duration,
) -> Result<(Option<String>, Vec<u8>), UpgradeFailure> {
    let deadline = Instant::now() + timeout;
    let fd = upstream.as_raw_fd();
    let offered = request.offered();
    let mut answer: Vec<u8> = Vec::new();
    loop {
        let mut poll = Some(readiness::readable(fd));
        let completed = tokio::select! {
            result = in_flight(&mut poll) => { poll = None; Some(result) }
            () = tokio::time::sleep_until(deadline) => None,
        };
        match completed {
            None => {
                let _ = upstream.shutdown(std::net::Shutdown::Both);
                if let Some(op) = poll.take() {
                    let _ = op.await;
                }
                return Err(UpgradeFailure::TimedOut);
            }
            Some(Err(error)) => return Err(UpgradeFailure::Io(error)),
            Some(Ok(_)) => {}
        }
        let received = with_scratch(|scratch| {
            let room = (DEFAULT_MAX_HEADER_BYTES + 1).saturating_sub(answer.len()).max(1);
            let limit = room.min(scratch.len());
            let received = recv(fd, &mut scratch[..limit]);
            if let Ok(Received::Data(n)) = received {
                answer.extend_from_slice(&scratch[..n]);
            }
            received
        });
        match received {
            Ok(Received::Data(_)) => {}
            Ok(Received::WouldBlock) => continue,
            Ok(Received::Closed) => return Err(UpgradeFailure::Closed),
            Err(error) => return Err(UpgradeFailure::Io(error)),
        }
        match handshake.parse_response(&answer, &offered) {
            Ok(ServerResponse::Partial) => continue,
            Ok(ServerResponse::Upgraded { subprotocol, len }) => {
                let subprotocol = subprotocol.map(str::to_string);
                answer.drain(..len);
                return Ok((subprotocol, answer));
            }
            Err(error) => return Err(UpgradeFailure::Refused(error)),
        }
    }
}

/// Answers the client with an HTTP error, sends FIN, and reads (discarding) until it closes too or
/// a short linger passes, so that it reads the answer rather than a reset.
async fn refuse(client: &TcpStream, status: u16, body: &str) {
    let mut bytes = Vec::with_capacity(256);
    write_error_response(&mut bytes, status, &[], body);
    let (written, _) = client.write_all(bytes).await;
    if written.is_err() {
        return;
    }
    let _ = client.shutdown(std::net::Shutdown::Write);
    let fd = client.as_raw_fd();
    let deadline = Instant::now() + LINGER_TIMEOUT;
    loop {
        let mut poll = Some(readiness::readable(fd));
        let completed = tokio::select! {
            result = in_flight(&mut poll) => { poll = None; Some(result) }
            () = tokio::time::sleep_until(deadline) => None,
        };
        if completed.is_none() {
            let _ = client.shutdown(std::net::Shutdown::Both);
            if let Some(op) = poll.take() {
                let _ = op.await;
            }
            return;
        }
        let received = with_scratch(|scratch| recv(fd, scratch));
        match received {
            Ok(Received::Data(_) | Received::WouldBlock) => {}
            Ok(Received::Closed) | Err(_) => return,
        }
    }
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
    /// Socket shut down.
    Done,
}

/// One side of the relay.
struct Hop<'s> {
    stream: &'s TcpStream,
    fd: RawFd,
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
    deadline: Option<Instant>,
}

impl<'s> Hop<'s> {
    fn new(stream: &'s TcpStream, role: Role, ctx: &WorkerContext) -> Hop<'s> {
        Hop {
            stream,
            fd: stream.as_raw_fd(),
            role,
            assembler: Assembler::new(role, ctx.limits),
            tail: Vec::new(),
            out: Vec::new(),
            in_flight: 0,
            phase: HopPhase::Open,
            close_sent: false,
            peer_eof: false,
            received_any: false,
            deadline: None,
        }
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

struct Relay<'s> {
    ctx: &'s WorkerContext,
    stats: &'s UpstreamStats,
    hops: [Hop<'s>; 2],
    rng: Rng,
    last_activity: Instant,
    ping_sent: bool,
    /// The client broke the protocol: the Close it gets, held back until the upstream has answered
    /// our Close, so that the answers to the client's earlier messages still reach it first (as
    /// they would without the proxy).
    client_error: Option<(CloseCode, &'static str)>,
    /// Where the relay waits for the worker's drain signal.
    drain_slot: DrainSlot,
}

impl<'s> Relay<'s> {
    fn new(
        client: &'s TcpStream,
        upstream: &'s TcpStream,
        ctx: &'s WorkerContext,
        stats: &'s UpstreamStats,
        rng: Rng,
    ) -> Relay<'s> {
        Relay {
            ctx,
            stats,
            hops: [Hop::new(client, Role::Server, ctx), Hop::new(upstream, Role::Client, ctx)],
            rng,
            last_activity: Instant::now(),
            ping_sent: false,
            client_error: None,
            drain_slot: DrainSlot::default(),
        }
    }

    async fn run(&mut self) {
        let mut writing: [Option<Sending>; 2] = [None, None];
        let mut readable: [Option<Readable>; 2] = [None, None];
        let ctx = self.ctx;
        let mut drain_seen = false;
        let timer = tokio::time::sleep_until(self.next_deadline());
        tokio::pin!(timer);
        loop {
            self.send_client_error_when_due();
            for side in [CLIENT, UPSTREAM] {
                if writing[side].is_none()
                    && !self.hops[side].out.is_empty()
                    && self.hops[side].phase != HopPhase::Done
                {
                    writing[side] = Some(self.submit(side, None));
                }
                if writing[side].is_none() && self.hops[side].phase == HopPhase::Flushing {
                    self.finish_flushing(side);
                }
            }
            let all_done = self.hops.iter().all(|h| h.phase == HopPhase::Done);
            if all_done && writing.iter().all(Option::is_none) && readable.iter().all(Option::is_none) {
                break;
            }
            for side in [CLIENT, UPSTREAM] {
                if readable[side].is_none() && self.wants_read(side) {
                    readable[side] = Some(readiness::readable(self.hops[side].fd));
                }
            }
            if !drain_seen && ctx.draining.get() {
                drain_seen = true;
                self.on_drain();
                continue;
            }
            let deadline = self.next_deadline();
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            let [write_client, write_upstream] = &mut writing;
            let [read_client, read_upstream] = &mut readable;
            tokio::select! {
                biased;
                result = in_flight(write_client) => {
                    writing[CLIENT] = None;
                    if let Some(rest) = self.on_written(CLIENT, result) {
                        writing[CLIENT] = Some(self.submit(CLIENT, Some(rest)));
                    }
                }
                result = in_flight(write_upstream) => {
                    writing[UPSTREAM] = None;
                    if let Some(rest) = self.on_written(UPSTREAM, result) {
                        writing[UPSTREAM] = Some(self.submit(UPSTREAM, Some(rest)));
                    }
                }
                result = in_flight(read_client) => {
                    readable[CLIENT] = None;
                    match result {
                        Ok(_) => self.on_readable(CLIENT),
                        Err(error) => self.on_io_error(CLIENT, &error),
                    }
                }
                result = in_flight(read_upstream) => {
                    readable[UPSTREAM] = None;
                    match result {
                        Ok(_) => self.on_readable(UPSTREAM),
                        Err(error) => self.on_io_error(UPSTREAM, &error),
                    }
                }
                () = &mut timer => self.on_timer(),
                () = ctx.drain.wait(&self.drain_slot), if !drain_seen => {}
            }
        }
        ctx.drain.release(&self.drain_slot);
        // Every op has completed (the loop ends only then); make sure both sockets are shut.
        for hop in &self.hops {
            let _ = hop.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Sends the held-back protocol-error Close to the client once the upstream hop is closed.
    fn send_client_error_when_due(&mut self) {
        let upstream_closed = !matches!(self.hops[UPSTREAM].phase, HopPhase::Open | HopPhase::Closing);
        if upstream_closed && let Some((code, reason)) = self.client_error.take() {
            self.start_closing(CLIENT, code, reason);
            self.start_flushing(CLIENT);
        }
    }

    fn next_deadline(&self) -> Instant {
        let relaying = self.hops.iter().all(|h| h.phase == HopPhase::Open);
        let idle = if relaying {
            let wait = if self.ping_sent { self.ctx.idle_timeout } else { self.ctx.idle_timeout / 2 };
            Some(self.last_activity + wait)
        } else {
            None
        };
        self.hops
            .iter()
            .filter_map(|h| h.deadline)
            .chain(idle)
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
    }

    fn wants_read(&self, side: usize) -> bool {
        let hop = &self.hops[side];
        let other = &self.hops[1 - side];
        match hop.phase {
            HopPhase::Done => false,
            _ if hop.peer_eof => false,
            _ if side == CLIENT && self.client_error.is_some() => false,
            HopPhase::Open | HopPhase::Closing => {
                let max = self.ctx.max_backpressure;
                hop.queued() < max && (!other.takes_messages() || other.queued() < max)
            }
            HopPhase::Flushing | HopPhase::Lingering => true,
        }
    }

    fn submit(&mut self, side: usize, rest: Option<Outgoing>) -> Sending {
        let hop = &mut self.hops[side];
        let out = rest.unwrap_or_else(|| Outgoing::staged(std::mem::take(&mut hop.out)));
        hop.in_flight = out.len();
        send::send(hop.stream.as_raw_fd(), out)
    }

    fn on_written(
        &mut self,
        side: usize,
        (result, mut out): (io::Result<usize>, Outgoing),
    ) -> Option<Outgoing> {
        self.hops[side].in_flight = 0;
        match result {
            Ok(written) => {
                if side == CLIENT {
                    add(&self.ctx.stats.bytes_out, written as u64);
                    add(&self.stats.bytes_to_client, written as u64);
                } else {
                    add(&self.stats.bytes_to_upstream, written as u64);
                }
                out.advance(written);
                (!out.is_empty() && self.hops[side].phase != HopPhase::Done).then_some(out)
            }
            Err(error) => {
                self.on_io_error(side, &error);
                None
            }
        }
    }

    fn finish_flushing(&mut self, side: usize) {
        let hop = &mut self.hops[side];
        if hop.peer_eof {
            self.set_done(side);
            return;
        }
        let _ = hop.stream.shutdown(std::net::Shutdown::Write);
        hop.phase = HopPhase::Lingering;
        hop.deadline = Some(Instant::now() + LINGER_TIMEOUT);
    }

    /// The hop is finished: its socket is shut down, which completes any op still in flight.
    fn set_done(&mut self, side: usize) {
        let hop = &mut self.hops[side];
        hop.phase = HopPhase::Done;
        hop.deadline = None;
        hop.out = Vec::new();
        let _ = hop.stream.shutdown(std::net::Shutdown::Both);
    }

    fn start_flushing(&mut self, side: usize) {
        let hop = &mut self.hops[side];
        if matches!(hop.phase, HopPhase::Open | HopPhase::Closing) {
            hop.phase = HopPhase::Flushing;
            hop.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
        }
    }

    /// Sends Close on a hop that is still open and waits for the peer's answer.
    fn start_closing(&mut self, side: usize, code: CloseCode, reason: &str) {
        let Relay { hops, rng, ctx, .. } = self;
        let hop = &mut hops[side];
        if hop.phase != HopPhase::Open || hop.close_sent {
            return;
        }
        push_close(&mut hop.out, hop.role, rng, Some((code, reason)));
        hop.close_sent = true;
        hop.phase = HopPhase::Closing;
        hop.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
        if side == CLIENT {
            ctx.stats.close_sent(code);
        }
    }

    /// The peer of `side` went away without a Close: tell the other side.
    fn peer_vanished(&mut self, side: usize) {
        if side == UPSTREAM && self.client_error.is_some() {
            return; // the client gets its protocol error instead
        }
        if side == UPSTREAM {
            if self.hops[UPSTREAM].received_any {
                self.start_closing(CLIENT, CloseCode::INTERNAL_ERROR, "upstream went away");
            } else {
                self.start_closing(CLIENT, CloseCode::BAD_GATEWAY, "upstream closed without a word");
            }
        } else {
            self.start_closing(UPSTREAM, CloseCode::GOING_AWAY, "client went away");
        }
    }

    fn on_io_error(&mut self, side: usize, error: &io::Error) {
        debug!(side, %error, "relay I/O error");
        let was_open = self.hops[side].phase == HopPhase::Open;
        self.hops[side].peer_eof = true;
        self.set_done(side);
        if was_open {
            self.peer_vanished(side);
        }
    }

    fn on_peer_eof(&mut self, side: usize) {
        let hop = &mut self.hops[side];
        hop.peer_eof = true;
        match hop.phase {
            HopPhase::Open => {
                self.start_flushing(side);
                self.peer_vanished(side);
            }
            HopPhase::Closing => self.start_flushing(side),
            HopPhase::Lingering => self.set_done(side),
            HopPhase::Flushing | HopPhase::Done => {}
        }
    }

    fn on_readable(&mut self, side: usize) {
        with_scratch(|scratch| {
            while self.wants_read(side) {
                match recv(self.hops[side].fd, scratch) {
                    Ok(Received::Data(n)) => {
                        if side == CLIENT {
                            // Idleness is the client's: traffic from it, or messages to it (an
                            // upstream answering our pings does not keep a silent client open).
                            add(&self.ctx.stats.bytes_in, n as u64);
                            self.last_activity = Instant::now();
                            self.ping_sent = false;
                        }
                        self.hops[side].received_any = true;
                        self.process_bytes(side, &mut scratch[..n]);
                        if n < scratch.len() {
                            break;
                        }
                    }
                    Ok(Received::Closed) => {
                        self.on_peer_eof(side);
                        break;
                    }
                    Ok(Received::WouldBlock) => break,
                    Err(error) => {
                        self.on_io_error(side, &error);
                        break;
                    }
                }
            }
        });
    }

    /// Bytes that arrived before the relay started (owned, not in the scratch buffer).
    fn on_bytes(&mut self, side: usize, mut data: Vec<u8>) {
        self.process_bytes(side, &mut data);
    }

    fn process_bytes(&mut self, side: usize, data: &mut [u8]) {
        let mut tail = std::mem::take(&mut self.hops[side].tail);
        process_after_tail(&mut tail, data, |buf| self.process(side, buf));
        self.hops[side].tail = tail;
    }

    fn process(&mut self, side: usize, buf: &mut [u8]) -> usize {
        if matches!(self.hops[side].phase, HopPhase::Open | HopPhase::Closing) {
            self.process_frames(side, buf)
        } else {
            buf.len()
        }
    }

    /// Feeds a hop's frames to its assembler: messages go to the other hop, pings are answered here.
    fn process_frames(&mut self, side: usize, buf: &mut [u8]) -> usize {
        let mut at = 0;
        let (me, other) = {
            let [client, upstream] = &mut self.hops;
            if side == CLIENT { (client, upstream) } else { (upstream, client) }
        };
        let rng = &mut self.rng;
        // A Close received, copied out of the assembler: code and reason (or none).
        let mut close: Option<Option<(CloseCode, [u8; 125], usize)>> = None;
        let mut protocol_error = None;
        let mut relayed = false;
        // Messages (and payload bytes) of this read, for the proxy route's counters.
        let (mut messages, mut payload_bytes) = (0u64, 0u64);
        while matches!(me.phase, HopPhase::Open | HopPhase::Closing) && close.is_none() {
            let progress = match me.assembler.feed(&mut buf[at..]) {
                Ok(progress) => progress,
                Err(error) => {
                    protocol_error = Some(error);
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
            match event {
                Event::Message { kind, payload } => {
                    if side == CLIENT {
                        messages += 1;
                        payload_bytes += payload.len() as u64;
                    }
                    if other.takes_messages() {
                        push_frame(&mut other.out, other.role, rng, kind.opcode(), payload);
                        relayed = true;
                        if side == UPSTREAM {
                            messages += 1;
                            payload_bytes += payload.len() as u64;
                        }
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
        if relayed && side == UPSTREAM {
            self.last_activity = Instant::now();
        }
        if messages > 0 {
            let stats = &self.ctx.stats;
            if side == CLIENT {
                stats.messages_in(RouteLabel::Proxy, messages, payload_bytes);
            } else {
                stats.messages_out(RouteLabel::Proxy, messages, payload_bytes);
            }
        }
        if let Some(error) = protocol_error {
            debug!(side, %error, "relay protocol error");
            if side == CLIENT && self.hops[UPSTREAM].takes_messages() {
                self.client_error = Some((error.close_code(), error.reason()));
                self.start_closing(UPSTREAM, CloseCode::GOING_AWAY, "client protocol error");
                return buf.len();
            }
            let me = &mut self.hops[side];
            let rng = &mut self.rng;
            if !me.close_sent {
                push_close(&mut me.out, me.role, rng, Some((error.close_code(), error.reason())));
                me.close_sent = true;
                if side == CLIENT {
                    self.ctx.stats.close_sent(error.close_code());
                }
            }
            self.start_flushing(side);
            if side == CLIENT {
                self.start_closing(UPSTREAM, CloseCode::GOING_AWAY, "client protocol error");
            } else {
                self.start_closing(CLIENT, CloseCode::BAD_GATEWAY, "upstream protocol error");
            }
            return buf.len();
        }
        if let Some(close) = close {
            self.on_close(side, close);
            return buf.len();
        }
        at
    }

    /// A Close arrived on `side`: answer it there (if we had not sent ours) and pass it on.
    fn on_close(&mut self, side: usize, close: Option<(CloseCode, [u8; 125], usize)>) {
        let reason_text;
        let forwarded = match &close {
            Some((code, reason, len)) => {
                reason_text = std::str::from_utf8(&reason[..*len]).unwrap_or("");
                Some((*code, reason_text))
            }
            None => None,
        };
        if side == CLIENT
            && let Some((code, _)) = forwarded
        {
            self.ctx.stats.close_received(code);
        }
        let Relay { hops, rng, ctx, .. } = self;
        let me = &mut hops[side];
        if !me.close_sent {
            // Echo the code (section 5.5.1); the reason goes to the other side.
            push_close(&mut me.out, me.role, rng, forwarded.map(|(code, _)| (code, "")));
            me.close_sent = true;
            if side == CLIENT
                && let Some((code, _)) = forwarded
            {
                ctx.stats.close_sent(code);
            }
        }
        self.start_flushing(side);
        let other = 1 - side;
        let hop = &mut self.hops[other];
        if hop.takes_messages() && !(other == CLIENT && self.client_error.is_some()) {
            push_close(&mut hop.out, hop.role, &mut self.rng, forwarded);
            hop.close_sent = true;
            hop.phase = HopPhase::Closing;
            hop.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
            if other == CLIENT
                && let Some((code, _)) = forwarded
            {
                self.ctx.stats.close_sent(code);
            }
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        for side in [CLIENT, UPSTREAM] {
            let hop = &self.hops[side];
            if hop.deadline.is_some_and(|d| d <= now) {
                match hop.phase {
                    // The peer did not answer our Close in time: close anyway.
                    HopPhase::Closing => self.start_flushing(side),
                    HopPhase::Flushing | HopPhase::Lingering => self.set_done(side),
                    HopPhase::Open | HopPhase::Done => self.hops[side].deadline = None,
                }
            }
        }
        if self.hops.iter().all(|h| h.phase == HopPhase::Open) {
            let idle = now.saturating_duration_since(self.last_activity);
            if idle >= self.ctx.idle_timeout {
                self.start_closing(CLIENT, CloseCode::GOING_AWAY, "idle timeout");
                self.start_closing(UPSTREAM, CloseCode::GOING_AWAY, "idle timeout");
            } else if idle >= self.ctx.idle_timeout / 2 && !self.ping_sent {
                let Relay { hops, rng, .. } = self;
                for hop in hops.iter_mut() {
                    push_frame(&mut hop.out, hop.role, rng, OpCode::Ping, b"ringgate");
                }
                self.ping_sent = true;
            }
        }
    }

    fn on_drain(&mut self) {
        self.start_closing(CLIENT, CloseCode::GOING_AWAY, "server shutting down");
        self.start_closing(UPSTREAM, CloseCode::GOING_AWAY, "gateway shutting down");
    }
}
