//! What an established connection does, by mode: the part of its state machine that sends
//! messages and checks what comes back. The connection (`conn`) owns the socket and the closing
//! handshake; this decides what to send and when, and when the connection is finished.
//!
//! - Open loop (`--rate R`): message `k` is intended at `t0 + k / R` whatever the echoes do; each
//!   echo's latency is measured from that intended time (coordinated-omission correction, as
//!   wrk2 does). Messages that came due while a write was in flight go out together in the next
//!   one, each stamped with its own intended time, and the late ones are counted. Nothing is
//!   skipped.
//! - Closed loop (`--rate 0`, `--pipeline N`): N messages in flight, each echo frees a slot and
//!   the next write refills every free slot, stamped when the write is built. N = 1 is ping-pong.
//! - Hold (`--mode connect`): nothing is sent; the connection stays open until the end.
//! - Pubsub: a subscriber checks every delivery; a publisher sends on its open-loop schedule once
//!   every subscriber has settled (`pubsub`).
//!
//! Must never: stamp an open-loop message with its actual send time, skip a scheduled message,
//! have more than N closed-loop messages in flight, or finish a connection whose echoes may still
//! come before the drain deadline.

use super::due::encode_due;
use super::env::Env;
use super::pubsub::{self, Publisher, Role, Tracker};
use super::window::Window;
use super::wire::{Compression, put_message};
use crate::clock;
use crate::payload;
use crate::schedule::Schedule;
use crate::stats::ErrorKind;

/// One established connection's traffic.
pub enum Traffic {
    /// Echo, open loop.
    Open(OpenLoop),
    /// Echo, closed loop with a window of messages in flight.
    Closed(Window),
    /// Connect mode: idle until the end.
    Hold,
    /// Pubsub subscriber.
    Subscribe(Tracker),
    /// Pubsub publisher.
    Publish(Publisher),
}

/// Open-loop progress: messages sent and echoes received, both counted from 0.
pub struct OpenLoop {
    schedule: Schedule,
    sent: u64,
    received: u64,
}

impl Traffic {
    /// The traffic of a connection that completed its handshake at `env.now`.
    pub fn new(env: &Env<'_>, role: Option<Role>) -> Traffic {
        let plan = env.plan;
        match (role, env.pubsub) {
            (Some(Role::Subscriber { topic, node }), Some(shared)) => {
                Traffic::Subscribe(Tracker::new(shared, topic, node))
            }
            (Some(Role::Publisher { id, .. }), _) => {
                Traffic::Publish(Publisher::new(id, plan.rate.unwrap_or(1.0)))
            }
            _ => match (plan.mode, plan.rate) {
                (crate::cli::Mode::Echo, Some(rate)) => Traffic::Open(OpenLoop {
                    schedule: Schedule::staggered(env.now, rate),
                    sent: 0,
                    received: 0,
                }),
                (crate::cli::Mode::Echo, None) => Traffic::Closed(Window::new(plan.pipeline)),
                _ => Traffic::Hold,
            },
        }
    }

    /// A data message arrived.
    pub fn on_message(&mut self, env: &mut Env<'_>, payload: &[u8]) {
        let size = env.plan.size;
        let now = env.now;
        match self {
            Traffic::Open(open) => {
                let seq = open.received;
                if seq >= open.sent {
                    env.stats.error(ErrorKind::EchoMismatch);
                    return;
                }
                open.received = seq + 1;
                let at = open.schedule.at(seq);
                if !payload::verify(payload, size, seq, at) {
                    env.stats.error(ErrorKind::EchoMismatch);
                    return;
                }
                env.stats.received(clock::ns_to_us(now.saturating_sub(at)), env.phases.measured(at));
            }
            Traffic::Closed(window) => match window.pop() {
                Some((seq, sent_at)) if payload::verify(payload, size, seq, sent_at) => {
                    env.stats
                        .received(clock::ns_to_us(now.saturating_sub(sent_at)), env.phases.measured(sent_at));
                }
                _ => env.stats.error(ErrorKind::EchoMismatch),
            },
            Traffic::Subscribe(tracker) => {
                if let Some(shared) = env.pubsub {
                    tracker.on_message(env, shared, payload);
                }
            }
            // A publisher may get its topic's messages back (the server's choice); a held
            // connection expects nothing and checks nothing.
            Traffic::Publish(_) | Traffic::Hold => {}
        }
    }

    /// Appends to `out` what is to be sent now, compressed as `compression` says. Only called when
    /// no write is in flight, so that a send's lateness is measured when it really leaves.
    pub fn fill(&mut self, env: &mut Env<'_>, out: &mut Vec<u8>, compression: &mut Compression) {
        match self {
            Traffic::Open(open) => {
                encode_due(env, out, compression, &open.schedule, &mut open.sent, 0, |_, _| {})
            }
            Traffic::Closed(window) => {
                if env.now >= env.phases.end || !window.has_room() {
                    return;
                }
                let measured = env.phases.measured(env.now);
                while let Some(seq) = window.push(env.now) {
                    payload::fill(env.scratch, seq, env.now);
                    put_message(
                        out,
                        env.scratch,
                        compression,
                        env.compressors,
                        &mut env.stats.counters.sent_bytes,
                    );
                    if measured {
                        env.stats.counters.messages_sent += 1;
                    }
                    env.stats.counters.total_sent += 1;
                }
            }
            Traffic::Publish(publisher) => {
                if let Some(shared) = env.pubsub {
                    publisher.fill(env, shared, out, compression);
                }
            }
            Traffic::Subscribe(_) | Traffic::Hold => {}
        }
    }

