//! A deliberately small, independent RFC 6455 client for raw traffic: it writes any frame, well
//! formed or not, and reads the server's frames and HTTP answers byte for byte. Every read has a
//! timeout ([`IO_TIMEOUT`]), so a server that goes silent fails the test instead of hanging it.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Read and write timeout of every test socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The sample key of RFC 6455 section 1.3 ...
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// ... and its accept value.
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// A TCP connection to `addr` with read and write timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("write timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// A valid upgrade request for `path`, with `extra` header lines (each ending in CRLF) added.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The value of header `name` (case-insensitive), if present exactly once.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name));
        let first = values.next().map(|(_, v)| v.as_str());
        assert!(values.next().is_none(), "header {name} repeated in {self:?}");
        first
    }
}

/// Splits `bytes` into a response head and whatever follows it; `None` while the head is incomplete.
pub fn parse_head(bytes: &[u8]) -> Option<(HttpResponse, usize)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&bytes[..end - 4]).expect("response head is UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "status line {status_line:?}");
    let status =
        parts.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status {status_line:?}"));
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("header line {line:?}"));
            (name.to_string(), value.trim().to_string())
        })
        .collect();
    Some((HttpResponse { status, headers, body: Vec::new() }, end))
}

/// Sends `request` on a fresh connection and reads the answer to the end: the server must answer
/// and then close the connection (a clean EOF, within [`IO_TIMEOUT`]). Checks `Content-Length`.
pub fn http_exchange(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let mut stream = connect(addr);
    stream.write_all(request).expect("send request");
    read_response_to_eof(&mut stream)
}

/// Reads a whole HTTP response and the server's FIN after it.
pub fn read_response_to_eof(stream: &mut TcpStream) -> HttpResponse {
    let mut bytes = Vec::new();
    if let Err(error) = stream.read_to_end(&mut bytes) {
        panic!("expected a response and then EOF, got {error} after {:?}", String::from_utf8_lossy(&bytes));
    }
    let (mut response, head_len) = parse_head(&bytes)
        .unwrap_or_else(|| panic!("incomplete response {:?}", String::from_utf8_lossy(&bytes)));
    response.body = bytes[head_len..].to_vec();
    let length: usize = response.header("Content-Length").expect("Content-Length").parse().expect("length");
    assert_eq!(length, response.body.len(), "body length of {response:?}");
    response
}

/// One frame as it was on the wire (already unmasked if it was masked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The status code of a Close frame (`None` for an empty one).
    pub fn close_code(&self) -> Option<u16> {
        assert_eq!(self.opcode, CLOSE, "not a Close frame: {self:?}");
        assert_ne!(self.payload.len(), 1, "a Close body of one byte is invalid: {self:?}");
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Encodes one frame with every header field under the caller's control.
pub fn encode_frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut wire = Vec::with_capacity(payload.len() + 14);
    wire.push(u8::from(fin) << 7 | (rsv & 0b111) << 4 | (opcode & 0xF));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => wire.push(mask_bit | len as u8),
        len @ 126..=0xFFFF => {
            wire.push(mask_bit | 126);
            wire.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            wire.push(mask_bit | 127);
            wire.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            wire.extend_from_slice(&key);
            wire.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => wire.extend_from_slice(payload),
    }
    wire
}

/// A masked, final frame, as a well-behaved client sends it.
pub fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(true, 0, opcode, payload, Some([0x37, 0xFA, 0x21, 0x3D]))
}

/// A Close frame body: code and reason bytes.
pub fn close_body(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(reason);
    body
}

