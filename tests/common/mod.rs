//! Helpers shared by the `server_*` integration tests, which run the real `ringgate` binary and
//! talk to it over real loopback sockets: a process guard ([`server`]) and a small, independent
//! RFC 6455 client for raw and malformed traffic, with a keep-alive HTTP client ([`wire`]), and a
//! strict Prometheus text-format reader ([`prom`]). None uses `ringgate`'s own code, so a bug in the
//! protocol core cannot hide itself in the tests.

#![allow(dead_code)]

pub mod broker;
pub mod prom;
pub mod recovery;
pub mod server;
pub mod tls;
pub mod wire;
