//! Closed loop (`--rate 0`): each connection sends one message, waits for its echo, and sends the
//! next at once: the most a server can echo, ping-pong style. Latency is measured from the actual
//! send time (in a closed loop, the next send waits for the echo by design, so there is no
//! schedule to fall behind; a stall shows as one long latency and lower throughput).
//! `--pipeline` N > 1 (N messages in flight) is `pipelined`'s; this stays the plain ping-pong.
//!
//! Must never: have more than one message in flight per connection, or drop an op on timeout.

use std::net::Shutdown;
use std::pin::pin;

use ringgate::proto::frame::{OpCode, write_frame};
use tokio_uring::net::TcpStream;

use super::race::{Either, race};
use super::sockops::send_all;
use super::wire::{Drained, FrameReader, await_close, mask_key, send_close};
use super::{CLOSE_TIMEOUT, ThreadCtx};
use crate::clock;
use crate::payload;
use crate::stats::ErrorKind;

/// Runs one established connection in closed loop until the end of the run.
pub async fn run(ctx: &ThreadCtx, stream: TcpStream, mut reader: FrameReader) {
    let phases = ctx.phases;
    let size = ctx.plan.size;
    let mut hard_deadline = pin!(tokio::time::sleep_until(clock::tokio_instant(phases.drain_end)));
    let mut payload = vec![0u8; size];
    let mut out: Vec<u8> = Vec::with_capacity(size + 16);
    let mut control: Vec<u8> = Vec::new();
    let mut seq = 0u64;
    loop {
        let sent_at = clock::now();
        if sent_at >= phases.end {
            break;
        }
        out.clear();
        out.append(&mut control);
        payload::fill(&mut payload, seq, sent_at);
        write_frame(&mut out, OpCode::Binary, &payload, Some(mask_key()));
        {
            let mut stats = ctx.stats.borrow_mut();
            if phases.measured(sent_at) {
                stats.counters.messages_sent += 1;
            }
            stats.counters.total_sent += 1;
        }
        let (result, buf) = send_all(&stream, out).await;
        out = buf;
        if result.is_err() {
            ctx.stats.borrow_mut().error(ErrorKind::WriteFailed);
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }

        // Wait for this message's echo.
        let mut echoed = false;
        loop {
            let now = clock::now();
            let drained = {
                let mut stats = ctx.stats.borrow_mut();
                reader.drain_messages(&mut control, |payload| {
                    if echoed || !payload::verify(payload, size, seq, sent_at) {
                        stats.error(ErrorKind::EchoMismatch);
                    } else {
                        stats.received(clock::ns_to_us(now - sent_at), phases.measured(sent_at));
                    }
                    echoed = true;
                })
            };
            match drained {
                Drained::Open => {}
                Drained::Broken => {
                    ctx.stats.borrow_mut().error(ErrorKind::ProtocolError);
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
                Drained::Closed(_) => {
                    ctx.stats.borrow_mut().error(ErrorKind::ServerClosed);
                    let _ = send_close(&stream).await;
                    return;
                }
            }
            if echoed {
                break;
            }
            let read = pin!(reader.fill(&stream));
            match race(read, hard_deadline.as_mut()).await {
                Either::Left(Ok(n)) if n > 0 => {}
                Either::Left(_) => {
                    ctx.stats.borrow_mut().error(ErrorKind::ConnectionLost);
                    return;
                }
                Either::Right(read) => {
                    let _ = stream.shutdown(Shutdown::Both);
                    let _ = read.await;
                    if phases.measured(sent_at) {
                        ctx.stats.borrow_mut().error(ErrorKind::EchoTimeout);
                    }
                    return;
                }
            }
        }
        seq += 1;
    }
    if send_close(&stream).await {
        await_close(&stream, &mut reader, pin!(tokio::time::sleep(CLOSE_TIMEOUT))).await;
    }
}