/// Deterministic pseudo-random bytes (xorshift), so a failure reproduces.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `low..=high`.
    pub fn range(&mut self, low: usize, high: usize) -> usize {
        low + (self.next_u64() % (high - low + 1) as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Sends an upgrade request for `path` with `extra` header lines (each ending in CRLF) and reads
/// the answer's head: the response, and the upgraded client when it is a 101.
pub fn upgrade_with(addr: SocketAddr, path: &str, extra: &str) -> (HttpResponse, Option<Client>) {
    let mut stream = connect(addr);
    stream.write_all(upgrade_request(path, extra).as_bytes()).expect("send the upgrade request");
    let mut head = Vec::new();
    let response = loop {
        if let Some((response, _)) = parse_head(&head) {
            break response;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).expect("read the answer");
        assert!(n > 0, "EOF before an answer");
        head.extend_from_slice(&chunk[..n]);
    };
    let client = (response.status == 101).then(|| Client::finish_upgrade_after(stream, &head));
    (response, client)
}

/// A pub/sub subscriber on `topic` with a tiny receive buffer that will not read: the kernel's
/// buffers between it and the server fill quickly, so the server's own queue for it grows.
pub fn slow_subscriber(addr: SocketAddr, topic: &str) -> Client {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    // Before connecting, so that the window advertised in the handshake is small too.
    socket.set_recv_buffer_size(2048).expect("SO_RCVBUF");
    socket.connect_timeout(&addr.into(), IO_TIMEOUT).expect("connect");
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("write timeout");
    stream.write_all(upgrade_request(&format!("/pubsub/{topic}"), "").as_bytes()).expect("upgrade");
    Client::finish_upgrade(stream)
}

/// An upgraded connection driven frame by frame.
pub struct Client {
    pub stream: TcpStream,
    /// Bytes read but not yet consumed.
    buf: Vec<u8>,
}

impl Client {
    /// Connects and upgrades on `path`, checking the 101 answer and its accept key.
    pub fn connect(addr: SocketAddr, path: &str) -> Client {
        let mut stream = connect(addr);
        stream.write_all(upgrade_request(path, "").as_bytes()).expect("send upgrade request");
        Client::finish_upgrade(stream)
    }

    /// Reads the server's 101 answer to an upgrade request already sent on `stream`.
    pub fn finish_upgrade(stream: TcpStream) -> Client {
        Client::finish_upgrade_after(stream, &[])
    }

    /// Like [`Client::finish_upgrade`], when the first bytes of the answer were already read.
    pub fn finish_upgrade_after(stream: TcpStream, already_read: &[u8]) -> Client {
        let mut client = Client { stream, buf: already_read.to_vec() };
        let (response, head_len) = loop {
            if let Some(parsed) = parse_head(&client.buf) {
                break parsed;
            }
            assert!(client.fill().expect("read the upgrade response") > 0, "EOF before the 101 response");
        };
        assert_eq!(response.status, 101, "{response:?}");
        assert!(response.header("Upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")));
        assert!(response.header("Connection").is_some_and(|v| v.eq_ignore_ascii_case("upgrade")));
        assert_eq!(response.header("Sec-WebSocket-Accept"), Some(ACCEPT));
        client.buf.drain(..head_len);
        client
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to the server");
    }

    /// Sends one masked, final frame.
    pub fn send(&mut self, opcode: u8, payload: &[u8]) {
        self.send_raw(&masked(opcode, payload));
    }

    /// Sends one masked frame with `fin` as given.
    pub fn send_fragment(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.send_raw(&encode_frame(fin, 0, opcode, payload, Some([0x9C, 0x01, 0x5E, 0xA7])));
    }

    /// Reads more bytes into the buffer; `Ok(0)` is EOF.
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 64 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next frame, `Ok(None)` on a clean EOF at a frame boundary, or the read error (a timeout
    /// shows as `WouldBlock`/`TimedOut`).
    pub fn try_read_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some((frame, len)) = decode_frame(&self.buf) {
                self.buf.drain(..len);
                return Ok(Some(frame));
            }
            if self.fill()? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(ErrorKind::UnexpectedEof, "EOF inside a frame"));
            }
        }
    }

    /// The next frame; fails the test on EOF, error or timeout. Server frames must be unmasked.
    pub fn read_frame(&mut self) -> Frame {
        match self.try_read_frame() {
            Ok(Some(frame)) => {
                assert!(!frame.masked, "server frames must not be masked: {frame:?}");
                frame
            }
            Ok(None) => panic!("the server closed the connection; a frame was expected"),
            Err(error) => panic!("no frame from the server: {error}"),
        }
    }

    /// The next frame must be a final `opcode` frame carrying exactly `payload`.
    pub fn expect_frame(&mut self, opcode: u8, payload: &[u8]) {
        let frame = self.read_frame();
        assert_eq!(
            (frame.fin, frame.rsv, frame.opcode),
            (true, 0, opcode),
            "frame header of {:?}",
            summary(&frame)
        );
        assert!(
            frame.payload == payload,
            "payload of {:?} differs from the expected {} bytes",
            summary(&frame),
            payload.len()
        );
    }

    /// The next frame must be a Close with `code`; then the server must close TCP.
    pub fn expect_close(&mut self, code: u16) -> Frame {
        let frame = self.read_frame();
        assert_eq!(frame.opcode, CLOSE, "expected Close {code}, got {:?}", summary(&frame));
        assert!(frame.fin, "a Close frame must be final");
        assert_eq!(frame.close_code(), Some(code), "close code of {frame:?}");
        assert!(
            std::str::from_utf8(&frame.payload[2..]).is_ok(),
            "the close reason must be UTF-8: {frame:?}"
        );
        self.expect_eof();
        frame
    }

    /// The server must close the connection (a clean FIN, not a reset) with nothing more sent.
    pub fn expect_eof(&mut self) {
        match self.try_read_frame() {
            Ok(None) => {}
            Ok(Some(frame)) => panic!("expected EOF, got another frame {:?}", summary(&frame)),
            Err(error) => panic!("expected EOF from the server, got {error}"),
        }
    }
}

