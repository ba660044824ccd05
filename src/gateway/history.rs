//! Topic history and recovery (`--history-size N --history-ttl DURATION --positions`): every message
//! on a topic gets an offset (1, 2, 3, ...) and the topic an epoch (a random 64-bit number, new for
//! every history created: after a restart, or after a topic's history expired and was dropped), and
//! the last `N` frames of each topic are kept, so that a subscriber that reconnects with
//! `?since=EPOCH:OFFSET` gets what it missed, in order, before the live stream.
//!
//! One history per process, shared by the workers: a topic's offset is assigned under its
//! [`TopicLog`]'s lock, and the publishing worker hands the frame to every worker with subscribers
//! (its own included, through its own channel) under that same lock, so every worker's channel
//! carries a topic's frames in offset order.
//! A recovering subscriber is subscribed (and counted in the hub's presence) before it takes that
//! lock to read the history: every offset at or below what it read is replayed from the history,
//! every offset above is handed to its worker live, and the frames at or below its replay end still
//! waiting in its worker's channel are skipped for it ([`Recovery::live_after`]). No gap, no
//! duplicate, whatever the other workers publish meanwhile.
//!
//! The history holds the frames as they are sent (the same `Bytes` the subscribers' queues share,
//! not a copy), at most `--history-size` per topic, each for at most `--history-ttl`; what it holds
//! is counted in `ringgate_history_*`. Expired frames are freed at the next publish or recovery on
//! their topic, or at the next `/metrics` scrape; a topic whose frames all expired (or that holds
//! none and has not been published to for the TTL) is dropped, and its next message starts a new
//! epoch.
//!
//! With `--broker redis://` the history is kept in Redis instead (see `gateway::cluster::redis`):
//! this module then gives it its positions, outcomes, counters and messages, not its storage.
//!
//! Must never: block on anything but a topic's short lock; copy a payload per subscriber; hold a
//! topic's lock while waking a worker.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use crate::metrics::add;
use crate::proto::frame::{MAX_HEADER_LEN, write_frame};
use crate::proto::message::MessageKind;

/// The largest `--history-size` accepted: a bound on what one topic may hold.
pub const MAX_HISTORY_SIZE: usize = 1_000_000;

/// The default `--history-topics`: topics with a history at once, at most.
pub const DEFAULT_HISTORY_TOPICS: usize = 10_000;

/// Bytes of the binary positions envelope: the epoch then the offset, both big-endian `u64`.
pub const BINARY_POSITION_LEN: usize = 16;

/// What history a node keeps, from `--history-size`, `--history-ttl`, `--positions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistorySettings {
    /// Frames kept per topic; 0: no history (offsets are still assigned with `positions`).
    pub size: usize,
    /// How long a frame is kept; zero: until `size` newer ones push it out.
    pub ttl: Duration,
    /// Wrap every delivered message in the positions envelope (see [`encode_frame`]).
    pub positions: bool,
    /// Topics with a history at once, at most; a new one pushes out the one published to least
    /// recently (its next message starts a new epoch).
    pub max_topics: usize,
}

impl HistorySettings {
    /// Whether offsets are assigned at all (a history kept, or positions sent).
    pub fn enabled(&self) -> bool {
        self.size > 0 || self.positions
    }
}

/// A position in a topic: the topic's epoch and a message's offset in it (offset 0: before the
/// first message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// The topic history's epoch, printed as 16 lowercase hex digits.
    pub epoch: u64,
    /// The message's offset, from 1.
    pub offset: u64,
}

impl Position {
    /// Parses `EPOCH:OFFSET` (`?since=`): 1 to 16 hex digits, a colon (or `%3A`), a decimal offset.
    pub fn parse(text: &str) -> Option<Position> {
        let (epoch, offset) =
            text.split_once(':').or_else(|| text.split_once("%3A")).or_else(|| text.split_once("%3a"))?;
        if epoch.is_empty() || epoch.len() > 16 || !epoch.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Position { epoch: u64::from_str_radix(epoch, 16).ok()?, offset: offset.parse().ok()? })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}:{}", self.epoch, self.offset)
    }
}

/// How a recovery ended: the `outcome` of `ringgate_history_recoveries_total` and the `reason` of
/// the first message (see [`recovery_frame`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The history held everything after the asked position: replayed.
    Recovered,
    /// The topic's epoch is not the one asked (a restart, a history dropped, another topic's).
    EpochChanged,
    /// The history no longer holds the message after the asked position (too many since, or
    /// expired), or the asked offset is ahead of the topic.
    TooOld,
    /// This node keeps no history (no `--history-size`, or `--broker nats://`), or the history in
    /// Redis could not be read, or the live stream could not be held while it was.
    Unavailable,
}

