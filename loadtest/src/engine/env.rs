//! What every handler of a client thread sees: the run's plan and phases, the thread's statistics,
//! scratch space and compressors, and the time. Borrowed afresh for each event, so a connection's state machine
//! owns no reference to the thread.
//!
//! Must never: be kept beyond one event (it borrows the thread's statistics mutably).

use std::sync::Arc;

use rustls::ClientConfig;

use crate::cli::Plan;
use crate::schedule::Phases;
use crate::stats::ThreadStats;

use super::pubsub;
use super::wire::Compressors;

/// One event's view of its thread.
pub struct Env<'a> {
    /// The run's plan.
    pub plan: &'a Plan,
    /// The run's phases (this thread's copy: an interruption moves its end).
    pub phases: &'a Phases,
    /// This thread's statistics.
    pub stats: &'a mut ThreadStats,
    /// Pubsub mode's state shared by every thread.
    pub pubsub: Option<&'a pubsub::Shared>,
    /// A payload-sized buffer to build messages in before they are framed.
    pub scratch: &'a mut [u8],
    /// The thread's deflaters (`--deflate`) and the buffer messages are compressed into.
    pub compressors: &'a mut Compressors,
    /// `wss://`: the client configuration every connection's TLS session starts from.
    pub tls: Option<&'a Arc<ClientConfig>>,
    /// `wss://`: the plaintext of one read, gathered from its records for the WebSocket receiver
    /// (the thread's, so that no connection keeps a plaintext buffer between reads).
    pub plaintext: &'a mut Vec<u8>,
    /// Now, on the run clock.
    pub now: u64,
}
