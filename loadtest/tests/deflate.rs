//! `--deflate` end to end against the real gateway (tungstenite has no permessage-deflate): every
//! connection agrees, compressed echoes and deliveries are inflated and verified byte for byte, the
//! JSON's `deflate` object has the wire-to-payload ratios, and a server that declines is reported,
//! not failed.
//!
//! Payloads are 1 KiB: loadtest's filler repeats every 256 bytes, so from about 300 bytes up it
//! compresses (1 KiB to about 0.3 of its size at level 1) and both directions show a ratio well
//! under 1. ringgate compresses what it sends from 128 bytes up (`--compression-min-size`).

mod support;

use std::time::Duration;

use support::gateway::Gateway;
use support::{Run, run_loadtest};

const LIMIT: Duration = Duration::from_secs(30);

/// Asserts a clean run: exit 0, every connection established, no error, every message answered.
fn assert_clean(run: &Run, conns: f64) {
    assert!(run.output.status.success(), "stdout:\n{}\nstderr:\n{}", run.stdout(), run.stderr());
    assert_eq!(run.num("/connections_established"), conns, "{:#}", run.json());
    assert_eq!(run.num("/errors"), 0.0, "{:#}", run.json());
    assert_eq!(run.json().pointer("/config/deflate").and_then(|v| v.as_bool()), Some(true));
}

#[test]
fn open_loop_echo_agrees_on_every_connection_and_compresses_both_ways() {
    let gateway = Gateway::start(&[]);
    let url = format!("{}/echo", gateway.base);
    let run = run_loadtest(
        "deflate-echo",
        &[&url, "--deflate", "--conns", "6", "--rate", "50", "--size", "1024", "--duration", "1s", "--quiet"],
        LIMIT,
    );
    assert_clean(&run, 6.0);
    assert_eq!(run.num("/deflate/connections_agreed"), 6.0);
    let (sent, received) = (run.num("/messages_sent"), run.num("/messages_received"));
    assert!(sent >= 250.0, "{sent} measured messages, expected about 300");
    assert_eq!(received, sent, "every echo verified after inflating: {:#}", run.json());
    // The whole run's messages, each 1 KiB of payload.
    let payload = run.num("/deflate/received/payload_bytes");
    assert!(payload >= received * 1024.0 && payload % 1024.0 == 0.0, "{payload}");
    assert_eq!(run.num("/deflate/sent/payload_bytes"), payload, "every message sent came back");
    for way in ["received", "sent"] {
        let ratio = run.num(&format!("/deflate/{way}/ratio"));
        assert!(ratio > 0.05 && ratio < 0.5, "{way} ratio {ratio}: 1 KiB of filler compresses");
        let wire = run.num(&format!("/deflate/{way}/wire_bytes"));
        assert!((wire / payload - ratio).abs() < 1e-9);
    }
    let line = run.stdout().lines().find(|l| l.starts_with("deflate:")).map(str::to_string);
    let line = line.unwrap_or_else(|| panic!("no deflate line in:\n{}", run.stdout()));
    assert!(line.starts_with("deflate:     6/6 connections agreed; received "), "{line}");
    assert!(line.contains(" on the wire (0.") && line.contains("; sent "), "{line}");
}

#[test]
fn closed_loop_small_messages_pass_plain_from_the_server_and_count_one_to_one() {
    // 64-byte payloads: under ringgate's 128-byte minimum it sends them plain (received ratio
    // exactly 1); loadtest compresses what it sends and sends plain what would not shrink.
    let gateway = Gateway::start(&[]);
    let url = format!("{}/echo", gateway.base);
    let run = run_loadtest(
        "deflate-closed",
        &[
            &url,
            "--deflate",
            "--conns",
            "4",
            "--rate",
            "0",
            "--pipeline",
            "4",
            "--size",
            "64",
            "--duration",
            "1s",
            "--quiet",
        ],
        LIMIT,
    );
    assert_clean(&run, 4.0);
    assert_eq!(run.num("/deflate/connections_agreed"), 4.0);
    assert!(run.num("/messages_received") > 100.0, "{:#}", run.json());
    assert_eq!(run.num("/deflate/received/ratio"), 1.0, "{:#}", run.json());
    assert_eq!(run.num("/deflate/received/wire_bytes"), run.num("/deflate/received/payload_bytes"));
    assert!(run.num("/deflate/sent/ratio") <= 1.0, "{:#}", run.json());
}

