//! Pub/sub across gateway nodes: a node's link to a cross-node broker (`--broker redis://HOST:PORT`,
//! `redis+cluster://HOST:PORT,...` or `nats://HOST:PORT`); without `--broker` the in-process [`Hub`] alone is the broker, as before.
//!
//! The contract, whatever the engine:
//! - **Subscriptions follow presence.** A node subscribes to a topic's broker channel when the
//!   topic's first subscriber on the node appears (any worker) and unsubscribes when its last one
//!   leaves. The [`Hub`] reports each such 0->1 and 1->0 change to the [`Link`] (a short lock and a
//!   wake-up, never a wait); the engine reads the hub's presence again before acting, so a burst of
//!   changes costs one reconciliation, and after a reconnect the engine subscribes every present
//!   topic again from the same state.
//! - **A publish goes to the broker once**, from the node it was published on, and comes back to
//!   every node subscribed to the topic. The publishing node delivers it to its own subscribers at
//!   once (as without a broker: local delivery does not wait for, or depend on, the broker) and
//!   drops its own message when the broker echoes it back, by the node id in the [`envelope`].
//!   So each subscriber gets each message exactly once, and per-publisher order holds: a
//!   publisher's messages enter one FIFO queue to the broker thread, leave it in order on one
//!   connection, and the broker delivers a connection's publishes in order.
//! - **Messages from other nodes** are encoded into one frame per node and handed once to each
//!   worker with subscribers, through the hub's bounded, counted hand-off (the same path as a
//!   publish from another worker); each worker then fans out as for a local publish.
//! - **Nothing is unbounded, nothing blocks a worker.** The queue to the broker thread is bounded in
//!   messages and in bytes; a publish that finds it full, or the broker disconnected, is delivered
//!   locally and counted as a drop (`ringgate_broker_drops_total{reason}`), never buffered for
//!   later.
//! - **History in Redis** (`--broker redis://` with `--history-size` or `--positions`): the
//!   contract above changes in one place. A publish is not delivered locally at once: the broker
//!   thread runs one Lua script that assigns the topic's next offset, keeps the message in the
//!   topic's stream and publishes a version-2 [`envelope`] (epoch and offset in it) to the
//!   channel, atomically; every node, the publishing one included, delivers what comes back from
//!   the channel, in the order Redis assigned the offsets, so a message has the same offset
//!   everywhere and a recovery's replay joins the live stream without gap or duplicate. The
//!   price: a node's own subscribers get its publishes one Redis round trip later. With Redis
//!   away (or the queue full) a publish is delivered locally without a position, kept nowhere,
//!   and counted as a drop, as without history. A recovery (`?since=`) is a request to the broker
//!   thread (bounded, see [`Link::recover`]), answered through the worker's hand-off channel; see
//!   `redis.rs` for why nothing is lost or doubled in between. NATS keeps no history.
//! - **Faults.** The broker unreachable at start is an error naming the fix (unless
//!   `--broker-optional`); lost while running, local delivery goes on, `/healthz` answers
//!   `degraded`, `ringgate_broker_connected` is 0, and the engine reconnects with back-off and
//!   subscribes again.
//!
//! The engines (`redis`, `nats`) run on a thread of their own ("ringgate-broker") with a
//! current-thread tokio runtime: the only async code in the gateway, never entered by an io worker.
//! What the workers call here ([`Link::publish`], [`Link::presence_changed`]) is a non-blocking
//! `try_send` or a short lock plus a wake-up.

pub mod envelope;
mod nats;
mod redis;

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use bytes::Bytes;

use super::history::{HistorySettings, HistoryStats, Outcome, Position, Recovery, encode_frame};
use super::pubsub::{Hub, split_frame};
use crate::metrics::{BrokerDrop, BrokerStats, add};
use envelope::Envelope;

