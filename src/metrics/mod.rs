//! The gateway's metrics: counters and gauges each worker keeps, summed for the shutdown summary
//! and rendered for `GET /metrics` in the Prometheus text format ([`render_prometheus`]).
//!
//! Every counter is a relaxed atomic owned by one worker: the worker is the only writer, so an
//! increment is an uncontended `lock add`, and readers (the summary line, a scrape) sum across
//! workers whenever they like. Labelled counters are fixed-size arrays indexed by small enums, so the
//! set of series is known at compile time and no peer can grow it. Must never: take a lock or
//! allocate on the hot path (an increment is one `fetch_add` on memory allocated at start); make a
//! table's size depend on what peers send; count per message what could be counted per batch.

mod broker;
mod prometheus;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

pub use broker::{BrokerDrop, BrokerStats};
pub use prometheus::{
    CONTENT_TYPE, ProcessInfo, UpstreamLabels, process_rss_bytes, render_address_table, render_broker,
    render_history, render_prometheus, render_upstreams,
};

use crate::gateway::address_limits::AddressRefusal;
use crate::gateway::auth::AuthFailure;
use crate::gateway::rate_limit::RateLimit;
use crate::proto::close::CloseCode;
use crate::proto::handshake::HandshakeError;
use crate::tls::TlsFailure;

/// Why a connection never became a WebSocket. Labels for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The request broke a rule of RFC 6455 section 4 (the label of the `HandshakeError`).
    Protocol(HandshakeError),
    /// No route for the requested path (404).
    NotFound,
    /// The client did not finish its request within the handshake timeout.
    Timeout,
    /// The client hung up or the socket failed before the handshake finished.
    Disconnected,
    /// Proxy route: no upstream accepted the connection or answered 101 (502).
    UpstreamUnavailable,
    /// Proxy route: the upstream did not connect or answer the upgrade in time (504).
    UpstreamTimeout,
    /// The route needs a token and none valid was given (401).
    Unauthorized,
    /// The token is valid but does not grant the topic (403).
    Forbidden,
}

const HANDSHAKE_FAILURE_KINDS: usize = 17;

/// Every failure kind, in table order: the summary and the exposition list them all from here.
const ALL_HANDSHAKE_FAILURES: [HandshakeFailure; HANDSHAKE_FAILURE_KINDS] = [
    HandshakeFailure::Protocol(HandshakeError::Malformed),
    HandshakeFailure::Protocol(HandshakeError::HeadersTooLarge),
    HandshakeFailure::Protocol(HandshakeError::MethodNotAllowed),
    HandshakeFailure::Protocol(HandshakeError::HttpVersionTooOld),
    HandshakeFailure::Protocol(HandshakeError::BadHost),
    HandshakeFailure::Protocol(HandshakeError::UpgradeRequired),
    HandshakeFailure::Protocol(HandshakeError::MissingVersion),
    HandshakeFailure::Protocol(HandshakeError::UnsupportedVersion),
    HandshakeFailure::Protocol(HandshakeError::BadKey),
    HandshakeFailure::Protocol(HandshakeError::ForbiddenOrigin),
    HandshakeFailure::NotFound,
    HandshakeFailure::Timeout,
    HandshakeFailure::Disconnected,
    HandshakeFailure::UpstreamUnavailable,
    HandshakeFailure::UpstreamTimeout,
    HandshakeFailure::Unauthorized,
    HandshakeFailure::Forbidden,
];

