//! What a `wss://` run trusts and the one rustls client configuration every connection shares:
//! rustls 0.23 on aws-lc-rs (the gateway's provider, so both sides of a measurement run the same
//! crypto), TLS 1.3 and 1.2, ALPN `http/1.1`, and no session resumption, so that every connection
//! makes a full handshake (certificate sent, signed and verified): what a handshake figure is
//! about.
//!
//! Trust is the operator's choice, never a default: `--ca FILE` trusts the CA certificates in a
//! PEM file (the server's name is checked as usual), and `--insecure` accepts any certificate for
//! any name but still verifies the handshake's signatures with the provider's algorithms, so the
//! server does all the work a real client makes it do. No system roots: a load generator points
//! at test deployments, and a silent fallback to the system store would make a wrong `--ca`
//! look right on one machine and fail on another.
//!
//! Must never: accept a `wss://` run with neither `--ca` nor `--insecure` (the error says which to
//! pass), or skip the handshake signature check, even with `--insecure`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// How a `wss://` run decides whether to trust the server's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// `--ca FILE`: the CA certificates in this PEM file, and nothing else.
    Ca(std::path::PathBuf),
    /// `--insecure`: any certificate, for any name (handshake signatures still verified).
    Insecure,
}

/// The client configuration every connection of a `wss://` run shares. Reads `--ca`'s file; its
/// errors name the file and what is wrong with it.
pub fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS 1.3 and 1.2 with the aws-lc-rs provider")?;
    let builder = match trust {
        Trust::Ca(path) => {
            let roots = load_roots(path)?;
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .with_context(|| format!("--ca {}", path.display()))?;
            builder.with_webpki_verifier(verifier)
        }
        Trust::Insecure => builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(
            provider.signature_verification_algorithms,
        ))),
    };
    let mut config = builder.with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The CA certificates of a PEM file (at least one).
fn load_roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).with_context(|| format!("--ca {}", path.display()))?;
    for cert in certs {
        let cert = cert.with_context(|| format!("--ca {}: not a PEM certificate file", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("--ca {}: a certificate cannot be a trust anchor", path.display()))?;
    }
    if roots.is_empty() {
        bail!("--ca {}: no CERTIFICATE block in the file", path.display());
    }
    Ok(roots)
}

/// `--insecure`: accepts any certificate chain for any name, and verifies the handshake's
/// signatures with the certificate's key as a real client would (so the server signs, and a
/// server whose key does not match its certificate still fails).
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// A short, stable name for why a TLS handshake failed (the report's `tls_<reason>`).
pub fn failure_reason(error: &rustls::Error) -> String {
    use rustls::{CertificateError, Error};
    let name = match error {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "name_mismatch",
        Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => "expired",
        Error::InvalidCertificate(CertificateError::BadSignature) => "bad_signature",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::AlertReceived(alert) => return format!("alert_{}", snake(&format!("{alert:?}"))),
        Error::PeerIncompatible(_) | Error::NoApplicationProtocol => "incompatible",
        Error::InvalidMessage(_)
        | Error::InappropriateMessage { .. }
        | Error::InappropriateHandshakeMessage { .. } => "not_tls",
        Error::DecryptError => "decrypt_error",
        _ => "error",
    };
    name.to_string()
}

/// `HandshakeFailure` as `handshake_failure`.
fn snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() {
            out.push(c);
        }
    }
    out
}

/// The `version` label of an agreed protocol version (`1.3`, `1.2`).
pub fn version_label(version: rustls::ProtocolVersion) -> &'static str {
    match version {
        rustls::ProtocolVersion::TLSv1_3 => "1.3",
        rustls::ProtocolVersion::TLSv1_2 => "1.2",
        _ => "other",
    }
}

/// The provider's name for a negotiated suite, as the gateway's `/metrics` labels it.
pub fn suite_label(suite: rustls::SupportedCipherSuite) -> &'static str {
    suite.suite().as_str().unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_have_short_stable_names() {
        use rustls::{AlertDescription, CertificateError, Error};
        assert_eq!(
            failure_reason(&Error::InvalidCertificate(CertificateError::UnknownIssuer)),
            "unknown_issuer"
        );
        assert_eq!(
            failure_reason(&Error::InvalidCertificate(CertificateError::NotValidForName)),
            "name_mismatch"
        );
        assert_eq!(failure_reason(&Error::InvalidCertificate(CertificateError::Expired)), "expired");
        assert_eq!(
            failure_reason(&Error::AlertReceived(AlertDescription::HandshakeFailure)),
            "alert_handshake_failure"
        );
        assert_eq!(failure_reason(&Error::DecryptError), "decrypt_error");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_its_name() {
        let dir = std::env::temp_dir().join(format!("loadtest-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = client_config(&Trust::Ca(empty.clone())).unwrap_err().to_string();
        assert!(error.contains("empty.pem") && error.contains("no CERTIFICATE"), "{error}");
        let missing = client_config(&Trust::Ca(dir.join("missing.pem"))).unwrap_err();
        assert!(format!("{missing:#}").contains("missing.pem"), "{missing:#}");
    }

    #[test]
    fn insecure_still_knows_the_providers_signature_schemes() {
        let verifier =
            AnyCertificate(rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms);
        let schemes = verifier.supported_verify_schemes();
        assert!(schemes.contains(&SignatureScheme::ECDSA_NISTP256_SHA256), "{schemes:?}");
        assert!(schemes.contains(&SignatureScheme::RSA_PSS_SHA256), "{schemes:?}");
        let config = client_config(&Trust::Insecure).unwrap();
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
    }
}
