//! One connection, from the first byte of its upgrade request to the close of its socket.
//!
//! A connection is one task with at most one readiness poll and one write in flight. The task never
//! drops an in-flight io_uring op: the op futures live across loop iterations, and to end early the
//! task shuts the socket down (which completes them) and waits for them. Bytes are read into the
//! worker's scratch buffer and processed in place: the handshake is parsed there, frames are unmasked
//! there, and only an unfinished tail (a partial header, at most a few hundred bytes) is copied into
//! the connection's own buffer, which is released as soon as it is empty. Outbound frames are
//! encoded into one staging buffer and written with one write per batch.
//!
//! Lifecycle: `Handshake` -> `Open` -> `Closing` (we sent Close, waiting for the peer's) ->
//! `Flushing` (everything queued goes out, then we send FIN) -> `Lingering` (reading and discarding
//! until the peer closes too, so that it sees our last bytes rather than a reset) -> done.
//!
//! Must never: hold a read buffer while idle, queue more than `max_backpressure` bytes before it
//! stops reading, or leave a socket open after the task ends.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tokio_uring::net::TcpStream;
use tracing::debug;

use super::buffers::{Received, process_after_tail, recv, with_scratch};
use super::drain::{DrainSignal, DrainSlot};
use super::readiness::{self, Readable};
use super::relay;
use super::send::{self, Outgoing, Sending, staging_buffer};
use crate::gateway::http::{self, Endpoints, parse_plain_request};
use crate::gateway::proxy::{ProxyPool, UpstreamRequest};
use crate::gateway::pubsub::{Broker, Subscription};
use crate::gateway::router::{Route, Router};
use crate::gateway::{Outbox, echo};
use crate::metrics::{
    HandshakeFailure, HttpEndpoint, ProcessInfo, RouteLabel, WorkerStats, add, process_rss_bytes,
    render_prometheus, render_upstreams,
};
use crate::proto::close::{CloseCode, write_close_body};
use crate::proto::frame::{Decoded, FrameHeader, OpCode, write_frame};
use crate::proto::handshake::{
    DEFAULT_MAX_HEADERS, HandshakeError, Parsed, StaticPolicy, accept, find_header_end, parse_request,
    request_target, write_error_response,
};
use crate::proto::message::{Assembler, Event, Limits, MessageKind, Role};

/// How long we wait for the peer's Close after sending ours.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long we keep reading after our FIN, so the peer reads our last bytes before the socket goes.
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

/// What every connection of a worker shares: configuration, routes and counters.
pub struct WorkerContext {
    /// Frame and message size limits.
    pub limits: Limits,
    /// Bytes that may be queued for one client before we stop reading from it.
    pub max_backpressure: usize,
    /// Bound on the request's header section.
    pub max_header_bytes: usize,
    /// Time to complete the upgrade request.
    pub handshake_timeout: Duration,
    /// Time without traffic before the connection is closed (a ping goes out at half).
    pub idle_timeout: Duration,
    /// Origin allow-list and subprotocols.
    pub policy: StaticPolicy,
    /// Path to route.
    pub router: Router,
    /// This worker's counters.
    pub stats: Arc<WorkerStats>,
    /// Connections open on all workers, for `--max-conns`.
    pub open_connections: Arc<AtomicUsize>,
    /// This worker's pub/sub broker.
    pub broker: Rc<Broker>,
    /// Every worker's counters, for `/metrics`.
    pub all_stats: Arc<[Arc<WorkerStats>]>,
    /// When the process started (Unix seconds), for `/metrics`.
    pub start_time_seconds: f64,
    /// HTTP keep-alive connections of this worker waiting for their next request: draining does not
    /// wait for them (they are answered `Connection: close` if they ask anything meanwhile).
    pub keepalive_connections: Cell<u64>,
    /// Set when the gateway starts draining; connections check it before every wait.
    pub draining: Cell<bool>,
    /// Wakes every waiting connection of the worker when draining starts (one per worker rather
    /// than a channel receiver per connection, which would cost memory on every idle connection).
    pub drain: DrainSignal,
    /// The proxy routes' upstreams, shared by all workers.
    pub proxies: Arc<ProxyPool>,
    /// Time an upstream gets to accept a connection and to answer the upgrade.
    pub upstream_timeout: Duration,
}