/// Which cross-node broker a node uses, from `--broker URL`.
#[derive(Clone, PartialEq, Eq)]
pub enum BrokerUrl {
    /// `redis://[user:password@]HOST:PORT[/DB]`: Redis pub/sub, and the history with
    /// `--history-size` or `--positions` (streams and scripts, see `redis.rs`); `rediss://` for
    /// the same over TLS (managed Redis services encrypt in transit; the password is then not on
    /// the wire in clear). `redis+cluster://[user:password@]HOST:PORT[,HOST:PORT...]`: a Redis
    /// Cluster, through any of the seed nodes listed (one down does not stop the start), with
    /// sharded pub/sub (SSUBSCRIBE, SPUBLISH: a message goes to the shard owning the topic's
    /// slot, not to every node of the cluster as PUBLISH does); asked for explicitly, not
    /// detected, so that a node never changes its channel names because of how a server is set.
    Redis(String),
    /// `nats://HOST:PORT`: NATS core pub/sub (no history).
    Nats(String),
}

impl BrokerUrl {
    /// Parses `--broker`: a `redis://` or `nats://` URL with a host (and port).
    pub fn parse(text: &str) -> Result<BrokerUrl, String> {
        let text = text.trim();
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("'{text}' is not a broker URL like redis://127.0.0.1:6379"))?;
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        if host.is_empty() || host.starts_with(':') {
            return Err(format!("broker URL '{text}' names no host (like redis://127.0.0.1:6379)"));
        }
        match scheme {
            "redis" | "rediss" | "redis+cluster" => {
                redis::check_url(text).map(|()| BrokerUrl::Redis(text.to_string()))
            }
            "rediss+cluster" => Err(format!(
                "'{text}': TLS to a Redis Cluster is not supported yet; use redis+cluster:// \
                 (or rediss:// to one server)"
            )),
            "nats" => nats::check_url(text).map(|()| BrokerUrl::Nats(text.to_string())),
            "tls" => Err(format!(
                "'{text}': TLS to NATS is not supported yet; use nats:// (or rediss:// for Redis)"
            )),
            other => Err(format!(
                "unknown broker '{other}://' in '{text}' (use redis://HOST:PORT, \
                 redis+cluster://HOST:PORT[,HOST:PORT...] or nats://HOST:PORT)"
            )),
        }
    }

    /// Whether the connection to the broker is TLS (`rediss://`): `--broker-ca` applies to it.
    pub fn is_tls(&self) -> bool {
        matches!(self, BrokerUrl::Redis(url) if url.starts_with("rediss://"))
    }

    /// The engine's name: the `engine` label of `ringgate_broker_connected`.
    pub fn engine(&self) -> &'static str {
        match self {
            BrokerUrl::Redis(_) => "redis",
            BrokerUrl::Nats(_) => "nats",
        }
    }

    /// The URL as given (it may carry a password: never logged, see `Display`).
    fn url(&self) -> &str {
        match self {
            BrokerUrl::Redis(url) | BrokerUrl::Nats(url) => url,
        }
    }
}

/// The URL without credentials, for logs, errors and `--check-config`.
impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = self.url();
        match url.split_once("://") {
            Some((scheme, rest)) => match rest.split_once('@') {
                Some((_, host)) => write!(f, "{scheme}://***@{host}"),
                None => f.write_str(url),
            },
            None => f.write_str(url),
        }
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

/// Messages that may wait in the queue to the broker thread, at most.
pub const QUEUE_MESSAGES: usize = 16 * 1024;
/// Bytes of frames that may wait in the queue to the broker thread, at most.
pub const QUEUE_BYTES: usize = 64 << 20;
/// Recoveries (`?since=`) that may wait for the broker thread at once, at most; past it a
/// recovering subscriber is told `unavailable` at once and gets the live stream.
pub const MAX_RECOVERIES: usize = 1024;
/// Topics whose presence changed that the link remembers one by one; past it, the engine compares
/// every topic (one full reconciliation instead of an ever-growing list).
const MAX_CHANGES: usize = 4096;

/// A local publish on its way to the broker thread: the topic and the frame the workers queued
/// (shared, not copied).
#[derive(Debug)]
pub struct Outbound {
    topic: Arc<str>,
    frame: Bytes,
    /// With history in the broker: the publishing subscriber ([`envelope::origin`], 0 for none),
    /// and the message goes through the history script as a version-2 envelope; `None`: a plain
    /// version-1 PUBLISH.
    origin: Option<u64>,
}

/// A subscriber that asked `?since=` on a node whose history is in the broker: what to read,
/// and where the answer goes.
#[derive(Debug)]
pub struct RecoveryRequest {
    topic: Arc<str>,
    since: Position,
    worker: usize,
    subscriber: u64,
}

