//! One thread's pacing: a hashed timer wheel of "wake connection `slot` at time t", with ticks of
//! `--timer-slack`, so that every connection due in one tick is handled in one loop turn and its
//! sends leave in one submission.
//!
//! Why a wheel and not one kernel timeout per message: each armed hrtimer is a timer
//! reprogramming, in a virtual machine a VM exit (measured on this machine kind: per-message
//! timeouts cost about three times the CPU of the whole echo). Here the loop arms one timeout per
//! turn, for the earliest non-empty tick, as the timeout of its wait.
//!
//! Layout: due times are rounded *up* to a tick. Ticks within one turn of the wheel
//! ([`BUCKETS`] ticks) sit in buckets, with a bitmap of the non-empty ones so that the next due
//! tick is found in a few word scans; ticks further out (a connection sending 3 times a second
//! waits ~333 ms, several turns at 50 µs ticks) wait in a heap and move into the buckets as they
//! come within a turn.
//!
//! Must never: fire an entry before its due time (an early send would understate latency), or
//! lose one.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Buckets in one turn of the wheel (a power of two, a multiple of 64).
pub const BUCKETS: usize = 4096;
const WORDS: usize = BUCKETS / 64;

/// The wheel. Entries are `(tick, slot)`; the slot means something to the caller only.
pub struct Wheel {
    tick_ns: u64,
    buckets: Box<[Vec<(u64, u32)>]>,
    /// Bit `b` set when bucket `b` is non-empty.
    occupied: [u64; WORDS],
    /// The next tick to sweep: every tick before it has fired. Buckets hold ticks in
    /// `current..current + BUCKETS` only.
    current: u64,
    far: BinaryHeap<Reverse<(u64, u32)>>,
    len: usize,
}

impl Wheel {
    /// A wheel with ticks of `tick_ns` nanoseconds (at least 1), starting at time `now`.
    pub fn new(tick_ns: u64, now: u64) -> Wheel {
        let tick_ns = tick_ns.max(1);
        Wheel {
            tick_ns,
            buckets: (0..BUCKETS).map(|_| Vec::new()).collect(),
            occupied: [0; WORDS],
            current: now / tick_ns,
            far: BinaryHeap::new(),
            len: 0,
        }
    }

    /// Entries waiting.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// When an entry for `due` would fire: `due` rounded up to a tick, or the next sweep for a
    /// time already past. Callers compare these, not raw due times, to tell whether an entry they
    /// have pending already covers a new due time.
    pub fn fire_time(&self, due: u64) -> u64 {
        due.div_ceil(self.tick_ns).max(self.current) * self.tick_ns
    }

    /// Schedules `slot` for `due` (run clock, ns); returns [`Wheel::fire_time`].
    pub fn insert(&mut self, due: u64, slot: u32) -> u64 {
        let tick = due.div_ceil(self.tick_ns).max(self.current);
        self.len += 1;
        if tick < self.current + BUCKETS as u64 {
            self.put_near(tick, slot);
        } else {
            self.far.push(Reverse((tick, slot)));
        }
        tick * self.tick_ns
    }

    fn put_near(&mut self, tick: u64, slot: u32) {
        let bucket = (tick % BUCKETS as u64) as usize;
        self.buckets[bucket].push((tick, slot));
        self.occupied[bucket / 64] |= 1 << (bucket % 64);
    }

    /// When the earliest entry fires (run clock, ns), if there is one.
    pub fn next_due(&self) -> Option<u64> {
        let near = self.first_occupied().map(|offset| self.current + offset);
        let far = self.far.peek().map(|Reverse((tick, _))| *tick);
        let tick = match (near, far) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(tick * self.tick_ns)
    }

    /// Ticks from `current` to the first non-empty bucket, scanning the bitmap circularly.
    fn first_occupied(&self) -> Option<u64> {
        let start = (self.current % BUCKETS as u64) as usize;
        let (word, bit) = (start / 64, start % 64);
        // The start word from `bit` on, then every other word, then the start word below `bit`.
        let first = self.occupied[word] & (!0u64 << bit);
        if first != 0 {
            return Some((first.trailing_zeros() as usize - bit) as u64);
        }
        for step in 1..WORDS {
            let w = (word + step) % WORDS;
            if self.occupied[w] != 0 {
                let at = w * 64 + self.occupied[w].trailing_zeros() as usize;
                return Some(((at + BUCKETS - start) % BUCKETS) as u64);
            }
        }
        let low = self.occupied[word] & !(!0u64 << bit);
        (low != 0).then(|| (BUCKETS - bit + low.trailing_zeros() as usize) as u64)
    }

