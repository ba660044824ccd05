//! One worker: a thread with its own backend (io_uring ring or epoll instance), its own
//! `SO_REUSEPORT` listener per listen address, and a slab of connection state machines. The kernel
//! spreads incoming connections over the workers' listeners, so workers share nothing on the hot
//! path (only relaxed counters).
//!
//! A loop turn: everything the last turn's events changed is turned into operations (sends,
//! receives started or stopped, FINs, connects, closes), the backend submits them and waits for
//! what happens next, each event goes to its connection's machine, then timers, wake-ups and
//! pub/sub deliveries. One `io_uring_enter` per turn on the io_uring backend.
//!
//! A socket is closed only when nothing is in flight on it: a finished connection's socket is shut
//! down (which completes its receive and any send at once), and closed when the last completion
//! arrives; only then is its slot freed, so no completion can outlive what it points to.
//!
//! Must never: panic on a setup failure (the error goes back to the main thread, which exits with
//! a message), block outside the backend's wait, or keep a finished connection's slot.

use std::io;
use std::net::{IpAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use socket2::SockAddr;
use tracing::{debug, info, warn};

use super::backend::{Backend, Event, Received};
use super::clock::{Clock, Millis};
use super::conn::{Cx, Machine};
use super::context::WorkerContext;
use super::driver::slab::Slab;
use super::driver::timer::{self, Wheel};
use super::outgoing::Outgoing;
use super::tls::{self, TlsSession};
use super::token::{Op, Side, Token};
use super::wake::WakeFd;
use crate::gateway::address_limits::AddressTicket;
use crate::gateway::pubsub::Delivery;
use crate::metrics::add;
use crate::tls::TlsFailure;

/// How long to wait before accepting again after running out of file descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The receive is running (until a completion without "more").
const RECV_ARMED: u8 = 1;
/// We asked for the receive to stop; its last completion has not come yet.
const RECV_STOPPING: u8 = 2;
/// The send in `sending` has been handed to the backend.
const SEND_SUBMITTED: u8 = 4;
/// A connect is in flight.
const CONNECTING: u8 = 8;
/// The socket has been shut down both ways (its machine is done with it).
const SHUT: u8 = 16;
/// The socket is closed (`fd` is stale).
const CLOSED: u8 = 32;
/// The kernel ended the receive by itself: starting it again is a re-arm.
const RECV_ENDED: u8 = 64;
/// The receive ended because the buffer ring was empty: it waits its turn in the starved queue,
/// so that a dry ring is not met by every connection re-arming at once.
const STARVED: u8 = 128;

/// No send in flight (the value of [`SocketIo::sending`]).
const NO_SEND: u32 = u32::MAX;

/// The I/O state of one socket of a connection: 12 bytes, whatever is being sent (that lives in
/// the worker's [`Sends`], so an idle connection does not carry room for it).
struct SocketIo {
    fd: RawFd,
    flags: u8,
    /// Where in the worker's [`Sends`] the bytes being sent are (or wait to be handed over after
    /// a short write); [`NO_SEND`] when nothing is.
    sending: u32,
}

impl SocketIo {
    fn new(fd: RawFd) -> SocketIo {
        SocketIo { fd, flags: 0, sending: NO_SEND }
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    fn is_sending(&self) -> bool {
        self.sending != NO_SEND
    }

    fn busy(&self) -> bool {
        self.has(RECV_ARMED) || self.has(CONNECTING) || self.is_sending() && self.has(SEND_SUBMITTED)
    }
}

/// The bytes of every send in flight on a worker, by index: a busy connection holds one entry, an
/// idle one none. An `Outgoing` stays at its index, unmoved, until its send completes (the
/// backend may point into it until then).
#[derive(Default)]
struct Sends {
    entries: Vec<Option<Outgoing>>,
    free: Vec<u32>,
}

impl Sends {
    fn put(&mut self, out: Outgoing) -> u32 {
        if let Some(index) = self.free.pop() {
            self.entries[index as usize] = Some(out);
            return index;
        }
        self.entries.push(Some(out));
        (self.entries.len() - 1) as u32
    }

    fn get_mut(&mut self, index: u32) -> Option<&mut Outgoing> {
        self.entries.get_mut(index as usize).and_then(Option::as_mut)
    }

    fn take(&mut self, index: u32) -> Option<Outgoing> {
        let out = self.entries.get_mut(index as usize)?.take()?;
        self.free.push(index);
        if self.free.len() == self.entries.len() && self.entries.len() > 1024 {
            // Everything is back after a burst: give the table's memory back too.
            *self = Sends::default();
        }
        Some(out)
    }
}

/// A proxied connection's upstream socket, with the address its connect points to, and its TLS
/// session for a wss:// upstream.
struct UpstreamIo {
    io: SocketIo,
    addr: SockAddr,
    tls: Option<TlsSession>,
}

/// What only some connections have, boxed together so that a plain connection pays one null
/// pointer for all of it: a proxied connection's upstream socket, a TLS client's record layer.
/// The box also keeps the upstream's address where it is while a connect reads it.
#[derive(Default)]
struct Extra {
    upstream: Option<UpstreamIo>,
    tls: Option<TlsSession>,
}

/// The TLS session on `side`, if that socket speaks TLS (field-level, so that the machine can be
/// borrowed beside it).
fn side_tls(extra: &mut Option<Box<Extra>>, side: Side) -> Option<&mut TlsSession> {
    let extra = extra.as_deref_mut()?;
    match side {
        Side::Client => extra.tls.as_mut(),
        Side::Upstream => extra.upstream.as_mut()?.tls.as_mut(),
    }
}

/// Whether the client side of a connection speaks TLS (what `X-Forwarded-Proto` says upstream).
fn client_is_tls(extra: &Option<Box<Extra>>) -> bool {
    extra.as_deref().is_some_and(|extra| extra.tls.is_some())
}

/// One slot of the slab: a connection's machine and its sockets.
struct Entry {
    machine: Machine,
    client: SocketIo,
    /// The upstream and the TLS session, when the connection has either (8 bytes, null if not).
    extra: Option<Box<Extra>>,
    /// The deadline the timer wheel holds an entry for.
    scheduled: Option<Millis>,
    /// The connection's claim on its address's slot (`--max-conns-per-ip`), given back when it
    /// closes. 4 bytes that the entry's alignment left unused.
    address: Option<AddressTicket>,
}

impl Entry {
    fn upstream(&self) -> Option<&UpstreamIo> {
        self.extra.as_deref()?.upstream.as_ref()
    }

    fn upstream_mut(&mut self) -> Option<&mut UpstreamIo> {
        self.extra.as_deref_mut()?.upstream.as_mut()
    }

    /// Puts in (or takes out) the upstream socket; the box goes when nothing is left in it.
    fn set_upstream(&mut self, upstream: Option<UpstreamIo>) {
        match upstream {
            Some(upstream) => self.extra.get_or_insert_with(Box::default).upstream = Some(upstream),
            None => {
                if let Some(extra) = self.extra.as_deref_mut() {
                    extra.upstream = None;
                    if extra.tls.is_none() {
                        self.extra = None;
                    }
                }
            }
        }
    }

    fn socket(&mut self, side: Side) -> Option<&mut SocketIo> {
        match side {
            Side::Client => Some(&mut self.client),
            Side::Upstream => self.upstream_mut().map(|u| &mut u.io),
        }
    }
}

/// Everything a worker thread needs, built on the main thread (`WorkerContext` itself is `!Send`,
/// being per-thread, so the thread assembles it).
pub struct WorkerSetup {
    /// The worker's number, for thread names and logs.
    pub index: usize,
    /// Bound, listening sockets: one per `--listen` address.
    pub listeners: Vec<TcpListener>,
    /// Builds the worker's context on its own thread.
    pub context: Box<dyn FnOnce(&'static str) -> WorkerContext + Send>,
    /// Becomes `true` when the gateway starts draining (and the worker is woken).
    pub drain: Arc<AtomicBool>,
    /// Pub/sub messages other workers hand to this one.
    pub deliveries: mpsc::Receiver<Delivery>,
    /// This worker's wake-up descriptor.
    pub wake: Arc<WakeFd>,
}

/// The loop's state apart from the backend (so that the backend can lend buffers to it).
struct State {
    index: usize,
    ctx: WorkerContext,
    clock: Clock,
    now: Millis,
    slab: Slab<Entry>,
    wheel: Wheel,
    /// Entries touched this turn, to be turned into operations.
    dirty: Vec<(u32, u32)>,
    /// TLS: the plaintext of one read, or of one turn's sends, gathered for a call (lent, never
    /// kept by a connection).
    plaintext: Vec<u8>,
    /// Sockets accepted this turn, with their listener's index, to be admitted.
    accepted: Vec<(RawFd, usize)>,
    listeners: Vec<TcpListener>,
    /// Per listener: when to start accepting again (after an error), if it is stopped.
    accept_restart: Vec<Option<Millis>>,
    last_accept_warning: Option<Millis>,
    woken: bool,
    drain: Arc<AtomicBool>,
    drain_seen: bool,
    done_sent: bool,
    deliveries: mpsc::Receiver<Delivery>,
    wake: Arc<WakeFd>,
    /// Owners the broker queued frames for.
    ready: Vec<u64>,
    due: Vec<timer::Entry>,
    rearms: u64,
    sends: Sends,
    /// Sockets whose receive stopped on an empty buffer ring, oldest first; a few are started again
    /// each turn (as many as the ring can serve), the data waiting in their sockets meanwhile.
    starved: std::collections::VecDeque<Token>,
}

/// Runs a worker on `backend` until the process exits. Reports on `done` once it has drained.
pub fn run<B: Backend>(mut backend: B, setup: WorkerSetup, done: mpsc::Sender<usize>) {
    let mut state = State::new(&mut backend, setup);
    loop {
        state.turn(&mut backend, &done);
    }
}

/// The token that names a connection as a whole (its client socket): what pub/sub wake-ups and
/// the state machines' `owner` carry.
fn owner_token(slot: u32, generation: u32) -> Token {
    Token::new(slot, generation, Side::Client, Op::Recv)
}

/// The IP address of the peer of a connected socket (`getpeername(2)`), for `X-Forwarded-For`.
fn peer_ip(fd: RawFd) -> Option<IpAddr> {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is an open socket owned by the connection; ManuallyDrop keeps this temporary
    // std handle from closing it.
    let socket = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    socket.peer_addr().ok().map(|addr| addr.ip())
}

/// Returns the allocator's free memory at the top of its heaps to the system (glibc keeps it
/// otherwise, and RSS would stay at the high-water mark of the largest burst).
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn set_nodelay(fd: RawFd) {
    // Best effort: a socket without it still works, only with Nagle's delays.
    let _ = super::sockopt::set_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
}

fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: shutdown(2) on a descriptor we own has no memory-safety requirements.
    unsafe { libc::shutdown(fd, how) };
}

impl State {
    /// A worker's state, accepting on its listeners.
    fn new<B: Backend>(backend: &mut B, setup: WorkerSetup) -> State {
        let ctx = (setup.context)(backend.name());
        let listeners = setup.listeners;
        for (index, listener) in listeners.iter().enumerate() {
            backend.accept(index, listener.as_raw_fd());
        }
        let clock = Clock::default();
        State {
            index: setup.index,
            ctx,
            now: clock.now(),
            clock,
            slab: Slab::default(),
            wheel: Wheel::default(),
            dirty: Vec::new(),
            accepted: Vec::new(),
            accept_restart: vec![None; listeners.len()],
            listeners,
            last_accept_warning: None,
            woken: false,
            drain: setup.drain,
            drain_seen: false,
            done_sent: false,
            deliveries: setup.deliveries,
            wake: setup.wake,
            ready: Vec::new(),
            due: Vec::new(),
            rearms: 0,
            sends: Sends::default(),
            starved: std::collections::VecDeque::new(),
            plaintext: Vec::new(),
        }
    }

    /// One loop turn: operations out, events in, then timers, wake-ups and deliveries.
    fn turn<B: Backend>(&mut self, backend: &mut B, done: &mpsc::Sender<usize>) {
        self.flush(backend);
        // Checked after the flush, which is where finished connections leave.
        if self.drain_seen && !self.done_sent && self.drained() {
            self.done_sent = true;
            let _ = done.send(self.index);
        }
        let timeout = self.timeout();
        // The events of this turn happened after the wait, which may have lasted until the next
        // timer: the clock is read again at the first of them, or a read after a long quiet spell
        // would be stamped with the time before it (an idle deadline early by the whole wait, a
        // rate bucket not refilled for it).
        let mut stamped = false;
        let waited = backend.wait(timeout, &mut |event| {
            if !std::mem::replace(&mut stamped, true) {
                self.now = self.clock.now();
            }
            self.on_event(event);
        });
        if let Err(error) = waited {
            warn!(%error, worker = self.index, "waiting for I/O failed; retrying");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.now = self.clock.now();
        self.admit_accepted(backend);
        self.restart_accepting(backend);
        self.on_wake();
        self.expire_timers();
        self.feed_starved(backend.rearm_budget());
        self.collect_ready();
        self.publish_counters(backend);
    }

    fn cx<'a>(
        ctx: &'a WorkerContext,
        now: Millis,
        owner: Token,
        peer: &'a dyn Fn() -> Option<IpAddr>,
        secure: bool,
    ) -> Cx<'a> {
        Cx { ctx, now, owner: owner.0, peer_ip: peer, secure }
    }

    /// How long the backend may wait: until the next deadline or accept restart.
    fn timeout(&self) -> Option<Duration> {
        if !self.dirty.is_empty() || !self.ready.is_empty() {
            return Some(Duration::ZERO);
        }
        let timer = self.wheel.next_wake(self.now);
        let restart = self.accept_restart.iter().flatten().map(|at| self.now.until(*at)).min();
        match (timer, restart) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_event(&mut self, event: Event<'_>) {
        // The drain flag is looked at before every event, not only when the wake-up arrives: a
        // request that reaches this worker after draining began elsewhere (the wake-up may come
        // later in the same batch) must already be answered as draining.
        if !self.drain_seen && self.drain.load(Ordering::Acquire) {
            self.start_draining();
        }
        match event {
            Event::Recv { token, received, more, .. } => self.on_recv(token, received, more),
            Event::Sent { token, result } => self.on_sent(token, result),
            Event::Connected { token, result } => self.on_connected(token, result),
            Event::Accepted { listener, result, more } => self.on_accepted(listener, result, more),
            Event::Woken => self.woken = true,
        }
    }

    fn on_recv(&mut self, token: Token, received: Received<'_>, more: bool) {
        let (slot, generation) = (token.slot(), token.generation());
        let Some(entry) = self.slab.get_mut(slot, generation) else { return };
        let side = token.side();
        let Some(io) = entry.socket(side) else { return };
        if !more {
            if !io.has(RECV_STOPPING) && matches!(received, Received::Stopped | Received::Data(_)) {
                io.flags |= RECV_ENDED;
                if matches!(received, Received::Stopped) && !io.has(STARVED) {
                    io.flags |= STARVED;
                    self.starved.push_back(token);
                }
            }
            io.flags &= !(RECV_ARMED | RECV_STOPPING);
        }
        let fd = entry.client.fd;
        let peer = move || peer_ip(fd);
        let secure = client_is_tls(&entry.extra);
        let cx = Self::cx(&self.ctx, self.now, token, &peer, secure);
        let tls = side_tls(&mut entry.extra, side);
        match (received, tls) {
            (Received::Data(data), Some(tls)) => {
                tls_receive(tls, side, data, &mut entry.machine, &mut self.plaintext, &cx);
            }
            (Received::Data(data), None) => entry.machine.handle_data(side, data, &cx),
            (Received::Eof, tls) => {
                if let Some(tls) = tls
                    && !tls.is_established()
                    && tls.mark_failed()
                    && side == Side::Client
                {
                    self.ctx.stats.tls_failed(TlsFailure::Disconnected);
                }
                entry.machine.handle_eof(side, &cx);
            }
            (Received::Stopped, _) => {}
            (Received::Error(error), tls) => {
                if let Some(tls) = tls
                    && !tls.is_established()
                    && tls.mark_failed()
                    && side == Side::Client
                {
                    self.ctx.stats.tls_failed(TlsFailure::Disconnected);
                }
                entry.machine.handle_error(side, &error, &cx);
            }
        }
        self.dirty.push((slot, generation));
    }

    fn on_sent(&mut self, token: Token, result: io::Result<usize>) {
        let (slot, generation) = (token.slot(), token.generation());
        let Some(entry) = self.slab.get_mut(slot, generation) else { return };
        let side = token.side();
        let Some(io) = entry.socket(side) else { return };
        let Some(out) = self.sends.take(io.sending) else { return };
        io.sending = NO_SEND;
        io.flags &= !SEND_SUBMITTED;
        let fd = entry.client.fd;
        let peer = move || peer_ip(fd);
        let secure = client_is_tls(&entry.extra);
        let cx = Self::cx(&self.ctx, self.now, token, &peer, secure);
        let rest = match side_tls(&mut entry.extra, side) {
            // Ciphertext: the machine hears about its plaintext once all of it is written.
            Some(tls) => tls_sent(tls, side, result, out, &mut entry.machine, &cx),
            None => entry.machine.handle_sent(side, result, out, &cx),
        };
        if let Some(rest) = rest {
            let index = self.sends.put(rest);
            if let Some(io) = entry.socket(side) {
                io.sending = index;
            }
        }
        self.dirty.push((slot, generation));
    }

    fn on_connected(&mut self, token: Token, result: io::Result<()>) {
        let (slot, generation) = (token.slot(), token.generation());
        let Some(entry) = self.slab.get_mut(slot, generation) else { return };
        let Some(upstream) = entry.upstream_mut() else { return };
        upstream.io.flags &= !CONNECTING;
        if result.is_err() {
            // A failed socket cannot be connected again: it goes, and a retry gets a new one.
            upstream.io.flags |= SHUT;
        }
        let fd = entry.client.fd;
        let peer = move || peer_ip(fd);
        let secure = client_is_tls(&entry.extra);
        let cx = Self::cx(&self.ctx, self.now, token, &peer, secure);
        entry.machine.handle_connected(result, &cx);
        self.dirty.push((slot, generation));
    }

    fn on_accepted(&mut self, listener: usize, result: io::Result<RawFd>, more: bool) {
        match result {
            Ok(fd) => self.accepted.push((fd, listener)),
            Err(error) => {
                let exhausted = matches!(
                    error.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                if exhausted {
                    let quiet = self
                        .last_accept_warning
                        .is_some_and(|at| at.until(self.now) < Duration::from_secs(1));
                    if !quiet {
                        warn!(%error, "accept failed: out of file descriptors or memory; backing off \
                               (raise the open-file limit or lower --max-conns)");
                        self.last_accept_warning = Some(self.now);
                    }
                } else if !self.drain_seen {
                    debug!(%error, "accept failed");
                }
            }
        }
        if !more
            && !self.drain_seen
            && let Some(restart) = self.accept_restart.get_mut(listener)
        {
            *restart = Some(self.now.after(ACCEPT_BACKOFF));
        }
    }

    fn restart_accepting<B: Backend>(&mut self, backend: &mut B) {
        for (index, restart) in self.accept_restart.iter_mut().enumerate() {
            if restart.is_some_and(|at| at.is_at_or_before(self.now)) {
                *restart = None;
                if !self.drain_seen {
                    self.rearms += 1;
                    backend.accept(index, self.listeners[index].as_raw_fd());
                }
            }
        }
    }

    /// Starts serving the sockets accepted this turn, or refusing them when the gateway is full.
    fn admit_accepted<B: Backend>(&mut self, backend: &mut B) {
        for (fd, listener) in std::mem::take(&mut self.accepted) {
            let ctx = &self.ctx;
            if self.drain_seen {
                backend.close(fd); // accepted in the last instant: we are draining
                continue;
            }
            let open_before = ctx.open_connections.fetch_add(1, Ordering::Relaxed);
            add(&ctx.stats.connections_accepted, 1);
            add(&ctx.stats.connections_open, 1);
            // Echo and request/response traffic want each message on the wire now, not batched.
            set_nodelay(fd);
            let peer = || None;
            let cx = Self::cx(ctx, self.now, Token(0), &peer, false);
            let mut address = None;
            let tls = ctx.listener_tls.get(listener).and_then(Option::as_ref);
            let (machine, refused) = if open_before >= ctx.max_conns {
                add(&ctx.stats.connections_rejected, 1);
                (Machine::over_capacity(&cx), true)
            } else if let Some(limits) = &ctx.address_limits
                && let Some(ip) = peer_ip(fd)
            {
                match limits.admit(ip, limits.now_ms()) {
                    Ok(ticket) => {
                        address = ticket;
                        (Machine::accepted(&cx), false)
                    }
                    Err(refusal) => {
                        ctx.stats.address_refused(refusal);
                        (Machine::over_address_limit(refusal, &cx), true)
                    }
                }
            } else {
                (Machine::accepted(&cx), false)
            };
            let extra = match tls {
                // A refusal on a TLS listener is a close: answering it would cost a handshake.
                Some(_) if refused => {
                    backend.close(fd);
                    self.forget_connection(address);
                    continue;
                }
                Some(terminator) => match TlsSession::new(terminator.config()) {
                    Ok(session) => Some(Box::new(Extra { upstream: None, tls: Some(session) })),
                    Err(error) => {
                        warn!(%error, "cannot start a TLS session");
                        backend.close(fd);
                        self.forget_connection(address);
                        continue;
                    }
                },
                None => None,
            };
            let entry = Entry { machine, client: SocketIo::new(fd), extra, scheduled: None, address };
            let (slot, generation) = self.slab.insert(entry);
            if let Err(error) = backend.attach(fd, owner_token(slot, generation)) {
                warn!(%error, "cannot watch an accepted socket");
                let address = self.slab.remove(slot, generation).and_then(|entry| entry.address);
                backend.close(fd);
                self.forget_connection(address);
                continue;
            }
            self.dirty.push((slot, generation));
        }
    }

    /// A connection left the slab: it no longer counts against `--max-conns`, nor against its
    /// address's `--max-conns-per-ip`.
    fn forget_connection(&self, address: Option<AddressTicket>) {
        if let (Some(ticket), Some(limits)) = (address, &self.ctx.address_limits) {
            limits.release(ticket, limits.now_ms());
        }
        self.ctx.open_connections.fetch_sub(1, Ordering::Relaxed);
        self.ctx.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Wake-ups from other threads: drain, and pub/sub hand-offs.
    fn on_wake(&mut self) {
        if !std::mem::take(&mut self.woken) {
            return;
        }
        self.wake.clear();
        if !self.drain_seen && self.drain.load(Ordering::Acquire) {
            self.start_draining();
        }
        while let Ok(delivery) = self.deliveries.try_recv() {
            self.ctx.broker.deliver(&delivery);
        }
    }

    fn start_draining(&mut self) {
        self.drain_seen = true;
        self.ctx.draining.set(true);
        for restart in &mut self.accept_restart {
            *restart = None;
        }
        // Stop accepting: shutting the listeners down ends their pending accepts.
        for listener in &self.listeners {
            shutdown(listener.as_raw_fd(), libc::SHUT_RDWR);
        }
        for (slot, generation) in self.slab.keys() {
            let Some(entry) = self.slab.get_mut(slot, generation) else { continue };
            let fd = entry.client.fd;
            let peer = move || peer_ip(fd);
            let token = owner_token(slot, generation);
            let secure = client_is_tls(&entry.extra);
            let cx = Self::cx(&self.ctx, self.now, token, &peer, secure);
            entry.machine.handle_drain(&cx);
            self.dirty.push((slot, generation));
        }
        info!(worker = self.index, connections = self.slab.len(), "draining");
    }

    /// Whether every connection that draining waits for has closed (idle keep-alive connections
    /// are not waited for).
    fn drained(&self) -> bool {
        self.ctx.stats.connections_open.load(Ordering::Relaxed) <= self.ctx.keepalive_connections.get()
    }

    fn expire_timers(&mut self) {
        let mut due = std::mem::take(&mut self.due);
        self.wheel.expire(self.now, &mut due);
        for fired in due.drain(..) {
            let (slot, generation) = fired.key;
            let Some(entry) = self.slab.get_mut(slot, generation) else { continue };
            if entry.scheduled != Some(fired.at) {
                continue; // stale: an earlier deadline replaced it
            }
            entry.scheduled = None;
            let fd = entry.client.fd;
            let peer = move || peer_ip(fd);
            let token = owner_token(slot, generation);
            let secure = client_is_tls(&entry.extra);
            let cx = Self::cx(&self.ctx, self.now, token, &peer, secure);
            if entry.machine.deadline(&cx).is_at_or_before(self.now) {
                entry.machine.handle_timer(&cx);
            }
            // Either way the entry is looked at again: a later deadline gets scheduled.
            self.dirty.push((slot, generation));
        }
        self.due = due;
    }

    /// Lets up to `budget` starved receives start again, oldest first.
    fn feed_starved(&mut self, budget: usize) {
        for _ in 0..budget {
            let Some(token) = self.starved.pop_front() else { break };
            let (slot, generation) = (token.slot(), token.generation());
            let Some(entry) = self.slab.get_mut(slot, generation) else { continue };
            if let Some(io) = entry.socket(token.side()) {
                io.flags &= !STARVED;
                self.dirty.push((slot, generation));
            }
        }
    }

    /// Connections the broker queued frames for.
    fn collect_ready(&mut self) {
        self.ctx.broker.take_ready(&mut self.ready);
        for owner in self.ready.drain(..) {
            let token = Token(owner);
            self.dirty.push((token.slot(), token.generation()));
        }
    }

    fn publish_counters<B: Backend>(&self, backend: &B) {
        let counters = backend.counters();
        let io = &self.ctx.stats.io;
        io.buffer_ring_empty.store(counters.buffer_ring_empty, Ordering::Relaxed);
        io.cq_overflows.store(counters.cq_overflows, Ordering::Relaxed);
        io.multishot_rearms.store(counters.multishot_rearms + self.rearms, Ordering::Relaxed);
        io.events.store(counters.events, Ordering::Relaxed);
        io.turns.store(counters.turns, Ordering::Relaxed);
    }

    /// Turns what this turn's events changed into operations.
    fn flush<B: Backend>(&mut self, backend: &mut B) {
        while !self.dirty.is_empty() {
            let mut dirty = std::mem::take(&mut self.dirty);
            dirty.sort_unstable();
            dirty.dedup();
            for &(slot, generation) in &dirty {
                self.sync(backend, slot, generation);
            }
            dirty.clear();
            if self.dirty.is_empty() {
                self.dirty = dirty;
            }
            // Publishing in `sync` (a pub/sub message from a connection's early bytes) may have
            // queued frames for other connections.
            self.collect_ready();
        }
        // A burst has closed: give its memory back to the system, not only to the allocator.
        if self.slab.is_mostly_free() && self.slab.shrink() >= 256 {
            release_free_memory();
        }
    }

    /// Brings one connection's sockets in line with what its machine wants.
    fn sync<B: Backend>(&mut self, backend: &mut B, slot: u32, generation: u32) {
        let now = self.now;
        let ctx = &self.ctx;
        let Some(entry) = self.slab.get_mut(slot, generation) else { return };
        let token = owner_token(slot, generation);
        let fd = entry.client.fd;
        let peer = move || peer_ip(fd);
        let secure = client_is_tls(&entry.extra);
        let cx = Self::cx(ctx, now, token, &peer, secure);
        entry.machine.settle(&cx);

        // An upstream to connect: a failed socket goes first, then a fresh one is connected.
        for _ in 0..3 {
            if let Some(upstream) = entry.upstream()
                && upstream.io.has(SHUT)
                && !upstream.io.busy()
            {
                if !upstream.io.has(CLOSED) {
                    backend.close(upstream.io.fd);
                }
                entry.set_upstream(None);
            }
            if entry.upstream().is_some() {
                break;
            }
            let Some((addr, tls_name)) = entry.machine.poll_connect(&cx) else { break };
            // wss://: the session (and its ClientHello) is ready before the connect finishes.
            let tls = match (tls_name, &ctx.upstream_tls) {
                (None, _) => Ok(None),
                (Some(name), Some(config)) => rustls::pki_types::ServerName::try_from(name.to_string())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
                    .and_then(|name| {
                        TlsSession::client(Arc::clone(config), name).map_err(io::Error::other).map(Some)
                    }),
                (Some(_), None) => Err(io::Error::other("no TLS client configuration for wss:// upstreams")),
            };
            let tls = match tls {
                Ok(tls) => tls,
                Err(error) => {
                    entry.machine.handle_connected(Err(error), &cx);
                    continue;
                }
            };
            let up_token = Token::new(slot, generation, Side::Upstream, Op::Connect);
            let socket = backend.upstream_socket(addr).and_then(|socket| {
                use std::os::fd::IntoRawFd;
                let fd = socket.into_raw_fd();
                match backend.attach(fd, up_token) {
                    Ok(()) => Ok(fd),
                    Err(error) => {
                        backend.close(fd);
                        Err(error)
                    }
                }
            });
            match socket {
                Ok(up_fd) => {
                    let mut upstream =
                        UpstreamIo { io: SocketIo::new(up_fd), addr: SockAddr::from(addr), tls };
                    upstream.io.flags |= CONNECTING;
                    entry.set_upstream(Some(upstream));
                    // The address is read where it now stays: in the entry's box.
                    if let Some(upstream) = entry.upstream() {
                        backend.connect(up_fd, up_token, &upstream.addr);
                    }
                }
                Err(error) => entry.machine.handle_connected(Err(error), &cx),
            }
        }

        for side in Side::BOTH {
            let done = entry.machine.is_side_done(side);
            let wants_read = !done && entry.machine.wants_read(side, &cx);
            let Some(io) = entry.socket(side) else { continue };
            if io.has(CLOSED) {
                continue;
            }
            let sock_token = Token::new(slot, generation, side, Op::Recv);
            // Sends: at most one in flight; a short write's rest goes before anything new.
            if !done && !io.has(CONNECTING) && !io.has(SHUT) {
                if io.is_sending() {
                    if !io.has(SEND_SUBMITTED)
                        && let Some(out) = self.sends.get_mut(io.sending)
                    {
                        backend.send(io.fd, sock_token, out);
                        io.flags |= SEND_SUBMITTED;
                    }
                } else if let Some(tls) = side_tls(&mut entry.extra, side) {
                    let next = tls_transmit(tls, side, &mut entry.machine, &mut self.plaintext, &cx);
                    let io = entry.socket(side).expect("the socket exists");
                    match next {
                        TlsNext::Send(cipher) => {
                            let index = self.sends.put(cipher);
                            if let Some(out) = self.sends.get_mut(index) {
                                backend.send(io.fd, sock_token, out);
                            }
                            io.sending = index;
                            io.flags |= SEND_SUBMITTED;
                        }
                        TlsNext::Fin => shutdown(io.fd, libc::SHUT_WR),
                        TlsNext::Fail => {
                            let error = io::Error::new(io::ErrorKind::InvalidData, "TLS session failed");
                            entry.machine.handle_error(side, &error, &cx);
                        }
                        TlsNext::Idle => {}
                    }
                } else if let Some(out) = entry.machine.poll_transmit(side, &cx) {
                    let index = self.sends.put(out);
                    let io = entry.socket(side).expect("the socket exists");
                    if let Some(out) = self.sends.get_mut(index) {
                        backend.send(io.fd, sock_token, out);
                    }
                    io.sending = index;
                    io.flags |= SEND_SUBMITTED;
                } else if entry.machine.poll_fin(side, &cx) {
                    let io = entry.socket(side).expect("the socket exists");
                    shutdown(io.fd, libc::SHUT_WR);
                }
            }
            let done = entry.machine.is_side_done(side);
            let Some(io) = entry.socket(side) else { continue };
            // Receives: started when wanted, stopped when not (backpressure, or done).
            if wants_read && !done && !io.has(RECV_ARMED | CONNECTING | SHUT | STARVED) {
                if io.has(RECV_ENDED) {
                    self.rearms += 1;
                }
                io.flags = (io.flags | RECV_ARMED) & !RECV_ENDED;
                backend.start_recv(io.fd, sock_token);
            } else if (!wants_read || done) && io.has(RECV_ARMED) && !io.has(RECV_STOPPING) {
                if backend.stop_recv(io.fd, sock_token) {
                    io.flags |= RECV_STOPPING;
                } else {
                    io.flags &= !RECV_ARMED;
                }
            }
            // Finished with: shut down (completing what is in flight), closed once nothing is.
            if done {
                if !io.has(SHUT) {
                    io.flags |= SHUT;
                    shutdown(io.fd, libc::SHUT_RDWR);
                }
                if !io.busy() {
                    backend.close(io.fd);
                    io.flags |= CLOSED;
                    // A rest never handed over leaves with the connection (its machine takes its
                    // bytes off the queue gauge when it finishes).
                    self.sends.take(std::mem::replace(&mut io.sending, NO_SEND));
                }
            }
        }

        let upstream_closed = entry.upstream().is_none_or(|u| u.io.has(CLOSED));
        if entry.machine.is_done() && entry.client.has(CLOSED) && upstream_closed {
            entry.machine.finish(&cx);
            if let Some(tls) = entry.extra.as_deref_mut().and_then(|extra| extra.tls.as_mut())
                && !tls.is_established()
                && tls.mark_failed()
            {
                // Closed before the handshake finished, with no error or disconnect seen: the
                // handshake timeout closed it (or draining did).
                ctx.stats.tls_failed(TlsFailure::Timeout);
            }
            let address = self.slab.remove(slot, generation).and_then(|entry| entry.address);
            self.forget_connection(address);
            return;
        }
        let deadline = entry.machine.deadline(&cx);
        if entry.scheduled.is_none_or(|at| !at.is_at_or_before(deadline)) {
            entry.scheduled = Some(deadline);
            self.wheel.schedule((slot, generation), deadline);
        }
    }
}

/// The scratch buffer is kept up to this size between calls (a 16 KiB record and change).
const PLAINTEXT_KEPT: usize = 64 * 1024;

/// Ciphertext arrived on a TLS socket: decrypted, its plaintext handed to the machine. The TLS
/// counters are about clients (an upstream's TLS failing shows as that upstream failing).
fn tls_receive(
    tls: &mut TlsSession,
    side: Side,
    data: &mut [u8],
    machine: &mut Machine,
    plaintext: &mut Vec<u8>,
    cx: &Cx<'_>,
) {
    let stats = &cx.ctx.stats;
    let clients = side == Side::Client;
    if clients {
        add(&stats.tls_bytes_in, data.len() as u64);
    }
    if tls.closing_on_error {
        return;
    }
    match tls.receive(data, plaintext) {
        Ok((received, established_now)) => {
            if clients
                && established_now
                && let Some((_, suite)) = tls.negotiated()
            {
                stats.tls_established(crate::tls::suite_slot(suite));
            }
            if !plaintext.is_empty() {
                machine.handle_data(side, plaintext, cx);
            }
            if received == tls::Received::PeerClosed {
                machine.handle_eof(side, cx);
            }
        }
        Err(error) => {
            debug!(%error, ?side, "TLS error");
            if !tls.is_established() && tls.mark_failed() && clients {
                stats.tls_failed(TlsFailure::of(&error));
            }
            // The alert goes out first (`tls_transmit`), then the connection closes.
            tls.closing_on_error = true;
        }
    }
    if plaintext.capacity() > PLAINTEXT_KEPT {
        *plaintext = Vec::new();
    }
}

/// What a TLS client socket does next.
enum TlsNext {
    /// Send this ciphertext.
    Send(Outgoing),
    /// close_notify is written: send the FIN.
    Fin,
    /// The session failed and its alert is written: close the connection.
    Fail,
    /// Nothing for now.
    Idle,
}

/// What a TLS socket does next: ciphertext already queued (handshake, alerts) goes first, else
/// the machine's next send, encrypted in one go; then the FIN after close_notify, or the close
/// after a failure's alert.
fn tls_transmit(
    tls: &mut TlsSession,
    side: Side,
    machine: &mut Machine,
    plaintext: &mut Vec<u8>,
    cx: &Cx<'_>,
) -> TlsNext {
    if tls.closing_on_error {
        return match tls.take_outgoing() {
            Some(alert) => TlsNext::Send(Outgoing::staged(alert)),
            None => TlsNext::Fail,
        };
    }
    if tls.in_flight.is_none() && !tls.has_outgoing() && tls.is_established() && !tls.fin_pending {
        if let Some(out) = machine.poll_transmit(side, cx) {
            let contiguous = out.remaining();
            let encrypted = if contiguous.len() == out.len() {
                tls.encrypt(contiguous)
            } else {
                plaintext.clear();
                out.for_each_remaining(|bytes| plaintext.extend_from_slice(bytes));
                tls.encrypt(plaintext)
            };
            match encrypted {
                Ok(()) => tls.in_flight = Some(out),
                Err(error) => {
                    debug!(%error, "TLS encryption failed");
                    // Not written: the machine hears so, as of a failed send.
                    let _ = machine.handle_sent(side, Err(io::Error::other(error)), out, cx);
                }
            }
            if plaintext.capacity() > PLAINTEXT_KEPT {
                *plaintext = Vec::new();
            }
        } else if machine.poll_fin(side, cx) {
            if tls.close_notify().is_err() {
                return TlsNext::Fin;
            }
            tls.fin_pending = true;
        }
    }
    if let Some(cipher) = tls.take_outgoing() {
        return TlsNext::Send(Outgoing::staged(cipher));
    }
    if tls.fin_pending && tls.in_flight.is_none() {
        tls.fin_pending = false;
        return TlsNext::Fin;
    }
    TlsNext::Idle
}

/// A send of ciphertext finished: its rest goes first; once all of it is written, the machine is
/// told its plaintext was sent (or that the send failed).
fn tls_sent(
    tls: &mut TlsSession,
    side: Side,
    result: io::Result<usize>,
    mut cipher: Outgoing,
    machine: &mut Machine,
    cx: &Cx<'_>,
) -> Option<Outgoing> {
    match result {
        Ok(written) => {
            if side == Side::Client {
                add(&cx.ctx.stats.tls_bytes_out, written as u64);
            }
            cipher.advance(written);
            if !cipher.is_empty() {
                return Some(cipher);
            }
            if let Some(plain) = tls.in_flight.take() {
                let len = plain.len();
                // All of it was written: the machine has no rest to give back.
                let _ = machine.handle_sent(side, Ok(len), plain, cx);
            }
            None
        }
        Err(error) => {
            match tls.in_flight.take() {
                Some(plain) => {
                    let _ = machine.handle_sent(side, Err(error), plain, cx);
                }
                None => machine.handle_error(side, &error, cx),
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::driver::{Setup, UringBackend};
    use crate::io::epoll::EpollBackend;
    use std::io::{Read, Write};

    /// The slab holds one `Entry` per connection: with the client machine inside, this is the
    /// bulk of an idle connection's memory (the budget is 320 bytes in all, allocator and slab
    /// growth included). Where the bytes go beyond the machine: the client socket's descriptor,
    /// flags and the index of its send in flight (12 bytes; the bytes being sent live in the
    /// worker's `Sends`, only while they are), the boxed upstream pointer (8 bytes, null unless
    /// proxied) and the scheduled deadline (8 bytes). Inside the machine's assembler, 8 bytes
    /// point to the connection's permessage-deflate inflate state: null unless a compressed message
    /// is being inflated (216 -> 224 bytes in the session that added it); the client machine's
    /// 16-byte send-side agreement (window, mode, and dedicated mode's compressor pointer, null
    /// until used) took it to 240; a JWT's expiry and publish permission to 248. The address
    /// ticket of `--max-conns-per-ip` (4 bytes) took padding the entry had anyway.
    #[test]
    fn an_entry_fits_the_idle_memory_budget() {
        assert_eq!(std::mem::size_of::<SocketIo>(), 12);
        let size = std::mem::size_of::<Entry>();
        assert!(size <= 248, "a connection's slab entry grew to {size} bytes");
    }

    /// A worker on `backend` with one listener, driven turn by turn by the test.
    fn worker<B: Backend>(backend: B, wake: Arc<WakeFd>) -> (B, State, std::net::SocketAddr) {
        worker_with(backend, wake, WorkerContext::for_tests)
    }

    /// A worker as [`worker`] makes, with its own context.
    fn worker_with<B: Backend>(
        mut backend: B,
        wake: Arc<WakeFd>,
        context: fn() -> WorkerContext,
    ) -> (B, State, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_hub, mut deliveries) = crate::gateway::pubsub::Hub::new(1);
        let setup = WorkerSetup {
            index: 0,
            listeners: vec![listener],
            context: Box::new(move |_| context()),
            drain: Arc::default(),
            deliveries: deliveries.remove(0),
            wake,
        };
        let state = State::new(&mut backend, setup);
        (backend, state, addr)
    }

    fn turns_until<B: Backend>(backend: &mut B, state: &mut State, done: impl Fn(&State) -> bool) {
        let (tx, _rx) = mpsc::channel();
        for _ in 0..200 {
            if done(state) {
                return;
            }
            state.dirty.push((u32::MAX, 0)); // keep the wait short: there is always "work"
            state.turn(backend, &tx);
        }
        panic!("the worker never got there");
    }

    fn echo_round_trip<B: Backend>(backend: &mut B, state: &mut State, client: &mut std::net::TcpStream) {
        client.write_all(&[0x82, 0x83, 1, 2, 3, 4, b'a' ^ 1, b'b' ^ 2, b'c' ^ 3]).expect("send");
        let mut echo = [0u8; 5];
        let mut got = 0;
        let (tx, _rx) = mpsc::channel();
        for _ in 0..200 {
            state.dirty.push((u32::MAX, 0));
            state.turn(backend, &tx);
            match client.read(&mut echo[got..]) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
            if got == echo.len() {
                break;
            }
        }
        assert_eq!(echo, [0x82, 3, b'a', b'b', b'c']);
    }

    fn upgraded<B: Backend>(
        backend: &mut B,
        state: &mut State,
        addr: std::net::SocketAddr,
    ) -> std::net::TcpStream {
        upgraded_on(backend, state, addr, "/echo")
    }

    /// A client upgraded on `path` (the 101 read, nothing after it).
    fn upgraded_on<B: Backend>(
        backend: &mut B,
        state: &mut State,
        addr: std::net::SocketAddr,
        path: &str,
    ) -> std::net::TcpStream {
        let mut client = std::net::TcpStream::connect(addr).expect("connect");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        client.write_all(request.as_bytes()).expect("send upgrade");
        client.set_nonblocking(true).expect("nonblocking");
        let mut head = Vec::new();
        let (tx, _rx) = mpsc::channel();
        for _ in 0..400 {
            state.dirty.push((u32::MAX, 0));
            state.turn(backend, &tx);
            let mut buf = [0u8; 512];
            match client.read(&mut buf) {
                Ok(n) => head.extend_from_slice(&buf[..n]),
                // A proxy route waits for its upstream, a thread of the test.
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
            if head.ends_with(b"\r\n\r\n") {
                break;
            }
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        client
    }

    /// The op-lifecycle case of tokio-uring's `complete_after_drop`, for slots: completions that
    /// arrive for a connection that has closed, after its slot went to a new connection, are
    /// recognised by their generation and dropped; the new connection sees none of them.
    fn late_completions_for_a_reused_slot_are_dropped<B: Backend>(backend: B, wake: Arc<WakeFd>) {
        let (mut backend, mut state, addr) = worker(backend, wake);
        let first = upgraded(&mut backend, &mut state, addr);
        let old = state.slab.keys()[0];
        drop(first);
        turns_until(&mut backend, &mut state, |s| s.slab.is_empty());
        let mut second = upgraded(&mut backend, &mut state, addr);
        let new = state.slab.keys()[0];
        assert_eq!(new.0, old.0, "the slot is reused");
        assert_ne!(new.1, old.1, "under a new generation");

        state.flush(&mut backend);
        assert!(state.dirty.is_empty());
        let stale = |side, op| Token::new(old.0, old.1, side, op);
        let mut request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        state.on_event(Event::Recv {
            token: stale(Side::Client, Op::Recv),
            received: Received::Data(&mut request),
            more: true,
            arrived: None,
        });
        state.on_event(Event::Sent { token: stale(Side::Client, Op::Send), result: Ok(99) });
        state.on_event(Event::Connected { token: stale(Side::Upstream, Op::Connect), result: Ok(()) });
        state.on_event(Event::Recv {
            token: stale(Side::Client, Op::Recv),
            received: Received::Eof,
            more: false,
            arrived: None,
        });
        assert!(state.dirty.is_empty(), "a stale completion touched a connection");
        // The new connection is untouched: nothing was sent to it, and it still echoes.
        let mut stray = [0u8; 64];
        assert!(matches!(second.read(&mut stray), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
        echo_round_trip(&mut backend, &mut state, &mut second);
        let key = state.slab.keys()[0];
        let entry = state.slab.get_mut(key.0, key.1).expect("live");
        assert!(entry.client.has(RECV_ARMED), "still reading");
    }

    #[test]
    fn late_completions_for_a_reused_slot_are_dropped_on_io_uring() {
        let wake = WakeFd::new().expect("eventfd");
        match UringBackend::new(Setup::DeferTaskrun, wake.fd()) {
            Ok(backend) => late_completions_for_a_reused_slot_are_dropped(backend, wake),
            Err(error) => eprintln!("io_uring unavailable here ({error}); the epoll variant still runs"),
        }
    }

    /// The upstream of [`bytes_after_a_client_fault_do_not_overtake_the_upstreams_answers`]: a
    /// WebSocket server that accepts one connection, echoes its text messages and answers its
    /// Close, all at once, only once the Close has come (so the relay waits on it meanwhile).
    fn slow_echo_upstream(listener: TcpListener) {
        let (mut socket, _) = listener.accept().expect("accept");
        socket.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut input = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            let n = socket.read(&mut buf).expect("read the upgrade request");
            assert!(n > 0, "the relay closed before its upgrade request");
            input.extend_from_slice(&buf[..n]);
            if let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
        };
        let head = String::from_utf8_lossy(&input[..head_end]).into_owned();
        let key = head
            .lines()
            .find_map(|line| {
                line.strip_prefix("Sec-WebSocket-Key: ").or(line.strip_prefix("sec-websocket-key: "))
            })
            .expect("a key");
        let accept = crate::proto::handshake::AcceptKey::for_key(key.trim().as_bytes());
        let mut answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                           Sec-WebSocket-Accept: "
            .to_vec();
        answer.extend_from_slice(accept.as_bytes());
        answer.extend_from_slice(b"\r\n\r\n");
        socket.write_all(&answer).expect("answer");
        input.drain(..head_end);
        // Masked frames with short payloads: the relay's text message, then its Close.
        let mut replies = Vec::new();
        loop {
            while input.len() >= 6 && input.len() >= 6 + usize::from(input[1] & 0x7f) {
                let len = usize::from(input[1] & 0x7f);
                let mask = [input[2], input[3], input[4], input[5]];
                let payload: Vec<u8> =
                    input[6..6 + len].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
                let opcode = input[0] & 0x0f;
                input.drain(..6 + len);
                replies.extend_from_slice(&[0x80 | opcode, len as u8]);
                replies.extend_from_slice(&payload);
                if opcode == 0x8 {
                    socket.write_all(&replies).expect("echo and close");
                    let _ = socket.read(&mut buf); // until the relay closes
                    return;
                }
            }
            let n = socket.read(&mut buf).expect("read frames");
            assert!(n > 0, "the relay closed before its Close");
            input.extend_from_slice(&buf[..n]);
        }
    }

    /// A context with one proxy route, `/ab` to the upstream whose address [`UPSTREAM`] holds.
    fn proxy_context() -> WorkerContext {
        let addr = UPSTREAM.get().expect("the upstream is listening");
        let mut context = WorkerContext::for_tests();
        context.router.proxies = vec!["/ab".to_string()];
        let url = crate::gateway::proxy::UpstreamUrl {
            url: format!("ws://{addr}/"),
            authority: addr.to_string(),
            addr,
            base_path: String::new(),
            tls_name: None,
        };
        let spec =
            crate::gateway::proxy::ProxyRouteSpec { auth: None, prefix: "/ab".into(), upstreams: vec![url] };
        context.proxies = Arc::new(crate::gateway::proxy::ProxyPool::new(&[spec]));
        context.upstream_timeout = Duration::from_secs(5);
        context
    }

    thread_local! {
        /// The upstream of the test running on this thread (the context is made on it).
        static UPSTREAM: std::cell::Cell<Option<std::net::SocketAddr>> = const { std::cell::Cell::new(None) };
    }

    /// A client that broke the protocol on a proxy route gets its 1002 only after the upstream's
    /// answers to its earlier messages. Bytes it sent after the bad frame may still be delivered
    /// by a receive already under way (a multishot receive is stopped asynchronously): they must
    /// not be parsed, or they make a second fault that is answered at once, ahead of the echo.
    /// (Autobahn 3.4, 4.1.5 and 4.2.5 through a proxy failed so under load: octet-wise chops keep
    /// arriving after the fault.) The late receive is handed to the worker here directly, in the
    /// same turn as the fault, as the driver does when both completions are in one batch.
    fn bytes_after_a_client_fault_do_not_overtake_the_upstreams_answers<B: Backend>(
        backend: B,
        wake: Arc<WakeFd>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
        let upstream_addr = listener.local_addr().expect("addr");
        UPSTREAM.set(Some(upstream_addr));
        let upstream = std::thread::spawn(move || slow_echo_upstream(listener));
        let (mut backend, mut state, addr) = worker_with(backend, wake, proxy_context);
        let mut client = upgraded_on(&mut backend, &mut state, addr, "/ab");
        let (tx, _rx) = mpsc::channel();
        let mut received = Vec::new();
        let read_some = |client: &mut std::net::TcpStream, received: &mut Vec<u8>| {
            let mut buf = [0u8; 512];
            match client.read(&mut buf) {
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        };

        // One read: a text message "Hello", then a frame with a reserved opcode (3).
        let key = state.slab.keys()[0];
        let token = Token::new(key.0, key.1, Side::Client, Op::Recv);
        let mut faulty = vec![0x81, 0x85, 0, 0, 0, 0];
        faulty.extend_from_slice(b"Hello");
        faulty.extend_from_slice(&[0x83, 0x80, 0, 0, 0, 0]);
        state.on_event(Event::Recv {
            token,
            received: Received::Data(&mut faulty),
            more: true,
            arrived: None,
        });
        // A later read of the same receive, in the same batch: what the client sent next.
        let mut late = vec![0xc1, 0x80, 0, 0, 0, 0, 0x89, 0x80, 0, 0, 0, 0];
        state.on_event(Event::Recv { token, received: Received::Data(&mut late), more: true, arrived: None });
        for _ in 0..400 {
            state.dirty.push((u32::MAX, 0));
            state.turn(&mut backend, &tx);
            read_some(&mut client, &mut received);
            if received.len() >= 7 + 4 && received.contains(&0x88) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            received.starts_with(b"\x81\x05Hello"),
            "the echo of the message before the fault comes first, then the Close: {received:02x?}"
        );
        assert_eq!(
            [received[7], received[9], received[10]],
            [0x88, 0x03, 0xea],
            "then 1002: {received:02x?}"
        );
        drop(client);
        turns_until(&mut backend, &mut state, |s| s.slab.is_empty());
        upstream.join().expect("the upstream saw a Close after the message");
    }

    #[test]
    fn bytes_after_a_client_fault_do_not_overtake_the_upstreams_answers_on_io_uring() {
        let wake = WakeFd::new().expect("eventfd");
        match UringBackend::new(Setup::DeferTaskrun, wake.fd()) {
            Ok(backend) => bytes_after_a_client_fault_do_not_overtake_the_upstreams_answers(backend, wake),
            Err(error) => eprintln!("io_uring unavailable here ({error}); the epoll variant runs instead"),
        }
    }

    #[test]
    fn bytes_after_a_client_fault_do_not_overtake_the_upstreams_answers_on_epoll() {
        let wake = WakeFd::new().expect("eventfd");
        let backend = EpollBackend::new(wake.fd()).expect("epoll");
        bytes_after_a_client_fault_do_not_overtake_the_upstreams_answers(backend, wake);
    }

    #[test]
    fn late_completions_for_a_reused_slot_are_dropped_on_epoll() {
        let wake = WakeFd::new().expect("eventfd");
        let backend = EpollBackend::new(wake.fd()).expect("epoll");
        late_completions_for_a_reused_slot_are_dropped(backend, wake);
    }
}
