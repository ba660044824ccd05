//! Open loop: each connection sends message `k` at its intended time `t0 + k / rate`, whatever the
//! echoes do, and each echo's latency is measured from that intended time (coordinated-omission
//! correction, as wrk2 does). A writer task keeps the schedule; a reader task verifies echoes in
//! order and records latencies.
//!
//! If the writer falls behind (the socket's send buffer is full because the server stopped
//! reading, or the client is overloaded), it sends every overdue message at once when it can,
//! still stamped with its intended time, and counts the late ones. Nothing is skipped.
//!
//! Must never: stamp a message with its actual send time, skip a scheduled message, or write from
//! two tasks at once (only the writer writes; the reader queues Pongs for it).

use std::cell::{Cell, RefCell};
use std::net::Shutdown;
use std::pin::pin;
use std::rc::Rc;

use ringgate::proto::frame::{OpCode, write_frame};
use ringgate::proto::message::Event;
use tokio::sync::Notify;
use tokio_uring::net::TcpStream;

use super::race::{Either, race};
use super::wire::{FrameReader, mask_key, put_close, put_pong};
use super::{CLOSE_TIMEOUT, LATE_THRESHOLD, ThreadCtx};
use crate::clock;
use crate::payload;
use crate::schedule::Schedule;
use crate::stats::ErrorKind;

/// State the writer and reader of one connection share (single thread; `Cell`s suffice).
struct Shared {
    stream: TcpStream,
    schedule: Schedule,
    /// Messages handed to the socket so far (the next sequence number to send).
    sent: Cell<u64>,
    /// Echoes consumed so far (the next sequence number expected back).
    received: Cell<u64>,
    /// The writer has sent its last scheduled message and waits for the echoes.
    writer_done: Cell<bool>,
    /// Outstanding echoes have been written off; the reader ignores any that still come.
    closing: Cell<bool>,
    /// The connection failed; both tasks stop.
    dead: Cell<bool>,
    /// Frames the reader wants written (Pongs).
    control: RefCell<Vec<u8>>,
    /// Wakes the writer: a Pong is queued, the last echo arrived, or the connection died.
    wake: Notify,
}

/// Runs one established connection in open loop at `rate` messages per second; `opened` is when
/// the handshake completed.
pub async fn run(ctx: &Rc<ThreadCtx>, stream: TcpStream, reader: FrameReader, rate: f64, opened: u64) {
    let shared = Rc::new(Shared {
        stream,
        schedule: Schedule::staggered(opened, rate),
        sent: Cell::new(0),
        received: Cell::new(0),
        writer_done: Cell::new(false),
        closing: Cell::new(false),
        dead: Cell::new(false),
        control: RefCell::new(Vec::new()),
        wake: Notify::new(),
    });
    let reader_task = tokio_uring::spawn(read_echoes(Rc::clone(ctx), Rc::clone(&shared), reader));
    let mut out = write_schedule(ctx, &shared).await;
    drain(ctx, &shared).await;

    // Close: send ours, give the server a moment to answer and end the stream, then cut it.
    if !shared.dead.get() {
        out.clear();
        put_close(&mut out);
        let _ = shared.stream.write_all(out).await;
    }
    let timeout = pin!(tokio::time::sleep(CLOSE_TIMEOUT));
    let reader_task = pin!(reader_task);
    if let Either::Right(reader_task) = race(reader_task, timeout).await {
        let _ = shared.stream.shutdown(Shutdown::Both);
        let _ = reader_task.await;
    }
}

/// Sends every scheduled message up to the end of the run. Returns the write buffer for reuse.
async fn write_schedule(ctx: &ThreadCtx, shared: &Shared) -> Vec<u8> {
    let plan = &ctx.plan;
    let phases = ctx.phases;
    let late = LATE_THRESHOLD.as_nanos() as u64;
    let mut payload = vec![0u8; plan.size];
    let mut out: Vec<u8> = Vec::with_capacity(plan.size + 16);
    let mut next = 0u64;
    loop {
        let due = shared.schedule.at(next);
        if due >= phases.end || shared.dead.get() {
            return out;
        }
        if due > clock::now() {
            let mut sleep = pin!(ctx.pacer.sleep_until(due));
            loop {
                tokio::select! {
                    biased;
                    () = &mut sleep => break,
                    () = shared.wake.notified() => {
                        if shared.dead.get() {
                            // The timeout is still in flight; it ends on its own at `due`.
                            return out;
                        }
                        if !shared.control.borrow().is_empty() {
                            out = flush_control(shared, out).await;
                        }
                    }
                }
            }
        }

        // Everything due by now goes out in one write, each message stamped with its own
        // intended time.
        out.clear();
        out.append(&mut shared.control.borrow_mut());
        let now = clock::now();
        {
            let mut stats = ctx.stats.borrow_mut();
            loop {
                let at = shared.schedule.at(next);
                if at > now || at >= phases.end {
                    break;
                }
                payload::fill(&mut payload, next, at);
                write_frame(&mut out, OpCode::Binary, &payload, Some(mask_key()));
                let lag = now - at;
                if phases.measured(at) {
                    stats.counters.messages_sent += 1;
                    stats.send_lag.saturating_record(clock::ns_to_us(lag));
                    if lag > late {
                        stats.counters.late_sends += 1;
                    }
                }
                stats.counters.total_sent += 1;
                next += 1;
            }
        }
        shared.sent.set(next);
        let (result, buf) = shared.stream.write_all(out).await;
        out = buf;
        if result.is_err() {
            fail(ctx, shared, ErrorKind::WriteFailed);
            return out;
        }
    }
}

