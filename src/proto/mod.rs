//! RFC 6455, sans I/O: the WebSocket protocol as pure functions over caller-owned bytes.
//!
//! Nothing in this module opens a socket, starts a runtime, reads a clock or draws a random number:
//! input is bytes (and, where the protocol needs randomness, a nonce the caller supplies), output is
//! bytes and events. That makes every rule testable without a network and lets the server and the
//! load generator share one implementation. The io_uring layer owns the buffers; this module borrows
//! them, unmasks in place, and says how much it consumed.
//!
//! Must never: depend on anything else in this crate, panic on peer input, or allocate per message
//! on the common path (a whole message in one read).

pub mod close;
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod http1;
pub mod mask;
pub mod message;
pub mod utf8;

use std::fmt;

use close::{CloseBodyError, CloseCode};

/// A peer broke a rule of RFC 6455 after the handshake. Each variant knows the close code the RFC
/// names for it, so the connection can answer without a table of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// An RSV bit is set that no negotiated extension defines.
    ReservedBits,
    /// The opcode is one of the reserved values 3-7 or 0xB-0xF.
    ReservedOpcode,
    /// A client sent a frame without a mask.
    UnmaskedFrame,
    /// A server sent a masked frame.
    MaskedFrame,
    /// A control frame carried more than 125 bytes.
    ControlFrameTooLong,
    /// A control frame did not have FIN set.
    FragmentedControlFrame,
    /// A continuation frame arrived with no fragmented message in progress.
    UnexpectedContinuation,
    /// A new Text or Binary frame arrived while a fragmented message was unfinished.
    ExpectedContinuation,
    /// A 64-bit payload length had its most significant bit set.
    LengthTopBitSet,
    /// One frame was larger than the frame size limit.
    FrameTooBig,
    /// A message was larger than the message size limit.
    MessageTooBig,
    /// A text message was not valid UTF-8.
    InvalidUtf8,
    /// A compressed message (permessage-deflate) was not valid DEFLATE data.
    InvalidCompressedData,
    /// A Close frame's body broke the rules of section 5.5.1.
    InvalidClose(CloseBodyError),
}

impl ProtocolError {
    /// The close code to send the peer before closing the connection.
    pub fn close_code(self) -> CloseCode {
        match self {
            ProtocolError::InvalidUtf8
            | ProtocolError::InvalidCompressedData
            | ProtocolError::InvalidClose(CloseBodyError::InvalidReasonUtf8) => CloseCode::INVALID_PAYLOAD,
            ProtocolError::FrameTooBig | ProtocolError::MessageTooBig => CloseCode::MESSAGE_TOO_BIG,
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }

    /// A short reason for the Close frame and the logs; fits in a control frame.
    pub fn reason(self) -> &'static str {
        match self {
            ProtocolError::ReservedBits => "reserved bits set without an extension",
            ProtocolError::ReservedOpcode => "reserved opcode",
            ProtocolError::UnmaskedFrame => "client frame not masked",
            ProtocolError::MaskedFrame => "server frame masked",
            ProtocolError::ControlFrameTooLong => "control frame over 125 bytes",
            ProtocolError::FragmentedControlFrame => "fragmented control frame",
            ProtocolError::UnexpectedContinuation => "continuation without a message",
            ProtocolError::ExpectedContinuation => "new message inside a fragmented one",
            ProtocolError::LengthTopBitSet => "payload length top bit set",
            ProtocolError::FrameTooBig => "frame too big",
            ProtocolError::MessageTooBig => "message too big",
            ProtocolError::InvalidUtf8 => "invalid UTF-8 in text message",
            ProtocolError::InvalidCompressedData => "invalid compressed data",
            ProtocolError::InvalidClose(CloseBodyError::OneByteBody) => "close body of one byte",
            ProtocolError::InvalidClose(CloseBodyError::UnsendableCode(_)) => "invalid close code",
            ProtocolError::InvalidClose(CloseBodyError::InvalidReasonUtf8) => "invalid UTF-8 in close reason",
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (close code {})", self.reason(), self.close_code())
    }
}

impl std::error::Error for ProtocolError {}

impl From<CloseBodyError> for ProtocolError {
    fn from(error: CloseBodyError) -> Self {
        ProtocolError::InvalidClose(error)
    }
}

impl From<utf8::InvalidUtf8> for ProtocolError {
    fn from(_: utf8::InvalidUtf8) -> Self {
        ProtocolError::InvalidUtf8
    }
}
