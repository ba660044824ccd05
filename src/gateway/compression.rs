//! Compressing what the gateway sends under permessage-deflate, with memory that stays bounded.
//!
//! The operator picks a [`CompressionMode`]. In `shared` mode (the default) the server answers
//! `server_no_context_takeover`, so a message's compressed form depends on nothing sent before it:
//! one compressor per worker and window size, reset after every message, serves every connection,
//! and a pub/sub message is compressed once per worker and the same frame queued on every
//! subscriber that agreed the same window ([`Compressor::shared_frame`]). A connection then holds
//! only what it agreed ([`ConnDeflate`], no allocation). In `dedicated` mode each connection that
//! is sent a compressed message gets its own compressor with context takeover (better ratios on
//! streams of similar messages; 313 KiB per connection measured at 15 window bits, see the README).
//!
//! Messages below `--compression-min-size` go out plain (RSV1 clear), as do shared-mode messages
//! whose compressed form is no smaller: the extension lets a sender choose per message.
//!
//! Must never: compress a control frame, compress with a larger window than the peer allowed, or
//! send a dedicated-mode message plain after compressing it (the peer's context would miss it).

use std::cell::RefCell;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::metrics::{WorkerStats, add};
use crate::proto::deflate::{Agreement, Deflater, MAX_WINDOW_BITS, MIN_WINDOW_BITS, Policy, negotiate};
use crate::proto::frame::{MAX_HEADER_LEN, RSV1, write_frame, write_frame_with_rsv};
use crate::proto::mask::MaskKey;
use crate::proto::message::MessageKind;

/// Whether and how the gateway agrees permessage-deflate (`--compression`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionMode {
    /// Decline every offer: messages cross the network at full size.
    Off,
    /// One compressor per worker serves every connection; no compression state per connection.
    Shared,
    /// A compressor per connection that keeps its context between messages.
    Dedicated,
}

/// The operator's compression settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressionSettings {
    /// Whether and how to agree permessage-deflate.
    pub mode: CompressionMode,
    /// zlib level, 0-9: 1 is fastest, 9 smallest.
    pub level: u32,
    /// Messages shorter than this go out plain (compressing them costs more than it saves).
    pub min_size: usize,
    /// The largest window the server compresses with in dedicated mode (9-15); shared mode always
    /// offers 15, since its compressors are per worker, not per connection.
    pub window_bits: u8,
    /// Offer permessage-deflate to proxy upstreams too (not with `off`): the relay then inflates
    /// and compresses again on that hop. Off by default: upstreams are usually a LAN away, where
    /// compressing costs CPU at both ends and saves nothing that matters.
    pub upstream: bool,
}

impl Default for CompressionSettings {
    fn default() -> Self {
        CompressionSettings {
            mode: CompressionMode::Shared,
            level: 1,
            min_size: 128,
            window_bits: 15,
            upstream: false,
        }
    }
}

impl CompressionSettings {
    /// What the server agrees to, or `None` when compression is off. Both modes ask the client
    /// not to keep its context, so that no decompressor is kept per connection between messages.
    pub fn policy(&self) -> Option<Policy> {
        match self.mode {
            CompressionMode::Off => None,
            CompressionMode::Shared => Some(Policy::SHARED),
            CompressionMode::Dedicated => Some(Policy {
                server_no_context_takeover: false,
                client_no_context_takeover: true,
                server_max_window_bits: self.window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS),
            }),
        }
    }
}

/// How one connection's outgoing messages are compressed, as agreed in its handshake. 16 bytes
/// inline; the dedicated compressor is allocated on the first message it compresses.
#[derive(Debug)]
pub struct ConnDeflate {
    /// Dedicated mode's compressor for this connection (context kept between messages).
    own: Option<Box<Deflater>>,
    /// The window the server compresses with (the peer may have asked for less than 15).
    window_bits: u8,
    /// This connection has a compressor of its own (dedicated mode, and the peer let the server
    /// keep its context).
    dedicated: bool,
}

impl ConnDeflate {
    /// The send state for a connection on which we are the server and `agreement` was reached.
    pub fn new(agreement: &Agreement) -> ConnDeflate {
        ConnDeflate {
            own: None,
            window_bits: agreement.server_window_bits,
            dedicated: !agreement.server_no_context_takeover,
        }
    }

