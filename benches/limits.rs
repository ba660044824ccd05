//! What rate limits add to the hot paths.
//!
//! - `message_budget`: a read of 16 masked 20-byte messages assembled as a connection does (the
//!   baseline), against the same read with every message charged to a connection's budget (the
//!   refill once per read, a spend per message), as `--max-message-rate` and `--max-byte-rate` do.
//! - `address_limits`: what a connection's accept and close cost in the process-wide table with
//!   `--max-conns-per-ip` and `--max-conn-rate-per-ip` (one address; and 10,000 addresses in turn,
//!   the table at that size), beside the handshake the connection then makes (parse, validate,
//!   accept key: `benches/handshake.rs`' subject) as the baseline.

use std::net::IpAddr;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringgate::gateway::address_limits::{AddressLimitSettings, AddressLimits};
use ringgate::gateway::rate_limit::{MessageBudget, MessageRates, RateLimitAction};
use ringgate::proto::frame::{FrameHeader, MAX_HEADER_LEN, OpCode};
use ringgate::proto::handshake::{
    DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADERS, Parsed, StaticPolicy, accept, parse_request,
};
use ringgate::proto::mask::apply_mask;
use ringgate::proto::message::{Assembler, Event, Limits, Role};
use std::hint::black_box;

const KEY: [u8; 4] = [0x11, 0x22, 0x33, 0x44];
const MESSAGES: usize = 16;

/// `count` masked 20-byte text frames, back to back, as one read.
fn read_of_small_messages(count: usize) -> Vec<u8> {
    let mut wire = Vec::new();
    for _ in 0..count {
        let header =
            FrameHeader { fin: true, rsv: 0, opcode: OpCode::Text, mask: Some(KEY), payload_len: 20 };
        let mut head = [0u8; MAX_HEADER_LEN];
        let len = header.encode(&mut head);
        wire.extend_from_slice(&head[..len]);
        let start = wire.len();
        wire.extend_from_slice(b"{\"price\":101.25,\"q\":}");
        wire.truncate(start + 20);
        apply_mask(&mut wire[start..], KEY, 0);
    }
    wire
}

/// Assembles one read; with a budget, charges each message to it. Returns the bytes delivered.
fn assemble(
    assembler: &mut Assembler,
    read: &mut [u8],
    budget: Option<(&mut MessageBudget, &MessageRates)>,
) -> usize {
    let mut delivered = 0;
    let mut at = 0;
    let mut budget = budget;
    if let Some((budget, rates)) = budget.as_mut() {
        budget.refill(1, rates);
    }
    loop {
        let progress = assembler.feed(&mut read[at..]).expect("valid input");
        if let Some(Event::Message { payload, .. }) = progress.event {
            let admitted = match budget.as_mut() {
                Some((budget, rates)) => budget.spend(payload.len(), rates).is_ok(),
                None => true,
            };
            if admitted {
                delivered += payload.len();
            }
        }
        if progress.consumed == 0 {
            break;
        }
        at += progress.consumed;
    }
    delivered
}

fn message_budget(c: &mut Criterion) {
    let wire = read_of_small_messages(MESSAGES);
    let mut scratch = wire.clone();
    let mut assembler = Assembler::new(Role::Server, Limits::default());
    // High enough that nothing is refused: the cost measured is the bookkeeping, not a refusal.
    let rates = MessageRates {
        messages_per_second: 1_000_000,
        bytes_per_second: 1 << 30,
        action: RateLimitAction::Close,
    };
    let mut budget = MessageBudget::full(&rates);
    let mut group = c.benchmark_group("message_budget");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    group.bench_function("assemble_16x20B_baseline", |b| {
        b.iter(|| {
            scratch.copy_from_slice(&wire);
            black_box(assemble(&mut assembler, &mut scratch, None))
        })
    });
    group.bench_function("assemble_16x20B_with_budget", |b| {
        b.iter(|| {
            scratch.copy_from_slice(&wire);
            black_box(assemble(&mut assembler, &mut scratch, Some((&mut budget, &rates))))
        })
    });
    group.finish();
}

const REQUEST: &[u8] = b"GET /echo HTTP/1.1\r\n\
Host: gateway.example.com\r\n\
Connection: Upgrade\r\n\
Upgrade: websocket\r\n\
Origin: https://app.example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

fn address_limits(c: &mut Criterion) {
    let policy = StaticPolicy::default();
    // Limits no benchmark reaches: the cost measured is the bookkeeping, not a refusal.
    let both = AddressLimitSettings { max_conns_per_ip: u32::MAX, max_conn_rate_per_ip: u32::MAX };
    let mut group = c.benchmark_group("address_limits");
    group.throughput(Throughput::Elements(1));
    let mut response = Vec::with_capacity(256);
    group.bench_function("handshake_baseline", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
            let parsed = parse_request(black_box(REQUEST), &mut headers, DEFAULT_MAX_HEADER_BYTES);
            if let Ok(Parsed::Complete(request, _)) = parsed
                && let Ok(accepted) = accept(&request, &policy)
            {
                response.clear();
                accepted.write_response(&mut response);
            }
            response.len()
        })
    });
    let table = AddressLimits::new(both).expect("limits set");
    let one: IpAddr = [192, 0, 2, 1].into();
    group.bench_function("admit_release_one_address", |b| {
        b.iter(|| {
            let now = table.now_ms();
            let ticket = table.admit(black_box(one), now).expect("admitted").expect("counted");
            table.release(ticket, now);
        })
    });
    let table = AddressLimits::new(both).expect("limits set");
    let addresses: Vec<IpAddr> =
        (0..10_000u32).map(|n| IpAddr::from((0x0A00_0000 | n).to_be_bytes())).collect();
    let mut next = 0;
    group.bench_function("admit_release_10000_addresses", |b| {
        b.iter(|| {
            let now = table.now_ms();
            let ticket = table.admit(addresses[next], now).expect("admitted").expect("counted");
            table.release(ticket, now);
            next = (next + 1) % addresses.len();
        })
    });
    group.finish();
}

criterion_group!(benches, message_budget, address_limits);
criterion_main!(benches);