    /// When the connection must next be woken (a message due, the end, the drain deadline);
    /// `writing` when a write is in flight (its completion wakes the connection for what is due).
    pub fn next_wake(&self, env: &Env<'_>, writing: bool) -> Option<u64> {
        let phases = env.phases;
        match self {
            // A write that never completes (a server that stopped reading) must not hold the
            // connection past the drain deadline.
            Traffic::Open(_) | Traffic::Publish(_) if writing => Some(phases.drain_end),
            Traffic::Open(open) => {
                let due = open.schedule.at(open.sent);
                if due < phases.end {
                    Some(due)
                } else if open.received < open.sent {
                    Some(phases.drain_end)
                } else {
                    // Everything is back: close at the end, with everyone else.
                    Some(phases.end)
                }
            }
            Traffic::Closed(window) => {
                if env.now < phases.end {
                    Some(phases.end)
                } else {
                    (window.in_flight() > 0).then_some(phases.drain_end)
                }
            }
            Traffic::Hold => Some(phases.end),
            Traffic::Subscribe(_) => {
                if env.now < phases.end {
                    Some(phases.end)
                } else {
                    Some((env.now + pubsub::CHECK_EVERY.as_nanos() as u64).min(phases.drain_end))
                }
            }
            Traffic::Publish(publisher) => publisher.next_wake(env),
        }
    }

    /// Whether the connection has done its part and may close: everything sent and echoed (or
    /// the drain deadline passed, counting what is missing), or the end reached.
    pub fn finished(&mut self, env: &mut Env<'_>) -> bool {
        let phases = env.phases;
        let now = env.now;
        match self {
            Traffic::Open(open) => {
                if now < phases.drain_end {
                    // Not before the end: connections that finish early would otherwise close
                    // while the others still send, and 10,000 closes in a connection's last
                    // period made sends late (measured: a third of a run's late sends came in
                    // that last period).
                    return now >= phases.end
                        && open.schedule.at(open.sent) >= phases.end
                        && open.received >= open.sent;
                }
                let missing = (open.received..open.sent)
                    .filter(|&k| phases.measured(open.schedule.at(k)))
                    .count() as u64;
                env.stats.errors_n(ErrorKind::EchoTimeout, missing);
                let not_sent = (open.sent..)
                    .map(|k| open.schedule.at(k))
                    .take_while(|&at| at < phases.end)
                    .filter(|&at| phases.measured(at))
                    .count() as u64;
                env.stats.errors_n(ErrorKind::NotSent, not_sent);
                open.received = open.sent;
                true
            }
            Traffic::Closed(window) => {
                if now < phases.end {
                    return false;
                }
                if window.in_flight() == 0 {
                    return true;
                }
                if now < phases.drain_end {
                    return false;
                }
                let missing = window.in_flight_sent_at().filter(|&at| phases.measured(at)).count() as u64;
                env.stats.errors_n(ErrorKind::EchoTimeout, missing);
                while window.pop().is_some() {}
                true
            }
            Traffic::Hold => now >= phases.end,
            Traffic::Subscribe(tracker) => {
                now >= phases.end
                    && (now >= phases.drain_end || env.pubsub.is_none_or(|shared| tracker.complete(shared)))
            }
            Traffic::Publish(publisher) => {
                now >= phases.drain_end || (now >= phases.end && publisher.finished(env))
            }
        }
    }

    /// The connection's socket is gone (cleanly or not). Returns `true` when nothing is left to
    /// do; `false` for a subscriber that must wait for the publishers to finish before it can
    /// count what it missed (call [`Traffic::linger`] until it returns `true`).
    pub fn ended(&mut self, env: &mut Env<'_>) -> bool {
        match self {
            Traffic::Publish(publisher) => {
                if let Some(shared) = env.pubsub {
                    publisher.done(shared);
                }
                true
            }
            Traffic::Subscribe(_) => self.linger(env),
            _ => true,
        }
    }

    /// A subscriber whose socket is gone: once its publishers are done (or the grace period is
    /// over), counts what never arrived as lost and returns `true`.
    pub fn linger(&mut self, env: &mut Env<'_>) -> bool {
        let Traffic::Subscribe(tracker) = self else { return true };
        let Some(shared) = env.pubsub else { return true };
        if env.now < env.phases.drain_end && !tracker.complete(shared) {
            return false;
        }
        tracker.count_missing(shared, env.stats);
        true
    }
}
