//! Certificates for the `wss://` tests, made with rcgen: a CA of the test's own and an ECDSA P-256
//! leaf signed by it (the certificate kind of the handshake figures), or a self-signed leaf, each
//! written to a directory for the gateway's `--tls-cert`/`--tls-key` and loadtest's `--ca`.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority of the test's own.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A leaf certificate and its key, written to files.
pub struct Leaf {
    /// The certificate (PEM), for `--tls-cert` (and `--ca`, for a self-signed one).
    pub cert: PathBuf,
    /// Its key (PEM), for `--tls-key`.
    pub key: PathBuf,
}

impl TestCa {
    /// A fresh CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// Writes the CA certificate to `dir/<file>.pem` for `--ca`.
    pub fn write(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(format!("{file}.pem"));
        std::fs::write(&path, &self.pem).expect("write the CA");
        path
    }

    /// A leaf for `names` (DNS names or IP addresses) signed by this CA, written to `dir`.
    pub fn leaf(&self, dir: &Path, file: &str, names: &[&str]) -> Leaf {
        let (params, key) = leaf_params(names);
        let cert = params.signed_by(&key, &self.issuer).expect("leaf certificate");
        write_leaf(dir, file, &cert.pem(), &key)
    }
}

/// A self-signed leaf for `names`, written to `dir`: what `--insecure` is for.
pub fn self_signed(dir: &Path, file: &str, names: &[&str]) -> Leaf {
    let (params, key) = leaf_params(names);
    let cert = params.self_signed(&key).expect("self-signed certificate");
    write_leaf(dir, file, &cert.pem(), &key)
}

fn leaf_params(names: &[&str]) -> (CertificateParams, KeyPair) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
    let year = 1970 + (now.as_secs() / 31_557_600) as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("leaf key");
    (params, key)
}

fn write_leaf(dir: &Path, file: &str, cert_pem: &str, key: &KeyPair) -> Leaf {
    let cert = dir.join(format!("{file}.pem"));
    let key_path = dir.join(format!("{file}.key"));
    std::fs::write(&cert, cert_pem).expect("write the certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
    Leaf { cert, key: key_path }
}

/// A directory of this test process's own for certificate files.
pub fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loadtest-tls-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
