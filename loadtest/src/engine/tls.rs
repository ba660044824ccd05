//! One `wss://` connection's record layer, between the socket and the connection's WebSocket
//! state machine ([`super::conn`]): ciphertext in, plaintext out to the machine; the machine's
//! plaintext in, ciphertext out to the socket. No I/O: the connection lends the received bytes
//! and takes what is to be sent. It is the gateway's own record layer (`ringgate::io::tls`, the
//! session the gateway speaks to `wss://` upstreams with): one implementation of the unbuffered
//! rustls state machine for both programs, so a fix to one is a fix to both.
//!
//! rustls' unbuffered API: records are processed in the buffer the backend filled (io_uring's
//! provided buffer, or epoll's read buffer), with no copy of the ciphertext into a rustls buffer;
//! only an unfinished record is kept between reads (the session's tail, freed once empty).
//! rustls 0.23 hands application data out as an owned chunk per record and the WebSocket receiver
//! works in place, so the plaintext of one read is gathered into one buffer of the thread's,
//! borrowed for the call: one copy, and no plaintext buffer lives in a connection between reads.
//! What the machine has to send when the connection is synced (everything due that loop turn) is
//! encrypted in one call into one ciphertext buffer from the io layer's staging pool, into as few
//! records as its size allows (16 KiB each), and goes to the socket as one send; the machine's
//! frames count as sent (its write is in flight) until all of that ciphertext is written.
//!
//! Must never: hand the machine plaintext before the handshake is complete, keep a buffer that
//! holds nothing, or grow a buffer past what one read or one turn's sends need.

use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ProtocolVersion, SupportedCipherSuite};

pub use ringgate::io::tls::Received;
use ringgate::io::tls::TlsSession;

/// A TLS client connection's state: the gateway's own session (its client end, as it speaks to
/// `wss://` upstreams), plus what a load generator asks of it that the gateway does not.
pub struct TlsClient {
    session: TlsSession,
    /// The session ended in an error: what the server sends now is ignored; the alert rustls
    /// has for it, if any, is queued to go out.
    failed: bool,
}

impl TlsClient {
    /// A session to `name`, its ClientHello queued for [`TlsClient::take_outgoing`].
    pub fn new(config: Arc<ClientConfig>, name: ServerName<'static>) -> Result<TlsClient, rustls::Error> {
        Ok(TlsClient { session: TlsSession::client(config, name)?, failed: false })
    }

    /// Whether application data may flow (the handshake is complete).
    pub fn is_established(&self) -> bool {
        self.session.is_established()
    }

    /// Whether the session failed (see [`TlsClient::receive`]).
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// Whether close_notify is queued or sent.
    pub fn close_notify_queued(&self) -> bool {
        self.session.close_notify_queued()
    }

    /// The version and suite agreed, once established.
    pub fn negotiated(&self) -> Option<(ProtocolVersion, SupportedCipherSuite)> {
        self.session.negotiated()
    }

    /// Ciphertext arrived: processes it in place. The plaintext of the complete records is
    /// gathered into `plaintext` (cleared first) for the caller to hand to the machine;
    /// handshake records to answer with are queued for [`TlsClient::take_outgoing`]. Returns
    /// whether the handshake completed during this call. On an error the session is failed: the
    /// alert rustls has for the server is queued, and later input is ignored.
    pub fn receive(
        &mut self,
        data: &mut [u8],
        plaintext: &mut Vec<u8>,
    ) -> Result<(Received, bool), rustls::Error> {
        if self.failed {
            plaintext.clear();
            return Ok((Received::Open, false));
        }
        let outcome = self.session.receive(data, plaintext);
        self.failed = outcome.is_err();
        outcome
    }

