//! Frame header decode and encode: the per-frame fixed cost, paid on every message.

use criterion::{Criterion, criterion_group, criterion_main};
use ringgate::proto::frame::{FrameHeader, MAX_HEADER_LEN, OpCode};
use std::hint::black_box;

fn header(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_header");
    let cases: [(&str, &[u8]); 3] = [
        ("decode_masked_7bit_len", &[0x81, 0x94, 1, 2, 3, 4]),
        ("decode_masked_16bit_len", &[0x82, 0xfe, 0x04, 0x00, 1, 2, 3, 4]),
        ("decode_masked_64bit_len", &[0x82, 0xff, 0, 0, 0, 0, 0, 0x10, 0, 0, 1, 2, 3, 4]),
    ];
    for (name, wire) in cases {
        group.bench_function(name, |b| b.iter(|| FrameHeader::decode(black_box(wire))));
    }
    let header = FrameHeader { fin: true, rsv: 0, opcode: OpCode::Text, mask: None, payload_len: 20 };
    group.bench_function("encode_server_7bit_len", |b| {
        let mut out = [0u8; MAX_HEADER_LEN];
        b.iter(|| black_box(&header).encode(&mut out))
    });
    group.finish();
}

criterion_group!(benches, header);
criterion_main!(benches);
