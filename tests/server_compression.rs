//! permessage-deflate against the real binary, at the byte level (a raw client of our own writes
//! exactly the frames a hostile or unusual peer would): decompression bombs, what a connection
//! that agreed the extension holds while idle, and the counters a compressed exchange moves.

mod common;

use common::prom::scrape;
use common::server::Server;
use common::wire::{self, Client, HttpConn, encode_frame};
use ringgate::proto::deflate::Deflater;

const KEY: Option<[u8; 4]> = Some([0x11, 0x22, 0x33, 0x44]);
const RSV1: u8 = 0b100;

/// Upgrades on `path` offering permessage-deflate (the browsers' offer) and checks the answer.
fn deflate_client(server: &Server, path: &str) -> Client {
    let offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
    let (response, client) = wire::upgrade_with(server.addr(), path, offer);
    assert_eq!(
        response.header("Sec-WebSocket-Extensions"),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    client.expect("upgraded")
}

/// A compressed message of `mebibytes` MiB of zeros, built from one compressed MiB repeated: each
/// piece is a complete run of DEFLATE blocks ending in a sync flush, so pieces concatenate into one
/// stream (about 1 KiB on the wire per MiB inflated).
fn zeros_bomb(mebibytes: usize) -> Vec<u8> {
    let mut piece = Vec::new();
    Deflater::new(9, 15, true).compress(&vec![0u8; 1 << 20], &mut piece);
    let mut bomb = Vec::with_capacity((piece.len() + 4) * mebibytes);
    for i in 0..mebibytes {
        bomb.extend_from_slice(&piece);
        if i + 1 < mebibytes {
            bomb.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
        }
    }
    bomb
}

fn expect_close(client: &mut Client, code: u16) {
    loop {
        let frame = client.read_frame();
        if frame.opcode == 0x8 {
            assert_eq!(frame.close_code(), Some(code));
            return;
        }
    }
}

#[test]
fn a_bomb_is_closed_with_1009_without_being_inflated_and_memory_stays_flat() {
    let server = Server::start(&["--workers", "1"]);
    // Warm up: one connection and a compressed echo, so the baseline includes the worker's
    // compressor and spare decompressor.
    let mut warm = deflate_client(&server, "/echo");
    let mut hello = Vec::new();
    Deflater::new(6, 15, true).compress(&[b'x'; 4096], &mut hello);
    warm.send_raw(&encode_frame(true, RSV1, 0x2, &hello, KEY));
    let echo = warm.read_frame();
    assert_eq!((echo.rsv, echo.opcode), (RSV1, 0x2), "the echo comes back compressed");
    let before = server.rss_kib();

    // 10 KiB on the wire for 10 MiB, then 1 MiB on the wire for 1 GiB, whole and fragmented.
    let small = zeros_bomb(10);
    let large = zeros_bomb(1024);
    assert!(
        small.len() < 12 << 10 && large.len() < (1 << 20) + (64 << 10),
        "{} / {}",
        small.len(),
        large.len()
    );
    for bomb in [&small, &large] {
        let mut client = deflate_client(&server, "/echo");
        client.send_raw(&encode_frame(true, RSV1, 0x2, bomb, KEY));
        expect_close(&mut client, 1009);
        let mut client = deflate_client(&server, "/echo");
        let (first, rest) = bomb.split_at(bomb.len() / 2);
        client.send_raw(&encode_frame(false, RSV1, 0x2, first, KEY));
        client.send_raw(&encode_frame(true, 0, 0x0, rest, KEY));
        expect_close(&mut client, 1009);
    }
    let after = server.rss_kib();
    // The limit is 1 MiB inflated: what a bomb can make the worker hold is that, plus its
    // compressed bytes while they arrive; not the gigabyte it inflates to.
    assert!(after < before + 16 * 1024, "RSS grew from {before} KiB to {after} KiB");
    drop(warm);
    let metrics = scrape(&mut HttpConn::connect(server.addr()), "/metrics");
    assert_eq!(metrics.sum_where("ringgate_close_frames_sent_total", "code", "1009"), 4.0);
}

#[test]
fn a_compressed_exchange_moves_the_counters_by_exactly_what_crossed_the_wire() {
    let server = Server::start(&["--workers", "1"]);
    let mut client = deflate_client(&server, "/echo");
    let text = br#"{"event":"tick","symbol":"ACME","price":1234.5}"#.repeat(40);
    let mut compressed = Vec::new();
    Deflater::new(6, 15, true).compress(&text, &mut compressed);
    client.send_raw(&encode_frame(true, RSV1, 0x1, &compressed, KEY));
    let echo = client.read_frame();
    assert_eq!((echo.rsv, echo.opcode), (RSV1, 0x1));
    let mut inflated = Vec::new();
    ringgate::proto::deflate::Inflater::new(true)
        .inflate(&echo.payload, 1 << 20, &mut inflated)
        .expect("inflates");
    assert_eq!(inflated, text);
    // Below --compression-min-size (128 B), a message comes back plain.
    client.send(0x1, b"short");
    let short = client.read_frame();
    assert_eq!((short.rsv, &short.payload[..]), (0, &b"short"[..]));

    let metrics = scrape(&mut HttpConn::connect(server.addr()), "/metrics");
    let bytes = |direction: &str, stage: &str| {
        metrics
            .samples("ringgate_compression_payload_bytes_total")
            .find(|s| s.label("direction") == Some(direction) && s.label("stage") == Some(stage))
            .map_or(-1.0, |s| s.value)
    };
    assert_eq!(bytes("in", "compressed"), compressed.len() as f64);
    assert_eq!(bytes("in", "uncompressed"), text.len() as f64);
    assert_eq!(bytes("out", "compressed"), echo.payload.len() as f64);
    assert_eq!(bytes("out", "uncompressed"), text.len() as f64);
    assert_eq!(metrics.sum_where("ringgate_compressed_messages_total", "direction", "in"), 1.0);
    assert_eq!(metrics.sum_where("ringgate_compressed_messages_total", "direction", "out"), 1.0);
    assert_eq!(metrics.sum("ringgate_compression_runs_total"), 1.0, "the short one was not tried");
    assert_eq!(metrics.sum("ringgate_compression_connections"), 1.0);
    assert_eq!(metrics.sum("ringgate_compression_inflaters"), 0.0);
    let payload_in = metrics.sum_where("ringgate_payload_received_bytes_total", "route", "echo");
    assert_eq!(payload_in, (compressed.len() + 5) as f64, "payload counters count bytes as on the wire");
}
