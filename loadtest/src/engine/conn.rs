//! One client connection as a state machine in its thread's table: no task, no future, no
//! buffer of its own while idle. The thread's loop feeds it the backend's events (connected,
//! bytes received, send finished) and its timer; after each, [`Conn::sync`] turns what the
//! connection now wants into backend operations: a send of what it has queued, a receive, or
//! closing the socket.
//!
//! `wss://`: the connection's [`TlsClient`] sits between the socket and all of this. From the
//! connect on, what the backend receives is ciphertext, turned into plaintext for the stages below
//! in the thread's buffer; what the stages queue in `pending` is encrypted (once the TLS handshake
//! is done: until then the upgrade request waits) into one ciphertext buffer that is the send in
//! flight. `Upgrading` thus spans the TLS handshake too, and the handshake latency runs from the
//! TCP connect to the 101, TLS included. A TLS handshake that fails is a failed connection
//! (`tls_<reason>`): rustls' alert goes out, then the socket closes. A clean close sends
//! close_notify before the socket is shut down.
//!
//! Stages: `Connecting` (TCP connect in flight) -> `Upgrading` (request sent, offering
//! permessage-deflate with `--deflate`; reading the 101) -> `Open` (its [`Traffic`] runs, its
//! messages compressed if the server agreed) -> `Closing` (our Close sent, waiting for the server's) ->
//! `Shutdown` (socket shut down, waiting for the operations still in flight to end) -> `Done`,
//! or `Lingering` first for a pubsub subscriber that must wait to count what it missed.
//!
//! Must never: close a socket with a receive or send in flight (the backend's contract: the
//! kernel may still write into a buffer or read from one), move or drop the bytes of a send in
//! flight, or count a connection as open after it ended.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::Arc;

use ringgate::io::{Backend, Outgoing, Received, Token, staging_buffer};
use ringgate::proto::handshake::{ClientHandshake, ClientHandshakeError, ServerResponse};
use socket2::{SockAddr, Socket};

use super::env::Env;
use super::pubsub::Role;
use super::tls::{self, TlsClient};
use super::traffic::Traffic;
use super::wire::{Compression, Drained, Receiver, put_close};
use super::{CLOSE_TIMEOUT, HANDSHAKE_TIMEOUT};
use crate::stats::{ErrorKind, Volume};
use crate::tls::{failure_reason, suite_label, version_label};

/// The thread's plaintext buffer is kept up to this size between reads (a 16 KiB record and
/// change); a larger read's buffer is freed afterwards.
const PLAINTEXT_KEPT: usize = 64 * 1024;

/// Where a connection is.
enum Stage {
    /// Not started yet.
    Idle,
    /// The TCP connect is in flight.
    Connecting,
    /// The upgrade request is sent (or queued); reading the response.
    Upgrading(ClientHandshake),
    /// The handshake is done; the traffic runs, its messages sent as the handshake agreed.
    Open(Compression),
    /// Our Close is queued or sent; waiting for the server's until `by`. `peer_closed` once the
    /// server's Close came (then the socket is shut down as soon as ours is out).
    Closing { by: u64, peer_closed: bool },
    /// The socket is shut down; it is closed once nothing is in flight on it.
    Shutdown,
    /// The socket is closed; a subscriber waits to count what it missed.
    Lingering,
    /// Finished.
    Done,
}

/// One connection.
pub struct Conn {
    /// Its number in the run (connections are dealt round-robin over the threads).
    pub index: u32,
    /// When its timer entry fires, if it has one pending: the earliest of its entries.
    pub wake_at: Option<u64>,
    /// Already on the thread's list of connections to sync this turn.
    pub touched: bool,
    fd: RawFd,
    stage: Stage,
    /// When the TCP connect started (handshake latency and timeout).
    started: u64,
    established: bool,
    role: Option<Role>,
    rx: Receiver,
    /// Bytes to send next: frames, control frames, the upgrade request.
    pending: Vec<u8>,
    /// The send in flight; the kernel reads from it until its completion.
    out: Option<Outgoing>,
    /// A receive is running (io_uring: the multishot receive is armed; epoll: input is wanted).
    recv_on: bool,
    /// A stop of the receive was asked for.
    recv_stopping: bool,
    traffic: Option<Traffic>,
    /// `wss://`: the TLS session, from the connect on (boxed: plain connections pay 8 bytes).
    tls: Option<Box<TlsClient>>,
}

