//! permessage-deflate's cost per message: compressing and inflating a 1 KiB JSON message and a
//! 64 KiB one with `proto::deflate` (flate2 on zlib-rs, raw deflate with a sync flush, context
//! reset after each message as the shared mode does), against miniz_oxide, flate2's default
//! backend, doing the same one-shot raw deflate in the same group as the baseline. Level 6 is
//! compared like for like; level 1 (the gateway's default) is measured beside it.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringgate::proto::deflate::{Deflater, Inflater};
use std::hint::black_box;

/// A JSON-like message of about `len` bytes: repeated keys, varying numbers (what gateways carry).
fn json_message(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    let mut i = 0u64;
    while out.len() < len {
        let price = 100 + (i * 7919) % 997;
        let line = format!(
            r#"{{"topic":"prices.eu","symbol":"SYM{:03}","bid":{}.{:02},"ask":{}.{:02},"seq":{}}},"#,
            i % 300,
            price,
            i % 100,
            price + 1,
            (i * 31) % 100,
            i
        );
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

fn bench_sizes(c: &mut Criterion) {
    for (name, len) in [("1KiB_json", 1024), ("64KiB_json", 64 * 1024)] {
        let message = json_message(len);
        let mut group = c.benchmark_group(format!("deflate_{name}"));
        group.throughput(Throughput::Bytes(len as u64));

        let mut deflater = Deflater::new(6, 15, true);
        let mut out = Vec::with_capacity(len);
        group.bench_function("ringgate_deflate_zlib_rs", |b| {
            b.iter(|| {
                out.clear();
                deflater.compress(black_box(&message), &mut out);
                black_box(out.len())
            })
        });
        // Level 1, the gateway's default: what it saves against level 6 in CPU and costs in bytes.
        let mut fast = Deflater::new(1, 15, true);
        let mut fast_out = Vec::with_capacity(len);
        group.bench_function("ringgate_deflate_zlib_rs_level1", |b| {
            b.iter(|| {
                fast_out.clear();
                fast.compress(black_box(&message), &mut fast_out);
                black_box(fast_out.len())
            })
        });
        group.bench_function("baseline_miniz_oxide_deflate", |b| {
            b.iter(|| black_box(miniz_oxide::deflate::compress_to_vec(black_box(&message), 6).len()))
        });

        let mut compressed = Vec::new();
        deflater.compress(&message, &mut compressed);
        let one_shot = miniz_oxide::deflate::compress_to_vec(&message, 6);
        let mut inflater = Inflater::new(true);
        let mut inflated = Vec::with_capacity(len);
        group.bench_function("ringgate_inflate_zlib_rs", |b| {
            b.iter(|| {
                inflated.clear();
                inflater.inflate(black_box(&compressed), usize::MAX / 2, &mut inflated).expect("valid");
                black_box(inflated.len())
            })
        });
        group.bench_function("baseline_miniz_oxide_inflate", |b| {
            b.iter(|| {
                black_box(miniz_oxide::inflate::decompress_to_vec(black_box(&one_shot)).map(|v| v.len()))
            })
        });
        group.finish();
        eprintln!(
            "{name}: {} B -> {} B compressed at level 6 ({:.1}%), {} B at level 1 ({:.1}%), miniz_oxide one-shot {} B",
            len,
            compressed.len(),
            compressed.len() as f64 * 100.0 / len as f64,
            fast_out.len(),
            fast_out.len() as f64 * 100.0 / len as f64,
            one_shot.len()
        );
    }
}

criterion_group!(benches, bench_sizes);
criterion_main!(benches);