/// Presence changes the engine has not looked at yet.
#[derive(Debug, Default)]
struct Changes {
    topics: HashSet<Arc<str>>,
    /// Too many changes to remember one by one (or a reconnect): compare every topic.
    everything: bool,
}

/// What the workers and the hub share with the broker thread. One per node.
pub struct Link {
    url: BrokerUrl,
    /// This node's id in envelopes: random at start.
    node: u64,
    stats: Arc<BrokerStats>,
    changes: Mutex<Changes>,
    /// Wakes the engine when presence changed.
    wake: tokio::sync::Notify,
    outgoing: tokio::sync::mpsc::Sender<Outbound>,
    queued_bytes: AtomicUsize,
    queue_limit_bytes: usize,
    /// Messages sent to the broker so far: the envelope's sequence.
    sequence: AtomicU64,
    /// The history kept in the broker (Redis only), if any: set before the broker thread starts.
    history: OnceLock<HistorySettings>,
    /// `--broker-ca`: the PEM certificates a `rediss://` broker's certificate must chain to, in
    /// place of the system's roots; set before the broker thread starts.
    ca_pem: OnceLock<Vec<u8>>,
    /// Counts the recoveries and replays of the history kept in the broker.
    history_stats: HistoryStats,
    recoveries: tokio::sync::mpsc::Sender<RecoveryRequest>,
}

/// The broker thread's end of the queues from the workers: local publishes, and recoveries.
pub struct Outgoing {
    publishes: tokio::sync::mpsc::Receiver<Outbound>,
    recoveries: tokio::sync::mpsc::Receiver<RecoveryRequest>,
}

impl Link {
    /// A link for `url` with the default queue bounds, and the broker thread's end of its queue.
    pub fn new(url: BrokerUrl) -> (Arc<Link>, Outgoing) {
        Link::with_bounds(url, QUEUE_MESSAGES, QUEUE_BYTES)
    }

    /// A link whose queue holds at most `messages` messages and `bytes` bytes of frames.
    pub fn with_bounds(url: BrokerUrl, messages: usize, bytes: usize) -> (Arc<Link>, Outgoing) {
        let (tx, rx) = tokio::sync::mpsc::channel(messages.max(1));
        let (recoveries_tx, recoveries_rx) = tokio::sync::mpsc::channel(MAX_RECOVERIES);
        let mut seed = [0u8; 8];
        // A clock-derived id if the kernel's generator is unavailable: ids need to differ, not to be secret.
        let node = match getrandom::fill(&mut seed) {
            Ok(()) => u64::from_ne_bytes(seed),
            Err(_) => {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
                    ^ u64::from(std::process::id()) << 32
            }
        };
        let link = Link {
            url,
            node,
            stats: Arc::default(),
            changes: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            outgoing: tx,
            queued_bytes: AtomicUsize::new(0),
            queue_limit_bytes: bytes,
            sequence: AtomicU64::new(0),
            history: OnceLock::new(),
            ca_pem: OnceLock::new(),
            history_stats: HistoryStats::default(),
            recoveries: recoveries_tx,
        };
        (Arc::new(link), Outgoing { publishes: rx, recoveries: recoveries_rx })
    }

    /// Keeps the topics' history in the broker as `settings` say (Redis only): set once, before
    /// the broker thread starts.
    pub fn set_history(&self, settings: HistorySettings) {
        let _ = self.history.set(settings);
    }

    /// The history kept in the broker, if any.
    pub fn history(&self) -> Option<HistorySettings> {
        self.history.get().copied()
    }

    /// Trusts only the CA certificates in `pem` for a `rediss://` broker (`--broker-ca`): a
    /// private CA, as a self-hosted Redis with TLS has. Set once, before the broker thread starts.
    pub fn set_ca(&self, pem: Vec<u8>) {
        let _ = self.ca_pem.set(pem);
    }

    /// The CA certificates set by [`Link::set_ca`], if any.
    fn ca(&self) -> Option<&[u8]> {
        self.ca_pem.get().map(Vec::as_slice)
    }

    /// The counters of the history kept in the broker (recoveries and replays; what Redis holds
    /// is Redis's to count).
    pub fn history_stats(&self) -> &HistoryStats {
        &self.history_stats
    }