impl Conn {
    /// Connection `index` of the run, not started; `role` in pubsub mode.
    pub fn new(index: u32, role: Option<Role>, max_message: usize) -> Conn {
        Conn {
            index,
            wake_at: None,
            touched: false,
            fd: -1,
            stage: Stage::Idle,
            started: 0,
            established: false,
            role,
            rx: Receiver::new(max_message),
            pending: Vec::new(),
            out: None,
            recv_on: false,
            recv_stopping: false,
            traffic: None,
            tls: None,
        }
    }

    /// Whether the connection is finished.
    pub fn is_done(&self) -> bool {
        matches!(self.stage, Stage::Done)
    }

    /// Whether it is still on its way to being established (for an interruption).
    pub fn is_connecting(&self) -> bool {
        matches!(self.stage, Stage::Connecting | Stage::Upgrading(_))
    }

    /// Starts the connection: a socket set up the way `backend` drives sockets, bound to `source`
    /// if given, and a connect to `addr` (which must stay where it is until the connect ends).
    pub fn start<B: Backend>(
        &mut self,
        env: &mut Env<'_>,
        backend: &mut B,
        token: Token,
        addr: &SockAddr,
        source: Option<Ipv4Addr>,
    ) {
        env.stats.counters.attempted += 1;
        self.started = env.now;
        let socket = match open_socket(backend, addr, source) {
            Ok(socket) => socket,
            Err(error) => {
                self.stage = Stage::Done;
                return self.connect_failed(env, io_reason(&error));
            }
        };
        let fd = socket.into_raw_fd();
        // Every receive is stamped by the kernel with its arrival, so latency does not depend on
        // when this thread wakes to read it. Without stamps, the read time stands in.
        let _ = ringgate::io::stamp::enable(fd);
        if let Err(error) = backend.attach(fd, token) {
            backend.close(fd);
            self.stage = Stage::Done;
            return self.connect_failed(env, io_reason(&error));
        }
        self.fd = fd;
        self.stage = Stage::Connecting;
        backend.connect(fd, token, addr);
    }

    /// The connect finished.
    pub fn on_connected(&mut self, env: &mut Env<'_>, result: io::Result<()>) {
        if !matches!(self.stage, Stage::Connecting) {
            return;
        }
        if let Err(error) = result {
            return self.fail_connect(env, io_reason(&error));
        }
        let plan = env.plan;
        let target = &plan.targets[plan.node_of(self.index)];
        if let (Some(config), Some(name)) = (env.tls, &target.tls) {
            match TlsClient::new(Arc::clone(config), name.clone()) {
                Ok(session) => self.tls = Some(Box::new(session)),
                Err(error) => {
                    let reason = failure_reason(&error);
                    env.stats.tls_failed(&reason);
                    return self.fail_connect(env, format!("tls_{reason}"));
                }
            }
        }
        let mut handshake = ClientHandshake::new(fastrand::u128(..).to_ne_bytes());
        if env.plan.deflate {
            handshake = handshake.offering_deflate();
        }
        match (self.role, env.pubsub) {
            (Some(role), Some(shared)) => {
                handshake.write_request(&mut self.pending, &target.host, &shared.path(role), &[]);
            }
            _ => handshake.write_request(&mut self.pending, &target.host, &target.path, &[]),
        }
        self.stage = Stage::Upgrading(handshake);
    }

    /// A receive produced something; `more` is false when the receive has ended.
    pub fn on_recv(&mut self, env: &mut Env<'_>, received: Received<'_>, more: bool) {
        if !more {
            self.recv_on = false;
        }
        match received {
            Received::Data(data) if self.tls.is_some() => self.on_ciphertext(env, data),
            Received::Data(data) => self.on_data(env, data),
            Received::Stopped => {}
            Received::Eof | Received::Error(_) => self.on_end_of_stream(env),
        }
    }

    /// The server's side of the stream ended (EOF, an error, or TLS close_notify).
    fn on_end_of_stream(&mut self, env: &mut Env<'_>) {
        match self.stage {
            Stage::Upgrading(_) => self.fail_connect(env, "closed_during_handshake".into()),
            Stage::Open(_) => {
                env.stats.error(ErrorKind::ConnectionLost);
                self.shut_down();
            }
            Stage::Closing { .. } => self.shut_down(),
            _ => {}
        }
    }

