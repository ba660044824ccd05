//! Mints a JWT for trying ringgate's token checks by hand and for `scripts/handshake-auth.sh`:
//! `cargo run --release --example mint_token -- ALG KEY_FILE [SECONDS] [CLAIM_JSON]`, where ALG is
//! HS256 (KEY_FILE: the secret) or ES256, RS256, EdDSA (KEY_FILE: a PEM private key), SECONDS the
//! lifetime (default 3600) and CLAIM_JSON the `ringgate` permissions claim (default: every topic).

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [alg, key_file, rest @ ..] = args.as_slice() else {
        return Err("usage: mint_token ALG KEY_FILE [SECONDS] [CLAIM_JSON]".into());
    };
    let seconds: u64 = rest.first().map_or(Ok(3600), |s| s.parse())?;
    let grants: serde_json::Value = match rest.get(1) {
        Some(json) => serde_json::from_str(json)?,
        None => serde_json::json!({"subscribe": ["*"], "publish": ["*"]}),
    };
    let key = std::fs::read(key_file)?;
    let (alg, key) = match alg.as_str() {
        "HS256" => {
            let secret = key.strip_suffix(b"\n").unwrap_or(&key);
            (Algorithm::HS256, EncodingKey::from_secret(secret)?)
        }
        "ES256" => (Algorithm::ES256, EncodingKey::from_ec_pem(&key)?),
        "RS256" => (Algorithm::RS256, EncodingKey::from_rsa_pem(&key)?),
        "EdDSA" => (Algorithm::EdDSA, EncodingKey::from_ed_pem(&key)?),
        other => return Err(format!("unknown algorithm {other}").into()),
    };
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + seconds;
    let claims = serde_json::json!({"sub": "loadtest", "exp": exp, "ringgate": grants});
    println!("{}", encode(&Header::new(alg), &claims, &key)?);
    Ok(())
}
