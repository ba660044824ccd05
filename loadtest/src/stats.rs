//! What one client thread observed: latency histograms, counters, errors by kind and connection
//! failures by reason. Each thread owns its own (no atomics or locks on the hot path); the main
//! thread merges them once at the end and merges per-second snapshots for the progress line.
//!
//! Must never: drop an observation (values beyond the histogram's range saturate at its top, they
//! are not skipped), or count a message outside the measured window in the totals.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

/// The highest latency a histogram holds, in microseconds (one hour); larger values saturate.
pub const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds with three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; this cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

/// Something that went wrong on an established connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// An echo differed from what was sent (payload, length, order, or an unexpected message).
    EchoMismatch,
    /// A message's echo had not arrived when the drain period after the run ended.
    EchoTimeout,
    /// The server broke RFC 6455 (the protocol core's verdict).
    ProtocolError,
    /// The server sent a Close frame before the run ended.
    ServerClosed,
    /// The connection ended (EOF or reset) before the run ended.
    ConnectionLost,
    /// A write failed.
    WriteFailed,
    /// Pubsub: a delivery repeated or came before one already received from the same publisher.
    OutOfOrder,
    /// Pubsub: a delivery that no publisher of this subscriber's topic sent (wrong size, header,
    /// filler, publisher or topic).
    BadMessage,
    /// Open loop: a message intended in the measured window that was never sent, because its
    /// connection was still behind schedule when the drain period ended. Counted, never skipped
    /// silently.
    NotSent,
    /// `wss://`: the TLS session of an established connection failed (a record that does not
    /// decrypt, an alert from the server).
    TlsError,
}

impl ErrorKind {
    /// Every kind, in report order.
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::EchoMismatch,
        ErrorKind::EchoTimeout,
        ErrorKind::ProtocolError,
        ErrorKind::ServerClosed,
        ErrorKind::ConnectionLost,
        ErrorKind::WriteFailed,
        ErrorKind::OutOfOrder,
        ErrorKind::BadMessage,
        ErrorKind::NotSent,
        ErrorKind::TlsError,
    ];

    /// The name in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::EchoMismatch => "echo_mismatch",
            ErrorKind::EchoTimeout => "echo_timeout",
            ErrorKind::ProtocolError => "protocol_error",
            ErrorKind::ServerClosed => "server_closed",
            ErrorKind::ConnectionLost => "connection_lost",
            ErrorKind::WriteFailed => "write_failed",
            ErrorKind::OutOfOrder => "out_of_order",
            ErrorKind::BadMessage => "bad_message",
            ErrorKind::NotSent => "not_sent",
            ErrorKind::TlsError => "tls_error",
        }
    }
}

/// Plain counters; cumulative since the thread started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections whose TCP connect was started.
    pub attempted: u64,
    /// Connections that completed the WebSocket handshake.
    pub established: u64,
    /// Connections open right now.
    pub open: u64,
    /// Messages sent whose intended send time is in the measured window.
    pub messages_sent: u64,
    /// Verified echoes of measured messages.
    pub messages_received: u64,
    /// Measured messages sent more than [`crate::engine::LATE_THRESHOLD`] after their intended time.
    pub late_sends: u64,
    /// All messages sent, warmup included (for the progress line).
    pub total_sent: u64,
    /// All echoes received, warmup included (for the progress line).
    pub total_received: u64,
    /// Errors of every kind.
    pub errors: u64,
    /// Pubsub: measured messages a subscriber never received (gaps in a publisher's sequence,
    /// and what was still missing after the grace period).
    pub deliveries_lost: u64,
    /// Connections whose server agreed permessage-deflate (`--deflate`).
    pub deflate_agreed: u64,
    /// Data messages received on open connections, the whole run (warmup and drain included).
    pub received_bytes: Volume,
    /// Data messages sent, the whole run.
    pub sent_bytes: Volume,
}

/// Payload bytes of data messages, as the application sees them (inflated) and as they crossed
/// the wire (compressed where they were; frame headers not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Volume {
    /// Payload bytes, inflated.
    pub payload: u64,
    /// The same messages' payload bytes on the wire.
    pub wire: u64,
}

impl Volume {
    /// Counts one message of `payload` bytes that took `wire` bytes on the wire.
    pub fn add(&mut self, payload: usize, wire: usize) {
        self.payload += payload as u64;
        self.wire += wire as u64;
    }

    /// Adds `other` to these.
    pub fn merge(&mut self, other: &Volume) {
        self.payload += other.payload;
        self.wire += other.wire;
    }
}

