//! The echo route: every message comes back unchanged, text as text and binary as binary, as one
//! unfragmented frame whatever fragmentation it arrived in. It is what the Autobahn TestSuite and
//! `loadtest` run against, so it must add nothing of its own.

use super::Outbox;
use crate::proto::message::MessageKind;

/// Answers a message by sending it back.
pub fn on_message(kind: MessageKind, payload: &[u8], out: &mut impl Outbox) {
    out.send(kind, payload);
}
