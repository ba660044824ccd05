//! A client connection, from the first byte of its request to the close of its socket.
//!
//! Bytes are processed in the buffer the backend lends (the io_uring driver's ring buffer, or the
//! epoll backend's receive buffer): the handshake is parsed there, frames are unmasked there, and
//! only an unfinished tail (a partial header, at most a few hundred bytes) is copied into the
//! connection's own buffer, which is released as soon as it is empty. Outbound frames are encoded
//! into one staging buffer; everything staged during a loop turn leaves in one send.
//!
//! Lifecycle: `Handshake` -> `Open` -> `Closing` (we sent Close, waiting for the peer's) ->
//! `Flushing` (everything queued goes out, then FIN) -> `Lingering` (reading and discarding until
//! the peer closes too, so that it sees our last bytes rather than a reset) -> `Done`. A request
//! for a proxy route goes `Handshake` -> `Handoff`, and the machine becomes a relay.
//!
//! Must never: hold a read buffer while idle, queue more than `max_backpressure` bytes before it
//! stops reading, or answer a request the RFCs say to refuse.

use std::io;
use std::net::IpAddr;

use bytes::Bytes;
use tracing::debug;

use super::{CLOSE_TIMEOUT, Cx, LINGER_TIMEOUT, OverRate};
use crate::gateway::auth::{AuthFailure, RefusedPublish, TOKEN_PROTOCOL, unix_now};
use crate::gateway::compression::{Compressor, ConnDeflate};
use crate::gateway::history::Position;
use crate::gateway::http;
use crate::gateway::proxy::UpstreamRequest;
use crate::gateway::pubsub::{Subscriber, Subscription, split_frame};
use crate::gateway::rate_limit::MessageBudget;
use crate::gateway::router::{Route, query_value};
use crate::gateway::{Outbox, echo};
use crate::io::buffers::process_after_tail;
use crate::io::clock::Millis;
use crate::io::outgoing::{MAX_FRAMES_PER_SEND, Outgoing, staging_buffer};
use crate::metrics::{HandshakeFailure, HttpEndpoint, RouteLabel, WorkerStats, add};
use crate::proto::close::{CloseCode, write_close_body};
use crate::proto::deflate::Agreement;
use crate::proto::frame::{Decoded, FrameHeader, OpCode, write_frame};
use crate::proto::handshake::{
    DEFAULT_MAX_HEADERS, HandshakeError, Parsed, accept, could_start_request, find_header_end, parse_request,
    request_target, write_error_response,
};
use crate::proto::message::{Assembler, Event, MessageKind, Role};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading an HTTP request: an upgrade, or a plain request (on a keep-alive connection too).
    Handshake,
    Open,
    Closing,
    Flushing,
    Lingering,
    /// The request routed to a proxy: the machine becomes a relay once nothing is in flight.
    Handoff,
    Done,
}

/// Frames waiting to be sent, encoded once into one buffer.
#[derive(Default)]
struct Outbound {
    staging: Vec<u8>,
    /// Messages (and their payload bytes) staged since the counters were last updated.
    messages: u32,
    payload_bytes: u32,
}

impl Outbox for Outbound {
    fn send(&mut self, kind: MessageKind, payload: &[u8]) {
        if self.staging.capacity() == 0 {
            self.staging = staging_buffer();
        }
        write_frame(&mut self.staging, kind.opcode(), payload, None);
        self.messages += 1;
        self.payload_bytes = self.payload_bytes.saturating_add(payload.len() as u32);
    }
}

impl Outbound {
    fn control(&mut self, opcode: OpCode, payload: &[u8]) {
        write_frame(&mut self.staging, opcode, payload, None);
    }
}

/// The outbox of a connection that agreed permessage-deflate: data messages are compressed on the
/// way in (control frames still go through [`Outbound::control`], never compressed).
struct CompressingOutbox<'a> {
    out: &'a mut Outbound,
    deflate: &'a mut ConnDeflate,
    compressor: &'a Compressor,
}

