//! Pubsub mode: publishers send on an open-loop schedule to topics; subscribers read every
//! delivery as fast as they can and check it.
//!
//! Layout: connections `0..S` are subscribers (subscriber j on topic j % K), connections
//! `S..S+P` publishers (publisher i on topic i % K). Subscribers connect first; publishers, once
//! connected, wait until every subscriber has either completed its handshake (the server registers
//! a subscriber before it sends the 101) or failed, so no message is published before all
//! subscribers can receive it. Publishing starts no earlier than the end of the ramp-up.
//!
//! Every message carries its intended send time and a tag: the publisher id in the top bits, the
//! publisher's sequence number (from 0) in the low [`SEQ_BITS`]; the filler is derived from both
//! (as in echo mode), so a delivery is verified byte for byte without a copy of what was sent.
//! Delivery latency is receive time minus intended send time (coordinated-omission corrected).
//!
//! Nodes (several URLs): publisher i connects to node i % N and each topic's subscribers are dealt
//! round-robin over the nodes (subscriber j to node (j / K) % N; see
//! [`PubSubPlan::subscriber_node`]), so a delivery's pair of nodes follows from the publisher id in
//! the message and the subscriber's own node, with nothing more on the wire. Each thread counts
//! deliveries and losses per (publisher node, subscriber node) pair and records cross-node
//! latencies in a histogram of its own (same-node latency is the difference of the two
//! histograms, computed once at the end): an index and an add per delivery, no allocation, no
//! lock.
//!
//! Loss: each subscriber keeps, per publisher on its topic, the next sequence number it expects. A
//! higher one means the ones in between were lost; a lower one (repeat or reorder) is an
//! `out_of_order` error. After the end, subscribers wait up to the grace period
//! ([`crate::schedule::PUBSUB_GRACE`]) for in-flight deliveries, then count what is still missing
//! (from each publisher's final count, shared through atomics) as lost. Only messages intended in
//! the measured window count, in deliveries and in losses; a publisher's measured messages are a
//! contiguous range of its sequence numbers (from the first measured one on), which is what makes
//! a gap's measured part computable.
//!
//! Must never: publish before every subscriber has settled, count a message as lost that was
//! intended outside the measured window, or publish a message nobody could receive yet.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use super::due::encode_due;
use super::env::Env;
use super::wire::Compression;
use crate::cli::{PubSubPlan, SEQ_BITS};
use crate::clock;
use crate::payload::{self, HEADER_LEN};
use crate::schedule::Schedule;
use crate::stats::{ErrorKind, ThreadStats};

/// How often a subscriber checks, after the end, whether everything has arrived.
pub const CHECK_EVERY: Duration = Duration::from_millis(50);

/// How often a publisher checks whether every subscriber has settled.
const BARRIER_POLL: Duration = Duration::from_millis(1);

const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// One publisher's progress, read by subscribers on every thread.
struct Progress {
    /// Messages sent so far (counted before they are written).
    sent: AtomicU64,
    /// Sequence number of its first message in the measured window; `u64::MAX` until sent.
    first_measured: AtomicU64,
    /// Messages sent in the measured window.
    measured: AtomicU64,
    /// It will send nothing more (finished, or never connected).
    done: AtomicBool,
}

/// What the pubsub connections of every thread share.
pub struct Shared {
    layout: PubSubPlan,
    /// Subscribers whose connection attempt has ended, either way.
    settled: AtomicU32,
    /// Established subscribers per topic and node, indexed `topic * nodes + node`.
    subscribed: Box<[AtomicU64]>,
    publishers: Box<[Progress]>,
    /// When the first publisher started its schedule (run clock); `u64::MAX` until then.
    publish_start: AtomicU64,
}

/// What one connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A subscriber on `topic`, connected to `node`.
    Subscriber {
        /// Its topic.
        topic: u32,
        /// The node (URL) it connects to.
        node: u32,
    },
    /// Publisher `id` on `topic`.
    Publisher {
        /// Its id (0-based), carried in every message.
        id: u32,
        /// Its topic.
        topic: u32,
    },
}

impl Shared {
    /// The shared state for a run with this layout.
    pub fn new(layout: &PubSubPlan) -> Shared {
        Shared {
            layout: layout.clone(),
            settled: AtomicU32::new(0),
            subscribed: (0..layout.topics * layout.nodes).map(|_| AtomicU64::new(0)).collect(),
            publishers: (0..layout.publishers)
                .map(|_| Progress {
                    sent: AtomicU64::new(0),
                    first_measured: AtomicU64::new(u64::MAX),
                    measured: AtomicU64::new(0),
                    done: AtomicBool::new(false),
                })
                .collect(),
            publish_start: AtomicU64::new(u64::MAX),
        }
    }

