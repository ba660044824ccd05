//! ringgate: an io_uring WebSocket gateway for Linux.
//!
//! The crate is layered so that each layer can be tested on its own: [`proto`] is RFC 6455 with no
//! I/O at all, shared by the gateway and the bundled load generator; [`gateway`] decides what
//! happens to messages without knowing about sockets; [`io`] owns every socket, on our own io_uring
//! driver or, where io_uring is blocked, on epoll. Dependencies point one way: `io -> gateway -> proto`.

#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod config;
pub mod gateway;
pub mod io;
pub mod metrics;
pub mod proto;
pub mod tls;