impl Counters {
    fn add(&mut self, other: &Counters) {
        self.attempted += other.attempted;
        self.established += other.established;
        self.open += other.open;
        self.messages_sent += other.messages_sent;
        self.messages_received += other.messages_received;
        self.late_sends += other.late_sends;
        self.total_sent += other.total_sent;
        self.total_received += other.total_received;
        self.errors += other.errors;
        self.deliveries_lost += other.deliveries_lost;
        self.deflate_agreed += other.deflate_agreed;
        self.received_bytes.merge(&other.received_bytes);
        self.sent_bytes.merge(&other.sent_bytes);
    }
}

/// Everything one thread observed.
#[derive(Clone, Debug)]
pub struct ThreadStats {
    /// Message latency (echo arrival minus intended send time), measured window only.
    pub latency: Histogram<u64>,
    /// TCP connect start to the 101 response (TLS included, for `wss://`).
    pub handshake: Histogram<u64>,
    /// `wss://`: TCP connect start to the end of the TLS handshake.
    pub tls_handshake: Histogram<u64>,
    /// `wss://`: completed TLS handshakes by protocol version and cipher suite.
    pub tls_sessions: BTreeMap<(&'static str, &'static str), u64>,
    /// `wss://`: failed TLS handshakes by reason (each is also a failed connection, `tls_<reason>`).
    pub tls_failures: BTreeMap<String, u64>,
    /// Actual minus intended send time (open loop): the tool's own lateness.
    pub send_lag: Histogram<u64>,
    /// Message latencies since the last progress snapshot, warmup included.
    pub interval: Histogram<u64>,
    /// Pubsub: latency of the measured deliveries whose publisher and subscriber are on different
    /// nodes (a subset of `latency`; same-node is the difference).
    pub cross_latency: Histogram<u64>,
    /// Pubsub: measured deliveries and losses by (publisher node, subscriber node), indexed
    /// `publisher_node * nodes + subscriber_node`; sized by the thread at its start (empty in the
    /// other modes). Merging adds element by element.
    pub node_pairs: Vec<PairCounts>,
    /// Counters.
    pub counters: Counters,
    /// Errors by kind, indexed like [`ErrorKind::ALL`].
    pub errors: [u64; ErrorKind::ALL.len()],
    /// Failed connection attempts by reason.
    pub connect_failures: BTreeMap<String, u64>,
    /// Pubsub: Close frames the server sent before the run ended, by status code (0: no code).
    /// Each is also an error (`closed_1008` is a subscriber closed as a slow consumer).
    pub closes: BTreeMap<u16, u64>,
    /// When the first and the last connection were established (run clock, ns).
    pub established_span: Option<(u64, u64)>,
    /// How busy each client thread was over the measured window: one entry per thread that
    /// lived through it (merging concatenates).
    pub loads: Vec<ThreadLoad>,
}

/// Pubsub: what one pair of nodes (publisher's, subscriber's) carried in the measured window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairCounts {
    /// Deliveries received.
    pub delivered: u64,
    /// Deliveries lost (gaps, and what was missing after the grace period).
    pub lost: u64,
}

/// One client thread's CPU over the measured window: near 100% of the wall time means the thread
/// was saturated, and the figures describe the client rather than the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadLoad {
    /// CPU time the thread used (user and system), ns.
    pub cpu_ns: u64,
    /// Wall time it was measured over, ns.
    pub wall_ns: u64,
}

/// A thread that used at least this share of its wall time on the CPU is saturated: it had no
/// time to spare, so it was late for sends and reads, and the run measured the client.
pub const SATURATED_SHARE: f64 = 0.9;

impl ThreadLoad {
    /// The share of the wall time the thread spent on the CPU (0 when no time was measured).
    pub fn cpu_share(&self) -> f64 {
        if self.wall_ns == 0 { 0.0 } else { self.cpu_ns as f64 / self.wall_ns as f64 }
    }

    /// Whether the thread was saturated (see [`SATURATED_SHARE`]).
    pub fn saturated(&self) -> bool {
        self.cpu_share() >= SATURATED_SHARE
    }
}

impl Default for ThreadStats {
    fn default() -> Self {
        ThreadStats {
            latency: new_histogram(),
            handshake: new_histogram(),
            tls_handshake: new_histogram(),
            tls_sessions: BTreeMap::new(),
            tls_failures: BTreeMap::new(),
            send_lag: new_histogram(),
            interval: new_histogram(),
            cross_latency: new_histogram(),
            node_pairs: Vec::new(),
            counters: Counters::default(),
            errors: [0; ErrorKind::ALL.len()],
            connect_failures: BTreeMap::new(),
            closes: BTreeMap::new(),
            established_span: None,
            loads: Vec::new(),
        }
    }
}

