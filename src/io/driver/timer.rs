//! Deadlines without a timer object per connection: a per-worker clock in milliseconds and a
//! hashed timer wheel.
//!
//! A connection keeps its deadline as a 4-byte [`Millis`]; the wheel holds at most about one 8-byte
//! entry per connection, in the bucket of the deadline it was scheduled for. A deadline that moves
//! later (traffic on an idle timer, the common case) costs nothing: when the old entry comes due the
//! worker sees the later deadline and schedules it again. A deadline that moves earlier gets a new
//! entry; the old one is recognised as stale when it fires. This is uSockets' tick sweep made exact
//! enough for the close and linger timeouts (a few milliseconds of resolution).
//!
//! Must never: fire a deadline early, or lose one (an entry whose bucket comes round before its
//! time, a deadline beyond the wheel's span, is kept for the next round).

use std::time::{Duration, Instant};

/// Milliseconds on a worker's clock (since the worker started), wrapping after 49 days; compared
/// with wrapping arithmetic, so any two deadlines less than 24 days apart compare correctly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Millis(pub u32);

impl Millis {
    /// Whether `self` is at or before `other`.
    pub fn is_at_or_before(self, other: Millis) -> bool {
        other.0.wrapping_sub(self.0) as i32 >= 0
    }

    /// `self` plus `duration` (saturating at the 24-day horizon the comparisons allow).
    pub fn after(self, duration: Duration) -> Millis {
        let ms = duration.as_millis().min(i32::MAX as u128 / 2) as u32;
        Millis(self.0.wrapping_add(ms))
    }

    /// How long from `self` until `later` (zero when `later` is not after `self`).
    pub fn until(self, later: Millis) -> Duration {
        let diff = later.0.wrapping_sub(self.0) as i32;
        Duration::from_millis(diff.max(0) as u64)
    }

    /// The earlier of two deadlines.
    pub fn earliest(self, other: Millis) -> Millis {
        if self.is_at_or_before(other) { self } else { other }
    }
}

/// A worker's clock: [`Millis`] since it started.
pub struct Clock {
    start: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock { start: Instant::now() }
    }
}

impl Clock {
    /// Now, in milliseconds since the worker started (rounded down).
    pub fn now(&self) -> Millis {
        Millis(self.start.elapsed().as_millis() as u32)
    }
}

/// Milliseconds per bucket: the resolution of every timeout.
pub const TICK_MS: u32 = 4;
/// Buckets in the wheel: it spans `BUCKETS * TICK_MS` ms (4 s) per turn.
const BUCKETS: usize = 1024;

/// One scheduled deadline: whose, and for when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The connection's slot and generation (opaque to the wheel).
    pub key: (u32, u32),
    /// The deadline it was scheduled for.
    pub at: Millis,
}

/// The hashed wheel.
pub struct Wheel {
    buckets: Box<[Vec<Entry>]>,
    /// The next tick to sweep: every bucket before it has been swept.
    next_tick: u32,
    len: usize,
}

impl Default for Wheel {
    fn default() -> Self {
        Wheel { buckets: (0..BUCKETS).map(|_| Vec::new()).collect(), next_tick: 0, len: 0 }
    }
}

fn tick_of(at: Millis) -> u32 {
    at.0 / TICK_MS
}

impl Wheel {
    /// Schedules `key` for `at`. An `at` already past fires on the next sweep.
    pub fn schedule(&mut self, key: (u32, u32), at: Millis) {
        let tick = tick_of(at);
        // A deadline in a tick already swept goes into the next one to be swept.
        let tick = if (tick.wrapping_sub(self.next_tick) as i32) < 0 { self.next_tick } else { tick };
        self.buckets[tick as usize % BUCKETS].push(Entry { key, at });
        self.len += 1;
    }

    /// Scheduled entries (stale ones included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hands out the entries due at `now` (stale or not: the caller compares with the
    /// connection's own deadline). Ticks wholly before `now` are swept and left behind; the current
    /// tick's bucket gives up only what is due. Entries of a later round stay.
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
        self.len -= before - bucket.len();
        if bucket.is_empty() && bucket.capacity() > 64 {
            *bucket = Vec::new();
        }
    }

    /// How long the worker may sleep before something is due (`None`: nothing is scheduled).
    /// Looks at most one turn of the wheel ahead; a deadline beyond that wakes the worker once per
    /// turn.
    pub fn next_wake(&self, now: Millis) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        let mut earliest: Option<Millis> = None;
        for ahead in 0..BUCKETS as u32 {
            let tick = self.next_tick.wrapping_add(ahead);
            for entry in &self.buckets[tick as usize % BUCKETS] {
                earliest = Some(earliest.map_or(entry.at, |e| e.earliest(entry.at)));
            }
            // Every bucket further on holds only deadlines after this tick.
            if let Some(at) = earliest
                && tick_of(at).wrapping_sub(tick) as i32 <= 0
            {
                break;
            }
        }
        Some(earliest.map_or(Duration::from_millis(u64::from(TICK_MS) * BUCKETS as u64), |at| now.until(at)))
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

    #[test]
    fn clock_comparisons_survive_wrapping() {
        let before = Millis(u32::MAX - 5);
        let after = before.after(Duration::from_millis(10));
        assert!(before.is_at_or_before(after));
        assert!(!after.is_at_or_before(before));
        assert_eq!(before.until(after), Duration::from_millis(10));
        assert_eq!(after.until(before), Duration::ZERO);
    }
}
