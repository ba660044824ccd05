//! TLS termination (wss://): the rustls server configuration a TLS listener's connections share,
//! its certificates (chosen by SNI, reloaded on SIGHUP), and the labels `/metrics` counts handshakes and failures by.
//!
//! Choices: TLS 1.2 and 1.3 with rustls' default suites on aws-lc-rs; ALPN offers `http/1.1` only
//! (a client that insists on another protocol is refused rather than promised something we do not
//! serve; one that offers none is served); no early data; session resumption with rustls'
//! in-memory cache. Kernel TLS is probed at start and its absence logged: the record layer runs
//! in rustls either way (see [`kernel_tls_available`]).

pub mod certs;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, ProtocolVersion, RootCertStore, ServerConfig, SupportedCipherSuite};

use certs::{CertError, CertKeyPaths, CertResolver};

/// One TLS listener's certificates and the configuration its connections share.
#[derive(Debug)]
pub struct TlsTerminator {
    pairs: Vec<CertKeyPaths>,
    provider: Arc<CryptoProvider>,
    resolver: Arc<CertResolver>,
    config: Arc<ServerConfig>,
}

impl TlsTerminator {
    /// Loads `pairs` (at least one) and builds the configuration; a bad file is an error that
    /// names it.
    pub fn load(pairs: Vec<CertKeyPaths>) -> Result<TlsTerminator, CertError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let resolver = Arc::new(CertResolver::load(&pairs, &provider)?);
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| CertError { path: Default::default(), reason: e.to_string() })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn rustls::server::ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsTerminator { pairs, provider, resolver, config: Arc::new(config) })
    }

    /// Reads every certificate and key again; on any failure the ones in force stay (and the
    /// error says which file). Established connections are not touched.
    pub fn reload(&self) -> Result<usize, CertError> {
        self.resolver.reload(&self.pairs, &self.provider)
    }

    /// The configuration every connection of this listener starts its session with.
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config)
    }

    /// The certificate a client asking for `server_name` gets (for tests and diagnostics).
    pub fn certificate_for(&self, server_name: Option<&str>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.resolver.choose(server_name)
    }
}

/// The client configuration for wss:// upstreams: the system's roots plus the CA files in
/// `extra_cas`, ALPN `http/1.1`. A system root store that cannot be read is logged and skipped
/// (the operator's CAs may be all that is needed); an unreadable CA file is an error.
pub fn upstream_client_config(extra_cas: &[std::path::PathBuf]) -> Result<Arc<ClientConfig>, CertError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!(%error, "reading the system's root certificates");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, "system root certificates for wss:// upstreams");
    for path in extra_cas {
        let fail = |reason: String| CertError { path: path.clone(), reason };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| fail(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| fail(e.to_string()))?;
        if certs.is_empty() {
            return Err(fail("no CERTIFICATE block in the file".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| fail(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| CertError { path: Default::default(), reason: e.to_string() })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The suites `/metrics` counts handshakes by: rustls' defaults on aws-lc-rs, in its order.
pub fn cipher_suites() -> &'static [SupportedCipherSuite] {
    rustls::crypto::aws_lc_rs::DEFAULT_CIPHER_SUITES
}

/// The slot of an agreed suite in [`cipher_suites`] (the last slot, "other", for any other).
pub fn suite_slot(suite: SupportedCipherSuite) -> usize {
    cipher_suites().iter().position(|s| s.suite() == suite.suite()).unwrap_or(cipher_suites().len())
}

/// The `version` and `cipher_suite` labels of a suite slot.
pub fn suite_labels(slot: usize) -> (&'static str, &'static str) {
    match cipher_suites().get(slot) {
        Some(suite) => {
            let version = match suite.version().version {
                ProtocolVersion::TLSv1_3 => "1.3",
                _ => "1.2",
            };
            (version, suite.suite().as_str().unwrap_or("unknown"))
        }
        None => ("other", "other"),
    }
}

/// Why a TLS handshake failed: the `reason` of `ringgate_tls_handshake_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// Not TLS, or malformed (plaintext HTTP sent to a TLS port lands here).
    NotTls,
    /// No version, suite, signature scheme or ALPN protocol in common.
    Incompatible,
    /// The client sent an alert (it refused our certificate: unknown CA, expired, wrong name).
    AlertReceived,
    /// The client went away before the handshake finished.
    Disconnected,
    /// The handshake did not finish within `--handshake-timeout`.
    Timeout,
    /// Anything else rustls refused.
    Other,
}

impl TlsFailure {
    /// Every reason, in table order.
    pub const ALL: [TlsFailure; 6] = [
        TlsFailure::NotTls,
        TlsFailure::Incompatible,
        TlsFailure::AlertReceived,
        TlsFailure::Disconnected,
        TlsFailure::Timeout,
        TlsFailure::Other,
    ];

    /// How rustls' error is counted.
    pub fn of(error: &rustls::Error) -> TlsFailure {
        use rustls::Error;
        match error {
            Error::InvalidMessage(_)
            | Error::InappropriateMessage { .. }
            | Error::InappropriateHandshakeMessage { .. } => TlsFailure::NotTls,
            Error::PeerIncompatible(_) | Error::NoApplicationProtocol => TlsFailure::Incompatible,
            Error::AlertReceived(_) => TlsFailure::AlertReceived,
            _ => TlsFailure::Other,
        }
    }

    /// A stable label for `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            TlsFailure::NotTls => "not_tls",
            TlsFailure::Incompatible => "incompatible",
            TlsFailure::AlertReceived => "alert_received",
            TlsFailure::Disconnected => "disconnected",
            TlsFailure::Timeout => "timeout",
            TlsFailure::Other => "other",
        }
    }

    /// This reason's slot in a counter table.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Whether this kernel can take over the record layer (the `tls` upper-layer protocol of TCP):
/// tried on a loopback connection made for the purpose. ringgate logs the answer at start; the
/// record layer runs in rustls either way, since this version does not hand keys to the kernel.
pub fn kernel_tls_available() -> bool {
    let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0") else { return false };
    let Ok(addr) = listener.local_addr() else { return false };
    let Ok(stream) = std::net::TcpStream::connect(addr) else { return false };
    use std::os::fd::AsRawFd;
    let name = b"tls";
    // SAFETY: a valid socket, and a pointer to `name` with its length.
    let result = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    result == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_suite_has_labels_and_others_share_one() {
        let suites = cipher_suites();
        assert!(suites.len() >= 6);
        for slot in 0..suites.len() {
            let (version, name) = suite_labels(slot);
            assert!(version == "1.2" || version == "1.3");
            assert!(name.starts_with("TLS"), "{name}");
        }
        assert_eq!(suite_labels(suites.len()), ("other", "other"));
        assert_eq!(suite_slot(suites[2]), 2);
    }
}