#[test]
fn a_server_that_keeps_its_context_is_followed() {
    // `--compression dedicated`: the gateway keeps its compression context per connection (no
    // server_no_context_takeover), so loadtest keeps an inflater per connection, and later echoes
    // compress against earlier ones.
    let gateway = Gateway::start(&["--compression", "dedicated"]);
    let url = format!("{}/echo", gateway.base);
    let run = run_loadtest(
        "deflate-dedicated",
        &[&url, "--deflate", "--conns", "4", "--rate", "50", "--size", "1024", "--duration", "1s", "--quiet"],
        LIMIT,
    );
    assert_clean(&run, 4.0);
    assert_eq!(run.num("/deflate/connections_agreed"), 4.0);
    assert_eq!(run.num("/messages_received"), run.num("/messages_sent"));
    let (received, sent) = (run.num("/deflate/received/ratio"), run.num("/deflate/sent/ratio"));
    assert!(received < sent, "the server's kept context compresses better: {received} vs {sent}");
}

#[test]
fn a_server_that_declines_is_reported_and_the_run_still_passes() {
    let gateway = Gateway::start(&["--compression", "off"]);
    let url = format!("{}/echo", gateway.base);
    let run = run_loadtest(
        "deflate-declined",
        &[&url, "--deflate", "--conns", "4", "--rate", "50", "--size", "1024", "--duration", "1s", "--quiet"],
        LIMIT,
    );
    assert_clean(&run, 4.0);
    assert_eq!(run.num("/deflate/connections_agreed"), 0.0);
    assert_eq!(run.num("/messages_received"), run.num("/messages_sent"));
    assert_eq!(run.num("/deflate/received/ratio"), 1.0);
    assert_eq!(run.num("/deflate/sent/ratio"), 1.0);
    assert!(
        run.stdout().contains(
            "deflate:     offered, but the server declined it on every connection (0/4): every message \
             went plain"
        ),
        "summary:\n{}",
        run.stdout()
    );
}

#[test]
fn pubsub_subscribers_inflate_every_delivery() {
    let gateway = Gateway::start(&[]);
    let url = format!("{}/pubsub", gateway.base);
    let run = run_loadtest(
        "deflate-pubsub",
        &[
            &url,
            "--deflate",
            "--mode",
            "pubsub",
            "--publishers",
            "2",
            "--subscribers",
            "4",
            "--rate",
            "50",
            "--size",
            "1024",
            "--duration",
            "1s",
            "--quiet",
        ],
        LIMIT,
    );
    assert_clean(&run, 6.0);
    assert_eq!(run.num("/deflate/connections_agreed"), 6.0);
    let published = run.num("/messages_sent");
    assert!(published >= 80.0, "{published} published, expected about 100");
    assert_eq!(run.num("/messages_received"), published * 4.0, "{:#}", run.json());
    assert_eq!(run.num("/deliveries_lost"), 0.0);
    for way in ["received", "sent"] {
        let ratio = run.num(&format!("/deflate/{way}/ratio"));
        assert!(ratio > 0.05 && ratio < 0.5, "{way} ratio {ratio}");
    }
}

#[test]
fn without_the_flag_nothing_is_offered_and_no_deflate_object_is_written() {
    let gateway = Gateway::start(&[]);
    let url = format!("{}/echo", gateway.base);
    let run = run_loadtest(
        "deflate-off",
        &[&url, "--conns", "2", "--rate", "20", "--size", "1024", "--duration", "500ms", "--quiet"],
        LIMIT,
    );
    assert!(run.output.status.success(), "stderr:\n{}", run.stderr());
    assert_eq!(run.num("/errors"), 0.0);
    assert!(run.json().get("deflate").is_none(), "{:#}", run.json());
    assert_eq!(run.json().pointer("/config/deflate").and_then(|v| v.as_bool()), Some(false));
    assert!(!run.stdout().contains("deflate:"), "summary:\n{}", run.stdout());
}