    /// `wss://`: ciphertext arrived. Decrypted in place; its plaintext, gathered in the thread's
    /// buffer, goes to the stage as a plain connection's bytes would.
    fn on_ciphertext(&mut self, env: &mut Env<'_>, data: &mut [u8]) {
        if !matches!(self.stage, Stage::Upgrading(_) | Stage::Open(_) | Stage::Closing { .. }) {
            return;
        }
        let Some(session) = self.tls.as_deref_mut() else { return };
        let mut plaintext = std::mem::take(env.plaintext);
        match session.receive(data, &mut plaintext) {
            Ok((received, established_now)) => {
                if established_now {
                    if let Some((version, suite)) = session.negotiated() {
                        env.stats.tls_established(version_label(version), suite_label(suite));
                    }
                    env.stats.tls_handshake(env.now - self.started);
                }
                if !plaintext.is_empty() {
                    self.on_data(env, &mut plaintext);
                }
                if received == tls::Received::PeerClosed {
                    self.on_end_of_stream(env);
                }
            }
            Err(error) => self.tls_failed(env, &error),
        }
        plaintext.clear();
        if plaintext.capacity() > PLAINTEXT_KEPT {
            plaintext = Vec::new();
        }
        *env.plaintext = plaintext;
    }

    /// The TLS session failed. Before the WebSocket handshake completed this is a failed
    /// connection (and, before the TLS handshake completed, a failed TLS handshake); rustls'
    /// alert for the server goes out before the socket is shut down. After, an error.
    fn tls_failed(&mut self, env: &mut Env<'_>, error: &rustls::Error) {
        let reason = failure_reason(error);
        match self.stage {
            Stage::Upgrading(_) => {
                if self.tls.as_deref().is_some_and(|session| !session.is_established()) {
                    env.stats.tls_failed(&reason);
                }
                self.connect_failed(env, format!("tls_{reason}"));
                // Nothing more of ours goes out but the alert: `sync` shuts the socket down once
                // it is written, or at the deadline.
                self.pending = Vec::new();
                self.stage =
                    Stage::Closing { by: env.now + CLOSE_TIMEOUT.as_nanos() as u64, peer_closed: true };
            }
            Stage::Open(_) => {
                env.stats.error(ErrorKind::TlsError);
                self.shut_down();
            }
            _ => self.shut_down(),
        }
    }

    fn on_data(&mut self, env: &mut Env<'_>, data: &mut [u8]) {
        match self.stage {
            Stage::Upgrading(_) => self.on_response(env, data),
            Stage::Open(_) => {
                let Some(traffic) = self.traffic.as_mut() else { return };
                let mut volume = Volume::default();
                let drained = self.rx.receive(data, &mut self.pending, &mut volume, |payload| {
                    traffic.on_message(env, payload)
                });
                env.stats.counters.received_bytes.merge(&volume);
                self.after_frames(env, drained);
            }
            Stage::Closing { by, .. } => {
                // Only the server's Close matters now; Pings are still answered.
                match self.rx.receive(data, &mut self.pending, &mut Volume::default(), |_| {}) {
                    Drained::Open => {}
                    Drained::Closed(_) => self.stage = Stage::Closing { by, peer_closed: true },
                    Drained::Broken => self.shut_down(),
                }
            }
            _ => {}
        }
    }

    /// Bytes of the handshake response: kept until the header section is complete.
    fn on_response(&mut self, env: &mut Env<'_>, data: &[u8]) {
        let Stage::Upgrading(handshake) = &self.stage else { return };
        self.rx.tail.extend_from_slice(data);
        let (len, deflate) = match handshake.parse_response(&self.rx.tail, &[]) {
            Ok(ServerResponse::Partial) => return,
            Ok(ServerResponse::Upgraded { len, deflate, .. }) => (len, deflate),
            Err(error) => return self.fail_connect(env, handshake_reason(error)),
        };
        self.rx.tail.drain(..len);
        if let Some(agreement) = &deflate {
            self.rx.enable_deflate(agreement.server_no_context_takeover);
            env.stats.counters.deflate_agreed += 1;
        }
        self.established = true;
        self.stage = Stage::Open(Compression::agreed(deflate.as_ref()));
        env.stats.established(env.now, env.now - self.started);
        if let (Some(role), Some(shared)) = (self.role, env.pubsub) {
            shared.connected(role, true);
        }
        let mut traffic = Traffic::new(env, self.role);
        // Frames that came with the response.
        let mut volume = Volume::default();
        let drained =
            self.rx.receive_tail(&mut self.pending, &mut volume, |payload| traffic.on_message(env, payload));
        env.stats.counters.received_bytes.merge(&volume);
        self.traffic = Some(traffic);
        self.after_frames(env, drained);
    }

