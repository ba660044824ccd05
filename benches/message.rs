//! Message assembly: a whole message in one read (the zero-copy path) against a 64 KiB text message
//! in 16 fragments delivered in 4 KiB reads (the streaming path), with a plain copy of the same
//! bytes as the baseline.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringgate::proto::frame::{FrameHeader, MAX_HEADER_LEN, OpCode};
use ringgate::proto::mask::apply_mask;
use ringgate::proto::message::{Assembler, Event, Limits, Role};
use std::hint::black_box;

const KEY: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// Masked client frames carrying `text` in `fragments` pieces.
fn fragmented_text(text: &[u8], fragments: usize) -> Vec<u8> {
    let mut wire = Vec::new();
    let piece_len = text.len().div_ceil(fragments);
    let pieces: Vec<&[u8]> = text.chunks(piece_len).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let header = FrameHeader {
            fin: i + 1 == pieces.len(),
            rsv: 0,
            opcode: if i == 0 { OpCode::Text } else { OpCode::Continuation },
            mask: Some(KEY),
            payload_len: piece.len() as u64,
        };
        let mut head = [0u8; MAX_HEADER_LEN];
        let len = header.encode(&mut head);
        wire.extend_from_slice(&head[..len]);
        let start = wire.len();
        wire.extend_from_slice(piece);
        apply_mask(&mut wire[start..], KEY, 0);
    }
    wire
}

/// Feeds `wire` in reads of `read_len` bytes, as a connection would; returns delivered bytes.
fn assemble(wire: &[u8], scratch: &mut Vec<u8>, read_len: usize) -> usize {
    let mut assembler = Assembler::new(Role::Server, Limits::default());
    let mut delivered = 0;
    let mut tail: Vec<u8> = Vec::new();
    for read in wire.chunks(read_len) {
        scratch.clear();
        scratch.extend_from_slice(&tail);
        scratch.extend_from_slice(read);
        let mut at = 0;
        loop {
            let progress = assembler.feed(&mut scratch[at..]).expect("valid input");
            if let Some(Event::Message { payload, .. }) = progress.event {
                delivered += payload.len();
            }
            if progress.consumed == 0 {
                break;
            }
            at += progress.consumed;
        }
        tail.clear();
        tail.extend_from_slice(&scratch[at..]);
    }
    delivered
}

fn message(c: &mut Criterion) {
    let mut group = c.benchmark_group("message");
    let text: Vec<u8> =
        b"The quick brown fox jumps over the lazy dog. ".iter().copied().cycle().take(64 * 1024).collect();
    group.throughput(Throughput::Bytes(text.len() as u64));
    let whole = fragmented_text(&text, 1);
    let fragmented = fragmented_text(&text, 16);
    let mut scratch = Vec::with_capacity(128 * 1024);
    group.bench_function("memcpy_baseline", |b| {
        b.iter(|| {
            scratch.clear();
            scratch.extend_from_slice(black_box(&whole));
            scratch.len()
        })
    });
    group.bench_function("whole_in_one_read", |b| {
        b.iter(|| assemble(black_box(&whole), &mut scratch, whole.len()))
    });
    group.bench_function("16_fragments_in_4k_reads", |b| {
        b.iter(|| assemble(black_box(&fragmented), &mut scratch, 4096))
    });
    group.finish();
}

criterion_group!(benches, message);
criterion_main!(benches);
