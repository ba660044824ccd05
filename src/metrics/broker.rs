//! The cross-node broker's counters (`--broker redis://…`, `nats://…`): one set per process, shared
//! by the workers (which count what they could not queue for the broker) and the broker's thread
//! (which counts the rest). Written once per message or per connection event, never per subscriber
//! except for hand-off drops, which are counted like `ringgate_pubsub_handoff_drops_total`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use super::add;

/// Why a message did not cross the broker: the `reason` of `ringgate_broker_drops_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BrokerDrop {
    /// A queue between the node and the broker was full: the queue of local publishes to the
    /// broker's thread (in messages or in bytes), or, with NATS, a subscription's queue in the
    /// client (which then drops a message from the broker and reports a slow consumer).
    QueueFull,
    /// A local publish while the broker was disconnected, or queued when the connection was lost,
    /// or sent and not confirmed before it was lost: delivered locally, and not to other nodes
    /// (except, for the unconfirmed, when the broker had forwarded it before it went away).
    Disconnected,
    /// A message from another node that a worker had no hand-off room for, once per subscriber
    /// there that missed it.
    Handoff,
    /// A message on a broker channel that is not a ringgate envelope (another writer, or a version
    /// this node does not read).
    Malformed,
}

const BROKER_DROPS: usize = 4;

impl BrokerDrop {
    /// Every reason, in table order.
    pub const ALL: [BrokerDrop; BROKER_DROPS] =
        [BrokerDrop::QueueFull, BrokerDrop::Disconnected, BrokerDrop::Handoff, BrokerDrop::Malformed];

    /// A stable label: the `reason` of `ringgate_broker_drops_total`.
    pub fn label(self) -> &'static str {
        match self {
            BrokerDrop::QueueFull => "queue_full",
            BrokerDrop::Disconnected => "disconnected",
            BrokerDrop::Handoff => "handoff",
            BrokerDrop::Malformed => "malformed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The broker link's counters and gauges (see `ringgate_broker_*` in `/metrics`).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct BrokerStats {
    /// Whether the node is connected to the broker now.
    connected: AtomicBool,
    /// Connections to the broker established after a lost one (or after a failed first attempt).
    pub reconnects: AtomicU64,
    /// Messages this node sent to the broker (each once, however many nodes receive it).
    pub published: AtomicU64,
    /// Messages from other nodes received from the broker (own messages coming back are not counted).
    pub received: AtomicU64,
    /// Topics this node is subscribed to at the broker (a gauge).
    subscribed_topics: AtomicI64,
    drops: [AtomicU64; BROKER_DROPS],
}

impl BrokerStats {
    /// Whether the node is connected to the broker now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// The broker connection came up (`true`) or was lost (`false`).
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }

    /// Counts `n` messages that did not cross the broker, for `why`.
    pub fn dropped(&self, why: BrokerDrop, n: u64) {
        add(&self.drops[why.index()], n);
    }

    /// Messages dropped for `why` so far.
    pub fn drops(&self, why: BrokerDrop) -> u64 {
        self.drops[why.index()].load(Ordering::Relaxed)
    }

    /// Sets the number of topics subscribed at the broker.
    pub fn set_subscribed_topics(&self, topics: usize) {
        self.subscribed_topics.store(i64::try_from(topics).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// Topics subscribed at the broker now.
    pub fn subscribed_topics(&self) -> i64 {
        self.subscribed_topics.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_table_matches_indices() {
        for (i, why) in BrokerDrop::ALL.iter().enumerate() {
            assert_eq!(why.index(), i, "{}", why.label());
        }
    }
}