impl HandshakeFailure {
    /// A stable label: the `reason` of `ringgate_handshake_failures_total` and of log lines.
    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Protocol(error) => error.label(),
            HandshakeFailure::NotFound => "not_found",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Disconnected => "disconnected",
            HandshakeFailure::UpstreamUnavailable => "upstream_unavailable",
            HandshakeFailure::UpstreamTimeout => "upstream_timeout",
            HandshakeFailure::Unauthorized => "unauthorized",
            HandshakeFailure::Forbidden => "forbidden",
        }
    }

    fn index(self) -> usize {
        use HandshakeError as E;
        match self {
            HandshakeFailure::Protocol(error) => match error {
                E::Malformed => 0,
                E::HeadersTooLarge => 1,
                E::MethodNotAllowed => 2,
                E::HttpVersionTooOld => 3,
                E::BadHost => 4,
                E::UpgradeRequired => 5,
                E::MissingVersion => 6,
                E::UnsupportedVersion => 7,
                E::BadKey => 8,
                E::ForbiddenOrigin => 9,
            },
            HandshakeFailure::NotFound => 10,
            HandshakeFailure::Timeout => 11,
            HandshakeFailure::Disconnected => 12,
            HandshakeFailure::UpstreamUnavailable => 13,
            HandshakeFailure::UpstreamTimeout => 14,
            HandshakeFailure::Unauthorized => 15,
            HandshakeFailure::Forbidden => 16,
        }
    }
}

/// Close codes are counted individually for 1000-1015; everything else (application codes) in one
/// bucket, so the table stays fixed-size whatever peers send.
const CLOSE_CODE_SLOTS: usize = 17;

fn close_code_slot(code: CloseCode) -> usize {
    match code.0 {
        1000..=1015 => usize::from(code.0 - 1000),
        _ => CLOSE_CODE_SLOTS - 1,
    }
}

/// The `code` label of a slot: the code itself, or `other` for the shared bucket.
fn close_code_label(slot: usize) -> &'static str {
    const LABELS: [&str; CLOSE_CODE_SLOTS] = [
        "1000", "1001", "1002", "1003", "1004", "1005", "1006", "1007", "1008", "1009", "1010", "1011",
        "1012", "1013", "1014", "1015", "other",
    ];
    LABELS[slot]
}

/// Which route handled a WebSocket message: the `route` label of the message and payload counters,
/// so an operator can tell echo traffic from pub/sub fan-out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteLabel {
    /// The echo route.
    Echo,
    /// A pub/sub topic route.
    PubSub,
    /// A reverse-proxy route: messages from the client (in) and relayed to it (out).
    Proxy,
}

const ROUTES: usize = 3;

impl RouteLabel {
    /// Every route, in table order.
    pub const ALL: [RouteLabel; ROUTES] = [RouteLabel::Echo, RouteLabel::PubSub, RouteLabel::Proxy];

    /// A stable label: the `route` of the message and payload families.
    pub fn label(self) -> &'static str {
        match self {
            RouteLabel::Echo => "echo",
            RouteLabel::PubSub => "pubsub",
            RouteLabel::Proxy => "proxy",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which plain HTTP endpoint answered a request: the `endpoint` label of
/// `ringgate_http_requests_total`, so that scrapes and publishes are counted apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HttpEndpoint {
    /// `GET /metrics`.
    Metrics,
    /// `GET /healthz`.
    Healthz,
    /// `POST /publish/{topic}`.
    Publish,
}

const HTTP_ENDPOINTS: usize = 3;
/// 1xx to 5xx: statuses are counted by class, which is what alerts are written against.
const STATUS_CLASSES: usize = 5;

impl HttpEndpoint {
    /// Every endpoint, in table order.
    pub const ALL: [HttpEndpoint; HTTP_ENDPOINTS] =
        [HttpEndpoint::Metrics, HttpEndpoint::Healthz, HttpEndpoint::Publish];