    /// The broker's counters.
    pub fn stats(&self) -> &BrokerStats {
        &self.stats
    }

    /// The engine's name (`redis`, `nats`).
    pub fn engine(&self) -> &'static str {
        self.url.engine()
    }

    /// Whether the node has lost its broker (it then delivers locally only): `/healthz` says
    /// `degraded`.
    pub fn is_degraded(&self) -> bool {
        !self.stats.is_connected()
    }

    /// A worker published `frame` on `topic` (and delivered it locally): queue it for the broker.
    /// Never waits: with the broker away or the queue full, the message stays local and is counted.
    pub fn publish(&self, topic: &str, frame: &Bytes) {
        self.enqueue(topic, frame, None);
    }

    /// A worker published `frame` on `topic` with the history in the broker (`origin`: the
    /// publishing subscriber, see [`envelope::origin`]): queue it for the history script, which
    /// assigns its offset and sends it back to every node, this one included. Returns false when
    /// it could not be queued (counted as a drop): the caller then delivers it locally, without
    /// a position.
    pub fn publish_in_order(&self, topic: &str, frame: &Bytes, origin: u64) -> bool {
        self.enqueue(topic, frame, Some(origin))
    }

    fn enqueue(&self, topic: &str, frame: &Bytes, origin: Option<u64>) -> bool {
        if !self.stats.is_connected() {
            self.stats.dropped(BrokerDrop::Disconnected, 1);
            return false;
        }
        let len = frame.len();
        let reserved = self
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued + len <= self.queue_limit_bytes).then_some(queued + len)
            })
            .is_ok();
        if !reserved {
            self.stats.dropped(BrokerDrop::QueueFull, 1);
            return false;
        }
        let outbound = Outbound { topic: Arc::from(topic), frame: frame.clone(), origin };
        if self.outgoing.try_send(outbound).is_err() {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.stats.dropped(BrokerDrop::QueueFull, 1);
            return false;
        }
        true
    }

    /// Subscriber `subscriber` of `worker`, subscribed to `topic` (and in the hub's presence),
    /// last saw `since`: asks the broker thread to read what it missed once the node is
    /// subscribed to the topic's channel. The answer comes back through the worker's hand-off
    /// channel ([`Hub::hand_recovery`]), always, within the broker's response timeout. Returns
    /// false when the request cannot be taken (no history in the broker, broker away, or
    /// [`MAX_RECOVERIES`] waiting): the caller answers `unavailable` itself.
    pub fn recover(&self, topic: &Arc<str>, since: Position, worker: usize, subscriber: u64) -> bool {
        if self.history.get().is_none() || !self.stats.is_connected() {
            return false;
        }
        let request = RecoveryRequest { topic: Arc::clone(topic), since, worker, subscriber };
        self.recoveries.try_send(request).is_ok()
    }

    /// The hub saw `topic` appear on the node (its first subscriber) or disappear (its last):
    /// tells the engine, which looks the presence up again. Called by the hub right
    /// after a topic is added to or removed from its map (never under its lock); takes a short lock of
    /// its own and wakes the engine.
    pub fn presence_changed(&self, topic: &Arc<str>) {
        if let Ok(mut changes) = self.changes.lock() {
            if changes.topics.len() < MAX_CHANGES {
                changes.topics.insert(Arc::clone(topic));
            } else {
                changes.everything = true;
            }
        }
        self.wake.notify_one();
    }

    /// Takes the changes recorded so far: `None` when every topic must be compared.
    fn take_changes(&self) -> Option<Vec<Arc<str>>> {
        let Ok(mut changes) = self.changes.lock() else { return None };
        let taken = std::mem::take(&mut *changes);
        (!taken.everything).then(|| taken.topics.into_iter().collect())
    }

    /// Whether presence changes wait for the engine.
    fn has_changes(&self) -> bool {
        self.changes.lock().map_or(true, |changes| changes.everything || !changes.topics.is_empty())
    }

    /// The broker thread took `outbound` off the queue: its room is back.
    fn dequeued(&self, outbound: &Outbound) {
        self.queued_bytes.fetch_sub(outbound.frame.len(), Ordering::AcqRel);
    }

    /// Encodes `outbound` as an envelope for the broker channel, with the next sequence number.
    fn envelope(&self, outbound: &Outbound, out: &mut Vec<u8>) {
        let (kind, payload) = split_frame(&outbound.frame);
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed) + 1;
        Envelope { node: self.node, sequence, position: None, kind, payload }.encode(out);
    }
}