impl Outbox for CompressingOutbox<'_> {
    fn send(&mut self, kind: MessageKind, payload: &[u8]) {
        let out = &mut *self.out;
        if out.staging.capacity() == 0 {
            out.staging = staging_buffer();
        }
        let wire = self.compressor.write_message(&mut out.staging, kind, payload, Some(self.deflate), None);
        out.messages += 1;
        out.payload_bytes = out.payload_bytes.saturating_add(wire as u32);
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

impl Session {
    /// The route whose counters a received message goes to, while messages are taken.
    fn route_label(&self) -> Option<RouteLabel> {
        match self {
            Session::Echo => Some(RouteLabel::Echo),
            Session::PubSub(_) => Some(RouteLabel::PubSub),
            Session::None | Session::Proxy(_) => None,
        }
    }
}

/// One send carries at most this many bytes of queued frames (a single larger frame goes alone).
const COALESCE_LIMIT: usize = 64 * 1024;
/// Queued frames totalling at most this many bytes are copied behind our own frames into one
/// staging buffer (a copy of a few small frames costs less than describing each to the kernel);
/// more go as an iovec per shared frame, with no copy.
const COPY_LIMIT: usize = 4 * 1024;

/// Takes the frames for one send from a subscriber's queue: as many as fit `COALESCE_LIMIT`
/// beside the `staged` bytes already waiting (at least one), at most `MAX_FRAMES_PER_SEND`.
fn take_frames(subscriber: &Subscriber, staged: usize, stats: &WorkerStats) -> Vec<Bytes> {
    let mut frames = Vec::new();
    let mut bytes = staged;
    let mut delivered = Delivered::default();
    while let Some(next_len) = subscriber.front_len() {
        let room = bytes + next_len <= COALESCE_LIMIT || (frames.is_empty() && staged == 0);
        if !room || frames.len() == MAX_FRAMES_PER_SEND {
            break;
        }
        let Some(frame) = subscriber.pop() else { break };
        delivered.count(&frame);
        bytes += frame.len();
        frames.push(frame);
    }
    delivered.report(stats);
    frames
}

/// One send of our own `staged` frames followed by shared `frames`: a lone shared frame as it is,
/// small ones copied behind ours, larger ones as a vectored send of the shared buffers.
fn combine(mut staged: Vec<u8>, mut frames: Vec<Bytes>) -> Option<Outgoing> {
    let frame_bytes: usize = frames.iter().map(Bytes::len).sum();
    if staged.is_empty() && frames.len() == 1 {
        return frames.pop().map(Outgoing::shared);
    }
    if frame_bytes <= COPY_LIMIT {
        if staged.capacity() == 0 && !frames.is_empty() {
            staged = staging_buffer();
        }
        for frame in &frames {
            staged.extend_from_slice(frame);
        }
        return (!staged.is_empty()).then(|| Outgoing::staged(staged));
    }
    let mut all = Vec::with_capacity(frames.len() + 1);
    if !staged.is_empty() {
        all.push(Bytes::from(staged));
    }
    all.append(&mut frames);
    Some(Outgoing::frames(all))
}

/// One send of our own `staged` frames followed by the messages of plain shared `frames`, each
/// compressed with this connection's own compressor (dedicated mode: its context is its own, so
/// the broker's shared frames cannot serve it).
fn compress_each(
    mut staged: Vec<u8>,
    frames: Vec<Bytes>,
    deflate: &mut ConnDeflate,
    compressor: &Compressor,
) -> Option<Outgoing> {
    if staged.capacity() == 0 && !frames.is_empty() {
        staged = staging_buffer();
    }
    for frame in &frames {
        let (kind, payload) = split_frame(frame);
        compressor.write_message(&mut staged, kind, payload, Some(deflate), None);
    }
    (!staged.is_empty()).then(|| Outgoing::staged(staged))
}

/// Charges a message or control frame of `cost` payload bytes to a client's rates, while it is
/// open and a rate is configured (otherwise everything passes without a look at the budget).
fn charge_open(budget: &mut MessageBudget, phase: Phase, cost: usize, cx: &Cx<'_>) -> Result<(), OverRate> {
    if phase != Phase::Open || !cx.ctx.rates.is_enabled() {
        return Ok(());
    }
    super::charge(budget, cost, cx)
}

/// What a relay takes over from a client whose request routed to a proxy.
pub struct Handoff {
    /// The upstream request, copied out of the client's.
    pub request: Box<UpstreamRequest>,
    /// Bytes the client sent after its request (early frames).
    pub early: Vec<u8>,
}

/// The state of one client connection. Its size is what an idle connection costs (see the test
/// at the end of the file).
pub struct Client {
    phase: Phase,
    /// Served at least one plain HTTP request and waits for the next (counted in the worker's
    /// `keepalive_connections`).
    keepalive: bool,
    ping_sent: bool,
    peer_closed_tcp: bool,
    /// The client's token lets it publish to its topic (always, without a token).
    may_publish: bool,
    /// When the client's token expires (Unix seconds; 0: no token): the connection closes (3000).
    token_expires: u32,
    /// The client keeps its compression context and this connection holds a decompressor for it
    /// (counted in the worker's `compression.inflaters` gauge).
    inflater_counted: bool,
    /// How much of `tail` has been searched for the end of the request headers (2 bytes: a
    /// header section is refused past `max_header_bytes`, 8 KiB; a longer buffer would only be
    /// searched again from 64 KiB, which is correct, and cannot happen before the refusal).
    header_scanned: u16,
    /// Bytes handed to the backend and not yet reported sent.
    in_flight_bytes: u32,
    last_activity: Millis,
    /// The deadline outside the `Open` phase (in it, idleness decides).
    deadline: Millis,
    /// What the client may still send this second (`--max-message-rate`, `--max-byte-rate`),
    /// refilled on each read from the time since `last_activity`.
    budget: MessageBudget,
    session: Session,
    /// permessage-deflate, when agreed: how messages to this client are compressed.
    deflate: Option<ConnDeflate>,
    assembler: Assembler,
    /// Unconsumed bytes: a partial request, frame header or control frame.
    tail: Vec<u8>,
    out: Outbound,
}

impl Client {
    /// A freshly accepted connection: it has `--handshake-timeout` to send its request.
    pub fn new(cx: &Cx<'_>) -> Client {
        Client {
            phase: Phase::Handshake,
            keepalive: false,
            ping_sent: false,
            peer_closed_tcp: false,
            inflater_counted: false,
            may_publish: true,
            token_expires: 0,
            header_scanned: 0,
            in_flight_bytes: 0,
            last_activity: cx.now,
            deadline: cx.now.after(cx.ctx.handshake_timeout),
            budget: MessageBudget::full(&cx.ctx.rates),
            session: Session::None,
            deflate: None,
            assembler: Assembler::new(Role::Server, cx.ctx.limits),
            tail: Vec::new(),
            out: Outbound::default(),
        }
    }

    /// A connection refused at accept (over `--max-conns`, or its address's limits): `status`
    /// with `Retry-After: 1`, then FIN, without reading its request.
    pub fn refused(status: u16, body: &str, cx: &Cx<'_>) -> Client {
        let mut client = Client::new(cx);
        client.phase = Phase::Flushing;
        client.deadline = cx.now.after(LINGER_TIMEOUT);
        write_error_response(&mut client.out.staging, status, &[("Retry-After", "1")], body);
        client
    }

    /// Bytes arrived.
    pub fn handle_data(&mut self, data: &mut [u8], cx: &Cx<'_>) {
        add(&cx.ctx.stats.bytes_in, data.len() as u64);
        if self.phase == Phase::Open && cx.ctx.rates.is_enabled() {
            let elapsed = self.last_activity.until(cx.now).as_millis() as u32;
            self.budget.refill(elapsed, &cx.ctx.rates);
        }
        self.last_activity = cx.now;
        self.ping_sent = false;
        if self.phase == Phase::Done {
            return;
        }
        let mut tail = std::mem::take(&mut self.tail);
        process_after_tail(&mut tail, data, |buf| self.process(buf, cx));
        self.tail = tail;
    }

    /// An event for a socket a client does not have (cannot happen; ignored).
    pub fn handle_stray(&mut self, side: crate::io::token::Side) {
        debug!(?side, "event for a socket this connection does not have");
    }

    /// The peer closed its sending side.
    pub fn handle_eof(&mut self, cx: &Cx<'_>) {
        self.peer_closed_tcp = true;
        match self.phase {
            Phase::Handshake => {
                if !self.keepalive {
                    cx.ctx.stats.handshake_failed(HandshakeFailure::Disconnected);
                }
                self.phase = Phase::Done;
            }
            Phase::Lingering => self.phase = Phase::Done,
            // Whatever is queued still goes out (the peer may have closed only its sending side).
            Phase::Open | Phase::Closing | Phase::Flushing => self.start_flushing(cx),
            // The relay sees the end itself (it is told again once it runs).
            Phase::Handoff | Phase::Done => {}
        }
    }

    /// The socket failed.
    pub fn handle_error(&mut self, error: &io::Error, cx: &Cx<'_>) {
        debug!(%error, "connection I/O error");
        if self.phase == Phase::Handshake && !self.keepalive {
            cx.ctx.stats.handshake_failed(HandshakeFailure::Disconnected);
        }
        self.peer_closed_tcp = true;
        self.phase = Phase::Done;
    }

    /// A send finished. Returns the unsent rest of a short write, to be sent before anything else.
    pub fn handle_sent(
        &mut self,
        result: io::Result<usize>,
        mut out: Outgoing,
        cx: &Cx<'_>,
    ) -> Option<Outgoing> {
        let stats = &cx.ctx.stats;
        stats.queue_bytes_sub(out.len() as u64);
        self.in_flight_bytes = 0;
        match result {
            Ok(written) => {
                add(&stats.bytes_out, written as u64);
                out.advance(written);
                if out.is_empty() || self.phase == Phase::Done {
                    return None;
                }
                self.in_flight_bytes = out.len() as u32;
                stats.queue_bytes_add(out.len() as u64);
                Some(out)
            }
            Err(error) => {
                self.handle_error(&error, cx);
                None
            }
        }
    }

    /// The deadline passed.
    pub fn handle_timer(&mut self, cx: &Cx<'_>) {
        match self.phase {
            Phase::Handshake => {
                if !self.keepalive {
                    debug!("handshake timeout");
                    cx.ctx.stats.handshake_failed(HandshakeFailure::Timeout);
                }
                self.phase = Phase::Done;
            }
            Phase::Open => {
                let idle = self.last_activity.until(cx.now);
                if self.token_expires != 0 && unix_now() >= u64::from(self.token_expires) {
                    add(&cx.ctx.stats.token_expiries, 1);
                    self.start_closing(CloseCode::UNAUTHORIZED, "token expired", cx);
                } else if idle >= cx.ctx.idle_timeout {
                    self.start_closing(CloseCode::GOING_AWAY, "idle timeout", cx);
                } else if idle >= cx.ctx.idle_timeout / 2 && !self.ping_sent {
                    self.out.control(OpCode::Ping, b"ringgate");
                    self.ping_sent = true;
                }
            }
            // The peer did not answer our Close in time: close anyway.
            Phase::Closing => self.start_flushing(cx),
            Phase::Flushing | Phase::Lingering | Phase::Done => self.phase = Phase::Done,
            Phase::Handoff => {}
        }
    }

    /// The gateway started draining.
    pub fn handle_drain(&mut self, cx: &Cx<'_>) {
        match self.phase {
            // A keep-alive client may still ask (and learn from /healthz that we are draining);
            // an unfinished upgrade is dropped.
            Phase::Handshake if self.keepalive => {}
            Phase::Handshake => self.phase = Phase::Done,
            Phase::Open => self.start_closing(CloseCode::GOING_AWAY, "server shutting down", cx),
            _ => {}
        }
    }

    /// The relay's part, once the request routed to a proxy and nothing is in flight.
    pub fn take_handoff(&mut self) -> Option<Handoff> {
        if self.phase != Phase::Handoff || self.in_flight_bytes > 0 || !self.out.staging.is_empty() {
            return None;
        }
        let Session::Proxy(request) = std::mem::replace(&mut self.session, Session::None) else {
            return None;
        };
        self.phase = Phase::Done;
        Some(Handoff { request, early: std::mem::take(&mut self.tail) })
    }

    /// Whether input is wanted now.
    pub fn wants_read(&self, cx: &Cx<'_>) -> bool {
        match self.phase {
            Phase::Done | Phase::Handoff => false,
            _ if self.peer_closed_tcp => false,
            Phase::Open => self.queued_bytes() < cx.ctx.max_backpressure,
            _ => true,
        }
    }

    /// The next bytes to send: our own frames first, then frames queued by the broker, copied
    /// together up to `COALESCE_LIMIT`; a lone shared frame is sent without a copy.
    pub fn poll_transmit(&mut self, cx: &Cx<'_>) -> Option<Outgoing> {
        if self.subscriber_is_slow() {
            self.start_closing(CloseCode::POLICY_VIOLATION, "slow consumer", cx);
        }
        if self.phase == Phase::Done {
            return None;
        }
        let stats = &cx.ctx.stats;
        if self.out.messages > 0 {
            stats.messages_out(
                RouteLabel::Echo,
                u64::from(self.out.messages),
                u64::from(self.out.payload_bytes),
            );
            (self.out.messages, self.out.payload_bytes) = (0, 0);
        }
        let batch = std::mem::take(&mut self.out.staging);
        let out = match &self.session {
            Session::PubSub(subscription) => {
                let subscriber = subscription.subscriber();
                subscriber.clear_notified();
                let frames = take_frames(subscriber, batch.len(), stats);
                match self.deflate.as_mut().filter(|deflate| deflate.shared_window().is_none()) {
                    Some(deflate) => compress_each(batch, frames, deflate, &cx.ctx.compressor),
                    None => combine(batch, frames),
                }
            }
            _ => (!batch.is_empty()).then(|| Outgoing::staged(batch)),
        }?;
        self.in_flight_bytes = out.len() as u32;
        stats.queue_bytes_add(out.len() as u64);
        self.report_backpressure();
        Some(out)
    }

    /// Nothing is in flight or staged: when flushing, it is time for FIN.
    pub fn poll_fin(&mut self, cx: &Cx<'_>) -> bool {
        self.report_backpressure();
        if self.phase != Phase::Flushing {
            return false;
        }
        if self.peer_closed_tcp {
            self.phase = Phase::Done;
            return false;
        }
        self.phase = Phase::Lingering;
        self.deadline = cx.now.after(LINGER_TIMEOUT);
        true
    }

    /// Whether the connection is finished with.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// When [`Client::handle_timer`] is next due.
    pub fn deadline(&self, cx: &Cx<'_>) -> Millis {
        if self.phase == Phase::Open {
            let idle = cx.ctx.idle_timeout;
            let wait = if self.ping_sent { idle } else { idle / 2 };
            let idle_deadline = self.last_activity.after(wait);
            if self.token_expires == 0 {
                return idle_deadline;
            }
            idle_deadline.earliest(super::token_deadline(u64::from(self.token_expires), cx))
        } else {
            self.deadline
        }
    }

    /// The connection leaves the worker.
    pub fn finish(&mut self, cx: &Cx<'_>) {
        self.session = Session::None;
        self.set_keepalive(false, cx);
        let compression = &cx.ctx.stats.compression;
        if let Some(deflate) = self.deflate.take() {
            cx.ctx.compressor.release(&deflate);
            compression.connections_add(-1);
        }
        if std::mem::take(&mut self.inflater_counted) {
            compression.inflaters_add(-1);
        }
        if self.in_flight_bytes > 0 {
            cx.ctx.stats.queue_bytes_sub(u64::from(self.in_flight_bytes));
            self.in_flight_bytes = 0;
        }
    }

    fn subscriber_is_slow(&self) -> bool {
        matches!(&self.session, Session::PubSub(sub) if sub.subscriber().is_slow())
    }

    /// Lets the broker count what this connection holds outside its queue, so that the
    /// slow-consumer bound covers everything waiting for this client.
    fn report_backpressure(&self) {
        if let Session::PubSub(subscription) = &self.session {
            subscription.subscriber().set_writing_bytes(self.queued_bytes());
        }
    }

    fn set_keepalive(&mut self, keepalive: bool, cx: &Cx<'_>) {
        if self.keepalive != keepalive {
            self.keepalive = keepalive;
            let count = &cx.ctx.keepalive_connections;
            count.set(if keepalive { count.get() + 1 } else { count.get().saturating_sub(1) });
        }
    }

    fn queued_bytes(&self) -> usize {
        self.out.staging.len() + self.in_flight_bytes as usize
    }

    fn process(&mut self, buf: &mut [u8], cx: &Cx<'_>) -> usize {
        let mut used = 0;
        if self.phase == Phase::Handshake {
            used = self.process_requests(buf, cx);
        }
        if matches!(self.phase, Phase::Open | Phase::Closing) {
            used += self.process_frames(&mut buf[used..], cx);
        } else if !matches!(self.phase, Phase::Handshake | Phase::Handoff) {
            used = buf.len(); // flushing or lingering: whatever arrives is discarded
        }
        used
    }

    /// Answers the HTTP requests at the front of `buf` (plain ones on keep-alive may be pipelined)
    /// until one upgrades the connection, one closes it, or the rest is incomplete.
    fn process_requests(&mut self, buf: &[u8], cx: &Cx<'_>) -> usize {
        let mut used = 0;
        while self.phase == Phase::Handshake && used < buf.len() {
            let consumed = self.process_request(&buf[used..], cx);
            if consumed == 0 {
                break;
            }
            used += consumed;
        }
        used
    }

    /// Parses one request in place once its header section (and body, if any) is complete, and
    /// answers it. Returns the bytes it used, 0 while incomplete.
    fn process_request(&mut self, buf: &[u8], cx: &Cx<'_>) -> usize {
        let ctx = cx.ctx;
        let max = ctx.max_header_bytes;
        let Some(head_end) = find_header_end(buf, usize::from(self.header_scanned)) else {
            self.header_scanned = buf.len().min(usize::from(u16::MAX)) as u16;
            if buf.len() >= max {
                self.refuse_handshake(HandshakeError::HeadersTooLarge, cx);
                return buf.len();
            }
            if !could_start_request(buf) {
                self.refuse_handshake(HandshakeError::Malformed, cx);
                return buf.len();
            }
            return 0;
        };
        let head = &buf[..head_end];
        let Some(target) = request_target(head) else {
            self.refuse_handshake(HandshakeError::Malformed, cx);
            return buf.len();
        };
        let Some(route) = ctx.router.route(target) else {
            ctx.stats.handshake_failed(HandshakeFailure::NotFound);
            write_error_response(&mut self.out.staging, 404, &[], "no route for this path\n");
            self.start_flushing(cx);
            return buf.len();
        };
        if route.is_websocket() {
            self.upgrade(route, head, cx);
            return head_end;
        }

        let endpoint = match route {
            Route::Metrics => HttpEndpoint::Metrics,
            Route::Healthz => HttpEndpoint::Healthz,
            _ => HttpEndpoint::Publish,
        };
        let max_body = ctx.limits.max_message_size;
        let request = match http::read_request(route, head, max_body, ctx, &mut self.out.staging) {
            Ok(request) => request,
            Err(refusal) => {
                // Answered already, from the headers alone; nothing after it is read as a request.
                debug!(?refusal, "plain request refused");
                ctx.stats.http_request(endpoint, refusal.status());
                ctx.stats.http_refused(refusal.reason());
                self.start_flushing(cx);
                return buf.len();
            }
        };
        let request_len = head_end + request.content_length;
        if buf.len() < request_len {
            // The head is parsed again once the body is complete (nothing was written for it).
            self.header_scanned = 0;
            return 0;
        }
        let answered = http::answer(route, &request, &buf[head_end..request_len], ctx, &mut self.out.staging);
        ctx.stats.http_request(endpoint, answered.status);
        self.header_scanned = 0;
        if answered.keep_alive {
            self.set_keepalive(true, cx);
            self.deadline = cx.now.after(ctx.handshake_timeout);
            request_len
        } else {
            self.start_flushing(cx);
            buf.len()
        }
    }

    /// Validates an upgrade request for a WebSocket route and answers it: 101 and a session, or
    /// the refusal the RFC names.
    fn upgrade(&mut self, route: Route<'_>, head: &[u8], cx: &Cx<'_>) {
        let ctx = cx.ctx;
        if ctx.draining.get() {
            write_error_response(&mut self.out.staging, 503, &[], "the gateway is shutting down\n");
            self.start_flushing(cx);
            return;
        }
        let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
        let request = match parse_request(head, &mut headers, ctx.max_header_bytes) {
            Ok(Parsed::Complete(request, _)) => request,
            Ok(Parsed::Partial) => return self.refuse_handshake(HandshakeError::Malformed, cx),
            Err(error) => return self.refuse_handshake(error, cx),
        };
        let mut accepted = match accept(&request, &ctx.policy) {
            Ok(accepted) => accepted,
            Err(error) => return self.refuse_handshake(error, cx),
        };
        let topic = match route {
            Route::PubSub { topic } => Some(topic),
            _ => None,
        };
        let verified = match ctx.auth.authenticate(ctx.route_auth.mode(&route), &request, topic) {
            Ok(verified) => verified,
            Err(failure) => return self.refuse_auth(failure, cx),
        };
        // `?since=EPOCH:OFFSET` on a topic: recover what was missed (see gateway::history).
        let since_value =
            topic.and_then(|_| request_target(head)).and_then(|target| query_value(target, "since"));
        let since = match since_value.map(Position::parse) {
            None => None,
            Some(Some(position)) => Some(position),
            Some(None) => {
                debug!("upgrade refused: ?since= is not EPOCH:OFFSET");
                ctx.stats.handshake_failed(HandshakeFailure::Protocol(HandshakeError::Malformed));
                let body = "?since= must be EPOCH:OFFSET: 1 to 16 hex digits, a colon, a decimal offset\n";
                write_error_response(&mut self.out.staging, 400, &[], body);
                self.start_flushing(cx);
                return;
            }
        };
        self.header_scanned = 0;
        self.set_keepalive(false, cx);
        // A browser that sends its token as a subprotocol offers `ringgate.jwt` beside it, and
        // fails the connection unless some subprotocol is answered.
        let token_protocol = verified.is_some() && request.subprotocols().any(|p| p == TOKEN_PROTOCOL);
        let agreed = ctx.compressor.negotiate(request.header_values("Sec-WebSocket-Extensions"));
        if let Route::Proxy { index, rest } = route {
            // The client hears back once the upstream answered (the relay writes the 101, with
            // the extension agreed here).
            let client_ip: Option<IpAddr> = (cx.peer_ip)();
            let mut upstream =
                UpstreamRequest::new(index, rest, &request, accepted.accept_key, client_ip, cx.secure);
            upstream.client_deflate = agreed;
            if let Some(verified) = &verified {
                upstream.authenticated(verified, &ctx.subject_header, token_protocol);
            }
            self.session = Session::Proxy(Box::new(upstream));
            self.phase = Phase::Handoff;
            return;
        }
        if let Some(verified) = &verified {
            self.token_expires = u32::try_from(verified.identity.expires_at).unwrap_or(u32::MAX);
            self.may_publish = topic.is_none_or(|topic| verified.identity.grants.may_publish(topic));
            if token_protocol && accepted.subprotocol.is_none() {
                accepted.subprotocol = Some(TOKEN_PROTOCOL);
            }
        }
        let answer = agreed.as_ref().map(Agreement::response_value);
        accepted.write_response_with_extensions(&mut self.out.staging, answer.as_deref());
        if let Some(agreement) = agreed {
            self.assembler.enable_deflate(agreement.client_no_context_takeover);
            self.deflate = Some(ConnDeflate::new(&agreement));
            ctx.stats.compression.connections_add(1);
        }
        add(&ctx.stats.handshakes_completed, 1);
        let shared_window = self.deflate.as_ref().and_then(ConnDeflate::shared_window);
        self.session = match route {
            Route::PubSub { topic } => Session::PubSub(match since {
                Some(since) => ctx.broker.subscribe_since(topic, cx.owner, shared_window, since),
                None => ctx.broker.subscribe(topic, cx.owner, shared_window),
            }),
            _ => Session::Echo,
        };
        self.phase = Phase::Open;
        self.last_activity = cx.now;
    }

    /// 401 (with `WWW-Authenticate: Bearer`, RFC 6750 section 3) or 403 before the upgrade.
    fn refuse_auth(&mut self, failure: AuthFailure, cx: &Cx<'_>) {
        debug!(reason = failure.label(), "upgrade refused for its token");
        cx.ctx.stats.auth_failed(failure);
        let (challenge, body) = match failure {
            AuthFailure::Missing => ("Bearer realm=\"ringgate\"", "a token is required\n"),
            AuthFailure::Forbidden => ("", "the token does not grant this topic\n"),
            _ => ("Bearer realm=\"ringgate\", error=\"invalid_token\"", "the token is not valid\n"),
        };
        let headers: &[(&str, &str)] =
            if challenge.is_empty() { &[] } else { &[("WWW-Authenticate", challenge)] };
        write_error_response(&mut self.out.staging, failure.status(), headers, body);
        self.start_flushing(cx);
    }

    fn refuse_handshake(&mut self, error: HandshakeError, cx: &Cx<'_>) {
        debug!(%error, "handshake refused");
        cx.ctx.stats.handshake_failed(HandshakeFailure::Protocol(error));
        error.write_response(&mut self.out.staging);
        self.start_flushing(cx);
    }

    /// Feeds frames to the assembler and acts on each event, until it needs more bytes.
    fn process_frames(&mut self, buf: &mut [u8], cx: &Cx<'_>) -> usize {
        let stats = &cx.ctx.stats;
        let mut at = 0;
        while matches!(self.phase, Phase::Open | Phase::Closing) {
            let progress = match self.assembler.feed(&mut buf[at..]) {
                Ok(progress) => progress,
                Err(error) => {
                    debug!(%error, "protocol error");
                    self.send_close(error.close_code(), error.reason(), cx);
                    self.start_flushing(cx);
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
            match event {
                Event::Message { kind, payload } => {
                    let inflated = payload.len();
                    if let Some(route) = self.session.route_label()
                        && let Err(over) = charge_open(&mut self.budget, self.phase, inflated, cx)
                    {
                        // Received all the same: counted as such, then dropped (or closed on).
                        let wire = self.assembler.compressed_len().unwrap_or(inflated);
                        stats.messages_in(route, 1, wire as u64);
                        self.over_rate(over, cx);
                        continue;
                    }
                    let route = match &self.session {
                        Session::Echo => {
                            match self.deflate.as_mut() {
                                Some(deflate) => {
                                    let compressor = &cx.ctx.compressor;
                                    let mut out =
                                        CompressingOutbox { out: &mut self.out, deflate, compressor };
                                    echo::on_message(kind, payload, &mut out);
                                }
                                None => echo::on_message(kind, payload, &mut self.out),
                            }
                            RouteLabel::Echo
                        }
                        Session::PubSub(_) if !self.may_publish => {
                            // Received all the same: counted as such, then refused.
                            let wire = self.assembler.compressed_len().unwrap_or(inflated);
                            stats.messages_in(RouteLabel::PubSub, 1, wire as u64);
                            add(&stats.refused_publishes, 1);
                            if cx.ctx.refused_publish == RefusedPublish::Close {
                                self.start_closing(CloseCode::POLICY_VIOLATION, "publish not permitted", cx);
                            }
                            continue;
                        }
                        Session::PubSub(subscription) => {
                            subscription.publish(kind, payload);
                            RouteLabel::PubSub
                        }
                        Session::None | Session::Proxy(_) => continue,
                    };
                    // Payload bytes as they crossed the wire (compressed where they were).
                    let wire = match self.assembler.compressed_len() {
                        Some(compressed) => {
                            stats.compression.received(compressed, inflated);
                            compressed
                        }
                        None => inflated,
                    };
                    stats.messages_in(route, 1, wire as u64);
                }
                Event::Ping(payload) => match charge_open(&mut self.budget, self.phase, payload.len(), cx) {
                    Ok(()) if self.phase == Phase::Open => self.out.control(OpCode::Pong, payload),
                    Ok(()) => {}
                    Err(over) => self.over_rate(over, cx),
                },
                Event::Pong(payload) => {
                    if let Err(over) = charge_open(&mut self.budget, self.phase, payload.len(), cx) {
                        self.over_rate(over, cx);
                    }
                }
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
                    self.start_flushing(cx);
                }
            }
        }
        super::count_inflater(&self.assembler, &mut self.inflater_counted, cx);
        if matches!(self.phase, Phase::Open | Phase::Closing) { at } else { buf.len() }
    }

    /// The client went over a rate: with `--rate-limit-action close` the connection closes (1008);
    /// with `drop` the message is discarded, and nothing more happens.
    fn over_rate(&mut self, over: OverRate, cx: &Cx<'_>) {
        if over == OverRate::Close {
            self.start_closing(CloseCode::POLICY_VIOLATION, "rate limit exceeded", cx);
        }
    }

    fn send_close(&mut self, code: CloseCode, reason: &str, cx: &Cx<'_>) {
        let mut body = [0u8; 125];
        let len = write_close_body(&mut body, code, reason);
        self.out.control(OpCode::Close, &body[..len]);
        cx.ctx.stats.close_sent(code);
    }

    /// Sends what is queued, then FIN; a peer that does not read gets `CLOSE_TIMEOUT` to do so.
    fn start_flushing(&mut self, cx: &Cx<'_>) {
        self.session = Session::None;
        if self.phase != Phase::Flushing {
            self.phase = Phase::Flushing;
            self.deadline = cx.now.after(CLOSE_TIMEOUT);
        }
    }

    /// Starts the closing handshake from our side and waits for the peer's Close.
    fn start_closing(&mut self, code: CloseCode, reason: &str, cx: &Cx<'_>) {
        self.session = Session::None; // unsubscribed: nothing more is queued after our Close
        self.send_close(code, reason, cx);
        self.phase = Phase::Closing;
        self.deadline = cx.now.after(CLOSE_TIMEOUT);
    }
}

/// Frames taken from a subscriber's queue for one send, for the counters.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::context::WorkerContext;

    fn cx(ctx: &WorkerContext) -> Cx<'_> {
        Cx { ctx, now: Millis(1000), owner: 1, peer_ip: &|| None, secure: false }
    }

    /// An idle connection's user-space memory is this state plus the slab's own bytes around it
    /// (see `worker`): the budget is 320 bytes per idle connection in all. Where the bytes
    /// go: the assembler (limits, partial-frame and message state, its reassembly buffer's empty
    /// `Vec`), the unfinished-bytes tail and the staging buffer (empty `Vec`s: no allocation while
    /// idle), the session (a subscription is two `Rc`s), the permessage-deflate send agreement (16
    /// bytes: a null pointer unless dedicated mode compressed for it, the window and the mode),
    /// two 4-byte clocks, a 4-byte and a 2-byte count, the token's expiry (4 bytes of Unix seconds:
    /// with the publish-permission flag it took the struct from 208 to 216), six flags, and the
    /// rate-limit budget (8 bytes: two `f32` buckets; narrowing the header-search offset from 4
    /// bytes to 2 let it fit in the alignment padding, so the struct stayed at 216).
    #[test]
    fn a_client_fits_the_idle_memory_budget() {
        let size = std::mem::size_of::<Client>();
        assert!(size <= 216, "a client connection's state grew to {size} bytes");
        let ctx = WorkerContext::for_tests();
        let client = Client::new(&cx(&ctx));
        assert_eq!(client.tail.capacity(), 0, "an idle connection holds no buffer");
        assert_eq!(client.out.staging.capacity(), 0, "an idle connection holds no buffer");
    }

    #[test]
    fn queued_frames_go_alone_copied_or_vectored_by_size() {
        let frame = |len: usize| Bytes::from(vec![7u8; len]);
        let lone = combine(Vec::new(), vec![frame(100)]).expect("one frame");
        assert_eq!(lone.remaining().len(), 100, "a lone frame is sent from its shared buffer");
        let small = combine(b"pong".to_vec(), vec![frame(100), frame(200)]).expect("small frames");
        assert_eq!(small.remaining().len(), 304, "small frames are copied behind our own");
        let large = combine(b"pong".to_vec(), vec![frame(3000), frame(3000)]).expect("large frames");
        assert!(large.remaining().is_empty(), "large frames are not copied into one slice");
        assert_eq!(large.len(), 6004, "but all of them are sent, ours first");
        assert!(combine(Vec::new(), Vec::new()).is_none());
    }

    #[test]
    fn a_request_in_pieces_is_answered_once_it_is_whole() {
        let ctx = WorkerContext::for_tests();
        let cx = cx(&ctx);
        let mut client = Client::new(&cx);
        let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let (first, second) = request.split_at(10);
        client.handle_data(&mut first.to_vec(), &cx);
        assert!(client.poll_transmit(&cx).is_none(), "nothing to answer yet");
        client.handle_data(&mut second.to_vec(), &cx);
        let answer = client.poll_transmit(&cx).expect("answered");
        assert!(
            answer.remaining().starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(answer.remaining())
        );
        assert!(client.tail.is_empty() && client.tail.capacity() == 0);
    }
}
