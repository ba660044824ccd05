//! The keys tokens are checked against, read from the operator's files.
//!
//! An HMAC secret (`--jwt-secret-file`) is only ever used for HS* tokens, public keys (PEM files,
//! a JWKS file) only for the algorithm family of their type: a key's type, never the token, says
//! what it can verify. Must never: use public key material as an HMAC secret, or accept a secret
//! shorter than RFC 7518 section 3.2 allows (32 bytes for HS256).

use std::fmt;
use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

use super::AuthSettings;

/// The shortest HMAC secret accepted: HS256's hash size (RFC 7518 section 3.2).
const MIN_SECRET_LEN: usize = 32;

/// Why the key files cannot be used.
#[derive(Debug)]
pub struct KeyError {
    /// The file concerned.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for KeyError {}

/// A public key and what it may verify.
struct PublicKey {
    kid: Option<String>,
    family: AlgorithmFamily,
    key: DecodingKey,
}

/// Every key in force.
#[derive(Default)]
pub struct KeySet {
    hmac: Option<DecodingKey>,
    public: Vec<PublicKey>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key material.
        f.debug_struct("KeySet")
            .field("hmac", &self.hmac.is_some())
            .field("public", &self.public.len())
            .finish()
    }
}

impl KeySet {
    /// Reads every file `settings` names.
    pub fn load(settings: &AuthSettings) -> Result<KeySet, KeyError> {
        let mut keys = KeySet::default();
        if let Some(path) = &settings.secret_file {
            keys.hmac = Some(load_secret(path)?);
        }
        for path in &settings.public_key_files {
            keys.public.push(load_pem(path)?);
        }
        if let Some(path) = &settings.jwks_file {
            keys.public.extend(load_jwks(path)?);
        }
        Ok(keys)
    }

    /// Keys in force (the HMAC secret counts as one).
    pub fn len(&self) -> usize {
        usize::from(self.hmac.is_some()) + self.public.len()
    }

    /// Whether there is no key at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The keys a token signed with `alg` may be checked against: the HMAC secret for HS*, else the
    /// public keys of the algorithm's family, the one whose `kid` matches first.
    pub fn candidates<'a>(&'a self, alg: Algorithm, kid: Option<&'a str>) -> Vec<&'a DecodingKey> {
        let family = alg.family();
        if family == AlgorithmFamily::Hmac {
            return self.hmac.iter().collect();
        }
        let mut keys: Vec<&PublicKey> = self.public.iter().filter(|k| k.family == family).collect();
        if let Some(kid) = kid {
            keys.sort_by_key(|k| k.kid.as_deref() != Some(kid));
        }
        keys.into_iter().map(|k| &k.key).collect()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|e| KeyError { path: path.to_path_buf(), reason: e.to_string() })
}

fn load_secret(path: &Path) -> Result<DecodingKey, KeyError> {
    let mut secret = read(path)?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    if secret.len() < MIN_SECRET_LEN {
        return Err(KeyError {
            path: path.to_path_buf(),
            reason: format!(
                "an HS256 secret must be at least {MIN_SECRET_LEN} bytes (RFC 7518 section 3.2), this one is {}",
                secret.len()
            ),
        });
    }
    DecodingKey::from_secret(&secret)
        .map_err(|e| KeyError { path: path.to_path_buf(), reason: e.to_string() })
}

/// One of `DecodingKey`'s PEM constructors.
type PemParser = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;

/// A PEM public key: RSA, EC (P-256, P-384) or Ed25519, whichever the file holds.
fn load_pem(path: &Path) -> Result<PublicKey, KeyError> {
    let pem = read(path)?;
    let attempts: [(AlgorithmFamily, PemParser); 3] = [
        (AlgorithmFamily::Rsa, DecodingKey::from_rsa_pem),
        (AlgorithmFamily::Ec, DecodingKey::from_ec_pem),
        (AlgorithmFamily::Ed, DecodingKey::from_ed_pem),
    ];
    for (family, parse) in attempts {
        if let Ok(key) = parse(&pem) {
            return Ok(PublicKey { kid: None, family, key });
        }
    }
    Err(KeyError {
        path: path.to_path_buf(),
        reason: "not a PEM RSA, EC (P-256, P-384) or Ed25519 public key".into(),
    })
}

/// The public keys of a JWKS file (RFC 7517); symmetric (`oct`) keys are refused: a JWKS names
/// public keys, and a secret belongs in `--jwt-secret-file`.
fn load_jwks(path: &Path) -> Result<Vec<PublicKey>, KeyError> {
    let error = |reason: String| KeyError { path: path.to_path_buf(), reason };
    let set: JwkSet = serde_json::from_slice(&read(path)?).map_err(|e| error(format!("not a JWKS: {e}")))?;
    let mut keys = Vec::with_capacity(set.keys.len());
    for jwk in &set.keys {
        let kid = jwk.common.key_id.clone();
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| error(format!("key {}: {e}", kid.as_deref().unwrap_or("(no kid)"))))?;
        let family = key.family();
        if family == AlgorithmFamily::Hmac {
            return Err(error(format!(
                "key {}: a symmetric key has no place in a JWKS",
                kid.unwrap_or_default()
            )));
        }
        keys.push(PublicKey { kid, family, key });
    }
    if keys.is_empty() {
        return Err(error("the JWKS holds no key".into()));
    }
    Ok(keys)
}
