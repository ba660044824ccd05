//! The server to test: a `ws://` URL turned into a socket address, a `Host` header and a path.
//!
//! Must never: accept a scheme we cannot speak (`wss://` needs TLS, which this tool does not do),
//! or resolve the host more than once (every connection goes to the same address, so a DNS
//! answer cannot change mid-run).

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{Context, Result, bail};

/// A resolved WebSocket endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The address every connection goes to.
    pub addr: SocketAddr,
    /// The `Host` header value, as written in the URL (host and explicit port).
    pub host: String,
    /// The request path with its query, at least `/`.
    pub path: String,
}

impl Target {
    /// Parses `ws://host[:port][/path][?query]` and resolves the host once.
    pub fn parse(url: &str) -> Result<Target> {
        let rest = match url.split_once("://") {
            Some(("ws", rest)) => rest,
            Some(("wss", _)) => bail!("wss:// (TLS) is not supported; use ws://"),
            Some((scheme, _)) => bail!("unsupported scheme {scheme:?}; use ws://"),
            None => bail!("missing scheme; use ws://host:port/path"),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) if rest[at..].starts_with('/') => (&rest[..at], rest[at..].to_string()),
            Some(at) => (&rest[..at], format!("/{}", &rest[at..])),
            None => (rest, "/".to_string()),
        };
        if authority.is_empty() || authority.contains('@') {
            bail!("missing host (user info is not supported)");
        }
        let has_port = match authority.rfind(':') {
            Some(colon) => !authority[colon..].contains(']'),
            None => false,
        };
        let with_port = if has_port { authority.to_string() } else { format!("{authority}:80") };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {authority}"))?
            .next()
            .with_context(|| format!("{authority} resolves to no address"))?;
        Ok(Target { addr, host: authority.to_string(), path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_default() {
        let target = Target::parse("ws://127.0.0.1:8080/echo").unwrap();
        assert_eq!(target.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(target.host, "127.0.0.1:8080");
        assert_eq!(target.path, "/echo");
    }

    #[test]
    fn defaults_port_and_path() {
        let target = Target::parse("ws://127.0.0.1").unwrap();
        assert_eq!(target.addr.port(), 80);
        assert_eq!(target.host, "127.0.0.1");
        assert_eq!(target.path, "/");
        assert_eq!(Target::parse("ws://127.0.0.1:9?x=1").unwrap().path, "/?x=1");
        assert_eq!(Target::parse("ws://[::1]:9/a").unwrap().addr, "[::1]:9".parse().unwrap());
    }

    #[test]
    fn refuses_what_it_cannot_speak() {
        assert!(Target::parse("wss://127.0.0.1/").is_err());
        assert!(Target::parse("http://127.0.0.1/").is_err());
        assert!(Target::parse("127.0.0.1:8080").is_err());
        assert!(Target::parse("ws:///echo").is_err());
    }
}