    /// Moves every entry whose tick is at or before `now` into `fired` (in no particular order)
    /// and advances the wheel past `now`.
    pub fn expire(&mut self, now: u64, fired: &mut Vec<u32>) {
        let last = now / self.tick_ns;
        if last < self.current {
            return;
        }
        let before = fired.len();
        // Buckets hold ticks below current + BUCKETS, so past that everything near has fired.
        let sweep_end = last.min(self.current + BUCKETS as u64 - 1);
        let mut tick = self.current;
        while tick <= sweep_end {
            let bucket = (tick % BUCKETS as u64) as usize;
            let (word, bit) = (bucket / 64, bucket % 64);
            if self.occupied[word] >> bit == 0 {
                // Nothing in this word from here on: skip to the next word.
                tick += (64 - bit) as u64;
                continue;
            }
            if self.occupied[word] & (1 << bit) != 0 {
                fired.extend(self.buckets[bucket].drain(..).map(|(_, slot)| slot));
                self.occupied[word] &= !(1 << bit);
            }
            tick += 1;
        }
        self.current = last + 1;
        while let Some(&Reverse((tick, slot))) = self.far.peek() {
            if tick <= last {
                fired.push(slot);
            } else if tick < self.current + BUCKETS as u64 {
                self.put_near(tick, slot);
            } else {
                break;
            }
            self.far.pop();
        }
        self.len -= fired.len() - before;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fires everything due by `now`, sorted, for comparing.
    fn expire(wheel: &mut Wheel, now: u64) -> Vec<u32> {
        let mut fired = Vec::new();
        wheel.expire(now, &mut fired);
        fired.sort_unstable();
        fired
    }

    #[test]
    fn entries_fire_at_their_tick_never_before() {
        let mut wheel = Wheel::new(50, 0);
        assert_eq!(wheel.insert(120, 1), 150, "rounded up to the tick");
        assert_eq!(wheel.insert(150, 2), 150);
        assert_eq!(wheel.insert(151, 3), 200);
        assert_eq!(wheel.next_due(), Some(150));
        assert!(expire(&mut wheel, 149).is_empty());
        assert_eq!(expire(&mut wheel, 150), [1, 2]);
        assert_eq!(wheel.next_due(), Some(200));
        assert_eq!(expire(&mut wheel, 1_000), [3]);
        assert_eq!((wheel.len(), wheel.next_due()), (0, None));
    }

    #[test]
    fn a_time_already_past_fires_at_the_next_sweep() {
        let mut wheel = Wheel::new(10, 1_000);
        wheel.expire(1_000, &mut Vec::new());
        assert_eq!(wheel.insert(5, 7), 1_010);
        assert_eq!(expire(&mut wheel, 1_010), [7]);
    }

    #[test]
    fn far_entries_move_in_and_fire_in_order_across_many_turns() {
        let tick = 50;
        let span = tick * BUCKETS as u64;
        let mut wheel = Wheel::new(tick, 0);
        // Due times over ten turns of the wheel, inserted out of order.
        let dues: Vec<u64> = (0..2_000u64).map(|i| (i * 7_919 % 2_000) * span / 200 + i % 3).collect();
        for (slot, &due) in dues.iter().enumerate() {
            wheel.insert(due, slot as u32);
        }
        let mut now = 0;
        let mut seen = vec![false; dues.len()];
        while wheel.len() > 0 {
            let next = wheel.next_due().expect("entries are waiting");
            assert!(next >= now, "the next due time went backwards");
            now = next;
            for slot in expire(&mut wheel, now) {
                let due = dues[slot as usize];
                assert!(due <= now, "slot {slot} due {due} fired early at {now}");
                assert!(now - due < tick, "slot {slot} due {due} fired late at {now}");
                assert!(!seen[slot as usize], "slot {slot} fired twice");
                seen[slot as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "an entry was lost");
    }

    #[test]
    fn a_long_sleep_fires_everything_that_came_due() {
        let mut wheel = Wheel::new(1, 0);
        for slot in 0..100u32 {
            wheel.insert(u64::from(slot) * 97, slot);
        }
        // Far past a whole turn of the wheel.
        assert_eq!(expire(&mut wheel, 10 * BUCKETS as u64).len(), 100);
        assert_eq!(wheel.len(), 0);
        // The wheel still works from where it is now.
        wheel.insert(10 * BUCKETS as u64 + 5, 1);
        assert_eq!(wheel.next_due(), Some(10 * BUCKETS as u64 + 5));
    }

    #[test]
    fn the_bitmap_search_wraps_around_the_wheel() {
        let mut wheel = Wheel::new(1, 0);
        wheel.expire(BUCKETS as u64 - 3, &mut Vec::new());
        // Current sits three buckets before the end; the entry's bucket is past the wrap.
        wheel.insert(BUCKETS as u64 + 10, 4);
        assert_eq!(wheel.next_due(), Some(BUCKETS as u64 + 10));
        wheel.insert(BUCKETS as u64 - 1, 5);
        assert_eq!(wheel.next_due(), Some(BUCKETS as u64 - 1));
        assert_eq!(expire(&mut wheel, BUCKETS as u64 + 10), [4, 5]);
    }
}
