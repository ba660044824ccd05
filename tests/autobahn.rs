//! The Autobahn TestSuite against the built `ringgate`'s `/echo`, compared with the checked-in
//! `autobahn/expected.json`: any FAILED or NON-STRICT case, a partial run, or any drift fails this
//! test. `autobahn/conformance.sh` installs the suite (Python 2.7, from PyPI) on first use.
//!
//! These runs (on the debug build, once per io backend in CI) leave out the permessage-deflate
//! cases, 12.* and 13.*: wstest spends ten minutes of its own CPU on them per run, in Python, and
//! what they test is sans-IO code that does not change with the backend or the build. CI runs them
//! against the release build, directly on io_uring and through a proxy route on epoll (`.ci/run`);
//! `RINGGATE_AUTOBAHN_EXCLUDE='[]'` runs them here too.

use std::process::Command;

#[test]
fn autobahn_testsuite_matches_expected_results() {
    run_conformance("autobahn-debug", Mode::Direct);
}

/// The same suite over TLS (wss://, a self-signed certificate): the record layer between the
/// socket and the machine must change nothing the suite can see.
#[test]
fn autobahn_over_tls_matches_expected_results() {
    run_conformance("autobahn-tls-debug", Mode::Tls);
}

/// The same suite through a proxy route in front of a second ringgate's `/echo`: a relay that
/// validates and re-encodes every message must give exactly the direct results.
#[test]
fn autobahn_through_a_proxy_route_matches_expected_results() {
    run_conformance("autobahn-proxy-debug", Mode::ViaProxy);
}

/// How wstest reaches the gateway.
#[derive(PartialEq)]
enum Mode {
    Direct,
    ViaProxy,
    Tls,
}

/// One run at a time: each is a wstest process and one or two gateways, and three of them side by
/// side on a 2-core machine starve each other into wstest's timeouts. (That load also found a relay
/// bug, since fixed and pinned by a worker test: octet-wise bytes that arrived after a client's
/// protocol error were parsed as a second error, answered ahead of the upstream's echo.)
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_conformance(dir: &str, mode: Mode) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let root = env!("CARGO_MANIFEST_DIR");
    let out = format!("{root}/target/{dir}");
    let exclude = std::env::var("RINGGATE_AUTOBAHN_EXCLUDE").unwrap_or_else(|_| r#"["12.*","13.*"]"#.into());
    let output = Command::new(format!("{root}/autobahn/conformance.sh"))
        .env("RINGGATE_AUTOBAHN_VIA_PROXY", if mode == Mode::ViaProxy { "1" } else { "0" })
        .env("RINGGATE_AUTOBAHN_TLS", if mode == Mode::Tls { "1" } else { "0" })
        .env("RINGGATE_AUTOBAHN_EXCLUDE", exclude)
        .arg(env!("CARGO_BIN_EXE_ringgate"))
        .arg(&out)
        .output()
        .expect("autobahn/conformance.sh runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // wstest prints a line per case; keep the verdict (the last lines) and any errors.
    let tail: Vec<&str> = stdout.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect();
    println!("{}", tail.join("\n"));
    assert!(
        output.status.success(),
        "Autobahn conformance failed; the report is in {out}/index.html\n{}\n{stderr}",
        tail.join("\n")
    );
}
