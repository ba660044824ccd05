//! UTF-8 validation of text payloads, whole and incremental, against `std::str::from_utf8`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ringgate::proto::utf8::Utf8Validator;
use std::hint::black_box;

/// ASCII-heavy text with a multi-byte character every few dozen bytes, like chat or JSON traffic.
fn ascii_heavy_text(len: usize) -> Vec<u8> {
    let line = "{\"user\":\"zoë\",\"msg\":\"hello, wörld — ok\",\"n\":12345}\n";
    line.as_bytes().iter().copied().cycle().take(len).collect::<Vec<u8>>()
}

fn validate(c: &mut Criterion) {
    let mut group = c.benchmark_group("utf8");
    for size in [125usize, 64 * 1024] {
        let mut text = ascii_heavy_text(size);
        // Cut back to a character boundary so that every validator sees valid text.
        while std::str::from_utf8(&text).is_err() {
            text.pop();
        }
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_with_input(BenchmarkId::new("std_from_utf8", size), &text, |b, text| {
            b.iter(|| std::str::from_utf8(black_box(text)).is_ok())
        });
        group.bench_with_input(BenchmarkId::new("validator_whole", size), &text, |b, text| {
            b.iter(|| {
                let mut validator = Utf8Validator::new();
                validator.feed(black_box(text)).is_ok() && validator.finish().is_ok()
            })
        });
        group.bench_with_input(BenchmarkId::new("validator_4k_pieces", size), &text, |b, text| {
            b.iter(|| {
                let mut validator = Utf8Validator::new();
                for piece in black_box(text).chunks(4096) {
                    if validator.feed(piece).is_err() {
                        return false;
                    }
                }
                validator.finish().is_ok()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, validate);
criterion_main!(benches);
