//! permessage-deflate's inflate path on arbitrary compressed data, the way a connection meets it:
//! a compressed message (RSV1, text or binary, whole or in fragments) fed to an `Assembler` that
//! agreed the extension, with a small message limit. Never panics, never hands out a message over
//! the limit (a bomb is `MessageTooBig`, 1009), and the inflater alone never grows its output past
//! the limit either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate::proto::ProtocolError;
use ringgate::proto::deflate::{InflateError, Inflater};
use ringgate::proto::frame::{OpCode, RSV1, write_frame_with_rsv};
use ringgate::proto::message::{Assembler, Event, Limits, Role};

const LIMIT: usize = 4096;
const LIMITS: Limits = Limits { max_message_size: LIMIT, max_frame_size: LIMIT };
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fuzz_target!(|input: (u8, Vec<u8>, Vec<u8>)| {
    let (flags, fragment_sizes, compressed) = input;
    let keep_context = flags & 1 != 0;
    let opcode = if flags & 2 != 0 { OpCode::Text } else { OpCode::Binary };

    // The inflater on its own: bounded output, whatever the input.
    let mut out = Vec::new();
    let result = Inflater::new(!keep_context).inflate(&compressed, LIMIT, &mut out);
    assert!(out.len() <= LIMIT, "inflated {} bytes past the limit", out.len());
    assert!(result.is_ok() || matches!(result, Err(InflateError::TooBig | InflateError::Corrupt)));

    // Twice the same message through a connection, in fragments whose sizes come from the input.
    let mut wire = Vec::new();
    for _ in 0..2 {
        let mut pieces = Vec::new();
        let mut at = 0;
        let mut sizes = fragment_sizes.iter().map(|&s| usize::from(s).max(1)).cycle();
        while at < compressed.len() {
            let end = (at + sizes.next().unwrap_or(compressed.len())).min(compressed.len());
            pieces.push(&compressed[at..end]);
            at = end;
        }
        if pieces.is_empty() {
            pieces.push(&[][..]);
        }
        for (i, piece) in pieces.iter().enumerate() {
            let (rsv, op) = if i == 0 { (RSV1, opcode) } else { (0, OpCode::Continuation) };
            let mut frame = Vec::new();
            write_frame_with_rsv(&mut frame, op, rsv, piece, Some(KEY));
            if i + 1 < pieces.len() {
                frame[0] &= 0x7f; // not FIN
            }
            wire.extend_from_slice(&frame);
        }
    }
    let mut assembler = Assembler::new(Role::Server, LIMITS);
    assembler.enable_deflate(!keep_context);
    let mut start = 0;
    loop {
        let progress = match assembler.feed(&mut wire[start..]) {
            Ok(progress) => progress,
            Err(error) => {
                assert!(matches!(
                    error,
                    ProtocolError::MessageTooBig
                        | ProtocolError::FrameTooBig
                        | ProtocolError::InvalidCompressedData
                        | ProtocolError::InvalidUtf8
                ));
                break;
            }
        };
        if let Some(Event::Message { payload, .. }) = progress.event {
            assert!(payload.len() <= LIMIT, "a {} byte message passed the limit", payload.len());
        }
        if progress.consumed == 0 {
            break;
        }
        start += progress.consumed;
    }
});
