//! Who may use the plain endpoints, against the real binary: the publish key
//! (`--publish-key-file`, `Authorization: Bearer`, RFC 6750 answers), the Origin allow-list
//! (`--allowed-origin`) on every endpoint, and CORS on `/publish` for listed origins (preflight and
//! actual request), as a browser would send them; and start-up refusing an unusable key file.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::prom;
use common::server::{Server, run_to_exit};
use common::wire::{self, Client, HttpConn, HttpResponse, TEXT};

const APP: &str = "https://app.example";
const EVIL: &str = "http://evil.example";
const KEY: &str = "Zm9vYmFyLWtleS0xMjM0NTY3ODk=";

/// A key file of its own (tests run in parallel) in a directory of this test process.
fn key_file(name: &str, contents: &str) -> PathBuf {
    static FILES: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("ringgate-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("{}-{name}", FILES.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, contents).expect("write the key file");
    path
}

/// A gateway with a publish key and one allowed origin.
fn guarded() -> Server {
    let key = key_file("guarded.key", &format!("{KEY}\n"));
    Server::start(&["--publish-key-file", key.to_str().expect("UTF-8 path"), "--allowed-origin", APP])
}

/// One request on a connection of its own: its answer (a refusal must also close the connection).
fn ask(server: &Server, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    let mut conn = HttpConn::connect(server.addr());
    let response = conn.request(method, path, headers, body);
    if response.status >= 400 {
        assert_eq!(response.header("Connection"), Some("close"), "a refusal closes: {response:?}");
        conn.expect_eof();
    }
    response
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[test]
fn publishing_needs_the_key_and_wrong_keys_get_rfc_6750_answers() {
    let server = guarded();
    let mut subscriber = Client::connect(server.addr(), "/pubsub/t");

    let response = ask(&server, "POST", "/publish/t", &[], b"no key");
    assert_eq!(response.status, 401, "{response:?}");
    assert_eq!(response.header("WWW-Authenticate"), Some("Bearer realm=\"ringgate\""));

    let wrong = bearer("d3JvbmcK");
    let response = ask(&server, "POST", "/publish/t", &[("Authorization", &wrong)], b"wrong key");
    assert_eq!(response.status, 401, "{response:?}");
    assert_eq!(
        response.header("WWW-Authenticate"),
        Some("Bearer realm=\"ringgate\", error=\"invalid_token\"")
    );
    let almost = bearer(&KEY[..KEY.len() - 1]);
    assert_eq!(ask(&server, "POST", "/publish/t", &[("Authorization", &almost)], b"x").status, 401);

    let basic = "Basic dXNlcjpwYXNz";
    let response = ask(&server, "POST", "/publish/t", &[("Authorization", basic)], b"other scheme");
    assert_eq!(response.status, 401, "{response:?}");
    assert_eq!(response.header("WWW-Authenticate"), Some("Bearer realm=\"ringgate\""));

    let response = ask(&server, "POST", "/publish/t", &[("Authorization", "Bearer a b")], b"malformed");
    assert_eq!(response.status, 400, "{response:?}");
    assert!(response.header("WWW-Authenticate").is_some_and(|v| v.contains("error=\"invalid_request\"")));

    // The right key publishes, on a keep-alive connection.
    let right = bearer(KEY);
    let mut conn = HttpConn::connect(server.addr());
    for i in 0..2 {
        let body = format!("with the key {i}");
        let headers = [("Authorization", right.as_str()), ("Content-Type", "text/plain")];
        let response = conn.request("POST", "/publish/t", &headers, body.as_bytes());
        assert_eq!(response.status, 202, "{response:?}");
        assert_eq!(response.header("Connection"), Some("keep-alive"));
        subscriber.expect_frame(TEXT, body.as_bytes());
    }
    // The other endpoints need no key.
    assert_eq!(ask(&server, "GET", "/healthz", &[], b"").status, 200);
    assert_eq!(ask(&server, "GET", "/metrics", &[], b"").status, 200);

    let exposition = prom::scrape(&mut conn, "/metrics");
    let refused = |reason: &str| exposition.sum_where("ringgate_http_refusals_total", "reason", reason);
    assert_eq!(refused("unauthorized"), 2.0, "no key, and another scheme");
    assert_eq!(refused("invalid_token"), 2.0);
    assert_eq!(refused("invalid_request"), 1.0);
}

#[test]
fn a_preflight_from_a_listed_origin_is_answered_and_the_post_carries_cors_headers() {
    let server = guarded();
    let mut conn = HttpConn::connect(server.addr());
    let preflight = [
        ("Origin", APP),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "authorization,content-type"),
    ];
    let response = conn.request("OPTIONS", "/publish/t", &preflight, b"");
    assert_eq!(response.status, 204, "{response:?}");
    assert_eq!(response.header("Access-Control-Allow-Origin"), Some(APP));
    assert_eq!(response.header("Access-Control-Allow-Methods"), Some("POST"));
    assert_eq!(response.header("Access-Control-Allow-Headers"), Some("Authorization, Content-Type"));
    assert_eq!(response.header("Access-Control-Max-Age"), Some("600"));
    assert_eq!(response.header("Vary"), Some("Origin"));
    assert!(response.header("Access-Control-Allow-Credentials").is_none());

    let right = bearer(KEY);
    let headers = [("Origin", APP), ("Authorization", right.as_str()), ("Content-Type", "application/json")];
    let response = conn.request("POST", "/publish/t", &headers, b"{}");
    assert_eq!(response.status, 202, "{response:?}");
    assert_eq!(response.header("Access-Control-Allow-Origin"), Some(APP), "never *");
    assert_eq!(response.header("Vary"), Some("Origin"));

    // A listed page that forgot the key can read the 401.
    let response = ask(&server, "POST", "/publish/t", &[("Origin", APP)], b"{}");
    assert_eq!(response.status, 401, "{response:?}");
    assert_eq!(response.header("Access-Control-Allow-Origin"), Some(APP));
}

#[test]
fn an_unlisted_origin_gets_403_on_every_endpoint_even_with_the_key() {
    let server = guarded();
    let mut subscriber = Client::connect(server.addr(), "/pubsub/t");
    let right = bearer(KEY);
    for (method, path, headers) in [
        ("POST", "/publish/t", vec![("Origin", EVIL), ("Authorization", right.as_str())]),
        ("OPTIONS", "/publish/t", vec![("Origin", EVIL), ("Access-Control-Request-Method", "POST")]),
        ("GET", "/metrics", vec![("Origin", EVIL)]),
        ("GET", "/healthz", vec![("Origin", EVIL)]),
        ("GET", "/healthz", vec![("Origin", APP), ("Origin", APP)]),
    ] {
        let response = ask(&server, method, path, &headers, if method == "POST" { b"evil" } else { b"" });
        assert_eq!(response.status, 403, "{method} {path} {headers:?}: {response:?}");
        assert!(response.header("Access-Control-Allow-Origin").is_none(), "{response:?}");
        assert_eq!(response.header("Vary"), Some("Origin"), "{response:?}");
    }
    // Its WebSocket upgrade is refused just the same; a listed one and one without Origin pass.
    let mut conn = HttpConn::connect(server.addr());
    conn.send(wire::upgrade_request("/pubsub/t", &format!("Origin: {EVIL}\r\n")).as_bytes());
    assert_eq!(conn.read_response().status, 403);
    assert_eq!(ask(&server, "GET", "/healthz", &[("Origin", APP)], b"").status, 200);
    assert_eq!(ask(&server, "GET", "/metrics", &[], b"").status, 200);

    let mut conn = HttpConn::connect(server.addr());
    let headers = [("Authorization", right.as_str()), ("Content-Type", "text/plain")];
    assert_eq!(conn.request("POST", "/publish/t", &headers, b"good").status, 202);
    subscriber.expect_frame(TEXT, b"good");
    let exposition = prom::scrape(&mut conn, "/metrics");
    assert_eq!(exposition.sum_where("ringgate_http_refusals_total", "reason", "forbidden_origin"), 5.0);
    assert_eq!(exposition.sum_where("ringgate_handshake_failures_total", "reason", "forbidden_origin"), 1.0);
}

#[test]
fn without_an_allow_list_origins_pass_without_cors_headers_and_publishing_is_open() {
    let server = Server::start(&[]);
    let response = ask(&server, "POST", "/publish/t", &[("Origin", EVIL)], b"open");
    assert_eq!(response.status, 202, "{response:?}");
    assert!(response.header("Access-Control-Allow-Origin").is_none(), "{response:?}");
    assert!(response.header("Vary").is_none(), "{response:?}");
    let mut conn = HttpConn::connect(server.addr());
    let preflight = [("Origin", EVIL), ("Access-Control-Request-Method", "POST")];
    let response = conn.request("OPTIONS", "/publish/t", &preflight, b"");
    assert_eq!(response.status, 204, "{response:?}");
    assert_eq!(response.header("Allow"), Some("OPTIONS, POST"));
    assert!(response.header("Access-Control-Allow-Origin").is_none(), "a browser stops here: {response:?}");
}

#[test]
fn an_unusable_key_file_stops_the_start() {
    let timeout = Duration::from_secs(10);
    let empty = key_file("empty.key", "\n");
    let (status, stderr) = run_to_exit(&["--publish-key-file", empty.to_str().expect("path")], timeout);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("empty") && stderr.contains("empty.key"), "{stderr}");

    let missing = std::env::temp_dir().join("ringgate-no-such-dir/publish.key");
    let (status, stderr) = run_to_exit(&["--publish-key-file", missing.to_str().expect("path")], timeout);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot read"), "{stderr}");

    let spaced = key_file("spaced.key", "two words\n");
    let (status, stderr) = run_to_exit(&["--publish-key-file", spaced.to_str().expect("path")], timeout);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("two words"), "the key is not printed: {stderr}");
}
