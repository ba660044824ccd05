//! The plain HTTP endpoints: `POST /publish/{topic}`, `GET /metrics`, `GET /healthz`.
//!
//! Sans I/O like the protocol core: [`parse_plain_request`] reads a complete header section, and
//! [`answer`] writes the whole response for a request and its body into a buffer, asking the rest
//! of the gateway (through [`Endpoints`]) only for what it must: publishing, the metrics text, and
//! whether it is draining. HTTP/1.1 keep-alive is honoured so that scrapers and publishers can reuse
//! a connection. Must never: read a body without a declared length, or accept one over the limit.

use std::fmt::Write as _;

use bytes::BufMut;

use super::router::Route;
use crate::proto::handshake::reason_phrase;
use crate::proto::message::MessageKind;

/// What the HTTP endpoints need from the gateway.
pub trait Endpoints {
    /// Whether the gateway is draining (health turns 503 so load balancers stop sending traffic).
    fn is_draining(&self) -> bool;
    /// Appends the Prometheus text exposition of every metric.
    fn render_metrics(&self, out: &mut String);
    /// Publishes a message to a topic; returns the number of subscribers it reached.
    fn publish(&self, topic: &str, kind: MessageKind, payload: &[u8]) -> usize;
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
}

/// Why a plain request cannot be served; the HTTP status says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlainRequestError {
    /// Unparseable, or a bad `Content-Length` (400).
    Malformed,
    /// A chunked (or otherwise encoded) body: only `Content-Length` bodies are accepted (411).
    LengthRequired,
    /// The declared body is over the message size limit (413).
    PayloadTooLarge,
}

impl PlainRequestError {
    /// The response status.
    pub fn status(self) -> u16 {
        match self {
            PlainRequestError::Malformed => 400,
            PlainRequestError::LengthRequired => 411,
            PlainRequestError::PayloadTooLarge => 413,
        }
    }
}

/// Parses a complete header section of a plain HTTP request. `max_body` bounds `Content-Length`.
pub fn parse_plain_request(head: &[u8], max_body: usize) -> Result<PlainRequest<'_>, PlainRequestError> {
    let mut headers = [httparse::EMPTY_HEADER; crate::proto::handshake::DEFAULT_MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(PlainRequestError::Malformed),
    }
    let (Some(method), Some(version)) = (request.method, request.version) else {
        return Err(PlainRequestError::Malformed);
    };
    let mut keep_alive = version >= 1;
    let mut content_length = None;
    let mut content_type = None;
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value).map_err(|_| PlainRequestError::Malformed)?.trim();
        if header.name.eq_ignore_ascii_case("Content-Length") {
            let length: usize = value.parse().map_err(|_| PlainRequestError::Malformed)?;
            if content_length.replace(length).is_some_and(|previous| previous != length) {
                return Err(PlainRequestError::Malformed);
            }
        } else if header.name.eq_ignore_ascii_case("Transfer-Encoding") {
            return Err(PlainRequestError::LengthRequired);
        } else if header.name.eq_ignore_ascii_case("Connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if header.name.eq_ignore_ascii_case("Content-Type") {
            content_type = Some(value);
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > max_body {
        return Err(PlainRequestError::PayloadTooLarge);
    }
    Ok(PlainRequest { method, keep_alive, content_length, content_type })
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

/// Writes the full response to a plain request for `route` (an HTTP route) with its `body`.
/// A `HEAD` request gets the headers a `GET` would, without the body.
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
    const TEXT: &str = "text/plain; charset=utf-8";
    let mut text = String::new();
    let (status, content_type, response_body, extra): (u16, &str, &[u8], &[(&str, &str)]) = match route {
        Route::Healthz if readable => {
            let (status, words) = if endpoints.is_draining() { (503, "draining\n") } else { (200, "ok\n") };
            (status, TEXT, words.as_bytes(), &[])
        }
        Route::Metrics if readable => {
            text.reserve(16 * 1024);
            endpoints.render_metrics(&mut text);
            (200, "text/plain; version=0.0.4; charset=utf-8", text.as_bytes(), &[])
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
            (202, "application/json", text.as_bytes(), &[])
        }
        Route::Healthz | Route::Metrics => (405, TEXT, b"use GET\n", &[("Allow", "GET, HEAD")]),
        Route::Publish { .. } => (405, TEXT, b"use POST\n", &[("Allow", "POST")]),
        Route::Echo | Route::PubSub { .. } | Route::Proxy { .. } => {
            // Not an HTTP route; the caller upgrades these. Answer sanely rather than panic.
            write_response(dst, 426, TEXT, b"upgrade required\n", false, &[("Upgrade", "websocket")]);
            return Answered { status: 426, keep_alive: false };
        }
    };
    let start = dst.len();
    write_response(dst, status, content_type, response_body, keep_alive, extra);
    if is("HEAD") {
        dst.truncate(start + (dst.len() - start - response_body.len()));
    }
    Answered { status, keep_alive }
}

