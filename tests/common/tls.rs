//! Certificates made for the TLS tests (rcgen: a CA of the test's own, leaf certificates per
//! name, expired ones) and rustls clients that trust that CA: written to a temporary directory
//! for the gateway's `--tls-cert`/`--tls-key`, and kept in memory for the clients.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::wire::IO_TIMEOUT;

/// A certificate authority of the test's own.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

/// A leaf certificate and its key, written to files.
pub struct Leaf {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa { der: cert.der().clone(), pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// The CA certificate in PEM, for clients outside Rust (Python's `ssl`).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Writes the CA certificate to `dir` and returns its path.
    pub fn write_pem(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.pem).expect("write the CA");
        path
    }

    /// A leaf for `names` (DNS names or IP addresses), valid from yesterday for a year, written to
    /// `dir` as `<file>.pem` and `<file>.key`.
    pub fn leaf(&self, dir: &Path, file: &str, names: &[&str]) -> Leaf {
        self.leaf_valid(dir, file, names, false)
    }

    /// Like [`TestCa::leaf`], but expired since 2020.
    pub fn expired_leaf(&self, dir: &Path, file: &str, names: &[&str]) -> Leaf {
        self.leaf_valid(dir, file, names, true)
    }

    fn leaf_valid(&self, dir: &Path, file: &str, names: &[&str], expired: bool) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        } else {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
            let year = 1970 + (now.as_secs() / 31_557_600) as i32;
            params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
            params.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
        }
        // ECDSA P-256, the certificate kind the handshake figures are about.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf certificate");
        let cert_path = dir.join(format!("{file}.pem"));
        let key_path = dir.join(format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write the leaf");
        std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
        Leaf { cert_path, key_path, der: cert.der().clone() }
    }

    /// A client configuration that trusts this CA only, offering ALPN `alpn` (none if empty).
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).expect("trust the CA");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// A directory of the test process's own for certificate files.
pub fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringgate-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A TLS stream to `addr` with SNI `name`, its handshake completed (or the error it failed with).
pub fn connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<ClientConfig>,
) -> Result<StreamOwned<ClientConnection, TcpStream>, rustls::Error> {
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    tcp.set_write_timeout(Some(IO_TIMEOUT)).expect("write timeout");
    let server_name = ServerName::try_from(name.to_string()).expect("a server name");
    let conn = ClientConnection::new(config, server_name).expect("client connection");
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        if let Err(error) = stream.conn.complete_io(&mut stream.sock) {
            return Err(match error.into_inner().and_then(|e| e.downcast::<rustls::Error>().ok()) {
                Some(tls) => *tls,
                None => rustls::Error::General("the connection failed during the handshake".into()),
            });
        }
    }
    Ok(stream)
}

/// Sends a whole HTTP request over `stream` and reads the answer until the server closes.
pub fn exchange<S: Read + Write>(stream: &mut S, request: &[u8]) -> super::wire::HttpResponse {
    stream.write_all(request).expect("send the request");
    stream.flush().expect("flush");
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            // A peer that closes without close_notify ends the answer too.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("reading the answer: {e}"),
        }
        if let Some((head, len)) = super::wire::parse_head(&bytes) {
            let body_len: usize = head.header("Content-Length").and_then(|v| v.parse().ok()).unwrap_or(0);
            if bytes.len() >= len + body_len {
                let mut response = head;
                response.body = bytes[len..len + body_len].to_vec();
                return response;
            }
        }
    }
    let (mut head, len) = super::wire::parse_head(&bytes).expect("an HTTP answer");
    head.body = bytes[len..].to_vec();
    head
}
