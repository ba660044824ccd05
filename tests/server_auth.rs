//! JWT on connect against the real binary: tokens made here (HS256 with a secret, ES256 with the
//! test key pair in `tests/data/jwt/`), every way a token can be wrong, topic permissions, expiry
//! while connected, what a proxy upstream is told, and SIGHUP reloading a JWKS.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::prom::scrape;
use common::server::Server;
use common::wire::{self, Client, HttpConn, HttpResponse};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

const SECRET: &[u8] = b"an HS256 secret for the tests, longer than 32 bytes";
const ES256_PRIVATE: &[u8] = include_bytes!("data/jwt/es256-private.pem");
const RS256_PUBLIC: &[u8] = include_bytes!("data/jwt/rs256-public.pem");

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
}

/// A file in a directory of this test process's own.
fn file(name: &str, contents: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringgate-server-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write");
    path
}

fn claims(extra: Value) -> Value {
    let mut claims = json!({
        "sub": "u1",
        "exp": now() + 600,
        "ringgate": {"subscribe": ["news.*"], "publish": ["chat.u1", "news.u1"]},
    });
    if let (Some(base), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
        base.extend(extra.clone());
    }
    claims
}

fn hs256(claims: &Value) -> String {
    let key = EncodingKey::from_secret(SECRET).expect("key");
    encode(&Header::new(Algorithm::HS256), claims, &key).expect("token")
}

fn es256(claims: &Value, kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, &EncodingKey::from_ec_pem(ES256_PRIVATE).expect("key")).expect("token")
}

/// A gateway that checks tokens (HS256 secret and the ES256 public key) on every WebSocket route.
fn gateway(extra: &[&str]) -> Server {
    let secret = file("secret", SECRET);
    let public = file(
        "es256-public.pem",
        &std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/jwt/es256-public.pem"))
            .expect("fixture"),
    );
    let mut flags = vec![
        "--jwt-secret-file",
        secret.to_str().expect("utf-8"),
        "--jwt-public-key",
        public.to_str().expect("utf-8"),
    ];
    flags.extend_from_slice(extra);
    let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Server::start(&flags)
}

/// Sends an upgrade request and reads the answer's head.
fn upgrade(server: &Server, path: &str, extra: &str) -> (HttpResponse, Option<Client>) {
    wire::upgrade_with(server.addr(), path, extra)
}

fn status(server: &Server, path: &str, extra: &str) -> u16 {
    upgrade(server, path, extra).0.status
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

#[test]
fn a_valid_token_opens_every_way_it_can_be_sent_and_nothing_else_does() {
    let server = gateway(&[]);
    let token = hs256(&claims(json!({})));
    let (refused, _) = upgrade(&server, "/echo", "");
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("WWW-Authenticate"), Some("Bearer realm=\"ringgate\""));

    assert_eq!(status(&server, "/echo", &bearer(&token)), 101);
    assert_eq!(status(&server, "/echo", &bearer(&es256(&claims(json!({})), None))), 101);
    assert_eq!(status(&server, &format!("/echo?token={token}"), ""), 101);
    let protocols = format!("Sec-WebSocket-Protocol: ringgate.jwt, ringgate.jwt.{token}\r\n");
    let (answer, client) = upgrade(&server, "/echo", &protocols);
    assert_eq!(answer.status, 101);
    assert_eq!(answer.header("Sec-WebSocket-Protocol"), Some("ringgate.jwt"), "a browser needs one answered");
    let mut client = client.expect("upgraded");
    client.send(wire::TEXT, b"hello");
    assert_eq!(client.read_frame().payload, b"hello");
}