/// Writes a complete HTTP/1.1 response with a `Content-Length` body.
pub fn write_response(
    dst: &mut impl BufMut,
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    extra_headers: &[(&str, &str)],
) {
    let mut head = String::with_capacity(160);
    let _ = write!(head, "HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    let _ = write!(head, "Content-Type: {content_type}\r\nContent-Length: {}\r\n", body.len());
    head.push_str(if keep_alive { "Connection: keep-alive\r\n" } else { "Connection: close\r\n" });
    for (name, value) in extra_headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("\r\n");
    dst.put_slice(head.as_bytes());
    dst.put_slice(body);
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
        published: RefCell<Vec<(String, MessageKind, Vec<u8>)>>,
    }

    impl Endpoints for Fake {
        fn is_draining(&self) -> bool {
            self.draining
        }
        fn render_metrics(&self, out: &mut String) {
            out.push_str("# TYPE x counter\nx_total 1\n");
        }
        fn publish(&self, topic: &str, kind: MessageKind, payload: &[u8]) -> usize {
            self.published.borrow_mut().push((topic.into(), kind, payload.to_vec()));
            7
        }
    }

    fn respond(raw: &str, route: Route<'_>, fake: &Fake) -> (String, bool) {
        let head_end = raw.find("\r\n\r\n").expect("complete head") + 4;
        let request = parse_plain_request(&raw.as_bytes()[..head_end], 1024).expect("parses");
        let mut out = Vec::new();
        let answered = answer(route, &request, &raw.as_bytes()[head_end..], fake, &mut out);
        (String::from_utf8(out).expect("utf-8 response"), answered.keep_alive)
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
        let (text, _) =
            respond("GET /publish/t HTTP/1.1\r\n\r\n", Route::Publish { topic: "t" }, &Fake::default());
        assert!(text.starts_with("HTTP/1.1 405 ") && text.contains("Allow: POST\r\n"), "{text}");
        let (text, _) = respond("POST /metrics HTTP/1.1\r\n\r\n", Route::Metrics, &Fake::default());
        assert!(text.starts_with("HTTP/1.1 405 ") && text.contains("Allow: GET, HEAD\r\n"), "{text}");
    }

    #[test]
    fn bodies_need_a_bounded_declared_length() {
        let chunked = b"POST /publish/t HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_plain_request(chunked, 10), Err(PlainRequestError::LengthRequired));
        let big = b"POST /publish/t HTTP/1.1\r\nContent-Length: 11\r\n\r\n";
        assert_eq!(parse_plain_request(big, 10), Err(PlainRequestError::PayloadTooLarge));
        let bad = b"POST /publish/t HTTP/1.1\r\nContent-Length: -1\r\n\r\n";
        assert_eq!(parse_plain_request(bad, 10), Err(PlainRequestError::Malformed));
        let conflicting = b"POST /publish/t HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(parse_plain_request(conflicting, 10), Err(PlainRequestError::Malformed));
    }

    #[test]
    fn keep_alive_follows_http_version_and_connection_header() {
        let parse = |raw: &str| parse_plain_request(raw.as_bytes(), 0).map(|r| r.keep_alive);
        assert_eq!(parse("GET /m HTTP/1.1\r\n\r\n"), Ok(true));
        assert_eq!(parse("GET /m HTTP/1.1\r\nConnection: close\r\n\r\n"), Ok(false));
        assert_eq!(parse("GET /m HTTP/1.0\r\n\r\n"), Ok(false));
        assert_eq!(parse("GET /m HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"), Ok(true));
    }

    #[test]
    fn head_gets_headers_without_a_body() {
        let (text, _) = respond("HEAD /healthz HTTP/1.1\r\n\r\n", Route::Healthz, &Fake::default());
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.contains("Content-Length: 3\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        let (text, _) = respond("HEAD /metrics HTTP/1.1\r\n\r\n", Route::Metrics, &Fake::default());
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("\r\n\r\n"), "{text}");
        let (text, _) =
            respond("HEAD /publish/t HTTP/1.1\r\n\r\n", Route::Publish { topic: "t" }, &Fake::default());
        assert!(text.starts_with("HTTP/1.1 405 ") && text.ends_with("\r\n\r\n"), "{text}");
    }

    #[test]
    fn topic_is_escaped_in_json() {
        assert_eq!(JsonEscaped("a\"b\\c\n").to_string(), "a\\\"b\\\\c\\u000a");
    }
}
