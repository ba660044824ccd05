//! Topics, subscribers, and the fan-out of pre-encoded frames, within a worker and across workers.
//!
//! A published message is encoded into one server frame, once; every subscriber's queue gets a clone
//! of the same `Bytes` (a reference count, not a copy), since server frames carry no per-receiver
//! bytes. Each worker has its own [`Broker`] with its own topics; the process-wide [`Hub`] knows which
//! workers have subscribers on which topic and hands a message to each of those workers once (one
//! channel send per worker per message, never per subscriber). Order is kept per publisher per topic:
//! local queues are filled synchronously, and each worker's channel is FIFO.
//!
//! Slow consumers: a subscriber whose queue (plus what its connection is writing) would pass
//! `max_backpressure` is either closed (its queue is freed, nothing more is queued for it, and its
//! connection closes with 1008) or, with the `drop` policy, misses that message (counted). A slow
//! subscriber never slows the others: fan-out never waits.
//!
//! Hand-offs between workers are bounded in bytes, not in messages: each worker accepts at most
//! [`HANDOFF_LIMIT_BYTES`] of frames that it has not yet queued on its subscribers (a worker
//! that falls behind, say one core saturated by other traffic, would otherwise let publishers on
//! the other workers grow its channel without bound). A frame that does not fit is not handed to
//! that worker; each of its subscribers there misses it, counted in
//! `ringgate_pubsub_handoff_drops_total`. Publishers never wait for a slow worker either.
//!
//! permessage-deflate: a subscriber that agreed it in shared mode gets the message's compressed
//! frame, made once per worker (per window size) the first time one of its subscribers needs it,
//! and shared like the plain one; the others get the plain frame. A dedicated-mode subscriber gets
//! the plain frame and its connection compresses it with its own compressor.
//!
//! Across nodes (`--broker`): the hub tells the node's [`Link`] when a topic gets its first
//! subscriber on the node or loses its last, and every publish is also given to the link after
//! local delivery (see `gateway::cluster`); messages from other nodes come back through the same
//! bounded hand-off as a publish from another worker ([`Hub::deliver_remote`]).
//!
//! History (`--history-size`, `--positions`, see `gateway::history`): a publish to a topic then
//! takes the topic's log lock, gets its offset, is encoded (with its position when asked), kept,
//! and handed to every worker with subscribers, its own included (a frame queued at once would
//! overtake lower offsets other workers handed it and it has not drained yet), before the lock is
//! released: every worker queues a topic's messages in offset order, one loop turn later for the
//! publisher's own worker than without history; the workers are woken after. A subscriber
//! that asks `?since=` is subscribed first, then reads the history, and skips the live frames at
//! or below what it read ([`Broker::subscribe_since`]).
//!
//! History in Redis (`--broker redis://` with `--history-size` or `--positions`, see
//! `gateway::cluster`): a publish goes to the broker thread instead of the local subscribers and
//! comes back, with its offset, like a message from another node. A subscriber that asks
//! `?since=` is subscribed, marked recovering, and its request goes to the broker thread; until
//! the answer comes back through the worker's hand-off channel, the live frames for it are held
//! (at most [`RECOVERY_HOLD_FRAMES`] and `max_backpressure` bytes, shared `Bytes`), then those at
//! or below the replay's end are skipped and the rest queued after the replay.
//!
//! Must never: block, await, or copy a payload per subscriber; hold a lock while notifying.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use std::sync::{OnceLock, mpsc};
use std::task::Waker;

use bytes::Bytes;

use super::cluster::{Link, envelope};
use super::compression::Compressor;
use super::history::{History, HistoryStats, Outcome, Position, Recovery, encode_frame, recovery_frame};
use crate::metrics::{WorkerStats, add};
use crate::proto::deflate::{MAX_WINDOW_BITS, MIN_WINDOW_BITS};
use crate::proto::frame::{Decoded, FrameHeader};
use crate::proto::message::MessageKind;

/// What to do with a subscriber that does not keep up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumerPolicy {
    /// Close it with 1008 "slow consumer"; nothing more is queued for it.
    Close,
    /// Drop the messages it has no room for, and count them.
    Drop,
}

/// A message handed from the publishing worker to another worker with subscribers on the topic.
#[derive(Debug)]
pub struct Delivery {
    /// The topic, shared with the hub's table.
    pub topic: Arc<str>,
    /// The encoded server frame.
    pub frame: Bytes,
    /// The message's position in its topic's history; offset 0 without history (or from another
    /// node).
    pub at: Position,
    /// A subscriber of the receiving worker not to queue it for (the publisher, handing a message
    /// to its own worker's subscribers in offset order); `None` on every other worker.
    pub exclude: Option<u64>,
    /// Not a message but the answer to a recovery read from the history in the broker (the
    /// frame is then empty).
    pub recovered: Option<Box<Recovered>>,
}

impl Delivery {
    /// A message for the subscribers of `topic` on the receiving worker (but `exclude`).
    pub fn message(topic: &Arc<str>, frame: &Bytes, at: Position, exclude: Option<u64>) -> Delivery {
        Delivery { topic: Arc::clone(topic), frame: frame.clone(), at, exclude, recovered: None }
    }
}

/// The answer to a recovery (`?since=`) read from the history in the broker, for a subscriber of
/// the receiving worker.
#[derive(Debug)]
pub struct Recovered {
    /// The recovering subscriber's id on its worker.
    pub subscriber: u64,
    /// What it missed, and where the live stream continues.
    pub recovery: Recovery,
}

/// Live frames held, at most, for a subscriber whose recovery is being read from the broker
/// (also bounded by `max_backpressure` bytes; the frames are shared, each entry costs 48 bytes);
/// past it the recovery fails unless every frame not held is in the replay. Room for 2 s of
/// 2,000 messages a second on the topic: a read takes a round trip, but a loaded node may take
/// much longer to see its answer.
pub const RECOVERY_HOLD_FRAMES: usize = 4096;

/// Bytes of frames handed to one worker and not yet queued on its subscribers, at most (a frame
/// is counted once however many subscribers it is for).
pub const HANDOFF_LIMIT_BYTES: usize = 64 << 20;

/// The process-wide part of pub/sub: which workers have subscribers on which topic, and a channel
/// into each worker.
pub struct Hub {
    workers: Vec<mpsc::Sender<Delivery>>,
    /// Per worker: how to wake it when a hand-off is queued (set once its loop runs).
    wakers: Box<[OnceLock<Waker>]>,
    /// Per worker: bytes handed over and not yet delivered, bounded by `handoff_limit`.
    handoff_bytes: Box<[AtomicUsize]>,
    handoff_limit: usize,
    /// Subscribers per worker, per topic; a topic is here while any worker has a subscriber on it.
    presence: RwLock<HashMap<Arc<str>, Box<[AtomicUsize]>>>,
    /// The cross-node broker (`--broker`), told when a topic appears on or leaves this node and
    /// given every local publish; unset: this process is the whole broker.
    cluster: OnceLock<Arc<Link>>,
    /// The topics' histories (`--history-size`, `--positions`); unset: no offsets, no history.
    history: OnceLock<Arc<History>>,
}

impl Hub {
    /// A hub for `workers` workers, and each worker's receiving end (to be drained by
    /// [`Broker::deliver`] on that worker).
    pub fn new(workers: usize) -> (Arc<Hub>, Vec<mpsc::Receiver<Delivery>>) {
        Hub::with_handoff_limit(workers, HANDOFF_LIMIT_BYTES)
    }

    /// A hub whose per-worker hand-off bound is `limit` bytes instead of [`HANDOFF_LIMIT_BYTES`].
    pub fn with_handoff_limit(workers: usize, limit: usize) -> (Arc<Hub>, Vec<mpsc::Receiver<Delivery>>) {
        let (senders, receivers) = (0..workers).map(|_| mpsc::channel()).unzip();
        let handoff_bytes = (0..workers).map(|_| AtomicUsize::new(0)).collect();
        let wakers = (0..workers).map(|_| OnceLock::new()).collect();
        let hub = Hub {
            workers: senders,
            wakers,
            handoff_bytes,
            handoff_limit: limit,
            presence: RwLock::default(),
            cluster: OnceLock::new(),
            history: OnceLock::new(),
        };
        (Arc::new(hub), receivers)
    }