impl Endpoints for WorkerContext {
    fn is_draining(&self) -> bool {
        self.draining.get()
    }

    fn render_metrics(&self, out: &mut String) {
        let process = ProcessInfo {
            rss_bytes: process_rss_bytes(),
            draining: self.draining.get(),
            start_time_seconds: self.start_time_seconds,
        };
        render_prometheus(out, &self.all_stats, &process);
        render_upstreams(out, &self.proxies.labels());
    }

    fn publish(&self, topic: &str, kind: MessageKind, payload: &[u8]) -> usize {
        self.broker.publish(topic, kind, payload, None)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading an HTTP request: an upgrade, or a plain request (on a keep-alive connection too).
    Handshake,
    Open,
    Closing,
    Flushing,
    Lingering,
    /// The request routed to a proxy: the socket goes to a relay (`relay`) once nothing is in flight.
    Handoff,
    Done,
}

/// Frames waiting to be written, encoded once into one buffer.
#[derive(Default)]
struct Outbound {
    staging: Vec<u8>,
    /// Messages (and their payload bytes) staged since the counters were last updated.
    messages: u64,
    payload_bytes: u64,
}

impl Outbox for Outbound {
    fn send(&mut self, kind: MessageKind, payload: &[u8]) {
        if self.staging.capacity() == 0 {
            self.staging = staging_buffer();
        }
        write_frame(&mut self.staging, kind.opcode(), payload, None);
        self.messages += 1;
        self.payload_bytes += payload.len() as u64;
    }
}

impl Outbound {
    fn control(&mut self, opcode: OpCode, payload: &[u8]) {
        write_frame(&mut self.staging, opcode, payload, None);
    }
}

/// What an upgraded connection is for.
enum Session {
    /// Not upgraded (yet), or no longer taking messages.
    None,
    /// Messages come back.
    Echo,
    /// Subscribed to a topic; messages are published to it.
    PubSub(Subscription),
    /// To be relayed to an upstream (boxed: an echo connection does not pay for it).
    Proxy(Box<UpstreamRequest>),
}

/// Frames of several queued messages are copied into one write up to this size; a single larger
/// frame is written from its shared buffer as is.
const COALESCE_LIMIT: usize = 64 * 1024;

/// The state of one connection, apart from its in-flight ops.
struct Connection {
    ctx: Rc<WorkerContext>,
    stream: TcpStream,
    fd: RawFd,
    phase: Phase,
    session: Session,
    /// Served at least one plain HTTP request and waits for the next (counted in the worker's
    /// `keepalive_connections`).
    keepalive: bool,
    assembler: Assembler,
    /// Unconsumed bytes: a partial request, frame header or control frame.
    tail: Vec<u8>,
    /// How much of `tail` has been searched for the end of the request headers.
    header_scanned: usize,
    out: Outbound,
    in_flight_bytes: usize,
    last_activity: Instant,
    ping_sent: bool,
    peer_closed_tcp: bool,
    deadline: Instant,
    /// Where this connection waits for the worker's drain signal.
    drain_slot: DrainSlot,
}

/// Serves one accepted connection to the end. Counts it open until it returns.
///
pub fn serve(stream: TcpStream, ctx: Rc<WorkerContext>) -> impl Future<Output = ()> {
    let deadline = Instant::now() + ctx.handshake_timeout;
    let mut conn = Connection::new(stream, ctx, Phase::Handshake, deadline);
    // `run` borrows the state the block owns: an `async fn` taking `self` by value would store it
    // twice in the future (rust-lang/rust#62958), and this future is the bulk of an idle connection.
    async move { conn.run().await }
}

/// Answers a connection over `--max-conns` with a 503 and closes it, without reading its request.
pub fn reject_over_capacity(stream: TcpStream, ctx: Rc<WorkerContext>) -> impl Future<Output = ()> {
    let deadline = Instant::now() + LINGER_TIMEOUT;
    let mut conn = Connection::new(stream, ctx, Phase::Flushing, deadline);
    write_error_response(
        &mut conn.out.staging,
        503,
        &[("Retry-After", "1")],
        "the gateway is at its connection limit; retry shortly\n",
    );
    async move { conn.run().await }
}

impl Connection {
    fn new(stream: TcpStream, ctx: Rc<WorkerContext>, phase: Phase, deadline: Instant) -> Self {
        let fd = stream.as_raw_fd();
        // Echo and request/response traffic want each message on the wire now, not batched by Nagle.
        let _ = stream.set_nodelay(true);
        let assembler = Assembler::new(Role::Server, ctx.limits);
        Connection {
            ctx,
            stream,
            fd,
            phase,
            session: Session::None,
            keepalive: false,
            assembler,
            tail: Vec::new(),
            header_scanned: 0,
            out: Outbound::default(),
            in_flight_bytes: 0,
            last_activity: Instant::now(),
            ping_sent: false,
            peer_closed_tcp: false,
            deadline,
            drain_slot: DrainSlot::default(),
        }
    }

