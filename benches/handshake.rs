//! The whole server side of a handshake for a typical browser request: parse, validate, apply the
//! policy, compute the accept key and write the 101. `accept_key` alone is the SHA-1 + base64 share.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringgate::proto::handshake::{
    AcceptKey, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADERS, Parsed, StaticPolicy, accept, parse_request,
};
use std::hint::black_box;

/// What a desktop Chrome sends to a WebSocket endpoint, about 400 bytes.
const BROWSER_REQUEST: &[u8] = b"GET /echo HTTP/1.1\r\n\
Host: gateway.example.com\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://app.example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

fn handshake(c: &mut Criterion) {
    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Elements(1));
    let policy = StaticPolicy::default();
    let mut response = Vec::with_capacity(256);
    group.bench_function("parse_validate_accept_respond", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
            let parsed = parse_request(black_box(BROWSER_REQUEST), &mut headers, DEFAULT_MAX_HEADER_BYTES);
            if let Ok(Parsed::Complete(request, _)) = parsed {
                if let Ok(accepted) = accept(&request, &policy) {
                    response.clear();
                    accepted.write_response(&mut response);
                }
            }
            response.len()
        })
    });
    group.bench_function("accept_key_only", |b| {
        b.iter(|| AcceptKey::for_key(black_box(b"dGhlIHNhbXBsZSBub25jZQ==")))
    });
    group.finish();
}

criterion_group!(benches, handshake);
criterion_main!(benches);