/// Waits for the outstanding echoes until the drain deadline, then writes off the missing ones.
async fn drain(ctx: &ThreadCtx, shared: &Shared) {
    shared.writer_done.set(true);
    let mut deadline = pin!(tokio::time::sleep_until(clock::tokio_instant(ctx.phases.drain_end)));
    let mut out = Vec::new();
    while !shared.dead.get() && shared.received.get() < shared.sent.get() {
        tokio::select! {
            biased;
            () = &mut deadline => break,
            () = shared.wake.notified() => {
                if !shared.control.borrow().is_empty() {
                    out = flush_control(shared, out).await;
                }
            }
        }
    }
    shared.closing.set(true);
    if shared.dead.get() {
        return;
    }
    let missing = (shared.received.get()..shared.sent.get())
        .filter(|&k| ctx.phases.measured(shared.schedule.at(k)))
        .count() as u64;
    if missing > 0 {
        ctx.stats.borrow_mut().errors_n(ErrorKind::EchoTimeout, missing);
    }
}

async fn flush_control(shared: &Shared, mut out: Vec<u8>) -> Vec<u8> {
    out.clear();
    out.append(&mut shared.control.borrow_mut());
    let (_, out) = shared.stream.write_all(out).await;
    out
}

/// Reads echoes until the stream ends, verifying each against the schedule.
async fn read_echoes(ctx: Rc<ThreadCtx>, shared: Rc<Shared>, mut reader: FrameReader) {
    let size = ctx.plan.size;
    let phases = ctx.phases;
    loop {
        // Frames that arrived with the handshake response are drained before the first read.
        let now = clock::now();
        let mut server_closed = false;
        let mut pong_queued = false;
        let result = {
            let mut stats = ctx.stats.borrow_mut();
            reader.drain(|event| {
                match event {
                    Event::Message { payload, .. } => {
                        if shared.closing.get() {
                            return true;
                        }
                        let seq = shared.received.get();
                        if seq >= shared.sent.get() {
                            stats.error(ErrorKind::EchoMismatch);
                            return true;
                        }
                        shared.received.set(seq + 1);
                        let at = shared.schedule.at(seq);
                        if !payload::verify(payload, size, seq, at) {
                            stats.error(ErrorKind::EchoMismatch);
                            return true;
                        }
                        let latency = clock::ns_to_us(now.saturating_sub(at));
                        stats.interval.saturating_record(latency);
                        stats.counters.total_received += 1;
                        if phases.measured(at) {
                            stats.latency.saturating_record(latency);
                            stats.counters.messages_received += 1;
                        }
                    }
                    Event::Ping(data) => {
                        put_pong(&mut shared.control.borrow_mut(), data);
                        pong_queued = true;
                    }
                    Event::Pong(_) => {}
                    Event::Close(_) => {
                        server_closed = true;
                        return false;
                    }
                }
                true
            })
        };
        if result.is_err() {
            fail(&ctx, &shared, ErrorKind::ProtocolError);
            return;
        }
        if server_closed {
            if !shared.closing.get() {
                fail(&ctx, &shared, ErrorKind::ServerClosed);
            }
            return;
        }
        if pong_queued || (shared.writer_done.get() && shared.received.get() >= shared.sent.get()) {
            shared.wake.notify_one();
        }
        match reader.fill(&shared.stream).await {
            Ok(n) if n > 0 => {}
            _ => {
                if !shared.closing.get() {
                    fail(&ctx, &shared, ErrorKind::ConnectionLost);
                }
                return;
            }
        }
    }
}

/// Marks the connection dead (once), counts why, and wakes both tasks.
fn fail(ctx: &ThreadCtx, shared: &Shared, kind: ErrorKind) {
    if shared.dead.replace(true) {
        return;
    }
    ctx.stats.borrow_mut().error(kind);
    let _ = shared.stream.shutdown(Shutdown::Both);
    shared.wake.notify_one();
}
