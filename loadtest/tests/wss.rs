//! `wss://` end to end against the real gateway terminating TLS (`--tls-cert`/`--tls-key`), with
//! certificates made here (rcgen, ECDSA P-256): echo and connect mode trusting a test CA with
//! `--ca`, on both io backends; `--insecure` against a self-signed certificate; a CA that did not
//! sign the server's certificate, a certificate for another name and a plain port failing every
//! handshake, counted by reason, in bounded time.

mod support;

use std::time::Duration;

use support::gateway::Gateway;
use support::tls::{TestCa, self_signed, temp_dir};
use support::{Run, assert_percentiles, run_loadtest};

const LIMIT: Duration = Duration::from_secs(30);

/// The gateway serving TLS with `cert` and `key` on 127.0.0.1; its `wss://` base URL.
fn tls_gateway(cert: &std::path::Path, key: &std::path::Path) -> (Gateway, String) {
    let gateway = Gateway::start(&[
        "--tls-cert",
        cert.to_str().expect("a UTF-8 path"),
        "--tls-key",
        key.to_str().expect("a UTF-8 path"),
    ]);
    let base = gateway.base.replacen("ws://", "wss://", 1);
    (gateway, base)
}

/// A TLS gateway whose certificate, for `names`, comes from a CA of the test's own: the gateway,
/// its `wss://` base URL, and the CA's PEM file for `--ca`.
fn gateway_with_test_ca(test: &str, names: &[&str]) -> (Gateway, String, std::path::PathBuf) {
    let dir = temp_dir(test);
    let ca = TestCa::new("loadtest test CA");
    let leaf = ca.leaf(&dir, "server", names);
    let ca_pem = ca.write(&dir, "ca");
    let (gateway, base) = tls_gateway(&leaf.cert, &leaf.key);
    (gateway, base, ca_pem)
}

/// Asserts a clean run of `conns` connections, each with a full TLS 1.3 handshake counted.
fn assert_clean_tls(run: &Run, conns: f64, trust: &str) {
    assert!(run.output.status.success(), "stdout:\n{}\nstderr:\n{}", run.stdout(), run.stderr());
    let json = run.json();
    assert_eq!(run.num("/connections_established"), conns, "{json:#}");
    assert_eq!(run.num("/connections_failed"), 0.0, "{json:#}");
    assert_eq!(run.num("/errors"), 0.0, "{json:#}");
    assert!(json["config"]["url"].as_str().is_some_and(|url| url.starts_with("wss://")), "{json:#}");
    let tls = &json["tls"];
    assert_eq!(tls["trust"], trust, "{json:#}");
    assert_eq!(run.num("/tls/handshakes"), conns, "{json:#}");
    assert_eq!(run.num("/tls/handshake_failures"), 0.0, "{json:#}");
    let sessions = tls["sessions"].as_array().expect("sessions");
    assert_eq!(sessions.len(), 1, "one version and suite for every connection: {json:#}");
    assert_eq!(sessions[0]["version"], "1.3", "{json:#}");
    assert!(sessions[0]["cipher_suite"].as_str().is_some_and(|s| s.starts_with("TLS13_")), "{json:#}");
    assert_eq!(run.num("/tls/tls_handshake_latency_us/count"), conns);
    assert_percentiles(run, "tls/tls_handshake_latency_us");
    // The handshake runs from the TCP connect to the 101: the TLS handshake is part of it.
    assert_eq!(run.num("/handshake_latency_us/count"), conns);
    assert!(
        run.num("/handshake_latency_us/p50") >= run.num("/tls/tls_handshake_latency_us/p50"),
        "the WebSocket handshake ended before the TLS handshake under it: {json:#}"
    );
    let line = run.stdout().lines().find(|l| l.starts_with("tls:")).map(str::to_string);
    let line = line.unwrap_or_else(|| panic!("no tls line in:\n{}", run.stdout()));
    assert!(line.starts_with(&format!("tls:         {conns} handshakes: TLS 1.3 TLS13_")), "{line}");
    assert!(line.ends_with(", 0 failed"), "{line}");
}

