//! How a run ends for the shell, end to end: the exit status (0 clean, 1 failed connections or
//! errors unless `--allow-errors`, 130 interrupted) and the report an interrupted run still prints.
//! Real `loadtest` runs against tungstenite test servers on loopback, each bounded in time.

mod support;

use std::time::Duration;

use support::{Behaviour, TestServer, run_loadtest, run_loadtest_signalled};

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn errors_exit_1_with_a_reason_unless_allowed() {
    // Every 10th echo on each connection corrupted: a handful of echo_mismatch errors.
    let server = TestServer::start(Behaviour::CorruptEvery(10));
    let args =
        [&server.url, "--conns", "2", "--rate", "100", "--duration", "1s", "--threads", "1", "--quiet"];
    let run = run_loadtest("exit-errors", &args, LIMIT);
    assert_eq!(run.output.status.code(), Some(1), "stderr:\n{}", run.stderr());
    let errors = run.num("/errors");
    assert!(errors >= 1.0, "{:#}", run.json());
    let reason = format!("loadtest: {errors} errors (exit status 1; --allow-errors to accept them)");
    assert!(run.stderr().contains(&reason), "no {reason:?} in stderr:\n{}", run.stderr());

    let mut allowed = args.to_vec();
    allowed.push("--allow-errors");
    let run = run_loadtest("exit-errors-allowed", &allowed, LIMIT);
    assert_eq!(run.output.status.code(), Some(0), "stderr:\n{}", run.stderr());
    assert!(run.num("/errors") >= 1.0, "the errors are still reported: {:#}", run.json());
}

#[test]
fn failed_connections_exit_1_unless_allowed() {
    // Every 2nd handshake answered 503: 2 of 4 connections fail, 2 are established.
    let server = TestServer::start(Behaviour::RejectEvery(2));
    let args = [&server.url, "--conns", "4", "--rate", "0", "--duration", "1s", "--threads", "1", "--quiet"];
    let run = run_loadtest("exit-failed", &args, LIMIT);
    assert_eq!(run.output.status.code(), Some(1), "stderr:\n{}", run.stderr());
    assert_eq!(run.num("/connections_established"), 2.0, "{:#}", run.json());
    assert_eq!(run.num("/connections_failed_by_reason/http_503"), 2.0, "{:#}", run.json());
    assert_eq!(run.num("/errors"), 0.0, "{:#}", run.json());
    assert!(
        run.stderr()
            .contains("loadtest: 2 failed connections (exit status 1; --allow-errors to accept them)"),
        "stderr:\n{}",
        run.stderr()
    );

    let mut allowed = args.to_vec();
    allowed.push("--allow-errors");
    let run = run_loadtest("exit-failed-allowed", &allowed, LIMIT);
    assert_eq!(run.output.status.code(), Some(0), "stderr:\n{}", run.stderr());
    assert_eq!(run.num("/connections_failed"), 2.0, "{:#}", run.json());
}

#[test]
fn no_connection_fails_even_with_allow_errors() {
    // A port that was just free: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("ws://127.0.0.1:{port}/echo");
    let run = run_loadtest(
        "exit-none",
        &[&url, "--conns", "2", "--duration", "1s", "--allow-errors", "--quiet"],
        LIMIT,
    );
    assert_eq!(run.output.status.code(), Some(1), "stderr:\n{}", run.stderr());
    assert!(run.stderr().contains("no connection could be established"), "{}", run.stderr());
}

#[test]
fn a_clean_run_reports_the_new_keys_and_the_header() {
    let server = TestServer::start(Behaviour::Echo);
    let run = run_loadtest(
        "exit-clean",
        &[&server.url, "--conns", "2", "--rate", "20", "--duration", "1s", "--threads", "1", "--quiet"],
        LIMIT,
    );
    assert_eq!(run.output.status.code(), Some(0), "stderr:\n{}", run.stderr());
    let json = run.json();
    assert_eq!(json["interrupted"], false, "{json:#}");
    assert_eq!(run.num("/measured_secs"), 1.0);
    assert!(json["client_threads"].is_array(), "{json:#}");
    assert!(json["client_saturated"].is_boolean(), "{json:#}");
    assert!(json["client_kept_schedule"].is_boolean(), "{json:#}");
    assert!(run.num("/late_sends_percent") >= 0.0);
    // The header comes first: the figures readers compare, then the client's verdicts.
    let stdout = run.stdout();
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines[1].starts_with("throughput:") && lines[1].contains("p99.9"), "{stdout}");
    assert!(lines[2].starts_with("client cpu:") && lines[2].contains("us per echoed message"), "{stdout}");
    assert!(lines[3].starts_with("schedule:") && lines[3].contains("measured sends late"), "{stdout}");
    assert!(lines[4].starts_with("client threads:"), "{stdout}");
}

