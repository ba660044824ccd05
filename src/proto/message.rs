//! From bytes to messages: frame decoding, in-place unmasking, fragment reassembly, incremental UTF-8
//! validation, close validation and size limits, as one state machine per connection.
//!
//! The shape follows rustls' unbuffered API: [`Assembler::feed`] works inside the caller's buffer,
//! returns how many bytes it consumed and at most one [`Event`]. The common case (a whole
//! unfragmented message inside one read) is zero-copy: the payload is unmasked in place and the
//! event borrows it. A data frame that is only partly there is consumed as it arrives (unmasked,
//! validated, appended to the assembler's own buffer), so a text message fails on its first invalid
//! byte, not at its end. Only a partial frame header or a partial control frame (at most 139 bytes)
//! is left unconsumed for the caller to keep.
//!
//! Must never: buffer more than the message size limit, accept a rule violation, or panic on input.
//! After an error the assembler is poisoned: the caller closes the connection with
//! [`ProtocolError::close_code`].

use super::ProtocolError;
use super::close::{CloseFrame, parse_close_body};
use super::deflate::{InflateError, Inflater};
use super::frame::{Decoded, FrameHeader, OpCode, RSV1};
use super::mask::apply_mask;
use super::utf8::Utf8Validator;

/// Which side of the connection we are: it decides which masking the peer must use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// We are the server: every frame we receive must be masked.
    Server,
    /// We are the client: no frame we receive may be masked.
    Client,
}

/// Size limits that bound the memory one connection can make us hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest message (all fragments together), in bytes. Larger ones close with 1009.
    pub max_message_size: usize,
    /// The largest single frame, in bytes. Larger ones close with 1009.
    pub max_frame_size: usize,
}

impl Default for Limits {
    /// 1 MiB messages and frames: generous for chat and events, small enough that 10,000
    /// connections sending at once cannot exhaust a machine.
    fn default() -> Self {
        Limits { max_message_size: 1 << 20, max_frame_size: 1 << 20 }
    }
}

/// Whether a data message is text or binary. A text payload has been validated as UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// UTF-8 text; the payload is guaranteed valid.
    Text,
    /// Arbitrary bytes.
    Binary,
}

impl MessageKind {
    /// The opcode that starts a message of this kind, for echoing or relaying it unchanged.
    pub fn opcode(self) -> OpCode {
        match self {
            MessageKind::Text => OpCode::Text,
            MessageKind::Binary => OpCode::Binary,
        }
    }
}

