//! The Prometheus text exposition format (version 0.0.4) of every worker's counters, for
//! `GET /metrics`.
//!
//! A scrape reads each atomic once (relaxed, no lock) and formats into a buffer the caller owns, so a
//! worker never waits for a scraper and a scraper never waits for a worker. Every family, and every
//! series in it, comes from a fixed table, so the output's shape does not depend on traffic. Must
//! never: write a family twice, a sample before its family's `# HELP` and `# TYPE`, two samples with
//! the same labels, or an unescaped label value: Prometheus rejects the whole scrape for any of them.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use super::{
    ALL_HANDSHAKE_FAILURES, AddressRefusal, CLOSE_CODE_SLOTS, HttpEndpoint, HttpRefusal, RateLimit,
    RouteLabel, STATUS_CLASSES, TLS_SUITE_SLOTS, WorkerStats, close_code_label, status_class_label,
};

/// The `Content-Type` of a response carrying [`render_prometheus`] output; scrapers pick their
/// parser by it.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the exposition reports about the process rather than about connections: gathered by the
/// caller at scrape time, because only it knows whether the gateway is draining and when it started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessInfo {
    /// Resident memory, from [`process_rss_bytes`]; `None` leaves the family out of the scrape.
    pub rss_bytes: Option<u64>,
    /// Whether the gateway is draining after SIGTERM/SIGINT, so dashboards can tell a deliberate
    /// drop in connections from an outage.
    pub draining: bool,
    /// When the process started, in seconds since the Unix epoch: lets queries spot restarts.
    pub start_time_seconds: f64,
    /// The io backend the workers run on (`uring` or `epoll`): a host where io_uring is blocked
    /// runs the fallback, and dashboards should say so.
    pub io_backend: &'static str,
}

/// The process's resident set size in bytes, from `/proc/self/statm`; `None` where that file is not
/// readable (not Linux, or `/proc` not mounted). Memory per connection is the figure this gateway is
/// judged by, so it belongs beside the connection counts.
pub fn process_rss_bytes() -> Option<u64> {
    // "size resident shared text lib data dt", in pages.
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_ascii_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions; it only reads a property of the running system.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page_size = u64::try_from(page_size).ok().filter(|&size| size > 0)?;
    resident_pages.checked_mul(page_size)
}

