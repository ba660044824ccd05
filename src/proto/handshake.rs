//! The opening handshake (RFC 6455 section 4), both sides.
//!
//! Server side: [`parse_request`] parses an upgrade request with `httparse`, borrowing the caller's
//! buffer and header storage (nothing is copied or allocated), and checks every rule of section 4.2.1;
//! [`accept`] applies the operator's [`HandshakePolicy`] (Origin allow-list, subprotocol choice) and
//! computes `Sec-WebSocket-Accept`. Every failure is a [`HandshakeError`] that knows its HTTP status
//! and writes its own response, so the answer a client gets is always the one the RFC names.
//!
//! Client side (the load generator): [`ClientHandshake`] writes a request for a caller-supplied
//! nonce and checks the server's 101 and its accept key.
//!
//! Must never: read a header section larger than the limit, accept a request the RFC says to
//! refuse, or allocate.

use std::fmt;

use super::deflate::{Agreement, CLIENT_OFFER, parse_answer};
use super::http1::{RequestError, RequestRules, check_target, trim_ows};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::BufMut;
use sha1::{Digest, Sha1};

/// The GUID that section 1.3 appends to the key before hashing.
pub const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only protocol version RFC 6455 defines.
pub const WEBSOCKET_VERSION: &str = "13";

/// The default bound on the request's header section: browsers send 400-2,000 bytes; 8 KiB is
/// what common HTTP servers allow.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 8 * 1024;

/// The default number of header slots a caller should give [`parse_request`]; more headers than
/// this is answered with 431.
pub const DEFAULT_MAX_HEADERS: usize = 64;

/// A `Sec-WebSocket-Accept` value: base64 of a SHA-1 digest, always 28 ASCII bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AcceptKey([u8; 28]);

impl AcceptKey {
    /// Computes the accept value for a `Sec-WebSocket-Key` as section 1.3 specifies.
    pub fn for_key(key: &[u8]) -> AcceptKey {
        let mut sha1 = Sha1::new();
        sha1.update(key);
        sha1.update(WEBSOCKET_GUID);
        let digest = sha1.finalize();
        let mut out = [0u8; 28];
        // 20 bytes always encode to exactly 28 base64 characters, so this cannot fail.
        let _ = BASE64.encode_slice(digest.as_slice(), &mut out);
        AcceptKey(out)
    }

    /// The header value's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for AcceptKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AcceptKey({})", String::from_utf8_lossy(&self.0))
    }
}