/// Something complete that the peer sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole data message, reassembled from its fragments, unmasked.
    Message {
        /// Text (valid UTF-8) or binary.
        kind: MessageKind,
        /// The unmasked payload; borrows the caller's buffer or the assembler's own.
        payload: &'a [u8],
    },
    /// A Ping: the RFC requires a Pong with the same payload.
    Ping(&'a [u8]),
    /// A Pong, solicited or not.
    Pong(&'a [u8]),
    /// The peer started (or answered) the closing handshake; `None` if it gave no status code.
    /// The assembler ignores any bytes after this.
    Close(Option<CloseFrame<'a>>),
}

/// The result of one [`Assembler::feed`] call.
#[derive(Debug, PartialEq, Eq)]
pub struct Progress<'a> {
    /// How many bytes from the front of the input were used; the caller drops them. Anything left
    /// is either more frames (call `feed` again) or an incomplete header or control frame (keep it
    /// and call again when more bytes arrive).
    pub consumed: usize,
    /// A complete event, if the consumed bytes finished one.
    pub event: Option<Event<'a>>,
}

/// A data frame whose payload is arriving across reads.
#[derive(Clone, Copy, Debug)]
struct StreamingFrame {
    header: FrameHeader,
    /// Payload bytes already consumed (the masking key's phase).
    done: u64,
}

/// The per-connection receive state machine. See the module documentation.
#[derive(Debug)]
pub struct Assembler {
    role: Role,
    limits: Limits,
    /// RSV bits that a negotiated extension gives meaning to; any other set bit is an error.
    allowed_rsv: u8,
    /// A data frame whose payload is partly consumed.
    streaming: Option<StreamingFrame>,
    /// The kind of the message being assembled in `buffer`, from its first frame on.
    message: Option<MessageKind>,
    /// Payload of the message being assembled when it did not arrive whole in one read.
    buffer: Vec<u8>,
    /// `buffer` holds a message already handed out as an event; recycle it on the next call.
    delivered: bool,
    utf8: Utf8Validator,
    closed: bool,
    /// permessage-deflate was agreed and the peer keeps its compression context between messages,
    /// so this side must keep a decompressor too (else it borrows the thread's spare one).
    peer_keeps_context: bool,
    /// What inflating needs, made on the first compressed message only; without context takeover
    /// it is freed once its message is delivered, so an idle connection holds none.
    deflate: Option<Box<InflateState>>,
    /// The message being assembled had RSV1 set on its first frame: it is compressed.
    compressed: bool,
}

/// What a connection that negotiated permessage-deflate holds while it inflates.
#[derive(Debug)]
struct InflateState {
    /// The decompressor, while the peer keeps its context (it holds the peer's window).
    inflater: Option<Inflater>,
    /// The inflated message handed out last.
    inflated: Vec<u8>,
    /// Compressed payload bytes of the message handed out last (for the caller's counters).
    compressed_len: usize,
}

thread_local! {
    /// One decompressor per thread for the connections that keep no context: it is reset after
    /// every message, so any connection of the thread may use it next (a 32 KiB window once per
    /// worker, not per connection).
    static SPARE_INFLATER: std::cell::RefCell<Option<Inflater>> = const { std::cell::RefCell::new(None) };
}

/// A buffer larger than this is freed once its message is delivered rather than kept for reuse, so
/// that an idle connection does not pin the memory of the largest message it ever received.
const RETAINED_BUFFER_CAPACITY: usize = 16 * 1024;

impl Assembler {
    /// A fresh state machine for one connection, with no extensions negotiated.
    pub fn new(role: Role, limits: Limits) -> Self {
        Assembler {
            role,
            limits,
            allowed_rsv: 0,
            streaming: None,
            message: None,
            buffer: Vec::new(),
            delivered: false,
            utf8: Utf8Validator::new(),
            closed: false,
            peer_keeps_context: false,
            deflate: None,
            compressed: false,
        }
    }

    /// permessage-deflate was agreed in the handshake: RSV1 on a message's first frame now means
    /// "compressed", and such messages are inflated (up to the message size limit) before they are
    /// handed out. `peer_no_context_takeover` (the client's parameter when we are the server, the
    /// server's when we are the client): the peer resets its context after every message, so no
    /// decompressor is kept for this connection between messages.
    pub fn enable_deflate(&mut self, peer_no_context_takeover: bool) {
        self.allowed_rsv |= RSV1;
        self.peer_keeps_context = !peer_no_context_takeover;
    }

    /// Whether this connection holds a decompressor of its own (the peer keeps its context and
    /// has sent compressed data): about 40 KiB, counted by the caller.
    pub fn holds_inflater(&self) -> bool {
        self.deflate.as_ref().is_some_and(|state| state.inflater.is_some())
    }

    /// The compressed size of the message just handed out, when it arrived compressed.
    pub fn compressed_len(&self) -> Option<usize> {
        self.deflate.as_ref().filter(|_| self.delivered).map(|state| state.compressed_len).filter(|&n| n > 0)
    }

    /// Whether a Close frame has been received; later input is discarded.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Bytes held for a message in progress (counted towards a connection's memory).
    pub fn buffered_len(&self) -> usize {
        if self.delivered { 0 } else { self.buffer.len() }
    }

    /// Consumes bytes from the front of `input` and returns at most one event.
    ///
    /// `input` is unmasked in place. Call again with the unconsumed rest until it returns no event
    /// and consumes nothing; then wait for more bytes (appending them after the rest).
    pub fn feed<'a>(&'a mut self, input: &'a mut [u8]) -> Result<Progress<'a>, ProtocolError> {
        if self.delivered {
            self.recycle_buffer();
        }
        if self.closed {
            return Ok(Progress { consumed: input.len(), event: None });
        }
        if let Some(frame) = self.streaming {
            return self.stream_payload(frame, input, 0);
        }

        let (header, header_len) = match FrameHeader::decode(input)? {
            Decoded::Partial => return Ok(Progress { consumed: 0, event: None }),
            Decoded::Header(header, len) => (header, len),
        };
        self.check_header(&header)?;
        // The length fits in usize: check_header bounded it by a limit that is a usize.
        let payload_len = header.payload_len as usize;
        let frame_len = header_len + payload_len;

        if header.opcode.is_control() {
            if input.len() < frame_len {
                return Ok(Progress { consumed: 0, event: None });
            }
            let payload = &mut input[header_len..frame_len];
            unmask(payload, &header, 0);
            let event = self.control_event(header.opcode, payload)?;
            return Ok(Progress { consumed: frame_len, event: Some(event) });
        }

        let compressed = header.rsv & RSV1 != 0;
        if header.fin && self.message.is_none() && input.len() >= frame_len {
            // The common case: a whole message in one read. Zero-copy (unless compressed).
            let payload = &mut input[header_len..frame_len];
            unmask(payload, &header, 0);
            if compressed {
                let kind =
                    if header.opcode == OpCode::Text { MessageKind::Text } else { MessageKind::Binary };
                let payload = self.inflate(kind, payload)?;
                return Ok(Progress { consumed: frame_len, event: Some(Event::Message { kind, payload }) });
            }
            let kind = if header.opcode == OpCode::Text {
                simdutf8::basic::from_utf8(payload).map_err(|_| ProtocolError::InvalidUtf8)?;
                MessageKind::Text
            } else {
                MessageKind::Binary
            };
            let event = Event::Message { kind, payload };
            return Ok(Progress { consumed: frame_len, event: Some(event) });
        }

        match header.opcode {
            OpCode::Text => self.message = Some(MessageKind::Text),
            OpCode::Binary => self.message = Some(MessageKind::Binary),
            _ => {}
        }
        if header.opcode != OpCode::Continuation {
            self.compressed = compressed;
        }
        let frame = StreamingFrame { header, done: 0 };
        self.streaming = Some(frame);
        self.buffer.reserve(payload_len.min(RETAINED_BUFFER_CAPACITY));
        self.stream_payload(frame, &mut input[header_len..], header_len)
    }

    /// Rules that depend on this connection's role, extensions and fragmentation state.
    fn check_header(&self, header: &FrameHeader) -> Result<(), ProtocolError> {
        if header.rsv & !self.allowed_rsv != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        // RSV1 marks a compressed message on its first frame only (RFC 7692 section 6.1).
        if header.rsv & RSV1 != 0 && !matches!(header.opcode, OpCode::Text | OpCode::Binary) {
            return Err(ProtocolError::ReservedBits);
        }
        match (self.role, header.mask.is_some()) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedFrame),
            (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
            _ => {}
        }
        match (header.opcode, self.message.is_some()) {
            (OpCode::Continuation, false) => return Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Text | OpCode::Binary, true) => return Err(ProtocolError::ExpectedContinuation),
            _ => {}
        }
        if !header.opcode.is_control() {
            // A compressed message's limits are on its inflated size (checked while inflating);
            // on the wire it may be what deflate makes of incompressible data that size.
            let compressed =
                header.rsv & RSV1 != 0 || (header.opcode == OpCode::Continuation && self.compressed);
            let wire_limit = |limit: usize| if compressed { deflate_bound(limit) } else { limit as u64 };
            if header.payload_len > wire_limit(self.limits.max_frame_size) {
                return Err(ProtocolError::FrameTooBig);
            }
            let total = self.buffer.len() as u64 + header.payload_len;
            if total > wire_limit(self.limits.max_message_size) {
                return Err(ProtocolError::MessageTooBig);
            }
        }
        Ok(())
    }

    /// Consumes as much of a streaming data frame's payload as `input` holds. `already` is what this
    /// call consumed before (the header), added to the reported total.
    fn stream_payload<'a>(
        &'a mut self,
        mut frame: StreamingFrame,
        input: &mut [u8],
        already: usize,
    ) -> Result<Progress<'a>, ProtocolError> {
        let remaining = frame.header.payload_len - frame.done;
        let take = remaining.min(input.len() as u64) as usize;
        let piece = &mut input[..take];
        unmask(piece, &frame.header, frame.done as usize);
        if self.message == Some(MessageKind::Text) && !self.compressed {
            self.utf8.feed(piece)?;
        }
        self.buffer.extend_from_slice(piece);
        frame.done += take as u64;
        let consumed = already + take;

        if frame.done < frame.header.payload_len {
            self.streaming = Some(frame);
            return Ok(Progress { consumed, event: None });
        }
        self.streaming = None;
        if !frame.header.fin {
            return Ok(Progress { consumed, event: None });
        }
        let kind = self.message.take().unwrap_or(MessageKind::Binary);
        self.delivered = true;
        if std::mem::take(&mut self.compressed) {
            let compressed = std::mem::take(&mut self.buffer);
            let result = self.inflate(kind, &compressed).map(|p| p.len());
            self.buffer = compressed;
            result?;
            let payload = self.deflate.as_ref().map_or(&[][..], |state| &state.inflated[..]);
            return Ok(Progress { consumed, event: Some(Event::Message { kind, payload }) });
        }
        if kind == MessageKind::Text {
            self.utf8.finish()?;
        }
        Ok(Progress { consumed, event: Some(Event::Message { kind, payload: &self.buffer }) })
    }

    /// Inflates a compressed message's payload into the connection's inflated buffer, within the
    /// message size limit, and checks a text message's UTF-8 after inflating.
    fn inflate(&mut self, kind: MessageKind, compressed: &[u8]) -> Result<&[u8], ProtocolError> {
        let limit = self.limits.max_message_size;
        if self.allowed_rsv & RSV1 == 0 {
            return Err(ProtocolError::ReservedBits);
        }
        let state = self.deflate.get_or_insert_with(|| {
            Box::new(InflateState { inflater: None, inflated: Vec::new(), compressed_len: 0 })
        });
        self.delivered = true;
        state.inflated.clear();
        state.compressed_len = compressed.len();
        let result = if !self.peer_keeps_context {
            SPARE_INFLATER.with_borrow_mut(|spare| {
                spare.get_or_insert_with(|| Inflater::new(true)).inflate(
                    compressed,
                    limit,
                    &mut state.inflated,
                )
            })
        } else {
            state.inflater.get_or_insert_with(|| Inflater::new(false)).inflate(
                compressed,
                limit,
                &mut state.inflated,
            )
        };
        result.map_err(|error| match error {
            InflateError::TooBig => ProtocolError::MessageTooBig,
            InflateError::Corrupt => ProtocolError::InvalidCompressedData,
        })?;
        if kind == MessageKind::Text {
            simdutf8::basic::from_utf8(&state.inflated).map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        Ok(&state.inflated)
    }

    fn control_event<'a>(&mut self, opcode: OpCode, payload: &'a [u8]) -> Result<Event<'a>, ProtocolError> {
        Ok(match opcode {
            OpCode::Ping => Event::Ping(payload),
            OpCode::Pong => Event::Pong(payload),
            _ => {
                let close = parse_close_body(payload)?;
                self.closed = true;
                Event::Close(close)
            }
        })
    }

    fn recycle_buffer(&mut self) {
        self.delivered = false;
        if !self.peer_keeps_context {
            self.deflate = None;
        } else if let Some(state) = self.deflate.as_mut() {
            state.compressed_len = 0;
            if state.inflated.capacity() > RETAINED_BUFFER_CAPACITY {
                state.inflated = Vec::new();
            } else {
                state.inflated.clear();
            }
        }
        if self.buffer.capacity() > RETAINED_BUFFER_CAPACITY {
            self.buffer = Vec::new();
        } else {
            self.buffer.clear();
        }
    }
}

/// The most DEFLATE data `len` bytes can become whatever the sender's settings: zlib's
/// conservative `deflateBound`, which covers the small blocks of a compressor with little memory
/// (Python websockets compresses with `memLevel=5`: incompressible data grows by a quarter of a
/// percent, past the tighter bound of default settings), plus the stream's end.
fn deflate_bound(len: usize) -> u64 {
    let len = len as u64;
    len + ((len + 7) >> 3) + ((len + 63) >> 6) + 64
}

fn unmask(payload: &mut [u8], header: &FrameHeader, offset: usize) {
    if let Some(key) = header.mask {
        apply_mask(payload, key, offset);
    }
}
