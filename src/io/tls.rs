//! One TLS connection's record layer between a socket and the connection's machine: ciphertext
//! in, plaintext out to the machine; the machine's plaintext in, ciphertext out to the socket.
//! The server end terminates wss:// clients; the client end speaks to wss:// proxy upstreams.
//! No I/O: the worker lends the received bytes and takes what is to be sent.
//!
//! rustls' unbuffered API: records are processed in the buffer the ring filled (no copy of the
//! ciphertext into a rustls buffer); only an unfinished record is kept between reads. rustls
//! 0.23 still hands application data out as an owned chunk per record, and the machine unmasks
//! in place, so the plaintext of one read is gathered into one buffer of the worker's, borrowed
//! for the call: one copy, and no plaintext buffer lives in the connection between reads.
//! Ciphertext to send is written into a buffer from the worker's staging pool and goes to the
//! socket as one send per loop turn: everything the machine had to send that turn is encrypted
//! in one call, into as few records as its size allows (16 KiB each).

use std::sync::Arc;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use rustls::{ClientConfig, ProtocolVersion, ServerConfig, SupportedCipherSuite};

use super::buffers::process_after_tail;
use super::outgoing::{Outgoing, staging_buffer};

/// Bytes a record adds to its plaintext at most (header, explicit nonce of TLS 1.2, tag, content
/// type of TLS 1.3, with room to spare), for sizing the ciphertext buffer before encrypting.
const RECORD_OVERHEAD: usize = 64;
/// The most plaintext one record carries.
const RECORD_PLAINTEXT: usize = 16 * 1024;

/// What a batch of received bytes came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Processed (plaintext, if any, was handed on); more may follow.
    Open,
    /// The peer sent close_notify: nothing more will come.
    PeerClosed,
}

/// rustls' two ends, whose record processing is the same state machine over different types.
trait Records {
    type Data;
    fn records<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Records for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn records<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Records for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn records<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

/// Which end of TLS this session is.
enum End {
    /// A wss:// client of ours.
    Server(UnbufferedServerConnection),
    /// Our connection to a wss:// upstream.
    Client(UnbufferedClientConnection),
}

/// What to write while the session may send application data.
enum Write<'a> {
    Encrypt(&'a [u8]),
    CloseNotify,
}

/// A TLS connection's state.
pub struct TlsSession {
    end: End,
    /// An unfinished record, kept until the rest of it arrives.
    tail: Vec<u8>,
    /// Ciphertext waiting to be sent (handshake records, alerts, encrypted application data).
    outgoing: Vec<u8>,
    /// The handshake finished (counted once).
    established: bool,
    /// close_notify was encrypted into `outgoing`.
    close_notify_queued: bool,
    /// The session ended in an error (counted once, with its reason).
    failed: bool,
    /// The machine's plaintext whose ciphertext is being sent: handed back to the machine once
    /// all of it is written, so that the machine's view of its sends is the same as on a plain
    /// socket (what it has in flight, backpressure, when it may finish).
    pub(super) in_flight: Option<Outgoing>,
    /// close_notify is queued: the FIN follows once it is written.
    pub(super) fin_pending: bool,
    /// The session failed: the alert rustls has for the peer goes out, then the connection
    /// closes; anything the peer sends meanwhile is ignored.
    pub(super) closing_on_error: bool,
}

impl TlsSession {
    /// A session for a freshly accepted connection.
    pub fn new(config: Arc<ServerConfig>) -> Result<TlsSession, rustls::Error> {
        Ok(TlsSession::with(End::Server(UnbufferedServerConnection::new(config)?)))
    }

    /// A session to an upstream called `name` (its SNI and the name its certificate must cover),
    /// with its ClientHello already queued to go once the socket is connected.
    pub fn client(config: Arc<ClientConfig>, name: ServerName<'static>) -> Result<TlsSession, rustls::Error> {
        let mut session = TlsSession::with(End::Client(UnbufferedClientConnection::new(config, name)?));
        let (_, hello) = session.process(&mut [], &mut Vec::new());
        hello.map(|_| session)
    }

    fn with(end: End) -> TlsSession {
        TlsSession {
            end,
            tail: Vec::new(),
            outgoing: Vec::new(),
            established: false,
            close_notify_queued: false,
            failed: false,
            in_flight: None,
            fin_pending: false,
            closing_on_error: false,
        }
    }

    /// Whether application data may flow (the handshake is complete).
    pub fn is_established(&self) -> bool {
        self.established
    }

    /// Bytes allocated for an unfinished record: zero between reads that ended on a record
    /// boundary, which the memory tests of both ends pin.
    pub fn tail_capacity(&self) -> usize {
        self.tail.capacity()
    }

