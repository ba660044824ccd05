//! Certificates and keys from PEM files, and the choice among them by SNI.
//!
//! Several certificates may be configured; the client's SNI picks the first whose names cover it
//! (checked by webpki, wildcards included), and a client without SNI, or with a name none covers,
//! gets the first. The set is swapped whole on reload (SIGHUP): handshakes in progress keep the
//! certificate they were given, connections already established are not touched at all, and a
//! reload that fails on any file keeps the whole previous set.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// One certificate chain (PEM, leaf first) and its private key (PEM: PKCS#8, PKCS#1 or SEC1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertKeyPaths {
    /// The chain.
    pub cert: PathBuf,
    /// The key.
    pub key: PathBuf,
}

/// Why a certificate or key could not be used; names the file.
#[derive(Debug)]
pub struct CertError {
    /// The file at fault.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for CertError {}

fn fail(path: &Path, reason: impl fmt::Display) -> CertError {
    CertError { path: path.to_path_buf(), reason: reason.to_string() }
}

/// Reads one chain and its key and checks that they belong together.
pub fn load_certified_key(
    paths: &CertKeyPaths,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.cert)
        .map_err(|e| fail(&paths.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| fail(&paths.cert, e))?;
    if chain.is_empty() {
        return Err(fail(&paths.cert, "no CERTIFICATE block in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| fail(&paths.key, e))?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| fail(&paths.key, format!("{e} (for {})", paths.cert.display())))
}

/// The configured certificates, chosen by SNI; swapped whole on reload.
#[derive(Debug)]
pub struct CertResolver {
    keys: RwLock<Arc<[Arc<CertifiedKey>]>>,
}

impl CertResolver {
    /// Loads every pair; any failure fails the whole set.
    pub fn load(pairs: &[CertKeyPaths], provider: &CryptoProvider) -> Result<CertResolver, CertError> {
        Ok(CertResolver { keys: RwLock::new(load_all(pairs, provider)?) })
    }

    /// Loads every pair again and swaps them in; on any failure the set in force stays.
    pub fn reload(&self, pairs: &[CertKeyPaths], provider: &CryptoProvider) -> Result<usize, CertError> {
        let keys = load_all(pairs, provider)?;
        let count = keys.len();
        *self.keys.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = keys;
        Ok(count)
    }

    fn current(&self) -> Arc<[Arc<CertifiedKey>]> {
        Arc::clone(&self.keys.read().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// The certificate for `server_name`: the first that covers it, else the first.
    pub fn choose(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let keys = self.current();
        let covering = server_name
            .and_then(|name| DnsName::try_from(name).ok())
            .and_then(|name| keys.iter().find(|key| covers(key, &name)));
        covering.or_else(|| keys.first()).cloned()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(client_hello.server_name())
    }
}

fn load_all(
    pairs: &[CertKeyPaths],
    provider: &CryptoProvider,
) -> Result<Arc<[Arc<CertifiedKey>]>, CertError> {
    pairs.iter().map(|pair| load_certified_key(pair, provider).map(Arc::new)).collect()
}

/// Whether the leaf certificate of `key` is valid for `name`.
fn covers(key: &CertifiedKey, name: &DnsName<'_>) -> bool {
    let Some(leaf) = key.cert.first() else { return false };
    let Ok(leaf) = webpki::EndEntityCert::try_from(leaf) else { return false };
    leaf.verify_is_valid_for_subject_name(&ServerName::DnsName(name.to_owned())).is_ok()
}
