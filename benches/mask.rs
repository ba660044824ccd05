//! Unmasking throughput against its two baselines in the same group: `memcpy` of the same size (the
//! ceiling: unmasking touches each byte once, like a copy) and the RFC's byte loop (the floor), both
//! as LLVM compiles it (it vectorises it) and with vectorisation blocked.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ringgate::proto::mask::{apply_mask, apply_mask_naive};
use std::hint::black_box;

const SIZES: [usize; 6] = [16, 125, 1024, 16 * 1024, 64 * 1024, 1024 * 1024];
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn unmask(c: &mut Criterion) {
    let mut group = c.benchmark_group("unmask");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let source = vec![0x5au8; size];
        let mut buf = vec![0u8; size];
        group.bench_with_input(BenchmarkId::new("memcpy", size), &size, |b, _| {
            b.iter(|| buf.copy_from_slice(black_box(&source)))
        });
        group.bench_with_input(BenchmarkId::new("apply_mask", size), &size, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf), KEY, 0))
        });
        group.bench_with_input(BenchmarkId::new("naive", size), &size, |b, _| {
            b.iter(|| apply_mask_naive(black_box(&mut buf), KEY, 0))
        });
        // LLVM vectorises the RFC's loop above by itself; this one really goes one byte at a time
        // (the opaque index stops the vectoriser), which is what a "byte loop" costs.
        group.bench_with_input(BenchmarkId::new("byte_at_a_time", size), &size, |b, _| {
            b.iter(|| {
                for (i, byte) in black_box(&mut buf).iter_mut().enumerate() {
                    *byte ^= KEY[black_box(i) & 3];
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, unmask);
criterion_main!(benches);