    /// The role of connection `conn`.
    pub fn role(&self, conn: u32) -> Role {
        let l = &self.layout;
        if conn < l.subscribers {
            Role::Subscriber { topic: conn % l.topics, node: l.subscriber_node(conn) }
        } else {
            let id = conn - l.subscribers;
            Role::Publisher { id, topic: id % l.topics }
        }
    }

    /// The request path of a connection in `role`.
    pub fn path(&self, role: Role) -> String {
        let (Role::Subscriber { topic, .. } | Role::Publisher { topic, .. }) = role;
        format!("{}/t{topic}", self.layout.prefix)
    }

    /// A connection in `role` completed its handshake (`true`) or failed (`false`).
    pub fn connected(&self, role: Role, ok: bool) {
        match role {
            Role::Subscriber { topic, node } => {
                if ok {
                    self.subscribed[(topic * self.layout.nodes + node) as usize].fetch_add(1, SeqCst);
                }
                self.settled.fetch_add(1, SeqCst);
            }
            Role::Publisher { id, .. } => {
                if !ok {
                    self.publishers[id as usize].done.store(true, SeqCst);
                }
            }
        }
    }

    /// Deliveries the run should have made, by pair of nodes (indexed `publisher_node * nodes +
    /// subscriber_node`; their sum is the run's): each publisher's measured messages times the
    /// subscribers established on its topic on each node.
    pub fn pairs_expected(&self) -> Vec<u64> {
        let l = &self.layout;
        let nodes = l.nodes as usize;
        let mut expected = vec![0; nodes * nodes];
        for (id, p) in self.publishers.iter().enumerate() {
            let measured = p.measured.load(SeqCst);
            let topic = id % l.topics as usize;
            let from = l.publisher_node(id as u32) as usize;
            for to in 0..nodes {
                expected[from * nodes + to] += measured * self.subscribed[topic * nodes + to].load(SeqCst);
            }
        }
        expected
    }

    /// The gateway nodes.
    pub fn nodes(&self) -> u32 {
        self.layout.nodes
    }

    /// When publishing started, if it did.
    pub fn publish_start(&self) -> Option<u64> {
        Some(self.publish_start.load(SeqCst)).filter(|&at| at != u64::MAX)
    }

    /// How many of publisher `id`'s messages `from..to` were intended in the measured window.
    fn measured_between(&self, id: usize, from: u64, to: u64) -> u64 {
        let first = self.publishers[id].first_measured.load(SeqCst);
        to.saturating_sub(from.max(first))
    }

    /// Publisher ids on `topic`.
    fn publishers_on(&self, topic: u32) -> impl Iterator<Item = usize> {
        (topic as usize..self.layout.publishers as usize).step_by(self.layout.topics as usize)
    }
}

/// A subscriber's view of its topic's publishers: the next sequence number expected from each.
pub struct Tracker {
    topic: u32,
    /// The node the subscriber is on.
    node: u32,
    /// Indexed by publisher id / topics.
    next: Vec<u64>,
}

impl Tracker {
    /// A tracker for a subscriber on `topic`, connected to `node`.
    pub fn new(shared: &Shared, topic: u32, node: u32) -> Tracker {
        Tracker { topic, node, next: vec![0; shared.publishers_on(topic).count()] }
    }

    /// The index of the pair (publisher `id`'s node, this subscriber's node) in
    /// [`ThreadStats::node_pairs`], and whether the two differ.
    fn pair(&self, layout: &PubSubPlan, id: u32) -> (usize, bool) {
        let from = layout.publisher_node(id);
        ((from * layout.nodes + self.node) as usize, from != self.node)
    }