    /// A stable label: the `endpoint` of `ringgate_http_requests_total`.
    pub fn label(self) -> &'static str {
        match self {
            HttpEndpoint::Metrics => "metrics",
            HttpEndpoint::Healthz => "healthz",
            HttpEndpoint::Publish => "publish",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a plain HTTP request was refused: the `reason` of `ringgate_http_refusals_total`. Statuses
/// alone (`ringgate_http_requests_total`) do not tell a smuggling attempt from a wrong key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HttpRefusal {
    /// Not parseable, or a request target with a control character (400).
    Malformed,
    /// No `Host` in HTTP/1.1, two, or an invalid one (400).
    BadHost,
    /// `Content-Length` not digits, repeated or a list; with `Transfer-Encoding`; or a
    /// `Transfer-Encoding` that leaves the length unknown (400).
    BadFraming,
    /// A chunked body (411).
    LengthRequired,
    /// A transfer coding we do not implement (501).
    NotImplemented,
    /// A declared body over the message size limit (413).
    TooLarge,
    /// An `Origin` not on the allow-list (403).
    ForbiddenOrigin,
    /// Publishing without the key (401).
    Unauthorized,
    /// Malformed bearer credentials (400).
    InvalidRequest,
    /// A wrong key, or a JWT that is not valid (401).
    InvalidToken,
    /// A valid JWT without publish rights on the topic (403).
    ForbiddenTopic,
}

const HTTP_REFUSALS: usize = 11;

impl HttpRefusal {
    /// Every reason, in table order.
    pub const ALL: [HttpRefusal; HTTP_REFUSALS] = [
        HttpRefusal::Malformed,
        HttpRefusal::BadHost,
        HttpRefusal::BadFraming,
        HttpRefusal::LengthRequired,
        HttpRefusal::NotImplemented,
        HttpRefusal::TooLarge,
        HttpRefusal::ForbiddenOrigin,
        HttpRefusal::Unauthorized,
        HttpRefusal::InvalidRequest,
        HttpRefusal::InvalidToken,
        HttpRefusal::ForbiddenTopic,
    ];

