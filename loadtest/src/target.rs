//! The server to test: a `ws://` or `wss://` URL turned into a socket address, a `Host` header, a
//! path and, for `wss://`, the name the server's certificate must be valid for.
//!
//! Must never: accept a scheme we cannot speak, or resolve the host more than once (every
//! connection goes to the same address, so a DNS answer cannot change mid-run).

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{Context, Result, bail};
use rustls::pki_types::ServerName;

/// A resolved WebSocket endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The address every connection goes to.
    pub addr: SocketAddr,
    /// The `Host` header value, as written in the URL (host and explicit port).
    pub host: String,
    /// The request path with its query, at least `/`.
    pub path: String,
    /// `wss://`: the URL's host as the TLS server name. A DNS name is sent as SNI and checked
    /// against the certificate; an IP address is checked against the certificate's IP addresses
    /// and not sent (RFC 6066 allows no literal addresses in SNI; rustls leaves it out).
    pub tls: Option<ServerName<'static>>,
}

impl Target {
    /// Parses `ws://host[:port][/path][?query]` (port 80 by default) or the same with `wss://`
    /// (port 443), and resolves the host once.
    pub fn parse(url: &str) -> Result<Target> {
        let (rest, secure) = match url.split_once("://") {
            Some(("ws", rest)) => (rest, false),
            Some(("wss", rest)) => (rest, true),
            Some((scheme, _)) => bail!("unsupported scheme {scheme:?}; use ws:// or wss://"),
            None => bail!("missing scheme; use ws://host:port/path or wss://host:port/path"),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) if rest[at..].starts_with('/') => (&rest[..at], rest[at..].to_string()),
            Some(at) => (&rest[..at], format!("/{}", &rest[at..])),
            None => (rest, "/".to_string()),
        };
        if authority.is_empty() || authority.contains('@') {
            bail!("missing host (user info is not supported)");
        }
        let port_at = authority.rfind(':').filter(|&colon| !authority[colon..].contains(']'));
        let hostname = match port_at {
            Some(colon) => &authority[..colon],
            None => authority,
        };
        if hostname.is_empty() {
            bail!("missing host");
        }
        let with_port = match port_at {
            Some(_) => authority.to_string(),
            None => format!("{authority}:{}", if secure { 443 } else { 80 }),
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {authority}"))?
            .next()
            .with_context(|| format!("{authority} resolves to no address"))?;
        let tls = match secure {
            false => None,
            true => {
                let bare = hostname.trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(bare)
                    .with_context(|| format!("{bare:?} is not a valid TLS server name"))?;
                Some(name.to_owned())
            }
        };
        Ok(Target { addr, host: authority.to_string(), path, tls })
    }

    /// The URL as the report shows it: scheme, host as written, path.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}{}", self.host, self.path)
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
        assert_eq!(target.tls, None);
        assert_eq!(target.url(), "ws://127.0.0.1:8080/echo");
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
    fn wss_defaults_to_443_and_names_the_server_by_the_url_host() {
        let target = Target::parse("wss://localhost/echo").unwrap();
        assert_eq!(target.addr.port(), 443);
        assert_eq!(target.host, "localhost");
        assert_eq!(target.tls, Some(ServerName::try_from("localhost").unwrap()));
        assert_eq!(target.url(), "wss://localhost/echo");
        // An explicit port stays in the Host header, not in the server name.
        let target = Target::parse("wss://localhost:9443").unwrap();
        assert_eq!((target.addr.port(), target.host.as_str()), (9443, "localhost:9443"));
        assert_eq!(target.tls, Some(ServerName::try_from("localhost").unwrap()));
        // IP literals are IP names (checked against the certificate's IP addresses, no SNI).
        let v4 = Target::parse("wss://127.0.0.1:9/").unwrap().tls.unwrap();
        assert!(matches!(v4, ServerName::IpAddress(_)), "{v4:?}");
        let v6 = Target::parse("wss://[::1]:9/").unwrap();
        assert!(matches!(v6.tls, Some(ServerName::IpAddress(_))), "{v6:?}");
        assert_eq!(v6.host, "[::1]:9");
    }

    #[test]
    fn refuses_what_it_cannot_speak() {
        assert!(Target::parse("http://127.0.0.1/").is_err());
        assert!(Target::parse("https://127.0.0.1/").is_err());
        assert!(Target::parse("127.0.0.1:8080").is_err());
        assert!(Target::parse("ws:///echo").is_err());
        assert!(Target::parse("wss://:443/echo").is_err());
    }
}
