//! What JWT on connect adds to a handshake: verifying a token (signature and claims) with
//! `gateway::auth`, HS256 with a secret and ES256/RS256/EdDSA with public keys, beside the
//! handshake it is part of (parse, validate, accept key, 101: `benches/handshake.rs`' subject) as
//! the baseline in the same group.

use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use ringgate::gateway::auth::{AuthSettings, Authenticator, unix_now};
use ringgate::proto::handshake::{
    DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADERS, Parsed, StaticPolicy, accept, parse_request,
};
use std::hint::black_box;

const SECRET: &[u8] = b"an HS256 secret for the benchmark, longer than 32 bytes";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/data/jwt/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

fn file(name: &str, contents: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringgate-bench-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write");
    path
}

const BROWSER_REQUEST: &[u8] = b"GET /pubsub/news.eu HTTP/1.1\r\n\
Host: gateway.example.com\r\n\
Connection: Upgrade\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://app.example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

fn verify(c: &mut Criterion) {
    let settings = AuthSettings {
        secret_file: Some(file("secret", SECRET)),
        public_key_files: ["es256", "rs256", "ed25519"]
            .iter()
            .map(|k| file(&format!("{k}.pem"), &fixture(&format!("{k}-public.pem"))))
            .collect(),
        claim: "ringgate".into(),
        ..AuthSettings::default()
    };
    let auth = Authenticator::load(settings).expect("keys");
    let claims = serde_json::json!({"sub": "u1", "exp": unix_now() + 3600,
        "ringgate": {"subscribe": ["news.*"], "publish": ["chat.u1"]}});
    let token = |alg: Algorithm, key: EncodingKey| encode(&Header::new(alg), &claims, &key).expect("token");
    let tokens = [
        ("hs256_verify", token(Algorithm::HS256, EncodingKey::from_secret(SECRET).expect("key"))),
        (
            "es256_verify",
            token(Algorithm::ES256, EncodingKey::from_ec_pem(&fixture("es256-private.pem")).expect("key")),
        ),
        (
            "rs256_verify",
            token(Algorithm::RS256, EncodingKey::from_rsa_pem(&fixture("rs256-private.pem")).expect("key")),
        ),
        (
            "eddsa_verify",
            token(Algorithm::EdDSA, EncodingKey::from_ed_pem(&fixture("ed25519-private.pem")).expect("key")),
        ),
    ];

    let mut group = c.benchmark_group("jwt_on_connect");
    group.throughput(Throughput::Elements(1));
    let policy = StaticPolicy::default();
    let mut response = Vec::with_capacity(256);
    group.bench_function("baseline_handshake_without_token", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
            let parsed = parse_request(black_box(BROWSER_REQUEST), &mut headers, DEFAULT_MAX_HEADER_BYTES);
            if let Ok(Parsed::Complete(request, _)) = parsed
                && let Ok(accepted) = accept(&request, &policy)
            {
                response.clear();
                accepted.write_response(&mut response);
            }
            response.len()
        })
    });
    for (name, token) in &tokens {
        assert!(auth.verify(token).is_ok(), "{name}: the benchmark's token must be valid");
        group.bench_function(*name, |b| b.iter(|| auth.verify(black_box(token)).is_ok()));
    }
    group.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
