//! The plain HTTP endpoints: `POST /publish/{topic}` (and its CORS preflight), `GET /metrics`,
//! `GET /healthz`.
//!
//! Sans I/O like the protocol core: [`read_request`] parses a complete header section under the
//! same message rules as the WebSocket upgrade ([`RequestRules`]: one `Host`, a clean target,
//! `Content-Length` digits only, no `Transfer-Encoding`) and admits it (the Origin allow-list on
//! every endpoint, the publish key on `/publish`), writing the refusal itself when it does not;
//! [`answer`] writes the whole response to an admitted request and its body into a buffer, asking
//! the rest of the gateway (through [`Endpoints`]) only for what it must: publishing, the metrics
//! text, whether it is draining, and the access settings. HTTP/1.1 keep-alive is honoured so that
//! scrapers and publishers can reuse a connection. Must never: read a body without a declared
//! length, accept one over the limit, or keep a connection open after a refusal (its framing, or
//! its sender, is not to be trusted with a next request).

use std::fmt::Write as _;

use bytes::BufMut;

use super::auth::Authenticator;
use super::cors::{self, OriginCheck};
use super::publish_key::{Credentials, PublishKey};
use super::router::Route;
use crate::metrics::HttpRefusal;
use crate::proto::handshake::{reason_phrase, write_error_response};
use crate::proto::http1::{RequestError, RequestRules, check_target};
use crate::proto::message::MessageKind;

/// What the HTTP endpoints need from the gateway.
pub trait Endpoints {
    /// Whether the gateway is draining (health turns 503 so load balancers stop sending traffic).
    fn is_draining(&self) -> bool;
    /// Whether the node serves with a part missing: its `--broker` is unreachable, so it delivers
    /// locally only. Health stays 200 (body `degraded`): the node still serves its clients, and
    /// taking every node out of rotation when the shared broker fails would turn a partial outage
    /// into a total one. Monitoring alerts on the body or on `ringgate_broker_connected`.
    fn is_degraded(&self) -> bool {
        false
    }
    /// Appends the Prometheus text exposition of every metric.
    fn render_metrics(&self, out: &mut String);
    /// Publishes a message to a topic; returns the number of subscribers it reached.
    fn publish(&self, topic: &str, kind: MessageKind, payload: &[u8]) -> usize;
    /// The origins browsers may call from (`--allowed-origin`, shared with the upgrade); empty
    /// means no list: every origin may send, and no CORS header is sent.
    fn allowed_origins(&self) -> &[String];
    /// The key `POST /publish` requires (`--publish-key-file`), if one is configured.
    fn publish_key(&self) -> Option<&PublishKey>;
    /// The JWT verifier, when JWT keys are configured: a token with publish rights on the topic
    /// may publish too.
    fn authenticator(&self) -> Option<&Authenticator>;
}

/// The parts of a plain HTTP request the endpoints act on; borrows the request bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlainRequest<'b> {
    /// The request method.
    pub method: &'b str,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// The body's length from `Content-Length` (0 without one).
    pub content_length: usize,
    /// The `Content-Type`, if given.
    pub content_type: Option<&'b str>,
    /// The `Origin`, if given once as UTF-8.
    pub origin: Option<&'b str>,
    /// `Origin` was sent twice, or not as UTF-8: judged like an origin not on the list.
    pub bad_origin: bool,
    /// The first `Authorization` value, if any.
    pub authorization: Option<&'b [u8]>,
    /// `Authorization` was sent more than once.
    pub authorization_repeated: bool,
    /// `Access-Control-Request-Method` was sent: an `OPTIONS` with it is a CORS preflight.
    pub preflight: bool,
}

/// Why a plain request is refused. Each knows its status, its answer, and its metrics reason;
/// every refusal closes the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not parseable as HTTP/1.x (400).
    Malformed,
    /// Breaks a message rule of RFC 9112 / RFC 9110 (400, or 411/501 for transfer codings).
    Message(RequestError),
    /// The declared body is over the message size limit (413).
    PayloadTooLarge,
    /// The Origin is not on the allow-list (403).
    ForbiddenOrigin,
    /// The publish API needs a key and none was presented (401, `WWW-Authenticate: Bearer`).
    Unauthorized,
    /// Bearer credentials that are not well formed (400, `error="invalid_request"`).
    InvalidRequest,
    /// A bearer token that is not the key, nor a valid JWT (401, `error="invalid_token"`).
    InvalidToken,
    /// A valid JWT that does not grant publishing to the topic (403).
    ForbiddenTopic,
}

