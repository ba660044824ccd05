//! Deadlines without a timer object per connection: a hashed timer wheel over the worker's clock.
//!
//! A connection keeps its deadline as a 4-byte [`Millis`]; the wheel holds at most about one 12-byte
//! entry per connection. A deadline that moves later (traffic on an idle timer, the common case)
//! costs nothing: when the old entry comes due the worker sees the later deadline and schedules it
//! again. A deadline that moves earlier gets a new entry; the old one is recognised as stale when
//! it fires. This is uSockets' tick sweep made exact enough for the close and linger timeouts (a
//! few milliseconds of resolution).
//!
//! Two levels: deadlines within one turn of the wheel (4 s) sit in its buckets, so the next one due
//! is found by looking at the first non-empty bucket; deadlines further away (idle timeouts, tens
//! of seconds) wait in a plain list that is looked through once a second and moved into the wheel
//! as they come within reach. The loop asks for the next wake-up on every turn: that must not cost
//! a walk over every idle connection.
//!
//! Must never: fire a deadline early, or lose one.

use std::time::Duration;

use crate::io::clock::Millis;

/// Milliseconds per bucket: the resolution of every timeout.
pub const TICK_MS: u32 = 4;
/// Buckets in the wheel: it spans `BUCKETS * TICK_MS` ms (4 s) per turn.
const BUCKETS: usize = 1024;
/// How often deadlines beyond the wheel's span are looked through.
const FAR_SCAN_MS: u32 = 1000;

/// One scheduled deadline: whose, and for when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The connection's slot and generation (opaque to the wheel).
    pub key: (u32, u32),
    /// The deadline it was scheduled for.
    pub at: Millis,
}

/// The hashed wheel and its list of far deadlines.
pub struct Wheel {
    /// Bucket `t % BUCKETS` holds the entries of tick `t`, for ticks from `next_tick` up to a turn
    /// ahead only.
    buckets: Box<[Vec<Entry>]>,
    /// The next tick to sweep: every bucket before it has been swept.
    next_tick: u32,
    /// Entries in the buckets.
    near: usize,
    /// Deadlines a turn or more ahead.
    far: Vec<Entry>,
    /// When `far` is next looked through.
    next_far_scan: Millis,
}

impl Default for Wheel {
    fn default() -> Self {
        Wheel {
            buckets: (0..BUCKETS).map(|_| Vec::new()).collect(),
            next_tick: 0,
            near: 0,
            far: Vec::new(),
            next_far_scan: Millis(FAR_SCAN_MS),
        }
    }
}

fn tick_of(at: Millis) -> u32 {
    at.0 / TICK_MS
}

impl Wheel {
    /// Schedules `key` for `at`. An `at` already past fires on the next sweep.
    pub fn schedule(&mut self, key: (u32, u32), at: Millis) {
        let entry = Entry { key, at };
        let ahead = tick_of(at).wrapping_sub(self.next_tick) as i32;
        if ahead >= BUCKETS as i32 {
            self.far.push(entry);
            return;
        }
        // A deadline in a tick already swept goes into the next one to be swept.
        let tick = if ahead < 0 { self.next_tick } else { tick_of(at) };
        self.buckets[tick as usize % BUCKETS].push(entry);
        self.near += 1;
    }

