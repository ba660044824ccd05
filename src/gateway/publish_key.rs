//! The publish API's key (`--publish-key-file`): read once at start, then compared against the
//! `Authorization: Bearer` credentials of every `POST /publish/{topic}` (RFC 6750).
//!
//! The comparison takes the same time whatever the guess, so that timing a wrong key does not tell
//! an attacker how much of it was right. Must never: print the key (its `Debug` is redacted), or
//! let a key that no client could send (empty, or not a `b64token`) start the gateway.

use std::fmt;
use std::path::Path;

/// The key clients must present to publish over HTTP.
#[derive(Clone)]
pub struct PublishKey(Box<[u8]>);

/// What a request's credentials amount to (RFC 6750 section 3.1 names the answer to each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credentials {
    /// The key matches.
    Valid,
    /// No `Authorization`, or another scheme than `Bearer`: 401 without an error code, so the
    /// client learns which scheme to use.
    Missing,
    /// `Bearer` with no token, a token that is not a `b64token`, or `Authorization` twice: 400
    /// `invalid_request`.
    Malformed,
    /// A well-formed token that is not the key: 401 `invalid_token`.
    Wrong,
}

impl PublishKey {
    /// Reads the key from `path`: the whole file, without its trailing line break. The error says
    /// what to fix.
    pub fn from_file(path: &Path) -> Result<PublishKey, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the publish key {}: {e}", path.display()))?;
        PublishKey::new(&bytes).map_err(|why| format!("the publish key in {}: {why}", path.display()))
    }

    /// A key from the bytes of a key file (trailing CR and LF removed). It must be a `b64token`
    /// (RFC 6750 section 2.1: letters, digits, `-._~+/`, then optional `=`), since clients send
    /// it in a header as `Bearer KEY`.
    pub fn new(file: &[u8]) -> Result<PublishKey, String> {
        let end = file.iter().rposition(|&b| b != b'\n' && b != b'\r').map_or(0, |i| i + 1);
        let key = &file[..end];
        if key.is_empty() {
            return Err("the file is empty; put the key on its first line".into());
        }
        if !is_b64token(key) {
            return Err("a key may hold only letters, digits and -._~+/ (then = padding), as clients \
                        send it in `Authorization: Bearer KEY`; generate one with \
                        `openssl rand -base64 32`"
                .into());
        }
        Ok(PublishKey(key.into()))
    }

    /// Judges only the shape of a request's `Authorization` credentials, for when no key is
    /// configured (a JWT may still be): well-formed bearer credentials come back `Wrong`, meaning
    /// "not a key; look further".
    pub fn shape(authorization: Option<&[u8]>, repeated: bool) -> Credentials {
        PublishKey(Box::default()).check(authorization, repeated)
    }

    /// Judges the values of a request's `Authorization` headers (`None`: no such header;
    /// `repeated`: more than one).
    pub fn check(&self, authorization: Option<&[u8]>, repeated: bool) -> Credentials {
        let Some(value) = authorization else { return Credentials::Missing };
        let value = crate::proto::http1::trim_ows(value);
        let scheme_end = value.iter().position(|&b| b == b' ').unwrap_or(value.len());
        if !value[..scheme_end].eq_ignore_ascii_case(b"Bearer") {
            return if repeated { Credentials::Malformed } else { Credentials::Missing };
        }
        let token = crate::proto::http1::trim_ows(&value[scheme_end..]);
        if repeated || !is_b64token(token) {
            return Credentials::Malformed;
        }
        if constant_time_eq(&self.0, token) { Credentials::Valid } else { Credentials::Wrong }
    }
}

impl fmt::Debug for PublishKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublishKey(<{} bytes, redacted>)", self.0.len())
    }
}

impl PartialEq for PublishKey {
    fn eq(&self, other: &PublishKey) -> bool {
        constant_time_eq(&self.0, &other.0)
    }
}

impl Eq for PublishKey {}

/// `b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="` (RFC 6750 section 2.1).
fn is_b64token(token: &[u8]) -> bool {
    let body_end = token.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    body_end > 0 && token[..body_end].iter().all(|&b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// Whether `given` equals `secret`, in a time that depends on the secret's length only: every byte
/// of the secret is compared, whatever the guess, and the differences are folded without branching.
fn constant_time_eq(secret: &[u8], given: &[u8]) -> bool {
    let mut difference = u8::from(secret.len() != given.len());
    for (i, &s) in secret.iter().enumerate() {
        let g = if given.is_empty() { 0 } else { given[i % given.len()] };
        difference = std::hint::black_box(difference | (s ^ g));
    }
    difference == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> PublishKey {
        PublishKey::new(text.as_bytes()).expect("a valid key")
    }

    #[test]
    fn the_file_loses_its_trailing_line_break_only() {
        assert_eq!(key("s3cret\n"), key("s3cret"));
        assert_eq!(key("s3cret\r\n"), key("s3cret"));
        assert_ne!(key("s3cret"), key("s3cret2"));
        assert!(PublishKey::new(b"").is_err());
        assert!(PublishKey::new(b"\n\n").is_err());
        assert!(PublishKey::new(b"two words").is_err(), "a client could not send it as one token");
        assert!(PublishKey::new(b" padded").is_err());
        assert!(PublishKey::new(b"====").is_err());
        assert!(PublishKey::new(b"a+b/c_d-e.f~g==").is_ok());
    }

    #[test]
    fn the_key_is_never_printed() {
        let text = format!("{:?}", key("topsecret"));
        assert!(!text.contains("topsecret"), "{text}");
    }

    #[test]
    fn credentials_follow_rfc_6750() {
        let k = key("s3cret");
        let check = |value: &str| k.check(Some(value.as_bytes()), false);
        assert_eq!(check("Bearer s3cret"), Credentials::Valid);
        assert_eq!(check("bearer  s3cret "), Credentials::Valid, "the scheme is case-insensitive");
        assert_eq!(check("Bearer s3cre"), Credentials::Wrong);
        assert_eq!(check("Bearer s3cret2"), Credentials::Wrong);
        assert_eq!(check("Bearer S3CRET"), Credentials::Wrong, "the token is not");
        assert_eq!(check("Basic czNjcmV0"), Credentials::Missing, "another scheme is no credentials");
        assert_eq!(check("s3cret"), Credentials::Missing);
        assert_eq!(check("Bearer"), Credentials::Malformed);
        assert_eq!(check("Bearer s3 cret"), Credentials::Malformed);
        assert_eq!(k.check(None, false), Credentials::Missing);
        assert_eq!(k.check(Some(b"Bearer s3cret"), true), Credentials::Malformed, "sent twice");
    }

    #[test]
    fn comparison_is_exact_for_every_length() {
        let secret = b"0123456789abcdef";
        for len in 0..=secret.len() + 2 {
            let mut guess: Vec<u8> = secret.iter().copied().cycle().take(len).collect();
            assert_eq!(constant_time_eq(secret, &guess), len == secret.len(), "length {len}");
            if let Some(last) = guess.last_mut() {
                *last ^= 1;
                assert!(!constant_time_eq(secret, &guess), "length {len}, last byte changed");
            }
        }
    }
}
