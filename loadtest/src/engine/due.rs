//! What an open-loop sender owes when it wakes: every message whose intended time has passed goes
//! into one buffer, each stamped with its own intended time, and is counted (sent, late, send lag).
//! Shared by echo's open loop and pub/sub's publishers, so both schedule and count alike.
//!
//! Must never: stamp a message with the time it actually left, or skip one that is due.

use super::LATE_THRESHOLD;
use super::env::Env;
use super::wire::{Compression, put_message};
use crate::clock;
use crate::payload;
use crate::schedule::Schedule;

/// Encodes, as masked client frames into `out` (compressed as `compression` says), every message
/// from `*sent` on whose intended time is due by `env.now` and before the end of the run; advances
/// `*sent` past them. Each message's tag is
/// `tag_base | index`. `on_encoded(next, measured)` runs after each one, with the new `*sent` and
/// whether the message falls in the measured window.
pub fn encode_due(
    env: &mut Env<'_>,
    out: &mut Vec<u8>,
    compression: &mut Compression,
    schedule: &Schedule,
    sent: &mut u64,
    tag_base: u64,
    mut on_encoded: impl FnMut(u64, bool),
) {
    let phases = env.phases;
    let stats = &mut *env.stats;
    let payload = &mut *env.scratch;
    let compressors = &mut *env.compressors;
    let late = LATE_THRESHOLD.as_nanos() as u64;
    let now = env.now;
    loop {
        let at = schedule.at(*sent);
        if at > now || at >= phases.end {
            break;
        }
        payload::fill(payload, tag_base | *sent, at);
        put_message(out, payload, compression, compressors, &mut stats.counters.sent_bytes);
        let lag = now - at;
        let measured = phases.measured(at);
        if measured {
            stats.counters.messages_sent += 1;
            stats.send_lag.saturating_record(clock::ns_to_us(lag));
            if lag > late {
                stats.counters.late_sends += 1;
            }
        }
        stats.counters.total_sent += 1;
        *sent += 1;
        on_encoded(*sent, measured);
    }
}