    async fn run(&mut self) {
        let mut readable: Option<Readable> = None;
        let mut writing: Option<Sending> = None;
        let ctx = Rc::clone(&self.ctx);
        let mut drain_seen = false;
        let timer = tokio::time::sleep_until(self.deadline);
        tokio::pin!(timer);

        loop {
            if self.phase == Phase::Handoff
                && writing.is_none()
                && readable.is_none()
                && self.out.staging.is_empty()
            {
                break;
            }
            if self.subscriber_is_slow() {
                self.start_closing(CloseCode::POLICY_VIOLATION, "slow consumer");
            }
            if writing.is_none()
                && let Some(batch) = self.next_batch()
            {
                writing = Some(self.submit_bytes(batch));
            }
            self.report_backpressure();
            if writing.is_none() && self.phase == Phase::Flushing {
                self.finish_flushing();
            }
            if self.phase == Phase::Done {
                break;
            }
            if readable.is_none() && self.wants_read() {
                readable = Some(readiness::readable(self.fd));
            }
            if !drain_seen && ctx.draining.get() {
                drain_seen = true;
                self.on_drain();
                continue;
            }
            if timer.deadline() != self.deadline {
                timer.as_mut().reset(self.deadline);
            }

            tokio::select! {
                biased;
                result = in_flight(&mut writing) => {
                    writing = None;
                    if let Some(rest) = self.on_written(result) {
                        writing = Some(self.submit_bytes(rest));
                    }
                }
                result = in_flight(&mut readable) => {
                    readable = None;
                    match result {
                        Ok(_) => self.on_readable(),
                        Err(error) => self.on_io_error(&error),
                    }
                }
                () = &mut timer => self.on_timer(),
                () = ctx.drain.wait(&self.drain_slot), if !drain_seen => {}
                () = subscriber_changed(&self.session), if writing.is_none() => {}
            }
        }

        if self.phase == Phase::Handoff
            && let Session::Proxy(request) = std::mem::replace(&mut self.session, Session::None)
        {
            let early = std::mem::take(&mut self.tail);
            Box::pin(relay::run(&self.stream, Rc::clone(&self.ctx), request, early)).await;
        }

        // Complete every op still in flight before the socket goes: shutting it down wakes a
        // pending poll at once and makes a pending write fail fast.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(op) = readable.take() {
            let _ = op.await;
        }
        if let Some(op) = writing.take() {
            let _ = op.await;
        }
        self.session = Session::None;
        self.ctx.drain.release(&self.drain_slot);
        self.set_keepalive(false);
        self.ctx.open_connections.fetch_sub(1, Ordering::Relaxed);
        self.ctx.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    fn subscriber_is_slow(&self) -> bool {
        matches!(&self.session, Session::PubSub(sub) if sub.subscriber().is_slow())
    }