const OUTCOMES: usize = 4;

impl Outcome {
    /// Every outcome, in table order.
    pub const ALL: [Outcome; OUTCOMES] =
        [Outcome::Recovered, Outcome::EpochChanged, Outcome::TooOld, Outcome::Unavailable];

    /// A stable label: the metric's `outcome`, the first message's `reason`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Recovered => "recovered",
            Outcome::EpochChanged => "epoch_changed",
            Outcome::TooOld => "too_old",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// The history's counters and gauges (`ringgate_history_*` in `/metrics`).
#[derive(Debug, Default)]
pub struct HistoryStats {
    messages: AtomicI64,
    bytes: AtomicI64,
    topics: AtomicI64,
    recoveries: [AtomicU64; OUTCOMES],
    /// Messages replayed to recovering subscribers.
    pub replayed: AtomicU64,
    /// Messages evicted for the size bound.
    pub evicted_size: AtomicU64,
    /// Messages evicted for the TTL.
    pub evicted_ttl: AtomicU64,
    /// Messages dropped with their topic's history, pushed out by a new topic past the topic bound.
    pub evicted_topics: AtomicU64,
}

impl HistoryStats {
    /// Frames held now, across topics.
    pub fn messages(&self) -> i64 {
        self.messages.load(Ordering::Relaxed)
    }

    /// Bytes of the frames held now (the encoded frames, header included).
    pub fn bytes(&self) -> i64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Topics with a history now.
    pub fn topics(&self) -> i64 {
        self.topics.load(Ordering::Relaxed)
    }

    /// Recoveries that ended with `outcome` so far.
    pub fn recoveries(&self, outcome: Outcome) -> u64 {
        self.recoveries[outcome as usize].load(Ordering::Relaxed)
    }

    /// Counts one recovery.
    pub fn recovered(&self, outcome: Outcome) {
        add(&self.recoveries[outcome as usize], 1);
    }