#[test]
fn every_kind_of_bad_token_is_401_for_its_reason() {
    let server = gateway(&["--jwt-audience", "ringgate"]);
    let t = now();
    let payload = B64.encode(claims(json!({"aud": "ringgate"})).to_string());
    let cases: Vec<(&str, String)> = vec![
        ("expired", hs256(&claims(json!({"aud": "ringgate", "exp": t - 3600})))),
        ("not yet valid", hs256(&claims(json!({"aud": "ringgate", "nbf": t + 3600})))),
        ("wrong audience", hs256(&claims(json!({"aud": "elsewhere"})))),
        ("no audience", hs256(&claims(json!({})))),
        ("wrong signature", {
            let key = EncodingKey::from_secret(b"some other secret, also long enough....").expect("key");
            encode(&Header::new(Algorithm::HS256), &claims(json!({"aud": "ringgate"})), &key).expect("token")
        }),
        ("HMAC with the RSA public key as secret", {
            let key = EncodingKey::from_secret(RS256_PUBLIC).expect("key");
            encode(&Header::new(Algorithm::HS256), &claims(json!({"aud": "ringgate"})), &key).expect("token")
        }),
        ("alg none", format!("{}.{payload}.", B64.encode(r#"{"alg":"none","typ":"JWT"}"#))),
        ("garbage", "not.a.token".to_string()),
    ];
    for (what, token) in &cases {
        let (answer, _) = upgrade(&server, "/echo", &bearer(token));
        assert_eq!(answer.status, 401, "{what}");
        assert!(answer.header("WWW-Authenticate").is_some_and(|v| v.contains("invalid_token")), "{what}");
    }
    assert_eq!(status(&server, "/echo", &bearer(&hs256(&claims(json!({"aud": "ringgate"}))))), 101);
    let metrics = scrape(&mut HttpConn::connect(server.addr()), "/metrics");
    let reason = |r: &str| metrics.sum_where("ringgate_auth_failures_total", "reason", r);
    assert_eq!(reason("expired"), 1.0);
    assert_eq!(reason("not_yet_valid"), 1.0);
    assert_eq!(reason("wrong_issuer_or_audience"), 2.0);
    assert_eq!(reason("invalid"), 4.0);
    assert_eq!(metrics.sum_where("ringgate_handshake_failures_total", "reason", "unauthorized"), 8.0);
}

#[test]
fn topics_follow_the_token_and_a_refused_publish_closes_1008() {
    let server = gateway(&[]);
    let token = hs256(&claims(json!({})));
    assert_eq!(status(&server, "/pubsub/chat.u2", &bearer(&token)), 403);
    let (_, subscriber) = upgrade(&server, "/pubsub/news.eu", &bearer(&token));
    let mut subscriber = subscriber.expect("news.* is granted");
    // news.u1 may be published to by this token, news.eu may not.
    let (_, publisher) = upgrade(&server, "/pubsub/news.u1", &bearer(&token));
    let mut allowed = publisher.expect("granted");
    allowed.send(wire::TEXT, b"fine");
    subscriber.send(wire::TEXT, b"not allowed here");
    let close = subscriber.read_frame();
    assert_eq!(close.close_code(), Some(1008));

    let drop_server = gateway(&["--refused-publish", "drop"]);
    let (_, subscriber) = upgrade(&drop_server, "/pubsub/news.eu", &bearer(&token));
    let mut subscriber = subscriber.expect("granted");
    subscriber.send(wire::TEXT, b"dropped");
    subscriber.send(wire::PING, b"still here?");
    assert_eq!(subscriber.read_frame().opcode, wire::PONG, "dropped, not closed");
    let metrics = scrape(&mut HttpConn::connect(drop_server.addr()), "/metrics");
    assert_eq!(metrics.sum("ringgate_auth_refused_publishes_total"), 1.0);
    assert_eq!(metrics.sum_where("ringgate_auth_failures_total", "reason", "forbidden"), 0.0);
    let metrics = scrape(&mut HttpConn::connect(server.addr()), "/metrics");
    assert_eq!(metrics.sum_where("ringgate_auth_failures_total", "reason", "forbidden"), 1.0);
    assert_eq!(metrics.sum_where("ringgate_handshake_failures_total", "reason", "forbidden"), 1.0);
}

#[test]
fn a_token_that_expires_while_connected_closes_with_3000() {
    let server = gateway(&[]);
    let token = hs256(&claims(json!({"exp": now() + 2})));
    let (_, client) = upgrade(&server, "/echo", &bearer(&token));
    let mut client = client.expect("valid for two more seconds");
    let started = Instant::now();
    let close = client.read_frame();
    assert_eq!(close.close_code(), Some(3000), "{close:?}");
    assert!(started.elapsed() < Duration::from_secs(4), "closed {:?} after the upgrade", started.elapsed());
    let metrics = scrape(&mut HttpConn::connect(server.addr()), "/metrics");
    assert_eq!(metrics.sum("ringgate_auth_token_expiries_total"), 1.0);
}

#[test]
fn routes_can_be_left_open_or_made_optional() {
    let server = gateway(&["--echo-auth", "off", "--pubsub-auth", "optional"]);
    assert_eq!(status(&server, "/echo", ""), 101);
    assert_eq!(status(&server, "/pubsub/anything", ""), 101, "optional: anonymous is let in");
    assert_eq!(status(&server, "/pubsub/anything", &bearer("bad.token.here")), 401, "a bad token is not");
    let token = hs256(&claims(json!({})));
    assert_eq!(status(&server, "/pubsub/anything", &bearer(&token)), 403, "and a good one's grants apply");
    // Asking for tokens without a key to check them is a configuration error.
    let (status, stderr) =
        common::server::run_to_exit(&["--pubsub-auth", "required"], Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--pubsub-auth"), "{stderr}");
}

/// An upstream that answers one upgrade with 101 and keeps the request head it got.
fn recording_upstream() -> (SocketAddr, Arc<Mutex<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(String::new()));
    let record = Arc::clone(&seen);
    thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else { return };
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
            head.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap_or_default()
            .trim()
            .to_string();
        *record.lock().expect("lock") = text;
        let accept = ringgate::proto::handshake::AcceptKey::for_key(key.as_bytes());
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            String::from_utf8_lossy(accept.as_bytes())
        );
        let _ = stream.write_all(answer.as_bytes());
        thread::sleep(Duration::from_secs(5));
    });
    (addr, seen)
}

