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
//! intended outside the measured window, or drop a pending read op.

use std::cell::Cell;
use std::net::Shutdown;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use tokio_uring::net::TcpStream;

use super::due::encode_due;
use super::race::{Either, race};
use super::sockops::{recv_more, send_all};
use super::wire::{Drained, FrameReader, await_close, put_close};
use super::{CLOSE_TIMEOUT, ThreadCtx};
use crate::cli::{PubSubPlan, SEQ_BITS};
use crate::clock;
use crate::payload::{self, HEADER_LEN};
use crate::schedule::Schedule;
use crate::stats::{ErrorKind, ThreadStats};

/// How often a subscriber checks, after the end, whether everything has arrived.
const CHECK_EVERY: Duration = Duration::from_millis(50);

/// How often a publisher checks whether every subscriber has settled.
const BARRIER_POLL: Duration = Duration::from_millis(1);

const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// One publisher's progress, read by subscribers on every thread.
struct Publisher {
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
    /// Established subscribers per topic.
    subscribed: Box<[AtomicU64]>,
    publishers: Box<[Publisher]>,
    /// When the first publisher started its schedule (run clock); `u64::MAX` until then.
    publish_start: AtomicU64,
}

/// What one connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A subscriber on `topic`.
    Subscriber {
        /// Its topic.
        topic: u32,
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
            subscribed: (0..layout.topics).map(|_| AtomicU64::new(0)).collect(),
            publishers: (0..layout.publishers)
                .map(|_| Publisher {
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
            Role::Subscriber { topic: conn % l.topics }
        } else {
            let id = conn - l.subscribers;
            Role::Publisher { id, topic: id % l.topics }
        }
    }

    /// The request path of a connection in `role`.
    pub fn path(&self, role: Role) -> String {
        let (Role::Subscriber { topic } | Role::Publisher { topic, .. }) = role;
        format!("{}/t{topic}", self.layout.prefix)
    }

    /// A connection in `role` completed its handshake (`true`) or failed (`false`).
    pub fn connected(&self, role: Role, ok: bool) {
        match role {
            Role::Subscriber { topic } => {
                if ok {
                    self.subscribed[topic as usize].fetch_add(1, SeqCst);
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

    /// Deliveries the run should have made: each publisher's measured messages times the
    /// subscribers established on its topic.
    pub fn deliveries_expected(&self) -> u64 {
        let topics = self.layout.topics as usize;
        self.publishers
            .iter()
            .enumerate()
            .map(|(id, p)| p.measured.load(SeqCst) * self.subscribed[id % topics].load(SeqCst))
            .sum()
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

/// Marks a publisher done however its task ends.
struct DoneOnDrop<'a>(&'a Publisher);

impl Drop for DoneOnDrop<'_> {
    fn drop(&mut self) {
        self.0.done.store(true, SeqCst);
    }
}

/// A subscriber's view of its topic's publishers: the next sequence number expected from each.
struct Tracker<'a> {
    shared: &'a Shared,
    topic: u32,
    /// Indexed by publisher id / topics.
    next: Vec<u64>,
}

impl<'a> Tracker<'a> {
    fn new(shared: &'a Shared, topic: u32) -> Tracker<'a> {
        Tracker { shared, topic, next: vec![0; shared.publishers_on(topic).count()] }
    }

    /// Checks one delivery and records it.
    fn on_message(&mut self, ctx: &ThreadCtx, stats: &mut ThreadStats, payload: &[u8], now: u64) {
        let size = ctx.plan.size;
        let layout = &self.shared.layout;
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
        let next = &mut self.next[id / layout.topics as usize];
        if seq < *next {
            stats.error(ErrorKind::OutOfOrder);
            return;
        }
        if seq > *next {
            stats.counters.deliveries_lost += self.shared.measured_between(id, *next, seq);
        }
        *next = seq + 1;
        stats.received(clock::ns_to_us(now.saturating_sub(at)), ctx.phases.measured(at));
    }

    /// Whether every publisher on the topic is done and everything it sent has arrived.
    fn complete(&self) -> bool {
        self.shared.publishers_on(self.topic).zip(&self.next).all(|(id, &next)| {
            let p = &self.shared.publishers[id];
            p.done.load(SeqCst) && next >= p.sent.load(SeqCst)
        })
    }

    /// Counts every measured message not received yet as lost (at the end of the run).
    fn count_missing(&self, stats: &mut ThreadStats) {
        for (id, &next) in self.shared.publishers_on(self.topic).zip(&self.next) {
            let sent = self.shared.publishers[id].sent.load(SeqCst);
            stats.counters.deliveries_lost += self.shared.measured_between(id, next, sent);
        }
    }
}

/// How handling a read ended.
enum AfterRead {
    Continue,
    /// The server closed (recorded); our Close is in `control`.
    Closed,
    /// A protocol error (recorded).
    Broken,
}

/// Handles every complete event in the reader: deliveries go to `tracker` (publishers pass
/// `None` and ignore them), Pings are answered into `control`, a Close is recorded by code.
fn on_read(
    ctx: &ThreadCtx,
    reader: &mut FrameReader,
    mut tracker: Option<&mut Tracker<'_>>,
    control: &mut Vec<u8>,
) -> AfterRead {
    let now = clock::now();
    let mut stats = ctx.stats.borrow_mut();
    let drained = reader.drain_messages(control, |payload| {
        if let Some(tracker) = tracker.as_deref_mut() {
            tracker.on_message(ctx, &mut stats, payload, now);
        }
    });
    match drained {
        Drained::Open => AfterRead::Continue,
        Drained::Broken => {
            stats.error(ErrorKind::ProtocolError);
            AfterRead::Broken
        }
        Drained::Closed(code) => {
            stats.closed(code);
            put_close(control);
            AfterRead::Closed
        }
    }
}

/// Writes pending control frames (Pongs, our Close). `false` if the write failed.
async fn flush(stream: &TcpStream, control: &mut Vec<u8>) -> bool {
    if control.is_empty() {
        return true;
    }
    let (result, mut buf) = send_all(stream, std::mem::take(control)).await;
    buf.clear();
    *control = buf;
    result.is_ok()
}

/// Runs one subscriber: reads until the run and its grace period are over (or everything
/// expected has arrived), then closes and counts what is missing as lost.
pub async fn subscribe(
    ctx: &ThreadCtx,
    shared: &Shared,
    stream: TcpStream,
    mut reader: FrameReader,
    topic: u32,
) {
    let phases = ctx.phases;
    let mut tracker = Tracker::new(shared, topic);
    let mut control = Vec::new();
    let ended_early = match on_read(ctx, &mut reader, Some(&mut tracker), &mut control) {
        AfterRead::Continue => None,
        other => Some(other),
    };
    let mut clean = true;
    if let Some(how) = ended_early {
        if let AfterRead::Closed = how {
            let _ = flush(&stream, &mut control).await;
        }
        let _ = stream.shutdown(Shutdown::Both);
        clean = false;
    } else {
        let mut read = pin!(recv_more(&stream, reader.take_buffer()));
        let check_at = Cell::new(phases.end);
        let mut check = pin!(tokio::time::sleep_until(clock::tokio_instant(check_at.get())));
        let finished = loop {
            tokio::select! {
                biased;
                (result, buf) = &mut read => {
                    reader.restore(buf);
                    if !matches!(result, Ok(n) if n > 0) {
                        ctx.stats.borrow_mut().error(ErrorKind::ConnectionLost);
                        break false;
                    }
                    let after = on_read(ctx, &mut reader, Some(&mut tracker), &mut control);
                    let written = flush(&stream, &mut control).await;
                    if !matches!(after, AfterRead::Continue) {
                        let _ = stream.shutdown(Shutdown::Both);
                        break false;
                    }
                    if !written {
                        // The read has completed and is not re-armed: nothing is pending.
                        ctx.stats.borrow_mut().error(ErrorKind::WriteFailed);
                        let _ = stream.shutdown(Shutdown::Both);
                        break false;
                    }
                    read.set(recv_more(&stream, reader.take_buffer()));
                }
                () = &mut check => {
                    let now = clock::now();
                    if tracker.complete() || now >= phases.drain_end {
                        break true;
                    }
                    check_at.set((now + CHECK_EVERY.as_nanos() as u64).min(phases.drain_end));
                    check.set(tokio::time::sleep_until(clock::tokio_instant(check_at.get())));
                }
            }
        };
        if finished {
            close(&stream, &mut reader, read).await;
        } else {
            clean = false;
        }
    }
    if !clean {
        // The connection ended early: wait for the publishers to finish so that what this
        // subscriber missed can be counted.
        while clock::now() < phases.drain_end && !tracker.complete() {
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }
    tracker.count_missing(&mut ctx.stats.borrow_mut());
}

/// Sends our Close while `read` is pending, then waits for the server's (bounded).
async fn close<F>(stream: &TcpStream, reader: &mut FrameReader, read: std::pin::Pin<&mut F>)
where
    F: std::future::Future<Output = (std::io::Result<usize>, Vec<u8>)>,
{
    let mut out = Vec::with_capacity(32);
    put_close(&mut out);
    let _ = send_all(stream, out).await;
    let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
    match race(read, pin!(tokio::time::sleep_until(deadline))).await {
        Either::Left((Ok(n), buf)) if n > 0 => {
            reader.restore(buf);
            await_close(stream, reader, pin!(tokio::time::sleep_until(deadline))).await;
        }
        Either::Left(_) => {}
        Either::Right(read) => {
            let _ = stream.shutdown(Shutdown::Both);
            let _ = read.await;
        }
    }
}

/// Runs one publisher: waits for every subscriber to settle, then publishes on its open-loop
/// schedule until the end of the run (reading and discarding what the server sends it).
pub async fn publish(
    ctx: &ThreadCtx,
    shared: &Shared,
    stream: TcpStream,
    mut reader: FrameReader,
    id: u32,
    rate: f64,
) {
    let plan = &ctx.plan;
    let phases = ctx.phases;
    let me = &shared.publishers[id as usize];
    let _done = DoneOnDrop(me);
    while shared.settled.load(SeqCst) < shared.layout.subscribers && clock::now() < phases.end {
        tokio::time::sleep(BARRIER_POLL).await;
    }
    let start = clock::now().max(phases.ramp_end);
    shared.publish_start.fetch_min(start, SeqCst);
    let schedule = Schedule::staggered(start, rate);
    let tag_base = u64::from(id) << SEQ_BITS;
    let mut payload = vec![0u8; plan.size];
    let mut out: Vec<u8> = Vec::with_capacity(plan.size + 16);
    let mut control: Vec<u8> = Vec::new();
    let mut sent = 0u64;

    if !matches!(on_read(ctx, &mut reader, None, &mut control), AfterRead::Continue) {
        let _ = flush(&stream, &mut control).await;
        let _ = stream.shutdown(Shutdown::Both);
        return;
    }
    let mut read = pin!(recv_more(&stream, reader.take_buffer()));
    let mut due = pin!(ctx.pacer.sleep_until(schedule.at(0)));
    let mut sending = schedule.at(0) < phases.end;
    while sending {
        tokio::select! {
            biased;
            (result, buf) = &mut read => {
                reader.restore(buf);
                if !matches!(result, Ok(n) if n > 0) {
                    ctx.stats.borrow_mut().error(ErrorKind::ConnectionLost);
                    return;
                }
                let after = on_read(ctx, &mut reader, None, &mut control);
                let _ = flush(&stream, &mut control).await;
                if !matches!(after, AfterRead::Continue) {
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
                read.set(recv_more(&stream, reader.take_buffer()));
            }
            () = &mut due => {
                out.clear();
                encode_due(ctx, &mut out, &mut payload, &schedule, &mut sent, tag_base, |next, measured| {
                    if measured {
                        // `next - 1` is the message just encoded.
                        if me.first_measured.load(SeqCst) == u64::MAX {
                            me.first_measured.store(next - 1, SeqCst);
                        }
                        me.measured.fetch_add(1, SeqCst);
                    }
                    me.sent.store(next, SeqCst);
                });
                let (result, buf) = send_all(&stream, std::mem::take(&mut out)).await;
                out = buf;
                if result.is_err() {
                    ctx.stats.borrow_mut().error(ErrorKind::WriteFailed);
                    let _ = stream.shutdown(Shutdown::Both);
                    let _ = read.await;
                    return;
                }
                let next = schedule.at(sent);
                sending = next < phases.end;
                if sending {
                    due.set(ctx.pacer.sleep_until(next));
                }
            }
        }
    }
    me.done.store(true, SeqCst);
    close(&stream, &mut reader, read).await;
}