#[test]
fn echo_over_wss_trusting_a_test_ca_on_both_io_backends() {
    let (_gateway, base, ca_pem) = gateway_with_test_ca("echo", &["127.0.0.1", "localhost"]);
    let url = format!("{base}/echo");
    for io in ["uring", "epoll"] {
        let run = run_loadtest(
            &format!("wss-echo-{io}"),
            &[
                &url,
                "--ca",
                ca_pem.to_str().unwrap(),
                "--conns",
                "50",
                "--rate",
                "0",
                "--duration",
                "1s",
                "--io",
                io,
                "--quiet",
            ],
            LIMIT,
        );
        assert_clean_tls(&run, 50.0, "ca");
        let (sent, received) = (run.num("/messages_sent"), run.num("/messages_received"));
        assert!(received > 200.0, "{io}: only {received} echoes in 1 s of closed loop over TLS");
        assert!(received >= sent - 50.0, "{io}: closed loop lost echoes: {sent} sent, {received} received");
    }
}

#[test]
fn open_loop_with_a_large_payload_crosses_records() {
    // 40 KiB messages: each crosses three TLS records each way, and reads end mid-record.
    let (_gateway, base, ca_pem) = gateway_with_test_ca("large", &["127.0.0.1"]);
    let run = run_loadtest(
        "wss-large",
        &[
            &format!("{base}/echo"),
            "--ca",
            ca_pem.to_str().unwrap(),
            "--conns",
            "4",
            "--rate",
            "20",
            "--size",
            "40960",
            "--duration",
            "1s",
            // Every connection's schedule covers the measured window, however slow the TLS
            // handshakes of a debug build on a busy machine.
            "--warmup",
            "500ms",
            "--quiet",
        ],
        LIMIT,
    );
    assert_clean_tls(&run, 4.0, "ca");
    assert_eq!(run.num("/messages_received"), run.num("/messages_sent"), "{:#}", run.json());
    assert!(run.num("/messages_sent") >= 70.0, "{:#}", run.json());
}

#[test]
fn connect_mode_over_wss_counts_handshakes_with_tls_in_their_latency() {
    let (_gateway, base, ca_pem) = gateway_with_test_ca("connect", &["127.0.0.1"]);
    let run = run_loadtest(
        "wss-connect",
        &[
            &format!("{base}/echo"),
            "--ca",
            ca_pem.to_str().unwrap(),
            "--mode",
            "connect",
            "--conns",
            "50",
            "--duration",
            "1s",
        ],
        LIMIT,
    );
    assert_clean_tls(&run, 50.0, "ca");
    // What a handshake cost the client, to set beside the server's.
    assert!(run.num("/client_cpu/us_per_handshake") > 0.0, "{:#}", run.json());
    assert!(run.stdout().contains(" us per established connection, "), "{}", run.stdout());
    let headline = run.stdout().lines().find(|l| l.starts_with("handshakes:")).map(str::to_string);
    assert!(
        headline.as_deref().is_some_and(|l| l.starts_with("handshakes:  50 established of 50")),
        "{}",
        run.stdout()
    );
}

#[test]
fn insecure_accepts_a_self_signed_certificate() {
    let dir = temp_dir("insecure");
    let leaf = self_signed(&dir, "self-signed", &["gateway.test"]);
    let (_gateway, base) = tls_gateway(&leaf.cert, &leaf.key);
    // Neither the issuer nor the name (127.0.0.1, not gateway.test) would pass a real check.
    let run = run_loadtest(
        "wss-insecure",
        &[
            &format!("{base}/echo"),
            "--insecure",
            "--conns",
            "20",
            "--rate",
            "20",
            "--duration",
            "1s",
            "--warmup",
            "500ms",
            "--quiet",
        ],
        LIMIT,
    );
    assert_clean_tls(&run, 20.0, "insecure");
    assert!(run.num("/messages_received") >= 350.0, "{:#}", run.json());
}

