//! Where a client's token is: `Authorization: Bearer <token>`, a `token` query parameter, or, for
//! browsers (which cannot set headers on a WebSocket), a `Sec-WebSocket-Protocol` entry:
//!
//! ```text
//! new WebSocket("wss://gw.example/pubsub/news", ["ringgate.jwt", "ringgate.jwt." + token])
//! ```
//!
//! The server then answers with the `ringgate.jwt` subprotocol (a browser fails a connection whose
//! server picks none of the subprotocols it offered). A JWT's characters (base64url and dots) are
//! all allowed in a subprotocol token. What goes to a proxy's upstream has the token entries and
//! the `token` query parameter removed, so a token does not end up in an upstream's logs.

use crate::proto::handshake::Request;

/// The subprotocol a browser offers beside its token, and the server answers with.
pub const TOKEN_PROTOCOL: &str = "ringgate.jwt";
/// The prefix of the subprotocol entry that carries the token.
pub const TOKEN_PROTOCOL_PREFIX: &str = "ringgate.jwt.";

/// Where the token was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer`.
    Header,
    /// `?token=`.
    Query,
    /// A `Sec-WebSocket-Protocol` entry: the answer names [`TOKEN_PROTOCOL`].
    Subprotocol,
}

/// The token of an upgrade request, and where it was, in that order of preference.
pub fn find_token<'b>(request: &Request<'_, 'b>) -> Option<(&'b str, TokenSource)> {
    for value in request.header_values("Authorization") {
        let value = value.trim();
        if let Some((scheme, token)) = value.split_once(' ')
            && scheme.eq_ignore_ascii_case("bearer")
            && !token.trim().is_empty()
        {
            return Some((token.trim(), TokenSource::Header));
        }
    }
    if let Some(token) = query_token(request.path) {
        return Some((token, TokenSource::Query));
    }
    request
        .subprotocols()
        .find_map(|p| p.strip_prefix(TOKEN_PROTOCOL_PREFIX))
        .filter(|t| !t.is_empty())
        .map(|t| (t, TokenSource::Subprotocol))
}

/// The value of the `token` query parameter of a request target.
fn query_token(target: &str) -> Option<&str> {
    let (_, query) = target.split_once('?')?;
    query.split('&').find_map(|pair| pair.strip_prefix("token=")).filter(|t| !t.is_empty())
}

/// The subprotocols to offer upstream: the client's, without the token entries.
pub fn strip_token_protocols<'a>(offered: impl Iterator<Item = &'a str>) -> impl Iterator<Item = &'a str> {
    offered.filter(|p| *p != TOKEN_PROTOCOL && !p.starts_with(TOKEN_PROTOCOL_PREFIX))
}

/// A request target without its `token` query parameter (the rest of the query kept in order).
pub fn strip_token_query(target: &str) -> String {
    let Some((path, query)) = target.split_once('?') else { return target.to_string() };
    let kept: Vec<&str> = query.split('&').filter(|pair| !pair.starts_with("token=")).collect();
    if kept.is_empty() { path.to_string() } else { format!("{path}?{}", kept.join("&")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::handshake::{Parsed, parse_request};

    fn with_request<R>(extra: &str, target: &str, f: impl FnOnce(&Request<'_, '_>) -> R) -> R {
        let raw = format!(
            "GET {target} HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        );
        let mut headers = [httparse::EMPTY_HEADER; 32];
        match parse_request(raw.as_bytes(), &mut headers, 8192) {
            Ok(Parsed::Complete(request, _)) => f(&request),
            other => panic!("not a request: {other:?}"),
        }
    }

    #[test]
    fn the_token_comes_from_the_header_the_query_or_a_subprotocol() {
        let header = with_request("Authorization: Bearer abc.def.ghi\r\n", "/echo?token=q", |r| {
            find_token(r).map(|(t, s)| (t.to_string(), s))
        });
        assert_eq!(header, Some(("abc.def.ghi".into(), TokenSource::Header)));
        let query =
            with_request("", "/echo?a=1&token=q.r.s", |r| find_token(r).map(|(t, s)| (t.to_string(), s)));
        assert_eq!(query, Some(("q.r.s".into(), TokenSource::Query)));
        let protocol =
            with_request("Sec-WebSocket-Protocol: ringgate.jwt, ringgate.jwt.x.y.z\r\n", "/echo", |r| {
                find_token(r).map(|(t, s)| (t.to_string(), s))
            });
        assert_eq!(protocol, Some(("x.y.z".into(), TokenSource::Subprotocol)));
        let basic = with_request("Authorization: Basic dXNlcg==\r\n", "/echo", |r| find_token(r).is_none());
        assert!(basic, "only the Bearer scheme carries a token");
    }

    #[test]
    fn nothing_of_the_token_goes_upstream() {
        assert_eq!(strip_token_query("/x?a=1&token=t&b=2"), "/x?a=1&b=2");
        assert_eq!(strip_token_query("/x?token=t"), "/x");
        assert_eq!(strip_token_query("/x"), "/x");
        let offered = ["chat", "ringgate.jwt", "ringgate.jwt.a.b.c"];
        assert_eq!(strip_token_protocols(offered.into_iter()).collect::<Vec<_>>(), ["chat"]);
    }
}
