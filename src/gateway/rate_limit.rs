//! Per-connection rate limits: how many messages, and how many payload bytes, a client may send
//! each second (`--max-message-rate`, `--max-byte-rate`).
//!
//! Each limit is a token bucket that holds one second of its rate: a client that stays at or
//! under the rate never trips it, whatever its burst pattern within a second, and one that goes
//! over trips it as soon as the second's allowance is spent. A message larger than the whole
//! allowance (a byte rate below `--max-message-size`) passes when the bucket is full and leaves
//! it in debt, so the long-run rate still holds and such a message is not refused forever.
//!
//! The state is two `f32`s per connection (8 bytes inline, no allocation, nothing at all to do
//! when no limit is configured), refilled from the elapsed milliseconds the connection already
//! tracks for its idle timeout. `f32` keeps a fraction of a token between reads that arrive a
//! millisecond apart, and is exact for whole tokens up to 2^24 (16 MiB/s of bytes); above that a
//! bucket rounds to a few bytes, which no limit notices.
//!
//! What counts: every data message (its payload after decompression: what the gateway handles,
//! so a compressed flood is not cheaper than a plain one) and every Ping and Pong (their payload):
//! a control-frame flood costs the gateway as much as a data flood. Close frames do not count
//! (they end the connection anyway). The upstream side of a proxy route is not limited.

/// What a client over its rate gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitAction {
    /// Close it with 1008 "rate limit exceeded" (the message that went over is not processed).
    Close,
    /// Discard each message over the rate (not echoed, published or relayed) and count it.
    Drop,
}

/// Which limit a message went over: the `limit` label of `ringgate_rate_limited_messages_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimit {
    /// `--max-message-rate`.
    Messages,
    /// `--max-byte-rate`.
    Bytes,
}

impl RateLimit {
    /// Every limit, in table order.
    pub const ALL: [RateLimit; 2] = [RateLimit::Messages, RateLimit::Bytes];

    /// A stable label for `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            RateLimit::Messages => "message_rate",
            RateLimit::Bytes => "byte_rate",
        }
    }

    /// This limit's slot in a counter table.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The configured per-connection rates, shared by every connection of a worker.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MessageRates {
    /// Messages per second a client may send; 0: unlimited.
    pub messages_per_second: u32,
    /// Payload bytes per second a client may send; 0: unlimited.
    pub bytes_per_second: u64,
    /// What a client over either rate gets.
    pub action: RateLimitAction,
}

impl Default for MessageRates {
    fn default() -> MessageRates {
        MessageRates { messages_per_second: 0, bytes_per_second: 0, action: RateLimitAction::Close }
    }
}

impl MessageRates {
    /// Whether any limit is configured (without one, connections never look at their budget).
    pub fn is_enabled(&self) -> bool {
        self.messages_per_second > 0 || self.bytes_per_second > 0
    }

    fn message_capacity(&self) -> f32 {
        self.messages_per_second as f32
    }

    fn byte_capacity(&self) -> f32 {
        self.bytes_per_second as f32
    }
}

/// One connection's two buckets: what it may still send now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MessageBudget {
    messages: f32,
    bytes: f32,
}

impl MessageBudget {
    /// A full second's allowance: a new connection may send its first second at once.
    pub fn full(rates: &MessageRates) -> MessageBudget {
        MessageBudget { messages: rates.message_capacity(), bytes: rates.byte_capacity() }
    }

    /// `elapsed_ms` has passed since the last refill: each bucket gains its rate's share of it,
    /// up to one second's worth.
    pub fn refill(&mut self, elapsed_ms: u32, rates: &MessageRates) {
        if elapsed_ms == 0 {
            return;
        }
        let seconds = elapsed_ms as f32 / 1000.0;
        let messages = rates.message_capacity();
        self.messages = (self.messages + messages * seconds).min(messages);
        let bytes = rates.byte_capacity();
        self.bytes = (self.bytes + bytes * seconds).min(bytes);
    }