    /// The next bytes to write: our own frames first, then frames queued by the broker, copied
    /// together up to `COALESCE_LIMIT`; a lone shared frame is written without a copy.
    fn next_batch(&mut self) -> Option<Outgoing> {
        let stats = &self.ctx.stats;
        if self.out.messages > 0 {
            stats.messages_out(RouteLabel::Echo, self.out.messages, self.out.payload_bytes);
            (self.out.messages, self.out.payload_bytes) = (0, 0);
        }
        let mut batch = std::mem::take(&mut self.out.staging);
        if let Session::PubSub(subscription) = &self.session {
            let subscriber = subscription.subscriber();
            let mut delivered = Delivered::default();
            while let Some(next_len) = subscriber.front_len() {
                let lone_large = batch.is_empty() && next_len >= COALESCE_LIMIT;
                if !lone_large && !batch.is_empty() && batch.len() + next_len > COALESCE_LIMIT {
                    break;
                }
                let Some(frame) = subscriber.pop() else { break };
                delivered.count(&frame);
                if lone_large || (batch.is_empty() && !subscriber.has_queued()) {
                    delivered.report(stats);
                    return Some(Outgoing::shared(frame)); // a single frame: written from the shared buffer, no copy
                }
                batch.extend_from_slice(&frame);
            }
            delivered.report(stats);
        }
        (!batch.is_empty()).then(|| Outgoing::staged(batch))
    }

    /// Lets the broker count what this connection holds outside its queue, so that the
    /// slow-consumer bound covers everything waiting for this client.
    fn report_backpressure(&self) {
        if let Session::PubSub(subscription) = &self.session {
            subscription.subscriber().set_writing_bytes(self.queued_bytes());
        }
    }

    fn set_keepalive(&mut self, keepalive: bool) {
        if self.keepalive != keepalive {
            self.keepalive = keepalive;
            let count = &self.ctx.keepalive_connections;
            count.set(if keepalive { count.get() + 1 } else { count.get().saturating_sub(1) });
        }
    }

    fn wants_read(&self) -> bool {
        match self.phase {
            Phase::Done | Phase::Handoff => false,
            _ if self.peer_closed_tcp => false,
            Phase::Open => self.queued_bytes() < self.ctx.max_backpressure,
            _ => true,
        }
    }

    fn queued_bytes(&self) -> usize {
        self.out.staging.len() + self.in_flight_bytes
    }

    fn submit_bytes(&mut self, out: Outgoing) -> Sending {
        self.in_flight_bytes = out.len();
        self.ctx.stats.queue_bytes_add(out.len() as u64);
        send::send(self.fd, out)
    }

    /// Returns the unwritten rest of a short write, to be written before anything else.
    fn on_written(&mut self, (result, mut out): (io::Result<usize>, Outgoing)) -> Option<Outgoing> {
        self.in_flight_bytes = 0;
        self.ctx.stats.queue_bytes_sub(out.len() as u64);
        match result {
            Ok(written) => {
                add(&self.ctx.stats.bytes_out, written as u64);
                out.advance(written);
                (!out.is_empty()).then_some(out)
            }
            Err(error) => {
                self.on_io_error(&error);
                None
            }
        }
    }