    /// Tells the hub how to wake `worker` when something is handed to it (the worker then drains
    /// its receiver). Set once; a worker without a waker is expected to poll.
    pub fn set_waker(&self, worker: usize, waker: Waker) {
        let _ = self.wakers[worker].set(waker);
    }

    /// Connects the hub to a cross-node broker: from here on it hears of every topic that appears on
    /// or leaves this node, and of every local publish. Set once, before the workers start.
    pub fn set_cluster(&self, link: Arc<Link>) {
        let _ = self.cluster.set(link);
    }

    /// Keeps the topics' histories in `history` from here on. Set once, before the workers start.
    pub fn set_history(&self, history: Arc<History>) {
        let _ = self.history.set(history);
    }

    /// The topics' histories, if kept.
    pub fn history(&self) -> Option<&Arc<History>> {
        self.history.get()
    }

    /// Whether any worker has a subscriber on `topic`.
    pub fn is_present(&self, topic: &str) -> bool {
        self.presence.read().is_ok_and(|map| map.contains_key(topic))
    }

    /// The topics with a subscriber on any worker (for the broker to subscribe to after a reconnect).
    pub fn present_topics(&self) -> Vec<Arc<str>> {
        self.presence.read().map_or_else(|_| Vec::new(), |map| map.keys().cloned().collect())
    }

    /// Hands a frame that came from the broker to every worker with subscribers on `topic`, once
    /// each, within each worker's hand-off bound. `at` is its position (history in the broker;
    /// offset 0 without), `exclude` the worker and id of a subscriber not to queue it for (the
    /// one that published it). Returns the subscribers that missed it (on workers without room).
    pub fn deliver_remote(
        &self,
        topic: &str,
        frame: Bytes,
        at: Position,
        exclude: Option<(usize, u64)>,
    ) -> usize {
        let mut missed = 0;
        if let Ok(presence) = self.presence.read()
            && let Some((topic, counts)) = presence.get_key_value(topic)
        {
            for (worker, count) in counts.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    let exclude = exclude.and_then(|(w, id)| (w == worker).then_some(id));
                    let delivery = Delivery::message(topic, &frame, at, exclude);
                    if !self.hand_off(worker, delivery) {
                        missed += count;
                    }
                }
            }
        }
        missed
    }

    /// Hands the answer to a recovery read from the broker to `worker`, for its subscriber
    /// `subscriber` (outside the hand-off bound, which counts frames of live messages: the
    /// number of recoveries waiting is bounded by `cluster::MAX_RECOVERIES`).
    pub fn hand_recovery(&self, worker: usize, topic: Arc<str>, subscriber: u64, recovery: Recovery) {
        let recovered = Some(Box::new(Recovered { subscriber, recovery }));
        let delivery = Delivery { topic, frame: Bytes::new(), at: NOWHERE, exclude: None, recovered };
        self.hand_off(worker, delivery);
    }

    /// Subscribers on `topic` across this node's workers.
    fn present_subscribers(&self, topic: &str) -> usize {
        self.presence
            .read()
            .ok()
            .and_then(|map| {
                map.get(topic).map(|counts| counts.iter().map(|c| c.load(Ordering::Relaxed)).sum())
            })
            .unwrap_or(0)
    }

    /// Hands `delivery` to `worker` if its hand-off bound has room for the frame, and wakes it.
    fn hand_off(&self, worker: usize, delivery: Delivery) -> bool {
        let handed = self.hand_off_quietly(worker, delivery);
        if handed {
            self.wake(worker);
        }
        handed
    }

    /// Wakes `worker` to drain its hand-offs.
    fn wake(&self, worker: usize) {
        if let Some(waker) = self.wakers[worker].get() {
            waker.wake_by_ref();
        }
    }

    /// Hands `delivery` to `worker` if its hand-off bound has room, without waking it (the caller
    /// wakes it once it holds no lock).
    fn hand_off_quietly(&self, worker: usize, delivery: Delivery) -> bool {
        let len = delivery.frame.len();
        let pending = &self.handoff_bytes[worker];
        let reserved = pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bytes| {
                (bytes + len <= self.handoff_limit).then_some(bytes + len)
            })
            .is_ok();
        if !reserved {
            return false;
        }
        if self.workers[worker].send(delivery).is_err() {
            pending.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// `worker` has queued a handed-over frame of `len` bytes: its room is back.
    fn handed_over(&self, worker: usize, len: usize) {
        self.handoff_bytes[worker].fetch_sub(len, Ordering::AcqRel);
    }

    /// Topics with at least one subscriber, across all workers.
    pub fn topic_count(&self) -> usize {
        self.presence.read().map_or(0, |map| map.len())
    }

    pub(super) fn add_presence(&self, topic: &str, worker: usize) {
        if let Ok(map) = self.presence.read()
            && let Some(counts) = map.get(topic)
        {
            counts[worker].fetch_add(1, Ordering::Relaxed);
            return;
        }
        let created = match self.presence.write() {
            Ok(mut map) => match map.get(topic) {
                Some(counts) => {
                    counts[worker].fetch_add(1, Ordering::Relaxed);
                    None
                }
                None => {
                    // The topic's first subscriber on this node.
                    let topic: Arc<str> = Arc::from(topic);
                    let counts: Box<[AtomicUsize]> =
                        self.workers.iter().map(|_| AtomicUsize::new(0)).collect();
                    counts[worker].fetch_add(1, Ordering::Relaxed);
                    map.insert(Arc::clone(&topic), counts);
                    Some(topic)
                }
            },
            Err(_) => None,
        };
        // Told after the lock is released: the broker reads the presence again, so the order of
        // two such calls does not matter, only that one comes after the last change.
        if let (Some(topic), Some(link)) = (created, self.cluster.get()) {
            link.presence_changed(&topic);
        }
    }

    pub(super) fn remove_presence(&self, topic: &str, worker: usize) {
        let all_zero = |counts: &[AtomicUsize]| counts.iter().all(|c| c.load(Ordering::Relaxed) == 0);
        let mut now_empty = false;
        if let Ok(map) = self.presence.read()
            && let Some(counts) = map.get(topic)
        {
            counts[worker].fetch_sub(1, Ordering::Relaxed);
            now_empty = all_zero(counts);
        }
        let mut removed = None;
        if now_empty && let Ok(mut map) = self.presence.write() {
            // Checked again under the write lock: another worker may have subscribed meanwhile.
            if map.get(topic).is_some_and(|counts| all_zero(counts)) {
                // The topic's last subscriber on this node left.
                removed = map.remove_entry(topic).map(|(topic, _)| topic);
            }
        }
        if let (Some(topic), Some(link)) = (removed, self.cluster.get()) {
            link.presence_changed(&topic);
        }
    }
}

/// No position: a frame without history, or a subscriber that skips nothing.
const NOWHERE: Position = Position { epoch: 0, offset: 0 };

/// The recovery of a node that cannot read a history: `unavailable`, live stream only.
fn unavailable() -> Recovery {
    Recovery { outcome: Outcome::Unavailable, live_after: NOWHERE, replay: Vec::new() }
}

/// Whether a live frame at `at` is one a recovering subscriber already had (or did not ask for).
fn skipped(at: Position, skip_through: Position) -> bool {
    at.offset != 0 && at.epoch == skip_through.epoch && at.offset <= skip_through.offset
}

/// Queue entries (32 bytes each) an empty subscriber queue may keep allocated for the next message.
const RETAINED_QUEUE_CAPACITY: usize = 8;

/// One subscribed connection's queue of frames, shared between the broker (which fills it) and the
/// connection (which writes it out).
#[derive(Debug)]
pub struct Subscriber {
    id: u64,
    topic: Arc<str>,
    /// Position in its topic's list, for O(1) removal.
    index: Cell<usize>,
    queue: RefCell<VecDeque<Bytes>>,
    queued_bytes: Cell<usize>,
    /// Bytes the connection has taken from the queue (or queued itself) and not written yet.
    writing_bytes: Cell<usize>,
    slow: Cell<bool>,
    /// The connection to tell when frames are queued (an opaque token of the io layer's).
    owner: u64,
    /// The owner has been told and has not taken the queue since.
    notified: Cell<bool>,
    /// The window this subscriber's frames are compressed with in shared mode; 0 for plain frames.
    shared_window: u8,
    /// Live frames of this epoch at or below this offset are not queued for it: a recovering
    /// subscriber had them from the history (or did not ask for them). Offset 0: every frame. The
    /// epoch matters: a topic whose history was dropped starts again at offset 1 in a new epoch.
    skip_through: Cell<Position>,
    /// Its recovery is being read from the broker: live frames for it are held by its broker
    /// (see [`RECOVERY_HOLD_FRAMES`]), not queued.
    recovering: Cell<bool>,
}

