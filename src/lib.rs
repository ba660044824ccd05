//! ringgate: an io_uring WebSocket gateway for Linux.
//!
//! The crate is layered so that each layer can be tested on its own: [`proto`] is RFC 6455 with no
//! I/O at all, shared by the gateway and the bundled load generator. Dependencies point one way,
//! towards `proto`.

#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod proto;