    /// A stable label: the `reason` of `ringgate_http_refusals_total`.
    pub fn label(self) -> &'static str {
        match self {
            HttpRefusal::Malformed => "malformed",
            HttpRefusal::BadHost => "bad_host",
            HttpRefusal::BadFraming => "bad_framing",
            HttpRefusal::LengthRequired => "length_required",
            HttpRefusal::NotImplemented => "not_implemented",
            HttpRefusal::TooLarge => "too_large",
            HttpRefusal::ForbiddenOrigin => "forbidden_origin",
            HttpRefusal::Unauthorized => "unauthorized",
            HttpRefusal::InvalidRequest => "invalid_request",
            HttpRefusal::InvalidToken => "invalid_token",
            HttpRefusal::ForbiddenTopic => "forbidden_topic",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The class slot of an HTTP status; anything outside 100-599 (which we never send) counts as 5xx.
fn status_class_slot(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100) - 1,
        _ => STATUS_CLASSES - 1,
    }
}

fn status_class_label(slot: usize) -> &'static str {
    ["1xx", "2xx", "3xx", "4xx", "5xx"][slot]
}

/// Message and payload counters of one route.
#[derive(Debug, Default)]
struct RouteCounters {
    messages_in: AtomicU64,
    payload_bytes_in: AtomicU64,
    messages_out: AtomicU64,
    payload_bytes_out: AtomicU64,
}

/// One worker's counters and gauges.
///
/// Aligned to two cache lines so that no two workers' counters share one (adjacent allocations
/// would otherwise put one worker's last counters beside the next worker's first ones), which keeps
/// the "uncontended" promise true.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerStats {
    /// Connections currently open on this worker (a gauge).
    pub connections_open: AtomicU64,
    /// Connections accepted since start.
    pub connections_accepted: AtomicU64,
    /// Connections answered 503 because `--max-conns` was reached.
    pub connections_rejected: AtomicU64,
    /// Handshakes completed with a 101.
    pub handshakes_completed: AtomicU64,
    /// Bytes read from sockets: every byte, frame headers and HTTP included.
    pub bytes_in: AtomicU64,
    /// Bytes written to sockets: every byte, frame headers and HTTP included.
    pub bytes_out: AtomicU64,
    /// Messages this worker published to a topic, from WebSocket publishers and `POST /publish`;
    /// each counts once however many subscribers it reaches.
    pub published: AtomicU64,
    /// Frames this worker queued on its subscribers (one per subscriber reached).
    pub delivered: AtomicU64,
    /// Subscribers this worker closed (1008) because their queue went over the bound.
    pub slow_consumer_closes: AtomicU64,
    /// Frames this worker did not queue on a subscriber whose queue was over the bound (the `drop`
    /// slow-consumer policy).
    pub slow_consumer_drops: AtomicU64,
    /// Frames this worker published that another worker had no hand-off room for (it was
    /// `HANDOFF_LIMIT_BYTES` behind), once per subscriber there that missed them.
    pub handoff_drops: AtomicU64,
    handshake_failures: [AtomicU64; HANDSHAKE_FAILURE_KINDS],
    close_codes_sent: [AtomicU64; CLOSE_CODE_SLOTS],
    close_codes_received: [AtomicU64; CLOSE_CODE_SLOTS],
    routes: [RouteCounters; ROUTES],
    http_requests: [[AtomicU64; STATUS_CLASSES]; HTTP_ENDPOINTS],
    http_refusals: [AtomicU64; HTTP_REFUSALS],
    // Gauges are signed: an unbalanced inc/dec shows up as a negative value, not as 2^64 - 1.
    topics: AtomicI64,
    subscribers: AtomicI64,
    outbound_queue_bytes: AtomicI64,
    /// The io backend's own counters, copied in by the worker after each loop turn.
    pub io: IoCounters,
    /// permessage-deflate: what was compressed and inflated, and what it holds.
    pub compression: CompressionCounters,
    /// Tokens refused, by reason (`AuthFailure` order).
    auth_failures: [AtomicU64; AUTH_FAILURE_KINDS],
    /// Pub/sub messages from connections whose token may not publish to their topic.
    pub refused_publishes: AtomicU64,
    /// Connections closed (3000) because their token expired while they were connected.
    pub token_expiries: AtomicU64,
    /// Messages over a connection's rate, by limit (`RateLimit` order): dropped, or the one that
    /// closed its connection.
    rate_limited_messages: [AtomicU64; RATE_LIMITS],
    /// Connections closed (1008) for going over a rate, by limit.
    rate_limit_closes: [AtomicU64; RATE_LIMITS],
    /// Connections refused (429) for their address, by reason (`AddressRefusal` order).
    address_refusals: [AtomicU64; ADDRESS_REFUSALS],
    /// TLS handshakes completed, by the suite agreed (its slot in `tls::cipher_suites`; the slot
    /// after the last: any other).
    tls_handshakes: [AtomicU64; TLS_SUITE_SLOTS],
    /// TLS handshakes that failed, by reason (`TlsFailure` order).
    tls_failures: [AtomicU64; TLS_FAILURES],
    /// Ciphertext read from TLS sockets (the `socket_*` counters count their plaintext).
    pub tls_bytes_in: AtomicU64,
    /// Ciphertext written to TLS sockets.
    pub tls_bytes_out: AtomicU64,
}

/// Room for rustls' default suites and "other" (a test checks that they fit).
pub const TLS_SUITE_SLOTS: usize = 16;
const TLS_FAILURES: usize = TlsFailure::ALL.len();

const RATE_LIMITS: usize = RateLimit::ALL.len();
const ADDRESS_REFUSALS: usize = AddressRefusal::ALL.len();

const AUTH_FAILURE_KINDS: usize = AuthFailure::ALL.len();

/// permessage-deflate's counters and gauges (see `ringgate_compression_*` in `/metrics`): enough
/// to tell what compression saves on the wire, what it costs in compressor runs (a pub/sub
/// message is compressed once per worker, however many subscribers get it) and what it holds.
#[derive(Debug, Default)]
pub struct CompressionCounters {
    /// Messages run through a compressor.
    pub runs: AtomicU64,
    /// Messages sent compressed (one per receiver: a fan-out counts each delivery).
    pub messages_out: AtomicU64,
    /// Their payload before compression.
    pub out_uncompressed_bytes: AtomicU64,
    /// Their payload as sent.
    pub out_compressed_bytes: AtomicU64,
    /// Compressed messages received.
    pub messages_in: AtomicU64,
    /// Their payload as received.
    pub in_compressed_bytes: AtomicU64,
    /// Their payload once inflated.
    pub in_uncompressed_bytes: AtomicU64,
    /// Connections that agreed permessage-deflate.
    connections: AtomicI64,
    /// Connections holding a decompressor of their own (the client keeps its context).
    inflaters: AtomicI64,
    /// Connections holding a compressor of their own (dedicated mode).
    deflaters: AtomicI64,
}

