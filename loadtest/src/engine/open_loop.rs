//! Open loop: each connection sends message `k` at its intended time `t0 + k / rate`, whatever the
//! echoes do, and each echo's latency is measured from that intended time (coordinated-omission
//! correction, as wrk2 does). One task per connection keeps a read pending at all times and
//! wakes either for the read or for the next due send (via the thread's pacer).
//!
//! If sending falls behind (the socket's send buffer is full because the server stopped reading,
//! or the client is overloaded), every overdue message goes out at once when it can, still stamped
//! with its intended time, and the late ones are counted. Nothing is skipped.
//!
//! One task rather than a reader and a writer: tokio-uring dispatches completions from one task in
//! the same FIFO queue as every connection task, so each extra runnable task per connection delays
//! every completion; and with one task, Pongs are written in line with no shared queue.
//!
//! Must never: stamp a message with its actual send time, skip a scheduled message, or drop the
//! pending read op (on every exit the socket is shut down and the read driven to its end).

use std::net::Shutdown;
use std::pin::pin;

use tokio_uring::net::TcpStream;

use super::ThreadCtx;
use super::due::encode_due;
use super::sockops::{recv_more, send_all};
use super::wire::{Drained, FrameReader, close_while_reading, put_close};
use crate::clock;
use crate::payload;
use crate::schedule::Schedule;
use crate::stats::ErrorKind;

/// What woke the connection.
enum Wake {
    /// The pending read completed.
    Read(std::io::Result<usize>, Vec<u8>),
    /// The next message is due.
    Due,
    /// The drain deadline passed with echoes outstanding.
    DrainOver,
}

/// How processing a read ended.
enum AfterRead {
    /// Keep going.
    Continue,
    /// The connection is finished (error or server close); the read is not re-armed.
    Stop,
}

/// Runs one established connection in open loop at `rate` messages per second; `opened` is when
/// the handshake completed.
pub async fn run(ctx: &ThreadCtx, stream: TcpStream, mut reader: FrameReader, rate: f64, opened: u64) {
    let plan = &ctx.plan;
    let phases = ctx.phases;
    let schedule = Schedule::staggered(opened, rate);
    let mut payload = vec![0u8; plan.size];
    let mut out: Vec<u8> = Vec::with_capacity(plan.size + 16);
    let mut control: Vec<u8> = Vec::new();
    let (mut sent, mut received) = (0u64, 0u64);

    // Frames that arrived with the handshake response.
    if let AfterRead::Stop = on_read(ctx, &mut reader, &schedule, sent, &mut received, &mut control) {
        return;
    }
    let mut read = pin!(recv_more(&stream, reader.take_buffer()));
    let mut due = pin!(ctx.pacer.sleep_until(schedule.at(0)));
    let mut drain_over = pin!(tokio::time::sleep_until(clock::tokio_instant(phases.drain_end)));
    let mut sending = schedule.at(0) < phases.end;

    let clean = loop {
        if !sending && received >= sent {
            break true;
        }
        let wake = tokio::select! {
            biased;
            (result, buf) = &mut read => Wake::Read(result, buf),
            () = &mut due, if sending => Wake::Due,
            () = &mut drain_over, if !sending => Wake::DrainOver,
        };
        match wake {
            Wake::Read(result, buf) => {
                reader.restore(buf);
                if !matches!(result, Ok(n) if n > 0) {
                    ctx.stats.borrow_mut().error(ErrorKind::ConnectionLost);
                    return;
                }
                let after = on_read(ctx, &mut reader, &schedule, sent, &mut received, &mut control);
                if !control.is_empty() {
                    let (_, buf) = send_all(&stream, std::mem::take(&mut control)).await;
                    control = buf;
                    control.clear();
                }
                if let AfterRead::Stop = after {
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
                read.set(recv_more(&stream, reader.take_buffer()));
            }
            Wake::Due => {
                // Everything due by now goes out in one write, each message stamped with its own
                // intended time.
                out.clear();
                encode_due(ctx, &mut out, &mut payload, &schedule, &mut sent, 0, |_, _| {});
                let (result, buf) = send_all(&stream, std::mem::take(&mut out)).await;
                out = buf;
                if result.is_err() {
                    ctx.stats.borrow_mut().error(ErrorKind::WriteFailed);
                    break false;
                }
                let next = schedule.at(sent);
                sending = next < phases.end;
                if sending {
                    due.set(ctx.pacer.sleep_until(next));
                }
            }
            Wake::DrainOver => {
                let missing = (received..sent).filter(|&k| phases.measured(schedule.at(k))).count() as u64;
                ctx.stats.borrow_mut().errors_n(ErrorKind::EchoTimeout, missing);
                break true;
            }
        }
    };

    close_while_reading(&stream, &mut reader, read, clean).await;
}

/// Verifies and records every complete event in the reader's buffer. `received` is the next
/// sequence number expected back; `sent` how many have been sent.
fn on_read(
    ctx: &ThreadCtx,
    reader: &mut FrameReader,
    schedule: &Schedule,
    sent: u64,
    received: &mut u64,
    control: &mut Vec<u8>,
) -> AfterRead {
    let size = ctx.plan.size;
    let phases = ctx.phases;
    let now = clock::now();
    let mut stats = ctx.stats.borrow_mut();
    let drained = reader.drain_messages(control, |payload| {
        let seq = *received;
        if seq >= sent {
            stats.error(ErrorKind::EchoMismatch);
            return;
        }
        *received = seq + 1;
        let at = schedule.at(seq);
        if !payload::verify(payload, size, seq, at) {
            stats.error(ErrorKind::EchoMismatch);
            return;
        }
        stats.received(clock::ns_to_us(now.saturating_sub(at)), phases.measured(at));
    });
    match drained {
        Drained::Open => AfterRead::Continue,
        Drained::Broken => {
            stats.error(ErrorKind::ProtocolError);
            AfterRead::Stop
        }
        Drained::Closed(_) => {
            stats.error(ErrorKind::ServerClosed);
            put_close(control);
            AfterRead::Stop
        }
    }
}
