//! End-to-end runs of the `loadtest` binary against tungstenite test servers: the JSON contract,
//! echo verification, connect mode, and failures that must be reported rather than hidden.

mod support;

use std::time::Duration;

use support::{Behaviour, TestServer, assert_percentiles, run_loadtest};

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn closed_loop_json_contract_and_output_files() {
    let server = TestServer::start(Behaviour::Echo);
    let run = run_loadtest(
        "contract",
        &[&server.url, "--conns", "8", "--rate", "0", "--duration", "2s", "--threads", "2", "--quiet"],
        LIMIT,
    );
    assert!(run.output.status.success(), "stderr:\n{}", run.stderr());
    let json = run.json();
    for key in [
        "connections_established",
        "connections_failed",
        "messages_sent",
        "messages_received",
        "errors",
        "throughput_msgs_per_sec",
        "latency_us",
        "handshake_latency_us",
    ] {
        assert!(json.get(key).is_some(), "key {key} missing from {json:#}");
    }
    assert_eq!(run.num("/connections_established"), 8.0);
    assert_eq!(run.num("/connections_failed"), 0.0);
    assert_eq!(run.num("/errors"), 0.0, "{json:#}");
    let (sent, received) = (run.num("/messages_sent"), run.num("/messages_received"));
    assert!(sent > 100.0, "only {sent} messages in 2 s of closed loop");
    assert!(received <= sent);
    assert!(received >= sent - 8.0, "closed loop lost echoes: {sent} sent, {received} received");
    assert!(run.num("/throughput_msgs_per_sec") > 0.0);
    assert_percentiles(&run, "latency_us");
    assert_percentiles(&run, "handshake_latency_us");
    assert_eq!(run.num("/handshake_latency_us/count"), 8.0);
    assert!(run.stdout().contains("p99.9"), "summary missing:\n{}", run.stdout());
}