    /// Whether close_notify is queued or sent (a client that ends the conversation asks, to
    /// queue it once).
    pub fn close_notify_queued(&self) -> bool {
        self.close_notify_queued
    }

    /// The version and suite agreed, once established.
    pub fn negotiated(&self) -> Option<(ProtocolVersion, SupportedCipherSuite)> {
        match &self.end {
            End::Server(conn) => Some((conn.protocol_version()?, conn.negotiated_cipher_suite()?)),
            End::Client(conn) => Some((conn.protocol_version()?, conn.negotiated_cipher_suite()?)),
        }
    }

    /// Marks the session failed; returns whether it was not yet (so a failure is counted once).
    pub fn mark_failed(&mut self) -> bool {
        !std::mem::replace(&mut self.failed, true)
    }

    /// Ciphertext arrived: processes it in place. The plaintext of the complete records is
    /// gathered into `plaintext` (cleared first) for the caller to hand to the machine. Handshake
    /// records to answer with are queued for [`TlsSession::take_outgoing`]. Returns whether the
    /// handshake completed during this call too. On an error, the alert rustls has for the peer
    /// is queued to be sent.
    pub fn receive(
        &mut self,
        data: &mut [u8],
        plaintext: &mut Vec<u8>,
    ) -> Result<(Received, bool), rustls::Error> {
        plaintext.clear();
        let was_established = self.established;
        let mut outcome = Ok(Received::Open);
        let mut tail = std::mem::take(&mut self.tail);
        process_after_tail(&mut tail, data, |buf| {
            // rustls works on bytes from the network here: a panic in it must end this session,
            // not the worker and every other connection on it.
            let processed =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.process(buf, plaintext)));
            let (used, result) = processed.unwrap_or_else(|_| {
                (buf.len(), Err(rustls::Error::General("the TLS library panicked on this input".into())))
            });
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
    /// used, and what happened.
    fn process(
        &mut self,
        buf: &mut [u8],
        plaintext: &mut Vec<u8>,
    ) -> (usize, Result<Received, rustls::Error>) {
        let TlsSession { end, outgoing, established, .. } = self;
        match end {
            End::Server(conn) => process_records(conn, buf, plaintext, outgoing, established),
            End::Client(conn) => process_records(conn, buf, plaintext, outgoing, established),
        }
    }

    /// Encrypts `plaintext` (everything the machine has to send this turn) for sending.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<(), rustls::Error> {
        self.write(Write::Encrypt(plaintext))
    }

    /// Queues close_notify (once): the machine finished sending, its FIN follows.
    pub fn close_notify(&mut self) -> Result<(), rustls::Error> {
        if std::mem::replace(&mut self.close_notify_queued, true) {
            return Ok(());
        }
        self.write(Write::CloseNotify)
    }

    fn write(&mut self, what: Write<'_>) -> Result<(), rustls::Error> {
        let TlsSession { end, outgoing, tail, .. } = self;
        match end {
            End::Server(conn) => write_records(conn, tail, outgoing, what),
            End::Client(conn) => write_records(conn, tail, outgoing, what),
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

/// Runs the records in `buf` through `conn` until it needs more bytes: how much of `buf` is used,
/// and what happened. Plaintext is gathered into `plaintext`, handshake records into `outgoing`.
fn process_records<C: Records>(
    conn: &mut C,
    buf: &mut [u8],
    plaintext: &mut Vec<u8>,
    outgoing: &mut Vec<u8>,
    established: &mut bool,
) -> (usize, Result<Received, rustls::Error>) {
    let mut at = 0;
    let mut received = Received::Open;
    loop {
        let status = conn.records(&mut buf[at..]);
        let mut discard = status.discard;
        let state = match status.state {
            Ok(state) => state,
            Err(error) => {
                let used = at + discard;
                queue_alerts(conn, &mut buf[used..], outgoing);
                return (used, Err(error));
            }
        };
        match state {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    match record {
                        Ok(record) => {
                            discard += record.discard;
                            plaintext.extend_from_slice(record.payload);
                        }
                        Err(error) => return (at + discard, Err(error)),
                    }
                }
            }
            ConnectionState::EncodeTlsData(mut encode) => {
                if let Err(error) = encode_into(outgoing, |out| encode.encode(out)) {
                    return (at + discard, Err(error));
                }
            }
            // Queued in `outgoing`, which the worker sends in order before anything newer.
            ConnectionState::TransmitTlsData(transmit) => transmit.done(),
            ConnectionState::PeerClosed => received = Received::PeerClosed,
            ConnectionState::WriteTraffic(_) => {
                *established = true;
                return (at + discard, Ok(received));
            }
            ConnectionState::BlockedHandshake | ConnectionState::Closed => {
                return (at + discard, Ok(received));
            }
            // Early data is not enabled (`max_early_data_size` is 0), and future states are
            // not ours to guess at.
            _ => return (at + discard, Err(rustls::Error::General("unexpected TLS state".into()))),
        }
        at += discard;
    }
}

/// Writes `what` once `conn` may send application data, after queueing any handshake records
/// it has pending (TLS 1.3 session tickets follow the handshake this way). rustls is given the
/// unfinished bytes kept from the last read (`tail`), never an empty buffer in their place: a
/// handshake message it holds across records points into them.
fn write_records<C: Records>(
    conn: &mut C,
    tail: &mut Vec<u8>,
    outgoing: &mut Vec<u8>,
    what: Write<'_>,
) -> Result<(), rustls::Error> {
    let mut at = 0;
    let result = loop {
        let status = conn.records(&mut tail[at..]);
        at += status.discard;
        match status.state {
            Err(error) => break Err(error),
            Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                if let Err(error) = encode_into(outgoing, |out| encode.encode(out)) {
                    break Err(error);
                }
            }
            Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
            Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                break match what {
                    Write::Encrypt(plaintext) => {
                        encrypt_into(outgoing, plaintext.len(), |out| traffic.encrypt(plaintext, out))
                    }
                    Write::CloseNotify => encrypt_into(outgoing, 0, |out| traffic.queue_close_notify(out)),
                };
            }
            // Unread application data cannot be pending (`receive` drains it), and before the
            // handshake there is nothing to write with.
            Ok(_) => break Err(rustls::Error::General("TLS session not ready to write".into())),
        }
    };
    tail.drain(..at.min(tail.len()));
    result
}

