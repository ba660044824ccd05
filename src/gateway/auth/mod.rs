//! Who may do what: JSON Web Tokens on connect, and the topic permissions they carry.
//!
//! Sans I/O like the rest of `gateway`: the connection hands over the upgrade request it parsed,
//! and gets back an [`Identity`] or the refusal to answer with (401 before the upgrade for a
//! missing or bad token, 403 for a topic the token does not grant). Keys come from files read at
//! start ([`keys`]); a JWKS file is read again on SIGHUP ([`Authenticator::reload`]), and a bad
//! file then keeps the keys in force.
//!
//! Rules that are easy to get wrong, and how they are kept:
//! - `alg` decides nothing on its own: an HS* token is only ever checked against the HMAC secret,
//!   an RS*/PS*/ES*/EdDSA token only against public keys of that family, so a token "signed" with
//!   a public key used as an HMAC secret fails, and `alg: none` is not an algorithm at all here.
//! - `exp` is required (a token that never expires is refused), `nbf` is checked when present,
//!   `iss` and `aud` when configured; 5 s of clock skew are allowed.
//!
//! Signatures are checked by jsonwebtoken on aws-lc-rs (Cargo.toml says why that backend).
//!
//! Must never: log a token, accept a token whose signature was not checked, or let a route
//! configured `required` through without one.

mod grants;
mod keys;
mod token;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

pub use grants::Grants;
pub use keys::{KeyError, KeySet};
pub use token::{
    TOKEN_PROTOCOL, TOKEN_PROTOCOL_PREFIX, TokenSource, find_token, strip_token_protocols, strip_token_query,
};

use jsonwebtoken::{Algorithm, Validation, decode, decode_header};

use crate::gateway::router::Route;
use crate::proto::handshake::Request;
use serde_json::Value;

/// Whether a route needs a token (`--echo-auth`, `--pubsub-auth`, `--proxy-auth`, and per proxy
/// route in the TOML file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No token is looked at: anyone may connect and use every topic (no key configured).
    Off,
    /// A token, when given, must be valid and its permissions apply; without one the client is
    /// anonymous and is treated as with `off`.
    Optional,
    /// No valid token, no upgrade (401).
    Required,
}

/// What a pub/sub connection that may not publish to its topic gets when it sends a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefusedPublish {
    /// Close it with 1008 "publish not permitted".
    Close,
    /// Discard the message and count it.
    Drop,
}

/// Which WebSocket routes need a token, after defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteAuth {
    /// The echo route.
    pub echo: AuthMode,
    /// The pub/sub routes.
    pub pubsub: AuthMode,
    /// Each proxy route, by index.
    pub proxies: Vec<AuthMode>,
}

impl RouteAuth {
    /// The mode of the route a request went to (plain HTTP routes have their own rules).
    pub fn mode(&self, route: &Route<'_>) -> AuthMode {
        match route {
            Route::Echo => self.echo,
            Route::PubSub { .. } => self.pubsub,
            Route::Proxy { index, .. } => self.proxies.get(*index).copied().unwrap_or(AuthMode::Off),
            _ => AuthMode::Off,
        }
    }
}

impl Default for RouteAuth {
    fn default() -> Self {
        RouteAuth { echo: AuthMode::Off, pubsub: AuthMode::Off, proxies: Vec::new() }
    }
}

/// What the operator configured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthSettings {
    /// `--jwt-secret-file`: the HS256/384/512 secret.
    pub secret_file: Option<PathBuf>,
    /// `--jwt-public-key`: PEM public keys (RSA, EC P-256/P-384 or Ed25519), any number.
    pub public_key_files: Vec<PathBuf>,
    /// `--jwt-jwks`: a JWKS file, read again on SIGHUP.
    pub jwks_file: Option<PathBuf>,
    /// `--jwt-issuer`: accepted `iss` values (none: not checked).
    pub issuers: Vec<String>,
    /// `--jwt-audience`: accepted `aud` values (none: not checked).
    pub audiences: Vec<String>,
    /// `--jwt-claim`: the claim holding the permissions (default `ringgate`).
    pub claim: String,
}