/// Appends the Prometheus text exposition of `workers` and `process` to `out`.
///
/// Every name starts with `ringgate_`; counters end in `_total`. `worker="N"` is the worker's
/// position in `workers` and labels the families where an imbalance between workers is worth seeing
/// (connections, messages and bytes, pub/sub gauges, queued bytes); the others are summed.
pub fn render_prometheus(out: &mut String, workers: &[Arc<WorkerStats>], process: &ProcessInfo) {
    use Kind::{Counter, Gauge};
    let sum = |pick: &dyn Fn(&WorkerStats) -> &AtomicU64| workers.iter().map(|w| load(pick(w))).sum::<u64>();

    family(out, "ringgate_build_info", Gauge, "Always 1; the version of the running binary is a label.")
        .sample(&[("version", env!("CARGO_PKG_VERSION")), ("io", process.io_backend)], 1u64);
    family(
        out,
        "ringgate_process_start_time_seconds",
        Gauge,
        "Start time of the process since the Unix epoch.",
    )
    .sample(&[], process.start_time_seconds);
    if let Some(rss) = process.rss_bytes {
        family(out, "ringgate_process_resident_memory_bytes", Gauge, "Resident memory of the process.")
            .sample(&[], rss);
    }
    family(out, "ringgate_draining", Gauge, "1 while the gateway drains connections before exiting, else 0.")
        .sample(&[], u64::from(process.draining));

    let per_worker = |out: &mut String, name, kind, help, value: &dyn Fn(&WorkerStats) -> Number| {
        let mut family = family(out, name, kind, help);
        for (index, worker) in workers.iter().enumerate() {
            family.sample(&[("worker", itoa::Buffer::new().format(index))], value(worker));
        }
    };
    per_worker(out, "ringgate_connections_open", Gauge, "Connections currently open.", &|w| {
        load(&w.connections_open).into()
    });
    per_worker(out, "ringgate_connections_accepted_total", Counter, "Connections accepted.", &|w| {
        load(&w.connections_accepted).into()
    });
    per_worker(
        out,
        "ringgate_connections_rejected_total",
        Counter,
        "Connections answered 503 because the connection limit was reached.",
        &|w| load(&w.connections_rejected).into(),
    );
    family(out, "ringgate_handshakes_completed_total", Counter, "WebSocket handshakes answered with 101.")
        .sample(&[], sum(&|w| &w.handshakes_completed));
    let mut failures = family(
        out,
        "ringgate_handshake_failures_total",
        Counter,
        "Connections that never became a WebSocket.",
    );
    for kind in ALL_HANDSHAKE_FAILURES {
        failures.sample(&[("reason", kind.label())], sum(&|w| &w.handshake_failures[kind.index()]));
    }

    let per_route = |out: &mut String, name, help, value: fn(&WorkerStats, RouteLabel) -> u64| {
        let mut family = family(out, name, Counter, help);
        for (index, worker) in workers.iter().enumerate() {
            let mut buffer = itoa::Buffer::new();
            let index = buffer.format(index);
            for route in RouteLabel::ALL {
                family.sample(&[("worker", index), ("route", route.label())], value(worker, route));
            }
        }
    };
    per_route(out, "ringgate_messages_received_total", "WebSocket messages received.", |w, route| {
        w.route_messages_in(route)
    });
    per_route(out, "ringgate_messages_sent_total", "WebSocket messages sent.", |w, route| {
        w.route_messages_out(route)
    });
    per_route(
        out,
        "ringgate_payload_received_bytes_total",
        "Payload bytes of the WebSocket messages received (frame headers excluded).",
        |w, route| load(&w.routes[route.index()].payload_bytes_in),
    );
    per_route(
        out,
        "ringgate_payload_sent_bytes_total",
        "Payload bytes of the WebSocket messages sent (frame headers excluded).",
        |w, route| load(&w.routes[route.index()].payload_bytes_out),
    );
    per_worker(
        out,
        "ringgate_socket_received_bytes_total",
        Counter,
        "Bytes read from sockets, HTTP and frame headers included.",
        &|w| load(&w.bytes_in).into(),
    );
    per_worker(
        out,
        "ringgate_socket_sent_bytes_total",
        Counter,
        "Bytes written to sockets, HTTP and frame headers included.",
        &|w| load(&w.bytes_out).into(),
    );

    let close_codes =
        |out: &mut String, name, help, pick: fn(&WorkerStats) -> &[AtomicU64; CLOSE_CODE_SLOTS]| {
            let mut family = family(out, name, Counter, help);
            for slot in 0..CLOSE_CODE_SLOTS {
                family.sample(&[("code", close_code_label(slot))], sum(&|w| &pick(w)[slot]));
            }
        };
    close_codes(
        out,
        "ringgate_close_frames_sent_total",
        "Close frames sent, by status code; codes outside 1000-1015 count as \"other\".",
        |w| &w.close_codes_sent,
    );
    close_codes(
        out,
        "ringgate_close_frames_received_total",
        "Close frames received, by status code; codes outside 1000-1015 count as \"other\".",
        |w| &w.close_codes_received,
    );

    family(
        out,
        "ringgate_pubsub_published_total",
        Counter,
        "Messages published to topics (WebSocket publishers and POST /publish), each counted once.",
    )
    .sample(&[], sum(&|w| &w.published));
    family(
        out,
        "ringgate_pubsub_delivered_total",
        Counter,
        "Frames queued on subscribers, one per subscriber.",
    )
    .sample(&[], sum(&|w| &w.delivered));
    family(
        out,
        "ringgate_slow_consumer_closes_total",
        Counter,
        "Subscribers closed with 1008 because their outbound queue went over the bound.",
    )
    .sample(&[], sum(&|w| &w.slow_consumer_closes));
    family(
        out,
        "ringgate_slow_consumer_drops_total",
        Counter,
        "Frames not queued on a subscriber whose outbound queue was over the bound.",
    )
    .sample(&[], sum(&|w| &w.slow_consumer_drops));
    family(
        out,
        "ringgate_pubsub_handoff_drops_total",
        Counter,
        "Frames not handed to another worker because it was too far behind, one per subscriber there.",
    )
    .sample(&[], sum(&|w| &w.handoff_drops));
    per_worker(
        out,
        "ringgate_pubsub_topics",
        Gauge,
        "Topics with subscribers on this worker; a topic with subscribers on N workers counts N times.",
        &|w| load_gauge(&w.topics).into(),
    );
    per_worker(out, "ringgate_pubsub_subscribers", Gauge, "Topic subscriptions held by connections.", &|w| {
        load_gauge(&w.subscribers).into()
    });
    per_worker(
        out,
        "ringgate_outbound_queue_bytes",
        Gauge,
        "Bytes queued for writing on connections and not yet written.",
        &|w| load_gauge(&w.outbound_queue_bytes).into(),
    );
    per_worker(
        out,
        "ringgate_io_buffer_ring_empty_total",
        Counter,
        "Receives that stopped because the worker's provided-buffer ring was empty (io_uring; \
         restarted at once, nothing lost). Growing fast means the pool is too small for the load.",
        &|w| load(&w.io.buffer_ring_empty).into(),
    );
    per_worker(
        out,
        "ringgate_io_cq_overflows_total",
        Counter,
        "Completions the io_uring completion queue had no room for (kept by the kernel and reaped later).",
        &|w| load(&w.io.cq_overflows).into(),
    );
    per_worker(
        out,
        "ringgate_io_multishot_rearms_total",
        Counter,
        "Multishot receives and accepts started again after the kernel ended them.",
        &|w| load(&w.io.multishot_rearms).into(),
    );
    per_worker(
        out,
        "ringgate_io_loop_turns_total",
        Counter,
        "Turns of the worker's event loop (one wait for I/O each).",
        &|w| load(&w.io.turns).into(),
    );
    per_worker(
        out,
        "ringgate_io_events_total",
        Counter,
        "Completions (or readiness events) the worker handled; divided by turns, the batch per turn.",
        &|w| load(&w.io.events).into(),
    );

    let mut http = family(
        out,
        "ringgate_http_requests_total",
        Counter,
        "Plain HTTP requests answered, by endpoint and status class.",
    );
    for endpoint in HttpEndpoint::ALL {
        for class in 0..STATUS_CLASSES {
            let value = sum(&|w| &w.http_requests[endpoint.index()][class]);
            http.sample(&[("endpoint", endpoint.label()), ("status", status_class_label(class))], value);
        }
    }
    let mut refusals = family(
        out,
        "ringgate_http_refusals_total",
        Counter,
        "Plain HTTP requests refused before they were served, by reason (their status counts in \
         ringgate_http_requests_total too); each refusal closes its connection.",
    );
    for reason in HttpRefusal::ALL {
        refusals.sample(&[("reason", reason.label())], sum(&|w| &w.http_refusals[reason.index()]));
    }
    render_compression(out, workers);
    render_auth(out, workers);
    render_rate_limits(out, workers);
    render_tls(out, workers);
}

/// The TLS families: handshakes by version and suite, failures by reason.
fn render_tls(out: &mut String, workers: &[Arc<WorkerStats>]) {
    use Kind::Counter;
    let sum = |pick: &dyn Fn(&WorkerStats) -> &AtomicU64| workers.iter().map(|w| load(pick(w))).sum::<u64>();
    let mut handshakes = family(
        out,
        "ringgate_tls_handshakes_total",
        Counter,
        "TLS handshakes completed, by protocol version and cipher suite agreed.",
    );
    for slot in 0..=crate::tls::cipher_suites().len().min(TLS_SUITE_SLOTS - 1) {
        let (version, suite) = crate::tls::suite_labels(slot);
        handshakes
            .sample(&[("version", version), ("cipher_suite", suite)], sum(&|w| &w.tls_handshakes[slot]));
    }
    let mut failures = family(
        out,
        "ringgate_tls_handshake_failures_total",
        Counter,
        "TLS handshakes that failed: not_tls (plaintext or garbage on a TLS port), incompatible (no \
         version, suite or ALPN protocol in common), alert_received (the client refused our \
         certificate), disconnected, timeout (--handshake-timeout), other.",
    );
    for why in crate::tls::TlsFailure::ALL {
        failures.sample(&[("reason", why.label())], sum(&|w| &w.tls_failures[why.index()]));
    }
    let mut bytes = family(
        out,
        "ringgate_tls_bytes_total",
        Counter,
        "Bytes of TLS records read from and written to sockets (ringgate_socket_*_bytes_total count \
         what they carried: HTTP and WebSocket bytes).",
    );
    bytes.sample(&[("direction", "in")], sum(&|w| &w.tls_bytes_in));
    bytes.sample(&[("direction", "out")], sum(&|w| &w.tls_bytes_out));
}

