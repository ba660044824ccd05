//! When things are supposed to happen: the run's phases and each connection's open-loop send
//! schedule. Pure arithmetic on the run clock, so the writer and the reader of a connection
//! compute the same intended send time for message `k` independently.
//!
//! Must never: depend on when a message was actually sent (that would re-introduce coordinated
//! omission), or drift (message k's time is computed from k, not by adding periods).

use std::time::Duration;

use crate::cli::Plan;

/// Phase boundaries of a run, in nanoseconds on the run clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phases {
    /// When connection 0 starts.
    pub begin: u64,
    /// When the last connection starts (end of the ramp-up).
    pub ramp_end: u64,
    /// Messages intended at or after this are recorded (after the warmup).
    pub measure_start: u64,
    /// No message is intended at or after this; connections drain and close.
    pub end: u64,
    /// Outstanding echoes that have not arrived by now are counted as timed out.
    pub drain_end: u64,
}

/// How long connections wait for outstanding echoes after the end before counting them as lost.
pub const DRAIN: Duration = Duration::from_secs(3);

/// Pubsub mode's drain: how long subscribers wait after the end for deliveries still in flight
/// before counting what is missing as lost.
pub const PUBSUB_GRACE: Duration = Duration::from_secs(2);

impl Phases {
    /// Lays out a run starting at `begin`.
    pub fn new(plan: &Plan, begin: u64) -> Phases {
        let ramp_end = begin + nanos(plan.ramp());
        let measure_start = ramp_end + nanos(plan.warmup);
        let end = measure_start + nanos(plan.duration);
        let drain = if plan.pubsub.is_some() { PUBSUB_GRACE } else { DRAIN };
        Phases { begin, ramp_end, measure_start, end, drain_end: end + nanos(drain) }
    }

    /// When connection `index` should start.
    pub fn connect_at(&self, index: u32, connect_rate: f64) -> u64 {
        self.begin + (f64::from(index) / connect_rate * 1e9) as u64
    }

    /// Whether a message intended at `at` is inside the measured window.
    pub fn measured(&self, at: u64) -> bool {
        at >= self.measure_start && at < self.end
    }

    /// Where the measured window ended for a run interrupted at `interrupted` (run clock), if it
    /// was: the end, or the interruption if it came first. An interruption before the window began
    /// gives `measure_start`, an empty window, so nothing is divided by time that was not measured.
    pub fn measured_end(&self, interrupted: Option<u64>) -> u64 {
        interrupted.map_or(self.end, |at| at.clamp(self.measure_start, self.end))
    }

    /// Length in seconds of the part of the measured window that was run: all of it (`--duration`)
    /// unless the run was interrupted before the end.
    pub fn measured_secs_until(&self, interrupted: Option<u64>) -> f64 {
        (self.measured_end(interrupted) - self.measure_start) as f64 / 1e9
    }
}

/// One connection's open-loop schedule: message `k` is intended at `start + k / rate`.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    start: u64,
    period_ns: f64,
}

impl Schedule {
    /// A schedule at `rate` messages per second whose first message is at `start`.
    #[cfg(test)]
    pub fn new(start: u64, rate: f64) -> Schedule {
        Schedule { start, period_ns: 1e9 / rate }
    }

    /// A schedule for a connection that opened at `opened`: its first message is put at a random
    /// point within one period so that connections opened together do not send together.
    pub fn staggered(opened: u64, rate: f64) -> Schedule {
        let period_ns = 1e9 / rate;
        let offset = (fastrand::f64() * period_ns) as u64;
        Schedule { start: opened + offset, period_ns }
    }

    /// The intended send time of message `k`.
    pub fn at(&self, k: u64) -> u64 {
        self.start + (k as f64 * self.period_ns) as u64
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_does_not_drift() {
        let schedule = Schedule::new(1_000, 3.0);
        assert_eq!(schedule.at(0), 1_000);
        assert_eq!(schedule.at(3), 1_000 + 1_000_000_000);
        assert_eq!(schedule.at(3_000_000), 1_000 + 1_000_000_000_000_000);
    }

    #[test]
    fn an_interruption_shortens_the_measured_window_and_never_lengthens_it() {
        let second = 1_000_000_000;
        let phases =
            Phases { begin: 0, ramp_end: 0, measure_start: 2 * second, end: 12 * second, drain_end: 0 };
        assert_eq!(phases.measured_secs_until(None), 10.0);
        assert_eq!(phases.measured_secs_until(Some(5 * second)), 3.0);
        // Before the window began: nothing was measured.
        assert_eq!(phases.measured_secs_until(Some(second)), 0.0);
        // During the drain: the whole window was measured.
        assert_eq!(phases.measured_secs_until(Some(13 * second)), 10.0);
        assert_eq!(phases.measured_end(Some(5 * second)), 5 * second);
    }

    #[test]
    fn stagger_stays_within_one_period() {
        for _ in 0..1000 {
            let schedule = Schedule::staggered(5_000, 100.0);
            assert!((5_000..5_000 + 10_000_000).contains(&schedule.at(0)));
        }
    }
}
