//! Connect mode: hold an established connection open and idle until the end of the run, answering
//! Pings, then close it. This is how the server's memory per idle connection is measured.
//!
//! Must never: send a data message, or hold a connection past the end of the run plus the close
//! timeout.

use std::net::Shutdown;
use std::pin::pin;

use tokio_uring::net::TcpStream;

use super::race::{Either, race};
use super::sockops::send_all;
use super::wire::{Drained, FrameReader, await_close, send_close};
use super::{CLOSE_TIMEOUT, ThreadCtx};
use crate::clock;
use crate::stats::ErrorKind;

/// Holds one established connection until the end of the run.
pub async fn run(ctx: &ThreadCtx, stream: TcpStream, mut reader: FrameReader) {
    let mut until_end = pin!(tokio::time::sleep_until(clock::tokio_instant(ctx.phases.end)));
    let mut out = Vec::new();
    // Set once, when the run ends; both halves of the closing handshake share it.
    let close_at = std::cell::Cell::new(None);
    let close_by = || *close_at.get().get_or_insert(tokio::time::Instant::now() + CLOSE_TIMEOUT);
    loop {
        match reader.drain_messages(&mut out, |_| {}) {
            Drained::Open => {}
            Drained::Broken => {
                ctx.stats.borrow_mut().error(ErrorKind::ProtocolError);
                return;
            }
            Drained::Closed(_) => {
                ctx.stats.borrow_mut().error(ErrorKind::ServerClosed);
                let _ = send_close(&stream).await;
                return;
            }
        }
        if !out.is_empty() {
            let (result, buf) = send_all(&stream, std::mem::take(&mut out)).await;
            out = buf;
            out.clear();
            if result.is_err() {
                ctx.stats.borrow_mut().error(ErrorKind::WriteFailed);
                return;
            }
        }
        let woke = {
            let read = pin!(reader.fill(&stream));
            match race(read, until_end.as_mut()).await {
                Either::Left(Ok(n)) if n > 0 => Woke::Data,
                Either::Left(_) => Woke::Lost,
                Either::Right(read) => {
                    // Time is up. Send our Close while the read is pending; it completes with the
                    // server's answer (or is cut off by the close timeout).
                    if !send_close(&stream).await {
                        let _ = stream.shutdown(Shutdown::Both);
                        let _ = read.await;
                        return;
                    }
                    match race(read, pin!(tokio::time::sleep_until(close_by())).as_mut()).await {
                        Either::Left(Ok(n)) if n > 0 => Woke::Closing,
                        Either::Left(_) => return,
                        Either::Right(read) => {
                            let _ = stream.shutdown(Shutdown::Both);
                            let _ = read.await;
                            return;
                        }
                    }
                }
            }
        };
        match woke {
            Woke::Data => {}
            Woke::Lost => {
                ctx.stats.borrow_mut().error(ErrorKind::ConnectionLost);
                return;
            }
            Woke::Closing => {
                await_close(&stream, &mut reader, pin!(tokio::time::sleep_until(close_by()))).await;
                return;
            }
        }
    }
}

/// What ended a wait for the next read.
enum Woke {
    /// Bytes arrived.
    Data,
    /// The stream ended or failed before the end of the run.
    Lost,
    /// Our Close is sent and bytes arrived; finish the closing handshake.
    Closing,
}