    /// Everything queued is out: send FIN, then linger for the peer's unless it already closed.
    fn finish_flushing(&mut self) {
        if self.peer_closed_tcp {
            self.phase = Phase::Done;
            return;
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        self.phase = Phase::Lingering;
        self.deadline = Instant::now() + LINGER_TIMEOUT;
    }

    fn on_io_error(&mut self, error: &io::Error) {
        debug!(fd = self.fd, %error, "connection I/O error");
        if self.phase == Phase::Handshake {
            self.ctx.stats.handshake_failed(HandshakeFailure::Disconnected);
        }
        self.phase = Phase::Done;
    }

    fn on_readable(&mut self) {
        with_scratch(|scratch| {
            while self.wants_read() {
                match recv(self.fd, scratch) {
                    Ok(Received::Data(n)) => {
                        add(&self.ctx.stats.bytes_in, n as u64);
                        self.last_activity = Instant::now();
                        self.ping_sent = false;
                        self.on_bytes(&mut scratch[..n]);
                        if n < scratch.len() {
                            break;
                        }
                    }
                    Ok(Received::Closed) => {
                        self.on_peer_eof();
                        break;
                    }
                    Ok(Received::WouldBlock) => break,
                    Err(error) => {
                        self.on_io_error(&error);
                        break;
                    }
                }
            }
        });
    }

    /// Processes freshly read bytes in place, keeping only what is left unconsumed.
    fn on_bytes(&mut self, data: &mut [u8]) {
        let mut tail = std::mem::take(&mut self.tail);
        process_after_tail(&mut tail, data, |buf| self.process(buf));
        self.tail = tail;
    }

    fn process(&mut self, buf: &mut [u8]) -> usize {
        let mut used = 0;
        if self.phase == Phase::Handshake {
            used = self.process_requests(buf);
        }
        if matches!(self.phase, Phase::Open | Phase::Closing) {
            used += self.process_frames(&mut buf[used..]);
        } else if !matches!(self.phase, Phase::Handshake | Phase::Handoff) {
            used = buf.len(); // flushing or lingering: whatever arrives is discarded
        }
        used
    }

    /// Answers the HTTP requests at the front of `buf` (plain ones on keep-alive may be pipelined)
    /// until one upgrades the connection, one closes it, or the rest is incomplete.
    fn process_requests(&mut self, buf: &[u8]) -> usize {
        let mut used = 0;
        while self.phase == Phase::Handshake && used < buf.len() {
            let consumed = self.process_request(&buf[used..]);
            if consumed == 0 {
                break;
            }
            used += consumed;
        }
        used
    }

    /// Parses one request in place once its header section (and body, if any) is complete, and
    /// answers it. Returns the bytes it used, 0 while incomplete.
    fn process_request(&mut self, buf: &[u8]) -> usize {
        let max = self.ctx.max_header_bytes;
        let Some(head_end) = find_header_end(buf, self.header_scanned) else {
            self.header_scanned = buf.len();
            if buf.len() >= max {
                self.refuse_handshake(HandshakeError::HeadersTooLarge);
                return buf.len();
            }
            return 0;
        };
        let head = &buf[..head_end];
        let ctx = Rc::clone(&self.ctx);
        let Some(target) = request_target(head) else {
            self.refuse_handshake(HandshakeError::Malformed);
            return buf.len();
        };
        let Some(route) = ctx.router.route(target) else {
            self.ctx.stats.handshake_failed(HandshakeFailure::NotFound);
            write_error_response(&mut self.out.staging, 404, &[], "no route for this path\n");
            self.start_flushing();
            return buf.len();
        };
        if route.is_websocket() {
            self.upgrade(route, head);
            return head_end;
        }

        let request = match parse_plain_request(head, ctx.limits.max_message_size) {
            Ok(request) => request,
            Err(error) => {
                let status = error.status();
                http::write_response(
                    &mut self.out.staging,
                    status,
                    "text/plain",
                    b"bad request\n",
                    false,
                    &[],
                );
                self.start_flushing();
                return buf.len();
            }
        };
        let request_len = head_end + request.content_length;
        if buf.len() < request_len {
            self.header_scanned = 0; // the head is parsed again once the body is complete
            return 0;
        }
        let answered =
            http::answer(route, &request, &buf[head_end..request_len], &*ctx, &mut self.out.staging);
        let endpoint = match route {
            Route::Metrics => HttpEndpoint::Metrics,
            Route::Healthz => HttpEndpoint::Healthz,
            _ => HttpEndpoint::Publish,
        };
        ctx.stats.http_request(endpoint, answered.status);
        self.header_scanned = 0;
        if answered.keep_alive {
            self.set_keepalive(true);
            self.deadline = Instant::now() + ctx.handshake_timeout;
            request_len
        } else {
            self.start_flushing();
            buf.len()
        }
    }

    /// Validates an upgrade request for a WebSocket route and answers it: 101 and a session, or
    /// the refusal the RFC names.
    fn upgrade(&mut self, route: Route<'_>, head: &[u8]) {
        let ctx = Rc::clone(&self.ctx);
        if ctx.draining.get() {
            write_error_response(&mut self.out.staging, 503, &[], "the gateway is shutting down\n");
            self.start_flushing();
            return;
        }
        let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
        let request = match parse_request(head, &mut headers, ctx.max_header_bytes) {
            Ok(Parsed::Complete(request, _)) => request,
            Ok(Parsed::Partial) => return self.refuse_handshake(HandshakeError::Malformed),
            Err(error) => return self.refuse_handshake(error),
        };
        let accepted = match accept(&request, &ctx.policy) {
            Ok(accepted) => accepted,
            Err(error) => return self.refuse_handshake(error),
        };
        if let Route::Proxy { index, rest } = route {
            // The client hears back once the upstream answered (the relay writes the 101).
            let client_ip = peer_ip(self.fd);
            let upstream = UpstreamRequest::new(index, rest, &request, accepted.accept_key, client_ip);
            self.session = Session::Proxy(Box::new(upstream));
            self.set_keepalive(false);
            self.phase = Phase::Handoff;
            self.header_scanned = 0;
            return;
        }
        accepted.write_response(&mut self.out.staging);
        add(&ctx.stats.handshakes_completed, 1);
        self.session = match route {
            Route::PubSub { topic } => Session::PubSub(ctx.broker.subscribe(topic)),
            _ => Session::Echo,
        };
        self.set_keepalive(false);
        self.phase = Phase::Open;
        self.header_scanned = 0;
        self.arm_idle_timer();
    }

    fn refuse_handshake(&mut self, error: HandshakeError) {
        debug!(fd = self.fd, %error, "handshake refused");
        self.ctx.stats.handshake_failed(HandshakeFailure::Protocol(error));
        error.write_response(&mut self.out.staging);
        self.start_flushing();
    }

    /// Feeds frames to the assembler and acts on each event, until it needs more bytes.
    fn process_frames(&mut self, buf: &mut [u8]) -> usize {
        let mut at = 0;
        while matches!(self.phase, Phase::Open | Phase::Closing) {
            let progress = match self.assembler.feed(&mut buf[at..]) {
                Ok(progress) => progress,
                Err(error) => {
                    debug!(fd = self.fd, %error, "protocol error");
                    self.send_close(error.close_code(), error.reason());
                    self.start_flushing();
                    return buf.len();
                }
            };
            at += progress.consumed;
            let Some(event) = progress.event else {
                if progress.consumed == 0 {
                    break;
                }
                continue;
            };
            let stats = &self.ctx.stats;
            match event {
                Event::Message { kind, payload } => {
                    let bytes = payload.len() as u64;
                    match &self.session {
                        Session::Echo => {
                            stats.messages_in(RouteLabel::Echo, 1, bytes);
                            echo::on_message(kind, payload, &mut self.out);
                        }
                        Session::PubSub(subscription) => {
                            stats.messages_in(RouteLabel::PubSub, 1, bytes);
                            subscription.publish(kind, payload);
                        }
                        Session::None | Session::Proxy(_) => {}
                    }
                }
                Event::Ping(payload) => {
                    if self.phase == Phase::Open {
                        self.out.control(OpCode::Pong, payload);
                    }
                }
                Event::Pong(_) => {}
                Event::Close(frame) => {
                    let code = frame.map(|f| f.code);
                    if let Some(code) = code {
                        stats.close_received(code);
                    }
                    if self.phase == Phase::Open {
                        // Echo the peer's code (section 5.5.1); an empty Close gets an empty one.
                        match code {
                            Some(code) => {
                                let mut body = [0u8; 125];
                                let len = write_close_body(&mut body, code, "");
                                self.out.control(OpCode::Close, &body[..len]);
                                stats.close_sent(code);
                            }
                            None => self.out.control(OpCode::Close, &[]),
                        }
                    }
                    self.start_flushing();
                }
            }
        }
        if matches!(self.phase, Phase::Open | Phase::Closing) { at } else { buf.len() }
    }

    fn send_close(&mut self, code: CloseCode, reason: &str) {
        let mut body = [0u8; 125];
        let len = write_close_body(&mut body, code, reason);
        self.out.control(OpCode::Close, &body[..len]);
        self.ctx.stats.close_sent(code);
    }

    /// Sends what is queued, then FIN; a peer that does not read gets `CLOSE_TIMEOUT` to do so.
    fn start_flushing(&mut self) {
        self.session = Session::None;
        if self.phase != Phase::Flushing {
            self.phase = Phase::Flushing;
            self.deadline = Instant::now() + CLOSE_TIMEOUT;
        }
    }

    /// Starts the closing handshake from our side and waits for the peer's Close.
    fn start_closing(&mut self, code: CloseCode, reason: &str) {
        self.session = Session::None; // unsubscribed: nothing more is queued after our Close
        self.send_close(code, reason);
        self.phase = Phase::Closing;
        self.deadline = Instant::now() + CLOSE_TIMEOUT;
    }

    fn on_peer_eof(&mut self) {
        self.peer_closed_tcp = true;
        match self.phase {
            Phase::Handshake => {
                if !self.keepalive {
                    self.ctx.stats.handshake_failed(HandshakeFailure::Disconnected);
                }
                self.phase = Phase::Done;
            }
            Phase::Lingering => self.phase = Phase::Done,
            // Whatever is queued still goes out (the peer may have closed only its sending side).
            Phase::Open | Phase::Closing | Phase::Flushing => self.start_flushing(),
            // The relay reads the socket from here on and sees the end itself.
            Phase::Handoff | Phase::Done => {}
        }
    }

    fn arm_idle_timer(&mut self) {
        let wait = if self.ping_sent { self.ctx.idle_timeout } else { self.ctx.idle_timeout / 2 };
        self.deadline = self.last_activity + wait;
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        match self.phase {
            Phase::Handshake => {
                if !self.keepalive {
                    debug!(fd = self.fd, "handshake timeout");
                    self.ctx.stats.handshake_failed(HandshakeFailure::Timeout);
                }
                self.phase = Phase::Done;
            }
            Phase::Open => {
                let idle = now.saturating_duration_since(self.last_activity);
                if idle >= self.ctx.idle_timeout {
                    self.start_closing(CloseCode::GOING_AWAY, "idle timeout");
                } else {
                    if idle >= self.ctx.idle_timeout / 2 && !self.ping_sent {
                        self.out.control(OpCode::Ping, b"ringgate");
                        self.ping_sent = true;
                    }
                    self.arm_idle_timer();
                }
            }
            // The peer did not answer our Close in time: close anyway.
            Phase::Closing => self.start_flushing(),
            Phase::Flushing | Phase::Lingering | Phase::Handoff | Phase::Done => self.phase = Phase::Done,
        }
    }

    fn on_drain(&mut self) {
        match self.phase {
            // A keep-alive client may still ask (and learn from /healthz that we are draining);
            // an unfinished upgrade is dropped.
            Phase::Handshake if self.keepalive => {}
            Phase::Handshake => self.phase = Phase::Done,
            Phase::Open => self.start_closing(CloseCode::GOING_AWAY, "server shutting down"),
            _ => {}
        }
    }
}

/// Frames taken from a subscriber's queue for one write, for the counters.
#[derive(Default)]
struct Delivered {
    frames: u64,
    frame_bytes: u64,
    payload_bytes: u64,
}

impl Delivered {
    fn count(&mut self, frame: &Bytes) {
        self.frames += 1;
        self.frame_bytes += frame.len() as u64;
        if let Ok(Decoded::Header(header, _)) = FrameHeader::decode(frame) {
            self.payload_bytes += header.payload_len;
        }
    }