impl Refusal {
    /// The response status.
    pub fn status(self) -> u16 {
        match self {
            Refusal::Malformed | Refusal::InvalidRequest => 400,
            Refusal::Message(error) => error.status(),
            Refusal::PayloadTooLarge => 413,
            Refusal::ForbiddenOrigin | Refusal::ForbiddenTopic => 403,
            Refusal::Unauthorized | Refusal::InvalidToken => 401,
        }
    }

    /// The `reason` it is counted under in `ringgate_http_refusals_total`.
    pub fn reason(self) -> HttpRefusal {
        match self {
            Refusal::Malformed | Refusal::Message(RequestError::BadTarget) => HttpRefusal::Malformed,
            Refusal::Message(RequestError::BadHost) => HttpRefusal::BadHost,
            Refusal::Message(RequestError::ChunkedBody) => HttpRefusal::LengthRequired,
            Refusal::Message(RequestError::UnknownTransferCoding) => HttpRefusal::NotImplemented,
            Refusal::Message(_) => HttpRefusal::BadFraming,
            Refusal::PayloadTooLarge => HttpRefusal::TooLarge,
            Refusal::ForbiddenOrigin => HttpRefusal::ForbiddenOrigin,
            Refusal::Unauthorized => HttpRefusal::Unauthorized,
            Refusal::InvalidRequest => HttpRefusal::InvalidRequest,
            Refusal::InvalidToken => HttpRefusal::InvalidToken,
            Refusal::ForbiddenTopic => HttpRefusal::ForbiddenTopic,
        }
    }

    fn body(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed HTTP request\n",
            Refusal::Message(error) => error.message(),
            Refusal::PayloadTooLarge => "the body is over the message size limit\n",
            Refusal::ForbiddenOrigin => "origin not allowed\n",
            Refusal::Unauthorized => "publishing needs Authorization: Bearer <key>\n",
            Refusal::InvalidRequest => "malformed Authorization: use one Bearer <key>\n",
            Refusal::InvalidToken => "wrong publish key, or a token that is not valid\n",
            Refusal::ForbiddenTopic => "the token does not grant publishing to this topic\n",
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 section 3): none for a missing key, so the
    /// client learns the scheme without being told it erred.
    fn challenge(self) -> Option<&'static str> {
        match self {
            Refusal::Unauthorized => Some("Bearer realm=\"ringgate\""),
            Refusal::InvalidRequest => Some("Bearer realm=\"ringgate\", error=\"invalid_request\""),
            Refusal::InvalidToken => Some("Bearer realm=\"ringgate\", error=\"invalid_token\""),
            _ => None,
        }
    }

    /// Writes the refusal, with `Connection: close`, and `headers` (CORS) beside its own.
    fn write_response(self, dst: &mut impl BufMut, headers: &[(&str, &str)]) {
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(challenge) = self.challenge() {
            all.push(("WWW-Authenticate", challenge));
        }
        write_error_response(dst, self.status(), &all, self.body());
    }
}

/// Parses a complete header section of a plain HTTP request, under the same message rules as the
/// upgrade. `max_body` bounds `Content-Length`.
pub fn parse_plain_request(head: &[u8], max_body: usize) -> Result<PlainRequest<'_>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; crate::proto::handshake::DEFAULT_MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(Refusal::Malformed),
    }
    let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version) else {
        return Err(Refusal::Malformed);
    };
    check_target(target.as_bytes()).map_err(Refusal::Message)?;
    let mut rules = RequestRules::new(version);
    let mut request = PlainRequest {
        method,
        keep_alive: version >= 1,
        content_length: 0,
        content_type: None,
        origin: None,
        bad_origin: false,
        authorization: None,
        authorization_repeated: false,
        preflight: false,
    };
    for header in parsed.headers.iter() {
        rules.header(header.name, header.value).map_err(Refusal::Message)?;
        let name = header.name;
        if name.eq_ignore_ascii_case("Authorization") {
            request.authorization_repeated |= request.authorization.replace(header.value).is_some();
            continue;
        }
        let value = std::str::from_utf8(header.value).map(str::trim);
        if name.eq_ignore_ascii_case("Origin") {
            match value {
                Ok(origin) if request.origin.is_none() && !request.bad_origin => {
                    request.origin = Some(origin)
                }
                _ => (request.origin, request.bad_origin) = (None, true),
            }
        } else if name.eq_ignore_ascii_case("Access-Control-Request-Method") {
            request.preflight = true;
        } else if name.eq_ignore_ascii_case("Connection") {
            for token in value.map_err(|_| Refusal::Malformed)?.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    request.keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    request.keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("Content-Type") {
            request.content_type = Some(value.map_err(|_| Refusal::Malformed)?);
        }
    }
    let content_length = rules.finish().map_err(Refusal::Message)?;
    request.content_length = usize::try_from(content_length)
        .ok()
        .filter(|&length| length <= max_body)
        .ok_or(Refusal::PayloadTooLarge)?;
    Ok(request)
}

