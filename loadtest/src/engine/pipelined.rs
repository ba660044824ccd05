//! Pipelined closed loop (`--rate 0 --pipeline N`, N > 1): each connection keeps N messages in
//! flight, back to back. Every echo frees a slot and the next write refills every free slot, so a
//! connection always has N messages sent and not yet echoed (fewer only for the moment between an
//! echo and the write it triggers). Ping-pong (`closed_loop`) leaves a connection idle for a round
//! trip after each message, so the server sees one frame per read; here frames queue up behind
//! each other, as they do from a client that streams, and a server can read and write several at
//! once. Latency is measured from each message's actual send time, as in closed loop.
//!
//! A read is always pending and at most one write is in flight; messages owed while a write is in
//! flight go out together in the next one, stamped when it starts. Reading never waits for
//! writing: a sender blocked in a write without reading could deadlock with a server that stops
//! reading while its echoes cannot be written.
//!
//! Must never: have more than N messages in flight on a connection, stamp a message with the time
//! it became owed rather than the time the write carrying it is built, or drop a pending op (on
//! every exit the socket is shut down or closed, and the read and any write are driven to their
//! end).

use std::io;
use std::net::Shutdown;
use std::pin::pin;

use ringgate::proto::frame::{OpCode, write_frame};
use tokio_uring::net::TcpStream;

use super::ThreadCtx;
use super::sockops::{recv_more, send_all};
use super::wire::{Drained, FrameReader, close_while_reading, mask_key, put_close};
use crate::clock;
use crate::payload;
use crate::stats::ErrorKind;

/// The messages in flight on one connection, oldest first: a ring of send times, one slot per
/// message the connection may have in flight, indexed by sequence number.
#[derive(Debug)]
pub struct Window {
    sent_at: Vec<u64>,
    /// Messages sent: the next sequence number.
    sent: u64,
    /// Echoes taken: the sequence number the next echo must carry.
    echoed: u64,
}

impl Window {
    /// An empty window with room for `depth` messages in flight (at least 1).
    pub fn new(depth: u32) -> Window {
        Window { sent_at: vec![0; depth.max(1) as usize], sent: 0, echoed: 0 }
    }

    /// Messages sent and not yet echoed.
    pub fn in_flight(&self) -> u64 {
        self.sent - self.echoed
    }

    /// Whether another message may be sent.
    pub fn has_room(&self) -> bool {
        self.in_flight() < self.sent_at.len() as u64
    }

    /// Takes a slot for a message sent at `at` and returns its sequence number; `None` when all
    /// the slots are taken.
    pub fn push(&mut self, at: u64) -> Option<u64> {
        if !self.has_room() {
            return None;
        }
        let seq = self.sent;
        let slot = self.slot(seq);
        self.sent_at[slot] = at;
        self.sent += 1;
        Some(seq)
    }

    /// Frees the oldest message's slot and returns its sequence number and send time: what the
    /// next echo must match. `None` when nothing is in flight (an echo now is unexpected).
    pub fn pop(&mut self) -> Option<(u64, u64)> {
        if self.in_flight() == 0 {
            return None;
        }
        let seq = self.echoed;
        self.echoed += 1;
        Some((seq, self.sent_at[self.slot(seq)]))
    }

    /// Send times of the messages in flight, oldest first.
    pub fn in_flight_sent_at(&self) -> impl Iterator<Item = u64> + '_ {
        (self.echoed..self.sent).map(|seq| self.sent_at[self.slot(seq)])
    }

    fn slot(&self, seq: u64) -> usize {
        (seq % self.sent_at.len() as u64) as usize
    }
}

/// What woke the connection.
enum Wake {
    /// The pending read completed.
    Read(io::Result<usize>, Vec<u8>),
    /// The write in flight completed.
    Written(io::Result<()>, Vec<u8>),
    /// The drain deadline passed with echoes (or a write) outstanding.
    DrainOver,
}

