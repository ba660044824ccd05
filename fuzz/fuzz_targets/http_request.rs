//! The plain endpoints' request parser on arbitrary bytes: never panics, never admits a body over
//! its limit, and never accepts a request that the upgrade refuses for the message rules they
//! share (a `Host` the upgrade calls bad is bad here too): the two paths agree on every request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate::gateway::http::parse_plain_request;
use ringgate::proto::handshake::{DEFAULT_MAX_HEADERS, HandshakeError, parse_request};
use ringgate::proto::http1::check_target;

const MAX_BODY: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let plain = parse_plain_request(data, MAX_BODY);
    if let Ok(request) = &plain {
        assert!(request.content_length <= MAX_BODY);
    }
    let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
    match parse_request(data, &mut headers, usize::MAX) {
        Ok(ringgate::proto::handshake::Parsed::Complete(request, _)) => {
            assert!(check_target(request.path.as_bytes()).is_ok());
            if let Ok(request) = plain {
                assert_eq!(request.content_length, 0, "an upgrade never carries a body");
            }
        }
        Err(HandshakeError::BadHost) => assert!(plain.is_err(), "the upgrade refused its Host"),
        _ => {}
    }
});
