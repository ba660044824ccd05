//! The frame decoder and message assembler on arbitrary bytes, fed in reads whose sizes come from
//! the input: never panics, never buffers more than the limit, and gives the same events and the
//! same verdict as feeding it in 255-byte reads (read boundaries must not change meaning).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate::proto::ProtocolError;
use ringgate::proto::message::{Assembler, Event, Limits, Role};

const LIMITS: Limits = Limits { max_message_size: 4096, max_frame_size: 2048 };

/// Feeds `data` in reads of the given sizes; returns a summary of each event and the final verdict.
fn run(data: &[u8], read_sizes: &[u8]) -> (Vec<(u8, Vec<u8>)>, Result<(), ProtocolError>) {
    let mut assembler = Assembler::new(Role::Server, LIMITS);
    let mut events = Vec::new();
    let mut pending = Vec::new();
    let mut at = 0;
    let mut sizes = read_sizes.iter().map(|&s| usize::from(s).max(1)).cycle();
    while at < data.len() {
        let end = (at + sizes.next().unwrap_or(data.len())).min(data.len());
        pending.extend_from_slice(&data[at..end]);
        at = end;
        let mut start = 0;
        loop {
            let progress = match assembler.feed(&mut pending[start..]) {
                Ok(progress) => progress,
                Err(error) => return (events, Err(error)),
            };
            let consumed = progress.consumed;
            let Some(event) = progress.event else {
                start += consumed;
                if consumed == 0 {
                    break;
                }
                continue;
            };
            events.push(match event {
                Event::Message { kind, payload } => (kind as u8, payload.to_vec()),
                Event::Ping(p) => (10, p.to_vec()),
                Event::Pong(p) => (11, p.to_vec()),
                Event::Close(c) => (12, c.map(|c| c.reason.as_bytes().to_vec()).unwrap_or_default()),
            });
            start += consumed;
        }
        pending.drain(..start);
        assert!(assembler.buffered_len() <= LIMITS.max_message_size);
        // What is left unconsumed is at most a frame header or a control frame: data frame payload
        // is always consumed as it arrives.
        assert!(pending.len() <= 14 + 125);
    }
    (events, Ok(()))
}

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    let (read_sizes, data) = input;
    let at_once = run(&data, &[255]);
    let in_pieces = run(&data, if read_sizes.is_empty() { &[1] } else { &read_sizes });
    assert_eq!(at_once, in_pieces, "read boundaries changed the outcome");
});