#[test]
fn open_loop_echo_writes_hgrm_and_plot() {
    let server = TestServer::start(Behaviour::Echo);
    let dir = std::env::temp_dir().join(format!("loadtest-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (hgrm, svg) = (dir.join("latency.hgrm"), dir.join("latency.svg"));
    let run = run_loadtest(
        "files",
        &[
            &server.url,
            "--conns",
            "4",
            "--rate",
            "200",
            "--duration",
            "2s",
            "--warmup",
            "500ms",
            "--threads",
            "1",
            "--hgrm",
            hgrm.to_str().unwrap(),
            "--plot",
            svg.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert!(run.output.status.success(), "stderr:\n{}", run.stderr());
    assert_eq!(run.num("/errors"), 0.0, "{:#}", run.json());
    // Every scheduled message is sent and only the measured window counts (not the warmup):
    // 4 connections x 200/s x 2 s.
    let sent = run.num("/messages_sent");
    assert!((1580.0..=1620.0).contains(&sent), "{sent} messages sent, expected about 1600");
    assert_eq!(run.num("/messages_received"), sent);
    assert_percentiles(&run, "latency_us");
    assert!(run.stderr().contains("recv"), "no progress line:\n{}", run.stderr());

    let hgrm = std::fs::read_to_string(hgrm).unwrap();
    assert!(hgrm.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)\n\n"), "{hgrm}");
    assert!(hgrm.contains(&format!("Total count    = {:>12}]", sent as u64)), "{hgrm}");
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.contains("<svg") && svg.contains("<polyline"), "not a plot:\n{svg}");
}

#[test]
fn pipelined_closed_loop_keeps_that_many_messages_in_flight() {
    use std::sync::atomic::Ordering::Relaxed;
    // The server echoes only once it holds 8 messages from a connection (or after 50 ms without
    // one): a full batch means the client had 8 in flight, a message beyond it that it had more.
    let run_against_batches = |name: &str, pipeline: &str| {
        let server = TestServer::start(Behaviour::Batches(8));
        let run = run_loadtest(
            name,
            &[
                &server.url,
                "--conns",
                "4",
                "--rate",
                "0",
                "--pipeline",
                pipeline,
                "--duration",
                "1s",
                "--threads",
                "1",
                "--quiet",
            ],
            LIMIT,
        );
        assert!(run.output.status.success(), "stderr:\n{}", run.stderr());
        assert_eq!(run.num("/errors"), 0.0, "--pipeline {pipeline}: {:#}", run.json());
        assert_eq!(run.num("/config/pipeline"), pipeline.parse::<f64>().unwrap());
        // Every message sent before the end is echoed in the drain.
        assert_eq!(run.num("/messages_received"), run.num("/messages_sent"));
        (run, server.batches.full.load(Relaxed), server.batches.overruns.load(Relaxed))
    };

    let (run, full, overruns) = run_against_batches("pipeline", "8");
    assert_eq!(overruns, 0, "more than 8 messages were in flight on a connection");
    assert!(full >= 10, "only {full} full batches of 8");
    // Ping-pong gets at most one echo per connection per 50 ms here: 4 x 20 in the 1 s window.
    let received = run.num("/messages_received");
    assert!(received > 300.0, "only {received} echoes: messages did not stream");
    assert!(run.stdout().contains("8 messages in flight"), "{}", run.stdout());

    let (run, full, _) = run_against_batches("pipeline-1", "1");
    assert_eq!(full, 0, "ping-pong filled a batch of 8");
    assert!(run.num("/messages_received") <= 90.0, "{:#}", run.json());
}

#[test]
fn pipelined_closed_loop_verifies_every_echo() {
    let server = TestServer::start(Behaviour::Echo);
    let run = run_loadtest(
        "pipeline-echo",
        &[
            &server.url,
            "--conns",
            "8",
            "--rate",
            "0",
            "--pipeline",
            "16",
            "--size",
            "100",
            "--duration",
            "1s",
            "--threads",
            "2",
            "--quiet",
        ],
        LIMIT,
    );
    assert!(run.output.status.success(), "stderr:\n{}", run.stderr());
    assert_eq!(run.num("/errors"), 0.0, "{:#}", run.json());
    let (sent, received) = (run.num("/messages_sent"), run.num("/messages_received"));
    assert!(received > 100.0, "only {received} echoes in 1 s with 16 in flight");
    assert_eq!(received, sent);
    assert_percentiles(&run, "latency_us");

    // Every 10th echo on each connection corrupted: each is caught, and the window goes on.
    let server = TestServer::start(Behaviour::CorruptEvery(10));
    let run = run_loadtest(
        "pipeline-corrupt",
        &[&server.url, "--conns", "2", "--rate", "0", "--pipeline", "4", "--duration", "1s", "--quiet"],
        LIMIT,
    );
    let (received, mismatches) = (run.num("/messages_received"), run.num("/errors_by_kind/echo_mismatch"));
    assert!(received > 100.0, "only {received} good echoes");
    assert!(mismatches >= (received / 10.0 - 4.0).max(1.0), "{mismatches} mismatches for {received} echoes");
    assert_eq!(run.num("/errors"), mismatches, "{:#}", run.json());
}

#[test]
fn corrupted_echoes_are_counted_as_errors() {
    let server = TestServer::start(Behaviour::CorruptEvery(10));
    let run = run_loadtest(
        "corrupt",
        &[&server.url, "--conns", "2", "--rate", "100", "--duration", "1s", "--threads", "1", "--quiet"],
        LIMIT,
    );
    let sent = run.num("/messages_sent");
    let mismatches = run.num("/errors_by_kind/echo_mismatch");
    // Every 10th echo on each connection is corrupted.
    assert!(mismatches >= (sent / 10.0 - 4.0).max(1.0), "{mismatches} mismatches for {sent} messages");
    assert_eq!(run.num("/errors"), mismatches);
    assert!(run.num("/messages_received") <= sent - mismatches);
}

#[test]
fn connect_mode_holds_idle_connections() {
    let server = TestServer::start(Behaviour::Echo);
    let run = run_loadtest(
        "connect",
        &[&server.url, "--mode", "connect", "--conns", "50", "--duration", "1s", "--threads", "2", "--quiet"],
        LIMIT,
    );
    assert!(run.output.status.success(), "stderr:\n{}", run.stderr());
    assert_eq!(run.num("/connections_established"), 50.0);
    assert_eq!(run.num("/messages_sent"), 0.0);
    assert_eq!(run.num("/errors"), 0.0, "{:#}", run.json());
    assert!(run.num("/connect_rate_per_sec") > 0.0);
    assert_percentiles(&run, "handshake_latency_us");
}

#[test]
fn refused_connections_fail_the_run_with_a_reason() {
    // A port that was just free: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("ws://127.0.0.1:{port}/echo");
    let run = run_loadtest("refused", &[&url, "--conns", "5", "--duration", "1s", "--quiet"], LIMIT);
    assert!(!run.output.status.success());
    assert_eq!(run.num("/connections_established"), 0.0);
    assert_eq!(run.num("/connections_failed"), 5.0);
    assert_eq!(run.num("/connections_failed_by_reason/refused"), 5.0);
}

#[test]
fn meaningless_flags_are_usage_errors() {
    let run = run_loadtest("usage", &["--size", "8", "--quiet"], LIMIT);
    assert_eq!(run.output.status.code(), Some(2));
    assert!(run.stderr().contains("--size 8 is too small"), "{}", run.stderr());
}

#[test]
fn too_many_connections_for_the_limits_is_a_clear_error() {
    let run = run_loadtest("limits", &["--conns", "4000000", "--quiet"], LIMIT);
    assert!(!run.output.status.success());
    let stderr = run.stderr();
    assert!(
        stderr.contains("file descriptors") || stderr.contains("ephemeral port range"),
        "unclear error:\n{stderr}"
    );
    assert!(run.json.is_none());
}

#[test]
fn pings_are_answered_while_sending_and_while_idle() {
    for (name, mode, rate) in [("ping-echo", "echo", "50"), ("ping-idle", "connect", "0")] {
        let server = TestServer::start(Behaviour::Pinging);
        let run = run_loadtest(
            name,
            &[&server.url, "--mode", mode, "--rate", rate, "--conns", "3", "--duration", "1s", "--quiet"],
            LIMIT,
        );
        assert!(run.output.status.success(), "stderr:\n{}", run.stderr());
        assert_eq!(run.num("/errors"), 0.0, "{mode}: {:#}", run.json());
        // 3 connections pinged every 100 ms for about a second.
        let pongs = server.pongs.load(std::sync::atomic::Ordering::Relaxed);
        assert!(pongs >= 15, "{mode}: only {pongs} pongs");
        if mode == "echo" {
            assert_eq!(run.num("/messages_received"), run.num("/messages_sent"));
        }
    }
}

#[test]
fn source_ips_spread_connections_over_local_addresses() {
    let server = TestServer::start(Behaviour::Echo);
    let run = run_loadtest(
        "source-ips",
        &[
            &server.url,
            "--source-ips",
            "127.0.0.2-127.0.0.3,127.0.0.7",
            "--conns",
            "6",
            "--rate",
            "0",
            "--duration",
            "500ms",
            "--quiet",
        ],
        LIMIT,
    );
    assert!(run.output.status.success(), "stderr:\n{}", run.stderr());
    assert_eq!(run.num("/connections_established"), 6.0);
    assert_eq!(run.num("/errors"), 0.0);
    let mut peers: Vec<String> = server.peers.lock().unwrap().iter().map(|ip| ip.to_string()).collect();
    peers.sort();
    assert_eq!(peers, ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3", "127.0.0.7", "127.0.0.7"]);
}
