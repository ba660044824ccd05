//! One `wss://` connection's record layer, between the socket and the connection's WebSocket
//! state machine ([`super::conn`]): ciphertext in, plaintext out to the machine; the machine's
//! plaintext in, ciphertext out to the socket. No I/O: the connection lends the received bytes
//! and takes what is to be sent. The client side of the gateway's own design (`src/io/tls.rs`).
//!
//! rustls' unbuffered API: records are processed in the buffer the backend filled (io_uring's
//! provided buffer, or epoll's read buffer), with no copy of the ciphertext into a rustls buffer;
//! only an unfinished record is kept between reads ([`TlsClient`]'s tail, freed once empty).
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

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::unbuffered::{ConnectionState, WriteTraffic};
use rustls::{ClientConfig, ProtocolVersion, SupportedCipherSuite};

use ringgate::io::process_after_tail;
use ringgate::io::tls::{encode_into, encrypt_into};

/// What a batch of received bytes came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Processed (plaintext, if any, was gathered); more may follow.
    Open,
    /// The server sent close_notify: nothing more will come.
    PeerClosed,
}

/// A TLS client connection's state.
pub struct TlsClient {
    conn: UnbufferedClientConnection,
    /// An unfinished record, kept until the rest of it arrives.
    tail: Vec<u8>,
    /// Ciphertext waiting to be sent (handshake records, alerts, encrypted application data).
    outgoing: Vec<u8>,
    /// The handshake finished.
    established: bool,
    /// close_notify was encrypted into `outgoing`.
    close_notify_queued: bool,
    /// The session ended in an error: what the server sends now is ignored; the alert rustls
    /// has for it, if any, is in `outgoing`.
    failed: bool,
}

impl TlsClient {
    /// A session to `name`, its ClientHello queued for [`TlsClient::take_outgoing`].
    pub fn new(config: Arc<ClientConfig>, name: ServerName<'static>) -> Result<TlsClient, rustls::Error> {
        let mut client = TlsClient {
            conn: UnbufferedClientConnection::new(config, name)?,
            tail: Vec::new(),
            outgoing: Vec::new(),
            established: false,
            close_notify_queued: false,
            failed: false,
        };
        let (_, result) = client.process(&mut [], &mut Vec::new());
        result?;
        Ok(client)
    }

    /// Whether application data may flow (the handshake is complete).
    pub fn is_established(&self) -> bool {
        self.established
    }

    /// Whether the session failed (see [`TlsClient::receive`]).
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// Whether close_notify is queued or sent.
    pub fn close_notify_queued(&self) -> bool {
        self.close_notify_queued
    }

    /// The version and suite agreed, once established.
    pub fn negotiated(&self) -> Option<(ProtocolVersion, SupportedCipherSuite)> {
        Some((self.conn.protocol_version()?, self.conn.negotiated_cipher_suite()?))
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
        plaintext.clear();
        if self.failed {
            return Ok((Received::Open, false));
        }
        let was_established = self.established;
        let mut outcome = Ok(Received::Open);
        let mut tail = std::mem::take(&mut self.tail);
        process_after_tail(&mut tail, data, |buf| {
            let (used, result) = self.process(buf, plaintext);
            outcome = result;
            used
        });
        self.tail = tail;
        if outcome.is_err() {
            self.tail = Vec::new();
        }
        outcome.map(|received| (received, self.established && !was_established))
    }

