//! Counters each worker keeps about its connections, readable from any thread.
//!
//! Every counter is a relaxed atomic owned by one worker: the worker is the only writer, so an
//! increment is an uncontended `lock add`, and readers (the shutdown summary now, `/metrics` later)
//! sum across workers. Must never: take a lock on the hot path, or count anything per message that
//! could not be counted per batch.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::proto::close::CloseCode;

/// Why a connection never became a WebSocket. Labels for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The request broke a rule of RFC 6455 section 4 (the label of the `HandshakeError`).
    Protocol(crate::proto::handshake::HandshakeError),
    /// No route for the requested path (404).
    NotFound,
    /// The client did not finish its request within the handshake timeout.
    Timeout,
    /// The client hung up or the socket failed before the handshake finished.
    Disconnected,
}

const HANDSHAKE_FAILURE_KINDS: usize = 13;

impl HandshakeFailure {
    /// A stable label.
    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Protocol(error) => error.label(),
            HandshakeFailure::NotFound => "not_found",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Disconnected => "disconnected",
        }
    }

    fn index(self) -> usize {
        use crate::proto::handshake::HandshakeError as E;
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

fn close_code_label(slot: usize) -> String {
    if slot == CLOSE_CODE_SLOTS - 1 { "other".to_string() } else { (1000 + slot).to_string() }
}

/// One worker's counters.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Connections currently open on this worker (a gauge).
    pub connections_open: AtomicU64,
    /// Connections accepted since start.
    pub connections_accepted: AtomicU64,
    /// Connections answered 503 because `--max-conns` was reached.
    pub connections_rejected: AtomicU64,
    /// Handshakes completed with a 101.
    pub handshakes_completed: AtomicU64,
    /// WebSocket messages received.
    pub messages_in: AtomicU64,
    /// WebSocket messages sent.
    pub messages_out: AtomicU64,
    /// Bytes read from sockets.
    pub bytes_in: AtomicU64,
    /// Bytes written to sockets.
    pub bytes_out: AtomicU64,
    handshake_failures: [AtomicU64; HANDSHAKE_FAILURE_KINDS],
    close_codes_sent: [AtomicU64; CLOSE_CODE_SLOTS],
    close_codes_received: [AtomicU64; CLOSE_CODE_SLOTS],
}

/// Adds `n` to a counter that only its own worker writes.
#[inline]
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl WorkerStats {
    /// Counts a handshake that failed.
    pub fn handshake_failed(&self, why: HandshakeFailure) {
        add(&self.handshake_failures[why.index()], 1);
    }

    /// Counts a Close frame we sent.
    pub fn close_sent(&self, code: CloseCode) {
        add(&self.close_codes_sent[close_code_slot(code)], 1);
    }

    /// Counts a Close frame we received.
    pub fn close_received(&self, code: CloseCode) {
        add(&self.close_codes_received[close_code_slot(code)], 1);
    }
}

/// A snapshot summed over all workers.
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
    /// Messages received.
    pub messages_in: u64,
    /// Messages sent.
    pub messages_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Handshake failures by label, non-zero ones only.
    pub handshake_failures: Vec<(&'static str, u64)>,
    /// Close codes sent, non-zero ones only.
    pub close_codes_sent: Vec<(String, u64)>,
    /// Close codes received, non-zero ones only.
    pub close_codes_received: Vec<(String, u64)>,
}

/// Sums the counters of all workers.
pub fn totals(workers: &[std::sync::Arc<WorkerStats>]) -> Totals {
    let load = |f: &dyn Fn(&WorkerStats) -> &AtomicU64| -> u64 {
        workers.iter().map(|w| f(w).load(Ordering::Relaxed)).sum()
    };
    let failure_labels = all_handshake_failures();
    let handshake_failures = failure_labels
        .iter()
        .map(|kind| (kind.label(), load(&|w| &w.handshake_failures[kind.index()])))
        .filter(|(_, n)| *n > 0)
        .collect();
    let codes = |pick: &dyn Fn(&WorkerStats) -> &[AtomicU64; CLOSE_CODE_SLOTS]| {
        (0..CLOSE_CODE_SLOTS)
            .map(|slot| (close_code_label(slot), load(&|w| &pick(w)[slot])))
            .filter(|(_, n)| *n > 0)
            .collect()
    };
    Totals {
        connections_open: load(&|w| &w.connections_open),
        connections_accepted: load(&|w| &w.connections_accepted),
        connections_rejected: load(&|w| &w.connections_rejected),
        handshakes_completed: load(&|w| &w.handshakes_completed),
        messages_in: load(&|w| &w.messages_in),
        messages_out: load(&|w| &w.messages_out),
        bytes_in: load(&|w| &w.bytes_in),
        bytes_out: load(&|w| &w.bytes_out),
        handshake_failures,
        close_codes_sent: codes(&|w| &w.close_codes_sent),
        close_codes_received: codes(&|w| &w.close_codes_received),
    }
}

fn all_handshake_failures() -> Vec<HandshakeFailure> {
    use crate::proto::handshake::HandshakeError as E;
    let mut kinds: Vec<HandshakeFailure> = [
        E::Malformed,
        E::HeadersTooLarge,
        E::MethodNotAllowed,
        E::HttpVersionTooOld,
        E::BadHost,
        E::UpgradeRequired,
        E::MissingVersion,
        E::UnsupportedVersion,
        E::BadKey,
        E::ForbiddenOrigin,
    ]
    .into_iter()
    .map(HandshakeFailure::Protocol)
    .collect();
    kinds.extend([HandshakeFailure::NotFound, HandshakeFailure::Timeout, HandshakeFailure::Disconnected]);
    kinds
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
             messages in={} out={} bytes in={} out={} close_sent=[{}] close_received=[{}]",
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
        )
    }
}