impl AuthSettings {
    /// Whether any key is configured (then WebSocket routes require a token by default).
    pub fn has_keys(&self) -> bool {
        self.secret_file.is_some() || !self.public_key_files.is_empty() || self.jwks_file.is_some()
    }
}

/// Why a token was refused; the `reason` label of `ringgate_auth_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// The route requires a token and none was given.
    Missing,
    /// Not a JWT, an algorithm we have no key for, or a bad signature.
    Invalid,
    /// `exp` has passed (or was absent: a token that never expires is refused).
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `iss` or `aud` is not one the operator accepts (or is absent while the operator set some).
    WrongIssuerOrAudience,
    /// Valid, but it does not grant the topic asked for.
    Forbidden,
}

impl AuthFailure {
    /// Every failure, in table order.
    pub const ALL: [AuthFailure; 6] = [
        AuthFailure::Missing,
        AuthFailure::Invalid,
        AuthFailure::Expired,
        AuthFailure::NotYetValid,
        AuthFailure::WrongIssuerOrAudience,
        AuthFailure::Forbidden,
    ];

    /// A stable label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Invalid => "invalid",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::WrongIssuerOrAudience => "wrong_issuer_or_audience",
            AuthFailure::Forbidden => "forbidden",
        }
    }

    /// The HTTP status the upgrade is refused with: 403 for a valid token that lacks the right,
    /// 401 (with `WWW-Authenticate: Bearer`) for everything else (RFC 6750 section 3.1).
    pub fn status(self) -> u16 {
        if self == AuthFailure::Forbidden { 403 } else { 401 }
    }

    /// The table slot of this failure.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A client whose token was checked, and where the token was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Who it is and what it may do.
    pub identity: Identity,
    /// Where its token was: a token in a subprotocol entry is answered with [`TOKEN_PROTOCOL`].
    pub source: TokenSource,
}

/// A verified client.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`, passed to proxy upstreams.
    pub subject: Option<String>,
    /// When the token expires (Unix seconds): the connection is closed then.
    pub expires_at: u64,
    /// What it may subscribe and publish to.
    pub grants: Grants,
}

/// Clock skew allowed on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 5;

/// The process-wide verifier, shared by every worker.
#[derive(Debug)]
pub struct Authenticator {
    settings: AuthSettings,
    keys: RwLock<Arc<KeySet>>,
}

impl Authenticator {
    /// Reads every configured key file; an unreadable or invalid file is an error at start.
    pub fn load(settings: AuthSettings) -> Result<Authenticator, KeyError> {
        let keys = KeySet::load(&settings)?;
        Ok(Authenticator { settings, keys: RwLock::new(Arc::new(keys)) })
    }

    /// Whether any key is configured.
    pub fn enabled(&self) -> bool {
        self.settings.has_keys()
    }

    /// Reads the key files again (SIGHUP). On error the keys in force stay, and the error says why.
    pub fn reload(&self) -> Result<usize, KeyError> {
        let keys = KeySet::load(&self.settings)?;
        let count = keys.len();
        if let Ok(mut current) = self.keys.write() {
            *current = Arc::new(keys);
        }
        Ok(count)
    }

    /// Decides an upgrade on a route in `mode`: `Ok(None)` lets an anonymous client in (`off`, or
    /// `optional` without a token), `Ok(Some(..))` a verified one; `topic` (a pub/sub route's)
    /// must be granted for subscribing, else 403.
    pub fn authenticate(
        &self,
        mode: AuthMode,
        request: &Request<'_, '_>,
        topic: Option<&str>,
    ) -> Result<Option<Verified>, AuthFailure> {
        if mode == AuthMode::Off {
            return Ok(None);
        }
        let Some((token, source)) = find_token(request) else {
            return if mode == AuthMode::Required { Err(AuthFailure::Missing) } else { Ok(None) };
        };
        let identity = self.verify(token)?;
        if let Some(topic) = topic
            && !identity.grants.may_subscribe(topic)
        {
            return Err(AuthFailure::Forbidden);
        }
        Ok(Some(Verified { identity, source }))
    }