    /// After an open connection's frames were handled: a Close or a protocol error ends it.
    fn after_frames(&mut self, env: &mut Env<'_>, drained: Drained) {
        match drained {
            Drained::Open => {}
            Drained::Broken => {
                env.stats.error(ErrorKind::ProtocolError);
                self.shut_down();
            }
            Drained::Closed(code) => {
                // Pubsub counts Closes by code (1008 is a slow consumer); echo as an error kind.
                if env.pubsub.is_some() {
                    env.stats.closed(code);
                } else {
                    env.stats.error(ErrorKind::ServerClosed);
                }
                put_close(&mut self.pending);
                self.stage =
                    Stage::Closing { by: env.now + CLOSE_TIMEOUT.as_nanos() as u64, peer_closed: true };
            }
        }
    }

    /// A send finished: `Ok(n)` bytes were written (0: the socket was full, try again).
    pub fn on_sent(&mut self, env: &mut Env<'_>, result: io::Result<usize>) {
        let Some(out) = self.out.as_mut() else { return };
        match result {
            Ok(n) => {
                out.advance(n);
                if out.is_empty() || matches!(self.stage, Stage::Shutdown) {
                    self.out = None;
                }
            }
            Err(error) => {
                self.out = None;
                match self.stage {
                    Stage::Upgrading(_) => self.fail_connect(env, io_reason(&error)),
                    Stage::Open(_) => {
                        env.stats.error(ErrorKind::WriteFailed);
                        self.shut_down();
                    }
                    Stage::Closing { .. } => self.shut_down(),
                    _ => {}
                }
            }
        }
    }

    /// Its timer fired: deadlines of the handshake and the closing handshake. (What the traffic
    /// owes is sent by the [`Conn::sync`] that follows.)
    pub fn on_timer(&mut self, env: &mut Env<'_>) {
        match self.stage {
            Stage::Connecting | Stage::Upgrading(_)
                if env.now >= self.started + HANDSHAKE_TIMEOUT.as_nanos() as u64 =>
            {
                self.fail_connect(env, "timed_out".into());
            }
            Stage::Closing { by, .. } if env.now >= by => self.shut_down(),
            _ => {}
        }
    }

    /// An interruption: a connection still being established gives up (counted as a failed
    /// attempt: it was made and did not complete).
    pub fn interrupt(&mut self, env: &mut Env<'_>) {
        if self.is_connecting() {
            self.fail_connect(env, "interrupted".into());
        }
    }

    /// Turns what the connection wants into backend operations; returns when its timer must next
    /// fire, if ever.
    pub fn sync<B: Backend>(&mut self, env: &mut Env<'_>, backend: &mut B, token: Token) -> Option<u64> {
        if let Stage::Open(compression) = &mut self.stage {
            let traffic = self.traffic.as_mut()?;
            if self.out.is_none() {
                // A TLS connection's `pending` goes back to the pool after each encryption; it
                // borrows a pooled buffer to write into, and returns it if nothing was due.
                let tls = self.tls.is_some();
                if tls && self.pending.capacity() == 0 {
                    self.pending = staging_buffer();
                }
                traffic.fill(env, &mut self.pending, compression);
                if tls && self.pending.is_empty() {
                    recycle(std::mem::take(&mut self.pending));
                }
            }
            if traffic.finished(env) {
                put_close(&mut self.pending);
                self.stage =
                    Stage::Closing { by: env.now + CLOSE_TIMEOUT.as_nanos() as u64, peer_closed: false };
            }
        }
        if let Stage::Closing { peer_closed: true, .. } = self.stage
            && self.out.is_none()
            && self.pending.is_empty()
            && self.tls.as_deref().is_none_or(|session| !session.has_outgoing())
        {
            match self.tls.as_deref_mut() {
                // A clean end of a TLS connection: close_notify first, then the shutdown.
                Some(session)
                    if session.is_established()
                        && !session.has_failed()
                        && !session.close_notify_queued() =>
                {
                    if session.close_notify().is_err() {
                        self.shut_down();
                    }
                }
                _ => self.shut_down(),
            }
        }
        if matches!(self.stage, Stage::Upgrading(_) | Stage::Open(_) | Stage::Closing { .. })
            && self.out.is_none()
        {
            self.transmit(env, backend, token);
        }
        match self.stage {
            Stage::Upgrading(_) | Stage::Open(_) | Stage::Closing { .. } => {
                if !self.recv_on {
                    self.recv_on = true;
                    backend.start_recv(self.fd, token);
                }
            }
            Stage::Shutdown => {
                if self.recv_on && !self.recv_stopping {
                    self.recv_stopping = true;
                    self.recv_on = backend.stop_recv(self.fd, token);
                }
                if !self.recv_on && self.out.is_none() {
                    backend.close(self.fd);
                    self.fd = -1;
                    self.socket_gone(env);
                }
            }
            Stage::Lingering => {
                if self.traffic.as_mut().is_none_or(|traffic| traffic.linger(env)) {
                    self.stage = Stage::Done;
                }
            }
            Stage::Idle | Stage::Connecting | Stage::Done => {}
        }
        self.next_wake(env)
    }

