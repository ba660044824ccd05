//! Close codes and the body of a Close frame (RFC 6455 sections 5.5.1 and 7.4).
//!
//! Which codes may appear on the wire is a registry decision, not a range check: this module is the
//! one place that knows it. Must never: accept a code that the RFC says a peer must not send.

use std::fmt;

/// A WebSocket close status code.
///
/// A newtype rather than an enum because applications may use any code in 3000-4999 and the gateway
/// must carry them through unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// The purpose of the connection was fulfilled.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// The server is shutting down or the client navigated away.
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// The peer broke the framing rules.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// The endpoint cannot accept this kind of data (for example binary on a text-only route).
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// A text message or close reason was not valid UTF-8.
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// A generic policy violation, such as a slow consumer.
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    /// 3000 "Unauthorized" (IANA WebSocket close code registry): the client's token expired
    /// while it was connected; it may reconnect with a fresh one.
    pub const UNAUTHORIZED: CloseCode = CloseCode(3000);
    /// A message was larger than the endpoint accepts.
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// The client expected an extension the server did not negotiate.
    pub const MANDATORY_EXTENSION: CloseCode = CloseCode(1010);
    /// The server hit an unexpected condition (for example, the upstream died).
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    /// The server is restarting; the client may reconnect.
    pub const SERVICE_RESTART: CloseCode = CloseCode(1012);
    /// The server is overloaded; the client should back off.
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);
    /// A gateway got no valid response from its upstream.
    pub const BAD_GATEWAY: CloseCode = CloseCode(1014);

    /// Whether a peer may send this code in a Close frame.
    ///
    /// 1000-1003 and 1007-1014 are the IANA-registered codes an endpoint may send; 1004 is reserved,
    /// and 1005, 1006 and 1015 are for reporting locally only, never to be sent. 1016-2999 are
    /// reserved for future RFCs and so unknown to us; 3000-3999 (registered libraries and frameworks)
    /// and 4000-4999 (private use) belong to applications.
    pub fn is_sendable(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The parsed body of a Close frame: a status code and a UTF-8 reason that borrows from the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseFrame<'a> {
    /// Why the peer is closing.
    pub code: CloseCode,
    /// Human-readable detail; may be empty. At most 123 bytes, since control payloads are at most 125.
    pub reason: &'a str,
}

/// Why a Close frame's body is unacceptable. Each maps to the close code the RFC names for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseBodyError {
    /// A body of exactly one byte cannot hold a two-byte code (1002).
    OneByteBody,
    /// A code that must not appear on the wire (1002).
    UnsendableCode(CloseCode),
    /// The reason is not valid UTF-8 (1007).
    InvalidReasonUtf8,
}

/// Parses a Close frame's (already unmasked) payload. An empty payload means "no status code",
/// which is legal and reported as `None`.
pub fn parse_close_body(payload: &[u8]) -> Result<Option<CloseFrame<'_>>, CloseBodyError> {
    match payload {
        [] => Ok(None),
        [_] => Err(CloseBodyError::OneByteBody),
        [high, low, reason @ ..] => {
            let code = CloseCode(u16::from_be_bytes([*high, *low]));
            if !code.is_sendable() {
                return Err(CloseBodyError::UnsendableCode(code));
            }
            let reason = simdutf8::basic::from_utf8(reason).map_err(|_| CloseBodyError::InvalidReasonUtf8)?;
            Ok(Some(CloseFrame { code, reason }))
        }
    }
}

/// The largest reason that fits in a control frame beside the two-byte code.
pub const MAX_CLOSE_REASON_LEN: usize = 123;

/// Writes a Close frame body into `dst` and returns its length. The reason is cut at a character
/// boundary to fit in a control frame, so that what we send is always valid.
pub fn write_close_body(dst: &mut [u8; 125], code: CloseCode, reason: &str) -> usize {
    let mut cut = reason.len().min(MAX_CLOSE_REASON_LEN);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    dst[..2].copy_from_slice(&code.0.to_be_bytes());
    dst[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
    2 + cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sendable_codes_follow_the_registry() {
        for code in 0..=u16::MAX {
            let expected = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            assert_eq!(CloseCode(code).is_sendable(), expected, "code {code}");
        }
        for reserved in [1004, 1005, 1006, 1015, 1016, 2999, 999, 5000] {
            assert!(!CloseCode(reserved).is_sendable(), "{reserved}");
        }
    }

    #[test]
    fn empty_body_means_no_code() {
        assert_eq!(parse_close_body(&[]), Ok(None));
    }

    #[test]
    fn one_byte_body_is_a_protocol_error() {
        assert_eq!(parse_close_body(&[0x03]), Err(CloseBodyError::OneByteBody));
    }

    #[test]
    fn code_and_reason_parse() {
        let body = [0x03, 0xe8, b'b', b'y', b'e'];
        assert_eq!(parse_close_body(&body), Ok(Some(CloseFrame { code: CloseCode::NORMAL, reason: "bye" })));
    }

    #[test]
    fn unsendable_code_is_rejected() {
        assert_eq!(
            parse_close_body(&1005u16.to_be_bytes()),
            Err(CloseBodyError::UnsendableCode(CloseCode(1005)))
        );
    }

    #[test]
    fn invalid_reason_utf8_is_rejected() {
        let body = [0x03, 0xe8, 0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xed, 0xa0, 0x80];
        assert_eq!(parse_close_body(&body), Err(CloseBodyError::InvalidReasonUtf8));
    }

    #[test]
    fn long_reason_is_cut_at_a_char_boundary() {
        let reason = "é".repeat(100); // 200 bytes, two per char
        let mut body = [0u8; 125];
        let len = write_close_body(&mut body, CloseCode::GOING_AWAY, &reason);
        assert_eq!(len, 2 + 122);
        let parsed = parse_close_body(&body[..len]).expect("valid").expect("has code");
        assert_eq!(parsed.code, CloseCode::GOING_AWAY);
        assert_eq!(parsed.reason.chars().count(), 61);
    }
}
