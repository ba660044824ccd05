//! The HTTP/1.1 request rules every request must pass, whatever it asks for: the WebSocket upgrade
//! (`handshake`) and the plain endpoints (`gateway::http`) both feed their headers through one
//! [`RequestRules`], so the two paths can never disagree about where a request ends.
//!
//! What is checked (RFC 9112 and RFC 9110): the request target has no control character, space
//! or DEL (section 3.2); an HTTP/1.1 request has exactly one `Host`, and no request has two or an
//! invalid one (section 3.2); `Content-Length` is `1*DIGIT`, once (RFC 9110 section 8.6 lets a
//! recipient reject a list, even of equal values); `Transfer-Encoding` never comes with
//! `Content-Length` (section 6.1) and ends in `chunked` (section 6.3). These are the places where
//! a front proxy and a server can read the same bytes as different requests (request smuggling),
//! so any doubt is a refusal, and every refusal closes the connection: once the framing is in
//! doubt, the next byte cannot be trusted to start a request.
//!
//! Must never: accept a request whose end two conforming parsers could place differently, or
//! allocate.

use std::fmt;

/// Why a request breaks the HTTP/1.1 message rules. Each knows its status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// The request target holds a control character, a space or DEL, or is not a path (400).
    BadTarget,
    /// An HTTP/1.1 request without `Host`, any request with two, or an invalid value (400).
    BadHost,
    /// `Content-Length` is not `1*DIGIT`, is a list, or is repeated (400).
    BadContentLength,
    /// Both `Content-Length` and `Transfer-Encoding` (400, RFC 9112 section 6.1): which one a
    /// front proxy obeyed cannot be known.
    LengthAndEncoding,
    /// A `Transfer-Encoding` that does not end in `chunked` (or names it twice), or one in an
    /// HTTP/1.0 request: the body's length cannot be determined (400, RFC 9112 sections 6.1, 6.3).
    BadTransferEncoding,
    /// A well-framed chunked body: only `Content-Length` bodies are accepted (411, which RFC 9112
    /// section 6.3 names for refusing a body without a `Content-Length`).
    ChunkedBody,
    /// A transfer coding other than `chunked` before the final `chunked` (501, RFC 9112 section
    /// 6.1: a coding the server does not implement).
    UnknownTransferCoding,
}

impl RequestError {
    /// The HTTP status of the refusal.
    pub fn status(self) -> u16 {
        match self {
            RequestError::ChunkedBody => 411,
            RequestError::UnknownTransferCoding => 501,
            RequestError::BadTarget
            | RequestError::BadHost
            | RequestError::BadContentLength
            | RequestError::LengthAndEncoding
            | RequestError::BadTransferEncoding => 400,
        }
    }

    /// What the client is told (one line).
    pub fn message(self) -> &'static str {
        match self {
            RequestError::BadTarget => "the request target holds a control character, space or DEL\n",
            RequestError::BadHost => "exactly one valid Host header is required\n",
            RequestError::BadContentLength => "Content-Length must be one field of digits only\n",
            RequestError::LengthAndEncoding => "Content-Length and Transfer-Encoding together\n",
            RequestError::BadTransferEncoding => "the body length cannot be determined\n",
            RequestError::ChunkedBody => "send the body with a Content-Length, not chunked\n",
            RequestError::UnknownTransferCoding => "transfer coding not implemented\n",
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message().trim_end(), self.status())
    }
}

impl std::error::Error for RequestError {}

/// Checks a request target: origin form (it starts with `/`), and no byte below 0x21 (controls
/// and space) nor DEL. Bytes from 0x80 up are left to the caller (UTF-8 paths are routed).
pub fn check_target(target: &[u8]) -> Result<(), RequestError> {
    let clean = target.first() == Some(&b'/') && target.iter().all(|&b| b > b' ' && b != 0x7f);
    if clean { Ok(()) } else { Err(RequestError::BadTarget) }
}

/// The rules applied header by header while a request is parsed: feed every header to
/// [`RequestRules::header`], then ask [`RequestRules::finish`] for the body's length. One pass,
/// shared by every endpoint.
#[derive(Clone, Copy, Debug)]
pub struct RequestRules {
    http11: bool,
    host_seen: bool,
    content_length: Option<u64>,
    encoding: Encoding,
}

/// What the `Transfer-Encoding` fields said so far (all of them form one list).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Encoding {
    seen: bool,
    /// The last coding named so far is `chunked`.
    ends_chunked: bool,
    chunked_count: u8,
    /// A coding other than `chunked` was named.
    other: bool,
}

impl RequestRules {
    /// Rules for a request of HTTP/1.`minor_version` (httparse's `version`).
    pub fn new(minor_version: u8) -> RequestRules {
        RequestRules {
            http11: minor_version >= 1,
            host_seen: false,
            content_length: None,
            encoding: Encoding::default(),
        }
    }