impl ThreadStats {
    /// Records a verified echo or delivery: always in the live interval histogram (the progress
    /// line), and in the run's histogram and counters when its intended time is in the measured
    /// window.
    pub fn received(&mut self, latency_us: u64, measured: bool) {
        self.interval.saturating_record(latency_us);
        self.counters.total_received += 1;
        if measured {
            self.latency.saturating_record(latency_us);
            self.counters.messages_received += 1;
        }
    }

    /// Pubsub: a measured delivery between the pair of nodes `pair` (see
    /// [`ThreadStats::node_pairs`]), `cross` when they differ; its latency is already recorded by
    /// [`ThreadStats::received`].
    pub fn delivered(&mut self, pair: usize, cross: bool, latency_us: u64) {
        if let Some(counts) = self.node_pairs.get_mut(pair) {
            counts.delivered += 1;
        }
        if cross {
            self.cross_latency.saturating_record(latency_us);
        }
    }

    /// Pubsub: `n` measured deliveries between the pair of nodes `pair` were lost.
    pub fn lost(&mut self, pair: usize, n: u64) {
        self.counters.deliveries_lost += n;
        if let Some(counts) = self.node_pairs.get_mut(pair) {
            counts.lost += n;
        }
    }

    /// Counts one error.
    pub fn error(&mut self, kind: ErrorKind) {
        self.errors[kind as usize] += 1;
        self.counters.errors += 1;
    }

    /// Counts `n` errors of one kind.
    pub fn errors_n(&mut self, kind: ErrorKind, n: u64) {
        self.errors[kind as usize] += n;
        self.counters.errors += n;
    }

    /// Counts a Close from the server with status `code` (0 for none) as an error of its own kind.
    pub fn closed(&mut self, code: u16) {
        *self.closes.entry(code).or_default() += 1;
        self.counters.errors += 1;
    }

    /// Counts a connection attempt that failed, by reason.
    pub fn connect_failed(&mut self, reason: String) {
        *self.connect_failures.entry(reason).or_default() += 1;
    }

    /// Counts a completed TLS handshake that agreed on `version` and `suite`.
    pub fn tls_established(&mut self, version: &'static str, suite: &'static str) {
        *self.tls_sessions.entry((version, suite)).or_default() += 1;
    }

    /// Records how long a TLS handshake took from the TCP connect's start.
    pub fn tls_handshake(&mut self, latency_ns: u64) {
        self.tls_handshake.saturating_record(latency_ns / 1_000);
    }

    /// Counts a failed TLS handshake, by reason.
    pub fn tls_failed(&mut self, reason: &str) {
        match self.tls_failures.get_mut(reason) {
            Some(count) => *count += 1,
            None => {
                self.tls_failures.insert(reason.to_string(), 1);
            }
        }
    }

    /// Records a completed handshake at `now` that took `latency_ns`.
    pub fn established(&mut self, now: u64, latency_ns: u64) {
        self.counters.established += 1;
        self.counters.open += 1;
        self.handshake.saturating_record(latency_ns / 1_000);
        self.established_span = Some(match self.established_span {
            None => (now, now),
            Some((first, last)) => (first.min(now), last.max(now)),
        });
    }

    /// The per-second snapshot for the progress line; resets the interval histogram.
    pub fn snapshot(&mut self) -> Snapshot {
        let interval = self.interval.clone();
        self.interval.reset();
        Snapshot { counters: self.counters, interval }
    }

    /// Adds another thread's observations to these.
    pub fn merge(&mut self, other: &ThreadStats) {
        // The histograms share bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.handshake.add(&other.handshake);
        let _ = self.tls_handshake.add(&other.tls_handshake);
        for (key, count) in &other.tls_sessions {
            *self.tls_sessions.entry(*key).or_default() += count;
        }
        for (reason, count) in &other.tls_failures {
            *self.tls_failures.entry(reason.clone()).or_default() += count;
        }
        let _ = self.send_lag.add(&other.send_lag);
        let _ = self.interval.add(&other.interval);
        let _ = self.cross_latency.add(&other.cross_latency);
        if self.node_pairs.len() < other.node_pairs.len() {
            self.node_pairs.resize(other.node_pairs.len(), PairCounts::default());
        }
        for (mine, theirs) in self.node_pairs.iter_mut().zip(&other.node_pairs) {
            mine.delivered += theirs.delivered;
            mine.lost += theirs.lost;
        }
        self.counters.add(&other.counters);
        for (mine, theirs) in self.errors.iter_mut().zip(other.errors) {
            *mine += theirs;
        }
        for (reason, count) in &other.connect_failures {
            *self.connect_failures.entry(reason.clone()).or_default() += count;
        }
        for (code, count) in &other.closes {
            *self.closes.entry(*code).or_default() += count;
        }
        self.loads.extend_from_slice(&other.loads);
        self.established_span = match (self.established_span, other.established_span) {
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            (span, None) | (None, span) => span,
        };
    }