#[test]
fn a_ca_that_did_not_sign_the_certificate_fails_every_handshake_in_bounded_time() {
    let dir = temp_dir("wrong-ca");
    let signer = TestCa::new("the server's CA");
    let leaf = signer.leaf(&dir, "server", &["127.0.0.1"]);
    let stranger = TestCa::new("another CA").write(&dir, "other-ca");
    let (_gateway, base) = tls_gateway(&leaf.cert, &leaf.key);
    for io in ["uring", "epoll"] {
        let run = run_loadtest(
            &format!("wss-wrong-ca-{io}"),
            &[
                &format!("{base}/echo"),
                "--ca",
                stranger.to_str().unwrap(),
                "--conns",
                "50",
                "--rate",
                "0",
                "--duration",
                "1s",
                "--io",
                io,
            ],
            LIMIT,
        );
        let json = run.json();
        assert_eq!(run.output.status.code(), Some(1), "{io}: stderr:\n{}", run.stderr());
        assert!(run.stderr().contains("no connection could be established"), "{}", run.stderr());
        assert!(run.elapsed < Duration::from_secs(10), "{io}: took {:?}", run.elapsed);
        assert_eq!(run.num("/connections_established"), 0.0, "{json:#}");
        assert_eq!(run.num("/connections_failed"), 50.0, "{json:#}");
        assert_eq!(run.num("/connections_failed_by_reason/tls_unknown_issuer"), 50.0, "{json:#}");
        assert_eq!(run.num("/tls/handshakes"), 0.0, "{json:#}");
        assert_eq!(run.num("/tls/handshake_failures"), 50.0, "{json:#}");
        assert_eq!(run.num("/tls/handshake_failures_by_reason/unknown_issuer"), 50.0, "{json:#}");
        let line = run.stdout().lines().find(|l| l.starts_with("tls:")).map(str::to_string);
        assert_eq!(
            line.as_deref(),
            Some("tls:         0 handshakes (certificate verified with --ca), 50 failed (unknown_issuer 50)"),
            "{}",
            run.stdout()
        );
    }
}

/// Runs 10 connections that must all fail their TLS handshake for `reason`, quickly.
fn assert_all_fail(name: &str, url: &str, trust: &[&str], reason: &str) {
    let mut args = vec![url, "--conns", "10", "--duration", "1s", "--quiet"];
    args.extend_from_slice(trust);
    let run = run_loadtest(name, &args, LIMIT);
    let json = run.json();
    assert_eq!(run.output.status.code(), Some(1), "stderr:\n{}", run.stderr());
    assert!(run.elapsed < Duration::from_secs(10), "took {:?}", run.elapsed);
    assert_eq!(run.num(&format!("/connections_failed_by_reason/tls_{reason}")), 10.0, "{json:#}");
    assert_eq!(run.num(&format!("/tls/handshake_failures_by_reason/{reason}")), 10.0, "{json:#}");
}

#[test]
fn handshake_failures_are_named_a_plain_port_and_a_wrong_name() {
    // A plain port answers the ClientHello with an HTTP 400: not TLS.
    let plain = Gateway::start(&[]);
    let url = format!("{}/echo", plain.base.replacen("ws://", "wss://", 1));
    assert_all_fail("wss-plain-port", &url, &["--insecure"], "not_tls");
    // A certificate from the trusted CA, but for another name than the URL's host.
    let (_gateway, base, ca_pem) = gateway_with_test_ca("name", &["gateway.test"]);
    assert_all_fail(
        "wss-name",
        &format!("{base}/echo"),
        &["--ca", ca_pem.to_str().unwrap()],
        "name_mismatch",
    );
}

#[test]
fn wss_without_a_trust_choice_is_a_usage_error_naming_both() {
    let run = run_loadtest("wss-no-trust", &["wss://127.0.0.1:9/echo", "--conns", "1"], LIMIT);
    assert_eq!(run.output.status.code(), Some(2), "stderr:\n{}", run.stderr());
    let stderr = run.stderr();
    assert!(stderr.contains("--ca FILE") && stderr.contains("--insecure"), "{stderr}");
}