/// What an engine needs of its node: the link and the hub (presence, and hand-offs to workers).
#[derive(Clone)]
struct Node {
    link: Arc<Link>,
    hub: Arc<Hub>,
}

/// Where each engine stands on a topic: subscribed at the broker, or not.
#[derive(Default)]
struct Subscribed(HashSet<Arc<str>>);

/// What the engine must do to match the hub's presence.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    subscribe: Vec<Arc<str>>,
    unsubscribe: Vec<Arc<str>>,
}

impl Node {
    /// Compares the topics that changed (or all of them) with what is subscribed at the broker.
    fn plan(&self, subscribed: &Subscribed, everything: bool) -> Plan {
        let mut plan = Plan::default();
        let changed = if everything { None } else { self.link.take_changes() };
        match changed {
            Some(topics) => {
                for topic in topics {
                    match (self.hub.is_present(&topic), subscribed.0.contains(&topic)) {
                        (true, false) => plan.subscribe.push(topic),
                        (false, true) => plan.unsubscribe.push(topic),
                        _ => {}
                    }
                }
            }
            None => {
                if everything {
                    // Changes recorded so far are covered by the full comparison.
                    let _ = self.link.take_changes();
                }
                let present: HashSet<Arc<str>> = self.hub.present_topics().into_iter().collect();
                plan.subscribe = present.iter().filter(|t| !subscribed.0.contains(*t)).cloned().collect();
                plan.unsubscribe = subscribed.0.iter().filter(|t| !present.contains(*t)).cloned().collect();
            }
        }
        plan
    }

    /// A message arrived from the broker on `topic`: unless this node published it (and delivered
    /// it then), encode it once and hand it to every worker with subscribers (bounded and
    /// counted). A version-2 envelope (history in the broker) is delivered whoever published it,
    /// with its position, except to the subscriber that published it.
    fn receive(&self, topic: &str, message: &[u8]) {
        let stats = &self.link.stats;
        let Some(envelope) = Envelope::decode(message) else {
            stats.dropped(BrokerDrop::Malformed, 1);
            return;
        };
        let own = envelope.node == self.link.node;
        let (at, exclude) = match envelope.position {
            None if own => return, // Delivered locally when it was published.
            None => (Position { epoch: 0, offset: 0 }, None),
            Some(at) => (at, own.then(|| envelope::origin_parts(envelope.sequence)).flatten()),
        };
        add(&stats.received, 1);
        let frame = self.frame(&envelope);
        let missed = self.hub.deliver_remote(topic, frame, at, exclude);
        if missed > 0 {
            stats.dropped(BrokerDrop::Handoff, missed as u64);
        }
    }

    /// The frame subscribers get for `envelope`: with its position when `--positions` asks.
    fn frame(&self, envelope: &Envelope<'_>) -> Bytes {
        let positions = self.link.history().is_some_and(|h| h.positions);
        encode_frame(envelope.kind, envelope.payload, envelope.position.filter(|_| positions))
    }

    /// Hands the outcome of `request` to its subscriber's worker (the frames replayed are
    /// envelopes from the topic's stream), counting it.
    fn answer(&self, request: RecoveryRequest, outcome: Outcome, live_after: Position, replay: &[&[u8]]) {
        let mut frames = Vec::with_capacity(replay.len());
        let mut outcome = outcome;
        for message in replay {
            match Envelope::decode(message) {
                Some(envelope) => frames.push(self.frame(&envelope)),
                None => {
                    // Not ours: the replay would have a hole; say so rather than skip it.
                    self.link.stats.dropped(BrokerDrop::Malformed, 1);
                    outcome = Outcome::Unavailable;
                    frames.clear();
                    break;
                }
            }
        }
        let recovery = Recovery { outcome, live_after, replay: frames };
        self.hub.hand_recovery(request.worker, request.topic, request.subscriber, recovery);
    }