    /// With no send in flight: starts the next one, of what `pending` holds (plain), or of the
    /// ciphertext the TLS session has queued after encrypting what `pending` holds, all of it in
    /// one call (`wss://`, once its handshake is done).
    fn transmit<B: Backend>(&mut self, env: &mut Env<'_>, backend: &mut B, token: Token) {
        let bytes = match self.tls.as_deref_mut() {
            None if self.pending.is_empty() => return,
            None => std::mem::replace(&mut self.pending, staging_buffer()),
            Some(session) => {
                if !self.pending.is_empty()
                    && session.is_established()
                    && !session.has_failed()
                    && !session.close_notify_queued()
                {
                    if let Err(error) = session.encrypt(&self.pending) {
                        return self.tls_failed(env, &error);
                    }
                    // The plaintext is in the records now: its buffer goes back to the pool, and
                    // an idle connection keeps none.
                    recycle(std::mem::take(&mut self.pending));
                }
                match session.take_outgoing() {
                    Some(ciphertext) => ciphertext,
                    None => return,
                }
            }
        };
        let out = self.out.insert(Outgoing::staged(bytes));
        backend.send(self.fd, token, out);
    }

    fn next_wake(&self, env: &Env<'_>) -> Option<u64> {
        match &self.stage {
            Stage::Connecting | Stage::Upgrading(_) => {
                Some(self.started + HANDSHAKE_TIMEOUT.as_nanos() as u64)
            }
            Stage::Open(_) => self.traffic.as_ref()?.next_wake(env, self.out.is_some()),
            Stage::Closing { by, .. } => Some(*by),
            Stage::Lingering => Some(
                (env.now + super::pubsub::CHECK_EVERY.as_nanos() as u64)
                    .min(env.phases.drain_end.max(env.now)),
            ),
            Stage::Idle | Stage::Shutdown | Stage::Done => None,
        }
    }

    /// Ends the connection without the closing handshake: the socket is shut down, which also
    /// ends its receive and any send in flight; [`Conn::sync`] closes it once they have ended.
    fn shut_down(&mut self) {
        if matches!(self.stage, Stage::Shutdown | Stage::Lingering | Stage::Done | Stage::Idle) {
            return;
        }
        // SAFETY: shutdown on a descriptor we own.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        self.pending = Vec::new();
        self.stage = Stage::Shutdown;
    }

    /// The socket is closed: the connection is over, unless a subscriber must still count.
    fn socket_gone(&mut self, env: &mut Env<'_>) {
        if self.established {
            env.stats.counters.open -= 1;
        }
        self.rx.tail = Vec::new();
        // The TLS session (its keys, its unfinished record) goes with the socket.
        self.tls = None;
        let finished = self.traffic.as_mut().is_none_or(|traffic| traffic.ended(env));
        self.stage = if finished { Stage::Done } else { Stage::Lingering };
    }

    /// A connection attempt failed before the handshake completed. During a TLS handshake, the
    /// reason is `tls_<reason>` and it counts as a failed TLS handshake too (an interruption
    /// aside: that failed nothing).
    fn fail_connect(&mut self, env: &mut Env<'_>, mut reason: String) {
        if self.tls.as_deref().is_some_and(|session| !session.is_established() && !session.has_failed())
            && reason != "interrupted"
        {
            env.stats.tls_failed(&reason);
            reason = format!("tls_{reason}");
        }
        let connecting = matches!(self.stage, Stage::Connecting);
        self.connect_failed(env, reason);
        if connecting {
            // A connect in flight cannot be ended by a shutdown; the socket is closed under it
            // (the operation holds its own reference to the socket and its completion, if it
            // ever comes, finds this connection done).
            self.stage = Stage::Shutdown;
            self.recv_on = false;
        } else {
            self.shut_down();
        }
    }