/// Decides whether an otherwise valid request for `route` is served: its `Origin` must be allowed
/// (every endpoint), and a `POST` to the publish API must carry the key when one is configured
/// (a preflight carries no credentials, and needs none).
pub fn admit<'b>(
    route: Route<'_>,
    request: &PlainRequest<'b>,
    endpoints: &impl Endpoints,
) -> Result<OriginCheck<'b>, Refusal> {
    if request.bad_origin {
        return Err(Refusal::ForbiddenOrigin);
    }
    let origin = cors::check_origin(endpoints.allowed_origins(), request.origin)
        .map_err(|_| Refusal::ForbiddenOrigin)?;
    if let (Route::Publish { topic }, "POST") = (route, request.method) {
        admit_publisher(topic, request, endpoints)?;
    }
    Ok(origin)
}

/// A publisher needs the publish key, or a JWT whose permissions claim lets it publish to `topic`,
/// once either is configured (with neither, the publish API is open, as documented).
fn admit_publisher(
    topic: &str,
    request: &PlainRequest<'_>,
    endpoints: &impl Endpoints,
) -> Result<(), Refusal> {
    let key = endpoints.publish_key();
    let jwt = endpoints.authenticator();
    if key.is_none() && jwt.is_none() {
        return Ok(());
    }
    // The key's checks also judge the shape of the credentials (one `Bearer` b64token).
    let credentials = match key {
        Some(key) => key.check(request.authorization, request.authorization_repeated),
        None => PublishKey::shape(request.authorization, request.authorization_repeated),
    };
    match credentials {
        Credentials::Valid => Ok(()),
        Credentials::Missing => Err(Refusal::Unauthorized),
        Credentials::Malformed => Err(Refusal::InvalidRequest),
        Credentials::Wrong => {
            let (Some(jwt), Some(token)) = (jwt, request.authorization.and_then(bearer_token)) else {
                return Err(Refusal::InvalidToken);
            };
            match jwt.verify(token) {
                Ok(identity) if identity.grants.may_publish(topic) => Ok(()),
                Ok(_) => Err(Refusal::ForbiddenTopic),
                Err(_) => Err(Refusal::InvalidToken),
            }
        }
    }
}

/// The token of a `Bearer` credential, as text.
fn bearer_token(authorization: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(crate::proto::http1::trim_ows(authorization)).ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Parses and admits a plain request for `route` (see [`parse_plain_request`] and [`admit`]).
/// A refused request has its answer written to `dst` already; the caller closes the connection.
pub fn read_request<'b>(
    route: Route<'_>,
    head: &'b [u8],
    max_body: usize,
    endpoints: &impl Endpoints,
    dst: &mut impl BufMut,
) -> Result<PlainRequest<'b>, Refusal> {
    let request =
        parse_plain_request(head, max_body).inspect_err(|refusal| refusal.write_response(dst, &[]))?;
    admit(route, &request, endpoints).map(|_| request).inspect_err(|refusal| {
        // The page that sent it may read why (a missing key), if its origin is allowed.
        let mut headers = Vec::new();
        if let Ok(origin) = cors::check_origin(endpoints.allowed_origins(), request.origin) {
            origin.headers(matches!(route, Route::Publish { .. }), &mut headers);
        } else {
            headers.push(("Vary", "Origin"));
        }
        refusal.write_response(dst, &headers);
    })
}