/// After an error: queues what rustls still has for the peer: the rest of the flight it was
/// sending, then its fatal alert, the last thing it queues. rustls hands queued records out
/// before it looks at input again, and looking at the failed input again would fail again (a
/// second fatal alert, which rustls asserts against), so this stops at the alert: the first
/// record that is not a plaintext handshake or change-cipher-spec record (an alert is sent as
/// content type 21 before encryption starts, 23 after). `rest` is what is left of the failed
/// buffer: rustls may still point into it for a handshake message it holds, and an empty buffer
/// in its place makes rustls panic.
fn queue_alerts<C: Records>(conn: &mut C, rest: &mut [u8], outgoing: &mut Vec<u8>) {
    const HANDSHAKE: u8 = 22;
    const CHANGE_CIPHER_SPEC: u8 = 20;
    for _ in 0..8 {
        let start = outgoing.len();
        let Ok(ConnectionState::EncodeTlsData(mut encode)) = conn.records(rest).state else { return };
        if encode_into(outgoing, |out| encode.encode(out)).is_err() {
            return;
        }
        if !matches!(outgoing.get(start), Some(&(HANDSHAKE | CHANGE_CIPHER_SPEC))) {
            return;
        }
    }
}

/// Appends what `encode` writes (a handshake record or alert) to `outgoing`, growing it to the
/// size rustls asks for. Shared with loadtest's TLS client.
pub fn encode_into(
    outgoing: &mut Vec<u8>,
    encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), rustls::Error> {
    append_with(outgoing, 512, encode, |error| match error {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => Some(*required_size),
        _ => None,
    })
}

/// Appends what `encrypt` writes for `plaintext_len` bytes of application data (or a
/// close_notify) to `outgoing`, sized for the records they take. Shared with loadtest's TLS client.
pub fn encrypt_into(
    outgoing: &mut Vec<u8>,
    plaintext_len: usize,
    encrypt: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), rustls::Error> {
    let records = plaintext_len.div_ceil(RECORD_PLAINTEXT).max(1);
    let room = plaintext_len + records * RECORD_OVERHEAD;
    append_with(outgoing, room, encrypt, |error| match error {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => Some(*required_size),
        _ => None,
    })
}

/// Appends what `write` puts into `room` bytes at the end of `outgoing`; when rustls says the
/// room was too small (`required`), tries again with what it asked for.
fn append_with<E: std::fmt::Display>(
    outgoing: &mut Vec<u8>,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> Result<(), rustls::Error> {
    loop {
        let start = reserve(outgoing, room);
        match write(&mut outgoing[start..]) {
            Ok(written) => {
                outgoing.truncate(start + written);
                return Ok(());
            }
            Err(error) => {
                outgoing.truncate(start);
                match required(&error) {
                    Some(size) if size > room => room = size,
                    _ => return Err(rustls::Error::General(error.to_string())),
                }
            }
        }
    }
}

/// Grows `outgoing` by `room` zeroed bytes (from the pool when it was empty); returns where they
/// start.
fn reserve(outgoing: &mut Vec<u8>, room: usize) -> usize {
    if outgoing.capacity() == 0 {
        *outgoing = staging_buffer();
    }
    let start = outgoing.len();
    outgoing.resize(start + room, 0);
    start
}