    /// Connection attempts that failed, all reasons together.
    pub fn connections_failed(&self) -> u64 {
        self.connect_failures.values().sum()
    }
}

/// What a thread reports once a second: its counters and the latencies of the last second.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Cumulative counters.
    pub counters: Counters,
    /// Latencies recorded since the previous snapshot.
    pub interval: Histogram<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_everything() {
        let mut a = ThreadStats::default();
        let mut b = ThreadStats::default();
        a.latency.saturating_record(10);
        b.latency.saturating_record(20);
        a.error(ErrorKind::EchoMismatch);
        b.errors_n(ErrorKind::EchoTimeout, 3);
        a.connect_failed("refused".into());
        b.connect_failed("refused".into());
        a.established(5, 1_000);
        b.established(9, 2_000);
        a.tls_established("1.3", "TLS13_AES_128_GCM_SHA256");
        b.tls_established("1.3", "TLS13_AES_128_GCM_SHA256");
        b.tls_established("1.2", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256");
        a.tls_failed("unknown_issuer");
        b.tls_failed("unknown_issuer");
        b.tls_handshake(3_000);
        a.merge(&b);
        assert_eq!(a.tls_sessions[&("1.3", "TLS13_AES_128_GCM_SHA256")], 2);
        assert_eq!(a.tls_sessions.len(), 2);
        assert_eq!(a.tls_failures["unknown_issuer"], 2);
        assert_eq!(a.tls_handshake.len(), 1);
        assert_eq!(a.latency.len(), 2);
        assert_eq!(a.counters.errors, 4);
        assert_eq!(a.errors[ErrorKind::EchoTimeout as usize], 3);
        assert_eq!(a.connect_failures["refused"], 2);
        assert_eq!(a.connections_failed(), 2);
        assert_eq!(a.established_span, Some((5, 9)));
        assert_eq!(a.counters.established, 2);
    }

    #[test]
    fn node_pairs_and_cross_node_latency_merge() {
        let mut a = ThreadStats { node_pairs: vec![PairCounts::default(); 4], ..ThreadStats::default() };
        let mut b = a.clone();
        a.delivered(1, true, 100);
        a.delivered(0, false, 50);
        b.delivered(1, true, 300);
        b.lost(2, 7);
        // A pair outside the table (a thread that was not sized) is ignored, not a panic.
        b.lost(9, 1);
        a.merge(&b);
        assert_eq!(a.node_pairs[1], PairCounts { delivered: 2, lost: 0 });
        assert_eq!(a.node_pairs[2], PairCounts { delivered: 0, lost: 7 });
        assert_eq!(a.cross_latency.len(), 2);
        assert_eq!(a.counters.deliveries_lost, 8);
        let mut empty = ThreadStats::default();
        empty.merge(&a);
        assert_eq!(empty.node_pairs, a.node_pairs);
    }

    #[test]
    fn a_thread_busy_nine_tenths_of_the_time_is_saturated() {
        let load = |cpu_ns, wall_ns| ThreadLoad { cpu_ns, wall_ns };
        assert!(load(900, 1_000).saturated());
        assert!(load(1_010, 1_000).saturated());
        assert!(!load(899, 1_000).saturated());
        assert_eq!(load(5, 0).cpu_share(), 0.0);
        let mut a = ThreadStats { loads: vec![load(1, 2)], ..ThreadStats::default() };
        a.merge(&ThreadStats { loads: vec![load(3, 4)], ..ThreadStats::default() });
        assert_eq!(a.loads, [load(1, 2), load(3, 4)]);
    }

    #[test]
    fn huge_latencies_saturate_rather_than_vanish() {
        let mut stats = ThreadStats::default();
        stats.latency.saturating_record(u64::MAX);
        assert_eq!(stats.latency.len(), 1);
        assert!(stats.latency.max() >= MAX_LATENCY_US);
    }
}