    /// Encrypts `plaintext` (everything the machine has to send now) for sending.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<(), rustls::Error> {
        if self.failed {
            return Err(rustls::Error::General("TLS session not ready to write".into()));
        }
        self.session.encrypt(plaintext)
    }

    /// Queues close_notify (once): the connection is done sending; the socket is shut down once
    /// it is written.
    pub fn close_notify(&mut self) -> Result<(), rustls::Error> {
        if self.failed {
            return Err(rustls::Error::General("TLS session not ready to write".into()));
        }
        self.session.close_notify()
    }

    /// The ciphertext to send next, if any (taken: the caller sends it before asking again).
    pub fn take_outgoing(&mut self) -> Option<Vec<u8>> {
        self.session.take_outgoing()
    }

    /// Whether ciphertext waits to be sent.
    pub fn has_outgoing(&self) -> bool {
        self.session.has_outgoing()
    }
}

#[cfg(test)]
mod tests {
    //! Our client against rustls' own (buffered) server, bytes moved in memory: no sockets.

    use std::io::{Read, Write};
    use std::path::PathBuf;
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ServerConfig, ServerConnection};

    use super::{Received, TlsClient};
    use crate::tls::{Trust, client_config, failure_reason};

    /// A CA written to a file (for `--ca`) and a server configuration (TLS 1.3 and 1.2) with a
    /// leaf it signed for `localhost`.
    fn ca_and_server(test: &str) -> (PathBuf, Arc<ServerConfig>) {
        ca_and_server_of(test, &[&rustls::version::TLS13, &rustls::version::TLS12])
    }

    /// [`ca_and_server`], the server speaking only `versions`.
    fn ca_and_server_of(
        test: &str,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (PathBuf, Arc<ServerConfig>) {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        // A name of its own: two CAs of one name would be one issuer with a wrong signature.
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, format!("CA {test}"));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let dir = std::env::temp_dir().join(format!("loadtest-unit-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap();
        (ca_path, Arc::new(config))
    }

    fn client(ca: PathBuf) -> TlsClient {
        let config = client_config(&Trust::Ca(ca)).unwrap();
        TlsClient::new(config, ServerName::try_from("localhost").unwrap()).unwrap()
    }

    /// Moves what the client queued to the server.
    fn to_server(client: &mut TlsClient, server: &mut ServerConnection) -> Result<(), rustls::Error> {
        while let Some(bytes) = client.take_outgoing() {
            let mut input = &bytes[..];
            while !input.is_empty() {
                server.read_tls(&mut input).unwrap();
                server.process_new_packets()?;
            }
        }
        Ok(())
    }

    /// Moves what the server has to send to the client, `chunk` bytes per read; returns the
    /// plaintext the client got and whether its handshake completed.
    fn to_client(
        server: &mut ServerConnection,
        client: &mut TlsClient,
        chunk: usize,
    ) -> Result<(Vec<u8>, bool), rustls::Error> {
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        let (mut got, mut established) = (Vec::new(), false);
        let mut plaintext = Vec::new();
        for piece in wire.chunks(chunk) {
            let mut read = piece.to_vec();
            let (received, now) = client.receive(&mut read, &mut plaintext)?;
            assert_eq!(received, Received::Open);
            established |= now;
            got.extend_from_slice(&plaintext);
        }
        Ok((got, established))
    }

    fn handshake(client: &mut TlsClient, server: &mut ServerConnection, chunk: usize) {
        for _ in 0..4 {
            to_server(client, server).unwrap();
            let (_, done) = to_client(server, client, chunk).unwrap();
            if done {
                break;
            }
        }
        to_server(client, server).unwrap();
        assert!(client.is_established() && !server.is_handshaking());
    }

    #[test]
    fn data_flows_both_ways_after_a_handshake_read_a_byte_at_a_time() {
        let (ca, config) = ca_and_server("bytewise");
        let mut client = client(ca);
        let mut server = ServerConnection::new(config).unwrap();
        assert!(client.has_outgoing(), "the ClientHello is queued at once");
        handshake(&mut client, &mut server, 1);
        let (version, _) = client.negotiated().unwrap();
        assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);

        // What the machine sends in one turn goes out in one buffer.
        client.encrypt(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        client.encrypt(b"more").unwrap();
        let sent = client.take_outgoing().unwrap();
        assert!(!client.has_outgoing());
        let mut input = &sent[..];
        server.read_tls(&mut input).unwrap();
        server.process_new_packets().unwrap();
        let mut read = Vec::new();
        let _ = server.reader().read_to_end(&mut read);
        assert_eq!(read, b"GET / HTTP/1.1\r\n\r\nmore");

        // 40 KiB from the server, three records, read a byte at a time then in odd pieces: the
        // tail holds only an unfinished record and is freed once empty.
        let big: Vec<u8> = (0..40_960u32).map(|i| i as u8).collect();
        for chunk in [1, 1000, 7777] {
            server.writer().write_all(&big).unwrap();
            let (got, _) = to_client(&mut server, &mut client, chunk).unwrap();
            assert_eq!(got, big, "chunk {chunk}");
            assert_eq!(client.session.tail_capacity(), 0, "an empty tail keeps no allocation");
        }
    }

    #[test]
    fn a_tls_12_server_is_spoken_to_in_tls_12() {
        let (ca, config) = ca_and_server_of("tls12", &[&rustls::version::TLS12]);
        let mut client = client(ca);
        let mut server = ServerConnection::new(config).unwrap();
        handshake(&mut client, &mut server, 100);
        let (version, suite) = client.negotiated().unwrap();
        assert_eq!(version, rustls::ProtocolVersion::TLSv1_2);
        assert_eq!(crate::tls::version_label(version), "1.2");
        assert!(crate::tls::suite_label(suite).starts_with("TLS_ECDHE_ECDSA_"), "{suite:?}");
        client.encrypt(b"ping").unwrap();
        to_server(&mut client, &mut server).unwrap();
        let mut read = [0u8; 4];
        server.reader().read_exact(&mut read).unwrap();
        assert_eq!(&read, b"ping");
        server.writer().write_all(b"pong").unwrap();
        assert_eq!(to_client(&mut server, &mut client, 3).unwrap().0, b"pong");
    }

    #[test]
    fn a_certificate_from_another_ca_fails_with_an_alert_for_the_server() {
        let (_, config) = ca_and_server("server");
        let (other_ca, _) = ca_and_server("other");
        let mut client = client(other_ca);
        let mut server = ServerConnection::new(config).unwrap();
        to_server(&mut client, &mut server).unwrap();
        let error = to_client(&mut server, &mut client, 4096).unwrap_err();
        assert_eq!(failure_reason(&error), "unknown_issuer");
        assert!(client.has_failed() && !client.is_established());
        // Later input is ignored, and nothing is handed out.
        let mut plaintext = vec![1];
        assert_eq!(
            client.receive(&mut [22, 3, 3, 0, 1, 0], &mut plaintext).unwrap(),
            (Received::Open, false)
        );
        assert!(plaintext.is_empty());
        assert!(client.encrypt(b"x").is_err());
        // The alert reaches the server, which says why it failed.
        let server_error = to_server(&mut client, &mut server).unwrap_err();
        assert!(matches!(server_error, rustls::Error::AlertReceived(_)), "{server_error:?}");
    }

    #[test]
    fn close_notify_goes_out_once_and_the_servers_is_seen() {
        let (ca, config) = ca_and_server("close");
        let mut client = client(ca);
        let mut server = ServerConnection::new(config).unwrap();
        handshake(&mut client, &mut server, 4096);
        client.close_notify().unwrap();
        client.close_notify().unwrap();
        assert!(client.close_notify_queued());
        to_server(&mut client, &mut server).unwrap();
        let mut read = Vec::new();
        assert_eq!(server.reader().read_to_end(&mut read).unwrap(), 0, "the server saw a clean close");
        server.send_close_notify();
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        let mut plaintext = Vec::new();
        let (received, _) = client.receive(&mut wire, &mut plaintext).unwrap();
        assert_eq!(received, Received::PeerClosed);
    }
}