/// Why an upgrade request is refused. Each variant maps to the HTTP status the RFC (or HTTP
/// semantics, where the RFC says "an appropriate error code") names for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// Not parseable as HTTP/1.x (400).
    Malformed,
    /// The header section is over the byte limit, or has too many headers (431).
    HeadersTooLarge,
    /// Not a GET (405, with `Allow: GET`).
    MethodNotAllowed,
    /// HTTP/1.0: section 4.1 requires HTTP/1.1 or higher (400).
    HttpVersionTooOld,
    /// No `Host`, or more than one (400).
    BadHost,
    /// `Upgrade: websocket` or `Connection: upgrade` is missing: a plain HTTP request on a WebSocket
    /// route (426, with `Upgrade: websocket`).
    UpgradeRequired,
    /// `Sec-WebSocket-Version` is missing or repeated (400, naming the version we speak).
    MissingVersion,
    /// `Sec-WebSocket-Version` is not 13 (426, with `Sec-WebSocket-Version: 13`, section 4.4).
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` is missing, repeated, or not base64 of 16 bytes (400).
    BadKey,
    /// The `Origin` is not on the operator's allow-list (403).
    ForbiddenOrigin,
}

impl HandshakeError {
    /// The HTTP status code of the answer.
    pub fn status(self) -> u16 {
        match self {
            HandshakeError::HeadersTooLarge => 431,
            HandshakeError::MethodNotAllowed => 405,
            HandshakeError::UpgradeRequired | HandshakeError::UnsupportedVersion => 426,
            HandshakeError::ForbiddenOrigin => 403,
            HandshakeError::Malformed
            | HandshakeError::HttpVersionTooOld
            | HandshakeError::BadHost
            | HandshakeError::MissingVersion
            | HandshakeError::BadKey => 400,
        }
    }

    /// A stable, label-friendly name, for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            HandshakeError::Malformed => "malformed",
            HandshakeError::HeadersTooLarge => "headers_too_large",
            HandshakeError::MethodNotAllowed => "method_not_allowed",
            HandshakeError::HttpVersionTooOld => "http_version",
            HandshakeError::BadHost => "bad_host",
            HandshakeError::UpgradeRequired => "upgrade_required",
            HandshakeError::MissingVersion => "missing_version",
            HandshakeError::UnsupportedVersion => "unsupported_version",
            HandshakeError::BadKey => "bad_key",
            HandshakeError::ForbiddenOrigin => "forbidden_origin",
        }
    }

    /// Writes the whole HTTP error response, headers the RFC requires included. The connection is
    /// closed after it (`Connection: close`).
    pub fn write_response(self, dst: &mut impl BufMut) {
        let extra: &[(&str, &str)] = match self {
            HandshakeError::MethodNotAllowed => &[("Allow", "GET")],
            HandshakeError::UpgradeRequired => {
                &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", WEBSOCKET_VERSION)]
            }
            HandshakeError::MissingVersion | HandshakeError::UnsupportedVersion => {
                &[("Sec-WebSocket-Version", WEBSOCKET_VERSION)]
            }
            _ => &[],
        };
        write_error_response(dst, self.status(), extra, self.body());
    }

    fn body(self) -> &'static str {
        match self {
            HandshakeError::Malformed => "malformed HTTP request\n",
            HandshakeError::HeadersTooLarge => "request header section too large\n",
            HandshakeError::MethodNotAllowed => "a WebSocket upgrade must use GET\n",
            HandshakeError::HttpVersionTooOld => "a WebSocket upgrade needs HTTP/1.1\n",
            HandshakeError::BadHost => "exactly one Host header is required\n",
            HandshakeError::UpgradeRequired => "this is a WebSocket endpoint: upgrade required\n",
            HandshakeError::MissingVersion => "Sec-WebSocket-Version is required (13)\n",
            HandshakeError::UnsupportedVersion => "unsupported Sec-WebSocket-Version; use 13\n",
            HandshakeError::BadKey => "Sec-WebSocket-Key must be base64 of 16 bytes\n",
            HandshakeError::ForbiddenOrigin => "origin not allowed\n",
        }
    }
}

impl From<RequestError> for HandshakeError {
    /// The message rules' refusals as the handshake counts them: a bad `Host` keeps its own
    /// label; a bad target or any body framing on an upgrade is malformed.
    fn from(error: RequestError) -> HandshakeError {
        match error {
            RequestError::BadHost => HandshakeError::BadHost,
            _ => HandshakeError::Malformed,
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.body().trim_end(), self.status())
    }
}

impl std::error::Error for HandshakeError {}

/// Writes a complete plain-text HTTP/1.1 error response that closes the connection. Also used by
/// the server for answers that are not about the handshake itself (404, 503).
pub fn write_error_response(dst: &mut impl BufMut, status: u16, extra_headers: &[(&str, &str)], body: &str) {
    let mut status_digits = [0u8; 3];
    status_digits[0] = b'0' + (status / 100 % 10) as u8;
    status_digits[1] = b'0' + (status / 10 % 10) as u8;
    status_digits[2] = b'0' + (status % 10) as u8;
    dst.put_slice(b"HTTP/1.1 ");
    dst.put_slice(&status_digits);
    dst.put_u8(b' ');
    dst.put_slice(reason_phrase(status).as_bytes());
    dst.put_slice(b"\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n");
    for (name, value) in extra_headers {
        put_header(dst, name.as_bytes(), value.as_bytes());
    }
    put_header(dst, b"Content-Length", itoa::Buffer::new().format(body.len()).as_bytes());
    dst.put_slice(b"\r\n");
    dst.put_slice(body.as_bytes());
}

fn put_header(dst: &mut impl BufMut, name: &[u8], value: &[u8]) {
    dst.put_slice(name);
    dst.put_slice(b": ");
    dst.put_slice(value);
    dst.put_slice(b"\r\n");
}

/// The reason phrase for the statuses a gateway answers with.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Whether `buf`, the start of a request still incomplete, can begin an HTTP request: after any
/// empty lines (RFC 9112 section 2.2), a method made of token characters up to its space. Looked
/// at while the header section is incomplete, so that what cannot become a request (a TLS
/// ClientHello on a plain port, binary garbage) is refused at once instead of waiting out the
/// handshake timeout.
pub fn could_start_request(buf: &[u8]) -> bool {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(buf.len());
    let line = &buf[start..];
    let method_len = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    if method_len == 0 && !line.is_empty() {
        return false;
    }
    line[..method_len].iter().all(|&b| is_token_char(b))
}

/// RFC 9110 section 5.6.2: `tchar`.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Finds the end of an HTTP header section (just past the blank line), looking only at bytes after
/// `scanned`, the length already searched in an earlier call.
///
/// Checking this before calling `httparse` keeps a request that trickles in byte by byte from being
/// parsed from the start on every read (httparse's docs warn of exactly that). Accepts bare LF line
/// ends as `httparse` does.
pub fn find_header_end(buf: &[u8], scanned: usize) -> Option<usize> {
    let start = scanned.saturating_sub(3);
    let mut at = start;
    while let Some(newline) = buf.get(at..)?.iter().position(|&b| b == b'\n') {
        let after = at + newline + 1;
        match buf.get(after..) {
            Some([b'\n', ..]) => return Some(after + 1),
            Some([b'\r', b'\n', ..]) => return Some(after + 2),
            _ => at = after,
        }
    }
    None
}

/// The request target (path and query) of a request line at the start of `buf`, without judging the
/// headers, so that routing can answer an unknown path with 404 before judging the upgrade.
///
/// `None` unless the line is `METHOD SP target SP HTTP/...` with a clean target (see
/// [`check_target`]): a target with a control character is a 400, never routed.
pub fn request_target(buf: &[u8]) -> Option<&str> {
    let line_end = buf.iter().position(|&b| b == b'\r' || b == b'\n')?;
    let mut parts = buf[..line_end].split(|&b| b == b' ');
    let _method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if !version.starts_with(b"HTTP/") || parts.next().is_some() || check_target(target).is_err() {
        return None;
    }
    std::str::from_utf8(target).ok()
}

/// A validated WebSocket upgrade request. Everything borrows the caller's buffer.
#[derive(Debug)]
pub struct Request<'h, 'b> {
    /// The request target, for routing (path and query).
    pub path: &'b str,
    /// The `Host` header.
    pub host: &'b str,
    /// The `Sec-WebSocket-Key`, already checked to be base64 of 16 bytes.
    pub key: &'b [u8],
    /// The `Origin` header, which browsers always send.
    pub origin: Option<&'b str>,
    /// All headers, for policies and proxies that need more.
    pub headers: &'h [httparse::Header<'b>],
}

impl<'b> Request<'_, 'b> {
    /// The subprotocols the client offered, in its order of preference, across all
    /// `Sec-WebSocket-Protocol` headers.
    pub fn subprotocols(&self) -> impl Iterator<Item = &'b str> + '_ {
        self.header_values("Sec-WebSocket-Protocol").flat_map(tokens)
    }

    /// The values of every header called `name` (case-insensitive), as UTF-8.
    pub fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'b str> + 's {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
    }
}

/// The outcome of [`parse_request`].
#[derive(Debug)]
pub enum Parsed<'h, 'b> {
    /// The header section is not complete yet; read more and call again.
    Partial,
    /// A valid upgrade request, and the length of its header section (bytes after it belong to the
    /// WebSocket stream).
    Complete(Request<'h, 'b>, usize),
}

/// Parses and validates an upgrade request at the start of `buf`.
///
/// `headers` is the caller's storage for header slots; more headers than it holds is a 431, as is
/// a header section longer than `max_header_bytes`.
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>],
    max_header_bytes: usize,
) -> Result<Parsed<'h, 'b>, HandshakeError> {
    let mut parsed = httparse::Request::new(headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= max_header_bytes => len,
        Ok(httparse::Status::Complete(_)) => return Err(HandshakeError::HeadersTooLarge),
        Ok(httparse::Status::Partial) if buf.len() >= max_header_bytes => {
            return Err(HandshakeError::HeadersTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::HeadersTooLarge),
        Err(_) => return Err(HandshakeError::Malformed),
    };
    let (Some(method), Some(path), Some(version)) = (parsed.method, parsed.path, parsed.version) else {
        return Err(HandshakeError::Malformed);
    };
    check_target(path.as_bytes())?;
    if method != "GET" {
        return Err(HandshakeError::MethodNotAllowed);
    }
    if version < 1 {
        return Err(HandshakeError::HttpVersionTooOld);
    }

    // The message rules every request passes (one Host, a clean target, no body framing in
    // doubt): the same ones the plain endpoints apply.
    let mut rules = RequestRules::new(version);
    let mut host = None;
    let mut key = None;
    let mut version = None;
    let mut origin = None;
    let mut upgrade = false;
    let mut connection_upgrade = false;
    let headers: &'h [httparse::Header<'b>] = parsed.headers;
    for header in headers {
        let name = header.name;
        let value = header.value;
        rules.header(name, value).map_err(HandshakeError::from)?;
        if name.eq_ignore_ascii_case("Host") {
            host = Some(value); // once, and valid: the rules saw to it
        } else if name.eq_ignore_ascii_case("Upgrade") {
            upgrade |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("Connection") {
            connection_upgrade |= has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("Sec-WebSocket-Version") {
            set_once(&mut version, value, HandshakeError::MissingVersion)?;
        } else if name.eq_ignore_ascii_case("Sec-WebSocket-Key") {
            set_once(&mut key, value, HandshakeError::BadKey)?;
        } else if name.eq_ignore_ascii_case("Origin") {
            set_once(&mut origin, value, HandshakeError::ForbiddenOrigin)?;
        }
    }

    // Bytes after the header section are WebSocket frames: a body the client (or a proxy in front)
    // meant to send would be read as frames, so an upgrade with one is refused.
    if rules.finish().map_err(HandshakeError::from)? > 0 {
        return Err(HandshakeError::Malformed);
    }
    let host = host.and_then(|h| std::str::from_utf8(trim_ows(h)).ok()).ok_or(HandshakeError::BadHost)?;
    if !upgrade || !connection_upgrade {
        return Err(HandshakeError::UpgradeRequired);
    }
    match version.map(trim_ows) {
        None => return Err(HandshakeError::MissingVersion),
        Some(v) if v != WEBSOCKET_VERSION.as_bytes() => {
            return Err(HandshakeError::UnsupportedVersion);
        }
        Some(_) => {}
    }
    let key = key.map(trim_ows).filter(|k| is_valid_key(k)).ok_or(HandshakeError::BadKey)?;
    let origin = match origin {
        Some(o) => Some(std::str::from_utf8(o).map_err(|_| HandshakeError::ForbiddenOrigin)?),
        None => None,
    };
    let request = Request { path, host, key, origin, headers };
    Ok(Parsed::Complete(request, head_len))
}

/// A header that may appear at most once: a second copy makes the request ambiguous.
fn set_once<'b>(
    slot: &mut Option<&'b [u8]>,
    value: &'b [u8],
    duplicate: HandshakeError,
) -> Result<(), HandshakeError> {
    if slot.replace(value).is_some() { Err(duplicate) } else { Ok(()) }
}

/// A key is 24 base64 characters that decode to exactly 16 bytes (section 4.1, item 7).
fn is_valid_key(key: &[u8]) -> bool {
    let mut decoded = [0u8; 18];
    key.len() == 24 && matches!(BASE64.decode_slice(key, &mut decoded), Ok(16))
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(|t| t.trim_matches([' ', '\t'])).filter(|t| !t.is_empty())
}

/// Whether a comma-separated header value contains `token`, compared case-insensitively.
fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| trim_ows(t).eq_ignore_ascii_case(token.as_bytes()))
}

/// The operator's decisions about an otherwise valid upgrade. Implement it to plug in custom
/// checks; [`StaticPolicy`] covers the configuration-file cases.
pub trait HandshakePolicy {
    /// Whether a request from `origin` may connect. `None` means the client sent no `Origin`.
    fn allows_origin(&self, origin: Option<&str>) -> bool;

    /// The subprotocol to speak, chosen from the ones the client offered (or none).
    fn select_subprotocol<'b>(&self, request: &Request<'_, 'b>) -> Option<&'b str>;
}

/// A policy from configuration: an Origin allow-list and the subprotocols the server speaks.
#[derive(Clone, Debug, Default)]
pub struct StaticPolicy {
    /// Origins allowed to connect, compared case-insensitively. Empty allows every origin.
    /// Requests without `Origin` come from non-browser clients, which an Origin check does not
    /// protect against, and are allowed.
    pub allowed_origins: Vec<String>,
    /// Subprotocols the server speaks; the client's most preferred one that is here is chosen.
    pub subprotocols: Vec<String>,
}

impl HandshakePolicy for StaticPolicy {
    fn allows_origin(&self, origin: Option<&str>) -> bool {
        match origin {
            None => true,
            Some(origin) => self.allowed_origins.is_empty() || origin_listed(&self.allowed_origins, origin),
        }
    }

    fn select_subprotocol<'b>(&self, request: &Request<'_, 'b>) -> Option<&'b str> {
        request.subprotocols().find(|offer| self.subprotocols.iter().any(|ours| ours == offer))
    }
}

/// Whether `origin` is on `allow_list`. Compared case-insensitively: scheme and host are, and
/// browsers serialize both in lower case. The one rule for upgrades and plain endpoints alike.
pub fn origin_listed(allow_list: &[String], origin: &str) -> bool {
    allow_list.iter().any(|listed| listed.eq_ignore_ascii_case(origin))
}

/// An upgrade the server has decided to accept: everything the 101 response needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted<'b> {
    /// `Sec-WebSocket-Accept`.
    pub accept_key: AcceptKey,
    /// The chosen subprotocol, echoed in `Sec-WebSocket-Protocol`.
    pub subprotocol: Option<&'b str>,
}

impl Accepted<'_> {
    /// Writes the `101 Switching Protocols` response.
    pub fn write_response(&self, dst: &mut impl BufMut) {
        self.write_response_with_extensions(dst, None);
    }

    /// Writes the `101 Switching Protocols` response, naming the extensions agreed (the value of
    /// `Sec-WebSocket-Extensions`, such as permessage-deflate's answer).
    pub fn write_response_with_extensions(&self, dst: &mut impl BufMut, extensions: Option<&str>) {
        dst.put_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n");
        put_header(dst, b"Sec-WebSocket-Accept", self.accept_key.as_bytes());
        if let Some(protocol) = self.subprotocol {
            put_header(dst, b"Sec-WebSocket-Protocol", protocol.as_bytes());
        }
        if let Some(extensions) = extensions {
            put_header(dst, b"Sec-WebSocket-Extensions", extensions.as_bytes());
        }
        dst.put_slice(b"\r\n");
    }
}

/// Applies the operator's policy to a valid request and computes the accept key.
pub fn accept<'b>(
    request: &Request<'_, 'b>,
    policy: &impl HandshakePolicy,
) -> Result<Accepted<'b>, HandshakeError> {
    if !policy.allows_origin(request.origin) {
        return Err(HandshakeError::ForbiddenOrigin);
    }
    let subprotocol = policy.select_subprotocol(request);
    Ok(Accepted { accept_key: AcceptKey::for_key(request.key), subprotocol })
}

/// Why a server's answer to our upgrade request is not a usable WebSocket connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientHandshakeError {
    /// Not parseable as an HTTP response, or over the size limit.
    Malformed,
    /// The server answered with this status instead of 101.
    Rejected(u16),
    /// A 101 without `Upgrade: websocket` and `Connection: upgrade`.
    NotUpgraded,
    /// `Sec-WebSocket-Accept` is missing or does not match our key.
    BadAcceptKey,
    /// The server chose a subprotocol we did not offer.
    UnexpectedSubprotocol,
    /// The server named an extension we did not offer, or answered our offer with parameters
    /// RFC 7692 does not allow (section 9.1: the client must fail the connection).
    UnexpectedExtension,
}

impl fmt::Display for ClientHandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientHandshakeError::Malformed => write!(f, "malformed handshake response"),
            ClientHandshakeError::Rejected(status) => write!(f, "server answered HTTP {status}"),
            ClientHandshakeError::NotUpgraded => write!(f, "101 without a WebSocket upgrade"),
            ClientHandshakeError::BadAcceptKey => write!(f, "wrong Sec-WebSocket-Accept"),
            ClientHandshakeError::UnexpectedSubprotocol => {
                write!(f, "server chose a subprotocol we did not offer")
            }
            ClientHandshakeError::UnexpectedExtension => {
                write!(f, "server answered with an extension we did not offer")
            }
        }
    }
}

impl std::error::Error for ClientHandshakeError {}

/// The outcome of [`ClientHandshake::parse_response`].
#[derive(Debug, PartialEq, Eq)]
pub enum ServerResponse<'b> {
    /// The response header section is not complete yet.
    Partial,
    /// The server accepted; `subprotocol` is its choice, and `len` the header section's length
    /// (bytes after it are already WebSocket frames).
    Upgraded {
        /// The subprotocol the server picked.
        subprotocol: Option<&'b str>,
        /// Bytes of the response's header section.
        len: usize,
        /// permessage-deflate as the server agreed it, when we offered it and it accepted.
        deflate: Option<Agreement>,
    },
}

/// The client side of one handshake: the key we sent and the accept value we expect back.
#[derive(Clone, Copy, Debug)]
pub struct ClientHandshake {
    key: [u8; 24],
    expected_accept: AcceptKey,
    offers_deflate: bool,
}

impl ClientHandshake {
    /// A handshake for a 16-byte nonce, which the caller draws at random (section 4.1 requires a
    /// fresh random key per connection; drawing it is the caller's business, keeping this module
    /// deterministic).
    pub fn new(nonce: [u8; 16]) -> ClientHandshake {
        let mut key = [0u8; 24];
        // 16 bytes always encode to exactly 24 base64 characters.
        let _ = BASE64.encode_slice(nonce, &mut key);
        ClientHandshake { key, expected_accept: AcceptKey::for_key(&key), offers_deflate: false }
    }

    /// The same handshake offering permessage-deflate the way browsers do
    /// ([`deflate::CLIENT_OFFER`](super::deflate::CLIENT_OFFER)).
    pub fn offering_deflate(mut self) -> ClientHandshake {
        self.offers_deflate = true;
        self
    }

    /// The `Sec-WebSocket-Key` we send.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Writes the upgrade request for `path` on `host`, offering `subprotocols`.
    pub fn write_request(&self, dst: &mut impl BufMut, host: &str, path: &str, subprotocols: &[&str]) {
        self.write_request_with_headers(dst, host, path, subprotocols, &[]);
    }

    /// Writes the upgrade request like [`ClientHandshake::write_request`], plus `extra_headers`
    /// (a proxy's `X-Forwarded-*`, `Cookie`, `Authorization`, `Origin`). A header whose name or value
    /// holds a CR or LF is left out rather than allowed to split the request.
    pub fn write_request_with_headers(
        &self,
        dst: &mut impl BufMut,
        host: &str,
        path: &str,
        subprotocols: &[&str],
        extra_headers: &[(&str, &[u8])],
    ) {
        dst.put_slice(b"GET ");
        dst.put_slice(path.as_bytes());
        dst.put_slice(b" HTTP/1.1\r\n");
        put_header(dst, b"Host", host.as_bytes());
        dst.put_slice(b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n");
        put_header(dst, b"Sec-WebSocket-Key", &self.key);
        for (i, protocol) in subprotocols.iter().enumerate() {
            dst.put_slice(if i == 0 { b"Sec-WebSocket-Protocol: " } else { b", " });
            dst.put_slice(protocol.as_bytes());
        }
        if !subprotocols.is_empty() {
            dst.put_slice(b"\r\n");
        }
        if self.offers_deflate {
            put_header(dst, b"Sec-WebSocket-Extensions", CLIENT_OFFER.as_bytes());
        }
        let splits = |bytes: &[u8]| bytes.iter().any(|&b| b == b'\r' || b == b'\n');
        for (name, value) in extra_headers {
            if !name.is_empty() && !splits(name.as_bytes()) && !splits(value) {
                put_header(dst, name.as_bytes(), value);
            }
        }
        dst.put_slice(b"\r\n");
    }

    /// Checks the server's response at the start of `buf` (section 4.1, the client's checks).
    pub fn parse_response<'b>(
        &self,
        buf: &'b [u8],
        offered: &[&str],
    ) -> Result<ServerResponse<'b>, ClientHandshakeError> {
        let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let len = match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) if len <= DEFAULT_MAX_HEADER_BYTES => len,
            Ok(httparse::Status::Partial) if buf.len() < DEFAULT_MAX_HEADER_BYTES => {
                return Ok(ServerResponse::Partial);
            }
            _ => return Err(ClientHandshakeError::Malformed),
        };
        match response.code {
            Some(101) => {}
            Some(status) => return Err(ClientHandshakeError::Rejected(status)),
            None => return Err(ClientHandshakeError::Malformed),
        }
        let mut upgrade = false;
        let mut connection_upgrade = false;
        let mut accept_ok = false;
        let mut subprotocol = None;
        let mut deflate = None;
        for header in response.headers.iter() {
            if header.name.eq_ignore_ascii_case("Upgrade") {
                upgrade |= has_token(header.value, "websocket");
            } else if header.name.eq_ignore_ascii_case("Connection") {
                connection_upgrade |= has_token(header.value, "upgrade");
            } else if header.name.eq_ignore_ascii_case("Sec-WebSocket-Accept") {
                accept_ok = trim_ows(header.value) == self.expected_accept.as_bytes();
            } else if header.name.eq_ignore_ascii_case("Sec-WebSocket-Protocol") {
                let chosen = std::str::from_utf8(trim_ows(header.value))
                    .map_err(|_| ClientHandshakeError::UnexpectedSubprotocol)?;
                if !offered.contains(&chosen) {
                    return Err(ClientHandshakeError::UnexpectedSubprotocol);
                }
                subprotocol = Some(chosen);
            } else if header.name.eq_ignore_ascii_case("Sec-WebSocket-Extensions") {
                let answer = std::str::from_utf8(header.value).ok().filter(|_| self.offers_deflate);
                // One answer to our one offer; a second header is an extension we did not offer.
                match answer.and_then(parse_answer) {
                    Some(agreement) if deflate.is_none() => deflate = Some(agreement),
                    _ => return Err(ClientHandshakeError::UnexpectedExtension),
                }
            }
        }
        if !upgrade || !connection_upgrade {
            return Err(ClientHandshakeError::NotUpgraded);
        }
        if !accept_ok {
            return Err(ClientHandshakeError::BadAcceptKey);
        }
        Ok(ServerResponse::Upgraded { subprotocol, len, deflate })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_cannot_start_a_request_is_told_apart_from_a_partial_one() {
        for partial in
            [&b""[..], b"G", b"GET", b"GET ", b"GET /echo HT", b"\r\nGET /", b"M-SEARCH * HTTP/1.1"]
        {
            assert!(could_start_request(partial), "{:?}", String::from_utf8_lossy(partial));
        }
        // A TLS ClientHello's record header, an SSLv2 hello, a space first, a control character.
        for garbage in [&[0x16u8, 0x03, 0x01, 0x02, 0x00][..], &[0x80, 0x2e, 0x01], b" GET /", b"GE\x01T /"] {
            assert!(!could_start_request(garbage), "{garbage:?}");
        }
    }
}