#[test]
fn a_proxy_upstream_learns_the_subject_and_never_sees_the_token() {
    let (upstream, seen) = recording_upstream();
    let route = format!("/app=ws://{upstream}");
    let server = gateway(&["--route", &route]);
    let token = hs256(&claims(json!({})));
    let extra =
        format!("Sec-WebSocket-Protocol: ringgate.jwt, ringgate.jwt.{token}\r\nX-Ringgate-Sub: admin\r\n");
    let (answer, _client) = upgrade(&server, &format!("/app/room?x=1&token={token}"), &extra);
    assert_eq!(answer.status, 101);
    assert_eq!(answer.header("Sec-WebSocket-Protocol"), Some("ringgate.jwt"));
    let request = seen.lock().expect("lock").clone();
    assert!(request.starts_with("GET /room?x=1 HTTP/1.1\r\n"), "{request}");
    assert!(request.contains("\r\nX-Ringgate-Sub: u1\r\n"), "{request}");
    assert!(!request.contains("admin"), "the client's own copy is not forwarded: {request}");
    assert!(!request.contains(&token) && !request.contains("ringgate.jwt"), "{request}");
    assert_eq!(status(&server, "/app/room", ""), 401, "proxy routes need a token too");
}

#[test]
fn sighup_reloads_the_jwks_and_a_bad_file_keeps_the_keys_in_force() {
    let pem =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/jwt/es256-public.pem"))
            .expect("fixture");
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body).expect("base64");
    let point = &der[der.len() - 65..];
    let jwk = |kid: &str| {
        json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": kid,
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65])}]})
        .to_string()
    };
    let jwks = file("jwks.json", jwk("k1").as_bytes());
    let server = Server::start(&["--jwt-jwks", jwks.to_str().expect("utf-8")]);
    let token = es256(&claims(json!({})), Some("k1"));
    assert_eq!(status(&server, "/echo", &bearer(&token)), 101);
    let other = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k2","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
    std::fs::write(&jwks, other).expect("rewrite");
    server.signal(libc::SIGHUP);
    wait_for(|| status(&server, "/echo", &bearer(&token)) == 401, "the old key to go");
    std::fs::write(&jwks, jwk("k1")).expect("rewrite");
    server.signal(libc::SIGHUP);
    wait_for(|| status(&server, "/echo", &bearer(&token)) == 101, "the key to come back");
    std::fs::write(&jwks, b"{ broken").expect("rewrite");
    server.signal(libc::SIGHUP);
    wait_for(|| server.stderr().contains("keeping the JWT keys in force"), "the bad file to be reported");
    assert_eq!(status(&server, "/echo", &bearer(&token)), 101, "the keys in force stay");
}

fn wait_for(mut condition: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_token_with_publish_rights_may_use_the_publish_api_and_others_may_not() {
    let key = file("publish-key", b"k3y-for-the-publish-api\n");
    let server = gateway(&["--publish-key-file", key.to_str().expect("utf-8")]);
    let token = hs256(&claims(json!({})));
    let post = |topic: &str, authorization: &str| {
        let request = format!(
            "POST /publish/{topic} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n\
             Content-Length: 2\r\n{authorization}Connection: close\r\n\r\nhi"
        );
        wire::http_exchange(server.addr(), request.as_bytes()).status
    };
    assert_eq!(post("chat.u1", "Authorization: Bearer k3y-for-the-publish-api\r\n"), 202, "the key");
    assert_eq!(post("chat.u1", &bearer(&token)), 202, "a token granting chat.u1");
    assert_eq!(post("chat.u2", &bearer(&token)), 403, "a token not granting chat.u2");
    assert_eq!(post("chat.u1", &bearer(&hs256(&claims(json!({"exp": now() - 3600}))))), 401, "expired");
    assert_eq!(post("chat.u1", ""), 401, "nothing");
    let metrics = scrape(&mut HttpConn::connect(server.addr()), "/metrics");
    assert_eq!(metrics.sum_where("ringgate_http_refusals_total", "reason", "forbidden_topic"), 1.0);
    assert_eq!(metrics.sum_where("ringgate_http_refusals_total", "reason", "invalid_token"), 1.0);
}