    /// Looks at one header field; names these rules do not govern pass untouched.
    pub fn header(&mut self, name: &str, value: &[u8]) -> Result<(), RequestError> {
        // By length first: most headers are none of these three, and are passed over at once.
        match name.len() {
            4 if name.eq_ignore_ascii_case("Host") => {
                let repeated = std::mem::replace(&mut self.host_seen, true);
                if repeated || !is_valid_host(trim_ows(value)) {
                    return Err(RequestError::BadHost);
                }
            }
            14 if name.eq_ignore_ascii_case("Content-Length") => {
                let length = parse_content_length(value).ok_or(RequestError::BadContentLength)?;
                if self.content_length.replace(length).is_some() {
                    return Err(RequestError::BadContentLength);
                }
            }
            17 if name.eq_ignore_ascii_case("Transfer-Encoding") => self.encoding.add(value),
            _ => {}
        }
        Ok(())
    }

    /// After the last header: the body's length in bytes (0 without a body), or the broken rule.
    pub fn finish(self) -> Result<u64, RequestError> {
        if self.http11 && !self.host_seen {
            return Err(RequestError::BadHost);
        }
        let encoding = self.encoding;
        if !encoding.seen {
            return Ok(self.content_length.unwrap_or(0));
        }
        if self.content_length.is_some() {
            return Err(RequestError::LengthAndEncoding);
        }
        if !self.http11 || !encoding.ends_chunked || encoding.chunked_count > 1 {
            return Err(RequestError::BadTransferEncoding);
        }
        if encoding.other {
            return Err(RequestError::UnknownTransferCoding);
        }
        Err(RequestError::ChunkedBody)
    }
}

impl Encoding {
    /// Adds one `Transfer-Encoding` field's codings (a comma-separated list; empty elements are
    /// skipped, as RFC 9110 section 5.6.1 asks; parameters follow a `;`).
    fn add(&mut self, value: &[u8]) {
        self.seen = true;
        for element in value.split(|&b| b == b',') {
            let coding = trim_ows(element.split(|&b| b == b';').next().unwrap_or_default());
            if coding.is_empty() {
                continue;
            }
            let chunked = coding.eq_ignore_ascii_case(b"chunked");
            self.ends_chunked = chunked;
            if chunked {
                self.chunked_count = self.chunked_count.saturating_add(1);
            } else {
                self.other = true;
            }
        }
    }
}

/// `Content-Length = 1*DIGIT` (RFC 9110 section 8.6), around optional white space: no sign, no
/// inner space, no list. A number too large for 64 bits saturates (it is over any limit anyway).
fn parse_content_length(value: &[u8]) -> Option<u64> {
    let digits = trim_ows(value);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0u64, |n, &d| n.saturating_mul(10).saturating_add(u64::from(d - b'0'))))
}

/// `Host = uri-host [ ":" port ]` (RFC 9110 section 7.2): a bracketed IP literal or a reg-name
/// (unreserved, pct-encoded, sub-delims), then optional digits after a colon. Empty is refused:
/// every target we serve is an `http` URI, whose authority is never empty.
fn is_valid_host(host: &[u8]) -> bool {
    let (name_ok, port) = match host.strip_prefix(b"[") {
        Some(rest) => {
            let Some(close) = rest.iter().position(|&b| b == b']') else { return false };
            let literal = &rest[..close];
            let port = match &rest[close + 1..] {
                [] => &[][..],
                [b':', port @ ..] => port,
                _ => return false,
            };
            let literal_byte = |b: &u8| b.is_ascii_hexdigit() || matches!(b, b':' | b'.');
            (!literal.is_empty() && literal.iter().all(literal_byte), port)
        }
        None => {
            let (name, port) = match host.iter().rposition(|&b| b == b':') {
                Some(colon) => (&host[..colon], &host[colon + 1..]),
                None => (host, &[][..]),
            };
            (!name.is_empty() && name.iter().all(is_reg_name_byte), port)
        }
    };
    name_ok && port.iter().all(u8::is_ascii_digit)
}

/// A byte of a reg-name: unreserved, `%` of pct-encoded, or a sub-delim (RFC 3986 section 3.2.2).
fn is_reg_name_byte(b: &u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(b)
}