    /// Answers `request` with `unavailable`: the history could not be read.
    fn unavailable(&self, request: RecoveryRequest) {
        self.answer(request, Outcome::Unavailable, Position { epoch: 0, offset: 0 }, &[]);
    }

    /// The connection is up and subscribed to every present topic: publishes go to the broker from
    /// here on. The first time, start-up hears of it (through `first`); later, it is a reconnect.
    fn connected(&self, first: &mut Option<mpsc::Sender<Result<(), String>>>, shown: &str) {
        self.link.stats.set_connected(true);
        match first.take() {
            Some(first) => {
                let _ = first.send(Ok(()));
            }
            None => {
                add(&self.link.stats.reconnects, 1);
                tracing::info!(broker = %shown, "reconnected to the broker; subscribed again");
            }
        }
    }

    /// The connection is lost: later publishes stay local, and those still queued are dropped
    /// (counted) rather than sent late after a reconnect.
    fn disconnected(&self, outgoing: &mut Outgoing) {
        self.link.stats.set_connected(false);
        self.link.stats.set_subscribed_topics(0);
        let mut dropped = 0;
        while let Ok(outbound) = outgoing.publishes.try_recv() {
            self.link.dequeued(&outbound);
            dropped += 1;
        }
        self.link.stats.dropped(BrokerDrop::Disconnected, dropped);
        while let Ok(request) = outgoing.recoveries.try_recv() {
            self.unavailable(request);
        }
    }
}

/// Exponential back-off between reconnection attempts: 100 ms doubling to 5 s, with a per-node
/// jitter of up to a quarter, so that nodes that lost the broker together do not return in step.
struct Backoff {
    next: Duration,
    state: u64,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn new(seed: u64) -> Backoff {
        Backoff { next: Backoff::FIRST, state: seed | 1 }
    }

    fn reset(&mut self) {
        self.next = Backoff::FIRST;
    }

    /// The wait before the next attempt.
    fn next_wait(&mut self) -> Duration {
        // xorshift64: jitter needs no quality beyond differing between nodes.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let base = self.next;
        self.next = (self.next * 2).min(Backoff::MAX);
        let quarter = base.as_millis() as u64 / 4;
        base + Duration::from_millis(self.state % (quarter + 1))
    }
}