/// How the connection's loop ended.
enum Ending {
    /// Nothing in flight, or the drain deadline passed and what was missing is counted: close
    /// with our Close frame while the read is pending.
    Clean,
    /// An error (counted); shut the socket down and drive the ops still pending to their end.
    Failed { read_pending: bool, write_pending: bool },
}

/// Runs one established connection in closed loop with `--pipeline` messages in flight until the
/// end of the run.
pub async fn run(ctx: &ThreadCtx, stream: TcpStream, mut reader: FrameReader) {
    let phases = ctx.phases;
    let mut window = Window::new(ctx.plan.pipeline);
    let mut payload = vec![0u8; ctx.plan.size];
    let mut out: Vec<u8> = Vec::new();
    let mut control: Vec<u8> = Vec::new();

    // Frames that arrived with the handshake response.
    if !on_read(ctx, &mut reader, &mut window, &mut control) {
        let _ = send_all(&stream, control).await;
        let _ = stream.shutdown(Shutdown::Both);
        return;
    }
    let mut read = pin!(recv_more(&stream, reader.take_buffer()));
    // Replaced by each write; this first one is never polled.
    let mut write = pin!(send_all(&stream, Vec::new()));
    let mut writing = false;
    let mut drain_over = pin!(tokio::time::sleep_until(clock::tokio_instant(phases.drain_end)));

    let ending = loop {
        let now = clock::now();
        let sending = now < phases.end;
        if !writing && ((sending && window.has_room()) || !control.is_empty()) {
            out.clear();
            out.append(&mut control);
            if sending {
                encode_free_slots(ctx, &mut out, &mut payload, &mut window, now);
            }
            write.set(send_all(&stream, std::mem::take(&mut out)));
            writing = true;
        }
        if !sending && !writing && window.in_flight() == 0 {
            break Ending::Clean;
        }
        let wake = tokio::select! {
            biased;
            (result, buf) = &mut read => Wake::Read(result, buf),
            (result, buf) = &mut write, if writing => Wake::Written(result, buf),
            () = &mut drain_over => Wake::DrainOver,
        };
        match wake {
            Wake::Read(result, buf) => {
                reader.restore(buf);
                if !matches!(result, Ok(n) if n > 0) {
                    ctx.stats.borrow_mut().error(ErrorKind::ConnectionLost);
                    break Ending::Failed { read_pending: false, write_pending: writing };
                }
                if !on_read(ctx, &mut reader, &mut window, &mut control) {
                    break Ending::Failed { read_pending: false, write_pending: writing };
                }
                read.set(recv_more(&stream, reader.take_buffer()));
            }
            Wake::Written(result, buf) => {
                writing = false;
                out = buf;
                if result.is_err() {
                    ctx.stats.borrow_mut().error(ErrorKind::WriteFailed);
                    break Ending::Failed { read_pending: true, write_pending: false };
                }
            }
            Wake::DrainOver => {
                let missing = window.in_flight_sent_at().filter(|&at| phases.measured(at)).count() as u64;
                ctx.stats.borrow_mut().errors_n(ErrorKind::EchoTimeout, missing);
                if writing {
                    break Ending::Failed { read_pending: true, write_pending: true };
                }
                break Ending::Clean;
            }
        }
    };

    match ending {
        Ending::Clean => close_while_reading(&stream, &mut reader, read, true).await,
        Ending::Failed { read_pending, write_pending } => {
            // Our Close answering the server's, when it can go out on its own.
            if !write_pending && !control.is_empty() {
                let _ = send_all(&stream, control).await;
            }
            let _ = stream.shutdown(Shutdown::Both);
            if write_pending {
                let _ = write.await;
            }
            if read_pending {
                let _ = read.await;
            }
        }
    }
}

