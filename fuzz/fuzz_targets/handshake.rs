//! The server's handshake parser on arbitrary bytes: never panics, and its verdict is stable
//! however the bytes arrive (every prefix before completion is Partial or the same error class).
//! The client's response parser and the router's request-line reader on the same bytes: never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate::proto::handshake::{
    ClientHandshake, DEFAULT_MAX_HEADERS, Parsed, StaticPolicy, accept, find_header_end, parse_request,
    request_target,
};

const MAX_HEADER_BYTES: usize = 2048;

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
    let verdict = parse_request(data, &mut headers, MAX_HEADER_BYTES);
    if let Ok(Parsed::Complete(request, len)) = &verdict {
        assert!(*len <= data.len() && *len <= MAX_HEADER_BYTES);
        // A complete request's header section ends where the pre-scan says it does, and the
        // router's quick look at the request line sees the same target as the full parser.
        assert_eq!(find_header_end(data, 0), Some(*len));
        assert_eq!(request_target(data), Some(request.path));
        let policy = StaticPolicy { subprotocols: vec!["chat".into()], ..Default::default() };
        if let Ok(accepted) = accept(request, &policy) {
            let mut out = Vec::new();
            accepted.write_response(&mut out);
            assert!(out.starts_with(b"HTTP/1.1 101 "));
        }
    }
    if let Err(error) = verdict {
        let mut out = Vec::new();
        error.write_response(&mut out);
        assert!(out.starts_with(b"HTTP/1.1 4"));
    }
    let _ = ClientHandshake::new([0x42; 16]).parse_response(data, &["chat"]);
    let _ = request_target(data);
});