/// Why the broker could not be used at start.
#[derive(Debug)]
pub struct BrokerError {
    url: String,
    cause: String,
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot reach the broker at {}: {} (start it, fix --broker, or pass --broker-optional to \
             start without it, delivering locally and reconnecting in the background)",
            self.url, self.cause
        )?;
        if self.url.starts_with("rediss://") {
            f.write_str(
                "; a rediss:// server's certificate must chain to the system's roots, or to --broker-ca FILE",
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for BrokerError {}

/// How long the first connection attempt may take before start-up gives up on it.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the broker thread for `link` and waits for its first connection attempt: an error if it
/// failed and `optional` is false; with `optional`, a warning, and the thread keeps trying.
pub fn start(link: Arc<Link>, outgoing: Outgoing, hub: Arc<Hub>, optional: bool) -> Result<(), BrokerError> {
    let url = link.url.clone();
    let node = Node { link, hub };
    let (first_tx, first_rx) = mpsc::channel::<Result<(), String>>();
    let engine_url = url.clone();
    std::thread::Builder::new()
        .name("ringgate-broker".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = first_tx.send(Err(format!("cannot start the broker thread's runtime: {error}")));
                    return;
                }
            };
            match engine_url {
                BrokerUrl::Redis(url) => runtime.block_on(redis::run(url, node, outgoing, first_tx)),
                BrokerUrl::Nats(url) => runtime.block_on(nats::run(url, node, outgoing, first_tx)),
            }
        })
        .map_err(|error| BrokerError {
            url: url.to_string(),
            cause: format!("cannot start its thread: {error}"),
        })?;
    let first = first_rx
        .recv_timeout(START_TIMEOUT + Duration::from_secs(1))
        .unwrap_or_else(|_| Err(format!("no connection within {START_TIMEOUT:?}")));
    match first {
        Ok(()) => {
            tracing::info!(broker = %url, "connected to the cross-node broker");
            Ok(())
        }
        Err(cause) if optional => {
            tracing::warn!(
                broker = %url,
                %cause,
                "the broker is unreachable; --broker-optional: serving with local delivery only and \
                 reconnecting in the background (/healthz answers degraded)"
            );
            Ok(())
        }
        Err(cause) => Err(BrokerError { url: url.to_string(), cause }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::message::MessageKind;

    fn redis_url() -> BrokerUrl {
        BrokerUrl::parse("redis://127.0.0.1:6379").expect("valid")
    }

    #[test]
    fn broker_urls_are_checked_and_never_print_a_password() {
        assert_eq!(redis_url().engine(), "redis");
        assert_eq!(BrokerUrl::parse("nats://127.0.0.1:4222").map(|u| u.engine()), Ok("nats"));
        for bad in ["127.0.0.1:6379", "redis://", "redis://:6379", "kafka://h:1", "tls://h:1", "http://h"] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
        let tls = BrokerUrl::parse("rediss://user:s3cret@redis.example:6380").expect("valid");
        assert!(tls.is_tls() && !redis_url().is_tls());
        assert_eq!((tls.engine(), tls.to_string().as_str()), ("redis", "rediss://***@redis.example:6380"));
        let cluster =
            BrokerUrl::parse("redis+cluster://u:s3cret@10.0.0.1:7000,10.0.0.2:7000").expect("valid");
        assert_eq!(
            (cluster.engine(), cluster.is_tls(), cluster.to_string().as_str()),
            ("redis", false, "redis+cluster://***@10.0.0.1:7000,10.0.0.2:7000")
        );
        assert!(BrokerUrl::parse("rediss+cluster://10.0.0.1:7000").is_err(), "not supported yet");
        let secret = BrokerUrl::parse("redis://user:s3cret@127.0.0.1:6379/2").expect("valid");
        assert_eq!(secret.to_string(), "redis://***@127.0.0.1:6379/2");
        assert!(!format!("{secret:?}").contains("s3cret"));
    }

    #[test]
    fn presence_changes_are_remembered_up_to_a_bound_then_everything_is_compared() {
        let (link, _rx) = Link::new(redis_url());
        let topic: Arc<str> = Arc::from("a");
        link.presence_changed(&topic);
        link.presence_changed(&topic);
        assert_eq!(link.take_changes(), Some(vec![Arc::clone(&topic)]), "one entry per topic");
        assert!(!link.has_changes());
        for i in 0..=MAX_CHANGES {
            link.presence_changed(&Arc::from(i.to_string()));
        }
        assert!(link.has_changes());
        assert_eq!(link.take_changes(), None, "past the bound: compare everything");
        assert_eq!(link.take_changes(), Some(vec![]));
    }

    #[test]
    fn plans_follow_the_hubs_presence() {
        let (hub, _deliveries) = Hub::new(2);
        let (link, _rx) = Link::new(redis_url());
        hub.set_cluster(Arc::clone(&link));
        let node = Node { link: Arc::clone(&link), hub: Arc::clone(&hub) };
        let mut subscribed = Subscribed::default();

        hub.add_presence("a", 0);
        hub.add_presence("a", 1); // not a node-wide change
        hub.add_presence("b", 1);
        let mut plan = node.plan(&subscribed, false);
        plan.subscribe.sort();
        assert_eq!(plan.subscribe, vec![Arc::from("a"), Arc::from("b")]);
        subscribed.0.extend(plan.subscribe);

        hub.remove_presence("a", 0);
        assert_eq!(node.plan(&subscribed, false), Plan::default(), "worker 1 still has a subscriber");
        hub.remove_presence("a", 1);
        hub.add_presence("c", 0);
        hub.remove_presence("c", 0); // came and went: nothing to do
        let plan = node.plan(&subscribed, false);
        assert_eq!(plan, Plan { subscribe: vec![], unsubscribe: vec![Arc::from("a")] });
        subscribed.0.remove("a");

        // After a reconnect nothing is subscribed: everything present is, again.
        let plan = node.plan(&Subscribed::default(), true);
        assert_eq!(plan, Plan { subscribe: vec![Arc::from("b")], unsubscribe: vec![] });
    }

    #[test]
    fn own_messages_are_filtered_and_others_are_handed_to_workers_with_subscribers() {
        let (hub, deliveries) = Hub::new(2);
        let (link, _rx) = Link::new(redis_url());
        let node = Node { link: Arc::clone(&link), hub: Arc::clone(&hub) };
        hub.add_presence("t", 1);

        let mut own = Vec::new();
        Envelope { node: link.node, sequence: 1, position: None, kind: MessageKind::Text, payload: b"mine" }
            .encode(&mut own);
        node.receive("t", &own);
        assert!(deliveries[1].try_recv().is_err(), "delivered locally when published");

        let mut other = Vec::new();
        Envelope {
            node: link.node ^ 1,
            sequence: 1,
            position: None,
            kind: MessageKind::Text,
            payload: b"hi",
        }
        .encode(&mut other);
        node.receive("t", &other);
        let delivery = deliveries[1].try_recv().expect("handed to the worker with a subscriber");
        assert_eq!(&delivery.frame[..], &[0x81, 2, b'h', b'i']);
        assert!(deliveries[0].try_recv().is_err(), "worker 0 has no subscriber");
        assert_eq!(link.stats.received.load(Ordering::Relaxed), 1);

        node.receive("t", b"not an envelope");
        assert_eq!(link.stats.drops(BrokerDrop::Malformed), 1);
    }

    #[test]
    fn with_the_history_in_the_broker_own_messages_come_back_with_their_position_except_to_their_publisher() {
        let (hub, deliveries) = Hub::new(2);
        let (link, _rx) = Link::new(redis_url());
        link.set_history(HistorySettings { size: 10, ttl: Duration::ZERO, positions: true, max_topics: 1 });
        let node = Node { link: Arc::clone(&link), hub: Arc::clone(&hub) };
        hub.add_presence("t", 0);
        hub.add_presence("t", 1);
        let at = Position { epoch: 0xab, offset: 3 };
        let mut own = Vec::new();
        let envelope = Envelope {
            node: link.node,
            sequence: envelope::origin(1, 7),
            position: Some(at),
            kind: MessageKind::Binary,
            payload: b"mine",
        };
        envelope.encode(&mut own);
        node.receive("t", &own);
        let here = deliveries[0].try_recv().expect("delivered on this node too");
        let there = deliveries[1].try_recv().expect("and on the publisher's worker");
        assert_eq!((here.at, here.exclude), (at, None));
        assert_eq!((there.at, there.exclude), (at, Some(7)), "not to the subscriber that published it");
        assert_eq!(&here.frame[2..18], &[0, 0, 0, 0, 0, 0, 0, 0xab, 0, 0, 0, 0, 0, 0, 0, 3], "--positions");
    }

    #[test]
    fn publishes_are_bounded_and_stay_local_while_disconnected() {
        let frame = Bytes::from_static(&[0x81, 3, b'a', b'b', b'c']);
        let (link, mut rx) = Link::with_bounds(redis_url(), 2, 12);
        link.publish("t", &frame);
        assert_eq!(link.stats.drops(BrokerDrop::Disconnected), 1, "not connected yet");
        link.stats.set_connected(true);
        for _ in 0..3 {
            link.publish("t", &frame);
        }
        assert_eq!(link.stats.drops(BrokerDrop::QueueFull), 1, "12 bytes hold two 5-byte frames");
        let first = rx.publishes.try_recv().expect("queued");
        link.dequeued(&first);
        link.publish("t", &frame);
        assert_eq!(link.stats.drops(BrokerDrop::QueueFull), 1, "room came back");

        let (hub, _deliveries) = Hub::new(1);
        let node = Node { link: Arc::clone(&link), hub };
        node.disconnected(&mut rx);
        assert_eq!(link.stats.drops(BrokerDrop::Disconnected), 3, "the two still queued, dropped");
        assert_eq!(link.queued_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_bounded_jitter() {
        let mut backoff = Backoff::new(7);
        let waits: Vec<Duration> = (0..10).map(|_| backoff.next_wait()).collect();
        assert!(waits[0] >= Backoff::FIRST && waits[0] <= Backoff::FIRST * 5 / 4, "{waits:?}");
        assert!(waits.iter().all(|w| *w <= Backoff::MAX * 5 / 4), "{waits:?}");
        assert!(waits[9] >= Backoff::MAX);
        backoff.reset();
        assert!(backoff.next_wait() <= Backoff::FIRST * 5 / 4);
    }
}