    /// A message of `payload_bytes` arrived: takes its cost from both buckets, or says which limit
    /// it is over (and takes nothing: a dropped message does not spend the allowance).
    pub fn spend(&mut self, payload_bytes: usize, rates: &MessageRates) -> Result<(), RateLimit> {
        if rates.messages_per_second > 0 && self.messages < 1.0 {
            return Err(RateLimit::Messages);
        }
        let cost = payload_bytes as f32;
        if rates.bytes_per_second > 0 {
            let capacity = rates.byte_capacity();
            // A message larger than the whole allowance passes on a full bucket, into debt.
            let affordable = self.bytes >= cost || (cost > capacity && self.bytes >= capacity);
            if !affordable {
                return Err(RateLimit::Bytes);
            }
            self.bytes -= cost;
        }
        if rates.messages_per_second > 0 {
            self.messages -= 1.0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(messages_per_second: u32, bytes_per_second: u64) -> MessageRates {
        MessageRates { messages_per_second, bytes_per_second, action: RateLimitAction::Close }
    }

    /// Sends `count` messages of `size` bytes, one every `interval_ms`, and returns how many
    /// passed before the first refusal (all of them if none was refused).
    fn passed(rates: &MessageRates, count: u32, size: usize, interval_ms: u32) -> u32 {
        let mut budget = MessageBudget::full(rates);
        for sent in 0..count {
            budget.refill(interval_ms, rates);
            if budget.spend(size, rates).is_err() {
                return sent;
            }
        }
        count
    }

    #[test]
    fn a_client_at_the_message_rate_never_trips_it() {
        let limit = rates(100, 0);
        assert_eq!(passed(&limit, 10_000, 10, 10), 10_000, "100 msg/s for 100 s");
        // Bursty at the rate: 100 at once, then a second of silence, over and over.
        let mut budget = MessageBudget::full(&limit);
        for _ in 0..50 {
            for _ in 0..100 {
                assert!(budget.spend(10, &limit).is_ok());
            }
            budget.refill(1000, &limit);
        }
    }

    #[test]
    fn a_client_over_the_message_rate_trips_within_the_first_second() {
        let limit = rates(100, 0);
        // 200 msg/s: one second's allowance (100) plus what refills meanwhile.
        let passed = passed(&limit, 10_000, 10, 5);
        assert!((190..=201).contains(&passed), "{passed} passed at twice the rate");
        // A flood without any elapsed time: exactly the allowance.
        assert_eq!(self::passed(&limit, 10_000, 10, 0), 100);
    }

    #[test]
    fn reads_a_millisecond_apart_keep_their_fractions() {
        // 1 msg/ms for a bucket of 500/s: every other read refills a whole message.
        let limit = rates(500, 0);
        let passed = passed(&limit, 5_000, 1, 1);
        assert!((990..=1001).contains(&passed), "{passed}");
    }

    #[test]
    fn a_client_at_the_byte_rate_never_trips_it() {
        let limit = rates(0, 64 * 1024);
        assert_eq!(passed(&limit, 1_000, 1024, 16), 1_000, "62.5 KiB/s in 1 KiB messages");
        assert_eq!(passed(&limit, 1_000, 6_400, 100), 1_000, "in 6,400-byte messages, 10 a second");
    }

    #[test]
    fn a_client_over_the_byte_rate_trips() {
        let limit = rates(0, 64 * 1024);
        // 1 KiB every 8 ms: 128 KiB/s, 500 bytes a message more than refills.
        let passed = passed(&limit, 1_000, 1024, 8);
        assert!((125..=133).contains(&passed), "{passed} passed at twice the rate");
    }

    #[test]
    fn a_message_larger_than_the_allowance_passes_on_a_full_bucket_into_debt() {
        let limit = rates(0, 1000);
        let mut budget = MessageBudget::full(&limit);
        assert!(budget.spend(5000, &limit).is_ok(), "a full bucket lets it pass");
        budget.refill(4000, &limit);
        assert!(budget.spend(1, &limit).is_err(), "4 s only repaid the debt");
        budget.refill(1, &limit);
        assert!(budget.spend(1, &limit).is_ok(), "a millisecond more is one byte");
        budget.refill(999, &limit);
        assert!(budget.spend(5000, &limit).is_err(), "the bucket is not full again yet");
        budget.refill(1, &limit);
        assert!(budget.spend(5000, &limit).is_ok(), "now it is");
    }

    #[test]
    fn a_refused_message_spends_nothing() {
        let limit = rates(10, 100);
        let mut budget = MessageBudget::full(&limit);
        assert_eq!(budget.spend(101, &limit), Ok(()), "larger than the allowance, on a full bucket");
        assert_eq!(budget.spend(1, &limit), Err(RateLimit::Bytes));
        let before = budget;
        assert_eq!(budget.spend(1, &limit), Err(RateLimit::Bytes));
        assert_eq!(budget, before);
        for _ in 0..9 {
            budget.refill(100, &limit);
        }
        budget.refill(20, &limit);
        assert!(budget.spend(1, &limit).is_ok(), "a message's bucket was not spent by refusals");
    }

    #[test]
    fn no_limit_means_nothing_is_refused() {
        let limit = MessageRates::default();
        assert!(!limit.is_enabled());
        assert_eq!(passed(&limit, 100_000, 1 << 20, 0), 100_000);
    }

    #[test]
    fn the_budget_is_eight_bytes() {
        assert_eq!(std::mem::size_of::<MessageBudget>(), 8);
    }
}