/// Fills every free slot of the window: one masked frame per slot into `out`, each stamped `now`
/// (the write carrying them starts next), counted as sent.
fn encode_free_slots(ctx: &ThreadCtx, out: &mut Vec<u8>, payload: &mut [u8], window: &mut Window, now: u64) {
    let measured = ctx.phases.measured(now);
    let mut stats = ctx.stats.borrow_mut();
    while let Some(seq) = window.push(now) {
        payload::fill(payload, seq, now);
        write_frame(out, OpCode::Binary, payload, Some(mask_key()));
        if measured {
            stats.counters.messages_sent += 1;
        }
        stats.counters.total_sent += 1;
    }
}

/// Verifies and records every complete echo in the reader's buffer against the oldest message in
/// flight (echoes come back in order), and answers Pings into `control`. `false` when the
/// connection is finished: the server broke the protocol, or closed it (our Close is then in
/// `control`).
fn on_read(ctx: &ThreadCtx, reader: &mut FrameReader, window: &mut Window, control: &mut Vec<u8>) -> bool {
    let size = ctx.plan.size;
    let phases = ctx.phases;
    let now = clock::now();
    let mut stats = ctx.stats.borrow_mut();
    let drained = reader.drain_messages(control, |echo| match window.pop() {
        Some((seq, sent_at)) if payload::verify(echo, size, seq, sent_at) => {
            stats.received(clock::ns_to_us(now.saturating_sub(sent_at)), phases.measured(sent_at));
        }
        _ => stats.error(ErrorKind::EchoMismatch),
    });
    match drained {
        Drained::Open => true,
        Drained::Broken => {
            stats.error(ErrorKind::ProtocolError);
            false
        }
        Drained::Closed(_) => {
            stats.error(ErrorKind::ServerClosed);
            put_close(control);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::Window;

    /// Fills every free slot at `at`, as the sender does before each write; returns the sequence
    /// numbers sent.
    fn fill(window: &mut Window, at: u64) -> Vec<u64> {
        std::iter::from_fn(|| window.push(at)).collect()
    }

    #[test]
    fn the_sender_keeps_depth_messages_outstanding() {
        let mut window = Window::new(8);
        assert_eq!(fill(&mut window, 100), (0..8).collect::<Vec<_>>());
        assert_eq!(window.in_flight(), 8);
        assert!(!window.has_room() && window.push(101).is_none(), "a ninth message went out");

        // Echoes free slots; the next write refills exactly those, so after every write 8 are in
        // flight again, and every echo pairs with its own message's send time, across many turns
        // of the ring.
        let mut expected: VecDeque<(u64, u64)> = (0..8).map(|seq| (seq, 100)).collect();
        for round in 1..=50u64 {
            let echoes = round % 8 + 1;
            for _ in 0..echoes {
                assert_eq!(window.pop(), expected.pop_front(), "round {round}");
            }
            assert_eq!(window.in_flight(), 8 - echoes);
            let at = 100 + round;
            let sent = fill(&mut window, at);
            assert_eq!(sent.len() as u64, echoes, "round {round} refilled the wrong number of slots");
            expected.extend(sent.into_iter().map(|seq| (seq, at)));
            assert_eq!(window.in_flight(), 8);
        }
        assert!(window.sent > 8 * 20, "the ring turned only {} times", window.sent / 8);
    }

    #[test]
    fn an_echo_with_nothing_in_flight_is_unexpected() {
        let mut window = Window::new(2);
        assert_eq!(window.pop(), None);
        assert_eq!(window.push(5), Some(0));
        assert_eq!(window.pop(), Some((0, 5)));
        assert_eq!(window.pop(), None);
        assert_eq!(window.in_flight(), 0);
    }

    #[test]
    fn the_messages_in_flight_are_listed_oldest_first() {
        let mut window = Window::new(3);
        for at in [10, 20, 30] {
            window.push(at);
        }
        window.pop();
        window.push(40);
        assert_eq!(window.in_flight_sent_at().collect::<Vec<_>>(), [20, 30, 40]);
    }
}