impl Subscriber {
    /// The owner is taking the queue: frames queued after this tell it again.
    pub fn clear_notified(&self) {
        self.notified.set(false);
    }

    /// Whether the broker closed this subscriber for not keeping up.
    pub fn is_slow(&self) -> bool {
        self.slow.get()
    }

    /// Whether frames are waiting.
    pub fn has_queued(&self) -> bool {
        !self.queue.borrow().is_empty()
    }

    /// The length of the next queued frame.
    pub fn front_len(&self) -> Option<usize> {
        self.queue.borrow().front().map(Bytes::len)
    }

    /// Takes the next queued frame. A queue that a burst grew is released once it is empty, so an
    /// idle subscriber does not keep the capacity of its busiest moment.
    pub fn pop(&self) -> Option<Bytes> {
        let mut queue = self.queue.borrow_mut();
        let frame = queue.pop_front()?;
        if queue.is_empty() && queue.capacity() > RETAINED_QUEUE_CAPACITY {
            *queue = VecDeque::new();
        }
        self.queued_bytes.set(self.queued_bytes.get() - frame.len());
        Some(frame)
    }

    /// Tells the broker how many bytes the connection holds outside the queue, so that the bound
    /// covers everything waiting to be sent to this client.
    pub fn set_writing_bytes(&self, bytes: usize) {
        self.writing_bytes.set(bytes);
    }

    fn pending_bytes(&self) -> usize {
        self.queued_bytes.get() + self.writing_bytes.get()
    }
}

/// How a worker's broker treats its subscribers.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// What to do with a subscriber that does not keep up.
    pub policy: SlowConsumerPolicy,
    /// Bytes that may wait for one subscriber.
    pub max_backpressure: usize,
    /// Deliver a publishing subscriber's own messages back to it.
    pub echo_to_publisher: bool,
    /// The worker's counters.
    pub stats: Arc<WorkerStats>,
}

/// A worker's pub/sub state. Lives on its worker thread only (`Rc`).
pub struct Broker {
    worker: usize,
    hub: Arc<Hub>,
    topics: RefCell<HashMap<Arc<str>, Vec<Rc<Subscriber>>>>,
    next_id: Cell<u64>,
    policy: SlowConsumerPolicy,
    max_backpressure: usize,
    echo_to_publisher: bool,
    stats: Arc<WorkerStats>,
    /// The worker's compression, for subscribers that agreed permessage-deflate.
    compressor: Rc<Compressor>,
    /// Owners of subscribers that got frames (or were closed as slow) since the io layer last
    /// looked: each is told once until it takes its queue.
    ready: RefCell<Vec<u64>>,
    /// Subscribers whose recovery is being read from the broker, by id (empty without history
    /// in the broker).
    recovering: RefCell<HashMap<u64, Held>>,
}

/// What a worker holds for a subscriber while its recovery is read from the broker.
struct Held {
    subscriber: Rc<Subscriber>,
    /// Live frames that came meanwhile, with their positions.
    frames: VecDeque<(Position, Bytes)>,
    bytes: usize,
    /// The position of the last live frame that found no room (frames come in offset order, so
    /// it is the highest): the recovery holds unless it is past the replay's end.
    lost: Option<Position>,
}

/// A connection's membership of a topic; unsubscribes when dropped, so that no path out of a
/// connection (including a panic) leaves a dead subscriber behind.
pub struct Subscription {
    broker: Rc<Broker>,
    subscriber: Rc<Subscriber>,
}

impl Subscription {
    /// The subscriber's queue.
    pub fn subscriber(&self) -> &Subscriber {
        &self.subscriber
    }

    /// Publishes a message from this subscriber's connection to its topic; the connection itself
    /// gets it only with `--pubsub-echo`. Returns the subscribers reached.
    pub fn publish(&self, kind: MessageKind, payload: &[u8]) -> usize {
        let exclude = (!self.broker.echo_to_publisher).then_some(self.subscriber.id);
        self.broker.publish(&self.subscriber.topic, kind, payload, exclude)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.broker.unsubscribe(&self.subscriber);
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("subscriber", &self.subscriber).finish()
    }
}

impl Broker {
    /// The broker of worker `worker`.
    pub fn new(worker: usize, hub: Arc<Hub>, settings: BrokerSettings, compressor: Rc<Compressor>) -> Broker {
        Broker {
            worker,
            hub,
            topics: RefCell::default(),
            next_id: Cell::new(0),
            policy: settings.policy,
            max_backpressure: settings.max_backpressure,
            echo_to_publisher: settings.echo_to_publisher,
            stats: settings.stats,
            compressor,
            ready: RefCell::default(),
            recovering: RefCell::default(),
        }
    }

    /// Hands over the owners to tell (see [`Subscriber`]'s owner), leaving the list empty.
    pub fn take_ready(&self, out: &mut Vec<u64>) {
        out.append(&mut self.ready.borrow_mut());
    }

    fn notify(&self, subscriber: &Subscriber) {
        if !subscriber.notified.replace(true) {
            self.ready.borrow_mut().push(subscriber.owner);
        }
    }

