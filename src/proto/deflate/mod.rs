//! permessage-deflate (RFC 7692), sans I/O: negotiating the extension in the opening handshake
//! (`negotiate`) and compressing and inflating message payloads (`codec`).
//!
//! Why it is built for memory first: a compressor with a 15-bit window is about 310 KiB (measured),
//! so a gateway that gives every connection its own (uWebSockets' default) spends gigabytes on
//! 10,000 connections. Here the shared mode agrees no context takeover on both sides, so one
//! compressor per worker serves every connection (a pub/sub message is compressed once per worker),
//! and no decompressor outlives a message unless the peer keeps its context (only an upstream can:
//! a client is always asked not to).
//!
//! Must never: fail a handshake over an extension offer, inflate past the caller's limit, or
//! compress a control frame (the caller's rule: only data messages go through [`Deflater`]).

mod codec;
mod negotiate;

pub use codec::{Deflater, InflateError, Inflater};
pub use negotiate::{
    Agreement, CLIENT_OFFER, EXTENSION, MAX_WINDOW_BITS, MIN_WINDOW_BITS, Policy, negotiate, parse_answer,
};