/// A frame's header fields and at most a few payload bytes, for assertion messages.
pub fn summary(frame: &Frame) -> String {
    let shown = &frame.payload[..frame.payload.len().min(32)];
    format!(
        "fin={} rsv={} opcode={:#x} len={} payload={:?}",
        frame.fin,
        frame.rsv,
        frame.opcode,
        frame.payload.len(),
        String::from_utf8_lossy(shown)
    )
}

/// Decodes one frame at the start of `buf`: the frame and its length on the wire, or `None` if
/// `buf` holds only part of it.
pub fn decode_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    let [b0, b1, ..] = *buf else { return None };
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as u64, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        len => (u64::from(len), 2),
    };
    let key: Option<[u8; 4]> = if masked {
        let key = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    let len = usize::try_from(len).expect("frame length fits usize");
    let mut payload = buf.get(at..at + len)?.to_vec();
    if let Some(key) = key {
        payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= key[i % 4]);
    }
    let frame = Frame { fin: b0 & 0x80 != 0, rsv: (b0 >> 4) & 0b111, opcode: b0 & 0xF, masked, payload };
    Some((frame, at + len))
}

/// A plain HTTP/1.1 request: `Host` and, with a body or a `POST`, `Content-Length` are added; `headers`
/// are `(name, value)` pairs.
pub fn http_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A keep-alive HTTP/1.1 connection: requests go out as given (several may be written at once, to
/// test pipelining), responses are read one at a time by their `Content-Length`.
pub struct HttpConn {
    pub stream: TcpStream,
    /// Bytes read but not yet consumed (the start of the next response).
    buf: Vec<u8>,
}

impl HttpConn {
    /// Connects, with [`IO_TIMEOUT`] on every read and write.
    pub fn connect(addr: SocketAddr) -> HttpConn {
        HttpConn { stream: connect(addr), buf: Vec::new() }
    }

    /// Writes raw bytes: one request, part of one, or several.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send the request");
    }

    /// Sends one request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        self.send(&http_request(method, path, headers, body));
        self.read_response()
    }

    /// Reads exactly one response: the head, then `Content-Length` bytes of body (which must be
    /// declared, except on a 204, which must have neither). Fails the test on EOF or timeout before
    /// the response is complete.
    pub fn read_response(&mut self) -> HttpResponse {
        let (mut response, head_len) = loop {
            if let Some(parsed) = parse_head(&self.buf) {
                break parsed;
            }
            self.fill_or_fail();
        };
        if response.status == 204 {
            assert!(response.header("Content-Length").is_none(), "a 204 with a length: {response:?}");
            self.buf.drain(..head_len);
            return response;
        }
        let length: usize = response
            .header("Content-Length")
            .unwrap_or_else(|| panic!("no Content-Length in {response:?}"))
            .parse()
            .expect("numeric Content-Length");
        while self.buf.len() < head_len + length {
            self.fill_or_fail();
        }
        response.body = self.buf[head_len..head_len + length].to_vec();
        self.buf.drain(..head_len + length);
        response
    }

    /// Reads the head of a response that has no body whatever its `Content-Length` says (the
    /// answer to a `HEAD`).
    pub fn read_head_only(&mut self) -> HttpResponse {
        loop {
            if let Some((response, head_len)) = parse_head(&self.buf) {
                self.buf.drain(..head_len);
                return response;
            }
            self.fill_or_fail();
        }
    }

    /// The server must close the connection (a clean FIN) with nothing more sent.
    pub fn expect_eof(&mut self) {
        let mut rest = std::mem::take(&mut self.buf);
        match self.stream.read_to_end(&mut rest) {
            Ok(_) => assert!(
                rest.is_empty(),
                "bytes after the last response: {:?}",
                String::from_utf8_lossy(&rest)
            ),
            Err(error) => panic!("expected EOF, got {error} after {:?}", String::from_utf8_lossy(&rest)),
        }
    }

    fn fill_or_fail(&mut self) {
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => panic!("EOF before a complete response; got {:?}", String::from_utf8_lossy(&self.buf)),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(error) => {
                panic!("no complete response: {error}; got {:?}", String::from_utf8_lossy(&self.buf))
            }
        }
    }
}