/// Text if the client says it is text (`text/*`, JSON) and it is valid UTF-8; binary otherwise, so
/// that subscribers never receive a text frame that is not UTF-8.
pub fn publish_kind(content_type: Option<&str>, body: &[u8]) -> MessageKind {
    let media_type = content_type.map(|ct| ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    let says_text = media_type
        .is_some_and(|mt| mt.starts_with("text/") || mt == "application/json" || mt.ends_with("+json"));
    if says_text && simdutf8::basic::from_utf8(body).is_ok() {
        MessageKind::Text
    } else {
        MessageKind::Binary
    }
}

/// What [`answer`] did, for the caller's connection handling and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answered {
    /// The response status.
    pub status: u16,
    /// Whether the connection stays open for another request.
    pub keep_alive: bool,
}

/// Writes the full response to an admitted plain request for `route` (an HTTP route) with its
/// `body`. A `HEAD` request gets the headers a `GET` would, without the body.
pub fn answer(
    route: Route<'_>,
    request: &PlainRequest<'_>,
    body: &[u8],
    endpoints: &impl Endpoints,
    dst: &mut Vec<u8>,
) -> Answered {
    // While draining, every answer closes its connection.
    let keep_alive = request.keep_alive && !endpoints.is_draining();
    let is = |method: &str| request.method == method;
    let readable = is("GET") || is("HEAD");
    let is_publish = matches!(route, Route::Publish { .. });
    let origin = cors::check_origin(endpoints.allowed_origins(), request.origin)
        .unwrap_or(OriginCheck { listed: true, allowed: None });
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(6);
    origin.headers(is_publish, &mut headers);
    const TEXT: &str = "text/plain; charset=utf-8";
    let mut text = String::new();
    let (status, content_type, response_body): (u16, &str, &[u8]) = match route {
        Route::Healthz if readable => {
            let (status, words) = if endpoints.is_draining() {
                (503, "draining\n")
            } else if endpoints.is_degraded() {
                (200, "degraded\n")
            } else {
                (200, "ok\n")
            };
            (status, TEXT, words.as_bytes())
        }
        Route::Metrics if readable => {
            text.reserve(16 * 1024);
            endpoints.render_metrics(&mut text);
            (200, "text/plain; version=0.0.4; charset=utf-8", text.as_bytes())
        }
        Route::Publish { topic } if is("POST") => {
            let kind = publish_kind(request.content_type, body);
            let reached = endpoints.publish(topic, kind, body);
            let kind_name = if kind == MessageKind::Text { "text" } else { "binary" };
            let _ = writeln!(
                text,
                "{{\"topic\":\"{}\",\"kind\":\"{kind_name}\",\"subscribers\":{reached}}}",
                JsonEscaped(topic)
            );
            (202, "application/json", text.as_bytes())
        }
        Route::Publish { .. } if is("OPTIONS") => {
            headers.push(("Allow", "OPTIONS, POST"));
            if request.preflight {
                origin.preflight_headers(&mut headers);
            }
            (204, TEXT, &[])
        }
        Route::Healthz | Route::Metrics => {
            headers.push(("Allow", "GET, HEAD"));
            (405, TEXT, b"use GET\n")
        }
        Route::Publish { .. } => {
            headers.push(("Allow", "OPTIONS, POST"));
            (405, TEXT, b"use POST\n")
        }
        Route::Echo | Route::PubSub { .. } | Route::Proxy { .. } => {
            // Not an HTTP route; the caller upgrades these. Answer sanely rather than panic.
            write_response(dst, 426, TEXT, b"upgrade required\n", false, &[("Upgrade", "websocket")]);
            return Answered { status: 426, keep_alive: false };
        }
    };
    let start = dst.len();
    write_response(dst, status, content_type, response_body, keep_alive, &headers);
    if is("HEAD") {
        dst.truncate(start + (dst.len() - start - response_body.len()));
    }
    Answered { status, keep_alive }
}

/// Writes a complete HTTP/1.1 response with a `Content-Length` body; a 204 has neither body nor
/// `Content-Length` nor `Content-Type` (RFC 9110 sections 8.6 and 15.3.5).
pub fn write_response(
    dst: &mut impl BufMut,
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    extra_headers: &[(&str, &str)],
) {
    let no_content = status == 204;
    let mut head = String::with_capacity(160);
    let _ = write!(head, "HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    if !no_content {
        let _ = write!(head, "Content-Type: {content_type}\r\nContent-Length: {}\r\n", body.len());
    }
    head.push_str(if keep_alive { "Connection: keep-alive\r\n" } else { "Connection: close\r\n" });
    for (name, value) in extra_headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("\r\n");
    dst.put_slice(head.as_bytes());
    if !no_content {
        dst.put_slice(body);
    }
}