    /// Runs the records in `buf` through rustls until it needs more bytes: how much of `buf` is
    /// used, and what happened. On an error the session is failed ([`TlsClient::fail`]) and all
    /// of `buf` is used.
    fn process(
        &mut self,
        buf: &mut [u8],
        plaintext: &mut Vec<u8>,
    ) -> (usize, Result<Received, rustls::Error>) {
        let mut at = 0;
        let mut received = Received::Open;
        loop {
            let status = self.conn.process_tls_records(&mut buf[at..]);
            let mut discard = status.discard;
            let failure = match status.state {
                Err(error) => Some(error),
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut failure = None;
                    while let Some(record) = traffic.next_record() {
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                plaintext.extend_from_slice(record.payload);
                            }
                            Err(error) => {
                                failure = Some(error);
                                break;
                            }
                        }
                    }
                    failure
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_into(&mut self.outgoing, |out| encode.encode(out)).err()
                }
                Ok(state) => match settle(state, &mut self.established, &mut received) {
                    Ok(true) => None,
                    Ok(false) => return (at + discard, Ok(received)),
                    Err(error) => Some(error),
                },
            };
            at += discard;
            if let Some(error) = failure {
                self.fail(&mut buf[at..]);
                return (buf.len(), Err(error));
            }
        }
    }

    /// Encrypts `plaintext` (everything the machine has to send now) for sending.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<(), rustls::Error> {
        self.with_write_traffic(|outgoing, traffic| {
            encrypt_into(outgoing, plaintext.len(), |out| traffic.encrypt(plaintext, out))
        })
    }

    /// Queues close_notify (once): the connection is done sending; the socket is shut down once
    /// it is written.
    pub fn close_notify(&mut self) -> Result<(), rustls::Error> {
        if std::mem::replace(&mut self.close_notify_queued, true) {
            return Ok(());
        }
        self.with_write_traffic(|outgoing, traffic| {
            encrypt_into(outgoing, 0, |out| traffic.queue_close_notify(out))
        })
    }

    /// Runs `write` with the session in its write state, after queueing any records rustls has
    /// pending.
    fn with_write_traffic(
        &mut self,
        write: impl FnOnce(&mut Vec<u8>, &mut WriteTraffic<'_, ClientConnectionData>) -> Result<(), rustls::Error>,
    ) -> Result<(), rustls::Error> {
        if self.failed || !self.established {
            return Err(rustls::Error::General("TLS session not ready to write".into()));
        }
        loop {
            let status = self.conn.process_tls_records(&mut []);
            match status.state? {
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut self.outgoing, |out| encode.encode(out))?
                }
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::WriteTraffic(mut traffic) => return write(&mut self.outgoing, &mut traffic),
                // Unread application data cannot be pending (`receive` drains it).
                _ => return Err(rustls::Error::General("TLS session not ready to write".into())),
            }
        }
    }

    /// Fails the session and queues the alert rustls prepared for the server, if any (after
    /// whatever was queued before). rustls puts the alert first in line, so one call returns it
    /// without looking at the input again; any further call would (given `rest`, a second
    /// deframing error sends a second alert, which rustls asserts against; given an empty buffer,
    /// handshake messages of the failed flight still pending in the input are looked for and
    /// not found, and rustls 0.23.46 panics). `rest` is what was left of the input after the
    /// error, for the case with no alert.
    fn fail(&mut self, rest: &mut [u8]) {
        self.failed = true;
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = self.conn.process_tls_records(rest).state {
            let _ = encode_into(&mut self.outgoing, |out| encode.encode(out));
        }
    }

    /// The ciphertext to send next, if any (taken: the caller sends it before asking again).
    pub fn take_outgoing(&mut self) -> Option<Vec<u8>> {
        (!self.outgoing.is_empty()).then(|| std::mem::take(&mut self.outgoing))
    }

    /// Whether ciphertext waits to be sent.
    pub fn has_outgoing(&self) -> bool {
        !self.outgoing.is_empty()
    }
}

/// [`TlsClient::process`]: the states that need no buffer of the caller's: `Ok(true)` to go on processing,
/// `Ok(false)` when rustls needs more bytes (or has nothing more to say).
fn settle(
    state: ConnectionState<'_, '_, ClientConnectionData>,
    established: &mut bool,
    received: &mut Received,
) -> Result<bool, rustls::Error> {
    match state {
        // Queued in `outgoing`, which goes to the socket in order before anything newer.
        ConnectionState::TransmitTlsData(transmit) => {
            transmit.done();
            Ok(true)
        }
        ConnectionState::PeerClosed => {
            *received = Received::PeerClosed;
            Ok(true)
        }
        ConnectionState::WriteTraffic(_) => {
            *established = true;
            Ok(false)
        }
        ConnectionState::BlockedHandshake | ConnectionState::Closed => Ok(false),
        // Early data is a server's state; future states are not ours to guess at.
        _ => Err(rustls::Error::General("unexpected TLS state".into())),
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
            assert_eq!(client.tail.capacity(), 0, "an empty tail keeps no allocation");
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