/// The rate-limit families: messages over a connection's rates, the closes they caused, and
/// connections refused for their address.
fn render_rate_limits(out: &mut String, workers: &[Arc<WorkerStats>]) {
    use Kind::Counter;
    let sum = |pick: &dyn Fn(&WorkerStats) -> &AtomicU64| workers.iter().map(|w| load(pick(w))).sum::<u64>();
    let mut limited = family(
        out,
        "ringgate_rate_limited_messages_total",
        Counter,
        "Messages (Pings and Pongs included) over their connection's --max-message-rate or \
         --max-byte-rate: dropped, or the one that closed the connection.",
    );
    for limit in RateLimit::ALL {
        limited.sample(&[("limit", limit.label())], sum(&|w| &w.rate_limited_messages[limit.index()]));
    }
    let mut closes = family(
        out,
        "ringgate_rate_limit_closes_total",
        Counter,
        "Connections closed with 1008 for going over a rate (--rate-limit-action close), by limit.",
    );
    for limit in RateLimit::ALL {
        closes.sample(&[("limit", limit.label())], sum(&|w| &w.rate_limit_closes[limit.index()]));
    }
    let mut refusals = family(
        out,
        "ringgate_address_refusals_total",
        Counter,
        "Connections refused with 429 for their address: it held --max-conns-per-ip connections \
         (conns_per_ip) or opened --max-conn-rate-per-ip in the last second (conn_rate_per_ip).",
    );
    for why in AddressRefusal::ALL {
        refusals.sample(&[("reason", why.label())], sum(&|w| &w.address_refusals[why.index()]));
    }
}

/// The per-address table's size, when a per-address limit is configured.
pub fn render_address_table(out: &mut String, tracked_addresses: usize) {
    family(
        out,
        "ringgate_tracked_addresses",
        Kind::Gauge,
        "Addresses (IPv4, or IPv6 /64) the per-address limits hold counts for (about 60 bytes each).",
    )
    .sample(&[], tracked_addresses as u64);
}

/// The JWT families: refusals by reason, refused publishes, expiries while connected.
fn render_auth(out: &mut String, workers: &[Arc<WorkerStats>]) {
    use Kind::Counter;
    let sum = |pick: &dyn Fn(&WorkerStats) -> &AtomicU64| workers.iter().map(|w| load(pick(w))).sum::<u64>();
    let mut failures = family(
        out,
        "ringgate_auth_failures_total",
        Counter,
        "Upgrades refused for their token: missing (401), invalid, expired, not_yet_valid, \
         wrong_issuer_or_audience (401), forbidden (403: the token does not grant the topic).",
    );
    for why in crate::gateway::auth::AuthFailure::ALL {
        failures.sample(&[("reason", why.label())], sum(&|w| &w.auth_failures[why.index()]));
    }
    family(
        out,
        "ringgate_auth_refused_publishes_total",
        Counter,
        "Pub/sub messages from connections whose token may not publish to their topic (closed or dropped).",
    )
    .sample(&[], sum(&|w| &w.refused_publishes));
    family(
        out,
        "ringgate_auth_token_expiries_total",
        Counter,
        "Connections closed with 3000 because their token expired while they were connected.",
    )
    .sample(&[], sum(&|w| &w.token_expiries));
}

/// The permessage-deflate families: what compression saves, what it runs, what it holds.
fn render_compression(out: &mut String, workers: &[Arc<WorkerStats>]) {
    use Kind::{Counter, Gauge};
    let sum = |pick: &dyn Fn(&WorkerStats) -> &AtomicU64| workers.iter().map(|w| load(pick(w))).sum::<u64>();
    let gauge = |out: &mut String, name, help, pick: &dyn Fn(&WorkerStats) -> &AtomicI64| {
        let mut family = family(out, name, Gauge, help);
        for (index, worker) in workers.iter().enumerate() {
            family.sample(&[("worker", itoa::Buffer::new().format(index))], load_gauge(pick(worker)));
        }
    };
    gauge(out, "ringgate_compression_connections", "Connections that agreed permessage-deflate.", &|w| {
        &w.compression.connections
    });
    gauge(
        out,
        "ringgate_compression_inflaters",
        "Connections holding a decompressor of their own (about 40 KiB each): the client keeps its \
         compression context and has sent compressed data.",
        &|w| &w.compression.inflaters,
    );
    gauge(
        out,
        "ringgate_compression_deflaters",
        "Connections holding a compressor of their own (dedicated mode, about 310 KiB each at 15 window bits).",
        &|w| &w.compression.deflaters,
    );
    family(
        out,
        "ringgate_compression_runs_total",
        Counter,
        "Messages run through a compressor; a pub/sub message is compressed once per worker in \
         shared mode, however many subscribers receive it.",
    )
    .sample(&[], sum(&|w| &w.compression.runs));
    let mut messages =
        family(out, "ringgate_compressed_messages_total", Counter, "Messages sent or received compressed.");
    messages.sample(&[("direction", "in")], sum(&|w| &w.compression.messages_in));
    messages.sample(&[("direction", "out")], sum(&|w| &w.compression.messages_out));
    let mut bytes = family(
        out,
        "ringgate_compression_payload_bytes_total",
        Counter,
        "Payload of compressed messages, before and after compression (stage=uncompressed|compressed), \
         by direction: compressed over uncompressed is the ratio on the wire.",
    );
    bytes.sample(
        &[("direction", "in"), ("stage", "compressed")],
        sum(&|w| &w.compression.in_compressed_bytes),
    );
    bytes.sample(
        &[("direction", "in"), ("stage", "uncompressed")],
        sum(&|w| &w.compression.in_uncompressed_bytes),
    );
    bytes.sample(
        &[("direction", "out"), ("stage", "compressed")],
        sum(&|w| &w.compression.out_compressed_bytes),
    );
    bytes.sample(
        &[("direction", "out"), ("stage", "uncompressed")],
        sum(&|w| &w.compression.out_uncompressed_bytes),
    );
}