/// A JSON value of a flat object: a string (with the common escapes) or an integer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JsonValue {
    Str(String),
    Int(i64),
}

/// Parses a flat JSON object (`{"k": "v", "n": 3}`, whitespace allowed, trailing whitespace allowed)
/// into its fields, in order. Strict: anything else (nesting, duplicate keys, trailing commas) fails
/// the test.
pub fn parse_flat_json(text: &str) -> Vec<(String, JsonValue)> {
    let fail = |why: &str| -> ! { panic!("invalid flat JSON object ({why}): {text:?}") };
    let mut chars = text.trim().chars().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            chars.next();
        }
    };
    let string = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| -> String {
        if chars.next() != Some('"') {
            fail("expected a string");
        }
        let mut out = String::new();
        loop {
            match chars.next() {
                Some('"') => return out,
                Some('\\') => match chars.next() {
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    Some('/') => out.push('/'),
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('r') => out.push('\r'),
                    Some('u') => {
                        let hex: String = chars.by_ref().take(4).collect();
                        let code = u32::from_str_radix(&hex, 16).unwrap_or_else(|_| fail("bad \\u escape"));
                        out.push(char::from_u32(code).unwrap_or_else(|| fail("bad \\u escape")));
                    }
                    _ => fail("bad escape"),
                },
                Some(c) if (c as u32) < 0x20 => fail("control character in a string"),
                Some(c) => out.push(c),
                None => fail("unterminated string"),
            }
        }
    };
    if chars.next() != Some('{') {
        fail("expected {");
    }
    let mut fields: Vec<(String, JsonValue)> = Vec::new();
    skip_ws(&mut chars);
    if chars.peek() == Some(&'}') {
        chars.next();
    } else {
        loop {
            skip_ws(&mut chars);
            let key = string(&mut chars);
            skip_ws(&mut chars);
            if chars.next() != Some(':') {
                fail("expected :");
            }
            skip_ws(&mut chars);
            let value = if chars.peek() == Some(&'"') {
                JsonValue::Str(string(&mut chars))
            } else {
                let mut digits = String::new();
                while chars.peek().is_some_and(|c| c.is_ascii_digit() || *c == '-') {
                    digits.push(chars.next().expect("peeked"));
                }
                JsonValue::Int(digits.parse().unwrap_or_else(|_| fail("expected a string or an integer")))
            };
            if fields.iter().any(|(k, _)| *k == key) {
                fail("duplicate key");
            }
            fields.push((key, value));
            skip_ws(&mut chars);
            match chars.next() {
                Some(',') => continue,
                Some('}') => break,
                _ => fail("expected , or }"),
            }
        }
    }
    if chars.next().is_some() {
        fail("trailing characters");
    }
    fields
}

/// The parsed `202 Accepted` answer to `POST /publish/{topic}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishReply {
    pub topic: String,
    /// `text` or `binary`.
    pub kind: String,
    /// Subscribers reached, across all workers.
    pub subscribers: i64,
}

impl HttpConn {
    /// Posts `body` to `path` (e.g. `/publish/news`) on this keep-alive connection, with
    /// `content_type` if given; the answer must be `202 Accepted`, keep-alive, with a JSON body of
    /// exactly the fields `topic`, `kind` and `subscribers`.
    pub fn publish(&mut self, path: &str, content_type: Option<&str>, body: &[u8]) -> PublishReply {
        let headers: Vec<(&str, &str)> = content_type.map(|ct| ("Content-Type", ct)).into_iter().collect();
        let response = self.request("POST", path, &headers, body);
        assert_eq!(response.status, 202, "publish to {path}: {response:?}");
        assert_eq!(response.header("Connection"), Some("keep-alive"), "{response:?}");
        let content_type = response.header("Content-Type").expect("Content-Type of the 202");
        assert!(content_type.starts_with("application/json"), "{response:?}");
        let text = std::str::from_utf8(&response.body).expect("UTF-8 JSON");
        let fields = parse_flat_json(text);
        let mut names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["kind", "subscribers", "topic"], "fields of {text:?}");
        let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let (Some(JsonValue::Str(topic)), Some(JsonValue::Str(kind)), Some(JsonValue::Int(subscribers))) =
            (field("topic"), field("kind"), field("subscribers"))
        else {
            panic!("field types of {text:?}")
        };
        assert!(kind == "text" || kind == "binary", "kind in {text:?}");
        assert!(subscribers >= 0, "{text:?}");
        PublishReply { topic, kind, subscribers }
    }
}
