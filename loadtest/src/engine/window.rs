//! The messages in flight on one closed-loop connection (`--rate 0`, `--pipeline` N): a ring of
//! send times, one slot per message the connection may have in flight. Every echo frees the oldest
//! slot; the next write refills every free slot, so a connection always has N messages sent and
//! not yet echoed (fewer only between an echo and the write it triggers). N = 1 is ping-pong.
//!
//! Must never: let more than N messages be in flight, or pair an echo with any send time but its
//! own message's.

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
