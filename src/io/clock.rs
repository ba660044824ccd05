//! A worker's clock: milliseconds since it started, in 4 bytes.
//!
//! Connections keep their deadlines and last activity in this form (two `Instant`s would be 32
//! bytes per connection). Must never: compare two readings more than 24 days apart (the wrapping
//! comparison would be wrong; no deadline of ours is that far away).

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

#[cfg(test)]
mod tests {
    use super::*;

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