impl CompressionCounters {
    /// A connection agreed permessage-deflate (+1) or left having agreed it (-1).
    pub fn connections_add(&self, delta: i64) {
        gauge_add(&self.connections, delta);
    }

    /// A connection took (+1) or gave back (-1) a decompressor of its own.
    pub fn inflaters_add(&self, delta: i64) {
        gauge_add(&self.inflaters, delta);
    }

    /// A connection took (+1) or gave back (-1) a compressor of its own.
    pub fn deflaters_add(&self, delta: i64) {
        gauge_add(&self.deflaters, delta);
    }

    /// Connections holding a compressor of their own, on this worker.
    pub fn deflaters(&self) -> i64 {
        self.deflaters.load(Ordering::Relaxed)
    }

    /// Counts one compressed message received: `compressed` bytes that inflated to `inflated`.
    pub fn received(&self, compressed: usize, inflated: usize) {
        add(&self.messages_in, 1);
        add(&self.in_compressed_bytes, compressed as u64);
        add(&self.in_uncompressed_bytes, inflated as u64);
    }
}

/// What a worker's io backend reports about itself (see `ringgate_io_*` in `/metrics`).
#[derive(Debug, Default)]
pub struct IoCounters {
    /// Receives stopped by an empty provided-buffer ring.
    pub buffer_ring_empty: AtomicU64,
    /// Completion queue overflows.
    pub cq_overflows: AtomicU64,
    /// Multishot operations started again after the kernel ended them.
    pub multishot_rearms: AtomicU64,
    /// Loop turns.
    pub turns: AtomicU64,
    /// Events handled.
    pub events: AtomicU64,
}

/// Counters of one proxy upstream (one backend of one proxy route), shared by every worker: the
/// writes come once per upstream connection attempt or per read/write batch, never per message.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct UpstreamStats {
    /// Upstream TCP connections established.
    pub connects: AtomicU64,
    /// Upstream connection attempts that failed (refused, unreachable, timed out).
    pub connect_failures: AtomicU64,
    /// Relays open through this upstream (a gauge).
    pub relays_open: AtomicI64,
    /// Bytes written to the upstream (frames, after the handshake).
    pub bytes_to_upstream: AtomicU64,
    /// Bytes written to clients from this upstream's relays (frames, after the handshake).
    pub bytes_to_client: AtomicU64,
}

impl UpstreamStats {
    /// A relay through this upstream started.
    pub fn relay_opened(&self) {
        gauge_add(&self.relays_open, 1);
    }

    /// A relay through this upstream ended.
    pub fn relay_closed(&self) {
        gauge_add(&self.relays_open, -1);
    }
}

/// Adds `n` to a counter that only its own worker writes.
#[inline]
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

#[inline]
fn gauge_add(gauge: &AtomicI64, n: i64) {
    gauge.fetch_add(n, Ordering::Relaxed);
}