    /// The send state for a connection on which we are the client (a proxy's upstream hop) and
    /// the server answered our offer with `agreement`.
    pub fn for_client(agreement: &Agreement) -> ConnDeflate {
        ConnDeflate {
            own: None,
            window_bits: agreement.client_window_bits.unwrap_or(MAX_WINDOW_BITS),
            dedicated: !agreement.client_no_context_takeover,
        }
    }

    /// Pub/sub frames for this connection can come from the worker's shared compression: the
    /// window they must be compressed with, or `None` when this connection compresses its own.
    pub fn shared_window(&self) -> Option<u8> {
        (!self.dedicated).then_some(self.window_bits)
    }

    /// Whether this connection holds a compressor of its own (counted in `/metrics`).
    pub fn holds_deflater(&self) -> bool {
        self.own.is_some()
    }
}

/// Indexes the per-window tables by window bits (9-15).
fn window_slot(bits: u8) -> usize {
    usize::from(bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS) - MIN_WINDOW_BITS)
}

const WINDOW_SIZES: usize = (MAX_WINDOW_BITS - MIN_WINDOW_BITS + 1) as usize;

/// A worker's compression: settings, the shared compressors (one per window size, made on first
/// use: in practice one, for 15 bits) and a scratch buffer. Lives on its worker thread only.
pub struct Compressor {
    settings: CompressionSettings,
    shared: RefCell<[Option<Deflater>; WINDOW_SIZES]>,
    /// Compressed bytes of the message being encoded; grows to the largest message compressed.
    scratch: RefCell<Vec<u8>>,
    stats: Arc<WorkerStats>,
}

/// A scratch buffer larger than this is freed after use, so that one huge message does not pin
/// its size for the life of the worker.
const RETAINED_SCRATCH: usize = 256 * 1024;

impl Compressor {
    /// A worker's compression, counting into `stats`.
    pub fn new(settings: CompressionSettings, stats: Arc<WorkerStats>) -> Compressor {
        Compressor { settings, shared: RefCell::default(), scratch: RefCell::default(), stats }
    }

    /// The operator's settings.
    pub fn settings(&self) -> &CompressionSettings {
        &self.settings
    }

    /// Whether a relay offers permessage-deflate to its upstream.
    pub fn offers_upstream(&self) -> bool {
        self.settings.upstream && self.settings.mode != CompressionMode::Off
    }

    /// Reads an upgrade request's `Sec-WebSocket-Extensions` values: the agreement to answer with
    /// (and to build the connection's [`ConnDeflate`] from), or `None` to go on uncompressed.
    pub fn negotiate<'a>(&self, offers: impl IntoIterator<Item = &'a str>) -> Option<Agreement> {
        negotiate(offers, &self.settings.policy()?)
    }

    /// Appends one unfragmented message to `out`: compressed (RSV1) for a connection that agreed
    /// permessage-deflate when the message is long enough, else plain. Masked with `mask` (when
    /// the gateway is the client, towards an upstream). Returns the payload bytes on the wire.
    pub fn write_message(
        &self,
        out: &mut Vec<u8>,
        kind: MessageKind,
        payload: &[u8],
        conn: Option<&mut ConnDeflate>,
        mask: Option<MaskKey>,
    ) -> usize {
        let Some(conn) = conn.filter(|_| payload.len() >= self.settings.min_size) else {
            write_frame(out, kind.opcode(), payload, mask);
            return payload.len();
        };
        let mut scratch = self.scratch.borrow_mut();
        scratch.clear();
        if conn.dedicated {
            if conn.own.is_none() {
                self.stats.compression.deflaters_add(1);
            }
            let own = conn
                .own
                .get_or_insert_with(|| Box::new(Deflater::new(self.settings.level, conn.window_bits, false)));
            own.compress(payload, &mut scratch);
            add(&self.stats.compression.runs, 1);
        } else {
            self.compress_shared(conn.window_bits, payload, &mut scratch);
            if scratch.len() >= payload.len() {
                write_frame(out, kind.opcode(), payload, mask);
                return payload.len();
            }
        }
        write_frame_with_rsv(out, kind.opcode(), RSV1, &scratch, mask);
        let wire = scratch.len();
        self.count_sent(1, payload.len(), wire);
        release_if_large(&mut scratch);
        wire
    }

    /// The compressed frame of a pub/sub message for subscribers that agreed `window_bits` in
    /// shared mode, or `None` when it should go to them plain (too short, or no smaller).
    pub fn shared_frame(&self, kind: MessageKind, payload: &[u8], window_bits: u8) -> Option<Bytes> {
        if payload.len() < self.settings.min_size {
            return None;
        }
        let mut scratch = self.scratch.borrow_mut();
        scratch.clear();
        self.compress_shared(window_bits, payload, &mut scratch);
        let frame = (scratch.len() < payload.len()).then(|| {
            let mut frame = BytesMut::with_capacity(MAX_HEADER_LEN + scratch.len());
            write_frame_with_rsv(&mut frame, kind.opcode(), RSV1, &scratch, None);
            frame.freeze()
        });
        release_if_large(&mut scratch);
        frame
    }

    /// Counts `messages` compressed messages sent, `before` payload bytes that went out as `after`.
    pub fn count_sent(&self, messages: u64, before: usize, after: usize) {
        let stats = &self.stats;
        add(&stats.compression.messages_out, messages);
        add(&stats.compression.out_uncompressed_bytes, before as u64 * messages);
        add(&stats.compression.out_compressed_bytes, after as u64 * messages);
    }

    /// A connection that compressed with its own compressor leaves: its gauge comes down.
    pub fn release(&self, conn: &ConnDeflate) {
        if conn.holds_deflater() {
            self.stats.compression.deflaters_add(-1);
        }
    }

    fn compress_shared(&self, window_bits: u8, payload: &[u8], out: &mut Vec<u8>) {
        let mut shared = self.shared.borrow_mut();
        let deflater = shared[window_slot(window_bits)]
            .get_or_insert_with(|| Deflater::new(self.settings.level, window_bits, true));
        deflater.compress(payload, out);
        add(&self.stats.compression.runs, 1);
    }
}