    /// Subscribes a connection to `topic`, creating the topic on its first subscriber. `owner` is
    /// what [`Broker::take_ready`] hands back when frames are queued for it; `shared_window` is the
    /// window its frames are compressed with (shared-mode permessage-deflate), or `None` for plain.
    pub fn subscribe(self: &Rc<Self>, topic: &str, owner: u64, shared_window: Option<u8>) -> Subscription {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let mut topics = self.topics.borrow_mut();
        let topic: Arc<str> =
            topics.get_key_value(topic).map_or_else(|| Arc::from(topic), |(key, _)| Arc::clone(key));
        let subscribers = topics.entry(Arc::clone(&topic)).or_insert_with(|| {
            self.stats.topic_opened();
            Vec::new()
        });
        self.hub.add_presence(&topic, self.worker);
        let subscriber = Rc::new(Subscriber {
            id,
            topic: Arc::clone(&topic),
            index: Cell::new(subscribers.len()),
            queue: RefCell::default(),
            queued_bytes: Cell::new(0),
            writing_bytes: Cell::new(0),
            slow: Cell::new(false),
            owner,
            notified: Cell::new(false),
            shared_window: shared_window.map_or(0, |bits| bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS)),
            skip_through: Cell::new(NOWHERE),
            recovering: Cell::new(false),
        });
        subscribers.push(Rc::clone(&subscriber));
        self.stats.subscriber_added();
        Subscription { broker: Rc::clone(self), subscriber }
    }

    /// Publishes one message to `topic` on every worker: encoded once, queued locally, handed once
    /// to each other worker with subscribers. `exclude` is a local subscriber to skip (the
    /// publisher). Returns the number of subscribers it was queued for or handed towards.
    pub fn publish(&self, topic: &str, kind: MessageKind, payload: &[u8], exclude: Option<u64>) -> usize {
        add(&self.stats.published, 1);
        if let Some(history) = self.hub.history.get() {
            return self.publish_in_order(history, topic, kind, payload, exclude);
        }
        let frame = encode_frame(kind, payload, None);
        let link = self.hub.cluster.get();
        if let Some(link) = link.filter(|link| link.history().is_some()) {
            // The history is in the broker: the message comes back with its offset, to this
            // node's subscribers too.
            let origin = exclude.map_or(0, |id| envelope::origin(self.worker, id));
            if link.publish_in_order(topic, &frame, origin) {
                return self.hub.present_subscribers(topic).saturating_sub(usize::from(exclude.is_some()));
            }
            // Not taken (broker away, queue full; counted): delivered here, without a position
            // (with `--positions`, in the envelope at offset 0: kept nowhere, not to ask for).
            let positions = link.history().is_some_and(|history| history.positions);
            let frame = if positions { encode_frame(kind, payload, Some(NOWHERE)) } else { frame };
            return self.fan_out_now(topic, &frame, exclude);
        }
        let reached = self.fan_out_now(topic, &frame, exclude);
        // Other nodes get it through the broker (its subscribers here have it already).
        if let Some(link) = link {
            link.publish(topic, &frame);
        }
        reached
    }

    /// Queues `frame` on this worker's subscribers and hands it to the others, without a position.
    fn fan_out_now(&self, topic: &str, frame: &Bytes, exclude: Option<u64>) -> usize {
        let mut woken = Vec::new();
        let reached = self.fan_out(topic, frame, exclude, NOWHERE, &mut woken);
        for worker in woken {
            self.hub.wake(worker);
        }
        reached
    }

    /// Publishes with an offset: assigned, kept and handed to every worker with subscribers (this
    /// one included) under the topic's log lock, so every worker gets the topic's frames in offset
    /// order; the workers are woken once the lock is released.
    fn publish_in_order(
        &self,
        history: &History,
        topic: &str,
        kind: MessageKind,
        payload: &[u8],
        exclude: Option<u64>,
    ) -> usize {
        let positions = history.settings().positions;
        let mut woken = Vec::new();
        let reached = history.with_log(topic, |log| {
            let offset = log.next_offset();
            let position = positions.then(|| Position { epoch: log.epoch(), offset });
            let frame = encode_frame(kind, payload, position);
            log.keep(offset, &frame);
            self.fan_out(topic, &frame, exclude, Position { epoch: log.epoch(), offset }, &mut woken)
        });
        for worker in woken {
            self.hub.wake(worker);
        }
        reached
    }

    /// Queues `frame` on this worker's subscribers and hands it to each other worker with
    /// subscribers (noting in `woken` the workers to wake). Returns the subscribers reached. With
    /// an offset (history), this worker's subscribers get it through this worker's own channel
    /// too: a frame queued at once would overtake frames of lower offsets that publishers on other
    /// workers handed to this one and that it has not drained yet; through the channel, every
    /// worker queues a topic's frames in the order the offsets were assigned.
    fn fan_out(
        &self,
        topic: &str,
        frame: &Bytes,
        exclude: Option<u64>,
        at: Position,
        woken: &mut Vec<usize>,
    ) -> usize {
        let in_order = at.offset != 0;
        let mut reached = if in_order { 0 } else { self.deliver_local(topic, frame, exclude, at) };
        if let Ok(presence) = self.hub.presence.read()
            && let Some((topic, counts)) = presence.get_key_value(topic)
        {
            for (worker, count) in counts.iter().enumerate() {
                let mut count = count.load(Ordering::Relaxed);
                let own = worker == self.worker;
                let exclude = if own { exclude } else { None };
                if own {
                    // The publisher's own subscription is among them, and not queued for.
                    count = count.saturating_sub(usize::from(exclude.is_some()));
                }
                if (!own || in_order) && count > 0 {
                    let delivery = Delivery::message(topic, frame, at, exclude);
                    if self.hub.hand_off_quietly(worker, delivery) {
                        reached += count;
                        woken.push(worker);
                    } else {
                        add(&self.stats.handoff_drops, count as u64);
                    }
                }
            }
        }
        reached
    }

    /// Subscribes like [`Broker::subscribe`], for a client that last saw `since` (`?since=`): its
    /// queue starts with the recovery message (see `gateway::history::recovery_frame`), then the
    /// messages it missed, then the live ones, with no gap and no duplicate. It is subscribed (and
    /// in the hub's presence) before the history is read under the topic's lock, so every message
    /// after what it read is handed to it live; those at or below, still on their way to this
    /// worker, are skipped for it. With the history in the broker the read is the broker thread's
    /// and its answer comes back through this worker's hand-off channel ([`Broker::deliver`]);
    /// meanwhile the live frames for it are held. Without history it is told `unavailable` and
    /// gets the live stream.
    pub fn subscribe_since(
        self: &Rc<Self>,
        topic: &str,
        owner: u64,
        shared_window: Option<u8>,
        since: Position,
    ) -> Subscription {
        let subscription = self.subscribe(topic, owner, shared_window);
        let recovery = match (self.hub.history.get(), self.hub.cluster.get()) {
            (Some(history), _) => history.recover(topic, since),
            (None, Some(link)) if link.history().is_some() => {
                let subscriber = &subscription.subscriber;
                subscriber.recovering.set(true);
                let held =
                    Held { subscriber: Rc::clone(subscriber), frames: VecDeque::new(), bytes: 0, lost: None };
                self.recovering.borrow_mut().insert(subscriber.id, held);
                if !link.recover(&subscriber.topic, since, self.worker, subscriber.id) {
                    self.recovered(subscriber.id, unavailable());
                }
                return subscription;
            }
            _ => unavailable(),
        };
        self.start_recovered(&subscription.subscriber, &recovery);
        subscription
    }

    /// Queues the recovery message and the replay at the head of `subscriber`'s queue, and skips
    /// the live frames at or below the replay's end from here on.
    fn start_recovered(&self, subscriber: &Subscriber, recovery: &Recovery) {
        subscriber.skip_through.set(recovery.live_after);
        let first = recovery_frame(recovery);
        let mut queued = 0;
        {
            let mut queue = subscriber.queue.borrow_mut();
            for frame in std::iter::once(&first).chain(&recovery.replay) {
                queued += frame.len();
                queue.push_back(frame.clone());
            }
        }
        subscriber.queued_bytes.set(subscriber.queued_bytes.get() + queued);
        self.stats.queue_bytes_add(queued as u64);
        add(&self.stats.delivered, recovery.replay.len() as u64);
        self.notify(subscriber);
    }

    /// The counters of the history in the broker (recoveries read by the broker thread).
    fn broker_history_stats(&self) -> Option<&HistoryStats> {
        self.hub.cluster.get().filter(|link| link.history().is_some()).map(|link| link.history_stats())
    }

    /// The recovery of subscriber `id` was read from the broker (or could not be): queues the
    /// recovery message and the replay, then the live frames held meanwhile that are past the
    /// replay's end. If a live frame past it found no room while held, the recovery failed: the
    /// subscriber is told `unavailable` and continues with the live stream after that frame.
    fn recovered(&self, id: u64, mut recovery: Recovery) {
        let Some(held) = self.recovering.borrow_mut().remove(&id) else { return }; // it left
        let subscriber = held.subscriber;
        subscriber.recovering.set(false);
        if let Some(lost) = held.lost.filter(|&lost| !skipped(lost, recovery.live_after)) {
            recovery = Recovery { outcome: Outcome::Unavailable, live_after: lost, replay: Vec::new() };
        }
        if let Some(stats) = self.broker_history_stats() {
            stats.recovered(recovery.outcome);
            add(&stats.replayed, recovery.replay.len() as u64);
        }
        if subscriber.slow.get() {
            return;
        }
        self.start_recovered(&subscriber, &recovery);
        let mut delivered = 0;
        let mut queued_bytes = 0;
        for (at, frame) in held.frames {
            if skipped(at, recovery.live_after) {
                continue;
            }
            if subscriber.pending_bytes() + frame.len() > self.max_backpressure {
                match self.policy {
                    SlowConsumerPolicy::Close => {
                        self.close_slow(&subscriber);
                        break;
                    }
                    SlowConsumerPolicy::Drop => {
                        add(&self.stats.slow_consumer_drops, 1);
                        continue;
                    }
                }
            }
            subscriber.queued_bytes.set(subscriber.queued_bytes.get() + frame.len());
            queued_bytes += frame.len() as u64;
            subscriber.queue.borrow_mut().push_back(frame);
            delivered += 1;
        }
        add(&self.stats.delivered, delivered);
        self.stats.queue_bytes_add(queued_bytes);
    }

    /// A live frame for a subscriber whose recovery is being read: held, within bounds.
    fn hold(&self, subscriber: &Subscriber, at: Position, frame: &Bytes) {
        let mut recovering = self.recovering.borrow_mut();
        let Some(held) = recovering.get_mut(&subscriber.id) else { return };
        if held.lost.is_some()
            || held.frames.len() >= RECOVERY_HOLD_FRAMES
            || held.bytes + frame.len() > self.max_backpressure
        {
            held.lost = Some(at);
            return;
        }
        held.bytes += frame.len();
        held.frames.push_back((at, frame.clone()));
    }

    /// Queues a frame handed over from another worker (or the broker) on this worker's
    /// subscribers, or hands a recovery's answer to its subscriber.
    pub fn deliver(&self, delivery: &Delivery) {
        if let Some(recovered) = &delivery.recovered {
            let recovery = Recovery {
                outcome: recovered.recovery.outcome,
                live_after: recovered.recovery.live_after,
                replay: recovered.recovery.replay.clone(),
            };
            self.recovered(recovered.subscriber, recovery);
        } else {
            self.deliver_local(&delivery.topic, &delivery.frame, delivery.exclude, delivery.at);
        }
        self.hub.handed_over(self.worker, delivery.frame.len());
    }

    /// The topics' histories, if the process keeps them (for `/metrics`).
    pub fn history(&self) -> Option<&Arc<History>> {
        self.hub.history()
    }

    /// Local subscribers on a topic, for tests and metrics.
    pub fn local_subscribers(&self, topic: &str) -> usize {
        self.topics.borrow().get(topic).map_or(0, Vec::len)
    }

    fn deliver_local(&self, topic: &str, plain: &Bytes, exclude: Option<u64>, at: Position) -> usize {
        let mut delivered = 0;
        let mut dropped = 0;
        let mut queued_bytes = 0;
        let mut too_slow: Vec<Rc<Subscriber>> = Vec::new();
        let mut forms = Forms::new(plain);
        {
            let topics = self.topics.borrow();
            let Some(subscribers) = topics.get(topic) else { return 0 };
            for subscriber in subscribers {
                if Some(subscriber.id) == exclude || skipped(at, subscriber.skip_through.get()) {
                    continue;
                }
                let frame = forms.for_window(subscriber.shared_window, &self.compressor);
                if subscriber.recovering.get() {
                    self.hold(subscriber, at, frame);
                    continue;
                }
                if subscriber.pending_bytes() + frame.len() > self.max_backpressure {
                    match self.policy {
                        SlowConsumerPolicy::Close => too_slow.push(Rc::clone(subscriber)),
                        SlowConsumerPolicy::Drop => dropped += 1,
                    }
                    continue;
                }
                subscriber.queue.borrow_mut().push_back(frame.clone());
                subscriber.queued_bytes.set(subscriber.queued_bytes.get() + frame.len());
                self.notify(subscriber);
                delivered += 1;
                queued_bytes += frame.len() as u64;
            }
        }
        for subscriber in too_slow {
            self.close_slow(&subscriber);
        }
        forms.count_compressed(&self.compressor);
        add(&self.stats.delivered, delivered as u64);
        self.stats.queue_bytes_add(queued_bytes);
        add(&self.stats.slow_consumer_drops, dropped);
        delivered
    }

    /// Stops queueing for a subscriber that fell too far behind and frees what it had queued; its
    /// connection sees `is_slow` and closes with 1008. Once per subscriber, however it is reached
    /// again: `slow_consumer_closes` counts subscribers closed, not attempts.
    fn close_slow(&self, subscriber: &Rc<Subscriber>) {
        if subscriber.slow.replace(true) {
            return;
        }
        self.discard_queue(subscriber);
        self.remove_from_topic(subscriber);
        self.notify(subscriber);
        add(&self.stats.slow_consumer_closes, 1);
    }

    fn unsubscribe(&self, subscriber: &Rc<Subscriber>) {
        if subscriber.recovering.replace(false) {
            self.recovering.borrow_mut().remove(&subscriber.id);
        }
        if !subscriber.slow.get() {
            self.remove_from_topic(subscriber);
        }
        self.discard_queue(subscriber);
        self.stats.subscriber_removed();
    }

    /// Frees a subscriber's queue, taking its bytes off the worker's queue gauge.
    fn discard_queue(&self, subscriber: &Subscriber) {
        subscriber.queue.borrow_mut().clear();
        self.stats.queue_bytes_sub(subscriber.queued_bytes.replace(0) as u64);
    }

    /// Removes a subscriber from its topic's list (swap-remove, fixing the moved one's index), and
    /// the topic itself when it was the last.
    fn remove_from_topic(&self, subscriber: &Rc<Subscriber>) {
        let mut topics = self.topics.borrow_mut();
        let Some(list) = topics.get_mut(&*subscriber.topic) else { return };
        let index = subscriber.index.get();
        if list.get(index).is_none_or(|s| !Rc::ptr_eq(s, subscriber)) {
            return; // already removed
        }
        list.swap_remove(index);
        if let Some(moved) = list.get(index) {
            moved.index.set(index);
        }
        let now_empty = list.is_empty();
        if now_empty {
            topics.remove(&*subscriber.topic);
            self.stats.topic_closed();
        }
        drop(topics);
        self.hub.remove_presence(&subscriber.topic, self.worker);
    }
}