/// Converts a byte count for a signed gauge; no queue holds 2^63 bytes, so saturating is exact.
#[inline]
fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl WorkerStats {
    /// Counts a handshake that failed.
    pub fn handshake_failed(&self, why: HandshakeFailure) {
        add(&self.handshake_failures[why.index()], 1);
    }

    /// Counts a token refused before an upgrade, and the handshake it failed.
    pub fn auth_failed(&self, why: AuthFailure) {
        add(&self.auth_failures[why.index()], 1);
        let failure = if why == AuthFailure::Forbidden {
            HandshakeFailure::Forbidden
        } else {
            HandshakeFailure::Unauthorized
        };
        self.handshake_failed(failure);
    }

    /// Counts a Close frame we sent.
    pub fn close_sent(&self, code: CloseCode) {
        add(&self.close_codes_sent[close_code_slot(code)], 1);
    }

    /// Counts a Close frame we received.
    pub fn close_received(&self, code: CloseCode) {
        add(&self.close_codes_received[close_code_slot(code)], 1);
    }

    /// Counts `messages` WebSocket messages received on `route`, carrying `payload_bytes` of payload
    /// (after unmasking, headers excluded). Takes counts so a read's worth can be added at once.
    #[inline]
    pub fn messages_in(&self, route: RouteLabel, messages: u64, payload_bytes: u64) {
        let counters = &self.routes[route.index()];
        add(&counters.messages_in, messages);
        add(&counters.payload_bytes_in, payload_bytes);
    }

    /// Counts `messages` WebSocket messages queued for sending on `route`, carrying `payload_bytes`
    /// of payload (headers excluded). Takes counts so a write batch can be added at once.
    #[inline]
    pub fn messages_out(&self, route: RouteLabel, messages: u64, payload_bytes: u64) {
        let counters = &self.routes[route.index()];
        add(&counters.messages_out, messages);
        add(&counters.payload_bytes_out, payload_bytes);
    }

    /// Counts a plain HTTP request answered with `status`, by endpoint and status class.
    #[inline]
    pub fn http_request(&self, endpoint: HttpEndpoint, status: u16) {
        add(&self.http_requests[endpoint.index()][status_class_slot(status)], 1);
    }

    /// Counts a message over a connection's `limit`, and the connection's close if it `closed`.
    pub fn rate_limited(&self, limit: RateLimit, closed: bool) {
        add(&self.rate_limited_messages[limit.index()], 1);
        if closed {
            add(&self.rate_limit_closes[limit.index()], 1);
        }
    }

    /// Counts a TLS handshake completed with the suite in `slot`.
    pub fn tls_established(&self, slot: usize) {
        add(&self.tls_handshakes[slot.min(TLS_SUITE_SLOTS - 1)], 1);
    }

    /// Counts a TLS handshake that failed.
    pub fn tls_failed(&self, why: TlsFailure) {
        add(&self.tls_failures[why.index()], 1);
    }

    /// Counts a connection refused (429) for its address.
    pub fn address_refused(&self, why: AddressRefusal) {
        add(&self.address_refusals[why.index()], 1);
    }

    /// Counts a plain HTTP request refused for `reason` (its status counts in
    /// [`WorkerStats::http_request`] too).
    #[inline]
    pub fn http_refused(&self, reason: HttpRefusal) {
        add(&self.http_refusals[reason.index()], 1);
    }

    /// A topic got its first subscriber on this worker.
    #[inline]
    pub fn topic_opened(&self) {
        gauge_add(&self.topics, 1);
    }

    /// A topic lost its last subscriber on this worker.
    #[inline]
    pub fn topic_closed(&self) {
        gauge_add(&self.topics, -1);
    }

    /// A connection on this worker subscribed to a topic.
    #[inline]
    pub fn subscriber_added(&self) {
        gauge_add(&self.subscribers, 1);
    }

    /// A subscription on this worker ended (unsubscribed, closed, or dropped as slow).
    #[inline]
    pub fn subscriber_removed(&self) {
        gauge_add(&self.subscribers, -1);
    }

    /// `bytes` were queued for writing on one of this worker's connections.
    #[inline]
    pub fn queue_bytes_add(&self, bytes: u64) {
        gauge_add(&self.outbound_queue_bytes, signed(bytes));
    }

    /// `bytes` left this worker's write queues: written, or discarded with their connection.
    #[inline]
    pub fn queue_bytes_sub(&self, bytes: u64) {
        gauge_add(&self.outbound_queue_bytes, -signed(bytes));
    }

    fn load(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Messages received on `route`.
    fn route_messages_in(&self, route: RouteLabel) -> u64 {
        Self::load(&self.routes[route.index()].messages_in)
    }

    /// Messages sent on `route`.
    fn route_messages_out(&self, route: RouteLabel) -> u64 {
        Self::load(&self.routes[route.index()].messages_out)
    }
}

/// A snapshot summed over all workers, for the one-line summary logged at shutdown.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    /// Open connections.
    pub connections_open: u64,
    /// Accepted connections.
    pub connections_accepted: u64,
    /// Connections refused with 503.
    pub connections_rejected: u64,
    /// Completed handshakes.
    pub handshakes_completed: u64,
    /// Messages received, all routes.
    pub messages_in: u64,
    /// Messages sent, all routes.
    pub messages_out: u64,
    /// Bytes read from sockets.
    pub bytes_in: u64,
    /// Bytes written to sockets.
    pub bytes_out: u64,
    /// Messages published to topics.
    pub published: u64,
    /// Frames queued on subscribers.
    pub delivered: u64,
    /// Subscribers closed as slow consumers.
    pub slow_consumer_closes: u64,
    /// Frames not queued on slow consumers.
    pub slow_consumer_drops: u64,
    /// Handshake failures by label, non-zero ones only.
    pub handshake_failures: Vec<(&'static str, u64)>,
    /// Close codes sent, non-zero ones only.
    pub close_codes_sent: Vec<(String, u64)>,
    /// Close codes received, non-zero ones only.
    pub close_codes_received: Vec<(String, u64)>,
}

/// Sums the counters of all workers.
pub fn totals(workers: &[Arc<WorkerStats>]) -> Totals {
    let sum = |f: &dyn Fn(&WorkerStats) -> u64| -> u64 { workers.iter().map(|w| f(w)).sum() };
    let load = |f: &dyn Fn(&WorkerStats) -> &AtomicU64| -> u64 { sum(&|w| WorkerStats::load(f(w))) };
    let handshake_failures = ALL_HANDSHAKE_FAILURES
        .iter()
        .map(|kind| (kind.label(), load(&|w| &w.handshake_failures[kind.index()])))
        .filter(|(_, n)| *n > 0)
        .collect();
    let codes = |pick: &dyn Fn(&WorkerStats) -> &[AtomicU64; CLOSE_CODE_SLOTS]| {
        (0..CLOSE_CODE_SLOTS)
            .map(|slot| (close_code_label(slot).to_string(), load(&|w| &pick(w)[slot])))
            .filter(|(_, n)| *n > 0)
            .collect()
    };
    let all_routes = |f: fn(&WorkerStats, RouteLabel) -> u64| {
        sum(&|w| RouteLabel::ALL.iter().map(|&route| f(w, route)).sum())
    };
    Totals {
        connections_open: load(&|w| &w.connections_open),
        connections_accepted: load(&|w| &w.connections_accepted),
        connections_rejected: load(&|w| &w.connections_rejected),
        handshakes_completed: load(&|w| &w.handshakes_completed),
        messages_in: all_routes(WorkerStats::route_messages_in),
        messages_out: all_routes(WorkerStats::route_messages_out),
        bytes_in: load(&|w| &w.bytes_in),
        bytes_out: load(&|w| &w.bytes_out),
        published: load(&|w| &w.published),
        delivered: load(&|w| &w.delivered),
        slow_consumer_closes: load(&|w| &w.slow_consumer_closes),
        slow_consumer_drops: load(&|w| &w.slow_consumer_drops),
        handshake_failures,
        close_codes_sent: codes(&|w| &w.close_codes_sent),
        close_codes_received: codes(&|w| &w.close_codes_received),
    }
}

impl std::fmt::Display for Totals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pairs = |list: &[(String, u64)]| {
            list.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
        };
        let failures =
            self.handshake_failures.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        write!(
            f,
            "connections open={} accepted={} rejected={} handshakes={} handshake_failures=[{}] \
             messages in={} out={} bytes in={} out={} close_sent=[{}] close_received=[{}] \
             pubsub published={} delivered={} slow_consumer_closes={} slow_consumer_drops={}",
            self.connections_open,
            self.connections_accepted,
            self.connections_rejected,
            self.handshakes_completed,
            failures,
            self.messages_in,
            self.messages_out,
            self.bytes_in,
            self.bytes_out,
            pairs(&self.close_codes_sent),
            pairs(&self.close_codes_received),
            self.published,
            self.delivered,
            self.slow_consumer_closes,
            self.slow_consumer_drops,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_table_matches_indices() {
        for (i, kind) in ALL_HANDSHAKE_FAILURES.iter().enumerate() {
            assert_eq!(kind.index(), i, "{}", kind.label());
        }
        let mut labels: Vec<_> = ALL_HANDSHAKE_FAILURES.iter().map(|k| k.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), HANDSHAKE_FAILURE_KINDS, "labels must be distinct");
    }

    #[test]
    fn route_and_endpoint_tables_match_indices() {
        for (i, route) in RouteLabel::ALL.iter().enumerate() {
            assert_eq!(route.index(), i);
        }
        for (i, endpoint) in HttpEndpoint::ALL.iter().enumerate() {
            assert_eq!(endpoint.index(), i);
        }
        for (i, reason) in HttpRefusal::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
    }

    #[test]
    fn slots_stay_in_bounds() {
        for code in [0, 999, 1000, 1015, 1016, 3000, 4999, u16::MAX] {
            let slot = close_code_slot(CloseCode(code));
            assert!(slot < CLOSE_CODE_SLOTS);
        }
        assert_eq!(close_code_label(close_code_slot(CloseCode(1008))), "1008");
        assert_eq!(close_code_label(close_code_slot(CloseCode(4000))), "other");
        for (status, class) in [(101, "1xx"), (200, "2xx"), (304, "3xx"), (404, "4xx"), (503, "5xx")] {
            assert_eq!(status_class_label(status_class_slot(status)), class);
        }
        assert_eq!(status_class_label(status_class_slot(0)), "5xx");
        assert_eq!(status_class_label(status_class_slot(999)), "5xx");
    }

    #[test]
    fn totals_sum_routes_and_workers() {
        let workers: Vec<Arc<WorkerStats>> = (0..2).map(|_| Arc::default()).collect();
        workers[0].messages_in(RouteLabel::Echo, 3, 30);
        workers[1].messages_in(RouteLabel::PubSub, 4, 40);
        workers[1].messages_out(RouteLabel::PubSub, 5, 50);
        workers[0].messages_in(RouteLabel::Echo, 1, 10);
        workers[1].messages_out(RouteLabel::Echo, 2, 20);
        add(&workers[0].published, 6);
        workers[0].close_sent(CloseCode::GOING_AWAY);
        workers[1].close_sent(CloseCode::GOING_AWAY);
        workers[1].handshake_failed(HandshakeFailure::Timeout);

        let totals = totals(&workers);
        assert_eq!(totals.messages_in, 3 + 4 + 1);
        assert_eq!(totals.messages_out, 5 + 2);
        assert_eq!(totals.published, 6);
        assert_eq!(totals.close_codes_sent, vec![("1001".to_string(), 2)]);
        assert_eq!(totals.handshake_failures, vec![("timeout", 1)]);
        let line = totals.to_string();
        assert!(line.contains("messages in=8 out=7"), "{line}");
        assert!(line.contains("close_sent=[1001=2]"), "{line}");
        assert!(line.contains("pubsub published=6"), "{line}");
    }

    #[test]
    fn gauges_go_up_and_down() {
        let stats = WorkerStats::default();
        stats.topic_opened();
        stats.topic_opened();
        stats.topic_closed();
        stats.subscriber_added();
        stats.queue_bytes_add(100);
        stats.queue_bytes_sub(60);
        assert_eq!(stats.topics.load(Ordering::Relaxed), 1);
        assert_eq!(stats.subscribers.load(Ordering::Relaxed), 1);
        assert_eq!(stats.outbound_queue_bytes.load(Ordering::Relaxed), 40);
        stats.subscriber_removed();
        stats.subscriber_removed();
        assert_eq!(stats.subscribers.load(Ordering::Relaxed), -1, "an imbalance shows, not wraps");
    }
}