    /// Checks one delivery and records it.
    pub fn on_message(&mut self, env: &mut Env<'_>, shared: &Shared, payload: &[u8]) {
        let size = env.plan.size;
        let layout = &shared.layout;
        let stats = &mut *env.stats;
        if payload.len() != size || size < HEADER_LEN {
            stats.error(ErrorKind::BadMessage);
            return;
        }
        let word = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().unwrap_or_default());
        let (at, tag) = (word(0), word(8));
        let (id, seq) = ((tag >> SEQ_BITS) as usize, tag & SEQ_MASK);
        if id >= layout.publishers as usize
            || id as u32 % layout.topics != self.topic
            || !payload::verify(payload, size, tag, at)
        {
            stats.error(ErrorKind::BadMessage);
            return;
        }
        let (pair, cross) = self.pair(layout, id as u32);
        let next = &mut self.next[id / layout.topics as usize];
        if seq < *next {
            stats.error(ErrorKind::OutOfOrder);
            return;
        }
        if seq > *next {
            stats.lost(pair, shared.measured_between(id, *next, seq));
        }
        *next = seq + 1;
        let latency_us = clock::ns_to_us(env.now.saturating_sub(at));
        let measured = env.phases.measured(at);
        stats.received(latency_us, measured);
        if measured {
            stats.delivered(pair, cross, latency_us);
        }
    }

    /// Whether every publisher on the topic is done and everything it sent has arrived.
    pub fn complete(&self, shared: &Shared) -> bool {
        shared.publishers_on(self.topic).zip(&self.next).all(|(id, &next)| {
            let p = &shared.publishers[id];
            p.done.load(SeqCst) && next >= p.sent.load(SeqCst)
        })
    }

    /// Counts every measured message not received yet as lost (at the end of the run).
    pub fn count_missing(&self, shared: &Shared, stats: &mut ThreadStats) {
        for (id, &next) in shared.publishers_on(self.topic).zip(&self.next) {
            let sent = shared.publishers[id].sent.load(SeqCst);
            let (pair, _) = self.pair(&shared.layout, id as u32);
            stats.lost(pair, shared.measured_between(id, next, sent));
        }
    }
}

/// Where a publisher is.
enum Stage {
    /// Waiting for every subscriber to settle.
    Barrier,
    /// Sending on its schedule; `sent` messages so far.
    Publishing { schedule: Schedule, sent: u64 },
}

/// One publishing connection.
pub struct Publisher {
    id: u32,
    rate: f64,
    stage: Stage,
}

impl Publisher {
    /// Publisher `id`, to publish `rate` messages per second once every subscriber has settled.
    pub fn new(id: u32, rate: f64) -> Publisher {
        Publisher { id, rate, stage: Stage::Barrier }
    }

    /// Encodes what is due into `out`, compressed as `compression` says (nothing before the
    /// barrier is passed).
    pub fn fill(
        &mut self,
        env: &mut Env<'_>,
        shared: &Shared,
        out: &mut Vec<u8>,
        compression: &mut Compression,
    ) {
        if let Stage::Barrier = self.stage {
            if shared.settled.load(SeqCst) < shared.layout.subscribers {
                return;
            }
            let start = env.now.max(env.phases.ramp_end);
            shared.publish_start.fetch_min(start, SeqCst);
            self.stage = Stage::Publishing { schedule: Schedule::staggered(start, self.rate), sent: 0 };
        }
        let Stage::Publishing { schedule, sent } = &mut self.stage else { return };
        let me = &shared.publishers[self.id as usize];
        let tag_base = u64::from(self.id) << SEQ_BITS;
        encode_due(env, out, compression, schedule, sent, tag_base, |next, measured| {
            if measured {
                // `next - 1` is the message just encoded.
                if me.first_measured.load(SeqCst) == u64::MAX {
                    me.first_measured.store(next - 1, SeqCst);
                }
                me.measured.fetch_add(1, SeqCst);
            }
            me.sent.store(next, SeqCst);
        });
    }

    /// When it must next be woken: the barrier's next look, or its next message.
    pub fn next_wake(&self, env: &Env<'_>) -> Option<u64> {
        match &self.stage {
            Stage::Barrier => Some(env.now + BARRIER_POLL.as_nanos() as u64),
            // Past its last message, it closes at the end with everyone else.
            Stage::Publishing { schedule, sent } => Some(schedule.at(*sent).min(env.phases.end)),
        }
    }

    /// Whether it has published everything (the run's end has come).
    pub fn finished(&self, env: &Env<'_>) -> bool {
        match &self.stage {
            Stage::Barrier => env.now >= env.phases.end,
            Stage::Publishing { schedule, sent } => schedule.at(*sent) >= env.phases.end,
        }
    }

    /// The connection is over: subscribers stop waiting for more from it.
    pub fn done(&self, shared: &Shared) {
        shared.publishers[self.id as usize].done.store(true, SeqCst);
    }
}