    fn held(&self, messages: i64, bytes: i64) {
        self.messages.fetch_add(messages, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

struct Entry {
    offset: u64,
    at: Instant,
    frame: Bytes,
}

/// One topic's history: its epoch, its last offset, the frames kept. Locked while an offset is
/// assigned and its frame queued and handed to the workers, and while a recovery reads it.
pub struct TopicLog {
    epoch: u64,
    /// The last offset assigned (0: none yet).
    last: u64,
    /// When the last offset was assigned (or the log created).
    touched: Instant,
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl TopicLog {
    /// The topic's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The position of the last message (offset 0 before any).
    pub fn top(&self) -> Position {
        Position { epoch: self.epoch, offset: self.last }
    }
}

/// What a recovering subscriber gets, read under its topic's lock.
#[derive(Debug)]
pub struct Recovery {
    /// How it ended.
    pub outcome: Outcome,
    /// Where the live stream continues: every live message after this has a higher offset, and
    /// those at or below it are skipped (they are in `replay`, or were not asked for).
    pub live_after: Position,
    /// The frames missed, in order (empty unless recovered).
    pub replay: Vec<Bytes>,
}

/// The process-wide history: one [`TopicLog`] per topic published to (or recovered on).
pub struct History {
    settings: HistorySettings,
    topics: RwLock<HashMap<Arc<str>, Arc<Mutex<TopicLog>>>>,
    stats: HistoryStats,
}

/// A topic's log, locked; the offset is assigned through it.
pub struct LogGuard<'a> {
    guard: MutexGuard<'a, TopicLog>,
    history: &'a History,
}

impl History {
    /// A history kept as `settings` say.
    pub fn new(settings: HistorySettings) -> History {
        History { settings, topics: RwLock::default(), stats: HistoryStats::default() }
    }

    /// What is kept.
    pub fn settings(&self) -> HistorySettings {
        self.settings
    }

    /// The counters.
    pub fn stats(&self) -> &HistoryStats {
        &self.stats
    }

    fn log(&self, topic: &str) -> Arc<Mutex<TopicLog>> {
        if let Ok(map) = self.topics.read()
            && let Some(log) = map.get(topic)
        {
            return Arc::clone(log);
        }
        let mut map = match self.topics.write() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !map.contains_key(topic) && map.len() >= self.settings.max_topics.max(1) {
            self.push_out_oldest(&mut map);
        }
        let log = map.entry(Arc::from(topic)).or_insert_with(|| {
            self.stats.topics.fetch_add(1, Ordering::Relaxed);
            Arc::new(Mutex::new(TopicLog {
                epoch: new_epoch(),
                last: 0,
                touched: Instant::now(),
                entries: VecDeque::new(),
                bytes: 0,
            }))
        });
        Arc::clone(log)
    }

    /// Drops the history of the topic published to least recently, among those no thread holds
    /// (a scan, only when a new topic arrives with the table full).
    fn push_out_oldest(&self, map: &mut HashMap<Arc<str>, Arc<Mutex<TopicLog>>>) {
        let oldest = map
            .iter()
            .filter(|(_, log)| Arc::strong_count(log) == 1)
            .filter_map(|(topic, log)| log.try_lock().ok().map(|log| (log.touched, Arc::clone(topic))))
            .min_by_key(|(touched, _)| *touched)
            .map(|(_, topic)| topic);
        let Some(log) = oldest.and_then(|topic| map.remove(&topic)) else { return };
        self.stats.topics.fetch_sub(1, Ordering::Relaxed);
        if let Ok(log) = log.lock() {
            add(&self.stats.evicted_topics, log.entries.len() as u64);
            self.stats.held(-(log.entries.len() as i64), -(log.bytes as i64));
        }
    }

    /// Runs `f` with `topic`'s log locked (created, with a new epoch, if the topic has none).
    pub fn with_log<R>(&self, topic: &str, f: impl FnOnce(&mut LogGuard<'_>) -> R) -> R {
        let log = self.log(topic);
        let guard = match log.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut guard = LogGuard { guard, history: self };
        guard.expire(Instant::now());
        f(&mut guard)
    }

    /// Reads what a subscriber that last saw `since` missed on `topic`. Its subscription must be
    /// in place (and in the hub's presence) before: everything after the returned `live_after`
    /// reaches it live.
    pub fn recover(&self, topic: &str, since: Position) -> Recovery {
        let recovery = self.with_log(topic, |log| log.read_since(since));
        self.stats.recovered(recovery.outcome);
        add(&self.stats.replayed, recovery.replay.len() as u64);
        recovery
    }

    /// Frees expired frames on every topic, and drops the topics left with nothing (for `/metrics`,
    /// so that idle topics do not keep what they no longer may).
    pub fn sweep(&self) {
        if self.settings.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let logs: Vec<Arc<Mutex<TopicLog>>> =
            self.topics.read().map_or_else(|_| Vec::new(), |map| map.values().cloned().collect());
        for log in logs {
            if let Ok(guard) = log.lock() {
                LogGuard { guard, history: self }.expire(now);
            }
        }
        let ttl = self.settings.ttl;
        if let Ok(mut map) = self.topics.write() {
            let before = map.len();
            // A log in use elsewhere (an Arc beyond the map's) is left for the next sweep.
            map.retain(|_, log| {
                Arc::strong_count(log) > 1
                    || match log.lock() {
                        Ok(log) => {
                            !log.entries.is_empty() || now.saturating_duration_since(log.touched) < ttl
                        }
                        Err(_) => true,
                    }
            });
            let dropped = before - map.len();
            self.stats.topics.fetch_sub(dropped as i64, Ordering::Relaxed);
        }
    }
}

impl LogGuard<'_> {
    /// The topic's epoch.
    pub fn epoch(&self) -> u64 {
        self.guard.epoch
    }

    /// Assigns the next offset.
    pub fn next_offset(&mut self) -> u64 {
        self.guard.last += 1;
        self.guard.touched = Instant::now();
        self.guard.last
    }

    /// Keeps the frame of the message at `offset` (the last assigned), pushing out the oldest past
    /// the size bound.
    pub fn keep(&mut self, offset: u64, frame: &Bytes) {
        let size = self.history.settings.size;
        if size == 0 {
            return;
        }
        let log = &mut *self.guard;
        let mut evicted = 0;
        let mut freed = 0;
        while log.entries.len() >= size {
            let Some(old) = log.entries.pop_front() else { break };
            evicted += 1;
            freed += old.frame.len();
        }
        log.entries.push_back(Entry { offset, at: log.touched, frame: frame.clone() });
        log.bytes = log.bytes + frame.len() - freed;
        add(&self.history.stats.evicted_size, evicted);
        self.history.stats.held(1 - evicted as i64, frame.len() as i64 - freed as i64);
    }

    fn expire(&mut self, now: Instant) {
        let ttl = self.history.settings.ttl;
        if ttl.is_zero() {
            return;
        }
        let log = &mut *self.guard;
        let mut evicted = 0;
        let mut freed = 0;
        while log.entries.front().is_some_and(|e| now.saturating_duration_since(e.at) >= ttl) {
            let Some(old) = log.entries.pop_front() else { break };
            evicted += 1;
            freed += old.frame.len();
        }
        if evicted > 0 {
            log.bytes -= freed;
            add(&self.history.stats.evicted_ttl, evicted);
            self.history.stats.held(-(evicted as i64), -(freed as i64));
        }
    }

    fn read_since(&self, since: Position) -> Recovery {
        let log = &*self.guard;
        let live_after = log.top();
        let lost = |outcome| Recovery { outcome, live_after, replay: Vec::new() };
        if since.epoch != log.epoch {
            return lost(Outcome::EpochChanged);
        }
        if since.offset > log.last {
            return lost(Outcome::TooOld);
        }
        // The first offset the history holds (or the next one when it holds none).
        let first = log.entries.front().map_or(log.last + 1, |e| e.offset);
        if since.offset + 1 < first {
            return lost(Outcome::TooOld);
        }
        let replay =
            log.entries.iter().filter(|e| e.offset > since.offset).map(|e| e.frame.clone()).collect();
        Recovery { outcome: Outcome::Recovered, live_after, replay }
    }
}

impl Drop for History {
    fn drop(&mut self) {
        // Keeps the gauges exact for a history dropped with frames (tests build several).
        let (mut messages, mut bytes) = (0, 0);
        if let Ok(map) = self.topics.read() {
            for log in map.values() {
                if let Ok(log) = log.lock() {
                    messages += log.entries.len() as i64;
                    bytes += log.bytes as i64;
                }
            }
        }
        self.stats.held(-messages, -bytes);
    }
}

/// A new epoch: random, never 0 (0 means "no history" in the first message). Also the epoch the
/// Redis scripts give a topic that has none.
pub fn new_epoch() -> u64 {
    loop {
        let epoch = getrandom::u64().unwrap_or_else(|_| {
            use std::hash::{BuildHasher, Hasher};
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            hasher.finish()
        });
        if epoch != 0 {
            return epoch;
        }
    }
}

/// Encodes a published message into the server frame every subscriber gets: the payload as is, or,
/// with `position`, in the positions envelope. A text message becomes the JSON text
/// `{"epoch":"<16 hex digits>","offset":N,"data":"<the text, as a JSON string>"}`; a binary message
/// stays binary with 16 bytes in front, the epoch then the offset (big-endian `u64` each).
pub fn encode_frame(kind: MessageKind, payload: &[u8], position: Option<Position>) -> Bytes {
    let Some(position) = position else {
        let mut frame = BytesMut::with_capacity(MAX_HEADER_LEN + payload.len());
        write_frame(&mut frame, kind.opcode(), payload, None);
        return frame.freeze();
    };
    let mut body = Vec::with_capacity(payload.len() + 64);
    match kind {
        MessageKind::Text => {
            let text = String::from_utf8_lossy(payload);
            body.extend_from_slice(
                format!("{{\"epoch\":\"{:016x}\",\"offset\":{},\"data\":", position.epoch, position.offset)
                    .as_bytes(),
            );
            // Writing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut body, &*text);
            body.push(b'}');
        }
        MessageKind::Binary => {
            body.put_u64(position.epoch);
            body.put_u64(position.offset);
            body.extend_from_slice(payload);
        }
    }
    let mut frame = BytesMut::with_capacity(MAX_HEADER_LEN + body.len());
    write_frame(&mut frame, kind.opcode(), &body, None);
    frame.freeze()
}

/// The first message a subscriber that asked `?since=` gets, before anything else: a text frame
/// `{"ringgate":"recovery","recovered":true|false,"reason":"…","epoch":"…","offset":N,"replayed":K}`.
/// `epoch:offset` is where the live stream continues (every later message has a higher offset);
/// `replayed` is the number of missed messages that follow before the live ones; `reason` is
/// `recovered`, `epoch_changed`, `too_old` or `unavailable` (no history to read on this node: epoch
/// `0000000000000000`, offset 0).
pub fn recovery_frame(recovery: &Recovery) -> Bytes {
    let text = format!(
        "{{\"ringgate\":\"recovery\",\"recovered\":{},\"reason\":\"{}\",\"epoch\":\"{:016x}\",\"offset\":{},\"replayed\":{}}}",
        recovery.outcome == Outcome::Recovered,
        recovery.outcome.label(),
        recovery.live_after.epoch,
        recovery.live_after.offset,
        recovery.replay.len(),
    );
    encode_frame(MessageKind::Text, text.as_bytes(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(size: usize, ttl: Duration) -> History {
        History::new(HistorySettings { size, ttl, positions: false, max_topics: 2 })
    }

    fn publish(history: &History, topic: &str, n: usize) -> Position {
        let mut top = Position { epoch: 0, offset: 0 };
        for _ in 0..n {
            history.with_log(topic, |log| {
                let offset = log.next_offset();
                log.keep(offset, &Bytes::from(offset.to_string()));
                top = Position { epoch: log.epoch(), offset };
            });
        }
        top
    }

    #[test]
    fn positions_parse_and_print() {
        let p = Position::parse("00ff:17").expect("valid");
        assert_eq!(p, Position { epoch: 255, offset: 17 });
        assert_eq!(p.to_string(), "00000000000000ff:17");
        for bad in ["", ":", "ff:", ":1", "g:1", "11111111111111111:1", "1:-1", "1:x", "1"] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_recovery_replays_exactly_what_was_missed() {
        let history = history(10, Duration::ZERO);
        let top = publish(&history, "t", 5);
        let r = history.recover("t", Position { epoch: top.epoch, offset: 2 });
        assert_eq!(r.outcome, Outcome::Recovered);
        assert_eq!(r.replay, [Bytes::from("3"), Bytes::from("4"), Bytes::from("5")]);
        assert_eq!(r.live_after, top);
        let r = history.recover("t", top);
        assert_eq!((r.outcome, r.replay.len()), (Outcome::Recovered, 0));
    }

    #[test]
    fn lost_positions_say_why() {
        let history = history(3, Duration::ZERO);
        let top = publish(&history, "t", 5);
        let at = |offset| Position { epoch: top.epoch, offset };
        assert_eq!(history.recover("t", at(1)).outcome, Outcome::TooOld, "2 was pushed out");
        assert_eq!(history.recover("t", at(2)).outcome, Outcome::Recovered, "3, 4, 5 are held");
        assert_eq!(history.recover("t", at(6)).outcome, Outcome::TooOld, "ahead of the topic");
        let other = Position { epoch: top.epoch ^ 1, offset: 4 };
        let r = history.recover("t", other);
        assert_eq!((r.outcome, r.live_after), (Outcome::EpochChanged, top));
        assert_eq!(history.stats().messages(), 3);
        assert_eq!(history.stats().bytes(), 3);
        assert_eq!(history.stats().recoveries(Outcome::TooOld), 2);
    }

    #[test]
    fn expired_frames_are_freed_and_idle_topics_dropped() {
        let history = history(10, Duration::from_millis(30));
        let top = publish(&history, "t", 4);
        std::thread::sleep(Duration::from_millis(40));
        history.sweep();
        assert_eq!(
            (history.stats().messages(), history.stats().bytes(), history.stats().topics()),
            (0, 0, 0)
        );
        let r = history.recover("t", top);
        assert_eq!(r.outcome, Outcome::EpochChanged, "a new history, a new epoch");
    }

    #[test]
    fn a_new_topic_past_the_bound_pushes_out_the_least_recently_published() {
        let history = history(10, Duration::ZERO);
        let a = publish(&history, "a", 3);
        publish(&history, "b", 2);
        publish(&history, "a", 1); // a is now the more recent
        publish(&history, "c", 4); // pushes out b
        assert_eq!(history.stats().topics(), 2);
        assert_eq!(history.stats().messages(), 8);
        assert_eq!(history.stats().evicted_topics.load(Ordering::Relaxed), 2);
        let r = history.recover("a", Position { epoch: a.epoch, offset: 3 });
        assert_eq!((r.outcome, r.replay.len()), (Outcome::Recovered, 1));
        assert_eq!(history.recover("b", Position { epoch: 1, offset: 0 }).outcome, Outcome::EpochChanged);
    }

    #[test]
    fn envelopes() {
        let p = Position { epoch: 0xab, offset: 7 };
        let text = encode_frame(MessageKind::Text, "a\"b\nü".as_bytes(), Some(p));
        assert_eq!(
            &text[2..],
            "{\"epoch\":\"00000000000000ab\",\"offset\":7,\"data\":\"a\\\"b\\nü\"}".as_bytes()
        );
        let binary = encode_frame(MessageKind::Binary, &[1, 2], Some(p));
        assert_eq!(&binary[..], &[0x82, 18, 0, 0, 0, 0, 0, 0, 0, 0xab, 0, 0, 0, 0, 0, 0, 0, 7, 1, 2]);
        assert_eq!(&encode_frame(MessageKind::Text, b"x", None)[..], &[0x81, 1, b'x']);
    }
}