    /// Scheduled entries (stale ones included).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.near + self.far.len()
    }

    /// Whether nothing is scheduled.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hands out the entries due at `now` (stale or not: the caller compares with the
    /// connection's own deadline). Ticks wholly before `now` are swept and left behind; the current
    /// tick's bucket gives up only what is due.
    pub fn expire(&mut self, now: Millis, due: &mut Vec<Entry>) {
        let now_tick = tick_of(now);
        let mut swept = 0;
        while (now_tick.wrapping_sub(self.next_tick) as i32) > 0 && swept < BUCKETS {
            self.take_due(self.next_tick, now, due);
            self.next_tick = self.next_tick.wrapping_add(1);
            swept += 1;
        }
        if swept == BUCKETS {
            // A long stall: every bucket was visited once; resume from now.
            self.next_tick = now_tick;
        }
        self.take_due(now_tick, now, due);
        if self.next_far_scan.is_at_or_before(now) {
            self.next_far_scan = now.after(Duration::from_millis(u64::from(FAR_SCAN_MS)));
            self.bring_near(now, due);
        }
    }

    /// Moves the far deadlines that came within a turn of the wheel into it (or hands them out,
    /// if due already).
    fn bring_near(&mut self, now: Millis, due: &mut Vec<Entry>) {
        let mut far = std::mem::take(&mut self.far);
        far.retain(|entry| {
            if entry.at.is_at_or_before(now) {
                due.push(*entry);
                return false;
            }
            let ahead = tick_of(entry.at).wrapping_sub(self.next_tick) as i32;
            if ahead >= BUCKETS as i32 {
                return true;
            }
            self.buckets[tick_of(entry.at) as usize % BUCKETS].push(*entry);
            self.near += 1;
            false
        });
        if far.capacity() > 64 && far.len() < far.capacity() / 4 {
            far.shrink_to(far.len() * 2);
        }
        self.far = far;
    }

    fn take_due(&mut self, tick: u32, now: Millis, due: &mut Vec<Entry>) {
        let bucket = &mut self.buckets[tick as usize % BUCKETS];
        let before = bucket.len();
        bucket.retain(|entry| {
            if entry.at.is_at_or_before(now) {
                due.push(*entry);
                false
            } else {
                true
            }
        });
        self.near -= before - bucket.len();
        if bucket.is_empty() && bucket.capacity() > 64 {
            *bucket = Vec::new();
        }
    }

    /// How long the worker may sleep before something is due (`None`: nothing is scheduled):
    /// the earliest deadline in the first non-empty bucket, or the next look at the far list.
    pub fn next_wake(&self, now: Millis) -> Option<Duration> {
        if self.near > 0 {
            for ahead in 0..BUCKETS as u32 {
                let tick = self.next_tick.wrapping_add(ahead);
                let bucket = &self.buckets[tick as usize % BUCKETS];
                if let Some(at) = bucket.iter().map(|e| e.at).reduce(Millis::earliest) {
                    return Some(now.until(at.earliest(self.next_far_scan)));
                }
            }
        }
        (!self.far.is_empty()).then(|| now.until(self.next_far_scan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(wheel: &mut Wheel, now: u32) -> Vec<(u32, u32)> {
        let mut due = Vec::new();
        wheel.expire(Millis(now), &mut due);
        due.into_iter().map(|e| e.key).collect()
    }

    #[test]
    fn a_deadline_fires_once_not_early_and_not_lost() {
        let mut wheel = Wheel::default();
        wheel.schedule((1, 0), Millis(10));
        assert!(fired(&mut wheel, 9).is_empty());
        assert_eq!(fired(&mut wheel, 10), [(1, 0)]);
        assert!(fired(&mut wheel, 20).is_empty());
        assert!(wheel.is_empty());
    }

    #[test]
    fn a_deadline_beyond_one_turn_waits_for_its_round() {
        let mut wheel = Wheel::default();
        let far = TICK_MS * BUCKETS as u32 * 3 + 7;
        wheel.schedule((2, 5), Millis(far));
        for now in (0..far).step_by(500) {
            assert!(fired(&mut wheel, now).is_empty(), "fired early at {now}");
        }
        assert_eq!(fired(&mut wheel, far), [(2, 5)]);
    }

    #[test]
    fn a_deadline_later_in_the_current_tick_is_not_skipped() {
        let mut wheel = Wheel::default();
        wheel.schedule((1, 0), Millis(102));
        assert!(fired(&mut wheel, 101).is_empty(), "its tick is swept, it is not yet due");
        assert_eq!(fired(&mut wheel, 102), [(1, 0)], "and it is still there when it is");
    }

    #[test]
    fn a_far_deadline_is_brought_near_in_time_and_fires_on_time() {
        let mut wheel = Wheel::default();
        wheel.schedule((9, 1), Millis(30_000));
        assert_eq!(wheel.len(), 1);
        let mut now = 0;
        while now < 30_000 {
            assert!(fired(&mut wheel, now).is_empty(), "fired early at {now}");
            let wake = wheel.next_wake(Millis(now)).expect("scheduled");
            assert!(wake <= Duration::from_millis(u64::from(FAR_SCAN_MS)), "slept past a far scan");
            now += (wake.as_millis() as u32).max(1);
        }
        assert_eq!(now, 30_000, "woken exactly at the deadline");
        assert_eq!(fired(&mut wheel, 30_000), [(9, 1)]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn a_deadline_already_past_fires_on_the_next_sweep() {
        let mut wheel = Wheel::default();
        assert!(fired(&mut wheel, 100).is_empty());
        wheel.schedule((3, 0), Millis(50));
        assert_eq!(fired(&mut wheel, 101), [(3, 0)]);
    }

    #[test]
    fn the_next_wake_is_no_later_than_the_earliest_deadline() {
        let mut wheel = Wheel::default();
        assert_eq!(wheel.next_wake(Millis(0)), None);
        wheel.schedule((1, 0), Millis(37));
        wheel.schedule((2, 0), Millis(900));
        let wake = wheel.next_wake(Millis(0)).expect("scheduled");
        assert_eq!(wake, Duration::from_millis(37));
    }
}