fn release_if_large(scratch: &mut Vec<u8>) {
    if scratch.capacity() > RETAINED_SCRATCH {
        *scratch = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::deflate::Inflater;
    use crate::proto::frame::{Decoded, FrameHeader};

    fn compressor(mode: CompressionMode) -> Compressor {
        let settings = CompressionSettings { mode, ..CompressionSettings::default() };
        Compressor::new(settings, Arc::default())
    }

    fn agreed(compressor: &Compressor, offers: [&str; 1]) -> (Agreement, ConnDeflate) {
        let agreement = compressor.negotiate(offers).expect("agreed");
        (agreement, ConnDeflate::new(&agreement))
    }

    fn json(len: usize) -> Vec<u8> {
        let mut text = String::new();
        while text.len() < len {
            text.push_str(r#"{"user":"u1","event":"price","symbol":"ACME","value":1234.5},"#);
        }
        text.truncate(len);
        text.into_bytes()
    }

    /// Splits a frame into its header and payload.
    fn split(frame: &[u8]) -> (FrameHeader, &[u8]) {
        match FrameHeader::decode(frame) {
            Ok(Decoded::Header(header, len)) => (header, &frame[len..]),
            other => panic!("not a frame: {other:?}"),
        }
    }

    fn inflate(compressed: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Inflater::new(true).inflate(compressed, 1 << 20, &mut out).expect("inflates");
        out
    }

    #[test]
    fn offers_are_declined_when_compression_is_off() {
        let off = compressor(CompressionMode::Off);
        assert!(off.negotiate(["permessage-deflate"]).is_none());
        let shared = compressor(CompressionMode::Shared);
        let (agreement, conn) = agreed(&shared, ["permessage-deflate; client_max_window_bits"]);
        assert!(agreement.server_no_context_takeover && agreement.client_no_context_takeover);
        assert_eq!(conn.shared_window(), Some(15));
        let dedicated = compressor(CompressionMode::Dedicated);
        let (agreement, conn) = agreed(&dedicated, ["permessage-deflate"]);
        assert!(!agreement.server_no_context_takeover && agreement.client_no_context_takeover);
        assert_eq!(conn.shared_window(), None);
        // A client may still forbid the server's context: then even dedicated mode shares.
        let (_, conn) = agreed(&dedicated, ["permessage-deflate; server_no_context_takeover"]);
        assert_eq!(conn.shared_window(), Some(15));
    }

    #[test]
    fn long_messages_go_compressed_and_short_ones_plain() {
        let compressor = compressor(CompressionMode::Shared);
        let (_, mut conn) = agreed(&compressor, ["permessage-deflate"]);
        let message = json(1024);
        let mut out = Vec::new();
        let wire = compressor.write_message(&mut out, MessageKind::Text, &message, Some(&mut conn), None);
        let (header, payload) = split(&out);
        assert_eq!(header.rsv, RSV1);
        assert_eq!(wire, payload.len());
        assert!(wire < message.len() / 3, "1 KiB of JSON compresses to {wire} bytes");
        assert_eq!(inflate(payload), message);

        out.clear();
        compressor.write_message(&mut out, MessageKind::Text, b"short", Some(&mut conn), None);
        assert_eq!(split(&out), (FrameHeader { rsv: 0, ..split(&out).0 }, &b"short"[..]));
        assert!(!conn.holds_deflater(), "shared mode holds nothing per connection");
    }

    #[test]
    fn incompressible_messages_go_plain_in_shared_mode() {
        let compressor = compressor(CompressionMode::Shared);
        let (_, mut conn) = agreed(&compressor, ["permessage-deflate"]);
        let mut noise = vec![0u8; 4096];
        getrandom::fill(&mut noise).expect("random bytes");
        let mut out = Vec::new();
        compressor.write_message(&mut out, MessageKind::Binary, &noise, Some(&mut conn), None);
        let (header, payload) = split(&out);
        assert_eq!((header.rsv, payload), (0, &noise[..]));
        assert!(compressor.shared_frame(MessageKind::Binary, &noise, 15).is_none());
    }

    #[test]
    fn a_shared_frame_reads_the_same_for_every_subscriber() {
        let compressor = compressor(CompressionMode::Shared);
        let message = json(2048);
        let first = compressor.shared_frame(MessageKind::Text, &message, 15).expect("compressed");
        let second = compressor.shared_frame(MessageKind::Text, &message, 15).expect("compressed");
        assert_eq!(first, second, "no context carried from one message to the next");
        let (header, payload) = split(&first);
        assert_eq!(header.rsv, RSV1);
        assert_eq!(inflate(payload), message);
        assert_eq!(compressor.stats.compression.runs.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[test]
    fn a_dedicated_compressor_keeps_its_context_and_is_counted() {
        let compressor = compressor(CompressionMode::Dedicated);
        let (_, mut conn) = agreed(&compressor, ["permessage-deflate"]);
        assert!(!conn.holds_deflater(), "made on the first compressed message, not at the handshake");
        let message = json(1024);
        let mut first = Vec::new();
        let mut second = Vec::new();
        compressor.write_message(&mut first, MessageKind::Text, &message, Some(&mut conn), None);
        compressor.write_message(&mut second, MessageKind::Text, &message, Some(&mut conn), None);
        assert!(conn.holds_deflater());
        assert!(second.len() < first.len() / 2, "the second copy refers back to the first");
        let mut inflater = Inflater::new(false);
        for frame in [&first, &second] {
            let mut out = Vec::new();
            inflater.inflate(split(frame).1, 1 << 20, &mut out).expect("inflates");
            assert_eq!(out, message);
        }
        assert_eq!(compressor.stats.compression.deflaters(), 1);
        compressor.release(&conn);
        assert_eq!(compressor.stats.compression.deflaters(), 0);
    }

    #[test]
    fn a_smaller_window_asked_for_is_honoured() {
        let compressor = compressor(CompressionMode::Shared);
        let (agreement, mut conn) = agreed(&compressor, ["permessage-deflate; server_max_window_bits=9"]);
        assert_eq!(agreement.server_window_bits, 9);
        assert_eq!(conn.shared_window(), Some(9));
        let message = json(8192);
        let mut out = Vec::new();
        compressor.write_message(&mut out, MessageKind::Text, &message, Some(&mut conn), None);
        let mut inflated = Vec::with_capacity(16384);
        // zlib refuses a stream whose distances reach past the window it was given.
        let mut small = flate2::Decompress::new_with_window_bits(false, 9);
        small
            .decompress_vec(split(&out).1, &mut inflated, flate2::FlushDecompress::Sync)
            .expect("readable with a 512-byte window");
        assert_eq!(inflated, message);
    }
}