    /// Verifies `token` now.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        self.verify_at(token, unix_now())
    }

    /// Verifies `token` as of `now` (Unix seconds): signature against the keys of its algorithm's
    /// family (the one its `kid` names first), then the claims.
    pub fn verify_at(&self, token: &str, now: u64) -> Result<Identity, AuthFailure> {
        let header = decode_header(token).map_err(|_| AuthFailure::Invalid)?;
        let keys = self.keys.read().map(|keys| Arc::clone(&keys)).map_err(|_| AuthFailure::Invalid)?;
        let validation = self.validation(header.alg);
        let mut last = AuthFailure::Invalid;
        for key in keys.candidates(header.alg, header.kid.as_deref()) {
            match decode::<Value>(token, key, &validation) {
                Ok(data) => return self.identity(data.claims, now),
                Err(error) => {
                    last = failure_of(error.kind());
                    if last != AuthFailure::Invalid {
                        break; // the signature was good: the claims are what failed
                    }
                }
            }
        }
        Err(last)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.validate_aud = !self.settings.audiences.is_empty();
        let mut required = vec!["exp"];
        if !self.settings.audiences.is_empty() {
            validation.set_audience(&self.settings.audiences);
            required.push("aud");
        }
        if !self.settings.issuers.is_empty() {
            validation.set_issuer(&self.settings.issuers);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    /// The identity in verified claims. `now` double-checks `exp` against the caller's clock.
    fn identity(&self, claims: Value, now: u64) -> Result<Identity, AuthFailure> {
        let expires_at = claims.get("exp").and_then(Value::as_u64).ok_or(AuthFailure::Expired)?;
        if expires_at + LEEWAY_SECS <= now {
            return Err(AuthFailure::Expired);
        }
        let subject = claims.get("sub").and_then(Value::as_str).map(str::to_string);
        let grants = Grants::from_claim(claims.get(&self.settings.claim));
        Ok(Identity { subject, expires_at, grants })
    }
}

fn failure_of(kind: &jsonwebtoken::errors::ErrorKind) -> AuthFailure {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature => AuthFailure::Expired,
        K::MissingRequiredClaim(claim) if claim == "exp" => AuthFailure::Expired,
        K::MissingRequiredClaim(_) => AuthFailure::WrongIssuerOrAudience,
        K::ImmatureSignature => AuthFailure::NotYetValid,
        K::InvalidIssuer | K::InvalidAudience => AuthFailure::WrongIssuerOrAudience,
        _ => AuthFailure::Invalid,
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";
    const ES256_PRIVATE: &[u8] = include_bytes!("../../../tests/data/jwt/es256-private.pem");
    const RS256_PRIVATE: &[u8] = include_bytes!("../../../tests/data/jwt/rs256-private.pem");
    const RS256_PUBLIC: &[u8] = include_bytes!("../../../tests/data/jwt/rs256-public.pem");
    const ED25519_PRIVATE: &[u8] = include_bytes!("../../../tests/data/jwt/ed25519-private.pem");

    fn file(name: &str, contents: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ringgate-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write key");
        path
    }

    fn authenticator() -> Authenticator {
        let settings = AuthSettings {
            secret_file: Some(file("secret", SECRET)),
            public_key_files: ["es256", "rs256", "ed25519"]
                .iter()
                .map(|k| {
                    let public = std::fs::read(format!(
                        "{}/tests/data/jwt/{k}-public.pem",
                        env!("CARGO_MANIFEST_DIR")
                    ));
                    file(&format!("{k}.pem"), &public.expect("fixture"))
                })
                .collect(),
            audiences: vec!["ringgate".into()],
            claim: "ringgate".into(),
            ..AuthSettings::default()
        };
        Authenticator::load(settings).expect("keys load")
    }

    fn claims(extra: serde_json::Value) -> serde_json::Value {
        let mut claims = json!({"sub": "u1", "exp": unix_now() + 600, "aud": "ringgate",
            "ringgate": {"subscribe": ["news.*"], "publish": ["chat.u1"]}});
        if let (Some(base), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
            base.extend(extra.clone());
        }
        claims
    }

    fn hmac(secret: &[u8]) -> EncodingKey {
        EncodingKey::from_secret(secret).expect("an HMAC key")
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: &serde_json::Value) -> String {
        encode(&Header::new(alg), claims, key).expect("encodes")
    }

    #[test]
    fn valid_tokens_of_every_family_give_their_identity() {
        let auth = authenticator();
        let tokens = [
            sign(Algorithm::HS256, &hmac(SECRET), &claims(json!({}))),
            sign(Algorithm::ES256, &EncodingKey::from_ec_pem(ES256_PRIVATE).expect("ec"), &claims(json!({}))),
            sign(
                Algorithm::RS256,
                &EncodingKey::from_rsa_pem(RS256_PRIVATE).expect("rsa"),
                &claims(json!({})),
            ),
            sign(
                Algorithm::EdDSA,
                &EncodingKey::from_ed_pem(ED25519_PRIVATE).expect("ed"),
                &claims(json!({})),
            ),
        ];
        for token in tokens {
            let identity = auth.verify(&token).expect("valid");
            assert_eq!(identity.subject.as_deref(), Some("u1"));
            assert!(identity.expires_at > unix_now() + 500);
            // The caller's clock is checked too: the same token an hour later is expired.
            assert_eq!(auth.verify_at(&token, unix_now() + 3600), Err(AuthFailure::Expired));
            assert!(identity.grants.may_subscribe("news.eu") && !identity.grants.may_subscribe("chat.u1"));
        }
    }

    #[test]
    fn every_kind_of_bad_token_is_refused_for_its_reason() {
        let auth = authenticator();
        let hs = |c: serde_json::Value| sign(Algorithm::HS256, &hmac(SECRET), &claims(c));
        // Expired long ago, and without exp at all. (jsonwebtoken checks exp against the real clock,
        // so these use real times.)
        let real_now = unix_now();
        let expired = hs(json!({"exp": real_now - 3600}));
        assert_eq!(auth.verify(&expired), Err(AuthFailure::Expired));
        let mut no_exp = claims(json!({}));
        no_exp.as_object_mut().map(|o| o.remove("exp"));
        let no_exp = sign(Algorithm::HS256, &hmac(SECRET), &no_exp);
        assert_eq!(auth.verify(&no_exp), Err(AuthFailure::Expired));
        let early = hs(json!({"exp": real_now + 3600, "nbf": real_now + 600}));
        assert_eq!(auth.verify(&early), Err(AuthFailure::NotYetValid));
        let audience = hs(json!({"exp": real_now + 3600, "aud": "someone-else"}));
        assert_eq!(auth.verify(&audience), Err(AuthFailure::WrongIssuerOrAudience));
        // A bad signature: another secret.
        let forged = sign(
            Algorithm::HS256,
            &hmac(b"another secret that is long enough......"),
            &claims(json!({"exp": real_now + 3600})),
        );
        assert_eq!(auth.verify(&forged), Err(AuthFailure::Invalid));
        // The classic: HMAC "signed" with the RSA public key's PEM as the secret.
        let confused = sign(Algorithm::HS256, &hmac(RS256_PUBLIC), &claims(json!({"exp": real_now + 3600})));
        assert_eq!(auth.verify(&confused), Err(AuthFailure::Invalid));
        // alg: none, with no signature.
        let payload = B64.encode(claims(json!({"exp": real_now + 3600})).to_string());
        let none = format!("{}.{payload}.", B64.encode(r#"{"alg":"none","typ":"JWT"}"#));
        assert_eq!(auth.verify(&none), Err(AuthFailure::Invalid));
        // An algorithm whose family has no key here: ES384.
        let es384_header = B64.encode(r#"{"alg":"ES384","typ":"JWT"}"#);
        assert_eq!(auth.verify(&format!("{es384_header}.{payload}.AAAA")), Err(AuthFailure::Invalid));
        assert_eq!(auth.verify("not a token"), Err(AuthFailure::Invalid));
    }

    #[test]
    fn a_public_key_is_never_used_as_an_hmac_secret_even_without_one_configured() {
        let settings = AuthSettings {
            public_key_files: vec![file("only-rsa.pem", RS256_PUBLIC)],
            claim: "ringgate".into(),
            ..AuthSettings::default()
        };
        let auth = Authenticator::load(settings).expect("loads");
        let confused =
            sign(Algorithm::HS256, &hmac(RS256_PUBLIC), &claims(json!({"exp": unix_now() + 3600})));
        assert_eq!(auth.verify(&confused), Err(AuthFailure::Invalid));
    }

    #[test]
    fn a_jwks_is_read_again_on_reload_and_a_bad_one_keeps_the_keys_in_force() {
        let private = EncodingKey::from_ec_pem(ES256_PRIVATE).expect("ec");
        let public = p256_coordinates();
        let jwks =
            json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "x": public.0, "y": public.1}]});
        let path = file("jwks.json", jwks.to_string().as_bytes());
        let settings =
            AuthSettings { jwks_file: Some(path.clone()), claim: "ringgate".into(), ..Default::default() };
        let auth = Authenticator::load(settings).expect("loads");
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        let token = encode(&header, &claims(json!({"exp": unix_now() + 3600})), &private).expect("encodes");
        assert!(auth.verify(&token).is_ok());
        std::fs::write(&path, b"{ not json").expect("write");
        assert!(auth.reload().is_err());
        assert!(auth.verify(&token).is_ok(), "the keys in force stay");
        std::fs::write(&path, json!({"keys": []}).to_string()).expect("write");
        assert!(auth.reload().is_err(), "an empty JWKS is refused too");
        let other = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k2",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]});
        std::fs::write(&path, other.to_string()).expect("write");
        assert_eq!(auth.reload().expect("valid"), 1);
        assert_eq!(auth.verify(&token), Err(AuthFailure::Invalid), "k1 is gone");
    }

    /// The P-256 public key of the ES256 fixture as JWK coordinates (x, y), from its SPKI DER.
    fn p256_coordinates() -> (String, String) {
        let pem = std::fs::read_to_string(format!(
            "{}/tests/data/jwt/es256-public.pem",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("fixture");
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(body).expect("base64");
        // An uncompressed P-256 point is the last 65 bytes: 0x04, x (32), y (32).
        let point = &der[der.len() - 65..];
        assert_eq!(point[0], 4);
        (B64.encode(&point[1..33]), B64.encode(&point[33..65]))
    }

    #[test]
    fn short_secrets_and_unreadable_keys_are_errors_at_start() {
        let short = AuthSettings { secret_file: Some(file("short", b"tooshort\n")), ..Default::default() };
        assert!(Authenticator::load(short).expect_err("refused").reason.contains("at least 32 bytes"));
        let missing =
            AuthSettings { public_key_files: vec!["/nonexistent/key.pem".into()], ..Default::default() };
        assert!(Authenticator::load(missing).is_err());
        let garbage =
            AuthSettings { public_key_files: vec![file("garbage.pem", b"hello")], ..Default::default() };
        assert!(Authenticator::load(garbage).is_err());
    }
}
