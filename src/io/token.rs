//! What a completion (or a readiness event) is about: packed into the 64 bits of `user_data`.
//!
//! A connection's slot is reused once it closes, so the slot alone cannot name it: the token also
//! carries the slot's generation, and a completion whose generation no longer matches (a late
//! completion for a closed connection) is recognised and dropped. Must never: let two live things
//! share a token, or lose a bit of the slot or generation in packing.
//!
//! Layout: `generation (32) | slot (24) | unused (4) | side (1) | op (3)`.

/// Which socket of a connection an operation is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The accepted client socket.
    Client = 0,
    /// The proxy's socket to an upstream.
    Upstream = 1,
}

impl Side {
    /// Both sides, client first.
    pub const BOTH: [Side; 2] = [Side::Client, Side::Upstream];
}

/// The kind of operation a completion finishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A (multishot) receive on a connection's socket.
    Recv = 0,
    /// A send on a connection's socket.
    Send = 1,
    /// A connect to an upstream.
    Connect = 2,
    /// A cancellation request (its own completion carries nothing we need).
    Cancel = 3,
    /// A (multishot) accept; the slot is the listener's index.
    Accept = 4,
    /// The worker's wake-up descriptor (pub/sub hand-offs, drain).
    Wake = 5,
}

const SLOT_BITS: u32 = 24;
/// The largest slot number a token can carry: the per-worker connection bound.
pub const MAX_SLOTS: usize = 1 << SLOT_BITS;

/// A packed `user_data` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Token(pub u64);

impl Token {
    /// The token of `op` on `side` of the connection in `slot` at `generation`.
    pub fn new(slot: u32, generation: u32, side: Side, op: Op) -> Token {
        debug_assert!((slot as usize) < MAX_SLOTS);
        let slot = u64::from(slot) & ((1 << SLOT_BITS) - 1);
        Token((u64::from(generation) << 32) | (slot << 8) | ((side as u64) << 3) | op as u64)
    }

    /// A token that names no connection (accept, wake-up).
    pub fn global(op: Op, index: u32) -> Token {
        Token::new(index, 0, Side::Client, op)
    }

    /// The slot (or listener index).
    pub fn slot(self) -> u32 {
        ((self.0 >> 8) & ((1 << SLOT_BITS) - 1)) as u32
    }

    /// The slot's generation when the operation was submitted.
    pub fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The socket of the connection.
    pub fn side(self) -> Side {
        if self.0 & 0b1000 == 0 { Side::Client } else { Side::Upstream }
    }

    /// The operation; `None` for a value no token of ours produces.
    pub fn op(self) -> Option<Op> {
        Some(match self.0 & 0b111 {
            0 => Op::Recv,
            1 => Op::Send,
            2 => Op::Connect,
            3 => Op::Cancel,
            4 => Op::Accept,
            5 => Op::Wake,
            _ => return None,
        })
    }

    /// The same connection and side, another operation.
    pub fn with_op(self, op: Op) -> Token {
        Token((self.0 & !0b111) | op as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_survives_packing_at_its_extremes() {
        for (slot, generation) in [(0, 0), (1, 1), (MAX_SLOTS as u32 - 1, u32::MAX), (12345, 0x8000_0001)] {
            for side in Side::BOTH {
                for op in [Op::Recv, Op::Send, Op::Connect, Op::Cancel, Op::Accept, Op::Wake] {
                    let token = Token::new(slot, generation, side, op);
                    assert_eq!(
                        (token.slot(), token.generation(), token.side(), token.op()),
                        (slot, generation, side, Some(op))
                    );
                    assert_eq!(token.with_op(Op::Send).op(), Some(Op::Send));
                    assert_eq!(token.with_op(Op::Send).slot(), slot);
                }
            }
        }
    }

    #[test]
    fn an_unknown_op_is_not_mistaken_for_one_of_ours() {
        assert_eq!(Token(7).op(), None);
        assert_eq!(Token(6).op(), None);
    }
}
