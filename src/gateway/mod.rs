//! What happens to messages once they are messages: routing and the route handlers.
//!
//! This layer knows nothing of io_uring or sockets. The I/O layer hands it complete, unmasked
//! messages as borrowed slices and gives it an [`Outbox`] to answer through. Must never: import
//! `crate::io`, block, or keep a borrowed payload beyond the call.

pub mod address_limits;
pub mod auth;
pub mod cluster;
pub mod compression;
pub mod cors;
pub mod echo;
pub mod history;
pub mod http;
pub mod proxy;
pub mod publish_key;
pub mod pubsub;
pub mod rate_limit;
pub mod router;

use crate::proto::message::MessageKind;

/// Where a handler puts the messages it sends on its connection. Frames are encoded on the way in,
/// so that a queued message costs its bytes and nothing more.
pub trait Outbox {
    /// Queues one unfragmented message.
    fn send(&mut self, kind: MessageKind, payload: &[u8]);
}