/// Strips optional white space (spaces and tabs) from both ends of a field value.
pub fn trim_ows(value: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !is_ows(b)).map_or(start, |i| i + 1);
    &value[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules(minor: u8, headers: &[(&str, &str)]) -> Result<u64, RequestError> {
        let mut rules = RequestRules::new(minor);
        for (name, value) in headers {
            rules.header(name, value.as_bytes())?;
        }
        rules.finish()
    }

    #[test]
    fn targets_with_controls_spaces_or_del_are_refused() {
        assert_eq!(check_target(b"/publish/news?x=1"), Ok(()));
        assert_eq!(check_target("/caf\u{e9}".as_bytes()), Ok(()), "UTF-8 is the router's business");
        for bad in [&b"/a\tb"[..], b"/a b", b"/a\x7f", b"/a\x00", b"/a\r", b"", b"*", b"http://x/"] {
            assert_eq!(check_target(bad), Err(RequestError::BadTarget), "{bad:?}");
        }
    }

    #[test]
    fn http11_needs_exactly_one_valid_host() {
        assert_eq!(rules(1, &[("Host", "example.com")]), Ok(0));
        assert_eq!(rules(1, &[("host", "127.0.0.1:8080")]), Ok(0));
        assert_eq!(rules(1, &[("Host", "[::1]:8080")]), Ok(0));
        assert_eq!(rules(1, &[("Host", "[2001:db8::1]")]), Ok(0));
        assert_eq!(rules(0, &[]), Ok(0), "HTTP/1.0 may leave Host out");
        assert_eq!(rules(1, &[]), Err(RequestError::BadHost));
        assert_eq!(rules(1, &[("Host", "a"), ("Host", "a")]), Err(RequestError::BadHost));
        assert_eq!(rules(0, &[("Host", "a"), ("Host", "b")]), Err(RequestError::BadHost));
        for bad in ["", "a b", "a/b", "user@host", "host:80x", "[::1", "[::1]x", "[]", "[::1]:8a", ":80"] {
            assert_eq!(rules(1, &[("Host", bad)]), Err(RequestError::BadHost), "{bad:?}");
        }
    }

    #[test]
    fn content_length_is_digits_once() {
        assert_eq!(rules(1, &[("Host", "h"), ("Content-Length", "5")]), Ok(5));
        assert_eq!(rules(1, &[("Host", "h"), ("Content-Length", " 007 ")]), Ok(7));
        assert_eq!(rules(1, &[("Host", "h"), ("Content-Length", "99999999999999999999999")]), Ok(u64::MAX));
        for bad in ["+5", "-1", "5, 5", "5,5", "5 5", "0x5", "", "5.0", "５"] {
            let verdict = rules(1, &[("Host", "h"), ("Content-Length", bad)]);
            assert_eq!(verdict, Err(RequestError::BadContentLength), "{bad:?}");
        }
        let twice = [("Host", "h"), ("Content-Length", "5"), ("Content-Length", "5")];
        assert_eq!(rules(1, &twice), Err(RequestError::BadContentLength), "even with equal values");
    }

    #[test]
    fn transfer_encoding_is_refused_with_the_status_its_framing_earns() {
        let te = |value: &'static str| rules(1, &[("Host", "h"), ("Transfer-Encoding", value)]);
        assert_eq!(te("chunked"), Err(RequestError::ChunkedBody));
        assert_eq!(te("Chunked"), Err(RequestError::ChunkedBody));
        assert_eq!(te("gzip, chunked"), Err(RequestError::UnknownTransferCoding));
        assert_eq!(te("chunked, gzip"), Err(RequestError::BadTransferEncoding), "chunked must be last");
        assert_eq!(te("gzip"), Err(RequestError::BadTransferEncoding));
        assert_eq!(te("chunked, chunked"), Err(RequestError::BadTransferEncoding));
        assert_eq!(te(""), Err(RequestError::BadTransferEncoding));
        let split = [("Host", "h"), ("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")];
        assert_eq!(rules(1, &split), Err(RequestError::UnknownTransferCoding), "fields form one list");
        let both = [("Host", "h"), ("Transfer-Encoding", "chunked"), ("Content-Length", "5")];
        assert_eq!(rules(1, &both), Err(RequestError::LengthAndEncoding));
        let both = [("Host", "h"), ("Content-Length", "5"), ("Transfer-Encoding", "chunked")];
        assert_eq!(rules(1, &both), Err(RequestError::LengthAndEncoding));
        assert_eq!(rules(0, &[("Transfer-Encoding", "chunked")]), Err(RequestError::BadTransferEncoding));
        assert_eq!(RequestError::ChunkedBody.status(), 411);
        assert_eq!(RequestError::UnknownTransferCoding.status(), 501);
        assert_eq!(RequestError::LengthAndEncoding.status(), 400);
    }

    proptest! {
        /// Differential: a Content-Length value is accepted exactly when, without its surrounding
        /// spaces and tabs, it is a non-empty run of ASCII digits, and then it is that number.
        #[test]
        fn content_length_matches_the_grammar(value in "[ \t]{0,2}[0-9+\\-, a-f]{0,8}[ \t]{0,2}") {
            let inner = value.trim_matches([' ', '\t']);
            let grammar = !inner.is_empty() && inner.bytes().all(|b| b.is_ascii_digit());
            let parsed = parse_content_length(value.as_bytes());
            prop_assert_eq!(parsed.is_some(), grammar);
            if grammar {
                prop_assert_eq!(parsed, inner.parse::<u64>().ok());
            }
        }

        /// A target is accepted exactly when it starts with `/` and has no byte in 0x00-0x20 or 0x7f.
        #[test]
        fn targets_match_the_rule(target in proptest::collection::vec(any::<u8>(), 0..12)) {
            let naive = target.first() == Some(&b'/') && !target.iter().any(|&b| b <= 0x20 || b == 0x7f);
            prop_assert_eq!(check_target(&target).is_ok(), naive);
        }
    }
}