#[test]
fn an_interrupted_run_reports_what_it_measured_and_exits_130() {
    let server = TestServer::start(Behaviour::Echo);
    // The measured window starts about 50 ms after the start: SIGINT 1.5 s in cuts it at ~1.45 s
    // of 3 s.
    let run = run_loadtest_signalled(
        "exit-interrupted",
        &[&server.url, "--conns", "2", "--rate", "50", "--duration", "3s", "--threads", "1", "--quiet"],
        LIMIT,
        &[(Duration::from_millis(1500), libc::SIGINT)],
    );
    assert_eq!(run.output.status.code(), Some(130), "stderr:\n{}", run.stderr());
    assert!(
        run.stderr().contains("loadtest: interrupted, finishing and reporting what was measured"),
        "stderr:\n{}",
        run.stderr()
    );
    assert_eq!(run.json()["interrupted"], true, "{:#}", run.json());
    let measured = run.num("/measured_secs");
    assert!((1.0..2.5).contains(&measured), "measured {measured} s of 3 s");
    assert_eq!(run.num("/config/duration_secs"), 3.0);
    let stdout = run.stdout();
    let line = format!("interrupted after {measured:.1}s of the 3.0s measured window");
    assert!(stdout.contains(&line), "no {line:?} in:\n{stdout}");
    assert!(stdout.contains("throughput:"), "no summary:\n{stdout}");
}

#[test]
fn a_second_signal_quits_at_once() {
    // Echoes that take 5 s keep the first signal's drain going (up to a second, then the closing
    // handshake) when the second comes.
    let server = TestServer::start(Behaviour::Delay(Duration::from_secs(5)));
    let run = run_loadtest_signalled(
        "exit-twice",
        &[&server.url, "--conns", "2", "--rate", "50", "--duration", "30s", "--threads", "1", "--quiet"],
        LIMIT,
        &[(Duration::from_millis(1000), libc::SIGTERM), (Duration::from_millis(1300), libc::SIGINT)],
    );
    assert_eq!(run.output.status.code(), Some(130), "stderr:\n{}", run.stderr());
    assert!(run.elapsed < Duration::from_secs(10), "took {:?} to quit", run.elapsed);
    assert!(run.stderr().contains("interrupted again"), "stderr:\n{}", run.stderr());
}

#[test]
fn ctrl_c_stops_a_long_run_within_seconds_and_reports_it() {
    let server = TestServer::start(Behaviour::Echo);
    let run = run_loadtest_signalled(
        "exit-ctrl-c",
        &[&server.url, "--conns", "4", "--rate", "100", "--duration", "30s", "--threads", "1", "--quiet"],
        LIMIT,
        &[(Duration::from_millis(1500), libc::SIGINT)],
    );
    assert_eq!(run.output.status.code(), Some(130), "stderr:\n{}", run.stderr());
    // The threads stop within 1-2 s of the signal, not at the end of the 30 s window.
    assert!(run.elapsed < Duration::from_secs(6), "took {:?} after a Ctrl-C 1.5 s in", run.elapsed);
    let stdout = run.stdout();
    assert!(stdout.contains("interrupted after") && stdout.contains("p99.9"), "no summary:\n{stdout}");
    assert_eq!(run.json()["interrupted"], true);
    let measured = run.num("/measured_secs");
    assert!((1.0..2.0).contains(&measured), "measured {measured} s");
    // Only what was sent before the interruption counts, over the time it took: 4 x 100 msg/s.
    let throughput = run.num("/throughput_msgs_per_sec");
    assert!((340.0..=420.0).contains(&throughput), "{throughput} msg/s over {measured} s, 400 asked");
    assert_eq!(run.num("/errors"), 0.0, "stopping is not an error: {:#}", run.json());
}