/// The frames of one message for one worker's subscribers: the plain frame, and the compressed
/// frame for each window size subscribers agreed, each made the first time a subscriber needs it.
struct Forms<'a> {
    plain: &'a Bytes,
    /// By window bits (9-15): `None` until needed; then the compressed frame, or the plain one
    /// when compressing did not pay.
    compressed: [Option<Bytes>; (MAX_WINDOW_BITS - MIN_WINDOW_BITS + 1) as usize],
    /// Subscribers queued a compressed frame, by window slot (for the counters).
    deliveries: [u32; (MAX_WINDOW_BITS - MIN_WINDOW_BITS + 1) as usize],
}

impl<'a> Forms<'a> {
    fn new(plain: &'a Bytes) -> Forms<'a> {
        Forms { plain, compressed: Default::default(), deliveries: [0; 7] }
    }

    /// The frame for a subscriber with `window` bits (0: plain).
    fn for_window(&mut self, window: u8, compressor: &Compressor) -> &Bytes {
        if window == 0 {
            return self.plain;
        }
        let slot = usize::from(window - MIN_WINDOW_BITS);
        let plain = self.plain;
        let frame = self.compressed[slot].get_or_insert_with(|| {
            let (kind, payload) = split_frame(plain);
            compressor.shared_frame(kind, payload, window).unwrap_or_else(|| plain.clone())
        });
        if frame.len() < plain.len() {
            self.deliveries[slot] += 1;
        }
        frame
    }

    /// Counts the compressed deliveries: payload bytes before and after, per subscriber.
    fn count_compressed(&self, compressor: &Compressor) {
        let payload_len = split_frame(self.plain).1.len();
        for (frame, &count) in self.compressed.iter().zip(&self.deliveries) {
            if let Some(frame) = frame.as_ref().filter(|_| count > 0) {
                let wire = split_frame(frame).1.len();
                compressor.count_sent(u64::from(count), payload_len, wire);
            }
        }
    }
}

/// A queued frame's kind and payload (frames here are ours: whole, unmasked, text or binary), for
/// a connection that re-encodes them (dedicated-mode compression).
pub fn split_frame(frame: &Bytes) -> (MessageKind, &[u8]) {
    match FrameHeader::decode(frame) {
        Ok(Decoded::Header(header, len)) => {
            let kind = if header.opcode == crate::proto::frame::OpCode::Text {
                MessageKind::Text
            } else {
                MessageKind::Binary
            };
            (kind, frame.get(len..).unwrap_or(&[]))
        }
        _ => (MessageKind::Binary, &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::compression::CompressionSettings;

    fn broker(worker: usize, hub: &Arc<Hub>, policy: SlowConsumerPolicy, max: usize) -> Rc<Broker> {
        let stats: Arc<WorkerStats> = Arc::default();
        let settings = BrokerSettings {
            policy,
            max_backpressure: max,
            echo_to_publisher: false,
            stats: Arc::clone(&stats),
        };
        let compressor = Compressor::new(CompressionSettings::default(), stats);
        Rc::new(Broker::new(worker, Arc::clone(hub), settings, Rc::new(compressor)))
    }

    fn drain(subscriber: &Subscriber) -> Vec<Bytes> {
        std::iter::from_fn(|| subscriber.pop()).collect()
    }

    #[test]
    fn a_message_is_encoded_once_and_shared_by_every_subscriber() {
        let (hub, _rx) = Hub::new(1);
        let broker = broker(0, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let subs: Vec<Subscription> = (0..3).map(|_| broker.subscribe("news", 0, None)).collect();
        assert_eq!(broker.publish("news", MessageKind::Text, b"hello", None), 3);
        let frames: Vec<Bytes> = subs.iter().flat_map(|s| drain(s.subscriber())).collect();
        assert_eq!(frames.len(), 3);
        assert_eq!(&frames[0][..], &[0x81, 5, b'h', b'e', b'l', b'l', b'o']);
        // The same allocation, not three copies.
        assert!(frames.iter().all(|f| f.as_ptr() == frames[0].as_ptr()));
    }

    #[test]
    fn compressing_subscribers_share_one_compressed_frame_and_the_others_the_plain_one() {
        let (hub, _rx) = Hub::new(1);
        let broker = broker(0, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let plain: Vec<Subscription> = (0..2).map(|_| broker.subscribe("t", 0, None)).collect();
        let compressed: Vec<Subscription> = (0..3).map(|_| broker.subscribe("t", 0, Some(15))).collect();
        let small_window = broker.subscribe("t", 0, Some(10));
        let message = br#"{"symbol":"ACME","price":1234.5,"volume":100}"#.repeat(20);
        assert_eq!(broker.publish("t", MessageKind::Text, &message, None), 6);
        let frames = |subs: &[Subscription]| -> Vec<Bytes> {
            subs.iter().flat_map(|s| drain(s.subscriber())).collect()
        };
        let plain = frames(&plain);
        let compressed = frames(&compressed);
        assert!(plain.iter().all(|f| f.as_ptr() == plain[0].as_ptr() && f[0] == 0x81));
        assert!(
            compressed.iter().all(|f| f.as_ptr() == compressed[0].as_ptr()),
            "one compressed frame, shared"
        );
        assert_eq!(compressed[0][0], 0xC1, "FIN, RSV1, text");
        assert!(compressed[0].len() < plain[0].len() / 4);
        let small = drain(small_window.subscriber());
        assert_ne!(small[0].as_ptr(), compressed[0].as_ptr(), "a smaller window gets its own frame");
        let runs = broker.stats.compression.runs.load(Ordering::Relaxed);
        assert_eq!(runs, 2, "compressed once per window size, not per subscriber");
        assert_eq!(broker.stats.compression.messages_out.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn the_publisher_is_excluded_unless_echo_is_on() {
        let (hub, _rx) = Hub::new(1);
        let broker = broker(0, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let publisher = broker.subscribe("t", 0, None);
        let other = broker.subscribe("t", 0, None);
        assert_eq!(publisher.publish(MessageKind::Binary, b"x"), 1);
        assert!(!publisher.subscriber().has_queued());
        assert!(other.subscriber().has_queued());
    }

    #[test]
    fn other_workers_get_one_hand_off_per_message() {
        let (hub, receivers) = Hub::new(3);
        let here = broker(0, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let there = broker(1, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let _remote: Vec<Subscription> = (0..5).map(|_| there.subscribe("t", 0, None)).collect();
        assert_eq!(here.publish("t", MessageKind::Text, b"a", None), 5);
        let delivery = receivers[1].try_recv().expect("one hand-off to worker 1");
        assert!(receivers[1].try_recv().is_err(), "never one per subscriber");
        assert!(receivers[2].try_recv().is_err(), "worker 2 has no subscribers");
        there.deliver(&delivery);
        assert_eq!(_remote.iter().filter(|s| s.subscriber().has_queued()).count(), 5);
    }

    #[test]
    fn a_worker_that_falls_behind_gets_at_most_its_handoff_bound_and_drops_are_counted() {
        let frame_len = 2 + 100; // a 100-byte text message: 2 header bytes
        let (hub, receivers) = Hub::with_handoff_limit(2, 3 * frame_len);
        let here = broker(0, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let there = broker(1, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let remote: Vec<Subscription> = (0..2).map(|_| there.subscribe("t", 0, None)).collect();
        let reached: Vec<usize> =
            (0..5).map(|_| here.publish("t", MessageKind::Text, &[b'x'; 100], None)).collect();
        assert_eq!(reached, [2, 2, 2, 0, 0], "three frames fit, the next two are not handed over");
        assert_eq!(here.stats.handoff_drops.load(Ordering::Relaxed), 4, "two frames x two subscribers");

        // Worker 1 catches up: its room comes back.
        while let Ok(delivery) = receivers[1].try_recv() {
            there.deliver(&delivery);
        }
        assert_eq!(hub.handoff_bytes[1].load(Ordering::Relaxed), 0);
        assert_eq!(here.publish("t", MessageKind::Text, &[b'x'; 100], None), 2);
        assert!(remote.iter().all(|s| s.subscriber().has_queued()));
    }

    #[test]
    fn topics_disappear_with_their_last_subscriber() {
        let (hub, _rx) = Hub::new(2);
        let broker = broker(0, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let a = broker.subscribe("t", 0, None);
        let b = broker.subscribe("t", 0, None);
        assert_eq!(hub.topic_count(), 1);
        drop(a);
        assert_eq!(broker.local_subscribers("t"), 1);
        drop(b);
        assert_eq!(broker.local_subscribers("t"), 0);
        assert_eq!(hub.topic_count(), 0);
        assert_eq!(broker.publish("t", MessageKind::Text, b"nobody", None), 0);
    }

    #[test]
    fn a_slow_subscriber_is_closed_and_the_others_keep_receiving() {
        let (hub, _rx) = Hub::new(1);
        let broker = broker(0, &hub, SlowConsumerPolicy::Close, 100);
        let slow = broker.subscribe("t", 0, None);
        let fast = broker.subscribe("t", 0, None);
        for i in 0..10u8 {
            broker.publish("t", MessageKind::Binary, &[i; 30], None);
            drain(fast.subscriber()); // the fast one keeps up
        }
        assert!(slow.subscriber().is_slow());
        assert!(!slow.subscriber().has_queued(), "its queue is freed");
        assert!(!fast.subscriber().is_slow());
        assert_eq!(broker.local_subscribers("t"), 1);
        broker.publish("t", MessageKind::Binary, b"after", None);
        assert_eq!(drain(fast.subscriber()).len(), 1);
        assert!(!slow.subscriber().has_queued(), "nothing more is queued on a closed subscriber");
    }

    #[derive(Clone, Debug)]
    enum Op {
        Subscribe { worker: usize, topic: usize },
        Publish { worker: usize, topic: usize, len: usize },
        PublishFrom { subscriber: usize, len: usize },
        HandOver,
        Drain { subscriber: usize },
        Unsubscribe { subscriber: usize },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0..2usize, 0..2usize).prop_map(|(worker, topic)| Op::Subscribe { worker, topic }),
            (0..2usize, 0..2usize, 0..60usize).prop_map(|(worker, topic, len)| Op::Publish {
                worker,
                topic,
                len
            }),
            (0..8usize, 0..60usize).prop_map(|(subscriber, len)| Op::PublishFrom { subscriber, len }),
            Just(Op::HandOver),
            (0..8usize).prop_map(|subscriber| Op::Drain { subscriber }),
            (0..8usize).prop_map(|subscriber| Op::Unsubscribe { subscriber }),
        ]
    }

    proptest::proptest! {
        /// Whatever the traffic on two workers (publishers local and remote, subscribers that read
        /// or not, leave or stay), the slow-consumer counter ends equal to the number of
        /// subscribers closed as slow: none is counted twice, none is missed.
        #[test]
        fn every_slow_close_counts_once(ops in proptest::collection::vec(op(), 1..120), echo: bool) {
            let (hub, receivers) = Hub::new(2);
            let brokers: Vec<Rc<Broker>> = (0..2)
                .map(|worker| {
                    let stats: Arc<WorkerStats> = Arc::default();
                    let settings = BrokerSettings {
                        policy: SlowConsumerPolicy::Close,
                        max_backpressure: 100,
                        echo_to_publisher: echo,
                        stats: Arc::clone(&stats),
                    };
                    let compressor = Rc::new(Compressor::new(CompressionSettings::default(), stats));
                    Rc::new(Broker::new(worker, Arc::clone(&hub), settings, compressor))
                })
                .collect();
            let mut live: Vec<Subscription> = Vec::new();
            let mut everyone: Vec<Rc<Subscriber>> = Vec::new();
            let pick = |live: &Vec<Subscription>, i: usize| (!live.is_empty()).then(|| i % live.len());
            for op in ops {
                match op {
                    Op::Subscribe { worker, topic } => {
                        let subscription = brokers[worker].subscribe(["a", "b"][topic], 0, None);
                        everyone.push(Rc::clone(&subscription.subscriber));
                        live.push(subscription);
                    }
                    Op::Publish { worker, topic, len } => {
                        brokers[worker].publish(["a", "b"][topic], MessageKind::Binary, &vec![0; len], None);
                    }
                    Op::PublishFrom { subscriber, len } => {
                        if let Some(i) = pick(&live, subscriber) {
                            live[i].publish(MessageKind::Binary, &vec![0; len]);
                        }
                    }
                    Op::HandOver => {
                        for (worker, deliveries) in receivers.iter().enumerate() {
                            while let Ok(delivery) = deliveries.try_recv() {
                                brokers[worker].deliver(&delivery);
                            }
                        }
                    }
                    Op::Drain { subscriber } => {
                        if let Some(i) = pick(&live, subscriber) {
                            drain(live[i].subscriber());
                        }
                    }
                    Op::Unsubscribe { subscriber } => {
                        if let Some(i) = pick(&live, subscriber) {
                            live.swap_remove(i);
                        }
                    }
                }
            }
            let closes: u64 = brokers.iter().map(|b| b.stats.slow_consumer_closes.load(Ordering::Relaxed)).sum();
            let slow = everyone.iter().filter(|s| s.is_slow()).count() as u64;
            proptest::prop_assert_eq!(closes, slow);
        }
    }

    #[test]
    fn with_the_drop_policy_a_slow_subscriber_misses_messages_but_stays() {
        let (hub, _rx) = Hub::new(1);
        let broker = broker(0, &hub, SlowConsumerPolicy::Drop, 100);
        let slow = broker.subscribe("t", 0, None);
        for i in 0..10u8 {
            broker.publish("t", MessageKind::Binary, &[i; 30], None);
        }
        assert!(!slow.subscriber().is_slow());
        let got = drain(slow.subscriber());
        assert_eq!(got.len(), 3, "100 bytes hold three 32-byte frames");
        assert_eq!(got[0][2], 0, "the oldest are kept, in order");
        assert_eq!(got[2][2], 2);
    }

    #[test]
    fn a_drained_queue_gives_back_the_capacity_of_a_burst() {
        let (hub, _rx) = Hub::new(1);
        let broker = broker(0, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let sub = broker.subscribe("t", 0, None);
        for _ in 0..100 {
            broker.publish("t", MessageKind::Binary, b"x", None);
        }
        assert!(sub.subscriber.queue.borrow().capacity() >= 100);
        drain(sub.subscriber());
        assert!(sub.subscriber.queue.borrow().capacity() <= RETAINED_QUEUE_CAPACITY);
    }

    #[test]
    fn bytes_being_written_count_towards_the_bound() {
        let (hub, _rx) = Hub::new(1);
        let broker = broker(0, &hub, SlowConsumerPolicy::Close, 100);
        let sub = broker.subscribe("t", 0, None);
        sub.subscriber().set_writing_bytes(90);
        broker.publish("t", MessageKind::Binary, &[0; 20], None);
        assert!(sub.subscriber().is_slow());
    }

    use crate::gateway::history::{HistorySettings, Outcome};

    fn with_history(hub: &Arc<Hub>, size: usize) {
        let settings =
            HistorySettings { size, ttl: std::time::Duration::ZERO, positions: true, max_topics: 16 };
        hub.set_history(Arc::new(History::new(settings)));
    }

    /// The position a queued frame carries: the recovery message's `epoch`/`offset` (where the
    /// live stream continues), or a binary message's 16-byte envelope.
    fn position_of(frame: &Bytes) -> (bool, Position) {
        let (kind, payload) = split_frame(frame);
        if kind == MessageKind::Text {
            let json: serde_json::Value = serde_json::from_slice(payload).expect("JSON");
            let epoch = u64::from_str_radix(json["epoch"].as_str().expect("epoch"), 16).expect("hex");
            (true, Position { epoch, offset: json["offset"].as_u64().expect("offset") })
        } else {
            let word = |at: usize| u64::from_be_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
            (false, Position { epoch: word(0), offset: word(8) })
        }
    }

    #[test]
    fn a_frame_still_on_its_way_when_a_subscriber_recovers_is_not_delivered_twice() {
        let (hub, receivers) = Hub::new(2);
        with_history(&hub, 100);
        let here = broker(0, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let there = broker(1, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let _other = there.subscribe("t", 0, None); // so worker 1 gets hand-offs
        here.publish("t", MessageKind::Binary, b"1", None);
        let first = position_of(&receivers[1].try_recv().map(|d| d.frame).expect("handed over")).1;
        here.publish("t", MessageKind::Binary, b"2", None); // on its way to worker 1
        let recovering = there.subscribe_since("t", 7, None, first);
        here.publish("t", MessageKind::Binary, b"3", None); // after the recovery: live
        while let Ok(delivery) = receivers[1].try_recv() {
            there.deliver(&delivery);
        }
        let got: Vec<(bool, Position)> = drain(recovering.subscriber()).iter().map(position_of).collect();
        let epoch = first.epoch;
        assert_eq!(
            got,
            [
                (true, Position { epoch, offset: 2 }),
                (false, Position { epoch, offset: 2 }),
                (false, Position { epoch, offset: 3 })
            ],
            "recovery message, 2 replayed, 3 live; 2 from the channel skipped"
        );
        let history = hub.history().expect("kept");
        assert_eq!(history.stats().recoveries(Outcome::Recovered), 1);
        assert_eq!(history.stats().messages(), 3);
    }

    #[test]
    fn a_recovered_subscriber_gets_the_messages_of_a_new_epoch_though_their_offsets_start_again() {
        let (hub, receivers) = Hub::new(1);
        let settings =
            HistorySettings { size: 10, ttl: std::time::Duration::ZERO, positions: true, max_topics: 1 };
        hub.set_history(Arc::new(History::new(settings)));
        let broker = broker(0, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let deliver_all = || {
            while let Ok(delivery) = receivers[0].try_recv() {
                broker.deliver(&delivery);
            }
        };
        for _ in 0..5 {
            broker.publish("t", MessageKind::Binary, b"old", None);
        }
        let sub = broker.subscribe_since("t", 0, None, NOWHERE);
        let (_, at) = position_of(&drain(sub.subscriber())[0]);
        assert_eq!(at.offset, 5);
        broker.publish("u", MessageKind::Binary, b"pushes t's history out", None);
        broker.publish("t", MessageKind::Binary, b"new", None);
        deliver_all();
        let got: Vec<Position> = drain(sub.subscriber()).iter().map(|f| position_of(f).1).collect();
        assert_eq!(got.len(), 1, "offset 1 of the new epoch is not taken for one it had");
        assert_ne!(got[0].epoch, at.epoch);
        assert_eq!(got[0].offset, 1);
    }

    #[test]
    fn a_subscriber_that_keeps_reconnecting_while_two_workers_publish_sees_every_offset_once() {
        const PER_PUBLISHER: u64 = 20_000;
        let (hub, mut receivers) = Hub::new(3);
        with_history(&hub, 100_000);
        let receiver = receivers.pop().expect("worker 2");
        let here = broker(2, &hub, SlowConsumerPolicy::Close, 64 << 20);
        // The first connect learns the topic's position (offset 0: nothing published yet).
        let first = here.subscribe_since("t", 0, None, Position { epoch: 0, offset: 0 });
        let mut last = position_of(&drain(first.subscriber())[0]).1;
        assert_eq!(last.offset, 0);
        drop(first);
        // Another subscriber on worker 2 keeps frames coming to it while the recovering one is
        // away, so each reconnect finds frames of its replay still in the channel.
        let keeper = here.subscribe("t", 1, None);
        let publishers: Vec<_> = (0..2)
            .map(|worker| {
                let hub = Arc::clone(&hub);
                std::thread::spawn(move || {
                    let broker = broker(worker, &hub, SlowConsumerPolicy::Close, 1 << 20);
                    for i in 0..PER_PUBLISHER {
                        broker.publish("t", MessageKind::Binary, &i.to_be_bytes(), None);
                        if i % 16 == 0 {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let mut connects = 0;
        let history = Arc::clone(hub.history().expect("kept"));
        loop {
            let finished = publishers.iter().all(|p| p.is_finished());
            let subscription = here.subscribe_since("t", 0, None, last);
            connects += 1;
            for round in 0..20 {
                if round % 5 == 1 {
                    // Worker 2 publishes too: its own subscribers must not get that before the
                    // frames of lower offsets other workers handed it.
                    here.publish("t", MessageKind::Binary, &[0xAA], None);
                }
                while let Ok(delivery) = receiver.try_recv() {
                    here.deliver(&delivery);
                }
                for frame in drain(subscription.subscriber()) {
                    let (recovery_message, position) = position_of(&frame);
                    assert_eq!(position.epoch, last.epoch);
                    if recovery_message {
                        assert_eq!(round, 0, "the recovery message comes first");
                        assert!(position.offset >= last.offset, "recovered: live after what it read");
                        continue;
                    }
                    assert_eq!(position.offset, last.offset + 1, "no gap, no duplicate");
                    last = position;
                }
                std::thread::yield_now();
            }
            drop(subscription);
            drain(keeper.subscriber());
            let published = history.stats().messages() as u64; // nothing is pushed out here
            if finished && last.offset == published {
                break;
            }
            assert!(connects < 1_000_000, "never caught up: at {last}");
        }
        for publisher in publishers {
            publisher.join().expect("publisher");
        }
        assert_eq!(history.stats().recoveries(Outcome::Recovered), connects);
        assert!(last.offset > 2 * PER_PUBLISHER, "worker 2's own publishes are in the count");
    }

    /// A hub whose history is in the broker (a Redis link, connected, never started: the tests
    /// answer the recoveries themselves, as the broker thread would).
    fn with_history_in_the_broker(hub: &Arc<Hub>) -> Arc<Link> {
        let url = crate::gateway::cluster::BrokerUrl::parse("redis://127.0.0.1:6379").expect("valid");
        let (link, outgoing) = Link::new(url);
        std::mem::forget(outgoing); // keeps the queues open
        let settings =
            HistorySettings { size: 100, ttl: std::time::Duration::ZERO, positions: true, max_topics: 16 };
        link.set_history(settings);
        link.stats().set_connected(true);
        hub.set_cluster(Arc::clone(&link));
        link
    }

    fn at(offset: u64) -> Position {
        Position { epoch: 0xe, offset }
    }

    fn positioned(offset: u64) -> Bytes {
        encode_frame(MessageKind::Binary, &offset.to_be_bytes(), Some(at(offset)))
    }

    #[test]
    fn live_frames_held_during_a_broker_recovery_are_skipped_up_to_the_replay_and_queued_after() {
        let (hub, receivers) = Hub::new(1);
        let link = with_history_in_the_broker(&hub);
        let broker = broker(0, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let deliver_all = || {
            while let Ok(delivery) = receivers[0].try_recv() {
                broker.deliver(&delivery);
            }
        };
        let sub = broker.subscribe_since("t", 0, None, at(2));
        assert!(!sub.subscriber().has_queued(), "nothing before the recovery message");
        // Messages 3 and 4 came before the read (they are in its replay), 5 after.
        for offset in 3..=5 {
            hub.deliver_remote("t", positioned(offset), at(offset), None);
        }
        deliver_all();
        assert!(!sub.subscriber().has_queued(), "held, not queued");
        let recovery = Recovery {
            outcome: Outcome::Recovered,
            live_after: at(4),
            replay: vec![positioned(3), positioned(4)],
        };
        hub.hand_recovery(0, Arc::from("t"), sub.subscriber.id, recovery);
        hub.deliver_remote("t", positioned(6), at(6), None);
        deliver_all();
        let got: Vec<(bool, Position)> = drain(sub.subscriber()).iter().map(position_of).collect();
        assert_eq!(
            got,
            [(true, at(4)), (false, at(3)), (false, at(4)), (false, at(5)), (false, at(6))],
            "the recovery message, the replay, then 5 held and 6 live: 3 and 4 held, skipped"
        );
        assert_eq!(link.history_stats().recoveries(Outcome::Recovered), 1);
        assert_eq!(link.history_stats().replayed.load(Ordering::Relaxed), 2);
        assert!(broker.recovering.borrow().is_empty());
    }

    #[test]
    fn a_recovery_whose_held_frames_overflowed_past_the_replay_is_unavailable_and_continues_live() {
        let (hub, receivers) = Hub::new(1);
        let link = with_history_in_the_broker(&hub);
        let frame_len = positioned(1).len();
        let broker = broker(0, &hub, SlowConsumerPolicy::Close, 3 * frame_len);
        let deliver_all = || {
            while let Ok(delivery) = receivers[0].try_recv() {
                broker.deliver(&delivery);
            }
        };
        let sub = broker.subscribe_since("t", 0, None, at(0));
        for offset in 1..=5 {
            hub.deliver_remote("t", positioned(offset), at(offset), None);
        }
        deliver_all();
        // The read saw only 1 and 2: 4 and 5 found no room, so its replay cannot be joined.
        let recovery = Recovery {
            outcome: Outcome::Recovered,
            live_after: at(2),
            replay: vec![positioned(1), positioned(2)],
        };
        hub.hand_recovery(0, Arc::from("t"), sub.subscriber.id, recovery);
        deliver_all();
        let frames = drain(sub.subscriber());
        assert_eq!(frames.len(), 1, "the recovery message alone: 1 to 3 held, at or below the loss");
        let (_, payload) = split_frame(&frames[0]);
        let first: serde_json::Value = serde_json::from_slice(payload).expect("JSON");
        assert_eq!(
            (first["recovered"].as_bool(), first["reason"].as_str()),
            (Some(false), Some("unavailable"))
        );
        assert_eq!(first["offset"].as_u64(), Some(5), "live after the last frame lost");
        hub.deliver_remote("t", positioned(6), at(6), None);
        deliver_all();
        let rest: Vec<Position> = drain(sub.subscriber()).iter().map(|f| position_of(f).1).collect();
        assert_eq!(rest, [at(6)]);
        assert_eq!(link.history_stats().recoveries(Outcome::Unavailable), 1);
    }

    #[test]
    fn a_broker_recovery_that_cannot_be_asked_is_unavailable_at_once_and_one_that_left_is_forgotten() {
        let (hub, receivers) = Hub::new(1);
        let link = with_history_in_the_broker(&hub);
        let broker = broker(0, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let gone = broker.subscribe_since("t", 0, None, at(1));
        let id = gone.subscriber.id;
        drop(gone);
        assert!(broker.recovering.borrow().is_empty(), "forgotten when it leaves");
        hub.hand_recovery(0, Arc::from("t"), id, unavailable());
        while let Ok(delivery) = receivers[0].try_recv() {
            broker.deliver(&delivery); // an answer for no one: ignored
        }
        link.stats().set_connected(false);
        let sub = broker.subscribe_since("t", 0, None, at(1));
        let frames = drain(sub.subscriber());
        assert_eq!(frames.len(), 1, "the recovery message, at once");
        assert_eq!(link.history_stats().recoveries(Outcome::Unavailable), 1);
        // Publishes stay local while the broker is away, in the envelope at offset 0.
        let other = broker.subscribe("t", 0, None);
        broker.publish("t", MessageKind::Binary, b"x", None);
        assert_eq!(drain(other.subscriber()).iter().map(|f| position_of(f).1).collect::<Vec<_>>(), [NOWHERE]);
    }

    #[test]
    fn an_owner_is_told_once_per_batch_of_frames_and_again_after_taking_them() {
        let (hub, _rx) = Hub::new(1);
        let broker = broker(0, &hub, SlowConsumerPolicy::Close, 1 << 20);
        let sub = broker.subscribe("t", 42, None);
        let mut ready = Vec::new();
        broker.publish("t", MessageKind::Text, b"one", None);
        broker.publish("t", MessageKind::Text, b"two", None);
        broker.take_ready(&mut ready);
        assert_eq!(ready, [42], "told once for two frames");
        ready.clear();
        broker.publish("t", MessageKind::Text, b"three", None);
        broker.take_ready(&mut ready);
        assert!(ready.is_empty(), "not told again before it took its queue");
        sub.subscriber().clear_notified();
        assert_eq!(drain(sub.subscriber()).len(), 3);
        broker.publish("t", MessageKind::Text, b"four", None);
        broker.take_ready(&mut ready);
        assert_eq!(ready, [42]);
    }
}