/// One proxy upstream's counters and the labels they are exposed under.
pub struct UpstreamLabels<'a> {
    /// The proxy route's path prefix.
    pub route: &'a str,
    /// The upstream's URL as configured.
    pub upstream: &'a str,
    /// Its counters.
    pub stats: &'a super::UpstreamStats,
}

/// Renders the per-upstream families of the proxy routes (nothing when there are none).
pub fn render_upstreams(out: &mut String, upstreams: &[UpstreamLabels<'_>]) {
    use Kind::{Counter, Gauge};
    if upstreams.is_empty() {
        return;
    }
    let each = |out: &mut String, name, kind, help, value: &dyn Fn(&super::UpstreamStats) -> Number| {
        let mut family = family(out, name, kind, help);
        for u in upstreams {
            family.sample(&[("route", u.route), ("upstream", u.upstream)], value(u.stats));
        }
    };
    each(out, "ringgate_upstream_connects_total", Counter, "Upstream connections established.", &|s| {
        load(&s.connects).into()
    });
    each(
        out,
        "ringgate_upstream_connect_failures_total",
        Counter,
        "Upstream connection attempts that failed (refused, unreachable or timed out).",
        &|s| load(&s.connect_failures).into(),
    );
    each(
        out,
        "ringgate_upstream_relays_open",
        Gauge,
        "Client connections relayed to the upstream now.",
        &|s| load_gauge(&s.relays_open).into(),
    );
    let mut bytes = family(
        out,
        "ringgate_upstream_bytes_total",
        Counter,
        "WebSocket bytes relayed, by direction: to the upstream, or from it to clients.",
    );
    for u in upstreams {
        for (direction, counter) in
            [("to_upstream", &u.stats.bytes_to_upstream), ("to_client", &u.stats.bytes_to_client)]
        {
            bytes.sample(
                &[("route", u.route), ("upstream", u.upstream), ("direction", direction)],
                load(counter),
            );
        }
    }
}

/// Renders the cross-node broker's families, for a node started with `--broker` (nothing without
/// one: an in-process node has no broker to be connected to).
pub fn render_broker(out: &mut String, stats: &super::BrokerStats, engine: &'static str) {
    use Kind::{Counter, Gauge};
    family(
        out,
        "ringgate_broker_connected",
        Gauge,
        "1 while the node is connected to its cross-node broker; 0 while it delivers locally only \
         and reconnects (GET /healthz then answers \"degraded\").",
    )
    .sample(&[("engine", engine)], u64::from(stats.is_connected()));
    family(
        out,
        "ringgate_broker_subscribed_topics",
        Gauge,
        "Topics this node is subscribed to at the broker (those with a local subscriber).",
    )
    .sample(&[], stats.subscribed_topics());
    family(
        out,
        "ringgate_broker_reconnects_total",
        Counter,
        "Connections to the broker established again after one was lost (or the first attempt failed).",
    )
    .sample(&[], load(&stats.reconnects));
    family(
        out,
        "ringgate_broker_published_total",
        Counter,
        "Messages this node sent to the broker, each once however many nodes receive it.",
    )
    .sample(&[], load(&stats.published));
    family(
        out,
        "ringgate_broker_received_total",
        Counter,
        "Messages from other nodes received from the broker (this node's own are filtered, not counted).",
    )
    .sample(&[], load(&stats.received));
    let mut drops = family(
        out,
        "ringgate_broker_drops_total",
        Counter,
        "Messages that did not cross the broker, by reason: queue_full (the queue to the broker \
         thread, or a NATS subscription's queue in the client), disconnected (published while the broker was away: delivered locally only), \
         handoff (a worker too far behind, per subscriber there), malformed (not a ringgate envelope).",
    );
    for why in super::BrokerDrop::ALL {
        drops.sample(&[("reason", why.label())], stats.drops(why));
    }
}

/// Renders the topic history's families, for a node started with `--history-size` or
/// `--positions` (nothing without: a node that keeps no history has nothing to count). With the
/// history in Redis the held-messages gauges and evictions stay 0: Redis holds it.
pub fn render_history(out: &mut String, stats: &crate::gateway::history::HistoryStats) {
    use Kind::{Counter, Gauge};
    family(
        out,
        "ringgate_history_messages",
        Gauge,
        "Messages held in topic histories now (--history-size per topic at most).",
    )
    .sample(&[], stats.messages());
    family(
        out,
        "ringgate_history_bytes",
        Gauge,
        "Bytes of the frames held in topic histories now (shared with subscribers' queues, not copies).",
    )
    .sample(&[], stats.bytes());
    family(out, "ringgate_history_topics", Gauge, "Topics with a history (an epoch and offsets) now.")
        .sample(&[], stats.topics());
    let mut recoveries = family(
        out,
        "ringgate_history_recoveries_total",
        Counter,
        "Subscribers that asked ?since=, by outcome: recovered (replayed), epoch_changed, too_old \
         (no longer held, or ahead), unavailable (no history on this node, or the history in Redis \
         could not be read).",
    );
    for outcome in crate::gateway::history::Outcome::ALL {
        recoveries.sample(&[("outcome", outcome.label())], stats.recoveries(outcome));
    }
    family(
        out,
        "ringgate_history_replayed_total",
        Counter,
        "Messages replayed from history to recovering subscribers.",
    )
    .sample(&[], load(&stats.replayed));
    let mut evicted = family(
        out,
        "ringgate_history_evicted_total",
        Counter,
        "Messages that left a topic history, by reason: size (--history-size newer ones), ttl \
         (--history-ttl), topics (dropped with their topic's history, pushed out past --history-topics).",
    );
    evicted.sample(&[("reason", "size")], load(&stats.evicted_size));
    evicted.sample(&[("reason", "ttl")], load(&stats.evicted_ttl));
    evicted.sample(&[("reason", "topics")], load(&stats.evicted_topics));
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn load_gauge(gauge: &AtomicI64) -> i64 {
    gauge.load(Ordering::Relaxed)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// A sample value; integers are written exactly, never through a float.
#[derive(Clone, Copy, Debug)]
enum Number {
    Unsigned(u64),
    Signed(i64),
    Float(f64),
}

impl From<u64> for Number {
    fn from(n: u64) -> Number {
        Number::Unsigned(n)
    }
}

impl From<i64> for Number {
    fn from(n: i64) -> Number {
        Number::Signed(n)
    }
}

impl From<f64> for Number {
    fn from(n: f64) -> Number {
        Number::Float(n)
    }
}

/// A family whose `# HELP` and `# TYPE` lines are written; its samples follow.
struct Family<'o> {
    out: &'o mut String,
    name: &'static str,
}

/// Starts the family `name`: the only way to get a [`Family`] to write samples into, so no sample
/// can come before its metadata.
fn family<'o>(out: &'o mut String, name: &'static str, kind: Kind, help: &str) -> Family<'o> {
    debug_assert!(is_name(name, true) && name.starts_with("ringgate_"), "bad metric name {name}");
    debug_assert_eq!(kind == Kind::Counter, name.ends_with("_total"), "{name}: only counters end in _total");
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    push_escaped(out, help, false);
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push_str(match kind {
        Kind::Counter => " counter\n",
        Kind::Gauge => " gauge\n",
    });
    Family { out, name }
}

impl Family<'_> {
    fn sample(&mut self, labels: &[(&str, &str)], value: impl Into<Number>) {
        let out = &mut *self.out;
        out.push_str(self.name);
        if !labels.is_empty() {
            out.push('{');
            for (i, (name, value)) in labels.iter().enumerate() {
                debug_assert!(is_name(name, false) && !name.starts_with("__"), "bad label name {name}");
                if i > 0 {
                    out.push(',');
                }
                out.push_str(name);
                out.push_str("=\"");
                push_escaped(out, value, true);
                out.push('"');
            }
            out.push('}');
        }
        out.push(' ');
        push_number(out, value.into());
        out.push('\n');
    }
}

/// Escapes per the text format: `\` and line feed in help text, and also `"` in label values.
fn push_escaped(out: &mut String, text: &str, label_value: bool) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if label_value => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// Writes a value as Go's `ParseFloat` reads it (`+Inf`, `-Inf`, `NaN`).
fn push_number(out: &mut String, value: Number) {
    match value {
        Number::Unsigned(n) => out.push_str(itoa::Buffer::new().format(n)),
        Number::Signed(n) => out.push_str(itoa::Buffer::new().format(n)),
        Number::Float(f) if f.is_nan() => out.push_str("NaN"),
        Number::Float(f) if f.is_infinite() => out.push_str(if f > 0.0 { "+Inf" } else { "-Inf" }),
        // Display is the shortest text that reads back as the same f64; writing to a String cannot fail.
        Number::Float(f) => {
            let _ = write!(out, "{f}");
        }
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*` for metric names, the same without `:` for label names.
fn is_name(name: &str, colons: bool) -> bool {
    let allowed = |c: char| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':');
    let mut chars = name.chars();
    chars.next().is_some_and(allowed) && chars.all(|c| allowed(c) || c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap, HashSet};

    use openmetrics_parser::prometheus::parse_prometheus;
    use openmetrics_parser::{MetricsExposition, PrometheusType, PrometheusValue};

    use super::*;
    use crate::metrics::{HandshakeFailure, add};
    use crate::proto::close::CloseCode;
    use crate::proto::handshake::HandshakeError;

    type Exposition = MetricsExposition<PrometheusType, PrometheusValue>;

    const PROCESS: ProcessInfo = ProcessInfo {
        rss_bytes: Some(12 << 20),
        draining: false,
        start_time_seconds: 1_700_000_000.25,
        io_backend: "uring",
    };

    fn render(workers: &[Arc<WorkerStats>], process: &ProcessInfo) -> String {
        let mut out = String::new();
        render_prometheus(&mut out, workers, process);
        out
    }

    fn parse(text: &str) -> Exposition {
        parse_prometheus(text).unwrap_or_else(|e| panic!("exposition does not parse: {e}\n{text}"))
    }

    /// Every family a scrape holds, with its type.
    fn expected_families() -> Vec<(&'static str, PrometheusType)> {
        use PrometheusType::{Counter, Gauge};
        vec![
            ("ringgate_build_info", Gauge),
            ("ringgate_process_start_time_seconds", Gauge),
            ("ringgate_process_resident_memory_bytes", Gauge),
            ("ringgate_draining", Gauge),
            ("ringgate_connections_open", Gauge),
            ("ringgate_connections_accepted_total", Counter),
            ("ringgate_connections_rejected_total", Counter),
            ("ringgate_handshakes_completed_total", Counter),
            ("ringgate_handshake_failures_total", Counter),
            ("ringgate_messages_received_total", Counter),
            ("ringgate_messages_sent_total", Counter),
            ("ringgate_payload_received_bytes_total", Counter),
            ("ringgate_payload_sent_bytes_total", Counter),
            ("ringgate_socket_received_bytes_total", Counter),
            ("ringgate_socket_sent_bytes_total", Counter),
            ("ringgate_close_frames_sent_total", Counter),
            ("ringgate_close_frames_received_total", Counter),
            ("ringgate_pubsub_published_total", Counter),
            ("ringgate_pubsub_delivered_total", Counter),
            ("ringgate_slow_consumer_closes_total", Counter),
            ("ringgate_slow_consumer_drops_total", Counter),
            ("ringgate_pubsub_handoff_drops_total", Counter),
            ("ringgate_pubsub_topics", Gauge),
            ("ringgate_pubsub_subscribers", Gauge),
            ("ringgate_outbound_queue_bytes", Gauge),
            ("ringgate_io_buffer_ring_empty_total", Counter),
            ("ringgate_io_cq_overflows_total", Counter),
            ("ringgate_io_multishot_rearms_total", Counter),
            ("ringgate_io_loop_turns_total", Counter),
            ("ringgate_io_events_total", Counter),
            ("ringgate_http_requests_total", Counter),
            ("ringgate_http_refusals_total", Counter),
            ("ringgate_compression_connections", Gauge),
            ("ringgate_compression_inflaters", Gauge),
            ("ringgate_compression_deflaters", Gauge),
            ("ringgate_compression_runs_total", Counter),
            ("ringgate_compressed_messages_total", Counter),
            ("ringgate_compression_payload_bytes_total", Counter),
            ("ringgate_auth_failures_total", Counter),
            ("ringgate_auth_refused_publishes_total", Counter),
            ("ringgate_auth_token_expiries_total", Counter),
            ("ringgate_rate_limited_messages_total", Counter),
            ("ringgate_rate_limit_closes_total", Counter),
            ("ringgate_address_refusals_total", Counter),
            ("ringgate_tls_handshakes_total", Counter),
            ("ringgate_tls_handshake_failures_total", Counter),
            ("ringgate_tls_bytes_total", Counter),
        ]
    }

    fn number(value: &PrometheusValue) -> f64 {
        match value {
            PrometheusValue::Counter(counter) => counter.value.as_f64(),
            PrometheusValue::Gauge(gauge) => gauge.as_f64(),
            other => panic!("unexpected sample kind {other:?}"),
        }
    }

    /// Every series of the scrape: (family, labels) -> value.
    fn series(exposition: &Exposition) -> HashMap<(String, BTreeMap<String, String>), f64> {
        let mut all = HashMap::new();
        for (name, family) in &exposition.families {
            for sample in family.iter_samples() {
                let labels: BTreeMap<String, String> =
                    sample.get_labelset().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                let previous = all.insert((name.clone(), labels.clone()), number(&sample.value));
                assert!(previous.is_none(), "duplicate series {name}{labels:?}");
            }
        }
        all
    }

    fn value(exposition: &Exposition, family: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> =
            labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let found = series(exposition).get(&(family.to_string(), want)).copied();
        found.unwrap_or_else(|| panic!("no series {family}{labels:?}"))
    }

    /// Two workers with distinct, known values in every kind of counter and gauge.
    fn busy_workers() -> Vec<Arc<WorkerStats>> {
        let workers: Vec<Arc<WorkerStats>> = (0..2).map(|_| Arc::default()).collect();
        let (w0, w1) = (&workers[0], &workers[1]);
        add(&w0.connections_accepted, 10);
        add(&w0.connections_open, 7);
        add(&w1.connections_accepted, 20);
        add(&w1.connections_open, 2);
        add(&w1.connections_rejected, 3);
        add(&w0.handshakes_completed, 9);
        add(&w1.handshakes_completed, 18);
        w0.handshake_failed(HandshakeFailure::Protocol(HandshakeError::BadKey));
        w1.handshake_failed(HandshakeFailure::Protocol(HandshakeError::BadKey));
        w1.handshake_failed(HandshakeFailure::Timeout);
        w0.messages_in(RouteLabel::Echo, 100, 1000);
        w0.messages_out(RouteLabel::Echo, 100, 1000);
        w1.messages_in(RouteLabel::PubSub, 5, 50);
        w1.messages_out(RouteLabel::PubSub, 40, 400);
        add(&w0.bytes_in, 1600);
        add(&w1.bytes_out, 700);
        w0.close_sent(CloseCode::GOING_AWAY);
        w1.close_sent(CloseCode::GOING_AWAY);
        w1.close_sent(CloseCode(4001));
        w0.close_received(CloseCode::NORMAL);
        add(&w1.published, 5);
        add(&w0.delivered, 30);
        add(&w1.delivered, 10);
        add(&w1.slow_consumer_closes, 1);
        add(&w1.slow_consumer_drops, 4);
        add(&w0.handoff_drops, 2);
        add(&w1.handoff_drops, 3);
        w0.topic_opened();
        w1.topic_opened();
        w1.topic_opened();
        w1.subscriber_added();
        w1.queue_bytes_add(4096);
        w1.queue_bytes_sub(1024);
        w0.http_request(HttpEndpoint::Metrics, 200);
        w1.http_request(HttpEndpoint::Metrics, 200);
        w1.http_request(HttpEndpoint::Publish, 413);
        w1.http_refused(HttpRefusal::TooLarge);
        w0.http_refused(HttpRefusal::InvalidToken);
        w1.http_refused(HttpRefusal::InvalidToken);
        w0.rate_limited(RateLimit::Messages, false);
        w1.rate_limited(RateLimit::Messages, true);
        w1.address_refused(AddressRefusal::TooManyConnections);
        workers
    }

    #[test]
    fn exposition_parses_with_every_family_typed_and_documented() {
        let text = render(&busy_workers(), &PROCESS);
        let exposition = parse(&text);

        let expected = expected_families();
        let mut names: Vec<&str> = exposition.families.keys().map(String::as_str).collect();
        let mut want: Vec<&str> = expected.iter().map(|(name, _)| *name).collect();
        names.sort_unstable();
        want.sort_unstable();
        assert_eq!(names, want);
        for (name, kind) in expected {
            let family = &exposition.families[name];
            assert_eq!(family.family_type, kind, "{name}");
            assert!(!family.help.is_empty(), "{name} has no help");
        }

        // The parser merges what it reads; check the text itself says each family's HELP and TYPE
        // exactly once, before any of its samples.
        let mut declared: HashMap<&str, (usize, usize)> = HashMap::new();
        for line in text.lines() {
            let mut words = line.split(' ');
            match (words.next(), words.next(), words.next()) {
                (Some("#"), Some("HELP"), Some(name)) => declared.entry(name).or_default().0 += 1,
                (Some("#"), Some("TYPE"), Some(name)) => declared.entry(name).or_default().1 += 1,
                (Some(sample), ..) => {
                    let name = sample.split(['{', ' ']).next().unwrap();
                    assert_eq!(declared.get(name), Some(&(1, 1)), "sample before metadata: {line}");
                }
                _ => unreachable!(),
            }
        }
        assert!(declared.values().all(|&counts| counts == (1, 1)), "{declared:?}");
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn label_sets_are_unique_and_complete() {
        let exposition = parse(&render(&busy_workers(), &PROCESS));
        let series = series(&exposition); // panics on a duplicate
        let count = |family: &str| series.keys().filter(|(name, _)| name == family).count();
        assert_eq!(count("ringgate_connections_open"), 2);
        assert_eq!(count("ringgate_messages_received_total"), 2 * RouteLabel::ALL.len());
        assert_eq!(count("ringgate_handshake_failures_total"), ALL_HANDSHAKE_FAILURES.len());
        assert_eq!(count("ringgate_close_frames_sent_total"), CLOSE_CODE_SLOTS);
        assert_eq!(count("ringgate_http_requests_total"), HttpEndpoint::ALL.len() * STATUS_CLASSES);
        assert_eq!(count("ringgate_http_refusals_total"), HttpRefusal::ALL.len());
        assert_eq!(count("ringgate_rate_limited_messages_total"), RateLimit::ALL.len());
        assert_eq!(count("ringgate_address_refusals_total"), AddressRefusal::ALL.len());
        for family in exposition.families.values() {
            let mut seen = HashSet::new();
            for sample in family.iter_samples() {
                let labels: Vec<String> = sample.get_labelset().unwrap().iter_values().cloned().collect();
                assert!(seen.insert(labels), "duplicate labels in {}", family.family_name);
            }
        }
    }

    #[test]
    fn samples_carry_the_counted_values() {
        let exposition = parse(&render(&busy_workers(), &PROCESS));
        let v = |family: &str, labels: &[(&str, &str)]| value(&exposition, family, labels);

        assert_eq!(v("ringgate_connections_open", &[("worker", "0")]), 7.0);
        assert_eq!(v("ringgate_connections_open", &[("worker", "1")]), 2.0);
        assert_eq!(v("ringgate_connections_accepted_total", &[("worker", "1")]), 20.0);
        assert_eq!(v("ringgate_connections_rejected_total", &[("worker", "0")]), 0.0);
        assert_eq!(v("ringgate_connections_rejected_total", &[("worker", "1")]), 3.0);
        assert_eq!(v("ringgate_handshakes_completed_total", &[]), 27.0);
        assert_eq!(v("ringgate_handshake_failures_total", &[("reason", "bad_key")]), 2.0);
        assert_eq!(v("ringgate_handshake_failures_total", &[("reason", "timeout")]), 1.0);
        assert_eq!(v("ringgate_handshake_failures_total", &[("reason", "not_found")]), 0.0);
        let route = |worker, route| [("worker", worker), ("route", route)];
        assert_eq!(v("ringgate_messages_received_total", &route("0", "echo")), 100.0);
        assert_eq!(v("ringgate_messages_received_total", &route("0", "pubsub")), 0.0);
        assert_eq!(v("ringgate_messages_received_total", &route("1", "pubsub")), 5.0);
        assert_eq!(v("ringgate_messages_sent_total", &route("1", "pubsub")), 40.0);
        assert_eq!(v("ringgate_payload_received_bytes_total", &route("0", "echo")), 1000.0);
        assert_eq!(v("ringgate_payload_sent_bytes_total", &route("1", "pubsub")), 400.0);
        assert_eq!(v("ringgate_socket_received_bytes_total", &[("worker", "0")]), 1600.0);
        assert_eq!(v("ringgate_socket_sent_bytes_total", &[("worker", "1")]), 700.0);
        assert_eq!(v("ringgate_close_frames_sent_total", &[("code", "1001")]), 2.0);
        assert_eq!(v("ringgate_close_frames_sent_total", &[("code", "other")]), 1.0);
        assert_eq!(v("ringgate_close_frames_received_total", &[("code", "1000")]), 1.0);
        assert_eq!(v("ringgate_close_frames_received_total", &[("code", "1001")]), 0.0);
        assert_eq!(v("ringgate_pubsub_published_total", &[]), 5.0);
        assert_eq!(v("ringgate_pubsub_delivered_total", &[]), 40.0);
        assert_eq!(v("ringgate_slow_consumer_closes_total", &[]), 1.0);
        assert_eq!(v("ringgate_slow_consumer_drops_total", &[]), 4.0);
        assert_eq!(v("ringgate_pubsub_handoff_drops_total", &[]), 5.0, "summed over workers");
        assert_eq!(v("ringgate_pubsub_topics", &[("worker", "1")]), 2.0);
        assert_eq!(v("ringgate_pubsub_subscribers", &[("worker", "0")]), 0.0);
        assert_eq!(v("ringgate_pubsub_subscribers", &[("worker", "1")]), 1.0);
        assert_eq!(v("ringgate_outbound_queue_bytes", &[("worker", "1")]), 3072.0);
        let http = |endpoint, status| [("endpoint", endpoint), ("status", status)];
        assert_eq!(v("ringgate_http_requests_total", &http("metrics", "2xx")), 2.0);
        assert_eq!(v("ringgate_http_requests_total", &http("publish", "4xx")), 1.0);
        assert_eq!(v("ringgate_http_requests_total", &http("healthz", "2xx")), 0.0);
        assert_eq!(v("ringgate_http_refusals_total", &[("reason", "too_large")]), 1.0);
        assert_eq!(v("ringgate_http_refusals_total", &[("reason", "invalid_token")]), 2.0);
        assert_eq!(v("ringgate_rate_limited_messages_total", &[("limit", "message_rate")]), 2.0);
        assert_eq!(v("ringgate_rate_limited_messages_total", &[("limit", "byte_rate")]), 0.0);
        assert_eq!(v("ringgate_rate_limit_closes_total", &[("limit", "message_rate")]), 1.0);
        assert_eq!(v("ringgate_address_refusals_total", &[("reason", "conns_per_ip")]), 1.0);
        assert_eq!(v("ringgate_address_refusals_total", &[("reason", "conn_rate_per_ip")]), 0.0);
        assert_eq!(v("ringgate_http_refusals_total", &[("reason", "forbidden_origin")]), 0.0);
        assert_eq!(v("ringgate_process_resident_memory_bytes", &[]), f64::from(12 << 20));
        assert_eq!(v("ringgate_process_start_time_seconds", &[]), 1_700_000_000.25);
        assert_eq!(v("ringgate_draining", &[]), 0.0);
        assert_eq!(v("ringgate_build_info", &[("version", env!("CARGO_PKG_VERSION")), ("io", "uring")]), 1.0);
    }

    #[test]
    fn counters_only_grow() {
        let workers = busy_workers();
        let before = series(&parse(&render(&workers, &PROCESS)));
        for worker in &workers {
            add(&worker.connections_accepted, 1);
            add(&worker.connections_rejected, 1);
            add(&worker.handshakes_completed, 1);
            worker.handshake_failed(HandshakeFailure::NotFound);
            worker.messages_in(RouteLabel::Echo, 1, 8);
            worker.messages_out(RouteLabel::PubSub, 2, 16);
            add(&worker.bytes_in, 10);
            add(&worker.bytes_out, 10);
            worker.close_sent(CloseCode::POLICY_VIOLATION);
            worker.close_received(CloseCode(3000));
            add(&worker.published, 1);
            add(&worker.delivered, 1);
            add(&worker.slow_consumer_closes, 1);
            add(&worker.slow_consumer_drops, 1);
            add(&worker.handoff_drops, 1);
            worker.http_request(HttpEndpoint::Healthz, 503);
            worker.http_refused(HttpRefusal::BadHost);
            let io = &worker.io;
            for counter in
                [&io.buffer_ring_empty, &io.cq_overflows, &io.multishot_rearms, &io.turns, &io.events]
            {
                add(counter, 1);
            }
            let compression = &worker.compression;
            add(&compression.runs, 1);
            add(&compression.messages_out, 1);
            add(&compression.out_uncompressed_bytes, 1);
            add(&compression.out_compressed_bytes, 1);
            compression.received(1, 1);
            worker.auth_failed(crate::gateway::auth::AuthFailure::Missing);
            add(&worker.refused_publishes, 1);
            add(&worker.token_expiries, 1);
            worker.rate_limited(RateLimit::Bytes, true);
            worker.address_refused(AddressRefusal::TooManyNewConnections);
            worker.tls_established(1);
            worker.tls_failed(crate::tls::TlsFailure::NotTls);
            add(&worker.tls_bytes_in, 1);
            // Gauges may go down, counters must not notice.
            worker.topic_closed();
            worker.queue_bytes_sub(10);
        }
        let after = series(&parse(&render(&workers, &PROCESS)));
        assert_eq!(before.len(), after.len(), "the set of series does not depend on traffic");

        let counters: HashSet<&str> = expected_families()
            .into_iter()
            .filter(|(_, kind)| *kind == PrometheusType::Counter)
            .map(|(name, _)| name)
            .collect();
        let mut grew = HashSet::new();
        for (key, old) in &before {
            let new = after[key];
            if counters.contains(key.0.as_str()) {
                assert!(new >= *old, "{key:?} went from {old} to {new}");
                if new > *old {
                    grew.insert(key.0.clone());
                }
            }
        }
        let all_counters: HashSet<String> = counters.iter().map(|name| name.to_string()).collect();
        assert_eq!(grew, all_counters, "every counter family was incremented");
    }

    #[test]
    fn process_families_follow_process_info() {
        let draining =
            ProcessInfo { rss_bytes: None, draining: true, start_time_seconds: 1.5, io_backend: "epoll" };
        let exposition = parse(&render(&[], &draining));
        assert!(!exposition.families.contains_key("ringgate_process_resident_memory_bytes"));
        assert_eq!(value(&exposition, "ringgate_draining", &[]), 1.0);
        assert_eq!(value(&exposition, "ringgate_process_start_time_seconds", &[]), 1.5);
        assert_eq!(exposition.families["ringgate_connections_open"].iter_samples().count(), 0);
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut text = String::new();
        push_escaped(&mut text, "a\\b\"c\nd", true);
        assert_eq!(text, r#"a\\b\"c\nd"#);
        text.clear();
        push_escaped(&mut text, "a\\b\"c\nd", false);
        assert_eq!(text, r#"a\\b"c\nd"#, "help text keeps its quotes");

        // A strict parser reads back exactly what was meant.
        let awkward = "C:\\dir\\\"file\".txt\nline two, {braces}=x é";
        let mut out = String::new();
        family(&mut out, "ringgate_test_info", Kind::Gauge, "Help with \\ and\nnewline \"quoted\".")
            .sample(&[("path", awkward), ("plain", "ok")], 1u64);
        assert_eq!(out.lines().count(), 3, "a newline in a value must not break the line: {out}");
        let exposition = parse(&out);
        let family = &exposition.families["ringgate_test_info"];
        assert_eq!(family.help, "Help with \\ and\nnewline \"quoted\".");
        let sample = family.iter_samples().next().unwrap();
        let labels = sample.get_labelset().unwrap();
        assert_eq!(labels.get_label_value("path"), Some(awkward));
        assert_eq!(labels.get_label_value("plain"), Some("ok"));
    }

    #[test]
    fn numbers_are_written_as_prometheus_reads_them() {
        let write = |value: Number| {
            let mut out = String::new();
            push_number(&mut out, value);
            out
        };
        assert_eq!(write(u64::MAX.into()), "18446744073709551615");
        assert_eq!(write((-3i64).into()), "-3");
        assert_eq!(write(f64::INFINITY.into()), "+Inf");
        assert_eq!(write(f64::NEG_INFINITY.into()), "-Inf");
        assert_eq!(write(f64::NAN.into()), "NaN");
        assert_eq!(write(0.1f64.into()), "0.1");
        assert_eq!(write(1_700_000_000.5f64.into()), "1700000000.5");
    }

    #[test]
    fn names_are_checked() {
        assert!(is_name("ringgate_a:b_total", true));
        assert!(!is_name("ringgate_a:b", false));
        assert!(!is_name("9lives", true));
        assert!(!is_name("", true));
        assert!(!is_name("a-b", true));
    }

    #[test]
    fn resident_memory_is_read_from_proc() {
        let rss = process_rss_bytes().expect("/proc/self/statm is readable on Linux");
        // A test binary is bigger than a page and smaller than a terabyte.
        assert!((4096..1 << 40).contains(&rss), "{rss}");
    }
}