    /// The frames left the subscriber's queue (the broker counted them into the queue gauge).
    fn report(&self, stats: &WorkerStats) {
        if self.frames > 0 {
            stats.messages_out(RouteLabel::PubSub, self.frames, self.payload_bytes);
            stats.queue_bytes_sub(self.frame_bytes);
        }
    }
}

/// Waits until the broker queued something for this connection (or closed it as slow); pending
/// forever for connections that are not subscribed. Only awaited while no write is in flight (a
/// finished write takes the queue anyway), so a non-empty queue cannot make the loop spin.
fn subscriber_changed(session: &Session) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| match session {
        Session::PubSub(subscription) => subscription.subscriber().poll_changed(cx),
        _ => std::task::Poll::Pending,
    })
}

/// The IP address of the peer of a connected socket (`getpeername(2)`), for `X-Forwarded-For`.
fn peer_ip(fd: RawFd) -> Option<std::net::IpAddr> {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is an open socket owned by the connection; ManuallyDrop keeps this temporary
    // std handle from closing it.
    let socket = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    socket.peer_addr().ok().map(|addr| addr.ip())
}

/// Waits for an op that may not exist: pending forever when there is none, so that a `select!`
/// branch for it simply never fires.
pub(super) async fn in_flight<F: std::future::Future + Unpin>(op: &mut Option<F>) -> F::Output {
    match op {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle connection's user-space memory is, almost entirely, this future (plus the task
    /// header and allocator overhead): the budget is 1 KiB per idle connection. Guards against
    /// a change that quietly doubles it (such as an `async fn` taking its state by value).
    #[test]
    fn connection_future_fits_the_idle_memory_budget() {
        tokio_uring::start(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
            let addr = listener.local_addr().expect("local addr");
            let client = std::net::TcpStream::connect(addr).expect("connect loopback");
            let stats: Arc<WorkerStats> = Arc::default();
            let (hub, _deliveries) = crate::gateway::pubsub::Hub::new(1);
            let broker = Broker::new(
                0,
                hub,
                crate::gateway::pubsub::SlowConsumerPolicy::Close,
                1 << 20,
                false,
                Arc::clone(&stats),
            );
            let ctx = Rc::new(WorkerContext {
                limits: Limits::default(),
                max_backpressure: 1 << 20,
                max_header_bytes: 8192,
                handshake_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(1),
                policy: StaticPolicy::default(),
                router: Router::default(),
                stats: Arc::clone(&stats),
                broker: Rc::new(broker),
                all_stats: Arc::from(vec![stats]),
                start_time_seconds: 0.0,
                keepalive_connections: Cell::new(0),
                open_connections: Arc::default(),
                draining: Cell::new(false),
                drain: DrainSignal::default(),
                proxies: Arc::default(),
                upstream_timeout: Duration::from_secs(1),
            });
            let future = serve(TcpStream::from_std(client), ctx);
            let size = std::mem::size_of_val(&future);
            assert!(size <= 640, "a connection's future grew to {size} bytes");
        });
    }
}