/// A string written as JSON string contents.
struct JsonEscaped<'a>(&'a str);

impl std::fmt::Display for JsonEscaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Fake {
        draining: bool,
        degraded: bool,
        published: RefCell<Vec<(String, MessageKind, Vec<u8>)>>,
        origins: Vec<String>,
        key: Option<PublishKey>,
    }

    impl Fake {
        fn guarded() -> Fake {
            Fake {
                origins: vec!["https://app.example".into()],
                key: PublishKey::new(b"k3y").ok(),
                ..Fake::default()
            }
        }
    }

    impl Endpoints for Fake {
        fn is_draining(&self) -> bool {
            self.draining
        }
        fn is_degraded(&self) -> bool {
            self.degraded
        }
        fn render_metrics(&self, out: &mut String) {
            out.push_str("# TYPE x counter\nx_total 1\n");
        }
        fn publish(&self, topic: &str, kind: MessageKind, payload: &[u8]) -> usize {
            self.published.borrow_mut().push((topic.into(), kind, payload.to_vec()));
            7
        }
        fn allowed_origins(&self) -> &[String] {
            &self.origins
        }
        fn publish_key(&self) -> Option<&PublishKey> {
            self.key.as_ref()
        }
        fn authenticator(&self) -> Option<&Authenticator> {
            None
        }
    }

    /// The answer to `raw` (head and body): the response text and whether the connection stays
    /// open, through [`read_request`] and [`answer`] as the connection calls them.
    fn respond(raw: &str, route: Route<'_>, fake: &Fake) -> (String, bool) {
        let head_end = raw.find("\r\n\r\n").expect("complete head") + 4;
        let mut out = Vec::new();
        let keep_alive = match read_request(route, &raw.as_bytes()[..head_end], 1024, fake, &mut out) {
            Ok(request) => answer(route, &request, &raw.as_bytes()[head_end..], fake, &mut out).keep_alive,
            Err(_) => false,
        };
        (String::from_utf8(out).expect("utf-8 response"), keep_alive)
    }

    fn status_of(text: &str) -> &str {
        &text[9..12]
    }

    #[test]
    fn healthz_is_200_while_serving_and_503_while_draining() {
        let (text, keep) =
            respond("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", Route::Healthz, &Fake::default());
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("\r\n\r\nok\n"), "{text}");
        assert!(keep);
        let draining = Fake { draining: true, ..Fake::default() };
        let (text, keep) = respond("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", Route::Healthz, &draining);
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"));
        assert!(!keep);
    }

    #[test]
    fn healthz_says_degraded_but_stays_200_without_the_broker() {
        let degraded = Fake { degraded: true, ..Fake::default() };
        let (text, keep) = respond("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", Route::Healthz, &degraded);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("\r\n\r\ndegraded\n"), "{text}");
        assert!(keep);
        let both = Fake { degraded: true, draining: true, ..Fake::default() };
        let (text, _) = respond("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", Route::Healthz, &both);
        assert!(text.starts_with("HTTP/1.1 503 "), "draining wins: {text}");
    }

    #[test]
    fn publish_answers_202_with_the_subscriber_count() {
        let fake = Fake::default();
        let raw = "POST /publish/news HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}";
        let (text, keep) = respond(raw, Route::Publish { topic: "news" }, &fake);
        assert!(text.starts_with("HTTP/1.1 202 Accepted\r\n"), "{text}");
        assert!(text.ends_with("{\"topic\":\"news\",\"kind\":\"text\",\"subscribers\":7}\n"), "{text}");
        assert!(keep);
        assert_eq!(fake.published.borrow()[0], ("news".into(), MessageKind::Text, b"{\"a\":1}".to_vec()));
    }

    #[test]
    fn text_only_when_declared_and_valid_utf8() {
        assert_eq!(publish_kind(Some("text/plain; charset=utf-8"), b"hi"), MessageKind::Text);
        assert_eq!(publish_kind(Some("application/vnd.api+json"), b"{}"), MessageKind::Text);
        assert_eq!(publish_kind(Some("text/plain"), &[0xff]), MessageKind::Binary);
        assert_eq!(publish_kind(Some("application/octet-stream"), b"hi"), MessageKind::Binary);
        assert_eq!(publish_kind(None, b"hi"), MessageKind::Binary);
    }

    #[test]
    fn wrong_methods_get_405_with_allow() {
        let (text, _) = respond(
            "GET /publish/t HTTP/1.1\r\nHost: x\r\n\r\n",
            Route::Publish { topic: "t" },
            &Fake::default(),
        );
        assert!(text.starts_with("HTTP/1.1 405 ") && text.contains("Allow: OPTIONS, POST\r\n"), "{text}");
        let (text, _) =
            respond("POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Route::Metrics, &Fake::default());
        assert!(text.starts_with("HTTP/1.1 405 ") && text.contains("Allow: GET, HEAD\r\n"), "{text}");
    }

    #[test]
    fn bodies_need_a_bounded_declared_length() {
        let refusal = |raw: &[u8]| parse_plain_request(raw, 10).err();
        let chunked = b"POST /publish/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(refusal(chunked), Some(Refusal::Message(RequestError::ChunkedBody)));
        assert_eq!(refusal(chunked).map(Refusal::status), Some(411));
        let big = b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n";
        assert_eq!(refusal(big), Some(Refusal::PayloadTooLarge));
        let bad = b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n";
        assert_eq!(refusal(bad), Some(Refusal::Message(RequestError::BadContentLength)));
        let conflicting =
            b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(refusal(conflicting), Some(Refusal::Message(RequestError::BadContentLength)));
    }

    #[test]
    fn plain_requests_pass_the_upgrades_message_rules() {
        let refusal = |raw: &str| parse_plain_request(raw.as_bytes(), 10).err().map(Refusal::status);
        assert_eq!(refusal("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), None);
        assert_eq!(refusal("GET /metrics HTTP/1.1\r\n\r\n"), Some(400), "no Host");
        assert_eq!(refusal("GET /metrics HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n"), Some(400));
        assert_eq!(refusal("GET /metrics HTTP/1.0\r\n\r\n"), None, "HTTP/1.0 may leave Host out");
        let both =
            "POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(refusal(both), Some(400));
        let gzip = "POST /publish/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(refusal(gzip), Some(501));
        assert_eq!(refusal("POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n"), Some(400));
        assert_eq!(refusal("POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n"), Some(400));
    }

    #[test]
    fn keep_alive_follows_http_version_and_connection_header() {
        let parse = |raw: &str| parse_plain_request(raw.as_bytes(), 0).map(|r| r.keep_alive);
        assert_eq!(parse("GET /m HTTP/1.1\r\nHost: x\r\n\r\n"), Ok(true));
        assert_eq!(parse("GET /m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), Ok(false));
        assert_eq!(parse("GET /m HTTP/1.0\r\n\r\n"), Ok(false));
        assert_eq!(parse("GET /m HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"), Ok(true));
    }

    #[test]
    fn refusals_close_the_connection_and_say_why() {
        let (text, keep) = respond("GET /metrics HTTP/1.1\r\n\r\n", Route::Metrics, &Fake::default());
        assert_eq!(status_of(&text), "400", "{text}");
        assert!(text.contains("Connection: close\r\n") && !keep, "{text}");
    }

    #[test]
    fn the_publish_key_is_required_with_rfc_6750_challenges() {
        let fake = Fake::guarded();
        let post = |auth: &str| {
            let raw = format!("POST /publish/t HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1\r\n\r\nx");
            respond(&raw, Route::Publish { topic: "t" }, &fake).0
        };
        let text = post("");
        assert_eq!(status_of(&text), "401", "{text}");
        assert!(text.contains("WWW-Authenticate: Bearer realm=\"ringgate\"\r\n"), "{text}");
        let text = post("Authorization: Bearer nope\r\n");
        assert_eq!(status_of(&text), "401", "{text}");
        assert!(text.contains("error=\"invalid_token\""), "{text}");
        let text = post("Authorization: Bearer\r\n");
        assert_eq!(status_of(&text), "400", "{text}");
        assert!(text.contains("error=\"invalid_request\""), "{text}");
        assert!(fake.published.borrow().is_empty(), "nothing published without the key");
        let text = post("Authorization: Bearer k3y\r\n");
        assert_eq!(status_of(&text), "202", "{text}");
        assert_eq!(fake.published.borrow().len(), 1);
        // The other endpoints need no key.
        let (text, _) = respond("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", Route::Healthz, &fake);
        assert_eq!(status_of(&text), "200", "{text}");
    }

    #[test]
    fn listed_origins_get_cors_and_others_403_on_every_endpoint() {
        let fake = Fake::guarded();
        let publish = Route::Publish { topic: "t" };
        let preflight = "OPTIONS /publish/t HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n\
                         Access-Control-Request-Method: POST\r\n\
                         Access-Control-Request-Headers: authorization, content-type\r\n\r\n";
        let (text, keep) = respond(preflight, publish, &fake);
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n") && keep, "{text}");
        for header in [
            "Access-Control-Allow-Origin: https://app.example\r\n",
            "Access-Control-Allow-Methods: POST\r\n",
            "Access-Control-Allow-Headers: Authorization, Content-Type\r\n",
            "Access-Control-Max-Age: 600\r\n",
            "Vary: Origin\r\n",
        ] {
            assert!(text.contains(header), "{header:?} missing from {text}");
        }
        assert!(!text.contains("Content-Length") && text.ends_with("\r\n\r\n"), "a 204 has no body: {text}");

        let post = "POST /publish/t HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n\
                    Authorization: Bearer k3y\r\nContent-Length: 1\r\n\r\nx";
        let (text, _) = respond(post, publish, &fake);
        assert_eq!(status_of(&text), "202", "{text}");
        assert!(text.contains("Access-Control-Allow-Origin: https://app.example\r\n"), "{text}");
        assert!(text.contains("Vary: Origin\r\n") && !text.contains('*'), "{text}");
        // Without the key, a listed page may still read why.
        let keyless = post.replace("Authorization: Bearer k3y\r\n", "");
        let (text, _) = respond(&keyless, publish, &fake);
        assert_eq!(status_of(&text), "401", "{text}");
        assert!(text.contains("Access-Control-Allow-Origin: https://app.example\r\n"), "{text}");

        for (raw, route) in [
            (post.replace("https://app.example", "http://evil.example"), publish),
            (preflight.replace("https://app.example", "http://evil.example"), publish),
            ("GET /metrics HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\n\r\n".into(), Route::Metrics),
            ("GET /healthz HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\n\r\n".into(), Route::Healthz),
            (
                "GET /healthz HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\nOrigin: https://app.example\r\n\r\n"
                    .into(),
                Route::Healthz,
            ),
        ] {
            let (text, keep) = respond(&raw, route, &fake);
            assert_eq!(status_of(&text), "403", "{raw:?}: {text}");
            assert!(!text.contains("Access-Control-Allow-Origin") && !keep, "{text}");
        }
        assert!(fake.published.borrow().len() == 1, "only the allowed POST published");
    }

    #[test]
    fn without_a_list_origins_pass_and_get_no_cors_headers() {
        let fake = Fake::default();
        let post = "POST /publish/t HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\nContent-Length: 1\r\n\r\nx";
        let (text, _) = respond(post, Route::Publish { topic: "t" }, &fake);
        assert_eq!(status_of(&text), "202", "{text}");
        assert!(!text.contains("Access-Control") && !text.contains("Vary"), "{text}");
        let preflight = "OPTIONS /publish/t HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\n\
                         Access-Control-Request-Method: POST\r\n\r\n";
        let (text, _) = respond(preflight, Route::Publish { topic: "t" }, &fake);
        assert_eq!(status_of(&text), "204", "{text}");
        assert!(!text.contains("Access-Control"), "a browser reads this preflight as a refusal: {text}");
    }

    #[test]
    fn head_gets_headers_without_a_body() {
        let (text, _) =
            respond("HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n", Route::Healthz, &Fake::default());
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.contains("Content-Length: 3\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        let (text, _) =
            respond("HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Route::Metrics, &Fake::default());
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("\r\n\r\n"), "{text}");
        let (text, _) = respond(
            "HEAD /publish/t HTTP/1.1\r\nHost: x\r\n\r\n",
            Route::Publish { topic: "t" },
            &Fake::default(),
        );
        assert!(text.starts_with("HTTP/1.1 405 ") && text.ends_with("\r\n\r\n"), "{text}");
    }

    #[test]
    fn topic_is_escaped_in_json() {
        assert_eq!(JsonEscaped("a\"b\\c\n").to_string(), "a\\\"b\\\\c\\u000a");
    }
}