    /// Counts a failed attempt (and, in pubsub mode, settles it).
    fn connect_failed(&mut self, env: &mut Env<'_>, reason: String) {
        env.stats.connect_failed(reason);
        if let (Some(role), Some(shared)) = (self.role, env.pubsub) {
            shared.connected(role, false);
        }
    }
}

/// A socket for `addr` the way `backend` drives sockets, bound to `source` when given (with
/// IP_BIND_ADDRESS_NO_PORT, so the port is chosen at connect time per destination and one address
/// serves more than 64k connections across targets).
fn open_socket<B: Backend>(backend: &B, addr: &SockAddr, source: Option<Ipv4Addr>) -> io::Result<Socket> {
    let target = addr.as_socket().ok_or_else(|| io::Error::other("not an IP address"))?;
    let socket = backend.upstream_socket(target)?;
    if let Some(ip) = source {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        ringgate::io::sockopt::set_int(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
        socket.bind(&SockAddr::from(std::net::SocketAddrV4::new(ip, 0)))?;
    }
    Ok(socket)
}

/// Gives a buffer back to the thread's staging pool (which keeps small ones for the next send).
fn recycle(buffer: Vec<u8>) {
    drop(Outgoing::staged(buffer));
}

fn handshake_reason(error: ClientHandshakeError) -> String {
    match error {
        ClientHandshakeError::Rejected(status) => format!("http_{status}"),
        ClientHandshakeError::Malformed => "malformed_response".into(),
        ClientHandshakeError::NotUpgraded => "not_upgraded".into(),
        ClientHandshakeError::BadAcceptKey => "bad_accept_key".into(),
        ClientHandshakeError::UnexpectedSubprotocol => "unexpected_subprotocol".into(),
        ClientHandshakeError::UnexpectedExtension => "unexpected_extension".into(),
    }
}

/// A short, stable name for a socket error.
pub fn io_reason(error: &io::Error) -> String {
    let name = match error.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused",
        Some(libc::ETIMEDOUT) => "timed_out",
        Some(libc::EADDRNOTAVAIL) => "no_free_port",
        Some(libc::EADDRINUSE) => "address_in_use",
        Some(libc::ECONNRESET) | Some(libc::EPIPE) => "reset",
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => "unreachable",
        Some(libc::EMFILE) | Some(libc::ENFILE) => "out_of_file_descriptors",
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => "out_of_memory",
        Some(code) => return format!("errno_{code}"),
        None => return format!("{:?}", error.kind()).to_lowercase(),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::Conn;

    /// What one connection costs in its thread's table, pinned: the receiver (the protocol
    /// core's assembler, 80 B, and an empty tail), the pending-bytes buffer and the send in flight
    /// (a pooled buffer each, on the heap only while they hold frames), the stage (the handshake's
    /// key while upgrading; once open, how its messages are compressed, which fits beside the key
    /// at no cost: `--deflate`'s own deflater, where the server lets the client keep its context,
    /// is on the heap), the traffic (an open loop's schedule and counters; a closed loop's
    /// window keeps 8 B per message in flight on the heap) and, for `wss://`, the TLS session
    /// (8 B here: it is boxed, on the heap only for TLS connections). 10,000 connections: 3.4 MB
    /// of table.
    #[test]
    fn a_connection_costs_at_most_344_bytes_of_table() {
        let size = std::mem::size_of::<Conn>();
        assert!(size <= 344, "a connection grew to {size} bytes; say where they go and move this bound");
    }

    /// What a `wss://` connection adds on the heap beside the table, pinned: rustls' connection
    /// state (976 bytes inline; its keys and record layer allocate beside it, more while a
    /// handshake runs) and the session's tail and ciphertext buffers, both empty (no allocation)
    /// between reads and sends. 1040 bytes while loadtest had a record layer of its own; 1200
    /// since it uses the gateway's session, whose two ends share one enum (rustls' server state
    /// is 112 bytes larger than the client's) and which keeps the plaintext in flight for the
    /// gateway's machines (48 bytes): 160 bytes per connection (1.6 MB at 10,000) for one
    /// implementation of the record layer instead of two.
    #[test]
    fn a_tls_session_costs_at_most_1200_bytes_beside_the_table() {
        let size = std::mem::size_of::<super::TlsClient>();
        assert!(size <= 1200, "a TLS session grew to {size} bytes; say where they go and move this bound");
    }
}
